//! The proxy's Prometheus metrics, labelled by listener, cluster and outcome.

use std::sync::Mutex;

use prometheus_client::{
    encoding::{
        EncodeLabelSet,
        text::{encode_eof, encode_registry},
    },
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: String,
    pub listener: String,
    pub cluster: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub direction: String,
    pub listener: String,
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub cluster: String,
    /// `sent`, or `budget_exhausted` (a retry the policy asked for and the budget refused).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `ALLOW`, `DENY` or `AUDIT`: the deciding policy's action (`ALLOW` when ALLOW policies
    /// exist and none matched).
    pub action: String,
    /// `<namespace>/<name>`, or `none` when no policy matched.
    pub policy: String,
    /// `allowed`, `denied`, `audited`, or for a dry-run policy `dry_run_allowed` /
    /// `dry_run_denied` (what it would have decided).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwtLabels {
    /// `<namespace>/<name>` of the RequestAuthentication whose rule refused the token, or `-`
    /// when no rule took it (its issuer has none).
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// `<namespace>/<name>` of the RateLimitPolicy.
    pub policy: String,
    pub limit: String,
    /// `allowed`, `limited`, or for a shadow limit `shadow_limited` (it would have refused).
    pub result: String,
}

pub struct Metrics {
    pub reloads: Family<ReloadLabels, Counter>,
    pub certificates: Family<ReloadLabels, Counter>,
    pub certificate_expiry: Gauge,
    pub control_plane_connected: Gauge,
    pub config_updates: Family<ReloadLabels, Counter>,
    registry: Mutex<Registry>,
    /// Metrics named without the `mycel_proxy` prefix (`mycel_authz_decisions_total`).
    mesh_registry: Mutex<Registry>,
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub jwt_refused: Family<JwtLabels, Counter>,
    pub ratelimit_decisions: Family<RateLimitLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub mirrors: Family<RetryLabels, Counter>,
    pub request_duration: Family<ListenerLabels, Histogram>,
    pub connections: Family<ListenerLabels, Counter>,
    pub refused: Family<ListenerLabels, Counter>,
    pub active_connections: Family<ListenerLabels, Gauge>,
    pub bytes_received: Family<ListenerLabels, Counter>,
    pub bytes_sent: Family<ListenerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mycel_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "retries",
            "Retries of route rules, sent or refused by the destination's retry budget",
            retries.clone(),
        );
        let mirrors = Family::<RetryLabels, Counter>::default();
        registry.register(
            "mirrors",
            "Copies of requests sent by route mirrors (sent), or not sent because too many were in flight (dropped)",
            mirrors.clone(),
        );
        let request_duration = Family::<ListenerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        let connections = Family::<ListenerLabels, Counter>::default();
        let refused = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "refused_connections",
            "Inbound connections refused by mutual-TLS policy (plaintext under STRICT, or a failed handshake)",
            refused.clone(),
        );
        let active_connections = Family::<ListenerLabels, Gauge>::default();
        let bytes_received = Family::<ListenerLabels, Counter>::default();
        let bytes_sent = Family::<ListenerLabels, Counter>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let certificates = Family::<ReloadLabels, Counter>::default();
        let certificate_expiry = Gauge::default();
        let control_plane_connected = Gauge::default();
        let config_updates = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "certificate_requests",
            "Workload certificate requests, issued or failed",
            certificates.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the workload certificate in use expires (Unix time)",
            certificate_expiry.clone(),
        );
        registry.register(
            "control_plane_connected",
            "1 while the config stream is open",
            control_plane_connected.clone(),
        );
        registry.register(
            "config_updates",
            "Updates from the control plane, applied or rejected",
            config_updates.clone(),
        );
        registry.register("config_reloads", "Configuration reloads, applied or rejected", reloads.clone());
        registry.register("requests", "HTTP requests by response code", requests.clone());
        registry.register(
            "request_duration_seconds",
            "Time to the response's head",
            request_duration.clone(),
        );
        registry.register("connections", "Accepted downstream connections", connections.clone());
        registry.register("active_connections", "Open downstream connections", active_connections.clone());
        registry.register("received_bytes", "Bytes read from downstream (TCP)", bytes_received.clone());
        registry.register("sent_bytes", "Bytes written to downstream (TCP)", bytes_sent.clone());
        let mut mesh_registry = Registry::with_prefix("mycel");
        let authz_decisions = Family::<AuthzLabels, Counter>::default();
        mesh_registry.register(
            "authz_decisions",
            "Decisions of AuthorizationPolicies on inbound requests and connections, by deciding policy",
            authz_decisions.clone(),
        );
        let jwt_refused = Family::<JwtLabels, Counter>::default();
        mesh_registry.register(
            "jwt_refused",
            "Inbound requests refused with 401 because their JSON Web Token failed, by policy",
            jwt_refused.clone(),
        );
        let ratelimit_decisions = Family::<RateLimitLabels, Counter>::default();
        mesh_registry.register(
            "ratelimit_decisions",
            "Decisions of RateLimitPolicy limits on inbound requests, by policy and limit",
            ratelimit_decisions.clone(),
        );
        Metrics {
            mesh_registry: Mutex::new(mesh_registry),
            ratelimit_decisions,
            authz_decisions,
            jwt_refused,
            reloads,
            certificates,
            certificate_expiry,
            control_plane_connected,
            config_updates,
            registry: Mutex::new(registry),
            requests,
            retries,
            mirrors,
            request_duration,
            connections,
            refused,
            active_connections,
            bytes_received,
            bytes_sent,
        }
    }
}

