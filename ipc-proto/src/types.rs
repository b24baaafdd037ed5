//! The values exchanged at the handshake and in requests.

use crate::error::{ProtoError, Result};

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

impl ModelIdentity {
    /// Checks the shape fields against the hard caps (a worker's own identity, or a Hello).
    pub fn validate(&self) -> Result<()> {
        check_range("n_layer", self.n_layer, 1, MAX_LAYERS)?;
        check_range("n_expert", self.n_expert, 1, MAX_EXPERTS)?;
        check_range("n_embd", self.n_embd, 1, MAX_EMBD)
    }
}

fn check_range(what: &'static str, v: u32, min: u32, max: u32) -> Result<()> {
    if v < min {
        return Err(ProtoError::Mismatch { what, expected: u64::from(min), found: u64::from(v) });
    }
    if v > max {
        return Err(ProtoError::OutOfRange { what, max: u64::from(max), found: u64::from(v) });
    }
    Ok(())
}

/// Sent by the daemon at the handshake; bounds every later frame and fixes the shared-memory
/// layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tokens in one eval (rows of the input and output areas).
    pub max_tokens: u32,
    /// Hidden size: f32 values per token row. Must equal the worker's `n_embd`.
    pub n_embd: u32,
    /// Most (expert, weight) pairs per token in one eval.
    pub max_experts_per_token: u32,
}

impl Limits {
    /// Checks the limits on their own (caps, overflow of the shared region size).
    pub fn validate(&self) -> Result<()> {
        check_range("max_tokens", self.max_tokens, 1, MAX_TOKENS)?;
        check_range("n_embd", self.n_embd, 1, MAX_EMBD)?;
        check_range("max_experts_per_token", self.max_experts_per_token, 1, MAX_EXPERTS)?;
        crate::shm::ShmLayout::for_limits(self).map(|_| ())
    }

    /// Checks the limits against the worker's model: same `n_embd`, `max_experts_per_token`
    /// at most `n_expert`.
    pub fn validate_for(&self, identity: &ModelIdentity) -> Result<()> {
        self.validate()?;
        if self.n_embd != identity.n_embd {
            return Err(ProtoError::Mismatch {
                what: "limits n_embd (model n_embd)",
                expected: u64::from(identity.n_embd),
                found: u64::from(self.n_embd),
            });
        }
        check_range("max_experts_per_token", self.max_experts_per_token, 1, identity.n_expert)
    }

    /// Bytes of one activation area (`max_tokens * n_embd` f32).
    pub fn area_bytes(&self) -> u64 {
        u64::from(self.max_tokens) * u64::from(self.n_embd) * 4
    }

    /// Largest Eval payload these limits allow.
    pub fn max_eval_payload(&self) -> u64 {
        let t = u64::from(self.max_tokens);
        16 + 4 * t + 8 * t * u64::from(self.max_experts_per_token)
    }
}

/// Per layer, the set of experts a worker owns (a bitset of `n_expert` bits per layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertSet {
    n_layer: u32,
    n_expert: u32,
    words: Vec<u64>,
}

impl ExpertSet {
    /// An empty set for a model of `n_layer` layers of `n_expert` experts.
    pub fn new(n_layer: u32, n_expert: u32) -> Result<Self> {
        check_range("n_layer", n_layer, 1, MAX_LAYERS)?;
        check_range("n_expert", n_expert, 1, MAX_EXPERTS)?;
        let words = vec![0; n_layer as usize * Self::words_per_layer_for(n_expert)];
        Ok(ExpertSet { n_layer, n_expert, words })
    }

    /// Every expert of every layer.
    pub fn full(n_layer: u32, n_expert: u32) -> Result<Self> {
        let mut s = Self::new(n_layer, n_expert)?;
        for layer in 0..n_layer {
            for e in 0..n_expert {
                s.insert(layer, e)?;
            }
        }
        Ok(s)
    }

    pub(crate) fn words_per_layer_for(n_expert: u32) -> usize {
        n_expert.div_ceil(64) as usize
    }

    pub fn n_layer(&self) -> u32 {
        self.n_layer
    }

    pub fn n_expert(&self) -> u32 {
        self.n_expert
    }

    fn check(&self, layer: u32, expert: u32) -> Result<()> {
        if layer >= self.n_layer {
            return Err(ProtoError::LayerOutOfRange { layer, n_layer: self.n_layer });
        }
        if expert >= self.n_expert {
            return Err(ProtoError::ExpertOutOfRange { layer, expert, n_expert: self.n_expert });
        }
        Ok(())
    }

    fn index(&self, layer: u32, expert: u32) -> (usize, u64) {
        let w = layer as usize * Self::words_per_layer_for(self.n_expert) + expert as usize / 64;
        (w, 1u64 << (expert % 64))
    }

    /// Adds `expert` of `layer`; errors name the out-of-range value.
    pub fn insert(&mut self, layer: u32, expert: u32) -> Result<()> {
        self.check(layer, expert)?;
        let (w, bit) = self.index(layer, expert);
        self.words[w] |= bit;
        Ok(())
    }

    /// Whether the set holds `expert` of `layer` (false when out of range).
    pub fn contains(&self, layer: u32, expert: u32) -> bool {
        if self.check(layer, expert).is_err() {
            return false;
        }
        let (w, bit) = self.index(layer, expert);
        self.words[w] & bit != 0
    }

    /// The experts of `layer`, ascending (empty when `layer` is out of range).
    pub fn experts(&self, layer: u32) -> Vec<u32> {
        (0..self.n_expert).filter(|&e| self.contains(layer, e)).collect()
    }

    /// Number of (layer, expert) pairs in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }

    /// Rebuilds a set from its wire words; bits past `n_expert` must be clear.
    pub(crate) fn from_words(n_layer: u32, n_expert: u32, words: Vec<u64>) -> Result<Self> {
        let s = ExpertSet::new(n_layer, n_expert)?;
        if words.len() != s.words.len() {
            return Err(ProtoError::CountMismatch {
                what: "expert set words",
                expected: s.words.len() as u64,
                found: words.len() as u64,
            });
        }
        let wpl = Self::words_per_layer_for(n_expert);
        let tail_bits = n_expert % 64;
        if tail_bits != 0 {
            let mask = !((1u64 << tail_bits) - 1);
            for layer in 0..n_layer {
                let last = words[layer as usize * wpl + wpl - 1];
                if last & mask != 0 {
                    let expert = (wpl as u32 - 1) * 64 + (last & mask).trailing_zeros();
                    return Err(ProtoError::ExpertOutOfRange { layer, expert, n_expert });
                }
            }
        }
        Ok(ExpertSet { n_layer, n_expert, words })
    }
}

/// One token's selected experts and their weights, as sent to a worker (only the pairs the
/// worker owns). `ids` and `weights` must have the same length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertSlots<'a> {
    pub ids: &'a [u32],
    pub weights: &'a [f32],
}

/// Counters a worker reports on a stats request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Eval requests served.
    pub evals: u64,
    /// Tokens over all evals.
    pub tokens: u64,
    /// (expert, weight) pairs over all evals.
    pub pairs: u64,
    /// Worker-reported compute time over all evals, µs.
    pub compute_us: u64,
    /// Pings answered.
    pub pings: u64,
}
