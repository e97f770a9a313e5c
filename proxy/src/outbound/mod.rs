//! Traffic the workload sends. The order of concerns, for a connection ([`connection`]) and for
//! each request ([`request`]):
//!
//! - connection: original destination → Service (virtual address) or the address itself (see
//!   [`crate::transport::target`]) → detect → TCP to the Service's endpoints, or HTTP;
//! - request: route → filters → rate limits (direction Outbound) → fault → mirror → timeout → retry → connection-pool
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
    routing::{self, retry},
    transport::{self},
};

/// One outbound connection, from detection to its end.
pub async fn connection(
    stream: tokio::net::TcpStream,
    mut conn: Conn,
    shared: Arc<Shared>,
    stop: drain::Watch,
) {
    // A Service port declared HTTP is served as HTTP, whatever the first bytes say (or how long
    // they take): a pooled connection opened ahead of its first request must not become a TCP
    // tunnel that no request policy of the destination sees.
    if conn.protocol == crate::config::Protocol::Auto
        && conn.target.resolve(&shared.state.load()).is_ok_and(|e| e.http)
    {
        conn.protocol = crate::config::Protocol::Http;
        conn.labels.protocol = "http".into();
    }
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
    // The workload's own limits on what it sends (RateLimitPolicy of direction Outbound).
    if let Err(e) = crate::policy::rate_limit_outbound(&req, &conn.conn, shared).await {
        return (Some(route.backend), Err(e));
    }
    if let Err(e) = routing::fault(&req, &route).await {
        return (Some(route.backend), Err(e));
    }
    routing::mirror(&req, &route, &conn.conn, shared);
    // Retries go inside the rule's timeout; within each try, a request that reached no app goes
    // to the next endpoint (in `forward`).
    let policy =
        route.rule.as_ref().and_then(|r| r.retry.as_ref()).filter(|_| retry::Policy::replayable(&req));
    let sent = with_retries(req, &conn.conn, &route.backend, policy, shared);
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

/// Sends `req`, and again while the rule's retry policy says the outcome is worth a retry and
/// the destination's budget has one.
async fn with_retries(
    req: Request<Body>,
    conn: &Conn,
    backend: &Arc<Endpoints>,
    policy: Option<&retry::Policy>,
    shared: &Arc<Shared>,
) -> Result<Response<Body>, ProxyError> {
    let Some(p) = policy else { return http::forward::forward(req, conn, backend, shared).await };
    backend.retry_budget.deposit();
    let (parts, body) = req.into_parts();
    let again = parts.clone();
    let mut outcome = try_once(Request::from_parts(parts, body), conn, backend, p, shared).await;
    for n in 0..p.attempts {
        if !p.retries(&outcome) {
            break;
        }
        if !backend.retry_budget.withdraw() {
            shared.metrics.retry(&backend.cluster, "budget_exhausted");
            break;
        }
        shared.metrics.retry(&backend.cluster, "sent");
        drop(outcome);
        tokio::time::sleep(p.backoff(n)).await;
        let req = Request::from_parts(again.clone(), http::empty());
        outcome = try_once(req, conn, backend, p, shared).await;
    }
    outcome
}

/// One try, bounded by the policy's per-try timeout.
async fn try_once(
    req: Request<Body>,
    conn: &Conn,
    backend: &Arc<Endpoints>,
    p: &retry::Policy,
    shared: &Arc<Shared>,
) -> Result<Response<Body>, ProxyError> {
    let sent = http::forward::forward(req, conn, backend, shared);
    match p.per_try_timeout {
        None => sent.await,
        Some(after) => tokio::time::timeout(after, sent)
            .await
            .unwrap_or_else(|_| Err(ProxyError::UpstreamTimeout { cluster: backend.cluster.clone(), after })),
    }
}
