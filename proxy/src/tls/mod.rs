//! TLS and identity: the workload certificate and its renewal ([`identity`]), and mutual TLS
//! between sidecars ([`mtls`]).

pub mod identity;
pub mod mtls;
