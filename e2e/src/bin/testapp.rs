//! `mycel-testapp`: the small workloads of the e2e tests and the demo, in one binary.
//! `http-echo` answers every request with a JSON description of it and of the pod that served it
//! (after `sleep_ms` milliseconds, or with a 503 for `fail_pct` % of requests, when the query
//! asks);
//! `tcp-echo` echoes bytes (and honours half-close); `get` is an HTTP client that fetches a URL a
//! number of times and prints each body, failing on any error; `grpc-echo` serves the gRPC health
//! service (unary and server-streaming calls) and `grpc-check` calls it; `ws-echo` echoes WebSocket
//! messages and `ws-send` sends some and prints the echoes; `jwks-serve` serves JSON Web Key
//! Sets, rotated on request, and says who fetched them; `load` offers requests at a steady rate
//! and reports, per second, what was sent and what came back; `ext-authz` is an external
//! authorizer that speaks Envoy's ext_authz gRPC API.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

#[derive(Parser)]
#[command(name = "mycel-testapp", version, about = "Test workloads for Mycel's e2e tests and demo")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP/1.1 on PORT, answering with JSON: pod name, method, path, headers.
    HttpEcho {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// A server that never answers: every request but `GET /` (the readiness probe's) is
        /// logged to stderr (`got <method> <path> host=<host>`) and left waiting.
        #[arg(long)]
        hang: bool,
    },
    /// Echo TCP bytes on PORT; after the client half-closes, finish and close.
    TcpEcho {
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// First send `pod <name>\n` on each connection (a server-first greeting).
        #[arg(long)]
        greet: bool,
    },
    /// Connect to ADDR COUNT times, one after the other; print a JSON line for each: the pod
    /// its greeting names, and (with --wait-close-ms) after how long the far side closed.
    TcpWho {
        addr: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// After the greeting, wait up to this long for the connection to be closed.
        #[arg(long, default_value_t = 0)]
        wait_close_ms: u64,
    },
    /// Serve gRPC (the standard health service, reporting SERVING) on PORT.
    GrpcEcho {
        #[arg(long, default_value_t = 9090)]
        port: u16,
    },
    /// Call the gRPC health service at URL COUNT times; print each status.
    GrpcCheck {
        url: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Request metadata, `name:value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Print a failed call's gRPC code (`code: PermissionDenied`) and go on, instead of failing.
        #[arg(long)]
        report: bool,
        /// Pause between calls, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Serve HTTP on PORT; each request is answered by fetching TO (a service further down)
    /// and wrapping its answer: a two-tier app for the demo.
    HttpRelay {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long)]
        to: String,
    },
    /// Serve Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`,
    /// plaintext gRPC) on PORT, deciding by the request header `x-ext-authz`: `allow` allows,
    /// adding the request header `x-ext-authz-check-result: allowed` and `x-ext-authz-source`
    /// (the caller's principal, as the sidecar sent it), removing `x-ext-authz-remove`, and adding
    /// the response header `x-ext-authz-said: yes`; `hang` never answers; anything else is denied
    /// with 401, the header `x-ext-authz-check-result: denied` and the body `denied by ext-authz`.
    /// Each check is logged to stderr (`check <method> <path> from <principal>`).
    ExtAuthz {
        #[arg(long, default_value_t = 9191)]
        port: u16,
    },
    /// Serve JSON Web Key Sets on PORT: `GET /jwks` answers the current SET (the first at
    /// start, `max-age=5`) and records who asked; `GET /rotate?to=N` makes SET number N
    /// (from 0) current; `GET /fetches` lists the peer addresses of every `/jwks` request.
    JwksServe {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long = "set", required = true)]
        sets: Vec<String>,
    },
    /// Echo WebSocket messages on PORT.
    WsEcho {
        #[arg(long, default_value_t = 8081)]
        port: u16,
    },
    /// Send each MESSAGE over one WebSocket to URL and print the echoes.
    WsSend { url: String, messages: Vec<String> },
    /// Send each MESSAGE over one TCP connection to ADDR (host:port), print each echo, then
    /// half-close and expect the server to close too.
    TcpSend {
        addr: String,
        messages: Vec<String>,
        /// Connections to make, one after the other (0: forever).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// GET URL at RATE requests per second for SECONDS, on a pool of kept-alive connections,
    /// then print one JSON line per second — `{"second", "sent", "statuses": {"200": n, …},
    /// "pods": {<pod>: n}, "errors"}` (sent by when a request left, answered by when its
    /// response came; `pods` counts the 200s by the `pod` their JSON body names) — and a
    /// last line with the totals (`"second": null`). At most MAX_IN_FLIGHT wait at once; a
    /// request that cannot be sent for that counts as `skipped`.
    Load {
        url: String,
        #[arg(long)]
        rate: u32,
        #[arg(long)]
        seconds: u32,
        #[arg(long, default_value_t = 64)]
        max_in_flight: usize,
        /// A request header, `name:value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Start at this wall-clock time (Unix milliseconds), so that loads of several pods
        /// count the same seconds; the totals line says how late it started (`late_ms`).
        #[arg(long)]
        start_at_ms: Option<u64>,
    },
    /// GET each URL COUNT times (in turn), printing each response body on one line. `{i}` in a
    /// URL or a header value is the round's number.
    Get {
        #[arg(required = true)]
        urls: Vec<String>,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Per-request timeout in seconds.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// Open a new connection for every request (so that L4 balancing shows).
        #[arg(long)]
        no_reuse: bool,
        /// Pause between rounds, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// A request header, `name:value` (repeatable); `{i}` in the value is the round's number.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Run this many of the whole sequence at once, each on its own connections.
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
        /// Print each response as one JSON line (url, status, response headers, body, elapsed_ms) and go on
        /// whatever the status, instead of failing on the first that is not 2xx. A request that
        /// gets no response at all still fails.
        #[arg(long)]
        report: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::HttpEcho { port, hang } => http_echo(port, hang).await,
        Cmd::TcpEcho { port, greet } => tcp_echo(port, greet).await,
        Cmd::TcpWho { addr, count, wait_close_ms } => tcp_who(&addr, count, wait_close_ms).await,
        Cmd::GrpcEcho { port } => grpc_echo(port).await,
        Cmd::GrpcCheck { url, count, interval_ms, headers, report } => {
            grpc_check(url, count, Duration::from_millis(interval_ms), &headers, report).await
        }
        Cmd::HttpRelay { port, to } => http_relay(port, to).await,
        Cmd::WsEcho { port } => ws_echo(port).await,
        Cmd::JwksServe { port, sets } => jwks_serve(port, sets).await,
        Cmd::ExtAuthz { port } => ext_authz(port).await,
        Cmd::WsSend { url, messages } => ws_send(&url, &messages).await,
        Cmd::Get { urls, count, timeout, no_reuse, interval_ms, headers, report, concurrency } => {
            let opts = GetOptions {
                timeout: Duration::from_secs(timeout),
                no_reuse,
                interval: Duration::from_millis(interval_ms),
                headers,
                report,
            };
            let runs = (0..concurrency.max(1)).map(|_| get(&urls, count, &opts));
            futures::future::try_join_all(runs).await.map(|_| ())
        }
        Cmd::Load { url, rate, seconds, max_in_flight, headers, start_at_ms } => {
            load(&url, rate, seconds, max_in_flight, &headers, start_at_ms).await
        }
        Cmd::TcpSend { addr, messages, repeat, interval_ms } => {
            let mut n = 0u32;
            while repeat == 0 || n < repeat {
                tcp_send(&addr, &messages).await?;
                n = n.saturating_add(1);
                tokio::time::sleep(Duration::from_millis(interval_ms)).await;
            }
            Ok(())
        }
    }
}

