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
    },
    /// Install the iptables rules that capture the pod's traffic, then exit.
    Init,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Run { config, drain_secs } => {
            let text =
                std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
            let cfg = Config::parse(&text)
                .with_context(|| format!("{} is not a valid configuration", config.display()))?;
            let running = mycel_proxy::start(cfg).await.context("binding the listeners")?;
            tracing::info!(admin = %running.admin, "proxy ready");
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("draining");
            running.shutdown(Duration::from_secs(drain_secs)).await;
            Ok(())
        }
        Cmd::Init => anyhow::bail!("not built yet: traffic capture arrives with the proxy's capture step"),
    }
}
