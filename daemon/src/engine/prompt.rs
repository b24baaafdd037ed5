//! The model file's tokenizer and chat format, and chat prompts turned into token ids.
use anyhow::{Context as _, Result};
use chat::{ChatMessage, ChatTemplate, PieceKind, PromptPiece, SpecialTokens, TemplateVars, TEMPLATE_KEY};
use loader::Metadata;
use tokenizer::Tokenizer;

/// Tokenizer and chat template of one GGUF.
#[derive(Clone)]
pub struct ChatFormat {
    pub tokenizer: Tokenizer,
    pub template: std::sync::Arc<ChatTemplate>,
}

impl ChatFormat {
    pub fn from_metadata(md: &Metadata) -> Result<ChatFormat> {
        let tokenizer = Tokenizer::from_metadata(md).context("building the tokenizer from the GGUF")?;
        let tokens = md.str_array("tokenizer.ggml.tokens")?;
        let special = SpecialTokens::from_vocab(tokens, tokenizer.bos_id().into(), tokenizer.eos_id().into())?;
        let source = md.opt_str(TEMPLATE_KEY)?;
        let template = ChatTemplate::new(source, tokens, special).context("setting up the chat template")?;
        if template.is_builtin() {
            tracing::info!("the GGUF has no {TEMPLATE_KEY}: using the built-in DeepSeek V4 format");
        }
        Ok(ChatFormat { tokenizer, template: std::sync::Arc::new(template) })
    }

    /// Renders and tokenizes a conversation, then `after` (text the reply starts with, written
    /// after the generation prompt): template text with special tokens parsed, request content
    /// as plain text.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        vars: &TemplateVars,
        after: &[PromptPiece],
    ) -> Result<Vec<u32>, PromptError> {
        let rendered = self.template.render(messages, tools, vars)?;
        let mut ids = Vec::new();
        for p in rendered.pieces.iter().chain(after) {
            ids.extend(self.tokenizer.encode(&p.text, p.kind == PieceKind::Template)?);
        }
        Ok(ids)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
}

impl PromptError {
    pub fn is_client_error(&self) -> bool {
        match self {
            PromptError::Chat(e) => e.is_client_error(),
            PromptError::Tokenizer(_) => false,
        }
    }
}
