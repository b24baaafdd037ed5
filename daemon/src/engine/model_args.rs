//! Model flags shared by every subcommand that runs the model, including where routed
//! experts run (hot on the model's device, cold in `moe-expert` workers).
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use expert_worker::pinning::Pin;
use graph::{Model, ModelOptions};
use placement::{budget_from_device, split_cold, ExpertPlacement, ModelShape, PlacementArgs};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashAttn {
    Auto,
    On,
    Off,
}

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// The deepseek4 GGUF.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Device that runs the model (as `dflash devices` lists it, e.g. CPU or CUDA0).
    #[arg(long, default_value = "CPU")]
    pub device: String,
    /// CPU threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Largest micro-batch of one graph; prefill is split into micro-batches of this size.
    /// Default: 2048 with the model on a GPU, 512 on the CPU. On a GPU every micro-batch
    /// copies the cold experts it computes over PCIe (3.42 GB a layer at full width), so a
    /// bigger one pays that copy over more tokens; the prompt cache then resumes at
    /// multiples of 2048 tokens.
    #[arg(short = 'u', long)]
    pub ubatch: Option<usize>,
    /// Attention through ggml's flash-attention op: `auto` uses it on the CPU (F32 keys and
    /// accumulation, exact); `on` forces it on other devices too (their kernels may round
    /// keys to F16); `off` uses matmul, softmax, matmul.
    #[arg(long = "flash-attn", value_enum, default_value_t = FlashAttn::Auto)]
    pub flash_attn: FlashAttn,
    /// CSA layers attend to every compressed entry under a top-k mask while at most N
    /// entries exist, and gather each token's k entries beyond (default: 16 × the indexer's k
    /// with flash attention, 4 × without).
    #[arg(long = "csa-dense-max-view", value_name = "N")]
    pub csa_dense_max_view: Option<usize>,
    /// Without flash attention, score a micro-batch's queries in blocks of at most N, each
    /// against the raw keys its window reaches (0: the whole micro-batch as one block).
    #[arg(long = "attention-block", value_name = "N", default_value_t = graph::DEFAULT_ATTENTION_BLOCK)]
    pub attention_block: usize,
    /// Maximum context per sequence (default: what the command needs).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// Worker processes that compute the cold experts (0: in this process).
    #[arg(long = "expert-workers", default_value_t = 1)]
    pub expert_workers: usize,
    /// Write routed-token counts per layer and expert (JSON, the input of
    /// `--experts-hot profile:FILE`) to FILE when the model is released.
    #[arg(long = "route-stats-out")]
    pub route_stats_out: Option<PathBuf>,
    /// CPU threads of each expert worker (default 1). In process (`--expert-workers 0`): the
    /// threads of the cold experts' own compute with the model on a GPU (default: the model's
    /// `-t`); with the model on the CPU its `-t` threads share the cold experts instead.
    #[arg(long = "worker-threads")]
    pub worker_threads: Option<usize>,
    /// Pin the expert workers: `numa` (worker i on NUMA node i mod nodes, its experts in that
    /// node's memory) or one CPU list per worker separated by `/` (`0-7/8-15`).
    #[arg(long = "worker-cpus")]
    pub worker_cpus: Option<String>,
    /// Microseconds the daemon and each worker spin on their socket before blocking: lower
    /// round-trip latency when every worker connection has a spare core (0: block at once).
    #[arg(long = "worker-spin-us", default_value_t = 0)]
    pub worker_spin_us: u64,
    /// A starting expert worker that shows no progress for this long is killed and reported:
    /// between two of its load reports that show more bytes loaded (a long load is waited
    /// for as long as it progresses), or before it opens its socket (then at least 10 s).
    #[arg(long = "worker-load-stall-ms", value_name = "MS", default_value_t = 30_000)]
    pub worker_load_stall_ms: u64,
    /// Floor of the deadline of one layer's request to an expert worker; each (token, expert)
    /// pair adds the time to read its expert's weights at 1 GiB/s. A worker that misses it is
    /// taken as hung: killed, respawned, and the request replayed.
    #[arg(long = "worker-eval-timeout-ms", value_name = "MS", default_value_t = 10_000)]
    pub worker_eval_timeout_ms: u64,
    /// Device memory (MiB) kept free for the KV caches and compute buffers when
    /// `--experts-hot budget|profile:FILE` takes its budget from a GPU's free memory.
    /// Default: 1750 plus the compute buffer of one micro-batch at the real model's width
    /// (about 3.25e-4·u² + 0.41·u MiB for u tokens: 2048 in all at `-u 512`, 3953 at 2048).
    #[arg(long = "device-reserve-mb")]
    pub device_reserve_mb: Option<u64>,
    /// With the model on a GPU and cold experts: micro-batches of at least N tokens compute
    /// the cold experts of partly held layers on the GPU, from a second copy of them in pinned
    /// host memory, copying only the experts each micro-batch routes to over PCIe (smaller
    /// batches, e.g. decode, use the executor). The copy costs host memory equal to those cold
    /// experts' size; budget placements keep one layer's experts free on the GPU for the
    /// copies. 0: never, no host copy. Default: 32 (the batch from which ggml's CUDA backend
    /// takes a product over host weights, as llama.cpp does) when the host's available memory
    /// holds every cold expert plus that copy with 10% to spare, else 0 (logged). Measured on an
    /// H100 at full width (BENCHMARKS.md, "Full width"): with 64, a 512-token prefill with
    /// every expert cold runs at llama.cpp's speed (the PCIe bound), the executor alone at
    /// 0.10×.
    #[arg(long = "cold-offload-min", value_name = "N")]
    pub cold_offload_min: Option<usize>,
    /// With the model on a GPU: layers whose routed experts are all cold compute them in the
    /// step graph itself at every batch size, from a pinned host copy (ggml's CPU backend
    /// with `-t` threads below 32 tokens, ggml's CUDA threshold for products over host
    /// weights; the GPU from there), instead of in the executor,
    /// which then does not load those layers' experts. On by default (`false` turns it off),
    /// except under `--experts-hot adaptive`, whose hot set moves. Measured on an H100 with
    /// every expert cold: decode 1.38× the executor's, 1.23× llama.cpp's (BENCHMARKS.md,
    /// "Full width").
    #[arg(long = "cold-layers-in-graph", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub cold_layers_in_graph: Option<bool>,
    /// With the model on a GPU, for layers whose cold experts have a host copy (every layer
    /// whose routed experts are all cold; partly held layers with `--cold-offload-min`):
    /// micro-batches of at least N tokens copy each such layer's cold experts whole into one
    /// of two GPU slots on a stream of their own, the next layer's while this one computes,
    /// instead of the scheduler copying the routed ones at the start of the layer's product
    /// (the copy and the compute then take turns). Costs two layers' cold experts of GPU
    /// memory, taken only when `--device-reserve-mb` stays free beside them (else logged,
    /// and not streamed). 0: never. Default: 512 on a GPU (a micro-batch that size
    /// routes to nearly every expert anyway), 0 under `--experts-hot adaptive`.
    #[arg(long = "cold-stream-min", value_name = "N")]
    pub cold_stream_min: Option<usize>,
    /// With the model on a GPU, for layers whose cold experts have a host copy (every layer
    /// whose routed experts are all cold; partly held layers with `--cold-offload-min`):
    /// micro-batches of at most `--cold-pcie-max` tokens (decode) compute cold router slots
    /// on the GPU, from copies of their experts made over PCIe into a small staging area.
    /// In an all-cold layer each token's first K slots, while the CPU computes the other
    /// slots from host memory (both paths' bandwidth serve one token); in a partly held layer
    /// every cold slot, while the GPU computes the held ones. 0: none. Default on a GPU with
    /// cold experts: half a token's router slots (3 of DeepSeek V4 Flash's 6), 0 under
    /// `--experts-hot adaptive` and on the CPU. Measured on an H100 at full width (BENCHMARKS.md,
    /// "Sixth run"): every expert cold, 8 layers, decode 60.2 → 77.7 t/s with K = 3 (67.0 with
    /// K = 2), 1.44× llama.cpp's.
    #[arg(long = "cold-pcie-slots", value_name = "K")]
    pub cold_pcie_slots: Option<usize>,
    /// With `--cold-pcie-slots K` < 6: a partly held layer stages the first ⌈c · K / 6⌉ of a
    /// decoded token's c cold slots over PCIe and the CPU computes the others (MXFP4 experts,
    /// dflash's product), where without it every cold slot is staged.
    #[arg(long = "cold-pcie-partial-cpu")]
    pub cold_pcie_partial_cpu: bool,
    /// See `--cold-pcie-slots`; the staging area holds K × N experts (k × N with partly
    /// held layers). 0 without `--cold-pcie-slots`: no split.
    #[arg(long = "cold-pcie-max", value_name = "N", default_value_t = 8)]
    pub cold_pcie_max: usize,
    /// The model's MXFP4 expert products on the CPU (beside a GPU the split's CPU slots and
    /// layers of cold experts in micro-batches under ggml's offload size; a model on the CPU
    /// its held experts) through ggml's own expert product instead of dflash's MXFP4 product
    /// (which gives ggml's bits, reads each routed expert's rows once for all its tokens and
    /// asks for them ahead; `graph/src/mxfp4_cpu.rs`): for comparing the two.
    #[arg(long = "cold-cpu-ggml-kernel", alias = "cold-pcie-ggml-kernel")]
    pub cold_cpu_ggml_kernel: bool,
    /// With `--experts-hot adaptive`: at most this many MiB of expert weights are copied onto
    /// the model's device between two steps (0: the placement stays as it started).
    #[arg(long = "expert-swap-mb", default_value_t = 16)]
    pub expert_swap_mb: u64,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        let file = loader::ModelFile::open(&self.model).with_context(|| format!("opening {}", self.model.display()))?;
        let shape = ModelShape { n_expert: file.config.n_expert as u32, expert_bytes: expert_worker::expert_bytes_per_layer(&file)? };
        // Checked before the weights load: one CPU list per worker.
        let pins = match (&self.worker_cpus, self.expert_workers) {
            (Some(_), 0) => anyhow::bail!("--worker-cpus pins expert workers, but --expert-workers is 0 (cold experts in process)"),
            (Some(spec), n) => Pin::parse_per_worker(spec, n).context("--worker-cpus")?,
            (None, _) => Vec::new(),
        };
        let options = self.placement.options()?;
        let adaptive = options.policy.is_adaptive();
        if adaptive && (self.cold_offload_min.is_some_and(|n| n > 0) || self.cold_layers_in_graph == Some(true) || self.cold_stream_min.is_some_and(|n| n > 0) || self.cold_pcie_slots.is_some_and(|k| k > 0)) {
            anyhow::bail!("--experts-hot adaptive moves experts between hot and cold, which the fixed host copy of --cold-offload-min / --cold-layers-in-graph / --cold-stream-min / --cold-pcie-slots does not follow: use one or the other");
        }
        let ubatch = self.ubatch()?;
        let on_gpu = ggml::Device::by_name(&self.device)?.kind() != ggml::DeviceKind::Cpu;
        let k = file.config.n_expert_used;
        // Cold experts get a host copy to stage from when all-cold layers are computed in the
        // graph (the default) or partly held ones may offload (`--cold-offload-min`, chosen
        // below when not given); `--cold-pcie-max 0` alone turns the default off.
        let may_have_host_copy = self.cold_layers_in_graph.unwrap_or(!adaptive) || self.cold_offload_min != Some(0);
        let pcie_slots = match self.cold_pcie_slots {
            Some(n) => n,
            None if on_gpu && !adaptive && self.cold_pcie_max > 0 && may_have_host_copy => default_pcie_slots(k),
            None => 0,
        };
        let reserve = self.device_reserve_bytes(ubatch).saturating_add(pcie_staging_bytes(&shape, pcie_slots, k, self.cold_pcie_max));
        let mut placement = ExpertPlacement::resolve(&shape, &options, self.device_budget(&file, &shape, reserve)?)?;
        let small = placement.drop_layers_below(file.config.n_expert_used);
        if !small.is_empty() {
            tracing::info!(layers = ?small, min = file.config.n_expert_used, "layers holding fewer experts than a token uses are kept all cold");
        }
        let cold_offload_min = match self.cold_offload_min {
            Some(n) => n,
            None if !on_gpu || adaptive => 0,
            None => {
                let in_graph = self.cold_layers_in_graph.unwrap_or(true);
                let host = ColdHostBytes::of(&placement, &shape, file.config.n_expert_used as u32, in_graph);
                let available = mem_available_bytes();
                let n = auto_cold_offload_min(host, available);
                tracing::info!(cold_offload_min = n, cold_bytes = host.cold, partial_copy_bytes = host.partial_copy, mem_available = ?available, "--cold-offload-min chosen from host memory");
                n
            }
        };
        let mut opts = ModelOptions {
            device: Some(self.device.clone()),
            ubatch,
            hot: Some(placement.hot().clone()),
            route_stats_out: self.route_stats_out.clone(),
            flash_attn: match self.flash_attn {
                FlashAttn::Auto => None,
                FlashAttn::On => Some(true),
                FlashAttn::Off => Some(false),
            },
            csa_dense_max_view: self.csa_dense_max_view,
            attention_block: self.attention_block,
            cold_offload_min,
            cold_layers_in_graph: self.cold_layers_in_graph.unwrap_or(!adaptive),
            cold_stream_min: match self.cold_stream_min {
                Some(n) => n,
                None if on_gpu && !adaptive => COLD_STREAM_MIN,
                None => 0,
            },
            cold_stream_keep_free: {
                // The scheduler's copy of a partly held layer's cold experts, when those offload.
                let offload = if cold_offload_min > 0 { largest_layer_experts(&shape) } else { 0 };
                reserve.saturating_add(offload)
            },
            // The default only where cold experts may have a host copy to stage from: an
            // all-hot model, or cold experts left to the executor alone, have nothing to split.
            cold_pcie_slots: match self.cold_pcie_slots {
                Some(n) => n,
                None if placement.cold().is_empty() || !(self.cold_layers_in_graph.unwrap_or(!adaptive) || cold_offload_min > 0) => 0,
                None => pcie_slots,
            },
            cold_pcie_max_tokens: self.cold_pcie_max,
            cold_pcie_partial_cpu: self.cold_pcie_partial_cpu,
            cold_cpu_ggml_kernel: self.cold_cpu_ggml_kernel,
            adaptive: adaptive.then(graph::SwapPolicy::default),
            ..ModelOptions::default()
        };
        if let Some(t) = self.threads {
            opts.threads = t;
        }
        let opts_threads = opts.threads;
        let mut model = Model::from_file(file, opts).with_context(|| format!("loading {}", self.model.display()))?;
        // Under adaptive, the executor holds every expert of a partly held layer (any of them
        // may become cold); it is given only the cold ones to compute.
        let mut cold = placement.executor_experts(adaptive);
        // Layers the step graph computes from its host copy never reach the executor.
        for l in model.layers_in_graph() {
            cold.clear_layer(l);
        }
        if !cold.is_empty() {
            if self.expert_workers == 0 {
                let threads = self.worker_threads.unwrap_or(opts_threads);
                let exec = if on_gpu {
                    super::cold::InProcess::beside(&model.file, &cold, threads)?
                } else {
                    super::cold::InProcess::new(&model.file, &cold, threads)?
                };
                model.set_cold_experts(Box::new(exec))?;
            } else {
                let shares = split_cold(&cold, &shape, self.expert_workers)?;
                let spin = std::time::Duration::from_micros(self.worker_spin_us);
                let deadlines = super::cold::WorkerDeadlines {
                    load_stall: std::time::Duration::from_millis(self.worker_load_stall_ms),
                    eval_floor: std::time::Duration::from_millis(self.worker_eval_timeout_ms),
                };
                let pool = super::cold::WorkerPool::spawn(&model.file, shares, self.worker_threads.unwrap_or(1), ubatch, spin, pins, deadlines)?;
                tracing::info!(workers = pool.n_workers(), pids = ?pool.pids(), cold_experts = cold.len(), "expert workers started");
                model.set_cold_experts(Box::new(pool))?;
            }
        }
        Ok(model)
    }

    /// `--ubatch`, or its default for the device (see the flag).
    pub fn ubatch(&self) -> Result<usize> {
        if let Some(u) = self.ubatch {
            return Ok(u);
        }
        let on_gpu = ggml::Device::by_name(&self.device)?.kind() != ggml::DeviceKind::Cpu;
        Ok(if on_gpu { GPU_UBATCH } else { graph::DEFAULT_UBATCH })
    }

    /// `--device-reserve-mb` in bytes, or its default for the micro-batch `ubatch` (see the flag).
    fn device_reserve_bytes(&self, ubatch: usize) -> u64 {
        self.device_reserve_mb.unwrap_or_else(|| default_reserve_mib(ubatch)).saturating_mul(1 << 20)
    }

    /// `--expert-swap-mb` in bytes.
    pub fn expert_swap_bytes(&self) -> u64 {
        self.expert_swap_mb.saturating_mul(1 << 20)
    }

    /// On a GPU: its free memory minus the weights that are not routed experts and the
    /// reserve, the budget `budget` and `profile` placements fill. None on the CPU (those
    /// policies then need `--expert-budget-mb`).
    fn device_budget(&self, file: &loader::ModelFile, shape: &ModelShape, reserve: u64) -> Result<Option<u64>> {
        let device = ggml::Device::by_name(&self.device)?;
        if device.kind() == ggml::DeviceKind::Cpu {
            return Ok(None);
        }
        let experts: u64 = shape.expert_bytes.iter().sum::<u64>() * u64::from(shape.n_expert);
        let other = file.tensors.total_bytes().saturating_sub(experts);
        let free = device.memory().0 as u64;
        // Offloaded cold experts are copied into the compute buffer, one layer's at a time:
        // from layers computed in the graph (on by default) and with --cold-offload-min
        // (chosen after the placement when not given, so reserved unless it is 0).
        let may_offload = self.cold_layers_in_graph != Some(false) || self.cold_offload_min != Some(0);
        let offload = if may_offload { largest_layer_experts(shape) } else { 0 };
        let budget = budget_from_device(free, other, 0, 0, reserve.saturating_add(offload));
        tracing::info!(device = %self.device, free, other_weights = other, budget, "hot-expert budget from the device");
        Ok(Some(budget))
    }
}

