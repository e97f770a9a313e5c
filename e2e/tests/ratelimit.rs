//! RateLimitPolicy's local limits on the real node, with real pods and their mesh identities:
//! a limit keyed by the caller's principal admits its rate per replica (measured over a steady
//! window of 20 s after the burst is spent, with the offered load measured and well above it),
//! an override lifts one caller's limit, a quiet caller under its limit is not touched by the
//! others; a per-header quota refuses with its status and the RateLimit headers; a shadow limit
//! refuses nothing and counts what it would have refused; gRPC gets RESOURCE_EXHAUSTED; the
//! policy is Ready once the selected sidecars hold it; an Outbound (direction) limit refuses, in
//! the sender's own sidecar, what a Job sends over it. Global limits (through the rate-limit
//! service and a Redis pod): 50/s in total over unequal clients and 2, then 3 replicas; keyed by
//! identity with an override; a daily quota that outlives restarts of the service and the
//! server (and `mycelctl quota` shows it spent); shadow; Redis scaled to zero gives Degraded,
//! Open admits, Closed refuses with 503, and Redis back makes it count again. Skipped (with a
//! message) without a real node.

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use mycel_e2e::{
    TestCluster,
    images::{REDIS_IMAGE, TESTAPP_IMAGE},
    mesh::{Installation, condition, echo, get, mycel_api, parse, run_job},
    port_forward_get,
};
use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Seconds each load runs; the steady window is [`FROM`, `FROM` + 20).
const SECONDS: u32 = 26;
const FROM: usize = 4;
const WINDOW: usize = 20;

fn policies(n: &str) -> String {
    format!(
        r#"apiVersion: mycel.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: web-limits}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  limits:
  - name: per-caller
    requests: 10
    unit: second
    burst: 20
    key: {{type: SourcePrincipal}}
    match: {{path: {{prefix: /limited}}}}
    overrides: [{{value: cluster.local/ns/{n}/sa/vip, requests: 25, burst: 40}}]
  - name: quota
    requests: 2
    unit: minute
    key: {{type: Header, header: x-api-key}}
    match: {{path: {{exact: /quota}}, method: GET}}
    status: 420
  - name: shadow
    requests: 1
    unit: minute
    shadow: true
    match: {{path: {{prefix: /shadow}}}}
---
apiVersion: mycel.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: grpc-limit}}
spec:
  selector: {{matchLabels: {{app: grpc}}}}
  limits: [{{name: grpc, requests: 1, unit: minute}}]
---
apiVersion: apps/v1
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
      - {{name: grpc, image: {TESTAPP_IMAGE}, args: ["grpc-echo", "--port", "9090"]}}
---
apiVersion: v1
kind: Service
metadata: {{name: grpc}}
spec:
  selector: {{app: grpc}}
  ports: [{{name: grpc, port: 9090}}]
"#
    )
}

/// A limit on what the pods of Job `egress` send to the Service `web` (direction Outbound).
const OUTBOUND: &str = r#"apiVersion: mycel.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: egress}
spec:
  selector: {matchLabels: {job-name: egress}}
  direction: Outbound
  limits:
  - {name: egress, requests: 3, unit: minute, hosts: [web, web.example]}
"#;

/// What one `load` run saw: its per-second lines, and the totals.
struct Load {
    seconds: Vec<Value>,
    total: Value,
    log: String,
}

impl Load {
    fn of(log: String) -> Load {
        let lines: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let total = lines.iter().find(|l| l["second"].is_null()).cloned().unwrap_or_default();
        let seconds = lines.into_iter().filter(|l| !l["second"].is_null()).collect();
        Load { seconds, total, log }
    }

    /// Per second over the steady window: (offered, admitted, admitted by each pod).
    fn steady(&self) -> (f64, f64, BTreeMap<String, f64>) {
        let window = self.seconds.iter().skip(FROM).take(WINDOW);
        let (mut sent, mut ok) = (0, 0);
        let mut pods = BTreeMap::new();
        for s in window {
            sent += s["sent"].as_u64().unwrap_or(0);
            ok += s["statuses"]["200"].as_u64().unwrap_or(0);
            for (pod, n) in s["pods"].as_object().into_iter().flatten() {
                *pods.entry(pod.clone()).or_default() += n.as_u64().unwrap_or(0) as f64 / WINDOW as f64;
            }
        }
        assert!(self.seconds.len() >= FROM + WINDOW, "a whole window: {}", self.log);
        (sent as f64 / WINDOW as f64, ok as f64 / WINDOW as f64, pods)
    }

