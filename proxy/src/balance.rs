//! Endpoint sets and how one is chosen for a connection or request.
//!
//! Algorithms: power of two choices on peak-EWMA latency × requests in flight (the default, as
//! Linkerd does), round robin, least request (two choices on requests in flight), random, and
//! consistent hashing through a Maglev table (a request key — header, cookie or client IP —
//! always lands on the same endpoint while the set is stable, and only 1/N of keys move when it
//! changes). An endpoint that fails to connect is ejected for a while and tried last.

use std::{
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use std::sync::Arc;

use crate::config::{self, LbAlgorithm, LoadBalancer};

/// How long an endpoint that refused a connection is skipped.
pub const EJECTION: Duration = Duration::from_secs(5);
/// Latency assumed for an endpoint before anything was measured.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The most a refusal for a rate limit makes an endpoint cost.
const MAX_REFUSAL_COST: Duration = Duration::from_secs(1);
/// Decay time of the latency average.
const DECAY: Duration = Duration::from_secs(10);
/// Size of the Maglev lookup table (a prime well above any endpoint count).
const MAGLEV_SIZE: usize = 65_537;

struct Stats {
    in_flight: AtomicU64,
    /// (peak-EWMA cost in seconds, last update).
    ewma: Mutex<(f64, Instant)>,
}

pub struct Endpoints {
    pub cluster: String,
    pub addrs: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub algorithm: LbAlgorithm,
    pub lb: LoadBalancer,
    stats: Vec<Stats>,
    /// `host:port` of each endpoint, parsed once (requests reuse it for their URI).
    pub authorities: Vec<hyper::http::uri::Authority>,
    /// The SPIFFE ID each endpoint must prove, for those reached over mutual TLS: this
    /// cluster's own, so that an address another cluster names for another identity is never
    /// dialled expecting that one.
    identities: Vec<Option<Arc<str>>>,
    next: AtomicUsize,
    ejected: Mutex<Vec<(SocketAddr, Instant)>>,
    /// Entries in `ejected` (possibly expired): zero lets the hot path skip the lock.
    ejected_count: AtomicUsize,
    maglev: Vec<u32>,
    /// How many retries requests to this destination may still make.
    pub retry_budget: crate::routing::retry::Budget,
    /// Requests in flight to the whole set, and how many may be (circuit breaking).
    active: Arc<AtomicU64>,
    max_requests: Option<u32>,
    /// Mirrored copies in flight to this set (so one mirror cannot take every place).
    mirrors: Arc<AtomicU64>,
    outlier: Option<Outlier>,
    /// The port is declared HTTP (no TCP fallback in detection).
    pub http: bool,
}

/// Outlier detection's settings and each endpoint's record.
struct Outlier {
    cfg: config::OutlierDetection,
    interval: Duration,
    base: Duration,
    /// Sweeps happen at `created + n × interval`.
    created: Instant,
    records: Mutex<Vec<Record>>,
}

#[derive(Clone, Copy)]
struct Record {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Ejections so far, less one per interval spent in since.
    ejections: u32,
    /// When the count last went down (or the last ejection ends).
    settled: Instant,
}

/// What one try at an endpoint came to, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A 500, 501 or other 5xx that is not a gateway error.
    ServerError,
    /// 502, 503, 504, or no response at all (connect failure, reset, timeout).
    GatewayError,
}

impl Outcome {
    pub fn of_status(status: hyper::StatusCode) -> Outcome {
        match status.as_u16() {
            502..=504 => Outcome::GatewayError,
            500..=599 => Outcome::ServerError,
            _ => Outcome::Success,
        }
    }
}

/// Longest ejection, unless the base time is longer (as Envoy's `max_ejection_time`).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// One more on `count` unless it is at `limit` already.
fn take_place(count: &Arc<AtomicU64>, limit: u64) -> Option<Admitted> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
        .ok()
        .map(|_| Admitted(Some(count.clone())))
}

