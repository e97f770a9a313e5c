//! The whole mesh on the real node: the operator installs a control-plane revision, which runs
//! as a pod; a namespace labelled for it gets sidecars injected; pods talk through their
//! sidecars (captured, balanced by the proxy from the streamed config). Skipped (with a message)
//! when the cluster has no real node.

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::Deployment,
    batch::v1::Job,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams},
    core::{ApiResource, GroupVersionKind},
    runtime::wait::await_condition,
};
use mycel_e2e::{
    TestCluster, eventually,
    images::TESTAPP_IMAGE,
    mesh::{Installation, cp_logs, mi_api, run_job, run_jobs},
};
use serde_json::json;

async fn node_cluster() -> Option<(TestCluster, Client)> {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return None;
    }
    let client = c.client().await.unwrap();
    Some((c, client))
}

/// GET through the API server's pod proxy.
async fn pod_get(client: &Client, ns: &str, pod: &str, port_path: &str) -> String {
    let path = format!("/api/v1/namespaces/{ns}/pods/{pod}:{port_path}");
    client.request_text(http::Request::get(path).body(Vec::new()).unwrap()).await.unwrap_or_default()
}

/// Waits until every one of `pods`' sidecars holds inbound mutual-TLS mode `mode`.
async fn sidecars_apply(client: &Client, ns: &str, pods: &[String], mode: &str) {
    for name in pods {
        eventually(&format!("the sidecar of {name} applies {mode}"), Duration::from_secs(20), || async {
            // On the pod's loopback, through port-forward: `config_dump` answers nowhere else.
            let (_, dump) = mycel_e2e::port_forward_get(client, ns, name, 15020, "/config_dump")
                .await
                .map_err(|e| e.to_string())?;
            if dump.contains(&format!("\"{mode}\"")) { Ok(()) } else { Err(dump) }
        })
        .await;
    }
}

/// Waits until PeerAuthentication `name` says `Ready=True` for its current generation, with
/// `Accepted` and `ResolvedRefs` beside it; returns the Ready message.
async fn policy_ready(pas: &Api<DynamicObject>, name: &str) -> String {
    eventually(&format!("PeerAuthentication {name} is Ready"), Duration::from_secs(30), || async {
        let pa = pas.get(name).await.map_err(|e| e.to_string())?;
        let generation = pa.metadata.generation;
        let status = &pa.data["status"];
        let cond = |t: &str| {
            status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == t)).cloned()
        };
        let ok = |t: &str| {
            cond(t).is_some_and(|c| c["status"] == "True" && c["observedGeneration"].as_i64() == generation)
        };
        if status["observedGeneration"].as_i64() == generation
            && ok("Accepted")
            && ok("ResolvedRefs")
            && ok("Ready")
        {
            Ok(cond("Ready")
                .map(|c| c["message"].as_str().unwrap_or_default().to_string())
                .unwrap_or_default())
        } else {
            Err(status.to_string())
        }
    })
    .await
}

