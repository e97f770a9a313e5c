//! `mycel-proxy`: the sidecar and gateway proxy, and its `init` step that installs the pod's
//! traffic-capture rules. It owns the data path; it must not talk to the Kubernetes API (all it
//! knows arrives from the control plane's config stream or a local config file).

#![forbid(unsafe_code)]

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mycel_proxy::{config::Config, xds::Layered};

#[derive(Parser)]
#[command(name = "mycel-proxy", version, about = "The Mycel sidecar and gateway proxy")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy: from a configuration file (listeners and clusters, YAML or JSON), from the
    /// control plane's config stream, or both (the file's part is static, the stream adds to it).
    Run {
        #[arg(long, env = "MYCEL_PROXY_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        mesh: Box<MeshArgs>,
        /// How long a SIGTERM waits for requests in flight before closing.
        #[arg(long, default_value_t = 5)]
        drain_secs: u64,
        /// Worker threads; 0 means one per CPU.
        #[arg(long, default_value_t = 2, env = "MYCEL_PROXY_CONCURRENCY")]
        concurrency: usize,
    },
    /// Install the iptables rules that capture the pod's traffic, then exit.
    Init {
        /// User id the proxy runs as: its own connections are never captured.
        #[arg(long, default_value_t = 1337, env = "MYCEL_PROXY_UID")]
        proxy_uid: u32,
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// Inbound ports left alone, e.g. `8081,9090`.
        #[arg(long, value_delimiter = ',', env = "MYCEL_EXCLUDE_INBOUND_PORTS")]
        exclude_inbound_ports: Vec<u16>,
        /// Outbound ports left alone.
        #[arg(long, value_delimiter = ',', env = "MYCEL_EXCLUDE_OUTBOUND_PORTS")]
        exclude_outbound_ports: Vec<u16>,
        /// Outbound destinations left alone, e.g. `10.0.0.0/8,fd00::/8`.
        #[arg(long, value_delimiter = ',', env = "MYCEL_EXCLUDE_OUTBOUND_CIDRS")]
        exclude_outbound_cidrs: Vec<String>,
    },
}

/// How the proxy joins the mesh. With `--control-plane` it gets a certificate and its config
/// from there; the rest describes the pod (the injector sets these from the downward API).
#[derive(clap::Args, Debug)]
struct MeshArgs {
    /// The control plane's gRPC address, `host:port`.
    #[arg(long, env = "MYCEL_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Name the control plane's certificate must carry (default: the host of --control-plane).
    #[arg(long, env = "MYCEL_CONTROL_PLANE_NAME")]
    control_plane_name: Option<String>,
    /// PEM roots to trust for the control plane until the first certificate brings the bundle.
    #[arg(long, env = "MYCEL_CA_ROOTS", default_value = "/etc/mycel/ca/root-cert.pem")]
    ca_roots: PathBuf,
    /// Projected service-account token (audience mycel-ca), read anew at every renewal.
    #[arg(long, env = "MYCEL_TOKEN_PATH", default_value = "/var/run/secrets/tokens/mycel-token")]
    token: PathBuf,
    #[arg(long, env = "MYCEL_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, env = "POD_NAME", default_value = "")]
    pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pod_namespace: String,
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    #[arg(long, env = "MYCEL_REVISION", default_value = "default")]
    revision: String,
    /// The pod's IPs, comma-separated.
    #[arg(long, env = "INSTANCE_IPS", value_delimiter = ',')]
    instance_ips: Vec<String>,
    /// Certificate lifetime to ask for, in seconds (default: the CA's).
    #[arg(long, env = "MYCEL_CERT_TTL_SECS")]
    cert_ttl_secs: Option<u64>,
    /// Sidecar mode: listen on 15001 (outbound) and 15006 (inbound) for captured traffic, and
    /// serve admin on 0.0.0.0:15020 (for the kubelet's probes). Same as `--mode sidecar`.
    #[arg(long, env = "MYCEL_SIDECAR")]
    sidecar: bool,
    /// `sidecar` (as --sidecar), or `gateway`: a proxy of its own in front of the mesh, with
    /// admin on 0.0.0.0:15020 and no capture.
    #[arg(long, env = "MYCEL_PROXY_MODE", value_parser = ["sidecar", "gateway"])]
    mode: Option<String>,
    /// Inbound mutual-TLS mode until the control plane's first policy arrives (the mesh's
    /// `spec.mtls.mode`): under STRICT a sidecar never accepts plaintext, not even before then.
    #[arg(long, env = "MYCEL_INBOUND_MTLS_DEFAULT", value_parser = ["PERMISSIVE", "STRICT", "DISABLE"])]
    inbound_mtls_default: Option<String>,
}

