//! The proxy's side of the config stream: it bootstraps from the pod's environment, gets an
//! identity ([`crate::identity`]), opens the stream over mutual TLS, and applies every update
//! whole or not at all — acknowledging it, or rejecting it with the field at fault while the
//! last good config keeps serving. A broken stream is reopened with exponential backoff and
//! jitter, resuming from the versions the proxy holds; traffic never waits for the control plane.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

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

mod convert;
pub use convert::{InboundPolicy, convert_cluster, convert_policy, convert_route};

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

/// The configuration in force as layers: the static one (file and flags) and what the control
/// plane streamed (clusters, route tables, the inbound policy). Any can change; the proxy always
/// runs their union.
pub struct Layered {
    pub running: Arc<Running>,
    state: Mutex<Layers>,
}

#[derive(Clone)]
struct Layers {
    base: Config,
    clusters: BTreeMap<String, config::Cluster>,
    routes: BTreeMap<String, config::RouteTable>,
    inbound: Option<InboundPolicy>,
}

impl Layers {
    fn compose(&self) -> Result<Config, ConfigError> {
        let mut c = self.base.clone();
        // Until the first policy arrives, a streamed proxy refuses inbound connections.
        c.inbound_pending = c.streamed && self.inbound.is_none();
        if let Some(p) = &self.inbound {
            c.inbound_mtls = p.mtls.clone();
            c.authorization = p.authz.clone();
            c.request_authentication = p.jwt.clone();
            c.rate_limits = p.rate_limits.clone();
            c.rate_limit_service = p.rate_limit_service.clone();
            c.outbound_rate_limits = p.outbound_rate_limits.clone();
        }
        for (name, cluster) in &self.clusters {
            if self.base.clusters.iter().any(|b| &b.name == name) {
                return Err(ConfigError::Invalid {
                    field: format!("clusters[{name}].name"),
                    message: "a cluster of the static configuration has this name".into(),
                });
            }
            c.clusters.push(cluster.clone());
        }
        for (name, table) in &self.routes {
            if self.base.routes.iter().any(|b| &b.cluster == name) {
                return Err(ConfigError::Invalid {
                    field: format!("routes[{name}].cluster"),
                    message: "a route table of the static configuration routes this cluster".into(),
                });
            }
            c.routes.push(table.clone());
        }
        Ok(c)
    }
}

impl Layered {
    pub fn new(running: Arc<Running>, base: Config) -> Layered {
        let layers = Layers { base, clusters: BTreeMap::new(), routes: BTreeMap::new(), inbound: None };
        Layered { running, state: Mutex::new(layers) }
    }

