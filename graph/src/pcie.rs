//! Small micro-batches (decode) of cold experts over PCIe (`ModelOptions::cold_pcie_slots`).
//! In a layer whose experts are all cold, a decoded token's experts are read from host memory
//! by the CPU; the GPU could read them over PCIe instead, and the two paths have their own
//! bandwidth. So each token's first `slots` router slots are computed on the
//! GPU from copies of their experts, made over PCIe into a small staging area of the device,
//! while the CPU computes the other slots from the host copy (`offload.rs`) as before; the two
//! weighted sums and the shared expert are added on the GPU.
//!
//! Order within a split layer (the scheduler's evaluation callback stops at two nodes):
//! - at the layer's router weights (the device has caught up: its ids and weights are read),
//!   the host plans the split: the CPU slots' ids and weights go into host tensors the CPU's
//!   products read; the GPU slots' staging indices and weights, then the distinct experts
//!   they name, are queued on a copier backend of the device (its own stream) and an event
//!   is recorded after them;
//! - the CPU then computes its slots while the copies run;
//! - at the CPU slots' weighted sum the model's stream is made to wait for that event, before
//!   the staged products.
//!
//! The staged products read the same bytes with the same kernels as experts resident on the
//! GPU; the CPU's the same as the in-graph CPU path's. Only the order of the sum changes: the
//! CPU slots' sum and the GPU slots' sum are added, where one sum takes every slot.
//!
//! A partly held layer (with a host copy of its cold experts) stages a token's cold slots: all
//! of them, or with `ModelOptions::cold_pcie_partial_cpu` (unless `slots` is k, dflash's
//! kernel is off or the experts are not MXFP4) the first ⌈c · slots / k⌉ of its c, the CPU
//! computing the others from the host copy while the copies run (`partial_plan`). The
//! callback plans at its router ids, or with a CPU share at its router weights (each staged
//! slot a staging index, every other slot one its token leaves free, at weight 0), the held
//! experts are computed over their local ids while the copies run, and the model's stream
//! waits after their sum (with a CPU share, after the CPU's). With every cold slot staged its logits are those of its cold part computed in the
//! graph from the host copy (`offload.rs`), bit for bit; with a CPU share the two parts' sums
//! are added, as in an all-cold layer.
//!
//! On a CPU (`ModelOptions::cold_host_on_cpu`, for the tests) the staging area is CPU
//! memory, the copies are done when queued and there is no event to wait for.
use ggml::{Buffer, BufferType, Context, Copier, Device, Event};

use crate::expert_ffn::{ExpertFfn, UpGate};
use crate::offload::ColdHost;
use crate::ops::T;
use crate::steps::place_packed;
use crate::stream::ffn_tensors;
use crate::weights::RoutedWeights;
use crate::GraphError;

/// Where the evaluation callback stops in a split layer (`forward::StepHooks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum PcieAt {
    /// Plan and queue the split (`ids`: the router ids node): at an all-cold layer's router
    /// weights (the node; it reads both), at a partly held layer's router ids (the node: its
    /// plan needs only them, and its held products then run under the copies). `wait`: also
    /// make the model's stream wait for the copies (no CPU slots).
    Plan { layer: usize, ids: usize, wait: bool },
    /// The CPU slots' weighted sum: make the model's stream wait for the copies.
    Staged,
}

/// One split layer: its host expert tensors (what is copied), and its experts over the
/// staging tensors (what the GPU computes).
pub(crate) struct PcieLayer {
    host: Vec<T>,
    pub staged: RoutedWeights,
    /// A partly held layer's map from global expert id to index in its host copy (−1: held):
    /// all of a token's cold slots are staged. None: an all-cold layer, whose first `slots`
    /// slots are.
    pub cold_local: Option<Vec<i32>>,
}

