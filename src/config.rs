//! The typed configuration (`ttspool.toml`).
//!
//! Every key of SPEC §6 lives here with its default as a named function, so the
//! defaults are documented in one place and a test can read them. Unknown keys
//! are refused (`deny_unknown_fields`) because a typo in a production config
//! must not silently fall back to a default. Relative paths are resolved
//! against the folder of the config file, not the daemon's working directory,
//! so a systemd unit and an operator's shell see the same spool.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::template::{Template, Var};

/// Where the config came from and why it could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no config file: pass -c FILE, set $TTSPOOL_CONFIG, or create ./ttspool.toml")]
    NotFound,
    #[error("cannot read config {}: {}", .path.display(), crate::util::io_msg(.source))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// A duration written as a human string (`"500ms"`, `"2s"`, `"10m"`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. \"500ms\", \"2s\", \"10m\""
            ))
        })
    }
}

/// How the spool folder is watched for new files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// inotify on local disks, polling on NFS/SMB/FUSE (decided with statfs).
    Auto,
    /// Always use filesystem notifications (plus the periodic rescan).
    Notify,
    /// Only the periodic rescan.
    Poll,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub gpu: GpuConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub webhook: WebhookConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The file this config was read from (set after parsing).
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// The spool folder: `pending/`, the record logs and `.ttspool/` live here.
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    /// `auto` | `notify` | `poll`.
    #[serde(default = "default_watch")]
    pub watch: WatchMode,
    /// Full rescan period; runs with notify too, because events get lost.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Dur,
    /// How long a final line without `\n` must stay unchanged to be taken.
    #[serde(default = "default_settle")]
    pub settle: Dur,
    /// How long a fully recorded file must stay unchanged before it is
    /// moved to `pending/.consumed/` (where it is still followed for growth).
    #[serde(default = "default_consume_after")]
    pub consume_after: Dur,
    /// This daemon's unique name among those sharing the spool; default: host name.
    #[serde(default)]
    pub instance: String,
    /// After this long without a heartbeat a daemon's claims are taken over.
    #[serde(default = "default_lease")]
    pub lease: Dur,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Where `<output_name>.wav` files are written.
    #[serde(default = "default_output_dir")]
    pub dir: PathBuf,
}

/// Which engine runs the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// One child per task, `engine.argv` with placeholders, no shell.
    Command,
    /// zai-org/GLM-TTS `glmtts_inference.py`, several tasks per child.
    Glmtts,
    /// A TTS server that is already running (SPEC §12).
    Http,
    /// One long-lived child per slot that loads the model once (SPEC §13).
    Worker,
}

/// What the `http` engine sends (SPEC §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HttpPreset {
    /// Fish Speech's `POST /v1/tts`.
    FishSpeech,
    /// `POST /v1/audio/speech`.
    Openai,
    /// `engine.body` alone.
    Custom,
}

