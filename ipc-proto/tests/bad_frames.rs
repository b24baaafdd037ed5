//! Every kind of bad frame, written as raw bytes on a real socket, is refused with an error
//! naming the problem; the receiver tells the peer with an Error frame and closes.

mod common;

use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use common::*;
use experts::ExpertSet;
use ipc_proto::frame::{encode_eval_done, encode_hello, encode_raw_header};
use ipc_proto::{
    ErrorCode, FrameType, ModelIdentity, ProtoError, Request, WorkerConnection, WorkerServer, MAGIC,
    PROTOCOL_VERSION,
};

fn hello_payload(id: &ModelIdentity, experts: &ExpertSet) -> Vec<u8> {
    let mut p = Vec::new();
    encode_hello(&mut p, id, experts);
    p
}

/// The daemon handshakes with a fake worker that sends `bytes` first (in place of Hello).
fn daemon_reads(bytes: Vec<u8>) -> (ProtoError, Option<(u32, String)>) {
    let (a, mut b) = UnixStream::pair().expect("socketpair");
    write_raw(&mut b, &bytes);
    let e = WorkerConnection::handshake(a, limits(), &identity(), &opts()).err().expect("handshake must fail");
    // The daemon answers a protocol violation with an Error frame (not a lost peer).
    let reply = if e.is_peer_lost() { None } else { Some(read_raw_frame(&mut b)).map(|(h, p)| error_frame_message(&h, &p)) };
    (e, reply)
}

#[test]
fn bad_magic() {
    let mut f = frame(FrameType::Hello as u16, 0, &hello_payload(&identity(), &even_experts()));
    f[0..4].copy_from_slice(b"XXXX");
    let (e, reply) = daemon_reads(f);
    assert!(matches!(e, ProtoError::BadMagic { expected: MAGIC, found } if found == u32::from_le_bytes(*b"XXXX")), "{e}");
    let (code, msg) = reply.expect("error frame");
    assert_eq!(code, ErrorCode::MALFORMED.0);
    assert!(msg.contains("bad frame magic"), "{msg}");
}

#[test]
fn wrong_version_names_both() {
    let p = hello_payload(&identity(), &even_experts());
    // Version 2 (a worker that answered one summed row per token) is refused by name.
    let mut f = encode_raw_header(MAGIC, 2, FrameType::Hello as u16, 0, p.len() as u32, 0).to_vec();
    f.extend_from_slice(&p);
    let (e, reply) = daemon_reads(f);
    assert!(matches!(e, ProtoError::VersionMismatch { expected: PROTOCOL_VERSION, found: 2 }), "{e}");
    assert_eq!(e.to_string(), "protocol version mismatch: expected 3, found 2");
    assert_eq!(reply.expect("error frame").0, ErrorCode::VERSION_MISMATCH.0);
}

#[test]
fn unknown_type() {
    let (e, _) = daemon_reads(frame(99, 0, &[]));
    assert!(matches!(e, ProtoError::UnknownFrameType { found: 99 }), "{e}");
}

#[test]
fn reserved_field_set() {
    let (e, _) = daemon_reads(encode_raw_header(MAGIC, PROTOCOL_VERSION, 1, 0, 0, 7).to_vec());
    assert!(matches!(e, ProtoError::ReservedNonZero { found: 7 }), "{e}");
}

#[test]
fn oversized_payload_refused_before_reading_it() {
    // Claims 1 GiB; nothing follows. The length is refused from the header alone.
    let (e, _) = daemon_reads(encode_raw_header(MAGIC, PROTOCOL_VERSION, 1, 0, 1 << 30, 0).to_vec());
    assert!(matches!(e, ProtoError::PayloadTooLarge { frame: FrameType::Hello, found, .. } if found == 1 << 30), "{e}");
}

#[test]
fn out_of_order_frame_in_handshake() {
    let (e, reply) = daemon_reads(frame(FrameType::Ready as u16, 0, &[]));
    assert!(matches!(e, ProtoError::UnexpectedFrame { expected: "Hello", found: FrameType::Ready }), "{e}");
    assert_eq!(reply.expect("error frame").0, ErrorCode::OUT_OF_ORDER.0);
}

