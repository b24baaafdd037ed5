//! MoE: the router (sqrt-softplus scores, top-k with a selection-only bias, or the fixed
//! token → experts table on hash layers), the routed experts behind one seam, and the shared
//! expert.
use loader::GatingFunc;

use crate::builder::Builder;
use crate::expert_ffn::swiglu_clamped;
use crate::ops::{CustomOp, T};
use crate::weights::{LayerWeights, Router, RoutedWeights};

use ggml::TensorType;

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
            Router::TopK { bias } => g.contiguous(g.top_k(g.add(probs, bias), k)),
        };
        let ids = g.name(ids, &format!("router_ids-{il}"));
        if let Some(counts) = self.route_counts {
            let call = Box::new(crate::cold::RouteCall { counts, layer: il });
            let ptr = &*call as *const crate::cold::RouteCall as *mut std::ffi::c_void;
            self.route_calls.push(call);
            // SAFETY: `call` is boxed and kept with the step graph; route_count reads a RouteCall.
            let op = unsafe { g.custom(TensorType::F32, [1, 1], &[ids], crate::cold::route_count, ptr) };
            self.effects.push(op);
            self.cpu_nodes.push(op);
        }
        let mut wts = g.reshape(g.get_rows(g.reshape(probs, &[1, n_exp, n]), ids), &[k, n]);
        if c.expert_weights_norm {
            wts = g.div(wts, g.sum_rows(wts));
        }
        let wts = g.name(g.scale(wts, c.expert_weights_scale), &format!("router_weights-{il}"));

        // The shared expert goes first, so that it is computed while cold experts are.
        let shared = w.shared.map(|(gate, up, down)| {
            let h = swiglu_clamped(g, g.mm(gate, z), g.mm(up, z), c.swiglu_clamp_shexp[il]);
            g.name(g.mm(down, h), &format!("shared_out-{il}"))
        });
        self.routed_experts(il, z, ids, wts, w, shared)
    }

    /// The routed-expert seam: activations `z` [n_embd, n], selected expert ids [k, n] (I32)
    /// and their weights [k, n] in; `base` + Σ_k weight · expert(z) [n_embd, n] out (`base`:
    /// the shared expert's output, computed on the device while the cold experts run).
    /// Experts this backend holds are computed here; the others go to the cold executor
    /// (`cold.rs`) around the hot compute, so both overlap.
    pub fn routed_experts(&mut self, il: usize, z: T, ids: T, wts: T, w: &LayerWeights, base: Option<T>) -> T {
        if let Some(out) = self.routed_offloaded(il, z, ids, wts, w, base) {
            return out;
        }
        let g = self.g;
        let (k, n) = (ids.ne(0), z.ne(1));
        let plus_base = |t: T| match base {
            Some(b) => g.add(t, b),
            None => t,
        };
        let all_hot = w.experts.as_ref().is_some_and(|r| r.held_mask.is_none());
        if all_hot || self.cold.is_none() {
            return match &w.experts {
                Some(r) => {
                    let hot = self.hot_experts(il, z, ids, wts, r);
                    plus_base(hot)
                }
                None => unreachable!("layers without held experts need a cold executor (checked at load)"),
            };
        }
        // [k, n] I32: the held experts' local ids, distinct per token (cold slots filled).
        let local = self.cold_op(il, TensorType::I32, [k, n], &[z, ids, wts], crate::cold::cold_begin);
        let local = g.name(local, &format!("cold_begin-{il}"));
        let hot = match &w.experts {
            Some(r) => {
                let Some(mask) = r.held_mask else { unreachable!("a partly held layer has a held mask") };
                let held = g.reshape(g.get_rows(g.reshape(mask, &[1, mask.ne(0)]), g.reshape(ids, &[k * n])), &[k, n]);
                let hot = self.hot_experts(il, z, local, g.mul(wts, held), r);
                Some(g.cont(plus_base(hot)))
            }
            None => base.map(|b| g.cont(b)),
        };
        let mut args = vec![local];
        args.extend(hot);
        let out = self.cold_op(il, TensorType::F32, [z.ne(0), n], &args, crate::cold::cold_end);
        g.name(out, &format!("routed_out-{il}"))
    }

    fn cold_op(&mut self, il: usize, ty: TensorType, ne: [i64; 2], args: &[T], fun: CustomOp) -> T {
        let Some(state) = self.cold else { unreachable!("checked by the caller") };
        let call = Box::new(crate::cold::ColdCall { state, layer: il });
        let ptr = &*call as *const crate::cold::ColdCall as *mut std::ffi::c_void;
        self.cold_calls.push(call);
        // SAFETY: `call` is boxed and kept with the step graph (cold_calls), so `ptr` lives as
        // long as the graph; `fun` reads a ColdCall.
        let op = unsafe { self.g.custom(ty, ne, args, fun, ptr) };
        self.cpu_nodes.push(op);
        op
    }

    /// Σ_k weight · expert(z) over experts held by this backend (`ids` are indices into the
    /// held tensors).
    pub(crate) fn hot_experts(&mut self, il: usize, z: T, ids: T, wts: T, r: &RoutedWeights) -> T {
        let g = self.g;
        let (e, k, n) = (z.ne(0), ids.ne(0), z.ne(1));
        let down = r.ffn.forward(g, g.reshape(z, &[e, 1, n]), ids); // [e, k, n]
        // Per token the weighted sum over its k slots, one product: on the CPU an outer
        // product summed over the slots, Σ_k down[·, k] ⊗ wts[k] (vectorized over n_embd);
        // elsewhere [k, e] · [k, 1] → [e, 1].
        let acc = if self.on_cpu {
            g.out_prod(down, g.reshape(wts, &[1, k, n])) // [e, 1, n]
        } else {
            let down_t = g.cont(g.permute(down, [1, 0, 2, 3])); // [k, e, n]
            g.mm(down_t, g.reshape(wts, &[k, 1, n])) // [e, 1, n]
        };
        g.name(g.reshape(acc, &[e, n]), &format!("hot_out-{il}"))
    }
}
