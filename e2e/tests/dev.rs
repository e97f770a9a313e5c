//! `mycel-dev`, the developer binary: it answers --help and --version, and a command that needs
//! a running cluster says how to get one.
use std::process::Command;

#[test]
fn help_version_and_a_helpful_error() {
    let bin = env!("CARGO_BIN_EXE_mycel-dev");
    let v = Command::new(bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("mycel-dev "));
    let h = Command::new(bin).args(["cluster", "--help"]).output().unwrap();
    let h = String::from_utf8_lossy(&h.stdout);
    assert!(h.contains("up") && h.contains("down") && h.contains("env"), "{h}");
    let dir = std::env::temp_dir().join(format!("mycel-dev-nocluster-{}", std::process::id()));
    let e = Command::new(bin).args(["cluster", "env"]).env("MYCEL_CLUSTER_DIR", &dir).output().unwrap();
    assert!(!e.status.success());
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(msg.contains("mycel-dev cluster up"), "{msg}");
}
