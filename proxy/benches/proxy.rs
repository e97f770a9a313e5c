//! Proxy benchmark, side by side in one run: a direct connection, one `mycel-proxy` hop, two
//! hops (client sidecar → server sidecar), nginx and HAProxy, against one HTTP/1.1 server
//! answering 1 KiB. Open-loop constant-rate load with coordinated-omission correction (latency
//! counts from when a request was due, not when it was sent), saturation throughput per proxy
//! CPU second, memory, and TCP throughput.
//!
//! Run: `cargo bench -p mycel-proxy --bench proxy` (or `just bench-proxy`). Every proxy gets one
//! worker. `MYCEL_BENCH_SECONDS` (default 5) sets each measurement's length, `MYCEL_BENCH_ROUNDS`
//! (default 3) how many times each latency measurement is repeated. `MYCEL_BENCH_PROXY` names
//! the proxy binary to measure: `just bench-proxy` sets it to a static build, the binary the
//! images ship (see the Dockerfile); without it, the bench build of this package is measured.
//! Results are printed and written to `docs/benchmarks/proxy.md` and `docs/benchmarks/proxy.json`.
//! `MYCEL_BENCH_BASELINE=<binary>` adds a second mycel build ("baseline (1 hop)") to every round,
//! side by side, and writes `docs/benchmarks/proxy-vs-baseline.{md,json}` instead.

#![allow(unsafe_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const BODY: usize = 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Helper roles of this same binary, run as separate processes.
    if let Some(pos) = args.iter().position(|a| a == "--role") {
        let role = args.get(pos + 1).map(String::as_str).unwrap_or("");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        match role {
            "http-server" => rt.block_on(http_server()),
            "tcp-sink" => rt.block_on(tcp_sink()),
            "grpc-server" => rt.block_on(grpc_server()),
            // For profiling one target alone: `--role load <addr> <seconds>` (closed loop, 64
            // connections) prints the request rate.
            // `--role rate <addr> <req/s> <seconds>`: open loop, 32 connections; prints quantiles.
            "rate" => {
                let addr: SocketAddr = args[pos + 2].parse().expect("--role rate <addr> <req/s> <seconds>");
                let rate: f64 = args[pos + 3].parse().expect("--role rate <addr> <req/s> <seconds>");
                let secs: f64 = args[pos + 4].parse().expect("--role rate <addr> <req/s> <seconds>");
                let r = rt.block_on(open_loop(addr, rate, secs, 32));
                let q = |p: f64| r.hist.value_at_quantile(p);
                println!(
                    "p50 {} p90 {} p99 {} p999 {} errors {}",
                    q(0.5),
                    q(0.9),
                    q(0.99),
                    q(0.999),
                    r.errors
                );
            }
            "load" => {
                let addr: SocketAddr = args[pos + 2].parse().expect("--role load <addr> <seconds>");
                let secs: f64 = args[pos + 3].parse().expect("--role load <addr> <seconds>");
                let (n, took) = rt.block_on(closed_loop(addr, secs, 64));
                println!("{:.0} req/s", n as f64 / took.as_secs_f64());
            }
            _ => panic!("unknown role {role}"),
        }
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // `MYCEL_BENCH_ONLY=authz` (`just bench-authz`): the cost of authorization policies alone.
    if std::env::var("MYCEL_BENCH_ONLY").as_deref() == Ok("authz") {
        rt.block_on(authz());
        return;
    }
    // `MYCEL_BENCH_ONLY=ratelimit` (`just bench-ratelimit`): the cost of local rate limits.
    if std::env::var("MYCEL_BENCH_ONLY").as_deref() == Ok("ratelimit") {
        rt.block_on(ratelimit());
        return;
    }
    rt.block_on(run());
}

// --- authorization policies -------------------------------------------------------------------

/// An inbound sidecar (plaintext, from its configuration file) in front of `upstream`, with
/// `extra` configuration (its authorization policies).
async fn inbound_proxy(name: &str, upstream: SocketAddr, extra: &str) -> (Proc, SocketAddr) {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = format!(
        "admin: '127.0.0.1:{}'\nlisteners:\n- {{name: inbound, address: '{addr}', protocol: http, direction: inbound, cluster: app}}\nclusters:\n- {{name: app, endpoints: ['{upstream}']}}\n{extra}",
        free_port()
    );
    (spawn_proxy(&proxy_binary(), name, &cfg, &[], addr).await, addr)
}

/// `policies` ALLOW policies of `rules` rules each, none matching the benchmark's `GET /` but
/// the last rule of the last policy: every request is checked against them all. With `paths`,
/// each rule names two paths (one a template), which the proxy's path index can skip by; without,
/// methods and a header condition only, which it cannot.
fn authorization(policies: usize, rules: usize, paths: bool) -> String {
    let mut y = String::from("authorization:\n");
    for i in 0..policies {
        y.push_str(&format!("- name: bench/p{i:02}\n  action: ALLOW\n  rules:\n"));
        for j in 0..rules {
            if i == policies - 1 && j == rules - 1 {
                y.push_str("  - to: [{methods: [GET], paths: ['/']}]\n");
            } else if paths {
                y.push_str(&format!(
                    "  - to: [{{methods: [GET, POST], paths: ['/api/{i}/{j}/*', '/v{j}/{{*}}/items/{{**}}']}}]\n    when: [{{key: 'request.headers[x-tenant]', values: ['t-{i}-{j}']}}]\n"
                ));
            } else {
                y.push_str(&format!(
                    "  - to: [{{methods: [GET, POST]}}]\n    when: [{{key: 'request.headers[x-tenant]', values: ['t-{i}-{j}']}}]\n"
                ));
            }
        }
    }
    y
}

