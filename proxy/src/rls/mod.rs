//! The rate-limit service (`mycel-ratelimit`): counts the global limits and quotas of every
//! proxy of a policy in one place ([`store`], Redis). Proxies ask it over mutual TLS; what a
//! caller may count is bounded here, since a caller is a pod: at most [`MAX_HITS`] hits a call,
//! names and keys of bounded length, rates within the API's bounds, and only against the
//! policies of its own namespace or of the mesh's root namespace (a tenant cannot spend another
//! tenant's counters).

pub mod serve;
pub mod store;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use jiff::{Timestamp, ToSpan, tz::TimeZone};
use mycel_api::v1alpha1 as pb;
use tonic::{Request, Response, Status};

use store::{Outcome, Store};

/// The most hits one call may carry (a proxy counts at most as many limits).
pub const MAX_HITS: usize = crate::config::ratelimit::MAX_LIMITS;
/// The longest key value accepted (the proxy sends longer ones as their digest).
pub const MAX_KEY: usize = 512;
const MAX_REQUESTS: u64 = 1_000_000_000;
/// The longest unit of a rate (a day), and the longest a rate's counter may remember (31 days).
const MAX_PER_SECONDS: u64 = 86_400;
/// Time zones kept resolved.
const MAX_ZONES: usize = 64;

