//! `dflash`: the DeepSeek V4 Flash inference daemon.
//!
//! - `cmd/`: the subcommands (`run`, `serve`, `logits`, `bench`, `inspect`, `devices`);
//! - `engine/`: the model flags and the cold-expert executors (`model_args`, `cold`), the
//!   generation engine (one compute thread, queued requests), sampling, stop strings and
//!   the chat prompt;
//! - `server/`: the OpenAI-compatible HTTP service over the engine.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

mod cmd;
mod engine;
mod server;

use cmd::{bench, devices, inspect, logits, run, serve};

#[derive(Parser)]
#[command(name = "dflash", version, about = "DeepSeek V4 Flash inference on one GPU plus the CPU")]
struct Cli {
    /// Backend modules to load at start (e.g. a libggml-cuda.so built with GGML_BACKEND_DL).
    /// Without it, a libggml-cuda.so next to the executable is loaded when present.
    #[arg(long = "backend-module", global = true, env = "DFLASH_BACKEND_MODULE", value_delimiter = ',')]
    backend_modules: Vec<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Let cuBLAS use TF32 tensor cores for F32 matrix products on NVIDIA GPUs (faster F32
    /// GEMMs, ~1e-3 relative error each). Off by default: dflash sets NVIDIA_TF32_OVERRIDE=0
    /// before loading the CUDA module, unless that variable is already set.
    #[arg(long = "cuda-tf32", global = true)]
    cuda_tf32: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a deepseek4 GGUF: config, tensors, bytes per type and per expert, GPU fit.
    Inspect(inspect::Args),
    /// List the compute devices ggml sees; optionally check a matmul on each against the CPU.
    Devices(devices::Args),
    /// Write the logits of every position of a token sequence as .npy.
    Logits(logits::Args),
    /// Generate a reply to one prompt, streamed to stdout (timings to stderr).
    Run(run::Args),
    /// Serve an OpenAI-compatible HTTP API.
    Serve(serve::Args),
    /// Benchmarks (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DFLASH_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    ggml::log::install();
}

/// Load the backend modules named on the command line, or a libggml-cuda.so beside the
/// executable when none is named.
fn load_backends(named: &[PathBuf]) -> Result<()> {
    if !named.is_empty() {
        for path in named {
            let reg = ggml::load_backend_module(path)?;
            tracing::info!(module = %path.display(), registry = %reg, "loaded backend module");
        }
        return Ok(());
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.to_path_buf())) {
        let cuda = dir.join("libggml-cuda.so");
        if cuda.exists() {
            match ggml::load_backend_module(&cuda) {
                Ok(reg) => tracing::info!(module = %cuda.display(), registry = %reg, "loaded backend module"),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    // `--backend-ipc-mode=moe-expert ...`: this process is an expert worker, not a daemon.
    if expert_worker::is_worker_invocation(std::env::args_os().skip(1)) {
        init_logging(LogFormat::Text);
        return Ok(expert_worker::cli_main(std::env::args_os())?);
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if !cli.cuda_tf32 && std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() {
        // Before any CUDA library starts (they read it once) and before any other thread.
        std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    }
    load_backends(&cli.backend_modules)?;
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Devices(a) => devices::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Run(a) => run::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(b) => bench::run(b),
    }
}