/// CPU per request of an inbound sidecar with 50 ALLOW policies of 10 rules each (the matching
/// rule last) against one without policies, in interleaved rounds; writes
/// docs/benchmarks/authz.{md,json}.
async fn authz() {
    let secs: f64 = std::env::var("MYCEL_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let rounds: usize = std::env::var("MYCEL_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let (_server, upstream) = spawn_role("http-server");
    let (none, none_addr) = inbound_proxy("authz-none", upstream, "").await;
    let (paths, paths_addr) = inbound_proxy("authz-paths", upstream, &authorization(50, 10, true)).await;
    let (flat, flat_addr) = inbound_proxy("authz-flat", upstream, &authorization(50, 10, false)).await;
    // The policies are in force: what the last rule names passes, anything else is refused.
    for addr in [paths_addr, flat_addr] {
        let mut s = connect(addr).await;
        assert!(request(&mut s).await, "GET / passes the policies");
        let denied = Request::get("/other").header("host", "bench").body(Full::new(Bytes::new())).unwrap();
        let mut s = connect(addr).await;
        s.ready().await.unwrap();
        assert_eq!(s.send_request(denied).await.unwrap().status(), 403, "GET /other is denied");
    }
    let targets = [
        ("no policy", none_addr, none.pid()),
        ("50 × 10 rules with paths", paths_addr, paths.pid()),
        ("50 × 10 rules without paths", flat_addr, flat.pid()),
    ];
    // (requests, CPU seconds) per round, per target.
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let (name, addr, pid) = targets[i];
            let cpu0 = cpu_seconds(pid);
            let (n, took) = closed_loop(addr, secs, 64).await;
            let cpu = cpu_seconds(pid) - cpu0;
            println!(
                "round {} {name}: {:.0} req/s, {:.2} µs CPU/request",
                round + 1,
                n as f64 / took.as_secs_f64(),
                cpu * 1e6 / n as f64
            );
            runs[i].push((n as f64, cpu));
        }
    }
    let per_request: Vec<Vec<f64>> =
        runs.iter().map(|r| r.iter().map(|(n, cpu)| cpu * 1e6 / n).collect()).collect();
    let (machine, date) = machine_and_date();
    let mut md = format!(
        "# Authorization policy cost\n\nMachine: {machine}. Date: {date}. Command: `just bench-authz` ({secs} s per measurement, {rounds} rounds, the sidecars taking turns).\n\n\
Three inbound sidecars of the same build, one worker each, in front of the same HTTP/1.1 server, each loaded in a closed loop (64 keep-alive connections, `GET /`): \
one without policies; one with 50 ALLOW policies of 10 rules each, each rule naming methods, two paths (one a `{{*}}`/`{{**}}` template) and a header condition; \
one with 50 × 10 rules of methods and a header condition only. In the two with policies, no rule matches `GET /` but the last rule of the last policy. \
The figure is the sidecar's CPU time per request. The proxy indexes rules by the literal path prefix they need, so a request is checked only against \
the rules its path may meet (and those without paths); the third sidecar shows the cost when no rule can be skipped.\n\n\
| target | CPU µs per request (median) | each round |\n|---|---|---|\n"
    );
    for ((name, _, _), v) in targets.iter().zip(&per_request) {
        md.push_str(&format!("| {name} | {:.2} | {} |\n", median(v.clone()), list(v, 2)));
    }
    md.push_str("\nPer round, with policies ÷ without (the target is at most 1.05 for the first):\n\n| policies | median | each round |\n|---|---|---|\n");
    let mut ratios = Vec::new();
    for k in 1..targets.len() {
        let r: Vec<f64> = per_request[0].iter().zip(&per_request[k]).map(|(b, p)| p / b).collect();
        md.push_str(&format!("| {} | **{:.3}** | {} |\n", targets[k].0, median(r.clone()), list(&r, 3)));
        ratios.push(json!({"target": targets[k].0, "per_round": r, "median": median(r.clone())}));
    }
    println!("{md}");
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("authz.md"), &md).unwrap();
    let json = json!({"machine": machine, "date": date, "seconds": secs, "rounds": rounds,
        "cpu_us_per_request": targets.iter().zip(&per_request).map(|((n, _, _), v)| json!({"target": n, "rounds": v})).collect::<Vec<_>>(),
        "ratios": ratios});
    std::fs::write(out_dir.join("authz.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    drop((none, paths, flat));
    let _ = std::fs::remove_dir_all(dir());
}

// --- rate limits --------------------------------------------------------------------------------

/// What a request pays for local and global rate limits that admit it: CPU per request (closed loop) and
/// added p50/p99 latency (open loop at a fixed rate), against a sidecar without limits, in
/// interleaved rounds; writes docs/benchmarks/ratelimit.{md,json}.
async fn ratelimit() {
    let secs: f64 = std::env::var("MYCEL_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let rounds: usize = std::env::var("MYCEL_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let rate = 2000.0;
    let (_server, upstream) = spawn_role("http-server");
    // Limits high enough never to refuse: the cost of counting, not of refusing.
    let one = "rateLimits:\n- {policy: bench/rl, name: all, requests: 1000000000, perSeconds: 1}\n";
    let keyed = "rateLimits:\n- {policy: bench/rl, name: all, requests: 1000000000, perSeconds: 1}\n- {policy: bench/rl, name: by-ip, requests: 1000000000, perSeconds: 1, key: sourceIp}\n- {policy: bench/rl, name: by-path, requests: 1000000000, perSeconds: 1, key: path, match: {path: {prefix: /}, method: GET}}\n";
    let (none, none_addr) = inbound_proxy("rl-none", upstream, "").await;
    let (single, single_addr) = inbound_proxy("rl-one", upstream, one).await;
    let (three, three_addr) = inbound_proxy("rl-three", upstream, keyed).await;
    // The limits are in force: a sidecar with a small one refuses what is over it.
    let (small, small_addr) = inbound_proxy(
        "rl-small",
        upstream,
        "rateLimits:\n- {policy: bench/rl, name: small, requests: 5, perSeconds: 60}\n",
    )
    .await;
    let mut refused = 0;
    for _ in 0..10 {
        let mut s = connect(small_addr).await;
        s.ready().await.unwrap();
        let r = Request::get("/").header("host", "bench").body(Full::new(Bytes::new())).unwrap();
        if s.send_request(r).await.unwrap().status() == 429 {
            refused += 1;
        }
    }
    assert_eq!(refused, 5, "a limit of 5 refuses 5 of 10");
    drop(small);
    let mut targets = vec![
        ("no limit", none_addr, none.pid()),
        ("1 limit (one bucket)", single_addr, single.pid()),
        ("3 limits (one bucket, by address, by path)", three_addr, three.pid()),
    ];
    // A global limit: a sidecar of the mesh asks the rate-limit service, which counts in Redis.
    let global = match Global::start(upstream).await {
        Ok(g) => Some(g),
        Err(why) => {
            println!("no global limit rows: {why}");
            None
        }
    };
    if let Some(g) = &global {
        targets.push(("1 global limit (rate-limit service, Redis)", g.sidecar_addr, g.sidecar.pid()));
    }
    let global_at = global.as_ref().map(|_| targets.len() - 1);
    // Per round, of the global target's closed loop: (requests, service CPU s, Redis CPU s,
    // Redis scripts).
    let mut global_runs: Vec<(f64, f64, f64, f64)> = Vec::new();
    // Per round, per target: (requests, CPU seconds) closed loop; (p50, p99) µs open loop.
    let mut cpu_runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); targets.len()];
    let mut lat_runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let (name, addr, pid) = targets[i];
            let cpu0 = cpu_seconds(pid);
            let others0 = global.as_ref().filter(|_| Some(i) == global_at).map(|g| g.counters());
            let (n, took) = closed_loop(addr, secs, 64).await;
            let cpu = cpu_seconds(pid) - cpu0;
            if let (Some(g), Some((s0, r0, c0))) = (&global, others0) {
                let (s1, r1, c1) = g.counters();
                global_runs.push((n as f64, s1 - s0, r1 - r0, c1 - c0));
            }
            let run = open_loop(addr, rate, secs, 16).await;
            let (p50, p99) =
                (run.hist.value_at_quantile(0.5) as f64, run.hist.value_at_quantile(0.99) as f64);
            let achieved = run.done as f64 / run.elapsed.as_secs_f64();
            println!(
                "round {} {name}: {:.0} req/s closed loop, {:.2} µs CPU/request; open loop {achieved:.0} req/s ({} errors), p50 {p50} µs, p99 {p99} µs",
                round + 1,
                n as f64 / took.as_secs_f64(),
                cpu * 1e6 / n as f64,
                run.errors
            );
            cpu_runs[i].push((n as f64, cpu));
            lat_runs[i].push((p50, p99, achieved));
        }
    }
    let per_request: Vec<Vec<f64>> =
        cpu_runs.iter().map(|r| r.iter().map(|(n, cpu)| cpu * 1e6 / n).collect()).collect();
    let (machine, date) = machine_and_date();
    let mut md = format!(
        "# Rate limit cost\n\nMachine: {machine}. Date: {date}. Command: `just bench-ratelimit` ({secs} s per measurement, {rounds} rounds, the sidecars taking turns).\n\n\
Inbound sidecars of the same build, one worker each, in front of the same HTTP/1.1 server (`GET /`): one without limits; one with one local limit (one bucket); \
one with three (one bucket, one per client address, one per path with a match); and, with redis-server installed, one with a global limit (below). The limits are high enough never to refuse, so the figures are the cost of counting \
(a fourth sidecar with a limit of 5 was checked to refuse 5 of 10 requests first). CPU per request is the sidecar's CPU time in a closed loop (64 keep-alive connections); \
latency is measured in an open loop at {rate:.0} req/s over 16 connections (from when each request was due).\n\n\
| target | CPU µs per request (median) | each round | p50 µs (median) | p99 µs (median) | achieved req/s (open loop) |\n|---|---|---|---|---|---|\n"
    );
    for (((name, _, _), v), l) in targets.iter().zip(&per_request).zip(&lat_runs) {
        md.push_str(&format!(
            "| {name} | {:.2} | {} | {:.0} | {:.0} | {:.0} |\n",
            median(v.clone()),
            list(v, 2),
            median(l.iter().map(|x| x.0).collect()),
            median(l.iter().map(|x| x.1).collect()),
            median(l.iter().map(|x| x.2).collect()),
        ));
    }
    md.push_str("\nPer round, with limits ÷ without:\n\n| limits | CPU per request, median | each round | p99, median | each round |\n|---|---|---|---|---|\n");
    let mut ratios = Vec::new();
    for k in 1..targets.len() {
        let r: Vec<f64> = per_request[0].iter().zip(&per_request[k]).map(|(b, p)| p / b).collect();
        let p99: Vec<f64> = lat_runs[0].iter().zip(&lat_runs[k]).map(|(b, p)| p.1 / b.1).collect();
        md.push_str(&format!(
            "| {} | **{:.3}** | {} | {:.3} | {} |\n",
            targets[k].0,
            median(r.clone()),
            list(&r, 3),
            median(p99.clone()),
            list(&p99, 3)
        ));
        ratios.push(json!({"target": targets[k].0, "cpu_per_round": r, "p99_per_round": p99}));
    }
    let mut global_json = json!(null);
    if let Some(g) = &global {
        let service_us: Vec<f64> = global_runs.iter().map(|(n, s, _, _)| s * 1e6 / n).collect();
        let per_core: Vec<f64> = global_runs.iter().map(|(n, s, _, _)| n / s).collect();
        let redis_us: Vec<f64> = global_runs.iter().map(|(n, _, r, _)| r * 1e6 / n).collect();
        let scripts: Vec<f64> = global_runs.iter().map(|(n, _, _, c)| c / n).collect();
        let undecided_rounds = undecided(g.sidecar_admin).await;
        let (limit, acc_secs, a, b, undecided) = g.accuracy(secs).await;
        let admitted = (a + b) as f64 / acc_secs;
        md.push_str(&format!(
            "\n## Global limit\n\nThe fourth sidecar is a mesh sidecar (its certificate from the benchmark's CA) with one global limit, high enough never to refuse: \
for each request it asks `mycel-ratelimit` (the same build, over mutual TLS, one HTTP/2 connection), which runs one Lua script in a local `redis-server` \
(Debian's, no persistence). Its row above is the sidecar's own CPU and the latency a client sees; the service and Redis spend, per request (same closed loops):\n\n\
| | median | each round |\n|---|---|---|\n\
| rate-limit service CPU µs per request | {:.2} | {} |\n\
| rate-limit service: requests decided per CPU second (per core) | {:.0} | {} |\n\
| Redis CPU µs per request | {:.2} | {} |\n\
| Redis scripts per request | {:.3} | {} |\n\n\
Over all its rounds the sidecar admitted {undecided_rounds} requests undecided (no answer within its 1 s timeout, failure mode Open).\n\n\
**Accuracy under load**: two such sidecars share a global limit of {limit}/s; each is loaded as fast as 32 connections go, at once, for {acc_secs:.0} s after a second \
that spends the burst: they admitted {a} and {b}, **{admitted:.1}/s in all ({:+.2} % of the limit)**; {undecided} requests were admitted undecided (failure mode Open, \
no answer within the 1 s timeout).\n",
            median(service_us.clone()),
            list(&service_us, 2),
            median(per_core.clone()),
            list(&per_core, 0),
            median(redis_us.clone()),
            list(&redis_us, 2),
            median(scripts.clone()),
            list(&scripts, 3),
            (admitted / limit as f64 - 1.0) * 100.0,
        ));
        global_json = json!({"service_cpu_us_per_request": service_us, "service_requests_per_cpu_second": per_core,
            "redis_cpu_us_per_request": redis_us, "redis_scripts_per_request": scripts, "undecided_in_rounds": undecided_rounds,
            "accuracy": {"limit_per_second": limit, "seconds": acc_secs, "admitted": [a, b], "admitted_per_second": admitted, "undecided": undecided}});
    } else {
        md.push_str("\nNo global limit rows: redis-server was not found (scripts/setup installs it).\n");
    }
    println!("{md}");
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("ratelimit.md"), &md).unwrap();
    let json = json!({"machine": machine, "date": date, "seconds": secs, "rounds": rounds, "open_loop_rate": rate,
        "cpu_us_per_request": targets.iter().zip(&per_request).map(|((n, _, _), v)| json!({"target": n, "rounds": v})).collect::<Vec<_>>(),
        "latency_us": targets.iter().zip(&lat_runs).map(|((n, _, _), v)| json!({"target": n, "p50_p99_achieved": v})).collect::<Vec<_>>(),
        "ratios": ratios, "global": global_json});
    std::fs::write(out_dir.join("ratelimit.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    drop((none, single, three, global));
    let _ = std::fs::remove_dir_all(dir());
}

/// Redis, the rate-limit service, and a mesh sidecar with a global limit in front of the app.
struct Global {
    redis: Proc,
    redis_port: u16,
    service: Proc,
    service_addr: SocketAddr,
    cp: SocketAddr,
    upstream: SocketAddr,
    sidecar: Proc,
    sidecar_addr: SocketAddr,
    sidecar_admin: SocketAddr,
}

const RLS_ID: &str = "spiffe://cluster.local/ns/mycel-system/sa/mycel-ratelimit";

impl Global {
    async fn start(upstream: SocketAddr) -> Result<Global, String> {
        let bin = which("redis-server").ok_or("redis-server is not installed (scripts/setup installs it)")?;
        which("redis-cli").ok_or("redis-cli is not installed")?;
        let (cp, _ca) = mesh::start(&dir()).await;
        let redis_port = free_port();
        let child = Command::new(bin)
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let redis = Proc { child };
        wait_port(SocketAddr::from(([127, 0, 0, 1], redis_port))).await;
        let rls_bin = match std::env::var_os("MYCEL_BENCH_PROXY") {
            Some(p) => PathBuf::from(p).with_file_name("mycel-ratelimit"),
            None => PathBuf::from(env!("CARGO_BIN_EXE_mycel-ratelimit")),
        };
        let (service_addr, admin) = (
            SocketAddr::from(([127, 0, 0, 1], free_port())),
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        );
        let d = dir();
        let child = Command::new(&rls_bin)
            .args(["--redis", &format!("127.0.0.1:{redis_port}"), "--redis-timeout-ms", "1000"])
            .args(["--listen", &service_addr.to_string(), "--admin", &admin.to_string()])
            .args(["--local", &format!("127.0.0.1:{}", free_port())])
            .args(["--control-plane", &cp.to_string(), "--control-plane-name", mesh::NAME])
            .arg("--ca-roots")
            .arg(d.join("ca.pem"))
            .arg("--token")
            .arg(d.join("token"))
            .args([
                "--pod-namespace",
                "mycel-system",
                "--service-account",
                "mycel-ratelimit",
                "--pod-name",
                "rls",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", rls_bin.display()))?;
        let service = Proc { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(admin, "/healthz/ready").await.map(|r| r.0) != Some(200) {
            if Instant::now() > deadline {
                return Err("the rate-limit service was not ready in 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (sidecar, sidecar_addr, sidecar_admin) =
            global_sidecar("rl-global", upstream, cp, service_addr, "bench/rl", 1_000_000_000).await;
        Ok(Global {
            redis,
            redis_port,
            service,
            service_addr,
            cp,
            upstream,
            sidecar,
            sidecar_addr,
            sidecar_admin,
        })
    }

    /// The service's and Redis's CPU seconds, and the scripts Redis ran.
    fn counters(&self) -> (f64, f64, f64) {
        (
            cpu_seconds(self.service.pid()),
            cpu_seconds(self.redis.pid()),
            redis_scripts(self.redis_port) as f64,
        )
    }

    /// Two sidecars sharing a global limit, loaded at once as fast as they go: (limit, seconds,
    /// admitted by each, admitted undecided).
    async fn accuracy(&self, secs: f64) -> (u64, f64, u64, u64, u64) {
        let limit = 1000;
        let (a, a_addr, a_admin) =
            global_sidecar("rl-acc-a", self.upstream, self.cp, self.service_addr, "bench/acc", limit).await;
        let (b, b_addr, b_admin) =
            global_sidecar("rl-acc-b", self.upstream, self.cp, self.service_addr, "bench/acc", limit).await;
        // The burst (a second's worth) first, then the measurement; a closed loop counts the
        // requests answered 200 (a refused one is answered 429).
        let _ = tokio::join!(closed_loop(a_addr, 1.0, 32), closed_loop(b_addr, 1.0, 32));
        let ((x, _), (y, _)) = tokio::join!(closed_loop(a_addr, secs, 32), closed_loop(b_addr, secs, 32));
        let undecided = undecided(a_admin).await + undecided(b_admin).await;
        drop((a, b));
        (limit, secs, x, y, undecided)
    }
}

/// A mesh sidecar (inbound, plaintext from the load) in front of `upstream` whose one limit of
/// `requests` a second, scope global, is counted by the service at `service`.
async fn global_sidecar(
    name: &str,
    upstream: SocketAddr,
    cp: SocketAddr,
    service: SocketAddr,
    policy: &str,
    requests: u64,
) -> (Proc, SocketAddr, SocketAddr) {
    let (addr, admin) =
        (SocketAddr::from(([127, 0, 0, 1], free_port())), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let config = format!(
        "admin: '{admin}'\nlisteners:\n- {{name: inbound, address: '{addr}', protocol: http, direction: inbound, cluster: app}}\nclusters:\n- {{name: app, endpoints: ['{upstream}']}}\n"
    );
    // The limit arrives as the control plane streams it: in the pod's inbound policy.
    use mycel_api::v1alpha1 as pb;
    let limit = pb::RateLimit {
        policy: policy.into(),
        name: "g".into(),
        requests,
        per_seconds: 1,
        burst: requests,
        key: Some(pb::RateLimitKey::default()),
        global: true,
        failure_open: true,
        ..Default::default()
    };
    let inbound = pb::PeerPolicy {
        mode: pb::MtlsMode::MtlsPermissive as i32,
        rate_limits: vec![limit],
        rate_limit_service: Some(pb::RateLimitService {
            address: service.to_string(),
            identity: RLS_ID.into(),
            timeout_ms: 1000,
        }),
        ..Default::default()
    };
    mesh::POLICIES.lock().unwrap().insert(name.to_string(), inbound);
    let p = mesh_proxy(name, &config, cp, "server", addr).await;
    // Until it has its certificate and the service answers it: a request is admitted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if get(addr, "/").await.map(|r| r.0) == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "the global-limit sidecar never answered 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (p, addr, admin)
}

/// Requests a sidecar admitted without a decision (failure mode Open), from its metrics.
async fn undecided(admin: SocketAddr) -> u64 {
    let text = get(admin, "/metrics").await.map(|r| r.1).unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("mycel_ratelimit_decisions_total{") && l.contains("result=\"failure_open\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The scripts (EVALSHA and EVAL calls) a Redis on `port` has run.
fn redis_scripts(port: u16) -> u64 {
    let out = Command::new("redis-cli").args(["-p", &port.to_string(), "info", "commandstats"]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_evalsha:").or_else(|| l.strip_prefix("cmdstat_eval:")))
        .filter_map(|rest| rest.split(',').find_map(|f| f.strip_prefix("calls="))?.trim().parse::<u64>().ok())
        .sum()
}

/// GET `path`: the status and the body, or `None` when nothing answers.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let s = TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.ok()?;
    tokio::spawn(conn);
    let req = Request::get(path).header("host", "localhost").body(Full::new(Bytes::new())).ok()?;
    let r = send.send_request(req).await.ok()?;
    let status = r.status().as_u16();
    let b = r.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&b).into_owned()))
}

/// The median of rounds.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Rounds as a list, `d` decimals each.
fn list(v: &[f64], d: usize) -> String {
    v.iter().map(|x| format!("{x:.d$}")).collect::<Vec<_>>().join(", ")
}

/// What a report says of where and when it ran.
fn machine_and_date() -> (String, String) {
    let machine = format!(
        "{} CPUs, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    let date =
        String::from_utf8(Command::new("date").arg("+%F").output().map(|o| o.stdout).unwrap_or_default())
            .unwrap_or_default()
            .trim()
            .to_string();
    (machine, date)
}

// --- helper processes --------------------------------------------------------------------------

async fn http_server() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", l.local_addr().unwrap());
    let body = Bytes::from(vec![b'x'; BODY]);
    loop {
        let (s, _) = l.accept().await.unwrap();
        let _ = s.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
        });
    }
}

async fn tcp_sink() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", l.local_addr().unwrap());
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n as u64,
                }
            }
            let _ = s.write_all(format!("{total}").as_bytes()).await;
        });
    }
}

struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A killed nginx master leaves its workers running (still listening, and counting as
        // load in the next measurements): kill the children first.
        let pid = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) with a pid read from /proc has no memory-safety preconditions.
            unsafe { libc::kill(child, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_role(role: &str) -> (Proc, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--role", role])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (Proc { child }, line.trim().parse().unwrap())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_port(addr: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("mycel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn mycel(name: &str, protocol: &str, upstream: SocketAddr) -> (Proc, SocketAddr) {
    mycel_of(&proxy_binary(), name, protocol, upstream).await
}

/// A proxy of `binary` (the one under test, or the baseline it is compared with).
async fn mycel_of(
    binary: &std::path::Path,
    name: &str,
    protocol: &str,
    upstream: SocketAddr,
) -> (Proc, SocketAddr) {
    let port = free_port();
    let config = format!(
        "admin: '127.0.0.1:{}'\nlisteners:\n- {{name: front, address: '127.0.0.1:{port}', protocol: {protocol}, cluster: back}}\nclusters:\n- {{name: back, lb: {{algorithm: RoundRobin}}, endpoints: ['{upstream}']}}\n",
        free_port()
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    (spawn_proxy(binary, name, &config, &[], addr).await, addr)
}

/// Runs `binary` with `config` (written as `<name>.yaml`) and `extra` arguments, one worker,
/// until it listens on `listen`.
async fn spawn_proxy(
    binary: &std::path::Path,
    name: &str,
    config: &str,
    extra: &[std::ffi::OsString],
    listen: SocketAddr,
) -> Proc {
    let cfg = dir().join(format!("{name}.yaml"));
    std::fs::write(&cfg, config).unwrap();
    let child = Command::new(binary)
        .args(["run", "--concurrency", "1", "--config"])
        .arg(&cfg)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_port(listen).await;
    Proc { child }
}

/// nginx with one worker in front of `upstream`: proxying HTTP/1.1 (`grpc` false) or gRPC
/// (HTTP/2 with prior knowledge on both sides, `grpc_pass`).
async fn nginx(upstream: SocketAddr, grpc: bool) -> Option<(Proc, SocketAddr)> {
    let bin = which("nginx")?;
    let port = free_port();
    let d = dir().join(if grpc { "nginx-grpc" } else { "nginx" });
    let (upstream_block, server_block) = if grpc {
        // A long gRPC stream is one request body: no size limit on it.
        (
            format!(
                "client_max_body_size 0;\n  upstream b {{ server {upstream}; keepalive 64; keepalive_requests 10000000; }}"
            ),
            format!("listen 127.0.0.1:{port} http2;\n    location / {{ grpc_pass grpc://b; }}"),
        )
    } else {
        (
            format!("upstream b {{ server {upstream}; keepalive 256; keepalive_requests 10000000; }}"),
            format!(
                "listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}"
            ),
        )
    };
    nginx_run(&bin, &d, port, &upstream_block, &server_block).await
}

/// Runs nginx with one worker from `d`, `server_block` listening on `port`.
async fn nginx_run(
    bin: &Path,
    d: &Path,
    port: u16,
    upstream_block: &str,
    server_block: &str,
) -> Option<(Proc, SocketAddr)> {
    std::fs::create_dir_all(d.join("logs")).ok()?;
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {pid};\nerror_log {err} warn;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  keepalive_requests 10000000;\n  {upstream_block}\n  server {{\n    {server_block}\n  }}\n}}\n",
            pid = d.join("nginx.pid").display(),
            err = d.join("logs/error.log").display()
        ),
    )
    .ok()?;
    let child = Command::new(bin)
        .arg("-p")
        .arg(d)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_port(addr).await;
    // The worker does the proxying: measure it, not the master.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Some((Proc { child }, addr))
}

