//! Step graphs: one per micro-batch shape (and sequence), built on first use and kept with
//! its scheduler and compute buffers while the shape repeats (decode), most recent last.
use std::sync::Mutex;

use ggml::{Backend, Buffer, BufferType, Context, Scheduler};

use crate::builder::{Builder, Inputs, SeqPlan};
use crate::cold::{ColdCall, ColdState, RouteCall};
use crate::model::{Logits, Model};
use crate::ops::{Ctx, Graph, T};
use crate::state::Sequence;
use crate::GraphError;

/// What fixes a step graph: which logits, and per sequence in order its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StepKey {
    pub logits: Logits,
    pub seqs: Vec<SeqKey>,
}

/// One sequence's part of a step key: the sequence (its state tensors are in the graph),
/// its tokens in the step, and per compressor ratio (windows closing, entries visible).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SeqKey {
    pub seq: u64,
    pub n: usize,
    pub comp: Vec<(usize, usize, usize)>,
}

impl StepKey {
    /// Whether some sequence feeds more than one token: a prefill chunk, whose shape (its
    /// position's windows and entries) seldom comes again, unlike decode's.
    pub fn is_prefill(&self) -> bool {
        self.seqs.iter().any(|s| s.n > 1)
    }
}

impl SeqKey {
    pub fn new(seq: &Sequence, plan: &SeqPlan) -> SeqKey {
        SeqKey { seq: seq.id, n: plan.tokens.len(), comp: plan.comps.iter().map(|(s, cp)| (s.ratio, cp.n_windows, cp.n_view)).collect() }
    }
}

/// A step's inputs, one after another in one buffer of the model's device, and a byte view
/// of them all: a step moves its inputs to the device in one copy (the scheduler would copy
/// each input on its own, a synchronised copy apiece: a dozen or more per decoded token).
pub(crate) struct InputBuffer {
    pub buffer: Buffer,
    /// I8 [len]: the buffer's first `len` bytes, every input among them.
    pub whole: T,
    pub len: usize,
}

impl InputBuffer {
    /// Place `inputs` in `reuse` when it has room, else in a new buffer of `buft`; `whole` is
    /// an unallocated I8 tensor of the step's context, made into the view of them all.
    fn place(inputs: &[T], buft: BufferType, reuse: Option<Buffer>, g: &Ctx) -> Result<InputBuffer, GraphError> {
        let (buffer, len) = place_packed(buft, inputs, reuse)?;
        let whole = g.new_bytes(len as i64);
        // SAFETY: an unallocated tensor of the step's context over the buffer's first `len`
        // bytes; it overlaps the inputs on purpose.
        unsafe { buffer.place(whole.0, 0)? };
        Ok(InputBuffer { buffer, whole, len })
    }
}

/// `tensors` (unallocated) one after another in `reuse` when it has room, else in a new
/// buffer of `buft`, each at the buffer type's alignment; and the bytes they span (at least 1).
pub(crate) fn place_packed(buft: BufferType, tensors: &[T], reuse: Option<Buffer>) -> Result<(Buffer, usize), GraphError> {
    // SAFETY: live tensors.
    let sizes: Vec<usize> = tensors.iter().map(|t| unsafe { buft.alloc_size(t.0) }).collect();
    let (at, len) = crate::stream::packed_offsets(&sizes, buft.alignment().max(1));
    let len = len.max(1);
    let buffer = match reuse {
        Some(b) if b.size() >= len => b,
        _ => buft.alloc_buffer(len)?,
    };
    for (t, &o) in tensors.iter().zip(&at) {
        // SAFETY: unallocated tensors at aligned offsets within the buffer, sized above from
        // the buffer type's own allocation sizes.
        unsafe { buffer.place(t.0, o)? };
    }
    Ok((buffer, len))
}

/// The host image of the inputs of a step on a device whose buffers are not host memory,
/// written there and copied over in one piece: in the device's pinned host memory where it
/// has some (the copy then runs without a staging copy by the driver), else in plain memory.
/// One for the model, grown to the largest step's inputs.
pub(crate) struct InputStaging {
    /// Stage (and copy) even where the device's buffers are host memory: that path's tests
    /// on a CPU ([`Model::set_input_staging`]).
    pub always: bool,
    pinned: Option<BufferType>,
    buffer: Option<Buffer>,
    plain: Vec<u8>,
}

