//! The control plane's Prometheus metrics (served on 15014 `/metrics`).

use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// The counters of one resource type (handles to the same values the registry exports).
pub struct TypeCounters {
    pub pushes: Counter,
    pub push_bytes: Counter,
    pub acks: Counter,
    pub nacks: Counter,
}

pub struct CpMetrics {
    registry: Mutex<Registry>,
    pub connected: Gauge,
    pub config_version: Gauge,
    pub clusters: Gauge,
    pushes: Family<TypeLabels, Counter>,
    push_bytes: Family<TypeLabels, Counter>,
    acks: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
    signs: Family<ResultLabels, Counter>,
}

impl Default for CpMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mycel_control_plane");
        let m = CpMetrics {
            registry: Mutex::new(Registry::default()),
            connected: Gauge::default(),
            config_version: Gauge::default(),
            clusters: Gauge::default(),
            pushes: Family::default(),
            push_bytes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            signs: Family::default(),
        };
        registry.register("connected_proxies", "Proxies with an open config stream", m.connected.clone());
        registry.register("config_version", "Version of the newest mesh model", m.config_version.clone());
        registry.register("clusters", "Clusters in the newest mesh model", m.clusters.clone());
        registry.register("pushes", "Config responses sent, by resource type", m.pushes.clone());
        registry.register(
            "push_bytes",
            "Bytes of config responses sent, by resource type",
            m.push_bytes.clone(),
        );
        registry.register("acks", "Config responses proxies accepted", m.acks.clone());
        registry.register("nacks", "Config responses proxies rejected", m.nacks.clone());
        registry.register(
            "certificate_requests",
            "Certificate requests by result (ok or gRPC code)",
            m.signs.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        m
    }
}

impl CpMetrics {
    fn labels(type_url: &str) -> TypeLabels {
        TypeLabels { resource: type_url.trim_start_matches("mycel.io/").to_string() }
    }

    /// One resource type's counters, looked up once per stream instead of on every response.
    pub fn for_type(&self, type_url: &str) -> TypeCounters {
        let l = Self::labels(type_url);
        TypeCounters {
            pushes: self.pushes.get_or_create(&l).clone(),
            push_bytes: self.push_bytes.get_or_create(&l).clone(),
            acks: self.acks.get_or_create(&l).clone(),
            nacks: self.nacks.get_or_create(&l).clone(),
        }
    }

    pub fn signed(&self, error: Option<tonic::Code>) {
        let result = match error {
            None => "ok".to_string(),
            Some(c) => format!("{c:?}"),
        };
        self.signs.get_or_create(&ResultLabels { result }).inc();
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
