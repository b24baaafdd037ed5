//! `dflash serve`: an OpenAI-compatible HTTP API (axum on tokio) over the generation engine.
//!
//! Endpoints: `/health`, `/v1/models`, `/v1/chat/completions`, `/v1/completions` (SSE streaming
//! or not), `/tokenize` and `/detokenize` (llama-server's shapes), `/metrics` (Prometheus text).
//! Errors are OpenAI error objects. With `--api-key`, everything but `/health` needs
//! `Authorization: Bearer KEY`. SIGTERM/SIGINT stop accepting connections, let in-flight requests
//! finish for `--shutdown-grace` seconds, then cancel the rest and exit.
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chat::{ChatMessage, ChatRequestOptions};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{Engine, EngineError, Event, FinishReason, GenRequest, Handle, Summary};
use crate::prompt::ChatFormat;
use crate::sampler::SamplingParams;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: crate::model_args::ModelArgs,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0 = any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "DFLASH_API_KEY")]
    api_key: Option<String>,
    /// Sequences generated at the same time; further requests queue.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Largest prompt in tokens (default: the context size - 1).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for (default: the context size).
    #[arg(long)]
    max_tokens_limit: Option<usize>,
    /// Name served in /v1/models and accepted as `model` (default: the file name without .gguf).
    #[arg(long)]
    alias: Option<String>,
    /// Seconds in-flight requests may run on after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
}

const DEFAULT_CTX: usize = 4096;

struct Limits {
    max_body: usize,
    max_prompt: usize,
    max_tokens: usize,
}

struct AppState {
    engine: Engine,
    format: ChatFormat,
    model_id: String,
    model_path: String,
    api_key: Option<String>,
    limits: Limits,
    created: u64,
    next_id: AtomicU64,
    http: Mutex<BTreeMap<(String, u16), u64>>,
}

type St = Arc<AppState>;

pub fn run(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let format = ChatFormat::from_metadata(&model.file.metadata)?;
    let n_ctx = a.model.ctx_size.unwrap_or(DEFAULT_CTX.min(model.config.n_ctx_train)).max(2);
    let engine = Engine::start(model, format.tokenizer.clone(), a.parallel, n_ctx)?;
    let model_id = a.alias.clone().unwrap_or_else(|| {
        let name = a.model.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.strip_suffix(".gguf").unwrap_or(&name).to_string()
    });
    let limits = Limits {
        max_body: a.max_body_bytes,
        max_prompt: a.max_prompt_tokens.unwrap_or(n_ctx - 1).min(n_ctx - 1),
        max_tokens: a.max_tokens_limit.unwrap_or(n_ctx),
    };
    let state = Arc::new(AppState {
        engine,
        format,
        model_id,
        model_path: a.model.model.display().to_string(),
        api_key: a.api_key.clone(),
        limits,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        next_id: AtomicU64::new(1),
        http: Mutex::new(BTreeMap::new()),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let grace = Duration::from_secs(a.shutdown_grace);
    rt.block_on(serve(state.clone(), &a.host, a.port, grace))?;
    drop(rt);
    tracing::info!("waiting for the compute thread");
    drop(state);
    eprintln!("dflash serve: stopped");
    Ok(())
}

async fn serve(state: St, host: &str, port: u16, grace: Duration) -> Result<()> {
    // Handlers first: a SIGTERM that arrives once "listening" is printed must find them.
    let signals = signal_streams()?;
    let listener = tokio::net::TcpListener::bind((host, port)).await.with_context(|| format!("binding {host}:{port}"))?;
    let addr: SocketAddr = listener.local_addr()?;
    eprintln!(
        "dflash serve: model {} ({} parallel, context {} tokens) listening on http://{addr}",
        state.model_id, state.engine.info.parallel, state.engine.info.n_ctx
    );
    let app = router(state.clone());
    let st = state.clone();
    let shutdown = async move {
        wait_for_signal(signals).await;
        eprintln!("dflash serve: shutting down (in-flight requests get {} s)", grace.as_secs());
        let st2 = st.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            st2.engine.cancel_all();
        });
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

fn signal_streams() -> Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok((term, int))
}

async fn wait_for_signal((mut term, mut int): Signals) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn router(state: St) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth_and_count))
        .with_state(state)
}

