//! Control-plane benchmark on the local cluster: N Services × M endpoints in the real API
//! server, the control plane as its own process (`mycel-operator control-plane`), and P
//! simulated proxies in this process — each its own TLS connection and config stream with a
//! real workload certificate, acknowledging every response as a proxy does.
//!
//! For each P it reports: the time from one endpoint change (an EndpointSlice patch sent to the
//! API server) to each proxy's acknowledgement (p50/p99/max over all proxies and changes), the
//! control plane's RSS and CPU time, the bytes it pushed per change (all proxies, and per
//! proxy) next to the bytes of a full sync, and the time to bring P new proxies in sync.
//!
//! Run: `just bench-control-plane` (builds release binaries). `MYCEL_BENCH_PROXIES` (default
//! `100,1000,5000`), `MYCEL_BENCH_SERVICES` (1000), `MYCEL_BENCH_ENDPOINTS` (5) and
//! `MYCEL_BENCH_CHANGES` (20) size it. `MYCEL_BENCH_BASELINE=<mycel-operator binary>` runs that
//! binary and this build in turn, `MYCEL_BENCH_ROUNDS` (3) interleaved rounds, and writes
//! `docs/benchmarks/control-plane-vs-baseline.{md,json}` instead. Results are printed and written to
//! `docs/benchmarks/control-plane.{md,json}`.

#![allow(unsafe_code)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Secret, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use mycel_api::v1alpha1 as pb;
use mycel_e2e::{
    TestCluster, pki,
    process::{Process, free_port, http_get},
};
use mycel_proxy::{identity::Identity, xds::Bootstrap};
use serde_json::json;
use tokio::sync::mpsc;

const NS: &str = "mycel-bench-cp";
/// Identities (service accounts) the simulated proxies are spread over, and the namespaces those
/// are spread over.
const IDENTITIES: usize = 50;
const IDENTITY_NAMESPACES: usize = 5;
/// Changes in one burst: closer together than the control plane's debounce.
const BURST: usize = 5;

fn workload_namespace(identity: usize) -> String {
    format!("{NS}-w{}", identity % IDENTITY_NAMESPACES)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn endpoint_ip(svc: usize, ep: usize, generation: usize) -> String {
    format!("10.{}.{}.{}", 100 + generation % 100, svc % 256, (svc / 256) * 50 + ep + 1)
}

fn slice(svc: usize, endpoints: usize, generation: usize) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{svc}-1"), "labels": {"kubernetes.io/service-name": format!("svc-{svc}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": (0..endpoints).map(|e| json!({"addresses": [endpoint_ip(svc, e, generation)], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// Creates what is missing of N Services with one M-endpoint slice each.
async fn load(client: &Client, services: usize, endpoints: usize) {
    let svcs: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let started = Instant::now();
    futures::stream::iter(0..services)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            async move {
                let name = format!("svc-{i}");
                let pp = PatchParams::apply("mycel-bench").force();
                // kube-proxy shares the machine's cores. Left to it, it would rewrite the
                // node's iptables for 1 000 Services after each change, in the middle of the
                // fan-out being measured; this label (for alternative service proxies) makes it
                // leave these Services alone. The control plane still serves them.
                let s = json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "labels": {"service.kubernetes.io/service-proxy-name": "mycel-bench"}},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
                });
                svcs.patch(&name, &pp, &Patch::Apply(&s)).await.unwrap();
                let mut s = slice(i, endpoints, 0);
                s.metadata.managed_fields = None;
                let mut v = serde_json::to_value(&s).unwrap();
                v["apiVersion"] = json!("discovery.k8s.io/v1");
                v["kind"] = json!("EndpointSlice");
                slices.patch(&format!("svc-{i}-1"), &pp, &Patch::Apply(&v)).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    println!("loaded {services} services × {endpoints} endpoints in {:.1}s", started.elapsed().as_secs_f64());
}

struct Event {
    proxy: usize,
    at: Instant,
    first: Option<String>,
    /// The names in a small response (none in a part of a full sync).
    names: Vec<String>,
    resources: usize,
}

