//! RequestAuthentication → the `jwt` rules of a workload's inbound PeerPolicy. A policy selects
//! workloads as an AuthorizationPolicy does ([`super::authz::selects`]); the rules of every
//! policy that selects a workload are merged, one per issuer (the first policy in (namespace,
//! name) order keeps an issuer two of them name). Key sets named by `jwksUri` are filled in from
//! what the control plane fetched ([`Fetched`]); until a fetch succeeds the rule goes out without
//! keys, so every token of that issuer is refused rather than passed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use mycel_api::v1alpha1 as pb;
use mycel_crds::request_authentication::RequestAuthentication;

/// How long one fetch of a key set may take, unless the rule says.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A RequestAuthentication, as policy resolution needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Ra {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub selector: Option<BTreeMap<String, String>>,
    pub rules: Vec<RaRule>,
    /// Values no proxy can use, each naming its field (`Accepted=False`); such a rule is sent
    /// without keys (its tokens are refused).
    pub invalid: Vec<String>,
}

/// One jwtRule: what proxies receive, and where its keys come from.
#[derive(Clone, Debug, PartialEq)]
pub struct RaRule {
    /// `jwks` is the inline key set, or empty for `uri`'s.
    pub rule: pb::JwtRule,
    pub uri: Option<String>,
    pub timeout: Duration,
}

/// What the control plane holds of one `jwksUri`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fetched {
    /// The last key set fetched that parsed (kept while later fetches fail).
    pub keys: Option<String>,
    /// Why the last fetch failed, if it did.
    pub error: Option<String>,
    /// Which following of the URI this is: a URI dropped and named again is fetched afresh, and
    /// a result of an earlier following is ignored.
    pub epoch: u64,
}

/// The most distinct `jwksUri`s one namespace's policies have fetched; the rest are not (so one
/// tenant cannot crowd out the others' fetches).
pub const MAX_URIS_PER_NAMESPACE: usize = 16;

impl Ra {
    /// `cluster_domain` is the domain of the cluster's Service names (`cluster.local`).
    pub fn from_object(p: RequestAuthentication, cluster_domain: &str) -> Ra {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut invalid = Vec::new();
        let rules = p
            .spec
            .jwt_rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut jwks = r.jwks.clone().unwrap_or_default();
                if r.jwks.is_some()
                    && let Some(e) = key_set_error(&jwks)
                {
                    invalid.push(format!("spec.jwtRules[{i}].jwks: {e}"));
                    jwks.clear();
                }
                let mut uri = r.jwks_uri.clone();
                if let Some(u) = &uri
                    && let Some(e) = uri_error(u, cluster_domain)
                {
                    invalid.push(format!("spec.jwtRules[{i}].jwksUri: {e}"));
                    uri = None;
                }
                let clock_skew = match r.clock_skew.as_ref().map(|d| d.parse()) {
                    Some(Ok(d)) => d.as_secs().min(600) as u32,
                    _ => 60,
                };
                let timeout = match r.timeout.as_ref().map(|d| d.parse()) {
                    Some(Ok(d)) => d.clamp(Duration::from_millis(100), Duration::from_secs(30)),
                    _ => DEFAULT_FETCH_TIMEOUT,
                };
                RaRule {
                    rule: pb::JwtRule {
                        policy: format!("{namespace}/{name}"),
                        issuer: r.issuer.clone(),
                        audiences: r.audiences.iter().map(|a| a.0.clone()).collect(),
                        jwks,
                        from_headers: r
                            .from_headers
                            .iter()
                            .map(|h| pb::JwtHeader {
                                name: h.name.clone(),
                                prefix: h.prefix.clone().unwrap_or_default(),
                            })
                            .collect(),
                        from_params: r.from_params.iter().map(|p| p.0.clone()).collect(),
                        from_cookies: r.from_cookies.iter().map(|p| p.0.clone()).collect(),
                        forward_original_token: r.forward_original_token,
                        output_claim_to_headers: r
                            .output_claim_to_headers
                            .iter()
                            .map(|o| pb::ClaimToHeader { header: o.header.clone(), claim: o.claim.clone() })
                            .collect(),
                        clock_skew_seconds: clock_skew,
                    },
                    uri,
                    timeout,
                }
            })
            .collect();
        Ra {
            namespace,
            name,
            generation: p.metadata.generation.unwrap_or_default(),
            selector: p.spec.selector.map(|s| s.match_labels),
            rules,
            invalid,
        }
    }

    /// Whether it selects pods of `namespace` with `labels`.
    pub fn applies(&self, namespace: &str, labels: &BTreeMap<String, String>, root: &str) -> bool {
        super::authz::selects(&self.namespace, self.selector.as_ref(), namespace, labels, root)
    }

    /// Whether it could select some pod of `namespace` (by its selector).
    pub fn may_select_in(&self, namespace: &str, root: &str) -> bool {
        super::authz::may_select_in(&self.namespace, self.selector.is_some(), namespace, root)
    }
}

