//! Daemon side: one connection to one worker.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{ErrorCode, ProtoError, Result};
use experts::{ExpertPairs, ExpertSet};

use crate::frame::{self, check_slots};
use crate::shm::{Area, SharedRegion};
use crate::stream::Conn;
use crate::types::{FrameType, Limits, LoadProgress, ModelIdentity, SetupMsg, WorkerStats};

/// Identifies one request on a connection (increasing from 1).
pub type RequestId = u64;

/// Timeouts and the wait policy of a connection (either side).
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Hello and Setup (the exchange before the worker loads its experts).
    pub handshake_timeout: Duration,
    /// Daemon side, from Setup to Ready while the worker loads: the longest wait for the next
    /// `LoadProgress` that shows more bytes loaded (or for Ready). A worker that keeps
    /// making progress may take as long as its load takes.
    pub load_stall: Duration,
    /// Sending one frame (only matters when the peer stops reading).
    pub write_timeout: Duration,
    /// Before blocking in `poll`, retry a non-blocking receive for this long. Trades a CPU for
    /// a shorter wake-up; zero blocks at once.
    pub spin: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            handshake_timeout: Duration::from_secs(10),
            load_stall: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            spin: Duration::ZERO,
        }
    }
}

/// The answer to an eval: the outputs are in the output area (see [`WorkerConnection::output`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalReply {
    pub id: RequestId,
    /// Output rows written: one per (token, expert) pair of the eval.
    pub n_pairs: u32,
    /// Compute time the worker reported, µs.
    pub compute_us: u64,
    /// From `eval_begin` to the reply, measured here.
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy)]
struct PendingEval {
    id: RequestId,
    n_pairs: u32,
    sent: Instant,
}

/// What the worker reported while it loaded its experts (between Setup and Ready).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The last progress reported (zero when the worker sent none: nothing to load).
    pub last: LoadProgress,
    /// `LoadProgress` frames received.
    pub reports: u32,
    /// From Setup sent to Ready received.
    pub elapsed: Duration,
}

/// A handshaken connection to a worker with its shared activation region.
///
/// One eval at a time: copy the inputs in with [`write_inputs`](Self::write_inputs), send
/// with [`eval_begin`](Self::eval_begin), collect with [`eval_end`](Self::eval_end), copy the
/// results out with [`read_outputs`](Self::read_outputs). Any wire error closes the connection; errors for
/// which [`ProtoError::is_peer_lost`] holds mean the worker should be respawned.
pub struct WorkerConnection {
    conn: Conn,
    limits: Limits,
    identity: ModelIdentity,
    experts: ExpertSet,
    shm: SharedRegion,
    next_id: RequestId,
    pending: Option<PendingEval>,
    last_done: u32,
    write_timeout: Duration,
    load: LoadReport,
}

impl WorkerConnection {
    /// Connects to the worker listening at `path` and runs the handshake with default options.
    pub fn connect(path: &Path, limits: Limits, expected: &ModelIdentity) -> Result<Self> {
        Self::connect_with(path, limits, expected, &ConnectOptions::default())
    }

    pub fn connect_with(path: &Path, limits: Limits, expected: &ModelIdentity, opts: &ConnectOptions) -> Result<Self> {
        let sock = UnixStream::connect(path).map_err(|source| ProtoError::Connect { path: path.to_owned(), source })?;
        Self::handshake(sock, limits, expected, opts)
    }

