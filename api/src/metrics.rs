//! The names of the proxy's metrics that other parts read (`mycelctl top`, dashboards): one
//! place, so that a rename is one change. The proxy's contract test
//! (`mycel_proxy::telemetry::metrics::tests::the_shared_names_are_the_ones_exported`) fails when
//! what it exports and these names part.

/// HTTP requests, by `direction`, `listener`, `cluster` and `code` (a counter).
pub const REQUESTS_TOTAL: &str = "mycel_proxy_requests_total";
/// Time to the response's head, by `direction`, `listener` and `protocol` (a histogram; this is
/// its bucket series).
pub const REQUEST_DURATION_BUCKET: &str = "mycel_proxy_request_duration_seconds_bucket";
/// Accepted downstream connections, by `direction`, `listener` and `protocol` (`mtls` for
/// connections from another sidecar).
pub const CONNECTIONS_TOTAL: &str = "mycel_proxy_connections_total";
