//! The prompt cache's file format. One file holds one [`Record`]:
//!
//! ```text
//! header (128 bytes, little-endian)
//!   0  magic "DFLASHPC"          8  version u32           12 header length u32 (128)
//!   16 model identity [32]       48 token prefix hash [32] (SHA-256 of the tokens as u32 LE)
//!   80 tokens u64                88 body length u64       96 body CRC-32 u32
//!   100 zero padding             124 header CRC-32 u32 (of bytes 0..124)
//! body
//!   tokens: u32 × tokens
//!   checkpoints: count u32, then per checkpoint: position u64, length u64, bytes
//!   entries: position u64, parts u32, then per part: ratio u32, row bytes u32, length u64, bytes
//! ```
//!
//! A file is written under a temporary name, synced and renamed, so a reader sees either no
//! file or a whole one. Reading checks, in order: the size against the header (truncated), the
//! magic and the header checksum (corrupted), the version and the model identity (foreign), the
//! token hash, and on a full read the body checksum and the record's layout (corrupted).
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use graph::{Checkpoint, Entries, EntryPart};
use sha2::{Digest, Sha256};

use super::Record;

pub const MAGIC: [u8; 8] = *b"DFLASHPC";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;
/// File name extension of cache files.
pub const EXT: &str = "dfpc";

/// Why a cache file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("truncated: {found} bytes where the header announces {expected}")]
    Truncated { expected: u64, found: u64 },
    #[error("corrupted: {0}")]
    Corrupted(String),
    #[error("foreign: {0}")]
    Foreign(String),
}

/// Reading a cache file failed: the file is bad, or reading it failed for another reason
/// (e.g. it was removed meanwhile), which says nothing about the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Bad(#[from] Problem),
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

/// What the header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub identity: [u8; 32],
    pub tokens_hash: [u8; 32],
    pub n_tokens: u64,
    pub body_len: u64,
    pub body_crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..48].copy_from_slice(&self.identity);
        h[48..80].copy_from_slice(&self.tokens_hash);
        h[80..88].copy_from_slice(&self.n_tokens.to_le_bytes());
        h[88..96].copy_from_slice(&self.body_len.to_le_bytes());
        h[96..100].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..124]);
        h[124..128].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The header of a file of `file_len` bytes made for the model `identity`.
    fn decode(h: &[u8; HEADER_LEN], file_len: u64, identity: &[u8; 32]) -> Result<Header, Problem> {
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if h[0..8] != MAGIC {
            return Err(Problem::Corrupted("no prompt-cache magic at the start".into()));
        }
        if crc32fast::hash(&h[..124]) != u32_at(124) {
            return Err(Problem::Corrupted("the header checksum does not match".into()));
        }
        let version = u32_at(8);
        if version != VERSION || u32_at(12) as usize != HEADER_LEN {
            return Err(Problem::Foreign(format!("format version {version}, this build reads version {VERSION}")));
        }
        let header = Header {
            identity: h[16..48].try_into().map_err(|_| Problem::Corrupted("header".into()))?,
            tokens_hash: h[48..80].try_into().map_err(|_| Problem::Corrupted("header".into()))?,
            n_tokens: u64_at(80),
            body_len: u64_at(88),
            body_crc: u32_at(96),
        };
        if header.identity != *identity {
            return Err(Problem::Foreign(format!(
                "made for model state {} (weights, device or options differ), this server's is {}",
                hex(&header.identity[..8]),
                hex(&identity[..8])
            )));
        }
        let expected = (HEADER_LEN as u64).saturating_add(header.body_len);
        if file_len != expected {
            return Err(if file_len < expected {
                Problem::Truncated { expected, found: file_len }
            } else {
                Problem::Corrupted(format!("{file_len} bytes where the header announces {expected}"))
            });
        }
        if header.n_tokens.saturating_mul(4) > header.body_len {
            return Err(Problem::Corrupted(format!("{} tokens do not fit a body of {} bytes", header.n_tokens, header.body_len)));
        }
        Ok(header)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn token_bytes(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// SHA-256 of the tokens (u32 little-endian).
pub fn tokens_hash(tokens: &[u32]) -> [u8; 32] {
    Sha256::digest(token_bytes(tokens)).into()
}

/// The file name of a record: a hash of the model identity and the token prefix.
pub fn file_name(identity: &[u8; 32], tokens: &[u32]) -> String {
    let mut h = Sha256::new();
    h.update(identity);
    h.update(token_bytes(tokens));
    format!("{}.{EXT}", hex(&h.finalize()[..16]))
}

/// Bytes through a writer, checksummed.
struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes from a reader, checksummed.
struct CrcReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
    left: u64,
}

impl<R: Read> CrcReader<R> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, ReadError> {
        if n > self.left {
            return Err(Problem::Corrupted(format!("{what} of {n} bytes runs past the end of the body")).into());
        }
        let mut v = vec![0u8; n as usize];
        self.inner.read_exact(&mut v).map_err(eof_is_truncation)?;
        self.crc.update(&v);
        self.left -= n;
        Ok(v)
    }
    fn u32(&mut self, what: &str) -> Result<u32, ReadError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ReadError> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }
}

