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
const MAX_STREAMS: u32 = 32;
const MAX_HEADERS: u32 = 16 * 1024;
/// What a peer may send ahead of what is read: a check's message is some kilobytes.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Requests decided at once, over every connection: the others wait, unread, and each request
/// (its body included) has [`REQUEST_TIMEOUT`] in all. So a peer that sends half a message and
/// stops holds a slot for seconds, and the memory of partial messages is bounded.
const MAX_IN_FLIGHT: usize = 1024;
/// Of which one address (a pod, however many connections it opens) decides at most this many.
const MAX_IN_FLIGHT_PER_ADDRESS: usize = 128;
/// Longer than a proxy waits for a decision (`rateLimit.timeout`, at most 10 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(11);

/// Serves `grpc` on `listener`: over mutual TLS with `mesh`'s identity, or in plaintext when
/// `mesh` is `None` (the local port).
pub async fn serve(listener: TcpListener, grpc: Grpc, mesh: Option<Arc<MeshTls>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address: PerAddress = Arc::default();
    let (server, in_flight) = (super::server(grpc), Arc::new(Semaphore::new(MAX_IN_FLIGHT)));
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
        let server = bounded(server.clone(), held.in_flight.clone(), in_flight.clone());
        let mesh = mesh.clone();
        tokio::spawn(async move {
            let _permit = (permit, held);
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(MAX_HEADERS)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
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

/// `server`, each request within [`REQUEST_TIMEOUT`] (body included; then `DEADLINE_EXCEEDED`)
/// and at most as many at once as `of_address` (its peer's) and `in_flight` (everyone's) have
/// permits.
fn bounded<S>(
    server: S,
    of_address: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
) -> impl tower::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<tonic::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static
where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    use tower::ServiceExt;
    tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (server, of_address, in_flight) = (server.clone(), of_address.clone(), in_flight.clone());
        async move {
            let decided = tokio::time::timeout(REQUEST_TIMEOUT, async move {
                let _mine = of_address.acquire_owned().await;
                let _permit = in_flight.acquire_owned().await;
                server.oneshot(req).await
            })
            .await;
            match decided {
                Ok(r) => r,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the request was not read and decided within {REQUEST_TIMEOUT:?}"
                ))
                .into_http()),
            }
        }
    })
}

/// One connection counted against its address, until dropped.
/// Per address: its connections, and the requests it may have decided at once.
type PerAddress = Arc<std::sync::Mutex<HashMap<IpAddr, (usize, Arc<Semaphore>)>>>;

struct Held {
    counts: PerAddress,
    ip: IpAddr,
    in_flight: Arc<Semaphore>,
}

impl Held {
    fn take(counts: &PerAddress, ip: IpAddr) -> Option<Held> {
        let mut m = counts.lock().unwrap_or_else(|e| e.into_inner());
        let (n, in_flight) =
            m.entry(ip).or_insert_with(|| (0, Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_ADDRESS))));
        if *n >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Held { counts: counts.clone(), ip, in_flight: in_flight.clone() })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, _)) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}