/// An OpenAI error object with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, kind: "invalid_request_error", code: None, param: None, message: message.into() }
    }
    fn param(mut self, p: &'static str) -> ApiError {
        self.param = Some(p);
        self
    }
    fn code(mut self, c: &'static str) -> ApiError {
        self.code = Some(c);
        self
    }
    fn server(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "server_error", code: None, param: None, message: message.into() }
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match &e {
            EngineError::PromptTooLong { .. } => ApiError::bad(e.to_string()).code("context_length_exceeded").param("messages"),
            EngineError::Stopped => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: None,
                param: None,
                message: e.to_string(),
            },
            _ if e.is_client_error() => ApiError::bad(e.to_string()),
            _ => ApiError::server(e.to_string()),
        }
    }
}

async fn auth_and_count(State(st): State<St>, req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "other".into());
    let resp = if path != "/health" && !authorized(&st, req.headers()) {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: Some("invalid_api_key"),
            param: None,
            message: "invalid or missing API key (send Authorization: Bearer KEY)".into(),
        }
        .into_response()
    } else {
        next.run(req).await
    };
    if let Ok(mut m) = st.http.lock() {
        *m.entry((path, resp.status().as_u16())).or_default() += 1;
    }
    resp
}

fn authorized(st: &AppState, headers: &HeaderMap) -> bool {
    let Some(key) = &st.api_key else { return true };
    let Some(got) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some(token) = got.strip_prefix("Bearer ") else { return false };
    // compare without an early exit
    token.len() == key.len() && token.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn not_found() -> ApiError {
    ApiError { status: StatusCode::NOT_FOUND, kind: "not_found_error", code: None, param: None, message: "no such endpoint".into() }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(st): State<St>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": st.model_id, "object": "model", "created": st.created, "owned_by": "dflash"}]
    }))
}

async fn read_json<T: serde::de::DeserializeOwned>(st: &AppState, body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, st.limits.max_body).await.map_err(|_| ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        kind: "invalid_request_error",
        code: Some("request_too_large"),
        param: None,
        message: format!("the request body is larger than the limit of {} bytes", st.limits.max_body),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Parameters common to both completion endpoints.
#[derive(Deserialize, Default)]
struct Common {
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    #[serde(alias = "repeat_penalty")]
    repetition_penalty: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    logit_bias: Option<HashMap<String, f32>>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    tools: Option<Vec<Value>>,
    #[serde(flatten)]
    common: Common,
    #[serde(flatten)]
    chat: ChatRequestOptions,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Value,
    #[serde(flatten)]
    common: Common,
}

struct Prepared {
    req: GenRequest,
    stream: bool,
    include_usage: bool,
}

fn check_model(st: &AppState, c: &Common) -> Result<(), ApiError> {
    match c.model.as_deref() {
        None | Some("") => Ok(()),
        Some(m) if m == st.model_id || m == st.model_path => Ok(()),
        Some(m) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
            message: format!("the model {m:?} does not exist (this server serves {:?})", st.model_id),
        }),
    }
}

