//! Gateway API mesh routes (GAMMA): an `HTTPRoute` whose `parentRefs` name a Service becomes a
//! route of the same model as a TrafficRoute ([`Tr`]), so that the two rank against each other
//! (oldest first, then namespace and name) and reach proxies as the same route tables.
//!
//! Each rule is split into one rule per match, ordered by the Gateway API's precedence (an exact
//! path, then the longest path prefix, then a regular expression; then a method; then more
//! header matches; then more query parameter matches; then the rule's order), so that the
//! proxy's first-match-wins gives the match the specification picks. `PathPrefix` matches whole
//! path elements. What the route sets that Mycel does not do yet is listed in the status
//! (`Accepted` reason `FieldsNotImplemented`) and changes nothing.

use mycel_crds::{
    common::{Duration, NamedMatch, StringMatch},
    gateway::{
        BackendRef, GRPCRoute, HTTPPathMatch, HTTPRoute, HTTPRouteFilter, HTTPRouteMatch, HTTPRouteRule,
        HTTPRouteSpec, ParentRef,
    },
    traffic_route::{
        Backend, DirectResponse, HeaderEdits, HeaderOperations, Host, HttpMatch, HttpMethod, HttpRoute,
        Mirror, Redirect, Rewrite, TrafficRouteSpec,
    },
};

use super::route::Tr;

/// The controller name in `status.parents[]` of the routes Mycel's mesh reports on.
pub const CONTROLLER: &str = "mycel.io/mesh";

/// An HTTPRoute as a route of the mesh; `None` when it names no Service as a parent (it is a
/// gateway's, not the mesh's) — unless its status still has Mycel's entries (it had a Service
/// parent before): then a route of no host and no parent, whose status write removes them.
pub fn from_http_route(r: HTTPRoute) -> Option<Tr> {
    from_route(r, &|m, i, j| precedence(m, i, j))
}

/// An HTTPRoute (or a GRPCRoute as one) as a mesh route, its matches ranked by `rank`.
fn from_route(r: HTTPRoute, rank: &dyn Fn(&HTTPRouteMatch, usize, usize) -> Key) -> Option<Tr> {
    let namespace = r.metadata.namespace.clone().unwrap_or_default();
    let parents: Vec<(usize, &ParentRef)> =
        r.spec.parent_refs.iter().enumerate().filter(|(_, p)| p.is_service()).collect();
    // No Service parent: not the mesh's, unless Mycel's status entries are still there to
    // remove (a route then of no host, no rule and no parent).
    let stale = parents.is_empty()
        && r.status.as_ref().is_some_and(|s| s.parents.iter().any(|p| p.controller_name == CONTROLLER));
    if parents.is_empty() && !stale {
        return None;
    }
    let rules: &[HTTPRouteRule] = if stale { &[] } else { &r.spec.rules };
    let mut not_implemented = Vec::new();
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for (i, p) in &parents {
        let ns = p.namespace.clone().unwrap_or_else(|| namespace.clone());
        hosts.push(Host(format!("{}.{ns}", p.name)));
        ports.push(p.port);
        if p.section_name.is_some() {
            not_implemented.push(format!("spec.parentRefs[{i}].sectionName"));
        }
    }
    // One port for every parent, or none: a match can name one port.
    let port = match ports.iter().all(|p| Some(p) == ports.first()) {
        true => ports.first().copied().flatten(),
        false => {
            not_implemented.push("spec.parentRefs[].port (Service parents with different ports)".into());
            None
        }
    };
    hosts.sort_by(|a, b| a.0.cmp(&b.0));
    hosts.dedup();
    let mut split: Vec<(Key, HttpRoute, String, String)> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let route_name = r.metadata.name.as_deref().unwrap_or_default();
        let base = rule_of(rule, i, route_name, &namespace, &at, &mut not_implemented);
        let default = [HTTPRouteMatch::default()];
        let matches: &[HTTPRouteMatch] = if rule.matches.is_empty() { &default } else { &rule.matches };
        for (j, m) in matches.iter().enumerate() {
            let mut one = base.clone();
            let mut hm = match_of(m);
            hm.port = port;
            one.matches = vec![hm];
            split.push((rank(m, i, j), one, at.clone(), format!("{at}.matches[{j}]")));
        }
    }
    split.sort_by_key(|s| s.0);
    let parents_json = parents.iter().filter_map(|(_, p)| serde_json::to_value(p).ok()).collect();
    not_implemented.sort();
    not_implemented.dedup();
    Some(Tr {
        kind: "HTTPRoute",
        namespace,
        name: r.metadata.name.clone().unwrap_or_default(),
        generation: r.metadata.generation.unwrap_or_default(),
        created: r.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
        spec: TrafficRouteSpec {
            hosts,
            export_to: Vec::new(),
            http: split.iter().map(|s| s.1.clone()).collect(),
            tcp: Vec::new(),
        },
        not_implemented,
        fields: split.iter().map(|s| s.2.clone()).collect(),
        match_fields: split.iter().map(|s| s.3.clone()).collect(),
        element_prefixes: true,
        parents: parents_json,
        precedence: split.iter().map(|s| (s.0.0, s.0.1, s.0.2, s.0.3, s.0.4)).collect(),
    })
}