#[test]
fn truncated_frame() {
    let mut f = frame(FrameType::Hello as u16, 0, &hello_payload(&identity(), &even_experts()));
    f.truncate(40);
    let (a, mut b) = UnixStream::pair().expect("socketpair");
    write_raw(&mut b, &f);
    drop(b); // the worker dies mid-frame
    let e = WorkerConnection::handshake(a, limits(), &identity(), &opts()).err().expect("handshake must fail");
    assert!(matches!(e, ProtoError::Truncated { expected, found: 40 } if expected > 40), "{e}");
    assert!(e.is_peer_lost());
}

#[test]
fn hello_count_mismatch() {
    // n_layer 4 needs 4 * 2 words of expert bitset; send 3 layers' worth.
    let mut p = hello_payload(&identity(), &even_experts());
    p.truncate(p.len() - 16);
    let (e, _) = daemon_reads(frame(FrameType::Hello as u16, 0, &p));
    assert!(matches!(e, ProtoError::PayloadLength { frame: FrameType::Hello, expected: 120, found: 104 }), "{e}");
}

#[test]
fn hello_bits_past_n_expert() {
    let mut p = hello_payload(&identity(), &even_experts());
    // Layer 0's second word covers experts 64..128; expert 70 does not exist.
    let w = 56 + 8;
    p[w..w + 8].copy_from_slice(&(1u64 << 6).to_le_bytes());
    let (e, _) = daemon_reads(frame(FrameType::Hello as u16, 0, &p));
    assert!(matches!(e, ProtoError::ExpertOutOfRange { layer: 0, expert: 70, n_expert: 70 }), "{e}");
}

#[test]
fn identity_mismatch_refused_naming_both() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let other = ModelIdentity { file_size: 999, ..identity() };
    let worker = std::thread::spawn(move || WorkerServer::handshake(b, &other, even_experts(), &opts()).err());
    let e = WorkerConnection::handshake(a, limits(), &identity(), &opts()).err().expect("refused");
    match &e {
        ProtoError::IdentityMismatch { expected, found } => {
            assert_eq!(**expected, identity());
            assert_eq!(found.file_size, 999);
        }
        other => panic!("expected an identity mismatch, got {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("file_size 123456789") && msg.contains("file_size 999"), "{msg}");
    // The worker learns why.
    match worker.join().expect("worker thread") {
        Some(ProtoError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::IDENTITY_MISMATCH);
            assert!(message.contains("file_size 999"), "{message}");
        }
        other => panic!("expected a remote identity error, got {other:?}"),
    }
}

#[test]
fn worker_refuses_limits_of_another_hidden_size() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let worker = std::thread::spawn(move || WorkerServer::handshake(b, &identity(), even_experts(), &opts()).err());
    // The daemon validates its own limits too: pass a matching identity with n_embd 16.
    let id16 = ModelIdentity { n_embd: 16, ..identity() };
    let mut l = limits();
    l.n_embd = 16;
    let e = WorkerConnection::handshake(a, l, &id16, &opts()).err().expect("refused");
    assert!(matches!(e, ProtoError::IdentityMismatch { .. }), "{e}");
    assert!(worker.join().expect("worker").is_some());
}

// ---- after the handshake: the daemon reading replies ----

/// A real handshake; the worker thread then writes `reply(eval_id)` raw on a clone of its
/// socket in answer to the first eval.
fn daemon_reply_case(reply: impl FnOnce(u64) -> Vec<u8> + Send + 'static) -> ProtoError {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let mut raw = b.try_clone().expect("clone");
    let worker: JoinHandle<()> = std::thread::spawn(move || {
        let mut server = WorkerServer::handshake(b, &identity(), even_experts(), &opts()).expect("handshake");
        let id = match server.next_request().expect("request") {
            Request::Eval(r) => r.id,
            other => panic!("expected an eval, got {other:?}"),
        };
        write_raw(&mut raw, &reply(id));
        // Keep the server (and socket) alive until the daemon has given up.
        let _ = server.next_request();
    });
    let mut conn = WorkerConnection::handshake(a, limits(), &identity(), &opts()).expect("handshake");
    let id = conn.eval_begin(1, &expert_pairs(&[&[2]])).expect("eval_begin");
    let e = conn.eval_end(id, soon()).expect_err("bad reply");
    assert!(conn.is_closed(), "a bad reply closes the connection");
    drop(conn);
    worker.join().expect("worker thread");
    e
}

