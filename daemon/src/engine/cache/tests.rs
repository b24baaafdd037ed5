//! The prompt cache's bookkeeping and files, over synthetic records (the state's bytes are
//! opaque here; tests/resume.rs checks what restoring them computes).
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use graph::{Checkpoint, Entries, EntryPart};

use super::{file, CacheError, CacheOptions, PromptCache, Record};
use crate::engine::Stats;

const U: usize = 4;
const ID: [u8; 32] = [7; 32];

fn toks(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) % 1000).collect()
}

/// A record of `tokens` (a multiple of U) whose state bytes depend on `seed`.
fn record(tokens: &[u32], seed: u8) -> Record {
    let n = tokens.len();
    let checkpoints = (1..=n / U).map(|k| Arc::new(Checkpoint::from_bytes(k * U, vec![seed ^ k as u8; 300]))).collect();
    let parts = vec![
        EntryPart { ratio: 4, row_bytes: 8, bytes: vec![seed; n / 4 * 8] },
        EntryPart { ratio: 8, row_bytes: 16, bytes: vec![seed.wrapping_add(1); n / 8 * 16] },
    ];
    Record { tokens: tokens.to_vec(), checkpoints, entries: Entries::from_parts(n, parts) }
}

fn stats() -> Arc<Stats> {
    Arc::new(Stats::new().expect("stats"))
}

fn opts(dir: &Path, disk_bytes: u64) -> CacheOptions {
    CacheOptions { ram_bytes: 1 << 30, dir: Some(dir.to_path_buf()), disk_bytes }
}

fn open(dir: &Path, identity: [u8; 32]) -> PromptCache {
    PromptCache::open(U, identity, &opts(dir, 1 << 30), stats()).expect("cache opens")
}

/// Write `records` through a cache on `dir` and wait for the files.
fn write(dir: &Path, records: Vec<Record>) {
    let mut c = open(dir, ID);
    for r in records {
        c.insert(r);
    }
    c.disk().expect("disk").flush();
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == file::EXT))
        .collect();
    v.sort();
    v
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;
    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}

/// Runs `f` and returns what it logged on this thread.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    let log = Log::default();
    let sub = tracing_subscriber::fmt().with_writer(log.clone()).with_ansi(false).finish();
    let out = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8_lossy(&log.0.lock().expect("log")).into_owned();
    (out, text)
}

#[test]
fn a_prompt_resumes_at_the_last_checkpoint_before_its_last_token_or_the_divergence() {
    let mut c = PromptCache::open(U, ID, &CacheOptions { ram_bytes: 1 << 20, ..Default::default() }, stats()).expect("cache");
    let prompt = toks(30, 1);
    c.insert(record(&prompt[..24], 1));
    assert_eq!(c.lookup(&prompt).map(|h| h.pos), Some(24));
    assert_eq!(c.lookup(&prompt[..24]).map(|h| h.pos), Some(20), "the last token is always run");
    assert_eq!(c.lookup(&prompt[..25]).map(|h| h.pos), Some(24));
    let mut other = prompt.clone();
    other[10] += 1;
    assert_eq!(c.lookup(&other).map(|h| h.pos), Some(8));
    other[2] += 1;
    assert!(c.lookup(&other).is_none(), "less than a micro-batch shared");
    assert!(c.lookup(&prompt[..4]).is_none());
}

#[test]
fn a_longer_record_replaces_the_ones_it_extends_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prompt = toks(40, 2);
    let mut c = open(dir.path(), ID);
    c.insert(record(&prompt[..8], 1));
    c.insert(record(&prompt[..16], 1));
    let kept = c.insert(record(&prompt[..12], 1));
    assert_eq!(kept.tokens.len(), 16, "a record the cache already holds is not added");
    c.insert(record(&prompt[..32], 1));
    c.disk().expect("disk").flush();
    assert_eq!(c.ram.len(), 1);
    assert_eq!(c.ram[0].record.tokens.len(), 32);
    assert_eq!(cache_files(dir.path()), vec![dir.path().join(file::file_name(&ID, &prompt[..32]))]);
}

