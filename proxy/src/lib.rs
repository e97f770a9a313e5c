//! `mycel-proxy`: the sidecar and gateway proxy. It owns the data path — listeners, protocol
//! handling, load balancing, metrics — and must not talk to the Kubernetes API: what it knows
//! arrives from its configuration (a file today, the control plane's stream later).
//!
//! The flow of a connection, in one place: a listener accepts ([`start`]), then either
//! [`tcp::serve`] copies bytes to an endpoint of the listener's cluster, or [`http::handle`]
//! forwards each request to an endpoint chosen for it ([`balance`]); [`metrics`] counts both.

pub mod admin;
pub mod balance;
pub mod capture;
pub mod config;
pub mod detect;
pub mod h1;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod mtls;
pub mod pool;
pub mod tcp;
pub mod xds;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, RwLock, atomic::AtomicBool},
    time::Duration,
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    net::TcpListener,
    sync::{Mutex, watch},
    task::{JoinHandle, JoinSet},
};
use tracing::{info, warn};

use crate::{
    balance::Endpoints,
    config::{Config, ConfigError},
    metrics::ListenerLabels,
};

/// State every connection can reach. Listeners and requests look their configuration up here
/// each time, so that a new configuration applies to new connections and requests at once while
/// those in flight finish as they started.
/// Reads (`None`) or sets (`Some(filter)`) the log filter; returns the filter now in force, or
/// why the new one was refused. The binary installs it; the library only serves `/logging`.
pub type LogControl = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

pub struct Shared {
    pub config: RwLock<Config>,
    pub log_control: RwLock<Option<LogControl>>,
    clusters: RwLock<BTreeMap<String, Arc<Endpoints>>>,
    /// Virtual address → cluster, for captured outbound connections.
    vips: RwLock<std::collections::HashMap<SocketAddr, String>>,
    pub metrics: metrics::Metrics,
    /// Upstream HTTP connections.
    pub pool: pool::Pool,
    /// Keys and endpoint identities for mutual TLS between sidecars.
    pub mesh: Arc<mtls::MeshTls>,
    pub ready: AtomicBool,
    /// The app's probes, by `/app-health/<container>/<kind>` path (set at injection).
    pub app_probes: RwLock<std::collections::HashMap<String, serde_json::Value>>,
}

impl Shared {
    fn cluster(&self, name: &str) -> Option<Arc<Endpoints>> {
        self.clusters.read().ok()?.get(name).cloned()
    }

    fn listener(&self, name: &str) -> Option<config::Listener> {
        self.config.read().ok()?.listeners.iter().find(|l| l.name == name).cloned()
    }
}

struct ListenerHandle {
    address: SocketAddr,
    configured: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A started proxy: where it listens, how to reconfigure it, and how to stop it.
pub struct Running {
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    listeners: Mutex<BTreeMap<String, ListenerHandle>>,
    /// Listeners removed by a reload, finishing their connections.
    retired: Mutex<JoinSet<()>>,
    admin_task: JoinHandle<()>,
}

/// Why a new configuration was not applied (the previous one keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// `field` is the setting that named the address: `listeners[i].address` or `admin`.
    #[error("{field}: cannot listen on {address}: {source}; free that port or choose another address")]
    Bind { field: String, address: SocketAddr, source: std::io::Error },
}

