//! Opaque TCP: connect to the first endpoint that answers, then copy both ways until each side
//! has closed its half (a half-close is passed on, not turned into a full close).

use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use crate::{Shared, balance::Endpoints, metrics::ListenerLabels};

/// Connects to an endpoint of `endpoints`, skipping (and ejecting) those that fail.
pub async fn connect(endpoints: &Endpoints, key: Option<u64>) -> Result<TcpStream, String> {
    let order = endpoints.order(key);
    if order.is_empty() {
        return Err(format!("cluster {:?} has no endpoints", endpoints.cluster));
    }
    let mut last = String::new();
    for addr in order {
        match tokio::time::timeout(endpoints.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("connect to {addr}: {e}"),
            Err(_) => last = format!("connect to {addr}: timed out after {:?}", endpoints.connect_timeout),
        }
        endpoints.eject(addr);
    }
    Err(last)
}

pub async fn serve(
    mut downstream: TcpStream,
    labels: ListenerLabels,
    cluster: Arc<Endpoints>,
    shared: Arc<Shared>,
) {
    let key = crate::balance::connection_key(&cluster.lb, downstream.peer_addr().ok());
    let mut upstream = match connect(&cluster, key).await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "tcp: no upstream");
            return;
        }
    };
    let _ = downstream.set_nodelay(true);
    match tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, 64 * 1024, 64 * 1024).await
    {
        Ok((from_client, to_client)) => {
            shared.metrics.bytes_received.get_or_create(&labels).inc_by(from_client);
            shared.metrics.bytes_sent.get_or_create(&labels).inc_by(to_client);
        }
        Err(e) => debug!(error = %e, "tcp: copy ended"),
    }
}
