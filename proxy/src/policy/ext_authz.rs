//! AuthorizationPolicy action CUSTOM: the request (or connection) is put to an external
//! authorizer over Envoy's external authorization gRPC API (`envoy.service.auth.v3.Authorization/
//! Check`), before any DENY or ALLOW policy is evaluated — so OPA's Envoy plugin, or any server
//! written for Envoy, decides for a Mycel sidecar unchanged.
//!
//! The authorizer is reached in plaintext gRPC at the provider's address, one HTTP/2 connection
//! per provider, within the provider's timeout; without an answer in time (or with an error) the
//! provider's `failOpen` decides. Its answer is bounded: 64 KiB, 64 header changes, and only
//! headers that are valid and not the mesh's own (the verified caller, `x-mycel-*`) are applied.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use hyper::{
    HeaderMap, Request, StatusCode,
    body::Bytes,
    header::{HeaderName, HeaderValue},
};
use mycel_api::envoy::{
    config::core::v3 as core,
    service::auth::v3::{self as auth, authorization_client::AuthorizationClient},
};
use tonic::transport::{Channel, Endpoint};

use crate::{config::authz::ExtAuthzProvider, http::Body};

/// The largest answer read from an authorizer.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The most header changes of one answer that are applied (the rest are left out).
pub const MAX_HEADER_CHANGES: usize = 64;
/// The most authorizers a proxy keeps a connection to.
const MAX_CLIENTS: usize = 32;

/// A client of one authorizer.
pub struct Client {
    grpc: AuthorizationClient<Channel>,
    timeout: Duration,
}

impl Client {
    /// A client that connects on first use, and again after a failure.
    pub fn new(p: &ExtAuthzProvider) -> Result<Client, String> {
        let timeout = Duration::from_millis(p.timeout_ms.clamp(1, 30_000));
        let channel = Endpoint::from_shared(format!("http://{}", p.address))
            .map_err(|e| format!("provider {}: address {:?}: {e}", p.name, p.address))?
            .connect_timeout(timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        let grpc = AuthorizationClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
        Ok(Client { grpc, timeout })
    }

    /// The authorizer's answer, or why there is none (within the provider's timeout).
    pub async fn check(&self, request: auth::CheckRequest) -> Result<auth::CheckResponse, String> {
        let mut grpc = self.grpc.clone();
        let mut req = tonic::Request::new(request);
        req.set_timeout(self.timeout);
        match tokio::time::timeout(self.timeout, grpc.check(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
            Err(_) => Err(format!("no decision within {:?}", self.timeout)),
        }
    }
}

/// The clients of the authorizers the policies name, made on first use.
#[derive(Default)]
pub struct Clients(std::sync::Mutex<HashMap<ExtAuthzProvider, Arc<Client>>>);

impl Clients {
    pub fn get(&self, p: &ExtAuthzProvider) -> Result<Arc<Client>, String> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(p) {
            return Ok(c.clone());
        }
        if map.len() >= MAX_CLIENTS {
            // Providers were replaced more often than policies name them: start over.
            map.clear();
        }
        let c = Arc::new(Client::new(p)?);
        map.insert(p.clone(), c.clone());
        Ok(c)
    }
}

/// What the request is, as the authorizer is told it.
pub struct Asked<'a> {
    pub source: Option<SocketAddr>,
    /// The caller's SPIFFE ID (`spiffe://…`), when it proved one.
    pub source_principal: Option<&'a str>,
    pub destination: Option<SocketAddr>,
    pub destination_principal: Option<&'a str>,
    /// `None` for a connection that is not HTTP.
    pub http: Option<&'a Request<Body>>,
}

fn peer(addr: Option<SocketAddr>, principal: Option<&str>) -> auth::attribute_context::Peer {
    auth::attribute_context::Peer {
        address: addr.map(|a| core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                protocol: core::socket_address::Protocol::Tcp as i32,
                address: a.ip().to_string(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(a.port()))),
            })),
        }),
        principal: principal.unwrap_or_default().to_string(),
        ..Default::default()
    }
}

/// The Check request: as Envoy's ext_authz filter builds it (lower-case header names, values of
/// a repeated header joined with `,`, the pseudo-headers `:authority`, `:method`, `:path` and
/// `:scheme` among them; the path with its query; the size from `content-length` or -1).
pub fn check_request(a: &Asked) -> auth::CheckRequest {
    let request = a.http.map(|r| {
        let path = r.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        let host = r
            .uri()
            .authority()
            .map(|x| x.as_str().to_string())
            .or_else(|| {
                r.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
            })
            .unwrap_or_default();
        let mut headers: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        for (name, value) in r.headers() {
            let v = String::from_utf8_lossy(value.as_bytes());
            headers
                .entry(name.as_str().to_string())
                .and_modify(|e| {
                    e.push(',');
                    e.push_str(&v);
                })
                .or_insert_with(|| v.into_owned());
        }
        headers.insert(":authority".into(), host.clone());
        headers.insert(":method".into(), r.method().as_str().to_string());
        headers.insert(":path".into(), path.clone());
        headers.insert(":scheme".into(), "http".into());
        let size = r
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1);
        auth::attribute_context::Request {
            http: Some(auth::attribute_context::HttpRequest {
                id: r
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                method: r.method().as_str().to_string(),
                headers,
                path,
                host,
                scheme: "http".into(),
                size,
                protocol: match r.version() {
                    hyper::Version::HTTP_2 => "HTTP/2",
                    hyper::Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                }
                .into(),
                ..Default::default()
            }),
        }
    });
    auth::CheckRequest {
        attributes: Some(auth::AttributeContext {
            source: Some(peer(a.source, a.source_principal)),
            destination: Some(peer(a.destination, a.destination_principal)),
            request,
            ..Default::default()
        }),
    }
}

