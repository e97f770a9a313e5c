//! `mycel-operator`: the operator (reconciles `MeshInstallation` into a control-plane revision)
//! and, under the `control-plane` command, the control plane itself (discovery, config server,
//! certificate authority, webhooks). It owns everything that runs in the cluster's control
//! plane; it must not contain data-path code, which lives in `mycel-proxy`.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::time::Duration;

use mycel_operator::{admin, installation, leader, metrics::Metrics};
use tracing_subscriber::{EnvFilter, fmt};

#[derive(Parser)]
#[command(name = "mycel-operator", version, about = "The Mycel operator and control plane")]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "MYCEL_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the operator: reconcile MeshInstallation resources into control-plane revisions.
    Run {
        /// Only reconcile installations in this namespace (default: all namespaces).
        #[arg(long, env = "MYCEL_WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, default_value = "0.0.0.0:8080", env = "MYCEL_ADMIN_ADDR")]
        admin_addr: SocketAddr,
        /// Registry prefix of the control-plane and proxy images.
        #[arg(long, default_value = "docker.io/mycel", env = "MYCEL_IMAGE_REGISTRY")]
        image_registry: String,
        /// Image tag installed when a MeshInstallation names no version.
        #[arg(long, default_value = concat!("v", env!("CARGO_PKG_VERSION")), env = "MYCEL_IMAGE_VERSION")]
        image_version: String,
        /// Elect a leader among replicas through a Lease; only the leader reconciles.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leader_elect: bool,
        /// Namespace of the Lease (default: --namespace, else $POD_NAMESPACE, else mycel-system).
        #[arg(long)]
        lease_namespace: Option<String>,
        /// Seconds without renewal after which a standby takes the lease over.
        #[arg(long, default_value_t = 15)]
        lease_duration_secs: u64,
        /// Seconds between renewals by the leader (and tries by standbys).
        #[arg(long, default_value_t = 5)]
        lease_renew_secs: u64,
    },
    /// Run one control-plane revision: config stream and CA on 15012, webhooks on 15017.
    ControlPlane {
        #[arg(long, default_value = "default")]
        revision: String,
        #[arg(long)]
        mesh_config: Option<std::path::PathBuf>,
    },
    /// Print the CustomResourceDefinitions this operator serves, as YAML.
    Crds,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if cli.log_json {
        fmt().json().with_writer(std::io::stderr).with_env_filter(filter).init();
    } else {
        fmt().with_writer(std::io::stderr).with_env_filter(filter).init();
    }
    match cli.command {
        Cmd::Crds => {
            for (_, yaml) in
                mycel_crds::render_manifests().into_iter().filter(|(n, _)| n.starts_with("bases/"))
            {
                println!("---\n{yaml}");
            }
            Ok(())
        }
        Cmd::Run {
            namespace,
            admin_addr,
            image_registry,
            image_version,
            leader_elect,
            lease_namespace,
            lease_duration_secs,
            lease_renew_secs,
        } => {
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
            let metrics = Arc::new(Metrics::default());
            let health = Arc::new(admin::Health::default());
            let admin_task = tokio::spawn(admin::serve(admin_addr, health.clone(), metrics.clone()));
            // A standby is healthy and ready: it is waiting to take over.
            health.ready.store(true, std::sync::atomic::Ordering::Relaxed);
            let images =
                installation::render::ImageDefaults { registry: image_registry, version: image_version };
            tracing::info!(namespace = namespace.as_deref().unwrap_or("<all>"), "operator starting");

            let lease = leader::Config {
                namespace: lease_namespace
                    .or_else(|| namespace.clone())
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .unwrap_or_else(|| "mycel-system".into()),
                name: "mycel-operator".into(),
                identity: std::env::var("POD_NAME")
                    .unwrap_or_else(|_| format!("{}-{}", hostname(), std::process::id())),
                duration: Duration::from_secs(lease_duration_secs),
                renew: Duration::from_secs(lease_renew_secs),
            };
            let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
            if leader_elect {
                let (leading_tx, mut leading_rx) = tokio::sync::watch::channel(false);
                let (client, lease) = (client.clone(), lease.clone());
                tokio::spawn(async move {
                    let _ = lost_tx.send(leader::campaign(client, lease, leading_tx).await);
                });
                tracing::info!("waiting to become leader");
                tokio::select! {
                    _ = leading_rx.wait_for(|l| *l) => {}
                    _ = shutdown_signal() => {
                        admin_task.abort();
                        return Ok(());
                    }
                }
            }
            let lost = Arc::new(std::sync::Mutex::new(None));
            let lost_slot = lost.clone();
            let stop = async move {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    Ok(why) = lost_rx => {
                        if let Ok(mut slot) = lost_slot.lock() {
                            *slot = Some(why);
                        }
                    }
                }
            };
            installation::run(client.clone(), namespace, images, metrics, stop).await;
            admin_task.abort();
            if let Some(why) = lost.lock().ok().and_then(|mut l| l.take()) {
                anyhow::bail!("stopped reconciling: {why}");
            }
            if leader_elect {
                leader::release(client, &lease).await;
            }
            tracing::info!("operator stopped");
            Ok(())
        }
        Cmd::ControlPlane { .. } => {
            anyhow::bail!("not built yet: the control plane arrives with the control-plane issue")
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "operator".into())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
