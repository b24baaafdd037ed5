//! Cold experts on the GPU for big micro-batches (prefill). The cold executor computes a
//! token's cold experts on the CPU, which is right for decode; a micro-batch of hundreds of
//! tokens routes to nearly every expert, and the GPU computes them faster than the CPU even
//! after copying them over PCIe. So, with `ModelOptions::cold_offload_min` set, the model
//! also keeps its cold experts in pinned host memory, and a micro-batch of at least that
//! many tokens computes them in the step graph itself: `mul_mat_id` over the host tensors,
//! which ggml's scheduler (with op offloading on) runs on the GPU, copying only the experts
//! the micro-batch routes to (llama.cpp's path for experts kept on the CPU). Smaller batches
//! (decode) use the executor as before.
//!
//! A layer whose experts are all cold uses the router's ids directly. A partly held layer
//! maps them to the cold tensors' local indices with the `local_ids` CPU op, filling hot
//! slots with cold experts the token does not use, at weight 0 (GPU expert kernels compute
//! one slot per (token, expert), so ids must be distinct per token; such a layer needs at
//! least k cold experts, else it keeps the executor).
use std::ffi::c_void;

use experts::ExpertSet;
use ggml::{BufferType, Context};
use loader::{ExpertPart, LoadedTensors, ModelFile, ReadOptions, TensorRequest};

use crate::builder::Builder;
use crate::cold::held_slots;
use crate::expert_ffn::ExpertFfn;
use crate::ops::T;
use crate::weights::{LayerWeights, RoutedWeights, TensorSet};
use crate::GraphError;

/// Global expert id → index among one set of experts (−1: not in the set), and the set's size.
pub(crate) struct LocalIds {
    pub local: Vec<i32>,
    pub n_local: i32,
}

impl LocalIds {
    fn of(set: impl Iterator<Item = u32>, n_expert: usize) -> LocalIds {
        let mut local = vec![-1i32; n_expert];
        let mut n_local = 0;
        for e in set {
            local[e as usize] = n_local;
            n_local += 1;
        }
        LocalIds { local, n_local }
    }
}

/// One layer's cold experts in host memory.
pub(crate) struct ColdLayer {
    /// `held_mask` here is the cold mask (1 for cold experts), None when all are cold.
    pub weights: RoutedWeights,
    /// A partly held layer's id maps into the cold and the held tensors (None when every
    /// expert is cold: the router's ids are the cold tensors' indices).
    pub maps: Option<(Box<LocalIds>, Box<LocalIds>)>,
}

/// The cold experts of every layer that can be offloaded, in one pinned host buffer.
pub(crate) struct ColdHost {
    pub layers: Vec<Option<ColdLayer>>,
    pub min_batch: usize,
    /// Layers whose experts are all cold compute them in the graph at every batch size (the
    /// CPU backend below `min_batch`, as llama.cpp does with experts kept on the CPU).
    pub all_cold_in_graph: bool,
    /// Micro-batches of fewer tokens compute the host copy's MXFP4 products in the graph
    /// through `mxfp4_cpu.rs` (ggml's bits): those ggml's scheduler keeps on the CPU
    /// ([`op_offload_min_batch`]). 0: ggml's `mul_mat_id` at every size.
    pub own_kernel_below: usize,
    _masks: Option<(Context, ggml::Buffer)>,
    _tensors: TensorSet,
}

