//! The error type of the crate.

use std::path::PathBuf;

/// Everything the worker and its `--experts` spec parser can refuse. Each variant names
/// the bad value (expected vs found).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    Ggml(#[from] ggml::GgmlError),
    #[error(transparent)]
    Graph(#[from] graph::GraphError),
    #[error(transparent)]
    Proto(#[from] ipc_proto::ProtoError),
    #[error(transparent)]
    Experts(#[from] experts::ExpertsError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer} out of range: the model has {n_layer} layers")]
    LayerOutOfRange { layer: u32, n_layer: u32 },
    #[error("expert {expert} of layer {layer} out of range: the model has {n_expert} experts")]
    ExpertOutOfRange { layer: u32, expert: u32, n_expert: u32 },
    #[error("expert {expert} of layer {layer} is not loaded by this worker")]
    NotOwned { layer: u32, expert: u32 },
    #[error("{what}: expected {expected} f32, found {found}")]
    BufferLength { what: &'static str, expected: usize, found: usize },
    #[error("ggml could not {what}")]
    GraphAlloc { what: &'static str },
    /// A thread panicked while it held a compute lane, which may be half-written.
    #[error("{lane} compute lane unusable: a thread panicked while holding it")]
    LanePoisoned { lane: &'static str },
    #[error("expert spec {spec:?}: {reason}")]
    Spec { spec: String, reason: String },
    #[error("CPU pinning {spec:?}: {reason}")]
    Pinning { spec: String, reason: String },
    #[error("{what}: expected {expected}, found {found}")]
    Mismatch { what: &'static str, expected: u64, found: u64 },
    #[error("test fault {fault} (armed through DFLASH_WORKER_TEST_FAULTS)")]
    TestFault { fault: &'static str },
    #[error("test fault file {}: {reason}", path.display())]
    TestFaultFile { path: PathBuf, reason: String },
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
