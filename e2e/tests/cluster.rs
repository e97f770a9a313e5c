//! The local cluster harness itself: real components at the real version, pods scheduled and
//! Running on the kwok node, Deployments Available, service-account tokens that TokenReview
//! accepts, the whole install rendering and validating, and clean restarts after a crash.

#![allow(unsafe_code)]

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::Deployment,
    authentication::v1::TokenReview,
    core::v1::{Pod, ServiceAccount},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
    runtime::wait::await_condition,
};
use mycel_e2e::{
    TestCluster,
    local::{ClusterOptions, LocalCluster},
};

#[tokio::test]
async fn components_report_the_version_they_were_built_from() {
    let c = TestCluster::shared().await.unwrap();
    let v = c.client().await.unwrap().apiserver_version().await.unwrap();
    if c.local().is_some() {
        assert_eq!(v.git_version, "v1.34.4", "kube-apiserver reports its module version");
    }
    let nodes = c.kubectl_run(&["get", "nodes", "-o", "wide"], None).unwrap();
    assert!(nodes.contains("Ready"), "{nodes}");
}

#[tokio::test]
async fn a_test_that_fails_still_removes_its_namespace_and_what_its_installation_made() {
    use k8s_openapi::api::{core::v1::Namespace, rbac::v1::ClusterRole};
    let c = TestCluster::shared().await.unwrap();
    let client = c.client().await.unwrap();
    let ns = c.namespace("fails").await.unwrap();
    let name = ns.name.clone();
    // What an installation of that namespace makes outside it (its label says whose).
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("mycel-e2e-{name}"), "labels": {
            "app.kubernetes.io/managed-by": "mycel-operator",
            "mycel.io/installation-namespace": name,
        }}
    }))
    .unwrap();
    roles.create(&PostParams::default(), &role).await.unwrap();
    // A test that panics while it owns the namespace.
    let failed = tokio::spawn(async move {
        let _owned = ns;
        panic!("(this panic is the test's: a test failing before its clean-up)");
    })
    .await;
    assert!(failed.is_err());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let gone =
        namespaces.get_opt(&name).await.unwrap().is_none_or(|n| n.metadata.deletion_timestamp.is_some());
    assert!(gone, "the failed test's namespace {name} is being deleted");
    assert!(
        roles
            .get_opt(&format!("mycel-e2e-{name}"))
            .await
            .unwrap()
            .is_none_or(|r| r.metadata.deletion_timestamp.is_some()),
        "its installation's cluster role is removed"
    );
}

