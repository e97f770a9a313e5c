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
        }
    }

    /// The endpoint set of a configured cluster, with its endpoints' identities.
    pub fn from_config(c: &config::Cluster, connect_timeout: Duration) -> Self {
        let mut e = Self::with_lb(&c.name, c.endpoints.clone(), connect_timeout, c.lb.clone());
        e.identities =
            e.addrs.iter().map(|a| c.mtls_endpoints.get(a).map(|id| Arc::from(id.as_str()))).collect();
        e
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
        InFlight { endpoints: self, index: i, started: Instant::now() }
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

    pub fn eject(&self, addr: SocketAddr) {
        if let Ok(mut e) = self.ejected.lock() {
            e.retain(|(a, _)| *a != addr);
            e.push((addr, Instant::now() + EJECTION));
            self.ejected_count.store(e.len(), Ordering::Relaxed);
        }
    }
}

/// A request in flight to one endpoint (for least-request and peak-EWMA).
pub struct InFlight<'a> {
    endpoints: &'a Endpoints,
    index: Option<usize>,
    started: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.index {
            self.endpoints.stats[i].in_flight.fetch_sub(1, Ordering::Relaxed);
            self.endpoints.observe(i, self.started.elapsed());
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
    fn least_request_avoids_busy_endpoints() {
        let e = set(LbAlgorithm::LeastRequest, 2);
        let busy: Vec<_> = (0..10).map(|_| e.start(addr(1))).collect();
        let idle = (0..500).filter(|_| e.order(None)[0] == addr(2)).count();
        assert_eq!(idle, 500);
        drop(busy);
        let spread = (0..1000).filter(|_| e.order(None)[0] == addr(1)).count();
        assert!(spread > 300 && spread < 700, "even again once idle: {spread}");
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
