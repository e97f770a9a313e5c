//! AuthorizationPolicy → the `authz` list of a workload's inbound PeerPolicy: every policy that
//! selects the workload, as Istio picks them — one with a selector in the workload's namespace
//! (or, in the root namespace, in any namespace) whose labels it has; one without a selector in
//! its namespace or in the root namespace (mesh-wide).

use std::collections::BTreeMap;

use mycel_api::v1alpha1 as pb;
use mycel_crds::authorization_policy::{AuthorizationAction, AuthorizationPolicy};

/// The annotation that makes a policy report what it would decide without enforcing it.
pub const DRY_RUN: &str = "mycel.io/dry-run";

/// An AuthorizationPolicy, as policy resolution needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Az {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub selector: Option<BTreeMap<String, String>>,
    /// What proxies receive.
    pub policy: pb::AuthzPolicy,
    /// Values no proxy can use, each naming its field: the policy is then sent in its
    /// fail-closed form (a DENY without its rules denies everything it selects; an ALLOW allows
    /// nothing; an AUDIT audits nothing) and is `Accepted=False`.
    pub invalid: Vec<String>,
    /// How its rules read on connections that are not HTTP, when that differs (for its status).
    pub notes: Vec<String>,
    /// A CUSTOM policy whose provider is not one of the installation's (`ResolvedRefs=False`;
    /// what it matches is refused).
    pub unresolved: Vec<String>,
}

