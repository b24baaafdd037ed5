//! The `moe-expert` worker of dflash.
//!
//! # What the daemon sends, what comes back
//!
//! A worker owns, per layer, a set of routed experts ([`experts::ExpertSet`], reported in the
//! handshake). For one MoE layer and a micro-batch the daemon
//!
//! 1. writes the tokens' MoE inputs (the ffn-normed activations, `n_embd` f32 per token) as
//!    rows `0..n_tokens` of the shared input area ([`ipc_proto::WorkerConnection::write_inputs`]);
//! 2. sends `eval_begin(layer, pairs)` where token `t` of `pairs` ([`experts::ExpertPairs`])
//!    holds only the experts of token `t` that this worker owns (global expert ids; empty is
//!    fine);
//! 3. later `eval_end`, then copies rows `0..n_pairs` of the output area out
//!    ([`ipc_proto::WorkerConnection::read_outputs`]): row `p` is `expert(input row of its
//!    token)` for pair `p`, where `expert(x) = down · (silu(min(gate·x, c)) ⊙ clamp(up·x, −c, c))` and
//!    `c = swiglu_clamp_exp[layer]`, computed by the model's own builder
//!    ([`graph::expert_ffn`]) over weights in the model's buffer type, so bit for bit what the
//!    model computes for an expert it holds; the daemon puts each row into its token's slot
//!    and weighs and sums the slots as for held experts.
//!
//! The handshake identity is [`model_identity`]; compute it on the daemon side from the same
//! [`loader::ModelFile`] to pass as `expected`.
//!
//! # Modules
//!
//! * [`compute`]: [`ExpertWorker`] — load a subset of experts, compute them with the model's
//!   own expert builder ([`graph::expert_ffn`]) on ggml's CPU backend;
//! * [`serve`]: [`serve()`], [`run_worker`], [`model_identity`];
//! * [`cli`]: `dflash --backend-ipc-mode=moe-expert ...` ([`cli_main`]);
//! * [`experts`]: the `--experts` spec ([`experts::parse_spec`]);
//! * [`pinning`]: CPU lists, NUMA nodes' CPUs, and pinning a worker to them;
//! * [`faults`]: misbehaviours the daemon's recovery tests arm (`DFLASH_WORKER_TEST_FAULTS`).
//!
//! A worker binds its socket before it loads anything and sends Hello as soon as the daemon
//! connects; after Setup it loads its experts layer by layer, sending `LoadProgress` reports
//! as the bytes read grow, and sends Ready when they are all in memory.

pub mod cli;
pub mod compute;
mod error;
pub mod experts;
pub mod faults;
pub mod pinning;
mod ranges;
pub mod serve;

pub use cli::{cli_main, is_worker_invocation, WorkerArgs};
pub use compute::{expert_bytes_per_layer, EvalTimings, ExpertWorker, LoadStep};
pub use error::{Result, WorkerError};
pub use serve::{model_identity, run_worker, run_worker_on, serve};
