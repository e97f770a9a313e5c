//! Request authentication: JSON Web Tokens checked as Istio's RequestAuthentication does (with
//! Envoy's `jwt_authn` under it). Each rule is one issuer's: where its tokens are found (the
//! `Authorization: Bearer` header and the `access_token` parameter unless the rule names its own
//! places), the key set that signs them, the audiences they must name.
//!
//! A request without a token passes without a request principal. A request with a token that
//! fails — its issuer has no rule where it was found, no key verifies it, it has expired or is not
//! valid yet (beyond the clock skew), it names none of the audiences — is refused with 401. A
//! valid token gives the request principal `<iss>/<sub>` and its claims to the authorization
//! policies. Verification is by a well-kept crate (`jsonwebtoken`, on `ring`): RS256/384/512,
//! PS256/384/512, ES256/384 and EdDSA; never HMAC or `none`, which a key set cannot carry safely.

use std::sync::Arc;

use base64::Engine as _;
use hyper::{HeaderMap, header::HeaderName, header::HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk};

use crate::config::authn::JwtRule;

/// Tokens longer than this are refused without being parsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// At most this many tokens of one request are looked at; more is a refusal.
const MAX_TOKENS: usize = 4;
/// At most this many keys of one key set are kept.
pub const MAX_KEYS: usize = 64;

/// What a valid token says about the request.
#[derive(Debug, Clone, PartialEq)]
pub struct Authn {
    /// `<iss>/<sub>`.
    pub principal: String,
    /// The token's payload (an object).
    pub claims: serde_json::Map<String, serde_json::Value>,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
}

impl Authn {
    /// The values of a claim at `path` (a top-level name, then names inside it): a string, each
    /// string of a list, or a number or boolean as JSON text.
    pub fn claim(&self, path: &[String]) -> Vec<String> {
        let Some((first, rest)) = path.split_first() else { return Vec::new() };
        let mut v = self.claims.get(first);
        for p in rest {
            v = v.and_then(|v| v.get(p));
        }
        match v {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|e| match e {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(_) | serde_json::Value::Bool(_) => Some(e.to_string()),
                    _ => None,
                })
                .collect(),
            Some(e @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => vec![e.to_string()],
            _ => Vec::new(),
        }
    }
}

/// What the tokens of a request came to: none (`Ok(None)`); a valid one and the policy whose rule
/// took it; or a refusal, with the policy whose rule refused it (none when no rule took it).
pub type Verdict = Result<Option<(Authn, Arc<str>)>, (Refused, Option<Arc<str>>)>;

/// Why a token was refused: a short sentence the client gets (it says nothing of the keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

struct Key {
    kid: Option<String>,
    /// The algorithms it may verify.
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

struct Rule {
    policy: Arc<str>,
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<Key>,
    locations: Vec<Location>,
    forward: bool,
    outputs: Vec<(HeaderName, Vec<String>)>,
    skew: u64,
}

/// The compiled rules of a workload.
#[derive(Default)]
pub struct Authenticator {
    rules: Vec<Rule>,
    /// Every header a rule outputs a claim to: removed from every request first, so that a
    /// client cannot pass off its own value as a verified claim.
    outputs: Vec<HeaderName>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("issuers", &self.rules.len()).finish()
    }
}

/// The keys of a JSON Web Key Set that can verify tokens: each key is read alone, so that one of
/// a type not supported (or HMAC, refused) does not lose the others.
fn keys_of(jwks: &str) -> Vec<Key> {
    let Ok(serde_json::Value::Object(set)) = serde_json::from_str::<serde_json::Value>(jwks) else {
        return Vec::new();
    };
    let Some(serde_json::Value::Array(keys)) = set.get("keys") else { return Vec::new() };
    let mut out = Vec::new();
    for k in keys.iter().take(MAX_KEYS) {
        let Ok(k) = serde_json::from_value::<jwk::Jwk>(k.clone()) else { continue };
        if k.common.public_key_use.as_ref().is_some_and(|u| *u != jwk::PublicKeyUse::Signature) {
            continue;
        }
        let algorithms = match &k.algorithm {
            jwk::AlgorithmParameters::RSA(_) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            jwk::AlgorithmParameters::EllipticCurve(p) => match p.curve {
                jwk::EllipticCurve::P256 => vec![Algorithm::ES256],
                jwk::EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            },
            jwk::AlgorithmParameters::OctetKeyPair(p) if p.curve == jwk::EllipticCurve::Ed25519 => {
                vec![Algorithm::EdDSA]
            }
            _ => continue,
        };
        // A key that names its algorithm verifies only that one.
        let algorithms = match k.common.key_algorithm.and_then(|a| format!("{a:?}").parse::<Algorithm>().ok())
        {
            Some(a) if algorithms.contains(&a) => vec![a],
            Some(_) => continue,
            None => algorithms,
        };
        let Ok(key) = DecodingKey::from_jwk(&k) else { continue };
        out.push(Key { kid: k.common.key_id.clone(), algorithms, key });
    }
    out
}

