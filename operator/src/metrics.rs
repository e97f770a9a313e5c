//! The operator's Prometheus metrics: reconciles, their durations, and failures by error kind.

use std::{sync::Mutex, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mycel_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register("reconciles", "Reconciles of MeshInstallations", reconciles.clone());
        registry.register("reconcile_errors", "Failed reconciles by error kind", failures.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", duration.clone());
        Metrics { registry: Mutex::new(registry), reconciles, failures, duration }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn failed(&self, e: &crate::Error) {
        self.failures.get_or_create(&ErrorLabels { error: e.label().to_string() }).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(reg) = self.registry.lock() {
            let _ = encode(&mut out, &reg);
        }
        out
    }
}
