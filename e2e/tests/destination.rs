//! DestinationPolicy on the real node, each part seen from the client: subsets that a route's
//! backends pick (the pod that answered), consistent hashing (one user, one pod), circuit
//! breaking (overflow answered 503 `UO` at once while the admitted requests wait for the slow
//! backend), outlier detection (a failing pod stops getting requests, and gets them again after
//! its ejection time); and the policy's status. Skipped (with a message) when the cluster has no
//! real node.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use mycel_e2e::{
    TestCluster,
    mesh::{Installation, condition, echo, get, mycel_api, parse, run_job},
};

const POLICIES: &str = r#"
apiVersion: mycel.io/v1alpha1
kind: DestinationPolicy
metadata: {name: shop}
spec:
  host: shop
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: mycel.io/v1alpha1
kind: TrafficRoute
metadata: {name: shop}
spec:
  hosts: [shop]
  http:
  - name: canary
    match: [{headers: [{name: x-canary, exact: "yes"}]}]
    backends: [{service: shop, subset: v2}]
  - name: next
    match: [{path: {prefix: /next}}]
    backends: [{service: shop, subset: v3}]
  - name: stable
    backends: [{service: shop, subset: v1}]
---
apiVersion: mycel.io/v1alpha1
kind: DestinationPolicy
metadata: {name: sticky}
spec:
  host: sticky
  loadBalancer: {algorithm: ConsistentHash, consistentHash: {header: x-user}}
---
apiVersion: v1
kind: Service
metadata: {name: jar}
spec:
  selector: {app: sticky}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: mycel.io/v1alpha1
kind: DestinationPolicy
metadata: {name: jar}
spec:
  host: jar
  loadBalancer:
    algorithm: ConsistentHash
    consistentHash: {cookie: {name: mycel-session, path: /, ttl: 60s}}
---
apiVersion: mycel.io/v1alpha1
kind: DestinationPolicy
metadata: {name: slow}
spec:
  host: slow
  connectionPool: {http: {maxRequests: 2}, tcp: {connectTimeout: 2s}}
---
apiVersion: mycel.io/v1alpha1
kind: DestinationPolicy
metadata: {name: flaky}
spec:
  host: flaky
  loadBalancer: {algorithm: RoundRobin}
  outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 8s, maxEjectionPercent: 50}
"#;

/// The pods of Deployment-label `app` in `ns`, by name.
async fn pods(client: &kube::Client, ns: &str, app: &str) -> Vec<String> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let l = api.list(&ListParams::default().labels(&format!("app={app}"))).await.unwrap();
    let mut names: Vec<String> = l.items.into_iter().filter_map(|p| p.metadata.name).collect();
    names.sort();
    names
}

