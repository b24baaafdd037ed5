//! The routed-expert FFN, one builder for every place that computes experts: the experts
//! the model's device holds, inside the step graph (`moe.rs`), and the cold experts in the
//! moe-expert workers (`expert-worker`), so both compute the same ops in the same order.
//!
//! Per (token, slot) with expert `e = ids[slot, token]`:
//! `down_e · (silu(min(gate_e·x, c)) ⊙ clamp(up_e·x, −c, c))`, `c` the layer's
//! `swiglu_clamp_exp` (no clamp when `c ≤ 0`); the weighted sum over the slots is the
//! caller's.
use loader::ExpertPart;

use crate::ops::{Ctx, T};

/// Gate and up projections of a layer's held experts.
#[derive(Clone, Copy, Debug)]
pub enum UpGate {
    Separate { gate: T, up: T },
    /// [n_embd, 2·ff, n_held]: gate rows first, then up rows.
    Fused(T),
}

/// The held experts of one layer: their weights (slice `i` of each tensor is the `i`-th
/// held expert), FFN width and SwiGLU clamp.
#[derive(Clone, Copy, Debug)]
pub struct ExpertFfn {
    pub up_gate: UpGate,
    /// [ff, n_embd, n_held].
    pub down: T,
    pub n_ff: i64,
    pub clamp: f32,
}

/// A lookup failed: the routed-expert tensor `0` is not among the loaded ones.
#[derive(Debug)]
pub struct MissingExpertTensor(pub String);

impl ExpertFfn {
    /// The experts of `layer` from the loaded tensors (`get` by name): the fused gate/up
    /// tensor where the file has one, else gate and up; then down.
    pub fn lookup(layer: usize, n_ff: usize, clamp: f32, get: impl Fn(&str) -> Option<T>) -> Result<ExpertFfn, MissingExpertTensor> {
        let part = |p: ExpertPart| {
            let name = p.name(layer);
            get(&name).ok_or(MissingExpertTensor(name))
        };
        let up_gate = match part(ExpertPart::GateUp) {
            Ok(gu) => UpGate::Fused(gu),
            Err(_) => UpGate::Separate { gate: part(ExpertPart::Gate)?, up: part(ExpertPart::Up)? },
        };
        Ok(ExpertFfn { up_gate, down: part(ExpertPart::Down)?, n_ff: n_ff as i64, clamp })
    }

    /// `x` [n_embd, 1, n] (each token's input, shared by its slots), `ids` I32 [k, n]
    /// (indices into the held experts) → each slot's expert output [n_embd, k, n].
    pub fn forward(&self, g: &Ctx, x: T, ids: T) -> T {
        self.forward_with(g, ids, x, |w, x| g.mm_id(w, x, ids))
    }

    /// [`forward`](Self::forward) on the CPU with each MXFP4 product of a weight in the plain
    /// layout through `mxfp4_cpu::mul_mat_id` (ggml's bits, each routed expert's rows read
    /// once; other types and repacked weights through `mul_mat_id`). Its custom ops go into
    /// `cpu_nodes`.
    pub fn forward_host(&self, g: &Ctx, x: T, ids: T, cpu_nodes: &mut Vec<T>) -> T {
        // each input quantized once (separate gate and up read the same one)
        let mut quantized: Vec<(T, T)> = Vec::new();
        self.forward_with(g, ids, x, |w, x| {
            if !crate::mxfp4_cpu::takes(w, x) {
                return g.mm_id(w, x, ids);
            }
            let xq = match quantized.iter().find(|(of, _)| of.0 == x.0) {
                Some(&(_, q)) => q,
                None => {
                    let q = crate::mxfp4_cpu::quantize(g, x);
                    cpu_nodes.push(q);
                    quantized.push((x, q));
                    q
                }
            };
            let op = crate::mxfp4_cpu::mul_mat_id(g, w, xq, ids);
            cpu_nodes.push(op);
            op
        })
    }

    /// The FFN with `mm(w, x)` as each expert product (`mul_mat_id` over `ids`).
    fn forward_with(&self, g: &Ctx, ids: T, x: T, mut mm: impl FnMut(T, T) -> T) -> T {
        let (k, n, ff) = (ids.ne(0), ids.ne(1), self.n_ff);
        let (gate, up) = match self.up_gate {
            UpGate::Separate { gate, up } => (mm(gate, x), mm(up, x)),
            UpGate::Fused(gu) => {
                let both = mm(gu, x); // [2ff, k, n]
                let half = |i0: usize| g.cont(g.view_3d(both, [ff, k, n], both.nb(1), both.nb(2), i0 * ff as usize * both.elem_size()));
                (half(0), half(1))
            }
        };
        let h = swiglu_clamped(g, gate, up, self.clamp); // [ff, k, n]
        mm(self.down, h) // [n_embd, k, n]
    }
}

/// silu(min(gate, clamp)) · clamp(up, −clamp, clamp); no clamp when `clamp` ≤ 0.
pub fn swiglu_clamped(g: &Ctx, gate: T, up: T, clamp: f32) -> T {
    if clamp > 0.0 {
        g.swiglu(g.clamp(gate, f32::NEG_INFINITY, clamp), g.clamp(up, -clamp, clamp))
    } else {
        g.swiglu(gate, up)
    }
}
