//! AuthorizationPolicy, evaluated as Istio does: a matching DENY denies; else, with no ALLOW
//! policy, the request is allowed; else a matching ALLOW allows; else it is denied. AUDIT
//! policies and dry-run ones change nothing: what they match (or, for a dry-run one, what it
//! would have decided) is reported.
//!
//! A connection that is not HTTP has no request attributes. A rule that needs them is then read
//! as Istio reads it: in an ALLOW (or AUDIT) policy it matches nothing; in a DENY policy its HTTP
//! parts are ignored, so it denies the connections that match the rest.

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use hyper::HeaderMap;
use mycel_api::net::Cidr;

use crate::config::authz::{
    AuthzAction, AuthzCondition, AuthzOperation, AuthzPolicy, AuthzRule, AuthzSource, ConditionKey,
    ExtAuthzProvider,
};

/// A string pattern: exact, `*` (anything present), `prefix*` or `*suffix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pat {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl Pat {
    fn parse(s: &str) -> Pat {
        if s == "*" {
            Pat::Any
        } else if let Some(rest) = s.strip_prefix('*') {
            Pat::Suffix(rest.into())
        } else if let Some(rest) = s.strip_suffix('*') {
            Pat::Prefix(rest.into())
        } else {
            Pat::Exact(s.into())
        }
    }

    fn lowercase(s: &str) -> Pat {
        Pat::parse(&s.to_ascii_lowercase())
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pat::Any => true,
            Pat::Exact(e) => **e == *v,
            Pat::Prefix(p) => v.starts_with(&**p),
            Pat::Suffix(s) => v.ends_with(&**s),
        }
    }
}

/// A path pattern: a [`Pat`], or a template of segments where `{*}` is one segment and a last
/// `{**}` the rest (one segment or more).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathPattern {
    Simple(Pat),
    Template(Vec<Segment>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(Box<str>),
    One,
    Rest,
}

