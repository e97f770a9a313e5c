//! The admin server (15020 in a pod): `/healthz/ready` (200 once every listener is bound),
//! `/config_dump` (the config in force, JSON), `/metrics` (Prometheus text).

use std::{convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req.uri().path(), &shared)) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn route(path: &str, shared: &Shared) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/healthz/ready" if shared.ready.load(std::sync::atomic::Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", "ready\n".to_string())
        }
        "/healthz/ready" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".to_string()),
        "/config_dump" => {
            let config = shared.config.read().map(|c| serde_json::to_string_pretty(&*c).unwrap_or_default());
            (StatusCode::OK, "application/json", config.unwrap_or_default())
        }
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", shared.metrics.render()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
