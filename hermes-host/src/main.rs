//! The `hermes` binary: see `hermes --help`.

use clap::Parser;

// Each request allocates and frees many short-lived buffers on several
// threads; with glibc malloc that was a sixth of the host's CPU per event.
// jemalloc took host CPU per webhook from ~38 to ~31 µs (webhook-e2e) for
// ~4 MB more resident memory.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = hermes_host::cli::Cli::parse();
    let log_format = cli.log_format;
    match hermes_host::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            hermes_host::cli::report_error(log_format, &error);
            std::process::ExitCode::FAILURE
        }
    }
}
