//! Everything the data path reads, as one immutable snapshot.
//!
//! A configuration becomes a [`State`]: the listeners, the endpoint sets by cluster name, and the
//! indexes the data path looks things up by (virtual address → cluster). It is replaced whole
//! ([`Snapshot::install`]), so a connection or request that loaded it sees either the old state
//! or the new one, never new clusters beside old identities. Each cluster's endpoint identities
//! live in its own endpoint set: a dial for a cluster expects that cluster's identity for the
//! address, whatever another cluster says about the same address.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;

use crate::{
    balance::Endpoints,
    config::{self, Config},
    routing::Table,
};

/// One configuration, ready for the data path.
pub struct State {
    /// The configuration this state was built from (what `/config_dump` shows).
    pub config: Config,
    listeners: HashMap<String, config::Listener>,
    clusters: HashMap<String, Arc<Endpoints>>,
    /// Virtual address (a Service's ClusterIP and port) → its cluster.
    vips: HashMap<SocketAddr, Arc<Endpoints>>,
    /// Endpoint address → the identity it must prove, for a connection sent to the address
    /// itself (a pod IP, a headless Service). Only addresses every cluster agrees on: where two
    /// clusters name different identities for one address, neither is assumed.
    identities: HashMap<SocketAddr, Option<Arc<str>>>,
    /// Cluster → its route table, compiled.
    routes: HashMap<String, Arc<Table>>,
    /// The authorization policies, compiled.
    pub authz: Arc<crate::policy::authz::Engine>,
    /// The request authentication rules, compiled (their key sets parsed).
    pub authn: Arc<crate::policy::jwt::Authenticator>,
    /// The rate limits, with their buckets (kept across updates that leave a limit as it was).
    pub ratelimit: Arc<crate::policy::ratelimit::Limiter>,
    /// The limits of the requests the workload sends.
    pub ratelimit_outbound: Arc<crate::policy::ratelimit::Limiter>,
}

impl State {
    /// Builds a state from `config`; endpoint sets that did not change since `old` are kept, with
    /// their balancing state (round-robin position, latency averages, ejections).
    pub fn build(config: Config, old: Option<&State>) -> State {
        let clusters: HashMap<String, Arc<Endpoints>> = config
            .clusters
            .iter()
            .map(|c| {
                let timeout = Duration::from_millis(c.connect_timeout_ms);
                let before = old.and_then(|o| o.clusters.get(&c.name));
                let endpoints = match before {
                    Some(e) if e.same_as(c, timeout) => e.clone(),
                    _ => {
                        let mut e = Endpoints::from_config(c, timeout);
                        if let Some(b) = before {
                            e.inherit(b);
                        }
                        Arc::new(e)
                    }
                };
                (c.name.clone(), endpoints)
            })
            .collect();
        let vips = config
            .clusters
            .iter()
            .flat_map(|c| c.addresses.iter().map(move |a| (*a, c.name.as_str())))
            .filter_map(|(a, name)| Some((a, clusters.get(name)?.clone())))
            .collect();
        let mut identities: HashMap<SocketAddr, Option<Arc<str>>> = HashMap::new();
        for e in clusters.values() {
            for a in &e.addrs {
                let id = e.identity(*a).cloned();
                match identities.get(a) {
                    Some(known) if *known != id => {
                        identities.insert(*a, None);
                    }
                    Some(_) => {}
                    None => {
                        identities.insert(*a, id);
                    }
                }
            }
        }
        identities.retain(|_, id| id.is_some());
        let listeners = config.listeners.iter().map(|l| (l.name.clone(), l.clone())).collect();
        // A table that did not change is kept compiled (an endpoint update recompiles nothing).
        let old_tables: HashMap<&str, &config::RouteTable> = old
            .map(|o| o.config.routes.iter().map(|t| (t.cluster.as_str(), t)).collect())
            .unwrap_or_default();
        let routes = config
            .routes
            .iter()
            .map(|t| {
                let kept = old
                    .filter(|_| old_tables.get(t.cluster.as_str()).is_some_and(|ot| *ot == t))
                    .and_then(|o| o.routes.get(&t.cluster).cloned());
                (t.cluster.clone(), kept.unwrap_or_else(|| Arc::new(Table::compile(t))))
            })
            .collect();
        let authz = match old {
            Some(o) if o.config.authorization == config.authorization => o.authz.clone(),
            _ => Arc::new(crate::policy::authz::Engine::compile(&config.authorization)),
        };
        let authn = match old {
            Some(o) if o.config.request_authentication == config.request_authentication => o.authn.clone(),
            _ => Arc::new(crate::policy::jwt::Authenticator::compile(&config.request_authentication)),
        };
        let ratelimit = match old {
            Some(o) if o.config.rate_limits == config.rate_limits => o.ratelimit.clone(),
            _ => Arc::new(crate::policy::ratelimit::Limiter::compile(
                &config.rate_limits,
                old.map(|o| &*o.ratelimit),
            )),
        };
        let ratelimit_outbound = match old {
            Some(o) if o.config.outbound_rate_limits == config.outbound_rate_limits => {
                o.ratelimit_outbound.clone()
            }
            _ => Arc::new(crate::policy::ratelimit::Limiter::compile(
                &config.outbound_rate_limits,
                old.map(|o| &*o.ratelimit_outbound),
            )),
        };
        State {
            config,
            listeners,
            clusters,
            vips,
            identities,
            routes,
            authz,
            authn,
            ratelimit,
            ratelimit_outbound,
        }
    }

