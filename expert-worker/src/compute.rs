//! [`ExpertWorker`]: a subset of the routed experts in CPU memory, each (token, expert)
//! pair's output computed with ggml's CPU backend.
//!
//! Per layer the worker holds only its experts' slices of `blk.L.ffn_{gate,up,down}_exps`
//! (or of the fused `blk.L.ffn_gate_up_exps`), slice `i` being the layer's `i`-th owned
//! expert in ascending id order, in the buffer type the model uses for its own experts
//! ([`graph::expert_ffn::expert_buffer_type`]). An eval flattens the (token, expert) pairs of
//! the batch into `P` rows: row `p` is the input of its token, its id the expert's local
//! index; one small graph per (layer, bucket of `P`) computes
//! `down · (silu(min(gate·x, c)) ⊙ clamp(up·x, −c, c))` with `mul_mat_id` for every row
//! (`c` = `swiglu_clamp_exp[layer]`, no clamp when `c <= 0`) — built by
//! [`graph::expert_ffn`], the builder of the model's own experts — and row `p` of the
//! result is pair `p`'s output. The router weights are not applied here: the model weighs
//! and sums every slot of a token in one place, whichever process computed it. Graphs are
//! built on first use and kept; `P` is rounded up to a power of two (extra rows: zero input,
//! local expert 0, ignored). ggml's CPU `mul_mat_id` computes each row on its own (one dot
//! product per output value, split over threads by output values), so a row's result does
//! not depend on `P`, on the other rows or on the thread count.
//!
//! Memory: a graph is allocated once, when built, by the allocator of its shape (FFN width,
//! fused or not, rows); graphs of one shape (the same bucket in different layers) share that
//! compute buffer, which is safe because evals run one at a time and equal shapes get equal
//! plans. ggml's allocator does not notice that an already allocated graph went stale when
//! its buffer was re-planned for a graph of another shape, hence one allocator per shape.

use std::collections::HashMap;
use std::time::Instant;

use experts::{ExpertPairs, ExpertSet};
use ggml::{Backend, Context, Device, GraphAllocator};
use graph::TensorSet;
use graph::expert_ffn::{ExpertFfn, UpGate};
use graph::ops::{Ctx, Graph, T};
use loader::{ExpertPart, ModelFile, ReadOptions, TensorRequest};

use crate::error::{Result, WorkerError};

struct LayerExperts {
    /// Global id -> local slice index, `u32::MAX` when not owned.
    local: Vec<u32>,
    /// `None` when the worker owns no expert of this layer.
    ffn: Option<ExpertFfn>,
}

/// One reusable graph: inputs `x` [n_embd, 1, rows] F32 and `ids` [1, rows] I32, output
/// [n_embd, 1, rows].
struct CachedGraph {
    graph: Graph,
    shape: ShapeKey,
    x: T,
    ids: T,
    out: T,
    _ctx: Context,
}

/// What fixes a graph's tensor sizes: (FFN width, fused gate/up, rows).
type ShapeKey = (i64, bool, usize);

/// A graph allocator and the size of its buffer after the last allocation.
struct Allocator {
    galloc: GraphAllocator,
    bytes: usize,
}

/// Time spent in one [`ExpertWorker::eval`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalTimings {
    /// Rows computed (pairs rounded up to the bucket).
    pub rows: usize,
    /// Graph build (first use of a (layer, bucket) only), seconds.
    pub build_s: f64,
    /// Gathering inputs, ggml compute and copying out the pairs' rows, seconds.
    pub compute_s: f64,
}

/// How far [`ExpertWorker::load_reporting`] got: bytes of expert weights read so far of all
/// it loads; `layer_done` names the layer whose experts were just loaded completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadStep {
    pub loaded: u64,
    pub total: u64,
    pub layer_done: Option<u32>,
}

