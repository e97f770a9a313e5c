//! The control plane of one revision: discovery ([`model`]), the config stream and the CA
//! ([`server`]) on the gRPC port over TLS ([`tls`]), and monitoring on 15014.
//!
//! It reads its CA from the Secret the operator manages (re-read every few seconds, so a
//! rotated or replaced CA is picked up without a restart), serves with a certificate that CA
//! signs for the revision's Service names, and checks proxies' client certificates against the
//! same trust bundle.

/// Sidecar injection (its own crate, so that `mycelctl inject` needs nothing else of the operator).
pub use mycel_inject as inject;
pub mod discovery;
pub mod jwks;
pub mod metrics;
pub mod model;
pub mod server;
pub mod snapshot;
pub mod status;
pub mod tls;
pub mod translate;
pub mod webhook;

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use mycel_api::v1alpha1::certificates_server::CertificatesServer;
use serde::Deserialize;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::pki::Ca;
use metrics::CpMetrics;
use server::{Discovery, Registry, SharedCa, Signer};
use snapshot::Snapshot;

/// Lifetime of the control plane's own serving certificate (renewed at half of it).
const SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the CA Secret is read again.
const CA_POLL: Duration = Duration::from_secs(5);

/// Everything one control plane needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The installation's namespace, where the CA Secret lives.
    pub namespace: String,
    pub revision: String,
    pub trust_domain: String,
    pub ca_secret: String,
    /// Lifetime of workload certificates, and the longest a proxy may ask for.
    pub workload_cert_ttl: Duration,
    pub grpc_addr: SocketAddr,
    pub monitor_addr: SocketAddr,
    /// The injection and validation webhooks (`None`: not served).
    pub webhook_addr: Option<SocketAddr>,
    /// Replicas of this revision's control plane (policy `Ready` needs all proxies in view).
    pub replicas: i32,
    /// What the injector gives each sidecar.
    pub proxy: inject::ProxySettings,
    pub discovery: model::Options,
}

impl Settings {
    /// Names the serving certificate is valid for: the revision's Service in every spelling,
    /// and loopback (for port-forwards and local runs).
    pub fn server_names(&self) -> Vec<String> {
        let svc = format!("mycel-control-plane-{}", self.revision);
        let ns = &self.namespace;
        vec![
            format!("{svc}.{ns}.svc"),
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc.{}", self.discovery.cluster_domain),
            "localhost".into(),
            "127.0.0.1".into(),
        ]
    }
}

/// The parts of the operator's mesh ConfigMap (`mesh.json`) the control plane reads.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshFile {
    pub namespace: String,
    pub revision: String,
    pub trust_domain: String,
    pub ca_secret: Option<String>,
    pub workload_cert_ttl: Option<String>,
    /// The installation's `spec.mtls.mode`.
    pub mtls_mode: Option<mycel_crds::peer_authentication::PeerMtlsMode>,
    /// `spec.controlPlane.replicas`.
    pub control_plane_replicas: Option<i32>,
    /// `spec.rateLimit`: the rate-limit service runs (`mycel-ratelimit-<revision>`).
    pub rate_limit: Option<MeshRateLimit>,
    /// `spec.extensionProviders`: the external authorizers CUSTOM policies name.
    pub extension_providers: Vec<crate::installation::render::ExtensionProvider>,
}

impl MeshFile {
    /// The external authorizers by name, as proxies receive them.
    pub fn ext_authz(&self) -> std::collections::BTreeMap<String, mycel_api::v1alpha1::ExtAuthzProvider> {
        self.extension_providers
            .iter()
            .map(|p| {
                let pb = mycel_api::v1alpha1::ExtAuthzProvider {
                    name: p.name.clone(),
                    address: p.address.clone(),
                    timeout_ms: p.timeout_ms.clamp(1, 30_000) as u32,
                    fail_open: p.fail_open,
                    status_on_error: u32::from(p.status_on_error.clamp(200, 599)),
                };
                (p.name.clone(), pb)
            })
            .collect()
    }
}

/// The parts of the rate-limit service the control plane tells proxies.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshRateLimit {
    pub timeout_ms: u64,
}

impl MeshRateLimit {
    /// Where proxies reach it and the identity it must prove.
    pub fn service(
        &self,
        namespace: &str,
        revision: &str,
        trust_domain: &str,
    ) -> mycel_api::v1alpha1::RateLimitService {
        let name = format!("mycel-ratelimit-{revision}");
        mycel_api::v1alpha1::RateLimitService {
            address: format!("{name}.{namespace}.svc:{}", crate::installation::render::PORT_RATELIMIT),
            identity: mycel_api::spiffe::SpiffeId::new(trust_domain, namespace, &name).to_string(),
            timeout_ms: self.timeout_ms.clamp(1, 10_000) as u32,
        }
    }
}