/// Counts of what the service decided and failed to, for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub admitted: AtomicU64,
    pub refused: AtomicU64,
    pub invalid: AtomicU64,
    pub forbidden: AtomicU64,
    pub store_errors: AtomicU64,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP mycel_ratelimit_service_hits_total Hits the rate-limit service was asked to count, by result.\n");
        out.push_str("# TYPE mycel_ratelimit_service_hits_total counter\n");
        for (result, c) in [
            ("admitted", &self.admitted),
            ("refused", &self.refused),
            ("invalid", &self.invalid),
            ("forbidden", &self.forbidden),
            ("store_error", &self.store_errors),
        ] {
            out.push_str(&format!(
                "mycel_ratelimit_service_hits_total{{result=\"{result}\"}} {}\n",
                c.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

pub struct Service {
    pub store: Arc<Store>,
    /// Policies of this namespace apply across the mesh: every caller may count them.
    pub root_namespace: String,
    pub trust_domain: String,
    pub metrics: Arc<Metrics>,
    zones: Mutex<HashMap<String, TimeZone>>,
}

/// A hit, checked: what to count and where.
#[derive(Debug, Clone, PartialEq)]
enum Counter {
    /// GCRA: `burst` at once, one per `interval_ms`.
    Rate { key: String, interval_ms: f64, burst: u64 },
    /// `limit` in the window `[start_ms, end_ms)`.
    Quota { key: String, limit: u64, start_ms: i64, end_ms: i64 },
}

impl Service {
    pub fn new(store: Arc<Store>, root_namespace: String, trust_domain: String) -> Service {
        Service {
            store,
            root_namespace,
            trust_domain,
            metrics: Arc::default(),
            zones: Mutex::new(HashMap::new()),
        }
    }

    /// Counts each hit on its own (a refused one counts nothing), `now` by the caller's clock.
    /// `caller`: the SPIFFE ID the caller proved; `None` (plaintext) may only read.
    pub async fn check(
        &self,
        caller: &str,
        hits: &[pb::Hit],
        now: Timestamp,
    ) -> Result<Vec<pb::Verdict>, Status> {
        if hits.len() > MAX_HITS {
            self.metrics.invalid.fetch_add(1, Ordering::Relaxed);
            return Err(Status::invalid_argument(format!("more than {MAX_HITS} hits")));
        }
        let mut counters = Vec::with_capacity(hits.len());
        for (i, h) in hits.iter().enumerate() {
            let ns = self.authorize(caller, &h.policy).inspect_err(|_| {
                self.metrics.forbidden.fetch_add(1, Ordering::Relaxed);
            })?;
            // A hit the service cannot count fails alone: the others are decided.
            let c = self
                .counter(
                    &ns,
                    &h.policy,
                    &h.limit,
                    &h.key,
                    h.requests,
                    h.per_seconds,
                    h.burst,
                    h.window,
                    &h.time_zone,
                    now,
                )
                .map_err(|e| {
                    self.metrics.invalid.fetch_add(1, Ordering::Relaxed);
                    format!("hits[{i}]: {e}")
                });
            counters.push(c);
        }
        let now_ms = now.as_millisecond();
        let runs = counters.iter().map(|c| async move {
            match c {
                Err(e) => Ok(Err(e.clone())),
                Ok(Counter::Rate { key, interval_ms, burst }) => {
                    self.store.gcra(key, now_ms as f64, *interval_ms, *burst).await.map(Ok)
                }
                Ok(Counter::Quota { key, limit, end_ms, .. }) => {
                    self.store.quota(key, *limit, *end_ms + 60_000, true).await.map(|mut o| {
                        if !o.admitted {
                            o.retry_after_ms = (*end_ms - now_ms).max(0) as u64;
                        }
                        Ok(o)
                    })
                }
            }
        });
        let outcomes = futures::future::join_all(runs).await;
        let mut verdicts = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            let o: Result<Outcome, String> = o.map_err(|e| {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                Status::unavailable(format!("the counters' store: {e}"))
            })?;
            let o = match o {
                Ok(o) => o,
                Err(error) => {
                    verdicts.push(pb::Verdict { error, ..Default::default() });
                    continue;
                }
            };
            let m = if o.admitted { &self.metrics.admitted } else { &self.metrics.refused };
            m.fetch_add(1, Ordering::Relaxed);
            verdicts.push(pb::Verdict {
                admitted: o.admitted,
                remaining: o.remaining,
                retry_after_ms: o.retry_after_ms,
                error: String::new(),
            });
        }
        Ok(verdicts)
    }

    /// What is left of one counter; counts nothing. Anyone who reaches the local port may ask
    /// (it is bound to loopback: `kubectl port-forward`, as `mycelctl quota` does).
    pub async fn remaining(
        &self,
        r: &pb::RemainingRequest,
        now: Timestamp,
    ) -> Result<pb::RemainingResponse, Status> {
        let ns = match r.policy.split_once('/') {
            Some((ns, _)) if ns == self.root_namespace => r.namespace.as_str(),
            Some((ns, _)) => ns,
            None => "",
        };
        let c = self
            .counter(
                ns,
                &r.policy,
                &r.limit,
                &r.key,
                r.requests,
                r.per_seconds,
                r.burst,
                r.window,
                &r.time_zone,
                now,
            )
            .map_err(Status::invalid_argument)?;
        let now_ms = now.as_millisecond();
        match c {
            Counter::Rate { key, interval_ms, burst } => {
                let o = self
                    .store
                    .peek_gcra(&key, now_ms as f64, interval_ms, burst)
                    .await
                    .map_err(unavailable)?;
                Ok(pb::RemainingResponse {
                    used: o.used,
                    remaining: o.remaining,
                    reset_ms: o.retry_after_ms,
                    window_start: String::new(),
                })
            }
            Counter::Quota { key, limit, start_ms, end_ms } => {
                let o = self.store.quota(&key, limit, end_ms + 60_000, false).await.map_err(unavailable)?;
                Ok(pb::RemainingResponse {
                    used: o.used,
                    remaining: o.remaining,
                    reset_ms: (end_ms - now_ms).max(0) as u64,
                    window_start: Timestamp::from_millisecond(start_ms)
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                })
            }
        }
    }

    /// A caller counts against its own namespace's policies and the root namespace's: its
    /// namespace, which also keeps its counters of the root namespace's policies apart.
    fn authorize(&self, caller: &str, policy: &str) -> Result<String, Status> {
        let id: mycel_api::spiffe::SpiffeId = caller.parse().map_err(|_| {
            Status::permission_denied(format!("{caller} is not a workload identity of the mesh"))
        })?;
        if id.trust_domain() != self.trust_domain {
            return Err(Status::permission_denied(format!(
                "{caller} is not of the trust domain {}",
                self.trust_domain
            )));
        }
        let ns = policy.split_once('/').map(|(ns, _)| ns).unwrap_or_default();
        if ns != id.namespace() && ns != self.root_namespace {
            return Err(Status::permission_denied(format!(
                "{caller} may count the policies of namespace {} and {} only, not {policy:?}",
                id.namespace(),
                self.root_namespace
            )));
        }
        Ok(id.namespace().to_string())
    }

    #[allow(clippy::too_many_arguments)]
    /// `namespace`: the caller's (a root-namespace policy counts each namespace apart).
    fn counter(
        &self,
        namespace: &str,
        policy: &str,
        limit: &str,
        key: &str,
        requests: u64,
        per_seconds: u64,
        burst: u64,
        window: i32,
        time_zone: &str,
        now: Timestamp,
    ) -> Result<Counter, String> {
        let Some((ns, name)) = policy.split_once('/') else {
            return Err(format!("policy {policy:?} is not <namespace>/<name>"));
        };
        if !dns_name(ns, 63) || !dns_name(name, 253) {
            return Err(format!("policy {policy:?} is not <namespace>/<name> of Kubernetes names"));
        }
        // A root-namespace policy applies across the mesh, counted apart for each namespace.
        let scope = if ns == self.root_namespace {
            if !dns_name(namespace, 63) {
                return Err(format!("the namespace {namespace:?} of a root-namespace policy's counter"));
            }
            format!("{policy}@{namespace}")
        } else {
            policy.to_string()
        };
        if !dns_name(limit, 63) {
            return Err(format!("limit {limit:?} is not a name of lowercase letters, digits and '-'"));
        }
        if key.len() > MAX_KEY {
            return Err(format!("the key is longer than {MAX_KEY} bytes"));
        }
        // Braces would name a Redis Cluster hash tag: a client would choose the slot.
        let digest;
        let key = if key.contains(['{', '}']) {
            digest = mycel_api::ratelimit::digest(key);
            digest.as_str()
        } else {
            key
        };
        if !(1..=MAX_REQUESTS).contains(&requests) {
            return Err(format!("requests must be within 1-{MAX_REQUESTS}"));
        }
        let window = pb::QuotaWindow::try_from(window).map_err(|_| format!("window {window} is unknown"))?;
        if window == pb::QuotaWindow::None {
            if !time_zone.is_empty() {
                return Err("timeZone applies to a quota's window only".into());
            }
            if !(1..=MAX_PER_SECONDS).contains(&per_seconds) {
                return Err(format!("perSeconds must be within 1-{MAX_PER_SECONDS}"));
            }
            if !(1..=MAX_REQUESTS).contains(&burst) {
                return Err(format!("burst must be within 1-{MAX_REQUESTS}"));
            }
            if !mycel_api::ratelimit::within_memory(requests, per_seconds, burst) {
                return Err("burst × perSeconds / requests must be at most 31 days".into());
            }
            let interval_ms = per_seconds as f64 * 1000.0 / requests as f64;
            // The rate names the counter: a caller that states another rate counts apart (it
            // cannot move a policy's counter with a rate of its own), and a changed limit starts
            // full.
            return Ok(Counter::Rate {
                key: format!("mycel:rl:{scope}:{limit}:{requests}/{per_seconds}/{burst}:{key}"),
                interval_ms,
                burst,
            });
        }
        let tz = self.zone(time_zone)?;
        let (start_ms, end_ms) = window_bounds(now, &tz, window)?;
        // The window's kind and start name it: an hour and a month that start at the same
        // instant are two counters.
        let kind = match window {
            pb::QuotaWindow::Hour => "h",
            pb::QuotaWindow::Day => "d",
            _ => "m",
        };
        Ok(Counter::Quota {
            // Not named by its size: a quota raised or lowered mid-window keeps what was used.
            key: format!("mycel:q:{scope}:{limit}:{kind}{}:{key}", start_ms / 1000),
            limit: requests,
            start_ms,
            end_ms,
        })
    }

    fn zone(&self, name: &str) -> Result<TimeZone, String> {
        if name.is_empty() || name == "UTC" {
            return Ok(TimeZone::UTC);
        }
        if name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b)) {
            return Err(format!("timeZone {name:?} is not an IANA time zone name"));
        }
        let mut zones = self.zones.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(z) = zones.get(name) {
            return Ok(z.clone());
        }
        let z = TimeZone::get(name)
            .map_err(|_| format!("timeZone {name:?} is not a time zone this service knows"))?;
        if zones.len() >= MAX_ZONES {
            zones.clear();
        }
        zones.insert(name.to_string(), z.clone());
        Ok(z)
    }
}

