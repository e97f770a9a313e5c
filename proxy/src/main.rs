//! `mycel-proxy`: the sidecar and gateway proxy, and its `init` step that installs the pod's
//! traffic-capture rules. It owns the data path; it must not talk to the Kubernetes API (all it
//! knows arrives from the control plane's config stream or a local config file).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mycel-proxy", version, about = "The Mycel sidecar and gateway proxy")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (outbound 15001, inbound 15006, admin 15020).
    Run,
    /// Install the iptables rules that capture the pod's traffic, then exit.
    Init,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run | Cmd::Init => {
            anyhow::bail!("not built yet: this command arrives with the proxy issue")
        }
    }
}
