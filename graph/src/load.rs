//! Loading: which tensors this backend holds (every expert, or the hot subset of each
//! layer), the buffer each goes to (the CPU's repacked layout for matrices it has one for:
//! [`load_weights`], which the cold executors use for their experts too), the held-expert
//! tables, and the weights looked up once.
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use experts::ExpertSet;
use ggml::{Backend, BufferType, Context, Device};
use loader::{Ds4Config, ExpertPart, ModelFile, ReadOptions, TensorRequest};

use crate::offload::ColdHost;
use crate::stream::ColdStream;
use crate::model::{Model, ModelOptions, StepTimings, NEXT_SEQ_ID};
use crate::ops::{self, Ctx, T};
use crate::steps::StepCache;
use crate::weights::{validate_tid2eid, TensorSet, Weights};
use crate::GraphError;

impl Model {
    pub fn load(path: impl AsRef<Path>, opts: ModelOptions) -> Result<Model, GraphError> {
        Model::from_file(ModelFile::open(path)?, opts)
    }

    /// Load the weights of an already opened (validated) file.
    pub fn from_file(file: ModelFile, opts: ModelOptions) -> Result<Model, GraphError> {
        if opts.ubatch == 0 {
            return Err(GraphError::Option("ubatch must be at least 1".into()));
        }
        if opts.adaptive.is_some() && (opts.cold_offload_min > 0 || opts.cold_layers_in_graph) {
            return Err(GraphError::Option("an adaptive placement moves experts between hot and cold; the pinned host copy of the cold experts (cold offload, cold layers in the graph) is fixed at load".into()));
        }
        // A token's slots over PCIe: at most the k it is routed to, in steps of at least one token.
        if opts.cold_pcie_slots > file.config.n_expert_used {
            return Err(GraphError::Option(format!(
                "{} router slots over PCIe is more than the {} experts a token is routed to",
                opts.cold_pcie_slots, file.config.n_expert_used
            )));
        }
        if opts.cold_pcie_slots > 0 && opts.cold_pcie_max_tokens == 0 {
            return Err(GraphError::Option("router slots over PCIe need micro-batches of at least 1 token to split (cold_pcie_max_tokens 0)".into()));
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
            None => ExpertSet::full(config.n_layer as u32, config.n_expert as u32),
        };
        // The layer of a routed-expert tensor of which this backend holds only some experts.
        let partial = |name: &str| -> Option<usize> {
            let (l, _) = ExpertPart::parse(name)?;
            (l < config.n_layer && !hot.is_full_layer(l as u32)).then_some(l)
        };
        let mut requests = Vec::new();
        for t in file.tensors.iter().filter(|t| !file.tensors.unused.contains(&t.name)) {
            match partial(&t.name) {
                None => requests.push(TensorRequest::whole(t.name.clone())),
                Some(l) if hot.layer(l as u32).is_empty() => {}
                Some(l) => requests.push(TensorRequest::experts(t.name.clone(), hot.layer(l as u32).to_vec())),
            }
        }
        let tensors = load_weights(&file, requests, device, opts.repack, &opts.read)?;
        let wanted = opts.cold_offload_min > 0 || opts.cold_layers_in_graph;
        let min = if opts.cold_offload_min == 0 { usize::MAX } else { opts.cold_offload_min };
        let mut cold_host = match (wanted, device.kind(), device.host_buffer_type()) {
            (true, ggml::DeviceKind::Cpu, _) if opts.cold_host_on_cpu => ColdHost::load(&file, &hot, buft, buft, min, opts.cold_layers_in_graph, &opts.read)?,
            (false, _, _) | (_, ggml::DeviceKind::Cpu, _) => None,
            (true, _, Some(host)) => ColdHost::load(&file, &hot, host, buft, min, opts.cold_layers_in_graph, &opts.read)?,
            (_, _, None) => {
                tracing::warn!(device = %device.name(), "the device has no pinned host buffer type: cold experts stay with the executor for every batch");
                None
            }
        };
        if let Some(h) = cold_host.as_mut().filter(|_| !opts.cold_cpu_ggml_kernel) {
            h.own_kernel_below = crate::offload::op_offload_min_batch();
        }
        let cold_stream = match &cold_host {
            Some(h) if opts.cold_stream_min > 0 => ColdStream::new(device, buft, h, opts.cold_stream_min, opts.cold_stream_keep_free)?,
            _ => None,
        };
        let pcie = match &cold_host {
            Some(h) if opts.cold_pcie_slots > 0 => crate::pcie::PcieSplit::new(device, buft, h, opts.cold_pcie_slots, opts.cold_pcie_max_tokens, config.n_expert_used, !opts.cold_cpu_ggml_kernel, opts.cold_pcie_partial_cpu)?,
            None if opts.cold_pcie_slots > 0 => {
                tracing::warn!("router slots over PCIe need layers whose experts are all cold in the graph of a GPU model; nothing is split");
                None
            }
            _ => None,
        };
        let (tables, subsets) = subset_tables(&config, &hot, buft)?;
        let weights = Weights::lookup(&config, &tensors, &subsets)?;
        validate_tid2eid(&config, &weights)?;
        let model_id = NEXT_SEQ_ID.fetch_add(1, Ordering::Relaxed);
        let counting = opts.route_stats_out.is_some() || opts.adaptive.is_some();
        let route_counts = counting.then(|| Box::new(Mutex::new(vec![vec![0u64; config.n_expert]; config.n_layer])));
        let adaptive = opts.adaptive.map(|p| crate::adaptive::Adaptive::new(p, config.n_layer, config.n_expert));
        Ok(Model {
            config,
            file,
            opts,
            weights,
            steps: StepCache::default(),
            input_staging: crate::steps::InputStaging::new(backend.device().host_buffer_type()),
            backend,
            cpu,
            buft,
            model_id,
            timings: StepTimings::default(),
            hot,
            cold: None,
            cold_stream,
            pcie,
            cold_host,
            route_counts,
            adaptive,
            swaps: Default::default(),
            op_profile: None,
            _tables: tables,
            _tensors: tensors,
        })
    }
}

