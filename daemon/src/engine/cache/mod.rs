//! The prompt cache: a new request resumes from the longest cached prefix of its prompt and
//! prefills only the rest, with the same logits as without the cache, bit for bit.
//!
//! Why only micro-batch boundaries: a prompt is prefilled in micro-batches of `ubatch` tokens
//! from position 0, and the arithmetic of a step depends on its micro-batch (the matrix
//! kernels, the order keys are summed in). A request that resumes at a multiple of `ubatch`
//! from the state an uncached run had there, and then runs the same micro-batches, computes
//! exactly what the uncached run computes. So while a prompt is prefilled, the sequence's
//! state is copied out at every multiple of `ubatch` ([`graph::Checkpoint`]: the raw key ring
//! and the compressors' open-window rows, small), and once at the end its compressed entries
//! up to the last such point ([`graph::Entries`], shared by every checkpoint). A [`Record`]
//! is those tokens with their checkpoints and entries. A later prompt resumes at the last
//! checkpoint at or before both where it leaves the record's tokens and its own last token
//! (whose logits must be computed), so a prompt that diverges inside the cached part replays
//! from the checkpoint before the divergence. Generated tokens are not cached: an uncached run
//! prefills them as part of the next prompt, in micro-batches, not one at a time.
//!
//! Records live in memory under `--cache-ram-mb` (least recently used dropped first), and
//! with `--cache-dir` also on disk ([`disk`]), keyed by the model identity
//! ([`identity::model_identity`]: the weights and everything that changes the arithmetic)
//! and their tokens, so they survive a restart. A record whose tokens start another's makes
//! the shorter one redundant: a conversation keeps one record that grows by turn.
use std::path::PathBuf;
use std::sync::Arc;

use graph::{Checkpoint, Entries, Model};

use super::Stats;

mod disk;
mod file;
mod identity;
#[cfg(test)]
mod tests;

pub use disk::DiskCache;
pub use identity::model_identity;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the prompt-cache directory {0} is in use by another dflash process")]
    Locked(String),
    #[error("{path} cannot be used: {problem}")]
    BadFile { path: String, problem: String },
    #[error("invalid file name {0:?}: use letters, digits, '.', '_' and '-', not starting with '.'")]
    BadFilename(String),
}

/// Where and how much the cache keeps.
#[derive(Clone, Debug, Default)]
pub struct CacheOptions {
    /// Bytes of records kept in memory (0: none).
    pub ram_bytes: u64,
    /// Directory of records on disk.
    pub dir: Option<PathBuf>,
    /// Bytes of record files kept in `dir`.
    pub disk_bytes: u64,
}

impl CacheOptions {
    pub fn enabled(&self) -> bool {
        self.ram_bytes > 0 || self.dir.is_some()
    }
}

/// A prompt's state at each micro-batch boundary of its first `tokens.len()` tokens.
#[derive(Debug, PartialEq)]
pub struct Record {
    /// A whole number of micro-batches.
    pub tokens: Vec<u32>,
    /// At every multiple of the micro-batch in (0, tokens.len()], in order.
    pub checkpoints: Vec<Arc<Checkpoint>>,
    /// The compressed entries of all `tokens`.
    pub entries: Entries,
}

impl Record {
    pub fn bytes(&self) -> u64 {
        (self.tokens.len() * 4 + self.checkpoints.iter().map(|c| c.bytes().len()).sum::<usize>() + self.entries.len_bytes()) as u64
    }

    /// The checkpoints and entries must cover the tokens at every multiple of `ubatch`.
    pub fn check(&self, ubatch: usize) -> Result<(), String> {
        let n = self.tokens.len();
        if ubatch == 0 || n == 0 || !n.is_multiple_of(ubatch) {
            return Err(format!("{n} tokens are not a whole number of micro-batches of {ubatch}"));
        }
        for (k, cp) in self.checkpoints.iter().enumerate() {
            if cp.pos() != (k + 1) * ubatch {
                return Err(format!("checkpoint {k} is at position {}, expected {}", cp.pos(), (k + 1) * ubatch));
            }
        }
        if self.checkpoints.len() != n / ubatch {
            return Err(format!("{} checkpoints for {n} tokens in micro-batches of {ubatch}", self.checkpoints.len()));
        }
        if self.entries.pos() != n {
            return Err(format!("entries of {} tokens for a record of {n}", self.entries.pos()));
        }
        Ok(())
    }

    /// The checkpoint at `pos` (a multiple of `ubatch` the record covers).
    pub fn checkpoint_at(&self, pos: usize, ubatch: usize) -> Option<&Arc<Checkpoint>> {
        (pos / ubatch).checked_sub(1).and_then(|k| self.checkpoints.get(k)).filter(|c| c.pos() == pos)
    }

    /// The record cut to its first `pos` tokens (a multiple of `ubatch`).
    pub fn prefix(&self, pos: usize, ubatch: usize) -> Result<Record, graph::GraphError> {
        Ok(Record { tokens: self.tokens[..pos].to_vec(), checkpoints: self.checkpoints[..pos / ubatch].to_vec(), entries: self.entries.prefix(pos)? })
    }
}

/// How many tokens of `prompt` a record of `tokens` restores: the tokens they share, at most
/// `limit`, down to a multiple of `ubatch`.
pub fn covered(tokens: &[u32], prompt: &[u32], limit: usize, ubatch: usize) -> usize {
    let shared = tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    shared.min(limit) / ubatch * ubatch
}

/// A record and how many tokens of the prompt it restores.
pub struct Hit {
    pub record: Arc<Record>,
    pub pos: usize,
}

struct Cached {
    record: Arc<Record>,
    used: u64,
}

