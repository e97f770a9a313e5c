//! TrafficRoute → route tables: one `mycel.io/Route` resource per routed cluster (a Service
//! port), with the route's HTTP rules that apply to that port, in order.
//!
//! Hosts and backends are resolved against the Services the model knows; what does not resolve
//! is reported (`ResolvedRefs=False`, naming it) and left out, never guessed. Two routes for one
//! Service resolve oldest first, then by namespace and name: the loser does not apply to that
//! Service and says so (`Accepted=False`, `Conflicted`, naming the winner).

use std::collections::{BTreeMap, HashMap};

use mycel_api::v1alpha1 as pb;
use mycel_crds::{
    common::{NamedMatch, StringMatch},
    traffic_route::{Backend, HeaderEdits, HttpRoute, TcpRoute, TrafficRoute, TrafficRouteSpec},
};

use crate::controlplane::discovery::Svc;
use crate::controlplane::snapshot::Key;

/// A route as translation needs it: a TrafficRoute, or a Gateway API route attached to a
/// Service, turned into the same shape ([`super::gamma`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Tr {
    /// `TrafficRoute`, `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    /// `metadata.creationTimestamp` (RFC 3339, so it sorts as it reads).
    pub created: String,
    pub spec: TrafficRouteSpec,
    /// The fields it sets that are not implemented yet.
    pub not_implemented: Vec<String>,
    /// Where each of `spec.http` came from in the object, when that is not `spec.http[i]` (an
    /// HTTPRoute's rules are split into one per match and ordered by precedence).
    pub fields: Vec<String>,
    /// Likewise for the one match of each of `spec.http` (`spec.rules[i].matches[j]`).
    pub match_fields: Vec<String>,
    /// Its path prefixes match whole path elements (Gateway API's `PathPrefix`), not bytes.
    pub element_prefixes: bool,
    /// Gateway API: the Service parents (as written) that status is reported for.
    pub parents: Vec<serde_json::Value>,
    /// Gateway API: the precedence of each of `spec.http` (lower first), by which the rules of
    /// several HTTPRoutes for one Service are merged.
    pub precedence: Vec<Precedence>,
}

/// A Gateway API match's rank (lower first): the path kind (exact, prefix, regex), the path's
/// length (longer first), a method match first, more header matches, more query parameter
/// matches.
pub type Precedence =
    (u8, std::cmp::Reverse<usize>, bool, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>);

/// A route's identity across kinds: `(kind, (namespace, name))`.
pub type RouteKey = (&'static str, Key);

impl Tr {
    pub fn from_object(r: TrafficRoute, not_implemented: Vec<String>) -> Tr {
        Tr {
            kind: "TrafficRoute",
            namespace: r.metadata.namespace.clone().unwrap_or_default(),
            name: r.metadata.name.clone().unwrap_or_default(),
            generation: r.metadata.generation.unwrap_or_default(),
            created: r.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
            spec: r.spec,
            not_implemented,
            fields: Vec::new(),
            match_fields: Vec::new(),
            element_prefixes: false,
            parents: Vec::new(),
            precedence: Vec::new(),
        }
    }

    fn label(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    pub fn key(&self) -> RouteKey {
        (self.kind, (self.namespace.clone(), self.name.clone()))
    }

    /// The object's field that `spec.http[i]` came from.
    fn http_field(&self, i: usize) -> String {
        self.fields.get(i).cloned().unwrap_or_else(|| format!("spec.http[{i}]"))
    }
}

/// What one TrafficRoute became.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Cluster → its table.
    pub tables: BTreeMap<String, pb::RouteTable>,
    /// The namespaces its tables apply to; `None`: every namespace.
    pub export_to: Option<Vec<String>>,
    /// References that do not resolve, each a sentence naming it.
    pub unresolved: Vec<String>,
    /// Hosts another route owns, each a sentence naming the winner.
    pub conflicts: Vec<String>,
    /// Values the proxy could not use (a regular expression that does not compile).
    pub invalid: Vec<String>,
}

/// The Service a host names, seen from `namespace`: `name`, `name.ns`, `name.ns.svc` or
/// `name.ns.svc.<domain>`.
pub fn service_of(host: &str, namespace: &str, domain: &str) -> Option<Key> {
    let host =
        host.strip_suffix(&format!(".svc.{domain}")).or_else(|| host.strip_suffix(".svc")).unwrap_or(host);
    let mut parts = host.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), None, _) => Some((namespace.to_string(), name.to_string())),
        (Some(name), Some(ns), None) => Some((ns.to_string(), name.to_string())),
        _ => None,
    }
}

/// What a backend's subset is, as the Service's DestinationPolicy defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subset {
    /// The Service's policy has no such subset (or the Service has no policy).
    Undefined,
    /// Defined, but no ready endpoint carries its labels.
    Empty,
    Ready,
}

/// How a subset of a Service is found: `(service, subset cluster, subset name)`.
pub type Subsets<'a> = dyn Fn(&Key, &str, &str) -> Subset + 'a;