#[test]
fn memory_keeps_the_most_recently_used_records_within_its_budget() {
    let (a, b, d) = (toks(16, 3), toks(16, 4), toks(16, 5));
    let size = record(&a, 0).bytes();
    let mut c = PromptCache::open(U, ID, &CacheOptions { ram_bytes: 2 * size + size / 2, ..Default::default() }, stats()).expect("cache");
    c.insert(record(&a, 1));
    c.insert(record(&b, 1));
    assert!(c.lookup(&a).is_some(), "a is used again");
    c.insert(record(&d, 1));
    assert!(c.lookup(&b).is_none(), "b, the least recently used, is dropped");
    assert!(c.lookup(&a).is_some() && c.lookup(&d).is_some());
    assert_eq!(c.stats.cache_ram_bytes.load(std::sync::atomic::Ordering::Relaxed), 2 * size);
    let mut none = PromptCache::open(U, ID, &CacheOptions { ram_bytes: size - 1, ..Default::default() }, stats()).expect("cache");
    none.insert(record(&a, 1));
    assert!(none.lookup(&a).is_none(), "a record larger than the budget is not kept");
}

#[test]
fn records_on_disk_survive_a_restart_and_read_back_equal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prompt = toks(30, 6);
    write(dir.path(), vec![record(&prompt[..24], 9)]);
    let (mut c, log) = logged(|| open(dir.path(), ID));
    assert!(!log.contains("WARN"), "{log}");
    let hit = c.lookup(&prompt).expect("the record from disk");
    assert_eq!(hit.pos, 24);
    assert_eq!(*hit.record, record(&prompt[..24], 9));
    assert_eq!(c.disk().expect("disk").usage().0, 1);
}

#[test]
fn a_truncated_file_is_removed_with_a_warning_and_never_used() {
    for keep in [40u64, 1000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let prompt = toks(30, 7);
        write(dir.path(), vec![record(&prompt[..24], 1)]);
        let path = cache_files(dir.path()).remove(0);
        let len = std::fs::metadata(&path).expect("file").len();
        std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(keep.min(len - 1)).expect("truncate");
        let (mut c, log) = logged(|| open(dir.path(), ID));
        assert!(log.contains("WARN") && log.contains("truncated"), "{log}");
        assert!(!path.exists(), "the truncated file is removed");
        assert!(c.lookup(&prompt).is_none());
    }
}

/// Flip one byte at `at` (from the end when negative).
fn flip(path: &Path, at: i64) {
    let mut bytes = std::fs::read(path).expect("read");
    let i = if at < 0 { bytes.len() as i64 + at } else { at } as usize;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn a_corrupted_file_is_removed_with_a_warning_and_never_used() {
    let prompt = toks(30, 8);
    // (where, what the warning says, found when the directory is scanned)
    let header = file::HEADER_LEN as i64;
    for (at, says, at_scan) in [
        (-5, "body checksum", false),
        (header + 24 * 4 + 30, "body checksum", false),
        (header + 3, "tokens do not match", true),
        (20, "header checksum", true),
        (0, "magic", true),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), vec![record(&prompt[..24], 1)]);
        let path = cache_files(dir.path()).remove(0);
        flip(&path, at);
        let (mut c, log) = logged(|| open(dir.path(), ID));
        assert_eq!(log.contains(says), at_scan, "byte {at}: {log}");
        assert_eq!(path.exists(), !at_scan);
        let (hit, log) = logged(|| c.lookup(&prompt).map(|h| h.pos));
        assert_eq!(hit, None, "byte {at}: a corrupted file is never used");
        if !at_scan {
            assert!(log.contains("WARN") && log.contains("corrupted") && log.contains(says), "byte {at}: {log}");
        }
        assert!(!path.exists(), "byte {at}: the corrupted file is removed");
        assert!(c.lookup(&prompt).is_none());
    }
}