/// Why a key set cannot be one: not JSON, no `keys` list, or no key a proxy verifies with
/// (RSA, EC P-256 or P-384, Ed25519, for signatures; never HMAC).
pub fn key_set_error(jwks: &str) -> Option<String> {
    let keys = match serde_json::from_str::<serde_json::Value>(jwks) {
        Ok(v) => match v.get("keys").and_then(|k| k.as_array()) {
            Some(keys) => keys.clone(),
            None => return Some("not a JSON Web Key Set: it needs a \"keys\" list".into()),
        },
        Err(e) => return Some(format!("not a JSON Web Key Set: {e}")),
    };
    let usable = |k: &serde_json::Value| {
        let s = |f: &str| k.get(f).and_then(|v| v.as_str());
        s("use").is_none_or(|u| u == "sig")
            && match (s("kty"), s("crv")) {
                (Some("RSA"), _) => s("n").is_some() && s("e").is_some(),
                (Some("EC"), Some("P-256" | "P-384")) => s("x").is_some() && s("y").is_some(),
                (Some("OKP"), Some("Ed25519")) => s("x").is_some(),
                _ => false,
            }
    };
    if !keys.iter().any(usable) {
        return Some(
            "the key set has no key a proxy verifies with (RSA, EC P-256 or P-384, Ed25519, for signatures; never HMAC)".into(),
        );
    }
    None
}

/// Why the control plane does not fetch from a URI: plain `http` is for a Service of the cluster
/// only (`<name>.<namespace>.svc[.<cluster domain>]`), where no one on the way can swap the keys.
pub fn uri_error(uri: &str, cluster_domain: &str) -> Option<String> {
    let rest = uri.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let short = host.strip_suffix(cluster_domain).and_then(|h| h.strip_suffix('.')).unwrap_or(host);
    let labels: Vec<&str> = short.split('.').collect();
    let in_cluster = labels.len() == 3 && labels[2] == "svc" && labels[..2].iter().all(|l| !l.is_empty());
    (!in_cluster).then(|| {
        "plain http is fetched only from a Service of the cluster (http://<service>.<namespace>.svc…); use https for any other host".to_string()
    })
}

/// The most JWT rules one workload receives, over every policy that selects it.
pub const MAX_RULES_PER_WORKLOAD: usize = 32;
/// The most key-set bytes one workload receives, over its rules.
pub const MAX_KEY_BYTES_PER_WORKLOAD: usize = 256 * 1024;

/// Why a rule a policy has is not what a workload it selects receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Left<'a> {
    /// An earlier policy names the issuer: its rule is the one.
    Shadowed(&'a Ra),
    /// The workload has [`MAX_RULES_PER_WORKLOAD`] rules or [`MAX_KEY_BYTES_PER_WORKLOAD`]
    /// already: this issuer's tokens are refused there.
    OverLimit,
}

