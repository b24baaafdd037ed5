//! Cold experts: routed experts this model's backend does not hold, computed elsewhere (the
//! daemon's `moe-expert` worker processes, or in process). The graph calls out through two
//! custom ops per MoE layer: `cold_begin` right after routing (hands the cold (token, expert)
//! pairs and the activations over, returns at once, and writes the held experts' local ids
//! for the hot product) and `cold_end` after the hot experts (waits for the executor's one
//! output row per cold pair and puts each into its slot beside the held experts' outputs), so
//! the hot compute overlaps the cold one. The router weights never cross the seam: the graph
//! weighs and sums all k slots of a token at once, in router order, whichever side computed
//! them. Custom ops run on the CPU backend; with the model on a GPU the scheduler copies
//! their inputs and outputs across.
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use experts::ExpertPairs;
use ggml::sys;

/// A failure below the seam (a worker's protocol or process error, a compute error), kept
/// as the executor's own error type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an executor could not compute a layer's cold experts.
#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    /// A worker process could not be (re)started.
    #[error("expert worker {worker}: could not start it: {source}")]
    WorkerStart { worker: usize, source: BoxError },
    /// The connection to a worker failed: a frame it sent or we could not send, a lost peer.
    #[error("expert worker {worker}: {source}")]
    Protocol { worker: usize, source: BoxError },
    /// The request replayed to a respawned worker failed too.
    #[error("expert worker {worker} (replay after a respawn): {source}")]
    Replay { worker: usize, source: BoxError },
    /// A worker refused the request or failed while computing, and said why.
    #[error("expert worker {worker} reported an error: {source}")]
    Remote { worker: usize, source: BoxError },
    /// The in-process computation failed.
    #[error("{source}")]
    Compute { source: BoxError },
    /// `end` of a layer that was not the one begun (or none was).
    #[error("end of layer {layer} after begin of layer {begun:?}")]
    OutOfOrder { layer: usize, begun: Option<usize> },
}

/// Computes routed experts outside the model's backend.
pub trait ColdExperts: Send {
    /// Start layer `layer` for `n` tokens: `x` holds n rows of n_embd activations (the MoE
    /// input), token t of `pairs` its cold experts (may be none).
    fn begin(&mut self, layer: usize, n_embd: usize, x: &[f32], pairs: &ExpertPairs) -> Result<(), ColdError>;
    /// Wait for layer `layer` and write into `out` one row of n_embd per pair of the `begin`,
    /// in its order: row `p` is pair `p`'s expert on its token's activations, computed as
    /// the model computes a held expert (`graph::expert_ffn` on ggml's CPU backend over the
    /// weights in the model's expert buffer type), so that the result is the same bits
    /// wherever the expert is placed.
    fn end(&mut self, layer: usize, out: &mut [f32]) -> Result<(), ColdError>;
    /// Compute time the executor's workers reported for the last `end`, in seconds (0 when
    /// it does not know).
    fn reported_compute_s(&self) -> f64 {
        0.0
    }
    /// Right after `begin`: the layer's work as a job that the threads of the graph's op
    /// waiting for it share, in place of `end` (an executor that computes on this process's
    /// CPU, whose own thread team would nest in the graph's and so run one thread). `None`
    /// (the default): the op calls `end` on one thread.
    fn split(&mut self) -> Option<Arc<dyn ColdSplit>> {
        None
    }
}

/// A layer's cold pairs, computed by several threads at once (see [`ColdExperts::split`]).
pub trait ColdSplit: Send + Sync {
    /// Computes part `part` of `parts` of the pairs of the `begin` this job came from,
    /// handing each pair's row to `put(pair, row)`. The parts together cover every pair
    /// once; each row is the bits `end` would have written for it.
    fn run(&self, part: usize, parts: usize, put: &mut dyn FnMut(usize, &[f32])) -> Result<(), ColdError>;
}

/// Per-layer expert telemetry since the last reset (`Model::expert_stats`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ExpertLayerStats {
    /// Routed (token, expert) slots, and how many of them were cold.
    pub routed: u64,
    pub cold: u64,
    /// From the hand-over of the cold pairs to the wait for them: the hot experts' compute.
    pub hot_s: f64,
    /// Time spent waiting for the cold experts after the hot ones were done.
    pub wait_s: f64,
    /// Compute time the workers reported.
    pub cold_reported_s: f64,
}

