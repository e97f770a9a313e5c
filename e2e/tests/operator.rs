//! The operator on the local cluster: a MeshInstallation becomes a Ready control-plane revision,
//! an idle reconcile writes nothing, drift is repaired, bad specs degrade without touching what
//! runs, revisions coexist, and deletion leaves nothing behind.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    core::{ApiResource, GroupVersionKind},
    runtime::{WatchStreamExt, watcher},
};
use mycel_e2e::{
    TestCluster, TestNamespace, eventually,
    kstatus::{self, KStatus},
    process::OperatorProcess,
};
use serde_json::{Value, json};

fn mi_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("mycel.io", "v1alpha1", "MeshInstallation"),
        "meshinstallations",
    )
}

fn ar(group: &str, kind: &str, plural: &str) -> ApiResource {
    let version = "v1";
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

const NAMESPACED: &[(&str, &str, &str)] = &[
    ("", "ServiceAccount", "serviceaccounts"),
    ("", "ConfigMap", "configmaps"),
    ("", "Service", "services"),
    ("", "Secret", "secrets"),
    ("apps", "Deployment", "deployments"),
    ("rbac.authorization.k8s.io", "Role", "roles"),
    ("rbac.authorization.k8s.io", "RoleBinding", "rolebindings"),
];
const CLUSTER: &[(&str, &str, &str)] = &[
    ("rbac.authorization.k8s.io", "ClusterRole", "clusterroles"),
    ("rbac.authorization.k8s.io", "ClusterRoleBinding", "clusterrolebindings"),
    ("admissionregistration.k8s.io", "MutatingWebhookConfiguration", "mutatingwebhookconfigurations"),
    ("admissionregistration.k8s.io", "ValidatingWebhookConfiguration", "validatingwebhookconfigurations"),
];

struct Setup {
    cluster: TestCluster,
    client: Client,
    ns: TestNamespace,
    mis: Api<DynamicObject>,
    operator: OperatorProcess,
}

async fn setup(prefix: &str) -> Setup {
    let cluster = TestCluster::shared().await.unwrap();
    cluster.install_crds().unwrap();
    // The control-plane pods are faked by kwok: the operator, not the images, is under test here.
    let ns = cluster.fake_node_namespace(prefix).await.unwrap();
    let client = cluster.client().await.unwrap();
    let mis = Api::namespaced_with(client.clone(), &ns.name, &mi_resource());
    let operator = OperatorProcess::start(&cluster, &ns.name).unwrap();
    Setup { cluster, client, ns, mis, operator }
}

impl Setup {
    /// Stops the operator, then removes the test's namespace.
    async fn finish(self) {
        drop(self.operator);
        self.ns.delete().await.unwrap();
    }
}

fn revision_for(ns: &str) -> String {
    // Revisions are cluster-wide; each test claims its own.
    format!("r{}", &ns[ns.len().saturating_sub(8)..]).replace('-', "")
}

async fn create_mi(mis: &Api<DynamicObject>, name: &str, spec: Value) -> DynamicObject {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "mycel.io/v1alpha1", "kind": "MeshInstallation",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    mis.create(&PostParams::default(), &obj).await.unwrap()
}

fn condition(obj: &DynamicObject, t: &str) -> Option<(String, String, String)> {
    obj.data["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == t).map(|c| {
        (
            c["status"].as_str().unwrap_or_default().to_string(),
            c["reason"].as_str().unwrap_or_default().to_string(),
            c["message"].as_str().unwrap_or_default().to_string(),
        )
    })
}

/// Watches `name` until `done` holds; returns the object and every kstatus seen on the way.
async fn wait_for(
    s: &Setup,
    name: &str,
    timeout: Duration,
    done: impl Fn(&DynamicObject) -> bool,
) -> (DynamicObject, Vec<KStatus>) {
    let mut seen = Vec::new();
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(s.mis.clone(), cfg).applied_objects().boxed();
    let result = tokio::time::timeout(timeout, async {
        while let Some(obj) = stream.try_next().await.unwrap() {
            let k = kstatus::compute(&serde_json::to_value(&obj).unwrap());
            if seen.last() != Some(&k) {
                seen.push(k);
            }
            if done(&obj) {
                return obj;
            }
        }
        panic!("watch ended")
    })
    .await;
    match result {
        Ok(obj) => (obj, seen),
        Err(_) => panic!(
            "{name} did not reach the expected state in {timeout:?}; kstatus seen {seen:?}; current: {:#}\noperator log:\n{}",
            s.mis.get(name).await.map(|o| o.data["status"].clone()).unwrap_or_default(),
            s.operator.log_text()
        ),
    }
}

