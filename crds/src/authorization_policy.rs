//! `AuthorizationPolicy`: who may call the selected workloads, and how — by peer identity,
//! namespace, IP, and request properties. Evaluation order: CUSTOM, DENY, ALLOW (as in Istio).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{PolicyStatus, WorkloadSelector};

/// Allows, denies or audits requests to the selected workloads.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mycel.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    doc = "Allows, denies or audits requests to the selected workloads by peer identity and request properties.",
    namespaced,
    status = "PolicyStatus",
    shortname = "authz",
    category = "mycel",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.action) && self.action == 'CUSTOM') == has(self.provider)")
    .message("provider names the external authorizer of action CUSTOM: set both, or neither"))]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `ALLOW` (default): only requests matching a rule pass, once any ALLOW policy applies.
    /// `DENY`: requests matching a rule are refused. `AUDIT`: matches are logged only.
    /// `CUSTOM`: requests matching a rule are decided by the external authorizer `provider`
    /// names, before any DENY or ALLOW policy.
    #[serde(default)]
    pub action: AuthorizationAction,
    /// The external authorizer of a `CUSTOM` policy: one of the installation's
    /// `extensionProviders`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderRef>,
    /// A request matches the policy when it matches any rule. An ALLOW policy with no rules
    /// allows nothing; a rule with no fields matches everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

/// An extension provider of the installation, by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderRef {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// All present parts must match: any `from`, any `to`, and every `when`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to: Vec<RuleTo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub when: Vec<RuleCondition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    pub operation: Operation,
}

/// Who is calling. Lists within a field are ORed; fields are ANDed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.principals) || has(self.notPrincipals) || has(self.requestPrincipals) || has(self.notRequestPrincipals) || has(self.namespaces) || has(self.notNamespaces) || has(self.ipBlocks) || has(self.notIpBlocks) || has(self.remoteIpBlocks) || has(self.notRemoteIpBlocks)"
).message("source needs at least one of principals, requestPrincipals, namespaces, ipBlocks, remoteIpBlocks or their not* forms"))]
pub struct Source {
    /// Peer identities as `<trust-domain>/ns/<ns>/sa/<sa>`, with `*` as prefix or suffix wildcard.
    /// Requires mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub principals: Option<Vec<Principal>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub not_principals: Option<Vec<Principal>>,
    /// Token identities as `<iss>/<sub>` of a token a RequestAuthentication verified, with `*`
    /// as prefix or suffix wildcard (`*` alone: any verified token). HTTP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub request_principals: Option<Vec<RequestPrincipal>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub not_request_principals: Option<Vec<RequestPrincipal>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub namespaces: Option<Vec<NamespaceName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub not_namespaces: Option<Vec<NamespaceName>>,
    /// Client IPs or CIDRs, e.g. `10.1.0.0/16` or `fd00::1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub ip_blocks: Option<Vec<IpBlock>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub not_ip_blocks: Option<Vec<IpBlock>>,
    /// The original client's IPs or CIDRs. A sidecar trusts no forwarding hop, so there it is
    /// the peer's address (as `ipBlocks`); `X-Forwarded-For` is not believed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub remote_ip_blocks: Option<Vec<IpBlock>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub not_remote_ip_blocks: Option<Vec<IpBlock>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Principal(
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^(\*|\*?[A-Za-z0-9._~/:%-]+\*?)$"))] pub String,
);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct RequestPrincipal(#[schemars(length(min = 1, max = 1024), regex(pattern = r"^\S+$"))] pub String);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct NamespaceName(
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$"))]
    pub  String,
);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "isIP(self) || isCIDR(self)",
    "message": "must be an IP address or a CIDR such as 10.0.0.0/8"
}]))]
pub struct IpBlock(#[schemars(length(min = 1, max = 64))] pub String);

/// What is being called. Lists within a field are ORed; fields are ANDed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.hosts) || has(self.notHosts) || has(self.ports) || has(self.notPorts) || has(self.methods) || has(self.notMethods) || has(self.paths) || has(self.notPaths)"
).message("operation needs at least one of hosts, ports, methods, paths or their not* forms"))]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub not_hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub ports: Option<Vec<Port>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub not_ports: Option<Vec<Port>>,
    /// HTTP methods (gRPC calls are `POST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub not_methods: Option<Vec<String>>,
    /// Paths, exact or with `*` as prefix or suffix wildcard (`/api/*`, `*.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub paths: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub not_paths: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Port(#[schemars(range(min = 1, max = 65535))] pub i32);

/// An extra condition on a request attribute.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.values) || has(self.notValues)")
    .message("a when condition needs values or notValues"))]
pub struct RuleCondition {
    /// `source.ip`, `remote.ip`, `source.namespace`, `source.principal`, `destination.port`,
    /// `request.method`, `request.path`, `request.headers[<name>]`, or of the request's verified
    /// token: `request.auth.principal`, `request.auth.audiences`, `request.auth.presenter`,
    /// `request.auth.claims[<name>]` (nested: `request.auth.claims[<a>][<b>]`).
    #[schemars(
        length(min = 1, max = 256),
        regex(
            pattern = r"^(source\.ip|remote\.ip|source\.namespace|source\.principal|destination\.port|request\.method|request\.path|request\.headers\[[A-Za-z0-9-]+\]|request\.auth\.(principal|audiences|presenter|claims(\[[^\[\]]+\]){1,8}))$"
        )
    )]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub values: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub not_values: Option<Vec<String>>,
}