/// The rules a workload selected by `ras` (in (namespace, name) order) receives, one per
/// issuer, with the fetched key sets filled in; and the rules left out, as (policy, issuer,
/// why). Bounded ([`MAX_RULES_PER_WORKLOAD`], [`MAX_KEY_BYTES_PER_WORKLOAD`]) so that many
/// policies on one workload cannot make its configuration, or the control plane's memory,
/// grow without end; a rule left out for a limit fails closed (its issuer is not configured,
/// so its tokens are refused).
pub fn merge<'a>(
    ras: &[&'a Ra],
    fetched: &HashMap<String, Fetched>,
) -> (Vec<pb::JwtRule>, Vec<(&'a Ra, String, Left<'a>)>) {
    let mut by_issuer: BTreeMap<&str, &Ra> = BTreeMap::new();
    let (mut rules, mut left) = (Vec::new(), Vec::new());
    let mut bytes = 0;
    for ra in ras {
        for r in &ra.rules {
            if let Some(winner) = by_issuer.get(r.rule.issuer.as_str()) {
                if !std::ptr::eq(*winner, *ra) {
                    left.push((*ra, r.rule.issuer.clone(), Left::Shadowed(winner)));
                }
                continue;
            }
            by_issuer.insert(&r.rule.issuer, ra);
            let mut rule = r.rule.clone();
            if let Some(uri) = &r.uri {
                rule.jwks = fetched.get(uri).and_then(|f| f.keys.clone()).unwrap_or_default();
            }
            if rules.len() == MAX_RULES_PER_WORKLOAD || bytes + rule.jwks.len() > MAX_KEY_BYTES_PER_WORKLOAD {
                left.push((*ra, r.rule.issuer.clone(), Left::OverLimit));
                continue;
            }
            bytes += rule.jwks.len();
            rules.push(rule);
        }
    }
    (rules, left)
}

