//! Discovery: watchers on Services, EndpointSlices, Pods and PeerAuthentications, turned into
//! one stream of [`Change`]s, and what the model keeps of each object.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::{core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt,
    api::DynamicObject,
    runtime::{WatchStreamExt, watcher},
};
use mycel_crds::{
    authorization_policy::AuthorizationPolicy,
    destination_policy::DestinationPolicy,
    gateway::{GRPCRoute, HTTPRoute},
    peer_authentication::PeerAuthentication,
    request_authentication::RequestAuthentication,
    traffic_route::TrafficRoute,
};
use tracing::warn;

use super::snapshot::Key;
use super::translate::destination::Dp;
use super::translate::peer_policy::PeerAuth;
use super::translate::route::Tr;
use super::translate::unimplemented::{KINDS, Watched};

/// One watch event of one kind.
pub enum Change {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Pod(Box<watcher::Event<Pod>>),
    PeerAuth(Box<watcher::Event<PeerAuthentication>>),
    AuthorizationPolicy(Box<watcher::Event<AuthorizationPolicy>>),
    RateLimitPolicy(Box<watcher::Event<mycel_crds::rate_limit_policy::RateLimitPolicy>>),
    RequestAuthentication(Box<watcher::Event<RequestAuthentication>>),
    /// What a fetch of a `jwksUri` found: the key set, or why there is none.
    Jwks {
        uri: String,
        /// The epoch of the following that fetched it (`Fetched::epoch`).
        epoch: u64,
        result: Result<String, String>,
    },
    TrafficRoute(Box<watcher::Event<TrafficRoute>>),
    /// A Gateway API HTTPRoute (mesh routes are those attached to a Service).
    HttpRoute(Box<watcher::Event<HTTPRoute>>),
    /// A Gateway API GRPCRoute.
    GrpcRoute(Box<watcher::Event<GRPCRoute>>),
    DestinationPolicy(Box<watcher::Event<DestinationPolicy>>),
    /// An object of a kind not implemented yet (only its status is written).
    Unimplemented(Arc<Watched>, Box<watcher::Event<DynamicObject>>),
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

/// Every watch the model needs, as one stream.
pub fn watch(client: Client) -> BoxStream<'static, Change> {
    let mut streams = vec![
        events(Api::<Service>::all(client.clone()), |e| Change::Service(Box::new(e))),
        events(Api::<EndpointSlice>::all(client.clone()), |e| Change::Slice(Box::new(e))),
        events(Api::<Pod>::all(client.clone()), |e| Change::Pod(Box::new(e))),
        events(Api::<PeerAuthentication>::all(client.clone()), |e| Change::PeerAuth(Box::new(e))),
        events(Api::<AuthorizationPolicy>::all(client.clone()), |e| Change::AuthorizationPolicy(Box::new(e))),
        events(Api::<mycel_crds::rate_limit_policy::RateLimitPolicy>::all(client.clone()), |e| {
            Change::RateLimitPolicy(Box::new(e))
        }),
        events(Api::<RequestAuthentication>::all(client.clone()), |e| {
            Change::RequestAuthentication(Box::new(e))
        }),
        events(Api::<TrafficRoute>::all(client.clone()), |e| Change::TrafficRoute(Box::new(e))),
        events(Api::<DestinationPolicy>::all(client.clone()), |e| Change::DestinationPolicy(Box::new(e))),
        gateway_route_events(
            client.clone(),
            "httproutes",
            |c| events(Api::<HTTPRoute>::all(c), |e| Change::HttpRoute(Box::new(e))),
            || {
                [
                    Change::HttpRoute(Box::new(watcher::Event::Init)),
                    Change::HttpRoute(Box::new(watcher::Event::InitDone)),
                ]
            },
        ),
        gateway_route_events(
            client.clone(),
            "grpcroutes",
            |c| events(Api::<GRPCRoute>::all(c), |e| Change::GrpcRoute(Box::new(e))),
            || {
                [
                    Change::GrpcRoute(Box::new(watcher::Event::Init)),
                    Change::GrpcRoute(Box::new(watcher::Event::InitDone)),
                ]
            },
        ),
    ];
    for kind in KINDS.iter() {
        let kind = kind.clone();
        let api = Api::<DynamicObject>::all_with(client.clone(), &kind.resource);
        streams.push(dynamic_events(api, kind));
    }
    futures::stream::select_all(streams).boxed()
}

/// Gateway API routes of one kind (`plural`), when the cluster serves them (the Gateway API
/// CRDs are installed apart from Mycel's, and may be missing); else an empty list (`empty`), so
/// that the model syncs. CRDs installed later are seen after a restart of the control plane.
fn gateway_route_events(
    client: Client,
    plural: &'static str,
    watch: fn(Client) -> BoxStream<'static, Change>,
    empty: fn() -> [Change; 2],
) -> BoxStream<'static, Change> {
    let group = format!("{}/v1", mycel_crds::gateway::GROUP);
    futures::stream::once(async move {
        loop {
            match client.list_api_group_resources(&group).await {
                Ok(list) if list.resources.iter().any(|r| r.name == plural) => return watch(client),
                Ok(_) => break,
                Err(kube::Error::Api(s)) if s.code == 404 => break,
                Err(e) => {
                    warn!(error = %e, plural, "cannot tell whether the cluster serves these Gateway API routes; asking again");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        }
        warn!(plural, "the cluster does not serve these Gateway API routes (CRDs not installed): none are applied");
        futures::stream::iter(empty()).boxed()
    })
    .flatten()
    .boxed()
}

/// The watch of a kind known only by its API resource.
fn dynamic_events(api: Api<DynamicObject>, kind: Arc<Watched>) -> BoxStream<'static, Change> {
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |r| {
            let kind = kind.clone();
            async move {
                match r {
                    Ok(e) => Some(Change::Unimplemented(kind, Box::new(e))),
                    Err(e) => {
                        warn!(kind = kind.kind, error = %e, "watch failed; retrying");
                        None
                    }
                }
            }
        })
        .boxed()
}

