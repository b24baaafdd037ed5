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
//! the last pair's expert, ignored). ggml's CPU `mul_mat_id` computes each row on its own
//! (one dot product per output value, split over threads by output values), so a row's result
//! does not depend on `P`, on the other rows or on the thread count.
//!
//! Several threads can share one eval ([`ExpertWorker::eval_part`]): the pairs are split by
//! expert ([`split_pairs`]), and each part runs on a lane of its own (a one-thread CPU backend
//! with its own graphs). The daemon's in-process executor uses this from the threads of the
//! model graph's own op, whose OpenMP team would otherwise run a nested compute on one thread.
//!
//! Memory: a graph is allocated once, when built, by the allocator of its shape (FFN width,
//! fused or not, rows) in its lane; graphs of one shape (the same bucket in different layers)
//! share that compute buffer, which is safe because a lane runs one eval at a time and equal
//! shapes get equal plans. ggml's allocator does not notice that an already allocated graph went stale when
//! its buffer was re-planned for a graph of another shape, hence one allocator per shape.

use std::collections::HashMap;
use std::sync::Mutex;
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

/// One thread's compute state: a CPU backend, the graphs it built (one per (layer, row
/// bucket)), their allocators, and the staging of inputs and outputs.
struct Lane {
    backend: Backend,
    graphs: HashMap<(u32, usize), CachedGraph>,
    allocators: HashMap<ShapeKey, Allocator>,
    x_host: Vec<f32>,
    ids_host: Vec<i32>,
    out_host: Vec<f32>,
}

/// How many lanes [`ExpertWorker::eval_part`] can use at most (parts beyond it get no work).
pub const MAX_PARTS: usize = 64;

/// A moe-expert worker's experts and compute state. Evals may run from several threads at
/// once ([`ExpertWorker::eval_part`]), each on its own lane.
pub struct ExpertWorker {
    n_embd: usize,
    n_expert: u32,
    layers: Vec<LayerExperts>,
    experts: ExpertSet,
    buft: ggml::BufferType,
    /// The lane of [`eval`](Self::eval), whose backend runs `threads` threads.
    main: Mutex<Lane>,
    /// One-thread lanes of [`eval_part`](Self::eval_part), made on first use.
    parts: Vec<Mutex<Option<Lane>>>,
    weight_bytes: u64,
    // Dropped last: the graphs reference their tensors (one set per layer with experts).
    _tensors: Vec<TensorSet>,
}

// SAFETY: every raw pointer (tensors, graphs, allocators, backends) is owned by this value.
// Shared use (`&self`) reads only the layer tables and the weight tensors, which nothing
// writes after `load`; each lane's graphs, allocators and backend are used only under its
// mutex. ggml keeps no thread affinity for any of them.
unsafe impl Send for ExpertWorker {}
unsafe impl Sync for ExpertWorker {}

impl Lane {
    fn new(threads: usize) -> Result<Lane> {
        Ok(Lane {
            backend: Backend::cpu(threads.max(1))?,
            graphs: HashMap::new(),
            allocators: HashMap::new(),
            x_host: Vec::new(),
            ids_host: Vec::new(),
            out_host: Vec::new(),
        })
    }

    /// Computes `n` rows of layer `at`: row `p` (the `p`-th item of `rows_in`) is the expert
    /// of local index `id` on `x`; `put(p, row)` receives each output row. Rows are padded to
    /// a power of two by repeating the last row's expert (on zero input), so that the padding
    /// reads no other expert's weights.
    fn eval(&mut self, at: LayerAt, rows_in: &mut dyn Iterator<Item = (&[f32], i32)>, n: usize, put: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let (layer, n_embd) = (at.layer, at.n_embd);
        let rows = n.next_power_of_two();
        if !self.graphs.contains_key(&(layer, rows)) {
            self.build(at, rows)?;
        }
        self.x_host.clear();
        self.x_host.resize(rows * n_embd, 0.0);
        self.ids_host.clear();
        self.ids_host.resize(rows, 0);
        for (p, (x, id)) in rows_in.take(n).enumerate() {
            self.x_host[p * n_embd..(p + 1) * n_embd].copy_from_slice(x);
            self.ids_host[p] = id;
        }
        let last = self.ids_host[n - 1];
        self.ids_host[n..].fill(last);
        let g = self.graphs.get(&(layer, rows)).ok_or(WorkerError::GraphAlloc { what: "find the cached graph" })?;
        // x and ids were allocated (at build) with exactly rows * n_embd f32 and rows i32.
        g.x.write_f32(&self.x_host);
        g.ids.write_i32(&self.ids_host);
        // SAFETY: every tensor of the graph lives in CPU buffers (weights, compute buffer).
        unsafe { self.backend.compute(g.graph.as_ptr())? };
        // The first n rows of the output [n_embd, 1, rows] (allocated with rows ≥ n).
        self.out_host.resize(n * n_embd, 0.0);
        g.out.read_f32(&mut self.out_host);
        for (p, row) in self.out_host.chunks_exact(n_embd).enumerate() {
            put(p, row);
        }
        Ok(())
    }

