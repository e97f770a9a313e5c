//! Traffic addressed to the workload. The order of concerns, for a connection
//! ([`connection`]) and for each request ([`request`]):
//!
//! - connection: admitted once the first inbound policy is in → detect → mesh TLS and
//!   PeerAuthentication → TCP to the app (after connection-level authorization and rate
//!   limits), or HTTP;
//! - request: sanitize headers → normalise the path → request authentication → authorization
//!   (external authorizers of CUSTOM policies, then DENY and ALLOW) → rate limit → app.

use std::sync::Arc;

use hyper::{Request, Response, header::HeaderValue};

use crate::{
    Shared,
    balance::Endpoints,
    config::MtlsMode,
    context::{Conn, HttpConn},
    drain,
    error::ProxyError,
    http::{self, Body, headers::FORWARDED_CLIENT_CERT},
    policy,
    tls::mtls,
    transport::{self, Seen},
};

/// One inbound connection, from detection to its end.
pub async fn connection(
    stream: tokio::net::TcpStream,
    mut conn: Conn,
    shared: Arc<Shared>,
    stop: drain::Watch,
) {
    // The port's mode (PeerAuthentication's port level), or the workload's for a listener that
    // names its cluster.
    let mode = {
        let state = shared.state.load();
        if policy::admit_connection(&conn, &state).is_err() {
            drop(state);
            reset(&stream);
            return;
        }
        conn.target.port().map_or(state.config.inbound_mtls.mode, |p| state.inbound_mode(p))
    };
    // Detect: mesh TLS is recognised by its ALPN, unless mutual TLS is disabled for this port
    // (then it passes to the app untouched).
    let seen = transport::sniff(&stream, &mut conn, mode != MtlsMode::Disable).await;
    // Mesh TLS and PeerAuthentication.
    if let Seen::MeshTls = seen {
        // Boxed: a task is as large as its largest state, and plaintext connections, the most
        // numerous, need none of the TLS state.
        return Box::pin(mesh_tls(stream, conn, shared, stop)).await;
    }
    if mode == MtlsMode::Strict {
        shared.metrics.refused.get_or_create(&conn.labels).inc();
        tracing::debug!(listener = %conn.listener(), peer = ?conn.peer, "plaintext refused: mutual TLS is STRICT here");
        return;
    }
    // Connection-level authorization of what is not HTTP.
    if !matches!(seen, Seen::Http(_))
        && (policy::authorize_connection(&conn, &shared).await.is_err()
            || policy::rate_limit_connection(&conn, &shared).await.is_err())
    {
        reset(&stream);
        return;
    }
    transport::serve_plain(stream, seen, conn, shared, stop).await
}

/// Mutual TLS from another sidecar: terminated here, then served by what rides inside (ALPN),
/// with the peer's verified identity in the connection's context.
async fn mesh_tls(stream: tokio::net::TcpStream, mut conn: Conn, shared: Arc<Shared>, stop: drain::Watch) {
    let _ = stream.set_nodelay(true);
    let handshake = tokio::time::timeout(conn.limits.tls_handshake_timeout(), shared.mesh.accept(stream));
    let accepted = handshake.await.unwrap_or_else(|_| {
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the TLS handshake took too long"))
    });
    let (tls, peer_id, inner) = match accepted {
        Ok(x) => x,
        Err(e) => {
            shared.metrics.refused.get_or_create(&conn.labels).inc();
            tracing::debug!(listener = %conn.listener(), peer = ?conn.peer, error = %e, "mutual TLS refused");
            return;
        }
    };
    conn.peer_id = Some(Arc::from(peer_id.as_str()));
    if inner == mtls::Inner::Tcp
        && (policy::authorize_connection(&conn, &shared).await.is_err()
            || policy::rate_limit_connection(&conn, &shared).await.is_err())
    {
        reset(tls.get_ref().0);
        return;
    }
    let _open = transport::opened(&conn, &shared);
    match inner {
        mtls::Inner::Tcp => {
            if let Ok(endpoints) = conn.target.resolve(&shared.state.load()) {
                transport::tcp::serve(
                    transport::tcp::Stream::Wrapped(Box::new(tls)),
                    &conn,
                    endpoints,
                    shared,
                    None,
                )
                .await;
            }
        }
        mtls::Inner::Http1 | mtls::Inner::Http2 => {
            let own = shared.mesh.own_id().unwrap_or_default();
            let forwarded_client_cert = HeaderValue::from_str(&format!("By={own};URI={peer_id}")).ok();
            let version =
                if inner == mtls::Inner::Http2 { http::Version::Http2 } else { http::Version::Http1 };
            let metrics =
                crate::telemetry::ConnMetrics::new(&shared.metrics, conn.listener(), conn.direction);
            let conn = Arc::new(HttpConn { conn, metrics, forwarded_client_cert });
            http::serve(tls, Some(version), conn, shared, stop).await;
        }
    }
}

