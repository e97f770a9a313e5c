//! `mycel-dev`, the developer tool of the Mycel repository: the local Kubernetes cluster that the
//! demo and the end-to-end tests run on (real etcd, kube-apiserver, controller-manager,
//! scheduler, a real node and a kwok node). Not part of the product: `mycelctl` is.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mycel_e2e::local::LocalCluster;

#[derive(Parser)]
#[command(name = "mycel-dev", version, about = "Developer tools of the Mycel repository")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
            eprintln!("mycel-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn running(state: &std::path::Path) -> anyhow::Result<LocalCluster> {
    LocalCluster::running(state).with_context(|| {
        format!("no local cluster is running in {}; start one with `mycel-dev cluster up`", state.display())
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let state = LocalCluster::default_state_dir();
    let Cmd::Cluster { command } = cli.command;
    match command {
        ClusterCmd::Up => {
            let c = LocalCluster::ensure_up(&state).context("starting the local cluster")?;
            println!("local cluster is up");
            print_env(&c);
        }
        ClusterCmd::Down => {
            LocalCluster::down(&state).context("stopping the local cluster")?;
            println!("local cluster stopped and its state removed ({})", state.display());
        }
        ClusterCmd::Env => print_env(&running(&state)?),
        ClusterCmd::LoadImages => {
            running(&state)?.load_images().context("loading images")?;
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
            None => println!("not running (state directory {})", state.display()),
        },
    }
    Ok(())
}

fn print_env(c: &LocalCluster) {
    println!("export KUBECONFIG={}", c.kubeconfig().display());
    println!("export PATH={}:$PATH", c.bin_dir().display());
}
