//! Opaque TCP: connect to the first endpoint that answers (over mutual TLS when the endpoint is
//! in the mesh), then copy both ways until each side has closed its half (a half-close is passed
//! on, not turned into a full close).

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::debug;

use crate::{
    Shared,
    balance::Endpoints,
    metrics::ListenerLabels,
    mtls::{Inner, MeshTls},
};

/// A byte stream: plain TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to an endpoint of `endpoints`, skipping (and ejecting) those that fail. An endpoint
/// with a mesh identity is reached over mutual TLS and must prove that identity.
pub async fn connect(endpoints: &Endpoints, key: Option<u64>, mesh: &MeshTls) -> Result<Box<dyn Io>, String> {
    let order = endpoints.order(key);
    if order.is_empty() {
        return Err(format!("cluster {:?} has no endpoints", endpoints.cluster));
    }
    let mut last = String::new();
    for addr in order {
        match tokio::time::timeout(endpoints.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                let Some(identity) = mesh.identity_of(&addr) else { return Ok(Box::new(s)) };
                match mesh.connect(s, &identity, Inner::Tcp).await {
                    Ok(tls) => return Ok(Box::new(tls)),
                    Err(e) => last = format!("mutual TLS to {addr}: {e}"),
                }
            }
            Ok(Err(e)) => last = format!("connect to {addr}: {e}"),
            Err(_) => last = format!("connect to {addr}: timed out after {:?}", endpoints.connect_timeout),
        }
        endpoints.eject(addr);
    }
    Err(last)
}

pub async fn serve(
    mut downstream: Box<dyn Io>,
    peer: Option<SocketAddr>,
    labels: ListenerLabels,
    cluster: Arc<Endpoints>,
    shared: Arc<Shared>,
) {
    let key = crate::balance::connection_key(&cluster.lb, peer);
    let mut upstream = match connect(&cluster, key, &shared.mesh).await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "tcp: no upstream");
            return;
        }
    };
    match tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, 64 * 1024, 64 * 1024).await
    {
        Ok((from_client, to_client)) => {
            shared.metrics.bytes_received.get_or_create(&labels).inc_by(from_client);
            shared.metrics.bytes_sent.get_or_create(&labels).inc_by(to_client);
        }
        Err(e) => debug!(error = %e, "tcp: copy ended"),
    }
}