impl ColdHost {
    /// Load the cold experts of `hot`'s layers into `host` (a GPU's pinned host buffer type)
    /// for micro-batches of at least `min_batch` tokens. None when no layer qualifies.
    /// `device` holds the small cold masks.
    pub fn load(file: &ModelFile, hot: &ExpertSet, host: BufferType, device: BufferType, min_batch: usize, all_cold_in_graph: bool, read: &ReadOptions) -> Result<Option<ColdHost>, GraphError> {
        let c = &file.config;
        let cold: Vec<Vec<u32>> = (0..c.n_layer)
            .map(|l| (0..c.n_expert as u32).filter(|e| !hot.contains(l as u32, *e)).collect())
            .collect();
        let n_cold: Vec<usize> = cold.iter().map(Vec::len).collect();
        let layers = host_copy_layers(&n_cold, c.n_expert, c.n_expert_used, min_batch);
        if layers.is_empty() {
            return Ok(None);
        }
        let mut requests = Vec::new();
        for &l in &layers {
            for part in ExpertPart::ALL {
                let name = part.name(l);
                if file.tensors.get(&name).is_some() {
                    requests.push(if cold[l].len() == c.n_expert { TensorRequest::whole(name) } else { TensorRequest::experts(name, cold[l].clone()) });
                }
            }
        }
        let loaded: LoadedTensors = loader::load_tensors(file, &requests, host, read)?;
        let tensors = TensorSet::new(vec![loaded]);
        let partial: Vec<(usize, &[u32])> = layers.iter().filter(|&&l| cold[l].len() < c.n_expert).map(|&l| (l, cold[l].as_slice())).collect();
        let masks = crate::load::expert_masks(c.n_expert, &partial, device)?;
        let mut out: Vec<Option<ColdLayer>> = (0..c.n_layer).map(|_| None).collect();
        for &l in &layers {
            let ffn = ExpertFfn::lookup(l, c.n_ff_exp[l], c.swiglu_clamp_exp[l], |name| tensors.get(name))
                .map_err(|m| GraphError::MissingTensor(format!("{} (cold copy)", m.0)))?;
            let (held_mask, maps) = match masks.1.iter().find(|(m, _)| *m == l) {
                Some(&(_, mask)) => {
                    let cold_map = LocalIds::of(cold[l].iter().copied(), c.n_expert);
                    let hot_map = LocalIds::of(hot.layer(l as u32).iter().copied(), c.n_expert);
                    (Some(mask), Some((Box::new(cold_map), Box::new(hot_map))))
                }
                None => (None, None),
            };
            out[l] = Some(ColdLayer { weights: RoutedWeights { ffn, held_mask }, maps });
        }
        tracing::info!(layers = layers.len(), min_batch, "cold experts also in pinned host memory: micro-batches of at least min_batch tokens compute them on the GPU");
        Ok(Some(ColdHost { layers: out, min_batch: min_batch.max(1), all_cold_in_graph, own_kernel_below: 0, _masks: masks.0, _tensors: tensors }))
    }
}

/// The layers whose cold experts get a pinned host copy, from each layer's number of cold
/// experts: those with every expert cold (computed in the graph), and, when micro-batches of
/// `min_batch` tokens offload (`usize::MAX`: never), the partly held layers with at least `k`
/// cold experts (a partly held layer's local ids are filled with cold experts the token does
/// not use, so it needs k of them).
fn host_copy_layers(n_cold: &[usize], n_expert: usize, k: usize, min_batch: usize) -> Vec<usize> {
    let wanted = |n: usize| n > 0 && (n == n_expert || (min_batch != usize::MAX && n >= k));
    n_cold.iter().enumerate().filter(|&(_, &n)| wanted(n)).map(|(l, _)| l).collect()
}

/// The smallest batch ggml's GPU backends compute a product over weights in host memory for
/// (its scheduler's op offload): `GGML_OP_OFFLOAD_MIN_BATCH` read as ggml reads it (C's
/// `atoi`: leading blanks, a sign, digits; anything else 0), else ggml's default of 32.
/// Smaller batches run such products on the CPU.
pub(crate) fn op_offload_min_batch() -> usize {
    std::env::var("GGML_OP_OFFLOAD_MIN_BATCH").map_or(32, |v| c_atoi(&v).max(0) as usize)
}

/// C's `atoi`, without its overflow (clamped instead).
fn c_atoi(s: &str) -> i64 {
    let s = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let v = digits.bytes().take_while(u8::is_ascii_digit).fold(0i64, |v, d| v.saturating_mul(10).saturating_add(i64::from(d - b'0')));
    if neg { -v } else { v }
}

