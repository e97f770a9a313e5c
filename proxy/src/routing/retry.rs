//! Retries: which failures a rule retries, how long it backs off, and the budget that keeps a
//! failing destination from being hammered.
//!
//! Only a request that can be sent again as it was is retried: no body, and an idempotent method
//! (GET, HEAD, OPTIONS, PUT, DELETE, TRACE). Each destination (cluster) has a budget, as
//! Linkerd's: every request deposits 0.2 of a retry, time adds 3 retries a second, at most 20
//! are saved up, and a retry spends one. So when everything fails, retries add about a fifth to
//! the load rather than multiply it by the attempts.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use hyper::{Method, Request, Response, StatusCode};

use crate::{config::route as cfg, error::ProxyError, http::Body};

/// Share of requests that may be retried.
const RATIO: f64 = 0.2;
/// Retries a second allowed whatever the traffic (so that a quiet destination can be retried).
const MIN_PER_SECOND: f64 = 3.0;
/// Retries that can be saved up.
const MAX_SAVED: f64 = 20.0;
/// Default base back-off.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// What a rule retries, compiled.
#[derive(Clone, Debug)]
pub struct Policy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    on: Vec<cfg::RetryOn>,
    backoff: Duration,
}

impl Policy {
    pub fn compile(r: &cfg::Retry) -> Policy {
        let on = if r.retry_on.is_empty() {
            vec![
                cfg::RetryOn::ConnectFailure,
                cfg::RetryOn::RefusedStream,
                cfg::RetryOn::Unavailable,
                cfg::RetryOn::GatewayError,
            ]
        } else {
            r.retry_on.clone()
        };
        Policy {
            attempts: r.attempts,
            per_try_timeout: r.per_try_timeout_ms.map(Duration::from_millis),
            on,
            backoff: r.backoff_ms.map(Duration::from_millis).unwrap_or(DEFAULT_BACKOFF),
        }
    }

    /// Whether `req` can be sent again: no body, idempotent method, no protocol switch.
    pub fn replayable(req: &Request<Body>) -> bool {
        let idempotent = matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        );
        idempotent
            && hyper::body::Body::is_end_stream(req.body())
            && !req.headers().contains_key(hyper::header::UPGRADE)
    }

    /// Whether the outcome of a try is one this policy retries.
    pub fn retries(&self, outcome: &Result<Response<Body>, ProxyError>) -> bool {
        use cfg::RetryOn as R;
        let has = |c: R| self.on.contains(&c);
        let status = match outcome {
            // A peer's refusal for a rate limit: another try would spend another replica's
            // tokens on a caller over its limit (the header is only there from a verified peer).
            Ok(r) if crate::error::rate_limited_by_peer(r.headers()) => return false,
            Ok(r) => r.status(),
            Err(e) => match e {
                ProxyError::ConnectFailed { .. } | ProxyError::NoHealthyUpstream { .. } => {
                    return has(R::ConnectFailure) || has(R::RefusedStream) || has(R::FiveXx);
                }
                ProxyError::UpstreamReset { .. } => return has(R::Reset) || has(R::FiveXx),
                ProxyError::UpstreamTimeout { .. } | ProxyError::RouteTimeout { .. } => {
                    return has(R::FiveXx) || has(R::GatewayError);
                }
                ProxyError::UpstreamProtocol { .. } => return has(R::FiveXx) || has(R::GatewayError),
                ProxyError::Peer { status, .. } => *status,
                _ => return false,
            },
        };
        if status.is_server_error() && has(R::FiveXx) {
            return true;
        }
        if matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) && has(R::GatewayError)
        {
            return true;
        }
        if status == StatusCode::CONFLICT && has(R::Retriable4xx) {
            return true;
        }
        // gRPC: the status of a trailers-only answer is in its headers.
        let grpc = outcome
            .as_ref()
            .ok()
            .and_then(|r| r.headers().get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        match grpc {
            Some(1) => has(R::Cancelled),
            Some(4) => has(R::DeadlineExceeded),
            Some(8) => has(R::ResourceExhausted),
            Some(14) => has(R::Unavailable),
            _ => false,
        }
    }

    /// The wait before retry `n` (0 for the first): full jitter over an exponential, capped at
    /// ten times the base.
    pub fn backoff(&self, n: u32) -> Duration {
        let ceiling = self.backoff.saturating_mul(1 << n.min(16)).min(self.backoff * 10);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// A destination's retry budget.
pub struct Budget(Mutex<(f64, Instant)>);

impl Default for Budget {
    fn default() -> Self {
        Budget(Mutex::new((MIN_PER_SECOND, Instant::now())))
    }
}

impl Budget {
    fn refill(state: &mut (f64, Instant)) {
        let now = Instant::now();
        state.0 = (state.0 + now.duration_since(state.1).as_secs_f64() * MIN_PER_SECOND).min(MAX_SAVED);
        state.1 = now;
    }

    /// A request to the destination: it earns a share of a retry.
    pub fn deposit(&self) {
        if let Ok(mut s) = self.0.lock() {
            Self::refill(&mut s);
            s.0 = (s.0 + RATIO).min(MAX_SAVED);
        }
    }

    /// Takes one retry, if the budget has one.
    pub fn withdraw(&self) -> bool {
        let Ok(mut s) = self.0.lock() else { return false };
        Self::refill(&mut s);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_everything_fails_the_budget_allows_about_a_fifth_more() {
        let b = Budget::default();
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                retries += 1;
            }
        }
        // 0.2 × 1000 plus what time and the start allow (the loop takes far less than a second).
        assert!((200..=210).contains(&retries), "{retries} retries for 1000 requests");
    }

    #[test]
    fn the_listed_conditions_are_retried_and_nothing_else() {
        let p = Policy::compile(&cfg::Retry {
            attempts: 2,
            retry_on: vec![cfg::RetryOn::FiveXx, cfg::RetryOn::Unavailable],
            ..Default::default()
        });
        let resp = |s: u16, grpc: Option<&str>| {
            use http_body_util::BodyExt;
            let mut r = Response::new(http_body_util::Empty::new().map_err(|never| match never {}).boxed());
            *r.status_mut() = StatusCode::from_u16(s).unwrap();
            if let Some(g) = grpc {
                r.headers_mut().insert("grpc-status", g.parse().unwrap());
            }
            Ok(r)
        };
        assert!(p.retries(&resp(503, None)));
        assert!(p.retries(&resp(500, None)));
        assert!(!p.retries(&resp(404, None)));
        assert!(!p.retries(&resp(409, None)), "retriable-4xx is not listed");
        assert!(p.retries(&resp(200, Some("14"))), "gRPC unavailable");
        assert!(!p.retries(&resp(200, Some("4"))), "deadline-exceeded is not listed");
        let reset = ProxyError::UpstreamReset { cluster: "c".into(), cause: "eof".into() };
        assert!(p.retries(&Err(reset)), "a reset is a 5xx");
        assert!(!p.retries(&Err(ProxyError::NoRoute { cluster: "c".into(), source: String::new() })));
        let mut limited = resp(503, None).unwrap();
        limited.headers_mut().insert(crate::error::ERROR_HEADER, "RL rate_limited".parse().unwrap());
        assert!(!p.retries(&Ok(limited)), "a peer's rate-limit refusal is never retried, even as a 503");
        let backoff = (0..10).map(|n| p.backoff(n)).max().unwrap();
        assert!(backoff <= DEFAULT_BACKOFF * 10, "{backoff:?}");
    }
}
