//! The model: weights on one backend, the step graph (built per micro-batch shape, reused
//! while the shape holds), and `forward`.
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ggml::{sys, Backend, BufferType, Context, Device, Scheduler};
use loader::{Ds4Config, LoadedTensors, ModelFile, ReadOptions, TensorRequest};

use std::sync::Mutex;

use crate::cold::{ColdCall, ColdExperts, ColdState, HotExperts, RouteCall};
use crate::ops::{Ctx, T};
use crate::plan::{self, CompPlan, CompShape, RawPlan};
use crate::profile::{self, OpProfile, OpRow};
use crate::state::Sequence;
use crate::weights::{validate_tid2eid, Weights};
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
    pub hot: Option<HotExperts>,
    /// Count routed tokens per layer and expert and write them as JSON (layer → counts, the
    /// `profile:FILE` placement input) when the model is dropped.
    pub route_stats_out: Option<std::path::PathBuf>,
    /// On the CPU, keep matrices in ggml's repacked (interleaved) layout where the CPU
    /// backend has one for their type and shape (llama.cpp's default as well).
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
}

/// Graph inputs of one compressor ratio (shared by every layer of that ratio).
pub struct CompInputs {
    pub ratio: usize,
    pub n_windows: usize,
    pub n_view: usize,
    pub ape_idx: T,
    pub keep: T,
    pub vis_mask: T,
    /// The windows that close in this batch; None when none does (decode between closes).
    pub windows: Option<WindowInputs>,
}

/// Row indices and entry slots of the windows a batch closes (`plan::CompPlan`).
pub struct WindowInputs {
    pub cur_idx: T,
    pub prev_idx: Option<T>,
    pub entry_pos: T,
    pub write_idx: T,
}

pub struct Inputs {
    pub tokens: T,
    pub pos: T,
    pub neg_pos: T,
    pub raw_mask: T,
    pub ring_keep: T,
    pub comp: Vec<CompInputs>,
}

impl Inputs {
    fn all(&self) -> Vec<T> {
        let mut v = vec![self.tokens, self.pos, self.neg_pos, self.raw_mask, self.ring_keep];
        for ci in &self.comp {
            v.extend([ci.ape_idx, ci.keep, ci.vis_mask]);
            if let Some(w) = &ci.windows {
                v.extend([w.cur_idx, w.entry_pos, w.write_idx]);
                v.extend(w.prev_idx);
            }
        }
        v
    }
}

/// The graph builder of one step: straight-line code in the order of the math.
pub struct Builder<'a> {
    pub g: &'a Ctx,
    pub c: &'a Ds4Config,
    pub inp: &'a Inputs,
    /// Writes into per-sequence state, expanded after the outputs so they run last.
    pub effects: Vec<T>,
    pub cold: Option<*const Mutex<ColdState>>,
    /// Boxed: the custom ops hold pointers to them, which must not move as the Vec grows.
    #[allow(clippy::vec_box)]
    pub cold_calls: Vec<Box<ColdCall>>,
    pub route_counts: Option<*const Mutex<Vec<Vec<u64>>>>,
    #[allow(clippy::vec_box)]
    pub route_calls: Vec<Box<RouteCall>>,
    /// Nodes that must run on the CPU backend (custom ops), whatever device runs the rest.
    pub cpu_nodes: Vec<T>,
    /// The graph runs on the CPU backend (some ops have a faster formulation there).
    pub on_cpu: bool,
    /// Attention through the flash-attention op (else matmul, softmax, matmul).
    pub flash: bool,
    /// See [`ModelOptions::csa_dense_max_view`].
    pub csa_dense_max_view: usize,
    /// Attention masks shared by layers, made once per step (F16 for flash attention):
    /// 0 → the raw mask, ratio → the raw mask ++ that ratio's visibility.
    pub masks: std::collections::HashMap<usize, T>,
}

