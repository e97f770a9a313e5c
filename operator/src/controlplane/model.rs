//! The model: what discovery saw, with indexes and dirty sets, translated into a new
//! [`Snapshot`] when a burst of changes ends. Only what a change touches is translated again: a
//! Service whose slices or pods changed, a pod whose labels or policies changed (and the
//! Services it backs, when its policy changed).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt};
use kube::Client;
use mycel_api::v1alpha1 as pb;
use mycel_crds::peer_authentication::PeerMtlsMode;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use super::discovery::{self, Change, Kind, PodInfo, Slice, Svc};
use super::snapshot::{ChangeLog, Collection, Degraded, Entry, Key, PolicyReach, Scoped, Snapshot};
use super::translate::{
    authn::{self, Fetched, Ra},
    authz::{self, Az},
    cluster::{self, Names, PodView},
    destination::{self, Dp},
    peer_policy::{self, PeerAuth},
    ratelimit::{self, Rl},
    route::{self, Outcome, RouteKey, Tr},
    unimplemented::{self, KINDS, Unimplemented},
};

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
    /// The revision this control plane serves: the status of a mesh-wide object (a
    /// TrafficRoute) counts only the proxies of this revision's sidecars (`None`: all).
    pub revision: Option<String>,
    /// The installation's rate-limit service (`spec.rateLimit`), which counts global limits.
    pub rate_limit_service: Option<pb::RateLimitService>,
    /// The installation's external authorizers (`spec.extensionProviders`) by name, which
    /// AuthorizationPolicies of action CUSTOM name.
    pub ext_authz: BTreeMap<String, pb::ExtAuthzProvider>,
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
            revision: None,
            rate_limit_service: None,
            ext_authz: BTreeMap::new(),
        }
    }
}

impl Options {
    /// The (namespace, name) of the rate-limit service's Service, from the address proxies reach
    /// it at (`<name>.<namespace>.svc:<port>`).
    fn rate_limit_service_key(&self) -> Option<Key> {
        let address = &self.rate_limit_service.as_ref()?.address;
        let mut host = address.rsplit_once(':')?.0.split('.');
        let name = host.next()?;
        let namespace = host.next()?;
        Some((namespace.to_string(), name.to_string()))
    }
}

/// The inbound policy computed for one pod.
struct Policy {
    policy: pb::PeerPolicy,
    /// The PeerAuthentications in force for it.
    decided_by: Vec<Key>,
    /// The AuthorizationPolicies that select it.
    authz_by: Vec<Key>,
    /// The RequestAuthentications that select it.
    authn_by: Vec<Key>,
    /// Issuers a RequestAuthentication of `authn_by` names that an earlier one has: (the later
    /// one, why).
    authn_shadowed: Vec<(Key, String)>,
    /// The RateLimitPolicies whose limits it counts.
    rl_by: Vec<Key>,
    /// Those that select it but are left out for the bound on limits.
    rl_over: Vec<Key>,
    /// The snapshot version that last changed it.
    since: u64,
}

/// A pod's inbound policy and the policies that decide it.
struct Inbound {
    policy: pb::PeerPolicy,
    decided_by: Vec<Key>,
    authz_by: Vec<Key>,
    authn_by: Vec<Key>,
    authn_shadowed: Vec<(Key, String)>,
    rl_by: Vec<Key>,
    rl_over: Vec<Key>,
}

/// The state discovery owns; only its task touches it.
pub(super) struct Model {
    opts: Options,
    services: Kind<Svc>,
    slices: Kind<Slice>,
    pods: Kind<Arc<PodInfo>>,
    peer_auths: Kind<PeerAuth>,
    authz_policies: Kind<Az>,
    /// AuthorizationPolicies changed: their sorted list and the fallbacks are recomputed.
    authz_dirty: bool,
    /// AuthorizationPolicies by (namespace, name).
    authz_sorted: Arc<Vec<Az>>,
    request_auths: Kind<Ra>,
    /// RequestAuthentications (or a key set they fetch) changed.
    authn_dirty: bool,
    /// A fetched key set changed: the fallbacks are recomputed even if no policy did.
    jwks_dirty: bool,
    /// RequestAuthentications by (namespace, name).
    authn_sorted: Arc<Vec<Ra>>,
    /// What was fetched of each `jwksUri` the policies name.
    fetched: HashMap<String, Fetched>,
    /// The `jwksUri`s the policies name, with the timeout of a fetch: the fetcher follows it.
    jwks_wanted: watch::Sender<BTreeMap<String, (Duration, u64)>>,
    /// The epoch of the latest URI followed ([`Fetched::epoch`]).
    jwks_epoch: u64,
    rate_limits: Kind<Rl>,
    /// RateLimitPolicies changed.
    rl_dirty: bool,
    /// RateLimitPolicies by (namespace, name).
    rl_sorted: Arc<Vec<Rl>>,
    traffic_routes: Kind<Tr>,
    /// Gateway API HTTPRoutes attached to a Service (GAMMA), as routes of the same model.
    http_routes: Kind<Tr>,
    /// GRPCRoutes attached to a Service, likewise.
    grpc_routes: Kind<Tr>,
    destination_policies: Kind<Dp>,
    /// A DestinationPolicy or a Service changed: which policy each Service gets is decided again.
    destinations_dirty: bool,
    destinations: Destinations,
    /// A TrafficRoute or a Service changed: every route is translated again (conflicts and
    /// host resolution are decided over all of them).
    routes_dirty: bool,
    /// Objects of kinds not implemented yet, by kind.
    unimplemented: BTreeMap<&'static str, Kind<Unimplemented>>,
    /// One of those changed: statuses are recomputed.
    unimplemented_dirty: bool,
    /// The rate-limit service's endpoints changed: the statuses of global limits are recomputed.
    rl_service_dirty: bool,
    // Dirty sets, emptied by `rebuild`.
    dirty_services: HashSet<Key>,
    dirty_pods: HashSet<Key>,
    /// PeerAuthentications changed: their sorted list and the fallbacks are recomputed.
    peer_auths_dirty: bool,
    // Indexes.
    /// service key → slices of it
    slices_of: HashMap<Key, HashSet<Key>>,
    /// pod key → services whose endpoints it is
    services_of_pod: HashMap<Key, HashSet<Key>>,
    /// service key → names of the clusters it produced last time
    clusters_of: HashMap<Key, Vec<String>>,
    /// PeerAuthentications by (namespace, name).
    peer_auths_sorted: Arc<Vec<PeerAuth>>,
    // Translated.
    clusters: Arc<HashMap<String, Arc<Entry>>>,
    sorted: Arc<Vec<String>>,
    log: ChangeLog,
    policies: HashMap<Key, Policy>,
    policy_collections: Arc<HashMap<Key, Arc<Collection>>>,
    policy_by_namespace: Arc<HashMap<String, Arc<Collection>>>,
    policy_default: Arc<Collection>,
    routes: Routes,
    statuses: Arc<Vec<PolicyReach>>,
    version: u64,
}

/// Which DestinationPolicy each Service gets.
#[derive(Default)]
struct Destinations {
    /// Service → the spec of the policy it gets.
    applied: HashMap<Key, mycel_crds::destination_policy::DestinationPolicySpec>,
    /// Per DestinationPolicy: what it became, and the version that last changed what it does.
    outcomes: HashMap<Key, (destination::Outcome, u64)>,
}

/// The route tables translated from TrafficRoutes.
#[derive(Default)]
struct Routes {
    entries: Arc<HashMap<String, Arc<Entry>>>,
    sorted: Arc<Vec<String>>,
    log: ChangeLog,
    /// Per route: what it became, and the version that last changed its tables.
    outcomes: HashMap<RouteKey, (Outcome, u64)>,
}

/// A collection of one resource.
fn single(resource: pb::Resource) -> Arc<Collection> {
    let e = Entry::new(resource);
    Arc::new(Collection::of(HashMap::from([(e.resource.name.clone(), Arc::new(e))])))
}

impl Model {
    pub(super) fn new(opts: Options) -> Model {
        Model {
            opts,
            services: Kind::default(),
            slices: Kind::default(),
            pods: Kind::default(),
            peer_auths: Kind::default(),
            authz_policies: Kind::default(),
            authz_dirty: true,
            authz_sorted: Arc::new(Vec::new()),
            request_auths: Kind::default(),
            authn_dirty: true,
            jwks_dirty: false,
            authn_sorted: Arc::new(Vec::new()),
            fetched: HashMap::new(),
            jwks_wanted: watch::Sender::new(BTreeMap::new()),
            jwks_epoch: 0,
            rate_limits: Kind::default(),
            rl_dirty: true,
            rl_sorted: Arc::new(Vec::new()),
            traffic_routes: Kind::default(),
            http_routes: Kind::default(),
            grpc_routes: Kind::default(),
            destination_policies: Kind::default(),
            destinations_dirty: true,
            destinations: Destinations::default(),
            routes_dirty: true,
            unimplemented: KINDS.iter().map(|k| (k.kind, Kind::default())).collect(),
            unimplemented_dirty: false,
            dirty_services: HashSet::new(),
            dirty_pods: HashSet::new(),
            peer_auths_dirty: true,
            slices_of: HashMap::new(),
            services_of_pod: HashMap::new(),
            clusters_of: HashMap::new(),
            peer_auths_sorted: Arc::new(Vec::new()),
            clusters: Arc::new(HashMap::new()),
            sorted: Arc::new(Vec::new()),
            log: ChangeLog::default(),
            policies: HashMap::new(),
            policy_collections: Arc::new(HashMap::new()),
            policy_by_namespace: Arc::new(HashMap::new()),
            policy_default: Arc::new(Collection::default()),
            routes: Routes::default(),
            statuses: Arc::new(Vec::new()),
            version: 0,
            rl_service_dirty: false,
        }
    }