impl Authenticator {
    pub fn compile(rules: &[JwtRule]) -> Authenticator {
        let mut outputs = Vec::new();
        let rules = rules
            .iter()
            .map(|r| {
                let mut locations: Vec<Location> = r
                    .from_headers
                    .iter()
                    .filter_map(|h| {
                        Some(Location::Header {
                            name: HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                            prefix: h.prefix.clone(),
                        })
                    })
                    .collect();
                locations.extend(r.from_params.iter().map(|p| Location::Param(p.clone())));
                locations.extend(r.from_cookies.iter().map(|c| Location::Cookie(c.clone())));
                if r.from_headers.is_empty() && r.from_params.is_empty() && r.from_cookies.is_empty() {
                    locations = vec![
                        Location::Header { name: hyper::header::AUTHORIZATION, prefix: "Bearer ".into() },
                        Location::Param("access_token".into()),
                    ];
                }
                let rule_outputs: Vec<(HeaderName, Vec<String>)> = r
                    .output_claim_to_headers
                    .iter()
                    .filter_map(|o| {
                        let name = HeaderName::from_bytes(o.header.as_bytes()).ok()?;
                        Some((name, o.claim.split('.').map(str::to_string).collect()))
                    })
                    .collect();
                outputs.extend(rule_outputs.iter().map(|(h, _)| h.clone()));
                Rule {
                    policy: Arc::from(r.policy.as_str()),
                    issuer: r.issuer.clone(),
                    audiences: r.audiences.clone(),
                    keys: keys_of(&r.jwks),
                    locations,
                    forward: r.forward_original_token,
                    outputs: rule_outputs,
                    skew: r.clock_skew_seconds,
                }
            })
            .collect();
        Authenticator { rules, outputs }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Checks the request's tokens. On success, headers that carried a token are removed (unless
    /// the rule forwards it) and claims are copied to the rules' output headers.
    pub fn authenticate(&self, headers: &mut HeaderMap, query: Option<&str>) -> Verdict {
        // Every (rule, location, token) found; a token in a place two rules share is the same.
        let mut found: Vec<(usize, &Location, String)> = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            for l in &r.locations {
                for t in extract(l, headers, query) {
                    if t.len() > MAX_TOKEN_BYTES {
                        return Err((Refused { reason: "the token is too large" }, None));
                    }
                    found.push((i, l, t));
                }
            }
        }
        // Then what a client sent in a header a claim goes to (a rule may output to a header
        // another reads its token from: the token is read first).
        for h in &self.outputs {
            headers.remove(h);
        }
        if found.is_empty() {
            return Ok(None);
        }
        let mut tokens: Vec<&str> = found.iter().map(|(_, _, t)| t.as_str()).collect();
        tokens.sort_unstable();
        tokens.dedup();
        if tokens.len() > MAX_TOKENS {
            return Err((Refused { reason: "the request carries too many tokens" }, None));
        }
        let mut first: Option<(Authn, usize)> = None;
        let mut used: Vec<(usize, &Location)> = Vec::new();
        for token in tokens {
            let Some(iss) = unverified_issuer(token) else {
                return Err((Refused { reason: "the token is malformed" }, None));
            };
            // The rule of its issuer, among those that look where it was found.
            let Some(&(i, l, _)) = found.iter().find(|(i, _, t)| t == token && self.rules[*i].issuer == iss)
            else {
                return Err((Refused { reason: "the token's issuer is not configured" }, None));
            };
            let rule = &self.rules[i];
            match verify(rule, token) {
                Ok(a) => {
                    used.push((i, l));
                    if first.is_none() {
                        first = Some((a, i));
                    }
                }
                Err(e) => return Err((e, Some(rule.policy.clone()))),
            }
        }
        for (i, l) in used {
            let rule = &self.rules[i];
            if !rule.forward
                && let Location::Header { name, .. } = l
            {
                headers.remove(name);
            }
        }
        let Some((a, i)) = first else { return Ok(None) };
        let rule = &self.rules[i];
        for (h, path) in &rule.outputs {
            let values = a.claim(path);
            if values.is_empty() {
                continue;
            }
            if let Ok(v) = HeaderValue::from_str(&values.join(",")) {
                headers.insert(h.clone(), v);
            }
        }
        Ok(Some((a, rule.policy.clone())))
    }
}

