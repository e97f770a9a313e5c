//! The config stream and the certificate authority, as tonic services.
//!
//! Each proxy stream is its own task: it reads the newest [`Snapshot`], sends what differs from
//! what the proxy has (at most one unacknowledged response per type), and records ACKs and
//! NACKs in the [`Registry`] that `/debug/proxies` and `mycelctl proxy-status` show.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use mycel_api::{
    codec::{SmallBufferCodec, grpc_frame},
    spiffe::SpiffeId,
    v1alpha1::{self as pb, certificates_server::Certificates},
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tonic::{
    Request, Response, Status, Streaming,
    codec::Codec,
    codegen::{Bytes, Service, http},
    metadata::GRPC_CONTENT_TYPE,
    server::NamedService,
};
use tracing::{debug, info, warn};

use super::{
    metrics::{CpMetrics, TypeCounters},
    snapshot::{COLLECTIONS, Collection, Entry, Snapshot, registration},
    tls::Peer,
};
use crate::pki::{Ca, SignError};

/// Audience the proxies' projected tokens are minted for.
pub const TOKEN_AUDIENCE: &str = "mycel-ca";

/// What `proxy-status` shows of one type on one stream.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// System version of the last response sent.
    pub sent: Option<u64>,
    /// System version of the last response the proxy accepted.
    pub acked: Option<u64>,
    pub resources: usize,
    pub pushes: u64,
    pub last_nack: Option<Nack>,
    /// The newest snapshot version whose resources of this type the proxy holds, as its last
    /// ACK says (what `Ready` conditions are computed from).
    pub in_sync: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    pub version: u64,
    pub field: String,
    pub message: String,
    pub at: String,
}

/// One connected proxy.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub pod: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: String,
    pub revision: String,
    pub proxy_version: String,
    /// Its certificate names its pod (so `pod` is proven, not only claimed).
    pub bound: bool,
    pub remote: String,
    pub connected_at: String,
    pub types: BTreeMap<String, TypeStatus>,
}

impl ProxyStatus {
    /// The status of one type (the type name is copied only the first time).
    fn of_type(&mut self, type_url: &str) -> &mut TypeStatus {
        if !self.types.contains_key(type_url) {
            self.types.insert(type_url.to_string(), TypeStatus::default());
        }
        self.types.get_mut(type_url).expect("inserted above")
    }
}

/// Connected proxies, by stream id. Each stream updates its own entry; the registry's lock is
/// only taken to connect, disconnect and list.
#[derive(Default)]
pub struct Registry {
    proxies: Mutex<HashMap<u64, Arc<Mutex<ProxyStatus>>>>,
    /// Woken when a proxy's `in_sync` moves or a proxy disconnects (the status writer waits on
    /// it).
    pub changed: tokio::sync::Notify,
    /// Open streams per identity (one identity's replicas share it).
    per_identity: Mutex<HashMap<String, usize>>,
    next: AtomicU64,
}

impl Registry {
    pub fn list(&self) -> Vec<ProxyStatus> {
        let entries: Vec<Arc<Mutex<ProxyStatus>>> =
            self.proxies.lock().map(|p| p.values().cloned().collect()).unwrap_or_default();
        let mut v: Vec<ProxyStatus> =
            entries.iter().filter_map(|e| e.lock().ok().map(|s| s.clone())).collect();
        v.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
        v
    }
}

