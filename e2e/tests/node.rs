//! The real node: pods in real containers on the kubelet, with pod networking, Services through
//! kube-proxy, cluster DNS, probes, graceful termination, logs, exec and projected tokens.
//! Skipped (with a message) when the cluster has no real node, e.g. when not run as root.

use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::{
    authentication::v1::TokenReview, batch::v1::Job, core::v1::Pod, discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, LogParams, PostParams},
    runtime::{
        WatchStreamExt,
        wait::{await_condition, conditions},
        watcher,
    },
};
use mycel_e2e::{
    TestCluster, TestNamespace, eventually,
    images::{TESTAPP_IMAGE, TOOLBOX_IMAGE},
};
use serde_json::json;

/// The shared cluster, if it has a real node.
async fn node_cluster() -> Option<(TestCluster, Client)> {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return None;
    }
    let client = c.client().await.unwrap();
    Some((c, client))
}

async fn apply(c: &TestCluster, ns: &TestNamespace, yaml: &str) {
    c.kubectl_run(&["apply", "-n", &ns.name, "-f", "-"], Some(yaml)).unwrap();
}

/// An HTTP server answering with its pod name (busybox httpd), behind a Service `web`.
fn web_app(replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: web
        image: {TOOLBOX_IMAGE}
        command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && touch /tmp/ready && exec httpd -f -p 8080 -h /www"]
        ports: [{{containerPort: 8080}}]
        readinessProbe:
          exec: {{command: ["test", "-f", "/tmp/ready"]}}
          periodSeconds: 1
          failureThreshold: 1
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
"#
    )
}

