//! The local Kubernetes harness and helpers for Mycel's end-to-end tests.
//!
//! [`local::LocalCluster`] assembles a real cluster from real parts (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok) built from their Go modules and cached.
//! [`TestCluster`] is what a test holds: the shared local cluster, or any existing cluster named
//! by `MYCEL_E2E_KUBECONFIG` (kind, a cloud cluster), so one suite runs against either. This crate
//! must not contain product logic: it only starts, reaches and inspects clusters.

// The harness signals, locks and unmounts what it started: libc calls, each with its SAFETY note.
#![allow(unsafe_code)]

pub mod binaries;
pub mod images;
pub mod kstatus;
pub mod local;
pub mod mesh;
pub mod node;
pub mod pki;
pub mod process;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// GET `path` on `port` of a pod, through `kubectl port-forward`'s API (the request reaches the
/// pod on its loopback, where the proxy's and control plane's state endpoints answer).
pub async fn port_forward_get(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> Result<(u16, String), Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let mut pf = pods.portforward(pod, &[port]).await?;
    let mut stream = pf
        .take_stream(port)
        .ok_or_else(|| Error::Command(format!("port-forward to {namespace}/{pod}:{port} gave no stream")))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(Error::io(format!("{pod}:{port}")))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.map_err(Error::io(format!("{pod}:{port}")))?;
    drop(stream);
    let _ = pf.join().await;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Records that the calling test cannot run here and returns, so the caller returns early: the
/// README's test command counts it as skipped (not passed), from the lines this appends to
/// `$MYCEL_SKIPPED_LOG`. Under `CI=true` a skipped end-to-end test is a failure: it panics.
pub fn skip(why: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} cannot run here, and under CI a skipped end-to-end test fails: {why}");
    }
    eprintln!("skipping {test}: {why}");
    if let Some(path) = std::env::var_os("MYCEL_SKIPPED_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("certificate generation failed: {0}")]
    Pki(String),
    #[error("{0}")]
    Command(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Maps an I/O error to one that names the path it concerned.
    pub fn io(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.as_ref().display().to_string();
        move |source| Error::Io { path, source }
    }
}

/// A cluster for tests: the shared local cluster, or an existing one.
#[derive(Clone, Debug)]
pub struct TestCluster {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    local: Option<local::LocalCluster>,
}

impl TestCluster {
    /// The cluster named by `MYCEL_E2E_KUBECONFIG` if set, else the shared local cluster
    /// (started on first use, reused after).
    pub async fn shared() -> Result<TestCluster, Error> {
        if let Some(path) = std::env::var_os("MYCEL_E2E_KUBECONFIG") {
            return Ok(TestCluster { kubeconfig: path.into(), kubectl: "kubectl".into(), local: None });
        }
        let state = local::LocalCluster::default_state_dir();
        let c = tokio::task::spawn_blocking(move || local::LocalCluster::ensure_up(&state))
            .await
            .map_err(|e| Error::Command(format!("cluster start panicked: {e}")))??;
        Ok(TestCluster { kubeconfig: c.kubeconfig(), kubectl: c.bin_dir().join("kubectl"), local: Some(c) })
    }

    /// The local cluster behind this handle, if it is one.
    pub fn local(&self) -> Option<&local::LocalCluster> {
        self.local.as_ref()
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A new client (one per test: clients hold connections tied to the test's runtime).
    pub async fn client(&self) -> Result<Client, Error> {
        let kc = Kubeconfig::read_from(&self.kubeconfig).map_err(|e| Error::Kubeconfig {
            path: self.kubeconfig.display().to_string(),
            message: e.to_string(),
        })?;
        let config =
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(|e| {
                Error::Kubeconfig { path: self.kubeconfig.display().to_string(), message: e.to_string() }
            })?;
        Ok(Client::try_from(config)?)
    }

    /// `kubectl --kubeconfig <this cluster>`.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    /// Creates a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace, Error> {
        self.create_namespace(prefix, serde_json::json!({})).await
    }

    /// Like [`TestCluster::namespace`], but its pods go to the kwok node (through the
    /// PodNodeSelector and PodTolerationRestriction admission plugins): for tests that need many
    /// cheap "Running" pods and no real containers.
    pub async fn fake_node_namespace(&self, prefix: &str) -> Result<TestNamespace, Error> {
        self.create_namespace(prefix, fake_node_annotations()).await
    }

    async fn create_namespace(
        &self,
        prefix: &str,
        annotations: serde_json::Value,
    ) -> Result<TestNamespace, Error> {
        let client = self.client().await?;
        let name = format!("{prefix}-{}", unique_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "mycel.io/e2e": "true" }, "annotations": annotations }
        }))?;
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
        Ok(TestNamespace {
            name,
            client,
            kubectl: self.kubectl.clone(),
            kubeconfig: self.kubeconfig.clone(),
            deleted: false,
        })
    }
}

/// Namespace annotations that place every pod of the namespace on the kwok node.
pub fn fake_node_annotations() -> serde_json::Value {
    serde_json::json!({
        "scheduler.alpha.kubernetes.io/node-selector": "type=kwok",
        "scheduler.alpha.kubernetes.io/defaultTolerations":
            r#"[{"key":"kwok.x-k8s.io/node","operator":"Equal","value":"fake","effect":"NoSchedule"}]"#
    })
}

