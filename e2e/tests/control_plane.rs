//! The control plane against the real API server, with a real proxy process: the proxy proves
//! its identity with a service-account token from the TokenRequest API, gets a certificate and
//! its clusters, follows Service and endpoint changes, rejects a config it cannot apply while
//! keeping the last good one, and keeps serving while the control plane is gone.
//!
//! Backends are HTTP servers in this test, listening on the node bridge's address (the API
//! server refuses loopback endpoints), so it needs the local cluster's real node.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Secret, ServiceAccount},
};
use kube::{Api, Client, api::PostParams};
use mycel_api::v1alpha1::{self as pb, config_discovery_client::ConfigDiscoveryClient};
use mycel_e2e::{
    TestCluster, TestNamespace, eventually, pki,
    process::{Process, free_port, http_get},
};
use serde_json::json;

const BRIDGE_IP: &str = "10.200.0.1";

/// An HTTP server on the bridge address answering every request with `name`.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((BRIDGE_IP, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(name))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

async fn token(client: &Client, ns: &str, sa: &str, audience: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let resp: TokenRequest = api.create_subresource("token", sa, &PostParams::default(), &req).await.unwrap();
    resp.status.unwrap().token
}

/// `Ok(v)` when `v` is there and passes `pred`, else what was seen (for the timeout message).
fn want<T: std::fmt::Debug>(v: Option<T>, pred: impl Fn(&T) -> bool) -> Result<T, String> {
    match v {
        Some(v) if pred(&v) => Ok(v),
        other => Err(format!("last seen: {other:?}")),
    }
}

async fn apply(c: &TestCluster, ns: &TestNamespace, yaml: &str) {
    c.kubectl_run(&["apply", "-n", &ns.name, "-f", "-"], Some(yaml)).unwrap();
}

fn service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"
    )
}

