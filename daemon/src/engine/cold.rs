//! Cold experts for the graph's `ColdExperts` seam: either computed in-process by an
//! `ExpertWorker` (`--expert-workers 0`), or by `moe-expert` worker processes this daemon
//! spawns and supervises, each owning a byte-balanced share of the cold experts. Activations
//! go through each worker's shared memory; `begin` sends to every worker owning a pair and
//! returns, `end` waits and puts each worker's output rows back in the order of all the
//! pairs (each row is one expert on one token, whoever computed it: no sums here, so the
//! split over workers changes no bit). A worker that dies (EOF) or stops answering
//! (deadline) is respawned and the layer's request replayed, so the step completes with the
//! same result.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use expert_worker::pinning::Pin;
use expert_worker::ExpertWorker;
use experts::{ExpertPairs, ExpertSet};
use graph::{ColdError, ColdExperts};
use ipc_proto::{Limits, ModelIdentity, ProtoError, RequestId, WorkerConnection};
use loader::ModelFile;

/// How long one layer may take in a worker before it counts as hung.
const EVAL_DEADLINE: Duration = Duration::from_secs(60);
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A wire error of worker `worker` across the `ColdExperts` seam: what the worker reported
/// (an `Error` frame), or a protocol failure on our side of the connection.
fn wire_error(worker: usize, e: ProtoError) -> ColdError {
    match e {
        ProtoError::Remote { .. } => ColdError::Remote { worker, source: e.into() },
        e => ColdError::Protocol { worker, source: e.into() },
    }
}

/// `--expert-workers 0`: the cold experts computed in this process, on the CPU.
pub struct InProcess {
    /// Holds every cold expert.
    worker: ExpertWorker,
    /// The layer begun, its activations and cold pairs.
    pending: Option<(u32, Vec<f32>, ExpertPairs)>,
}

impl InProcess {
    pub fn new(model: &ModelFile, cold: &ExpertSet, threads: usize) -> Result<InProcess> {
        Ok(InProcess { worker: ExpertWorker::load(model, cold, threads)?, pending: None })
    }
}

impl ColdExperts for InProcess {
    fn begin(&mut self, layer: usize, _n_embd: usize, x: &[f32], pairs: &ExpertPairs) -> Result<(), ColdError> {
        self.pending = Some((layer as u32, x.to_vec(), pairs.clone()));
        Ok(())
    }

    fn end(&mut self, layer: usize, out: &mut [f32]) -> Result<(), ColdError> {
        let Some((l, x, pairs)) = self.pending.take() else { return Err(ColdError::OutOfOrder { layer, begun: None }) };
        if l as usize != layer {
            return Err(ColdError::OutOfOrder { layer, begun: Some(l as usize) });
        }
        self.worker.eval(l, &x, &pairs, out).map_err(|e| ColdError::Compute { source: e.into() })?;
        Ok(())
    }
}

struct Worker {
    index: usize,
    experts: ExpertSet,
    socket: PathBuf,
    spec: PathBuf,
    child: Child,
    conn: WorkerConnection,
    /// The pairs of the current layer this worker owns (kept for a replay).
    share: ExpertPairs,
    /// The request in flight.
    pending: Option<RequestId>,
}

/// Spawned `moe-expert` workers.
pub struct WorkerPool {
    exe: PathBuf,
    model: PathBuf,
    threads: usize,
    spin: Duration,
    pins: Vec<Pin>,
    limits: Limits,
    identity: ModelIdentity,
    /// Private (0700) directory for the sockets and placement files, removed on drop.
    dir: tempfile::TempDir,
    workers: Vec<Worker>,
    /// Per layer, per expert: the index of the worker that owns it (`usize::MAX`: none).
    owner: Vec<Vec<usize>>,
    /// The current layer's activations (kept for a replay) and cold pairs.
    x: Vec<f32>,
    pairs: ExpertPairs,
    /// Worker-reported compute of the last `end`, summed over workers (µs).
    reported_us: u64,
    pub respawns: usize,
}

impl WorkerPool {
    /// Spawn one worker per share and connect to each (handshake checks the model).
    /// `spin`: how long both sides of each connection spin before blocking on the socket.
    /// `pins`: where each worker runs (empty: anywhere).
    pub fn spawn(model: &ModelFile, shares: Vec<ExpertSet>, threads: usize, max_tokens: usize, spin: Duration, pins: Vec<Pin>) -> Result<WorkerPool> {
        let exe = std::env::current_exe().context("locating the dflash executable")?;
        let identity = expert_worker::model_identity(model)?;
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
        let mut pool = WorkerPool {
            exe,
            model: model.path.clone(),
            threads,
            spin,
            pins,
            limits,
            identity,
            dir,
            workers: Vec::new(),
            owner,
            x: Vec::new(),
            pairs: ExpertPairs::new(),
            reported_us: 0,
            respawns: 0,
        };
        for (index, experts) in shares.into_iter().enumerate() {
            let socket = pool.dir.path().join(format!("worker-{index}.sock"));
            let spec = pool.dir.path().join(format!("worker-{index}.json"));
            experts.write_json(&spec)?;
            let (child, conn) = pool.start(index, &socket, &spec)?;
            pool.workers.push(Worker { index, experts, socket, spec, child, conn, share: ExpertPairs::new(), pending: None });
        }
        Ok(pool)
    }

