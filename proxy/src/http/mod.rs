//! HTTP servers and the shared last steps of a request. A connection is served by the proxy's
//! own HTTP/1.1 server ([`h1`], plaintext requests without a body) or by hyper's (everything
//! else); both enter the same request path, [`handle`], which runs the connection's direction's
//! stack ([`crate::inbound::request`] or [`crate::outbound::request`]) and records telemetry once.

pub mod forward;
pub mod h1;
pub mod headers;

use std::{convert::Infallible, pin::Pin, sync::Arc, time::Instant};

use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};

use crate::{Shared, config::Direction, context::HttpConn, drain, error::ProxyError};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed()
}

/// `body`, holding `guard` until it is dropped (a place under a connection-pool limit lasts as
/// long as the response does).
pub fn holding<G: Send + Sync + Unpin + 'static>(body: Body, guard: G) -> Body {
    Holding { body, _guard: guard }.boxed()
}

struct Holding<G> {
    body: Body,
    _guard: G,
}

impl<G: Unpin> hyper::body::Body for Holding<G> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    /// With prior knowledge (the connection preface).
    Http2,
}

/// One request, whichever server read it: the direction's stack, then telemetry.
pub async fn handle(req: Request<Body>, conn: &HttpConn, shared: &Arc<Shared>) -> Response<Body> {
    let started = Instant::now();
    // A gRPC client's own sidecar answers it in gRPC's terms (`application/grpc`, `+proto` and
    // the like; not gRPC-Web, whose clients read HTTP statuses).
    let grpc = conn.conn.direction == Direction::Outbound
        && req.headers().get(hyper::header::CONTENT_TYPE).is_some_and(|v| {
            let v = v.as_bytes();
            v.strip_prefix(b"application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
        });
    let (cluster, result) = match valid(&req) {
        Err(e) => (None, Err(e)),
        Ok(()) => match conn.conn.direction {
            Direction::Inbound => crate::inbound::request(req, conn, shared).await,
            Direction::Outbound => crate::outbound::request(req, conn, shared).await,
        },
    };
    // Metrics count the status the proxy decided on, before a gRPC client's translation.
    let (status, resp) = match result {
        Ok(resp) if grpc && !resp.headers().contains_key("grpc-status") => {
            let status = resp.status().as_u16();
            // An error a verified peer sidecar made (its header survives only from one).
            match ProxyError::from_peer(resp.status(), resp.headers()) {
                Some(e) => (status, e.into_grpc_response()),
                None => (status, resp),
            }
        }
        Ok(resp) => (resp.status().as_u16(), resp),
        Err(e) => {
            tracing::debug!(listener = %conn.conn.listener(), error = %e, "answered by the proxy");
            (e.status().as_u16(), if grpc { e.into_grpc_response() } else { e.into_response() })
        }
    };
    let cluster = match (&cluster, &conn.conn.target) {
        (Some(c), _) => c.cluster.as_str(),
        (None, crate::context::Target::Cluster(name)) => name.as_str(),
        (None, crate::context::Target::Fixed(e)) => e.cluster.as_str(),
    };
    conn.metrics.request(&shared.metrics, cluster, status, started.elapsed());
    resp
}

/// The rules every request must keep before any step sees it: an HTTP/1.1 request has exactly
/// one `Host` (RFC 9112 §3.2), an HTTP/1.0 one at most one.
fn valid(req: &Request<Body>) -> Result<(), crate::error::ProxyError> {
    let bad = |reason, detail| Err(crate::error::ProxyError::BadRequest { reason, detail });
    match req.version() {
        hyper::Version::HTTP_11 | hyper::Version::HTTP_10 => {
            let mut hosts = req.headers().get_all(hyper::header::HOST).iter();
            match (hosts.next(), hosts.next()) {
                (Some(_), Some(_)) => {
                    bad("duplicate_host", "a request must have one Host header, not several")
                }
                (None, _) if req.version() == hyper::Version::HTTP_11 => {
                    bad("missing_host", "an HTTP/1.1 request must have a Host header")
                }
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// HTTP/1.1, or HTTP/2 with prior knowledge, over any stream. The version is given when the
/// connection's first bytes (or its ALPN) told it; otherwise hyper reads the preface to choose.
pub async fn serve<I>(
    io: I,
    version: Option<Version>,
    conn: Arc<HttpConn>,
    shared: Arc<Shared>,
    stop: drain::Watch,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = conn.conn.limits;
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let (conn, shared) = (conn.clone(), shared.clone());
        // Boxed: hyper keeps room for a request's future in every connection, idle or not; a
        // pointer there instead of the whole forwarding state saves kilobytes per connection.
        Box::pin(async move { Ok::<_, Infallible>(handle(req.map(BodyExt::boxed), &conn, &shared).await) })
    });
    let io = TokioIo::new(io);
    // Draining (`stop`): finish the requests in flight, then close (`Connection: close` on
    // HTTP/1.1, GOAWAY on HTTP/2).
    // Bounds (`limits`): a request head must arrive in time and within its size, or the
    // connection is closed (HTTP/1.1: 408 or 431 first).
    match version {
        Some(Version::Http1) => {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout())
                .max_buf_size(limits.max_header_bytes as usize);
            let conn = b.serve_connection(io, svc).with_upgrades();
            drain_on_stop(conn, stop, |c| c.graceful_shutdown()).await
        }
        Some(Version::Http2) => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes);
            let conn = b.serve_connection(io, svc);
            drain_on_stop(conn, stop, |c| c.graceful_shutdown()).await
        }
        None => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout())
                .max_buf_size(limits.max_header_bytes as usize);
            builder.http2().timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes);
            let conn = builder.serve_connection_with_upgrades(io, svc);
            drain_on_stop(conn, stop, |c| c.graceful_shutdown()).await
        }
    }
}

/// A plaintext HTTP/1.1 connection: requests without a body are served by [`h1`], which holds
/// no buffer while the connection is idle; from the first request it does not take, hyper serves
/// the connection.
pub async fn serve_plain_http1(
    mut stream: tokio::net::TcpStream,
    conn: Arc<HttpConn>,
    shared: Arc<Shared>,
    mut stop: drain::Watch,
) {
    let idle = conn.conn.limits.header_read_timeout();
    let outcome = h1::serve(&mut stream, &mut stop, idle, |req| {
        // Boxed, as for hyper: the connection's task need not have room for a request's future.
        Box::pin(handle(req, &conn, &shared))
    })
    .await;
    if let h1::Outcome::Handoff(read) = outcome {
        // A late HTTP/2 preface (detection gave up waiting for the first bytes) is HTTP/2's.
        let version = if read.starts_with(b"PRI * HTTP/2.0") { Version::Http2 } else { Version::Http1 };
        let io = h1::Rewind::new(read, stream);
        // Boxed: the connection's task keeps room for hyper's connection only when it is used.
        Box::pin(serve(io, Some(version), conn, shared, stop)).await;
    }
}

/// Serves `conn` to its end; when `stop` fires first, asks it to shut down gracefully and waits.
async fn drain_on_stop<C, O>(conn: C, mut stop: drain::Watch, shutdown: impl FnOnce(Pin<&mut C>))
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