/// Writes [k, n] I32 into `dst`: each slot's index in a set of experts, the slots of experts
/// outside it filled with ones of the set the token does not use (see [`held_slots`]).
///
/// # Safety
/// A ggml custom op over `src[0]`, the router's ids [k, n] I32, with `userdata` a `LocalIds`.
pub(crate) unsafe extern "C" fn local_ids(dst: *mut ggml::sys::ggml_tensor, ith: i32, _nth: i32, userdata: *mut c_void) {
    if ith != 0 {
        return;
    }
    // SAFETY: the caller's contract: `dst` and its source are CPU tensors of contiguous I32
    // rows, `userdata` a ColdIds kept alive by the model.
    unsafe {
        let map = &*(userdata as *const LocalIds);
        let d = &*dst;
        let ids = &*d.src[0];
        let (k, n) = (ids.ne[0] as usize, ids.ne[1] as usize);
        let ids = std::slice::from_raw_parts(ids.data as *const i32, k * n);
        let out = std::slice::from_raw_parts_mut(d.data as *mut i32, k * n);
        for t in 0..n {
            held_slots(&map.local, map.n_local, &ids[t * k..(t + 1) * k], &mut out[t * k..(t + 1) * k]);
        }
    }
}

impl Builder<'_> {
    /// The routed experts of a micro-batch big enough for the cold ones to be computed in
    /// the graph from their host copy (on the GPU, by the scheduler's op offload): base +
    /// held + cold. None when the layer keeps the executor.
    pub fn routed_offloaded(&mut self, il: usize, z: T, ids: T, wts: T, w: &LayerWeights, base: Option<T>) -> Option<T> {
        let host = self.cold_host?;
        let cold = host.layers[il].as_ref()?;
        let n_tok = z.ne(1) as usize;
        // Streamed into a GPU slot (`stream.rs`): the slot's copy of the cold experts, read by
        // the same products as their host copy.
        let streamed = self.cold_stream.filter(|s| n_tok >= s.min_batch).and_then(|s| s.layer(il));
        let in_graph_always = host.all_cold_in_graph && cold.maps.is_none();
        if streamed.is_none() && n_tok < host.min_batch && !in_graph_always {
            return None;
        }
        if let Some(s) = streamed {
            self.stream_nodes.push((ids.0 as usize, s.pos));
        }
        // Few tokens (decode): an all-cold layer's first slots over PCIe, the rest on the CPU;
        // a partly held layer's cold slots over PCIe.
        let split = self.pcie.filter(|p| streamed.is_none() && n_tok <= p.max_tokens);
        if let Some((p, layer)) = split.and_then(|p| p.layer(il).map(|l| (p, l))) {
            return Some(match (&cold.maps, &w.experts, cold.weights.held_mask) {
                (None, _, _) => self.routed_split(il, z, ids, wts, base, &cold.weights, p, layer),
                (Some((_, hot_map)), Some(held), Some(cold_mask)) => self.routed_staged_cold(il, z, ids, wts, base, (hot_map, held), (&cold.weights, cold_mask), p, layer),
                _ => unreachable!("a layer's cold copy matches its held experts (both partial, or none held)"),
            });
        }
        let cold_weights = streamed.map_or(&cold.weights, |s| &s.weights);
        // Below ggml's offload size the scheduler runs the host copy's products on the CPU:
        // there through dflash's product (ggml's bits).
        let own_kernel = streamed.is_none() && n_tok < host.own_kernel_below;
        let g = self.g;
        let (k, n) = (ids.ne(0), z.ne(1));
        // The weights of the slots in a set: wts · mask[ids].
        let masked = |mask: T| g.mul(wts, g.reshape(g.get_rows(g.reshape(mask, &[1, mask.ne(0)]), g.reshape(ids, &[k * n])), &[k, n]));
        let mut sum = base;
        let mut add = |t: T| sum = Some(match sum {
            Some(s) => g.add(s, t),
            None => t,
        });
        match (&cold.maps, &w.experts) {
            (Some((cold_map, hot_map)), Some(held)) => {
                let (Some(hot_mask), Some(cold_mask)) = (held.held_mask, cold.weights.held_mask) else {
                    unreachable!("a partly held layer has both masks")
                };
                let hot_ids = self.local_ids_op(il, ids, hot_map, "hot");
                add(self.hot_experts(il, z, hot_ids, masked(hot_mask), held));
                let cold_ids = self.local_ids_op(il, ids, cold_map, "cold");
                add(if own_kernel { self.host_experts(il, z, cold_ids, masked(cold_mask), cold_weights) } else { self.hot_experts(il, z, cold_ids, masked(cold_mask), cold_weights) });
            }
            (None, None) => add(if own_kernel { self.host_experts(il, z, ids, wts, cold_weights) } else { self.hot_experts(il, z, ids, wts, cold_weights) }),
            _ => unreachable!("a layer's cold copy matches its held experts (both partial, or none held)"),
        }
        let out = sum.unwrap_or_else(|| unreachable!("at least the cold experts were added"));
        Some(g.name(out, &format!("routed_out-{il}")))
    }

    /// An all-cold layer's routed experts for a micro-batch of few tokens, split between the
    /// CPU and PCIe (`pcie.rs`): base + the CPU slots' sum (the host copy `cpu`, read by the
    /// CPU) + the GPU slots' sum (the staged experts). The slots' ids and weights come from
    /// the split's own tensors, which the evaluation callback fills at the router weights;
    /// the router is put into the graph ahead of them (`order`), as nothing of the split
    /// reads it.
    #[allow(clippy::too_many_arguments)]
    fn routed_split(&mut self, il: usize, z: T, ids: T, wts: T, base: Option<T>, cpu: &RoutedWeights, p: &crate::pcie::PcieSplit, layer: &crate::pcie::PcieLayer) -> T {
        use crate::pcie::PcieAt;
        let g = self.g;
        let (k, n) = (ids.ne(0), z.ne(1));
        let slots = p.slots as i64;
        // The callback reads both at the weights: kept from reuse by later nodes.
        g.output(ids);
        self.order.push(g.output(wts));
        let mut sum = base;
        let mut add = |t: T| sum = Some(match sum {
            Some(s) => g.add(s, t),
            None => t,
        });
        let cpu_out = (slots < k).then(|| {
            let (ids_cpu, wts_cpu) = p.cpu_slots(g, n);
            let out = if p.own_kernel { self.host_experts(il, z, ids_cpu, wts_cpu, cpu) } else { self.hot_experts(il, z, ids_cpu, wts_cpu, cpu) };
            g.name(out, &format!("cold_cpu_out-{il}"))
        });
        self.pcie_nodes.push((wts.0 as usize, PcieAt::Plan { layer: il, ids: ids.0 as usize, wait: cpu_out.is_none() }));
        if let Some(c) = cpu_out {
            self.pcie_nodes.push((c.0 as usize, PcieAt::Staged));
            add(c);
        }
        let staged = self.hot_experts(il, z, p.remap(g, slots, n), p.wts_gpu(g, slots, n), &layer.staged);
        add(g.name(staged, &format!("cold_pcie_out-{il}")));
        let out = sum.unwrap_or_else(|| unreachable!("the staged slots were added"));
        g.name(out, &format!("routed_out-{il}"))
    }

    /// A partly held layer's routed experts for a micro-batch of few tokens: base + the held
    /// experts over their local ids (as `routed_offloaded` computes them) + the cold slots
    /// from copies of their experts staged over PCIe (`pcie.rs`; the staging indices come
    /// from the evaluation callback at the router; each product's weights masked to its
    /// slots) + with `partial_cpu` the CPU's share of the cold slots, computed from the host
    /// copy `cold` while the copies run. The held products run while the copies do: the
    /// model's stream waits for them after the held experts' sum (with a CPU share, after
    /// the CPU's).
    #[allow(clippy::too_many_arguments)]
    fn routed_staged_cold(&mut self, il: usize, z: T, ids: T, wts: T, base: Option<T>, hot: (&LocalIds, &RoutedWeights), cold: (&RoutedWeights, T), p: &crate::pcie::PcieSplit, layer: &crate::pcie::PcieLayer) -> T {
        use crate::pcie::PcieAt;
        let g = self.g;
        let (k, n) = (ids.ne(0), z.ne(1));
        let (hot_map, held) = hot;
        let (cold_host, cold_mask) = cold;
        let Some(hot_mask) = held.held_mask else { unreachable!("a partly held layer has a held mask") };
        // The callback reads the ids (and with a CPU share the weights): kept from reuse by
        // later nodes.
        g.output(ids);
        let masked = |mask: T| g.mul(wts, g.reshape(g.get_rows(g.reshape(mask, &[1, mask.ne(0)]), g.reshape(ids, &[k * n])), &[k, n]));
        let plan_at = if p.partial_cpu {
            self.order.push(g.output(wts));
            wts
        } else {
            ids
        };
        let hot_ids = self.local_ids_op(il, ids, hot_map, "hot");
        let held_out = self.hot_experts(il, z, hot_ids, masked(hot_mask), held);
        self.pcie_nodes.push((plan_at.0 as usize, PcieAt::Plan { layer: il, ids: ids.0 as usize, wait: false }));
        let cpu_out = p.partial_cpu.then(|| {
            let (ids_cpu, wts_cpu) = p.cpu_slots(g, n);
            g.name(self.host_experts(il, z, ids_cpu, wts_cpu, cold_host), &format!("cold_cpu_out-{il}"))
        });
        self.pcie_nodes.push((cpu_out.unwrap_or(held_out).0 as usize, PcieAt::Staged));
        let staged_wts = if p.partial_cpu { p.wts_gpu(g, k, n) } else { masked(cold_mask) };
        let staged = self.hot_experts(il, z, p.remap(g, k, n), staged_wts, &layer.staged);
        let staged = g.name(staged, &format!("cold_pcie_out-{il}"));
        // (base + held) + staged, the in-graph path's order; then the CPU's share
        let mut out = match base {
            Some(b) => g.add(g.add(b, held_out), staged),
            None => g.add(held_out, staged),
        };
        if let Some(c) = cpu_out {
            out = g.add(out, c);
        }
        g.name(out, &format!("routed_out-{il}"))
    }

    /// The router's ids mapped into `map`'s set (CPU op).
    fn local_ids_op(&mut self, il: usize, ids: T, map: &LocalIds, set: &str) -> T {
        let ptr = map as *const LocalIds as *mut c_void;
        // SAFETY: `map` is boxed in the model's ColdHost, which outlives every step graph;
        // `local_ids` reads a LocalIds.
        let op = unsafe { self.g.custom(ggml::TensorType::I32, [ids.ne(0), ids.ne(1), 1], &[ids], local_ids, ptr) };
        self.cpu_nodes.push(op);
        self.g.name(op, &format!("{set}_ids-{il}"))
    }
}

