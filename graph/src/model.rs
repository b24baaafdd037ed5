//! The model: its options, weights on one backend (`load.rs`), the kept step graphs
//! (`steps.rs`), the cold-expert hand-over, and what it reports; the forward pass is in
//! `forward.rs`, the graph in `builder.rs`.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use experts::{ExpertPairs, ExpertSet};
use ggml::{Backend, BufferType, Context};
use loader::{Ds4Config, ModelFile, ReadOptions};

use crate::cold::{ColdExperts, ColdState};
use crate::profile::{OpProfile, OpRow};
use crate::state::Sequence;
use crate::steps::StepCache;
use crate::weights::{TensorSet, Weights};
use crate::GraphError;

/// How the model runs.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// Device name as ggml lists it (`CPU`, `CUDA0`, …); None = CPU.
    pub device: Option<String>,
    /// CPU threads.
    pub threads: usize,
    /// Largest micro-batch of one graph (prefill is split into these).
    pub ubatch: usize,
    pub read: ReadOptions,
    /// Routed experts this backend holds, per layer; None = all. The others need a cold
    /// executor ([`Model::set_cold_experts`]).
    pub hot: Option<ExpertSet>,
    /// Count routed tokens per layer and expert and write them as JSON (layer → counts, the
    /// `profile:FILE` placement input) when the model is dropped.
    pub route_stats_out: Option<std::path::PathBuf>,
    /// On the CPU, keep matrices in ggml's repacked (interleaved) layout where the CPU
    /// backend has one for their type and shape (llama.cpp's default as well), but for MXFP4
    /// routed experts on a CPU with AVX-512 VNNI, which dflash's own product reads plain.
    pub repack: bool,
    /// Attention through ggml's flash-attention op (F32 keys, F32 accumulation); None: on
    /// the CPU only (other backends' kernels round keys to F16).
    pub flash_attn: Option<bool>,
    /// CSA layers attend densely, every entry masked to the indexer's top-k, while at most
    /// this many entries exist (beyond it each token's entries are gathered). None: 16 × the
    /// indexer's k with flash attention (which streams the keys; on the medium synthetic
    /// model dense prefill was still the faster one at 32 × k, BENCHMARKS.md), 4 × k without
    /// (matmul + softmax hold all scores of a micro-batch: [keys, n, heads]).
    pub csa_dense_max_view: Option<usize>,
    /// Without flash attention, a sequence's queries in a micro-batch are split into blocks
    /// of at most this many, each scored against the raw keys its window reaches (block +
    /// window of them) instead of every raw key of the micro-batch: the scores of n tokens
    /// take n · (block + window) instead of n · (n + window) (`attention.rs`, query blocks).
    pub attention_block: usize,
    /// With cold experts on a GPU model: micro-batches of at least this many tokens compute
    /// the cold experts on the GPU from a second copy in pinned host memory, copying only
    /// the experts each micro-batch routes to (see `offload.rs`); smaller ones (decode) use
    /// the cold executor. 0: always the executor, and no host copy.
    pub cold_offload_min: usize,
    /// With cold experts on a GPU model: layers whose experts are all cold compute them in
    /// the step graph at every batch size, from the pinned host copy (ggml's CPU backend for
    /// batches below `cold_offload_min`), instead of through the cold executor.
    pub cold_layers_in_graph: bool,
    /// With a host copy of cold experts on a GPU (`cold_offload_min`, `cold_layers_in_graph`):
    /// micro-batches of at least this many tokens copy each such layer's cold experts whole
    /// into one of two GPU slots, the next layer's while this one computes (`stream.rs`);
    /// smaller ones are offloaded by the scheduler (routed experts only) or computed on the
    /// CPU. 0: never.
    pub cold_stream_min: usize,
    /// Device memory the two slots of `cold_stream_min` must leave free (for the KV caches
    /// and compute buffers); without it the layers are not streamed (logged).
    pub cold_stream_keep_free: u64,
    /// With a host copy of cold experts on a GPU (`cold_offload_min`, `cold_layers_in_graph`):
    /// micro-batches of at most `cold_pcie_max_tokens` tokens (decode) compute cold router
    /// slots on the GPU from copies of their experts made over PCIe (`pcie.rs`): in a layer
    /// whose experts are all cold each token's first this many, while the CPU computes the
    /// others; in a partly held layer every cold slot. 0: none.
    pub cold_pcie_slots: usize,
    /// See `cold_pcie_slots`.
    pub cold_pcie_max_tokens: usize,
    /// In a partly held layer the split stages the first ⌈c · K / k⌉ of a token's c cold
    /// slots and the CPU computes the others (`pcie.rs`, `partial_plan`; MXFP4 experts
    /// through `mxfp4_cpu.rs`), where without it every cold slot is staged.
    pub cold_pcie_partial_cpu: bool,
    /// The expert products that run on the CPU (the host copy's: the split's CPU slots, and
    /// the in-graph cold experts of micro-batches below ggml's offload size; a model on the
    /// CPU: its held experts) through ggml's own `mul_mat_id` rather than `mxfp4_cpu.rs`'s
    /// product of MXFP4 experts (the same bits; for comparing their speed). The cold
    /// executor's workers use `mxfp4_cpu.rs` either way.
    pub cold_cpu_ggml_kernel: bool,
    /// The hot set follows the live routing ([`Model::replace_experts`], `adaptive.rs`):
    /// routing is counted, and partly held layers swap experts between steps. Not with a
    /// pinned host copy of the cold experts (`cold_offload_min`, `cold_layers_in_graph`).
    pub adaptive: Option<crate::adaptive::SwapPolicy>,
    /// With the model on the CPU, keep the host copy of `cold_offload_min` /
    /// `cold_layers_in_graph` too, in a plain CPU buffer (a GPU model keeps it in pinned
    /// memory): the in-graph paths of cold experts (and `cold_pcie_slots`, whose copies are
    /// then plain memory copies) run on a CPU, for their tests.
    #[doc(hidden)]
    pub cold_host_on_cpu: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        ModelOptions {
            device: None,
            threads,
            ubatch: crate::DEFAULT_UBATCH,
            read: ReadOptions::default(),
            hot: None,
            route_stats_out: None,
            repack: true,
            flash_attn: None,
            csa_dense_max_view: None,
            attention_block: crate::DEFAULT_ATTENTION_BLOCK,
            cold_offload_min: 0,
            cold_layers_in_graph: false,
            cold_host_on_cpu: false,
            cold_stream_min: 0,
            cold_stream_keep_free: 2 << 30,
            cold_pcie_slots: 0,
            cold_pcie_max_tokens: 8,
            cold_pcie_partial_cpu: false,
            cold_cpu_ggml_kernel: false,
            adaptive: None,
        }
    }
}

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// One row of n_vocab per token.
    All,
    /// Only the last token's row.
    Last,
}

