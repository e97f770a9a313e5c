//! A real Kubernetes control plane as local processes: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok (one fake node), all listening on loopback.
//!
//! The cluster lives in a state directory and outlives the process that started it, so that
//! `cargo test` runs, test binaries and `mycel-dev cluster` share one warm cluster. A lock file
//! beside the state directory serialises start and stop; a start first clears whatever an earlier,
//! crashed run left behind. Everything here is blocking: call it from `spawn_blocking`.

use std::{
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{Error, binaries, images, node, pki};

/// Name of the kwok-managed fake node.
pub const FAKE_NODE: &str = "kwok-node-0";
/// Service CIDR of the local cluster (never routed outside this machine).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Pod CIDR that kwok hands out to fake pods (no packets are ever sent to it).
pub const FAKE_POD_CIDR: &str = "10.244.250.0/24";

/// What a running local cluster recorded about itself in `cluster.json`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ClusterInfo {
    pub api_port: u16,
    /// Address the API server listens on: loopback, or the node address when there is a node.
    #[serde(default = "loopback")]
    pub api_host: String,
    /// Whether a real kubelet node is part of the cluster.
    #[serde(default)]
    pub real_node: bool,
    pub etcd_port: u16,
    pub bin_dir: PathBuf,
    pub started_at_unix: u64,
}

fn loopback() -> String {
    "127.0.0.1".into()
}

/// What kind of cluster to start.
#[derive(Clone, Copy, Debug)]
pub struct ClusterOptions {
    /// Add the real node (containerd, kubelet, kube-proxy, CoreDNS). Needs root; at most one
    /// cluster on a machine can have it.
    pub real_node: bool,
}

impl Default for ClusterOptions {
    /// The real node when running as root, unless `MYCEL_REAL_NODE=0`.
    fn default() -> Self {
        // SAFETY: getuid has no preconditions.
        let root = unsafe { libc::getuid() } == 0;
        ClusterOptions { real_node: root && std::env::var("MYCEL_REAL_NODE").as_deref() != Ok("0") }
    }
}

/// A handle on a running local cluster.
#[derive(Clone, Debug)]
pub struct LocalCluster {
    pub state_dir: PathBuf,
    pub info: ClusterInfo,
}

