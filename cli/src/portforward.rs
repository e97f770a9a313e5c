//! Reaching a pod's loopback, where the proxy's and the control plane's state endpoints answer
//! (`/config_dump`, `/debug/proxies`): through the API server's port-forward, as
//! `kubectl port-forward` does, with the user's own credentials and RBAC (`pods/portforward`).

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` on `port` of `pod`; the body of a 200, or an error naming what answered.
pub async fn get(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut pf = pods
        .portforward(pod, &[port])
        .await
        .with_context(|| format!("port-forward to {namespace}/{pod}:{port} (needs pods/portforward)"))?;
    let mut stream = pf.take_stream(port).context("port-forward gave no stream")?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    drop(stream);
    let _ = pf.join().await;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "{namespace}/{pod}:{port}{path}: {}",
        head.lines().next().unwrap_or("no answer")
    );
    Ok(body.to_string())
}

/// A running pod matching `selector` in `namespace`.
pub async fn running_pod(client: &Client, namespace: &str, selector: &str) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    list.items
        .into_iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .and_then(|p| p.metadata.name)
        .with_context(|| format!("no running pod with labels {selector} in namespace {namespace}"))
}