#[tokio::test]
async fn injected_pods_talk_through_their_sidecars() {
    let Some((c, client)) = node_cluster().await else { return };
    // An installation, and an application namespace for its revision.
    let Installation { root, app, revision: rev, operator, .. } = Installation::start(&c, "mesh").await;
    let mis = mi_api(&client, &root.name);
    let ready = |o: &DynamicObject| {
        o.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
    };
    let n = app.name.clone();
    let web = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}, annotations: {{mycel.io/cert-ttl-seconds: "20"}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: web
        image: {TESTAPP_IMAGE}
        args: ["http-echo", "--port", "8080"]
        env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /, port: http}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"#
    );
    c.kubectl_run(&["apply", "-n", &n, "-f", "-"], Some(&web)).unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &n);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &n);
    let available = tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(deployments.clone(), "web", |d: Option<&Deployment>| {
            d.and_then(|d| d.status.as_ref()).is_some_and(|s| s.available_replicas == Some(2))
        }),
    )
    .await;
    if available.is_err() {
        let listed = pods.list(&ListParams::default()).await.unwrap();
        let states: Vec<String> = listed
            .items
            .iter()
            .map(|p| {
                format!(
                    "{}: {:?}",
                    p.metadata.name.clone().unwrap_or_default(),
                    p.status.as_ref().map(|s| (&s.phase, &s.init_container_statuses, &s.container_statuses))
                )
            })
            .collect();
        let mut proxy_logs = String::new();
        for p in &listed.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            let lp = LogParams {
                container: Some("mycel-proxy".into()),
                tail_lines: Some(30),
                ..Default::default()
            };
            proxy_logs
                .push_str(&format!("--- {name}\n{}\n", pods.logs(&name, &lp).await.unwrap_or_default()));
        }
        panic!(
            "web is not available:\n{}\nsidecars:\n{proxy_logs}\ncontrol plane:\n{}",
            states.join("\n"),
            cp_logs(&client, &root.name).await
        );
    }
    let web_pods = pods.list(&ListParams::default().labels("app=web")).await.unwrap().items;
    let names: Vec<String> = web_pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
    for p in &web_pods {
        let spec = p.spec.as_ref().unwrap();
        let inits: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(inits, ["mycel-init", "mycel-proxy"], "injected");
        let probe = spec.containers[0].readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(probe.path.as_deref(), Some("/app-health/web/readyz"), "probe rewritten to the sidecar");
    }

    // A Job calls the Service through its sidecar and completes (the native sidecar does not
    // hold it back).
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "client"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "client", "image": TESTAPP_IMAGE,
                "args": ["get", "--no-reuse", "--count", "20", "http://web/", &format!("http://web.{n}.svc.cluster.local/")]}]}}}
    }))
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &n);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let finished = tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(jobs.clone(), "client", |j: Option<&Job>| {
            j.and_then(|j| j.status.as_ref())
                .is_some_and(|s| s.succeeded == Some(1) || s.failed.unwrap_or(0) > 0)
        }),
    )
    .await;
    let client_pod =
        pods.list(&ListParams::default().labels("job-name=client")).await.unwrap().items.remove(0);
    let pod_name = client_pod.metadata.name.clone().unwrap();
    let logs = pods
        .logs(&pod_name, &LogParams { container: Some("client".into()), ..Default::default() })
        .await
        .unwrap_or_default();
    let sidecar = pods
        .logs(&pod_name, &LogParams { container: Some("mycel-proxy".into()), ..Default::default() })
        .await
        .unwrap_or_default();
    assert!(finished.is_ok(), "the Job did not finish; client:\n{logs}\nsidecar:\n{sidecar}");
    assert_eq!(
        client_pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded"),
        "client:\n{logs}\nsidecar:\n{sidecar}"
    );
    assert_eq!(logs.lines().count(), 40, "{logs}");
    for name in &names {
        assert!(
            logs.contains(name.as_str()),
            "the sidecar balanced over both pods; {name} never answered:\n{logs}"
        );
    }

    // The server side saw the requests arrive through its sidecar.
    let mut inbound = 0.0;
    for name in &names {
        let path = format!("/api/v1/namespaces/{n}/pods/{name}:15020/proxy/metrics");
        let text = client.request_text(http::Request::get(path).body(Vec::new()).unwrap()).await.unwrap();
        inbound += text
            .lines()
            .filter(|l| l.starts_with("mycel_proxy_requests_total{direction=\"inbound\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    assert!(inbound >= 40.0, "inbound requests counted by the web sidecars: {inbound}");

    // Sidecar to sidecar is mutual TLS: the server's sidecar hands the app the client's
    // verified identity.
    let sa: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "client"}})).unwrap();
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &n)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let get = |count: &str| -> Vec<String> {
        ["get", "--no-reuse", "--timeout", "3", "--count", count, "http://web/"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let (ok, logs) = run_job(&client, &n, "meshed", "client", true, &get("4")).await;
    assert!(ok, "{logs}");
    let xfcc = format!(
        "\"x-forwarded-client-cert\":\"By=spiffe://cluster.local/ns/{n}/sa/default;URI=spiffe://cluster.local/ns/{n}/sa/client\""
    );
    assert_eq!(
        logs.lines().filter(|l| l.contains(&xfcc)).count(),
        4,
        "every request over mutual TLS:\n{logs}"
    );
    // PERMISSIVE (the default): a client outside the mesh gets through in plaintext.
    let (ok, logs) = run_job(&client, &n, "plain", "client", false, &get("2")).await;
    assert!(ok && !logs.contains("x-forwarded-client-cert"), "{logs}");

    // STRICT for the namespace: plaintext is refused, the mesh still gets through.
    let pa: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "mycel.io/v1alpha1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict"}, "spec": {"mtls": {"mode": "STRICT"}}
    }))
    .unwrap();
    let pa_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("mycel.io", "v1alpha1", "PeerAuthentication"),
        "peerauthentications",
    );
    let pas = Api::<DynamicObject>::namespaced_with(client.clone(), &n, &pa_ar);
    pas.create(&PostParams::default(), &pa).await.unwrap();
    sidecars_apply(&client, &n, &names, "STRICT").await;
    // Its status says so once every proxy of the namespace acknowledged it.
    let message = policy_ready(&pas, "strict").await;
    assert!(message.starts_with("in effect: the proxies of all "), "{message}");
    // The proxy's state is not for the pod network: through the API server's pod proxy (which
    // connects from outside the pod) config_dump is refused, metrics are not.
    let via_api_server = |path: &str| {
        let path = format!("/api/v1/namespaces/{n}/pods/{}:15020/proxy{path}", names[0]);
        let client = client.clone();
        async move { client.request_text(http::Request::get(path).body(Vec::new()).unwrap()).await }
    };
    match via_api_server("/config_dump").await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("config_dump answered the pod network: {other:?}"),
    }
    assert!(via_api_server("/metrics").await.is_ok_and(|m| m.contains("mycel_proxy_")));
    let (ok, logs) = run_job(&client, &n, "plain-strict", "client", false, &get("1")).await;
    assert!(!ok, "a plaintext client got through STRICT:\n{logs}");
    let (ok, logs) = run_job(&client, &n, "meshed-strict", "client", true, &get("4")).await;
    assert!(ok, "{logs}");
    assert_eq!(logs.lines().filter(|l| l.contains(&xfcc)).count(), 4, "{logs}");
    let mut refused = 0.0;
    for name in &names {
        refused += pod_get(&client, &n, name, "15020/proxy/metrics")
            .await
            .lines()
            .filter(|l| l.starts_with("mycel_proxy_refused_connections_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    assert!(refused >= 1.0, "the refusal is counted");

    // DISABLE for the web workload (a selector beats the namespace's STRICT): callers' sidecars
    // stop using mutual TLS toward it, and plaintext gets through again.
    let disable: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "mycel.io/v1alpha1", "kind": "PeerAuthentication",
        "metadata": {"name": "web-plain"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "DISABLE"}}
    }))
    .unwrap();
    pas.create(&PostParams::default(), &disable).await.unwrap();
    sidecars_apply(&client, &n, &names, "DISABLE").await;
    let message = policy_ready(&pas, "web-plain").await;
    let web = names.len();
    assert!(
        message.contains(&format!("all {web} selected workload(s)")),
        "the web pods, no other: {message}"
    );
    let (ok, logs) = run_job(&client, &n, "meshed-disable", "client", true, &get("2")).await;
    assert!(ok && !logs.contains("x-forwarded-client-cert"), "plaintext from a meshed client:\n{logs}");
    let (ok, logs) = run_job(&client, &n, "plain-disable", "client", false, &get("1")).await;
    assert!(ok, "{logs}");
    pas.delete("web-plain", &Default::default()).await.unwrap();
    sidecars_apply(&client, &n, &names, "STRICT").await;

    // gRPC (HTTP/2), WebSocket and opaque TCP cross two sidecars too, over mutual TLS.
    let multi = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: multi}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: multi}}}}
  template:
    metadata: {{labels: {{app: multi}}}}
    spec:
      containers:
      - {{name: grpc, image: {TESTAPP_IMAGE}, args: ["grpc-echo", "--port", "9090"]}}
      - {{name: ws, image: {TESTAPP_IMAGE}, args: ["ws-echo", "--port", "8081"]}}
      - {{name: tcp, image: {TESTAPP_IMAGE}, args: ["tcp-echo", "--port", "9000"]}}
