//! The one error type of the crate and the numeric codes carried by `Error` frames.

use std::path::PathBuf;
use std::time::Duration;

use crate::types::{FrameType, ModelIdentity};

/// Numeric code of an `Error` frame (the peer's reason for giving up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// A frame that could not be decoded (magic, version, type, length, counts).
    pub const MALFORMED: ErrorCode = ErrorCode(1);
    /// The daemon expected another model.
    pub const IDENTITY_MISMATCH: ErrorCode = ErrorCode(2);
    /// The peer speaks another protocol version.
    pub const VERSION_MISMATCH: ErrorCode = ErrorCode(3);
    /// The limits or the shared-memory layout of the handshake were refused.
    pub const BAD_SETUP: ErrorCode = ErrorCode(4);
    /// A well-formed request the worker cannot serve (layer, expert not owned or repeated).
    pub const BAD_REQUEST: ErrorCode = ErrorCode(5);
    /// A frame arrived out of order (wrong type for the state, request id not increasing).
    pub const OUT_OF_ORDER: ErrorCode = ErrorCode(6);
    /// The worker failed while computing.
    pub const INTERNAL: ErrorCode = ErrorCode(100);
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match *self {
            ErrorCode::MALFORMED => "malformed frame",
            ErrorCode::IDENTITY_MISMATCH => "model identity mismatch",
            ErrorCode::VERSION_MISMATCH => "protocol version mismatch",
            ErrorCode::BAD_SETUP => "bad setup",
            ErrorCode::BAD_REQUEST => "bad request",
            ErrorCode::OUT_OF_ORDER => "out-of-order frame",
            ErrorCode::INTERNAL => "internal error",
            _ => "unknown code",
        };
        write!(f, "{} ({name})", self.0)
    }
}