/// What translation looks things up in.
struct Lookup<'a> {
    services: &'a dyn Fn(&Key) -> Option<Svc>,
    subsets: &'a Subsets<'a>,
    domain: &'a str,
}

/// Translates every TrafficRoute: conflicts decided over all of them, oldest first.
pub fn translate(
    routes: &[&Tr],
    services: &dyn Fn(&Key) -> Option<Svc>,
    subsets: &Subsets,
    domain: &str,
) -> HashMap<RouteKey, Outcome> {
    let cx = Lookup { services, subsets, domain };
    let mut order: Vec<&Tr> = routes.to_vec();
    order.sort_by(|a, b| {
        (&a.created, &a.namespace, &a.name, a.kind).cmp(&(&b.created, &b.namespace, &b.name, b.kind))
    });
    // Service → the label of the route that owns it, and (an HTTPRoute) its namespace.
    let mut owner: HashMap<Key, (String, Option<String>)> = HashMap::new();
    // Service → the HTTPRoutes of one namespace that route it, merged (in `order`'s order), with
    // the clients they are exported to.
    let mut merged: HashMap<Key, (Vec<usize>, Vec<String>)> = HashMap::new();
    let mut out: HashMap<RouteKey, Outcome> = HashMap::new();
    // A route that proxies could not use claims nothing.
    for tr in &order {
        let mut o = Outcome { export_to: export_to(tr), ..Default::default() };
        for (i, r) in tr.spec.http.iter().enumerate() {
            rule(r, i, None, tr, &cx, &mut o);
        }
        o.invalid.sort();
        o.invalid.dedup();
        o.unresolved.clear();
        out.insert(tr.key(), o);
    }
    // Routes of a Service's own namespace claim it first (for every client they are exported
    // to); a route naming another namespace's Service applies to its own namespace's clients
    // only, and only where no route of that Service's namespace claimed it.
    for foreign in [false, true] {
        for (rank, tr) in order.iter().enumerate() {
            let o = out.get_mut(&tr.key()).expect("every route has an outcome");
            if !o.invalid.is_empty() {
                continue;
            }
            let source = tr.label();
            for host in &tr.spec.hosts {
                let Some(svc_key) = service_of(&host.0, &tr.namespace, domain) else {
                    if !foreign {
                        o.unresolved.push(format!(
                            "host {}: not a Service name (name, name.namespace or name.namespace.svc.{domain})",
                            host.0
                        ));
                    }
                    continue;
                };
                if (svc_key.0 != tr.namespace) != foreign {
                    continue;
                }
                let Some(svc) = services(&svc_key) else {
                    o.unresolved.push(format!(
                        "host {}: no Service {} in namespace {}",
                        host.0, svc_key.1, svc_key.0
                    ));
                    continue;
                };
                let export: Vec<String> = if foreign {
                    // Its own namespace's clients, if it is exported to them at all.
                    match &o.export_to {
                        Some(ns) if !ns.contains(&tr.namespace) => {
                            o.unresolved.push(format!(
                                "host {}: a route for another namespace's Service applies to its own namespace's clients only, and exportTo leaves them out",
                                host.0
                            ));
                            continue;
                        }
                        _ => vec![tr.namespace.clone()],
                    }
                } else {
                    o.export_to.clone().unwrap_or_default()
                };
                let gateway = (tr.kind != "TrafficRoute").then(|| tr.namespace.clone());
                match owner.get(&svc_key) {
                    // Gateway API routes of one namespace for one Service merge, as the Gateway
                    // API says.
                    Some((_, Some(ns))) if gateway.as_ref() == Some(ns) => {
                        merged.entry(svc_key.clone()).or_default().0.push(rank);
                        continue;
                    }
                    Some((winner, _)) => {
                        o.conflicts.push(format!(
                            "host {}: {winner} routes Service {}/{} (a route of the Service's own namespace first, then the oldest, then by namespace and name)",
                            host.0, svc_key.0, svc_key.1
                        ));
                        continue;
                    }
                    None => {}
                }
                owner.insert(svc_key.clone(), (source.clone(), gateway.clone()));
                if gateway.is_some() {
                    // Its tables are made below, with those of the routes merged into it.
                    merged.insert(svc_key.clone(), (vec![rank], export));
                    continue;
                }
                for (_, port) in &svc.ports {
                    let cluster = cluster_name(&svc_key, *port, domain);
                    let http: Vec<pb::HttpRule> = tr
                        .spec
                        .http
                        .iter()
                        .enumerate()
                        .filter_map(|(i, r)| rule(r, i, Some(*port), tr, &cx, o))
                        .collect();
                    // The first TCP rule for this port, if any.
                    let tcp: Vec<pb::TcpRule> = tr
                        .spec
                        .tcp
                        .iter()
                        .enumerate()
                        .find(|(_, r)| r.port.is_none_or(|p| p == *port))
                        .map(|(i, r)| tcp_rule(r, i, tr, &cx, o))
                        .into_iter()
                        .collect();
                    // No rule for this port: its requests are not routed.
                    if http.is_empty() && tcp.is_empty() {
                        continue;
                    }
                    let table = pb::RouteTable {
                        name: cluster.clone(),
                        source: source.clone(),
                        export_to: export.clone(),
                        http,
                        tcp,
                    };
                    o.tables.insert(cluster, table);
                }
            }
        }
    }
    // Merged HTTPRoutes: one table per port of the Service, their rules ordered by precedence
    // across the routes (ties: the older route, then namespace and name, then its order), held
    // by each of them (for its status).
    let mut services_merged: Vec<&Key> = merged.keys().collect();
    services_merged.sort();
    for svc_key in services_merged {
        let (ranks, export) = &merged[svc_key];
        let Some(svc) = services(svc_key) else { continue };
        let labels: Vec<String> = ranks.iter().map(|r| order[*r].label()).collect();
        let source = match labels.len() {
            1 => labels[0].clone(),
            n => format!("{} (and {} more)", labels[0], n - 1),
        };
        for (_, port) in &svc.ports {
            let cluster = cluster_name(svc_key, *port, domain);
            let mut rules: Vec<(Precedence, usize, usize, pb::HttpRule)> = Vec::new();
            for &r in ranks {
                let tr = order[r];
                let o = out.get_mut(&tr.key()).expect("every route has an outcome");
                for (i, hr) in tr.spec.http.iter().enumerate() {
                    if let Some(rule) = rule(hr, i, Some(*port), tr, &cx, o) {
                        let p = tr.precedence.get(i).copied().unwrap_or((
                            1,
                            std::cmp::Reverse(0),
                            true,
                            std::cmp::Reverse(0),
                            std::cmp::Reverse(0),
                        ));
                        rules.push((p, r, i, rule));
                    }
                }
            }
            if rules.is_empty() {
                continue;
            }
            rules.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
            let table = pb::RouteTable {
                name: cluster.clone(),
                source: source.clone(),
                export_to: export.clone(),
                http: rules.into_iter().map(|r| r.3).collect(),
                tcp: Vec::new(),
            };
            for &r in ranks {
                let o = out.get_mut(&order[r].key()).expect("every route has an outcome");
                o.tables.insert(cluster.clone(), table.clone());
            }
        }
    }
    for o in out.values_mut() {
        o.unresolved.sort();
        o.unresolved.dedup();
        o.invalid.sort();
        o.invalid.dedup();
    }
    out
}