    /// Responses that were neither 200 nor 429, and requests without a response.
    fn other(&self) -> u64 {
        let statuses = self.total["statuses"].as_object().cloned().unwrap_or_default();
        let odd: u64 = statuses
            .iter()
            .filter(|(k, _)| *k != "200" && *k != "429")
            .map(|(_, v)| v.as_u64().unwrap_or(0))
            .sum();
        odd + self.total["errors"].as_u64().unwrap_or(0) + self.total["skipped"].as_u64().unwrap_or(0)
    }
}

/// The tests that measure rates run one at a time (a 2-core machine: a loaded one would make a
/// global limit's decisions late, and its failure mode admit).
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn load(url: &str, rate: u32) -> Vec<String> {
    ["load", url, "--rate", &rate.to_string(), "--seconds", &SECONDS.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[tokio::test]
async fn local_rate_limits_admit_their_rate_per_caller_and_replica() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    let _measuring = MEASURING.lock().await;
    let mesh = Installation::start(&c, "ratelimit").await;
    let client = mesh.client.clone();
    let n = mesh.app.name.clone();
    service_accounts(&client, &n, &["vip", "quiet"]).await;
    mesh.apply(&c, &echo("web", "web", "v1", 2));
    mesh.apply(&c, &policies(&n));
    mesh.available("web", 2).await;
    mesh.available("grpc", 1).await;
    let rlps = mycel_api(&client, &n, "RateLimitPolicy", "ratelimitpolicies");
    let ready = condition(&rlps, "web-limits", "Ready", "True").await;
    assert!(ready["message"].as_str().unwrap_or("").contains("2 selected workload"), "{ready}");
    condition(&rlps, "grpc-limit", "Ready", "True").await;

    // Three callers at once: one far over its limit, one with an override, one under it. Each
    // replica counts each caller in its own bucket.
    let (h, v, q) =
        (load("http://web/limited", 100), load("http://web/limited", 150), load("http://web/limited", 4));
    let hammer = run_job(&client, &n, "hammer", "default", true, &h);
    let vip = run_job(&client, &n, "vip", "vip", true, &v);
    let quiet = run_job(&client, &n, "quiet", "quiet", true, &q);
    let ((ok_h, hammer), (ok_v, vip), (ok_q, quiet)) = tokio::join!(hammer, vip, quiet);
    assert!(ok_h && ok_v && ok_q, "{hammer}\n{vip}\n{quiet}");
    let (hammer, vip, quiet) = (Load::of(hammer), Load::of(vip), Load::of(quiet));
    let (offered, admitted, pods) = hammer.steady();
    println!(
        "per-caller limit (10/s per replica, 2 replicas): offered {offered:.1}/s, admitted {admitted:.2}/s {pods:?}"
    );
    assert!(offered >= 90.0, "the offered load is well above the limit: {}", hammer.log);
    assert_eq!(pods.len(), 2, "both replicas admit: {pods:?}");
    for (pod, n) in &pods {
        assert!((9.0..=11.0).contains(n), "10 ± 1 per second at {pod}: {pods:?}\n{}", hammer.log);
    }
    assert!((18.0..=22.0).contains(&admitted), "{admitted}/s\n{}", hammer.log);
    let (offered, admitted, pods) = vip.steady();
    println!(
        "override (25/s per replica, 2 replicas): offered {offered:.1}/s, admitted {admitted:.2}/s {pods:?}"
    );
    assert!(offered >= 135.0, "{}", vip.log);
    for (pod, n) in &pods {
        assert!((22.5..=27.5).contains(n), "the override's 25 per second at {pod}: {pods:?}\n{}", vip.log);
    }
    assert!((45.0..=55.0).contains(&admitted), "{admitted}/s\n{}", vip.log);
    let quiet_ok = quiet.total["statuses"]["200"].as_u64().unwrap_or(0);
    assert_eq!(
        quiet_ok,
        u64::from(4 * SECONDS),
        "a caller under its limit is not touched by the others: {}",
        quiet.log
    );
    for l in [&hammer, &vip, &quiet] {
        // A loaded 2-core machine may starve a client now and then; never more than 1 %.
        let sent = l.total["sent"].as_u64().unwrap_or(0);
        assert!(l.other() * 100 <= sent, "only 200 and 429, every request answered: {}", l.log);
    }

    // A quota per API key (2 per minute per replica): refused with its status and the headers
    // that say which limit and when to come back; another key is not touched.
    let url = "http://web/quota";
    let (ok, log) = run_job(&client, &n, "quota-a", "default", true, &get(&[url], 5, &["x-api-key:a"])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    let admitted = seen.iter().filter(|s| s.status == 200).count();
    assert!((2..=4).contains(&admitted), "2 per replica at most: {log}");
    let refused =
        seen.iter().find(|s| s.status == 420).unwrap_or_else(|| panic!("one of 5 is refused: {log}"));
    assert_eq!(refused.header("x-mycel-ratelimit"), "quota", "{log}");
    assert_eq!(refused.header("ratelimit-policy"), "\"quota\";q=2;w=60", "{log}");
    let retry: u64 = refused.header("retry-after").parse().unwrap_or(0);
    assert!((1..=60).contains(&retry), "{log}");
    assert_eq!(refused.header("ratelimit"), format!("\"quota\";r=0;t={retry}"), "{log}");
    assert_eq!(refused.header("x-mycel-error"), "RL rate_limited", "{log}");
    let (ok, log) = run_job(&client, &n, "quota-b", "default", true, &get(&[url], 1, &["x-api-key:b"])).await;
    assert!(ok && parse(&log).first().map(|s| s.status) == Some(200), "another key: {log}");

    // A shadow limit refuses nothing and counts what it would have refused.
    let (ok, log) =
        run_job(&client, &n, "shadow", "default", true, &get(&["http://web/shadow"], 20, &[])).await;
    assert!(ok && parse(&log).iter().all(|s| s.status == 200), "{log}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &n);
    let mut would = 0;
    let mut allowed = 0;
    for pod in pods.list(&ListParams::default().labels("app=web")).await.unwrap() {
        let name = pod.metadata.name.unwrap();
        let (_, metrics) = port_forward_get(&client, &n, &name, 15020, "/metrics").await.unwrap();
        let count =
            |limit: &str, result: &str| decisions(&metrics, &format!("{n}/web-limits"), limit, result);
        would += count("shadow", "shadow_limited");
        allowed += count("shadow", "allowed");
        assert!(count("per-caller", "limited") > 0, "{name} refused the hammer: {metrics}");
    }
    assert_eq!(would + allowed, 20, "every request counted");
    assert!(would >= 18, "all but one per replica would have been refused: {would}");

    // gRPC: RESOURCE_EXHAUSTED once the limit is spent.
    let grpc: Vec<String> = ["grpc-check", "--report", "--count", "3", "http://grpc:9090"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (ok, log) = run_job(&client, &n, "grpc", "default", true, &grpc).await;
    let lines: Vec<&str> = log.lines().collect();
    assert!(ok && lines == ["Serving", "code: ResourceExhausted", "code: ResourceExhausted"], "{log}");

    // Outbound: the sender's own sidecar refuses what it sends to a host over its limit.
    mesh.apply(&c, OUTBOUND);
    condition(&rlps, "egress", "Accepted", "True").await;
    let (ok, log) = run_job(&client, &n, "egress", "default", true, &get(&["http://web/"], 5, &[])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.iter().map(|s| s.status).collect::<Vec<_>>(), [200, 200, 200, 429, 429], "{log}");
    assert_eq!(seen[3].header("x-mycel-ratelimit"), "egress", "{log}");
    for name in ["web-limits", "grpc-limit", "egress"] {
        rlps.delete(name, &Default::default()).await.unwrap();
    }
    mesh.finish().await;
}

/// Redis for the rate-limit service, in the installation's namespace.
fn redis() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: redis}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: redis}}}}
  template:
    metadata: {{labels: {{app: redis}}}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: redis
        image: {REDIS_IMAGE}
        args: ["--bind", "0.0.0.0", "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/data"]
        readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: redis}}