/// The staging area, the split's input tensors, the copier.
pub(crate) struct PcieSplit {
    /// Router slots per token computed on the GPU (the first ones).
    pub slots: usize,
    /// Micro-batches of at most this many tokens are split.
    pub max_tokens: usize,
    /// The router's k.
    k: usize,
    /// The CPU slots' MXFP4 products through `mxfp4_cpu.rs` (else ggml's `mul_mat_id`).
    pub own_kernel: bool,
    /// Partly held layers give the CPU a share of their cold slots (`partial_plan`): when
    /// asked (`ModelOptions::cold_pcie_partial_cpu`), with dflash's kernel (whose empty slots
    /// pad the CPU's ids), over MXFP4 experts, and `slots` < k.
    pub partial_cpu: bool,
    layers: Vec<Option<PcieLayer>>,
    /// Per expert tensor of an FFN: room for `slots × max_tokens` experts on the device
    /// (`k × max_tokens` with partly held layers).
    staging: Vec<T>,
    /// Flat, on the device: the GPU slots' staging indices (I32, [slots or k, n]) and
    /// weights (F32, [slots, n]) of a step.
    remap: T,
    wts_gpu: T,
    /// Flat, on the host: the CPU slots' expert ids (I32) and weights (F32), [k − slots, n].
    ids_cpu: T,
    wts_cpu: T,
    /// Waits for its copies when dropped, before the buffers below.
    copier: Copier,
    /// Recorded after the copies (None on the CPU, whose copies are done when queued).
    copied: Option<Event>,
    /// Experts staged since load (each distinct expert of a split layer's step once).
    pub staged_total: std::cell::Cell<u64>,
    /// Cold slots of partly held layers the CPU computed since load ([`partial_plan`]).
    pub partial_cpu_total: std::cell::Cell<u64>,
    /// A plan's copies not yet waited for: every plan is followed by its wait before the
    /// next one (checked in debug builds, where a missed wait would only show on a GPU).
    unwaited: std::cell::Cell<bool>,
    _device_buf: Buffer,
    _host_buf: Buffer,
    _ctx: Context,
}

/// A split step's plan for `n` tokens of router ids and weights `[k, n]`: the CPU slots'
/// ids and weights (`[k − slots, n]`), the GPU slots' staging indices and weights
/// (`[slots, n]`), and the experts to stage, each once, in staging order.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct SplitPlan {
    pub ids_cpu: Vec<i32>,
    pub wts_cpu: Vec<f32>,
    pub remap: Vec<i32>,
    pub wts_gpu: Vec<f32>,
    pub staged: Vec<i32>,
}

pub(crate) fn split_plan(ids: &[i32], wts: &[f32], k: usize, slots: usize) -> SplitPlan {
    let mut p = SplitPlan::default();
    for (tid, tw) in ids.chunks_exact(k).zip(wts.chunks_exact(k)) {
        for (&e, &w) in tid[..slots].iter().zip(&tw[..slots]) {
            let s = match p.staged.iter().position(|&x| x == e) {
                Some(s) => s,
                None => {
                    p.staged.push(e);
                    p.staged.len() - 1
                }
            };
            p.remap.push(s as i32);
            p.wts_gpu.push(w);
        }
        p.ids_cpu.extend_from_slice(&tid[slots..]);
        p.wts_cpu.extend_from_slice(&tw[slots..]);
    }
    p
}

/// A partly held layer's plan for router ids `[k, n]`: a token's cold slots (`cold_local[e]`
/// ≥ 0, the expert's index in the host copy), in router order, get staging indices (each
/// expert staged once, in staging order: `staged`): all of them, or, with the router weights
/// `wts` (the CPU computes a share), the first ⌈c · slots / k⌉ of its c, the others going to
/// the CPU (`ids_cpu`, `wts_cpu`: `[k − slots, n]`, padded with empty slots at weight 0). A
/// slot not staged gets an index its token does not use, the lowest free one (its weight is
/// 0: `wts_gpu`, `[k, n]`, or without `wts` the staged product's weights masked to the cold
/// slots), so that each token's indices are distinct, as GPU expert kernels require. `remap`
/// is `[k, n]`.
pub(crate) fn partial_plan(ids: &[i32], wts: Option<&[f32]>, k: usize, slots: usize, cold_local: &[i32]) -> SplitPlan {
    let mut p = SplitPlan::default();
    let (staged, remap) = (&mut p.staged, &mut p.remap);
    for (t, tid) in ids.chunks_exact(k).enumerate() {
        let row = remap.len();
        let cold = tid.iter().filter(|&&e| cold_local.get(e as usize).is_some_and(|&h| h >= 0)).count();
        let to_stage = if wts.is_some() { (cold * slots).div_ceil(k) } else { cold };
        let mut seen = 0;
        for (j, &e) in tid.iter().enumerate() {
            let w = wts.map_or(0.0, |w| w[t * k + j]);
            let Some(&h) = cold_local.get(e as usize).filter(|&&h| h >= 0) else {
                remap.push(-1);
                p.wts_gpu.push(0.0);
                continue;
            };
            seen += 1;
            if seen > to_stage {
                remap.push(-1);
                p.wts_gpu.push(0.0);
                p.ids_cpu.push(h);
                p.wts_cpu.push(w);
                continue;
            }
            let s = staged.iter().position(|&x| x == h).unwrap_or_else(|| {
                staged.push(h);
                staged.len() - 1
            });
            remap.push(s as i32);
            p.wts_gpu.push(w);
        }
        if wts.is_some() {
            let cpu = (t + 1) * (k - slots);
            p.wts_cpu.resize(cpu, 0.0);
            p.ids_cpu.resize(cpu, crate::mxfp4_cpu::EMPTY_SLOT);
        }
        let mut free = 0;
        for j in row..row + k {
            if remap[j] < 0 {
                while remap[row..row + k].contains(&free) {
                    free += 1;
                }
                remap[j] = free;
            }
        }
    }
    if wts.is_none() {
        p.wts_gpu.clear();
    }
    p
}

