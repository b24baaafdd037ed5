//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.
//!
//! A request becomes the chat messages and OpenAI-shaped tools the template renders: `system`
//! (a string or text blocks) a system message; a user turn's `tool_result` blocks `tool`
//! messages and its text blocks a user message, in their order; an assistant turn's `thinking`
//! blocks its reasoning, its `text` blocks its content and its `tool_use` blocks its tool calls
//! (`redacted_thinking` is opaque and left out; a result's `is_error` has no place in the
//! template and is not rendered). Text blocks of one message join with "\n", as
//! text parts of an OpenAI message do. `thinking` `{"type": "enabled" | "adaptive"}` turns the
//! template's thinking mode on (`budget_tokens` is not enforced), `"disabled"` or none leaves it
//! off. `tool_choice` auto / any / tool / none map to OpenAI's auto / required / a named
//! function / none (see `reply`). `stop_sequences` are stop strings; `max_tokens` is required.
//!
//! The reply comes back as content blocks (`thinking`, `text`, `tool_use`) in the order
//! generated, whole or as Anthropic's event stream (`message_start`, `ping`, per block
//! `content_block_start` / `_delta` / `_stop`, `message_delta` with the stop reason and usage,
//! `message_stop`; an `error` event when generation fails). Errors are Anthropic error objects.
use std::convert::Infallible;
use std::sync::atomic::Ordering;