spec:
  selector: {{app: redis}}
  ports: [{{name: tcp-redis, port: 6379}}]
"#
    )
}

const GLOBAL: &str = r#"apiVersion: mycel.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: global}
spec:
  selector: {matchLabels: {app: web}}
  limits:
  - {name: global, requests: 50, unit: second, scope: Global}
"#;

/// Three client pods at unequal rates, started at the same second: the admitted requests per
/// second of all of them over the steady window, the offered, and those by each server pod.
async fn global_round(mesh: &Installation, round: &str) -> (f64, f64, BTreeMap<String, f64>, u64) {
    let (client, n) = (&mesh.client, &mesh.app.name);
    let start_at = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        + 25_000)
        .to_string();
    let args = |rate: u32| {
        let mut a = load("http://web/", rate);
        a.extend(["--start-at-ms".to_string(), start_at.clone()]);
        a
    };
    let (a, b, c) = (args(70), args(45), args(25));
    let (ja, jb, jc) = (format!("{round}-a"), format!("{round}-b"), format!("{round}-c"));
    let ((ok_a, la), (ok_b, lb), (ok_c, lc)) = tokio::join!(
        run_job(client, n, &ja, "default", true, &a),
        run_job(client, n, &jb, "default", true, &b),
        run_job(client, n, &jc, "default", true, &c),
    );
    assert!(ok_a && ok_b && ok_c, "{la}\n{lb}\n{lc}");
    let loads = [Load::of(la), Load::of(lb), Load::of(lc)];
    let (mut offered, mut admitted, mut pods) = (0.0, 0.0, BTreeMap::new());
    let sent_all: u64 = loads.iter().map(|l| l.total["sent"].as_u64().unwrap_or(0)).sum();
    for l in &loads {
        let late = l.total["late_ms"].as_u64().unwrap_or(u64::MAX);
        assert!(late <= 2_000, "every client started within 2 s of the others ({late} ms late): {}", l.log);
        let sent = l.total["sent"].as_u64().unwrap_or(0);
        assert!(l.other() * 100 <= sent, "only 200 and 429, every request answered: {}", l.log);
        let (o, a, p) = l.steady();
        offered += o;
        admitted += a;
        for (pod, r) in p {
            *pods.entry(pod).or_default() += r;
        }
    }
    (offered, admitted, pods, sent_all)
}

