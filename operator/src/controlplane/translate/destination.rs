//! DestinationPolicy → what the clusters of its Service carry: the load balancer, the connect
//! timeout, the connection-pool limit, outlier detection, and the subsets (clusters of their
//! own, see [`super::cluster`]).
//!
//! A policy applies to a Service of its own namespace, or from the mesh's root namespace to any:
//! clusters reach every client, so a policy from a third namespace would let that namespace
//! throttle or break a Service for everyone (it is reported, `ResolvedRefs=False`, and applies
//! to nothing). One policy per Service: one of the Service's own namespace first, then the
//! oldest, then by namespace and name. The others do not apply to it and say so
//! (`Accepted=False`, `Conflicted`, naming the winner). A host that names no Service is reported
//! (`ResolvedRefs=False`) and the policy applies to nothing.

use std::collections::HashMap;

use mycel_api::v1alpha1 as pb;
use mycel_crds::destination_policy::{DestinationPolicy, DestinationPolicySpec, LbAlgorithm};

use super::millis as ms;
use super::route::service_of;
use crate::controlplane::snapshot::Key;

/// A DestinationPolicy as translation needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Dp {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    /// `metadata.creationTimestamp` (RFC 3339, so it sorts as it reads).
    pub created: String,
    pub spec: DestinationPolicySpec,
    /// The fields it sets that are not implemented yet.
    pub not_implemented: Vec<String>,
}

impl Dp {
    pub fn from_object(p: DestinationPolicy, not_implemented: Vec<String>) -> Dp {
        Dp {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            generation: p.metadata.generation.unwrap_or_default(),
            created: p.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
            spec: p.spec,
            not_implemented,
        }
    }

    fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

/// What one DestinationPolicy became.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// The Service it applies to (it won that Service).
    pub service: Option<Key>,
    pub conflicts: Vec<String>,
    pub unresolved: Vec<String>,
    /// Values no proxy could use, each naming the field: such a policy applies to nothing.
    pub invalid: Vec<String>,
}

/// What of `spec` a proxy would refuse (the API server's checks are looser).
fn invalid(spec: &DestinationPolicySpec) -> Vec<String> {
    let mut out = Vec::new();
    let hash = spec.load_balancer.as_ref().and_then(|l| l.consistent_hash.as_ref());
    if let Some(c) = hash.and_then(|h| h.cookie.as_ref()) {
        if !mycel_api::route::cookie_name(&c.name) {
            out.push(format!(
                "spec.loadBalancer.consistentHash.cookie.name: {:?} is not a cookie name (an RFC 6265 token)",
                c.name
            ));
        }
        if let Some(p) = &c.path
            && !mycel_api::route::cookie_path(p)
        {
            out.push(format!(
                "spec.loadBalancer.consistentHash.cookie.path: {p:?} is not a cookie path (/..., no ';' or spaces)"
            ));
        }
    }
    out
}

/// Which policy each Service gets (Service → policy), and what became of every policy.
pub fn decide(
    policies: &[&Dp],
    service_exists: &dyn Fn(&Key) -> bool,
    domain: &str,
    root_namespace: &str,
) -> (HashMap<Key, Key>, HashMap<Key, Outcome>) {
    let mut order: Vec<(&Dp, Option<Key>)> =
        policies.iter().map(|p| (*p, service_of(&p.spec.host.0, &p.namespace, domain))).collect();
    // Own namespace first, then the oldest, then by namespace and name.
    order.sort_by(|(a, sa), (b, sb)| {
        let foreign = |p: &Dp, s: &Option<Key>| s.as_ref().is_some_and(|s| s.0 != p.namespace);
        (foreign(a, sa), &a.created, &a.namespace, &a.name).cmp(&(
            foreign(b, sb),
            &b.created,
            &b.namespace,
            &b.name,
        ))
    });
    let mut winners: HashMap<Key, Key> = HashMap::new();
    let mut outcomes = HashMap::new();
    for (p, svc) in order {
        let mut o = Outcome { invalid: invalid(&p.spec), ..Default::default() };
        match svc {
            _ if !o.invalid.is_empty() => {}
            None => o.unresolved.push(format!(
                "host {}: not a Service name (name, name.namespace or name.namespace.svc.{domain})",
                p.spec.host.0
            )),
            Some(svc) if svc.0 != p.namespace && p.namespace != root_namespace => o.unresolved.push(format!(
                "host {}: a DestinationPolicy applies to Services of its own namespace, or from the root namespace {root_namespace} to any; create it in namespace {}",
                p.spec.host.0, svc.0
            )),
            Some(svc) if !service_exists(&svc) => {
                o.unresolved.push(format!("host {}: no Service {} in namespace {}", p.spec.host.0, svc.1, svc.0))
            }
            Some(svc) => match winners.get(&svc) {
                Some(w) => o.conflicts.push(format!(
                    "host {}: DestinationPolicy {}/{} applies to Service {}/{} (one of the Service's own namespace first, then the oldest, then by namespace and name)",
                    p.spec.host.0, w.0, w.1, svc.0, svc.1
                )),
                None => {
                    winners.insert(svc.clone(), p.key());
                    o.service = Some(svc);
                }
            },
        }
        outcomes.insert(p.key(), o);
    }
    (winners, outcomes)
}