pub fn key_of<K: ResourceExt>(o: &K) -> Key {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// A watched kind: live objects, plus the list being rebuilt while the watch relists.
pub struct Kind<T> {
    pub live: HashMap<Key, T>,
    relist: Option<HashMap<Key, T>>,
    pub synced: bool,
}

impl<T> Default for Kind<T> {
    fn default() -> Self {
        Kind { live: HashMap::new(), relist: None, synced: false }
    }
}

impl<T: PartialEq> Kind<T> {
    /// Applies one watch event; returns the keys whose kept value changed. An event that changes
    /// nothing the model keeps (a status write, an annotation, a relist of the same objects)
    /// returns none, so it costs no recomputation and no new version.
    pub fn apply<K: ResourceExt>(
        &mut self,
        event: watcher::Event<K>,
        f: impl Fn(K) -> Option<T>,
    ) -> Vec<Key> {
        match event {
            watcher::Event::Apply(o) => {
                let k = key_of(&o);
                let changed = match f(o) {
                    Some(v) if self.live.get(&k) == Some(&v) => false,
                    Some(v) => {
                        self.live.insert(k.clone(), v);
                        true
                    }
                    None => self.live.remove(&k).is_some(),
                };
                if changed { vec![k] } else { vec![] }
            }
            watcher::Event::Delete(o) => {
                let k = key_of(&o);
                if self.live.remove(&k).is_some() { vec![k] } else { vec![] }
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
                // What disappeared, appeared or differs; a relist of the same objects is nothing.
                let gone = old.keys().filter(|k| !self.live.contains_key(*k)).cloned();
                let differ =
                    self.live.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, _)| k.clone());
                gone.chain(differ).collect()
            }
        }
    }
}

/// A Service as the model needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Svc {
    /// Virtual IPs (none for a headless Service).
    pub ips: Vec<String>,
    /// (port name, port) of its TCP ports.
    pub ports: Vec<(String, i32)>,
    /// The `appProtocol` of the ports that have one, by port name.
    pub app_protocols: BTreeMap<String, String>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    pub ready: bool,
    pub pod: Option<Key>,
    pub zone: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    pub service: String,
    /// port name → port number
    pub ports: Vec<(String, i32)>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// What discovery keeps of a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub service_account: String,
    pub sidecar: bool,
    /// Succeeded or Failed: its containers, a proxy included, are gone for good.
    pub finished: bool,
    /// The revision its sidecar was injected for (`MYCEL_REVISION` of its proxy container).
    pub revision: Option<String>,
    pub labels: BTreeMap<String, String>,
}

pub fn service_info(s: Service) -> Option<Svc> {
    let spec = s.spec?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut ips: Vec<String> = spec.cluster_ips.unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip);
    }
    ips.retain(|ip| ip != "None" && !ip.is_empty());
    let tcp: Vec<_> = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .collect();
    let app_protocols = tcp
        .iter()
        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.app_protocol.clone()?)))
        .collect();
    let ports = tcp.into_iter().map(|p| (p.name.unwrap_or_default(), p.port)).collect();
    Some(Svc { ips, ports, app_protocols })
}

pub fn slice_info(s: EndpointSlice) -> Option<Slice> {
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

pub fn pod_info(p: Pod) -> Option<Arc<PodInfo>> {
    let finished = p
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
    let spec = p.spec?;
    let proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == super::inject::PROXY);
    let sidecar = proxy.is_some();
    let revision =
        proxy.and_then(|c| c.env.as_ref()?.iter().find(|e| e.name == "MYCEL_REVISION")?.value.clone());
    Some(Arc::new(PodInfo {
        service_account: spec.service_account_name.unwrap_or_else(|| "default".into()),
        sidecar,
        finished,
        revision,
        labels: p.metadata.labels.unwrap_or_default(),
    }))
}

pub fn peer_auth_info(p: PeerAuthentication) -> Option<PeerAuth> {
    Some(PeerAuth::from_object(p))
}

pub fn traffic_route_info(r: TrafficRoute) -> Option<Tr> {
    let not_implemented = serde_json::to_value(&r)
        .map(|v| super::translate::unimplemented::TRAFFIC_ROUTE.set_by(&v))
        .unwrap_or_default();
    Some(Tr::from_object(r, not_implemented))
}

pub fn destination_policy_info(p: DestinationPolicy) -> Option<Dp> {
    let not_implemented = serde_json::to_value(&p)
        .map(|v| super::translate::unimplemented::DESTINATION_POLICY.set_by(&v))
        .unwrap_or_default();
    Some(Dp::from_object(p, not_implemented))
}
