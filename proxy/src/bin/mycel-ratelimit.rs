//! `mycel-ratelimit`: the mesh's rate-limit service. Counts global limits and quotas in Redis
//! for every proxy of a policy; proxies reach it over mutual TLS on 15090 (it proves the
//! workload identity of its service account, from the mesh CA like a sidecar's). Admin on
//! 15020: `/healthz/ready` (a certificate, and Redis answering within 2 s) and `/metrics`.
//! `Remaining` (what `mycelctl quota` shows) answers on loopback 15091 only.

#![forbid(unsafe_code)]

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use mycel_proxy::{
    rls::{
        Grpc, Service,
        store::{RedisConfig, Store},
    },
    tls::mtls::MeshTls,
};

#[derive(Parser, Debug)]
#[command(name = "mycel-ratelimit", version, about = "The Mycel mesh's rate-limit service")]
struct Args {
    /// Redis `host:port` (one), or with --redis-cluster the cluster's seed nodes, comma-separated.
    #[arg(long, env = "MYCEL_REDIS_ADDRESSES", value_delimiter = ',', required = true)]
    redis: Vec<String>,
    #[arg(long, env = "MYCEL_REDIS_CLUSTER")]
    redis_cluster: bool,
    /// Each Redis operation's bound, in milliseconds.
    #[arg(long, env = "MYCEL_REDIS_TIMEOUT_MS", default_value_t = 100)]
    redis_timeout_ms: u64,
    /// TLS to Redis: the CA certificates (PEM) its certificate is verified against.
    #[arg(long, env = "MYCEL_REDIS_TLS_CA")]
    redis_tls_ca: Option<PathBuf>,
    #[arg(long, env = "MYCEL_RATELIMIT_LISTEN", default_value = "0.0.0.0:15090")]
    listen: String,
    #[arg(long, env = "MYCEL_RATELIMIT_LOCAL", default_value = "127.0.0.1:15091")]
    local: String,
    #[arg(long, env = "MYCEL_ADMIN", default_value = "0.0.0.0:15020")]
    admin: String,
    /// Its policies apply across the mesh: every proxy may count them.
    #[arg(long, env = "MYCEL_ROOT_NAMESPACE", default_value = "mycel-system")]
    root_namespace: String,
    /// The control plane (its CA), `host:port`.
    #[arg(long, env = "MYCEL_CONTROL_PLANE")]
    control_plane: String,
    #[arg(long, env = "MYCEL_CONTROL_PLANE_NAME")]
    control_plane_name: Option<String>,
    #[arg(long, env = "MYCEL_CA_ROOTS", default_value = "/etc/mycel/ca/root-cert.pem")]
    ca_roots: PathBuf,
    #[arg(long, env = "MYCEL_TOKEN_PATH", default_value = "/var/run/secrets/tokens/mycel-token")]
    token: PathBuf,
    #[arg(long, env = "MYCEL_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, env = "POD_NAME", default_value = "")]
    pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "mycel-system")]
    pod_namespace: String,
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    #[arg(long, env = "MYCEL_REVISION", default_value = "default")]
    revision: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    if !(1..=10_000).contains(&args.redis_timeout_ms) {
        anyhow::bail!("--redis-timeout-ms must be within 1-10000");
    }
    let password = std::env::var("MYCEL_REDIS_PASSWORD").ok().filter(|p| !p.is_empty());
    let tls_ca = match &args.redis_tls_ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("--redis-tls-ca {}", p.display()))?),
        None => None,
    };
    let store = Store::new(&RedisConfig {
        addresses: args.redis.clone(),
        cluster: args.redis_cluster,
        password,
        timeout: Duration::from_millis(args.redis_timeout_ms),
        tls_ca,
    })
    .map_err(anyhow::Error::msg)
    .context("--redis")?;
    let store = Arc::new(store);
    let service =
        Arc::new(Service::new(store.clone(), args.root_namespace.clone(), args.trust_domain.clone()));

    let host = args.control_plane.rsplit_once(':').map(|(h, _)| h).unwrap_or(&args.control_plane);
    let boot = mycel_proxy::xds::Bootstrap {
        control_plane: args.control_plane.clone(),
        server_name: args
            .control_plane_name
            .clone()
            .unwrap_or_else(|| host.trim_matches(['[', ']']).to_string()),
        ca_roots: mycel_proxy::xds::Bootstrap::read_roots(&args.ca_roots)?,
        token_path: args.token.clone(),
        trust_domain: args.trust_domain.clone(),
        node: mycel_api::v1alpha1::Node {
            pod: args.pod_name.clone(),
            namespace: args.pod_namespace.clone(),
            service_account: args.service_account.clone(),
            revision: args.revision.clone(),
            proxy_version: env!("CARGO_PKG_VERSION").into(),
            ips: vec![],
        },
        cert_ttl: None,
    };
    let mesh = Arc::new(MeshTls::default());
    let mesh_tls = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let local = tokio::net::TcpListener::bind(&args.local)
        .await
        .with_context(|| format!("--local {}", args.local))?;
    if !local.local_addr()?.ip().is_loopback() {
        anyhow::bail!("--local must be a loopback address: it answers without authentication");
    }
    let admin = tokio::net::TcpListener::bind(&args.admin)
        .await
        .with_context(|| format!("--admin {}", args.admin))?;
    tracing::info!(listen = %args.listen, local = %args.local, admin = %args.admin, redis = ?args.redis, cluster = args.redis_cluster, "rate-limit service started");

    let ids = tokio::spawn(keep_identity(boot, mesh.clone()));
    let grpc = tokio::spawn(mycel_proxy::rls::serve::serve(
        mesh_tls,
        Grpc { service: service.clone(), local: false },
        Some(mesh.clone()),
    ));
    let local = tokio::spawn(mycel_proxy::rls::serve::serve(
        local,
        Grpc { service: service.clone(), local: true },
        None,
    ));
    let admin = tokio::spawn(serve_admin(admin, service, mesh));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    for t in [ids, grpc, local, admin] {
        t.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// A workload certificate for mutual TLS, renewed at half-life; retried with backoff.
async fn keep_identity(boot: mycel_proxy::xds::Bootstrap, mesh: Arc<MeshTls>) {
    let mut trust = boot.ca_roots.clone();
    let mut delay = Duration::from_millis(500);
    loop {
        match mycel_proxy::identity::request(&boot, &trust).await {
            Ok(id) => match mesh.set_identity(&id) {
                Ok(()) => {
                    tracing::info!(identity = %id.spiffe_id, not_after = ?id.not_after, "workload certificate in use");
                    trust = id.trust_bundle_pem.clone();
                    delay = Duration::from_millis(500);
                    let wait = id.renew_at().duration_since(std::time::SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => tracing::error!("cannot use the workload certificate: {e:#}"),
            },
            Err(e) => tracing::warn!(retry_in = ?delay, "cannot get a workload certificate: {e:#}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

fn public(path: &str) -> bool {
    matches!(path, "/healthz/ready" | "/metrics")
}

async fn serve_admin(listener: tokio::net::TcpListener, service: Arc<Service>, mesh: Arc<MeshTls>) {
    use mycel_admin::{Access, Asked, Reply, StatusCode};
    let access = Access { public, how: "use `kubectl port-forward` and ask 127.0.0.1:15020" };
    mycel_admin::serve(listener, access, move |asked: Asked| {
        let (service, mesh) = (service.clone(), mesh.clone());
        async move {
            match asked.path.as_str() {
                "/healthz/ready" => {
                    if mesh.own_id().is_none() {
                        return Reply::text(StatusCode::SERVICE_UNAVAILABLE, "no workload certificate yet\n");
                    }
                    match tokio::time::timeout(Duration::from_secs(2), service.store.ping()).await {
                        Ok(Ok(())) => Reply::text(StatusCode::OK, "ready\n"),
                        Ok(Err(e)) => Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("Redis: {e}\n")),
                        Err(_) => {
                            Reply::text(StatusCode::SERVICE_UNAVAILABLE, "Redis: no answer within 2s\n")
                        }
                    }
                }
                "/metrics" => Reply::metrics(service.metrics.render()),
                _ => Reply::not_found(),
            }
        }
    })
    .await
}
