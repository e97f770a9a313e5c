//! Helpers of the tests that run the whole mesh on the real node: an installation (operator,
//! MeshInstallation, a namespace labelled for its revision), Jobs of the test app, and what the
//! control plane logged (for failure messages).

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::Deployment,
    batch::v1::Job,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams},
    core::{ApiResource, GroupVersionKind},
    runtime::wait::await_condition,
};
use serde_json::{Value, json};

use crate::{TestCluster, TestNamespace, eventually, images::TESTAPP_IMAGE, process::OperatorProcess};

pub fn mi_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("mycel.io", "v1alpha1", "MeshInstallation"),
        "meshinstallations",
    );
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// A log of what the control plane said, for failure messages.
pub async fn cp_logs(client: &Client, ns: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut out = String::new();
    for p in pods.list(&ListParams::default().labels("app=mycel-control-plane")).await.unwrap() {
        let name = p.metadata.name.clone().unwrap_or_default();
        let log = pods.logs(&name, &LogParams { tail_lines: Some(40), ..Default::default() }).await;
        out.push_str(&format!(
            "--- {name}: {:?}\n{}\n",
            p.status.and_then(|s| s.phase),
            log.unwrap_or_default()
        ));
    }
    out
}

/// Runs a Job of the test app to its end; whether it succeeded, and its app's log.
pub async fn run_job(
    client: &Client,
    ns: &str,
    name: &str,
    sa: &str,
    inject: bool,
    args: &[String],
) -> (bool, String) {
    run_jobs(client, ns, name, sa, inject, &[args.to_vec()], None).await
}

/// Like [`run_job`], with one container per argument list (the log is the first's), and
/// `during` run while the Job does.
pub async fn run_jobs(
    client: &Client,
    ns: &str,
    name: &str,
    sa: &str,
    inject: bool,
    args: &[Vec<String>],
    during: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>>,
) -> (bool, String) {
    let containers: Vec<serde_json::Value> = args
        .iter()
        .enumerate()
        .map(|(i, a)| json!({"name": if i == 0 { "client".to_string() } else { format!("client{i}") }, "image": TESTAPP_IMAGE, "args": a}))
        .collect();
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"annotations": {"mycel.io/inject": if inject { "true" } else { "false" }, "mycel.io/cert-ttl-seconds": "20"}},
            "spec": {"restartPolicy": "Never", "serviceAccountName": sa, "containers": containers}}}
    }))
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    if let Some(during) = during {
        during.await;
    }
    let finished = tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(jobs.clone(), name, |j: Option<&Job>| {
            j.and_then(|j| j.status.as_ref())
                .is_some_and(|s| s.succeeded == Some(1) || s.failed.unwrap_or(0) > 0)
        }),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod =
        pods.list(&ListParams::default().labels(&format!("job-name={name}"))).await.unwrap().items.remove(0);
    let pod_name = pod.metadata.name.clone().unwrap();
    let logs = pods
        .logs(&pod_name, &LogParams { container: Some("client".into()), ..Default::default() })
        .await
        .unwrap_or_default();
    assert!(finished.is_ok(), "job {name} did not finish:\n{logs}");
    let ok = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded");
    (ok, logs)
}

/// The API of a mycel.io kind in a namespace.
pub fn mycel_api(client: &Client, ns: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("mycel.io", "v1alpha1", kind), plural);
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// A revision installed by an operator of this test: its root namespace, and an application
/// namespace labelled for it. [`Installation::finish`] removes all of it.
pub struct Installation {
    pub root: TestNamespace,
    pub app: TestNamespace,
    pub revision: String,
    pub operator: OperatorProcess,
    pub client: Client,
}

