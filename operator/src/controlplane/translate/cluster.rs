//! Service + EndpointSlices + the endpoints' pods → one Cluster per Service port.

use std::collections::BTreeMap;

use mycel_api::spiffe::SpiffeId;
use mycel_api::v1alpha1 as pb;

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

/// Translates one Service: a cluster `<name>.<namespace>.svc.<domain>:<port>` per TCP port, with
/// the ready and not-ready endpoints of every slice of it that has that port.
pub fn clusters<'a>(
    (ns, name): &Key,
    svc: &Svc,
    slices: &[&Slice],
    pod: impl Fn(&Key) -> Option<PodView<'a>>,
    names: &Names,
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
        let mut endpoints: Vec<pb::Endpoint> = Vec::new();
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
                for a in &e.addresses {
                    let address =
                        if a.contains(':') { format!("[{a}]:{target}") } else { format!("{a}:{target}") };
                    endpoints.push(pb::Endpoint {
                        address,
                        identity: identity.clone(),
                        labels: Default::default(),
                        locality: e.zone.clone(),
                        ready: e.ready,
                        mtls,
                    });
                }
            }
        }
        endpoints.sort_by(|a, b| a.address.cmp(&b.address));
        endpoints.dedup_by(|a, b| a.address == b.address);
        let mesh_tls = !endpoints.is_empty()
            && slices
                .iter()
                .flat_map(|s| &s.endpoints)
                .all(|e| e.pod.as_ref().and_then(&pod).is_some_and(|v| v.info.sidecar));
        let cluster_name = format!("{host}:{port}");
        let addresses = svc
            .ips
            .iter()
            .map(|ip| if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") })
            .collect();
        let cluster = pb::Cluster {
            name: cluster_name.clone(),
            endpoints,
            load_balancer: None,
            connect_timeout_ms: 1000,
            mesh_tls,
            addresses,
        };
        out.insert(
            cluster_name.clone(),
            pb::Resource {
                name: cluster_name,
                version: String::new(),
                kind: Some(pb::resource::Kind::Cluster(cluster)),
            },
        );
    }
    Translated { clusters: out, pods }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let svc = Svc { ips: vec!["10.96.0.5".into(), "fd00::5".into()], ports: vec![("http".into(), 80)] };
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
        let strict = pb::PeerPolicy { mode: pb::MtlsMode::MtlsStrict as i32, ports: Default::default() };
        let disabled_port = pb::PeerPolicy {
            mode: pb::MtlsMode::MtlsStrict as i32,
            ports: [(8080, pb::MtlsMode::MtlsDisable as i32)].into(),
        };
        let pod = |k: &Key| match k.1.as_str() {
            "a" => Some(PodView { info: &sidecar, policy: &strict }),
            "b" => Some(PodView { info: &sidecar, policy: &disabled_port }),
            "c" => Some(PodView { info: &plain, policy: &strict }),
            _ => None,
        };
        let names = Names { cluster_domain: "cluster.local", trust_domain: "example.org" };
        let t = clusters(&("shop".into(), "web".into()), &svc, &[&slice], pod, &names);
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
}
