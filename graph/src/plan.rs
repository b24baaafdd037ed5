//! Host-side bookkeeping of one micro-batch: which rows the graph gathers, which it keeps,
//! and the attention masks. Everything is a function of the batch's first position `p`,
//! its length `n` and the layer shapes, so the per-sequence state on the device needs no
//! bookkeeping beyond the position.
//!
//! Row layouts the graph builds:
//! - raw keys: `[ring slot 0..window) ++ [the batch's n new keys)`; ring slot `s` holds the
//!   latest position `q < p` with `q ≡ s (mod window)`.
//! - compressor rows: `[state slot 0..cap) ++ [dummy] ++ [the batch's n new rows)`; state slot
//!   `s` holds the position `q ≡ s (mod cap)` of the window(s) still open; the dummy row has
//!   kv 0 and score −∞ (softmax weight 0).

/// Masked-out attention logit.
pub const MASKED: f32 = f32::NEG_INFINITY;
/// Compressed-entry views are padded to a multiple of this many entries, so decode graphs
/// keep their shape (and are reused) for `PAD × ratio` tokens.
pub const PAD: usize = 32;

pub struct RawPlan {
    /// The query blocks of the batch (`query_blocks`; one when the attention takes the whole
    /// batch at once).
    pub blocks: Vec<QueryBlock>,
    /// Per block its [nk keys, n queries] mask (ggml order: key index fastest; key k of a
    /// block is raw column k0 + k), the blocks one after another.
    pub mask: Vec<f32>,
    /// Source row (in the raw key layout) of each ring slot after the batch.
    pub keep: Vec<i32>,
}

/// Queries [q0, q0 + n) of a sequence's micro-batch, and the raw keys [k0, k0 + nk) their
/// window reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryBlock {
    pub q0: usize,
    pub n: usize,
    pub k0: usize,
    pub nk: usize,
}

impl QueryBlock {
    /// Elements of the block's mask: [nk keys, n queries].
    pub fn mask_len(&self) -> usize {
        self.nk * self.n
    }
}

/// Each block with the first element of its mask in `RawPlan::mask` (the blocks' masks
/// one after another).
pub fn block_mask_offsets(blocks: &[QueryBlock]) -> Vec<(QueryBlock, usize)> {
    let mut at = 0;
    blocks
        .iter()
        .map(|&b| {
            at += b.mask_len();
            (b, at - b.mask_len())
        })
        .collect()
}

/// The blocks of at most `block` of n queries, over raw keys laid out as the window's ring
/// (columns [0, window)) then the n new keys (columns window + j). Query i sees ring slots
/// only while i < window (older positions leave its window) and new keys at columns
/// (i, i + window]; so a block from q0 ≥ window reads columns [q0, q0 + n + window), an
/// earlier one [0, q0 + n + window). One block when n ≤ block (or block is 0).
pub fn query_blocks(n: usize, window: usize, block: usize) -> Vec<QueryBlock> {
    let block = if block == 0 { n.max(1) } else { block };
    (0..n)
        .step_by(block)
        .map(|q0| {
            let nb = block.min(n - q0);
            let k0 = if q0 < window { 0 } else { q0 };
            QueryBlock { q0, n: nb, k0, nk: q0 + nb + window - k0 }
        })
        .collect()
}

/// The raw keys' masks and ring update of a batch of n tokens from position p, its queries
/// in blocks of at most `block` (`query_blocks`).
pub fn raw_plan(p: usize, n: usize, window: usize, block: usize) -> RawPlan {
    let blocks = query_blocks(n, window, block);
    let (p, n, w) = (p as i64, n as i64, window as i64);
    let slot_pos = |base_p: i64, s: i64| -> i64 {
        let base = base_p - w;
        base + (s - base).rem_euclid(w)
    };
    let mut mask = vec![MASKED; blocks.iter().map(QueryBlock::mask_len).sum()];
    for (b, at) in block_mask_offsets(&blocks) {
        let (k0, nk) = (b.k0 as i64, b.nk as i64);
        for i in b.q0 as i64..(b.q0 + b.n) as i64 {
            let at = at + (i as usize - b.q0) * b.nk;
            let t = p + i;
            let row = &mut mask[at..at + b.nk];
            // The ring's slots (raw columns [0, w)) in the block's keys.
            for s in k0..w.min(k0 + nk) {
                let q = slot_pos(p, s);
                if q >= 0 && t - q < w {
                    row[(s - k0) as usize] = 0.0;
                }
            }
            // The batch's keys at positions t − w < q ≤ t: raw columns w + j, j in (i − w, i].
            for j in (i - w + 1).max(0)..=i {
                row[(w + j - k0) as usize] = 0.0;
            }
        }
    }
    let p2 = p + n;
    let keep = (0..w)
        .map(|s| {
            let q = slot_pos(p2, s);
            if q < 0 {
                0
            } else if q >= p {
                (w + q - p) as i32
            } else {
                q.rem_euclid(w) as i32
            }
        })
        .collect();
    RawPlan { blocks, mask, keep }
}

