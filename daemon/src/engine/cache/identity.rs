//! The model identity of cached state: a record is valid only for the same weights computed
//! the same way. SHA-256 over the format version, the model file's size, its whole GGUF header
//! (metadata and tensor table: every byte before the first tensor), 16 samples of 64 KiB of
//! its tensor data spread over the file (a re-quantized or edited file of the same layout
//! differs there), and the arithmetic ([`graph::Model::numerics`]: device, micro-batch,
//! threads, attention paths, expert placement off the CPU).
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use loader::ModelFile;
use sha2::{Digest, Sha256};

const SAMPLES: u64 = 16;
const SAMPLE_BYTES: u64 = 64 << 10;

pub fn model_identity(model: &ModelFile, numerics: &str) -> io::Result<[u8; 32]> {
    let file = File::open(&model.path)?;
    let len = model.file_len;
    let data_start = model.tensors.iter().map(|t| t.offset).min().unwrap_or(len).min(len);
    let mut h = Sha256::new();
    h.update(b"dflash prompt cache identity 1\0");
    h.update(len.to_le_bytes());
    h.update(read_at(&file, 0, data_start)?);
    let span = len - data_start;
    for i in 0..SAMPLES {
        let at = data_start + span / SAMPLES * i;
        h.update(read_at(&file, at, SAMPLE_BYTES.min(len - at))?);
    }
    h.update(numerics.as_bytes());
    Ok(h.finalize().into())
}

fn read_at(file: &File, at: u64, n: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n as usize];
    file.read_exact_at(&mut buf, at)?;
    Ok(buf)
}