/// One inbound request: the stack in order. Returns the endpoint set it went to (for
/// telemetry) and the app's response, or why there is none.
pub async fn request(
    mut req: Request<Body>,
    conn: &HttpConn,
    shared: &Arc<Shared>,
) -> (Option<Arc<Endpoints>>, Result<Response<Body>, ProxyError>) {
    sanitize(&mut req, conn);
    normalize(&mut req);
    let auth = match policy::authenticate(&mut req, &conn.conn, shared) {
        Ok(a) => a,
        Err(e) => return (None, Err(e)),
    };
    let granted = match policy::authorize(&mut req, auth.as_ref(), &conn.conn, shared).await {
        Ok(g) => g,
        Err(e) => return (None, Err(e)),
    };
    if let Err(e) = policy::rate_limit(&req, auth.as_ref(), &conn.conn, shared).await {
        return (None, Err(e));
    }
    let app = match conn.conn.target.resolve(&shared.state.load()) {
        Ok(e) => e,
        Err(e) => return (None, Err(e)),
    };
    let mut resp = http::forward::forward(req, &conn.conn, &app, shared).await;
    if let Ok(r) = &mut resp {
        // What an external authorizer (CUSTOM) put on the response of a request it allowed.
        policy::ext_authz::apply(r.headers_mut(), &granted);
    }
    (Some(app), resp)
}

/// A refused connection ends with a reset, not a clean close, so that the client sees a refusal.
fn reset(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// The path the policies match and the app receives: normalised
/// ([`policy::authz::normalize_path`]), so that no spelling of a path slips past a rule on it.
fn normalize(req: &mut Request<Body>) {
    // The host the policies match is the one the app receives: an absolute-form HTTP/1.1 target
    // or an HTTP/2 `:authority` replaces a `Host` header that says otherwise (RFC 9112 §3.2.2).
    if let Some(a) = req.uri().authority() {
        let host = policy::authz::host_of(a);
        let h2_without_host =
            req.version() == hyper::Version::HTTP_2 && !req.headers().contains_key(hyper::header::HOST);
        if !h2_without_host && let Ok(v) = HeaderValue::from_str(&host) {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
    }
    let normalized = match policy::authz::normalize_path(req.uri().path()) {
        std::borrow::Cow::Borrowed(_) => return,
        std::borrow::Cow::Owned(p) => p,
    };
    let mut parts = req.uri().clone().into_parts();
    let pq = match req.uri().query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = hyper::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// Headers that only this proxy may set: the caller's identity is the one it proved over mutual
/// TLS, or none — whatever a client sent in their place is dropped.
fn sanitize(req: &mut Request<Body>, conn: &HttpConn) {
    let headers = req.headers_mut();
    match &conn.forwarded_client_cert {
        Some(v) => {
            headers.insert(FORWARDED_CLIENT_CERT, v.clone());
        }
        None => {
            headers.remove(FORWARDED_CLIENT_CERT);
        }
    }
}