impl LocalCluster {
    /// `$MYCEL_CLUSTER_DIR`, else `<cache>/cluster` (cache: `$MYCEL_CACHE_DIR` or `~/.cache/mycel`).
    pub fn default_state_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("MYCEL_CLUSTER_DIR") {
            return PathBuf::from(d);
        }
        binaries::cache_dir().join("cluster")
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig")
    }

    /// The directory with kubectl and the other Kubernetes binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.info.bin_dir
    }

    /// Returns the running cluster in `state_dir`, starting one (and building the binaries on
    /// first use) if none is healthy there.
    pub fn ensure_up(state_dir: &Path) -> Result<LocalCluster, Error> {
        Self::ensure_up_with(state_dir, ClusterOptions::default())
    }

    /// [`LocalCluster::ensure_up`] with explicit options.
    pub fn ensure_up_with(state_dir: &Path, options: ClusterOptions) -> Result<LocalCluster, Error> {
        let _lock = StateLock::acquire(state_dir)?;
        if let Some(c) = Self::running(state_dir) {
            return Ok(c);
        }
        let bin_dir = binaries::ensure()?;
        clean(state_dir, &bin_dir)?;
        let started = Instant::now();
        let cluster = match start(state_dir, bin_dir.clone(), options) {
            Ok(c) => c,
            Err(e) => {
                // Leave the logs for reading but no process or network change behind.
                stop_processes(state_dir);
                if state_dir.join("node").exists() {
                    node::remove_containers(state_dir);
                    node::teardown(state_dir, &bin_dir, SERVICE_CIDR);
                }
                return Err(e);
            }
        };
        eprintln!(
            "mycel: local cluster up in {:.1}s (state {}, kubeconfig {})",
            started.elapsed().as_secs_f64(),
            state_dir.display(),
            cluster.kubeconfig().display()
        );
        Ok(cluster)
    }

    /// The cluster in `state_dir` if all its processes run and the API server is ready.
    pub fn running(state_dir: &Path) -> Option<LocalCluster> {
        let info: ClusterInfo =
            serde_json::from_slice(&fs::read(state_dir.join("cluster.json")).ok()?).ok()?;
        let procs = read_pids(state_dir);
        if procs.is_empty() || !procs.iter().all(|p| p.alive()) {
            return None;
        }
        let c = LocalCluster { state_dir: state_dir.to_path_buf(), info };
        c.api_ready().then_some(c)
    }

    /// Stops every process of the cluster in `state_dir` and removes its state.
    pub fn down(state_dir: &Path) -> Result<(), Error> {
        let _lock = StateLock::acquire(state_dir)?;
        let bin_dir = fs::read(state_dir.join("cluster.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<ClusterInfo>(&b).ok())
            .map(|i| i.bin_dir)
            .unwrap_or_default();
        clean(state_dir, &bin_dir)?;
        // The routes are machine-wide: keep them while the default cluster still runs.
        let default = Self::default_state_dir();
        if state_dir == default || Self::running(&default).is_none() {
            blackhole_routes(false, true);
        }
        Ok(())
    }

    /// A `kubectl` command bound to this cluster's admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.info.bin_dir.join("kubectl"));
        c.arg("--kubeconfig").arg(self.kubeconfig());
        c
    }

    fn api_ready(&self) -> bool {
        self.kubectl()
            .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// Stops the processes of the cluster in `state`, tears its node down (containers first, while
/// containerd still answers), and removes the state directory.
fn clean(state: &Path, bin_dir: &Path) -> Result<(), Error> {
    let has_node = state.join("node").exists();
    if has_node {
        node::remove_containers(state);
    }
    stop_processes(state);
    if has_node {
        node::teardown(state, bin_dir, SERVICE_CIDR);
    }
    if state.exists() {
        fs::remove_dir_all(state).map_err(Error::io(state))?;
    }
    Ok(())
}

fn start(state: &Path, bin_dir: PathBuf, options: ClusterOptions) -> Result<LocalCluster, Error> {
    let pki_dir = state.join("pki");
    let logs = state.join("logs");
    for d in [&pki_dir, &logs, &state.join("etcd")] {
        fs::create_dir_all(d).map_err(Error::io(d))?;
    }

    // --- certificates and kubeconfigs
    let ca = pki::Ca::generate("mycel-local-ca")?;
    pki::write(&pki_dir, "ca", &ca.pem)?;
    let api_host = if options.real_node { node::NODE_IP.to_string() } else { loopback() };
    let node_ip: IpAddr = node::NODE_IP.parse().map_err(|_| Error::Command("bad node IP".into()))?;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let service_ip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));
    let serving = ca.server(
        "kube-apiserver",
        &[
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        &[loopback, service_ip, node_ip],
    )?;
    pki::write(&pki_dir, "apiserver", &serving)?;
    let (sa_key, sa_pub) = pki::signing_key()?;
    fs::write(pki_dir.join("sa.key"), sa_key).map_err(Error::io(&pki_dir))?;
    fs::write(pki_dir.join("sa.pub"), sa_pub).map_err(Error::io(&pki_dir))?;

    let etcd_port = free_port()?;
    let etcd_peer = free_port()?;
    let api_port = free_port()?;
    let server = format!("https://{api_host}:{api_port}");
    let clients = [
        ("admin", "kubernetes-admin", vec!["system:masters"]),
        ("controller-manager", "system:kube-controller-manager", vec![]),
        ("scheduler", "system:kube-scheduler", vec![]),
        ("kwok", "kwok-controller", vec!["system:masters"]),
        ("kubelet", "system:node:mycel-node-0", vec!["system:nodes"]),
        ("kube-proxy", "system:kube-proxy", vec![]),
    ];
    for (file, user, groups) in &clients {
        let pem = ca.client(user, groups)?;
        let path = if *file == "admin" {
            state.join("kubeconfig")
        } else {
            state.join(format!("{file}.kubeconfig"))
        };
        write_kubeconfig(&path, &server, &ca.pem.cert, &pem)?;
    }

    // The API server's client identity towards kubelets (logs, exec, port-forward).
    pki::write(
        &pki_dir,
        "apiserver-kubelet-client",
        &ca.client("kube-apiserver-kubelet-client", &["system:masters"])?,
    )?;
    pki::write(
        &pki_dir,
        "kubelet-serving",
        &ca.server(node::NODE_NAME, &[node::NODE_NAME, "localhost"], &[node_ip, loopback])?,
    )?;

    let info = ClusterInfo {
        api_port,
        api_host: api_host.clone(),
        real_node: options.real_node,
        etcd_port,
        bin_dir: bin_dir.clone(),
        started_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let cluster = LocalCluster { state_dir: state.to_path_buf(), info };
    let p = |name: &str| pki_dir.join(name).display().to_string();
    let s = |name: &str| state.join(name).display().to_string();

    // No packet for the cluster's virtual ranges may leave this machine: the default route would
    // otherwise carry them out (e.g. the API server calling a webhook whose pod kwok faked).
    blackhole_routes(true, !options.real_node);
    if options.real_node {
        node::setup_network(SERVICE_CIDR)?;
    }

    // --- etcd
    let mut etcd = spawn(
        state,
        "etcd",
        &bin_dir.join("etcd"),
        &[
            "--name=mycel-local".into(),
            format!("--data-dir={}", s("etcd")),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-cluster=mycel-local=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync=true".into(),
            "--quota-backend-bytes=4294967296".into(),
            "--log-level=warn".into(),
        ],
    )?;
    wait_for_proc(state, "etcd", &mut etcd, Duration::from_secs(30), || port_open("127.0.0.1", etcd_port))?;

    // --- kube-apiserver
    let mut apiserver = spawn(
        state,
        "kube-apiserver",
        &bin_dir.join("kube-apiserver"),
        &[
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            format!("--bind-address={api_host}"),
            format!("--advertise-address={api_host}"),
            format!("--kubelet-client-certificate={}", p("apiserver-kubelet-client.crt")),
            format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
            "--kubelet-preferred-address-types=InternalIP".into(),
            // Namespaces can pin their pods to a kind of node (tests use it for the kwok node).
            "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", s("pki")),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ],
    )?;
    wait_for_proc(state, "kube-apiserver", &mut apiserver, Duration::from_secs(90), || cluster.api_ready())?;

    // --- controller manager, scheduler, kwok
    let kcm_port = free_port()?;
    spawn(
        state,
        "kube-controller-manager",
        &bin_dir.join("kube-controller-manager"),
        &[
            format!("--kubeconfig={}", s("controller-manager.kubeconfig")),
            format!("--authentication-kubeconfig={}", s("controller-manager.kubeconfig")),
            format!("--authorization-kubeconfig={}", s("controller-manager.kubeconfig")),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            format!("--cluster-signing-cert-file={}", p("ca.crt")),
            format!("--cluster-signing-key-file={}", p("ca.key")),
            "--use-service-account-credentials=true".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--cluster-name=mycel-local".into(),
            "--leader-elect=false".into(),
            "--controllers=*".into(),
            "--v=1".into(),
        ],
    )?;
    let sched_port = free_port()?;
    spawn(
        state,
        "kube-scheduler",
        &bin_dir.join("kube-scheduler"),
        &[
            format!("--kubeconfig={}", s("scheduler.kubeconfig")),
            format!("--authentication-kubeconfig={}", s("scheduler.kubeconfig")),
            format!("--authorization-kubeconfig={}", s("scheduler.kubeconfig")),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={sched_port}"),
            "--leader-elect=false".into(),
            "--v=1".into(),
        ],
    )?;
    spawn(
        state,
        "kwok",
        &bin_dir.join("kwok"),
        &[
            format!("--kubeconfig={}", s("kwok.kubeconfig")),
            "--manage-all-nodes=false".into(),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            "--disregard-status-with-annotation-selector=kwok.x-k8s.io/status=custom".into(),
            format!("--cidr={FAKE_POD_CIDR}"),
            // Leases keep the node Ready between the (slower) status heartbeats.
            "--node-lease-duration-seconds=40".into(),
            "--node-ip=10.244.250.1".into(),
        ],
    )?;

    fs::write(state.join("cluster.json"), serde_json::to_vec_pretty(&cluster.info)?)
        .map_err(Error::io(state))?;

    // The fake node, and proof that the controllers work: the node turns Ready and the
    // service-account controller populates the default namespace.
    kubectl_apply(&cluster, &fake_node_manifest())?;
    wait_for("the kwok node to be Ready", Duration::from_secs(60), || {
        kubectl_out(
            &cluster,
            &["get", "node", FAKE_NODE, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"],
        )
        .map(|s| s == "True")
        .unwrap_or(false)
    })?;
    wait_for("the default service account", Duration::from_secs(60), || {
        kubectl_out(&cluster, &["get", "serviceaccount", "default", "-n", "default", "-o", "name"]).is_ok()
    })?;
    if options.real_node {
        start_node(state, &bin_dir, &cluster)?;
    }
    Ok(cluster)
}

/// Builds every image (base images, and those of the workspace's binaries) and imports them into
/// the node's containerd, replacing older ones of the same name.
fn load_images(state: &Path, bin_dir: &Path) -> Result<(), Error> {
    let image_dir = state.join("node/images");
    fs::create_dir_all(&image_dir).map_err(Error::io(&image_dir))?;
    let socket = node::containerd_socket(&state.join("node/containerd"));
    let mut archives = Vec::new();
    let mut specs = images::base_images(&binaries::cache_dir().join("images"), bin_dir)?;
    // Images of the workspace's own binaries: `cargo build --workspace` makes them; one that is
    // missing only leaves its image out.
    for (what, spec) in [
        ("test-app", images::testapp_image()),
        ("operator", images::operator_image()),
        ("proxy", images::proxy_image()),
        ("redis", images::redis_image()),
    ] {
        match spec {
            Ok(spec) => specs.push(spec),
            Err(e) => eprintln!("mycel: no {what} image: {e}"),
        }
    }
    for (i, spec) in specs.iter().enumerate() {
        let path = image_dir.join(format!("{i}.tar"));
        images::write_archive(spec, &path)?;
        archives.push(path);
    }
    images::import(&socket, &archives)?;
    Ok(())
}

impl LocalCluster {
    /// Re-imports the images of the workspace's binaries (after a rebuild) into the real node.
    pub fn load_images(&self) -> Result<(), Error> {
        if !self.info.real_node {
            return Err(Error::Command("this cluster has no real node to load images into".into()));
        }
        load_images(&self.state_dir, &self.info.bin_dir)
    }
}

/// containerd, images, the kubelet, kube-proxy, then CoreDNS on the node.
fn start_node(state: &Path, bin_dir: &Path, cluster: &LocalCluster) -> Result<(), Error> {
    let dir = state.join("node");
    let cd = dir.join("containerd");
    let cni = dir.join("cni/net.d");
    for d in [&cd, &cni, &dir.join("kubelet")] {
        fs::create_dir_all(d).map_err(Error::io(d))?;
    }
    let write = |path: PathBuf, content: String| fs::write(&path, content).map_err(Error::io(&path));
    write(cni.join("10-mycel.conflist"), node::cni_conflist(&dir.join("cni/ipam")))?;
    write(cd.join("config.toml"), node::containerd_config(&cd, &cni, images::PAUSE_IMAGE))?;
    let socket = node::containerd_socket(&cd);
    let mut containerd = spawn(
        state,
        "containerd",
        Path::new("containerd"),
        &["--config".into(), cd.join("config.toml").display().to_string()],
    )?;
    wait_for_proc(state, "containerd", &mut containerd, Duration::from_secs(30), || {
        socket.exists()
            && Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    })?;

    load_images(state, bin_dir)?;

    let pki_dir = state.join("pki");
    let resolv = dir.join("resolv.conf");
    // Pods with dnsPolicy Default get this: no resolver outside the cluster exists here.
    write(resolv.clone(), "options ndots:1\n".into())?;
    let (ca, cert, key) =
        (pki_dir.join("ca.crt"), pki_dir.join("kubelet-serving.crt"), pki_dir.join("kubelet-serving.key"));
    let paths = node::KubeletPaths {
        ca: &ca,
        cert: &cert,
        key: &key,
        containerd_socket: &socket,
        resolv_conf: &resolv,
    };
    write(dir.join("kubelet.yaml"), node::kubelet_config(&paths, free_port()?, free_port()?))?;
    let d = |p: &str| dir.join(p).display().to_string();
    spawn(
        state,
        "kubelet",
        &bin_dir.join("kubelet"),
        &[
            format!("--config={}", d("kubelet.yaml")),
            format!("--kubeconfig={}", state.join("kubelet.kubeconfig").display()),
            format!("--root-dir={}", d("kubelet")),
            format!("--cert-dir={}", d("kubelet/pki")),
            format!("--hostname-override={}", node::NODE_NAME),
            format!("--node-ip={}", node::NODE_IP),
            "--node-labels=mycel.io/node=real".into(),
            "--v=1".into(),
        ],
    )?;
    write(
        dir.join("kube-proxy.yaml"),
        node::kube_proxy_config(&state.join("kube-proxy.kubeconfig"), free_port()?, free_port()?),
    )?;
    spawn(
        state,
        "kube-proxy",
        &bin_dir.join("kube-proxy"),
        &[format!("--config={}", d("kube-proxy.yaml")), "--v=1".into()],
    )?;
    wait_for("the real node to be Ready", Duration::from_secs(120), || {
        kubectl_out(
            cluster,
            &[
                "get",
                "node",
                node::NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ],
        )
        .map(|s| s == "True")
        .unwrap_or(false)
    })?;
    kubectl_apply(cluster, &node::coredns_manifest(&images::coredns_image()))?;
    wait_for("CoreDNS to be Available", Duration::from_secs(120), || {
        kubectl_out(
            cluster,
            &[
                "get",
                "deployment",
                "coredns",
                "-n",
                "kube-system",
                "-o",
                "jsonpath={.status.availableReplicas}",
            ],
        )
        .map(|s| s == "1")
        .unwrap_or(false)
    })
}

fn fake_node_manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata:
  name: {FAKE_NODE}
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: {FAKE_NODE}
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    node-role.kubernetes.io/agent: ""
    type: kwok
spec:
  # Only pods that ask for a fake node land here (see TestCluster::fake_node_namespace).
  taints:
  - {{key: kwok.x-k8s.io/node, value: fake, effect: NoSchedule}}
"#
    )
}

