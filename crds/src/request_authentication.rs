//! `RequestAuthentication`: which JSON Web Tokens the selected workloads accept — per issuer,
//! its keys (inline, or fetched by the control plane from `jwksUri`), audiences and where the
//! token travels. As in Istio, a request without a token passes without a request principal; an
//! AuthorizationPolicy decides whether that is enough.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Duration, PolicyStatus, WorkloadSelector};

/// JSON Web Token verification for the selected workloads' inbound requests.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mycel.io",
    version = "v1alpha1",
    kind = "RequestAuthentication",
    doc = "Which JSON Web Tokens the selected workloads accept: per issuer, its keys, audiences and token locations.",
    namespaced,
    status = "PolicyStatus",
    shortname = "ra",
    category = "mycel",
    printcolumn = r#"{"name":"Issuers","type":"string","jsonPath":".spec.jwtRules[*].issuer"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Workloads in this namespace it applies to; all of them when unset (and all of the mesh
    /// when the policy lives in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// One rule per issuer. A token is verified by the rule of the issuer it names; a token of
    /// an issuer no rule names is refused (401).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(q, q.issuer == r.issuer))")
        .message("each issuer may have one rule only"))]
    pub jwt_rules: Vec<JwtRule>,
}

/// How tokens of one issuer are verified.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.jwks) != has(self.jwksUri)")
    .message("set exactly one of jwks (the key set inline) or jwksUri (where the control plane fetches it)"))]
pub struct JwtRule {
    /// The token's `iss` claim, e.g. `https://accounts.example.com`.
    #[schemars(length(min = 1, max = 512))]
    pub issuer: String,
    /// Accepted `aud` values; when set, a token must name one of them. Any audience when unset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub audiences: Vec<Bounded256>,
    /// A JSON Web Key Set (`{"keys": [...]}`) inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub jwks: Option<String>,
    /// Where the control plane fetches the key set (`https://`, or `http://` inside the
    /// cluster). Proxies never fetch keys: they receive them with their configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s/?#]+([/?#]\S*)?$"))]
    pub jwks_uri: Option<String>,
    /// How long one fetch of `jwksUri` may take (default 5s, at most 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) <= duration('30s')").message("timeout may be at most 30s"))]
    pub timeout: Option<Duration>,
    /// Headers the token may be in, e.g. `{name: x-jwt}` or `{name: Authorization, prefix: "Bearer "}`.
    /// With no location set, the token is read from `Authorization: Bearer` and the
    /// `access_token` query parameter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token may be in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub from_params: Vec<ParamName>,
    /// Cookies the token may be in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub from_cookies: Vec<ParamName>,
    /// Pass the token on to the app (it is removed by default).
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims copied into request headers for the app, e.g. `{header: x-user, claim: sub}`. A
    /// header of that name from the client is always removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// How far `exp` and `nbf` may be off the proxy's clock (default 60s, at most 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) <= duration('10m')").message("clockSkew may be at most 10m"))]
    pub clock_skew: Option<Duration>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Bounded256(#[schemars(length(min = 1, max = 256))] pub String);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct ParamName(
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._~!$&'()*+,;:@%-]+$"))] pub String,
);

/// A header a token may be in.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,
    /// What precedes the token in the header's value (`Bearer `); removed before verifying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub prefix: Option<String>,
}

/// A claim copied into a request header.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// The header the app receives.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    #[x_kube(validation = Rule::new("!(self.lowerAscii() in ['host', 'x-forwarded-client-cert', 'x-mycel-error', 'content-length', 'transfer-encoding', 'connection', 'te', 'upgrade', 'keep-alive', 'proxy-connection'])")
        .message("host, x-forwarded-client-cert, x-mycel-error and the connection's own headers (content-length, transfer-encoding, connection, te, upgrade, keep-alive, proxy-connection) are set by the mesh, not by a claim"))]
    pub header: String,
    /// The claim: a top-level name, or a path through nested objects as `a.b`.
    #[schemars(length(min = 1, max = 256))]
    pub claim: String,
}