#[tokio::test]
async fn a_global_limit_admits_its_rate_in_total_across_clients_and_replicas() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    let _measuring = MEASURING.lock().await;
    let mesh = with_redis(&c, "rl-global", 2).await;
    let (client, n) = (mesh.client.clone(), mesh.app.name.clone());
    mesh.apply(&c, &echo("web", "web", "v1", 2));
    mesh.apply(&c, GLOBAL);
    mesh.available("web", 2).await;
    let rlps = mycel_api(&client, &n, "RateLimitPolicy", "ratelimitpolicies");
    let ready = condition(&rlps, "global", "Ready", "True").await;
    assert!(ready["message"].as_str().unwrap_or("").contains("2 selected workload"), "{ready}");

    for (round, replicas) in [("two", 2), ("three", 3)] {
        if replicas == 3 {
            // More servers: still 50 a second in all (a per-replica share would give 75).
            c.kubectl_run(&["scale", "-n", &n, "deployment/web", "--replicas=3"], None).unwrap();
            mesh.available("web", 3).await;
            mycel_e2e::eventually(
                "the policy holds at 3 workloads",
                std::time::Duration::from_secs(60),
                || async {
                    let o = rlps.get("global").await.map_err(|e| e.to_string())?;
                    let msg = o.data["status"]["conditions"].to_string();
                    if msg.contains("3 selected workload") { Ok(()) } else { Err(msg) }
                },
            )
            .await;
        }
        let (offered, admitted, pods, _) = global_round(&mesh, round).await;
        println!(
            "global limit (50/s, {replicas} server replicas, 3 clients at 70/45/25): offered {offered:.1}/s, admitted {admitted:.2}/s {pods:?}"
        );
        assert!(offered >= 120.0, "the offered load is well above the limit: {offered}");
        let undecided = failure_open(&client, &n).await;
        assert!(
            (47.5..=52.5).contains(&admitted),
            "50 ± 5 % a second in total: {admitted} {pods:?} ({undecided} admitted undecided, failure mode Open)"
        );
        assert_eq!(pods.len(), replicas, "every replica admits some: {pods:?}");
    }
    rlps.delete("global", &Default::default()).await.unwrap();
    mesh.finish().await;
}

