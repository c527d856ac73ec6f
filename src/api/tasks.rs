//! The task API (SPEC §11): `POST /v1/tasks` in, `GET /v1/tasks/{id}` and
//! `GET /v1/status` out, `/healthz` and `/readyz` for the load balancer.
//!
//! An accepted task is a line in a file in `pending/`, durable before the
//! 202 (publish.rs); from there it follows the path of every dropped file,
//! with every guarantee that path has, and any daemon on the spool may run
//! it — or answer for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::auth::Auth;
use super::index::{Accepted, Found, Index};
use super::publish::{KeyState, Keys, Publisher};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::spool::Spool;
use crate::task::{parse_line, TaskRules};

/// The longest `?wait=` a status request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// What the API needs, shared by its handlers.
pub struct ApiState {
    spool: Spool,
    instance: String,
    live: RwLock<Live>,
    publisher: Publisher,
    keys: Keys,
    index: Arc<Mutex<Index>>,
    /// Unclaimed lines on the spool, counted at most once a second.
    backlog: Mutex<(Option<Instant>, u64)>,
    /// The spool is open and our previous run's claims are recovered.
    pub ready: AtomicBool,
    /// Keys expired last (a sweep at most every 10 minutes).
    expired_at: AtomicU64,
}

/// What a config reload changes.
struct Live {
    cfg: Config,
    rules: TaskRules,
    auth: Auth,
}

/// An error answer: `{"error": {"kind", "message"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": {"kind": self.kind, "message": self.message}})),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl ApiState {
    pub fn new(cfg: &Config) -> Result<Arc<ApiState>, String> {
        let spool = Spool::new(&cfg.spool.dir);
        Ok(Arc::new(ApiState {
            instance: cfg.spool.instance.clone(),
            live: RwLock::new(Live {
                rules: TaskRules::from_config(cfg),
                auth: Auth::load(&cfg.api)?,
                cfg: cfg.clone(),
            }),
            publisher: Publisher::start(&spool),
            keys: Keys::new(&spool, cfg.api.idempotency_ttl.0),
            index: Arc::new(Mutex::new(Index::new(&spool))),
            backlog: Mutex::new((None, 0)),
            ready: AtomicBool::new(false),
            expired_at: AtomicU64::new(0),
            spool,
        }))
    }

    /// A reloaded config: rules, tokens and secrets, limits. Credentials
    /// that cannot be loaded (a tokens file emptied, deleted or broken)
    /// close the API: every request gets 401 until they load again — the
    /// old ones are revoked, never kept, and none never means anyone.
    pub fn reload(&self, cfg: &Config) {
        let auth = match Auth::load(&cfg.api) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("API closed: every request is refused (401) until the credentials load again: {e}");
                Auth::closed(e)
            }
        };
        let mut live = self.live.write().expect("api config");
        *live = Live {
            rules: TaskRules::from_config(cfg),
            auth,
            cfg: cfg.clone(),
        };
    }

    /// Unclaimed lines now (at most a second old).
    async fn backlog(self: &Arc<Self>) -> u64 {
        {
            let b = self.backlog.lock().expect("backlog");
            if b.0.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return b.1;
            }
        }
        let spool = self.spool.clone();
        let max_line = self
            .live
            .read()
            .expect("api config")
            .cfg
            .limits
            .max_line_bytes;
        let n = tokio::task::spawn_blocking(move || {
            crate::spool::claim::summary(&spool, max_line)
                .map(|s| s.pending_lines)
                .unwrap_or(0)
        })
        .await
        .unwrap_or(0);
        *self.backlog.lock().expect("backlog") = (Some(Instant::now()), n);
        n
    }
}

/// The API's routes, `/metrics` among them.
pub fn routes(state: Arc<ApiState>, metrics: Arc<Metrics>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/tasks", post(post_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/status", get(get_status))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route: the API has POST /v1/tasks, GET /v1/tasks/{id}, GET /v1/status, /healthz, /readyz, /metrics",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state);
    api.merge(super::metrics_route(metrics))
}

async fn readyz(State(st): State<Arc<ApiState>>) -> Response {
    if st.ready.load(Ordering::Relaxed) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the daemon is still opening the spool and recovering its claims",
        )
        .into_response()
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Checks the credentials of a request.
fn authorize(st: &ApiState, headers: &HeaderMap, body: &[u8]) -> Result<String, ApiError> {
    let live = st.live.read().expect("api config");
    live.auth
        .check(headers, body, unix_now())
        .map_err(|why| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why))
}