fn prepare(st: &AppState, c: &Common, prompt: Vec<u32>, thinking: bool) -> Result<Prepared, ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::bad(format!("n must be 1 (one choice per request), found {n}")).param("n"));
        }
    }
    if prompt.len() > st.limits.max_prompt {
        return Err(ApiError::bad(format!(
            "the prompt has {} tokens; the limit is {} (context {} tokens)",
            prompt.len(),
            st.limits.max_prompt,
            st.engine.info.n_ctx
        ))
        .code("context_length_exceeded"));
    }
    let room = st.engine.info.n_ctx.saturating_sub(prompt.len());
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None | Some(-1) => room.min(st.limits.max_tokens),
        Some(m) if m < 1 => return Err(ApiError::bad(format!("max_tokens must be at least 1, found {m}")).param("max_tokens")),
        Some(m) if m as u64 > st.limits.max_tokens as u64 => {
            return Err(ApiError::bad(format!("max_tokens {m} exceeds the limit of {}", st.limits.max_tokens)).param("max_tokens"))
        }
        Some(m) => m as usize,
    };
    let n_vocab = st.engine.info.tokenizer.n_vocab();
    let mut logit_bias = Vec::new();
    for (k, &v) in c.logit_bias.iter().flatten() {
        let id: i64 = k.trim().parse().map_err(|_| ApiError::bad(format!("logit_bias key {k:?} is not a token id")).param("logit_bias"))?;
        if id < 0 || id as u64 >= n_vocab as u64 {
            return Err(ApiError::bad(format!("logit_bias: token id {id} is outside the vocabulary [0, {n_vocab})")).param("logit_bias"));
        }
        logit_bias.push((id as u32, v));
    }
    logit_bias.sort_by_key(|b| b.0);
    let top_k = match c.top_k {
        None => 0,
        Some(k) if k < 0 => return Err(ApiError::bad(format!("top_k must be >= 0, found {k}")).param("top_k")),
        Some(k) => k as usize,
    };
    let d = SamplingParams::default();
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k,
        top_p: c.top_p.unwrap_or(d.top_p),
        min_p: c.min_p.unwrap_or(d.min_p),
        repetition_penalty: c.repetition_penalty.unwrap_or(d.repetition_penalty),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        logit_bias,
        seed: c.seed.map(|s| s as u64),
        ..d
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 16 {
        return Err(ApiError::bad(format!("at most 16 stop strings, found {}", stop.len())).param("stop"));
    }
    let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
    Ok(Prepared {
        req: GenRequest { prompt, params, max_tokens, stop, thinking },
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

async fn chat_completions(State(st): State<St>, body: Body) -> Response {
    match chat_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(st: St, body: Body) -> Result<Response, ApiError> {
    let b: ChatBody = read_json(&st, body).await?;
    check_model(&st, &b.common)?;
    let vars = b.chat.resolve(false, true).map_err(|e| ApiError::bad(e.to_string()))?;
    let prompt = st.format.encode_chat(&b.messages, b.tools.as_deref(), &vars).map_err(|e| {
        if e.is_client_error() {
            ApiError::bad(e.to_string()).param("messages")
        } else {
            ApiError::server(e.to_string())
        }
    })?;
    let p = prepare(&st, &b.common, prompt, vars.thinking)?;
    generate(st, p, Kind::Chat).await
}

async fn completions(State(st): State<St>, body: Body) -> Response {
    match completions_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// A completion prompt: a string, an array of token ids, or a one-element array of either.
fn completion_prompt(st: &AppState, v: &Value) -> Result<Vec<u32>, ApiError> {
    let tok = &st.engine.info.tokenizer;
    let bad = || ApiError::bad("prompt must be a string, an array of token ids, or a one-element array of those").param("prompt");
    match v {
        Value::String(s) => {
            let mut ids = if tok.add_bos() { vec![tok.bos_id()] } else { Vec::new() };
            ids.extend(tok.encode(s, true).map_err(|e| ApiError::server(e.to_string()))?);
            Ok(ids)
        }
        Value::Array(a) if a.len() == 1 && (a[0].is_string() || a[0].is_array()) => completion_prompt(st, &a[0]),
        Value::Array(a) if a.iter().all(Value::is_number) => {
            let n_vocab = tok.n_vocab();
            a.iter()
                .enumerate()
                .map(|(i, x)| match x.as_i64() {
                    Some(id) if id >= 0 && (id as u64) < n_vocab as u64 => Ok(id as u32),
                    _ => Err(ApiError::bad(format!("prompt token id {x} (index {i}) is outside the vocabulary [0, {n_vocab})")).param("prompt")),
                })
                .collect()
        }
        Value::Array(a) if a.len() > 1 => Err(ApiError::bad(format!("one prompt per request, found {}", a.len())).param("prompt")),
        _ => Err(bad()),
    }
}

async fn completions_inner(st: St, body: Body) -> Result<Response, ApiError> {
    let b: CompletionBody = read_json(&st, body).await?;
    check_model(&st, &b.common)?;
    let prompt = completion_prompt(&st, &b.prompt)?;
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty").param("prompt"));
    }
    let p = prepare(&st, &b.common, prompt, false)?;
    generate(st, p, Kind::Completion).await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

fn usage(s: &Summary) -> Value {
    json!({"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens, "total_tokens": s.prompt_tokens + s.completion_tokens})
}

async fn generate(st: St, p: Prepared, kind: Kind) -> Result<Response, ApiError> {
    let handle = st.engine.submit(p.req)?;
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}-{n}", st.created),
        Kind::Completion => format!("cmpl-{}-{n}", st.created),
    };
    let meta = Meta { id, created, model: st.model_id.clone(), kind };
    if p.stream {
        Ok(stream_response(handle, meta, p.include_usage))
    } else {
        whole_response(handle, meta).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": choices})
    }

    fn delta(&self, reasoning: bool, text: &str, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = match (text.is_empty(), reasoning) {
                    (true, _) => json!({}),
                    (false, true) => json!({"reasoning_content": text}),
                    (false, false) => json!({"content": text}),
                };
                self.chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]))
            }
            Kind::Completion => self.chunk(json!([{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}])),
        }
    }
}