impl Az {
    /// `providers`: the installation's external authorizers by name, which CUSTOM policies use.
    pub fn from_object(p: AuthorizationPolicy, providers: &BTreeMap<String, pb::ExtAuthzProvider>) -> Az {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        // Any other value than "true" enforces the policy.
        let dry_run =
            p.metadata.annotations.as_ref().and_then(|a| a.get(DRY_RUN)).is_some_and(|v| v == "true");
        let spec = p.spec;
        let action = match spec.action {
            AuthorizationAction::Allow => pb::AuthzAction::AuthzAllow,
            AuthorizationAction::Deny => pb::AuthzAction::AuthzDeny,
            AuthorizationAction::Audit => pb::AuthzAction::AuthzAudit,
            AuthorizationAction::Custom => pb::AuthzAction::AuthzCustom,
        };
        let strings = |v: &Option<Vec<String>>| v.clone().unwrap_or_default();
        let rules: Vec<pb::AuthzRule> = spec
            .rules
            .iter()
            .map(|r| pb::AuthzRule {
                from: r
                    .from
                    .iter()
                    .map(|f| {
                        let s = &f.source;
                        pb::AuthzSource {
                            // Istio's form has no scheme; one written with it means the same.
                            principals: s.principals.iter().flatten().map(|p| principal(&p.0)).collect(),
                            not_principals: s
                                .not_principals
                                .iter()
                                .flatten()
                                .map(|p| principal(&p.0))
                                .collect(),
                            namespaces: s.namespaces.iter().flatten().map(|n| n.0.clone()).collect(),
                            not_namespaces: s.not_namespaces.iter().flatten().map(|n| n.0.clone()).collect(),
                            ip_blocks: s.ip_blocks.iter().flatten().map(|b| b.0.clone()).collect(),
                            not_ip_blocks: s.not_ip_blocks.iter().flatten().map(|b| b.0.clone()).collect(),
                            remote_ip_blocks: s
                                .remote_ip_blocks
                                .iter()
                                .flatten()
                                .map(|b| b.0.clone())
                                .collect(),
                            not_remote_ip_blocks: s
                                .not_remote_ip_blocks
                                .iter()
                                .flatten()
                                .map(|b| b.0.clone())
                                .collect(),
                            request_principals: s
                                .request_principals
                                .iter()
                                .flatten()
                                .map(|p| p.0.clone())
                                .collect(),
                            not_request_principals: s
                                .not_request_principals
                                .iter()
                                .flatten()
                                .map(|p| p.0.clone())
                                .collect(),
                        }
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|t| {
                        let o = &t.operation;
                        let ports = |v: &Option<Vec<mycel_crds::authorization_policy::Port>>| {
                            v.iter().flatten().map(|p| p.0 as u32).collect()
                        };
                        pb::AuthzOperation {
                            hosts: strings(&o.hosts),
                            not_hosts: strings(&o.not_hosts),
                            ports: ports(&o.ports),
                            not_ports: ports(&o.not_ports),
                            methods: strings(&o.methods),
                            not_methods: strings(&o.not_methods),
                            paths: strings(&o.paths),
                            not_paths: strings(&o.not_paths),
                        }
                    })
                    .collect(),
                when: r
                    .when
                    .iter()
                    .map(|c| pb::AuthzCondition {
                        key: c.key.clone(),
                        values: strings(&c.values),
                        not_values: strings(&c.not_values),
                    })
                    .collect(),
            })
            .collect();
        let invalid = invalid_values(&rules);
        let notes = tcp_notes(&spec.rules, spec.action);
        let mut unresolved = Vec::new();
        let mut provider = None;
        if action == pb::AuthzAction::AuthzCustom {
            let name = spec.provider.as_ref().map_or("", |p| p.name.as_str());
            match providers.get(name) {
                Some(p) => provider = Some(p.clone()),
                None => {
                    let known: Vec<&str> = providers.keys().map(String::as_str).collect();
                    unresolved.push(format!(
                        "spec.provider.name: {name:?} is not an extension provider of the installation ({}): requests its rules match are refused until it is",
                        if known.is_empty() { "it has none".to_string() } else { format!("it has {}", known.join(", ")) }
                    ));
                }
            }
        }
        let rules = match (invalid.is_empty(), action) {
            (true, _) => rules,
            // Fail closed: a CUSTOM policy without its provider refuses what it selects.
            (false, pb::AuthzAction::AuthzDeny | pb::AuthzAction::AuthzCustom) => {
                vec![pb::AuthzRule::default()]
            }
            (false, _) => Vec::new(),
        };
        if !invalid.is_empty() {
            provider = None;
        }
        Az {
            invalid,
            notes,
            unresolved,
            policy: pb::AuthzPolicy {
                name: format!("{namespace}/{name}"),
                action: action as i32,
                dry_run,
                rules,
                provider,
            },
            namespace,
            name,
            generation: p.metadata.generation.unwrap_or_default(),
            selector: spec.selector.map(|s| s.match_labels),
        }
    }

    /// Whether it selects pods of `namespace` with `labels`.
    pub fn applies(&self, namespace: &str, labels: &BTreeMap<String, String>, root: &str) -> bool {
        selects(&self.namespace, self.selector.as_ref(), namespace, labels, root)
    }

    /// Whether it could select some pod of `namespace` (by its selector).
    pub fn may_select_in(&self, namespace: &str, root: &str) -> bool {
        may_select_in(&self.namespace, self.selector.is_some(), namespace, root)
    }
}

/// Whether an inbound policy of `own` namespace with `selector` selects pods of `namespace`
/// with `labels`: one in their namespace or in the root namespace, whose labels it has.
pub fn selects(
    own: &str,
    selector: Option<&BTreeMap<String, String>>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    root: &str,
) -> bool {
    let here = own == namespace || own == root;
    match selector {
        Some(s) => here && s.iter().all(|(k, v)| labels.get(k) == Some(v)),
        None => here,
    }
}

/// The rules that need HTTP attributes, and what that means on a TCP connection, as Istio reads
/// them: an ALLOW (or AUDIT) rule matches nothing there, a DENY rule decides on the rest. A rule
/// needs them when every operation of its `to` does, every source of its `from` does, or a
/// `when` condition is on the request (operations and sources are alternatives).
fn tcp_notes(
    rules: &[mycel_crds::authorization_policy::AuthorizationRule],
    action: AuthorizationAction,
) -> Vec<String> {
    let http_of_operation = |o: &mycel_crds::authorization_policy::Operation| {
        let mut what = Vec::new();
        for (name, set) in [
            ("hosts", o.hosts.is_some() || o.not_hosts.is_some()),
            ("methods", o.methods.is_some() || o.not_methods.is_some()),
            ("paths", o.paths.is_some() || o.not_paths.is_some()),
        ] {
            if set {
                what.push(name);
            }
        }
        what
    };
    let needs_http = |r: &mycel_crds::authorization_policy::AuthorizationRule| {
        let mut what: Vec<&str> = Vec::new();
        let ops: Vec<Vec<&str>> = r.to.iter().map(|t| http_of_operation(&t.operation)).collect();
        if !ops.is_empty() && ops.iter().all(|w| !w.is_empty()) {
            for w in ops.into_iter().flatten() {
                if !what.contains(&w) {
                    what.push(w);
                }
            }
        }
        let by_token = |f: &mycel_crds::authorization_policy::RuleFrom| {
            f.source.request_principals.is_some() || f.source.not_request_principals.is_some()
        };
        if !r.from.is_empty() && r.from.iter().all(by_token) {
            what.push("requestPrincipals");
        }
        if r.when.iter().any(|c| c.key.starts_with("request.")) {
            what.push("request.* conditions");
        }
        what
    };
    let http: Vec<String> = rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let what = needs_http(r);
            (!what.is_empty()).then(|| format!("spec.rules[{i}] ({})", what.join(", ")))
        })
        .collect();
    if http.is_empty() {
        return Vec::new();
    }
    let effect = match action {
        AuthorizationAction::Deny => {
            "on a connection that is not HTTP (TCP) their HTTP attributes are left out, so each denies the whole connection when the rest of it matches"
        }
        AuthorizationAction::Custom => {
            "on a connection that is not HTTP (TCP) their HTTP attributes are left out, so the authorizer is asked about each connection the rest of it matches"
        }
        AuthorizationAction::Audit => {
            "on a connection that is not HTTP (TCP) they match nothing, so they audit no TCP connection"
        }
        AuthorizationAction::Allow => {
            "on a connection that is not HTTP (TCP) they match nothing, so they let no TCP client in"
        }
    };
    vec![format!("{} need HTTP attributes: {effect}", http.join(", "))]
}