/// A GRPCRoute as a mesh route: each method match becomes a path match (gRPC calls are
/// `POST /<service>/<method>`) — service and method an exact path, a service alone a prefix, a
/// method alone or a `RegularExpression` a regular expression — and the rest is an HTTPRoute's.
/// So an exact service and method rank first, then a service, then a method.
pub fn from_grpc_route(r: GRPCRoute) -> Option<Tr> {
    // The Gateway API's order for GRPCRoute: the longer service, then the longer method, then
    // more header matches (a match without a method is a catch-all, last).
    let ranks: Vec<Vec<Key>> = r
        .spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            if rule.matches.is_empty() {
                return vec![(
                    1,
                    std::cmp::Reverse(0),
                    true,
                    std::cmp::Reverse(0),
                    std::cmp::Reverse(0),
                    i,
                    0,
                )];
            }
            rule.matches
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    let service = m.method.as_ref().and_then(|mm| mm.service.as_deref()).map_or(0, str::len);
                    let method = m.method.as_ref().and_then(|mm| mm.method.as_deref()).map_or(0, str::len);
                    (
                        if service + method > 0 { 0 } else { 1 },
                        std::cmp::Reverse(service),
                        method == 0,
                        std::cmp::Reverse(method),
                        std::cmp::Reverse(m.headers.len()),
                        i,
                        j,
                    )
                })
                .collect()
        })
        .collect();
    let rules = r
        .spec
        .rules
        .iter()
        .map(|rule| HTTPRouteRule {
            name: rule.name.clone(),
            matches: rule
                .matches
                .iter()
                .map(|m| HTTPRouteMatch {
                    path: m.method.as_ref().and_then(|mm| {
                        let regex = mm.type_.as_deref() == Some("RegularExpression");
                        let (kind, value) = match (regex, mm.service.as_deref(), mm.method.as_deref()) {
                            (false, Some(s), Some(m)) => ("Exact", format!("/{s}/{m}")),
                            (false, Some(s), None) => ("PathPrefix", format!("/{s}")),
                            (false, None, Some(m)) => ("RegularExpression", format!("/[^/]+/{m}")),
                            (false, None, None) => return None,
                            (true, s, m) => (
                                "RegularExpression",
                                format!("/(?:{})/(?:{})", s.unwrap_or("[^/]+"), m.unwrap_or("[^/]+")),
                            ),
                        };
                        Some(HTTPPathMatch { type_: Some(kind.into()), value: Some(value) })
                    }),
                    headers: m.headers.clone(),
                    ..Default::default()
                })
                .collect(),
            filters: rule.filters.clone(),
            backend_refs: rule.backend_refs.clone(),
            timeouts: None,
        })
        .collect();
    let as_http = HTTPRoute {
        metadata: r.metadata.clone(),
        spec: HTTPRouteSpec {
            parent_refs: r.spec.parent_refs.clone(),
            hostnames: r.spec.hostnames.clone(),
            rules,
        },
        status: r.status.clone(),
    };
    let mut tr = from_route(as_http, &|_, i, j| ranks[i][j])?;
    tr.kind = "GRPCRoute";
    Some(tr)
}