impl PathPattern {
    pub fn parse(s: &str) -> Result<PathPattern, String> {
        if let Some(e) = mycel_api::authz::path_template_error(s) {
            return Err(e);
        }
        if !s.contains('{') {
            return Ok(PathPattern::Simple(Pat::parse(s)));
        }
        let segments = s[1..]
            .split('/')
            .map(|p| match p {
                "{*}" => Segment::One,
                "{**}" => Segment::Rest,
                p => Segment::Literal(p.into()),
            })
            .collect();
        Ok(PathPattern::Template(segments))
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Simple(p) => p.matches(path),
            PathPattern::Template(segments) => {
                let Some(rest) = path.strip_prefix('/') else { return false };
                let mut parts = rest.split('/');
                for (i, s) in segments.iter().enumerate() {
                    match s {
                        Segment::Rest => {
                            let tail: Vec<&str> = parts.by_ref().collect();
                            return !tail.is_empty()
                                && tail.iter().all(|p| !p.is_empty())
                                && i == segments.len() - 1;
                        }
                        Segment::One => match parts.next() {
                            Some(p) if !p.is_empty() => {}
                            _ => return false,
                        },
                        Segment::Literal(l) => match parts.next() {
                            Some(p) if p == &**l => {}
                            _ => return false,
                        },
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

/// What a request or connection offers to the rules.
pub struct Attrs<'a> {
    /// The peer's SPIFFE ID without `spiffe://`, when it proved one over mutual TLS.
    pub principal: Option<&'a str>,
    /// The peer's namespace (from its SPIFFE ID).
    pub namespace: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    /// The original client's address (`remoteIpBlocks`, `remote.ip`): a sidecar trusts no
    /// forwarding hop, so it is the peer's.
    pub remote_ip: Option<IpAddr>,
    /// The port the workload listens on.
    pub port: u16,
    /// `None` for a connection that is not HTTP.
    pub http: Option<HttpAttrs<'a>>,
}

pub struct HttpAttrs<'a> {
    /// The authority (`Host`), lowercased by the caller.
    pub host: &'a str,
    pub method: &'a str,
    /// The normalised path, without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// What the request's valid token says (request authentication), if it has one.
    pub auth: Option<&'a crate::policy::jwt::Authn>,
}

/// `host[:port]` of an authority, without user info: the host the policies match and the app
/// receives.
pub fn host_of(a: &hyper::http::uri::Authority) -> String {
    match a.port() {
        Some(p) => format!("{}:{p}", a.host()),
        None => a.host().to_string(),
    }
}

impl<'a> Attrs<'a> {
    /// The attributes of a peer: `spiffe://td/ns/<ns>/sa/<sa>` gives principal and namespace.
    pub fn peer(peer_id: Option<&'a str>, source_ip: Option<IpAddr>, port: u16) -> Attrs<'a> {
        // Only a workload identity of the form the mesh CA signs has a namespace.
        let id = peer_id.and_then(|id| id.parse::<mycel_api::spiffe::SpiffeId>().ok());
        let principal = id.as_ref().and(peer_id).map(|id| id.strip_prefix("spiffe://").unwrap_or(id));
        let namespace = match (id, principal) {
            (Some(id), Some(p)) => {
                // `<td>/ns/<ns>/sa/<sa>`: the namespace is a slice of the principal.
                let start = id.trust_domain().len() + "/ns/".len();
                p.get(start..start + id.namespace().len())
            }
            _ => None,
        };
        Attrs { principal, namespace, source_ip, remote_ip: source_ip, port, http: None }
    }
}

/// A list condition: `yes` (set: one must match a present value) and `no` (set: none may match).
#[derive(Clone, Debug, Default)]
struct Field<T> {
    yes: Vec<T>,
    no: Vec<T>,
}

impl<T> Field<T> {
    fn new(yes: Vec<T>, no: Vec<T>) -> Field<T> {
        Field { yes, no }
    }

    fn is_set(&self) -> bool {
        !self.yes.is_empty() || !self.no.is_empty()
    }

    /// Whether `v` passes: any of `yes` matches it (when `yes` is set) and none of `no` does. An
    /// absent value matches no pattern (so it fails `yes` and passes `no`).
    fn check<V: Copy>(&self, v: Option<V>, m: impl Fn(&T, V) -> bool) -> bool {
        let any = |list: &[T]| v.is_some_and(|v| list.iter().any(|t| m(t, v)));
        (self.yes.is_empty() || any(&self.yes)) && !any(&self.no)
    }

    /// [`Field::check`] of an attribute with several values (a claim that is a list): one value
    /// must match `yes`, and no value `no`.
    fn check_any(&self, values: &[String], m: impl Fn(&T, &str) -> bool) -> bool {
        let any = |list: &[T]| values.iter().any(|v| list.iter().any(|t| m(t, v)));
        (self.yes.is_empty() || any(&self.yes)) && !any(&self.no)
    }
}

#[derive(Debug)]
struct Source {
    principals: Field<Pat>,
    request_principals: Field<Pat>,
    namespaces: Field<Pat>,
    ip_blocks: Field<Cidr>,
    remote_ip_blocks: Field<Cidr>,
}

#[derive(Debug)]
struct Operation {
    hosts: Field<Pat>,
    ports: Field<u16>,
    methods: Field<String>,
    paths: Field<PathPattern>,
}

#[derive(Debug)]
enum Values {
    Patterns(Field<Pat>),
    Blocks(Field<Cidr>),
    Ports(Field<u16>),
}

#[derive(Debug)]
struct Condition {
    key: ConditionKey,
    values: Values,
}

#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Debug)]
struct Policy {
    name: Arc<str>,
    action: AuthzAction,
    rules: Vec<Rule>,
}

impl Source {
    fn compile(s: &AuthzSource) -> Source {
        let pats = |v: &[String]| v.iter().map(|s| Pat::parse(s)).collect();
        let blocks = |v: &[String]| v.iter().filter_map(|s| s.parse::<Cidr>().ok()).collect();
        Source {
            principals: Field::new(pats(&s.principals), pats(&s.not_principals)),
            request_principals: Field::new(pats(&s.request_principals), pats(&s.not_request_principals)),
            namespaces: Field::new(pats(&s.namespaces), pats(&s.not_namespaces)),
            ip_blocks: Field::new(blocks(&s.ip_blocks), blocks(&s.not_ip_blocks)),
            remote_ip_blocks: Field::new(blocks(&s.remote_ip_blocks), blocks(&s.not_remote_ip_blocks)),
        }
    }

    /// `lenient`: what the request principals (an HTTP attribute) count as on a connection
    /// that is not HTTP.
    fn matches(&self, a: &Attrs, lenient: bool) -> bool {
        let request = || match &a.http {
            None => lenient,
            Some(h) => {
                self.request_principals.check(h.auth.map(|x| x.principal.as_str()), |p, v| p.matches(v))
            }
        };
        self.principals.check(a.principal, |p, v| p.matches(v))
            && self.namespaces.check(a.namespace, |p, v| p.matches(v))
            && self.ip_blocks.check(a.source_ip, |c, ip| c.contains(ip))
            && self.remote_ip_blocks.check(a.remote_ip, |c, ip| c.contains(ip))
            && (!self.request_principals.is_set() || request())
    }
}

impl Operation {
    fn compile(o: &AuthzOperation) -> Operation {
        let hosts = |v: &[String]| v.iter().map(|s| Pat::lowercase(s)).collect();
        let paths = |v: &[String]| v.iter().filter_map(|s| PathPattern::parse(s).ok()).collect();
        Operation {
            hosts: Field::new(hosts(&o.hosts), hosts(&o.not_hosts)),
            ports: Field::new(o.ports.clone(), o.not_ports.clone()),
            methods: Field::new(o.methods.clone(), o.not_methods.clone()),
            paths: Field::new(paths(&o.paths), paths(&o.not_paths)),
        }
    }

    /// `lenient`: what an HTTP-only part counts as on a connection that is not HTTP.
    fn matches(&self, a: &Attrs, lenient: bool) -> bool {
        if !self.ports.check(Some(a.port), |p, v| *p == v) {
            return false;
        }
        if !(self.hosts.is_set() || self.methods.is_set() || self.paths.is_set()) {
            return true;
        }
        let Some(h) = &a.http else { return lenient };
        // A host pattern without a port also matches the authority with one.
        let host = |p: &Pat, v: &str| {
            p.matches(v)
                || v.rsplit_once(':')
                    .is_some_and(|(h, port)| port.bytes().all(|b| b.is_ascii_digit()) && p.matches(h))
        };
        self.hosts.check(Some(h.host), host)
            && self.methods.check(Some(h.method), |m, v| m == v)
            && self.paths.check(Some(h.path), |p, v| p.matches(v))
    }
}

impl Condition {
    fn compile(c: &AuthzCondition) -> Option<Condition> {
        let key = ConditionKey::parse(&c.key)?;
        let values = match key {
            ConditionKey::SourceIp | ConditionKey::RemoteIp => Values::Blocks(Field::new(
                c.values.iter().filter_map(|s| s.parse::<Cidr>().ok()).collect(),
                c.not_values.iter().filter_map(|s| s.parse::<Cidr>().ok()).collect(),
            )),
            ConditionKey::DestinationPort => Values::Ports(Field::new(
                c.values.iter().filter_map(|s| s.parse().ok()).collect(),
                c.not_values.iter().filter_map(|s| s.parse().ok()).collect(),
            )),
            _ => Values::Patterns(Field::new(
                c.values.iter().map(|s| Pat::parse(s)).collect(),
                c.not_values.iter().map(|s| Pat::parse(s)).collect(),
            )),
        };
        Some(Condition { key, values })
    }

    fn matches(&self, a: &Attrs, lenient: bool) -> bool {
        if self.key.http() && a.http.is_none() {
            return lenient;
        }
        let text = |f: &Field<Pat>, v: Option<&str>| f.check(v, |p, v| p.matches(v));
        match (&self.key, &self.values) {
            (ConditionKey::SourceIp, Values::Blocks(f)) => f.check(a.source_ip, |c, ip| c.contains(ip)),
            (ConditionKey::RemoteIp, Values::Blocks(f)) => f.check(a.remote_ip, |c, ip| c.contains(ip)),
            (ConditionKey::DestinationPort, Values::Ports(f)) => f.check(Some(a.port), |p, v| *p == v),
            (ConditionKey::SourceNamespace, Values::Patterns(f)) => text(f, a.namespace),
            (ConditionKey::SourcePrincipal, Values::Patterns(f)) => text(f, a.principal),
            (key, Values::Patterns(f)) => {
                let Some(h) = &a.http else { return lenient };
                match key {
                    ConditionKey::RequestMethod => text(f, Some(h.method)),
                    ConditionKey::RequestPath => text(f, Some(h.path)),
                    ConditionKey::RequestAuthPrincipal => text(f, h.auth.map(|x| x.principal.as_str())),
                    ConditionKey::RequestAuthPresenter => {
                        text(f, h.auth.and_then(|x| x.presenter.as_deref()))
                    }
                    ConditionKey::RequestAuthAudiences => {
                        f.check_any(h.auth.map_or(&[][..], |x| &x.audiences), |p, v| p.matches(v))
                    }
                    ConditionKey::RequestAuthClaim(path) => {
                        let values = h.auth.map(|x| x.claim(path)).unwrap_or_default();
                        f.check_any(&values, |p, v| p.matches(v))
                    }
                    ConditionKey::RequestHeader(name) => {
                        // Several values of one header read as one, comma-joined (as Envoy does).
                        // Bytes that are not text are read lossily: a header's presence always counts.
                        let mut all = h
                            .headers
                            .get_all(name.as_str())
                            .iter()
                            .map(|v| String::from_utf8_lossy(v.as_bytes()));
                        let joined: Option<Cow<str>> = match (all.next(), all.next()) {
                            (None, _) => None,
                            (Some(one), None) => Some(one),
                            (Some(a), Some(b)) => {
                                let mut s = format!("{a},{b}");
                                for v in all {
                                    s.push(',');
                                    s.push_str(&v);
                                }
                                Some(Cow::Owned(s))
                            }
                        };
                        text(f, joined.as_deref())
                    }
                    _ => false,
                }
            }
            _ => false,
        }
    }
}

impl Rule {
    fn compile(r: &AuthzRule) -> Rule {
        Rule {
            from: r.from.iter().map(Source::compile).collect(),
            to: r.to.iter().map(Operation::compile).collect(),
            when: r.when.iter().filter_map(Condition::compile).collect(),
        }
    }

    fn matches(&self, a: &Attrs, lenient: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a, lenient)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a, lenient)))
            && self.when.iter().all(|c| c.matches(a, lenient))
    }
}

