//! Outbound routing: which backend a request goes to, and what is done to it on the way.
//!
//! A request goes to its connection's target (the listener's cluster, or the Service of the
//! virtual address it was sent to). When that cluster has a route table (TrafficRoute), the
//! table's first matching rule decides: its backends split by weight, its header edits and
//! rewrites, its fault injection and timeout, in the order [`crate::outbound::request`] calls
//! them. A request to a routed cluster that no rule matches is answered 404 (`NR`): it never
//! goes on to a backend no rule chose.

pub mod retry;
pub mod table;

use std::{sync::Arc, time::Duration};

use hyper::{
    Request, Response, Uri,
    header::{self, HeaderValue},
};

use crate::{balance::Endpoints, context::Conn, error::ProxyError, http::Body, state::State};

pub use table::{Rule, Table};

/// Where a request goes, as routing decided.
pub struct Route {
    pub backend: Arc<Endpoints>,
    /// The rule that chose it (`None`: the cluster has no route table).
    pub rule: Option<Arc<Rule>>,
    /// Bytes of the path a `prefix` match matched (for a prefix rewrite).
    matched_prefix: Option<usize>,
}

/// Picks the request's route.
pub fn route(req: &Request<Body>, conn: &Conn, state: &State) -> Result<Route, ProxyError> {
    let crate::context::Target::Cluster(name) = &conn.target else {
        return Ok(Route { backend: conn.target.resolve(state)?, rule: None, matched_prefix: None });
    };
    let Some(table) = state.routes(name).filter(|t| t.has_http()) else {
        return Ok(Route { backend: conn.target.resolve(state)?, rule: None, matched_prefix: None });
    };
    let Some((rule, matched_prefix)) = table.select(req) else {
        return Err(ProxyError::NoRoute { cluster: name.clone(), source: table.source.clone() });
    };
    if let Some(rd) = &rule.redirect {
        // Without a Host, the Service's name (the routed cluster is `<host>:<port>`).
        let service = name.rsplit_once(':').map_or(name.as_str(), |(h, _)| h);
        return Err(redirect(req, rd, matched_prefix, service));
    }
    if let Some(d) = &rule.direct_response {
        return Err(ProxyError::Direct {
            status: hyper::StatusCode::from_u16(d.status).unwrap_or(hyper::StatusCode::OK),
            body: hyper::body::Bytes::from(d.body.clone()),
        });
    }
    let cluster = rule.pick_backend();
    let backend = state
        .cluster(cluster)
        .cloned()
        .ok_or_else(|| ProxyError::NoCluster { cluster: cluster.to_string() })?;
    Ok(Route { backend, rule: Some(rule.clone()), matched_prefix })
}

/// A rule's redirect for `req`: its URL with the parts the rule gives replaced. The host is the
/// request's `Host` (or `:authority`; without either, `service`) unless the rule names one; the
/// port is the request's unless the rule names one, names a host (the whole authority is
/// replaced, as in Envoy) or changes the scheme; a scheme's default port is left out.
fn redirect(
    req: &Request<Body>,
    rd: &crate::config::route::Redirect,
    matched_prefix: Option<usize>,
    service: &str,
) -> ProxyError {
    let status = hyper::StatusCode::from_u16(rd.code).unwrap_or(hyper::StatusCode::MOVED_PERMANENTLY);
    let authority = req
        .uri()
        .authority()
        .cloned()
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok()?.parse().ok());
    let own_scheme = req.uri().scheme_str().unwrap_or("http");
    let scheme = rd.scheme.as_deref().unwrap_or(own_scheme);
    let host = rd.host.as_deref().or(authority.as_ref().map(|a| a.host())).unwrap_or(service);
    let keep_port = scheme == own_scheme && rd.host.is_none();
    let port = rd.port.or_else(|| if keep_port { authority.as_ref()?.port_u16() } else { None });
    let port = port.filter(|p| !matches!((scheme, *p), ("http", 80) | ("https", 443)));
    let path = req.uri().path();
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let path = match (&rd.path, &rd.prefix, matched_prefix) {
        (Some(p), _, _) => p.clone(),
        (None, Some(prefix), Some(len)) => {
            let rest = &path[len.min(path.len())..];
            if prefix.ends_with('/') && rest.starts_with('/') {
                format!("{prefix}{}", &rest[1..])
            } else if rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/') {
                format!("{prefix}{rest}")
            } else {
                format!("{prefix}/{rest}")
            }
        }
        _ => path.to_string(),
    };
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    };
    match HeaderValue::from_str(&location) {
        Ok(location) => ProxyError::Redirect { status, location },
        Err(_) => ProxyError::BadRequest {
            reason: "bad_redirect",
            detail: "the redirect's URL is not a valid header value",
        },
    }
}

