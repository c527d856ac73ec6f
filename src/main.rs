//! The `ttspool` binary: parse the command line, run it (app.rs), and turn
//! what went wrong into an exit code — here, and nowhere else.

use std::process::ExitCode;

use clap::Parser;

use ttspool::app::{self, Failure};
use ttspool::cli::{Cli, Command};

/// Exit code for a config that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `check` reports a bad config with 1, like any other problem it finds.
    let checking = matches!(cli.command, Command::Check { .. });
    match app::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Config(e)) => {
            eprintln!("ttspool: {e}");
            ExitCode::from(if checking { 1 } else { EXIT_CONFIG })
        }
        Err(Failure::Other(e)) => {
            eprintln!("ttspool: {e:#}");
            ExitCode::FAILURE
        }
    }
}