/// A running control plane.
pub struct Handle {
    pub grpc_addr: SocketAddr,
    pub monitor_addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub metrics: Arc<CpMetrics>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Stops serving: every stream ends, so proxies reconnect elsewhere.
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The CA and the TLS server configuration built from it.
struct Keys {
    ca: SharedCa,
    tls: tls::ServerTls,
    webhook_tls: tls::ServerTls,
    secret_data: BTreeMapBytes,
    serving_issued: Instant,
}

type BTreeMapBytes = std::collections::BTreeMap<String, Vec<u8>>;

/// Why a control plane cannot start (or renew its keys), in words that say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("CA Secret {0:?} not found (the operator creates it; is the installation reconciled?)")]
    NoCaSecret(String),
    #[error("CA Secret {name:?} {error}")]
    CaSecret { name: String, error: crate::pki::CaError },
    #[error("reading the CA Secret: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot listen on {addr} ({what}): {error}")]
    Listen { addr: SocketAddr, what: &'static str, error: std::io::Error },
    #[error("the serving certificate: {0}")]
    Serving(crate::pki::CaError),
    #[error("TLS: {0}")]
    Tls(String),
}

impl StartError {
    pub(crate) fn tls<E: std::fmt::Display>(e: E) -> StartError {
        StartError::Tls(e.to_string())
    }
}

async fn read_ca(secrets: &Api<Secret>, name: &str) -> Result<(Ca, BTreeMapBytes), StartError> {
    let secret = secrets.get_opt(name).await?.ok_or_else(|| StartError::NoCaSecret(name.to_string()))?;
    let data: BTreeMapBytes = secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    let ca = Ca::from_secret_data(|k| data.get(k).cloned())
        .map_err(|error| StartError::CaSecret { name: name.to_string(), error })?;
    Ok((ca, data))
}

/// The gRPC port's TLS (client certificates optional) and the webhooks' (none; HTTP/1.1).
fn build_tls(
    ca: &Ca,
    settings: &Settings,
) -> Result<(rustls::ServerConfig, rustls::ServerConfig), StartError> {
    let (leaf, key) =
        ca.issue_serving(&settings.server_names(), SERVING_CERT_TTL).map_err(StartError::Serving)?;
    let mut chain = leaf;
    for i in ca.intermediates_pem() {
        chain.push_str(&i);
    }
    let grpc = tls::server_config(&chain, &key, &ca.trust_bundle())?;
    let mut webhook =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(StartError::tls)?
            .with_no_client_auth()
            .with_single_cert(
                rustls::pki_types::pem::PemObject::pem_slice_iter(chain.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(StartError::tls)?,
                rustls::pki_types::pem::PemObject::from_pem_slice(key.as_bytes()).map_err(StartError::tls)?,
            )
            .map_err(StartError::tls)?;
    webhook.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((grpc, webhook))
}

impl Keys {
    async fn load(secrets: &Api<Secret>, settings: &Settings) -> Result<Keys, StartError> {
        let (ca, data) = read_ca(secrets, &settings.ca_secret).await?;
        let (config, webhook) = build_tls(&ca, settings)?;
        Ok(Keys {
            ca: Arc::new(RwLock::new(Arc::new(ca))),
            tls: Arc::new(RwLock::new(Arc::new(config))),
            webhook_tls: Arc::new(RwLock::new(Arc::new(webhook))),
            secret_data: data,
            serving_issued: Instant::now(),
        })
    }

    /// Picks up a changed CA Secret and renews the serving certificate at half its life.
    async fn refresh(&mut self, secrets: &Api<Secret>, settings: &Settings) -> Result<(), StartError> {
        let (ca, data) = read_ca(secrets, &settings.ca_secret).await?;
        let rotated = data != self.secret_data;
        if !rotated && self.serving_issued.elapsed() < SERVING_CERT_TTL / 2 {
            return Ok(());
        }
        let (config, webhook) = build_tls(&ca, settings)?;
        if let Ok(mut t) = self.tls.write() {
            *t = Arc::new(config);
        }
        if let Ok(mut t) = self.webhook_tls.write() {
            *t = Arc::new(webhook);
        }
        if rotated {
            info!(secret = %settings.ca_secret, "CA changed; signing with the new one");
            if let Ok(mut c) = self.ca.write() {
                *c = Arc::new(ca);
            }
        }
        self.secret_data = data;
        self.serving_issued = Instant::now();
        Ok(())
    }
}

/// Starts discovery, the gRPC server and the monitoring server.
pub async fn start(client: Client, settings: Settings) -> Result<Handle, StartError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let mut keys = Keys::load(&secrets, &settings).await?;
    let metrics = Arc::new(CpMetrics::default());
    let registry = Arc::new(Registry::default());
    let snapshots = model::start(client.clone(), settings.discovery.clone());

    let listen = |addr: SocketAddr, what: &'static str| move |error| StartError::Listen { addr, what, error };
    let grpc = TcpListener::bind(settings.grpc_addr).await.map_err(listen(settings.grpc_addr, "gRPC"))?;
    let grpc_addr = grpc.local_addr().map_err(listen(settings.grpc_addr, "gRPC"))?;
    let monitor = TcpListener::bind(settings.monitor_addr)
        .await
        .map_err(listen(settings.monitor_addr, "monitoring"))?;
    let monitor_addr = monitor.local_addr().map_err(listen(settings.monitor_addr, "monitoring"))?;

    let discovery = Discovery {
        snapshots: snapshots.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        trust_domain: settings.trust_domain.clone(),
        full_syncs: server::FullSyncs::new(server::FULL_SYNCS, server::StreamLimits::default().ack_timeout),
        limits: server::StreamLimits::default(),
    };
    let signer = Signer {
        client: client.clone(),
        ca: keys.ca.clone(),
        trust_domain: settings.trust_domain.clone(),
        default_ttl: settings.workload_cert_ttl,
        max_ttl: settings.workload_cert_ttl,
        metrics: metrics.clone(),
        limiter: Arc::new(server::SignLimiter::default()),
    };
    let incoming = tls::incoming(grpc, keys.tls.clone());
    let mut tasks = Vec::new();
    if let Some(addr) = settings.webhook_addr {
        let listener = TcpListener::bind(addr).await.map_err(listen(addr, "webhooks"))?;
        tasks.push(tokio::spawn(webhook::serve(
            listener,
            keys.webhook_tls.clone(),
            Arc::new(settings.proxy.clone()),
        )));
        tasks.push(tokio::spawn(webhook::publish_roots(
            client.clone(),
            settings.revision.clone(),
            settings.namespace.clone(),
            keys.ca.clone(),
        )));
    }
    tasks.push(tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            // A proxy needs one config stream and a signing call at a time on its connection:
            // a client cannot open thousands of streams on one.
            .max_concurrent_streams(STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(server::DiscoveryService(discovery))
            .add_service(CertificatesServer::new(signer))
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = result {
            warn!(error = %e, "gRPC server ended");
        }
    }));
    let settings2 = settings.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(CA_POLL).await;
            if let Err(e) = keys.refresh(&secrets, &settings2).await {
                warn!("keeping the current CA: {e}");
            }
        }
    }));
    let mut snaps = snapshots.clone();
    let m = metrics.clone();
    tasks.push(tokio::spawn(async move {
        while snaps.changed().await.is_ok() {
            let s = snaps.borrow_and_update().clone();
            m.config_version.set(s.version as i64);
            m.clusters.set(s.mesh(mycel_api::CLUSTER_TYPE).map_or(0, |c| c.entries.len()) as i64);
        }
    }));
    tasks.push(tokio::spawn(status::run(
        client.clone(),
        snapshots.clone(),
        registry.clone(),
        status::Writer { revision: settings.revision.clone(), replicas: settings.replicas },
        Duration::from_millis(250),
    )));
    tasks.push(tokio::spawn(serve_monitor(monitor, snapshots.clone(), registry.clone(), metrics.clone())));
    info!(grpc = %grpc_addr, monitor = %monitor_addr, revision = %settings.revision, "control plane serving");
    Ok(Handle { grpc_addr, monitor_addr, registry, metrics, snapshots, tasks })
}

