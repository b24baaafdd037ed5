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
            let op = unsafe { g.custom(TensorType::F32, [1, 1, 1], &[ids], crate::cold::route_count, ptr) };
            self.effects.push(op);
            self.cpu_nodes.push(op);
        }
        let mut wts = g.reshape(g.get_rows(g.reshape(probs, &[1, n_exp, n]), ids), &[k, n]);
        if c.expert_weights_norm {
            wts = g.div(wts, g.sum_rows(wts));
        }
        let wts = g.name(g.scale(wts, c.expert_weights_scale), &format!("router_weights-{il}"));

        // The shared expert: computed while cold experts are (`routed_experts` orders it).
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
    /// (`cold.rs`) around the hot compute, so both overlap. Wherever each slot's expert was
    /// computed, its output lands in one [n_embd, k, n] tensor, and one weighted sum over the
    /// slots in router order plus `base` gives the result: on the CPU (where the executor's
    /// experts run the same kernels over the same weight layout) the same bits for every
    /// placement of the experts.
    pub fn routed_experts(&mut self, il: usize, z: T, ids: T, wts: T, w: &LayerWeights, base: Option<T>) -> T {
        if let Some(out) = self.routed_offloaded(il, z, ids, wts, w, base) {
            return out;
        }
        let g = self.g;
        let (e, k, n) = (z.ne(0), ids.ne(0), z.ne(1));
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
        let local = self.cold_op(il, TensorType::I32, [k, n, 1], &[z, ids], crate::cold::cold_begin, false);
        let local = g.name(local, &format!("cold_begin-{il}"));
        // The shared expert right after the hand-over, beside the held experts: the device
        // computes both while the executor computes the cold ones.
        self.order.push(local);
        self.order.extend(base);
        // The held experts' outputs (the cold slots computed for held stand-ins, replaced).
        let held = w.experts.as_ref().map(|r| self.expert_slots(z, local, r));
        let mut args = vec![local, ids];
        args.extend(held);
        // With the model on the CPU every thread of its team enters cold_end, and an executor's
        // job is split over them (the team is in its parallel region for the model's own ops,
        // where a compute of the executor's own would get one thread). With the model on
        // another device the CPU ops around it are single tasks, so ggml runs them without a
        // parallel region, and cold_end (one task) leaves the executor its own team.
        let slots = self.cold_op(il, TensorType::F32, [e, k, n], &args, crate::cold::cold_end, self.on_cpu); // [e, k, n]
        let slots = g.name(slots, &format!("cold_end-{il}"));
        let out = plus_base(self.weighted_sum(il, slots, wts));
        g.name(out, &format!("routed_out-{il}"))
    }

    fn cold_op(&mut self, il: usize, ty: TensorType, ne: [i64; 3], args: &[T], fun: CustomOp, all_threads: bool) -> T {
        let Some(state) = self.cold else { unreachable!("checked by the caller") };
        let call = Box::new(crate::cold::ColdCall { state, layer: il });
        let ptr = &*call as *const crate::cold::ColdCall as *mut std::ffi::c_void;
        self.cold_calls.push(call);
        // SAFETY: `call` is boxed and kept with the step graph (cold_calls), so `ptr` lives as
        // long as the graph; `fun` reads a ColdCall (cold_end: from every thread at once, which
        // it is written for).
        let op = unsafe {
            if all_threads {
                self.g.custom_all_threads(ty, ne, args, fun, ptr)
            } else {
                self.g.custom(ty, ne, args, fun, ptr)
            }
        };
        self.cpu_nodes.push(op);
        op
    }

    /// Σ_k weight · expert(z) over experts held by this backend (`ids` are indices into the
    /// held tensors).
    pub(crate) fn hot_experts(&mut self, il: usize, z: T, ids: T, wts: T, r: &RoutedWeights) -> T {
        let slots = self.expert_slots(z, ids, r);
        self.weighted_sum(il, slots, wts)
    }

    /// [`hot_experts`](Self::hot_experts) over a host copy on the CPU, its MXFP4 products
    /// through `mxfp4_cpu.rs` (ggml's bits).
    pub(crate) fn host_experts(&mut self, il: usize, z: T, ids: T, wts: T, r: &RoutedWeights) -> T {
        let (e, n) = (z.ne(0), z.ne(1));
        let slots = r.ffn.forward_host(self.g, self.g.reshape(z, &[e, 1, n]), ids, &mut self.cpu_nodes);
        self.weighted_sum(il, slots, wts)
    }

    /// Each slot's expert output [n_embd, k, n] for `z` [n_embd, n] and `ids` [k, n]
    /// (indices into the held tensors of `r`). On the CPU its MXFP4 products in the plain
    /// layout go through `mxfp4_cpu.rs`, as the cold executor's do (ggml's bits).
    fn expert_slots(&mut self, z: T, ids: T, r: &RoutedWeights) -> T {
        let (e, n) = (z.ne(0), z.ne(1));
        let x = self.g.reshape(z, &[e, 1, n]);
        if self.on_cpu && self.own_kernel {
            r.ffn.forward_host(self.g, x, ids, &mut self.cpu_nodes)
        } else {
            r.ffn.forward(self.g, x, ids)
        }
    }

    /// Per token the weighted sum of its k slots' outputs `slots` [n_embd, k, n] with `wts`
    /// [k, n], in slot order. On the CPU one outer product summed over the slots,
    /// Σ_k slots[·, k] ⊗ wts[k] (vectorized over n_embd). Elsewhere llama.cpp's form: every
    /// slot scaled by its weight, then the k slots added one after another (k − 1 elementwise
    /// adds over [n_embd, n]); the product form there, n products of [k, n_embd]ᵀ · [k, 1],
    /// took 2.5 ms of a 4-layer pp512's 15 ms per layer on an H100 at full width, the adds
    /// a few µs. Elementwise per token, so a token's sum is the same whatever else the
    /// micro-batch holds.
    fn weighted_sum(&self, il: usize, slots: T, wts: T) -> T {
        let g = self.g;
        let (e, k, n) = (slots.ne(0), slots.ne(1), slots.ne(2));
        let acc = if self.on_cpu {
            g.out_prod(slots, g.reshape(wts, &[1, k, n])) // [e, 1, n]
        } else {
            let scaled = g.mul(slots, g.reshape(wts, &[1, k, n])); // [e, k, n]
            let (row, tok) = (scaled.nb(1), scaled.nb(2));
            let slot = |j: i64| g.view_3d(scaled, [e, n, 1], tok, tok * n as usize, j as usize * row); // [e, n]
            let mut acc = slot(0);
            for j in 1..k {
                acc = g.add(acc, slot(j));
            }
            if k == 1 { g.cont(acc) } else { acc }
        };
        g.name(g.reshape(acc, &[e, n]), &format!("experts_out-{il}"))
    }
}
