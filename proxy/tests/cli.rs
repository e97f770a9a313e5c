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

/// The installation's `spec.mtls.mode`, injected as MYCEL_INBOUND_MTLS_DEFAULT, is the inbound
/// mode the proxy runs with before any policy arrives.
#[test]
fn the_injected_mtls_default_is_the_mode_in_force_at_start() {
    use std::io::{Read, Write};
    let bin = env!("CARGO_BIN_EXE_mycel-proxy");
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("mycel-cli-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.yaml");
    std::fs::write(&config, format!("admin: {admin}\n")).unwrap();
    let mut child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("MYCEL_INBOUND_MTLS_DEFAULT", "STRICT")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let dump = loop {
        let answer = std::net::TcpStream::connect(admin).ok().and_then(|mut s| {
            s.write_all(b"GET /config_dump HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        });
        if let Some(a) = answer.filter(|a| a.starts_with("HTTP/1.1 200")) {
            break a;
        }
        assert!(std::time::Instant::now() < deadline, "the admin server never answered");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(dump.contains("\"inboundMtls\"") && dump.contains("\"STRICT\""), "{dump}");
}
