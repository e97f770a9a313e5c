//! The last steps of a request, in both directions: balance over the endpoint set, send over a
//! pooled connection (mutual TLS where the cluster names the endpoint's identity), and fail over
//! to the next endpoint when the request never reached an app. What fails is a [`ProxyError`];
//! the caller's stack turns it into the response.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Empty};
use hyper::{
    HeaderMap, Request, Response, StatusCode, Uri,
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;

use crate::{
    Shared,
    balance::{Endpoints, Outcome},
    context::Conn,
    error::{self, ProxyError},
    http::{Body, headers::strip_hop_by_hop},
    pool::SendError,
};

/// An HTTP/1.1 protocol switch (WebSocket and other `Upgrade`s) or a `CONNECT` tunnel. Never
/// `h2c`: the requests of an HTTP/2 connection tunnelled past the proxy would skip every step of
/// its stack, so such a request goes on as plain HTTP/1.1 (the upgrade is dropped).
fn is_upgrade(method: &hyper::Method, headers: &HeaderMap) -> bool {
    let h2c = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")));
    method == hyper::Method::CONNECT
        || (!h2c
            && headers.contains_key(header::UPGRADE)
            && headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Once both sides switched protocols, bytes flow through until either closes. The tunnel is held
/// by the proxy's background tasks, so that shutdown waits for it (up to the drain deadline).
fn tunnel(shared: &Shared, downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    shared.tasks.spawn(async move {
        let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else { return };
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    });
}

enum Attempt {
    Done(Response<Body>),
    /// No connection to the endpoint could be opened: the request was not sent, here it is.
    NotSent(Box<Request<Body>>, String),
    /// The peer sidecar could not reach its app: the request went no further than that sidecar.
    PeerNotSent(String),
    /// The connection broke before a response came (here, or between the peer sidecar and its
    /// app): sent at most once more, to another endpoint, when the request is replayable.
    Reset(ProxyError),
}

/// Sends `req` to an endpoint of `cluster`, trying the next one while the request has reached
/// no app (a connection that could not be opened, or a peer sidecar whose app refused it), and
/// once more when a replayable request's connection broke before its answer (an app that closed
/// its connections as it shut down).
pub async fn forward(
    req: Request<Body>,
    conn: &Conn,
    cluster: &Endpoints,
    shared: &Shared,
) -> Result<Response<Body>, ProxyError> {
    // Connection-pool limits: over them, the request is refused at once (it never waits).
    let Some(admitted) = cluster.admit() else {
        return Err(ProxyError::Overflow {
            cluster: cluster.cluster.clone(),
            max_requests: cluster.max_requests().unwrap_or(0),
        });
    };
    let resp = balanced(req, conn, cluster, shared).await?;
    Ok(if cluster.max_requests().is_some() { resp.map(|b| crate::http::holding(b, admitted)) } else { resp })
}

/// Balances over the endpoints, failing over while the request has reached no app.
async fn balanced(
    mut req: Request<Body>,
    conn: &Conn,
    cluster: &Endpoints,
    shared: &Shared,
) -> Result<Response<Body>, ProxyError> {
    let (key, set_cookie) = crate::balance::request_key_setting(&cluster.lb, req.headers(), conn.peer);
    let wait = conn.limits.upstream_response_header_timeout();
    let Some(first) = cluster.pick(key) else {
        return Err(ProxyError::NoHealthyUpstream { cluster: cluster.cluster.clone() });
    };
    let mut downstream_upgrade =
        is_upgrade(req.method(), req.headers()).then(|| hyper::upgrade::on(&mut req));
    // Idempotent, without a body, not switching protocols: it may be sent again after a reset,
    // as RFC 9110 §9.2.2 allows (Istio's default retries do the same for the 503 it makes).
    let replayable = downstream_upgrade.is_none() && crate::routing::retry::Policy::replayable(&req);
    let (mut parts, body) = req.into_parts();
    let upgrade_header = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade_header.filter(|_| downstream_upgrade.is_some()) {
        // The switch itself must reach the upstream: keep the two headers that ask for it.
        parts.headers.insert(header::UPGRADE, u);
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // A request that could not be sent comes back and goes to the next endpoint as it is. One
    // that reached a peer sidecar whose app refused it, or a replayable one whose connection
    // broke, can only be sent again from a copy of its head, kept for those cases alone: no
    // body, another endpoint to try, and a mesh endpoint or a replayable request.
    let copy = (hyper::body::Body::is_end_stream(&body)
        && cluster.addrs.len() > 1
        && (replayable || cluster.identity(first).is_some()))
    .then(|| parts.clone());
    let mut next = Some(Request::from_parts(parts, body));
    let (mut attempts, mut cause) = (0, String::new());
    // The reset of the last try, if it was one; a replayable request is resent once, from the
    // destination's retry budget, which every replayable request earns a share of.
    let (mut reset, mut resent) = (None, false);
    if replayable && copy.is_some() {
        cluster.retry_budget.deposit();
    }
    // The other endpoints are only asked for once the first failed (asking moves a round robin).
    let rest = std::iter::once(()).flat_map(|_| cluster.order(key)).filter(|a| *a != first);
    for addr in std::iter::once(first).chain(rest) {
        let req = match next.take() {
            Some(r) => r,
            None => match &copy {
                Some(parts) => {
                    Request::from_parts(parts.clone(), Empty::new().map_err(|never| match never {}).boxed())
                }
                None => break,
            },
        };
        attempts += 1;
        let may_resend = replayable && copy.is_some() && !resent;
        match send(req, addr, wait, &mut downstream_upgrade, may_resend, cluster, shared).await? {
            Attempt::Done(mut resp) => {
                // Never over a cookie of that name the app sets itself.
                if let Some(c) = set_cookie {
                    let name = c.as_bytes().split(|b| *b == b'=').next().unwrap_or_default().to_vec();
                    let own = resp.headers().get_all(header::SET_COOKIE).iter().any(|v| {
                        v.as_bytes().starts_with(&name) && v.as_bytes().get(name.len()) == Some(&b'=')
                    });
                    if !own {
                        resp.headers_mut().append(header::SET_COOKIE, c);
                    }
                }
                return Ok(resp);
            }
            Attempt::NotSent(req, why) => {
                (cause, reset) = (why, None);
                next = Some(*req);
            }
            Attempt::PeerNotSent(why) => (cause, reset) = (why, None),
            // Like any retry, from the destination's budget (so that a failing one is not sent
            // twice the load).
            Attempt::Reset(e) if may_resend && cluster.retry_budget.withdraw() => {
                shared.metrics.retry(&cluster.cluster, "after_reset");
                (reset, resent) = (Some(e), true);
            }
            Attempt::Reset(e) => return Err(e),
        }
    }
    Err(reset.unwrap_or(ProxyError::ConnectFailed { cluster: cluster.cluster.clone(), attempts, cause }))
}

/// One try at one endpoint.
async fn send(
    req: Request<Body>,
    addr: SocketAddr,
    wait: std::time::Duration,
    downstream_upgrade: &mut Option<hyper::upgrade::OnUpgrade>,
    may_resend: bool,
    cluster: &Endpoints,
    shared: &Shared,
) -> Result<Attempt, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let is_connect = parts.method == hyper::Method::CONNECT;
    let original_uri = parts.uri.clone();
    parts.uri = upstream_uri(&parts.uri, parts.version, cluster.authority(addr));
    if parts.version != hyper::Version::HTTP_2
        && !parts.headers.contains_key(header::HOST)
        && let Some(a) = cluster.authority(addr).and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, a);
    }
    let in_flight = cluster.start(addr);
    let identity = cluster.identity(addr);
    // A try given up before its answer (this timeout, or a route's or per-try timeout dropping
    // the whole future) counts as a gateway error for outlier detection, as in Envoy.
    let mut unanswered = Unanswered { cluster, addr, armed: true };
    let sent = shared.pool.send(Request::from_parts(parts, body), addr, identity, cluster.connect_timeout);
    let Ok(result) = tokio::time::timeout(wait, sent).await else {
        return Err(ProxyError::UpstreamTimeout { cluster: cluster.cluster.clone(), after: wait });
    };
    unanswered.armed = false;
    match &result {
        Ok(resp) if identity.is_some() && crate::error::rate_limited_by_peer(resp.headers()) => {
            in_flight.refused()
        }
        _ => drop(in_flight),
    }
    match result {
        Ok(mut resp) => {
            // A peer's refusal for a rate limit says nothing of the endpoint's health (whatever
            // status the limit answers with).
            let limited = identity.is_some() && crate::error::rate_limited_by_peer(resp.headers());
            cluster.report(addr, if limited { Outcome::Success } else { Outcome::of_status(resp.status()) });
            if identity.is_some() {
                // A verified peer proxy: its reason is believed. One that says its app refused
                // the request means the request went no further, so another endpoint may take it.
                if let Some(e) = ProxyError::from_peer(resp.status(), resp.headers()) {
                    if e.not_sent() {
                        cluster.eject(addr);
                        return Ok(Attempt::PeerNotSent(e.to_string()));
                    }
                    if may_resend && e.reason() == "upstream_reset" {
                        return Ok(Attempt::Reset(e));
                    }
                }
            } else {
                // An app or a server outside the mesh cannot speak for a proxy.
                error::strip(resp.headers_mut());
            }
            let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (is_connect && resp.status().is_success());
            let upstream_upgrade = switched.then(|| hyper::upgrade::on(&mut resp));
            let (mut rparts, rbody) = resp.into_parts();
            let upgrade_header = rparts.headers.get(header::UPGRADE).cloned();
            strip_hop_by_hop(&mut rparts.headers);
            if let (Some(up), Some(down)) = (upstream_upgrade, downstream_upgrade.take()) {
                if let Some(u) = upgrade_header {
                    rparts.headers.insert(header::UPGRADE, u);
                    rparts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                }
                tunnel(shared, down, up);
            }
            Ok(Attempt::Done(Response::from_parts(rparts, rbody.boxed())))
        }
        Err(SendError::NotSent(e, mut req)) => {
            tracing::debug!(%addr, error = %e, "upstream connection failed");
            cluster.report(addr, Outcome::GatewayError);
            cluster.eject(addr);
            *req.uri_mut() = original_uri;
            Ok(Attempt::NotSent(req, e.to_string()))
        }
        Err(SendError::Failed(e)) => {
            cluster.report(addr, Outcome::GatewayError);
            tracing::debug!(%addr, error = %error_chain(&e), "upstream exchange failed");
            Ok(Attempt::Reset(ProxyError::UpstreamReset {
                cluster: cluster.cluster.clone(),
                cause: error_chain(&e),
            }))
        }
    }
}

/// Reports a gateway error for a try dropped or timed out before its response came.
struct Unanswered<'a> {
    cluster: &'a Endpoints,
    addr: SocketAddr,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.cluster.report(self.addr, Outcome::GatewayError);
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The request target upstream: for HTTP/1.1 the origin form (`/path?query`; the `Host` header
/// names the service), for HTTP/2 `http://<authority>/path?query` with the client's own
/// `:authority` (the app sees the name it was called by), or the endpoint's when the client sent
/// none.
fn upstream_uri(
    original: &Uri,
    version: hyper::Version,
    authority: Option<&hyper::http::uri::Authority>,
) -> Uri {
    let pq = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    if version != hyper::Version::HTTP_2 {
        // A CONNECT's target is its authority.
        if original.path_and_query().is_none()
            && let Some(a) = original.authority()
        {
            return Uri::from(a.clone());
        }
        return Uri::from(pq);
    }
    let mut b = Uri::builder().scheme("http").path_and_query(pq);
    if let Some(a) = original.authority().or(authority) {
        b = b.authority(a.clone());
    }
    b.build().unwrap_or_else(|_| Uri::from_static("/"))
}
