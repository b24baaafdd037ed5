//! `dflash inspect MODEL.gguf`.
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use loader::ModelFile;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file.
    model: PathBuf,
    /// GPU sizes (GiB) to report the expert fit for.
    #[arg(long = "gpu-gib", value_delimiter = ',', default_values_t = vec![24.0, 48.0, 80.0, 141.0])]
    gpu_gib: Vec<f64>,
    /// GiB kept free on the GPU for KV cache, compute buffers and the driver.
    #[arg(long, default_value_t = 6.0)]
    reserve_gib: f64,
    /// Print every metadata key (arrays abbreviated).
    #[arg(long)]
    metadata: bool,
}

const GB: f64 = 1e9;
const GIB: f64 = (1u64 << 30) as f64;

pub fn run(args: Args) -> Result<()> {
    let m = ModelFile::open(&args.model)?;
    let c = &m.config;
    println!("file          {} ({:.3} GB)", m.path.display(), m.file_len as f64 / GB);
    println!("architecture  deepseek4");
    if let Ok(name) = m.metadata.str("general.name") {
        println!("name          {name}");
    }
    println!("layers        {} (+{} next-token-prediction)", c.n_layer, c.n_nextn);
    println!("hidden        {} × {} hyper-connection streams (Sinkhorn {} iters, eps {:e})", c.n_embd, c.hc_count, c.hc_sinkhorn_iters, c.hc_eps);
    println!("vocab         {} rows, {} tokenizer tokens; context {}", c.n_vocab, c.n_tokens, c.n_ctx_train);
    println!(
        "attention     {} heads × {} (rope {}), q_lora {}, output {} groups × {}, window {}, sinks",
        c.n_head, c.head_dim, c.n_rot, c.q_lora_rank, c.o_groups, c.o_lora_rank, c.window
    );
    println!("compression   ratios {:?}", &c.compress_ratios[..c.n_layer]);
    if c.indexer_heads > 0 {
        println!("indexer       {} heads × {}, top-k {}", c.indexer_heads, c.indexer_dim, c.indexer_top_k);
    }
    println!("rope          base {} (ratio 0), {} on compressed layers, yarn {:?}", c.rope_base, c.compress_rope_base, c.yarn);
    println!(
        "moe           {} experts, {} active, {} shared, ffn {}, scale {}, norm {}, {:?}, {} hash layers",
        c.n_expert, c.n_expert_used, c.n_expert_shared, c.n_ff_exp[0], c.expert_weights_scale, c.expert_weights_norm, c.gating, c.n_hash_layers
    );
    println!("swiglu clamp  routed {:?} shared {:?}", c.swiglu_clamp_exp.first(), c.swiglu_clamp_shexp.first());

    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in m.tensors.iter() {
        let e = by_type.entry(t.ty.to_string()).or_default();
        e.0 += 1;
        e.1 += t.nbytes;
    }
    println!("tensors       {} ({:.3} GB)", m.tensors.len(), m.tensors.total_bytes() as f64 / GB);
    for (ty, (n, bytes)) in &by_type {
        println!("  {ty:<8} {n:>6} tensors {:>12.3} GB", *bytes as f64 / GB);
    }
    if !m.tensors.unused.is_empty() {
        println!("  not used by the graph: {} tensors (e.g. {})", m.tensors.unused.len(), m.tensors.unused[0]);
    }

    // Routed experts: bytes of one expert per layer (gate + up + down slices).
    let mut per_layer = Vec::with_capacity(c.n_layer);
    for l in 0..c.n_layer {
        let mut bytes = 0u64;
        for part in loader::ExpertPart::ALL {
            if let Some(t) = m.tensors.get(&part.name(l)) {
                bytes += t.slice_bytes(2);
            }
        }
        per_layer.push(bytes);
    }
    let routed: u64 = per_layer.iter().map(|b| b * c.n_expert as u64).sum();
    let dense = m.tensors.total_bytes() - routed;
    println!("experts       routed {:.3} GB, everything else {:.3} GB", routed as f64 / GB, dense as f64 / GB);
    let (lo, hi) = (per_layer.iter().min().copied().unwrap_or(0), per_layer.iter().max().copied().unwrap_or(0));
    if lo == hi {
        println!("  bytes per expert per layer: {lo} ({:.2} MB)", lo as f64 / 1e6);
    } else {
        println!("  bytes per expert per layer: {lo}..{hi}");
        for (l, b) in per_layer.iter().enumerate() {
            println!("    layer {l:>2}: {b}");
        }
    }
    let avg = if per_layer.is_empty() { 0.0 } else { per_layer.iter().sum::<u64>() as f64 / per_layer.len() as f64 };
    let total_experts = (c.n_expert * c.n_layer) as f64;
    for gib in &args.gpu_gib {
        let room = gib * GIB - args.reserve_gib * GIB - dense as f64;
        if room < 0.0 {
            println!("GPU {gib:>5} GiB: the non-expert weights alone ({:.2} GB) + {} GiB reserve do not fit", dense as f64 / GB, args.reserve_gib);
            continue;
        }
        let fit = if avg > 0.0 { (room / avg).floor().min(total_experts) } else { total_experts };
        println!(
            "GPU {gib:>5} GiB: non-expert weights + {fit:.0} of {total_experts:.0} routed experts ({:.1}%, ~{:.0} per layer), {} GiB reserved",
            100.0 * fit / total_experts,
            fit / c.n_layer.max(1) as f64,
            args.reserve_gib
        );
    }
    if args.metadata {
        println!("metadata ({} keys)", m.metadata.len());
        for (k, v) in m.metadata.iter() {
            println!("  {k} = {} ({})", v.summary(), v.type_name());
        }
    }
    Ok(())
}