    /// Builds the graph of (layer, rows), allocates it with its shape's allocator and caches
    /// it. Should the allocator's buffer have changed, the other graphs of that shape are
    /// dropped (rebuilt on next use).
    fn build(&mut self, at: LayerAt, rows: usize) -> Result<()> {
        let (layer, buft) = (at.layer, at.buft);
        let g = build_graph(at.le, at.n_embd, rows)?;
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
}

/// What a lane needs to know of the layer it computes.
#[derive(Clone, Copy)]
struct LayerAt<'a> {
    layer: u32,
    le: &'a LayerExperts,
    n_embd: usize,
    buft: ggml::BufferType,
}

fn build_graph(le: &LayerExperts, n_embd: usize, rows: usize) -> Result<CachedGraph> {
    let ffn = le.ffn.ok_or(WorkerError::GraphAlloc { what: "build a graph for a layer without experts" })?;
    let ctx = Context::new_no_alloc(24, 32)?;
    let g = Ctx { raw: ctx.as_ptr() };
    let (e, r) = (n_embd as i64, rows as i64);
    let x = g.input(g.new_f32(&[e, 1, r]), "x");
    let ids = g.input(g.new_i32(&[1, r]), "ids");
    // MXFP4 experts in the plain layout through dflash's product (ggml's bits), as the model's
    // own on a CPU (`graph::expert_ffn`)
    let out = g.output(ffn.forward_host(&g, x, ids, &mut Vec::new())); // [n_embd, 1, r]
    let graph = g.new_graph(32);
    graph.expand(out);
    let shape = (ffn.n_ff, matches!(ffn.up_gate, UpGate::Fused(_)), rows);
    Ok(CachedGraph { graph, shape, x, ids, out, _ctx: ctx })
}

/// The pairs of one eval split into parts for [`ExpertWorker::eval_part`].
pub struct PairSplit {
    /// Parts, at most [`MAX_PARTS`].
    pub parts: usize,
    /// Each pair's part ([`split_pairs`]).
    pub owner: Vec<usize>,
}

impl PairSplit {
    /// `ids` (the pairs' experts, in pair order) over `parts` parts (at least 1, at most
    /// [`MAX_PARTS`]).
    pub fn new(ids: &[u32], parts: usize) -> PairSplit {
        let parts = parts.clamp(1, MAX_PARTS);
        PairSplit { parts, owner: split_pairs(ids, parts) }
    }
}

