//! The real node of the local cluster: containerd (CRI) with runc, the kubelet, kube-proxy in
//! iptables mode, pod networking on a bridge of our own, and CoreDNS as a Deployment.
//!
//! Everything it creates is named so that `teardown` can find it again after a crash: the
//! bridge `mycel0`, the iptables chain `MYCEL-GUARD`, kube-proxy's chains, the state directory,
//! mounts below it, containers in containerd, and the `kubepods` cgroups. Pod traffic never
//! leaves the machine: `MYCEL-GUARD` drops anything forwarded from the bridge to elsewhere, and
//! there is no masquerading.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::Error;

pub const NODE_NAME: &str = "mycel-node-0";
pub const BRIDGE: &str = "mycel0";
/// The node's address on the bridge: also where the API server listens and advertises itself.
pub const NODE_IP: &str = "10.200.0.1";
pub const POD_CIDR: &str = "10.200.0.0/24";
pub const DNS_SERVICE_IP: &str = "10.96.0.10";
const GUARD_CHAIN: &str = "MYCEL-GUARD";

fn run(cmd: &str, args: &[&str]) -> Result<(), Error> {
    let out = Command::new(cmd).args(args).output().map_err(Error::io(cmd))?;
    if !out.status.success() {
        return Err(Error::Command(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn quiet(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The bridge with the node address, forwarding, and the guard against traffic leaving.
pub fn setup_network(service_cidr: &str) -> Result<(), Error> {
    if !quiet("ip", &["link", "show", BRIDGE]) {
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    }
    if !quiet("ip", &["addr", "replace", &format!("{NODE_IP}/24"), "dev", BRIDGE]) {
        return Err(Error::Command(format!("cannot address {BRIDGE}: the real node needs root")));
    }
    run("ip", &["link", "set", BRIDGE, "up"])?;
    // Service addresses stay on this machine: routed to the bridge, where kube-proxy's DNAT
    // turns them into pod addresses, and unanswered otherwise.
    run("ip", &["route", "replace", service_cidr, "dev", BRIDGE])?;
    for (key, value) in [("net/ipv4/ip_forward", "1"), ("net/bridge/bridge-nf-call-iptables", "1")] {
        let path = format!("/proc/sys/{key}");
        fs::write(&path, value).map_err(Error::io(&path))?;
    }
    if !quiet("iptables", &["-w", "-N", GUARD_CHAIN]) {
        run("iptables", &["-w", "-F", GUARD_CHAIN])?;
    }
    run("iptables", &["-w", "-A", GUARD_CHAIN, "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP"])?;
    if !quiet("iptables", &["-w", "-C", "FORWARD", "-j", GUARD_CHAIN]) {
        run("iptables", &["-w", "-I", "FORWARD", "1", "-j", GUARD_CHAIN])?;
    }
    Ok(())
}

/// containerd's configuration: its own root, state and socket under `dir`, the CRI plugin with
/// the settings this VM needs (`restrict_oom_score_adj`: lowering oom_score_adj is denied here).
pub fn containerd_config(dir: &Path, cni_conf_dir: &Path, pause_image: &str) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  # Pod network namespaces live under our state directory, so tear-down finds them.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = containerd_socket(dir).display(),
        cni = cni_conf_dir.display(),
    )
}

pub fn containerd_socket(dir: &Path) -> PathBuf {
    dir.join("containerd.sock")
}

/// Bridge + host-local + portmap; no masquerading (pod traffic stays on this machine).
pub fn cni_conflist(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "mycel",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP, "rangeStart": "10.200.0.10"}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
    .to_string()
}

pub struct KubeletPaths<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    pub containerd_socket: &'a Path,
    pub resolv_conf: &'a Path,
}

/// The kubelet's configuration for this machine's cgroup v1 layout (`failCgroupV1: false`,
/// `cgroupfs`), with webhook authn/authz so that logs and exec go through the API server.
pub fn kubelet_config(p: &KubeletPaths, port: u16, healthz_port: u16) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: Webhook}}
tlsCertFile: "{cert}"
tlsPrivateKeyFile: "{key}"
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: "unix://{sock}"
clusterDNS: [{DNS_SERVICE_IP}]
clusterDomain: cluster.local
resolvConf: "{resolv}"
registerNode: true
serializeImagePulls: false
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
shutdownGracePeriod: 0s
"#,
        ca = p.ca.display(),
        cert = p.cert.display(),
        key = p.key.display(),
        sock = p.containerd_socket.display(),
        resolv = p.resolv_conf.display(),
    )
}

