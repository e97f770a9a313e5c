//! Global rate limits and quotas end to end on loopback: inbound sidecars ask the rate-limit
//! service (the library's server, over mutual TLS with certificates of a test CA), which counts
//! in a real Redis (`redis-server`, started here on a free loopback port).

mod common;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::Pki;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jiff::Timestamp;
use mycel_api::v1alpha1 as pb;
use mycel_proxy::{
    Running,
    config::Config,
    rls::{
        Grpc, Service,
        store::{RedisConfig, Store},
    },
    tls::mtls::MeshTls,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const DOMAIN: &str = "test.local";
const RLS: &str = "spiffe://test.local/ns/mycel-system/sa/mycel-ratelimit";
const SHOP: &str = "spiffe://test.local/ns/shop/sa/server";
const WEB: &str = "spiffe://test.local/ns/web/sa/client";

/// A redis-server of its own on a free loopback port, stopped when dropped.
struct Redis {
    port: u16,
    child: Option<Child>,
    /// A node of a Redis Cluster: its state file.
    cluster_file: Option<String>,
}

impl Redis {
    async fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let mut r = Redis { port, child: None, cluster_file: None };
        r.restart().await;
        r
    }

    /// A node of a Redis Cluster, not yet joined to one. Its bus is on port + 10000, so the
    /// port is one below 55536.
    async fn cluster_node() -> Redis {
        let port = loop {
            let p = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
            if p < 55_536 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
                break p;
            }
        };
        let file = format!("mycel-test-nodes-{port}-{}.conf", std::process::id());
        let mut r = Redis { port, child: None, cluster_file: Some(file) };
        r.restart().await;
        r
    }

    async fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .args(match &self.cluster_file {
                Some(f) => vec!["--cluster-enabled", "yes", "--cluster-config-file", f.as_str()],
                None => vec![],
            })
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server: {e} (scripts/setup installs it: apt-get install redis-server)")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", self.port)).await {
                let mut buf = [0u8; 7];
                if c.write_all(b"PING\r\n").await.is_ok()
                    && c.read_exact(&mut buf).await.is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not answer on port {} in 20 s", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        if let Some(f) = &self.cluster_file {
            let _ = std::fs::remove_file(format!("/tmp/{f}"));
        }
    }
}

/// The number of keys a Redis node holds.
fn keys_at(port: u16) -> u64 {
    let out =
        Command::new("redis-cli").args(["-p", &port.to_string(), "DBSIZE"]).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("DBSIZE said {out:?}"))
}

fn service(redis: &Redis) -> Arc<Service> {
    let store = Store::new(&RedisConfig {
        addresses: vec![redis.address()],
        cluster: false,
        password: None,
        // Generous: a loaded 2-core machine may take its time (the failure test's bound is the
        // sidecars' timeout, not this one).
        timeout: Duration::from_secs(5),
        tls_ca: None,
    })
    .unwrap();
    Arc::new(Service::new(Arc::new(store), "mycel-system".into(), DOMAIN.into()))
}

/// The rate-limit service on a loopback port, over mutual TLS as `RLS`.
async fn rate_limit_service(pki: &Pki, redis: &Redis) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mesh = Arc::new(MeshTls::default());
    mesh.set_identity(&pki.identity(RLS)).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let grpc = Grpc { service: service(redis), local: false };
    (addr, tokio::spawn(mycel_proxy::rls::serve::serve(l, grpc, Some(mesh))))
}

/// An app that answers 200.
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An inbound sidecar of the shop in front of `app`, counting `limits` (YAML list items) at the
/// rate-limit service `rls`.
async fn sidecar(pki: &Pki, app: SocketAddr, rls: SocketAddr, limits: &str) -> (Running, SocketAddr) {
    let limits = format!("rateLimits:\n{limits}");
    proxy_of(pki, SHOP, "inbound", "protocol: auto, direction: inbound", app, rls, &limits).await
}