/// Time spent in the last `forward`, summed over its micro-batches.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTimings {
    pub graphs_built: usize,
    pub graphs_reused: usize,
    pub build_s: f64,
    pub compute_s: f64,
    /// Where the compute's time went in steps with decode's cold slots over PCIe.
    pub split: SplitTimings,
}

/// The compute of steps with decode's cold slots over PCIe (`pcie.rs`), cut at the
/// scheduler's stops in split layers (host clock). The four parts add up to those steps'
/// compute, less reading the logits.
#[derive(Clone, Copy, Debug, Default)]
pub struct SplitTimings {
    /// Steps with a split layer, and split layers planned.
    pub steps: usize,
    pub layers: usize,
    /// From the step's start, or the last split layer's hand-back, to a split layer's router
    /// having run with the host caught up: the device's work in between (the staged products,
    /// whole layers, the next attention and router) and the host's wait for it.
    pub to_router_s: f64,
    /// Planning the split and queuing its copies.
    pub plan_s: f64,
    /// From the plan to the CPU slots' weighted sum: the CPU's products (the copies run
    /// meanwhile), with the scheduler's copy of their input to the host. In a partly held
    /// layer (no CPU slots): the held experts' products on the device.
    pub cpu_s: f64,
    /// From the last split layer's hand-back to the step's end.
    pub after_s: f64,
}

