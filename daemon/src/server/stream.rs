//! A submitted request's events turned into one completion object, or into server-sent
//! events (axum's `Sse`): chunks as text arrives, a last chunk with the finish reason and
//! timings, optionally a usage chunk, then `[DONE]`.
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt as _;
use serde::Serialize;

use super::api::{AssistantMessage, ChatChoice, ChatDeltaChoice, CompletionObject, Delta, TextChoice, Usage};
use super::error::ApiError;
use crate::engine::{Event, FinishReason, Handle, Summary};

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

impl Meta {
    fn object<C>(&self, chunk: bool, choices: Vec<C>) -> CompletionObject<C> {
        let object = match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        };
        CompletionObject { id: self.id.clone(), object, created: self.created, model: self.model.clone(), choices, usage: None, timings: None }
    }

    /// A stream chunk adding `text` (reasoning or content), or ending with `finish`.
    fn delta(&self, reasoning: bool, text: &str, finish: Option<&'static str>) -> SseEvent {
        match self.kind {
            Kind::Chat => {
                let delta = match (text.is_empty(), reasoning) {
                    (true, _) => Delta::default(),
                    (false, true) => Delta { reasoning_content: Some(text.to_string()), ..Delta::default() },
                    (false, false) => Delta { content: Some(text.to_string()), ..Delta::default() },
                };
                event(&self.object(true, vec![ChatDeltaChoice { index: 0, delta, logprobs: None, finish_reason: finish }]))
            }
            Kind::Completion => event(&self.object(true, vec![TextChoice { index: 0, text: text.to_string(), logprobs: None, finish_reason: finish }])),
        }
    }

    /// The chunk that ends a stream: the finish reason and the timings.
    fn last(&self, s: &Summary) -> SseEvent {
        let finish = Some(s.finish.as_str());
        match self.kind {
            Kind::Chat => {
                let mut o = self.object(true, vec![ChatDeltaChoice { index: 0, delta: Delta::default(), logprobs: None, finish_reason: finish }]);
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

/// Collects every event into one completion object.
pub async fn whole_response(mut h: Handle, meta: Meta) -> Result<Response, ApiError> {
    let (mut content, mut reasoning) = (String::new(), String::new());
    while let Some(ev) = h.events.recv().await {
        match ev {
            Event::Text { reasoning: true, text } => reasoning.push_str(&text),
            Event::Text { reasoning: false, text } => content.push_str(&text),
            Event::Error(e) => return Err(ApiError::server(e)),
            Event::Done(s) => {
                if s.finish == FinishReason::Cancelled {
                    return Err(ApiError::cancelled());
                }
                let finish = s.finish.as_str();
                let (usage, timings) = (Some(Usage::from(&s)), Some(s.timings));
                let resp = match meta.kind {
                    Kind::Chat => {
                        let reasoning_content = (!reasoning.is_empty()).then_some(reasoning);
                        let message = AssistantMessage { role: "assistant", content, reasoning_content };
                        let o = CompletionObject { usage, timings, ..meta.object(false, vec![ChatChoice { index: 0, message, logprobs: None, finish_reason: finish }]) };
                        Json(o).into_response()
                    }
                    Kind::Completion => {
                        let choice = TextChoice { index: 0, text: content, logprobs: None, finish_reason: Some(finish) };
                        Json(CompletionObject { usage, timings, ..meta.object(false, vec![choice]) }).into_response()
                    }
                };
                return Ok(resp);
            }
        }
    }
    Err(ApiError::server("the engine stopped without finishing the request"))
}

/// Streams the events as SSE. Dropping the stream (the client went away) drops the handle,
/// which cancels the request.
pub fn stream_response(h: Handle, meta: Meta, include_usage: bool) -> Response {
    enum Phase {
        Start,
        Run,
        End,
    }
    let stream = futures_util::stream::unfold((h, meta, Phase::Start), move |(mut h, meta, phase)| async move {
        match phase {
            Phase::Start if meta.kind == Kind::Chat => {
                let delta = Delta { role: Some("assistant"), content: Some(String::new()), ..Delta::default() };
                let first = event(&meta.object(true, vec![ChatDeltaChoice { index: 0, delta, logprobs: None, finish_reason: None }]));
                Some((vec![first], (h, meta, Phase::Run)))
            }
            Phase::Start | Phase::Run => {
                let mut out = match h.events.recv().await {
                    Some(Event::Text { reasoning, text }) => return Some((vec![meta.delta(reasoning, &text, None)], (h, meta, Phase::Run))),
                    Some(Event::Done(s)) if s.finish != FinishReason::Cancelled => {
                        let mut evs = vec![meta.last(&s)];
                        if include_usage {
                            let mut u = meta.object::<ChatDeltaChoice>(true, Vec::new());
                            u.usage = Some(Usage::from(&s));
                            evs.push(event(&u));
                        }
                        evs
                    }
                    Some(Event::Done(_)) => vec![error_event(&ApiError::cancelled())],
                    Some(Event::Error(e)) => vec![error_event(&ApiError::server(e))],
                    None => vec![error_event(&ApiError::server("the engine stopped without finishing the request"))],
                };
                out.push(SseEvent::default().data("[DONE]"));
                Some((out, (h, meta, Phase::End)))
            }
            Phase::End => None,
        }
    });
    let flat = stream.flat_map(|evs| futures_util::stream::iter(evs.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(flat).into_response()
}
