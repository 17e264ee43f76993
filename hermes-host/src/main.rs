//! The `hermes` binary: see `hermes --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = hermes_host::cli::Cli::parse();
    match hermes_host::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hermes: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