/// Changes a stream's own entry in the [`Registry`].
fn update(status: &Mutex<ProxyStatus>, f: impl FnOnce(&mut ProxyStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

/// What a proxy says of a rejection, kept to at most this many bytes.
const NACK_TEXT: usize = 256;

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut: text a
/// pod sent is kept short where it is shown, logged or written to a status.
pub(super) fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// The config-stream service.
#[derive(Clone)]
pub struct Discovery {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<CpMetrics>,
    pub trust_domain: String,
    /// Slots for full syncs in flight ([`FULL_SYNCS`]).
    pub full_syncs: Arc<FullSyncs>,
    pub limits: StreamLimits,
}

/// The full-sync slots, as leases that expire on their own. A stream's logic runs only when
/// hyper polls its response body, and a client that never opens its HTTP/2 window is never
/// polled again: a deadline checked by the stream itself would never fire. So a reaper task of
/// its own takes back every slot whose holder has not been heard from (an ACK or a NACK renews
/// the lease) for the ACK timeout, and the stream, when it runs again, ends.
pub struct FullSyncs {
    slots: Arc<tokio::sync::Semaphore>,
    expiring: mpsc::UnboundedSender<std::sync::Weak<Mutex<Lease>>>,
    timeout: Duration,
}

/// One held slot: the permit (taken back on expiry) and when it expires.
pub struct Lease {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    until: tokio::time::Instant,
}

/// A stream's handle on its lease.
type Held = Arc<Mutex<Lease>>;

impl FullSyncs {
    /// `n` slots, each taken back `timeout` after its holder was last heard from. Spawns the
    /// reaper, which ends with the last handle.
    pub fn new(n: usize, timeout: Duration) -> Arc<FullSyncs> {
        let (expiring, mut rx) = mpsc::unbounded_channel::<std::sync::Weak<Mutex<Lease>>>();
        tokio::spawn(async move {
            // Leases in the order they were taken; each is looked at when it is due and put
            // back if it was renewed meanwhile.
            let mut queue: std::collections::VecDeque<(tokio::time::Instant, std::sync::Weak<Mutex<Lease>>)> =
                Default::default();
            loop {
                let next = queue.front().map(|(at, _)| *at);
                tokio::select! {
                    got = rx.recv() => match got {
                        Some(w) => {
                            let at = w.upgrade().and_then(|l| l.lock().ok().map(|l| l.until));
                            if let Some(at) = at {
                                let i = queue.partition_point(|(t, _)| *t <= at);
                                queue.insert(i, (at, w));
                            }
                        }
                        None => return,
                    },
                    _ = tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)), if next.is_some() => {
                        let Some((_, w)) = queue.pop_front() else { continue };
                        let Some(lease) = w.upgrade() else { continue };
                        let Ok(mut l) = lease.lock() else { continue };
                        if l.permit.is_none() {
                            continue;
                        }
                        if l.until <= tokio::time::Instant::now() {
                            l.permit = None;
                        } else {
                            let at = l.until;
                            drop(l);
                            let i = queue.partition_point(|(t, _)| *t <= at);
                            queue.insert(i, (at, std::sync::Arc::downgrade(&lease)));
                        }
                    }
                }
            }
        });
        Arc::new(FullSyncs { slots: Arc::new(tokio::sync::Semaphore::new(n)), expiring, timeout })
    }

    /// Waits for a slot.
    async fn acquire(&self) -> Option<Held> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        let held = Arc::new(Mutex::new(Lease {
            permit: Some(permit),
            until: tokio::time::Instant::now() + self.timeout,
        }));
        let _ = self.expiring.send(Arc::downgrade(&held));
        Some(held)
    }

    /// The holder was heard from: the lease runs for another timeout.
    fn renew(&self, held: &Held) {
        if let Ok(mut l) = held.lock() {
            l.until = tokio::time::Instant::now() + self.timeout;
        }
    }
}

/// Whether the reaper took a stream's slot back.
fn revoked(held: &Option<Held>) -> bool {
    held.as_ref().is_some_and(|h| h.lock().map(|l| l.permit.is_none()).unwrap_or(true))
}

/// What one proxy may take of the control plane, so that none can stall the others.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// A response unacknowledged this long ends its stream (the proxy reconnects and resumes):
    /// a stream that never answers cannot keep a full-sync slot, or its share of memory, forever.
    pub ack_timeout: Duration,
    /// Open streams of one identity (all replicas of a workload share theirs).
    pub streams_per_identity: usize,
    /// Names in one request's `subscribe`, `unsubscribe` and `initial_versions`, each.
    pub names_per_request: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            ack_timeout: Duration::from_secs(60),
            streams_per_identity: 2048,
            names_per_request: 100_000,
        }
    }
}

/// How many full syncs may be unacknowledged at once.
pub const FULL_SYNCS: usize = 32;

/// Resources in one response at most: a full sync of a large mesh goes out in parts, one after
/// the other's acknowledgement, so that no stream holds a buffer the size of the mesh.
pub const MAX_RESOURCES_PER_RESPONSE: usize = 32;

/// What a proxy has (or was just sent) of one type, name → version. Right after a push to a
/// wildcard subscriber it is exactly that snapshot's map, shared with every proxy at the same
/// version: a proxy in sync costs a pointer, not a copy of the mesh.
enum Known {
    Shared(Arc<HashMap<String, Arc<Entry>>>),
    Own(HashMap<String, String>),
}

impl Known {
    fn version(&self, name: &str) -> Option<&str> {
        match self {
            Known::Shared(m) => m.get(name).map(|e| e.version.as_str()),
            Known::Own(m) => m.get(name).map(String::as_str),
        }
    }