/// A moe-expert worker's experts and compute state. Not `Sync`: one eval at a time.
pub struct ExpertWorker {
    n_embd: usize,
    n_expert: u32,
    layers: Vec<LayerExperts>,
    experts: ExpertSet,
    backend: Backend,
    buft: ggml::BufferType,
    graphs: HashMap<(u32, usize), CachedGraph>,
    allocators: HashMap<ShapeKey, Allocator>,
    x_host: Vec<f32>,
    ids_host: Vec<i32>,
    weight_bytes: u64,
    // Dropped last: the graphs reference their tensors (one set per layer with experts).
    _tensors: Vec<TensorSet>,
}

// SAFETY: every raw pointer (tensors, graphs, allocator) is owned by this value and only used
// through `&mut self`; ggml keeps no thread affinity for them.
unsafe impl Send for ExpertWorker {}


/// Bytes of one expert of each layer (gate + up + down slices, or fused gate_up + down).
pub fn expert_bytes_per_layer(model: &ModelFile) -> Result<Vec<u64>> {
    (0..model.config.n_layer as u32)
        .map(|l| {
            let slice = |p: ExpertPart| -> Result<u64> {
                let t = model.tensors.expect(&p.name(l as usize))?;
                Ok(t.slice_bytes(t.shape().len() - 1))
            };
            let gu = match model.tensors.get(&ExpertPart::GateUp.name(l as usize)) {
                Some(_) => slice(ExpertPart::GateUp)?,
                None => slice(ExpertPart::Gate)? + slice(ExpertPart::Up)?,
            };
            Ok(gu + slice(ExpertPart::Down)?)
        })
        .collect()
}

impl ExpertWorker {
    /// Loads the experts of `experts` (per layer the owned ids) from `model` into CPU
    /// memory with positioned reads of just those slices — through the model's own
    /// [`graph::load_weights`], so in the same (repacked where ggml has a layout for the type)
    /// buffer type as the model's held experts — and starts a CPU backend with `threads`
    /// threads.
    pub fn load(model: &ModelFile, experts: &ExpertSet, threads: usize) -> Result<Self> {
        Self::load_reporting(model, experts, threads, &mut |_| {})
    }