fn cluster_name((ns, name): &Key, port: i32, domain: &str) -> String {
    format!("{name}.{ns}.svc.{domain}:{port}")
}

fn export_to(tr: &Tr) -> Option<Vec<String>> {
    if tr.spec.export_to.is_empty() || tr.spec.export_to.iter().any(|e| e.0 == "*") {
        return None;
    }
    let mut v: Vec<String> = tr
        .spec
        .export_to
        .iter()
        .map(|e| if e.0 == "." { tr.namespace.clone() } else { e.0.clone() })
        .collect();
    v.sort();
    v.dedup();
    Some(v)
}

/// One rule for the cluster of `port`: its matches for that port (none left: the rule is not
/// for this port). Values no proxy could use go to `o.invalid`.
fn rule(
    r: &HttpRoute,
    i: usize,
    port: Option<i32>,
    tr: &Tr,
    cx: &Lookup,
    o: &mut Outcome,
) -> Option<pb::HttpRule> {
    // `None`: every match (to check the rule whatever the port).
    let for_port: Vec<_> =
        r.matches.iter().filter(|m| port.is_none_or(|port| m.port.is_none_or(|p| p == port))).collect();
    if !r.matches.is_empty() && for_port.is_empty() {
        return None;
    }
    let at = tr.http_field(i);
    let field = |f: &str| format!("{at}{f}");
    let match_field =
        |j: usize| tr.match_fields.get(i).cloned().unwrap_or_else(|| format!("{at}.match[{j}]"));
    let mut matches = Vec::new();
    for (j, m) in for_port.iter().enumerate() {
        let path = m.path.as_ref().map(|p| {
            let mut m = string_match(p, &format!("{}.path", match_field(j)), &mut o.invalid);
            if let (true, Some(pb::string_match::Kind::Prefix(s))) = (tr.element_prefixes, &m.kind) {
                m.kind = Some(pb::string_match::Kind::PathPrefix(s.clone()));
            }
            m
        });
        matches.push(pb::HttpMatch {
            path,
            method: m.method.map(|m| format!("{m:?}").to_uppercase()).unwrap_or_default(),
            headers: m
                .headers
                .iter()
                .enumerate()
                .map(|(k, h)| named(h, &format!("{}.headers[{k}]", match_field(j)), &mut o.invalid, true))
                .collect(),
            query_params: m
                .query_params
                .iter()
                .enumerate()
                .map(|(k, q)| {
                    named(q, &format!("{}.queryParams[{k}]", match_field(j)), &mut o.invalid, false)
                })
                .collect(),
        });
    }
    let backends = weighted(&r.backends, &at, tr, cx, o);
    let ms = |d: &mycel_crds::common::Duration| super::millis(d).unwrap_or(0);
    let fault = r.fault.as_ref().map(|f| pb::Fault {
        delay_percent: f.delay.as_ref().map(|d| d.percent).unwrap_or(0.0),
        delay_ms: f.delay.as_ref().map(|d| ms(&d.fixed_delay)).unwrap_or(0),
        abort_percent: f.abort.as_ref().map(|a| a.percent).unwrap_or(0.0),
        abort_http_status: f.abort.as_ref().and_then(|a| a.http_status).unwrap_or(0).max(0) as u32,
        abort_grpc_status: f.abort.as_ref().and_then(|a| a.grpc_status).unwrap_or(0).max(0) as u32,
    });
    for (which, e) in [
        ("request", r.headers.as_ref().and_then(|h| h.request.as_ref())),
        ("response", r.headers.as_ref().and_then(|h| h.response.as_ref())),
    ] {
        let Some(e) = e else { continue };
        for (k, v) in e.set.iter().chain(&e.add) {
            if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                o.invalid
                    .push(format!("{}: {k:?} is not a header name", field(&format!(".headers.{which}"))));
            }
            if hyper::header::HeaderValue::from_str(v).is_err() {
                o.invalid.push(format!(
                    "{}: the value of {k} is not a valid header value",
                    field(&format!(".headers.{which}"))
                ));
            }
        }
        for k in e.set.keys().chain(e.add.keys()).chain(&e.remove) {
            if !mycel_api::route::editable(k) {
                o.invalid.push(format!(
                    "{}: {k} may not be edited (framing, connection and mesh headers; use rewrite.authority for Host)",
                    field(&format!(".headers.{which}"))
                ));
            }
        }
        for k in &e.remove {
            if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                o.invalid.push(format!(
                    "{}: {k:?} is not a header name",
                    field(&format!(".headers.{which}.remove"))
                ));
            }
        }
    }
    // The API server counts characters; the proxy bounds bytes.
    if r.direct_response.as_ref().and_then(|d| d.body.as_ref()).is_some_and(|b| b.len() > 4096) {
        o.invalid.push(format!("{}: at most 4096 bytes (UTF-8)", field(".directResponse.body")));
    }
    if r.redirect.as_ref().is_some_and(|rd| rd.prefix.is_some())
        && (r.matches.is_empty()
            || r.matches.iter().any(|m| m.path.as_ref().is_none_or(|p| p.prefix.is_none())))
    {
        o.invalid.push(format!(
            "{}: needs a prefix path match in every match of the rule",
            field(".redirect.prefix")
        ));
    }
    if let Some(a) = r.rewrite.as_ref().and_then(|rw| rw.authority.as_ref())
        && a.parse::<hyper::http::uri::Authority>().is_err()
    {
        o.invalid.push(format!("{}: {a:?} is not host[:port]", field(".rewrite.authority")));
    }
    let edits = |e: Option<&HeaderEdits>| {
        e.map(|e| pb::HeaderEdits {
            set: e.set.clone().into_iter().collect(),
            add: e.add.clone().into_iter().collect(),
            remove: e.remove.clone(),
        })
    };
    let headers = r.headers.as_ref();
    // A mirror that does not resolve is reported and left out (nothing is copied).
    let mirror = r.mirror.as_ref().and_then(|m| {
        let b = Backend { service: m.service.clone(), port: m.port, subset: None, weight: None };
        let cluster = backend(&b, &field(".mirror"), tr, cx, o);
        (!cluster.starts_with("unresolved:"))
            .then(|| pb::Mirror { cluster, percent: m.percent.unwrap_or(100.0).clamp(0.0, 100.0) })
    });
    Some(pb::HttpRule {
        mirror,
        redirect: r.redirect.as_ref().map(|rd| pb::Redirect {
            scheme: rd.scheme.clone().unwrap_or_default(),
            host: rd.host.clone().unwrap_or_default(),
            port: rd.port.unwrap_or(0).max(0) as u32,
            path: rd.path.clone().unwrap_or_default(),
            prefix: rd.prefix.clone().unwrap_or_default(),
            code: rd.code.unwrap_or(301).max(0) as u32,
        }),
        direct_response: r.direct_response.as_ref().map(|d| pb::DirectResponse {
            status: d.status.max(0) as u32,
            body: d.body.clone().unwrap_or_default(),
        }),
        name: r.name.clone().unwrap_or_else(|| format!("rule-{i}")),
        matches,
        backends,
        timeout_ms: r.timeout.as_ref().map(ms).unwrap_or(0),
        request_headers: edits(headers.and_then(|h| h.request.as_ref())),
        response_headers: edits(headers.and_then(|h| h.response.as_ref())),
        rewrite: r.rewrite.as_ref().map(|rw| pb::Rewrite {
            uri_prefix: rw.uri_prefix.clone().unwrap_or_default(),
            authority: rw.authority.clone().unwrap_or_default(),
            path: rw.path.clone().unwrap_or_default(),
        }),
        fault,
        retry: r.retries.as_ref().map(|rt| pb::Retry {
            attempts: rt.attempts.max(0) as u32,
            per_try_timeout_ms: rt.per_try_timeout.as_ref().map(ms).unwrap_or(0),
            retry_on: rt
                .retry_on
                .iter()
                .filter_map(|c| serde_json::to_value(c).ok()?.as_str().map(str::to_string))
                .collect(),
            backoff_ms: rt.backoff.as_ref().map(ms).unwrap_or(0),
        }),
    })
}