/// What the `http` engine's server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpResponse {
    /// A WAV file.
    Wav,
    /// Raw s16le mono samples at `engine.sample_rate`, wrapped as WAV.
    Pcm,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    #[serde(default = "default_engine_kind")]
    pub kind: EngineKind,
    /// The command and its arguments; placeholders `{input_text}` `{output}`
    /// `{output_name}` `{id}` `{prompt_audio}` `{prompt_text}`.
    #[serde(default = "default_argv")]
    pub argv: Vec<String>,
    /// `prompt_audio` is resolved against this folder and must stay inside it.
    #[serde(default = "default_voices_dir")]
    pub voices_dir: PathBuf,
    /// Per task; then the child's process group gets SIGTERM.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Between SIGTERM and SIGKILL.
    #[serde(default = "default_kill_grace")]
    pub kill_grace: Dur,
    /// glmtts: the GLM-TTS checkout (holds `glmtts_inference.py`, `ckpt/`,
    /// `examples/`); the child's working directory.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// glmtts: the Python interpreter (of the checkout's virtualenv).
    #[serde(default = "default_python")]
    pub python: String,
    /// glmtts: `--exp_name`; outputs go to `outputs/pretrain<exp_name>/`.
    #[serde(default = "default_exp_name")]
    pub exp_name: String,
    /// glmtts: `--sample_rate`, 24000 or 32000 (default 24000); http with
    /// `response = "pcm"`: the samples' rate (default 44100).
    #[serde(default)]
    pub sample_rate: Option<u32>,
    /// glmtts: pass `--use_phoneme`.
    #[serde(default)]
    pub use_phoneme: bool,
    /// glmtts: tasks per child at most.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// glmtts: how long a batch may wait for more tasks before it starts.
    #[serde(default = "default_batch_wait")]
    pub batch_wait: Dur,
    /// glmtts: model load allowance, added to `timeout` × tasks for a batch's
    /// deadline; worker: until a started worker says it is ready.
    #[serde(default = "default_load_timeout")]
    pub load_timeout: Dur,
    /// worker: tasks per worker, then it is replaced (leaks, fragmentation).
    #[serde(default = "default_max_tasks")]
    pub max_tasks: u64,
    /// worker: stop a worker idle this long (frees GPU memory); 0: never.
    #[serde(default = "default_idle_stop")]
    pub idle_stop: Dur,
    /// Variables of the daemon's environment that engine children get
    /// (`NAME`, or a prefix ending in `*`); ttspool's own secrets never pass.
    #[serde(default = "default_env_pass")]
    pub env_pass: Vec<String>,
    /// Fixed variables set for every engine child.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// http: the servers; each is a group of `max_in_flight` slots.
    #[serde(default)]
    pub urls: Vec<String>,
    /// http: `fish-speech` | `openai` | `custom`.
    #[serde(default = "default_preset")]
    pub preset: HttpPreset,
    /// http: requests at once per server.
    #[serde(default = "default_engine_in_flight")]
    pub max_in_flight: usize,
    /// http: a JSON template (placeholders in its strings): the whole body
    /// for `custom`, keys added to a preset's body otherwise.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// http: fixed headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// http: a bearer token (else `$TTSPOOL_ENGINE_TOKEN`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// http: `wav` | `pcm`.
    #[serde(default = "default_http_response")]
    pub response: HttpResponse,
}

impl EngineConfig {
    /// glmtts: `--sample_rate`.
    pub fn glmtts_sample_rate(&self) -> u32 {
        self.sample_rate.unwrap_or(24000)
    }
    /// http: the rate of raw PCM answers.
    pub fn pcm_sample_rate(&self) -> u32 {
        self.sample_rate.unwrap_or(44100)
    }
}

fn default_preset() -> HttpPreset {
    HttpPreset::FishSpeech
}
fn default_engine_in_flight() -> usize {
    1
}
fn default_http_response() -> HttpResponse {
    HttpResponse::Wav
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// Device ids given to children as `CUDA_VISIBLE_DEVICES`; empty: no GPUs.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Children at once per device.
    #[serde(default = "default_slots_per_device")]
    pub slots_per_device: usize,
    /// Children at once when `devices` is empty.
    #[serde(default = "default_max_parallel")]
    pub max_parallel: usize,
    /// Before a batch starts on a device, wait until `nvidia-smi` reports at
    /// least this much free memory there (unset: do not ask).
    #[serde(default)]
    pub min_free_mib: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Runs of one task in total, the first included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the second run; doubles for each further one.
    #[serde(default = "default_backoff")]
    pub backoff: Dur,
    /// The breaker: a slot whose engine fails for this many different
    /// tasks in a row is paused instead of failing more (0: never).
    #[serde(default = "default_break_after")]
    pub break_after: u32,
}

