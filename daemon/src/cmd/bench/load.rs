//! `dflash bench load`: the loader's throughput against a plain read (BENCHMARKS.md).
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
    /// Loader read chunk size in MiB (default: the loader's own).
    #[arg(long)]
    chunk_mib: Option<usize>,
    /// Loader read modes to time, comma-separated (default: pread, the loader's default).
    #[arg(long, value_enum, value_delimiter = ',')]
    mode: Vec<Mode>,
    /// Buffer of the baseline's sequential `read` loop, in MiB (reused, like `dd bs=16M`).
    #[arg(long, default_value_t = 16)]
    raw_buf_mib: usize,
    /// Before each timed read, read the file once untimed (filling the page cache) and then
    /// drop the cache, so that both timed reads start with the same cold page cache and the
    /// same amount of just-freed memory. Set to false to time straight after the drop.
    ///
    /// Why: in a VM whose balloon reports free pages to the host, memory that has been free
    /// for a few seconds is handed back, and touching it again costs a host fault per page
    /// (a buffered read then runs at a fifth of its speed); memory freed just before is
    /// still backed. Without priming, whichever read follows the other's large free wins.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    prime: bool,
    /// Seconds to wait between the cache drop and each timed read.
    #[arg(long, default_value_t = 0.0)]
    settle_s: f64,
    /// Repetitions; each times the baseline and every mode, in an order rotated every rep.
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Mode {
    /// O_DIRECT reads (buffered where the file system refuses them).
    Direct,
    /// Buffered `pread`.
    Pread,
    /// Copies out of a memory map.
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

/// The baseline: a plain sequential `read` of the whole file into one reused buffer.
fn raw_read(path: &Path, buf_bytes: usize) -> Result<(u64, f64)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; buf_bytes.max(1 << 16)];
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

/// Our loader: open (parse + validate) and load every tensor into one CPU buffer.
fn loader_read(path: &Path, cpu: &ggml::Device, opts: &ReadOptions) -> Result<(u64, f64, f64)> {
    let t0 = Instant::now();
    let m = ModelFile::open(path)?;
    let requests: Vec<TensorRequest> = m.tensors.iter().map(|t| TensorRequest::whole(&t.name)).collect();
    let loaded = loader::load_tensors(&m, &requests, cpu.buffer_type(), opts)?;
    let total = t0.elapsed().as_secs_f64();
    Ok((loaded.stats.bytes, total, loaded.stats.gb_per_s()))
}

/// Median and range of `v` (not empty).
fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    (median, s[0], s[n - 1])
}

fn read_mode(m: Mode) -> ReadMode {
    match m {
        Mode::Direct => ReadMode::Direct,
        Mode::Pread => ReadMode::Pread,
        Mode::Mmap => ReadMode::Mmap,
    }
}

fn load(a: LoadArgs) -> Result<()> {
    if !a.model.exists() {
        let spec = spec_for(a.synthetic_gb);
        eprintln!("writing synthetic model {} (n_ff_exp {})", a.model.display(), spec.n_ff_exp);
        SynthModel::new(&spec).write(&a.model, false).with_context(|| format!("writing {}", a.model.display()))?;
    }
    let mut opts = ReadOptions { progress: false, ..ReadOptions::default() };
    if let Some(c) = a.chunk_mib {
        opts.chunk_bytes = c << 20;
    }
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    let modes: Vec<ReadMode> =
        if a.mode.is_empty() { vec![ReadOptions::default().mode] } else { a.mode.iter().map(|&m| read_mode(m)).collect() };
    let cpu = ggml::Device::cpu()?;
    println!(
        "file {} ({:.3} GB); loader threads {}, chunk {} MiB, modes {modes:?}; \
         baseline: read() into a reused {} MiB buffer; prime {}",
        a.model.display(),
        std::fs::metadata(&a.model)?.len() as f64 / 1e9,
        opts.threads,
        opts.chunk_bytes >> 20,
        a.raw_buf_mib,
        a.prime
    );
    // Per rep: the baseline and each loader mode, each from a dropped cache, in an order
    // rotated by one every rep so that none always follows the same other.
    let n = modes.len() + 1;
    let mut raws = Vec::new();
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut how = "";
    for rep in 0..a.reps.max(1) {
        let mut raw = 0f64;
        let mut line = Vec::new();
        let mut got = vec![(0f64, 0f64); modes.len()];
        for step in 0..n {
            let which = (step + rep) % n;
            if a.prime {
                raw_read(&a.model, a.raw_buf_mib << 20)?;
            }
            how = drop_cache(&a.model)?;
            std::thread::sleep(std::time::Duration::from_secs_f64(a.settle_s.max(0.0)));
            if which == 0 {
                let (bytes, secs) = raw_read(&a.model, a.raw_buf_mib << 20)?;
                raw = bytes as f64 / secs / 1e9;
                line.push(format!("read {raw:.3} GB/s ({secs:.2} s)"));
            } else {
                let o = ReadOptions { mode: modes[which - 1], ..opts.clone() };
                let (bytes, total, read_phase) = loader_read(&a.model, &cpu, &o)?;
                got[which - 1] = (bytes as f64 / total / 1e9, read_phase);
                line.push(format!("{:?} {:.3} GB/s ({total:.2} s incl. open)", o.mode, got[which - 1].0));
            }
        }
        raws.push(raw);
        let mut r = Vec::new();
        for (i, &(gbs, _)) in got.iter().enumerate() {
            ours[i].push(gbs);
            ratios[i].push(gbs / raw);
            r.push(format!("{:?} {:.2}", modes[i], gbs / raw));
        }
        println!("rep {rep}: {} | ratio {}", line.join(", "), r.join(", "));
    }
    let (rm, rlo, rhi) = summary(&raws);
    println!("cache: {how}");
    println!("median of {} reps [min, max]: sequential read {rm:.3} GB/s [{rlo:.3}, {rhi:.3}]", raws.len());
    for (i, m) in modes.iter().enumerate() {
        let (om, olo, ohi) = summary(&ours[i]);
        let (qm, qlo, qhi) = summary(&ratios[i]);
        println!("  loader {m:?}: {om:.3} GB/s [{olo:.3}, {ohi:.3}] | ratio {qm:.2} [{qlo:.2}, {qhi:.2}]");
    }
    Ok(())
}
