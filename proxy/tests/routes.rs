//! Route tables in a stand-alone proxy (static configuration), with real clients and servers on
//! loopback: fault delays hold a request for the configured time, a gRPC abort answers in
//! trailers-only form, and a routed cluster answers 404 for what no rule matches.

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use mycel_proxy::config::Config;
use tokio::net::{TcpListener, TcpStream};

/// An HTTP server answering `<name> <path>`.
async fn server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "{name} {}",
                        req.uri().path()
                    )))))
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

async fn send(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, hyper::HeaderMap, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let mut b = Request::get(path).header("host", "web");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = send.send_request(b.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned();
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test]
async fn fault_delays_hold_a_request_and_grpc_aborts_answer_in_trailers() {
    let a = server("a").await;
    let config = Config::parse(&format!(
        "admin: '127.0.0.1:0'
listeners:
- {{name: front, address: '127.0.0.1:0', protocol: http, cluster: web}}
clusters:
- {{name: web, endpoints: ['{a}']}}
routes:
- cluster: web
  http:
  - name: delayed
    match: [{{path: {{prefix: /delayed}}}}]
    backends: [{{cluster: web}}]
    fault: {{delay: {{percent: 100, delayMs: 400}}}}
  - name: grpc-abort
    match: [{{headers: [{{name: content-type, match: {{prefix: application/grpc}}}}]}}]
    backends: [{{cluster: web}}]
    fault: {{abort: {{percent: 100, grpcStatus: 14}}}}
  - name: plain
    match: [{{path: {{prefix: /plain}}}}]
    backends: [{{cluster: web}}]
"
    ))
    .unwrap();
    let proxy = mycel_proxy::start(config).await.unwrap();
    let front = proxy.listener("front").await.unwrap();

    let started = Instant::now();
    let (status, _, body) = send(front, "/delayed/x", &[]).await;
    let delayed = started.elapsed();
    assert_eq!((status, body.as_str()), (200, "a /delayed/x"));
    assert!(delayed >= Duration::from_millis(400), "delayed {delayed:?}, 400 ms asked");

    let (status, headers, body) = send(front, "/pkg.Svc/Call", &[("content-type", "application/grpc")]).await;
    assert_eq!(status, 200, "gRPC errors travel in grpc-status, over HTTP 200");
    assert_eq!(headers["grpc-status"], "14");
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(headers["x-mycel-error"], "FI fault_injected");
    assert!(body.is_empty(), "trailers-only: no message");

    let (status, _, body) = send(front, "/plain", &[]).await;
    assert_eq!((status, body.as_str()), (200, "a /plain"));
    let (status, headers, body) = send(front, "/elsewhere", &[]).await;
    assert_eq!(status, 404);
    assert_eq!(headers["x-mycel-error"], "NR no_route_matched");
    assert!(body.contains("no rule of"), "{body}");
    proxy.shutdown(Duration::from_secs(1)).await;
}
