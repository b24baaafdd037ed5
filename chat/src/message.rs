//! OpenAI-shaped chat messages and their validation.

use serde::Deserialize;

use crate::error::ChatError;

/// One chat message as OpenAI-compatible clients send it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// The assistant's reasoning (DeepSeek API name; `reasoning` is accepted as an alias).
    #[serde(default, alias = "reasoning")]
    pub reasoning_content: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// Message content: a string or a list of typed parts (only `text` parts are supported).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolCall {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON text (OpenAI) or a JSON object; the template decodes a string with `from_json`.
    #[serde(default)]
    pub arguments: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A validated message: role parsed, content flattened to text (`None` only for an assistant).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Checked<'a> {
    pub role: Role,
    pub content: Option<String>,
    pub msg: &'a ChatMessage,
}

/// Joins text parts with "\n" (what vLLM and llama.cpp's server do for templates that take strings).
fn flatten(index: usize, c: &MessageContent) -> Result<String, ChatError> {
    match c {
        MessageContent::Text(s) => Ok(s.clone()),
        MessageContent::Parts(parts) => {
            let mut out = String::new();
            for (part, p) in parts.iter().enumerate() {
                let text = match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => t,
                    ("text", None) => return Err(ChatError::MissingContent { index, role: "text part".into() }),
                    (other, _) => {
                        return Err(ChatError::UnsupportedContentPart { index, part, found: other.to_string() })
                    }
                };
                if part > 0 {
                    out.push('\n');
                }
                out.push_str(text);
            }
            Ok(out)
        }
    }
}

pub(crate) fn check(messages: &[ChatMessage]) -> Result<Vec<Checked<'_>>, ChatError> {
    if messages.is_empty() {
        return Err(ChatError::NoMessages);
    }
    let mut out = Vec::with_capacity(messages.len());
    for (index, msg) in messages.iter().enumerate() {
        let role = Role::parse(&msg.role).ok_or_else(|| ChatError::InvalidRole { index, found: msg.role.clone() })?;
        let content = match &msg.content {
            Some(c) => Some(flatten(index, c)?),
            None if role == Role::Assistant => None,
            None => return Err(ChatError::MissingContent { index, role: msg.role.clone() }),
        };
        if let Some(calls) = &msg.tool_calls {
            if role != Role::Assistant && !calls.is_empty() {
                return Err(ChatError::InvalidToolCall {
                    index,
                    call: 0,
                    what: format!("tool_calls are only valid on assistant messages, found role {}", msg.role),
                });
            }
            for (call, c) in calls.iter().enumerate() {
                if let Some(kind) = &c.kind {
                    if kind != "function" {
                        return Err(ChatError::InvalidToolCall {
                            index,
                            call,
                            what: format!("type must be \"function\", found {kind:?}"),
                        });
                    }
                }
                match &c.function.arguments {
                    serde_json::Value::String(_) | serde_json::Value::Object(_) | serde_json::Value::Null => {}
                    other => {
                        return Err(ChatError::InvalidToolCall {
                            index,
                            call,
                            what: format!("arguments must be a JSON text or an object, found {other}"),
                        })
                    }
                }
            }
        }
        out.push(Checked { role, content, msg });
    }
    Ok(out)
}

/// Checks the OpenAI tool list: every entry an object with a `type` string (`function` entries need
/// a `function` object with a `name`).
pub(crate) fn check_tools(tools: &[serde_json::Value]) -> Result<(), ChatError> {
    for (index, t) in tools.iter().enumerate() {
        let obj = t
            .as_object()
            .ok_or_else(|| ChatError::InvalidTool { index, what: format!("expected an object, found {t}") })?;
        let kind = obj.get("type").and_then(|v| v.as_str()).ok_or_else(|| ChatError::InvalidTool {
            index,
            what: "missing \"type\" string".into(),
        })?;
        if kind == "function" {
            let name = obj.get("function").and_then(|f| f.get("name")).and_then(|n| n.as_str());
            if name.is_none() {
                return Err(ChatError::InvalidTool { index, what: "function tool without function.name".into() });
            }
        }
    }
    Ok(())
}