impl Running {
    /// Bound address of a listener (useful when its configuration asked for port 0).
    pub async fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.lock().await.get(name).map(|h| h.address)
    }

    /// Applies a new configuration whole, or not at all. Listeners whose address is unchanged
    /// keep their socket; new ones are bound before anything changes; removed ones stop
    /// accepting and let their connections finish.
    pub async fn apply(&self, new: Config) -> Result<(), ApplyError> {
        new.validate()?;
        let mut listeners = self.listeners.lock().await;
        // Bind first: a port in use fails the reload before it changed anything.
        let mut bound = Vec::new();
        for (index, l) in new.listeners.iter().enumerate() {
            let keep = listeners.get(&l.name).is_some_and(|h| h.configured == l.address);
            if !keep {
                let socket = bind(l.address).map_err(|source| ApplyError::Bind {
                    field: format!("listeners[{index}].address"),
                    address: l.address,
                    source,
                })?;
                bound.push((l.clone(), socket));
            }
        }
        self.shared.install(&new);
        let mut retired = self.retired.lock().await;
        let wanted: Vec<&str> = new.listeners.iter().map(|l| l.name.as_str()).collect();
        let moving: Vec<String> = bound.iter().map(|(l, _)| l.name.clone()).collect();
        let stale: Vec<String> = listeners
            .keys()
            .filter(|n| !wanted.contains(&n.as_str()) || moving.contains(n))
            .cloned()
            .collect();
        for name in stale {
            if let Some(h) = listeners.remove(&name) {
                let _ = h.stop.send(true);
                retired.spawn(async move {
                    let _ = h.task.await;
                });
            }
        }
        for (l, socket) in bound {
            let h = spawn_listener(l.clone(), socket, self.shared.clone());
            listeners.insert(l.name.clone(), h);
        }
        info!(listeners = listeners.len(), "configuration applied");
        Ok(())
    }

    /// Stops accepting, then waits up to `drain` for connections in flight to finish.
    pub async fn shutdown(self, drain: Duration) {
        self.shared.ready.store(false, std::sync::atomic::Ordering::Release);
        let mut all = self.retired.into_inner();
        for (_, h) in self.listeners.into_inner() {
            let _ = h.stop.send(true);
            all.spawn(async move {
                let _ = h.task.await;
            });
        }
        let _ = tokio::time::timeout(drain, async { while all.join_next().await.is_some() {} }).await;
        all.abort_all();
        self.admin_task.abort();
    }
}

impl Shared {
    /// Makes `config` the one in force. Endpoint sets that did not change keep their state
    /// (round-robin position, ejections).
    fn install(&self, config: &Config) {
        let old = self.clusters.read().map(|c| c.clone()).unwrap_or_default();
        let clusters = config
            .clusters
            .iter()
            .map(|c| {
                let timeout = Duration::from_millis(c.connect_timeout_ms);
                let endpoints = match old.get(&c.name) {
                    Some(e) if e.addrs == c.endpoints && e.connect_timeout == timeout && e.lb == c.lb => {
                        e.clone()
                    }
                    _ => Arc::new(Endpoints::with_lb(&c.name, c.endpoints.clone(), timeout, c.lb.clone())),
                };
                (c.name.clone(), endpoints)
            })
            .collect();
        let vips =
            config.clusters.iter().flat_map(|c| c.addresses.iter().map(|a| (*a, c.name.clone()))).collect();
        if let Ok(mut c) = self.clusters.write() {
            *c = clusters;
        }
        if let Ok(mut v) = self.vips.write() {
            *v = vips;
        }
        self.mesh.set_endpoints(
            config
                .clusters
                .iter()
                .flat_map(|c| c.mtls_endpoints.iter().map(|(a, id)| (*a, id.clone())))
                .collect(),
        );
        if let Ok(mut c) = self.config.write() {
            *c = config.clone();
        }
    }
}

/// A listening socket. An IPv6 one is IPv6-only, so that `0.0.0.0:p` and `[::]:p` can both be
/// bound (capture needs both families; each connection's original destination is read with
/// its own family's option).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Binds every listener and the admin server, then serves in the background.
pub async fn start(config: Config) -> Result<Running, ApplyError> {
    config.validate()?;
    let mesh = Arc::new(mtls::MeshTls::default());
    let shared = Arc::new(Shared {
        config: RwLock::new(Config { listeners: vec![], ..config.clone() }),
        log_control: RwLock::new(None),
        clusters: RwLock::new(BTreeMap::new()),
        vips: RwLock::new(Default::default()),
        metrics: metrics::Metrics::default(),
        pool: pool::Pool::new(mesh.clone()),
        mesh,
        ready: AtomicBool::new(false),
        app_probes: RwLock::new(Default::default()),
    });
    let admin_listener = bind(config.admin).map_err(|source| ApplyError::Bind {
        field: "admin".into(),
        address: config.admin,
        source,
    })?;
    let admin = admin_listener.local_addr().map_err(|source| ApplyError::Bind {
        field: "admin".into(),
        address: config.admin,
        source,
    })?;
    let admin_task = tokio::spawn(admin::serve(admin_listener, shared.clone()));
    let running = Running {
        admin,
        shared: shared.clone(),
        listeners: Mutex::new(BTreeMap::new()),
        retired: Mutex::new(JoinSet::new()),
        admin_task,
    };
    running.apply(config).await?;
    shared.ready.store(true, std::sync::atomic::Ordering::Release);
    Ok(running)
}

