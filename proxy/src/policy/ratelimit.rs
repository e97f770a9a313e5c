//! Local rate limits (RateLimitPolicy): a token bucket per limit and per value of its key,
//! counted in this proxy. A bucket holds `burst` tokens and is refilled continuously at
//! `requests` per `perSeconds`. A request is admitted only if every limit whose match applies
//! has a token for it, and then takes one from each; a refused request takes none (so that a
//! caller refused by its own limit cannot drain a bucket it shares with others). A shadow limit
//! without a token counts the refusal and lets the request pass.
//!
//! A limit keeps the buckets of at most [`MAX_KEYS`] keys, so that a flood of distinct keys
//! (header values, paths) cannot exhaust memory. A bucket that has refilled carries no state
//! and may be forgotten; when the table is full of buckets that have not (swept at most once a
//! second), a new key shares one overflow bucket with every other such key — a flood of keys
//! gets no fresh buckets, and resets no one's. Keys are held as 64-bit hashes under a
//! per-limit random seed (a value chosen to collide with another client's cannot be computed
//! from outside). Buckets survive a configuration update that leaves their limit as it was.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use hyper::Request;
use prometheus_client::metrics::counter::Counter;

use super::jwt::Authn;
use crate::{
    config::ratelimit::{LimitKey, RateLimit},
    http::Body,
    routing::table::Matcher,
};

/// The most keys a limit holds buckets for.
pub const MAX_KEYS: usize = 4096;

/// How often a full table is swept for buckets that have refilled.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The longest `Retry-After` said (a bucket refilled this slowly is a quota in effect).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// The limits of one configuration, compiled.
#[derive(Default)]
pub struct Limiter {
    limits: Vec<Arc<Limit>>,
}

/// One limit with its buckets.
pub struct Limit {
    pub config: RateLimit,
    matcher: Option<Matcher>,
    rate: Rate,
    /// By the key's value.
    overrides: HashMap<String, Rate>,
    claim: Vec<String>,
    seed: RandomState,
    buckets: Mutex<Buckets>,
    /// allowed, limited, shadow_limited, failure_open, failure_closed (set at the first decision).
    pub counters: OnceLock<[Counter; 5]>,
}

/// A bucket's rate: `requests` per `per_seconds`, `burst` at most.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub requests: u64,
    pub per_seconds: u64,
    burst: f64,
}

impl Rate {
    fn of(requests: u64, per_seconds: u64, burst: Option<u64>) -> Rate {
        Rate { requests, per_seconds, burst: burst.unwrap_or(requests) as f64 }
    }

    /// Tokens per second.
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.per_seconds as f64
    }
}

struct Buckets {
    table: HashMap<u64, Bucket>,
    /// Shared by the keys that find the table full.
    overflow: Option<Bucket>,
    swept: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    rate: Rate,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket { tokens: rate.burst, at: now, rate }
    }

    /// Refills it to `now`.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.per_second()).min(self.rate.burst);
        self.at = self.at.max(now);
    }

    /// How long until it has a token.
    fn wait(&self) -> Duration {
        let secs = ((1.0 - self.tokens).max(0.0) / self.rate.per_second()).min(MAX_RETRY_AFTER.as_secs_f64());
        Duration::try_from_secs_f64(secs).unwrap_or(MAX_RETRY_AFTER)
    }
}

/// Where a key's bucket is.
#[derive(Clone, Copy)]
enum Slot {
    Key(u64),
    Overflow,
}

impl Buckets {
    /// The slot of `key`'s bucket (created full if there is room), refilled to `now`.
    fn slot(&mut self, key: u64, now: Instant, rate: Rate) -> Slot {
        if !self.table.contains_key(&key) && self.table.len() >= MAX_KEYS {
            // Room is made by forgetting buckets that have refilled (they hold nothing).
            if self.swept.is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY) {
                self.swept = Some(now);
                self.table.retain(|_, b| {
                    b.refill(now);
                    b.tokens < b.rate.burst
                });
            }
            if self.table.len() >= MAX_KEYS {
                self.overflow.get_or_insert_with(|| Bucket::full(rate, now)).refill(now);
                return Slot::Overflow;
            }
        }
        self.table.entry(key).or_insert_with(|| Bucket::full(rate, now)).refill(now);
        Slot::Key(key)
    }

    fn get(&mut self, slot: Slot) -> &mut Bucket {
        match slot {
            Slot::Key(k) => self.table.get_mut(&k).expect("a slot names a bucket it made"),
            Slot::Overflow => self.overflow.as_mut().expect("a slot names a bucket it made"),
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }
}

