//! The contract between the control plane and the proxies: the config stream (modelled on xDS's
//! delta protocol) and certificate signing, as protobuf with generated tonic/prost code built
//! without a system `protoc`. It owns message shapes and their documentation only — no policy.
//! The messages arrive with the control-plane issue; until then this crate fixes the name.

/// Version of the wire contract; bumped on any incompatible change.
pub const CONTRACT_VERSION: u32 = 0;