    fn len(&self) -> usize {
        match self {
            Known::Shared(m) => m.len(),
            Known::Own(m) => m.len(),
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            Known::Shared(m) => m.keys().cloned().collect(),
            Known::Own(m) => m.keys().cloned().collect(),
        }
    }

    fn own(&mut self) -> &mut HashMap<String, String> {
        if let Known::Shared(m) = self {
            *self = Known::Own(m.iter().map(|(n, e)| (n.clone(), e.version.clone())).collect());
        }
        match self {
            Known::Own(m) => m,
            Known::Shared(_) => unreachable!("just made own"),
        }
    }
}

/// Per-type state of one stream.
struct TypeState {
    wildcard: bool,
    names: std::collections::HashSet<String>,
    known: Known,
    /// Held from the first part of a full sync until its last is acknowledged (see
    /// [`FULL_SYNCS`]).
    permit: Option<Held>,
    /// Snapshot version the proxy was last brought up to.
    synced: u64,
    /// The last response carried only part of what differed ([`MAX_RESOURCES_PER_RESPONSE`]):
    /// the next one compares everything again.
    incomplete: bool,
    /// Where the next part of a sync in progress starts: the snapshot version it was computed
    /// from and the last name sent (parts go in name order).
    cursor: Option<(u64, String)>,
    first_sent: bool,
    /// Nonce and system version of the unacknowledged response.
    pending: Option<(String, u64)>,
    /// When that response went out.
    pending_since: Option<tokio::time::Instant>,
    /// The last answer was a NACK: the proxy kept older config than what it was sent.
    nacked: bool,
    /// What the registry was last told of [`TypeStatus::in_sync`].
    in_sync: Option<u64>,
    counters: TypeCounters,
}

/// Boxed responses: a channel allocates its slots 32 at a time, and one per proxy adds up (32
/// pointers instead of 32 responses).
type Outgoing = Box<pb::DeltaResponse>;

/// The `ConfigDiscovery` service, served without tonic's response encoder.
///
/// tonic encodes a stream's responses into one buffer per stream, and that buffer keeps the
/// capacity of the largest response it ever held (16 KiB once a full sync went through) for the
/// life of the stream. A control plane holds one stream per proxy: at 5 000 proxies that was
/// 80 MiB of idle buffers. Here each response is encoded into a frame of exactly its size, freed
/// once written. Requests are still decoded by tonic. The response body also drives the stream
/// (see [`Responses`]), so a stream costs no task of its own.
#[derive(Clone)]
pub struct DiscoveryService(pub Discovery);

impl NamedService for DiscoveryService {
    const NAME: &'static str = pb::config_discovery_server::SERVICE_NAME;
}

/// The service's one method.
const STREAM_PATH: &str = "/mycel.v1alpha1.ConfigDiscovery/Stream";
/// Largest request message accepted (an `initial_versions` of 20 000 clusters is about 2 MiB).
const MAX_REQUEST_BYTES: usize = 4 << 20;

