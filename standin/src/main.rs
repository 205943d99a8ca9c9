//! `cachalot-standin` binary entry point: parses the command line and hands over to the library.

use std::process::ExitCode;

use cachalot_standin::cli::{run, Cli};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cachalot-standin: {message}");
            ExitCode::FAILURE
        }
    }
}
