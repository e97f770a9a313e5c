//! `PeerAuthentication`: which connections a workload accepts — mutual TLS only, plaintext too,
//! or plaintext only — mesh-wide, per namespace, per workload and per port.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{PolicyStatus, WorkloadSelector};

/// Mutual-TLS requirements of the selected workloads' inbound traffic.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mycel.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    doc = "Whether the selected workloads accept mutual TLS only, plaintext too, or plaintext only.",
    namespaced,
    status = "PolicyStatus",
    shortname = "pa",
    category = "mycel",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.portLevelMtls) || size(self.portLevelMtls) == 0 || has(self.selector)")
    .message("portLevelMtls needs a selector: ports belong to specific workloads")
    .field_path(".portLevelMtls"))]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads in this namespace it applies to; all of them when unset (and all of the mesh
    /// when the policy lives in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
    /// Per-port exceptions to `mtls`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.port == p.port))")
        .message("each port may appear once in portLevelMtls"))]
    pub port_level_mtls: Vec<PortMtls>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerMtls {
    #[serde(default)]
    pub mode: PeerMtlsMode,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortMtls {
    /// The workload's (container) port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    pub mode: PeerMtlsMode,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerMtlsMode {
    /// Inherit from the less specific policy.
    #[default]
    Unset,
    Strict,
    Permissive,
    Disable,
}