fn eof_is_truncation(e: io::Error) -> ReadError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Bad(Problem::Corrupted("the file ends early".into()))
    } else {
        ReadError::Io(e)
    }
}

/// Write `record` to `path` through the temporary file `tmp` (synced, then renamed over
/// `path`); returns the file's size.
pub fn write(tmp: &Path, path: &Path, identity: &[u8; 32], record: &Record) -> io::Result<u64> {
    let result = write_tmp(tmp, identity, record).and_then(|len| std::fs::rename(tmp, path).map(|()| len));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn write_tmp(tmp: &Path, identity: &[u8; 32], record: &Record) -> io::Result<u64> {
    let mut file = File::create(tmp)?;
    file.write_all(&[0u8; HEADER_LEN])?;
    let (body_len, body_crc) = {
        let mut w = CrcWriter { inner: BufWriter::with_capacity(1 << 20, &mut file), crc: crc32fast::Hasher::new(), len: 0 };
        w.write_all(&token_bytes(&record.tokens))?;
        w.write_all(&(record.checkpoints.len() as u32).to_le_bytes())?;
        for cp in &record.checkpoints {
            w.write_all(&(cp.pos() as u64).to_le_bytes())?;
            w.write_all(&(cp.bytes().len() as u64).to_le_bytes())?;
            w.write_all(cp.bytes())?;
        }
        let e = &record.entries;
        w.write_all(&(e.pos() as u64).to_le_bytes())?;
        w.write_all(&(e.parts().len() as u32).to_le_bytes())?;
        for p in e.parts() {
            w.write_all(&(p.ratio as u32).to_le_bytes())?;
            w.write_all(&(p.row_bytes as u32).to_le_bytes())?;
            w.write_all(&(p.bytes.len() as u64).to_le_bytes())?;
            w.write_all(&p.bytes)?;
        }
        w.flush()?;
        (w.len, w.crc.finalize())
    };
    let header = Header { identity: *identity, tokens_hash: tokens_hash(&record.tokens), n_tokens: record.tokens.len() as u64, body_len, body_crc };
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header.encode())?;
    file.sync_all()?;
    Ok(HEADER_LEN as u64 + body_len)
}

fn open_header(path: &Path, identity: &[u8; 32]) -> Result<(BufReader<File>, Header), ReadError> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut h = [0u8; HEADER_LEN];
    if file_len < HEADER_LEN as u64 {
        return Err(Problem::Truncated { expected: HEADER_LEN as u64, found: file_len }.into());
    }
    r.read_exact(&mut h).map_err(eof_is_truncation)?;
    let header = Header::decode(&h, file_len, identity)?;
    Ok((r, header))
}

fn read_tokens<R: Read>(r: &mut CrcReader<R>, header: &Header) -> Result<Vec<u32>, ReadError> {
    let bytes = r.bytes(header.n_tokens * 4, "the tokens")?;
    let tokens: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if tokens_hash(&tokens) != header.tokens_hash {
        return Err(Problem::Corrupted("the tokens do not match their hash".into()).into());
    }
    Ok(tokens)
}

/// The header and tokens of a cache file (what the index keeps): size, magic, header
/// checksum, version, identity and the tokens' hash are checked, not the body.
pub fn read_index(path: &Path, identity: &[u8; 32]) -> Result<(Header, Vec<u32>), ReadError> {
    let (r, header) = open_header(path, identity)?;
    let mut r = CrcReader { inner: r, crc: crc32fast::Hasher::new(), left: header.body_len };
    let tokens = read_tokens(&mut r, &header)?;
    Ok((header, tokens))
}

/// A whole record, every check included; its checkpoints must lie at every multiple of
/// `ubatch` up to its length.
pub fn read(path: &Path, identity: &[u8; 32], ubatch: usize) -> Result<Record, ReadError> {
    let (r, header) = open_header(path, identity)?;
    let mut r = CrcReader { inner: r, crc: crc32fast::Hasher::new(), left: header.body_len };
    let tokens = read_tokens(&mut r, &header)?;
    let n_cp = r.u32("the checkpoint count")?;
    let mut checkpoints = Vec::new();
    for _ in 0..n_cp {
        let pos = r.u64("a checkpoint position")?;
        let len = r.u64("a checkpoint length")?;
        checkpoints.push(Arc::new(Checkpoint::from_bytes(pos as usize, r.bytes(len, "a checkpoint")?)));
    }
    let entries_pos = r.u64("the entries' position")?;
    let n_parts = r.u32("the entry part count")?;
    let mut parts = Vec::new();
    for _ in 0..n_parts {
        let ratio = r.u32("an entry ratio")? as usize;
        let row_bytes = r.u32("an entry row size")? as usize;
        let len = r.u64("an entry part length")?;
        parts.push(EntryPart { ratio, row_bytes, bytes: r.bytes(len, "entries")? });
    }
    if r.left != 0 {
        return Err(Problem::Corrupted(format!("{} bytes follow the record", r.left)).into());
    }
    if r.crc.finalize() != header.body_crc {
        return Err(Problem::Corrupted("the body checksum does not match".into()).into());
    }
    let record = Record { tokens, checkpoints, entries: Entries::from_parts(entries_pos as usize, parts) };
    record.check(ubatch).map_err(Problem::Corrupted)?;
    Ok(record)
}
