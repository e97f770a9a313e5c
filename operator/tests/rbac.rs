//! The operator's RBAC as `config/default` installs it (`config/rbac`): every rule asserted, so a
//! change is deliberate (and `docs/operator.md`'s table changes with it); and the control plane's
//! roles the operator renders are covered by it, as the API server demands of the granter.

use std::path::PathBuf;

use mycel_crds::MeshInstallation;
use mycel_operator::installation::render::{self, Effective, ImageDefaults};
use serde_json::{Value, json};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Whether `rules` allow `verb` on `group`/`resource` (named `name`, if the request names one),
/// as RBAC decides: a rule with resourceNames allows only requests naming one of them.
fn allows(rules: &Value, group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
    let has = |list: &Value, v: &str| list.as_array().is_some_and(|l| l.iter().any(|x| x == v || x == "*"));
    rules.as_array().unwrap().iter().any(|r| {
        has(&r["apiGroups"], group)
            && has(&r["resources"], resource)
            && has(&r["verbs"], verb)
            && match r["resourceNames"].as_array() {
                None => true,
                Some(names) if names.is_empty() => true,
                Some(names) => name.is_some_and(|n| names.iter().any(|x| x == n)),
            }
    })
}

/// Every permission in `wanted` that `held` lacks (the API server's escalation check).
fn not_covered(held: &Value, wanted: &Value) -> Vec<String> {
    let mut missing = Vec::new();
    for r in wanted.as_array().unwrap() {
        let names: Vec<Option<&str>> = match r["resourceNames"].as_array() {
            Some(n) if !n.is_empty() => n.iter().map(|x| x.as_str()).collect(),
            _ => vec![None],
        };
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                for v in r["verbs"].as_array().unwrap() {
                    for n in &names {
                        let (g, res, v) = (g.as_str().unwrap(), res.as_str().unwrap(), v.as_str().unwrap());
                        if !allows(held, g, res, v, *n) {
                            missing.push(format!("{v} {g}/{res} {n:?}"));
                        }
                    }
                }
            }
        }
    }
    missing
}

fn operator_rules() -> Value {
    let role = yaml("config/rbac/role.yaml");
    assert_eq!(role["kind"], "ClusterRole");
    assert_eq!(role["metadata"]["name"], "mycel-operator");
    role["rules"].clone()
}

#[test]
fn the_operators_rules_are_exactly_these() {
    let rules = operator_rules();
    let expected = json!([
        {"apiGroups": ["mycel.io"], "resources": ["meshinstallations"], "verbs": ["list", "watch", "patch"]},
        {"apiGroups": ["mycel.io"], "resources": ["meshinstallations/status"], "verbs": ["patch"]},
        {"apiGroups": ["mycel.io"], "resources": ["meshinstallations/finalizers"], "verbs": ["update"]},
        {"apiGroups": [""], "resources": ["serviceaccounts", "services"], "verbs": ["list", "watch", "create", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch", "create", "patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "patch"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["list", "watch", "create", "patch"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles", "clusterrolebindings"], "verbs": ["list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["mycel-operator"], "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        {"apiGroups": ["mycel.io"], "resources": ["peerauthentications", "trafficroutes", "destinationpolicies", "authorizationpolicies", "requestauthentications", "ratelimitpolicies"], "verbs": ["list", "watch"]},
        {"apiGroups": ["mycel.io"], "resources": ["peerauthentications/status", "trafficroutes/status", "destinationpolicies/status", "authorizationpolicies/status", "requestauthentications/status", "ratelimitpolicies/status"], "verbs": ["patch"]},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"], "verbs": ["list", "watch"]},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["get", "patch"]},
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    ]);
    let (got, want) = (rules.as_array().unwrap(), expected.as_array().unwrap());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "rule {i} of config/rbac/role.yaml");
    }
    assert_eq!(got.len(), want.len(), "config/rbac/role.yaml: {got:#?}");
    // No wildcard, and none of the verbs that would let it grant or act as anyone else.
    for r in got {
        for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
            assert!(!r[field].as_array().is_some_and(|l| l.iter().any(|x| x == "*")), "a wildcard in {r}");
        }
        for verb in ["escalate", "bind", "impersonate"] {
            assert!(!r["verbs"].as_array().unwrap().iter().any(|v| v == verb), "{verb} in {r}");
        }
    }
}

#[test]
fn config_default_binds_the_role_to_the_operators_service_account() {
    let default = yaml("config/default/kustomization.yaml");
    assert!(default["resources"].as_array().unwrap().iter().any(|r| r == "../rbac"));
    let rbac = yaml("config/rbac/kustomization.yaml");
    assert_eq!(rbac["resources"], json!(["service_account.yaml", "role.yaml", "role_binding.yaml"]));
    let binding = yaml("config/rbac/role_binding.yaml");
    assert_eq!(binding["kind"], "ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "mycel-operator"})
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "mycel-operator", "namespace": "mycel-system"}])
    );
    let sa = yaml("config/rbac/service_account.yaml");
    assert_eq!(
        (&sa["metadata"]["name"], &sa["metadata"]["namespace"]),
        (&json!("mycel-operator"), &json!("mycel-system"))
    );
    let deployment = yaml("config/operator/deployment.yaml");
    assert_eq!(deployment["spec"]["template"]["spec"]["serviceAccountName"], "mycel-operator");
}

#[test]
fn the_operator_holds_everything_it_grants_a_control_plane() {
    let held = operator_rules();
    for spec in [
        json!({"revision": "default", "trustDomain": "cluster.local", "profile": "demo"}),
        json!({"revision": "canary", "trustDomain": "cluster.local", "ca": {"secretName": "corp-ca"}}),
    ] {
        let mi: MeshInstallation = serde_json::from_value(json!({
            "apiVersion": "mycel.io/v1alpha1", "kind": "MeshInstallation",
            "metadata": {"name": "mesh", "namespace": "shop", "uid": "u1"}, "spec": spec
        }))
        .unwrap();
        let eff = Effective::resolve(&mi, &ImageDefaults::default());
        let out = render::render(&eff, &json!({}), "CA");
        let roles: Vec<_> = out.iter().filter(|d| d.resource.kind.ends_with("Role")).collect();
        assert_eq!(roles.len(), 2, "a ClusterRole and a Role");
        for d in roles {
            let missing = not_covered(&held, &d.body["rules"]);
            assert!(
                missing.is_empty(),
                "{} {} grants what the operator lacks: {missing:?}",
                d.resource.kind,
                d.name
            );
        }
    }
    // The check itself sees a missing permission, and a name outside a resourceNames rule.
    assert_eq!(
        not_covered(&held, &json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}])),
        vec!["get /nodes None"]
    );
    assert!(allows(&held, "coordination.k8s.io", "leases", "update", Some("mycel-operator")));
    assert!(!allows(&held, "coordination.k8s.io", "leases", "update", Some("another")));
    assert!(!allows(&held, "coordination.k8s.io", "leases", "update", None));
}