/// The shape of one compressor: ratio `m`, overlapping (ratio 4) or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompShape {
    pub ratio: usize,
    pub overlap: bool,
    /// Capacity of compressed entries (a multiple of PAD).
    pub cap_entries: usize,
}

impl CompShape {
    pub fn new(ratio: usize, n_ctx: usize) -> CompShape {
        let cap = (n_ctx / ratio + 1).div_ceil(PAD) * PAD;
        CompShape { ratio, overlap: ratio == 4, cap_entries: cap }
    }
    /// Rows of open-window state: the current window, and the previous one when windows
    /// overlap.
    pub fn state_rows(&self) -> usize {
        if self.overlap {
            2 * self.ratio
        } else {
            self.ratio
        }
    }
    /// First position of the open-window rows kept after a batch ending before position
    /// `end`: the current window's start, or the previous window's when windows overlap.
    pub fn keep_start(&self, end: usize) -> usize {
        let w = end / self.ratio;
        if self.overlap {
            w.saturating_sub(1) * self.ratio
        } else {
            w * self.ratio
        }
    }
    /// Entries visible to the last token after a batch ending before position `end`.
    pub fn view_len(&self, end: usize) -> usize {
        (end / self.ratio).div_ceil(PAD).max(1).saturating_mul(PAD).min(self.cap_entries)
    }
}

pub struct CompPlan {
    /// Windows that close in this batch (their last position is in it); a window still open
    /// after the batch is visible to none of its tokens, so it is pooled when it closes.
    pub n_windows: usize,
    /// pos mod ratio per token (row of the position bias).
    pub ape_idx: Vec<i32>,
    /// [ratio × n_windows]: rows of each window's own tokens.
    pub cur_idx: Vec<i32>,
    /// [ratio × n_windows]: rows of the previous window's tokens (overlap only).
    pub prev_idx: Vec<i32>,
    /// [state_rows]: source row of each state slot after the batch.
    pub keep: Vec<i32>,
    /// RoPE position of each touched window's entry (its first token's position).
    pub entry_pos: Vec<i32>,
    /// Entry index each touched window writes.
    pub write_idx: Vec<i32>,
    /// Entries in the attention view.
    pub n_view: usize,
    /// [n_view, n]: 0 where entry j is visible to token i (j < (t+1)/ratio), −∞ elsewhere.
    pub vis_mask: Vec<f32>,
}

pub fn comp_plan(p: usize, n: usize, s: &CompShape) -> CompPlan {
    let m = s.ratio as i64;
    let cap = s.state_rows() as i64;
    let dummy = cap as i32;
    let (p, n) = (p as i64, n as i64);
    let keep_start = |p: i64| -> i64 { s.keep_start(p as usize) as i64 };
    let ks = keep_start(p);
    let row_of = |q: i64| -> i32 {
        if q >= p {
            (cap + 1 + q - p) as i32
        } else if q >= ks && q >= 0 {
            q.rem_euclid(cap) as i32
        } else {
            dummy
        }
    };
    // Windows j0..j_end close in this batch: window j ends at (j+1)·m − 1 ∈ [p, p+n).
    let (j0, j_end) = (p / m, (p + n) / m);
    let nw = (j_end - j0).max(0) as usize;
    let mut cur_idx = Vec::with_capacity(nw * m as usize);
    let mut prev_idx = Vec::with_capacity(if s.overlap { nw * m as usize } else { 0 });
    for j in j0..j_end {
        for r in 0..m {
            let q = j * m + r;
            cur_idx.push(row_of(q));
            if s.overlap {
                prev_idx.push(if j == 0 { dummy } else { row_of((j - 1) * m + r) });
            }
        }
    }
    let p2 = p + n;
    let ks2 = keep_start(p2);
    let keep = (0..cap)
        .map(|slot| {
            let q = ks2 + (slot - ks2).rem_euclid(cap);
            if q < p2 {
                row_of(q)
            } else {
                dummy
            }
        })
        .collect();
    let n_view = s.view_len(p2 as usize);
    let mut vis_mask = vec![MASKED; n_view * n as usize];
    for i in 0..n {
        let visible = ((p + i + 1) / m) as usize;
        let row = &mut vis_mask[i as usize * n_view..(i as usize + 1) * n_view];
        for v in row.iter_mut().take(visible.min(n_view)) {
            *v = 0.0;
        }
    }
    CompPlan {
        n_windows: nw,
        ape_idx: (p..p + n).map(|q| (q % m) as i32).collect(),
        cur_idx,
        prev_idx,
        keep,
        entry_pos: (j0..j_end).map(|j| (j * m) as i32).collect(),
        write_idx: (j0..j_end).map(|j| j as i32).collect(),
        n_view,
        vis_mask,
    }
}