#[tokio::test]
async fn a_deployment_answers_through_its_service_by_dns_and_cluster_ip_and_a_job_completes() {
    let Some((c, client)) = node_cluster().await else { return };
    let ns = c.namespace("node-web").await.unwrap();
    apply(&c, &ns, &web_app(2)).await;
    c.kubectl_run(
        &["wait", "-n", &ns.name, "--for=condition=Available", "--timeout=120s", "deployment/web"],
        None,
    )
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let web = pods.list(&ListParams::default().labels("app=web")).await.unwrap();
    let names: Vec<String> = web.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
    for p in &web.items {
        assert!(
            p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).is_some_and(|ip| ip.starts_with("10.200.0."))
        );
    }
    let svc = c
        .kubectl_run(&["get", "svc", "web", "-n", &ns.name, "-o", "jsonpath={.spec.clusterIP}"], None)
        .unwrap();

    // Processes on the host — the API server calling a webhook Service among them — reach
    // Services by ClusterIP too (routed to the bridge, turned into a pod address by kube-proxy).
    // This also waits until kube-proxy has programmed the Service, before pods use it.
    // It waits until kube-proxy has programmed both endpoints (each pod has answered once), so
    // that the Job below can see both.
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let from_host =
        eventually("the host reaches both pods by the Service's ClusterIP", Duration::from_secs(30), || {
            let (svc, seen, names) = (svc.clone(), &seen, &names);
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s =
                    tokio::net::TcpStream::connect((svc.as_str(), 80)).await.map_err(|e| e.to_string())?;
                s.write_all(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
                    .await
                    .map_err(|e| e.to_string())?;
                let mut out = String::new();
                s.read_to_string(&mut out).await.map_err(|e| e.to_string())?;
                let mut seen = seen.lock().unwrap();
                seen.extend(names.iter().filter(|n| out.contains(n.as_str())).cloned());
                if seen.len() == names.len() {
                    Ok(out)
                } else {
                    Err(format!("answered so far: {seen:?}; last: {out}"))
                }
            }
        })
        .await;
    assert!(
        from_host.starts_with("HTTP/1.1 200") && names.iter().any(|n| from_host.contains(n.as_str())),
        "{from_host}"
    );

    // A Job that calls the Service by every name a user would write, and by its ClusterIP.
    let urls: Vec<String> = [
        "web".to_string(),
        format!("web.{}", ns.name),
        format!("web.{}.svc", ns.name),
        format!("web.{}.svc.cluster.local", ns.name),
        svc.clone(),
    ]
    .iter()
    .map(|h| format!("http://{h}/"))
    .collect();
    let mut args = vec!["get".to_string(), "--no-reuse".into(), "--count".into(), "6".into()];
    args.extend(urls);
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "client"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "client", "image": TESTAPP_IMAGE, "args": args}]}}}
    }))
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(jobs.clone(), "client", |j: Option<&Job>| {
            j.and_then(|j| j.status.as_ref())
                .is_some_and(|s| s.succeeded == Some(1) || s.failed.unwrap_or(0) > 0)
        }),
    )
    .await
    .expect("job finished")
    .unwrap();
    let client_pod =
        pods.list(&ListParams::default().labels("job-name=client")).await.unwrap().items.remove(0);
    let pod_name = client_pod.metadata.name.clone().unwrap();
    let logs = pods.logs(&pod_name, &LogParams::default()).await.unwrap();
    assert_eq!(
        client_pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded"),
        "client pod failed; its log:\n{logs}"
    );
    assert_eq!(logs.lines().count(), 30, "30 answers:\n{logs}");
    for n in &names {
        assert!(
            logs.contains(n.as_str()),
            "the Service balanced over both pods; {n} never answered:\n{logs}"
        );
    }
    // exec goes through the API server to the kubelet.
    let host = c.kubectl_run(&["exec", "-n", &ns.name, &names[0], "--", "hostname"], None).unwrap();
    assert_eq!(host.trim(), names[0]);
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn a_failing_readiness_probe_takes_the_pod_out_of_the_endpoint_slice() {
    let Some((c, client)) = node_cluster().await else { return };
    let ns = c.namespace("node-ready").await.unwrap();
    apply(&c, &ns, &web_app(2)).await;
    c.kubectl_run(
        &["wait", "-n", &ns.name, "--for=condition=Available", "--timeout=120s", "deployment/web"],
        None,
    )
    .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns.name);
    let ready_ips = || async {
        let mut ips = Vec::new();
        for s in slices.list(&ListParams::default().labels("kubernetes.io/service-name=web")).await.unwrap() {
            for e in s.endpoints {
                if e.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                    ips.extend(e.addresses);
                }
            }
        }
        ips.sort();
        ips
    };
    eventually("both pods ready in the EndpointSlice", Duration::from_secs(30), || async {
        let ips = ready_ips().await;
        (ips.len() == 2).then_some(()).ok_or(format!("ready: {ips:?}"))
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let victim = pods.list(&ListParams::default().labels("app=web")).await.unwrap().items.remove(0);
    let victim_ip = victim.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    c.kubectl_run(
        &["exec", "-n", &ns.name, victim.metadata.name.as_deref().unwrap(), "--", "rm", "/tmp/ready"],
        None,
    )
    .unwrap();
    eventually("the unready pod leaves the EndpointSlice", Duration::from_secs(30), || async {
        let ips = ready_ips().await;
        (ips.len() == 1 && !ips.contains(&victim_ip)).then_some(()).ok_or(format!("ready: {ips:?}"))
    })
    .await;
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn deleting_a_pod_stops_its_container_gracefully() {
    let Some((c, client)) = node_cluster().await else { return };
    let ns = c.namespace("node-term").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "graceful"},
        "spec": {"terminationGracePeriodSeconds": 20, "containers": [{
            "name": "app", "image": TOOLBOX_IMAGE,
            "command": ["sh", "-c", "trap 'echo got SIGTERM; exit 0' TERM; echo started; while true; do sleep 0.2; done"]
        }]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(pods.clone(), "graceful", conditions::is_pod_running()),
    )
    .await
    .expect("running")
    .unwrap();
    // Watch the pod while it goes away: its container must end with exit code 0 (it handled
    // SIGTERM), well before the 20 s after which the kubelet would SIGKILL it (137).
    // The watch says when it has seen the pod as it is, so that the deletion comes after.
    let (seen_tx, seen) = tokio::sync::oneshot::channel::<()>();
    let mut seen_tx = Some(seen_tx);
    let watch = watcher(pods.clone(), watcher::Config::default().fields("metadata.name=graceful"))
        .applied_objects()
        .try_filter_map(move |p: Pod| {
            if let Some(tx) = seen_tx.take() {
                let _ = tx.send(());
            }
            async move {
                Ok(p.status
                    .and_then(|s| s.container_statuses)
                    .and_then(|cs| cs.into_iter().next())
                    .and_then(|c| c.state)
                    .and_then(|s| s.terminated)
                    .map(|t| t.exit_code))
            }
        });
    let started = std::time::Instant::now();
    let exit = tokio::spawn(async move { Box::pin(watch).try_next().await });
    tokio::time::timeout(Duration::from_secs(30), seen).await.expect("the watch sees the pod").unwrap();
    pods.delete("graceful", &DeleteParams::default()).await.unwrap();
    let code =
        tokio::time::timeout(Duration::from_secs(30), exit).await.expect("terminated").unwrap().unwrap();
    assert_eq!(code, Some(0), "the container exited on SIGTERM by itself");
    assert!(started.elapsed() < Duration::from_secs(15), "no SIGKILL after the grace period");
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn a_projected_service_account_token_in_a_pod_passes_token_review() {
    let Some((c, client)) = node_cluster().await else { return };
    let ns = c.namespace("node-token").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "token"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "app", "image": TOOLBOX_IMAGE,
                "command": ["cat", "/var/run/secrets/mycel/token"],
                "volumeMounts": [{"name": "token", "mountPath": "/var/run/secrets/mycel"}]}],
            "volumes": [{"name": "token", "projected": {"sources": [{"serviceAccountToken":
                {"audience": "mycel-test", "expirationSeconds": 3600, "path": "token"}}]}}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(pods.clone(), "token", |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref()).and_then(|s| s.phase.as_deref()) == Some("Succeeded")
        }),
    )
    .await
    .expect("pod completed")
    .unwrap();
    let token = pods.logs("token", &LogParams::default()).await.unwrap();
    let review: TokenReview = serde_json::from_value(json!({
        "spec": {"token": token.trim(), "audiences": ["mycel-test"]}
    }))
    .unwrap();
    let reviewed = Api::<TokenReview>::all(client).create(&PostParams::default(), &review).await.unwrap();
    let status = reviewed.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.unwrap();
    assert_eq!(user.username.as_deref(), Some(format!("system:serviceaccount:{}:default", ns.name).as_str()));
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-name"),
        Some(&vec!["token".to_string()]),
        "bound to the pod"
    );
    ns.delete().await.unwrap();
}