/// How the body holds its tasks.
enum Shape {
    One,
    Lines,
}

fn shape(headers: &HeaderMap) -> Result<Shape, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" => Ok(Shape::One),
        "application/x-ndjson" | "application/jsonl" | "application/jsonlines"
        | "application/json-lines" => Ok(Shape::Lines),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {:?} is not accepted: send one task as application/json, or many as application/x-ndjson",
                if ct.is_empty() { "(none)" } else { ct }
            ),
        )),
    }
}

/// The tasks of a body as (id, output_name, the line to write), all valid,
/// or why not (with the rules and messages of `ttspool check`).
fn parse_body(
    body: &[u8],
    shape: Shape,
    rules: &TaskRules,
    max_line: usize,
) -> Result<Vec<(String, String, String)>, ApiError> {
    let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_task", m);
    let one = |bytes: &[u8], no: Option<usize>| -> Result<(String, String, String), ApiError> {
        let at = no.map(|n| format!("line {n}: ")).unwrap_or_default();
        if bytes.len() > max_line {
            return Err(invalid(format!(
                "{at}line is {} bytes, more than limits.max_line_bytes = {max_line}",
                bytes.len()
            )));
        }
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            let m = format!("{at}not JSON: {e}");
            if no.is_some() {
                invalid(m)
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m)
            }
        })?;
        // One line in the file, however the body was laid out.
        let line = v.to_string();
        let t = parse_line(line.as_bytes(), rules).map_err(|e| invalid(format!("{at}{}", e.0)))?;
        Ok((t.id, t.output_name, line))
    };
    let tasks = match shape {
        Shape::One => vec![one(body, None)?],
        Shape::Lines => {
            let mut out = Vec::new();
            for (i, l) in body.split(|&b| b == b'\n').enumerate() {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                if crate::spool::lines::is_blank(l) {
                    continue;
                }
                out.push(one(l, Some(i + 1))?);
            }
            out
        }
    };
    if tasks.is_empty() {
        return Err(invalid("the body holds no task lines".into()));
    }
    Ok(tasks)
}

async fn post_tasks(
    State(st): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (max_body, max_pending, max_line) = {
        let live = st.live.read().expect("api config");
        (
            live.cfg.api.max_body.0,
            live.cfg.api.max_pending_lines,
            live.cfg.limits.max_line_bytes,
        )
    };
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is larger than api.max_body ({max_body} bytes); send fewer tasks per request"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
        }
    })?;
    let who = authorize(&st, &headers, &body)?;
    let shape = shape(&headers)?;
    let tasks = {
        let live = st.live.read().expect("api config");
        parse_body(&body, shape, &live.rules, max_line)?
    };
    if max_pending > 0 {
        let backlog = st.backlog().await;
        if backlog > max_pending {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_pending",
                format!(
                    "{backlog} task line(s) wait unclaimed, api.max_pending_lines is {max_pending}; retry later"
                ),
            );
            e.retry_after = Some(5);
            return Err(e);
        }
    }
    // A signed request is the signed message `webhook-id` names: a header
    // nobody signed (an added Idempotency-Key) must not make a captured
    // request new again.
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let key = if who == "signed" {
        header("webhook-id").map(str::to_string)
    } else {
        header("idempotency-key")
            .or_else(|| header("webhook-id"))
            .map(str::to_string)
    };
    let body_hash = crate::spool::ident::digest(&body);
    let unavailable = |m: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m);
    let mut key_file = None;
    if let Some(k) = &key {
        match st.keys.begin(k, &body_hash).await.map_err(unavailable)? {
            KeyState::Fresh(p) => key_file = Some(p),
            KeyState::Answered(answer) => return Ok(accepted_response(answer)),
            KeyState::OtherBody => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_conflict",
                    "this Idempotency-Key was used before with another body; use a new key for new tasks",
                ))
            }
        }
    }
    let lines: Vec<String> = tasks.iter().map(|(_, _, l)| l.clone()).collect();
    let placed = match st.publisher.publish(lines).await {
        Ok(p) => p,
        Err(e) => {
            if let Some(p) = &key_file {
                st.keys.forget(p);
            }
            warn!("{e}");
            return Err(unavailable(format!("{e}; nothing was accepted")));
        }
    };
    let answer = json!({
        "accepted": tasks.len(),
        "tasks": tasks.iter().map(|(id, output_name, _)| json!({
            "id": id,
            "output_name": output_name,
            "status_url": format!("/v1/tasks/{}", urlencode(id)),
        })).collect::<Vec<_>>(),
    });
    if let Some(p) = &key_file {
        st.keys.done(p, &body_hash, &answer);
    }
    let noted: Vec<Accepted> = tasks
        .iter()
        .enumerate()
        .map(|(i, (id, _, _))| Accepted {
            id: id.clone(),
            file: placed.file.clone(),
            line: placed.first_line + i as u64,
        })
        .collect();
    let (index, instance) = (st.index.clone(), st.instance.clone());
    let st2 = st.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = index.lock().expect("index").note(&instance, &noted) {
            warn!("cannot note accepted tasks for status lookups: {e}");
        }
        st2.expire_keys();
    });
    info!(who = %who, tasks = tasks.len(), file = %placed.file, "accepted tasks over HTTP");
    Ok(accepted_response(answer))
}

