//! Frame header and payload codecs: pure functions over byte slices (no I/O).
//! The layouts are documented in the crate docs.

use experts::{ExpertPairs, ExpertSet};

use crate::error::{ErrorCode, ProtoError, Result};
pub use crate::types::{FrameType, SetupMsg};
use crate::types::{Limits, LoadProgress, ModelIdentity, WorkerStats, MAX_ERROR_MESSAGE, MAX_EXPERTS, MAX_LAYERS};

/// `b"DFIP"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DFIP");
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 3;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 24;

impl FrameType {
    pub fn from_wire(v: u16) -> Result<Self> {
        Ok(match v {
            1 => FrameType::Hello,
            2 => FrameType::Setup,
            3 => FrameType::Ready,
            4 => FrameType::Eval,
            5 => FrameType::EvalDone,
            6 => FrameType::Ping,
            7 => FrameType::Pong,
            8 => FrameType::StatsRequest,
            9 => FrameType::StatsReply,
            10 => FrameType::Shutdown,
            11 => FrameType::Error,
            12 => FrameType::LoadProgress,
            found => return Err(ProtoError::UnknownFrameType { found }),
        })
    }

    /// Largest payload this frame type may carry; `limits` is `None` before the handshake
    /// (frames that need limits are then allowed no payload at all).
    pub fn max_payload(self, limits: Option<&Limits>) -> u64 {
        match self {
            FrameType::Hello => HELLO_FIXED as u64 + HELLO_MAX_SET_BYTES,
            FrameType::Setup => SETUP_LEN as u64,
            FrameType::Ready | FrameType::StatsRequest | FrameType::Shutdown => 0,
            FrameType::Eval => limits.map_or(0, Limits::max_eval_payload),
            FrameType::EvalDone => EVAL_DONE_LEN as u64,
            FrameType::Ping | FrameType::Pong => limits.map_or(0, Limits::input_area_bytes),
            FrameType::StatsReply => STATS_LEN as u64,
            FrameType::Error => 8 + u64::from(MAX_ERROR_MESSAGE),
            FrameType::LoadProgress => LOAD_PROGRESS_LEN as u64,
        }
    }
}

/// The fixed 24-byte header of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub frame_type: FrameType,
    pub request_id: u64,
    pub payload_len: u32,
}

impl Header {
    /// Encodes with this crate's magic and version (reserved field 0).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        encode_raw_header(MAGIC, PROTOCOL_VERSION, self.frame_type as u16, self.request_id, self.payload_len, 0)
    }

    /// Decodes and checks magic, version, type and the reserved field (not the length: that
    /// depends on the state of the connection).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic { expected: MAGIC, found: magic });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch { expected: PROTOCOL_VERSION, found: version });
        }
        let frame_type = FrameType::from_wire(u16::from_le_bytes([b[6], b[7]]))?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[8..16]);
        let payload_len = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        let reserved = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        if reserved != 0 {
            return Err(ProtoError::ReservedNonZero { found: reserved });
        }
        Ok(Header { frame_type, request_id: u64::from_le_bytes(id), payload_len })
    }

    /// Checks the payload length against the frame type's bound.
    pub fn check_len(&self, limits: Option<&Limits>) -> Result<()> {
        let limit = self.frame_type.max_payload(limits);
        if u64::from(self.payload_len) > limit {
            return Err(ProtoError::PayloadTooLarge {
                frame: self.frame_type,
                limit,
                found: u64::from(self.payload_len),
            });
        }
        Ok(())
    }
}

/// Any header, valid or not (tests and tools that speak bad frames on purpose).
pub fn encode_raw_header(magic: u32, version: u16, ty: u16, id: u64, len: u32, reserved: u32) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&magic.to_le_bytes());
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&ty.to_le_bytes());
    b[8..16].copy_from_slice(&id.to_le_bytes());
    b[16..20].copy_from_slice(&len.to_le_bytes());
    b[20..24].copy_from_slice(&reserved.to_le_bytes());
    b
}