/// Loads `requests` of `file` for `device`: on the CPU with `repack`, every matrix ggml's CPU
/// backend has a repacked (interleaved) layout for into its CPU_REPACK buffer — whole tensors
/// and routed-expert subsets alike, each set at once, the decision taken on the file's tensor
/// type and shape ([`repackable`]), not on the subset — and the rest into the device's own
/// buffer. The model's weights and every cold executor's experts
/// (`expert_worker::ExpertWorker`) are loaded by this one function, so an expert has the
/// same layout, and its products the same kernel, wherever it is placed.
pub fn load_weights(file: &ModelFile, requests: Vec<TensorRequest>, device: Device, repack: bool, read: &ReadOptions) -> Result<TensorSet, GraphError> {
    load_weights_reporting(file, requests, device, repack, read, &mut |_| {})
}

/// [`load_weights`], calling `on_progress(bytes)` on the calling thread each time the bytes
/// read so far (of all the requests) have grown; the last call reports all of them.
pub fn load_weights_reporting(
    file: &ModelFile,
    requests: Vec<TensorRequest>,
    device: Device,
    repack: bool,
    read: &ReadOptions,
    on_progress: &mut dyn FnMut(u64),
) -> Result<TensorSet, GraphError> {
    let repack = if repack && device.kind() == ggml::DeviceKind::Cpu { device.extra_buffer_type("CPU_REPACK") } else { None };
    let (plain, packed): (Vec<TensorRequest>, Vec<TensorRequest>) = match repack {
        Some(rb) => requests.into_iter().partition(|r| !repackable(file, &r.name, device, rb)),
        None => (requests, Vec::new()),
    };
    let mut sets = Vec::new();
    let mut plain_read = 0;
    if !plain.is_empty() {
        let mut report = |bytes: u64| {
            plain_read = bytes;
            on_progress(bytes)
        };
        sets.push(loader::load_tensors_with(file, &plain, device.buffer_type(), read, loader::TensorWrites::Ranges, &mut report)?);
    }
    if let (Some(rb), false) = (repack, packed.is_empty()) {
        tracing::debug!(tensors = packed.len(), "matrices in the CPU_REPACK buffer");
        let mut report = |bytes: u64| on_progress(plain_read + bytes);
        sets.push(loader::load_tensors_with(file, &packed, rb, read, loader::TensorWrites::Whole, &mut report)?);
    }
    Ok(TensorSet::new(sets))
}

