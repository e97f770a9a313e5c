//! Discovery: one task watches Services, EndpointSlices and Pods, keeps the mesh model in memory
//! and publishes it as an immutable [`Snapshot`] of proxy resources. Changes are debounced and
//! only the services they touch are recomputed; every snapshot records which resources changed,
//! so that streams send deltas without comparing the whole mesh.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::api::{core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use mycel_api::spiffe::SpiffeId;
use mycel_api::v1alpha1 as pb;
use mycel_crds::peer_authentication::{PeerAuthentication, PeerMtlsMode};
use prost::Message;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How many snapshots' change lists are kept, so that a stream a few versions behind gets a
/// delta from the log instead of a comparison of everything.
const CHANGE_LOG: usize = 256;

/// One resource as streams send it.
#[derive(Debug)]
pub struct Entry {
    /// Hash of the encoded resource: equal content gives an equal version, across restarts of
    /// the control plane too, so a proxy that reconnects with nothing changed receives nothing.
    pub version: String,
    pub resource: pb::Resource,
}

/// The mesh as proxies see it, at one version.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub clusters: Arc<HashMap<String, Arc<Entry>>>,
    /// (version, names changed by it), oldest first, consecutive.
    pub log: Arc<VecDeque<(u64, Arc<[String]>)>>,
    /// Whether every watch has listed once (before that the model is incomplete).
    pub synced: bool,
    /// Cluster names in order (full syncs go out in parts, in this order).
    pub sorted: Arc<Vec<String>>,
    /// Pods, for each proxy's own inbound policy.
    pub pods: Arc<HashMap<Key, Arc<PodInfo>>>,
    pub peer_auths: Arc<Vec<PeerAuth>>,
    /// The installation's namespace: its PeerAuthentications without a selector are mesh-wide.
    pub root_namespace: String,
    /// The installation's `spec.mtls.mode`: the mode where no PeerAuthentication sets one.
    pub mesh_mtls: PeerMtlsMode,
}

impl Snapshot {
    /// Names changed after `since` up to this version, or `None` when the log no longer
    /// reaches back that far.
    pub fn changed_since(&self, since: u64) -> Option<HashSet<&str>> {
        if since >= self.version {
            return Some(HashSet::new());
        }
        if !self.log_reaches(since) {
            return None;
        }
        Some(
            self.log
                .iter()
                .filter(|(v, _)| *v > since)
                .flat_map(|(_, names)| names.iter().map(String::as_str))
                .collect(),
        )
    }

    /// Whether the change log still covers every version after `since`.
    pub fn log_reaches(&self, since: u64) -> bool {
        since >= self.version || self.log.front().is_some_and(|(first, _)| *first <= since + 1)
    }
}

/// Knobs of discovery.
#[derive(Clone, Debug)]
pub struct Options {
    pub cluster_domain: String,
    /// The installation's namespace (mesh-wide policies live there).
    pub root_namespace: String,
    pub trust_domain: String,
    /// The installation's `spec.mtls.mode` (mesh-wide default under every PeerAuthentication).
    pub mtls_mode: PeerMtlsMode,
    /// Quiet time that ends a burst of changes.
    pub debounce: Duration,
    /// Longest a change waits while changes keep coming.
    pub debounce_max: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cluster_domain: "cluster.local".into(),
            root_namespace: "mycel-system".into(),
            trust_domain: "cluster.local".into(),
            mtls_mode: PeerMtlsMode::Unset,
            debounce: Duration::from_millis(10),
            debounce_max: Duration::from_millis(100),
        }
    }
}

/// What discovery keeps of a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub service_account: String,
    pub sidecar: bool,
    pub labels: BTreeMap<String, String>,
}

/// A PeerAuthentication, as policy resolution needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerAuth {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: PeerMtlsMode,
    pub ports: BTreeMap<u32, PeerMtlsMode>,
}

