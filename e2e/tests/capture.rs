//! Transparent capture for real, in a network namespace this test creates: `mycel-proxy init`
//! installs the iptables rules, the proxy runs as uid 1337, and an app's outbound and inbound
//! connections go through it — except the excluded port. Needs root; skipped otherwise.

#![allow(unsafe_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use mycel_e2e::{eventually, process::workspace_binary};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// A network namespace joined to the host by a veth pair, deleted (with its processes) on drop.
struct Netns {
    name: String,
    host_ip: String,
    ns_ip: String,
    host_ip6: String,
    children: Vec<Child>,
    dir: PathBuf,
}

fn sh(cmd: &[&str]) {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(out.status.success(), "{}: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    fn create() -> Netns {
        let n = std::process::id() % 250;
        let name = format!("mycel-cap-{}", std::process::id());
        let (host_if, ns_if) = (format!("mcap{n}h"), format!("mcap{n}n"));
        let (host_ip, ns_ip) = (format!("10.201.{n}.1"), format!("10.201.{n}.2"));
        let (host_ip6, ns_ip6) = (format!("fd00:201:{n:x}::1"), format!("fd00:201:{n:x}::2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        sh(&["ip", "link", "set", &ns_if, "netns", &name]);
        sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        sh(&["ip", "-6", "addr", "add", &format!("{host_ip6}/64"), "dev", &host_if, "nodad"]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        for c in [
            vec!["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if],
            vec!["ip", "-6", "addr", "add", &format!("{ns_ip6}/64"), "dev", &ns_if, "nodad"],
            vec!["ip", "link", "set", &ns_if, "up"],
            vec!["ip", "link", "set", "lo", "up"],
        ] {
            let mut full = vec!["ip", "netns", "exec", &name];
            full.extend(c);
            sh(&full);
        }
        // Binaries in a directory every user can read: the proxy runs as uid 1337.
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        for b in ["mycel-proxy", "mycel-testapp"] {
            std::fs::copy(workspace_binary(b).unwrap(), dir.join(b)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Netns { name, host_ip, ns_ip, host_ip6, children: Vec::new(), dir }
    }

    fn bin(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    fn spawn(&mut self, args: &[&str]) {
        let log = std::fs::File::create(self.dir.join(format!("{}.log", self.children.len()))).unwrap();
        let child = self.exec(args).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
        self.children.push(child);
    }

    fn output(&self, args: &[&str]) -> (bool, String) {
        let out = self.exec(args).stderr(Stdio::piped()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_config(dir: &Path) -> String {
    let path = dir.join("proxy.yaml");
    std::fs::write(
        &path,
        "admin: 127.0.0.1:15020\nlisteners:\n\
         - {name: outbound, address: '0.0.0.0:15001', protocol: tcp, originalDestination: true}\n\
         - {name: inbound, address: '0.0.0.0:15006', protocol: tcp, originalDestination: true, direction: inbound}\n\
         - {name: outbound6, address: '[::]:15001', protocol: tcp, originalDestination: true}\n\
         - {name: inbound6, address: '[::]:15006', protocol: tcp, originalDestination: true, direction: inbound}\n",
    )
    .unwrap();
    path.display().to_string()
}

/// An HTTP responder on the host side of the veth that says who called it.
async fn host_server(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip.parse::<std::net::IpAddr>().unwrap(), 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = format!("host saw {peer}");
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

fn metric(metrics: &str, listener: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("mycel_proxy_connections_total{") && l.contains(&format!("listener=\"{listener}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

// Multi-threaded: the host-side server keeps answering while the test blocks on child processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_and_inbound_tcp_go_through_the_proxy_except_excluded_ports() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc_getuid() } != 0 {
        mycel_e2e::skip("creating network namespaces and iptables rules needs root");
        return;
    }
    let mut ns = Netns::create();
    let (proxy, app) = (ns.bin("mycel-proxy"), ns.bin("mycel-testapp"));
    let (ok, out) = ns.output(&[&proxy, "init", "--exclude-inbound-ports", "8081"]);
    assert!(ok, "init failed: {out}");
    let (_, rules) = ns.output(&["iptables-save", "-t", "nat"]);
    assert!(rules.contains("--uid-owner 1337") && rules.contains("--to-ports 15001"), "{rules}");

    let config = write_config(&ns.dir);
    ns.spawn(&[
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        &proxy,
        "run",
        "--config",
        &config,
    ]);
    ns.spawn(&[&app, "http-echo", "--port", "8080"]);
    ns.spawn(&[&app, "http-echo", "--port", "8081"]);
    let metrics_url = "http://127.0.0.1:15020/metrics";
    eventually("the proxy and apps are up", Duration::from_secs(20), || async {
        let (ok, out) = ns.output(&[&app, "get", metrics_url]);
        ok.then_some(()).ok_or(out)
    })
    .await;

    // Outbound: the app calls a server outside its namespace; the proxy carries it.
    let server = host_server(&ns.host_ip).await;
    let (ok, out) = ns.output(&[&app, "get", &format!("http://{server}/")]);
    assert!(ok, "outbound request failed: {out}");
    assert!(out.starts_with("host saw "), "{out}");
    let (_, metrics) = ns.output(&[&app, "get", metrics_url]);
    assert_eq!(metric(&metrics, "outbound"), 1, "the outbound connection went through the proxy:\n{metrics}");

    // The same over IPv6 (ip6tables rules, SO_ORIGINAL_DST for IPv6).
    let server6 = host_server(&ns.host_ip6).await;
    let (ok, out) = ns.output(&[&app, "get", &format!("http://{server6}/")]);
    assert!(ok && out.starts_with("host saw "), "IPv6 outbound request failed: {out}");
    let (_, metrics) = ns.output(&[&app, "get", metrics_url]);
    assert_eq!(metric(&metrics, "outbound6"), 1, "the IPv6 connection went through the proxy:\n{metrics}");

    // Inbound: a client outside calls the app; the proxy accepts it and the app sees loopback.
    let inbound = Command::new(&app).args(["get", &format!("http://{}:8080/", ns.ns_ip)]).output().unwrap();
    let body = String::from_utf8_lossy(&inbound.stdout);
    assert!(inbound.status.success(), "inbound request failed: {}", String::from_utf8_lossy(&inbound.stderr));
    assert!(body.contains(r#""peer":"127.0.0.1:"#), "the app was called by the proxy on loopback: {body}");
    let (_, metrics) = ns.output(&[&app, "get", metrics_url]);
    assert_eq!(metric(&metrics, "inbound"), 1, "{metrics}");

    // An excluded inbound port reaches the app directly.
    let direct = Command::new(&app).args(["get", &format!("http://{}:8081/", ns.ns_ip)]).output().unwrap();
    let body = String::from_utf8_lossy(&direct.stdout);
    assert!(body.contains(&format!(r#""peer":"{}:"#, ns.host_ip)), "port 8081 is not captured: {body}");
    let (_, metrics) = ns.output(&[&app, "get", metrics_url]);
    assert_eq!(metric(&metrics, "inbound"), 1, "still one inbound connection:\n{metrics}");
}

unsafe fn libc_getuid() -> u32 {
    unsafe extern "C" {
        fn getuid() -> u32;
    }
    unsafe { getuid() }
}
