//! The endpoints: each parses its typed body, checks it, and hands the work to the engine, the
//! tokenizer or the chat template. Rendering and tokenizing a request (up to the body limit of
//! text) run on tokio's blocking threads, so the runtime keeps answering meanwhile.
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chat::{ChatMessage, TemplateVars};
use serde_json::Value;

use super::api::{
    ApiJson, ChatBody, Common, CompletionBody, DetokenizeBody, DetokenizeResponse, Health, ModelCard, ModelList, Piece, SlotBody, SlotQuery, Stop,
    TokenPiece, TokenizeBody, TokenizeResponse, Tokens,
};
use super::error::ApiError;
use super::reply::{Reply, ToolChoice, ToolPlan};
use super::stream::{stream_response, whole_response, Kind, Meta};
use super::St;
use crate::engine::sampler::SamplingParams;
use crate::engine::{GenRequest, SlotAction};

/// Runs `f` on a blocking thread (tokenizing and rendering: CPU work proportional to the body).
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::server(format!("a blocking task failed: {e}")))?
}

pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

pub async fn not_found() -> ApiError {
    ApiError::not_found()
}

pub async fn models(State(st): State<St>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard { id: st.model_id.clone(), object: "model", created: st.created, owned_by: "dflash" }],
    })
}

pub async fn chat_completions(State(st): State<St>, ApiJson(b): ApiJson<ChatBody>) -> Result<Response, ApiError> {
    check_model(&st, b.common.model.as_deref())?;
    let vars = b.chat.resolve(false, true).map_err(|e| ApiError::bad(e.to_string()))?;
    let thinking = vars.thinking;
    let plan = ToolPlan::new(b.tools, ToolChoice::from_openai(b.tool_choice.as_ref())?, thinking)?;
    let (prompt, plan) = render(&st, b.messages, plan, vars).await?;
    let req = prepare(&st, &b.common, prompt, thinking)?;
    generate(st, req, &b.common, Kind::Chat, &plan).await
}

/// Renders and tokenizes a conversation (on a blocking thread) with the plan's tools, and its
/// opening after the generation prompt.
pub(super) async fn render(st: &St, messages: Vec<ChatMessage>, plan: ToolPlan, vars: TemplateVars) -> Result<(Vec<u32>, ToolPlan), ApiError> {
    let format = st.format.clone();
    blocking(move || {
        let prompt = format.encode_chat(&messages, plan.tools.as_deref(), &vars, &plan.opening)?;
        Ok((prompt, plan))
    })
    .await
}

pub async fn completions(State(st): State<St>, ApiJson(b): ApiJson<CompletionBody>) -> Result<Response, ApiError> {
    check_model(&st, b.common.model.as_deref())?;
    let st2 = st.clone();
    let prompt = blocking(move || completion_prompt(&st2, b.prompt)).await?;
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty").param("prompt"));
    }
    let req = prepare(&st, &b.common, prompt, false)?;
    let plan = ToolPlan::new(None, ToolChoice::None, false)?;
    generate(st, req, &b.common, Kind::Completion, &plan).await
}

