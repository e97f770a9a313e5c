//! The admin server (15020 in a pod): `/healthz/ready` (200 once every listener is bound),
//! `/config_dump` (the config in force, JSON), `/metrics` (Prometheus text), and `/logging`
//! (`GET`: the log filter; `POST /logging?level=debug` or `?level=info,mycel_proxy=trace`: change it).
//!
//! The port is open to the pod's network, for the kubelet's probes and Prometheus: from there it
//! answers only `/healthz/ready`, `/metrics` and `/app-health/…`. What reveals or changes the
//! proxy's state (`/config_dump`, `/logging`, anything else) answers only on loopback, which
//! `kubectl port-forward` (and `mycelctl`, through it) reaches.

use std::{convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of descriptors, most likely: give a closing connection a moment.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let peer = peer.ip();
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    if let Some(probe) = req.uri().path().strip_prefix("/app-health/") {
                        return Ok::<_, Infallible>(app_health(probe, &shared).await);
                    }
                    if !answers(req.uri().path(), peer) {
                        return Ok(local_only(req.uri().path()));
                    }
                    Ok::<_, Infallible>(route(req.method(), req.uri(), &shared))
                }
            });
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Whether `path` answers a caller at `peer`: loopback may ask anything, the pod's network only
/// what probes and Prometheus need.
fn answers(path: &str, peer: std::net::IpAddr) -> bool {
    peer.is_loopback()
        || peer.to_canonical().is_loopback()
        || matches!(path, "/healthz/ready" | "/metrics")
        || path.starts_with("/app-health/")
}

fn local_only(path: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::FORBIDDEN)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(format!(
            "{path} answers only on localhost: use `kubectl port-forward pod/<pod> 15020` and ask 127.0.0.1:15020\n"
        ))))
        .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_answers_only_on_loopback_and_probes_everywhere() {
        let pod_net: std::net::IpAddr = "10.244.0.7".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        for path in ["/config_dump", "/logging", "/anything"] {
            assert!(!answers(path, pod_net), "{path} from the pod network");
            assert!(answers(path, "127.0.0.1".parse().unwrap()) && answers(path, "::1".parse().unwrap()));
            assert!(answers(path, mapped));
        }
        for path in ["/healthz/ready", "/metrics", "/app-health/web/readyz"] {
            assert!(answers(path, pod_net), "{path} is for the kubelet and Prometheus");
        }
    }
}
