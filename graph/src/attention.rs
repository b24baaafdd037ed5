//! Attention of one layer: low-rank queries, one shared K=V head, the raw sliding window,
//! compressed entries (all visible ones on HCA layers, the lightning indexer's top-k on CSA
//! layers), per-head sinks, inverse RoPE on the output and the grouped output projection.
use crate::builder::{Builder, CompInputs};
use crate::ops::{RopeParams, T};
use crate::state::{CompState, LayerState};
use crate::weights::{Compressor, LayerWeights};

/// Which mask a layer's keys take.
enum Mask {
    /// The raw window's (ratio-0 layers).
    Raw,
    /// Raw ++ the visible entries of this ratio (HCA layers).
    Hca(usize),
    /// A mask built in the layer (CSA's selection).
    Layer(T),
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

    /// `x`: the attention input [n_embd, n] (already attn_norm'ed).
    pub fn attention(&mut self, il: usize, x: T, w: &LayerWeights, st: &LayerState) -> T {
        let (g, c) = (self.g, self.c);
        let (d, h, n) = (c.head_dim as i64, c.n_head as i64, x.ne(1));
        let n_rot = c.n_rot as i64;
        let rope = self.rope_params(il);
        let eps = c.rms_eps;

        // Queries: q_a → norm → q_b → per-head unweighted RMSNorm → RoPE on the trailing dims.
        let qr = g.mul(g.rms_norm(g.mm(w.q_a, x), eps), w.q_a_norm);
        let qr = g.name(qr, &format!("q_lora-{il}"));
        let q = g.rms_norm(g.reshape(g.mm(w.q_b, qr), &[d, h, n]), eps);
        let q = g.name(g.rope(q, self.si().pos, n_rot, d - n_rot, &rope), &format!("q-{il}"));

        // The one K=V head.
        let kv = g.mul(g.rms_norm(g.mm(w.kv, x), eps), w.kv_norm);
        let kv = g.rope(g.reshape(kv, &[d, 1, n]), self.si().pos, n_rot, d - n_rot, &rope);
        let kv = g.name(g.reshape(kv, &[d, n]), &format!("kv-{il}"));

        // Raw keys: the ring (last `window` positions before the batch) ++ the batch.
        let raw = g.name(g.concat(st.ring, kv, 1), &format!("raw_kv-{il}"));
        self.effects.push(g.cpy(g.get_rows(raw, self.si().ring_keep), st.ring));

        let scale = 1.0 / (d as f32).sqrt();
        let qp = g.permute(q, [0, 2, 1, 3]); // [d, n, h]
        // Every key a token may attend to, with its mask: the raw keys, then (compressed
        // layers) every entry, masked to the visible ones (HCA) or to the indexer's top-k
        // (CSA, dense form); or, for CSA over many entries, each token's own gathered
        // entries (`heads` computed directly).
        let (keys, mask): (T, Mask) = match (&w.compressor, &st.comp) {
            (Some(cw), Some(cs)) if w.indexer.is_some() => {
                let ci = self.comp_inputs(cs.shape.ratio);
                let entries = self.compress(il, "csa", x, cw, cs, ci, &rope);
                let top = self.indexer_top_k(il, x, qr, w, st, ci, &rope);
                let vis = g.reshape(ci.vis_mask, &[1, ci.n_view as i64, n]);
                // Each selected entry's visibility (an entry is selected among invisible
                // ones only when fewer than k are visible): [1, k, n].
                let sel_vis = g.get_rows(vis, top);
                if ci.n_view <= self.csa_dense_max_view {
                    // −inf everywhere but at each token's selected entries.
                    let sel_mask = g.reshape(g.set_rows(g.fill(vis, f32::NEG_INFINITY), sel_vis, top), &[ci.n_view as i64, n]);
                    (g.concat(raw, entries, 1), Mask::Layer(g.concat(self.si().raw_mask, sel_mask, 0)))
                } else {
                    let heads = self.attend_selected(q, qp, raw, entries, top, sel_vis, scale, w.sinks);
                    return self.attention_out(il, heads, w, &rope);
                }
            }
            (Some(cw), Some(cs)) => {
                let ci = self.comp_inputs(cs.shape.ratio);
                let entries = self.compress(il, "hca", x, cw, cs, ci, &rope);
                (g.concat(raw, entries, 1), Mask::Hca(ci.ratio))
            }
            _ => (raw, Mask::Raw),
        };
        let mask = self.layer_mask(mask);
        let heads = if self.flash {
            g.flash_attn_sinks(qp, keys, mask, scale, w.sinks) // [d, h, n]
        } else {
            let p = g.soft_max_sinks(g.mm(keys, qp), mask, scale, w.sinks);
            g.permute(g.mm(g.cont(g.transpose(keys)), p), [0, 2, 1, 3])
        };
        self.attention_out(il, heads, w, &rope)
    }