/// A query parameter's value, parsed.
fn query_param<T: std::str::FromStr>(req: &Request<hyper::body::Incoming>, name: &str) -> Option<T> {
    let q = req.uri().query()?;
    q.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// What the query asks of the echo server: `sleep_ms=N` answers after N ms (at most 30 s), a
/// slow backend; `fail_pct=N` answers 503 to N % of requests, a flaky one; `fail_pod=NAME`
/// answers 503 when this is pod NAME, one bad endpoint among good ones (with `fail_below=K`, only
/// while the request's `n` is below K: a pod that recovers).
async fn misbehave(req: &Request<hyper::body::Incoming>, pod: &str) -> Option<Response<Full<Bytes>>> {
    if let Some(ms) = query_param::<u64>(req, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(30_000))).await;
    }
    let still = match (query_param::<u64>(req, "fail_below"), query_param::<u64>(req, "n")) {
        (Some(k), Some(n)) => n < k,
        _ => true,
    };
    let bad_pod = still && query_param::<String>(req, "fail_pod").is_some_and(|p| p == pod);
    let pct = if bad_pod { 100 } else { query_param::<u32>(req, "fail_pct")? };
    (fastrand::u32(..100) < pct).then(|| {
        let mut r = Response::new(Full::new(Bytes::from("failed on purpose")));
        *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
        r
    })
}

