//! Command line of `cachalot-operator` and the `run` command: client, CRD check, HTTP endpoint,
//! leader election, controller.
//!
//! Invariants: every flag has an `env =` fallback (set from the Deployment); the operator never
//! installs CRDs; a replica reconciles only while it holds the Lease, and exits non-zero when it
//! loses it so that a fresh process re-enters the election.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::{error, info};

use crate::controller::{self, validate::parse_go_duration, ControllerConfig};
use crate::leader::{Elector, LeaderConfig, LeaseError};
use crate::metrics::Metrics;
use crate::server::{self, Health, ServeError};
use crate::telemetry::{self, LogFormat};

/// The default image of registry and agent pods: the operator's own release.
pub const DEFAULT_IMAGE: &str =
    concat!("ghcr.io/cachalot-dev/cachalot:", env!("CARGO_PKG_VERSION"));

/// `cachalot-operator`.
#[derive(Debug, Parser)]
#[command(
    name = "cachalot-operator",
    version,
    about = "cachalot Kubernetes operator and node agent"
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the RegistryMirror controller.
    Run(RunArgs),
    /// Run the node agent (DaemonSet pods).
    NodeAgent(crate::node_agent::Args),
}

/// A cluster name as the first part of spoke ids: 1 to 63 of `[A-Za-z0-9._:@-]` (no `/`, which
/// separates it from the namespace).
fn cluster_name_arg(text: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._:@-".contains(c);
    if text.is_empty() || text.len() > 63 || !text.chars().all(allowed) {
        return Err(format!(
            "{text:?}: a cluster name is 1 to 63 of letters, digits and . _ : @ -"
        ));
    }
    Ok(text.to_owned())
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_go_duration(text)
}

/// `cachalot-operator run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Default image of the registry and node agent pods (a RegistryMirror may override it).
    #[arg(long, env = "CACHALOT_IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "CACHALOT_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// This cluster's name: a spoke mirror without `spec.parent.spokeId` names itself to its hub
    /// as `<cluster>/<namespace>/<name>` (1 to 63 of `[A-Za-z0-9._:@-]`).
    #[arg(long, env = "CACHALOT_CLUSTER_NAME", value_parser = cluster_name_arg)]
    pub cluster_name: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "CACHALOT_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Elect a leader through a Lease (needed when running more than one replica).
    #[arg(long, env = "CACHALOT_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "cachalot-system")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "CACHALOT_LEASE_NAME", default_value = "cachalot-operator")]
    pub lease_name: String,
    /// Identity in the Lease and in Events (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Status refresh period of a healthy mirror (Go duration).
    #[arg(long, env = "CACHALOT_REQUEUE_AFTER", default_value = "60s", value_parser = duration_arg)]
    pub requeue_after: Duration,
    /// Status refresh period of a running mirror that is not Ready yet, e.g. while its node
    /// agents first check the registry (Go duration; capped by `--requeue-after`).
    #[arg(long, env = "CACHALOT_CONVERGING_REQUEUE_AFTER", default_value = "5s", value_parser = duration_arg)]
    pub converging_requeue_after: Duration,
    /// Timeout of each `/stats` and `/status` probe (Go duration).
    #[arg(long, env = "CACHALOT_PROBE_TIMEOUT", default_value = "2s", value_parser = duration_arg)]
    pub probe_timeout: Duration,
    /// Log format.
    #[arg(long, env = "CACHALOT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

/// Failure of `cachalot-operator run`.
#[derive(Debug, thiserror::Error)]
pub enum RunOperatorError {
    /// No kubeconfig or in-cluster configuration.
    #[error("cannot configure the Kubernetes client (in-cluster or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    /// Start-up or controller failure.
    #[error(transparent)]
    Controller(#[from] controller::RunError),
    /// The HTTP endpoint failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Leadership was lost.
    #[error(transparent)]
    Leader(#[from] LeaseError),
    /// The signal handler could not be installed.
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
}

fn default_identity() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("cachalot-operator-{}", std::process::id()))
}

/// The `User-Agent` of every API request: the version and this replica's identity, so the API
/// server's audit log tells the replicas apart (their requests may share a source address).
#[must_use]
pub fn user_agent(identity: &str) -> String {
    let printable: String = identity
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(253)
        .collect();
    format!(
        "cachalot-operator/{} ({printable})",
        env!("CARGO_PKG_VERSION")
    )
}

