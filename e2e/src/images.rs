//! Container images without a registry: the harness writes image archives in the `docker save`
//! layout (manifest.json, a config JSON, one layer tar) from static binaries, and imports them
//! into containerd's `k8s.io` namespace, where the kubelet finds them by their ordinary names.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::Error;

/// One file of an image.
pub enum Entry {
    /// A regular file, copied from the host.
    File { path: String, from: PathBuf, mode: u32 },
    /// A directory.
    Dir { path: String, mode: u32 },
    /// A symbolic link.
    Link { path: String, target: String },
    /// A file with the given content.
    Data { path: String, bytes: Vec<u8>, mode: u32 },
}

/// `host` at `path`, plus every shared library it loads (as `ldd` lists them) at the same paths:
/// host-built binaries run unchanged in the image.
pub fn with_libs(path: &str, host: &Path) -> Result<Vec<Entry>, Error> {
    let mut entries = vec![Entry::File { path: path.into(), from: host.to_path_buf(), mode: 0o755 }];
    let out = Command::new("ldd").arg(host).output().map_err(Error::io("ldd"))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let lib = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
            entries.extend(lib_entry(lib)?);
        }
    }
    Ok(entries)
}

/// A library at its path, its content read through any symlink.
fn lib_entry(path: &str) -> Result<Option<Entry>, Error> {
    // ldd prints the loader as /lib64/…; keep the path, copy the file behind the link.
    let real = fs::canonicalize(path).map_err(Error::io(path))?;
    Ok(Some(Entry::File { path: path.into(), from: real, mode: 0o755 }))
}

/// glibc's name-service modules and configuration, so that host names resolve through
/// /etc/hosts and the cluster DNS (glibc loads these at run time, also from static binaries).
pub fn glibc_name_service() -> Result<Vec<Entry>, Error> {
    let mut entries = vec![Entry::Data {
        path: "/etc/nsswitch.conf".into(),
        bytes: b"hosts: files dns\npasswd: files\ngroup: files\n".to_vec(),
        mode: 0o644,
    }];
    for lib in [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libnss_files.so.2",
        "/lib/x86_64-linux-gnu/libnss_dns.so.2",
        "/lib/x86_64-linux-gnu/libresolv.so.2",
        "/lib64/ld-linux-x86-64.so.2",
    ] {
        entries.extend(lib_entry(lib)?);
    }
    Ok(entries)
}

/// An image to build: its reference, files, and how it starts.
pub struct ImageSpec {
    pub reference: String,
    pub entries: Vec<Entry>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

/// Writes `spec` as a `docker save` archive at `out`.
pub fn write_archive(spec: &ImageSpec, out: &Path) -> Result<(), Error> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs: BTreeMap<String, u32> = BTreeMap::new();
    for e in &spec.entries {
        let path = match e {
            Entry::File { path, .. } | Entry::Link { path, .. } | Entry::Data { path, .. } => path,
            Entry::Dir { path, mode } => {
                dirs.insert(path.trim_matches('/').to_string(), *mode);
                continue;
            }
        };
        // Parent directories first, so that every path in the layer has a directory entry.
        let mut parent = Path::new(path.trim_matches('/')).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.entry(p.display().to_string()).or_insert(0o755);
            parent = p.parent();
        }
    }
    for (dir, mode) in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(*mode);
        h.set_size(0);
        h.set_mtime(0);
        builder.append_data(&mut h, format!("{dir}/"), std::io::empty()).map_err(Error::io(out))?;
    }
    // A path listed twice (a library two binaries share) is written once.
    let mut written = std::collections::HashSet::new();
    for e in &spec.entries {
        let path = match e {
            Entry::File { path, .. } | Entry::Link { path, .. } | Entry::Data { path, .. } => path,
            Entry::Dir { .. } => continue,
        };
        if !written.insert(path.trim_start_matches('/').to_string()) {
            continue;
        }
        match e {
            Entry::File { path, from, mode } => {
                let data = fs::read(from).map_err(Error::io(from))?;
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                h.set_mtime(0);
                builder
                    .append_data(&mut h, path.trim_start_matches('/'), data.as_slice())
                    .map_err(Error::io(out))?;
            }
            Entry::Data { path, bytes, mode } => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(bytes.len() as u64);
                h.set_mtime(0);
                builder
                    .append_data(&mut h, path.trim_start_matches('/'), bytes.as_slice())
                    .map_err(Error::io(out))?;
            }
            Entry::Link { path, target } => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                h.set_mtime(0);
                builder.append_link(&mut h, path.trim_start_matches('/'), target).map_err(Error::io(out))?;
            }
            Entry::Dir { .. } => {}
        }
    }
    let layer = builder.into_inner().map_err(Error::io(out))?;
    let layer_digest = hex(&Sha256::digest(&layer));
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": spec.entrypoint, "Cmd": spec.cmd, "Env": spec.env},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    }))?;
    let config_digest = hex(&Sha256::digest(&config));
    let manifest = serde_json::to_vec(&json!([{
        "Config": format!("{config_digest}.json"),
        "RepoTags": [spec.reference],
        "Layers": [format!("{layer_digest}/layer.tar")],
    }]))?;

    let mut archive = tar::Builder::new(fs::File::create(out).map_err(Error::io(out))?);
    let mut add = |name: &str, data: &[u8]| -> Result<(), Error> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        archive.append_data(&mut h, name, data).map_err(Error::io(out))
    };
    add(&format!("{layer_digest}/layer.tar"), &layer)?;
    add(&format!("{config_digest}.json"), &config)?;
    add("manifest.json", &manifest)?;
    archive.finish().map_err(Error::io(out))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Imports archives into containerd's `k8s.io` namespace through `socket`.