fn pod_name() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()))
        .unwrap_or_else(|_| "unknown".into())
}

async fn http_echo(port: u16, hang: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    let pod = pod_name();
    eprintln!("http-echo on :{port} as {pod}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => r?,
            _ = term.recv() => return Ok(()),
        };
        let pod = pod.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let pod = pod.clone();
                async move {
                    if hang && (req.method() != hyper::Method::GET || req.uri().path() != "/") {
                        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
                        eprintln!("got {} {} host={host}", req.method(), req.uri().path());
                        std::future::pending::<()>().await;
                    }
                    if let Some(failed) = misbehave(&req, &pod).await {
                        return Ok::<_, Infallible>(failed);
                    }
                    let headers: serde_json::Map<String, serde_json::Value> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                        .collect();
                    let body = serde_json::json!({
                        "pod": pod, "method": req.method().as_str(), "path": req.uri().to_string(),
                        "peer": peer.to_string(), "headers": headers,
                    });
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body.to_string()))))
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// The current key set and who fetched, shared by the connections of `jwks-serve`.
struct KeySets {
    sets: Vec<String>,
    current: usize,
    fetches: Vec<String>,
}

async fn jwks_serve(port: u16, sets: Vec<String>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    eprintln!("jwks-serve on :{port} with {} key sets", sets.len());
    let state = std::sync::Arc::new(std::sync::Mutex::new(KeySets { sets, current: 0, fetches: Vec::new() }));
    loop {
        let (stream, peer) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move {
                    let mut s = state.lock().unwrap();
                    let r = Response::builder();
                    let r = match req.uri().path() {
                        "/jwks" => {
                            s.fetches.push(peer.ip().to_string());
                            eprintln!("jwks: set {} to {peer}", s.current);
                            r.header("cache-control", "max-age=5").body(s.sets[s.current].clone())
                        }
                        "/rotate" => match query_param::<usize>(&req, "to").filter(|n| *n < s.sets.len()) {
                            Some(n) => {
                                s.current = n;
                                r.body(format!("set {n}"))
                            }
                            None => r.status(400).body("no such set".to_string()),
                        },
                        "/fetches" => r.body(serde_json::json!(s.fetches).to_string()),
                        _ => r.body("ok".to_string()),
                    };
                    Ok::<_, Infallible>(r.unwrap().map(|b| Full::new(Bytes::from(b))))
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn tcp_echo(port: u16, greet: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    let pod = pod_name();
    eprintln!("tcp-echo on :{port}");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let hello = format!("pod {pod}\n");
        tokio::spawn(async move {
            if greet && stream.write_all(hello.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stream.shutdown().await;
        });
    }
}

async fn tcp_who(addr: &str, count: u32, wait_close_ms: u64) -> anyhow::Result<()> {
    for _ in 0..count {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        // A byte first, so that the client's sidecar need not wait to tell the protocol.
        s.write_all(b"x").await?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        let started = std::time::Instant::now();
        while line.len() < 256 {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await??;
            if n == 0 || byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        let greeting = String::from_utf8_lossy(&line).to_string();
        let pod = greeting.strip_prefix("pod ").unwrap_or("").to_string();
        let mut closed_after_ms = serde_json::Value::Null;
        if wait_close_ms > 0 {
            let greeted = std::time::Instant::now();
            let mut buf = [0u8; 64];
            // The echo of the byte sent, then nothing until the far side closes.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_close_ms);
            while let Ok(r) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                if matches!(r, Ok(0) | Err(_)) {
                    closed_after_ms = (greeted.elapsed().as_millis() as u64).into();
                    break;
                }
            }
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        println!(
            "{}",
            serde_json::json!({"pod": pod, "closed_after_ms": closed_after_ms, "elapsed_ms": elapsed_ms})
        );
    }
    Ok(())
}

async fn tcp_send(addr: &str, messages: &[String]) -> anyhow::Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    for m in messages {
        s.write_all(m.as_bytes()).await?;
        let mut back = vec![0u8; m.len()];
        s.read_exact(&mut back).await?;
        println!("{}", String::from_utf8_lossy(&back));
    }
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    anyhow::ensure!(rest.is_empty(), "unexpected bytes after the echoes: {rest:?}");
    Ok(())
}

struct GetOptions {
    timeout: Duration,
    no_reuse: bool,
    interval: Duration,
    headers: Vec<String>,
    report: bool,
}

async fn get(urls: &[String], count: u32, o: &GetOptions) -> anyhow::Result<()> {
    let (timeout, interval) = (o.timeout, o.interval);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(if o.no_reuse { 0 } else { usize::MAX })
        .build_http::<Full<Bytes>>();
    let count = if count == 0 { u32::MAX } else { count };
    for i in 0..count {
        for url in urls {
            let mut req = Request::get(url.replace("{i}", &i.to_string()).parse::<hyper::Uri>()?);
            for h in &o.headers {
                let (k, v) =
                    h.split_once(':').ok_or_else(|| anyhow::anyhow!("--header {h:?}: use name:value"))?;
                req = req.header(k.trim(), v.trim().replace("{i}", &i.to_string()));
            }
            let req = req.body(Full::new(Bytes::new()))?;
            let started = std::time::Instant::now();
            let resp = tokio::time::timeout(timeout, client.request(req))
                .await
                .map_err(|_| anyhow::anyhow!("request {i} to {url} timed out after {timeout:?}"))?
                .map_err(|e| anyhow::anyhow!("request {i} to {url}: {e:?}"))?;
            let status = resp.status();
            let headers: serde_json::Map<String, serde_json::Value> = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            let body = resp.into_body().collect().await?.to_bytes();
            let text = String::from_utf8_lossy(&body);
            if o.report {
                let body = serde_json::from_slice::<serde_json::Value>(&body)
                    .unwrap_or_else(|_| text.trim_end().into());
                let elapsed_ms = started.elapsed().as_millis() as u64;
                // When it ended, by the node's clock (the test reads it with the same clock).
                let at_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let line = serde_json::json!({"url": url, "status": status.as_u16(), "headers": headers, "body": body, "elapsed_ms": elapsed_ms, "at_ms": at_ms});
                println!("{line}");
                continue;
            }
            if !status.is_success() {
                anyhow::bail!("request {i} to {url}: status {status}: {text}");
            }
            println!("{}", text.trim_end());
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    Ok(())
}

/// What `load` saw in one second.
#[derive(Default, Clone)]
struct Second {
    sent: u64,
    skipped: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    pods: std::collections::BTreeMap<String, u64>,
    errors: u64,
}

async fn load(
    url: &str,
    rate: u32,
    seconds: u32,
    max_in_flight: usize,
    headers: &[String],
    start_at_ms: Option<u64>,
) -> anyhow::Result<()> {
    use std::sync::{Arc, Mutex};
    let mut late_ms = 0;
    if let Some(at) = start_at_ms {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
        if at > now {
            tokio::time::sleep(Duration::from_millis(at - now)).await;
        } else {
            late_ms = now - at;
        }
    }
    anyhow::ensure!(rate > 0 && seconds > 0, "--rate and --seconds must be above 0");
    let uri: hyper::Uri = url.parse()?;
    let mut pairs = Vec::new();
    for h in headers {
        let (k, v) = h.split_once(':').ok_or_else(|| anyhow::anyhow!("--header {h:?}: use name:value"))?;
        pairs.push((k.trim().to_string(), v.trim().to_string()));
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let per = Arc::new(Mutex::new(vec![Second::default(); seconds as usize + 30]));
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let second_of = move |at: tokio::time::Instant| (at - start).as_secs() as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = u64::from(rate) * u64::from(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        tick.tick().await;
        // When it leaves, not when it was due: a starved client shows as a lower rate.
        let s = second_of(tokio::time::Instant::now()).min(per.lock().unwrap().len() - 1);
        if in_flight.load(std::sync::atomic::Ordering::Relaxed) >= max_in_flight {
            per.lock().unwrap()[s].skipped += 1;
            continue;
        }
        per.lock().unwrap()[s].sent += 1;
        let mut req = Request::get(uri.clone());
        for (k, v) in &pairs {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(Bytes::new()))?;
        let (client, per, in_flight) = (client.clone(), per.clone(), in_flight.clone());
        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tasks.spawn(async move {
            let got = tokio::time::timeout(Duration::from_secs(10), async {
                let resp = client.request(req).await?;
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await?.to_bytes();
                let pod = (status == 200)
                    .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
                    .flatten()
                    .and_then(|v| v["pod"].as_str().map(str::to_string));
                anyhow::Ok((status, pod))
            })
            .await;
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let done = second_of(tokio::time::Instant::now());
            let mut per = per.lock().unwrap();
            let last = per.len() - 1;
            let slot = &mut per[done.min(last)];
            match got {
                Ok(Ok((status, pod))) => {
                    *slot.statuses.entry(status).or_default() += 1;
                    if let Some(p) = pod {
                        *slot.pods.entry(p).or_default() += 1;
                    }
                }
                _ => slot.errors += 1,
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let per = per.lock().unwrap().clone();
    let line = |second: Option<usize>, s: &Second| {
        let statuses: serde_json::Map<String, serde_json::Value> =
            s.statuses.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
        serde_json::json!({"second": second, "sent": s.sent, "skipped": s.skipped, "statuses": statuses, "pods": s.pods, "errors": s.errors})
    };
    let mut sum = Second::default();
    let last =
        per.iter().rposition(|s| s.sent + s.skipped + s.errors > 0 || !s.statuses.is_empty()).unwrap_or(0);
    for (i, s) in per.iter().enumerate().take(last + 1) {
        println!("{}", line(Some(i), s));
        sum.sent += s.sent;
        sum.skipped += s.skipped;
        sum.errors += s.errors;
        for (k, v) in &s.statuses {
            *sum.statuses.entry(*k).or_default() += v;
        }
        for (k, v) in &s.pods {
            *sum.pods.entry(k.clone()).or_default() += v;
        }
    }
    let mut total = line(None, &sum);
    total["late_ms"] = late_ms.into();
    println!("{total}");
    Ok(())
}

async fn grpc_echo(port: u16) -> anyhow::Result<()> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    eprintln!("grpc-echo on :{port}");
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

async fn ext_authz(port: u16) -> anyhow::Result<()> {
    use mycel_api::envoy::{
        config::core::v3::{HeaderValue, HeaderValueOption},
        service::auth::v3::{
            CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
            authorization_server::{Authorization, AuthorizationServer},
            check_response::HttpResponse,
        },
        r#type::v3::HttpStatus,
    };
    struct Authorizer;
    fn header(k: &str, v: &str) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(HeaderValue { key: k.into(), value: v.into(), ..Default::default() }),
            ..Default::default()
        }
    }
    #[tonic::async_trait]
    impl Authorization for Authorizer {
        async fn check(
            &self,
            request: tonic::Request<CheckRequest>,
        ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
            let attrs = request.into_inner().attributes.unwrap_or_default();
            let http = attrs.request.and_then(|r| r.http).unwrap_or_default();
            let principal = attrs.source.map(|s| s.principal).unwrap_or_default();
            eprintln!("check {} {} from {principal}", http.method, http.path);
            let said = http.headers.get("x-ext-authz").map(String::as_str).unwrap_or_default();
            let response = match said {
                "allow" => CheckResponse {
                    status: Some(mycel_api::google::rpc::Status { code: 0, ..Default::default() }),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers: vec![
                            header("x-ext-authz-check-result", "allowed"),
                            header("x-ext-authz-source", &principal),
                        ],
                        headers_to_remove: vec!["x-ext-authz-remove".into()],
                        response_headers_to_add: vec![header("x-ext-authz-said", "yes")],
                    })),
                },
                "hang" => std::future::pending().await,
                _ => CheckResponse {
                    // PERMISSION_DENIED
                    status: Some(mycel_api::google::rpc::Status { code: 7, ..Default::default() }),
                    http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                        status: Some(HttpStatus { code: 401 }),
                        headers: vec![header("x-ext-authz-check-result", "denied")],
                        body: "denied by ext-authz".into(),
                    })),
                },
            };
            Ok(tonic::Response::new(response))
        }
    }
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    eprintln!("ext-authz on :{port}");
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(Authorizer))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

async fn grpc_check(
    url: String,
    count: u32,
    interval: Duration,
    headers: &[String],
    report: bool,
) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Channel::from_shared(url)?.connect().await?;
    let mut client = HealthClient::new(channel);
    let count = if count == 0 { u32::MAX } else { count };
    for _ in 0..count {
        let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
        for h in headers {
            let (k, v) =
                h.split_once(':').ok_or_else(|| anyhow::anyhow!("--header {h:?}: use name:value"))?;
            let k = tonic::metadata::MetadataKey::from_bytes(k.trim().as_bytes())?;
            req.metadata_mut().insert(k, v.trim().parse()?);
        }
        match client.check(req).await {
            Ok(r) => println!("{:?}", r.into_inner().status()),
            Err(s) if report => println!("code: {:?}", s.code()),
            Err(s) => return Err(s.into()),
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    Ok(())
}

async fn http_relay(port: u16, to: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    let pod = pod_name();
    let to: hyper::Uri = to.parse()?;
    eprintln!("http-relay on :{port} as {pod}, to {to}");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    loop {
        let (stream, _) = listener.accept().await?;
        let (pod, to, client) = (pod.clone(), to.clone(), client.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (pod, to, client) = (pod.clone(), to.clone(), client.clone());
                async move {
                    let headers: serde_json::Map<String, serde_json::Value> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                        .collect();
                    let down = async {
                        let resp = client.request(Request::get(to).body(Full::new(Bytes::new()))?).await?;
                        let ok = resp.status().is_success();
                        let body = resp.into_body().collect().await?.to_bytes();
                        anyhow::ensure!(ok, "downstream answered an error");
                        Ok::<_, anyhow::Error>(serde_json::from_slice::<serde_json::Value>(&body)?)
                    }
                    .await;
                    let (status, downstream) = match down {
                        Ok(v) => (hyper::StatusCode::OK, v),
                        Err(e) => (hyper::StatusCode::BAD_GATEWAY, serde_json::json!(e.to_string())),
                    };
                    let body = serde_json::json!({"pod": pod, "headers": headers, "downstream": downstream});
                    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
                    *r.status_mut() = status;
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn ws_echo(port: u16) -> anyhow::Result<()> {
    use futures::{SinkExt, StreamExt};
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    eprintln!("ws-echo on :{port}");
    loop {
        let (s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
            while let Some(Ok(m)) = ws.next().await {
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn ws_send(url: &str, messages: &[String]) -> anyhow::Result<()> {
    use futures::{SinkExt, StreamExt};
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    for m in messages {
        ws.send(tokio_tungstenite::tungstenite::Message::text(m.clone())).await?;
        let back = ws.next().await.ok_or_else(|| anyhow::anyhow!("connection closed"))??;
        println!("{}", back.into_text()?);
    }
    ws.close(None).await?;
    Ok(())
}