#[test]
fn reply_with_wrong_request_id() {
    let e = daemon_reply_case(|id| {
        let mut p = Vec::new();
        encode_eval_done(&mut p, 1, 5);
        frame(FrameType::EvalDone as u16, id + 1, &p)
    });
    assert!(matches!(e, ProtoError::RequestIdMismatch { expected: 1, found: 2 }), "{e}");
}

#[test]
fn reply_of_the_wrong_type() {
    let e = daemon_reply_case(|id| frame(FrameType::Pong as u16, id, &[]));
    assert!(matches!(e, ProtoError::UnexpectedFrame { expected: "EvalDone", found: FrameType::Pong }), "{e}");
}

#[test]
fn reply_with_wrong_pair_count() {
    let e = daemon_reply_case(|id| {
        let mut p = Vec::new();
        encode_eval_done(&mut p, 3, 5);
        frame(FrameType::EvalDone as u16, id, &p)
    });
    assert!(matches!(e, ProtoError::Mismatch { what: "EvalDone n_pairs", expected: 1, found: 3 }), "{e}");
}

#[test]
fn reply_payload_of_the_wrong_size() {
    let e = daemon_reply_case(|id| frame(FrameType::EvalDone as u16, id, &[0u8; 12]));
    assert!(matches!(e, ProtoError::PayloadLength { frame: FrameType::EvalDone, expected: 16, found: 12 }), "{e}");
    let e = daemon_reply_case(|id| frame(FrameType::EvalDone as u16, id, &[0u8; 17]));
    assert!(matches!(e, ProtoError::PayloadTooLarge { frame: FrameType::EvalDone, limit: 16, found: 17 }), "{e}");
}

// ---- after the handshake: the worker reading requests ----

/// A real handshake; then `bytes` are written raw on a clone of the daemon's socket. Returns
/// the worker's error and the Error frame it sent back.
fn worker_reads(bytes: Vec<u8>) -> (ProtoError, (u32, String)) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let mut raw = a.try_clone().expect("clone");
    let worker = std::thread::spawn(move || {
        let mut server = WorkerServer::handshake(b, &identity(), even_experts(), &opts()).expect("handshake");
        let mut served = 0;
        loop {
            match server.next_request() {
                Ok(Request::Ping { id, payload }) => {
                    server.reply_pong(id, &payload).expect("pong");
                    served += 1;
                }
                Ok(other) => panic!("unexpected success: {other:?}"),
                Err(e) => return (e, served),
            }
        }
    });
    let conn = WorkerConnection::handshake(a, limits(), &identity(), &opts()).expect("handshake");
    write_raw(&mut raw, &bytes);
    let (e, _) = worker.join().expect("worker thread");
    // Skip any Pong of well-formed requests sent before the bad one.
    loop {
        let (h, p) = read_raw_frame(&mut raw);
        if h.frame_type != FrameType::Pong {
            drop(conn);
            return (e, error_frame_message(&h, &p));
        }
    }
}

fn eval_payload(layer: u32, counts: &[u32], n_pairs: u32, ids: &[u32]) -> Vec<u8> {
    let mut p = Vec::new();
    for v in [layer, counts.len() as u32, n_pairs, 0] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    for c in counts {
        p.extend_from_slice(&c.to_le_bytes());
    }
    for i in ids {
        p.extend_from_slice(&i.to_le_bytes());
    }
    p
}

const EVAL: u16 = FrameType::Eval as u16;

#[test]
fn eval_layer_out_of_range() {
    let (e, (code, msg)) = worker_reads(frame(EVAL, 1, &eval_payload(4, &[1], 1, &[2])));
    assert!(matches!(e, ProtoError::LayerOutOfRange { layer: 4, n_layer: 4 }), "{e}");
    assert_eq!(code, ErrorCode::BAD_REQUEST.0);
    assert!(msg.contains("layer 4 out of range"), "{msg}");
}

#[test]
fn eval_expert_not_owned() {
    let (e, (_, msg)) = worker_reads(frame(EVAL, 1, &eval_payload(1, &[2], 2, &[2, 5])));
    assert!(matches!(e, ProtoError::ExpertNotOwned { layer: 1, expert: 5 }), "{e}");
    assert!(msg.contains("expert 5 of layer 1 is not owned"), "{msg}");
}

