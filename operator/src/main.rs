//! `cachalot-operator` binary entry point: parses the command line and hands over to the library.

use std::process::ExitCode;

use cachalot_operator::cli::{run_operator, Cli, Command};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_operator(args).await.map_err(|e| e.to_string()),
        Command::NodeAgent(args) => cachalot_operator::node_agent::run(args)
            .await
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cachalot-operator: {message}");
            ExitCode::FAILURE
        }
    }
}
