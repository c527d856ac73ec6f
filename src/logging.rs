//! Logging to stderr, with a level that a config reload can change.

/// Sets the log level (a `tracing` filter such as `info` or `ttspool=debug`).
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send>;

/// Logs to stderr; `$TTSPOOL_LOG` wins over `log.level`, which a reload
/// can change (unless `$TTSPOOL_LOG` is set).
pub fn init(level: &str) -> SetLogLevel {
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