impl std::ops::AddAssign for SplitTimings {
    fn add_assign(&mut self, o: SplitTimings) {
        self.steps += o.steps;
        self.layers += o.layers;
        self.to_router_s += o.to_router_s;
        self.plan_s += o.plan_s;
        self.cpu_s += o.cpu_s;
        self.after_s += o.after_s;
    }
}

pub(crate) static NEXT_SEQ_ID: AtomicU64 = AtomicU64::new(1);

pub struct Model {
    pub config: Ds4Config,
    pub file: ModelFile,
    pub(crate) opts: ModelOptions,
    pub(crate) weights: Weights,
    /// Step graphs, each with its scheduler (which points at the backends below: dropped
    /// first, see `Drop`).
    pub(crate) steps: StepCache,
    /// The host image of a step's inputs, for a device with memory of its own.
    pub(crate) input_staging: crate::steps::InputStaging,
    pub(crate) backend: Backend,
    /// The CPU backend beside a non-CPU `backend`: it runs the custom ops (the cold-expert
    /// hand-over, routing statistics); the scheduler copies their operands across.
    pub(crate) cpu: Option<Backend>,
    pub(crate) buft: BufferType,
    pub(crate) model_id: u64,
    pub(crate) timings: StepTimings,
    pub(crate) hot: ExpertSet,
    pub(crate) cold: Option<Box<Mutex<ColdState>>>,
    /// All-cold layers streamed to the GPU for big micro-batches
    /// (`ModelOptions::cold_stream_min`); declared (so dropped) before the host copy it
    /// reads.
    pub(crate) cold_stream: Option<crate::stream::ColdStream>,
    /// Decode's all-cold layers split between the CPU and PCIe (`ModelOptions::cold_pcie_slots`);
    /// declared (so dropped) before the host copy it reads.
    pub(crate) pcie: Option<crate::pcie::PcieSplit>,
    /// The cold experts' pinned host copy (`ModelOptions::cold_offload_min`).
    pub(crate) cold_host: Option<crate::offload::ColdHost>,
    pub(crate) route_counts: Option<Box<Mutex<Vec<Vec<u64>>>>>,
    /// The live scores when adaptive (`ModelOptions::adaptive`).
    pub(crate) adaptive: Option<crate::adaptive::Adaptive>,
    pub(crate) swaps: crate::adaptive::SwapReport,
    /// Per-op timing of every step when on (`set_op_profile`); boxed: the scheduler's
    /// callback points at it.
    pub(crate) op_profile: Option<Box<OpProfile>>,
    pub(crate) _tables: Option<(Context, ggml::Buffer)>,
    pub(crate) _tensors: TensorSet,
}

// SAFETY: the raw graph/allocator pointers of `steps` are only touched through &mut self.
unsafe impl Send for Model {}

impl Model {
    /// Per-layer expert telemetry (hit rate, hot compute, cold wait, worker-reported cold
    /// compute) since the last call, when some experts are cold; resets the counters.
    pub fn take_expert_stats(&mut self) -> Option<Vec<crate::cold::ExpertLayerStats>> {
        let cold = self.cold.as_ref()?;
        let mut st = cold.lock().ok()?;
        let n = st.stats.len();
        Some(std::mem::replace(&mut st.stats, vec![Default::default(); n]))
    }

    /// Routed tokens per layer and expert so far (with `route_stats_out` or `adaptive`).
    pub fn route_counts(&self) -> Option<Vec<Vec<u64>>> {
        self.route_counts.as_ref().and_then(|m| m.lock().ok()).map(|c| c.clone())
    }

    /// Write the routed-token counts as JSON (layer → counts per expert).
    pub fn write_route_stats(&self) -> Result<(), experts::ExpertsError> {
        let (Some(path), Some(counts)) = (&self.opts.route_stats_out, self.route_counts()) else { return Ok(()) };
        experts::RouteStats::from_counts(counts).write_json(path)
    }

