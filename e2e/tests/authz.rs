//! AuthorizationPolicy on the real node, with real pods and their mesh certificates: DENY by
//! principal, by namespace and by path (spellings of the path that normalise to it are denied
//! too, and the app receives the normalised path); AUDIT and a dry-run DENY change nothing but
//! are counted and logged; an ALLOW list on a TCP and gRPC workload refuses a second caller
//! (the TCP connection reset, gRPC `PERMISSION_DENIED`); a selector that matches nothing is not
//! Ready; a mesh-wide ALLOW without rules in the root namespace denies everything, and a
//! namespace's ALLOW opens what it names; CUSTOM policies ask a real external authorizer (Envoy's
//! ext_authz gRPC API) before DENY, with its headers reaching the app and the client, and its
//! timeout, fail-open and fail-closed providers, and a provider the installation lacks.
//! Skipped (with a message) without a real node.

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::{
    Api,
    api::{ListParams, LogParams, Patch, PatchParams, PostParams},
};
use mycel_e2e::{
    TestCluster,
    images::TESTAPP_IMAGE,
    mesh::{Installation, condition, echo, get, mycel_api, parse, run_job},
    port_forward_get,
};
use serde_json::json;

fn deny(n: &str, b: &str) -> String {
    format!(
        r#"apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: deny}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/{n}/sa/other]}}}}]
  - from: [{{source: {{namespaces: [{b}]}}}}]
  - to: [{{operation: {{paths: [/admin, /admin/*]}}}}]
---
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: audit}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: AUDIT
  rules: [{{to: [{{operation: {{paths: [/audited]}}}}]}}]
---
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: dry
  annotations: {{mycel.io/dry-run: "true"}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/dry]}}}}]}}]
"#
    )
}

/// A pod serving gRPC (the health service) on 9090 and TCP echo on 9000.
fn multi() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: multi}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: multi}}}}
  template:
    metadata: {{labels: {{app: multi}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - {{name: grpc, image: {TESTAPP_IMAGE}, args: ["grpc-echo", "--port", "9090"]}}
      - {{name: tcp, image: {TESTAPP_IMAGE}, args: ["tcp-echo", "--port", "9000"]}}
---
apiVersion: v1
kind: Service
metadata: {{name: multi}}
spec:
  selector: {{app: multi}}
  ports: [{{name: grpc, port: 9090}}, {{name: tcp, port: 9000}}]
"#
    )
}

fn allow_multi(n: &str) -> String {
    format!(
        r#"apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: allow-multi}}
spec:
  selector: {{matchLabels: {{app: multi}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/{n}/sa/default]}}}}]
    to: [{{operation: {{ports: [9000, 9090]}}}}]
---
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: selects-nothing}}
spec:
  selector: {{matchLabels: {{app: no-such-app}}}}
  action: DENY
  rules: [{{}}]
"#
    )
}

const DENY_BY_DEFAULT: &str = r#"
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-by-default}
spec: {}
"#;

const ALLOW_OPEN: &str = r#"
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-open}
spec:
  rules: [{to: [{operation: {methods: [GET], paths: [/open]}}]}]
"#;

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn authorization_policies_decide_who_may_call() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    let mesh = Installation::start(&c, "authz").await;
    let client = mesh.client.clone();
    let n = mesh.app.name.clone();
    // A second namespace of the mesh, and a second identity in the first.
    let other_ns = c.namespace("authz-b").await.unwrap();
    let b = other_ns.name.clone();
    Api::<Namespace>::all(client.clone())
        .patch(
            &b,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"mycel.io/rev": mesh.revision}}})),
        )
        .await
        .unwrap();
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "other"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &n).create(&PostParams::default(), &sa).await.unwrap();
    mesh.apply(&c, &echo("web", "web", "v1", 1));
    mesh.apply(&c, &multi());
    mesh.available("web", 1).await;
    mesh.available("multi", 1).await;
    let azs = mycel_api(&client, &n, "AuthorizationPolicy", "authorizationpolicies");

    // DENY by principal, namespace and path; AUDIT and dry-run beside it.
    mesh.apply(&c, &deny(&n, &b));
    for name in ["deny", "audit", "dry"] {
        let ready = condition(&azs, name, "Ready", "True").await;
        assert!(ready["message"].as_str().unwrap_or("").contains("1 selected workload"), "{name}: {ready}");
    }
    let urls = [
        "http://web/ok",
        "http://web/admin",
        "http://web/%61dmin",
        "http://web//admin",
        "http://web/x/../admin/panel",
        "http://web/a/./b/%7Ec",
        "http://web/audited",
        "http://web/dry",
    ];
    let (ok, log) = run_job(&client, &n, "allowed-caller", "default", true, &get(&urls, 1, &[])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    let by = |url: &str| seen.iter().find(|s| s.url == url).unwrap_or_else(|| panic!("no {url} in:\n{log}"));
    assert_eq!(by("http://web/ok").status, 200, "{log}");
    for url in ["http://web/admin", "http://web/%61dmin", "http://web//admin", "http://web/x/../admin/panel"]
    {
        let s = by(url);
        assert_eq!(s.status, 403, "{url} is /admin once normalised: {log}");
        assert_eq!(s.body, "RBAC: access denied", "{url}: nothing about the policy: {log}");
    }
    let normalised = by("http://web/a/./b/%7Ec");
    assert_eq!((normalised.status, normalised.body["path"].as_str()), (200, Some("/a/b/~c")), "{log}");
    assert_eq!(by("http://web/audited").status, 200, "AUDIT changes nothing: {log}");
    assert_eq!(by("http://web/dry").status, 200, "a dry-run DENY changes nothing: {log}");
    let (ok, log) =
        run_job(&client, &n, "denied-principal", "other", true, &get(&["http://web/ok"], 1, &[])).await;
    assert!(ok, "{log}");
    assert_eq!(parse(&log).first().map(|s| s.status), Some(403), "DENY by principal: {log}");
    let url = format!("http://web.{n}/ok");
    let (ok, log) = run_job(&client, &b, "denied-namespace", "default", true, &get(&[&url], 1, &[])).await;
    assert!(ok, "{log}");
    assert_eq!(parse(&log).first().map(|s| s.status), Some(403), "DENY by namespace: {log}");
    // Counted by deciding policy, and logged by the web pod's sidecar.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &n);
    let web = pods.list(&ListParams::default().labels("app=web")).await.unwrap().items.remove(0);
    let web = web.metadata.name.unwrap();
    let (_, metrics) = port_forward_get(&client, &n, &web, 15020, "/metrics").await.unwrap();
    let count = |action: &str, policy: &str, result: &str| -> u64 {
        let want = format!(
            r#"mycel_authz_decisions_total{{action="{action}",policy="{policy}",result="{result}"}} "#
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    assert_eq!(count("DENY", &format!("{n}/deny"), "denied"), 6, "{metrics}");
    assert_eq!(count("AUDIT", &format!("{n}/audit"), "audited"), 1, "{metrics}");
    assert_eq!(count("DENY", &format!("{n}/dry"), "dry_run_denied"), 1, "{metrics}");
    let logs = pods
        .logs(&web, &LogParams { container: Some("mycel-proxy".into()), ..Default::default() })
        .await
        .unwrap();
    for (what, policy) in [("denied", "deny"), ("audited", "audit"), ("dry run", "dry")] {
        assert!(
            logs.lines().any(
                |l| l.contains(&format!("authorization: {what}")) && l.contains(&format!("{n}/{policy}"))
            ),
            "the sidecar logs {what} by {policy}:\n{logs}"
        );
    }
    for name in ["deny", "audit", "dry"] {
        azs.delete(name, &Default::default()).await.unwrap();
    }

    // An ALLOW list on ports only (L4): the listed caller passes over TCP and gRPC, another is
    // refused — its TCP connection reset, its gRPC calls PERMISSION_DENIED.
    mesh.apply(&c, &allow_multi(&n));
    condition(&azs, "allow-multi", "Ready", "True").await;
    let nothing = condition(&azs, "selects-nothing", "Ready", "False").await;
    assert_eq!(nothing["reason"], "NotInEffect", "{nothing}");
    assert!(nothing["message"].as_str().unwrap_or("").contains("app=no-such-app"), "{nothing}");
    let grpc = args(&["grpc-check", "--report", "--count", "2", "http://multi:9090"]);
    let tcp = args(&["tcp-send", "multi:9000", "ping"]);
    let (ok, log) = run_job(&client, &n, "listed-grpc", "default", true, &grpc).await;
    assert!(ok && log.lines().filter(|l| *l == "Serving").count() == 2, "{log}");
    let (ok, log) = run_job(&client, &n, "listed-tcp", "default", true, &tcp).await;
    assert!(ok && log.contains("ping"), "{log}");
    let (ok, log) = run_job(&client, &n, "unlisted-grpc", "other", true, &grpc).await;
    assert!(ok && log.lines().filter(|l| *l == "code: PermissionDenied").count() == 2, "{log}");
    let (ok, log) = run_job(&client, &n, "unlisted-tcp", "other", true, &tcp).await;
    assert!(!ok && !log.contains("ping\n"), "the connection is refused: {log}");

    // Mesh-wide default deny from the root namespace, and a namespace's ALLOW for one path.
    let root_azs = mycel_api(&client, &mesh.root.name, "AuthorizationPolicy", "authorizationpolicies");
    c.kubectl_run(&["apply", "-n", &mesh.root.name, "-f", "-"], Some(DENY_BY_DEFAULT)).unwrap();
    condition(&root_azs, "deny-by-default", "Ready", "True").await;
    let (ok, log) =
        run_job(&client, &n, "default-deny", "default", true, &get(&["http://web/open"], 1, &[])).await;
    assert!(ok, "{log}");
    assert_eq!(parse(&log).first().map(|s| s.status), Some(403), "denied by default: {log}");
    mesh.apply(&c, ALLOW_OPEN);
    condition(&azs, "allow-open", "Ready", "True").await;
    let accepted = condition(&azs, "allow-open", "Accepted", "True").await;
    let message = accepted["message"].as_str().unwrap_or("");
    assert!(
        message.contains("spec.rules[0] (methods, paths) need HTTP attributes"),
        "the TCP reading is said: {accepted}"
    );
    let (ok, log) = run_job(
        &client,
        &n,
        "namespace-allow",
        "default",
        true,
        &get(&["http://web/open", "http://web/closed"], 1, &[]),
    )
    .await;
    assert!(ok, "{log}");
    let statuses: Vec<u64> = parse(&log).iter().map(|s| s.status).collect();
    assert_eq!(statuses, [200, 403], "{log}");
    root_azs.delete("deny-by-default", &Default::default()).await.unwrap();
    other_ns.delete().await.unwrap();
    mesh.finish().await;
}

/// The external authorizer (`mycel-testapp ext-authz`), outside the mesh.
fn authorizer() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: ext-authz}}
spec:
  selector: {{matchLabels: {{app: ext-authz}}}}
  template:
    metadata: {{labels: {{app: ext-authz}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: authz
        image: {TESTAPP_IMAGE}
        args: ["ext-authz", "--port", "9191"]
        ports: [{{name: grpc, containerPort: 9191}}]
        readinessProbe: {{tcpSocket: {{port: grpc}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: ext-authz}}
spec:
  selector: {{app: ext-authz}}
  ports: [{{name: grpc, port: 9191, targetPort: 9191}}]
"#
    )
}

/// CUSTOM policies on web, one per provider (and one naming none the installation has), and a
/// DENY that the authorizer's allow does not override.
const CUSTOM: &str = r#"apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ext}
spec:
  selector: {matchLabels: {app: web}}
  action: CUSTOM
  provider: {name: authorizer}
  rules: [{to: [{operation: {paths: ["/ext/*"]}}]}]
---
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ext-open}
spec:
  selector: {matchLabels: {app: web}}
  action: CUSTOM
  provider: {name: gone-open}
  rules: [{to: [{operation: {paths: ["/open/*"]}}]}]
---
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ext-closed}
spec:
  selector: {matchLabels: {app: web}}
  action: CUSTOM
  provider: {name: gone-closed}
  rules: [{to: [{operation: {paths: ["/closed/*"]}}]}]
---
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ext-missing}
spec:
  selector: {matchLabels: {app: web}}
  action: CUSTOM
  provider: {name: not-installed}
  rules: [{to: [{operation: {paths: ["/missing/*"]}}]}]
---
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-after}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/ext/denied"]}}]}]
"#;

#[tokio::test]
async fn custom_policies_ask_an_external_authorizer() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    // The authorizer lives outside the mesh, in a namespace of its own.
    let outside = c.namespace("extauthz-server").await.unwrap();
    c.kubectl_run(&["apply", "-n", &outside.name, "-f", "-"], Some(&authorizer())).unwrap();
    let host = format!("ext-authz.{}.svc.cluster.local", outside.name);
    let mesh = Installation::start_with(
        &c,
        "extauthz",
        json!({"extensionProviders": [
            {"name": "authorizer", "envoyExtAuthzGrpc": {"service": host, "port": 9191, "timeout": "500ms"}},
            // Nothing listens on 9999: one provider lets requests on, the other refuses them.
            {"name": "gone-open", "envoyExtAuthzGrpc": {"service": host, "port": 9999, "failOpen": true}},
            {"name": "gone-closed", "envoyExtAuthzGrpc": {"service": host, "port": 9999, "statusOnError": 503}},
        ]}),
    )
    .await;
    let client = mesh.client.clone();
    let n = mesh.app.name.clone();
    mesh.available_in(&outside.name, "ext-authz", 1).await;
    mesh.apply(&c, &echo("web", "web", "v1", 1));
    mesh.available("web", 1).await;
    mesh.apply(&c, CUSTOM);
    let azs = mycel_api(&client, &n, "AuthorizationPolicy", "authorizationpolicies");
    for name in ["ext", "ext-open", "ext-closed", "deny-after"] {
        condition(&azs, name, "Ready", "True").await;
    }
    let missing = condition(&azs, "ext-missing", "ResolvedRefs", "False").await;
    assert_eq!(missing["reason"], "ProviderNotFound", "{missing}");
    let message = missing["message"].as_str().unwrap_or("");
    assert!(message.contains("not-installed") && message.contains("authorizer"), "{missing}");

    // Allowed by the authorizer: its request headers reach the app (one it removes does not),
    // its response header reaches the client; a DENY still denies after it; the providers that
    // cannot be reached fail open and closed as configured; a policy without its provider
    // refuses what it matches.
    let urls = [
        "http://web/ext/a",
        "http://web/ext/denied",
        "http://web/plain",
        "http://web/open/a",
        "http://web/closed/a",
        "http://web/missing/a",
    ];
    let headers = ["x-ext-authz:allow", "x-ext-authz-remove:secret"];
    let (ok, log) = run_job(&client, &n, "ext-allowed", "default", true, &get(&urls, 1, &headers)).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    let by = |url: &str| seen.iter().find(|s| s.url == url).unwrap_or_else(|| panic!("no {url} in:\n{log}"));
    let allowed = by("http://web/ext/a");
    assert_eq!(allowed.status, 200, "{log}");
    let app_got = &allowed.body["headers"];
    assert_eq!(app_got["x-ext-authz-check-result"], "allowed", "{log}");
    assert_eq!(
        app_got["x-ext-authz-source"],
        format!("spiffe://cluster.local/ns/{n}/sa/default"),
        "the authorizer is told the verified caller: {log}"
    );
    assert!(app_got.get("x-ext-authz-remove").is_none(), "the authorizer removed it: {log}");
    assert_eq!(allowed.header("x-ext-authz-said"), "yes", "{log}");
    let denied_after = by("http://web/ext/denied");
    assert_eq!((denied_after.status, &denied_after.body), (403, &json!("RBAC: access denied")), "{log}");
    let plain = by("http://web/plain");
    assert_eq!(plain.status, 200, "{log}");
    assert!(plain.body["headers"].get("x-ext-authz-check-result").is_none(), "not asked: {log}");
    assert_eq!(by("http://web/open/a").status, 200, "failOpen: {log}");
    assert_eq!(by("http://web/closed/a").status, 503, "statusOnError: {log}");
    assert_eq!(by("http://web/missing/a").status, 403, "no provider, no entry: {log}");

    // Denied by the authorizer: the client gets its status, header and body.
    let (ok, log) =
        run_job(&client, &n, "ext-denied", "default", true, &get(&["http://web/ext/a"], 1, &[])).await;
    assert!(ok, "{log}");
    let denied = parse(&log).remove(0);
    assert_eq!(denied.status, 401, "{log}");
    assert_eq!(denied.header("x-ext-authz-check-result"), "denied", "{log}");
    assert_eq!(denied.body, json!("denied by ext-authz"), "{log}");

    // An authorizer that does not answer: refused once the provider's timeout (500ms) is over,
    // with the default statusOnError.
    let (ok, log) = run_job(
        &client,
        &n,
        "ext-hang",
        "default",
        true,
        &get(&["http://web/ext/a"], 1, &["x-ext-authz:hang"]),
    )
    .await;
    assert!(ok, "{log}");
    let hung = parse(&log).remove(0);
    assert_eq!(hung.status, 403, "{log}");
    assert!(
        hung.elapsed >= std::time::Duration::from_millis(450)
            && hung.elapsed < std::time::Duration::from_secs(8),
        "refused after the timeout: {:?}",
        hung.elapsed
    );

    // Counted per policy, and the authorizer saw each question.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &n);
    let web = pods.list(&ListParams::default().labels("app=web")).await.unwrap().items.remove(0);
    let (_, metrics) =
        port_forward_get(&client, &n, &web.metadata.name.unwrap(), 15020, "/metrics").await.unwrap();
    let count = |policy: &str, result: &str| -> u64 {
        let want = format!(
            r#"mycel_authz_decisions_total{{action="CUSTOM",policy="{n}/{policy}",result="{result}"}} "#
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    assert_eq!(
        [count("ext", "allowed"), count("ext", "denied"), count("ext", "error_denied")],
        [2, 1, 1],
        "{metrics}"
    );
    assert_eq!(count("ext-open", "error_allowed"), 1, "{metrics}");
    assert_eq!(count("ext-closed", "error_denied"), 1, "{metrics}");
    let authz_pods: Api<Pod> = Api::namespaced(client.clone(), &outside.name);
    let server = authz_pods.list(&ListParams::default()).await.unwrap().items.remove(0);
    let logs = authz_pods.logs(&server.metadata.name.unwrap(), &LogParams::default()).await.unwrap();
    let checks = logs.lines().filter(|l| l.starts_with("check GET /ext/a from spiffe://")).count();
    assert_eq!(checks, 3, "{logs}");

    for name in ["ext", "ext-open", "ext-closed", "ext-missing", "deny-after"] {
        azs.delete(name, &Default::default()).await.unwrap();
    }
    mesh.finish().await;
    outside.delete().await.unwrap();
}
