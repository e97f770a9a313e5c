//! The proxy's side of the config stream: it bootstraps from the pod's environment, gets an
//! identity ([`crate::identity`]), opens the stream over mutual TLS, and applies every update
//! whole or not at all — acknowledging it, or rejecting it with the field at fault while the
//! last good config keeps serving. A broken stream is reopened with exponential backoff and
//! jitter, resuming from the versions the proxy holds; traffic never waits for the control plane.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use crate::error::SetupError;
use hyper_util::rt::TokioIo;
use mycel_api::v1alpha1::{self as pb, config_discovery_client::ConfigDiscoveryClient};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::{
    ApplyError, Running,
    config::{self, Config, ConfigError},
    tls::identity::Identity,
};

/// What the proxy knows before the control plane tells it anything.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    /// `host:port` of the control plane's gRPC port.
    pub control_plane: String,
    /// Name its certificate must carry (default: the host part of `control_plane`).
    pub server_name: String,
    /// Roots to trust for the control plane before the first certificate brings the bundle.
    pub ca_roots: Vec<String>,
    pub token_path: PathBuf,
    pub trust_domain: String,
    pub node: pb::Node,
    /// Certificate lifetime to ask for (the CA may shorten it); `None` takes the CA's default.
    pub cert_ttl: Option<Duration>,
}

impl Bootstrap {
    pub fn spiffe_id(&self) -> String {
        mycel_api::spiffe::SpiffeId::new(&self.trust_domain, &self.node.namespace, &self.node.service_account)
            .to_string()
    }

    /// Reads the roots file; a missing or empty one is an error naming it.
    pub fn read_roots(path: &std::path::Path) -> Result<Vec<String>, SetupError> {
        let text = std::fs::read_to_string(path).map_err(|error| SetupError::Io {
            what: format!("reading the control plane's CA roots {}", path.display()),
            error,
        })?;
        let roots: Vec<String> = text
            .split_inclusive("-----END CERTIFICATE-----")
            .filter_map(|b| b.find("-----BEGIN CERTIFICATE-----").map(|i| format!("{}\n", &b[i..])))
            .collect();
        if roots.is_empty() {
            return Err(SetupError::Invalid(format!("{} holds no PEM certificate", path.display())));
        }
        Ok(roots)
    }
}

/// Exponential backoff with full jitter.
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, attempt: 0 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1 << self.attempt.min(16)).min(self.max);
        self.attempt += 1;
        // Half fixed, half random: never zero, never in lock-step with other proxies.
        ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// TLS settings for the control plane: its trust bundle, ALPN h2, and the workload certificate when