fn default_break_after() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Characters of `input_text`, at most.
    #[serde(default = "default_max_text_chars")]
    pub max_text_chars: usize,
    /// Bytes of one task line, at most; longer lines are failed unread.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long running children may finish after SIGTERM before they are killed.
    #[serde(default = "default_grace")]
    pub grace: Dur,
}

/// Body shape of webhooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// `{"type", "timestamp", "data": {...}}` (Standard Webhooks style).
    Standard,
    /// `{"code", "msg", "data": {"callbackType", "task_id", "data": [...]}}`.
    Callback,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Default target (a task's `callback_url` overrides it); `file.completed` goes here.
    #[serde(default)]
    pub url: Option<String>,
    /// Which events are sent.
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    #[serde(default = "default_format")]
    pub format: WebhookFormat,
    /// The signing secret (`whsec_...`); `secret_file` and `$TTSPOOL_WEBHOOK_SECRET` come first.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Older secrets, space-separated, also signed with during a rotation.
    #[serde(default)]
    pub previous_secrets: String,
    /// Per attempt.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: Dur,
    /// Waits between attempts (±20 % jitter); after the last, `dead`.
    #[serde(default = "default_schedule")]
    pub schedule: Vec<Dur>,
    /// Fixed headers added to every request (e.g. an API key).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Private or local destinations allowed anyway (e.g. `["10.0.0.0/8"]`).
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    /// `audio_url` in callback bodies = this + output name + ".wav".
    #[serde(default)]
    pub audio_base_url: Option<String>,
    /// Deliveries at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

/// Secrets (the signing secret, header values, URL queries) never reach a
/// log, even through `{:?}`.
impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url.as_deref().map(crate::redact::url))
            .field("events", &self.events)
            .field("format", &self.format)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("timeout", &self.timeout)
            .field("schedule", &self.schedule)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("allow_cidrs", &self.allow_cidrs)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus text on `http://<listen>/metrics` (off when unset).
    #[serde(default)]
    pub listen: Option<String>,
    /// Also write the metrics to this file for node_exporter's textfile collector.
    #[serde(default)]
    pub textfile: Option<PathBuf>,
}

/// The HTTP API (SPEC §11): tasks in over HTTP, status out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Where to listen, e.g. `"0.0.0.0:8080"`; empty: no API.
    #[serde(default)]
    pub listen: String,
    /// Bearer tokens, one `name:token` per line (several: rotation).
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// A `whsec_...` secret: requests signed with it (Standard Webhooks)
    /// are accepted. `$TTSPOOL_API_SECRET` also works.
    #[serde(default)]
    pub verify_secret_file: Option<PathBuf>,
    #[serde(default = "default_api_max_body")]
    pub max_body: Size,
    /// > 0: answer 429 while more task lines than this wait unclaimed.
    #[serde(default)]
    pub max_pending_lines: u64,
    #[serde(default = "default_idempotency_ttl")]
    pub idempotency_ttl: Dur,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            listen: String::new(),
            tokens_file: None,
            verify_secret_file: None,
            max_body: default_api_max_body(),
            max_pending_lines: 0,
            idempotency_ttl: default_idempotency_ttl(),
        }
    }
}

fn default_api_max_body() -> Size {
    Size(1 << 20)
}

fn default_idempotency_ttl() -> Dur {
    Dur(Duration::from_secs(7 * 24 * 3600))
}