/// A header change of an answer: set (replacing), append, add when absent, or replace when
/// present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Overwrite,
    Append,
    AddIfAbsent,
    OverwriteIfExists,
}

/// The authorizer's verdict, its headers checked.
#[derive(Debug)]
pub enum Verdict {
    /// Go on, with these changes to the request's headers and these headers on the response.
    Allowed {
        set: Vec<(HeaderName, HeaderValue, Change)>,
        remove: Vec<HeaderName>,
        response: Vec<(HeaderName, HeaderValue, Change)>,
    },
    /// Refused with this response.
    Denied { status: StatusCode, headers: Vec<(HeaderName, HeaderValue, Change)>, body: Bytes },
}

/// Headers an authorizer may not set or remove: the caller's identity (only this proxy states
/// it), the mesh's own headers, and those that frame the message.
fn protected(name: &HeaderName) -> bool {
    let n = name.as_str();
    n == crate::http::headers::FORWARDED_CLIENT_CERT
        || n.starts_with("x-mycel-")
        || matches!(
            n,
            "host" | "content-length" | "transfer-encoding" | "connection" | "upgrade" | "te" | "keep-alive"
        )
}

fn changes(
    options: &[core::HeaderValueOption],
    budget: &mut usize,
) -> Vec<(HeaderName, HeaderValue, Change)> {
    let mut out = Vec::new();
    for o in options {
        let Some(h) = &o.header else { continue };
        if *budget == 0 {
            break;
        }
        let value = if h.raw_value.is_empty() { h.value.as_bytes() } else { &h.raw_value };
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(h.key.as_bytes()), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        if protected(&name) || (value.is_empty() && !o.keep_empty_value) {
            continue;
        }
        // In ext_authz answers `append` defaults to false (replace); an explicit one wins over
        // `append_action`.
        let change = match (&o.append, o.append_action) {
            (Some(b), _) if b.value => Change::Append,
            (Some(_), _) | (None, 0) | (None, 2) => Change::Overwrite,
            (None, 1) => Change::AddIfAbsent,
            (None, 3) => Change::OverwriteIfExists,
            (None, _) => Change::Overwrite,
        };
        *budget -= 1;
        out.push((name, value, change));
    }
    out
}

