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
pub mod http;
pub mod metrics;
pub mod tcp;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock, atomic::AtomicBool},
    time::Duration,
};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{info, warn};

use crate::{balance::Endpoints, config::Config, metrics::ListenerLabels};

/// State every connection can reach.
pub struct Shared {
    pub config: RwLock<Config>,
    pub metrics: metrics::Metrics,
    pub client: http::UpstreamClient,
    pub ready: AtomicBool,
}

/// A started proxy: where it listens, and how to stop it.
pub struct Running {
    /// Bound address of each listener, by name (useful when the config asked for port 0).
    pub listeners: BTreeMap<String, SocketAddr>,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    admin_task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, then waits up to `drain` for connections in flight to finish.
    pub async fn shutdown(mut self, drain: Duration) {
        self.shared.ready.store(false, std::sync::atomic::Ordering::Release);
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(drain, async { while self.tasks.join_next().await.is_some() {} }).await;
        self.tasks.abort_all();
        self.admin_task.abort();
    }
}

/// Binds every listener and the admin server, then serves in the background.
pub async fn start(config: Config) -> std::io::Result<Running> {
    let shared = Arc::new(Shared {
        config: RwLock::new(config.clone()),
        metrics: metrics::Metrics::default(),
        client: http::client(),
        ready: AtomicBool::new(false),
    });
    let (shutdown, stop) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let admin_listener = TcpListener::bind(config.admin).await?;
    let admin = admin_listener.local_addr()?;
    let admin_task = tokio::spawn(admin::serve(admin_listener, shared.clone()));

    let clusters: BTreeMap<String, Arc<Endpoints>> = config
        .clusters
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                Arc::new(Endpoints::new(
                    &c.name,
                    c.endpoints.clone(),
                    Duration::from_millis(c.connect_timeout_ms),
                )),
            )
        })
        .collect();
    let mut listeners = BTreeMap::new();
    for l in &config.listeners {
        let socket = TcpListener::bind(l.address).await?;
        listeners.insert(l.name.clone(), socket.local_addr()?);
        let cluster = match &l.cluster {
            Some(name) => match clusters.get(name) {
                Some(c) => Some(c.clone()),
                None => {
                    // validate() guarantees the reference; stay safe if it was skipped.
                    warn!(listener = %l.name, cluster = %name, "unknown cluster; listener not started");
                    continue;
                }
            },
            None => None,
        };
        info!(listener = %l.name, address = %socket.local_addr()?, protocol = ?l.protocol, "listening");
        tasks.spawn(accept_loop(socket, l.clone(), cluster, shared.clone(), stop.clone()));
    }
    shared.ready.store(true, std::sync::atomic::Ordering::Release);
    Ok(Running { listeners, admin, shared, shutdown, tasks, admin_task })
}

async fn accept_loop(
    socket: TcpListener,
    listener: config::Listener,
    cluster: Option<Arc<Endpoints>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let labels = ListenerLabels {
        direction: listener.direction.as_str().into(),
        listener: listener.name.clone(),
        protocol: protocol_name(&listener),
    };
    let mut conns = JoinSet::new();
    loop {
        let (stream, _peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(s) => s,
                Err(e) => { warn!(error = %e, "accept failed"); continue; }
            },
            _ = stop.changed() => break,
        };
        let cluster = match &cluster {
            Some(c) => c.clone(),
            None => match original_destination(&stream, &listener) {
                Ok(c) => c,
                Err(e) => {
                    warn!(listener = %listener.name, error = %e, "cannot tell where the connection was going; closing it");
                    continue;
                }
            },
        };
        shared.metrics.connections.get_or_create(&labels).inc();
        let active = shared.metrics.active_connections.get_or_create(&labels).clone();
        active.inc();
        let (listener, cluster, shared, mut stop) =
            (listener.clone(), cluster.clone(), shared.clone(), stop.clone());
        conns.spawn(async move {
            match listener.protocol {
                config::Protocol::Tcp => tcp::serve(stream, labels_for(&listener), cluster, shared).await,
                config::Protocol::Http => {
                    let name = listener.name.clone();
                    let direction = listener.direction;
                    let svc = service_fn(move |req| {
                        let (name, cluster, shared) = (name.clone(), cluster.clone(), shared.clone());
                        async move { http::handle(req, &name, direction, &cluster, &shared).await }
                    });
                    let _ = stream.set_nodelay(true);
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        // Draining: finish the request in flight, then close (`Connection: close`).
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                }
            }
            active.dec();
        });
        while conns.try_join_next().is_some() {}
    }
    while conns.join_next().await.is_some() {}
}

/// The one-endpoint "cluster" of a captured connection: its original destination, or for
/// inbound traffic that port on loopback (where the app listens).
fn original_destination(
    stream: &tokio::net::TcpStream,
    l: &config::Listener,
) -> std::io::Result<Arc<Endpoints>> {
    let mut dst = capture::original_destination(stream)?;
    let local = stream.local_addr()?;
    if dst == local {
        return Err(std::io::Error::other("addressed to the proxy itself (not redirected)"));
    }
    if l.direction == config::Direction::Inbound {
        dst.set_ip(if dst.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(Arc::new(Endpoints::new("original-destination", vec![dst], Duration::from_secs(1))))
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
        config::Protocol::Http => "http".into(),
        config::Protocol::Tcp => "tcp".into(),
    }
}
