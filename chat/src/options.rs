//! Per-request thinking options in the shapes OpenAI-compatible servers accept, and their
//! resolution into template variables.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ChatError;

/// Reasoning-effort values accepted in requests (OpenAI's plus DeepSeek's `max`).
pub const REASONING_EFFORTS: [&str; 7] = ["none", "minimal", "low", "medium", "high", "xhigh", "max"];

/// Template variables a request may not set through `chat_template_kwargs`.
pub const RESERVED_KWARGS: [&str; 5] = ["messages", "tools", "add_generation_prompt", "bos_token", "eos_token"];

/// The chat-format fields of a chat-completion request; flatten it into the request struct
/// (`#[serde(flatten)] chat: ChatRequestOptions`). Accepted shapes:
/// - `"thinking": {"type": "enabled" | "disabled"}` (DeepSeek/Anthropic style; `true`/`false` too),
/// - `"reasoning_effort": "none" | "minimal" | "low" | "medium" | "high" | "xhigh" | "max"`,
/// - `"chat_template_kwargs": {"thinking": bool, "enable_thinking": bool, "reasoning_effort": ..,
///   other template variables}` (vLLM / llama.cpp style).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ChatRequestOptions {
    #[serde(default)]
    pub thinking: Option<Value>,
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    #[serde(default)]
    pub chat_template_kwargs: Option<Map<String, Value>>,
}

/// Variables for one render, besides the messages and tools.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateVars {
    pub add_generation_prompt: bool,
    /// Passed to the template as both `thinking` and `enable_thinking`.
    pub thinking: bool,
    pub reasoning_effort: Option<String>,
    /// Other `chat_template_kwargs`; their strings are treated as untrusted content.
    pub extra: Map<String, Value>,
}

impl Default for TemplateVars {
    fn default() -> Self {
        TemplateVars { add_generation_prompt: true, thinking: false, reasoning_effort: None, extra: Map::new() }
    }
}

fn effort(field: &'static str, v: &str) -> Result<String, ChatError> {
    if REASONING_EFFORTS.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(ChatError::InvalidOption {
            field,
            expected: "one of none, minimal, low, medium, high, xhigh, max",
            found: format!("{v:?}"),
        })
    }
}

fn thinking_object(v: &Value) -> Result<bool, ChatError> {
    let bad = || ChatError::InvalidOption {
        field: "thinking",
        expected: "{\"type\": \"enabled\"} or {\"type\": \"disabled\"} (or a boolean)",
        found: v.to_string(),
    };
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("enabled") => Ok(true),
            Some("disabled") => Ok(false),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn kwarg_bool(key: &'static str, v: &Value) -> Result<bool, ChatError> {
    v.as_bool().ok_or_else(|| ChatError::InvalidOption {
        field: key,
        expected: "a boolean in chat_template_kwargs",
        found: v.to_string(),
    })
}

impl ChatRequestOptions {
    /// Resolves the request into template variables. Precedence for thinking on/off:
    /// `chat_template_kwargs.thinking` / `.enable_thinking` (must agree when both are given), then
    /// `thinking`, then `reasoning_effort` (`none` = off, any other value = on), then
    /// `default_thinking`. `reasoning_effort` (top level first, then the kwarg) is passed through,
    /// except `none`.
    pub fn resolve(&self, default_thinking: bool, add_generation_prompt: bool) -> Result<TemplateVars, ChatError> {
        let mut extra = Map::new();
        let mut kw_thinking: Option<bool> = None;
        let mut kw_effort: Option<String> = None;
        for (k, v) in self.chat_template_kwargs.iter().flatten() {
            match k.as_str() {
                "thinking" | "enable_thinking" => {
                    let key = if k == "thinking" { "chat_template_kwargs.thinking" } else { "chat_template_kwargs.enable_thinking" };
                    let b = kwarg_bool(key, v)?;
                    if kw_thinking.is_some_and(|prev| prev != b) {
                        return Err(ChatError::InvalidOption {
                            field: "chat_template_kwargs",
                            expected: "thinking and enable_thinking to agree",
                            found: format!("{:?}", self.chat_template_kwargs),
                        });
                    }
                    kw_thinking = Some(b);
                }
                "reasoning_effort" => {
                    let s = v.as_str().ok_or_else(|| ChatError::InvalidOption {
                        field: "chat_template_kwargs.reasoning_effort",
                        expected: "a string",
                        found: v.to_string(),
                    })?;
                    kw_effort = Some(effort("chat_template_kwargs.reasoning_effort", s)?);
                }
                r if RESERVED_KWARGS.contains(&r) || r.starts_with("__") => {
                    return Err(ChatError::ReservedKwarg { key: k.clone() })
                }
                _ => {
                    extra.insert(k.clone(), v.clone());
                }
            }
        }
        let top_effort = self.reasoning_effort.as_deref().map(|e| effort("reasoning_effort", e)).transpose()?;
        let effort = top_effort.or(kw_effort);
        let thinking = match (kw_thinking, &self.thinking, &effort) {
            (Some(b), _, _) => b,
            (None, Some(t), _) => thinking_object(t)?,
            (None, None, Some(e)) => e != "none",
            (None, None, None) => default_thinking,
        };
        Ok(TemplateVars {
            add_generation_prompt,
            thinking,
            reasoning_effort: effort.filter(|e| e != "none"),
            extra,
        })
    }
}
