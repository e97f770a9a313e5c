//! A route table compiled for the data path: regular expressions built once, header names and
//! values parsed once, weights summed once.

use std::{sync::Arc, time::Duration};

use hyper::{
    HeaderMap, Request,
    header::{HeaderName, HeaderValue},
    http::uri::Authority,
};

use crate::config::route::{self as cfg, compile_regex};

/// One cluster's rules, in order.
pub struct Table {
    pub source: String,
    rules: Vec<Arc<Rule>>,
    /// Where connections that are not HTTP go.
    pub tcp: Option<TcpRule>,
}

/// A TCP rule, compiled.
pub struct TcpRule {
    backends: Vec<(String, u32)>,
    total_weight: u32,
    pub idle_timeout: Option<Duration>,
}

impl TcpRule {
    /// A backend cluster, chosen at random by weight.
    pub fn pick_backend(&self) -> Option<&str> {
        pick(&self.backends, self.total_weight)
    }
}

/// One of `backends` at random by weight (`None` when there are none).
fn pick(backends: &[(String, u32)], total: u32) -> Option<&str> {
    if let [(only, _)] = backends {
        return Some(only);
    }
    let mut n = fastrand::u32(..total.max(1));
    for (c, w) in backends {
        if n < *w {
            return Some(c);
        }
        n -= w;
    }
    backends.last().map(|(c, _)| c.as_str())
}

pub struct Rule {
    pub name: Arc<str>,
    matches: Vec<Match>,
    backends: Vec<(String, u32)>,
    total_weight: u32,
    pub timeout: Option<Duration>,
    pub request_headers: Edits,
    pub response_headers: Edits,
    pub rewrite: Option<Rewrite>,
    pub fault: Option<cfg::Fault>,
    pub retry: Option<super::retry::Policy>,
    pub mirror: Option<cfg::Mirror>,
    pub redirect: Option<cfg::Redirect>,
    pub direct_response: Option<cfg::DirectResponse>,
}

pub struct Rewrite {
    pub uri_prefix: Option<String>,
    pub authority: Option<Authority>,
    pub path: Option<String>,
}

enum Str {
    Exact(String),
    Prefix(String),
    /// Without its trailing `/`.
    PathPrefix(String),
    Regex(regex::Regex),
    Present,
    Absent,
}

impl Str {
    fn compile(m: &cfg::StringMatch) -> Option<Str> {
        Some(match m {
            cfg::StringMatch::Exact(s) => Str::Exact(s.clone()),
            cfg::StringMatch::Prefix(s) => Str::Prefix(s.clone()),
            cfg::StringMatch::PathPrefix(s) => Str::PathPrefix(s.trim_end_matches('/').to_string()),
            cfg::StringMatch::Regex(r) => Str::Regex(compile_regex(r).ok()?),
            cfg::StringMatch::Present => Str::Present,
            cfg::StringMatch::Absent => Str::Absent,
        })
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Str::Exact(s) => v == s,
            Str::Prefix(s) => v.starts_with(s.as_str()),
            // `/a` (or `/`, kept as the empty string) is followed by the end or by `/`.
            Str::PathPrefix(s) => {
                v.strip_prefix(s.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Str::Regex(r) => r.is_match(v),
            Str::Present => true,
            Str::Absent => false,
        }
    }
}

struct Match {
    path: Option<Str>,
    method: Option<hyper::Method>,
    headers: Vec<(HeaderName, Str)>,
    query: Vec<(String, Str)>,
}

/// A compiled match of a rule of another kind (a rate limit's), as a route rule's matches.
pub struct Matcher(Match);

impl Matcher {
    /// Compiles a validated match.
    pub fn compile(m: &cfg::HttpMatch) -> Matcher {
        Matcher(Match::compile(m))
    }

    pub fn matches(&self, req: &Request<crate::http::Body>) -> bool {
        self.0.test(req).is_some()
    }
}

impl Match {
    fn compile(m: &cfg::HttpMatch) -> Match {
        Match {
            path: m.path.as_ref().and_then(Str::compile),
            method: m.method.as_ref().and_then(|s| hyper::Method::from_bytes(s.as_bytes()).ok()),
            headers: m
                .headers
                .iter()
                .filter_map(|h| {
                    Some((HeaderName::from_bytes(h.name.as_bytes()).ok()?, Str::compile(&h.value)?))
                })
                .collect(),
            query: m
                .query_params
                .iter()
                .filter_map(|q| Some((q.name.clone(), Str::compile(&q.value)?)))
                .collect(),
        }
    }

