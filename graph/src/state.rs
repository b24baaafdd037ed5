//! Per-sequence state on the model's backend: the raw key ring, and for compressed layers
//! the compressor's open-window rows and the compressed entries (plus the indexer's own).
//! The host keeps only the position; see `plan` for how rows are addressed.
use ggml::{Buffer, Context};
use loader::Ds4Config;

use crate::ops::T;
use crate::plan::CompShape;
use crate::GraphError;

pub struct CompState {
    pub shape: CompShape,
    /// [2·width, state_rows + 1]: the open windows' rows, each its kv (`width` values) and
    /// then its score (gate + position bias, `width` values) side by side; the last column is
    /// the dummy row (kv 0, score −∞).
    pub kv_score: T,
    /// [entry_dim, cap_entries]: compressed entries.
    pub entries: T,
}

pub struct LayerState {
    /// [head_dim, window]: raw keys (= values) of the last `window` positions.
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
            let rows = shape.state_rows() as i64 + 1;
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
                    ring: g.new_f32(&[d, c.window as i64]),
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
}