/// Sorts first what the Gateway API ranks first.
type Key =
    (u8, std::cmp::Reverse<usize>, bool, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>, usize, usize);

fn precedence(m: &HTTPRouteMatch, rule: usize, index: usize) -> Key {
    let (kind, len) = match m.path.as_ref() {
        None => (1, 1),
        Some(p) => {
            // As the proxy compares it: without a trailing `/`.
            let value = p.value.as_deref().unwrap_or("/");
            let len = if value == "/" { 1 } else { value.trim_end_matches('/').len() };
            match p.type_.as_deref() {
                Some("Exact") => (0, len),
                Some("RegularExpression") => (2, len),
                _ => (1, len),
            }
        }
    };
    (
        kind,
        std::cmp::Reverse(len),
        m.method.is_none(),
        std::cmp::Reverse(m.headers.len()),
        std::cmp::Reverse(m.query_params.len()),
        rule,
        index,
    )
}

fn match_of(m: &HTTPRouteMatch) -> HttpMatch {
    let path = m.path.as_ref().map(|p| {
        let v = p.value.clone().unwrap_or_else(|| "/".into());
        match p.type_.as_deref() {
            Some("Exact") => StringMatch { exact: Some(v), ..Default::default() },
            Some("RegularExpression") => StringMatch { regex: Some(v), ..Default::default() },
            _ => StringMatch { prefix: Some(v), ..Default::default() },
        }
    });
    let named = |n: &mycel_crds::gateway::HTTPNamedMatch| {
        let mut out = NamedMatch { name: n.name.clone(), ..Default::default() };
        match n.type_.as_deref() {
            Some("RegularExpression") => out.regex = Some(n.value.clone()),
            _ => out.exact = Some(n.value.clone()),
        }
        out
    };
    HttpMatch {
        // No path match is the default's: every path.
        path: path.or_else(|| Some(StringMatch { prefix: Some("/".into()), ..Default::default() })),
        method: m.method.as_deref().and_then(|s| serde_json::from_value::<HttpMethod>(s.into()).ok()),
        headers: m.headers.iter().map(named).collect(),
        query_params: m.query_params.iter().map(named).collect(),
        port: None,
    }
}

/// A Gateway API duration (GEP-2257: `1h2m3s4ms`); `0s` turns the timeout off.
fn duration(d: &str) -> Option<Duration> {
    let zero = d.trim_end_matches(|c: char| c.is_ascii_alphabetic()).chars().all(|c| c == '0');
    (!zero).then(|| Duration(d.to_string()))
}

/// A Service reference as a TrafficRoute backend (`name.namespace`).
fn service(b: &BackendRef, namespace: &str) -> Host {
    Host(format!("{}.{}", b.name, b.namespace.as_deref().unwrap_or(namespace)))
}