/// The tokens at one place of a request.
fn extract(l: &Location, headers: &HeaderMap, query: Option<&str>) -> Vec<String> {
    match l {
        Location::Header { name, prefix } => headers
            .get_all(name)
            .iter()
            .filter_map(|v| {
                let v = v.to_str().ok()?.trim();
                let rest = if prefix.is_empty() {
                    v
                } else {
                    let p = prefix.trim_end();
                    let head = v.get(..p.len())?;
                    if !head.eq_ignore_ascii_case(p) {
                        return None;
                    }
                    v[p.len()..].trim_start()
                };
                (!rest.is_empty()).then(|| rest.to_string())
            })
            .collect(),
        Location::Param(name) => query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name && !v.is_empty()).then(|| v.to_string())
            })
            .collect(),
        Location::Cookie(name) => headers
            .get_all(hyper::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name && !v.is_empty()).then(|| v.to_string())
            })
            .collect(),
    }
}

/// The `iss` of a token's payload, read before any check (to choose the rule that checks it).
fn unverified_issuer(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: String,
    }
    serde_json::from_slice::<Iss>(&bytes).ok().map(|i| i.iss)
}

fn verify(rule: &Rule, token: &str) -> Result<Authn, Refused> {
    let malformed = Refused { reason: "the token is malformed" };
    let header = jsonwebtoken::decode_header(token).map_err(|_| malformed)?;
    let candidates = rule.keys.iter().filter(|k| {
        k.algorithms.contains(&header.alg)
            && match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
    });
    let mut validation = Validation::new(header.alg);
    validation.leeway = rule.skew;
    validation.validate_nbf = true;
    validation.set_issuer(&[&rule.issuer]);
    validation.required_spec_claims = ["iss".to_string()].into();
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
        validation.required_spec_claims.insert("aud".into());
    }
    let mut outcome = Refused { reason: "no key of the issuer's key set verifies the token" };
    for k in candidates {
        match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &k.key, &validation) {
            Ok(data) => return Ok(authn(&rule.issuer, data.claims)),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as E;
                let reason = match e.kind() {
                    E::InvalidSignature | E::InvalidAlgorithm | E::InvalidKeyFormat => continue,
                    E::ExpiredSignature => "the token has expired",
                    E::ImmatureSignature => "the token is not valid yet",
                    E::InvalidAudience | E::MissingRequiredClaim(_) => {
                        "the token's audiences are not allowed"
                    }
                    E::InvalidIssuer => "the token's issuer is not configured",
                    _ => "the token is malformed",
                };
                // The signature was good (claims are checked after it): no other key changes this.
                outcome = Refused { reason };
                break;
            }
        }
    }
    Err(outcome)
}