/// A request admitted under the set's `max_requests`; dropping it frees the place.
pub struct Admitted(Option<Arc<AtomicU64>>);

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Endpoints {
    pub fn new(cluster: &str, addrs: Vec<SocketAddr>, connect_timeout: Duration) -> Self {
        Self::with_algorithm(cluster, addrs, connect_timeout, LbAlgorithm::RoundRobin)
    }

    pub fn with_algorithm(
        cluster: &str,
        addrs: Vec<SocketAddr>,
        connect_timeout: Duration,
        algorithm: LbAlgorithm,
    ) -> Self {
        Self::with_lb(cluster, addrs, connect_timeout, LoadBalancer { algorithm, ..Default::default() })
    }

    pub fn with_lb(
        cluster: &str,
        addrs: Vec<SocketAddr>,
        connect_timeout: Duration,
        lb: LoadBalancer,
    ) -> Self {
        let algorithm = lb.algorithm;
        let now = Instant::now();
        let stats = addrs
            .iter()
            .map(|_| Stats {
                in_flight: AtomicU64::new(0),
                ewma: Mutex::new((DEFAULT_RTT.as_secs_f64(), now)),
            })
            .collect();
        let maglev = if algorithm == LbAlgorithm::ConsistentHash { maglev_table(&addrs) } else { Vec::new() };
        let authorities: Vec<hyper::http::uri::Authority> = addrs
            .iter()
            .map(|a| {
                a.to_string().parse().unwrap_or_else(|_| hyper::http::uri::Authority::from_static("invalid"))
            })
            .collect();
        Endpoints {
            cluster: cluster.into(),
            identities: vec![None; authorities.len()],
            authorities,
            ejected_count: AtomicUsize::new(0),
            addrs,
            connect_timeout,
            algorithm,
            lb,
            stats,
            next: AtomicUsize::new(0),
            ejected: Mutex::new(Vec::new()),
            maglev,
            retry_budget: Default::default(),
            active: Arc::new(AtomicU64::new(0)),
            max_requests: None,
            mirrors: Arc::new(AtomicU64::new(0)),
            outlier: None,
            http: false,
        }
    }

    /// The endpoint set of a configured cluster, with its endpoints' identities.
    pub fn from_config(c: &config::Cluster, connect_timeout: Duration) -> Self {
        let mut e = Self::with_lb(&c.name, c.endpoints.clone(), connect_timeout, c.lb.clone());
        e.identities =
            e.addrs.iter().map(|a| c.mtls_endpoints.get(a).map(|id| Arc::from(id.as_str()))).collect();
        e.max_requests = c.max_requests;
        e.http = c.http;
        e.outlier = c.outlier_detection.as_ref().map(|o| {
            let now = Instant::now();
            let fresh = Record { consecutive_5xx: 0, consecutive_gateway: 0, ejections: 0, settled: now };
            Outlier {
                cfg: o.clone(),
                interval: Duration::from_millis(o.interval_ms),
                base: Duration::from_millis(o.base_ejection_ms),
                created: now,
                records: Mutex::new(vec![fresh; e.addrs.len()]),
            }
        });
        e
    }

    /// Takes a place for one request under `max_requests`; `None` when every place is taken
    /// (the request is refused at once, it never waits).
    pub fn admit(&self) -> Option<Admitted> {
        let Some(max) = self.max_requests else { return Some(Admitted(None)) };
        take_place(&self.active, u64::from(max))
    }

    /// Takes a place for a mirrored copy to this set, at most `limit` at once.
    pub fn admit_mirror(&self, limit: u64) -> Option<Admitted> {
        take_place(&self.mirrors, limit)
    }

    /// The set's limit on requests in flight, if it has one.
    pub fn max_requests(&self) -> Option<u32> {
        self.max_requests
    }

    /// Records what a try at `addr` came to; with outlier detection on, enough consecutive
    /// errors eject it (unless that would eject more than allowed, or the last endpoint).
    /// Returns whether it was ejected now.
    pub fn report(&self, addr: SocketAddr, outcome: Outcome) -> bool {
        let Some(o) = &self.outlier else { return false };
        let Some(i) = self.index(addr) else { return false };
        let now = Instant::now();
        let Ok(mut records) = o.records.lock() else { return false };
        let r = &mut records[i];
        let interval = o.interval.as_nanos().max(1);
        // One ejection forgiven per interval spent in since the last one ended.
        if now > r.settled && r.ejections > 0 {
            let spent = now.duration_since(r.settled).as_nanos() / interval;
            let forgiven = spent.min(u128::from(r.ejections)) as u32;
            r.ejections -= forgiven;
            r.settled =
                o.interval.checked_mul(forgiven).and_then(|d| r.settled.checked_add(d)).unwrap_or(now);
        }
        match outcome {
            Outcome::Success => {
                r.consecutive_5xx = 0;
                r.consecutive_gateway = 0;
                return false;
            }
            Outcome::ServerError => {
                r.consecutive_5xx += 1;
                r.consecutive_gateway = 0;
            }
            Outcome::GatewayError => {
                r.consecutive_5xx += 1;
                r.consecutive_gateway += 1;
            }
        }
        let tripped = (o.cfg.consecutive_5xx > 0 && r.consecutive_5xx >= o.cfg.consecutive_5xx)
            || (o.cfg.consecutive_gateway > 0 && r.consecutive_gateway >= o.cfg.consecutive_gateway);
        if !tripped {
            return false;
        }
        // As Envoy: the share allowed, but at least one — and never the last endpoint.
        let n = self.addrs.len();
        let allowed = (n * o.cfg.max_ejection_percent as usize / 100).max(1).min(n.saturating_sub(1));
        // Decided and done under the records' lock, so that two failing endpoints reported at
        // once cannot both take the last place.
        let ejected = self.ejected_now();
        if ejected.contains(&addr) || ejected.len() >= allowed {
            return false;
        }
        r.consecutive_5xx = 0;
        r.consecutive_gateway = 0;
        r.ejections = r.ejections.saturating_add(1);
        let longest = MAX_EJECTION.max(o.base);
        let time = o.base.checked_mul(r.ejections).map_or(longest, |t| t.min(longest));
        // It comes back on the first sweep after its time is up: sweeps are every interval
        // from when the set was made.
        let due = (now + time).duration_since(o.created).as_nanos();
        let to_sweep = (interval - due % interval) % interval;
        let until = now + time + Duration::from_nanos(to_sweep as u64);
        r.settled = until;
        self.eject_until(addr, until);
        true
    }

    /// Takes over what `old` (the same cluster before an update) knew: the requests in flight
    /// (so a limit holds across the update) and, for the endpoints still here, their ejections
    /// and outlier records (so a pod cannot escape its ejection by flapping its readiness).
    pub fn inherit(&mut self, old: &Endpoints) {
        self.active = old.active.clone();
        self.mirrors = old.mirrors.clone();
        if let Ok(old_ejected) = old.ejected.lock() {
            let kept: Vec<(SocketAddr, Instant)> =
                old_ejected.iter().filter(|(a, _)| self.addrs.contains(a)).copied().collect();
            self.ejected_count.store(kept.len(), Ordering::Relaxed);
            self.ejected = Mutex::new(kept);
        }
        if let (Some(new), Some(prev)) = (&self.outlier, &old.outlier)
            && let (Ok(mut records), Ok(prev_records)) = (new.records.lock(), prev.records.lock())
        {
            for (i, a) in self.addrs.iter().enumerate() {
                if let Some(j) = old.index(*a) {
                    records[i] = prev_records[j];
                }
            }
        }
    }

    /// Whether `addr` is ejected now.
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        self.ejected_now().contains(&addr)
    }

    /// The one-endpoint set of a connection's original destination, reached over mutual TLS
    /// when the mesh names that address's identity.
    pub fn single(
        cluster: &str,
        addr: SocketAddr,
        connect_timeout: Duration,
        identity: Option<Arc<str>>,
    ) -> Self {
        let mut e = Self::new(cluster, vec![addr], connect_timeout);
        e.identities = vec![identity];
        e
    }

    /// Whether this set was built from a cluster configured as `c` is (so that it can be kept,
    /// balancing state and all, across a configuration update).
    pub fn same_as(&self, c: &config::Cluster, connect_timeout: Duration) -> bool {
        self.addrs == c.endpoints
            && self.connect_timeout == connect_timeout
            && self.lb == c.lb
            && self.max_requests == c.max_requests
            && self.http == c.http
            && self.outlier.as_ref().map(|o| &o.cfg) == c.outlier_detection.as_ref()
            && self
                .addrs
                .iter()
                .zip(&self.identities)
                .all(|(a, id)| c.mtls_endpoints.get(a).map(String::as_str) == id.as_deref())
    }

    /// The identity `addr` must prove, when this cluster reaches it over mutual TLS.
    pub fn identity(&self, addr: SocketAddr) -> Option<&Arc<str>> {
        self.index(addr).and_then(|i| self.identities[i].as_ref())
    }

    fn ejected_now(&self) -> Vec<SocketAddr> {
        if self.ejected_count.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let now = Instant::now();
        self.ejected
            .lock()
            .map(|mut e| {
                e.retain(|(_, until)| *until > now);
                self.ejected_count.store(e.len(), Ordering::Relaxed);
                e.iter().map(|(a, _)| *a).collect()
            })
            .unwrap_or_default()
    }

    /// The algorithm's choice alone (the hot path): no list of fallbacks is built.
    pub fn pick(&self, key: Option<u64>) -> Option<SocketAddr> {
        if self.addrs.len() == 1 && self.ejected_count.load(Ordering::Relaxed) == 0 {
            return Some(self.addrs[0]);
        }
        self.order(key).into_iter().next()
    }

    /// The authority of `addr` for an upstream URI.
    pub fn authority(&self, addr: SocketAddr) -> Option<&hyper::http::uri::Authority> {
        self.index(addr).map(|i| &self.authorities[i])
    }

    /// Endpoints in the order to try them: the algorithm's choice first, then the other healthy
    /// ones, then the ejected ones as a last resort. `key` is the hash key for consistent hashing.
    pub fn order(&self, key: Option<u64>) -> Vec<SocketAddr> {
        let n = self.addrs.len();
        if n == 0 {
            return Vec::new();
        }
        let ejected = self.ejected_now();
        let healthy: Vec<usize> = (0..n).filter(|i| !ejected.contains(&self.addrs[*i])).collect();
        let first = match (self.algorithm, key) {
            (LbAlgorithm::ConsistentHash, Some(k)) => self.maglev_pick(k, &healthy),
            _ if healthy.is_empty() => None,
            (LbAlgorithm::RoundRobin, _) | (LbAlgorithm::ConsistentHash, None) => {
                Some(healthy[self.next.fetch_add(1, Ordering::Relaxed) % healthy.len()])
            }
            (LbAlgorithm::Random, _) => Some(healthy[fastrand::usize(..healthy.len())]),
            (LbAlgorithm::LeastRequest, _) => Some(self.two_choices(&healthy, |i| self.in_flight(i) as f64)),
            (LbAlgorithm::PeakEwma, _) => Some(self.two_choices(&healthy, |i| self.load(i))),
        };
        let mut out = Vec::with_capacity(n);
        if let Some(f) = first {
            out.push(self.addrs[f]);
        }
        let start = self.next.load(Ordering::Relaxed);
        for i in (0..n).map(|j| (start + j) % n) {
            if Some(i) != first && healthy.contains(&i) {
                out.push(self.addrs[i]);
            }
        }
        out.extend(self.addrs.iter().filter(|a| ejected.contains(a)));
        out
    }

    /// Power of two choices: two distinct random candidates, the one with the lower `cost` wins.
    fn two_choices(&self, healthy: &[usize], cost: impl Fn(usize) -> f64) -> usize {
        if healthy.len() == 1 {
            return healthy[0];
        }
        let a = fastrand::usize(..healthy.len());
        let mut b = fastrand::usize(..healthy.len() - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (healthy[a], healthy[b]);
        if cost(b) < cost(a) { b } else { a }
    }

    fn maglev_pick(&self, key: u64, healthy: &[usize]) -> Option<usize> {
        if self.maglev.is_empty() {
            return None;
        }
        // Walk the table from the key's slot until a healthy endpoint owns one.
        let start = (key % self.maglev.len() as u64) as usize;
        (0..self.maglev.len())
            .map(|j| self.maglev[(start + j) % self.maglev.len()] as usize)
            .find(|i| healthy.contains(i))
    }

    fn index(&self, addr: SocketAddr) -> Option<usize> {
        self.addrs.iter().position(|a| *a == addr)
    }

    fn in_flight(&self, i: usize) -> u64 {
        self.stats[i].in_flight.load(Ordering::Relaxed)
    }

    /// Peak-EWMA cost, decayed to now, times the requests in flight (plus one).
    fn load(&self, i: usize) -> f64 {
        let s = &self.stats[i];
        let (cost, at) = s.ewma.lock().map(|g| *g).unwrap_or((DEFAULT_RTT.as_secs_f64(), Instant::now()));
        let w = (-at.elapsed().as_secs_f64() / DECAY.as_secs_f64()).exp();
        // An endpoint not heard from for a while looks cheaper and gets probed again.
        cost * w * (self.in_flight(i) + 1) as f64
    }

    /// Marks a request to `addr` as started; the guard records its latency when it ends.
    pub fn start(&self, addr: SocketAddr) -> InFlight<'_> {
        let i = self.index(addr);
        if let Some(i) = i {
            self.stats[i].in_flight.fetch_add(1, Ordering::Relaxed);
        }
        InFlight { endpoints: self, index: i, started: Instant::now(), refused: false }
    }

    /// A refusal for a rate limit: the endpoint's cost doubles (at least [`DEFAULT_RTT`], at
    /// most [`MAX_REFUSAL_COST`]), so that callers go to replicas that still have room.
    fn observe_refusal(&self, i: usize) {
        if let Ok(mut g) = self.stats[i].ewma.lock() {
            let (cost, at) = *g;
            let now = Instant::now();
            let w = (-now.duration_since(at).as_secs_f64() / DECAY.as_secs_f64()).exp();
            let next = (cost * w * 2.0).max(DEFAULT_RTT.as_secs_f64()).min(MAX_REFUSAL_COST.as_secs_f64());
            *g = (next.max(cost * w), now);
        }
    }

    fn observe(&self, i: usize, rtt: Duration) {
        let rtt = rtt.as_secs_f64();
        if let Ok(mut g) = self.stats[i].ewma.lock() {
            let (cost, at) = *g;
            let now = Instant::now();
            // Peak-sensitive: a slower answer takes effect at once, a faster one decays in.
            let next = if rtt > cost {
                rtt
            } else {
                let w = (-now.duration_since(at).as_secs_f64() / DECAY.as_secs_f64()).exp();
                cost * w + rtt * (1.0 - w)
            };
            *g = (next, now);
        }
    }

    /// Ejects `addr` for [`EJECTION`] after a failed connect (an outlier ejection that lasts
    /// longer is kept).
    pub fn eject(&self, addr: SocketAddr) {
        self.eject_until(addr, Instant::now() + EJECTION);
    }

    fn eject_until(&self, addr: SocketAddr, until: Instant) {
        if let Ok(mut e) = self.ejected.lock() {
            let until = e.iter().filter(|(a, _)| *a == addr).map(|(_, u)| *u).fold(until, Instant::max);
            e.retain(|(a, _)| *a != addr);
            e.push((addr, until));
            self.ejected_count.store(e.len(), Ordering::Relaxed);
        }
    }
}