/// How a step updates a sequence's ring or open-window rows (slots), read from the plan's
/// `keep` (each slot's source row in the layout slots ++ batch for the ring, slots ++ dummy ++
/// batch for a compressor). A batch of several tokens gathers every slot's row (`keep`
/// itself). A decode token writes its row into the one slot that keeps it, every other slot
/// staying as it is (a slot `keep` would fill from elsewhere then holds a row no later step
/// reads: masked, or never gathered); the state tensor has a spare column right after the
/// slots (ring) or the dummy (compressor), at the batch's first row, where the token's row
/// goes when no slot keeps it (a window without overlap closing).
pub struct RowUpdate;

impl RowUpdate {
    /// The index count for `n` tokens over `slots` slots.
    pub fn len(n: usize, slots: usize) -> i64 {
        if n == 1 {
            1
        } else {
            slots as i64
        }
    }

    /// The indices for `n` tokens: `keep`, or for one token the column its row goes to (the
    /// slot keeping row `first_batch_row`, else the spare column, `first_batch_row`).
    pub fn of(n: usize, keep: &[i32], first_batch_row: usize) -> Vec<i32> {
        if n != 1 {
            return keep.to_vec();
        }
        let slot = keep.iter().position(|&k| k as usize == first_batch_row).unwrap_or(first_batch_row);
        vec![slot as i32]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays plans over a split of a sequence and checks that every gathered row holds the
    /// position the window needs: a host-side model of the device state.
    fn replay(split: &[usize], ratio: usize) {
        let s = CompShape::new(ratio, 4096);
        let cap = s.state_rows();
        // Device model: the position each state slot holds (None = dummy-like garbage).
        let mut state: Vec<Option<i64>> = vec![None; cap];
        let mut p = 0usize;
        for &n in split {
            let plan = comp_plan(p, n, &s);
            let rows: Vec<Option<i64>> = state
                .iter()
                .cloned()
                .chain(std::iter::once(None))
                .chain((p..p + n).map(|q| Some(q as i64)))
                .collect();
            // Exactly the windows whose last position is in the batch are pooled.
            let closing: Vec<usize> = (0..(p + n) / ratio).filter(|j| (j + 1) * ratio > p).collect();
            assert_eq!(plan.n_windows, closing.len(), "batch at {p}+{n}");
            assert_eq!(plan.write_idx, closing.iter().map(|&j| j as i32).collect::<Vec<_>>());
            assert_eq!(plan.entry_pos, closing.iter().map(|&j| (j * ratio) as i32).collect::<Vec<_>>());
            for (w, &j) in closing.iter().enumerate() {
                for r in 0..ratio {
                    let want = (j * ratio + r) as i64;
                    let got = rows[plan.cur_idx[w * ratio + r] as usize];
                    assert_eq!(got, Some(want), "cur row, batch at {p}+{n}, window {j}");
                    if s.overlap {
                        let got = plan.prev_idx[w * ratio + r] as usize;
                        if j == 0 {
                            assert_eq!(got, cap);
                        } else {
                            assert_eq!(rows[got], Some(((j - 1) * ratio + r) as i64));
                        }
                    }
                }
            }
            update(&mut state, &rows, n, &plan.keep, cap + 1);
            p += n;
        }
    }

    /// The device's update of slots (`RowUpdate`): a batch gathers every slot's row, a
    /// decode token writes its one slot.
    fn update(state: &mut Vec<Option<i64>>, rows: &[Option<i64>], n: usize, keep: &[i32], first_batch_row: usize) {
        let idx = RowUpdate::of(n, keep, first_batch_row);
        assert_eq!(idx.len() as i64, RowUpdate::len(n, keep.len()));
        if n == 1 {
            // The spare column is no slot.
            if let Some(slot) = state.get_mut(idx[0] as usize) {
                *slot = rows[first_batch_row];
            }
        } else {
            *state = idx.iter().map(|&k| rows[k as usize]).collect();
        }
    }

    #[test]
    fn compressor_rows_follow_positions_across_uneven_batches() {
        for ratio in [4, 8, 128] {
            replay(&[37, 50, 1, 128, 1, 1, 1, 3, 200], ratio);
            replay(&[1; 300], ratio);
            replay(&[330], ratio);
        }
    }

    #[test]
    fn raw_window_sees_exactly_the_last_window_positions() {
        let w = 8usize;
        let mut ring: Vec<Option<i64>> = vec![None; w];
        let mut p = 0usize;
        // Whole batches, and query blocks of 3 (under the window) and 5.
        for (n, block) in [(5usize, 0), (1, 0), (1, 0), (20, 3), (3, 0), (1, 0), (1, 0), (23, 5), (1, 0), (1, 0), (1, 0), (1, 0), (9, 0), (1, 0), (2, 0), (1, 0)] {
            let plan = raw_plan(p, n, w, block);
            assert_eq!(plan.blocks, query_blocks(n, w, block));
            let keys: Vec<Option<i64>> = ring.iter().cloned().chain((p..p + n).map(|q| Some(q as i64))).collect();
            let mut at = 0;
            for b in &plan.blocks {
                for i in b.q0..b.q0 + b.n {
                    let t = (p + i) as i64;
                    let mut seen: Vec<i64> =
                        (0..b.nk).filter(|&k| plan.mask[at + k] == 0.0).map(|k| keys[b.k0 + k].expect("visible key holds a position")).collect();
                    seen.sort();
                    let want: Vec<i64> = ((t - w as i64 + 1).max(0)..=t).collect();
                    assert_eq!(seen, want, "query {t}, block {b:?}");
                    at += b.nk;
                }
            }
            assert_eq!(at, plan.mask.len());
            update(&mut ring, &keys, n, &plan.keep, w);
            p += n;
        }
    }

    /// A micro-batch of 2048 tokens, window 128, blocks of 256: 384 keys a query (against
    /// 2176 in one block), and the masks 3.1 MB instead of 17.8 MB (DS4.md, BENCHMARKS.md).
    #[test]
    fn blocks_of_256_cut_the_keys_and_the_mask_of_2048_tokens() {
        let blocks = query_blocks(2048, 128, 256);
        assert_eq!(blocks.len(), 8);
        assert!(blocks.iter().all(|b| b.nk == 384), "{blocks:?}");
        assert_eq!(query_blocks(2048, 128, 0)[0].nk, 2176);
        let bytes = |block| raw_plan(0, 2048, 128, block).mask.len() * 4;
        assert_eq!(bytes(256), 3_145_728);
        assert_eq!(bytes(0), 17_825_792);
        assert_eq!(100 * bytes(256) / bytes(0), 17, "the blocks read 18% of the whole mask");
    }

    #[test]
    fn query_blocks_cover_every_key_a_query_sees() {
        for (p, n, window, block) in [(0, 40, 8, 5), (0, 40, 8, 16), (3, 37, 8, 8), (100, 64, 8, 16), (5, 600, 128, 256), (300, 2048, 128, 256), (0, 7, 8, 16)] {
            let blocks = query_blocks(n, window, block);
            let mask = raw_plan(p, n, window, 0).mask;
            let nk = window + n;
            assert_eq!(blocks.iter().map(|b| b.n).sum::<usize>(), n, "every query in one block");
            for (bi, b) in blocks.iter().enumerate() {
                assert_eq!(b.q0, bi * block.min(n), "blocks in order");
                assert!(b.k0 + b.nk <= nk, "keys within the raw keys");
                if b.q0 == 0 || b.q0 >= window {
                    assert!(b.nk <= block + window, "a block reads at most block + window keys");
                }
                for i in b.q0..b.q0 + b.n {
                    for j in 0..nk {
                        if mask[i * nk + j] == 0.0 {
                            assert!((b.k0..b.k0 + b.nk).contains(&j), "p {p} n {n}: query {i} sees key {j}, outside block {b:?}");
                        }
                    }
                }
            }
        }
    }
}