/// Creates installation `name` with `spec` and waits until it is Ready.
async fn installed(s: &Setup, name: &str, spec: Value) -> DynamicObject {
    create_mi(&s.mis, name, spec).await;
    wait_for(s, name, Duration::from_secs(90), is_ready).await.0
}

fn is_ready(o: &DynamicObject) -> bool {
    condition(o, "Ready").is_some_and(|c| c.0 == "True")
        && o.data["status"]["observedGeneration"].as_i64() == o.metadata.generation
}

/// resourceVersion of every object the installation owns, keyed by kind/name.
async fn managed_versions(client: &Client, ns: &str, installation: &str) -> BTreeMap<String, String> {
    let selector = format!("mycel.io/installation={installation},mycel.io/installation-namespace={ns}");
    let mut out = BTreeMap::new();
    for (group, kind, plural) in NAMESPACED.iter().chain(CLUSTER) {
        let r = ar(group, kind, plural);
        let api: Api<DynamicObject> = if NAMESPACED.iter().any(|n| n.1 == *kind) {
            Api::namespaced_with(client.clone(), ns, &r)
        } else {
            Api::all_with(client.clone(), &r)
        };
        for o in api.list(&ListParams::default().labels(&selector)).await.unwrap() {
            out.insert(format!("{kind}/{}", o.name_any()), o.resource_version().unwrap_or_default());
        }
    }
    out
}

