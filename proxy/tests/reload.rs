//! A new configuration applies without dropping anything in flight; an invalid one is refused
//! with the field named and the old one keeps serving — through the API and through the file.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};
use std::{convert::Infallible, net::SocketAddr, process::Stdio, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use mycel_proxy::config::Config;
use tokio::net::{TcpListener, TcpStream};

async fn server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

fn config_text(admin: &str, listen: &str, endpoint: SocketAddr) -> String {
    format!(
        "admin: '{admin}'\nlisteners:\n- {{name: front, address: '{listen}', protocol: http, cluster: back}}\nclusters:\n- {{name: back, endpoints: ['{endpoint}']}}\n"
    )
}

/// GET / over a keep-alive connection until `stop`, counting answers in `answered`; returns
/// every body; panics on any failure.
async fn load(front: SocketAddr, stop: Arc<AtomicBool>, answered: Arc<AtomicUsize>) -> Vec<String> {
    let s = TcpStream::connect(front).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        send.ready().await.unwrap();
        let resp = send
            .send_request(Request::get("/").header("host", "svc").body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "no request fails during reloads");
        seen.push(
            String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned(),
        );
        answered.fetch_add(1, Ordering::Relaxed);
    }
    seen
}

/// Waits until `answered` has grown by `n` (the load goes on meanwhile).
async fn more_answers(answered: &AtomicUsize, n: usize) {
    let target = answered.load(Ordering::Relaxed) + n;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answered.load(Ordering::Relaxed) < target {
        assert!(tokio::time::Instant::now() < deadline, "the load stalled");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_under_load_drops_no_request_and_refuses_a_bad_config() {
    let (a, b) = (server("a").await, server("b").await);
    let proxy = mycel_proxy::start(Config::parse(&config_text("127.0.0.1:0", "127.0.0.1:0", a)).unwrap())
        .await
        .unwrap();
    let front = proxy.listener("front").await.unwrap();
    let (stop, answered) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4).map(|_| tokio::spawn(load(front, stop.clone(), answered.clone()))).collect();

    more_answers(&answered, 200).await;
    // Same listener address: the socket stays, open connections go on, the cluster changes.
    proxy.apply(Config::parse(&config_text("127.0.0.1:0", "127.0.0.1:0", b)).unwrap()).await.unwrap();
    more_answers(&answered, 200).await;
    let bad = Config {
        listeners: vec![mycel_proxy::config::Listener {
            name: "front".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            protocol: mycel_proxy::config::Protocol::Http,
            cluster: Some("gone".into()),
            original_destination: false,
            direction: Default::default(),
            detect_timeout_ms: 500,
        }],
        ..Config::parse(&config_text("127.0.0.1:0", "127.0.0.1:0", b)).unwrap()
    };
    let err = proxy.apply(bad).await.unwrap_err().to_string();
    assert!(err.starts_with("listeners[0].cluster: no cluster named \"gone\""), "{err}");
    more_answers(&answered, 200).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for c in clients {
        let seen = c.await.unwrap();
        total += seen.len();
        let first_b = seen.iter().position(|s| s == "b").expect("the new endpoint served");
        assert!(
            seen[..first_b].iter().all(|s| s == "a") && seen[first_b..].iter().all(|s| s == "b"),
            "{seen:?}"
        );
        assert!(first_b > 0, "the old endpoint served before the reload");
    }
    eprintln!("{total} requests over 4 keep-alive connections, 0 failed, across 2 reloads");
    assert!(
        proxy.shared.state.load().config.clusters[0].endpoints == vec![b],
        "the bad config was not applied"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_its_file_and_keeps_the_last_good_config() {
    let (a, b) = (server("a").await, server("b").await);
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (admin, listen) = (free(), free());
    let dir = std::env::temp_dir().join(format!("mycel-proxy-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.yaml");
    std::fs::write(&file, config_text(&admin.to_string(), &listen.to_string(), a)).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mycel-proxy"))
        .args(["run", "--config"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let get = |addr: SocketAddr, path: &'static str| async move {
        let s = TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s)).await.ok()?;
        tokio::spawn(conn);
        let resp = send
            .send_request(Request::get(path).header("host", "x").body(Full::new(Bytes::new())).unwrap())
            .await
            .ok()?;
        Some(String::from_utf8_lossy(&resp.into_body().collect().await.ok()?.to_bytes()).into_owned())
    };
    let wait_for = |want: &'static str| async move {
        for _ in 0..100 {
            if get(listen, "/").await.as_deref() == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the proxy never answered {want:?}");
    };
    wait_for("a").await;
    std::fs::write(&file, config_text(&admin.to_string(), &listen.to_string(), b)).unwrap();
    // Another modification time, whatever the file system's granularity.
    let stamp = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(stamp).unwrap();
    wait_for("b").await;
    std::fs::write(&file, "listeners:\n- {name: front, address: 'nowhere', protocol: http, cluster: back}\n")
        .unwrap();
    let mut rejected = false;
    for _ in 0..50 {
        let metrics = get(admin, "/metrics").await.unwrap_or_default();
        if metrics.contains(r#"mycel_proxy_config_reloads_total{result="rejected"} 1"#) {
            rejected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rejected, "the invalid file was noticed and refused");
    assert_eq!(get(listen, "/").await.as_deref(), Some("b"), "the last good config keeps serving");
    // Log levels change at run time through the admin endpoint; a bad filter is refused.
    let send = |method: &'static str, path: String| async move {
        let s = TcpStream::connect(admin).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (
            status,
            String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).trim().to_string(),
        )
    };
    assert_eq!(send("GET", "/logging".into()).await, (200, "info".to_string()));
    assert_eq!(send("POST", "/logging?level=debug".into()).await, (200, "debug".to_string()));
    assert_eq!(send("GET", "/logging".into()).await, (200, "debug".to_string()));
    let (status, body) = send("POST", "/logging?level=[bad".into()).await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid log filter"), "{body}");
    assert_eq!(send("GET", "/logging".into()).await.1, "debug", "a refused filter changes nothing");
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("configuration rejected") && log.contains("listeners[0]"), "{log}");
    assert!(log.contains("log filter changed"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