fn authn(issuer: &str, claims: serde_json::Map<String, serde_json::Value>) -> Authn {
    let text = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let sub = text("sub").unwrap_or_default();
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => {
            a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
        }
        _ => Vec::new(),
    };
    Authn { principal: format!("{issuer}/{sub}"), presenter: text("azp"), audiences, claims }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    /// A 2048-bit RSA key made for these tests (`openssl genrsa`), PKCS#1 DER, and its modulus.
    const RSA_DER: &[u8] = include_bytes!("testdata/rsa-test-key.der");
    const RSA_N: &str = "teByvj0blNZb-lRa30Q1F_Z1HNxL8gSfZYb7mnAEiPdSnx2G-qqhHtmVvOB-Vc-z_0knjS0QB4XUPZjzZzmc738_Jn4Q-sI7kwuCaVUEjrAPigD2t4VAF7BfU0DYtSNGPgaDEaJQLSm0sVTfEbpEHnFoQUC40GIwgb3t_jOWA1Jid2vhJJuwJQZRYld-KofN-dvkrMnhR41V-j8-V3ck93QN8H5RG-_DR5OYoR29c3QJ-X2uHdcj__C9LAyXthI09Zlsx0FpoxBD9fbLO_-PgnGlBy5tuJ4Qx0BWaf2C6gZk8w5yLwCtqFuSxtTs4PUkCexhmxBOHBJMhXrQbPgLmw";

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// A fresh signing key and its public JWK, with key id `kid`.
    fn keypair(alg: Algorithm, kid: &str) -> (EncodingKey, serde_json::Value) {
        match alg {
            Algorithm::RS256 => (
                EncodingKey::from_rsa_der(RSA_DER),
                json!({"kty": "RSA", "kid": kid, "use": "sig", "n": RSA_N, "e": "AQAB"}),
            ),
            Algorithm::ES256 => {
                let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                let raw = k.public_key_raw();
                (
                    EncodingKey::from_ec_der(&k.serialize_der()),
                    json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..])}),
                )
            }
            Algorithm::EdDSA => {
                let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
                (
                    EncodingKey::from_ed_der(&k.serialize_der()),
                    json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(k.public_key_raw())}),
                )
            }
            _ => unreachable!(),
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn token(alg: Algorithm, kid: &str, key: &EncodingKey, claims: serde_json::Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        encode(&h, &claims, key).unwrap()
    }

    fn rule(issuer: &str, jwks: &[&serde_json::Value]) -> JwtRule {
        JwtRule {
            policy: "shop/jwt".into(),
            issuer: issuer.into(),
            audiences: vec!["shop".into()],
            jwks: json!({"keys": jwks}).to_string(),
            clock_skew_seconds: 60,
            ..Default::default()
        }
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(hyper::header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
        h
    }

    fn reason(r: Verdict) -> &'static str {
        match r {
            Err((e, _)) => e.reason,
            Ok(a) => panic!("accepted: {a:?}"),
        }
    }

    #[test]
    fn valid_tokens_of_each_algorithm_give_the_principal_and_claims() {
        for alg in [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA] {
            let (key, jwk) = keypair(alg, "k1");
            let a = Authenticator::compile(&[rule("https://issuer.example", &[&jwk])]);
            let t = token(
                alg,
                "k1",
                &key,
                json!({"iss": "https://issuer.example", "sub": "alice", "aud": ["shop", "other"], "exp": now() + 300, "azp": "web", "groups": ["admins", "dev"]}),
            );
            let mut h = bearer(&t);
            let (authn, policy) = a.authenticate(&mut h, None).unwrap().unwrap_or_else(|| panic!("{alg:?}"));
            assert_eq!(authn.principal, "https://issuer.example/alice", "{alg:?}");
            assert_eq!(authn.audiences, ["shop", "other"]);
            assert_eq!(authn.presenter.as_deref(), Some("web"));
            assert_eq!(authn.claim(&["groups".into()]), ["admins", "dev"]);
            assert_eq!(&*policy, "shop/jwt");
            assert!(!h.contains_key(hyper::header::AUTHORIZATION), "the token is not forwarded by default");
        }
    }

    /// Also a RequestAuthentication's `clockSkew` (the rule's `clock_skew_seconds`).
    #[test]
    fn tokens_that_fail_are_refused_and_a_missing_one_passes_without_a_principal() {
        let (key, jwk) = keypair(Algorithm::ES256, "k1");
        let (other, _) = keypair(Algorithm::ES256, "k1");
        let a = Authenticator::compile(&[rule("iss-a", &[&jwk])]);
        let good = json!({"iss": "iss-a", "sub": "s", "aud": "shop", "exp": now() + 300});
        let with = |c: serde_json::Value, k: &EncodingKey| token(Algorithm::ES256, "k1", k, c);
        let mut c = good.clone();
        c["exp"] = json!(now() - 120);
        assert_eq!(reason(a.authenticate(&mut bearer(&with(c, &key)), None)), "the token has expired");
        let mut c = good.clone();
        c["exp"] = json!(now() - 30);
        assert!(
            a.authenticate(&mut bearer(&with(c, &key)), None).unwrap().is_some(),
            "within the clock skew"
        );
        let mut c = good.clone();
        c["nbf"] = json!(now() + 600);
        assert_eq!(reason(a.authenticate(&mut bearer(&with(c, &key)), None)), "the token is not valid yet");
        let mut c = good.clone();
        c["iss"] = json!("iss-b");
        assert_eq!(
            reason(a.authenticate(&mut bearer(&with(c, &key)), None)),
            "the token's issuer is not configured"
        );
        let mut c = good.clone();
        c["aud"] = json!("billing");
        assert_eq!(
            reason(a.authenticate(&mut bearer(&with(c, &key)), None)),
            "the token's audiences are not allowed"
        );
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(
            reason(a.authenticate(&mut bearer(&with(c, &key)), None)),
            "the token's audiences are not allowed"
        );
        assert_eq!(
            reason(a.authenticate(&mut bearer(&with(good.clone(), &other)), None)),
            "no key of the issuer's key set verifies the token",
            "signed by a key not in the set"
        );
        // A signature made for other claims.
        let t = with(good.clone(), &key);
        let forged_claims = b64(json!({"iss": "iss-a", "sub": "root", "aud": "shop"}).to_string().as_bytes());
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
        assert_eq!(
            reason(a.authenticate(&mut bearer(&forged), None)),
            "no key of the issuer's key set verifies the token"
        );
        assert_eq!(reason(a.authenticate(&mut bearer("not-a-token"), None)), "the token is malformed");
        // `alg: none` and HMAC with the public key as secret are never accepted.
        let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), parts[1]);
        assert!(a.authenticate(&mut bearer(&none), None).is_err());
        let hs = encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(jwk.to_string().as_bytes()),
        )
        .unwrap();
        assert!(a.authenticate(&mut bearer(&hs), None).is_err());
        // No token: no principal, no refusal.
        assert_eq!(a.authenticate(&mut HeaderMap::new(), None).unwrap(), None);
        // A key set not fetched yet (empty) verifies nothing.
        let unfetched = Authenticator::compile(&[JwtRule { jwks: String::new(), ..rule("iss-a", &[]) }]);
        assert!(unfetched.authenticate(&mut bearer(&with(good, &key)), None).is_err());
    }

    /// A RequestAuthentication's `fromHeaders`, `fromParams`, `fromCookies`,
    /// `forwardOriginalToken` and `outputClaimToHeaders`, as the stream carries them.
    #[test]
    fn tokens_are_found_where_the_rule_says_and_claims_reach_headers() {
        let (key, jwk) = keypair(Algorithm::EdDSA, "k1");
        let mut r = rule("iss-a", &[&jwk]);
        r.from_headers =
            vec![crate::config::authn::JwtHeader { name: "x-jwt".into(), prefix: String::new() }];
        r.from_params = vec!["tok".into()];
        r.from_cookies = vec!["session".into()];
        r.output_claim_to_headers = vec![
            crate::config::authn::ClaimToHeader { header: "x-user".into(), claim: "sub".into() },
            crate::config::authn::ClaimToHeader { header: "x-team".into(), claim: "org.team".into() },
        ];
        let a = Authenticator::compile(&[r.clone()]);
        let t = token(
            Algorithm::EdDSA,
            "k1",
            &key,
            json!({"iss": "iss-a", "sub": "bob", "aud": "shop", "org": {"team": "pay"}}),
        );
        let mut h = HeaderMap::new();
        h.insert("x-jwt", HeaderValue::from_str(&t).unwrap());
        h.insert("x-user", HeaderValue::from_static("forged"));
        let (authn, _) = a.authenticate(&mut h, None).unwrap().unwrap();
        assert_eq!(authn.principal, "iss-a/bob");
        assert_eq!(h["x-user"], "bob", "the claim replaces what the client sent");
        assert_eq!(h["x-team"], "pay");
        assert!(!h.contains_key("x-jwt"), "removed");
        let query = format!("a=1&tok={t}");
        assert!(a.authenticate(&mut HeaderMap::new(), Some(&query)).unwrap().is_some(), "from a parameter");
        let mut h = HeaderMap::new();
        h.insert(hyper::header::COOKIE, HeaderValue::from_str(&format!("x=1; session={t}")).unwrap());
        assert!(a.authenticate(&mut h, None).unwrap().is_some(), "from a cookie");
        // The default places are not looked at once the rule names its own.
        assert_eq!(a.authenticate(&mut bearer(&t), None).unwrap(), None);
        // A client's header of a claim's name never survives, token or not.
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("forged"));
        assert_eq!(a.authenticate(&mut h, None).unwrap(), None);
        assert!(!h.contains_key("x-user"));
        // Forwarded when the rule says so.
        r.forward_original_token = true;
        let a = Authenticator::compile(&[r]);
        let mut h = HeaderMap::new();
        h.insert("x-jwt", HeaderValue::from_str(&t).unwrap());
        assert!(a.authenticate(&mut h, None).unwrap().is_some());
        assert!(h.contains_key("x-jwt"));
        // A rule that outputs a claim to the header another reads its token from: the token is
        // read first, so a bad one is refused rather than removed unread.
        let (other_key, other_jwk) = keypair(Algorithm::EdDSA, "k2");
        let mut reader = rule("iss-b", &[&other_jwk]);
        reader.from_headers =
            vec![crate::config::authn::JwtHeader { name: "x-user".into(), prefix: String::new() }];
        let a = Authenticator::compile(&[rule_outputting_x_user(&jwk), reader]);
        let forged =
            token(Algorithm::EdDSA, "k2", &key, json!({"iss": "iss-b", "sub": "eve", "aud": "shop"}));
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_str(&forged).unwrap());
        assert_eq!(reason(a.authenticate(&mut h, None)), "no key of the issuer's key set verifies the token");
        let good =
            token(Algorithm::EdDSA, "k2", &other_key, json!({"iss": "iss-b", "sub": "eve", "aud": "shop"}));
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_str(&good).unwrap());
        assert_eq!(a.authenticate(&mut h, None).unwrap().unwrap().0.principal, "iss-b/eve");
    }

    fn rule_outputting_x_user(jwk: &serde_json::Value) -> JwtRule {
        let mut r = rule("iss-a", &[jwk]);
        r.output_claim_to_headers =
            vec![crate::config::authn::ClaimToHeader { header: "x-user".into(), claim: "sub".into() }];
        r
    }

    #[test]
    fn a_rotated_key_set_verifies_by_key_id() {
        let (old, old_jwk) = keypair(Algorithm::ES256, "2026-11");
        let (new, new_jwk) = keypair(Algorithm::ES256, "2026-12");
        let claims = json!({"iss": "iss-a", "sub": "s", "aud": "shop"});
        let both = Authenticator::compile(&[rule("iss-a", &[&old_jwk, &new_jwk])]);
        for (k, kid) in [(&old, "2026-11"), (&new, "2026-12")] {
            assert!(
                both.authenticate(&mut bearer(&token(Algorithm::ES256, kid, k, claims.clone())), None)
                    .is_ok()
            );
        }
        let rotated = Authenticator::compile(&[rule("iss-a", &[&new_jwk])]);
        let t = token(Algorithm::ES256, "2026-11", &old, claims);
        assert!(rotated.authenticate(&mut bearer(&t), None).is_err(), "the retired key verifies nothing");
    }

    #[test]
    fn hostile_requests_are_bounded() {
        let (_, jwk) = keypair(Algorithm::ES256, "k1");
        let a = Authenticator::compile(&[rule("iss-a", &[&jwk])]);
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(reason(a.authenticate(&mut bearer(&huge), None)), "the token is too large");
        let query: Vec<String> = (0..8).map(|i| format!("access_token=t{i}")).collect();
        assert_eq!(
            reason(a.authenticate(&mut HeaderMap::new(), Some(&query.join("&")))),
            "the request carries too many tokens"
        );
        // A key set that is not one, or holds only keys it cannot use, verifies nothing.
        let junk = Authenticator::compile(&[JwtRule {
            jwks: r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"},{"kty":"EC","crv":"P-521"},7]}"#.into(),
            ..rule("iss-a", &[])
        }]);
        assert!(junk.rules[0].keys.is_empty());
    }
}