fn reconcile_count(op: &OperatorProcess) -> u64 {
    let body = op.admin_get("/metrics").unwrap();
    body.lines()
        .find(|l| l.starts_with("mycel_operator_reconciles_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn an_installation_becomes_ready_and_an_idle_reconcile_writes_nothing() {
    let s = setup("install").await;
    let rev = revision_for(&s.ns.name);
    let started = Instant::now();
    // While its pods cannot be created (a quota of zero pods), the revision is rolling out:
    // Ready=False, and kstatus (Flux) says InProgress. Deterministic, unlike racing a fast kwok.
    let quota =
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: no-pods}\nspec: {hard: {pods: \"0\"}}\n";
    s.cluster.kubectl_run(&["apply", "-n", &s.ns.name, "-f", "-"], Some(quota)).unwrap();
    create_mi(&s.mis, "mesh", json!({"revision": rev, "profile": "default"})).await;
    let (pending, _) = wait_for(&s, "mesh", Duration::from_secs(60), |o| {
        condition(o, "Ready").is_some_and(|c| c.1 == "ControlPlaneNotReady")
            && o.data["status"]["observedGeneration"].as_i64() == o.metadata.generation
    })
    .await;
    assert_eq!(kstatus::compute(&serde_json::to_value(&pending).unwrap()), KStatus::InProgress);
    let message = condition(&pending, "Ready").unwrap().2;
    assert!(message.contains("control plane") && message.contains("replicas available"), "{message}");
    s.cluster.kubectl_run(&["delete", "-n", &s.ns.name, "resourcequota/no-pods"], None).unwrap();
    let (mi, seen) = wait_for(&s, "mesh", Duration::from_secs(90), is_ready).await;
    eprintln!("install reached Ready in {:.1}s; kstatus seen: {seen:?}", started.elapsed().as_secs_f64());
    assert_eq!(seen.last(), Some(&KStatus::Current));
    let st = &mi.data["status"];
    assert_eq!(st["revision"], rev.as_str());
    assert_eq!(st["version"], format!("v{}", env!("CARGO_PKG_VERSION")));
    for c in ["controlPlane", "webhooks"] {
        assert_eq!(st["components"][c]["ready"], true, "{c}: {st:#}");
    }
    assert_eq!(condition(&mi, "Degraded").unwrap().0, "False");

    // Every object of the revision is there, with the CA bundle in both webhooks.
    let versions = managed_versions(&s.client, &s.ns.name, "mesh").await;
    let cp = format!("mycel-control-plane-{rev}");
    for want in [
        format!("ServiceAccount/{cp}"),
        format!("Deployment/{cp}"),
        format!("Service/{cp}"),
        format!("Role/{cp}"),
        format!("RoleBinding/{cp}"),
        format!("ConfigMap/mycel-mesh-{rev}"),
        format!("Secret/mycel-webhook-tls-{rev}"),
        format!("ClusterRole/mycel-control-plane-{}-{rev}", s.ns.name),
        format!("ClusterRoleBinding/mycel-control-plane-{}-{rev}", s.ns.name),
        format!("MutatingWebhookConfiguration/mycel-sidecar-injector-{}-{rev}", s.ns.name),
        format!("ValidatingWebhookConfiguration/mycel-validator-{}-{rev}", s.ns.name),
    ] {
        assert!(versions.contains_key(&want), "{want} missing; have {versions:?}");
    }
    let hooks: Api<DynamicObject> = Api::all_with(
        s.client.clone(),
        &ar("admissionregistration.k8s.io", "MutatingWebhookConfiguration", "mutatingwebhookconfigurations"),
    );
    let hook = hooks.get(&format!("mycel-sidecar-injector-{}-{rev}", s.ns.name)).await.unwrap();
    let w = &hook.data["webhooks"][0];
    assert_eq!(
        w["namespaceSelector"]["matchExpressions"][0]["values"][0],
        rev.as_str(),
        "selects mycel.io/rev={rev}"
    );
    assert!(w["clientConfig"]["caBundle"].as_str().is_some_and(|b| b.len() > 100));
    let ca: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), &s.ns.name, &ar("", "Secret", "secrets"));
    assert!(ca.get_opt("mycel-ca").await.unwrap().is_some(), "root CA generated");

    // An idle reconcile (triggered by an annotation nobody reconciles on) writes nothing.
    let before_count = reconcile_count(&s.operator);
    let touched = s
        .mis
        .patch(
            "mesh",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/touch": "1"}}})),
        )
        .await
        .unwrap();
    eventually("the touch triggers a reconcile", Duration::from_secs(30), || async {
        (reconcile_count(&s.operator) > before_count).then_some(()).ok_or("no reconcile counted".to_string())
    })
    .await;
    // The count goes up once the reconcile's writes, if any, are done.
    let after = managed_versions(&s.client, &s.ns.name, "mesh").await;
    let changed: Vec<_> =
        after.iter().filter(|(k, v)| versions.get(*k) != Some(v)).map(|(k, _)| k.clone()).collect();
    assert!(changed.is_empty(), "an idle reconcile wrote {changed:?}");
    let mi_now = s.mis.get("mesh").await.unwrap();
    assert_eq!(mi_now.resource_version(), touched.resource_version(), "status not rewritten");
    eprintln!("idle reconcile: 0 writes to {} objects", after.len());

    // Metrics and health are served.
    assert!(s.operator.admin_get("/healthz").unwrap().starts_with("HTTP/1.1 200"));
    assert!(
        s.operator
            .admin_get("/metrics")
            .unwrap()
            .contains("mycel_operator_reconcile_duration_seconds_bucket")
    );
    s.finish().await;
}

#[tokio::test]
async fn drift_is_repaired_and_other_managers_fields_stay() {
    let s = setup("drift").await;
    let rev = revision_for(&s.ns.name);
    installed(&s, "mesh", json!({"revision": rev})).await;
    let cp = format!("mycel-control-plane-{rev}");
    let services: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), &s.ns.name, &ar("", "Service", "services"));
    let deployments: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), &s.ns.name, &ar("apps", "Deployment", "deployments"));
    let hooks: Api<DynamicObject> = Api::all_with(
        s.client.clone(),
        &ar(
            "admissionregistration.k8s.io",
            "ValidatingWebhookConfiguration",
            "validatingwebhookconfigurations",
        ),
    );
    let hook_name = format!("mycel-validator-{}-{rev}", s.ns.name);

    // Someone else's annotation on the Deployment, via their own field manager.
    deployments
        .patch(
            &cp,
            &PatchParams::apply("someone-else"),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": cp, "annotations": {"example.com/owner": "team-a"}}
            })),
        )
        .await
        .unwrap();
    // Drift: a deleted Service, an edited replica count, a deleted webhook configuration.
    services.delete(&cp, &DeleteParams::default()).await.unwrap();
    deployments
        .patch(&cp, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .unwrap();
    hooks.delete(&hook_name, &DeleteParams::default()).await.unwrap();

    let dep = eventually("drift repaired", Duration::from_secs(60), || async {
        let svc = services.get_opt(&cp).await.unwrap();
        let dep = deployments.get(&cp).await.unwrap();
        let hook = hooks.get_opt(&hook_name).await.unwrap();
        if svc.is_some() && dep.data["spec"]["replicas"] == 1 && hook.is_some() {
            Ok(dep)
        } else {
            Err(format!(
                "service {}, replicas {}, webhook {}\n{}",
                svc.is_some(),
                dep.data["spec"]["replicas"],
                hook.is_some(),
                s.operator.log_text()
            ))
        }
    })
    .await;
    assert_eq!(
        dep.annotations().get("example.com/owner").map(String::as_str),
        Some("team-a"),
        "other manager's field kept"
    );
    s.finish().await;
}

