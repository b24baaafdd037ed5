//! The request and response bodies of the API (OpenAI's shapes; llama-server's for
//! `/tokenize` and `/detokenize`), and the JSON body extractor.
use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use chat::{ChatMessage, ChatRequestOptions};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::St;
use crate::engine::{Summary, Timings};

/// A JSON request body. Unlike axum's `Json` it accepts any content type (`curl -d` sends
/// form encoding, as llama-server allows) and answers OpenAI error objects: 413 beyond the
/// `DefaultBodyLimit`, 400 for JSON that does not parse into `T`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<St> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &St) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, st).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(st.limits.max_body)
            } else {
                ApiError::bad(format!("reading the request body: {}", e.body_text()))
            }
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
    }
}

// ---- requests ----

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Parameters common to both completion endpoints (and what a Messages request maps to).
#[derive(Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    #[serde(alias = "repeat_penalty")]
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    pub logit_bias: Option<HashMap<String, f32>>,
    /// llama-server's extension: end-of-generation tokens do not end the reply (benchmarks
    /// of fixed lengths); max_tokens, stop strings and the context still do.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Deserialize)]
pub struct ChatBody {
    pub messages: Vec<ChatMessage>,
    pub tools: Option<Vec<Value>>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name": ...}}`.
    pub tool_choice: Option<Value>,
    #[serde(flatten)]
    pub common: Common,
    #[serde(flatten)]
    pub chat: ChatRequestOptions,
}

/// `POST /v1/completions`: the prompt is a string, an array of token ids, or a one-element
/// array of either.
#[derive(Deserialize)]
pub struct CompletionBody {
    pub prompt: Value,
    #[serde(flatten)]
    pub common: Common,
}

/// `POST /tokenize`.
#[derive(Deserialize)]
pub struct TokenizeBody {
    pub content: String,
    #[serde(default)]
    pub add_special: bool,
    #[serde(default = "yes")]
    pub parse_special: bool,
    #[serde(default)]
    pub with_pieces: bool,
}

fn yes() -> bool {
    true
}

/// `POST /detokenize`.
#[derive(Deserialize)]
pub struct DetokenizeBody {
    pub tokens: Vec<i64>,
}

/// `POST /slots/{id}?action=save|restore` (llama-server's shape; erase needs no body).
#[derive(Deserialize, Default)]
pub struct SlotBody {
    pub filename: Option<String>,
}

/// The query of `POST /slots/{id}`.
#[derive(Deserialize)]
pub struct SlotQuery {
    pub action: Option<String>,
}

// ---- responses ----

#[derive(Serialize)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Serialize, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// Of the prompt tokens, those restored from the prompt cache.
#[derive(Serialize, Clone, Copy)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl From<&Summary> for Usage {
    fn from(s: &Summary) -> Usage {
        Usage {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            total_tokens: s.prompt_tokens + s.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: s.cached_tokens },
        }
    }
}

/// A completion, a streamed chunk of one, or the usage chunk that ends a stream.
#[derive(Serialize)]
pub struct CompletionObject<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

/// A choice of `/v1/chat/completions` without streaming.
#[derive(Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

/// The reply: `content` is null only when it is empty and there are tool calls.
#[derive(Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallObject>>,
}

/// A tool call of a reply (`arguments` is a JSON text).
#[derive(Serialize)]
pub struct ToolCallObject {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionObject,
}

#[derive(Serialize)]
pub struct FunctionObject {
    pub name: String,
    pub arguments: String,
}

/// A tool call in a stream chunk: each call comes whole, in one chunk.
#[derive(Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(flatten)]
    pub call: ToolCallObject,
}

/// A choice of a `/v1/chat/completions` stream chunk.
#[derive(Serialize)]
pub struct ChatDeltaChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to the message (`{}` for the last one).
#[derive(Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A choice of `/v1/completions`, streamed or not.
#[derive(Serialize)]
pub struct TextChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Piece {
    /// The token's bytes as text, when they are UTF-8.
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Serialize)]
pub struct TokenPiece {
    pub id: u32,
    pub piece: Piece,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Tokens {
    Ids(Vec<u32>),
    WithPieces(Vec<TokenPiece>),
}

#[derive(Serialize)]
pub struct TokenizeResponse {
    pub tokens: Tokens,
}

#[derive(Serialize)]
pub struct DetokenizeResponse {
    pub content: String,
}
