//! The data path's one error type, and the one place it becomes a response.
//!
//! Every step of a request's stack fails with a [`ProxyError`]; [`ProxyError::into_response`]
//! turns it into a status, a machine-readable reason and a response flag (Envoy's and Istio's
//! short codes, so access logs and dashboards read alike) — nowhere else makes an error response.
//! Retry and ejection decisions match on the variant, never on text.
//!
//! Between sidecars the reason travels in [`ERROR_HEADER`] as `<FLAG> <reason>`. An outbound
//! proxy believes it only from a peer proxy it reached over mutual TLS ([`ProxyError::from_peer`]);
//! from anyone else (an app, a server outside the mesh) the header is removed on the way back, so
//! an app cannot get its endpoint ejected or a request retried elsewhere by sending it.

use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Response, StatusCode, body::Bytes, header::HeaderValue};

use crate::http::Body;

/// Header naming the reason of a response the proxy made itself: `<FLAG> <reason>`, e.g.
/// `UH no_healthy_upstream`.
pub const ERROR_HEADER: &str = "x-mycel-error";

/// Header naming the limit that refused a request (RateLimitPolicy).
pub const RATELIMIT_HEADER: &str = "x-mycel-ratelimit";

/// Why the proxy answered a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The listener's cluster is not in the configuration (removed by a reload, or not streamed
    /// yet).
    NoCluster { cluster: String },
    /// The cluster has no endpoint to try.
    NoHealthyUpstream { cluster: String },
    /// The cluster's limit on requests in flight is reached (circuit breaking): refused at once.
    Overflow { cluster: String, max_requests: u32 },
    /// No connection could be opened to any endpoint tried; the request was not sent.
    ConnectFailed { cluster: String, attempts: usize, cause: String },
    /// The connection broke while the request or its response was on its way.
    UpstreamReset { cluster: String, cause: String },
    /// The upstream answered with something that is not a valid response here.
    UpstreamProtocol { cause: String },
    /// The upstream did not start its response in time (`limits.upstreamResponseHeaderTimeoutMs`).
    UpstreamTimeout { cluster: String, after: std::time::Duration },
    /// The client's request breaks HTTP's rules (`reason` says which, e.g. `missing_host`).
    BadRequest { reason: &'static str, detail: &'static str },
    /// The cluster has a route table and no rule of it matches the request.
    NoRoute { cluster: String, source: String },
    /// A route's fault injection aborted the request: its status, or HTTP 200 with a gRPC
    /// status in trailers-only form.
    FaultAbort { status: StatusCode, grpc_status: Option<u32> },
    /// The route's timeout passed before the response started.
    RouteTimeout { rule: String, after: std::time::Duration },
    /// The peer sidecar answered with an error of its own (its reason, as it sent it).
    Peer { status: StatusCode, flag: String, reason: String },
    /// A route rule answers with a redirect (not an error: no reason header).
    Redirect { status: StatusCode, location: HeaderValue },
    /// A route rule answers with its own response (not an error: no reason header).
    Direct { status: StatusCode, body: Bytes },
    /// An AuthorizationPolicy refused the request (which one is logged, never told the client).
    Denied,
    /// The request's JSON Web Token failed its RequestAuthentication rule (`detail` says how).
    Unauthenticated { detail: &'static str },
    /// A RateLimitPolicy's limit has no token for the request: its name, the status it answers
    /// with, its rate (`requests` per `per_seconds`) and how long until a token is there.
    RateLimited {
        limit: String,
        status: StatusCode,
        requests: u64,
        per_seconds: u64,
        retry_after: std::time::Duration,
    },
    /// A global limit applies and the rate-limit service could not decide in time; the limit's
    /// failure mode is Closed.
    RateLimitUnavailable { limit: String },
    /// An external authorizer (AuthorizationPolicy CUSTOM) refused the request: the response it
    /// asked for.
    ExtAuthzDenied {
        status: StatusCode,
        headers: Vec<(hyper::header::HeaderName, HeaderValue, crate::policy::ext_authz::Change)>,
        body: Bytes,
    },
    /// The external authorizer could not decide in time and its provider fails closed: its
    /// `statusOnError`.
    ExtAuthzUnavailable { provider: String, status: StatusCode },
}

