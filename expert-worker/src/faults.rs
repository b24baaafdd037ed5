//! Test faults: how the daemon's recovery tests make a real worker process misbehave.
//!
//! With `DFLASH_WORKER_TEST_FAULTS=DIR` in its environment (a daemon's workers inherit it), a
//! worker looks in `DIR` for files named after the [`Fault`]s. A test *arms* a fault by
//! creating its file; the first worker to reach the fault's point removes the file (so one
//! worker takes it, once) and misbehaves there. `DIR/load-delay-ms`, holding a number of
//! milliseconds, is read at start and not removed: the worker sleeps that long after loading
//! each layer's experts (a slow load that still makes progress); `DIR/eval-delay-ms` likewise
//! before answering each eval (a run long enough for a test to act during it). Without the
//! variable none of this runs; with it, each eval costs one `unlink` per eval fault.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use experts::ExpertSet;
use ipc_proto::frame::{encode_eval_done, encode_hello, encode_raw_header};
use ipc_proto::{ErrorCode, FrameType, ModelIdentity, RequestId, WorkerServer, MAGIC, PROTOCOL_VERSION};

use crate::error::{Result, WorkerError};

/// The environment variable that names the fault directory.
pub const TEST_FAULTS_ENV: &str = "DFLASH_WORKER_TEST_FAULTS";

/// The file in the fault directory that slows the load down (see the module docs).
pub const LOAD_DELAY_FILE: &str = "load-delay-ms";

/// The file in the fault directory that slows every eval down (see the module docs).
pub const EVAL_DELAY_FILE: &str = "eval-delay-ms";

/// A misbehaviour, named by its file in the fault directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `start-exit`: exit with an error before opening the socket (a failed start).
    StartExit,
    /// `hello-version`: send a Hello of another protocol version, then exit.
    HelloVersion,
    /// `eval-error`: answer the next eval with an `Error` frame (internal error), then exit.
    EvalError,
    /// `eval-malformed`: answer the next eval with a frame of a bad magic, then exit.
    EvalMalformed,
    /// `eval-version`: answer the next eval with an `EvalDone` of another protocol version,
    /// then exit.
    EvalVersion,
    /// `eval-exit`: exit at the next eval without answering (a crash).
    EvalExit,
}

impl Fault {
    /// Its file name in the fault directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Fault::StartExit => "start-exit",
            Fault::HelloVersion => "hello-version",
            Fault::EvalError => "eval-error",
            Fault::EvalMalformed => "eval-malformed",
            Fault::EvalVersion => "eval-version",
            Fault::EvalExit => "eval-exit",
        }
    }

    fn error(self) -> WorkerError {
        WorkerError::TestFault { fault: self.file_name() }
    }
}

/// The faults a worker was started with (none outside tests).
#[derive(Clone, Debug, Default)]
pub struct TestFaults {
    dir: Option<PathBuf>,
    load_delay: Duration,
    eval_delay: Duration,
}

impl TestFaults {
    /// No faults.
    pub fn none() -> Self {
        TestFaults::default()
    }

    /// The faults of `DFLASH_WORKER_TEST_FAULTS` (none when unset).
    pub fn from_env() -> Result<Self> {
        let Some(dir) = std::env::var_os(TEST_FAULTS_ENV).map(PathBuf::from) else { return Ok(TestFaults::none()) };
        let (load_delay, eval_delay) = (read_delay(&dir, LOAD_DELAY_FILE)?, read_delay(&dir, EVAL_DELAY_FILE)?);
        tracing::warn!(dir = %dir.display(), ?load_delay, ?eval_delay, "test faults enabled ({TEST_FAULTS_ENV})");
        Ok(TestFaults { dir: Some(dir), load_delay, eval_delay })
    }

    pub fn is_active(&self) -> bool {
        self.dir.is_some()
    }

    /// The sleep after each loaded layer.
    pub fn load_delay(&self) -> Duration {
        self.load_delay
    }

    /// Whether `fault` is armed, taking it (removing its file) if so.
    pub fn take(&self, fault: Fault) -> bool {
        let Some(dir) = &self.dir else { return false };
        let taken = std::fs::remove_file(dir.join(fault.file_name())).is_ok();
        if taken {
            tracing::warn!(fault = fault.file_name(), "test fault taken");
        }
        taken
    }

    /// Before binding the socket: [`Fault::StartExit`].
    pub(crate) fn at_start(&self) -> Result<()> {
        if self.take(Fault::StartExit) {
            return Err(Fault::StartExit.error());
        }
        Ok(())
    }

    /// In place of the handshake: [`Fault::HelloVersion`] writes its Hello on `sock`.
    pub(crate) fn at_hello(&self, sock: &mut UnixStream, identity: &ModelIdentity, experts: &ExpertSet) -> Result<()> {
        if !self.take(Fault::HelloVersion) {
            return Ok(());
        }
        let mut payload = Vec::new();
        encode_hello(&mut payload, identity, experts);
        write_frame(sock, encode_raw_header(MAGIC, PROTOCOL_VERSION + 1, FrameType::Hello as u16, 0, payload.len() as u32, 0), &payload)?;
        Err(Fault::HelloVersion.error())
    }

    /// On receiving eval `id`, before computing it: the eval faults, answered on `server`
    /// or written raw on `sock` (a second handle of the server's socket). Each ends the
    /// worker with its error.
    pub(crate) fn at_eval(&self, server: &mut WorkerServer, sock: &mut UnixStream, id: RequestId) -> Result<()> {
        std::thread::sleep(self.eval_delay);
        if self.take(Fault::EvalError) {
            server.reply_error(id, ErrorCode::INTERNAL, "test fault eval-error")?;
            return Err(Fault::EvalError.error());
        }
        let mut done = Vec::new();
        encode_eval_done(&mut done, 1, 0);
        if self.take(Fault::EvalMalformed) {
            write_frame(sock, encode_raw_header(u32::from_le_bytes(*b"XXXX"), PROTOCOL_VERSION, FrameType::EvalDone as u16, id, done.len() as u32, 0), &done)?;
            return Err(Fault::EvalMalformed.error());
        }
        if self.take(Fault::EvalVersion) {
            write_frame(sock, encode_raw_header(MAGIC, PROTOCOL_VERSION + 1, FrameType::EvalDone as u16, id, done.len() as u32, 0), &done)?;
            return Err(Fault::EvalVersion.error());
        }
        if self.take(Fault::EvalExit) {
            return Err(Fault::EvalExit.error());
        }
        Ok(())
    }
}

/// The milliseconds in `dir/file` (zero when there is no such file).
fn read_delay(dir: &std::path::Path, file: &str) -> Result<Duration> {
    let path = dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let ms = text.trim().parse::<u64>().map_err(|_| WorkerError::TestFaultFile {
                path: path.clone(),
                reason: format!("expected a number of milliseconds, found {:?}", text.trim()),
            })?;
            Ok(Duration::from_millis(ms))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Duration::ZERO),
        Err(source) => Err(WorkerError::Io { what: "read", path, source }),
    }
}

/// Writes a header and payload as they are (the socket may be non-blocking: retries while
/// it is full).
fn write_frame(sock: &mut UnixStream, header: [u8; ipc_proto::HEADER_LEN], payload: &[u8]) -> Result<()> {
    let bytes: Vec<u8> = header.iter().chain(payload).copied().collect();
    let mut sent = 0;
    while sent < bytes.len() {
        match sock.write(&bytes[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(source) => return Err(ipc_proto::ProtoError::Io { op: "write a test-fault frame", source }.into()),
        }
    }
    Ok(())
}
