//! Gateway API mesh routes (GAMMA) on the real node: an HTTPRoute attached to a Service steers
//! what meshed clients send to it, with the Gateway API's matching (element-wise path prefixes,
//! an exact path first) and filters (header edits, prefix and full-path rewrites, a redirect);
//! its status reports Mycel's parent entry (Accepted, ResolvedRefs, Ready once every proxy
//! acknowledged it); a second HTTPRoute for the Service is merged; a TrafficRoute for the same Service, newer, loses and names it; a route
//! attached to a Gateway only is left alone. Skipped (with a message) without a real node.

use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind},
};
use mycel_e2e::{
    TestCluster, eventually,
    images::TESTAPP_IMAGE,
    mesh::{Installation, condition, echo, get, mycel_api, parse, run_job},
};
use serde_json::Value;
use std::time::Duration;

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: gamma}], remove: [x-secret]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: gamma}]}
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /v2/moved}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}}}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]
    backendRefs: [{name: web, port: 80}]
"#;

/// A second route for the same Service: merged with the first.
const EXTRA: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-extra}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: Exact, value: /extra}}]
    backendRefs: [{name: web-v2, port: 80}]
"#;

/// A gRPC server (the standard health service) and a GRPCRoute that routes only `method`.
fn grpc(method: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: grpc}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: grpc}}}}
  template:
    metadata: {{labels: {{app: grpc}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: grpc
        image: {TESTAPP_IMAGE}
        args: ["grpc-echo", "--port", "9090"]
        ports: [{{name: grpc, containerPort: 9090}}]
        readinessProbe: {{tcpSocket: {{port: grpc}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: grpc}}
spec:
  selector: {{app: grpc}}
  ports: [{{name: grpc, port: 9090, targetPort: 9090}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: grpc}}
spec:
  parentRefs: [{{group: "", kind: Service, name: grpc, port: 9090}}]
  rules:
  - matches: [{{method: {{service: grpc.health.v1.Health, method: {method}}}}}]
    backendRefs: [{{name: grpc, port: 9090}}]
"#
    )
}

const GATEWAY_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: for-a-gateway}
spec:
  parentRefs: [{name: some-gateway}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"#;

const LATE: &str = r#"
apiVersion: mycel.io/v1alpha1
kind: TrafficRoute
metadata: {name: late}
spec:
  hosts: [web]
  http: [{backends: [{service: web-v2}]}]
"#;

/// Mycel's entry in an HTTPRoute's `status.parents`, once its conditions are for the current
/// generation and Ready is True.
async fn parent_entry(api: &Api<DynamicObject>, name: &str) -> Value {
    eventually(&format!("route {name} has Mycel's parent status"), Duration::from_secs(60), || async {
        let o = api.get(name).await.map_err(|e| e.to_string())?;
        let entry = o.data["status"]["parents"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["controllerName"] == "mycel.io/mesh"))
            .cloned()
            .ok_or_else(|| format!("no entry yet: {}", o.data["status"]))?;
        let cond = |t: &str| {
            entry["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == t))
                .cloned()
                .unwrap_or_default()
        };
        let current = ["Accepted", "ResolvedRefs", "Ready"]
            .iter()
            .all(|t| cond(t)["observedGeneration"].as_i64() == o.metadata.generation);
        if current && cond("Ready")["status"] == "True" { Ok(entry) } else { Err(entry.to_string()) }
    })
    .await
}

#[tokio::test]
async fn an_httproute_attached_to_a_service_steers_its_clients() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    let mesh = Installation::start(&c, "gamma").await;
    let client = mesh.client.clone();
    let n = mesh.app.name.clone();
    mesh.apply(&c, &format!("{}---\n{}", echo("web", "web", "v1", 1), echo("web-v2", "web-v2", "v2", 1)));
    mesh.available("web", 1).await;
    mesh.available("web-v2", 1).await;
    mesh.apply(&c, &format!("{ROUTE}---\n{EXTRA}---\n{GATEWAY_ROUTE}"));
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    );
    let routes: Api<DynamicObject> = Api::namespaced_with(client.clone(), &n, &ar);
    let entry = parent_entry(&routes, "web").await;
    parent_entry(&routes, "web-extra").await;
    assert_eq!(entry["parentRef"]["name"], "web", "{entry}");
    assert_eq!(entry["parentRef"]["kind"], "Service", "{entry}");
    for t in ["Accepted", "ResolvedRefs"] {
        let c = entry["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap();
        assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("True"), Some(t)), "{entry}");
    }

    let urls = [
        "http://web/v2/items?id=3",
        "http://web/v2x",
        "http://web/v2/moved",
        "http://web/full/a?q=1",
        "http://web/other",
        "http://web/extra",
    ];
    let (ok, log) = run_job(&client, &n, "gamma", "default", true, &get(&urls, 1, &["x-secret:1"])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    let by = |url: &str| seen.iter().find(|s| s.url == url).unwrap_or_else(|| panic!("no {url} in:\n{log}"));
    let v2 = by("http://web/v2/items?id=3");
    assert!(v2.pod().starts_with("web-v2-"), "PathPrefix /v2 goes to web-v2: {log}");
    assert_eq!(v2.body["path"], "/items?id=3", "the prefix is replaced by /: {log}");
    assert_eq!(v2.body["headers"]["x-route"], "gamma", "{log}");
    assert!(v2.body["headers"].get("x-secret").is_none(), "removed: {log}");
    assert_eq!(v2.header("x-served-by"), "gamma", "{log}");
    let v2x = by("http://web/v2x");
    assert!(
        v2x.pod().starts_with("web-") && !v2x.pod().starts_with("web-v2-"),
        "/v2x is not under the prefix /v2 (whole path elements): {log}"
    );
    assert_eq!(v2x.body["path"], "/v2x", "{log}");
    let moved = by("http://web/v2/moved");
    assert_eq!(moved.status, 302, "the exact match ranks before the prefix, and 302 is the default: {log}");
    assert_eq!(moved.header("location"), "http://web/new", "{log}");
    let full = by("http://web/full/a?q=1");
    assert_eq!(full.body["path"], "/replaced?q=1", "the whole path is replaced, the query kept: {log}");
    let other = by("http://web/other");
    assert!(
        other.pod().starts_with("web-") && !other.pod().starts_with("web-v2-"),
        "the default rule: {log}"
    );
    assert!(by("http://web/extra").pod().starts_with("web-v2-"), "the second route's rule, merged: {log}");

    // A newer TrafficRoute for the same Service loses to the HTTPRoute and names it.
    mesh.apply(&c, LATE);
    let trs = mycel_api(&client, &n, "TrafficRoute", "trafficroutes");
    let lost = condition(&trs, "late", "Accepted", "False").await;
    assert_eq!(lost["reason"], "Conflicted", "{lost}");
    assert!(lost["message"].as_str().unwrap_or("").contains(&format!("HTTPRoute {n}/web")), "{lost}");
    // By now the control plane has seen the Gateway's route too: it writes nothing there.
    let gw = routes.get("for-a-gateway").await.unwrap();
    let ours = gw.data["status"]["parents"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["controllerName"] == "mycel.io/mesh"));
    assert!(!ours, "a route of a Gateway is not the mesh's: {}", gw.data["status"]);
    // A route that no longer names the Service loses Mycel's status entry.
    mesh.apply(&c, &EXTRA.replace(r#"{group: "", kind: Service, name: web}"#, "{name: some-gateway}"));
    eventually("web-extra loses Mycel's entry", Duration::from_secs(60), || async {
        let o = routes.get("web-extra").await.map_err(|e| e.to_string())?;
        let ours = o.data["status"]["parents"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["controllerName"] == "mycel.io/mesh"));
        if ours { Err(o.data["status"].to_string()) } else { Ok(()) }
    })
    .await;

    // A GRPCRoute by method: Check routed is answered; routing only Watch, Check gets no route
    // (its sidecar answers UNIMPLEMENTED, as gRPC maps the 404 of no route).
    mesh.apply(&c, &grpc("Check"));
    mesh.available("grpc", 1).await;
    let grpc_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "GRPCRoute"),
        "grpcroutes",
    );
    let grpc_routes: Api<DynamicObject> = Api::namespaced_with(client.clone(), &n, &grpc_ar);
    parent_entry(&grpc_routes, "grpc").await;
    let check: Vec<String> = ["grpc-check", "--report", "--count", "3", "http://grpc:9090"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (ok, log) = run_job(&client, &n, "grpc-check", "default", true, &check).await;
    assert!(ok, "{log}");
    assert_eq!(log.lines().filter(|l| *l == "Serving").count(), 3, "{log}");
    mesh.apply(&c, &grpc("Watch"));
    parent_entry(&grpc_routes, "grpc").await;
    let (ok, log) = run_job(&client, &n, "grpc-unrouted", "default", true, &check).await;
    assert!(ok, "{log}");
    assert_eq!(log.lines().filter(|l| *l == "code: Unimplemented").count(), 3, "{log}");
    mesh.finish().await;
}
