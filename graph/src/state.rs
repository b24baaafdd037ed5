//! Per-sequence state on the model's backend: the raw key ring, and for compressed layers
//! the compressor's open-window rows and the compressed entries (plus the indexer's own).
//! The host keeps only the position; see `plan` for how rows are addressed.
//!
//! A sequence's state at position `p` can be copied to the host and written back into any
//! sequence of the same model (`checkpoint`, `entries`, `restore`): everything a later step
//! reads is (a) the ring slots of positions p − window .. p, (b) each compressor's open-window
//! rows of positions `keep_start(p)` .. p, and (c) the entries of the windows closed before
//! p (entry j for j < p / ratio). (a) and (b) are overwritten as the sequence advances, so a
//! [`Checkpoint`] holds them for one position; (c) only grows (entry j is written once, when
//! window j closes), so one [`Entries`] copy serves every checkpoint at or before its
//! position. Every other row is masked or never gathered at p, whatever it holds.
use std::ops::Range;

use ggml::{Buffer, Context};
use loader::Ds4Config;

use crate::ops::T;
use crate::plan::CompShape;
use crate::GraphError;

pub struct CompState {
    pub shape: CompShape,
    /// [2·width, state_rows + 2]: the open windows' rows, each its kv (`width` values) and
    /// then its score (gate + position bias, `width` values) side by side; then the dummy row
    /// (kv 0, score −∞); then a spare column, where a decode step puts its token's row so
    /// that the rows are read in place (`plan`'s row layout without a copy).
    pub kv_score: T,
    /// [entry_dim, cap_entries]: compressed entries.
    pub entries: T,
}

pub struct LayerState {
    /// [head_dim, window + 1]: raw keys (= values) of the last `window` positions; the last
    /// column is spare, where a decode step puts its token's key so that the raw keys (ring ++
    /// batch) are read in place.
    pub ring: T,
    pub comp: Option<CompState>,
    pub index: Option<CompState>,
}

/// One sequence's caches. Created for a maximum context; `reset` makes it empty again.
pub struct Sequence {
    pub(crate) layers: Vec<LayerState>,
    pub(crate) id: u64,
    pub(crate) model_id: u64,
    pos: usize,
    n_ctx: usize,
    _buffer: Buffer,
    _ctx: Context,
}

impl Sequence {
    pub(crate) fn new(c: &Ds4Config, n_ctx: usize, buft: ggml::BufferType) -> Result<Sequence, GraphError> {
        let ctx = Context::new_no_alloc(c.n_layer * 8 + 8, 0)?;
        let g = crate::ops::Ctx { raw: ctx.as_ptr() };
        let (d, di) = (c.head_dim as i64, c.indexer_dim as i64);
        let comp = |ratio: usize, width: i64, entry_dim: i64| -> CompState {
            let shape = CompShape::new(ratio, n_ctx);
            let rows = shape.state_rows() as i64 + 2;
            CompState {
                shape,
                kv_score: g.new_f32(&[2 * width, rows]),
                entries: g.new_f32(&[entry_dim, shape.cap_entries as i64]),
            }
        };
        let layers: Vec<LayerState> = (0..c.n_layer)
            .map(|l| {
                let ratio = c.compress_ratios[l];
                let mult = if ratio == 4 { 2 } else { 1 };
                LayerState {
                    ring: g.new_f32(&[d, c.window as i64 + 1]),
                    comp: (ratio != 0).then(|| comp(ratio, mult * d, d)),
                    index: (ratio == 4).then(|| comp(ratio, 2 * di, di)),
                }
            })
            .collect();
        let buffer = Buffer::alloc_context_tensors(&ctx, buft)?;
        buffer.clear(0);
        for cs in layers.iter().flat_map(|l| l.comp.iter().chain(l.index.iter())) {
            let width = cs.kv_score.ne(0) as usize / 2;
            let dummy_col = cs.shape.state_rows();
            let neg: Vec<u8> = f32::NEG_INFINITY.to_le_bytes().repeat(width);
            let at = dummy_col * cs.kv_score.nb(1) + width * cs.kv_score.elem_size();
            // SAFETY: the score half of the dummy column lies inside the allocated tensor.
            unsafe { ggml::backend::tensor_set(cs.kv_score.0, &neg, at) };
        }
        Ok(Sequence { layers, id: 0, model_id: 0, pos: 0, n_ctx, _buffer: buffer, _ctx: ctx })
    }