fn slice(service: &str, port: u16) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{{addresses: [\"{BRIDGE_IP}\"], conditions: {{ready: true}}}}]\n"
    )
}

struct ControlPlane {
    proc: Process,
    args: Vec<String>,
    grpc: u16,
    monitor: SocketAddr,
}

impl ControlPlane {
    fn start(c: &TestCluster, ns: &str) -> ControlPlane {
        let (grpc, monitor) = (free_port().unwrap(), free_port().unwrap());
        let args: Vec<String> = [
            "control-plane",
            "--namespace",
            ns,
            "--revision",
            "e2e",
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--monitor-addr",
            &format!("127.0.0.1:{monitor}"),
            "--webhook-addr",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Process::start(c, "mycel-operator", &format!("cp-{ns}"), &args, &[]).unwrap();
        ControlPlane { proc, args, grpc, monitor: SocketAddr::from(([127, 0, 0, 1], monitor)) }
    }

    fn restart(&mut self, c: &TestCluster, ns: &str) {
        self.proc = Process::start(c, "mycel-operator", &format!("cp-{ns}"), &self.args, &[]).unwrap();
    }

    async fn get(&self, path: &str) -> String {
        match http_get(self.monitor, path).await {
            Ok((200, body)) => body,
            other => panic!("GET {path} on the control plane: {other:?}\n{}", self.proc.log_text()),
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await;
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

#[tokio::test]
async fn a_proxy_gets_an_identity_and_follows_the_mesh() {
    let c = TestCluster::shared().await.unwrap();
    if c.local().is_some_and(|l| !l.info.real_node) || c.local().is_none() {
        mycel_e2e::skip("backends need the local cluster's node bridge (not root, or MYCEL_REAL_NODE=0)");
        return;
    }
    c.install_crds().unwrap();
    let client = c.client().await.unwrap();
    let ns = c.namespace("cp").await.unwrap();
    let n = ns.name.clone();

    // The mesh CA, as the operator would have made it.
    let ca = pki::Ca::generate("mycel e2e root").unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "mycel-ca"},
        "stringData": {"tls.crt": ca.pem.cert, "tls.key": ca.pem.key}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &n).create(&PostParams::default(), &secret).await.unwrap();
    for sa in ["web", "other"] {
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap();
        Api::<ServiceAccount>::namespaced(client.clone(), &n)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap();
    }

    let (b1, b2) = (backend("backend-1").await, backend("backend-2").await);
    apply(&c, &ns, &format!("{}---\n{}", service("web"), slice("web", b1.port()))).await;

    let mut cp = ControlPlane::start(&c, &n);
    eventually("the control plane is ready", Duration::from_secs(30), || async {
        want(http_get(cp.monitor, "/ready").await.ok(), |(s, _)| *s == 200)
    })
    .await;

    // The proxy: its token from the TokenRequest API, the CA root to trust, and a static
    // listener that sends to the streamed cluster of Service `web`.
    let dir = std::env::temp_dir().join(format!("mycel-cp-{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_path = dir.join("token");
    std::fs::write(&token_path, token(&client, &n, "web", "mycel-ca").await).unwrap();
    std::fs::write(dir.join("roots.pem"), &ca.pem.cert).unwrap();
    let (listen, admin) = (free_port().unwrap(), free_port().unwrap());
    let web = format!("web.{n}.svc.cluster.local:80");
    let other = format!("other.{n}.svc.cluster.local:80");
    std::fs::write(
        dir.join("proxy.yaml"),
        format!(
            "admin: 127.0.0.1:{admin}\nlisteners:\n- {{name: web, address: '127.0.0.1:{listen}', protocol: http, cluster: '{web}'}}\nclusters:\n- {{name: '{other}', endpoints: ['{b2}']}}\n"
        ),
    )
    .unwrap();
    let proxy_args = |ttl: &str| -> Vec<String> {
        [
            "run",
            "--config",
            dir.join("proxy.yaml").to_str().unwrap(),
            "--control-plane",
            &format!("127.0.0.1:{}", cp.grpc),
            "--control-plane-name",
            &format!("mycel-control-plane-e2e.{n}.svc"),
            "--ca-roots",
            dir.join("roots.pem").to_str().unwrap(),
            "--token",
            token_path.to_str().unwrap(),
            "--pod-name",
            "web-0",
            "--pod-namespace",
            &n,
            "--service-account",
            "web",
            "--cert-ttl-secs",
            ttl,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let proxy = Process::start(&c, "mycel-proxy", &format!("proxy-{n}"), &proxy_args("16"), &[]).unwrap();
    let listen: SocketAddr = ([127, 0, 0, 1], listen).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    let answer = || async move { http_get(listen, "/").await.ok() };

    // 1. A certificate and config: traffic reaches the Service's endpoint.
    eventually("the proxy routes to web's endpoint", Duration::from_secs(30), || async {
        want(answer().await, |(s, b)| *s == 200 && b == "backend-1")
    })
    .await;
    let proxies = cp.get("/debug/proxies").await;
    assert!(
        proxies.contains("\"pod\": \"web-0\"")
            && proxies.contains(&format!("spiffe://cluster.local/ns/{n}/sa/web")),
        "{proxies}"
    );

    // 2. An endpoint change reaches it.
    apply(&c, &ns, &slice("web", b2.port())).await;
    eventually("the endpoint change reaches the proxy", Duration::from_secs(10), || async {
        want(answer().await, |(_, b)| b == "backend-2")
    })
    .await;

    // 3. A config the proxy cannot apply (a streamed cluster clashing with a static one) is
    //    rejected: the control plane shows the field and the reason, traffic goes on, and later
    //    changes still apply.
    apply(&c, &ns, &format!("{}---\n{}", service("other"), slice("other", b1.port()))).await;
    eventually("the rejection shows in proxy-status", Duration::from_secs(10), || async {
        let p = cp.get("/debug/proxies").await;
        want(Some(p), |p| p.contains(&format!("\"field\": \"clusters[{other}].name\"")))
    })
    .await;
    assert!(cp.metric("mycel_control_plane_nacks_total").await >= 1.0);
    let out = std::process::Command::new(mycel_e2e::process::workspace_binary("mycelctl").unwrap())
        .args(["proxy-status", "--control-plane", &format!("http://{}", cp.monitor)])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let row =
        table.lines().find(|l| l.starts_with(&format!("web-0.{n} "))).unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains(&format!("clusters[{other}].name: a cluster of the static configuration")),
        "{table}"
    );
    assert!(row.contains("STALE (sent "), "{table}");
    assert_eq!(answer().await.map(|(_, b)| b), Some("backend-2".to_string()));
    let text = http_get(admin, "/metrics").await.unwrap().1;
    assert!(text.contains("mycel_proxy_config_updates_total{result=\"rejected\"}"), "{text}");
    apply(&c, &ns, &slice("web", b1.port())).await;
    eventually("a later change still applies", Duration::from_secs(10), || async {
        want(answer().await, |(_, b)| b == "backend-1")
    })
    .await;
    c.kubectl_run(&["delete", "-n", &n, "service/other", "endpointslice/other-1"], None).unwrap();

    // 4. Tokens that prove nothing, or prove another identity, get no certificate.
    let boot = |sa: &str, token: &std::path::Path| mycel_proxy::xds::Bootstrap {
        control_plane: format!("127.0.0.1:{}", cp.grpc),
        server_name: format!("mycel-control-plane-e2e.{n}.svc"),
        ca_roots: vec![ca.pem.cert.clone()],
        token_path: token.to_path_buf(),
        trust_domain: "cluster.local".into(),
        node: mycel_api::v1alpha1::Node {
            namespace: n.clone(),
            service_account: sa.into(),
            ..Default::default()
        },
        cert_ttl: None,
    };
    let roots = vec![ca.pem.cert.clone()];
    let forged = dir.join("forged");
    std::fs::write(&forged, "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl").unwrap();
    let e = mycel_proxy::identity::request(&boot("web", &forged), &roots).await.unwrap_err().to_string();
    assert!(e.contains("Unauthenticated") || e.contains("unauthenticated"), "{e}");
    let wrong_audience = dir.join("wrong-audience");
    std::fs::write(&wrong_audience, token(&client, &n, "web", "https://kubernetes.default.svc").await)
        .unwrap();
    let e =
        mycel_proxy::identity::request(&boot("web", &wrong_audience), &roots).await.unwrap_err().to_string();
    assert!(e.contains("mycel-ca"), "{e}");
    let other_token = dir.join("other-token");
    std::fs::write(&other_token, token(&client, &n, "other", "mycel-ca").await).unwrap();
    // "other"'s token asking for web's identity.
    let e = mycel_proxy::identity::request(&boot("web", &other_token), &roots).await.unwrap_err().to_string();
    assert!(e.contains("/sa/other") && e.to_lowercase().contains("permission"), "{e}");
    let ok = mycel_proxy::identity::request(&boot("other", &other_token), &roots).await.unwrap();
    assert_eq!(ok.spiffe_id, format!("spiffe://cluster.local/ns/{n}/sa/other"));
    //    A config stream is refused, with a status naming the field, when its node claims
    //    another service account than its certificate's, or when it asks for a type that
    //    does not exist.
    let channel = mycel_proxy::xds::channel(&boot("other", &other_token), &roots, Some(&ok)).await.unwrap();
    let refusal = |sa: &str, type_url: &str| {
        let (channel, n) = (channel.clone(), n.clone());
        let first = pb::DeltaRequest {
            type_url: type_url.into(),
            node: Some(pb::Node { namespace: n, service_account: sa.into(), ..Default::default() }),
            ..Default::default()
        };
        async move {
            let mut cd = ConfigDiscoveryClient::new(channel);
            match cd.stream(futures::stream::iter([first])).await {
                Err(status) => status,
                Ok(mut r) => r.get_mut().message().await.expect_err("the stream ends with an error"),
            }
        }
    };
    let s = refusal("web", mycel_api::CLUSTER_TYPE).await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("node:") && s.message().contains("/sa/other"), "{s:?}");
    let s = refusal("other", "mycel.io/Nonsense").await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("type_url") && s.message().contains(mycel_api::CLUSTER_TYPE), "{s:?}");

    // 5. The control plane goes away: traffic flows on. Back with nothing changed, it resumes
    //    the stream with an empty update instead of the whole mesh.
    cp.proc.kill();
    for _ in 0..20 {
        assert_eq!(answer().await, Some((200, "backend-1".to_string())));
    }
    cp.restart(&c, &n);
    eventually("the proxy reconnects", Duration::from_secs(30), || async {
        want(http_get(cp.monitor, "/debug/proxies").await.ok(), |(_, p)| p.contains("\"acked\""))
    })
    .await;
    let bytes = cp.metric("mycel_control_plane_push_bytes_total").await;
    assert!(bytes < 200.0, "resuming with nothing changed pushed {bytes} bytes");
    //    A change made while it was away arrives once it is back.
    cp.proc.kill();
    apply(&c, &ns, &slice("web", b2.port())).await;
    assert_eq!(answer().await.map(|(_, b)| b), Some("backend-1".to_string()));
    cp.restart(&c, &n);
    eventually("the change made meanwhile arrives", Duration::from_secs(30), || async {
        want(answer().await, |(_, b)| b == "backend-2")
    })
    .await;

    // 6. Certificates renew at half-life (16 s here) under steady traffic, with no failure.
    let renewed = |text: String| {
        text.lines()
            .find(|l| l.starts_with("mycel_proxy_certificate_requests_total{result=\"issued\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = renewed(http_get(admin, "/metrics").await.unwrap().1);
    let load = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(18);
    let mut sent = 0u64;
    while tokio::time::Instant::now() < deadline {
        let (status, _) = http_get(listen, "/").await.unwrap();
        sent += 1;
        if status != 200 {
            load.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let after = renewed(http_get(admin, "/metrics").await.unwrap().1);
    assert!(after > before, "no renewal in 18 s (issued {before} → {after})\n{}", proxy.log_text());
    assert_eq!(load.load(std::sync::atomic::Ordering::Relaxed), 0, "failed requests out of {sent}");

    drop(proxy);
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await.unwrap();
}