async fn haproxy(mode: &str, upstream: SocketAddr) -> Option<(Proc, SocketAddr)> {
    let bin = which("haproxy")?;
    let port = free_port();
    let cfg = dir().join(format!("haproxy-{mode}.cfg"));
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 1\n  maxconn 8000\ndefaults\n  mode {}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n{reuse}listen front\n  bind 127.0.0.1:{port}{h2}\n  server s1 {upstream}{h2}\n",
            if mode == "tcp" { "tcp" } else { "http" },
            reuse = if mode == "tcp" { "" } else { "  http-reuse always\n" },
            // gRPC: HTTP/2 with prior knowledge on both sides.
            h2 = if mode == "grpc" { " proto h2" } else { "" }
        ),
    )
    .ok()?;
    let child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_port(addr).await;
    Some((Proc { child }, addr))
}

fn which(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists())
}

/// The process doing the proxying: nginx's worker is the master's only child.
fn worker_pid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next()?.parse().ok())
        .unwrap_or(pid)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc_sysconf_clk_tck() }
}

unsafe fn libc_sysconf_clk_tck() -> f64 {
    unsafe extern "C" {
        fn sysconf(name: i32) -> i64;
    }
    const SC_CLK_TCK: i32 = 2;
    unsafe { sysconf(SC_CLK_TCK) as f64 }
}