    /// The experts this backend holds.
    pub fn hot_experts(&self) -> &ExpertSet {
        &self.hot
    }

    /// Whether some routed expert is not held by this backend.
    pub fn has_cold_experts(&self) -> bool {
        (0..self.config.n_layer).any(|l| !self.hot.is_full_layer(l as u32))
    }

    /// The layers whose cold experts the step graph computes itself at every batch size, from
    /// its pinned host copy (`cold_layers_in_graph`: the layers holding no expert): the cold
    /// executor never sees them, so it need not hold their experts.
    pub fn layers_in_graph(&self) -> Vec<u32> {
        let Some(host) = self.cold_host.as_ref().filter(|h| h.all_cold_in_graph) else { return Vec::new() };
        host.layers.iter().enumerate().filter(|(_, l)| l.as_ref().is_some_and(|l| l.maps.is_none())).map(|(l, _)| l as u32).collect()
    }

    /// Whether some layer's cold experts need the cold executor (not held, not in the graph).
    pub fn needs_cold_executor(&self) -> bool {
        let in_graph = self.layers_in_graph();
        (0..self.config.n_layer as u32).any(|l| !self.hot.is_full_layer(l) && !in_graph.contains(&l))
    }

    /// Hand the cold experts to `exec`. The hand-over runs as CPU custom ops; on another
    /// device the scheduler copies the activations and routes to the CPU and the sums back.
    pub fn set_cold_experts(&mut self, exec: Box<dyn ColdExperts>) -> Result<(), GraphError> {
        let n_expert = self.config.n_expert;
        let local = self
            .hot
            .layers()
            .iter()
            .map(|ids| {
                let mut v = vec![-1i32; n_expert];
                for (i, &e) in ids.iter().enumerate() {
                    v[e as usize] = i as i32;
                }
                v
            })
            .collect();
        self.steps.clear();
        let stats = vec![Default::default(); self.config.n_layer];
        self.cold = Some(Box::new(Mutex::new(ColdState { exec, local, error: None, pairs: ExpertPairs::new(), rows: Vec::new(), stats, began: None, split: None })));
        Ok(())
    }

    /// A new empty sequence able to hold `n_ctx` tokens.
    pub fn new_sequence(&self, n_ctx: usize) -> Result<Sequence, GraphError> {
        if n_ctx == 0 {
            return Err(GraphError::Option("context size must be at least 1".into()));
        }
        let mut s = Sequence::new(&self.config, n_ctx, self.buft)?;
        s.id = NEXT_SEQ_ID.fetch_add(1, Ordering::Relaxed);
        s.model_id = self.model_id;
        Ok(s)
    }

    pub fn n_vocab(&self) -> usize {
        self.config.n_vocab
    }

    /// Whether attention runs through flash attention, and up to how many entries CSA layers
    /// attend densely (the options, or their defaults for this device).
    pub(crate) fn attention_paths(&self) -> (bool, usize) {
        let on_cpu = self.backend.device().kind() == ggml::DeviceKind::Cpu;
        let flash = self.opts.flash_attn.unwrap_or(on_cpu);
        let dense = self.opts.csa_dense_max_view.unwrap_or(if flash { 16 } else { 4 } * self.config.indexer_top_k);
        (flash, dense)
    }

    /// The query block of the attention (0: the whole micro-batch): flash attention takes the
    /// batch at once (its kernels skip masked keys), the matmul path in blocks
    /// (`ModelOptions::attention_block`).
    pub(crate) fn query_block(&self) -> usize {
        if self.attention_paths().0 {
            0
        } else {
            self.opts.attention_block
        }
    }

    /// The largest micro-batch: `forward` splits its tokens into runs of this many.
    pub fn ubatch(&self) -> usize {
        self.opts.ubatch
    }