/// What an answer says: OK allows (with its header changes), anything else denies (with its
/// response, or 403).
pub fn verdict(r: auth::CheckResponse) -> Verdict {
    let mut budget = MAX_HEADER_CHANGES;
    let ok = r.status.as_ref().is_none_or(|s| s.code == 0);
    match (ok, r.http_response) {
        (true, Some(auth::check_response::HttpResponse::OkResponse(o))) => {
            let set = changes(&o.headers, &mut budget);
            let response = changes(&o.response_headers_to_add, &mut budget);
            let remove = o
                .headers_to_remove
                .iter()
                .take(MAX_HEADER_CHANGES)
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .filter(|n| !protected(n))
                .collect();
            Verdict::Allowed { set, remove, response }
        }
        (true, _) => Verdict::Allowed { set: Vec::new(), remove: Vec::new(), response: Vec::new() },
        (false, Some(auth::check_response::HttpResponse::DeniedResponse(d))) => {
            let status = d
                .status
                .and_then(|s| u16::try_from(s.code).ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .filter(|c| c.as_u16() >= 200)
                .unwrap_or(StatusCode::FORBIDDEN);
            let headers = changes(&d.headers, &mut budget);
            Verdict::Denied { status, headers, body: Bytes::from(d.body) }
        }
        (false, _) => {
            Verdict::Denied { status: StatusCode::FORBIDDEN, headers: Vec::new(), body: Bytes::new() }
        }
    }
}

/// Applies header changes to a header map.
pub fn apply(headers: &mut HeaderMap, changes: &[(HeaderName, HeaderValue, Change)]) {
    for (name, value, change) in changes {
        match change {
            Change::Overwrite => {
                headers.insert(name.clone(), value.clone());
            }
            Change::Append => {
                headers.append(name.clone(), value.clone());
            }
            Change::AddIfAbsent => {
                if !headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
            Change::OverwriteIfExists => {
                if headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(key: &str, value: &str, append: Option<bool>, action: i32) -> core::HeaderValueOption {
        core::HeaderValueOption {
            header: Some(core::HeaderValue { key: key.into(), value: value.into(), raw_value: Vec::new() }),
            append: append.map(|value| core::BoolValue { value }),
            append_action: action,
            keep_empty_value: false,
        }
    }

    #[test]
    fn answers_read_as_envoy_reads_them_and_cannot_touch_the_mesh_headers() {
        let ok = auth::CheckResponse {
            status: Some(mycel_api::google::rpc::Status { code: 0, message: String::new() }),
            http_response: Some(auth::check_response::HttpResponse::OkResponse(auth::OkHttpResponse {
                headers: vec![
                    option("x-user", "alice", None, 0),
                    option("x-tag", "b", Some(true), 0),
                    option("x-forwarded-client-cert", "By=evil", None, 0),
                    option("x-mycel-error", "UF x", None, 0),
                    option("bad header", "v", None, 0),
                    option("x-once", "v", None, 1),
                ],
                headers_to_remove: vec!["authorization".into(), "host".into()],
                response_headers_to_add: vec![option("x-checked", "yes", None, 0)],
            })),
        };
        let Verdict::Allowed { set, remove, response } = verdict(ok) else { panic!("allowed") };
        let names: Vec<&str> = set.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["x-user", "x-tag", "x-once"],
            "the identity and mesh headers are not the authorizer's"
        );
        assert_eq!(remove, [HeaderName::from_static("authorization")], "host stays");
        assert_eq!(response.len(), 1);
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("mallory"));
        h.insert("x-tag", HeaderValue::from_static("a"));
        h.insert("x-once", HeaderValue::from_static("first"));
        apply(&mut h, &set);
        assert_eq!(h.get("x-user").unwrap(), "alice", "append unset replaces");
        assert_eq!(h.get_all("x-tag").iter().count(), 2, "append: true appends");
        assert_eq!(h.get("x-once").unwrap(), "first", "ADD_IF_ABSENT leaves a present one");

        let denied = auth::CheckResponse {
            status: Some(mycel_api::google::rpc::Status { code: 7, message: "no".into() }),
            http_response: Some(auth::check_response::HttpResponse::DeniedResponse(
                auth::DeniedHttpResponse {
                    status: Some(mycel_api::envoy::r#type::v3::HttpStatus { code: 401 }),
                    headers: vec![option("www-authenticate", "Basic", None, 0)],
                    body: "who are you".into(),
                },
            )),
        };
        let Verdict::Denied { status, headers, body } = verdict(denied) else { panic!("denied") };
        assert_eq!((status, headers.len(), &body[..]), (StatusCode::UNAUTHORIZED, 1, &b"who are you"[..]));
        let bare = auth::CheckResponse {
            status: Some(mycel_api::google::rpc::Status { code: 16, message: String::new() }),
            http_response: None,
        };
        assert!(matches!(verdict(bare), Verdict::Denied { status: StatusCode::FORBIDDEN, .. }));
        let many = auth::CheckResponse {
            status: None,
            http_response: Some(auth::check_response::HttpResponse::OkResponse(auth::OkHttpResponse {
                headers: (0..200).map(|i| option(&format!("x-h{i}"), "v", None, 0)).collect(),
                ..Default::default()
            })),
        };
        let Verdict::Allowed { set, .. } = verdict(many) else { panic!("allowed") };
        assert_eq!(set.len(), MAX_HEADER_CHANGES, "bounded");
    }

    #[test]
    fn the_check_request_carries_what_envoy_sends() {
        let req = Request::builder()
            .method("POST")
            .uri("/api/items?x=1")
            .header("host", "web.shop:8080")
            .header("x-a", "1")
            .header("x-a", "2")
            .header("content-length", "3")
            .body(crate::http::empty())
            .unwrap();
        let a = Asked {
            source: Some("10.0.0.1:5555".parse().unwrap()),
            source_principal: Some("spiffe://cluster.local/ns/shop/sa/client"),
            destination: Some("10.0.0.2:8080".parse().unwrap()),
            destination_principal: Some("spiffe://cluster.local/ns/shop/sa/web"),
            http: Some(&req),
        };
        let c = check_request(&a);
        let attrs = c.attributes.unwrap();
        assert_eq!(attrs.source.unwrap().principal, "spiffe://cluster.local/ns/shop/sa/client");
        let http = attrs.request.unwrap().http.unwrap();
        assert_eq!(
            (http.method.as_str(), http.path.as_str(), http.host.as_str()),
            ("POST", "/api/items?x=1", "web.shop:8080")
        );
        assert_eq!(http.headers["x-a"], "1,2");
        assert_eq!(http.headers[":path"], "/api/items?x=1");
        assert_eq!((http.size, http.protocol.as_str()), (3, "HTTP/1.1"));
    }
}
