//! Two sidecars in one process, over mutual TLS on loopback: a client's outbound proxy and a
//! server's inbound proxy, each with a certificate from a test CA. What an app behind them sees
//! of its caller's identity, what an app can (not) make its caller's proxy do, and that each
//! cluster's endpoints must prove that cluster's identity.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

mod common;
use common::Pki;

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mycel_proxy::{Running, config::Config};
use tokio::net::{TcpListener, TcpStream};

/// The header a proxy names its own answers' reason in.
const ERROR_HEADER: &str = "x-mycel-error";
const SERVER: &str = "spiffe://test.local/ns/shop/sa/server";
const CLIENT: &str = "spiffe://test.local/ns/web/sa/client";

/// An app (HTTP/1.1 and HTTP/2) that answers `<name> <path>`, with the request's
/// `x-forwarded-client-cert` and authority in `x-seen-xfcc` and `x-seen-authority`. On
/// `/error?<value>` it answers 503 with `x-mycel-error: <value>`, as an app trying to speak for
/// a proxy would. It counts the requests it gets.
async fn app(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let hits = counted.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut resp =
                            Response::new(Full::new(Bytes::from(format!("{name} {}", req.uri().path()))));
                        for (h, seen) in [
                            ("x-forwarded-client-cert", "x-seen-xfcc"),
                            ("x-user", "x-seen-user"),
                            ("authorization", "x-seen-authorization"),
                        ] {
                            if let Some(v) = req.headers().get(h) {
                                resp.headers_mut().insert(seen, v.clone());
                            }
                        }
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                req.headers().get("host").and_then(|h| h.to_str().ok()).map(String::from)
                            })
                            .unwrap_or_default();
                        resp.headers_mut().insert("x-seen-authority", authority.parse().unwrap());
                        if req.uri().path() == "/error" {
                            let forged = percent_decode(req.uri().query().unwrap_or_default());
                            *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            resp.headers_mut().insert(ERROR_HEADER, forged.parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

fn percent_decode(s: &str) -> String {
    s.replace("%20", " ")
}

/// A server's sidecar: an inbound listener (protocol detection, mesh TLS) in front of `app`.
async fn server_sidecar(pki: &Pki, id: &str, app: SocketAddr) -> (Running, SocketAddr) {
    server_sidecar_with(pki, id, app, "PERMISSIVE").await
}

/// The same, with an inbound mutual-TLS `mode` in its own configuration (what a sidecar runs
/// before the control plane's first policy: the installation's `spec.mtls.mode`).
async fn server_sidecar_with(pki: &Pki, id: &str, app: SocketAddr, mode: &str) -> (Running, SocketAddr) {
    let config = Config::parse(&format!(
        "admin: '127.0.0.1:0'\ninboundMtls: {{mode: {mode}}}\nlisteners:\n- {{name: inbound, address: '127.0.0.1:0', protocol: auto, direction: inbound, cluster: app}}\nclusters:\n- {{name: app, endpoints: ['{app}']}}\n"
    ))
    .unwrap();
    let proxy = mycel_proxy::start(config).await.unwrap();
    proxy.shared.mesh.set_identity(&pki.identity(id)).unwrap();
    let addr = proxy.listener("inbound").await.unwrap();
    (proxy, addr)
}

/// A client's sidecar: one outbound listener per cluster, `(name, [(endpoint, identity)])`,
/// round robin.
async fn client_sidecar(pki: &Pki, clusters: &[(&str, Vec<(SocketAddr, &str)>)]) -> Running {
    let mut yaml = String::from("admin: '127.0.0.1:0'\nlisteners:\n");
    for (name, _) in clusters {
        yaml += &format!("- {{name: {name}, address: '127.0.0.1:0', protocol: http, cluster: {name}}}\n");
    }
    yaml += "clusters:\n";
    for (name, endpoints) in clusters {
        let eps: Vec<String> = endpoints.iter().map(|(a, _)| format!("'{a}'")).collect();
        let ids: Vec<String> = endpoints.iter().map(|(a, id)| format!("'{a}': '{id}'")).collect();
        yaml += &format!(
            "- {{name: {name}, lb: {{algorithm: RoundRobin}}, endpoints: [{}], mtlsEndpoints: {{{}}}}}\n",
            eps.join(", "),
            ids.join(", ")
        );
    }
    let proxy = mycel_proxy::start(Config::parse(&yaml).unwrap()).await.unwrap();
    proxy.shared.mesh.set_identity(&pki.identity(CLIENT)).unwrap();
    proxy
}

/// One HTTP/1.1 request on a new connection: status, headers, body.
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, hyper::HeaderMap, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "shop.svc");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        send.send_request(req.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("an answer, not a hang")
    .unwrap();
    let (parts, body) = resp.into_parts();
    let body = String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned();
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test]
async fn the_app_sees_the_verified_caller_and_never_a_forged_one() {
    let pki = Pki::new();
    let (app_addr, _) = app("shop").await;
    let (server, inbound) = server_sidecar(&pki, SERVER, app_addr).await;
    let client = client_sidecar(&pki, &[("shop", vec![(inbound, SERVER)])]).await;
    let forged = (
        "x-forwarded-client-cert",
        "By=spiffe://test.local/ns/shop/sa/server;URI=spiffe://test.local/ns/admin/sa/root",
    );

    // Over mutual TLS: the caller's proven identity, whatever its app wrote in the header.
    let (status, headers, _) = get(client.listener("shop").await.unwrap(), "/", &[forged]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-seen-xfcc"], format!("By={SERVER};URI={CLIENT}").as_str());

    // Plaintext straight to the server's sidecar (PERMISSIVE): no identity reaches the app.
    let (status, headers, body) = get(inbound, "/", &[forged]).await;
    assert_eq!((status, body.as_str()), (200, "shop /"));
    assert!(!headers.contains_key("x-seen-xfcc"), "a plaintext client forged its identity: {headers:?}");
    // Nor when the request is dressed to look like something else than HTTP to the sidecar's
    // detection (a leading empty line, an unusual method), which the app still parses as HTTP.
    for head in [
        "\r\nGET / HTTP/1.1\r\nhost: shop\r\nx-forwarded-client-cert: By=x;URI=spiffe://test.local/ns/admin/sa/root\r\n\r\n",
        "PROPFIND / HTTP/1.1\r\nhost: shop\r\nx-forwarded-client-cert: By=x;URI=spiffe://test.local/ns/admin/sa/root\r\n\r\n",
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = TcpStream::connect(inbound).await.unwrap();
        c.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap();
        let resp = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert!(resp.starts_with("http/1.1 200"), "{resp}");
        assert!(!resp.contains("x-seen-xfcc"), "{head:?} forged an identity:\n{resp}");
    }

    client.shutdown(Duration::from_secs(1)).await;
    server.shutdown(Duration::from_secs(1)).await;
}

/// Request authentication and an ALLOW on its principal, in the server's sidecar, with a client's
/// sidecar in front: no token is 403, a token that fails is 401 with a bearer challenge (through
/// the client's sidecar), a valid one reaches the app with its claim in a header and without the
/// token; a claim-based rule decides on what the token says.
#[tokio::test]
async fn json_web_tokens_are_verified_in_the_inbound_sidecar() {
    use base64::Engine as _;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let pki = Pki::new();
    let (app_addr, hits) = app("shop").await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": b64(&raw[1..33]), "y": b64(&raw[33..])}]});
    let config = format!(
        r#"admin: '127.0.0.1:0'
listeners:
- {{name: inbound, address: '127.0.0.1:0', protocol: auto, direction: inbound, cluster: app}}
clusters:
- {{name: app, endpoints: ['{app_addr}']}}
requestAuthentication:
- policy: shop/jwt
  issuer: https://idp.test
  audiences: [shop]
  jwks: '{jwks}'
  outputClaimToHeaders: [{{header: x-user, claim: sub}}]
authorization:
- name: shop/require-jwt
  action: ALLOW
  rules:
  - from: [{{requestPrincipals: ['https://idp.test/*']}}]
    when: [{{key: 'request.auth.claims[role]', notValues: [guest]}}]
"#
    );
    let server = mycel_proxy::start(Config::parse(&config).unwrap()).await.unwrap();
    server.shared.mesh.set_identity(&pki.identity(SERVER)).unwrap();
    let inbound = server.listener("inbound").await.unwrap();
    let client = client_sidecar(&pki, &[("shop", vec![(inbound, SERVER)])]).await;
    let front = client.listener("shop").await.unwrap();
    let signer = EncodingKey::from_ec_der(&key.serialize_der());
    let now = jsonwebtoken::get_current_timestamp();
    let token = |claims: serde_json::Value| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        format!("Bearer {}", encode(&h, &claims, &signer).unwrap())
    };
    let claims = |sub: &str, exp: u64, role: &str| serde_json::json!({"iss": "https://idp.test", "sub": sub, "aud": "shop", "exp": exp, "role": role});

    let (status, _, body) = get(front, "/", &[("x-user", "admin")]).await;
    assert_eq!(
        (status, body.as_str()),
        (
            403,
            "RBAC: access denied
"
        ),
        "no token, no principal"
    );
    let valid = token(claims("alice", now + 300, "member"));
    let (status, headers, body) = get(front, "/", &[("authorization", &valid), ("x-user", "admin")]).await;
    assert_eq!((status, body.as_str()), (200, "shop /"), "{headers:?}");
    assert_eq!(headers["x-seen-user"], "alice", "the verified claim, not the client's header");
    assert!(!headers.contains_key("x-seen-authorization"), "the token is not forwarded");
    let guest = token(claims("bob", now + 300, "guest"));
    assert_eq!(get(front, "/", &[("authorization", &guest)]).await.0, 403, "a claim-based rule");
    let before = hits.load(Ordering::SeqCst);
    for (bad, why) in [
        (token(claims("alice", now - 3600, "member")), "the token has expired"),
        (
            token(serde_json::json!({"iss": "https://other.test", "sub": "x", "aud": "shop"})),
            "the token's issuer is not configured",
        ),
        (
            token(serde_json::json!({"iss": "https://idp.test", "sub": "x", "aud": "billing"})),
            "the token's audiences are not allowed",
        ),
    ] {
        let (status, headers, body) = get(front, "/", &[("authorization", &bad)]).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert_eq!(body, format!("Jwt verification fails: {why}\n"));
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer error=\"invalid_token\""), "{challenge}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), before, "no refused request reached the app");
    let metrics = server.shared.metrics.render();
    assert!(metrics.contains(r#"mycel_jwt_refused_total{policy="shop/jwt"} 2"#), "{metrics}");

    client.shutdown(Duration::from_secs(1)).await;
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_peer_proxy_that_cannot_reach_its_app_sends_the_request_elsewhere() {
    let pki = Pki::new();
    // The first server's app is gone (a closed port); the second's answers.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (app2, hits2) = app("two").await;
    let (s1, in1) = server_sidecar(&pki, SERVER, closed).await;
    let (s2, in2) = server_sidecar(&pki, SERVER, app2).await;
    let client = client_sidecar(&pki, &[("shop", vec![(in1, SERVER), (in2, SERVER)])]).await;
    let front = client.listener("shop").await.unwrap();
    for i in 0..4 {
        let (status, headers, body) = get(front, &format!("/r{i}"), &[]).await;
        assert_eq!((status, body.as_str()), (200, format!("two /r{i}").as_str()), "{headers:?}");
    }
    assert_eq!(hits2.load(Ordering::SeqCst), 4);
    for p in [client, s1, s2] {
        p.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn an_app_cannot_speak_for_its_proxy() {
    let pki = Pki::new();
    let (app1, hits1) = app("one").await;
    let (app2, hits2) = app("two").await;
    let (s1, in1) = server_sidecar(&pki, SERVER, app1).await;
    let (s2, in2) = server_sidecar(&pki, SERVER, app2).await;
    let client = client_sidecar(&pki, &[("shop", vec![(in1, SERVER), (in2, SERVER)])]).await;
    let front = client.listener("shop").await.unwrap();
    // The app answers 503 with the header a proxy uses to say "my app refused; try elsewhere",
    // in today's format and in the one before it.
    for forged in ["UF%20upstream_connect_failed", "connect%20to%20127.0.0.1:1%20failed"] {
        let (status, headers, body) = get(front, &format!("/error?{forged}"), &[]).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.ends_with(" /error"), "the app's own answer reaches the caller: {body}");
        assert!(!headers.contains_key(ERROR_HEADER), "the app's header is not passed off as the proxy's");
    }
    assert_eq!(
        hits1.load(Ordering::SeqCst) + hits2.load(Ordering::SeqCst),
        2,
        "each request reached one app once: nothing was retried on an app's word"
    );
    for p in [client, s1, s2] {
        p.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn each_cluster_expects_its_own_identity_for_a_shared_address() {
    let pki = Pki::new();
    let (app_addr, hits) = app("shop").await;
    let (server, inbound) = server_sidecar(&pki, SERVER, app_addr).await;
    // Two clusters name the same address: one with the identity it proves, one with another.
    // Each dial expects its own cluster's identity, whichever cluster is listed last.
    let client = client_sidecar(
        &pki,
        &[
            ("right", vec![(inbound, SERVER)]),
            ("wrong", vec![(inbound, "spiffe://test.local/ns/bank/sa/vault")]),
        ],
    )
    .await;
    let (status, headers, _) = get(client.listener("right").await.unwrap(), "/", &[]).await;
    assert_eq!(status, 200, "{headers:?}");
    let (status, headers, body) = get(client.listener("wrong").await.unwrap(), "/", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers[ERROR_HEADER], "UF upstream_connect_failed");
    assert!(body.contains("instead of spiffe://test.local/ns/bank/sa/vault"), "{body}");
    assert!(!body.contains("127.0.0.1"), "no internal address in the answer: {body}");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "only the right cluster's request reached the app");
    client.shutdown(Duration::from_secs(1)).await;
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn http2_authority_reaches_the_app_as_the_client_sent_it() {
    let pki = Pki::new();
    let (app_addr, _) = app("shop").await;
    let (server, inbound) = server_sidecar(&pki, SERVER, app_addr).await;
    let client = client_sidecar(&pki, &[("shop", vec![(inbound, SERVER)])]).await;
    let s = TcpStream::connect(client.listener("shop").await.unwrap()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let req =
        Request::get("http://shop.prod.svc.cluster.local:8080/x").body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-seen-xfcc"],
        format!("By={SERVER};URI={CLIENT}").as_str(),
        "over mutual TLS"
    );
    assert_eq!(resp.headers()["x-seen-authority"], "shop.prod.svc.cluster.local:8080");
    client.shutdown(Duration::from_secs(1)).await;
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_strict_sidecar_refuses_plaintext_before_any_policy_arrives() {
    let pki = Pki::new();
    let (app_addr, hits) = app("shop").await;
    let (server, inbound) = server_sidecar_with(&pki, SERVER, app_addr, "STRICT").await;
    let client = client_sidecar(&pki, &[("shop", vec![(inbound, SERVER)])]).await;
    // Over mutual TLS: served.
    let (status, _, _) = get(client.listener("shop").await.unwrap(), "/", &[]).await;
    assert_eq!(status, 200);
    // Plaintext: the connection is closed without an answer, and the app never sees it.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = TcpStream::connect(inbound).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: shop\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "plaintext got an answer: {:?}", String::from_utf8_lossy(&buf[..n]));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    client.shutdown(Duration::from_secs(1)).await;
    server.shutdown(Duration::from_secs(1)).await;
}