/// Host bytes of a slice, for a copy.
fn bytes<E>(v: &[E]) -> &[u8] {
    // SAFETY: i32 / f32 slices: no padding, any alignment suits bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

impl PcieSplit {
    /// The split for the all-cold layers of `host` (their FFN tensors of one shape), `slots`
    /// of the router's `k` on the GPU for micro-batches of at most `max_tokens`. None (logged)
    /// when no layer qualifies or the device has no events.
    #[allow(clippy::too_many_arguments)]
    pub fn new(device: Device, buft: BufferType, host: &ColdHost, slots: usize, max_tokens: usize, k: usize, own_kernel: bool, partial_cpu: bool) -> Result<Option<PcieSplit>, GraphError> {
        // (both checked against the model when it loads)
        if slots == 0 || max_tokens == 0 || slots > k {
            return Ok(None);
        }
        // Every layer with a host copy: all-cold ones, and partly held ones (their cold part).
        let with_copy: Vec<(usize, &ExpertFfn, Option<Vec<i32>>)> = host
            .layers
            .iter()
            .enumerate()
            .filter_map(|(l, c)| c.as_ref().map(|c| (l, &c.weights.ffn, c.maps.as_ref().map(|(cold, _)| cold.local.clone()))))
            .collect();
        let Some(&(_, first, _)) = with_copy.first() else {
            tracing::warn!("--cold-pcie-slots: no layer's cold experts have a host copy; nothing is split");
            return Ok(None);
        };
        let partial = with_copy.iter().any(|(_, _, m)| m.is_some());
        let partial_cpu = partial_cpu && own_kernel && partial && slots < k && with_copy.iter().filter(|(_, _, m)| m.is_some()).all(|(_, f, _)| ffn_tensors(f).into_iter().all(crate::mxfp4_cpu::takes_weight));
        // The CPU has no events: its copies are done when queued.
        let copied = match Event::new(device) {
            Some(e) => Some(e),
            None if device.kind() == ggml::DeviceKind::Cpu => None,
            None => {
                tracing::warn!(device = %device.name(), "the device has no events: decode's cold experts are not split over PCIe");
                return Ok(None);
            }
        };
        // A layer is split when its tensors have the first one's type and shape (the staging
        // holds that shape).
        let shape = |t: T| unsafe { ((*t.0).type_, (*t.0).ne[0], (*t.0).ne[1]) };
        let first_tensors = ffn_tensors(first);
        let per_token = if partial { k } else { slots };
        let n_staged = (per_token * max_tokens) as i64;
        let ctx = Context::new_no_alloc(first_tensors.len() + 4, 0)?;
        let g = crate::ops::Ctx { raw: ctx.as_ptr() };
        let staging: Vec<T> = first_tensors
            .iter()
            .map(|&t| {
                // SAFETY: a live context with room; `t` a live tensor.
                T(unsafe { ggml::sys::ggml_new_tensor_3d(ctx.as_ptr(), (*t.0).type_, (*t.0).ne[0], (*t.0).ne[1], n_staged) })
            })
            .collect();
        let remap = g.new_i32(&[n_staged]);
        let wts_gpu = g.new_f32(&[n_staged]);
        let cpu_slots = ((k - slots) * max_tokens).max(1) as i64;
        let ids_cpu = g.new_i32(&[cpu_slots]);
        let wts_cpu = g.new_f32(&[cpu_slots]);
        let (device_buf, _) = place_packed(buft, &[staging.as_slice(), &[remap, wts_gpu]].concat(), None)?;
        // so that the scheduler runs the staged products where the staging is
        device_buf.set_weights_usage();
        // Padding slots (weight 0) may name staging entries no step has filled yet: zeros,
        // not whatever bytes were there (a NaN times 0 is a NaN).
        device_buf.clear(0);
        let (host_buf, _) = place_packed(Device::cpu()?.buffer_type(), &[ids_cpu, wts_cpu], None)?;
        let mut layers: Vec<Option<PcieLayer>> = (0..host.layers.len()).map(|_| None).collect();
        for (l, f, cold_local) in with_copy.iter().map(|(l, f, m)| (*l, *f, m.clone())) {
            let host_tensors = ffn_tensors(f);
            if host_tensors.len() != staging.len() || host_tensors.iter().zip(&first_tensors).any(|(&a, &b)| shape(a) != shape(b)) {
                tracing::warn!(layer = l, "--cold-pcie-slots: this layer's experts have another shape than the first split layer's; not split");
                continue;
            }
            let up_gate = match (f.up_gate, staging.as_slice()) {
                (UpGate::Separate { .. }, &[gate, up, _]) => UpGate::Separate { gate, up },
                (UpGate::Fused(_), &[gu, _]) => UpGate::Fused(gu),
                _ => unreachable!("ffn_tensors lists an FFN's tensors in this order, and the shapes matched"),
            };
            let down = *staging.last().unwrap_or_else(|| unreachable!("down is listed last"));
            let ffn = ExpertFfn { up_gate, down, n_ff: f.n_ff, clamp: f.clamp };
            layers[l] = Some(PcieLayer { host: host_tensors, staged: RoutedWeights { ffn, held_mask: None }, cold_local });
        }
        tracing::info!(layers = with_copy.len(), slots, max_tokens, staging_bytes = device_buf.size(), "micro-batches of few tokens compute cold router slots on the GPU from copies over PCIe (all-cold layers: the first slots; partly held ones: every cold slot)");
        Ok(Some(PcieSplit {
            slots,
            max_tokens,
            k,
            own_kernel,
            partial_cpu,
            layers,
            staging,
            remap,
            wts_gpu,
            ids_cpu,
            wts_cpu,
            copier: Copier::new(device)?,
            copied,
            staged_total: std::cell::Cell::new(0),
            partial_cpu_total: std::cell::Cell::new(0),
            unwaited: std::cell::Cell::new(false),
            _device_buf: device_buf,
            _host_buf: host_buf,
            _ctx: ctx,
        }))
    }

    /// The step's `[rows, n]` part of one of the split's flat tensors.
    fn part(g: &crate::ops::Ctx, t: T, rows: i64, n: i64) -> T {
        g.reshape(g.view_1d(t, rows * n, 0), &[rows, n])
    }
    /// The GPU slots' staging indices, `[rows, n]` (rows: `slots`, or k in a partly held layer).
    pub fn remap(&self, g: &crate::ops::Ctx, rows: i64, n: i64) -> T {
        PcieSplit::part(g, self.remap, rows, n)
    }
    /// The GPU slots' weights, `[slots, n]` (`[k, n]` in a partly held layer whose plan
    /// gives the CPU a share: [`partial_plan`]).
    pub fn wts_gpu(&self, g: &crate::ops::Ctx, rows: i64, n: i64) -> T {
        PcieSplit::part(g, self.wts_gpu, rows, n)
    }
    /// The CPU slots' ids and weights, `[k − slots, n]`.
    pub fn cpu_slots(&self, g: &crate::ops::Ctx, n: i64) -> (T, T) {
        let rows = (self.k - self.slots) as i64;
        (PcieSplit::part(g, self.ids_cpu, rows, n), PcieSplit::part(g, self.wts_cpu, rows, n))
    }

    /// The split layer `il`, if it is one.
    pub fn layer(&self, il: usize) -> Option<&PcieLayer> {
        self.layers.get(il).and_then(Option::as_ref)
    }

    /// At layer `il`'s hook ([`PcieAt::Plan`]; the device has caught up): plan the split
    /// from the router's `ids` (and, in an all-cold layer, `wts`) [k, n], write the CPU
    /// slots' inputs, queue the GPU slots' inputs and experts on the copier, and record the
    /// event after them.
    ///
    /// # Safety
    /// `ids` (and in an all-cold layer `wts`) are the layer's computed router tensors (I32,
    /// F32 [k, n], contiguous, n ≤ max_tokens), no copy of an earlier layer is still reading
    /// the staging area (the model's stream waited for it before that layer's products, and
    /// has caught up), and the CPU inputs are not being read.
    pub unsafe fn at_plan(&self, il: usize, ids: *const ggml::sys::ggml_tensor, wts: *const ggml::sys::ggml_tensor) {
        let Some(layer) = self.layer(il) else { return };
        // SAFETY: the caller's contract.
        let (k, n) = unsafe { ((*ids).ne[0] as usize, (*ids).ne[1] as usize) };
        debug_assert!(k == self.k && n <= self.max_tokens);
        let mut id = vec![0i32; k * n];
        let mut w = vec![0f32; k * n];
        // SAFETY: the caller's contract: allocated tensors of these sizes.
        unsafe {
            ggml::backend::tensor_get(ids, std::slice::from_raw_parts_mut(id.as_mut_ptr().cast::<u8>(), 4 * k * n), 0);
            if layer.cold_local.is_none() || self.partial_cpu {
                ggml::backend::tensor_get(wts, std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<u8>(), 4 * k * n), 0);
            }
        }
        let p = match &layer.cold_local {
            None => split_plan(&id, &w, k, self.slots),
            Some(cold_local) => partial_plan(&id, self.partial_cpu.then_some(w.as_slice()), k, self.slots, cold_local),
        };
        self.staged_total.set(self.staged_total.get() + p.staged.len() as u64);
        if layer.cold_local.is_some() {
            let cpu = p.ids_cpu.iter().filter(|&&e| e != crate::mxfp4_cpu::EMPTY_SLOT).count();
            self.partial_cpu_total.set(self.partial_cpu_total.get() + cpu as u64);
        }
        let missed = self.unwaited.replace(true);
        debug_assert!(!missed, "layer {il}: the last split layer's copies were never waited for");
        // SAFETY: host tensors of this split with room for [k − slots, max_tokens] (the
        // caller's contract keeps them unread now); the device ones are written on the
        // copier's stream, small pageable copies first (they wait for the stream, idle here),
        // then the experts from the pinned host copy, which the model keeps while it lives.
        unsafe {
            ggml::backend::tensor_set(self.ids_cpu.0, bytes(&p.ids_cpu), 0);
            ggml::backend::tensor_set(self.wts_cpu.0, bytes(&p.wts_cpu), 0);
            self.copier.tensor_set_async(self.remap.0, bytes(&p.remap).as_ptr(), 0, 4 * p.remap.len());
            self.copier.tensor_set_async(self.wts_gpu.0, bytes(&p.wts_gpu).as_ptr(), 0, 4 * p.wts_gpu.len());
            // (e: the expert's index in the host copy: its id in an all-cold layer)
            for (s, &e) in p.staged.iter().enumerate() {
                for (&dst, &src) in self.staging.iter().zip(&layer.host) {
                    let per = (*src.0).nb[2];
                    self.copier.tensor_set_async(dst.0, (*src.0).data.cast::<u8>().add(e as usize * per), s * per, per);
                }
            }
            if let Some(e) = &self.copied {
                e.record(self.copier.as_ptr());
            }
        }
    }

    /// After the CPU slots' weighted sum: make `compute` (the model's backend) wait for the
    /// copies before the staged products.
    ///
    /// # Safety
    /// `compute` is the model's live backend, on the staging's device.
    pub unsafe fn before_staged(&self, compute: ggml::sys::ggml_backend_t) {
        self.unwaited.set(false);
        // SAFETY: the caller's contract.
        if let Some(e) = &self.copied {
            unsafe { e.wait(compute) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{partial_plan, split_plan, SplitPlan};
    use crate::mxfp4_cpu::EMPTY_SLOT;

    #[test]
    fn a_partly_held_layer_gives_the_cpu_its_tokens_last_cold_slots() {
        // 8 experts; held: 0, 1, 2, 3; cold 4..7 at host indices 0..3; k = 4, 2 slots staged
        // of 4: a token with c cold slots stages ⌈c / 2⌉, the CPU takes the rest.
        let cold_local = [-1, -1, -1, -1, 0, 1, 2, 3];
        let ids = [4, 0, 6, 7, 1, 5, 2, 3, 4, 5, 6, 7];
        let wts: Vec<f32> = (0..12).map(|i| 0.1 * (i + 1) as f32).collect();
        let p = partial_plan(&ids, Some(&wts), 4, 2, &cold_local);
        // token 0: cold 4, 6, 7 → stage 4, 6; CPU 7. token 1: cold 5 → staged. token 2: all
        // cold → stage 4, 5; CPU 6, 7.
        assert_eq!(p.staged, vec![0, 2, 1], "host indices of experts 4, 6, 5");
        assert_eq!(p.ids_cpu, vec![3, EMPTY_SLOT, EMPTY_SLOT, EMPTY_SLOT, 2, 3]);
        let (a, b) = (wts[3], wts[10]);
        assert_eq!(p.wts_cpu, vec![a, 0.0, 0.0, 0.0, b, wts[11]]);
        // the GPU's weights: the staged slots' own, 0 elsewhere
        let want_gpu: Vec<f32> = (0..12).map(|i| if [0, 2, 5, 8, 9].contains(&i) { wts[i] } else { 0.0 }).collect();
        assert_eq!(p.wts_gpu, want_gpu);
        for t in 0..3 {
            let mut r = p.remap[t * 4..t * 4 + 4].to_vec();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), 4, "token {t}: distinct indices");
            for j in 0..4 {
                if p.wts_gpu[t * 4 + j] != 0.0 {
                    assert_eq!(p.staged[p.remap[t * 4 + j] as usize], cold_local[ids[t * 4 + j] as usize], "token {t} slot {j}");
                }
            }
        }
        // every cold slot once: staged (weight on the GPU) or on the CPU
        let cold_slots = ids.iter().filter(|&&e| e >= 4).count();
        let on_gpu = p.wts_gpu.iter().filter(|&&w| w != 0.0).count();
        let on_cpu = p.ids_cpu.iter().filter(|&&e| e != EMPTY_SLOT).count();
        assert_eq!(on_gpu + on_cpu, cold_slots);
    }

    #[test]
    fn a_partly_held_layer_stages_every_cold_slot_once_and_pads_held_ones_distinctly() {
        // 8 experts; held: 0, 1, 2, 3; cold 4..7 at host indices 0..3; k = 3, three tokens.
        let cold_local = [-1, -1, -1, -1, 0, 1, 2, 3];
        let ids = [4, 0, 6, 1, 2, 3, 6, 7, 5];
        let SplitPlan { staged, remap, ids_cpu, wts_gpu, .. } = partial_plan(&ids, None, 3, 2, &cold_local);
        assert!(ids_cpu.is_empty() && wts_gpu.is_empty(), "no CPU share without the weights");
        assert_eq!(staged, vec![0, 2, 3, 1], "host indices of experts 4, 6, 7, 5, each once");
        // token 0: 4 → 0, 6 → 1, held 0 → the lowest index the token leaves free, 2
        assert_eq!(&remap[..3], &[0, 2, 1]);
        // token 1: all held: 0, 1, 2
        assert_eq!(&remap[3..6], &[0, 1, 2]);
        // token 2: 6 → 1, 7 → 2, 5 → 3
        assert_eq!(&remap[6..], &[1, 2, 3]);
        for t in 0..3 {
            let mut r = remap[t * 3..t * 3 + 3].to_vec();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), 3, "token {t}: distinct indices");
            for j in 0..3 {
                let e = ids[t * 3 + j] as usize;
                if cold_local[e] >= 0 {
                    assert_eq!(staged[remap[t * 3 + j] as usize], cold_local[e], "token {t} slot {j}");
                }
            }
        }
    }

    #[test]
    fn the_plan_stages_each_expert_once_and_keeps_every_slot() {
        // k = 3, 2 slots on the GPU; three tokens, two sharing expert 7.
        let ids = [7, 1, 2, 3, 7, 4, 5, 6, 9];
        let wts = [0.5, 0.3, 0.2, 0.6, 0.25, 0.15, 0.4, 0.35, 0.25];
        let p = split_plan(&ids, &wts, 3, 2);
        assert_eq!(p.staged, vec![7, 1, 3, 5, 6]);
        assert_eq!(p.remap, vec![0, 1, 2, 0, 3, 4]);
        assert_eq!(p.wts_gpu, vec![0.5, 0.3, 0.6, 0.25, 0.4, 0.35]);
        assert_eq!(p.ids_cpu, vec![2, 4, 9]);
        assert_eq!(p.wts_cpu, vec![0.2, 0.15, 0.25]);
        // every slot is in one part, with its own weight (checked below)
        for t in 0..3 {
            for j in 0..2 {
                assert_eq!(p.staged[p.remap[t * 2 + j] as usize], ids[t * 3 + j]);
            }
        }
    }
}
