//! `cachalot-registry` binary: parses the command line, then runs the server (`serve`) or one
//! admin command against a running mirror (`warm`, `purge`, `stats`). All logic lives in the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use cachalot_registry::client;
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
    /// Pre-fetch images into a running mirror (all platforms, or --platform); non-zero exit when
    /// any image failed.
    Warm {
        /// The mirror's admin address.
        #[arg(long, env = "CACHALOT_SERVER", default_value = client::DEFAULT_SERVER)]
        server: String,
        /// Images as you would pull them (`nginx:stable`, `ghcr.io/org/app@sha256:…`).
        #[arg(value_name = "REF", required_unless_present = "file")]
        refs: Vec<String>,
        /// A file of references, one a line (`#` comments).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Only this platform of a multi-platform image: os/arch[/variant].
        #[arg(long)]
        platform: Option<String>,
    },
    /// Drop a tag, or a manifest (by digest) and the blobs no other cached manifest uses.
    Purge {
        /// The mirror's admin address.
        #[arg(long, env = "CACHALOT_SERVER", default_value = client::DEFAULT_SERVER)]
        server: String,
        /// The tag or digest reference to drop.
        #[arg(value_name = "REF")]
        reference: String,
    },
    /// Print a summary of a running mirror.
    Stats {
        /// The mirror's admin address.
        #[arg(long, env = "CACHALOT_SERVER", default_value = client::DEFAULT_SERVER)]
        server: String,
    },
}

/// Runs an admin command on a small runtime.
fn admin(command: impl std::future::Future<Output = u8>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => ExitCode::from(runtime.block_on(command)),
        Err(e) => {
            eprintln!("cachalot-registry: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, listen, admin_listen, storage, upstreams, cluster_self) = match cli.command {
        Command::Serve {
            config,
            listen,
            admin_listen,
            storage,
            upstreams,
            cluster_self,
        } => (
            config,
            listen,
            admin_listen,
            storage,
            upstreams,
            cluster_self,
        ),
        Command::Warm {
            server,
            refs,
            file,
            platform,
        } => return admin(client::run_warm(&server, refs, file.as_deref(), platform)),
        Command::Purge { server, reference } => {
            return admin(client::run_purge(&server, &reference))
        }
        Command::Stats { server } => return admin(client::run_stats(&server)),
    };
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
