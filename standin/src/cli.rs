//! Command line of `cachalot-standin` and the dispatch of its three commands.
//!
//! Invariants: logging and the SIGTERM/SIGINT token are set up once, before any command runs;
//! every command returns (exit 0) after a signal once its bounded clean-up is done.

use clap::{Parser, Subcommand};

use crate::forward::{self, ForwardArgs};
use crate::kubelet::{self, KubeletArgs};
use crate::proxy::{self, ProxyArgs};
use crate::{shutdown, telemetry};

/// `cachalot-standin`.
#[derive(Debug, Parser)]
#[command(
    name = "cachalot-standin",
    version,
    about = "Stand-in kubelet and kube-proxy for fake nodes of a test cluster (pods run as host processes)"
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stand in for one node's kubelet (and its kube-proxy NodePorts); run it in the node's
    /// network namespace and the host's mount namespace.
    Kubelet(Box<KubeletArgs>),
    /// Stand in for kube-proxy's ClusterIPs; run it in the gateway namespace (`<P>-net`).
    Proxy(ProxyArgs),
    /// Pipe connections from a tcp or unix listener to a tcp or unix target.
    Forward(ForwardArgs),
}

/// Runs the command; the error is the message to print.
pub async fn run(cli: Cli) -> Result<(), String> {
    telemetry::init();
    let cancel = shutdown::on_signal().map_err(|e| e.to_string())?;
    match cli.command {
        Command::Kubelet(args) => kubelet::run(*args, cancel).await.map_err(|e| e.to_string()),
        Command::Proxy(args) => proxy::run(args, cancel).await.map_err(|e| e.to_string()),
        Command::Forward(args) => forward::run(args, cancel).await.map_err(|e| e.to_string()),
    }
}
