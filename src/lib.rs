//! ttspool: a spool daemon that turns JSONL task files into speech.
//!
//! Data flows one way — spool → task → scheduler → engine → records →
//! webhook — and a module imports only modules of lower layers (the order
//! is in `tests/house.rs`; ARCHITECTURE.md explains it, with the threads
//! and the on-disk layout):
//!
//! - [`vocab`]: what every stage shares: task, job, slot, record, error
//!   kind, source, [`vocab::FileId`], the webhook event names.
//! - [`util`], [`logging`], [`cli`], [`redact`], [`cidr`], [`template`],
//!   [`detach`]: helpers that know nothing of the pipeline (durable writes,
//!   locking our own files, the log, the command line, URLs as records show
//!   them, address ranges, `engine.argv` placeholders, `--daemonize`).
//! - [`config`]: the typed TOML config, defaults and validation.
//! - [`metrics`]: the Prometheus counters every stage updates.
//! - [`spool`]: the spool on disk: scanning and watching `pending/`
//!   ([`spool::scan`], [`spool::watch`]), which file is which
//!   ([`spool::ident`]), reading lines ([`spool::lines`]), claims and leases
//!   shared by several daemons ([`spool::claim`], [`spool::sidecar`],
//!   [`spool::lease`]), consumed files and late appends
//!   ([`spool::consume`]), heartbeats ([`spool::heartbeat`]), whether locks
//!   reach other hosts ([`spool::locks`]), and the record logs
//!   ([`spool::records`]).
//! - [`task`]: one task line: parsing, aliases, validation, output paths.
//! - [`retention`]: deleting old consumed files.
//! - [`scheduler`]: slots per GPU, the queue, retry backoff;
//!   [`process`]: children in their own process group, started on a
//!   spawner thread, an allow-listed environment, timeouts, kills.
//! - [`engine`]: what runs the TTS: the `command` engine, the GLM-TTS batch
//!   engine, the `http` engine, the resident `worker` engine
//!   ([`engine::worker`]), finishing outputs on a thread of their own
//!   ([`engine::finish`]), and the sweep of what killed runs leave
//!   ([`engine::sweep`]).
//! - [`webhook`]: signed webhooks: the outbox written with the records,
//!   delivery with retries, name lookups on their own threads, the SSRF guard.
//! - [`report`]: the spool's figures (`status --json`, `GET /v1/status`).
//! - [`api`]: the HTTP server (axum on hyper): the task API and `/metrics`.
//! - [`daemon`]: the event loop that wires the stages, signals and shutdown;
//!   [`submit`], [`check`], [`status`], [`requeue`]: the other commands.
//! - [`app`]: what the binary runs; `main.rs` only maps its result to an
//!   exit code.

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
pub mod report;
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