/// Requests the web pods' sidecars admitted without a decision (failure mode Open).
async fn failure_open(client: &kube::Client, n: &str) -> u64 {
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let mut total = 0;
    for pod in pods.list(&ListParams::default().labels("app=web")).await.unwrap() {
        let name = pod.metadata.name.unwrap_or_default();
        if let Ok((_, metrics)) = port_forward_get(client, n, &name, 15020, "/metrics").await {
            total += decisions(&metrics, &format!("{n}/global"), "global", "failure_open");
        }
    }
    total
}

/// `mycel_ratelimit_decisions_total` of one limit and result in a sidecar's metrics (0 if none).
fn decisions(metrics: &str, policy: &str, limit: &str, result: &str) -> u64 {
    let want =
        format!(r#"mycel_ratelimit_decisions_total{{policy="{policy}",limit="{limit}",result="{result}"}} "#);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Service accounts `names` in `ns` (callers with identities of their own).
async fn service_accounts(client: &kube::Client, ns: &str, names: &[&str]) {
    for sa in names {
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap();
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap();
    }
}

/// An installation whose rate-limit service (`replicas`) counts in a Redis pod of its namespace,
/// both running.
async fn with_redis(c: &TestCluster, prefix: &str, replicas: i32) -> Installation {
    let mesh = Installation::start_with(
        c,
        prefix,
        json!({"rateLimit": {"replicas": replicas, "redis": {"addresses": ["redis:6379"]}, "timeout": "1s"}}),
    )
    .await;
    let root = mesh.root.name.clone();
    c.kubectl_run(&["apply", "-n", &root, "-f", "-"], Some(&redis())).unwrap();
    mesh.available_in(&root, "redis", 1).await;
    mesh.available_in(&root, &format!("mycel-ratelimit-{}", mesh.revision), replicas).await;
    mesh
}

/// A zone where it is about noon now: a day's quota there does not end during the test.
fn zone_at_noon() -> String {
    let hour =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 3600) % 24;
    match 12 - hour as i64 {
        0 => "Etc/GMT".into(),
        // Etc/GMT-5 is five hours ahead of UTC.
        ahead if ahead > 0 => format!("Etc/GMT-{ahead}"),
        behind => format!("Etc/GMT+{}", -behind),
    }
}

fn global_keys(n: &str, zone: &str) -> String {
    format!(
        r#"apiVersion: mycel.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: global-keys}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  limits:
  - name: per-caller
    requests: 3
    unit: minute
    scope: Global
    key: {{type: SourcePrincipal}}
    match: {{path: {{prefix: /caller}}}}
    overrides: [{{value: cluster.local/ns/{n}/sa/vip, requests: 100}}]
  - name: daily
    requests: 4
    unit: day
    scope: Global
    window: Calendar
    timeZone: {zone}
    match: {{path: {{exact: /quota}}}}
  - {{name: shadow, requests: 2, unit: minute, scope: Global, shadow: true, match: {{path: {{prefix: /shadow}}}}}}
  - {{name: open, requests: 1, unit: minute, scope: Global, match: {{path: {{prefix: /open}}}}}}
  - {{name: closed, requests: 1, unit: minute, scope: Global, failureMode: Closed, match: {{path: {{prefix: /closed}}}}}}
"#
    )
}

/// The statuses of `count` GETs of `url` from a meshed pod of service account `sa`.
async fn statuses(mesh: &Installation, job: &str, sa: &str, url: &str, count: u32) -> Vec<u64> {
    let (ok, log) = run_job(&mesh.client, &mesh.app.name, job, sa, true, &get(&[url], count, &[])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    assert_eq!(seen.len(), count as usize, "every request answered: {log}");
    seen.iter().map(|s| s.status).collect()
}

/// Deletes the pods of `selector` and waits until as many others are ready in their place.
async fn restart(client: &kube::Client, ns: &str, selector: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let old: Vec<String> = pods
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(!old.is_empty(), "pods of {selector} in {ns}");
    for p in &old {
        pods.delete(p, &Default::default()).await.unwrap();
    }
    mycel_e2e::eventually(
        &format!("new ready pods of {selector}"),
        std::time::Duration::from_secs(120),
        || async {
            let list = pods.list(&ListParams::default().labels(selector)).await.map_err(|e| e.to_string())?;
            let ready = list
                .items
                .iter()
                .filter(|p| {
                    !old.contains(p.metadata.name.as_ref().unwrap())
                        && p.metadata.deletion_timestamp.is_none()
                })
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .count();
            if ready >= old.len() { Ok(()) } else { Err(format!("{ready} of {} ready", old.len())) }
        },
    )
    .await;
}

/// `mycelctl quota` of the policy, as its user sees it.
fn mycelctl_quota(c: &TestCluster, mesh: &Installation, policy: &str) -> String {
    let out = std::process::Command::new(mycel_e2e::process::workspace_binary("mycelctl").unwrap())
        .args(["quota", policy, "-n", &mesh.app.name, "--mesh-namespace", &mesh.root.name, "--revision"])
        .arg(&mesh.revision)
        .env("KUBECONFIG", c.kubeconfig())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    table
}

#[tokio::test]
async fn global_keys_quotas_shadow_and_failure_modes_as_configured() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    let _measuring = MEASURING.lock().await;
    let mesh = with_redis(&c, "rl-keys", 1).await;
    let (client, n, root) = (mesh.client.clone(), mesh.app.name.clone(), mesh.root.name.clone());
    service_accounts(&client, &n, &["vip", "quiet"]).await;
    mesh.apply(&c, &echo("web", "web", "v1", 1));
    let zone = zone_at_noon();
    mesh.apply(&c, &global_keys(&n, &zone));
    mesh.available("web", 1).await;
    let rlps = mycel_api(&client, &n, "RateLimitPolicy", "ratelimitpolicies");
    condition(&rlps, "global-keys", "Ready", "True").await;
    let healthy = condition(&rlps, "global-keys", "Degraded", "False").await;
    assert!(healthy["message"].as_str().unwrap_or("").contains("reaches Redis"), "{healthy}");

    // Per identity: one caller spends its 3 a minute, another is not touched, the override
    // lifts one identity's limit.
    let url = "http://web/caller";
    let (hammer, quiet, vip) = tokio::join!(
        statuses(&mesh, "hammer", "default", url, 6),
        statuses(&mesh, "quiet", "quiet", url, 3),
        statuses(&mesh, "vip", "vip", url, 6),
    );
    assert_eq!(hammer, [200, 200, 200, 429, 429, 429], "3 a minute for this caller");
    assert_eq!(quiet, [200, 200, 200], "another caller has its own counter");
    assert_eq!(vip, [200; 6], "the override's 100 a minute");

    // A daily quota: 4, then refused until midnight (in a zone where it is about noon); it
    // outlives restarts of the rate-limit service and of the server's pod.
    let q = statuses(&mesh, "quota-a", "default", "http://web/quota", 6).await;
    assert_eq!(q, [200, 200, 200, 200, 429, 429], "4 a day");
    let table = mycelctl_quota(&c, &mesh, "global-keys");
    let daily = table.lines().find(|l| l.starts_with("daily ")).unwrap_or_else(|| panic!("{table}"));
    let window = format!("day in {}", zone.to_lowercase());
    assert!(daily.contains(" 4 ") && daily.contains(" 0/4 ") && daily.contains(&window), "{table}");
    let caller = table.lines().find(|l| l.starts_with("per-caller ")).unwrap_or_else(|| panic!("{table}"));
    assert!(caller.contains("--key"), "a keyed limit asks for its value: {table}");
    restart(&client, &root, "app=mycel-ratelimit").await;
    restart(&client, &n, "app=web").await;
    condition(&rlps, "global-keys", "Ready", "True").await;
    let q = statuses(&mesh, "quota-b", "default", "http://web/quota", 2).await;
    assert_eq!(q, [429, 429], "the day's quota is still spent after the restarts");

    // Shadow: refuses nothing, counts what it would have refused.
    let s = statuses(&mesh, "shadow", "default", "http://web/shadow", 5).await;
    assert_eq!(s, [200; 5]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &n);
    let web = pods.list(&ListParams::default().labels("app=web")).await.unwrap().items;
    let web =
        web.iter().find(|p| p.metadata.deletion_timestamp.is_none()).unwrap().metadata.name.clone().unwrap();
    let (_, metrics) = port_forward_get(&client, &n, &web, 15020, "/metrics").await.unwrap();
    let count = |limit: &str, result: &str| decisions(&metrics, &format!("{n}/global-keys"), limit, result);
    assert_eq!((count("shadow", "shadow_limited"), count("shadow", "allowed")), (3, 2), "{metrics}");

    // Redis goes away: the policy says so, Open admits, Closed refuses with 503; Redis back,
    // it counts again without a restart.
    c.kubectl_run(&["scale", "-n", &root, "deployment/redis", "--replicas=0"], None).unwrap();
    let degraded = condition(&rlps, "global-keys", "Degraded", "True").await;
    assert_eq!(degraded["reason"], "RateLimitServiceUnavailable", "{degraded}");
    let ready = condition(&rlps, "global-keys", "Ready", "False").await;
    assert_eq!(ready["reason"], "RateLimitServiceUnavailable", "{ready}");
    let closed_args = get(&["http://web/closed"], 2, &[]);
    let (open, closed) = tokio::join!(
        statuses(&mesh, "open", "default", "http://web/open", 3),
        run_job(&client, &n, "closed", "default", true, &closed_args),
    );
    assert_eq!(open, [200; 3], "failureMode Open admits what it cannot count (1 a minute otherwise)");
    let (ok, log) = closed;
    let closed = parse(&log);
    assert!(ok && closed.len() == 2, "{log}");
    for r in &closed {
        assert_eq!(r.status, 503, "{log}");
        assert_eq!(r.header("x-mycel-error"), "RLSE rate_limit_service_unavailable", "{log}");
    }
    c.kubectl_run(&["scale", "-n", &root, "deployment/redis", "--replicas=1"], None).unwrap();
    condition(&rlps, "global-keys", "Degraded", "False").await;
    condition(&rlps, "global-keys", "Ready", "True").await;
    let closed = statuses(&mesh, "closed-again", "default", "http://web/closed", 2).await;
    assert_eq!(closed, [200, 429], "counted again: 1 a minute");

    rlps.delete("global-keys", &Default::default()).await.unwrap();
    mesh.finish().await;
}

/// Three Redis nodes in cluster mode, each its own Deployment and Service (a seed).
fn redis_cluster() -> String {
    let mut y = String::new();
    for node in ["a", "b", "c"] {
        y.push_str(&format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: redis-{node}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: redis-cluster, node: "{node}"}}}}
  template:
    metadata: {{labels: {{app: redis-cluster, node: "{node}"}}}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: redis
        image: {REDIS_IMAGE}
        args: ["--bind", "0.0.0.0", "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/data", "--cluster-enabled", "yes", "--cluster-config-file", "/data/nodes.conf"]
        readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: redis-{node}}}
