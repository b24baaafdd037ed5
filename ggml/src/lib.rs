//! A thin owning layer over `ggml-sys`. Every raw handle that needs freeing has one owner
//! here (`Backend`, `Buffer`, `Context`); devices and backend registries are listed and
//! loaded through ggml's generic registry API, so a CUDA backend built as a loadable module
//! (`libggml-cuda.so`) plugs in without linking against it.

pub mod alloc;
pub mod backend;
pub mod context;
pub mod log;
pub mod sched;
pub mod types;

pub use alloc::GraphAllocator;
pub use backend::{load_backend_module, Backend, Buffer, BufferType, Copier, Device, DeviceKind, Event};
pub use context::Context;
pub use sched::Scheduler;
pub use ggml_sys as sys;
pub use types::TensorType;

#[derive(Debug, thiserror::Error)]
pub enum GgmlError {
    #[error("could not load the ggml backend module {path}: {reason}")]
    ModuleLoad { path: String, reason: String },
    #[error("no ggml device named {0}")]
    NoDevice(String),
    #[error("ggml could not start the backend of device {0}")]
    BackendInit(String),
    #[error("ggml could not allocate {bytes} bytes on {buffer_type}")]
    Alloc { buffer_type: String, bytes: usize },
    #[error("ggml could not create a context of {0} bytes of metadata")]
    ContextInit(usize),
    #[error("ggml scheduler: {0}")]
    Sched(String),
    #[error("ggml graph computation failed on {backend}: status {status}")]
    Compute { backend: String, status: i32 },
}