pub fn import(socket: &Path, archives: &[PathBuf]) -> Result<(), Error> {
    for a in archives {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(socket)
            .args(["--namespace", "k8s.io", "images", "import", "--no-unpack"])
            .arg(a)
            .output()
            .map_err(Error::io("ctr"))?;
        if !out.status.success() {
            return Err(Error::Command(format!(
                "ctr images import {}: {}",
                a.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// The pause binary, compiled once from `e2e/images/pause.c` into the cache.
pub fn pause_binary(cache: &Path) -> Result<PathBuf, Error> {
    let out = cache.join("pause");
    if out.exists() {
        return Ok(out);
    }
    fs::create_dir_all(cache).map_err(Error::io(cache))?;
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("images/pause.c");
    let tmp = cache.join("pause.tmp");
    let status = Command::new("cc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&tmp)
        .arg(&src)
        .status()
        .map_err(Error::io("cc"))?;
    if !status.success() {
        return Err(Error::Command(format!("cc -static {} failed (is libc6-dev installed?)", src.display())));
    }
    fs::rename(&tmp, &out).map_err(Error::io(&out))?;
    Ok(out)
}

/// Reference of the sandbox image the node's containerd uses.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// A busybox image for tests that need a shell, wget, nc and friends.
pub const TOOLBOX_IMAGE: &str = "docker.io/mycel/toolbox:test";

/// The images every local node gets: pause, the toolbox, CoreDNS.
pub fn base_images(cache: &Path, bin_dir: &Path) -> Result<Vec<ImageSpec>, Error> {
    let pause = pause_binary(cache)?;
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.exists() {
        return Err(Error::Command(
            "/bin/busybox not found: install busybox-static (scripts/setup does)".into(),
        ));
    }
    let mut toolbox = vec![
        Entry::File { path: "/bin/busybox".into(), from: busybox, mode: 0o755 },
        Entry::Dir { path: "/tmp".into(), mode: 0o1777 },
        Entry::Dir { path: "/etc".into(), mode: 0o755 },
    ];
    toolbox.extend(glibc_name_service()?);
    for tool in [
        "sh", "sleep", "wget", "nc", "cat", "ls", "echo", "env", "httpd", "nslookup", "hostname", "grep",
        "ps", "kill", "true", "false", "id", "printf", "date", "test", "[", "seq", "ip", "tr", "head",
        "tail", "rm", "mkdir", "touch", "mv", "cp", "wc", "sed", "awk", "cut", "sort", "uniq", "timeout",
        "dd", "stat",
    ] {
        toolbox.push(Entry::Link { path: format!("/bin/{tool}"), target: "busybox".into() });
    }
    let path_env = vec!["PATH=/bin:/usr/bin".to_string()];
    Ok(vec![
        ImageSpec {
            reference: PAUSE_IMAGE.into(),
            entries: vec![Entry::File { path: "/pause".into(), from: pause, mode: 0o755 }],
            entrypoint: vec!["/pause".into()],
            cmd: vec![],
            env: vec![],
        },
        ImageSpec {
            reference: TOOLBOX_IMAGE.into(),
            entries: toolbox,
            entrypoint: vec![],
            cmd: vec!["/bin/sh".into()],
            env: path_env,
        },
        ImageSpec {
            reference: coredns_image(),
            entries: vec![Entry::File {
                path: "/coredns".into(),
                from: bin_dir.join("coredns"),
                mode: 0o755,
            }],
            entrypoint: vec!["/coredns".into()],
            cmd: vec![],
            env: vec![],
        },
    ])
}

/// The image of `mycel-testapp` (HTTP echo, TCP echo, HTTP client), from the workspace build.
pub const TESTAPP_IMAGE: &str = "docker.io/mycel/testapp:test";

/// The testapp image, from the binary the workspace built.
pub fn testapp_image() -> Result<ImageSpec, Error> {
    let bin = crate::process::workspace_binary("mycel-testapp")?;
    let mut entries = with_libs("/usr/local/bin/mycel-testapp", &bin)?;
    entries.extend(glibc_name_service()?);
    entries.push(Entry::Dir { path: "/tmp".into(), mode: 0o1777 });
    Ok(ImageSpec {
        reference: TESTAPP_IMAGE.into(),
        entries,
        entrypoint: vec!["/usr/local/bin/mycel-testapp".into()],
        cmd: vec![],
        env: vec!["PATH=/usr/local/bin".into()],
    })
}

/// Redis, from Debian's `redis-server`, for the rate-limit service's counters.
pub const REDIS_IMAGE: &str = "docker.io/mycel/redis:test";

/// The Redis image: the host's `redis-server` and `redis-cli` (scripts/setup installs them) and
/// their libraries.
pub fn redis_image() -> Result<ImageSpec, Error> {
    let bin = Path::new("/usr/bin/redis-server");
    if !bin.exists() {
        return Err(Error::Command("redis-server not installed: scripts/setup installs it".into()));
    }
    let mut entries = with_libs("/usr/bin/redis-server", bin)?;
    // redis-cli too: forming a Redis Cluster of pods (`--cluster create`), asking a node.
    entries.extend(with_libs("/usr/bin/redis-cli", Path::new("/usr/bin/redis-cli"))?);
    entries.extend(glibc_name_service()?);
    entries.push(Entry::Dir { path: "/tmp".into(), mode: 0o1777 });
    entries.push(Entry::Dir { path: "/data".into(), mode: 0o1777 });
    Ok(ImageSpec {
        reference: REDIS_IMAGE.into(),
        entries,
        entrypoint: vec!["/usr/bin/redis-server".into()],
        cmd: vec![],
        env: vec!["PATH=/usr/bin".into()],
    })
}

/// Version tag of the operator and proxy images: what a MeshInstallation installs by default.
pub fn mycel_version() -> String {
    format!("v{}", env!("CARGO_PKG_VERSION"))
}

/// The operator image (also the control plane), from the workspace build.
pub fn operator_image() -> Result<ImageSpec, Error> {
    let bin = crate::process::workspace_binary("mycel-operator")?;
    let mut entries = with_libs("/usr/local/bin/mycel-operator", &bin)?;
    entries.extend(glibc_name_service()?);
    entries.push(Entry::Dir { path: "/tmp".into(), mode: 0o1777 });
    Ok(ImageSpec {
        reference: format!("docker.io/mycel/operator:{}", mycel_version()),
        entries,
        entrypoint: vec!["/usr/local/bin/mycel-operator".into()],
        cmd: vec![],
        env: vec!["PATH=/usr/local/bin".into()],
    })
}

/// The proxy image, with iptables (nft backend, its extensions) for `mycel-proxy init`, and
/// `mycel-ratelimit`.
pub fn proxy_image() -> Result<ImageSpec, Error> {
    let bin = crate::process::workspace_binary("mycel-proxy")?;
    let mut entries = with_libs("/usr/local/bin/mycel-proxy", &bin)?;
    // The rate-limit service ships in the same image (the operator runs it by its command).
    let rls = crate::process::workspace_binary("mycel-ratelimit")?;
    entries.extend(with_libs("/usr/local/bin/mycel-ratelimit", &rls)?);
    entries.extend(glibc_name_service()?);
    let xtables = Path::new("/usr/sbin/xtables-nft-multi");
    if !xtables.exists() {
        return Err(Error::Command(
            "iptables (xtables-nft-multi) not installed: scripts/setup installs it".into(),
        ));
    }
    entries.extend(with_libs("/usr/sbin/xtables-nft-multi", xtables)?);
    for tool in
        ["iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"]
    {
        entries.push(Entry::Link { path: format!("/usr/sbin/{tool}"), target: "xtables-nft-multi".into() });
    }
    let ext = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    for e in fs::read_dir(ext).map_err(Error::io(ext))?.flatten() {
        entries.push(Entry::File {
            path: format!("{}/{}", ext.display(), e.file_name().to_string_lossy()),
            from: e.path(),
            mode: 0o644,
        });
    }
    entries.push(Entry::Dir { path: "/run".into(), mode: 0o755 });
    entries.push(Entry::Dir { path: "/tmp".into(), mode: 0o1777 });
    Ok(ImageSpec {
        reference: format!("docker.io/mycel/proxy:{}", mycel_version()),
        entries,
        entrypoint: vec!["/usr/local/bin/mycel-proxy".into()],
        cmd: vec![],
        env: vec!["PATH=/usr/local/bin:/usr/sbin".into()],
    })
}

/// The CoreDNS image reference (its tag is the version it was built from).
pub fn coredns_image() -> String {
    "docker.io/mycel/coredns:local".into()
}
