//! What the model publishes and streams read: one immutable [`Snapshot`] per version, holding a
//! collection of resources per type URL.
//!
//! A collection is mesh-wide (every proxy sees the same one: clusters) or per workload (each
//! proxy its own: its inbound PeerPolicy). A mesh-wide collection keeps a change log, so a stream
//! a few versions behind sends only what changed; a per-workload one is small and compared whole.
//! The delta stream ([`super::server`]) is written once against [`Collection`]; adding a resource
//! type is a translate function in [`super::translate`], its place in the model, and a line in
//! [`COLLECTIONS`].

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
};

use mycel_api::v1alpha1 as pb;

/// How many versions' change lists a mesh-wide collection keeps, so that a stream a few versions
/// behind gets a delta from the log instead of a comparison of everything.
pub const CHANGE_LOG: usize = 256;

/// One resource as streams send it.
#[derive(Debug)]
pub struct Entry {
    /// Hash of the encoded resource: equal content gives an equal version, across restarts of
    /// the control plane too, so a proxy that reconnects with nothing changed receives nothing.
    pub version: String,
    pub resource: pb::Resource,
}

impl Entry {
    /// An entry for `resource`, its version the hash of its encoding.
    pub fn new(mut resource: pb::Resource) -> Entry {
        resource.version = String::new();
        let version = content_version(&prost::Message::encode_to_vec(&resource));
        resource.version = version.clone();
        Entry { version, resource }
    }
}

/// 64-bit FNV-1a, as hex: stable across processes (unlike `DefaultHasher`).
pub fn content_version(bytes: &[u8]) -> String {
    format!("{:016x}", mycel_api::hash::fnv1a(bytes))
}

/// Which proxies a type's collection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One collection every proxy shares.
    Mesh,
    /// One collection per workload (pod), computed for changed workloads only.
    Workload,
}

/// A type the stream serves.
#[derive(Debug)]
pub struct Registration {
    pub type_url: &'static str,
    pub scope: Scope,
}

/// Every type the config stream serves. The listener type has no resources yet (the proxy takes
/// its listeners from its command line); it is served empty so that a proxy subscribing to it
/// is in sync.
pub const COLLECTIONS: &[Registration] = &[
    Registration { type_url: mycel_api::CLUSTER_TYPE, scope: Scope::Mesh },
    Registration { type_url: mycel_api::LISTENER_TYPE, scope: Scope::Mesh },
    Registration { type_url: mycel_api::PEER_POLICY_TYPE, scope: Scope::Workload },
    Registration { type_url: mycel_api::ROUTE_TYPE, scope: Scope::Mesh },
];

/// The registration of a type URL, if the stream serves it.
pub fn registration(type_url: &str) -> Option<&'static Registration> {
    COLLECTIONS.iter().find(|r| r.type_url == type_url)
}

/// The change log of a mesh-wide collection: for each version after `covers_after`, the names
/// that version changed (versions that changed nothing of this type have no line).
#[derive(Clone, Debug, Default)]
pub struct ChangeLog {
    lines: VecDeque<(u64, Arc<[String]>)>,
    covers_after: u64,
}

impl ChangeLog {
    /// A log that covers every version after `covers_after`.
    pub fn new(covers_after: u64, lines: impl IntoIterator<Item = (u64, Arc<[String]>)>) -> ChangeLog {
        ChangeLog { lines: lines.into_iter().collect(), covers_after }
    }

    /// Records the names `version` changed, forgetting the oldest line past [`CHANGE_LOG`].
    pub fn push(&mut self, version: u64, names: Arc<[String]>) {
        if names.is_empty() {
            return;
        }
        self.lines.push_back((version, names));
        while self.lines.len() > CHANGE_LOG {
            if let Some((v, _)) = self.lines.pop_front() {
                self.covers_after = v;
            }
        }
    }
}

/// The resources of one type for one scope, at one snapshot version.
#[derive(Clone, Debug, Default)]
pub struct Collection {
    pub entries: Arc<HashMap<String, Arc<Entry>>>,
    /// Names in order (full syncs go out in parts, in this order).
    pub sorted: Arc<Vec<String>>,
    /// Mesh-wide collections only.
    pub log: Option<Arc<ChangeLog>>,
}

impl Collection {
    /// A collection of these entries, without a change log.
    pub fn of(entries: HashMap<String, Arc<Entry>>) -> Collection {
        let mut sorted: Vec<String> = entries.keys().cloned().collect();
        sorted.sort();
        Collection { entries: Arc::new(entries), sorted: Arc::new(sorted), log: None }
    }

    /// Names changed after `since` up to `version`, or `None` when there is no log or it no
    /// longer reaches back that far.
    pub fn changed_since(&self, version: u64, since: u64) -> Option<HashSet<&str>> {
        if since >= version {
            return Some(HashSet::new());
        }
        if !self.log_reaches(version, since) {
            return None;
        }
        let log = self.log.as_ref()?;
        Some(
            log.lines
                .iter()
                .filter(|(v, _)| *v > since)
                .flat_map(|(_, names)| names.iter().map(String::as_str))
                .collect(),
        )
    }

    /// Whether the change log covers every version after `since`.
    pub fn log_reaches(&self, version: u64, since: u64) -> bool {
        since >= version || self.log.as_ref().is_some_and(|l| l.covers_after <= since)
    }
}

/// Pod key: (namespace, name).
pub type Key = (String, String);

