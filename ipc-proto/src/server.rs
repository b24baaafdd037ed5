//! Worker side: the handshake and the request loop.

use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::client::{ConnectOptions, RequestId};
use crate::error::{ErrorCode, ProtoError, Result};
use experts::ExpertSet;

use crate::frame::{self, EvalRequest};
use crate::shm::{Area, SharedRegion};
use crate::stream::Conn;
use crate::types::{FrameType, Limits, LoadProgress, ModelIdentity, SetupMsg, WorkerStats};

/// A request from the daemon. Every request but `Shutdown` must be answered with the matching
/// `reply_*` call before the next [`WorkerServer::next_request`].
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Compute each pair's expert on its token's input row (inputs copied out with
    /// [`WorkerServer::read_inputs`], one result row per pair copied in with
    /// [`WorkerServer::write_outputs`]) and answer with [`WorkerServer::reply_eval`].
    Eval(EvalRequest),
    /// Answer with [`WorkerServer::reply_pong`], echoing `payload`.
    Ping { id: RequestId, payload: Vec<u8> },
    /// Answer with [`WorkerServer::reply_stats`].
    Stats { id: RequestId },
    /// The daemon wants the worker to exit; drop the server (closing the socket) and exit.
    Shutdown { id: RequestId },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Eval { id: RequestId, n_tokens: u32, n_pairs: u32 },
    Ping { id: RequestId },
    Stats { id: RequestId },
}

/// The worker's end of a handshaken connection.
pub struct WorkerServer {
    conn: Conn,
    identity: ModelIdentity,
    experts: ExpertSet,
    limits: Limits,
    shm: SharedRegion,
    last_id: RequestId,
    pending: Option<Pending>,
    stats: WorkerStats,
    opts: ConnectOptions,
}

/// The worker's end of a connection between Setup and Ready: the worker loads its experts and
/// reports how far it got ([`report_load`](Self::report_load)), then calls
/// [`ready`](Self::ready). The daemon waits as long as the reports show progress
/// (`ConnectOptions::load_stall` on its side).
pub struct WorkerLoading {
    conn: Conn,
    identity: ModelIdentity,
    experts: ExpertSet,
    setup: SetupMsg,
    shm: SharedRegion,
    opts: ConnectOptions,
}

impl WorkerLoading {
    /// Sends a `LoadProgress` frame: `loaded` of `total` bytes of expert weights are in memory.
    pub fn report_load(&mut self, progress: LoadProgress) -> Result<()> {
        frame::encode_load_progress(self.conn.begin_frame(), &progress);
        let d = Some(Instant::now() + self.opts.write_timeout);
        self.conn.send_frame(FrameType::LoadProgress, 0, &[], None, d)
    }

    /// The limits the daemon sent in Setup.
    pub fn limits(&self) -> &Limits {
        &self.setup.limits
    }

    /// Sends Ready: the worker serves requests from now on.
    pub fn ready(mut self) -> Result<WorkerServer> {
        self.conn.begin_frame();
        let d = Some(Instant::now() + self.opts.write_timeout);
        self.conn.send_frame(FrameType::Ready, 0, &[], None, d)?;
        tracing::debug!(limits = ?self.setup.limits, "handshake done");
        Ok(WorkerServer {
            conn: self.conn,
            identity: self.identity,
            experts: self.experts,
            limits: self.setup.limits,
            shm: self.shm,
            last_id: 0,
            pending: None,
            stats: WorkerStats::default(),
            opts: self.opts,
        })
    }
}

impl WorkerServer {
    /// Runs the worker side of the handshake on a connected stream, for a worker whose
    /// experts are already in memory: [`start_handshake`](Self::start_handshake), then Ready.
    pub fn handshake(sock: UnixStream, identity: &ModelIdentity, experts: ExpertSet, opts: &ConnectOptions) -> Result<Self> {
        Self::start_handshake(sock, identity, experts, opts)?.ready()
    }