fn write_kubeconfig(path: &Path, server: &str, ca: &str, client: &pki::Pem) -> Result<(), Error> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let doc = format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: mycel-local
  cluster:
    server: {server}
    certificate-authority-data: {}
users:
- name: mycel-local
  user:
    client-certificate-data: {}
    client-key-data: {}
contexts:
- name: mycel-local
  context:
    cluster: mycel-local
    user: mycel-local
current-context: mycel-local
"#,
        b64(ca),
        b64(&client.cert),
        b64(&client.key)
    );
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(path))?;
    f.write_all(doc.as_bytes()).map_err(Error::io(path))
}

fn kubectl_apply(c: &LocalCluster, manifest: &str) -> Result<(), Error> {
    let mut child = c
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io("kubectl"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(manifest.as_bytes()).map_err(Error::io("kubectl stdin"))?;
    }
    let out = child.wait_with_output().map_err(Error::io("kubectl"))?;
    if !out.status.success() {
        return Err(Error::Command(format!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn kubectl_out(c: &LocalCluster, args: &[&str]) -> Result<String, Error> {
    let out = c.kubectl().args(args).output().map_err(Error::io("kubectl"))?;
    if !out.status.success() {
        return Err(Error::Command(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(Error::io("127.0.0.1:0"))?;
    Ok(l.local_addr().map_err(Error::io("127.0.0.1:0"))?.port())
}

fn port_open(host: &str, port: u16) -> bool {
    let Ok(ip) = host.parse::<IpAddr>() else { return false };
    std::net::TcpStream::connect_timeout(&std::net::SocketAddr::from((ip, port)), Duration::from_millis(200))
        .is_ok()
}

/// Like [`wait_for`], but gives up at once when the process `name` has exited, and puts the end
/// of its log into the error.
fn wait_for_proc(
    state: &Path,
    name: &str,
    child: &mut Child,
    timeout: Duration,
    mut ok: impl FnMut() -> bool,
) -> Result<(), Error> {
    let mut exited = None;
    let r = wait_for(name, timeout, || {
        if ok() {
            return true;
        }
        exited = child.try_wait().ok().flatten();
        exited.is_some()
    });
    if r.is_ok() && exited.is_none() {
        return Ok(());
    }
    let log = fs::read_to_string(state.join("logs").join(format!("{name}.log"))).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
    Err(Error::Command(format!(
        "{name} {} (log {}):\n{}",
        match exited {
            Some(status) => format!("exited ({status})"),
            None => "did not become ready".to_string(),
        },
        state.join("logs").join(format!("{name}.log")).display(),
        tail.join("\n")
    )))
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!("{what} (after {}s)", timeout.as_secs())));
        }
        sleep(Duration::from_millis(200));
    }
}

// --- processes -------------------------------------------------------------------------------

struct Proc {
    name: String,
    pid: i32,
}

impl Proc {
    /// Alive and still the program we started (pids are recycled).
    fn alive(&self) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{}/cmdline", self.pid)) else {
            return false;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        // A zombie (state Z) has exited; only its parent has not reaped it yet.
        let zombie = stat.rsplit(')').next().map(|r| r.trim_start().starts_with('Z')).unwrap_or(true);
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        !zombie && String::from_utf8_lossy(argv0).ends_with(&self.name)
    }
}

fn spawn(state: &Path, name: &str, bin: &Path, args: &[String]) -> Result<Child, Error> {
    let log_path = state.join("logs").join(format!("{name}.log"));
    let log = fs::File::create(&log_path).map_err(Error::io(&log_path))?;
    let err = log.try_clone().map_err(Error::io(&log_path))?;
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Own process group: the cluster outlives the test process and ignores its Ctrl-C.
        .process_group(0)
        .spawn()
        .map_err(Error::io(bin))?;
    let mut pids = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("pids"))
        .map_err(Error::io(state))?;
    writeln!(pids, "{name} {}", child.id()).map_err(Error::io(state))?;
    Ok(child)
}

fn read_pids(state: &Path) -> Vec<Proc> {
    fs::read_to_string(state.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (name, pid) = l.split_once(' ')?;
            Some(Proc { name: name.to_string(), pid: pid.trim().parse().ok()? })
        })
        .collect()
}

