//! `mycel-proxy`: the sidecar and gateway proxy. It owns the data path and must not talk to the
//! Kubernetes API: what it knows arrives from its configuration (a file, the control plane's
//! stream, or both) and is read from one state snapshot ([`state`]).
//!
//! Where things are, by concern:
//!
//! | folder / module | what it owns |
//! |---|---|
//! | [`transport`] | listening, accepting, original destination, protocol detection, TCP proxying |
//! | [`tls`] | mutual TLS between sidecars, the workload identity and its renewal |
//! | [`inbound`] | the stack for traffic addressed to the workload |
//! | [`outbound`] | the stack for traffic the workload sends |
//! | [`http`] | the HTTP servers, header rules, and the last steps of a request (balance → endpoint) |
//! | [`routing`] | which backend a request goes to and what is done to it on the way |
//! | [`policy`] | request authentication, authorization, rate limits |
//! | [`balance`], [`pool`] | endpoint choice, and pooled upstream connections |
//! | [`telemetry`] | metrics (access logs and traces join here), recorded at one point |
//! | [`error`] | the one error type of the data path and the one place it becomes a response |
//! | [`state`], [`config`], [`xds`] | the snapshot the data path reads, the config model, the stream |
//! | [`drain`], [`admin`] | graceful shutdown; the admin server |
//!
//! The order of concerns lives in two functions per direction: [`inbound::connection`] and
//! [`inbound::request`], [`outbound::connection`] and [`outbound::request`].

#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod context;
pub mod drain;
pub mod error;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod rls;
pub mod routing;
pub mod state;
#[allow(unsafe_code)]
mod sys;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod xds;

pub use tls::identity;
pub use transport::{capture, detect};

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock, atomic::AtomicBool},
    time::Duration,
};

use tokio::{sync::Mutex, task::JoinHandle};
use tracing::info;

use crate::{
    config::{Config, ConfigError},
    transport::{ListenerHandle, bind, spawn_listener},
};

/// Reads (`None`) or sets (`Some(filter)`) the log filter; returns the filter now in force, or
/// why the new one was refused. The binary installs it; the library only serves `/logging`.
pub type LogControl = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

/// What every connection can reach: the state snapshot (looked up per connection and request,
/// so a new configuration applies to new ones at once while those in flight finish as they
/// started), the keys, the pool and the metrics.
pub struct Shared {
    pub state: state::Snapshot,
    pub log_control: RwLock<Option<LogControl>>,
    pub metrics: telemetry::Metrics,
    /// Upstream HTTP connections.
    pub pool: pool::Pool,
    /// This workload's keys for mutual TLS between sidecars.
    pub mesh: Arc<tls::mtls::MeshTls>,
    /// Tunnels and upstream connections, drained at shutdown.
    pub tasks: Arc<drain::Tasks>,
    pub ready: AtomicBool,
    /// Places for mirrored copies in flight (a mirror that never answers cannot pile them up).
    pub mirrors: Arc<tokio::sync::Semaphore>,
    /// The app's probes, by `/app-health/<container>/<kind>` path (set at injection).
    pub app_probes: RwLock<std::collections::HashMap<String, serde_json::Value>>,
    /// The client of the rate-limit service the configuration names (global limits).
    pub rate_limit_client: std::sync::Mutex<Option<Arc<policy::global::Client>>>,
    /// The clients of the external authorizers CUSTOM policies name.
    pub ext_authz: policy::ext_authz::Clients,
}

/// A started proxy: where it listens, how to reconfigure it, and how to stop it.
pub struct Running {
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    listeners: Mutex<BTreeMap<String, ListenerHandle>>,
    /// Listeners removed by a reload, finishing their connections.
    retired: Mutex<Vec<JoinHandle<()>>>,
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
        self.shared.state.install(new.clone());
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
                retired.retain(|t| !t.is_finished());
                retired.push(h.task);
            }
        }
        for (l, socket) in bound {
            let h = spawn_listener(&l, socket, self.shared.clone());
            listeners.insert(l.name.clone(), h);
        }
        info!(listeners = listeners.len(), "configuration applied");
        Ok(())
    }

    /// Stops accepting, then waits up to `drain` for connections in flight, the tunnels they
    /// opened and upstream connections still in use to finish; what is left then is ended.
    pub async fn shutdown(self, drain: Duration) {
        let deadline = tokio::time::Instant::now() + drain;
        self.shared.ready.store(false, std::sync::atomic::Ordering::Release);
        let mut loops = self.retired.into_inner();
        for (_, h) in self.listeners.into_inner() {
            let _ = h.stop.send(true);
            loops.push(h.task);
        }
        // Each accept loop ends once its connections have; what has not by the deadline is
        // aborted, and its connections with it.
        let aborts: Vec<_> = loops.iter().map(|t| t.abort_handle()).collect();
        let _ = tokio::time::timeout_at(deadline, futures::future::join_all(loops)).await;
        for a in aborts {
            a.abort();
        }
        // No request can take or return an upstream connection now: closing the idle ones lets
        // their tasks end.
        self.shared.pool.close();
        self.shared.tasks.drain(deadline.saturating_duration_since(tokio::time::Instant::now())).await;
        self.admin_task.abort();
    }
}

/// Binds every listener and the admin server, then serves in the background.
pub async fn start(config: Config) -> Result<Running, ApplyError> {
    config.validate()?;
    let mesh = Arc::new(tls::mtls::MeshTls::default());
    let tasks = Arc::new(drain::Tasks::default());
    let shared = Arc::new(Shared {
        state: state::Snapshot::new(Config { listeners: vec![], clusters: vec![], ..config.clone() }),
        log_control: RwLock::new(None),
        metrics: telemetry::Metrics::default(),
        pool: pool::Pool::new(mesh.clone(), tasks.clone()),
        mesh,
        tasks,
        ready: AtomicBool::new(false),
        app_probes: RwLock::new(Default::default()),
        mirrors: Arc::new(tokio::sync::Semaphore::new(routing::MIRRORS_IN_FLIGHT)),
        rate_limit_client: std::sync::Mutex::new(None),
        ext_authz: Default::default(),
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
        retired: Mutex::new(Vec::new()),
        admin_task,
    };
    running.apply(config).await?;
    shared.ready.store(true, std::sync::atomic::Ordering::Release);
    Ok(running)
}
