//! The `sluice` binary: parse arguments, run, print one error line on failure.
use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = sluice::cli::Cli::parse();
    if !matches!(cli.command, sluice::cli::Command::Agent { .. }) {
        // Die quietly on a closed pipe (`sluice deny list | head`) like other
        // command-line tools; the agent keeps Rust's default of ignoring it.
        // SAFETY: restoring the default disposition of one signal at startup.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match sluice::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
