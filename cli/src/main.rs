//! `mycelctl`, the command line of Mycel: user-facing commands (inspect, inject). It links
//! neither the operator's controllers nor the local-cluster harness (the developer binary
//! `mycel-dev` of `mycel-e2e` drives that); what injection needs is the `mycel-inject` crate.

#![forbid(unsafe_code)]

use std::process::ExitCode;

mod portforward;
mod quota;
mod top;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mycelctl", version, about = "Inspect the Mycel service mesh and inject its sidecar")]
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
    /// The config a pod's sidecar holds: `routes` prints its route tables, rule by rule (read
    /// from its `/config_dump`, through a port-forward).
    ProxyConfig {
        /// `routes`
        what: String,
        pod: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Print the proxy's JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    /// What is left of a RateLimitPolicy's global limits and quotas, as the rate-limit service
    /// counts them (asked through a port-forward to one of its pods; counts nothing).
    Quota {
        /// The RateLimitPolicy.
        policy: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// The key's value for keyed limits: a principal (cluster.local/ns/shop/sa/web), an
        /// address, a header value, a path, a claim.
        #[arg(long)]
        key: Option<String>,
        /// For a policy of the root namespace (counted apart for each namespace): whose.
        #[arg(long)]
        caller_namespace: Option<String>,
        /// Namespace of the installation (its root namespace, where the service runs).
        #[arg(long, default_value = "mycel-system")]
        mesh_namespace: String,
        #[arg(long, default_value = "default")]
        revision: String,
    },
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
            let mut settings: mycel_inject::ProxySettings = match &mesh_config {
                Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)
                    .with_context(|| format!("{} is not a mesh config", p.display()))?,
                None => Default::default(),
            };
            settings.revision = revision;
            settings.namespace = namespace;
            print!("{}", inject_manifests(&text, &settings)?);
        }
        Cmd::ProxyConfig { what, pod, namespace, json } => {
            anyhow::ensure!(what == "routes", "proxy-config {what:?}: the only view is `routes`");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let dump = rt.block_on(async {
                let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
                portforward::get(&client, &namespace, &pod, 15020, "/config_dump").await
            })?;
            let config: serde_json::Value =
                serde_json::from_str(&dump).context("the proxy's /config_dump is not JSON")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&config["routes"])?);
            } else {
                print!("{}", routes_table(&config));
            }
        }
        Cmd::Quota { policy, namespace, key, caller_namespace, mesh_namespace, revision } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let rows = rt.block_on(async {
                let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
                let api: kube::Api<mycel_crds::rate_limit_policy::RateLimitPolicy> =
                    kube::Api::namespaced(client.clone(), &namespace);
                let p = api.get(&policy).await.with_context(|| format!("RateLimitPolicy {namespace}/{policy}"))?;
                let ask = quota::Ask {
                    namespace: &namespace,
                    policy: &policy,
                    key: key.as_deref(),
                    caller_namespace: caller_namespace.as_deref(),
                    root_namespace: &mesh_namespace,
                };
                let reqs = quota::requests(&p, &ask)?;
                anyhow::ensure!(
                    !reqs.is_empty(),
                    "{namespace}/{policy} has no global limit (scope: Global): local limits are counted in each sidecar, see its metrics"
                );
                let selector = format!("app=mycel-ratelimit,mycel.io/rev={revision}");
                let pod = portforward::running_pod(&client, &mesh_namespace, &selector).await.with_context(|| {
                    format!("the rate-limit service of revision {revision:?} in {mesh_namespace:?} (does the MeshInstallation set spec.rateLimit?)")
                })?;
                quota::ask(&client, &mesh_namespace, &pod, reqs).await
            })?;
            print!("{}", quota::table(&rows));
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
    }
    Ok(())
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

/// One line per rule of every route table: the cluster, where it came from, the rule, what it
/// matches and where it sends.
fn routes_table(config: &serde_json::Value) -> String {
    let mut rows = vec![["CLUSTER", "SOURCE", "RULE", "MATCH", "BACKENDS"].map(String::from).to_vec()];
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let kind = |m: &serde_json::Value| match m {
        serde_json::Value::String(k) => k.clone(),
        serde_json::Value::Object(o) => {
            o.iter().map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")
        }
        _ => String::new(),
    };
    for t in config["routes"].as_array().into_iter().flatten() {
        for r in t["http"].as_array().into_iter().flatten() {
            let matches: Vec<String> = r["match"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let mut parts = Vec::new();
                    if !m["path"].is_null() {
                        parts.push(format!("path {}", kind(&m["path"])));
                    }
                    if let Some(method) = m["method"].as_str() {
                        parts.push(method.to_string());
                    }
                    for (what, list) in [("header", &m["headers"]), ("query", &m["queryParams"])] {
                        for h in list.as_array().into_iter().flatten() {
                            parts.push(format!("{what} {} {}", s(&h["name"]), kind(&h["match"])));
                        }
                    }
                    parts.join(" & ")
                })
                .collect();
            let backends: Vec<String> = r["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| format!("{} ({})", s(&b["cluster"]), b["weight"]))
                .collect();
            rows.push(vec![
                s(&t["cluster"]),
                s(&t["source"]),
                s(&r["name"]),
                if matches.is_empty() { "*".into() } else { matches.join(" | ") },
                backends.join(", "),
            ]);
        }
    }
    top::render(&rows)
}

/// Injects every workload of a multi-document YAML stream; other documents pass unchanged.
fn inject_manifests(text: &str, settings: &mycel_inject::ProxySettings) -> anyhow::Result<String> {
    use mycel_inject as inject;
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
