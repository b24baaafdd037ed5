//! The graph builder of one step: its inputs, and the whole model in the order of the math
//! (embedding → per layer hyper-connection pre, attention, post, pre, MoE, post → HC head →
//! norm → logits). The stages live beside it: `attention.rs`, `hc.rs`, `moe.rs`.
use std::collections::HashMap;
use std::sync::Mutex;

use loader::Ds4Config;

use crate::cold::{ColdCall, ColdState, RouteCall};
use crate::model::Logits;
use crate::offload::ColdHost;
use crate::ops::{Ctx, InputImage, T};
use crate::plan::{CompPlan, CompShape, QueryBlock, RawPlan, RowUpdate};
use crate::state::Sequence;
use crate::weights::Weights;

/// Graph inputs of one sequence and compressor ratio (shared by every layer of that ratio).
pub struct CompInputs {
    pub ratio: usize,
    pub n_windows: usize,
    pub n_view: usize,
    /// The open-window rows after the batch (`RowUpdate`): [state_rows] or, for one token, [1].
    pub keep: T,
    pub vis_mask: T,
    /// The windows that close in this batch; None when none does (decode between closes).
    pub windows: Option<WindowInputs>,
}

/// Row indices and entry slots of the windows a batch closes (`plan::CompPlan`).
pub struct WindowInputs {
    pub cur_idx: T,
    pub prev_idx: Option<T>,
    pub entry_pos: T,
    pub write_idx: T,
}

/// The inputs of one sequence's tokens in a step: the raw window's mask and ring update,
/// and the compressor plans.
pub struct SeqInputs {
    /// The sequence's first column among the step's tokens, and its token count.
    pub first: usize,
    pub n: usize,
    /// The query blocks' raw-key masks one after another (`plan::RawPlan`), flat.
    pub raw_mask: T,
    /// The query blocks, each with the first element of its mask in `raw_mask`.
    pub raw_blocks: Vec<(QueryBlock, usize)>,
    /// The ring after the batch (`RowUpdate`): [window] or, for one token, [1].
    pub ring_keep: T,
    pub comp: Vec<CompInputs>,
}

/// A step's inputs: every token (the columns of the sequences one after another) with its
/// position (and its negation, for the inverse RoPE) and per compressor ratio its
/// position-bias row, each sequence's own inputs, and the columns whose logits are read.
pub struct Inputs {
    pub tokens: T,
    pub pos: T,
    pub neg_pos: T,
    /// Per compressor ratio: each token's row of the compressor's position bias (`ape`).
    pub ape_idx: Vec<(usize, T)>,
    pub seqs: Vec<SeqInputs>,
    /// Each sequence's last column (`Logits::Last` only).
    pub last_cols: Option<T>,
}

/// What one sequence brings to a step: its position, its tokens and its plans.
pub struct SeqPlan<'t> {
    pub p: usize,
    pub tokens: &'t [u32],
    pub raw: RawPlan,
    pub comps: Vec<(CompShape, CompPlan)>,
}

impl SeqInputs {
    fn new(g: &Ctx, c: &Ds4Config, first: usize, n: usize, blocks: &[QueryBlock], comps: &[(CompShape, CompPlan)]) -> SeqInputs {
        let n_cols = n;
        let n = n as i64;
        let raw_blocks = crate::plan::block_mask_offsets(blocks);
        let mask_len: usize = blocks.iter().map(QueryBlock::mask_len).sum();
        SeqInputs {
            first,
            n: n_cols,
            raw_mask: g.input(g.new_f32(&[mask_len as i64]), "raw_mask"),
            raw_blocks,
            ring_keep: g.input(g.new_i32(&[RowUpdate::len(n_cols, c.window)]), "ring_keep"),
            comp: comps
                .iter()
                .map(|(s, cp)| {
                    let m = s.ratio;
                    let nw = cp.n_windows as i64;
                    CompInputs {
                        ratio: m,
                        n_windows: cp.n_windows,
                        n_view: cp.n_view,
                        keep: g.input(g.new_i32(&[RowUpdate::len(n_cols, s.state_rows())]), &format!("keep-{m}")),
                        vis_mask: g.input(g.new_f32(&[cp.n_view as i64, n]), &format!("vis_mask-{m}")),
                        windows: (nw > 0).then(|| WindowInputs {
                            cur_idx: g.input(g.new_i32(&[m as i64 * nw]), &format!("cur_idx-{m}")),
                            prev_idx: s.overlap.then(|| g.input(g.new_i32(&[m as i64 * nw]), &format!("prev_idx-{m}"))),
                            entry_pos: g.input(g.new_i32(&[nw]), &format!("entry_pos-{m}")),
                            write_idx: g.input(g.new_i32(&[nw]), &format!("write_idx-{m}")),
                        }),
                    }
                })
                .collect(),
        }
    }

