//! Serving the rate-limit service: gRPC over HTTP/2, over mutual TLS from mesh proxies (the
//! caller's proven SPIFFE ID rides into the request as [`super::Caller`]) or in plaintext on a
//! loopback port for `mycelctl quota`. Every connection is bounded: the handshake in time, the
//! number open at once (in all, and from one address: one pod cannot take every slot), streams
//! per connection, header and message sizes. A connection over a bound is closed at once, not
//! queued, so none waits behind another's slow handshake.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::{Caller, Grpc};
use crate::tls::mtls::{Inner, MeshTls};

/// Connections served at once, and from one address (a pod's proxy keeps one).
pub const MAX_CONNECTIONS: usize = 4096;
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 32;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_STREAMS: u32 = 256;
const MAX_HEADERS: u32 = 16 * 1024;

/// Serves `grpc` on `listener`: over mutual TLS with `mesh`'s identity, or in plaintext when
/// `mesh` is `None` (the local port).
pub async fn serve(listener: TcpListener, grpc: Grpc, mesh: Option<Arc<MeshTls>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let server = super::server(grpc);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "refused: {MAX_CONNECTIONS} connections open");
            continue;
        };
        let Some(held) = Held::take(&per_address, peer.ip()) else {
            tracing::debug!(%peer, "refused: {MAX_CONNECTIONS_PER_ADDRESS} connections open from its address");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (mesh, server) = (mesh.clone(), server.clone());
        tokio::spawn(async move {
            let _permit = (permit, held);
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(MAX_HEADERS)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10));
            let Some(mesh) = mesh else {
                let svc = hyper_util::service::TowerToHyperService::new(server);
                let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
                return;
            };
            let (tls, caller, inner) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, mesh.accept(tcp)).await {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "mutual TLS refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "mutual TLS: the handshake took too long");
                    return;
                }
            };
            if inner != Inner::Http2 {
                tracing::debug!(%peer, %caller, "refused: not HTTP/2");
                return;
            }
            let caller = Caller(Arc::from(caller.as_str()));
            let svc = tower::ServiceBuilder::new()
                .map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(caller.clone());
                    req
                })
                .service(server);
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            if let Err(e) = b.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
}

/// One connection counted against its address, until dropped.
struct Held {
    counts: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Held {
    fn take(counts: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Held> {
        let mut m = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Held { counts: counts.clone(), ip })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}