/// A client from the in-cluster config or `KUBECONFIG`, sending [`user_agent`].
async fn client_for(identity: &str) -> Result<kube::Client, RunOperatorError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| RunOperatorError::Client(kube::Error::InferConfig(e)))?;
    if let Ok(value) = http::HeaderValue::from_str(&user_agent(identity)) {
        config.headers.push((http::header::USER_AGENT, value));
    }
    kube::Client::try_from(config).map_err(RunOperatorError::Client)
}

/// Runs the operator until SIGTERM/Ctrl-C (or loss of leadership).
///
/// # Errors
/// [`RunOperatorError`].
pub async fn run_operator(args: RunArgs) -> Result<(), RunOperatorError> {
    telemetry::init(args.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let client = client_for(&identity).await?;
    let metrics = Arc::new(Metrics::new());
    let health = Health {
        metrics: metrics.clone(),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let (addr, serving) = server::bind(args.listen, health.clone()).await?;
    let serving = tokio::spawn(serving);
    info!(%addr, "serving /metrics, /healthz, /readyz");

    controller::ensure_crd_installed(&client).await?;
    health.ready.store(true, Ordering::SeqCst);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunOperatorError::Signal)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutting down on signal");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // Err means the sender is gone, which also means stop.
        let _ = rx.wait_for(|v| *v).await;
    };

    let probe: Arc<dyn controller::observe::Probe> = Arc::new(
        controller::observe::HttpProbe::new(args.probe_timeout)
            .map_err(controller::RunError::ProbeClient)?,
    );
    let mut config = ControllerConfig::new(args.image.clone());
    config.requeue_after = args.requeue_after;
    config.converging_requeue_after = args.converging_requeue_after;
    config.probe_timeout = args.probe_timeout;
    config.namespace = args.watch_namespace.clone();
    config.instance = Some(identity.clone());
    config.build.cluster_name = args.cluster_name.clone();

    let result = if args.leader_election {
        let elector = Elector::new(
            client.clone(),
            LeaderConfig::new(
                args.lease_namespace.clone(),
                args.lease_name.clone(),
                identity,
            ),
        );
        tokio::select! {
            () = elector.acquire() => {}
            () = stopped(stop_rx.clone()) => return Ok(()),
        }
        metrics.set_leader(true);
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<LeaseError>();
        let holder = elector.clone();
        let hold = tokio::spawn(async move {
            let _ = lost_tx.send(holder.hold().await);
        });
        let (lost_flag_tx, lost_flag_rx) = watch::channel(false);
        let stop_for_controller = stop_rx.clone();
        let shutdown = async move {
            tokio::select! {
                () = stopped(stop_for_controller) => {}
                () = stopped(lost_flag_rx) => {}
            }
        };
        let controller_task = tokio::spawn(controller::run_leading(
            client.clone(),
            config,
            probe,
            metrics.clone(),
            shutdown,
            Some(elector.guard()),
        ));
        let outcome = tokio::select! {
            lost = lost_rx => {
                let _ = lost_flag_tx.send(true);
                match lost {
                    Ok(e) => Err(RunOperatorError::Leader(e)),
                    Err(_) => Ok(()),
                }
            }
            () = stopped(stop_rx.clone()) => Ok(()),
        };
        let _ = controller_task.await;
        hold.abort();
        metrics.set_leader(false);
        if outcome.is_ok() {
            if let Err(e) = elector.release().await {
                error!(%e, "cannot release the leader lease");
            }
        }
        outcome
    } else {
        controller::run_with(client, config, probe, metrics, stopped(stop_rx)).await;
        Ok(())
    };
    serving.abort();
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_cluster_name_is_one_spoke_id_component() {
        assert_eq!(
            cluster_name_arg("eu-west-1.prod").unwrap(),
            "eu-west-1.prod"
        );
        for bad in ["", "a/b", "with space", &"x".repeat(64)] {
            let err = cluster_name_arg(bad).unwrap_err();
            assert!(err.contains("cluster name"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_user_agent_names_the_version_and_the_replica() {
        assert_eq!(
            user_agent("cachalot-7d9f-abcde"),
            format!(
                "cachalot-operator/{} (cachalot-7d9f-abcde)",
                env!("CARGO_PKG_VERSION")
            )
        );
        // Whatever the identity, the header value stays valid.
        let odd = user_agent("a b\u{e9}\n");
        assert!(http::HeaderValue::from_str(&odd).is_ok(), "{odd}");
    }
}