use axum::extract::{FromRequest, Request, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chat::{ChatMessage, ChatRequestOptions, ContentPart, FunctionCall, MessageContent, ToolCall};
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::api::{ApiJson, Common, Stop};
use super::error::{AnthropicError, ApiError};
use super::handlers::{check_model, prepare, render};
use super::reply::{Next, Part, Reply, ToolChoice, ToolPlan};
use super::stream::KEEP_ALIVE;
use super::St;
use crate::engine::{FinishReason, Summary};

/// A JSON body whose rejections are Anthropic error objects.
pub struct AnthropicJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<St> for AnthropicJson<T> {
    type Rejection = AnthropicError;

    async fn from_request(req: Request, st: &St) -> Result<Self, AnthropicError> {
        let ApiJson(t) = ApiJson::<T>::from_request(req, st).await?;
        Ok(AnthropicJson(t))
    }
}

// ---- requests ----

/// `POST /v1/messages` (and `count_tokens`, which ignores the generation fields).
#[derive(Deserialize)]
pub struct MessagesBody {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub messages: Vec<InMessage>,
    pub system: Option<TextOrBlocks>,
    #[serde(default)]
    pub stop_sequences: Vec<String>,
    #[serde(default)]
    pub stream: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub tools: Option<Vec<InTool>>,
    pub tool_choice: Option<InToolChoice>,
    pub thinking: Option<InThinking>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum TextOrBlocks {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: TextOrBlocks,
}

/// A content block of a request: the fields of every supported type, checked by type when the
/// request is converted.
#[derive(Deserialize)]
pub struct Block {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub thinking: Option<String>,
    pub id: Option<String>,
    pub name: Option<String>,
    pub input: Option<Value>,
    pub tool_use_id: Option<String>,
    pub content: Option<TextOrBlocks>,
}

/// A client tool (`type` absent or `"custom"`).
#[derive(Deserialize)]
pub struct InTool {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub input_schema: Option<Value>,
}

#[derive(Deserialize)]
pub struct InToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: Option<String>,
}

#[derive(Deserialize)]
pub struct InThinking {
    #[serde(rename = "type")]
    pub kind: String,
}

fn bad(msg: String) -> ApiError {
    ApiError::bad(msg)
}

fn missing(at: &str, field: &str) -> ApiError {
    bad(format!("{at}: missing {field}"))
}

/// Text blocks as text parts (which join with "\n"); any other block type is an error.
fn text_parts(blocks: &[Block], at: &str) -> Result<Vec<ContentPart>, ApiError> {
    blocks
        .iter()
        .enumerate()
        .map(|(j, b)| match (b.kind.as_str(), &b.text) {
            ("text", Some(t)) => Ok(ContentPart { kind: "text".into(), text: Some(t.clone()) }),
            ("text", None) => Err(missing(&format!("{at}[{j}]"), "text")),
            (other, _) => Err(bad(format!("{at}[{j}]: unsupported content block type {other:?} (expected \"text\")"))),
        })
        .collect()
}

fn text_content(c: &TextOrBlocks, at: &str) -> Result<MessageContent, ApiError> {
    Ok(match c {
        TextOrBlocks::Text(s) => MessageContent::Text(s.clone()),
        TextOrBlocks::Blocks(b) => MessageContent::Parts(text_parts(b, at)?),
    })
}

fn message(role: &str, content: Option<MessageContent>) -> ChatMessage {
    ChatMessage { role: role.into(), content, reasoning_content: None, tool_calls: None, tool_call_id: None, name: None }
}

/// A user turn: its tool results as `tool` messages and its text as user messages, in order.
fn user_turn(out: &mut Vec<ChatMessage>, i: usize, content: &TextOrBlocks) -> Result<(), ApiError> {
    let blocks = match content {
        TextOrBlocks::Text(s) => {
            out.push(message("user", Some(MessageContent::Text(s.clone()))));
            return Ok(());
        }
        TextOrBlocks::Blocks(b) if b.is_empty() => return Err(bad(format!("messages[{i}].content is empty"))),
        TextOrBlocks::Blocks(b) => b,
    };
    let mut text = Vec::new();
    let flush = |out: &mut Vec<ChatMessage>, text: &mut Vec<ContentPart>| {
        if !text.is_empty() {
            out.push(message("user", Some(MessageContent::Parts(std::mem::take(text)))));
        }
    };
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        match b.kind.as_str() {
            "text" => text.push(ContentPart { kind: "text".into(), text: Some(b.text.clone().ok_or_else(|| missing(&at, "text"))?) }),
            "tool_result" => {
                flush(out, &mut text);
                let id = b.tool_use_id.clone().ok_or_else(|| missing(&at, "tool_use_id"))?;
                let content = match &b.content {
                    None => MessageContent::Text(String::new()),
                    Some(c) => text_content(c, &format!("{at}.content"))?,
                };
                out.push(ChatMessage { tool_call_id: Some(id), ..message("tool", Some(content)) });
            }
            other => {
                return Err(bad(format!("{at}: unsupported content block type {other:?} in a user message (expected \"text\" or \"tool_result\")")))
            }
        }
    }
    flush(out, &mut text);
    Ok(())
}

/// An assistant turn: reasoning, content and tool calls.
fn assistant_turn(i: usize, content: &TextOrBlocks) -> Result<ChatMessage, ApiError> {
    let blocks = match content {
        TextOrBlocks::Text(s) => return Ok(message("assistant", Some(MessageContent::Text(s.clone())))),
        TextOrBlocks::Blocks(b) => b,
    };
    let (mut reasoning, mut text, mut calls) = (None::<String>, Vec::new(), Vec::new());
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        match b.kind.as_str() {
            "thinking" => reasoning.get_or_insert_with(String::new).push_str(b.thinking.as_deref().ok_or_else(|| missing(&at, "thinking"))?),
            "redacted_thinking" => {}
            "text" => text.push(ContentPart { kind: "text".into(), text: Some(b.text.clone().ok_or_else(|| missing(&at, "text"))?) }),
            "tool_use" => {
                let input = match &b.input {
                    Some(v @ Value::Object(_)) => v.clone(),
                    Some(other) => return Err(bad(format!("{at}.input must be an object, found {other}"))),
                    None => return Err(missing(&at, "input")),
                };
                calls.push(ToolCall {
                    id: Some(b.id.clone().ok_or_else(|| missing(&at, "id"))?),
                    kind: Some("function".into()),
                    function: FunctionCall { name: b.name.clone().ok_or_else(|| missing(&at, "name"))?, arguments: input },
                });
            }
            other => {
                return Err(bad(format!(
                    "{at}: unsupported content block type {other:?} in an assistant message (expected \"text\", \"thinking\" or \"tool_use\")"
                )))
            }
        }
    }
    Ok(ChatMessage {
        reasoning_content: reasoning,
        tool_calls: (!calls.is_empty()).then_some(calls),
        ..message("assistant", (!text.is_empty()).then_some(MessageContent::Parts(text)))
    })
}

