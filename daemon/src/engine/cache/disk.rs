//! Records on disk (`--cache-dir`): one file per record, named by a hash of the model identity
//! and its tokens ([`file::file_name`]), and an index of their tokens in memory. Files are
//! written by a writer thread (in the order the compute thread queued them), so a request
//! never waits for the disk; loads happen on the compute thread when a file offers a longer
//! prefix than memory. The directory is bounded by size: the least recently used files go
//! first (a file's modification time is its last use, so the order survives restarts).
//!
//! A file that is truncated, corrupted or made for another model (or by another format
//! version) is removed with a warning when the directory is scanned at start or when a load
//! finds it out, and is never used. A lock file keeps a second server off the directory.
//! `slots/` below the directory holds the files of `POST /slots/{id}?action=save`, in the
//! same format, outside the bound.
use std::fs::{File, FileTimes};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::SystemTime;

use super::file::{self, ReadError, EXT};
use super::{covered, CacheError, Record};

/// A file the index knows.
#[derive(Clone, Debug)]
pub struct DiskFile {
    pub name: String,
    pub tokens: Arc<[u32]>,
    pub bytes: u64,
    used: SystemTime,
}

struct DiskIndex {
    files: Vec<DiskFile>,
    budget: u64,
    gauge: Arc<AtomicU64>,
}

enum Task {
    /// Write the record, then remove the files it makes redundant (those whose tokens start
    /// its tokens).
    Write(Arc<Record>),
    Remove(String),
    Touch(String),
    /// Answer once every earlier task is done.
    #[cfg(test)]
    Flush(mpsc::Sender<()>),
}

pub struct DiskCache {
    dir: PathBuf,
    identity: [u8; 32],
    ubatch: usize,
    index: Arc<Mutex<DiskIndex>>,
    tasks: Option<mpsc::Sender<Task>>,
    writer: Option<JoinHandle<()>>,
    _lock: File,
}

impl DiskCache {
    /// Opens (creating) `dir`, takes its lock, indexes its files (removing bad ones) and
    /// starts the writer.
    pub fn open(dir: &Path, identity: [u8; 32], ubatch: usize, budget: u64, gauge: Arc<AtomicU64>) -> Result<DiskCache, CacheError> {
        let io = |source| CacheError::Io { path: dir.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock_path = dir.join(".lock");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(CacheError::Locked(dir.display().to_string()));
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.ends_with(&format!(".{EXT}.tmp")) {
                tracing::info!(path = %path.display(), "removing an unfinished prompt-cache file");
                remove(&path);
                continue;
            }
            if !name.ends_with(&format!(".{EXT}")) {
                continue;
            }
            match file::read_index(&path, &identity) {
                Ok((header, tokens)) if file::file_name(&identity, &tokens) == name => {
                    let used = entry.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                    files.push(DiskFile { name, tokens: tokens.into(), bytes: file::HEADER_LEN as u64 + header.body_len, used });
                }
                Ok(_) => warn_and_remove(&path, "corrupted: its name is not the hash of its tokens"),
                Err(ReadError::Bad(p)) => warn_and_remove(&path, &p.to_string()),
                Err(ReadError::Io(e)) => tracing::warn!(path = %path.display(), "skipping a prompt-cache file that cannot be read: {e}"),
            }
        }
        let index = Arc::new(Mutex::new(DiskIndex { files, budget, gauge }));
        {
            let mut ix = lock_index(&index);
            ix.evict(dir, None);
            tracing::info!(dir = %dir.display(), files = ix.files.len(), bytes = ix.bytes(), "prompt cache on disk");
        }
        let (tasks, rx) = mpsc::channel();
        let writer = {
            let (own_dir, own_index) = (dir.to_path_buf(), index.clone());
            std::thread::Builder::new()
                .name("dflash-cache-writer".into())
                .spawn(move || write_loop(&own_dir, identity, &own_index, rx))
                .map_err(|source| CacheError::Io { path: dir.display().to_string(), source })?
        };
        Ok(DiskCache { dir: dir.to_path_buf(), identity, ubatch, index, tasks: Some(tasks), writer: Some(writer), _lock: lock })
    }