fn spawn_listener(l: config::Listener, socket: TcpListener, shared: Arc<Shared>) -> ListenerHandle {
    let address = socket.local_addr().unwrap_or(l.address);
    info!(listener = %l.name, %address, protocol = ?l.protocol, "listening");
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept_loop(socket, l.name.clone(), shared, stopped));
    ListenerHandle { address, configured: l.address, stop, task }
}

async fn accept_loop(
    socket: TcpListener,
    name: String,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, _peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(s) => s,
                Err(e) => { warn!(error = %e, "accept failed"); continue; }
            },
            _ = stop.changed() => break,
        };
        // The listener's settings as configured now (a reload may have changed them).
        let Some(listener) = shared.listener(&name) else { break };
        let labels = labels_for(&listener);
        let target = match &listener.cluster {
            Some(c) => Target::Cluster(c.clone()),
            None => match original_destination(&stream, &listener, &shared) {
                Ok(t) => t,
                Err(e) => {
                    warn!(listener = %name, error = %e, "cannot tell where the connection was going; closing it");
                    continue;
                }
            },
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        conns.spawn(serve_connection(stream, listener, target, labels, shared, stop));
        while conns.try_join_next().is_some() {}
    }
    while conns.join_next().await.is_some() {}
}

/// One accepted connection, from protocol detection to its end.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    listener: config::Listener,
    target: Target,
    mut labels: ListenerLabels,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let inbound = listener.direction == config::Direction::Inbound;
    let mode = match (inbound, target.port()) {
        (true, Some(port)) => shared.config.read().map(|c| c.inbound_mtls.mode_for(port)).unwrap_or_default(),
        _ => config::MtlsMode::Permissive,
    };
    // HTTP, and which version when the first bytes told it.
    let http = match listener.protocol {
        // Declared HTTP: the first bytes only choose the version (hyper reads them itself when
        // they do not tell).
        config::Protocol::Http => Some(HttpVersion::of(
            &detect::detect(&stream, Duration::from_millis(listener.detect_timeout_ms)).await,
        )),
        config::Protocol::Tcp => None,
        config::Protocol::Auto => {
            let detected = detect::detect(&stream, Duration::from_millis(listener.detect_timeout_ms)).await;
            if let detect::Detected::Tls { sni, alpn } = &detected {
                if inbound && mode != config::MtlsMode::Disable && mtls::is_mesh_alpn(alpn) {
                    labels.protocol = "mtls".into();
                    // Boxed, like the TCP path below: a task is as large as its largest state,
                    // and plaintext HTTP connections, the most numerous, need neither.
                    return Box::pin(serve_mesh_inbound(stream, listener, target, labels, shared, stop))
                        .await;
                }
                tracing::debug!(listener = %listener.name, sni = ?sni, alpn = ?alpn, "TLS ClientHello; passing through");
            }
            labels.protocol = detected.label().into();
            HttpVersion::of(&detected).map(Some)
        }
    };
    if inbound && mode == config::MtlsMode::Strict {
        shared.metrics.refused.get_or_create(&labels).inc();
        tracing::debug!(listener = %listener.name, peer = ?stream.peer_addr().ok(), "plaintext refused: mutual TLS is STRICT here");
        return;
    }
    shared.metrics.connections.get_or_create(&labels).inc();
    let active = shared.metrics.active_connections.get_or_create(&labels).clone();
    active.inc();
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    if let Some(version) = http {
        let metrics = Arc::new(http::ConnMetrics::new(&shared, &listener.name, listener.direction));
        if version == Some(HttpVersion::Http1) {
            // Plaintext HTTP/1.1: the proxy's own server first, hyper's for what it hands over.
            Box::pin(serve_http1_plain(stream, peer, metrics, target, shared, stop)).await;
        } else {
            serve_http(stream, version, peer, metrics, target, shared, stop, None).await;
        }
    } else if let Some(endpoints) = target.resolve(&shared) {
        Box::pin(tcp::serve(tcp::Stream::Plain(stream), peer, labels, endpoints, shared)).await;
    }
    active.dec();
}