impl Policy {
    fn matches(&self, a: &Attrs) -> bool {
        // A DENY's HTTP parts are left out on a connection that is not HTTP, and so are a
        // CUSTOM's (the authorizer is asked about the connection): the safe reading of both.
        let lenient = matches!(self.action, AuthzAction::Deny | AuthzAction::Custom);
        self.rules.iter().any(|r| r.matches(a, lenient))
    }
}

/// The compiled policies of one workload.
#[derive(Debug, Default)]
pub struct Engine {
    /// CUSTOM policies (dry-run ones too), each with its authorizer (`None`: not one of the
    /// installation's).
    custom: Vec<(Policy, Option<Arc<ExtAuthzProvider>>, bool)>,
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    audit: Vec<Policy>,
    dry_run: Vec<Policy>,
    /// Which rules of `deny` and `allow` an HTTP request's path may match.
    deny_index: PathIndex,
    allow_index: PathIndex,
}

/// The rules of a list of policies by the literal path prefix they need: a rule whose every
/// operation names `paths` can only match a path that starts with one of their literal prefixes
/// (an exact path, a `prefix*`, a template up to its first `{*}`); other rules are candidates
/// for every path. So a request is matched against the rules its path may meet, not all of
/// them — in (policy, rule) order, so the first policy to match is the one that would have.
#[derive(Debug, Default)]
struct PathIndex {
    /// (policy, rule) by rule id, ids in list order.
    rules: Vec<(u32, u32)>,
    /// Rules without a path prefix, sorted.
    anywhere: Vec<u32>,
    /// A byte trie of prefixes; node 0 is the empty prefix.
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Default)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    rules: Vec<u32>,
}

