//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`), as the control plane reads it. The
//! CustomResourceDefinition is not generated from here: `config/gateway-api/` bundles the
//! standard-channel CRDs of one pinned release ([`GATEWAY_API_VERSION`]), copied from it, and
//! a test checks them against that release (`crds/tests/gateway_api.rs`). These types name only
//! the fields Mycel reads; the API server validates the rest against the bundled schema.

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// The Gateway API release whose standard channel `config/gateway-api/` bundles.
pub const GATEWAY_API_VERSION: &str = "v1.5.1";
/// Its API group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// Routes HTTP requests; attached to a Service (`parentRefs` of kind `Service`) it is a mesh
/// route (GAMMA), applied by the sidecars of the Service's clients.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    namespaced,
    status = "RouteStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HTTPRouteRule>,
}

/// A route's status, as far as Mycel reads it: which controllers have an entry in `parents`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RouteStatus {
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    #[serde(default)]
    pub controller_name: String,
}

/// What a route attaches to: a Gateway (the default kind) or, for the mesh, a Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

impl ParentRef {
    /// Whether it names a Service (group `""` or `core`, kind `Service`). The API server defaults
    /// a missing group to the Gateway API's, so a mesh route must say `group: ""`.
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service")
            && matches!(self.group.as_deref(), None | Some("") | Some("core"))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HTTPRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HTTPRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HTTPBackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HTTPRouteTimeouts>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HTTPPathMatch>,
    #[serde(default)]
    pub headers: Vec<HTTPNamedMatch>,
    #[serde(default)]
    pub query_params: Vec<HTTPNamedMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// `type`: `Exact`, `PathPrefix` (the default) or `RegularExpression`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPPathMatch {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A header or query parameter match; `type`: `Exact` (the default) or `RegularExpression`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPNamedMatch {
    pub name: String,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteFilter {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// `type`: `ReplaceFullPath` or `ReplacePrefixMatch`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Fraction {
    pub numerator: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denominator: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

impl BackendRef {
    /// Whether it names a Service (the default kind).
    pub fn is_service(&self) -> bool {
        matches!(self.kind.as_deref(), None | Some("Service"))
            && matches!(self.group.as_deref(), None | Some("") | Some("core"))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPBackendRef {
    #[serde(flatten)]
    pub backend: BackendRef,
    /// Share relative to the rule's other backends (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    #[serde(default)]
    pub filters: Vec<HTTPRouteFilter>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteTimeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

/// Routes gRPC calls; attached to a Service it is a mesh route, as an HTTPRoute is.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GRPCRoute",
    plural = "grpcroutes",
    namespaced,
    status = "RouteStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GRPCRouteRule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GRPCRouteMatch>,
    /// The same filter types as an HTTPRoute's (`RequestHeaderModifier`,
    /// `ResponseHeaderModifier`, `RequestMirror`, `ExtensionRef`).
    #[serde(default)]
    pub filters: Vec<HTTPRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HTTPBackendRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GRPCMethodMatch>,
    #[serde(default)]
    pub headers: Vec<HTTPNamedMatch>,
}

/// `type`: `Exact` (the default) or `RegularExpression`; `service`, `method` or both.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GRPCMethodMatch {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// What a mesh HTTPRoute (one with a Service parent) may set that Mycel does not do yet: the
/// field as a message names it, and a CEL expression that holds when the route does not set it.
/// (`namespace` is a CEL reserved word: on these unstructured objects it is read as a map key.)
pub const MESH_NOT_YET: &[(&str, &str)] = &[
    (
        "spec.rules[].filters[].cors",
        "!has(object.spec.rules) || object.spec.rules.all(r, !has(r.filters) || r.filters.all(f, f.type != 'CORS'))",
    ),
    (
        "spec.rules[].filters[].extensionRef",
        "!has(object.spec.rules) || object.spec.rules.all(r, !has(r.filters) || r.filters.all(f, f.type != 'ExtensionRef'))",
    ),
    (
        "spec.rules[].filters[].requestMirror (a second mirror of one rule)",
        "!has(object.spec.rules) || object.spec.rules.all(r, !has(r.filters) || r.filters.filter(f, f.type == 'RequestMirror').size() <= 1)",
    ),
    (
        "spec.rules[].backendRefs[].filters",
        "!has(object.spec.rules) || object.spec.rules.all(r, !has(r.backendRefs) || r.backendRefs.all(b, !has(b.filters) || size(b.filters) == 0))",
    ),
    (
        "spec.rules[].backendRefs[].namespace (ReferenceGrant)",
        "!has(object.spec.rules) || object.spec.rules.all(r, !has(r.backendRefs) || r.backendRefs.all(b, !('namespace' in b) || b['namespace'] == request.namespace))",
    ),
    (
        "spec.rules[].filters[].requestMirror.backendRef (another kind or namespace)",
        "!has(object.spec.rules) || object.spec.rules.all(r, !has(r.filters) || r.filters.all(f, f.type != 'RequestMirror' || !has(f.requestMirror) || ((!has(f.requestMirror.backendRef.kind) || f.requestMirror.backendRef.kind == 'Service') && (!('namespace' in f.requestMirror.backendRef) || f.requestMirror.backendRef['namespace'] == request.namespace))))",
    ),
    (
        "spec.rules[].timeouts.backendRequest",
        "!has(object.spec.rules) || object.spec.rules.all(r, !has(r.timeouts) || !has(r.timeouts.backendRequest))",
    ),
    (
        "spec.parentRefs[].sectionName",
        "object.spec.parentRefs.all(p, !(has(p.kind) && p.kind == 'Service') || !has(p.sectionName))",
    ),
];

/// The admission warnings for [`MESH_NOT_YET`]: a ValidatingAdmissionPolicy (warn only) each on
/// HTTPRoutes and GRPCRoutes that name a Service as a parent (a Gateway's routes are not the
/// mesh's business).
pub fn mesh_route_warnings() -> String {
    let mut docs = Vec::new();
    for (kind, plural) in [("HTTPRoute", "httproutes"), ("GRPCRoute", "grpcroutes")] {
        let article = if kind == "HTTPRoute" { "an" } else { "a" };
        // A GRPCRoute has no CORS filter and no timeouts.
        let validations: Vec<serde_json::Value> = MESH_NOT_YET
            .iter()
            .filter(|(field, _)| kind == "HTTPRoute" || !(field.contains("cors") || field.contains("timeouts")))
            .map(|(field, cel)| {
                serde_json::json!({
                    "expression": cel,
                    "message": format!("{field} is not implemented yet for mesh routes ({article} {kind} attached to a Service): it is accepted but changes nothing (docs/traffic.md)"),
                })
            })
            .collect();
        let service_parent = "has(object.spec.parentRefs) && object.spec.parentRefs.exists(p, has(p.kind) && p.kind == 'Service' && (!has(p.group) || p.group == '' || p.group == 'core'))";
        let name = format!("mycel-not-implemented-mesh-{plural}");
        let condition = Some(("attached-to-a-service", service_parent));
        docs.extend(crate::ledger::warning_policy(&name, GROUP, "v1", plural, condition, validations));
    }
    crate::ledger::yaml_documents(&docs)
}
