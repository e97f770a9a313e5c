//! Policies a sidecar enforces on a request or connection: request authentication (JWT,
//! [`jwt`]), authorization (AuthorizationPolicy, [`authz`]) and rate limits (RateLimitPolicy,
//! [`ratelimit`]). Each is a step of a direction's stack ([`crate::inbound`],
//! [`crate::outbound`]).

pub mod authz;
pub mod jwt;
pub mod ratelimit;

use hyper::Request;

use crate::{Shared, context::Conn, error::ProxyError, http::Body, state::State};

/// Before anything else on an inbound connection: a streamed proxy that has not received its
/// first inbound policy refuses every connection (there is no window in which every caller is
/// allowed; the client's sidecar tries another endpoint).
pub fn admit_connection(conn: &Conn, state: &State) -> Result<(), &'static str> {
    if state.config.inbound_pending {
        tracing::debug!(listener = %conn.listener(), peer = ?conn.peer, "connection refused: no inbound policy received yet");
        return Err("no inbound policy received yet");
    }
    Ok(())
}

/// Connection-level authorization of a connection that is not HTTP (TCP to the app): rules on
/// identities, namespaces, addresses and ports, before any byte reaches the app. Rules that
/// need HTTP attributes are read as [`authz`] says.
pub fn authorize_connection(conn: &Conn, shared: &Shared) -> Result<(), ProxyError> {
    let state = shared.state.load();
    if state.authz.is_empty() {
        return Ok(());
    }
    let attrs = peer_attrs(conn);
    let d = state.authz.evaluate(&attrs);
    report(&d, shared, conn, "tcp", "-");
    if d.allowed { Ok(()) } else { Err(ProxyError::Denied) }
}

/// What the connection tells the policies about the caller (its port: the app's).
fn peer_attrs(conn: &Conn) -> authz::Attrs<'_> {
    authz::Attrs::peer(conn.peer_id.as_deref(), conn.peer.map(|p| p.ip()), conn.target.port().unwrap_or(0))
}

/// Request authentication: the request principal and claims of a valid JWT ([`jwt`]); a request
/// whose token fails is refused with 401, one without a token passes without them.
pub fn authenticate(
    req: &mut Request<Body>,
    conn: &Conn,
    shared: &Shared,
) -> Result<Option<jwt::Authn>, ProxyError> {
    let state = shared.state.load();
    if state.authn.is_empty() {
        return Ok(None);
    }
    let query = req.uri().query().map(str::to_string);
    match state.authn.authenticate(req.headers_mut(), query.as_deref()) {
        Ok(None) => Ok(None),
        Ok(Some((a, policy))) => {
            tracing::debug!(%policy, principal = %a.principal, "request authentication: valid token");
            Ok(Some(a))
        }
        Err((refused, policy)) => {
            let policy = policy.as_deref().unwrap_or("-");
            shared.metrics.jwt_refused(policy);
            let peer = conn.peer_id.as_deref().unwrap_or("-");
            tracing::info!(%policy, %peer, source = ?conn.peer, method = %req.method(), path = %req.uri().path(), reason = refused.reason, "request authentication: token refused");
            Err(ProxyError::Unauthenticated { detail: refused.reason })
        }
    }
}

/// Request-level authorization, on the normalised path ([`authz::normalize_path`], which the
/// inbound stack applied to the request before).
pub fn authorize(
    req: &Request<Body>,
    auth: Option<&jwt::Authn>,
    conn: &Conn,
    shared: &Shared,
) -> Result<(), ProxyError> {
    let state = shared.state.load();
    if state.authz.is_empty() {
        return Ok(());
    }
    // The inbound stack made `Host` the authority's host and port (without user info) where the
    // request has both.
    let host = match req.uri().authority() {
        Some(a) => authz::host_of(a),
        None => {
            String::from_utf8_lossy(req.headers().get(hyper::header::HOST).map_or(&b""[..], |h| h.as_bytes()))
                .into_owned()
        }
    }
    .to_ascii_lowercase();
    let mut attrs = peer_attrs(conn);
    attrs.http = Some(authz::HttpAttrs {
        host: &host,
        method: req.method().as_str(),
        path: req.uri().path(),
        headers: req.headers(),
        auth,
    });
    let d = state.authz.evaluate(&attrs);
    report(&d, shared, conn, req.method().as_str(), req.uri().path());
    if d.allowed { Ok(()) } else { Err(ProxyError::Denied) }
}

