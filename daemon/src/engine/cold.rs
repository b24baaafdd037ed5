//! Cold experts for the graph's `ColdExperts` seam: either computed in-process by an
//! `ExpertWorker` (`--expert-workers 0`), or by `moe-expert` worker processes this daemon
//! spawns and supervises, each owning a byte-balanced share of the cold experts. Activations
//! go through each worker's shared memory; `begin` sends to every worker owning a pair and
//! returns, `end` waits and puts each worker's output rows back in the order of all the
//! pairs (each row is one expert on one token, whoever computed it: no sums here, so the
//! split over workers changes no bit). A worker that fails in any way (see [`WorkerPool`])
//! is killed, respawned and the layer's request replayed, so the step completes with the
//! same result.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use expert_worker::pinning::Pin;
use expert_worker::compute::PairSplit;
use expert_worker::ExpertWorker;
use experts::{ExpertPairs, ExpertSet};
use graph::{ColdError, ColdExperts, ColdSplit};
use ipc_proto::{Limits, ModelIdentity, ProtoError, RequestId, WorkerConnection};
use loader::ModelFile;

/// A wire error of worker `worker` across the `ColdExperts` seam: what the worker reported
/// (an `Error` frame), or a protocol failure on our side of the connection.
fn wire_error(worker: usize, e: ProtoError) -> ColdError {
    match e {
        ProtoError::Remote { .. } => ColdError::Remote { worker, source: e.into() },
        e => ColdError::Protocol { worker, source: e.into() },
    }
}

/// `--expert-workers 0`: the cold experts computed in this process, on the CPU. With the
/// model on the CPU, by the threads of the graph's op that waits for them
/// ([`ColdExperts::split`]): ggml's CPU team is an OpenMP one, inside whose parallel region a
/// compute of the executor's own would get one thread. With the model on another device
/// ([`InProcess::beside`]), by a thread of the executor's own with its own team, started at
/// `begin`, so that the cold experts are computed while the device computes the held ones
/// (as worker processes are).
pub struct InProcess {
    /// Holds every cold expert.
    worker: Arc<ExpertWorker>,
    /// The layer begun, its activations and cold pairs (the split form).
    pending: Option<(u32, Vec<f32>, ExpertPairs)>,
    /// The executor's thread, when it computes beside the graph.
    beside: Option<Beside>,
}

/// The thread that computes a begun layer while the graph goes on, and the layer it has.
struct Beside {
    /// None once dropping (which ends the thread's loop).
    jobs: Option<std::sync::mpsc::Sender<(u32, Vec<f32>, ExpertPairs)>>,
    rows: std::sync::mpsc::Receiver<std::result::Result<Vec<f32>, String>>,
    begun: Option<u32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    /// The executor of a model on the CPU (its layers split over the graph's threads).
    pub fn new(model: &ModelFile, cold: &ExpertSet, threads: usize) -> Result<InProcess> {
        Ok(InProcess { worker: Arc::new(ExpertWorker::load(model, cold, threads)?), pending: None, beside: None })
    }

    /// The executor of a model on another device: each begun layer computed at once on a
    /// thread of its own (its `threads`-thread team), collected by `end`.
    pub fn beside(model: &ModelFile, cold: &ExpertSet, threads: usize) -> Result<InProcess> {
        let worker = Arc::new(ExpertWorker::load(model, cold, threads)?);
        let (jobs, todo) = std::sync::mpsc::channel::<(u32, Vec<f32>, ExpertPairs)>();
        let (done, rows) = std::sync::mpsc::channel();
        let w = worker.clone();
        let thread = std::thread::Builder::new()
            .name("cold-experts".into())
            .spawn(move || {
                for (layer, x, pairs) in todo {
                    let mut out = vec![0f32; pairs.n_pairs() * w.n_embd()];
                    let r = w.eval(layer, &x, &pairs, &mut out).map(|_| out).map_err(|e| e.to_string());
                    if done.send(r).is_err() {
                        break;
                    }
                }
            })
            .context("starting the cold-expert thread")?;
        Ok(InProcess { worker, pending: None, beside: Some(Beside { jobs: Some(jobs), rows, begun: None, thread: Some(thread) }) })
    }
}

