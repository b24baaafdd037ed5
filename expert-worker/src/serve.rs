//! The worker process: model identity, the request loop over ipc-proto, `run_worker`.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;
use std::time::Instant;

use ipc_proto::{ConnectOptions, ErrorCode, Listener, ModelIdentity, Request, WorkerServer};
use loader::ModelFile;
use sha2::{Digest, Sha256};

use crate::compute::ExpertWorker;
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
    let n_embd = worker.n_embd();
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
                let t0 = Instant::now();
                let (input, output) = server.eval_io()?;
                debug_assert_eq!(input.len(), req.pairs.n_tokens() * n_embd);
                if let Err(e) = worker.eval(req.layer, input, &req.pairs, output) {
                    tracing::error!(error = %e, layer = req.layer, "eval failed");
                    server.reply_error(req.id, ErrorCode::INTERNAL, &e.to_string())?;
                    return Err(e);
                }
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

/// The whole `moe-expert` worker: opens `model`, loads the experts of `experts`, binds
/// `socket` (see [`Listener::bind`]: a live socket there is refused, a stale one replaced),
/// accepts one daemon connection, handshakes with the model identity and the expert set,
/// then serves it until Shutdown or EOF. A daemon that refuses the handshake (another
/// model) makes this return its error.
pub fn run_worker(socket: &Path, model: &Path, experts: &ExpertSet, threads: usize) -> Result<()> {
    run_worker_on(socket, &ModelFile::open(model)?, experts, threads, std::time::Duration::ZERO)
}

/// [`run_worker`] with the model already opened, waiting for requests by spinning `spin`
/// before blocking (see `ipc_proto::ConnectOptions::spin`).
pub fn run_worker_on(socket: &Path, mf: &ModelFile, experts: &ExpertSet, threads: usize, spin: std::time::Duration) -> Result<()> {
    let identity = model_identity(mf)?;
    let mut worker = ExpertWorker::load(mf, experts, threads)?;
    let listener = Listener::bind(socket)?;
    tracing::info!(socket = %socket.display(), %identity, experts = experts.len(), "worker listening");
    let mut server = listener.accept(&identity, experts.clone(), &ConnectOptions { spin, ..ConnectOptions::default() })?;
    serve(&mut server, &mut worker)
}
