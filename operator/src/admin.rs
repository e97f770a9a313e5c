//! The operator's small HTTP server: `/healthz` (the process runs), `/readyz` (it can serve: it
//! leads, or stands by ready to), and `/metrics`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Shared flags the server reports.
#[derive(Default)]
pub struct Health {
    pub ready: AtomicBool,
}

/// Serves until the task is dropped.
pub async fn serve(addr: SocketAddr, health: Arc<Health>, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin server listening");
    loop {
        let (stream, _) = listener.accept().await?;
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (health, metrics) = (health.clone(), metrics.clone());
                async move {
                    let (status, body) = match req.uri().path() {
                        "/healthz" => (StatusCode::OK, "ok".to_string()),
                        "/readyz" if health.ready.load(Ordering::Relaxed) => {
                            (StatusCode::OK, "ready".to_string())
                        }
                        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready".to_string()),
                        "/metrics" => (StatusCode::OK, metrics.render()),
                        _ => (StatusCode::NOT_FOUND, "not found".to_string()),
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
