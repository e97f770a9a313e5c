//! Traffic management on the real node: a TrafficRoute steers what a meshed client sends, seen
//! from the client (statuses, the pod that answered, response headers) and from the echo server
//! (the path and headers it received); and its status tells the truth (Ready once every proxy
//! acknowledged it, a conflict and a missing backend named). Skipped (with a message) when the
//! cluster has no real node.

use std::time::Duration;

use kube::api::PostParams;
use mycel_e2e::{
    TestCluster, eventually,
    images::TESTAPP_IMAGE,
    mesh::{Installation, Seen, condition, echo, get, mycel_api, parse, run_job},
};
use serde_json::json;

/// A server that never answers (but its readiness probe), logging each request it got.
const HANG: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: hang}
spec:
  replicas: 1
  selector: {matchLabels: {app: hang}}
  template:
    metadata: {labels: {app: hang}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: echo
        image: mycel-testapp:dev
        args: ["http-echo", "--port", "8080", "--hang"]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: hang}
spec:
  selector: {app: hang}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

/// A gRPC server (the standard health service), and a route for it by method.
const GRPC: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: grpc}
spec:
  replicas: 1
  selector: {matchLabels: {app: grpc}}
  template:
    metadata: {labels: {app: grpc}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: grpc
        image: mycel-testapp:dev
        args: ["grpc-echo", "--port", "9090"]
        ports: [{name: grpc, containerPort: 9090}]
        readinessProbe: {tcpSocket: {port: grpc}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: grpc}
spec:
  selector: {app: grpc}
  ports: [{name: grpc, port: 9090, targetPort: 9090}]
---
apiVersion: mycel.io/v1alpha1
kind: TrafficRoute
metadata: {name: grpc}
spec:
  hosts: [grpc]
  http:
  - name: denied
    match: [{path: {exact: /grpc.health.v1.Health/Check}, headers: [{name: x-deny, exact: "1"}]}]
    fault: {abort: {percent: 100, grpcStatus: 7}}
    backends: [{service: grpc}]
  - name: check
    match: [{path: {exact: /grpc.health.v1.Health/Check}}]
    backends: [{service: grpc}]
"#;

/// A TCP server that greets with its pod's name, as Deployment `db-<version>` (label `tier: db`).
fn greeter(version: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: db-{version}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: db-{version}}}}}
  template:
    metadata: {{labels: {{app: db-{version}, tier: db}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: db
        image: {TESTAPP_IMAGE}
        args: ["tcp-echo", "--port", "9000", "--greet"]
        env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
        ports: [{{name: tcp, containerPort: 9000}}]
        readinessProbe: {{tcpSocket: {{port: tcp}}, periodSeconds: 1}}
"#
    )
}

/// A Service for each greeter and one in front of both, and a route splitting the front one's
/// connections 80/20, closed after 1 s idle.
const TCP: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  selector: {tier: db}
  ports: [{name: tcp, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: db-v1}
spec:
  selector: {app: db-v1}
  ports: [{name: tcp, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: db-v2}
spec:
  selector: {app: db-v2}
  ports: [{name: tcp, port: 9000, targetPort: 9000}]
---
apiVersion: mycel.io/v1alpha1
kind: TrafficRoute
metadata: {name: db}
spec:
  hosts: [db]
  tcp:
  - port: 9000
    idleTimeout: 1s
    backends: [{service: db-v1, weight: 80}, {service: db-v2, weight: 20}]
"#;

const ROUTE: &str = r#"
apiVersion: mycel.io/v1alpha1
kind: TrafficRoute
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - name: canary
    match: [{headers: [{name: x-canary, exact: "yes"}]}]
    backends: [{service: web-v2}]
    headers:
      request: {set: {x-route: canary}, remove: [x-secret]}
      response: {add: {x-served-by-rule: canary}}
  - name: api
    match: [{path: {prefix: /api}}]
    rewrite: {uriPrefix: /v1, authority: web-api.example}
    backends: [{service: web}]
  - name: split
    match: [{path: {exact: /split}}]
    backends: [{service: web, weight: 90}, {service: web-v2, weight: 10}]
  - name: slow
    match: [{path: {prefix: /slow}}]
    timeout: 300ms
    backends: [{service: web}]
  - name: fault
    match: [{path: {prefix: /fault}}]
    fault: {abort: {percent: 50, httpStatus: 418}}
    backends: [{service: web}]
  - name: delayed
    match: [{path: {prefix: /delayed}}]
    fault: {delay: {percent: 100, fixedDelay: 700ms}}
    backends: [{service: web}]
  - name: flaky
    match: [{path: {prefix: /flaky}}]
    retries: {attempts: 5, retryOn: [5xx]}
    backends: [{service: web}]
  - name: broken
    match: [{path: {prefix: /broken}}]
    retries: {attempts: 3, retryOn: [gateway-error]}
    backends: [{service: web}]
  - name: mirrored
    match: [{path: {prefix: /mirrored}}]
    mirror: {service: hang}
    backends: [{service: web}]
  - name: half-mirrored
    match: [{path: {prefix: /half}}]
    mirror: {service: hang, port: 80, percent: 50}
    backends: [{service: web}]
  - name: moved
    match: [{path: {prefix: /old}}]
    redirect: {prefix: /new, code: 302}
  - name: gone
    match: [{path: {exact: /gone}}]
    directResponse: {status: 410, body: gone for good}
  - name: home
    match: [{path: {prefix: /home}, method: GET}, {queryParams: [{name: go, exact: "1"}]}]
    backends: [{service: web}]
"#;

#[tokio::test]
async fn traffic_routes_steer_what_clients_send() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    let mesh = Installation::start(&c, "traffic").await;
    let client = mesh.client.clone();
    let n = mesh.app.name.clone();
    mesh.apply(&c, &format!("{}---\n{}", echo("web", "web", "v1", 1), echo("web-v2", "web-v2", "v2", 1)));
    mesh.available("web", 1).await;
    mesh.available("web-v2", 1).await;
    mesh.apply(&c, &HANG.replace("mycel-testapp:dev", TESTAPP_IMAGE));
    mesh.available("hang", 1).await;
    mesh.apply(&c, &GRPC.replace("mycel-testapp:dev", TESTAPP_IMAGE));
    mesh.available("grpc", 1).await;
    mesh.apply(&c, &format!("{}---\n{}{TCP}", greeter("v1"), greeter("v2")));
    mesh.available("db-v1", 1).await;
    mesh.available("db-v2", 1).await;
    mesh.apply(&c, ROUTE);
    let trs = mycel_api(&client, &n, "TrafficRoute", "trafficroutes");
    condition(&trs, "web", "Accepted", "True").await;
    condition(&trs, "web", "ResolvedRefs", "True").await;
    let ready = condition(&trs, "web", "Ready", "True").await;
    assert!(ready["message"].as_str().unwrap_or("").starts_with("in effect"), "{ready}");

    // Matches, rewrites, a timeout, no match: one client, each URL once.
    let urls = [
        "http://web/api/items",
        "http://web/slow?sleep_ms=3000",
        "http://web/home",
        "http://web/other",
        "http://web/other?go=1",
        "http://web/delayed",
        "http://web/old/items?page=2",
        "http://web/gone",
    ];
    let (ok, log) = run_job(&client, &n, "plain-rules", "default", true, &get(&urls, 1, &[])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    let by = |url: &str| seen.iter().find(|s| s.url == url).unwrap_or_else(|| panic!("no {url} in:\n{log}"));
    let api = by("http://web/api/items");
    assert_eq!(api.status, 200, "{log}");
    assert_eq!(api.body["path"], "/v1/items", "the prefix is rewritten: {log}");
    assert_eq!(api.body["headers"]["host"], "web-api.example", "the authority is rewritten: {log}");
    assert!(api.pod().starts_with("web-") && !api.pod().starts_with("web-v2-"), "{log}");
    let slow = by("http://web/slow?sleep_ms=3000");
    assert_eq!(slow.status, 504, "a backend slower than the timeout: {log}");
    assert_eq!(slow.header("x-mycel-error"), "UT request_timeout", "{log}");
    assert_eq!(by("http://web/home").status, 200);
    let other = by("http://web/other");
    assert_eq!(other.status, 404, "no rule matches: {log}");
    assert_eq!(other.header("x-mycel-error"), "NR no_route_matched", "{log}");
    assert_eq!(by("http://web/other?go=1").status, 200, "a query parameter match: {log}");
    let moved = by("http://web/old/items?page=2");
    assert_eq!(moved.status, 302, "{log}");
    assert_eq!(moved.header("location"), "http://web/new/items?page=2", "{log}");
    assert_eq!(moved.header("x-mycel-error"), "", "a redirect is not an error: {log}");
    let gone = by("http://web/gone");
    assert_eq!((gone.status, gone.body.as_str()), (410, Some("gone for good")), "{log}");
    let delayed = by("http://web/delayed");
    assert_eq!(delayed.status, 200, "{log}");
    assert!(delayed.elapsed >= Duration::from_millis(700), "a fixed delay of 700ms: {:?}", delayed.elapsed);

    // Mirroring to a server that never answers: every original completes at once, and the
    // mirror receives its copies (all of one rule's, about half of the other's), host -shadow.
    let mut urls = vec!["http://web/mirrored"];
    // 20 + about 30 copies (at most 44 of 60 but once in 10 000): within the 64 a sidecar keeps
    // in flight to one mirror, beyond which copies are dropped.
    urls.extend(["http://web/half"; 3]);
    let (ok, log) = run_job(&client, &n, "mirror", "default", true, &get(&urls, 20, &[])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 80, "{log}");
    for s in &seen {
        assert_eq!(s.status, 200, "{log}");
        assert!(s.elapsed < Duration::from_secs(3), "an original waited for its mirror: {:?}", s.elapsed);
    }
    let hang_pod = {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), &n);
        let l = pods.list(&kube::api::ListParams::default().labels("app=hang")).await.unwrap();
        l.items[0].metadata.name.clone().unwrap()
    };
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), &n);
    let lp = kube::api::LogParams { container: Some("echo".into()), ..Default::default() };
    let counts = eventually("the mirror got every copy of /mirrored", Duration::from_secs(30), || async {
        let log = pods.logs(&hang_pod, &lp).await.map_err(|e| e.to_string())?;
        let all = log.lines().filter(|l| l.starts_with("got GET /mirrored ")).count();
        let shadowed = log.lines().filter(|l| l.starts_with("got GET /mirrored host=web-shadow")).count();
        let half = log.lines().filter(|l| l.starts_with("got GET /half ")).count();
        if all >= 20 { Ok((all, shadowed, half)) } else { Err(format!("{all} of 20 so far:\n{log}")) }
    })
    .await;
    assert_eq!(counts.0, 20, "each request copied once");
    assert_eq!(counts.1, 20, "the copies' host is web-shadow");
    assert!((15..=45).contains(&counts.2), "{} of 60 copied at 50 %", counts.2);

    // gRPC by method: Check is routed to the server; with x-deny it is aborted in trailers
    // with the code asked (7, PERMISSION_DENIED), before reaching it.
    condition(&trs, "grpc", "Ready", "True").await;
    let check = |deny: bool| {
        let mut a: Vec<String> = ["grpc-check", "--report", "--count", "3", "http://grpc:9090"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if deny {
            a.extend(["--header".to_string(), "x-deny:1".to_string()]);
        }
        a
    };
    let (ok, log) = run_job(&client, &n, "grpc-check", "default", true, &check(false)).await;
    assert!(ok, "{log}");
    assert_eq!(log.lines().filter(|l| *l == "Serving").count(), 3, "{log}");
    let (ok, log) = run_job(&client, &n, "grpc-denied", "default", true, &check(true)).await;
    assert!(ok, "{log}");
    assert_eq!(log.lines().filter(|l| *l == "code: PermissionDenied").count(), 3, "{log}");

    // TCP: 200 connections split 80/20 (each greeted by the pod it reached); an idle one is
    // closed after the rule's 1 s.
    condition(&trs, "db", "Ready", "True").await;
    let who: Vec<String> = ["tcp-who", "--count", "200", "db:9000"].iter().map(|s| s.to_string()).collect();
    let (ok, log) = run_job(&client, &n, "tcp-split", "default", true, &who).await;
    assert!(ok, "{log}");
    let pods: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["pod"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(pods.len(), 200, "{log}");
    let v2 = pods.iter().filter(|p| p.starts_with("db-v2-")).count();
    let v1 = pods.iter().filter(|p| p.starts_with("db-v1-")).count();
    assert_eq!(v1 + v2, 200, "every connection reached one of them: {log}");
    assert!((20..=60).contains(&v2), "db-v2 took {v2} of 200 connections (20 % asked, ±3.5σ)");
    let idle: Vec<String> = ["tcp-who", "--count", "2", "--wait-close-ms", "8000", "db:9000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (ok, log) = run_job(&client, &n, "tcp-idle", "default", true, &idle).await;
    assert!(ok, "{log}");
    for l in log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        let after = l["closed_after_ms"].as_u64().unwrap_or_else(|| panic!("not closed within 8 s: {log}"));
        assert!((900..6000).contains(&after), "closed {after} ms after going idle, 1000 ms asked: {log}");
    }

    // A header match goes to the canary, with the request and response headers edited.
    let canary = get(&["http://web/home"], 5, &["x-canary:yes", "x-secret:s3cret"]);
    let (ok, log) = run_job(&client, &n, "canary", "default", true, &canary).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 5, "{log}");
    for s in &seen {
        assert!(s.pod().starts_with("web-v2-"), "the canary answered: {log}");
        assert_eq!(s.body["headers"]["x-route"], "canary", "{log}");
        assert!(s.body["headers"].get("x-secret").is_none(), "x-secret is removed: {log}");
        assert_eq!(s.header("x-served-by-rule"), "canary", "{log}");
    }

    // A 90/10 split, measured over 2000 requests; an abort at 50 %.
    let (ok, log) =
        run_job(&client, &n, "split", "default", true, &get(&["http://web/split"], 2000, &[])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 2000);
    let v2 = seen.iter().filter(|s| s.pod().starts_with("web-v2-")).count();
    let v1 = seen.iter().filter(|s| s.pod().starts_with("web-") && !s.pod().starts_with("web-v2-")).count();
    assert_eq!(v1 + v2, 2000, "every request answered by one of them");
    let share = v2 as f64 / 2000.0 * 100.0;
    assert!((8.0..=12.0).contains(&share), "web-v2 took {share:.1} % (90/10 ± 2 points)");
    let (ok, log) =
        run_job(&client, &n, "fault", "default", true, &get(&["http://web/fault"], 400, &[])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    let aborted =
        seen.iter().filter(|s| s.status == 418 && s.header("x-mycel-error") == "FI fault_injected").count();
    let passed = seen.iter().filter(|s| s.status == 200).count();
    assert_eq!(aborted + passed, 400, "{log}");
    let share = aborted as f64 / 4.0;
    assert!((40.0..=60.0).contains(&share), "{share:.1} % aborted, 50 % asked");

    // Retries: a backend failing 10 % of requests gives the client no error (with 5 retries a
    // request fails 1 time in a million, the budget permitting); one failing every
    // request sees the retry budget's fifth more, not three retries per request.
    let (ok, log) =
        run_job(&client, &n, "flaky", "default", true, &get(&["http://web/flaky?fail_pct=10"], 300, &[]))
            .await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    let failed: Vec<&Seen> = seen.iter().filter(|s| s.status != 200).collect();
    assert_eq!(seen.len(), 300, "{log}");
    assert!(failed.is_empty(), "{} of 300 failed: {:?}", failed.len(), failed.first().map(|s| &s.body));
    let web_pod = {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), &n);
        let l = pods.list(&kube::api::ListParams::default().labels("app=web")).await.unwrap();
        l.items[0].metadata.name.clone().unwrap()
    };
    let inbound = || {
        let (client, path) =
            (client.clone(), format!("/api/v1/namespaces/{n}/pods/{web_pod}:15020/proxy/metrics"));
        async move {
            let text = client.request_text(http::Request::get(path).body(Vec::new()).unwrap()).await.unwrap();
            text.lines()
                .filter(|l| l.starts_with("mycel_proxy_requests_total{direction=\"inbound\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        }
    };
    // What a sidecar holds, as `mycelctl proxy-config routes` prints it.
    let out = std::process::Command::new(mycel_e2e::process::workspace_binary("mycelctl").unwrap())
        .args(["proxy-config", "routes", &web_pod, "-n", &n])
        .env("KUBECONFIG", c.kubeconfig())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let canary = table.lines().find(|l| l.contains(" canary ")).unwrap_or_else(|| panic!("{table}"));
    assert!(canary.starts_with(&format!("web.{n}.svc.cluster.local:80 ")), "{table}");
    assert!(
        canary.contains("header x-canary exact yes")
            && canary.contains(&format!("web-v2.{n}.svc.cluster.local:80 (100)")),
        "{table}"
    );
    let before = inbound().await;
    let (ok, log) =
        run_job(&client, &n, "broken", "default", true, &get(&["http://web/broken?fail_pct=100"], 300, &[]))
            .await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert!(seen.len() == 300 && seen.iter().all(|s| s.status == 503), "{log}");
    let reached = inbound().await - before;
    assert!(
        (300.0..=300.0 * 1.5).contains(&reached),
        "the backend saw {reached} requests for 300 (3 attempts each would be 1200; the budget allows about 360)"
    );

    // A second route for the same host loses (it is newer) and says which one won; a backend
    // that does not exist is named, and its share gets 503.
    let dup = json!({"apiVersion": "mycel.io/v1alpha1", "kind": "TrafficRoute", "metadata": {"name": "web-dup"},
        "spec": {"hosts": ["web"], "http": [{"backends": [{"service": "web-v2"}]}]}});
    trs.create(&PostParams::default(), &serde_json::from_value(dup).unwrap()).await.unwrap();
    let lost = condition(&trs, "web-dup", "Accepted", "False").await;
    assert_eq!(lost["reason"], "Conflicted", "{lost}");
    assert!(lost["message"].as_str().unwrap_or("").contains(&format!("TrafficRoute {n}/web")), "{lost}");
    let missing = json!({"apiVersion": "mycel.io/v1alpha1", "kind": "TrafficRoute", "metadata": {"name": "to-nowhere"},
        "spec": {"hosts": ["web-v2"], "http": [{"backends": [{"service": "missing"}]}]}});
    trs.create(&PostParams::default(), &serde_json::from_value(missing).unwrap()).await.unwrap();
    let refs = condition(&trs, "to-nowhere", "ResolvedRefs", "False").await;
    assert_eq!(refs["reason"], "BackendNotFound", "{refs}");
    assert!(refs["message"].as_str().unwrap_or("").contains("no Service missing"), "{refs}");
    condition(&trs, "to-nowhere", "Ready", "True").await;
    let (ok, log) = run_job(
        &client,
        &n,
        "nowhere",
        "default",
        true,
        &get(&["http://web-v2/", "http://web/home"], 2, &[]),
    )
    .await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    for s in &seen {
        match s.url.as_str() {
            "http://web-v2/" => {
                assert_eq!(s.status, 503, "{log}");
                assert_eq!(s.header("x-mycel-error"), "NC no_cluster", "{log}");
            }
            _ => assert_eq!(s.status, 200, "the winner still routes web: {log}"),
        }
    }
    mesh.finish().await;
}