    /// Tokens processed so far (the next token's position).
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Forget everything: every cached row is addressed by position, so stale rows are
    /// never visible again.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.pos += n;
    }

    /// The ring slots and open-window rows a step at the current position reads, copied to
    /// the host.
    pub fn checkpoint(&self) -> Checkpoint {
        let pos = self.pos;
        let mut bytes = vec![0u8; self.checkpoint_len(pos)];
        let mut at = 0;
        for (t, cols) in self.live_columns(pos) {
            let len = cols.len() * t.nb(1);
            // SAFETY: `cols` lies inside the tensor's columns (`live_columns`), and the tensor
            // lives in this sequence's buffer.
            unsafe { ggml::backend::tensor_get(t.0, &mut bytes[at..at + len], cols.start * t.nb(1)) };
            at += len;
        }
        Checkpoint { pos, bytes }
    }

    /// The compressed entries of the first `until` tokens (at most the current position):
    /// per compressor, entries 0 .. until / ratio.
    pub fn entries(&self, until: usize) -> Result<Entries, GraphError> {
        if until > self.pos {
            return Err(GraphError::State(format!("entries up to position {until} were asked of a sequence at position {}", self.pos)));
        }
        let parts = self
            .compressors()
            .map(|cs| {
                let (ratio, row_bytes) = (cs.shape.ratio, cs.entries.nb(1));
                let mut bytes = vec![0u8; (until / ratio) * row_bytes];
                // SAFETY: until ≤ pos ≤ n_ctx, so until / ratio entries fit the tensor
                // (`CompShape::cap_entries`).
                unsafe { ggml::backend::tensor_get(cs.entries.0, &mut bytes, 0) };
                EntryPart { ratio, row_bytes, bytes }
            })
            .collect();
        Ok(Entries { pos: until, parts })
    }

    /// Make this sequence stand where the one `cp` was taken from stood: its ring slots and
    /// open-window rows, and the entries before `cp.pos()` from `entries` (taken from a
    /// sequence of the same tokens at or after that position). Checked before anything is
    /// written: on error the sequence is unchanged.
    pub fn restore(&mut self, cp: &Checkpoint, entries: &Entries) -> Result<(), GraphError> {
        let pos = cp.pos;
        if pos > self.n_ctx {
            return Err(GraphError::State(format!("a checkpoint at position {pos} does not fit a context of {} tokens", self.n_ctx)));
        }
        if entries.pos < pos {
            return Err(GraphError::State(format!("entries up to position {} cannot restore a checkpoint at position {pos}", entries.pos)));
        }
        let want = self.checkpoint_len(pos);
        if cp.bytes.len() != want {
            return Err(GraphError::State(format!("the checkpoint at position {pos} has {} bytes; this model's state there has {want}", cp.bytes.len())));
        }
        let n_comp = self.compressors().count();
        if entries.parts.len() != n_comp {
            return Err(GraphError::State(format!("the entries have {} compressors; this model has {n_comp}", entries.parts.len())));
        }
        for (i, (cs, part)) in self.compressors().zip(&entries.parts).enumerate() {
            let (ratio, row_bytes) = (cs.shape.ratio, cs.entries.nb(1));
            if (part.ratio, part.row_bytes) != (ratio, row_bytes) || part.bytes.len() != (entries.pos / ratio) * row_bytes {
                return Err(GraphError::State(format!(
                    "compressor {i}'s entries up to position {} are {} bytes of ratio {} and rows of {} bytes; this model's are {} bytes of ratio {ratio} and rows of {row_bytes}",
                    entries.pos,
                    part.bytes.len(),
                    part.ratio,
                    part.row_bytes,
                    (entries.pos / ratio) * row_bytes,
                )));
            }
        }
        let mut at = 0;
        for (t, cols) in self.live_columns(pos) {
            let len = cols.len() * t.nb(1);
            // SAFETY: as in `checkpoint`; the length was checked above.
            unsafe { ggml::backend::tensor_set(t.0, &cp.bytes[at..at + len], cols.start * t.nb(1)) };
            at += len;
        }
        for (cs, part) in self.compressors().zip(&entries.parts) {
            let len = (pos / cs.shape.ratio) * cs.entries.nb(1);
            // SAFETY: pos ≤ n_ctx, so pos / ratio entries fit the tensor.
            unsafe { ggml::backend::tensor_set(cs.entries.0, &part.bytes[..len], 0) };
        }
        self.pos = pos;
        Ok(())
    }

    /// Bytes of a checkpoint at `pos`.
    fn checkpoint_len(&self, pos: usize) -> usize {
        self.live_columns(pos).map(|(t, cols)| cols.len() * t.nb(1)).sum()
    }

    /// Every compressor (attention, then the indexer's, per layer in order).
    fn compressors(&self) -> impl Iterator<Item = &CompState> {
        self.layers.iter().flat_map(|l| l.comp.iter().chain(l.index.iter()))
    }

    /// The columns a step at `pos` reads from the ring and the open-window rows, in a fixed
    /// order: per layer the ring, the compressor, the indexer's compressor.
    fn live_columns(&self, pos: usize) -> impl Iterator<Item = (T, Range<usize>)> + '_ {
        self.layers.iter().flat_map(move |l| {
            let window = l.ring.ne(1) as usize - 1; // without the spare column
            let ring = slot_ranges(pos.saturating_sub(window)..pos, window).map(move |r| (l.ring, r));
            let comps = l.comp.iter().chain(l.index.iter()).flat_map(move |cs| {
                slot_ranges(cs.shape.keep_start(pos)..pos, cs.shape.state_rows()).map(move |r| (cs.kv_score, r))
            });
            ring.chain(comps)
        })
    }
}

