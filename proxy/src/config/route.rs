//! Route tables in the proxy's model: how requests a workload sends to one cluster are matched
//! and where they go (streamed from TrafficRoute, or written in a static configuration).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The routes of one cluster: its rules, tried in order. A request to the cluster that no rule
/// matches is answered 404.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTable {
    /// The cluster whose requests it routes.
    pub cluster: String,
    /// What it was translated from (`TrafficRoute shop/reviews`), named in reasons.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Namespaces of the clients it applies to; empty: every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
    /// For connections that are not HTTP: at most one rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRule>,
}

/// Where a TCP connection goes: a backend by weight, closed after an idle time.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRule {
    #[serde(default)]
    pub name: String,
    pub backends: Vec<WeightedCluster>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRule {
    pub name: String,
    /// Any one selects the rule; none selects every request.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// Split by weight; none for a rule that redirects or answers itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<WeightedCluster>,
    /// Deadline of the whole request (504 when it passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub response_headers: HeaderEdits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Instead of backends: a redirect, or a response of the proxy's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
}

/// A redirect: the request's URL with the parts given replaced.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Replaces the whole path (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replaces the matched path prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Default 301.
    #[serde(default = "Redirect::moved")]
    pub code: u16,
}

impl Redirect {
    fn moved() -> u16 {
        301
    }
}

/// A response the proxy makes itself (`text/plain`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
}

/// A copy of each request without a body, sent to `cluster` and its answer discarded.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub cluster: String,
    /// Share of requests copied, 0-100 (default 100).
    #[serde(default = "Mirror::all")]
    pub percent: f64,
}

impl Mirror {
    fn all() -> f64 {
        100.0
    }
}

/// Retries of a failed request without a body, of an idempotent method, within the
/// destination's retry budget.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Tries after the first (at most 10).
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// Default: connect-failure, refused-stream, unavailable, gateway-error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    /// Base of the exponential back-off (default 25 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    #[serde(rename = "5xx")]
    FiveXx,
    GatewayError,
    Reset,
    ConnectFailure,
    RefusedStream,
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
}

