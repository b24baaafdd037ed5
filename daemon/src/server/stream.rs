//! A reply turned into one OpenAI completion object, or into server-sent events (axum's `Sse`):
//! chunks as text arrives (a tool call whole, in one chunk, once its block has closed), a last
//! chunk with the finish reason and timings, optionally a usage chunk, then `[DONE]`. A stream
//! silent for [`KEEP_ALIVE`] (a long prompt, a tool call being written) gets an SSE comment.
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt as _;
use serde::Serialize;

use super::api::{
    AssistantMessage, ChatChoice, ChatDeltaChoice, CompletionObject, Delta, FunctionObject, TextChoice, ToolCallDelta, ToolCallObject, Usage,
};
use super::error::ApiError;
use super::reply::{Call, Next, Part, Reply};
use crate::engine::{FinishReason, Summary};

/// The longest silence of a stream: then a keep-alive goes out (a comment; Anthropic's `ping`).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Chat,
    Completion,
}

/// What every object of one response repeats.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
}

/// OpenAI's finish reason: `tool_calls` when a reply that made calls stopped by itself.
pub fn finish_reason(s: &Summary, made_calls: bool) -> &'static str {
    if made_calls && s.finish == FinishReason::Stop {
        "tool_calls"
    } else {
        s.finish.as_str()
    }
}

impl Call {
    fn object(&self) -> ToolCallObject {
        ToolCallObject {
            id: self.id.clone(),
            kind: "function",
            function: FunctionObject { name: self.call.name.clone(), arguments: self.arguments_json() },
        }
    }
}

impl Meta {
    fn object<C>(&self, chunk: bool, choices: Vec<C>) -> CompletionObject<C> {
        let object = match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        };
        CompletionObject { id: self.id.clone(), object, created: self.created, model: self.model.clone(), choices, usage: None, timings: None }
    }

    fn chat_chunk(&self, delta: Delta, finish: Option<&'static str>) -> CompletionObject<ChatDeltaChoice> {
        self.object(true, vec![ChatDeltaChoice { index: 0, delta, logprobs: None, finish_reason: finish }])
    }

    /// The stream chunks of one part of the reply.
    fn part(&self, p: Part) -> Vec<SseEvent> {
        match (self.kind, p) {
            (Kind::Chat, Part::Reasoning(t)) => vec![event(&self.chat_chunk(Delta { reasoning_content: Some(t), ..Delta::default() }, None))],
            (Kind::Chat, Part::Content(t)) => vec![event(&self.chat_chunk(Delta { content: Some(t), ..Delta::default() }, None))],
            (Kind::Chat, Part::Calls(calls)) => calls
                .iter()
                .map(|c| {
                    let delta = Delta { tool_calls: Some(vec![ToolCallDelta { index: c.index, call: c.object() }]), ..Delta::default() };
                    event(&self.chat_chunk(delta, None))
                })
                .collect(),
            // a completion has neither reasoning nor tool calls
            (Kind::Completion, Part::Content(text) | Part::Reasoning(text)) => {
                vec![event(&self.object(true, vec![TextChoice { index: 0, text, logprobs: None, finish_reason: None }]))]
            }
            (Kind::Completion, Part::Calls(_)) => Vec::new(),
        }
    }

    /// The chunk that ends a stream: the finish reason and the timings.
    fn last(&self, s: &Summary, made_calls: bool) -> SseEvent {
        let finish = Some(finish_reason(s, made_calls));
        match self.kind {
            Kind::Chat => {
                let mut o = self.chat_chunk(Delta::default(), finish);
                o.timings = Some(s.timings);
                event(&o)
            }
            Kind::Completion => {
                let mut o = self.object(true, vec![TextChoice { index: 0, text: String::new(), logprobs: None, finish_reason: finish }]);
                o.timings = Some(s.timings);
                event(&o)
            }
        }
    }
}

fn event<T: Serialize>(v: &T) -> SseEvent {
    match serde_json::to_string(v) {
        Ok(s) => SseEvent::default().data(s),
        Err(e) => error_event(&ApiError::server(format!("encoding a chunk: {e}"))),
    }
}