/// The rule's request edits: header set/add/remove, then the path and authority rewrites.
pub fn filters(req: &mut Request<Body>, route: &Route) {
    let Some(rule) = &route.rule else { return };
    rule.request_headers.apply(req.headers_mut());
    let Some(rw) = &rule.rewrite else { return };
    let mut parts = req.uri().clone().into_parts();
    if let (Some(prefix), Some(len)) = (&rw.uri_prefix, route.matched_prefix) {
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let rest = &pq[len.min(pq.len())..];
        // `/api` → `/v2` on `/api/items` gives `/v2/items`; onto `/` it gives `/items`, not
        // `//items`.
        let joined = if prefix.ends_with('/') && rest.starts_with('/') {
            format!("{prefix}{}", &rest[1..])
        } else if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') || prefix.ends_with('/') {
            format!("{prefix}{rest}")
        } else {
            format!("{prefix}/{rest}")
        };
        if let Ok(pq) = joined.parse() {
            parts.path_and_query = Some(pq);
        }
    }
    if let Some(path) = &rw.path {
        let joined = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        if let Ok(pq) = joined.parse() {
            parts.path_and_query = Some(pq);
        }
    }
    if let Some(a) = &rw.authority {
        if parts.authority.is_some() {
            parts.authority = Some(a.clone());
        }
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The rule's fault injection: a delay (waited here), then an abort (the answer instead of the
/// backend's).
pub async fn fault(req: &Request<Body>, route: &Route) -> Result<(), ProxyError> {
    let Some(f) = route.rule.as_ref().and_then(|r| r.fault.as_ref()) else { return Ok(()) };
    if let Some(d) = &f.delay
        && chance(d.percent)
    {
        tokio::time::sleep(Duration::from_millis(d.delay_ms)).await;
    }
    if let Some(a) = &f.abort
        && chance(a.percent)
    {
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        return Err(match (a.http_status, a.grpc_status) {
            (_, Some(code)) => {
                ProxyError::FaultAbort { status: hyper::StatusCode::OK, grpc_status: Some(code) }
            }
            (Some(s), None) => ProxyError::FaultAbort {
                status: hyper::StatusCode::from_u16(s).unwrap_or(hyper::StatusCode::SERVICE_UNAVAILABLE),
                grpc_status: None,
            },
            (None, None) if grpc => {
                ProxyError::FaultAbort { status: hyper::StatusCode::OK, grpc_status: Some(14) }
            }
            (None, None) => {
                ProxyError::FaultAbort { status: hyper::StatusCode::SERVICE_UNAVAILABLE, grpc_status: None }
            }
        });
    }
    Ok(())
}

/// Whether an event of `percent` (0-100) happens this time.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

/// Mirrored copies in flight at once, per proxy; more are dropped (and counted).
pub const MIRRORS_IN_FLIGHT: usize = 256;
/// Of those, to one mirror cluster (so that one route's mirror that never answers cannot take
/// every other route's places).
const MIRRORS_PER_CLUSTER: u64 = 64;
/// How long a mirrored copy may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// The rule's mirror: a copy of the request (once, before retries; the route's edits applied)
/// sent in the background to the mirror's cluster, its answer discarded, the original never
/// waiting for it. As Istio does, the copy's host gets `-shadow` (`web:80` → `web-shadow:80`).
/// Only a request without a body is copied (one with a body would have to be held for the copy).
pub fn mirror(req: &Request<Body>, route: &Route, conn: &Conn, shared: &Arc<crate::Shared>) {
    let Some(m) = route.rule.as_ref().and_then(|r| r.mirror.as_ref()) else { return };
    // No body, and no protocol switch (a handshake copied would open a second tunnel).
    let switch = req.method() == hyper::Method::CONNECT || req.headers().contains_key(header::UPGRADE);
    if switch || !hyper::body::Body::is_end_stream(req.body()) || !chance(m.percent) {
        return;
    }
    let Some(backend) = shared.state.load().cluster(&m.cluster).cloned() else { return };
    let Some(place) = backend.admit_mirror(MIRRORS_PER_CLUSTER) else {
        shared.metrics.mirror(&m.cluster, "dropped");
        return;
    };
    let Ok(permit) = shared.mirrors.clone().try_acquire_owned() else {
        shared.metrics.mirror(&m.cluster, "dropped");
        return;
    };
    let mut copy = Request::new(crate::http::empty());
    *copy.method_mut() = req.method().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    let mut parts = req.uri().clone().into_parts();
    if let Some(a) = &parts.authority {
        parts.authority = shadow(a.as_str()).and_then(|s| s.parse().ok());
    }
    *copy.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| req.uri().clone());
    if let Some(h) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).and_then(shadow)
        && let Ok(v) = HeaderValue::from_str(&h)
    {
        copy.headers_mut().insert(header::HOST, v);
    }
    shared.metrics.mirror(&m.cluster, "sent");
    let (conn, state) = (conn.clone(), shared.clone());
    shared.tasks.spawn(async move {
        let _places = (permit, place);
        let sent = crate::http::forward::forward(copy, &conn, &backend, &state);
        // The answer, if any, is dropped unread.
        let _ = tokio::time::timeout(MIRROR_TIMEOUT, sent).await;
    });
}

