//! Sockets: listening, accepting, where a captured connection was going, and what protocol it
//! speaks. A listener's accept loop ([`accept_loop`]) builds each connection's context and hands
//! it to its direction's stack ([`crate::inbound::connection`], [`crate::outbound::connection`]).

pub mod capture;
pub mod detect;
pub mod tcp;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    Shared,
    balance::Endpoints,
    config::{self, Direction},
    context::{Conn, HttpConn, Target},
    drain, http,
    state::State,
    telemetry::{ConnMetrics, ListenerLabels},
    tls::mtls,
};

/// A listener's accept loop, and how to stop it.
pub struct ListenerHandle {
    pub address: SocketAddr,
    pub configured: SocketAddr,
    pub stop: drain::Signal,
    pub task: JoinHandle<()>,
}

/// A listening socket. An IPv6 one is IPv6-only, so that `0.0.0.0:p` and `[::]:p` can both be
/// bound (capture needs both families; each connection's original destination is read with
/// its own family's option).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
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

pub fn spawn_listener(l: &config::Listener, socket: TcpListener, shared: Arc<Shared>) -> ListenerHandle {
    let address = socket.local_addr().unwrap_or(l.address);
    info!(listener = %l.name, %address, protocol = ?l.protocol, "listening");
    let (stop, stopped) = drain::channel();
    let task = tokio::spawn(accept_loop(socket, l.name.clone(), shared, stopped));
    ListenerHandle { address, configured: l.address, stop, task }
}

/// How long an accept loop pauses when the process is out of file descriptors (so it does not
/// spin on an error that only a closing connection can clear).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts until `stop` fires, then waits for the connections it accepted to finish.
async fn accept_loop(socket: TcpListener, name: String, shared: Arc<Shared>, mut stop: drain::Watch) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(listener = %name, error = %e, "accept failed");
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                        tokio::select! {
                            _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                            _ = stop.changed() => break,
                        }
                    }
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        // The listener as configured now (an update may have changed it).
        let state = shared.state.load();
        let Some(listener) = state.listener(&name) else { break };
        let target = match target(&stream, listener, &state) {
            Ok(t) => t,
            Err(e) => {
                warn!(listener = %name, error = %e, "cannot tell where the connection was going; closing it");
                continue;
            }
        };
        let conn = Conn {
            direction: listener.direction,
            labels: labels_for(listener),
            protocol: listener.protocol,
            detect_timeout: Duration::from_millis(listener.detect_timeout_ms),
            limits: state.config.limits,
            peer: Some(peer),
            target,
            peer_id: None,
        };
        drop(state);
        let (shared, stop) = (shared.clone(), stop.clone());
        match conn.direction {
            Direction::Inbound => conns.spawn(crate::inbound::connection(stream, conn, shared, stop)),
            Direction::Outbound => conns.spawn(crate::outbound::connection(stream, conn, shared, stop)),
        };
        while conns.try_join_next().is_some() {}
    }
    // Closed before the wait: a new connection is refused at once (and goes to another
    // endpoint) instead of waiting in the backlog for a drain that will never serve it.
    drop(socket);
    while conns.join_next().await.is_some() {}
}