impl MeshArgs {
    fn bootstrap(&self) -> anyhow::Result<Option<mycel_proxy::xds::Bootstrap>> {
        let Some(cp) = &self.control_plane else { return Ok(None) };
        let host = cp.rsplit_once(':').map(|(h, _)| h).unwrap_or(cp).trim_matches(['[', ']']);
        Ok(Some(mycel_proxy::xds::Bootstrap {
            control_plane: cp.clone(),
            server_name: self.control_plane_name.clone().unwrap_or_else(|| host.to_string()),
            ca_roots: mycel_proxy::xds::Bootstrap::read_roots(&self.ca_roots)?,
            token_path: self.token.clone(),
            trust_domain: self.trust_domain.clone(),
            node: mycel_api::v1alpha1::Node {
                pod: self.pod_name.clone(),
                namespace: self.pod_namespace.clone(),
                service_account: self.service_account.clone(),
                revision: self.revision.clone(),
                proxy_version: env!("CARGO_PKG_VERSION").into(),
                ips: self.instance_ips.clone(),
            },
            cert_ttl: self.cert_ttl_secs.map(Duration::from_secs),
        }))
    }

    /// The static layer: the file's configuration, plus the capture listeners in sidecar mode.
    fn base(&self, file: Option<Config>) -> anyhow::Result<Config> {
        let mut c = match file {
            Some(c) => c,
            None => Config::parse("{}")?,
        };
        c.streamed = self.control_plane.is_some();
        // No inbound connection is accepted before the control plane's first inbound policy.
        c.inbound_pending = c.streamed;
        if self.mode.as_deref() == Some("gateway") {
            c.admin = "0.0.0.0:15020".parse()?;
        }
        if let Some(mode) = &self.inbound_mtls_default {
            use mycel_proxy::config::MtlsMode;
            c.inbound_mtls.mode = match mode.as_str() {
                "STRICT" => MtlsMode::Strict,
                "DISABLE" => MtlsMode::Disable,
                _ => MtlsMode::Permissive,
            };
        }
        if self.sidecar || self.mode.as_deref() == Some("sidecar") {
            use mycel_proxy::config::{Direction, Listener, Protocol};
            c.admin = "0.0.0.0:15020".parse()?;
            for (name, addr, direction) in [
                ("outbound", "0.0.0.0:15001", Direction::Outbound),
                ("outbound-ipv6", "[::]:15001", Direction::Outbound),
                ("inbound", "0.0.0.0:15006", Direction::Inbound),
                ("inbound-ipv6", "[::]:15006", Direction::Inbound),
            ] {
                c.listeners.push(Listener {
                    name: name.into(),
                    address: addr.parse()?,
                    protocol: Protocol::Auto,
                    cluster: None,
                    original_destination: true,
                    direction,
                    detect_timeout_ms: 500,
                });
            }
        }
        Ok(c)
    }
}

fn load(path: &std::path::Path, streamed: bool) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Config::parse_with(&text, streamed)
        .with_context(|| format!("{} is not a valid configuration", path.display()))
}