/// A rule's filters, backends and timeouts (its matches are set per split rule).
fn rule_of(
    rule: &mycel_crds::gateway::HTTPRouteRule,
    i: usize,
    route: &str,
    namespace: &str,
    at: &str,
    not_implemented: &mut Vec<String>,
) -> HttpRoute {
    let mut out = HttpRoute {
        name: Some(format!("{route}/{}", rule.name.clone().unwrap_or_else(|| format!("rule-{i}")))),
        ..Default::default()
    };
    let mut mirrors = 0;
    for (k, f) in rule.filters.iter().enumerate() {
        let field = format!("{at}.filters[{k}]");
        filter(f, &field, namespace, &mut out, &mut mirrors, not_implemented);
    }
    for (k, b) in rule.backend_refs.iter().enumerate() {
        let field = format!("{at}.backendRefs[{k}]");
        if !b.filters.is_empty() {
            not_implemented.push(format!("{field}.filters"));
        }
        // Another kind, or another namespace's Service (which needs a ReferenceGrant, not
        // implemented yet): named so that it does not resolve (503 for its share).
        let host = if !b.backend.is_service() {
            Host(format!("{}.unsupported-kind.invalid", b.backend.name))
        } else if b.backend.namespace.as_deref().is_some_and(|n| n != namespace) {
            not_implemented.push(format!("{field}.namespace (ReferenceGrant)"));
            Host(format!("{}.reference-not-granted.invalid", b.backend.name))
        } else {
            service(&b.backend, namespace)
        };
        out.backends.push(Backend {
            service: host,
            port: b.backend.port,
            subset: None,
            weight: Some(b.weight.unwrap_or(1)),
        });
    }
    // Relative weights: scaled down to what a proxy takes (their total at most 1 000 000).
    let total: i64 = out.backends.iter().map(|b| i64::from(b.weight.unwrap_or(0).max(0))).sum();
    if total > 1_000_000 {
        for b in &mut out.backends {
            let w = i64::from(b.weight.unwrap_or(0).max(0));
            b.weight = Some(((w * 1_000_000) / total) as i32);
        }
    }
    // No backend with a weight (or none at all) and nothing that answers: the specification's 500.
    if out.backends.iter().all(|b| b.weight.unwrap_or(0) <= 0) && out.redirect.is_none() {
        out.backends.clear();
        out.direct_response =
            Some(DirectResponse { status: 500, body: Some("the route rule has no backendRefs".into()) });
    }
    if let Some(t) = &rule.timeouts {
        out.timeout = t.request.as_deref().and_then(duration);
        if t.backend_request.is_some() {
            not_implemented.push(format!("{at}.timeouts.backendRequest"));
        }
    }
    out
}

/// A path modifier as `(whole path, prefix)`, the one its type names set.
fn replacement(p: Option<&mycel_crds::gateway::PathModifier>) -> (Option<String>, Option<String>) {
    match p {
        Some(p) if p.type_ == "ReplaceFullPath" => (p.replace_full_path.as_deref().map(absolute), None),
        Some(p) => (None, p.replace_prefix_match.as_deref().map(absolute)),
        None => (None, None),
    }
}

/// A replacement path as the proxy takes it: `""` (strip the prefix) is `/`, and it starts with `/`.
fn absolute(p: &str) -> String {
    if p.starts_with('/') { p.to_string() } else { format!("/{p}") }
}

fn edits(m: &mycel_crds::gateway::HeaderModifier) -> HeaderEdits {
    HeaderEdits {
        set: m.set.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.clone())).collect(),
        add: m.add.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.clone())).collect(),
        remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

