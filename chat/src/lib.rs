//! The DeepSeek V4 chat format.
//!
//! [`ChatTemplate`] renders OpenAI-shaped [`ChatMessage`]s (plus tools and per-request
//! [`TemplateVars`] resolved from [`ChatRequestOptions`]) into a prompt with the GGUF's Jinja
//! `tokenizer.chat_template` (minijinja, configured like HF transformers' `apply_chat_template`), or
//! with a built-in DS4 format when the file has none. The prompt comes back as [`PromptPiece`]s:
//! template text (tokenize with special tokens parsed) and request content (tokenize as plain
//! text, so that special-token text inside messages never becomes a control token).
//! [`dsml`] reads the tool calls the template renders (and the model writes) back from text.

mod builtin;
pub mod dsml;
mod error;
mod jinja;
mod message;
mod options;
mod pyjson;
mod strops;
mod taint;

pub use builtin::{ASSISTANT, THINK_END, THINK_START, USER};
pub use dsml::partial_match_len;
pub use error::ChatError;
pub use message::{ChatMessage, ContentPart, FunctionCall, MessageContent, Role, ToolCall};
pub use options::{ChatRequestOptions, TemplateVars, REASONING_EFFORTS, RESERVED_KWARGS};
pub use taint::{PieceKind, PromptPiece};

/// The metadata key holding the Jinja chat template.
pub const TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// BOS/EOS texts as the template sees them (`bos_token`, `eos_token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
}

impl SpecialTokens {
    /// Reads the texts of the BOS and EOS ids (`tokenizer.ggml.bos_token_id` / `eos_token_id`) from
    /// the vocabulary (`tokenizer.ggml.tokens`).
    pub fn from_vocab(tokens: &[String], bos_id: u64, eos_id: u64) -> Result<SpecialTokens, ChatError> {
        let text = |what: &'static str, id: u64| {
            usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i))
                .cloned()
                .ok_or(ChatError::TokenIdOutOfRange { what, id, n_vocab: tokens.len() })
        };
        Ok(SpecialTokens { bos: text("bos", bos_id)?, eos: text("eos", eos_id)? })
    }
}

/// A rendered prompt: pieces whose concatenation is the prompt text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPrompt {
    pub pieces: Vec<PromptPiece>,
}

impl RenderedPrompt {
    pub fn text(&self) -> String {
        self.pieces.iter().map(|p| p.text.as_str()).collect()
    }
}

#[derive(Debug)]
enum Format {
    Jinja(Box<jinja::JinjaTemplate>),
    Builtin(builtin::Builtin),
}

/// A model's chat format.
#[derive(Debug)]
pub struct ChatTemplate {
    format: Format,
    special: SpecialTokens,
}

impl ChatTemplate {
    /// The template from the model file when it has a non-blank one, else the built-in DS4 format
    /// (which needs its control tokens in `tokens`).
    pub fn new(template: Option<&str>, tokens: &[String], special: SpecialTokens) -> Result<ChatTemplate, ChatError> {
        match template.filter(|t| !t.trim().is_empty()) {
            Some(src) => ChatTemplate::jinja(src, special),
            None => {
                tracing::info!("model file has no chat template; using the built-in DeepSeek V4 format");
                ChatTemplate::builtin(tokens, special)
            }
        }
    }

    pub fn jinja(source: &str, special: SpecialTokens) -> Result<ChatTemplate, ChatError> {
        Ok(ChatTemplate { format: Format::Jinja(Box::new(jinja::JinjaTemplate::new(source)?)), special })
    }

    pub fn builtin(tokens: &[String], special: SpecialTokens) -> Result<ChatTemplate, ChatError> {
        Ok(ChatTemplate { format: Format::Builtin(builtin::Builtin::new(tokens)?), special })
    }

    pub fn is_builtin(&self) -> bool {
        matches!(self.format, Format::Builtin(_))
    }

    /// The Jinja source, if this is a Jinja template.
    pub fn source(&self) -> Option<&str> {
        match &self.format {
            Format::Jinja(j) => Some(j.source()),
            Format::Builtin(_) => None,
        }
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Validates the request and renders it. `tools` is the OpenAI `tools` array.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        vars: &TemplateVars,
    ) -> Result<RenderedPrompt, ChatError> {
        let checked = message::check(messages)?;
        if let Some(t) = tools {
            message::check_tools(t)?;
        }
        let pieces = match &self.format {
            Format::Jinja(j) => {
                j.render(&jinja::RenderInput { messages: &checked, tools, vars, special: &self.special })?
            }
            Format::Builtin(b) => b.render(&checked, tools, vars, &self.special)?,
        };
        Ok(RenderedPrompt { pieces })
    }
}