/// One simulated proxy: opens its stream, acknowledges everything, reports each response.
///
/// It speaks the protocol as a proxy does (its own TLS connection with a workload certificate,
/// HTTP/2, gRPC frames, protobuf), but with h2 directly instead of a tonic channel: the
/// simulated proxies share the machine's two cores with the control plane being measured, and
/// tonic's client layers doubled their CPU per response.
async fn simulated_proxy(
    i: usize,
    boot: Arc<Bootstrap>,
    id: Arc<Identity>,
    events: mpsc::UnboundedSender<Event>,
) {
    // Like a real proxy: retry with backoff when the control plane is busy accepting others.
    let mut backoff = mycel_proxy::xds::Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
    let mut attempts = 0;
    let (mut send, mut body) = loop {
        match open_stream(i, &boot, &id).await {
            Ok(s) => break s,
            Err(e) if attempts < 30 => {
                attempts += 1;
                let _ = e;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                eprintln!("proxy {i}: {e:#}");
                return;
            }
        }
    };
    let mut buf = bytes::BytesMut::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            let frame = buf.split_to(5 + len);
            let Ok(r) = <pb::DeltaResponse as prost::Message>::decode(&frame[5..]) else {
                eprintln!("proxy {i}: a response that does not decode");
                return;
            };
            let ack = pb::DeltaRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            };
            if send.send_data(mycel_api::codec::grpc_frame(&ack), false).is_err() {
                return;
            }
            let first = (r.resources.len() == 1).then(|| r.resources[0].name.clone());
            let names = if r.resources.len() <= BURST {
                r.resources.iter().map(|x| x.name.clone()).collect()
            } else {
                Vec::new()
            };
            let _ = events.send(Event {
                proxy: i,
                at: Instant::now(),
                first,
                names,
                resources: r.resources.len(),
            });
        }
    }
}

/// Connects over TLS with the workload certificate and opens the config stream with its first
/// request; the stream's send half and response body.
async fn open_stream(
    i: usize,
    boot: &Bootstrap,
    id: &Identity,
) -> anyhow::Result<(h2::SendStream<bytes::Bytes>, h2::RecvStream)> {
    let tls = tokio_rustls::TlsConnector::from(Arc::new(mycel_proxy::xds::client_tls(
        &id.trust_bundle_pem,
        Some(id),
    )?));
    let tcp = tokio::net::TcpStream::connect(&boot.control_plane).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(boot.server_name.clone())?;
    let tls = tls.connect(name, tcp).await?;
    let (client, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(conn);
    let mut client = client.ready().await?;
    let req =
        http::Request::post(format!("https://{}/mycel.v1alpha1.ConfigDiscovery/Stream", boot.server_name))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
    let (response, mut send) = client.send_request(req, false)?;
    let mut node = boot.node.clone();
    node.pod = format!("sim-{i}");
    let first = pb::DeltaRequest {
        node: Some(node),
        type_url: mycel_api::CLUSTER_TYPE.into(),
        subscribe: vec!["*".into()],
        ..Default::default()
    };
    send.send_data(mycel_api::codec::grpc_frame(&first), false)?;
    let response = response.await?;
    if let Some(status) = response.headers().get("grpc-status").filter(|s| *s != "0") {
        anyhow::bail!("stream refused: grpc-status {status:?} {:?}", response.headers().get("grpc-message"));
    }
    Ok((send, response.into_body()))
}

/// (RSS MiB, CPU seconds) of a process.
fn usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (rss_kib / 1024.0, ticks / hz)
}

