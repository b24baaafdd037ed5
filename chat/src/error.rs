//! The error type of the crate. An HTTP layer answers errors with
//! [`ChatError::is_client_error`] with 400 (bad request), the others with 500 (the model file's
//! template or vocabulary is at fault).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ChatError {
    #[error("messages must not be empty")]
    NoMessages,
    #[error("messages[{index}]: invalid role {found:?} (expected one of system, developer, user, assistant, tool)")]
    InvalidRole { index: usize, found: String },
    #[error("messages[{index}] (role {role}): missing content")]
    MissingContent { index: usize, role: String },
    #[error("messages[{index}].content[{part}]: unsupported content part type {found:?} (expected \"text\")")]
    UnsupportedContentPart { index: usize, part: usize, found: String },
    #[error("messages[{index}].tool_calls[{call}]: {what}")]
    InvalidToolCall { index: usize, call: usize, what: String },
    #[error("tools[{index}]: {what}")]
    InvalidTool { index: usize, what: String },
    #[error("invalid {field}: expected {expected}, found {found}")]
    InvalidOption { field: &'static str, expected: &'static str, found: String },
    #[error("chat_template_kwargs: {key:?} cannot be set by a request (it is set by the server)")]
    ReservedKwarg { key: String },
    #[error("the built-in DeepSeek V4 format does not support {what} (the model file has no chat template)")]
    UnsupportedByBuiltin { what: String },
    #[error("the vocabulary has no token {text:?}, needed by the built-in DeepSeek V4 chat format")]
    MissingToken { text: String },
    #[error("token id {id} ({what}) is outside the vocabulary of {n_vocab} tokens")]
    TokenIdOutOfRange { what: &'static str, id: u64, n_vocab: usize },
    #[error("chat template does not compile: {0}")]
    TemplateSyntax(String),
    /// The template raised (e.g. `raise_exception("...")`) or failed on this request's data.
    #[error("chat template error: {0}")]
    Template(String),
    /// Every unused marker character occurs in the request, so content cannot be delimited.
    #[error("request uses every private-use character; cannot delimit its content")]
    NoFreeMarker,
    /// The template transformed content in a way that cannot be traced (e.g. slicing it).
    #[error("chat template handles message content in a way that cannot be traced: {0}")]
    Untraceable(String),
}

impl ChatError {
    /// Whether the request (not the model file) is at fault: an HTTP layer answers these with 400.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            ChatError::TemplateSyntax(_)
                | ChatError::MissingToken { .. }
                | ChatError::TokenIdOutOfRange { .. }
                | ChatError::Untraceable(_)
        )
    }
}