/// One type's collections.
#[derive(Clone, Debug)]
pub enum Scoped {
    Mesh(Collection),
    Workload {
        /// By pod.
        by_workload: Arc<HashMap<Key, Arc<Collection>>>,
        /// For a pod the model does not know (yet): by namespace where it differs from
        /// `default`, which is for every other namespace.
        by_namespace: Arc<HashMap<String, Arc<Collection>>>,
        default: Arc<Collection>,
    },
}

/// What one policy object reaches, for the status written back to it ([`super::status`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyReach {
    /// Its kind, as the API names it.
    pub kind: &'static str,
    pub key: Key,
    /// The `metadata.generation` this describes.
    pub generation: i64,
    /// The type its translation reaches proxies as.
    pub type_url: &'static str,
    /// The pods with a proxy it applies to, each with the snapshot version their proxy must be
    /// in sync with (that of the last change to what it receives).
    pub workloads: Vec<(Key, u64)>,
    /// Pods it selects that have no proxy (nothing enforces it there).
    pub without_proxy: usize,
    /// The revisions the sidecars of `workloads` were injected for, sorted.
    pub revisions: Vec<String>,
    /// Fields it sets that are not implemented yet (the field ledger's `not_yet`).
    pub not_implemented: Vec<String>,
    /// Whether anything of its kind is implemented (if not, it changes nothing at all).
    pub any_implemented: bool,
    /// What another object owns that it also claims, each naming the winner (`Accepted=False`).
    pub conflicts: Vec<String>,
    /// References that do not resolve, each naming it (`ResolvedRefs=False`).
    pub unresolved: Vec<String>,
    /// Values no proxy could use, each naming the field (`Accepted=False`; it is not sent).
    pub invalid: Vec<String>,
    /// Why it reaches no proxy at all, when it does not (`Ready=False`, `NotInEffect`).
    pub not_in_effect: Option<String>,
    /// A Gateway API route: the Service `parentRefs` (as written) its status is reported for.
    pub parents: Vec<serde_json::Value>,
    /// What a user should know of how it is enforced, that changes nothing (said in `Accepted`).
    pub notes: Vec<String>,
    /// Whether it is enforced as written while something it depends on is away: a global limit
    /// while the rate-limit service cannot reach Redis (`Degraded=True`, `Ready=False`). `None`
    /// for what has no such dependency (no `Degraded` condition).
    pub degraded: Option<Degraded>,
}

/// A dependency of a policy that is away, or that is there (for kinds that have one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Degraded {
    /// It is met: `Degraded=False`.
    No,
    /// It is not: `Degraded=True` with this reason and message.
    Yes { reason: &'static str, message: String },
}

/// The mesh as proxies see it, at one version.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    /// Whether every watch has listed once (before that the model is incomplete).
    pub synced: bool,
    pub types: BTreeMap<&'static str, Scoped>,
    /// Every policy object, sorted by kind and key.
    pub policies: Arc<Vec<PolicyReach>>,
}

impl Snapshot {
    /// The collection of `type_url` the proxy of pod `(namespace, pod)` is sent; empty for a
    /// registered type without one.
    pub fn collection(&self, type_url: &str, namespace: &str, pod: &str) -> &Collection {
        static EMPTY: std::sync::LazyLock<Collection> = std::sync::LazyLock::new(Collection::default);
        match self.types.get(type_url) {
            None => &EMPTY,
            Some(Scoped::Mesh(c)) => c,
            Some(Scoped::Workload { by_workload, by_namespace, default }) => {
                let key = (namespace.to_string(), pod.to_string());
                by_workload.get(&key).or_else(|| by_namespace.get(namespace)).unwrap_or(default)
            }
        }
    }

    /// The mesh-wide collection of `type_url`, if it is one.
    pub fn mesh(&self, type_url: &str) -> Option<&Collection> {
        match self.types.get(type_url) {
            Some(Scoped::Mesh(c)) => Some(c),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_change_log_answers_what_changed_since_a_version() {
        let log = ChangeLog::new(4, [(5, vec!["a".to_string()].into()), (6, vec!["b".to_string()].into())]);
        let s = Collection { log: Some(Arc::new(log)), ..Default::default() };
        assert_eq!(s.changed_since(6, 6).unwrap().len(), 0);
        assert_eq!(s.changed_since(6, 5).unwrap(), HashSet::from(["b"]));
        assert_eq!(s.changed_since(6, 4).unwrap(), HashSet::from(["a", "b"]));
        assert!(s.changed_since(6, 3).is_none());
    }

    #[test]
    fn versions_that_changed_nothing_of_a_type_leave_no_line_and_no_gap() {
        let mut log = ChangeLog::new(3, []);
        log.push(4, vec!["a".to_string()].into());
        log.push(5, Arc::from(Vec::<String>::new()));
        log.push(7, vec!["b".to_string()].into());
        let c = Collection { log: Some(Arc::new(log)), ..Default::default() };
        assert_eq!(c.changed_since(8, 5).unwrap(), HashSet::from(["b"]));
        assert_eq!(c.changed_since(8, 3).unwrap(), HashSet::from(["a", "b"]));
        assert!(Collection::default().changed_since(8, 5).is_none(), "no log: compare whole");
    }

    #[test]
    fn a_full_log_forgets_its_oldest_lines_and_says_so() {
        let mut log = ChangeLog::default();
        for v in 1..=(CHANGE_LOG as u64 + 2) {
            log.push(v, vec![format!("n{v}")].into());
        }
        let c = Collection { log: Some(Arc::new(log)), ..Default::default() };
        let last = CHANGE_LOG as u64 + 2;
        assert!(c.log_reaches(last, 2));
        assert!(!c.log_reaches(last, 1), "version 2's line is gone");
    }
}
