//! Policies a sidecar enforces on a request or connection: request authentication (JWT),
//! authorization (AuthorizationPolicy) and rate limits (RateLimitPolicy). Each is a step of a
//! direction's stack ([`crate::inbound`], [`crate::outbound`]); none is configured yet, so each
//! admits everything, and the issues that implement them fill these functions.

use hyper::Request;

use crate::{context::Conn, error::ProxyError, http::Body};

/// Connection-level authorization (rules on identities, namespaces, addresses and ports), before
/// any byte reaches the app.
pub fn authorize_connection(_conn: &Conn) -> Result<(), ProxyError> {
    Ok(())
}

/// Request authentication: the request principal from a JWT.
pub fn authenticate(_req: &mut Request<Body>, _conn: &Conn) -> Result<(), ProxyError> {
    Ok(())
}

/// Request-level authorization.
pub fn authorize(_req: &Request<Body>, _conn: &Conn) -> Result<(), ProxyError> {
    Ok(())
}

/// Local and global rate limits.
pub fn rate_limit(_req: &Request<Body>, _conn: &Conn) -> Result<(), ProxyError> {
    Ok(())
}
