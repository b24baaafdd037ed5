//! The forward pass: the tokens of one or more sequences split into steps of at most
//! `ubatch` tokens, each run as one step graph (built or taken from the step cache, its
//! inputs filled, computed, its logits read).
use std::time::Instant;

use crate::builder::SeqPlan;
use crate::model::{Logits, Model, StepTimings};
use crate::ops::InputImage;
use crate::plan::{self, CompShape};
use crate::profile::{self, OpProfile};
use crate::state::Sequence;
use crate::steps::{SeqKey, StepKey};
use crate::GraphError;

/// One sequence's share of a step: which item, from which of its tokens, how many.
#[derive(Clone, Copy)]
struct Part {
    item: usize,
    start: usize,
    n: usize,
}

impl Model {
    /// Run `tokens` through the model after what `seq` holds, in micro-batches of at most
    /// `ubatch` tokens. Returns n_vocab logits per token (`Logits::All`) or for the last one.
    /// Token ids and the context size are checked before any compute.
    pub fn forward(&mut self, seq: &mut Sequence, tokens: &[u32], want: Logits) -> Result<Vec<f32>, GraphError> {
        let mut out = self.forward_batch(&mut [(seq, tokens)], want)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Run each item's tokens through the model after what its sequence holds, the
    /// sequences together: each step takes the next tokens of every unfinished item, in
    /// order, while the step has room (`ubatch` tokens), and runs them as one graph, where
    /// everything but attention works over all the step's tokens at once and each sequence
    /// attends over its own columns and state. Per item: n_vocab logits per token
    /// (`Logits::All`) or for its last token (none for an item without tokens). Each
    /// sequence's logits are its logits alone (DS4.md, Batched steps). Token ids and context
    /// sizes are checked before any compute.
    pub fn forward_batch(&mut self, items: &mut [(&mut Sequence, &[u32])], want: Logits) -> Result<Vec<Vec<f32>>, GraphError> {
        let n_vocab = self.config.n_vocab;
        for (seq, tokens) in items.iter() {
            if seq.model_id != self.model_id {
                return Err(GraphError::ForeignSequence);
            }
            crate::check_token_ids(tokens, n_vocab)?;
            if seq.pos() + tokens.len() > seq.n_ctx() {
                return Err(GraphError::ContextOverflow { pos: seq.pos(), n: tokens.len(), n_ctx: seq.n_ctx() });
            }
        }
        if self.cold.is_none() && self.needs_cold_executor() {
            return Err(GraphError::Option("some routed experts are cold but no cold executor is set".into()));
        }
        self.timings = StepTimings::default();
        let mut out: Vec<Vec<f32>> = items.iter().map(|_| Vec::new()).collect();
        let mut done = vec![0usize; items.len()];
        loop {
            let mut room = self.opts.ubatch;
            let mut parts = Vec::new();
            for (item, (_, tokens)) in items.iter().enumerate() {
                let n = (tokens.len() - done[item]).min(room);
                if n > 0 {
                    parts.push(Part { item, start: done[item], n });
                    room -= n;
                }
            }
            if parts.is_empty() {
                return Ok(out);
            }
            // Logits::Last reads every part's last token; only an item's final one is kept.
            let mut logits = self.step(items, &parts, want)?;
            let mut row = 0;
            for part in &parts {
                let rows = if want == Logits::All { part.n } else { 1 };
                done[part.item] += part.n;
                if want == Logits::All || done[part.item] == items[part.item].1.len() {
                    if parts.len() == 1 && out[part.item].is_empty() {
                        // the step's rows are all this part's: moved, not copied
                        out[part.item] = std::mem::take(&mut logits);
                    } else {
                        out[part.item].extend_from_slice(&logits[row * n_vocab..(row + rows) * n_vocab]);
                    }
                }
                row += rows;
            }
        }
    }

    /// One step over these parts of the items.
    fn step(&mut self, items: &mut [(&mut Sequence, &[u32])], parts: &[Part], want: Logits) -> Result<Vec<f32>, GraphError> {
        let block = self.query_block();
        let plans: Vec<SeqPlan> = parts
            .iter()
            .map(|part| {
                let (seq, tokens) = &items[part.item];
                let (p, n) = (seq.pos(), part.n);
                let comps = self.comp_shapes(seq).into_iter().map(|s| (s, plan::comp_plan(p, n, &s))).collect();
                SeqPlan { p, tokens: &tokens[part.start..part.start + n], raw: plan::raw_plan(p, n, self.config.window, block), comps }
            })
            .collect();
        let key = StepKey { logits: want, seqs: parts.iter().zip(&plans).map(|(part, sp)| SeqKey::new(items[part.item].0, sp)).collect() };

        let t0 = Instant::now();
        // Step graphs are cached per shape key (which includes the sequences), so sequences
        // served in turn, or together, keep their decode graphs.
        if self.steps.touch(&key) {
            self.timings.graphs_reused += 1;
        } else {
            let seqs: Vec<&Sequence> = parts.iter().map(|part| &*items[part.item].0).collect();
            let reuse = if key.is_prefill() { self.steps.take_prefill_sched() } else { None };
            let s = self.build_step(&seqs, key, &plans, reuse)?;
            self.steps.insert(s);
            self.timings.graphs_built += 1;
        }
        let Some(step) = self.steps.last_mut() else { unreachable!("a step was just cached") };
        let ib = &step.input_buffer;
        if ib.buffer.is_host() && !self.input_staging.always {
            // SAFETY: the buffer's first `len` bytes are host memory this step owns; nothing
            // reads them until the compute below.
            let bytes = unsafe { std::slice::from_raw_parts_mut(ib.buffer.base(), ib.len) };
            step.inputs.set(&plans, &mut InputImage::new(ib.buffer.base(), bytes));
        } else {
            let image = self.input_staging.image(ib.len)?;
            step.inputs.set(&plans, &mut InputImage::new(ib.buffer.base(), image));
            // One copy, done before the compute: a node the scheduler runs on the CPU fetches
            // an input it reads on a stream of its own, unordered with the compute's.
            // SAFETY: `whole` spans the buffer's first `len` bytes, allocated.
            unsafe { ggml::backend::tensor_set(ib.whole.0, image, 0) };
        }
        let stream = self.cold_stream.as_ref().filter(|_| !step.stream_nodes.is_empty());
        let pcie = self.pcie.as_ref().filter(|_| !step.pcie_nodes.is_empty());
        let mut hooks = StepHooks {
            // The profile is boxed and owned by the model, which outlives the compute below
            // and touches the profile only through &mut self.
            profile: self.op_profile.as_mut().map(|p| std::ptr::from_mut::<OpProfile>(p)),
            stream: stream.map(|s| StreamHook { stream: s, nodes: step.stream_nodes.as_slice(), compute: self.backend.as_ptr() }),
            pcie: pcie.map(|p| PcieHook { split: p, nodes: step.pcie_nodes.as_slice(), compute: self.backend.as_ptr() }),
            split_t: crate::model::SplitTimings::default(),
            mark: Instant::now(),
        };
        if hooks.profile.is_some() || hooks.stream.is_some() || hooks.pcie.is_some() {
            // SAFETY: `hooks` outlives the compute below, after which the callback is unset.
            unsafe { step.sched.set_eval_callback(Some(step_hooks), std::ptr::from_mut(&mut hooks).cast()) };
        }
        if let Some(s) = stream {
            s.begin_step();
        }
        let t1 = Instant::now();
        hooks.mark = t1;
        // SAFETY: the step's graph is the one its scheduler allocated; its other tensors live
        // in the model's weight buffers and the sequences' state buffers, on these backends.
        let computed = unsafe { step.sched.compute(step.graph.as_ptr()) };
        // SAFETY: no callback, no user data.
        unsafe { step.sched.set_eval_callback(None, std::ptr::null_mut()) };
        computed?;
        if hooks.split_t.layers > 0 {
            hooks.split_t.steps = 1;
            hooks.split_t.after_s += hooks.mark.elapsed().as_secs_f64();
            self.timings.split += hooks.split_t;
        }
        if let Some(s) = stream {
            s.end_step();
        }
        if let Some(cold) = &self.cold {
            let mut st = cold.lock().map_err(|_| GraphError::ColdStatePoisoned)?;
            if let Some((layer, source)) = st.error.take() {
                // The step's state writes ran: the sequences no longer match their positions.
                return Err(GraphError::Cold { layer, source });
            }
        }
        let n: usize = parts.iter().map(|part| part.n).sum();
        let rows = if want == Logits::All { n } else { parts.len() };
        let mut logits = vec![0f32; rows * self.config.n_vocab];
        step.out.read_f32(&mut logits);
        let t2 = Instant::now();
        self.timings.build_s += (t1 - t0).as_secs_f64();
        self.timings.compute_s += (t2 - t1).as_secs_f64();
        for part in parts {
            items[part.item].0.advance(part.n);
        }
        Ok(logits)
    }

    /// The distinct compressor shapes of the model, for this sequence's context.
    fn comp_shapes(&self, seq: &Sequence) -> Vec<CompShape> {
        let mut ratios: Vec<usize> = self.config.compress_ratios[..self.config.n_layer].iter().copied().filter(|&r| r != 0).collect();
        ratios.sort_unstable();
        ratios.dedup();
        ratios.into_iter().map(|r| CompShape::new(r, seq.n_ctx())).collect()
    }
}

/// What the scheduler's evaluation callback serves during one step: the op profile (every
/// node), the streamed layers' router ids (`stream.rs`), and decode's cold slots over PCIe
/// (`pcie.rs`).
struct StepHooks<'a> {
    profile: Option<*mut OpProfile>,
    stream: Option<StreamHook<'a>>,
    pcie: Option<PcieHook<'a>>,
    /// The split's parts of this step, and when the last one ended.
    split_t: crate::model::SplitTimings,
    mark: Instant,
}