    /// Applies the layers `change` makes of the current ones, and keeps them if that worked.
    async fn change(&self, change: impl FnOnce(&mut Layers)) -> Result<(), ApplyError> {
        let mut st = self.state.lock().await;
        let mut next = st.clone();
        change(&mut next);
        let composed = next.compose()?;
        match self.running.apply(composed.clone()).await {
            Ok(()) => {
                *st = next;
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

    /// Replaces the static layer.
    pub async fn set_base(&self, base: Config) -> Result<(), ApplyError> {
        self.change(|l| l.base = base).await
    }

    /// Replaces the streamed inbound policy (`None`: the static one).
    pub async fn set_inbound(&self, policy: Option<InboundPolicy>) -> Result<(), ApplyError> {
        self.change(|l| l.inbound = policy).await
    }

    /// Replaces the streamed clusters; errors name streamed clusters by name.
    pub async fn set_dynamic(&self, dynamic: BTreeMap<String, config::Cluster>) -> Result<(), ApplyError> {
        self.change(|l| l.clusters = dynamic).await
    }

    /// Replaces the streamed route tables.
    pub async fn set_routes(&self, routes: BTreeMap<String, config::RouteTable>) -> Result<(), ApplyError> {
        self.change(|l| l.routes = routes).await
    }
}

/// `clusters[3].lb` → `clusters[reviews.default.svc.cluster.local:9080].lb` (and so for
/// `routes[i]`).
fn name_indices(field: &str, c: &Config) -> String {
    let (list, rest) = if let Some(r) = field.strip_prefix("clusters[") {
        ("clusters", r)
    } else if let Some(r) = field.strip_prefix("routes[") {
        ("routes", r)
    } else {
        return field.to_string();
    };
    let Some((idx, tail)) = rest.split_once(']') else { return field.to_string() };
    let Ok(i) = idx.parse::<usize>() else { return field.to_string() };
    let name = if list == "clusters" {
        c.clusters.get(i).map(|x| x.name.as_str())
    } else {
        c.routes.get(i).map(|x| x.cluster.as_str())
    };
    match name {
        Some(n) => format!("{list}[{n}]{tail}"),
        None => field.to_string(),
    }
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
    let mut policy: Option<(String, InboundPolicy)> = None;
    let mut routes: Routes = BTreeMap::new();
    // A control plane of a release before route tables refuses the type (and the stream with
    // it): the proxy then goes on without routes rather than never becoming ready.
    let mut without_routes = false;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    loop {
        let id = match identity.wait_for(|i| i.is_some()).await {
            Ok(i) => i.clone(),
            Err(_) => return,
        };
        let Some(id) = id else { continue };
        let result = session(
            &boot,
            &layered,
            &id,
            (&mut accepted, &mut policy, &mut routes),
            without_routes,
            &mut backoff,
        )
        .await;
        metrics.control_plane_connected.set(0);
        if let Err(SetupError::Refused { code: tonic::Code::InvalidArgument, message, .. }) = &result
            && message.contains(&format!("unknown resource type {:?}", mycel_api::ROUTE_TYPE))
            && !without_routes
        {
            warn!(
                "the control plane does not serve route tables (an older release): going on without routes"
            );
            without_routes = true;
        }
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
    (accepted, policy, routes): (&mut Accepted, &mut Option<(String, InboundPolicy)>, &mut Routes),
    without_routes: bool,
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
    if !without_routes {
        tx.send(pb::DeltaRequest {
            type_url: mycel_api::ROUTE_TYPE.into(),
            subscribe: vec!["*".into()],
            initial_versions: routes.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect(),
            ..Default::default()
        })
        .await
        .map_err(|_| closed())?;
    }
    let mut responses = ConfigDiscoveryClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(SetupError::refused("opening the config stream"))?
        .into_inner();
    metrics.control_plane_connected.set(1);
    info!(control_plane = %boot.control_plane, resuming = accepted.len(), "config stream open");
    // Ready once the first sync of clusters and of routes is whole: an app that starts then
    // sends its first request with its routes in force.
    let (mut clusters_synced, mut routes_synced) = (false, without_routes);
    while let Some(resp) = responses.message().await.map_err(SetupError::refused("the config stream"))? {
        backoff.reset();
        if !resp.partial {
            clusters_synced |= resp.type_url == mycel_api::CLUSTER_TYPE;
            routes_synced |= resp.type_url == mycel_api::ROUTE_TYPE;
        }
        let error_detail = if resp.type_url == mycel_api::PEER_POLICY_TYPE {
            let e = apply_policy(&resp, policy, layered).await;
            metrics.config_update(e.is_none());
            e
        } else if resp.type_url == mycel_api::ROUTE_TYPE {
            let e = apply_routes(&resp, routes, &boot.node.namespace, layered).await;
            metrics.config_update(e.is_none());
            e
        } else {
            apply_clusters(&resp, accepted, layered).await
        };
        // And once its inbound policy is in (until then it accepts no inbound connection).
        if clusters_synced
            && routes_synced
            && policy.is_some()
            && !layered.running.shared.ready.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            info!(
                clusters = accepted.len(),
                routes = routes.len(),
                "first config from the control plane is in; ready"
            );
        }
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

/// What the proxy accepted of route tables: name → (version, the table, or `None` when it is
/// not exported to this proxy's namespace).
type Routes = BTreeMap<String, (String, Option<config::RouteTable>)>;

/// Applies a Route response: each table converted on its own; one that fails keeps the version
/// accepted before (if any) and is named in the rejection, the others apply.
async fn apply_routes(
    resp: &pb::DeltaResponse,
    routes: &mut Routes,
    namespace: &str,
    layered: &Layered,
) -> Option<pb::RejectReason> {
    let mut next = routes.clone();
    for name in &resp.removed {
        next.remove(name);
    }
    let mut rejected: Vec<(String, String)> = Vec::new();
    for r in &resp.resources {
        match &r.kind {
            Some(pb::resource::Kind::RouteTable(t)) if t.name == r.name => {
                match convert_route(t, namespace) {
                    Ok(table) => {
                        next.insert(r.name.clone(), (r.version.clone(), table));
                    }
                    Err(ConfigError::Invalid { field, message }) => rejected.push((field, message)),
                    Err(e) => rejected.push((format!("routes[{}]", r.name), e.to_string())),
                }
            }
            _ => rejected
                .push((format!("resources[{}]", r.name), "not a route table named as its resource".into())),
        }
    }
    let tables = next.iter().filter_map(|(n, (_, t))| Some((n.clone(), t.clone()?))).collect();
    match layered.set_routes(tables).await {
        Ok(()) => {
            debug!(tables = next.len(), "route tables applied");
            *routes = next;
        }
        Err(e) => rejected.push(("routes".into(), e.to_string())),
    }
    let (field, message) = rejected.first()?.clone();
    for (field, message) in &rejected {
        warn!(version = %resp.system_version, %field, %message, "route table rejected; the last good one stays");
    }
    let message = if rejected.len() > 1 {
        format!("{message} (and {} more rejected resources)", rejected.len() - 1)
    } else {
        message
    };
    Some(pb::RejectReason { field, message })
}

/// Applies a PeerPolicy response; the rejection, if any.
async fn apply_policy(
    resp: &pb::DeltaResponse,
    policy: &mut Option<(String, InboundPolicy)>,
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
                info!(mode = ?p.mtls.mode, ports = p.mtls.ports.len(), authorization_policies = p.authz.len(), "inbound policy applied");
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
    fn inbound_connections_wait_for_the_first_inbound_policy_only() {
        let mut base = Config::parse_with("{}", true).unwrap();
        base.inbound_pending = true;
        let mut layers = Layers { base, clusters: BTreeMap::new(), routes: BTreeMap::new(), inbound: None };
        assert!(layers.compose().unwrap().inbound_pending, "no policy yet");
        let deny = config::authz::AuthzPolicy {
            name: "shop/deny".into(),
            action: config::authz::AuthzAction::Deny,
            ..Default::default()
        };
        layers.inbound = Some(InboundPolicy {
            mtls: Default::default(),
            authz: vec![deny.clone()],
            jwt: Vec::new(),
            rate_limits: Vec::new(),
            rate_limit_service: None,
            outbound_rate_limits: Vec::new(),
        });
        let c = layers.compose().unwrap();
        assert!(!c.inbound_pending, "the first policy is in");
        assert_eq!(c.authorization, [deny]);
    }

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
}