fn filter(
    f: &HTTPRouteFilter,
    field: &str,
    namespace: &str,
    out: &mut HttpRoute,
    mirrors: &mut usize,
    not_implemented: &mut Vec<String>,
) {
    match (f.type_.as_str(), f) {
        ("RequestHeaderModifier", HTTPRouteFilter { request_header_modifier: Some(m), .. }) => {
            out.headers.get_or_insert_with(HeaderOperations::default).request = Some(edits(m));
        }
        ("ResponseHeaderModifier", HTTPRouteFilter { response_header_modifier: Some(m), .. }) => {
            out.headers.get_or_insert_with(HeaderOperations::default).response = Some(edits(m));
        }
        ("RequestRedirect", HTTPRouteFilter { request_redirect: Some(rd), .. }) => {
            let (path, prefix) = replacement(rd.path.as_ref());
            out.redirect = Some(Redirect {
                scheme: rd.scheme.clone(),
                host: rd.hostname.clone(),
                port: rd.port,
                path,
                prefix,
                // The Gateway API's default is 302 (a TrafficRoute's, 301).
                code: Some(rd.status_code.unwrap_or(302)),
            });
        }
        ("URLRewrite", HTTPRouteFilter { url_rewrite: Some(rw), .. }) => {
            let (path, uri_prefix) = replacement(rw.path.as_ref());
            out.rewrite = Some(Rewrite { uri_prefix, authority: rw.hostname.clone(), path });
        }
        ("RequestMirror", HTTPRouteFilter { request_mirror: Some(m), .. }) => {
            *mirrors += 1;
            if *mirrors > 1 {
                not_implemented.push(format!("{field}.requestMirror (a second mirror of one rule)"));
                return;
            }
            // Copies go only to a Service of the route's namespace (another needs a
            // ReferenceGrant, not implemented yet): else nothing is copied.
            if !m.backend_ref.is_service()
                || m.backend_ref.namespace.as_deref().is_some_and(|n| n != namespace)
            {
                not_implemented.push(format!("{field}.requestMirror.backendRef (another kind or namespace)"));
                return;
            }
            let percent = match (&m.percent, &m.fraction) {
                (Some(p), _) => f64::from(*p),
                (None, Some(fr)) => {
                    f64::from(fr.numerator) * 100.0 / f64::from(fr.denominator.unwrap_or(100).max(1))
                }
                (None, None) => 100.0,
            };
            out.mirror = Some(Mirror {
                service: service(&m.backend_ref, namespace),
                port: m.backend_ref.port,
                percent: Some(percent),
            });
        }
        (other, _) => {
            let name = match other {
                "CORS" => "cors",
                "ExtensionRef" => "extensionRef",
                _ => other,
            };
            not_implemented.push(format!("{field}.{name}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::discovery::Svc;
    use crate::controlplane::translate::route::{self, Subset};

    fn route(yaml: &str) -> HTTPRoute {
        let mut r: HTTPRoute = serde_yaml::from_str(yaml).unwrap();
        r.metadata.creation_timestamp = None;
        r
    }

    fn services(k: &crate::controlplane::snapshot::Key) -> Option<Svc> {
        match (k.0.as_str(), k.1.as_str()) {
            ("shop", "web" | "web-v2") => Some(Svc {
                ips: vec!["10.96.0.1".into()],
                ports: vec![("http".into(), 80)],
                ..Default::default()
            }),
            _ => None,
        }
    }

    #[test]
    fn an_httproute_on_a_service_becomes_rules_in_gateway_precedence_with_its_filters() {
        let r = route(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v2}}, {path: {type: Exact, value: /exact}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Canary, value: "yes"}]}}
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
    backendRefs: [{name: web-v2, port: 80, weight: 3}, {name: web, port: 80}]
    timeouts: {request: 2s}
  - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: x-a, value: b}]}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /moved}}}]
  - matches: [{path: {type: PathPrefix, value: /cors}}]
    filters: [{type: CORS, cors: {allowOrigins: ["*"]}}]
    backendRefs: [{name: web, port: 80}, {name: other, namespace: elsewhere, port: 80}]