    /// The attention mask of a layer, F16 for flash attention; the raw and the per-ratio HCA
    /// masks are made once per step and shared by the layers.
    fn layer_mask(&mut self, mask: Mask) -> T {
        let g = self.g;
        let flash = self.flash;
        let typed = |m: T| if flash { g.to_f16(m) } else { m };
        let raw_mask = self.si().raw_mask;
        match mask {
            Mask::Raw => *self.masks.entry((self.cur, 0)).or_insert_with(|| typed(raw_mask)),
            Mask::Hca(ratio) => {
                let vis = self.comp_inputs(ratio).vis_mask;
                *self.masks.entry((self.cur, ratio)).or_insert_with(|| typed(g.concat(raw_mask, vis, 0)))
            }
            Mask::Layer(m) => typed(m),
        }
    }

    /// CSA over each token's own selected entries: scores against the raw keys and the
    /// gathered entries, one softmax over both, and the two weighted sums → [d, h, n] (a view).
    #[allow(clippy::too_many_arguments)]
    fn attend_selected(&self, q: T, qp: T, raw: T, entries: T, top: T, sel_vis: T, scale: f32, sinks: T) -> T {
        let g = self.g;
        let (d, n, h) = (q.ne(0), q.ne(2), q.ne(1));
        let k_sel = top.ne(0);
        // Each token's selected entries: [d, k, n], and their mask [k, n].
        let sel = g.reshape(g.get_rows(entries, g.reshape(top, &[k_sel * n])), &[d, k_sel, n]);
        let sel_mask = g.reshape(sel_vis, &[k_sel, n]);
        let kq_raw = g.mm(raw, qp); // [n_raw, n, h]
        let kq_sel = g.cont(g.permute(g.mm(sel, q), [0, 2, 1, 3])); // [k, n, h]
        let kq = g.concat(kq_raw, kq_sel, 0);
        let mask = g.concat(self.si().raw_mask, sel_mask, 0);
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
        g.permute(g.add(out_raw, out_sel), [0, 2, 1, 3])
    }

    /// Inverse RoPE on the heads [d, h, n] and the grouped low-rank output projection.
    fn attention_out(&self, il: usize, heads: T, w: &LayerWeights, rope: &RopeParams) -> T {
        let (g, c) = (self.g, self.c);
        let (d, h, n) = (c.head_dim as i64, c.n_head as i64, heads.ne(2));
        let n_rot = c.n_rot as i64;
        // K = V carried RoPE into the output: rotate its rope dims back by −position (rope
        // reads permuted rows in place and writes [d, h, n]).
        let out = g.rope(heads, self.si().neg_pos, n_rot, d - n_rot, rope);
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

    /// Run a compressor over the batch: keep the rows of the windows still open for later
    /// batches, pool every window that closes in this batch (an open window's entry is
    /// visible to no token yet), write those entries, and return the view of entries the
    /// attention may address [dim, n_view].
    #[allow(clippy::too_many_arguments)]
    fn compress(&mut self, il: usize, what: &str, x: T, cw: &Compressor, cs: &CompState, ci: &CompInputs, rope: &RopeParams) -> T {
        let (g, c) = (self.g, self.c);
        let m = cs.shape.ratio as i64;
        let dim = cs.entries.ne(0);
        let width = cw.kv.ne(1);
        let rows = cs.kv_score.ne(1) - 1; // state rows without the dummy
        let nw = ci.n_windows as i64;

        let kv = g.mm(cw.kv, x); // [width, n]
        let score = g.add(g.mm(cw.gate, x), g.get_rows(cw.ape, ci.ape_idx));
        // Each row: kv ++ score [2·width]; the state's rows (and the dummy) before the batch's.
        let all = g.concat(cs.kv_score, g.concat(kv, score, 0), 1);
        // Keep the open windows' rows for the next batch.
        self.effects.push(g.cpy(g.get_rows(all, ci.keep), g.view_2d(cs.kv_score, 2 * width, rows, 0, 0)));
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
    /// compressed keys, invisible entries masked; returns the top-k entry ids [k, n].
    #[allow(clippy::too_many_arguments)]
    fn indexer_top_k(&mut self, il: usize, x: T, qr: T, w: &LayerWeights, st: &LayerState, ci: &CompInputs, rope: &RopeParams) -> T {
        let (g, c) = (self.g, self.c);
        let (Some(iw), Some(is)) = (&w.indexer, &st.index) else { unreachable!("CSA layers have an indexer (validated)") };
        let (di, hi, n) = (c.indexer_dim as i64, c.indexer_heads as i64, x.ne(1));
        let n_rot = c.n_rot as i64;
        let keys = self.compress(il, "index", x, &iw.compressor, is, ci, rope); // [di, n_view]
        let q = g.reshape(g.mm(iw.q_b, qr), &[di, hi, n]);
        let q = g.rope(q, self.si().pos, n_rot, di - n_rot, rope);
        let wts = g.scale(g.mm(iw.proj, x), 1.0 / ((di * hi) as f32).sqrt()); // [hi, n]
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