/// Every `jwksUri` of `ras` (in (namespace, name) order) to fetch, with the longest timeout a
/// rule gives it; and those over their namespace's [`MAX_URIS_PER_NAMESPACE`], not fetched.
pub fn uris(ras: &[&Ra]) -> (BTreeMap<String, Duration>, BTreeSet<String>) {
    let mut per_namespace: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let (mut want, mut over): (BTreeMap<String, Duration>, BTreeSet<String>) = Default::default();
    for ra in ras {
        for r in &ra.rules {
            let Some(u) = &r.uri else { continue };
            let mine = per_namespace.entry(&ra.namespace).or_default();
            if !mine.contains(u.as_str()) && mine.len() == MAX_URIS_PER_NAMESPACE {
                over.insert(u.clone());
                continue;
            }
            mine.insert(u);
            let t = want.entry(u.clone()).or_insert(r.timeout);
            *t = (*t).max(r.timeout);
        }
    }
    over.retain(|u| !want.contains_key(u));
    (want, over)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ra(ns: &str, name: &str, sel: Option<(&str, &str)>, rules: serde_json::Value) -> Ra {
        let mut p = RequestAuthentication::new(
            name,
            serde_json::from_value(serde_json::json!({"jwtRules": rules})).unwrap(),
        );
        p.metadata.namespace = Some(ns.into());
        p.spec.selector =
            sel.map(|(k, v)| mycel_crds::WorkloadSelector { match_labels: [(k.into(), v.into())].into() });
        Ra::from_object(p, "cluster.local")
    }

    const KEYS: &str =
        r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

    #[test]
    fn rules_merge_per_issuer_and_fetched_keys_fill_uri_rules() {
        let mesh = ra(
            "mycel-system",
            "mesh",
            None,
            serde_json::json!([
                {"issuer": "https://idp", "jwksUri": "https://idp/keys", "timeout": "2s", "clockSkew": "30s"}
            ]),
        );
        let shop = ra(
            "shop",
            "web",
            Some(("app", "web")),
            serde_json::json!([
                {"issuer": "https://idp", "jwks": KEYS},
                {"issuer": "other", "jwks": "not json", "audiences": ["web"],
                 "fromHeaders": [{"name": "x-jwt"}], "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}]},
                {"issuer": "hmac", "jwks": r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#},
                {"issuer": "far", "jwksUri": "http://keys.example.com/jwks"}
            ]),
        );
        let invalid: Vec<&str> = shop.invalid.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(invalid, ["spec.jwtRules[1].jwks", "spec.jwtRules[2].jwks", "spec.jwtRules[3].jwksUri"]);
        assert!(shop.invalid[1].contains("never HMAC"), "{:?}", shop.invalid);
        assert!(shop.invalid[2].contains("use https"), "{:?}", shop.invalid);
        assert_eq!(shop.rules[3].uri, None, "not fetched over plain http from outside the cluster");
        let web: BTreeMap<String, String> = [("app".into(), "web".into())].into();
        assert!(mesh.applies("shop", &web, "mycel-system") && shop.applies("shop", &web, "mycel-system"));
        assert!(!shop.applies("shop", &BTreeMap::new(), "mycel-system"));

        let mut fetched = HashMap::new();
        let (rules, shadowed) = merge(&[&mesh, &shop], &fetched);
        assert_eq!(rules.len(), 4);
        assert_eq!(
            (rules[0].policy.as_str(), rules[0].jwks.as_str()),
            ("mycel-system/mesh", ""),
            "not fetched yet: no keys"
        );
        assert_eq!(rules[0].clock_skew_seconds, 30);
        assert_eq!(rules[1].jwks, "", "an invalid key set is sent as none");
        assert_eq!(rules[1].output_claim_to_headers[0].claim, "sub");
        assert_eq!(shadowed, [(&shop, "https://idp".to_string(), Left::Shadowed(&mesh))]);
        fetched.insert(
            "https://idp/keys".to_string(),
            Fetched { keys: Some(KEYS.into()), ..Default::default() },
        );
        let (rules, _) = merge(&[&mesh, &shop], &fetched);
        assert_eq!(rules[0].jwks, KEYS);
        let want = BTreeMap::from([("https://idp/keys".to_string(), Duration::from_secs(2))]);
        assert_eq!(uris(&[&mesh, &shop]), (want, BTreeSet::new()));
    }

    #[test]
    fn plain_http_only_inside_the_cluster() {
        for ok in
            ["https://idp.example/keys", "http://jwks.shop.svc:8080/jwks", "http://a.b.svc.cluster.local/k"]
        {
            assert_eq!(uri_error(ok, "cluster.local"), None, "{ok}");
        }
        for bad in [
            "http://idp.example/keys",
            "http://10.0.0.1/keys",
            "http://svc/keys",
            "http://a.svc/k",
            "http://evil@x.y.svc.attacker.example:80/",
        ] {
            assert!(uri_error(bad, "cluster.local").is_some(), "{bad}");
        }
    }

    #[test]
    fn many_policies_on_one_workload_are_bounded() {
        let policies = |jwks: &str| -> Vec<Ra> {
            (0..10)
                .map(|i| {
                    let rules: Vec<serde_json::Value> = (0..4)
                        .map(|j| serde_json::json!({"issuer": format!("iss-{i}-{j}"), "jwks": jwks}))
                        .collect();
                    ra("shop", &format!("p{i:02}"), None, serde_json::json!(rules))
                })
                .collect()
        };
        let padded = format!(r#"{{"keys":{},"pad":"{}"}}"#, &KEYS[8..KEYS.len() - 1], "x".repeat(60 * 1024));
        assert_eq!(key_set_error(&padded), None);
        let big = policies(&padded);
        let (rules, left) = merge(&big.iter().collect::<Vec<_>>(), &HashMap::new());
        assert_eq!(rules.len(), 4, "256 KiB of keys: four sets of 60 KiB");
        assert_eq!(left.len(), 36);
        assert!(left.iter().all(|(_, _, why)| *why == Left::OverLimit));
        let small = policies(KEYS);
        let (rules, left) = merge(&small.iter().collect::<Vec<_>>(), &HashMap::new());
        assert_eq!((rules.len(), left.len()), (MAX_RULES_PER_WORKLOAD, 40 - MAX_RULES_PER_WORKLOAD));
        // Each namespace fetches its own URIs only up to its quota.
        let uri_rules = |n: usize| -> serde_json::Value {
            (0..n).map(|j| serde_json::json!({"issuer": format!("i{j}"), "jwksUri": format!("https://idp/{j:02}")})).collect()
        };
        let greedy = ra("aaa", "many", None, uri_rules(16));
        let more = ra("aaa", "more", None, uri_rules(17));
        let other = ra("zzz", "one", None, uri_rules(1));
        let (want, over) = uris(&[&greedy, &more, &other]);
        assert_eq!(want.len(), 16);
        assert_eq!(over, BTreeSet::from(["https://idp/16".to_string()]));
        assert!(want.contains_key("https://idp/00"), "another namespace naming a URI gets it fetched");
    }
}