/// The literal prefix a path pattern needs, if it needs one beyond `/`.
fn literal_prefix(p: &PathPattern) -> Option<String> {
    match p {
        PathPattern::Simple(Pat::Exact(e) | Pat::Prefix(e)) => Some(e.to_string()),
        PathPattern::Simple(_) => None,
        PathPattern::Template(segments) => {
            let mut prefix = String::from("/");
            for s in segments {
                match s {
                    Segment::Literal(l) => {
                        prefix.push_str(l);
                        prefix.push('/');
                    }
                    _ => return Some(prefix),
                }
            }
            // Only literals: the exact path (without the slash added after the last).
            prefix.pop();
            Some(prefix)
        }
    }
}

impl PathIndex {
    fn build(policies: &[Policy]) -> PathIndex {
        let mut x = PathIndex { nodes: vec![TrieNode::default()], ..Default::default() };
        for (pi, p) in policies.iter().enumerate() {
            for (ri, r) in p.rules.iter().enumerate() {
                let id = x.rules.len() as u32;
                x.rules.push((pi as u32, ri as u32));
                // Every operation must need a prefix (any one of them may match).
                let prefixes: Option<Vec<String>> = if r.to.is_empty() {
                    None
                } else {
                    r.to.iter()
                        .map(|o| {
                            if o.paths.yes.is_empty() {
                                return None;
                            }
                            o.paths.yes.iter().map(literal_prefix).collect::<Option<Vec<String>>>()
                        })
                        .collect::<Option<Vec<Vec<String>>>>()
                        .map(|v| v.concat())
                };
                match prefixes {
                    None => x.anywhere.push(id),
                    Some(list) => {
                        for prefix in list {
                            let node = x.insert(prefix.as_bytes());
                            let rules = &mut x.nodes[node].rules;
                            if rules.last() != Some(&id) {
                                rules.push(id);
                            }
                        }
                    }
                }
            }
        }
        x
    }

    fn insert(&mut self, prefix: &[u8]) -> usize {
        let mut node = 0;
        for &b in prefix {
            node = match self.nodes[node].children.iter().find(|(c, _)| *c == b) {
                Some((_, n)) => *n as usize,
                None => {
                    let n = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].children.push((b, n as u32));
                    n
                }
            };
        }
        node
    }

    /// The first policy of `policies` (those the index was built from) with a rule that matches.
    fn first_match<'p>(&self, policies: &'p [Policy], a: &Attrs, path: &str) -> Option<&'p Policy> {
        let mut found: Vec<u32> = Vec::new();
        let mut node = 0;
        let Some(root) = self.nodes.first() else {
            // Not built (an empty engine): a scan.
            return policies.iter().find(|p| p.matches(a));
        };
        found.extend_from_slice(&root.rules);
        for &b in path.as_bytes() {
            match self.nodes[node].children.iter().find(|(c, _)| *c == b) {
                Some((_, n)) => node = *n as usize,
                None => break,
            }
            found.extend_from_slice(&self.nodes[node].rules);
        }
        found.sort_unstable();
        found.dedup();
        // Merge with the rules that may match anywhere, in id order.
        let (mut i, mut j) = (0, 0);
        while i < found.len() || j < self.anywhere.len() {
            let id = match (found.get(i), self.anywhere.get(j)) {
                (Some(f), Some(w)) if f < w => {
                    i += 1;
                    *f
                }
                (Some(f), None) => {
                    i += 1;
                    *f
                }
                (_, Some(w)) => {
                    j += 1;
                    *w
                }
                (None, None) => break,
            };
            let (pi, ri) = self.rules[id as usize];
            let p = &policies[pi as usize];
            if p.rules[ri as usize].matches(a, p.action == AuthzAction::Deny) {
                return Some(p);
            }
        }
        None
    }
}

/// A CUSTOM policy that matched: whose authorizer to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Custom {
    pub policy: Arc<str>,
    /// `None`: the policy's provider is not one of the installation's (it refuses).
    pub provider: Option<Arc<ExtAuthzProvider>>,
    /// Asked and reported, never enforced.
    pub dry_run: bool,
}

/// What the policies decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided (`None`: no policy matched — allowed without ALLOW policies,
    /// denied with some).
    pub by: Option<(Arc<str>, AuthzAction)>,
    /// AUDIT policies that matched.
    pub audited: Vec<Arc<str>>,
    /// Dry-run policies: (name, action, whether it would have allowed the request).
    pub dry_run: Vec<(Arc<str>, AuthzAction, bool)>,
}

impl Engine {
    /// Compiles validated policies ([`crate::config::authz::validate`]).
    pub fn compile(policies: &[AuthzPolicy]) -> Engine {
        let mut e = Engine::default();
        for p in policies {
            let c = Policy {
                name: Arc::from(p.name.as_str()),
                action: p.action,
                rules: p.rules.iter().map(Rule::compile).collect(),
            };
            match (p.dry_run, p.action) {
                (_, AuthzAction::Custom) => e.custom.push((c, p.provider.clone().map(Arc::new), p.dry_run)),
                (_, AuthzAction::Audit) => e.audit.push(c),
                (true, _) => e.dry_run.push(c),
                (false, AuthzAction::Deny) => e.deny.push(c),
                (false, AuthzAction::Allow) => e.allow.push(c),
            }
        }
        e.deny_index = PathIndex::build(&e.deny);
        e.allow_index = PathIndex::build(&e.allow);
        e
    }

