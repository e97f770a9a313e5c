//! The key-set fetcher: for every `jwksUri` the RequestAuthentications name (the model publishes
//! the set), one task fetches it and reports each outcome as a [`Change::Jwks`] into the model's
//! stream. Proxies never fetch keys; they receive them with their policy.
//!
//! A URI is hostile input: a fetch is bounded in time (the rule's `timeout`), in size
//! ([`MAX_BYTES`]), follows no redirects, never goes to a loopback, link-local (cloud metadata),
//! unspecified or multicast address ([`forbidden`]), and one slow or failing server delays only
//! its own task. A key set is fetched again when its `Cache-Control: max-age` says (clamped to
//! [`MIN_REFRESH`]..[`MAX_REFRESH`]), after [`DEFAULT_REFRESH`] without one, and sooner after a
//! failure (backing off from [`RETRY_FIRST`] to [`RETRY_MAX`]); the model keeps the last good set.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::channel::mpsc::UnboundedSender;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{HttpConnector, dns::Name},
    },
    rt::TokioExecutor,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, warn};

use super::discovery::Change;
use super::translate::authn::key_set_error;

/// The largest key set accepted.
pub const MAX_BYTES: usize = 64 * 1024;
/// Bounds of a refresh interval a server's `max-age` may ask for.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// The refresh interval without `max-age`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(600);
pub const RETRY_FIRST: Duration = Duration::from_secs(2);
pub const RETRY_MAX: Duration = Duration::from_secs(120);
/// The most key sets fetched at once, over the whole mesh (each namespace has its own quota
/// too, `MAX_URIS_PER_NAMESPACE`); URIs beyond it are reported failed.
pub const MAX_URIS: usize = 1024;

/// Addresses the control plane never fetches from: its own host's (loopback), link-local (cloud
/// metadata services), unspecified and multicast ones.
pub fn forbidden(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            a.is_loopback() || a.is_link_local() || a.is_unspecified() || a.is_multicast() || a.is_broadcast()
        }
        IpAddr::V6(a) => {
            a.is_loopback() || a.is_unspecified() || a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

const FORBIDDEN: &str =
    "loopback, link-local, unspecified or multicast addresses, which the control plane does not fetch from";

/// A DNS resolver that leaves out [`forbidden`] addresses (so that a name cannot lead a fetch
/// there), and fails when nothing else is left. `allow_loopback` only in tests.
#[derive(Clone, Default)]
pub struct SafeResolver {
    allow_loopback: bool,
}

impl tower_service::Service<Name> for SafeResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_loopback = self.allow_loopback;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allowed: Vec<SocketAddr> =
                all.filter(|a| !forbidden(a.ip()) || (allow_loopback && a.ip().is_loopback())).collect();
            if allowed.is_empty() {
                return Err(std::io::Error::other(format!("{host} resolves only to {FORBIDDEN}")));
            }
            Ok(allowed.into_iter())
        })
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector<SafeResolver>>, Empty<Bytes>>;

/// An HTTP(S) client for key sets, trusting the system's root certificates (none when the image
/// has none: HTTPS fetches then fail, naming why).
#[derive(Clone)]
pub struct Fetcher {
    client: HttpClient,
    allow_loopback: bool,
}

impl Fetcher {
    pub fn new() -> Fetcher {
        Fetcher::with(false)
    }

    fn with(allow_loopback: bool) -> Fetcher {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            warn!("no trusted root certificates found: jwksUri over https will fail (set SSL_CERT_FILE)");
        }
        let tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut http = HttpConnector::new_with_resolver(SafeResolver { allow_loopback });
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Fetcher { client: Client::builder(TokioExecutor::new()).build(https), allow_loopback }
    }

    /// Fetches one key set: its text and when to fetch it again, or why there is none.
    pub async fn fetch(&self, uri: &str, timeout: Duration) -> Result<(String, Duration), String> {
        let parsed: hyper::Uri = uri.parse().map_err(|e| format!("not a URI: {e}"))?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) {
            return Err("only http and https URIs are fetched".into());
        }
        // A literal address is not resolved: it is checked here.
        let host = parsed.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>()
            && forbidden(ip)
            && !(self.allow_loopback && ip.is_loopback())
        {
            return Err(format!("{ip} is one of the {FORBIDDEN}"));
        }
        let req = hyper::Request::get(parsed)
            .header(hyper::header::ACCEPT, "application/json, application/jwk-set+json")
            .header(hyper::header::USER_AGENT, "mycel-control-plane")
            .body(Empty::new())
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let work = async {
            let resp = self.client.request(req).await.map_err(|e| format!("cannot fetch: {}", chain(&e)))?;
            let status = resp.status();
            if status.is_redirection() {
                return Err(format!("answered {status}: redirects are not followed; name the final URI"));
            }
            if status != hyper::StatusCode::OK {
                return Err(format!("answered {status}"));
            }
            let refresh = refresh_of(resp.headers());
            let body = Limited::new(resp.into_body(), MAX_BYTES)
                .collect()
                .await
                .map_err(|e| format!("cannot read the key set (at most {MAX_BYTES} bytes): {e}"))?
                .to_bytes();
            let text =
                String::from_utf8(body.to_vec()).map_err(|_| "the key set is not UTF-8".to_string())?;
            if let Some(e) = key_set_error(&text) {
                return Err(e);
            }
            Ok((text, refresh))
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(format!("no complete answer within {timeout:?}")),
        }
    }
}

