use thiserror::Error;

/// Everything that can be wrong with a model file, each naming the key or tensor and the
/// expected vs found value.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a readable GGUF file: {reason}")]
    Gguf { path: String, reason: String },
    #[error("architecture is '{found}', expected 'deepseek4' (key general.architecture)")]
    WrongArchitecture { found: String },
    #[error("missing required key {key}")]
    MissingKey { key: String },
    #[error("key {key} has type {found}, expected {expected}")]
    KeyType { key: String, expected: &'static str, found: String },
    #[error("key {key}: expected {expected}, found {found}")]
    KeyValue { key: String, expected: String, found: String },
    #[error("missing tensor {name}")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<u64>, found: Vec<u64> },
    #[error("tensor {name} has type {found}, expected one of {expected}")]
    TensorType { name: String, expected: String, found: String },
    #[error("tensor {name}: data [{start}, {end}) lies outside the file ({file_len} bytes)")]
    TensorOutOfFile { name: String, start: u64, end: u64, file_len: u64 },
    #[error("tensor {name}: offset/size arithmetic overflows ({what})")]
    Overflow { name: String, what: String },
    #[error("tensor {name}: {reason}")]
    TensorData { name: String, reason: String },
    #[error("loading tensors: {0}")]
    Backend(#[from] ggml::GgmlError),
}
