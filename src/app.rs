//! What the `ttspool` binary does with its parsed command line: load the
//! config, set up logging, run the command. Errors come back as a
//! [`Failure`], which main.rs turns into an exit code in one place.

use crate::cli::{Cli, Command, WebhookCommand};
use crate::config::Config;

/// Why a command could not run.
#[derive(Debug)]
pub enum Failure {
    /// The config cannot be used (exit 2; `check` reports it with 1).
    Config(String),
    /// Anything else (exit 1).
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Other(e)
    }
}

/// Runs the command; `Ok` holds its exit code.
pub fn run(cli: Cli) -> Result<u8, Failure> {
    if !matches!(cli.command, Command::Run { .. }) {
        // The commands a person runs end quietly when their reader goes
        // away (`ttspool status | head`), like other Unix tools, instead of
        // panicking on EPIPE. The daemon keeps ignoring SIGPIPE.
        // SAFETY: signal(2) with SIG_DFL, before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let cfg = Config::locate(cli.config.as_deref())
        .and_then(|p| Config::load(&p))
        .map_err(|e| Failure::Config(e.to_string()))?;
    let set_level = crate::logging::init(&cfg.log.level);
    // The webhook secret is part of the config: a bad one is a config error.
    let hooks = crate::webhook::Settings::from_config(&cfg)
        .map_err(|e| Failure::Config(format!("{}: {e}", cfg.path.display())))?;
    Ok(match cli.command {
        Command::Run {
            once,
            daemonize,
            pidfile,
        } => {
            // Unreadable API credentials are a config error, found before
            // anything starts.
            if !cfg.api.listen.is_empty() {
                crate::api::auth::Auth::load(&cfg.api)
                    .map_err(|e| Failure::Config(format!("{}: {e}", cfg.path.display())))?;
            }
            if daemonize {
                crate::detach::detach(pidfile.as_deref().expect("clap requires it"))?;
            }
            crate::daemon::run_blocking(cfg, once, set_level)?
        }
        Command::Webhook {
            command: WebhookCommand::Replay { dead, ids },
        } => crate::webhook::deliver::replay_command(&hooks, &cfg.spool.dir, dead, &ids)?,
        Command::Submit { files, wait } => crate::submit::submit(&cfg, &files, wait)?,
        Command::Requeue { all, kind, ids } => {
            crate::requeue::requeue(&cfg, all, kind.as_deref(), &ids)?
        }
        Command::Check { files, deep } => crate::check::check(&cfg, &files, deep)?,
        Command::Status { json, watch, id } => {
            crate::status::status(&cfg, json, watch, id.as_deref())?
        }
    })
}
