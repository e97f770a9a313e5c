//! Mycel's own binaries run as local processes against a test cluster (until they run as pods
//! on the real node), stopped when the handle is dropped.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use crate::{Error, TestCluster};

/// `target/<profile>/<name>`, found from the running binary (a test binary or `mycelctl`).
/// `scripts/test` builds every binary first; so does `cargo test --workspace`, through each
/// binary's own CLI tests.
pub fn workspace_binary(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(Error::io("current_exe"))?;
    // Test binaries live in target/<profile>/deps, other binaries in target/<profile>.
    let dir =
        exe.parent().map(|d| if d.ends_with("deps") { d.parent().unwrap_or(d) } else { d }).ok_or_else(
            || Error::Command(format!("cannot locate the target directory from {}", exe.display())),
        )?;
    let bin = dir.join(name);
    if !bin.exists() {
        return Err(Error::Command(format!(
            "{} is not built; run `cargo build --workspace` (scripts/test does) first",
            bin.display()
        )));
    }
    Ok(bin)
}

/// A running `mycel-operator run`, killed on drop. Its log is kept in a file for failures.
pub struct OperatorProcess {
    child: Child,
    pub admin_port: u16,
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts the operator reconciling only `namespace` (and holding its Lease there, with a
    /// 4 s lease renewed every second, so that failover tests are quick).
    pub fn start(cluster: &TestCluster, namespace: &str) -> Result<OperatorProcess, Error> {
        Self::start_with(cluster, namespace, &["--lease-duration-secs", "4", "--lease-renew-secs", "1"])
    }

    /// Like [`OperatorProcess::start`], with extra arguments to `run`.
    pub fn start_with(
        cluster: &TestCluster,
        namespace: &str,
        extra: &[&str],
    ) -> Result<OperatorProcess, Error> {
        let bin = workspace_binary("mycel-operator")?;
        let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(Error::io("127.0.0.1:0"))?
            .port();
        let log = std::env::temp_dir().join(format!("mycel-operator-{namespace}-{admin_port}.log"));
        let out = std::fs::File::create(&log).map_err(Error::io(&log))?;
        let err = out.try_clone().map_err(Error::io(&log))?;
        let child = Command::new(bin)
            .args(["run", "--namespace", namespace, "--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(extra)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(Error::io("mycel-operator"))?;
        Ok(OperatorProcess { child, admin_port, log })
    }

    /// GET `path` on the operator's admin port.
    pub fn admin_get(&self, path: &str) -> Result<String, Error> {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).map_err(Error::io("admin port"))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .map_err(Error::io("admin port"))?;
        let mut body = String::new();
        s.read_to_string(&mut body).map_err(Error::io("admin port"))?;
        Ok(body)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once (no graceful shutdown, no lease release): a crash.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// The log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on loopback (bound, then released for a process to take).
pub fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(Error::io("127.0.0.1:0"))
}

/// Any of the workspace's binaries as a child process with its log in a file, killed on drop.
pub struct Process {
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `bin args…` with the cluster's kubeconfig; `tag` names the log file.
    pub fn start(
        cluster: &TestCluster,
        bin: &str,
        tag: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Process, Error> {
        Self::start_wrapped(cluster, &[], bin, tag, args, env)
    }

    /// Like [`Process::start`], run under `wrapper` (a profiler such as `heaptrack`) when it is
    /// not empty. The process gets its own process group, so that killing it also kills what a
    /// wrapper started.
    pub fn start_wrapped(
        cluster: &TestCluster,
        wrapper: &[String],
        bin: &str,
        tag: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Process, Error> {
        // A path runs that binary (a benchmark's baseline build); a name, this workspace's.
        let (path, bin) = match bin.rsplit_once('/') {
            Some((_, name)) => (std::path::PathBuf::from(bin), name),
            None => (workspace_binary(bin)?, bin),
        };
        let log = std::env::temp_dir().join(format!("{bin}-{tag}.log"));
        let out =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(Error::io(&log))?;
        let err = out.try_clone().map_err(Error::io(&log))?;
        let mut command = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let child = std::os::unix::process::CommandExt::process_group(&mut command, 0)
            .args(args)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("RUST_LOG", "info,kube=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(Error::io(bin))?;
        Ok(Process { child, log })
    }

    /// Kills it at once (no graceful shutdown): a crash. Its process group goes with it.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: killpg has no memory preconditions; the group is the child's own.
            unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET `path` on `addr` over plain HTTP/1.1 (one connection, closed after); (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(Error::io(addr.to_string()))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(Error::io(addr.to_string()))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(Error::io(addr.to_string()))?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
