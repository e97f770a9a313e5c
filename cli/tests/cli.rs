//! The binary answers --help and --version, and injects manifests as the webhook would.
use std::process::Command;

#[test]
fn inject_adds_the_sidecar_once_and_names_bad_annotations() {
    use std::io::Write;
    let bin = env!("CARGO_BIN_EXE_mycelctl");
    let manifest = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: app, readinessProbe: {httpGet: {path: /ready, port: 8080}}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
    let run = |input: &str| {
        let mut child = Command::new(bin)
            .args(["inject", "-f", "-", "--revision", "canary"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let once = run(manifest);
    assert!(once.status.success(), "{}", String::from_utf8_lossy(&once.stderr));
    let once = String::from_utf8(once.stdout).unwrap();
    assert!(once.contains("name: mycel-proxy") && once.contains("name: mycel-init"), "{once}");
    assert!(once.contains("mycel-control-plane-canary.mycel-system.svc:15012"), "{once}");
    assert!(once.contains("/app-health/web/readyz"), "{once}");
    assert!(once.contains("kind: Service"), "other documents pass through: {once}");
    let twice = run(&once);
    assert_eq!(String::from_utf8(twice.stdout).unwrap(), once, "injecting twice changes nothing");
    let bad = run(&manifest.replace(
        "metadata: {labels: {app: web}}",
        "metadata: {labels: {app: web}, annotations: {mycel.io/proxy-cpu: lots}}",
    ));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("Deployment/web") && err.contains("mycel.io/proxy-cpu"), "{err}");
}

#[test]
fn help_and_version() {
    let bin = env!("CARGO_BIN_EXE_mycelctl");
    let v = Command::new(bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("mycelctl "));
    let h = Command::new(bin).arg("--help").output().unwrap();
    let h = String::from_utf8_lossy(&h.stdout);
    assert!(h.contains("inject") && h.contains("proxy-status") && h.contains("top"), "{h}");
    assert!(
        !h.contains("dev"),
        "the local cluster is the developer binary's (mycel-dev), not the product's: {h}"
    );
}