/// Mutual TLS from another sidecar: terminated here, then served by what rides inside (ALPN),
/// with the peer's identity passed to HTTP apps in `x-forwarded-client-cert`.
async fn serve_mesh_inbound(
    stream: tokio::net::TcpStream,
    listener: config::Listener,
    target: Target,
    labels: ListenerLabels,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let (tls, peer_id, inner) = match shared.mesh.accept(stream).await {
        Ok(x) => x,
        Err(e) => {
            shared.metrics.refused.get_or_create(&labels).inc();
            tracing::debug!(listener = %listener.name, ?peer, error = %e, "mutual TLS refused");
            return;
        }
    };
    shared.metrics.connections.get_or_create(&labels).inc();
    let active = shared.metrics.active_connections.get_or_create(&labels).clone();
    active.inc();
    match inner {
        mtls::Inner::Tcp => {
            if let Some(endpoints) = target.resolve(&shared) {
                tcp::serve(tcp::Stream::Wrapped(Box::new(tls)), peer, labels, endpoints, shared).await;
            }
        }
        mtls::Inner::Http1 | mtls::Inner::Http2 => {
            let own = shared.mesh.own_id().unwrap_or_default();
            let xfcc = hyper::header::HeaderValue::from_str(&format!("By={own};URI={peer_id}")).ok();
            let version = if inner == mtls::Inner::Http2 { HttpVersion::Http2 } else { HttpVersion::Http1 };
            let metrics = Arc::new(http::ConnMetrics::new(&shared, &listener.name, listener.direction));
            serve_http(tls, Some(version), peer, metrics, target, shared, stop, xfcc).await;
        }
    }
    active.dec();
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HttpVersion {
    Http1,
    /// With prior knowledge (the connection preface).
    Http2,
}

impl HttpVersion {
    /// The version the first bytes told, if they were HTTP.
    fn of(detected: &detect::Detected) -> Option<HttpVersion> {
        match detected {
            detect::Detected::Http1 => Some(HttpVersion::Http1),
            detect::Detected::Http2 => Some(HttpVersion::Http2),
            _ => None,
        }
    }
}

/// HTTP/1.1, or HTTP/2 with prior knowledge, over any stream. The version is given when the
/// connection's first bytes (or its ALPN) told it; otherwise hyper reads the preface to choose.
#[allow(clippy::too_many_arguments)]
async fn serve_http<I>(
    io: I,
    version: Option<HttpVersion>,
    peer: Option<SocketAddr>,
    metrics: Arc<http::ConnMetrics>,
    target: Target,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    xfcc: Option<hyper::header::HeaderValue>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let (metrics, target, shared) = (metrics.clone(), target.clone(), shared.clone());
        if let Some(v) = &xfcc {
            req.headers_mut().insert("x-forwarded-client-cert", v.clone());
        }
        // Boxed: hyper keeps room for a request's future in every connection, idle or not; a
        // pointer there instead of the whole forwarding state saves kilobytes per connection.
        Box::pin(async move {
            Ok::<_, std::convert::Infallible>(
                respond(req.map(http_body_util::BodyExt::boxed), &metrics, peer, &target, &shared).await,
            )
        })
    });
    let io = TokioIo::new(io);
    // Draining (`stop`): finish the requests in flight, then close (`Connection: close` on
    // HTTP/1.1, GOAWAY on HTTP/2).
    match version {
        Some(HttpVersion::Http1) => {
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades();
            drain_on_stop(conn, stop, |c| c.graceful_shutdown()).await
        }
        Some(HttpVersion::Http2) => {
            let conn =
                hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc);
            drain_on_stop(conn, stop, |c| c.graceful_shutdown()).await
        }
        None => {
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(io, svc);
            drain_on_stop(conn, stop, |c| c.graceful_shutdown()).await
        }
    }
}