    /// Whether `req` matches; for a `prefix` path match, how many bytes it matched.
    fn test(&self, req: &Request<crate::http::Body>) -> Option<Option<usize>> {
        if self.method.as_ref().is_some_and(|m| m != req.method()) {
            return None;
        }
        let path = req.uri().path();
        let prefix = match &self.path {
            None => None,
            Some(p) if !p.matches(path) => return None,
            Some(Str::Prefix(s) | Str::PathPrefix(s)) => Some(s.len()),
            Some(_) => None,
        };
        for (name, m) in &self.headers {
            // Any one of a repeated header's values may match.
            let mut values = req.headers().get_all(name).iter().filter_map(|v| v.to_str().ok());
            let ok = match m {
                Str::Absent => !req.headers().contains_key(name),
                m => values.any(|v| m.matches(v)),
            };
            if !ok {
                return None;
            }
        }
        if !self.query.is_empty() {
            let q = req.uri().query().unwrap_or("");
            for (name, m) in &self.query {
                let mut values = q
                    .split('&')
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then_some(v)
                    })
                    .peekable();
                let ok = match m {
                    Str::Absent => values.peek().is_none(),
                    m => values.any(|v| m.matches(v)),
                };
                if !ok {
                    return None;
                }
            }
        }
        Some(prefix)
    }
}

/// Header edits with names and values parsed.
#[derive(Default)]
pub struct Edits {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl Edits {
    fn compile(e: &cfg::HeaderEdits) -> Edits {
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .filter_map(|(k, v)| {
                    Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?))
                })
                .collect()
        };
        Edits {
            set: pairs(&e.set),
            add: pairs(&e.add),
            remove: e.remove.iter().filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok()).collect(),
        }
    }

    /// Removes, then sets, then adds.
    pub fn apply(&self, h: &mut HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n, v.clone());
        }
        for (n, v) in &self.add {
            h.append(n, v.clone());
        }
    }
}

impl Table {
    /// Compiles a validated table.
    pub fn compile(t: &cfg::RouteTable) -> Table {
        let rules = t
            .http
            .iter()
            .map(|r| {
                let matches = r.matches.iter().map(Match::compile).collect();
                let backends: Vec<(String, u32)> = r
                    .backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .map(|b| (b.cluster.clone(), b.weight))
                    .collect();
                Arc::new(Rule {
                    name: Arc::from(r.name.as_str()),
                    matches,
                    total_weight: backends.iter().map(|(_, w)| w).sum(),
                    backends,
                    timeout: r.timeout_ms.map(Duration::from_millis),
                    request_headers: Edits::compile(&r.request_headers),
                    response_headers: Edits::compile(&r.response_headers),
                    rewrite: r.rewrite.as_ref().map(|rw| Rewrite {
                        uri_prefix: rw.uri_prefix.clone(),
                        authority: rw.authority.as_ref().and_then(|a| a.parse().ok()),
                        path: rw.path.clone(),
                    }),
                    fault: r.fault.clone(),
                    retry: r.retry.as_ref().filter(|r| r.attempts > 0).map(super::retry::Policy::compile),
                    mirror: r.mirror.clone().filter(|m| m.percent > 0.0),
                    redirect: r.redirect.clone(),
                    direct_response: r.direct_response.clone(),
                })
            })
            .collect();
        let tcp = t.tcp.first().map(|r| TcpRule {
            backends: r.backends.iter().map(|b| (b.cluster.clone(), b.weight)).collect(),
            total_weight: r.backends.iter().map(|b| b.weight).sum(),
            idle_timeout: r.idle_timeout_ms.map(Duration::from_millis),
        });
        Table { source: t.source.clone(), rules, tcp }
    }