"#,
        );
        let tr = from_http_route(r).unwrap();
        assert_eq!(tr.spec.hosts, [Host("web.shop".into())]);
        let names: Vec<(&str, &str)> = tr
            .spec
            .http
            .iter()
            .zip(&tr.match_fields)
            .map(|(r, f)| (r.name.as_deref().unwrap(), f.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("web/rule-1", "spec.rules[1].matches[1]"),
                ("web/rule-3", "spec.rules[3].matches[0]"),
                ("web/rule-2", "spec.rules[2].matches[0]"),
                ("web/rule-1", "spec.rules[1].matches[0]"),
                ("web/rule-0", "spec.rules[0].matches[0]"),
            ],
            "exact first, then the longest prefix, then more headers, and `/` (the default match) last"
        );
        assert_eq!(
            tr.not_implemented,
            ["spec.rules[3].backendRefs[1].namespace (ReferenceGrant)", "spec.rules[3].filters[0].cors"]
        );
        let subsets = |_: &crate::controlplane::snapshot::Key, _: &str, _: &str| Subset::Undefined;
        let out = route::translate(&[&tr], &services, &subsets, "cluster.local");
        let o = &out[&("HTTPRoute", ("shop".to_string(), "web".to_string()))];
        assert!(o.invalid.is_empty() && o.conflicts.is_empty(), "{o:?}");
        assert!(
            o.unresolved.iter().any(|u| u.starts_with("spec.rules[3].backendRefs[1]")),
            "{:?}",
            o.unresolved
        );
        let t = &o.tables["web.shop.svc.cluster.local:80"];
        assert_eq!(t.source, "HTTPRoute shop/web");
        use mycel_api::v1alpha1::string_match::Kind;
        assert_eq!(t.http[0].matches[0].path.as_ref().unwrap().kind, Some(Kind::Exact("/exact".into())));
        assert_eq!(t.http[3].matches[0].path.as_ref().unwrap().kind, Some(Kind::PathPrefix("/v2".into())));
        assert_eq!(
            t.http[3].backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [3, 1],
            "weights are relative"
        );
        assert_eq!(t.http[3].timeout_ms, 2000);
        assert_eq!(t.http[3].request_headers.as_ref().unwrap().set["x-canary"], "yes");
        assert_eq!(t.http[3].rewrite.as_ref().unwrap().uri_prefix, "/");
        let redirect = t.http[2].redirect.as_ref().unwrap();
        assert_eq!(
            (redirect.path.as_str(), redirect.code),
            ("/moved", 302),
            "the Gateway API's default code"
        );
        assert_eq!(t.http[2].matches[0].headers[0].name, "x-a");
        assert_eq!(t.http[4].matches[0].path.as_ref().unwrap().kind, Some(Kind::PathPrefix("/".into())));
    }

    #[test]
    fn a_route_without_a_service_parent_is_not_the_meshs_and_a_rule_without_backends_answers_500() {
        let gw = route(
            "metadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{name: my-gateway}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n",
        );
        assert!(from_http_route(gw.clone()).is_none());
        // One that had a Service parent, and so Mycel's status entry: kept to remove the entry.
        let mut was = gw;
        was.status = Some(
            serde_json::from_value(serde_json::json!({"parents": [{"controllerName": CONTROLLER}]})).unwrap(),
        );
        let stale = from_http_route(was).unwrap();
        assert!(stale.spec.hosts.is_empty() && stale.parents.is_empty() && stale.spec.http.is_empty());
        let empty = route(
            "metadata: {name: e, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules: [{timeouts: {request: 0s}}]\n",
        );
        let tr = from_http_route(empty).unwrap();
        let rule = &tr.spec.http[0];
        assert_eq!(rule.direct_response.as_ref().map(|d| d.status), Some(500));
        assert!(rule.timeout.is_none(), "0s turns the timeout off");
    }

    #[test]
    fn httproutes_of_one_namespace_for_one_service_merge_by_precedence_and_a_trafficroute_yields() {
        let a = route(
            "metadata: {name: a, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /a}}]\n    backendRefs: [{name: web, port: 80}]\n",
        );
        let b = route(
            "metadata: {name: b, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: web-v2, port: 80}]\n  - matches: [{path: {type: Exact, value: /a/x}}]\n    backendRefs: [{name: web-v2, port: 80}]\n",
        );
        let consumer = route(
            "metadata: {name: c, namespace: front}\nspec:\n  parentRefs: [{kind: Service, name: web, namespace: shop}]\n  rules: [{backendRefs: [{name: web, namespace: shop, port: 80}]}]\n",
        );
        let (a, b, consumer) =
            (from_http_route(a).unwrap(), from_http_route(b).unwrap(), from_http_route(consumer).unwrap());
        let mut tr: Tr = a.clone();
        (tr.kind, tr.name, tr.created) = ("TrafficRoute", "z".into(), "2030-01-01T00:00:00Z".into());
        (tr.element_prefixes, tr.precedence, tr.parents) = (false, vec![], vec![]);
        let subsets = |_: &crate::controlplane::snapshot::Key, _: &str, _: &str| Subset::Undefined;
        let out = route::translate(&[&b, &tr, &consumer, &a], &services, &subsets, "cluster.local");
        let key = |kind: &'static str, ns: &str, n: &str| (kind, (ns.to_string(), n.to_string()));
        let (oa, ob) = (&out[&key("HTTPRoute", "shop", "a")], &out[&key("HTTPRoute", "shop", "b")]);
        assert!(oa.conflicts.is_empty() && ob.conflicts.is_empty(), "{oa:?} {ob:?}");
        let t = &oa.tables["web.shop.svc.cluster.local:80"];
        assert_eq!(ob.tables["web.shop.svc.cluster.local:80"], *t, "both hold the merged table");
        let names: Vec<&str> = t.http.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["b/rule-1", "a/rule-0", "b/rule-0"],
            "exact, then /a, then / whichever route has it"
        );
        assert_eq!(t.source, "HTTPRoute shop/a (and 1 more)");
        let lost = &out[&key("TrafficRoute", "shop", "z")];
        assert!(lost.conflicts[0].contains("HTTPRoute shop/a"), "{lost:?}");
        let c = &out[&key("HTTPRoute", "front", "c")];
        assert!(
            c.tables.is_empty() && c.conflicts[0].contains("HTTPRoute shop/a"),
            "a consumer route yields: {c:?}"
        );
    }

    #[test]
    fn a_grpcroute_matches_methods_as_paths_exact_service_and_method_first() {
        let r: GRPCRoute = serde_yaml::from_str(
            r#"
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{method: {method: Watch}}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{method: {service: grpc.health.v1.Health}}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{method: {service: grpc.health.v1.Health, method: Check}, headers: [{name: x-user, value: a}]}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-via, value: grpcroute}]}}]
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{method: {type: RegularExpression, service: 'pkg\..*'}}]
    backendRefs: [{name: web, port: 80}]
  - backendRefs: [{name: web, port: 80}]