/// given one.
pub fn client_tls(trust: &[String], identity: Option<&Identity>) -> Result<ClientConfig, SetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for pem in trust {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.map_err(SetupError::invalid("a trust-bundle certificate"))?)?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => {
            let (chain, key) = id.chain_and_key()?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A gRPC channel to the control plane over TLS, with a client certificate when given one.
pub async fn channel(
    boot: &Bootstrap,
    trust: &[String],
    identity: Option<&Identity>,
) -> Result<Channel, SetupError> {
    let tls = TlsConnector::from(Arc::new(client_tls(trust, identity)?));
    let server_name = ServerName::try_from(boot.server_name.clone())
        .map_err(SetupError::invalid("the control plane's server name"))?;
    let target = boot.control_plane.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (tls, server_name, target) = (tls.clone(), server_name.clone(), target.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tls.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let endpoint = Endpoint::from_shared(format!("http://{}", boot.control_plane))
        .map_err(SetupError::invalid("the control plane's address"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    endpoint.connect_with_connector(connector).await.map_err(|error| SetupError::Unreachable {
        what: format!("connecting to the control plane at {}", boot.control_plane),
        error,
    })
}

/// The configuration in force as two layers: the static one (file and flags) and what the
/// control plane streamed. Either can change; the proxy always runs their union.
pub struct Layered {
    pub running: Arc<Running>,
    state: Mutex<(Config, BTreeMap<String, config::Cluster>, Option<config::InboundMtls>)>,
}

impl Layered {
    pub fn new(running: Arc<Running>, base: Config) -> Layered {
        Layered { running, state: Mutex::new((base, BTreeMap::new(), None)) }
    }

    fn compose(
        base: &Config,
        dynamic: &BTreeMap<String, config::Cluster>,
        inbound: &Option<config::InboundMtls>,
    ) -> Result<Config, ConfigError> {
        let mut c = base.clone();
        if let Some(p) = inbound {
            c.inbound_mtls = p.clone();
        }
        for (name, cluster) in dynamic {
            if base.clusters.iter().any(|b| &b.name == name) {
                return Err(ConfigError::Invalid {
                    field: format!("clusters[{name}].name"),
                    message: "a cluster of the static configuration has this name".into(),
                });
            }
            c.clusters.push(cluster.clone());
        }
        Ok(c)
    }

    /// Replaces the static layer.
    pub async fn set_base(&self, base: Config) -> Result<(), ApplyError> {
        let mut st = self.state.lock().await;
        let composed = Self::compose(&base, &st.1, &st.2)?;
        self.running.apply(composed).await?;
        st.0 = base;
        Ok(())
    }

    /// Replaces the streamed inbound policy (`None`: the static one).
    pub async fn set_inbound(&self, policy: Option<config::InboundMtls>) -> Result<(), ApplyError> {
        let mut st = self.state.lock().await;
        let composed = Self::compose(&st.0, &st.1, &policy)?;
        self.running.apply(composed).await?;
        st.2 = policy;
        Ok(())
    }

    /// Replaces the streamed layer; errors name streamed clusters by name.
    pub async fn set_dynamic(&self, dynamic: BTreeMap<String, config::Cluster>) -> Result<(), ApplyError> {
        let mut st = self.state.lock().await;
        let composed = Self::compose(&st.0, &dynamic, &st.2)?;
        match self.running.apply(composed.clone()).await {
            Ok(()) => {
                st.1 = dynamic;
                Ok(())
            }
            Err(ApplyError::Invalid(ConfigError::Invalid { field, message })) => {
                Err(ApplyError::Invalid(ConfigError::Invalid {
                    field: name_indices(&field, &composed),
                    message,
                }))
            }
            Err(e) => Err(e),
        }
    }
}

/// `clusters[3].lb` → `clusters[reviews.default.svc.cluster.local:9080].lb`.
fn name_indices(field: &str, c: &Config) -> String {
    let Some(rest) = field.strip_prefix("clusters[") else { return field.to_string() };
    let Some((idx, tail)) = rest.split_once(']') else { return field.to_string() };
    match idx.parse::<usize>().ok().and_then(|i| c.clusters.get(i)) {
        Some(cl) => format!("clusters[{}]{tail}", cl.name),
        None => field.to_string(),
    }
}

/// A streamed cluster in the proxy's model. Endpoints that are not ready are left out.
pub fn convert_cluster(c: &pb::Cluster) -> Result<config::Cluster, ConfigError> {
    let invalid = |field: String, message: String| ConfigError::Invalid { field, message };
    let mut endpoints = Vec::new();
    let mut mtls_endpoints = BTreeMap::new();
    for (i, e) in c.endpoints.iter().enumerate() {
        let addr: SocketAddr = e.address.parse().map_err(|_| {
            invalid(
                format!("clusters[{}].endpoints[{i}].address", c.name),
                format!("{:?} is not ip:port", e.address),
            )
        })?;
        if e.mtls {
            if e.identity.parse::<mycel_api::spiffe::SpiffeId>().is_err() {
                return Err(invalid(
                    format!("clusters[{}].endpoints[{i}].identity", c.name),
                    format!("mutual TLS needs a SPIFFE ID, not {:?}", e.identity),
                ));
            }
            mtls_endpoints.insert(addr, e.identity.clone());
        }
        if e.ready {
            endpoints.push(addr);
        }
    }
    let addresses = c
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse().map_err(|_| {
                invalid(format!("clusters[{}].addresses[{i}]", c.name), format!("{a:?} is not ip:port"))
            })
        })
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let mut lb = config::LoadBalancer::default();
    if let Some(l) = &c.load_balancer {
        use pb::load_balancer::{Algorithm, HashOn};
        lb.algorithm = match Algorithm::try_from(l.algorithm) {
            Ok(Algorithm::PeakEwma) => config::LbAlgorithm::PeakEwma,
            Ok(Algorithm::RoundRobin) => config::LbAlgorithm::RoundRobin,
            Ok(Algorithm::LeastRequest) => config::LbAlgorithm::LeastRequest,
            Ok(Algorithm::Random) => config::LbAlgorithm::Random,
            Ok(Algorithm::ConsistentHash) => config::LbAlgorithm::ConsistentHash,
            Err(_) => {
                return Err(invalid(
                    format!("clusters[{}].loadBalancer.algorithm", c.name),
                    format!("unknown algorithm {}", l.algorithm),
                ));
            }
        };
        match &l.hash_on {
            Some(HashOn::Header(h)) => lb.hash_header = Some(h.clone()),
            Some(HashOn::Cookie(h)) => lb.hash_cookie = Some(h.clone()),
            Some(HashOn::SourceIp(b)) => lb.hash_source_ip = *b,
            None => {}
        }
    }
    Ok(config::Cluster {
        name: c.name.clone(),
        endpoints,
        connect_timeout_ms: if c.connect_timeout_ms == 0 { 1000 } else { u64::from(c.connect_timeout_ms) },
        lb,
        addresses,
        mtls_endpoints,
    })
}

/// What the proxy accepted from the stream: resource name → (version, cluster).
type Accepted = BTreeMap<String, (String, config::Cluster)>;

/// Keeps the config stream open for as long as the proxy runs.
pub async fn run(
    boot: Arc<Bootstrap>,
    layered: Arc<Layered>,
    mut identity: watch::Receiver<Option<Arc<Identity>>>,
) {
    let metrics = &layered.running.shared.metrics;
    let mut accepted: Accepted = BTreeMap::new();
    let mut policy: Option<(String, config::InboundMtls)> = None;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    loop {
        let id = match identity.wait_for(|i| i.is_some()).await {
            Ok(i) => i.clone(),
            Err(_) => return,
        };
        let Some(id) = id else { continue };
        let result = session(&boot, &layered, &id, &mut accepted, &mut policy, &mut backoff).await;
        metrics.control_plane_connected.set(0);
        let delay = backoff.next_delay();
        match result {
            Ok(()) => {
                info!(retry_in = ?delay, "the control plane closed the config stream; keeping the current config")
            }
            Err(e) => warn!(retry_in = ?delay, "config stream lost, keeping the current config: {e:#}"),
        }
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    boot: &Bootstrap,
    layered: &Layered,
    id: &Identity,
    accepted: &mut Accepted,
    policy: &mut Option<(String, config::InboundMtls)>,
    backoff: &mut Backoff,
) -> Result<(), SetupError> {
    let metrics = &layered.running.shared.metrics;
    let ch = channel(boot, &id.trust_bundle_pem, Some(id)).await?;
    let (tx, rx) = mpsc::channel(8);
    let first = pb::DeltaRequest {
        node: Some(boot.node.clone()),
        type_url: mycel_api::CLUSTER_TYPE.into(),
        subscribe: vec!["*".into()],
        initial_versions: accepted.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect(),
        ..Default::default()
    };
    let closed = || SetupError::Invalid("the config stream closed".into());
    tx.send(first).await.map_err(|_| closed())?;
    tx.send(pb::DeltaRequest {
        type_url: mycel_api::PEER_POLICY_TYPE.into(),
        subscribe: vec!["*".into()],
        initial_versions: policy.iter().map(|(v, _)| ("inbound".to_string(), v.clone())).collect(),
        ..Default::default()
    })
    .await
    .map_err(|_| closed())?;
    let mut responses = ConfigDiscoveryClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(SetupError::refused("opening the config stream"))?
        .into_inner();
    metrics.control_plane_connected.set(1);
    info!(control_plane = %boot.control_plane, resuming = accepted.len(), "config stream open");
    while let Some(resp) = responses.message().await.map_err(SetupError::refused("the config stream"))? {
        backoff.reset();
        let error_detail = if resp.type_url == mycel_api::PEER_POLICY_TYPE {
            let e = apply_policy(&resp, policy, layered).await;
            metrics.config_update(e.is_none());
            e
        } else {
            apply_clusters(&resp, accepted, layered).await
        };
        tx.send(pb::DeltaRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        })
        .await
        .map_err(|_| SetupError::Invalid("the config stream closed".into()))?;
    }
    Ok(())
}

/// Applies a Cluster response (what it can of it); the rejection, if any.
async fn apply_clusters(
    resp: &pb::DeltaResponse,
    accepted: &mut Accepted,
    layered: &Layered,
) -> Option<pb::RejectReason> {
    let metrics = &layered.running.shared.metrics;
    let (next, rejected) = apply_response(resp, accepted, layered).await;
    // In sync (and ready) once the last part of the first sync is in.
    if !resp.partial && !layered.running.shared.ready.swap(true, std::sync::atomic::Ordering::AcqRel) {
        info!(clusters = next.len(), "first config from the control plane is in; ready");
    }
    metrics.config_update(rejected.is_empty());
    let error_detail = match rejected.first() {
        None => {
            debug!(version = %resp.system_version, changed = resp.resources.len(), removed = resp.removed.len(), "config update applied");
            None
        }
        Some((field, message)) => {
            for (field, message) in &rejected {
                warn!(version = %resp.system_version, %field, %message, "config rejected; the last good one stays");
            }
            let message = if rejected.len() > 1 {
                format!("{message} (and {} more rejected resources)", rejected.len() - 1)
            } else {
                message.clone()
            };
            Some(pb::RejectReason { field: field.clone(), message })
        }
    };
    *accepted = next;
    error_detail
}

/// The inbound mutual-TLS policy from its streamed form.
pub fn convert_policy(p: &pb::PeerPolicy) -> Result<config::InboundMtls, ConfigError> {
    let mode = |m: i32, field: String| match pb::MtlsMode::try_from(m) {
        Ok(pb::MtlsMode::MtlsPermissive) => Ok(config::MtlsMode::Permissive),
        Ok(pb::MtlsMode::MtlsStrict) => Ok(config::MtlsMode::Strict),
        Ok(pb::MtlsMode::MtlsDisable) => Ok(config::MtlsMode::Disable),
        Err(_) => Err(ConfigError::Invalid { field, message: format!("unknown mode {m}") }),
    };
    let mut ports = BTreeMap::new();
    for (port, m) in &p.ports {
        let field = format!("peerPolicy.ports[{port}]");
        let port = u16::try_from(*port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ConfigError::Invalid { field: field.clone(), message: "not a TCP port".into() })?;
        ports.insert(port, mode(*m, field)?);
    }
    Ok(config::InboundMtls { mode: mode(p.mode, "peerPolicy.mode".into())?, ports })
}

/// Applies a PeerPolicy response; the rejection, if any.
async fn apply_policy(
    resp: &pb::DeltaResponse,
    policy: &mut Option<(String, config::InboundMtls)>,
    layered: &Layered,
) -> Option<pb::RejectReason> {
    let next = match resp.resources.iter().find(|r| r.name == "inbound") {
        Some(r) => match &r.kind {
            Some(pb::resource::Kind::PeerPolicy(p)) => match convert_policy(p) {
                Ok(c) => Some((r.version.clone(), c)),
                Err(e) => return Some(pb::RejectReason { field: "inbound".into(), message: e.to_string() }),
            },
            _ => {
                return Some(pb::RejectReason {
                    field: "inbound".into(),
                    message: "not a PeerPolicy".into(),
                });
            }
        },
        None if resp.removed.iter().any(|n| n == "inbound") => None,
        None => policy.clone(),
    };
    match layered.set_inbound(next.as_ref().map(|(_, p)| p.clone())).await {
        Ok(()) => {
            if let Some((_, p)) = &next {
                info!(mode = ?p.mode, ports = p.ports.len(), "inbound mutual-TLS policy applied");
            }
            *policy = next;
            None
        }
        Err(e) => Some(pb::RejectReason { field: "inbound".into(), message: e.to_string() }),
    }
}

/// The cluster a validation error is about, when it is one of `names`.
fn blamed<'a>(field: &str, names: impl IntoIterator<Item = &'a String>) -> Option<String> {
    let name = field.strip_prefix("clusters[")?.split(']').next()?;
    names.into_iter().find(|n| n.as_str() == name).cloned()
}

/// Applies one response. What fails is left out — a resource that does not convert, or that the
/// proxy's validation blames — keeping the version accepted before (if any), and the rest is
/// applied: one bad resource must not hold back every other change. Returns the new accepted
/// set and (field, message) per rejected resource; if the whole cannot apply, nothing changes.
async fn apply_response(
    resp: &pb::DeltaResponse,
    accepted: &Accepted,
    layered: &Layered,
) -> (Accepted, Vec<(String, String)>) {
    let mut next = accepted.clone();
    let mut rejected = Vec::new();
    for name in &resp.removed {
        next.remove(name);
    }
    let mut offered = Vec::new();
    for r in &resp.resources {
        match &r.kind {
            Some(pb::resource::Kind::Cluster(c)) => match convert_cluster(c) {
                Ok(cluster) => {
                    next.insert(r.name.clone(), (r.version.clone(), cluster));
                    offered.push(r.name.clone());
                }
                Err(ConfigError::Invalid { field, message }) => rejected.push((field, message)),
                Err(e) => rejected.push((format!("clusters[{}]", r.name), e.to_string())),
            },
            _ => rejected.push((
                format!("resources[{}]", r.name),
                format!("not a cluster, but the response's type is {}", resp.type_url),
            )),
        }
    }
    // Each round either applies or drops one offered resource.
    loop {
        let dynamic = next.iter().map(|(n, (_, c))| (n.clone(), c.clone())).collect();
        match layered.set_dynamic(dynamic).await {
            Ok(()) => return (next, rejected),
            Err(ApplyError::Invalid(ConfigError::Invalid { field, message })) => {
                match blamed(&field, &offered) {
                    Some(name) => {
                        offered.retain(|n| n != &name);
                        match accepted.get(&name) {
                            Some(old) => next.insert(name, old.clone()),
                            None => next.remove(&name),
                        };
                        rejected.push((field, message));
                    }
                    None => {
                        rejected.push((field, message));
                        return (accepted.clone(), rejected);
                    }
                }
            }
            Err(e) => {
                rejected.push((String::new(), e.to_string()));
                return (accepted.clone(), rejected);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_secs(2), "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn streamed_clusters_convert_and_bad_ones_name_the_field() {
        let c = pb::Cluster {
            name: "web.ns.svc.cluster.local:80".into(),
            endpoints: vec![
                pb::Endpoint { address: "10.0.0.1:8080".into(), ready: true, ..Default::default() },
                pb::Endpoint { address: "10.0.0.2:8080".into(), ready: false, ..Default::default() },
            ],
            addresses: vec!["10.96.0.10:80".into()],
            ..Default::default()
        };
        let got = convert_cluster(&c).unwrap();
        assert_eq!(got.endpoints, vec!["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]);
        assert_eq!(got.addresses, vec!["10.96.0.10:80".parse::<SocketAddr>().unwrap()]);
        assert_eq!(got.connect_timeout_ms, 1000);
        let mut bad = c.clone();
        bad.endpoints[1].address = "nowhere".into();
        assert_eq!(
            convert_cluster(&bad).unwrap_err().to_string(),
            "clusters[web.ns.svc.cluster.local:80].endpoints[1].address: \"nowhere\" is not ip:port"
        );
    }
}