    /// [`load`](Self::load), one layer after the other, calling `on_progress` on this thread
    /// as the bytes read grow and after each layer.
    pub fn load_reporting(model: &ModelFile, experts: &ExpertSet, threads: usize, on_progress: &mut dyn FnMut(LoadStep)) -> Result<Self> {
        let c = &model.config;
        let (n_layer, n_expert) = (c.n_layer as u32, c.n_expert as u32);
        if experts.n_layer() != n_layer || experts.n_expert() != n_expert {
            return Err(WorkerError::Mismatch {
                what: "expert map layers x experts (model)",
                expected: u64::from(n_layer) * u64::from(n_expert),
                found: u64::from(experts.n_layer()) * u64::from(experts.n_expert()),
            });
        }
        // Per layer the slices of its expert tensors, and the bytes they hold.
        let mut requests: Vec<(u32, Vec<TensorRequest>, u64)> = Vec::new();
        for l in 0..n_layer {
            let ids = experts.layer(l).to_vec();
            if ids.is_empty() {
                continue;
            }
            let fused = ExpertPart::GateUp.name(l as usize);
            let parts = if model.tensors.get(&fused).is_some() { [ExpertPart::GateUp].as_slice() } else { &[ExpertPart::Gate, ExpertPart::Up] };
            let mut layer = Vec::new();
            let mut bytes = 0;
            for p in parts.iter().chain([&ExpertPart::Down]) {
                let t = model.tensors.expect(&p.name(l as usize))?;
                bytes += t.slice_bytes(t.shape().len() - 1) * ids.len() as u64;
                layer.push(TensorRequest::experts(p.name(l as usize), ids.clone()));
            }
            requests.push((l, layer, bytes));
        }
        let total: u64 = requests.iter().map(|r| r.2).sum();
        let device = Device::cpu()?;
        let t0 = Instant::now();
        let opts = ReadOptions { threads: threads.clamp(1, 8), progress: false, mode: loader::ReadMode::Pread, ..ReadOptions::default() };
        let mut tensors = Vec::with_capacity(requests.len());
        let mut done = 0;
        on_progress(LoadStep { loaded: 0, total, layer_done: None });
        for (layer, reqs, bytes) in requests {
            let mut report = |read: u64| on_progress(LoadStep { loaded: done + read.min(bytes), total, layer_done: None });
            tensors.push(graph::load_weights_reporting(model, reqs, device, true, &opts, &mut report)?);
            done += bytes;
            on_progress(LoadStep { loaded: done, total, layer_done: Some(layer) });
        }
        let weight_bytes = tensors.iter().map(TensorSet::bytes).sum();
        tracing::info!(experts = experts.len(), bytes = weight_bytes, seconds = t0.elapsed().as_secs_f64(), "experts loaded");

        let mut layers = Vec::with_capacity(n_layer as usize);
        for l in 0..n_layer {
            let mut local = vec![u32::MAX; n_expert as usize];
            for (i, &e) in experts.layer(l).iter().enumerate() {
                local[e as usize] = i as u32;
            }
            let get = |n: &str| tensors.iter().find_map(|t| t.get(n));
            // Layers without owned experts have none of their tensors loaded.
            let ffn = if experts.layer(l).is_empty() {
                None
            } else {
                let (l, ff, clamp) = (l as usize, c.n_ff_exp[l as usize], c.swiglu_clamp_exp[l as usize]);
                Some(ExpertFfn::lookup(l, ff, clamp, get).map_err(|m| loader::LoadError::MissingTensor { name: m.0 })?)
            };
            layers.push(LayerExperts { local, ffn });
        }
        let backend = Backend::cpu(threads.max(1))?;
        Ok(ExpertWorker {
            n_embd: c.n_embd,
            n_expert,
            layers,
            experts: experts.clone(),
            backend,
            buft: device.buffer_type(),
            graphs: HashMap::new(),
            allocators: HashMap::new(),
            x_host: Vec::new(),
            ids_host: Vec::new(),
            weight_bytes,
            _tensors: tensors,
        })
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    pub fn n_layer(&self) -> u32 {
        self.layers.len() as u32
    }

    pub fn n_expert(&self) -> u32 {
        self.n_expert
    }

    /// The experts this worker owns.
    pub fn experts(&self) -> &ExpertSet {
        &self.experts
    }

    /// Bytes of expert weights held in memory.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Graphs built so far (one per (layer, row bucket) used).
    pub fn cached_graphs(&self) -> usize {
        self.graphs.len()
    }

    /// For each (token, expert) pair `p` of `pairs` (global expert ids, all owned by this
    /// worker), writes row `p` of `output` (`n_embd` f32): the expert on its token's row of
    /// `input` (row `t` for token `t`).
    pub fn eval(&mut self, layer: u32, input: &[f32], pairs: &ExpertPairs, output: &mut [f32]) -> Result<EvalTimings> {
        let n_embd = self.n_embd;
        let (n_tokens, n_pairs) = (pairs.n_tokens(), pairs.n_pairs());
        for (what, buf, rows) in [("input rows", input.len(), n_tokens), ("output rows", output.len(), n_pairs)] {
            if buf != rows * n_embd {
                return Err(WorkerError::BufferLength { what, expected: rows * n_embd, found: buf });
            }
        }
        let n_layer = self.n_layer();
        let le = self.layers.get(layer as usize).ok_or(WorkerError::LayerOutOfRange { layer, n_layer })?;
        for &e in pairs.ids() {
            if e >= self.n_expert {
                return Err(WorkerError::ExpertOutOfRange { layer, expert: e, n_expert: self.n_expert });
            }
            if le.local[e as usize] == u32::MAX {
                return Err(WorkerError::NotOwned { layer, expert: e });
            }
        }
        if n_pairs == 0 {
            return Ok(EvalTimings::default());
        }
        let rows = n_pairs.next_power_of_two();
        let t0 = Instant::now();
        if !self.graphs.contains_key(&(layer, rows)) {
            self.build(layer, rows)?;
        }
        let t1 = Instant::now();
        let le = &self.layers[layer as usize];
        self.x_host.clear();
        self.x_host.resize(rows * n_embd, 0.0);
        self.ids_host.clear();
        self.ids_host.resize(rows, 0);
        let mut p = 0;
        for (t, ids) in pairs.tokens().enumerate() {
            for &e in ids {
                self.x_host[p * n_embd..(p + 1) * n_embd].copy_from_slice(&input[t * n_embd..(t + 1) * n_embd]);
                self.ids_host[p] = le.local[e as usize] as i32;
                p += 1;
            }
        }
        // the padding rows repeat the last pair's expert, so that they read no other expert
        if let Some(&last) = self.ids_host[..n_pairs].last() {
            self.ids_host[n_pairs..].fill(last);
        }
        let g = self.graphs.get(&(layer, rows)).ok_or(WorkerError::GraphAlloc { what: "find the cached graph" })?;
        // x and ids were allocated (at build) with exactly rows * n_embd f32 and rows i32.
        g.x.write_f32(&self.x_host);
        g.ids.write_i32(&self.ids_host);
        // SAFETY: every tensor of the graph lives in CPU buffers (weights, compute buffer).
        unsafe { self.backend.compute(g.graph.as_ptr())? };
        // The first n_pairs rows of the output [n_embd, 1, rows] (allocated with rows ≥ n_pairs).
        g.out.read_f32(output);
        Ok(EvalTimings { rows, build_s: (t1 - t0).as_secs_f64(), compute_s: t1.elapsed().as_secs_f64() })
    }

    /// Builds the graph of (layer, rows), allocates it with its shape's allocator and caches
    /// it. Should the allocator's buffer have changed, the other graphs of that shape are
    /// dropped (rebuilt on next use).
    fn build(&mut self, layer: u32, rows: usize) -> Result<()> {
        let g = self.build_graph(layer, rows)?;
        let buft = self.buft;
        let a = match self.allocators.entry(g.shape) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let galloc = GraphAllocator::new(buft).map_err(|_| WorkerError::GraphAlloc { what: "create a graph allocator" })?;
                v.insert(Allocator { galloc, bytes: 0 })
            }
        };
        // SAFETY: the graph is live; its weights are in CPU buffers.
        if unsafe { a.galloc.alloc_graph(g.graph.as_ptr()) }.is_err() {
            return Err(WorkerError::GraphAlloc { what: "allocate the compute buffer" });
        }
        let bytes = a.galloc.buffer_size();
        if bytes != a.bytes {
            a.bytes = bytes;
            let shape = g.shape;
            self.graphs.retain(|_, other| other.shape != shape);
        }
        self.graphs.insert((layer, rows), g);
        Ok(())
    }

    fn build_graph(&self, layer: u32, rows: usize) -> Result<CachedGraph> {
        let le = &self.layers[layer as usize];
        let ffn = le.ffn.ok_or(WorkerError::GraphAlloc { what: "build a graph for a layer without experts" })?;
        let ctx = Context::new_no_alloc(24, 32)?;
        let g = Ctx { raw: ctx.as_ptr() };
        let (e, r) = (self.n_embd as i64, rows as i64);
        let x = g.input(g.new_f32(&[e, 1, r]), "x");
        let ids = g.input(g.new_i32(&[1, r]), "ids");
        let out = g.output(ffn.forward(&g, x, ids)); // [n_embd, 1, r]
        let graph = g.new_graph(32);
        graph.expand(out);
        let shape = (ffn.n_ff, matches!(ffn.up_gate, UpGate::Fused(_)), rows);
        Ok(CachedGraph { graph, shape, x, ids, out, _ctx: ctx })
    }
}