/// A request in flight to one endpoint (for least-request and peak-EWMA).
pub struct InFlight<'a> {
    endpoints: &'a Endpoints,
    index: Option<usize>,
    started: Instant,
    refused: bool,
}

impl InFlight<'_> {
    /// Ends it as refused by the endpoint's proxy for a rate limit: not a latency sample (fast,
    /// such answers would draw more traffic to the endpoint that refuses most) but a penalty,
    /// so that callers spread over the replicas that still have room.
    pub fn refused(mut self) {
        self.refused = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.index {
            self.endpoints.stats[i].in_flight.fetch_sub(1, Ordering::Relaxed);
            if self.refused {
                self.endpoints.observe_refusal(i);
            } else {
                self.endpoints.observe(i, self.started.elapsed());
            }
        }
    }
}

/// The consistent-hash key of a request: its configured header, cookie or client IP, if present.
pub fn request_key(lb: &LoadBalancer, headers: &hyper::HeaderMap, peer: Option<SocketAddr>) -> Option<u64> {
    if lb.algorithm != LbAlgorithm::ConsistentHash {
        return None;
    }
    if let Some(h) = &lb.hash_header {
        return headers.get(h.as_str()).map(|v| hash_key(v.as_bytes()));
    }
    if let Some(name) = &lb.hash_cookie {
        return headers
            .get_all(hyper::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash_key(v.as_bytes()));
    }
    connection_key(lb, peer)
}

