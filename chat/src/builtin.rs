//! The built-in DeepSeek V4 prompt format, used only when the model file has no chat template:
//! BOS, the system messages (joined by a blank line), then per turn `<｜User｜>`text and
//! `<｜Assistant｜></think>`answer`<｜end▁of▁sentence｜>` (finished turns drop their reasoning;
//! consecutive user messages share a turn, joined by a blank line), and when asked the generation
//! prompt `<｜Assistant｜>` + `<think>` (thinking) or `</think>` (not thinking). Tools are not
//! supported.

use crate::error::ChatError;
use crate::message::{Checked, Role};
use crate::options::TemplateVars;
use crate::taint::{push_piece, PieceKind, PromptPiece};
use crate::SpecialTokens;

pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

#[derive(Debug, Clone)]
pub(crate) struct Builtin;

impl Builtin {
    /// Checks that the vocabulary has the format's control tokens (by text).
    pub fn new(tokens: &[String]) -> Result<Builtin, ChatError> {
        for text in [USER, ASSISTANT, THINK_START, THINK_END] {
            if !tokens.iter().any(|t| t == text) {
                return Err(ChatError::MissingToken { text: text.to_string() });
            }
        }
        Ok(Builtin)
    }

    pub fn render(
        &self,
        messages: &[Checked<'_>],
        tools: Option<&[serde_json::Value]>,
        vars: &TemplateVars,
        special: &SpecialTokens,
    ) -> Result<Vec<PromptPiece>, ChatError> {
        if tools.is_some_and(|t| !t.is_empty()) {
            return Err(ChatError::UnsupportedByBuiltin { what: "tools".into() });
        }
        let mut p = Vec::new();
        let t = |p: &mut Vec<PromptPiece>, s: &str| push_piece(p, s, PieceKind::Template);
        let c = |p: &mut Vec<PromptPiece>, s: &str| push_piece(p, s, PieceKind::Content);
        t(&mut p, &special.bos);
        let mut first_system = true;
        for m in messages.iter().filter(|m| m.role == Role::System) {
            if !first_system {
                t(&mut p, "\n\n");
            }
            first_system = false;
            c(&mut p, m.content.as_deref().unwrap_or_default());
        }
        let mut in_user = false;
        for m in messages {
            match m.role {
                Role::System => {}
                Role::User | Role::Developer => {
                    t(&mut p, if in_user { "\n\n" } else { USER });
                    in_user = true;
                    c(&mut p, m.content.as_deref().unwrap_or_default());
                }
                Role::Tool => return Err(ChatError::UnsupportedByBuiltin { what: "tool messages".into() }),
                Role::Assistant => {
                    if m.msg.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) {
                        return Err(ChatError::UnsupportedByBuiltin { what: "tool calls".into() });
                    }
                    in_user = false;
                    t(&mut p, ASSISTANT);
                    t(&mut p, THINK_END);
                    c(&mut p, m.content.as_deref().unwrap_or_default());
                    t(&mut p, &special.eos);
                }
            }
        }
        if vars.add_generation_prompt {
            t(&mut p, ASSISTANT);
            t(&mut p, if vars.thinking { THINK_START } else { THINK_END });
        }
        Ok(p)
    }
}