/// A pod with the proxy as a native sidecar, set up by hand (the injector will do this): the
/// `mycel-proxy init` init container installs capture rules in the pod's network namespace, and
/// the app's outbound and inbound TCP then go through the sidecar.
#[tokio::test]
async fn a_hand_made_sidecar_captures_a_pods_traffic() {
    let Some((c, client)) = node_cluster().await else { return };
    let ns = c.namespace("node-sidecar").await.unwrap();
    let proxy_image = format!("docker.io/mycel/proxy:{}", mycel_e2e::images::mycel_version());
    apply(&c, &ns, &web_app(1)).await;
    let manifest = format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: sidecar}}
data:
  proxy.yaml: |
    admin: 0.0.0.0:15020
    listeners:
    - {{name: outbound, address: '0.0.0.0:15001', protocol: tcp, originalDestination: true}}
    - {{name: inbound, address: '0.0.0.0:15006', protocol: tcp, originalDestination: true, direction: inbound}}
---
apiVersion: v1
kind: Pod
metadata: {{name: meshed, labels: {{app: meshed}}}}
spec:
  initContainers:
  - name: mycel-init
    image: {proxy_image}
    args: [init]
    securityContext: {{runAsUser: 0, capabilities: {{add: [NET_ADMIN, NET_RAW]}}}}
  - name: mycel-proxy
    image: {proxy_image}
    restartPolicy: Always
    args: [run, --config, /etc/mycel/proxy.yaml]
    securityContext: {{runAsUser: 1337, runAsGroup: 1337}}
    readinessProbe: {{httpGet: {{path: /healthz/ready, port: 15020}}, periodSeconds: 1}}
    volumeMounts: [{{name: config, mountPath: /etc/mycel}}]
  containers:
  - name: app
    image: {TESTAPP_IMAGE}
    args: [http-echo, --port, "8080"]
  volumes: [{{name: config, configMap: {{name: sidecar}}}}]