/// An Anthropic tool as the OpenAI tool the template renders.
fn openai_tool(i: usize, t: &InTool) -> Result<Value, ApiError> {
    if let Some(kind) = t.kind.as_deref().filter(|k| *k != "custom") {
        return Err(bad(format!("tools[{i}]: tool type {kind:?} is not supported (only client tools, type \"custom\")")));
    }
    let mut f = Map::new();
    f.insert("name".into(), Value::String(t.name.clone()));
    if let Some(d) = &t.description {
        f.insert("description".into(), Value::String(d.clone()));
    }
    if let Some(s) = &t.input_schema {
        f.insert("parameters".into(), s.clone());
    }
    let mut tool = Map::new();
    tool.insert("type".into(), Value::String("function".into()));
    tool.insert("function".into(), Value::Object(f));
    Ok(Value::Object(tool))
}

/// What the template renders for a request: messages, tools, tool choice, thinking.
struct Conversation {
    messages: Vec<ChatMessage>,
    tools: Option<Vec<Value>>,
    choice: ToolChoice,
    thinking: bool,
}

impl MessagesBody {
    fn conversation(&self) -> Result<Conversation, ApiError> {
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(message("system", Some(text_content(system, "system")?)));
        }
        if self.messages.is_empty() {
            return Err(bad("messages must not be empty".into()).param("messages"));
        }
        for (i, m) in self.messages.iter().enumerate() {
            match m.role.as_str() {
                "user" => user_turn(&mut messages, i, &m.content)?,
                "assistant" => messages.push(assistant_turn(i, &m.content)?),
                other => return Err(bad(format!("messages[{i}].role must be \"user\" or \"assistant\", found {other:?}"))),
            }
        }
        if self.messages.last().is_some_and(|m| m.role == "assistant") {
            return Err(bad(
                "the last message is an assistant message: continuing a given assistant turn (prefill) is not supported".into(),
            )
            .param("messages"));
        }
        let tools = self.tools.as_ref().map(|t| t.iter().enumerate().map(|(i, t)| openai_tool(i, t)).collect::<Result<Vec<_>, _>>()).transpose()?;
        let choice = match &self.tool_choice {
            None => ToolChoice::Auto,
            Some(c) => match (c.kind.as_str(), &c.name) {
                ("auto", _) => ToolChoice::Auto,
                ("any", _) => ToolChoice::Required,
                ("none", _) => ToolChoice::None,
                ("tool", Some(name)) => ToolChoice::Function(name.clone()),
                ("tool", None) => return Err(bad("tool_choice of type \"tool\" needs a name".into()).param("tool_choice")),
                (other, _) => {
                    return Err(bad(format!("tool_choice type must be auto, any, tool or none, found {other:?}")).param("tool_choice"))
                }
            },
        };
        let thinking = match self.thinking.as_ref().map(|t| t.kind.as_str()) {
            None | Some("disabled") => false,
            Some("enabled" | "adaptive") => true,
            Some(other) => {
                return Err(bad(format!("thinking type must be enabled, adaptive or disabled, found {other:?}")).param("thinking"))
            }
        };
        Ok(Conversation { messages, tools, choice, thinking })
    }
}