impl Service<http::Request<tonic::body::Body>> for DiscoveryService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != STREAM_PATH {
                let msg = format!(
                    "{} has no method {}",
                    pb::config_discovery_server::SERVICE_NAME,
                    req.uri().path()
                );
                return Ok(Status::unimplemented(msg).into_http());
            }
            if let Some(enc) = req.headers().get("grpc-encoding").filter(|e| *e != "identity") {
                let msg =
                    format!("grpc-encoding {enc:?}: the config stream is not compressed; send identity");
                return Ok(Status::unimplemented(msg).into_http());
            }
            let peer = req.extensions().get::<Peer>().cloned();
            let decoder = SmallBufferCodec::<pb::DeltaResponse, pb::DeltaRequest>::default().decoder();
            let inbound = Streaming::new_request(decoder, req.into_body(), None, Some(MAX_REQUEST_BYTES));
            Ok(match this.open(peer, inbound).await {
                Ok(body) => {
                    let mut res = http::Response::new(tonic::body::Body::new(body));
                    res.headers_mut().insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
                    res
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// A stream's response body: each response its own gRPC frame, then the stream's status as
/// trailers.
///
/// It drives the stream as well: polling it polls `driver` ([`Discovery::serve`]), which reads
/// the proxy's requests, watches the snapshots and queues responses in `rx`. hyper already runs
/// each HTTP/2 stream's body in a task of its own; a second task per proxy would only add a
/// hand-off per response and its memory.
struct Responses {
    driver: Option<BoxFuture<'static, Result<(), Status>>>,
    rx: mpsc::Receiver<Outgoing>,
    /// How the driver ended, once it has.
    end: Option<Status>,
    done: bool,
    connected: Connected,
}

impl http_body::Body for Responses {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        // The stream first: it may read a request, queue a response or end.
        if let Some(driver) = self.driver.as_mut()
            && let Poll::Ready(result) = driver.as_mut().poll(cx)
        {
            if let Err(e) = result {
                debug!(pod = %self.connected.pod, error = %e, "stream ended");
                self.end = Some(e);
            }
            // Its sender goes with it: what it queued is still read, then the channel ends.
            self.driver = None;
        }
        if let Some(resp) = std::task::ready!(self.rx.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(http_body::Frame::data(grpc_frame(&*resp)))));
        }
        let status = self.end.take().unwrap_or_else(|| Status::ok(""));
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert(Status::GRPC_STATUS, (status.code() as i32).into());
        }
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A registered proxy; dropping it (the stream ended or the proxy went away) unregisters it.
struct Connected {
    registry: Arc<Registry>,
    metrics: Arc<CpMetrics>,
    id: u64,
    pod: String,
    identity: String,
}

impl Drop for Connected {
    fn drop(&mut self) {
        if let Ok(mut p) = self.registry.proxies.lock() {
            p.remove(&self.id);
        }
        if let Ok(mut counts) = self.registry.per_identity.lock()
            && let Some(n) = counts.get_mut(&self.identity)
        {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.identity);
            }
        }
        self.metrics.connected.dec();
        self.registry.changed.notify_one();
        info!(pod = %self.pod, "proxy disconnected");
    }
}

impl Discovery {
    /// Checks a new stream's first request against the client certificate, registers the proxy
    /// and returns the response body that serves it.
    async fn open(
        &self,
        peer: Option<Peer>,
        mut inbound: Streaming<pb::DeltaRequest>,
    ) -> Result<Responses, Status> {
        let Some(identity) = peer.as_ref().and_then(|p| p.spiffe_id.clone()) else {
            return Err(Status::unauthenticated(
                "the config stream needs a client certificate: sign one with Certificates.Sign first",
            ));
        };
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before its first request"))?;
        let node = first.node.clone().ok_or_else(|| {
            Status::invalid_argument("node: the first request must say which proxy this is")
        })?;
        let claimed = SpiffeId::new(&self.trust_domain, &node.namespace, &node.service_account).to_string();
        if claimed != identity {
            return Err(Status::permission_denied(format!(
                "node: namespace {:?} and service account {:?} do not match the certificate's identity {identity}",
                node.namespace, node.service_account
            )));
        }
        // A certificate signed for a pod-bound token names that pod: the proxy cannot say it is
        // another pod of its workload (and take its policy, or its place in a policy's status).
        if let Some(pod) = peer.as_ref().and_then(|p| p.pod.as_deref())
            && pod != node.pod
        {
            return Err(Status::permission_denied(format!(
                "node.pod: {:?} is not the pod the certificate was issued to ({pod:?})",
                node.pod
            )));
        }
        self.check_sizes(&first)?;
        {
            let mut counts =
                self.registry.per_identity.lock().map_err(|_| Status::internal("registry lock poisoned"))?;
            let n = counts.entry(identity.clone()).or_default();
            if *n >= self.limits.streams_per_identity {
                return Err(Status::resource_exhausted(format!(
                    "{identity} already has {n} config streams open, the most one identity may have; close some, or raise the control plane's limit"
                )));
            }
            *n += 1;
        }
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        let status = ProxyStatus {
            pod: node.pod.clone(),
            namespace: node.namespace.clone(),
            service_account: node.service_account.clone(),
            identity,
            revision: node.revision.clone(),
            proxy_version: node.proxy_version.clone(),
            bound: peer.as_ref().is_some_and(|p| p.pod.is_some()),
            remote: peer.and_then(|p| p.remote).map(|r| r.to_string()).unwrap_or_default(),
            connected_at: now_rfc3339(),
            types: BTreeMap::new(),
        };
        let status = Arc::new(Mutex::new(status));
        if let Ok(mut p) = self.registry.proxies.lock() {
            p.insert(id, status.clone());
        }
        self.metrics.connected.inc();
        info!(pod = %node.pod, namespace = %node.namespace, "proxy connected");
        let connected = Connected {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            id,
            pod: format!("{}/{}", node.namespace, node.pod),
            identity: claimed,
        };
        let (tx, rx) = mpsc::channel::<Outgoing>(4);
        let this = self.clone();
        let driver = Box::pin(async move { this.serve(&status, first, inbound, &tx).await });
        Ok(Responses { driver: Some(driver), rx, end: None, done: false, connected })
    }