"#
    );
    apply(&c, &ns, &manifest).await;
    c.kubectl_run(&["wait", "-n", &ns.name, "--for=condition=Ready", "--timeout=120s", "pod/meshed"], None)
        .unwrap();
    c.kubectl_run(
        &["wait", "-n", &ns.name, "--for=condition=Available", "--timeout=120s", "deployment/web"],
        None,
    )
    .unwrap();
    let init_log = c.kubectl_run(&["logs", "-n", &ns.name, "meshed", "-c", "mycel-init"], None).unwrap();
    assert!(init_log.contains("traffic capture installed"), "{init_log}");

    let exec = |args: &[&str]| {
        let mut full = vec!["exec", "-n", ns.name.as_str(), "meshed", "-c", "app", "--", "mycel-testapp"];
        full.extend(args);
        c.kubectl_run(&full, None)
    };
    let connections = |listener: &str| {
        let metrics = exec(&["get", "http://127.0.0.1:15020/metrics"]).unwrap();
        metrics
            .lines()
            .find(|l| {
                l.starts_with("mycel_proxy_connections_total{")
                    && l.contains(&format!("listener=\"{listener}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Outbound: the app calls a Service by name; the sidecar carries the connection.
    let before = connections("outbound");
    let url = format!("http://web.{}/", ns.name);
    let body = eventually("the app reaches the Service", Duration::from_secs(30), || async {
        exec(&["get", &url]).map_err(|e| e.to_string())
    })
    .await;
    assert!(body.starts_with("web-"), "{body}");
    assert!(connections("outbound") > before, "the app's outbound connection went through the sidecar");

    // Inbound: another pod calls the meshed pod; the app sees the sidecar (loopback) as its peer.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let ip = pods.get("meshed").await.unwrap().status.and_then(|s| s.pod_ip).unwrap();
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "caller"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": TESTAPP_IMAGE, "args": ["get", format!("http://{ip}:8080/")]}]}}}
    }))
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    c.kubectl_run(&["wait", "-n", &ns.name, "--for=condition=Complete", "--timeout=60s", "job/caller"], None)
        .unwrap();
    let answer = c.kubectl_run(&["logs", "-n", &ns.name, "job/caller"], None).unwrap();
    assert!(answer.contains(r#""peer":"127.0.0.1:"#), "the app was called through the sidecar: {answer}");
    assert!(connections("inbound") >= 1);
    ns.delete().await.unwrap();
}

/// The gRPC and WebSocket test apps serve and call each other across pods through a Service.
#[tokio::test]
async fn grpc_and_websocket_test_apps_talk_across_pods() {
    let Some((c, _client)) = node_cluster().await else { return };
    let ns = c.namespace("node-apps").await.unwrap();
    let manifest = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: servers, labels: {{app: servers}}}}
spec:
  containers:
  - {{name: grpc, image: {TESTAPP_IMAGE}, args: [grpc-echo, --port, "9090"]}}
  - {{name: ws, image: {TESTAPP_IMAGE}, args: [ws-echo, --port, "8081"]}}
---
apiVersion: v1
kind: Service
metadata: {{name: servers}}
spec:
  selector: {{app: servers}}
  ports: [{{name: grpc, port: 9090}}, {{name: ws, port: 8081}}]
"#
    );
    apply(&c, &ns, &manifest).await;
    c.kubectl_run(&["wait", "-n", &ns.name, "--for=condition=Ready", "--timeout=60s", "pod/servers"], None)
        .unwrap();
    for (job, args) in [
        ("grpc", vec!["grpc-check", "http://servers:9090", "--count", "3"]),
        ("ws", vec!["ws-send", "ws://servers:8081/", "hello", "mesh"]),
    ] {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let manifest = serde_json::json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job},
            "spec": {"backoffLimit": 2, "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": job, "image": TESTAPP_IMAGE, "args": args}]}}}
        });
        apply(&c, &ns, &manifest.to_string()).await;
    }
    for job in ["grpc", "ws"] {
        c.kubectl_run(
            &["wait", "-n", &ns.name, "--for=condition=Complete", "--timeout=90s", &format!("job/{job}")],
            None,
        )
        .unwrap();
    }
    let grpc = c.kubectl_run(&["logs", "-n", &ns.name, "job/grpc"], None).unwrap();
    assert_eq!(grpc.lines().filter(|l| *l == "Serving").count(), 3, "{grpc}");
    let ws = c.kubectl_run(&["logs", "-n", &ns.name, "job/ws"], None).unwrap();
    assert_eq!(ws.lines().collect::<Vec<_>>(), vec!["hello", "mesh"], "{ws}");
    ns.delete().await.unwrap();
}