    /// The first policy of a list that matches: through its path index for an HTTP request.
    fn first<'p>(policies: &'p [Policy], index: &PathIndex, a: &Attrs) -> Option<&'p Policy> {
        match &a.http {
            Some(h) => index.first_match(policies, a, h.path),
            None => policies.iter().find(|p| p.matches(a)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.custom.is_empty()
            && self.deny.is_empty()
            && self.allow.is_empty()
            && self.audit.is_empty()
            && self.dry_run.is_empty()
    }

    /// The CUSTOM policies that match, in order: each one's authorizer is asked before the DENY
    /// and ALLOW policies are evaluated (once per authorizer: a later policy of the same one is
    /// left out).
    pub fn custom(&self, a: &Attrs) -> Vec<Custom> {
        let mut out: Vec<Custom> = Vec::new();
        for (p, provider, dry_run) in &self.custom {
            if !p.matches(a) {
                continue;
            }
            let seen = out.iter().any(|c| {
                c.dry_run == *dry_run
                    && match (&c.provider, provider) {
                        (Some(x), Some(y)) => x == y,
                        _ => false,
                    }
            });
            if !seen {
                out.push(Custom { policy: p.name.clone(), provider: provider.clone(), dry_run: *dry_run });
            }
        }
        out
    }

    pub fn evaluate(&self, a: &Attrs) -> Decision {
        let mut d = Decision {
            audited: self.audit.iter().filter(|p| p.matches(a)).map(|p| p.name.clone()).collect(),
            dry_run: self
                .dry_run
                .iter()
                .map(|p| {
                    let m = p.matches(a);
                    (p.name.clone(), p.action, if p.action == AuthzAction::Deny { !m } else { m })
                })
                .collect(),
            ..Decision::default()
        };
        if let Some(p) = Engine::first(&self.deny, &self.deny_index, a) {
            d.by = Some((p.name.clone(), AuthzAction::Deny));
            return d;
        }
        if self.allow.is_empty() {
            d.allowed = true;
            return d;
        }
        if let Some(p) = Engine::first(&self.allow, &self.allow_index, a) {
            d.by = Some((p.name.clone(), AuthzAction::Allow));
            d.allowed = true;
        }
        d
    }
}