/// Where a connection goes: the listener's cluster; or, captured, the cluster of the virtual
/// address it was sent to, else the one-endpoint set of its original destination — for inbound
/// traffic that port on loopback, where the app listens.
pub fn target(
    stream: &tokio::net::TcpStream,
    l: &config::Listener,
    state: &State,
) -> std::io::Result<Target> {
    if let Some(c) = &l.cluster {
        return Ok(Target::Cluster(c.clone()));
    }
    let mut dst = capture::original_destination(stream)?;
    let local = stream.local_addr()?;
    if dst == local {
        return Err(std::io::Error::other("addressed to the proxy itself (not redirected)"));
    }
    if l.direction == Direction::Outbound
        && let Some(cluster) = state.by_vip(&dst)
    {
        return Ok(Target::Cluster(cluster.cluster.clone()));
    }
    // Outbound to an address of its own (a pod IP, a headless Service's endpoint): mutual TLS
    // when the mesh knows whose it is. Inbound: the app, on loopback, in plaintext.
    let identity = match l.direction {
        Direction::Outbound => state.identity_of(&dst).cloned(),
        Direction::Inbound => {
            dst.set_ip(if dst.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
            None
        }
    };
    Ok(Target::Fixed(Arc::new(Endpoints::single(
        "original-destination",
        dst,
        Duration::from_secs(1),
        identity,
    ))))
}

fn labels_for(l: &config::Listener) -> ListenerLabels {
    let protocol = match l.protocol {
        config::Protocol::Auto => "auto",
        config::Protocol::Http => "http",
        config::Protocol::Tcp => "tcp",
    };
    ListenerLabels {
        direction: l.direction.as_str().into(),
        listener: l.name.clone(),
        protocol: protocol.into(),
    }
}

/// What a connection's first bytes (or its listener) said it carries.
pub enum Seen {
    /// Mutual TLS from another sidecar (its ALPN is the mesh's).
    MeshTls,
    /// HTTP: the version when the first bytes told it (hyper reads the preface otherwise).
    Http(Option<http::Version>),
    /// Anything else, proxied byte for byte.
    Opaque,
}

/// Protocol detection, as the listener asks: declared HTTP only chooses the version, declared
/// TCP reads nothing, `auto` tells HTTP from TLS from anything else (and the metrics' protocol
/// label says which). Mesh TLS is recognised only where `mesh_tls` is accepted.
pub async fn sniff(stream: &tokio::net::TcpStream, conn: &mut Conn, mesh_tls: bool) -> Seen {
    match conn.protocol {
        // Declared HTTP: the first bytes only choose the version. Without them (a client that
        // connects ahead of its first request) it is HTTP/1.1, whose server bounds the wait.
        config::Protocol::Http => Seen::Http(Some(
            version_of(&detect::detect(stream, conn.detect_timeout).await).unwrap_or(http::Version::Http1),
        )),
        config::Protocol::Tcp => Seen::Opaque,
        config::Protocol::Auto => {
            let detected = detect::detect(stream, conn.detect_timeout).await;
            if let detect::Detected::Tls { sni, alpn } = &detected {
                if mesh_tls && mtls::is_mesh_alpn(alpn) {
                    conn.labels.protocol = "mtls".into();
                    return Seen::MeshTls;
                }
                tracing::debug!(listener = %conn.listener(), sni = ?sni, alpn = ?alpn, "TLS ClientHello; passing through");
            }
            conn.labels.protocol = detected.label().into();
            match version_of(&detected) {
                Some(v) => Seen::Http(Some(v)),
                None => Seen::Opaque,
            }
        }
    }
}

fn version_of(detected: &detect::Detected) -> Option<http::Version> {
    match detected {
        detect::Detected::Http1 => Some(http::Version::Http1),
        detect::Detected::Http2 => Some(http::Version::Http2),
        _ => None,
    }
}

/// Counts a connection as open until the guard is dropped (the one place connection counters
/// are kept).
pub fn opened(conn: &Conn, shared: &Shared) -> OpenConnection {
    shared.metrics.connections.get_or_create(&conn.labels).inc();
    let active = shared.metrics.active_connections.get_or_create(&conn.labels).clone();
    active.inc();
    OpenConnection(active)
}

pub struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A plaintext connection, as detected: HTTP request by request, or TCP to the target.
pub async fn serve_plain(
    stream: tokio::net::TcpStream,
    seen: Seen,
    conn: Conn,
    shared: Arc<Shared>,
    stop: drain::Watch,
) {
    let _open = opened(&conn, &shared);
    let _ = stream.set_nodelay(true);
    match seen {
        Seen::Http(version) => {
            let metrics = ConnMetrics::new(&shared.metrics, conn.listener(), conn.direction);
            let conn = Arc::new(HttpConn { conn, metrics, forwarded_client_cert: None });
            if version == Some(http::Version::Http1) {
                // Plaintext HTTP/1.1: the proxy's own server first, hyper's for what it hands over.
                Box::pin(http::serve_plain_http1(stream, conn, shared, stop)).await;
            } else {
                http::serve(stream, version, conn, shared, stop).await;
            }
        }
        Seen::Opaque | Seen::MeshTls => {
            // A Service's TCP rule (TrafficRoute `tcp`) picks the backend and the idle timeout.
            let state = shared.state.load();
            let rule = match &conn.target {
                crate::context::Target::Cluster(name) => state.routes(name).and_then(|t| t.tcp.as_ref()),
                crate::context::Target::Fixed(_) => None,
            };
            let (endpoints, idle) = match rule {
                Some(r) => (r.pick_backend().and_then(|c| state.cluster(c).cloned()), r.idle_timeout),
                None => (conn.target.resolve(&state).ok(), None),
            };
            drop(state);
            match endpoints {
                Some(endpoints) => {
                    Box::pin(tcp::serve(tcp::Stream::Plain(stream), &conn, endpoints, shared, idle)).await
                }
                None => {
                    tracing::debug!(listener = %conn.listener(), "tcp: the connection's backend has no cluster; closed")
                }
            }
        }
    }
}
