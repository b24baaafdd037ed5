//! The error type of the crate.

use std::path::PathBuf;

/// A value outside the model, a malformed JSON form, or a file that could not be read or
/// written; each names the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ExpertsError {
    #[error("layer {layer} out of range: the model has {n_layer} layers")]
    LayerOutOfRange { layer: u32, n_layer: u32 },
    #[error("expert {expert} of layer {layer} out of range: the model has {n_expert} experts")]
    ExpertOutOfRange { layer: u32, expert: u32, n_expert: u32 },
    #[error("{what}: {reason}")]
    Json { what: String, reason: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("expert pairs: the per-token counts sum to {counted}, but there are {ids} expert ids")]
    PairCounts { counted: u64, ids: usize },
}

pub type Result<T, E = ExpertsError> = std::result::Result<T, E>;

/// A file's text, an I/O failure naming the file.
pub(crate) fn read_text(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ExpertsError::Io { what: "read", path: path.to_owned(), source })
}

/// Writes `text` to a file, an I/O failure naming the file.
pub(crate) fn write_text(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| ExpertsError::Io { what: "write", path: path.to_owned(), source })
}
