//! Serving the rate-limit service: gRPC over HTTP/2, over mutual TLS from mesh proxies (the
//! caller's proven SPIFFE ID rides into the request as [`super::Caller`]) or in plaintext on a
//! loopback port for `mycelctl quota`. Every connection is bounded: the handshake in time, the
//! number open at once, streams per connection, header and message sizes.

use std::{sync::Arc, time::Duration};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::{Caller, Grpc};
use crate::tls::mtls::{Inner, MeshTls};

/// Connections served at once; more wait in the listen queue.
pub const MAX_CONNECTIONS: usize = 4096;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_STREAMS: u32 = 256;
const MAX_HEADERS: u32 = 16 * 1024;

/// Serves `grpc` on `listener`: over mutual TLS with `mesh`'s identity, or in plaintext when
/// `mesh` is `None` (the local port).
pub async fn serve(listener: TcpListener, grpc: Grpc, mesh: Option<Arc<MeshTls>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let server = super::server(grpc);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (mesh, server) = (mesh.clone(), server.clone());
        tokio::spawn(async move {
            let _permit = permit;
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