/// A request path normalised as Istio's `BASE` normalisation with merged slashes: backslashes
/// become `/`, percent-encoded unreserved characters (`%61` is `a`, `%2E` is `.`) are decoded
/// and other escapes uppercased, runs of `/` merged, and `.` and `..` segments resolved (never
/// above the root), so that `/admin/../admin`, `/%61dmin` and `//admin` are all `/admin`.
/// `%2F` stays encoded. Case is kept.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let plain = path.starts_with('/')
        && !path.bytes().any(|b| b == b'%' || b == b'\\')
        && !path.contains("//")
        && !path.contains("/.");
    if plain {
        return Cow::Borrowed(path);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len() + 1);
    if !path.starts_with(['/', '\\']) {
        decoded.push('/');
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%'
            && b.len() - i >= 3
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let v = h * 16 + l;
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push(b[i + 1].to_ascii_uppercase() as char);
                decoded.push(b[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
            continue;
        }
        // The path is ASCII in a valid URI; anything else is kept as it is.
        let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
        decoded.push(if ch == '\\' { '/' } else { ch });
        i += ch.len_utf8();
    }
    // Segments after the leading slash; empty ones (merged slashes) dropped, dots resolved.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = decoded.ends_with('/');
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "" => {}
            "." => trailing |= i == last,
            ".." => {
                out.pop();
                trailing |= i == last;
            }
            s => out.push(s),
        }
    }
    let mut n = String::with_capacity(decoded.len());
    for s in &out {
        n.push('/');
        n.push_str(s);
    }
    if out.is_empty() || trailing {
        n.push('/');
    }
    Cow::Owned(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::authz::{AuthzCondition, AuthzOperation, AuthzSource};

    fn policy(name: &str, action: AuthzAction, rules: Vec<AuthzRule>) -> AuthzPolicy {
        AuthzPolicy { name: name.into(), action, dry_run: false, rules, provider: None }
    }

    fn from(s: AuthzSource) -> AuthzRule {
        AuthzRule { from: vec![s], ..Default::default() }
    }

    fn to(o: AuthzOperation) -> AuthzRule {
        AuthzRule { to: vec![o], ..Default::default() }
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const BATCH: &str = "spiffe://cluster.local/ns/jobs/sa/batch";

    fn request<'a>(
        peer: Option<&'a str>,
        method: &'a str,
        path: &'a str,
        headers: &'a HeaderMap,
    ) -> Attrs<'a> {
        let mut a = Attrs::peer(peer, Some("10.1.2.3".parse().unwrap()), 8080);
        a.http = Some(HttpAttrs { host: "api.shop:80", method, path, headers, auth: None });
        a
    }

    #[test]
    fn request_principals_and_claims_match_the_token_and_nothing_without_one() {
        let h = HeaderMap::new();
        let auth = crate::policy::jwt::Authn {
            principal: "https://idp.example/alice".into(),
            claims: serde_json::json!({"groups": ["admins", "dev"], "org": {"tier": "gold"}, "level": 3})
                .as_object()
                .unwrap()
                .clone(),
            audiences: vec!["shop".into()],
            presenter: Some("web".into()),
        };
        let e = Engine::compile(&[policy(
            "shop/require-jwt",
            AuthzAction::Allow,
            vec![AuthzRule {
                from: vec![AuthzSource {
                    request_principals: vec!["https://idp.example/*".into()],
                    ..Default::default()
                }],
                when: vec![
                    AuthzCondition {
                        key: "request.auth.claims[groups]".into(),
                        values: vec!["admins".into()],
                        ..Default::default()
                    },
                    AuthzCondition {
                        key: "request.auth.claims[org][tier]".into(),
                        values: vec!["gold".into()],
                        ..Default::default()
                    },
                    AuthzCondition {
                        key: "request.auth.claims[level]".into(),
                        not_values: vec!["1".into()],
                        ..Default::default()
                    },
                    AuthzCondition {
                        key: "request.auth.audiences".into(),
                        values: vec!["shop".into()],
                        ..Default::default()
                    },
                    AuthzCondition {
                        key: "request.auth.presenter".into(),
                        values: vec!["web".into()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
        )]);
        let with = |a: Option<&crate::policy::jwt::Authn>| {
            let mut r = request(Some(WEB), "GET", "/", &h);
            r.http.as_mut().unwrap().auth = a;
            e.evaluate(&r).allowed
        };
        assert!(with(Some(&auth)));
        assert!(!with(None), "no token: no request principal");
        let mut other = auth.clone();
        other.claims.insert("groups".into(), serde_json::json!(["dev"]));
        assert!(!with(Some(&other)), "the claim lacks the value");
        let mut other = auth.clone();
        other.principal = "https://evil.example/alice".into();
        assert!(!with(Some(&other)));
        // notRequestPrincipals ["*"] is the request without a token; on TCP an ALLOW on request
        // principals matches nothing.
        let e = Engine::compile(&[policy(
            "shop/deny-anonymous",
            AuthzAction::Deny,
            vec![from(AuthzSource { not_request_principals: vec!["*".into()], ..Default::default() })],
        )]);
        let mut r = request(Some(WEB), "GET", "/", &h);
        assert!(!e.evaluate(&r).allowed, "anonymous denied");
        r.http.as_mut().unwrap().auth = Some(&auth);
        assert!(e.evaluate(&r).allowed);
        assert!(ConditionKey::parse("request.auth.claims[]").is_none());
        assert!(ConditionKey::parse("request.auth.claims[a]b").is_none());
        assert_eq!(
            ConditionKey::parse("request.auth.claims[a][b]"),
            Some(ConditionKey::RequestAuthClaim(vec!["a".into(), "b".into()]))
        );
    }

    #[test]
    fn deny_first_then_allow_lists_then_default_deny() {
        let h = HeaderMap::new();
        let allowed = |e: &Engine, peer, path| e.evaluate(&request(peer, "GET", path, &h)).allowed;
        // No policy: everything passes.
        assert!(allowed(&Engine::compile(&[]), None, "/"));
        let deny_batch = policy(
            "shop/deny-batch",
            AuthzAction::Deny,
            vec![from(AuthzSource { namespaces: vec!["jobs".into()], ..Default::default() })],
        );
        let e = Engine::compile(std::slice::from_ref(&deny_batch));
        assert!(!allowed(&e, Some(BATCH), "/"), "DENY by namespace");
        assert!(allowed(&e, Some(WEB), "/"), "no ALLOW policy: the rest passes");
        assert!(allowed(&e, None, "/"), "plaintext has no namespace");
        let allow_web = policy(
            "shop/allow-web",
            AuthzAction::Allow,
            vec![from(AuthzSource {
                principals: vec!["cluster.local/ns/shop/sa/*".into()],
                ..Default::default()
            })],
        );
        let e = Engine::compile(&[deny_batch.clone(), allow_web.clone()]);
        let d = e.evaluate(&request(Some(WEB), "GET", "/", &h));
        assert_eq!((d.allowed, d.by), (true, Some((Arc::from("shop/allow-web"), AuthzAction::Allow))));
        let d = e.evaluate(&request(None, "GET", "/", &h));
        assert_eq!((d.allowed, d.by), (false, None), "an ALLOW exists and none matches");
        let d = e.evaluate(&request(Some(BATCH), "GET", "/", &h));
        assert_eq!(d.by, Some((Arc::from("shop/deny-batch"), AuthzAction::Deny)), "DENY before ALLOW");
        // `rules: [{}]` allows everything; an ALLOW without rules allows nothing.
        let all = policy("shop/all", AuthzAction::Allow, vec![AuthzRule::default()]);
        assert!(allowed(&Engine::compile(&[all]), None, "/x"));
        let nothing = policy("shop/nothing", AuthzAction::Allow, vec![]);
        assert!(!allowed(&Engine::compile(&[nothing]), Some(WEB), "/"));
    }

    #[test]
    fn operations_and_conditions_match_as_istio_does() {
        let mut h = HeaderMap::new();
        h.append("x-team", "blue".parse().unwrap());
        let deny = |o: AuthzOperation| Engine::compile(&[policy("ns/p", AuthzAction::Deny, vec![to(o)])]);
        let denied =
            |e: &Engine, method: &str, path: &str| !e.evaluate(&request(Some(WEB), method, path, &h)).allowed;
        let paths = |p: &[&str]| AuthzOperation {
            paths: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let e = deny(paths(&["/admin", "/api/*", "*.json", "/v1/{*}/items/{**}"]));
        assert!(denied(&e, "GET", "/admin"));
        assert!(!denied(&e, "GET", "/admin/x"), "exact");
        assert!(denied(&e, "GET", "/api/"));
        assert!(denied(&e, "GET", "/data.json"));
        assert!(denied(&e, "GET", "/v1/a/items/b/c"));
        assert!(!denied(&e, "GET", "/v1/a/b/items/c"), "{{*}} is one segment");
        assert!(!denied(&e, "GET", "/v1/a/items"), "{{**}} needs a segment");
        let e = deny(AuthzOperation { not_methods: vec!["GET".into()], ..Default::default() });
        assert!(denied(&e, "POST", "/"));
        assert!(!denied(&e, "GET", "/"));
        let e =
            deny(AuthzOperation { hosts: vec!["API.shop".into()], ports: vec![8080], ..Default::default() });
        assert!(denied(&e, "GET", "/"), "host without port, case-insensitive");
        let e = deny(AuthzOperation { not_ports: vec![8080], ..Default::default() });
        assert!(!denied(&e, "GET", "/"));
        let when = |key: &str, values: &[&str], not: &[&str]| {
            let c = AuthzCondition {
                key: key.into(),
                values: values.iter().map(|s| s.to_string()).collect(),
                not_values: not.iter().map(|s| s.to_string()).collect(),
            };
            Engine::compile(&[policy(
                "ns/p",
                AuthzAction::Deny,
                vec![AuthzRule { when: vec![c], ..Default::default() }],
            )])
        };
        assert!(denied(&when("request.headers[X-Team]", &["bl*"], &[]), "GET", "/"));
        assert!(!denied(&when("request.headers[x-other]", &["*"], &[]), "GET", "/"), "absent header");
        assert!(
            denied(&when("request.headers[x-other]", &[], &["x"]), "GET", "/"),
            "absent passes notValues"
        );
        assert!(denied(&when("source.ip", &["10.1.0.0/16"], &[]), "GET", "/"));
        assert!(denied(&when("remote.ip", &["10.1.2.3"], &[]), "GET", "/"));
        assert!(!denied(&when("remote.ip", &[], &["10.0.0.0/8"]), "GET", "/"));
        assert!(denied(&when("source.namespace", &["shop"], &[]), "GET", "/"));
        assert!(!denied(&when("destination.port", &["9090"], &[]), "GET", "/"));
        assert!(denied(&when("request.path", &["/a*"], &[]), "GET", "/abc"));
    }

    /// A DENY policy of one rule, written as the proxy's configuration spells it (the CRD's field
    /// names, without its `source` and `operation` wrappers).
    fn deny_rule(rule: &str) -> Engine {
        let p: AuthzPolicy =
            serde_yaml::from_str(&format!("name: ns/p\naction: DENY\nrules: [{rule}]")).unwrap();
        Engine::compile(&[p])
    }

    #[test]
    fn not_forms_match_what_the_positive_forms_do_not() {
        let h = HeaderMap::new();
        let denied = |rule: &str, peer: Option<&str>, path: &str| {
            !deny_rule(rule).evaluate(&request(peer, "GET", path, &h)).allowed
        };
        // The request comes from 10.1.2.3, to api.shop:80, port 8080.
        assert!(denied("{from: [{ipBlocks: [10.1.0.0/16]}]}", None, "/"));
        assert!(!denied("{from: [{ipBlocks: [10.2.0.0/16]}]}", None, "/"));
        assert!(denied("{from: [{notIpBlocks: [10.2.0.0/16]}]}", None, "/"));
        assert!(!denied("{from: [{notIpBlocks: [10.1.2.3]}]}", None, "/"));
        // remoteIpBlocks: a sidecar trusts no forwarding hop, so the original client is the peer
        // (an X-Forwarded-For it sends changes nothing).
        assert!(denied("{from: [{remoteIpBlocks: [10.1.0.0/16]}]}", None, "/"));
        assert!(!denied("{from: [{remoteIpBlocks: [192.0.2.1]}]}", None, "/"));
        assert!(denied("{from: [{notRemoteIpBlocks: [10.2.0.0/16]}]}", None, "/"));
        assert!(!denied("{from: [{notRemoteIpBlocks: [10.1.2.3/32]}]}", None, "/"));
        let mut forwarded = HeaderMap::new();
        forwarded.insert("x-forwarded-for", hyper::header::HeaderValue::from_static("192.0.2.1"));
        let e = deny_rule("{from: [{remoteIpBlocks: [192.0.2.1]}]}");
        assert!(e.evaluate(&request(None, "GET", "/", &forwarded)).allowed, "X-Forwarded-For is not trusted");
        let not_shop = "{from: [{notNamespaces: [shop]}]}";
        assert!(!denied(not_shop, Some(WEB), "/"));
        assert!(denied(not_shop, Some(BATCH), "/"));
        assert!(denied(not_shop, None, "/"), "plaintext is in no namespace, so not in shop");
        let not_web = "{from: [{notPrincipals: [cluster.local/ns/shop/*]}]}";
        assert!(!denied(not_web, Some(WEB), "/"));
        assert!(denied(not_web, Some(BATCH), "/"));
        assert!(!denied("{to: [{notHosts: ['*.shop']}]}", None, "/"));
        assert!(denied("{to: [{notHosts: [web]}]}", None, "/"));
        let not_public = "{to: [{notPaths: [/public/*]}]}";
        assert!(!denied(not_public, None, "/public/x"));
        assert!(denied(not_public, None, "/private"));
        assert!(!denied("{to: [{notMethods: [GET]}]}", None, "/"));
        assert!(!deny_rule("{to: [{notMethods: [GET]}]}").evaluate(&request(None, "POST", "/", &h)).allowed);
        assert!(!denied("{to: [{notPorts: [8080]}]}", None, "/"));
        assert!(denied("{to: [{notPorts: [9090]}]}", None, "/"));
    }

    #[test]
    fn a_connection_that_is_not_http_reads_http_rules_as_istio_does() {
        let http_rule = to(AuthzOperation { methods: vec!["GET".into()], ..Default::default() });
        let l4 = Attrs::peer(Some(WEB), Some("10.1.2.3".parse().unwrap()), 5432);
        let deny = Engine::compile(&[policy("ns/d", AuthzAction::Deny, vec![http_rule.clone()])]);
        assert!(!deny.evaluate(&l4).allowed, "a DENY ignores its HTTP parts");
        let allow = Engine::compile(&[policy("ns/a", AuthzAction::Allow, vec![http_rule])]);
        assert!(!allow.evaluate(&l4).allowed, "an ALLOW with HTTP parts matches nothing");
        let by_port = to(AuthzOperation { ports: vec![5432], ..Default::default() });
        let allow = Engine::compile(&[policy("ns/a", AuthzAction::Allow, vec![by_port])]);
        assert!(allow.evaluate(&l4).allowed, "an L4-only ALLOW");
    }

    #[test]
    fn audit_and_dry_run_policies_change_nothing_and_are_reported() {
        let h = HeaderMap::new();
        let mut dry = policy("ns/dry", AuthzAction::Deny, vec![AuthzRule::default()]);
        dry.dry_run = true;
        let audit = policy("ns/audit", AuthzAction::Audit, vec![AuthzRule::default()]);
        let e = Engine::compile(&[dry, audit]);
        let d = e.evaluate(&request(Some(WEB), "GET", "/", &h));
        assert!(d.allowed);
        assert_eq!(d.audited, vec![Arc::from("ns/audit")]);
        assert_eq!(d.dry_run, vec![(Arc::from("ns/dry"), AuthzAction::Deny, false)]);
    }

    #[test]
    fn paths_are_normalised_before_matching() {
        for (input, want) in [
            ("/admin", "/admin"),
            ("/admin/../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("//admin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../../x", "/x"),
            ("/%2e%2e/admin", "/admin"),
            ("/a%2fb", "/a%2Fb"),
            ("\\admin\\x", "/admin/x"),
            ("/x%zz", "/x%zz"),
            ("", "/"),
            ("/", "/"),
        ] {
            assert_eq!(normalize_path(input), want, "{input}");
        }
    }
    #[test]
    fn the_path_index_finds_the_policy_a_scan_finds() {
        let rules = [
            "{to: [{paths: [/api/*]}]}",
            "{to: [{paths: [/exact]}, {paths: ['/v1/{*}/items/{**}']}]}",
            "{to: [{paths: ['*.json']}]}",
            "{to: [{paths: ['/{*}/x']}]}",
            "{to: [{paths: ['/{**}']}]}",
            "{to: [{paths: ['/v1/{**}'], notPaths: [/v1/secret/*]}]}",
            "{to: [{paths: [/p/*], ports: [9090]}]}",
            "{to: [{paths: [/m/*]}]}, {to: [{methods: [DELETE]}]}, {to: [{paths: [/]}]}",
            "{to: [{notPaths: [/api/*]}]}",
            "{to: [{methods: [POST]}]}",
            "{from: [{namespaces: [shop]}]}",
            "{to: [{paths: [/a, /ab, /abc/*]}], when: [{key: 'request.headers[x-team]', values: [blue]}]}",
            "{to: [{paths: [/api/v2/*]}, {methods: [DELETE]}]}",
            "{to: [{paths: ['*']}]}",
        ];
        let mut policies = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            for action in ["ALLOW", "DENY"] {
                let y = format!("name: ns/{action}-{i}\naction: {action}\nrules: [{r}]");
                policies.push(serde_yaml::from_str::<AuthzPolicy>(&y).unwrap());
            }
        }
        let mut teams = HeaderMap::new();
        teams.insert("x-team", hyper::header::HeaderValue::from_static("blue"));
        let none = HeaderMap::new();
        let paths = [
            "/",
            "/api",
            "/api/",
            "/api/v2/x",
            "/exact",
            "/exactly",
            "/v1/a/items/b",
            "/v1/a/items",
            "/d.json",
            "/a",
            "/ab",
            "/abc/d",
            "/abc",
            "/x",
            "/q/x",
            "/v1/secret/k",
            "/v1/open",
            "/p/1",
            "/m/1",
        ];
        crate::config::authz::validate(&policies).unwrap();
        let mut reversed = policies.clone();
        reversed.reverse();
        // Every suffix of the list and of its reverse (so that each can be the first match).
        let lists: Vec<&[AuthzPolicy]> = (0..policies.len())
            .map(|s| &policies[s..])
            .chain((0..reversed.len()).map(|s| &reversed[s..]))
            .collect();
        for (start, list) in lists.into_iter().enumerate() {
            let e = Engine::compile(list);
            for path in paths {
                for method in ["GET", "POST", "DELETE"] {
                    for (peer, headers) in [(None, &none), (Some(WEB), &teams), (Some(BATCH), &none)] {
                        let a = request(peer, method, path, headers);
                        for (list, index) in [(&e.allow, &e.allow_index), (&e.deny, &e.deny_index)] {
                            let scan = list.iter().find(|p| p.matches(&a)).map(|p| p.name.clone());
                            let indexed = index.first_match(list, &a, path).map(|p| p.name.clone());
                            assert_eq!(indexed, scan, "{method} {path} from {peer:?}, list {start}");
                        }
                        // And through the engine.
                        let d = e.evaluate(&a);
                        let scan_deny = e.deny.iter().find(|p| p.matches(&a));
                        let scan_allow = e.allow.iter().find(|p| p.matches(&a));
                        let want = match (scan_deny, scan_allow) {
                            (Some(p), _) => (false, Some(p.name.clone())),
                            (None, _) if e.allow.is_empty() => (true, None),
                            (None, Some(p)) => (true, Some(p.name.clone())),
                            (None, None) => (false, None),
                        };
                        assert_eq!((d.allowed, d.by.map(|b| b.0)), want, "{method} {path}");
                    }
                }
            }
        }
    }
}