#[tokio::test]
async fn a_bad_ca_secret_degrades_and_leaves_the_running_revision_alone() {
    let s = setup("badca").await;
    let rev = revision_for(&s.ns.name);
    installed(&s, "mesh", json!({"revision": rev})).await;
    let before = managed_versions(&s.client, &s.ns.name, "mesh").await;

    // A CA Secret that does not exist.
    s.mis
        .patch(
            "mesh",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ca": {"secretName": "corp-ca"}}})),
        )
        .await
        .unwrap();
    let degraded = |reason: &'static str| {
        move |o: &DynamicObject| {
            condition(o, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == reason)
                && o.data["status"]["observedGeneration"].as_i64() == o.metadata.generation
        }
    };
    let (mi, seen) = wait_for(&s, "mesh", Duration::from_secs(60), degraded("CASecretNotFound")).await;
    let (status, reason, message) = condition(&mi, "Ready").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "CASecretNotFound"));
    assert!(message.contains("spec.ca.secretName") && message.contains("corp-ca"), "{message}");
    assert_eq!(seen.last(), Some(&KStatus::Failed), "kstatus: {seen:?}");
    assert_eq!(managed_versions(&s.client, &s.ns.name, "mesh").await, before, "nothing touched");

    // A malformed one.
    let secrets: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), &s.ns.name, &ar("", "Secret", "secrets"));
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "corp-ca"},
        "stringData": {"tls.crt": "not a certificate", "tls.key": "nor a key"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &bad).await.unwrap();
    s.mis
        .patch(
            "mesh",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/retry": "1"}}})),
        )
        .await
        .unwrap();
    let (mi, _) = wait_for(&s, "mesh", Duration::from_secs(60), degraded("CASecretInvalid")).await;
    let message = condition(&mi, "Degraded").unwrap().2;
    assert!(message.contains("spec.ca.secretName") && message.contains("tls.crt"), "{message}");
    assert_eq!(managed_versions(&s.client, &s.ns.name, "mesh").await, before, "nothing touched");

    // Events say what happened.
    let events = s.cluster.kubectl_run(&["get", "events", "-n", &s.ns.name, "-o", "json"], None).unwrap();
    assert!(events.contains("CASecretNotFound") && events.contains("CASecretInvalid"), "events: {events}");

    // Fixed: back to Ready.
    s.mis
        .patch(
            "mesh",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([{"op": "remove", "path": "/spec/ca"}])).unwrap(),
            ),
        )
        .await
        .unwrap();
    wait_for(&s, "mesh", Duration::from_secs(60), is_ready).await;
    s.finish().await;
}

