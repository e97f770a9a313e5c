//! Policy status: one writer for every policy kind. From what the model says each policy
//! reaches ([`PolicyReach`]) and what each connected proxy holds ([`Registry`]), it computes
//! `Accepted`, `ResolvedRefs` and `Ready` (with `observedGeneration` and a message a person can
//! act on) and server-side-applies them to the object's status subresource when they change.
//!
//! `Ready` means every proxy of every workload the policy applies to has acknowledged the
//! config that carries it. The writer counts the proxies connected to its own replica; a
//! revision running more than one control-plane replica reports `Ready=Unknown`
//! (`ReplicasNotAggregated`) rather than a count that leaves out the other replicas' proxies.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use mycel_crds::{
    Condition, destination_policy::DestinationPolicy, peer_authentication::PeerAuthentication,
    traffic_route::TrafficRoute,
};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::server::{ProxyStatus, Registry, clip};
use super::snapshot::{Degraded, Key, PolicyReach, Snapshot};
use super::translate::unimplemented::KINDS;

/// The field manager of the conditions.
pub const FIELD_MANAGER: &str = "mycel-control-plane";

/// Waiting proxies named in a message, at most.
const NAMED: usize = 5;

/// A condition's message, at most (bytes; Kubernetes allows 32 KiB).
const MESSAGE_BYTES: usize = 2048;

/// How long an object whose status write failed is left alone (unless its generation changes).
const RETRY_FAILED: Duration = Duration::from_secs(30);

/// A condition as the writer decides it, before times are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// For each pod, the newest snapshot version its proxies hold of each type (across streams).
pub type InSync = HashMap<Key, HashMap<String, u64>>;

/// What the registry says of the proxies.
#[derive(Default)]
pub struct Held {
    /// What each pod's proxy holds, from streams whose certificate names that pod.
    pub in_sync: InSync,
    /// Pods whose proxy rejected an update of a type (and has not accepted one of it since),
    /// with its reason, by type URL.
    pub rejected: HashMap<Key, HashMap<String, String>>,
    /// Pods with a stream whose certificate does not name its pod: what it says of the pod it is
    /// not proven, so it is not counted.
    pub unbound: HashSet<Key>,
}

/// What the registry says each pod's proxy holds, and the rejections they sent.
pub fn from_registry(proxies: &[ProxyStatus]) -> Held {
    let mut h = Held::default();
    for p in proxies {
        let key = (p.namespace.clone(), p.pod.clone());
        if !p.bound {
            h.unbound.insert(key);
            continue;
        }
        let types = h.in_sync.entry(key.clone()).or_default();
        for (type_url, t) in &p.types {
            if let Some(v) = t.in_sync {
                let e = types.entry(type_url.clone()).or_default();
                *e = (*e).max(v);
            }
            if let Some(n) = &t.last_nack
                && t.acked.is_none_or(|a| a < n.version)
            {
                h.rejected
                    .entry(key.clone())
                    .or_default()
                    .insert(type_url.clone(), format!("{}: {}", n.field, n.message));
            }
        }
    }
    h
}

/// What the writer knows of the control plane it runs in.
#[derive(Clone, Debug)]
pub struct Writer {
    pub revision: String,
    pub replicas: i32,
}

/// The fields named in a message, at most.
const FIELDS_NAMED: usize = 8;

/// The not-implemented fields an object sets, as a message names them.
fn fields_named(reach: &PolicyReach) -> String {
    let mut fields = reach.not_implemented.iter().take(FIELDS_NAMED).cloned().collect::<Vec<_>>().join(", ");
    if reach.not_implemented.len() > FIELDS_NAMED {
        fields.push_str(&format!(" and {} more", reach.not_implemented.len() - FIELDS_NAMED));
    }
    fields
}

/// The conditions of an object of a kind that does nothing yet.
fn inert(reach: &PolicyReach) -> Vec<Decided> {
    let kind = reach.kind;
    let fields = fields_named(reach);
    let what = if fields.is_empty() { String::new() } else { format!(" It sets {fields}.") };
    vec![
        Decided {
            type_: "Accepted",
            status: "False",
            reason: "FieldsNotImplemented",
            message: format!(
                "{kind} is not implemented yet: no proxy enforces it, and it changes no traffic.{what} (docs/reference/field-ledger.yaml lists what is)"
            ),
        },
        Decided {
            type_: "ResolvedRefs",
            status: "Unknown",
            reason: "NotImplemented",
            message: format!("the references of a {kind} are not resolved until {kind} is implemented"),
        },
        Decided {
            type_: "Ready",
            status: "False",
            reason: "NotImplemented",
            message: format!("{kind} is not implemented yet: nothing enforces it"),
        },
    ]
}

