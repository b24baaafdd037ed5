//! The forward pass: a batch of tokens split into micro-batches, each run as one step graph
//! (built or taken from the step cache, its inputs filled, computed, its logits read).
use std::time::Instant;

use crate::model::{Logits, Model, StepTimings};
use crate::plan::{self, CompPlan, CompShape};
use crate::profile::{self, OpProfile};
use crate::state::Sequence;
use crate::steps::StepKey;
use crate::GraphError;

impl Model {
    /// Run `tokens` through the model after what `seq` holds, in micro-batches of at most
    /// `ubatch` tokens. Returns n_vocab logits per token (`Logits::All`) or for the last one.
    /// Token ids and the context size are checked before any compute.
    pub fn forward(&mut self, seq: &mut Sequence, tokens: &[u32], want: Logits) -> Result<Vec<f32>, GraphError> {
        if seq.model_id != self.model_id {
            return Err(GraphError::ForeignSequence);
        }
        let n_vocab = self.config.n_vocab;
        if let Some((index, &id)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= n_vocab) {
            return Err(GraphError::TokenOutOfRange { id: id as i64, index, n_vocab });
        }
        if self.cold.is_none() && self.has_cold_experts() {
            return Err(GraphError::Option("some routed experts are cold but no cold executor is set".into()));
        }
        if seq.pos() + tokens.len() > seq.n_ctx() {
            return Err(GraphError::ContextOverflow { pos: seq.pos(), n: tokens.len(), n_ctx: seq.n_ctx() });
        }
        self.timings = StepTimings::default();
        let mut out = Vec::with_capacity(if want == Logits::All { tokens.len() * n_vocab } else { n_vocab });
        let chunks: Vec<&[u32]> = tokens.chunks(self.opts.ubatch).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let mode = if want == Logits::All || last { want } else { Logits::Last };
            let logits = self.step(seq, chunk, mode)?;
            if want == Logits::All || last {
                out.extend_from_slice(&logits);
            }
        }
        Ok(out)
    }

    /// One micro-batch.
    fn step(&mut self, seq: &mut Sequence, tokens: &[u32], want: Logits) -> Result<Vec<f32>, GraphError> {
        let (p, n) = (seq.pos(), tokens.len());
        let raw = plan::raw_plan(p, n, self.config.window);
        let comps: Vec<(CompShape, CompPlan)> = self
            .comp_shapes(seq)
            .into_iter()
            .map(|s| {
                let cp = plan::comp_plan(p, n, &s);
                (s, cp)
            })
            .collect();
        let key = StepKey { seq: seq.id, n, logits: want, comp: comps.iter().map(|(s, cp)| (s.ratio, cp.n_windows, cp.n_view)).collect() };

        let t0 = Instant::now();
        // Step graphs are cached per shape key (which includes the sequence), so sequences
        // served in turn keep their decode graphs.
        if self.steps.touch(&key) {
            self.timings.graphs_reused += 1;
        } else {
            let s = self.build_step(seq, key, &comps)?;
            self.steps.insert(s);
            self.timings.graphs_built += 1;
        }
        let Some(step) = self.steps.last_mut() else { unreachable!("a step was just cached") };
        step.inputs.set(p, tokens, &raw, &comps);
        match self.op_profile.as_mut() {
            // SAFETY: the profile is boxed and owned by the model, which outlives the compute
            // below and touches the profile only through &mut self.
            Some(p) => unsafe { step.sched.set_eval_callback(Some(profile::eval_callback), std::ptr::from_mut::<OpProfile>(p).cast()) },
            // SAFETY: no callback, no user data.
            None => unsafe { step.sched.set_eval_callback(None, std::ptr::null_mut()) },
        }
        let t1 = Instant::now();
        // SAFETY: the step's graph is the one its scheduler allocated; its other tensors live
        // in the model's weight buffers and the sequence's state buffer, on these backends.
        unsafe { step.sched.compute(step.graph.as_ptr())? };
        if let Some(cold) = &self.cold {
            let mut st = cold.lock().map_err(|_| GraphError::Cold("the cold expert state is poisoned".into()))?;
            if let Some(e) = st.error.take() {
                // The step's state writes ran: the sequence no longer matches its position.
                return Err(GraphError::Cold(format!("{e}; the sequence must be reset")));
            }
        }
        let rows = if want == Logits::All { n } else { 1 };
        let mut logits = vec![0f32; rows * self.config.n_vocab];
        step.out.read_f32(&mut logits);
        let t2 = Instant::now();
        self.timings.build_s += (t1 - t0).as_secs_f64();
        self.timings.compute_s += (t2 - t1).as_secs_f64();
        seq.advance(n);
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