/// The host a request is for (its authority, else its Host header), lowercase, without port.
fn host(req: &Request<Body>) -> Option<String> {
    let authority = match req.uri().authority() {
        Some(a) => a.host().to_string(),
        None => {
            let h = req.headers().get(hyper::header::HOST)?.to_str().ok()?;
            h.parse::<hyper::http::uri::Authority>().ok()?.host().to_string()
        }
    };
    Some(authority.trim_end_matches('.').to_ascii_lowercase())
}

/// Who sent a request, as the keys read it.
pub struct Subject<'a> {
    /// The peer's SPIFFE ID without `spiffe://`.
    pub principal: Option<&'a str>,
    pub ip: Option<IpAddr>,
    /// The destination (app) port.
    pub port: u16,
    pub auth: Option<&'a Authn>,
}

/// What a limit decided about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited,
    /// A shadow limit that would have refused it.
    ShadowLimited,
    /// A global limit the rate-limit service could not decide: admitted (failure mode Open).
    FailureOpen,
    /// The same, refused (failure mode Closed).
    FailureClosed,
}

/// A request a global limit counts: what the rate-limit service is asked (its rate with the
/// key's override applied).
pub struct Hit {
    pub limit: Arc<Limit>,
    /// The key's value ("" when it has none).
    pub key: String,
    pub rate: Rate,
}

impl Rate {
    /// The bucket size, a whole number of requests.
    pub fn burst(&self) -> u64 {
        self.burst as u64
    }
}

/// A refused request: the limit, the rate its key has there, and how long until its bucket has
/// a token.
pub struct Refused {
    pub limit: Arc<Limit>,
    pub rate: Rate,
    pub retry_after: Duration,
}

impl Limit {
    fn compile(config: &RateLimit) -> Limit {
        let canonical = |v: &str| -> String {
            match &config.key {
                // An address as the proxy writes one (`fd00::1`, not `fd00:0::1`).
                LimitKey::SourceIp => v.parse::<IpAddr>().map_or_else(|_| v.to_string(), |ip| ip.to_string()),
                // A path as requests have it once normalised.
                LimitKey::Path => super::authz::normalize_path(v).into_owned(),
                _ => v.to_string(),
            }
        };
        Limit {
            matcher: config.matches.as_ref().map(Matcher::compile),
            rate: Rate::of(config.requests, config.per_seconds, config.burst),
            overrides: config
                .overrides
                .iter()
                .map(|o| (canonical(&o.value), Rate::of(o.requests, config.per_seconds, o.burst)))
                .collect(),
            claim: match &config.key {
                LimitKey::Claim(c) => c.split('.').map(str::to_string).collect(),
                _ => Vec::new(),
            },
            seed: RandomState::new(),
            buckets: Mutex::new(Buckets { table: HashMap::new(), overflow: None, swept: None }),
            counters: OnceLock::new(),
            config: config.clone(),
        }
    }

    /// The key's value for a request (`None` when it has none; a connection that is not HTTP
    /// has only its peer's).
    fn value<'a>(
        &self,
        req: Option<&'a Request<Body>>,
        who: &Subject<'a>,
    ) -> Option<std::borrow::Cow<'a, str>> {
        use std::borrow::Cow;
        match &self.config.key {
            LimitKey::Global => None,
            LimitKey::SourceIp => who.ip.map(|ip| Cow::Owned(ip.to_string())),
            LimitKey::SourcePrincipal => who.principal.map(Cow::Borrowed),
            LimitKey::Header(h) => {
                // Every value, as one: a repeated header cannot hide the value the app reads.
                let mut values = req?.headers().get_all(h.as_str()).iter();
                let first = values.next()?;
                let mut v = String::from_utf8_lossy(first.as_bytes());
                for more in values {
                    let s = v.to_mut();
                    s.push(',');
                    s.push_str(&String::from_utf8_lossy(more.as_bytes()));
                }
                Some(v)
            }
            LimitKey::Path => req.map(|r| Cow::Borrowed(r.uri().path())),
            LimitKey::Claim(_) => {
                who.auth.and_then(|a| a.claim(&self.claim).into_iter().next()).map(Cow::Owned)
            }
        }
    }

    /// Whether it counts the request (`None`: a connection that is not HTTP, which only its
    /// port can tell apart: every limit on the port counts it, its HTTP parts read as absent).
    fn applies(&self, req: Option<&Request<Body>>, who: &Subject<'_>) -> bool {
        self.config.port.is_none_or(|p| p == who.port)
            && match (req, &self.matcher) {
                (Some(r), Some(m)) => m.matches(r),
                _ => true,
            }
            && (self.config.hosts.is_empty() || req.and_then(host).is_some_and(|h| self.host_matches(&h)))
    }

    fn host_matches(&self, host: &str) -> bool {
        self.config.hosts.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => host == p,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many keys it holds buckets for.
    pub fn keys(&self) -> usize {
        self.lock().len()
    }
}

