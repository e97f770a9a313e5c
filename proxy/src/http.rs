//! HTTP/1.1 proxying, request by request: each request goes to an endpoint chosen for it, over a
//! pooled connection; hop-by-hop headers are dropped (RFC 9110 §7.6.1). Failures become a 503
//! with an `x-mycel-error` header that says why, never a hang.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode, Uri,
    body::Bytes,
    header::{self, HeaderName, HeaderValue},
};
use hyper_util::rt::TokioIo;

use crate::{
    Shared,
    balance::Endpoints,
    metrics::{ListenerLabels, RequestLabels},
    pool::SendError,
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Header that names the reason of a response the proxy made itself.
pub const ERROR_HEADER: &str = "x-mycel-error";

pub(crate) fn error_response(status: StatusCode, why: &str) -> Response<Body> {
    let mut r =
        Response::new(Full::new(Bytes::from(format!("{why}\n"))).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(why) {
        r.headers_mut().insert(ERROR_HEADER, v);
    }
    r
}

/// The answer when a listener's cluster disappeared in a reload.
pub fn no_cluster(name: &str) -> Response<Body> {
    error_response(StatusCode::SERVICE_UNAVAILABLE, &format!("no cluster named {name}"))
}

fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == header::TE
        || n == header::TRAILER
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
        || n == "keep-alive"
        || n == "proxy-connection"
}

/// Removes the hop-by-hop headers: the fixed set, and any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names costs less than a lookup for each.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    // A message framed by Transfer-Encoding had its Content-Length ignored; it must not reach the
    // next hop, which would frame by it (RFC 9112 §6.1).
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    // `TE: trailers` is the one TE value HTTP/2 allows, and gRPC needs it end to end.
    let te_trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for h in ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"]
    {
        headers.remove(h);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Metric handles of one downstream connection: a request updates them without building labels.
pub struct ConnMetrics {
    direction: crate::config::Direction,
    listener: String,
    duration: prometheus_client::metrics::histogram::Histogram,
    /// (cluster, response code) → counter; a handful of entries per connection.
    counters: std::sync::Mutex<Vec<(String, u16, prometheus_client::metrics::counter::Counter)>>,
}

impl ConnMetrics {
    pub fn new(shared: &Shared, listener: &str, direction: crate::config::Direction) -> Self {
        let duration = shared
            .metrics
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

    fn count(&self, shared: &Shared, cluster: &str, code: u16) {
        let Ok(mut cache) = self.counters.lock() else { return };
        if let Some((_, _, c)) = cache.iter().find(|(cl, co, _)| *co == code && cl == cluster) {
            c.inc();
            return;
        }
        let c = shared
            .metrics
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

/// Forwards one request to an endpoint of `cluster` and counts it. A protocol switch needs the
/// request as hyper's server made it (it carries the connection's upgrade).
pub async fn handle(
    req: Request<Body>,
    metrics: &ConnMetrics,
    peer: Option<SocketAddr>,
    cluster: &Arc<Endpoints>,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let started = Instant::now();
    let resp = forward(req, peer, cluster, shared).await;
    metrics.count(shared, &cluster.cluster, resp.status().as_u16());
    metrics.duration.observe(started.elapsed().as_secs_f64());
    resp
}

/// An HTTP/1.1 protocol switch (WebSocket and other `Upgrade`s) or a `CONNECT` tunnel.
fn is_upgrade(method: &hyper::Method, headers: &HeaderMap) -> bool {
    method == hyper::Method::CONNECT
        || (headers.contains_key(header::UPGRADE)
            && headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Once both sides switched protocols, bytes flow through until either closes.
fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else { return };
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    });
}

enum Attempt {
    Done(Response<Body>),
    /// No connection to the endpoint could be opened: the request was not sent, here it is.
    NotSent(Box<Request<Body>>),
    /// The peer sidecar could not reach its app: the request went no further than that sidecar.
    AppRefused,
}

async fn forward(
    mut req: Request<Body>,
    peer: Option<SocketAddr>,
    cluster: &Endpoints,
    shared: &Shared,
) -> Response<Body> {
    let key = crate::balance::request_key(&cluster.lb, req.headers(), peer);
    let Some(first) = cluster.pick(key) else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no endpoints for cluster {}", cluster.cluster),
        );
    };
    let mut downstream_upgrade =
        is_upgrade(req.method(), req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let upgrade_header = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade_header.filter(|_| downstream_upgrade.is_some()) {
        // The switch itself must reach the upstream: keep the two headers that ask for it.
        parts.headers.insert(header::UPGRADE, u);
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // A request that could not be sent comes back and goes to the next endpoint as it is. One
    // that reached a peer sidecar whose app refused it can only be sent again from a copy of its
    // head, kept for that case alone: a mesh endpoint, no body, and another endpoint to try.
    let copy =
        (hyper::body::Body::is_end_stream(&body) && cluster.addrs.len() > 1 && shared.mesh.is_mesh(&first))
            .then(|| parts.clone());
    let mut next = Some(Request::from_parts(parts, body));
    let mut last_error = String::new();
    // The other endpoints are only asked for once the first failed (asking moves a round robin).
    let rest = std::iter::once(()).flat_map(|_| cluster.order(key)).filter(|a| *a != first);
    for addr in std::iter::once(first).chain(rest) {
        let req = match next.take() {
            Some(r) => r,
            None => match &copy {
                Some(parts) => {
                    Request::from_parts(parts.clone(), Empty::new().map_err(|never| match never {}).boxed())
                }
                None => break,
            },
        };
        match send(req, addr, &mut downstream_upgrade, cluster, shared).await {
            Ok(Attempt::Done(resp)) => return resp,
            Ok(Attempt::NotSent(req)) => {
                last_error = format!("connect to {addr} failed");
                next = Some(*req);
            }
            Ok(Attempt::AppRefused) => last_error = format!("connect to {addr} failed"),
            Err(resp) => return resp,
        }
    }
    error_response(StatusCode::SERVICE_UNAVAILABLE, &last_error)
}

/// One try at one endpoint. `Err` is a response to give the client as it is (a 502).
async fn send(
    req: Request<Body>,
    addr: SocketAddr,
    downstream_upgrade: &mut Option<hyper::upgrade::OnUpgrade>,
    cluster: &Endpoints,
    shared: &Shared,
) -> Result<Attempt, Response<Body>> {
    let (mut parts, body) = req.into_parts();
    let is_connect = parts.method == hyper::Method::CONNECT;
    let original_uri = parts.uri.clone();
    parts.uri = upstream_uri(&parts.uri, parts.version, cluster.authority(addr));
    if parts.version != hyper::Version::HTTP_2
        && !parts.headers.contains_key(header::HOST)
        && let Some(a) = cluster.authority(addr).and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, a);
    }
    let in_flight = cluster.start(addr);
    let mtls = shared.mesh.is_mesh(&addr);
    let result =
        shared.pool.send(Request::from_parts(parts, body), addr, mtls, cluster.connect_timeout).await;
    drop(in_flight);
    match result {
        // The peer sidecar could not reach its app (it is shutting down): the request never got
        // there, so it may go to another endpoint.
        Ok(resp)
            if mtls
                && resp.status() == StatusCode::SERVICE_UNAVAILABLE
                && resp
                    .headers()
                    .get(ERROR_HEADER)
                    .is_some_and(|v| v.as_bytes().starts_with(b"connect to ")) =>
        {
            cluster.eject(addr);
            Ok(Attempt::AppRefused)
        }
        Ok(mut resp) => {
            let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (is_connect && resp.status().is_success());
            let upstream_upgrade = switched.then(|| hyper::upgrade::on(&mut resp));
            let (mut rparts, rbody) = resp.into_parts();
            let upgrade_header = rparts.headers.get(header::UPGRADE).cloned();
            strip_hop_by_hop(&mut rparts.headers);
            if let (Some(up), Some(down)) = (upstream_upgrade, downstream_upgrade.take()) {
                if let Some(u) = upgrade_header {
                    rparts.headers.insert(header::UPGRADE, u);
                    rparts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                }
                tunnel(down, up);
            }
            Ok(Attempt::Done(Response::from_parts(rparts, rbody.boxed())))
        }
        Err(SendError::NotSent(e, mut req)) => {
            tracing::debug!(%addr, error = %e, "upstream connection failed");
            cluster.eject(addr);
            *req.uri_mut() = original_uri;
            Ok(Attempt::NotSent(req))
        }
        Err(SendError::Failed(e)) => {
            Err(error_response(StatusCode::BAD_GATEWAY, &format!("upstream {addr}: {}", error_chain(&e))))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The request target upstream: for HTTP/1.1 the origin form (`/path?query`; the `Host` header
/// names the service), for HTTP/2 `http://<endpoint>/path?query` (the `:authority`), from the
/// endpoint's pre-parsed authority (no formatting).
fn upstream_uri(
    original: &Uri,
    version: hyper::Version,
    authority: Option<&hyper::http::uri::Authority>,
) -> Uri {
    let pq = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    if version != hyper::Version::HTTP_2 {
        // A CONNECT's target is its authority.
        if original.path_and_query().is_none()
            && let Some(a) = original.authority()
        {
            return Uri::from(a.clone());
        }
        return Uri::from(pq);
    }
    let mut b = Uri::builder().scheme("http").path_and_query(pq);
    if let Some(a) = authority {
        b = b.authority(a.clone());
    }
    b.build().unwrap_or_else(|_| Uri::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_ones_stay() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("x-trace", HeaderValue::from_static("1"));
        let untouched = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, untouched, "nothing to strip");

        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("secret"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "te", "x-trace"], "TE: trailers is the one kept");
    }
}
