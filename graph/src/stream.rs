//! Cold experts streamed to the GPU for big micro-batches: every expert of a layer whose
//! experts are all cold, and the cold ones of a partly held layer (the host copy of each,
//! `offload.rs`; the held ones stay where they are).
//!
//! The scheduler's offload (`offload.rs`) copies a layer's routed experts from their pinned
//! host copy when the layer's product starts, on the stream that computes it: the copy and
//! the compute take turns, and at full width the copy is the larger part (3.42 GB per layer
//! at ~55 GB/s, 62 ms, against ~12 ms of a 512-token layer's compute on an H100). A
//! micro-batch of hundreds of tokens routes to nearly every expert anyway (under uniform
//! routing 1 − (1 − k/E)^n of them: 99.8% at 256 tokens of 256 experts, top-6). So for
//! micro-batches of at least `ModelOptions::cold_stream_min` tokens these layers' experts
//! are copied whole, each into one of two GPU slots, on a second backend of the device (its
//! own stream), while the model's stream computes: the copy of streamed layer i + 1 runs
//! while layer i computes (and the attention of the layers between them). Per layer the
//! step then takes about max(copy, compute) instead of their sum.
//!
//! Order, with streamed layers s_0 < s_1 < … and slot(i) = i mod 2:
//! - before the step's compute, the copy of s_0 is queued (the slots are free: the last
//!   step's compute has ended);
//! - when the router of s_i has run (the scheduler's evaluation callback stops there and the
//!   host waits for the device: every earlier product, s_{i−1}'s included, has run, so its
//!   slot is free), the copy of s_{i+1} is queued, and the model's stream is made to wait
//!   for the copy of s_i (an event) before its experts' products.
//!
//! - the first streamed layer's copy for the next step is queued as soon as its slot is free:
//!   at the router of the last streamed layer when their count is even (slot 0's last
//!   reader, s_{n−2}, has run), else when the step's compute has ended; the next streaming
//!   step then finds it queued (or done) and only waits for it. Steps that do not stream
//!   (decode) leave the slots alone, so it is still there whenever the next one comes. A
//!   prompt of several micro-batches thus copies s_0 under the last layers' compute.
//!
//! The products read the same bytes with the same kernels as with the experts resident, so
//! an all-cold layer gives the logits of an all-hot placement, bit for bit; a partly held
//! layer those of its cold part offloaded by the scheduler (the same products over the same
//! host copy's bytes, `offload.rs`).
use std::cell::Cell;

use ggml::{Buffer, BufferType, Context, Copier, Device, Event};

use crate::expert_ffn::{ExpertFfn, UpGate};
use crate::offload::ColdHost;
use crate::ops::T;
use crate::weights::RoutedWeights;
use crate::GraphError;

/// One streamed layer: its position among the streamed layers (slot = pos mod 2), its
/// experts as tensors in that slot, and what to copy there.
pub(crate) struct StreamLayer {
    pub pos: usize,
    pub weights: RoutedWeights,
    /// (slot tensor, host tensor) of each expert tensor of the layer.
    copies: Vec<(T, T)>,
}

/// The streamed layers, their two GPU slots, and the copier.
pub(crate) struct ColdStream {
    pub min_batch: usize,
    layers: Vec<Option<StreamLayer>>,
    /// The streamed layers in order (layer ids).
    order: Vec<usize>,
    /// A second backend of the model's device: its own stream, for the copies.
    /// Waits for its copies when dropped, before the buffers below.
    copier: Copier,
    /// Recorded after the copy into slot 0 / 1.
    copied: [Event; 2],
    /// The first streamed layer's copy for the next streaming step is queued.
    ahead: Cell<bool>,
    _slots: Vec<Buffer>,
    _ctx: Context,
}

/// The expert tensors of a layer's FFN.
pub(crate) fn ffn_tensors(f: &ExpertFfn) -> Vec<T> {
    match f.up_gate {
        UpGate::Separate { gate, up } => vec![gate, up, f.down],
        UpGate::Fused(gu) => vec![gu, f.down],
    }
}

/// At the router of the streamed layer at `pos` (of `n`): the position whose copy to queue
/// next, if any (the first one again, for the next step, at the last of an even count), and
/// the slot (the event) the layer's products wait for.
fn at_router_plan(pos: usize, n: usize) -> (Option<usize>, usize) {
    let next = if pos + 1 < n {
        Some(pos + 1)
    } else if n.is_multiple_of(2) {
        Some(0)
    } else {
        None
    };
    (next, pos % 2)
}

