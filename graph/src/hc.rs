//! Hyper-connections: the residual is `hc` parallel streams [n_embd, hc, n]; each block
//! reads a weighted collapse of them (pre) and writes back a mix (post, comb).
use crate::builder::Builder;
use crate::ops::T;
use crate::weights::HcWeights;

pub struct HcMix {
    /// [hc, n]: how the block output is spread over the streams.
    pub post: T,
    /// [dst, src, n]: doubly-stochastic stream mixing (Sinkhorn).
    pub comb: T,
}

impl Builder<'_> {
    /// mixes = fn · (flatten(x) / rms(flatten(x))) → [mix, n]
    fn hc_mixes(&self, x: T, fn_: T) -> T {
        let g = self.g;
        let flat = g.reshape(x, &[x.ne(0) * x.ne(1), x.ne(2)]);
        g.mm(fn_, g.rms_norm(flat, self.c.rms_eps))
    }

    /// Block input y = Σ_j pre_j · S_j, plus the post/comb weights for `hc_post`.
    pub fn hc_pre(&self, x: T, w: &HcWeights, il: usize, what: &str) -> (T, HcMix) {
        let (g, c) = (self.g, self.c);
        let hc = c.hc_count as i64;
        let n = x.ne(2);
        let mixes = g.name(self.hc_mixes(x, w.fn_), &format!("hc_{what}_mixes-{il}"));

        // pre and post together: mixes[0..hc] and mixes[hc..2hc] as the planes of [hc, n, 2],
        // each with its scale (scale[0], scale[1]) and bias (base[0..hc], base[hc..2hc]).
        let es = mixes.elem_size();
        let both = g.view_3d(mixes, [hc, n, 2], mixes.nb(1), hc as usize * es, 0);
        let both_scale = g.reshape(g.view_1d(w.scale, 2, 0), &[1, 1, 2]);
        let both_base = g.reshape(g.view_1d(w.base, 2 * hc, 0), &[hc, 1, 2]);
        let both = g.sigmoid(g.add(g.mul(both, both_scale), both_base));
        let plane = |i: usize| g.view_2d(both, hc, n, 0, i as i64 * n);
        let pre = g.scale_bias(plane(0), 1.0, c.hc_eps);
        let post = g.scale(plane(1), 2.0);

        let comb = g.hc_comb(mixes, w.scale, w.base, c.hc_eps, c.hc_sinkhorn_iters as i32);
        let y = g.name(g.hc_pre(x, pre), &format!("hc_{what}_in-{il}"));
        (y, HcMix { post, comb })
    }

    /// S'_k = post_k · f + Σ_j comb[k,j] · S_j
    pub fn hc_post(&self, f: T, residual: T, mix: &HcMix) -> T {
        let g = self.g;
        // On the CPU and a batch of tokens, as one outer product per token (vectorized over
        // n_embd, where ggml's hc_post op is a scalar loop): [f, S_0..S_hc-1] ⊗
        // [post, comb[·,0..hc-1]] summed over the hc+1 terms. A few tokens take ggml's op
        // (one node instead of three).
        if !self.on_cpu || residual.ne(2) < 32 {
            return g.hc_post(f, residual, mix.post, mix.comb);
        }
        let (e, hc, n) = (residual.ne(0), residual.ne(1), residual.ne(2));
        let lhs = g.concat(g.reshape(f, &[e, 1, n]), residual, 1); // [e, 1+hc, n]
        let rhs = g.concat(g.reshape(mix.post, &[hc, 1, n]), mix.comb, 1); // [hc, 1+hc, n]
        g.out_prod(lhs, rhs) // [e, hc, n]
    }

    /// Output head collapse: pre-style weights, no Sinkhorn.
    pub fn hc_head(&self, x: T, w: &HcWeights) -> T {
        let (g, c) = (self.g, self.c);
        let mixes = self.hc_mixes(x, w.fn_);
        let pre = g.add(g.mul(mixes, w.scale), w.base);
        let pre = g.scale_bias(g.sigmoid(pre), 1.0, c.hc_eps);
        g.name(g.hc_pre(x, pre), "hc_head")
    }
}