    /// Whether it has HTTP rules (a table of TCP rules alone leaves HTTP requests alone).
    pub fn has_http(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The first rule `req` matches, with the length of the path prefix it matched.
    pub fn select(&self, req: &Request<crate::http::Body>) -> Option<(&Arc<Rule>, Option<usize>)> {
        self.rules.iter().find_map(|r| {
            if r.matches.is_empty() {
                return Some((r, None));
            }
            r.matches.iter().find_map(|m| m.test(req)).map(|prefix| (r, prefix))
        })
    }
}

impl Rule {
    /// A backend cluster, chosen at random by weight.
    /// (A rule without backends — a redirect, a direct response — answers before this is asked;
    /// were it asked, the empty name is no cluster.)
    pub fn pick_backend(&self) -> &str {
        pick(&self.backends, self.total_weight).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(yaml: &str) -> Table {
        let c = Config::parse(yaml).unwrap();
        Table::compile(&c.routes[0])
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<crate::http::Body> {
        use http_body_util::BodyExt;
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(http_body_util::Empty::new().map_err(|never| match never {}).boxed()).unwrap()
    }

    const CLUSTERS: &str =
        "clusters:\n- {name: v1, endpoints: ['127.0.0.1:1']}\n- {name: v2, endpoints: ['127.0.0.1:2']}\n";

    #[test]
    fn the_first_matching_rule_wins_and_a_request_no_rule_matches_gets_none() {
        let t = table(&format!(
            "{CLUSTERS}routes:\n- cluster: v1\n  http:\n  - name: canary\n    match:\n    - headers: [{{name: x-user, match: {{exact: tester}}}}]\n    - queryParams: [{{name: beta, match: present}}]\n    - {{headers: [{{name: x-legacy, match: absent}}], path: {{exact: /old}}}}\n    backends: [{{cluster: v2}}]\n  - name: api\n    match: [{{path: {{prefix: /api}}, method: GET}}]\n    backends: [{{cluster: v1}}]\n  - name: re\n    match: [{{path: {{regex: '/items/[0-9]+'}}}}]\n    backends: [{{cluster: v1}}]\n"
        ));
        let name = |r: &Request<crate::http::Body>| t.select(r).map(|(r, _)| r.name.to_string());
        assert_eq!(name(&req("/api/x", &[("x-user", "tester")])).as_deref(), Some("canary"));
        assert_eq!(name(&req("/api/x?a=1&beta", &[])).as_deref(), Some("canary"));
        assert_eq!(name(&req("/api/x?a=1&betamax=2", &[])).as_deref(), Some("api"));
        assert_eq!(name(&req("/api/x", &[("x-user", "other")])).as_deref(), Some("api"));
        assert_eq!(t.select(&req("/api/x", &[])).unwrap().1, Some(4), "the prefix's length");
        assert_eq!(name(&req("/items/12", &[])).as_deref(), Some("re"));
        assert_eq!(name(&req("/items/12/x", &[])), None, "a regex matches the whole path");
        assert_eq!(name(&req("/other", &[])), None);
        assert_eq!(name(&req("/old", &[])).as_deref(), Some("canary"), "x-legacy absent");
        assert_eq!(name(&req("/old", &[("x-legacy", "1")])), None);
    }

    #[test]
    fn backends_split_by_weight() {
        let t = table(&format!(
            "{CLUSTERS}routes:\n- cluster: v1\n  http:\n  - name: split\n    backends: [{{cluster: v1, weight: 90}}, {{cluster: v2, weight: 10}}, {{cluster: v2, weight: 0}}]\n"
        ));
        let (rule, _) = t.select(&req("/", &[])).unwrap();
        let n = 20_000;
        let v2 = (0..n).filter(|_| rule.pick_backend() == "v2").count();
        let share = v2 as f64 / n as f64;
        assert!((0.08..0.12).contains(&share), "v2 took {share}");
    }

    #[test]
    fn a_bad_table_is_refused_naming_the_field() {
        let bad =
            |routes: &str| Config::parse(&format!("{CLUSTERS}routes:\n{routes}")).unwrap_err().to_string();
        assert_eq!(
            bad("- cluster: v1\n  http:\n  - {name: a, backends: [{cluster: nope}]}\n"),
            "routes[0].http[0].backends[0].cluster: no cluster named \"nope\""
        );
        assert!(
            bad("- cluster: v1\n  http:\n  - {name: a, match: [{path: {regex: '('}}], backends: [{cluster: v1}]}\n")
                .starts_with("routes[0].http[0].match[0].path.regex: not a valid regular expression")
        );
        assert!(bad("- cluster: v1\n  http:\n  - {name: a, backends: [{cluster: v1}], requestHeaders: {set: {'bad name': x}}}\n")
            .starts_with("routes[0].http[0].requestHeaders[bad name]"));
        assert!(
            bad("- cluster: v1\n  http:\n  - {name: a, backends: [{cluster: v1}]}\n- cluster: v1\n  http:\n  - {name: a, backends: [{cluster: v1}]}\n")
                .starts_with("routes[1].cluster")
        );
    }
}