pub(crate) const HELLO_FIXED: usize = 56;
const HELLO_MAX_SET_BYTES: u64 = MAX_LAYERS as u64 * (MAX_EXPERTS as u64).div_ceil(64) * 8;
pub(crate) const SETUP_LEN: usize = 40;
pub(crate) const EVAL_FIXED: usize = 16;
pub(crate) const EVAL_DONE_LEN: usize = 16;
pub(crate) const STATS_LEN: usize = 40;
pub(crate) const LOAD_PROGRESS_LEN: usize = 16;

/// A little-endian cursor that never reads past its slice.
struct Rd<'a> {
    b: &'a [u8],
    pos: usize,
    frame: FrameType,
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8], frame: FrameType) -> Self {
        Rd { b, pos: 0, frame }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(ProtoError::PayloadLength {
            frame: self.frame,
            expected: (self.pos as u64).saturating_add(n as u64),
            found: self.b.len() as u64,
        })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }

    fn zero_u32(&mut self, what: &'static str) -> Result<()> {
        let v = self.u32()?;
        if v != 0 {
            return Err(ProtoError::NonZero { what, found: u64::from(v) });
        }
        Ok(())
    }

    /// The payload must be consumed exactly.
    fn finish(&self) -> Result<()> {
        if self.pos != self.b.len() {
            return Err(ProtoError::PayloadLength {
                frame: self.frame,
                expected: self.pos as u64,
                found: self.b.len() as u64,
            });
        }
        Ok(())
    }
}

/// Checks that a payload has exactly `expected` bytes.
pub(crate) fn expect_len(frame: FrameType, payload: &[u8], expected: usize) -> Result<()> {
    if payload.len() != expected {
        return Err(ProtoError::PayloadLength { frame, expected: expected as u64, found: payload.len() as u64 });
    }
    Ok(())
}

// ---- Hello ----