    async fn serve(
        &self,
        status: &Mutex<ProxyStatus>,
        first: pb::DeltaRequest,
        mut inbound: Streaming<pb::DeltaRequest>,
        tx: &mpsc::Sender<Outgoing>,
    ) -> Result<(), Status> {
        let mut snapshots = self.snapshots.clone();
        let mut types: BTreeMap<String, TypeState> = BTreeMap::new();
        let mut nonce = 0u64;
        let node = first.node.clone().unwrap_or_default();
        let mut next = Some(first);
        loop {
            if let Some(req) = next.take() {
                self.on_request(status, req, &mut types)?;
            }
            // Push wherever nothing is waiting for an acknowledgement.
            let snap = snapshots.borrow_and_update().clone();
            if snap.synced {
                for (type_url, ts) in types.iter_mut() {
                    if ts.pending.is_some() {
                        continue;
                    }
                    // A full sync (a new proxy, or one too far behind for the change log) waits
                    // for one of a bounded number of slots, held until the proxy answers: a crowd
                    // connecting at once is served a few at a time instead of all in memory.
                    let coll = snap.collection(type_url, &node.namespace, &node.pod);
                    let full = coll.log.is_some()
                        && (ts.incomplete || !(ts.first_sent && coll.log_reaches(snap.version, ts.synced)));
                    if revoked(&ts.permit) {
                        return Err(Status::deadline_exceeded(format!(
                            "no ACK or NACK within {:?}: the full-sync slot was taken back; reconnect to resume",
                            self.limits.ack_timeout
                        )));
                    }
                    if full && ts.permit.is_none() {
                        ts.permit = self.full_syncs.acquire().await;
                    }
                    if let Some(resp) = self.delta(type_url, ts, coll, snap.version, &mut nonce) {
                        let bytes = prost::Message::encoded_len(&resp) as u64;
                        ts.counters.pushes.inc();
                        ts.counters.push_bytes.inc_by(bytes);
                        let (count, version) = (ts.known.len(), snap.version);
                        update(status, |s| {
                            let t = s.of_type(type_url);
                            t.sent = Some(version);
                            t.pushes += 1;
                            t.resources = count;
                        });
                        if tx.send(Box::new(resp)).await.is_err() {
                            return Ok(());
                        }
                    } else {
                        ts.permit = None;
                        // Nothing to send: what the proxy accepted is this version's content.
                        if ts.first_sent && !ts.nacked && ts.in_sync != Some(snap.version) {
                            ts.in_sync = Some(snap.version);
                            update(status, |s| s.of_type(type_url).in_sync = Some(snap.version));
                            self.registry.changed.notify_one();
                        }
                    }
                }
            }
            let waiting = types.values().all(|t| t.pending.is_some());
            // The oldest unacknowledged response bounds how long the stream may stay silent.
            let oldest = types.values().filter_map(|t| t.pending_since).min();
            let ack_deadline = oldest.map(|t| t + self.limits.ack_timeout);
            tokio::select! {
                // The proxy's requests first: an ACK that is already there counts before a
                // deadline that expired while the stream waited for a full-sync slot.
                biased;
                req = inbound.message() => match req? {
                    Some(r) => next = Some(r),
                    None => return Ok(()),
                },
                changed = snapshots.changed(), if !waiting => {
                    if changed.is_err() {
                        return Err(Status::unavailable("the control plane is shutting down"));
                    }
                }
                _ = tokio::time::sleep_until(ack_deadline.unwrap_or_else(tokio::time::Instant::now)), if ack_deadline.is_some() => {
                    warn!(pod = %node.pod, namespace = %node.namespace, "no ACK in time; ending the stream");
                    return Err(Status::deadline_exceeded(format!(
                        "no ACK or NACK within {:?} of a response; reconnect to resume",
                        self.limits.ack_timeout
                    )));
                }
            }
        }
    }

    /// A stream's state for a type it subscribes to for the first time.
    fn new_type_state(&self, req: &pb::DeltaRequest) -> TypeState {
        TypeState {
            wildcard: false,
            names: Default::default(),
            known: Known::Own(req.initial_versions.clone()),
            permit: None,
            synced: 0,
            incomplete: false,
            cursor: None,
            first_sent: false,
            pending: None,
            pending_since: None,
            nacked: false,
            in_sync: None,
            counters: self.metrics.for_type(&req.type_url),
        }
    }

