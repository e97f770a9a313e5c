//! `RateLimitPolicy`: request-rate limits on the selected workloads' inbound traffic, counted
//! in each of their sidecars by token bucket, per a key (one bucket, client IP, principal, a
//! header value, the path or a JWT claim).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    common::{PolicyStatus, WorkloadSelector},
    traffic_route::HttpMatch,
};

/// Limits how many requests the selected workloads accept.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mycel.io",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    doc = "Request-rate limits and quotas on the selected workloads' inbound traffic.",
    namespaced,
    status = "PolicyStatus",
    shortname = "rlp",
    category = "mycel",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.direction) && self.direction == 'Outbound') || self.limits.all(l, !has(l.hosts))")
    .message("hosts applies to direction Outbound (an inbound limit counts the requests this workload receives)")
    .field_path(".limits"))]
#[x_kube(validation = Rule::new("!has(self.direction) || self.direction == 'Inbound' || self.limits.all(l, !has(l.key) || l.key.type in ['Global', 'Header', 'Path'])")
    .message("an Outbound limit is keyed by nothing (Global), a Header or the Path: its sender is the selected workload itself")
    .field_path(".limits"))]
pub struct RateLimitPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `Inbound` (default): the requests the selected workloads receive, counted in their
    /// sidecars' inbound side. `Outbound`: the requests they send (to any destination, or to
    /// the limits' `hosts`), counted and refused by their own sidecars before they leave — to
    /// protect a dependency from a whole client workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// Every limit whose match applies is checked; the request is refused if any is exhausted.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.all(l, self.exists_one(m, m.name == l.name))")
        .message("limit names must be unique"))]
    pub limits: Vec<RateLimit>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.burst) || self.burst >= self.requests")
    .message("burst must be at least requests").field_path(".burst"))]
#[x_kube(validation = Rule::new("!has(self.overrides) || (has(self.key) && self.key.type != 'Global')")
    .message("overrides need a key other than Global (they name values of the key)")
    .field_path(".overrides"))]
#[x_kube(validation = Rule::new("!has(self.window) || self.window != 'Calendar' || (has(self.scope) && self.scope == 'Global')")
    .message("a Calendar window is a quota counted by the rate-limit service: set scope: Global")
    .field_path(".window"))]
#[x_kube(validation = Rule::new("!has(self.window) || self.window != 'Calendar' || self.unit in ['hour', 'day', 'month']")
    .message("a Calendar window is an hour, a day or a month: set unit to one of them")
    .field_path(".unit"))]
#[x_kube(validation = Rule::new("self.unit != 'month' || (has(self.window) && self.window == 'Calendar')")
    .message("unit month is a calendar quota only: set window: Calendar and scope: Global")
    .field_path(".unit"))]
#[x_kube(validation = Rule::new("!has(self.timeZone) || (has(self.window) && self.window == 'Calendar')")
    .message("timeZone applies to a Calendar window only").field_path(".timeZone"))]
#[x_kube(validation = Rule::new("!has(self.failureMode) || (has(self.scope) && self.scope == 'Global')")
    .message("failureMode applies to scope Global only (a local limit needs no service)")
    .field_path(".failureMode"))]
#[x_kube(validation = Rule::new("!has(self.window) || self.window != 'Calendar' || (!has(self.burst) && (!has(self.overrides) || self.overrides.all(o, !has(o.burst))))")
    .message("a Calendar quota has no burst: it admits requests per window, however they come")
    .field_path(".burst"))]
#[x_kube(validation = Rule::new("!has(self.scope) || self.scope != 'Global' || (has(self.window) && self.window == 'Calendar') || !has(self.burst) || self.burst * (self.unit == 'second' ? 1 : self.unit == 'minute' ? 60 : self.unit == 'hour' ? 3600 : 86400) <= 2678400 * self.requests")
    .message("a global rate remembers at most 31 days: burst × unit / requests must be at most that (lower the burst, or count a quota with window: Calendar)")
    .field_path(".burst"))]
#[x_kube(validation = Rule::new("!has(self.scope) || self.scope != 'Global' || (has(self.window) && self.window == 'Calendar') || !has(self.overrides) || self.overrides.all(o, !has(o.burst) || o.burst * (self.unit == 'second' ? 1 : self.unit == 'minute' ? 60 : self.unit == 'hour' ? 3600 : 86400) <= 2678400 * o.requests)")
    .message("a global rate remembers at most 31 days: an override's burst × unit / requests must be at most that")
    .field_path(".overrides"))]