/// The split, the step's (node, what to do there) pairs by address, the model's backend.
#[derive(Clone, Copy)]
struct PcieHook<'a> {
    split: &'a crate::pcie::PcieSplit,
    nodes: &'a [(usize, crate::pcie::PcieAt)],
    compute: ggml::sys::ggml_backend_t,
}

/// The stream, the step's (router-id node, position) pairs, the model's backend.
#[derive(Clone, Copy)]
struct StreamHook<'a> {
    stream: &'a crate::stream::ColdStream,
    nodes: &'a [(usize, usize)],
    compute: ggml::sys::ggml_backend_t,
}

impl StepHooks<'_> {
    fn stream_pos(&self, t: *mut ggml::sys::ggml_tensor) -> Option<usize> {
        let s = self.stream?;
        let i = s.nodes.binary_search_by_key(&(t as usize), |&(node, _)| node).ok()?;
        Some(s.nodes[i].1)
    }

    fn pcie_at(&self, t: *mut ggml::sys::ggml_tensor) -> Option<crate::pcie::PcieAt> {
        let p = self.pcie?;
        let i = p.nodes.binary_search_by_key(&(t as usize), |&(node, _)| node).ok()?;
        Some(p.nodes[i].1)
    }
}

/// The scheduler's evaluation callback over [`StepHooks`]: asks for every node when
/// profiling, else only for the streamed layers' router ids; after such a node (the device
/// has caught up) queues the next copy and the wait for this layer's.
///
/// # Safety
/// `user_data` points at live `StepHooks` no one else touches while the graph computes.
unsafe extern "C" fn step_hooks(t: *mut ggml::sys::ggml_tensor, ask: bool, user_data: *mut std::ffi::c_void) -> bool {
    // SAFETY: the caller's contract.
    let h = unsafe { &mut *user_data.cast::<StepHooks>() };
    let pos = h.stream_pos(t);
    let split = h.pcie_at(t);
    if let Some(p) = h.profile {
        // SAFETY: the profile outlives the compute (see `step`).
        unsafe { profile::eval_callback(t, ask, p.cast()) };
    }
    if ask {
        return h.profile.is_some() || pos.is_some() || split.is_some();
    }
    if let (Some(pos), Some(s)) = (pos, h.stream) {
        // SAFETY: `compute` is the model's live backend, the slots' device's.
        unsafe { s.stream.at_router(pos, s.compute) };
    }
    if let (Some(at), Some(p)) = (split, h.pcie) {
        use crate::pcie::PcieAt;
        // SAFETY: the scheduler stops after computing `t` and has waited for the device;
        // the split's nodes are the router's (kept as outputs) of a layer the split has,
        // in a step of at most its tokens (`offload.rs`); `compute` is the model's live
        // backend, the staging's device's.
        let start = Instant::now();
        unsafe {
            match at {
                PcieAt::Plan { layer, ids, wait } => {
                    h.split_t.layers += 1;
                    h.split_t.to_router_s += (start - h.mark).as_secs_f64();
                    p.split.at_plan(layer, ids as *const ggml::sys::ggml_tensor, t);
                    if wait {
                        p.split.before_staged(p.compute);
                    }
                    h.mark = Instant::now();
                    h.split_t.plan_s += (h.mark - start).as_secs_f64();
                }
                PcieAt::Staged => {
                    h.split_t.cpu_s += (start - h.mark).as_secs_f64();
                    p.split.before_staged(p.compute);
                    h.mark = Instant::now();
                }
            }
        }
    }
    true
}
