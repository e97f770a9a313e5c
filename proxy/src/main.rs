//! `mycel-proxy`: the sidecar and gateway proxy, and its `init` step that installs the pod's
//! traffic-capture rules. It owns the data path; it must not talk to the Kubernetes API (all it
//! knows arrives from the control plane's config stream or a local config file).

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mycel_proxy::config::Config;

#[derive(Parser)]
#[command(name = "mycel-proxy", version, about = "The Mycel sidecar and gateway proxy")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy from a configuration file (listeners and clusters, YAML or JSON).
    Run {
        #[arg(long, env = "MYCEL_PROXY_CONFIG")]
        config: PathBuf,
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

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Config::parse(&text).with_context(|| format!("{} is not a valid configuration", path.display()))
}

async fn watch_file(path: PathBuf, running: std::sync::Arc<mycel_proxy::Running>) {
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
        let result = match load(&path) {
            Ok(cfg) => running.apply(cfg).await.map_err(anyhow::Error::from),
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
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(run(cli))
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
        Cmd::Run { config, drain_secs, .. } => {
            let cfg = load(&config)?;
            let running = std::sync::Arc::new(mycel_proxy::start(cfg).await.context("starting the proxy")?);
            if let Ok(mut slot) = running.shared.log_control.write() {
                *slot = log_control.take();
            }
            tracing::info!(admin = %running.admin, "proxy ready");
            // Reload when the file changes (checked every second) or on SIGHUP; a file that does
            // not parse or validate is refused with the reason, and the running config stays.
            let watcher = tokio::spawn(watch_file(config.clone(), running.clone()));
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            watcher.abort();
            let _ = watcher.await;
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