/// `Accepted` of an object its kind implements: in effect, but for the fields it sets that are
/// not implemented yet (named).
fn accepted(reach: &PolicyReach) -> Decided {
    if !reach.invalid.is_empty() && reach.kind == "RequestAuthentication" {
        return Decided {
            type_: "Accepted",
            status: "False",
            reason: "Invalid",
            message: format!(
                "generation {} has values no proxy can use; the rules that have them are sent without keys, so every token of their issuers is refused: {}",
                reach.generation,
                named_list(&reach.invalid)
            ),
        };
    }
    if !reach.invalid.is_empty() && reach.kind == "RateLimitPolicy" {
        return Decided {
            type_: "Accepted",
            status: "False",
            reason: "Invalid",
            message: format!(
                "generation {} has values no proxy can use; the limits that have them are not sent (the others are): {}",
                reach.generation,
                named_list(&reach.invalid)
            ),
        };
    }
    if !reach.invalid.is_empty() && reach.kind == "AuthorizationPolicy" {
        return Decided {
            type_: "Accepted",
            status: "False",
            reason: "Invalid",
            message: format!(
                "generation {} has values no proxy can use, so it is enforced in its fail-closed form (a DENY denies every request to what it selects, an ALLOW allows none): {}",
                reach.generation,
                named_list(&reach.invalid)
            ),
        };
    }
    if !reach.invalid.is_empty() {
        return Decided {
            type_: "Accepted",
            status: "False",
            reason: "Invalid",
            message: format!(
                "generation {} is not sent to any proxy: {}",
                reach.generation,
                named_list(&reach.invalid)
            ),
        };
    }
    if !reach.conflicts.is_empty() {
        return Decided {
            type_: "Accepted",
            status: "False",
            reason: "Conflicted",
            message: format!(
                "another route or policy claims what it names; it does not apply there: {}",
                named_list(&reach.conflicts)
            ),
        };
    }
    if reach.not_implemented.is_empty() {
        let mut message = format!("generation {} is translated into proxy config", reach.generation);
        if !reach.notes.is_empty() {
            message.push_str(&format!(". Note: {}", named_list(&reach.notes)));
        }
        return Decided { type_: "Accepted", status: "True", reason: "Accepted", message };
    }
    Decided {
        type_: "Accepted",
        status: "True",
        reason: "FieldsNotImplemented",
        message: format!(
            "generation {} is in effect except for fields not implemented yet, which change nothing: {} (docs/reference/field-ledger.yaml)",
            reach.generation,
            fields_named(reach)
        ),
    }
}

/// Sentences joined, at most [`FIELDS_NAMED`] of them.
fn named_list(v: &[String]) -> String {
    let mut s = v.iter().take(FIELDS_NAMED).cloned().collect::<Vec<_>>().join("; ");
    if v.len() > FIELDS_NAMED {
        s.push_str(&format!("; and {} more", v.len() - FIELDS_NAMED));
    }
    s
}