impl Drop for Beside {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A layer's cold pairs computed by the threads that share it, each on its own lane.
struct InProcessJob {
    worker: Arc<ExpertWorker>,
    layer: u32,
    x: Vec<f32>,
    pairs: ExpertPairs,
    /// The pairs' parts, made by the first thread to run (every thread of a call has the
    /// same `parts`).
    split: std::sync::OnceLock<PairSplit>,
}

impl ColdSplit for InProcessJob {
    fn run(&self, part: usize, parts: usize, put: &mut dyn FnMut(usize, &[f32])) -> Result<(), ColdError> {
        let split = self.split.get_or_init(|| PairSplit::new(self.pairs.ids(), parts));
        self.worker.eval_part(self.layer, &self.x, &self.pairs, split, part, put).map_err(|e| ColdError::Compute { source: e.into() })
    }
}

impl ColdExperts for InProcess {
    fn begin(&mut self, layer: usize, _n_embd: usize, x: &[f32], pairs: &ExpertPairs) -> Result<(), ColdError> {
        if let Some(b) = &mut self.beside {
            if let Some(l) = b.begun {
                return Err(ColdError::OutOfOrder { layer, begun: Some(l as usize) });
            }
            let sent = b.jobs.as_ref().is_some_and(|j| j.send((layer as u32, x.to_vec(), pairs.clone())).is_ok());
            if !sent {
                return Err(ColdError::Compute { source: "the cold-expert thread has ended".into() });
            }
            b.begun = Some(layer as u32);
            return Ok(());
        }
        self.pending = Some((layer as u32, x.to_vec(), pairs.clone()));
        Ok(())
    }

    fn end(&mut self, layer: usize, out: &mut [f32]) -> Result<(), ColdError> {
        if let Some(b) = &mut self.beside {
            let Some(l) = b.begun.take() else { return Err(ColdError::OutOfOrder { layer, begun: None }) };
            // The thread's answer is collected even for a wrong layer, so the next begin finds it idle.
            let rows = b.rows.recv().map_err(|_| ColdError::Compute { source: "the cold-expert thread has ended".into() })?;
            if l as usize != layer {
                return Err(ColdError::OutOfOrder { layer, begun: Some(l as usize) });
            }
            let rows = rows.map_err(|e| ColdError::Compute { source: e.into() })?;
            if rows.len() != out.len() {
                return Err(ColdError::Compute { source: format!("{} output values for a buffer of {}", rows.len(), out.len()).into() });
            }
            out.copy_from_slice(&rows);
            return Ok(());
        }
        let Some((l, x, pairs)) = self.pending.take() else { return Err(ColdError::OutOfOrder { layer, begun: None }) };
        if l as usize != layer {
            return Err(ColdError::OutOfOrder { layer, begun: Some(l as usize) });
        }
        self.worker.eval(l, &x, &pairs, out).map_err(|e| ColdError::Compute { source: e.into() })?;
        Ok(())
    }

