//! PeerAuthentication → the `inbound` PeerPolicy of one workload.

use std::collections::BTreeMap;

use mycel_api::v1alpha1 as pb;
use mycel_crds::peer_authentication::{PeerAuthentication, PeerMtlsMode};

/// The name of a workload's one PeerPolicy resource.
pub const NAME: &str = "inbound";

/// A PeerAuthentication, as policy resolution needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerAuth {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: PeerMtlsMode,
    pub ports: BTreeMap<u32, PeerMtlsMode>,
    /// `metadata.generation`, for the status written back.
    pub generation: i64,
}

impl PeerAuth {
    pub fn from_object(p: PeerAuthentication) -> PeerAuth {
        PeerAuth {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            generation: p.metadata.generation.unwrap_or_default(),
            selector: p.spec.selector.map(|s| s.match_labels),
            mode: p.spec.mtls.map(|m| m.mode).unwrap_or_default(),
            ports: p.spec.port_level_mtls.into_iter().map(|pm| (pm.port as u32, pm.mode)).collect(),
        }
    }

    /// Whether it is the kind of policy that can apply to pods of `namespace` with `labels`
    /// (a more specific one may still take precedence).
    pub fn matches(&self, namespace: &str, labels: &BTreeMap<String, String>, root: &str) -> bool {
        match &self.selector {
            Some(s) => self.namespace == namespace && s.iter().all(|(k, v)| labels.get(k) == Some(v)),
            None => self.namespace == namespace || self.namespace == root,
        }
    }
}

/// Which PeerAuthentications decide a workload's policy, most specific first: the workload's
/// (selector), its namespace's, the mesh's (no selector, in the root namespace). Ties at one
/// level go to the alphabetically first name.
pub fn in_force<'a>(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    pas: &'a [PeerAuth],
    root: &str,
) -> [Option<&'a PeerAuth>; 3] {
    let pick = |f: &dyn Fn(&PeerAuth) -> bool| pas.iter().filter(|p| f(p)).min_by(|a, b| a.name.cmp(&b.name));
    let workload = pick(&|p| {
        p.namespace == namespace
            && p.selector.as_ref().is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    });
    let ns = pick(&|p| p.namespace == namespace && p.selector.is_none());
    let mesh = pick(&|p| p.namespace == root && p.selector.is_none());
    [workload, ns, mesh]
}

/// The inbound policy of one workload: the most specific PeerAuthentication wins
/// ([`in_force`]); an unset mode inherits from the next one.
/// With none, the installation's `spec.mtls.mode` (`mesh_default`) applies, else PERMISSIVE.
pub fn peer_policy(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    pas: &[PeerAuth],
    root: &str,
    mesh_default: PeerMtlsMode,
) -> pb::PeerPolicy {
    let [workload, ns, mesh] = in_force(namespace, labels, pas, root);
    let to_pb = |m: PeerMtlsMode| match m {
        PeerMtlsMode::Strict => Some(pb::MtlsMode::MtlsStrict),
        PeerMtlsMode::Permissive => Some(pb::MtlsMode::MtlsPermissive),
        PeerMtlsMode::Disable => Some(pb::MtlsMode::MtlsDisable),
        PeerMtlsMode::Unset => None,
    };
    let mode = [workload, ns, mesh]
        .into_iter()
        .flatten()
        .find_map(|p| to_pb(p.mode))
        .or_else(|| to_pb(mesh_default))
        .unwrap_or(pb::MtlsMode::MtlsPermissive);
    let ports = workload
        .map(|w| w.ports.iter().map(|(port, m)| (*port, to_pb(*m).unwrap_or(mode) as i32)).collect())
        .unwrap_or_default();
    pb::PeerPolicy {
        mode: mode as i32,
        ports,
        authz: Vec::new(),
        jwt: Vec::new(),
        rate_limits: Vec::new(),
        rate_limit_service: None,
        outbound_rate_limits: Vec::new(),
    }
}

/// The policy as the resource streams send.
pub fn resource(policy: pb::PeerPolicy) -> pb::Resource {
    pb::Resource {
        name: NAME.into(),
        version: String::new(),
        kind: Some(pb::resource::Kind::PeerPolicy(policy)),
    }
}

