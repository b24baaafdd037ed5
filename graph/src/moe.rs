//! MoE: the router (sqrt-softplus scores, top-k with a selection-only bias, or the fixed
//! token → experts table on hash layers), the routed experts behind one seam, and the shared
//! expert.
use loader::GatingFunc;

use crate::model::Builder;
use crate::ops::T;
use crate::weights::{ExpertUpGate, LayerWeights, Router};

impl Builder<'_> {
    /// `z`: the MoE input [n_embd, n] (already ffn_norm'ed).
    pub fn moe(&mut self, il: usize, z: T, w: &LayerWeights) -> T {
        let (g, c) = (self.g, self.c);
        let (n_exp, k, n) = (c.n_expert as i64, c.n_expert_used as i64, z.ne(1));
        let logits = g.mm(w.gate_inp, z); // [n_expert, n]
        let probs = match c.gating {
            GatingFunc::SqrtSoftplus => g.sqrt(g.softplus(logits)),
        };
        let probs = g.name(probs, &format!("router_probs-{il}"));
        let ids = match w.router {
            Router::Hash { tid2eid } => g.get_rows(tid2eid, self.inp.tokens),
            Router::TopK { bias } => g.cont(g.top_k(g.add(probs, bias), k)),
        };
        let ids = g.name(ids, &format!("router_ids-{il}"));
        let mut wts = g.reshape(g.get_rows(g.reshape(probs, &[1, n_exp, n]), ids), &[k, n]);
        if c.expert_weights_norm {
            wts = g.div(wts, g.sum_rows(wts));
        }
        let wts = g.name(g.scale(wts, c.expert_weights_scale), &format!("router_weights-{il}"));

        let routed = self.routed_experts(il, z, ids, wts, w);
        match w.shared {
            Some((gate, up, down)) => {
                let clamp = c.swiglu_clamp_shexp[il];
                let h = self.swiglu(g.mm(gate, z), g.mm(up, z), clamp);
                g.add(routed, g.mm(down, h))
            }
            None => routed,
        }
    }

    /// silu(min(gate, clamp)) · clamp(up, −clamp, clamp); no clamp when `clamp` ≤ 0.
    fn swiglu(&self, gate: T, up: T, clamp: f32) -> T {
        let g = self.g;
        if clamp > 0.0 {
            g.mul(g.silu(g.clamp(gate, f32::NEG_INFINITY, clamp)), g.clamp(up, -clamp, clamp))
        } else {
            g.mul(g.silu(gate), up)
        }
    }

    /// The routed-expert seam: activations `z` [n_embd, n], selected expert ids [k, n] (I32)
    /// and their weights [k, n] in; Σ_k weight · expert(z) [n_embd, n] out. Everything that
    /// decides where experts run (hot on this backend, cold in worker processes) plugs in
    /// here.
    pub fn routed_experts(&mut self, il: usize, z: T, ids: T, wts: T, w: &LayerWeights) -> T {
        let (g, c) = (self.g, self.c);
        let (e, k, n) = (z.ne(0), ids.ne(0), z.ne(1));
        let ff = c.n_ff_exp[il] as i64;
        let zz = g.reshape(z, &[e, 1, n]);
        let (gate, up) = match w.up_gate_exps {
            ExpertUpGate::Separate { gate, up } => (g.mm_id(gate, zz, ids), g.mm_id(up, zz, ids)),
            ExpertUpGate::Fused(gu) => {
                let both = g.mm_id(gu, zz, ids); // [2ff, k, n]
                let half = |i0: usize| g.cont(g.view_3d(both, [ff, k, n], both.nb(1), both.nb(2), i0 * ff as usize * both.elem_size()));
                (half(0), half(1))
            }
        };
        let h = self.swiglu(gate, up, c.swiglu_clamp_exp[il]); // [ff, k, n]
        let down = g.mm_id(w.down_exps, h, ids); // [e, k, n]
        let down = g.mul(down, g.reshape(wts, &[1, k, n]));
        let slot = |i: i64| g.view_3d(down, [e, n, 1], down.nb(2), down.nb(2) * n as usize, i as usize * down.nb(1));
        let mut acc = slot(0);
        for i in 1..k {
            acc = g.add(acc, slot(i));
        }
        g.name(acc, &format!("routed_out-{il}"))
    }
}
