//! Outbound routing: which backend a request goes to, and what is done to it on the way.
//!
//! Today a request goes to its connection's target (the listener's cluster, or the Service of
//! the virtual address it was sent to). TrafficRoute and HTTPRoute matching, filters (headers,
//! rewrites, redirects, CORS), fault injection and mirroring go here, in the order
//! [`crate::outbound::request`] calls them.

use std::sync::Arc;

use hyper::Request;

use crate::{balance::Endpoints, context::Conn, error::ProxyError, http::Body, state::State};

/// Where a request goes, as routing decided.
pub struct Route {
    pub backend: Arc<Endpoints>,
}

/// Picks the request's route.
pub fn route(_req: &Request<Body>, conn: &Conn, state: &State) -> Result<Route, ProxyError> {
    Ok(Route { backend: conn.target.resolve(state)? })
}

/// The route's request filters (header changes, rewrites, redirects): none yet.
pub fn filters(_req: &mut Request<Body>, _route: &Route) {}

/// The route's fault injection (delays and aborts): none yet.
pub fn fault(_route: &Route) -> Result<(), ProxyError> {
    Ok(())
}

/// The route's mirror (a copy sent to a second backend, once per request, before retries):
/// none yet.
pub fn mirror(_req: &Request<Body>, _route: &Route) {}