#[cfg(test)]
mod tests {
    use super::{c_atoi, host_copy_layers, LocalIds};

    #[test]
    fn the_offload_size_is_read_as_ggml_reads_it() {
        for (s, v) in [("32", 32), ("  7", 7), ("+12x", 12), ("-3", -3), ("", 0), ("x1", 0), ("99999999999999999999999", i64::MAX)] {
            assert_eq!(c_atoi(s), v, "{s:?}");
        }
    }

    #[test]
    fn the_host_copy_holds_partly_held_layers_only_when_they_offload() {
        // 8 experts, k = 2; layers with 0, 8, 5 and 1 cold experts.
        let n_cold = [0, 8, 5, 1];
        assert_eq!(host_copy_layers(&n_cold, 8, 2, usize::MAX), vec![1], "in the graph only: the all-cold layer");
        assert_eq!(host_copy_layers(&n_cold, 8, 2, 32), vec![1, 2], "offloading: and the partly held one with ≥ k cold");
    }
    use crate::cold::held_slots;

    #[test]
    fn local_ids_number_a_set_in_order_and_fill_outside_slots_with_unused_members() {
        // 8 experts; the set is 0, 2, 3, 7 (local 0..3); k = 4.
        let map = LocalIds::of([0u32, 2, 3, 7].into_iter(), 8);
        assert_eq!(map.local, vec![0, -1, 1, 2, -1, -1, -1, 3]);
        assert_eq!(map.n_local, 4);
        // Slots of 2 and 7 keep their local ids; 1 and 5 get members the token does not use.
        let mut out = [0; 4];
        held_slots(&map.local, map.n_local, &[1, 2, 5, 7], &mut out);
        assert_eq!(out[1], 1);
        assert_eq!(out[3], 3);
        let mut sorted = out.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3], "{out:?}: distinct members of the set");
    }
}