/// The consistent-hash key of a request, and — hashing on a cookie the request lacks, with a ttl
/// (as Envoy: without one, the cookie is the app's own and is only read) — the cookie to set on
/// its response: a random value, which the key is made of, so that the client's next requests,
/// carrying it, land where this one did.
pub fn request_key_setting(
    lb: &LoadBalancer,
    headers: &hyper::HeaderMap,
    peer: Option<SocketAddr>,
) -> (Option<u64>, Option<hyper::header::HeaderValue>) {
    let key = request_key(lb, headers, peer);
    let Some(name) = lb.hash_cookie.as_ref().filter(|_| key.is_none()) else { return (key, None) };
    let Some(ttl) = lb.hash_cookie_ttl_s.filter(|_| lb.algorithm == LbAlgorithm::ConsistentHash) else {
        return (key, None);
    };
    let value = format!("{:016x}", fastrand::u64(..));
    let mut cookie = format!("{name}={value}");
    if let Some(p) = &lb.hash_cookie_path {
        cookie.push_str(&format!("; Path={p}"));
    }
    cookie.push_str(&format!("; Max-Age={ttl}; HttpOnly"));
    (Some(hash_key(value.as_bytes())), hyper::header::HeaderValue::from_str(&cookie).ok())
}

/// The consistent-hash key of a connection: the client's IP, when hashing on it.
pub fn connection_key(lb: &LoadBalancer, peer: Option<SocketAddr>) -> Option<u64> {
    (lb.algorithm == LbAlgorithm::ConsistentHash && lb.hash_source_ip)
        .then_some(peer)
        .flatten()
        .map(|p| hash_key(p.ip().to_string().as_bytes()))
}