pub fn kube_proxy_config(kubeconfig: &Path, healthz_port: u16, metrics_port: u16) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: "{kc}"
hostnameOverride: {NODE_NAME}
bindAddress: {NODE_IP}
healthzBindAddress: 127.0.0.1:{healthz_port}
metricsBindAddress: 127.0.0.1:{metrics_port}
clusterCIDR: {POD_CIDR}
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kc = kubeconfig.display()
    )
}

/// CoreDNS for `cluster.local` only (there is no upstream to forward to), as a Deployment with
/// its Service at the cluster DNS address.
pub fn coredns_manifest(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: coredns, namespace: kube-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:coredns"}}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects: [{{kind: ServiceAccount, name: coredns, namespace: kube-system}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: coredns, namespace: kube-system}}
data:
  Corefile: |
    .:53 {{
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }}
        cache 5
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{k8s-app: kube-dns}}}}
  template:
    metadata: {{labels: {{k8s-app: kube-dns}}}}
    spec:
      serviceAccountName: coredns
      nodeSelector: {{kubernetes.io/hostname: {NODE_NAME}}}
      dnsPolicy: Default
      containers:
      - name: coredns
        image: {image}
        imagePullPolicy: IfNotPresent
        args: ["-conf", "/etc/coredns/Corefile"]
        ports:
        - {{name: dns, containerPort: 53, protocol: UDP}}
        - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
        readinessProbe: {{httpGet: {{path: /ready, port: 8181}}, periodSeconds: 2}}
        livenessProbe: {{httpGet: {{path: /health, port: 8080}}}}
        volumeMounts: [{{name: config, mountPath: /etc/coredns}}]
      volumes: [{{name: config, configMap: {{name: coredns}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  clusterIP: {DNS_SERVICE_IP}
  selector: {{k8s-app: kube-dns}}
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
"#
    )
}

/// Kills and deletes every container through containerd, if it still answers (containers hold
/// mounts, cgroups and veths; containerd releases them properly).
pub fn remove_containers(state: &Path) {
    let sock = containerd_socket(&state.join("node").join("containerd"));
    if !sock.exists() {
        return;
    }
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            .args(["--timeout", "10s", "-n", "k8s.io"])
            .args(args)
            .output()
    };
    let Ok(out) = ctr(&["containers", "list", "-q"]) else { return };
    for id in String::from_utf8_lossy(&out.stdout).lines() {
        let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        let _ = ctr(&["tasks", "delete", "-f", id]);
        let _ = ctr(&["containers", "delete", id]);
    }
}

/// Removes what the node created, whatever state it was left in. Best effort: every step runs
/// even if an earlier one fails. `state` is the cluster's state directory.
pub fn teardown(state: &Path, bin_dir: &Path, service_cidr: &str) {
    let dir = state.join("node");
    // Leftover shims and container processes of ours (their command line names our state dir).
    kill_matching(&dir.display().to_string());
    // kube-proxy's iptables chains.
    let _ = Command::new(bin_dir.join("kube-proxy"))
        .args(["--cleanup"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // What remains of KUBE-* chains is the kubelet's (KUBE-FIREWALL, KUBE-KUBELET-CANARY, …).
    for tool in ["iptables", "ip6tables"] {
        remove_kube_chains(tool);
    }
    // Our guard, the service route, the bridge (and with it the pods' veths).
    while quiet("iptables", &["-w", "-D", "FORWARD", "-j", GUARD_CHAIN]) {}
    quiet("iptables", &["-w", "-F", GUARD_CHAIN]);
    quiet("iptables", &["-w", "-X", GUARD_CHAIN]);
    quiet("ip", &["route", "del", service_cidr, "dev", BRIDGE]);
    quiet("ip", &["link", "del", BRIDGE]);
    // Mounts below the state directory (pod volumes, overlay rootfs, netns), deepest first.
    unmount_below(state);
    // The kubelet's cgroups.
    remove_cgroups("kubepods");
    // Network namespaces the CNI left behind are files under containerd's state: gone with it.
}

/// Deletes the rules that jump to `KUBE-*` chains and then the chains, in every table.
fn remove_kube_chains(tool: &str) {
    for table in ["filter", "nat", "mangle"] {
        let Ok(out) = Command::new(tool).args(["-w", "-t", table, "-S"]).output() else { continue };
        let rules = String::from_utf8_lossy(&out.stdout).into_owned();
        for rule in rules.lines().filter(|l| l.starts_with("-A ") && l.contains(" -j KUBE-")) {
            let parts: Vec<&str> = rule.split_whitespace().collect();
            // `-A CHAIN spec…` → `-D CHAIN spec…` (comments with spaces are quoted; skip those).
            if rule.contains('"') {
                continue;
            }
            let mut args = vec!["-w", "-t", table, "-D"];
            args.extend(&parts[1..]);
            quiet(tool, &args);
        }
        let chains: Vec<&str> =
            rules.lines().filter_map(|l| l.strip_prefix("-N ")).filter(|c| c.starts_with("KUBE-")).collect();
        for c in &chains {
            quiet(tool, &["-w", "-t", table, "-F", c]);
        }
        for c in &chains {
            quiet(tool, &["-w", "-t", table, "-X", c]);
        }
    }
}

fn kill_matching(needle: &str) {
    let Ok(entries) = fs::read_dir("/proc") else { return };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == std::process::id() as i32 {
            continue;
        }
        let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            // SAFETY: plain syscall; the process names our state directory on its command line.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Unmounts every mount point at or below `root`, deepest first (lazily, so that busy ones go too).
pub fn unmount_below(root: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else { return };
    let root = root.display().to_string();
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(|p| p.replace("\\040", " ")))
        .filter(|p| p == &root || p.starts_with(&format!("{root}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: umount2 with a valid C string; MNT_DETACH never blocks.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Removes `/sys/fs/cgroup/<controller>/<name>` trees (children first) in every hierarchy.
fn remove_cgroups(name: &str) {
    let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") else { return };
    for c in controllers.flatten() {
        remove_cgroup_tree(&c.path().join(name));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path());
        }
    }
    // Any process still inside is killed first, or the directory cannot go.
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: plain syscall on a process confined to the kubelet's cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = fs::remove_dir(dir);
}

/// What a stopped cluster in `state` would have left behind on this machine (empty when clean):
/// processes, mounts, the bridge, routes, iptables chains, cgroups, the state directory.
pub fn leftovers(state: &Path, service_cidr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let needle = state.display().to_string();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            if pid == std::process::id() {
                continue;
            }
            if let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(&needle) {
                    found.push(format!("process {pid}: {}", cmd.chars().take(120).collect::<String>()));
                }
            }
        }
    }
    if let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") {
        for m in mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&needle) || m.starts_with("/run/netns/cni-"))
        {
            found.push(format!("mount {m}"));
        }
    }
    if quiet("ip", &["link", "show", BRIDGE]) {
        found.push(format!("bridge {BRIDGE}"));
    }
    if let Ok(out) = Command::new("ip").args(["route", "show", service_cidr]).output()
        && !out.stdout.is_empty()
    {
        found.push(format!("route {}", String::from_utf8_lossy(&out.stdout).trim()));
    }
    for tool in ["iptables-save", "ip6tables-save"] {
        if let Ok(out) = Command::new(tool).output() {
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                if l.starts_with(':') && (l.contains("KUBE-") || l.contains(GUARD_CHAIN)) {
                    found.push(format!("{tool}: chain {}", l.split_whitespace().next().unwrap_or(l)));
                }
            }
        }
    }
    if let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") {
        for c in controllers.flatten() {
            if c.path().join("kubepods").exists() {
                found.push(format!("cgroup {}", c.path().join("kubepods").display()));
            }
        }
    }
    if state.exists() {
        found.push(format!("state directory {}", state.display()));
    }
    found
}