/// Everything that can go wrong on a connection. Wire errors (decode, validation, I/O) close the
/// connection; later calls then fail with [`ProtoError::Closed`].
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("peer closed the connection while {during}")]
    PeerClosed { during: &'static str },
    #[error("peer closed the connection inside a frame: expected {expected} bytes, found {found}")]
    Truncated { expected: usize, found: usize },
    #[error("no answer from the peer within {waited:?} while {during}")]
    Timeout { waited: Duration, during: &'static str },
    #[error("the worker made no load progress for {waited:?} (loaded {loaded} of {total} bytes)")]
    LoadStalled { waited: Duration, loaded: u64, total: u64 },
    #[error("bad frame magic: expected {expected:#010x}, found {found:#010x}")]
    BadMagic { expected: u32, found: u32 },
    #[error("protocol version mismatch: expected {expected}, found {found}")]
    VersionMismatch { expected: u16, found: u16 },
    #[error("unknown frame type {found}")]
    UnknownFrameType { found: u16 },
    #[error("reserved header field must be 0, found {found:#x}")]
    ReservedNonZero { found: u32 },
    #[error("{frame} payload of {found} bytes is over the limit of {limit} bytes")]
    PayloadTooLarge { frame: FrameType, limit: u64, found: u64 },
    #[error("{frame} payload length: expected {expected} bytes, found {found}")]
    PayloadLength { frame: FrameType, expected: u64, found: u64 },
    #[error("{what}: expected {expected}, found {found}")]
    CountMismatch { what: &'static str, expected: u64, found: u64 },
    #[error("unexpected frame: expected {expected}, found {found}")]
    UnexpectedFrame { expected: &'static str, found: FrameType },
    #[error("reply request id mismatch: expected {expected}, found {found}")]
    RequestIdMismatch { expected: u64, found: u64 },
    #[error("request id out of order: previous {previous}, found {found} (ids must increase)")]
    RequestIdOrder { previous: u64, found: u64 },
    #[error("worker serves another model: expected {expected}, found {found}")]
    IdentityMismatch { expected: Box<ModelIdentity>, found: Box<ModelIdentity> },
    #[error("{what} out of range: maximum {max}, found {found}")]
    OutOfRange { what: &'static str, max: u64, found: u64 },
    #[error("{what}: expected {expected}, found {found}")]
    Mismatch { what: &'static str, expected: u64, found: u64 },
    #[error("layer {layer} out of range: the model has {n_layer} layers")]
    LayerOutOfRange { layer: u32, n_layer: u32 },
    #[error("expert {expert} of layer {layer} out of range: the model has {n_expert} experts")]
    ExpertOutOfRange { layer: u32, expert: u32, n_expert: u32 },
    #[error("expert {expert} of layer {layer} is not owned by this worker")]
    ExpertNotOwned { layer: u32, expert: u32 },
    #[error("token {token} selects expert {expert} twice")]
    DuplicateExpert { token: u32, expert: u32 },
    #[error("{what} must be 0, found {found}")]
    NonZero { what: &'static str, found: u64 },
    #[error("{frame} frame: expected a file descriptor (SCM_RIGHTS), found none")]
    MissingFd { frame: FrameType },
    #[error("{frame} frame: expected no file descriptor, found {found}")]
    UnexpectedFd { frame: FrameType, found: usize },
    #[error("error message is not UTF-8 ({len} bytes)")]
    InvalidUtf8 { len: usize },
    #[error("peer reported error {code}: {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("the connection was closed after an earlier error")]
    Closed,
    #[error("call out of order: expected {expected}, found {found}")]
    State { expected: &'static str, found: &'static str },
    #[error("socket {} is in use by another process", path.display())]
    SocketInUse { path: PathBuf },
    #[error("{} is not a private directory: expected mode 0700, found {found:04o}", path.display())]
    DirMode { path: PathBuf, found: u32 },
    #[error("{} is owned by uid {found}, expected uid {expected}", path.display())]
    DirOwner { path: PathBuf, expected: u32, found: u32 },
    #[error("{} exists and is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
}

pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

impl ProtoError {
    pub(crate) fn io(op: &'static str, source: impl Into<std::io::Error>) -> Self {
        ProtoError::Io { op, source: source.into() }
    }

    /// True when the worker is gone or hung (EOF, connection reset, timeout, a load that
    /// stopped progressing): the daemon's cue to kill and respawn it. Protocol violations and remote errors are not in this class.
    pub fn is_peer_lost(&self) -> bool {
        match self {
            ProtoError::PeerClosed { .. }
            | ProtoError::Truncated { .. }
            | ProtoError::Timeout { .. }
            | ProtoError::LoadStalled { .. } => true,
            ProtoError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }

    /// The code sent in an `Error` frame when this error makes us drop the connection.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::BadMagic { .. }
            | ProtoError::UnknownFrameType { .. }
            | ProtoError::ReservedNonZero { .. }
            | ProtoError::PayloadTooLarge { .. }
            | ProtoError::PayloadLength { .. }
            | ProtoError::CountMismatch { .. }
            | ProtoError::NonZero { .. }
            | ProtoError::InvalidUtf8 { .. }
            | ProtoError::MissingFd { .. }
            | ProtoError::UnexpectedFd { .. } => ErrorCode::MALFORMED,
            ProtoError::VersionMismatch { .. } => ErrorCode::VERSION_MISMATCH,
            ProtoError::IdentityMismatch { .. } => ErrorCode::IDENTITY_MISMATCH,
            ProtoError::UnexpectedFrame { .. }
            | ProtoError::RequestIdMismatch { .. }
            | ProtoError::RequestIdOrder { .. } => ErrorCode::OUT_OF_ORDER,
            ProtoError::OutOfRange { .. } | ProtoError::Mismatch { .. } => ErrorCode::BAD_SETUP,
            ProtoError::LayerOutOfRange { .. }
            | ProtoError::ExpertOutOfRange { .. }
            | ProtoError::ExpertNotOwned { .. }
            | ProtoError::DuplicateExpert { .. } => ErrorCode::BAD_REQUEST,
            _ => ErrorCode::INTERNAL,
        }
    }
}