spec:
  selector: {{app: redis-cluster, node: "{node}"}}
  ports: [{{name: tcp-redis, port: 6379}}]
---
"#
        ));
    }
    y
}

#[tokio::test]
async fn a_redis_cluster_of_three_master_pods_carries_a_global_limit() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    let _measuring = MEASURING.lock().await;
    let seeds = ["redis-a:6379", "redis-b:6379", "redis-c:6379"];
    let mesh = Installation::start_with(
        &c,
        "rl-cluster",
        json!({"rateLimit": {"replicas": 2, "redis": {"addresses": seeds, "cluster": true}, "timeout": "1s"}}),
    )
    .await;
    let (client, n, root) = (mesh.client.clone(), mesh.app.name.clone(), mesh.root.name.clone());
    c.kubectl_run(&["apply", "-n", &root, "-f", "-"], Some(&redis_cluster())).unwrap();
    for node in ["a", "b", "c"] {
        mesh.available_in(&root, &format!("redis-{node}"), 1).await;
    }
    // Form the cluster: every node a master of a third of the slots.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &root);
    let nodes = pods.list(&ListParams::default().labels("app=redis-cluster")).await.unwrap().items;
    let ips: Vec<String> = nodes
        .iter()
        .map(|p| format!("{}:6379", p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap()))
        .collect();
    let first = nodes[0].metadata.name.clone().unwrap();
    let mut create = vec!["exec", "-n", &root, &first, "--", "redis-cli", "--cluster", "create"];
    create.extend(ips.iter().map(String::as_str));
    create.push("--cluster-yes");
    c.kubectl_run(&create, None).unwrap();
    mycel_e2e::eventually("the Redis Cluster is formed", std::time::Duration::from_secs(60), || async {
        let info = c
            .kubectl_run(&["exec", "-n", &root, &first, "--", "redis-cli", "cluster", "info"], None)
            .map_err(|e| e.to_string())?;
        if info.contains("cluster_state:ok") && info.contains("cluster_size:3") { Ok(()) } else { Err(info) }
    })
    .await;
    mesh.available_in(&root, &format!("mycel-ratelimit-{}", mesh.revision), 2).await;
    mesh.apply(&c, &echo("web", "web", "v1", 2));
    mesh.apply(&c, GLOBAL);
    mesh.available("web", 2).await;
    let rlps = mycel_api(&client, &n, "RateLimitPolicy", "ratelimitpolicies");
    condition(&rlps, "global", "Ready", "True").await;
    condition(&rlps, "global", "Degraded", "False").await;

    let (offered, admitted, pods_admitted, sent) = global_round(&mesh, "cluster").await;
    println!(
        "global limit in a 3-master Redis Cluster (50/s, 2 server replicas, 3 clients at 70/45/25): offered {offered:.1}/s, admitted {admitted:.2}/s {pods_admitted:?}"
    );
    assert!(offered >= 120.0, "the offered load is well above the limit: {offered}");
    let undecided = failure_open(&client, &n).await;
    assert!(
        (47.5..=52.5).contains(&admitted),
        "50 ± 5 % a second in total: {admitted} {pods_admitted:?} ({undecided} admitted undecided)"
    );
    // The counts were made in the cluster: its masters ran the scripts, about one per request.
    let mut scripts = 0;
    for p in &nodes {
        let name = p.metadata.name.clone().unwrap();
        let out = c
            .kubectl_run(&["exec", "-n", &root, &name, "--", "redis-cli", "info", "commandstats"], None)
            .unwrap();
        for l in out.lines() {
            if let Some(rest) = l.strip_prefix("cmdstat_evalsha:").or_else(|| l.strip_prefix("cmdstat_eval:"))
            {
                let calls = rest.split(',').find_map(|f| f.strip_prefix("calls=")).unwrap_or("0");
                scripts += calls.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    println!("Redis Cluster: {scripts} scripts run for the {sent} requests sent");
    // Each request the clients sent was counted there once (and a few readiness checks ran
    // no script).
    assert!(
        scripts as f64 >= sent as f64 * 0.98 && scripts as f64 <= sent as f64 * 1.02,
        "the cluster counted each request once: {scripts} scripts for {sent} requests"
    );
    rlps.delete("global", &Default::default()).await.unwrap();
    mesh.finish().await;
}
