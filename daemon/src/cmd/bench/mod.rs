//! `dflash bench prefill|decode|load`: model throughput in the shape of llama-bench's pp/tg
//! tests (prefill N tokens into an empty sequence; generate N tokens one at a time from an
//! empty sequence; with `-d D` both start after an untimed prefill of D tokens, llama-bench's
//! `-d`), medians over repetitions; the loader's throughput (`load.rs`).
mod load;

use std::time::Instant;

use anyhow::{Context as _, Result};
use graph::{Logits, Model};
use rand::{Rng as _, SeedableRng as _};
use rand_xoshiro::Xoshiro256StarStar;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: crate::engine::model_args::ModelArgs,
    /// Tokens per repetition.
    #[arg(short = 'n', long, default_value_t = 128)]
    tokens: usize,
    /// Repetitions (the median is reported).
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
    /// Context depth: each repetition first prefills this many tokens (untimed), then runs
    /// the timed test on top of them (llama-bench's `-d`).
    #[arg(short = 'd', long, default_value_t = 0)]
    depth: usize,
    /// Print the graph build / compute split.
    #[arg(long)]
    timings: bool,
    /// After the timed repetitions, run one more with every graph node timed on its own and
    /// print the N most expensive ops (op, node name without its layer; the shares count,
    /// the profiled run itself is slower).
    #[arg(long, value_name = "N")]
    op_profile: Option<usize>,
    /// Decode tests: N sequences (each at the depth, its own tokens) decode together, one
    /// token each per step, in one graph (llama-batched-bench's shape); reports the
    /// aggregate and the per-sequence rate.
    #[arg(long = "np", visible_alias = "parallel", value_name = "N", default_value_t = 1)]
    np: usize,
}