    /// Refuses a request whose name lists are past [`StreamLimits::names_per_request`].
    fn check_sizes(&self, req: &pb::DeltaRequest) -> Result<(), Status> {
        let max = self.limits.names_per_request;
        for (field, n) in [
            ("subscribe", req.subscribe.len()),
            ("unsubscribe", req.unsubscribe.len()),
            ("initial_versions", req.initial_versions.len()),
        ] {
            if n > max {
                return Err(Status::invalid_argument(format!(
                    "{field}: {n} names, more than the {max} one request may carry"
                )));
            }
        }
        Ok(())
    }

    fn on_request(
        &self,
        status: &Mutex<ProxyStatus>,
        req: pb::DeltaRequest,
        types: &mut BTreeMap<String, TypeState>,
    ) -> Result<(), Status> {
        self.check_sizes(&req)?;
        if registration(&req.type_url).is_none() {
            let known: Vec<&str> = COLLECTIONS.iter().map(|r| r.type_url).collect();
            return Err(Status::invalid_argument(format!(
                "type_url: unknown resource type {:?}; use one of {}",
                req.type_url,
                known.join(", ")
            )));
        }
        if !types.contains_key(&req.type_url) {
            types.insert(req.type_url.clone(), self.new_type_state(&req));
        }
        let ts = types.get_mut(&req.type_url).expect("inserted above");
        if !req.response_nonce.is_empty() {
            match &ts.pending {
                Some((n, version)) if *n == req.response_nonce => {
                    let version = *version;
                    ts.pending = None;
                    ts.pending_since = None;
                    if let Some(held) = &ts.permit {
                        self.full_syncs.renew(held);
                    }
                    // A full sync in parts keeps its slot until the last part is answered.
                    if !ts.incomplete {
                        ts.permit = None;
                    }
                    match req.error_detail {
                        None => {
                            ts.counters.acks.inc();
                            ts.nacked = false;
                            // A part of a sync is not all of it.
                            let whole = !ts.incomplete;
                            if whole {
                                ts.in_sync = Some(version);
                            }
                            update(status, |s| {
                                let t = s.of_type(&req.type_url);
                                t.acked = Some(version);
                                if whole {
                                    t.in_sync = Some(version);
                                }
                            });
                            self.registry.changed.notify_one();
                        }
                        Some(e) => {
                            ts.nacked = true;
                            // Kept short: it is shown, logged and may reach a policy's status.
                            let (field, message) = (clip(&e.field, NACK_TEXT), clip(&e.message, NACK_TEXT));
                            warn!(%field, %message, version, "proxy rejected an update");
                            ts.counters.nacks.inc();
                            update(status, |s| {
                                s.of_type(&req.type_url).last_nack =
                                    Some(Nack { version, field, message, at: now_rfc3339() });
                            });
                        }
                    }
                }
                // An answer to a response that was superseded: nothing to do.
                _ => {}
            }
        }
        if ts.names.len() + req.subscribe.len() > self.limits.names_per_request {
            return Err(Status::invalid_argument(format!(
                "subscribe: {} names would be subscribed to, more than the {} a stream may follow by name; subscribe to \"*\" instead",
                ts.names.len() + req.subscribe.len(),
                self.limits.names_per_request
            )));
        }
        for name in req.subscribe {
            if name == "*" {
                ts.wildcard = true;
            } else {
                ts.names.insert(name);
            }
            // Anything newly subscribed must be compared again.
            ts.first_sent = false;
        }
        for name in req.unsubscribe {
            if name == "*" {
                ts.wildcard = false;
            } else {
                ts.names.remove(&name);
            }
            ts.known.own().remove(&name);
        }
        Ok(())
    }

