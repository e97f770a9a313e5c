//! Traffic addressed to the workload. The order of concerns, for a connection
//! ([`connection`]) and for each request ([`request`]):
//!
//! - connection: detect → mesh TLS and PeerAuthentication → connection-level authorization →
//!   TCP to the app, or HTTP;
//! - request: sanitize headers → request authentication → authorization → rate limit → app.

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
    // Connection-level authorization.
    if let Err(e) = policy::authorize_connection(&conn) {
        tracing::debug!(listener = %conn.listener(), peer = ?conn.peer, error = %e, "connection refused");
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
    if let Err(e) = policy::authorize_connection(&conn) {
        tracing::debug!(listener = %conn.listener(), peer = %peer_id, error = %e, "connection refused");
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
    let admitted = policy::authenticate(&mut req, &conn.conn)
        .and_then(|()| policy::authorize(&req, &conn.conn))
        .and_then(|()| policy::rate_limit(&req, &conn.conn));
    if let Err(e) = admitted {
        return (None, Err(e));
    }
    let app = match conn.conn.target.resolve(&shared.state.load()) {
        Ok(e) => e,
        Err(e) => return (None, Err(e)),
    };
    let resp = http::forward::forward(req, &conn.conn, &app, shared).await;
    (Some(app), resp)
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