impl ExpertLayerStats {
    /// Fraction of routed slots served by the hot experts.
    pub fn hit_rate(&self) -> f64 {
        if self.routed == 0 {
            return 1.0;
        }
        1.0 - self.cold as f64 / self.routed as f64
    }
}

/// The executor and the first error a custom op met (ops cannot return errors).
pub(crate) struct ColdState {
    pub exec: Box<dyn ColdExperts>,
    /// Per layer, global expert id → index among the held experts (−1: cold).
    pub local: Vec<Vec<i32>>,
    /// The layer and error of the first failure.
    pub error: Option<(usize, ColdError)>,
    pub pairs: ExpertPairs,
    /// The executor's answer for `pairs`: one row of n_embd per pair.
    pub rows: Vec<f32>,
    pub stats: Vec<ExpertLayerStats>,
    pub began: Option<std::time::Instant>,
    /// The job of the layer begun, when the executor split it (`ColdExperts::split`).
    pub split: Option<Arc<dyn ColdSplit>>,
}

/// What one layer's custom ops point at (owned by the step graph, so the pointer lives as
/// long as the graph).
pub(crate) struct ColdCall {
    pub state: *const Mutex<ColdState>,
    pub layer: usize,
}

/// # Safety
/// `t` is a CPU tensor of F32/I32 elements with contiguous rows.
unsafe fn rows<E: Copy>(t: *const sys::ggml_tensor) -> (usize, usize, *const E) {
    let t = &*t;
    (t.ne[0] as usize, t.ne[1] as usize, t.data as *const E)
}

/// Whether expert `e` is cold in a layer whose global → held map is `local`.
fn is_cold(local: &[i32], e: i32) -> bool {
    local.get(e as usize).is_some_and(|&i| i < 0)
}

/// Writes [k, n] I32 into `dst`: each slot's index among the held experts; a cold slot gets
/// a held expert that token does not use (its output is replaced by `cold_end`), so every
/// token's ids are distinct, as GPU expert kernels require (the model checks at load that a
/// partly held layer holds at least k experts). Layers holding none leave `dst` unused.
/// Collects the cold slots as (token, expert) pairs, token by token in slot order, and
/// hands them with the activations `src[0]` to the executor.
pub(crate) unsafe extern "C" fn cold_begin(dst: *mut sys::ggml_tensor, ith: i32, _nth: i32, userdata: *mut c_void) {
    if ith != 0 {
        return;
    }
    let call = &*(userdata as *const ColdCall);
    let Ok(mut st) = (*call.state).lock() else { return };
    let d = &*dst;
    let (z, ids) = (d.src[0], d.src[1]);
    let (n_embd, n, zp) = rows::<f32>(z);
    let (k, _, idp) = rows::<i32>(ids);
    let x = std::slice::from_raw_parts(zp, n_embd * n);
    let ids = std::slice::from_raw_parts(idp, k * n);
    let local_out = std::slice::from_raw_parts_mut(d.data as *mut i32, k * n);
    let st = &mut *st;
    st.pairs.clear();
    let local = &st.local[call.layer];
    let n_held = local.iter().filter(|&&i| i >= 0).count() as i32;
    for t in 0..n {
        let ids = &ids[t * k..(t + 1) * k];
        for &e in ids.iter().filter(|&&e| is_cold(local, e)) {
            st.pairs.push(e as u32);
        }
        st.pairs.end_token();
        held_slots(local, n_held, ids, &mut local_out[t * k..(t + 1) * k]);
    }
    let cold = st.pairs.n_pairs();
    if let Some(ls) = st.stats.get_mut(call.layer) {
        ls.routed += (k * n) as u64;
        ls.cold += cold as u64;
    }
    st.split = None;
    if st.error.is_none() {
        match st.exec.begin(call.layer, n_embd, x, &st.pairs) {
            Ok(()) => st.split = st.exec.split(),
            Err(e) => st.error = Some((call.layer, e)),
        }
    }
    st.began = Some(std::time::Instant::now());
}