    /// The response that brings the proxy from what it has to `coll` at `version`, if there is anything to
    /// send (the first response of a subscription is sent even when empty: it tells the proxy
    /// it is in sync).
    fn delta(
        &self,
        type_url: &str,
        ts: &mut TypeState,
        coll: &Collection,
        version: u64,
        nonce: &mut u64,
    ) -> Option<pb::DeltaResponse> {
        if ts.first_sent && ts.synced == version && !ts.incomplete {
            return None;
        }
        let resources: &HashMap<String, Arc<Entry>> = &coll.entries;
        // Mesh-wide collections have a change log; per-workload ones are small enough to
        // compare whole.
        let use_log = coll.log.is_some();
        // The next part of a sync in progress, when nothing changed since the last part.
        let cursor =
            ts.cursor.take().filter(|(v, _)| ts.incomplete && use_log && ts.wildcard && *v == version);
        let wanted = |n: &str| ts.wildcard || ts.names.contains(n);
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut consider = |name: &str, ts_known: &Known| match resources.get(name) {
            Some(e) if wanted(name) => {
                if ts_known.version(name) != Some(e.version.as_str()) {
                    added.push(e.clone());
                }
            }
            _ => {
                if ts_known.version(name).is_some() {
                    removed.push(name.to_string());
                }
            }
        };
        match (
            cursor,
            coll.changed_since(version, ts.synced).filter(|_| ts.first_sent && use_log && !ts.incomplete),
        ) {
            (Some((_, after)), _) => {
                // Carry on after the last name sent: a sync costs one pass over the mesh,
                // not one per part. One difference more than fits says more parts follow.
                let start = coll.sorted.partition_point(|n| n.as_str() <= after.as_str());
                let mut found = 0;
                for n in &coll.sorted[start..] {
                    if found > MAX_RESOURCES_PER_RESPONSE {
                        break;
                    }
                    if resources.get(n).is_some_and(|e| ts.known.version(n) != Some(e.version.as_str())) {
                        found += 1;
                        consider(n, &ts.known);
                    }
                }
            }
            (None, Some(names)) => {
                for n in names {
                    consider(n, &ts.known);
                }
            }
            (None, None) => {
                for n in resources.keys() {
                    consider(n, &ts.known);
                }
                for n in ts.known.names() {
                    if !resources.contains_key(&n) {
                        consider(&n, &ts.known);
                    }
                }
            }
        }
        ts.synced = version;
        if added.is_empty() && removed.is_empty() && ts.first_sent {
            return None;
        }
        ts.first_sent = true;
        added.sort_by(|a, b| a.resource.name.cmp(&b.resource.name));
        let truncated = added.len() > MAX_RESOURCES_PER_RESPONSE;
        added.truncate(MAX_RESOURCES_PER_RESPONSE);
        ts.incomplete = truncated;
        ts.cursor = if truncated { added.last().map(|e| (version, e.resource.name.clone())) } else { None };
        if ts.wildcard && !truncated {
            // After this response the proxy has exactly the collection.
            ts.known = Known::Shared(coll.entries.clone());
        } else {
            let known = ts.known.own();
            for e in &added {
                known.insert(e.resource.name.clone(), e.version.clone());
            }
            for n in &removed {
                known.remove(n);
            }
        }
        *nonce += 1;
        let n = nonce.to_string();
        ts.pending = Some((n.clone(), version));
        ts.pending_since = Some(tokio::time::Instant::now());
        removed.sort();
        Some(pb::DeltaResponse {
            type_url: type_url.to_string(),
            system_version: version.to_string(),
            nonce: n,
            resources: added.iter().map(|e| e.resource.clone()).collect(),
            removed,
            partial: truncated,
        })
    }
}

/// The CA in force, replaced whole when its Secret changes.
pub type SharedCa = Arc<RwLock<Arc<Ca>>>;

/// The certificate-signing service.
#[derive(Clone)]
pub struct Signer {
    pub client: Client,
    pub ca: SharedCa,
    pub trust_domain: String,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub metrics: Arc<CpMetrics>,
    pub limiter: Arc<SignLimiter>,
}

/// Signing requests per identity: a token bucket each, so that one workload's pods (or one pod
/// in a loop) cannot take the CA's time, and the API server's TokenReviews, from the others.
pub struct SignLimiter {
    /// Requests one identity may make at once, and per second after that.
    pub burst: f64,
    pub per_second: f64,
    buckets: Mutex<HashMap<String, (f64, tokio::time::Instant)>>,
}

impl SignLimiter {
    /// Identities whose bucket is full again are forgotten past this many.
    const MAX_TRACKED: usize = 10_000;