#[tokio::test]
async fn revisions_coexist_a_second_claim_is_refused_and_deletion_cleans_up() {
    let s = setup("revs").await;
    let rev = revision_for(&s.ns.name);
    let canary = format!("{rev}c");
    installed(&s, "stable", json!({"revision": rev})).await;
    installed(&s, "canary", json!({"revision": canary})).await;

    // A third installation claiming the stable revision is refused, naming the holder.
    create_mi(&s.mis, "dup", json!({"revision": rev})).await;
    let (dup, _) = wait_for(&s, "dup", Duration::from_secs(60), |o| {
        condition(o, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "RevisionConflict")
    })
    .await;
    let msg = condition(&dup, "Degraded").unwrap().2;
    assert!(msg.contains("spec.revision") && msg.contains(&format!("{}/stable", s.ns.name)), "{msg}");
    assert!(is_ready(&s.mis.get("stable").await.unwrap()), "the holder stays Ready");
    s.mis.delete("dup", &DeleteParams::default()).await.unwrap();

    // Deleting the canary leaves the stable revision intact and nothing of the canary behind.
    let stable_before = managed_versions(&s.client, &s.ns.name, "stable").await;
    s.mis.delete("canary", &DeleteParams::default()).await.unwrap();
    eventually("the canary is gone with everything it owned", Duration::from_secs(60), || async {
        let gone = s.mis.get_opt("canary").await.unwrap().is_none();
        let leftovers = managed_versions(&s.client, &s.ns.name, "canary").await;
        if gone && leftovers.is_empty() {
            Ok(())
        } else {
            Err(format!("installation gone: {gone}, leftovers: {leftovers:?}\n{}", s.operator.log_text()))
        }
    })
    .await;
    assert_eq!(managed_versions(&s.client, &s.ns.name, "stable").await, stable_before, "stable untouched");
    assert!(is_ready(&s.mis.get("stable").await.unwrap()));
    let ca: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), &s.ns.name, &ar("", "Secret", "secrets"));
    assert!(
        ca.get_opt("mycel-ca").await.unwrap().is_some(),
        "the shared root CA survives a revision's deletion"
    );
    s.finish().await;
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_when_it_dies() {
    let mut s = setup("leader").await;
    let second = OperatorProcess::start(&s.cluster, &s.ns.name).unwrap();
    let rev = revision_for(&s.ns.name);
    installed(&s, "mesh", json!({"revision": rev})).await;

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(s.client.clone(), &s.ns.name);
    let holder = || async {
        leases.get("mycel-operator").await.ok().and_then(|l| l.spec?.holder_identity).unwrap_or_default()
    };
    let first_holder = holder().await;
    let (leader_is_first, standby_pid) = if first_holder.ends_with(&format!("-{}", s.operator.pid())) {
        (true, second.pid())
    } else {
        assert!(
            first_holder.ends_with(&format!("-{}", second.pid())),
            "holder {first_holder:?} is one of ours"
        );
        (false, s.operator.pid())
    };
    let (leader_count, standby_count) = if leader_is_first {
        (reconcile_count(&s.operator), reconcile_count(&second))
    } else {
        (reconcile_count(&second), reconcile_count(&s.operator))
    };
    assert!(leader_count > 0, "the leader reconciled");
    assert_eq!(standby_count, 0, "the standby did not reconcile while the leader lived");

    // Crash the leader (no release), then cause drift: the standby must repair it.
    let mut second = second;
    if leader_is_first {
        s.operator.crash();
    } else {
        second.crash();
    }
    let killed = Instant::now();
    let services: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), &s.ns.name, &ar("", "Service", "services"));
    let cp = format!("mycel-control-plane-{rev}");
    services.delete(&cp, &DeleteParams::default()).await.unwrap();
    eventually("the standby takes over and restores the Service", Duration::from_secs(60), || async {
        services.get_opt(&cp).await.unwrap().map(|_| ()).ok_or("Service still missing".to_string())
    })
    .await;
    eprintln!(
        "failover: the standby repaired drift {:.1}s after the leader died (lease 4s)",
        killed.elapsed().as_secs_f64()
    );
    assert!(holder().await.ends_with(&format!("-{standby_pid}")), "the lease moved to the standby");
    drop(second);
    s.finish().await;
}

