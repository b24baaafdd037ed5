//! Attention of one layer: low-rank queries, one shared K=V head, the raw sliding window,
//! compressed entries (all visible ones on HCA layers, the lightning indexer's top-k on CSA
//! layers), per-head sinks, inverse RoPE on the output and the grouped output projection.
use crate::builder::{Builder, CompInputs};
use crate::ops::{Ctx, RopeParams, T};
use crate::plan::QueryBlock;
use crate::state::{CompState, LayerState, Sequence};
use crate::weights::{Compressor, LayerWeights};

/// One layer's position-independent attention projections over the step's columns (RoPE
/// takes each column's own position), computed once and viewed per sequence.
#[derive(Clone, Copy)]
struct Projections {
    /// Queries, normed and roped [d, h, n].
    q: T,
    /// The one K=V head, normed and roped [d, n].
    kv: T,
    /// The compressor's rows, kv ++ score [2·width, n] (compressed layers).
    comp: Option<T>,
    /// The lightning indexer's (CSA layers).
    index: Option<IndexProjections>,
}

#[derive(Clone, Copy)]
struct IndexProjections {
    /// Queries, roped [di, hi, n].
    q: T,
    /// Per-head weights [hi, n].
    wts: T,
    /// Its compressor's rows [2·width, n].
    comp: T,
}

impl Projections {
    /// The columns [first, first + n) of every projection (a view each).
    fn columns(&self, g: &Ctx, first: i64, n: i64) -> Projections {
        let cols = |t: T| g.view_2d(t, t.ne(0), n, 0, first); // [rows, n]
        let heads = |t: T| g.view_3d(t, [t.ne(0), t.ne(1), n], t.nb(1), t.nb(2), first as usize * t.nb(2)); // [d, h, n]
        Projections {
            q: heads(self.q),
            kv: cols(self.kv),
            comp: self.comp.map(cols),
            index: self.index.map(|ip| IndexProjections { q: heads(ip.q), wts: cols(ip.wts), comp: cols(ip.comp) }),
        }
    }
}

/// What a sequence's tokens attend to besides the raw keys (over all its columns).
enum Extra {
    /// Nothing (ratio-0 layers).
    None,
    /// Every entry, masked to the visible ones of this ratio (HCA; the mask is shared by
    /// the layers of the ratio).
    Visible { entries: T, ratio: usize },
    /// Every entry, masked [n_view, n] to each token's selected ones (CSA, dense form).
    Masked { entries: T, mask: T },
    /// Each token's own selected entries [d, k, n] and their mask [k, n] (CSA, gathered).
    Gathered { sel: T, mask: T },
}

impl Extra {
    /// The ratio whose mask the layers share (0: the raw keys' alone); None for a layer's own.
    fn shared_ratio(&self) -> Option<usize> {
        match *self {
            Extra::None => Some(0),
            Extra::Visible { ratio, .. } => Some(ratio),
            Extra::Masked { .. } | Extra::Gathered { .. } => None,
        }
    }
}

/// A mask kept for the step's layers: per sequence, compressor ratio (0: the raw keys'
/// alone), query block, and type (F16 for flash attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaskKey {
    pub seq: usize,
    pub ratio: usize,
    pub block: usize,
    pub f16: bool,
}

/// Columns [q0, q0 + n) of a [rows, n_all] matrix (all of it for the only block).
fn block_cols(g: &Ctx, t: T, b: QueryBlock, one: bool) -> T {
    if one {
        t
    } else {
        g.view_2d(t, t.ne(0), b.n as i64, 0, b.q0 as i64)
    }
}

/// `parts` concatenated along `dim`, pairwise (each element copied log2(parts) times, not
/// up to parts times).
fn concat_all(g: &Ctx, mut parts: Vec<T>, dim: i32) -> T {
    while parts.len() > 1 {
        parts = parts.chunks(2).map(|c| if let [a, b] = c { g.concat(*a, *b, dim) } else { c[0] }).collect();
    }
    parts.pop().unwrap_or_else(|| unreachable!("a sequence has at least one query block"))
}