/// The request rendered and tokenized, with its tool plan.
async fn prompt(st: &St, b: &MessagesBody) -> Result<(Vec<u32>, ToolPlan, bool), ApiError> {
    check_model(st, b.model.as_deref())?;
    let c = b.conversation()?;
    let plan = ToolPlan::new(c.tools, c.choice, c.thinking)?;
    let options = ChatRequestOptions { thinking: Some(Value::Bool(c.thinking)), ..ChatRequestOptions::default() };
    let vars = options.resolve(false, true).map_err(|e| bad(e.to_string()))?;
    let (ids, plan) = render(st, c.messages, plan, vars).await?;
    Ok((ids, plan, c.thinking))
}

pub async fn count_tokens(State(st): State<St>, AnthropicJson(b): AnthropicJson<MessagesBody>) -> Result<Json<TokenCount>, AnthropicError> {
    let (ids, _, _) = prompt(&st, &b).await?;
    Ok(Json(TokenCount { input_tokens: ids.len() }))
}

pub async fn messages(State(st): State<St>, AnthropicJson(b): AnthropicJson<MessagesBody>) -> Result<Response, AnthropicError> {
    let Some(max_tokens) = b.max_tokens else { return Err(bad("max_tokens is required".into()).param("max_tokens").into()) };
    let (ids, plan, thinking) = prompt(&st, &b).await?;
    let common = Common {
        model: b.model.clone(),
        stream: b.stream,
        max_tokens: Some(max_tokens),
        temperature: b.temperature,
        top_p: b.top_p,
        top_k: b.top_k,
        stop: Some(Stop::Many(b.stop_sequences.clone())),
        ..Common::default()
    };
    let req = prepare(&st, &common, ids, thinking)?;
    let input_tokens = req.prompt.len();
    let handle = st.engine.submit(req).map_err(ApiError::from)?;
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let reply = Reply::new(handle, plan.call_stream(), format!("toolu_{}_{n}_", st.created));
    let meta = MessageMeta { id: format!("msg_{}_{n}", st.created), model: st.model_id.clone(), input_tokens };
    if b.stream {
        Ok(stream_message(reply, meta))
    } else {
        Ok(Json(whole_message(reply, meta).await?).into_response())
    }
}

// ---- responses ----

#[derive(Serialize)]
pub struct TokenCount {
    pub input_tokens: usize,
}

/// A content block of a reply.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutBlock {
    Thinking { thinking: String, signature: String },
    Text { text: String },
    ToolUse { id: String, name: String, input: Value },
}

#[derive(Serialize)]
pub struct OutUsage {
    pub input_tokens: usize,
    pub output_tokens: usize,
}

#[derive(Serialize)]
pub struct MessageObject {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub model: String,
    pub content: Vec<OutBlock>,
    pub stop_reason: Option<&'static str>,
    pub stop_sequence: Option<String>,
    pub usage: OutUsage,
}

/// What every event of one reply repeats.
pub struct MessageMeta {
    pub id: String,
    pub model: String,
    pub input_tokens: usize,
}

impl MessageMeta {
    fn object(&self, content: Vec<OutBlock>, end: Option<&Summary>, made_calls: bool) -> MessageObject {
        MessageObject {
            id: self.id.clone(),
            kind: "message",
            role: "assistant",
            model: self.model.clone(),
            content,
            stop_reason: end.map(|s| stop_reason(s, made_calls)),
            stop_sequence: end.and_then(|s| s.stop_sequence.clone()),
            usage: OutUsage { input_tokens: self.input_tokens, output_tokens: end.map_or(0, |s| s.completion_tokens) },
        }
    }
}

/// `tool_use` when a reply that made calls stopped by itself; `stop_sequence` when a stop
/// string ended it; `end_turn` at the end of the turn; `max_tokens` at the length limit.
fn stop_reason(s: &Summary, made_calls: bool) -> &'static str {
    match (s.finish, made_calls, &s.stop_sequence) {
        (FinishReason::Length, _, _) => "max_tokens",
        (_, true, _) => "tool_use",
        (_, false, Some(_)) => "stop_sequence",
        _ => "end_turn",
    }
}