/// Byte offsets of `sizes` placed one after another, each rounded up to `align`; and the end.
pub(crate) fn packed_offsets(sizes: &[usize], align: usize) -> (Vec<usize>, usize) {
    let mut at = 0;
    let offsets = sizes
        .iter()
        .map(|&s| {
            let o = at;
            at += s.div_ceil(align) * align;
            o
        })
        .collect();
    (offsets, at)
}

impl ColdStream {
    /// Set up streaming for the layers of `host` (their host copies), for micro-batches of at
    /// least `min_batch` tokens. None (logged) when no layer qualifies, the device has
    /// no events, or its free memory does not hold the two slots plus `keep_free` bytes.
    pub fn new(device: Device, buft: BufferType, host: &ColdHost, min_batch: usize, keep_free: u64) -> Result<Option<ColdStream>, GraphError> {
        // The layers with a host copy, with that copy's FFN: all of an all-cold layer's
        // experts, a partly held layer's cold ones.
        let streamed: Vec<(usize, &ExpertFfn)> = host.layers.iter().enumerate().filter_map(|(l, c)| c.as_ref().map(|c| (l, &c.weights.ffn))).collect();
        let order: Vec<usize> = streamed.iter().map(|&(l, _)| l).collect();
        if order.is_empty() || min_batch == 0 {
            return Ok(None);
        }
        let (Some(e0), Some(e1)) = (Event::new(device), Event::new(device)) else {
            tracing::warn!(device = %device.name(), "the device has no events: cold experts are not streamed");
            return Ok(None);
        };
        let sources: Vec<Vec<T>> = streamed.iter().map(|&(_, f)| ffn_tensors(f)).collect();
        let n_tensors: usize = sources.iter().map(Vec::len).sum();
        let ctx = Context::new_no_alloc(n_tensors, 0)?;
        // Same type, shape and name as each host tensor.
        let dups: Vec<Vec<T>> = sources
            .iter()
            .map(|ts| {
                ts.iter()
                    .map(|&src| {
                        // SAFETY: a live context with room for n_tensors; `src` a live tensor.
                        unsafe {
                            let d = ggml::sys::ggml_dup_tensor(ctx.as_ptr(), src.0);
                            ggml::sys::ggml_set_name(d, (*src.0).name.as_ptr());
                            T(d)
                        }
                    })
                    .collect()
            })
            .collect();
        let align = buft.alignment();
        // SAFETY: live tensors.
        let layouts: Vec<(Vec<usize>, usize)> = dups.iter().map(|ts| packed_offsets(&ts.iter().map(|t| unsafe { buft.alloc_size(t.0) }).collect::<Vec<_>>(), align)).collect();
        let slot_bytes = layouts.iter().map(|(_, end)| *end).max().unwrap_or(0);
        let n_slots = order.len().min(2);
        let (free, _) = device.memory();
        let need = (slot_bytes * n_slots) as u64 + keep_free;
        if (free as u64) < need {
            tracing::warn!(device = %device.name(), free, need, "too little device memory for the two slots of streamed experts: cold experts are offloaded by the scheduler");
            return Ok(None);
        }
        let slots: Vec<Buffer> = (0..n_slots).map(|_| buft.alloc_buffer(slot_bytes)).collect::<Result<_, _>>()?;
        for s in &slots {
            s.set_weights_usage();
        }
        let mut layers: Vec<Option<StreamLayer>> = (0..host.layers.len()).map(|_| None).collect();
        for (pos, &(l, f)) in streamed.iter().enumerate() {
            let slot = &slots[pos % 2];
            for (&t, &off) in dups[pos].iter().zip(&layouts[pos].0) {
                // SAFETY: an unallocated tensor of ctx; offsets packed within slot_bytes.
                unsafe { slot.place(t.0, off)? };
            }
            let up_gate = match (f.up_gate, dups[pos].as_slice()) {
                (UpGate::Separate { .. }, &[gate, up, _]) => UpGate::Separate { gate, up },
                (UpGate::Fused(_), &[gu, _]) => UpGate::Fused(gu),
                _ => unreachable!("ffn_tensors lists the layer's tensors in this order"),
            };
            let down = *dups[pos].last().unwrap_or_else(|| unreachable!("down is listed last"));
            let ffn = ExpertFfn { up_gate, down, n_ff: f.n_ff, clamp: f.clamp };
            let copies = dups[pos].iter().copied().zip(sources[pos].iter().copied()).collect();
            layers[l] = Some(StreamLayer { pos, weights: RoutedWeights { ffn, held_mask: None }, copies });
        }
        tracing::info!(layers = ?order, min_batch, slot_bytes, "layers stream their cold experts to the GPU for big micro-batches, two layers' worth of slots");
        Ok(Some(ColdStream { min_batch, layers, order, copier: Copier::new(device)?, copied: [e0, e1], ahead: Cell::new(false), _slots: slots, _ctx: ctx }))
    }

