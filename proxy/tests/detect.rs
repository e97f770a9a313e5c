//! An `auto` listener tells protocols apart by their first bytes: HTTP is proxied as HTTP, a TLS
//! ClientHello (made by rustls) and other bytes pass through untouched, and a server that speaks
//! first still gets its greeting to the client.

use std::{sync::Arc, time::Duration};

use mycel_proxy::{config::Config, detect};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

/// A ClientHello as a real TLS client sends it (SNI `shop.example`, ALPN h2 and http/1.1).
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), "shop.example".try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[test]
fn a_client_hello_is_recognised_with_its_sni_and_alpn() {
    let hello = client_hello();
    assert_eq!(
        detect::classify(&hello),
        Some(detect::Detected::Tls {
            sni: Some("shop.example".into()),
            alpn: vec!["h2".into(), "http/1.1".into()]
        })
    );
    assert_eq!(detect::classify(&hello[..20]), None, "a partial record waits for the rest");
}

/// Upstream: optionally greets first, then records everything it receives on `tx` and answers
/// each chunk with "ok".
async fn upstream(
    greeting: Option<&'static [u8]>,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(g) = greeting {
                    s.write_all(g).await.unwrap();
                }
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    let _ = tx.send(buf[..n].to_vec());
                    if buf.starts_with(b"GET ") {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    } else {
                        let _ = s.write_all(b"ok").await;
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn auto_proxy(up: std::net::SocketAddr) -> (mycel_proxy::Running, std::net::SocketAddr) {
    let proxy = mycel_proxy::start(
        Config::parse(&format!(
            "admin: '127.0.0.1:0'\nlisteners:\n- {{name: front, address: '127.0.0.1:0', protocol: auto, cluster: back, detectTimeoutMs: 200}}\nclusters:\n- {{name: back, endpoints: ['{up}']}}\n"
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let front = proxy.listener("front").await.unwrap();
    (proxy, front)
}

fn connections(proxy: &mycel_proxy::Running, protocol: &str) -> u64 {
    proxy
        .shared
        .metrics
        .render()
        .lines()
        .find(|l| {
            l.starts_with("mycel_proxy_connections_total{") && l.contains(&format!("protocol=\"{protocol}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn http_tls_and_opaque_bytes_are_each_handled_as_what_they_are() {
    let (up, mut seen) = upstream(None).await;
    let (proxy, front) = auto_proxy(up).await;

    // HTTP: proxied as HTTP (hop-by-hop headers gone, so not a byte-for-byte copy).
    let mut c = TcpStream::connect(front).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nkeep-alive: timeout=5\r\n\r\n").await.unwrap();
    let mut resp = [0u8; 12];
    c.read_exact(&mut resp).await.unwrap();
    assert_eq!(&resp, b"HTTP/1.1 200");
    let got = String::from_utf8_lossy(&seen.recv().await.unwrap()).to_lowercase();
    assert!(got.starts_with("get / http/1.1") && !got.contains("keep-alive"), "{got}");
    assert_eq!(connections(&proxy, "http"), 1);

    // TLS: the ClientHello arrives upstream exactly as sent.
    let hello = client_hello();
    let mut c = TcpStream::connect(front).await.unwrap();
    c.write_all(&hello).await.unwrap();
    let mut got = Vec::new();
    while got.len() < hello.len() {
        got.extend(seen.recv().await.unwrap());
    }
    assert_eq!(got, hello);
    assert_eq!(connections(&proxy, "tls"), 1);

    // Anything else: opaque bytes, passed through.
    let mut c = TcpStream::connect(front).await.unwrap();
    c.write_all(b"\x00\x01 binary protocol").await.unwrap();
    assert_eq!(seen.recv().await.unwrap(), b"\x00\x01 binary protocol");
    let mut ok = [0u8; 2];
    c.read_exact(&mut ok).await.unwrap();
    assert_eq!(connections(&proxy, "tcp"), 1);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_server_that_speaks_first_is_not_kept_waiting() {
    let (up, _seen) = upstream(Some(b"* OK IMAP4rev1 ready\r\n")).await;
    let (proxy, front) = auto_proxy(up).await;
    let started = std::time::Instant::now();
    let mut c = TcpStream::connect(front).await.unwrap();
    let mut greeting = [0u8; 22];
    tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(&greeting, b"* OK IMAP4rev1 ready\r\n");
    let waited = started.elapsed();
    eprintln!("server-first greeting after {waited:?} (detection timeout 200 ms)");
    assert!(waited >= Duration::from_millis(190), "detection waited for the client first");
    assert_eq!(connections(&proxy, "tcp"), 1);
    proxy.shutdown(Duration::from_secs(1)).await;
}