    /// The handshake over an already connected stream: reads the worker's Hello, refuses
    /// another model or version, creates the shared region, sends Setup with its memfd, then
    /// waits for Ready while the worker loads its experts: each `LoadProgress` that shows
    /// more bytes loaded gives the worker another [`ConnectOptions::load_stall`]; without
    /// progress for that long the handshake fails with [`ProtoError::LoadStalled`].
    pub fn handshake(sock: UnixStream, limits: Limits, expected: &ModelIdentity, opts: &ConnectOptions) -> Result<Self> {
        limits.validate_for(expected)?;
        let mut conn = Conn::new(sock, opts.spin)?;
        let deadline = Some(Instant::now() + opts.handshake_timeout);
        let hello =
            conn.read_frame(deadline, "waiting for Hello", None, &|t| t == FrameType::Hello, "Hello").map(|(_, p)| frame::decode_hello(p));
        let (identity, experts) = match hello {
            Ok(Ok(v)) => v,
            Ok(Err(e)) | Err(e) => return Err(conn.fail(e)),
        };
        if identity != *expected {
            let e = ProtoError::IdentityMismatch { expected: Box::new(*expected), found: Box::new(identity) };
            debug_assert_eq!(e.code(), ErrorCode::IDENTITY_MISMATCH);
            return Err(conn.fail(e));
        }
        let (shm, fd) = match SharedRegion::create(&limits) {
            Ok(v) => v,
            Err(e) => return Err(conn.fail(e)),
        };
        let layout = shm.layout();
        let setup = SetupMsg { limits, shm_len: layout.len, input_offset: layout.input_offset, output_offset: layout.output_offset };
        frame::encode_setup(conn.begin_frame(), &setup);
        conn.send_frame(FrameType::Setup, 0, &[], Some(fd.as_raw_fd()), deadline)?;
        drop(fd);
        let load = wait_loaded(&mut conn, &limits, opts.load_stall)?;
        tracing::debug!(%identity, experts = experts.len(), loaded = load.last.loaded, seconds = load.elapsed.as_secs_f64(), "worker connected");
        Ok(WorkerConnection {
            conn,
            limits,
            identity,
            experts,
            shm,
            next_id: 1,
            pending: None,
            last_done: 0,
            write_timeout: opts.write_timeout,
            load,
        })
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// The experts the worker owns, as it reported them.
    pub fn experts(&self) -> &ExpertSet {
        &self.experts
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What the worker reported while loading its experts.
    pub fn load_report(&self) -> LoadReport {
        self.load
    }

    /// Whether an earlier error closed the connection.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Changes the wait policy (see [`ConnectOptions::spin`]).
    pub fn set_spin(&mut self, spin: Duration) {
        self.conn.set_spin(spin);
    }

    fn idle(&self, call: &'static str) -> Result<()> {
        self.conn.check_open()?;
        if self.pending.is_some() {
            return Err(ProtoError::State { expected: "no eval in flight (call eval_end first)", found: call });
        }
        Ok(())
    }

    fn next_id(&mut self) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Copies `x` (the activations of the next eval's tokens, `n_tokens * n_embd` f32) into
    /// rows `0..n_tokens` of the input area. Only while no eval is in flight.
    pub fn write_inputs(&mut self, x: &[f32]) -> Result<()> {
        self.idle("write_inputs")?;
        self.shm.write_rows(Area::Input, x)
    }

    /// Copies rows `0..n_pairs` of the output area, as written by the last completed eval,
    /// into `out` (`n_pairs * n_embd` f32: row `p` is pair `p`'s expert on its token's input
    /// row). Only while no eval is in flight.
    pub fn read_outputs(&self, out: &mut [f32]) -> Result<()> {
        self.idle("read_outputs")?;
        let n_pairs = out.len() / self.limits.n_embd as usize;
        if n_pairs > self.last_done as usize {
            return Err(ProtoError::OutOfRange {
                what: "output rows (pairs of the last completed eval)",
                max: u64::from(self.last_done),
                found: n_pairs as u64,
            });
        }
        self.shm.read_rows(Area::Output, out)
    }

    /// Sends an eval of `pairs.n_tokens()` tokens (rows `0..n_tokens` of the input area) at
    /// `layer`, with each token's experts owned by this worker. Does not wait.
    pub fn eval_begin(&mut self, layer: u32, pairs: &ExpertPairs) -> Result<RequestId> {
        self.idle("eval_begin")?;
        if layer >= self.identity.n_layer {
            return Err(ProtoError::LayerOutOfRange { layer, n_layer: self.identity.n_layer });
        }
        if pairs.n_tokens() > self.limits.max_tokens as usize {
            return Err(ProtoError::OutOfRange {
                what: "eval n_tokens",
                max: u64::from(self.limits.max_tokens),
                found: pairs.n_tokens() as u64,
            });
        }
        for (t, ids) in pairs.tokens().enumerate() {
            if ids.len() > self.limits.max_experts_per_token as usize {
                return Err(ProtoError::OutOfRange {
                    what: "experts per token",
                    max: u64::from(self.limits.max_experts_per_token),
                    found: ids.len() as u64,
                });
            }
            check_slots(t as u32, layer, ids, &self.experts)?;
        }
        let id = self.next_id();
        frame::encode_eval(self.conn.begin_frame(), layer, pairs);
        self.conn.send_frame(FrameType::Eval, id, &[], None, Some(Instant::now() + self.write_timeout))?;
        self.last_done = 0;
        self.pending = Some(PendingEval { id, n_pairs: pairs.n_pairs() as u32, sent: Instant::now() });
        Ok(id)
    }

    /// Waits until `deadline` for the reply to eval `id`. EOF and timeout give errors for
    /// which [`ProtoError::is_peer_lost`] holds.
    pub fn eval_end(&mut self, id: RequestId, deadline: Instant) -> Result<EvalReply> {
        self.conn.check_open()?;
        let p = match self.pending {
            Some(p) if p.id == id => p,
            Some(_) => return Err(ProtoError::State { expected: "the id returned by eval_begin", found: "another id" }),
            None => return Err(ProtoError::State { expected: "an eval in flight", found: "eval_end" }),
        };
        let r = self
            .conn
            .read_frame(Some(deadline), "waiting for EvalDone", Some(&self.limits), &|t| t == FrameType::EvalDone, "EvalDone")
            .map(|(h, pl)| (h.request_id, frame::decode_eval_done(pl)));
        let (rid, n, compute_us) = match r {
            Ok((rid, Ok((n, us)))) => (rid, n, us),
            Ok((_, Err(e))) | Err(e) => return Err(self.conn.fail(e)),
        };
        if rid != id {
            return Err(self.conn.fail(ProtoError::RequestIdMismatch { expected: id, found: rid }));
        }
        if n != p.n_pairs {
            let e = ProtoError::Mismatch { what: "EvalDone n_pairs", expected: u64::from(p.n_pairs), found: u64::from(n) };
            return Err(self.conn.fail(e));
        }
        self.pending = None;
        self.last_done = n;
        Ok(EvalReply { id, n_pairs: n, compute_us, elapsed: p.sent.elapsed() })
    }

    /// Ping without payload; returns the round trip.
    pub fn ping(&mut self, deadline: Instant) -> Result<Duration> {
        self.ping_with(&[], deadline)
    }

    /// Ping carrying `payload` (at most the input area's size), which the worker echoes
    /// back; checks the echo and returns the round trip.
    pub fn ping_with(&mut self, payload: &[u8], deadline: Instant) -> Result<Duration> {
        self.idle("ping")?;
        let limit = self.limits.input_area_bytes();
        if payload.len() as u64 > limit {
            return Err(ProtoError::PayloadTooLarge { frame: FrameType::Ping, limit, found: payload.len() as u64 });
        }
        let t0 = Instant::now();
        let id = self.next_id();
        self.conn.begin_frame();
        self.conn.send_frame(FrameType::Ping, id, payload, None, Some(deadline))?;
        let r = self
            .conn
            .read_frame(Some(deadline), "waiting for Pong", Some(&self.limits), &|t| t == FrameType::Pong, "Pong")
            .map(|(h, pl)| {
                if h.request_id != id {
                    Err(ProtoError::RequestIdMismatch { expected: id, found: h.request_id })
                } else if pl.len() != payload.len() {
                    Err(ProtoError::PayloadLength { frame: FrameType::Pong, expected: payload.len() as u64, found: pl.len() as u64 })
                } else if let Some(i) = pl.iter().zip(payload).position(|(a, b)| a != b) {
                    Err(ProtoError::Mismatch { what: "Pong echo (first byte that differs)", expected: payload.len() as u64, found: i as u64 })
                } else {
                    Ok(())
                }
            });
        match r {
            Ok(Ok(())) => Ok(t0.elapsed()),
            Ok(Err(e)) | Err(e) => Err(self.conn.fail(e)),
        }
    }

    /// The worker's counters.
    pub fn stats(&mut self, deadline: Instant) -> Result<WorkerStats> {
        self.idle("stats")?;
        let id = self.next_id();
        self.conn.begin_frame();
        self.conn.send_frame(FrameType::StatsRequest, id, &[], None, Some(deadline))?;
        let r = self
            .conn
            .read_frame(Some(deadline), "waiting for StatsReply", Some(&self.limits), &|t| t == FrameType::StatsReply, "StatsReply")
            .map(|(h, pl)| {
                if h.request_id != id {
                    Err(ProtoError::RequestIdMismatch { expected: id, found: h.request_id })
                } else {
                    frame::decode_stats(pl)
                }
            });
        match r {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) | Err(e) => Err(self.conn.fail(e)),
        }
    }

    /// Asks the worker to exit and waits until it closes the connection (its EOF), at most
    /// until `deadline` (then `Timeout`: kill it).
    pub fn shutdown(mut self, deadline: Instant) -> Result<()> {
        self.conn.check_open()?;
        let id = self.next_id();
        self.conn.begin_frame();
        self.conn.send_frame(FrameType::Shutdown, id, &[], None, Some(deadline))?;
        match self.conn.read_frame(Some(deadline), "waiting for the worker to exit", Some(&self.limits), &|_| false, "EOF") {
            Err(ProtoError::PeerClosed { .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err(ProtoError::State { expected: "EOF after Shutdown", found: "a frame" }),
        }
    }
}

/// Daemon side, after Setup: reads `LoadProgress` frames until Ready. Each report must keep
/// the total and never go back; one that shows more bytes loaded moves the deadline to
/// `stall` from its arrival. Ready after progress must come with everything loaded.
fn wait_loaded(conn: &mut Conn, limits: &Limits, stall: Duration) -> Result<LoadReport> {
    let started = Instant::now();
    let mut report = LoadReport::default();
    let mut last_progress = started;
    let mut last_log = started;
    loop {
        let r = conn.read_frame(
            Some(last_progress + stall),
            "waiting for the worker to load its experts",
            Some(limits),
            &|t| matches!(t, FrameType::LoadProgress | FrameType::Ready),
            "LoadProgress or Ready",
        );
        let (h, payload) = match r {
            Ok(v) => v,
            Err(ProtoError::Timeout { .. }) => {
                return Err(ProtoError::LoadStalled { waited: last_progress.elapsed(), loaded: report.last.loaded, total: report.last.total })
            }
            Err(e) => return Err(e),
        };
        if h.frame_type == FrameType::Ready {
            if report.reports > 0 && report.last.loaded != report.last.total {
                let e = ProtoError::Mismatch { what: "bytes loaded at Ready (the total)", expected: report.last.total, found: report.last.loaded };
                return Err(conn.fail(e));
            }
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        let p = match frame::decode_load_progress(payload) {
            Ok(p) => p,
            Err(e) => return Err(conn.fail(e)),
        };
        if report.reports > 0 {
            let prev = report.last;
            let bad = if p.total != prev.total {
                Some(ProtoError::Mismatch { what: "total bytes to load (as first reported)", expected: prev.total, found: p.total })
            } else if p.loaded < prev.loaded {
                Some(ProtoError::Mismatch { what: "bytes loaded (at least the previous report)", expected: prev.loaded, found: p.loaded })
            } else {
                None
            };
            if let Some(e) = bad {
                return Err(conn.fail(e));
            }
        }
        if report.reports == 0 || p.loaded > report.last.loaded {
            last_progress = Instant::now();
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(loaded = p.loaded, total = p.total, "worker loading its experts");
        }
        report.last = p;
        report.reports += 1;
    }
}