/// A rule's backends (`rule` is its field), each with its weight (a lone one takes everything).
fn weighted(bs: &[Backend], rule: &str, tr: &Tr, cx: &Lookup, o: &mut Outcome) -> Vec<pb::RouteBackend> {
    bs.iter()
        .enumerate()
        .map(|(j, b)| pb::RouteBackend {
            cluster: backend(
                b,
                &format!(
                    "{rule}.{}[{j}]",
                    if tr.kind == "TrafficRoute" { "backends" } else { "backendRefs" }
                ),
                tr,
                cx,
                o,
            ),
            weight: if bs.len() == 1 { 100 } else { b.weight.unwrap_or(0).max(0) as u32 },
        })
        .collect()
}

/// A TCP rule: its backends and idle timeout.
fn tcp_rule(r: &TcpRoute, i: usize, tr: &Tr, cx: &Lookup, o: &mut Outcome) -> pb::TcpRule {
    let backends = weighted(&r.backends, &format!("spec.tcp[{i}]"), tr, cx, o);
    let idle_timeout_ms = r.idle_timeout.as_ref().and_then(super::millis).unwrap_or(0);
    pb::TcpRule { name: format!("tcp-{i}"), backends, idle_timeout_ms }
}

/// The cluster a backend names. One that does not resolve is reported and named as it would be
/// (`<service>:<port>`): the proxy answers 503 `NC` for its share rather than send it elsewhere.
fn backend(b: &Backend, field: &str, tr: &Tr, cx: &Lookup, o: &mut Outcome) -> String {
    let (services, subsets, domain) = (cx.services, cx.subsets, cx.domain);
    let unresolved = |o: &mut Outcome, why: String| {
        o.unresolved.push(format!("{field}: {why}"));
        format!("unresolved:{}:{}", b.service.0, b.port.unwrap_or(0))
    };
    let Some(key) = service_of(&b.service.0, &tr.namespace, domain) else {
        return unresolved(o, format!("{} is not a Service name", b.service.0));
    };
    let Some(svc) = services(&key) else {
        return unresolved(o, format!("no Service {} in namespace {}", key.1, key.0));
    };
    let port = match (b.port, svc.ports.as_slice()) {
        (Some(p), ports) if ports.iter().any(|(_, sp)| *sp == p) => p,
        (Some(p), _) => return unresolved(o, format!("Service {}/{} has no port {p}", key.0, key.1)),
        (None, [(_, p)]) => *p,
        (None, _) => {
            return unresolved(o, format!("Service {}/{} has several ports: set port", key.0, key.1));
        }
    };
    let cluster = cluster_name(&key, port, domain);
    let Some(s) = &b.subset else { return cluster };
    let subset_cluster = format!("{cluster}/{s}");
    match subsets(&key, &subset_cluster, s) {
        // The backend's share gets 503 rather than go to endpoints outside the subset.
        Subset::Undefined => unresolved(
            o,
            format!("subset {s}: no DestinationPolicy in effect for Service {}/{} defines it", key.0, key.1),
        ),
        // Sent there all the same (503 `UH` until a pod with its labels is ready), and said.
        Subset::Empty => {
            o.unresolved.push(format!(
                "{field}: subset {s} of Service {}/{} has no ready endpoint (no ready pod carries its labels); its share is answered 503",
                key.0, key.1
            ));
            subset_cluster
        }
        Subset::Ready => subset_cluster,
    }
}