impl InputStaging {
    pub fn new(pinned: Option<BufferType>) -> InputStaging {
        InputStaging { always: false, pinned, buffer: None, plain: Vec::new() }
    }

    /// `len` bytes of image (what they held before is unspecified).
    pub fn image(&mut self, len: usize) -> Result<&mut [u8], GraphError> {
        let Some(buft) = self.pinned else {
            if self.plain.len() < len {
                self.plain.resize(len, 0);
            }
            return Ok(&mut self.plain[..len]);
        };
        if self.buffer.as_ref().is_none_or(|b| b.size() < len) {
            // grown by at least half again, so that a prompt's micro-batches of growing
            // context seldom reallocate
            let old = self.buffer.take().map_or(0, |b| b.size());
            self.buffer = Some(buft.alloc_buffer(len.max(old + old / 2))?);
        }
        let Some(b) = &self.buffer else { unreachable!("allocated above") };
        // SAFETY: a host buffer (a pinned host buffer type's) of at least `len` bytes, owned
        // here; the `&mut self` borrow keeps the slice exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(b.base(), len) })
    }
}

/// A built step graph, allocated and ready to run.
pub(crate) struct Step {
    pub key: StepKey,
    pub graph: Graph,
    pub inputs: Inputs,
    pub input_buffer: InputBuffer,
    pub out: T,
    /// Splits the graph between the model's device and the CPU (custom ops) and holds its
    /// compute buffers.
    pub sched: Scheduler,
    /// The router-id nodes of the layers this step streams (`stream.rs`): (node address,
    /// position among the streamed layers), by address.
    pub stream_nodes: Vec<(usize, usize)>,
    /// Where the evaluation callback stops for decode's CPU/PCIe split (`pcie.rs`), by
    /// address.
    pub pcie_nodes: Vec<(usize, crate::pcie::PcieAt)>,
    #[allow(clippy::vec_box)]
    _cold_calls: Vec<Box<ColdCall>>,
    #[allow(clippy::vec_box)]
    _route_calls: Vec<Box<RouteCall>>,
    _ctx: Context,
}

/// Step graphs kept (each with its compute buffer): enough for a few sequences' (or batches')
/// decode graphs plus a prefill shape.
const MAX_CACHED_STEPS: usize = 8;

/// The kept step graphs, least recently used first.
#[derive(Default)]
pub(crate) struct StepCache {
    steps: Vec<Step>,
}

impl StepCache {
    /// Whether a step of `key` is kept; if so it becomes the most recent one.
    pub fn touch(&mut self, key: &StepKey) -> bool {
        match self.steps.iter().position(|s| s.key == *key) {
            Some(i) => {
                let s = self.steps.remove(i);
                self.steps.push(s);
                true
            }
            None => false,
        }
    }

    /// Keep `step` as the most recent one, dropping the least recent when full.
    pub fn insert(&mut self, step: Step) {
        if self.steps.len() >= MAX_CACHED_STEPS {
            self.steps.remove(0);
        }
        self.steps.push(step);
    }

    /// Remove the kept prefill step (there is at most one) and hand back its scheduler, whose
    /// compute buffers the next prefill step reuses: a long prompt's chunks, each of its own
    /// shape, hold one prefill compute buffer between them, not one each (at full width and
    /// a micro-batch of 2048, ~2.2 GB a buffer).
    /// Its input buffer goes along, for the next prefill step's inputs where they fit.
    pub fn take_prefill_sched(&mut self) -> Option<(Scheduler, Buffer)> {
        let i = self.steps.iter().position(|s| s.key.is_prefill())?;
        let Step { sched, input_buffer, .. } = self.steps.remove(i);
        Some((sched, input_buffer.buffer))
    }