/// `a` with `b`'s keys set over it.
fn merged(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

impl Installation {
    /// Installs a revision (default profile) and waits until it is Ready.
    pub async fn start(c: &TestCluster, prefix: &str) -> Installation {
        Installation::start_with(c, prefix, json!({})).await
    }

    /// The same, with more of the MeshInstallation's `spec` (merged over the revision).
    pub async fn start_with(c: &TestCluster, prefix: &str, spec: Value) -> Installation {
        let client = c.client().await.unwrap();
        c.install_crds().unwrap();
        let root = c.namespace(prefix).await.unwrap();
        let revision = format!("r{}", &root.name[root.name.len() - 7..]);
        let operator = OperatorProcess::start(c, &root.name).unwrap();
        let mis = mi_api(&client, &root.name);
        let mi: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "mycel.io/v1alpha1", "kind": "MeshInstallation",
            "metadata": {"name": "mesh"}, "spec": merged(json!({"revision": revision}), spec)
        }))
        .unwrap();
        mis.create(&PostParams::default(), &mi).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let o = mis.get("mesh").await.unwrap();
            let ready = o.data["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
            if ready {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the installation is not Ready: {:#}\n{}\noperator:\n{}",
                o.data["status"],
                cp_logs(&client, &root.name).await,
                operator.log_text()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let app = c.namespace(&format!("{prefix}-app")).await.unwrap();
        Api::<Namespace>::all(client.clone())
            .patch(
                &app.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"mycel.io/rev": revision}}})),
            )
            .await
            .unwrap();
        Installation { root, app, revision, operator, client }
    }

    /// Applies `yaml` in the application namespace.
    pub fn apply(&self, c: &TestCluster, yaml: &str) {
        c.kubectl_run(&["apply", "-n", &self.app.name, "-f", "-"], Some(yaml)).unwrap();
    }

    /// Waits until Deployment `name` of the application namespace has `replicas` available.
    pub async fn available(&self, name: &str, replicas: i32) {
        self.available_in(&self.app.name, name, replicas).await
    }

    /// Waits until Deployment `name` of `namespace` has `replicas` available.
    pub async fn available_in(&self, namespace: &str, name: &str, replicas: i32) {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let ok = tokio::time::timeout(
            Duration::from_secs(120),
            await_condition(deployments, name, move |d: Option<&Deployment>| {
                d.and_then(|d| d.status.as_ref()).is_some_and(|s| s.available_replicas == Some(replicas))
            }),
        )
        .await;
        if ok.is_err() {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let listed = pods.list(&ListParams::default()).await.unwrap();
            let states: Vec<String> = listed
                .items
                .iter()
                .map(|p| {
                    format!(
                        "{}: {:?}",
                        p.metadata.name.clone().unwrap_or_default(),
                        p.status.as_ref().map(|s| &s.phase)
                    )
                })
                .collect();
            panic!(
                "{name} is not available:\n{}\n{}",
                states.join("\n"),
                cp_logs(&self.client, &self.root.name).await
            );
        }
    }

    /// Removes the installation, its operator and both namespaces.
    pub async fn finish(self) {
        self.app.delete().await.unwrap();
        let mis = mi_api(&self.client, &self.root.name);
        mis.delete("mesh", &Default::default()).await.unwrap();
        eventually("the installation is gone", Duration::from_secs(60), || async {
            match mis.get_opt("mesh").await.unwrap() {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        })
        .await;
        drop(self.operator);
        self.root.delete().await.unwrap();
    }
}

/// One response as `mycel-testapp get --report` printed it.
pub struct Seen {
    pub url: String,
    pub status: u64,
    pub headers: Value,
    pub body: Value,
    pub elapsed: Duration,
    /// When the response ended, in ms since the epoch by the node's clock.
    pub at_ms: u64,
}

impl Seen {
    /// The pod that answered (the echo server's own report).
    pub fn pod(&self) -> &str {
        self.body["pod"].as_str().unwrap_or("")
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers[name].as_str().unwrap_or("")
    }
}

/// The responses a `get --report` log holds.
pub fn parse(log: &str) -> Vec<Seen> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| Seen {
            url: v["url"].as_str().unwrap_or_default().to_string(),
            status: v["status"].as_u64().unwrap_or_default(),
            headers: v["headers"].clone(),
            body: v["body"].clone(),
            elapsed: Duration::from_millis(v["elapsed_ms"].as_u64().unwrap_or_default()),
            at_ms: v["at_ms"].as_u64().unwrap_or_default(),
        })
        .collect()
}

/// The arguments of `mycel-testapp get --report`: each URL `count` times, with `headers`.
pub fn get(urls: &[&str], count: u32, headers: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["get", "--report", "--timeout", "10", "--count", &count.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for h in headers {
        a.push("--header".into());
        a.push(h.to_string());
    }
    a.extend(urls.iter().map(|u| u.to_string()));
    a
}

/// The condition `type_` of a mycel.io object for its current generation, once it has one.
pub async fn condition(api: &kube::Api<DynamicObject>, name: &str, type_: &str, status: &str) -> Value {
    eventually(&format!("{name} has {type_}={status}"), Duration::from_secs(60), || async {
        let o = api.get(name).await.map_err(|e| e.to_string())?;
        let generation = o.metadata.generation;
        let c = o.data["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
            .cloned()
            .unwrap_or_default();
        if c["status"] == status && c["observedGeneration"].as_i64() == generation {
            Ok(c)
        } else {
            Err(o.data["status"].to_string())
        }
    })
    .await
}

/// A Deployment `name` of echo servers labelled `app: <app>, version: <version>`, and a Service
/// `<app>` (port 80) selecting `app: <app>` (several Deployments may share one Service).
pub fn echo(name: &str, app: &str, version: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {app}, version: {version}}}}}
  template:
    metadata: {{labels: {{app: {app}, version: {version}}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: echo
        image: {TESTAPP_IMAGE}
        args: ["http-echo", "--port", "8080"]
        env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /, port: http}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: {app}}}
spec:
  selector: {{app: {app}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"#
    )
}