fn cancelled_error() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        code: None,
        param: None,
        message: "the request was cancelled (the server is shutting down)".into(),
    }
}

async fn whole_response(mut h: Handle, meta: Meta) -> Result<Response, ApiError> {
    let (mut content, mut reasoning) = (String::new(), String::new());
    while let Some(ev) = h.events.recv().await {
        match ev {
            Event::Text { reasoning: true, text } => reasoning.push_str(&text),
            Event::Text { reasoning: false, text } => content.push_str(&text),
            Event::Error(e) => return Err(ApiError::server(e)),
            Event::Done(s) => {
                if s.finish == FinishReason::Cancelled {
                    return Err(cancelled_error());
                }
                let finish = s.finish.as_str();
                let choice = match meta.kind {
                    Kind::Chat => {
                        let mut message = json!({"role": "assistant", "content": content});
                        if !reasoning.is_empty() {
                            message["reasoning_content"] = json!(reasoning);
                        }
                        json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish})
                    }
                    Kind::Completion => json!({"index": 0, "text": content, "logprobs": null, "finish_reason": finish}),
                };
                let body = json!({
                    "id": meta.id, "object": meta.object(false), "created": meta.created, "model": meta.model,
                    "choices": [choice], "usage": usage(&s), "timings": s.timings,
                });
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::server("the engine stopped without finishing the request"))
}

fn sse_json(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

fn stream_response(h: Handle, meta: Meta, include_usage: bool) -> Response {
    enum Phase {
        Start,
        Run,
        End,
    }
    let first = match meta.kind {
        Kind::Chat => meta.chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])),
        Kind::Completion => Value::Null,
    };
    let stream = futures_util::stream::unfold((h, meta, Phase::Start, first), move |(mut h, meta, phase, first)| async move {
        match phase {
            Phase::Start if !first.is_null() => {
                let ev = sse_json(&first);
                Some((vec![ev], (h, meta, Phase::Run, Value::Null)))
            }
            Phase::Start | Phase::Run => {
                let out = match h.events.recv().await {
                    Some(Event::Text { reasoning, text }) => {
                        return Some((vec![sse_json(&meta.delta(reasoning, &text, None))], (h, meta, Phase::Run, Value::Null)))
                    }
                    Some(Event::Done(s)) if s.finish != FinishReason::Cancelled => {
                        let mut last = meta.delta(false, "", Some(s.finish.as_str()));
                        last["timings"] = json!(s.timings);
                        let mut evs = vec![sse_json(&last)];
                        if include_usage {
                            let mut u = meta.chunk(json!([]));
                            u["usage"] = usage(&s);
                            evs.push(sse_json(&u));
                        }
                        evs
                    }
                    Some(Event::Done(_)) => vec![sse_json(&cancelled_error().body())],
                    Some(Event::Error(e)) => vec![sse_json(&ApiError::server(e).body())],
                    None => vec![sse_json(&ApiError::server("the engine stopped without finishing the request").body())],
                };
                let mut out = out;
                out.push(Ok(SseEvent::default().data("[DONE]")));
                Some((out, (h, meta, Phase::End, Value::Null)))
            }
            Phase::End => None,
        }
    });
    use futures_util::StreamExt as _;
    let flat = stream.flat_map(futures_util::stream::iter);
    Sse::new(flat).into_response()
}

#[derive(Deserialize)]
struct TokenizeBody {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
    #[serde(default)]
    with_pieces: bool,
}

fn yes() -> bool {
    true
}

