//! The contract between the control plane and the proxies: the config stream (modelled on xDS's
//! delta protocol) and certificate signing, as protobuf (`proto/`) with tonic/prost code generated
//! at build time by protox — no system `protoc`. It owns message shapes and their documentation
//! only — no policy. The protocol's rules are in `api/README.md`.

#![forbid(unsafe_code)]

/// Version of the wire contract; bumped on any incompatible change.
pub const CONTRACT_VERSION: u32 = 1;

/// Resource type of clusters in the config stream.
pub const CLUSTER_TYPE: &str = "mycel.io/Cluster";
/// Resource type of listeners in the config stream.
pub const LISTENER_TYPE: &str = "mycel.io/Listener";
/// Resource type of route tables (one per routed cluster, named as the cluster).
pub const ROUTE_TYPE: &str = "mycel.io/Route";
/// Resource type of the proxy's inbound mutual-TLS policy (one resource, `inbound`).
pub const PEER_POLICY_TYPE: &str = "mycel.io/PeerPolicy";

pub mod authz;
pub mod codec;
pub mod hash;
pub mod metrics;
pub mod net;
pub mod ratelimit;
pub mod route;
pub mod spiffe;

#[allow(clippy::all, missing_docs)]
pub mod v1alpha1 {
    tonic::include_proto!("mycel.v1alpha1");
}

/// Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`), the part a
/// sidecar sends and reads for an AuthorizationPolicy of action CUSTOM: wire-compatible with
/// Envoy's protos (same packages, names and field numbers), so an authorizer written for Envoy
/// answers a Mycel sidecar unchanged.
#[allow(clippy::all, missing_docs)]
pub mod envoy {
    pub mod service {
        pub mod auth {
            pub mod v3 {
                tonic::include_proto!("envoy.service.auth.v3");
            }
        }
    }
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

/// `google.rpc.Status`, as the external authorization API answers with it.
#[allow(clippy::all, missing_docs)]
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
