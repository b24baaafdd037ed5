//! `dflash bench …`: measurements reported in BENCHMARKS.md.
use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result};
use loader::synth::{SynthModel, SynthSpec};
use loader::{ModelFile, ReadMode, ReadOptions, TensorRequest};

#[derive(clap::Subcommand)]
pub enum Bench {
    /// Load throughput: our loader into CPU buffers vs a plain sequential read of the same
    /// file, each from a cold page cache.
    Load(LoadArgs),
}

#[derive(clap::Args)]
pub struct LoadArgs {
    /// The GGUF to load. Created (a synthetic deepseek4-shaped file) if it does not exist.
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Size of the synthetic file to create, in GB (approximate).
    #[arg(long, default_value_t = 2.2)]
    synthetic_gb: f64,
    /// Loader threads.
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Read chunk size in MiB.
    #[arg(long, default_value_t = 8)]
    chunk_mib: usize,
    #[arg(long, value_enum, default_value_t = Mode::Pread)]
    mode: Mode,
    /// Repetitions (alternating raw read and loader).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Mode {
    Pread,
    Mmap,
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Load(a) => load(a),
    }
}

/// A deepseek4-shaped spec of roughly `gb` GB (F16 weights).
fn spec_for(gb: f64) -> SynthSpec {
    let mut s = SynthSpec::medium();
    s.matrix_type = ggml::TensorType::F16;
    s.expert_type = ggml::TensorType::F16;
    // Expert bytes dominate: 3 · embd · ff · n_expert · 2 bytes per layer.
    let per_layer_per_ff = 3.0 * s.n_embd as f64 * s.n_expert as f64 * 2.0;
    let ff = (gb * 1e9 * 0.93 / (s.n_layer as f64 * per_layer_per_ff)).max(32.0);
    s.n_ff_exp = ((ff as usize) / 32).max(1) * 32;
    s
}

/// Evict the file's pages from the page cache (and the whole cache when allowed).
fn drop_cache(path: &Path) -> Result<&'static str> {
    let f = File::open(path)?;
    // SAFETY: plain syscalls on an open descriptor.
    unsafe {
        libc::fdatasync(f.as_raw_fd());
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
    let how = match std::fs::write("/proc/sys/vm/drop_caches", "3\n") {
        Ok(()) => "drop_caches + fadvise(DONTNEED)",
        Err(_) => "fadvise(DONTNEED) (no permission for drop_caches)",
    };
    Ok(how)
}

fn raw_read(path: &Path) -> Result<(u64, f64)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 8 << 20];
    let t0 = Instant::now();
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    Ok((n, t0.elapsed().as_secs_f64()))
}

fn load(a: LoadArgs) -> Result<()> {
    if !a.model.exists() {
        let spec = spec_for(a.synthetic_gb);
        eprintln!("writing synthetic model {} (n_ff_exp {})", a.model.display(), spec.n_ff_exp);
        SynthModel::new(&spec).write(&a.model, false).with_context(|| format!("writing {}", a.model.display()))?;
    }
    let mut opts = ReadOptions { chunk_bytes: a.chunk_mib << 20, progress: false, ..ReadOptions::default() };
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    opts.mode = match a.mode {
        Mode::Pread => ReadMode::Pread,
        Mode::Mmap => ReadMode::Mmap,
    };
    let cpu = ggml::Device::cpu()?;
    println!("file {} ({:.3} GB); loader threads {}, chunk {} MiB, mode {:?}", a.model.display(), std::fs::metadata(&a.model)?.len() as f64 / 1e9, opts.threads, a.chunk_mib, opts.mode);
    let (mut raw_best, mut ours_best) = (0f64, 0f64);
    for rep in 0..a.reps {
        let how = drop_cache(&a.model)?;
        let (n, secs) = raw_read(&a.model)?;
        let raw = n as f64 / secs / 1e9;
        drop_cache(&a.model)?;
        let t0 = Instant::now();
        let m = ModelFile::open(&a.model)?;
        let requests: Vec<TensorRequest> = m.tensors.iter().map(|t| TensorRequest::whole(&t.name)).collect();
        let loaded = loader::load_tensors(&m, &requests, cpu.buffer_type(), &opts)?;
        let total = t0.elapsed().as_secs_f64();
        let ours = loaded.stats.bytes as f64 / total / 1e9;
        println!(
            "rep {rep}: sequential read {raw:.3} GB/s ({n} bytes, {secs:.2} s) | loader {ours:.3} GB/s ({} bytes, {total:.2} s incl. open; read phase {:.3} GB/s) | ratio {:.2} | cache: {how}",
            loaded.stats.bytes,
            loaded.stats.gb_per_s(),
            ours / raw
        );
        raw_best = raw_best.max(raw);
        ours_best = ours_best.max(ours);
    }
    println!("best: sequential read {raw_best:.3} GB/s, loader {ours_best:.3} GB/s, ratio {:.2}", ours_best / raw_best);
    Ok(())
}