    fn all(&self, v: &mut Vec<T>) {
        v.extend([self.raw_mask, self.ring_keep]);
        for ci in &self.comp {
            v.extend([ci.keep, ci.vis_mask]);
            if let Some(w) = &ci.windows {
                v.extend([w.cur_idx, w.entry_pos, w.write_idx]);
                v.extend(w.prev_idx);
            }
        }
    }

    /// Fill the inputs for `plan` (the one the inputs were made for) into `img`.
    fn set(&self, plan: &SeqPlan, img: &mut InputImage) {
        img.f32(self.raw_mask, &plan.raw.mask);
        img.i32(self.ring_keep, &RowUpdate::of(plan.tokens.len(), &plan.raw.keep, plan.raw.keep.len()));
        for (ci, (_, cp)) in self.comp.iter().zip(&plan.comps) {
            if let Some(w) = &ci.windows {
                img.i32(w.cur_idx, &cp.cur_idx);
                if let Some(t) = w.prev_idx {
                    img.i32(t, &cp.prev_idx);
                }
                img.i32(w.entry_pos, &cp.entry_pos);
                img.i32(w.write_idx, &cp.write_idx);
            }
            img.i32(ci.keep, &RowUpdate::of(plan.tokens.len(), &cp.keep, cp.keep.len() + 1));
            img.f32(ci.vis_mask, &cp.vis_mask);
        }
    }
}

impl Inputs {
    /// The inputs of a step over these sequences' plans (their token counts and compressor
    /// plans fix the shapes).
    pub fn new(g: &Ctx, c: &Ds4Config, plans: &[SeqPlan], logits: Logits) -> Inputs {
        let mut first = 0;
        let seqs: Vec<SeqInputs> = plans
            .iter()
            .map(|sp| {
                let si = SeqInputs::new(g, c, first, sp.tokens.len(), &sp.raw.blocks, &sp.comps);
                first += sp.tokens.len();
                si
            })
            .collect();
        let n = first as i64;
        // Every sequence has the model's compressor ratios, in the same order.
        let ratios: Vec<usize> = plans.first().map(|sp| sp.comps.iter().map(|(s, _)| s.ratio).collect()).unwrap_or_default();
        Inputs {
            tokens: g.input(g.new_i32(&[n]), "tokens"),
            pos: g.input(g.new_i32(&[n]), "pos"),
            neg_pos: g.input(g.new_i32(&[n]), "neg_pos"),
            ape_idx: ratios.into_iter().map(|m| (m, g.input(g.new_i32(&[n]), &format!("ape_idx-{m}")))).collect(),
            last_cols: (logits == Logits::Last).then(|| g.input(g.new_i32(&[seqs.len() as i64]), "last_cols")),
            seqs,
        }
    }

    /// Every input tensor.
    pub fn all(&self) -> Vec<T> {
        let mut v = vec![self.tokens, self.pos, self.neg_pos];
        v.extend(self.ape_idx.iter().map(|&(_, t)| t));
        v.extend(self.last_cols);
        for si in &self.seqs {
            si.all(&mut v);
        }
        v
    }

    /// Fill the inputs for `plans` (the ones the inputs were made for) into `img`, the
    /// image of the buffer that holds them.
    pub fn set(&self, plans: &[SeqPlan], img: &mut InputImage) {
        let toks: Vec<i32> = plans.iter().flat_map(|sp| sp.tokens.iter().map(|&t| t as i32)).collect();
        img.i32(self.tokens, &toks);
        let pos: Vec<i32> = plans.iter().flat_map(|sp| (sp.p..sp.p + sp.tokens.len()).map(|q| q as i32)).collect();
        let neg: Vec<i32> = pos.iter().map(|&q| -q).collect();
        img.i32(self.pos, &pos);
        img.i32(self.neg_pos, &neg);
        for (k, &(_, t)) in self.ape_idx.iter().enumerate() {
            img.i32(t, &plans.iter().flat_map(|sp| sp.comps[k].1.ape_idx.iter().copied()).collect::<Vec<_>>());
        }
        if let Some(t) = self.last_cols {
            img.i32(t, &self.seqs.iter().map(|si| (si.first + si.n - 1) as i32).collect::<Vec<_>>());
        }
        for (si, sp) in self.seqs.iter().zip(plans) {
            si.set(sp, img);
        }
    }
}