/// Host bytes of a placement's cold experts: all of them (held once, by the executor or, for
/// layers computed in the graph, by the pinned copy), and the second, pinned copy that
/// `--cold-offload-min` adds of the layers the executor holds and the GPU can take them from:
/// the partly held layers with at least k cold experts, and, when such layers are not
/// computed in the graph (`in_graph` false), those whose experts are all cold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ColdHostBytes {
    cold: u64,
    partial_copy: u64,
}

impl ColdHostBytes {
    fn of(placement: &ExpertPlacement, shape: &ModelShape, k: u32, in_graph: bool) -> ColdHostBytes {
        let cold = placement.cold();
        let mut bytes = ColdHostBytes { cold: 0, partial_copy: 0 };
        for (l, &per_expert) in shape.expert_bytes.iter().enumerate() {
            let n = cold.layer(l as u32).len() as u64;
            bytes.cold += n * per_expert;
            if n >= u64::from(k) && (n < u64::from(shape.n_expert) || !in_graph) {
                bytes.partial_copy += n * per_expert;
            }
        }
        bytes
    }
}

/// Bytes of the routed experts of the largest layer (the scheduler's copy of an offloaded layer).
fn largest_layer_experts(shape: &ModelShape) -> u64 {
    shape.expert_bytes.iter().max().copied().unwrap_or(0) * u64::from(shape.n_expert)
}