/// A 64-bit FNV-1a hash: stable across processes, so every proxy maps a key alike.
pub fn hash_key(bytes: &[u8]) -> u64 {
    mycel_api::hash::fnv1a(bytes)
}

/// Maglev's lookup table (Eisenbud et al., NSDI '16): each endpoint fills slots along its own
/// permutation in turn, so the table is near-evenly shared and stable under change.
fn maglev_table(addrs: &[SocketAddr]) -> Vec<u32> {
    let n = addrs.len();
    if n == 0 {
        return Vec::new();
    }
    let m = MAGLEV_SIZE;
    let perms: Vec<(usize, usize)> = addrs
        .iter()
        .map(|a| {
            let name = a.to_string();
            let offset = (hash_key(name.as_bytes()) % m as u64) as usize;
            let skip = (hash_key(format!("{name}#skip").as_bytes()) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    while filled < m {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn set(alg: LbAlgorithm, n: u16) -> Endpoints {
        Endpoints::with_algorithm("c", (1..=n).map(addr).collect(), Duration::from_secs(1), alg)
    }

    #[test]
    fn round_robin_skips_ejected_endpoints() {
        let e = set(LbAlgorithm::RoundRobin, 3);
        let firsts: Vec<_> = (0..6).map(|_| e.order(None)[0]).collect();
        assert_eq!(firsts, vec![addr(1), addr(2), addr(3), addr(1), addr(2), addr(3)]);
        e.eject(addr(2));
        for _ in 0..6 {
            let o = e.order(None);
            assert_ne!(o[0], addr(2));
            assert_eq!(o.last(), Some(&addr(2)), "an ejected endpoint is the last resort");
            assert_eq!(o.len(), 3);
        }
    }

    fn with_outlier(n: u16, o: config::OutlierDetection) -> Endpoints {
        let c = config::Cluster {
            name: "c".into(),
            endpoints: (1..=n).map(addr).collect(),
            connect_timeout_ms: 1000,
            lb: LoadBalancer { algorithm: LbAlgorithm::RoundRobin, ..Default::default() },
            addresses: vec![],
            mtls_endpoints: Default::default(),
            max_requests: Some(2),
            outlier_detection: Some(o),
            http: false,
        };
        Endpoints::from_config(&c, Duration::from_secs(1))
    }

    #[test]
    fn requests_over_the_limit_are_refused_until_one_ends() {
        let e = with_outlier(
            1,
            config::OutlierDetection {
                consecutive_5xx: 0,
                consecutive_gateway: 0,
                interval_ms: 1000,
                base_ejection_ms: 1000,
                max_ejection_percent: 10,
            },
        );
        let a = e.admit().expect("one");
        let b = e.admit().expect("two");
        assert!(e.admit().is_none(), "a third is over maxRequests 2");
        drop(a);
        let c = e.admit().expect("a place was freed");
        assert!(e.admit().is_none());
        drop((b, c));
        assert!(Endpoints::new("c", vec![addr(1)], Duration::from_secs(1)).admit().is_some(), "no limit");
    }

    /// Waits (polling, at most 10 s) until `addr` is back; returns how long it took.
    fn until_back(e: &Endpoints, a: SocketAddr) -> Duration {
        let start = Instant::now();
        while e.is_ejected(a) {
            assert!(start.elapsed() < Duration::from_secs(10), "never came back");
            std::thread::sleep(Duration::from_millis(2));
        }
        start.elapsed()
    }

    /// DestinationPolicy `outlierDetection`: `consecutiveGatewayErrors` eject, within
    /// `maxEjectionPercent` of the endpoints.
    #[test]
    fn consecutive_errors_eject_within_the_share_never_the_last_and_longer_each_time() {
        let o = config::OutlierDetection {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            interval_ms: 10,
            base_ejection_ms: 100,
            max_ejection_percent: 50,
        };
        let e = with_outlier(3, o.clone());
        assert!(!e.report(addr(1), Outcome::GatewayError));
        assert!(!e.report(addr(1), Outcome::Success), "a success resets the count");
        assert!(!e.report(addr(1), Outcome::GatewayError));
        assert!(!e.report(addr(1), Outcome::ServerError), "a 500 is not a gateway error");
        assert!(!e.report(addr(1), Outcome::GatewayError));
        assert!(e.report(addr(1), Outcome::GatewayError), "two in a row eject");
        assert!(e.is_ejected(addr(1)));
        assert!((0..50).all(|_| e.pick(None) != Some(addr(1))), "an ejected endpoint gets nothing");
        // 50 % of 3 is one endpoint: the second is not ejected.
        e.report(addr(2), Outcome::GatewayError);
        assert!(!e.report(addr(2), Outcome::GatewayError));
        let first = until_back(&e, addr(1));
        assert!(first >= Duration::from_millis(90), "back after {first:?}, base 100ms");
        // Ejected again at once: twice as long.
        e.report(addr(1), Outcome::GatewayError);
        assert!(e.report(addr(1), Outcome::GatewayError));
        let second = until_back(&e, addr(1));
        assert!(second >= Duration::from_millis(190), "back after {second:?}, 2 × base");
        // One endpoint alone is never ejected.
        let one = with_outlier(1, o);
        for _ in 0..10 {
            assert!(!one.report(addr(1), Outcome::GatewayError));
        }
        assert_eq!(one.pick(None), Some(addr(1)));
    }

    #[test]
    fn no_endpoints_means_nothing_to_try() {
        assert!(Endpoints::new("c", vec![], Duration::from_secs(1)).order(None).is_empty());
    }

    #[test]
    fn peak_ewma_prefers_the_fast_endpoint() {
        let e = set(LbAlgorithm::PeakEwma, 2);
        for _ in 0..20 {
            e.observe(0, Duration::from_millis(50));
            e.observe(1, Duration::from_millis(1));
        }
        let fast = (0..1000).filter(|_| e.order(None)[0] == addr(2)).count();
        assert_eq!(fast, 1000, "with two endpoints the two choices always compare both");
        // With five, the slow one still loses every comparison it is part of.
        let e = set(LbAlgorithm::PeakEwma, 5);
        e.observe(0, Duration::from_millis(500));
        let slow = (0..2000).filter(|_| e.order(None)[0] == addr(1)).count();
        assert_eq!(slow, 0);
    }

    #[test]
    fn a_refusal_for_a_rate_limit_sends_callers_to_the_other_replicas() {
        let e = set(LbAlgorithm::PeakEwma, 2);
        for _ in 0..20 {
            e.observe(0, Duration::from_millis(20));
            e.observe(1, Duration::from_millis(20));
        }
        let before = e.stats[1].ewma.lock().unwrap().0;
        // Endpoint 2 answers one fast refusal: counted as fast, it would draw every request.
        e.start(addr(2)).refused();
        assert_eq!(e.in_flight(1), 0, "the request is over");
        let other = (0..1000).filter(|_| e.order(None)[0] == addr(1)).count();
        assert_eq!(other, 1000, "the replica that refused costs more now");
        let cost = e.stats[1].ewma.lock().unwrap().0;
        assert!((cost / before - 2.0).abs() < 0.01, "doubled: {before} → {cost}");
        for _ in 0..100 {
            e.start(addr(2)).refused();
        }
        let cost = e.stats[1].ewma.lock().unwrap().0;
        assert!(cost <= MAX_REFUSAL_COST.as_secs_f64(), "bounded: {cost}");
    }

    #[test]
    fn least_request_avoids_busy_endpoints() {
        let e = set(LbAlgorithm::LeastRequest, 2);
        let busy: Vec<_> = (0..10).map(|_| e.start(addr(1))).collect();
        let idle = (0..500).filter(|_| e.order(None)[0] == addr(2)).count();
        assert_eq!(idle, 500);
        drop(busy);
        let spread = (0..1000).filter(|_| e.order(None)[0] == addr(1)).count();
        assert!(spread > 300 && spread < 700, "even again once idle: {spread}");
    }

    /// DestinationPolicy `loadBalancer.consistentHash.sourceIp: true`.
    #[test]
    fn source_ip_hashing_keys_on_the_clients_address_not_its_port() {
        let lb = LoadBalancer {
            algorithm: LbAlgorithm::ConsistentHash,
            hash_source_ip: true,
            ..Default::default()
        };
        let headers = hyper::HeaderMap::new();
        let a1: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let a2: SocketAddr = "10.0.0.1:40001".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let key = |p| request_key(&lb, &headers, Some(p));
        assert!(key(a1).is_some());
        assert_eq!(key(a1), key(a2), "one client pod, one key");
        assert_ne!(key(a1), key(b));
        assert_eq!(connection_key(&lb, Some(a1)), key(a1), "TCP connections hash alike");
        let e = set(LbAlgorithm::ConsistentHash, 5);
        let first = e.order(key(a1))[0];
        assert!((0..20).all(|_| e.order(key(a2))[0] == first));
    }

    #[test]
    fn a_request_without_the_hash_cookie_gets_one_that_brings_it_back_to_the_same_endpoint() {
        let lb = LoadBalancer {
            algorithm: LbAlgorithm::ConsistentHash,
            hash_cookie: Some("sid".into()),
            hash_cookie_path: Some("/".into()),
            hash_cookie_ttl_s: Some(60),
            ..Default::default()
        };
        let (key, set) = request_key_setting(&lb, &hyper::HeaderMap::new(), None);
        let set = set.expect("a cookie to set").to_str().unwrap().to_string();
        assert!(set.starts_with("sid=") && set.ends_with("; Path=/; Max-Age=60; HttpOnly"), "{set}");
        let mut headers = hyper::HeaderMap::new();
        headers.insert("cookie", format!("a=b; {}", set.split(';').next().unwrap()).parse().unwrap());
        let (again, none) = request_key_setting(&lb, &headers, None);
        assert_eq!((again, none), (key, None), "the same key, nothing set");
    }

    #[test]
    fn consistent_hashing_is_sticky_even_and_stable() {
        let e = set(LbAlgorithm::ConsistentHash, 5);
        let keys: Vec<u64> = (0..5000).map(|k| hash_key(format!("user-{k}").as_bytes())).collect();
        let before: Vec<SocketAddr> = keys.iter().map(|k| e.order(Some(*k))[0]).collect();
        assert!(
            keys.iter().zip(&before).all(|(k, a)| e.order(Some(*k))[0] == *a),
            "the same key, the same endpoint"
        );
        for p in 1..=5 {
            let share = before.iter().filter(|a| **a == addr(p)).count();
            assert!((700..1300).contains(&share), "endpoint {p} got {share} of 5000 keys");
        }
        // One endpoint ejected: only its keys move.
        e.eject(addr(3));
        let moved = keys.iter().zip(&before).filter(|(k, a)| e.order(Some(**k))[0] != **a).count();
        let owned = before.iter().filter(|a| **a == addr(3)).count();
        assert_eq!(moved, owned, "exactly the ejected endpoint's keys moved");
        // A new set without it: Maglev moves few of the others' keys.
        let smaller = Endpoints::with_algorithm(
            "c",
            vec![addr(1), addr(2), addr(4), addr(5)],
            Duration::from_secs(1),
            LbAlgorithm::ConsistentHash,
        );
        let others_moved = keys
            .iter()
            .zip(&before)
            .filter(|(k, a)| **a != addr(3) && smaller.order(Some(**k))[0] != **a)
            .count();
        assert!(others_moved < 500, "{others_moved} keys of remaining endpoints moved");
    }
}
