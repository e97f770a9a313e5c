//! What a slow or hostile peer can take of the proxy: requests without one Host, heads that never
//! finish, idle connections, oversized heads, a TLS handshake left half-way, and an upstream that
//! never answers. Each is bounded by `limits` (small here, so the tests are quick).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mycel_proxy::config::Config;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

mod common;

/// A proxy whose one listener (`protocol`, `direction`) sends to `upstream`, with 300 ms limits.
async fn proxy(protocol: &str, direction: &str, upstream: SocketAddr) -> (mycel_proxy::Running, SocketAddr) {
    let config = Config::parse(&format!(
        "admin: '127.0.0.1:0'\nlimits: {{headerReadTimeoutMs: 300, tlsHandshakeTimeoutMs: 300, upstreamResponseHeaderTimeoutMs: 300}}\nlisteners:\n- {{name: front, address: '127.0.0.1:0', protocol: {protocol}, direction: {direction}, cluster: back}}\nclusters:\n- {{name: back, endpoints: ['{upstream}']}}\n"
    ))
    .unwrap();
    let p = mycel_proxy::start(config).await.unwrap();
    let front = p.listener("front").await.unwrap();
    (p, front)
}

/// An upstream that answers every request on a connection with `200 ok`.
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut head = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Everything the proxy writes until it closes the connection (or 5 s pass: `None`).
async fn read_to_close(c: &mut TcpStream) -> Option<String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn a_request_without_one_host_is_a_400() {
    let (p, front) = proxy("http", "outbound", upstream().await).await;
    for (head, reason) in [
        ("GET / HTTP/1.1\r\n\r\n", "DPE missing_host"),
        ("GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", "DPE duplicate_host"),
        // The same through hyper's server (a body takes the request there).
        ("POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi", "DPE missing_host"),
    ] {
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap();
        let resp = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert!(resp.starts_with("http/1.1 400"), "{head:?} -> {resp}");
        assert!(resp.contains(&format!("x-mycel-error: {}", reason.to_lowercase())), "{resp}");
    }
    // One Host, and HTTP/1.0 without one, are fine.
    for head in ["GET / HTTP/1.1\r\nhost: a\r\n\r\n", "GET / HTTP/1.0\r\n\r\n"] {
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap();
        let resp = String::from_utf8_lossy(&buf[..n]);
        assert!(resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"), "{head:?} -> {resp}");
    }
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_head_that_never_ends_and_an_idle_connection_are_closed() {
    let (p, front) = proxy("http", "outbound", upstream().await).await;
    // A head sent a byte at a time, never finished (slowloris).
    let mut slow = TcpStream::connect(front).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: ").await.unwrap();
    let trickle = async {
        for _ in 0..50 {
            if slow.write_all(b"a").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut probe = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), slow.peek(&mut probe)).await
            {
                return true;
            }
        }
        false
    };
    assert!(trickle.await, "a head trickled for 5 s and the proxy kept waiting");
    // Nothing sent at all after connecting.
    let mut silent = TcpStream::connect(front).await.unwrap();
    assert!(read_to_close(&mut silent).await.is_some(), "a silent connection stayed open");
    // Idle after a response (keep-alive).
    let mut idle = TcpStream::connect(front).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let seen = read_to_close(&mut idle).await.expect("an idle keep-alive connection stayed open");
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_oversized_head_is_refused() {
    let (p, front) = proxy("http", "outbound", upstream().await).await;
    let mut c = TcpStream::connect(front).await.unwrap();
    let big = "a".repeat(100 * 1024);
    // Written concurrently with reading: the proxy may answer before taking all of it.
    let (mut r, mut w) = c.split();
    let write = async {
        let _ = w.write_all(format!("GET / HTTP/1.1\r\nhost: a\r\nx-big: {big}\r\n\r\n").as_bytes()).await;
    };
    let read = async {
        let mut buf = vec![0u8; 4096];
        tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf))
            .await
            .map(|n| String::from_utf8_lossy(&buf[..n.unwrap_or(0)]).into_owned())
    };
    let ((), resp) = tokio::join!(write, read);
    let resp = resp.expect("an answer, not a hang");
    assert!(resp.starts_with("HTTP/1.1 431"), "a 100 KiB head got: {resp:?}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_a_504() {
    // Accepts, reads, never answers.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let (p, front) = proxy("http", "outbound", silent).await;
    let mut c = TcpStream::connect(front).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(resp.starts_with("http/1.1 504"), "{resp}");
    assert!(resp.contains("x-mycel-error: ut upstream_response_timeout"), "{resp}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_tls_handshake_left_half_way_is_closed() {
    let (p, front) = proxy("auto", "inbound", upstream().await).await;
    p.shared.mesh.set_identity(&common::Pki::new().identity("spiffe://test.local/ns/a/sa/b")).unwrap();
    // A real ClientHello offering the mesh's ALPN, and then silence.
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
    config.alpn_protocols = vec![b"mycel/http1".to_vec()];
    let mut tls =
        rustls::ClientConnection::new(Arc::new(config), "mesh.mycel.invalid".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    let mut c = TcpStream::connect(front).await.unwrap();
    c.write_all(&hello).await.unwrap();
    assert!(read_to_close(&mut c).await.is_some(), "the proxy waited for the rest of the handshake");
    p.shutdown(Duration::from_secs(1)).await;
}