/// The inbound policy of one workload: the most specific PeerAuthentication wins (workload
/// selector, then namespace, then mesh-wide in the root namespace); an unset mode inherits.
/// Ties go to the alphabetically first name.
/// With none, the installation's `spec.mtls.mode` (`mesh_default`) applies, else PERMISSIVE.
pub fn peer_policy(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    pas: &[PeerAuth],
    root: &str,
    mesh_default: PeerMtlsMode,
) -> pb::PeerPolicy {
    let pick = |f: &dyn Fn(&PeerAuth) -> bool| pas.iter().filter(|p| f(p)).min_by(|a, b| a.name.cmp(&b.name));
    let workload = pick(&|p| {
        p.namespace == namespace
            && p.selector.as_ref().is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    });
    let ns = pick(&|p| p.namespace == namespace && p.selector.is_none());
    let mesh = pick(&|p| p.namespace == root && p.selector.is_none());
    let to_pb = |m: PeerMtlsMode| match m {
        PeerMtlsMode::Strict => Some(pb::MtlsMode::MtlsStrict),
        PeerMtlsMode::Permissive => Some(pb::MtlsMode::MtlsPermissive),
        PeerMtlsMode::Disable => Some(pb::MtlsMode::MtlsDisable),
        PeerMtlsMode::Unset => None,
    };
    let mode = [workload, ns, mesh]
        .into_iter()
        .flatten()
        .find_map(|p| to_pb(p.mode))
        .or_else(|| to_pb(mesh_default))
        .unwrap_or(pb::MtlsMode::MtlsPermissive);
    let ports = workload
        .map(|w| w.ports.iter().map(|(port, m)| (*port, to_pb(*m).unwrap_or(mode) as i32)).collect())
        .unwrap_or_default();
    pb::PeerPolicy { mode: mode as i32, ports }
}

/// The mode of one port under a policy.
pub fn port_mode(p: &pb::PeerPolicy, port: u32) -> pb::MtlsMode {
    let m = p.ports.get(&port).copied().unwrap_or(p.mode);
    pb::MtlsMode::try_from(m).unwrap_or(pb::MtlsMode::MtlsPermissive)
}

pub type Key = (String, String);

fn key_of<K: ResourceExt>(o: &K) -> Key {
    (o.namespace().unwrap_or_default(), o.name_any())
}

enum Change {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Pod(Box<watcher::Event<Pod>>),
    PeerAuth(Box<watcher::Event<PeerAuthentication>>),
}

/// A watched kind: live objects, plus the list being rebuilt while the watch relists.
struct Kind<T> {
    live: HashMap<Key, T>,
    relist: Option<HashMap<Key, T>>,
    synced: bool,
}

impl<T> Default for Kind<T> {
    fn default() -> Self {
        Kind { live: HashMap::new(), relist: None, synced: false }
    }
}

impl<T> Kind<T> {
    /// Applies one watch event; returns the keys whose object changed (all of them on a relist).
    fn apply<K: ResourceExt>(&mut self, event: watcher::Event<K>, f: impl Fn(K) -> Option<T>) -> Vec<Key> {
        match event {
            watcher::Event::Apply(o) => {
                let k = key_of(&o);
                match f(o) {
                    Some(v) => self.live.insert(k.clone(), v),
                    None => self.live.remove(&k),
                };
                vec![k]
            }
            watcher::Event::Delete(o) => {
                let k = key_of(&o);
                self.live.remove(&k);
                vec![k]
            }
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                vec![]
            }
            watcher::Event::InitApply(o) => {
                let k = key_of(&o);
                if let (Some(r), Some(v)) = (self.relist.as_mut(), f(o)) {
                    r.insert(k, v);
                }
                vec![]
            }
            watcher::Event::InitDone => {
                let new = self.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.live, new);
                self.synced = true;
                old.into_keys().chain(self.live.keys().cloned()).collect()
            }
        }
    }
}

/// A Service as the model needs it.
#[derive(Clone, Debug)]
struct Svc {
    /// Virtual IPs (none for a headless Service).
    ips: Vec<String>,
    /// (port name, port) of its TCP ports.
    ports: Vec<(String, i32)>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug)]
struct SliceEndpoint {
    addresses: Vec<String>,
    ready: bool,
    pod: Option<Key>,
    zone: String,
}

#[derive(Clone, Debug)]
struct Slice {
    service: String,
    /// port name → port number
    ports: Vec<(String, i32)>,
    endpoints: Vec<SliceEndpoint>,
}