/// Whether an inbound policy of `own` namespace, with a selector or not, could select some pod of
/// `namespace` by its selector.
pub fn may_select_in(own: &str, has_selector: bool, namespace: &str, root: &str) -> bool {
    has_selector && (own == namespace || own == root)
}

fn principal(p: &str) -> String {
    p.strip_prefix("spiffe://").unwrap_or(p).to_string()
}

/// The values of `rules` that a proxy would reject (the schema admits them), each naming its field.
fn invalid_values(rules: &[pb::AuthzRule]) -> Vec<String> {
    let mut out = Vec::new();
    for (r, rule) in rules.iter().enumerate() {
        for (i, o) in rule.to.iter().enumerate() {
            for (list, paths) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
                for (j, p) in paths.iter().enumerate() {
                    if let Some(e) = mycel_api::authz::path_template_error(p) {
                        out.push(format!("spec.rules[{r}].to[{i}].operation.{list}[{j}]: {e}"));
                    }
                }
            }
        }
        for (i, c) in rule.when.iter().enumerate() {
            for (list, values) in [("values", &c.values), ("notValues", &c.not_values)] {
                for (j, v) in values.iter().enumerate() {
                    if let Some(e) = mycel_api::authz::condition_value_error(&c.key, v) {
                        out.push(format!("spec.rules[{r}].when[{i}].{list}[{j}]: {e}"));
                    }
                }
            }
        }
    }
    out
}

/// The policies that select a pod, in (namespace, name) order as `azs` is.
pub fn for_workload<'a>(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    azs: &'a [Az],
    root: &str,
) -> Vec<&'a Az> {
    azs.iter().filter(|a| a.applies(namespace, labels, root)).collect()
}

/// What a proxy whose pod the control plane does not know yet receives for a namespace: the
/// namespace-wide and mesh-wide policies, and — when a policy with a selector might select it —
/// a DENY of everything, so that it accepts nothing until its own policies are known.
pub fn for_unknown_workload(namespace: &str, azs: &[Az], root: &str) -> Vec<pb::AuthzPolicy> {
    let mut v: Vec<pb::AuthzPolicy> = for_workload(namespace, &BTreeMap::new(), azs, root)
        .into_iter()
        .filter(|a| a.selector.is_none())
        .map(|a| a.policy.clone())
        .collect();
    if azs.iter().any(|a| a.may_select_in(namespace, root)) {
        v.push(not_known_yet());
    }
    v
}

/// The name of [`not_known_yet`].
pub const NOT_KNOWN_YET: &str = "mycel/workload-not-known-yet";