    /// The handshake up to the load: sends Hello (identity, version, expert set), receives
    /// and checks Setup and its memfd, maps it. The daemon learns of another model or
    /// protocol version before the worker spends time loading.
    pub fn start_handshake(sock: UnixStream, identity: &ModelIdentity, experts: ExpertSet, opts: &ConnectOptions) -> Result<WorkerLoading> {
        identity.validate()?;
        if experts.n_layer() != identity.n_layer || experts.n_expert() != identity.n_expert {
            return Err(ProtoError::Mismatch {
                what: "expert set layers x experts (model)",
                expected: u64::from(identity.n_layer) * u64::from(identity.n_expert),
                found: u64::from(experts.n_layer()) * u64::from(experts.n_expert()),
            });
        }
        let mut conn = Conn::new(sock, opts.spin)?;
        let deadline = Some(Instant::now() + opts.handshake_timeout);
        frame::encode_hello(conn.begin_frame(), identity, &experts);
        conn.send_frame(FrameType::Hello, 0, &[], None, deadline)?;
        let setup = conn
            .read_frame(deadline, "waiting for Setup", None, &|t| t == FrameType::Setup, "Setup")
            .map(|(_, p)| frame::decode_setup(p));
        let setup = match setup {
            Ok(Ok(s)) => s,
            Ok(Err(e)) | Err(e) => return Err(conn.fail(e)),
        };
        let shm = match setup.limits.validate_for(identity).and_then(|()| match conn.take_fd() {
            Some(fd) => SharedRegion::attach(&fd, &setup),
            None => Err(ProtoError::MissingFd { frame: FrameType::Setup }),
        }) {
            Ok(s) => s,
            Err(e) => return Err(conn.fail(e)),
        };
        Ok(WorkerLoading { conn, identity: *identity, experts, setup, shm, opts: *opts })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    pub fn experts(&self) -> &ExpertSet {
        &self.experts
    }

    /// Counters kept by the server: evals, tokens, pairs, compute time reported in
    /// `reply_eval`, pings.
    pub fn counters(&self) -> WorkerStats {
        self.stats
    }

    /// Waits for the next request without a deadline.
    pub fn next_request(&mut self) -> Result<Request> {
        self.next_request_until(None)
    }

    /// Waits for the next request until `deadline`. A malformed or invalid request (bad
    /// header, length, counts, id order, layer, expert not owned or repeated) is
    /// answered with an `Error` frame naming the problem, the connection is closed and the
    /// error returned.
    pub fn next_request_until(&mut self, deadline: Option<Instant>) -> Result<Request> {
        self.conn.check_open()?;
        if self.pending.is_some() {
            return Err(ProtoError::State { expected: "a reply to the previous request", found: "next_request" });
        }
        let last_id = self.last_id;
        let limits = self.limits;
        let experts = &self.experts;
        let accept = |t| matches!(t, FrameType::Eval | FrameType::Ping | FrameType::StatsRequest | FrameType::Shutdown);
        let r = self.conn.read_frame(deadline, "waiting for a request", Some(&limits), &accept, "a request").map(|(h, p)| {
            let id = h.request_id;
            if id <= last_id {
                return Err(ProtoError::RequestIdOrder { previous: last_id, found: id });
            }
            match h.frame_type {
                FrameType::Eval => {
                    let req = frame::decode_eval(id, p, &limits)?;
                    frame::validate_eval(&req, experts)?;
                    Ok(Request::Eval(req))
                }
                FrameType::Ping => Ok(Request::Ping { id, payload: p.to_vec() }),
                FrameType::StatsRequest => Ok(Request::Stats { id }),
                _ => Ok(Request::Shutdown { id }),
            }
        });
        let req = match r {
            Ok(Ok(req)) => req,
            Ok(Err(e)) | Err(e) => return Err(self.conn.fail(e)),
        };
        match &req {
            Request::Eval(e) => {
                self.last_id = e.id;
                self.stats.evals += 1;
                self.stats.tokens += e.n_tokens() as u64;
                self.stats.pairs += e.pairs.n_pairs() as u64;
                self.pending = Some(Pending::Eval { id: e.id, n_tokens: e.n_tokens() as u32, n_pairs: e.pairs.n_pairs() as u32 });
            }
            Request::Ping { id, .. } => {
                self.last_id = *id;
                self.pending = Some(Pending::Ping { id: *id });
            }
            Request::Stats { id } => {
                self.last_id = *id;
                self.pending = Some(Pending::Stats { id: *id });
            }
            Request::Shutdown { id } => {
                self.last_id = *id;
                self.conn.close();
            }
        }
        Ok(req)
    }

    /// The pending eval's `(n_tokens, n_pairs)`, or a state error naming `call`.
    fn pending_eval(&self, call: &'static str) -> Result<(usize, usize)> {
        match self.pending {
            Some(Pending::Eval { n_tokens, n_pairs, .. }) => Ok((n_tokens as usize, n_pairs as usize)),
            _ => Err(ProtoError::State { expected: "a pending eval", found: call }),
        }
    }

    /// Copies the pending eval's input rows (`n_tokens * n_embd` f32) into `dst`, which must
    /// have exactly that length. Only between an `Eval` request and `reply_eval`.
    pub fn read_inputs(&self, dst: &mut [f32]) -> Result<()> {
        let (n_tokens, _) = self.pending_eval("read_inputs")?;
        self.check_rows(n_tokens, dst.len(), "eval input f32 (n_tokens * n_embd)")?;
        self.shm.read_rows(Area::Input, dst)
    }

    /// Copies the pending eval's results (`n_pairs * n_embd` f32: row `p` is pair `p`'s
    /// expert on its token's input row) into the output area. Only between an `Eval` request
    /// and `reply_eval`.
    pub fn write_outputs(&mut self, src: &[f32]) -> Result<()> {
        let (_, n_pairs) = self.pending_eval("write_outputs")?;
        self.check_rows(n_pairs, src.len(), "eval output f32 (n_pairs * n_embd)")?;
        self.shm.write_rows(Area::Output, src)
    }

    fn check_rows(&self, n_rows: usize, found: usize, what: &'static str) -> Result<()> {
        let expected = n_rows * self.limits.n_embd as usize;
        if found != expected {
            return Err(ProtoError::Mismatch { what, expected: expected as u64, found: found as u64 });
        }
        Ok(())
    }

    fn take_pending(&mut self, id: RequestId, want: &'static str) -> Result<Pending> {
        self.conn.check_open()?;
        let matches = match self.pending {
            Some(Pending::Eval { id: p, .. }) => want == "eval" && p == id,
            Some(Pending::Ping { id: p }) => want == "ping" && p == id,
            Some(Pending::Stats { id: p }) => want == "stats" && p == id,
            None => false,
        };
        match self.pending.take() {
            Some(p) if matches => Ok(p),
            other => {
                self.pending = other;
                Err(ProtoError::State { expected: "a reply to the pending request with its id", found: want })
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        Some(Instant::now() + self.opts.write_timeout)
    }

    /// Answers the pending eval: the outputs are in the output area.
    pub fn reply_eval(&mut self, id: RequestId, compute_us: u64) -> Result<()> {
        let p = self.take_pending(id, "eval")?;
        let n_pairs = match p {
            Pending::Eval { n_pairs, .. } => n_pairs,
            _ => 0,
        };
        self.stats.compute_us += compute_us;
        frame::encode_eval_done(self.conn.begin_frame(), n_pairs, compute_us);
        let d = self.deadline();
        self.conn.send_frame(FrameType::EvalDone, id, &[], None, d)
    }

    pub fn reply_pong(&mut self, id: RequestId, payload: &[u8]) -> Result<()> {
        self.take_pending(id, "ping")?;
        self.stats.pings += 1;
        self.conn.begin_frame();
        let d = self.deadline();
        self.conn.send_frame(FrameType::Pong, id, payload, None, d)
    }

    pub fn reply_stats(&mut self, id: RequestId, stats: &WorkerStats) -> Result<()> {
        self.take_pending(id, "stats")?;
        frame::encode_stats(self.conn.begin_frame(), stats);
        let d = self.deadline();
        self.conn.send_frame(FrameType::StatsReply, id, &[], None, d)
    }

    /// Answers the pending request (or none: `id` 0) with an error and closes the connection.
    pub fn reply_error(&mut self, id: RequestId, code: ErrorCode, message: &str) -> Result<()> {
        self.conn.check_open()?;
        self.pending = None;
        frame::encode_error(self.conn.begin_frame(), code, message);
        let d = self.deadline();
        let r = self.conn.send_frame(FrameType::Error, id, &[], None, d);
        self.conn.close();
        r
    }
}