#[test]
fn eval_expert_out_of_range() {
    let (e, _) = worker_reads(frame(EVAL, 1, &eval_payload(1, &[1], 1, &[70])));
    assert!(matches!(e, ProtoError::ExpertOutOfRange { layer: 1, expert: 70, n_expert: 70 }), "{e}");
}

#[test]
fn eval_duplicate_expert() {
    let (e, _) = worker_reads(frame(EVAL, 1, &eval_payload(1, &[2], 2, &[4, 4])));
    assert!(matches!(e, ProtoError::DuplicateExpert { token: 0, expert: 4 }), "{e}");
}

#[test]
fn eval_count_mismatch() {
    // Header says 3 pairs (and the length fits 3 pairs) but the counts sum to 2.
    let (e, _) = worker_reads(frame(EVAL, 1, &eval_payload(0, &[1, 1], 3, &[2, 4, 6])));
    assert!(matches!(e, ProtoError::CountMismatch { expected: 3, found: 2, .. }), "{e}");
    // Length that does not match the counts.
    let mut p = eval_payload(0, &[1], 1, &[2]);
    p.extend_from_slice(&[0; 4]);
    let (e, _) = worker_reads(frame(EVAL, 1, &p));
    assert!(matches!(e, ProtoError::PayloadLength { frame: FrameType::Eval, expected: 24, found: 28 }), "{e}");
}

#[test]
fn eval_over_the_limits() {
    // 5 tokens > max_tokens 4.
    let (e, _) = worker_reads(frame(EVAL, 1, &eval_payload(0, &[0; 5], 0, &[])));
    assert!(matches!(e, ProtoError::OutOfRange { what: "eval n_tokens", max: 4, found: 5 }), "{e}");
    // 7 pairs for one token > max_experts_per_token 6.
    let ids = [0, 2, 4, 6, 8, 10, 12];
    let (e, _) = worker_reads(frame(EVAL, 1, &eval_payload(0, &[7, 0], 7, &ids)));
    assert!(matches!(e, ProtoError::OutOfRange { what: "experts per token", max: 6, found: 7 }), "{e}");
    // A length over the bound of the limits, refused from the header.
    let limit = limits().max_eval_payload();
    let (e, _) = worker_reads(encode_raw_header(MAGIC, PROTOCOL_VERSION, EVAL, 1, limit as u32 + 1, 0).to_vec());
    assert!(matches!(e, ProtoError::PayloadTooLarge { frame: FrameType::Eval, limit: l, .. } if l == limit), "{e}");
}

#[test]
fn request_ids_out_of_order() {
    let mut bytes = frame(FrameType::Ping as u16, 5, &[1, 2, 3]);
    bytes.extend(frame(FrameType::Ping as u16, 3, &[]));
    let (e, (code, _)) = worker_reads(bytes);
    assert!(matches!(e, ProtoError::RequestIdOrder { previous: 5, found: 3 }), "{e}");
    assert_eq!(code, ErrorCode::OUT_OF_ORDER.0);
}

#[test]
fn frame_of_the_wrong_direction() {
    let p = hello_payload(&identity(), &even_experts());
    let (e, _) = worker_reads(frame(FrameType::Hello as u16, 1, &p));
    assert!(matches!(e, ProtoError::UnexpectedFrame { expected: "a request", found: FrameType::Hello }), "{e}");
}

#[test]
fn worker_side_header_errors() {
    let mut f = frame(FrameType::Ping as u16, 1, &[]);
    f[0] ^= 0xff;
    let (e, _) = worker_reads(f);
    assert!(matches!(e, ProtoError::BadMagic { .. }), "{e}");
    let (e, _) = worker_reads(encode_raw_header(MAGIC, 0, FrameType::Ping as u16, 1, 0, 0).to_vec());
    assert!(matches!(e, ProtoError::VersionMismatch { expected: PROTOCOL_VERSION, found: 0 }), "{e}");
    let (e, _) = worker_reads(frame(0, 1, &[]));
    assert!(matches!(e, ProtoError::UnknownFrameType { found: 0 }), "{e}");
    // Ping over the input area's size.
    let area = limits().input_area_bytes() as usize;
    let (e, _) = worker_reads(frame(FrameType::Ping as u16, 1, &vec![0; area + 1]));
    assert!(matches!(e, ProtoError::PayloadTooLarge { frame: FrameType::Ping, .. }), "{e}");
}