impl Part {
    /// Adds the part to a list of blocks: text to a block of its kind that is open (the last one).
    fn add_to(self, blocks: &mut Vec<OutBlock>) {
        match (self, blocks.last_mut()) {
            (Part::Reasoning(t), Some(OutBlock::Thinking { thinking, .. })) => thinking.push_str(&t),
            (Part::Reasoning(t), _) => blocks.push(OutBlock::Thinking { thinking: t, signature: String::new() }),
            (Part::Content(t), Some(OutBlock::Text { text })) => text.push_str(&t),
            (Part::Content(t), _) => blocks.push(OutBlock::Text { text: t }),
            (Part::Calls(calls), _) => blocks.extend(
                calls.into_iter().map(|c| OutBlock::ToolUse { id: c.id, name: c.call.name, input: Value::Object(c.call.arguments) }),
            ),
        }
    }
}

/// Collects the reply into one message.
pub async fn whole_message(mut reply: Reply, meta: MessageMeta) -> Result<MessageObject, ApiError> {
    let mut blocks = Vec::new();
    loop {
        match reply.next().await? {
            Next::Part(p) => p.add_to(&mut blocks),
            Next::Done(s) => return Ok(meta.object(blocks, Some(&s), reply.made_calls())),
        }
    }
}

// ---- the event stream ----

#[derive(Serialize)]
#[serde(tag = "type")]
enum BlockDelta {
    #[serde(rename = "text_delta")]
    Text { text: String },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: String },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: String },
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<String>,
}

#[derive(Serialize)]
struct DeltaUsage {
    output_tokens: usize,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart { message: MessageObject },
    Ping,
    ContentBlockStart { index: usize, content_block: OutBlock },
    ContentBlockDelta { index: usize, delta: BlockDelta },
    ContentBlockStop { index: usize },
    MessageDelta { delta: StopDelta, usage: DeltaUsage },
    MessageStop,
}

impl StreamEvent {
    fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart { .. } => "message_start",
            StreamEvent::Ping => "ping",
            StreamEvent::ContentBlockStart { .. } => "content_block_start",
            StreamEvent::ContentBlockDelta { .. } => "content_block_delta",
            StreamEvent::ContentBlockStop { .. } => "content_block_stop",
            StreamEvent::MessageDelta { .. } => "message_delta",
            StreamEvent::MessageStop => "message_stop",
        }
    }

    fn sse(&self) -> SseEvent {
        match serde_json::to_string(self) {
            Ok(s) => SseEvent::default().event(self.name()).data(s),
            Err(e) => error_event(&ApiError::server(format!("encoding an event: {e}"))),
        }
    }
}

fn error_event(e: &ApiError) -> SseEvent {
    SseEvent::default().event("error").data(serde_json::to_string(&e.anthropic_body()).unwrap_or_else(|_| e.message.clone()))
}

#[derive(Clone, Copy, PartialEq)]
enum Open {
    Thinking,
    Text,
}

/// The blocks of a streamed reply: which one is open, and the next index.
#[derive(Default)]
struct Blocks {
    open: Option<(usize, Open)>,
    next: usize,
}

impl Blocks {
    fn close(&mut self, out: &mut Vec<StreamEvent>) {
        if let Some((index, _)) = self.open.take() {
            out.push(StreamEvent::ContentBlockStop { index });
        }
    }

    fn start(&mut self, out: &mut Vec<StreamEvent>, content_block: OutBlock) -> usize {
        self.close(out);
        let index = self.next;
        self.next += 1;
        out.push(StreamEvent::ContentBlockStart { index, content_block });
        index
    }

    /// Text of a kind: into the open block of that kind, or a new one.
    fn text(&mut self, out: &mut Vec<StreamEvent>, kind: Open, text: String) {
        let index = match self.open {
            Some((index, k)) if k == kind => index,
            _ => {
                let block = match kind {
                    Open::Thinking => OutBlock::Thinking { thinking: String::new(), signature: String::new() },
                    Open::Text => OutBlock::Text { text: String::new() },
                };
                let index = self.start(out, block);
                self.open = Some((index, kind));
                index
            }
        };
        let delta = match kind {
            Open::Thinking => BlockDelta::Thinking { thinking: text },
            Open::Text => BlockDelta::Text { text },
        };
        out.push(StreamEvent::ContentBlockDelta { index, delta });
    }