pub fn encode_hello(out: &mut Vec<u8>, identity: &ModelIdentity, experts: &ExpertSet) {
    out.extend_from_slice(&identity.file_size.to_le_bytes());
    out.extend_from_slice(&identity.header_hash);
    out.extend_from_slice(&identity.n_layer.to_le_bytes());
    out.extend_from_slice(&identity.n_expert.to_le_bytes());
    out.extend_from_slice(&identity.n_embd.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let words_per_layer = words_per_layer(experts.n_expert());
    for ids in experts.layers() {
        let mut words = vec![0u64; words_per_layer];
        for &e in ids {
            words[e as usize / 64] |= 1u64 << (e % 64);
        }
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
}

/// u64 words of one layer's expert bitset.
fn words_per_layer(n_expert: u32) -> usize {
    n_expert.div_ceil(64) as usize
}

pub fn decode_hello(p: &[u8]) -> Result<(ModelIdentity, ExpertSet)> {
    let mut r = Rd::new(p, FrameType::Hello);
    let file_size = r.u64()?;
    let mut header_hash = [0u8; 32];
    header_hash.copy_from_slice(r.take(32)?);
    let n_layer = r.u32()?;
    let n_expert = r.u32()?;
    let n_embd = r.u32()?;
    r.zero_u32("Hello reserved field")?;
    let identity = ModelIdentity { file_size, header_hash, n_layer, n_expert, n_embd };
    identity.validate()?;
    let wpl = words_per_layer(n_expert);
    expect_len(FrameType::Hello, p, HELLO_FIXED + n_layer as usize * wpl * 8)?;
    let mut experts = ExpertSet::empty(n_layer, n_expert);
    for layer in 0..n_layer {
        for w in 0..wpl {
            let mut word = r.u64()?;
            while word != 0 {
                let expert = w as u32 * 64 + word.trailing_zeros();
                // Bits past n_expert must be clear.
                if expert >= n_expert {
                    return Err(ProtoError::ExpertOutOfRange { layer, expert, n_expert });
                }
                experts.insert(layer, expert).map_err(|_| ProtoError::ExpertOutOfRange { layer, expert, n_expert })?;
                word &= word - 1;
            }
        }
    }
    r.finish()?;
    Ok((identity, experts))
}

// ---- Setup ----

pub fn encode_setup(out: &mut Vec<u8>, s: &SetupMsg) {
    out.extend_from_slice(&s.limits.max_tokens.to_le_bytes());
    out.extend_from_slice(&s.limits.n_embd.to_le_bytes());
    out.extend_from_slice(&s.limits.max_experts_per_token.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&s.shm_len.to_le_bytes());
    out.extend_from_slice(&s.input_offset.to_le_bytes());
    out.extend_from_slice(&s.output_offset.to_le_bytes());
}

pub fn decode_setup(p: &[u8]) -> Result<SetupMsg> {
    expect_len(FrameType::Setup, p, SETUP_LEN)?;
    let mut r = Rd::new(p, FrameType::Setup);
    let limits = Limits { max_tokens: r.u32()?, n_embd: r.u32()?, max_experts_per_token: r.u32()? };
    r.zero_u32("Setup reserved field")?;
    let s = SetupMsg { limits, shm_len: r.u64()?, input_offset: r.u64()?, output_offset: r.u64()? };
    r.finish()?;
    Ok(s)
}

// ---- Eval ----

/// A decoded eval request: per token the experts it is routed to.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRequest {
    pub id: u64,
    pub layer: u32,
    pub pairs: ExpertPairs,
}

impl EvalRequest {
    pub fn n_tokens(&self) -> usize {
        self.pairs.n_tokens()
    }
}

/// Encodes an eval payload: the counts and ids of `pairs` as they lie. The caller has
/// checked them against the limits.
pub fn encode_eval(out: &mut Vec<u8>, layer: u32, pairs: &ExpertPairs) {
    out.extend_from_slice(&layer.to_le_bytes());
    out.extend_from_slice(&(pairs.n_tokens() as u32).to_le_bytes());
    out.extend_from_slice(&(pairs.n_pairs() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for c in pairs.counts() {
        out.extend_from_slice(&c.to_le_bytes());
    }
    for id in pairs.ids() {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

/// Decodes an eval payload and checks its internal consistency and the limits: token count,
/// pairs per token, sum of counts, exact length. Ownership and layer range are checked by
/// [`validate_eval`].
pub fn decode_eval(id: u64, p: &[u8], limits: &Limits) -> Result<EvalRequest> {
    let mut r = Rd::new(p, FrameType::Eval);
    let layer = r.u32()?;
    let n_tokens = r.u32()?;
    let n_pairs = r.u32()?;
    r.zero_u32("Eval reserved field")?;
    if n_tokens > limits.max_tokens {
        return Err(ProtoError::OutOfRange {
            what: "eval n_tokens",
            max: u64::from(limits.max_tokens),
            found: u64::from(n_tokens),
        });
    }
    let max_pairs = u64::from(n_tokens) * u64::from(limits.max_experts_per_token);
    if u64::from(n_pairs) > max_pairs {
        return Err(ProtoError::OutOfRange { what: "eval pairs", max: max_pairs, found: u64::from(n_pairs) });
    }
    let expected = EVAL_FIXED as u64 + 4 * u64::from(n_tokens) + 4 * u64::from(n_pairs);
    if p.len() as u64 != expected {
        return Err(ProtoError::PayloadLength { frame: FrameType::Eval, expected, found: p.len() as u64 });
    }
    let mut counts = Vec::with_capacity(n_tokens as usize);
    let mut sum = 0u64;
    for _ in 0..n_tokens {
        let c = r.u32()?;
        if c > limits.max_experts_per_token {
            return Err(ProtoError::OutOfRange {
                what: "experts per token",
                max: u64::from(limits.max_experts_per_token),
                found: u64::from(c),
            });
        }
        sum += u64::from(c);
        counts.push(c);
    }
    if sum != u64::from(n_pairs) {
        return Err(ProtoError::CountMismatch { what: "eval pair count (sum of per-token counts)", expected: u64::from(n_pairs), found: sum });
    }
    let mut ids = Vec::with_capacity(n_pairs as usize);
    for _ in 0..n_pairs {
        ids.push(r.u32()?);
    }
    r.finish()?;
    let pairs = ExpertPairs::from_counts(&counts, ids)
        .map_err(|_| ProtoError::CountMismatch { what: "eval pair count (sum of per-token counts)", expected: u64::from(n_pairs), found: sum })?;
    Ok(EvalRequest { id, layer, pairs })
}

/// Checks an eval against the worker's model and expert set: layer in range, every expert
/// owned, no expert twice for a token.
pub fn validate_eval(req: &EvalRequest, experts: &ExpertSet) -> Result<()> {
    if req.layer >= experts.n_layer() {
        return Err(ProtoError::LayerOutOfRange { layer: req.layer, n_layer: experts.n_layer() });
    }
    for (t, slots) in req.pairs.tokens().enumerate() {
        check_slots(t as u32, req.layer, slots, experts)?;
    }
    Ok(())
}

pub(crate) fn check_slots(token: u32, layer: u32, ids: &[u32], experts: &ExpertSet) -> Result<()> {
    for (i, &e) in ids.iter().enumerate() {
        if e >= experts.n_expert() {
            return Err(ProtoError::ExpertOutOfRange { layer, expert: e, n_expert: experts.n_expert() });
        }
        if !experts.contains(layer, e) {
            return Err(ProtoError::ExpertNotOwned { layer, expert: e });
        }
        if ids[..i].contains(&e) {
            return Err(ProtoError::DuplicateExpert { token, expert: e });
        }
    }
    Ok(())
}

// ---- EvalDone ----

pub fn encode_eval_done(out: &mut Vec<u8>, n_pairs: u32, compute_us: u64) {
    out.extend_from_slice(&n_pairs.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&compute_us.to_le_bytes());
}

/// Returns (n_pairs, compute_us).
pub fn decode_eval_done(p: &[u8]) -> Result<(u32, u64)> {
    expect_len(FrameType::EvalDone, p, EVAL_DONE_LEN)?;
    let mut r = Rd::new(p, FrameType::EvalDone);
    let n = r.u32()?;
    r.zero_u32("EvalDone reserved field")?;
    Ok((n, r.u64()?))
}

// ---- Stats ----

pub fn encode_stats(out: &mut Vec<u8>, s: &WorkerStats) {
    for v in [s.evals, s.tokens, s.pairs, s.compute_us, s.pings] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub fn decode_stats(p: &[u8]) -> Result<WorkerStats> {
    expect_len(FrameType::StatsReply, p, STATS_LEN)?;
    let mut r = Rd::new(p, FrameType::StatsReply);
    Ok(WorkerStats { evals: r.u64()?, tokens: r.u64()?, pairs: r.u64()?, compute_us: r.u64()?, pings: r.u64()? })
}

// ---- LoadProgress ----

pub fn encode_load_progress(out: &mut Vec<u8>, p: &LoadProgress) {
    out.extend_from_slice(&p.loaded.to_le_bytes());
    out.extend_from_slice(&p.total.to_le_bytes());
}

/// Decodes a progress report and checks it on its own (`loaded <= total`); its relation to
/// the earlier reports is the receiver's to check.
pub fn decode_load_progress(p: &[u8]) -> Result<LoadProgress> {
    expect_len(FrameType::LoadProgress, p, LOAD_PROGRESS_LEN)?;
    let mut r = Rd::new(p, FrameType::LoadProgress);
    let progress = LoadProgress { loaded: r.u64()?, total: r.u64()? };
    if progress.loaded > progress.total {
        return Err(ProtoError::OutOfRange { what: "bytes loaded (at most the total)", max: progress.total, found: progress.loaded });
    }
    Ok(progress)
}

// ---- Error ----

pub fn encode_error(out: &mut Vec<u8>, code: ErrorCode, message: &str) {
    // Cut at a char boundary so that the message stays UTF-8 and within the limit.
    let mut end = message.len().min(MAX_ERROR_MESSAGE as usize);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&code.0.to_le_bytes());
    out.extend_from_slice(&(end as u32).to_le_bytes());
    out.extend_from_slice(&message.as_bytes()[..end]);
}

pub fn decode_error(p: &[u8]) -> Result<(ErrorCode, String)> {
    let mut r = Rd::new(p, FrameType::Error);
    let code = ErrorCode(r.u32()?);
    let len = r.u32()?;
    if len > MAX_ERROR_MESSAGE {
        return Err(ProtoError::OutOfRange { what: "error message length", max: u64::from(MAX_ERROR_MESSAGE), found: u64::from(len) });
    }
    expect_len(FrameType::Error, p, 8 + len as usize)?;
    let bytes = r.take(len as usize)?;
    let message = std::str::from_utf8(bytes).map_err(|_| ProtoError::InvalidUtf8 { len: bytes.len() })?;
    Ok((code, message.to_owned()))
}