/// A DENY of every request, for a proxy whose pod's policies are not known yet.
pub fn not_known_yet() -> pb::AuthzPolicy {
    pb::AuthzPolicy {
        name: NOT_KNOWN_YET.into(),
        action: pb::AuthzAction::AuthzDeny as i32,
        dry_run: false,
        rules: vec![pb::AuthzRule::default()],
        provider: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn az(ns: &str, name: &str, sel: Option<(&str, &str)>) -> Az {
        Az {
            namespace: ns.into(),
            name: name.into(),
            generation: 1,
            selector: sel.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
            policy: pb::AuthzPolicy { name: format!("{ns}/{name}"), ..Default::default() },
            invalid: Vec::new(),
            notes: Vec::new(),
            unresolved: Vec::new(),
        }
    }

    fn custom(provider: &str, rules: &str) -> AuthorizationPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: mycel.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: ext, namespace: shop}}\nspec:\n  action: CUSTOM\n  provider: {{name: {provider}}}\n  rules: {rules}\n"
        ))
        .unwrap()
    }

    #[test]
    fn custom_policies_carry_their_provider_or_fail_closed() {
        let opa = pb::ExtAuthzProvider {
            name: "opa".into(),
            address: "opa.authz:9191".into(),
            timeout_ms: 500,
            fail_open: false,
            status_on_error: 403,
        };
        let providers: BTreeMap<String, pb::ExtAuthzProvider> = [("opa".to_string(), opa.clone())].into();
        let ok = Az::from_object(custom("opa", "[{to: [{operation: {paths: [\"/api/*\"]}}]}]"), &providers);
        assert_eq!(ok.policy.action, pb::AuthzAction::AuthzCustom as i32);
        assert_eq!(ok.policy.provider, Some(opa));
        assert_eq!(ok.policy.rules.len(), 1);
        assert!(ok.unresolved.is_empty() && ok.invalid.is_empty());

        // A provider the installation does not name: reported, and the proxy refuses what the
        // rules match (a CUSTOM policy without a provider).
        let missing = Az::from_object(custom("nope", "[{}]"), &providers);
        assert_eq!(missing.policy.provider, None);
        assert_eq!(missing.unresolved.len(), 1);
        assert!(
            missing.unresolved[0].contains("spec.provider.name") && missing.unresolved[0].contains("opa")
        );

        // Values the proxy cannot use: every request it selects is refused.
        let bad = Az::from_object(
            custom("opa", "[{to: [{operation: {paths: [\"/a/{**}/b/{**}\"]}}]}]"),
            &providers,
        );
        assert!(!bad.invalid.is_empty());
        assert_eq!(bad.policy.provider, None);
        assert_eq!(bad.policy.rules, vec![pb::AuthzRule::default()]);
    }

    #[test]
    fn policies_select_as_istio_does() {
        let root = "mycel-system";
        let web: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let azs = vec![
            az("mycel-system", "mesh-deny", None),
            az("mycel-system", "mesh-web", Some(("app", "web"))),
            az("other", "ns-wide", None),
            az("shop", "api-only", Some(("app", "api"))),
            az("shop", "ns-wide", None),
            az("shop", "web-only", Some(("app", "web"))),
        ];
        let names = |v: Vec<&Az>| v.iter().map(|a| a.policy.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(for_workload("shop", &web, &azs, root)),
            ["mycel-system/mesh-deny", "mycel-system/mesh-web", "shop/ns-wide", "shop/web-only"]
        );
        let unknown: Vec<String> =
            for_unknown_workload("shop", &azs, root).into_iter().map(|p| p.name).collect();
        assert_eq!(unknown, ["mycel-system/mesh-deny", "shop/ns-wide", "mycel/workload-not-known-yet"]);
        let placeholder = for_unknown_workload("shop", &azs, root).pop().unwrap();
        assert_eq!(placeholder.action, pb::AuthzAction::AuthzDeny as i32, "denies every request");
        assert_eq!(placeholder.rules, [pb::AuthzRule::default()]);
        let quiet = vec![az("shop", "ns-wide", None)];
        assert_eq!(for_unknown_workload("shop", &quiet, root).len(), 1, "no selector: nothing to wait for");
    }

    #[test]
    fn a_value_no_proxy_can_use_makes_the_policy_fail_closed() {
        let object = |action: &str| -> AuthorizationPolicy {
            let spec = serde_json::from_value(serde_json::json!({"action": action, "rules": [
                {"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]},
                {"when": [{"key": "destination.port", "values": ["http"]}]}
            ]}))
            .unwrap();
            let mut p = AuthorizationPolicy::new("p", spec);
            p.metadata.namespace = Some("shop".into());
            p
        };
        let deny = Az::from_object(object("DENY"), &BTreeMap::new());
        assert!(deny.notes.is_empty(), "no HTTP attribute: {:?}", deny.notes);
        let mut http = object("ALLOW");
        http.spec.rules[0].to = vec![
            serde_json::from_value(serde_json::json!({"operation": {"paths": ["/a"], "ports": [80]}}))
                .unwrap(),
        ];
        let mut either = http.clone();
        either.spec.rules[0]
            .to
            .push(serde_json::from_value(serde_json::json!({"operation": {"ports": [5432]}})).unwrap());
        assert!(
            Az::from_object(either, &BTreeMap::new()).notes.is_empty(),
            "its port-only operation admits TCP"
        );
        assert_eq!(
            Az::from_object(http, &BTreeMap::new()).notes,
            [
                "spec.rules[0] (paths) need HTTP attributes: on a connection that is not HTTP (TCP) they match nothing, so they let no TCP client in"
            ]
        );
        assert_eq!(
            deny.invalid,
            ["spec.rules[1].when[0].values[0]: \"http\" is not a value destination.port can have"]
        );
        assert_eq!(deny.policy.rules, [pb::AuthzRule::default()], "a DENY denies everything it selects");
        let allow = Az::from_object(object("ALLOW"), &BTreeMap::new());
        assert!(allow.policy.rules.is_empty(), "an ALLOW allows nothing");
        let mut fine = object("DENY");
        fine.spec.rules.truncate(1);
        let fine = Az::from_object(fine, &BTreeMap::new());
        assert!(fine.invalid.is_empty());
        assert_eq!(
            fine.policy.rules[0].from[0].principals,
            ["cluster.local/ns/a/sa/b"],
            "without the scheme"
        );
    }
}