impl ApiState {
    /// Deletes expired idempotency keys, at most every 10 minutes.
    fn expire_keys(&self) {
        let now = unix_now() as u64;
        let last = self.expired_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 600
            && self
                .expired_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.keys.expire();
        }
    }
}

/// Work on the blocking pool that panicked.
fn internal(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

fn accepted_response(answer: Value) -> Response {
    let location = match answer["tasks"].as_array().map(Vec::as_slice) {
        Some([one]) => one["status_url"].as_str().map(str::to_string),
        _ => None,
    };
    let mut r = (StatusCode::ACCEPTED, Json(answer)).into_response();
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        r.headers_mut().insert(header::LOCATION, l);
    }
    r
}

/// An id as a URL path segment.
fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<String>,
}

async fn get_task(
    State(st): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, b"")?;
    let wait = match q.wait.as_deref() {
        None => Duration::ZERO,
        Some(w) => humantime::parse_duration(w)
            .or_else(|_| w.parse::<u64>().map(Duration::from_secs))
            .map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("wait={w:?} is not a duration like 30s"),
                )
            })?
            .min(MAX_WAIT),
    };
    let until = Instant::now() + wait;
    loop {
        let index = st.index.clone();
        let id2 = id.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut ix = index.lock().expect("index");
            ix.refresh().and_then(|()| ix.lookup(&id2))
        })
        .await
        .map_err(internal)?
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("cannot read the record logs: {}", crate::util::io_msg(&e)),
            )
        })?;
        let finished = matches!(found, Found::Finished { .. });
        if finished || Instant::now() >= until {
            return Ok(match found {
                Found::Finished { status, record } => {
                    let record: Value = serde_json::from_str(&record).unwrap_or(Value::Null);
                    Json(json!({"id": id, "status": status, "record": record})).into_response()
                }
                Found::Pending => Json(json!({"id": id, "status": "pending"})).into_response(),
                Found::Running => Json(json!({"id": id, "status": "running"})).into_response(),
                Found::Unknown => {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no task with id {id:?} is known on this spool"),
                    ))
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_status(
    State(st): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, b"")?;
    let cfg = st.live.read().expect("api config").cfg.clone();
    let counts = tokio::task::spawn_blocking(move || crate::report::counts(&cfg))
        .await
        .map_err(internal)?
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        })?;
    Ok(Json(counts).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> TaskRules {
        TaskRules {
            max_text_chars: 5000,
            voices_dir: std::path::PathBuf::from("/nonexistent"),
            needs_prompt_audio: false,
            needs_prompt_text: false,
        }
    }

    #[test]
    fn a_batch_with_one_bad_line_names_it_and_its_field() {
        let body = b"{\"input_text\":\"a\",\"output_name\":\"a\"}\n\n{\"input_txt\":\"b\",\"output_name\":\"b\"}\n";
        let e = parse_body(body, Shape::Lines, &rules(), 1 << 20)
            .err()
            .unwrap();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.message.starts_with("line 3: "), "{}", e.message);
        assert!(e.message.contains("input_txt"), "{}", e.message);
    }

    #[test]
    fn one_pretty_printed_task_becomes_one_line() {
        let body = b"{\n  \"input_text\": \"a\",\n  \"output_name\": \"x/y\"\n}";
        let t = parse_body(body, Shape::One, &rules(), 1 << 20).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].0.as_str(), t[0].1.as_str()), ("x/y", "x/y"));
        assert!(!t[0].2.contains('\n'));
        let e = parse_body(b"not json", Shape::One, &rules(), 1 << 20)
            .err()
            .unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(urlencode("x/y z"), "x%2Fy%20z");
    }
}
