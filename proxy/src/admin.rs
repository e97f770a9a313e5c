//! The admin server (15020 in a pod): `/healthz/ready` (200 once every listener is bound),
//! `/config_dump` (the config in force, JSON), `/metrics` (Prometheus text), and `/logging`
//! (`GET`: the log filter; `POST /logging?level=debug` or `?level=info,mycel_proxy=trace`: change it).

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
                async move {
                    if let Some(probe) = req.uri().path().strip_prefix("/app-health/") {
                        return Ok::<_, Infallible>(app_health(probe, &shared).await);
                    }
                    Ok::<_, Infallible>(route(req.method(), req.uri(), &shared))
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// Runs one of the app's probes (rewritten to the proxy at injection) against localhost:
/// `{"httpGet": {"path", "port"}}` passes on 2xx/3xx, `{"tcpSocket": {"port"}}` on connect.
async fn app_health(name: &str, shared: &Shared) -> Response<Full<Bytes>> {
    let key = format!("/app-health/{name}");
    let probe = shared.app_probes.read().ok().and_then(|p| p.get(&key).cloned());
    let (status, body) = match probe {
        None => (StatusCode::NOT_FOUND, format!("no app probe {key}\n")),
        Some(p) => match tokio::time::timeout(std::time::Duration::from_secs(5), run_probe(&p)).await {
            Ok(Ok(())) => (StatusCode::OK, "ok\n".to_string()),
            Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "timed out\n".to_string()),
        },
    };
    Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap_or_default()
}

async fn run_probe(p: &serde_json::Value) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = |v: &serde_json::Value| {
        v["port"].as_u64().and_then(|p| u16::try_from(p).ok()).ok_or("probe without a port")
    };
    if let Some(tcp) = p.get("tcpSocket") {
        tokio::net::TcpStream::connect(("127.0.0.1", port(tcp)?)).await.map_err(|e| e.to_string())?;
        return Ok(());
    }
    let get = p.get("httpGet").ok_or("unknown probe")?;
    let path = get["path"].as_str().unwrap_or("/");
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port(get)?)).await.map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: kube-probe (via mycel-proxy)\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let code: u16 =
        std::str::from_utf8(&head[9..12]).ok().and_then(|c| c.parse().ok()).ok_or("not an HTTP response")?;
    if (200..400).contains(&code) { Ok(()) } else { Err(format!("the app answered {code}")) }
}

fn route(method: &hyper::Method, uri: &hyper::Uri, shared: &Shared) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match uri.path() {
        "/logging" => logging(method, uri.query(), shared),
        "/healthz/ready" if shared.ready.load(std::sync::atomic::Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", "ready\n".to_string())
        }
        "/healthz/ready" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".to_string()),
        "/config_dump" => {
            let config = serde_json::to_string_pretty(&shared.state.load().config).unwrap_or_default();
            (StatusCode::OK, "application/json", config)
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

fn logging(
    method: &hyper::Method,
    query: Option<&str>,
    shared: &Shared,
) -> (StatusCode, &'static str, String) {
    let Ok(control) = shared.log_control.read() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "log control unavailable\n".into());
    };
    let Some(control) = control.as_ref() else {
        return (
            StatusCode::NOT_IMPLEMENTED,
            "text/plain",
            "log levels cannot be changed in this process\n".into(),
        );
    };
    let level = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "level")
        .map(|(_, v)| v.replace("%2C", ",").replace("%3D", "="));
    let result = match (method, level) {
        (&hyper::Method::GET, _) => control(None),
        (&hyper::Method::POST | &hyper::Method::PUT, Some(level)) => control(Some(&level)),
        (&hyper::Method::POST | &hyper::Method::PUT, None) => {
            return (
                StatusCode::BAD_REQUEST,
                "text/plain",
                "give the new filter as ?level=…, e.g. ?level=debug\n".into(),
            );
        }
        _ => {
            return (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET, or POST with ?level=…\n".into());
        }
    };
    match result {
        Ok(current) => (StatusCode::OK, "text/plain", format!("{current}\n")),
        Err(why) => (StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n")),
    }
}