/// A proxy of identity `id` with one listener, `name` with `attrs`, in front of `app`, the
/// rate-limit service at `rls`, and `limits` (YAML).
async fn proxy_of(
    pki: &Pki,
    id: &str,
    name: &str,
    attrs: &str,
    app: SocketAddr,
    rls: SocketAddr,
    limits: &str,
) -> (Running, SocketAddr) {
    let yaml = format!(
        "admin: '127.0.0.1:0'\nlisteners:\n- {{name: {name}, address: '127.0.0.1:0', cluster: app, {attrs}}}\nclusters:\n- {{name: app, endpoints: ['{app}']}}\nrateLimitService: {{address: '{rls}', identity: '{RLS}', timeoutMs: 1000}}\n{limits}"
    );
    let proxy = mycel_proxy::start(Config::parse(&yaml).unwrap()).await.unwrap();
    proxy.shared.mesh.set_identity(&pki.identity(id)).unwrap();
    let addr = proxy.listener(name).await.unwrap();
    (proxy, addr)
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, hyper::HeaderMap) {
    get_for(addr, "shop", path, headers).await
}

/// GET `path` of `host` through `addr`: the status and the headers.
async fn get_for(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().uri(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        tx.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("the sidecar answers within 10 s")
    .unwrap();
    let (parts, body) = resp.into_parts();
    let _ = body.collect().await;
    (parts.status.as_u16(), parts.headers)
}

#[tokio::test]
async fn two_sidecars_share_one_counter() {
    let (pki, redis) = (Pki::new(), Redis::start().await);
    let (rls, _s) = rate_limit_service(&pki, &redis).await;
    let app = app().await;
    let limits = "- {policy: shop/limits, name: shared, requests: 10, perSeconds: 3600, global: {}}\n";
    let (_a, a) = sidecar(&pki, app, rls, limits).await;
    let (_b, b) = sidecar(&pki, app, rls, limits).await;
    let (mut admitted, mut refused) = (0, 0);
    for _ in 0..8 {
        for at in [a, b] {
            let (status, headers) = get(at, "/", &[]).await;
            match status {
                200 => admitted += 1,
                429 => {
                    refused += 1;
                    assert_eq!(headers["x-mycel-error"], "RL rate_limited", "{headers:?}");
                    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                    // One request in 360 s comes back.
                    assert!((300..=360).contains(&retry), "retry-after {retry}");
                }
                s => panic!("status {s}: {headers:?}"),
            }
        }
    }
    assert_eq!((admitted, refused), (10, 6), "10 an hour across both sidecars, not 10 each");
}

#[tokio::test]
async fn each_value_of_the_key_has_its_own_counter_across_sidecars() {
    let (pki, redis) = (Pki::new(), Redis::start().await);
    let (rls, _s) = rate_limit_service(&pki, &redis).await;
    let app = app().await;
    let limits = "- {policy: shop/limits, name: per-user, requests: 3, perSeconds: 3600, key: {header: x-user}, global: {}}\n";
    let (_a, a) = sidecar(&pki, app, rls, limits).await;
    let (_b, b) = sidecar(&pki, app, rls, limits).await;
    for _ in 0..3 {
        assert_eq!(get(a, "/", &[("x-user", "alice")]).await.0, 200);
    }
    assert_eq!(get(b, "/", &[("x-user", "alice")]).await.0, 429, "alice spent hers at the other sidecar");
    assert_eq!(get(b, "/", &[("x-user", "bob")]).await.0, 200);
    // A value longer than the service takes is counted by its digest, still apart.
    let (long_a, long_b) = ("a".repeat(5000), "b".repeat(5000));
    for _ in 0..3 {
        assert_eq!(get(a, "/", &[("x-user", &long_a)]).await.0, 200);
    }
    assert_eq!(get(b, "/", &[("x-user", &long_a)]).await.0, 429);
    assert_eq!(get(b, "/", &[("x-user", &long_b)]).await.0, 200);
}

/// A client of the service that proves `id`.
fn client(pki: &Pki, rls: SocketAddr, id: &str) -> mycel_proxy::policy::global::Client {
    let mesh = Arc::new(MeshTls::default());
    mesh.set_identity(&pki.identity(id)).unwrap();
    let s = mycel_proxy::config::ratelimit::Service {
        address: rls.to_string(),
        identity: RLS.into(),
        timeout_ms: 2000,
    };
    mycel_proxy::policy::global::Client::new(&s, mesh).unwrap()
}

fn hit(policy: &str) -> pb::Hit {
    pb::Hit {
        policy: policy.into(),
        limit: "l".into(),
        key: String::new(),
        requests: 5,
        per_seconds: 60,
        burst: 5,
        window: pb::QuotaWindow::None as i32,
        time_zone: String::new(),
        shadow: false,
    }
}

#[tokio::test]
async fn a_tenant_cannot_spend_another_tenants_counters() {
    let (pki, redis) = (Pki::new(), Redis::start().await);
    let (rls, _s) = rate_limit_service(&pki, &redis).await;
    let web = client(&pki, rls, WEB);
    let ask = |hits: Vec<pb::Hit>| web.ask(pb::CheckRequest { hits });
    let e = ask(vec![hit("shop/limits")]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("namespace web"), "{}", e.message());
    // Its own namespace's and the root namespace's it may.
    let v = ask(vec![hit("web/limits"), hit("mycel-system/mesh")]).await.unwrap();
    assert!(v.iter().all(|v| v.admitted), "{v:?}");
    assert_eq!(v[0].remaining, 4);
    // A root-namespace policy applies across the mesh, but one namespace cannot spend it for
    // another: each namespace has its own counter.
    let shop = client(&pki, rls, SHOP);
    for _ in 0..5 {
        let v = shop.ask(pb::CheckRequest { hits: vec![hit("mycel-system/mesh")] }).await.unwrap();
        assert!(v[0].admitted);
    }
    let v = shop.ask(pb::CheckRequest { hits: vec![hit("mycel-system/mesh")] }).await.unwrap();
    assert!(!v[0].admitted, "shop spent its 5");
    let v = ask(vec![hit("mycel-system/mesh")]).await.unwrap();
    assert!(v[0].admitted && v[0].remaining == 3, "web's are its own: {v:?}");
    // A caller of another trust domain may not.
    let other = client(&pki, rls, "spiffe://elsewhere.local/ns/web/sa/client");
    let e = other.ask(pb::CheckRequest { hits: vec![hit("web/limits")] }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Out of bounds: the field named.
    let e = ask(vec![hit("web/limits"); 65]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // A hit it cannot count fails alone, naming the field; the others are counted.
    let mut long = hit("web/limits");
    long.key = "k".repeat(513);
    let v = ask(vec![hit("web/other"), long]).await.unwrap();
    assert!(v[0].admitted && v[0].error.is_empty(), "{v:?}");
    assert!(!v[1].admitted && v[1].error.contains("hits[1]") && v[1].error.contains("key"), "{v:?}");
    // Plaintext gets no answer at all.
    let mut c = TcpStream::connect(rls).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert!(n == 0 || buf[0] == 0x15, "plaintext gets a TLS alert or nothing, not HTTP/2: {:?}", &buf[..n]);
}

#[tokio::test]
async fn while_redis_is_down_each_limit_fails_open_or_closed() {
    let (pki, mut redis) = (Pki::new(), Redis::start().await);
    let (rls, _s) = rate_limit_service(&pki, &redis).await;
    let app = app().await;
    let (open, o) = sidecar(
        &pki,
        app,
        rls,
        "- {policy: shop/open, name: open, requests: 1000, perSeconds: 60, global: {failureOpen: true}}\n",
    )
    .await;
    let (_closed, c) = sidecar(
        &pki,
        app,
        rls,
        "- {policy: shop/closed, name: closed, requests: 1000, perSeconds: 60, global: {failureOpen: false}}\n",
    )
    .await;
    assert_eq!(get(o, "/", &[]).await.0, 200);
    assert_eq!(get(c, "/", &[]).await.0, 200);
    redis.stop();
    let started = Instant::now();
    assert_eq!(get(o, "/", &[]).await.0, 200, "fail open: admitted");
    let (status, headers) = get(c, "/", &[]).await;
    assert_eq!(status, 503, "fail closed: refused");
    assert_eq!(headers["x-mycel-error"], "RLSE rate_limit_service_unavailable");
    // Within the service's timeout (1 s here) each, not a hang.
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
    let metrics = admin_metrics(open.admin).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("mycel_ratelimit_decisions_total")
            && l.contains("result=\"failure_open\"")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Back when Redis is.
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(c, "/", &[]).await.0 != 200 {
        assert!(Instant::now() < deadline, "still refused 30 s after Redis came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn admin_metrics(admin: SocketAddr) -> String {
    let s = TcpStream::connect(admin).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder().uri("/metrics").header("host", "admin").body(Empty::<Bytes>::new()).unwrap();
    let body = tx.send_request(req).await.unwrap().into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn a_daily_quota_outlives_the_service_and_the_sidecar_that_counted_it() {
    let (pki, redis) = (Pki::new(), Redis::start().await);
    let app = app().await;
    let limits = "- {policy: shop/quota, name: daily, requests: 5, perSeconds: 86400, global: {window: day, timeZone: UTC}}\n";
    {
        let (rls, service) = rate_limit_service(&pki, &redis).await;
        let (_a, a) = sidecar(&pki, app, rls, limits).await;
        for _ in 0..5 {
            assert_eq!(get(a, "/", &[]).await.0, 200);
        }
        let (status, headers) = get(a, "/", &[]).await;
        assert_eq!(status, 429);
        // Until midnight UTC.
        let retry: i64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        let now = Timestamp::now().as_second();
        let midnight = (now / 86_400 + 1) * 86_400;
        assert!((retry - (midnight - now)).abs() <= 5, "retry-after {retry}, midnight in {}", midnight - now);
        service.abort();
    }
    // Another service, another sidecar: the same count, in Redis.
    let (rls, _s) = rate_limit_service(&pki, &redis).await;
    let (_b, b) = sidecar(&pki, app, rls, limits).await;
    assert_eq!(get(b, "/", &[]).await.0, 429);
}

fn rate(key: &str, requests: u64, per_seconds: u64, burst: u64) -> pb::Hit {
    pb::Hit {
        policy: "shop/limits".into(),
        limit: "rate".into(),
        key: key.into(),
        requests,
        per_seconds,
        burst,
        window: pb::QuotaWindow::None as i32,
        time_zone: String::new(),
        shadow: false,
    }
}

/// The service's decisions by its clock, moved by the test: a rate admits what it says over
/// time whatever share each caller asks, and a quota starts anew at its window's boundary.
#[tokio::test]
async fn rates_hold_over_time_and_quotas_reset_at_the_boundary() {
    let redis = Redis::start().await;
    let s = service(&redis);
    let t0 = Timestamp::now().as_millisecond();
    // 50 a second, burst 50, for 10 s: three callers asking every 2, 3 and 7 ms (about 976
    // asks a second between them).
    let mut admitted = 0;
    for ms in 0..10_000i64 {
        for every in [2, 3, 7] {
            if ms % every == 0 {
                let now = Timestamp::from_millisecond(t0 + ms).unwrap();
                let v = s.check(SHOP, &[rate("k", 50, 1, 50)], now).await.unwrap();
                admitted += v[0].admitted as u32;
            }
        }
    }
    // The burst, then one each 20 ms over the 10 s after the first.
    assert!((549..=551).contains(&admitted), "admitted {admitted}");

    // A day in Berlin, asked one millisecond before the next local midnight and at it.
    let quota = |tz: &str| pb::Hit {
        limit: "quota".into(),
        requests: 3,
        per_seconds: 86_400,
        burst: 0,
        window: pb::QuotaWindow::Day as i32,
        time_zone: tz.into(),
        ..rate("k", 0, 0, 0)
    };
    let berlin = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
    let (_, midnight) =
        mycel_proxy::rls::window_bounds(Timestamp::now(), &berlin, pb::QuotaWindow::Day).unwrap();
    let before = Timestamp::from_millisecond(midnight - 1).unwrap();
    for _ in 0..3 {
        assert!(s.check(SHOP, &[quota("Europe/Berlin")], before).await.unwrap()[0].admitted);
    }
    let v = s.check(SHOP, &[quota("Europe/Berlin")], before).await.unwrap();
    assert!(!v[0].admitted);
    assert_eq!(v[0].retry_after_ms, 1, "until local midnight");
    let at = Timestamp::from_millisecond(midnight).unwrap();
    let v = s.check(SHOP, &[quota("Europe/Berlin")], at).await.unwrap();
    assert!(v[0].admitted && v[0].remaining == 2, "{v:?}");
    // The same instant is still the 3rd in UTC: another window, another counter.
    assert!(s.check(SHOP, &[quota("UTC")], before).await.unwrap()[0].admitted);

    // What is left, without counting.
    let r = pb::RemainingRequest {
        policy: "shop/limits".into(),
        limit: "quota".into(),
        key: "k".into(),
        requests: 3,
        per_seconds: 86_400,
        burst: 0,
        window: pb::QuotaWindow::Day as i32,
        time_zone: "Europe/Berlin".into(),
        namespace: String::new(),
    };
    for _ in 0..2 {
        let left = s.remaining(&r, at).await.unwrap();
        assert_eq!((left.used, left.remaining), (1, 2));
        assert_eq!(left.window_start, at.to_string());
        assert_eq!(left.reset_ms, 86_400_000);
    }
}

/// A Redis Cluster of 3 masters carries the same counters: keys spread over every master, each
/// counted exactly.
#[tokio::test]
async fn a_redis_cluster_of_three_masters_carries_the_counters() {
    let nodes = [Redis::cluster_node().await, Redis::cluster_node().await, Redis::cluster_node().await];
    let mut create = Command::new("redis-cli");
    create.args(["--cluster", "create"]);
    for n in &nodes {
        create.arg(n.address());
    }
    let out = create.args(["--cluster-replicas", "0", "--cluster-yes"]).output().expect("redis-cli");
    assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
    // Until every node agrees the cluster is whole.
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in &nodes {
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &n.port.to_string(), "CLUSTER", "INFO"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster did not become whole in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let store = Store::new(&RedisConfig {
        addresses: vec![nodes[0].address()],
        cluster: true,
        password: None,
        timeout: Duration::from_millis(1000),
        tls_ca: None,
    })
    .unwrap();
    let s = Service::new(Arc::new(store), "mycel-system".into(), DOMAIN.into());
    let now = Timestamp::now();
    // 30 keys, 5 an hour each: 7 asks of each admit 5.
    for k in 0..30 {
        let key = format!("user-{k}");
        let admitted = {
            let mut n = 0;
            for _ in 0..7 {
                n += s.check(SHOP, &[rate(&key, 5, 3600, 5)], now).await.unwrap()[0].admitted as u32;
            }
            n
        };
        assert_eq!(admitted, 5, "{key}");
    }
    let spread: Vec<u64> = nodes.iter().map(|n| keys_at(n.port)).collect();
    assert_eq!(spread.iter().sum::<u64>(), 30, "{spread:?}");
    assert!(spread.iter().all(|&n| n > 0), "every master holds some: {spread:?}");
    assert!(s.store.ping().await.is_ok());
}

/// A Redis that vanishes from the network without closing anything (its node gone, say): the
/// store notices by its timeout, and once Redis is reachable again it is used again on a new
/// connection, without a restart (the old one stays open and silent).
#[tokio::test]
async fn a_silent_connection_to_redis_is_replaced() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let redis = Redis::start().await;
    // A TCP relay to Redis that can go silent: a silenced connection is kept open but relays
    // nothing, ever; new connections are relayed again once it is healed.
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let silent = Arc::new(AtomicBool::new(false));
    let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let target = redis.address();
    {
        let (silent, epoch) = (silent.clone(), epoch.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = relay.accept().await.unwrap();
                let mine = epoch.load(SeqCst);
                let (silent, epoch, target) = (silent.clone(), epoch.clone(), target.clone());
                tokio::spawn(async move {
                    let mut outbound = TcpStream::connect(&target).await.unwrap();
                    let (mut ir, mut iw) = inbound.split();
                    let (mut or, mut ow) = outbound.split();
                    let live = || !silent.load(SeqCst) && epoch.load(SeqCst) == mine;
                    let mut a = [0u8; 4096];
                    let mut b = [0u8; 4096];
                    loop {
                        tokio::select! {
                            n = ir.read(&mut a) => {
                                let Ok(n @ 1..) = n else { return };
                                if live() { let _ = ow.write_all(&a[..n]).await; }
                            }
                            n = or.read(&mut b) => {
                                let Ok(n @ 1..) = n else { return };
                                if live() { let _ = iw.write_all(&b[..n]).await; }
                            }
                        }
                    }
                });
            }
        });
    }
    let store = Store::new(&RedisConfig {
        addresses: vec![relay_addr.to_string()],
        cluster: false,
        password: None,
        timeout: Duration::from_millis(500),
        tls_ca: None,
    })
    .unwrap();
    let ask = || store.gcra("mycel:rl:shop/p:l:k", Timestamp::now().as_millisecond() as f64, 10.0, 100);
    assert!(ask().await.is_ok());
    // Gone silent: every decision fails within the timeout, none hangs.
    silent.store(true, SeqCst);
    epoch.fetch_add(1, SeqCst);
    for _ in 0..3 {
        let started = Instant::now();
        assert!(ask().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }
    // Reachable again (for new connections only): decided again without a restart.
    silent.store(false, SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ask().await.is_err() {
        assert!(Instant::now() < deadline, "still failing 20 s after Redis came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One address cannot take every connection slot of the service: past its bound a connection
/// is closed at once, and its stalled handshakes time out and free their slots.
#[tokio::test]
async fn one_address_cannot_hold_every_connection() {
    let (pki, redis) = (Pki::new(), Redis::start().await);
    let (rls, _s) = rate_limit_service(&pki, &redis).await;
    let mut stalled = Vec::new();
    for _ in 0..mycel_proxy::rls::serve::MAX_CONNECTIONS_PER_ADDRESS {
        stalled.push(TcpStream::connect(rls).await.unwrap());
    }
    // Until the service has counted them all, one more may still be let in to wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut extra = TcpStream::connect(rls).await.unwrap();
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(500), extra.read(&mut buf)).await {
            break;
        }
        assert!(Instant::now() < deadline, "a connection past the bound was not closed");
    }
    // The stalled handshakes end (5 s), and a proxy of that address is served again.
    let web = client(&pki, rls, WEB);
    let deadline = Instant::now() + Duration::from_secs(20);
    while web.ask(pb::CheckRequest { hits: vec![hit("web/limits")] }).await.is_err() {
        assert!(Instant::now() < deadline, "not served 20 s later");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stalled);
}

#[tokio::test]
async fn a_request_that_stops_halfway_is_ended_and_others_are_served() {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let redis = Redis::start().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    // The local port serves the same bounds as the mutual-TLS one.
    tokio::spawn(mycel_proxy::rls::serve::serve(l, Grpc { service: service(&redis), local: true }, None));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    // A gRPC message that says it has 1000 bytes, and sends 10 of them.
    let mut part = vec![0u8, 0, 0, 0x03, 0xe8];
    part.extend([0u8; 10]);
    tx.send(Ok(Frame::data(Bytes::from(part)))).await.unwrap();
    let req = Request::post(format!("http://{addr}/mycel.v1alpha1.RateLimits/Remaining"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap();
    let started = Instant::now();
    let stalled = tokio::spawn(send.send_request(req));
    // Meanwhile another caller is answered.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut other = pb::rate_limits_client::RateLimitsClient::new(channel);
    let asked = pb::RemainingRequest {
        policy: "shop/p".into(),
        limit: "l".into(),
        requests: 10,
        per_seconds: 1,
        burst: 10,
        ..Default::default()
    };
    let left = other.remaining(asked).await.expect("answered while another request stalls");
    assert_eq!(left.get_ref().remaining, 10);
    let resp = tokio::time::timeout(Duration::from_secs(30), stalled)
        .await
        .expect("the stalled request is ended, not held")
        .unwrap()
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(resp.headers().get("grpc-status").map(|v| v.as_bytes()), Some(&b"4"[..]), "{resp:?}");
    let bound = mycel_proxy::rls::serve::REQUEST_TIMEOUT;
    assert!(
        waited >= bound - Duration::from_secs(1),
        "ended by the request bound ({bound:?}), not sooner: {waited:?}"
    );
    drop(tx);
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it, as PEM files in a
/// directory of their own: (directory, CA PEM).
fn tls_files(tag: &str) -> (std::path::PathBuf, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let d = std::env::temp_dir().join(format!("mycel-redis-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("redis test CA {tag}"));
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(d.join("ca.pem"), &ca_pem).unwrap();
    std::fs::write(d.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(d.join("server.key"), key.serialize_pem()).unwrap();
    (d, ca_pem)
}

#[tokio::test]
async fn counters_reach_a_redis_over_tls_verified_against_its_ca() {
    let (d, ca) = tls_files("ok");
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let mut child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", "0", "--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(d.join("server.pem"))
        .arg("--tls-key-file")
        .arg(d.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(d.join("ca.pem"))
        .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", "/tmp"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/setup installs it)");
    let store = |tls_ca: Option<Vec<u8>>| {
        Store::new(&RedisConfig {
            addresses: vec![format!("127.0.0.1:{port}")],
            cluster: false,
            password: None,
            timeout: Duration::from_secs(2),
            tls_ca,
        })
        .unwrap()
    };
    let good = store(Some(ca.into_bytes()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = good.ping().await {
        assert!(Instant::now() < deadline, "no answer over TLS in 20 s: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = Timestamp::now().as_millisecond() as f64;
    let o = good.gcra("mycel:rl:shop/p:l:1/60/1:k", now, 60_000.0, 1).await.unwrap();
    assert!(o.admitted, "counted over TLS");
    let o = good.gcra("mycel:rl:shop/p:l:1/60/1:k", now, 60_000.0, 1).await.unwrap();
    assert!(!o.admitted, "and the count is kept");
    // A server whose certificate another CA signed is not trusted; plaintext is not answered.
    let (other_dir, other) = tls_files("other");
    let e = store(Some(other.into_bytes())).ping().await.unwrap_err();
    assert!(!e.is_empty());
    assert!(store(None).ping().await.is_err(), "plaintext to a TLS port");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(d);
    let _ = std::fs::remove_dir_all(other_dir);
}

#[tokio::test]
async fn a_limit_the_service_cannot_count_fails_alone_in_its_failure_mode() {
    let (pki, redis) = (Pki::new(), Redis::start().await);
    let (rls, _s) = rate_limit_service(&pki, &redis).await;
    let app = app().await;
    // A zone name the proxy takes (its form) and the service does not know.
    let unknown = "global: {window: day, timeZone: Mars/Olympus";
    let (_a, open) = sidecar(
        &pki,
        app,
        rls,
        &format!(
            "- {{policy: shop/a, name: nowhere, requests: 5, perSeconds: 86400, {unknown}, failureOpen: true}}}}\n- {{policy: shop/a, name: two, requests: 2, perSeconds: 3600, global: {{}}}}\n"
        ),
    )
    .await;
    // The other limit is still counted: 2, then refused by it.
    let seen: Vec<u16> =
        futures::future::join_all((0..3).map(|_| get(open, "/", &[]))).await.iter().map(|r| r.0).collect();
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, [200, 200, 429], "{seen:?}");
    let (_b, closed) = sidecar(
        &pki,
        app,
        rls,
        &format!("- {{policy: shop/b, name: nowhere, requests: 5, perSeconds: 86400, {unknown}, failureOpen: false}}}}\n"),
    )
    .await;
    let (status, headers) = get(closed, "/", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-mycel-error"], "RLSE rate_limit_service_unavailable");
}

/// A client sidecar whose outbound listener sends to `app`, with `limits` on what it sends.
async fn client_sidecar(pki: &Pki, app: SocketAddr, rls: SocketAddr, limits: &str) -> (Running, SocketAddr) {
    let limits = format!("outboundRateLimits:\n{limits}");
    proxy_of(pki, WEB, "out", "protocol: http", app, rls, &limits).await
}

/// GET / through `addr` for `host`: the status and the limit that refused it, if one did.
async fn get_host(addr: SocketAddr, host: &str) -> (u16, String) {
    let (status, headers) = get_for(addr, host, "/", &[]).await;
    let limit = headers.get("x-mycel-ratelimit").map(|v| v.to_str().unwrap().to_string());
    (status, limit.unwrap_or_default())
}

#[tokio::test]
async fn outbound_limits_count_what_a_workload_sends_to_the_hosts_they_name() {
    let (pki, redis) = (Pki::new(), Redis::start().await);
    let (rls, _s) = rate_limit_service(&pki, &redis).await;
    let app = app().await;
    // In this sidecar: 2 an hour to api.example.com and its subdomains, nothing elsewhere.
    let (_c, out) = client_sidecar(
        &pki,
        app,
        rls,
        "- {policy: web/egress, name: api, requests: 2, perSeconds: 3600, hosts: [api.example.com, '*.api.example.com']}\n",
    )
    .await;
    let mut seen = Vec::new();
    for host in
        ["api.example.com", "eu.api.example.com:8443", "API.example.com", "other.example", "xapi.example.com"]
    {
        seen.push(get_host(out, host).await);
    }
    assert_eq!(
        seen,
        [
            (200, String::new()),
            (200, String::new()),
            (429, "api".to_string()),
            (200, String::new()),
            (200, String::new()),
        ],
        "the third to the API is refused by the sender's own sidecar; other hosts are not counted"
    );
    // A global one: one counter for every replica of the sending workload.
    let limits = "- {policy: web/egress, name: shared, requests: 3, perSeconds: 3600, global: {}}\n";
    let (_a, a) = client_sidecar(&pki, app, rls, limits).await;
    let (_b, b) = client_sidecar(&pki, app, rls, limits).await;
    let mut admitted = 0;
    for addr in [a, b, a, b] {
        admitted += usize::from(get_host(addr, "api.example.com").await.0 == 200);
    }
    assert_eq!(admitted, 3, "3 an hour for both replicas together");
    // A sender's limit is keyed by what its requests carry, not by a caller.
    let bad = "outboundRateLimits:\n- {policy: web/egress, name: x, requests: 1, key: sourceIp}\n";
    let e = Config::parse(bad).unwrap_err().to_string();
    assert!(e.contains("outboundRateLimits[web/egress/x].key"), "{e}");
}