/// A plaintext HTTP/1.1 connection: requests without a body are served by [`h1`], which holds
/// no buffer while the connection is idle; from the first request it does not take, hyper serves
/// the connection.
async fn serve_http1_plain(
    mut stream: tokio::net::TcpStream,
    peer: Option<SocketAddr>,
    metrics: Arc<http::ConnMetrics>,
    target: Target,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let outcome = h1::serve(&mut stream, &mut stop, |req| {
        // Boxed, as for hyper: the connection's task need not have room for a request's future.
        Box::pin(respond(req, &metrics, peer, &target, &shared))
    })
    .await;
    if let h1::Outcome::Handoff(read) = outcome {
        let io = h1::Rewind::new(read, stream);
        // Boxed: the connection's task keeps room for hyper's connection only when it is used.
        Box::pin(serve_http(io, Some(HttpVersion::Http1), peer, metrics, target, shared, stop, None)).await;
    }
}

/// One request's response: forwarded to the target's cluster, or a 503 when it has none.
async fn respond(
    req: hyper::Request<http::Body>,
    metrics: &http::ConnMetrics,
    peer: Option<SocketAddr>,
    target: &Target,
    shared: &Arc<Shared>,
) -> hyper::Response<http::Body> {
    match target.resolve(shared) {
        Some(endpoints) => http::handle(req, metrics, peer, &endpoints, shared).await,
        None => http::no_cluster(&target.name()),
    }
}

/// Serves `conn` to its end; when `stop` fires first, asks it to shut down gracefully and waits.
async fn drain_on_stop<C, O>(conn: C, mut stop: watch::Receiver<bool>, shutdown: impl FnOnce(Pin<&mut C>))
where
    C: std::future::Future<Output = O>,
{
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            shutdown(conn.as_mut());
            let _ = conn.await;
        }
    }
}

/// Where a connection's traffic goes: a named cluster (looked up per request, so that a reload
/// applies to open connections too), or a fixed endpoint (a captured original destination).
#[derive(Clone)]
enum Target {
    Cluster(String),
    Fixed(Arc<Endpoints>),
}

impl Target {
    fn resolve(&self, shared: &Shared) -> Option<Arc<Endpoints>> {
        match self {
            Target::Cluster(name) => shared.cluster(name),
            Target::Fixed(e) => Some(e.clone()),
        }
    }

    /// The port of a fixed target (for inbound traffic: the port the app listens on).
    fn port(&self) -> Option<u16> {
        match self {
            Target::Cluster(_) => None,
            Target::Fixed(e) => e.addrs.first().map(|a| a.port()),
        }
    }

    fn name(&self) -> String {
        match self {
            Target::Cluster(name) => name.clone(),
            Target::Fixed(e) => e.cluster.clone(),
        }
    }
}

/// Where a captured connection goes: outbound to a cluster's virtual address, that cluster;
/// otherwise the one-endpoint "cluster" of its original destination, or for inbound traffic that
/// port on loopback (where the app listens).
fn original_destination(
    stream: &tokio::net::TcpStream,
    l: &config::Listener,
    shared: &Shared,
) -> std::io::Result<Target> {
    let mut dst = capture::original_destination(stream)?;
    let local = stream.local_addr()?;
    if dst == local {
        return Err(std::io::Error::other("addressed to the proxy itself (not redirected)"));
    }
    if l.direction == config::Direction::Outbound
        && let Some(cluster) = shared.vips.read().ok().and_then(|v| v.get(&dst).cloned())
    {
        return Ok(Target::Cluster(cluster));
    }
    if l.direction == config::Direction::Inbound {
        dst.set_ip(if dst.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(Target::Fixed(Arc::new(Endpoints::new("original-destination", vec![dst], Duration::from_secs(1)))))
}

fn labels_for(l: &config::Listener) -> ListenerLabels {
    ListenerLabels {
        direction: l.direction.as_str().into(),
        listener: l.name.clone(),
        protocol: protocol_name(l),
    }
}

fn protocol_name(l: &config::Listener) -> String {
    match l.protocol {
        config::Protocol::Auto => "auto".into(),
        config::Protocol::Http => "http".into(),
        config::Protocol::Tcp => "tcp".into(),
    }
}