/// The graph builder of one step: straight-line code in the order of the math.
pub struct Builder<'a> {
    pub g: &'a Ctx,
    pub c: &'a Ds4Config,
    pub inp: &'a Inputs,
    /// The sequence whose attention is being built (index into `inp.seqs`).
    pub cur: usize,
    /// Writes into per-sequence state, expanded after the outputs so they run last.
    pub effects: Vec<T>,
    /// Nodes put into the graph in this order before the rest (the graph otherwise runs in
    /// the order a depth-first walk from the output meets them): each cold-executor layer's
    /// hand-over of its cold experts, then its shared expert, so the device computes the
    /// shared expert while the executor computes the cold ones.
    pub order: Vec<T>,
    pub cold: Option<*const Mutex<ColdState>>,
    /// Cold experts' host copy, for micro-batches that compute them in the graph.
    pub cold_host: Option<&'a ColdHost>,
    /// All-cold layers streamed to the GPU for big micro-batches (`stream.rs`).
    pub cold_stream: Option<&'a crate::stream::ColdStream>,
    /// The router-id nodes of the streamed layers (node address, position among the
    /// streamed layers): the evaluation callback stops there (`stream.rs`).
    pub stream_nodes: Vec<(usize, usize)>,
    /// Decode's all-cold layers split between the CPU and PCIe (`pcie.rs`).
    pub pcie: Option<&'a crate::pcie::PcieSplit>,
    /// Where the evaluation callback stops for the split (node address, what to do).
    pub pcie_nodes: Vec<(usize, crate::pcie::PcieAt)>,
    /// Boxed: the custom ops hold pointers to them, which must not move as the Vec grows.
    #[allow(clippy::vec_box)]
    pub cold_calls: Vec<Box<ColdCall>>,
    pub route_counts: Option<*const Mutex<Vec<Vec<u64>>>>,
    #[allow(clippy::vec_box)]
    pub route_calls: Vec<Box<RouteCall>>,
    /// Nodes that must run on the CPU backend (custom ops), whatever device runs the rest.
    pub cpu_nodes: Vec<T>,
    /// The graph runs on the CPU backend (some ops have a faster formulation there).
    pub on_cpu: bool,
    /// On the CPU, the held experts' MXFP4 products through `mxfp4_cpu.rs` (ggml's bits;
    /// else ggml's `mul_mat_id`): `!ModelOptions::cold_cpu_ggml_kernel`.
    pub own_kernel: bool,
    /// Attention through the flash-attention op (else matmul, softmax, matmul).
    pub flash: bool,
    /// See [`crate::ModelOptions::csa_dense_max_view`].
    pub csa_dense_max_view: usize,
    /// Attention masks shared by layers, made once per step (`MaskKey`): a query block's
    /// raw mask, or the raw mask ++ a ratio's visibility.
    pub masks: HashMap<crate::attention::MaskKey, T>,
}

impl<'a> Builder<'a> {
    /// The inputs of the sequence being built.
    pub fn si(&self) -> &'a SeqInputs {
        &self.inp.seqs[self.cur]
    }

    /// The step's position-bias rows of the compressors of this ratio.
    pub fn ape_idx(&self, ratio: usize) -> T {
        // Every ratio of the config gets inputs when the step is built.
        self.inp.ape_idx.iter().find(|&&(m, _)| m == ratio).map(|&(_, t)| t).unwrap_or_else(|| unreachable!("inputs for ratio {ratio}"))
    }

    pub fn comp_inputs(&self, ratio: usize) -> &'a CompInputs {
        // Every ratio of the config gets inputs when the step is built.
        self.si().comp.iter().find(|ci| ci.ratio == ratio).unwrap_or_else(|| unreachable!("inputs for ratio {ratio}"))
    }

    /// The model over the step's tokens (the sequences' columns one after another): the
    /// logits [n_vocab, n] (`Logits::All`) or [n_vocab, sequences] (each one's last token).
    /// Everything but the attention proper works column by column over all tokens at once
    /// (the attention's projections included); each sequence attends over its own columns
    /// and state. State writes are collected in `effects`.
    pub fn model(&mut self, w: &Weights, seqs: &[&Sequence]) -> T {
        let (g, c) = (self.g, self.c);
        let n = self.inp.tokens.ne(0);
        let hc = c.hc_count as i64;
        let e = c.n_embd as i64;

        // Embedding, copied into every stream.
        let emb = g.name(g.get_rows(w.token_embd, self.inp.tokens), "embd");
        let mut x = g.repeat_4d(g.reshape(emb, &[e, 1, n]), [e, hc, n, 1]);
        for (il, lw) in w.layers.iter().enumerate() {
            let (y, mix) = self.hc_pre(x, &lw.hc_attn, il, "attn");
            let a = self.attention(il, g.mul(g.rms_norm(y, c.rms_eps), lw.attn_norm), lw, seqs);
            x = self.hc_post(a, x, &mix);
            let (y, mix) = self.hc_pre(x, &lw.hc_ffn, il, "ffn");
            let f = self.moe(il, g.mul(g.rms_norm(y, c.rms_eps), lw.ffn_norm), lw);
            x = g.name(self.hc_post(f, x, &mix), &format!("streams-{il}"));
        }
        let mut h = g.mul(g.rms_norm(self.hc_head(x, &w.hc_head), c.rms_eps), w.output_norm);
        if let Some(last) = self.inp.last_cols {
            h = g.get_rows(h, last);
        }
        let h = g.name(h, "hidden_final");
        g.name(g.mm(w.output, h), "logits")
    }
}