#[tokio::test]
async fn deployments_become_available_with_running_pods() {
    let c = TestCluster::shared().await.unwrap();
    let ns = c.fake_node_namespace("deploy").await.unwrap();
    let client = c.client().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "echo" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": "echo" } },
            "template": {
                "metadata": { "labels": { "app": "echo" } },
                "spec": {
                    "containers": [{ "name": "echo", "image": "docker.io/mycel/echo:test" }]
                }
            }
        }
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &d).await.unwrap();
    let available = |obj: Option<&Deployment>| {
        obj.and_then(|d| d.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Available" && c.status == "True"))
            && obj.and_then(|d| d.status.as_ref()).and_then(|s| s.available_replicas) == Some(3)
    };
    tokio::time::timeout(Duration::from_secs(90), await_condition(deployments.clone(), "echo", available))
        .await
        .expect("Deployment Available within 90s")
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    let list = pods.list(&ListParams::default().labels("app=echo")).await.unwrap();
    assert_eq!(list.items.len(), 3);
    for p in &list.items {
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(status.pod_ip.is_some(), "pod has an IP");
        assert!(p.spec.as_ref().unwrap().node_name.is_some(), "pod scheduled");
    }
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn service_account_tokens_pass_token_review() {
    let c = TestCluster::shared().await.unwrap();
    let ns = c.namespace("tokens").await.unwrap();
    let client = c.client().await.unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "app"}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let token =
        c.kubectl_run(&["create", "token", "app", "-n", &ns.name, "--audience=mycel-test"], None).unwrap();
    let review = |token: String| -> TokenReview {
        serde_json::from_value(serde_json::json!({
            "spec": { "token": token.trim(), "audiences": ["mycel-test"] }
        }))
        .unwrap()
    };
    let reviews: Api<TokenReview> = Api::all(client);
    let ok = reviews.create(&PostParams::default(), &review(token.clone())).await.unwrap();
    let status = ok.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(
        status.user.unwrap().username.as_deref(),
        Some(format!("system:serviceaccount:{}:app", ns.name).as_str())
    );
    // A token whose signature was tampered with is not accepted.
    // (Change a character well inside the signature: the last one may hold only padding bits.)
    let mut forged: Vec<char> = token.trim().chars().collect();
    let i = forged.len() - 10;
    forged[i] = if forged[i] == 'A' { 'Q' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    let bad = reviews.create(&PostParams::default(), &review(forged)).await.unwrap();
    assert_ne!(bad.status.unwrap().authenticated, Some(true));
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn the_whole_install_runs_the_operator_which_installs_a_mesh() {
    let c = TestCluster::shared().await.unwrap();
    c.install_crds().unwrap();
    let dir = TestCluster::repo_root().join("config/default").display().to_string();
    let rendered = c.kubectl_run(&["kustomize", &dir], None).unwrap();
    for kind in [
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
        "Deployment",
        "Namespace",
    ] {
        assert!(rendered.contains(&format!("kind: {kind}\n")), "config/default lacks a {kind}");
    }
    // The whole install applies as a user (or Argo CD / Flux) would apply it. With a real node
    // the operator runs from its image, with the RBAC of config/rbac, and installs a mesh; without
    // one its pod is placed on the kwok node (the namespace is created first with the fake-node
    // annotations — through the API, since kubectl's server-side apply would drop annotations its
    // client-side apply had set).
    let real = c.local().is_some_and(|l| l.info.real_node);
    // An install already running here (the demo's) is not this test's to replace or remove.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(c.client().await.unwrap(), "mycel-system");
    if deployments.get_opt("mycel-operator").await.ok().flatten().is_some() {
        mycel_e2e::skip(
            "config/default is already installed here (the demo?); this test would replace and then remove it",
        );
        return;
    }
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(c.client().await.unwrap());
    if !real {
        let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mycel-system", "annotations": mycel_e2e::fake_node_annotations()}}))
        .unwrap();
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating mycel-system: {e}"),
        }
    }
    let out = c.kubectl_run(&["apply", "--server-side", "--force-conflicts", "-k", &dir], None).unwrap();
    assert!(out.contains("deployment.apps/mycel-operator serverside-applied"), "{out}");
    // The mesh goes in a namespace of its own whose control-plane pods kwok fakes (the
    // control-plane command is not built yet); the operator is told to reconcile only there, so
    // that it does not meet the operators other tests run.
    let mesh_ns = c.fake_node_namespace("installed").await.unwrap();
    if real {
        c.kubectl_run(
            &[
                "set",
                "env",
                "-n",
                "mycel-system",
                "deployment/mycel-operator",
                &format!("MYCEL_WATCH_NAMESPACE={}", mesh_ns.name),
            ],
            None,
        )
        .unwrap();
    }
    c.kubectl_run(
        &["rollout", "status", "-n", "mycel-system", "--timeout=120s", "deployment/mycel-operator"],
        None,
    )
    .unwrap();
    if real {
        let rev = format!("i{}", &mesh_ns.name[mesh_ns.name.len() - 6..]).replace('-', "");
        let mi = format!(
            "apiVersion: mycel.io/v1alpha1\nkind: MeshInstallation\nmetadata: {{name: mesh, namespace: {}}}\nspec: {{revision: {rev}}}\n",
            mesh_ns.name
        );
        c.kubectl_run(&["apply", "-f", "-"], Some(&mi)).unwrap();
        let waited = c.kubectl_run(
            &[
                "wait",
                "-n",
                &mesh_ns.name,
                "--for=condition=Ready",
                "--timeout=120s",
                "meshinstallation/mesh",
            ],
            None,
        );
        let logs = c
            .kubectl_run(&["logs", "-n", "mycel-system", "deployment/mycel-operator"], None)
            .unwrap_or_default();
        waited.unwrap_or_else(|e| panic!("{e}\noperator log:\n{logs}"));
        assert!(logs.contains("became leader"), "the in-cluster operator leads:\n{logs}");
        // Deleting it goes through the in-cluster operator's finalizer.
        c.kubectl_run(&["delete", "-n", &mesh_ns.name, "meshinstallation/mesh", "--timeout=60s"], None)
            .unwrap();
        let hooks = c.kubectl_run(&["get", "mutatingwebhookconfigurations", "-o", "name"], None).unwrap();
        assert!(!hooks.contains(&mesh_ns.name), "cluster-scoped objects removed: {hooks}");
    }
    mesh_ns.delete().await.unwrap();
    // Remove what this test installed except the CRDs, which other tests share.
    for sub in ["config/operator", "config/rbac"] {
        let d = TestCluster::repo_root().join(sub).display().to_string();
        c.kubectl_run(&["delete", "--ignore-not-found", "--wait=false", "-k", &d], None).unwrap();
    }
}

/// A start after a crash (here: the API server killed) stops the leftovers and comes up clean;
/// `down` leaves no process and no state behind.
#[tokio::test]
async fn a_crashed_cluster_is_replaced_and_down_leaves_nothing() {
    if TestCluster::shared().await.unwrap().local().is_none() {
        mycel_e2e::skip("only meaningful for the local harness");
        return;
    }
    let dir = std::env::temp_dir().join(format!("mycel-crash-test-{}", std::process::id()));
    // A second cluster on the machine: loopback only, the real node belongs to the shared one.
    let no_node = ClusterOptions { real_node: false };
    let d = dir.clone();
    let first = tokio::task::spawn_blocking(move || LocalCluster::ensure_up_with(&d, no_node))
        .await
        .unwrap()
        .unwrap();
    let pids_of = |dir: &std::path::Path| -> Vec<i32> {
        std::fs::read_to_string(dir.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' ')?.1.trim().parse().ok())
            .collect()
    };
    let before = pids_of(&dir);
    assert_eq!(before.len(), 5, "etcd, apiserver, controller-manager, scheduler, kwok");
    let apiserver = before[1];
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(apiserver, libc::SIGKILL) };
    let d = dir.clone();
    let second = tokio::task::spawn_blocking(move || LocalCluster::ensure_up_with(&d, no_node))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(first.info.api_port, second.info.api_port, "a new cluster, not the broken one");
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
            .unwrap_or(false)
    };
    for pid in &before {
        assert!(!alive(*pid), "leftover process {pid} of the crashed cluster still runs");
    }
    let after = pids_of(&dir);
    let d = dir.clone();
    tokio::task::spawn_blocking(move || LocalCluster::down(&d)).await.unwrap().unwrap();
    for pid in &after {
        assert!(!alive(*pid), "process {pid} survived `down`");
    }
    assert!(!dir.exists(), "state directory removed");
}