impl<'a> Builder<'a> {
    pub fn comp_inputs(&self, ratio: usize) -> &'a CompInputs {
        // Every ratio of the config gets inputs when the step is built.
        self.inp.comp.iter().find(|ci| ci.ratio == ratio).unwrap_or_else(|| unreachable!("inputs for ratio {ratio}"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct StepKey {
    seq: u64,
    n: usize,
    logits: Logits,
    comp: Vec<(usize, usize, usize)>,
}

struct Step {
    key: StepKey,
    graph: *mut sys::ggml_cgraph,
    inputs: Inputs,
    out: T,
    /// Splits the graph between the model's device and the CPU (custom ops) and holds its
    /// compute buffers.
    sched: Scheduler,
    #[allow(clippy::vec_box)]
    _cold_calls: Vec<Box<ColdCall>>,
    #[allow(clippy::vec_box)]
    _route_calls: Vec<Box<RouteCall>>,
    _ctx: Context,
}

static NEXT_SEQ_ID: AtomicU64 = AtomicU64::new(1);

/// Step graphs kept (each with its compute buffer): enough for a few sequences' decode graphs
/// plus a prefill shape.
const MAX_CACHED_STEPS: usize = 8;

pub struct Model {
    pub config: Ds4Config,
    pub file: ModelFile,
    opts: ModelOptions,
    weights: Weights,
    /// Step graphs, each with its scheduler (which points at the backends below: dropped
    /// first, see `Drop`).
    steps: Vec<Step>,
    backend: Backend,
    /// The CPU backend beside a non-CPU `backend`: it runs the custom ops (the cold-expert
    /// hand-over, routing statistics); the scheduler copies their operands across.
    cpu: Option<Backend>,
    buft: BufferType,
    model_id: u64,
    timings: StepTimings,
    hot: HotExperts,
    cold: Option<Box<Mutex<ColdState>>>,
    route_counts: Option<Box<Mutex<Vec<Vec<u64>>>>>,
    /// Per-op timing of every step when on (`set_op_profile`); boxed: the scheduler's
    /// callback points at it.
    op_profile: Option<Box<OpProfile>>,
    _tables: Option<(Context, ggml::Buffer)>,
    _tensors: TensorSet,
}

// SAFETY: the raw graph/allocator pointers of `steps` are only touched through &mut self.
unsafe impl Send for Model {}

impl Model {
    pub fn load(path: impl AsRef<Path>, opts: ModelOptions) -> Result<Model, GraphError> {
        Model::from_file(ModelFile::open(path)?, opts)
    }

    /// Load the weights of an already opened (validated) file.
    pub fn from_file(file: ModelFile, opts: ModelOptions) -> Result<Model, GraphError> {
        if opts.ubatch == 0 {
            return Err(GraphError::Option("ubatch must be at least 1".into()));
        }
        let device = match &opts.device {
            Some(name) => Device::by_name(name)?,
            None => Device::cpu()?,
        };
        let backend = Backend::new(device)?;
        backend.set_threads(opts.threads);
        let cpu = match device.kind() {
            ggml::DeviceKind::Cpu => None,
            _ => Some(Backend::cpu(opts.threads)?),
        };
        let buft = device.buffer_type();
        let config = file.config.clone();
        let hot = match opts.hot.clone() {
            Some(h) => {
                check_hot(&config, &h)?;
                h
            }
            None => HotExperts::all(config.n_layer, config.n_expert),
        };
        let partial = |name: &str| -> Option<usize> {
            let l: usize = name.strip_prefix("blk.")?.split('.').next()?.parse().ok()?;
            let routed = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps"].iter().any(|p| name.contains(p));
            (routed && l < config.n_layer && !hot.is_all_hot(l, config.n_expert)).then_some(l)
        };
        let mut requests = Vec::new();
        for t in file.tensors.iter().filter(|t| !file.tensors.unused.contains(&t.name)) {
            match partial(&t.name) {
                None => requests.push(TensorRequest::whole(t.name.clone())),
                Some(l) if hot.layers[l].is_empty() => {}
                Some(l) => requests.push(TensorRequest::experts(t.name.clone(), hot.layers[l].clone())),
            }
        }
        let repack = if opts.repack && device.kind() == ggml::DeviceKind::Cpu { repack_buffer_type(device) } else { None };
        let (requests, packed): (Vec<TensorRequest>, Vec<TensorRequest>) = match repack {
            Some(rb) => requests.into_iter().partition(|r| !(r.experts.is_none() && repackable(&file, &r.name, device, rb))),
            None => (requests, Vec::new()),
        };
        let mut tensors = vec![loader::load_tensors(&file, &requests, buft, &opts.read)?];
        if let (Some(rb), false) = (repack, packed.is_empty()) {
            tracing::debug!(tensors = packed.len(), "matrices in the CPU_REPACK buffer");
            tensors.push(loader::load_tensors_whole(&file, &packed, rb, &opts.read)?);
        }
        let tensors = TensorSet(tensors);
        let (tables, subsets) = subset_tables(&config, &hot, buft)?;
        let weights = Weights::lookup(&config, &tensors, &subsets)?;
        validate_tid2eid(&config, &weights)?;
        let model_id = NEXT_SEQ_ID.fetch_add(1, Ordering::Relaxed);
        let route_counts = opts.route_stats_out.as_ref().map(|_| Box::new(Mutex::new(vec![vec![0u64; config.n_expert]; config.n_layer])));
        Ok(Model {
            config,
            file,
            opts,
            weights,
            steps: Vec::new(),
            backend,
            cpu,
            buft,
            model_id,
            timings: StepTimings::default(),
            hot,
            cold: None,
            route_counts,
            op_profile: None,
            _tables: tables,
            _tensors: tensors,
        })
    }

    /// Per-layer expert telemetry (hit rate, hot compute, cold wait, worker-reported cold
    /// compute) since the last call, when some experts are cold; resets the counters.
    pub fn take_expert_stats(&mut self) -> Option<Vec<crate::cold::ExpertLayerStats>> {
        let cold = self.cold.as_ref()?;
        let mut st = cold.lock().ok()?;
        let n = st.stats.len();
        Some(std::mem::replace(&mut st.stats, vec![Default::default(); n]))
    }

    /// Routed tokens per layer and expert so far (with `route_stats_out`).
    pub fn route_counts(&self) -> Option<Vec<Vec<u64>>> {
        self.route_counts.as_ref().and_then(|m| m.lock().ok()).map(|c| c.clone())
    }

    /// Write the routed-token counts as JSON (layer → counts per expert).
    pub fn write_route_stats(&self) -> std::io::Result<()> {
        let (Some(path), Some(counts)) = (&self.opts.route_stats_out, self.route_counts()) else { return Ok(()) };
        let body: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(l, c)| format!("\"{l}\": [{}]", c.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")))
            .collect();
        std::fs::write(path, format!("{{\n{}\n}}\n", body.join(",\n")))
    }

    /// The experts this backend holds.
    pub fn hot_experts(&self) -> &HotExperts {
        &self.hot
    }

    /// Whether some routed expert is not held by this backend.
    pub fn has_cold_experts(&self) -> bool {
        (0..self.config.n_layer).any(|l| !self.hot.is_all_hot(l, self.config.n_expert))
    }

    /// Hand the cold experts to `exec`. The hand-over runs as CPU custom ops; on another
    /// device the scheduler copies the activations and routes to the CPU and the sums back.
    pub fn set_cold_experts(&mut self, exec: Box<dyn ColdExperts>) -> Result<(), GraphError> {
        let n_expert = self.config.n_expert;
        let local = self
            .hot
            .layers
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
        self.cold = Some(Box::new(Mutex::new(ColdState { exec, local, error: None, pairs: Vec::new(), stats, began: None })));
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

    /// Run `tokens` through the model after what `seq` holds, in micro-batches of at most
    /// `ubatch` tokens. Returns n_vocab logits per token (`Logits::All`) or for the last one.
    /// Token ids and the context size are checked before any compute.
    pub fn forward(&mut self, seq: &mut Sequence, tokens: &[u32], want: Logits) -> Result<Vec<f32>, GraphError> {
        if seq.model_id != self.model_id {
            return Err(GraphError::ForeignSequence);
        }
        let n_vocab = self.config.n_vocab;
        crate::check_token_ids(tokens, n_vocab)?;
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
        // Step graphs are cached per shape key (which includes the sequence), most recent
        // last, so sequences served in turn keep their decode graphs.
        match self.steps.iter().position(|s| s.key == key) {
            Some(i) => {
                let s = self.steps.remove(i);
                self.steps.push(s);
                self.timings.graphs_reused += 1;
            }
            None => {
                if self.steps.len() >= MAX_CACHED_STEPS {
                    self.steps.remove(0);
                }
                let s = self.build(seq, key, &comps)?;
                self.steps.push(s);
                self.timings.graphs_built += 1;
            }
        }
        let Some(step) = self.steps.last_mut() else { unreachable!("a step was just cached") };
        set_inputs(&step.inputs, p, tokens, &raw, &comps);
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
        unsafe { step.sched.compute(step.graph)? };
        if let Some(cold) = &self.cold {
            let mut st = cold.lock().map_err(|_| GraphError::Cold("the cold expert state is poisoned".into()))?;
            if let Some(e) = st.error.take() {
                // The step's state writes ran: the sequence no longer matches its position.
                return Err(GraphError::Cold(format!("{e}; the sequence must be reset")));
            }
        }
        let rows = if want == Logits::All { n } else { 1 };
        let mut logits = vec![0f32; rows * self.config.n_vocab];
        read_f32(step.out, &mut logits);
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

    fn build(&self, seq: &Sequence, key: StepKey, comps: &[(CompShape, CompPlan)]) -> Result<Step, GraphError> {
        let c = &self.config;
        let n = key.n as i64;
        let graph_size = 256 + c.n_layer * 512;
        let ctx = Context::new_no_alloc(graph_size * 2, graph_size)?;
        let g = Ctx { raw: ctx.as_ptr() };

        let inputs = Inputs {
            tokens: g.input(g.new_i32(&[n]), "tokens"),
            pos: g.input(g.new_i32(&[n]), "pos"),
            neg_pos: g.input(g.new_i32(&[n]), "neg_pos"),
            raw_mask: g.input(g.new_f32(&[c.window as i64 + n, n]), "raw_mask"),
            ring_keep: g.input(g.new_i32(&[c.window as i64]), "ring_keep"),
            comp: comps
                .iter()
                .map(|(s, cp)| {
                    let m = s.ratio;
                    let nw = cp.n_windows as i64;
                    CompInputs {
                        ratio: m,
                        n_windows: cp.n_windows,
                        n_view: cp.n_view,
                        ape_idx: g.input(g.new_i32(&[n]), &format!("ape_idx-{m}")),
                        keep: g.input(g.new_i32(&[s.state_rows() as i64]), &format!("keep-{m}")),
                        vis_mask: g.input(g.new_f32(&[cp.n_view as i64, n]), &format!("vis_mask-{m}")),
                        windows: (nw > 0).then(|| WindowInputs {
                            cur_idx: g.input(g.new_i32(&[m as i64 * nw]), &format!("cur_idx-{m}")),
                            prev_idx: s.overlap.then(|| g.input(g.new_i32(&[m as i64 * nw]), &format!("prev_idx-{m}"))),
                            entry_pos: g.input(g.new_i32(&[nw]), &format!("entry_pos-{m}")),
                            write_idx: g.input(g.new_i32(&[nw]), &format!("write_idx-{m}")),
                        }),
                    }
                })
                .collect(),
        };

        let cold = self.cold.as_deref().map(|m| m as *const Mutex<ColdState>);
        let route_counts = self.route_counts.as_deref().map(|m| m as *const Mutex<Vec<Vec<u64>>>);
        let on_cpu = self.backend.device().kind() == ggml::DeviceKind::Cpu;
        let flash = self.opts.flash_attn.unwrap_or(on_cpu);
        let mut b = Builder {
            g: &g,
            c,
            inp: &inputs,
            effects: Vec::new(),
            cold,
            cold_calls: Vec::new(),
            route_counts,
            route_calls: Vec::new(),
            cpu_nodes: Vec::new(),
            on_cpu,
            flash,
            csa_dense_max_view: self.opts.csa_dense_max_view.unwrap_or(if flash { 16 } else { 4 } * c.indexer_top_k),
            masks: Default::default(),
        };
        let w = &self.weights;
        let hc = c.hc_count as i64;
        let e = c.n_embd as i64;

        // Embedding, copied into every stream.
        let emb = g.name(g.get_rows(w.token_embd, inputs.tokens), "embd");
        // SAFETY: emb belongs to g.
        let mut x = T(unsafe { sys::ggml_repeat_4d(g.raw, g.reshape(emb, &[e, 1, n]).0, e, hc, n, 1) });
        for (il, lw) in w.layers.iter().enumerate() {
            let st = &seq.layers[il];
            let (y, mix) = b.hc_pre(x, &lw.hc_attn, il, "attn");
            let a = b.attention(il, g.mul(g.rms_norm(y, c.rms_eps), lw.attn_norm), lw, st);
            x = b.hc_post(a, x, &mix);
            let (y, mix) = b.hc_pre(x, &lw.hc_ffn, il, "ffn");
            let f = b.moe(il, g.mul(g.rms_norm(y, c.rms_eps), lw.ffn_norm), lw);
            x = g.name(b.hc_post(f, x, &mix), &format!("streams-{il}"));
        }
        let mut h = g.mul(g.rms_norm(b.hc_head(x, &w.hc_head), c.rms_eps), w.output_norm);
        if key.logits == Logits::Last {
            h = g.view_2d(h, e, 1, 0, n - 1);
        }
        let h = g.name(h, "hidden_final");
        let out = g.name(g.mm(w.output, h), "logits");

        let effects = std::mem::take(&mut b.effects);
        let cold_calls = std::mem::take(&mut b.cold_calls);
        let route_calls = std::mem::take(&mut b.route_calls);
        let cpu_nodes = std::mem::take(&mut b.cpu_nodes);
        drop(b);
        // SAFETY: the context has room for a graph of graph_size nodes.
        let graph = unsafe { sys::ggml_new_graph_custom(g.raw, graph_size, false) };
        // SAFETY: out and the effects belong to g; effects go last (they overwrite state the
        // step reads).
        unsafe {
            sys::ggml_set_output(out.0);
            sys::ggml_build_forward_expand(graph, out.0);
            for eff in &effects {
                sys::ggml_build_forward_expand(graph, eff.0);
            }
        }
        #[cfg(debug_assertions)]
        check_matmul_layouts(graph);
        let cpu = self.cpu.as_ref().unwrap_or(&self.backend);
        let backends: Vec<&Backend> = match &self.cpu {
            Some(cpu) => vec![&self.backend, cpu],
            None => vec![&self.backend],
        };
        // SAFETY: the model owns the backends and drops its steps first.
        let mut sched = unsafe { Scheduler::new(&backends, graph_tensor_count(graph) + 64)? };
        // SAFETY: the nodes belong to this graph; both backends are the scheduler's. Inputs
        // live on the model's device (set once per step, no copies per split); custom ops run
        // on the CPU.
        for t in inputs.all() {
            unsafe { sched.pin(t.0, &self.backend) };
        }
        for node in &cpu_nodes {
            unsafe { sched.pin(node.0, cpu) };
        }
        // SAFETY: the graph is live; weights, tables and state are in these backends' buffers.
        unsafe { sched.alloc_graph(graph)? };
        let (nodes, compute_nodes) = graph_node_counts(graph);
        tracing::debug!(n = key.n, nodes, compute_nodes, splits = sched.n_splits(), buffers = ?sched.buffer_sizes(&backends), "step graph allocated");
        Ok(Step { key, graph, inputs, out, sched, _cold_calls: cold_calls, _route_calls: route_calls, _ctx: ctx })
    }
}

/// A builder invariant (checked in debug builds, so by the tests): the float operands of
/// every matrix product have packed rows or an even row stride. ggml's CUDA kernels for float
/// products (`mmf`) assert even strides; the CPU accepts anything, so only this check sees a
/// strided view that would abort on a GPU.
#[cfg(debug_assertions)]
fn check_matmul_layouts(graph: *mut sys::ggml_cgraph) {
    use sys::ggml_op::{GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID};
    // SAFETY: a live graph whose nodes and sources are live tensors.
    unsafe {
        for i in 0..sys::ggml_graph_n_nodes(graph) {
            let t = sys::ggml_graph_node(graph, i);
            if !matches!((*t).op, GGML_OP_MUL_MAT | GGML_OP_MUL_MAT_ID) {
                continue;
            }
            let node = &*t;
            for &src in &node.src[..2] {
                let s = &*src;
                if sys::ggml_is_quantized(s.type_) || s.ne[1] <= 1 {
                    continue;
                }
                let ts = sys::ggml_type_size(s.type_);
                let packed = s.nb[1] == s.ne[0] as usize * ts;
                let name = std::ffi::CStr::from_ptr((*t).name.as_ptr()).to_string_lossy();
                assert!(packed || (s.nb[1] / ts).is_multiple_of(2), "matmul {name}: operand {:?} has row stride {} elements", s.ne, s.nb[1] / ts);
            }
        }
    }
}

/// Nodes plus distinct leafs (inputs, weights, state) of a built graph: the size of the
/// scheduler's tensor table.
fn graph_tensor_count(graph: *mut sys::ggml_cgraph) -> usize {
    // SAFETY: a live graph; nodes and their sources are live tensors.
    unsafe {
        let n = sys::ggml_graph_n_nodes(graph).max(0) as usize;
        let nodes: std::collections::HashSet<*mut sys::ggml_tensor> = (0..n).map(|i| sys::ggml_graph_node(graph, i as i32)).collect();
        let mut leafs = std::collections::HashSet::new();
        for &t in &nodes {
            for &src in (*t).src.iter().filter(|s| !s.is_null()) {
                if !nodes.contains(&src) {
                    leafs.insert(src);
                }
                if !(*src).view_src.is_null() && !nodes.contains(&(*src).view_src) {
                    leafs.insert((*src).view_src);
                }
            }
        }
        n + leafs.len()
    }
}

/// Nodes of a built graph, and those of them that compute (not a view, reshape, permute or
/// transpose): on the CPU each computing node ends with a barrier of all threads.
fn graph_node_counts(graph: *mut sys::ggml_cgraph) -> (usize, usize) {
    use sys::ggml_op::{GGML_OP_NONE, GGML_OP_PERMUTE, GGML_OP_RESHAPE, GGML_OP_TRANSPOSE, GGML_OP_VIEW};
    // SAFETY: a live graph; its nodes are live tensors.
    unsafe {
        let n = sys::ggml_graph_n_nodes(graph).max(0);
        let empty = [GGML_OP_NONE, GGML_OP_RESHAPE, GGML_OP_TRANSPOSE, GGML_OP_VIEW, GGML_OP_PERMUTE];
        let compute = (0..n).filter(|&i| !empty.contains(&(*sys::ggml_graph_node(graph, i)).op)).count();
        (n as usize, compute)
    }
}

fn set_inputs(inp: &Inputs, p: usize, tokens: &[u32], raw: &RawPlan, comps: &[(CompShape, CompPlan)]) {
    let pos: Vec<i32> = (0..tokens.len()).map(|i| (p + i) as i32).collect();
    let neg: Vec<i32> = pos.iter().map(|&q| -q).collect();
    let toks: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    write_i32(inp.tokens, &toks);
    write_i32(inp.pos, &pos);
    write_i32(inp.neg_pos, &neg);
    write_f32(inp.raw_mask, &raw.mask);
    write_i32(inp.ring_keep, &raw.keep);
    for (ci, (_, cp)) in inp.comp.iter().zip(comps) {
        write_i32(ci.ape_idx, &cp.ape_idx);
        if let Some(w) = &ci.windows {
            write_i32(w.cur_idx, &cp.cur_idx);
            if let Some(t) = w.prev_idx {
                write_i32(t, &cp.prev_idx);
            }
            write_i32(w.entry_pos, &cp.entry_pos);
            write_i32(w.write_idx, &cp.write_idx);
        }
        write_i32(ci.keep, &cp.keep);
        write_f32(ci.vis_mask, &cp.vis_mask);
    }
}

fn write_i32(t: T, v: &[i32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    // SAFETY: t is an allocated input of exactly v.len() i32 (built from the same plan).
    unsafe { ggml::backend::tensor_set(t.0, &bytes, 0) };
}

fn write_f32(t: T, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    // SAFETY: as above, f32.
    unsafe { ggml::backend::tensor_set(t.0, &bytes, 0) };
}

fn read_f32(t: T, out: &mut [f32]) {
    // SAFETY: any byte pattern is a valid f32; the view covers exactly `out`, and t is the
    // allocated F32 output of exactly out.len() values (ggml tensors are native-endian).
    let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(out)) };
    // SAFETY: as above.
    unsafe { ggml::backend::tensor_get(t.0, bytes, 0) };
}

fn check_hot(c: &Ds4Config, h: &HotExperts) -> Result<(), GraphError> {
    if h.layers.len() != c.n_layer {
        return Err(GraphError::Option(format!("hot expert placement has {} layers, the model {}", h.layers.len(), c.n_layer)));
    }
    for (l, ids) in h.layers.iter().enumerate() {
        if ids.windows(2).any(|w| w[0] >= w[1]) || ids.iter().any(|&e| e as usize >= c.n_expert) {
            return Err(GraphError::Option(format!("hot experts of layer {l} must be sorted, distinct and below {}: {ids:?}", c.n_expert)));
        }
        // Each token's hot product needs k distinct held experts (cold slots are filled with
        // held experts the token does not use, at weight 0): GPU expert kernels compute one
        // slot per (token, expert) and leave duplicate slots unwritten.
        if !ids.is_empty() && ids.len() < c.n_expert_used {
            return Err(GraphError::Option(format!(
                "layer {l} holds {} experts; a partly held layer needs at least as many as a token uses ({})",
                ids.len(),
                c.n_expert_used
            )));
        }
    }
    Ok(())
}

/// Per layer: None when every expert is held; Some(None) when none is; otherwise the
/// held mask (1/0 per global expert id), in one small buffer.
#[allow(clippy::type_complexity)]
fn subset_tables(c: &Ds4Config, h: &HotExperts, buft: BufferType) -> Result<(Option<(Context, ggml::Buffer)>, Vec<Option<Option<T>>>), GraphError> {
    let partial: Vec<usize> = (0..c.n_layer).filter(|&l| !h.is_all_hot(l, c.n_expert) && !h.layers[l].is_empty()).collect();
    let mut out: Vec<Option<Option<T>>> = (0..c.n_layer).map(|l| if h.is_all_hot(l, c.n_expert) { None } else { Some(None) }).collect();
    if partial.is_empty() {
        return Ok((None, out));
    }
    let ctx = Context::new_no_alloc(partial.len(), 0)?;
    let g = Ctx { raw: ctx.as_ptr() };
    let made: Vec<(usize, T)> = partial.iter().map(|&l| (l, g.new_f32(&[c.n_expert as i64]))).collect();
    let buf = ggml::Buffer::alloc_context_tensors(&ctx, buft)?;
    for &(l, mask) in &made {
        let mut m = vec![0f32; c.n_expert];
        for &e in &h.layers[l] {
            m[e as usize] = 1.0;
        }
        write_f32(mask, &m);
        out[l] = Some(Some(mask));
    }
    Ok((Some((ctx, buf)), out))
}

/// The model's tensors, possibly in several buffers.
pub struct TensorSet(Vec<LoadedTensors>);

impl TensorSet {
    pub fn get(&self, name: &str) -> Option<*mut sys::ggml_tensor> {
        self.0.iter().find_map(|t| t.get(name))
    }
}

/// The CPU device's repacking buffer type, if this ggml build has one.
fn repack_buffer_type(device: Device) -> Option<BufferType> {
    type GetExtra = unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t;
    // SAFETY: registry lookups on a valid device; the entry point, when present, has the
    // signature above and returns a NULL-terminated array.
    unsafe {
        let reg = sys::ggml_backend_dev_backend_reg(device.as_ptr());
        let f = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_backend_dev_get_extra_bufts".as_ptr());
        if f.is_null() {
            return None;
        }
        let f: GetExtra = std::mem::transmute(f);
        let mut p = f(device.as_ptr());
        while !p.is_null() && !(*p).is_null() {
            let name = std::ffi::CStr::from_ptr(sys::ggml_backend_buft_name(*p)).to_string_lossy().into_owned();
            if name == "CPU_REPACK" {
                return Some(BufferType::from_raw(*p));
            }
            p = p.add(1);
        }
        None
    }
}

/// Whether `name` is only ever the weight of a matrix product in the graph (repacked
/// tensors cannot be read back or gathered) and the CPU backend repacks its type and shape:
/// asked through a probe op on a zero-size buffer of that type, as llama.cpp does.
fn repackable(file: &ModelFile, name: &str, device: Device, rb: BufferType) -> bool {
    const MATMUL_2D: [&str; 14] = [
        "attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight", "attn_output_b.weight",
        "attn_compressor_kv.weight", "attn_compressor_gate.weight", "indexer.attn_q_b.weight", "indexer.proj.weight",
        "indexer_compressor_kv.weight", "indexer_compressor_gate.weight", "ffn_gate_inp.weight",
        "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight",
    ];
    const MATMUL_3D: [&str; 4] = ["ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_up_exps.weight"];
    let suffix = name.split_once('.').and_then(|(_, r)| r.split_once('.')).map(|(_, r)| r).unwrap_or("");
    let id = MATMUL_3D.contains(&suffix);
    if !(name == "output.weight" || MATMUL_2D.contains(&suffix) || id) {
        return false;
    }
    let Some(info) = file.tensors.get(name) else { return false };
    let Ok(ctx) = Context::new_no_alloc(4, 0) else { return false };
    let g = Ctx { raw: ctx.as_ptr() };
    let ne: Vec<i64> = info.shape().iter().map(|&d| d as i64).collect();
    // SAFETY: probe tensors in a metadata-only context; the zero-size buffer is freed below
    // and only its type is consulted.
    unsafe {
        let w = sys::ggml_new_tensor(g.raw, info.ty.raw(), ne.len() as i32, ne.as_ptr());
        let buf = sys::ggml_backend_buft_alloc_buffer(rb.as_ptr(), 0);
        if buf.is_null() {
            return false;
        }
        (*w).buffer = buf;
        let op = if id {
            let x = sys::ggml_new_tensor_3d(g.raw, sys::ggml_type::GGML_TYPE_F32, ne[0], 2, 1);
            let ids = sys::ggml_new_tensor_2d(g.raw, sys::ggml_type::GGML_TYPE_I32, 2, 1);
            sys::ggml_mul_mat_id(g.raw, w, x, ids)
        } else {
            let x = sys::ggml_new_tensor_2d(g.raw, sys::ggml_type::GGML_TYPE_F32, ne[0], 1);
            sys::ggml_mul_mat(g.raw, w, x)
        };
        let ok = ne.len() == if id { 3 } else { 2 } && sys::ggml_backend_dev_supports_op(device.as_ptr(), op);
        (*w).buffer = std::ptr::null_mut();
        sys::ggml_backend_buffer_free(buf);
        ok
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