/// Whether `spec` defines the subset `name`.
pub fn has_subset(spec: &DestinationPolicySpec, name: &str) -> bool {
    spec.subsets.iter().any(|s| s.name == name)
}

/// Puts what `spec` says into a cluster of its Service (or of one of its subsets).
pub fn apply(c: &mut pb::Cluster, spec: &DestinationPolicySpec) {
    use pb::load_balancer::{Algorithm, HashOn};
    if let Some(lb) = &spec.load_balancer {
        let algorithm = match lb.algorithm {
            LbAlgorithm::PeakEwma => Algorithm::PeakEwma,
            LbAlgorithm::RoundRobin => Algorithm::RoundRobin,
            LbAlgorithm::LeastRequest => Algorithm::LeastRequest,
            LbAlgorithm::Random => Algorithm::Random,
            LbAlgorithm::ConsistentHash => Algorithm::ConsistentHash,
        };
        let hash_on = lb.consistent_hash.as_ref().and_then(|h| {
            if let Some(name) = &h.header {
                Some(HashOn::Header(name.to_ascii_lowercase()))
            } else if let Some(cookie) = &h.cookie {
                Some(HashOn::Cookie(cookie.name.clone()))
            } else {
                h.source_ip.filter(|b| *b).map(HashOn::SourceIp)
            }
        });
        let cookie = lb.consistent_hash.as_ref().and_then(|h| h.cookie.as_ref());
        let cookie_path = cookie.and_then(|c| c.path.clone()).unwrap_or_default();
        // Whole seconds, rounded up (Max-Age counts seconds).
        let cookie_ttl_s = cookie
            .and_then(|c| c.ttl.as_ref())
            .and_then(|t| t.parse().ok())
            .map(|d| d.as_millis().div_ceil(1000).clamp(1, u32::MAX as u128) as u32)
            .unwrap_or(0);
        let algorithm = if algorithm == Algorithm::ConsistentHash && hash_on.is_none() {
            Algorithm::RoundRobin
        } else {
            algorithm
        };
        c.load_balancer =
            Some(pb::LoadBalancer { algorithm: algorithm as i32, hash_on, cookie_path, cookie_ttl_s });
    }
    if let Some(pool) = &spec.connection_pool {
        if let Some(t) = pool.tcp.as_ref().and_then(|t| t.connect_timeout.as_ref()).and_then(ms) {
            c.connect_timeout_ms = t;
        }
        if let Some(n) = pool.http.as_ref().and_then(|h| h.max_requests) {
            c.max_requests = n.max(1) as u32;
        }
    }
    if let Some(o) = &spec.outlier_detection {
        let n = |v: Option<i32>| v.map(|v| v.max(0) as u32);
        c.outlier_detection = Some(pb::OutlierDetection {
            // As Istio: 5 consecutive 5xx unless set; gateway errors only when set.
            consecutive_5xx: n(o.consecutive_5xx_errors).unwrap_or(5),
            consecutive_gateway: n(o.consecutive_gateway_errors).unwrap_or(0),
            interval_ms: o.interval.as_ref().and_then(ms).unwrap_or(10_000),
            base_ejection_ms: o.base_ejection_time.as_ref().and_then(ms).unwrap_or(30_000),
            max_ejection_percent: n(o.max_ejection_percent).unwrap_or(10).min(100),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp(ns: &str, name: &str, created: &str, spec: serde_json::Value) -> Dp {
        Dp {
            namespace: ns.into(),
            name: name.into(),
            generation: 1,
            created: created.into(),
            spec: serde_json::from_value(spec).unwrap(),
            not_implemented: Vec::new(),
        }
    }

    #[test]
    fn one_policy_per_service_its_own_namespace_first_then_the_oldest() {
        let own = dp("shop", "new", "2026-02-01T00:00:00Z", serde_json::json!({"host": "web"}));
        let older = dp("shop", "old", "2026-01-01T00:00:00Z", serde_json::json!({"host": "web.shop"}));
        let foreign = dp("other", "oldest", "2025-01-01T00:00:00Z", serde_json::json!({"host": "web.shop"}));
        let root =
            dp("mycel-system", "oldest", "2025-01-01T00:00:00Z", serde_json::json!({"host": "web.shop"}));
        let nowhere = dp("shop", "nowhere", "2025-01-01T00:00:00Z", serde_json::json!({"host": "missing"}));
        let exists = |k: &Key| k.1 == "web";
        let (winners, outcomes) =
            decide(&[&own, &older, &foreign, &root, &nowhere], &exists, "cluster.local", "mycel-system");
        let web = ("shop".to_string(), "web".to_string());
        assert_eq!(winners[&web], ("shop".to_string(), "old".to_string()));
        assert_eq!(outcomes[&older.key()].service, Some(web));
        assert!(outcomes[&own.key()].conflicts[0].contains("DestinationPolicy shop/old"), "{:?}", outcomes);
        assert!(outcomes[&root.key()].conflicts[0].contains("DestinationPolicy shop/old"), "{:?}", outcomes);
        assert!(outcomes[&foreign.key()].service.is_none());
        assert!(outcomes[&foreign.key()].unresolved[0].contains("its own namespace"), "{:?}", outcomes);
        assert_eq!(
            outcomes[&nowhere.key()].unresolved,
            ["host missing: no Service missing in namespace shop"]
        );
    }

    #[test]
    fn the_spec_reaches_the_cluster() {
        let p = dp(
            "shop",
            "web",
            "",
            serde_json::json!({
                "host": "web",
                "loadBalancer": {"algorithm": "ConsistentHash", "consistentHash": {"header": "X-User"}},
                "connectionPool": {"tcp": {"connectTimeout": "250ms"}, "http": {"maxRequests": 3}},
                "outlierDetection": {"consecutiveGatewayErrors": 2, "interval": "1s", "baseEjectionTime": "1.5ms", "maxEjectionPercent": 50}
            }),
        );
        let mut c = pb::Cluster { connect_timeout_ms: 1000, ..Default::default() };
        apply(&mut c, &p.spec);
        let lb = c.load_balancer.unwrap();
        assert_eq!(lb.algorithm, pb::load_balancer::Algorithm::ConsistentHash as i32);
        assert_eq!(lb.hash_on, Some(pb::load_balancer::HashOn::Header("x-user".into())));
        assert_eq!(c.connect_timeout_ms, 250);
        // Hashing on the client's address, or on a cookie (with the path and ttl of the one set).
        for (hash, algorithm, on) in [
            (
                serde_json::json!({"sourceIp": true}),
                pb::load_balancer::Algorithm::ConsistentHash,
                Some(pb::load_balancer::HashOn::SourceIp(true)),
            ),
            (
                serde_json::json!({"cookie": {"name": "session", "path": "/app", "ttl": "1500ms"}}),
                pb::load_balancer::Algorithm::ConsistentHash,
                Some(pb::load_balancer::HashOn::Cookie("session".into())),
            ),
        ] {
            let spec: DestinationPolicySpec = serde_json::from_value(serde_json::json!({
                "host": "web", "loadBalancer": {"algorithm": "ConsistentHash", "consistentHash": hash}
            }))
            .unwrap();
            let mut c = pb::Cluster::default();
            apply(&mut c, &spec);
            let lb = c.load_balancer.unwrap();
            if matches!(on, Some(pb::load_balancer::HashOn::Cookie(_))) {
                assert_eq!((lb.cookie_path.as_str(), lb.cookie_ttl_s), ("/app", 2), "ttl rounded up");
            }
            assert_eq!((lb.algorithm, lb.hash_on), (algorithm as i32, on));
        }
        assert_eq!(c.max_requests, 3);
        assert_eq!(
            c.outlier_detection,
            Some(pb::OutlierDetection {
                consecutive_5xx: 5,
                consecutive_gateway: 2,
                interval_ms: 1000,
                base_ejection_ms: 2,
                max_ejection_percent: 50,
            })
        );
    }
}