/// SIGTERM to every recorded process (newest first), SIGKILL to those still there after 10 s.
fn stop_processes(state: &Path) {
    let procs: Vec<Proc> = read_pids(state).into_iter().rev().filter(|p| p.alive()).collect();
    for p in &procs {
        // SAFETY: plain syscall on a pid we verified belongs to our program.
        unsafe { libc::kill(p.pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while procs.iter().any(|p| p.alive()) && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
    }
    for p in procs.iter().filter(|p| p.alive()) {
        // SAFETY: as above.
        unsafe { libc::kill(p.pid, libc::SIGKILL) };
    }
    let _ = fs::remove_file(state.join("pids"));
}

/// Adds (or removes) blackhole routes for the Service and fake-pod CIDRs. Needs root; without it
/// the harness still works, and says once that the safety net is missing.
fn blackhole_routes(add: bool, service_cidr_too: bool) {
    let cidrs: &[&str] = if service_cidr_too { &[SERVICE_CIDR, FAKE_POD_CIDR] } else { &[FAKE_POD_CIDR] };
    for cidr in cidrs {
        // Never replace the real node's route for the Service range (a second, loopback-only
        // cluster starting beside it would otherwise cut its Services off).
        let current = Command::new("ip")
            .args(["route", "show", "exact", cidr])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        if add && String::from_utf8_lossy(&current).contains(&format!("dev {}", node::BRIDGE)) {
            continue;
        }
        let args =
            if add { ["route", "replace", "blackhole", *cidr] } else { ["route", "del", "blackhole", *cidr] };
        let ok = Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if add && !ok {
            eprintln!(
                "mycel: could not add a blackhole route for {cidr} (not root?); traffic to it would follow the default route"
            );
        }
    }
}

/// An exclusive lock on `<state_dir>.lock`, held while a cluster is started or stopped.
struct StateLock {
    _file: fs::File,
}

impl StateLock {
    fn acquire(state_dir: &Path) -> Result<Self, Error> {
        let mut name = state_dir.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(Error::io(parent))?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io(&path))?;
        // SAFETY: flock on a file descriptor we own; released when the file is closed.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::io(&path)(std::io::Error::last_os_error()));
        }
        Ok(StateLock { _file: file })
    }
}
