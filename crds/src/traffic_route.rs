//! `TrafficRoute`: how requests to a host are matched and sent to backends (Istio's
//! VirtualService, Gateway API's HTTPRoute/TCPRoute). Data only; the control plane translates it.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Duration, NamedMatch, PolicyStatus, StringMatch};

/// Routes traffic addressed to `hosts` by rules: match, split across backends, and apply
/// timeouts, retries, fault injection, header changes and mirroring.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mycel.io",
    version = "v1alpha1",
    kind = "TrafficRoute",
    doc = "Routes requests for a set of hosts to weighted backends, with timeouts, retries and fault injection.",
    namespaced,
    status = "PolicyStatus",
    shortname = "tr",
    category = "mycel",
    printcolumn = r#"{"name":"Hosts","type":"string","jsonPath":".spec.hosts"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new(
    "(has(self.http) && size(self.http) > 0) || (has(self.tcp) && size(self.tcp) > 0)"
).message("a TrafficRoute needs at least one http or tcp rule"))]
#[serde(rename_all = "camelCase")]
pub struct TrafficRouteSpec {
    /// Services the route applies to: `reviews`, `reviews.bookinfo`, or
    /// `reviews.bookinfo.svc.cluster.local`.
    #[schemars(length(min = 1, max = 16))]
    pub hosts: Vec<Host>,
    /// Namespaces whose clients the route applies to: `.` (its own), `*` (every namespace, the
    /// default) or namespace names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub export_to: Vec<ExportTo>,
    /// HTTP, HTTP/2 and gRPC rules, tried in order; the first that matches wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub http: Vec<HttpRoute>,
    /// Rules for opaque TCP traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub tcp: Vec<TcpRoute>,
}

/// `.`, `*`, or a namespace name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(transparent)]
pub struct ExportTo(
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^(\.|\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$"))]
    pub  String,
);

/// A DNS name (a Service's short, namespaced or fully qualified name).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(transparent)]
pub struct Host(
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub String,
);

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.backends) && size(self.backends) > 0, has(self.redirect), has(self.directResponse)].filter(x, x).size() == 1"
).message("a rule needs exactly one of backends, redirect or directResponse"))]
#[x_kube(validation = Rule::new(
    "!(has(self.redirect) || has(self.directResponse)) || !(has(self.timeout) || has(self.retries) || has(self.fault) || has(self.rewrite) || has(self.headers) || has(self.mirror))"
).message("a redirect or directResponse rule answers itself: it takes no timeout, retries, fault, rewrite, headers or mirror"))]
pub struct HttpRoute {
    /// Name shown in metrics and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: Option<String>,
    /// Any one of these matches selects the rule; no match list selects every request.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub matches: Vec<HttpMatch>,
    /// Where matching requests go, split by weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new(
        "self.size() == 1 || self.map(b, has(b.weight) ? b.weight : 0).sum() == 100"
    ).message("backend weights must add up to 100 when a rule has more than one backend"))]
    pub backends: Vec<Backend>,
    /// Deadline of the whole request including retries (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultInjection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<HeaderOperations>,
    /// Copy a share of requests to another backend; its responses are discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Answer with a redirect instead of sending the request anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// Answer with this status and body instead of sending the request anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
}

/// A redirect: the request's URL with the parts given replaced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.path) && has(self.prefix))")
    .message("redirect takes path or prefix, not both"))]
pub struct Redirect {
    /// `http` or `https` (default: the request's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?$"))]
    pub scheme: Option<String>,
    /// The host (default: the request's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub host: Option<String>,
    /// The port (default: the request's, unless the scheme changes; a scheme's default port is
    /// left out of the URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Replaces the whole path (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*$"))]
    pub path: Option<String>,
    /// Replaces the matched path prefix (requires a `prefix` path match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*$"))]
    pub prefix: Option<String>,
    /// 301 (the default), 302, 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in [301, 302, 303, 307, 308]")
        .message("code must be 301, 302, 303, 307 or 308"))]
    pub code: Option<i32>,
}

/// A response the proxy makes itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    #[schemars(range(min = 200, max = 599))]
    pub status: i32,
    /// Sent as `text/plain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub body: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// The request path (without query string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
    /// All of these headers must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<NamedMatch>,
    /// All of these query parameters must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub query_params: Vec<NamedMatch>,
    /// The destination port, when a Service exposes several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// Service name, in this namespace unless qualified (`name.namespace`).
    pub service: Host,
    /// Service port; required when the Service has more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// A subset defined by the DestinationPolicy of that Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub subset: Option<String>,
    /// Share of traffic, 0–100; the weights of a rule's backends add up to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try (0 turns retries off).
    #[schemars(range(min = 0, max = 10))]
    pub attempts: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Which failures are retried (default: `connect-failure`, `refused-stream`, `unavailable`,
    /// `gateway-error`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub retry_on: Vec<RetryOn>,
    /// Base delay of the exponential back-off between tries (default 25ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
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

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.delay) || has(self.abort)")
    .message("fault needs a delay, an abort, or both"))]
pub struct FaultInjection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Share of requests delayed, 0–100.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    pub fixed_delay: Duration,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.httpStatus) != has(self.grpcStatus)")
    .message("abort needs exactly one of httpStatus or grpcStatus"))]
pub struct FaultAbort {
    /// Share of requests aborted, 0–100.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<i32>,
    /// gRPC status code (1–16) returned in trailers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub grpc_status: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.uriPrefix) || has(self.authority) || has(self.path)")
    .message("rewrite needs uriPrefix or path, authority, or both"))]
#[x_kube(validation = Rule::new("!(has(self.uriPrefix) && has(self.path))")
    .message("rewrite takes uriPrefix or path, not both"))]
pub struct Rewrite {
    /// Replaces the matched path prefix (requires a `prefix` path match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub uri_prefix: Option<String>,
    /// Replaces the whole path; the query is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*$"))]
    pub path: Option<String>,
    /// Replaces the Host/:authority header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub authority: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderEdits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderEdits>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderEdits {
    /// Headers to set, replacing any present.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub set: std::collections::BTreeMap<String, String>,
    /// Headers to append.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub add: std::collections::BTreeMap<String, String>,
    /// Header names to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub remove: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    pub service: Host,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Share of requests mirrored, 0–100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    /// Only connections to this Service port; all ports if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new(
        "self.size() == 1 || self.map(b, has(b.weight) ? b.weight : 0).sum() == 100"
    ).message("backend weights must add up to 100 when a rule has more than one backend"))]
    pub backends: Vec<Backend>,
    /// Close idle connections after this long (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}
