//! Translate: pure functions from the model's view of Kubernetes objects to proxy resources,
//! one file per resource kind. Nothing here reads a cluster or keeps state; the model calls them
//! for what is dirty and stores what they return.

pub mod cluster;
pub mod destination;
pub mod peer_policy;
pub mod route;
pub mod unimplemented;
