//! The binary answers --help and --version, and prints the CRDs it serves.
use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mycel-operator")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn help_version_and_crds() {
    let (ok, v) = run(&["--version"]);
    assert!(ok && v.starts_with("mycel-operator ") && v.contains(env!("CARGO_PKG_VERSION")), "{v}");
    let (ok, h) = run(&["--help"]);
    assert!(ok && h.contains("control-plane") && h.contains("run"), "{h}");
    let (ok, crds) = run(&["crds"]);
    assert!(ok);
    assert_eq!(crds.matches("kind: CustomResourceDefinition").count(), 7);
}
