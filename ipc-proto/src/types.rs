//! The values exchanged at the handshake and in requests: plain data, the bottom of the
//! crate (it imports no other module). Their checks against the caps are in `checks`, the
//! codecs in `frame`. The expert set and the per-token pairs are the `experts` crate's.

/// Hard caps that bound the handshake frames, before any limit has been agreed.
pub const MAX_LAYERS: u32 = 512;
/// See [`MAX_LAYERS`].
pub const MAX_EXPERTS: u32 = 1024;
/// Largest hidden size accepted in an identity or in the limits.
pub const MAX_EMBD: u32 = 1 << 16;
/// Largest `max_tokens` accepted in the limits.
pub const MAX_TOKENS: u32 = 1 << 16;
/// Largest shared region (input + output areas) a worker maps.
pub const MAX_SHM_BYTES: u64 = 16 << 30;
/// Longest message of an `Error` frame.
pub const MAX_ERROR_MESSAGE: u32 = 4096;

/// Which model a worker serves: compared field by field at the handshake.
/// `header_hash` is a hash of the GGUF header and tensor table, computed by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelIdentity {
    pub file_size: u64,
    pub header_hash: [u8; 32],
    pub n_layer: u32,
    pub n_expert: u32,
    pub n_embd: u32,
}

impl std::fmt::Display for ModelIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{{file_size {}, header_hash ", self.file_size)?;
        for b in &self.header_hash {
            write!(f, "{b:02x}")?;
        }
        write!(f, ", n_layer {}, n_expert {}, n_embd {}}}", self.n_layer, self.n_expert, self.n_embd)
    }
}

/// Sent by the daemon at the handshake; bounds every later frame and fixes the shared-memory
/// layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tokens in one eval (rows of the input area).
    pub max_tokens: u32,
    /// Hidden size: f32 values per token row. Must equal the worker's `n_embd`.
    pub n_embd: u32,
    /// Most experts per token in one eval.
    pub max_experts_per_token: u32,
}

impl Limits {
    /// Most (token, expert) pairs in one eval (rows of the output area).
    pub fn max_pairs(&self) -> u64 {
        u64::from(self.max_tokens) * u64::from(self.max_experts_per_token)
    }

    /// Bytes of the input area (`max_tokens * n_embd` f32).
    pub fn input_area_bytes(&self) -> u64 {
        u64::from(self.max_tokens) * u64::from(self.n_embd) * 4
    }

    /// Bytes of the output area (`max_pairs * n_embd` f32).
    pub fn output_area_bytes(&self) -> u64 {
        self.max_pairs() * u64::from(self.n_embd) * 4
    }

    /// Largest Eval payload these limits allow.
    pub fn max_eval_payload(&self) -> u64 {
        16 + 4 * u64::from(self.max_tokens) + 4 * self.max_pairs()
    }
}

/// Where the two activation areas lie in the shared region (fixed by the limits), as the
/// `Setup` frame carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupMsg {
    pub limits: Limits,
    pub shm_len: u64,
    pub input_offset: u64,
    pub output_offset: u64,
}

/// Frame types. The number is the wire value (`frame` decodes and bounds them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameType {
    Hello = 1,
    Setup = 2,
    Ready = 3,
    Eval = 4,
    EvalDone = 5,
    Ping = 6,
    Pong = 7,
    StatsRequest = 8,
    StatsReply = 9,
    Shutdown = 10,
    Error = 11,
    LoadProgress = 12,
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self)
    }
}

/// Counters a worker reports on a stats request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Eval requests served.
    pub evals: u64,
    /// Tokens over all evals.
    pub tokens: u64,
    /// (token, expert) pairs over all evals.
    pub pairs: u64,
    /// Worker-reported compute time over all evals, µs.
    pub compute_us: u64,
    /// Pings answered.
    pub pings: u64,
}

/// How far a starting worker has loaded its experts (the `LoadProgress` frame): bytes of
/// expert weights in memory so far, of `total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadProgress {
    pub loaded: u64,
    pub total: u64,
}
