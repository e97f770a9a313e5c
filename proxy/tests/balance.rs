//! Load balancing with real servers: consistent hashing keeps a user on one endpoint (by header
//! and by cookie), peak-EWMA sends most requests to the faster of two endpoints, and a request
//! whose connection an endpoint closes before answering goes to the other when it may be resent.

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use mycel_proxy::config::Config;
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
};

async fn server(name: String, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let name = name.clone();
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

async fn start(lb: &str, endpoints: &[SocketAddr]) -> (mycel_proxy::Running, SocketAddr) {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("'{e}'")).collect();
    let proxy = mycel_proxy::start(
        Config::parse(&format!(
            "admin: '127.0.0.1:0'\nlisteners:\n- {{name: front, address: '127.0.0.1:0', protocol: http, cluster: back}}\nclusters:\n- {{name: back, lb: {lb}, endpoints: [{}]}}\n",
            eps.join(", ")
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let front = proxy.listener("front").await.unwrap();
    (proxy, front)
}

async fn get(front: SocketAddr, header: (&str, String)) -> String {
    let s = TcpStream::connect(front).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "svc")
        .header(header.0, header.1)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_keeps_each_user_on_one_endpoint() {
    let mut eps = Vec::new();
    for i in 0..4 {
        eps.push(server(format!("e{i}"), Duration::ZERO).await);
    }
    for (lb, header) in [
        ("{algorithm: ConsistentHash, hashHeader: x-user}", "x-user"),
        ("{algorithm: ConsistentHash, hashCookie: session}", "cookie"),
    ] {
        let (proxy, front) = start(lb, &eps).await;
        let mut owner: BTreeMap<u32, String> = BTreeMap::new();
        for round in 0..3 {
            for user in 0..40u32 {
                let value = if header == "cookie" {
                    format!("theme=dark; session=s{user}")
                } else {
                    format!("u{user}")
                };
                let got = get(front, (header, value)).await;
                let first = owner.entry(user).or_insert_with(|| got.clone());
                assert_eq!(*first, got, "{lb}: user {user} moved in round {round}");
            }
        }
        let used: std::collections::BTreeSet<_> = owner.values().collect();
        assert!(used.len() >= 3, "{lb}: users spread over the endpoints: {used:?}");
        proxy.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_favours_the_faster_endpoint() {
    let fast = server("fast".into(), Duration::from_millis(1)).await;
    let slow = server("slow".into(), Duration::from_millis(40)).await;
    let (proxy, front) = start("{algorithm: PeakEwma}", &[fast, slow]).await;
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    // Four clients in parallel, 50 requests each.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..50 {
                    seen.push(get(front, ("x-any", "1".into())).await);
                }
                seen
            })
        })
        .collect();
    for c in clients {
        for s in c.await.unwrap() {
            *counts.entry(s).or_default() += 1;
        }
    }
    let fast_share = counts.get("fast").copied().unwrap_or(0);
    eprintln!("peak-EWMA: {counts:?}");
    assert!(fast_share >= 160, "most of 200 requests went to the fast endpoint: {counts:?}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// A server that reads each request and closes its connection without an answer, as an app
/// does that exits while connections are open.
async fn closer() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

/// `method path` to `addr` on a connection of its own (a POST with a body): status and body.
async fn send_to(addr: SocketAddr, method: &str, path: &str, host: &str) -> (u16, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let body = if method == "POST" { Bytes::from_static(b"order") } else { Bytes::new() };
    let req = Request::builder().method(method).uri(path).header("host", host).body(Full::new(body)).unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned())
}

async fn send(front: SocketAddr, method: &str) -> (u16, String) {
    send_to(front, method, "/", "svc").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayable_request_whose_connection_breaks_goes_to_another_endpoint() {
    let good = server("good".into(), Duration::ZERO).await;
    let bad = closer().await;
    let (proxy, front) = start("{algorithm: RoundRobin}", &[good, bad]).await;
    let started = std::time::Instant::now();
    // GET without a body: answered by the endpoint that answers. The first three fit the
    // destination's starting retry budget (3) whatever the balancer chose first.
    for i in 0..3 {
        let (status, body) = send(front, "GET").await;
        assert_eq!((status, body.as_str()), (200, "good"), "GET {i}");
    }
    // Resends spend that budget (each request earns 0.2, time 3 a second): a burst of GETs to a
    // closer is not sent twice over.
    for _ in 0..20 {
        let (status, body) = send(front, "GET").await;
        assert!(matches!((status, body.as_str()), (200, "good") | (502, _)), "{status} {body}");
    }
    let budget = 3.0 + 23.0 * 0.2 + 3.0 * started.elapsed().as_secs_f64();
    // A POST may have been acted on: it is not sent twice, so those that reached the closer fail.
    let mut failed = 0;
    for _ in 0..6 {
        let (status, body) = send(front, "POST").await;
        match status {
            200 => assert_eq!(body, "good"),
            502 => failed += 1,
            other => panic!("POST: {other} {body}"),
        }
    }
    assert!(failed >= 1, "round robin sent some POSTs to the closer, and they were not resent");
    let (_, metrics) = send_to(proxy.admin, "GET", "/metrics", "admin").await;
    let resent: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("mycel_proxy_retries_total{") && l.contains("outcome=\"after_reset\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(resent >= 3.0, "resends are counted:\n{metrics}");
    assert!(resent <= budget.floor(), "{resent} resends, more than the budget allowed ({budget:.1})");
    proxy.shutdown(Duration::from_secs(1)).await;
}
