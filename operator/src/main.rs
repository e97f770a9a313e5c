//! `mycel-operator`: the operator (reconciles `MeshInstallation` into a control-plane revision)
//! and, under the `control-plane` command, the control plane itself (discovery, config server,
//! certificate authority, webhooks). It owns everything that runs in the cluster's control
//! plane; it must not contain data-path code, which lives in `mycel-proxy`.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mycel-operator",
    version,
    about = "The Mycel operator and control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the operator: reconcile MeshInstallation resources into control-plane revisions.
    Run,
    /// Run one control-plane revision: config stream and CA on 15012, webhooks on 15017.
    ControlPlane,
    /// Print the CustomResourceDefinitions this operator serves, as YAML.
    Crds,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Crds => {
            for (_, yaml) in mycel_crds::render_manifests()
                .into_iter()
                .filter(|(n, _)| n.starts_with("bases/"))
            {
                println!("---\n{yaml}");
            }
            Ok(())
        }
        Cmd::Run | Cmd::ControlPlane => {
            anyhow::bail!(
                "not built yet: this command arrives with the operator and control-plane issues"
            )
        }
    }
}
