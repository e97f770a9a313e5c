//! `MeshInstallation`: one control-plane revision of the mesh, and the mesh-wide defaults that
//! its proxies start from. The operator reconciles it; this module only describes it.

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Duration, LogLevel};

/// The revision that namespaces labelled `mycel.io/inject=enabled` use.
pub const DEFAULT_REVISION: &str = "default";
/// The SPIFFE trust domain when the installation names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Installs one revision of the Mycel control plane into this namespace (the mesh's root
/// namespace) and sets the defaults every proxy of that revision starts from.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mycel.io",
    version = "v1alpha1",
    kind = "MeshInstallation",
    doc = "One revision of the Mycel control plane and the mesh-wide defaults of its proxies.",
    namespaced,
    status = "MeshInstallationStatus",
    shortname = "mi",
    category = "mycel",
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".spec.revision"}"#,
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profile"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.version"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshInstallationSpec {
    /// Starting point for every default below: `minimal` (control plane only), `default`
    /// (control plane, metrics), `demo` (everything on, ingress gateway, 100 % tracing).
    #[serde(default)]
    pub profile: Profile,
    /// Name of this control-plane revision. Namespaces choose it with `mycel.io/rev=<revision>`;
    /// the revision `default` also serves `mycel.io/inject=enabled`. Immutable.
    #[serde(default = "default_revision")]
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "revision is immutable: create a second MeshInstallation with the new revision and move namespaces to it"
    ))]
    pub revision: String,
    /// Version (image tag) of the control plane and proxies; the operator's own version if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"))]
    pub version: Option<String>,
    /// Image overrides, e.g. for a private registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<Images>,
    /// The control-plane Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneSpec>,
    /// Defaults for every injected proxy; pods may override some with annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyDefaults>,
    /// Mesh-wide mutual TLS default; `PeerAuthentication` resources refine it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,
    /// SPIFFE trust domain of workload identities (`spiffe://<trustDomain>/ns/<ns>/sa/<sa>`).
    #[serde(default = "default_trust_domain")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub trust_domain: String,
    /// The mesh certificate authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaSpec>,
    /// Metrics, traces and access logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetrySpec>,
    /// The ingress gateway of this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_gateway: Option<IngressGatewaySpec>,
    /// The sidecar-injection and validation webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    /// The rate-limit service (`mycel-ratelimit-<revision>`), which counts RateLimitPolicy
    /// limits of `scope: Global` in Redis; deployed when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// External authorizers that AuthorizationPolicies of action `CUSTOM` name
    /// (`provider.name`), as Istio's `meshConfig.extensionProviders`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub extension_providers: Vec<ExtensionProvider>,
}

/// An external authorizer, named for the policies that use it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    /// The name `provider.name` of an AuthorizationPolicy refers to.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// An authorizer speaking Envoy's external authorization gRPC API
    /// (`envoy.service.auth.v3.Authorization/Check`), such as OPA's Envoy plugin.
    pub envoy_ext_authz_grpc: ExtAuthzGrpc,
}

/// Where a sidecar asks, and what it does when no answer comes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.timeout) || duration(self.timeout) <= duration('30s')")
    .message("timeout must be at most 30s").field_path(".timeout"))]
pub struct ExtAuthzGrpc {
    /// The authorizer's host: a Service's DNS name (`opa.authz.svc.cluster.local`), or
    /// `127.0.0.1` for a container in each workload's pod. Reached in plaintext gRPC.
    #[schemars(
        length(min = 1, max = 253),
        regex(
            pattern = r"^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?\.)*[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?$|^[0-9a-fA-F:]+$"
        )
    )]
    pub service: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// How long a sidecar waits for a decision (default 1s, at most 30s); then `failOpen`
    /// decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// When the authorizer cannot be asked or does not answer in time: `true` lets the request
    /// go on (to the DENY and ALLOW policies), `false` (default) refuses it with
    /// `statusOnError`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_open: Option<bool>,
    /// The status of a request refused because the authorizer could not decide (default 403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub status_on_error: Option<i32>,
}

