//! Telemetry, recorded at one point per connection and per request in each direction, from what
//! the stack put in the context: [`ConnMetrics::request`] for a request (called once, by
//! [`crate::http::handle`], after the direction's stack answered), the connection counters in
//! [`crate::transport`]. Access logs and spans join here.

pub mod metrics;

pub use metrics::{ListenerLabels, Metrics, RequestLabels};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use crate::config::Direction;

/// Metric handles of one downstream HTTP connection: a request updates them without building
/// labels.
pub struct ConnMetrics {
    direction: Direction,
    listener: String,
    duration: Histogram,
    /// (cluster, response code) → counter; a handful of entries per connection.
    counters: std::sync::Mutex<Vec<(String, u16, Counter)>>,
}

impl ConnMetrics {
    pub fn new(metrics: &Metrics, listener: &str, direction: Direction) -> Self {
        let duration = metrics
            .request_duration
            .get_or_create(&ListenerLabels {
                direction: direction.as_str().into(),
                listener: listener.into(),
                protocol: "http".into(),
            })
            .clone();
        ConnMetrics {
            direction,
            listener: listener.into(),
            duration,
            counters: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Records one request's outcome: its cluster (empty when none was resolved), status and
    /// duration.
    pub fn request(&self, metrics: &Metrics, cluster: &str, code: u16, elapsed: std::time::Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        let Ok(mut cache) = self.counters.lock() else { return };
        if let Some((_, _, c)) = cache.iter().find(|(cl, co, _)| *co == code && cl == cluster) {
            c.inc();
            return;
        }
        let c = metrics
            .requests
            .get_or_create(&RequestLabels {
                direction: self.direction.as_str().into(),
                listener: self.listener.clone(),
                cluster: cluster.into(),
                code,
            })
            .clone();
        c.inc();
        cache.push((cluster.into(), code, c));
    }
}
