//! Policies a sidecar enforces on a request or connection: request authentication (JWT,
//! [`jwt`]), authorization (AuthorizationPolicy, [`authz`]) and rate limits (RateLimitPolicy,
//! [`ratelimit`]). Each is a step of a direction's stack ([`crate::inbound`],
//! [`crate::outbound`]).

pub mod authz;
pub mod ext_authz;
pub mod global;
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
/// identities, namespaces, addresses and ports, before any byte reaches the app (CUSTOM
/// policies' authorizers asked first, about the connection). Rules that need HTTP attributes
/// are read as [`authz`] says.
pub async fn authorize_connection(conn: &Conn, shared: &Shared) -> Result<(), ProxyError> {
    let state = shared.state.load();
    if state.authz.is_empty() {
        return Ok(());
    }
    let custom = state.authz.custom(&peer_attrs(conn));
    for c in &custom {
        // A connection has no response to carry an authorizer's headers.
        ask(c, None, conn, shared).await?;
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

/// Headers an external authorizer (CUSTOM) puts on the response of a request it allowed.
pub type ResponseHeaders = Vec<(hyper::header::HeaderName, hyper::header::HeaderValue, ext_authz::Change)>;

/// Request-level authorization, on the normalised path ([`authz::normalize_path`], which the
/// inbound stack applied to the request before): the authorizers of the CUSTOM policies that
/// match are asked first (their header changes applied to the request, which the DENY and
/// ALLOW policies then see), then the DENY and ALLOW policies decide. Returns the headers the
/// authorizers add to the response.
pub async fn authorize(
    req: &mut Request<Body>,
    auth: Option<&jwt::Authn>,
    conn: &Conn,
    shared: &Shared,
) -> Result<ResponseHeaders, ProxyError> {
    let state = shared.state.load();
    if state.authz.is_empty() {
        return Ok(Vec::new());
    }
    let mut response = Vec::new();
    let custom = {
        let host = request_host(req);
        let mut attrs = peer_attrs(conn);
        attrs.http = Some(authz::HttpAttrs {
            host: &host,
            method: req.method().as_str(),
            path: req.uri().path(),
            headers: req.headers(),
            auth,
        });
        state.authz.custom(&attrs)
    };
    for c in &custom {
        if let Some(ext_authz::Verdict::Allowed { set, remove, response: add }) =
            ask(c, Some(&*req), conn, shared).await?
        {
            let h = req.headers_mut();
            for name in &remove {
                h.remove(name);
            }
            ext_authz::apply(h, &set);
            response.extend(add);
        }
    }
    evaluate(req, auth, conn, &state, shared)?;
    Ok(response)
}

/// The host the policies match: the inbound stack made `Host` the authority's host and port
/// (without user info) where the request has both.
fn request_host(req: &Request<Body>) -> String {
    match req.uri().authority() {
        Some(a) => authz::host_of(a),
        None => {
            String::from_utf8_lossy(req.headers().get(hyper::header::HOST).map_or(&b""[..], |h| h.as_bytes()))
                .into_owned()
        }
    }
    .to_ascii_lowercase()
}

/// Asks a CUSTOM policy's authorizer about a request (or, `req` `None`, a connection): `Ok` with
/// its verdict when it allows (`None`: it was not enforced — a dry run, or failing open), `Err`
/// with the response the client gets when it refuses, or cannot decide and fails closed.
async fn ask(
    c: &authz::Custom,
    req: Option<&Request<Body>>,
    conn: &Conn,
    shared: &Shared,
) -> Result<Option<ext_authz::Verdict>, ProxyError> {
    let m = &shared.metrics;
    let peer = conn.peer_id.as_deref().unwrap_or("-");
    let path = req.map_or("-", |r| r.uri().path());
    let Some(provider) = &c.provider else {
        let result = if c.dry_run { "dry_run_denied" } else { "denied" };
        m.authz("CUSTOM", &c.policy, result);
        tracing::info!(policy = %c.policy, %peer, source = ?conn.peer, %path, dry_run = c.dry_run, "authorization: denied (the policy's provider is not one of the installation's extensionProviders)");
        return if c.dry_run { Ok(None) } else { Err(ProxyError::Denied) };
    };
    let own = shared.mesh.own_id();
    let asked = ext_authz::Asked {
        source: conn.peer,
        source_principal: conn.peer_id.as_deref(),
        destination: match &conn.target {
            crate::context::Target::Fixed(e) => e.addrs.first().copied(),
            crate::context::Target::Cluster(_) => None,
        },
        destination_principal: own.as_deref(),
        http: req,
    };
    let answer = match shared.ext_authz.get(provider) {
        Ok(client) => client.check(ext_authz::check_request(&asked)).await,
        Err(e) => Err(e),
    };
    let verdict = match answer {
        Ok(r) => ext_authz::verdict(r),
        Err(cause) => {
            let open = provider.fail_open;
            let result = match (c.dry_run, open) {
                (true, _) => "dry_run_error",
                (false, true) => "error_allowed",
                (false, false) => "error_denied",
            };
            m.authz("CUSTOM", &c.policy, result);
            tracing::warn!(policy = %c.policy, provider = %provider.name, address = %provider.address, %cause, fail_open = open, dry_run = c.dry_run, "authorization: the external authorizer did not decide");
            if c.dry_run || open {
                return Ok(None);
            }
            return Err(ProxyError::ExtAuthzUnavailable {
                provider: provider.name.clone(),
                status: hyper::StatusCode::from_u16(provider.status_on_error)
                    .unwrap_or(hyper::StatusCode::FORBIDDEN),
            });
        }
    };
    let allowed = matches!(verdict, ext_authz::Verdict::Allowed { .. });
    let result = match (c.dry_run, allowed) {
        (true, true) => "dry_run_allowed",
        (true, false) => "dry_run_denied",
        (false, true) => "allowed",
        (false, false) => "denied",
    };
    m.authz("CUSTOM", &c.policy, result);
    if !allowed {
        tracing::info!(policy = %c.policy, provider = %provider.name, %peer, source = ?conn.peer, %path, dry_run = c.dry_run, "authorization: the external authorizer denied");
    }
    match verdict {
        _ if c.dry_run => Ok(None),
        v @ ext_authz::Verdict::Allowed { .. } => Ok(Some(v)),
        ext_authz::Verdict::Denied { status, headers, body } => {
            Err(ProxyError::ExtAuthzDenied { status, headers, body })
        }
    }
}

/// The DENY and ALLOW policies' decision on a request (after the CUSTOM ones').
fn evaluate(
    req: &Request<Body>,
    auth: Option<&jwt::Authn>,
    conn: &Conn,
    state: &State,
    shared: &Shared,
) -> Result<(), ProxyError> {
    let host = request_host(req);
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
pub async fn rate_limit(
    req: &Request<Body>,
    auth: Option<&jwt::Authn>,
    conn: &Conn,
    shared: &Shared,
) -> Result<(), ProxyError> {
    limited(Some(req), auth, conn, shared, false).await
}

/// The limits of the requests the workload sends (RateLimitPolicy of direction Outbound):
/// refused here, before the request leaves, with the same status and headers.
pub async fn rate_limit_outbound(
    req: &Request<Body>,
    conn: &Conn,
    shared: &Shared,
) -> Result<(), ProxyError> {
    limited(Some(req), None, conn, shared, true).await
}

/// Local rate limits on a connection that is not HTTP: it counts as one request against every
/// limit on its port (their HTTP parts read as absent), so that no request escapes the limits
/// by riding a connection the proxy does not parse. Refused: reset.
pub async fn rate_limit_connection(conn: &Conn, shared: &Shared) -> Result<(), ProxyError> {
    limited(None, None, conn, shared, false).await
}

async fn limited(
    req: Option<&Request<Body>>,
    auth: Option<&jwt::Authn>,
    conn: &Conn,
    shared: &Shared,
    outbound: bool,
) -> Result<(), ProxyError> {
    let state = shared.state.load();
    let limiter = if outbound { &state.ratelimit_outbound } else { &state.ratelimit };
    if limiter.is_empty() {
        return Ok(());
    }
    let who = if outbound {
        // The sender is this workload: its limits are keyed by nothing, a header or the path.
        ratelimit::Subject { principal: None, ip: None, port: conn.target.port().unwrap_or(0), auth: None }
    } else {
        ratelimit::Subject {
            // The principal authorization sees (a workload identity of the mesh's form).
            principal: peer_attrs(conn).principal,
            ip: conn.peer.map(|p| p.ip()),
            port: conn.target.port().unwrap_or(0),
            auth,
        }
    };
    let path = req.map_or("-", |r| r.uri().path());
    let peer = conn.peer_id.as_deref().unwrap_or("-");
    let count = |l: &ratelimit::Limit, d: ratelimit::Decision| {
        let counters = l.counters.get_or_init(|| {
            ["allowed", "limited", "shadow_limited", "failure_open", "failure_closed"].map(|result| {
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
            ratelimit::Decision::FailureOpen => 3,
            ratelimit::Decision::FailureClosed => 4,
        };
        counters[i].inc();
        if d == ratelimit::Decision::ShadowLimited {
            tracing::debug!(policy = %l.config.policy, limit = %l.config.name, %peer, %path, "rate limit: would refuse (shadow)");
        }
    };
    let mut count = count;
    let refused = match limiter.check(req, &who, std::time::Instant::now(), &mut count) {
        Ok(hits) if hits.is_empty() => return Ok(()),
        Ok(hits) => return counted_globally(&hits, &state, shared, count, peer, path).await,
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

/// The rate-limit service's decision on the global limits a request hits (admitted by every
/// local one): refused by the first enforcing limit it refuses; while it cannot decide, each
/// limit's failure mode.
async fn counted_globally(
    hits: &[ratelimit::Hit],
    state: &State,
    shared: &Shared,
    mut count: impl FnMut(&ratelimit::Limit, ratelimit::Decision),
    peer: &str,
    path: &str,
) -> Result<(), ProxyError> {
    use ratelimit::Decision;
    let client = rate_limit_client(state, shared);
    let asked = match &client {
        Some(c) => c.check(hits).await,
        None => Err("no usable rate-limit service is configured".to_string()),
    };
    let verdicts = match asked {
        Ok(v) => v,
        Err(cause) => {
            let mut closed = None;
            for h in hits {
                // A shadow limit never refuses, not even while it cannot be counted.
                let open =
                    h.limit.config.shadow || h.limit.config.global.as_ref().is_none_or(|g| g.failure_open);
                count(&h.limit, if open { Decision::FailureOpen } else { Decision::FailureClosed });
                if !open && closed.is_none() {
                    closed = Some(h.limit.config.name.clone());
                }
            }
            let service = state.config.rate_limit_service.as_ref().map(|s| s.address.as_str()).unwrap_or("-");
            // Once in 10 s at warn (every request may fail alike while the service is down).
            static LAST_WARN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let last = LAST_WARN.load(std::sync::atomic::Ordering::Relaxed);
            if now >= last + 10
                && LAST_WARN
                    .compare_exchange(
                        last,
                        now,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    )
                    .is_ok()
            {
                tracing::warn!(%service, %cause, refused = closed.is_some(), "rate limit: the rate-limit service did not decide (the limits' failure modes apply; counted in mycel_ratelimit_decisions_total as failure_open or failure_closed)");
            } else {
                tracing::debug!(%service, %cause, refused = closed.is_some(), "rate limit: the rate-limit service did not decide");
            }
            return match closed {
                Some(limit) => Err(ProxyError::RateLimitUnavailable { limit }),
                None => Ok(()),
            };
        }
    };
    let mut refused = None;
    let mut closed = None;
    for (h, v) in hits.iter().zip(&verdicts) {
        let c = &h.limit.config;
        if !v.error.is_empty() {
            // This limit alone could not be counted: its failure mode applies.
            let open = c.shadow || c.global.as_ref().is_none_or(|g| g.failure_open);
            count(&h.limit, if open { Decision::FailureOpen } else { Decision::FailureClosed });
            tracing::debug!(policy = %c.policy, limit = %c.name, error = %v.error, "rate limit: the rate-limit service could not count this limit");
            if !open && closed.is_none() {
                closed = Some(c.name.clone());
            }
            continue;
        }
        let d = match (v.admitted, c.shadow) {
            (true, _) => Decision::Allowed,
            (false, true) => Decision::ShadowLimited,
            (false, false) => Decision::Limited,
        };
        count(&h.limit, d);
        if d == Decision::ShadowLimited {
            tracing::debug!(policy = %c.policy, limit = %c.name, %peer, %path, "rate limit: would refuse (shadow, global)");
        }
        if d == Decision::Limited && refused.is_none() {
            refused = Some((h, v));
        }
    }
    let Some((h, v)) = refused else {
        return match closed {
            Some(limit) => Err(ProxyError::RateLimitUnavailable { limit }),
            None => Ok(()),
        };
    };
    let c = &h.limit.config;
    tracing::debug!(policy = %c.policy, limit = %c.name, %peer, %path, "rate limit: refused (global)");
    Err(ProxyError::RateLimited {
        limit: c.name.clone(),
        status: c
            .status
            .and_then(|s| hyper::StatusCode::from_u16(s).ok())
            .unwrap_or(hyper::StatusCode::TOO_MANY_REQUESTS),
        requests: h.rate.requests,
        per_seconds: h.rate.per_seconds,
        retry_after: std::time::Duration::from_millis(v.retry_after_ms.min(86_400_000 * 31)),
    })
}

/// The client of the service the configuration names, made on first use and again when it
/// names another.
fn rate_limit_client(state: &State, shared: &Shared) -> Option<std::sync::Arc<global::Client>> {
    let service = state.config.rate_limit_service.as_ref()?;
    let mut slot = shared.rate_limit_client.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = slot.as_ref()
        && c.service == *service
    {
        return Some(c.clone());
    }
    match global::Client::new(service, shared.mesh.clone()) {
        Ok(c) => {
            let c = std::sync::Arc::new(c);
            *slot = Some(c.clone());
            Some(c)
        }
        Err(e) => {
            // Every request would say it: the failure modes' warning (once in 10 s) covers it.
            tracing::debug!("rate limit: {e}");
            None
        }
    }
}