impl ProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoCluster { .. }
            | ProxyError::NoHealthyUpstream { .. }
            | ProxyError::Overflow { .. }
            | ProxyError::ConnectFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamReset { .. } | ProxyError::UpstreamProtocol { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::FaultAbort { status, .. } => *status,
            ProxyError::RouteTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Peer { status, .. } => *status,
            ProxyError::Redirect { status, .. } | ProxyError::Direct { status, .. } => *status,
            ProxyError::Denied => StatusCode::FORBIDDEN,
            ProxyError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::RateLimited { status, .. } => *status,
            ProxyError::RateLimitUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ExtAuthzDenied { status, .. } | ProxyError::ExtAuthzUnavailable { status, .. } => {
                *status
            }
        }
    }

    /// Envoy's response flag: `NC` no cluster, `UH` no healthy upstream, `UO` overflow (circuit breaking), `UF` upstream connection
    /// failure, `URX` retry limit exceeded (more than one endpoint tried), `UC` upstream
    /// connection termination, `UPE` upstream protocol error, `UT` upstream request timeout,
    /// `DPE` downstream protocol error, `NR` no route, `FI` fault injected, `RBAC` denied by
    /// authorization policy.
    pub fn flag(&self) -> &str {
        match self {
            ProxyError::NoCluster { .. } => "NC",
            ProxyError::NoHealthyUpstream { .. } => "UH",
            ProxyError::Overflow { .. } => "UO",
            ProxyError::ConnectFailed { attempts, .. } if *attempts > 1 => "URX",
            ProxyError::ConnectFailed { .. } => "UF",
            ProxyError::UpstreamReset { .. } => "UC",
            ProxyError::UpstreamProtocol { .. } => "UPE",
            ProxyError::UpstreamTimeout { .. } => "UT",
            ProxyError::BadRequest { .. } => "DPE",
            ProxyError::NoRoute { .. } => "NR",
            ProxyError::FaultAbort { .. } => "FI",
            // Envoy gives direct responses no flag.
            ProxyError::Redirect { .. } | ProxyError::Direct { .. } => "-",
            ProxyError::RouteTimeout { .. } => "UT",
            ProxyError::Peer { flag, .. } => flag,
            ProxyError::Denied => "RBAC",
            // Envoy's jwt_authn sets no flag of its own.
            ProxyError::Unauthenticated { .. } => "-",
            ProxyError::RateLimited { .. } => "RL",
            // Envoy's: the rate-limit service failed (failure_mode_deny).
            ProxyError::RateLimitUnavailable { .. } => "RLSE",
            // Envoy's: unauthorized by the external authorization service (or its error).
            ProxyError::ExtAuthzDenied { .. } | ProxyError::ExtAuthzUnavailable { .. } => "UAEX",
        }
    }

    /// The machine-readable reason.
    pub fn reason(&self) -> &str {
        match self {
            ProxyError::NoCluster { .. } => "no_cluster",
            ProxyError::NoHealthyUpstream { .. } => "no_healthy_upstream",
            ProxyError::Overflow { .. } => "upstream_overflow",
            ProxyError::ConnectFailed { .. } => "upstream_connect_failed",
            ProxyError::UpstreamReset { .. } => "upstream_reset",
            ProxyError::UpstreamProtocol { .. } => "upstream_protocol_error",
            ProxyError::UpstreamTimeout { .. } => "upstream_response_timeout",
            ProxyError::BadRequest { reason, .. } => reason,
            ProxyError::NoRoute { .. } => "no_route_matched",
            ProxyError::FaultAbort { .. } => "fault_injected",
            ProxyError::Redirect { .. } => "redirect",
            ProxyError::Direct { .. } => "direct_response",
            ProxyError::RouteTimeout { .. } => "request_timeout",
            ProxyError::Peer { reason, .. } => reason,
            ProxyError::Denied => "access_denied",
            ProxyError::Unauthenticated { .. } => "jwt_invalid",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::RateLimitUnavailable { .. } => "rate_limit_service_unavailable",
            ProxyError::ExtAuthzDenied { .. } => "ext_authz_denied",
            ProxyError::ExtAuthzUnavailable { .. } => "ext_authz_error",
        }
    }

    /// Whether the request never reached an app, so that another endpoint may take it: this
    /// proxy could not connect, or the peer sidecar could not reach its app.
    pub fn not_sent(&self) -> bool {
        match self {
            ProxyError::ConnectFailed { .. } => true,
            ProxyError::Peer { reason, .. } => reason == "upstream_connect_failed",
            _ => false,
        }
    }

    /// A sentence for the body. It names the cluster (the Service the client asked for) but
    /// never an endpoint's address, which is the mesh's business, not the client's.
    fn message(&self) -> String {
        match self {
            ProxyError::NoCluster { cluster } => format!("no cluster named {cluster}"),
            ProxyError::NoHealthyUpstream { cluster } => format!("no endpoints for cluster {cluster}"),
            ProxyError::Overflow { cluster, max_requests } => format!(
                "cluster {cluster} has {max_requests} request(s) in flight, its limit (connectionPool.http.maxRequests)"
            ),
            ProxyError::ConnectFailed { cluster, attempts, cause } => {
                format!("cannot connect to cluster {cluster} ({attempts} endpoint(s) tried): {cause}")
            }
            ProxyError::UpstreamReset { cluster, cause } => {
                format!("the connection to cluster {cluster} broke: {cause}")
            }
            ProxyError::UpstreamProtocol { cause } => format!("invalid upstream response: {cause}"),
            ProxyError::UpstreamTimeout { cluster, after } => {
                format!("cluster {cluster} did not start its response within {after:?}")
            }
            ProxyError::BadRequest { detail, .. } => (*detail).to_string(),
            ProxyError::NoRoute { cluster, source } => {
                let source = if source.is_empty() { "its route table" } else { source.as_str() };
                format!("no rule of {source} matches this request to {cluster}")
            }
            ProxyError::FaultAbort { .. } => "aborted by fault injection".into(),
            ProxyError::RouteTimeout { rule, after } => {
                format!("route rule {rule}: no response within its timeout of {after:?}")
            }
            // Worded as Istio's, which clients and tests of Istio users look for.
            ProxyError::Denied => "RBAC: access denied".into(),
            ProxyError::Unauthenticated { detail } => format!("Jwt verification fails: {detail}"),
            ProxyError::RateLimited { limit, .. } => format!("rate limited by {limit}"),
            // Why is in the proxy's log: what it names (addresses, Redis) is not the client's.
            ProxyError::RateLimitUnavailable { limit } => {
                format!("the rate-limit service could not decide limit {limit}, whose failureMode is Closed")
            }
            ProxyError::Peer { reason, .. } if reason == "access_denied" => "RBAC: access denied".into(),
            ProxyError::Peer { reason, .. } => format!("the destination's proxy answered: {reason}"),
            ProxyError::Redirect { location, .. } => {
                format!("redirected to {}", String::from_utf8_lossy(location.as_bytes()))
            }
            ProxyError::Direct { body, .. } => String::from_utf8_lossy(body).into_owned(),
            ProxyError::ExtAuthzDenied { .. } => "denied by the external authorizer".into(),
            // Its address and the cause are in the proxy's log.
            ProxyError::ExtAuthzUnavailable { provider, .. } => {
                format!("the external authorizer {provider} could not decide")
            }
        }
    }

    /// The response the client gets: the status, [`ERROR_HEADER`], and a one-line body.
    pub fn into_response(self) -> Response<Body> {
        match self {
            ProxyError::Redirect { status, location } => {
                let mut r = Response::new(crate::http::empty());
                *r.status_mut() = status;
                r.headers_mut().insert(hyper::header::LOCATION, location);
                return r;
            }
            ProxyError::Direct { status, body } => {
                let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
                *r.status_mut() = status;
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                return r;
            }
            ProxyError::ExtAuthzDenied { status, headers, body } => {
                // The authorizer's response as it asked for it, and the reason as every refusal has.
                let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
                *r.status_mut() = status;
                crate::policy::ext_authz::apply(r.headers_mut(), &headers);
                r.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static("UAEX ext_authz_denied"));
                return r;
            }
            _ => {}
        }
        let body = format!("{}\n", self.message());
        let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
        *r.status_mut() = self.status();
        if let Ok(v) = HeaderValue::from_str(&format!("{} {}", self.flag(), self.reason())) {
            r.headers_mut().insert(ERROR_HEADER, v);
        }
        if let ProxyError::Unauthenticated { detail } = &self {
            // RFC 6750 §3: the challenge of a bearer token that failed.
            let v = format!("Bearer error=\"invalid_token\", error_description=\"{detail}\"");
            if let Ok(v) = HeaderValue::from_str(&v) {
                r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, v);
            }
        }
        if let ProxyError::RateLimited { limit, requests, per_seconds, retry_after, .. } = &self {
            // draft-ietf-httpapi-ratelimit-headers-09: the policy (quota `q` per window `w`
            // seconds) and the state of its bucket (`r` left, a token again in `t` seconds).
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let h = r.headers_mut();
            for (name, value) in [
                ("retry-after", secs.to_string()),
                ("ratelimit-policy", format!("\"{limit}\";q={requests};w={per_seconds}")),
                ("ratelimit", format!("\"{limit}\";r=0;t={secs}")),
                (RATELIMIT_HEADER, limit.clone()),
            ] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(name, v);
                }
            }
        }
        if let ProxyError::FaultAbort { grpc_status: Some(code), .. } = self {
            // Trailers-only: the status in the headers of an empty response.
            *r.body_mut() = Full::new(Bytes::new()).map_err(|never| match never {}).boxed();
            let h = r.headers_mut();
            h.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static("fault%20injected"));
        }
        r
    }

    /// The response a gRPC client gets (its request's content-type is `application/grpc…`):
    /// trailers-only, HTTP 200 with the `grpc-status` the gRPC specification maps the status to
    /// (404 `UNIMPLEMENTED`, 502/503/504/429 `UNAVAILABLE`, 400 `INTERNAL`, 401
    /// `UNAUTHENTICATED`, 403 `PERMISSION_DENIED`, else `UNKNOWN`; a rate limit's refusal
    /// `RESOURCE_EXHAUSTED`) and the reason in `grpc-message`, as Envoy answers gRPC requests; [`ERROR_HEADER`] is kept. Redirects, direct
    /// responses and aborts with a gRPC status are answered as they are.
    pub fn into_grpc_response(self) -> Response<Body> {
        let keep = matches!(
            self,
            ProxyError::Redirect { .. }
                | ProxyError::Direct { .. }
                | ProxyError::FaultAbort { grpc_status: Some(_), .. }
        );
        let message = self.message();
        // This proxy's rate limit, or the destination's (its sidecar answers HTTP, the client's
        // translates).
        let limited = match &self {
            ProxyError::RateLimited { .. } => true,
            ProxyError::Peer { flag, .. } => flag == "RL",
            _ => false,
        };
        let mut r = self.into_response();
        if keep {
            return r;
        }
        let code: u32 = match r.status().as_u16() {
            // RESOURCE_EXHAUSTED, whatever status the limit answers HTTP with.
            _ if limited => 8,
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502 | 503 | 504 => 14,
            _ => 2,
        };
        *r.status_mut() = StatusCode::OK;
        *r.body_mut() = Full::new(Bytes::new()).map_err(|never| match never {}).boxed();
        let h = r.headers_mut();
        h.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(code));
        // Percent-encoded, as grpc-message is (RFC 3986 unreserved characters and space kept
        // readable as %20).
        let encoded: String = message
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            h.insert("grpc-message", v);
        }
        r
    }

    /// The error a peer sidecar reported in its response, if it did. Call only for responses
    /// that came over mutual TLS from a verified peer; for any other, [`strip`] the header.
    pub fn from_peer(status: StatusCode, headers: &HeaderMap) -> Option<ProxyError> {
        let v = headers.get(ERROR_HEADER)?.to_str().ok()?;
        // A peer of the release before says `connect to <addr> failed` for the same thing: read
        // it alike, so that a rolling upgrade keeps failing over.
        if status == StatusCode::SERVICE_UNAVAILABLE && v.starts_with("connect to ") {
            return Some(ProxyError::Peer {
                status,
                flag: "UF".into(),
                reason: "upstream_connect_failed".into(),
            });
        }
        let (flag, reason) = v.split_once(' ')?;
        let token = |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic());
        (token(flag) && token(reason)).then(|| ProxyError::Peer {
            status,
            flag: flag.into(),
            reason: reason.into(),
        })
    }
}

