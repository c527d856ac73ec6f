//! The command line (SPEC §7).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ttspool",
    version,
    about = "Turns JSONL task files dropped into a spool folder into speech",
    propagate_version = true
)]
pub struct Cli {
    /// Config file (default: $TTSPOOL_CONFIG, else ./ttspool.toml).
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground.
    Run {
        /// Drain what is pending now, then exit.
        #[arg(long)]
        once: bool,
        /// Detach into the background (without systemd); logs go to stderr,
        /// so redirect it: `ttspool run --daemonize --pidfile P 2>>LOG`.
        #[arg(long, requires = "pidfile")]
        daemonize: bool,
        /// With --daemonize: the pid file, locked while the daemon runs.
        #[arg(long, value_name = "FILE")]
        pidfile: Option<PathBuf>,
    },
    /// Validate task files, then publish them atomically into pending/.
    Submit {
        /// Task files, or - for standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Wait until every submitted line has its record; exit 1 if any failed.
        #[arg(long)]
        wait: bool,
    },
    /// Put failed tasks back into pending/ as a new file (and log that in requeued.jsonl).
    Requeue {
        /// Every failed task not requeued yet.
        #[arg(long, conflicts_with_all = ["kind", "ids"])]
        all: bool,
        /// Failed tasks of this error kind (e.g. timeout, engine_failed).
        #[arg(long, value_name = "KIND", conflicts_with = "ids")]
        kind: Option<String>,
        /// Task ids.
        #[arg(value_name = "ID", required_unless_present_any = ["all", "kind"])]
        ids: Vec<String>,
    },
    /// Validate the config (and task files, if given).
    Check {
        /// Also start the engine once: a worker must load and say it is ready.
        #[arg(long)]
        deep: bool,
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Webhook maintenance.
    Webhook {
        #[command(subcommand)]
        command: WebhookCommand,
    },
    /// Show counts, or the records of one task.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every 2 seconds until interrupted.
        #[arg(long)]
        watch: bool,
        /// A task id.
        id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Send dead (or the given) messages again, once each, with their original webhook-id.
    Replay {
        /// Every message that ended `dead`, `gone` or `blocked`.
        #[arg(long)]
        dead: bool,
        /// Message ids (msg_...).
        #[arg(value_name = "MSG_ID", required_unless_present = "dead")]
        ids: Vec<String>,
    },
}
