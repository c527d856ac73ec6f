//! The `http` engine (SPEC §12): each task is one request to a TTS server
//! that is already running — Fish Speech's `tools/api_server.py`, an
//! OpenAI-style `/v1/audio/speech` server, or anything a JSON template can
//! describe — and the audio it answers becomes the task's output.
//!
//! Each URL is a group of `max_in_flight` slots (slot `i` talks to server
//! `i mod n`), so a server never has more requests in flight than it can
//! take (Fish Speech 1.5 runs one at a time). The answer is streamed to the
//! temp path, never held whole; raw PCM is wrapped as WAV; then the same
//! check, fsync and rename as every engine.
//!
//! Outcomes: 2xx with a valid WAV → completed; 4xx other than
//! 401/403/408/429 → `engine_rejected` (the server refused this task: not
//! retried, its message kept); 401/403, 408, 429, 5xx and connection errors →
//! `engine_failed` (retried; `Retry-After` honoured); no answer within
//! `engine.timeout` → `timeout`. Redirects are not followed. Consecutive
//! failures pause the slot (the breaker, daemon/core.rs), so a broken server
//! does not turn the backlog into failed records.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use super::{Outcome, SlotRelease};
use crate::config::{Config, HttpPreset, HttpResponse};
use crate::template::{Template, Var};
use crate::util::io_msg;
use crate::vocab::{ErrorKind, Job, Slot};

/// Bytes of a refusal's body kept for the record.
const MESSAGE_KEEP: usize = 2048;

pub struct HttpEngine {
    client: reqwest::Client,
    urls: Vec<reqwest::Url>,
    preset: HttpPreset,
    /// `engine.body`, its strings parsed as templates.
    body: Option<Value>,
    headers: Vec<(String, String)>,
    token: Option<String>,
    response: HttpResponse,
    sample_rate: u32,
    timeout: Duration,
    instance: String,
    name: String,
}

