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

/// A port already taken is named by the setting that asked for it, with the fix.
#[test]
fn a_taken_port_is_named_by_its_setting() {
    let bin = env!("CARGO_BIN_EXE_mycel-proxy");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("mycel-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (field, admin, listen) in [("admin", port, free), ("listeners[0].address", free, port)] {
        let config = dir.join("proxy.yaml");
        std::fs::write(
            &config,
            format!(
                "admin: 127.0.0.1:{admin}\nlisteners:\n- {{name: web, address: '127.0.0.1:{listen}', protocol: http, cluster: c}}\nclusters:\n- {{name: c, endpoints: ['127.0.0.1:9']}}\n"
            ),
        )
        .unwrap();
        let out = Command::new(bin).args(["run", "--config"]).arg(&config).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{field}: cannot listen on 127.0.0.1:{port}"))
                && err.contains("choose another"),
            "{err}"
        );
    }
}
