//! `mycelctl`, the command line of Mycel. It owns user-facing commands (install, check, inspect)
//! and the developer commands under `dev` that drive the local cluster harness of `mycel-e2e`.
//! It must not hold logic the operator or proxy need: those live in their own crates.

use std::process::ExitCode;

mod portforward;
mod top;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mycel_e2e::local::LocalCluster;

#[derive(Parser)]
#[command(name = "mycelctl", version, about = "Install, inspect and develop the Mycel service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Live traffic of a namespace's meshed workloads: request rate, success, latency
    /// percentiles, mutual-TLS share and identity, and caller → Service edges.
    Top {
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// How long to measure, in seconds.
        #[arg(long, default_value_t = 5)]
        window: u64,
    },
    /// Add the sidecar to the workloads of YAML manifests, as the injection webhook would, and
    /// print them (for GitOps repositories). Injecting twice changes nothing.
    Inject {
        /// Manifest file (`-` for standard input); several documents are fine.
        #[arg(long, short = 'f')]
        filename: String,
        /// The installation's mesh config (`mesh.json` of ConfigMap mycel-mesh-<revision>), for
        /// its proxy image, resources and log level.
        #[arg(long)]
        mesh_config: Option<std::path::PathBuf>,
        #[arg(long, default_value = "default")]
        revision: String,
        /// Namespace of the installation.
        #[arg(long, default_value = "mycel-system")]
        namespace: String,
    },
    /// Which proxies are connected to a control plane, and whether each has accepted its latest
    /// config (or what it rejected, and why).
    ProxyStatus {
        /// The control plane's monitoring address, e.g. http://127.0.0.1:15014 (default: a
        /// port-forward to one of the revision's pods, where `/debug/proxies` answers).
        #[arg(long)]
        control_plane: Option<String>,
        /// Namespace of the installation.
        #[arg(long, short = 'n', default_value = "mycel-system")]
        namespace: String,
        #[arg(long, default_value = "default")]
        revision: String,
        /// Print the control plane's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Developer tools: the local Kubernetes cluster used by the demo and the tests.
    Dev {
        #[command(subcommand)]
        command: DevCmd,
    },
}

#[derive(Subcommand)]
enum DevCmd {
    /// The local cluster: real etcd, kube-apiserver, controller-manager, scheduler and a kwok node.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Start the cluster (or reuse the running one) and print how to reach it.
    Up,
    /// Stop the cluster and remove its state.
    Down,
    /// Print `export KUBECONFIG=…` and `PATH` lines for a running cluster (use with `eval`).
    Env,
    /// Say whether the cluster is running.
    Status,
    /// Rebuild the images of Mycel's binaries (after `cargo build`) and load them into the node.
    LoadImages,
    /// List what a stopped cluster left on this machine (processes, mounts, bridge, routes,
    /// iptables chains, cgroups, state); fails if anything is left.
    Leftovers,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mycelctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let state = LocalCluster::default_state_dir();
    match cli.command {
        Cmd::Top { namespace, window } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let out = rt.block_on(async {
                let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
                top::top(client, &namespace, std::time::Duration::from_secs(window)).await
            })?;
            print!("{out}");
        }
        Cmd::Inject { filename, mesh_config, revision, namespace } => {
            let text = if filename == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&filename).with_context(|| format!("reading {filename}"))?
            };
            let mut settings: mycel_operator::controlplane::inject::ProxySettings = match &mesh_config {
                Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)
                    .with_context(|| format!("{} is not a mesh config", p.display()))?,
                None => Default::default(),
            };
            settings.revision = revision;
            settings.namespace = namespace;
            print!("{}", inject_manifests(&text, &settings)?);
        }
        Cmd::ProxyStatus { control_plane, namespace, revision, json } => {
            let body = match control_plane {
                Some(url) => http_get(&url, "/debug/proxies")?,
                None => through_api_server(&namespace, &revision)?,
            };
            if json {
                println!("{body}");
            } else {
                print!("{}", proxy_status_table(&body)?);
            }
        }
        Cmd::Dev { command: DevCmd::Cluster { command } } => match command {
            ClusterCmd::Up => {
                let c = LocalCluster::ensure_up(&state).context("starting the local cluster")?;
                println!("local cluster is up");
                print_env(&c);
            }
            ClusterCmd::Down => {
                LocalCluster::down(&state).context("stopping the local cluster")?;
                println!("local cluster stopped and its state removed ({})", state.display());
            }
            ClusterCmd::Env => {
                let c = LocalCluster::running(&state).with_context(|| {
                    format!(
                        "no local cluster is running in {}; start one with `mycelctl dev cluster up`",
                        state.display()
                    )
                })?;
                print_env(&c);
            }
            ClusterCmd::LoadImages => {
                let c = LocalCluster::running(&state).with_context(|| {
                    format!(
                        "no local cluster is running in {}; start one with `mycelctl dev cluster up`",
                        state.display()
                    )
                })?;
                c.load_images().context("loading images")?;
                println!("images loaded into the node");
            }
            ClusterCmd::Leftovers => {
                let found = mycel_e2e::node::leftovers(&state, mycel_e2e::local::SERVICE_CIDR);
                if !found.is_empty() {
                    anyhow::bail!(
                        "the local cluster left {} thing(s) behind:\n  {}",
                        found.len(),
                        found.join("\n  ")
                    );
                }
                println!("nothing left behind by the local cluster");
            }
            ClusterCmd::Status => match LocalCluster::running(&state) {
                Some(c) => println!(
                    "running: API server https://127.0.0.1:{}, kubeconfig {}",
                    c.info.api_port,
                    c.kubeconfig().display()
                ),
                None => {
                    println!("not running (state directory {})", state.display());
                }
            },
        },
    }
    Ok(())
}