impl HttpEngine {
    pub fn new(cfg: &Config) -> HttpEngine {
        let e = &cfg.engine;
        let token = token(cfg);
        HttpEngine {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client builds"),
            urls: e
                .urls
                .iter()
                .filter_map(|u| reqwest::Url::parse(u).ok())
                .collect(),
            preset: e.preset,
            body: e.body.clone(),
            headers: e
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            token,
            response: e.response,
            sample_rate: e.pcm_sample_rate(),
            timeout: e.timeout.0,
            instance: cfg.spool.instance.clone(),
            name: format!(
                "http:{}",
                match e.preset {
                    HttpPreset::FishSpeech => "fish-speech",
                    HttpPreset::Openai => "openai",
                    HttpPreset::Custom => "custom",
                }
            ),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server slot `slot` talks to.
    pub fn url_of(&self, slot: &Slot) -> &reqwest::Url {
        &self.urls[slot.index % self.urls.len()]
    }

    /// Asks the slot's server whether it works and takes our token, without
    /// a synthesis: Fish Speech's `POST /v1/health`, else a `GET` of the URL
    /// (any answer but 401/403, 5xx or none is taken as "up").
    pub async fn probe(&self, slot: &Slot) -> Result<(), String> {
        let url = self.url_of(slot).clone();
        let req = match self.preset {
            HttpPreset::FishSpeech => {
                let mut h = url.clone();
                h.set_path("/v1/health");
                self.client.post(h)
            }
            _ => self.client.get(url.clone()),
        };
        let mut req = req.timeout(Duration::from_secs(10));
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => Err(format!(
                "{url} refuses our token ({}); check engine.token_file / $TTSPOOL_ENGINE_TOKEN",
                r.status()
            )),
            Ok(r) if r.status().is_server_error() => Err(format!("{url} answered {}", r.status())),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{url}: {}", describe_reqwest(&e))),
        }
    }

    /// The request body for `job`.
    fn body_for(&self, job: &Job, tmp: &Path) -> Result<Value, String> {
        let t = &job.task;
        let vars = super::Placeholders::new(job, tmp);
        let value = |v: Var| vars.get(job, v);
        let extra = match &self.body {
            Some(b) => render(b, &value),
            None => Value::Object(Map::new()),
        };
        let mut body = match self.preset {
            HttpPreset::Custom => return Ok(extra),
            HttpPreset::FishSpeech => {
                let mut m = json!({"text": t.input_text, "format": "wav", "streaming": false});
                if let Some(p) = &job.prompt_audio {
                    let audio = std::fs::read(p).map_err(|e| {
                        format!("cannot read prompt_audio {}: {}", p.display(), io_msg(&e))
                    })?;
                    m["references"] = json!([{
                        "audio": base64::engine::general_purpose::STANDARD.encode(audio),
                        "text": t.prompt_text.as_deref().unwrap_or(""),
                    }]);
                }
                m
            }
            HttpPreset::Openai => json!({
                "model": "tts-1",
                "input": t.input_text,
                "voice": "alloy",
                "response_format": "wav",
                "stream": false,
            }),
        };
        if let (Some(m), Value::Object(add)) = (body.as_object_mut(), extra) {
            m.extend(add);
        }
        Ok(body)
    }

    /// Runs one task against the slot's server.
    pub async fn run(
        &self,
        job: &Job,
        slot: &Slot,
        mut cancel: watch::Receiver<bool>,
        free: Option<&mut SlotRelease>,
    ) -> Outcome {
        let started = Instant::now();
        if let Err(message) = super::ensure_output_dir(job) {
            return failed(ErrorKind::SpawnFailed, message, started);
        }
        let tmp = super::sweep::temp_path(&job.output, &self.instance, job.trace_id.as_str());
        let body = match self.body_for(job, &tmp) {
            Ok(b) => b,
            Err(m) => return failed(ErrorKind::InvalidTask, m, started),
        };
        let url = self.url_of(slot).clone();
        let exchange = self.exchange(&url, &body, &tmp);
        let res = tokio::select! {
            r = tokio::time::timeout(self.timeout, exchange) => match r {
                Ok(o) => o,
                Err(_) => Err(Failure {
                    kind: ErrorKind::Timeout,
                    message: format!(
                        "{url} did not answer within engine.timeout ({})",
                        humantime::format_duration(self.timeout)
                    ),
                    retry_after: None,
                }),
            },
            _ = cancel.wait_for(|c| *c) => {
                let _ = std::fs::remove_file(&tmp);
                return Outcome::Cancelled;
            }
        };
        if let Some(f) = free {
            f.release();
        }
        let outcome = match res {
            Err(f) => Outcome::Failed {
                kind: f.kind,
                message: f.message,
                stderr_tail: String::new(),
                run_ms: started.elapsed().as_millis() as u64,
                retry_after: f.retry_after,
                give_up: false,
            },
            Ok(()) => match super::finish::finish_output(&tmp, &job.output).await {
                Ok(()) => Outcome::Completed {
                    run_ms: started.elapsed().as_millis() as u64,
                },
                Err((kind, message)) => failed(kind, format!("{url}: {message}"), started),
            },
        };
        if !matches!(outcome, Outcome::Completed { .. }) {
            let _ = std::fs::remove_file(&tmp);
        }
        outcome
    }

    /// One request; the audio streamed into `tmp`.
    async fn exchange(&self, url: &reqwest::Url, body: &Value, tmp: &Path) -> Result<(), Failure> {
        let mut req = self
            .client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let mut resp = req.send().await.map_err(|e| Failure {
            kind: ErrorKind::EngineFailed,
            message: format!("{url}: {}", describe_reqwest(&e)),
            retry_after: None,
        })?;
        let status = resp.status();
        if !status.is_success() {
            // A server's wish, within reason: a huge value would keep the
            // task claimed with no record for years.
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
            let text = crate::util::read_capped(resp, MAX_ERROR_BODY).await;
            let message = server_message(&text);
            let code = status.as_u16();
            let rejected = status.is_client_error() && !matches!(code, 401 | 403 | 408 | 429);
            let hint = match code {
                401 | 403 => " (check engine.token_file / $TTSPOOL_ENGINE_TOKEN)",
                _ => "",
            };
            return Err(Failure {
                kind: if rejected {
                    ErrorKind::EngineRejected
                } else {
                    ErrorKind::EngineFailed
                },
                message: format!("{url} answered {status}: {message}{hint}"),
                retry_after,
            });
        }
        let io = |e: std::io::Error| Failure {
            kind: ErrorKind::SpawnFailed,
            message: format!("cannot write {}: {}", tmp.display(), io_msg(&e)),
            retry_after: None,
        };
        let mut out = std::fs::File::create(tmp).map_err(io)?;
        let pcm = self.response == HttpResponse::Pcm;
        if pcm {
            out.write_all(&wav_header(self.sample_rate, 0))
                .map_err(io)?;
        }
        let mut len: u64 = 0;
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    len += c.len() as u64;
                    out.write_all(&c).map_err(io)?;
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(Failure {
                        kind: ErrorKind::EngineFailed,
                        message: format!(
                            "{url}: the answer broke off after {len} bytes: {}",
                            describe_reqwest(&e)
                        ),
                        retry_after: None,
                    })
                }
            }
        }
        if pcm {
            use std::io::{Seek, SeekFrom};
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            out.seek(SeekFrom::Start(0)).map_err(io)?;
            out.write_all(&wav_header(self.sample_rate, len))
                .map_err(io)?;
        }
        Ok(())
    }
}