/// The proxy binary under test.
fn proxy_binary() -> PathBuf {
    match std::env::var_os("MYCEL_BENCH_PROXY") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_mycel-proxy")),
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

// --- load --------------------------------------------------------------------------------------

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let s = TcpStream::connect(addr).await.unwrap();
    let _ = s.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn request(send: &mut Sender) -> bool {
    if send.ready().await.is_err() {
        return false;
    }
    let req = Request::get("/").header("host", "bench").body(Full::new(Bytes::new())).unwrap();
    match send.send_request(req).await {
        Ok(r) => {
            r.status().is_success()
                && r.into_body().collect().await.map(|b| b.to_bytes().len() == BODY).unwrap_or(false)
        }
        Err(_) => false,
    }
}

struct Run {
    hist: Histogram<u64>,
    done: u64,
    errors: u64,
    elapsed: Duration,
}

/// Open loop: `conns` connections share `rate` requests/s; each request's latency counts from
/// the moment it was due.
async fn open_loop(addr: SocketAddr, rate: f64, secs: f64, conns: usize) -> Run {
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let mut send = connect(addr).await;
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut done, mut errors) = (0u64, 0u64);
            let offset = interval.mul_f64(c as f64 / conns as f64);
            let mut i = 0u32;
            let mut prev_done = start;
            loop {
                let due = start + offset + interval * i;
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due).await;
                // Coordinated omission: when the previous response came late, this request was
                // held up by the system and its latency counts from when it was due. When the
                // connection was idle in time, the delay until now is only the timer's (1 ms
                // granularity), and the latency counts from the actual send.
                let sent = tokio::time::Instant::now();
                let from = if prev_done > due { due } else { sent };
                if request(&mut send).await {
                    done += 1;
                    let _ = hist.record(from.elapsed().as_micros().max(1) as u64);
                } else {
                    errors += 1;
                }
                prev_done = tokio::time::Instant::now();
                i += 1;
            }
            (hist, done, errors)
        }));
    }
    collect(tasks, secs).await
}

/// Closed loop with `conns` connections as fast as they go.
async fn closed_loop(addr: SocketAddr, secs: f64, conns: usize) -> (u64, Duration) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut send = connect(addr).await;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                if request(&mut send).await {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (total, started.elapsed())
}

async fn tcp_throughput(addr: SocketAddr, bytes: u64) -> f64 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let chunk = vec![7u8; 256 * 1024];
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer.parse::<u64>().unwrap(), sent, "every byte arrived");
    sent as f64 / started.elapsed().as_secs_f64() / 1e6
}

// --- the run -----------------------------------------------------------------------------------

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Processes whose CPU and memory count (the proxies).
    pids: Vec<u32>,
    _procs: Vec<Proc>,
}

