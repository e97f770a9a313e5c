//! Protocol switches through the proxy: a WebSocket echo (tungstenite on both ends), and a bare
//! HTTP/1.1 `Upgrade` whose bytes flow both ways after the 101.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use mycel_proxy::config::Config;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::tungstenite::Message;

/// Reads an HTTP/1.1 head, byte by byte (what follows it stays unread).
async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    head
}

async fn proxy_to(upstream: std::net::SocketAddr) -> (mycel_proxy::Running, std::net::SocketAddr) {
    let proxy = mycel_proxy::start(
        Config::parse(&format!(
            "admin: '127.0.0.1:0'\nlisteners:\n- {{name: front, address: '127.0.0.1:0', protocol: http, cluster: back}}\nclusters:\n- {{name: back, endpoints: ['{upstream}']}}\n"
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let front = proxy.listener("front").await.unwrap();
    (proxy, front)
}

#[tokio::test]
async fn a_websocket_echo_crosses_the_proxy() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        ws.send(m).await.unwrap();
                    }
                }
            });
        }
    });
    let (proxy, front) = proxy_to(upstream).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{front}/chat")).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(2), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back.into_data().as_ref(), &[0u8, 1, 2, 255]);
    ws.close(None).await.unwrap();
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_bare_upgrade_tunnels_bytes_both_ways() {
    // Upstream: answers `Upgrade: echo` with 101, then echoes bytes in upper case.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let head = read_head(&mut s).await;
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.contains("upgrade: echo") && head.contains("connection: upgrade"), "{head}");
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n].to_ascii_uppercase()).await.unwrap();
        }
    });
    let (proxy, front) = proxy_to(upstream).await;
    let mut c = TcpStream::connect(front).await.unwrap();
    c.write_all(b"GET /raw HTTP/1.1\r\nhost: x\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut c).await;
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101") && head.contains("upgrade: echo"), "{head}");
    c.write_all(b"ping over the tunnel").await.unwrap();
    let mut answer = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut answer)).await.unwrap().unwrap();
    assert_eq!(&answer, b"PING OVER THE TUNNEL");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_ends_an_open_tunnel_by_its_deadline() {
    // Upstream: switches to a tunnel, then holds it open without a word.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: hold\r\nconnection: upgrade\r\n\r\n")
            .await
            .unwrap();
        // Reads until the proxy closes its side.
        while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let (proxy, front) = proxy_to(upstream).await;
    let mut c = TcpStream::connect(front).await.unwrap();
    c.write_all(b"GET /hold HTTP/1.1\r\nhost: x\r\nupgrade: hold\r\nconnection: upgrade\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut c).await;
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown(Duration::from_millis(300)))
        .await
        .expect("shutdown keeps its deadline");
    // The tunnel was ended with the proxy: the client's side sees its end, not silence.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the tunnel outlived the proxy's shutdown: {read:?}");
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_tunnelled_past_the_proxy() {
    // Upstream: reports whether it was asked to switch, and answers 200.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let head = read_head(&mut s).await;
        let asked = String::from_utf8_lossy(&head).to_lowercase().contains("upgrade:");
        let body = if asked { "asked to switch" } else { "plain" };
        s.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
            .await
            .unwrap();
    });
    let (proxy, front) = proxy_to(upstream).await;
    let mut c = TcpStream::connect(front).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nupgrade: h2c\r\nconnection: upgrade, http2-settings\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.starts_with("HTTP/1.1 200") && resp.ends_with("plain"), "{resp}");
    proxy.shutdown(Duration::from_secs(1)).await;
}