    pub fn new(burst: f64, per_second: f64) -> SignLimiter {
        SignLimiter { burst, per_second, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token of `identity`'s bucket, or says how long until one is there.
    pub fn take(&self, identity: &str) -> Result<(), Duration> {
        let now = tokio::time::Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
        if buckets.len() > Self::MAX_TRACKED {
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
            // Still full of busy keys: forget them all rather than grow (a flood of addresses).
            if buckets.len() > Self::MAX_TRACKED {
                buckets.clear();
            }
        }
        let (tokens, at) = buckets.entry(identity.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(((1.0 - *tokens) / self.per_second.max(1e-3)).min(3600.0)))
        }
    }
}

impl Default for SignLimiter {
    /// 100 at once (a Deployment's replicas starting together), then 10 a second.
    fn default() -> Self {
        SignLimiter::new(100.0, 10.0)
    }
}

impl Signer {
    /// The service account a token proves, as (namespace, name).
    async fn review(&self, token: &str) -> Result<(String, String, Option<String>), Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![TOKEN_AUDIENCE.into()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let result = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("cannot review the token with the API server: {e}")))?;
        let status = result.status.unwrap_or_default();
        if !status.authenticated.unwrap_or(false) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Status::unauthenticated(format!(
                "the token was refused ({why}); send a projected service-account token with audience {TOKEN_AUDIENCE:?}"
            )));
        }
        // An authenticator that ignores audiences (a legacy, unbound token) says so by naming
        // none: such a token was not minted for the mesh CA.
        if !status.audiences.as_ref().is_some_and(|a| a.iter().any(|a| a == TOKEN_AUDIENCE)) {
            return Err(Status::unauthenticated(format!(
                "the token is not for audience {TOKEN_AUDIENCE:?} (the API server names {:?}); send a projected service-account token with that audience",
                status.audiences.unwrap_or_default()
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
            return Err(Status::permission_denied(format!("{username:?} is not a service account")));
        };
        let (ns, sa) = rest
            .split_once(':')
            .ok_or_else(|| Status::permission_denied(format!("{username:?} is not a service account")))?;
        let pod = user
            .extra
            .and_then(|e| e.get("authentication.kubernetes.io/pod-name").and_then(|v| v.first().cloned()));
        Ok((ns.to_string(), sa.to_string(), pod))
    }
}

#[tonic::async_trait]
impl Certificates for Signer {
    async fn sign(&self, request: Request<pb::SignRequest>) -> Result<Response<pb::SignResponse>, Status> {
        let result = self.sign_inner(request).await;
        self.metrics.signed(result.as_ref().err().map(|s| s.code()));
        result
    }
}

impl Signer {
    async fn sign_inner(
        &self,
        request: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "authorization: send the pod's projected service-account token (audience {TOKEN_AUDIENCE:?}) as \"Bearer <token>\""
                ))
            })?;
        // Before the TokenReview, which costs the API server: a bucket per client address, so one
        // pod sending tokens (valid or not) cannot flood it.
        let remote = request.extensions().get::<Peer>().and_then(|p| p.remote).map(|r| r.ip().to_string());
        if let Some(ip) = &remote
            && let Err(wait) = self.limiter.take(&format!("ip:{ip}"))
        {
            return Err(Status::resource_exhausted(format!(
                "{ip} asked for certificates faster than {}/s (after {} at once); retry in {:.1} s",
                self.limiter.per_second,
                self.limiter.burst,
                wait.as_secs_f64()
            )));
        }
        let (ns, sa, pod) = self.review(&token).await?;
        let spiffe = SpiffeId::new(&self.trust_domain, &ns, &sa).to_string();
        if let Err(wait) = self.limiter.take(&spiffe) {
            return Err(Status::resource_exhausted(format!(
                "{spiffe} asked for certificates faster than {}/s (after {} at once); retry in {:.1} s",
                self.limiter.per_second,
                self.limiter.burst,
                wait.as_secs_f64()
            )));
        }
        let req = request.into_inner();
        let ttl = match req.ttl_seconds {
            s if s > 0 => Duration::from_secs(s as u64).min(self.max_ttl),
            _ => self.default_ttl,
        };
        let ca = self.ca.read().map(|c| c.clone()).map_err(|_| Status::internal("CA lock poisoned"))?;
        let leaf = ca.sign_workload(&req.csr_pem, &spiffe, pod.as_deref(), ttl).map_err(|e| match e {
            SignError::BadCsr => Status::invalid_argument(format!("csr_pem: {e}")),
            SignError::WrongIdentity { .. } => {
                Status::permission_denied(format!("csr_pem: the token proves {spiffe}, but {e}"))
            }
            SignError::Generate(_) => Status::internal(e.to_string()),
        })?;
        info!(identity = %spiffe, pod = pod.as_deref().unwrap_or("-"), ttl_s = ttl.as_secs(), "signed a workload certificate");
        let mut chain = vec![leaf];
        chain.extend(ca.intermediates_pem());
        Ok(Response::new(pb::SignResponse { cert_chain_pem: chain, trust_bundle_pem: ca.trust_bundle() }))
    }
}

#[cfg(test)]
mod tests;