async fn run() {
    let secs: f64 = std::env::var("MYCEL_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let (_server, upstream) = spawn_role("http-server");
    let mut targets = vec![Target { name: "direct", addr: upstream, pids: vec![], _procs: vec![] }];
    let (p1, a1) = mycel("one-hop", "http", upstream).await;
    targets.push(Target { name: "mycel (1 hop)", addr: a1, pids: vec![p1.pid()], _procs: vec![p1] });
    // A baseline build (`MYCEL_BENCH_BASELINE=<binary>`, e.g. main before a change) measured in
    // the same rounds, side by side.
    if let Some(base) = std::env::var_os("MYCEL_BENCH_BASELINE") {
        let (p, a) = mycel_of(std::path::Path::new(&base), "baseline", "http", upstream).await;
        targets.push(Target { name: "baseline (1 hop)", addr: a, pids: vec![p.pid()], _procs: vec![p] });
    }
    let (inner, ai) = mycel("server-sidecar", "http", upstream).await;
    let (outer, ao) = mycel("client-sidecar", "http", ai).await;
    targets.push(Target {
        name: "mycel (2 hops)",
        addr: ao,
        pids: vec![outer.pid(), inner.pid()],
        _procs: vec![outer, inner],
    });
    // Two sidecars over mutual TLS, identities from the benchmark's own control plane.
    let (cp, ca) = mesh::start(&dir()).await;
    let (procs, a) = mesh_pair(cp, upstream).await;
    let pids = procs.iter().map(|p| p.pid()).collect();
    targets.push(Target { name: "mycel (2 hops, mTLS)", addr: a, pids, _procs: procs });
    if let Some((procs, a, pids)) = nginx_mtls_pair(&ca, upstream).await {
        targets.push(Target { name: "nginx (2 hops, mTLS)", addr: a, pids, _procs: procs });
    }
    if let Some((p, a)) = nginx(upstream, false).await {
        let w = worker_pid(p.pid());
        targets.push(Target { name: "nginx", addr: a, pids: vec![w], _procs: vec![p] });
    } else {
        eprintln!("nginx not installed: apt-get install nginx-light to compare");
    }
    if let Some((p, a)) = haproxy("http", upstream).await {
        targets.push(Target { name: "haproxy", addr: a, pids: vec![p.pid()], _procs: vec![p] });
    } else {
        eprintln!("haproxy not installed: apt-get install haproxy to compare");
    }

    let idle_rss: Vec<(String, u64)> = targets
        .iter()
        .filter(|t| !t.pids.is_empty())
        .map(|t| (t.name.to_string(), rss_kib(t.pids[0], "VmRSS:")))
        .collect();

    let mut results = Vec::new();
    let mut md = String::new();
    let machine = format!(
        "{} CPUs ({}), {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    println!("machine: {machine}; {secs} s per measurement");

    // Latency at fixed rates: every target once per round, rounds one after the other, so that a
    // disturbance of the machine hits one round of every target rather than all of one target's;
    // the round with the median p99 is reported, with the p99s of all rounds.
    let rounds: usize = std::env::var("MYCEL_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    md.push_str(&format!(
        "## Latency at a constant rate (HTTP/1.1, 1 KiB responses, 32 keep-alive connections)\n\n\
         Each target is measured {rounds} times, the targets taking turns; the row is the run with the median p99, \
         and the last column lists every run's p99.\n\n"
    ));
    md.push_str("| rate (req/s) | target | achieved | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | p99 of each run µs |\n|---|---|---|---|---|---|---|---|---|\n");
    let mut direct_p99 = std::collections::BTreeMap::new();
    for rate in [1000.0, 5000.0, 20000.0] {
        let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (i, t) in targets.iter().enumerate() {
                runs[i].push(open_loop(t.addr, rate, secs, 32).await);
            }
        }
        for (t, mut runs) in targets.iter().zip(runs) {
            runs.sort_by_key(|r| r.hist.value_at_quantile(0.99));
            let all: Vec<String> = runs.iter().map(|r| r.hist.value_at_quantile(0.99).to_string()).collect();
            let r = &runs[runs.len() / 2];
            let q = |p: f64| r.hist.value_at_quantile(p);
            let achieved = r.done as f64 / r.elapsed.as_secs_f64();
            if t.name == "direct" {
                direct_p99.insert(rate as u64, q(0.99));
            }
            let line = format!(
                "| {rate} | {} | {achieved:.0} | {} | {} | {} | {} | {} | {} |",
                t.name,
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                r.errors,
                all.join(", ")
            );
            println!("{line}");
            md.push_str(&line);
            md.push('\n');
            let rss = t.pids.first().map(|p| rss_kib(*p, "VmHWM:")).unwrap_or(0);
            results.push(json!({
                "name": format!("http1-1k-{}", t.name), "target": t.name, "rate": rate, "rps": achieved,
                "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "errors": r.errors, "rss_kib": rss,
                "p99_runs": runs.iter().map(|r| r.hist.value_at_quantile(0.99)).collect::<Vec<_>>(),
            }));
        }
    }
    md.push_str(
        "\nAdded p99 latency per hop (target p99 − direct p99; the 2-hop figure halved):\n\n| rate | ",
    );
    let proxies: Vec<&Target> = targets.iter().filter(|t| t.name != "direct").collect();
    md.push_str(&proxies.iter().map(|t| t.name).collect::<Vec<_>>().join(" | "));
    md.push_str(" |\n|---|");
    md.push_str(&"---|".repeat(proxies.len()));
    md.push('\n');
    for rate in [1000u64, 5000, 20000] {
        md.push_str(&format!("| {rate} |"));
        for t in &proxies {
            let p99 = results
                .iter()
                .find(|r| r["target"] == t.name && r["rate"].as_f64() == Some(rate as f64))
                .and_then(|r| r["p99"].as_u64())
                .unwrap_or(0);
            let hops = if t.name.contains("2 hops") { 2 } else { 1 };
            let added = (p99 as i64 - *direct_p99.get(&rate).unwrap_or(&0) as i64) / hops;
            md.push_str(&format!(" {added} µs |"));
        }
        md.push('\n');
    }

    // Saturation and memory: every target once per round, the targets taking turns (the order
    // rotates each round), so a slow moment of the machine does not land on one target only; the
    // row is the median round, and every round's figure is listed.
    let median_of = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    md.push_str(&format!(
        "\n## Saturation (closed loop, 64 connections)\n\n{rounds} rounds, the targets taking turns; each row is the median round (by req/s per proxy core), and the last column lists every round's figure.\n\n| target | req/s | proxy CPU s/s | req/s per proxy core | per core, each round |\n|---|---|---|---|---|\n"
    ));
    let mut saturation: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let t = &targets[i];
            let cpu0: f64 = t.pids.iter().map(|p| cpu_seconds(*p)).sum();
            let (n, took) = closed_loop(t.addr, secs, 64).await;
            let cpu = t.pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
            let rps = n as f64 / took.as_secs_f64();
            let cores = cpu / took.as_secs_f64();
            let per_core = if cores > 0.0 { rps / cores } else { 0.0 };
            println!("saturation round {} {}: {rps:.0} req/s, {cores:.2} cores", round + 1, t.name);
            saturation[i].push((rps, cores, per_core));
        }
    }
    for (t, runs) in targets.iter().zip(&saturation) {
        let mut sorted = runs.clone();
        sorted.sort_by(|a, b| if t.pids.is_empty() { a.0.total_cmp(&b.0) } else { a.2.total_cmp(&b.2) });
        let (rps, cores, per_core) = sorted[sorted.len() / 2];
        let each: Vec<f64> = runs.iter().map(|r| if t.pids.is_empty() { r.0 } else { r.2 }).collect();
        let line = format!(
            "| {} | {rps:.0} | {} | {} | {} |",
            t.name,
            if t.pids.is_empty() { "—".into() } else { format!("{cores:.2}") },
            if t.pids.is_empty() { "—".into() } else { format!("{per_core:.0}") },
            if t.pids.is_empty() { format!("({} req/s)", list(&each)) } else { list(&each) }
        );
        println!("{line}");
        md.push_str(&line);
        md.push('\n');
        results.push(json!({"name": format!("saturation-{}", t.name), "target": t.name, "rps": rps, "cpu_cores": cores, "rps_per_core": per_core, "rounds": runs.iter().map(|r| json!({"rps": r.0, "cpu_cores": r.1, "rps_per_core": r.2})).collect::<Vec<_>>()}));
    }

    // The mesh target: a hop over mutual TLS against a plaintext hop, both 2-hop pairs of this
    // build, per proxy core (target: mTLS ≤ 1.2 × the cost of plaintext, i.e. ≥ 1/1.2 of its
    // requests per core).
    let per_core = |name: &str| {
        results
            .iter()
            .find(|r| r["name"] == format!("saturation-{name}"))
            .and_then(|r| r["rps_per_core"].as_f64())
    };
    if let (Some(tls), Some(plain)) = (per_core("mycel (2 hops, mTLS)"), per_core("mycel (2 hops)")) {
        let cost = plain / tls;
        let verdict = if cost <= 1.2 { "met" } else { "missed" };
        let nginx = per_core("nginx (2 hops, mTLS)")
            .map(|n| format!("; nginx's mTLS pair: {n:.0} req/s per core, mycel's {:.2} × that", tls / n))
            .unwrap_or_default();
        let line = format!(
            "\nA hop over mutual TLS costs {cost:.2} × a plaintext hop in CPU per request ({tls:.0} against {plain:.0} req/s per proxy core, two hops each): the target of ≤ 1.2 × is {verdict}{nginx}.\n"
        );
        println!("{}", line.trim());
        md.push_str(&line);
        results.push(
            json!({"name": "mtls-hop-cost", "cost_vs_plaintext": cost, "target": 1.2, "met": cost <= 1.2}),
        );
    }

    // Memory.
    md.push_str(&format!(
        "\n## Memory (RSS)\n\nWith 1000 open connections: {rounds} rounds, the targets taking turns; the median, then every round's figure.\n\n| target | idle KiB | peak after load KiB | with 1000 open connections KiB | each round KiB |\n|---|---|---|---|---|\n"
    ));
    let measured: Vec<&Target> =
        targets.iter().filter(|t| !t.pids.is_empty() && !t.name.contains("2 hops")).collect();
    let mut memory: Vec<Vec<f64>> = vec![Vec::new(); measured.len()];
    for round in 0..rounds {
        for k in 0..measured.len() {
            let i = (k + round) % measured.len();
            let t = measured[i];
            let mut open = Vec::new();
            for _ in 0..1000 {
                let mut s = connect(t.addr).await;
                request(&mut s).await;
                open.push(s);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            memory[i].push(rss_kib(t.pids[0], "VmRSS:") as f64);
            drop(open);
        }
    }
    for (t, runs) in measured.iter().zip(&memory) {
        let pid = t.pids[0];
        let with_conns = median_of(runs.clone()) as u64;
        let idle = idle_rss.iter().find(|(n, _)| n == t.name).map(|(_, r)| *r).unwrap_or(0);
        let line =
            format!("| {} | {idle} | {} | {with_conns} | {} |", t.name, rss_kib(pid, "VmHWM:"), list(runs));
        println!("{line}");
        md.push_str(&line);
        md.push('\n');
        results.push(json!({"name": format!("memory-{}", t.name), "target": t.name, "idle_rss_kib": idle, "rss_1000_conns_kib": with_conns, "rounds_kib": runs}));
    }

    // TCP throughput.
    md.push_str("\n## TCP throughput (1 GiB through one connection)\n\n| target | MB/s | vs direct |\n|---|---|---|\n");
    let (_sink, sink) = spawn_role("tcp-sink");
    let mut tcp_targets: Vec<(&str, SocketAddr, Vec<Proc>)> = vec![("direct", sink, vec![])];
    let (p, a) = mycel("tcp", "tcp", sink).await;
    tcp_targets.push(("mycel (1 hop)", a, vec![p]));
    if let Some((p, a)) = haproxy("tcp", sink).await {
        tcp_targets.push(("haproxy", a, vec![p]));
    }
    let mut direct_mbps = 0.0;
    for (name, addr, _p) in &tcp_targets {
        let mbps = tcp_throughput(*addr, 1 << 30).await;
        if *name == "direct" {
            direct_mbps = mbps;
        }
        let line = format!("| {name} | {mbps:.0} | {:.0} % |", mbps / direct_mbps * 100.0);
        println!("{line}");
        md.push_str(&line);
        md.push('\n');
        results.push(json!({"name": format!("tcp-{name}"), "target": name, "mbps": mbps}));
    }

    // gRPC.
    md.push_str("\n## gRPC (1 KiB messages, one HTTP/2 connection from the client, closed loop)\n\n");
    md.push_str("Unary: 32 calls in flight. Streaming: 16 bidirectional streams, each sending a message and waiting for its answer.\n\n");
    md.push_str("| call | target | calls/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | proxy CPU s/s | calls/s per proxy core |\n|---|---|---|---|---|---|---|---|---|---|\n");
    let (_grpc, gup) = spawn_role("grpc-server");
    let mut grpc_targets: Vec<(&str, SocketAddr, Vec<u32>, Vec<Proc>)> =
        vec![("direct", gup, vec![], vec![])];
    let (p, a) = mycel("grpc-one-hop", "http", gup).await;
    grpc_targets.push(("mycel (1 hop)", a, vec![p.pid()], vec![p]));
    let (inner, ai) = mycel("grpc-server-sidecar", "http", gup).await;
    let (outer, ao) = mycel("grpc-client-sidecar", "http", ai).await;
    grpc_targets.push(("mycel (2 hops)", ao, vec![outer.pid(), inner.pid()], vec![outer, inner]));
    if let Some((p, a)) = nginx(gup, true).await {
        let w = worker_pid(p.pid());
        grpc_targets.push(("nginx", a, vec![w], vec![p]));
    }
    if let Some((p, a)) = haproxy("grpc", gup).await {
        grpc_targets.push(("haproxy", a, vec![p.pid()], vec![p]));
    }
    for kind in ["unary", "streaming"] {
        for (name, addr, pids, _) in &grpc_targets {
            let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
            let r = if kind == "unary" {
                grpc_unary(*addr, secs, 32).await
            } else {
                grpc_streaming(*addr, secs, 16).await
            };
            let cpu = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
            let rate = r.done as f64 / r.elapsed.as_secs_f64();
            let cores = cpu / r.elapsed.as_secs_f64();
            let q = |p: f64| r.hist.value_at_quantile(p);
            let line = format!(
                "| {kind} | {name} | {rate:.0} | {} | {} | {} | {} | {} | {} | {} |",
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                r.errors,
                if pids.is_empty() { "—".into() } else { format!("{cores:.2}") },
                if pids.is_empty() || cores <= 0.0 { "—".into() } else { format!("{:.0}", rate / cores) }
            );
            println!("{line}");
            md.push_str(&line);
            md.push('\n');
            let rss = pids.first().map(|p| rss_kib(*p, "VmHWM:")).unwrap_or(0);
            results.push(json!({
                "name": format!("grpc-{kind}-{name}"), "target": name, "rps": rate, "p50": q(0.5), "p90": q(0.9),
                "p99": q(0.99), "p999": q(0.999), "errors": r.errors, "cpu_cores": cores,
                "rps_per_core": if cores > 0.0 { rate / cores } else { 0.0 }, "rss_kib": rss,
            }));
        }
    }

    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let binary = match std::env::var_os("MYCEL_BENCH_PROXY") {
        Some(_) => "static (glibc linked in, as the images ship it; `MYCEL_BENCH_PROXY`)",
        None => "the bench build (dynamically linked)",
    };
    // With a baseline the run is an A/B comparison, written beside the main report.
    let (stem, command, baseline) = match std::env::var("MYCEL_BENCH_BASELINE") {
        Ok(b) => (
            "proxy-vs-baseline",
            "`just bench-proxy-baseline <binary>`",
            format!(" Baseline (\"baseline (1 hop)\"): `{b}`, built the same way from the commit it names."),
        ),
        Err(_) => ("proxy", "`just bench-proxy`", String::new()),
    };
    let header = format!(
        "# Proxy benchmark\n\nMachine: {machine}. Date: {date}. Command: {command} \
         ({secs} s per measurement). Proxy binary: {binary}.{baseline} Every proxy runs one worker; the load generator (one thread), the \
         server (one thread) and the proxies share the machine's cores, so absolute figures are \
         modest: read the ratios between targets measured in the same run.\n\n"
    );
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join(format!("{stem}.md")), format!("{header}{md}")).unwrap();
    std::fs::write(
        out_dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(
            &json!({"machine": machine, "date": date, "seconds": secs, "proxy_binary": binary, "scenarios": results}),
        )
        .unwrap(),
    )
    .unwrap();
    println!("written to {}", out_dir.join(format!("{stem}.md")).display());
    // Stop the proxies before their configuration files go.
    drop((targets, tcp_targets, grpc_targets));
    let _ = std::fs::remove_dir_all(dir());
}