async fn watch_file(path: PathBuf, layered: std::sync::Arc<Layered>, mesh: std::sync::Arc<MeshArgs>) {
    let running = layered.running.clone();
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = modified(&path);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let now = modified(&path);
        if !forced && now == last {
            continue;
        }
        last = now;
        let result = match load(&path, mesh.control_plane.is_some()).and_then(|c| mesh.base(Some(c))) {
            Ok(cfg) => layered.set_base(cfg).await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        running.shared.metrics.reloaded(result.is_ok());
        match result {
            Ok(()) => tracing::info!(file = %path.display(), "configuration reloaded"),
            Err(e) => {
                tracing::error!(file = %path.display(), "configuration rejected, the previous one stays: {e:#}")
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Cmd::Run { concurrency, .. } if *concurrency > 0 => *concurrency,
        Cmd::Run { .. } => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        Cmd::Init { .. } => 1,
    };
    // One worker: the single-threaded scheduler, which skips the work-stealing machinery
    // (atomics, cross-thread wakeups) that a lone worker never needs.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build()?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};
    let (filter, handle) =
        reload::Layer::new(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let log_control: mycel_proxy::LogControl = Box::new(move |new: Option<&str>| {
        if let Some(f) = new {
            let parsed = EnvFilter::try_new(f).map_err(|e| format!("invalid log filter {f:?}: {e}"))?;
            handle.reload(parsed).map_err(|e| e.to_string())?;
            tracing::info!(filter = %f, "log filter changed");
        }
        handle.with_current(|f| f.to_string()).map_err(|e| e.to_string())
    });
    let mut log_control = Some(log_control);
    match cli.command {
        Cmd::Run { config, mesh, drain_secs, .. } => {
            if config.is_none() && mesh.control_plane.is_none() {
                anyhow::bail!("nothing to run: give --config FILE, --control-plane HOST:PORT, or both");
            }
            let boot = mesh.bootstrap()?;
            let file = config.as_deref().map(|p| load(p, mesh.control_plane.is_some())).transpose()?;
            let base = mesh.base(file)?;
            let running =
                std::sync::Arc::new(mycel_proxy::start(base.clone()).await.context("starting the proxy")?);
            if let Ok(mut slot) = running.shared.log_control.write() {
                *slot = log_control.take();
            }
            if let Ok(probes) = std::env::var("MYCEL_APP_PROBES") {
                let parsed: std::collections::HashMap<String, serde_json::Value> =
                    serde_json::from_str(&probes)
                        .context("MYCEL_APP_PROBES is not the JSON the injector writes")?;
                if let Ok(mut p) = running.shared.app_probes.write() {
                    *p = parsed;
                }
            }
            if boot.is_some() {
                // Ready once the control plane's first config is in.
                running.shared.ready.store(false, std::sync::atomic::Ordering::Release);
            }
            tracing::info!(admin = %running.admin, "proxy started");
            let layered = std::sync::Arc::new(Layered::new(running.clone(), base));
            let mesh: std::sync::Arc<MeshArgs> = std::sync::Arc::from(mesh);
            let mut tasks = Vec::new();
            if let Some(boot) = boot {
                let boot = std::sync::Arc::new(boot);
                let (id_tx, id_rx) = tokio::sync::watch::channel(None);
                tasks.push(tokio::spawn(mycel_proxy::identity::maintain(
                    boot.clone(),
                    id_tx,
                    running.shared.clone(),
                )));
                // Every new certificate becomes the mesh TLS identity (connections already open
                // keep theirs).
                let (mut ids, shared) = (id_rx.clone(), running.shared.clone());
                tasks.push(tokio::spawn(async move {
                    while ids.changed().await.is_ok() {
                        let id = ids.borrow_and_update().clone();
                        if let Some(id) = id
                            && let Err(e) = shared.mesh.set_identity(&id)
                        {
                            tracing::error!("cannot use the new workload certificate for mutual TLS: {e:#}");
                        }
                    }
                }));
                tasks.push(tokio::spawn(mycel_proxy::xds::run(boot, layered.clone(), id_rx)));
            }
            // Reload when the file changes (checked every second) or on SIGHUP; a file that does
            // not parse or validate is refused with the reason, and the running config stays.
            if let Some(config) = config {
                tasks.push(tokio::spawn(watch_file(config, layered.clone(), mesh.clone())));
            }
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            for t in tasks {
                t.abort();
                let _ = t.await;
            }
            drop(layered);
            tracing::info!("draining");
            match std::sync::Arc::try_unwrap(running) {
                Ok(r) => r.shutdown(Duration::from_secs(drain_secs)).await,
                Err(_) => tracing::warn!("could not drain: the proxy is still shared"),
            }
            Ok(())
        }
        Cmd::Init {
            proxy_uid,
            outbound_port,
            inbound_port,
            exclude_inbound_ports,
            exclude_outbound_ports,
            exclude_outbound_cidrs,
        } => {
            let opts = mycel_proxy::capture::CaptureOptions {
                proxy_uid,
                outbound_port,
                inbound_port,
                exclude_inbound_ports,
                exclude_outbound_ports,
                exclude_outbound_cidrs,
            };
            for note in mycel_proxy::capture::install(&opts).map_err(anyhow::Error::msg)? {
                tracing::warn!("{note}");
            }
            tracing::info!(outbound = outbound_port, inbound = inbound_port, "traffic capture installed");
            Ok(())
        }
    }
}
