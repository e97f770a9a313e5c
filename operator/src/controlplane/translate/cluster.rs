//! Service + EndpointSlices + the endpoints' pods (+ the Service's DestinationPolicy) → one
//! Cluster per Service port, and one per port and subset (`<host>:<port>/<subset>`, the endpoints
//! whose pods carry the subset's labels; only routes send to it).

use std::collections::BTreeMap;

use mycel_api::spiffe::SpiffeId;
use mycel_api::v1alpha1 as pb;

use mycel_crds::destination_policy::DestinationPolicySpec;

use super::destination;
use super::peer_policy::port_mode;
use crate::controlplane::discovery::{PodInfo, Slice, Svc};
use crate::controlplane::snapshot::Key;

/// What translation knows of an endpoint's pod: the pod, and its inbound policy as computed for
/// its own proxy (so an endpoint is dialled with mTLS exactly where its proxy expects it).
pub struct PodView<'a> {
    pub info: &'a PodInfo,
    pub policy: &'a pb::PeerPolicy,
}

/// The mesh's names.
pub struct Names<'a> {
    pub cluster_domain: &'a str,
    pub trust_domain: &'a str,
}

/// The clusters of one Service, by name, and the pods its endpoints name (known or not yet), so
/// that the model recomputes the Service when one of them changes.
pub struct Translated {
    pub clusters: BTreeMap<String, pb::Resource>,
    pub pods: Vec<Key>,
}

/// An endpoint with its pod's labels and whether that pod has a sidecar.
struct Member<'a> {
    endpoint: pb::Endpoint,
    labels: Option<&'a BTreeMap<String, String>>,
    sidecar: bool,
}

