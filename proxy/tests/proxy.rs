//! The proxy with real clients and servers on loopback: HTTP/1.1 keep-alive and chunked bodies,
//! hop-by-hop headers, balancing with a dead endpoint, no endpoints, TCP half-close, a
//! server-first protocol, the admin endpoint, and draining on shutdown.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{
    Request, Response,
    body::{Bytes, Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use mycel_proxy::config::Config;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// An HTTP server answering `<name> <method> <path> <body length>`, plus the request headers it
/// saw as `x-seen-*` response headers; `/slow` waits 500 ms first.
async fn http_server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let (parts, body) = req.into_parts();
                    if parts.uri.path() == "/slow" {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let mut resp = Response::new(Full::new(Bytes::from(format!(
                        "{name} {} {} {}",
                        parts.method,
                        parts.uri.path(),
                        body.len()
                    ))));
                    for (k, v) in &parts.headers {
                        if let Ok(n) = hyper::header::HeaderName::from_bytes(format!("x-seen-{k}").as_bytes())
                        {
                            resp.headers_mut().insert(n, v.clone());
                        }
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

fn config(protocol: &str, endpoints: &[SocketAddr]) -> Config {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("'{e}'")).collect();
    Config::parse(&format!(
        "admin: '127.0.0.1:0'\nlisteners:\n- {{name: front, address: '127.0.0.1:0', protocol: {protocol}, cluster: back}}\nclusters:\n- {{name: back, lb: {{algorithm: RoundRobin}}, endpoints: [{}]}}\n",
        eps.join(", ")
    ))
    .unwrap()
}

/// A keep-alive HTTP/1.1 client connection to `addr`.
async fn connect(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    send
}

fn empty() -> http_body_util::combinators::BoxBody<Bytes, Infallible> {
    Full::new(Bytes::new()).boxed()
}

async fn text(resp: Response<Incoming>) -> String {
    String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

#[tokio::test]
async fn http_keep_alive_chunked_bodies_and_hop_by_hop_headers() {
    let up = http_server("a").await;
    let proxy = mycel_proxy::start(config("http", &[up])).await.unwrap();
    let front = proxy.listener("front").await.unwrap();
    let mut client = connect(front).await;
    // Many requests over one downstream connection.
    for i in 0..50 {
        client.ready().await.unwrap();
        let resp = client
            .send_request(Request::get(format!("/r{i}")).header("host", "svc").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(text(resp).await, format!("a GET /r{i} 0"));
    }
    // A chunked request body streamed in pieces arrives whole.
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> =
        (0..10).map(|i| Ok(Frame::data(Bytes::from(vec![b'x'; 1000 + i])))).collect();
    let body = StreamBody::new(futures::stream::iter(chunks)).boxed();
    client.ready().await.unwrap();
    let resp = client
        .send_request(
            Request::post("/upload")
                .header("host", "svc")
                .header("connection", "x-private")
                .header("x-private", "secret")
                .header("keep-alive", "timeout=5")
                .header("x-kept", "yes")
                .body(body)
                .unwrap(),
        )
        .await
        .unwrap();
    let headers = resp.headers().clone();
    assert_eq!(text(resp).await, format!("a POST /upload {}", (0..10).map(|i| 1000 + i).sum::<usize>()));
    assert_eq!(headers.get("x-seen-x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
    assert_eq!(headers.get("x-seen-host").map(|v| v.as_bytes()), Some(&b"svc"[..]), "Host is kept");
    for hop in ["x-seen-x-private", "x-seen-keep-alive"] {
        assert!(headers.get(hop).is_none(), "hop-by-hop header forwarded: {hop}");
    }
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn requests_are_balanced_and_a_dead_endpoint_is_skipped() {
    let a = http_server("a").await;
    let b = http_server("b").await;
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap() // dropped: nothing listens here any more
    };
    let proxy = mycel_proxy::start(config("http", &[a, dead, b])).await.unwrap();
    let front = proxy.listener("front").await.unwrap();
    let (mut seen_a, mut seen_b) = (0, 0);
    for _ in 0..30 {
        let mut c = connect(front).await;
        let resp =
            c.send_request(Request::get("/").header("host", "svc").body(empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200, "no request fails because of the dead endpoint");
        let t = text(resp).await;
        if t.starts_with("a ") {
            seen_a += 1;
        } else if t.starts_with("b ") {
            seen_b += 1;
        }
    }
    assert_eq!(seen_a + seen_b, 30);
    assert!(seen_a >= 10 && seen_b >= 10, "both live endpoints serve: a={seen_a} b={seen_b}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn upstream_connections_are_reused_across_requests_and_clients() {
    // The upstream counts the connections it accepts.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(req.uri().path().to_string()))))
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    let proxy = mycel_proxy::start(config("http", &[up])).await.unwrap();
    let front = proxy.listener("front").await.unwrap();
    for i in 0..20 {
        // A new client connection each time, one request after the other.
        let mut c = connect(front).await;
        let path = format!("/r{i}");
        let resp =
            c.send_request(Request::get(&path).header("host", "svc").body(empty()).unwrap()).await.unwrap();
        assert_eq!(text(resp).await, path);
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "20 requests in a row share one upstream connection"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn no_endpoints_is_a_503_that_says_why() {
    let proxy = mycel_proxy::start(config("http", &[])).await.unwrap();
    let mut c = connect(proxy.listener("front").await.unwrap()).await;
    let resp = tokio::time::timeout(
        Duration::from_secs(2),
        c.send_request(Request::get("/").header("host", "svc").body(empty()).unwrap()),
    )
    .await
    .expect("an answer, not a hang")
    .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()[mycel_proxy::error::ERROR_HEADER], "UH no_healthy_upstream");
    assert_eq!(text(resp).await, "no endpoints for cluster back\n");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn tcp_half_close_and_a_server_that_speaks_first() {
    // Upstream: greets first (like SMTP or MySQL), then reads until the client half-closes,
    // then answers with how much it got and closes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                s.write_all(b"220 hello\r\n").await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(format!("got {} bytes", got.len()).as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    let proxy = mycel_proxy::start(config("tcp", &[up])).await.unwrap();
    let mut c = TcpStream::connect(proxy.listener("front").await.unwrap()).await.unwrap();
    let mut greeting = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut greeting))
        .await
        .expect("the server's greeting arrives before the client says anything")
        .unwrap();
    assert_eq!(&greeting, b"220 hello\r\n");
    let payload = vec![7u8; 300_000];
    c.write_all(&payload).await.unwrap();
    c.shutdown().await.unwrap(); // half-close: we still read
    let mut answer = String::new();
    c.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got 300000 bytes");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn tcp_moves_every_byte_both_ways_at_once_and_counts_them() {
    // An echo server; the client writes 8 MiB of varied bytes while it reads the echo, so both
    // directions (spliced in the kernel between plain sockets) are busy together.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let proxy = mycel_proxy::start(config("tcp", &[up])).await.unwrap();
    let c = TcpStream::connect(proxy.listener("front").await.unwrap()).await.unwrap();
    let (mut r, mut w) = c.into_split();
    let payload: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(100_003) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut echoed)).await.unwrap().unwrap();
    writer.await.unwrap();
    assert!(echoed == payload, "echo differs: {} of {} bytes back", echoed.len(), payload.len());
    // The counters are added when the connection ends, just after the client saw its end.
    let wanted = ["mycel_proxy_received_bytes_total", "mycel_proxy_sent_bytes_total"]
        .map(|name| format!(r#"{name}{{direction="outbound",listener="front",protocol="tcp"}} 8388608"#));
    let mut metrics = String::new();
    for _ in 0..50 {
        let mut admin = connect(proxy.admin).await;
        let get = Request::get("/metrics").header("host", "admin").body(empty()).unwrap();
        metrics = text(admin.send_request(get).await.unwrap()).await;
        if wanted.iter().all(|w| metrics.contains(w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for line in &wanted {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn admin_reports_readiness_config_and_metrics() {
    let up = http_server("a").await;
    let proxy = mycel_proxy::start(config("http", &[up])).await.unwrap();
    for _ in 0..3 {
        let mut c = connect(proxy.listener("front").await.unwrap()).await;
        c.send_request(Request::get("/").header("host", "svc").body(empty()).unwrap()).await.unwrap();
    }
    let mut admin = connect(proxy.admin).await;
    let get = |path: &'static str| Request::get(path).header("host", "admin").body(empty()).unwrap();
    let ready = admin.send_request(get("/healthz/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    admin.ready().await.unwrap();
    let dump = text(admin.send_request(get("/config_dump")).await.unwrap()).await;
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(v["clusters"][0]["endpoints"][0], up.to_string());
    admin.ready().await.unwrap();
    let metrics = text(admin.send_request(get("/metrics")).await.unwrap()).await;
    assert!(
        metrics.contains(
            r#"mycel_proxy_requests_total{direction="outbound",listener="front",cluster="back",code="200"} 3"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("mycel_proxy_request_duration_seconds_bucket"));
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight() {
    // An upstream that says when the request reached it and answers only once told to.
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::channel::<()>(1);
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let go2 = go.clone();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let svc = service_fn(move |req: Request<Incoming>| {
            let (arrived_tx, go) = (arrived_tx.clone(), go2.clone());
            async move {
                let _ = arrived_tx.send(()).await;
                go.notified().await;
                let body = format!("a {} {} 0", req.method(), req.uri().path());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        });
        let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
    });
    let proxy = mycel_proxy::start(config("http", &[up])).await.unwrap();
    let front = proxy.listener("front").await.unwrap();
    let mut c = connect(front).await;
    let inflight = tokio::spawn(async move {
        let resp =
            c.send_request(Request::get("/slow").header("host", "svc").body(empty()).unwrap()).await.unwrap();
        (resp.status(), resp.headers().get("connection").cloned(), text(resp).await)
    });
    arrived.recv().await.expect("the request reached the upstream");
    // The upstream answers once the proxy has begun to shut down (it no longer accepts).
    let answer_when_draining = async {
        while TcpStream::connect(front).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        go.notify_one();
    };
    tokio::join!(proxy.shutdown(Duration::from_secs(5)), answer_when_draining);
    let (status, connection, body) = inflight.await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "a GET /slow 0"), "the slow request completed");
    assert_eq!(
        connection.as_ref().map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "and the connection is closed after it"
    );
    assert!(TcpStream::connect(front).await.is_err(), "no longer accepting");
}

/// An upstream for the raw-socket tests: `/stream` answers three chunks of unknown total length,
/// `/wait` answers `first,`, then `last` once `go` is notified; anything else
/// `ok <method> <path> <body length>`.
async fn streaming_server(go: std::sync::Arc<tokio::sync::Notify>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let go = go.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let go = go.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let len = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                        let body = match parts.uri.path() {
                            "/stream" => {
                                let chunks: Vec<Result<Frame<Bytes>, Infallible>> = ["one,", "two,", "three"]
                                    .iter()
                                    .map(|c| Ok(Frame::data(Bytes::from(*c))))
                                    .collect();
                                StreamBody::new(futures::stream::iter(chunks)).boxed()
                            }
                            "/wait" => {
                                let first = futures::stream::iter([Ok::<_, Infallible>(Frame::data(
                                    Bytes::from("first,"),
                                ))]);
                                let last = futures::stream::once(async move {
                                    go.notified().await;
                                    Ok(Frame::data(Bytes::from("last")))
                                });
                                StreamBody::new(futures::StreamExt::chain(first, last)).boxed()
                            }
                            _ => Full::new(Bytes::from(format!(
                                "ok {} {} {len}",
                                parts.method,
                                parts.uri.path()
                            )))
                            .boxed(),
                        };
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

/// An upstream that breaks the rules, one way per path: a chunked body that also declares a
/// (wrong) `Content-Length`, a 204 with a `Content-Length`, and a 101 nobody asked for.
async fn misbehaving_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 1024];
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let resp: &[u8] = match path.as_str() {
                        "/te-and-cl" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
                        "/no-content" => b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
                        "/switch" => b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: nothing\r\nConnection: upgrade\r\n\r\n",
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    };
                    if s.write_all(resp).await.is_err() || path == "/switch" {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads one response from a raw connection: status, headers (names lowercase) and body, framed
/// by content-length or chunked; none after HEAD. Bytes past it stay in `buf`.
async fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_only: bool,
) -> (u16, Vec<(String, String)>, String) {
    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed in the middle of a response");
        buf.extend_from_slice(&chunk[..n]);
    }
    let (status, headers, n) = loop {
        let mut hs = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut hs);
        if let httparse::Status::Complete(n) = r.parse(buf).unwrap() {
            let headers: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            break (r.code.unwrap(), headers, n);
        }
        fill(s, buf).await;
    };
    buf.drain(..n);
    let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if head_only {
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().unwrap();
        while buf.len() < len {
            fill(s, buf).await;
        }
        body.extend(buf.drain(..len));
    } else {
        assert_eq!(get("transfer-encoding").as_deref(), Some("chunked"), "no framing: {headers:?}");
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(s, buf).await;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16).unwrap();
            while buf.len() < line_end + 2 + size + 2 {
                fill(s, buf).await;
            }
            body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    }
    (status, headers, String::from_utf8(body).unwrap())
}

/// Plaintext HTTP/1.1 requests without a body are served by the proxy's own HTTP/1 server; the
/// first request it does not take (here one with a body) moves the connection to hyper's, with
/// no byte lost, and the connection goes on. Framing seen by a raw client: content-length,
/// chunked for a body of unknown length, none after HEAD, and `connection: close` honoured.
#[tokio::test]
async fn bodyless_requests_then_a_body_on_one_raw_connection() {
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let up = streaming_server(go.clone()).await;
    let proxy = mycel_proxy::start(config("http", &[up])).await.unwrap();
    let front = proxy.listener("front").await.unwrap();
    let mut s = TcpStream::connect(front).await.unwrap();
    let mut buf = Vec::new();
    let has = |headers: &[(String, String)], name: &str| headers.iter().any(|(k, _)| k == name);

    s.write_all(b"GET /one HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let (status, headers, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!((status, body.as_str()), (200, "ok GET /one 0"));
    assert!(has(&headers, "content-length") && has(&headers, "date"), "{headers:?}");
    assert!(!has(&headers, "connection"), "{headers:?}");

    s.write_all(b"HEAD /two HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let (status, _, _) = read_response(&mut s, &mut buf, true).await;
    assert_eq!(status, 200);

    s.write_all(b"GET /stream HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let (status, headers, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!((status, body.as_str()), (200, "one,two,three"), "{headers:?}");

    // A streamed response flows: its head and first chunk arrive while the upstream still holds
    // the rest (it sends it only once the client has seen the first chunk).
    s.write_all(b"GET /wait HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while !buf.windows(6).any(|w| w == b"first,") {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(seen.is_ok(), "the first chunk was held back: {:?}", String::from_utf8_lossy(&buf));
    go.notify_one();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!((status, body.as_str()), (200, "first,last"));

    // A body: hyper serves the connection from here, starting with the bytes already read.
    s.write_all(b"POST /three HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello").await.unwrap();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!((status, body.as_str()), (200, "ok POST /three 5"));
    s.write_all(b"GET /four HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!((status, body.as_str()), (200, "ok GET /four 0"));
    assert!(buf.is_empty(), "stray bytes after the responses: {:?}", String::from_utf8_lossy(&buf));

    // `Connection: close`: the response says so and the proxy closes the connection.
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(b"GET /five HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n").await.unwrap();
    let (status, headers, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!((status, body.as_str()), (200, "ok GET /five 0"));
    assert!(headers.iter().any(|(k, v)| k == "connection" && v == "close"), "{headers:?}");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty() && buf.is_empty());
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// What goes to hyper's server mid-connection (a head split over two reads, pipelined requests,
/// HTTP/1.0) is answered whole and in order; an upstream that breaks the framing rules does not
/// desynchronise the client's connection; an idle connection is closed when the proxy drains.
#[tokio::test]
async fn handoffs_a_misbehaving_upstream_and_draining_an_idle_connection() {
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let up = streaming_server(go).await;
    let proxy = mycel_proxy::start(config("http", &[up])).await.unwrap();
    let front = proxy.listener("front").await.unwrap();
    let mut buf = Vec::new();

    // A head in two writes (the proxy may read the first part alone), then two requests in one.
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(b"GET /split HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"st: svc\r\n\r\n").await.unwrap();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!((status, body.as_str()), (200, "ok GET /split 0"));
    s.write_all(b"GET /p1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /p2 HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let (_, _, first) = read_response(&mut s, &mut buf, false).await;
    let (_, _, second) = read_response(&mut s, &mut buf, false).await;
    assert_eq!((first.as_str(), second.as_str()), ("ok GET /p1 0", "ok GET /p2 0"));

    // HTTP/1.0: answered, then closed.
    let mut s10 = TcpStream::connect(front).await.unwrap();
    s10.write_all(b"GET /ten HTTP/1.0\r\n\r\n").await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s10.read_to_end(&mut all)).await.unwrap().unwrap();
    let all = String::from_utf8_lossy(&all);
    assert!(all.starts_with("HTTP/1.0 200") && all.ends_with("ok GET /ten 0"), "{all}");

    // An idle connection (its last request served by the proxy's own server), closed on drain below.
    let mut idle = TcpStream::connect(front).await.unwrap();
    idle.write_all(b"GET /idle HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let mut idle_buf = Vec::new();
    let (status, _, _) = read_response(&mut idle, &mut idle_buf, false).await;
    assert_eq!(status, 200);

    // The misbehaving upstream, through a second proxy.
    let bad = mycel_proxy::start(config("http", &[misbehaving_server().await])).await.unwrap();
    let mut b = TcpStream::connect(bad.listener("front").await.unwrap()).await.unwrap();
    let mut bbuf = Vec::new();
    b.write_all(b"GET /te-and-cl HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let (status, headers, body) = read_response(&mut b, &mut bbuf, false).await;
    assert_eq!((status, body.as_str()), (200, "hello world"), "{headers:?}");
    let framing = headers.iter().filter(|(k, _)| k == "content-length" || k == "transfer-encoding").count();
    assert_eq!(framing, 1, "{headers:?}");
    b.write_all(b"GET /no-content HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let (status, headers, _) = read_response(&mut b, &mut bbuf, true).await;
    assert_eq!(status, 204);
    assert!(!headers.iter().any(|(k, _)| k == "content-length" || k == "transfer-encoding"), "{headers:?}");
    b.write_all(b"GET /switch HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let (status, headers, _) = read_response(&mut b, &mut bbuf, false).await;
    assert_eq!(status, 502, "{headers:?}");
    b.write_all(b"GET /after HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let (status, _, body) = read_response(&mut b, &mut bbuf, false).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert!(bbuf.is_empty(), "stray bytes: {:?}", String::from_utf8_lossy(&bbuf));
    bad.shutdown(Duration::from_secs(1)).await;

    proxy.shutdown(Duration::from_secs(2)).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}
