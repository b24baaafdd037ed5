//! Expert placement that learns while serving (`--experts-hot adaptive`). A partly held
//! layer keeps a fixed number of expert slots on the model's backend; which expert sits in
//! which slot changes between steps, never inside a graph:
//!
//! * the routing is counted live (the `route_count` custom op) and folded into per-expert
//!   scores that decay at every [`Model::replace_experts`] call
//!   (`score ← decay · score + routed since the last call`);
//! * per layer, while the best-scored cold expert beats the worst-scored held one by the
//!   policy's margin (hysteresis: `cold > held · (1 + margin) + min_gap`), its weights are
//!   copied from the model file into that held expert's slot (one tensor write per expert
//!   tensor, at the slot's offset), and the slot map (global id → slot, read by `cold_begin`),
//!   the held mask and the hot set follow; at most `budget_bytes` are copied per call;
//! * the cold executor computes whatever is cold at the time, so it must be able to compute
//!   every expert of a partly held layer (the daemon gives it all of them under `adaptive`).
//!
//! A swapped expert computes exactly what it computed before in its new place (same bytes,
//! same kernels), so on the CPU the logits after a re-placement equal those of a model loaded
//! with the new hot set (tested bitwise).
use std::os::unix::fs::FileExt;

use loader::{ExpertPart, LoadError};

use crate::expert_ffn::UpGate;
use crate::model::Model;
use crate::ops::T;
use crate::GraphError;

/// When a cold expert takes a held expert's slot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SwapPolicy {
    /// Scores are multiplied by this at every `replace_experts` call before the new counts are
    /// added (0.98: counts of ~50 calls ago weigh 1/e).
    pub decay: f64,
    /// Hysteresis: a cold expert replaces a held one when `cold > held · (1 + margin) + min_gap`.
    pub margin: f64,
    pub min_gap: f64,
}

impl Default for SwapPolicy {
    fn default() -> Self {
        SwapPolicy { decay: 0.98, margin: 0.25, min_gap: 2.0 }
    }
}

/// Swaps done and expert bytes copied (by one `replace_experts` call, or since load).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapReport {
    pub swaps: u64,
    pub bytes: u64,
}

/// The live scores of an adaptive model.
pub(crate) struct Adaptive {
    pub policy: SwapPolicy,
    /// Decayed routed counts per layer and expert.
    scores: Vec<Vec<f64>>,
    /// The raw counts at the last call (the counter only grows).
    seen: Vec<Vec<u64>>,
    /// The layer the next call starts at, so that a small budget serves every layer in turn.
    next_layer: usize,
}

impl Adaptive {
    pub fn new(policy: SwapPolicy, n_layer: usize, n_expert: usize) -> Adaptive {
        Adaptive { policy, scores: vec![vec![0.0; n_expert]; n_layer], seen: vec![vec![0; n_expert]; n_layer], next_layer: 0 }
    }

    /// Decay the scores and add what was routed since the last call.
    fn observe(&mut self, counts: &[Vec<u64>]) {
        for ((scores, seen), counts) in self.scores.iter_mut().zip(&mut self.seen).zip(counts) {
            for ((s, seen), &now) in scores.iter_mut().zip(seen.iter_mut()).zip(counts) {
                let routed = now.saturating_sub(*seen) as f64;
                *s = self.policy.decay * *s + routed;
                *seen = now;
            }
        }
    }

    /// The held expert to give up and the cold one to take, when the best cold one beats the
    /// worst held one by the margin (ties: the lower id is kept / taken).
    fn best_swap(&self, layer: usize, held: &[u32], n_expert: u32) -> Option<(u32, u32)> {
        let s = &self.scores[layer];
        let worst = held.iter().copied().min_by(|&a, &b| s[a as usize].total_cmp(&s[b as usize]).then(b.cmp(&a)))?;
        let best = (0..n_expert).filter(|e| held.binary_search(e).is_err()).max_by(|&a, &b| s[a as usize].total_cmp(&s[b as usize]).then(b.cmp(&a)))?;
        let p = &self.policy;
        (s[best as usize] > s[worst as usize] * (1.0 + p.margin) + p.min_gap).then_some((worst, best))
    }
}

