//! The generation engine: one compute thread owns the `graph::Model` and `parallel` sequences
//! (slots). Requests queue while every slot is busy (at most `queue_max` of them; beyond,
//! `submit` refuses with [`EngineError::QueueFull`]). Each step is one forward pass
//! (`Model::forward_batch`) over the work of every busy slot ([`plan_step`]): the last token
//! of each generating sequence and the next chunk (`prefill_chunk` tokens) of each prompt
//! being read, oldest first, while it fits; so running streams go on producing a token per
//! step while a long prompt is read, and every cold expert is computed once per step for all
//! the tokens routed to it. A sequence's logits are those it gets alone: where its prompt is
//! split does not depend on the other sequences, and `forward_batch` keeps sequences apart.
//! Text streams back through an unbounded channel as it is decoded; a dropped receiver (or
//! [`Engine::cancel_all`]) ends the request and frees its slot.
//!
//! A prompt resumes from the longest prefix the prompt cache holds ([`cache`]), at a multiple
//! of the prefill chunk, and prefills the rest in the same chunks an uncached run would;
//! `POST /slots/{id}` saves, restores and erases a slot's cached prompt ([`Engine::slot`]).
//!
//! Stopping: end-of-generation ids (the tokenizer's EOS/EOT/EOM from the GGUF, plus the ids of
//! [`END_OF_TURN_TEXTS`] looked up by text in the vocabulary), stop strings (also across token
//! boundaries: text that could start a stop string is held back until it is decided), max_tokens
//! and the end of the context. With thinking on, text before `</think>` is reasoning.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use graph::{Logits, Model, Sequence};
use serde::Serialize;
use prometheus::{Counter, Histogram, HistogramOpts, IntCounter};
use tokenizer::{StreamDecoder, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub mod cache;
pub mod cold;
pub mod model_args;
pub mod prompt;
pub mod sampler;
mod text_filter;

use cache::{CacheError, CacheOptions, PromptCache, Record};
use sampler::{Sampler, SamplingError, SamplingParams};
pub use text_filter::TextFilter;

/// Vocabulary texts that end an assistant turn besides the GGUF's EOS/EOT/EOM ids: the end of
/// sentence, and the start of a new user turn.
pub const END_OF_TURN_TEXTS: [&str; 2] = ["<｜end▁of▁sentence｜>", chat::USER];

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the tokenizer has {tokenizer} tokens but the model's embedding/output has only {model} rows")]
    VocabMismatch { tokenizer: usize, model: usize },
    #[error("--parallel must be at least 1, found {0}")]
    Parallel(usize),
    #[error("a step holds a prefill chunk of {chunk} tokens beside {} decode tokens, more than the model's micro-batch of {ubatch} (the prefill chunk must be at least 1)", parallel - 1)]
    StepCapacity { chunk: usize, parallel: usize, ubatch: usize },
    #[error("creating sequence {index} of {n_ctx} tokens: {source}")]
    Sequence { index: usize, n_ctx: usize, source: graph::GraphError },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {n} tokens; the context holds {n_ctx} (at most {} prompt tokens)", n_ctx - 1)]
    PromptTooLong { n: usize, n_ctx: usize },
    #[error("prompt {0}")]
    TokenOutOfRange(#[from] graph::TokenOutOfRange),
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("stop strings must not be empty")]
    EmptyStop,
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the engine has stopped")]
    Stopped,
    #[error("the server is busy: {parallel} requests are being generated and {queue_max} are waiting (--queue-max); retry later")]
    QueueFull { parallel: usize, queue_max: usize },
    #[error("setting up the engine's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("prompt cache: {0}")]
    Cache(#[from] CacheError),
    #[error("slot {slot} does not exist (slots 0 to {} with --parallel {parallel})", parallel - 1)]
    NoSlot { slot: usize, parallel: usize },
    #[error("saving and restoring slots needs a prompt-cache directory (--cache-dir)")]
    NoCacheDir,
    #[error("slot {0} holds no cached prompt (prompts are cached in whole micro-batches)")]
    SlotEmpty(usize),
    #[error("cached prompt state: {0}")]
    State(graph::GraphError),
}

impl EngineError {
    /// Whether the request is at fault (HTTP 400) rather than the server.
    pub fn is_client_error(&self) -> bool {
        match self {
            // a slot file that is not there is the client's to name; other I/O is the server's
            EngineError::Cache(CacheError::Io { source, .. }) => source.kind() == std::io::ErrorKind::NotFound,
            EngineError::Cache(CacheError::BadFile { .. } | CacheError::BadFilename(_)) => true,
            EngineError::Cache(CacheError::Locked(_)) | EngineError::State(_) => false,
            _ => !matches!(
                self,
                EngineError::VocabMismatch { .. }
                    | EngineError::Parallel(_)
                    | EngineError::StepCapacity { .. }
                    | EngineError::Sequence { .. }
                    | EngineError::Stopped
                    | EngineError::QueueFull { .. }
                    | EngineError::Metrics(_)
            ),
        }
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Largest number of tokens to generate (also bounded by the context).
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// The output starts inside a thinking block (text before `</think>` is reasoning).
    pub thinking: bool,
    /// End-of-generation tokens do not end the request.
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End of generation token or stop string.
    Stop,
    /// max_tokens or the end of the context.
    Length,
    /// The client went away or cancelled.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Per-request timings (milliseconds; rates in tokens per second).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    pub queue_ms: f64,
    /// Prompt tokens restored from the prompt cache.
    pub cache_n: usize,
    /// Prompt tokens prefilled (the rest of the prompt).
    pub prompt_n: usize,
    pub prompt_ms: f64,
    pub prompt_per_second: f64,
    /// From submission (queueing included) to the first generated token.
    pub ttft_ms: f64,
    pub predicted_n: usize,
    /// From the first generated token to the last.
    pub predicted_ms: f64,
    /// (predicted_n - 1) / predicted_ms: tokens after the first over the time they took.
    pub predicted_per_second: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub finish: FinishReason,
    /// The stop string that ended the generation (finish `Stop` without an end-of-generation token).
    pub stop_sequence: Option<String>,
    pub prompt_tokens: usize,
    /// Prompt tokens restored from the prompt cache instead of prefilled.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Decoded text; `reasoning` for text of a thinking block.
    Text { reasoning: bool, text: String },
    Done(Summary),
    Error(String),
}

/// The client side of a submitted request. Dropping it cancels the request (a queued one never
/// starts; a running one stops at its next token and frees its sequence).
pub struct Handle {
    pub events: UnboundedReceiver<Event>,
}

impl Handle {
    /// Blocks (outside an async runtime) for the next event.
    pub fn next_blocking(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }
}

/// What the engine counts, for /metrics: Prometheus counters, and the two gauges the engine
/// also keeps for itself (sampled when scraped).
#[derive(Debug)]
pub struct Stats {
    pub requests_finished: IntCounter,
    pub requests_cancelled: IntCounter,
    /// Prompt tokens prefilled (not those restored from the cache).
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub prompt_seconds: Counter,
    pub decode_seconds: Counter,
    /// Adaptive placement: experts swapped in, and their bytes copied.
    pub expert_swaps: IntCounter,
    pub expert_swap_bytes: IntCounter,
    /// Requests waiting for a sequence.
    pub queue_depth: AtomicU64,
    /// Requests being generated.
    pub active: AtomicU64,
    /// Prompts that resumed from the prompt cache.
    pub cache_hits: IntCounter,
    /// Prompts the prompt cache held no prefix of.
    pub cache_misses: IntCounter,
    /// Prompt tokens restored instead of prefilled.
    pub cache_reused_tokens: IntCounter,
    /// Bytes of cached prompts in memory.
    pub cache_ram_bytes: AtomicU64,
    /// Bytes of cached prompts on disk (shared with the cache's writer thread).
    pub cache_disk_bytes: Arc<AtomicU64>,
    /// Tokens run per engine step (decode tokens and prefill chunks of every sequence).
    pub step_tokens: Histogram,
    /// Sequences per engine step.
    pub step_sequences: Histogram,
}

impl Stats {
    fn new() -> Result<Stats, prometheus::Error> {
        Ok(Stats {
            requests_finished: IntCounter::new("requests_finished_total", "Generations that finished (stop or length).")?,
            requests_cancelled: IntCounter::new("requests_cancelled_total", "Generations cancelled (client gone or shutdown).")?,
            prompt_tokens: IntCounter::new("prompt_tokens_total", "Prompt tokens prefilled.")?,
            completion_tokens: IntCounter::new("completion_tokens_total", "Tokens generated.")?,
            prompt_seconds: Counter::new("prompt_seconds_total", "Time spent in prefill.")?,
            decode_seconds: Counter::new("decode_seconds_total", "Time from first to last token, summed over requests.")?,
            expert_swaps: IntCounter::new("expert_swaps_total", "Experts swapped into the model's device by the adaptive placement.")?,
            expert_swap_bytes: IntCounter::new("expert_swap_bytes_total", "Expert bytes copied by those swaps.")?,
            queue_depth: AtomicU64::new(0),
            active: AtomicU64::new(0),
            cache_hits: IntCounter::new("prompt_cache_hits_total", "Prompts that resumed from a cached prefix.")?,
            cache_misses: IntCounter::new("prompt_cache_misses_total", "Prompts with no cached prefix (prefilled whole).")?,
            cache_reused_tokens: IntCounter::new("prompt_cache_reused_tokens_total", "Prompt tokens restored from the prompt cache instead of prefilled.")?,
            cache_ram_bytes: AtomicU64::new(0),
            cache_disk_bytes: Arc::new(AtomicU64::new(0)),
            step_tokens: Histogram::with_opts(
                HistogramOpts::new("step_tokens", "Tokens per engine step: every running sequence's decode token and prompt chunks, in one forward pass.")
                    .buckets(prometheus::exponential_buckets(1.0, 2.0, 14)?),
            )?,
            step_sequences: Histogram::with_opts(
                HistogramOpts::new("step_sequences", "Sequences per engine step.").buckets(prometheus::exponential_buckets(1.0, 2.0, 9)?),
            )?,
        })
    }

    /// The integer counters (handles onto the same values), to register with a registry.
    pub fn counters(&self) -> [IntCounter; 9] {
        [
            self.requests_finished.clone(),
            self.requests_cancelled.clone(),
            self.prompt_tokens.clone(),
            self.completion_tokens.clone(),
            self.expert_swaps.clone(),
            self.expert_swap_bytes.clone(),
            self.cache_hits.clone(),
            self.cache_misses.clone(),
            self.cache_reused_tokens.clone(),
        ]
    }

    /// The histograms (per engine step).
    pub fn histograms(&self) -> [Histogram; 2] {
        [self.step_tokens.clone(), self.step_sequences.clone()]
    }

    /// The float counters (seconds).
    pub fn float_counters(&self) -> [Counter; 2] {
        [self.prompt_seconds.clone(), self.decode_seconds.clone()]
    }
}

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Sequences generated at the same time.
    pub parallel: usize,
    /// Context of each sequence in tokens.
    pub n_ctx: usize,
    /// Requests that may wait for a sequence beyond the `parallel` being generated.
    pub queue_max: usize,
    /// With an adaptive placement: at most this many expert bytes are copied after each step
    /// (`Model::replace_experts`).
    pub expert_swap_bytes: u64,
    /// The prompt cache (off when it has neither memory nor a directory).
    pub cache: CacheOptions,
    /// Prompts are prefilled in chunks of this many tokens, from position 0, one chunk per
    /// step beside the other sequences' decode tokens; cached prompts resume at multiples of
    /// it. A step holds up to `prefill_chunk + parallel - 1` tokens: the model's `ubatch`
    /// must be at least that.
    pub prefill_chunk: usize,
}

/// What `POST /slots/{id}?action=…` asks of a sequence's cached prompt (the prefix of its
/// last prompt that the cache holds).
#[derive(Clone, Debug)]
pub enum SlotAction {
    /// Write it to the file of this name in the cache directory's `slots/`.
    Save(String),
    /// Read it from that file into the cache; the slot's next prompt resumes from it.
    Restore(String),
    /// Drop it from the cache, in memory and on disk.
    Erase,
}

/// What a slot action did (llama-server's answer fields).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum SlotOutcome {
    Saved { id_slot: usize, filename: String, n_saved: usize, n_written: u64, timings: SaveTimings },
    Restored { id_slot: usize, filename: String, n_restored: usize, n_read: u64, timings: RestoreTimings },
    Erased { id_slot: usize, n_erased: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SaveTimings {
    pub save_ms: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RestoreTimings {
    pub restore_ms: f64,
}

type SlotReply = tokio::sync::oneshot::Sender<Result<SlotOutcome, EngineError>>;

/// What the compute thread receives.
enum Msg {
    Generate(Job),
    Slot { slot: usize, action: SlotAction, reply: SlotReply },
}

/// What the engine runs, for clients.
#[derive(Clone)]
pub struct EngineInfo {
    pub tokenizer: Tokenizer,
    pub n_ctx: usize,
    pub parallel: usize,
    pub eog: Vec<u32>,
}

pub struct Engine {
    jobs: Option<mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<Stats>,
    pub info: EngineInfo,
    stop_all: Arc<AtomicBool>,
    queue_max: usize,
    /// Requests submitted and not yet done (queued or being generated).
    admitted: Arc<AtomicUsize>,
}

struct Job {
    req: GenRequest,
    tx: UnboundedSender<Event>,
    submitted: Instant,
}

impl Job {
    fn gone(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The end-of-generation ids: the tokenizer's (from GGUF metadata) and [`END_OF_TURN_TEXTS`]
/// found in the vocabulary.
pub fn eog_ids(tok: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tok.eog_ids().to_vec();
    ids.extend(END_OF_TURN_TEXTS.iter().filter_map(|t| tok.token_id(t)));
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl Engine {
    /// Starts the compute thread. The tokenizer may have fewer tokens than the model has
    /// embedding/output rows (the rest is padding, never sampled), not more.
    pub fn start(model: Model, tokenizer: Tokenizer, opts: EngineOptions) -> Result<Engine, EngineError> {
        let EngineOptions { parallel, n_ctx, queue_max, expert_swap_bytes, cache, prefill_chunk } = opts;
        if tokenizer.n_vocab() > model.n_vocab() {
            return Err(EngineError::VocabMismatch { tokenizer: tokenizer.n_vocab(), model: model.n_vocab() });
        }
        if parallel == 0 {
            return Err(EngineError::Parallel(parallel));
        }
        if prefill_chunk == 0 || prefill_chunk.saturating_add(parallel - 1) > model.ubatch() {
            return Err(EngineError::StepCapacity { chunk: prefill_chunk, parallel, ubatch: model.ubatch() });
        }
        let info = EngineInfo { eog: eog_ids(&tokenizer), tokenizer, n_ctx, parallel };
        let stats = Arc::new(Stats::new()?);
        let cache = if cache.enabled() { Some(PromptCache::new(&model, prefill_chunk, &cache, stats.clone())?) } else { None };
        let stop_all = Arc::new(AtomicBool::new(false));
        let admitted = Arc::new(AtomicUsize::new(0));
        let (jobs, rx) = mpsc::channel::<Msg>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), EngineError>>();
        let worker = Worker { model, cache, info: info.clone(), stats: stats.clone(), stop_all: stop_all.clone(), admitted: admitted.clone(), expert_swap_bytes, chunk: prefill_chunk };
        let thread = std::thread::Builder::new()
            .name("dflash-compute".into())
            .spawn(move || worker.run(rx, ready_tx))
            .map_err(|e| EngineError::Sequence { index: 0, n_ctx, source: graph::GraphError::Option(format!("spawning: {e}")) })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Engine { jobs: Some(jobs), thread: Some(thread), stats, info, stop_all, queue_max, admitted }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EngineError::Stopped)
            }
        }
    }

    /// Checks and queues a request; refuses it when `parallel + queue_max` requests are
    /// already queued or running.
    pub fn submit(&self, req: GenRequest) -> Result<Handle, EngineError> {
        let n_vocab = self.info.tokenizer.n_vocab();
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if req.prompt.len() >= self.info.n_ctx {
            return Err(EngineError::PromptTooLong { n: req.prompt.len(), n_ctx: self.info.n_ctx });
        }
        graph::check_token_ids(&req.prompt, n_vocab)?;
        if req.max_tokens == 0 {
            return Err(EngineError::ZeroMaxTokens);
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(EngineError::EmptyStop);
        }
        req.params.validate(n_vocab)?;
        let (parallel, queue_max) = (self.info.parallel, self.queue_max);
        let limit = parallel.saturating_add(queue_max);
        if self.admitted.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).is_err() {
            return Err(EngineError::QueueFull { parallel, queue_max });
        }
        let (tx, events) = unbounded_channel();
        let job = Job { req, tx, submitted: Instant::now() };
        self.stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        let sent = self.jobs.as_ref().map(|j| j.send(Msg::Generate(job)).is_ok()).unwrap_or(false);
        if !sent {
            self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        Ok(Handle { events })
    }

    /// Hands a slot action to the compute thread (it runs between two steps); the answer
    /// comes through the receiver.
    pub fn slot(&self, slot: usize, action: SlotAction) -> Result<tokio::sync::oneshot::Receiver<Result<SlotOutcome, EngineError>>, EngineError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let sent = self.jobs.as_ref().map(|j| j.send(Msg::Slot { slot, action, reply }).is_ok()).unwrap_or(false);
        if sent {
            Ok(rx)
        } else {
            Err(EngineError::Stopped)
        }
    }

    /// Cancels every queued and running request (they end with finish reason `cancelled`).
    pub fn cancel_all(&self) {
        self.stop_all.store(true, Ordering::Relaxed);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    model: Model,
    cache: Option<PromptCache>,
    info: EngineInfo,
    stats: Arc<Stats>,
    stop_all: Arc<AtomicBool>,
    admitted: Arc<AtomicUsize>,
    expert_swap_bytes: u64,
    /// The prefill chunk (`EngineOptions::prefill_chunk`).
    chunk: usize,
}

struct Active {
    job: Job,
    sampler: Sampler,
    decoder: StreamDecoder,
    filter: TextFilter,
    /// The last sampled token, to run next; None while the prompt is being prefilled.
    last: Option<u32>,
    /// Prompt tokens in the sequence (restored from the cache or prefilled).
    fed: usize,
    /// The sequence's state at each multiple of the prefill chunk so far (when caching).
    checkpoints: Vec<Arc<graph::Checkpoint>>,
    generated: usize,
    started: Instant,
    /// When the first chunk of the prompt ran.
    prefill_started: Option<Instant>,
    prompt_s: f64,
    /// Prompt tokens restored from the prompt cache.
    cached: usize,
    first_token: Option<Instant>,
}

struct Slot {
    seq: Sequence,
    active: Option<Active>,
    /// The prompt of the slot's last request (what its slot actions act on).
    last_prompt: Option<Vec<u32>>,
}

/// What a slot runs in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// Its last sampled token.
    Decode,
    /// The next `n` tokens of its prompt.
    Prefill(usize),
}

/// What [`plan_step`] needs to know of a busy slot.
#[derive(Clone, Copy, Debug)]
struct SlotState {
    /// Generating (its last token runs next), or still reading its prompt.
    decoding: bool,
    /// Prompt tokens in the sequence.
    fed: usize,
    prompt_len: usize,
    /// When the request took the slot (older prompts are read first).
    started: Instant,
}

impl Active {
    fn state(&self) -> SlotState {
        SlotState { decoding: self.last.is_some(), fed: self.fed, prompt_len: self.job.req.prompt.len(), started: self.started }
    }
}

/// One step's work, slot by slot (`None`: a free slot), within `capacity` tokens: first the
/// last token of every generating slot, then prompt chunks of the prefilling slots, oldest
/// request first, while a whole chunk fits. A chunk ends at the next multiple of `chunk` (or
/// at the prompt's end), so where a prompt is split never depends on what else runs: its
/// logits are its logits alone (`forward_batch`), and cached prompts resume at those same
/// points. With a capacity of `chunk + parallel - 1`, the oldest prefilling slot always gets
/// a chunk.
fn plan_step(slots: &[Option<SlotState>], chunk: usize, capacity: usize) -> Vec<(usize, Work)> {
    let mut plan = Vec::new();
    let mut room = capacity;
    for (i, s) in slots.iter().enumerate() {
        if s.is_some_and(|s| s.decoding) && room > 0 {
            plan.push((i, Work::Decode));
            room -= 1;
        }
    }
    let mut prefilling: Vec<(usize, SlotState)> = slots.iter().enumerate().filter_map(|(i, s)| s.filter(|s| !s.decoding).map(|s| (i, s))).collect();
    prefilling.sort_by_key(|(i, s)| (s.started, *i));
    for (i, s) in prefilling {
        let n = (chunk - s.fed % chunk).min(s.prompt_len - s.fed);
        if n > room {
            break;
        }
        plan.push((i, Work::Prefill(n)));
        room -= n;
    }
    plan
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Msg>, ready: mpsc::Sender<Result<(), EngineError>>) {
        let mut slots = Vec::with_capacity(self.info.parallel);
        for index in 0..self.info.parallel {
            match self.model.new_sequence(self.info.n_ctx) {
                Ok(seq) => slots.push(Slot { seq, active: None, last_prompt: None }),
                Err(source) => {
                    let _ = ready.send(Err(EngineError::Sequence { index, n_ctx: self.info.n_ctx, source }));
                    return;
                }
            }
        }
        let _ = ready.send(Ok(()));
        drop(ready);
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut open = true;
        loop {
            let busy = slots.iter().any(|s| s.active.is_some());
            if !busy && queue.is_empty() {
                if !open {
                    break;
                }
                match rx.recv() {
                    Ok(m) => self.receive(m, &mut queue, &mut slots),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(m) => self.receive(m, &mut queue, &mut slots),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let stop_all = self.stop_all.load(Ordering::Relaxed);
            queue.retain(|j| {
                if stop_all || j.gone() {
                    self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                    self.admitted.fetch_sub(1, Ordering::AcqRel);
                    finish_unstarted(j, &self.stats);
                    false
                } else {
                    true
                }
            });
            for slot in slots.iter_mut() {
                if slot.active.as_ref().is_some_and(|a| stop_all || a.job.gone()) {
                    self.end(slot, FinishReason::Cancelled);
                }
            }
            for slot in slots.iter_mut().filter(|s| s.active.is_none()) {
                let Some(job) = queue.pop_front() else { break };
                self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.stats.active.fetch_add(1, Ordering::Relaxed);
                slot.last_prompt = Some(job.req.prompt.clone());
                let active = self.begin(job, &mut slot.seq);
                slot.active = Some(active);
            }
            self.step(&mut slots);
        }
    }

    /// One forward pass over every slot's work ([`plan_step`]), then a sampled token for each
    /// slot whose prompt is done.
    fn step(&mut self, slots: &mut [Slot]) {
        let states: Vec<Option<SlotState>> = slots.iter().map(|s| s.active.as_ref().map(Active::state)).collect();
        let plan = plan_step(&states, self.chunk, self.model.ubatch());
        if plan.is_empty() {
            return;
        }
        let now = Instant::now();
        for &(i, work) in &plan {
            if let (Work::Prefill(_), Some(a)) = (work, slots[i].active.as_mut()) {
                a.prefill_started.get_or_insert(now);
            }
        }
        // the work that runs (every planned slot is busy, once), in the order of the outputs
        let mut ran: Vec<(usize, Work)> = Vec::with_capacity(plan.len());
        let result = {
            let mut by_slot: Vec<Option<&mut Slot>> = slots.iter_mut().map(Some).collect();
            let mut items: Vec<(&mut Sequence, &[u32])> = Vec::with_capacity(plan.len());
            for &(i, work) in &plan {
                let Some(Slot { seq, active: Some(a), .. }) = by_slot[i].take() else { continue };
                let tokens = match work {
                    Work::Decode => a.last.as_slice(),
                    Work::Prefill(n) => &a.job.req.prompt[a.fed..a.fed + n],
                };
                items.push((seq, tokens));
                ran.push((i, work));
            }
            self.model.forward_batch(&mut items, Logits::Last)
        };
        let n_tokens: usize = ran.iter().map(|(_, w)| if let Work::Prefill(n) = w { *n } else { 1 }).sum();
        self.stats.step_tokens.observe(n_tokens as f64);
        self.stats.step_sequences.observe(ran.len() as f64);
        let outputs = match result {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("forward: {e}");
                for &(i, _) in &ran {
                    if let Some(a) = slots[i].active.as_ref() {
                        let _ = a.job.tx.send(Event::Error(format!("forward pass failed: {e}")));
                    }
                    self.end(&mut slots[i], FinishReason::Cancelled);
                }
                return;
            }
        };
        self.replace_experts();
        for (&(i, work), logits) in ran.iter().zip(outputs) {
            let slot = &mut slots[i];
            let reason = match work {
                Work::Decode => self.emit(slot, &logits),
                Work::Prefill(n) => match self.prefilled(slot, n) {
                    Ok(true) => self.emit(slot, &logits),
                    Ok(false) => None,
                    Err(e) => {
                        if let Some(a) = slot.active.as_ref() {
                            let _ = a.job.tx.send(Event::Error(format!("caching the prompt's state: {e}")));
                        }
                        Some(FinishReason::Cancelled)
                    }
                },
            };
            if let Some(reason) = reason {
                self.end(slot, reason);
            }
        }
    }
    fn receive(&mut self, m: Msg, queue: &mut VecDeque<Job>, slots: &mut [Slot]) {
        match m {
            Msg::Generate(j) => queue.push_back(j),
            Msg::Slot { slot, action, reply } => {
                let _ = reply.send(self.slot_action(slots, slot, action));
            }
        }
    }

    fn slot_action(&mut self, slots: &mut [Slot], id_slot: usize, action: SlotAction) -> Result<SlotOutcome, EngineError> {
        let parallel = slots.len();
        let slot = slots.get_mut(id_slot).ok_or(EngineError::NoSlot { slot: id_slot, parallel })?;
        let t0 = Instant::now();
        let ms = |t0: Instant| t0.elapsed().as_secs_f64() * 1e3;
        match action {
            SlotAction::Erase => {
                let n_erased = match (self.cache.as_mut(), slot.last_prompt.take()) {
                    (Some(cache), Some(prompt)) => cache.forget(&prompt),
                    _ => 0,
                };
                Ok(SlotOutcome::Erased { id_slot, n_erased })
            }
            SlotAction::Save(filename) => {
                let cache = self.cache.as_mut().filter(|c| c.disk().is_some()).ok_or(EngineError::NoCacheDir)?;
                let prompt = slot.last_prompt.as_ref().ok_or(EngineError::SlotEmpty(id_slot))?;
                let hit = cache.find(prompt, prompt.len()).ok_or(EngineError::SlotEmpty(id_slot))?;
                let record = if hit.pos == hit.record.tokens.len() {
                    hit.record
                } else {
                    Arc::new(hit.record.prefix(hit.pos, cache.ubatch()).map_err(EngineError::State)?)
                };
                let disk = cache.disk().ok_or(EngineError::NoCacheDir)?;
                let n_written = disk.save_slot_file(&filename, &record)?;
                Ok(SlotOutcome::Saved { id_slot, filename, n_saved: hit.pos, n_written, timings: SaveTimings { save_ms: ms(t0) } })
            }
            SlotAction::Restore(filename) => {
                let cache = self.cache.as_mut().ok_or(EngineError::NoCacheDir)?;
                let (record, n_read) = cache.disk().ok_or(EngineError::NoCacheDir)?.read_slot_file(&filename)?;
                let tokens = record.tokens.clone();
                cache.insert(record);
                let n_restored = tokens.len();
                slot.last_prompt = Some(tokens);
                Ok(SlotOutcome::Restored { id_slot, filename, n_restored, n_read, timings: RestoreTimings { restore_ms: ms(t0) } })
            }
        }
    }


    /// A request taking a slot: the longest prefix of its prompt the cache holds is restored
    /// into the sequence (a prefix that cannot be restored is dropped from the cache and the
    /// prompt prefilled whole).
    fn begin(&mut self, job: Job, seq: &mut Sequence) -> Active {
        let mut sampler = Sampler::new(job.req.params.clone(), self.info.tokenizer.n_vocab());
        sampler.accept(&job.req.prompt);
        let filter = TextFilter::new(job.req.stop.clone(), job.req.thinking);
        let mut a = Active {
            sampler,
            decoder: self.info.tokenizer.stream_decoder(true),
            filter,
            last: None,
            fed: 0,
            checkpoints: Vec::new(),
            generated: 0,
            started: Instant::now(),
            prefill_started: None,
            prompt_s: 0.0,
            cached: 0,
            first_token: None,
            job,
        };
        let Some(cache) = self.cache.as_mut() else { return a };
        let chunk = self.chunk;
        let restored = cache.lookup(&a.job.req.prompt).and_then(|hit| {
            let result = match hit.record.checkpoint_at(hit.pos, chunk) {
                Some(cp) => seq.restore(cp, &hit.record.entries),
                None => Err(graph::GraphError::State(format!("the cached prompt has no checkpoint at {}", hit.pos))),
            };
            match result {
                Ok(()) => Some(hit),
                Err(e) => {
                    tracing::warn!("could not restore a cached prompt ({e}); it is dropped and the prompt prefilled whole");
                    seq.reset();
                    cache.forget(&hit.record.tokens);
                    None
                }
            }
        });
        match restored {
            Some(hit) => {
                a.checkpoints = hit.record.checkpoints[..hit.pos / chunk].to_vec();
                a.cached = hit.pos;
                a.fed = hit.pos;
                self.stats.cache_hits.inc();
                self.stats.cache_reused_tokens.inc_by(hit.pos as u64);
            }
            None => self.stats.cache_misses.inc(),
        }
        a
    }

    /// After `n` more prompt tokens ran: the state is copied out at each multiple of the chunk
    /// (when caching); at the prompt's end what it added is cached. Whether the prompt is done.
    fn prefilled(&mut self, slot: &mut Slot, n: usize) -> Result<bool, graph::GraphError> {
        let Some(a) = slot.active.as_mut() else { return Ok(false) };
        a.fed += n;
        let chunk = self.chunk;
        if self.cache.is_some() && slot.seq.pos().is_multiple_of(chunk) {
            a.checkpoints.push(Arc::new(slot.seq.checkpoint()));
        }
        if a.fed < a.job.req.prompt.len() {
            return Ok(false);
        }
        a.prompt_s = a.prefill_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let covered = a.checkpoints.len() * chunk;
        if let Some(cache) = self.cache.as_mut().filter(|_| covered > a.cached) {
            let record = Record { tokens: a.job.req.prompt[..covered].to_vec(), checkpoints: std::mem::take(&mut a.checkpoints), entries: slot.seq.entries(covered)? };
            cache.insert(record);
        }
        a.checkpoints.clear();
        Ok(true)
    }

    /// A token sampled from `logits` and its text sent; Some(reason) when the request ends.
    fn emit(&mut self, slot: &mut Slot, logits: &[f32]) -> Option<FinishReason> {
        let a = slot.active.as_mut()?;
        let id = a.sampler.sample(logits);
        a.generated += 1;
        a.last = Some(id);
        if a.first_token.is_none() {
            a.first_token = Some(Instant::now());
        }
        if !a.job.req.ignore_eos && self.info.eog.contains(&id) {
            return Some(FinishReason::Stop);
        }
        let text = match a.decoder.push(id) {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => {
                let _ = a.job.tx.send(Event::Error(format!("decoding token {id}: {e}")));
                return Some(FinishReason::Cancelled);
            }
        };
        let (pieces, stopped) = a.filter.push(&text);
        for p in pieces {
            if a.job.tx.send(p).is_err() {
                return Some(FinishReason::Cancelled);
            }
        }
        if stopped {
            return Some(FinishReason::Stop);
        }
        if a.generated >= a.job.req.max_tokens || slot.seq.pos() >= slot.seq.n_ctx() {
            return Some(FinishReason::Length);
        }
        None
    }

    /// The slot's request ends: its sequence is cleared for the next one.
    fn end(&self, slot: &mut Slot, reason: FinishReason) {
        slot.seq.reset();
        if let Some(a) = slot.active.take() {
            self.finish(a, reason);
        }
    }

    /// Between two steps: an adaptive placement follows the routing (bounded bytes per step).
    /// A failed swap leaves the placement as it was and is logged; serving goes on.
    fn replace_experts(&mut self) {
        if !self.model.is_adaptive() || self.expert_swap_bytes == 0 {
            return;
        }
        match self.model.replace_experts(self.expert_swap_bytes) {
            Ok(r) => {
                self.stats.expert_swaps.inc_by(r.swaps);
                self.stats.expert_swap_bytes.inc_by(r.bytes);
                if r.swaps > 0 {
                    tracing::debug!(swaps = r.swaps, bytes = r.bytes, "experts re-placed");
                }
            }
            Err(e) => tracing::error!("expert re-placement: {e}"),
        }
    }


    fn finish(&self, mut a: Active, finish: FinishReason) {
        let now = Instant::now();
        if finish != FinishReason::Cancelled {
            let mut rest = a.decoder.finish().unwrap_or_default();
            if finish == FinishReason::Stop && a.filter.stopped {
                rest.clear();
            }
            let (mut pieces, _) = a.filter.push(&rest);
            if !a.filter.stopped {
                pieces.extend(a.filter.flush());
            }
            for p in pieces {
                let _ = a.job.tx.send(p);
            }
        }
        let prompt_n = a.job.req.prompt.len() - a.cached;
        let first = a.first_token.unwrap_or(now);
        let decode_s = (now - first).as_secs_f64();
        let timings = Timings {
            queue_ms: (a.started - a.job.submitted).as_secs_f64() * 1e3,
            cache_n: a.cached,
            prompt_n,
            prompt_ms: a.prompt_s * 1e3,
            prompt_per_second: rate(prompt_n, a.prompt_s),
            ttft_ms: (first - a.job.submitted).as_secs_f64() * 1e3,
            predicted_n: a.generated,
            predicted_ms: decode_s * 1e3,
            predicted_per_second: rate(a.generated.saturating_sub(1), decode_s),
        };
        let s = &self.stats;
        if finish == FinishReason::Cancelled {
            s.requests_cancelled.inc();
        } else {
            s.requests_finished.inc();
        }
        if a.first_token.is_some() {
            s.prompt_tokens.inc_by(prompt_n as u64);
            s.prompt_seconds.inc_by(a.prompt_s);
            s.completion_tokens.inc_by(a.generated as u64);
            s.decode_seconds.inc_by(decode_s);
        }
        tracing::debug!(?finish, prompt_n, cached = a.cached, generated = a.generated, "request done");
        let stop_sequence = a.filter.matched.take();
        let summary =
            Summary { finish, stop_sequence, prompt_tokens: a.job.req.prompt.len(), cached_tokens: a.cached, completion_tokens: a.generated, timings };
        // the gauges drop before the client hears `Done`, so what it reads next is already true
        s.active.fetch_sub(1, Ordering::Relaxed);
        self.admitted.fetch_sub(1, Ordering::AcqRel);
        let _ = a.job.tx.send(Event::Done(summary));
    }
}

fn finish_unstarted(j: &Job, stats: &Stats) {
    stats.requests_cancelled.inc();
    let summary = Summary {
        finish: FinishReason::Cancelled,
        stop_sequence: None,
        prompt_tokens: j.req.prompt.len(),
        cached_tokens: 0,
        completion_tokens: 0,
        timings: Timings::default(),
    };
    let _ = j.tx.send(Event::Done(summary));
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, ms: u64, decoding: bool, fed: usize, prompt_len: usize) -> Option<SlotState> {
        Some(SlotState { decoding, fed, prompt_len, started: t0 + Duration::from_millis(ms) })
    }

    #[test]
    fn a_step_holds_every_decode_token_then_whole_chunks_oldest_first() {
        let t0 = Instant::now();
        // chunk 32, 4 slots: capacity 35
        let slots = [at(t0, 3, false, 0, 100), at(t0, 0, true, 7, 7), None, at(t0, 1, false, 40, 50)];
        let plan = plan_step(&slots, 32, 35);
        // the decode token; slot 3 (older) reads up to its next multiple of 32 (40 → 64 is
        // 24, but its prompt ends at 50: 10); slot 0's whole chunk of 32 no longer fits in 24
        assert_eq!(plan, vec![(1, Work::Decode), (3, Work::Prefill(10))]);
        // with room, both chunks; a chunk is cut at the multiple of 32, never by the room
        let plan = plan_step(&slots, 32, 80);
        assert_eq!(plan, vec![(1, Work::Decode), (3, Work::Prefill(10)), (0, Work::Prefill(32))]);
        let slots = [at(t0, 0, false, 70, 200), at(t0, 1, true, 9, 9), at(t0, 2, true, 5, 5), at(t0, 3, true, 5, 5)];
        assert_eq!(plan_step(&slots, 32, 35), vec![(1, Work::Decode), (2, Work::Decode), (3, Work::Decode), (0, Work::Prefill(26))]);
        // nothing busy, nothing to run
        assert!(plan_step(&[None, None], 32, 33).is_empty());
    }

    #[test]
    fn with_capacity_chunk_plus_parallel_minus_one_the_oldest_prompt_always_moves() {
        let t0 = Instant::now();
        for parallel in 1..6 {
            for chunk in [1, 7, 32] {
                for fed in [0, 1, chunk - 1, chunk, 3 * chunk + 1] {
                    // every other slot generating, the oldest request reading its prompt
                    let mut slots: Vec<Option<SlotState>> = (1..parallel).map(|i| at(t0, 10 + i as u64, true, 4, 4)).collect();
                    slots.push(at(t0, 0, false, fed, fed + 5 * chunk));
                    let plan = plan_step(&slots, chunk, chunk + parallel - 1);
                    let want = chunk - fed % chunk;
                    assert_eq!(plan.last(), Some(&(parallel - 1, Work::Prefill(want))), "parallel {parallel} chunk {chunk} fed {fed}");
                    assert_eq!(plan.len(), parallel);
                }
            }
        }
    }
}
