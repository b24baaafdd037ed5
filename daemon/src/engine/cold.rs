//! Cold experts for the graph's `ColdExperts` seam: either computed in-process by an
//! `ExpertWorker` (`--expert-workers 0`), or by `moe-expert` worker processes this daemon
//! spawns and supervises, each owning a byte-balanced share of the cold experts. Activations
//! go through each worker's shared memory; `begin` sends to every worker owning a pair and
//! returns, `end` waits and adds. A worker that dies (EOF) or stops answering (deadline) is
//! respawned and the layer's request replayed, so the step completes with the same result.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use expert_worker::pinning::Pin;
use expert_worker::{ExpertMap, ExpertWorker};
use graph::ColdExperts;
use ipc_proto::{ExpertSlots, Limits, ModelIdentity, RequestId, WorkerConnection};
use loader::ModelFile;

/// How long one layer may take in a worker before it counts as hung.
const EVAL_DEADLINE: Duration = Duration::from_secs(60);
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Per token, the (expert, weight) pairs of one layer's cold slots.
type Pairs = Vec<Vec<(u32, f32)>>;

/// A request in flight: its id, its token count, and the slots sent (kept for a replay).
struct InFlight {
    id: RequestId,
    n: usize,
    ids: Vec<Vec<u32>>,
    ws: Vec<Vec<f32>>,
}

fn slots(pairs: &[Vec<(u32, f32)>], owns: &ExpertMap, layer: u32) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    pairs
        .iter()
        .map(|p| p.iter().filter(|(e, _)| owns.contains(layer, *e)).map(|&(e, w)| (e, w)).unzip::<u32, f32, Vec<u32>, Vec<f32>>())
        .unzip()
}

/// `--expert-workers 0`: the cold experts computed in this process, on the CPU.
pub struct InProcess {
    worker: ExpertWorker,
    pending: Option<(u32, Vec<f32>, Pairs)>,
}

impl InProcess {
    pub fn new(model: &ModelFile, cold: &ExpertMap, threads: usize) -> Result<InProcess> {
        Ok(InProcess { worker: ExpertWorker::load(model, cold, threads)?, pending: None })
    }
}

impl ColdExperts for InProcess {
    fn begin(&mut self, layer: usize, _n_embd: usize, x: &[f32], pairs: &[Vec<(u32, f32)>]) -> Result<(), String> {
        self.pending = Some((layer as u32, x.to_vec(), pairs.to_vec()));
        Ok(())
    }

    fn end(&mut self, layer: usize, out: &mut [f32]) -> Result<(), String> {
        let Some((l, x, pairs)) = self.pending.take() else { return Err("end without begin".into()) };
        if l as usize != layer {
            return Err(format!("end of layer {layer} after begin of layer {l}"));
        }
        let (ids, ws) = slots(&pairs, self.worker.experts(), l);
        let tokens: Vec<ExpertSlots> = ids.iter().zip(&ws).map(|(i, w)| ExpertSlots { ids: i, weights: w }).collect();
        let mut buf = vec![0f32; out.len()];
        self.worker.eval(l, &x, &tokens, &mut buf).map_err(|e| e.to_string())?;
        for (o, b) in out.iter_mut().zip(&buf) {
            *o += b;
        }
        Ok(())
    }
}

struct Worker {
    index: usize,
    experts: ExpertMap,
    socket: PathBuf,
    spec: PathBuf,
    child: Child,
    conn: WorkerConnection,
    pending: Option<InFlight>,
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
    /// The current layer's activations (kept for a replay).
    x: Vec<f32>,
    /// Worker-reported compute of the last `end`, summed over workers (µs).
    reported_us: u64,
    pub respawns: usize,
}

impl WorkerPool {
    /// Spawn one worker per share and connect to each (handshake checks the model).
    /// `spin`: how long both sides of each connection spin before blocking on the socket.
    /// `pins`: where each worker runs (empty: anywhere).
    pub fn spawn(model: &ModelFile, shares: Vec<ExpertMap>, threads: usize, max_tokens: usize, spin: Duration, pins: Vec<Pin>) -> Result<WorkerPool> {
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
        let mut pool =
            WorkerPool { exe, model: model.path.clone(), threads, spin, pins, limits, identity, dir, workers: Vec::new(), x: Vec::new(), reported_us: 0, respawns: 0 };
        for (index, experts) in shares.into_iter().enumerate() {
            let socket = pool.dir.path().join(format!("worker-{index}.sock"));
            let spec = pool.dir.path().join(format!("worker-{index}.json"));
            experts.write_json(&spec)?;
            let (child, conn) = pool.start(index, &socket, &spec)?;
            pool.workers.push(Worker { index, experts, socket, spec, child, conn, pending: None });
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

    fn send(w: &mut Worker, layer: u32, x: &[f32], n: usize, ids: &[Vec<u32>], ws: &[Vec<f32>]) -> Result<RequestId, ipc_proto::ProtoError> {
        w.conn.input_mut(n)?.copy_from_slice(x);
        let tokens: Vec<ExpertSlots> = ids.iter().zip(ws).map(|(i, w)| ExpertSlots { ids: i, weights: w }).collect();
        w.conn.eval_begin(layer, &tokens)
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
    fn begin(&mut self, layer: usize, _n_embd: usize, x: &[f32], pairs: &[Vec<(u32, f32)>]) -> Result<(), String> {
        let n = pairs.len();
        self.x.clear();
        self.x.extend_from_slice(x);
        for i in 0..self.workers.len() {
            let (ids, ws) = slots(pairs, &self.workers[i].experts, layer as u32);
            if ids.iter().all(|s| s.is_empty()) {
                self.workers[i].pending = None;
                continue;
            }
            let sent = Self::send(&mut self.workers[i], layer as u32, x, n, &ids, &ws);
            let id = match sent {
                Ok(id) => id,
                Err(e) if e.is_peer_lost() => {
                    self.respawn(i).map_err(|e| e.to_string())?;
                    Self::send(&mut self.workers[i], layer as u32, x, n, &ids, &ws).map_err(|e| e.to_string())?
                }
                Err(e) => return Err(format!("expert worker {i}: {e}")),
            };
            self.workers[i].pending = Some(InFlight { id, n, ids, ws });
        }
        Ok(())
    }

    fn reported_compute_s(&self) -> f64 {
        self.reported_us as f64 * 1e-6
    }

    fn end(&mut self, layer: usize, out: &mut [f32]) -> Result<(), String> {
        self.reported_us = 0;
        for i in 0..self.workers.len() {
            let Some(InFlight { id, n, ids, ws }) = self.workers[i].pending.take() else { continue };
            let mut result = self.workers[i].conn.eval_end(id, Instant::now() + EVAL_DEADLINE);
            if matches!(&result, Err(e) if e.is_peer_lost()) {
                self.respawn(i).map_err(|e| e.to_string())?;
                let x = std::mem::take(&mut self.x);
                let id = Self::send(&mut self.workers[i], layer as u32, &x, n, &ids, &ws).map_err(|e| format!("expert worker {i} (replay): {e}"));
                self.x = x;
                result = self.workers[i].conn.eval_end(id?, Instant::now() + EVAL_DEADLINE);
            }
            let reply = result.map_err(|e| format!("expert worker {i}: {e}"))?;
            self.reported_us += reply.compute_us;
            let o = self.workers[i].conn.output(n).map_err(|e| format!("expert worker {i}: {e}"))?;
            for (a, b) in out.iter_mut().zip(o) {
                *a += b;
            }
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
