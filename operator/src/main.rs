//! `mycel-operator`: the operator (reconciles `MeshInstallation` into a control-plane revision)
//! and, under the `control-plane` command, the control plane itself (discovery, config server,
//! certificate authority, webhooks). It owns everything that runs in the cluster's control
//! plane; it must not contain data-path code, which lives in `mycel-proxy`.

#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::time::Duration;

use mycel_operator::{admin, controlplane, installation, leader, metrics::Metrics};
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
        /// The operator's mesh ConfigMap (mesh.json); its values are the defaults of the flags
        /// below.
        #[arg(long, env = "MYCEL_MESH_CONFIG")]
        mesh_config: Option<std::path::PathBuf>,
        #[arg(long)]
        revision: Option<String>,
        /// Namespace of the installation (where the CA Secret is).
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: Option<String>,
        #[arg(long)]
        trust_domain: Option<String>,
        /// Secret holding the CA (tls.crt, tls.key, optional ca.crt).
        #[arg(long)]
        ca_secret: Option<String>,
        /// Lifetime of workload certificates, e.g. 24h or 90m.
        #[arg(long)]
        workload_cert_ttl: Option<String>,
        #[arg(long, default_value = "0.0.0.0:15012")]
        grpc_addr: SocketAddr,
        #[arg(long, default_value = "0.0.0.0:15014")]
        monitor_addr: SocketAddr,
        /// Injection and validation webhooks; `none` to serve none.
        #[arg(long, default_value = "0.0.0.0:15017")]
        webhook_addr: String,
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        /// Quiet time that ends a burst of changes before they are pushed.
        #[arg(long, default_value_t = 10)]
        debounce_ms: u64,
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
            let mut campaign = None;
            if leader_elect {
                let (leading_tx, mut leading_rx) = tokio::sync::watch::channel(false);
                let (client, lease) = (client.clone(), lease.clone());
                campaign = Some(tokio::spawn(async move {
                    let _ = lost_tx.send(leader::campaign(client, lease, leading_tx).await);
                }));
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
            if let Some(campaign) = campaign {
                // No renewal may race the release (or take the lease back after it).
                campaign.abort();
                let _ = campaign.await;
                leader::release(client, &lease).await;
            }
            tracing::info!("operator stopped");
            Ok(())
        }
        Cmd::ControlPlane {
            mesh_config,
            revision,
            namespace,
            trust_domain,
            ca_secret,
            workload_cert_ttl,
            grpc_addr,
            monitor_addr,
            webhook_addr,
            cluster_domain,
            debounce_ms,
        } => {
            // One file, read once, gives both the control plane's and the injector's settings.
            let (mesh, proxy): (controlplane::MeshFile, controlplane::inject::ProxySettings) =
                match &mesh_config {
                    Some(p) => {
                        let text =
                            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                        let value: serde_json::Value = serde_json::from_str(&text)
                            .with_context(|| format!("{} is not a mesh config", p.display()))?;
                        (
                            serde_json::from_value(value.clone())
                                .with_context(|| format!("{} is not a mesh config", p.display()))?,
                            serde_json::from_value(value)
                                .with_context(|| format!("{}: proxy settings", p.display()))?,
                        )
                    }
                    None => Default::default(),
                };
            let ext_authz = mesh.ext_authz();
            let webhook_addr = match webhook_addr.as_str() {
                "none" => None,
                a => Some(a.parse().with_context(|| format!("--webhook-addr {a:?}"))?),
            };
            let pick = |flag: Option<String>, file: String, default: &str| {
                flag.or(Some(file).filter(|s| !s.is_empty())).unwrap_or_else(|| default.to_string())
            };
            let ttl_text = workload_cert_ttl.or(mesh.workload_cert_ttl).unwrap_or_else(|| "24h".into());
            let workload_cert_ttl = mycel_crds::common::parse_duration(&ttl_text)
                .map_err(|e| anyhow::anyhow!("--workload-cert-ttl {ttl_text:?}: {e}"))?;
            let trust_domain = pick(trust_domain, mesh.trust_domain, "cluster.local");
            let namespace = pick(namespace, mesh.namespace, "mycel-system");
            let revision = pick(revision, mesh.revision, "default");
            let rate_limit_service =
                mesh.rate_limit.as_ref().map(|r| r.service(&namespace, &revision, &trust_domain));
            let mut settings = controlplane::Settings {
                namespace: namespace.clone(),
                revision: revision.clone(),
                ca_secret: ca_secret
                    .or(mesh.ca_secret)
                    .unwrap_or_else(|| installation::render::CA_SECRET.into()),
                workload_cert_ttl,
                grpc_addr,
                monitor_addr,
                webhook_addr,
                replicas: mesh.control_plane_replicas.unwrap_or(1),
                proxy,
                discovery: controlplane::model::Options {
                    cluster_domain,
                    root_namespace: namespace,
                    trust_domain: trust_domain.clone(),
                    mtls_mode: mesh.mtls_mode.unwrap_or_default(),
                    debounce: Duration::from_millis(debounce_ms),
                    debounce_max: Duration::from_millis(debounce_ms * 10),
                    revision: Some(revision.clone()),
                    rate_limit_service,
                    ext_authz,
                },
                trust_domain,
            };
            // The injector points sidecars at this revision, whatever the file said.
            settings.proxy.namespace = settings.namespace.clone();
            settings.proxy.revision = settings.revision.clone();
            settings.proxy.trust_domain = settings.trust_domain.clone();
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
            let handle = controlplane::start(client, settings).await?;
            shutdown_signal().await;
            handle.stop();
            tracing::info!("control plane stopped");
            Ok(())
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