---
apiVersion: v1
kind: Service
metadata: {{name: multi}}
spec:
  selector: {{app: multi}}
  ports: [{{name: grpc, port: 9090}}, {{name: http-ws, port: 8081}}, {{name: tcp, port: 9000}}]
"#
    );
    c.kubectl_run(&["apply", "-n", &n, "-f", "-"], Some(&multi)).unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(deployments.clone(), "multi", |d: Option<&Deployment>| {
            d.and_then(|d| d.status.as_ref()).is_some_and(|s| s.available_replicas == Some(1))
        }),
    )
    .await
    .expect("multi available")
    .unwrap();
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (ok, logs) = run_jobs(
        &client,
        &n,
        "protocols",
        "client",
        true,
        &[
            strs(&["grpc-check", "--count", "3", "http://multi:9090"]),
            strs(&["ws-send", "ws://multi:8081/", "one", "two"]),
            strs(&["tcp-send", "multi:9000", "ping", "pong"]),
        ],
        None,
    )
    .await;
    assert!(ok, "every protocol through two sidecars; gRPC said:\n{logs}");
    assert_eq!(logs.lines().filter(|l| l.contains("Serving")).count(), 3, "{logs}");
    let multi_pod = pods.list(&ListParams::default().labels("app=multi")).await.unwrap().items[0]
        .metadata
        .name
        .clone()
        .unwrap();
    let metrics = pod_get(&client, &n, &multi_pod, "15020/proxy/metrics").await;
    let mtls_conns: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("mycel_proxy_connections_total{")
                && l.contains("direction=\"inbound\"")
                && l.contains("protocol=\"mtls\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(mtls_conns >= 3.0, "gRPC, WebSocket and TCP arrived over mutual TLS:\n{metrics}");

    // Under steady load, certificates renew (every ~10 s here) and a server pod is deleted:
    // no request fails.
    let issued = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("mycel_proxy_certificate_requests_total{result=\"issued\"}"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let survivor = names[1].clone();
    let before = issued(&pod_get(&client, &n, &survivor, "15020/proxy/metrics").await);
    let victim = names[0].clone();
    let pods2 = pods.clone();
    let delete_midway = Box::pin(async move {
        // Once a third of the requests have been answered, so that the deletion lands in the
        // middle of the load.
        eventually("the load is under way", Duration::from_secs(90), || async {
            let list = pods2
                .list(&ListParams::default().labels("job-name=load"))
                .await
                .map_err(|e| e.to_string())?;
            let pod = list.items.first().and_then(|p| p.metadata.name.clone()).ok_or("no load pod yet")?;
            let params = kube::api::LogParams { container: Some("client".into()), ..Default::default() };
            let answered = pods2.logs(&pod, &params).await.map(|l| l.lines().count()).unwrap_or(0);
            if answered >= 40 { Ok(()) } else { Err(format!("{answered} answered")) }
        })
        .await;
        pods2.delete(&victim, &Default::default()).await.unwrap();
    });
    let (ok, logs) = run_jobs(
        &client,
        &n,
        "load",
        "client",
        true,
        &[strs(&[
            "get",
            "--no-reuse",
            "--timeout",
            "5",
            "--count",
            "120",
            "--interval-ms",
            "200",
            "http://web/",
        ])],
        Some(delete_midway),
    )
    .await;
    assert!(
        ok,
        "a request failed under rotation and pod deletion:\n{}",
        logs.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(logs.lines().count(), 120);
    let after = issued(&pod_get(&client, &n, &survivor, "15020/proxy/metrics").await);
    assert!(after >= before + 1.0, "the server's certificate renewed under load ({before} → {after})");

    // An opted-out pod gets no sidecar.
    let plain: Pod = serde_json::from_value(json!({
        "metadata": {"name": "plain", "annotations": {"mycel.io/inject": "false"}},
        "spec": {"containers": [{"name": "c", "image": TESTAPP_IMAGE, "args": ["http-echo", "--port", "8080"]}]}
    }))
    .unwrap();
    let plain = pods.create(&PostParams::default(), &plain).await.unwrap();
    assert!(plain.spec.unwrap().init_containers.unwrap_or_default().is_empty());

    // A second revision beside the first; the namespace moves to it by relabelling: pods
    // created after that join the new revision's control plane, older ones stay on the old one.
    let rev_b = format!("{rev}b");
    let mi_b: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "mycel.io/v1alpha1", "kind": "MeshInstallation",
        "metadata": {"name": "mesh-b"}, "spec": {"revision": rev_b, "ingressGateway": {"enabled": true}}
    }))
    .unwrap();
    mis.create(&PostParams::default(), &mi_b).await.unwrap();
    eventually("revision b is Ready", Duration::from_secs(120), || async {
        let o = mis.get("mesh-b").await.unwrap();
        if ready(&o) { Ok(()) } else { Err(format!("{:#}", o.data["status"])) }
    })
    .await;
    Api::<Namespace>::all(client.clone())
        .patch(
            &n,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"mycel.io/rev": rev_b}}})),
        )
        .await
        .unwrap();
    let moved: Pod = serde_json::from_value(json!({
        "metadata": {"name": "moved"},
        "spec": {"containers": [{"name": "c", "image": TESTAPP_IMAGE, "args": ["http-echo", "--port", "8080"]}]}
    }))
    .unwrap();
    // Ready says the control plane runs; kube-proxy may take a moment more to route its new
    // Service, and until then the webhook (failurePolicy Fail) refuses pods, as it should. The
    // API server also matches webhooks against its own cached copy of the namespace, so for a
    // moment after the relabel a new pod can still go to revision a: such a pod is deleted and
    // created again, as a user would restart it.
    let injected_by = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == "mycel-proxy"))
            .and_then(|c| c.env.as_ref())
            .and_then(|env| env.iter().find(|e| e.name == "MYCEL_CONTROL_PLANE"))
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    let now = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    eventually("the moved pod is injected by revision b", Duration::from_secs(60), || async {
        let created = pods.create(&PostParams::default(), &moved).await.map_err(|e| e.to_string())?;
        let cp_env = injected_by(&created);
        if cp_env.starts_with(&format!("mycel-control-plane-{rev_b}.")) {
            return Ok(());
        }
        let _ = pods.delete("moved", &now).await;
        Err(format!("injected with MYCEL_CONTROL_PLANE={cp_env:?}"))
    })
    .await;
    // `/debug/*` answers on the control plane's loopback only: through port-forward to its pod.
    let proxies_of = |r: String| {
        let (client, root_ns) = (client.clone(), root.name.clone());
        async move {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &root_ns);
            let lp = ListParams::default().labels(&format!("app=mycel-control-plane,mycel.io/rev={r}"));
            let Some(pod) = pods.list(&lp).await.ok().and_then(|l| {
                l.items
                    .into_iter()
                    .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            }) else {
                return String::new();
            };
            let name = pod.metadata.name.unwrap_or_default();
            mycel_e2e::port_forward_get(&client, &root_ns, &name, 15014, "/debug/proxies")
                .await
                .map(|(_, body)| body)
                .unwrap_or_default()
        }
    };
    eventually("the moved pod connects to revision b", Duration::from_secs(60), || async {
        let b = proxies_of(rev_b.clone()).await;
        if b.contains("\"pod\": \"moved\"") { Ok(()) } else { Err(b) }
    })
    .await;
    // (A pod that went to revision a and was deleted above may take a moment to disconnect.)
    eventually(
        "older pods stay on revision a, the moved one is not there",
        Duration::from_secs(30),
        || async {
            let a = proxies_of(rev.clone()).await;
            if !a.contains("\"pod\": \"moved\"") && a.contains(&survivor) { Ok(()) } else { Err(a) }
        },
    )
    .await;
    // Removing revision b leaves revision a serving.
    mis.delete("mesh-b", &Default::default()).await.unwrap();
    eventually("revision b is gone", Duration::from_secs(60), || async {
        match mis.get_opt("mesh-b").await.unwrap() {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    assert!(ready(&mis.get("mesh").await.unwrap()), "revision a is still Ready");
    assert!(proxies_of(rev.clone()).await.contains(&survivor));

    app.delete().await.unwrap();
    mis.delete("mesh", &Default::default()).await.unwrap();
    eventually("the installation is gone", Duration::from_secs(60), || async {
        match mis.get_opt("mesh").await.unwrap() {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    drop(operator);
    root.delete().await.unwrap();
}
