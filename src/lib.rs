//! ttspool: a spool daemon that turns JSONL task files into speech.
//!
//! Data flows one way — spool → scheduler → engine → records → webhook — and each stage
//! has its module:
//!
//! - [`config`]: the typed TOML config, defaults and validation; [`template`]:
//!   the placeholders of `engine.argv`, parsed once and filled in one pass.
//! - [`task`]: one task line: parsing, aliases, validation, output paths;
//!   [`redact`]: URLs as records and logs may show them.
//! - [`spool`]: the spool on disk: scanning and watching `pending/`
//!   ([`spool::scan`], [`spool::watch`]), reading lines ([`spool::lines`]),
//!   claims, leases and fencing shared by several daemons ([`spool::claim`],
//!   [`spool::lease`]), heartbeats and liveness ([`spool::heartbeat`]),
//!   whether the mount's locks reach other hosts ([`spool::locks`]), and the
//!   record logs ([`spool::records`]).
//! - [`scheduler`]: slots per GPU, the queue, retry backoff.
//! - [`engine`]: what runs the TTS: the `command` engine, the GLM-TTS batch
//!   engine, and the sweep of what killed runs leave ([`engine::sweep`]).
//! - [`process`]: children in their own process group, started by `clone` with
//!   a death signal on a spawner thread of their own (`process/spawn.rs`), an
//!   allow-listed environment, timeouts, kills.
//! - [`webhook`]: signed webhooks: the outbox written with the records,
//!   delivery with retries, name lookups on their own threads, the SSRF guard.
//! - [`api`]: the HTTP server (axum on hyper): `/metrics` today.
//! - [`daemon`]: the event loop that wires them, signals and shutdown.
//! - [`submit`], [`check`], [`status`], [`requeue`]: the other commands.
//!
//! Threads: the event loop (one current-thread runtime), the record
//! committer, the heartbeat, the spawner and reaper, the sweep, the DNS
//! lookup pool, and tokio's blocking pool for claims, takeovers and lease
//! deletions.

pub mod api;
pub mod app;
pub mod check;
pub mod cidr;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod detach;
pub mod engine;
pub mod logging;
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
pub mod vocab;
pub mod webhook;