async fn metric(monitor: std::net::SocketAddr, name: &str) -> f64 {
    let text = http_get(monitor, "/metrics").await.map(|(_, b)| b).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Milliseconds from `t0` until the control plane has counted `acks` ACKs in all.
async fn all_acked(monitor: std::net::SocketAddr, acks: f64, t0: Instant) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(monitor, "mycel_control_plane_acks_total").await < acks {
        assert!(Instant::now() < deadline, "the control plane never counted {acks} ACKs");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    t0.elapsed().as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let proxies: Vec<usize> = std::env::var("MYCEL_BENCH_PROXIES")
        .unwrap_or_else(|_| "100,1000,5000".into())
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let services: usize = env_or("MYCEL_BENCH_SERVICES", 1000);
    let endpoints: usize = env_or("MYCEL_BENCH_ENDPOINTS", 5);
    let changes: usize = env_or("MYCEL_BENCH_CHANGES", 20);

    let cluster = TestCluster::shared().await.unwrap();
    cluster.install_crds().unwrap();
    let client = cluster.client().await.unwrap();
    // A previous run's namespace may still be terminating.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let waited = Instant::now();
    while let Some(ns) = namespaces.get_opt(NS).await.unwrap() {
        if ns.metadata.deletion_timestamp.is_none() {
            break;
        }
        assert!(waited.elapsed() < Duration::from_secs(300), "namespace {NS} is stuck terminating");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = cluster.kubectl_run(&["create", "namespace", NS], None);
    let ca = pki::Ca::generate("mycel bench root").unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let _ = secrets.delete("mycel-ca", &Default::default()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "mycel-ca"}, "stringData": {"tls.crt": ca.pem.cert, "tls.key": ca.pem.key}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    load(&client, services, endpoints).await;

    // The simulated proxies are of many workloads: IDENTITIES service accounts spread over
    // IDENTITY_NAMESPACES namespaces, each with its own token and certificate.
    let dir = std::env::temp_dir().join("mycel-bench-cp");
    std::fs::create_dir_all(&dir).unwrap();
    let token_req: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": ["mycel-ca"], "expirationSeconds": 7200}}))
            .unwrap();
    let mut workloads = Vec::new();
    for i in 0..IDENTITIES {
        let ns = workload_namespace(i);
        if i < IDENTITY_NAMESPACES {
            let _ = cluster.kubectl_run(&["create", "namespace", &ns], None);
        }
        let name = format!("bench-{i}");
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
        let _ = sas.create(&PostParams::default(), &sa).await;
        let token: k8s_openapi::api::authentication::v1::TokenRequest =
            sas.create_subresource("token", &name, &PostParams::default(), &token_req).await.unwrap();
        let path = dir.join(format!("token-{i}"));
        std::fs::write(&path, token.status.unwrap().token).unwrap();
        workloads.push((ns, name, path));
    }

    let baseline = std::env::var("MYCEL_BENCH_BASELINE").ok().filter(|b| !b.is_empty());
    let rounds: usize = env_or("MYCEL_BENCH_ROUNDS", if baseline.is_some() { 3 } else { 1 });
    let bench =
        Bench { cluster: &cluster, client: &client, ca: &ca, workloads, services, endpoints, changes };
    let mut results = Vec::new();
    // Every change in the run gets new addresses (a change to what is already there is none).
    let mut generation = 0usize;
    for &p in &proxies {
        for round in 0..rounds {
            // The baseline and this build take turns, each starting every other round.
            let mut binaries: Vec<(&str, String)> = vec![("new", "mycel-operator".to_string())];
            if let Some(b) = &baseline {
                binaries.push(("baseline", b.clone()));
                if round % 2 == 1 {
                    binaries.reverse();
                }
            }
            for (label, binary) in binaries {
                let mut r = bench.scenario(&binary, p, &mut generation).await;
                r["binary"] = json!(label);
                r["round"] = json!(round + 1);
                println!("{r}");
                results.push(r);
            }
        }
    }

    let _ = cluster.kubectl_run(&["delete", "namespace", NS, "--wait=false"], None);
    for i in 0..IDENTITY_NAMESPACES {
        let _ = cluster.kubectl_run(&["delete", "namespace", &workload_namespace(i), "--wait=false"], None);
    }
    match &baseline {
        Some(b) => write_comparison(&results, b, services, endpoints, changes),
        None => write_report(&results, services, endpoints, changes),
    }
}

/// What every scenario shares.
struct Bench<'a> {
    cluster: &'a TestCluster,
    client: &'a Client,
    ca: &'a pki::Ca,
    /// (namespace, service account, token file) of each identity.
    workloads: Vec<(String, String, std::path::PathBuf)>,
    services: usize,
    endpoints: usize,
    changes: usize,
}

impl Bench<'_> {
    /// One scenario: `binary` (a workspace binary's name or a path) as the control plane, `p`
    /// proxies connecting and syncing, then the changes.
    async fn scenario(&self, binary: &str, p: usize, generation: &mut usize) -> serde_json::Value {
        let Bench { cluster, client, ca, services, endpoints, changes, .. } = *self;
        let (grpc, monitor_port) = (free_port().unwrap(), free_port().unwrap());
        let monitor: std::net::SocketAddr = ([127, 0, 0, 1], monitor_port).into();
        let args: Vec<String> = ["control-plane", "--namespace", NS, "--revision", "bench", "--grpc-addr"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("127.0.0.1:{grpc}"), "--monitor-addr".into(), monitor.to_string()])
            .chain(["--webhook-addr".into(), "none".into()])
            .collect();
        // MYCEL_BENCH_CP_WRAPPER="heaptrack -o /tmp/cp" profiles the control plane (its RSS
        // and CPU figures are then the profiler's).
        let wrapper: Vec<String> = std::env::var("MYCEL_BENCH_CP_WRAPPER")
            .map(|w| w.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut cp =
            Process::start_wrapped(cluster, &wrapper, binary, "bench", &args, &[("RUST_LOG", "warn")])
                .unwrap();
        let pid = cp.pid();
        let start = Instant::now();
        while !matches!(http_get(monitor, "/ready").await, Ok((200, _))) {
            assert!(start.elapsed() < Duration::from_secs(60), "control plane not ready:\n{}", cp.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (rss_idle, _) = usage(pid);
        // A bootstrap and a certificate per identity.
        let mut identities = Vec::new();
        for (ns, sa, token) in &self.workloads {
            let boot = Arc::new(Bootstrap {
                control_plane: format!("127.0.0.1:{grpc}"),
                server_name: format!("mycel-control-plane-bench.{NS}.svc"),
                ca_roots: vec![ca.pem.cert.clone()],
                token_path: token.clone(),
                trust_domain: "cluster.local".into(),
                node: pb::Node { namespace: ns.clone(), service_account: sa.clone(), ..Default::default() },
                cert_ttl: None,
            });
            let id = Arc::new(mycel_proxy::identity::request(&boot, &boot.ca_roots).await.unwrap());
            identities.push((boot, id));
        }

        // P proxies connect and sync.
        let (_, cpu0) = usage(pid);
        let (etx, mut erx) = mpsc::unbounded_channel();
        let sync_start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..p {
            let (boot, id) = &identities[i % identities.len()];
            tasks.push(tokio::spawn(simulated_proxy(i, boot.clone(), id.clone(), etx.clone())));
            // Ramp up at 1 000 proxies a second, as a rollout would.
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // In sync once a proxy holds every cluster (a full sync comes in parts).
        let clusters = metric(monitor, "mycel_control_plane_clusters").await as usize;
        let mut held = vec![0usize; p];
        let mut synced = vec![false; p];
        let mut n_synced = 0;
        while n_synced < p {
            let e = tokio::time::timeout(Duration::from_secs(120), erx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("initial sync: {n_synced} of {p} proxies in sync after 120 s without progress")
                })
                .unwrap();
            held[e.proxy] += e.resources;
            if !synced[e.proxy] && held[e.proxy] >= clusters {
                synced[e.proxy] = true;
                n_synced += 1;
            }
        }
        let sync_s = sync_start.elapsed().as_secs_f64();
        let full_bytes = metric(monitor, "mycel_control_plane_push_bytes_total").await / p as f64;
        tokio::time::sleep(Duration::from_millis(500)).await;
        while erx.try_recv().is_ok() {}

        // One endpoint change at a time; every proxy must acknowledge it.
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
        let bytes0 = metric(monitor, "mycel_control_plane_push_bytes_total").await;
        let (cp_cpu0, sim_cpu0) = (usage(pid).1, usage(std::process::id()).1);
        let mut latencies = Vec::with_capacity(p * changes);
        // Per change: until the control plane has counted every proxy's ACK.
        let mut cp_acked = Vec::with_capacity(changes);
        for k in 0..changes {
            let acks0 = metric(monitor, "mycel_control_plane_acks_total").await;
            let svc = (k * 37 + p) % services;
            let name = format!("svc-{svc}.{NS}.svc.cluster.local:80");
            *generation += 1;
            let patch = json!({"endpoints": (0..endpoints).map(|e| json!({"addresses": [endpoint_ip(svc, e, *generation)], "conditions": {"ready": true}})).collect::<Vec<_>>()});
            let t0 = Instant::now();
            slices
                .patch(&format!("svc-{svc}-1"), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
            let mut seen = vec![false; p];
            let mut n = 0;
            while n < p {
                let e = tokio::time::timeout(Duration::from_secs(60), erx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("change {k}: only {n} of {p} proxies acknowledged"))
                    .unwrap();
                if e.first.as_deref() == Some(name.as_str()) && !seen[e.proxy] {
                    seen[e.proxy] = true;
                    n += 1;
                    latencies.push(e.at.duration_since(t0).as_secs_f64() * 1000.0);
                }
            }
            cp_acked.push(all_acked(monitor, acks0 + p as f64, t0).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
            while erx.try_recv().is_ok() {}
        }

        // Bytes and CPU per change: of the single changes only.
        let bytes = metric(monitor, "mycel_control_plane_push_bytes_total").await - bytes0;
        let cpu_changes = usage(pid).1;
        // CPU per proxy and change during the changes, of the control plane and of this process
        // (the simulated proxies), in µs.
        let per_change = |cpu: f64| (cpu * 1e6 / (changes * p) as f64).round();
        let (cp_us, sim_us) =
            (per_change(cpu_changes - cp_cpu0), per_change(usage(std::process::id()).1 - sim_cpu0));

        // Bursts: BURST changes sent at once, closer together than the debounce; until every
        // proxy holds all of them, and how many responses that took per proxy.
        let bursts = 5;
        let mut burst_ms = Vec::with_capacity(bursts);
        let mut burst_responses = 0usize;
        for b in 0..bursts {
            let svcs: Vec<usize> = (0..BURST).map(|j| (b * 101 + j * 13 + p + 500) % services).collect();
            *generation += 1;
            let acks0 = metric(monitor, "mycel_control_plane_acks_total").await;
            let t0 = Instant::now();
            futures::future::join_all(svcs.iter().map(|&svc| {
                let patch = json!({"endpoints": (0..endpoints).map(|e| json!({"addresses": [endpoint_ip(svc, e, *generation)], "conditions": {"ready": true}})).collect::<Vec<_>>()});
                let slices = slices.clone();
                async move {
                    slices.patch(&format!("svc-{svc}-1"), &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
                }
            }))
            .await;
            let wanted: Vec<String> =
                svcs.iter().map(|svc| format!("svc-{svc}.{NS}.svc.cluster.local:80")).collect();
            let mut has = vec![0usize; p];
            let mut done = 0;
            let mut responses = 0;
            while done < p {
                let e = tokio::time::timeout(Duration::from_secs(60), erx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("burst {b}: only {done} of {p} proxies hold all of it"))
                    .unwrap();
                responses += 1;
                let before = has[e.proxy];
                has[e.proxy] += e.names.iter().filter(|n| wanted.contains(n)).count();
                if before < BURST && has[e.proxy] >= BURST {
                    done += 1;
                }
            }
            burst_responses += responses;
            let acks = acks0 + responses as f64;
            burst_ms.push(all_acked(monitor, acks, t0).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Late responses (a burst split in two) count too.
            while erx.try_recv().is_ok() {
                burst_responses += 1;
            }
        }
        cp_acked.sort_by(|a, b| a.total_cmp(b));
        burst_ms.sort_by(|a, b| a.total_cmp(b));
        let (rss, cpu1) = usage(pid);
        latencies.sort_by(|a, b| a.total_cmp(b));
        let r = json!({
            "proxies": p,
            "services": services,
            "endpoints_per_service": endpoints,
            "changes": changes,
            "p50_ms": (percentile(&latencies, 0.50) * 10.0).round() / 10.0,
            "p99_ms": (percentile(&latencies, 0.99) * 10.0).round() / 10.0,
            "max_ms": (latencies.last().copied().unwrap_or(f64::NAN) * 10.0).round() / 10.0,
            "rss_mib": (rss * 10.0).round() / 10.0,
            "rss_idle_mib": (rss_idle * 10.0).round() / 10.0,
            "cpu_s": ((cpu1 - cpu0) * 100.0).round() / 100.0,
            "bytes_per_change": (bytes / changes as f64).round() as u64,
            "bytes_per_change_per_proxy": (bytes / changes as f64 / p as f64).round() as u64,
            "full_sync_bytes_per_proxy": full_bytes.round() as u64,
            "initial_sync_s": (sync_s * 100.0).round() / 100.0,
            "cp_acked_p50_ms": (percentile(&cp_acked, 0.50) * 10.0).round() / 10.0,
            "cp_acked_max_ms": (cp_acked.last().copied().unwrap_or(f64::NAN) * 10.0).round() / 10.0,
            "burst_changes": BURST,
            "burst_p50_ms": (percentile(&burst_ms, 0.50) * 10.0).round() / 10.0,
            "burst_max_ms": (burst_ms.last().copied().unwrap_or(f64::NAN) * 10.0).round() / 10.0,
            "burst_responses_per_proxy": ((burst_responses as f64 / (bursts * p) as f64) * 100.0).round() / 100.0,
            "identities": self.workloads.len(),
            "cp_cpu_us_per_proxy_change": cp_us,
            "sim_cpu_us_per_proxy_change": sim_us,
        });
        for t in tasks {
            t.abort();
        }
        cp.kill();
        r
    }
}

fn write_report(results: &[serde_json::Value], services: usize, endpoints: usize, changes: usize) {
    let root = TestCluster::repo_root().join("docs/benchmarks");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("control-plane.json"), serde_json::to_string_pretty(results).unwrap() + "\n")
        .unwrap();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut md = format!(
        "# Control-plane benchmark\n\nProduced by `just bench-control-plane` on {} ({cpus} CPUs), against the local cluster: \
{services} Services × {endpoints} endpoints in the API server, the control plane as its own process, and P simulated \
proxies (each its own TLS connection and stream with a workload certificate, acknowledging every response), spread \
over {IDENTITIES} identities (service accounts) in {IDENTITY_NAMESPACES} namespaces. Each scenario makes {changes} \
single-endpoint changes (an EndpointSlice patch) one after the other; latency runs from sending the patch to the API \
server until a proxy has sent its ACK, over every proxy and change (p50/p99/max), and until the control plane has \
counted every proxy's ACK (`mycel_control_plane_acks_total`, polled every millisecond; p50 and max over the changes). \
Then 5 bursts of {BURST} changes sent at once (closer together than the 10 ms debounce): the time until the control \
plane has every ACK of a burst, and how many responses each proxy received per burst (1 when the burst is coalesced). \
The simulated proxies share the machine's cores with the control plane and the API server.\n\n\
| proxies | p50 ms | p99 ms | max ms | CP has every ACK: p50 / max ms | burst of {BURST}: p50 / max ms | responses per proxy and burst | CP RSS MiB (idle) | CP CPU s | CPU µs per proxy and change: CP / simulated proxies | bytes/change (all proxies) | bytes/change/proxy | full sync bytes/proxy | initial sync s |\n\
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        time_now()
    );
    for r in results {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} | {} / {} | {} | {} ({}) | {} | {} / {} | {} | {} | {} | {} |\n",
            r["proxies"],
            r["p50_ms"],
            r["p99_ms"],
            r["max_ms"],
            r["cp_acked_p50_ms"],
            r["cp_acked_max_ms"],
            r["burst_p50_ms"],
            r["burst_max_ms"],
            r["burst_responses_per_proxy"],
            r["rss_mib"],
            r["rss_idle_mib"],
            r["cpu_s"],
            r["cp_cpu_us_per_proxy_change"],
            r["sim_cpu_us_per_proxy_change"],
            r["bytes_per_change"],
            r["bytes_per_change_per_proxy"],
            r["full_sync_bytes_per_proxy"],
            r["initial_sync_s"]
        ));
    }
    md.push_str(
        "\nCPU s is the control plane's user+system time over the scenario (connecting and syncing P proxies, the \
changes and the bursts); CPU µs per proxy and change, and bytes per change, are of the single changes only. Bytes are \
protobuf bytes of the responses the control plane sent (`mycel_control_plane_push_bytes_total`). A burst is usually \
two responses per proxy, by design: a change after a quiet spell goes out at once (the leading edge) and the rest of \
the burst is coalesced into the next.\n",
    );
    std::fs::write(root.join("control-plane.md"), md).unwrap();
    println!("wrote {}", root.join("control-plane.md").display());
}

/// The baseline against this build, round by round, with the median of each.
fn write_comparison(
    results: &[serde_json::Value],
    baseline: &str,
    services: usize,
    endpoints: usize,
    changes: usize,
) {
    let root = TestCluster::repo_root().join("docs/benchmarks");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("control-plane-vs-baseline.json"),
        serde_json::to_string_pretty(results).unwrap() + "\n",
    )
    .unwrap();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut md = format!(
        "# Control-plane benchmark: baseline against this build\n\nProduced by `just bench-control-plane-baseline {baseline}` \
on {} ({cpus} CPUs): the scenario of [control-plane.md](control-plane.md) ({services} Services × {endpoints} endpoints, \
{changes} single-endpoint changes, latency from the patch to each proxy's ACK), run with each binary in turn, in \
interleaved rounds (the baseline starts every other round).\n\n\
| proxies | binary | round | p50 ms | p99 ms | max ms | CP has every ACK: p50 / max ms | burst of {BURST}: p50 / max ms | responses per proxy and burst | CP RSS MiB (idle) | CP CPU s | initial sync s |\n\
|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        time_now()
    );
    for r in results {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} | {} ({}) | {} | {} |\n",
            r["proxies"],
            r["binary"].as_str().unwrap_or(""),
            r["round"],
            r["p50_ms"],
            r["p99_ms"],
            r["max_ms"],
            r["cp_acked_p50_ms"],
            r["cp_acked_max_ms"],
            r["burst_p50_ms"],
            r["burst_max_ms"],
            r["burst_responses_per_proxy"],
            r["rss_mib"],
            r["rss_idle_mib"],
            r["cpu_s"],
            r["initial_sync_s"]
        ));
    }
    md.push_str("\nMedians over the rounds:\n\n| proxies | binary | p50 ms | p99 ms | CP has every ACK, max ms | burst, max ms | CP RSS MiB | CP CPU s | initial sync s |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut proxies: Vec<u64> = results.iter().filter_map(|r| r["proxies"].as_u64()).collect();
    proxies.dedup();
    for p in proxies {
        for binary in ["baseline", "new"] {
            let of: Vec<&serde_json::Value> = results
                .iter()
                .filter(|r| r["proxies"].as_u64() == Some(p) && r["binary"] == binary)
                .collect();
            let median = |field: &str| {
                let mut v: Vec<f64> = of.iter().filter_map(|r| r[field].as_f64()).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
            };
            md.push_str(&format!(
                "| {p} | {binary} | {} | {} | {} | {} | {} | {} | {} |\n",
                median("p50_ms"),
                median("p99_ms"),
                median("cp_acked_max_ms"),
                median("burst_max_ms"),
                median("rss_mib"),
                median("cpu_s"),
                median("initial_sync_s")
            ));
        }
    }
    std::fs::write(root.join("control-plane-vs-baseline.md"), md).unwrap();
    println!("wrote {}", root.join("control-plane-vs-baseline.md").display());
}

fn time_now() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
