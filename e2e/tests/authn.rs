//! RequestAuthentication on the real node: a workload's sidecar verifies JSON Web Tokens with
//! keys the control plane fetched from a JWKS server in the cluster (which sees only the
//! control plane's fetches — no proxy fetches keys), or with an inline key set; valid, expired,
//! wrong-issuer, wrong-audience and unknown-key tokens, and a missing one that an
//! AuthorizationPolicy then refuses; a claim in a header for the app and in a `when` rule; a key
//! rotation picked up without restarting anything; a jwksUri that serves no key set is
//! `ResolvedRefs=False`. Skipped (with a message) without a real node.

use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};
use mycel_e2e::{
    TestCluster, eventually,
    images::TESTAPP_IMAGE,
    mesh::{Installation, condition, echo, get, mycel_api, parse, run_job},
    port_forward_get,
};
use serde_json::{Value, json};

/// An Ed25519 signing key and its public JWK with key id `kid`.
fn keypair(kid: &str) -> (EncodingKey, Value) {
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k.public_key_raw());
    (
        EncodingKey::from_ed_der(&k.serialize_der()),
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x}),
    )
}

fn token(kid: &str, key: &EncodingKey, claims: Value) -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

const ISSUER: &str = "https://idp.test";

fn jwks_server(sets: &[String]) -> String {
    let args: Vec<String> = ["jwks-serve".to_string(), "--port".into(), "8080".into()]
        .into_iter()
        .chain(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]))
        .collect();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: jwks}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: jwks}}}}
  template:
    metadata:
      labels: {{app: jwks}}
      annotations: {{mycel.io/inject: "false"}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - {{name: jwks, image: {TESTAPP_IMAGE}, args: {args}}}
---
apiVersion: v1
kind: Service
metadata: {{name: jwks}}
spec:
  selector: {{app: jwks}}
  ports: [{{name: http, port: 8080}}]
"#,
        args = serde_json::to_string(&args).unwrap()
    )
}