#[tokio::test]
async fn a_leader_shutting_down_hands_over_at_once() {
    let mut s = setup("handover").await;
    // A long lease: a standby could only take over this fast if the leader released it.
    let slow = ["--lease-duration-secs", "30", "--lease-renew-secs", "1"];
    drop(std::mem::replace(
        &mut s.operator,
        OperatorProcess::start_with(&s.cluster, &s.ns.name, &slow).unwrap(),
    ));
    // Which of the two leads is read from the Lease below, whichever started first.
    let mut standby = OperatorProcess::start_with(&s.cluster, &s.ns.name, &slow).unwrap();
    let rev = revision_for(&s.ns.name);
    installed(&s, "mesh", json!({"revision": rev})).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(s.client.clone(), &s.ns.name);
    let holder = || async {
        leases.get("mycel-operator").await.ok().and_then(|l| l.spec?.holder_identity).unwrap_or_default()
    };
    // The operator setup() started was killed, not stopped: its lease runs out first.
    let live = [s.operator.pid(), standby.pid()];
    let current = eventually("one of the two operators leads", Duration::from_secs(15), || async {
        let h = holder().await;
        live.iter().any(|p| h.ends_with(&format!("-{p}"))).then_some(h.clone()).ok_or(h)
    })
    .await;
    let (leader, other) = if current.ends_with(&format!("-{}", s.operator.pid())) {
        (&mut s.operator, &mut standby)
    } else {
        (&mut standby, &mut s.operator)
    };
    let other_pid = other.pid();
    assert!(leader.terminate(), "the leader exits cleanly on SIGTERM:\n{}", leader.log_text());
    let stopped = Instant::now();
    eventually("the standby holds the lease", Duration::from_secs(10), || async {
        let h = holder().await;
        h.ends_with(&format!("-{other_pid}")).then_some(()).ok_or(h)
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("hand-over after SIGTERM: {:.1}s (lease 30s)", took.as_secs_f64());
    assert!(took < Duration::from_secs(10), "released, not expired");
    drop(standby);
    s.finish().await;
}

#[tokio::test]
async fn a_version_change_rolls_the_control_plane_without_losing_availability() {
    let s = setup("rollout").await;
    let rev = revision_for(&s.ns.name);
    installed(&s, "mesh", json!({"revision": rev, "controlPlane": {"replicas": 2}})).await;
    let cp = format!("mycel-control-plane-{rev}");
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(s.client.clone(), &s.ns.name);
    // Watch availability while the new version rolls out.
    let watch_deps = deployments.clone();
    let cp_name = cp.clone();
    let min_available = tokio::spawn(async move {
        let mut min = i32::MAX;
        let cfg = watcher::Config::default().fields(&format!("metadata.name={cp_name}"));
        let mut stream = watcher(watch_deps, cfg).applied_objects().boxed();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, stream.next()).await {
            let st = d.status.clone().unwrap_or_default();
            min = min.min(st.available_replicas.unwrap_or(0));
            let image =
                d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|p| p.containers[0].image.clone());
            let done = image.flatten().is_some_and(|i| i.ends_with(":v9.9.9"))
                && st.updated_replicas == Some(2)
                && st.available_replicas == Some(2)
                && st.replicas == Some(2)
                && st.observed_generation == d.metadata.generation;
            if done {
                break;
            }
        }
        min
    });
    s.mis
        .patch("mesh", &PatchParams::default(), &Patch::Merge(json!({"spec": {"version": "v9.9.9"}})))
        .await
        .unwrap();
    let (mi, _) = wait_for(&s, "mesh", Duration::from_secs(90), |o| {
        is_ready(o) && o.data["status"]["version"] == "v9.9.9"
    })
    .await;
    assert_eq!(mi.data["status"]["version"], "v9.9.9");
    let min = min_available.await.unwrap();
    assert_eq!(min, 2, "the old pods kept serving until new ones were ready (maxUnavailable 0)");
    let d = deployments.get(&cp).await.unwrap();
    let image = d.spec.unwrap().template.spec.unwrap().containers[0].image.clone().unwrap();
    assert_eq!(image, "docker.io/mycel/operator:v9.9.9");
    s.finish().await;
}