    fn synced(&self) -> bool {
        self.services.synced
            && self.slices.synced
            && self.pods.synced
            && self.peer_auths.synced
            && self.authz_policies.synced
            && self.request_auths.synced
            && self.rate_limits.synced
            // Before the first snapshot, every key set has been tried once (a fetch is bounded
            // in time): a restarted control plane does not send rules without their keys.
            && (self.version > 0 || self.fetched.values().all(|f| f.keys.is_some() || f.error.is_some()))
            && self.traffic_routes.synced
            && self.http_routes.synced
            && self.grpc_routes.synced
            && self.destination_policies.synced
            && self.unimplemented.values().all(|k| k.synced)
    }

    fn dirty(&self) -> bool {
        !self.dirty_services.is_empty()
            || !self.dirty_pods.is_empty()
            || self.peer_auths_dirty
            || self.authz_dirty
            || self.authn_dirty
            || self.rl_dirty
            || self.routes_dirty
            || self.destinations_dirty
            || self.unimplemented_dirty
    }

    /// Applies a watch event to the indexes and dirty sets; says whether anything became dirty.
    fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Service(e) => {
                let touched = self.services.apply(*e, discovery::service_info);
                self.routes_dirty |= !touched.is_empty();
                self.destinations_dirty |= !touched.is_empty();
                self.dirty_services.extend(touched);
            }
            Change::TrafficRoute(e) => {
                let touched = self.traffic_routes.apply(*e, discovery::traffic_route_info);
                self.routes_dirty |= !touched.is_empty();
            }
            Change::HttpRoute(e) => {
                let touched = self.http_routes.apply(*e, super::translate::gamma::from_http_route);
                self.routes_dirty |= !touched.is_empty();
            }
            Change::GrpcRoute(e) => {
                let touched = self.grpc_routes.apply(*e, super::translate::gamma::from_grpc_route);
                self.routes_dirty |= !touched.is_empty();
            }
            Change::DestinationPolicy(e) => {
                let touched = self.destination_policies.apply(*e, discovery::destination_policy_info);
                self.destinations_dirty |= !touched.is_empty();
            }
            Change::Slice(e) => {
                let touched = self.slices.apply(*e, discovery::slice_info);
                for k in touched {
                    // Where the slice belonged before and belongs now.
                    for (svc, set) in self.slices_of.iter_mut() {
                        if set.remove(&k) {
                            self.dirty_services.insert(svc.clone());
                        }
                    }
                    if let Some(s) = self.slices.live.get(&k) {
                        let svc = (k.0.clone(), s.service.clone());
                        self.slices_of.entry(svc.clone()).or_default().insert(k.clone());
                        self.dirty_services.insert(svc);
                    }
                }
                self.slices_of.retain(|_, s| !s.is_empty());
                if self.opts.rate_limit_service_key().is_some_and(|k| self.dirty_services.contains(&k)) {
                    self.rl_service_dirty = true;
                }
            }
            Change::PeerAuth(e) => {
                let touched = self.peer_auths.apply(*e, discovery::peer_auth_info);
                if touched.is_empty() {
                    return self.dirty();
                }
                self.peer_auths_dirty = true;
                self.pods_reached(&touched);
            }
            Change::AuthorizationPolicy(e) => {
                let touched =
                    self.authz_policies.apply(*e, |p| Some(Az::from_object(p, &self.opts.ext_authz)));
                if touched.is_empty() {
                    return self.dirty();
                }
                self.authz_dirty = true;
                self.pods_reached(&touched);
            }
            Change::RateLimitPolicy(e) => {
                let touched = self
                    .rate_limits
                    .apply(*e, |p| Some(Rl::from_object(p, self.opts.rate_limit_service.is_some())));
                if touched.is_empty() {
                    return self.dirty();
                }
                self.rl_dirty = true;
                self.pods_reached(&touched);
            }
            Change::RequestAuthentication(e) => {
                let domain = self.opts.cluster_domain.clone();
                let touched = self.request_auths.apply(*e, |p| Some(Ra::from_object(p, &domain)));
                if touched.is_empty() {
                    return self.dirty();
                }
                self.follow_uris();
                self.authn_dirty = true;
                self.pods_reached(&touched);
            }
            Change::Jwks { uri, epoch, result } => {
                let Some(f) = self.fetched.get_mut(&uri).filter(|f| f.epoch == epoch) else {
                    return self.dirty();
                };
                let before = f.clone();
                match result {
                    Ok(keys) => *f = Fetched { keys: Some(keys), error: None, epoch },
                    Err(e) => f.error = Some(e),
                }
                if *f == before {
                    return self.dirty();
                }
                let touched: Vec<Key> = self
                    .request_auths
                    .live
                    .iter()
                    .filter(|(_, ra)| ra.rules.iter().any(|r| r.uri.as_deref() == Some(uri.as_str())))
                    .map(|(k, _)| k.clone())
                    .collect();
                self.authn_dirty = true;
                self.jwks_dirty = true;
                self.pods_reached(&touched);
            }
            Change::Unimplemented(kind, e) => {
                let objects = self.unimplemented.entry(kind.kind).or_default();
                let touched = objects.apply(*e, |o| {
                    serde_json::to_value(&o).ok().map(|v| unimplemented::translate(&kind, &v))
                });
                self.unimplemented_dirty |= !touched.is_empty();
            }
            Change::Pod(e) => {
                let touched = self.pods.apply(*e, discovery::pod_info);
                for k in &touched {
                    // Its account or sidecar may have changed: the Services it backs.
                    if let Some(s) = self.services_of_pod.get(k) {
                        self.dirty_services.extend(s.iter().cloned());
                    }
                }
                self.dirty_pods.extend(touched);
            }
        }
        self.dirty()
    }

    /// Which key sets to fetch, after a RequestAuthentication changed: a URI named for the first
    /// time (or again) starts unfetched in a new epoch; one no policy names is forgotten; one
    /// over its namespace's quota is not fetched, and says so.
    fn follow_uris(&mut self) {
        let mut ras: Vec<&Ra> = self.request_auths.live.values().collect();
        ras.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let (want, over) = authn::uris(&ras);
        self.fetched.retain(|u, f| want.contains_key(u) || (over.contains(u) && f.epoch == 0));
        for u in want.keys() {
            if self.fetched.get(u).is_none_or(|f| f.epoch == 0) {
                self.jwks_epoch += 1;
                let f = Fetched { epoch: self.jwks_epoch, ..Default::default() };
                self.fetched.insert(u.clone(), f);
            }
        }
        for u in over {
            let error = format!(
                "the namespace's policies name more than {} distinct jwksUris: this one is not fetched",
                authn::MAX_URIS_PER_NAMESPACE
            );
            self.fetched.insert(u, Fetched { keys: None, error: Some(error), epoch: 0 });
        }
        let wanted: BTreeMap<String, (Duration, u64)> =
            want.into_iter().map(|(u, t)| (u.clone(), (t, self.fetched[&u].epoch))).collect();
        self.jwks_wanted.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted;
            changed
        });
    }

    /// The pods inbound policies of `touched` can reach become dirty: their namespaces', or
    /// every pod for the root namespace's.
    fn pods_reached(&mut self, touched: &[Key]) {
        let root = &self.opts.root_namespace;
        let namespaces: HashSet<&String> = touched.iter().map(|(ns, _)| ns).collect();
        let all = namespaces.contains(root);
        let pods = self.pods.live.keys().filter(|(ns, _)| all || namespaces.contains(ns)).cloned();
        self.dirty_pods.extend(pods);
    }

    /// The inbound policy of a pod of `namespace` with `labels`, with the policies that decide it.
    fn policy_of(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Inbound {
        let pas = &self.peer_auths_sorted;
        let root = &self.opts.root_namespace;
        let mut policy = peer_policy::peer_policy(namespace, labels, pas, root, self.opts.mtls_mode);
        let decided_by = peer_policy::in_force(namespace, labels, pas, root)
            .into_iter()
            .flatten()
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        let azs = authz::for_workload(namespace, labels, &self.authz_sorted, root);
        policy.authz = azs.iter().map(|a| a.policy.clone()).collect();
        let authz_by = azs.iter().map(|a| (a.namespace.clone(), a.name.clone())).collect();
        let mut ras: Vec<&Ra> =
            self.authn_sorted.iter().filter(|r| r.applies(namespace, labels, root)).collect();
        // The root namespace's rules first: a namespace cannot redefine the mesh's issuers.
        ras.sort_by_key(|r| r.namespace != *root);
        let (jwt, shadowed) = authn::merge(&ras, &self.fetched);
        policy.jwt = jwt;
        let authn_by = ras.iter().map(|r| (r.namespace.clone(), r.name.clone())).collect();
        let authn_shadowed = shadowed
            .into_iter()
            .map(|(loser, issuer, why)| {
                let why = match why {
                    authn::Left::Shadowed(winner) => format!(
                        "issuer {issuer}: RequestAuthentication {}/{} also names it and comes first (by namespace and name), so its rule verifies the tokens",
                        winner.namespace, winner.name
                    ),
                    authn::Left::OverLimit => format!(
                        "issuer {issuer}: a workload it selects has {} JWT rules or {} KiB of keys from the policies before it, so this rule is left out there and the issuer's tokens are refused",
                        authn::MAX_RULES_PER_WORKLOAD,
                        authn::MAX_KEY_BYTES_PER_WORKLOAD / 1024
                    ),
                };
                ((loser.namespace.clone(), loser.name.clone()), why)
            })
            .collect();
        let (limits, mut by, mut over) =
            ratelimit::for_workload(namespace, labels, &self.rl_sorted, root, false);
        let (outbound, out_by, out_over) =
            ratelimit::for_workload(namespace, labels, &self.rl_sorted, root, true);
        by.extend(out_by);
        over.extend(out_over);
        // The service only where a limit needs it.
        policy.rate_limit_service = if limits.iter().chain(&outbound).any(|l| l.global) {
            self.opts.rate_limit_service.clone()
        } else {
            None
        };
        policy.rate_limits = limits;
        policy.outbound_rate_limits = outbound;
        let key = |r: &&Rl| (r.namespace.clone(), r.name.clone());
        let rl_by = by.iter().map(key).collect();
        let rl_over = over.iter().map(key).collect();
        Inbound { policy, decided_by, authz_by, authn_by, authn_shadowed, rl_by, rl_over }
    }

    /// What a proxy of `namespace` whose pod is not known yet receives.
    fn fallback_policy(&self, namespace: &str) -> Arc<Collection> {
        let root = &self.opts.root_namespace;
        let empty = BTreeMap::new();
        let mut policy = self.policy_of(namespace, &empty).policy;
        policy.authz = authz::for_unknown_workload(namespace, &self.authz_sorted, root);
        // Its JWT rules are those of the policies without a selector (a selector names at least
        // one label, so none selects a pod without labels); which others apply is known with the
        // pod, and until it is, such a proxy accepts nothing (as for an AuthorizationPolicy).
        if (self.authn_sorted.iter().any(|r| r.may_select_in(namespace, root))
            || self.rl_sorted.iter().any(|r| r.may_select_in(namespace, root)))
            && !policy.authz.iter().any(|a| a.name == authz::NOT_KNOWN_YET)
        {
            policy.authz.push(authz::not_known_yet());
        }
        single(peer_policy::resource(policy))
    }

    /// Recomputes the dirty pods' policies; returns whether any changed. The Services a pod
    /// with a changed policy backs become dirty (their endpoints' mTLS follows it).
    fn rebuild_policies(&mut self, version: u64) -> bool {
        let mut changed = false;
        let pas_dirty = std::mem::take(&mut self.peer_auths_dirty);
        let azs_dirty = std::mem::take(&mut self.authz_dirty);
        let ras_dirty = std::mem::take(&mut self.authn_dirty);
        let keys_dirty = std::mem::take(&mut self.jwks_dirty);
        let rls_dirty = std::mem::take(&mut self.rl_dirty);
        if pas_dirty || azs_dirty || ras_dirty || rls_dirty {
            let mut pas: Vec<PeerAuth> = self.peer_auths.live.values().cloned().collect();
            pas.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            let mut azs: Vec<Az> = self.authz_policies.live.values().cloned().collect();
            azs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            let mut ras: Vec<Ra> = self.request_auths.live.values().cloned().collect();
            ras.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            let mut rls: Vec<Rl> = self.rate_limits.live.values().cloned().collect();
            rls.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            // The fallbacks only when the policies differ from those they were computed from
            // (and the first time).
            if self.policy_default.entries.is_empty()
                || *self.peer_auths_sorted != pas
                || *self.authz_sorted != azs
                || *self.authn_sorted != ras
                || *self.rl_sorted != rls
                || keys_dirty
            {
                self.peer_auths_sorted = Arc::new(pas);
                self.authz_sorted = Arc::new(azs);
                self.authn_sorted = Arc::new(ras);
                self.rl_sorted = Arc::new(rls);
                let namespaces: HashSet<String> = self
                    .peer_auths_sorted
                    .iter()
                    .map(|p| p.namespace.clone())
                    .chain(self.authz_sorted.iter().map(|a| a.namespace.clone()))
                    .chain(self.authn_sorted.iter().map(|a| a.namespace.clone()))
                    .chain(self.rl_sorted.iter().map(|a| a.namespace.clone()))
                    .collect();
                self.policy_by_namespace = Arc::new(
                    namespaces.into_iter().map(|ns| (ns.clone(), self.fallback_policy(&ns))).collect(),
                );
                // A namespace without a policy of its own sees the mesh's.
                self.policy_default = self.fallback_policy("");
                changed = true;
            }
        }
        for pod in std::mem::take(&mut self.dirty_pods) {
            let Some(info) = self.pods.live.get(&pod).cloned() else {
                if self.policies.remove(&pod).is_some() {
                    Arc::make_mut(&mut self.policy_collections).remove(&pod);
                    changed = true;
                }
                self.services_of_pod.remove(&pod);
                continue;
            };
            let Inbound { policy, mut decided_by, authz_by, authn_by, authn_shadowed, rl_by, rl_over } =
                self.policy_of(&pod.0, &info.labels);
            // In the root namespace, the namespace's and the mesh's policy are the same one.
            decided_by.dedup();
            match self.policies.get_mut(&pod) {
                Some(p) if p.policy == policy => {
                    if p.decided_by != decided_by
                        || p.authz_by != authz_by
                        || p.authn_by != authn_by
                        || p.authn_shadowed != authn_shadowed
                        || p.rl_by != rl_by
                        || p.rl_over != rl_over
                    {
                        p.decided_by = decided_by;
                        p.authz_by = authz_by;
                        p.authn_by = authn_by;
                        p.authn_shadowed = authn_shadowed;
                        p.rl_by = rl_by;
                        p.rl_over = rl_over;
                        changed = true;
                    }
                }
                old => {
                    // Endpoints' mutual TLS follows the mode, not the authorization policies.
                    let mtls_changed =
                        old.is_none_or(|p| p.policy.mode != policy.mode || p.policy.ports != policy.ports);
                    let collection = single(peer_policy::resource(policy.clone()));
                    Arc::make_mut(&mut self.policy_collections).insert(pod.clone(), collection);
                    let p = Policy {
                        policy,
                        decided_by,
                        authz_by,
                        authn_by,
                        authn_shadowed,
                        rl_by,
                        rl_over,
                        since: version,
                    };
                    self.policies.insert(pod.clone(), p);
                    if mtls_changed && let Some(s) = self.services_of_pod.get(&pod) {
                        self.dirty_services.extend(s.iter().cloned());
                    }
                    changed = true;
                }
            }
        }
        changed
    }

    /// Decides again which policy each Service gets, when a policy or a Service changed; the
    /// Services whose policy changed are translated again, and the routes (their subsets).
    fn rebuild_destinations(&mut self, version: u64) {
        if !std::mem::take(&mut self.destinations_dirty) {
            return;
        }
        let dps: Vec<&Dp> = self.destination_policies.live.values().collect();
        let exists = |k: &Key| self.services.live.contains_key(k);
        let (winners, outcomes) =
            destination::decide(&dps, &exists, &self.opts.cluster_domain, &self.opts.root_namespace);
        let applied: HashMap<Key, _> = winners
            .into_iter()
            .filter_map(|(svc, dp)| Some((svc, self.destination_policies.live.get(&dp)?.spec.clone())))
            .collect();
        let old = std::mem::take(&mut self.destinations.applied);
        let mut changed = HashSet::new();
        for svc in old.keys().chain(applied.keys()) {
            if old.get(svc) != applied.get(svc) {
                changed.insert(svc.clone());
            }
        }
        self.routes_dirty |= !changed.is_empty();
        // A policy's proxies must hold the version that last changed what it does.
        let outcomes = outcomes
            .into_iter()
            .map(|(k, o)| {
                let since = match self.destinations.outcomes.get(&k) {
                    Some((p, since))
                        if *p == o && !o.service.as_ref().is_some_and(|s| changed.contains(s)) =>
                    {
                        *since
                    }
                    _ => version,
                };
                (k, (o, since))
            })
            .collect();
        self.dirty_services.extend(changed);
        self.destinations.applied = applied;
        self.destinations.outcomes = outcomes;
    }

    /// Translates the dirty Services; returns the names of clusters that changed.
    fn rebuild_clusters(&mut self) -> Vec<String> {
        let mut changed = Vec::new();
        let mut map: Option<HashMap<String, Arc<Entry>>> = None;
        let names =
            Names { cluster_domain: &self.opts.cluster_domain, trust_domain: &self.opts.trust_domain };
        for svc_key in std::mem::take(&mut self.dirty_services) {
            let translated = match self.services.live.get(&svc_key) {
                Some(svc) => {
                    let slices: Vec<&Slice> = self
                        .slices_of
                        .get(&svc_key)
                        .into_iter()
                        .flatten()
                        .filter_map(|k| self.slices.live.get(k))
                        .collect();
                    let pod = |k: &Key| {
                        let info = self.pods.live.get(k)?;
                        let policy = &self.policies.get(k)?.policy;
                        Some(PodView { info, policy })
                    };
                    let policy = self.destinations.applied.get(&svc_key);
                    Some(cluster::clusters(&svc_key, svc, &slices, pod, &names, policy))
                }
                None => None,
            };
            let (new, pods) = translated.map(|t| (t.clusters, t.pods)).unwrap_or_default();
            for p in pods {
                self.services_of_pod.entry(p).or_default().insert(svc_key.clone());
            }
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
            for (name, resource) in new {
                let entry = Entry::new(resource);
                if map.get(&name).is_some_and(|e| e.version == entry.version) {
                    continue;
                }
                map.insert(name.clone(), Arc::new(entry));
                changed.push(name);
            }
        }
        // A subset cluster that gained its first ready endpoint or lost its last: the status of
        // a route sending to it says which.
        if let Some(map) = &map {
            let ready = |m: &HashMap<String, Arc<Entry>>, n: &String| {
                m.get(n).is_some_and(|e| match &e.resource.kind {
                    Some(pb::resource::Kind::Cluster(c)) => c.endpoints.iter().any(|e| e.ready),
                    _ => false,
                })
            };
            if changed.iter().any(|n| n.contains('/') && ready(map, n) != ready(&self.clusters, n)) {
                self.routes_dirty = true;
            }
        }
        if let Some(map) = map {
            let mut names: Vec<String> = map.keys().cloned().collect();
            names.sort();
            self.sorted = Arc::new(names);
            self.clusters = Arc::new(map);
        }
        changed
    }

    /// Translates every TrafficRoute again when one or a Service changed; returns the names of
    /// route tables that changed.
    fn rebuild_routes(&mut self, version: u64) -> Vec<String> {
        if !std::mem::take(&mut self.routes_dirty) {
            return Vec::new();
        }
        let trs: Vec<&Tr> = self
            .traffic_routes
            .live
            .values()
            .chain(self.http_routes.live.values())
            .chain(self.grpc_routes.live.values())
            .collect();
        let services = |k: &Key| self.services.live.get(k).cloned();
        let subset = |k: &Key, cluster: &str, subset: &str| {
            if !self.destinations.applied.get(k).is_some_and(|p| destination::has_subset(p, subset)) {
                return route::Subset::Undefined;
            }
            let ready = self.clusters.get(cluster).is_some_and(|e| match &e.resource.kind {
                Some(pb::resource::Kind::Cluster(c)) => c.endpoints.iter().any(|e| e.ready),
                _ => false,
            });
            if ready { route::Subset::Ready } else { route::Subset::Empty }
        };
        let outcomes = route::translate(&trs, &services, &subset, &self.opts.cluster_domain);
        let mut entries: HashMap<String, Arc<Entry>> = HashMap::new();
        for o in outcomes.values() {
            for (name, t) in &o.tables {
                let e = Entry::new(route::resource(t.clone()));
                let e = match self.routes.entries.get(name) {
                    Some(old) if old.version == e.version => old.clone(),
                    _ => Arc::new(e),
                };
                entries.insert(name.clone(), e);
            }
        }
        let mut changed: Vec<String> = entries
            .iter()
            .filter(|(n, e)| self.routes.entries.get(*n).is_none_or(|o| !Arc::ptr_eq(o, e)))
            .map(|(n, _)| n.clone())
            .collect();
        changed.extend(self.routes.entries.keys().filter(|n| !entries.contains_key(*n)).cloned());
        changed.sort();
        let outcomes = outcomes
            .into_iter()
            .map(|(k, o)| {
                let since = match self.routes.outcomes.get(&k) {
                    Some((p, since)) if p.tables == o.tables => *since,
                    _ => version,
                };
                (k, (o, since))
            })
            .collect();
        self.routes.outcomes = outcomes;
        if !changed.is_empty() {
            let mut sorted: Vec<String> = entries.keys().cloned().collect();
            sorted.sort();
            self.routes.sorted = Arc::new(sorted);
            self.routes.entries = Arc::new(entries);
        }
        changed
    }

    /// Translates everything dirty into the next version; `None` when nothing a proxy or a
    /// policy's status sees changed.
    fn rebuild(&mut self, first: bool) -> Option<Vec<String>> {
        let version = self.version + 1;
        let pods_or_policies = !self.dirty_pods.is_empty()
            || self.peer_auths_dirty
            || self.authz_dirty
            || self.authn_dirty
            || self.rl_dirty
            || self.routes_dirty
            || self.destinations_dirty
            || std::mem::take(&mut self.unimplemented_dirty)
            || std::mem::take(&mut self.rl_service_dirty);
        // Policies first: endpoints' mutual TLS is computed from them.
        let policies = self.rebuild_policies(version);
        self.rebuild_destinations(version);
        let changed = self.rebuild_clusters();
        // Clusters may have made the routes dirty (a subset's first or last ready endpoint).
        let pods_or_policies = pods_or_policies || self.routes_dirty;
        let routes = self.rebuild_routes(version);
        // What policies reach changes with pods too (one starts, one finishes).
        let statuses = pods_or_policies.then(|| self.policy_statuses()).filter(|s| *s != *self.statuses);
        if changed.is_empty() && !policies && routes.is_empty() && statuses.is_none() && !first {
            return None;
        }
        self.version = version;
        self.log.push(version, changed.clone().into());
        self.routes.log.push(version, routes.into());
        if let Some(s) = statuses {
            self.statuses = Arc::new(s);
        }
        Some(changed)
    }

    /// A reach for each object of a kind that decides inbound policies — (key, generation,
    /// invalid values) — with the pods whose policy it decides (`decides`) and the version
    /// each pod's proxy must hold.
    fn inbound_reaches(
        &self,
        kind: &'static str,
        objects: impl Iterator<Item = (Key, i64, Vec<String>)>,
        decides: fn(&Policy) -> &[Key],
    ) -> Vec<PolicyReach> {
        let mut by: BTreeMap<Key, PolicyReach> = objects
            .map(|(key, generation, invalid)| {
                let reach = PolicyReach {
                    kind,
                    key: key.clone(),
                    generation,
                    type_url: mycel_api::PEER_POLICY_TYPE,
                    workloads: Vec::new(),
                    without_proxy: 0,
                    revisions: Vec::new(),
                    not_implemented: Vec::new(),
                    any_implemented: true,
                    conflicts: Vec::new(),
                    unresolved: Vec::new(),
                    invalid,
                    not_in_effect: None,
                    parents: Vec::new(),
                    notes: Vec::new(),
                    degraded: None,
                };
                (key, reach)
            })
            .collect();
        for (pod, p) in &self.policies {
            let Some(info) = self.pods.live.get(pod).filter(|i| !i.finished) else { continue };
            for k in decides(p) {
                if let Some(s) = by.get_mut(k) {
                    if info.sidecar {
                        s.workloads.push((pod.clone(), p.since));
                        s.revisions.extend(info.revision.clone());
                    } else {
                        s.without_proxy += 1;
                    }
                }
            }
        }
        let mut v: Vec<PolicyReach> = by.into_values().collect();
        for s in &mut v {
            s.workloads.sort();
            s.revisions.sort();
            s.revisions.dedup();
        }
        v
    }

    /// For each AuthorizationPolicy, the workloads it selects and the version each needs.
    fn authz_statuses(&self) -> Vec<PolicyReach> {
        let objects = self
            .authz_sorted
            .iter()
            .map(|a| ((a.namespace.clone(), a.name.clone()), a.generation, a.invalid.clone()));
        let mut v = self.inbound_reaches("AuthorizationPolicy", objects, |p| &p.authz_by);
        // Both in (namespace, name) order, one reach per policy.
        for (s, az) in v.iter_mut().zip(self.authz_sorted.iter()) {
            self.selects_nothing(s, az.selector.as_ref());
            s.notes = az.notes.clone();
            s.unresolved = az.unresolved.clone();
        }
        v
    }

    /// For each RequestAuthentication, the workloads it selects and the version each needs;
    /// the key sets not fetched, and the issuers another policy has.
    fn authn_statuses(&self) -> Vec<PolicyReach> {
        let objects = self
            .authn_sorted
            .iter()
            .map(|a| ((a.namespace.clone(), a.name.clone()), a.generation, a.invalid.clone()));
        let mut v = self.inbound_reaches("RequestAuthentication", objects, |p| &p.authn_by);
        let mut shadowed: BTreeMap<&Key, Vec<String>> = BTreeMap::new();
        for p in self.policies.values() {
            for (k, why) in &p.authn_shadowed {
                shadowed.entry(k).or_default().push(why.clone());
            }
        }
        for (s, ra) in v.iter_mut().zip(self.authn_sorted.iter()) {
            self.selects_nothing(s, ra.selector.as_ref());
            let never: Vec<String> = ra
                .rules
                .iter()
                .filter(|r| {
                    r.uri.as_ref().is_some_and(|u| self.fetched.get(u).is_none_or(|f| f.keys.is_none()))
                })
                .map(|r| r.rule.issuer.clone())
                .collect();
            if s.not_in_effect.is_none() && !never.is_empty() {
                s.not_in_effect = Some(format!(
                    "the keys of issuer(s) {} were never fetched, so every token of theirs is refused (see ResolvedRefs)",
                    never.join(", ")
                ));
            }
            for (i, r) in ra.rules.iter().enumerate() {
                let Some(uri) = &r.uri else { continue };
                let f = self.fetched.get(uri).cloned().unwrap_or_default();
                let at = format!("spec.jwtRules[{i}].jwksUri {uri}");
                match (f.keys.is_some(), f.error) {
                    (false, None) => s.unresolved.push(format!("{at}: not fetched yet")),
                    (false, Some(e)) => s.unresolved.push(format!("{at}: {e}")),
                    (true, Some(e)) => s.unresolved.push(format!(
                        "{at}: the last fetch failed ({e}); the keys fetched before it are in use"
                    )),
                    (true, None) => {}
                }
            }
            if let Some(mut why) = shadowed.remove(&s.key) {
                why.sort();
                why.dedup();
                s.conflicts = why;
            }
        }
        v
    }

    /// For each RateLimitPolicy, the workloads that count its limits and the version each needs;
    /// the workloads that leave it out for the bound on limits.
    fn rl_statuses(&self) -> Vec<PolicyReach> {
        let objects = self
            .rl_sorted
            .iter()
            .map(|a| ((a.namespace.clone(), a.name.clone()), a.generation, a.invalid.clone()));
        let mut v = self.inbound_reaches("RateLimitPolicy", objects, |p| &p.rl_by);
        let service = self.rate_limit_service_health();
        let mut over: BTreeMap<&Key, usize> = BTreeMap::new();
        for (pod, p) in &self.policies {
            if !self.pods.live.get(pod).is_some_and(|i| !i.finished && i.sidecar) {
                continue;
            }
            for k in &p.rl_over {
                *over.entry(k).or_default() += 1;
            }
        }
        for (s, rl) in v.iter_mut().zip(self.rl_sorted.iter()) {
            if rl.limits.iter().any(|l| l.global) {
                s.degraded = Some(service.clone());
            }
            let Some(n) = over.get(&s.key) else {
                self.selects_nothing(s, rl.selector.as_ref());
                continue;
            };
            s.conflicts.push(format!(
                "{n} pod(s) it selects already count {} limits of the policies before it (the root namespace's, then by namespace and name), so its limits are left out there",
                ratelimit::MAX_LIMITS_PER_WORKLOAD
            ));
            if s.workloads.is_empty() {
                s.not_in_effect = Some(format!(
                    "its limits are left out at every pod it selects ({n}): they already count as many limits as a sidecar does (see Accepted)"
                ));
            }
        }
        v
    }

    /// Whether the rate-limit service counts global limits: it has a ready replica (whose
    /// readiness says it reaches Redis).
    fn rate_limit_service_health(&self) -> Degraded {
        let Some(key) = self.opts.rate_limit_service_key() else {
            return Degraded::Yes {
                reason: "RateLimitServiceUnavailable",
                message: "the installation runs no rate-limit service (spec.rateLimit)".into(),
            };
        };
        let ready = self
            .slices_of
            .get(&key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.live.get(k))
            .any(|s| s.endpoints.iter().any(|e| e.ready));
        if ready {
            return Degraded::No;
        }
        Degraded::Yes {
            reason: "RateLimitServiceUnavailable",
            message: format!(
                "the rate-limit service {}/{} has no ready replica: it is not running, or it cannot reach Redis (its readiness pings Redis); until it can, its global limits admit (failureMode: Open) or refuse with 503 (failureMode: Closed) what they cannot decide",
                key.0, key.1
            ),
        }
    }

    /// Says why an inbound policy with `selector` is in effect nowhere, when it selects no pod.
    fn selects_nothing(&self, s: &mut PolicyReach, selector: Option<&BTreeMap<String, String>>) {
        if !s.workloads.is_empty() || s.without_proxy > 0 {
            return;
        }
        let scope = if s.key.0 == self.opts.root_namespace {
            "any namespace (the root namespace's policy)".to_string()
        } else {
            format!("namespace {}", s.key.0)
        };
        s.not_in_effect = Some(match selector {
            Some(sel) => {
                let labels: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("its selector ({}) matches no running pod in {scope}", labels.join(","))
            }
            None => format!("there is no running pod in {scope}"),
        });
    }

    /// For each PeerAuthentication, the workloads it decides and the version each needs; then
    /// each AuthorizationPolicy and route.
    fn policy_statuses(&self) -> Vec<PolicyReach> {
        let objects = self
            .peer_auths_sorted
            .iter()
            .map(|p| ((p.namespace.clone(), p.name.clone()), p.generation, Vec::new()));
        let mut v = self.inbound_reaches("PeerAuthentication", objects, |p| &p.decided_by);
        v.extend(self.authz_statuses());
        v.extend(self.authn_statuses());
        v.extend(self.rl_statuses());
        let mut trs: Vec<(&RouteKey, &(Outcome, u64))> = self.routes.outcomes.iter().collect();
        trs.sort_by(|a, b| a.0.cmp(b.0));
        for ((kind, key), (o, since)) in trs {
            let routes = match *kind {
                "HTTPRoute" => &self.http_routes,
                "GRPCRoute" => &self.grpc_routes,
                _ => &self.traffic_routes,
            };
            let Some(tr) = routes.live.get(key) else { continue };
            // Every client proxy of this revision it is exported to holds it.
            let reaches = |ns: &str| {
                o.tables.values().any(|t| t.export_to.is_empty() || t.export_to.iter().any(|e| e == ns))
            };
            let (workloads, revisions) = self.clients(&key.0, *since, reaches);
            let not_in_effect = o.tables.is_empty().then(|| {
                if !o.invalid.is_empty() {
                    "it is not sent to any proxy: a value of it is invalid (see Accepted)".to_string()
                } else {
                    "it routes nothing: none of its hosts is a Service it owns with a rule for one of its ports (see Accepted and ResolvedRefs)".to_string()
                }
            });
            v.push(PolicyReach {
                kind: tr.kind,
                key: key.clone(),
                generation: tr.generation,
                type_url: mycel_api::ROUTE_TYPE,
                workloads,
                without_proxy: 0,
                revisions,
                not_implemented: tr.not_implemented.clone(),
                any_implemented: true,
                conflicts: o.conflicts.clone(),
                unresolved: o.unresolved.clone(),
                invalid: o.invalid.clone(),
                not_in_effect,
                parents: tr.parents.clone(),
                notes: Vec::new(),
                degraded: None,
            });
        }
        let mut dps: Vec<(&Key, &(destination::Outcome, u64))> = self.destinations.outcomes.iter().collect();
        dps.sort_by(|a, b| a.0.cmp(b.0));
        for (key, (o, since)) in dps {
            let Some(dp) = self.destination_policies.live.get(key) else { continue };
            // Clusters reach every proxy of this revision.
            let (workloads, revisions) = self.clients(&key.0, *since, |_| true);
            let not_in_effect = o.service.is_none().then(|| {
                "it applies to no Service: its host is not one, or another policy has it (see Accepted and ResolvedRefs)".to_string()
            });
            v.push(PolicyReach {
                kind: "DestinationPolicy",
                key: key.clone(),
                generation: dp.generation,
                type_url: mycel_api::CLUSTER_TYPE,
                workloads,
                without_proxy: 0,
                revisions,
                not_implemented: dp.not_implemented.clone(),
                any_implemented: true,
                conflicts: o.conflicts.clone(),
                unresolved: o.unresolved.clone(),
                invalid: o.invalid.clone(),
                not_in_effect,
                parents: Vec::new(),
                notes: Vec::new(),
                degraded: None,
            });
        }
        for kind in KINDS.iter() {
            let Some(objects) = self.unimplemented.get(kind.kind) else { continue };
            let mut keys: Vec<&Key> = objects.live.keys().collect();
            keys.sort();
            for key in keys {
                let u = &objects.live[key];
                v.push(PolicyReach {
                    kind: kind.kind,
                    key: key.clone(),
                    generation: u.generation,
                    type_url: "",
                    workloads: Vec::new(),
                    without_proxy: 0,
                    revisions: Vec::new(),
                    not_implemented: u.fields.clone(),
                    any_implemented: kind.any_implemented,
                    conflicts: Vec::new(),
                    unresolved: Vec::new(),
                    invalid: Vec::new(),
                    not_in_effect: None,
                    parents: Vec::new(),
                    notes: Vec::new(),
                    degraded: None,
                });
            }
        }
        v
    }

    /// For a mesh-scoped object of `namespace` that reaches the client pods of the namespaces
    /// `reaches` accepts: those pods' proxies of this revision (each to hold version `since`),
    /// and the revisions that decide which control plane writes its status — those of the
    /// sidecars in its own namespace, or with none there, of every client it reaches.
    fn clients(
        &self,
        namespace: &str,
        since: u64,
        reaches: impl Fn(&str) -> bool,
    ) -> (Vec<(Key, u64)>, Vec<String>) {
        let mine =
            |info: &PodInfo| self.opts.revision.as_ref().is_none_or(|r| info.revision.as_ref() == Some(r));
        let (mut workloads, mut revisions, mut reached) = (Vec::new(), Vec::new(), Vec::new());
        for (pod, info) in &self.pods.live {
            if !info.sidecar || info.finished || !reaches(&pod.0) {
                continue;
            }
            reached.extend(info.revision.clone());
            if mine(info) {
                workloads.push((pod.clone(), since));
            }
            if pod.0 == namespace {
                revisions.extend(info.revision.clone());
            }
        }
        if revisions.is_empty() {
            revisions = reached;
        }
        workloads.sort();
        revisions.sort();
        revisions.dedup();
        (workloads, revisions)
    }

    fn snapshot(&self) -> Snapshot {
        let clusters = Collection {
            entries: self.clusters.clone(),
            sorted: self.sorted.clone(),
            log: Some(Arc::new(self.log.clone())),
        };
        let routes = Collection {
            entries: self.routes.entries.clone(),
            sorted: self.routes.sorted.clone(),
            log: Some(Arc::new(self.routes.log.clone())),
        };
        let policies = Scoped::Workload {
            by_workload: self.policy_collections.clone(),
            by_namespace: self.policy_by_namespace.clone(),
            default: self.policy_default.clone(),
        };
        Snapshot {
            version: self.version,
            synced: self.synced(),
            types: [
                (mycel_api::CLUSTER_TYPE, Scoped::Mesh(clusters)),
                (mycel_api::LISTENER_TYPE, Scoped::Mesh(Collection::default())),
                (mycel_api::PEER_POLICY_TYPE, policies),
                (mycel_api::ROUTE_TYPE, Scoped::Mesh(routes)),
            ]
            .into(),
            policies: self.statuses.clone(),
        }
    }
}