/// `--ubatch` when not given, with the model on a GPU.
const GPU_UBATCH: usize = 2048;

/// `--device-reserve-mb` when not given: the KV caches and what else a step holds (1750 MiB),
/// plus the compute buffer of a `u`-token micro-batch at the real model's width, a fit to the
/// buffer ggml's allocator sized at 256, 512, 1024 and 2048 tokens (127, 295, 760 and 2.2 GiB;
/// BENCHMARKS.md, "Third run").
fn default_reserve_mib(u: usize) -> u64 {
    let u = u as f64;
    1750 + (3.25e-4 * u * u + 0.41 * u).ceil() as u64
}

/// `--cold-pcie-slots` when not given, with the model on a GPU: half a token's `k` router slots
/// (at least 1 where k is). The CPU computes the other half from host memory at about the rate
/// PCIe stages these (BENCHMARKS.md, "Sixth run": 3 of 6 beat 2 of 6 by 16%).
fn default_pcie_slots(k: usize) -> usize {
    k.div_ceil(2)
}

/// GPU bytes of the staging area of `--cold-pcie-slots K` over micro-batches of `max` tokens,
/// kept free beside the hot experts: room for k experts a token (a partly held layer stages
/// every cold slot), each as large as the largest layer's expert. 0 when K is 0.
fn pcie_staging_bytes(shape: &ModelShape, slots: usize, k: usize, max: usize) -> u64 {
    if slots == 0 {
        return 0;
    }
    let per_expert = shape.expert_bytes.iter().max().copied().unwrap_or(0);
    per_expert.saturating_mul((k * max) as u64)
}