/// The conditions of one policy; `None` when another revision's control plane reports on it.
pub fn decide(reach: &PolicyReach, held: &Held, writer: &Writer) -> Option<Vec<Decided>> {
    if !reach.any_implemented {
        return Some(inert(reach));
    }
    // Each revision's control plane knows only its own proxies. Pods of one other revision:
    // its control plane writes. Of several: every revision writes the same Unknown.
    let other_revisions = !reach.revisions.is_empty() && reach.revisions != [writer.revision.as_str()];
    if other_revisions && reach.revisions.len() == 1 {
        return None;
    }
    let accepted = accepted(reach);
    let refs = if !reach.unresolved.is_empty() && reach.kind == "RequestAuthentication" {
        Decided {
            type_: "ResolvedRefs",
            status: "False",
            reason: "KeysNotFetched",
            message: format!(
                "{}; a rule whose keys were never fetched refuses every token of its issuer, one whose last fetch failed keeps the keys it had",
                named_list(&reach.unresolved)
            ),
        }
    } else if !reach.unresolved.is_empty() && reach.kind == "DestinationPolicy" {
        Decided {
            type_: "ResolvedRefs",
            status: "False",
            reason: "HostNotFound",
            message: format!("{}; it applies to nothing", named_list(&reach.unresolved)),
        }
    } else if !reach.unresolved.is_empty() && reach.kind == "AuthorizationPolicy" {
        Decided {
            type_: "ResolvedRefs",
            status: "False",
            reason: "ProviderNotFound",
            message: format!(
                "{}; add it to the installation's spec.extensionProviders or name one there",
                named_list(&reach.unresolved)
            ),
        }
    } else if !reach.unresolved.is_empty() {
        Decided {
            type_: "ResolvedRefs",
            status: "False",
            reason: "BackendNotFound",
            message: format!(
                "{}; what does not resolve is left out (a backend that does not gets its share answered 503)",
                named_list(&reach.unresolved)
            ),
        }
    } else if reach.kind == "RequestAuthentication" {
        Decided {
            type_: "ResolvedRefs",
            status: "True",
            reason: "ResolvedRefs",
            message: "every key set is inline or was fetched from its jwksUri".into(),
        }
    } else if matches!(reach.kind, "PeerAuthentication" | "AuthorizationPolicy" | "RateLimitPolicy") {
        Decided {
            type_: "ResolvedRefs",
            status: "True",
            reason: "ResolvedRefs",
            message: format!("a {} refers to no other object", reach.kind),
        }
    } else {
        Decided {
            type_: "ResolvedRefs",
            status: "True",
            reason: "ResolvedRefs",
            message: "every host and backend it names resolves".into(),
        }
    };
    let no_proxy = match reach.without_proxy {
        0 => String::new(),
        n => format!(
            "; {n} selected pod(s) have no Mycel sidecar, so nothing enforces it there (label their namespace for injection and restart them)"
        ),
    };
    let total = reach.workloads.len();
    let replicas = writer.replicas;
    let ready = if other_revisions {
        Decided {
            type_: "Ready",
            status: "Unknown",
            reason: "RevisionsNotAggregated",
            message: format!(
                "the {total} selected workload(s) run sidecars of revisions {}: each revision's control plane knows only its own proxies, so none can say whether all of them have it",
                reach.revisions.join(", ")
            ),
        }
    } else if replicas > 1 {
        Decided {
            type_: "Ready",
            status: "Unknown",
            reason: "ReplicasNotAggregated",
            message: format!(
                "the control plane runs {replicas} replicas and each knows only its own proxies; with one replica Ready counts every proxy that has this policy ({total} workload(s) selected{no_proxy})"
            ),
        }
    } else if let Some(why) = &reach.not_in_effect {
        Decided { type_: "Ready", status: "False", reason: "NotInEffect", message: why.clone() }
    } else if total == 0 && reach.without_proxy > 0 {
        Decided {
            type_: "Ready",
            status: "False",
            reason: "NoProxies",
            message: format!(
                "it selects {} pod(s), none with a Mycel sidecar: nothing enforces it; label their namespace for injection and restart them",
                reach.without_proxy
            ),
        }
    } else {
        let mut waiting = Vec::new();
        let mut rejections = Vec::new();
        for (pod, since) in &reach.workloads {
            let has = held.in_sync.get(pod).and_then(|t| t.get(reach.type_url)).copied();
            if has.is_none_or(|v| v < *since) {
                let what = match (has, held.rejected.get(pod).and_then(|r| r.get(reach.type_url))) {
                    (_, Some(why)) => {
                        rejections.push(format!("{}/{} rejected it ({why})", pod.0, pod.1));
                        continue;
                    }
                    (None, _) if held.unbound.contains(pod) => {
                        "connected with a certificate that does not name its pod (issued before pod binding: counted once renewed)"
                    }
                    (None, _) => "not connected",
                    (Some(_), _) => "not acknowledged yet",
                };
                waiting.push(format!("{}/{} ({what})", pod.0, pod.1));
            }
        }
        let named = |v: &[String]| {
            let mut s = v.iter().take(NAMED).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > NAMED {
                s.push_str(&format!(" and {} more", v.len() - NAMED));
            }
            s
        };
        if !rejections.is_empty() {
            Decided {
                type_: "Ready",
                status: "False",
                reason: "Rejected",
                message: format!(
                    "{} of {total} workload proxies have it; {}{no_proxy}",
                    total - waiting.len() - rejections.len(),
                    named(&rejections)
                ),
            }
        } else if !waiting.is_empty() {
            Decided {
                type_: "Ready",
                status: "False",
                reason: "Pending",
                message: format!(
                    "{} of {total} workload proxies have it; waiting for {}{no_proxy}",
                    total - waiting.len(),
                    named(&waiting)
                ),
            }
        } else if total == 0 {
            Decided {
                type_: "Ready",
                status: "True",
                reason: "Ready",
                message: "it selects no workloads yet; their proxies receive it as they start".into(),
            }
        } else {
            Decided {
                type_: "Ready",
                status: "True",
                reason: "Ready",
                message: format!(
                    "in effect: the proxies of all {total} selected workload(s) acknowledged it{no_proxy}"
                ),
            }
        }
    };
    let mut conditions = vec![accepted, refs, ready];
    match &reach.degraded {
        None => {}
        // Each revision's control plane knows its own rate-limit service only.
        Some(_) if other_revisions => conditions.push(Decided {
            type_: "Degraded",
            status: "Unknown",
            reason: "RevisionsNotAggregated",
            message: "its workloads run sidecars of several revisions, each counted by its own revision's rate-limit service".into(),
        }),
        Some(Degraded::No) => conditions.push(Decided {
            type_: "Degraded",
            status: "False",
            reason: "AsExpected",
            message: "the rate-limit service that counts its global limits has a ready replica, which reaches Redis".into(),
        }),
        Some(Degraded::Yes { reason, message }) => {
            if conditions[2].status == "True" {
                conditions[2] = Decided {
                    type_: "Ready",
                    status: "False",
                    reason,
                    message: format!("its global limits are not counted: {message}"),
                };
            }
            conditions.push(Decided { type_: "Degraded", status: "True", reason, message: message.clone() });
        }
    }
    Some(conditions)
}