fn default_revision() -> String {
    DEFAULT_REVISION.to_string()
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

/// A named set of defaults.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Minimal,
    #[default]
    Default,
    Demo,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Images {
    /// Registry and path prefix, e.g. `registry.example.com/mycel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub registry: Option<String>,
    /// Full image reference of the control plane; overrides `registry` and `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub control_plane: Option<String>,
    /// Full image reference of the proxy; overrides `registry` and `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub proxy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneSpec {
    /// Replicas of the control-plane Deployment (profile default: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyDefaults {
    /// Requests and limits of the sidecar container (pods may override with
    /// `mycel.io/proxy-cpu`, `mycel.io/proxy-memory`, … annotations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// Worker threads of each proxy; 0 means one per CPU of the container's limit (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub concurrency: Option<i32>,
    /// How long a terminating proxy keeps finishing requests in flight (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_duration: Option<Duration>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MtlsSpec {
    /// Mesh-wide default; `PERMISSIVE` unless set.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Whether a workload accepts plaintext, mutual TLS, or both.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mutual TLS is accepted.
    Strict,
    /// Mutual TLS and plaintext are both accepted on the same port.
    #[default]
    Permissive,
    /// Only plaintext; the proxy does not terminate TLS.
    Disable,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaSpec {
    /// A Secret in this namespace holding `tls.crt`, `tls.key` (and optionally `ca.crt`) of a CA
    /// or intermediate CA to sign workload certificates with, e.g. one issued by cert-manager.
    /// When unset the operator generates a self-signed root once and never overwrites it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub secret_name: Option<String>,
    /// Lifetime of workload certificates (default 24h); proxies rotate them at half-life.
    #[serde(default, rename = "workloadCertTTL", skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(
        "duration(self) >= duration('10m') && duration(self) <= duration('2160h')"
    ).message("workloadCertTTL must be between 10m and 2160h (90 days)"))]
    pub workload_cert_ttl: Option<Duration>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Prometheus metrics on every proxy's admin port 15020 (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.samplingPercent) || self.samplingPercent == 0.0 || has(self.otlpEndpoint)"
).message("otlpEndpoint is required when samplingPercent is above 0").field_path(".otlpEndpoint"))]
pub struct TracingSpec {
    /// Percentage of requests that start a trace, 0 to 100 (e.g. 1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub sampling_percent: Option<f64>,
    /// OTLP/gRPC collector, e.g. `http://otel-collector.observability:4317`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')")
        .message("otlpEndpoint must be an http:// or https:// URL"))]
    pub otlp_endpoint: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogSpec {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub format: AccessLogFormat,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressGatewaySpec {
    /// Deploy an ingress gateway for this revision (profile `demo` turns it on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 20))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<ServiceType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.timeout) || duration(self.timeout) <= duration('10s')")
    .message("timeout must be at most 10s").field_path(".timeout"))]
pub struct RateLimitSpec {
    /// Replicas of the service (default 2); each proxy keeps one connection to one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 20))]
    pub replicas: Option<i32>,
    pub redis: RedisSpec,
    /// How long a proxy waits for a decision before the limit's `failureMode` applies
    /// (default 200ms, at most 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Where the counters are kept.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.cluster) && self.cluster) || size(self.addresses) == 1")
    .message("a standalone Redis has one address: set cluster: true to name seed nodes of a Redis Cluster")
    .field_path(".addresses"))]
pub struct RedisSpec {
    /// `host:port` of a standalone Redis, or with `cluster: true` seed nodes of a Redis Cluster.
    #[schemars(length(min = 1, max = 16))]
    pub addresses: Vec<RedisAddress>,
    /// A Redis Cluster: keys are spread over its masters, and moves of slots followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<bool>,
    /// The Redis password: a key of a Secret in the installation's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeySelector>,
    /// TLS to Redis (`rediss`), its certificate verified against a CA; plaintext when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RedisTls>,
}

/// How the rate-limit service verifies Redis's certificate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisTls {
    /// The CA certificates (PEM) Redis's certificate must chain to: a key of a Secret in the
    /// installation's namespace (`ca.crt` of the Secret cert-manager writes, for one). The
    /// address's host must be a name (or address) the certificate carries.
    pub ca_secret: SecretKeySelector,
}

/// `host:port`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct RedisAddress(
    #[schemars(
        length(min = 3, max = 260),
        regex(
            pattern = r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
        )
    )]
    pub String,
);

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// What the API server does when the injection webhook cannot be reached: `Fail` (pods are
    /// not created without a sidecar; the default) or `Ignore` (pods start without one).
    #[serde(default)]
    pub failure_policy: FailurePolicy,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailurePolicy {
    #[default]
    Fail,
    Ignore,
}

/// What the operator observed of this installation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshInstallationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, as kstatus and Argo CD read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Version of the running control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Revision the installed objects carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Readiness of each part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<ComponentsStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentsStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ComponentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<ComponentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<ComponentStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    pub ready: bool,
    /// What is missing when not ready, e.g. `1 of 2 replicas available`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