/// `host[:port]` with `-shadow` after the host.
fn shadow(authority: &str) -> Option<String> {
    let a: hyper::http::uri::Authority = authority.parse().ok()?;
    Some(match a.port_u16() {
        Some(p) => format!("{}-shadow:{p}", a.host()),
        None => format!("{}-shadow", a.host()),
    })
}

/// The rule's deadline for the whole request.
pub fn timeout(route: &Route) -> Option<Duration> {
    route.rule.as_ref().and_then(|r| r.timeout)
}

/// The rule's response edits.
pub fn respond(resp: &mut Response<Body>, route: &Route) {
    if let Some(rule) = &route.rule {
        rule.response_headers.apply(resp.headers_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http_body_util::BodyExt;

    fn empty() -> Body {
        http_body_util::Empty::new().map_err(|never| match never {}).boxed()
    }

    #[test]
    fn header_edits_and_a_prefix_rewrite_change_the_request() {
        let c = Config::parse(
            "clusters:\n- {name: web, endpoints: ['127.0.0.1:1']}\nroutes:\n- cluster: web\n  http:\n  - name: api\n    match: [{path: {prefix: /api}}]\n    backends: [{cluster: web}]\n    rewrite: {uriPrefix: /v2, authority: 'api.example:8080'}\n    requestHeaders: {set: {x-env: prod}, add: {x-tag: b}, remove: [x-drop]}\n    responseHeaders: {set: {x-served: mycel}, remove: [server]}\n  - name: root\n    match: [{path: {prefix: /}}]\n    backends: [{cluster: web}]\n    rewrite: {uriPrefix: /app/}\n",
        )
        .unwrap();
        let state = State::build(c, None);
        let table = state.routes("web").unwrap();
        let request = |uri: &str| {
            Request::builder()
                .uri(uri)
                .header("host", "web")
                .header("x-env", "dev")
                .header("x-tag", "a")
                .header("x-drop", "1")
                .body(empty())
                .unwrap()
        };
        let mut req = request("/api/items?id=3");
        let (rule, prefix) = table.select(&req).unwrap();
        let route = Route {
            backend: state.cluster("web").unwrap().clone(),
            rule: Some(rule.clone()),
            matched_prefix: prefix,
        };
        filters(&mut req, &route);
        assert_eq!(req.uri(), "/v2/items?id=3");
        assert_eq!(req.headers()["host"], "api.example:8080");
        assert_eq!(req.headers()["x-env"], "prod", "set replaces");
        let tags: Vec<_> = req.headers().get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"], "add appends");
        assert!(req.headers().get("x-drop").is_none(), "remove removes");
        let mut resp = Response::new(empty());
        resp.headers_mut().insert("server", HeaderValue::from_static("app"));
        respond(&mut resp, &route);
        assert_eq!(resp.headers()["x-served"], "mycel");
        assert!(resp.headers().get("server").is_none());
        // `/` → `/app/` on `/x` gives `/app/x`.
        let mut req = request("/x");
        let (rule, prefix) = table.select(&req).unwrap();
        let route =
            Route { backend: route.backend.clone(), rule: Some(rule.clone()), matched_prefix: prefix };
        filters(&mut req, &route);
        assert_eq!(req.uri(), "/app/x");
    }

    #[test]
    fn a_path_prefix_matches_whole_elements_and_rewrites_replace_the_prefix_or_the_whole_path() {
        let c = Config::parse(
            "clusters:\n- {name: web, endpoints: ['127.0.0.1:1']}\nroutes:\n- cluster: web\n  http:\n  - name: api\n    match: [{path: {pathPrefix: /api/}}]\n    backends: [{cluster: web}]\n    rewrite: {uriPrefix: /}\n  - name: full\n    match: [{path: {pathPrefix: /old}}]\n    backends: [{cluster: web}]\n    rewrite: {path: /new/place}\n",
        )
        .unwrap();
        let state = State::build(c, None);
        let table = state.routes("web").unwrap();
        let run = |uri: &str| {
            let mut req = Request::builder().uri(uri).header("host", "web").body(empty()).unwrap();
            let (rule, prefix) = table.select(&req)?;
            let name = rule.name.to_string();
            let route = Route {
                backend: state.cluster("web").unwrap().clone(),
                rule: Some(rule.clone()),
                matched_prefix: prefix,
            };
            filters(&mut req, &route);
            Some((name, req.uri().to_string()))
        };
        let got = |uri: &str| run(uri).map(|(n, u)| format!("{n} {u}"));
        assert_eq!(got("/api").as_deref(), Some("api /"), "a trailing / of the prefix is ignored");
        assert_eq!(got("/api/items?id=3").as_deref(), Some("api /items?id=3"));
        assert_eq!(got("/apis"), None, "not a whole element");
        assert_eq!(got("/old/x?y=1").as_deref(), Some("full /new/place?y=1"), "the query is kept");
        assert_eq!(got("/older"), None);
    }

    #[test]
    fn redirects_replace_the_parts_given_and_direct_responses_answer_in_place() {
        let c = Config::parse(
            "clusters:\n- {name: web, endpoints: ['127.0.0.1:1']}\nroutes:\n- cluster: web\n  http:\n  - name: moved\n    match: [{path: {prefix: /old}}]\n    redirect: {prefix: /new, code: 308}\n  - name: secure\n    match: [{path: {prefix: /login}}]\n    redirect: {scheme: https, host: auth.example}\n  - name: page\n    match: [{path: {exact: /page}}]\n    redirect: {path: /other, port: 8443}\n  - name: gone\n    directResponse: {status: 410, body: gone for good}\n",
        )
        .unwrap();
        let state = State::build(c, None);
        let conn = crate::context::Conn {
            direction: crate::config::Direction::Outbound,
            labels: crate::telemetry::ListenerLabels {
                listener: "l".into(),
                direction: "outbound".into(),
                protocol: "http".into(),
            },
            protocol: crate::config::Protocol::Http,
            detect_timeout: Duration::from_millis(1),
            limits: Default::default(),
            peer: None,
            target: crate::context::Target::Cluster("web".into()),
            peer_id: None,
        };
        let answer = |uri: &str| {
            let req = Request::builder().uri(uri).header("host", "web:8080").body(empty()).unwrap();
            match route(&req, &conn, &state) {
                Err(e) => e.into_response(),
                Ok(_) => panic!("{uri} was routed"),
            }
        };
        let r = answer("/old/a?x=1");
        assert_eq!(r.status(), 308);
        assert_eq!(r.headers()["location"], "http://web:8080/new/a?x=1");
        assert!(r.headers().get(crate::error::ERROR_HEADER).is_none(), "not an error");
        let r = answer("/login");
        assert_eq!(r.status(), 301, "the default code");
        assert_eq!(r.headers()["location"], "https://auth.example/login", "a new scheme drops the port");
        assert_eq!(answer("/page?q").headers()["location"], "http://web:8443/other?q");
        // A scheme given but unchanged keeps the port; a host given replaces the authority.
        let state2 = State::build(
            Config::parse("clusters:\n- {name: web, endpoints: ['127.0.0.1:1']}\nroutes:\n- cluster: web\n  http:\n  - name: same\n    match: [{path: {prefix: /same}}]\n    redirect: {scheme: http, path: /x}\n  - name: away\n    redirect: {host: auth.example}\n").unwrap(),
            None,
        );
        let answer2 = |uri: &str| {
            let req = Request::builder().uri(uri).header("host", "web:8080").body(empty()).unwrap();
            route(&req, &conn, &state2).err().expect("an answer").into_response()
        };
        assert_eq!(answer2("/same").headers()["location"], "http://web:8080/x");
        assert_eq!(answer2("/y").headers()["location"], "http://auth.example/y");
        let r = answer("/anything");
        assert_eq!(r.status(), 410);
        assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    }
}