/// Translates one Service: a cluster `<name>.<namespace>.svc.<domain>:<port>` per TCP port, with
/// the ready and not-ready endpoints of every slice of it that has that port.
pub fn clusters<'a>(
    (ns, name): &Key,
    svc: &Svc,
    slices: &[&Slice],
    pod: impl Fn(&Key) -> Option<PodView<'a>>,
    names: &Names,
    policy: Option<&DestinationPolicySpec>,
) -> Translated {
    let mut out = BTreeMap::new();
    let mut pods = Vec::new();
    let host = format!("{name}.{ns}.svc.{}", names.cluster_domain);
    for e in slices.iter().flat_map(|s| &s.endpoints) {
        pods.extend(e.pod.clone());
    }
    pods.sort();
    pods.dedup();
    for (port_name, port) in &svc.ports {
        let mut endpoints: Vec<Member> = Vec::new();
        for slice in slices {
            let Some((_, target)) = slice.ports.iter().find(|(n, _)| n == port_name) else {
                continue;
            };
            for e in &slice.endpoints {
                let view = e.pod.as_ref().and_then(|k| pod(k).map(|v| (k, v)));
                let mtls = view.as_ref().is_some_and(|(_, v)| {
                    v.info.sidecar && port_mode(v.policy, *target as u32) != pb::MtlsMode::MtlsDisable
                });
                let identity = view
                    .as_ref()
                    .map(|((pns, _), v)| {
                        SpiffeId::new(names.trust_domain, pns, &v.info.service_account).to_string()
                    })
                    .unwrap_or_default();
                let labels = view.as_ref().map(|(_, v)| &v.info.labels);
                let sidecar = view.as_ref().is_some_and(|(_, v)| v.info.sidecar);
                for a in &e.addresses {
                    let address =
                        if a.contains(':') { format!("[{a}]:{target}") } else { format!("{a}:{target}") };
                    let endpoint = pb::Endpoint {
                        address,
                        identity: identity.clone(),
                        labels: Default::default(),
                        locality: e.zone.clone(),
                        ready: e.ready,
                        mtls,
                    };
                    endpoints.push(Member { endpoint, labels, sidecar });
                }
            }
        }
        endpoints.sort_by(|a, b| a.endpoint.address.cmp(&b.endpoint.address));
        endpoints.dedup_by(|a, b| a.endpoint.address == b.endpoint.address);
        let cluster_name = format!("{host}:{port}");
        let addresses = svc
            .ips
            .iter()
            .map(|ip| if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") })
            .collect();
        let mut insert = |name: String, members: Vec<&Member>, addresses| {
            let mesh_tls = !members.is_empty() && members.iter().all(|m| m.sidecar);
            let mut cluster = pb::Cluster {
                name: name.clone(),
                endpoints: members.into_iter().map(|m| m.endpoint.clone()).collect(),
                load_balancer: None,
                connect_timeout_ms: 1000,
                mesh_tls,
                addresses,
                max_requests: 0,
                outlier_detection: None,
                http: declared_http(port_name, svc.app_protocols.get(port_name).map(String::as_str)),
            };
            if let Some(p) = policy {
                destination::apply(&mut cluster, p);
            }
            let resource = pb::Resource {
                name: name.clone(),
                version: String::new(),
                kind: Some(pb::resource::Kind::Cluster(cluster)),
            };
            out.insert(name, resource);
        };
        insert(cluster_name.clone(), endpoints.iter().collect(), addresses);
        for subset in policy.map(|p| p.subsets.as_slice()).unwrap_or_default() {
            let members = endpoints
                .iter()
                .filter(|m| m.labels.is_some_and(|l| subset.labels.iter().all(|(k, v)| l.get(k) == Some(v))))
                .collect();
            insert(format!("{cluster_name}/{}", subset.name), members, Vec::new());
        }
    }
    Translated { clusters: out, pods }
}

/// Whether a Service port is declared HTTP, as Istio reads it: its `appProtocol` (`http`,
/// `http2`, `grpc`, `grpc-web`, `h2c`, `kubernetes.io/h2c`, `kubernetes.io/ws`), or without one
/// its name (one of those, alone or before a `-`).
pub fn declared_http(name: &str, app_protocol: Option<&str>) -> bool {
    const HTTP: &[&str] = &["http", "http2", "grpc", "grpc-web", "h2c"];
    match app_protocol {
        Some(p) => {
            let p = p.to_ascii_lowercase();
            HTTP.contains(&p.as_str()) || p == "kubernetes.io/h2c" || p == "kubernetes.io/ws"
        }
        None => {
            let name = name.to_ascii_lowercase();
            HTTP.iter().any(|h| name == *h || name.strip_prefix(h).is_some_and(|rest| rest.starts_with('-')))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_declared_http_by_its_app_protocol_or_its_name() {
        for (name, app, http) in [
            ("http", None, true),
            ("http-web", None, true),
            ("grpc", None, true),
            ("grpc-web", None, true),
            ("http2-api", None, true),
            ("httpx", None, false),
            ("tcp", None, false),
            ("", None, false),
            ("web", Some("http"), true),
            ("web", Some("kubernetes.io/h2c"), true),
            ("http", Some("tcp"), false),
            ("http", Some("mysql"), false),
        ] {
            assert_eq!(declared_http(name, app), http, "{name} {app:?}");
        }
    }
    use crate::controlplane::discovery::SliceEndpoint;

    fn endpoint(ip: &str, pod: &str) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![ip.into()],
            ready: true,
            pod: Some(("shop".into(), pod.into())),
            zone: "z1".into(),
        }
    }

    #[test]
    fn endpoints_are_dialled_with_mtls_where_their_own_proxy_expects_it() {
        let svc = Svc {
            ips: vec!["10.96.0.5".into(), "fd00::5".into()],
            ports: vec![("http".into(), 80)],
            ..Default::default()
        };
        let slice = Slice {
            service: "web".into(),
            ports: vec![("http".into(), 8080)],
            endpoints: vec![endpoint("10.0.0.1", "a"), endpoint("10.0.0.2", "b"), endpoint("10.0.0.3", "c")],
        };
        let sidecar = PodInfo {
            service_account: "web".into(),
            sidecar: true,
            finished: false,
            revision: None,
            labels: Default::default(),
        };
        let plain = PodInfo { sidecar: false, ..sidecar.clone() };
        let strict = pb::PeerPolicy {
            mode: pb::MtlsMode::MtlsStrict as i32,
            ports: Default::default(),
            authz: Vec::new(),
            jwt: Vec::new(),
            rate_limits: Vec::new(),
            rate_limit_service: None,
            outbound_rate_limits: Vec::new(),
        };
        let disabled_port = pb::PeerPolicy {
            mode: pb::MtlsMode::MtlsStrict as i32,
            ports: [(8080, pb::MtlsMode::MtlsDisable as i32)].into(),
            authz: Vec::new(),
            jwt: Vec::new(),
            rate_limits: Vec::new(),
            rate_limit_service: None,
            outbound_rate_limits: Vec::new(),
        };
        let pod = |k: &Key| match k.1.as_str() {
            "a" => Some(PodView { info: &sidecar, policy: &strict }),
            "b" => Some(PodView { info: &sidecar, policy: &disabled_port }),
            "c" => Some(PodView { info: &plain, policy: &strict }),
            _ => None,
        };
        let names = Names { cluster_domain: "cluster.local", trust_domain: "example.org" };
        let t = clusters(&("shop".into(), "web".into()), &svc, &[&slice], pod, &names, None);
        assert_eq!(t.pods.len(), 3);
        let Some(pb::resource::Kind::Cluster(c)) = &t.clusters["web.shop.svc.cluster.local:80"].kind else {
            panic!("a cluster")
        };
        assert_eq!(c.addresses, ["10.96.0.5:80", "[fd00::5]:80"]);
        let mtls: Vec<(&str, bool)> = c.endpoints.iter().map(|e| (e.address.as_str(), e.mtls)).collect();
        assert_eq!(mtls, [("10.0.0.1:8080", true), ("10.0.0.2:8080", false), ("10.0.0.3:8080", false)]);
        assert_eq!(c.endpoints[0].identity, "spiffe://example.org/ns/shop/sa/web");
        assert!(!c.mesh_tls, "one endpoint has no sidecar");
    }

    #[test]
    fn a_subset_is_a_cluster_of_the_endpoints_whose_pods_carry_its_labels() {
        let svc =
            Svc { ips: vec!["10.96.0.5".into()], ports: vec![("http".into(), 80)], ..Default::default() };
        let slice = Slice {
            service: "web".into(),
            ports: vec![("http".into(), 8080)],
            endpoints: vec![
                endpoint("10.0.0.1", "v1"),
                endpoint("10.0.0.2", "v2"),
                endpoint("10.0.0.3", "v2b"),
            ],
        };
        let info = |version: &str| PodInfo {
            service_account: "web".into(),
            sidecar: true,
            finished: false,
            revision: None,
            labels: [("app".to_string(), "web".to_string()), ("version".to_string(), version.to_string())]
                .into(),
        };
        let (v1, v2) = (info("v1"), info("v2"));
        let strict = pb::PeerPolicy {
            mode: pb::MtlsMode::MtlsStrict as i32,
            ports: Default::default(),
            authz: Vec::new(),
            jwt: Vec::new(),
            rate_limits: Vec::new(),
            rate_limit_service: None,
            outbound_rate_limits: Vec::new(),
        };
        let pod = |k: &Key| match k.1.as_str() {
            "v1" => Some(PodView { info: &v1, policy: &strict }),
            "v2" | "v2b" => Some(PodView { info: &v2, policy: &strict }),
            _ => None,
        };
        let policy: DestinationPolicySpec = serde_json::from_value(serde_json::json!({
            "host": "web",
            "loadBalancer": {"algorithm": "RoundRobin"},
            "subsets": [{"name": "v2", "labels": {"version": "v2"}}, {"name": "v3", "labels": {"version": "v3"}}]
        }))
        .unwrap();
        let names = Names { cluster_domain: "cluster.local", trust_domain: "cluster.local" };
        let t = clusters(&("shop".into(), "web".into()), &svc, &[&slice], pod, &names, Some(&policy));
        let get = |name: &str| match &t.clusters[name].kind {
            Some(pb::resource::Kind::Cluster(c)) => c.clone(),
            _ => panic!("a cluster"),
        };
        let all = get("web.shop.svc.cluster.local:80");
        assert_eq!(all.endpoints.len(), 3);
        let v2 = get("web.shop.svc.cluster.local:80/v2");
        let addrs: Vec<&str> = v2.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, ["10.0.0.2:8080", "10.0.0.3:8080"]);
        assert!(v2.addresses.is_empty(), "a subset has no virtual address: only routes send to it");
        assert!(v2.mesh_tls);
        for c in [&all, &v2] {
            assert_eq!(
                c.load_balancer.as_ref().map(|l| l.algorithm),
                Some(pb::load_balancer::Algorithm::RoundRobin as i32)
            );
        }
        assert!(get("web.shop.svc.cluster.local:80/v3").endpoints.is_empty(), "no pod is v3");
    }
}
