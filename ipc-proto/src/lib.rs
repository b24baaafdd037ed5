//! The daemon <-> `moe-expert` worker protocol of dflash.
//!
//! The daemon keeps hot experts on the GPU; cold experts run in worker processes on the CPU.
//! A worker listens on a Unix stream socket ([`SocketDir`], [`Listener`]); the daemon connects
//! ([`WorkerConnection`]). The socket carries small control frames; activations travel through
//! one shared memory region (a sealed memfd passed once with `SCM_RIGHTS`).
//!
//! The expert set of the handshake and the per-token experts of an eval (its (token, expert)
//! pairs) are the `experts` crate's [`experts::ExpertSet`] and [`experts::ExpertPairs`]; this
//! crate defines only their wire encodings. A worker returns each pair's expert output; the
//! router weights never leave the daemon's graph, which weighs and sums every expert of a
//! token in one place, so the result does not depend on which process computed which expert.
//!
//! # Frames
//!
//! Every frame is a fixed 24-byte header followed by `payload_len` bytes. All integers are
//! little-endian; `f32` are IEEE-754 bits, little-endian.
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! | 0      | 4    | magic `b"DFIP"` (`0x50494644` as u32)              |
//! | 4      | 2    | protocol version ([`PROTOCOL_VERSION`], 3)         |
//! | 6      | 2    | frame type ([`FrameType`])                          |
//! | 8      | 8    | request id                                          |
//! | 16     | 4    | payload length in bytes                             |
//! | 20     | 4    | reserved, 0                                         |
//!
//! A receiver checks magic, version, type and the reserved field, then whether the type is
//! allowed in the connection's state, then the length against the bound of the type
//! ([`FrameType::max_payload`]: fixed sizes, hard caps before the handshake, the agreed
//! [`Limits`] after) — all before reading or allocating the payload. A decoded payload must be
//! consumed exactly. Any violation is a [`ProtoError`] naming the bad value (expected vs
//! found); the receiver sends an `Error` frame saying so and closes the connection.
//!
//! # Payloads
//!
//! * `Hello` (1, worker → daemon, id 0): `file_size u64, header_hash [u8; 32], n_layer u32,
//!   n_expert u32, n_embd u32, reserved u32 = 0`, then the expert set: per layer
//!   `ceil(n_expert / 64)` u64 words, bit `e % 64` of word `e / 64` set when the worker owns
//!   expert `e` (bits past `n_expert` clear). Caps before limits exist: [`MAX_LAYERS`],
//!   [`MAX_EXPERTS`], [`MAX_EMBD`]. The header's version is the worker's protocol version.
//! * `Setup` (2, daemon → worker, id 0, one memfd attached with `SCM_RIGHTS`): `max_tokens u32,
//!   n_embd u32, max_experts_per_token u32, reserved u32 = 0, shm_len u64, input_offset u64,
//!   output_offset u64` (40 bytes). The worker checks the limits against its model
//!   (`n_embd` equal, `max_experts_per_token <= n_expert`), that the layout is the one
//!   [`ShmLayout::for_limits`] fixes, that the memfd has that size and is sealed against
//!   shrinking and growing, then maps it.
//! * `LoadProgress` (12, worker → daemon, id 0, only between Setup and Ready): `loaded u64,
//!   total u64`, bytes of expert weights in memory so far and in all ([`LoadProgress`]).
//!   Checked: `loaded <= total`, `total` as in the first report, `loaded` never below the
//!   previous report.
//! * `Ready` (3, worker → daemon, id 0): empty; the experts are loaded (after any
//!   `LoadProgress`, the last one must have `loaded == total`).
//! * `Eval` (4, daemon → worker): `layer u32, n_tokens u32, n_pairs u32, reserved u32 = 0,
//!   counts [u32; n_tokens], expert ids [u32; n_pairs]`: token `t` has the next `counts[t]`
//!   pairs. Checked: `n_tokens <= max_tokens`, each count `<= max_experts_per_token`,
//!   `sum(counts) == n_pairs`, length `== 16 + 4 n_tokens + 4 n_pairs`, `layer < n_layer`,
//!   each expert owned by the worker and not repeated within a token. The inputs are rows
//!   `0..n_tokens` of the input area.
//! * `EvalDone` (5, worker → daemon, id of the eval): `n_pairs u32, reserved u32 = 0,
//!   compute_us u64`. The worker has written rows `0..n_pairs` of the output area: row `p` is
//!   `expert(input row of its token)` for pair `p`, in the order of the eval's pairs
//!   (unweighted: the daemon applies the router weights).
//! * `Ping` (6) / `Pong` (7): an opaque payload of at most the input area's size
//!   (`max_tokens * n_embd * 4` bytes) that the worker echoes.
//! * `StatsRequest` (8): empty. `StatsReply` (9): `evals, tokens, pairs, compute_us, pings`,
//!   five u64 ([`WorkerStats`]).
//! * `Shutdown` (10, daemon → worker): empty; the worker closes the connection and exits.
//! * `Error` (11, either way, id of the request or 0): `code u32` ([`ErrorCode`],
//!   `message_len u32` (at most [`MAX_ERROR_MESSAGE`]), UTF-8 message. Ends the connection.
//!
//! The worker sends Hello as soon as the daemon connects, before loading its experts, so
//! another model or protocol version is refused at once; it loads them after Setup,
//! reporting progress, and sends Ready when done.
//!
//! Request ids are chosen by the daemon, strictly increasing on a connection; each reply
//! carries the id of its request. One request is outstanding at a time.
//!
//! # Shared memory
//!
//! The region is `round_up(max_tokens * n_embd * 4, 4096) + round_up(max_pairs * n_embd * 4,
//! 4096)` bytes (`max_pairs = max_tokens * max_experts_per_token`): the input area at offset
//! 0, `max_tokens` rows of `n_embd` f32 (one per token), and the output area at the
//! page-rounded end of the input area, `max_pairs` rows of `n_embd` f32 (one per pair).
//! Ownership follows the protocol: the daemon writes inputs before `Eval` and reads outputs
//! after `EvalDone`; the worker reads inputs and writes outputs in between. Since the other
//! process maps the same pages and may write them at any time, no Rust reference is ever made
//! over the region: rows are copied in and out (one copy each way) by
//! [`WorkerConnection::write_inputs`], [`WorkerConnection::read_outputs`],
//! [`WorkerServer::read_inputs`] and [`WorkerServer::write_outputs`], each only in its
//! side's window.
//!
//! # Waiting
//!
//! Sockets are non-blocking; waits use `ppoll` with the caller's deadline, after an optional
//! spin ([`ConnectOptions::spin`]). Hello and Setup are bounded by
//! [`ConnectOptions::handshake_timeout`]; the wait for Ready by
//! [`ConnectOptions::load_stall`] from the last report that showed more bytes loaded
//! ([`ProtoError::LoadStalled`]), so a long load is fine as long as it progresses. EOF,
//! reset, timeout and a stalled load are errors for which [`ProtoError::is_peer_lost`]
//! holds: the daemon's cue to kill and respawn a worker.

// Modules, each importing only those before it in this order: `types` (plain values) →
// `error` → `shm` → `checks` (the values against the caps) → `frame` (codecs) → `stream` →
// `client` → `server` → `sockdir`.
mod checks;
mod client;
mod error;
pub mod frame;
mod server;
mod shm;
mod sockdir;
mod stream;
mod types;

pub use client::{ConnectOptions, EvalReply, LoadReport, RequestId, WorkerConnection};
pub use error::{ErrorCode, ProtoError, Result};
pub use frame::{EvalRequest, Header, HEADER_LEN, MAGIC, PROTOCOL_VERSION};
pub use server::{Request, WorkerLoading, WorkerServer};
pub use shm::ShmLayout;
pub use sockdir::{Listener, SocketDir};
pub use types::{
    FrameType, Limits, LoadProgress, ModelIdentity, SetupMsg, WorkerStats, MAX_EMBD, MAX_ERROR_MESSAGE, MAX_EXPERTS, MAX_LAYERS, MAX_SHM_BYTES,
    MAX_TOKENS,
};