    /// The file covering the most of `prompt` (at most `limit` tokens of it, at a multiple of
    /// the micro-batch), and how much.
    pub fn best(&self, prompt: &[u32], limit: usize) -> Option<(DiskFile, usize)> {
        let ix = lock_index(&self.index);
        ix.files
            .iter()
            .map(|f| (f, covered(&f.tokens, prompt, limit, self.ubatch)))
            .filter(|(_, n)| *n > 0)
            .max_by_key(|(f, n)| (*n, f.used))
            .map(|(f, n)| (f.clone(), n))
    }

    /// Reads a file of the index. A bad file is removed with a warning; a file that is gone
    /// (evicted meanwhile) or unreadable gives None.
    pub fn load(&self, name: &str) -> Option<Record> {
        let path = self.dir.join(name);
        match file::read(&path, &self.identity, self.ubatch) {
            Ok(r) => {
                self.touch(name);
                Some(r)
            }
            Err(ReadError::Bad(p)) => {
                warn_and_remove(&path, &p.to_string());
                lock_index(&self.index).forget(name);
                None
            }
            Err(ReadError::Io(e)) => {
                tracing::warn!(path = %path.display(), "could not read a prompt-cache file: {e}");
                None
            }
        }
    }

    /// Queue a record for writing; once it is written, the files it makes redundant are
    /// removed.
    pub fn write(&self, record: Arc<Record>) {
        self.send(Task::Write(record));
    }

    /// Forget a file now (no lookup finds it from here on) and remove it once the writes
    /// queued before are done.
    pub fn remove(&self, name: String) {
        lock_index(&self.index).forget(&name);
        self.send(Task::Remove(name));
    }

    /// Mark a file as just used (for the size bound's order).
    pub fn touch(&self, name: &str) {
        self.send(Task::Touch(name.to_string()));
    }

    fn send(&self, task: Task) {
        if let Some(t) = &self.tasks {
            if t.send(task).is_err() {
                tracing::warn!("the prompt-cache writer has stopped");
            }
        }
    }

    /// The record's file name in the directory.
    pub fn name_of(&self, tokens: &[u32]) -> String {
        file::file_name(&self.identity, tokens)
    }

    /// Write `record` to `slots/FILENAME` now; returns the bytes written.
    pub fn save_slot_file(&self, filename: &str, record: &Record) -> Result<u64, CacheError> {
        let path = self.slot_path(filename)?;
        let dir = self.dir.join("slots");
        std::fs::create_dir_all(&dir).map_err(|source| CacheError::Io { path: dir.display().to_string(), source })?;
        let tmp = dir.join(format!(".{filename}.tmp"));
        file::write(&tmp, &path, &self.identity, record).map_err(|source| CacheError::Io { path: path.display().to_string(), source })
    }

    /// Read `slots/FILENAME`; returns the record and the file's size. A bad file is reported
    /// (and kept: the client named it).
    pub fn read_slot_file(&self, filename: &str) -> Result<(Record, u64), CacheError> {
        let path = self.slot_path(filename)?;
        let size = std::fs::metadata(&path).map_err(|source| CacheError::Io { path: path.display().to_string(), source })?.len();
        match file::read(&path, &self.identity, self.ubatch) {
            Ok(r) => Ok((r, size)),
            Err(ReadError::Bad(p)) => Err(CacheError::BadFile { path: path.display().to_string(), problem: p.to_string() }),
            Err(ReadError::Io(source)) => Err(CacheError::Io { path: path.display().to_string(), source }),
        }
    }