/// The state discovery owns; only its task touches it.
struct Model {
    opts: Options,
    services: Kind<Svc>,
    slices: Kind<Slice>,
    pods: Kind<Arc<PodInfo>>,
    peer_auths: Kind<PeerAuth>,
    /// Pods or policies changed since the last snapshot: proxies' inbound policies may have.
    policy_dirty: bool,
    pods_snapshot: Arc<HashMap<Key, Arc<PodInfo>>>,
    peer_auths_snapshot: Arc<Vec<PeerAuth>>,
    /// service key → slices of it
    slices_of: HashMap<Key, HashSet<Key>>,
    /// pod key → services whose endpoints it is
    services_of_pod: HashMap<Key, HashSet<Key>>,
    /// service key → names of the clusters it produced last time
    clusters_of: HashMap<Key, Vec<String>>,
    clusters: Arc<HashMap<String, Arc<Entry>>>,
    sorted: Arc<Vec<String>>,
    log: VecDeque<(u64, Arc<[String]>)>,
    version: u64,
}

fn service_info(s: Service) -> Option<Svc> {
    let spec = s.spec?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut ips: Vec<String> = spec.cluster_ips.unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip);
    }
    ips.retain(|ip| ip != "None" && !ip.is_empty());
    let ports = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| (p.name.unwrap_or_default(), p.port))
        .collect();
    Some(Svc { ips, ports })
}

fn slice_info(s: EndpointSlice) -> Option<Slice> {
    if s.address_type == "FQDN" {
        return None;
    }
    let service = s.metadata.labels.as_ref()?.get("kubernetes.io/service-name")?.clone();
    let ports = s
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| Some((p.name.unwrap_or_default(), p.port?)))
        .collect();
    let endpoints = s
        .endpoints
        .into_iter()
        .map(|e| SliceEndpoint {
            addresses: e.addresses,
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            pod: e
                .target_ref
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .map(|r| (r.namespace.unwrap_or_default(), r.name.unwrap_or_default())),
            zone: e.zone.unwrap_or_default(),
        })
        .collect();
    Some(Slice { service, ports, endpoints })
}

fn pod_info(p: Pod) -> Option<Arc<PodInfo>> {
    let spec = p.spec?;
    let sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == super::inject::PROXY);
    Some(Arc::new(PodInfo {
        service_account: spec.service_account_name.unwrap_or_else(|| "default".into()),
        sidecar,
        labels: p.metadata.labels.unwrap_or_default(),
    }))
}

fn peer_auth_info(p: PeerAuthentication) -> Option<PeerAuth> {
    Some(PeerAuth {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        selector: p.spec.selector.map(|s| s.match_labels),
        mode: p.spec.mtls.map(|m| m.mode).unwrap_or_default(),
        ports: p.spec.port_level_mtls.into_iter().map(|pm| (pm.port as u32, pm.mode)).collect(),
    })
}

/// 64-bit FNV-1a, as hex: stable across processes (unlike `DefaultHasher`).
pub fn content_version(bytes: &[u8]) -> String {
    format!("{:016x}", mycel_api::hash::fnv1a(bytes))
}

impl Model {
    fn new(opts: Options) -> Model {
        Model {
            opts,
            services: Kind::default(),
            slices: Kind::default(),
            pods: Kind::default(),
            peer_auths: Kind::default(),
            policy_dirty: true,
            pods_snapshot: Arc::new(HashMap::new()),
            peer_auths_snapshot: Arc::new(Vec::new()),
            slices_of: HashMap::new(),
            services_of_pod: HashMap::new(),
            clusters_of: HashMap::new(),
            clusters: Arc::new(HashMap::new()),
            sorted: Arc::new(Vec::new()),
            log: VecDeque::new(),
            version: 0,
        }
    }

    fn synced(&self) -> bool {
        self.services.synced && self.slices.synced && self.pods.synced && self.peer_auths.synced
    }