impl Metrics {
    /// A retry of `cluster` (`sent` or `budget_exhausted`).
    pub fn retry(&self, cluster: &str, outcome: &str) {
        self.retries.get_or_create(&RetryLabels { cluster: cluster.into(), outcome: outcome.into() }).inc();
    }

    /// A mirrored copy for `cluster` (`sent` or `dropped`).
    pub fn mirror(&self, cluster: &str, outcome: &str) {
        self.mirrors.get_or_create(&RetryLabels { cluster: cluster.into(), outcome: outcome.into() }).inc();
    }

    /// Counts one authorization decision.
    pub fn authz(&self, action: &str, policy: &str, result: &str) {
        self.authz_decisions
            .get_or_create(&AuthzLabels {
                action: action.into(),
                policy: policy.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Counts a request refused for its token.
    pub fn jwt_refused(&self, policy: &str) {
        self.jwt_refused.get_or_create(&JwtLabels { policy: policy.into() }).inc();
    }

    /// Counts a configuration reload, applied or rejected.
    pub fn reloaded(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads.get_or_create(&ReloadLabels { result: result.into() }).inc();
    }

    /// Counts a certificate request; on success records the new expiry.
    pub fn certificate(&self, issued: bool, not_after: std::time::SystemTime) {
        let result = if issued { "issued" } else { "failed" };
        self.certificates.get_or_create(&ReloadLabels { result: result.into() }).inc();
        if issued && let Ok(d) = not_after.duration_since(std::time::UNIX_EPOCH) {
            self.certificate_expiry.set(d.as_secs() as i64);
        }
    }

    /// Counts an update from the control plane, applied or rejected.
    pub fn config_update(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.config_updates.get_or_create(&ReloadLabels { result: result.into() }).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = encode_registry(&mut out, &r);
        }
        if let Ok(r) = self.mesh_registry.lock() {
            let _ = encode_registry(&mut out, &r);
        }
        let _ = encode_eof(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_names_are_the_ones_exported() {
        let m = Metrics::default();
        let labels =
            ListenerLabels { direction: "inbound".into(), listener: "l".into(), protocol: "http".into() };
        m.requests
            .get_or_create(&RequestLabels {
                direction: "inbound".into(),
                listener: "l".into(),
                cluster: "c".into(),
                code: 200,
            })
            .inc();
        m.request_duration.get_or_create(&labels).observe(0.001);
        m.connections.get_or_create(&labels).inc();
        let text = m.render();
        for name in [
            mycel_api::metrics::REQUESTS_TOTAL,
            mycel_api::metrics::REQUEST_DURATION_BUCKET,
            mycel_api::metrics::CONNECTIONS_TOTAL,
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name}{{"))),
                "{name} not exported:\n{text}"
            );
        }
    }
}
