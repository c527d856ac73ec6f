//! ttspool: a spool daemon that turns JSONL task files into speech.
//!
//! Data flows one way — spool → scheduler → engine → records → webhook — and each stage
//! has its module:
//!
//! - [`config`]: the typed TOML config, defaults and validation.
//! - [`task`]: one task line: parsing, aliases, validation, output paths.
//! - [`spool`]: the spool on disk: scanning and watching `pending/`
//!   ([`spool::scan`], [`spool::watch`]), reading lines ([`spool::lines`]),
//!   claims and leases shared by several daemons ([`spool::claim`]), and the
//!   record logs ([`spool::records`]).
//! - [`scheduler`]: slots per GPU, the queue, retry backoff.
//! - [`engine`]: what runs the TTS: the `command` engine, the GLM-TTS batch engine.
//! - [`process`]: children in their own process group, started by `clone` with
//!   a death signal (`process/spawn.rs`), timeouts, kills.
//! - [`webhook`]: signed webhooks: the outbox written with the records,
//!   delivery with retries, the SSRF guard.
//! - [`daemon`]: the event loop that wires them, signals and shutdown.
//! - [`submit`], [`check`], [`status`]: the other commands.
//!
//! `main.rs` only parses the command line and maps errors to exit codes.

pub mod api;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod metrics;
pub mod process;
pub mod redact;
pub mod requeue;
pub mod retention;
pub mod scheduler;
pub mod spool;
pub mod status;
pub mod submit;
pub mod task;
pub mod template;
pub mod util;
pub mod webhook;
