//! `loader` knows files, not the model's math: a GGUF of architecture `deepseek4` becomes a
//! typed [`Ds4Config`] and a validated [`TensorTable`] (every expected tensor present, with
//! the right shape, an allowed type and its bytes inside the file), and tensor bytes are read
//! into ggml backend buffers the caller chooses ([`load_tensors`]), whole or as a subset of
//! experts.
//!
//! The GGUF header and metadata are parsed by ggml's own `gguf` reader (through `ggml-sys`):
//! it reads every metadata type and array, every ggml tensor type (MXFP4, IQ2_XXS, …) and the
//! alignment, and rejects malformed headers with a message we pass on. (`gguf-rs` 0.1.8 does
//! not know MXFP4 and later types.) Everything semantic (architecture, keys, shapes, types,
//! data ranges) is validated here before any tensor reaches ggml.

mod config;
mod error;
mod experts;
mod gguf;
mod metadata;
mod read;
pub mod synth;
mod tensors;

pub use config::{Ds4Config, GatingFunc, RopeYarn};
pub use error::LoadError;
pub use experts::ExpertPart;
pub use gguf::Gguf;
pub use metadata::{Metadata, Value};
pub use read::{load_tensors, load_tensors_with, LoadedTensors, ReadMode, ReadOptions, ReadStats, TensorRequest, TensorWrites};
pub use tensors::{TensorInfo, TensorInfos, TensorRole, TensorTable};

use std::path::{Path, PathBuf};

/// An opened, fully validated deepseek4 GGUF.
pub struct ModelFile {
    pub path: PathBuf,
    pub file_len: u64,
    pub metadata: Metadata,
    pub config: Ds4Config,
    pub tensors: TensorTable,
}

impl ModelFile {
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFile, LoadError> {
        let path = path.as_ref().to_path_buf();
        let file_len = std::fs::metadata(&path)
            .map_err(|source| LoadError::Io { path: path.display().to_string(), source })?
            .len();
        let gguf = Gguf::open(&path)?;
        let (metadata, config, tensors) = parse(&gguf, file_len)?;
        Ok(ModelFile { path, file_len, metadata, config, tensors })
    }
}

/// Metadata, config and validated tensor table of a parsed GGUF whose whole size is
/// `file_len` bytes. Shared by [`ModelFile::open`] and the fuzz target.
pub fn parse(gguf: &Gguf, file_len: u64) -> Result<(Metadata, Ds4Config, TensorTable), LoadError> {
    let metadata = Metadata::read(gguf)?;
    let infos = tensors::read_infos(gguf, file_len)?;
    let config = Ds4Config::from_metadata(&metadata, &infos)?;
    let table = TensorTable::validate(infos, &config)?;
    Ok((metadata, config, table))
}

/// Parse a whole GGUF held in memory (tests and fuzzing).
pub fn parse_bytes(bytes: &[u8]) -> Result<(Metadata, Ds4Config, TensorTable), LoadError> {
    let gguf = Gguf::from_bytes(bytes)?;
    parse(&gguf, bytes.len() as u64)
}