    /// Applies a watch event; returns the services to recompute.
    fn apply(&mut self, change: Change) -> Vec<Key> {
        match change {
            Change::Service(e) => self.services.apply(*e, service_info),
            Change::Slice(e) => {
                let touched = self.slices.apply(*e, slice_info);
                let mut dirty = Vec::new();
                for k in touched {
                    // Where the slice belonged before and belongs now.
                    for (svc, set) in self.slices_of.iter_mut() {
                        if set.remove(&k) {
                            dirty.push(svc.clone());
                        }
                    }
                    if let Some(s) = self.slices.live.get(&k) {
                        let svc = (k.0.clone(), s.service.clone());
                        self.slices_of.entry(svc.clone()).or_default().insert(k.clone());
                        dirty.push(svc);
                    }
                }
                self.slices_of.retain(|_, s| !s.is_empty());
                dirty
            }
            Change::PeerAuth(e) => {
                if self.peer_auths.apply(*e, peer_auth_info).is_empty() {
                    return vec![];
                }
                // Endpoints' mutual TLS depends on their workloads' policies: recompute all.
                self.policy_dirty = true;
                self.services.live.keys().cloned().collect()
            }
            Change::Pod(e) => {
                let touched = self.pods.apply(*e, pod_info);
                self.policy_dirty |= !touched.is_empty();
                let dirty = touched
                    .iter()
                    .filter_map(|k| self.services_of_pod.get(k))
                    .flat_map(|s| s.iter().cloned())
                    .collect();
                for k in &touched {
                    if !self.pods.live.contains_key(k) {
                        self.services_of_pod.remove(k);
                    }
                }
                dirty
            }
        }
    }

    /// The clusters of one Service, by name.
    fn clusters_for(&mut self, svc_key: &Key) -> BTreeMap<String, pb::Resource> {
        let mut out = BTreeMap::new();
        let Some(svc) = self.services.live.get(svc_key) else {
            return out;
        };
        let (ns, name) = svc_key;
        let host = format!("{name}.{ns}.svc.{}", self.opts.cluster_domain);
        let slices: Vec<&Slice> = self
            .slices_of
            .get(svc_key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.live.get(k))
            .collect();
        for (port_name, port) in &svc.ports {
            let mut endpoints: Vec<pb::Endpoint> = Vec::new();
            for slice in &slices {
                let Some((_, target)) = slice.ports.iter().find(|(n, _)| n == port_name) else {
                    continue;
                };
                for e in &slice.endpoints {
                    let pod = e.pod.as_ref().and_then(|k| self.pods.live.get(k).map(|p| (k, p)));
                    if let Some((k, _)) = pod {
                        self.services_of_pod.entry(k.clone()).or_default().insert(svc_key.clone());
                    }
                    let mtls = pod.is_some_and(|((pns, _), p)| {
                        p.sidecar
                            && port_mode(
                                &peer_policy(
                                    pns,
                                    &p.labels,
                                    &self.peer_auths_snapshot,
                                    &self.opts.root_namespace,
                                    self.opts.mtls_mode,
                                ),
                                *target as u32,
                            ) != pb::MtlsMode::MtlsDisable
                    });
                    for a in &e.addresses {
                        let address =
                            if a.contains(':') { format!("[{a}]:{target}") } else { format!("{a}:{target}") };
                        endpoints.push(pb::Endpoint {
                            address,
                            identity: pod
                                .map(|((pns, _), p)| {
                                    SpiffeId::new(&self.opts.trust_domain, pns, &p.service_account)
                                        .to_string()
                                })
                                .unwrap_or_default(),
                            labels: Default::default(),
                            locality: e.zone.clone(),
                            ready: e.ready,
                            mtls,
                        });
                    }
                }
            }
            endpoints.sort_by(|a, b| a.address.cmp(&b.address));
            endpoints.dedup_by(|a, b| a.address == b.address);
            let mesh_tls = !endpoints.is_empty()
                && slices
                    .iter()
                    .flat_map(|s| &s.endpoints)
                    .all(|e| e.pod.as_ref().and_then(|k| self.pods.live.get(k)).is_some_and(|p| p.sidecar));
            let cluster_name = format!("{host}:{port}");
            let addresses = svc
                .ips
                .iter()
                .map(|ip| if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") })
                .collect();
            let cluster = pb::Cluster {
                name: cluster_name.clone(),
                endpoints,
                load_balancer: None,
                connect_timeout_ms: 1000,
                mesh_tls,
                addresses,
            };
            out.insert(
                cluster_name.clone(),
                pb::Resource {
                    name: cluster_name,
                    version: String::new(),
                    kind: Some(pb::resource::Kind::Cluster(cluster)),
                },
            );
        }
        out
    }

    /// Recomputes the given services; returns the names of clusters that changed.
    fn rebuild(&mut self, dirty: HashSet<Key>) -> Vec<String> {
        let mut changed = Vec::new();
        let mut map: Option<HashMap<String, Arc<Entry>>> = None;
        for svc_key in dirty {
            let new = self.clusters_for(&svc_key);
            let old_names = self.clusters_of.remove(&svc_key).unwrap_or_default();
            let map = map.get_or_insert_with(|| (*self.clusters).clone());
            for old in old_names {
                if !new.contains_key(&old) && map.remove(&old).is_some() {
                    changed.push(old);
                }
            }
            if !new.is_empty() {
                self.clusters_of.insert(svc_key.clone(), new.keys().cloned().collect());
            }
            for (name, mut resource) in new {
                let bytes = resource.encode_to_vec();
                let version = content_version(&bytes);
                if map.get(&name).is_some_and(|e| e.version == version) {
                    continue;
                }
                resource.version = version.clone();
                map.insert(name.clone(), Arc::new(Entry { version, resource }));
                changed.push(name);
            }
        }
        if let Some(map) = map {
            let mut names: Vec<String> = map.keys().cloned().collect();
            names.sort();
            self.sorted = Arc::new(names);
            self.clusters = Arc::new(map);
        }
        // Forget pods that no longer back anything.
        self.services_of_pod.retain(|_, s| !s.is_empty());
        changed
    }

    /// Refreshes the pod and policy views streams read, when they changed.
    fn refresh_policy_views(&mut self) -> bool {
        if !self.policy_dirty {
            return false;
        }
        self.policy_dirty = false;
        self.pods_snapshot = Arc::new(self.pods.live.clone());
        let mut pas: Vec<PeerAuth> = self.peer_auths.live.values().cloned().collect();
        pas.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.peer_auths_snapshot = Arc::new(pas);
        true
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: self.version,
            clusters: self.clusters.clone(),
            log: Arc::new(self.log.clone()),
            synced: self.synced(),
            sorted: self.sorted.clone(),
            pods: self.pods_snapshot.clone(),
            peer_auths: self.peer_auths_snapshot.clone(),
            root_namespace: self.opts.root_namespace.clone(),
            mesh_mtls: self.opts.mtls_mode,
        }
    }
}

