//! The operator's small HTTP server: `/healthz` (the process runs), `/readyz` (it can serve: it
//! leads, or stands by ready to), and `/metrics`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use mycel_admin::{Access, Asked, Reply, StatusCode};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Shared flags the server reports.
#[derive(Default)]
pub struct Health {
    pub ready: AtomicBool,
}

/// Serves until the task is dropped. Everything it serves is for probes and Prometheus.
pub async fn serve(addr: SocketAddr, health: Arc<Health>, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin server listening");
    let access = Access { public: |_| true, how: "" };
    mycel_admin::serve(listener, access, move |asked: Asked| {
        let (health, metrics) = (health.clone(), metrics.clone());
        async move {
            match asked.path.as_str() {
                "/healthz" => Reply::text(StatusCode::OK, "ok"),
                "/readyz" if health.ready.load(Ordering::Relaxed) => Reply::text(StatusCode::OK, "ready"),
                "/readyz" => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
                "/metrics" => Reply::metrics(metrics.render()),
                _ => Reply::not_found(),
            }
        }
    })
    .await;
    Ok(())
}