// --- gRPC ---------------------------------------------------------------------------------------

/// The gRPC server of the benchmark, on any stable service of ours: `Certificates.Sign` answers
/// a 1 KiB string (unary), and `ConfigDiscovery.Stream` answers every request with one 1 KiB
/// response that echoes its nonce (bidirectional streaming).
mod grpc {
    use std::pin::Pin;

    use futures::Stream;
    use mycel_api::v1alpha1::{
        self as pb, certificates_server::Certificates, config_discovery_server::ConfigDiscovery,
    };
    use tokio_stream::StreamExt;
    use tonic::{Request, Response, Status, Streaming};

    pub const PAYLOAD: usize = 1024;

    pub struct Echo;

    #[tonic::async_trait]
    impl Certificates for Echo {
        async fn sign(&self, r: Request<pb::SignRequest>) -> Result<Response<pb::SignResponse>, Status> {
            let n = r.into_inner().csr_pem.len();
            Ok(Response::new(pb::SignResponse {
                cert_chain_pem: vec!["x".repeat(n)],
                trust_bundle_pem: vec![],
            }))
        }
    }

    type Responses = Pin<Box<dyn Stream<Item = Result<pb::DeltaResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl ConfigDiscovery for Echo {
        type StreamStream = Responses;
        async fn stream(
            &self,
            r: Request<Streaming<pb::DeltaRequest>>,
        ) -> Result<Response<Responses>, Status> {
            let body = "x".repeat(PAYLOAD);
            let out = r.into_inner().map(move |req| {
                req.map(|req| pb::DeltaResponse {
                    nonce: req.response_nonce,
                    system_version: body.clone(),
                    ..Default::default()
                })
            });
            Ok(Response::new(Box::pin(out)))
        }
    }
}

async fn grpc_server() {
    use mycel_api::v1alpha1::{
        certificates_server::CertificatesServer, config_discovery_server::ConfigDiscoveryServer,
    };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", l.local_addr().unwrap());
    tonic::transport::Server::builder()
        .add_service(CertificatesServer::new(grpc::Echo))
        .add_service(ConfigDiscoveryServer::new(grpc::Echo))
        .serve_with_incoming(tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(l),
            |s| {
                // As a real server would (and the proxies do): no Nagle delay on small answers.
                s.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            },
        ))
        .await
        .unwrap();
}

async fn grpc_channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Closed loop: `calls` unary calls in flight at a time on one HTTP/2 connection.
async fn grpc_unary(addr: SocketAddr, secs: f64, calls: usize) -> Run {
    use mycel_api::v1alpha1::{SignRequest, certificates_client::CertificatesClient};
    let client = CertificatesClient::new(grpc_channel(addr).await);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..calls {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut done, mut errors) = (0u64, 0u64);
            let csr = "c".repeat(grpc::PAYLOAD);
            while Instant::now() < end {
                let started = Instant::now();
                match c.sign(SignRequest { csr_pem: csr.clone(), ttl_seconds: 0 }).await {
                    Ok(r) if r.get_ref().cert_chain_pem[0].len() == grpc::PAYLOAD => {
                        done += 1;
                        let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
                    }
                    _ => errors += 1,
                }
            }
            (hist, done, errors)
        }));
    }
    collect(tasks, secs).await
}

/// `streams` bidirectional streams on one connection, each sending a message and waiting for
/// its answer before the next (every message crosses the proxy in both directions).
async fn grpc_streaming(addr: SocketAddr, secs: f64, streams: usize) -> Run {
    use mycel_api::v1alpha1::{DeltaRequest, config_discovery_client::ConfigDiscoveryClient};
    let client = ConfigDiscoveryClient::new(grpc_channel(addr).await);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut done, mut errors) = (0u64, 0u64);
            let (tx, rx) = tokio::sync::mpsc::channel::<DeltaRequest>(1);
            let mut responses = match c.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                Ok(r) => r.into_inner(),
                Err(_) => return (hist, 0, 1),
            };
            let body = "r".repeat(grpc::PAYLOAD);
            let mut i = 0u64;
            while Instant::now() < end {
                let started = Instant::now();
                let nonce = i.to_string();
                let req = DeltaRequest {
                    response_nonce: nonce.clone(),
                    type_url: body.clone(),
                    ..Default::default()
                };
                if tx.send(req).await.is_err() {
                    errors += 1;
                    break;
                }
                match responses.message().await {
                    Ok(Some(r)) if r.nonce == nonce => {
                        done += 1;
                        let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
                    }
                    _ => {
                        errors += 1;
                        break;
                    }
                }
                i += 1;
            }
            (hist, done, errors)
        }));
    }
    collect(tasks, secs).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<(Histogram<u64>, u64, u64)>>, secs: f64) -> Run {
    let mut run = Run {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
        done: 0,
        errors: 0,
        elapsed: Duration::from_secs_f64(secs),
    };
    for t in tasks {
        let (h, d, e) = t.await.unwrap();
        run.hist.add(h).unwrap();
        run.done += d;
        run.errors += e;
    }
    run
}

// --- mesh (mutual TLS between two sidecars) -----------------------------------------------------

/// A control plane of the benchmark's own, for the two sidecars that talk mutual TLS: it signs
/// their certificates (`Certificates.Sign`, any token accepted) and answers their config stream
/// with nothing (their listeners and clusters are in their files), over TLS like the real one.
mod mesh {
    use std::{net::SocketAddr, path::Path, pin::Pin, sync::Arc};

    use futures::Stream;
    use mycel_api::v1alpha1::{
        self as pb, certificates_server::Certificates, config_discovery_server::ConfigDiscovery,
    };
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_stream::StreamExt;
    use tonic::{Request, Response, Status, Streaming, transport::server::Connected};

    /// The name its serving certificate carries.
    pub const NAME: &str = "cp.bench.mycel";

    /// The inbound policy each pod (by name) is sent, if any.
    pub static POLICIES: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<String, pb::PeerPolicy>>,
    > = std::sync::LazyLock::new(Default::default);