/// The slots of positions `positions` (at most `cap` of them) in a ring of `cap` slots where
/// position q lives in slot q mod cap: one range, or two when they wrap.
fn slot_ranges(positions: Range<usize>, cap: usize) -> impl Iterator<Item = Range<usize>> {
    let n = positions.len().min(cap);
    let start = if n == cap { 0 } else { positions.start % cap };
    let first = start..(start + n).min(cap);
    let wrapped = 0..(start + n).saturating_sub(cap);
    [first, wrapped].into_iter().filter(|r| !r.is_empty())
}

/// A sequence's ring slots and open-window rows at one position, on the host (see the
/// module documentation): with [`Entries`] of the same tokens it restores the sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pos: usize,
    bytes: Vec<u8>,
}

impl Checkpoint {
    /// A checkpoint read back from storage; [`Sequence::restore`] checks its size.
    pub fn from_bytes(pos: usize, bytes: Vec<u8>) -> Checkpoint {
        Checkpoint { pos, bytes }
    }

    /// The position it was taken at (tokens processed).
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The compressed entries of a sequence's first `pos` tokens, on the host: per compressor
/// (attention, then the indexer's, per layer in order) entries 0 .. pos / ratio.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entries {
    pos: usize,
    parts: Vec<EntryPart>,
}

/// One compressor's entries: `bytes` holds entries 0 .. pos / ratio, `row_bytes` each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryPart {
    pub ratio: usize,
    pub row_bytes: usize,
    pub bytes: Vec<u8>,
}

impl Entries {
    /// Entries read back from storage; [`Sequence::restore`] checks their shapes.
    pub fn from_parts(pos: usize, parts: Vec<EntryPart>) -> Entries {
        Entries { pos, parts }
    }

    /// The tokens they cover.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn parts(&self) -> &[EntryPart] {
        &self.parts
    }

    /// Bytes held.
    pub fn len_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes.len()).sum()
    }

    /// The entries of the first `pos` tokens (at most those they cover).
    pub fn prefix(&self, pos: usize) -> Result<Entries, GraphError> {
        if pos > self.pos {
            return Err(GraphError::State(format!("entries up to position {pos} were asked of entries up to {}", self.pos)));
        }
        let parts = self
            .parts
            .iter()
            .map(|p| {
                let len = (pos / p.ratio.max(1)) * p.row_bytes;
                let bytes = p.bytes.get(..len).ok_or_else(|| GraphError::State(format!("compressor entries of {} bytes end before position {pos}", p.bytes.len())))?;
                Ok(EntryPart { ratio: p.ratio, row_bytes: p.row_bytes, bytes: bytes.to_vec() })
            })
            .collect::<Result<_, GraphError>>()?;
        Ok(Entries { pos, parts })
    }
}

#[cfg(test)]
mod tests {
    use super::slot_ranges;

    #[test]
    fn slot_ranges_cover_each_position_once_in_its_slot() {
        for cap in [1usize, 4, 8, 9] {
            for start in 0..20 {
                for n in 0..=cap {
                    let slots: Vec<usize> = slot_ranges(start..start + n, cap).flatten().collect();
                    let mut want: Vec<usize> = (start..start + n).map(|q| q % cap).collect();
                    want.sort_unstable();
                    let mut got = slots.clone();
                    got.sort_unstable();
                    assert_eq!(got, want, "positions {start}..{} in {cap} slots", start + n);
                    assert!(slot_ranges(start..start + n, cap).count() <= 2);
                }
            }
        }
    }
}
