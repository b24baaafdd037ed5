//! The worker process: model identity, the request loop over ipc-proto, `run_worker`.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;
use std::time::Instant;

use std::os::unix::net::UnixStream;

use ipc_proto::{ConnectOptions, ErrorCode, Listener, LoadProgress, ModelIdentity, ProtoError, Request, WorkerServer};
use loader::ModelFile;
use sha2::{Digest, Sha256};

use crate::compute::{ExpertWorker, LoadStep};
use crate::faults::TestFaults;
use crate::error::{Result, WorkerError};
use experts::ExpertSet;

/// The identity both sides compare at the handshake: the file size, SHA-256 of the file's
/// bytes before the tensor data (GGUF header, metadata and tensor table), and the layer,
/// expert and hidden sizes of the config.
pub fn model_identity(model: &ModelFile) -> Result<ModelIdentity> {
    let gguf = loader::Gguf::open(&model.path)?;
    let header_len = gguf.data_offset();
    if header_len > model.file_len {
        return Err(WorkerError::Mismatch { what: "GGUF data offset (at most the file size)", expected: model.file_len, found: header_len });
    }
    let io = |source| WorkerError::Io { what: "read the GGUF header of", path: model.path.clone(), source };
    let file = File::open(&model.path).map_err(io)?;
    let mut hasher = Sha256::new();
    let hashed = std::io::copy(&mut file.take(header_len), &mut hasher).map_err(io)?;
    if hashed != header_len {
        return Err(WorkerError::Mismatch { what: "GGUF header bytes read (the data offset)", expected: header_len, found: hashed });
    }
    let c = &model.config;
    Ok(ModelIdentity {
        file_size: model.file_len,
        header_hash: hasher.finalize().into(),
        n_layer: c.n_layer as u32,
        n_expert: c.n_expert as u32,
        n_embd: c.n_embd as u32,
    })
}

/// Answers requests on a handshaken connection until the daemon sends Shutdown or goes away
/// (EOF, reset): both end the loop with `Ok`. A bad request (already answered with an
/// `Error` frame by ipc-proto) or a compute failure (answered here) is returned as the error.
pub fn serve(server: &mut WorkerServer, worker: &mut ExpertWorker) -> Result<()> {
    serve_with_faults(server, worker, None)
}

/// [`serve`], taking the armed eval faults (tests) with a second handle of the socket.
fn serve_with_faults(server: &mut WorkerServer, worker: &mut ExpertWorker, mut faults: Option<(&TestFaults, UnixStream)>) -> Result<()> {
    let n_embd = worker.n_embd();
    let (mut input, mut output) = (Vec::new(), Vec::new());
    loop {
        let req = match server.next_request() {
            Ok(r) => r,
            Err(e) if e.is_peer_lost() => {
                tracing::info!(error = %e, "daemon gone; worker exits");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match req {
            Request::Eval(req) => {
                if let Some((f, sock)) = faults.as_mut() {
                    f.at_eval(server, sock, req.id)?;
                }
                let t0 = Instant::now();
                input.resize(req.pairs.n_tokens() * n_embd, 0.0);
                output.resize(req.pairs.n_pairs() * n_embd, 0.0);
                server.read_inputs(&mut input)?;
                if let Err(e) = worker.eval(req.layer, &input, &req.pairs, &mut output) {
                    tracing::error!(error = %e, layer = req.layer, "eval failed");
                    server.reply_error(req.id, ErrorCode::INTERNAL, &e.to_string())?;
                    return Err(e);
                }
                server.write_outputs(&output)?;
                let us = t0.elapsed().as_micros() as u64;
                server.reply_eval(req.id, us)?;
            }
            Request::Ping { id, payload } => server.reply_pong(id, &payload)?,
            Request::Stats { id } => {
                let c = server.counters();
                server.reply_stats(id, &c)?;
            }
            Request::Shutdown { .. } => {
                tracing::info!("shutdown requested");
                return Ok(());
            }
        }
    }
}

/// The whole `moe-expert` worker: opens `model`, binds `socket` (see [`Listener::bind`]: a
/// live socket there is refused, a stale one replaced), accepts one daemon connection,
/// handshakes with the model identity and the expert set, loads the experts of `experts`
/// while reporting its progress to the daemon, then serves it until Shutdown or EOF. A daemon
/// that refuses the handshake (another model) makes this return its error.
pub fn run_worker(socket: &Path, model: &Path, experts: &ExpertSet, threads: usize) -> Result<()> {
    run_worker_on(socket, &ModelFile::open(model)?, experts, threads, std::time::Duration::ZERO, &TestFaults::none())
}

/// [`run_worker`] with the model already opened, waiting for requests by spinning `spin`
/// before blocking (see `ipc_proto::ConnectOptions::spin`), with `faults` armed (tests; see
/// [`crate::faults`]).
pub fn run_worker_on(socket: &Path, mf: &ModelFile, experts: &ExpertSet, threads: usize, spin: std::time::Duration, faults: &TestFaults) -> Result<()> {
    let identity = model_identity(mf)?;
    faults.at_start()?;
    let listener = Listener::bind(socket)?;
    tracing::info!(socket = %socket.display(), %identity, experts = experts.len(), "worker listening");
    let sock = listener.accept_stream()?;
    // The eval faults write raw frames on a second handle of the socket.
    let mut fault_sock =
        if faults.is_active() { Some(sock.try_clone().map_err(|source| ProtoError::Io { op: "clone the daemon socket", source })?) } else { None };
    if let Some(s) = fault_sock.as_mut() {
        faults.at_hello(s, &identity, experts)?;
    }
    let opts = ConnectOptions { spin, ..ConnectOptions::default() };
    let mut loading = WorkerServer::start_handshake(sock, &identity, experts.clone(), &opts)?;
    // The daemon waits as long as these reports show progress; a failed send (the daemon
    // gone) ends the worker once the load returns.
    let mut sent: std::result::Result<(), ProtoError> = Ok(());
    let mut last: Option<u64> = None;
    let delay = faults.load_delay();
    let mut worker = ExpertWorker::load_reporting(mf, experts, threads, &mut |step: LoadStep| {
        if sent.is_ok() && last.is_none_or(|l| step.loaded > l) {
            last = Some(step.loaded);
            sent = loading.report_load(LoadProgress { loaded: step.loaded, total: step.total });
        }
        if step.layer_done.is_some() && !delay.is_zero() {
            std::thread::sleep(delay);
        }
    })?;
    sent?;
    let mut server = loading.ready()?;
    serve_with_faults(&mut server, &mut worker, fault_sock.map(|s| (faults, s)))
}