fn unavailable(e: String) -> Status {
    Status::unavailable(format!("the counters' store: {e}"))
}

/// A DNS label (or subdomain, when longer than 63 is allowed) of lowercase letters, digits,
/// '-' and '.'.
fn dns_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (max > 63 && b == b'.'))
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The calendar window around `now` in `tz`, as `[start, end)` in Unix milliseconds: an hour
/// of local time (so a zone half an hour off UTC starts its hours at :30 UTC), a day from local
/// midnight to the next (23 or 25 hours across a daylight-saving change), a month from its
/// first day's midnight.
pub fn window_bounds(now: Timestamp, tz: &TimeZone, window: pb::QuotaWindow) -> Result<(i64, i64), String> {
    let zoned = now.to_zoned_datetime(tz.clone());
    let err = |e: jiff::Error| format!("the window around {now} in {}: {e}", tz.iana_name().unwrap_or("UTC"));
    let ms = |z: jiff::ZonedDateTime| z.timestamp().as_millisecond();
    match window {
        pb::QuotaWindow::None => Err("not a quota".into()),
        pb::QuotaWindow::Hour => {
            let into =
                (zoned.minute() as i64 * 60 + zoned.second() as i64) * 1000 + zoned.millisecond() as i64;
            let start = now.as_millisecond() - into;
            Ok((start, start + 3_600_000))
        }
        pb::QuotaWindow::Day => {
            let start = zoned.start_of_day().map_err(err)?;
            let end = zoned.tomorrow().and_then(|t| t.start_of_day()).map_err(err)?;
            Ok((ms(start), ms(end)))
        }
        pb::QuotaWindow::Month => {
            let start = zoned.first_of_month().and_then(|f| f.start_of_day()).map_err(err)?;
            let end = start.checked_add(1.month()).and_then(|e| e.start_of_day()).map_err(err)?;
            Ok((ms(start), ms(end)))
        }
    }
}

