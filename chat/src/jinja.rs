//! The GGUF's Jinja chat template rendered with minijinja, configured like HF transformers'
//! `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
//! `strftime_now`, `tojson` = `json.dumps`) plus llama.cpp's `from_json` and Python string methods.

use std::fmt::Write;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use serde_json::Value as Json;

use crate::error::ChatError;
use crate::message::Checked;
use crate::options::TemplateVars;
use crate::pyjson::{dumps, DumpOptions};
use crate::strops::{self, Mk, MARKERS_VAR};
use crate::taint::{Markers, PromptPiece, UsedChars};
use crate::SpecialTokens;

const NAME: &str = "chat_template";

pub(crate) struct JinjaTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate").field("source_len", &self.source.len()).finish()
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
}

fn strftime_now(fmt: String) -> Result<Value, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(&fmt).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {fmt:?}")));
    }
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format_with_items(items.into_iter()))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: cannot format {fmt:?}")))?;
    Ok(Value::from(out))
}

fn tojson(state: &State, value: Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let mut o = DumpOptions { markers: Mk::from_state(state).0, ..DumpOptions::default() };
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    match indent {
        None => {}
        Some(v) if v.is_none() => {}
        Some(v) => {
            o.indent = Some(match (v.as_i64(), v.as_str()) {
                (Some(n), _) => " ".repeat(n.clamp(0, 64) as usize),
                (None, Some(s)) => s.to_string(),
                _ => return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: bad indent {v}"))),
            });
            o.item_sep = ",".into();
        }
    }
    if let Some(b) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        o.ensure_ascii = b;
    }
    if let Some(b) = kwargs.get::<Option<bool>>("sort_keys")? {
        o.sort_keys = b;
    }
    if let Some(seps) = kwargs.get::<Option<Value>>("separators")? {
        if !seps.is_none() {
            let v: Vec<Value> = seps.try_iter()?.collect();
            match v.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    o.item_sep = a.as_str().unwrap_or_default().to_string();
                    o.key_sep = b.as_str().unwrap_or_default().to_string();
                }
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
            }
        }
    }
    kwargs.assert_all_used()?;
    Ok(Value::from(dumps(&value, &o)?))
}

fn from_json(state: &State, s: String) -> Result<Value, Error> {
    let mk = Mk::from_state(state);
    let t = mk.dec(&s)?;
    let j: Json = serde_json::from_str(&t.plain)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("from_json: invalid JSON: {e}")))?;
    // Anything decoded from content is content, keys included.
    let m = if t.any() { mk.0 } else { None };
    Ok(json_value(&j, m, true))
}

/// A JSON value as a template value; with markers, its strings (and keys with `wrap_keys`) are
/// marked as content, except short identifier values of `type` keys (JSON-schema / OpenAI types,
/// which templates compare with literals and which cannot spell a control token).
pub(crate) fn json_value(j: &Json, m: Option<Markers>, wrap_keys: bool) -> Value {
    json_value_in(j, m, wrap_keys, None)
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn json_value_in(j: &Json, m: Option<Markers>, wrap_keys: bool, key: Option<&str>) -> Value {
    match j {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => match m {
            Some(m) if !(key == Some("type") && is_ident(s)) => Value::from(m.wrap(s)),
            _ => Value::from(s.as_str()),
        },
        Json::Array(a) => Value::from(a.iter().map(|v| json_value_in(v, m, wrap_keys, None)).collect::<Vec<_>>()),
        Json::Object(o) => Value::from_pairs(o.iter().map(|(k, v)| {
            let key = match m {
                Some(m) if wrap_keys => Value::from(m.wrap(k)),
                _ => Value::from(k.as_str()),
            };
            (key, json_value_in(v, m, wrap_keys, Some(k)))
        })),
    }
}

fn collect_json(used: &mut UsedChars, j: &Json) {
    match j {
        Json::String(s) => used.add(s),
        Json::Array(a) => a.iter().for_each(|v| collect_json(used, v)),
        Json::Object(o) => o.iter().for_each(|(k, v)| {
            used.add(k);
            collect_json(used, v)
        }),
        _ => {}
    }
}

pub(crate) struct RenderInput<'a> {
    pub messages: &'a [Checked<'a>],
    pub tools: Option<&'a [Json]>,
    pub vars: &'a TemplateVars,
    pub special: &'a SpecialTokens,
}