pub async fn tokenize(State(st): State<St>, ApiJson(b): ApiJson<TokenizeBody>) -> Result<Json<TokenizeResponse>, ApiError> {
    let tokens = blocking(move || {
        let tok = &st.engine.info.tokenizer;
        let mut ids = if b.add_special && tok.add_bos() { vec![tok.bos_id()] } else { Vec::new() };
        ids.extend(tok.encode(&b.content, b.parse_special).map_err(|e| ApiError::server(e.to_string()))?);
        if !b.with_pieces {
            return Ok(Tokens::Ids(ids));
        }
        let pieces = ids
            .into_iter()
            .map(|id| {
                let bytes = tok.token_bytes(id).map_err(|e| ApiError::server(e.to_string()))?;
                let piece = match std::str::from_utf8(bytes) {
                    Ok(s) => Piece::Text(s.to_string()),
                    Err(_) => Piece::Bytes(bytes.to_vec()),
                };
                Ok(TokenPiece { id, piece })
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(Tokens::WithPieces(pieces))
    })
    .await?;
    Ok(Json(TokenizeResponse { tokens }))
}

pub async fn detokenize(State(st): State<St>, ApiJson(b): ApiJson<DetokenizeBody>) -> Result<Json<DetokenizeResponse>, ApiError> {
    let content = blocking(move || {
        let tok = &st.engine.info.tokenizer;
        let ids = graph::token_ids(&b.tokens, tok.n_vocab()).map_err(|e| ApiError::bad(e.to_string()).param("tokens"))?;
        tok.decode(&ids, false).map_err(|e| ApiError::server(e.to_string()))
    })
    .await?;
    Ok(Json(DetokenizeResponse { content }))
}

pub async fn metrics(State(st): State<St>) -> Result<Response, ApiError> {
    let (content_type, text) = st.metrics.render(&st.engine.stats).map_err(|e| ApiError::server(format!("encoding the metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// `POST /slots/{id}?action=save|restore|erase`, body `{"filename": "…"}` for save and restore.
pub async fn slots(State(st): State<St>, Path(id): Path<String>, Query(q): Query<SlotQuery>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let slot: usize = id.parse().map_err(|_| ApiError::bad(format!("slot id {id:?} is not a number")))?;
    let body: SlotBody = if body.iter().all(u8::is_ascii_whitespace) {
        SlotBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?
    };
    let filename = || body.filename.clone().ok_or_else(|| ApiError::bad("this action needs a filename").param("filename"));
    let action = match q.action.as_deref() {
        Some("save") => SlotAction::Save(filename()?),
        Some("restore") => SlotAction::Restore(filename()?),
        Some("erase") => SlotAction::Erase,
        other => return Err(ApiError::bad(format!("action must be save, restore or erase, found {other:?}")).param("action")),
    };
    let outcome = st.engine.slot(slot, action)?.await.map_err(|_| ApiError::unavailable("the engine has stopped"))??;
    Ok(Json(serde_json::to_value(outcome).map_err(|e| ApiError::server(e.to_string()))?))
}

/// Any model name is accepted (agents send their own), unless the server was started with
/// `--strict-model-names`: then only the served name or the model's path.
pub(super) fn check_model(st: &St, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None | Some("") => Ok(()),
        Some(_) if !st.strict_model_names => Ok(()),
        Some(m) if m == st.model_id || m == st.model_path => Ok(()),
        Some(m) => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model {m:?} does not exist (this server serves {:?})", st.model_id),
        )
        .code("model_not_found")
        .param("model")),
    }
}

/// A completion prompt: a string, an array of token ids, or a one-element array of either.
fn completion_prompt(st: &St, v: Value) -> Result<Vec<u32>, ApiError> {
    let tok = &st.engine.info.tokenizer;
    match v {
        Value::String(s) => {
            let mut ids = if tok.add_bos() { vec![tok.bos_id()] } else { Vec::new() };
            ids.extend(tok.encode(&s, true).map_err(|e| ApiError::server(e.to_string()))?);
            Ok(ids)
        }
        Value::Array(mut a) if a.len() == 1 && (a[0].is_string() || a[0].is_array()) => completion_prompt(st, a.remove(0)),
        Value::Array(a) if a.iter().all(Value::is_number) => {
            let ids = a
                .iter()
                .enumerate()
                .map(|(i, x)| x.as_i64().ok_or_else(|| ApiError::bad(format!("prompt token id {x} (index {i}) is not an integer")).param("prompt")))
                .collect::<Result<Vec<i64>, _>>()?;
            graph::token_ids(&ids, tok.n_vocab()).map_err(|e| ApiError::bad(format!("prompt {e}")).param("prompt"))
        }
        Value::Array(a) if a.len() > 1 => Err(ApiError::bad(format!("one prompt per request, found {}", a.len())).param("prompt")),
        _ => Err(ApiError::bad("prompt must be a string, an array of token ids, or a one-element array of those").param("prompt")),
    }
}

/// The request's sampling, length and stop parameters, checked, around `prompt`.
pub(super) fn prepare(st: &St, c: &Common, prompt: Vec<u32>, thinking: bool) -> Result<GenRequest, ApiError> {
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
        let id = graph::token_ids(&[id], n_vocab).map_err(|e| ApiError::bad(format!("logit_bias: {e}")).param("logit_bias"))?[0];
        logit_bias.push((id, v));
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
    Ok(GenRequest { prompt, params, max_tokens, stop, thinking, ignore_eos: c.ignore_eos })
}

async fn generate(st: St, req: GenRequest, c: &Common, kind: Kind, plan: &ToolPlan) -> Result<Response, ApiError> {
    let handle = st.engine.submit(req)?;
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}-{n}", st.created),
        Kind::Completion => format!("cmpl-{}-{n}", st.created),
    };
    let reply = Reply::new(handle, plan.call_stream(), format!("call_{}_{n}_", st.created));
    let meta = Meta { id, created, model: st.model_id.clone(), kind };
    if c.stream {
        let include_usage = c.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(stream_response(reply, meta, include_usage))
    } else {
        whole_response(reply, meta).await
    }
}