/// Splits the pairs of an eval into `parts` parts, whole experts to a part (so that each
/// expert's rows are computed together, as in one eval of them all, and its weights are
/// read once): experts by falling cost (an expert's weights cost about as much to read as
/// four of its rows to compute), each to the part with the least cost so far, ties to the
/// lowest expert id and part. Returns each pair's part. Deterministic in `ids` and `parts`.
pub fn split_pairs(ids: &[u32], parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    let mut by_expert: Vec<(u32, usize)> = Vec::new(); // (expert, rows), expert ascending
    let mut sorted: Vec<u32> = ids.to_vec();
    sorted.sort_unstable();
    for e in sorted {
        match by_expert.last_mut() {
            Some((last, n)) if *last == e => *n += 1,
            _ => by_expert.push((e, 1)),
        }
    }
    const READ_COST_ROWS: usize = 4;
    by_expert.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut load = vec![0usize; parts];
    let mut part_of = std::collections::HashMap::with_capacity(by_expert.len());
    for (e, n) in by_expert {
        let (p, _) = load.iter().enumerate().min_by_key(|&(i, &l)| (l, i)).unwrap_or((0, &0));
        load[p] += READ_COST_ROWS + n;
        part_of.insert(e, p);
    }
    ids.iter().map(|e| part_of[e]).collect()
}


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
        Ok(ExpertWorker {
            n_embd: c.n_embd,
            n_expert,
            layers,
            experts: experts.clone(),
            buft: device.buffer_type(),
            main: Mutex::new(Lane::new(threads)?),
            parts: (0..MAX_PARTS).map(|_| Mutex::new(None)).collect(),
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

    /// Graphs built so far by [`eval`](Self::eval) (one per (layer, row bucket) used).
    pub fn cached_graphs(&self) -> usize {
        self.main.lock().map(|l| l.graphs.len()).unwrap_or(0)
    }

    fn at<'a>(&self, layer: u32, le: &'a LayerExperts) -> LayerAt<'a> {
        LayerAt { layer, le, n_embd: self.n_embd, buft: self.buft }
    }

    /// Checks an eval's arguments: buffer sizes, the layer, each pair's expert owned here.
    fn check(&self, layer: u32, input: &[f32], pairs: &ExpertPairs, output_rows: Option<usize>) -> Result<&LayerExperts> {
        let n_embd = self.n_embd;
        let (n_tokens, n_pairs) = (pairs.n_tokens(), pairs.n_pairs());
        let mut bufs = vec![("input rows", input.len(), n_tokens)];
        bufs.extend(output_rows.map(|o| ("output rows", o, n_pairs)));
        for (what, buf, rows) in bufs {
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
        Ok(le)
    }

    /// For each (token, expert) pair `p` of `pairs` (global expert ids, all owned by this
    /// worker), writes row `p` of `output` (`n_embd` f32): the expert on its token's row of
    /// `input` (row `t` for token `t`).
    pub fn eval(&self, layer: u32, input: &[f32], pairs: &ExpertPairs, output: &mut [f32]) -> Result<EvalTimings> {
        let n_embd = self.n_embd;
        let le = self.check(layer, input, pairs, Some(output.len()))?;
        let n_pairs = pairs.n_pairs();
        if n_pairs == 0 {
            return Ok(EvalTimings::default());
        }
        let mut lane = self.main.lock().map_err(|_| WorkerError::LanePoisoned { lane: "the eval's" })?;
        let rows = n_pairs.next_power_of_two();
        let t0 = Instant::now();
        if !lane.graphs.contains_key(&(layer, rows)) {
            lane.build(self.at(layer, le), rows)?;
        }
        let t1 = Instant::now();
        self.eval_on(&mut lane, layer, le, input, pairs, &mut |p, row| output[p * n_embd..(p + 1) * n_embd].copy_from_slice(row))?;
        Ok(EvalTimings { rows, build_s: (t1 - t0).as_secs_f64(), compute_s: t1.elapsed().as_secs_f64() })
    }

    /// Every pair of `pairs` on `lane`, row `p` handed to `put(p, row)`.
    fn eval_on(&self, lane: &mut Lane, layer: u32, le: &LayerExperts, input: &[f32], pairs: &ExpertPairs, put: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        let n_embd = self.n_embd;
        let mut rows_in = pairs.tokens().enumerate().flat_map(|(t, ids)| {
            let x = &input[t * n_embd..(t + 1) * n_embd];
            ids.iter().map(move |&e| (x, le.local[e as usize] as i32))
        });
        lane.eval(self.at(layer, le), &mut rows_in, pairs.n_pairs(), put)
    }

    /// Part `part` of `split` of [`eval`](Self::eval), on a lane of one thread of its own
    /// (one part: on the eval's lane and its threads), so that the split's threads (the
    /// graph's own, in a custom op) share an eval: the pairs whose part is `part`, each row
    /// `p` handed to `put(p, row)`. Every pair's row is the same bits as
    /// [`eval`](Self::eval)'s: an expert's rows are computed together in either, each output
    /// value one dot product. `split` is made once for all the parts ([`PairSplit::new`]).
    pub fn eval_part(&self, layer: u32, input: &[f32], pairs: &ExpertPairs, split: &PairSplit, part: usize, put: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        let n_embd = self.n_embd;
        let le = self.check(layer, input, pairs, None)?;
        let parts = split.parts;
        if part >= parts {
            return Ok(());
        }
        if split.owner.len() != pairs.n_pairs() {
            return Err(WorkerError::Mismatch { what: "pairs of the split (eval)", expected: pairs.n_pairs() as u64, found: split.owner.len() as u64 });
        }
        if parts == 1 {
            // One part: all the pairs on the eval's lane, whose backend has a team of its own
            // (`threads`); the caller is then not inside another team's parallel region.
            let mut lane = self.main.lock().map_err(|_| WorkerError::LanePoisoned { lane: "the eval's" })?;
            return self.eval_on(&mut lane, layer, le, input, pairs, put);
        }
        let owner = &split.owner;
        let n = owner.iter().filter(|&&o| o == part).count();
        if n == 0 {
            return Ok(());
        }
        let mut slot = self.parts[part].lock().map_err(|_| WorkerError::LanePoisoned { lane: "a part's" })?;
        if slot.is_none() {
            *slot = Some(Lane::new(1)?);
        }
        let Some(lane) = slot.as_mut() else { return Ok(()) };
        // (pair index, token) of this part's pairs, in pair order
        let mine: Vec<(usize, usize)> =
            pairs.tokens().enumerate().flat_map(|(t, ids)| ids.iter().map(move |_| t)).enumerate().filter(|&(p, _)| owner[p] == part).collect();
        let ids = pairs.ids();
        let mut rows_in = mine.iter().map(|&(p, t)| (&input[t * n_embd..(t + 1) * n_embd], le.local[ids[p] as usize] as i32));
        lane.eval(self.at(layer, le), &mut rows_in, n, &mut |i, row| put(mine[i].0, row))
    }
}