fn error_event(e: &ApiError) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(&e.body()).unwrap_or_else(|_| e.message.clone()))
}

/// Collects the reply into one completion object.
pub async fn whole_response(mut reply: Reply, meta: Meta) -> Result<Response, ApiError> {
    let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
    let s = loop {
        match reply.next().await? {
            Next::Part(Part::Reasoning(t)) => reasoning.push_str(&t),
            Next::Part(Part::Content(t)) => content.push_str(&t),
            Next::Part(Part::Calls(c)) => calls.extend(c),
            Next::Done(s) => break s,
        }
    };
    let finish = finish_reason(&s, !calls.is_empty());
    let (usage, timings) = (Some(Usage::from(&s)), Some(s.timings));
    Ok(match meta.kind {
        Kind::Chat => {
            let message = AssistantMessage {
                role: "assistant",
                content: (!content.is_empty() || calls.is_empty()).then_some(content),
                reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
                tool_calls: (!calls.is_empty()).then(|| calls.iter().map(Call::object).collect()),
            };
            let o = CompletionObject { usage, timings, ..meta.object(false, vec![ChatChoice { index: 0, message, logprobs: None, finish_reason: finish }]) };
            Json(o).into_response()
        }
        Kind::Completion => {
            let choice = TextChoice { index: 0, text: content, logprobs: None, finish_reason: Some(finish) };
            Json(CompletionObject { usage, timings, ..meta.object(false, vec![choice]) }).into_response()
        }
    })
}

