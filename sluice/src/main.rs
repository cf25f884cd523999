//! The `sluice` binary: parse arguments, run, print one error line on failure.
use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = sluice::cli::Cli::parse();
    match sluice::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