fn events<K>(api: Api<K>, wrap: fn(watcher::Event<K>) -> Change) -> BoxStream<'static, Change>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |r| async move {
            match r {
                Ok(e) => Some(wrap(e)),
                Err(e) => {
                    warn!(error = %e, "watch failed; retrying");
                    None
                }
            }
        })
        .boxed()
}

/// Starts discovery against the cluster; the receiver always holds the newest snapshot.
pub fn start(client: Client, opts: Options) -> watch::Receiver<Arc<Snapshot>> {
    let changes = futures::stream::select_all([
        events(Api::<Service>::all(client.clone()), |e| Change::Service(Box::new(e))),
        events(Api::<EndpointSlice>::all(client.clone()), |e| Change::Slice(Box::new(e))),
        events(Api::<Pod>::all(client.clone()), |e| Change::Pod(Box::new(e))),
        events(Api::<PeerAuthentication>::all(client), |e| Change::PeerAuth(Box::new(e))),
    ]);
    start_with(changes, opts)
}

/// Discovery fed from any stream of changes (tests and the benchmark feed it directly).
fn start_with(
    changes: impl Stream<Item = Change> + Send + Unpin + 'static,
    opts: Options,
) -> watch::Receiver<Arc<Snapshot>> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(run(changes, Model::new(opts), tx));
    rx
}

