//! The delta stream, driven in process: a proxy's requests go in as gRPC frames, the service's
//! response body comes out, and snapshots are published by hand. Time is paused, so "nothing
//! more is sent" is checked by letting every task go idle, not by sleeping.

use std::collections::BTreeSet;

use http_body_util::{BodyExt, StreamBody};

use super::*;
use crate::controlplane::snapshot::{ChangeLog, Scoped};

const TYPE: &str = mycel_api::CLUSTER_TYPE;
const IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn cluster(name: &str, rev: &str) -> (String, Arc<Entry>) {
    let resource = pb::Resource {
        name: name.into(),
        version: rev.into(),
        kind: Some(pb::resource::Kind::Cluster(pb::Cluster { name: name.into(), ..Default::default() })),
    };
    (name.into(), Arc::new(Entry { version: rev.into(), resource }))
}

/// A synced snapshot at `version` with these clusters, and a change log of `log`.
fn snapshot(version: u64, clusters: Vec<(String, Arc<Entry>)>, log: Vec<(u64, Vec<&str>)>) -> Arc<Snapshot> {
    let mut sorted: Vec<String> = clusters.iter().map(|(n, _)| n.clone()).collect();
    sorted.sort();
    let covers_after = log.first().map_or(version, |(v, _)| v - 1);
    let log = ChangeLog::new(
        covers_after,
        log.into_iter().map(|(v, names)| (v, names.into_iter().map(String::from).collect::<Vec<_>>().into())),
    );
    let clusters = Collection {
        entries: Arc::new(clusters.into_iter().collect()),
        sorted: Arc::new(sorted),
        log: Some(Arc::new(log)),
    };
    Arc::new(Snapshot {
        version,
        synced: true,
        types: [(TYPE, Scoped::Mesh(clusters))].into(),
        ..Default::default()
    })
}

fn mesh(n: usize, rev: &str) -> Vec<(String, Arc<Entry>)> {
    (0..n).map(|i| cluster(&format!("svc-{i:03}"), rev)).collect()
}

struct Plane {
    discovery: Discovery,
    publish: watch::Sender<Arc<Snapshot>>,
}

fn plane(first: Arc<Snapshot>, full_syncs: usize) -> Plane {
    let (publish, snapshots) = watch::channel(first);
    let discovery = Discovery {
        snapshots,
        registry: Arc::new(Registry::default()),
        metrics: Arc::new(CpMetrics::default()),
        trust_domain: "cluster.local".into(),
        full_syncs: FullSyncs::new(full_syncs, Duration::from_secs(30)),
        limits: StreamLimits {
            ack_timeout: Duration::from_secs(30),
            streams_per_identity: 3,
            names_per_request: 1000,
        },
    };
    Plane { discovery, publish }
}

fn frame(req: &pb::DeltaRequest) -> Bytes {
    let msg = prost::Message::encode_to_vec(req);
    let mut b = Vec::with_capacity(5 + msg.len());
    b.push(0);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(&msg);
    b.into()
}

/// One proxy's stream.
struct Stream {
    tx: mpsc::Sender<pb::DeltaRequest>,
    body: Responses,
}

fn subscribe(initial: &[(String, Arc<Entry>)]) -> pb::DeltaRequest {
    pb::DeltaRequest {
        node: Some(pb::Node {
            pod: "web-1".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            ..Default::default()
        }),
        type_url: TYPE.into(),
        subscribe: vec!["*".into()],
        initial_versions: initial.iter().map(|(n, e)| (n.clone(), e.version.clone())).collect(),
        ..Default::default()
    }
}

async fn connect(p: &Plane, first: pb::DeltaRequest) -> Result<Stream, Status> {
    connect_as(p, first, None).await
}

/// A stream whose certificate names pod `bound`, if any.
async fn connect_as(p: &Plane, first: pb::DeltaRequest, bound: Option<&str>) -> Result<Stream, Status> {
    let (tx, rx) = mpsc::channel::<pb::DeltaRequest>(16);
    tx.send(first).await.unwrap();
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|r| (Ok::<_, Infallible>(http_body::Frame::data(frame(&r))), rx))
    });
    let body = tonic::body::Body::new(StreamBody::new(frames));
    let decoder = SmallBufferCodec::<pb::DeltaResponse, pb::DeltaRequest>::default().decoder();
    let inbound = Streaming::new_request(decoder, body, None, Some(MAX_REQUEST_BYTES));
    let peer = Peer { remote: None, spiffe_id: Some(IDENTITY.into()), pod: bound.map(str::to_string) };
    let body = p.discovery.open(Some(peer), inbound).await?;
    Ok(Stream { tx, body })
}