    /// The streamed layer `il`, if it is one.
    pub fn layer(&self, il: usize) -> Option<&StreamLayer> {
        self.layers.get(il).and_then(Option::as_ref)
    }

    /// Queue the copy of the streamed layer at `pos` into its slot, then mark it copied.
    fn queue_copy(&self, pos: usize) {
        let Some(layer) = self.order.get(pos).and_then(|&l| self.layer(l)) else { return };
        for &(dst, src) in &layer.copies {
            // SAFETY: dst lives in a slot buffer of this device; src is a whole tensor of the
            // pinned host copy, which the model keeps (and never writes) while it lives; the
            // copy is waited for (the event below) before the slot is read or written again.
            unsafe {
                let bytes = ggml::sys::ggml_nbytes(src.0);
                self.copier.tensor_set_async(dst.0, (*src.0).data.cast::<u8>(), 0, bytes);
            }
        }
        // SAFETY: the copier is a live backend of the event's device.
        unsafe { self.copied[pos % 2].record(self.copier.as_ptr()) };
    }

    /// Before a step that streams: queue the first streamed layer's copy, unless the last
    /// streaming step did.
    pub fn begin_step(&self) {
        if !self.ahead.replace(false) {
            self.queue_copy(0);
        }
    }

    /// After a streaming step's compute (its slots are free): queue the first streamed
    /// layer's copy for the next one, unless the last router did.
    pub fn end_step(&self) {
        if !self.ahead.replace(true) {
            self.queue_copy(0);
        }
    }

    /// The router of the streamed layer at `pos` has run and the device has caught up with
    /// the host (see the module's order): queue the next copy, and make `compute` (the
    /// model's backend) wait for this layer's copy.
    ///
    /// # Safety
    /// `compute` is the model's live backend, on the device of the slots.
    pub unsafe fn at_router(&self, pos: usize, compute: ggml::sys::ggml_backend_t) {
        let (next, wait) = at_router_plan(pos, self.order.len());
        if let Some(next) = next {
            self.queue_copy(next);
            if next == 0 {
                self.ahead.set(true);
            }
        }
        // SAFETY: the caller's contract.
        unsafe { self.copied[wait].wait(compute) };
    }
}

#[cfg(test)]
mod tests {
    use super::{at_router_plan, packed_offsets};

    #[test]
    fn a_copy_goes_to_the_slot_the_layer_before_freed_and_each_layer_waits_for_its_own() {
        for n in 1..7 {
            // position 0's copy for the next step is queued (by a last router or end_step)
            let mut ahead = false;
            for step in 0..3 {
                let mut copies = 0;
                // begin_step
                if !std::mem::replace(&mut ahead, false) {
                    copies += 1;
                }
                let mut queued = vec![false; n];
                queued[0] = true;
                for pos in 0..n {
                    let (next, wait) = at_router_plan(pos, n);
                    assert_eq!(wait, pos % 2, "layer {pos} reads its own slot");
                    assert!(queued[pos], "n {n}: layer {pos}'s copy was queued before its wait");
                    if let Some(next) = next {
                        // that slot's last reader ran before this router (the host waited here)
                        assert_ne!(next % 2, pos % 2, "n {n}: never the slot the current layer reads");
                        copies += 1;
                        if next == 0 {
                            assert!(pos + 1 == n && n.is_multiple_of(2), "n {n}: position 0 again only at the last of an even count");
                            ahead = true;
                        } else {
                            assert_eq!(next, pos + 1);
                            queued[next] = true;
                        }
                    }
                }
                // end_step
                if !std::mem::replace(&mut ahead, true) {
                    copies += 1;
                }
                assert_eq!(copies, n + usize::from(step == 0), "n {n}, step {step}: each layer copied once a step (the first for the next)");
            }
        }
    }

    #[test]
    fn slot_tensors_are_packed_at_aligned_offsets() {
        assert_eq!(packed_offsets(&[100, 256, 1], 128), (vec![0, 128, 384], 512));
        assert_eq!(packed_offsets(&[], 128), (vec![], 0));
    }
}
