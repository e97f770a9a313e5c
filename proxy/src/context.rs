//! What the stack knows about a connection at each point, as typed values passed explicitly:
//! no step looks its parameters up in global state.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::header::HeaderValue;

use crate::{
    balance::Endpoints,
    config::{Direction, Limits, Protocol},
    error::ProxyError,
    state::State,
    telemetry::{ConnMetrics, ListenerLabels},
};

/// Where a connection's traffic goes: a named cluster (the listener's, or the one a captured
/// virtual address belongs to; looked up per request, so that an update applies to open
/// connections too), or a fixed endpoint set (a captured original destination).
#[derive(Clone)]
pub enum Target {
    Cluster(String),
    Fixed(Arc<Endpoints>),
}

impl Target {
    /// The endpoint set in `state`.
    pub fn resolve(&self, state: &State) -> Result<Arc<Endpoints>, ProxyError> {
        match self {
            Target::Cluster(name) => {
                state.cluster(name).cloned().ok_or_else(|| ProxyError::NoCluster { cluster: name.clone() })
            }
            Target::Fixed(e) => Ok(e.clone()),
        }
    }

    /// The port of a fixed target (for inbound traffic: the port the app listens on).
    pub fn port(&self) -> Option<u16> {
        match self {
            Target::Cluster(_) => None,
            Target::Fixed(e) => e.addrs.first().map(|a| a.port()),
        }
    }
}

/// One accepted connection: which listener took it, from whom, going where, and (once the mesh
/// TLS step ran) who the peer proved to be.
#[derive(Clone)]
pub struct Conn {
    pub direction: Direction,
    pub labels: ListenerLabels,
    /// What the listener declares it carries, and how long detection waits for first bytes.
    pub protocol: Protocol,
    pub detect_timeout: Duration,
    /// The limits in force when the connection was accepted.
    pub limits: Limits,
    pub peer: Option<SocketAddr>,
    pub target: Target,
    /// The SPIFFE ID the peer proved over mutual TLS; `None` for plaintext.
    pub peer_id: Option<Arc<str>>,
}

impl Conn {
    pub fn listener(&self) -> &str {
        &self.labels.listener
    }
}

/// An HTTP connection: the connection, its metric handles, and what the inbound side tells the
/// app about a verified peer.
pub struct HttpConn {
    pub conn: Conn,
    pub metrics: ConnMetrics,
    /// `x-forwarded-client-cert` for requests of a verified peer (`By=<own>;URI=<peer>`).
    pub forwarded_client_cert: Option<HeaderValue>,
}