    /// Bytes of compute buffer the kept steps hold, per backend (in the model's order).
    pub fn buffer_bytes(&self, backends: &[&Backend]) -> Vec<usize> {
        let mut total = vec![0; backends.len()];
        for s in &self.steps {
            for (t, b) in total.iter_mut().zip(s.sched.buffer_sizes(backends)) {
                *t += b;
            }
        }
        total
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn last(&self) -> Option<&Step> {
        self.steps.last()
    }

    pub fn last_mut(&mut self) -> Option<&mut Step> {
        self.steps.last_mut()
    }

    pub fn clear(&mut self) {
        self.steps.clear();
    }
}

impl Model {
    /// Build and allocate the step graph of `key` for `seqs` (with these plans), in `reuse`'s
    /// compute buffers when given and the graph fits its capacity.
    pub(crate) fn build_step(&self, seqs: &[&Sequence], key: StepKey, plans: &[SeqPlan], reuse: Option<(Scheduler, Buffer)>) -> Result<Step, GraphError> {
        let c = &self.config;
        // Nodes: a layer takes under 512 per sequence, plus under 32 per attention query block.
        let blocks: usize = plans.iter().map(|sp| sp.raw.blocks.len()).sum();
        let graph_size = 256 + c.n_layer * (512 * seqs.len() + 32 * blocks);
        let ctx = Context::new_no_alloc(graph_size * 2, graph_size)?;
        let g = Ctx { raw: ctx.as_ptr() };
        let inputs = Inputs::new(&g, c, plans, key.logits);

        let on_cpu = self.backend.device().kind() == ggml::DeviceKind::Cpu;
        let (flash, csa_dense_max_view) = self.attention_paths();
        let mut b = Builder {
            g: &g,
            c,
            inp: &inputs,
            cur: 0,
            effects: Vec::new(),
            order: Vec::new(),
            cold: self.cold.as_deref().map(|m| m as *const Mutex<ColdState>),
            cold_host: self.cold_host.as_ref(),
            cold_stream: self.cold_stream.as_ref(),
            pcie: self.pcie.as_ref(),
            pcie_nodes: Vec::new(),
            stream_nodes: Vec::new(),
            cold_calls: Vec::new(),
            route_counts: self.route_counts.as_deref().map(|m| m as *const Mutex<Vec<Vec<u64>>>),
            route_calls: Vec::new(),
            cpu_nodes: Vec::new(),
            on_cpu,
            own_kernel: !self.opts.cold_cpu_ggml_kernel,
            flash,
            csa_dense_max_view,
            masks: Default::default(),
        };
        let out = b.model(&self.weights, seqs);
        let Builder { effects, order, cold_calls, route_calls, cpu_nodes, mut stream_nodes, mut pcie_nodes, .. } = b;
        // by address: the evaluation callback looks every node up (`forward::StepHooks`)
        stream_nodes.sort_unstable();
        pcie_nodes.sort_unstable();

        // The effects go last: they overwrite state the step reads.
        let graph = g.new_graph(graph_size);
        for &t in &order {
            graph.expand(t);
        }
        graph.expand(g.output(out));
        for &eff in &effects {
            graph.expand(eff);
        }
        #[cfg(debug_assertions)]
        graph.check_matmul_layouts();
        let cpu = self.cpu.as_ref().unwrap_or(&self.backend);
        let backends: Vec<&Backend> = match &self.cpu {
            Some(cpu) => vec![&self.backend, cpu],
            None => vec![&self.backend],
        };
        // SAFETY: the model owns the backends and drops its steps first.
        // Op offloading lets the scheduler run products over host weights (the cold experts'
        // copy) on the GPU when the batch is big enough for the device to want them.
        let capacity = graph.tensor_count() + 64;
        let (reuse_sched, reuse_inputs) = reuse.unzip();
        let mut sched = match reuse_sched {
            Some(mut s) if s.capacity() >= capacity => {
                s.reset();
                s
            }
            _ => unsafe { Scheduler::new(&backends, capacity, self.cold_host.is_some())? },
        };
        // Inputs live on the model's device, in a buffer of their own (set in one copy per
        // step, none per split).
        let input_buffer = InputBuffer::place(&inputs.all(), self.backend.device().buffer_type(), reuse_inputs, &g)?;
        // SAFETY: the nodes belong to this graph; both backends are the scheduler's. Custom
        // ops run on the CPU.
        for node in &cpu_nodes {
            unsafe { sched.pin(node.0, cpu) };
        }
        // SAFETY: the graph is live; weights, tables and state are in these backends' buffers.
        unsafe { sched.alloc_graph(graph.as_ptr())? };
        let (nodes, compute_nodes) = graph.node_counts();
        tracing::debug!(seqs = key.seqs.len(), n = inputs.tokens.ne(0), nodes, compute_nodes, splits = sched.n_splits(), buffers = ?sched.buffer_sizes(&backends), "step graph allocated");
        Ok(Step { key, graph, inputs, input_buffer, out, sched, stream_nodes, pcie_nodes, _cold_calls: cold_calls, _route_calls: route_calls, _ctx: ctx })
    }
}