fn check_regex(re: &str, field: &str, invalid: &mut Vec<String>) {
    if let Err(e) = mycel_api::route::compile_regex(re) {
        invalid.push(format!("{field}.regex: {e}"));
    }
}

/// A match of the TrafficRoute shape (also a RateLimitPolicy's), `field` naming it in what
/// `invalid` gets (a regex no proxy can compile). Its `port` is not part of it.
pub fn http_match(
    m: &mycel_crds::traffic_route::HttpMatch,
    field: &str,
    invalid: &mut Vec<String>,
) -> pb::HttpMatch {
    pb::HttpMatch {
        path: m.path.as_ref().map(|p| string_match(p, &format!("{field}.path"), invalid)),
        method: m.method.map(|m| format!("{m:?}").to_uppercase()).unwrap_or_default(),
        headers: m
            .headers
            .iter()
            .enumerate()
            .map(|(k, h)| named(h, &format!("{field}.headers[{k}]"), invalid, true))
            .collect(),
        query_params: m
            .query_params
            .iter()
            .enumerate()
            .map(|(k, q)| named(q, &format!("{field}.queryParams[{k}]"), invalid, false))
            .collect(),
    }
}

fn string_match(m: &StringMatch, field: &str, invalid: &mut Vec<String>) -> pb::StringMatch {
    use pb::string_match::Kind;
    let kind = if let Some(s) = &m.exact {
        Kind::Exact(s.clone())
    } else if let Some(s) = &m.prefix {
        Kind::Prefix(s.clone())
    } else if let Some(s) = &m.regex {
        check_regex(s, field, invalid);
        Kind::Regex(s.clone())
    } else {
        Kind::Present(true)
    };
    pb::StringMatch { kind: Some(kind) }
}