"#,
        )
        .unwrap();
        let tr = from_grpc_route(r).unwrap();
        assert_eq!(tr.kind, "GRPCRoute");
        let paths: Vec<String> = tr
            .spec
            .http
            .iter()
            .map(|h| {
                let p = h.matches[0].path.as_ref().unwrap();
                format!("{:?} {:?} {:?}", p.exact, p.prefix, p.regex)
            })
            .collect();
        assert_eq!(
            paths,
            [
                r#"Some("/grpc.health.v1.Health/Check") None None"#,
                r#"None Some("/grpc.health.v1.Health") None"#,
                r#"None None Some("/(?:pkg\\..*)/(?:[^/]+)")"#,
                r#"None None Some("/[^/]+/Watch")"#,
                r#"None Some("/") None"#,
            ],
            "the longer service (an exact one first), then the longer method; a catch-all last"
        );
        assert_eq!(tr.spec.http[0].matches[0].headers[0].name, "x-user");
        assert!(
            tr.spec.http[0].headers.as_ref().unwrap().request.as_ref().unwrap().add.contains_key("x-via")
        );
        let subsets = |_: &crate::controlplane::snapshot::Key, _: &str, _: &str| Subset::Undefined;
        let out = route::translate(&[&tr], &services, &subsets, "cluster.local");
        let o = &out[&("GRPCRoute", ("shop".to_string(), "g".to_string()))];
        assert_eq!(o.tables["web.shop.svc.cluster.local:80"].source, "GRPCRoute shop/g");
    }

    #[test]
    fn values_the_crd_accepts_become_what_a_proxy_takes() {
        let r = route(
            r#"
metadata: {name: w, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a/}}]
    backendRefs: [{name: web, port: 80, weight: 0}]
  - matches: [{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: y}]}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ""}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: spy, namespace: elsewhere, port: 80}}}
    backendRefs: [{name: web, port: 80, weight: 1000000}, {name: web-v2, port: 80, weight: 1000000}]
"#,
        );
        let tr = from_http_route(r).unwrap();
        // `/a/` is `/a` to the proxy: the rule with a header match ranks first.
        assert_eq!(tr.fields, ["spec.rules[1]", "spec.rules[0]"]);
        let with_header = &tr.spec.http[0];
        assert_eq!(
            with_header.rewrite.as_ref().unwrap().uri_prefix.as_deref(),
            Some("/"),
            "\"\" strips the prefix"
        );
        assert!(with_header.mirror.is_none(), "no copies to another namespace without a grant");
        let weights: Vec<i32> = with_header.backends.iter().map(|b| b.weight.unwrap()).collect();
        assert_eq!(weights, [500_000, 500_000], "scaled to the proxy's bound, shares kept");
        let zero = &tr.spec.http[1];
        assert!(zero.backends.is_empty() && zero.direct_response.as_ref().is_some_and(|d| d.status == 500));
        assert!(
            tr.not_implemented.iter().any(|f| f.contains("requestMirror.backendRef")),
            "{:?}",
            tr.not_implemented
        );
    }
}