    pub struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pub pem: String,
    }

    impl Ca {
        /// A certificate for DNS name `name` and its key, as PEM files in `dir`: `<file>.pem`
        /// and `<file>.key`.
        pub fn leaf(&self, name: &str, dir: &Path, file: &str) {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
            p.extended_key_usages =
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        }
    }

    struct Cp {
        ca: Arc<Ca>,
    }

    #[tonic::async_trait]
    impl Certificates for Cp {
        async fn sign(&self, r: Request<pb::SignRequest>) -> Result<Response<pb::SignResponse>, Status> {
            let csr = rcgen::CertificateSigningRequestParams::from_pem(&r.into_inner().csr_pem)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let mut params = CertificateParams::default();
            params.subject_alt_names = csr.params.subject_alt_names.clone();
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages =
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let cert = rcgen::CertificateSigningRequestParams { params, public_key: csr.public_key }
                .signed_by(&self.ca.issuer)
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(Response::new(pb::SignResponse {
                cert_chain_pem: vec![cert.pem()],
                trust_bundle_pem: vec![self.ca.pem.clone()],
            }))
        }
    }

    type Responses = Pin<Box<dyn Stream<Item = Result<pb::DeltaResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl ConfigDiscovery for Cp {
        type StreamStream = Responses;
        async fn stream(
            &self,
            r: Request<Streaming<pb::DeltaRequest>>,
        ) -> Result<Response<Responses>, Status> {
            let mut nonce = 0u64;
            let mut pod = String::new();
            // Each subscription's first request gets one response (in sync): empty, but for the
            // inbound policy registered for the pod; ACKs nothing.
            let out = r.into_inner().filter_map(move |req| match req {
                Ok(req) if req.response_nonce.is_empty() => {
                    nonce += 1;
                    if let Some(n) = &req.node {
                        pod = n.pod.clone();
                    }
                    let policy = (req.type_url == mycel_api::PEER_POLICY_TYPE)
                        .then(|| POLICIES.lock().unwrap().get(&pod).cloned())
                        .flatten();
                    let resources = policy
                        .map(|p| pb::Resource {
                            name: "inbound".into(),
                            version: "1".into(),
                            kind: Some(pb::resource::Kind::PeerPolicy(p)),
                        })
                        .into_iter()
                        .collect();
                    Some(Ok(pb::DeltaResponse {
                        type_url: req.type_url,
                        system_version: "1".into(),
                        nonce: nonce.to_string(),
                        resources,
                        ..Default::default()
                    }))
                }
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            });
            Ok(Response::new(Box::pin(out)))
        }
    }

    /// A TLS connection, as tonic's server takes it.
    struct Conn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

    impl Connected for Conn {
        type ConnectInfo = ();
        fn connect_info(&self) {}
    }

    impl AsyncRead for Conn {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Conn {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// Starts the control plane; writes its CA to `dir/ca.pem` and a token to `dir/token`.
    pub async fn start(dir: &Path) -> (SocketAddr, Arc<Ca>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        // A subject name: OpenSSL (nginx) finds a leaf's issuer by it.
        params.distinguished_name.push(rcgen::DnType::CommonName, "mycel bench CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let pem = params.self_signed(&key).unwrap().pem();
        let ca = Arc::new(Ca { issuer: Issuer::new(params, key), pem });
        std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
        std::fs::write(dir.join("token"), "bench").unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut sp = CertificateParams::new(vec![NAME.to_string()]).unwrap();
        sp.subject_alt_names = vec![SanType::DnsName(NAME.try_into().unwrap())];
        let server_cert = sp.signed_by(&server_key, &ca.issuer).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = async_stream_of(listener, acceptor);
        let cp = Cp { ca: ca.clone() };
        let cp2 = Cp { ca: ca.clone() };
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(pb::certificates_server::CertificatesServer::new(cp))
                .add_service(pb::config_discovery_server::ConfigDiscoveryServer::new(cp2))
                .serve_with_incoming(incoming)
                .await;
        });
        (addr, ca)
    }

    fn async_stream_of(
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> impl Stream<Item = Result<Conn, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(s) = acceptor.accept(tcp).await {
                        let _ = tx.send(Ok(Conn(s))).await;
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// A sidecar of the mesh: `config` (its listeners and clusters), its identity from the
/// benchmark's control plane at `cp` as `namespace/service-account`.
async fn mesh_proxy(name: &str, config: &str, cp: SocketAddr, sa: &str, listen: SocketAddr) -> Proc {
    let d = dir();
    let extra: Vec<std::ffi::OsString> = [
        "--control-plane".into(),
        cp.to_string().into(),
        "--control-plane-name".into(),
        mesh::NAME.into(),
        "--ca-roots".into(),
        d.join("ca.pem").into(),
        "--token".into(),
        d.join("token").into(),
        "--pod-namespace".into(),
        "bench".into(),
        "--service-account".into(),
        sa.into(),
        "--pod-name".into(),
        name.into(),
    ]
    .into();
    spawn_proxy(&proxy_binary(), name, config, &extra, listen).await
}

/// Two sidecars over mutual TLS in front of `upstream`: the client's outbound listener (the
/// address to load) and the server's inbound one, STRICT, so that plaintext would fail.
async fn mesh_pair(cp: SocketAddr, upstream: SocketAddr) -> (Vec<Proc>, SocketAddr) {
    let (front, inbound) = (free_port(), free_port());
    let inbound_addr = SocketAddr::from(([127, 0, 0, 1], inbound));
    let server = format!(
        "admin: '127.0.0.1:{}'\ninboundMtls: {{mode: STRICT}}\nlisteners:\n- {{name: inbound, address: '{inbound_addr}', protocol: auto, direction: inbound, cluster: app}}\nclusters:\n- {{name: app, endpoints: ['{upstream}']}}\n",
        free_port()
    );
    let server = mesh_proxy("mesh-server", &server, cp, "server", inbound_addr).await;
    let front_addr = SocketAddr::from(([127, 0, 0, 1], front));
    let client = format!(
        "admin: '127.0.0.1:{}'\nlisteners:\n- {{name: front, address: '{front_addr}', protocol: http, cluster: back}}\nclusters:\n- {{name: back, lb: {{algorithm: RoundRobin}}, endpoints: ['{inbound_addr}'], mtlsEndpoints: {{'{inbound_addr}': 'spiffe://cluster.local/ns/bench/sa/server'}}}}\n",
        free_port()
    );
    let client = mesh_proxy("mesh-client", &client, cp, "client", front_addr).await;
    // Until both have their certificates: a request through answers 200.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = connect(front_addr).await;
        if request(&mut s).await {
            break;
        }
        assert!(Instant::now() < deadline, "the mTLS pair never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (vec![client, server], front_addr)
}

/// The reference: two nginx, one worker each, doing the same mutual TLS between them (client
/// certificate, verified both ways, sessions and connections kept).
async fn nginx_mtls_pair(ca: &mesh::Ca, upstream: SocketAddr) -> Option<(Vec<Proc>, SocketAddr, Vec<u32>)> {
    let bin = which("nginx")?;
    let d = dir().join("nginx-mtls");
    std::fs::create_dir_all(&d).ok()?;
    ca.leaf("server.bench", &d, "server");
    ca.leaf("client.bench", &d, "client");
    let ca_file = dir().join("ca.pem");
    let (sport, cport) = (free_port(), free_port());
    let server_block = format!(
        "listen 127.0.0.1:{sport} ssl;\n    ssl_certificate {d}/server.pem;\n    ssl_certificate_key {d}/server.key;\n    ssl_client_certificate {ca};\n    ssl_verify_client on;\n    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}",
        d = d.display(),
        ca = ca_file.display()
    );
    let (s, _) = nginx_run(
        &bin,
        &d.join("server"),
        sport,
        &format!("upstream b {{ server {upstream}; keepalive 256; keepalive_requests 10000000; }}"),
        &server_block,
    )
    .await?;
    let client_block = format!(
        "listen 127.0.0.1:{cport};\n    location / {{ proxy_pass https://s; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_certificate {d}/client.pem; proxy_ssl_certificate_key {d}/client.key; proxy_ssl_trusted_certificate {ca}; proxy_ssl_verify on; proxy_ssl_name server.bench; proxy_ssl_session_reuse on; }}",
        d = d.display(),
        ca = ca_file.display()
    );
    let (c, addr) = nginx_run(
        &bin,
        &d.join("client"),
        cport,
        &format!("upstream s {{ server 127.0.0.1:{sport}; keepalive 256; keepalive_requests 10000000; }}"),
        &client_block,
    )
    .await?;
    let pids = vec![worker_pid(c.pid()), worker_pid(s.pid())];
    Some((vec![c, s], addr, pids))
}