/// A header (`header`: its name case-insensitive, so lowercased) or query parameter match.
fn named(m: &NamedMatch, field: &str, invalid: &mut Vec<String>, header: bool) -> pb::NamedMatch {
    use pb::string_match::Kind;
    let kind = if let Some(s) = &m.exact {
        Kind::Exact(s.clone())
    } else if let Some(s) = &m.prefix {
        Kind::Prefix(s.clone())
    } else if let Some(s) = &m.regex {
        check_regex(s, field, invalid);
        Kind::Regex(s.clone())
    } else if m.present == Some(false) {
        Kind::Absent(true)
    } else {
        Kind::Present(true)
    };
    let name = if header { m.name.to_ascii_lowercase() } else { m.name.clone() };
    pb::NamedMatch { name, r#match: Some(pb::StringMatch { kind: Some(kind) }) }
}

/// A table as the streams send it.
pub fn resource(table: pb::RouteTable) -> pb::Resource {
    pb::Resource {
        name: table.name.clone(),
        version: String::new(),
        kind: Some(pb::resource::Kind::RouteTable(table)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(ns: &str, name: &str, created: &str, yaml: &str) -> Tr {
        Tr {
            namespace: ns.into(),
            name: name.into(),
            generation: 1,
            created: created.into(),
            spec: serde_yaml::from_str(yaml).unwrap(),
            not_implemented: vec![],
            kind: "TrafficRoute",
            fields: vec![],
            match_fields: vec![],
            element_prefixes: false,
            parents: vec![],
            precedence: vec![],
        }
    }

    fn services(k: &Key) -> Option<Svc> {
        match (k.0.as_str(), k.1.as_str()) {
            ("shop", "web") => Some(Svc {
                ips: vec!["10.96.0.1".into()],
                ports: vec![("http".into(), 80), ("admin".into(), 9090)],
                ..Default::default()
            }),
            ("shop", "v2") => Some(Svc {
                ips: vec!["10.96.0.2".into()],
                ports: vec![("http".into(), 80)],
                ..Default::default()
            }),
            _ => None,
        }
    }

    fn no_subsets(_: &Key, _: &str, _: &str) -> Subset {
        Subset::Undefined
    }

    #[test]
    fn a_subset_backend_names_its_cluster_and_one_undefined_or_empty_is_reported() {
        let r = tr(
            "shop",
            "web",
            "2026-01-01T00:00:00Z",
            "hosts: [web]\nhttp:\n- backends: [{service: v2, subset: ready, weight: 50}, {service: v2, subset: empty, weight: 30}, {service: v2, subset: nope, weight: 20}]\n",
        );
        let subsets = |k: &Key, cluster: &str, name: &str| {
            assert_eq!(k, &("shop".to_string(), "v2".to_string()));
            assert_eq!(cluster, format!("v2.shop.svc.cluster.local:80/{name}"));
            match name {
                "ready" => Subset::Ready,
                "empty" => Subset::Empty,
                _ => Subset::Undefined,
            }
        };
        let out = translate(&[&r], &services, &subsets, "cluster.local");
        let o = &out[&("TrafficRoute", ("shop".to_string(), "web".to_string()))];
        let backends: Vec<&str> = o.tables["web.shop.svc.cluster.local:80"].http[0]
            .backends
            .iter()
            .map(|b| b.cluster.as_str())
            .collect();
        assert_eq!(
            backends,
            ["v2.shop.svc.cluster.local:80/ready", "v2.shop.svc.cluster.local:80/empty", "unresolved:v2:0"]
        );
        assert_eq!(o.unresolved.len(), 2, "{:?}", o.unresolved);
        assert!(
            o.unresolved.iter().any(|u| u.contains("subset empty of Service shop/v2 has no ready endpoint"))
        );
        assert!(o.unresolved.iter().any(|u| u.contains("subset nope: no DestinationPolicy")));
    }

    #[test]
    fn hosts_resolve_from_the_routes_namespace_and_rules_split_by_port() {
        assert_eq!(service_of("web", "shop", "cluster.local"), Some(("shop".into(), "web".into())));
        assert_eq!(service_of("web.other", "shop", "cluster.local"), Some(("other".into(), "web".into())));
        assert_eq!(
            service_of("web.other.svc.cluster.local", "shop", "cluster.local"),
            Some(("other".into(), "web".into()))
        );
        assert_eq!(service_of("example.com.x.y", "shop", "cluster.local"), None);
        let r = tr(
            "shop",
            "web",
            "2026-01-01T00:00:00Z",
            "hosts: [web]\nexportTo: ['.']\nhttp:\n- name: admin\n  match: [{port: 9090}]\n  backends: [{service: web, port: 9090}]\n- name: canary\n  match: [{headers: [{name: X-User, exact: tester}]}]\n  backends: [{service: v2}]\n  timeout: 1s\n  retries: {attempts: 2, perTryTimeout: 200ms, retryOn: [5xx, retriable-4xx], backoff: 10ms}\n- backends: [{service: web, port: 80, weight: 90}, {service: v2, weight: 10}]\n",
        );
        let out = translate(&[&r], &services, &no_subsets, "cluster.local");
        let o = &out[&("TrafficRoute", ("shop".to_string(), "web".to_string()))];
        assert!(o.unresolved.is_empty() && o.conflicts.is_empty(), "{o:?}");
        assert_eq!(o.export_to.as_deref(), Some(&["shop".to_string()][..]));
        let t80 = &o.tables["web.shop.svc.cluster.local:80"];
        let names: Vec<&str> = t80.http.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["canary", "rule-2"], "the port-9090 rule is not for port 80");
        assert_eq!(t80.http[0].matches[0].headers[0].name, "x-user");
        assert_eq!(t80.http[0].backends[0].cluster, "v2.shop.svc.cluster.local:80");
        assert_eq!(t80.http[0].timeout_ms, 1000);
        let retry = t80.http[0].retry.as_ref().unwrap();
        assert_eq!((retry.attempts, retry.per_try_timeout_ms, retry.backoff_ms), (2, 200, 10));
        assert_eq!(retry.retry_on, ["5xx", "retriable-4xx"], "the names the proxy reads");
        assert_eq!(t80.http[1].backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [90, 10]);
        let t9090 = &o.tables["web.shop.svc.cluster.local:9090"];
        assert_eq!(t9090.http.len(), 3);
        assert_eq!(t9090.export_to, ["shop"]);
    }

    #[test]
    fn a_tcp_rule_applies_to_its_port_with_its_backends_port_subset_and_idle_timeout() {
        let r = tr(
            "shop",
            "web",
            "2026-01-01T00:00:00Z",
            "hosts: [web]\ntcp:\n- port: 9090\n  idleTimeout: 1.5ms\n  backends: [{service: web, port: 9090, weight: 70}, {service: v2, subset: ready, weight: 30}]\n",
        );
        let subsets = |_: &Key, _: &str, _: &str| Subset::Ready;
        let out = translate(&[&r], &services, &subsets, "cluster.local");
        let o = &out[&("TrafficRoute", ("shop".to_string(), "web".to_string()))];
        assert!(o.unresolved.is_empty(), "{o:?}");
        assert_eq!(
            o.tables.keys().collect::<Vec<_>>(),
            ["web.shop.svc.cluster.local:9090"],
            "port 80 has no rule"
        );
        let t = &o.tables["web.shop.svc.cluster.local:9090"];
        assert!(t.http.is_empty());
        let backends: Vec<(&str, u32)> =
            t.tcp[0].backends.iter().map(|b| (b.cluster.as_str(), b.weight)).collect();
        assert_eq!(
            backends,
            [("web.shop.svc.cluster.local:9090", 70), ("v2.shop.svc.cluster.local:80/ready", 30)]
        );
        assert_eq!(t.tcp[0].idle_timeout_ms, 2, "rounded up");
    }

    #[test]
    fn a_mirror_names_its_cluster_by_service_and_port_and_one_that_does_not_resolve_is_left_out() {
        let r = tr(
            "shop",
            "web",
            "2026-01-01T00:00:00Z",
            "hosts: [web]\nhttp:\n- match: [{path: {prefix: /a}}]\n  mirror: {service: web, port: 9090, percent: 25}\n  backends: [{service: v2}]\n- mirror: {service: gone}\n  backends: [{service: v2}]\n",
        );
        let out = translate(&[&r], &services, &no_subsets, "cluster.local");
        let o = &out[&("TrafficRoute", ("shop".to_string(), "web".to_string()))];
        let rules = &o.tables["web.shop.svc.cluster.local:80"].http;
        let m = rules[0].mirror.as_ref().unwrap();
        assert_eq!((m.cluster.as_str(), m.percent), ("web.shop.svc.cluster.local:9090", 25.0));
        assert!(rules[1].mirror.is_none(), "nothing is copied to what does not resolve");
        assert!(o.unresolved.iter().any(|u| u.contains("spec.http[1].mirror: no Service gone")), "{o:?}");
    }

    #[test]
    fn a_route_for_another_namespaces_service_reaches_its_own_clients_only_and_yields_to_the_owner() {
        let foreign = tr(
            "evil",
            "grab",
            "2025-01-01T00:00:00Z",
            "hosts: [web.shop]\nhttp:\n- backends: [{service: v2.shop}]\n",
        );
        let out = translate(&[&foreign], &services, &no_subsets, "cluster.local");
        let o = &out[&("TrafficRoute", ("evil".to_string(), "grab".to_string()))];
        assert_eq!(o.tables["web.shop.svc.cluster.local:80"].export_to, ["evil"], "only evil's clients");
        let own = tr(
            "shop",
            "web",
            "2026-06-01T00:00:00Z",
            "hosts: [web]\nhttp:\n- backends: [{service: web, port: 80}]\n",
        );
        let out = translate(&[&foreign, &own], &services, &no_subsets, "cluster.local");
        assert!(
            out[&("TrafficRoute", ("shop".to_string(), "web".to_string()))].conflicts.is_empty(),
            "the owner's route wins though newer"
        );
        let lost = &out[&("TrafficRoute", ("evil".to_string(), "grab".to_string()))];
        assert!(lost.tables.is_empty() && lost.conflicts[0].contains("TrafficRoute shop/web"), "{lost:?}");
        // An invalid route claims nothing; a rule only for another port makes no table.
        let bad = tr(
            "shop",
            "a-bad",
            "2024-01-01T00:00:00Z",
            "hosts: [web]\nhttp:\n- backends: [{service: web, port: 80}]\n  headers: {request: {set: {content-length: '0'}}}\n",
        );
        let port = tr(
            "shop",
            "b-port",
            "2025-01-01T00:00:00Z",
            "hosts: [web]\nhttp:\n- match: [{port: 9090, queryParams: [{name: userId, exact: '1'}]}]\n  backends: [{service: web, port: 9090}]\n",
        );
        let out = translate(&[&bad, &port], &services, &no_subsets, "cluster.local");
        assert!(
            out[&("TrafficRoute", ("shop".to_string(), "a-bad".to_string()))].invalid[0]
                .contains("content-length may not be edited")
        );
        let p = &out[&("TrafficRoute", ("shop".to_string(), "b-port".to_string()))];
        assert!(p.conflicts.is_empty(), "{p:?}");
        assert_eq!(p.tables.keys().collect::<Vec<_>>(), ["web.shop.svc.cluster.local:9090"]);
        let q = &p.tables["web.shop.svc.cluster.local:9090"].http[0].matches[0].query_params[0];
        assert_eq!(q.name, "userId", "query parameter names keep their case");
    }

    #[test]
    fn the_older_route_wins_a_host_and_what_does_not_resolve_is_named() {
        let old = tr(
            "shop",
            "b-old",
            "2026-01-01T00:00:00Z",
            "hosts: [web]\nhttp:\n- backends: [{service: web, port: 80}]\n",
        );
        let new = tr(
            "shop",
            "a-new",
            "2026-02-01T00:00:00Z",
            "hosts: [web, nothere]\nhttp:\n- backends: [{service: web}, {service: gone, weight: 0}]\n",
        );
        let out = translate(&[&new, &old], &services, &no_subsets, "cluster.local");
        let lost = &out[&("TrafficRoute", ("shop".to_string(), "a-new".to_string()))];
        assert_eq!(lost.conflicts.len(), 1);
        assert!(lost.conflicts[0].contains("TrafficRoute shop/b-old"), "{:?}", lost.conflicts);
        assert!(lost.tables.is_empty());
        assert!(
            lost.unresolved.iter().any(|u| u.contains("host nothere: no Service nothere")),
            "{:?}",
            lost.unresolved
        );
        let won = &out[&("TrafficRoute", ("shop".to_string(), "b-old".to_string()))];
        assert_eq!(won.tables.len(), 2);
        let bad = tr(
            "shop",
            "c",
            "2026-01-01T00:00:00Z",
            "hosts: [v2]\nhttp:\n- backends: [{service: web}, {service: gone, weight: 0}]\n",
        );
        let o = &translate(&[&bad], &services, &no_subsets, "cluster.local")
            [&("TrafficRoute", ("shop".to_string(), "c".to_string()))];
        assert_eq!(o.tables.len(), 1, "what resolves is sent, the rest gets 503");
        assert!(
            o.unresolved
                .iter()
                .any(|u| u.contains("spec.http[0].backends[0]: Service shop/web has several ports")),
            "{:?}",
            o.unresolved
        );
        assert!(
            o.unresolved.iter().any(|u| u.contains("spec.http[0].backends[1]: no Service gone")),
            "{:?}",
            o.unresolved
        );
        let regex = tr(
            "shop",
            "d",
            "2026-01-01T00:00:00Z",
            "hosts: [v2]\nhttp:\n- backends: [{service: v2}]\n  match: [{path: {regex: '('}}]\n",
        );
        let o = &translate(&[&regex], &services, &no_subsets, "cluster.local")
            [&("TrafficRoute", ("shop".to_string(), "d".to_string()))];
        assert!(o.invalid[0].starts_with("spec.http[0].match[0].path.regex"), "{:?}", o.invalid);
        assert!(o.tables.is_empty(), "an invalid route is sent to no proxy");
    }
}
