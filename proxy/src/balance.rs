//! Endpoint sets and how one is chosen: round robin over endpoints that are not ejected. An
//! endpoint that fails to connect is ejected for a while, so the following connections and
//! requests skip it; when every endpoint is ejected, they are all tried again.

use std::{
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// How long an endpoint that refused a connection is skipped.
pub const EJECTION: Duration = Duration::from_secs(5);

pub struct Endpoints {
    pub cluster: String,
    pub addrs: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    next: AtomicUsize,
    ejected: Mutex<Vec<(SocketAddr, Instant)>>,
}

impl Endpoints {
    pub fn new(cluster: &str, addrs: Vec<SocketAddr>, connect_timeout: Duration) -> Self {
        Endpoints {
            cluster: cluster.into(),
            addrs,
            connect_timeout,
            next: AtomicUsize::new(0),
            ejected: Mutex::new(Vec::new()),
        }
    }

    /// Endpoints in the order to try them for one connection or request: healthy ones first,
    /// starting at the round-robin position, then the ejected ones as a last resort.
    pub fn order(&self) -> Vec<SocketAddr> {
        if self.addrs.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let ejected: Vec<SocketAddr> = self
            .ejected
            .lock()
            .map(|mut e| {
                e.retain(|(_, until)| *until > now);
                e.iter().map(|(a, _)| *a).collect()
            })
            .unwrap_or_default();
        let n = self.addrs.len();
        let rotated = (0..n).map(|i| self.addrs[(start + i) % n]);
        let (healthy, sick): (Vec<_>, Vec<_>) = rotated.partition(|a| !ejected.contains(a));
        healthy.into_iter().chain(sick).collect()
    }

    pub fn eject(&self, addr: SocketAddr) {
        if let Ok(mut e) = self.ejected.lock() {
            e.retain(|(a, _)| *a != addr);
            e.push((addr, Instant::now() + EJECTION));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn round_robin_skips_ejected_endpoints() {
        let e = Endpoints::new("c", vec![addr(1), addr(2), addr(3)], Duration::from_secs(1));
        let firsts: Vec<_> = (0..6).map(|_| e.order()[0]).collect();
        assert_eq!(firsts, vec![addr(1), addr(2), addr(3), addr(1), addr(2), addr(3)]);
        e.eject(addr(2));
        for _ in 0..6 {
            let o = e.order();
            assert_ne!(o[0], addr(2));
            assert_eq!(o.last(), Some(&addr(2)), "an ejected endpoint is the last resort");
        }
    }

    #[test]
    fn no_endpoints_means_nothing_to_try() {
        assert!(Endpoints::new("c", vec![], Duration::from_secs(1)).order().is_empty());
    }
}