    fn start(&self, index: usize, socket: &Path, spec: &Path) -> Result<(Child, WorkerConnection)> {
        let mut child = Command::new(&self.exe)
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
            .with_context(|| format!("starting expert worker {index} ({})", self.exe.display()))?;
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("expert worker {index} exited during start-up ({status})");
            }
            if socket.exists() {
                let opts = ipc_proto::ConnectOptions { spin: self.spin, ..ipc_proto::ConnectOptions::default() };
                match WorkerConnection::connect_with(socket, self.limits, &self.identity, &opts) {
                    Ok(conn) => return Ok((child, conn)),
                    Err(e) if t0.elapsed() > START_DEADLINE => {
                        child.kill().ok();
                        bail!("expert worker {index}: handshake failed: {e}");
                    }
                    Err(e) if !e.is_peer_lost() && !matches!(e, ipc_proto::ProtoError::Connect { .. } | ipc_proto::ProtoError::Io { .. }) => {
                        child.kill().ok();
                        bail!("expert worker {index}: handshake refused: {e}");
                    }
                    Err(_) => {}
                }
            }
            if t0.elapsed() > START_DEADLINE {
                child.kill().ok();
                bail!("expert worker {index} did not open {} within {START_DEADLINE:?}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn n_workers(&self) -> usize {
        self.workers.len()
    }

    /// Pids of the worker processes (tests and diagnostics).
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    /// Sends `w`'s share of the layer: the activations `x` of all its tokens, its pairs.
    fn send(w: &mut Worker, layer: u32, x: &[f32]) -> Result<RequestId, ProtoError> {
        w.conn.input_mut(w.share.n_tokens())?.copy_from_slice(x);
        w.conn.eval_begin(layer, &w.share)
    }

    fn respawn(&mut self, i: usize) -> Result<()> {
        let (index, socket, spec) = {
            let w = &mut self.workers[i];
            w.child.kill().ok();
            w.child.wait().ok();
            std::fs::remove_file(&w.socket).ok();
            (w.index, w.socket.clone(), w.spec.clone())
        };
        tracing::warn!(worker = index, "expert worker lost; respawning and replaying the layer");
        let (child, conn) = self.start(index, &socket, &spec)?;
        let w = &mut self.workers[i];
        w.child = child;
        w.conn = conn;
        self.respawns += 1;
        Ok(())
    }
}

impl ColdExperts for WorkerPool {
    fn begin(&mut self, layer: usize, _n_embd: usize, x: &[f32], pairs: &ExpertPairs) -> Result<(), ColdError> {
        self.x.clear();
        self.x.extend_from_slice(x);
        self.pairs.clone_from(pairs);
        for i in 0..self.workers.len() {
            let w = &mut self.workers[i];
            let owns = &w.experts;
            pairs.select(|e| owns.contains(layer as u32, e), &mut w.share);
            if w.share.n_pairs() == 0 {
                w.pending = None;
                continue;
            }
            let id = match Self::send(w, layer as u32, &self.x) {
                Ok(id) => id,
                Err(e) if e.is_peer_lost() => {
                    self.respawn(i).map_err(|e| ColdError::WorkerStart { worker: i, source: e.into() })?;
                    Self::send(&mut self.workers[i], layer as u32, &self.x).map_err(|e| ColdError::Replay { worker: i, source: e.into() })?
                }
                Err(e) => return Err(wire_error(i, e)),
            };
            self.workers[i].pending = Some(id);
        }
        Ok(())
    }

    fn reported_compute_s(&self) -> f64 {
        self.reported_us as f64 * 1e-6
    }

    fn end(&mut self, layer: usize, out: &mut [f32]) -> Result<(), ColdError> {
        self.reported_us = 0;
        for i in 0..self.workers.len() {
            let Some(id) = self.workers[i].pending.take() else { continue };
            let mut result = self.workers[i].conn.eval_end(id, Instant::now() + EVAL_DEADLINE);
            if matches!(&result, Err(e) if e.is_peer_lost()) {
                self.respawn(i).map_err(|e| ColdError::WorkerStart { worker: i, source: e.into() })?;
                let id = Self::send(&mut self.workers[i], layer as u32, &self.x).map_err(|e| ColdError::Replay { worker: i, source: e.into() })?;
                result = self.workers[i].conn.eval_end(id, Instant::now() + EVAL_DEADLINE);
            }
            let reply = result.map_err(|e| wire_error(i, e))?;
            self.reported_us += reply.compute_us;
        }
        // Each worker answered its share's pairs in order: pair p of the layer is the next
        // row of its owner's output.
        let mut outputs = Vec::with_capacity(self.workers.len());
        for (i, w) in self.workers.iter().enumerate() {
            let rows = match w.share.n_pairs() {
                0 => &[][..],
                n => w.conn.output(n).map_err(|e| wire_error(i, e))?,
            };
            outputs.push(rows.chunks_exact(self.limits.n_embd as usize));
        }
        let owner = &self.owner[layer];
        for (&e, row) in self.pairs.ids().iter().zip(out.chunks_exact_mut(self.limits.n_embd as usize)) {
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
            w.child.kill().ok();
            w.child.wait().ok();
        }
    }
}