async fn run(
    mut changes: impl Stream<Item = Change> + Unpin,
    mut model: Model,
    tx: watch::Sender<Arc<Snapshot>>,
) {
    let mut dirty: HashSet<Key> = HashSet::new();
    let mut first_dirty: Option<Instant> = None;
    let mut last_change = Instant::now();
    // When the last snapshot went out. A change that finds the model quiet for a debounce
    // interval goes out at once (the leading edge); changes that follow within the interval are
    // coalesced as a burst (quiet time, at most `debounce_max`).
    let mut last_publish: Option<Instant> = None;
    let mut was_synced = false;
    loop {
        let deadline = first_dirty.map(|first| {
            if last_publish.is_none_or(|at| first - at >= model.opts.debounce) {
                first
            } else {
                (last_change + model.opts.debounce).min(first + model.opts.debounce_max)
            }
        });
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            change = changes.next() => {
                let Some(change) = change else { return };
                let keys = model.apply(change);
                if !keys.is_empty() || model.policy_dirty {
                    dirty.extend(keys);
                    last_change = Instant::now();
                    first_dirty.get_or_insert(last_change);
                }
                // Publish the first complete model at once.
                if model.synced() && !was_synced {
                    first_dirty = Some(Instant::now() - model.opts.debounce_max);
                }
            }
            _ = sleep => {
                first_dirty = None;
                if !model.synced() {
                    continue;
                }
                let started = Instant::now();
                let services = dirty.len();
                // Policies first: endpoints' mutual TLS is computed from them.
                let policies = model.refresh_policy_views();
                let changed = model.rebuild(std::mem::take(&mut dirty));
                if changed.is_empty() && !policies && was_synced {
                    continue;
                }
                last_publish = Some(Instant::now());
                model.version += 1;
                let version = model.version;
                model.log.push_back((version, changed.clone().into()));
                while model.log.len() > CHANGE_LOG {
                    model.log.pop_front();
                }
                was_synced = true;
                debug!(version, services, clusters = changed.len(), took = ?started.elapsed(), "model rebuilt");
                if version == 1 {
                    info!(clusters = model.clusters.len(), took = ?started.elapsed(), "mesh model complete");
                }
                let _ = tx.send(Arc::new(model.snapshot()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, ip: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(vec![ServicePort { name: Some("http".into()), port: 80, ..Default::default() }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(name: &str, service: &str, ips: &[(&str, bool)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some([("kubernetes.io/service-name".to_string(), service.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..Default::default()
            }]),
            endpoints: ips
                .iter()
                .map(|(ip, ready)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions { ready: Some(*ready), ..Default::default() }),
                    target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(format!("pod-{ip}")),
                        namespace: Some("ns".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn pod(ip: &str, sa: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("pod-{ip}")),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(PodSpec { service_account_name: Some(sa.into()), ..Default::default() }),
            ..Default::default()
        }
    }

    fn synced_model() -> Model {
        let mut m = Model::new(Options::default());
        for c in [
            Change::Service(Box::new(watcher::Event::InitDone)),
            Change::Slice(Box::new(watcher::Event::InitDone)),
            Change::Pod(Box::new(watcher::Event::InitDone)),
            Change::PeerAuth(Box::new(watcher::Event::InitDone)),
        ] {
            m.apply(c);
        }
        m
    }

    fn cluster(m: &Model, name: &str) -> pb::Cluster {
        match m.clusters[name].resource.kind.clone() {
            Some(pb::resource::Kind::Cluster(c)) => c,
            _ => panic!("not a cluster"),
        }
    }

    #[test]
    fn services_slices_and_pods_become_clusters_with_identities() {
        let mut m = synced_model();
        let mut dirty = HashSet::new();
        dirty.extend(m.apply(Change::Pod(Box::new(watcher::Event::Apply(pod("10.0.0.1", "web"))))));
        dirty.extend(m.apply(Change::Service(Box::new(watcher::Event::Apply(svc("web", "10.96.0.9"))))));
        dirty.extend(m.apply(Change::Slice(Box::new(watcher::Event::Apply(slice(
            "web-abc",
            "web",
            &[("10.0.0.1", true), ("10.0.0.2", false)],
        ))))));
        let changed = m.rebuild(dirty);
        assert_eq!(changed, vec!["web.ns.svc.cluster.local:80".to_string()]);
        let c = cluster(&m, "web.ns.svc.cluster.local:80");
        assert_eq!(c.addresses, vec!["10.96.0.9:80"]);
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.endpoints[0].address, "10.0.0.1:8080");
        assert_eq!(c.endpoints[0].identity, "spiffe://cluster.local/ns/ns/sa/web");
        assert!(c.endpoints[0].ready && !c.endpoints[1].ready);
        assert!(!c.mesh_tls);

        // The same content again changes nothing; a pod's new account changes its endpoint.
        let dirty: HashSet<Key> = m
            .apply(Change::Slice(Box::new(watcher::Event::Apply(slice(
                "web-abc",
                "web",
                &[("10.0.0.1", true), ("10.0.0.2", false)],
            )))))
            .into_iter()
            .collect();
        assert!(m.rebuild(dirty).is_empty());
        let dirty: HashSet<Key> = m
            .apply(Change::Pod(Box::new(watcher::Event::Apply(pod("10.0.0.1", "other")))))
            .into_iter()
            .collect();
        assert_eq!(m.rebuild(dirty).len(), 1);
        assert_eq!(
            cluster(&m, "web.ns.svc.cluster.local:80").endpoints[0].identity,
            "spiffe://cluster.local/ns/ns/sa/other"
        );

        // Deleting the Service removes its cluster.
        let dirty: HashSet<Key> = m
            .apply(Change::Service(Box::new(watcher::Event::Delete(svc("web", "10.96.0.9")))))
            .into_iter()
            .collect();
        assert_eq!(m.rebuild(dirty), vec!["web.ns.svc.cluster.local:80".to_string()]);
        assert!(m.clusters.is_empty());
    }

    #[test]
    fn a_relist_drops_what_disappeared_meanwhile() {
        let mut m = synced_model();
        let mut dirty = HashSet::new();
        dirty.extend(m.apply(Change::Service(Box::new(watcher::Event::Apply(svc("a", "10.96.0.1"))))));
        dirty.extend(m.apply(Change::Service(Box::new(watcher::Event::Apply(svc("b", "10.96.0.2"))))));
        m.rebuild(dirty);
        assert_eq!(m.clusters.len(), 2);
        m.apply(Change::Service(Box::new(watcher::Event::Init)));
        m.apply(Change::Service(Box::new(watcher::Event::InitApply(svc("a", "10.96.0.1")))));
        let dirty: HashSet<Key> =
            m.apply(Change::Service(Box::new(watcher::Event::InitDone))).into_iter().collect();
        assert_eq!(m.rebuild(dirty), vec!["b.ns.svc.cluster.local:80".to_string()]);
        assert_eq!(m.clusters.keys().collect::<Vec<_>>(), vec!["a.ns.svc.cluster.local:80"]);
    }

    #[test]
    fn the_most_specific_peer_authentication_wins_and_unset_inherits() {
        let pa = |ns: &str,
                  name: &str,
                  sel: Option<(&str, &str)>,
                  mode: PeerMtlsMode,
                  ports: &[(u32, PeerMtlsMode)]| PeerAuth {
            namespace: ns.into(),
            name: name.into(),
            selector: sel.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
            mode,
            ports: ports.iter().copied().collect(),
        };
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let mode = |pas: &[PeerAuth]| {
            pb::MtlsMode::try_from(
                peer_policy("shop", &labels, pas, "mycel-system", PeerMtlsMode::Unset).mode,
            )
            .unwrap()
        };
        assert_eq!(mode(&[]), pb::MtlsMode::MtlsPermissive, "the default");
        let mesh = pa("mycel-system", "default", None, PeerMtlsMode::Strict, &[]);
        assert_eq!(mode(std::slice::from_ref(&mesh)), pb::MtlsMode::MtlsStrict, "mesh-wide");
        let other_ns = pa("elsewhere", "default", None, PeerMtlsMode::Disable, &[]);
        assert_eq!(mode(&[mesh.clone(), other_ns]), pb::MtlsMode::MtlsStrict, "another namespace's policy");
        let ns = pa("shop", "default", None, PeerMtlsMode::Permissive, &[]);
        assert_eq!(mode(&[mesh.clone(), ns.clone()]), pb::MtlsMode::MtlsPermissive, "namespace over mesh");
        let wl =
            pa("shop", "web", Some(("app", "web")), PeerMtlsMode::Unset, &[(9100, PeerMtlsMode::Disable)]);
        let p =
            peer_policy("shop", &labels, &[mesh.clone(), wl.clone()], "mycel-system", PeerMtlsMode::Unset);
        assert_eq!(port_mode(&p, 8080), pb::MtlsMode::MtlsStrict, "unset inherits from the mesh");
        assert_eq!(port_mode(&p, 9100), pb::MtlsMode::MtlsDisable, "port level");
        let other_app = pa("shop", "api", Some(("app", "api")), PeerMtlsMode::Disable, &[]);
        assert_eq!(mode(&[ns.clone(), other_app]), pb::MtlsMode::MtlsPermissive, "a selector for other pods");
    }

    #[test]
    fn the_installations_mtls_mode_is_the_default_under_every_peer_authentication() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let strict = |pas: &[PeerAuth]| {
            pb::MtlsMode::try_from(
                peer_policy("shop", &labels, pas, "mycel-system", PeerMtlsMode::Strict).mode,
            )
            .unwrap()
        };
        assert_eq!(strict(&[]), pb::MtlsMode::MtlsStrict, "spec.mtls.mode STRICT with no PeerAuthentication");
        let ns = PeerAuth {
            namespace: "shop".into(),
            name: "default".into(),
            selector: None,
            mode: PeerMtlsMode::Permissive,
            ports: Default::default(),
        };
        assert_eq!(
            strict(std::slice::from_ref(&ns)),
            pb::MtlsMode::MtlsPermissive,
            "a PeerAuthentication overrides it"
        );
        let unset = PeerAuth { mode: PeerMtlsMode::Unset, ..ns };
        assert_eq!(strict(&[unset]), pb::MtlsMode::MtlsStrict, "UNSET inherits it");
    }

    #[test]
    fn the_change_log_answers_what_changed_since_a_version() {
        let log: VecDeque<(u64, Arc<[String]>)> =
            [(5, vec!["a".to_string()].into()), (6, vec!["b".to_string()].into())].into();
        let s = Snapshot { version: 6, log: Arc::new(log), ..Default::default() };
        assert_eq!(s.changed_since(6).unwrap().len(), 0);
        assert_eq!(s.changed_since(5).unwrap(), HashSet::from(["b"]));
        assert_eq!(s.changed_since(4).unwrap(), HashSet::from(["a", "b"]));
        assert!(s.changed_since(3).is_none());
    }

    /// Time is paused: it advances only when every task waits, so "at once" is an elapsed
    /// time of zero and a debounce wait is exactly the debounce.
    #[tokio::test(start_paused = true)]
    async fn a_lone_change_goes_out_at_once_and_a_burst_is_coalesced() {
        let debounce = Duration::from_secs(1);
        let opts = Options { debounce, debounce_max: Duration::from_secs(10), ..Options::default() };
        let (tx, changes) = futures::channel::mpsc::unbounded();
        let mut rx = start_with(changes, opts);
        let send = |c: Change| tx.unbounded_send(c).unwrap();
        send(Change::Service(Box::new(watcher::Event::InitDone)));
        send(Change::Slice(Box::new(watcher::Event::InitDone)));
        send(Change::Pod(Box::new(watcher::Event::InitDone)));
        send(Change::PeerAuth(Box::new(watcher::Event::InitDone)));
        rx.changed().await.unwrap();
        assert!(rx.borrow_and_update().synced);

        // After a quiet interval, one change is published without waiting for the debounce.
        tokio::time::sleep(debounce * 5).await;
        let sent = Instant::now();
        send(Change::Service(Box::new(watcher::Event::Apply(svc("a", "10.96.0.1")))));
        rx.changed().await.unwrap();
        assert_eq!(sent.elapsed(), Duration::ZERO, "a lone change waited");
        let version = rx.borrow_and_update().version;

        // Changes right behind it are a burst: one snapshot, a debounce after the last of them.
        for (i, name) in ["b", "c", "d"].into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(debounce / 4).await;
            }
            send(Change::Service(Box::new(watcher::Event::Apply(svc(name, &format!("10.96.0.{}", i + 2))))));
        }
        let last = Instant::now();
        rx.changed().await.unwrap();
        assert_eq!(last.elapsed(), debounce, "the burst was not held for the quiet time");
        let snap = rx.borrow_and_update().clone();
        assert_eq!(snap.version, version + 1, "the burst went out as more than one snapshot");
        let mut names: Vec<_> = snap.changed_since(version).unwrap().into_iter().collect();
        names.sort();
        assert_eq!(
            names,
            ["b.ns.svc.cluster.local:80", "c.ns.svc.cluster.local:80", "d.ns.svc.cluster.local:80"]
        );
    }
}