/// What was last written to each object, with when each condition's status last changed.
type Written = HashMap<(&'static str, Key), (i64, Vec<(Decided, Time)>)>;

/// The conditions objects had when this control plane first saw them: (type, status, when it
/// became so), so that a restarted control plane keeps the transition times of what did not
/// change.
type Seen = HashMap<(&'static str, Key), Vec<(String, String, Time)>>;

/// When condition `d` became what it is: as last written, else as the object already said, else
/// now.
fn since(
    previous: Option<&Vec<(Decided, Time)>>,
    seen: Option<&Vec<(String, String, Time)>>,
    d: &Decided,
    now: &Time,
) -> Time {
    if let Some(c) = previous {
        // Written by this control plane: its own record decides.
        return c
            .iter()
            .find(|(p, _)| p.type_ == d.type_ && p.status == d.status)
            .map_or_else(|| now.clone(), |(_, t)| t.clone());
    }
    seen.and_then(|c| c.iter().find(|(t, s, _)| t == d.type_ && s == d.status))
        .map_or_else(|| now.clone(), |(_, _, t)| t.clone())
}

/// The conditions every object of `kind` has now (one list; none for a kind whose status is not
/// a plain condition list, or when the list fails).
async fn seen_of(client: &Client, kind: &'static str) -> Seen {
    let Some(resource) = resource_of(kind) else { return Seen::new() };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let list = match api.list(&Default::default()).await {
        Ok(l) => l,
        Err(e) => {
            warn!(kind, error = %e, "cannot read the conditions objects have: their transition times start now");
            return Seen::new();
        }
    };
    list.items
        .into_iter()
        .filter_map(|o| {
            let key = (o.metadata.namespace.clone()?, o.metadata.name.clone()?);
            let conditions: Vec<Condition> =
                serde_json::from_value(o.data["status"]["conditions"].clone()).ok()?;
            let v = conditions.into_iter().map(|c| (c.type_, c.status, c.last_transition_time)).collect();
            Some(((kind, key), v))
        })
        .collect()
}

/// Where objects of a kind are written.
fn resource_of(kind: &str) -> Option<ApiResource> {
    Some(match kind {
        "PeerAuthentication" => ApiResource::erase::<PeerAuthentication>(&()),
        "AuthorizationPolicy" => {
            ApiResource::erase::<mycel_crds::authorization_policy::AuthorizationPolicy>(&())
        }
        "RequestAuthentication" => {
            ApiResource::erase::<mycel_crds::request_authentication::RequestAuthentication>(&())
        }
        "RateLimitPolicy" => ApiResource::erase::<mycel_crds::rate_limit_policy::RateLimitPolicy>(&()),
        "TrafficRoute" => ApiResource::erase::<TrafficRoute>(&()),
        "DestinationPolicy" => ApiResource::erase::<DestinationPolicy>(&()),
        kind => KINDS.iter().find(|k| k.kind == kind)?.resource.clone(),
    })
}

/// Writes policy status until the snapshots end: after every snapshot and every change of what
/// proxies hold, coalesced over `settle`.
pub async fn run(
    client: Client,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
    writer: Writer,
    settle: Duration,
) {
    let mut written: Written = HashMap::new();
    let (mut seen, mut seen_kinds): (Seen, HashSet<&'static str>) = Default::default();
    // Objects whose last write failed, not tried again before the instant unless their
    // generation changes: a write the API server refuses is not repeated at every wake.
    let mut failed: HashMap<(&'static str, Key), (tokio::time::Instant, i64)> = HashMap::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if snap.synced && !snap.policies.is_empty() {
            let held = from_registry(&registry.list());
            let live: HashSet<(&'static str, Key)> =
                snap.policies.iter().map(|r| (r.kind, r.key.clone())).collect();
            written.retain(|k, _| live.contains(k));
            failed.retain(|k, _| live.contains(k));
            for reach in snap.policies.iter() {
                if seen_kinds.insert(reach.kind) {
                    seen.extend(seen_of(&client, reach.kind).await);
                }
            }
            for reach in snap.policies.iter() {
                let Some(decided) = decide(reach, &held, &writer) else { continue };
                let id = (reach.kind, reach.key.clone());
                if failed
                    .get(&id)
                    .is_some_and(|(until, g)| *g == reach.generation && tokio::time::Instant::now() < *until)
                {
                    continue;
                }
                let previous = written.get(&id);
                if previous.is_some_and(|(g, c)| {
                    *g == reach.generation && c.iter().map(|(d, _)| d).eq(decided.iter())
                }) {
                    continue;
                }
                let now = Time(Timestamp::now());
                let with_times: Vec<(Decided, Time)> = decided
                    .into_iter()
                    .map(|d| {
                        let t = since(previous.map(|(_, c)| c), seen.get(&id), &d, &now);
                        (d, t)
                    })
                    .collect();
                match write(&client, reach, &with_times).await {
                    Ok(()) => {
                        debug!(kind = reach.kind, namespace = %reach.key.0, name = %reach.key.1, "status written");
                        failed.remove(&id);
                        seen.remove(&id);
                        written.insert(id, (reach.generation, with_times));
                    }
                    // Gone meanwhile, refused, or the API server is away: tried again later.
                    Err(e) => {
                        failed.insert(id, (tokio::time::Instant::now() + RETRY_FAILED, reach.generation));
                        warn!(kind = reach.kind, namespace = %reach.key.0, name = %reach.key.1, error = %e, "cannot write policy status")
                    }
                }
            }
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = registry.changed.notified() => {}
            // A failed write is retried even when nothing else happens.
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        tokio::time::sleep(settle).await;
    }
}

async fn write(client: &Client, reach: &PolicyReach, conditions: &[(Decided, Time)]) -> kube::Result<()> {
    if reach.kind == "HTTPRoute" || reach.kind == "GRPCRoute" {
        return write_route_parents(client, reach, conditions).await;
    }
    let conditions: Vec<Condition> = conditions
        .iter()
        .map(|(d, t)| Condition {
            type_: d.type_.into(),
            status: d.status.into(),
            reason: d.reason.into(),
            message: clip(&d.message, MESSAGE_BYTES),
            last_transition_time: t.clone(),
            observed_generation: Some(reach.generation),
        })
        .collect();
    let patch = json!({
        "apiVersion": "mycel.io/v1alpha1",
        "kind": reach.kind,
        "status": {"observedGeneration": reach.generation, "conditions": conditions},
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let Some(resource) = resource_of(reach.kind) else {
        warn!(kind = reach.kind, "no status writer for this kind");
        return Ok(());
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &reach.key.0, &resource);
    api.patch_status(&reach.key.1, &params, &Patch::Apply(&patch)).await.map(|_| ())
}

/// A condition as the Gateway API names its reasons (`Invalid` is its `UnsupportedValue`, an
/// unresolved backend its `BackendNotFound`).
fn gateway_condition(d: &Decided, t: &Time, generation: i64) -> serde_json::Value {
    let reason = match (d.type_, d.reason) {
        ("Accepted", "Invalid") => "UnsupportedValue",
        (_, r) => r,
    };
    json!({
        "type": d.type_, "status": d.status, "reason": reason,
        "message": clip(&d.message, MESSAGE_BYTES), "lastTransitionTime": t,
        "observedGeneration": generation,
    })
}

/// A Gateway API route's status: one entry per Service parent in `status.parents`, under Mycel's
/// controller name; other controllers' entries are kept. The list is atomic, so it is read and
/// written back whole, on the read's resourceVersion (a write that raced another fails, and is
/// tried again later).
async fn write_route_parents(
    client: &Client,
    reach: &PolicyReach,
    conditions: &[(Decided, Time)],
) -> kube::Result<()> {
    let resource = if reach.kind == "GRPCRoute" {
        ApiResource::erase::<mycel_crds::gateway::GRPCRoute>(&())
    } else {
        ApiResource::erase::<mycel_crds::gateway::HTTPRoute>(&())
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &reach.key.0, &resource);
    let current = api.get_status(&reach.key.1).await?;
    let controller = super::translate::gamma::CONTROLLER;
    let listed = current.data["status"]["parents"].as_array().cloned().unwrap_or_default();
    let had_ours = listed.iter().any(|p| p["controllerName"] == controller);
    // No Service parent any more, and no entry of ours to remove: nothing to write.
    if reach.parents.is_empty() && !had_ours {
        return Ok(());
    }
    let mut parents: Vec<serde_json::Value> =
        listed.into_iter().filter(|p| p["controllerName"] != controller).collect();
    // At most 32 entries (the CRD's bound): ours are kept, others' first ones with them.
    let ours = reach.parents.len().min(32);
    parents.truncate(32 - ours);
    let conditions: Vec<serde_json::Value> =
        conditions.iter().map(|(d, t)| gateway_condition(d, t, reach.generation)).collect();
    for p in reach.parents.iter().take(ours) {
        parents.push(json!({"parentRef": p, "controllerName": controller, "conditions": conditions}));
    }
    let patch = json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "status": {"parents": parents},
    });
    api.patch_status(&reach.key.1, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_when_it_became_so_across_restarts() {
        let at = |s: &str| Time(s.parse().unwrap());
        let (then, now) = (at("2026-11-01T10:00:00Z"), at("2026-12-03T10:00:00Z"));
        let ready = |status| Decided { type_: "Ready", status, reason: "Ready", message: String::new() };
        // A fresh control plane: the object's own condition, when its status is the same.
        let seen = vec![("Ready".to_string(), "True".to_string(), then.clone())];
        assert_eq!(since(None, Some(&seen), &ready("True"), &now), then);
        assert_eq!(since(None, Some(&seen), &ready("False"), &now), now, "a transition is now");
        assert_eq!(since(None, None, &ready("True"), &now), now, "never seen: now");
        // Once written, the control plane's own record decides.
        let written = vec![(ready("True"), at("2026-12-01T00:00:00Z"))];
        assert_eq!(since(Some(&written), Some(&seen), &ready("True"), &now), written[0].1);
        assert_eq!(since(Some(&written), Some(&seen), &ready("False"), &now), now);
    }

    fn key(ns: &str, n: &str) -> Key {
        (ns.into(), n.into())
    }

    fn reach(workloads: Vec<(Key, u64)>, without_proxy: usize) -> PolicyReach {
        PolicyReach {
            kind: "PeerAuthentication",
            key: key("shop", "default"),
            generation: 4,
            type_url: mycel_api::PEER_POLICY_TYPE,
            workloads,
            without_proxy,
            revisions: vec!["default".into()],
            not_implemented: Vec::new(),
            any_implemented: true,
            conflicts: Vec::new(),
            unresolved: Vec::new(),
            invalid: Vec::new(),
            not_in_effect: None,
            parents: Vec::new(),
            notes: Vec::new(),
            degraded: None,
        }
    }

    #[test]
    fn a_route_that_lost_its_host_or_names_what_is_not_there_says_so() {
        let lost = PolicyReach {
            kind: "TrafficRoute",
            conflicts: vec!["host web: TrafficRoute shop/older is older and routes Service shop/web".into()],
            unresolved: vec!["spec.http[0].backends[1]: no Service gone in namespace shop".into()],
            ..reach(vec![], 0)
        };
        let d = decide(&lost, &held(&[]), writer(1));
        assert_eq!((d[0].status, d[0].reason), ("False", "Conflicted"));
        assert!(d[0].message.contains("TrafficRoute shop/older"), "{}", d[0].message);
        assert_eq!((d[1].status, d[1].reason), ("False", "BackendNotFound"));
        assert!(d[1].message.contains("no Service gone"), "{}", d[1].message);
        let bad = PolicyReach { invalid: vec!["spec.http[0].match[0].path.regex: bad".into()], ..lost };
        let d = decide(&bad, &held(&[]), writer(1));
        assert_eq!((d[0].status, d[0].reason), ("False", "Invalid"));
    }

    fn held(pods: &[(&str, u64)]) -> Held {
        let in_sync = pods
            .iter()
            .map(|(p, v)| (key("shop", p), HashMap::from([(mycel_api::PEER_POLICY_TYPE.to_string(), *v)])))
            .collect();
        Held { in_sync, ..Default::default() }
    }

    fn writer(replicas: i32) -> Writer {
        Writer { revision: "default".into(), replicas }
    }

    fn decide(r: &PolicyReach, h: &Held, w: Writer) -> Vec<Decided> {
        super::decide(r, h, &w).expect("this revision reports on it")
    }

    fn ready(d: &[Decided]) -> &Decided {
        d.iter().find(|c| c.type_ == "Ready").unwrap()
    }

    #[test]
    fn ready_waits_for_every_selected_proxy_to_hold_the_version_that_carries_it() {
        let r = reach(vec![(key("shop", "a"), 5), (key("shop", "b"), 7)], 0);
        let d = decide(&r, &held(&[("a", 9), ("b", 6)]), writer(1));
        assert_eq!(ready(&d).status, "False");
        assert_eq!(ready(&d).reason, "Pending");
        assert_eq!(
            ready(&d).message,
            "1 of 2 workload proxies have it; waiting for shop/b (not acknowledged yet)"
        );
        let d = decide(&r, &held(&[("a", 9)]), writer(1));
        assert!(ready(&d).message.contains("shop/b (not connected)"), "{}", ready(&d).message);
        let d = decide(&r, &held(&[("a", 9), ("b", 7)]), writer(1));
        assert_eq!((ready(&d).status, ready(&d).reason), ("True", "Ready"));
        assert!(ready(&d).message.contains("all 2"), "{}", ready(&d).message);
        assert_eq!(d.iter().map(|c| c.type_).collect::<Vec<_>>(), ["Accepted", "ResolvedRefs", "Ready"]);
    }

    #[test]
    fn global_limits_are_not_ready_while_the_rate_limit_service_cannot_count_them() {
        let r = PolicyReach {
            kind: "RateLimitPolicy",
            degraded: Some(Degraded::No),
            ..reach(vec![(key("shop", "a"), 5)], 0)
        };
        let d = decide(&r, &held(&[("a", 5)]), writer(1));
        assert_eq!((ready(&d).status, ready(&d).reason), ("True", "Ready"));
        let degraded = d.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!((degraded.status, degraded.reason), ("False", "AsExpected"));
        let away = PolicyReach {
            degraded: Some(Degraded::Yes {
                reason: "RateLimitServiceUnavailable",
                message: "no ready replica".into(),
            }),
            ..r.clone()
        };
        let d = decide(&away, &held(&[("a", 5)]), writer(1));
        assert_eq!((ready(&d).status, ready(&d).reason), ("False", "RateLimitServiceUnavailable"));
        assert!(ready(&d).message.contains("no ready replica"), "{}", ready(&d).message);
        let degraded = d.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!((degraded.status, degraded.reason), ("True", "RateLimitServiceUnavailable"));
        // A proxy that has not acknowledged it yet is said first.
        let d = decide(&away, &held(&[("a", 4)]), writer(1));
        assert_eq!(ready(&d).reason, "Pending");
        assert_eq!(d.iter().find(|c| c.type_ == "Degraded").unwrap().status, "True");
        // Kinds without such a dependency have no Degraded condition.
        let d = decide(&reach(vec![], 0), &held(&[]), writer(1));
        assert!(d.iter().all(|c| c.type_ != "Degraded"));
    }

    #[test]
    fn a_rejection_and_pods_without_a_sidecar_are_named() {
        let r = reach(vec![(key("shop", "a"), 5)], 2);
        let mut h = held(&[("a", 3)]);
        h.rejected = HashMap::from([(
            key("shop", "a"),
            HashMap::from([(mycel_api::PEER_POLICY_TYPE.to_string(), "inbound: bad".to_string())]),
        )]);
        let d = decide(&r, &h, writer(1));
        assert_eq!(ready(&d).reason, "Rejected");
        assert!(ready(&d).message.contains("shop/a rejected it (inbound: bad)"), "{}", ready(&d).message);
        assert!(
            ready(&d).message.contains("2 selected pod(s) have no Mycel sidecar"),
            "{}",
            ready(&d).message
        );
        let d = decide(&reach(vec![], 3), &Held::default(), writer(1));
        assert_eq!((ready(&d).status, ready(&d).reason), ("False", "NoProxies"));
        let d = decide(&reach(vec![], 0), &Held::default(), writer(1));
        assert_eq!(ready(&d).status, "True", "nothing selected yet: nothing to wait for");
    }

    #[test]
    fn a_kind_not_implemented_yet_is_not_accepted_and_names_what_it_sets() {
        let mut r = reach(vec![], 0);
        r.kind = "SomeKind";
        r.any_implemented = false;
        r.not_implemented = vec!["spec.limits[].requests".into(), "spec.limits[].unit".into()];
        let d = decide(&r, &Held::default(), writer(1));
        let accepted = d.iter().find(|c| c.type_ == "Accepted").unwrap();
        assert_eq!((accepted.status, accepted.reason), ("False", "FieldsNotImplemented"));
        assert!(
            accepted.message.contains("spec.limits[].requests, spec.limits[].unit"),
            "{}",
            accepted.message
        );
        assert_eq!((ready(&d).status, ready(&d).reason), ("False", "NotImplemented"));
        // A kind partly implemented: accepted, with the fields named; Ready as for any policy.
        r.any_implemented = true;
        r.workloads = vec![(key("shop", "a"), 5)];
        let d = decide(&r, &held(&[("a", 5)]), writer(1));
        let accepted = d.iter().find(|c| c.type_ == "Accepted").unwrap();
        assert_eq!((accepted.status, accepted.reason), ("True", "FieldsNotImplemented"));
        assert_eq!(ready(&d).status, "True");
    }

    #[test]
    fn pods_of_another_revision_are_left_to_its_control_plane_and_mixed_ones_are_unknown() {
        let mut r = reach(vec![(key("shop", "a"), 5)], 0);
        r.revisions = vec!["canary".into()];
        assert!(super::decide(&r, &held(&[("a", 9)]), &writer(1)).is_none(), "canary's to write");
        r.revisions = vec!["canary".into(), "default".into()];
        let d = decide(&r, &held(&[("a", 9)]), writer(1));
        assert_eq!((ready(&d).status, ready(&d).reason), ("Unknown", "RevisionsNotAggregated"));
        let canary = Writer { revision: "canary".into(), replicas: 1 };
        assert_eq!(super::decide(&r, &held(&[]), &canary).unwrap(), d, "both revisions write the same");
    }

    #[test]
    fn with_several_replicas_ready_is_unknown_not_a_partial_count() {
        let r = reach(vec![(key("shop", "a"), 5)], 0);
        let d = decide(&r, &held(&[("a", 9)]), writer(2));
        assert_eq!((ready(&d).status, ready(&d).reason), ("Unknown", "ReplicasNotAggregated"));
    }

    #[test]
    fn a_nack_followed_by_an_ack_is_no_longer_a_rejection() {
        use super::super::server::{Nack, TypeStatus};
        let mut p = ProxyStatus {
            pod: "a".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            identity: String::new(),
            revision: String::new(),
            proxy_version: String::new(),
            bound: true,
            remote: String::new(),
            connected_at: String::new(),
            types: Default::default(),
        };
        let nack = Nack { version: 3, field: "inbound".into(), message: "bad".into(), at: String::new() };
        p.types.insert(
            mycel_api::PEER_POLICY_TYPE.into(),
            TypeStatus { acked: Some(2), in_sync: Some(2), last_nack: Some(nack), ..Default::default() },
        );
        let h = from_registry(std::slice::from_ref(&p));
        assert_eq!(h.in_sync[&key("shop", "a")][mycel_api::PEER_POLICY_TYPE], 2);
        assert!(h.rejected.contains_key(&key("shop", "a")));
        p.types.get_mut(mycel_api::PEER_POLICY_TYPE).unwrap().acked = Some(4);
        assert!(from_registry(std::slice::from_ref(&p)).rejected.is_empty());
        // A stream whose certificate does not name its pod is not counted for it.
        p.bound = false;
        let h = from_registry(&[p]);
        assert!(h.in_sync.is_empty() && h.unbound.contains(&key("shop", "a")));
    }
}
