//! `cachalot-registry` binary: parses the command line, loads the config and runs the server.
//! All logic lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use cachalot_registry::config::{Config, Overrides};
use cachalot_registry::server::{self, Server};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cachalot-registry",
    version,
    about = "Pull-through caching OCI registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the pull API (docker.io on 0.0.0.0:5000, the admin endpoints on 0.0.0.0:5001, with
    /// ./cachalot-data by default).
    Serve {
        /// YAML config file (camelCase; unknown fields are errors).
        #[arg(long, env = "CACHALOT_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address, overriding the config.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Admin listen address (`/metrics`, `/stats`, `/admin/`), overriding the config.
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
        /// Cache directory, overriding the config.
        #[arg(long)]
        storage: Option<PathBuf>,
        /// An upstream registry as REGISTRY=URL (repeatable); adds to or overrides the config.
        #[arg(long = "upstream", value_name = "REGISTRY=URL")]
        upstreams: Vec<String>,
        /// This replica's URL as its peers reach it (`cluster.self`), overriding the config: one
        /// ConfigMap serves every replica, each pod sets its own.
        #[arg(long, env = "CACHALOT_CLUSTER_SELF", value_name = "URL")]
        cluster_self: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Serve {
        config,
        listen,
        admin_listen,
        storage,
        upstreams,
        cluster_self,
    } = cli.command;
    let overrides = Overrides {
        listen,
        admin_listen,
        storage,
        upstreams,
        cluster_self,
    };
    let config = match Config::load(config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cachalot-registry: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    server::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cachalot-registry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match Server::bind(&config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cachalot-registry: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            listen = %config.listen,
            admin_listen = %config.admin_listen,
            storage = %config.storage.path.display(),
            registries = ?config.registries.keys().collect::<Vec<_>>(),
            default = %config.default_registry,
            "cachalot-registry serving"
        );
        server.run(server::shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}