    fn slot_path(&self, filename: &str) -> Result<PathBuf, CacheError> {
        let ok = !filename.is_empty()
            && filename.len() <= 200
            && !filename.starts_with('.')
            && filename.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(CacheError::BadFilename(filename.to_string()));
        }
        Ok(self.dir.join("slots").join(filename))
    }

    /// Files and bytes in the index.
    #[cfg(test)]
    pub fn usage(&self) -> (usize, u64) {
        let ix = lock_index(&self.index);
        (ix.files.len(), ix.bytes())
    }

    /// Wait until every queued write and removal is done.
    #[cfg(test)]
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Task::Flush(tx));
        let _ = rx.recv();
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        self.tasks = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn lock_index(index: &Mutex<DiskIndex>) -> MutexGuard<'_, DiskIndex> {
    // The index holds no invariant a panic could break halfway: go on with it.
    index.lock().unwrap_or_else(|e| e.into_inner())
}

impl DiskIndex {
    fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    fn forget(&mut self, name: &str) {
        self.files.retain(|f| f.name != name);
        self.gauge.store(self.bytes(), Ordering::Relaxed);
    }

    /// Remove least recently used files (never `keep`, unless it alone is over the budget)
    /// until the files fit the budget.
    fn evict(&mut self, dir: &Path, keep: Option<&str>) {
        while self.bytes() > self.budget {
            let victim = self.files.iter().filter(|f| Some(f.name.as_str()) != keep).min_by_key(|f| f.used).map(|f| f.name.clone());
            let name = match (victim, keep) {
                (Some(v), _) => v,
                (None, Some(k)) => {
                    tracing::warn!(file = k, budget = self.budget, "a prompt-cache file is larger than --cache-disk-gb; not kept");
                    k.to_string()
                }
                (None, None) => break,
            };
            remove(&dir.join(&name));
            self.forget(&name);
        }
        self.gauge.store(self.bytes(), Ordering::Relaxed);
    }
}

fn write_loop(dir: &Path, identity: [u8; 32], index: &Mutex<DiskIndex>, rx: mpsc::Receiver<Task>) {
    for task in rx {
        match task {
            Task::Write(record) => {
                let name = file::file_name(&identity, &record.tokens);
                let path = dir.join(&name);
                let tmp = dir.join(format!("{name}.tmp"));
                match file::write(&tmp, &path, &identity, &record) {
                    Ok(bytes) => {
                        let mut ix = lock_index(index);
                        let redundant: Vec<String> = ix.files.iter().filter(|f| record.tokens.starts_with(&f.tokens)).map(|f| f.name.clone()).collect();
                        for old in redundant {
                            remove_unless(dir, &old, &name);
                            ix.forget(&old);
                        }
                        let used = SystemTime::now();
                        mark_used(&path, used);
                        ix.files.push(DiskFile { name: name.clone(), tokens: record.tokens.as_slice().into(), bytes, used });
                        ix.evict(dir, Some(&name));
                    }
                    Err(e) => tracing::warn!(path = %path.display(), "could not write a prompt-cache file: {e}"),
                }
            }
            Task::Remove(name) => {
                let mut ix = lock_index(index);
                remove(&dir.join(&name));
                ix.forget(&name);
            }
            #[cfg(test)]
            Task::Flush(done) => {
                let _ = done.send(());
            }
            Task::Touch(name) => {
                let now = SystemTime::now();
                let mut ix = lock_index(index);
                if let Some(f) = ix.files.iter_mut().find(|f| f.name == name) {
                    f.used = now;
                    mark_used(&dir.join(&name), now);
                }
            }
        }
    }
}

/// Set a file's modification time, its last use, to `when` (written files too: the time
/// the kernel stamps is coarser than the clock).
fn mark_used(path: &Path, when: SystemTime) {
    if let Err(e) = File::open(path).and_then(|h| h.set_times(FileTimes::new().set_modified(when))) {
        tracing::debug!(path = %path.display(), "could not mark a prompt-cache file as used: {e}");
    }
}

/// Remove the file `name` unless it is `keep` (a file rewritten under its own name).
fn remove_unless(dir: &Path, name: &str, keep: &str) {
    if name != keep {
        remove(&dir.join(name));
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), "could not remove a prompt-cache file: {e}");
        }
    }
}

fn warn_and_remove(path: &Path, problem: &str) {
    tracing::warn!(path = %path.display(), "prompt-cache file {problem}; removed, not used");
    remove(path);
}
