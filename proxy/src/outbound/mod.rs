//! Traffic the workload sends. The order of concerns, for a connection ([`connection`]) and for
//! each request ([`request`]):
//!
//! - connection: original destination → Service (virtual address) or the address itself (see
//!   [`crate::transport::target`]) → detect → TCP to the Service's endpoints, or HTTP;
//! - request: route → filters → fault → rate limit → mirror → timeout → retry → connection-pool
//!   limits → balance → endpoint (mutual TLS dial), the last three in [`crate::http::forward`].

use std::sync::Arc;

use hyper::{Request, Response};

use crate::{
    Shared,
    balance::Endpoints,
    context::{Conn, HttpConn},
    drain,
    error::ProxyError,
    http::{self, Body},
    policy, routing,
    transport::{self},
};

/// One outbound connection, from detection to its end.
pub async fn connection(
    stream: tokio::net::TcpStream,
    mut conn: Conn,
    shared: Arc<Shared>,
    stop: drain::Watch,
) {
    let seen = transport::sniff(&stream, &mut conn, false).await;
    transport::serve_plain(stream, seen, conn, shared, stop).await
}

/// One outbound request: the stack in order. Returns the endpoint set it went to (for
/// telemetry) and the upstream's response, or why there is none.
pub async fn request(
    mut req: Request<Body>,
    conn: &HttpConn,
    shared: &Arc<Shared>,
) -> (Option<Arc<Endpoints>>, Result<Response<Body>, ProxyError>) {
    let route = match routing::route(&req, &conn.conn, &shared.state.load()) {
        Ok(r) => r,
        Err(e) => return (None, Err(e)),
    };
    routing::filters(&mut req, &route);
    let admitted = match routing::fault(&req, &route).await {
        Ok(()) => policy::rate_limit(&req, &conn.conn),
        Err(e) => Err(e),
    };
    if let Err(e) = admitted {
        return (Some(route.backend), Err(e));
    }
    routing::mirror(&req, &route);
    // Retry policies (TrafficRoute) go inside the timeout; today a request that reached no app
    // goes to the next endpoint (in `forward`), and nothing else is retried.
    let sent = http::forward::forward(req, &conn.conn, &route.backend, shared);
    let resp = match routing::timeout(&route) {
        None => sent.await,
        Some(after) => match tokio::time::timeout(after, sent).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::RouteTimeout {
                rule: route.rule.as_ref().map(|r| r.name.to_string()).unwrap_or_default(),
                after,
            }),
        },
    };
    let resp = resp.map(|mut r| {
        routing::respond(&mut r, &route);
        r
    });
    (Some(route.backend), resp)
}
