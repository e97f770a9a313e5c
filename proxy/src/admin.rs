//! The admin server (15020 in a pod): `/healthz/ready` (200 once every listener is bound),
//! `/config_dump` (the config in force, JSON), `/metrics` (Prometheus text), and `/logging`
//! (`GET`: the log filter; `POST /logging?level=debug` or `?level=info,mycel_proxy=trace`: change it).
//!
//! The port is open to the pod's network, for the kubelet's probes and Prometheus: from there it
//! answers only `/healthz/ready`, `/metrics` and `/app-health/…`. What reveals or changes the
//! proxy's state (`/config_dump`, `/logging`, anything else) answers only on loopback, which
//! `kubectl port-forward` (and `mycelctl`, through it) reaches.

use std::sync::Arc;

use mycel_admin::{Access, Asked, Reply, StatusCode};
use tokio::net::TcpListener;

use crate::Shared;

/// What the pod's network may ask: the kubelet's probes and Prometheus.
fn public(path: &str) -> bool {
    matches!(path, "/healthz/ready" | "/metrics") || path.starts_with("/app-health/")
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let access = Access { public, how: "use `kubectl port-forward pod/<pod> 15020` and ask 127.0.0.1:15020" };
    mycel_admin::serve(listener, access, move |asked: Asked| {
        let shared = shared.clone();
        async move {
            if let Some(probe) = asked.path.strip_prefix("/app-health/") {
                return app_health(probe, &shared).await;
            }
            route(&asked, &shared)
        }
    })
    .await
}

/// Runs one of the app's probes (rewritten to the proxy at injection) against localhost:
/// `{"httpGet": {"path", "port"}}` passes on 2xx/3xx, `{"tcpSocket": {"port"}}` on connect.
async fn app_health(name: &str, shared: &Shared) -> Reply {
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
    Reply::text(status, body)
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

fn route(asked: &Asked, shared: &Shared) -> Reply {
    match asked.path.as_str() {
        "/logging" => logging(asked, shared),
        "/healthz/ready" if shared.ready.load(std::sync::atomic::Ordering::Acquire) => {
            Reply::text(StatusCode::OK, "ready\n")
        }
        "/healthz/ready" => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/config_dump" => {
            Reply::json(serde_json::to_string_pretty(&shared.state.load().config).unwrap_or_default())
        }
        "/metrics" => Reply::metrics(shared.metrics.render()),
        _ => Reply::not_found(),
    }
}

fn logging(asked: &Asked, shared: &Shared) -> Reply {
    let Ok(control) = shared.log_control.read() else {
        return Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "log control unavailable\n");
    };
    let Some(control) = control.as_ref() else {
        return Reply::text(StatusCode::NOT_IMPLEMENTED, "log levels cannot be changed in this process\n");
    };
    let result = match (&asked.method, asked.param("level")) {
        (&mycel_admin::Method::GET, _) => control(None),
        (&mycel_admin::Method::POST | &mycel_admin::Method::PUT, Some(level)) => control(Some(&level)),
        (&mycel_admin::Method::POST | &mycel_admin::Method::PUT, None) => {
            return Reply::text(
                StatusCode::BAD_REQUEST,
                "give the new filter as ?level=…, e.g. ?level=debug\n",
            );
        }
        _ => return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "use GET, or POST with ?level=…\n"),
    };
    match result {
        Ok(current) => Reply::text(StatusCode::OK, format!("{current}\n")),
        Err(why) => Reply::text(StatusCode::BAD_REQUEST, format!("{why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_answers_only_on_loopback_and_probes_everywhere() {
        let access = Access { public, how: "" };
        let answers = |path: &str, peer: std::net::IpAddr| mycel_admin::answers(&access, path, peer);
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