fn check_hot(c: &Ds4Config, h: &ExpertSet) -> Result<(), GraphError> {
    if h.n_layer() as usize != c.n_layer {
        return Err(GraphError::Option(format!("hot expert placement has {} layers, the model {}", h.n_layer(), c.n_layer)));
    }
    if h.n_expert() as usize != c.n_expert {
        return Err(GraphError::Option(format!("hot expert placement is for {} experts per layer, the model has {}", h.n_expert(), c.n_expert)));
    }
    for (l, ids) in h.layers().iter().enumerate() {
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
fn subset_tables(c: &Ds4Config, h: &ExpertSet, buft: BufferType) -> Result<(Option<(Context, ggml::Buffer)>, Vec<Option<Option<T>>>), GraphError> {
    let partial: Vec<(usize, &[u32])> =
        (0..c.n_layer).filter(|&l| !h.is_full_layer(l as u32) && !h.layer(l as u32).is_empty()).map(|l| (l, h.layer(l as u32))).collect();
    let mut out: Vec<Option<Option<T>>> = (0..c.n_layer).map(|l| if h.is_full_layer(l as u32) { None } else { Some(None) }).collect();
    let (tables, masks) = expert_masks(c.n_expert, &partial, buft)?;
    for (l, mask) in masks {
        out[l] = Some(Some(mask));
    }
    Ok((tables, out))
}

/// For each (layer, expert set): a mask with 1 at the set's global expert ids and 0 elsewhere
/// (F32 [n_expert]), all in one small buffer of `buft` (None when there are none).
#[allow(clippy::type_complexity)]
pub(crate) fn expert_masks(n_expert: usize, sets: &[(usize, &[u32])], buft: BufferType) -> Result<(Option<(Context, ggml::Buffer)>, Vec<(usize, T)>), GraphError> {
    if sets.is_empty() {
        return Ok((None, Vec::new()));
    }
    let ctx = Context::new_no_alloc(sets.len(), 0)?;
    let g = Ctx { raw: ctx.as_ptr() };
    let made: Vec<(usize, T)> = sets.iter().map(|&(l, _)| (l, g.new_f32(&[n_expert as i64]))).collect();
    let buf = ggml::Buffer::alloc_context_tensors(&ctx, buft)?;
    for (&(_, mask), &(_, set)) in made.iter().zip(sets) {
        let mut m = vec![0f32; n_expert];
        for &e in set {
            m[e as usize] = 1.0;
        }
        mask.write_f32(&m);
    }
    Ok((Some((ctx, buf)), made))
}

/// Whether `name` is only ever the weight of a matrix product in the graph (repacked
/// tensors cannot be read back or gathered) and the CPU backend repacks its type and shape
/// (for a routed-expert tensor: the whole tensor's, whatever subset of it is loaded; ggml
/// repacks groups of rows within one expert, so a subset's experts get the same bytes).
fn repackable(file: &ModelFile, name: &str, device: Device, rb: BufferType) -> bool {
    const MATMUL_2D: [&str; 14] = [
        "attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight", "attn_output_b.weight",
        "attn_compressor_kv.weight", "attn_compressor_gate.weight", "indexer.attn_q_b.weight", "indexer.proj.weight",
        "indexer_compressor_kv.weight", "indexer_compressor_gate.weight", "ffn_gate_inp.weight",
        "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight",
    ];
    let suffix = name.split_once('.').and_then(|(_, r)| r.split_once('.')).map(|(_, r)| r).unwrap_or("");
    let id = ExpertPart::parse(name).is_some();
    if !(name == "output.weight" || MATMUL_2D.contains(&suffix) || id) {
        return false;
    }
    let Some(info) = file.tensors.get(name) else { return false };
    // MXFP4 routed experts stay plain where dflash's own product computes them
    // (`mxfp4_cpu.rs`: ggml's bits, faster than the repacked kernel)
    if id && info.ty == ggml::TensorType::MXFP4 && crate::mxfp4_cpu::keeps_experts_plain() {
        return false;
    }
    let ne: Vec<i64> = info.shape().iter().map(|&d| d as i64).collect();
    ops::supports_matmul_weight(device, rb, info.ty, &ne, id)
}