async fn tokenize(State(st): State<St>, body: Body) -> Response {
    let r = async {
        let b: TokenizeBody = read_json(&st, body).await?;
        let tok = &st.engine.info.tokenizer;
        let mut ids = if b.add_special && tok.add_bos() { vec![tok.bos_id()] } else { Vec::new() };
        ids.extend(tok.encode(&b.content, b.parse_special).map_err(|e| ApiError::server(e.to_string()))?);
        if !b.with_pieces {
            return Ok::<_, ApiError>(Json(json!({"tokens": ids})));
        }
        let mut pieces = Vec::with_capacity(ids.len());
        for id in ids {
            let bytes = tok.token_bytes(id).map_err(|e| ApiError::server(e.to_string()))?;
            let piece = match std::str::from_utf8(bytes) {
                Ok(s) => json!(s),
                Err(_) => json!(bytes),
            };
            pieces.push(json!({"id": id, "piece": piece}));
        }
        Ok(Json(json!({"tokens": pieces})))
    }
    .await;
    r.into_response()
}

#[derive(Deserialize)]
struct DetokenizeBody {
    tokens: Vec<i64>,
}

async fn detokenize(State(st): State<St>, body: Body) -> Response {
    let r = async {
        let b: DetokenizeBody = read_json(&st, body).await?;
        let tok = &st.engine.info.tokenizer;
        let n_vocab = tok.n_vocab();
        let mut ids = Vec::with_capacity(b.tokens.len());
        for (i, &t) in b.tokens.iter().enumerate() {
            if t < 0 || t as u64 >= n_vocab as u64 {
                return Err(ApiError::bad(format!("token id {t} (index {i}) is outside the vocabulary [0, {n_vocab})")).param("tokens"));
            }
            ids.push(t as u32);
        }
        let content = tok.decode(&ids, false).map_err(|e| ApiError::server(e.to_string()))?;
        Ok(Json(json!({"content": content})))
    }
    .await;
    r.into_response()
}

async fn metrics(State(st): State<St>) -> Response {
    let s = &st.engine.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let prompt_s = get(&s.prompt_us) as f64 / 1e6;
    let decode_s = get(&s.decode_us) as f64 / 1e6;
    let per_s = |n: u64, t: f64| if t > 0.0 { n as f64 / t } else { 0.0 };
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
        out.push_str(&format!("# HELP dflash_{name} {help}\n# TYPE dflash_{name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("dflash_{name}{labels} {v}\n"));
        }
    };
    let http: Vec<(String, String)> = st
        .http
        .lock()
        .map(|m| m.iter().map(|((p, c), n)| (format!("{{endpoint=\"{p}\",status=\"{c}\"}}"), n.to_string())).collect())
        .unwrap_or_default();
    let one = |v: String| vec![(String::new(), v)];
    metric("http_requests_total", "counter", "HTTP requests by endpoint and status.", http);
    metric("requests_finished_total", "counter", "Generations that finished (stop or length).", one(get(&s.requests_finished).to_string()));
    metric("requests_cancelled_total", "counter", "Generations cancelled (client gone or shutdown).", one(get(&s.requests_cancelled).to_string()));
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", one(get(&s.prompt_tokens).to_string()));
    metric("completion_tokens_total", "counter", "Tokens generated.", one(get(&s.completion_tokens).to_string()));
    metric("prompt_seconds_total", "counter", "Time spent in prefill.", one(format!("{prompt_s:.6}")));
    metric("decode_seconds_total", "counter", "Time from first to last token, summed over requests.", one(format!("{decode_s:.6}")));
    metric("prompt_tokens_per_second", "gauge", "Prefill throughput over all requests.", one(format!("{:.3}", per_s(get(&s.prompt_tokens), prompt_s))));
    let decoded = get(&s.completion_tokens).saturating_sub(get(&s.requests_finished) + get(&s.requests_cancelled));
    metric("decode_tokens_per_second", "gauge", "Decode throughput over all requests.", one(format!("{:.3}", per_s(decoded, decode_s))));
    metric("queue_depth", "gauge", "Requests waiting for a sequence.", one(get(&s.queue_depth).to_string()));
    metric("requests_active", "gauge", "Requests being generated.", one(get(&s.active).to_string()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
