//! Per-op timing of step graphs (`dflash bench … --op-profile`): the scheduler's evaluation
//! callback asks for every node, so ggml computes the graph one node at a time and each
//! node's wall time is measured on its own. Each node then pays one dispatch of the backend
//! (on the CPU: one wake of the thread pool) instead of one barrier, so the total is larger
//! than an unprofiled step; the shares say where the time goes.
use std::collections::HashMap;
use std::ffi::c_void;
use std::time::Instant;

use ggml::sys;

use crate::ops::T;

/// Accumulated node times, keyed by op and the node's name without its layer suffix.
#[derive(Default)]
pub struct OpProfile {
    started: Option<Instant>,
    rows: HashMap<(String, String), OpRow>,
}

/// One row of the profile: an op (with the name its builder gave the node, layer stripped).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpRow {
    pub op: String,
    pub name: String,
    pub calls: u64,
    pub seconds: f64,
}

impl OpProfile {
    /// The rows, the most expensive first.
    pub fn rows(&self) -> Vec<OpRow> {
        let mut rows: Vec<OpRow> = self.rows.values().cloned().collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then_with(|| a.op.cmp(&b.op)).then_with(|| a.name.cmp(&b.name)));
        rows
    }

    pub fn clear(&mut self) {
        self.rows.clear();
        self.started = None;
    }

    /// `t`: a live node of the graph being computed (its sources live tensors of the
    /// graph, or weights).
    fn record(&mut self, t: T, seconds: f64) {
        let op = t.op_desc();
        let name = node_label(t);
        let row = self.rows.entry((op.clone(), name.clone())).or_insert_with(|| OpRow { op, name, ..OpRow::default() });
        row.calls += 1;
        row.seconds += seconds;
    }
}

/// What to call a node: its own name, else `<- ` and the name of its first named source
/// (through views, at most a few steps up), layers stripped.
fn node_label(t: T) -> String {
    let own = base_name(&t.name());
    if !own.is_empty() {
        return own;
    }
    let mut src = t;
    for _ in 0..6 {
        let Some(s) = src.src(0) else { break };
        src = s;
        let n = base_name(&src.name());
        if !n.is_empty() {
            return format!("<- {n}");
        }
    }
    String::new()
}

/// A node's name without the layer suffix (`q-3` → `q`) or ggml's decorations
/// (`x (view)`, `x (reshaped)`, `node_12` → ``).
fn base_name(name: &str) -> String {
    let name = name.split(" (").next().unwrap_or("");
    if name.starts_with("node_") || name.starts_with("leaf_") {
        return String::new();
    }
    // Weights: blk.N.attn_q_a.weight → blk.attn_q_a
    if let Some(rest) = name.strip_prefix("blk.") {
        let rest = rest.split_once('.').map_or(rest, |(_, r)| r);
        return format!("blk.{}", rest.strip_suffix(".weight").unwrap_or(rest));
    }
    match name.rsplit_once('-') {
        Some((base, layer)) if !layer.is_empty() && layer.bytes().all(|b| b.is_ascii_digit()) => base.to_string(),
        _ => name.to_string(),
    }
}

/// The scheduler's evaluation callback over an [`OpProfile`].
///
/// # Safety
/// `user_data` points at a live `OpProfile` no one else touches while the graph computes.
pub unsafe extern "C" fn eval_callback(t: *mut sys::ggml_tensor, ask: bool, user_data: *mut c_void) -> bool {
    // SAFETY: the caller's contract.
    let p = unsafe { &mut *user_data.cast::<OpProfile>() };
    if ask {
        p.started = Some(Instant::now());
    } else if let Some(t0) = p.started.take() {
        p.record(T(t), t0.elapsed().as_secs_f64());
    }
    true
}

#[cfg(test)]
mod tests {
    use super::base_name;

    #[test]
    fn base_names_drop_layers_and_decorations() {
        assert_eq!(base_name("q-3"), "q");
        assert_eq!(base_name("csa_windows-12"), "csa_windows");
        assert_eq!(base_name("kv-2 (reshaped)"), "kv");
        assert_eq!(base_name("node_77"), "");
        assert_eq!(base_name("ape_idx-4"), "ape_idx");
        assert_eq!(base_name("embd"), "embd");
        assert_eq!(base_name("a-b"), "a-b");
        assert_eq!(base_name("blk.7.ffn_up_exps.weight"), "blk.ffn_up_exps");
    }
}