/// Streams the reply as SSE. Dropping the stream (the client went away) drops the reply and its
/// handle, which cancels the request.
pub fn stream_response(reply: Reply, meta: Meta, include_usage: bool) -> Response {
    enum Phase {
        Start,
        Run,
        End,
    }
    let stream = futures_util::stream::unfold((reply, meta, Phase::Start), move |(mut reply, meta, phase)| async move {
        match phase {
            Phase::Start if meta.kind == Kind::Chat => {
                let delta = Delta { role: Some("assistant"), content: Some(String::new()), ..Delta::default() };
                let first = event(&meta.chat_chunk(delta, None));
                Some((vec![first], (reply, meta, Phase::Run)))
            }
            Phase::Start | Phase::Run => {
                let mut out = match reply.next().await {
                    Ok(Next::Part(p)) => return Some((meta.part(p), (reply, meta, Phase::Run))),
                    Ok(Next::Done(s)) => {
                        let mut evs = vec![meta.last(&s, reply.made_calls())];
                        if include_usage {
                            let mut u = meta.object::<ChatDeltaChoice>(true, Vec::new());
                            u.usage = Some(Usage::from(&s));
                            evs.push(event(&u));
                        }
                        evs
                    }
                    Err(e) => vec![error_event(&e)],
                };
                out.push(SseEvent::default().data("[DONE]"));
                Some((out, (reply, meta, Phase::End)))
            }
            Phase::End => None,
        }
    });
    let flat = stream.flat_map(|evs| futures_util::stream::iter(evs.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(flat).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::reply::tests::{handle, weather_tools};
    use crate::server::reply::{ToolChoice, ToolPlan};
    use serde_json::{json, Value};

    const CALL: &str = "Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
        <｜DSML｜parameter name=\"city\" string=\"true\">Zürich \"centre\"</｜DSML｜parameter>\n\
        </｜DSML｜invoke>\n<｜DSML｜invoke name=\"get_weather\">\n\
        <｜DSML｜parameter name=\"city\" string=\"true\">Bern</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

    fn meta() -> Meta {
        Meta { id: "chatcmpl-1".into(), created: 5, model: "m".into(), kind: Kind::Chat }
    }

    fn reply(texts: &[(bool, &str)], finish: FinishReason) -> Reply {
        let plan = ToolPlan::new(Some(weather_tools()), ToolChoice::Auto, false).expect("plan");
        Reply::new(handle(texts, finish, None), plan.call_stream(), "call_1_".into())
    }

    async fn body(r: Response) -> String {
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX).await.expect("body");
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    /// The `data:` payloads of an SSE body.
    pub(crate) fn data(body: &str) -> Vec<String> {
        body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }

    fn chunked(text: &str) -> Vec<(bool, &str)> {
        let mut cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).step_by(4).collect();
        cuts.push(text.len());
        cuts.windows(2).map(|w| (false, &text[w[0]..w[1]])).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_gets_keep_alive_comments() {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let r = stream_response(Reply::new(crate::engine::Handle { events }, None, "c".into()), meta(), false);
        let mut body = r.into_body().into_data_stream();
        let mut next = async || String::from_utf8(body.next().await.expect("a frame").expect("bytes").to_vec()).expect("utf-8");
        assert!(next().await.starts_with("data: "), "the role chunk");
        // nothing from the engine: (paused) time runs on to the keep-alive
        let t0 = tokio::time::Instant::now();
        assert_eq!(next().await, ":\n\n");
        assert_eq!(t0.elapsed(), KEEP_ALIVE);
        tx.send(crate::engine::Event::Text { reasoning: false, text: "hi".into() }).expect("send");
        assert!(next().await.contains("\"content\":\"hi\""));
    }

    #[tokio::test]
    async fn tool_calls_in_a_whole_reply() {
        let v: Value = serde_json::from_str(&body(whole_response(reply(&chunked(CALL), FinishReason::Stop), meta()).await.expect("ok")).await)
            .expect("json");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "Sure.");
        assert_eq!(
            choice["message"]["tool_calls"],
            json!([
                {"id": "call_1_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Zürich \\\"centre\\\"\"}"}},
                {"id": "call_1_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Bern\"}"}},
            ])
        );
        // no content: null; the length limit inside a block: text and "length"
        let only_call = CALL.strip_prefix("Sure.").expect("prefix");
        let v: Value = serde_json::from_str(&body(whole_response(reply(&[(false, only_call)], FinishReason::Stop), meta()).await.expect("ok")).await)
            .expect("json");
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
        let cut = &CALL[..CALL.len() - 5];
        let v: Value = serde_json::from_str(&body(whole_response(reply(&[(false, cut)], FinishReason::Length), meta()).await.expect("ok")).await)
            .expect("json");
        assert_eq!(v["choices"][0]["message"]["content"], cut);
        assert_eq!(v["choices"][0]["message"].get("tool_calls"), None);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }

    #[tokio::test]
    async fn tool_calls_stream_as_deltas_and_add_up_to_the_whole_reply() {
        let chunks = data(&body(stream_response(reply(&chunked(CALL), FinishReason::Stop), meta(), true)).await);
        assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
        let (mut content, mut calls, mut finish) = (String::new(), Vec::new(), Value::Null);
        for c in &chunks[..chunks.len() - 1] {
            let v: Value = serde_json::from_str(c).expect("json");
            let Some(choice) = v["choices"].get(0) else { continue };
            content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(tc) = choice["delta"]["tool_calls"].as_array() {
                assert_eq!(tc.len(), 1, "one call per chunk");
                calls.push(tc[0].clone());
            }
            if !choice["finish_reason"].is_null() {
                finish = choice["finish_reason"].clone();
            }
        }
        assert_eq!(content, "Sure.");
        assert_eq!(finish, "tool_calls");
        assert_eq!(
            calls,
            vec![
                json!({"index": 0, "id": "call_1_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Zürich \\\"centre\\\"\"}"}}),
                json!({"index": 1, "id": "call_1_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Bern\"}"}}),
            ]
        );
        // a malformed block streams as the text it was
        let bad = CALL.replace("string=\"true\">Bern", "string=\"yes\">Bern");
        let chunks = data(&body(stream_response(reply(&chunked(&bad), FinishReason::Stop), meta(), false)).await);
        let text: String = chunks[..chunks.len() - 1]
            .iter()
            .map(|c| serde_json::from_str::<Value>(c).expect("json")["choices"][0]["delta"]["content"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(text, bad);
        assert!(chunks[chunks.len() - 2].contains("\"finish_reason\":\"stop\""), "{chunks:?}");
    }
}