    pub fn listener(&self, name: &str) -> Option<&config::Listener> {
        self.listeners.get(name)
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<Endpoints>> {
        self.clusters.get(name)
    }

    /// The route table of a cluster, if it has one.
    pub fn routes(&self, cluster: &str) -> Option<&Table> {
        self.routes.get(cluster).map(|t| &**t)
    }

    /// The cluster a virtual address belongs to.
    pub fn by_vip(&self, addr: &SocketAddr) -> Option<&Arc<Endpoints>> {
        self.vips.get(addr)
    }

    /// The identity an endpoint address must prove when a connection is sent to it directly,
    /// if the clusters that list it agree on one.
    pub fn identity_of(&self, addr: &SocketAddr) -> Option<&Arc<str>> {
        self.identities.get(addr)?.as_ref()
    }

    /// The mutual-TLS mode for inbound connections to `port`.
    pub fn inbound_mode(&self, port: u16) -> config::MtlsMode {
        self.config.inbound_mtls.mode_for(port)
    }
}

/// The state in force, swapped whole.
pub struct Snapshot(ArcSwap<State>);

impl Snapshot {
    pub fn new(config: Config) -> Snapshot {
        Snapshot(ArcSwap::from_pointee(State::build(config, None)))
    }

    /// The state now (hold the guard for a lookup, not across an await).
    pub fn load(&self) -> arc_swap::Guard<Arc<State>> {
        self.0.load()
    }

    /// Makes `config` the one in force.
    pub fn install(&self, config: Config) {
        let old = self.0.load_full();
        self.0.store(Arc::new(State::build(config, Some(&old))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint_port: u16, identity: &str) -> Config {
        let addr = SocketAddr::from(([10, 0, 0, 1], endpoint_port));
        let vip = SocketAddr::from(([10, 96, 0, 1], 80));
        Config::parse(&format!(
            "clusters:\n- name: back\n  endpoints: ['10.0.0.1:{endpoint_port}']\n  addresses: ['{vip}']\n  mtlsEndpoints: {{'{addr}': '{identity}'}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_reader_during_an_update_sees_one_whole_state() {
        let snap = Arc::new(Snapshot::new(config(8080, "spiffe://t/ns/a/sa/one")));
        let vip = SocketAddr::from(([10, 96, 0, 1], 80));
        let writer = {
            let snap = snap.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let id = if i % 2 == 0 { "spiffe://t/ns/a/sa/two" } else { "spiffe://t/ns/a/sa/one" };
                    let port = if i % 2 == 0 { 8081 } else { 8080 };
                    snap.install(config(port, id));
                }
            })
        };
        let mut seen = std::collections::BTreeSet::new();
        while !writer.is_finished() {
            let state = snap.load();
            // The endpoint set found by VIP, by name, and its identity all come from one config.
            let by_vip = state.by_vip(&vip).unwrap();
            let by_name = state.cluster("back").unwrap();
            assert!(Arc::ptr_eq(by_vip, by_name), "the VIP index and the names index agree");
            let addr = by_name.addrs[0];
            let id = by_name.identity(addr).expect("every endpoint has its identity");
            let expected =
                if addr.port() == 8081 { "spiffe://t/ns/a/sa/two" } else { "spiffe://t/ns/a/sa/one" };
            assert_eq!(&**id, expected, "endpoints and identities of the same update");
            let port = addr.port();
            seen.insert(port);
        }
        writer.join().unwrap();
        assert!(!seen.is_empty());
    }

    #[test]
    fn an_address_has_an_identity_only_where_its_clusters_agree() {
        let c = Config::parse(
            "clusters:\n- {name: a, endpoints: ['10.0.0.1:80', '10.0.0.2:80'], mtlsEndpoints: {'10.0.0.1:80': 'spiffe://t/ns/a/sa/a', '10.0.0.2:80': 'spiffe://t/ns/a/sa/x'}}\n- {name: b, endpoints: ['10.0.0.1:80', '10.0.0.2:80'], mtlsEndpoints: {'10.0.0.1:80': 'spiffe://t/ns/a/sa/a', '10.0.0.2:80': 'spiffe://t/ns/a/sa/y'}}\n",
        )
        .unwrap();
        let s = State::build(c, None);
        let addr = |last: u8| SocketAddr::from(([10, 0, 0, last], 80));
        assert_eq!(s.identity_of(&addr(1)).map(|i| &**i), Some("spiffe://t/ns/a/sa/a"));
        assert_eq!(s.identity_of(&addr(2)), None, "two clusters disagree: neither identity is assumed");
        assert_eq!(s.identity_of(&addr(3)), None);
    }

    #[test]
    fn an_unchanged_cluster_keeps_its_balancing_state() {
        let snap = Snapshot::new(config(8080, "spiffe://t/ns/a/sa/one"));
        let before = snap.load().cluster("back").unwrap().clone();
        snap.install(config(8080, "spiffe://t/ns/a/sa/one"));
        assert!(Arc::ptr_eq(&before, snap.load().cluster("back").unwrap()));
        snap.install(config(8080, "spiffe://t/ns/a/sa/other"));
        assert!(!Arc::ptr_eq(&before, snap.load().cluster("back").unwrap()), "a new identity is a new set");
    }
}