impl RetryOn {
    /// The condition a control plane names (`5xx`, `gateway-error`, …).
    pub fn parse(s: &str) -> Option<RetryOn> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// A path prefix element by element: `/a` matches `/a` and `/a/b`, not `/ab`.
    PathPrefix(String),
    /// Matched against the whole value.
    Regex(String),
    /// Only that the header or parameter is there.
    Present,
    /// That it is not there.
    Absent,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamedMatch {
    pub name: String,
    #[serde(rename = "match")]
    pub value: StringMatch,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NamedMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<NamedMatch>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedCluster {
    pub cluster: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the part of the path a `prefix` path match matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Replaces the whole path (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub percent: f64,
    pub delay_ms: u64,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    pub percent: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
}

/// A header name as the proxy can use it.
fn header_name(field: &str, name: &str) -> Result<(), ConfigError> {
    hyper::header::HeaderName::from_bytes(name.as_bytes()).map(|_| ()).map_err(|_| ConfigError::Invalid {
        field: field.to_string(),
        message: format!("{name:?} is not a valid header name"),
    })
}

fn header_value(field: &str, value: &str) -> Result<(), ConfigError> {
    hyper::header::HeaderValue::from_str(value).map(|_| ()).map_err(|_| ConfigError::Invalid {
        field: field.to_string(),
        message: format!("{value:?} is not a valid header value"),
    })
}

pub use mycel_api::route::compile_regex;

impl StringMatch {
    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if let StringMatch::Regex(re) = self {
            compile_regex(re).map_err(|e| ConfigError::Invalid {
                field: format!("{field}.regex"),
                message: format!("not a valid regular expression: {e}"),
            })?;
        }
        Ok(())
    }
}

impl HttpMatch {
    /// That a proxy can compile it (`mf` names it in the error).
    pub fn validate(&self, mf: &str) -> Result<(), ConfigError> {
        if let Some(p) = &self.path {
            p.validate(&format!("{mf}.path"))?;
        }
        if let Some(method) = &self.method
            && hyper::Method::from_bytes(method.as_bytes()).is_err()
        {
            return Err(ConfigError::Invalid {
                field: format!("{mf}.method"),
                message: format!("{method:?} is not an HTTP method"),
            });
        }
        for (k, h) in self.headers.iter().enumerate() {
            header_name(&format!("{mf}.headers[{k}].name"), &h.name)?;
            h.value.validate(&format!("{mf}.headers[{k}]"))?;
        }
        for (k, q) in self.query_params.iter().enumerate() {
            q.value.validate(&format!("{mf}.queryParams[{k}]"))?;
        }
        Ok(())
    }
}

impl HeaderEdits {
    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        for k in self.set.keys().chain(self.add.keys()).chain(&self.remove) {
            if !mycel_api::route::editable(k) {
                return Err(ConfigError::Invalid {
                    field: field.to_string(),
                    message: format!("{k} may not be edited (framing, connection and mesh headers)"),
                });
            }
        }
        for (k, v) in self.set.iter().chain(&self.add) {
            header_name(&format!("{field}[{k}]"), k)?;
            header_value(&format!("{field}[{k}]"), v)?;
        }
        for (i, k) in self.remove.iter().enumerate() {
            header_name(&format!("{field}.remove[{i}]"), k)?;
        }
        Ok(())
    }
}

/// A rule's weighted backends (`f` is the rule): some weight when `required`, a bounded total,
/// and clusters that exist.
fn validate_backends(
    f: &str,
    backends: &[WeightedCluster],
    required: bool,
    known: &dyn Fn(&str) -> bool,
) -> Result<(), ConfigError> {
    let invalid = |field: String, message: String| Err(ConfigError::Invalid { field, message });
    if required && backends.iter().all(|b| b.weight == 0) {
        return invalid(format!("{f}.backends"), "needs a backend with a weight above 0".into());
    }
    if backends.iter().map(|b| u64::from(b.weight)).sum::<u64>() > 1_000_000 {
        return invalid(format!("{f}.backends"), "weights add up to more than 1000000".into());
    }
    for (j, b) in backends.iter().enumerate() {
        if !known(&b.cluster) {
            return invalid(
                format!("{f}.backends[{j}].cluster"),
                format!("no cluster named {:?}", b.cluster),
            );
        }
    }
    Ok(())
}

impl RouteTable {
    /// Checks what types cannot; `field` is where the table is (`routes[3]`). `known` says
    /// whether a cluster exists (always true for a proxy whose clusters are streamed).
    pub fn validate(&self, field: &str, known: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| Err(ConfigError::Invalid { field, message });
        if self.http.is_empty() && self.tcp.is_empty() {
            return invalid(format!("{field}.http"), "a route table needs at least one rule".into());
        }
        if self.tcp.len() > 1 {
            return invalid(format!("{field}.tcp"), "at most one TCP rule".into());
        }
        for (i, rule) in self.tcp.iter().enumerate() {
            let f = format!("{field}.tcp[{i}]");
            validate_backends(&f, &rule.backends, true, known)?;
            if rule.idle_timeout_ms == Some(0) {
                return invalid(
                    format!("{f}.idleTimeoutMs"),
                    "must be above 0 (leave it out for none)".into(),
                );
            }
        }
        for (i, rule) in self.http.iter().enumerate() {
            let f = format!("{field}.http[{i}]");
            let local = rule.redirect.is_some() as u8 + rule.direct_response.is_some() as u8;
            if local > 1 || (local == 1 && !rule.backends.is_empty()) {
                return invalid(
                    f.clone(),
                    "needs exactly one of backends, redirect or directResponse".into(),
                );
            }
            if let Some(r) = &rule.redirect {
                if ![301, 302, 303, 307, 308].contains(&r.code) {
                    return invalid(format!("{f}.redirect.code"), "must be 301, 302, 303, 307 or 308".into());
                }
                if r.scheme.as_deref().is_some_and(|s| s != "http" && s != "https") {
                    return invalid(format!("{f}.redirect.scheme"), "must be http or https".into());
                }
                if r.host
                    .as_deref()
                    .is_some_and(|h| h.parse::<hyper::http::uri::Authority>().is_err() || h.contains(':'))
                {
                    return invalid(format!("{f}.redirect.host"), "must be a host name".into());
                }
                for (k, p) in [("path", &r.path), ("prefix", &r.prefix)] {
                    if p.as_deref().is_some_and(|p| {
                        !p.starts_with('/')
                            || p.parse::<hyper::http::uri::PathAndQuery>().is_err()
                            || p.contains('?')
                    }) {
                        return invalid(format!("{f}.redirect.{k}"), "must be a path starting with /".into());
                    }
                }
            }
            if let Some(d) = &rule.direct_response {
                if !(200..=599).contains(&d.status) {
                    return invalid(format!("{f}.directResponse.status"), "must be within 200-599".into());
                }
                if d.body.len() > 4096 {
                    return invalid(format!("{f}.directResponse.body"), "at most 4096 bytes".into());
                }
            }
            validate_backends(&f, &rule.backends, local == 0, known)?;
            if let Some(m) = &rule.mirror {
                if !known(&m.cluster) {
                    return invalid(
                        format!("{f}.mirror.cluster"),
                        format!("no cluster named {:?}", m.cluster),
                    );
                }
                if !(0.0..=100.0).contains(&m.percent) {
                    return invalid(format!("{f}.mirror.percent"), "must be within 0-100".into());
                }
            }
            for (j, m) in rule.matches.iter().enumerate() {
                m.validate(&format!("{f}.match[{j}]"))?;
            }
            rule.request_headers.validate(&format!("{f}.requestHeaders"))?;
            rule.response_headers.validate(&format!("{f}.responseHeaders"))?;
            if let Some(r) = &rule.rewrite {
                if let Some(p) = &r.uri_prefix
                    && !p.starts_with('/')
                {
                    return invalid(format!("{f}.rewrite.uriPrefix"), "must start with /".into());
                }
                if let Some(p) = &r.path
                    && (!p.starts_with('/')
                        || p.parse::<hyper::http::uri::PathAndQuery>().is_err()
                        || p.contains('?'))
                {
                    return invalid(
                        format!("{f}.rewrite.path"),
                        "must be a path starting with / (no query)".into(),
                    );
                }
                if r.path.is_some() && r.uri_prefix.is_some() {
                    return invalid(format!("{f}.rewrite"), "path or uriPrefix, not both".into());
                }
                if let Some(a) = &r.authority
                    && a.parse::<hyper::http::uri::Authority>().is_err()
                {
                    return invalid(format!("{f}.rewrite.authority"), format!("{a:?} is not host[:port]"));
                }
            }
            if let Some(r) = &rule.retry {
                if r.attempts > 10 {
                    return invalid(format!("{f}.retry.attempts"), "at most 10".into());
                }
                if r.per_try_timeout_ms == Some(0) || r.backoff_ms == Some(0) {
                    return invalid(
                        format!("{f}.retry"),
                        "perTryTimeoutMs and backoffMs must be above 0".into(),
                    );
                }
            }
            if rule.timeout_ms == Some(0) {
                return invalid(format!("{f}.timeoutMs"), "must be above 0".into());
            }
            if let Some(fault) = &rule.fault {
                let pct = |p: f64| (0.0..=100.0).contains(&p);
                if let Some(d) = &fault.delay
                    && !pct(d.percent)
                {
                    return invalid(format!("{f}.fault.delay.percent"), "must be 0-100".into());
                }
                if let Some(a) = &fault.abort {
                    if !pct(a.percent) {
                        return invalid(format!("{f}.fault.abort.percent"), "must be 0-100".into());
                    }
                    match (a.http_status, a.grpc_status) {
                        (Some(s), None) if (200..=599).contains(&s) => {}
                        (None, Some(s)) if (1..=16).contains(&s) => {}
                        _ => {
                            return invalid(
                                format!("{f}.fault.abort"),
                                "needs exactly one of httpStatus (200-599) or grpcStatus (1-16)".into(),
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