#[tokio::test(start_paused = true)]
async fn a_proxy_cannot_say_it_is_another_pod_than_its_certificate_names() {
    let p = plane(snapshot(1, mesh(1, "a"), vec![]), 32);
    // subscribe() says it is web-1.
    let e = connect_as(&p, subscribe(&[]), Some("web-2")).await.err().expect("another pod's name");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().starts_with("node.pod:") && e.message().contains("web-2"), "{}", e.message());
    assert!(connect_as(&p, subscribe(&[]), Some("web-1")).await.is_ok(), "its own");
}

impl Stream {
    /// The next response, or `None` once nothing more comes while every task is idle (paused
    /// time moves on only then).
    async fn next(&mut self) -> Option<pb::DeltaResponse> {
        let frame = tokio::time::timeout(Duration::from_secs(3600), self.body.frame()).await.ok()??.ok()?;
        let data = frame.into_data().ok()?;
        Some(prost::Message::decode(&data[5..]).unwrap())
    }

    async fn ack(&self, r: &pb::DeltaResponse) {
        let req =
            pb::DeltaRequest { type_url: TYPE.into(), response_nonce: r.nonce.clone(), ..Default::default() };
        self.tx.send(req).await.unwrap();
    }

    async fn nack(&self, r: &pb::DeltaResponse, field: &str) {
        let req = pb::DeltaRequest {
            type_url: TYPE.into(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(pb::RejectReason { field: field.into(), message: "bad".into() }),
            ..Default::default()
        };
        self.tx.send(req).await.unwrap();
    }

    /// Nothing is sent until the proxy says something (checked once every task is idle).
    async fn quiet(&mut self) -> bool {
        tokio::time::timeout(Duration::from_secs(1), self.body.frame()).await.is_err()
    }
}

fn names(r: &pb::DeltaResponse) -> Vec<&str> {
    r.resources.iter().map(|x| x.name.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn a_full_sync_goes_out_in_parts_in_name_order_each_after_the_last_ack() {
    let p = plane(snapshot(1, mesh(70, "a"), vec![]), 32);
    let mut s = connect(&p, subscribe(&[])).await.unwrap();
    let mut got = Vec::new();
    let mut parts = Vec::new();
    loop {
        let r = s.next().await.unwrap();
        parts.push((r.resources.len(), r.partial));
        got.extend(names(&r).into_iter().map(String::from));
        assert!(s.quiet().await, "one part at a time: the next waits for this one's ACK");
        s.ack(&r).await;
        if !r.partial {
            break;
        }
    }
    assert_eq!(parts, vec![(32, true), (32, true), (6, false)]);
    let expected: Vec<String> = mesh(70, "a").into_iter().map(|(n, _)| n).collect();
    assert_eq!(got, expected, "each cluster once, in name order");
    assert!(s.quiet().await, "in sync: nothing more to send");
}

#[tokio::test(start_paused = true)]
async fn a_change_during_a_sync_in_parts_reaches_the_proxy() {
    let p = plane(snapshot(1, mesh(70, "a"), vec![]), 32);
    let mut s = connect(&p, subscribe(&[])).await.unwrap();
    let first = s.next().await.unwrap();
    assert!(first.partial);
    // A cluster already sent changes before the first part is acknowledged.
    let mut changed = mesh(70, "a");
    changed[0] = cluster("svc-000", "b");
    p.publish.send(snapshot(2, changed.clone(), vec![(2, vec!["svc-000"])])).unwrap();
    s.ack(&first).await;
    let mut has: std::collections::BTreeMap<String, String> =
        first.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
    loop {
        let r = s.next().await.unwrap();
        for x in &r.resources {
            has.insert(x.name.clone(), x.version.clone());
        }
        s.ack(&r).await;
        if !r.partial && has.len() == 70 && has["svc-000"] == "b" {
            break;
        }
    }
    let want: std::collections::BTreeMap<String, String> =
        changed.iter().map(|(n, e)| (n.clone(), e.version.clone())).collect();
    assert_eq!(has, want, "the proxy ends with exactly the newest snapshot");
    assert!(s.quiet().await);
}

#[tokio::test(start_paused = true)]
async fn after_the_sync_a_change_is_sent_from_the_log_alone() {
    let p = plane(snapshot(1, mesh(5, "a"), vec![]), 32);
    let mut s = connect(&p, subscribe(&[])).await.unwrap();
    let r = s.next().await.unwrap();
    assert_eq!(r.resources.len(), 5);
    s.ack(&r).await;
    let mut next = mesh(5, "a");
    next[2] = cluster("svc-002", "b");
    next.remove(4);
    p.publish.send(snapshot(2, next, vec![(2, vec!["svc-002", "svc-004"])])).unwrap();
    let r = s.next().await.unwrap();
    assert_eq!(names(&r), ["svc-002"]);
    assert_eq!(r.removed, ["svc-004"]);
    assert_eq!(r.system_version, "2");
    s.ack(&r).await;
    assert!(s.quiet().await);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_stream_gets_only_what_differs_from_what_the_proxy_has() {
    let p = plane(snapshot(7, mesh(10, "a"), vec![]), 32);
    // The proxy reconnects holding 9 of the 10 as they are, one stale and one that is gone.
    let mut held = mesh(10, "a");
    held[3] = cluster("svc-003", "old");
    held.push(cluster("gone", "a"));
    held.remove(9);
    let mut s = connect(&p, subscribe(&held)).await.unwrap();
    let r = s.next().await.unwrap();
    let sent: BTreeSet<&str> = names(&r).into_iter().collect();
    assert_eq!(sent, BTreeSet::from(["svc-003", "svc-009"]));
    assert_eq!(r.removed, ["gone"]);
    s.ack(&r).await;
    assert!(s.quiet().await);
    // Reconnecting with exactly the snapshot: an empty first response says "in sync".
    let mut again = connect(&p, subscribe(&mesh(10, "a"))).await.unwrap();
    let r = again.next().await.unwrap();
    assert!(r.resources.is_empty() && r.removed.is_empty() && !r.partial);
}

#[tokio::test(start_paused = true)]
async fn a_nack_is_recorded_and_the_stream_goes_on() {
    let p = plane(snapshot(1, mesh(3, "a"), vec![]), 32);
    let mut s = connect(&p, subscribe(&[])).await.unwrap();
    let r = s.next().await.unwrap();
    s.nack(&r, "clusters[svc-001].endpoints[0]").await;
    // The NACK is answered by nothing new (the proxy keeps its last good config) …
    assert!(s.quiet().await);
    let listed = p.discovery.registry.list();
    let nack = listed[0].types[TYPE].last_nack.clone().expect("the rejection is shown");
    assert_eq!((nack.version, nack.field.as_str()), (1, "clusters[svc-001].endpoints[0]"));
    assert_eq!(listed[0].types[TYPE].acked, None);
    // … and the next change is sent all the same.
    let mut next = mesh(3, "a");
    next[1] = cluster("svc-001", "fixed");
    p.publish.send(snapshot(2, next, vec![(2, vec!["svc-001"])])).unwrap();
    let r = s.next().await.unwrap();
    assert_eq!(names(&r), ["svc-001"]);
    s.ack(&r).await;
    assert!(s.quiet().await);
    assert_eq!(p.discovery.registry.list()[0].types[TYPE].acked, Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_never_acks_frees_its_slot_for_the_next_proxy() {
    // One full-sync slot: the first proxy takes it and never answers.
    let p = plane(snapshot(1, mesh(3, "a"), vec![]), 1);
    let mut silent = connect(&p, subscribe(&[])).await.unwrap();
    assert_eq!(silent.next().await.unwrap().resources.len(), 3);
    let started = tokio::time::Instant::now();
    let mut waiting = connect(&p, subscribe(&[])).await.unwrap();
    // The second proxy is served once the first's ACK deadline has ended its stream.
    let (first, second) = tokio::join!(
        async {
            let end = silent.body.frame().await.unwrap().unwrap();
            end.into_trailers().ok()
        },
        waiting.next()
    );
    assert_eq!(second.expect("served after the deadline").resources.len(), 3);
    let trailers = first.expect("the silent stream ended with a status");
    assert_eq!(trailers["grpc-status"], (tonic::Code::DeadlineExceeded as i32).to_string().as_str());
    assert!(started.elapsed() >= Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn one_identity_cannot_open_unbounded_streams_or_send_unbounded_lists() {
    let p = plane(snapshot(1, mesh(1, "a"), vec![]), 32);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect(&p, subscribe(&[])).await.unwrap());
    }
    let refused = connect(&p, subscribe(&[])).await.err().expect("a fourth stream of one identity");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains(IDENTITY), "{}", refused.message());
    // A stream that ends gives its place back.
    drop(open.pop());
    tokio::task::yield_now().await;
    let again = connect(&p, subscribe(&[])).await;
    assert!(again.is_ok(), "a place was free again");
    let mut big = subscribe(&[]);
    big.initial_versions = (0..1001).map(|i| (format!("n{i}"), "v".to_string())).collect();
    drop(again);
    let e = connect(&p, big).await.err().expect("too many initial versions");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("initial_versions:"), "{}", e.message());
}

#[tokio::test(start_paused = true)]
async fn certificate_requests_are_limited_per_identity() {
    let l = SignLimiter::new(3.0, 1.0);
    for _ in 0..3 {
        assert!(l.take("spiffe://t/ns/a/sa/x").is_ok());
    }
    let wait = l.take("spiffe://t/ns/a/sa/x").expect_err("a fourth at once");
    assert!(wait <= Duration::from_secs(1));
    assert!(l.take("spiffe://t/ns/b/sa/y").is_ok(), "another identity is not held back");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(l.take("spiffe://t/ns/a/sa/x").is_ok(), "one more per second");
    assert!(l.take("spiffe://t/ns/a/sa/x").is_err());
}

#[tokio::test(start_paused = true)]
async fn a_stream_never_polled_again_still_loses_its_slot() {
    // A client that never opens its HTTP/2 window is never polled after its first response:
    // its stream cannot notice a deadline itself, so the slot is taken back from outside.
    let p = plane(snapshot(1, mesh(3, "a"), vec![]), 1);
    let mut stuck = connect(&p, subscribe(&[])).await.unwrap();
    assert_eq!(stuck.next().await.unwrap().resources.len(), 3);
    let started = tokio::time::Instant::now();
    let mut waiting = connect(&p, subscribe(&[])).await.unwrap();
    // Only the second stream is polled from here on.
    let r = waiting.next().await.expect("served once the stuck stream's lease ran out");
    assert_eq!(r.resources.len(), 3);
    assert!(started.elapsed() >= Duration::from_secs(30));
    // When the stuck stream runs again, it ends.
    let end = stuck.body.frame().await.unwrap().unwrap();
    let Ok(trailers) = end.into_trailers() else { panic!("a status, not more config") };
    assert_eq!(trailers["grpc-status"], (tonic::Code::DeadlineExceeded as i32).to_string().as_str());
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_acks_keeps_its_slot_through_a_long_sync() {
    // 200 clusters go out in 7 parts; each ACK comes 20 s after its part: 140 s in all, more
    // than the 30 s lease, renewed by each ACK.
    let p = plane(snapshot(1, mesh(200, "a"), vec![]), 1);
    let mut s = connect(&p, subscribe(&[])).await.unwrap();
    let mut parts = 0;
    loop {
        let r = s.next().await.expect("every part arrives");
        parts += 1;
        tokio::time::sleep(Duration::from_secs(20)).await;
        s.ack(&r).await;
        if !r.partial {
            break;
        }
    }
    assert_eq!(parts, 7);
}

#[tokio::test(start_paused = true)]
async fn names_subscribed_over_many_requests_are_bounded() {
    let p = plane(snapshot(1, mesh(1, "a"), vec![]), 32);
    let mut first = subscribe(&[]);
    first.subscribe = (0..600).map(|i| format!("a{i}")).collect();
    let s = connect(&p, first).await.unwrap();
    let more = pb::DeltaRequest {
        type_url: TYPE.into(),
        subscribe: (0..600).map(|i| format!("b{i}")).collect(),
        ..Default::default()
    };
    s.tx.send(more).await.unwrap();
    let mut s = s;
    let mut status = None;
    while let Some(Ok(f)) = s.body.frame().await {
        if let Ok(t) = f.into_trailers() {
            status = Some(t);
            break;
        }
    }
    let t = status.expect("the stream ends with a status");
    assert_eq!(t["grpc-status"], (tonic::Code::InvalidArgument as i32).to_string().as_str());
}

fn policy(mode: pb::MtlsMode) -> Arc<Collection> {
    let e = Entry::new(crate::controlplane::translate::peer_policy::resource(pb::PeerPolicy {
        mode: mode as i32,
        ports: Default::default(),
        authz: Vec::new(),
        jwt: Vec::new(),
        rate_limits: Vec::new(),
        rate_limit_service: None,
        outbound_rate_limits: Vec::new(),
    }));
    Arc::new(Collection::of([(e.resource.name.clone(), Arc::new(e))].into()))
}

/// A snapshot whose PeerPolicy collection is `web-1`'s own and `api-1`'s.
fn policies(version: u64, web: pb::MtlsMode, api: pb::MtlsMode) -> Arc<Snapshot> {
    let by_workload = [
        (("shop".to_string(), "web-1".to_string()), policy(web)),
        (("shop".to_string(), "api-1".to_string()), policy(api)),
    ];
    Arc::new(Snapshot {
        version,
        synced: true,
        types: [(
            mycel_api::PEER_POLICY_TYPE,
            Scoped::Workload {
                by_workload: Arc::new(by_workload.into()),
                by_namespace: Default::default(),
                default: policy(pb::MtlsMode::MtlsPermissive),
            },
        )]
        .into(),
        ..Default::default()
    })
}

fn mode_of(r: &pb::DeltaResponse) -> pb::MtlsMode {
    match &r.resources[0].kind {
        Some(pb::resource::Kind::PeerPolicy(p)) => pb::MtlsMode::try_from(p.mode).unwrap(),
        _ => panic!("not a policy"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_workload_gets_its_own_policy_and_nothing_when_another_ones_changes() {
    use pb::MtlsMode::{MtlsDisable, MtlsPermissive, MtlsStrict};
    let p = plane(policies(1, MtlsStrict, MtlsPermissive), 32);
    let mut first = subscribe(&[]);
    first.type_url = mycel_api::PEER_POLICY_TYPE.into();
    let mut s = connect(&p, first).await.unwrap();
    let r = s.next().await.unwrap();
    assert_eq!(mode_of(&r), MtlsStrict, "web-1's, not api-1's or the default");
    let ack = pb::DeltaRequest {
        type_url: mycel_api::PEER_POLICY_TYPE.into(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    };
    s.tx.send(ack).await.unwrap();
    assert!(s.quiet().await);
    let types = &p.discovery.registry.list()[0].types;
    assert_eq!(types[mycel_api::PEER_POLICY_TYPE].in_sync, Some(1));

    // Another workload's policy changes: nothing is sent, and the proxy is in sync with v2.
    p.publish.send(policies(2, MtlsStrict, MtlsDisable)).unwrap();
    assert!(s.quiet().await);
    assert_eq!(p.discovery.registry.list()[0].types[mycel_api::PEER_POLICY_TYPE].in_sync, Some(2));

    // Its own changes: it is sent, and in sync only once acknowledged.
    p.publish.send(policies(3, MtlsDisable, MtlsDisable)).unwrap();
    let r = s.next().await.unwrap();
    assert_eq!((mode_of(&r), r.system_version.as_str()), (MtlsDisable, "3"));
    assert!(s.quiet().await);
    assert_eq!(p.discovery.registry.list()[0].types[mycel_api::PEER_POLICY_TYPE].in_sync, Some(2));
    let nack = pb::DeltaRequest {
        type_url: mycel_api::PEER_POLICY_TYPE.into(),
        response_nonce: r.nonce.clone(),
        error_detail: Some(pb::RejectReason { field: "inbound".into(), message: "bad".into() }),
        ..Default::default()
    };
    s.tx.send(nack).await.unwrap();
    assert!(s.quiet().await);
    p.publish.send(policies(4, MtlsDisable, MtlsStrict)).unwrap();
    assert!(s.quiet().await);
    assert_eq!(
        p.discovery.registry.list()[0].types[mycel_api::PEER_POLICY_TYPE].in_sync,
        Some(2),
        "a rejected policy is not held, however many versions go by"
    );
}
