//! The generation engine: one compute thread owns the `graph::Model` and `parallel` sequences.
//! Requests queue while every sequence is busy; active requests advance one token each in turn
//! (each sequence runs its own forward: batching decode across sequences is future work). Text
//! streams back through an unbounded channel as it is decoded; a dropped receiver (or [`Engine::cancel_all`])
//! ends the request and frees its sequence.
//!
//! Stopping: end-of-generation ids (the tokenizer's EOS/EOT/EOM from the GGUF, plus the ids of
//! [`END_OF_TURN_TEXTS`] looked up by text in the vocabulary), stop strings (also across token
//! boundaries: text that could start a stop string is held back until it is decided), max_tokens
//! and the end of the context. With thinking on, text before `</think>` is reasoning.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use graph::{Logits, Model, Sequence};
use tokenizer::{StreamDecoder, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::sampler::{Sampler, SamplingError, SamplingParams};

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
    #[error("prompt token id {id} (index {index}) is outside the vocabulary [0, {n_vocab})")]
    TokenOutOfRange { id: i64, index: usize, n_vocab: usize },
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("stop strings must not be empty")]
    EmptyStop,
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the engine has stopped")]
    Stopped,
}

impl EngineError {
    /// Whether the request is at fault (HTTP 400) rather than the server.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, EngineError::VocabMismatch { .. } | EngineError::Parallel(_) | EngineError::Sequence { .. } | EngineError::Stopped)
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

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub finish: FinishReason,
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

/// Counters for /metrics.
#[derive(Default, Debug)]
pub struct Stats {
    pub requests_finished: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub prompt_us: AtomicU64,
    pub decode_us: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active: AtomicU64,
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
    pub fn start(model: Model, tokenizer: Tokenizer, parallel: usize, n_ctx: usize) -> Result<Engine, EngineError> {
        if tokenizer.n_vocab() > model.n_vocab() {
            return Err(EngineError::VocabMismatch { tokenizer: tokenizer.n_vocab(), model: model.n_vocab() });
        }
        if parallel == 0 {
            return Err(EngineError::Parallel(parallel));
        }
        let info = EngineInfo { eog: eog_ids(&tokenizer), tokenizer, n_ctx, parallel };
        let stats = Arc::new(Stats::default());
        let stop_all = Arc::new(AtomicBool::new(false));
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), EngineError>>();
        let worker = Worker { model, info: info.clone(), stats: stats.clone(), stop_all: stop_all.clone() };
        let thread = std::thread::Builder::new()
            .name("dflash-compute".into())
            .spawn(move || worker.run(rx, ready_tx))
            .map_err(|e| EngineError::Sequence { index: 0, n_ctx, source: graph::GraphError::Option(format!("spawning: {e}")) })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Engine { jobs: Some(jobs), thread: Some(thread), stats, info, stop_all }),
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

    /// Checks and queues a request.
    pub fn submit(&self, req: GenRequest) -> Result<Handle, EngineError> {
        let n_vocab = self.info.tokenizer.n_vocab();
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if req.prompt.len() >= self.info.n_ctx {
            return Err(EngineError::PromptTooLong { n: req.prompt.len(), n_ctx: self.info.n_ctx });
        }
        if let Some((index, &id)) = req.prompt.iter().enumerate().find(|(_, &t)| t as usize >= n_vocab) {
            return Err(EngineError::TokenOutOfRange { id: id.into(), index, n_vocab });
        }
        if req.max_tokens == 0 {
            return Err(EngineError::ZeroMaxTokens);
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(EngineError::EmptyStop);
        }
        req.params.validate(n_vocab)?;
        let (tx, events) = unbounded_channel();
        let job = Job { req, tx, submitted: Instant::now() };
        self.stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        let sent = self.jobs.as_ref().map(|j| j.send(job).is_ok()).unwrap_or(false);
        if !sent {
            self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
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
                    if let Some(a) = slot.active.take() {
                        self.finish(a, reason);
                    }
                    slot.seq.reset();
                    self.stats.active.fetch_sub(1, Ordering::Relaxed);
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
            s.requests_cancelled.fetch_add(1, Ordering::Relaxed);
        } else {
            s.requests_finished.fetch_add(1, Ordering::Relaxed);
        }
        if a.first_token.is_some() {
            s.prompt_tokens.fetch_add(prompt_n as u64, Ordering::Relaxed);
            s.prompt_us.fetch_add((a.prompt_s * 1e6) as u64, Ordering::Relaxed);
            s.completion_tokens.fetch_add(a.generated as u64, Ordering::Relaxed);
            s.decode_us.fetch_add((decode_s * 1e6) as u64, Ordering::Relaxed);
        }
        tracing::debug!(?finish, prompt_n, generated = a.generated, "request done");
        let summary = Summary { finish, prompt_tokens: prompt_n, completion_tokens: a.generated, timings };
        let _ = a.job.tx.send(Event::Done(summary));
    }
}

