//! `dflash serve`: loads the model, starts the engine and serves the HTTP API (`crate::server`).
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use crate::engine::model_args::ModelArgs;
use crate::engine::prompt::ChatFormat;
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
    /// Sequences generated at the same time; further requests queue.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
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
}

/// Context per sequence when `--ctx-size` is not given (at most the trained context).
const DEFAULT_CTX: usize = 4096;

pub fn run(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let format = ChatFormat::from_metadata(&model.file.metadata)?;
    let n_ctx = a.model.ctx_size.unwrap_or(DEFAULT_CTX.min(model.config.n_ctx_train)).max(2);
    let opts = EngineOptions { parallel: a.parallel, n_ctx, queue_max: a.queue_max, expert_swap_bytes: a.model.expert_swap_bytes() };
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
    let metrics = Metrics::new(&engine.stats)?;
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