/// The gRPC face of [`Service`]: `Check` needs the caller's proven identity, which the
/// server puts in the request's extensions ([`Caller`]); `Remaining` answers anyone who
/// reaches the port it is served on.
#[derive(Clone)]
pub struct Grpc {
    pub service: Arc<Service>,
    /// Serve `Remaining` (the loopback port); `Check` is refused there.
    pub local: bool,
}

/// The SPIFFE ID a caller proved with its certificate.
#[derive(Clone, Debug)]
pub struct Caller(pub Arc<str>);

#[tonic::async_trait]
impl pb::rate_limits_server::RateLimits for Grpc {
    async fn check(&self, req: Request<pb::CheckRequest>) -> Result<Response<pb::CheckResponse>, Status> {
        if self.local {
            return Err(Status::permission_denied("Check is served over mutual TLS only"));
        }
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let verdicts = self.service.check(&caller.0, &req.get_ref().hits, Timestamp::now()).await?;
        Ok(Response::new(pb::CheckResponse { verdicts }))
    }

    async fn remaining(
        &self,
        req: Request<pb::RemainingRequest>,
    ) -> Result<Response<pb::RemainingResponse>, Status> {
        if !self.local {
            return Err(Status::permission_denied("Remaining is served on the local port only"));
        }
        Ok(Response::new(self.service.remaining(req.get_ref(), Timestamp::now()).await?))
    }
}

