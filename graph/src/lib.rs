//! `graph` knows the DeepSeek V4 math, not files or processes: it builds the forward pass as
//! ggml graphs over weights the `loader` placed, and owns per-sequence state.
//!
//! One step ([`Model::forward`]) runs a micro-batch of tokens of one [`Sequence`] through
//! the model, in the order of the math (see `DS4.md`): embedding → per layer
//! (hyper-connection pre → attention with the raw window, compressed entries and the
//! lightning indexer → hyper-connection post → hyper-connection pre → MoE → post) → HC head
//! → norm → logits.
mod adaptive;
mod attention;
mod builder;
mod cold;
pub mod expert_ffn;
mod forward;
mod hc;
mod load;
mod model;
mod moe;
mod offload;
mod mxfp4_cpu;
mod pcie;
pub mod ops;
pub mod plan;
pub mod profile;
mod state;
mod steps;
mod stream;
mod vocab;
mod weights;

pub use adaptive::{SwapPolicy, SwapReport};
pub use cold::{BoxError, ColdError, ColdExperts, ColdSplit, ExpertLayerStats};
pub use load::{load_weights, load_weights_reporting};
pub use mxfp4_cpu::{time_products, ProductTimes};
pub use model::{Logits, Model, ModelOptions, SplitTimings, StepTimings};
pub use profile::OpRow;
pub use state::{Checkpoint, Entries, EntryPart, Sequence};
pub use vocab::{check_token_ids, token_ids, TokenOutOfRange};
pub use weights::TensorSet;

/// The micro-batch (`ubatch`) a model runs when none is given: prefill is split into graphs
/// of at most this many tokens (llama.cpp's default as well).
pub const DEFAULT_UBATCH: usize = 512;

/// Queries per block of the attention without flash attention (`ModelOptions::attention_block`):
/// with a window of 128, a block of 256 scores 384 raw keys per query, against 2176 for a
/// micro-batch of 2048 unsplit.
pub const DEFAULT_ATTENTION_BLOCK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    Ggml(#[from] ggml::GgmlError),
    #[error("tensor {0} is missing after loading")]
    MissingTensor(String),
    #[error("blk.{layer}.ffn_gate_tid2eid: token {token} slot {slot} routes to expert {value}, outside [0, {n_expert})")]
    BadTid2eid { layer: usize, token: usize, slot: usize, value: i32, n_expert: usize },
    #[error(transparent)]
    TokenOutOfRange(#[from] TokenOutOfRange),
    #[error("context overflow: {pos} tokens cached + {n} new exceeds the maximum context of {n_ctx}")]
    ContextOverflow { pos: usize, n: usize, n_ctx: usize },
    #[error("sequence was created for another model")]
    ForeignSequence,
    #[error("cold experts of layer {layer}: {source}; the sequence must be reset")]
    Cold { layer: usize, source: ColdError },
    #[error("the cold expert state is poisoned (a thread panicked while holding it)")]
    ColdStatePoisoned,
    #[error("invalid option: {0}")]
    Option(String),
    #[error("sequence state: {0}")]
    State(String),
}
