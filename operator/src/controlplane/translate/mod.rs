//! Translate: pure functions from the model's view of Kubernetes objects to proxy resources,
//! one file per resource kind. Nothing here reads a cluster or keeps state; the model calls them
//! for what is dirty and stores what they return.

pub mod authn;
pub mod authz;
pub mod cluster;
pub mod destination;
pub mod gamma;
pub mod peer_policy;
pub mod ratelimit;
pub mod route;
pub mod unimplemented;

/// A duration in whole milliseconds, rounded up (a positive one never becomes 0, which proxies
/// read as "none"); `None` when it does not parse.
pub fn millis(d: &mycel_crds::common::Duration) -> Option<u32> {
    d.parse().ok().map(|d| d.as_micros().div_ceil(1000).clamp(1, u32::MAX as u128) as u32)
}
