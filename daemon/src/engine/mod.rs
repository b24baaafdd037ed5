//! The generation engine: one compute thread owns the `graph::Model` and `parallel` sequences.
//! Requests queue while every sequence is busy (at most `queue_max` of them; beyond, `submit`
//! refuses with [`EngineError::QueueFull`]); active requests advance one token each in turn
//! (each sequence runs its own forward: batching decode across sequences is future work). Text
//! streams back through an unbounded channel as it is decoded; a dropped receiver (or [`Engine::cancel_all`])
//! ends the request and frees its sequence.
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
use prometheus::{Counter, IntCounter};
use tokenizer::{StreamDecoder, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub mod cold;
pub mod model_args;
pub mod prompt;
pub mod sampler;
mod text_filter;

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
}

impl EngineError {
    /// Whether the request is at fault (HTTP 400) rather than the server.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            EngineError::VocabMismatch { .. }
                | EngineError::Parallel(_)
                | EngineError::Sequence { .. }
                | EngineError::Stopped
                | EngineError::QueueFull { .. }
                | EngineError::Metrics(_)
        )
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
        })
    }

    /// The integer counters (handles onto the same values), to register with a registry.
    pub fn counters(&self) -> [IntCounter; 6] {
        [
            self.requests_finished.clone(),
            self.requests_cancelled.clone(),
            self.prompt_tokens.clone(),
            self.completion_tokens.clone(),
            self.expert_swaps.clone(),
            self.expert_swap_bytes.clone(),
        ]
    }

    /// The float counters (seconds).
    pub fn float_counters(&self) -> [Counter; 2] {
        [self.prompt_seconds.clone(), self.decode_seconds.clone()]
    }
}

/// How the engine runs.
#[derive(Clone, Copy, Debug)]
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
    jobs: Option<mpsc::Sender<Job>>,
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
        let EngineOptions { parallel, n_ctx, queue_max, expert_swap_bytes } = opts;
        if tokenizer.n_vocab() > model.n_vocab() {
            return Err(EngineError::VocabMismatch { tokenizer: tokenizer.n_vocab(), model: model.n_vocab() });
        }
        if parallel == 0 {
            return Err(EngineError::Parallel(parallel));
        }
        let info = EngineInfo { eog: eog_ids(&tokenizer), tokenizer, n_ctx, parallel };
        let stats = Arc::new(Stats::new()?);
        let stop_all = Arc::new(AtomicBool::new(false));
        let admitted = Arc::new(AtomicUsize::new(0));
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), EngineError>>();
        let worker = Worker { model, info: info.clone(), stats: stats.clone(), stop_all: stop_all.clone(), admitted: admitted.clone(), expert_swap_bytes };
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
        let sent = self.jobs.as_ref().map(|j| j.send(job).is_ok()).unwrap_or(false);
        if !sent {
            self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        Ok(Handle { events })
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
    info: EngineInfo,
    stats: Arc<Stats>,
    stop_all: Arc<AtomicBool>,
    admitted: Arc<AtomicUsize>,
    expert_swap_bytes: u64,
}

struct Active {
    job: Job,
    sampler: Sampler,
    decoder: StreamDecoder,
    filter: TextFilter,
    last: Option<u32>,
    generated: usize,
    started: Instant,
    prompt_s: f64,
    first_token: Option<Instant>,
}

struct Slot {
    seq: Sequence,
    active: Option<Active>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Job>, ready: mpsc::Sender<Result<(), EngineError>>) {
        let mut slots = Vec::with_capacity(self.info.parallel);
        for index in 0..self.info.parallel {
            match self.model.new_sequence(self.info.n_ctx) {
                Ok(seq) => slots.push(Slot { seq, active: None }),
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
                    Ok(j) => queue.push_back(j),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(j) => queue.push_back(j),
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
            for slot in slots.iter_mut().filter(|s| s.active.is_none()) {
                let Some(job) = queue.pop_front() else { break };
                self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.stats.active.fetch_add(1, Ordering::Relaxed);
                slot.active = Some(self.begin(job));
            }
            for slot in slots.iter_mut() {
                let Some(a) = slot.active.as_mut() else { continue };
                if let Some(reason) = self.step(&mut slot.seq, a, stop_all) {
                    slot.seq.reset();
                    if let Some(a) = slot.active.take() {
                        self.finish(a, reason);
                    }
                }
            }
        }
    }

    fn begin(&self, job: Job) -> Active {
        let mut sampler = Sampler::new(job.req.params.clone(), self.info.tokenizer.n_vocab());
        sampler.accept(&job.req.prompt);
        let filter = TextFilter::new(job.req.stop.clone(), job.req.thinking);
        Active {
            sampler,
            decoder: self.info.tokenizer.stream_decoder(true),
            filter,
            last: None,
            generated: 0,
            started: Instant::now(),
            prompt_s: 0.0,
            first_token: None,
            job,
        }
    }

    /// One forward and one sampled token; Some(reason) when the request ends.
    fn step(&mut self, seq: &mut Sequence, a: &mut Active, stop_all: bool) -> Option<FinishReason> {
        if stop_all || a.job.gone() {
            return Some(FinishReason::Cancelled);
        }
        let t0 = Instant::now();
        let result = match a.last {
            None => self.model.forward(seq, &a.job.req.prompt, Logits::Last),
            Some(t) => self.model.forward(seq, &[t], Logits::Last),
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("forward: {e}");
                let _ = a.job.tx.send(Event::Error(format!("forward pass failed: {e}")));
                return Some(FinishReason::Cancelled);
            }
        };
        if a.last.is_none() {
            a.prompt_s = t0.elapsed().as_secs_f64();
        }
        self.replace_experts();
        let id = a.sampler.sample(&logits);
        a.generated += 1;
        a.last = Some(id);
        if a.first_token.is_none() {
            a.first_token = Some(Instant::now());
        }
        if self.info.eog.contains(&id) {
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
        if a.generated >= a.job.req.max_tokens || seq.pos() >= seq.n_ctx() {
            return Some(FinishReason::Length);
        }
        None
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
        let prompt_n = a.job.req.prompt.len();
        let first = a.first_token.unwrap_or(now);
        let decode_s = (now - first).as_secs_f64();
        let timings = Timings {
            queue_ms: (a.started - a.job.submitted).as_secs_f64() * 1e3,
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
        tracing::debug!(?finish, prompt_n, generated = a.generated, "request done");
        let stop_sequence = a.filter.matched.take();
        let summary = Summary { finish, stop_sequence, prompt_tokens: prompt_n, completion_tokens: a.generated, timings };
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