#[test]
fn a_file_of_another_model_or_format_is_removed_with_a_warning_and_never_used() {
    let prompt = toks(30, 10);
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), vec![record(&prompt[..24], 1)]);
    let path = cache_files(dir.path()).remove(0);
    let (mut c, log) = logged(|| open(dir.path(), [8; 32]));
    assert!(log.contains("WARN") && log.contains("foreign") && log.contains("made for model state"), "{log}");
    assert!(!path.exists());
    assert!(c.lookup(&prompt).is_none());
    drop(c);

    // the same model, a format version this build does not read
    write(dir.path(), vec![record(&prompt[..24], 1)]);
    let path = cache_files(dir.path()).remove(0);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..124]);
    bytes[124..128].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, bytes).expect("write");
    let (mut c, log) = logged(|| open(dir.path(), ID));
    assert!(log.contains("foreign") && log.contains("version 2"), "{log}");
    assert!(!path.exists());
    assert!(c.lookup(&prompt).is_none());
}

#[test]
fn other_files_in_the_directory_are_left_alone_and_unfinished_ones_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("notes.txt"), "mine").expect("write");
    let tmp = dir.path().join(format!("0123.{}.tmp", file::EXT));
    std::fs::File::create(&tmp).and_then(|mut f| f.write_all(b"half")).expect("write");
    let c = open(dir.path(), ID);
    assert!(dir.path().join("notes.txt").exists());
    assert!(!tmp.exists());
    assert_eq!(c.disk().expect("disk").usage(), (0, 0));
}

#[test]
fn the_directory_keeps_the_most_recently_used_files_within_its_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, d) = (toks(16, 11), toks(16, 12), toks(16, 13));
    write(dir.path(), vec![record(&a, 1)]);
    let size = std::fs::metadata(&cache_files(dir.path())[0]).expect("file").len();
    std::fs::remove_file(&cache_files(dir.path())[0]).expect("remove");
    let no_ram = |budget| CacheOptions { ram_bytes: 0, dir: Some(dir.path().to_path_buf()), disk_bytes: budget };
    let mut c = PromptCache::open(U, ID, &no_ram(2 * size + size / 2), stats()).expect("cache");
    c.insert(record(&a, 1));
    c.insert(record(&b, 1));
    c.disk().expect("disk").flush();
    assert!(c.lookup(&a).is_some(), "a is read from disk, and so used again");
    c.insert(record(&d, 1));
    c.disk().expect("disk").flush();
    let name = |t: &[u32]| dir.path().join(file::file_name(&ID, t));
    assert!(name(&a).exists() && name(&d).exists() && !name(&b).exists(), "b, the least recently used, is removed");
    assert_eq!(c.disk().expect("disk").usage(), (2, 2 * size));
    assert_eq!(c.stats.cache_disk_bytes.load(std::sync::atomic::Ordering::Relaxed), 2 * size);
    drop(c);
    // a smaller bound at the next start removes the least recently used (by modification time)
    let c = PromptCache::open(U, ID, &no_ram(size + size / 2), stats()).expect("cache");
    assert_eq!(c.disk().expect("disk").usage(), (1, size));
    assert!(name(&d).exists());
}

#[test]
fn a_directory_serves_one_process_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = open(dir.path(), ID);
    match PromptCache::open(U, ID, &opts(dir.path(), 1 << 30), stats()) {
        Err(CacheError::Locked(_)) => {}
        Err(e) => panic!("expected the lock error, got {e}"),
        Ok(_) => panic!("a second cache opened the same directory"),
    }
}

#[test]
fn slot_files_round_trip_and_names_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = open(dir.path(), ID);
    let disk = c.disk().expect("disk");
    let r = record(&toks(12, 14), 3);
    let n = disk.save_slot_file("conv-1.bin", &r).expect("save");
    let (back, read) = disk.read_slot_file("conv-1.bin").expect("restore");
    assert_eq!((back, read), (r, n));
    for bad in ["", "../x", "a/b", ".hidden", "x y"] {
        assert!(matches!(disk.save_slot_file(bad, &record(&toks(4, 1), 1)), Err(CacheError::BadFilename(_))), "{bad:?}");
    }
    assert!(matches!(disk.read_slot_file("missing.bin"), Err(CacheError::Io { .. })));
    flip(&dir.path().join("slots/conv-1.bin"), -1);
    assert!(matches!(disk.read_slot_file("conv-1.bin"), Err(CacheError::BadFile { .. })));
}