fn print_env(c: &LocalCluster) {
    println!("export KUBECONFIG={}", c.kubeconfig().display());
    println!("export PATH={}:$PATH", c.bin_dir().display());
}

/// GET on a plain-HTTP base URL such as `http://127.0.0.1:15014`.
fn http_get(base: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let host = base
        .strip_prefix("http://")
        .with_context(|| format!("--control-plane {base:?}: use http://host:port"))?;
    let host = host.trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{host}{path}: {}", head.lines().next().unwrap_or(""));
    Ok(body.to_string())
}

/// The control plane's `/debug/proxies`, through a port-forward to one of the revision's pods
/// (it answers only on its loopback).
fn through_api_server(namespace: &str, revision: &str) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
        let selector = format!("app=mycel-control-plane,mycel.io/rev={revision}");
        let pod = portforward::running_pod(&client, namespace, &selector).await.with_context(|| {
            format!(
                "control plane revision {revision:?} in namespace {namespace:?} (is it installed and ready?)"
            )
        })?;
        portforward::get(&client, namespace, &pod, 15014, "/debug/proxies").await
    })
}

/// One line per proxy: who, its identity, whether its clusters are in sync, its last rejection.
fn proxy_status_table(json: &str) -> anyhow::Result<String> {
    let proxies: Vec<serde_json::Value> = serde_json::from_str(json).context("the control plane's answer")?;
    let mut rows =
        vec![["NAME", "IDENTITY", "CLUSTERS", "LAST REJECTION", "VERSION"].map(String::from).to_vec()];
    for p in &proxies {
        let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
        let t = &p["types"]["mycel.io/Cluster"];
        let state = match (t["sent"].as_u64(), t["acked"].as_u64()) {
            (None, _) => "NOT SENT".to_string(),
            (Some(sent), Some(acked)) if acked == sent => format!("SYNCED ({})", t["resources"]),
            (Some(sent), acked) => format!(
                "STALE (sent {sent}, accepted {})",
                acked.map(|a| a.to_string()).unwrap_or("-".into())
            ),
        };
        let nack = match t.get("lastNack").filter(|n| !n.is_null()) {
            Some(n) => format!("v{} {}: {}", n["version"], s(&n["field"]), s(&n["message"])),
            None => "-".into(),
        };
        rows.push(vec![
            format!("{}.{}", s(&p["pod"]), s(&p["namespace"])),
            s(&p["identity"]),
            state,
            nack,
            s(&p["proxyVersion"]),
        ]);
    }
    Ok(top::render(&rows))
}

/// Injects every workload of a multi-document YAML stream; other documents pass unchanged.
fn inject_manifests(
    text: &str,
    settings: &mycel_operator::controlplane::inject::ProxySettings,
) -> anyhow::Result<String> {
    use mycel_operator::controlplane::inject;
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut v = serde_json::Value::deserialize(doc).with_context(|| format!("document {}", i + 1))?;
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().unwrap_or("").to_string();
        let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
        let path = match kind.as_str() {
            "Pod" => Some(""),
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
                Some("/spec/template")
            }
            "CronJob" => Some("/spec/jobTemplate/spec/template"),
            _ => None,
        };
        if let Some(path) = path
            && let Some(pod) = v.pointer_mut(path)
        {
            match inject::inject(pod, settings).map_err(|e| anyhow::anyhow!("{kind}/{name}: {e}"))? {
                Ok(injected) => *pod = injected,
                Err(skip) => eprintln!("mycelctl: {kind}/{name} left as it is ({skip:?})"),
            }
        }
        out.push(serde_yaml::to_string(&v)?);
    }
    Ok(out.join("---\n"))
}