fn policies(n: &str, inline: &Value) -> String {
    let inline = serde_json::to_string(&json!({"keys": [inline]}).to_string()).unwrap();
    format!(
        r#"apiVersion: mycel.io/v1alpha1
kind: RequestAuthentication
metadata: {{name: jwt}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  jwtRules:
  - issuer: {ISSUER}
    audiences: [web]
    jwksUri: http://jwks.{n}.svc:8080/jwks
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
  - issuer: inline.test
    jwks: {inline}
    fromHeaders: [{{name: x-jwt}}]
---
apiVersion: mycel.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: jwt-gate}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*", "inline.test/*"]}}}}]
    to: [{{operation: {{paths: [/api/*]}}}}]
  - to: [{{operation: {{paths: [/admin]}}}}]
    when: [{{key: "request.auth.claims[role]", values: [admin]}}]
  - to: [{{operation: {{paths: [/public]}}}}]
"#
    )
}

fn broken(n: &str) -> String {
    format!(
        r#"apiVersion: mycel.io/v1alpha1
kind: RequestAuthentication
metadata: {{name: broken}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  jwtRules:
  - issuer: broken.test
    jwksUri: http://jwks.{n}.svc:8080/not-a-key-set
"#
    )
}

#[tokio::test]
async fn request_authentication_verifies_tokens_with_keys_the_control_plane_fetches() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) {
        mycel_e2e::skip("the local cluster has no real node (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    let mesh = Installation::start(&c, "authn").await;
    let client = mesh.client.clone();
    let n = mesh.app.name.clone();
    let (k1, jwk1) = keypair("k1");
    let (k2, jwk2) = keypair("k2");
    let (k3, jwk3) = keypair("k3");
    let sets = [json!({"keys": [jwk1]}).to_string(), json!({"keys": [jwk2]}).to_string()];
    mesh.apply(&c, &echo("web", "web", "v1", 1));
    mesh.apply(&c, &jwks_server(&sets));
    mesh.available("web", 1).await;
    mesh.available("jwks", 1).await;
    mesh.apply(&c, &policies(&n, &jwk3));
    let ras = mycel_api(&client, &n, "RequestAuthentication", "requestauthentications");
    let azs = mycel_api(&client, &n, "AuthorizationPolicy", "authorizationpolicies");
    let refs = condition(&ras, "jwt", "ResolvedRefs", "True").await;
    assert_eq!(refs["reason"], "ResolvedRefs", "{refs}");
    let ready = condition(&ras, "jwt", "Ready", "True").await;
    assert!(ready["message"].as_str().unwrap_or("").contains("1 selected workload"), "{ready}");
    condition(&azs, "jwt-gate", "Ready", "True").await;

    let now = jsonwebtoken::get_current_timestamp();
    let claims = |iss: &str, aud: &str, exp: u64, role: &str| json!({"iss": iss, "sub": "alice", "aud": aud, "exp": exp, "role": role});
    let later = now + 3600;
    let valid = token("k1", &k1, claims(ISSUER, "web", later, "user"));
    let admin = token("k1", &k1, claims(ISSUER, "web", later, "admin"));
    let expired = token("k1", &k1, claims(ISSUER, "web", now - 3600, "user"));
    let foreign = token("k1", &k1, claims("https://evil.test", "web", later, "user"));
    let wrong_aud = token("k1", &k1, claims(ISSUER, "payments", later, "user"));
    let rotated = token("k2", &k2, claims(ISSUER, "web", later, "user"));
    let with = |path: &str, t: &str| format!("http://web{path}?access_token={t}");
    let urls = [
        ("valid", with("/api/x", &valid)),
        ("expired", with("/api/x", &expired)),
        ("wrong issuer", with("/api/x", &foreign)),
        ("wrong audience", with("/api/x", &wrong_aud)),
        ("key not in the set yet", with("/api/x", &rotated)),
        ("missing", "http://web/api/x".to_string()),
        ("missing, public", "http://web/public".to_string()),
        ("role user", with("/admin", &valid)),
        ("role admin", with("/admin", &admin)),
    ];
    let list: Vec<&str> = urls.iter().map(|(_, u)| u.as_str()).collect();
    // Every request also says it is mallory: only a verified claim may set x-user.
    let (ok, log) =
        run_job(&client, &n, "tokens", "default", true, &get(&list, 1, &["x-user:mallory"])).await;
    assert!(ok, "{log}");
    let seen = parse(&log);
    let status = |what: &str| {
        let url = &urls.iter().find(|(w, _)| *w == what).unwrap().1;
        let s = seen.iter().find(|s| s.url == *url).unwrap_or_else(|| panic!("no {what} in:\n{log}"));
        (s.status, s.body.clone(), s.headers.clone())
    };
    let (code, body, _) = status("valid");
    assert_eq!(code, 200, "{log}");
    assert_eq!(body["headers"]["x-user"], "alice", "the sub claim reaches the app: {body}");
    for what in ["expired", "wrong issuer", "wrong audience", "key not in the set yet"] {
        let (code, body, headers) = status(what);
        assert_eq!(code, 401, "{what}: {log}");
        assert!(body.as_str().unwrap_or("").starts_with("Jwt verification fails"), "{what}: {body}");
        let challenge = headers["www-authenticate"].as_str().unwrap_or("");
        assert!(challenge.starts_with("Bearer"), "{what}: a bearer challenge: {headers}");
    }
    let (code, body, _) = status("missing");
    assert_eq!((code, body.as_str()), (403, Some("RBAC: access denied")), "no token, no principal: {log}");
    let (code, body, _) = status("missing, public");
    assert_eq!(code, 200, "{log}");
    assert!(body["headers"].get("x-user").is_none(), "a client's own x-user never reaches the app: {body}");
    assert_eq!(status("role user").0, 403, "the when rule wants role admin: {log}");
    assert_eq!(status("role admin").0, 200, "{log}");

    // The inline key set, from the rule's own header, which the app does not receive.
    let inline = token("k3", &k3, json!({"iss": "inline.test", "sub": "bob", "exp": later}));
    let header = format!("x-jwt:{inline}");
    let (ok, log) =
        run_job(&client, &n, "inline", "default", true, &get(&["http://web/api/y"], 1, &[&header])).await;
    assert!(ok, "{log}");
    let s = parse(&log).pop().unwrap_or_else(|| panic!("no answer: {log}"));
    assert_eq!(s.status, 200, "{log}");
    assert!(s.body["headers"].get("x-jwt").is_none(), "the token is not forwarded: {}", s.body);

    // Only the control plane fetched the keys.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &n);
    let jwks_pod = pods.list(&ListParams::default().labels("app=jwks")).await.unwrap().items.remove(0);
    let jwks_pod = jwks_pod.metadata.name.unwrap();
    let cps: Api<Pod> = Api::namespaced(client.clone(), &mesh.root.name);
    let cp_ips: Vec<String> = cps
        .list(&ListParams::default().labels("app=mycel-control-plane"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.status?.pod_ip)
        .collect();
    let (code, fetches) = port_forward_get(&client, &n, &jwks_pod, 8080, "/fetches").await.unwrap();
    assert_eq!(code, 200, "{fetches}");
    let fetches: Vec<String> = serde_json::from_str(&fetches).unwrap();
    assert!(!fetches.is_empty(), "the control plane fetched the keys");
    assert!(fetches.iter().all(|ip| cp_ips.contains(ip)), "fetched by {fetches:?}, control plane {cp_ips:?}");

    // Rotation: the server now serves only k2; within a refresh, k2's tokens pass and k1's fail.
    let (code, body) = port_forward_get(&client, &n, &jwks_pod, 8080, "/rotate?to=1").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let mut args = get(&[&with("/api/x", &rotated), &with("/api/x", &valid)], 60, &[]);
    args.extend(["--interval-ms".to_string(), "500".to_string()]);
    let (ok, log) = run_job(&client, &n, "rotation", "default", true, &args).await;
    assert!(ok, "{log}");
    let statuses: Vec<u64> = parse(&log).iter().map(|s| s.status).collect();
    let last = statuses.chunks(2).last().unwrap_or_default();
    assert_eq!(last, [200, 401], "after the rotation: {statuses:?}");

    // A jwksUri that serves no key set.
    mesh.apply(&c, &broken(&n));
    // (Its first status may say "not fetched yet": the fetch's outcome follows.)
    eventually("broken says why its keys are missing", Duration::from_secs(90), || async {
        let refs = condition(&ras, "broken", "ResolvedRefs", "False").await;
        let message = refs["message"].as_str().unwrap_or("");
        match refs["reason"] == "KeysNotFetched"
            && message.contains("spec.jwtRules[0].jwksUri")
            && message.contains("not a JSON Web Key Set")
        {
            true => Ok(()),
            false => Err(refs.to_string()),
        }
    })
    .await;
    let ready = condition(&ras, "broken", "Ready", "False").await;
    assert_eq!(ready["reason"], "NotInEffect", "never fetched: every token of it is refused: {ready}");
    for name in ["jwt", "broken"] {
        ras.delete(name, &Default::default()).await.unwrap();
    }
    azs.delete("jwt-gate", &Default::default()).await.unwrap();
    mesh.finish().await;
}
