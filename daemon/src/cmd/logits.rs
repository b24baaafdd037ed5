//! `dflash logits`: run a token sequence through the model and write every position's logits
//! as float32 .npy [n_tokens, n_vocab], for comparison with any other implementation. It
//! uses the same `graph::Model::forward` path as generation.
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use graph::{Logits, Model};
use npyz::WriterBuilder as _;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: crate::engine::model_args::ModelArgs,
    /// Token ids: a text file with one id per line, or a .npy of int32/int64.
    #[arg(long)]
    tokens: PathBuf,
    /// Output .npy (float32, shape [n_tokens, n_vocab]).
    #[arg(long)]
    out: PathBuf,
    /// Prefill the first P tokens in one call, then feed the rest one at a time (decode).
    #[arg(long)]
    decode_from: Option<usize>,
    /// Print the graph build / compute time split to stderr.
    #[arg(long)]
    timings: bool,
    /// Run K other sequences beside this one in every step (`Model::forward_batch`, as
    /// `serve --parallel` does): companion i reads the tokens rotated by 7·(i+1) positions
    /// and starts i+1 tokens later, so the steps mix prefill and decode of sequences at
    /// different positions. Only this sequence's logits are written: they are to equal its
    /// logits alone (the batched-vs-alone check).
    #[arg(long, value_name = "K", default_value_t = 0)]
    batch_with: usize,
}

pub fn run(a: Args) -> Result<()> {
    let tokens = read_tokens(&a.tokens)?;
    if tokens.is_empty() {
        bail!("{}: no tokens", a.tokens.display());
    }
    let mut model = a.model.load()?;
    let n_vocab = model.n_vocab();
    let tokens = graph::token_ids(&tokens, n_vocab).with_context(|| a.tokens.display().to_string())?;
    let n_ctx = a.model.ctx_size.unwrap_or(tokens.len()).max(tokens.len());
    let mut seq = model.new_sequence(n_ctx)?;
    let file = File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let shape = [tokens.len() as u64, n_vocab as u64];
    let mut out = npyz::WriteOptions::<f32>::new()
        .default_dtype()
        .shape(&shape)
        .writer(BufWriter::with_capacity(8 << 20, file))
        .begin_nd()
        .with_context(|| format!("writing {}", a.out.display()))?;
    let mut write_rows = |rows: &[f32]| out.extend(rows.iter().copied()).with_context(|| format!("writing {}", a.out.display()));
    let split = a.decode_from.unwrap_or(tokens.len());
    if split == 0 || split > tokens.len() {
        bail!("--decode-from {split} must be in [1, {}]", tokens.len());
    }
    let mut total = graph::StepTimings::default();
    let mut add = |m: &Model| {
        let t = m.timings();
        total.graphs_built += t.graphs_built;
        total.graphs_reused += t.graphs_reused;
        total.build_s += t.build_s;
        total.compute_s += t.compute_s;
    };
    // Companions: (sequence, tokens); companion i lags i+1 tokens behind, so it still reads
    // its prompt while this one decodes.
    let n = tokens.len();
    let companions: Vec<Vec<u32>> = (0..a.batch_with).map(|i| (0..n).map(|j| tokens[(j + 7 * (i + 1)) % n]).collect()).collect();
    let mut comp_seqs = Vec::with_capacity(a.batch_with);
    for _ in 0..a.batch_with {
        comp_seqs.push(model.new_sequence(n_ctx)?);
    }
    let mut comp_done = vec![0usize; a.batch_with];
    // One step: this sequence's `mine`, and each companion's next tokens up to position
    // `upto - lag` (lag i+1; at the end, the rest).
    let mut step = |model: &mut Model, seq: &mut graph::Sequence, mine: &[u32], upto: usize, last: bool| -> Result<Vec<f32>> {
        let mut items: Vec<(&mut graph::Sequence, &[u32])> = vec![(seq, mine)];
        for (i, (cs, done)) in comp_seqs.iter_mut().zip(comp_done.iter_mut()).enumerate() {
            let end = if last { n } else { upto.saturating_sub(i + 1).max(*done) };
            items.push((cs, &companions[i][*done..end]));
            *done = end;
        }
        let mut out = model.forward_batch(&mut items, Logits::All)?;
        Ok(std::mem::take(&mut out[0]))
    };
    write_rows(&step(&mut model, &mut seq, &tokens[..split], split, split == n)?)?;
    add(&model);
    for (j, &t) in tokens[split..].iter().enumerate() {
        let pos = split + j + 1;
        write_rows(&step(&mut model, &mut seq, &[t], pos, pos == n)?)?;
        add(&model);
    }
    // checks that every row was written (the shape) and flushes
    out.finish().with_context(|| format!("writing {}", a.out.display()))?;
    if a.timings {
        eprintln!(
            "{} tokens ({} prefill, {} decode) on {}: graphs built {}, reused {}; build {:.3} s, compute {:.3} s; last graph split into {} backend runs",
            tokens.len(),
            split,
            tokens.len() - split,
            model.backend_name(),
            total.graphs_built,
            total.graphs_reused,
            total.build_s,
            total.compute_s,
            model.last_step_splits()
        );
        if let Some(stats) = model.take_expert_stats() {
            crate::cmd::bench::print_expert_stats(&stats);
        }
    }
    Ok(())
}

fn read_tokens(path: &Path) -> Result<Vec<i64>> {
    if path.extension().is_some_and(|e| e == "npy") {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let npy = npyz::NpyFile::new(&bytes[..]).with_context(|| format!("{}: not a .npy file", path.display()))?;
        let dtype = npy.header().dtype().descr().trim_matches('\'').to_string();
        return match dtype.as_str() {
            "<i4" => Ok(npy.into_vec::<i32>().with_context(|| format!("{}: int32 data", path.display()))?.into_iter().map(i64::from).collect()),
            "<i8" => Ok(npy.into_vec::<i64>().with_context(|| format!("{}: int64 data", path.display()))?),
            other => bail!("{}: token ids must be int32 or int64, found dtype {other}", path.display()),
        };
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| l.trim().parse::<i64>().with_context(|| format!("{} line {}: {:?} is not a token id", path.display(), i + 1, l.trim())))
        .collect()
}