impl RenderInput<'_> {
    fn used_chars(&self, source: &str) -> UsedChars {
        let mut used = UsedChars::default();
        used.add(source);
        used.add(&self.special.bos);
        used.add(&self.special.eos);
        for c in self.messages {
            used.add(c.content.as_deref().unwrap_or_default());
            for s in [&c.msg.reasoning_content, &c.msg.name, &c.msg.tool_call_id].into_iter().flatten() {
                used.add(s);
            }
            for call in c.msg.tool_calls.iter().flatten() {
                used.add(call.id.as_deref().unwrap_or_default());
                used.add(&call.function.name);
                collect_json(&mut used, &call.function.arguments);
            }
        }
        for t in self.tools.into_iter().flatten() {
            collect_json(&mut used, t);
        }
        for (k, v) in &self.vars.extra {
            used.add(k);
            collect_json(&mut used, v);
        }
        used
    }

    fn context(&self, m: Option<Markers>) -> Value {
        let text = |s: &str| match m {
            Some(m) => Value::from(m.wrap(s)),
            None => Value::from(s),
        };
        let messages: Vec<Value> = self
            .messages
            .iter()
            .map(|c| {
                let mut kv: Vec<(&str, Value)> = vec![("role", Value::from(c.role.as_str()))];
                kv.push(("content", c.content.as_deref().map_or(Value::from(()), text)));
                if let Some(r) = &c.msg.reasoning_content {
                    kv.push(("reasoning_content", text(r)));
                }
                if let Some(calls) = &c.msg.tool_calls {
                    let calls: Vec<Value> = calls
                        .iter()
                        .map(|call| {
                            let mut f = vec![("name", text(&call.function.name))];
                            f.push(("arguments", json_value(&call.function.arguments, m, true)));
                            let mut kv = Vec::new();
                            if let Some(id) = &call.id {
                                kv.push(("id", text(id)));
                            }
                            kv.push(("type", Value::from(call.kind.as_deref().unwrap_or("function"))));
                            kv.push(("function", Value::from_pairs(f)));
                            Value::from_pairs(kv)
                        })
                        .collect();
                    kv.push(("tool_calls", Value::from(calls)));
                }
                if let Some(id) = &c.msg.tool_call_id {
                    kv.push(("tool_call_id", text(id)));
                }
                if let Some(n) = &c.msg.name {
                    kv.push(("name", text(n)));
                }
                Value::from_pairs(kv)
            })
            .collect();
        let mut kv: Vec<(String, Value)> = Vec::new();
        for (k, v) in &self.vars.extra {
            kv.push((k.clone(), json_value(v, m, false)));
        }
        kv.push(("messages".into(), Value::from(messages)));
        if let Some(tools) = self.tools {
            kv.push(("tools".into(), Value::from(tools.iter().map(|t| json_value(t, m, false)).collect::<Vec<_>>())));
        }
        kv.push(("add_generation_prompt".into(), Value::from(self.vars.add_generation_prompt)));
        kv.push(("thinking".into(), Value::from(self.vars.thinking)));
        kv.push(("enable_thinking".into(), Value::from(self.vars.thinking)));
        if let Some(e) = &self.vars.reasoning_effort {
            kv.push(("reasoning_effort".into(), Value::from(e.as_str())));
        }
        kv.push(("bos_token".into(), Value::from(self.special.bos.as_str())));
        kv.push(("eos_token".into(), Value::from(self.special.eos.as_str())));
        if let Some(m) = m {
            kv.push((MARKERS_VAR.into(), Value::from(format!("{}{}", m.open, m.close))));
        }
        Value::from_pairs(kv)
    }
}

fn template_error(e: &Error) -> ChatError {
    let mut msg = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        let _ = write!(msg, " (template line {line})");
    }
    ChatError::Template(msg)
}

impl JinjaTemplate {
    pub fn new(source: &str) -> Result<JinjaTemplate, ChatError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::TemplateSyntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_formatter(|out, state, value| {
            let mut s = String::new();
            crate::pyjson::py_str(&mut s, value, Mk::from_state(state).0, true, 0);
            out.write_str(&s).map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write output"))
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("from_json", from_json);
        env.add_filter("trim", strops::trim_filter);
        env.add_filter("upper", strops::upper_filter);
        env.add_filter("lower", strops::lower_filter);
        env.add_filter("replace", strops::replace_filter);
        env.add_filter("length", strops::length_filter);
        env.add_filter("count", strops::length_filter);
        env.set_unknown_method_callback(|state, value, method, args| {
            if let (ValueKind::String, Some(s)) = (value.kind(), value.as_str()) {
                if let Some(v) = strops::string_method(Mk::from_state(state), s, method, args)? {
                    return Ok(v);
                }
            }
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        env.add_template_owned(NAME, source.to_string()).map_err(|e| ChatError::TemplateSyntax(format!("{e:#}")))?;
        Ok(JinjaTemplate { env, source: source.to_string() })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders twice: plain (the prompt text) and with content markers (where the content is);
    /// the marked render must reduce to the plain one.
    pub fn render(&self, input: &RenderInput<'_>) -> Result<Vec<PromptPiece>, ChatError> {
        let tmpl = self.env.get_template(NAME).map_err(|e| ChatError::TemplateSyntax(e.to_string()))?;
        let plain = tmpl.render(input.context(None)).map_err(|e| template_error(&e))?;
        let m = Markers::choose(&input.used_chars(&self.source))?;
        let marked = tmpl.render(input.context(Some(m))).map_err(|e| template_error(&e))?;
        let pieces = m.pieces(&marked)?;
        let joined: String = pieces.iter().map(|p| p.text.as_str()).collect();
        if joined != plain {
            let at = joined.bytes().zip(plain.bytes()).take_while(|(a, b)| a == b).count();
            tracing::warn!(at, "chat template output depends on content markers");
            return Err(ChatError::Untraceable(format!(
                "the template output changes when content is marked (first difference at byte {at})"
            )));
        }
        Ok(pieces)
    }
}
