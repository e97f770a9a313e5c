//! The binary answers --help and --version.
use std::process::Command;

#[test]
fn help_and_version() {
    let bin = env!("CARGO_BIN_EXE_mycel-proxy");
    let v = Command::new(bin).arg("--version").output().unwrap();
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("mycel-proxy "));
    let h = Command::new(bin).arg("--help").output().unwrap();
    let h = String::from_utf8_lossy(&h.stdout);
    assert!(h.contains("init") && h.contains("run"), "{h}");
}