impl Default for Fetcher {
    fn default() -> Self {
        Fetcher::new()
    }
}

/// An error with its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// When to fetch again, from `Cache-Control: max-age`.
fn refresh_of(headers: &hyper::HeaderMap) -> Duration {
    let max_age = headers
        .get_all(hyper::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|d| d.trim().strip_prefix("max-age=")?.trim_matches('"').parse::<u64>().ok());
    match max_age {
        Some(s) => Duration::from_secs(s).clamp(MIN_REFRESH, MAX_REFRESH),
        None => DEFAULT_REFRESH,
    }
}

/// Follows the URIs the model wants — (timeout, epoch) by URI — one task each, until the model
/// is gone. A URI whose timeout or epoch changes is followed afresh.
pub async fn run(wanted: watch::Receiver<BTreeMap<String, (Duration, u64)>>, tx: UnboundedSender<Change>) {
    run_with(Fetcher::new(), wanted, tx).await
}

async fn run_with(
    client: Fetcher,
    mut wanted: watch::Receiver<BTreeMap<String, (Duration, u64)>>,
    tx: UnboundedSender<Change>,
) {
    let mut tasks: HashMap<String, ((Duration, u64), JoinHandle<()>)> = HashMap::new();
    loop {
        let want = wanted.borrow_and_update().clone();
        tasks.retain(|uri, (how, task)| {
            let keep = want.get(uri) == Some(how);
            if !keep {
                task.abort();
            }
            keep
        });
        for (uri, (timeout, epoch)) in want {
            if tasks.contains_key(&uri) {
                continue;
            }
            if tasks.len() >= MAX_URIS {
                // Not kept as a task: tried again at the next change.
                let result = Err(format!(
                    "the mesh names more than {MAX_URIS} distinct jwksUris; this one is not fetched"
                ));
                let _ = tx.unbounded_send(Change::Jwks { uri, epoch, result });
                continue;
            }
            let task = tokio::spawn(follow(client.clone(), uri.clone(), timeout, epoch, tx.clone()));
            tasks.insert(uri, ((timeout, epoch), task));
        }
        if wanted.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in tasks {
        task.abort();
    }
}

/// Fetches one URI for as long as it is wanted.
async fn follow(client: Fetcher, uri: String, timeout: Duration, epoch: u64, tx: UnboundedSender<Change>) {
    let mut retry = RETRY_FIRST;
    loop {
        let (result, next) = match client.fetch(&uri, timeout).await {
            Ok((keys, refresh)) => {
                debug!(%uri, bytes = keys.len(), ?refresh, "key set fetched");
                retry = RETRY_FIRST;
                (Ok(keys), refresh)
            }
            Err(e) => {
                warn!(%uri, error = %e, "key set not fetched; the last good one stays in use");
                let next = retry;
                retry = (retry * 2).min(RETRY_MAX);
                (Err(e), next)
            }
        };
        if tx.unbounded_send(Change::Jwks { uri: uri.clone(), epoch, result }).is_err() {
            return;
        }
        tokio::time::sleep(next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::{Response, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;

    const KEYS: &str =
        r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

    /// A server on loopback answering by path: `/keys` (max-age=30), `/moved` (a redirect),
    /// `/big` (over the limit), `/slow` (never answers), `/html` (not a key set).
    async fn server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let r = Response::builder();
                        let r = match req.uri().path() {
                            "/keys" => r.header("cache-control", "public, max-age=30").body(KEYS.to_string()),
                            "/moved" => r.status(302).header("location", "/keys").body(String::new()),
                            "/big" => r.body(format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(MAX_BYTES))),
                            "/slow" => {
                                std::future::pending::<()>().await;
                                unreachable!()
                            }
                            _ => r.body("<html>".to_string()),
                        };
                        Ok::<_, std::convert::Infallible>(
                            r.unwrap().map(|b| http_body_util::Full::new(Bytes::from(b))),
                        )
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn key_sets_are_fetched_within_bounds() {
        let base = server().await;
        let c = Fetcher::with(true);
        let t = Duration::from_secs(5);
        let (keys, refresh) = c.fetch(&format!("{base}/keys"), t).await.unwrap();
        assert_eq!((keys.as_str(), refresh), (KEYS, Duration::from_secs(30)));
        let e = c.fetch(&format!("{base}/moved"), t).await.unwrap_err();
        assert!(e.contains("302") && e.contains("redirects are not followed"), "{e}");
        let e = c.fetch(&format!("{base}/big"), t).await.unwrap_err();
        assert!(e.contains("at most 65536 bytes"), "{e}");
        let e = c.fetch(&format!("{base}/html"), t).await.unwrap_err();
        assert!(e.contains("not a JSON Web Key Set"), "{e}");
        let started = tokio::time::Instant::now();
        let e = c.fetch(&format!("{base}/slow"), Duration::from_millis(300)).await.unwrap_err();
        assert!(e.contains("no complete answer within 300ms"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "the timeout bounds the fetch");
        let e = c.fetch("ftp://keys", t).await.unwrap_err();
        assert!(e.contains("only http and https"), "{e}");
        // Outside tests, never the control plane's own host, nor a metadata service.
        let strict = Fetcher::new();
        let e = strict.fetch(&format!("{base}/keys"), t).await.unwrap_err();
        assert!(e.contains("127.0.0.1 is one of the loopback"), "{e}");
        let e = strict.fetch(&base.replace("127.0.0.1", "localhost"), t).await.unwrap_err();
        assert!(e.contains("localhost resolves only to loopback"), "{e}");
        let e = strict.fetch("http://169.254.169.254/latest", t).await.unwrap_err();
        assert!(e.contains("is one of the loopback, link-local"), "{e}");
        let e = strict.fetch("http://[::ffff:127.0.0.1]:1/", t).await.unwrap_err();
        assert!(e.contains("is one of the"), "{e}");
    }

    #[test]
    fn max_age_is_clamped() {
        let h = |v: &str| {
            let mut m = hyper::HeaderMap::new();
            m.insert(hyper::header::CACHE_CONTROL, v.parse().unwrap());
            refresh_of(&m)
        };
        assert_eq!(h("max-age=1"), MIN_REFRESH);
        assert_eq!(h("no-transform, max-age=120"), Duration::from_secs(120));
        assert_eq!(h("max-age=99999999"), MAX_REFRESH, "at most an hour");
        assert_eq!(h("no-cache"), DEFAULT_REFRESH);
    }

    #[tokio::test]
    async fn the_fetcher_follows_what_the_model_wants() {
        let base = server().await;
        let (want_tx, want_rx) = watch::channel(BTreeMap::new());
        let (tx, mut rx) = futures::channel::mpsc::unbounded();
        tokio::spawn(run_with(Fetcher::with(true), want_rx, tx));
        use futures::StreamExt;
        let uri = format!("{base}/keys");
        want_tx.send_replace(BTreeMap::from([(uri.clone(), (Duration::from_secs(5), 1))]));
        match rx.next().await {
            Some(Change::Jwks { uri: u, epoch: 1, result: Ok(k) }) => {
                assert_eq!((u, k.as_str()), (uri.clone(), KEYS))
            }
            _ => panic!("no key set"),
        }
        // Named again (a new epoch): fetched again at once, not at its next refresh.
        want_tx.send_replace(BTreeMap::from([(uri.clone(), (Duration::from_secs(5), 2))]));
        match rx.next().await {
            Some(Change::Jwks { epoch: 2, result: Ok(_), .. }) => {}
            _ => panic!("not fetched afresh"),
        }
        let bad = format!("{base}/html");
        want_tx.send_replace(BTreeMap::from([(bad.clone(), (Duration::from_secs(5), 3))]));
        match rx.next().await {
            Some(Change::Jwks { uri: u, result: Err(e), .. }) => {
                assert!(u == bad && e.contains("JSON Web Key Set"))
            }
            _ => panic!("no failure reported"),
        }
    }
}