/// Whether a peer proxy's answer is a refusal for a rate limit (call only for an answer from a
/// verified peer).
pub fn rate_limited_by_peer(headers: &HeaderMap) -> bool {
    headers.get(ERROR_HEADER).is_some_and(|v| v.as_bytes().starts_with(b"RL "))
}

/// Removes the error header from a message that did not come from a verified peer proxy.
pub fn strip(headers: &mut HeaderMap) {
    headers.remove(ERROR_HEADER);
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.flag(), self.reason(), self.message())
    }
}

impl std::error::Error for ProxyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_request_gets_the_limit_its_policy_and_when_to_retry() {
        let e = || ProxyError::RateLimited {
            limit: "per-client".into(),
            status: StatusCode::TOO_MANY_REQUESTS,
            requests: 10,
            per_seconds: 60,
            retry_after: std::time::Duration::from_millis(5200),
        };
        let r = e().into_response();
        assert_eq!(r.status(), 429);
        let h = r.headers();
        assert_eq!(h[ERROR_HEADER], "RL rate_limited");
        assert_eq!(h[RATELIMIT_HEADER], "per-client");
        assert_eq!(h["retry-after"], "6", "rounded up");
        assert_eq!(h["ratelimit-policy"], "\"per-client\";q=10;w=60");
        assert_eq!(h["ratelimit"], "\"per-client\";r=0;t=6");
        let peer = ProxyError::from_peer(r.status(), r.headers()).unwrap();
        let g = peer.into_grpc_response();
        assert_eq!(
            &g.headers()["grpc-status"],
            &HeaderValue::from(8),
            "the destination's refusal, translated"
        );
        let g = e().into_grpc_response();
        assert_eq!(
            (g.status().as_u16(), &g.headers()["grpc-status"]),
            (200, &HeaderValue::from(8)),
            "RESOURCE_EXHAUSTED"
        );
    }

    #[test]
    fn a_response_says_why_in_one_header_and_hides_addresses() {
        let e = ProxyError::ConnectFailed {
            cluster: "back".into(),
            attempts: 2,
            cause: "connection refused".into(),
        };
        let r = e.into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "URX upstream_connect_failed");
    }

    #[test]
    fn a_peer_reason_is_read_back_into_the_typed_error() {
        let r = ProxyError::ConnectFailed { cluster: "app".into(), attempts: 1, cause: "refused".into() }
            .into_response();
        let back = ProxyError::from_peer(r.status(), r.headers()).unwrap();
        assert!(back.not_sent(), "the peer could not reach its app: another endpoint may take it");
        assert_eq!(back.flag(), "UF");
        let reset = ProxyError::UpstreamReset { cluster: "app".into(), cause: "eof".into() }.into_response();
        assert!(!ProxyError::from_peer(reset.status(), reset.headers()).unwrap().not_sent());
        let mut h = HeaderMap::new();
        h.insert(ERROR_HEADER, HeaderValue::from_static("garbage"));
        assert_eq!(ProxyError::from_peer(StatusCode::OK, &h), None, "not `<FLAG> <reason>`");
    }

    #[test]
    fn a_grpc_client_gets_a_trailers_only_answer_with_the_mapped_status() {
        let r = ProxyError::NoRoute { cluster: "grpc".into(), source: String::new() }.into_grpc_response();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "12", "404 is UNIMPLEMENTED");
        assert_eq!(r.headers()[ERROR_HEADER], "NR no_route_matched");
        assert!(r.headers()["grpc-message"].to_str().unwrap().starts_with("no%20rule%20of"));
        let r = ProxyError::NoHealthyUpstream { cluster: "grpc".into() }.into_grpc_response();
        assert_eq!(r.headers()["grpc-status"], "14", "503 is UNAVAILABLE");
        let r = ProxyError::FaultAbort { status: StatusCode::OK, grpc_status: Some(7) }.into_grpc_response();
        assert_eq!(r.headers()["grpc-status"], "7", "an abort's own code is kept");
    }
}

/// What keeps a proxy from joining the mesh: a file it cannot read, keys that do not parse, a
/// control plane or CA that refuses or cannot be reached. Each says what was being done, for a
/// person reading the log; the proxy retries with backoff, keeping what it has.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{what}: {error}")]
    Tls { what: &'static str, error: rustls::Error },
    #[error("{what} ({code:?}): {message}")]
    Refused { what: &'static str, code: tonic::Code, message: String },
    #[error("{what}: {error}")]
    Unreachable { what: String, error: tonic::transport::Error },
    #[error("{0}")]
    Invalid(String),
}

impl SetupError {
    /// `what` failed because of `e`.
    pub fn invalid<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> SetupError + '_ {
        move |e| SetupError::Invalid(format!("{what}: {e}"))
    }

    /// The control plane or the CA answered `what` with an error status.
    pub fn refused(what: &'static str) -> impl FnOnce(tonic::Status) -> SetupError {
        move |s| SetupError::Refused { what, code: s.code(), message: s.message().to_string() }
    }
}

impl From<rustls::Error> for SetupError {
    fn from(error: rustls::Error) -> Self {
        SetupError::Tls { what: "TLS configuration", error }
    }
}