impl Model {
    /// Whether the hot set follows the live routing (`ModelOptions::adaptive`).
    pub fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    /// Swaps done and bytes copied since load.
    pub fn swap_totals(&self) -> SwapReport {
        self.swaps
    }

    /// The expert tensors of layer `layer` as held (slice `i` = slot `i`), with their part.
    fn held_parts(&self, layer: usize) -> Option<(Vec<(ExpertPart, T)>, T)> {
        let r = self.weights.layers.get(layer)?.experts.as_ref()?;
        let mask = r.held_mask?;
        let mut parts = match r.ffn.up_gate {
            UpGate::Separate { gate, up } => vec![(ExpertPart::Gate, gate), (ExpertPart::Up, up)],
            UpGate::Fused(gu) => vec![(ExpertPart::GateUp, gu)],
        };
        parts.push((ExpertPart::Down, r.ffn.down));
        Some((parts, mask))
    }

    /// Bytes of one routed expert of `layer` (all its tensors' slices): what a swap copies.
    pub fn expert_bytes(&self, layer: usize) -> Result<u64, GraphError> {
        let fused = self.file.tensors.get(&ExpertPart::GateUp.name(layer)).is_some();
        let parts = if fused { vec![ExpertPart::GateUp, ExpertPart::Down] } else { vec![ExpertPart::Gate, ExpertPart::Up, ExpertPart::Down] };
        let mut bytes = 0;
        for p in parts {
            let info = self.file.tensors.expect(&p.name(layer))?;
            bytes += info.slice_bytes(info.shape().len() - 1);
        }
        Ok(bytes)
    }

    /// Put cold expert `incoming` of `layer` into the slot of held expert `out` (which becomes
    /// cold): its weights are read from the model file into that slot, then the slot map, the
    /// held mask and the hot set change. Between steps only (`&mut self`). Returns the bytes
    /// copied. The cold executor must compute every expert of the layer.
    pub fn swap_expert(&mut self, layer: usize, out: u32, incoming: u32) -> Result<u64, GraphError> {
        let (n_layer, n_expert) = (self.config.n_layer, self.config.n_expert as u32);
        let bad = |why: String| Err(GraphError::Option(format!("expert swap in layer {layer} ({out} out, {incoming} in): {why}")));
        if layer >= n_layer || out >= n_expert || incoming >= n_expert {
            return bad(format!("outside the model's {n_layer} layers of {n_expert} experts"));
        }
        if self.cold_host.is_some() {
            return bad("the pinned host copy of the cold experts (--cold-offload-min, --cold-layers-in-graph) is fixed at load".into());
        }
        let Some((parts, mask)) = self.held_parts(layer) else { return bad("the layer is not partly held".into()) };
        if !self.hot.contains(layer as u32, out) || self.hot.contains(layer as u32, incoming) {
            return bad("the first must be held and the second cold".into());
        }
        let Some(cold) = self.cold.as_ref() else { return bad("no cold executor".into()) };
        let mut st = cold.lock().map_err(|_| GraphError::ColdStatePoisoned)?;
        let slot = st.local[layer][out as usize];
        if slot < 0 {
            return bad("the held expert has no slot".into());
        }
        let path = self.file.path.display().to_string();
        let io = |source| GraphError::Load(LoadError::Io { path: path.clone(), source });
        let file = std::fs::File::open(&self.file.path).map_err(io)?;
        // Every tensor's slice is read before any is written: a failed read leaves the slot
        // as it was.
        let mut reads = Vec::with_capacity(parts.len());
        for (part, t) in parts {
            let info = self.file.tensors.expect(&part.name(layer))?;
            let slice = info.slice_bytes(info.shape().len() - 1);
            if t.nb(2) as u64 != slice {
                return bad(format!("{} holds {}-byte experts, the file {slice}", info.name, t.nb(2)));
            }
            let mut buf = vec![0u8; slice as usize];
            file.read_exact_at(&mut buf, info.offset + u64::from(incoming) * slice).map_err(io)?;
            reads.push((t, buf));
        }
        let mut bytes = 0u64;
        for (t, buf) in reads {
            // SAFETY: `t` is a live weight tensor of this model holding `ne[2]` slots of
            // `buf.len()` bytes (checked above), and `slot` < ne[2] (a slot of the held map);
            // no graph runs now (`&mut self`).
            unsafe { ggml::backend::tensor_set(t.0, &buf, slot as usize * buf.len()) };
            bytes += buf.len() as u64;
        }
        let local = &mut st.local[layer];
        local[incoming as usize] = slot;
        local[out as usize] = -1;
        let held: Vec<f32> = local.iter().map(|&i| if i >= 0 { 1.0 } else { 0.0 }).collect();
        mask.write_f32(&held);
        drop(st);
        self.hot.remove(layer as u32, out);
        self.hot.insert(layer as u32, incoming).map_err(|e| GraphError::Option(e.to_string()))?;
        self.swaps.swaps += 1;
        self.swaps.bytes += bytes;
        tracing::debug!(layer, out, incoming, slot, bytes, "expert swapped in");
        Ok(bytes)
    }

