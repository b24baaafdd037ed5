//! `dflash serve`: loads the model, starts the engine and serves the HTTP API (`crate::server`).
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use crate::engine::model_args::ModelArgs;
use crate::engine::prompt::ChatFormat;
use crate::engine::cache::CacheOptions;
use crate::engine::{Engine, EngineOptions};
use crate::server::{AppState, Limits, Metrics};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0 = any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "DFLASH_API_KEY")]
    api_key: Option<String>,
    /// Sequences generated at the same time (slots), stepping together: each step is one
    /// forward pass over every running sequence's next token and the next chunk of a prompt
    /// being read; further requests queue.
    #[arg(long, visible_alias = "np", default_value_t = 1)]
    parallel: usize,
    /// Prompts are read in chunks of this many tokens (default: --ubatch), one chunk per step
    /// beside the running sequences' tokens, so a long prompt delays them by one chunk's
    /// compute per step; cached prompts resume at multiples of it. The step graph holds up to
    /// this + parallel - 1 tokens.
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Requests that may wait for a sequence; beyond them a request gets 503 with
    /// `Retry-After`.
    #[arg(long, default_value_t = 64)]
    queue_max: usize,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Largest prompt in tokens (default: the context size - 1).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for (default: the context size).
    #[arg(long)]
    max_tokens_limit: Option<usize>,
    /// Name listed by /v1/models and echoed as every response's `model` (default: the file name
    /// without .gguf). Requests may name any model unless --strict-model-names is given.
    #[arg(long)]
    alias: Option<String>,
    /// Answer 404 to a request whose `model` is neither the served name nor the model's path
    /// (by default any name is accepted: agents send their own, e.g. claude-… or gpt-…).
    #[arg(long)]
    strict_model_names: bool,
    /// Seconds in-flight requests may run on after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Memory (MiB) for cached prompt state: a prompt that starts like a cached one
    /// resumes from it and prefills only the rest (0: no cache in memory).
    #[arg(long, default_value_t = 4096)]
    cache_ram_mb: u64,
    /// Directory where cached prompt state is also kept on disk, to survive restarts, and
    /// where `POST /slots/{id}?action=save|restore` keeps its files (in `slots/`).
    #[arg(long)]
    cache_dir: Option<std::path::PathBuf>,
    /// Disk (GiB, fractions allowed) for the files in --cache-dir; the least recently used
    /// go first.
    #[arg(long, default_value_t = 16.0)]
    cache_disk_gb: f64,
}

/// Context per sequence when `--ctx-size` is not given (at most the trained context).
const DEFAULT_CTX: usize = 4096;

pub fn run(mut a: Args) -> Result<()> {
    let prefill_chunk = match a.prefill_chunk {
        Some(c) => c,
        None => a.model.ubatch()?,
    };
    if prefill_chunk == 0 || a.parallel == 0 {
        anyhow::bail!("--prefill-chunk and --parallel must be at least 1, found {prefill_chunk} and {}", a.parallel);
    }
    // a step: one chunk beside the other sequences' decode tokens
    a.model.ubatch = Some(
        prefill_chunk
            .checked_add(a.parallel - 1)
            .ok_or_else(|| anyhow::anyhow!("--prefill-chunk {prefill_chunk} with --parallel {} makes a step too large", a.parallel))?,
    );
    let model = a.model.load()?;
    let format = ChatFormat::from_metadata(&model.file.metadata)?;
    let n_ctx = a.model.ctx_size.unwrap_or(DEFAULT_CTX.min(model.config.n_ctx_train)).max(2);
    if !(a.cache_disk_gb >= 0.0 && a.cache_disk_gb.is_finite()) {
        anyhow::bail!("--cache-disk-gb must be a size in GiB, found {}", a.cache_disk_gb);
    }
    let cache = CacheOptions {
        ram_bytes: a.cache_ram_mb.saturating_mul(1 << 20),
        dir: a.cache_dir.clone(),
        disk_bytes: (a.cache_disk_gb * (1u64 << 30) as f64) as u64,
    };
    let opts = EngineOptions { parallel: a.parallel, n_ctx, queue_max: a.queue_max, expert_swap_bytes: a.model.expert_swap_bytes(), cache, prefill_chunk };
    let engine = Engine::start(model, format.tokenizer.clone(), opts)?;
    let model_id = a.alias.clone().unwrap_or_else(|| {
        let name = a.model.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.strip_suffix(".gguf").unwrap_or(&name).to_string()
    });
    let limits = Limits {
        max_body: a.max_body_bytes,
        max_prompt: a.max_prompt_tokens.unwrap_or(n_ctx - 1).min(n_ctx - 1),
        max_tokens: a.max_tokens_limit.unwrap_or(n_ctx),
    };
    let metrics = Metrics::new(&engine.stats, a.parallel)?;
    let state = Arc::new(AppState {
        engine,
        format,
        model_id,
        model_path: a.model.model.display().to_string(),
        strict_model_names: a.strict_model_names,
        api_key: a.api_key.clone(),
        limits,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        next_id: AtomicU64::new(1),
        metrics,
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let grace = Duration::from_secs(a.shutdown_grace);
    rt.block_on(crate::server::serve(state.clone(), &a.host, a.port, grace))?;
    drop(rt);
    tracing::info!("waiting for the compute thread");
    drop(state);
    eprintln!("dflash serve: stopped");
    Ok(())
}