/// `n` seeded uniform token ids in [0, n_vocab).
fn tokens(n: usize, n_vocab: usize, seed: u64) -> Result<Vec<u32>> {
    let n_vocab = u32::try_from(n_vocab).ok().filter(|&v| v > 0).with_context(|| format!("a vocabulary of {n_vocab} tokens"))?;
    let mut rng = Xoshiro256StarStar::seed_from_u64(seed);
    Ok((0..n).map(|_| rng.random_range(0..n_vocab)).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The graph build and compute time of the timed repetitions, and the PCIe split's parts.
#[derive(Default)]
struct Spent {
    build: f64,
    compute: f64,
    split: graph::SplitTimings,
}

impl Spent {
    /// Add the model's last `forward`.
    fn add(&mut self, model: &Model) {
        let t = model.timings();
        self.build += t.build_s;
        self.compute += t.compute_s;
        self.split += t.split;
    }
}

fn report(model: &Model, a: &Args, test: &str, rates: Vec<f64>, spent: &Spent) {
    let threads = a.model.threads.map(|t| t.to_string()).unwrap_or_else(|| "all".into());
    let (lo, hi) = rates.iter().fold((f64::MAX, 0f64), |(l, h), &r| (l.min(r), h.max(r)));
    println!(
        "{} | {} | threads {threads} | ubatch {} | {test}{} | {:.2} t/s (min {lo:.2}, max {hi:.2}, {} reps)",
        a.model.model.display(),
        model.backend_name(),
        model.ubatch(),
        if a.depth > 0 { format!(" @ d{}", a.depth) } else { String::new() },
        median(rates.clone()),
        rates.len()
    );
    if a.timings {
        println!("  graph build {:.3} s, compute {:.3} s (all reps); last graph split into {} backend runs", spent.build, spent.compute, model.last_step_splits());
        let s = &spent.split;
        if s.layers > 0 {
            // per split layer, in ms: the parts of the compute the PCIe split's stops cut
            let per = |x: f64| 1e3 * x / s.layers as f64;
            println!(
                "  PCIe split, per split layer ({} in all): to the router {:.3} ms, plan {:.3} ms, CPU slots {:.3} ms; after the last one {:.3} ms a step",
                s.layers,
                per(s.to_router_s),
                per(s.plan_s),
                per(s.cpu_s),
                1e3 * s.after_s / s.steps.max(1) as f64
            );
        }
        if let Some(n) = model.experts_staged() {
            println!("  experts copied over PCIe for decode's split router slots: {n} since load");
        }
    }
}

/// One more repetition (`run`) with per-node timing, and its top `n` rows.
fn op_profile(model: &mut Model, n: usize, run: impl FnOnce(&mut Model) -> Result<()>) -> Result<()> {
    model.set_op_profile(true);
    run(model)?;
    let rows = model.take_op_profile().unwrap_or_default();
    model.set_op_profile(false);
    let total: f64 = rows.iter().map(|r| r.seconds).sum();
    println!("  op profile (one repetition, nodes timed one by one: {:.3} s in {} nodes)", total, rows.iter().map(|r| r.calls).sum::<u64>());
    println!("  {:>6}  {:>9}  {:>7}  {:>9}  op / node", "share", "ms", "calls", "us/call");
    for r in rows.iter().take(n) {
        let name = if r.name.is_empty() { String::new() } else { format!(" / {}", r.name) };
        println!("  {:5.1}%  {:9.2}  {:7}  {:9.1}  {}{name}", 100.0 * r.seconds / total.max(1e-12), 1e3 * r.seconds, r.calls, 1e6 * r.seconds / r.calls.max(1) as f64, r.op);
    }
    Ok(())
}

/// Per-layer expert telemetry (`--timings` with cold experts).
pub fn print_expert_stats(stats: &[graph::ExpertLayerStats]) {
    eprintln!("layer  hit rate  routed slots  hot compute s  cold wait s  cold compute s (worker-reported)");
    for (l, s) in stats.iter().enumerate() {
        eprintln!("{l:5}  {:7.1}%  {:12}  {:13.4}  {:11.4}  {:14.4}", 100.0 * s.hit_rate(), s.routed, s.hot_s, s.wait_s, s.cold_reported_s);
    }
}

/// A sequence with room for the depth and `tokens` more, holding `depth` prefilled tokens.
fn sequence_at_depth(model: &mut Model, a: &Args, context: &[u32], tokens: usize) -> Result<graph::Sequence> {
    let mut seq = model.new_sequence(a.depth + tokens)?;
    if !context.is_empty() {
        model.forward(&mut seq, context, Logits::Last)?;
    }
    Ok(seq)
}

/// The ppN test on a loaded model.
fn prefill_test(model: &mut Model, a: &Args, n: usize) -> Result<()> {
    let toks = tokens(n, model.config.n_tokens.min(model.n_vocab()), 1)?;
    let context = tokens(a.depth, model.config.n_tokens.min(model.n_vocab()), 3)?;
    let mut rates = Vec::new();
    let mut spent = Spent::default();
    for rep in 0..a.reps.max(1) + 1 {
        let mut seq = sequence_at_depth(model, a, &context, n)?;
        let t0 = Instant::now();
        model.forward(&mut seq, &toks, Logits::Last)?;
        let dt = t0.elapsed().as_secs_f64();
        if rep > 0 {
            // rep 0 warms up (first-touch of weights, allocator sizing)
            rates.push(n as f64 / dt);
            spent.add(model);
        }
    }
    report(model, a, &format!("pp{n}"), rates, &spent);
    if let Some(top) = a.op_profile {
        op_profile(model, top, |m| {
            let mut seq = sequence_at_depth(m, a, &context, n)?;
            m.forward(&mut seq, &toks, Logits::Last)?;
            Ok(())
        })?;
    }
    Ok(())
}

/// Decode `toks[i]` into `seqs[i]`, one token per sequence and step, all sequences in each
/// step; an adaptive placement re-places between steps under `swap_bytes`, as the server does
/// (timed). Returns the time spent.
fn decode_steps(model: &mut Model, seqs: &mut [graph::Sequence], toks: &[Vec<u32>], swap_bytes: u64) -> Result<Spent> {
    let mut spent = Spent::default();
    for i in 0..toks.first().map_or(0, Vec::len) {
        let mut items: Vec<(&mut graph::Sequence, &[u32])> = seqs.iter_mut().zip(toks).map(|(s, t)| (s, &t[i..i + 1])).collect();
        model.forward_batch(&mut items, Logits::Last)?;
        spent.add(model);
        model.replace_experts(swap_bytes)?;
    }
    Ok(spent)
}

/// The tgN test on a loaded model: `a.np` sequences decoding together (one alone: tgN).
fn decode_test(model: &mut Model, a: &Args, n: usize) -> Result<()> {
    let np = a.np.max(1);
    let n_tokens = model.config.n_tokens.min(model.n_vocab());
    // Sequence 0 decodes the tokens a single-sequence test does; the others their own.
    let toks: Vec<Vec<u32>> = (0..np).map(|i| tokens(n, n_tokens, if i == 0 { 2 } else { 100 + i as u64 })).collect::<Result<_>>()?;
    let context = tokens(a.depth, n_tokens, 3)?;
    let mut rates = Vec::new();
    let mut spent = Spent::default();
    for rep in 0..a.reps.max(1) + 1 {
        let mut seqs = (0..np).map(|_| sequence_at_depth(model, a, &context, n)).collect::<Result<Vec<_>>>()?;
        let t0 = Instant::now();
        let step_spent = decode_steps(model, &mut seqs, &toks, a.model.expert_swap_bytes())?;
        let dt = t0.elapsed().as_secs_f64();
        if rep > 0 {
            rates.push((np * n) as f64 / dt);
            spent.build += step_spent.build;
            spent.compute += step_spent.compute;
            spent.split += step_spent.split;
        }
        if a.timings && rep + 1 < a.reps.max(1) + 1 {
            if let Some(stats) = model.take_expert_stats() {
                let (routed, cold) = stats.iter().fold((0, 0), |(r, c), s| (r + s.routed, c + s.cold));
                let hit = graph::ExpertLayerStats { routed, cold, ..Default::default() }.hit_rate();
                let swaps = model.swap_totals();
                eprintln!("rep {rep}: hit rate {:.1}% over all layers; swaps so far {} ({} bytes)", 100.0 * hit, swaps.swaps, swaps.bytes);
            }
        }
    }
    if np == 1 {
        report(model, a, &format!("tg{n}"), rates, &spent);
    } else {
        let per_seq = median(rates.clone()) / np as f64;
        report(model, a, &format!("tg{n} x{np} seqs, aggregate"), rates, &spent);
        println!("  per sequence: {per_seq:.2} t/s");
    }
    if let Some(top) = a.op_profile {
        op_profile(model, top, |m| {
            let mut seqs = (0..np).map(|_| sequence_at_depth(m, a, &context, n)).collect::<Result<Vec<_>>>()?;
            decode_steps(m, &mut seqs, &toks, a.model.expert_swap_bytes())?;
            Ok(())
        })?;
    }
    if let (true, Some(stats)) = (a.timings, model.take_expert_stats()) {
        print_expert_stats(&stats);
        let swaps = model.swap_totals();
        if model.is_adaptive() {
            eprintln!("adaptive placement: {} swaps, {} bytes copied", swaps.swaps, swaps.bytes);
        }
    }
    Ok(())
}

pub fn prefill(a: Args) -> Result<()> {
    let mut model = a.model.load()?;
    prefill_test(&mut model, &a, a.tokens)
}

pub fn decode(a: Args) -> Result<()> {
    let mut model = a.model.load()?;
    decode_test(&mut model, &a, a.tokens)
}

/// `dflash bench tests`: several pp and tg tests on one loaded model (llama-bench's
/// `-p A,B -n C`), so a placement is loaded once.
#[derive(clap::Args)]
pub struct TestsArgs {
    #[command(flatten)]
    common: Args,
    /// Prefill tests: tokens per test, comma-separated (0 or empty: none).
    #[arg(short = 'p', long, value_delimiter = ',', default_value = "512")]
    prefill: Vec<usize>,
    /// Decode tests: tokens per test, comma-separated (0: none); `-n` is this list's
    /// first entry when it is not given.
    #[arg(long, value_delimiter = ',')]
    decode: Option<Vec<usize>>,
}

pub fn tests_cmd(t: TestsArgs) -> Result<()> {
    let a = &t.common;
    let mut model = a.model.load()?;
    for &n in t.prefill.iter().filter(|&&n| n > 0) {
        prefill_test(&mut model, a, n)?;
    }
    for n in t.decode.clone().unwrap_or_else(|| vec![a.tokens]).into_iter().filter(|&n| n > 0) {
        decode_test(&mut model, a, n)?;
    }
    Ok(())
}

/// `dflash bench …`
#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Prefill throughput: N tokens into an empty sequence in micro-batches (llama-bench's ppN).
    Prefill(Args),
    /// Decode throughput: N tokens one at a time from an empty sequence (llama-bench's tgN).
    Decode(Args),
    /// Prefill tests (`-p 512,2048`) then decode tests (`--decode 64`, else `-n`) on one
    /// loaded model, the way llama-bench runs `-p … -n …`.
    Tests(TestsArgs),
    /// The CPU's MXFP4 expert product for cold experts, at full width by default: dflash's
    /// op against ggml's `mul_mat_id`, over experts routed by 1, 2, 4 … tokens each.
    Experts(ExpertsArgs),
    #[command(flatten)]
    Other(load::Bench),
}

#[derive(clap::Args)]
pub struct ExpertsArgs {
    /// Input width of the product (the model's hidden size for gate and up).
    #[arg(long, default_value_t = 4096)]
    n_in: usize,
    /// Output rows of each expert (gate and up fused: twice the expert FFN width).
    #[arg(long, default_value_t = 4096)]
    rows: usize,
    /// Experts in the weight tensor.
    #[arg(long, default_value_t = 256)]
    n_expert: usize,
    /// Experts routed in each product (their weights are read once a product).
    #[arg(long, default_value_t = 64)]
    experts: usize,
    /// Tokens routed to each expert, comma-separated: one product per value.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    tokens: Vec<usize>,
    /// CPU threads (default: every core).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Timed repetitions of each product (the best is reported).
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
}

/// `dflash bench experts`: per value of `--tokens` the time of each product, the rate its
/// routed experts' weights are read at, and its (token, expert) pairs a millisecond.
fn experts(a: ExpertsArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    for (i, &m) in a.tokens.iter().enumerate() {
        let t = graph::time_products(a.n_in, a.rows, a.n_expert, a.experts, m, threads, a.reps)?;
        if i == 0 {
            println!("| tokens/expert | experts | pairs | dflash ms | ggml ms | dflash GB/s | ggml GB/s | dflash pairs/ms | ggml pairs/ms | ratio |");
            println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        let gbs = |s: f64| t.weight_bytes as f64 / s / 1e9;
        let pms = |s: f64| t.pairs as f64 / (s * 1e3);
        println!(
            "| {m} | {} | {} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            a.experts,
            t.pairs,
            t.ours_s * 1e3,
            t.ggml_s * 1e3,
            gbs(t.ours_s),
            gbs(t.ggml_s),
            pms(t.ours_s),
            pms(t.ggml_s),
            t.ggml_s / t.ours_s
        );
    }
    println!("(n_in {}, rows {}, {} threads, best of {})", a.n_in, a.rows, threads, a.reps);
    Ok(())
}

pub fn run(b: BenchCmd) -> Result<()> {
    match b {
        BenchCmd::Prefill(a) => prefill(a),
        BenchCmd::Decode(a) => decode(a),
        BenchCmd::Tests(t) => tests_cmd(t),
        BenchCmd::Experts(a) => experts(a),
        BenchCmd::Other(b) => load::run(b),
    }
}