    /// Fold the routing since the last call into the scores and swap experts where the hot
    /// set drifted (see the module docs), copying at most `budget_bytes`. A no-op (empty
    /// report) on a model that is not adaptive.
    pub fn replace_experts(&mut self, budget_bytes: u64) -> Result<SwapReport, GraphError> {
        let mut report = SwapReport::default();
        let (Some(counts), true) = (self.route_counts(), self.adaptive.is_some()) else { return Ok(report) };
        let n_layer = self.config.n_layer;
        let n_expert = self.config.n_expert as u32;
        let start = match self.adaptive.as_mut() {
            Some(a) => {
                a.observe(&counts);
                let start = a.next_layer;
                a.next_layer = (start + 1) % n_layer.max(1);
                start
            }
            None => return Ok(report),
        };
        let mut left = budget_bytes;
        for l in (0..n_layer).map(|i| (start + i) % n_layer) {
            if self.held_parts(l).is_none() {
                continue;
            }
            let bytes = self.expert_bytes(l)?;
            loop {
                let pick = self.adaptive.as_ref().and_then(|a| a.best_swap(l, self.hot.layer(l as u32), n_expert));
                let Some((out, incoming)) = pick else { break };
                if bytes > left {
                    return Ok(report);
                }
                left -= self.swap_expert(l, out, incoming)?;
                report.swaps += 1;
                report.bytes += bytes;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_decay_and_swaps_need_the_margin() {
        let policy = SwapPolicy { decay: 0.5, margin: 0.25, min_gap: 1.0 };
        let mut a = Adaptive::new(policy, 1, 4);
        a.observe(&[vec![8, 0, 0, 0]]);
        assert_eq!(a.scores[0], vec![8.0, 0.0, 0.0, 0.0]);
        a.observe(&[vec![8, 4, 0, 2]]);
        assert_eq!(a.scores[0], vec![4.0, 4.0, 0.0, 2.0]);
        // Held {0, 1}: the best cold (3: 2.0) does not beat the worst held (1: 4.0).
        assert_eq!(a.best_swap(0, &[0, 1], 4), None);
        // Held {0, 2}: 1 (4.0) beats 2 (0.0) by more than 0 · 1.25 + 1.
        assert_eq!(a.best_swap(0, &[0, 2], 4), Some((2, 1)));
        // Held {2, 3}: worst held 2 (0.0), best cold: 0 and 1 tie at 4.0, the lower id is taken.
        assert_eq!(a.best_swap(0, &[2, 3], 4), Some((2, 0)));
        // Hysteresis: held {0, 2}, cold 1 (2.0) against 1.5 · 1.25 + 1 = 2.875 does not swap;
        // at 3.0 it does.
        a.scores[0] = vec![1.5, 2.0, 5.0, 0.0];
        assert_eq!(a.best_swap(0, &[0, 2], 4), None);
        a.scores[0][1] = 3.0;
        assert_eq!(a.best_swap(0, &[0, 2], 4), Some((0, 1)));
    }
}