/// `--cold-stream-min` when not given, with the model on a GPU.
const COLD_STREAM_MIN: usize = 512;

/// The batch from which ggml's CUDA backend computes a product over weights in host memory
/// on the GPU (its `GGML_OP_OFFLOAD_MIN_BATCH` default; llama.cpp's threshold too).
const GPU_OFFLOAD_MIN_BATCH: usize = 32;

/// `--cold-offload-min` when not given, with the model on a GPU: [`GPU_OFFLOAD_MIN_BATCH`]
/// when every cold expert and the partly held layers' second copy fit in 90% of the host's
/// available memory, else 0 (and 0 when there is nothing to copy or the memory is unknown).
fn auto_cold_offload_min(host: ColdHostBytes, mem_available: Option<u64>) -> usize {
    match mem_available {
        Some(avail) if host.partial_copy > 0 && (host.cold + host.partial_copy) as f64 <= 0.9 * avail as f64 => GPU_OFFLOAD_MIN_BATCH,
        _ => 0,
    }
}

/// `MemAvailable` of /proc/meminfo in bytes (None where there is none).
fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::{auto_cold_offload_min, default_pcie_slots, default_reserve_mib, mem_available_bytes, pcie_staging_bytes, ColdHostBytes, GPU_OFFLOAD_MIN_BATCH};
    use experts::ExpertSet;
    use placement::{ExpertPlacement, ModelShape};

    #[test]
    fn host_bytes_count_every_cold_expert_and_copy_only_the_executors_layers() {
        // 3 layers of 8 experts (100, 200, 300 bytes each), k = 2: layer 0 all cold, layer 1
        // with 6 cold, layer 2 with 1 cold (fewer than k: no copy).
        let shape = ModelShape { n_expert: 8, expert_bytes: vec![100, 200, 300] };
        let hot = ExpertSet::from_fn(3, 8, |l, e| match l {
            0 => false,
            1 => e < 2,
            _ => e < 7,
        });
        let p = ExpertPlacement::from_hot(hot);
        assert_eq!(ColdHostBytes::of(&p, &shape, 2, true), ColdHostBytes { cold: 800 + 1200 + 300, partial_copy: 1200 });
        // Layer 0 through the executor too: its experts are copied for offloading as well.
        assert_eq!(ColdHostBytes::of(&p, &shape, 2, false), ColdHostBytes { cold: 800 + 1200 + 300, partial_copy: 800 + 1200 });
    }

    #[test]
    fn the_default_reserve_grows_with_the_micro_batch_as_the_compute_buffer_does() {
        // The buffers the fit was made from (MiB): 127 at 256 tokens, 295 at 512, 760 at 1024,
        // 2200 at 2048; each within 10% of the fit.
        for (u, buffer) in [(256usize, 127f64), (512, 295.0), (1024, 760.0), (2048, 2200.0)] {
            let fit = (default_reserve_mib(u) - 1750) as f64;
            assert!((fit - buffer).abs() <= 0.1 * buffer, "{u} tokens: fit {fit} MiB, buffer {buffer} MiB");
        }
        assert_eq!(default_reserve_mib(512), 2046, "the former fixed 2048 MiB at -u 512, to rounding");
    }

    #[test]
    fn offload_is_chosen_only_when_the_copy_fits_in_memory() {
        let host = ColdHostBytes { cold: 600, partial_copy: 300 };
        assert_eq!(auto_cold_offload_min(host, Some(1000)), GPU_OFFLOAD_MIN_BATCH);
        assert_eq!(auto_cold_offload_min(host, Some(999)), 0, "900 > 90% of 999");
        assert_eq!(auto_cold_offload_min(host, None), 0);
        assert_eq!(auto_cold_offload_min(ColdHostBytes { cold: 600, partial_copy: 0 }, Some(1 << 40)), 0, "nothing to copy");
        assert!(mem_available_bytes().is_some_and(|b| b > 0), "/proc/meminfo on Linux");
    }

    #[test]
    fn half_the_router_slots_go_over_pcie_and_their_staging_is_kept_free() {
        assert_eq!(default_pcie_slots(6), 3, "DeepSeek V4 Flash");
        assert_eq!(default_pcie_slots(4), 2);
        assert_eq!(default_pcie_slots(1), 1);
        assert_eq!(default_pcie_slots(0), 0);
        let shape = ModelShape { n_expert: 8, expert_bytes: vec![100, 300, 200] };
        // k = 6 experts a token, 8 tokens, each the size of the largest layer's
        assert_eq!(pcie_staging_bytes(&shape, 3, 6, 8), 6 * 8 * 300);
        assert_eq!(pcie_staging_bytes(&shape, 0, 6, 8), 0, "nothing staged");
    }
}