/// Bytes of a server's error answer read, at most (its message is shown
/// cut much shorter; a 1 GiB error page is not read into memory).
const MAX_ERROR_BODY: usize = 64 << 10;

/// The longest `Retry-After` from a TTS server obeyed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The bearer token: `engine.token_file`, else `$TTSPOOL_ENGINE_TOKEN`.
pub fn token(cfg: &Config) -> Option<String> {
    cfg.engine
        .token_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .or_else(|| std::env::var("TTSPOOL_ENGINE_TOKEN").ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Why a request did not give audio.
struct Failure {
    kind: ErrorKind,
    message: String,
    retry_after: Option<Duration>,
}

fn failed(kind: ErrorKind, message: String, started: Instant) -> Outcome {
    Outcome::Failed {
        kind,
        message,
        stderr_tail: String::new(),
        run_ms: started.elapsed().as_millis() as u64,
        retry_after: None,
        give_up: false,
    }
}

/// The strings of a JSON template, rendered.
fn render<'a>(v: &Value, value: &impl Fn(Var) -> &'a str) -> Value {
    match v {
        Value::String(s) => match Template::parse(s) {
            Ok(t) => Value::String(t.render(value)),
            Err(_) => Value::String(s.clone()), // refused by config validation
        },
        Value::Array(a) => Value::Array(a.iter().map(|x| render(x, value)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), render(x, value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The message of an error answer: Fish Speech's and FastAPI's JSON
/// (`message`, `detail`, `error`), else the text, cut.
fn server_message(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        for k in ["message", "detail", "error"] {
            match &v[k] {
                Value::String(s) => return crate::util::cut(s, MESSAGE_KEEP).to_string(),
                Value::Null => {}
                other => return crate::util::cut(&other.to_string(), MESSAGE_KEEP).to_string(),
            }
        }
    }
    let t = text.trim();
    if t.is_empty() {
        "(empty body)".into()
    } else {
        crate::util::cut(t, MESSAGE_KEEP).to_string()
    }
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

/// A 44-byte PCM WAV header: mono, 16-bit, `rate`, `data` bytes.
fn wav_header(rate: u32, data: u32) -> [u8; 44] {
    let mut h = [0u8; 44];
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&data.saturating_add(36).to_le_bytes());
    h[8..16].copy_from_slice(b"WAVEfmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&1u16.to_le_bytes());
    h[22..24].copy_from_slice(&1u16.to_le_bytes());
    h[24..28].copy_from_slice(&rate.to_le_bytes());
    h[28..32].copy_from_slice(&(rate * 2).to_le_bytes());
    h[32..34].copy_from_slice(&2u16.to_le_bytes());
    h[34..36].copy_from_slice(&16u16.to_le_bytes());
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_keep_the_servers_words() {
        assert_eq!(
            server_message(
                r#"{"statusCode":400,"message":"text is required","error":"Bad Request"}"#
            ),
            "text is required"
        );
        assert_eq!(
            server_message(r#"{"detail":[{"msg":"bad"}]}"#),
            r#"[{"msg":"bad"}]"#
        );
        assert_eq!(server_message(""), "(empty body)");
        assert_eq!(server_message("oops"), "oops");
    }

    #[test]
    fn a_pcm_header_says_what_follows() {
        let h = wav_header(44100, 88200);
        assert_eq!(&h[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(h[24..28].try_into().unwrap()), 44100);
        assert_eq!(u32::from_le_bytes(h[40..44].try_into().unwrap()), 88200);
    }
}
