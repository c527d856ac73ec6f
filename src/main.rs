//! The `ttspool` binary: parse the command line, set up logging, call into the
//! library, and turn errors into exit codes in one place.

use std::process::ExitCode;

use clap::Parser;
use tokio::sync::mpsc;

use ttspool::cli::{Cli, Command, WebhookCommand};
use ttspool::config::Config;
use ttspool::daemon::{self, Options, Sig};

/// Exit code for a config that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // The commands a person runs end quietly when their reader goes
        // away (`ttspool status | head`), like other Unix tools, instead of
        // panicking on EPIPE. The daemon keeps ignoring SIGPIPE.
        // SAFETY: signal(2) with SIG_DFL, before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let cfg = match Config::locate(cli.config.as_deref()).and_then(|p| Config::load(&p)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ttspool: {e}");
            // `check` reports problems with 1, like any other it finds.
            let code = if matches!(cli.command, Command::Check { .. }) {
                1
            } else {
                EXIT_CONFIG
            };
            return ExitCode::from(code);
        }
    };
    let set_level = init_logging(&cfg.log.level);
    // The webhook secret is part of the config: a bad one is a config error.
    let hooks = match ttspool::webhook::Settings::from_config(&cfg) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ttspool: {}: {e}", cfg.path.display());
            let code = if matches!(cli.command, Command::Check { .. }) {
                1
            } else {
                EXIT_CONFIG
            };
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Run {
            once,
            daemonize,
            pidfile,
        } => {
            if daemonize {
                if let Err(e) = detach(pidfile.as_deref().expect("clap requires it")) {
                    eprintln!("ttspool: {e}");
                    return ExitCode::FAILURE;
                }
            }
            run(cfg, once, set_level)
        }
        Command::Webhook {
            command: WebhookCommand::Replay { dead, ids },
        } => replay(cfg, hooks, dead, ids),
        Command::Submit { files, wait } => ttspool::submit::submit(&cfg, &files, wait),
        Command::Requeue { all, kind, ids } => {
            ttspool::requeue::requeue(&cfg, all, kind.as_deref(), &ids)
        }
        Command::Check { files } => ttspool::check::check(&cfg, &files),
        Command::Status { json, watch, id } => {
            ttspool::status::status(&cfg, json, watch, id.as_deref())
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ttspool: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn replay(
    cfg: Config,
    hooks: ttspool::webhook::Settings,
    dead: bool,
    ids: Vec<String>,
) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let spool = ttspool::spool::Spool::new(&cfg.spool.dir);
    let (ok, bad) = rt.block_on(ttspool::webhook::deliver::replay(
        &hooks, &spool, dead, &ids,
    ))?;
    println!(
        "replayed {} message(s): {ok} delivered, {bad} not",
        ok + bad
    );
    Ok(if bad == 0 { 0 } else { 1 })
}

/// Forks into the background before any thread or runtime exists. The pid
/// file stays locked for the daemon's life: a second daemon on it is refused
/// with the holder's pid; a stale one (no holder) is taken over.
fn detach(pidfile: &std::path::Path) -> anyhow::Result<()> {
    let pidfile = std::path::absolute(pidfile)?;
    {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&pidfile)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open pid file {}: {}",
                    pidfile.display(),
                    ttspool::util::io_msg(&e)
                )
            })?;
        if let Err(std::fs::TryLockError::WouldBlock) = f.try_lock() {
            let holder = std::fs::read_to_string(&pidfile).unwrap_or_default();
            anyhow::bail!(
                "already running as pid {} (pid file {} is locked); stop it first or use another --pidfile",
                holder.trim(),
                pidfile.display()
            );
        }
    }
    daemonize::Daemonize::new()
        .pid_file(&pidfile)
        .working_directory("/")
        .stdout(daemonize::Stdio::devnull())
        .stderr(daemonize::Stdio::keep())
        .start()
        .map_err(|e| anyhow::anyhow!("cannot daemonize (pid file {}): {e}", pidfile.display()))?;
    Ok(())
}

/// Logs to stderr; `$TTSPOOL_LOG` wins over `log.level`, which a reload
/// can change (unless `$TTSPOOL_LOG` is set).
fn init_logging(level: &str) -> ttspool::daemon::SetLogLevel {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let from_env = EnvFilter::try_from_env("TTSPOOL_LOG").ok();
    let pinned = from_env.is_some();
    let filter = from_env
        .unwrap_or_else(|| EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")));
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    Box::new(move |level: &str| {
        if pinned {
            return Ok(());
        }
        let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

fn run(cfg: Config, once: bool, set_level: ttspool::daemon::SetLogLevel) -> anyhow::Result<u8> {
    // One thread: children are spawned from the main thread, which lives as
    // long as the daemon, so PR_SET_PDEATHSIG fires only when the daemon dies.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()?;
    rt.block_on(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                let s = tokio::select! {
                    _ = term.recv() => Sig::Stop,
                    _ = int.recv() => Sig::Stop,
                    _ = hup.recv() => Sig::Reload,
                };
                if tx.send(s).is_err() {
                    break;
                }
            }
        });
        daemon::run(cfg, Options { once, set_level }, rx).await
    })?;
    Ok(0)
}