/// Concurrent HTTP/2 streams one connection to 15012 may have open.
pub const STREAMS_PER_CONNECTION: u32 = 8;

/// `/healthz`, `/ready` (the mesh model is complete), `/metrics`, `/debug/proxies` (JSON: who
/// is connected, what each accepted or rejected) and `/debug/clusters` (names and versions).
/// Only the first three answer off loopback: `/debug/*` reveals every proxy and cluster.
async fn serve_monitor(
    listener: TcpListener,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
    metrics: Arc<CpMetrics>,
) {
    let access = mycel_admin::Access {
        public: |p| matches!(p, "/healthz" | "/ready" | "/readyz" | "/metrics"),
        how: "use `kubectl port-forward` to port 15014 (as `mycelctl proxy-status` does)",
    };
    mycel_admin::serve(listener, access, move |asked: mycel_admin::Asked| {
        let (snapshots, registry, metrics) = (snapshots.clone(), registry.clone(), metrics.clone());
        async move {
            use mycel_admin::{Reply, StatusCode};
            let snap = snapshots.borrow().clone();
            match asked.path.as_str() {
                "/healthz" => Reply::text(StatusCode::OK, "ok"),
                "/ready" | "/readyz" if snap.synced => Reply::text(StatusCode::OK, "ready"),
                "/ready" | "/readyz" => {
                    Reply::text(StatusCode::SERVICE_UNAVAILABLE, "discovery has not listed everything yet")
                }
                "/metrics" => Reply::metrics(metrics.render()),
                "/debug/proxies" => {
                    Reply::json(serde_json::to_string_pretty(&registry.list()).unwrap_or_default())
                }
                "/debug/clusters" => {
                    let clusters = snap.mesh(mycel_api::CLUSTER_TYPE).cloned().unwrap_or_default();
                    let map: std::collections::BTreeMap<&String, &String> =
                        clusters.entries.iter().map(|(n, e)| (n, &e.version)).collect();
                    Reply::json(
                        serde_json::to_string_pretty(
                            &serde_json::json!({"version": snap.version, "clusters": map}),
                        )
                        .unwrap_or_default(),
                    )
                }
                _ => Reply::not_found(),
            }
        }
    })
    .await
}