impl Builder<'_> {
    pub fn rope_params(&self, il: usize) -> RopeParams {
        let c = self.c;
        if c.compress_ratios[il] == 0 {
            return RopeParams::plain(c.rope_base);
        }
        match &c.yarn {
            Some(y) => RopeParams::yarn(c.compress_rope_base, y),
            None => RopeParams::plain(c.compress_rope_base),
        }
    }

    /// `x`: the attention input [n_embd, n] (already attn_norm'ed), the step's sequences'
    /// columns one after another. The projections run once over all the columns (RoPE
    /// takes each column's position); each sequence attends over its own columns with its
    /// own state and inputs; the heads, side by side again, go through the inverse RoPE and
    /// the output projection once.
    pub fn attention(&mut self, il: usize, x: T, w: &LayerWeights, seqs: &[&Sequence]) -> T {
        let g = self.g;
        let rope = self.rope_params(il);
        let all = self.project(il, x, w);
        let mut heads: Option<T> = None;
        for (i, seq) in seqs.iter().enumerate() {
            self.cur = i;
            let si = self.si();
            let p = if seqs.len() == 1 { all } else { all.columns(g, si.first as i64, si.n as i64) };
            let h = self.attend(il, &p, w, &seq.layers[il], &rope);
            heads = Some(match heads {
                Some(prev) => g.concat(prev, h, 2),
                None => h,
            });
        }
        let heads = heads.unwrap_or_else(|| unreachable!("a step has at least one sequence"));
        self.attention_out(il, heads, w, &rope)
    }

    /// The layer's position-independent projections over all the step's columns `x`.
    fn project(&self, il: usize, x: T, w: &LayerWeights) -> Projections {
        let (g, c) = (self.g, self.c);
        let (d, h, n) = (c.head_dim as i64, c.n_head as i64, x.ne(1));
        let n_rot = c.n_rot as i64;
        let rope = self.rope_params(il);
        let eps = c.rms_eps;
        let pos = self.inp.pos;

        // Queries: q_a → norm → q_b → per-head unweighted RMSNorm → RoPE on the trailing dims.
        let qr = g.mul(g.rms_norm(g.mm(w.q_a, x), eps), w.q_a_norm);
        let qr = g.name(qr, &format!("q_lora-{il}"));
        let q = g.rms_norm(g.reshape(g.mm(w.q_b, qr), &[d, h, n]), eps);
        let q = g.name(g.rope(q, pos, n_rot, d - n_rot, &rope), &format!("q-{il}"));

        // The one K=V head.
        let kv = g.mul(g.rms_norm(g.mm(w.kv, x), eps), w.kv_norm);
        let kv = g.rope(g.reshape(kv, &[d, 1, n]), pos, n_rot, d - n_rot, &rope);
        let kv = g.name(g.reshape(kv, &[d, n]), &format!("kv-{il}"));

        let ratio = c.compress_ratios[il];
        let comp = w.compressor.as_ref().map(|cw| self.compressor_rows(x, cw, ratio));
        let index = w.indexer.as_ref().map(|iw| {
            let (di, hi) = (c.indexer_dim as i64, c.indexer_heads as i64);
            let q = g.reshape(g.mm(iw.q_b, qr), &[di, hi, n]);
            let q = g.rope(q, pos, n_rot, di - n_rot, &rope);
            let wts = g.scale(g.mm(iw.proj, x), 1.0 / ((di * hi) as f32).sqrt()); // [hi, n]
            IndexProjections { q, wts, comp: self.compressor_rows(x, &iw.compressor, ratio) }
        });
        Projections { q, kv, comp, index }
    }

    /// A compressor's rows of the columns `x`: each its kv ++ its score (gate + the position
    /// bias of its place in its window) [2·width, n].
    fn compressor_rows(&self, x: T, cw: &Compressor, ratio: usize) -> T {
        let g = self.g;
        let kv = g.mm(cw.kv, x); // [width, n]
        let score = g.add(g.mm(cw.gate, x), g.get_rows(cw.ape, self.ape_idx(ratio)));
        g.concat(kv, score, 0)
    }

    /// One sequence's attention over its columns `p` of the projections, with its state:
    /// the heads [d, h, n] (maybe a permuted view).
    fn attend(&mut self, il: usize, p: &Projections, w: &LayerWeights, st: &LayerState, rope: &RopeParams) -> T {
        let (g, c) = (self.g, self.c);
        let (d, q, kv) = (c.head_dim as i64, p.q, p.kv);
        let n = q.ne(2);

        // Raw keys: the ring (last `window` positions before the batch) ++ the batch; a
        // decode token's key goes into the ring's spare column (read in place), a batch of
        // several is appended to a copy.
        let window = st.ring.ne(1) - 1;
        let ring = g.view_2d(st.ring, d, window, 0, 0);
        let raw = if n == 1 { g.set_cols(st.ring, kv, window) } else { g.concat(ring, kv, 1) };
        let raw = g.name(raw, &format!("raw_kv-{il}"));
        // The ring after the batch: a decode token's key into its slot, or every slot's key
        // (`RowUpdate`).
        let ring_keep = self.si().ring_keep;
        self.effects.push(if n == 1 { g.set_rows(st.ring, kv, ring_keep) } else { g.cpy(g.get_rows(raw, ring_keep), ring) });

        let scale = 1.0 / (d as f32).sqrt();
        // Every key a token may attend to besides the raw ones: (compressed layers) every
        // entry, masked to the visible ones (HCA) or to the indexer's top-k (CSA, dense
        // form); or, for CSA over many entries, each token's own gathered entries.
        let comp = w.compressor.as_ref().zip(p.comp).zip(st.comp.as_ref());
        let extra = match (comp, &p.index) {
            (Some(((cw, rows), cs)), Some(ip)) => {
                let ci = self.comp_inputs(cs.shape.ratio);
                let entries = self.compress(il, "csa", rows, cw, cs, ci, rope);
                let top = self.indexer_top_k(il, ip, w, st, ci, rope);
                let vis = g.reshape(ci.vis_mask, &[1, ci.n_view as i64, n]);
                // Each selected entry's visibility (an entry is selected among invisible
                // ones only when fewer than k are visible): [1, k, n].
                let sel_vis = g.get_rows(vis, top);
                if ci.n_view <= self.csa_dense_max_view {
                    // −inf everywhere but at each token's selected entries.
                    let mask = g.reshape(g.set_rows(g.fill(vis, f32::NEG_INFINITY), sel_vis, top), &[ci.n_view as i64, n]);
                    Extra::Masked { entries, mask }
                } else {
                    let k_sel = top.ne(0);
                    let sel = g.reshape(g.get_rows(entries, g.reshape(top, &[k_sel * n])), &[d, k_sel, n]);
                    Extra::Gathered { sel, mask: g.reshape(sel_vis, &[k_sel, n]) }
                }
            }
            (Some(((cw, rows), cs)), None) => {
                let ci = self.comp_inputs(cs.shape.ratio);
                let entries = self.compress(il, "hca", rows, cw, cs, ci, rope);
                Extra::Visible { entries, ratio: ci.ratio }
            }
            _ => Extra::None,
        };
        // The query blocks of the plan (one with flash attention, which skips masked keys itself).
        let blocks: Vec<QueryBlock> = self.si().raw_blocks.iter().map(|&(b, _)| b).collect();
        let one = blocks.len() == 1;
        if self.flash && !matches!(extra, Extra::Gathered { .. }) {
            let (keys, mask) = self.block_keys(0, blocks[0], true, raw, &extra);
            let mask = match extra.shared_ratio() {
                Some(ratio) => *self.masks.entry(MaskKey { seq: self.cur, ratio, block: 0, f16: true }).or_insert_with(|| g.to_f16(mask)),
                None => g.to_f16(mask),
            };
            return g.flash_attn_sinks(g.permute(q, [0, 2, 1, 3]), keys, mask, scale, w.sinks); // [d, h, n]
        }
        let outs: Vec<T> = blocks.iter().enumerate().map(|(bi, &b)| self.attend_block(bi, b, one, q, raw, &extra, scale, w.sinks)).collect();
        g.permute(concat_all(g, outs, 1), [0, 2, 1, 3]) // [d, h, n]
    }

    /// The keys of the query block `b` (the `bi`-th; `one`: the only one, all the columns)
    /// and their mask [keys, b.n]: its raw keys, then the entries of `extra` (not Gathered).
    /// Masks shared by layers are made once per step, sequence and block.
    fn block_keys(&mut self, bi: usize, b: QueryBlock, one: bool, raw: T, extra: &Extra) -> (T, T) {
        let g = self.g;
        let raw_keys = if one { raw } else { g.view_2d(raw, raw.ne(0), b.nk as i64, 0, b.k0 as i64) };
        let raw_mask = self.raw_block_mask(bi, b);
        match *extra {
            Extra::None => (raw_keys, raw_mask),
            Extra::Visible { entries, ratio } => {
                let vis = self.comp_inputs(ratio).vis_mask;
                let key = MaskKey { seq: self.cur, ratio, block: bi, f16: false };
                let mask = *self.masks.entry(key).or_insert_with(|| g.concat(raw_mask, block_cols(g, vis, b, one), 0));
                (g.concat(raw_keys, entries, 1), mask)
            }
            Extra::Masked { entries, mask } => (g.concat(raw_keys, entries, 1), g.concat(raw_mask, block_cols(g, mask, b, one), 0)),
            Extra::Gathered { .. } => unreachable!("gathered entries are attended in attend_gathered"),
        }
    }

    /// The raw keys' mask [nk, n] of the `bi`-th query block `b` (the plan lays the blocks'
    /// masks out one after another), one view shared by the layers.
    fn raw_block_mask(&mut self, bi: usize, b: QueryBlock) -> T {
        let (g, si) = (self.g, self.si());
        let first = si.raw_blocks[bi].1;
        let key = MaskKey { seq: self.cur, ratio: 0, block: bi, f16: false };
        *self.masks.entry(key).or_insert_with(|| g.view_matrix(si.raw_mask, b.nk as i64, b.n as i64, first))
    }

    /// One query block's attention without flash attention: queries `q` [d, h, n] (all of
    /// the sequence's columns), the raw keys `raw`, the other keys `extra`. Returns the
    /// block's heads as [d, b.n, h].
    #[allow(clippy::too_many_arguments)]
    fn attend_block(&mut self, bi: usize, b: QueryBlock, one: bool, q: T, raw: T, extra: &Extra, scale: f32, sinks: T) -> T {
        let g = self.g;
        let (d, h) = (q.ne(0), q.ne(1));
        let q = if one { q } else { g.view_3d(q, [d, h, b.n as i64], q.nb(1), q.nb(2), b.q0 * q.nb(2)) };
        let qp = g.permute(q, [0, 2, 1, 3]); // [d, b.n, h]
        if let Extra::Gathered { sel, mask } = *extra {
            let raw_keys = if one { raw } else { g.view_2d(raw, d, b.nk as i64, 0, b.k0 as i64) };
            let raw_mask = self.raw_block_mask(bi, b);
            let k_sel = sel.ne(1);
            let sel = if one { sel } else { g.view_3d(sel, [d, k_sel, b.n as i64], sel.nb(1), sel.nb(2), b.q0 * sel.nb(2)) };
            return self.attend_gathered(q, qp, raw_keys, raw_mask, sel, block_cols(g, mask, b, one), scale, sinks);
        }
        let (keys, mask) = self.block_keys(bi, b, one, raw, extra);
        let p = g.soft_max_sinks(g.mm(keys, qp), mask, scale, sinks);
        g.mm(g.cont(g.transpose(keys)), p) // [d, b.n, h]
    }

    /// CSA over each token's own selected entries: scores against the raw keys and the
    /// gathered entries `sel` [d, k, n], one softmax over both, and the two weighted sums
    /// → [d, n, h].
    #[allow(clippy::too_many_arguments)]
    fn attend_gathered(&self, q: T, qp: T, raw: T, raw_mask: T, sel: T, sel_mask: T, scale: f32, sinks: T) -> T {
        let g = self.g;
        let (n, h) = (q.ne(2), q.ne(1));
        let k_sel = sel.ne(1);
        let kq_raw = g.mm(raw, qp); // [n_raw, n, h]
        let kq_sel = g.cont(g.permute(g.mm(sel, q), [0, 2, 1, 3])); // [k, n, h]
        let kq = g.concat(kq_raw, kq_sel, 0);
        let mask = g.concat(raw_mask, sel_mask, 0);
        let p = g.soft_max_sinks(kq, mask, scale, sinks);
        let n_raw = raw.ne(1);
        // Contiguous copies: GPU matmul kernels need even row strides in floats, which
        // views into p's rows of n_raw + k entries do not always have.
        let p_raw = g.cont(g.view_3d(p, [n_raw, n, h], p.nb(1), p.nb(2), 0));
        let p_sel = g.view_3d(p, [k_sel, n, h], p.nb(1), p.nb(2), n_raw as usize * p.elem_size());
        let p_sel = g.cont(g.permute(p_sel, [0, 2, 1, 3])); // [k, h, n]
        let out_raw = g.mm(g.cont(g.transpose(raw)), p_raw); // [d, n, h]
        let sel_t = g.cont(g.permute(sel, [1, 0, 2, 3])); // [k, d, n]
        let out_sel = g.cont(g.permute(g.mm(sel_t, p_sel), [0, 2, 1, 3])); // [d, n, h]
        g.add(out_raw, out_sel)
    }

    /// Inverse RoPE on the heads [d, h, n] and the grouped low-rank output projection.
    fn attention_out(&self, il: usize, heads: T, w: &LayerWeights, rope: &RopeParams) -> T {
        let (g, c) = (self.g, self.c);
        let (d, h, n) = (c.head_dim as i64, c.n_head as i64, heads.ne(2));
        let n_rot = c.n_rot as i64;
        // K = V carried RoPE into the output: rotate its rope dims back by −position (rope
        // reads permuted rows in place and writes [d, h, n]).
        let out = g.rope(heads, self.inp.neg_pos, n_rot, d - n_rot, rope);
        let out = g.name(out, &format!("attn_heads-{il}"));

        // Grouped low-rank output: each group of heads through its own slice of output_a.
        let groups = c.o_groups as i64;
        let k_in = d * h / groups;
        let o_lora = c.o_lora_rank as i64;
        let xg = g.contiguous(g.permute(g.reshape(out, &[k_in, groups, n]), [0, 2, 1, 3])); // [k_in, n, G]
        let wa = if w.output_a.ne(2) == groups { w.output_a } else { g.reshape(w.output_a, &[k_in, o_lora, groups]) };
        let yg = g.contiguous(g.permute(g.mm(wa, xg), [0, 2, 1, 3])); // [o_lora, G, n]
        let y = g.mm(w.output_b, g.reshape(yg, &[o_lora * groups, n]));
        g.name(y, &format!("attn_out-{il}"))
    }

    /// Run a compressor over one sequence's batch, given its rows `batch_rows` (kv ++ score
    /// [2·width, n], `compressor_rows`): keep the rows of the windows still open for later
    /// batches, pool every window that closes in this batch (an open window's entry is
    /// visible to no token yet), write those entries, and return the view of entries the
    /// attention may address [dim, n_view].
    #[allow(clippy::too_many_arguments)]
    fn compress(&mut self, il: usize, what: &str, batch_rows: T, cw: &Compressor, cs: &CompState, ci: &CompInputs, rope: &RopeParams) -> T {
        let (g, c) = (self.g, self.c);
        let m = cs.shape.ratio as i64;
        let dim = cs.entries.ne(0);
        let width = batch_rows.ne(0) / 2;
        let rows = cs.kv_score.ne(1) - 2; // state rows without the dummy and the spare column
        let nw = ci.n_windows as i64;
        let n = batch_rows.ne(1);

        // The state's rows (and the dummy) before the batch's: a decode token's row in the
        // spare column (read in place), a batch of several appended to a copy.
        let state = g.view_2d(cs.kv_score, 2 * width, rows, 0, 0);
        let all = if n == 1 { g.set_cols(cs.kv_score, batch_rows, rows + 1) } else { g.concat(g.view_2d(cs.kv_score, 2 * width, rows + 1, 0, 0), batch_rows, 1) };
        // Keep the open windows' rows for the next batch: a decode token's row into its slot
        // (or the spare column), or every slot's row (`RowUpdate`).
        self.effects.push(if n == 1 { g.set_rows(cs.kv_score, batch_rows, ci.keep) } else { g.cpy(g.get_rows(all, ci.keep), state) });
        let Some(wi) = &ci.windows else {
            // No window closes (most decode steps): the entries are as the last batch left them.
            return g.name(g.view_2d(cs.entries, dim, ci.n_view as i64, 0, 0), &format!("{what}_entries-{il}"));
        };

        // Every closing window's rows as [dim, kv|score, rows_w, nw].
        let cur = g.get_rows(all, wi.cur_idx); // [2·width, m·nw]
        let es = cur.elem_size();
        let win = match wi.prev_idx {
            // Overlap (width = 2·dim, a row is kv_a kv_b score_a score_b): the previous
            // window's first halves (a) ++ this window's second halves (b).
            Some(prev_idx) => {
                let prev = g.get_rows(all, prev_idx);
                let half = |t: T, i0: usize| g.view_4d(t, [dim, 2, m, nw], 2 * dim as usize * es, t.nb(1), m as usize * t.nb(1), i0 * es);
                g.concat(half(prev, 0), half(cur, dim as usize), 2)
            }
            None => g.reshape(cur, &[dim, 2, m, nw]),
        };
        let win = g.cont(g.permute(win, [1, 3, 0, 2])); // [rows_w, dim, nw, kv|score]
        let win = g.name(win, &format!("{what}_windows-{il}"));
        let rows_w = win.ne(0);
        let plane = |i: usize| g.view_3d(win, [rows_w, dim, nw], win.nb(1), win.nb(2), i * win.nb(3));
        let pooled = g.sum_rows(g.mul(plane(0), g.soft_max(plane(1)))); // [1, dim, nw]
        let pooled = g.mul(g.rms_norm(g.reshape(pooled, &[dim, nw]), c.rms_eps), cw.norm);
        let n_rot = c.n_rot as i64;
        let roped = g.rope(g.reshape(pooled, &[dim, 1, nw]), wi.entry_pos, n_rot, dim - n_rot, rope);
        let roped = g.name(g.reshape(roped, &[dim, nw]), &format!("{what}_entries_new-{il}"));
        let written = g.set_rows(cs.entries, roped, wi.write_idx);
        g.name(g.view_2d(written, dim, ci.n_view as i64, 0, 0), &format!("{what}_entries-{il}"))
    }

    /// Lightning indexer: score(t, j) = Σ_h w_h(t) · ReLU(q_h(t) · k_j) over the indexer's own
    /// compressed keys, invisible entries masked; returns the top-k entry ids [k, n]. `ip`:
    /// the sequence's columns of the indexer's projections.
    fn indexer_top_k(&mut self, il: usize, ip: &IndexProjections, w: &LayerWeights, st: &LayerState, ci: &CompInputs, rope: &RopeParams) -> T {
        let (g, c) = (self.g, self.c);
        let (Some(iw), Some(is)) = (&w.indexer, &st.index) else { unreachable!("CSA layers have an indexer (validated)") };
        let (q, wts) = (ip.q, ip.wts);
        let (di, hi, n) = (c.indexer_dim as i64, c.indexer_heads as i64, q.ne(2));
        let keys = self.compress(il, "index", ip.comp, &iw.compressor, is, ci, rope); // [di, n_view]
        let s = g.relu(g.mm(keys, g.reshape(q, &[di, hi * n]))); // [n_view, hi·n]
        let s = g.reshape(s, &[ci.n_view as i64, hi, n]);
        // Σ_h w_h · s_h per token: on the CPU one outer product summed over the heads
        // (vectorized over the entries); elsewhere a product, a transposed copy, row sums.
        let s = if self.on_cpu {
            g.out_prod(s, g.reshape(wts, &[1, hi, n])) // [n_view, 1, n]
        } else {
            g.sum_rows(g.cont(g.permute(g.mul(s, g.reshape(wts, &[1, hi, n])), [1, 0, 2, 3]))) // [1, n_view, n]
        };
        let s = g.add(g.reshape(s, &[ci.n_view as i64, n]), ci.vis_mask);
        let s = g.name(s, &format!("index_scores-{il}"));
        let k = (c.indexer_top_k as i64).min(ci.n_view as i64);
        g.name(g.contiguous(g.top_k(s, k)), &format!("index_top_k-{il}"))
    }
}