impl Limiter {
    /// Compiles validated limits; a limit of `old` that is the same keeps its buckets.
    pub fn compile(limits: &[RateLimit], old: Option<&Limiter>) -> Limiter {
        let limits = limits
            .iter()
            .map(|l| {
                old.and_then(|o| o.limits.iter().find(|k| k.config == *l).cloned())
                    .unwrap_or_else(|| Arc::new(Limit::compile(l)))
            })
            .collect();
        Limiter { limits }
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Counts a request (`None`: a connection that is not HTTP) against every local limit that
    /// applies to it, telling `decided` each decision: admitted if every enforcing limit has a
    /// token, then each takes one (a shadow limit without one says so); else refused by the
    /// first without one, and no bucket is touched. An admitted request comes back with the
    /// global limits that apply to it, for the rate-limit service to count.
    pub fn check(
        &self,
        req: Option<&Request<Body>>,
        who: &Subject<'_>,
        now: Instant,
        mut decided: impl FnMut(&Limit, Decision),
    ) -> Result<Vec<Hit>, Refused> {
        // Every bucket involved is locked at once, in the limits' order (the same for every
        // request, so no two requests wait on each other in a cycle).
        let mut held: Vec<(&Arc<Limit>, MutexGuard<'_, Buckets>, Slot, Rate)> = Vec::new();
        let mut hits = Vec::new();
        for l in &self.limits {
            if !l.applies(req, who) {
                continue;
            }
            let value = l.value(req, who);
            let rate = value.as_deref().and_then(|v| l.overrides.get(v)).copied().unwrap_or(l.rate);
            if l.config.global.is_some() {
                hits.push(Hit {
                    limit: Arc::clone(l),
                    key: value.map(|v| v.into_owned()).unwrap_or_default(),
                    rate,
                });
                continue;
            }
            // Requests without a value share one bucket (hashed apart from every value's).
            let key = match value.as_deref() {
                Some(v) => l.seed.hash_one((1u8, v)),
                None => l.seed.hash_one(0u8),
            };
            let mut b = l.lock();
            let slot = b.slot(key, now, rate);
            held.push((l, b, slot, rate));
        }
        let refusing = held.iter_mut().find_map(|(l, b, slot, rate)| {
            let bucket = b.get(*slot);
            (!l.config.shadow && bucket.tokens < 1.0).then(|| (Arc::clone(l), *rate, bucket.wait()))
        });
        if let Some((limit, rate, retry_after)) = refusing {
            decided(&limit, Decision::Limited);
            return Err(Refused { limit, rate, retry_after });
        }
        for (l, b, slot, _) in &mut held {
            let bucket = b.get(*slot);
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                decided(l, Decision::Allowed);
            } else {
                decided(l, Decision::ShadowLimited);
            }
        }
        Ok(hits)
    }

    /// Whether any limit is global (counted by the rate-limit service).
    pub fn has_global(&self) -> bool {
        self.limits.iter().any(|l| l.config.global.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limiter(yaml: &str) -> Limiter {
        let c = Config::parse(&format!("rateLimits:\n{yaml}")).unwrap();
        Limiter::compile(&c.rate_limits, None)
    }

    fn req(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut r = Request::get(path);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(crate::http::empty()).unwrap()
    }

    fn who(principal: Option<&str>) -> Subject<'_> {
        Subject { principal, ip: Some([10, 0, 0, 1].into()), port: 8080, auth: None }
    }

    /// Requests admitted out of `n` sent `every` apart from `start`.
    fn admitted(
        l: &Limiter,
        r: &Request<Body>,
        s: &Subject<'_>,
        start: Instant,
        n: u32,
        every: Duration,
    ) -> u32 {
        (0..n).filter(|i| l.check(Some(r), s, start + every * *i, |_, _| {}).is_ok()).count() as u32
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let l = limiter("- {name: l, requests: 10, perSeconds: 1, burst: 20}");
        let (r, s, t0) = (req("/", &[]), who(None), Instant::now());
        // 100 requests at once: the burst; then 1000 over 10 s (100 per second): 10 per second.
        assert_eq!(admitted(&l, &r, &s, t0, 100, Duration::ZERO), 20);
        let t1 = t0 + Duration::from_millis(1);
        let n = admitted(&l, &r, &s, t1, 1000, Duration::from_millis(10));
        assert!((99..=101).contains(&n), "10 per second over 10 s: {n}");
        // A refusal says when a token is there again.
        let Err(refused) = l.check(Some(&r), &s, t1 + Duration::from_millis(9990), |_, _| {}) else {
            panic!()
        };
        assert!(refused.retry_after <= Duration::from_millis(100), "{:?}", refused.retry_after);
        assert_eq!(refused.limit.config.name, "l");
    }

    #[test]
    fn keys_count_apart_and_an_override_lifts_one() {
        let l = limiter(
            "- {name: l, requests: 2, perSeconds: 60, key: sourcePrincipal, overrides: [{value: t/ns/a/sa/vip, requests: 5, burst: 8}]}",
        );
        let (r, t0) = (req("/", &[]), Instant::now());
        let n = |p: Option<&str>| admitted(&l, &r, &who(p), t0, 10, Duration::ZERO);
        assert_eq!(n(Some("t/ns/a/sa/one")), 2);
        assert_eq!(n(Some("t/ns/a/sa/two")), 2, "another caller has its own bucket");
        assert_eq!(n(Some("t/ns/a/sa/vip")), 8, "the override's burst");
        assert_eq!(n(None), 2, "callers without an identity share one bucket");
        assert_eq!(n(None), 0);
    }

    #[test]
    fn only_matching_requests_count_and_a_shadow_limit_refuses_nothing() {
        let l = limiter(
            "- {name: shadow, requests: 1, perSeconds: 60, shadow: true}\n- {name: api, requests: 1, perSeconds: 60, match: {path: {prefix: /api}, method: GET}, port: 8080}",
        );
        let t0 = Instant::now();
        let mut seen = Vec::new();
        let mut check = |path: &str, port: u16| {
            let s = Subject { port, ..who(None) };
            l.check(Some(&req(path, &[])), &s, t0, |l, d| seen.push((l.config.name.clone(), d))).is_ok()
        };
        assert!(check("/api/a", 8080));
        assert!(!check("/api/b", 8080), "the api limit's one token is taken");
        assert!(check("/other", 8080), "not matched: only the shadow limit counts it");
        assert!(check("/api/c", 9090), "another port");
        let shadowed = seen.iter().filter(|(n, d)| n == "shadow" && *d == Decision::ShadowLimited).count();
        // /api/b was refused by `api`, so the shadow limit did not count it.
        assert_eq!(shadowed, 2, "the shadow limit would have refused /other and /api/c: {seen:?}");
        assert!(seen.contains(&("api".into(), Decision::Limited)));
    }

    #[test]
    fn a_claim_key_counts_each_token_subject_apart() {
        let l = limiter("- {name: l, requests: 1, perSeconds: 60, key: {claim: org.id}}");
        let (r, t0) = (req("/", &[]), Instant::now());
        let token = |org: &str| Authn {
            principal: "https://issuer/user".into(),
            claims: serde_json::json!({"org": {"id": org}}).as_object().unwrap().clone(),
            audiences: Vec::new(),
            presenter: None,
        };
        let (a, b) = (token("a"), token("b"));
        let n = |auth: Option<&Authn>| {
            let s = Subject { auth, ..who(None) };
            admitted(&l, &r, &s, t0, 3, Duration::ZERO)
        };
        assert_eq!((n(Some(&a)), n(Some(&b)), n(None)), (1, 1, 1), "one bucket per org, one for no token");
    }

    #[test]
    fn a_match_picks_the_requests_a_limit_counts() {
        // Every kind of match, on headers and on query parameters alike.
        let named = |list: &str| {
            format!(
                "{list}: [{{name: a, match: {{exact: free}}}}, {{name: b, match: present}}, {{name: c, match: {{prefix: u-}}}}, {{name: d, match: {{regex: '[0-9]+'}}}}, {{name: e, match: absent}}]"
            )
        };
        let l = limiter(&format!(
            "- {{name: l, requests: 1, perSeconds: 60, match: {{method: POST, path: {{regex: '/orders/[0-9]+'}}, {}, {}}}}}\n- {{name: exact, requests: 1, perSeconds: 60, match: {{path: {{exact: /x}}}}}}",
            named("headers"),
            named("queryParams")
        ));
        let t0 = Instant::now();
        let counted = |method: &str, uri: &str, headers: &[(&str, &str)]| {
            let mut r = Request::builder().method(method).uri(uri);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            let r = r.body(crate::http::empty()).unwrap();
            let mut n = 0;
            let _ = l.check(Some(&r), &who(None), t0, |_, _| n += 1);
            n
        };
        let all = [("a", "free"), ("b", "1"), ("c", "u-1"), ("d", "42")];
        let query = "a=free&b&c=u-1&d=42";
        let path = format!("/orders/12?{query}");
        assert_eq!(counted("POST", &path, &all), 1, "every part matches");
        assert_eq!(counted("GET", &path, &all), 0, "method");
        assert_eq!(counted("POST", &format!("/orders/x?{query}"), &all), 0, "path regex");
        for (i, what) in ["exact", "present", "prefix", "regex"].iter().enumerate() {
            let mut headers = all.to_vec();
            headers[i].1 = if i == 1 { "" } else { "nope" };
            if i == 1 {
                headers.remove(1);
            }
            assert_eq!(counted("POST", &path, &headers), 0, "header {what}");
            let q: Vec<String> = all
                .iter()
                .enumerate()
                .filter(|(j, _)| !(i == 1 && *j == 1))
                .map(|(j, (k, v))| if j == i { format!("{k}=nope") } else { format!("{k}={v}") })
                .collect();
            assert_eq!(counted("POST", &format!("/orders/12?{}", q.join("&")), &all), 0, "query {what}");
        }
        assert_eq!(counted("POST", &format!("{path}&e=1"), &all), 0, "a query parameter that must be absent");
        let mut with_e = all.to_vec();
        with_e.push(("e", "1"));
        assert_eq!(counted("POST", &path, &with_e), 0, "a header that must be absent");
        assert_eq!(counted("GET", "/x", &[]), 1, "path exact");
        assert_eq!(counted("GET", "/x/y", &[]), 0);
    }

    #[test]
    fn a_flood_of_keys_gets_no_fresh_buckets_and_resets_no_one() {
        let yaml = "- {name: l, requests: 1, perSeconds: 60, key: {header: x-key}}";
        let l = limiter(yaml);
        let t0 = Instant::now();
        let s = who(None);
        let check = |l: &Limiter, key: &str, at: Instant| {
            l.check(Some(&req("/", &[("x-key", key)])), &s, at, |_, _| {})
        };
        assert!(check(&l, "victim", t0).is_ok());
        for i in 0..(MAX_KEYS * 4) {
            let _ = check(&l, &i.to_string(), t0);
        }
        assert!(l.limits[0].keys() <= MAX_KEYS, "{}", l.limits[0].keys());
        assert!(check(&l, "victim", t0).is_err(), "the victim's empty bucket is remembered");
        assert!(check(&l, "new", t0).is_err(), "a key past the bound shares the spent overflow bucket");
        // A minute later every bucket has refilled: forgotten at the next sweep, room again.
        let later = t0 + Duration::from_secs(61);
        assert!(check(&l, "new", later).is_ok());
        assert!(check(&l, "new", later).is_err());
        // An update that keeps the limit keeps its buckets; a changed one starts full.
        let c = Config::parse(&format!("rateLimits:\n{yaml}")).unwrap();
        let kept = Limiter::compile(&c.rate_limits, Some(&l));
        assert!(check(&kept, "new", later).is_err(), "the bucket of `new` is still empty");
        let changed =
            Config::parse("rateLimits:\n- {name: l, requests: 2, perSeconds: 60, key: {header: x-key}}")
                .unwrap();
        let fresh = Limiter::compile(&changed.rate_limits, Some(&l));
        assert!(check(&fresh, "new", later).is_ok(), "a changed limit starts with full buckets");
    }

    #[test]
    fn a_refused_request_takes_no_token_from_a_bucket_others_share() {
        let l = limiter(
            "- {name: shared, requests: 5, perSeconds: 60}\n- {name: own, requests: 1, perSeconds: 60, key: sourcePrincipal}",
        );
        let (r, t0) = (req("/", &[]), Instant::now());
        assert_eq!(admitted(&l, &r, &who(Some("t/ns/a/sa/greedy")), t0, 50, Duration::ZERO), 1);
        for other in ["b", "c", "d", "e"] {
            let p = format!("t/ns/a/sa/{other}");
            assert_eq!(admitted(&l, &r, &who(Some(&p)), t0, 1, Duration::ZERO), 1, "{other} still gets in");
        }
        assert_eq!(
            admitted(&l, &r, &who(Some("t/ns/a/sa/f")), t0, 1, Duration::ZERO),
            0,
            "the shared five are spent"
        );
    }

    #[test]
    fn a_connection_that_is_not_http_counts_against_the_limits_on_its_port() {
        let l = limiter(
            "- {name: any, requests: 2, perSeconds: 60, match: {path: {prefix: /api}}, key: {header: x-key}}\n- {name: other-port, requests: 1, perSeconds: 60, port: 9090}",
        );
        let s = who(None);
        let t0 = Instant::now();
        let n = (0..5).filter(|_| l.check(None, &s, t0, |_, _| {}).is_ok()).count();
        assert_eq!(n, 2, "its HTTP parts read as absent: one bucket for all such connections");
        let s = Subject { port: 9090, ..who(None) };
        assert!(l.check(None, &s, t0, |_, _| {}).is_err(), "on port 9090 both limits count it");
    }

    #[test]
    fn a_repeated_header_is_one_key_of_all_its_values() {
        let l = limiter("- {name: l, requests: 1, perSeconds: 60, key: {header: x-key}}");
        let (s, t0) = (who(None), Instant::now());
        let r = |values: &[&str]| {
            let mut b = Request::get("/");
            for v in values {
                b = b.header("x-key", *v);
            }
            b.body(crate::http::empty()).unwrap()
        };
        assert!(l.check(Some(&r(&["real"])), &s, t0, |_, _| {}).is_ok());
        assert!(l.check(Some(&r(&["real"])), &s, t0, |_, _| {}).is_err());
        assert!(l.check(Some(&r(&["junk", "real"])), &s, t0, |_, _| {}).is_ok(), "another key: junk,real");
        assert!(l.check(Some(&r(&["junk", "real"])), &s, t0, |_, _| {}).is_err());
    }

    #[test]
    fn limits_that_cannot_be_counted_are_rejected_by_field() {
        for (yaml, field) in [
            ("- {name: l, requests: 0}", "rateLimits[/l].requests"),
            ("- {name: l, requests: 1, perSeconds: 18446744073709551615}", "rateLimits[/l].perSeconds"),
            ("- {name: L, requests: 1}", "rateLimits[/L].name"),
            ("- {name: l, requests: 1, perSeconds: 0}", "rateLimits[/l].perSeconds"),
            ("- {name: l, requests: 1, status: 200}", "rateLimits[/l].status"),
            ("- {name: l, requests: 1, overrides: [{value: a, requests: 2}]}", "rateLimits[/l].overrides"),
            ("- {name: l, requests: 1}\n- {name: l, requests: 2}", "rateLimits[/l].name"),
            ("- {name: l, requests: 1, match: {path: {regex: '(?=x)'}}}", "rateLimits[/l].match.path.regex"),
            ("- {name: l, requests: 1, global: {}}", "rateLimits[/l].global"),
            (
                "- {name: l, requests: 1, global: {}}\nrateLimitService: {address: 'rls:1', identity: 'spiffe://x/ns/a/sa/b'}",
                "rateLimits[/l].policy",
            ),
            (
                "- {policy: a/p, name: l, requests: 1, perSeconds: 86400, burst: 40, global: {}}\nrateLimitService: {address: 'rls:1', identity: 'spiffe://x/ns/a/sa/b'}",
                "rateLimits[a/p/l].burst",
            ),
            (
                "- {policy: a/p, name: l, requests: 1, global: {timeZone: UTC}}\nrateLimitService: {address: 'rls:1', identity: 'spiffe://x/ns/a/sa/b'}",
                "rateLimits[a/p/l].global.timeZone",
            ),
            (
                "- {policy: a/p, name: l, requests: 1}\nrateLimitService: {address: 'rls', identity: 'spiffe://x/ns/a/sa/b'}",
                "rateLimitService.address",
            ),
        ] {
            match Config::parse(&format!("rateLimits:\n{yaml}")) {
                Err(crate::config::ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{yaml}"),
                other => panic!("{yaml}: {other:?}"),
            }
        }
    }
}