    /// Everything besides the weights and the tokens that decides the bits of a step's
    /// results: the device, the threads, the attention paths and matrix layouts, and, off the
    /// CPU, which experts the device holds (on the CPU the placement never changes a result).
    /// Two models with the same weights and the same description compute the same state from
    /// the same steps; where tokens are split into steps is the caller's part (`ubatch` only
    /// bounds a step), so it is not in here.
    pub fn numerics(&self) -> String {
        let device = self.backend.device();
        let on_cpu = device.kind() == ggml::DeviceKind::Cpu;
        let (flash, dense) = self.attention_paths();
        let o = &self.opts;
        let mut s = format!(
            "device {} ({}); threads {}; flash attention {flash}; csa dense up to {dense}; attention block {}; repack {}; cold offload from {}; cold layers in graph {}",
            device.name(),
            device.description(),
            o.threads,
            self.query_block(),
            o.repack,
            o.cold_offload_min,
            o.cold_layers_in_graph
        );
        if !on_cpu {
            s.push_str(&format!("; held experts {:?}", self.hot.layers()));
        }
        s
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    pub fn set_threads(&mut self, threads: usize) {
        self.opts.threads = threads;
        self.backend.set_threads(threads);
        if let Some(cpu) = &self.cpu {
            cpu.set_threads(threads);
        }
    }

    /// Into how many per-backend runs the last step's graph was split (1: one backend ran
    /// it all; more when custom ops ran on the CPU beside a GPU).
    pub fn last_step_splits(&self) -> usize {
        self.steps.last().map_or(0, |s| s.sched.n_splits())
    }

    /// The names of the last step's nodes in the order they run (debugging, tests).
    pub fn last_step_nodes(&self) -> Vec<String> {
        self.steps.last().map(|s| s.graph.nodes().into_iter().map(|t| t.name()).collect()).unwrap_or_default()
    }

    /// Step graphs kept for reuse, and the bytes of compute buffer they hold on the model's
    /// device (the CPU's too when the model is elsewhere: custom ops and the cold experts'
    /// products run there).
    pub fn kept_steps(&self) -> (usize, usize) {
        let backends: Vec<&ggml::Backend> = std::iter::once(&self.backend).chain(self.cpu.as_ref()).collect();
        (self.steps.len(), self.steps.buffer_bytes(&backends).iter().sum())
    }

    /// Experts copied to the device for decode's router slots split over PCIe
    /// (`ModelOptions::cold_pcie_slots`) since load; None when nothing is split.
    pub fn experts_staged(&self) -> Option<u64> {
        self.pcie.as_ref().map(|p| p.staged_total.get())
    }

    /// Cold slots of partly held layers computed on the CPU beside the PCIe split since load
    /// (the CPU's share: `pcie.rs`, `partial_plan`); None without the split.
    pub fn partial_slots_on_cpu(&self) -> Option<u64> {
        self.pcie.as_ref().map(|p| p.partial_cpu_total.get())
    }

    /// Fill every step's inputs into a host image and copy it to the device in one piece
    /// even where the device's buffers are host memory (which are otherwise written in
    /// place): what a GPU does, for its tests on a CPU.
    #[doc(hidden)]
    pub fn set_input_staging(&mut self, always: bool) {
        self.input_staging.always = always;
    }

    /// Timings of the last `forward` call.
    pub fn timings(&self) -> StepTimings {
        self.timings
    }

    /// Time every node of the step graphs from now on (on) or stop (off); see
    /// [`crate::profile`]: profiled steps are slower, the shares are what counts.
    pub fn set_op_profile(&mut self, on: bool) {
        self.op_profile = on.then(Box::default);
    }

    /// The per-op times since profiling started or the last call (most expensive first),
    /// and clears them; None when profiling is off.
    pub fn take_op_profile(&mut self) -> Option<Vec<OpRow>> {
        let p = self.op_profile.as_mut()?;
        let rows = p.rows();
        p.clear();
        Some(rows)
    }

}

impl Drop for Model {
    fn drop(&mut self) {
        self.steps.clear();
        if let Err(e) = self.write_route_stats() {
            tracing::error!(path = ?self.opts.route_stats_out, "could not write the routing statistics: {e}");
        }
    }
}
