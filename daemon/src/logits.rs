//! `dflash logits`: run a token sequence through the model and write every position's logits
//! as float32 .npy [n_tokens, n_vocab], for comparison with any other implementation. It
//! uses the same `graph::Model::forward` path as generation.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use graph::{Logits, Model};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: crate::model_args::ModelArgs,
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
}

pub fn run(a: Args) -> Result<()> {
    let tokens = read_tokens(&a.tokens)?;
    if tokens.is_empty() {
        bail!("{}: no tokens", a.tokens.display());
    }
    let mut model = a.model.load()?;
    let n_vocab = model.n_vocab();
    if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= n_vocab) {
        bail!("{}: token {} (index {i}) is outside the vocabulary [0, {n_vocab})", a.tokens.display(), t);
    }
    let tokens: Vec<u32> = tokens.into_iter().map(|t| t as u32).collect();
    let n_ctx = a.model.ctx_size.unwrap_or(tokens.len()).max(tokens.len());
    let mut seq = model.new_sequence(n_ctx)?;
    let mut out = NpyWriter::create(&a.out, tokens.len(), n_vocab)?;
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
    out.write_rows(&model.forward(&mut seq, &tokens[..split], Logits::All)?)?;
    add(&model);
    for &t in &tokens[split..] {
        out.write_rows(&model.forward(&mut seq, &[t], Logits::All)?)?;
        add(&model);
    }
    out.finish()?;
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
            crate::bench_model::print_expert_stats(&stats);
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

/// A float32 C-order .npy written row block by row block.
struct NpyWriter {
    w: BufWriter<File>,
    path: PathBuf,
    expect: usize,
    written: usize,
}

impl NpyWriter {
    fn create(path: &Path, rows: usize, cols: usize) -> Result<NpyWriter> {
        let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = BufWriter::with_capacity(8 << 20, f);
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
        // magic (6) + version (2) + length (2) + header, padded with spaces to 64, ending '\n'
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        w.write_all(b"\x93NUMPY\x01\x00")?;
        w.write_all(&(header.len() as u16).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        Ok(NpyWriter { w, path: path.to_path_buf(), expect: rows * cols, written: 0 })
    }

    fn write_rows(&mut self, v: &[f32]) -> Result<()> {
        for x in v {
            self.w.write_all(&x.to_le_bytes())?;
        }
        self.written += v.len();
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        if self.written != self.expect {
            bail!("{}: wrote {} values, expected {}", self.path.display(), self.written, self.expect);
        }
        self.w.flush().with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}