/// Writes [n_embd, k, n] into `dst`: every slot's expert output. Held experts' slots come
/// from `src[2]` (their product, when the layer holds some); each cold slot gets the
/// executor's row for its pair (`src[1]` holds the router's global ids [k, n], so the cold
/// slots are found in the order `cold_begin` collected them). `src[0]` (the local ids) only
/// orders this op after `cold_begin`. Runs on every thread of the graph's team: when the
/// executor split the layer into a job, each thread computes its part of the pairs and copies
/// its share of the held slots; otherwise thread 0 waits for `end` and does it all.
pub(crate) unsafe extern "C" fn cold_end(dst: *mut sys::ggml_tensor, ith: i32, nth: i32, userdata: *mut c_void) {
    let call = &*(userdata as *const ColdCall);
    let d = &*dst;
    let (n_embd, k, n) = (d.ne[0] as usize, d.ne[1] as usize, d.ne[2] as usize);
    let ids = std::slice::from_raw_parts((*d.src[1]).data as *const i32, k * n);
    let held = (!d.src[2].is_null()).then(|| std::slice::from_raw_parts((*d.src[2]).data as *const f32, n_embd * k * n));
    let t0 = std::time::Instant::now();
    let Ok(guard) = (*call.state).lock() else { return };
    let split = guard.split.clone();
    if let Some(job) = split {
        let local = guard.local[call.layer].clone();
        drop(guard);
        let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
        let out = d.data as *mut f32;
        // The held slots of this thread's tokens.
        if let Some(held) = held {
            let (first, end) = (n * ith / nth, n * (ith + 1) / nth);
            for slot in first * k..end * k {
                if !is_cold(&local, ids[slot]) {
                    // SAFETY: slot < k·n, a slot of `dst` ([n_embd, k, n] F32) no other thread writes.
                    let dst_row = std::slice::from_raw_parts_mut(out.add(slot * n_embd), n_embd);
                    dst_row.copy_from_slice(&held[slot * n_embd..(slot + 1) * n_embd]);
                }
            }
        }
        // The slot of each pair, in the order `cold_begin` collected them.
        let slots: Vec<usize> = ids.iter().enumerate().filter(|&(_, &e)| is_cold(&local, e)).map(|(slot, _)| slot).collect();
        let result = job.run(ith, nth, &mut |p, row| {
            if let Some(&slot) = slots.get(p) {
                if row.len() == n_embd {
                    // SAFETY: the slot of pair p, which only the part computing p writes.
                    std::slice::from_raw_parts_mut(out.add(slot * n_embd), n_embd).copy_from_slice(row);
                }
            }
        });
        if result.is_err() || ith == 0 {
            let Ok(mut st) = (*call.state).lock() else { return };
            if let Err(e) = result {
                if st.error.is_none() {
                    st.error = Some((call.layer, e));
                }
            }
            if ith == 0 {
                record_wait(&mut st, call.layer, t0);
            }
        }
        return;
    }
    if ith != 0 {
        return;
    }
    let out = std::slice::from_raw_parts_mut(d.data as *mut f32, n_embd * k * n);
    match held {
        Some(held) => out.copy_from_slice(held),
        None => out.fill(0.0),
    }
    let mut st = guard;
    let st = &mut *st;
    if st.error.is_none() {
        st.rows.resize(st.pairs.n_pairs() * n_embd, 0.0);
        match st.exec.end(call.layer, &mut st.rows) {
            Ok(()) => place_cold_rows(&st.local[call.layer], ids, &st.rows, out),
            Err(e) => st.error = Some((call.layer, e)),
        }
    }
    record_wait(st, call.layer, t0);
}

/// Adds to `layer`'s stats the hot compute since `cold_begin` handed the pairs over, the wait
/// since `t0`, and what the executor reported.
fn record_wait(st: &mut ColdState, layer: usize, t0: std::time::Instant) {
    let hot_s = st.began.take().map(|b| t0.saturating_duration_since(b).as_secs_f64()).unwrap_or(0.0);
    let wait_s = t0.elapsed().as_secs_f64();
    let reported = st.exec.reported_compute_s();
    if let Some(ls) = st.stats.get_mut(layer) {
        ls.hot_s += hot_s;
        ls.wait_s += wait_s;
        ls.cold_reported_s += reported;
    }
}