    fn part(&mut self, p: Part) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        match p {
            Part::Reasoning(t) => self.text(&mut out, Open::Thinking, t),
            Part::Content(t) => self.text(&mut out, Open::Text, t),
            Part::Calls(calls) => {
                for c in calls {
                    let partial_json = c.arguments_json();
                    let block = OutBlock::ToolUse { id: c.id, name: c.call.name, input: Value::Object(Map::new()) };
                    let index = self.start(&mut out, block);
                    out.push(StreamEvent::ContentBlockDelta { index, delta: BlockDelta::InputJson { partial_json } });
                    out.push(StreamEvent::ContentBlockStop { index });
                }
            }
        }
        out
    }
}

/// Streams the reply as Anthropic's events, with a `ping` after [`KEEP_ALIVE`] of silence.
/// Dropping the stream (the client went away) drops the reply, which cancels the request.
pub fn stream_message(reply: Reply, meta: MessageMeta) -> Response {
    enum Phase {
        Start,
        Run,
        End,
    }
    let state = (reply, meta, Blocks::default(), Phase::Start);
    let stream = futures_util::stream::unfold(state, |(mut reply, meta, mut blocks, phase)| async move {
        match phase {
            Phase::Start => {
                let start = StreamEvent::MessageStart { message: meta.object(Vec::new(), None, false) };
                Some((vec![start.sse(), StreamEvent::Ping.sse()], (reply, meta, blocks, Phase::Run)))
            }
            Phase::Run => match reply.next().await {
                Ok(Next::Part(p)) => {
                    let evs = blocks.part(p).iter().map(StreamEvent::sse).collect();
                    Some((evs, (reply, meta, blocks, Phase::Run)))
                }
                Ok(Next::Done(s)) => {
                    let mut evs = Vec::new();
                    blocks.close(&mut evs);
                    let delta = StopDelta { stop_reason: stop_reason(&s, reply.made_calls()), stop_sequence: s.stop_sequence.clone() };
                    evs.push(StreamEvent::MessageDelta { delta, usage: DeltaUsage { output_tokens: s.completion_tokens } });
                    evs.push(StreamEvent::MessageStop);
                    Some((evs.iter().map(StreamEvent::sse).collect(), (reply, meta, blocks, Phase::End)))
                }
                Err(e) => Some((vec![error_event(&e)], (reply, meta, blocks, Phase::End))),
            },
            Phase::End => None,
        }
    });
    let flat = stream.flat_map(|evs: Vec<SseEvent>| futures_util::stream::iter(evs.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(flat).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).event(StreamEvent::Ping.sse())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::reply::tests::{handle, weather_tools};
    use serde_json::json;

    fn body(v: Value) -> MessagesBody {
        serde_json::from_value(v).expect("body")
    }

    fn as_json(messages: &[ChatMessage]) -> Value {
        Value::Array(
            messages
                .iter()
                .map(|m| {
                    let content = match &m.content {
                        None => Value::Null,
                        Some(MessageContent::Text(t)) => json!(t),
                        Some(MessageContent::Parts(p)) => json!(p.iter().map(|p| p.text.clone()).collect::<Vec<_>>()),
                    };
                    let calls: Option<Vec<Value>> = m.tool_calls.as_ref().map(|c| {
                        c.iter().map(|c| json!({"id": c.id, "name": c.function.name, "arguments": c.function.arguments})).collect()
                    });
                    json!({"role": m.role, "content": content, "reasoning": m.reasoning_content, "tool_calls": calls, "tool_call_id": m.tool_call_id})
                })
                .collect(),
        )
    }

    #[test]
    fn a_conversation_becomes_chat_messages() {
        let b = body(json!({
            "model": "claude-sonnet-4-5", "max_tokens": 10,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "Use tools."}],
            "tools": [{"name": "get_weather", "description": "Weather.", "input_schema": {"type": "object"}}],
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Call it.", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "xx"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "-3 C"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "snow", "is_error": true},
                    {"type": "text", "text": "And tomorrow?"}]},
            ]
        }));
        let c = b.conversation().expect("converts");
        assert!(c.thinking);
        assert_eq!(c.choice, ToolChoice::Auto);
        assert_eq!(
            c.tools,
            Some(vec![json!({"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {"type": "object"}}})])
        );
        let n = Value::Null;
        assert_eq!(
            as_json(&c.messages),
            json!([
                {"role": "system", "content": ["Be brief.", "Use tools."], "reasoning": n, "tool_calls": n, "tool_call_id": n},
                {"role": "user", "content": "Weather in Oslo?", "reasoning": n, "tool_calls": n, "tool_call_id": n},
                {"role": "assistant", "content": ["Checking."], "reasoning": "Call it.",
                 "tool_calls": [{"id": "toolu_1", "name": "get_weather", "arguments": {"city": "Oslo"}}], "tool_call_id": n},
                {"role": "tool", "content": ["-3 C"], "reasoning": n, "tool_calls": n, "tool_call_id": "toolu_1"},
                {"role": "tool", "content": "snow", "reasoning": n, "tool_calls": n, "tool_call_id": "toolu_2"},
                {"role": "user", "content": ["And tomorrow?"], "reasoning": n, "tool_calls": n, "tool_call_id": n},
            ])
        );
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let user = json!({"role": "user", "content": "hi"});
        let cases = [
            (json!({"messages": []}), "messages must not be empty"),
            (json!({"messages": [{"role": "system", "content": "x"}]}), "messages[0].role must be \"user\" or \"assistant\", found \"system\""),
            (json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}), "messages[0].content[0]: unsupported content block type \"image\""),
            (json!({"messages": [{"role": "user", "content": []}]}), "messages[0].content is empty"),
            (json!({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}), "messages[0].content[0]: missing tool_use_id"),
            (json!({"messages": [user, {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": [1]}]}, user]}),
             "messages[1].content[0].input must be an object"),
            (json!({"messages": [user, {"role": "assistant", "content": "Sure"}]}), "prefill"),
            (json!({"messages": [user], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}), "tools[0]: tool type \"web_search_20250305\" is not supported"),
            (json!({"messages": [user], "tool_choice": {"type": "tool"}}), "needs a name"),
            (json!({"messages": [user], "tool_choice": {"type": "sometimes"}}), "tool_choice type must be"),
            (json!({"messages": [user], "thinking": {"type": "deep"}}), "thinking type must be"),
            (json!({"messages": [user], "system": [{"type": "image"}]}), "system[0]: unsupported content block type \"image\""),
        ];
        for (v, want) in cases {
            let e = body(v).conversation().err().expect("an error");
            assert!(e.message.contains(want), "{want}: {}", e.message);
            assert_eq!(e.status, 400);
        }
    }

    const CALL: &str = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
        <｜DSML｜parameter name=\"city\" string=\"true\">Oslo</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

    fn reply(texts: &[(bool, &str)], finish: FinishReason, stop: Option<&str>) -> Reply {
        let plan = ToolPlan::new(Some(weather_tools()), ToolChoice::Auto, true).expect("plan");
        Reply::new(handle(texts, finish, stop), plan.call_stream(), "toolu_9_".into())
    }

    fn meta() -> MessageMeta {
        MessageMeta { id: "msg_1".into(), model: "tiny".into(), input_tokens: 7 }
    }

    #[tokio::test]
    async fn a_whole_reply_is_content_blocks_with_a_stop_reason() {
        let texts = [(true, "Hmm."), (false, "Let me look."), (false, CALL)];
        let m = whole_message(reply(&texts, FinishReason::Stop, None), meta()).await.expect("message");
        assert_eq!(
            serde_json::to_value(&m).expect("json"),
            json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "tiny",
                   "content": [{"type": "thinking", "thinking": "Hmm.", "signature": ""},
                               {"type": "text", "text": "Let me look."},
                               {"type": "tool_use", "id": "toolu_9_0", "name": "get_weather", "input": {"city": "Oslo"}}],
                   "stop_reason": "tool_use", "stop_sequence": null, "usage": {"input_tokens": 7, "output_tokens": 3}})
        );
        let m = whole_message(reply(&[(false, "a")], FinishReason::Stop, Some("STOP")), meta()).await.expect("message");
        assert_eq!((m.stop_reason, m.stop_sequence.as_deref()), (Some("stop_sequence"), Some("STOP")));
        let m = whole_message(reply(&[(false, "a")], FinishReason::Length, None), meta()).await.expect("message");
        assert_eq!(m.stop_reason, Some("max_tokens"));
        let m = whole_message(reply(&[(false, "a")], FinishReason::Stop, None), meta()).await.expect("message");
        assert_eq!(m.stop_reason, Some("end_turn"));
        let e = whole_message(reply(&[(false, "a")], FinishReason::Cancelled, None), meta()).await.err().expect("cancelled");
        let v = serde_json::to_value(e.anthropic_body()).expect("json");
        assert_eq!(v, json!({"type": "error", "error": {"type": "overloaded_error", "message": e.message}}));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_gets_pings() {
        let (_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let r = stream_message(Reply::new(crate::engine::Handle { events }, None, "t".into()), meta());
        let mut body = r.into_body().into_data_stream();
        let mut next = async || String::from_utf8(body.next().await.expect("a frame").expect("bytes").to_vec()).expect("utf-8");
        assert!(next().await.starts_with("event: message_start\n"));
        assert!(next().await.starts_with("event: ping\n"));
        let t0 = tokio::time::Instant::now();
        assert_eq!(next().await, "event: ping\ndata: {\"type\":\"ping\"}\n\n");
        assert_eq!(t0.elapsed(), KEEP_ALIVE);
    }

    #[tokio::test]
    async fn a_streamed_reply_is_anthropics_event_sequence() {
        let texts = [(true, "Hm"), (true, "m."), (false, "Let me look."), (false, CALL)];
        let r = stream_message(reply(&texts, FinishReason::Stop, None), meta());
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX).await.expect("body");
        let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
        let events: Vec<(String, Value)> = text
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let name = e.lines().find_map(|l| l.strip_prefix("event: ")).expect("event name").to_string();
                let data: Value = serde_json::from_str(e.lines().find_map(|l| l.strip_prefix("data: ")).expect("data")).expect("json");
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect();
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start", "ping",
                "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                "content_block_start", "content_block_delta", "content_block_stop",
                "content_block_start", "content_block_delta", "content_block_stop",
                "message_delta", "message_stop",
            ]
        );
        assert_eq!(events[0].1["message"]["usage"], json!({"input_tokens": 7, "output_tokens": 0}));
        assert_eq!(events[0].1["message"]["stop_reason"], Value::Null);
        assert_eq!(events[2].1["content_block"], json!({"type": "thinking", "thinking": "", "signature": ""}));
        assert_eq!(events[4].1["delta"], json!({"type": "thinking_delta", "thinking": "m."}));
        assert_eq!(events[7].1, json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Let me look."}}));
        assert_eq!(events[9].1["content_block"], json!({"type": "tool_use", "id": "toolu_9_0", "name": "get_weather", "input": {}}));
        assert_eq!(events[10].1["delta"], json!({"type": "input_json_delta", "partial_json": "{\"city\":\"Oslo\"}"}));
        assert_eq!(events[12].1["delta"], json!({"stop_reason": "tool_use", "stop_sequence": null}));
        assert_eq!(events[12].1["usage"], json!({"output_tokens": 4}));
    }
}