    fn split(&mut self) -> Option<Arc<dyn ColdSplit>> {
        // Beside the graph, the layer is already being computed (`pending` stays empty).
        let (layer, x, pairs) = self.pending.take()?;
        Some(Arc::new(InProcessJob { worker: self.worker.clone(), layer, x, pairs, split: std::sync::OnceLock::new() }))
    }
}

/// How long the pool waits for its workers.
#[derive(Debug, Clone, Copy)]
pub struct WorkerDeadlines {
    /// A starting worker is killed when it shows no progress for this long between two
    /// load reports that show more bytes loaded (and when its socket has not opened after
    /// this long, at least the handshake timeout).
    pub load_stall: Duration,
    /// Floor of an eval's deadline, to which each (token, expert) pair adds the time to
    /// stream its expert's weights at [`EVAL_MIN_BYTES_PER_S`].
    pub eval_floor: Duration,
}

/// The slowest rate at which a worker is assumed to get through an expert's weights per
/// (token, expert) pair: far below what one CPU thread does (several GB/s of weights read,
/// quantised dot products included), so that only a hung worker misses the deadline.
pub const EVAL_MIN_BYTES_PER_S: f64 = (1u64 << 30) as f64;

impl WorkerDeadlines {
    /// How long an eval of `n_pairs` pairs over experts of `expert_bytes` each may take.
    pub fn eval(&self, n_pairs: usize, expert_bytes: u64) -> Duration {
        self.eval_floor + Duration::from_secs_f64(n_pairs as f64 * expert_bytes as f64 / EVAL_MIN_BYTES_PER_S)
    }
}

/// A running worker process and its connection.
struct Live {
    child: Child,
    conn: WorkerConnection,
}

/// An eval sent to a worker.
#[derive(Debug, Clone, Copy)]
struct Sent {
    id: RequestId,
    deadline: Instant,
}

struct Worker {
    index: usize,
    experts: ExpertSet,
    socket: PathBuf,
    spec: PathBuf,
    /// None after a failure whose respawn failed too: the next layer that needs this worker
    /// starts it again.
    live: Option<Live>,
    /// The pairs of the current layer this worker owns (kept for a replay).
    share: ExpertPairs,
    /// Its output rows for `share` (one per pair, in order), copied out of its shared memory.
    rows: Vec<f32>,
    /// The eval in flight, or why it could not be sent (handled in `end`).
    pending: Option<Result<Sent, ColdError>>,
}

impl Worker {
    /// Kills and reaps the process (it may be stopped or hung; SIGKILL ends it anyway).
    fn kill(&mut self) {
        if let Some(mut l) = self.live.take() {
            l.child.kill().ok();
            l.child.wait().ok();
        }
        self.pending = None;
    }
}

/// Spawned `moe-expert` workers.
///
/// Every way a worker can fail while serving a layer — it died (EOF), hung (no reply by the
/// eval's deadline), answered with an `Error` frame, or sent a frame we refuse (malformed,
/// another protocol version, out of order) — ends the same way: the worker is killed, a new
/// one is started and the layer's request replayed to it, so the step completes with the
/// same result. If the start or the replay fails too, the step fails with that error, and
/// the worker is started again when a later step needs it: a failure never outlives the
/// request it happened in.
pub struct WorkerPool {
    launch: Launch,
    /// Bytes of one routed expert per layer (the eval deadlines scale with them).
    expert_bytes: Vec<u64>,
    /// Private (0700) directory for the sockets and placement files, removed on drop.
    dir: tempfile::TempDir,
    workers: Vec<Worker>,
    /// Per layer, per expert: the index of the worker that owns it (`usize::MAX`: none).
    owner: Vec<Vec<usize>>,
    /// The current layer's activations (kept for a replay).
    x: Vec<f32>,
    /// The layer's cold pairs, in the order of the output rows `end` fills.
    pairs: ExpertPairs,
    /// Worker-reported compute of the last `end`, summed over workers (µs).
    reported_us: u64,
    pub respawns: usize,
}

/// How the pool starts a worker process and connects to it (shared by the threads that
/// connect to several workers at once).
struct Launch {
    exe: PathBuf,
    model: PathBuf,
    threads: usize,
    spin: Duration,
    pins: Vec<Pin>,
    limits: Limits,
    identity: ModelIdentity,
    deadlines: WorkerDeadlines,
}

impl Launch {
    /// Starts worker `index`'s process.
    fn process(&self, index: usize, socket: &Path, spec: &Path) -> Result<Child> {
        Command::new(&self.exe)
            .arg("--backend-ipc-mode=moe-expert")
            .arg("--model")
            .arg(&self.model)
            .arg("--socket")
            .arg(socket)
            .arg("--experts")
            .arg(spec)
            .arg("--threads")
            .arg(self.threads.to_string())
            .arg("--spin-us")
            .arg(self.spin.as_micros().to_string())
            .args(self.pins.get(index).map(Pin::to_args).into_iter().flatten())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting expert worker {index} ({})", self.exe.display()))
    }

