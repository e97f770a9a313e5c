//! Kinds whose fields are not implemented yet (the field ledger's `not_yet`): translated into
//! nothing a proxy receives, only into what their status says — which of the fields they set
//! are not implemented, so that nobody believes a policy is enforced when it is not.

use std::sync::{Arc, LazyLock};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResourceExt, api::ApiResource};
use mycel_crds::{
    destination_policy::DestinationPolicy,
    ledger::{self, NotYet},
    mesh_installation::MeshInstallation,
    traffic_route::TrafficRoute,
};

/// A kind the control plane watches only to report on.
pub struct Watched {
    pub kind: &'static str,
    pub resource: ApiResource,
    /// Its fields not implemented yet (the CRD and the ledger are not kept).
    pub not_yet: NotYet,
    /// Whether anything of the kind is implemented (if not, an object of it changes nothing).
    pub any_implemented: bool,
}

/// The kinds with fields not implemented yet that the control plane owns the status of.
pub static KINDS: LazyLock<Vec<Arc<Watched>>> = LazyLock::new(|| {
    let ledger = ledger::ledger();
    let of = |kind: &'static str, resource: ApiResource, crd: CustomResourceDefinition| {
        let any_implemented = ledger.kinds.get(kind).is_some_and(|f| !f.implemented.is_empty());
        Arc::new(Watched { kind, resource, not_yet: NotYet::of(&ledger, &crd), any_implemented })
    };
    // Every kind is implemented at least in part today; one added with nothing implemented
    // goes here.
    let kinds: Vec<(&'static str, ApiResource, CustomResourceDefinition)> = Vec::new();
    kinds.into_iter().map(|(kind, resource, crd)| of(kind, resource, crd)).collect()
});

/// TrafficRoute's fields not implemented yet (the kind is translated, but not all of it).
pub static TRAFFIC_ROUTE: LazyLock<NotYet> =
    LazyLock::new(|| NotYet::of(&ledger::ledger(), &TrafficRoute::crd()));

/// DestinationPolicy's fields not implemented yet.
pub static DESTINATION_POLICY: LazyLock<NotYet> =
    LazyLock::new(|| NotYet::of(&ledger::ledger(), &DestinationPolicy::crd()));

/// MeshInstallation's fields not implemented yet (its status is the operator's).
pub static MESH_INSTALLATION: LazyLock<NotYet> =
    LazyLock::new(|| NotYet::of(&ledger::ledger(), &MeshInstallation::crd()));

/// What the model keeps of such an object.
#[derive(Clone, Debug, PartialEq)]
pub struct Unimplemented {
    pub generation: i64,
    /// The `not_yet` fields it sets.
    pub fields: Vec<String>,
}

/// The fields of `object` (a whole resource of `kind`, as JSON) that are not implemented yet.
pub fn translate(kind: &Watched, object: &serde_json::Value) -> Unimplemented {
    Unimplemented {
        generation: object["metadata"]["generation"].as_i64().unwrap_or_default(),
        fields: kind.not_yet.set_by(object),
    }
}