#[tokio::test]
async fn destination_policies_shape_how_clients_reach_a_service() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    let mesh = Installation::start(&c, "destination").await;
    let client = mesh.client.clone();
    let n = mesh.app.name.clone();
    let apps = [
        echo("shop-v1", "shop", "v1", 1),
        echo("shop-v2", "shop", "v2", 1),
        echo("sticky", "sticky", "v1", 3),
        echo("slow", "slow", "v1", 1),
        echo("flaky", "flaky", "v1", 2),
    ];
    mesh.apply(&c, &apps.join("---\n"));
    for (d, r) in [("shop-v1", 1), ("shop-v2", 1), ("sticky", 3), ("slow", 1), ("flaky", 2)] {
        mesh.available(d, r).await;
    }
    mesh.apply(&c, POLICIES);
    let dps = mycel_api(&client, &n, "DestinationPolicy", "destinationpolicies");
    let trs = mycel_api(&client, &n, "TrafficRoute", "trafficroutes");
    for name in ["shop", "sticky", "jar", "slow", "flaky"] {
        condition(&dps, name, "Accepted", "True").await;
        condition(&dps, name, "ResolvedRefs", "True").await;
        condition(&dps, name, "Ready", "True").await;
    }
    // Subset v3 is defined but no pod carries its labels: the route says so, and sends there.
    let refs = condition(&trs, "shop", "ResolvedRefs", "False").await;
    assert!(refs["message"].as_str().unwrap_or("").contains("subset v3"), "{refs}");
    condition(&trs, "shop", "Ready", "True").await;

    // Subsets: the Service spans both versions; each rule's subset alone answers.
    let args = get(&["http://shop/", "http://shop/next"], 20, &[]);
    let canary = get(&["http://shop/"], 20, &["x-canary:yes"]);
    let (ok, log) = run_job(&client, &n, "subsets", "default", true, &args).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 40, "{log}");
    for s in &seen {
        if s.url.ends_with("/next") {
            assert_eq!(s.status, 503, "subset v3 has no endpoint: {log}");
            assert_eq!(s.header("x-mycel-error"), "UH no_healthy_upstream", "{log}");
        } else {
            assert_eq!(s.status, 200, "{log}");
            assert!(s.pod().starts_with("shop-v1-"), "the stable subset answered: {log}");
        }
    }
    let (ok, log) = run_job(&client, &n, "canary", "default", true, &canary).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 20, "{log}");
    assert!(seen.iter().all(|s| s.status == 200 && s.pod().starts_with("shop-v2-")), "{log}");

    // Consistent hashing: 30 users, 4 requests each; each user's requests land on one pod,
    // and the users spread over more than one.
    let sticky = get(&["http://sticky/"; 4], 30, &["x-user:user-{i}"]);
    let (ok, log) = run_job(&client, &n, "sticky", "default", true, &sticky).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 120, "{log}");
    let mut by_user: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (k, s) in seen.iter().enumerate() {
        assert_eq!(s.status, 200, "{log}");
        by_user.entry(k / 4).or_default().push(s.pod());
    }
    for (user, pods) in &by_user {
        assert!(pods.iter().all(|p| *p == pods[0]), "user-{user} was answered by {pods:?}");
    }
    let used: std::collections::BTreeSet<&str> = by_user.values().map(|p| p[0]).collect();
    assert!(used.len() > 1, "30 users all on {used:?}");

    // Hashing on a cookie: a request without it gets one set, the users spread; a client that
    // sends it back always lands where its first request did.
    let (ok, log) =
        run_job(&client, &n, "cookie-less", "default", true, &get(&["http://jar/"], 20, &[])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 20, "{log}");
    for s in &seen {
        let set = s.header("set-cookie");
        assert!(
            set.starts_with("mycel-session=") && set.ends_with("; Path=/; Max-Age=60; HttpOnly"),
            "{log}"
        );
    }
    let spread: std::collections::BTreeSet<&str> = seen.iter().map(|s| s.pod()).collect();
    assert!(spread.len() > 1, "20 new sessions all on {spread:?}");
    let cookie = seen[0].header("set-cookie").split(';').next().unwrap().to_string();
    let first_pod = seen[0].pod().to_string();
    let again = get(&["http://jar/"], 20, &[&format!("cookie:{cookie}")]);
    let (ok, log) = run_job(&client, &n, "cookie", "default", true, &again).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 20, "{log}");
    assert!(
        seen.iter().all(|s| s.pod() == first_pod && s.header("set-cookie").is_empty()),
        "{first_pod}: {log}"
    );

    // Circuit breaking: 8 requests at once to a backend taking 5 s, 2 allowed in flight. The
    // admitted ones wait for it; the overflow is refused at once with 503 UO.
    let mut burst = get(&["http://slow/?sleep_ms=5000"], 1, &[]);
    burst.extend(["--concurrency".to_string(), "8".to_string()]);
    let (ok, log) = run_job(&client, &n, "burst", "default", true, &burst).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 8, "{log}");
    let admitted: Vec<_> = seen.iter().filter(|s| s.status == 200).collect();
    let refused: Vec<_> = seen.iter().filter(|s| s.status == 503).collect();
    assert_eq!(admitted.len() + refused.len(), 8, "{log}");
    assert!((1..=2).contains(&admitted.len()), "at most 2 in flight: {log}");
    assert!(admitted.iter().all(|s| s.elapsed >= Duration::from_millis(5000)), "{log}");
    for s in &refused {
        assert_eq!(s.header("x-mycel-error"), "UO upstream_overflow", "{log}");
        assert!(s.elapsed < Duration::from_millis(2500), "refused without waiting for the backend: {log}");
    }

    // Outlier detection: one of two pods answers 503 for the first 16 rounds (4 s), then
    // recovers. Round robin sends it every other request until its third error in a row ejects
    // it; then only the other answers, until 8 s later (ended on a 1 s sweep) it is back.
    let flaky = pods(&client, &n, "flaky").await;
    assert_eq!(flaky.len(), 2);
    let bad = flaky[0].as_str();
    let url = format!("http://flaky/?fail_pod={bad}&fail_below=16&n={{i}}");
    let mut watch = get(&[&url], 80, &[]);
    watch.extend(["--interval-ms".to_string(), "250".to_string()]);
    let (ok, log) = run_job(&client, &n, "outlier", "default", true, &watch).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), 80, "{log}");
    let failed: Vec<_> = seen.iter().filter(|s| s.status != 200).collect();
    assert_eq!(failed.len(), 3, "three errors in a row eject the pod, no more reach the client: {log}");
    assert!(failed.iter().all(|s| s.status == 503 && s.pod().is_empty()), "{log}");
    let ejected_at = failed[2].at_ms;
    let back: Vec<_> = seen.iter().filter(|s| s.at_ms > ejected_at && s.pod() == bad).collect();
    assert!(!back.is_empty(), "the ejected pod never came back: {log}");
    let early = 8000u64 - 200;
    assert!(
        back[0].at_ms >= ejected_at + early,
        "back {} ms after its ejection, 8000 ms asked",
        back[0].at_ms - ejected_at
    );
    let meanwhile = seen.iter().filter(|s| s.at_ms > ejected_at && s.at_ms < back[0].at_ms);
    assert!(meanwhile.clone().count() >= 10, "{log}");
    assert!(meanwhile.into_iter().all(|s| s.status == 200 && s.pod() == flaky[1]), "{log}");

    // A second policy for a host loses to the older one, and says which.
    let dup: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "mycel.io/v1alpha1", "kind": "DestinationPolicy", "metadata": {"name": "slow-2"},
        "spec": {"host": "slow", "loadBalancer": {"algorithm": "Random"}}
    }))
    .unwrap();
    dps.create(&Default::default(), &dup).await.unwrap();
    let lost = condition(&dps, "slow-2", "Accepted", "False").await;
    assert_eq!(lost["reason"], "Conflicted", "{lost}");
    assert!(
        lost["message"].as_str().unwrap_or("").contains(&format!("DestinationPolicy {n}/slow")),
        "{lost}"
    );
    mesh.finish().await;
}