    /// Starts worker `index` and handshakes with it. The wait follows the work: until the
    /// socket opens (the worker binds it before loading anything), then as long as its load
    /// reports show progress, each time at most `load_stall`. On failure the process is
    /// killed and the error says why (exit status, refused handshake, stalled load).
    fn start(&self, index: usize, socket: &Path, spec: &Path) -> Result<Live> {
        let mut child = self.process(index, socket, spec)?;
        match self.connect(index, &mut child, socket) {
            Ok(conn) => Ok(Live { child, conn }),
            Err(e) => {
                child.kill().ok();
                child.wait().ok();
                Err(e)
            }
        }
    }

    fn connect(&self, index: usize, child: &mut Child, socket: &Path) -> Result<WorkerConnection> {
        let stall = self.deadlines.load_stall;
        let t0 = Instant::now();
        let opts = ipc_proto::ConnectOptions { spin: self.spin, load_stall: stall, ..ipc_proto::ConnectOptions::default() };
        // Before its socket opens a worker opens the model and hashes its header: bounded
        // work, as Hello and Setup are, so at least their timeout.
        let open_limit = stall.max(opts.handshake_timeout);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("expert worker {index} exited during start-up ({status})");
            }
            if socket.exists() {
                match WorkerConnection::connect_with(socket, self.limits, &self.identity, &opts) {
                    Ok(conn) => {
                        let load = conn.load_report();
                        tracing::info!(worker = index, bytes = load.last.loaded, seconds = load.elapsed.as_secs_f64(), "expert worker ready");
                        return Ok(conn);
                    }
                    // Bound but not yet accepting: try again.
                    Err(ProtoError::Connect { .. }) if t0.elapsed() < open_limit => {}
                    Err(e) => {
                        // A worker that refused us has usually exited saying why.
                        std::thread::sleep(Duration::from_millis(20));
                        let status = child.try_wait()?.map(|s| format!(" (worker {s})")).unwrap_or_default();
                        bail!("expert worker {index}: handshake failed: {e}{status}");
                    }
                }
            } else if t0.elapsed() > open_limit {
                bail!("expert worker {index} did not open {} within {open_limit:?}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl WorkerPool {
    /// Spawn one worker per share and connect to each (handshake checks the model).
    /// `spin`: how long both sides of each connection spin before blocking.
    /// `pins`: where each worker runs (empty: anywhere).
    pub fn spawn(
        model: &ModelFile,
        shares: Vec<ExpertSet>,
        threads: usize,
        max_tokens: usize,
        spin: Duration,
        pins: Vec<Pin>,
        deadlines: WorkerDeadlines,
    ) -> Result<WorkerPool> {
        let exe = std::env::current_exe().context("locating the dflash executable")?;
        let identity = expert_worker::model_identity(model)?;
        let expert_bytes = expert_worker::expert_bytes_per_layer(model)?;
        let c = &model.config;
        let limits = Limits { max_tokens: max_tokens as u32, n_embd: c.n_embd as u32, max_experts_per_token: c.n_expert_used as u32 };
        let base = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("dflash-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(&base)
            .with_context(|| format!("creating a private socket directory in {}", base.display()))?;
        let mut owner = vec![vec![usize::MAX; c.n_expert]; c.n_layer];
        for (index, share) in shares.iter().enumerate() {
            for (l, ids) in share.layers().iter().enumerate() {
                for &e in ids {
                    owner[l][e as usize] = index;
                }
            }
        }
        let launch = Launch { exe, model: model.path.clone(), threads, spin, pins, limits, identity, deadlines };
        let mut pool = WorkerPool {
            launch,
            expert_bytes,
            dir,
            workers: Vec::new(),
            owner,
            x: Vec::new(),
            pairs: ExpertPairs::new(),
            reported_us: 0,
            respawns: 0,
        };
        // Every process first, then the connections at once, each on a thread of its own: a
        // worker loads its experts after the handshake, so the workers load side by side.
        let mut launched: Vec<(usize, ExpertSet, PathBuf, PathBuf, Child)> = Vec::new();
        let kill_all = |launched: &mut Vec<(usize, ExpertSet, PathBuf, PathBuf, Child)>| {
            for (.., child) in launched.iter_mut() {
                child.kill().ok();
                child.wait().ok();
            }
        };
        for (index, experts) in shares.into_iter().enumerate() {
            let socket = pool.dir.path().join(format!("worker-{index}.sock"));
            let spec = pool.dir.path().join(format!("worker-{index}.json"));
            let child = experts.write_json(&spec).map_err(anyhow::Error::from).and_then(|()| pool.launch.process(index, &socket, &spec));
            match child {
                Ok(child) => launched.push((index, experts, socket, spec, child)),
                Err(e) => {
                    kill_all(&mut launched);
                    return Err(e);
                }
            }
        }
        let launch = &pool.launch;
        let conns: Vec<Result<WorkerConnection>> = std::thread::scope(|s| {
            let handles: Vec<_> = launched.iter_mut().map(|(index, _, socket, _, child)| s.spawn(|| launch.connect(*index, child, socket))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a thread connecting to an expert worker panicked")))).collect()
        });
        let mut first_error = None;
        let mut live = Vec::new();
        for ((index, experts, socket, spec, child), conn) in launched.into_iter().zip(conns) {
            match conn {
                Ok(conn) => live.push(Worker { index, experts, socket, spec, live: Some(Live { child, conn }), share: ExpertPairs::new(), rows: Vec::new(), pending: None }),
                Err(e) => {
                    let mut child = child;
                    child.kill().ok();
                    child.wait().ok();
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            for w in &mut live {
                w.kill();
            }
            return Err(e);
        }
        pool.workers = live;
        Ok(pool)
    }

    /// Starts worker `index` again and handshakes with it ([`Launch::start`]).
    fn start(&self, index: usize, socket: &Path, spec: &Path) -> Result<Live> {
        self.launch.start(index, socket, spec)
    }

    pub fn n_workers(&self) -> usize {
        self.workers.len()
    }

    /// Pids of the running worker processes (tests and diagnostics).
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|w| w.live.as_ref()).map(|l| l.child.id()).collect()
    }

    /// Sends worker `i`'s share of `layer`: the activations `x` of all its tokens, its pairs.
    /// A worker that is not running is started first.
    /// Its outcome is left in the worker's `pending`.
    fn send(&mut self, i: usize, layer: u32) {
        let sent = self.try_send(i, layer);
        self.workers[i].pending = Some(sent);
    }

    fn try_send(&mut self, i: usize, layer: u32) -> Result<Sent, ColdError> {
        if self.workers[i].live.is_none() {
            tracing::info!(worker = i, "starting the expert worker again after its failure");
            self.restart(i).map_err(|e| ColdError::WorkerStart { worker: i, source: format!("{e:#}").into() })?;
        }
        let expert_bytes = self.expert_bytes.get(layer as usize).copied().unwrap_or(0);
        let deadline = Instant::now() + self.launch.deadlines.eval(self.workers[i].share.n_pairs(), expert_bytes);
        let w = &mut self.workers[i];
        let Some(live) = w.live.as_mut() else { return Err(ColdError::WorkerStart { worker: i, source: "not running".into() }) };
        let sent = live.conn.write_inputs(&self.x).and_then(|()| live.conn.eval_begin(layer, &w.share));
        match sent {
            Ok(id) => Ok(Sent { id, deadline }),
            Err(e) => {
                // A closed connection means the worker must go; a check of ours that refused
                // the request before sending leaves it as it was.
                if live.conn.is_closed() {
                    w.kill();
                }
                Err(wire_error(i, e))
            }
        }
    }

    /// Waits for worker `i`'s pending eval and, when `keep`, copies its output rows (one per
    /// pair of its share) into the worker's `rows`.
    fn collect(&mut self, i: usize, keep: bool) -> Result<(), ColdError> {
        let n_embd = self.launch.limits.n_embd as usize;
        let w = &mut self.workers[i];
        let sent = match w.pending.take() {
            None => return Ok(()),
            Some(Err(e)) => return Err(e),
            Some(Ok(sent)) => sent,
        };
        let Some(live) = w.live.as_mut() else { return Err(ColdError::Protocol { worker: i, source: "the worker is not running".into() }) };
        let reply = live.conn.eval_end(sent.id, sent.deadline);
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                w.kill();
                return Err(wire_error(i, e));
            }
        };
        self.reported_us += reply.compute_us;
        if keep {
            w.rows.resize(w.share.n_pairs() * n_embd, 0.0);
            live.conn.read_outputs(&mut w.rows).map_err(|e| wire_error(i, e))?;
        }
        Ok(())
    }

    /// Kills worker `i` (whatever state it is in) and starts a new one.
    fn restart(&mut self, i: usize) -> Result<()> {
        self.workers[i].kill();
        let w = &self.workers[i];
        std::fs::remove_file(&w.socket).ok();
        let live = self.start(w.index, &w.socket, &w.spec)?;
        self.workers[i].live = Some(live);
        self.respawns += 1;
        Ok(())
    }

    /// After worker `i` failed with `cause` on `layer`: a new worker, the request replayed
    /// and its answer kept in the worker's `rows`.
    fn replay(&mut self, i: usize, layer: u32, cause: &ColdError) -> Result<(), ColdError> {
        tracing::warn!(worker = i, layer, error = %cause, "expert worker failed; respawning it and replaying the layer");
        self.restart(i).map_err(|e| ColdError::WorkerStart { worker: i, source: format!("{e:#} (after: {cause})").into() })?;
        self.send(i, layer);
        let replayed = self.collect(i, true);
        replayed.map_err(|e| ColdError::Replay { worker: i, source: format!("{e} (after: {cause})").into() })
    }

    /// Waits out evals left in flight by a step that failed before its `end` (their results
    /// are not wanted); a worker that does not answer in time is killed, to be restarted
    /// when needed.
    fn settle(&mut self) {
        for i in 0..self.workers.len() {
            if self.workers[i].pending.is_some() {
                if let Err(e) = self.collect(i, false) {
                    tracing::warn!(worker = i, error = %e, "expert worker failed on an abandoned request");
                }
            }
        }
    }
}

impl ColdExperts for WorkerPool {
    fn begin(&mut self, layer: usize, _n_embd: usize, x: &[f32], pairs: &ExpertPairs) -> Result<(), ColdError> {
        self.settle();
        self.x.clear();
        self.x.extend_from_slice(x);
        self.pairs.clone_from(pairs);
        for i in 0..self.workers.len() {
            let w = &mut self.workers[i];
            let owns = &w.experts;
            pairs.select(|e| owns.contains(layer as u32, e), &mut w.share);
            w.rows.clear();
            if w.share.n_pairs() == 0 {
                continue;
            }
            // A failure here is handled in `end` with the others.
            self.send(i, layer as u32);
        }
        Ok(())
    }

    fn reported_compute_s(&self) -> f64 {
        self.reported_us as f64 * 1e-6
    }

    fn end(&mut self, layer: usize, out: &mut [f32]) -> Result<(), ColdError> {
        self.reported_us = 0;
        let mut first_error = None;
        for i in 0..self.workers.len() {
            if self.workers[i].share.n_pairs() == 0 {
                continue;
            }
            let Err(cause) = self.collect(i, true) else { continue };
            if let Err(e) = self.replay(i, layer as u32, &cause) {
                tracing::error!(worker = i, layer, error = %e, "expert worker failed again");
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        // Each worker answered its share's pairs in order: pair p of the layer is the next
        // row of its owner's output.
        let n_embd = self.launch.limits.n_embd as usize;
        let mut outputs: Vec<_> = self.workers.iter().map(|w| w.rows.chunks_exact(n_embd)).collect();
        let owner = &self.owner[layer];
        for (&e, row) in self.pairs.ids().iter().zip(out.chunks_exact_mut(n_embd)) {
            let w = owner.get(e as usize).copied().unwrap_or(usize::MAX);
            let from = outputs.get_mut(w).and_then(|rows| rows.next()).ok_or_else(|| ColdError::Compute {
                source: format!("no expert worker answered expert {e} of layer {layer}").into(),
            })?;
            row.copy_from_slice(from);
        }
        Ok(())
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InProcess;
    use experts::{ExpertPairs, ExpertSet};
    use graph::{ColdError, ColdExperts};
    use loader::ModelFile;
    use rand::{Rng as _, SeedableRng as _};

    fn fixture() -> ModelFile {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/ds4-tiny-a.mxfp4.gguf");
        ModelFile::open(&path).expect("fixture A (scripts/setup.sh unpacks it)")
    }

    /// The executor beside the graph (its own thread, started at `begin`) answers with the
    /// bits of the one the graph's threads share, layer after layer, and keeps its order.
    #[test]
    fn beside_the_graph_gives_the_split_executors_bits_and_checks_the_order() {
        let mf = fixture();
        let (n_layer, n_expert, n_embd) = (mf.config.n_layer, mf.config.n_expert as u32, mf.config.n_embd);
        let cold = ExpertSet::from_fn(n_layer as u32, n_expert, |_, e| e % 2 == 1);
        let mut split = InProcess::new(&mf, &cold, 2).unwrap();
        let mut beside = InProcess::beside(&mf, &cold, 2).unwrap();
        let mut rng = rand_xoshiro::SplitMix64::seed_from_u64(7);
        for layer in 0..n_layer {
            let n = 5;
            let x: Vec<f32> = (0..n * n_embd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut pairs = ExpertPairs::new();
            for t in 0..n {
                for e in (0..n_expert).filter(|e| e % 2 == 1).skip(t).take(t % 3) {
                    pairs.push(e);
                }
                pairs.end_token();
            }
            let rows = pairs.n_pairs() * n_embd;
            let (mut a, mut b) = (vec![0f32; rows], vec![1f32; rows]);
            split.begin(layer, n_embd, &x, &pairs).unwrap();
            split.end(layer, &mut a).unwrap();
            beside.begin(layer, n_embd, &x, &pairs).unwrap();
            assert!(beside.split().is_none(), "beside the graph nothing is left to split");
            beside.end(layer, &mut b).unwrap();
            assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "layer {layer}");
        }
        // Out of order: an end with nothing begun, a second begin, an end of another layer;
        // after each the executor still answers the next layer.
        let mut pairs = ExpertPairs::new();
        pairs.push(1);
        pairs.end_token();
        let x = vec![0.5f32; n_embd];
        let mut out = vec![0f32; n_embd];
        assert!(matches!(beside.end(0, &mut out), Err(ColdError::OutOfOrder { layer: 0, begun: None })));
        beside.begin(0, n_embd, &x, &pairs).unwrap();
        assert!(matches!(beside.begin(1, n_embd, &x, &pairs), Err(ColdError::OutOfOrder { layer: 1, begun: Some(0) })));
        assert!(matches!(beside.end(1, &mut out), Err(ColdError::OutOfOrder { layer: 1, begun: Some(0) })));
        beside.begin(1, n_embd, &x, &pairs).unwrap();
        beside.end(1, &mut out).unwrap();
        assert!(out.iter().any(|&v| v != 0.0));
    }
}