/// The records in memory, and on disk when there is a directory.
pub struct PromptCache {
    ubatch: usize,
    ram_budget: u64,
    ram: Vec<Cached>,
    tick: u64,
    disk: Option<DiskCache>,
    stats: Arc<Stats>,
}

impl PromptCache {
    /// The cache for `model`'s states, of prompts prefilled in chunks of `chunk` tokens (where
    /// a prompt is split is part of the arithmetic, so of the identity of files on disk).
    pub fn new(model: &Model, chunk: usize, opts: &CacheOptions, stats: Arc<Stats>) -> Result<PromptCache, CacheError> {
        let identity = match opts.dir {
            Some(_) => {
                let numerics = format!("{}; prefill chunk {chunk}", model.numerics());
                model_identity(&model.file, &numerics).map_err(|source| CacheError::Io { path: model.file.path.display().to_string(), source })?
            }
            None => [0; 32],
        };
        PromptCache::open(chunk, identity, opts, stats)
    }

    /// The cache of the states of a model of this `identity` that runs micro-batches of
    /// `ubatch` tokens.
    pub fn open(ubatch: usize, identity: [u8; 32], opts: &CacheOptions, stats: Arc<Stats>) -> Result<PromptCache, CacheError> {
        let disk = match &opts.dir {
            Some(dir) => Some(DiskCache::open(dir, identity, ubatch, opts.disk_bytes, stats.cache_disk_bytes.clone())?),
            None => None,
        };
        Ok(PromptCache { ubatch, ram_budget: opts.ram_bytes, ram: Vec::new(), tick: 0, disk, stats })
    }

    pub fn ubatch(&self) -> usize {
        self.ubatch
    }

    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_ref()
    }

    /// The record restoring the most of `prompt` (at most `limit` tokens), from memory or,
    /// when a file offers more, from disk (then kept in memory too).
    pub fn find(&mut self, prompt: &[u32], limit: usize) -> Option<Hit> {
        let in_ram = self.best_in_ram(prompt, limit);
        let ram_pos = in_ram.map_or(0, |(_, n)| n);
        let from_disk = self.disk.as_ref().and_then(|d| {
            let (f, pos) = d.best(prompt, limit).filter(|(_, n)| *n > ram_pos)?;
            d.load(&f.name).map(|r| (r, pos))
        });
        if let Some((record, pos)) = from_disk {
            let record = self.keep(Arc::new(record));
            return Some(Hit { record, pos });
        }
        let (i, pos) = in_ram?;
        self.tick += 1;
        self.ram[i].used = self.tick;
        let record = self.ram[i].record.clone();
        if let Some(d) = &self.disk {
            d.touch(&d.name_of(&record.tokens));
        }
        Some(Hit { record, pos })
    }

    /// The index of the record in memory restoring the most of `prompt`, and how much.
    fn best_in_ram(&self, prompt: &[u32], limit: usize) -> Option<(usize, usize)> {
        self.ram
            .iter()
            .enumerate()
            .map(|(i, c)| (i, covered(&c.record.tokens, prompt, limit, self.ubatch), c.used))
            .filter(|(_, n, _)| *n > 0)
            .max_by_key(|(_, n, used)| (*n, *used))
            .map(|(i, n, _)| (i, n))
    }

    /// Where a prompt resumes: the longest cached prefix that leaves its last token to run.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Hit> {
        self.find(prompt, prompt.len().saturating_sub(1))
    }

    /// Add a record made by a prefill; records it makes redundant (their tokens start its
    /// tokens) are dropped, in memory and on disk. Nothing is added when a record already
    /// holds its tokens.
    pub fn insert(&mut self, record: Record) -> Arc<Record> {
        if let Some(c) = self.ram.iter().find(|c| c.record.tokens.starts_with(&record.tokens)) {
            return c.record.clone();
        }
        let record = Arc::new(record);
        self.ram.retain(|c| !record.tokens.starts_with(&c.record.tokens));
        if let Some(d) = &self.disk {
            d.write(record.clone());
        }
        self.keep(record)
    }

    /// Keep `record` in memory as the most recently used, dropping the least recently used
    /// ones beyond the budget (or not keeping it, when it alone is larger).
    fn keep(&mut self, record: Arc<Record>) -> Arc<Record> {
        self.tick += 1;
        if record.bytes() <= self.ram_budget {
            self.ram.retain(|c| !Arc::ptr_eq(&c.record, &record) && c.record.tokens != record.tokens);
            self.ram.push(Cached { record: record.clone(), used: self.tick });
            while self.ram_bytes() > self.ram_budget {
                let oldest = self.ram.iter().enumerate().min_by_key(|(_, c)| c.used).map(|(i, _)| i);
                match oldest {
                    Some(i) => {
                        self.ram.remove(i);
                    }
                    None => break,
                }
            }
        } else if self.ram_budget > 0 {
            tracing::debug!(bytes = record.bytes(), budget = self.ram_budget, "a prompt-cache record is larger than --cache-ram-mb; not kept in memory");
        }
        self.stats.cache_ram_bytes.store(self.ram_bytes(), std::sync::atomic::Ordering::Relaxed);
        record
    }

    fn ram_bytes(&self) -> u64 {
        self.ram.iter().map(|c| c.record.bytes()).sum()
    }

    /// Drop the record that restores the most of `tokens`, from memory and disk; returns
    /// how many tokens it restored.
    pub fn forget(&mut self, tokens: &[u32]) -> usize {
        let Some(hit) = self.find(tokens, tokens.len()) else { return 0 };
        self.ram.retain(|c| !Arc::ptr_eq(&c.record, &hit.record));
        if let Some(d) = &self.disk {
            d.remove(d.name_of(&hit.record.tokens));
        }
        self.stats.cache_ram_bytes.store(self.ram_bytes(), std::sync::atomic::Ordering::Relaxed);
        hit.pos
    }
}
