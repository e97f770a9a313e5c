//! Where the Kubernetes binaries come from: `tools/build-k8s.sh` builds etcd, the Kubernetes
//! components and kwok from their Go modules once per version into the cache directory.

use std::{path::PathBuf, process::Command};

use crate::Error;

/// `$MYCEL_CACHE_DIR`, else `$HOME/.cache/mycel`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MYCEL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("mycel")
}

/// The build script, found next to this crate's sources.
pub fn build_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/build-k8s.sh")
}

/// Builds the binaries if the cache lacks them (minutes, once) and returns their directory.
pub fn ensure() -> Result<PathBuf, Error> {
    let script = build_script();
    let out = Command::new("bash")
        .arg(&script)
        .env("MYCEL_CACHE_DIR", cache_dir())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(Error::io(&script))?;
    if !out.status.success() {
        return Err(Error::Command(format!(
            "{} failed ({}); its output above says why (Go toolchain and network to the Go module proxy are needed on first use)",
            script.display(),
            out.status
        )));
    }
    let dir = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    if dir.is_empty() {
        return Err(Error::Command(format!("{} printed no directory", script.display())));
    }
    Ok(PathBuf::from(dir))
}
