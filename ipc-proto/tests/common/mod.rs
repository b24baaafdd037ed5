//! Shared fixtures: a small model, a worker whose experts are simple known functions, raw
//! frame helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use experts::{ExpertPairs, ExpertSet};
use ipc_proto::frame::{encode_raw_header, Header};
use ipc_proto::{
    ConnectOptions, FrameType, Limits, ModelIdentity, Request, Result, WorkerConnection, WorkerServer,
    HEADER_LEN, MAGIC, PROTOCOL_VERSION,
};

pub const N_LAYER: u32 = 4;
pub const N_EXPERT: u32 = 70; // not a multiple of 64: exercises the bitset tail
pub const N_EMBD: u32 = 8;

pub fn identity() -> ModelIdentity {
    ModelIdentity { file_size: 123_456_789, header_hash: [0xab; 32], n_layer: N_LAYER, n_expert: N_EXPERT, n_embd: N_EMBD }
}

/// Per-token expert lists as the pairs of an eval.
pub fn expert_pairs(tokens: &[&[u32]]) -> ExpertPairs {
    ExpertPairs::from_tokens(tokens)
}

pub fn limits() -> Limits {
    Limits { max_tokens: 4, n_embd: N_EMBD, max_experts_per_token: 6 }
}

/// The worker owns the even experts of every layer.
pub fn even_experts() -> ExpertSet {
    let mut s = ExpertSet::empty(N_LAYER, N_EXPERT);
    for l in 0..N_LAYER {
        for e in (0..N_EXPERT).step_by(2) {
            s.insert(l, e).expect("in range");
        }
    }
    s
}

/// Expert `e` of layer `l` maps x to x * (e + 1) + l.
pub fn expert_fn(layer: u32, expert: u32, x: f32) -> f32 {
    x * (expert as f32 + 1.0) + layer as f32
}

pub fn opts() -> ConnectOptions {
    ConnectOptions { handshake_timeout: Duration::from_secs(5), ..ConnectOptions::default() }
}

/// Serves requests until Shutdown or an error; returns the number of evals served.
pub fn serve(mut server: WorkerServer) -> Result<u64> {
    loop {
        match server.next_request()? {
            Request::Eval(req) => {
                let n_embd = server.limits().n_embd as usize;
                let t0 = Instant::now();
                let mut input = vec![0f32; req.n_tokens() * n_embd];
                server.read_inputs(&mut input)?;
                let mut output = vec![0f32; req.pairs.n_pairs() * n_embd];
                let mut rows_out = output.chunks_exact_mut(n_embd);
                for (t, ids) in req.pairs.tokens().enumerate() {
                    let row_in = &input[t * n_embd..(t + 1) * n_embd];
                    for (&e, row_out) in ids.iter().zip(rows_out.by_ref()) {
                        for (o, &x) in row_out.iter_mut().zip(row_in) {
                            *o = expert_fn(req.layer, e, x);
                        }
                    }
                }
                server.write_outputs(&output)?;
                let us = t0.elapsed().as_micros() as u64 + 1;
                server.reply_eval(req.id, us)?;
            }
            Request::Ping { id, payload } => server.reply_pong(id, &payload)?,
            Request::Stats { id } => {
                let c = server.counters();
                server.reply_stats(id, &c)?
            }
            Request::Shutdown { .. } => return Ok(server.counters().evals),
        }
    }
}

/// A connected daemon/worker pair over a socketpair, the worker serving in a thread.
pub fn pair() -> (WorkerConnection, JoinHandle<Result<u64>>) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let worker = std::thread::spawn(move || {
        let server = WorkerServer::handshake(b, &identity(), even_experts(), &opts())?;
        serve(server)
    });
    let conn = WorkerConnection::handshake(a, limits(), &identity(), &opts()).expect("handshake");
    (conn, worker)
}

pub fn frame(ty: u16, id: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = encode_raw_header(MAGIC, PROTOCOL_VERSION, ty, id, payload.len() as u32, 0).to_vec();
    v.extend_from_slice(payload);
    v
}

/// Reads one frame with plain reads (any passed descriptor is discarded by the kernel).
pub fn read_raw_frame(s: &mut UnixStream) -> (Header, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).expect("read header");
    let h = Header::decode(&h).expect("valid header");
    let mut p = vec![0u8; h.payload_len as usize];
    s.read_exact(&mut p).expect("read payload");
    (h, p)
}

pub fn write_raw(s: &mut UnixStream, bytes: &[u8]) {
    // The peer may already have closed after an earlier bad frame: ignore EPIPE.
    let _ = s.write_all(bytes);
}

pub fn error_frame_message(h: &Header, p: &[u8]) -> (u32, String) {
    assert_eq!(h.frame_type, FrameType::Error, "expected an Error frame");
    let code = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    (code, String::from_utf8_lossy(&p[8..]).into_owned())
}

pub fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}
