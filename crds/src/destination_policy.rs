//! `DestinationPolicy`: what happens after routing picked a Service (Istio's DestinationRule):
//! load balancing, connection pools, circuit breaking, subsets, locality failover, TLS.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    common::{Duration, PolicyStatus},
    traffic_route::Host,
};

/// Traffic policy for one destination Service.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mycel.io",
    version = "v1alpha1",
    kind = "DestinationPolicy",
    doc = "Load balancing, connection pools, circuit breaking, subsets and TLS for one destination Service.",
    namespaced,
    status = "PolicyStatus",
    shortname = "dp",
    category = "mycel",
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.host"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.failover) || size(self.failover) == 0 || has(self.outlierDetection)")
    .message("failover needs outlierDetection, which tells the proxy when a locality is unhealthy")
    .field_path(".failover"))]
#[serde(rename_all = "camelCase")]
pub struct DestinationPolicySpec {
    /// The Service this policy is for (`reviews`, `reviews.bookinfo`, or its FQDN).
    pub host: Host,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Circuit breaking: endpoints that keep failing are ejected for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// How the proxy talks to this destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
    /// Named groups of endpoints that TrafficRoute backends may select.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t.name == s.name))")
        .message("subset names must be unique"))]
    pub subsets: Vec<Subset>,
    /// Ordered locality failover: when `from` has no healthy endpoint, use `to`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub failover: Vec<Failover>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "self.algorithm == 'ConsistentHash' ? has(self.consistentHash) : !has(self.consistentHash)"
).message("consistentHash is required when algorithm is ConsistentHash, and allowed only then")
 .field_path(".consistentHash"))]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LbAlgorithm {
    /// Power of two choices on peak-EWMA latency.
    #[default]
    PeakEwma,
    RoundRobin,
    LeastRequest,
    Random,
    ConsistentHash,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.header), has(self.cookie), has(self.sourceIp) && self.sourceIp].filter(x, x).size() == 1"
).message("consistentHash needs exactly one of header, cookie or sourceIp: true"))]
pub struct ConsistentHash {
    /// Hash on this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub header: Option<String>,
    /// Hash on this cookie, set by the proxy if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<HashCookie>,
    /// Hash on the client's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
    #[serde(default)]
    pub table: HashTable,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HashCookie {
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum HashTable {
    #[default]
    Maglev,
    Ring,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpPool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    /// Connections to the whole destination, per proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    /// Requests in flight to the destination, per proxy; more are refused with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<i32>,
    /// Requests waiting for a connection, per proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_pending_requests: Option<i32>,
    /// Requests per connection before it is closed; 0 is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_requests_per_connection: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_retries: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// Carry HTTP/1.1 from this proxy to the destination's proxy as HTTP/2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_to_http2: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint (0 turns this check off).
    #[serde(default, rename = "consecutive5xxErrors", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_5xx_errors: Option<i32>,
    /// Consecutive 502/503/504 and connect failures that eject an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_gateway_errors: Option<i32>,
    /// How often ejections are evaluated (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// First ejection lasts this long, each later one longer (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// At most this share of endpoints is ejected at once (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    pub mode: ClientTlsMode,
    /// SNI to send with `Simple` TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub sni: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ClientTlsMode {
    /// Mutual TLS with mesh identities (the default inside the mesh).
    #[default]
    Mesh,
    /// Plain TLS to a destination outside the mesh.
    Simple,
    /// No TLS from the proxy.
    Disable,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Endpoints whose pods carry all these labels belong to the subset.
    #[x_kube(validation = Rule::new("self.size() > 0").message("a subset needs at least one label"))]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.from != self.to").message("failover from and to must differ"))]
pub struct Failover {
    /// A region (`topology.kubernetes.io/region` of the node).
    #[schemars(length(min = 1, max = 128))]
    pub from: String,
    #[schemars(length(min = 1, max = 128))]
    pub to: String,
}