/// Copies row `p` of `rows` (the executor's answer, one row per cold pair) into the slot of
/// `out` ([n_embd, k, n] flat, slot `s` of token `t` at `t·k + s`) of the `p`-th cold entry
/// of `ids` ([k, n] flat: the router's global expert ids), the order in which `cold_begin`
/// collected the pairs. Held slots are left as they are.
fn place_cold_rows(local: &[i32], ids: &[i32], rows: &[f32], out: &mut [f32]) {
    let n_embd = out.len() / ids.len().max(1);
    let cold_slots = ids.iter().enumerate().filter(|&(_, &e)| is_cold(local, e)).map(|(slot, _)| slot);
    for (slot, row) in cold_slots.zip(rows.chunks_exact(n_embd)) {
        out[slot * n_embd..(slot + 1) * n_embd].copy_from_slice(row);
    }
}

/// One token's ids for the hot product: held experts by their local index, cold slots filled
/// with the lowest local indices this token does not use (distinct as long as `n_held` ≥ the
/// slot count, which the model checks at load; layers holding none get 0s, unused).
pub(crate) fn held_slots(local: &[i32], n_held: i32, ids: &[i32], out: &mut [i32]) {
    for (o, &e) in out.iter_mut().zip(ids) {
        *o = local.get(e as usize).copied().unwrap_or(-1);
    }
    let mut filler = 0;
    for s in 0..out.len() {
        if out[s] < 0 {
            while filler < n_held - 1 && out.contains(&filler) {
                filler += 1;
            }
            out[s] = filler.max(0);
        }
    }
}

/// Routed-token counts per layer and expert (`--route-stats-out`), fed by a CPU custom op.
pub(crate) struct RouteCall {
    pub counts: *const Mutex<Vec<Vec<u64>>>,
    pub layer: usize,
}

pub(crate) unsafe extern "C" fn route_count(dst: *mut sys::ggml_tensor, ith: i32, _nth: i32, userdata: *mut c_void) {
    if ith != 0 {
        return;
    }
    let call = &*(userdata as *const RouteCall);
    let ids = (*dst).src[0];
    let (k, n, idp) = rows::<i32>(ids);
    let ids = std::slice::from_raw_parts(idp, k * n);
    let Ok(mut counts) = (*call.counts).lock() else { return };
    if let Some(layer) = counts.get_mut(call.layer) {
        for &e in ids {
            if let Some(c) = layer.get_mut(e as usize) {
                *c += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{held_slots, place_cold_rows};

    #[test]
    fn cold_rows_go_to_their_slots_in_pair_order() {
        // 6 experts, held: 0, 2, 4 (local 0..2); k = 2, 3 tokens, n_embd = 2.
        let local = [0, -1, 1, -1, 2, -1];
        let ids = [0, 1, 3, 5, 2, 4]; // token 0: held, cold; token 1: cold, cold; token 2: held, held
        let rows = [10.0, 11.0, 20.0, 21.0, 30.0, 31.0]; // pairs (0, 1), (1, 3), (1, 5)
        let mut out: Vec<f32> = (0..12).map(|i| -(i as f32)).collect();
        place_cold_rows(&local, &ids, &rows, &mut out);
        assert_eq!(out, vec![-0.0, -1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0, -8.0, -9.0, -10.0, -11.0]);
    }

    #[test]
    fn held_slots_are_distinct_per_token_and_keep_held_experts() {
        // 8 experts, held: 1, 4, 5, 6 (local 0..3); k = 4.
        let mut local = vec![-1; 8];
        for (i, e) in [1, 4, 5, 6].into_iter().enumerate() {
            local[e] = i as i32;
        }
        // All held, all cold, and mixed (held kept, cold filled around them).
        let cases: [[i32; 4]; 4] = [[1, 4, 5, 6], [0, 2, 3, 7], [5, 0, 1, 3], [3, 6, 2, 4]];
        for ids in &cases {
            let mut out = [0; 4];
            held_slots(&local, 4, ids, &mut out);
            for (s, &e) in ids.iter().enumerate() {
                if local[e as usize] >= 0 {
                    assert_eq!(out[s], local[e as usize], "{ids:?}: held slot {s} keeps its expert");
                }
            }
            let mut sorted = out.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 4, "{ids:?} -> {out:?}: ids not distinct");
            assert!(out.iter().all(|&i| (0..4).contains(&i)), "{out:?}");
        }
    }
}