/// Starts discovery against the cluster; the receiver always holds the newest snapshot.
/// The key sets the RequestAuthentications name are fetched beside it ([`super::jwks`]).
pub fn start(client: Client, opts: Options) -> watch::Receiver<Arc<Snapshot>> {
    let model = Model::new(opts);
    let (keys_tx, keys_rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(super::jwks::run(model.jwks_wanted.subscribe(), keys_tx));
    start_with(futures::stream::select(discovery::watch(client), keys_rx), model)
}

/// Discovery fed from any stream of changes (tests and the benchmark feed it directly).
fn start_with(
    changes: impl Stream<Item = Change> + Send + Unpin + 'static,
    model: Model,
) -> watch::Receiver<Arc<Snapshot>> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(run(changes, model, tx));
    rx
}

async fn run(
    mut changes: impl Stream<Item = Change> + Unpin,
    mut model: Model,
    tx: watch::Sender<Arc<Snapshot>>,
) {
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
                if model.apply(change) {
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
                let services = model.dirty_services.len();
                let Some(changed) = model.rebuild(!was_synced) else { continue };
                last_publish = Some(Instant::now());
                was_synced = true;
                let version = model.version;
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
    use k8s_openapi::api::core::v1::{Pod, PodSpec, Service, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::watcher;

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
        synced_model_with(Options::default())
    }

    fn synced_model_with(opts: Options) -> Model {
        let mut m = Model::new(opts);
        for c in [
            Change::Service(Box::new(watcher::Event::InitDone)),
            Change::Slice(Box::new(watcher::Event::InitDone)),
            Change::Pod(Box::new(watcher::Event::InitDone)),
            Change::PeerAuth(Box::new(watcher::Event::InitDone)),
            Change::AuthorizationPolicy(Box::new(watcher::Event::InitDone)),
            Change::RequestAuthentication(Box::new(watcher::Event::InitDone)),
            Change::RateLimitPolicy(Box::new(watcher::Event::InitDone)),
            Change::TrafficRoute(Box::new(watcher::Event::InitDone)),
            Change::HttpRoute(Box::new(watcher::Event::InitDone)),
            Change::GrpcRoute(Box::new(watcher::Event::InitDone)),
            Change::DestinationPolicy(Box::new(watcher::Event::InitDone)),
        ] {
            m.apply(c);
        }
        for kind in KINDS.iter() {
            m.apply(Change::Unimplemented(kind.clone(), Box::new(watcher::Event::InitDone)));
        }
        m
    }

    /// The clusters that what is dirty changed.
    fn rebuild(m: &mut Model) -> Vec<String> {
        m.rebuild(false).unwrap_or_default()
    }

    fn cluster(m: &Model, name: &str) -> pb::Cluster {
        match m.clusters[name].resource.kind.clone() {
            Some(pb::resource::Kind::Cluster(c)) => c,
            _ => panic!("not a cluster"),
        }
    }

    #[test]
    fn a_destination_policy_shapes_its_services_clusters_and_status_until_it_is_deleted() {
        let mut m = synced_model();
        let mut labelled = pod("10.0.0.1", "web");
        labelled.metadata.labels = Some([("version".to_string(), "v2".to_string())].into());
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(labelled))));
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(pod("10.0.0.2", "web")))));
        m.apply(Change::Service(Box::new(watcher::Event::Apply(svc("web", "10.96.0.9")))));
        m.apply(Change::Slice(Box::new(watcher::Event::Apply(slice(
            "web-abc",
            "web",
            &[("10.0.0.1", true), ("10.0.0.2", true)],
        )))));
        rebuild(&mut m);
        let dp: mycel_crds::destination_policy::DestinationPolicy =
            serde_json::from_value(serde_json::json!({
                "apiVersion": "mycel.io/v1alpha1", "kind": "DestinationPolicy",
                "metadata": {"name": "web", "namespace": "ns", "generation": 3},
                "spec": {"host": "web", "connectionPool": {"http": {"maxRequests": 7}},
                         "subsets": [{"name": "v2", "labels": {"version": "v2"}}]}
            }))
            .unwrap();
        m.apply(Change::DestinationPolicy(Box::new(watcher::Event::Apply(dp.clone()))));
        let changed = rebuild(&mut m);
        assert_eq!(changed.len(), 2, "{changed:?}");
        assert_eq!(cluster(&m, "web.ns.svc.cluster.local:80").max_requests, 7);
        let v2 = cluster(&m, "web.ns.svc.cluster.local:80/v2");
        assert_eq!(v2.endpoints.len(), 1);
        assert_eq!(v2.endpoints[0].address, "10.0.0.1:8080");
        let reach = m.statuses.iter().find(|r| r.kind == "DestinationPolicy").expect("a status").clone();
        assert_eq!(reach.generation, 3);
        assert!(reach.conflicts.is_empty() && reach.unresolved.is_empty() && reach.not_in_effect.is_none());
        assert_eq!(reach.type_url, mycel_api::CLUSTER_TYPE);
        m.apply(Change::DestinationPolicy(Box::new(watcher::Event::Delete(dp))));
        let mut changed = rebuild(&mut m);
        changed.sort();
        assert_eq!(changed, ["web.ns.svc.cluster.local:80", "web.ns.svc.cluster.local:80/v2"]);
        assert!(!m.clusters.contains_key("web.ns.svc.cluster.local:80/v2"));
        assert_eq!(cluster(&m, "web.ns.svc.cluster.local:80").max_requests, 0);
        assert!(m.statuses.iter().all(|r| r.kind != "DestinationPolicy"));
    }

    #[test]
    fn services_slices_and_pods_become_clusters_with_identities() {
        let mut m = synced_model();
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(pod("10.0.0.1", "web")))));
        m.apply(Change::Service(Box::new(watcher::Event::Apply(svc("web", "10.96.0.9")))));
        m.apply(Change::Slice(Box::new(watcher::Event::Apply(slice(
            "web-abc",
            "web",
            &[("10.0.0.1", true), ("10.0.0.2", false)],
        )))));
        let changed = rebuild(&mut m);
        assert_eq!(changed, vec!["web.ns.svc.cluster.local:80".to_string()]);
        let c = cluster(&m, "web.ns.svc.cluster.local:80");
        assert_eq!(c.addresses, vec!["10.96.0.9:80"]);
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.endpoints[0].address, "10.0.0.1:8080");
        assert_eq!(c.endpoints[0].identity, "spiffe://cluster.local/ns/ns/sa/web");
        assert!(c.endpoints[0].ready && !c.endpoints[1].ready);
        assert!(!c.mesh_tls);

        // The same content again changes nothing; a pod's new account changes its endpoint.
        m.apply(Change::Slice(Box::new(watcher::Event::Apply(slice(
            "web-abc",
            "web",
            &[("10.0.0.1", true), ("10.0.0.2", false)],
        )))));
        assert!(rebuild(&mut m).is_empty());
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(pod("10.0.0.1", "other")))));
        assert_eq!(rebuild(&mut m).len(), 1);
        assert_eq!(
            cluster(&m, "web.ns.svc.cluster.local:80").endpoints[0].identity,
            "spiffe://cluster.local/ns/ns/sa/other"
        );

        // Deleting the Service removes its cluster.
        m.apply(Change::Service(Box::new(watcher::Event::Delete(svc("web", "10.96.0.9")))));
        assert_eq!(rebuild(&mut m), vec!["web.ns.svc.cluster.local:80".to_string()]);
        assert!(m.clusters.is_empty());
    }

    #[test]
    fn a_relist_drops_what_disappeared_meanwhile() {
        let mut m = synced_model();
        m.apply(Change::Service(Box::new(watcher::Event::Apply(svc("a", "10.96.0.1")))));
        m.apply(Change::Service(Box::new(watcher::Event::Apply(svc("b", "10.96.0.2")))));
        rebuild(&mut m);
        assert_eq!(m.clusters.len(), 2);
        m.apply(Change::Service(Box::new(watcher::Event::Init)));
        m.apply(Change::Service(Box::new(watcher::Event::InitApply(svc("a", "10.96.0.1")))));
        m.apply(Change::Service(Box::new(watcher::Event::InitDone)));
        assert_eq!(rebuild(&mut m), vec!["b.ns.svc.cluster.local:80".to_string()]);
        assert_eq!(m.clusters.keys().collect::<Vec<_>>(), vec!["a.ns.svc.cluster.local:80"]);
    }

    fn peer_auth(ns: &str, name: &str, mode: &str) -> mycel_crds::peer_authentication::PeerAuthentication {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "security.mycel.io/v1alpha1",
            "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns, "generation": 3},
            "spec": {"mtls": {"mode": mode}},
        }))
        .unwrap()
    }

    fn policy_mode(snap: &Snapshot, ns: &str, pod: &str) -> pb::MtlsMode {
        let c = snap.collection(mycel_api::PEER_POLICY_TYPE, ns, pod);
        match &c.entries[peer_policy::NAME].resource.kind {
            Some(pb::resource::Kind::PeerPolicy(p)) => pb::MtlsMode::try_from(p.mode).unwrap(),
            _ => panic!("not a policy"),
        }
    }

    #[test]
    fn a_peer_authentication_recomputes_its_namespaces_workloads_only() {
        let mut m = synced_model();
        let mut web = pod("10.0.0.1", "web");
        let proxy = k8s_openapi::api::core::v1::Container {
            name: crate::controlplane::inject::PROXY.into(),
            ..Default::default()
        };
        web.spec.as_mut().unwrap().init_containers = Some(vec![proxy]);
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(web))));
        let mut elsewhere = pod("10.0.0.7", "api");
        elsewhere.metadata.namespace = Some("other".into());
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(elsewhere))));
        m.apply(Change::Service(Box::new(watcher::Event::Apply(svc("web", "10.96.0.9")))));
        m.apply(Change::Slice(Box::new(watcher::Event::Apply(slice(
            "web-abc",
            "web",
            &[("10.0.0.1", true)],
        )))));
        rebuild(&mut m);
        let before = m.snapshot();
        assert_eq!(policy_mode(&before, "ns", "pod-10.0.0.1"), pb::MtlsMode::MtlsPermissive);
        assert!(cluster(&m, "web.ns.svc.cluster.local:80").endpoints[0].mtls);

        m.apply(Change::PeerAuth(Box::new(watcher::Event::Apply(peer_auth("ns", "default", "DISABLE")))));
        assert_eq!(m.dirty_pods, HashSet::from([("ns".to_string(), "pod-10.0.0.1".to_string())]));
        assert!(m.dirty_services.is_empty(), "no Service is recomputed before a policy changed");
        // The workload's policy changed, so the Service it backs is recomputed (its endpoint is
        // no longer dialled with mTLS): nothing else.
        assert_eq!(rebuild(&mut m), ["web.ns.svc.cluster.local:80"]);
        assert!(!cluster(&m, "web.ns.svc.cluster.local:80").endpoints[0].mtls);
        let after = m.snapshot();
        assert_eq!(policy_mode(&after, "ns", "pod-10.0.0.1"), pb::MtlsMode::MtlsDisable);
        assert_eq!(policy_mode(&after, "ns", "not-known-yet"), pb::MtlsMode::MtlsDisable, "the namespace's");
        assert_eq!(policy_mode(&after, "other", "pod-10.0.0.7"), pb::MtlsMode::MtlsPermissive);
        assert_eq!(policy_mode(&after, "other", "not-known-yet"), pb::MtlsMode::MtlsPermissive, "the mesh's");
        let reach = &after.policies[0];
        assert_eq!((reach.key.1.as_str(), reach.generation), ("default", 3));
        assert_eq!(reach.workloads, [(("ns".to_string(), "pod-10.0.0.1".to_string()), after.version)]);
    }

    fn jwt_rules(snap: &Snapshot, ns: &str, pod: &str) -> Vec<pb::JwtRule> {
        let c = snap.collection(mycel_api::PEER_POLICY_TYPE, ns, pod);
        match &c.entries[peer_policy::NAME].resource.kind {
            Some(pb::resource::Kind::PeerPolicy(p)) => p.jwt.clone(),
            _ => panic!("not a policy"),
        }
    }

    /// `pod-10.0.0.1` (account `web`, label `app: web`) with a Mycel sidecar.
    fn meshed_web_pod() -> Pod {
        let mut web = pod("10.0.0.1", "web");
        web.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        let proxy = k8s_openapi::api::core::v1::Container {
            name: crate::controlplane::inject::PROXY.into(),
            ..Default::default()
        };
        web.spec.as_mut().unwrap().init_containers = Some(vec![proxy]);
        web
    }

    #[test]
    fn rate_limits_reach_the_selected_workloads_and_a_policy_left_out_everywhere_says_so() {
        let mut m = synced_model();
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(meshed_web_pod()))));
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(pod("10.0.0.2", "api")))));
        let rlp = |name: &str, limits: usize| -> mycel_crds::rate_limit_policy::RateLimitPolicy {
            let limits: Vec<serde_json::Value> = (0..limits)
                .map(|i| serde_json::json!({"name": format!("l{i}"), "requests": 10, "unit": "second"}))
                .collect();
            serde_json::from_value(serde_json::json!({
                "apiVersion": "mycel.io/v1alpha1", "kind": "RateLimitPolicy",
                "metadata": {"name": name, "namespace": "ns", "generation": 1},
                "spec": {"selector": {"matchLabels": {"app": "web"}}, "limits": limits}
            }))
            .unwrap()
        };
        for (name, n) in [("a", 32), ("b", 32), ("c", 1)] {
            m.apply(Change::RateLimitPolicy(Box::new(watcher::Event::Apply(rlp(name, n)))));
        }
        rebuild(&mut m);
        let snap = m.snapshot();
        let limits = |ns: &str, pod: &str| match &snap
            .collection(mycel_api::PEER_POLICY_TYPE, ns, pod)
            .entries[peer_policy::NAME]
            .resource
            .kind
        {
            Some(pb::resource::Kind::PeerPolicy(p)) => (p.rate_limits.len(), p.authz.len()),
            _ => panic!("not a policy"),
        };
        assert_eq!(limits("ns", "pod-10.0.0.1"), (64, 0), "a and b, up to the bound");
        assert_eq!(limits("ns", "pod-10.0.0.2"), (0, 0), "not selected");
        assert_eq!(
            limits("ns", "not-known-yet"),
            (0, 1),
            "a selector's limits wait for the pod, accepting nothing"
        );
        let reach = |name: &str| {
            m.statuses.iter().find(|r| r.kind == "RateLimitPolicy" && r.key.1 == name).unwrap().clone()
        };
        assert_eq!(reach("a").workloads.len(), 1);
        let c = reach("c");
        assert!(c.workloads.is_empty() && c.conflicts[0].contains("left out"), "{c:?}");
        assert!(c.not_in_effect.as_deref().is_some_and(|w| w.contains("every pod it selects")), "{c:?}");
    }

    #[test]
    fn an_outbound_policy_reaches_the_senders_outbound_limits() {
        let rlp: mycel_crds::rate_limit_policy::RateLimitPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "mycel.io/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": "egress", "namespace": "ns", "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "direction": "Outbound",
                     "limits": [{"name": "api", "requests": 10, "unit": "second", "hosts": ["api.example.com"]}]}
        }))
        .unwrap();
        let mut m = synced_model();
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(meshed_web_pod()))));
        m.apply(Change::RateLimitPolicy(Box::new(watcher::Event::Apply(rlp))));
        rebuild(&mut m);
        let p = match &m.snapshot().collection(mycel_api::PEER_POLICY_TYPE, "ns", "pod-10.0.0.1").entries
            [peer_policy::NAME]
            .resource
            .kind
        {
            Some(pb::resource::Kind::PeerPolicy(p)) => p.clone(),
            _ => panic!("not a policy"),
        };
        assert!(p.rate_limits.is_empty(), "not on what it receives");
        assert_eq!(p.outbound_rate_limits.len(), 1);
        assert_eq!(p.outbound_rate_limits[0].hosts, ["api.example.com"]);
        let reach = m.statuses.iter().find(|r| r.kind == "RateLimitPolicy").unwrap();
        assert_eq!(reach.workloads.len(), 1, "Ready counts the senders' proxies");
    }

    #[test]
    fn a_global_limit_brings_the_rate_limit_service_to_its_workloads_and_needs_one() {
        let rlp = |name: &str, scope: &str| -> mycel_crds::rate_limit_policy::RateLimitPolicy {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "mycel.io/v1alpha1", "kind": "RateLimitPolicy",
                "metadata": {"name": name, "namespace": "ns", "generation": 1},
                "spec": {"selector": {"matchLabels": {"app": "web"}},
                         "limits": [{"name": "l", "requests": 10, "unit": "second", "scope": scope}]}
            }))
            .unwrap()
        };
        let service = crate::controlplane::MeshRateLimit { timeout_ms: 300 }.service(
            "mycel-system",
            "canary",
            "cluster.local",
        );
        assert_eq!(service.address, "mycel-ratelimit-canary.mycel-system.svc:15090");
        assert_eq!(service.identity, "spiffe://cluster.local/ns/mycel-system/sa/mycel-ratelimit-canary");
        let peer = |m: &mut Model| {
            rebuild(m);
            match &m.snapshot().collection(mycel_api::PEER_POLICY_TYPE, "ns", "pod-10.0.0.1").entries
                [peer_policy::NAME]
                .resource
                .kind
            {
                Some(pb::resource::Kind::PeerPolicy(p)) => p.clone(),
                _ => panic!("not a policy"),
            }
        };
        for (with_service, scope) in [(true, "Local"), (true, "Global"), (false, "Global")] {
            let opts =
                Options { rate_limit_service: with_service.then(|| service.clone()), ..Options::default() };
            let mut m = synced_model_with(opts);
            m.apply(Change::Pod(Box::new(watcher::Event::Apply(meshed_web_pod()))));
            m.apply(Change::RateLimitPolicy(Box::new(watcher::Event::Apply(rlp("p", scope)))));
            let p = peer(&mut m);
            match (with_service, scope) {
                (true, "Local") => {
                    assert_eq!((p.rate_limits.len(), p.rate_limit_service.as_ref()), (1, None), "not needed");
                    let r = m.statuses.iter().find(|r| r.kind == "RateLimitPolicy").unwrap();
                    assert_eq!(r.degraded, None, "local limits depend on nothing");
                }
                (true, _) => {
                    assert!(p.rate_limits[0].global);
                    assert_eq!(p.rate_limit_service.as_ref(), Some(&service));
                    // Degraded until the service has a ready replica (which reaches Redis).
                    let degraded = |m: &Model| {
                        m.statuses.iter().find(|r| r.kind == "RateLimitPolicy").unwrap().degraded.clone()
                    };
                    let reason = "RateLimitServiceUnavailable";
                    assert!(matches!(degraded(&m), Some(Degraded::Yes { reason: r, .. }) if r == reason));
                    let mut rl = |ready: bool| {
                        let mut s = slice("rl-1", "mycel-ratelimit-canary", &[("10.0.9.1", ready)]);
                        s.metadata.namespace = Some("mycel-system".into());
                        m.apply(Change::Slice(Box::new(watcher::Event::Apply(s))));
                        rebuild(&mut m);
                        degraded(&m)
                    };
                    assert_eq!(rl(true), Some(Degraded::No));
                    let away = rl(false);
                    assert!(
                        matches!(&away, Some(Degraded::Yes { message, .. }) if message.contains("mycel-system/mycel-ratelimit-canary has no ready replica")),
                        "{away:?}"
                    );
                    assert_eq!(rl(true), Some(Degraded::No), "and back without anything else changing");
                }
                _ => {
                    assert!(p.rate_limits.is_empty(), "no service to count it");
                    let r = m.statuses.iter().find(|r| r.kind == "RateLimitPolicy").unwrap();
                    assert!(
                        r.invalid
                            .iter()
                            .any(|i| i.contains("spec.limits[0].scope") && i.contains("spec.rateLimit")),
                        "{r:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn fetched_key_sets_reach_the_selected_workloads_and_the_policy_status() {
        let mut m = synced_model();
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(meshed_web_pod()))));
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(pod("10.0.0.2", "api")))));
        let uri = "https://idp.example/keys";
        let ra: mycel_crds::RequestAuthentication = serde_json::from_value(serde_json::json!({
            "apiVersion": "mycel.io/v1alpha1", "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "ns", "generation": 2},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "jwtRules": [{"issuer": "https://idp.example", "jwksUri": uri}]}
        }))
        .unwrap();
        m.apply(Change::RequestAuthentication(Box::new(watcher::Event::Apply(ra))));
        rebuild(&mut m);
        assert_eq!(m.jwks_wanted.borrow().keys().collect::<Vec<_>>(), [uri], "the fetcher is told");
        let snap = m.snapshot();
        let rules = jwt_rules(&snap, "ns", "pod-10.0.0.1");
        assert_eq!((rules.len(), rules[0].jwks.as_str()), (1, ""), "not fetched: sent without keys");
        assert!(jwt_rules(&snap, "ns", "pod-10.0.0.2").is_empty(), "not selected");
        assert!(jwt_rules(&snap, "ns", "not-known-yet").is_empty(), "a selector's rules wait for the pod");
        let unknown = snap.collection(mycel_api::PEER_POLICY_TYPE, "ns", "not-known-yet");
        match &unknown.entries[peer_policy::NAME].resource.kind {
            Some(pb::resource::Kind::PeerPolicy(p)) => {
                let names: Vec<&str> = p.authz.iter().map(|a| a.name.as_str()).collect();
                assert_eq!(names, [authz::NOT_KNOWN_YET], "and until then it accepts nothing");
            }
            _ => panic!("not a policy"),
        }
        let reach =
            |m: &Model| m.statuses.iter().find(|r| r.kind == "RequestAuthentication").unwrap().clone();
        assert_eq!(reach(&m).unresolved, [format!("spec.jwtRules[0].jwksUri {uri}: not fetched yet")]);

        let keys = r#"{"keys":[]}"#.to_string();
        m.apply(Change::Jwks { uri: uri.into(), epoch: 1, result: Ok(keys.clone()) });
        rebuild(&mut m);
        assert_eq!(jwt_rules(&m.snapshot(), "ns", "pod-10.0.0.1")[0].jwks, keys);
        let r = reach(&m);
        assert!(r.unresolved.is_empty(), "{:?}", r.unresolved);
        assert_eq!(r.workloads, [(("ns".to_string(), "pod-10.0.0.1".to_string()), m.version)]);
        // A failed refresh keeps the keys, and says so.
        m.apply(Change::Jwks { uri: uri.into(), epoch: 1, result: Err("answered 503".into()) });
        rebuild(&mut m);
        assert_eq!(jwt_rules(&m.snapshot(), "ns", "pod-10.0.0.1")[0].jwks, keys);
        assert!(reach(&m).unresolved[0].contains("the last fetch failed (answered 503)"), "{:?}", reach(&m));
        // A result for a URI no policy names any more is dropped.
        m.apply(Change::RequestAuthentication(Box::new(watcher::Event::Delete(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "mycel.io/v1alpha1", "kind": "RequestAuthentication",
                "metadata": {"name": "jwt", "namespace": "ns"}, "spec": {}
            }))
            .unwrap(),
        ))));
        rebuild(&mut m);
        assert!(m.jwks_wanted.borrow().is_empty());
        assert!(!m.apply(Change::Jwks { uri: uri.into(), epoch: 1, result: Ok(keys) }), "nothing dirty");
        assert!(jwt_rules(&m.snapshot(), "ns", "pod-10.0.0.1").is_empty());
    }

    #[test]
    fn an_event_that_changes_nothing_kept_costs_no_version() {
        let mut m = synced_model();
        m.apply(Change::Pod(Box::new(watcher::Event::Apply(pod("10.0.0.1", "web")))));
        m.apply(Change::PeerAuth(Box::new(watcher::Event::Apply(peer_auth("ns", "default", "STRICT")))));
        assert!(m.rebuild(false).is_some());
        // The status writer's own write comes back through the watch; so does a relabel of the pod's
        // status. Neither changes what the model keeps.
        let mut written = peer_auth("ns", "default", "STRICT");
        written.status = Some(mycel_crds::PolicyStatus { observed_generation: Some(3), conditions: vec![] });
        assert!(!m.apply(Change::PeerAuth(Box::new(watcher::Event::Apply(written)))), "nothing dirty");
        let mut running = pod("10.0.0.1", "web");
        running.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        assert!(!m.apply(Change::Pod(Box::new(watcher::Event::Apply(running)))));
        assert!(m.rebuild(false).is_none(), "no new version");
        // A relist of the same objects is nothing either.
        m.apply(Change::PeerAuth(Box::new(watcher::Event::Init)));
        m.apply(Change::PeerAuth(Box::new(watcher::Event::InitApply(peer_auth("ns", "default", "STRICT")))));
        assert!(!m.apply(Change::PeerAuth(Box::new(watcher::Event::InitDone))));
    }

    /// Time is paused: it advances only when every task waits, so "at once" is an elapsed
    /// time of zero and a debounce wait is exactly the debounce.
    #[tokio::test(start_paused = true)]
    async fn a_lone_change_goes_out_at_once_and_a_burst_is_coalesced() {
        let debounce = Duration::from_secs(1);
        let opts = Options { debounce, debounce_max: Duration::from_secs(10), ..Options::default() };
        let (tx, changes) = futures::channel::mpsc::unbounded();
        let mut rx = start_with(changes, Model::new(opts));
        let send = |c: Change| tx.unbounded_send(c).unwrap();
        send(Change::Service(Box::new(watcher::Event::InitDone)));
        send(Change::Slice(Box::new(watcher::Event::InitDone)));
        send(Change::Pod(Box::new(watcher::Event::InitDone)));
        send(Change::PeerAuth(Box::new(watcher::Event::InitDone)));
        send(Change::AuthorizationPolicy(Box::new(watcher::Event::InitDone)));
        send(Change::RequestAuthentication(Box::new(watcher::Event::InitDone)));
        send(Change::RateLimitPolicy(Box::new(watcher::Event::InitDone)));
        send(Change::TrafficRoute(Box::new(watcher::Event::InitDone)));
        send(Change::HttpRoute(Box::new(watcher::Event::InitDone)));
        send(Change::GrpcRoute(Box::new(watcher::Event::InitDone)));
        send(Change::DestinationPolicy(Box::new(watcher::Event::InitDone)));
        for kind in KINDS.iter() {
            send(Change::Unimplemented(kind.clone(), Box::new(watcher::Event::InitDone)));
        }
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
        let mut names: Vec<_> = snap
            .mesh(mycel_api::CLUSTER_TYPE)
            .unwrap()
            .changed_since(snap.version, version)
            .unwrap()
            .into_iter()
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["b.ns.svc.cluster.local:80", "c.ns.svc.cluster.local:80", "d.ns.svc.cluster.local:80"]
        );
    }
}