pub struct RateLimit {
    /// Shown in metrics and in the `x-mycel-ratelimit` response header.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Requests allowed per `unit`: refilled continuously (10 per second: one every 100 ms), or
    /// per calendar window (`window: Calendar`).
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub requests: i64,
    pub unit: RateUnit,
    /// Bucket size: requests allowed in a burst (default: `requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub burst: Option<i64>,
    /// What is counted separately; one shared bucket if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<LimitKey>,
    /// Only requests matching this are counted; all if unset.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<HttpMatch>,
    /// HTTP status of refused requests (default 429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 400, max = 599))]
    pub status: Option<i32>,
    /// Count and report the requests it would refuse, and refuse none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
    /// Other limits for named values of the key (a bigger one for one client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(o, self.exists_one(p, p.value == o.value))")
        .message("override values must be unique"))]
    pub overrides: Option<Vec<LimitOverride>>,
    /// Where it is counted: `Local` (default), by each selected sidecar on its own, so every
    /// replica admits `requests` per `unit`; `Global`, once for all of them, by the mesh's
    /// rate-limit service in Redis (the MeshInstallation's `spec.rateLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<LimitScope>,
    /// `Rolling` (default): `requests` per `unit`, refilled continuously. `Calendar` (Global
    /// only): a quota of `requests` per calendar hour, day or month in `timeZone`, starting
    /// anew at each boundary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<LimitWindow>,
    /// The IANA time zone of a Calendar window's boundaries (default UTC), e.g. `Europe/Berlin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$"))]
    pub time_zone: Option<String>,
    /// While the rate-limit service cannot decide (unreachable, or Redis is): `Open` (default)
    /// admits, `Closed` refuses with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
    /// Direction Outbound only: the destination hosts whose requests it counts (the request's
    /// authority without port: `api.example.com`, or `*.example.com` for its subdomains); any
    /// host when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub hosts: Option<Vec<LimitHost>>,
}

/// A host name, or `*.` and a suffix; lowercase, without a port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct LimitHost(
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub String,
);

/// Which requests of the selected workloads a policy limits.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Direction {
    #[default]
    Inbound,
    Outbound,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LimitScope {
    #[default]
    Local,
    Global,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LimitWindow {
    #[default]
    Rolling,
    Calendar,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailureMode {
    #[default]
    Open,
    Closed,
}

/// The limit of one value of the key.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.burst) || self.burst >= self.requests")
    .message("burst must be at least requests").field_path(".burst"))]
pub struct LimitOverride {
    /// The key's value: a principal (`cluster.local/ns/shop/sa/batch`), an address, a header
    /// value, a path or a claim's value.
    #[schemars(length(min = 1, max = 256))]
    pub value: String,
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub requests: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub burst: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateUnit {
    #[default]
    Second,
    Minute,
    Hour,
    Day,
    /// A calendar month (Calendar windows only).
    Month,
}

impl RateUnit {
    /// Its length in seconds; a month counts as the longest, 31 days (the unit a quota's
    /// `RateLimit-Policy` header names).
    pub fn seconds(self) -> u64 {
        match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3600,
            RateUnit::Day => 86_400,
            RateUnit::Month => 31 * 86_400,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'Header' ? has(self.header) : !has(self.header)")
    .message("header is required when type is Header, and allowed only then")
    .field_path(".header"))]
#[x_kube(validation = Rule::new("self.type == 'Claim' ? has(self.claim) : !has(self.claim)")
    .message("claim is required when type is Claim, and allowed only then")
    .field_path(".claim"))]
pub struct LimitKey {
    #[serde(rename = "type")]
    pub kind: LimitKeyType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub header: Option<String>,
    /// A claim of the request's verified JSON Web Token (RequestAuthentication), `a.b` for a
    /// nested one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub claim: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LimitKeyType {
    /// One bucket for all clients.
    #[default]
    Global,
    /// One bucket per client IP.
    SourceIP,
    /// One bucket per peer identity (mTLS).
    SourcePrincipal,
    /// One bucket per value of a request header.
    Header,
    /// One bucket per request path (normalised, without the query).
    Path,
    /// One bucket per value of a claim of the request's verified JSON Web Token.
    Claim,
}

impl LimitKeyType {
    /// A value of this key as sidecars count it: a principal in Istio's form (without
    /// `spiffe://`), an address in its canonical form; others as written.
    pub fn canonical(self, v: &str) -> String {
        match self {
            LimitKeyType::SourcePrincipal => v.strip_prefix("spiffe://").unwrap_or(v).to_string(),
            LimitKeyType::SourceIP => {
                v.parse::<std::net::IpAddr>().map_or_else(|_| v.to_string(), |ip| ip.to_string())
            }
            _ => v.to_string(),
        }
    }
}