/// A byte size written as `"256MiB"`, `"1GB"`, `"4096"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_size(&s).map(Size).ok_or_else(|| {
            de::Error::custom(format!(
                "invalid size {s:?}; write e.g. \"256MiB\", \"1GB\""
            ))
        })
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delete files in `pending/.consumed/` older than this.
    #[serde(default = "default_consumed")]
    pub consumed: Option<Dur>,
    /// Rotate done/failed/webhooks logs once they are larger than this.
    #[serde(default = "default_rotate_size")]
    pub rotate_size: Option<Size>,
    /// Rotate them at the first write of each day (UTC) too.
    #[serde(default)]
    pub rotate_daily: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Log filter (`info`, `debug`, `ttspool=debug,warn`); `$TTSPOOL_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_consumed() -> Option<Dur> {
    Some(Dur(Duration::from_secs(30 * 86400)))
}
fn default_rotate_size() -> Option<Size> {
    Some(Size(256 << 20))
}
fn default_log_level() -> String {
    "info".into()
}

fn default_events() -> Vec<String> {
    crate::vocab::EVENTS.iter().map(|e| e.to_string()).collect()
}
fn default_format() -> WebhookFormat {
    WebhookFormat::Standard
}
fn default_webhook_timeout() -> Dur {
    Dur(Duration::from_secs(15))
}
fn default_schedule() -> Vec<Dur> {
    ["5s", "5m", "30m", "2h", "5h", "10h", "10h"]
        .iter()
        .map(|s| Dur(humantime::parse_duration(s).expect("valid default")))
        .collect()
}
fn default_max_in_flight() -> usize {
    16
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from("spool")
}
fn default_watch() -> WatchMode {
    WatchMode::Auto
}
fn default_poll_interval() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_settle() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_consume_after() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_lease() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_output_dir() -> PathBuf {
    PathBuf::from("spool/outputs")
}
fn default_engine_kind() -> EngineKind {
    EngineKind::Command
}
fn default_argv() -> Vec<String> {
    [
        "espeak-ng",
        "-v",
        "cmn",
        "-w",
        "{output}",
        "--",
        "{input_text}",
    ]
    .map(String::from)
    .to_vec()
}
/// What an engine needs from the daemon's environment: finding programs,
/// locale, temp space, the GPU stack, Python and Hugging Face caches.
pub fn default_env_pass() -> Vec<String> {
    [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "LC_*",
        "TZ",
        "TMPDIR",
        "TERM",
        "LD_LIBRARY_PATH",
        "CUDA_*",
        "NVIDIA_*",
        "NCCL_*",
        "PYTORCH_*",
        "TORCH_*",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "PYTHON*",
        "VIRTUAL_ENV",
        "CONDA_*",
        "HF_*",
        "HUGGINGFACE_*",
        "TRANSFORMERS_*",
        "XDG_CACHE_HOME",
        "XDG_RUNTIME_DIR",
        "ESPEAK_DATA_PATH",
        // model downloads through a company's proxy and CA
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn default_voices_dir() -> PathBuf {
    PathBuf::from("voices")
}
fn default_timeout() -> Dur {
    Dur(Duration::from_secs(600))
}
fn default_kill_grace() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_python() -> String {
    "python3".into()
}
fn default_exp_name() -> String {
    "_ttspool".into()
}
fn default_batch_max() -> usize {
    16
}
fn default_batch_wait() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_max_tasks() -> u64 {
    1000
}
fn default_idle_stop() -> Dur {
    Dur(Duration::ZERO)
}
fn default_load_timeout() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_slots_per_device() -> usize {
    1
}
fn default_max_parallel() -> usize {
    2
}
fn default_max_attempts() -> u32 {
    3
}
fn default_backoff() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_max_text_chars() -> usize {
    5000
}
fn default_max_line_bytes() -> usize {
    1 << 20
}
fn default_grace() -> Dur {
    Dur(Duration::from_secs(30))
}

macro_rules! default_via_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                // The empty table yields every field's named default function.
                toml::from_str("").expect("defaults deserialize")
            }
        }
    )*};
}
default_via_serde!(
    SpoolConfig,
    OutputConfig,
    EngineConfig,
    GpuConfig,
    RetryConfig,
    LimitsConfig,
    ShutdownConfig,
    WebhookConfig,
    RetentionConfig,
    LogConfig
);

impl Config {
    /// Finds the config: `-c FILE`, else `$TTSPOOL_CONFIG`, else `./ttspool.toml`.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os("TTSPOOL_CONFIG").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        let local = PathBuf::from("ttspool.toml");
        if local.exists() {
            Ok(local)
        } else {
            Err(ConfigError::NotFound)
        }
    }

    /// Reads, parses, resolves and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses `text` as if read from `path` (relative paths resolve against its folder).
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: one_line_toml_error(&e, text),
        })?;
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.path = abs;
        for p in [
            &mut cfg.spool.dir,
            &mut cfg.output.dir,
            &mut cfg.engine.voices_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(f) = cfg.metrics.textfile.as_mut().filter(|r| r.is_relative()) {
            *f = base.join(&*f);
        }
        for f in [
            cfg.webhook.secret_file.as_mut(),
            cfg.engine.token_file.as_mut(),
            cfg.api.tokens_file.as_mut(),
            cfg.api.verify_secret_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        .filter(|r| r.is_relative())
        {
            *f = base.join(&*f);
        }
        if let Some(root) = cfg.engine.root.as_mut().filter(|r| r.is_relative()) {
            *root = base.join(&*root);
        }
        if cfg.engine.python.contains('/') && Path::new(&cfg.engine.python).is_relative() {
            cfg.engine.python = base.join(&cfg.engine.python).to_string_lossy().into_owned();
        }
        if cfg.spool.instance.is_empty() {
            cfg.spool.instance = default_instance();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every string in `engine.body`, parsed as a template (an unknown
    /// placeholder is an error naming the string).
    pub fn body_templates(&self) -> Result<Vec<Template>, ConfigError> {
        fn strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match v {
                serde_json::Value::String(s) => out.push(s),
                serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
                serde_json::Value::Object(m) => m.values().for_each(|x| strings(x, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        if let Some(b) = &self.engine.body {
            strings(b, &mut all);
        }
        all.into_iter()
            .map(|s| {
                Template::parse(s).map_err(|e| ConfigError::Invalid {
                    path: self.path.clone(),
                    key: "engine.body",
                    message: format!("{s:?}: {e}"),
                })
            })
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: &str| ConfigError::Invalid {
            path: self.path.clone(),
            key,
            message: message.to_string(),
        };
        match self.engine.kind {
            EngineKind::Command => {
                if self.engine.argv.is_empty() {
                    return Err(bad(
                        "engine.argv",
                        "must name a command, e.g. [\"espeak-ng\", \"-w\", \"{output}\", \"--\", \"{input_text}\"]",
                    ));
                }
                let argv = self.argv_templates()?;
                if !argv.iter().any(|t| t.uses(Var::Output)) {
                    return Err(bad(
                        "engine.argv",
                        "must contain {output}: the engine writes the WAV there",
                    ));
                }
            }
            EngineKind::Glmtts => {
                if self.engine.root.is_none() {
                    return Err(bad(
                        "engine.root",
                        "is required with kind = \"glmtts\": the GLM-TTS checkout that holds glmtts_inference.py",
                    ));
                }
                if !matches!(self.engine.glmtts_sample_rate(), 24000 | 32000) {
                    return Err(bad("engine.sample_rate", "must be 24000 or 32000"));
                }
                if self.engine.batch_max == 0 {
                    return Err(bad("engine.batch_max", "must be at least 1"));
                }
                let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
                if self.engine.exp_name.is_empty() || !self.engine.exp_name.chars().all(ok) {
                    return Err(bad(
                        "engine.exp_name",
                        "must be letters, digits, _ - . (it names a folder)",
                    ));
                }
            }
            EngineKind::Worker => {
                if self.engine.argv.is_empty() || self.engine.argv == default_argv() {
                    return Err(bad(
                        "engine.argv",
                        "is required with kind = \"worker\": the worker program, e.g. [\"python3\", \"engines/espeak_worker.py\"]",
                    ));
                }
                let argv = self.argv_templates()?;
                if let Some(i) = argv.iter().position(|t| t.has_vars()) {
                    return Err(bad(
                        "engine.argv",
                        &format!(
                            "element {i} ({:?}) has a placeholder; a worker gets its tasks on stdin, not in argv",
                            self.engine.argv[i]
                        ),
                    ));
                }
                if self.engine.max_tasks == 0 {
                    return Err(bad("engine.max_tasks", "must be at least 1"));
                }
            }
            EngineKind::Http => {
                if self.engine.urls.is_empty() {
                    return Err(bad(
                        "engine.urls",
                        "is required with kind = \"http\": the server(s), e.g. [\"http://10.0.0.5:8080/v1/tts\"]",
                    ));
                }
                for u in &self.engine.urls {
                    if !(u.starts_with("http://") || u.starts_with("https://"))
                        || reqwest::Url::parse(u).is_err()
                    {
                        return Err(bad(
                            "engine.urls",
                            &format!("{u:?} is not an http:// or https:// URL"),
                        ));
                    }
                }
                if self.engine.max_in_flight == 0 {
                    return Err(bad("engine.max_in_flight", "must be at least 1"));
                }
                match (&self.engine.body, self.engine.preset) {
                    (None, HttpPreset::Custom) => {
                        return Err(bad(
                            "engine.body",
                            "is required with preset = \"custom\": the JSON to send, placeholders like {input_text} in its strings",
                        ))
                    }
                    (Some(b), _) if !b.is_object() => {
                        return Err(bad("engine.body", "must be a table (a JSON object)"))
                    }
                    _ => {}
                }
                self.body_templates()?;
            }
        }
        for (k, v) in &self.engine.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(bad(
                    "engine.env",
                    &format!("{k:?} is not a usable variable (no '=', no NUL)"),
                ));
            }
        }
        if let Some(p) = self
            .engine
            .env_pass
            .iter()
            .find(|p| p.is_empty() || p.contains('='))
        {
            return Err(bad(
                "engine.env_pass",
                &format!("{p:?} is not a variable name or a NAME* prefix"),
            ));
        }
        let w = &self.webhook;
        for e in &w.events {
            if !crate::vocab::EVENTS.contains(&e.as_str()) {
                return Err(bad(
                    "webhook.events",
                    &format!(
                        "unknown event {e:?}; known: {}",
                        crate::vocab::EVENTS.join(", ")
                    ),
                ));
            }
        }
        if let Some(u) = &w.url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(bad("webhook.url", "must be an http:// or https:// URL"));
            }
        }
        for c in &w.allow_cidrs {
            if let Err(e) = crate::cidr::Cidr::parse(c) {
                return Err(bad("webhook.allow_cidrs", &e));
            }
        }
        if w.schedule.is_empty() {
            return Err(bad(
                "webhook.schedule",
                "needs at least one wait, e.g. [\"5s\"]",
            ));
        }
        if let Some(l) = &self.metrics.listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad(
                    "metrics.listen",
                    "must be an address like \"127.0.0.1:9464\"",
                ));
            }
        }
        if let Some(p) = &self.engine.token_file {
            // A token file we cannot use would send no Authorization at
            // all: said here, not found out from a server's 401s.
            match std::fs::read_to_string(p) {
                Ok(t) if t.trim().is_empty() => {
                    return Err(bad(
                        "engine.token_file",
                        &format!("{} is empty; put the server's token in it", p.display()),
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(bad(
                        "engine.token_file",
                        &format!("{}: {}", p.display(), crate::util::io_msg(&e)),
                    ))
                }
            }
        }
        if !self.api.listen.is_empty() {
            let Ok(addr) = self.api.listen.parse::<std::net::SocketAddr>() else {
                return Err(bad(
                    "api.listen",
                    "must be an address like \"127.0.0.1:8080\" (or empty: no API)",
                ));
            };
            let can_auth = self.api.tokens_file.is_some()
                || self.api.verify_secret_file.is_some()
                || std::env::var_os("TTSPOOL_API_SECRET").is_some();
            if !addr.ip().is_loopback() && !can_auth {
                return Err(bad(
                    "api.listen",
                    &format!(
                        "{addr} is reachable from other hosts, but no way to authenticate is set: \
                         set api.tokens_file (lines of name:token) or api.verify_secret_file \
                         (or $TTSPOOL_API_SECRET), or listen on 127.0.0.1 behind a proxy"
                    ),
                ));
            }
            if self.api.max_body.0 < 1024 {
                return Err(bad("api.max_body", "must be at least 1KiB"));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(bad(
                "log.level",
                "must be a level like \"info\" or a filter like \"ttspool=debug,warn\"",
            ));
        }
        if w.max_in_flight == 0 {
            return Err(bad("webhook.max_in_flight", "must be at least 1"));
        }
        if self.gpu.devices.is_empty() && self.gpu.max_parallel == 0 {
            return Err(bad("gpu.max_parallel", "must be at least 1"));
        }
        if !self.gpu.devices.is_empty() && self.gpu.slots_per_device == 0 {
            return Err(bad("gpu.slots_per_device", "must be at least 1"));
        }
        if self.retry.max_attempts == 0 {
            return Err(bad(
                "retry.max_attempts",
                "must be at least 1 (it counts the first run)",
            ));
        }
        if self.limits.max_line_bytes < 64 {
            return Err(bad("limits.max_line_bytes", "must be at least 64"));
        }
        if self.limits.max_text_chars == 0 {
            return Err(bad("limits.max_text_chars", "must be at least 1"));
        }
        if self.spool.lease.0 < Duration::from_secs(2) {
            return Err(bad("spool.lease", "must be at least 2s"));
        }
        if self.engine.timeout.0.is_zero() {
            return Err(bad("engine.timeout", "must be more than 0"));
        }
        let inst = &self.spool.instance;
        if inst.len() > 100
            || !inst
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad(
                "spool.instance",
                "must be 1-100 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        Ok(())
    }

    /// `engine.argv` parsed; an unknown placeholder is an error naming it.
    pub fn argv_templates(&self) -> Result<Vec<Template>, ConfigError> {
        self.engine
            .argv
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Template::parse(a).map_err(|e| ConfigError::Invalid {
                    path: self.path.clone(),
                    key: "engine.argv",
                    message: format!("element {i} ({a:?}): {e}"),
                })
            })
            .collect()
    }

    /// What is legal but probably a mistake, one line each: `check` prints
    /// these and the daemon logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.engine.kind == EngineKind::Command {
            let argv = self.argv_templates().unwrap_or_default();
            for i in crate::template::option_injection_points(&argv) {
                out.push(format!(
                    "{}: engine.argv: element {i} ({:?}) starts with task text, which the engine \
                     may read as an option (a task with input_text \"-f/etc/passwd\"); put \"--\" \
                     before it, or join it to its option as in \"--text={{input_text}}\"",
                    self.path.display(),
                    self.engine.argv[i]
                ));
            }
        }
        out
    }

    /// How many children may run at once.
    pub fn slot_count(&self) -> usize {
        if self.engine.kind == EngineKind::Http {
            return self.engine.urls.len().max(1) * self.engine.max_in_flight;
        }
        if self.gpu.devices.is_empty() {
            self.gpu.max_parallel
        } else {
            self.gpu.devices.len() * self.gpu.slots_per_device
        }
    }
}

/// The host name, made safe for a file name.
fn default_instance() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    let s = crate::util::safe_name(raw.trim(), 100);
    if s.is_empty() {
        "localhost".into()
    } else {
        s
    }
}

fn one_line_toml_error(e: &toml::de::Error, text: &str) -> String {
    // toml's messages may span lines ("invalid table header\nduplicate key").
    let msg = e
        .message()
        .trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/ttspool/ttspool.toml"))
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = parse("").unwrap();
        assert_eq!(c.spool.dir, PathBuf::from("/etc/ttspool/spool"));
        assert_eq!(c.output.dir, PathBuf::from("/etc/ttspool/spool/outputs"));
        assert_eq!(c.spool.lease.0, Duration::from_secs(60));
        assert_eq!(c.spool.settle.0, Duration::from_secs(2));
        assert_eq!(c.engine.timeout.0, Duration::from_secs(600));
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.limits.max_line_bytes, 1048576);
        assert_eq!(c.slot_count(), 2);
        assert!(!c.spool.instance.is_empty());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[spool]\nsettel = \"2s\"\n").unwrap_err().to_string();
        assert!(e.contains("settel"), "{e}");
        assert!(e.contains("/etc/ttspool/ttspool.toml"), "{e}");
        let e = parse("[spol]\n").unwrap_err().to_string();
        assert!(e.contains("spol"), "{e}");
    }

    #[test]
    fn bad_duration_says_how_to_write_one() {
        let e = parse("[engine]\ntimeout = \"ten\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid duration") && e.contains("10m"), "{e}");
    }

    #[test]
    fn gpu_slots() {
        let c = parse("[gpu]\ndevices = [\"0\", \"1\"]\nslots_per_device = 2\n").unwrap();
        assert_eq!(c.slot_count(), 4);
    }

    #[test]
    fn the_installed_example_config_parses() {
        let text = include_str!("../systemd/ttspool.toml");
        let c = Config::from_toml(text, Path::new("/etc/ttspool/ttspool.toml")).unwrap();
        assert_eq!(c.spool.dir, PathBuf::from("/var/lib/ttspool/spool"));
        assert_eq!(c.retention.rotate_size, Some(Size(256 << 20)));
        assert!(c.retention.rotate_daily);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB"), Some(256 << 20));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn glmtts_needs_a_root_and_a_known_rate() {
        let e = parse("[engine]\nkind = \"glmtts\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("engine.root"), "{e}");
        let e = parse("[engine]\nkind = \"glmtts\"\nroot = \"g\"\nsample_rate = 16000\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("engine.sample_rate"), "{e}");
        let c = parse("[engine]\nkind = \"glmtts\"\nroot = \"GLM-TTS\"\n").unwrap();
        assert_eq!(
            c.engine.root.unwrap(),
            PathBuf::from("/etc/ttspool/GLM-TTS")
        );
        assert_eq!(c.engine.batch_max, 16);
        assert_eq!(c.engine.batch_wait.0, Duration::from_secs(2));
    }

    #[test]
    fn debug_output_holds_no_secrets() {
        let c = parse(
            "[webhook]\nurl = \"https://h.example/hook?token=TOKEN1\"\nsecret = \"whsec_SECRET2\"\n\
             headers = { \"X-Api-Key\" = \"KEY3\" }\n",
        )
        .unwrap();
        let d = format!("{c:?}");
        for s in ["TOKEN1", "SECRET2", "KEY3"] {
            assert!(!d.contains(s), "{s} in {d}");
        }
        assert!(d.contains("X-Api-Key"));
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        let e = parse("[engine]\nargv = [\"tts\", \"{output}\", \"{text}\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("engine.argv")
                && e.contains("element 2")
                && e.contains("{text}")
                && e.contains("{input_text}"),
            "{e}"
        );
    }

    #[test]
    fn task_text_that_could_be_an_option_is_warned_about() {
        let c = parse("[engine]\nargv = [\"espeak-ng\", \"-w\", \"{output}\", \"{input_text}\"]\n")
            .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("element 3") && w[0].contains("\"--\""),
            "{w:?}"
        );
        assert!(
            parse("").unwrap().warnings().is_empty(),
            "the default is safe"
        );
    }

    #[test]
    fn argv_needs_output() {
        let e = parse("[engine]\nargv = [\"true\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("engine.argv") && e.contains("{output}"), "{e}");
    }
}