/// Counts and logs a decision: every decision of a policy (and a denial for want of a matching
/// ALLOW); AUDIT matches and dry-run verdicts besides.
fn report(d: &authz::Decision, shared: &Shared, conn: &Conn, method: &str, path: &str) {
    let m = &shared.metrics;
    let peer = conn.peer_id.as_deref().unwrap_or("-");
    let result = if d.allowed { "allowed" } else { "denied" };
    match &d.by {
        Some((policy, action)) => m.authz(action.as_str(), policy, result),
        None if !d.allowed => m.authz("ALLOW", "none", result),
        None => {}
    }
    if !d.allowed {
        let policy = d.by.as_ref().map_or("none (no ALLOW policy matched)", |(p, _)| p);
        tracing::info!(%policy, %peer, source = ?conn.peer, %method, %path, "authorization: denied");
    }
    for policy in &d.audited {
        m.authz("AUDIT", policy, "audited");
        tracing::info!(%policy, %peer, source = ?conn.peer, %method, %path, allowed = d.allowed, "authorization: audited");
    }
    for (policy, action, would_allow) in &d.dry_run {
        let result = if *would_allow { "dry_run_allowed" } else { "dry_run_denied" };
        m.authz(action.as_str(), policy, result);
        tracing::info!(%policy, %peer, source = ?conn.peer, %method, %path, would = if *would_allow { "allow" } else { "deny" }, "authorization: dry run");
    }
}

/// Local rate limits: the request is admitted if every limit whose match applies has a token
/// for its key (and takes one from each), else refused with 429 or the limit's status.
pub fn rate_limit(
    req: &Request<Body>,
    auth: Option<&jwt::Authn>,
    conn: &Conn,
    shared: &Shared,
) -> Result<(), ProxyError> {
    limited(Some(req), auth, conn, shared)
}

/// Local rate limits on a connection that is not HTTP: it counts as one request against every
/// limit on its port (their HTTP parts read as absent), so that no request escapes the limits
/// by riding a connection the proxy does not parse. Refused: reset.
pub fn rate_limit_connection(conn: &Conn, shared: &Shared) -> Result<(), ProxyError> {
    limited(None, None, conn, shared)
}

fn limited(
    req: Option<&Request<Body>>,
    auth: Option<&jwt::Authn>,
    conn: &Conn,
    shared: &Shared,
) -> Result<(), ProxyError> {
    let state = shared.state.load();
    if state.ratelimit.is_empty() {
        return Ok(());
    }
    let who = ratelimit::Subject {
        // The principal authorization sees (a workload identity of the mesh's form).
        principal: peer_attrs(conn).principal,
        ip: conn.peer.map(|p| p.ip()),
        port: conn.target.port().unwrap_or(0),
        auth,
    };
    let path = req.map_or("-", |r| r.uri().path());
    let peer = conn.peer_id.as_deref().unwrap_or("-");
    let count = |l: &ratelimit::Limit, d: ratelimit::Decision| {
        let counters = l.counters.get_or_init(|| {
            ["allowed", "limited", "shadow_limited"].map(|result| {
                let labels = crate::telemetry::metrics::RateLimitLabels {
                    policy: l.config.policy.clone(),
                    limit: l.config.name.clone(),
                    result: result.into(),
                };
                shared.metrics.ratelimit_decisions.get_or_create(&labels).clone()
            })
        });
        let i = match d {
            ratelimit::Decision::Allowed => 0,
            ratelimit::Decision::Limited => 1,
            ratelimit::Decision::ShadowLimited => 2,
        };
        counters[i].inc();
        if d == ratelimit::Decision::ShadowLimited {
            tracing::debug!(policy = %l.config.policy, limit = %l.config.name, %peer, %path, "rate limit: would refuse (shadow)");
        }
    };
    let refused = match state.ratelimit.check(req, &who, std::time::Instant::now(), count) {
        Ok(()) => return Ok(()),
        Err(r) => r,
    };
    let c = &refused.limit.config;
    tracing::debug!(policy = %c.policy, limit = %c.name, %peer, source = ?conn.peer, %path, "rate limit: refused");
    Err(ProxyError::RateLimited {
        limit: c.name.clone(),
        status: c
            .status
            .and_then(|s| hyper::StatusCode::from_u16(s).ok())
            .unwrap_or(hyper::StatusCode::TOO_MANY_REQUESTS),
        requests: refused.rate.requests,
        per_seconds: refused.rate.per_seconds,
        retry_after: refused.retry_after,
    })
}