fn finish_unstarted(j: &Job, stats: &Stats) {
    stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
    let summary = Summary { finish: FinishReason::Cancelled, prompt_tokens: j.req.prompt.len(), completion_tokens: 0, timings: Timings::default() };
    let _ = j.tx.send(Event::Done(summary));
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// Splits generated text into reasoning and content at `</think>` and stops at the first stop
/// string, holding back any tail that could still become a stop string or `</think>`.
#[derive(Debug)]
pub struct TextFilter {
    stops: Vec<String>,
    reasoning: bool,
    buf: String,
    pub stopped: bool,
}

impl TextFilter {
    pub fn new(stops: Vec<String>, thinking: bool) -> TextFilter {
        TextFilter { stops, reasoning: thinking, buf: String::new(), stopped: false }
    }

    fn emit(out: &mut Vec<Event>, reasoning: bool, text: &str) {
        if text.is_empty() {
            return;
        }
        match out.last_mut() {
            Some(Event::Text { reasoning: r, text: t }) if *r == reasoning => t.push_str(text),
            _ => out.push(Event::Text { reasoning, text: text.to_string() }),
        }
    }

    /// Adds decoded text; returns what can be sent now and whether a stop string was found
    /// (text from the stop string on is dropped).
    pub fn push(&mut self, text: &str) -> (Vec<Event>, bool) {
        let mut out = Vec::new();
        if self.stopped {
            return (out, true);
        }
        self.buf.push_str(text);
        loop {
            let think = if self.reasoning { self.buf.find(chat::THINK_END) } else { None };
            let stop = self.stops.iter().filter_map(|s| self.buf.find(s.as_str())).min();
            match (think, stop) {
                (Some(t), s) if !matches!(s, Some(s) if s <= t) => {
                    Self::emit(&mut out, true, &self.buf[..t]);
                    self.buf.drain(..t + chat::THINK_END.len());
                    self.reasoning = false;
                }
                (_, Some(s)) => {
                    Self::emit(&mut out, self.reasoning, &self.buf[..s]);
                    self.buf.clear();
                    self.stopped = true;
                    return (out, true);
                }
                _ => break,
            }
        }
        let hold = self.held_len();
        let cut = self.buf.len() - hold;
        Self::emit(&mut out, self.reasoning, &self.buf[..cut]);
        self.buf.drain(..cut);
        (out, false)
    }

    /// The longest tail of the buffer that is a proper prefix of a stop string (or of `</think>`
    /// while reasoning).
    fn held_len(&self) -> usize {
        let think = self.reasoning.then_some(chat::THINK_END);
        let mut hold = 0;
        for m in self.stops.iter().map(String::as_str).chain(think) {
            for k in (hold + 1..m.len().min(self.buf.len() + 1)).rev() {
                let start = self.buf.len() - k;
                if self.buf.is_char_boundary(start) && m.starts_with(&self.buf[start..]) {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }

    /// End of generation: whatever was held back is text after all.
    pub fn flush(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let buf = std::mem::take(&mut self.buf);
        Self::emit(&mut out, self.reasoning, &buf);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], thinking: bool, pieces: &[&str]) -> (Vec<(bool, String)>, bool) {
        let mut f = TextFilter::new(stops.iter().map(|s| s.to_string()).collect(), thinking);
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let (ev, s) = f.push(p);
            out.extend(ev);
            if s {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.extend(f.flush());
        }
        // merge adjacent pieces of the same kind: the split points are not part of the contract
        let mut merged: Vec<(bool, String)> = Vec::new();
        for e in out {
            let Event::Text { reasoning, text } = e else { panic!("{e:?}") };
            match merged.last_mut() {
                Some((r, t)) if *r == reasoning => t.push_str(&text),
                _ => merged.push((reasoning, text)),
            }
        }
        (merged, stopped)
    }

    #[test]
    fn stop_string_across_token_boundaries() {
        let (out, stopped) = run(&["END"], false, &["abc E", "N", "D more"]);
        assert_eq!(out, vec![(false, "abc ".to_string())]);
        assert!(stopped);
        // a prefix that does not complete is released
        let (out, stopped) = run(&["END"], false, &["abc E", "N", "X"]);
        assert_eq!(out, vec![(false, "abc ENX".to_string())]);
        assert!(!stopped);
        // held text comes out at the end of generation
        let (out, _) = run(&["END"], false, &["abc EN"]);
        assert_eq!(out, vec![(false, "abc EN".to_string())]);
    }

    #[test]
    fn held_back_text_is_not_sent_early() {
        let mut f = TextFilter::new(vec!["\n\nUser:".into()], false);
        let (ev, _) = f.push("Hi\n");
        assert_eq!(ev, vec![Event::Text { reasoning: false, text: "Hi".into() }]);
        let (ev, _) = f.push("\nUs");
        assert_eq!(ev, vec![]);
        let (ev, stopped) = f.push("er: x");
        assert_eq!((ev, stopped), (vec![], true));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped) = run(&["zz", "b"], false, &["a", "bzz"]);
        assert_eq!((out, stopped), (vec![(false, "a".to_string())], true));
    }

    #[test]
    fn thinking_splits_at_think_end() {
        let (out, _) = run(&[], true, &["let me", " see</th", "ink>The answer"]);
        assert_eq!(out, vec![(true, "let me see".to_string()), (false, "The answer".to_string())]);
        // without thinking, </think> is ordinary content
        let (out, _) = run(&[], false, &["a</think>b"]);
        assert_eq!(out, vec![(false, "a</think>b".to_string())]);
        // a stop string inside the reasoning stops there
        let (out, stopped) = run(&["STOP"], true, &["xSTOPy</think>z"]);
        assert_eq!((out, stopped), (vec![(true, "x".to_string())], true));
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        let (out, stopped) = run(&["日本語"], false, &["こ日", "本", "x"]);
        assert_eq!((out, stopped), (vec![(false, "こ日本x".to_string())], false));
        let (out, stopped) = run(&["日本語"], false, &["こ日", "本語"]);
        assert_eq!((out, stopped), (vec![(false, "こ".to_string())], true));
    }
}