/// The mode of one port under a policy.
pub fn port_mode(p: &pb::PeerPolicy, port: u32) -> pb::MtlsMode {
    let m = p.ports.get(&port).copied().unwrap_or(p.mode);
    pb::MtlsMode::try_from(m).unwrap_or(pb::MtlsMode::MtlsPermissive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_peer_authentication_wins_and_unset_inherits() {
        let pa = |ns: &str,
                  name: &str,
                  sel: Option<(&str, &str)>,
                  mode: PeerMtlsMode,
                  ports: &[(u32, PeerMtlsMode)]| PeerAuth {
            namespace: ns.into(),
            name: name.into(),
            selector: sel.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
            mode,
            ports: ports.iter().copied().collect(),
            generation: 1,
        };
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let mode = |pas: &[PeerAuth]| {
            pb::MtlsMode::try_from(
                peer_policy("shop", &labels, pas, "mycel-system", PeerMtlsMode::Unset).mode,
            )
            .unwrap()
        };
        assert_eq!(mode(&[]), pb::MtlsMode::MtlsPermissive, "the default");
        let mesh = pa("mycel-system", "default", None, PeerMtlsMode::Strict, &[]);
        assert_eq!(mode(std::slice::from_ref(&mesh)), pb::MtlsMode::MtlsStrict, "mesh-wide");
        let other_ns = pa("elsewhere", "default", None, PeerMtlsMode::Disable, &[]);
        assert_eq!(mode(&[mesh.clone(), other_ns]), pb::MtlsMode::MtlsStrict, "another namespace's policy");
        let ns = pa("shop", "default", None, PeerMtlsMode::Permissive, &[]);
        assert_eq!(mode(&[mesh.clone(), ns.clone()]), pb::MtlsMode::MtlsPermissive, "namespace over mesh");
        let wl =
            pa("shop", "web", Some(("app", "web")), PeerMtlsMode::Unset, &[(9100, PeerMtlsMode::Disable)]);
        let p =
            peer_policy("shop", &labels, &[mesh.clone(), wl.clone()], "mycel-system", PeerMtlsMode::Unset);
        assert_eq!(port_mode(&p, 8080), pb::MtlsMode::MtlsStrict, "unset inherits from the mesh");
        assert_eq!(port_mode(&p, 9100), pb::MtlsMode::MtlsDisable, "port level");
        let other_app = pa("shop", "api", Some(("app", "api")), PeerMtlsMode::Disable, &[]);
        assert_eq!(mode(&[ns.clone(), other_app]), pb::MtlsMode::MtlsPermissive, "a selector for other pods");
    }

    #[test]
    fn the_installations_mtls_mode_is_the_default_under_every_peer_authentication() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let strict = |pas: &[PeerAuth]| {
            pb::MtlsMode::try_from(
                peer_policy("shop", &labels, pas, "mycel-system", PeerMtlsMode::Strict).mode,
            )
            .unwrap()
        };
        assert_eq!(strict(&[]), pb::MtlsMode::MtlsStrict, "spec.mtls.mode STRICT with no PeerAuthentication");
        let ns = PeerAuth {
            namespace: "shop".into(),
            name: "default".into(),
            selector: None,
            mode: PeerMtlsMode::Permissive,
            ports: Default::default(),
            generation: 1,
        };
        assert_eq!(
            strict(std::slice::from_ref(&ns)),
            pb::MtlsMode::MtlsPermissive,
            "a PeerAuthentication overrides it"
        );
        let unset = PeerAuth { mode: PeerMtlsMode::Unset, ..ns };
        assert_eq!(strict(&[unset]), pb::MtlsMode::MtlsStrict, "UNSET inherits it");
    }

    #[test]
    fn a_policy_in_force_names_the_level_that_decided() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let ns = PeerAuth {
            namespace: "shop".into(),
            name: "b".into(),
            selector: None,
            mode: PeerMtlsMode::Strict,
            ports: Default::default(),
            generation: 1,
        };
        let twin = PeerAuth { name: "a".into(), ..ns.clone() };
        let both = [ns.clone(), twin];
        let [w, n, m] = in_force("shop", &labels, &both, "mycel-system");
        assert!(w.is_none() && m.is_none());
        assert_eq!(n.unwrap().name, "a", "a tie goes to the first name");
        assert!(ns.matches("shop", &labels, "mycel-system"));
        assert!(!ns.matches("other", &labels, "mycel-system"));
    }
}