/// The largest message either side sends (64 hits of bounded keys fit well within it).
pub const MAX_MESSAGE: usize = 64 * 1024;

pub fn server(grpc: Grpc) -> pb::rate_limits_server::RateLimitsServer<Grpc> {
    pb::rate_limits_server::RateLimitsServer::new(grpc)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn bounds(now: &str, zone: &str, w: pb::QuotaWindow) -> (String, String) {
        let tz = if zone == "UTC" { TimeZone::UTC } else { TimeZone::get(zone).unwrap() };
        let (s, e) = window_bounds(ts(now), &tz, w).unwrap();
        (
            Timestamp::from_millisecond(s).unwrap().to_string(),
            Timestamp::from_millisecond(e).unwrap().to_string(),
        )
    }

    #[test]
    fn windows_follow_the_zone_calendar() {
        use pb::QuotaWindow::*;
        assert_eq!(
            bounds("2026-12-03T18:20:31.5Z", "UTC", Hour),
            ("2026-12-03T18:00:00Z".into(), "2026-12-03T19:00:00Z".into())
        );
        // India is UTC+5:30: its hours start at half past in UTC.
        assert_eq!(
            bounds("2026-12-03T18:20:31Z", "Asia/Kolkata", Hour),
            ("2026-12-03T17:30:00Z".into(), "2026-12-03T18:30:00Z".into())
        );
        assert_eq!(
            bounds("2026-12-03T23:30:00Z", "Europe/Berlin", Day),
            ("2026-12-03T23:00:00Z".into(), "2026-12-04T23:00:00Z".into())
        );
        // The day clocks go forward has 23 hours.
        assert_eq!(
            bounds("2026-03-29T12:00:00Z", "Europe/Berlin", Day),
            ("2026-03-28T23:00:00Z".into(), "2026-03-29T22:00:00Z".into())
        );
        assert_eq!(
            bounds("2026-02-15T00:00:00Z", "UTC", Month),
            ("2026-02-01T00:00:00Z".into(), "2026-03-01T00:00:00Z".into())
        );
        assert_eq!(
            bounds("2026-12-31T23:30:00Z", "America/New_York", Month),
            ("2026-12-01T05:00:00Z".into(), "2027-01-01T05:00:00Z".into())
        );
    }

    fn service() -> Service {
        let store = Store::new(&store::RedisConfig {
            addresses: vec!["127.0.0.1:1".into()],
            cluster: false,
            password: None,
            timeout: std::time::Duration::from_millis(100),
            tls_ca: None,
        })
        .unwrap();
        Service::new(Arc::new(store), "mycel-system".into(), "cluster.local".into())
    }

    #[tokio::test]
    async fn a_caller_counts_its_own_namespace_and_the_root_only() {
        let s = service();
        let a = "spiffe://cluster.local/ns/a/sa/web";
        assert_eq!(s.authorize(a, "a/limits").unwrap(), "a");
        assert_eq!(s.authorize(a, "mycel-system/mesh-wide").unwrap(), "a");
        let e = s.authorize(a, "b/limits").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("namespace a"), "{}", e.message());
        assert!(s.authorize("spiffe://other.domain/ns/a/sa/web", "a/limits").is_err());
        assert!(s.authorize("spiffe://cluster.local/ns/a", "a/limits").is_err());
    }

    #[tokio::test]
    async fn hits_out_of_bounds_are_refused_with_the_field() {
        let s = service();
        let now = ts("2026-12-03T00:00:00Z");
        let c = |policy: &str,
                 limit: &str,
                 key: &str,
                 requests,
                 per,
                 burst,
                 window: pb::QuotaWindow,
                 tz: &str| {
            s.counter("a", policy, limit, key, requests, per, burst, window as i32, tz, now)
        };
        use pb::QuotaWindow::*;
        assert_eq!(
            c("a/p", "l", "k", 10, 1, 10, None, ""),
            Ok(Counter::Rate { key: "mycel:rl:a/p:l:10/1/10:k".into(), interval_ms: 100.0, burst: 10 })
        );
        // A caller that states another rate counts apart: it cannot push the policy's counter.
        let key = |c: Result<Counter, String>| match c {
            Ok(Counter::Rate { key, .. } | Counter::Quota { key, .. }) => key,
            Err(e) => panic!("{e}"),
        };
        assert_ne!(
            key(c("a/p", "l", "k", 1, 86_400, 31, None, "")),
            key(c("a/p", "l", "k", 10, 1, 10, None, ""))
        );
        assert_eq!(
            key(c("a/p", "l", "k", 10, 0, 0, Day, "")),
            key(c("a/p", "l", "k", 1_000_000, 0, 0, Day, "")),
            "a quota keeps what was used when its size changes"
        );
        // Braces would choose the Redis Cluster slot: such a value is named by its digest.
        let tagged = key(c("a/p", "l", "{x}", 10, 1, 10, None, ""));
        assert!(
            !tagged.contains(['{', '}']) && tagged.ends_with(&mycel_api::ratelimit::digest("{x}")),
            "{tagged}"
        );
        assert!(c("a/p", "l", &"x".repeat(MAX_KEY + 1), 10, 1, 10, None, "").unwrap_err().contains("key"));
        assert!(c("A/p", "l", "", 10, 1, 10, None, "").unwrap_err().contains("policy"));
        assert!(c("a", "l", "", 10, 1, 10, None, "").unwrap_err().contains("policy"));
        assert!(c("a/p", "L:x", "", 10, 1, 10, None, "").unwrap_err().contains("limit"));
        assert!(c("a/p", "l", "", 0, 1, 10, None, "").unwrap_err().contains("requests"));
        assert!(c("a/p", "l", "", 10, 0, 10, None, "").unwrap_err().contains("perSeconds"));
        assert!(c("a/p", "l", "", 1, 86_400, 1_000, None, "").unwrap_err().contains("31 days"));
        assert!(c("a/p", "l", "", 10, 1, 10, None, "Europe/Berlin").unwrap_err().contains("timeZone"));
        assert!(c("a/p", "l", "", 10, 0, 0, Day, "Mars/Olympus").unwrap_err().contains("timeZone"));
        assert!(c("a/p", "l", "", 10, 0, 0, Day, "../../etc").unwrap_err().contains("timeZone"));
        assert_eq!(
            c("a/p", "l", "k", 10, 0, 0, Day, "UTC"),
            Ok(Counter::Quota {
                key: format!("mycel:q:a/p:l:d{}:k", now.as_second()),
                limit: 10,
                start_ms: now.as_millisecond(),
                end_ms: now.as_millisecond() + 86_400_000,
            })
        );
        assert!(s.counter("a", "a/p", "l", "", 10, 1, 10, 9, "", now).unwrap_err().contains("window"));
        // The root namespace's policies: one counter per namespace that counts them.
        let root = |ns: &str| s.counter(ns, "mycel-system/p", "l", "k", 10, 1, 10, 0, "", now);
        assert_eq!(
            root("a"),
            Ok(Counter::Rate {
                key: "mycel:rl:mycel-system/p@a:l:10/1/10:k".into(),
                interval_ms: 100.0,
                burst: 10
            })
        );
        assert_ne!(root("a"), root("b"));
    }
}
