//! The admission webhooks on 15017 (HTTPS, with the serving certificate the CA signs for the
//! revision's Service): `/inject` mutates Pods ([`super::inject`]), `/validate` admits mycel
//! resources. It also keeps the mesh's root certificate in a ConfigMap in every namespace this
//! revision injects, which sidecars mount to trust the control plane before their first
//! certificate arrives.

use std::{collections::BTreeMap, convert::Infallible, sync::Arc};

use base64::Engine;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::{
    inject::{self, ProxySettings, ROOT_CONFIGMAP},
    server::SharedCa,
    tls::ServerTls,
};

/// The largest AdmissionReview read: an object is at most 1.5 MiB in etcd, and a review carries
/// it and its old version, base64 and JSON overhead included.
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// A client must finish its TLS handshake, and send a request head, within this long.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A review's body must arrive within this long of its head.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Why a request to a webhook got no review back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadReview {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("not an AdmissionReview: {0} is missing")]
    Missing(&'static str),
    #[error("the body is larger than {MAX_REVIEW_BYTES} bytes")]
    TooLarge,
}

impl BadReview {
    fn status(&self) -> StatusCode {
        match self {
            BadReview::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Answers one AdmissionReview, or says why the body is not one (the API server always sends
/// `request.uid`; anything without it is refused, never allowed by default).
pub fn review(body: &[u8], path: &str, settings: &ProxySettings) -> Result<Value, BadReview> {
    let req: Value = serde_json::from_slice(body).map_err(|e| BadReview::NotJson(e.to_string()))?;
    let uid = req["request"]["uid"].clone();
    if !uid.is_string() {
        return Err(BadReview::Missing("request.uid"));
    }
    if !req["request"]["kind"]["kind"].is_string() {
        return Err(BadReview::Missing("request.kind.kind"));
    }
    let mut response = json!({"uid": uid, "allowed": true});
    if path == "/inject" && req["request"]["kind"]["kind"] == "Pod" {
        let mut pod = req["request"]["object"].clone();
        // A pod made by a controller has no namespace yet in its body.
        if pod["metadata"]["namespace"].is_null() {
            pod["metadata"]["namespace"] = req["request"]["namespace"].clone();
        }
        match inject::inject(&pod, settings) {
            Ok(Ok(injected)) => {
                let patch = inject::patch(&pod, &injected);
                response["patchType"] = json!("JSONPatch");
                response["patch"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(patch.to_string().as_bytes()));
            }
            Ok(Err(skip)) => {
                tracing::debug!(?skip, "pod not injected");
            }
            Err(bad) => {
                response["allowed"] = json!(false);
                response["status"] = json!({"code": 400, "reason": "BadRequest", "message": format!("mycel sidecar injection: {bad}")});
            }
        }
    }
    Ok(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}))
}

/// Reads a review's body up to [`MAX_REVIEW_BYTES`] and answers it: the status and the JSON.
async fn answer<B>(body: B, path: &str, settings: &ProxySettings) -> (StatusCode, String)
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let reviewed = match http_body_util::Limited::new(body, MAX_REVIEW_BYTES).collect().await {
        Ok(b) => review(&b.to_bytes(), path, settings),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(BadReview::TooLarge),
        Err(e) => return (StatusCode::BAD_REQUEST, json!({"error": e.to_string()}).to_string()),
    };
    match reviewed {
        Ok(v) => (StatusCode::OK, v.to_string()),
        Err(e) => {
            warn!(path, error = %e, "webhook request refused");
            (e.status(), json!({"error": format!("mycel webhook: {e}")}).to_string())
        }
    }
}

/// Serves the webhooks until the task is dropped.
pub async fn serve(listener: TcpListener, tls: ServerTls, settings: Arc<ProxySettings>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let Ok(config) = tls.read().map(|c| c.clone()) else { continue };
        let settings = settings.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp));
            let Ok(Ok(stream)) = handshake.await else { return };
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let settings = settings.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let (status, body) = match path.as_str() {
                        "/healthz" => (StatusCode::OK, "ok".to_string()),
                        // The body too must arrive in time: a client that stalls mid-body would
                        // otherwise hold up to MAX_REVIEW_BYTES for as long as it likes.
                        "/inject" | "/validate" => {
                            tokio::time::timeout(BODY_TIMEOUT, answer(req.into_body(), &path, &settings))
                                .await
                                .unwrap_or_else(|_| {
                                    (
                                StatusCode::REQUEST_TIMEOUT,
                                json!({"error": "mycel webhook: the review's body did not arrive in time"})
                                    .to_string(),
                            )
                                })
                        }
                        _ => (StatusCode::NOT_FOUND, "not found".to_string()),
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Whether this revision injects `ns` (the same selection as its webhook configuration).
pub fn selects(labels: &BTreeMap<String, String>, revision: &str) -> bool {
    let rev = labels.get("mycel.io/rev");
    let inject = labels.get("mycel.io/inject").map(String::as_str);
    match rev {
        Some(r) => r == revision && inject != Some("disabled"),
        None => revision == mycel_crds::mesh_installation::DEFAULT_REVISION && inject == Some("enabled"),
    }
}

/// Keeps `mycel-ca-root-cert` in every namespace this revision injects, and in its own (for its
/// gateway), with the CA's current trust bundle (checked again whenever a namespace changes and
/// every few seconds for the CA).
pub async fn publish_roots(client: Client, revision: String, own_namespace: String, ca: SharedCa) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut events =
        watcher(namespaces, watcher::Config::default()).default_backoff().applied_objects().boxed();
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    let mut selected: BTreeMap<String, ()> = BTreeMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    let pp = PatchParams::apply(&format!("mycel-control-plane-{revision}")).force();
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(ns)) => {
                    let name = ns.name_any();
                    if (selects(ns.labels(), &revision) || name == own_namespace)
                        && ns.metadata.deletion_timestamp.is_none()
                    {
                        selected.insert(name, ());
                    } else {
                        selected.remove(&name);
                        published.remove(&name);
                    }
                }
                Some(Err(e)) => warn!(error = %e, "watching namespaces"),
                None => return,
            },
            _ = tick.tick() => {}
        }
        let Ok(bundle) = ca.read().map(|c| c.trust_bundle_pem.clone()) else { continue };
        for ns in selected.keys() {
            if published.get(ns) == Some(&bundle) {
                continue;
            }
            let cm = json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": ROOT_CONFIGMAP, "labels": {"app.kubernetes.io/managed-by": "mycel-control-plane"}},
                "data": {"root-cert.pem": bundle},
            });
            match Api::<ConfigMap>::namespaced(client.clone(), ns)
                .patch(ROOT_CONFIGMAP, &pp, &Patch::Apply(&cm))
                .await
            {
                Ok(_) => {
                    info!(namespace = %ns, "published the mesh root certificate");
                    published.insert(ns.clone(), bundle.clone());
                }
                Err(e) => warn!(namespace = %ns, error = %e, "cannot publish the mesh root certificate"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_selected_like_the_webhook_does() {
        let l = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(selects(&l(&[("mycel.io/inject", "enabled")]), "default"));
        assert!(!selects(&l(&[("mycel.io/inject", "enabled")]), "canary"));
        assert!(selects(&l(&[("mycel.io/rev", "canary")]), "canary"));
        assert!(!selects(&l(&[("mycel.io/rev", "canary"), ("mycel.io/inject", "enabled")]), "default"));
        assert!(!selects(&l(&[("mycel.io/rev", "canary"), ("mycel.io/inject", "disabled")]), "canary"));
        assert!(!selects(&l(&[]), "default"));
    }

    #[test]
    fn an_admission_review_gets_a_patch_or_a_named_refusal() {
        let review_of = |annotations: Value| {
            json!({"request": {"uid": "u1", "kind": {"kind": "Pod"}, "namespace": "shop",
                "object": {"metadata": {"name": "p", "annotations": annotations}, "spec": {"containers": [{"name": "app", "image": "x"}]}}}})
        };
        let s = ProxySettings::default();
        let out = review(review_of(json!({})).to_string().as_bytes(), "/inject", &s).unwrap();
        assert_eq!(out["response"]["uid"], "u1");
        assert_eq!(out["response"]["allowed"], true);
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: Value = serde_json::from_slice(&patch).unwrap();
        assert!(patch.as_array().unwrap().iter().any(|op| op["path"] == "/spec/initContainers"));
        let out = review(
            review_of(json!({"mycel.io/proxy-concurrency": "many"})).to_string().as_bytes(),
            "/inject",
            &s,
        )
        .unwrap();
        assert_eq!(out["response"]["allowed"], false);
        assert!(
            out["response"]["status"]["message"].as_str().unwrap().contains("mycel.io/proxy-concurrency")
        );
    }

    #[test]
    fn a_malformed_review_is_refused_not_allowed() {
        let s = ProxySettings::default();
        assert!(matches!(review(b"not json", "/inject", &s), Err(BadReview::NotJson(_))));
        assert_eq!(review(b"{}", "/inject", &s), Err(BadReview::Missing("request.uid")));
        assert_eq!(
            review(br#"{"request": {"uid": "u", "object": {}}}"#, "/validate", &s),
            Err(BadReview::Missing("request.kind.kind"))
        );
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_a_413_and_a_bad_one_a_400() {
        let s = ProxySettings::default();
        let big = http_body_util::Full::new(Bytes::from(vec![b' '; MAX_REVIEW_BYTES + 1]));
        let (status, body) = answer(big, "/inject", &s).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        let (status, body) =
            answer(http_body_util::Full::new(Bytes::from_static(b"[1,2]")), "/inject", &s).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("request.uid"), "{body}");
    }
}
