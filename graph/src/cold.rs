//! Cold experts: routed experts this model's backend does not hold, computed elsewhere (the
//! daemon's `moe-expert` worker processes). The graph calls out through two custom ops per
//! MoE layer: `cold_begin` right after routing (hands the cold (token, expert, weight) pairs
//! and the activations over and returns at once) and `cold_end` after the hot experts (waits
//! and adds the cold sum), so the hot compute overlaps the cold one. Custom ops run on the CPU
//! backend: cold experts need a model on the CPU device for now.
use std::ffi::c_void;
use std::sync::Mutex;

use ggml::sys;

/// Computes routed experts outside the model's backend.
pub trait ColdExperts: Send {
    /// Start layer `layer` for `n` tokens: `x` holds n rows of n_embd activations (the MoE
    /// input), `pairs[t]` token t's cold (expert id, router weight) pairs (may be empty).
    fn begin(&mut self, layer: usize, n_embd: usize, x: &[f32], pairs: &[Vec<(u32, f32)>]) -> Result<(), String>;
    /// Wait for layer `layer` and add Σ weight · expert(x) of each token's cold pairs into
    /// `out` (n rows of n_embd).
    fn end(&mut self, layer: usize, out: &mut [f32]) -> Result<(), String>;
    /// Compute time the executor's workers reported for the last `end`, in seconds (0 when
    /// it does not know).
    fn reported_compute_s(&self) -> f64 {
        0.0
    }
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

/// Which experts of each layer this backend holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotExperts {
    /// Per layer, sorted expert ids held by the model's backend.
    pub layers: Vec<Vec<u32>>,
}

impl HotExperts {
    pub fn all(n_layer: usize, n_expert: usize) -> HotExperts {
        HotExperts { layers: vec![(0..n_expert as u32).collect(); n_layer] }
    }
    pub fn is_all_hot(&self, layer: usize, n_expert: usize) -> bool {
        self.layers[layer].len() == n_expert
    }
}

/// The executor and the first error a custom op met (ops cannot return errors).
pub(crate) struct ColdState {
    pub exec: Box<dyn ColdExperts>,
    pub hot: Vec<Vec<bool>>,
    pub error: Option<String>,
    pub pairs: Vec<Vec<(u32, f32)>>,
    pub stats: Vec<ExpertLayerStats>,
    pub began: Option<std::time::Instant>,
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

pub(crate) unsafe extern "C" fn cold_begin(dst: *mut sys::ggml_tensor, ith: i32, _nth: i32, userdata: *mut c_void) {
    if ith != 0 {
        return;
    }
    let call = &*(userdata as *const ColdCall);
    let Ok(mut st) = (*call.state).lock() else { return };
    let d = &*dst;
    let (z, ids, wts) = (d.src[0], d.src[1], d.src[2]);
    let (n_embd, n, zp) = rows::<f32>(z);
    let (k, _, idp) = rows::<i32>(ids);
    let wp = (*wts).data as *const f32;
    let x = std::slice::from_raw_parts(zp, n_embd * n);
    let ids = std::slice::from_raw_parts(idp, k * n);
    let w = std::slice::from_raw_parts(wp, k * n);
    let st = &mut *st;
    st.pairs.resize(n, Vec::new());
    let hot = &st.hot[call.layer];
    for t in 0..n {
        st.pairs[t].clear();
        for s in 0..k {
            let e = ids[t * k + s];
            if e >= 0 && !hot.get(e as usize).copied().unwrap_or(false) {
                st.pairs[t].push((e as u32, w[t * k + s]));
            }
        }
    }
    let cold: usize = st.pairs[..n].iter().map(Vec::len).sum();
    if let Some(ls) = st.stats.get_mut(call.layer) {
        ls.routed += (k * n) as u64;
        ls.cold += cold as u64;
    }
    if st.error.is_none() {
        if let Err(e) = st.exec.begin(call.layer, n_embd, x, &st.pairs[..n]) {
            st.error = Some(format!("cold experts of layer {}: {e}", call.layer));
        }
    }
    st.began = Some(std::time::Instant::now());
}

pub(crate) unsafe extern "C" fn cold_end(dst: *mut sys::ggml_tensor, ith: i32, _nth: i32, userdata: *mut c_void) {
    if ith != 0 {
        return;
    }
    let call = &*(userdata as *const ColdCall);
    let d = &*dst;
    let (n_embd, n) = (d.ne[0] as usize, d.ne[1] as usize);
    let out = std::slice::from_raw_parts_mut(d.data as *mut f32, n_embd * n);
    // src[1], when present, is the hot experts' sum.
    if d.src[1].is_null() {
        out.fill(0.0);
    } else {
        out.copy_from_slice(std::slice::from_raw_parts((*d.src[1]).data as *const f32, n_embd * n));
    }
    let Ok(mut st) = (*call.state).lock() else { return };
    let t0 = std::time::Instant::now();
    let hot_s = st.began.take().map(|b| (t0 - b).as_secs_f64()).unwrap_or(0.0);
    if st.error.is_none() {
        if let Err(e) = st.exec.end(call.layer, out) {
            st.error = Some(format!("cold experts of layer {}: {e}", call.layer));
        }
    }
    let wait_s = t0.elapsed().as_secs_f64();
    let reported = st.exec.reported_compute_s();
    if let Some(ls) = st.stats.get_mut(call.layer) {
        ls.hot_s += hot_s;
        ls.wait_s += wait_s;
        ls.cold_reported_s += reported;
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