/// A namespace owned by one test; [`TestNamespace::delete`] removes it. A test that fails before
/// (a panic drops it undeleted) still removes it and what its installations made outside it, with
/// kubectl, so that a failure leaves the shared cluster as it found it; `MYCEL_E2E_KEEP_FAILED=1`
/// keeps it for inspection instead.
pub struct TestNamespace {
    pub name: String,
    client: Client,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    deleted: bool,
}

/// The cluster-scoped kinds an installation makes (`kind` as kubectl names it).
const INSTALLATION_CLUSTER_KINDS: &str =
    "mutatingwebhookconfigurations,validatingwebhookconfigurations,clusterroles,clusterrolebindings";

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted || std::env::var_os("MYCEL_E2E_KEEP_FAILED").is_some_and(|v| v == "1") {
            return;
        }
        let kubectl = |args: &[&str]| {
            std::process::Command::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .arg("--request-timeout=10s")
                .args(args)
                .stderr(std::process::Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let owned = format!("mycel.io/installation-namespace={}", self.name);
        kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
        // Finalizers only a gone operator would have removed.
        for mi in kubectl(&["get", "meshinstallations.mycel.io", "-n", &self.name, "-o", "name"]).lines() {
            kubectl(&[
                "patch",
                mi,
                "-n",
                &self.name,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ]);
        }
        kubectl(&["delete", INSTALLATION_CLUSTER_KINDS, "-l", &owned, "--wait=false"]);
        if std::thread::panicking() {
            eprintln!(
                "(the failed test's namespace {} and what its installations made were removed)",
                self.name
            );
        }
    }
}

impl TestNamespace {
    /// Removes the namespace and what installations in it left outside it, whether or not the
    /// operator that made them still runs: the cluster-scoped objects an installation of this
    /// namespace owns (labelled `mycel.io/installation-namespace=<this namespace>`, so never
    /// anything another test or a running demo made), and the finalizers that only a gone
    /// operator would have removed (they would hold the namespace in Terminating forever).
    pub async fn delete(mut self) -> Result<(), Error> {
        use kube::{
            api::{DynamicObject, ListParams, Patch, PatchParams},
            core::{ApiResource, GroupVersionKind},
        };
        let mi = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("mycel.io", "v1alpha1", "MeshInstallation"),
            "meshinstallations",
        );
        // The namespace first: an operator that still runs sees its installations go and cleans
        // up after them itself; what it cannot (it is gone) is done below.
        Api::<Namespace>::all(self.client.clone()).delete(&self.name, &DeleteParams::background()).await?;
        let mis: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &self.name, &mi);
        if let Ok(list) = mis.list(&ListParams::default()).await {
            for o in
                list.items.iter().filter(|o| o.metadata.finalizers.as_ref().is_some_and(|f| !f.is_empty()))
            {
                let name = o.metadata.name.clone().unwrap_or_default();
                let unblock = serde_json::json!({"metadata": {"finalizers": null}});
                let _ = mis.patch(&name, &PatchParams::default(), &Patch::Merge(&unblock)).await;
            }
        }
        let owned = ListParams::default().labels(&format!("mycel.io/installation-namespace={}", self.name));
        for (group, version, kind, plural) in [
            (
                "admissionregistration.k8s.io",
                "v1",
                "MutatingWebhookConfiguration",
                "mutatingwebhookconfigurations",
            ),
            (
                "admissionregistration.k8s.io",
                "v1",
                "ValidatingWebhookConfiguration",
                "validatingwebhookconfigurations",
            ),
            ("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles"),
            ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings"),
        ] {
            let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let _ = api.delete_collection(&DeleteParams::background(), &owned).await;
        }
        self.deleted = true;
        Ok(())
    }
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}{}", std::process::id() % 4096, nanos % 65536, N.fetch_add(1, Ordering::Relaxed))
}

impl TestCluster {
    /// Runs kubectl with `args` (and `stdin`, if given); returns stdout, or an error carrying
    /// stderr when kubectl fails.
    pub fn kubectl_run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Error::io(&self.kubectl))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).map_err(Error::io("kubectl stdin"))?;
        }
        let out = child.wait_with_output().map_err(Error::io(&self.kubectl))?;
        if !out.status.success() {
            return Err(Error::Command(format!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The repository root (for `config/…` paths).
    pub fn repo_root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// Applies `config/crd` server-side (idempotent), and the bundled Gateway API CRDs
    /// (`config/gateway-api`) where the cluster has none (those of another install are left as
    /// they are), and waits until every CRD is Established.
    pub fn install_crds(&self) -> Result<(), Error> {
        let gateway_api = self
            .kubectl_run(&["get", "crd", "httproutes.gateway.networking.k8s.io", "-o", "name"], None)
            .is_ok();
        let dirs: &[&str] = if gateway_api { &["config/crd"] } else { &["config/crd", "config/gateway-api"] };
        for sub in dirs {
            let dir = Self::repo_root().join(sub).display().to_string();
            self.kubectl_run(
                &["apply", "--server-side", "--force-conflicts", "--field-manager=mycel-e2e", "-k", &dir],
                None,
            )?;
        }
        let mut names: Vec<String> = mycel_crds::all_crds()
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .map(|n| format!("crd/{n}"))
            .collect();
        names.push("crd/httproutes.gateway.networking.k8s.io".into());
        names.push("crd/grpcroutes.gateway.networking.k8s.io".into());
        let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
        args.extend(names.iter().map(String::as_str));
        self.kubectl_run(&args, None)?;
        Ok(())
    }
}

/// Polls `check` every 200 ms until it returns `Ok`, and returns that value; after `timeout`
/// panics with `what` and the last `Err` it returned (which should say what is still wrong).
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) if std::time::Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}: {why}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}
