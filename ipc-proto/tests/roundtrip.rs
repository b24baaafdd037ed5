//! Every message over a real socket with the worker in a thread; the shared-memory path;
//! peer death and timeouts.

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ipc_proto::{ErrorCode, ProtoError, Request, SocketDir, WorkerConnection, WorkerServer, WorkerStats};

/// Inputs: token t, column j -> a distinct value.
fn fill_inputs(conn: &mut WorkerConnection, n_tokens: usize) -> Vec<f32> {
    let input: Vec<f32> = (0..n_tokens * N_EMBD as usize).map(|i| (i as f32) * 0.25 - 3.0).collect();
    conn.write_inputs(&input).expect("input area");
    input
}

/// The first `n_tokens` output rows, copied out.
fn outputs(conn: &WorkerConnection, n_pairs: usize) -> Result<Vec<f32>, ProtoError> {
    let mut out = vec![f32::NAN; n_pairs * N_EMBD as usize];
    conn.read_outputs(&mut out).map(|()| out)
}

/// The daemon-side reference, computed from the test's own copy of the inputs: one row per
/// (token, expert) pair, in order.
fn reference(layer: u32, tokens: &[&[u32]], input: &[f32]) -> Vec<f32> {
    let n = N_EMBD as usize;
    let mut out = Vec::new();
    for (t, ids) in tokens.iter().enumerate() {
        for &e in *ids {
            out.extend(input[t * n..(t + 1) * n].iter().map(|&x| expert_fn(layer, e, x)));
        }
    }
    out
}

#[test]
fn every_message_round_trips_and_shm_carries_activations() {
    let (mut conn, worker) = pair();
    assert_eq!(conn.identity(), &identity());
    assert_eq!(conn.experts(), &even_experts());
    assert_eq!(conn.experts().layer(2), (0..N_EXPERT).step_by(2).collect::<Vec<_>>());

    // Eval: 3 tokens, the middle one without pairs: 4 output rows, one per pair.
    let input = fill_inputs(&mut conn, 3);
    let tokens: [&[u32]; 3] = [&[0, 4, 68], &[], &[10]];
    let id = conn.eval_begin(2, &expert_pairs(&tokens)).expect("eval_begin");
    let reply = conn.eval_end(id, soon()).expect("eval_end");
    assert_eq!(reply.id, id);
    assert_eq!(reply.n_pairs, 4);
    assert!(reply.compute_us >= 1);
    let want = reference(2, &tokens, &input);
    assert_eq!(want.len(), 4 * N_EMBD as usize);
    assert_eq!(outputs(&conn, 4).expect("output"), want);
    // Rows past the eval's pairs are not readable, nor part rows.
    assert!(matches!(outputs(&conn, 5), Err(ProtoError::OutOfRange { max: 4, found: 5, .. })));
    let mut part = vec![0f32; N_EMBD as usize + 1];
    assert!(matches!(conn.read_outputs(&mut part), Err(ProtoError::Mismatch { expected: 8, found: 9, .. })));
    assert!(matches!(conn.write_inputs(&part), Err(ProtoError::Mismatch { expected: 8, found: 9, .. })));
    assert!(matches!(conn.write_inputs(&vec![0f32; 5 * N_EMBD as usize]), Err(ProtoError::OutOfRange { max: 4, found: 5, .. })));

    // A second eval on another layer with one token of 6 experts.
    let input = fill_inputs(&mut conn, 1);
    let tokens: [&[u32]; 1] = [&[2, 6, 8, 12, 14, 16]];
    let id2 = conn.eval_begin(3, &expert_pairs(&tokens)).expect("eval_begin");
    assert!(id2 > id);
    conn.eval_end(id2, soon()).expect("eval_end");
    assert_eq!(outputs(&conn, 6).expect("output"), reference(3, &tokens, &input));

    // Every token with the most experts: the output area holds max_tokens × max_experts rows.
    let input = fill_inputs(&mut conn, 4);
    let full: [&[u32]; 4] = [&[0, 2, 4, 6, 8, 10]; 4];
    let id3 = conn.eval_begin(1, &expert_pairs(&full)).expect("eval_begin");
    assert_eq!(conn.eval_end(id3, soon()).expect("eval_end").n_pairs, 24);
    assert_eq!(outputs(&conn, 24).expect("output"), reference(1, &full, &input));

    // Ping, ping with a payload (the input area's size), stats.
    conn.ping(soon()).expect("ping");
    let payload: Vec<u8> = (0..conn.limits().input_area_bytes()).map(|i| (i * 7 % 251) as u8).collect();
    conn.ping_with(&payload, soon()).expect("ping with payload");
    let stats = conn.stats(soon()).expect("stats");
    assert_eq!(stats.evals, 3);
    assert_eq!(stats.tokens, 8);
    assert_eq!(stats.pairs, 34);
    assert_eq!(stats.pings, 2);
    assert!(stats.compute_us >= 3);

    conn.shutdown(soon()).expect("shutdown");
    assert_eq!(worker.join().expect("worker thread").expect("worker"), 3);
}

#[test]
fn over_a_listener_in_a_private_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = SocketDir::create_private(&tmp.path().join("sockets")).expect("private dir");
    let listener = dir.listen("worker-0").expect("listen");
    let path = listener.path().to_owned();
    let worker = std::thread::spawn(move || {
        let server = listener.accept(&identity(), even_experts(), &opts())?;
        serve(server)
    });
    let mut conn = WorkerConnection::connect(&path, limits(), &identity()).expect("connect");
    fill_inputs(&mut conn, 4);
    let t: [&[u32]; 4] = [&[0]; 4];
    let id = conn.eval_begin(0, &expert_pairs(&t)).expect("eval_begin");
    conn.eval_end(id, soon()).expect("eval_end");
    conn.shutdown(soon()).expect("shutdown");
    assert_eq!(worker.join().expect("worker thread").expect("worker"), 1);
    assert!(!path.exists(), "the listener removes its socket on drop");
}

#[test]
fn client_side_checks_do_not_close_the_connection() {
    let (mut conn, worker) = pair();
    let odd: [&[u32]; 1] = [&[3]];
    assert!(matches!(conn.eval_begin(0, &expert_pairs(&odd)), Err(ProtoError::ExpertNotOwned { layer: 0, expert: 3 })));
    let too_many: [&[u32]; 5] = [&[0]; 5];
    assert!(matches!(conn.eval_begin(0, &expert_pairs(&too_many)), Err(ProtoError::OutOfRange { max: 4, found: 5, .. })));
    assert!(matches!(conn.eval_begin(4, &expert_pairs(&odd[..0])), Err(ProtoError::LayerOutOfRange { layer: 4, n_layer: 4 })));
    let twice: [&[u32]; 1] = [&[2, 2]];
    assert!(matches!(conn.eval_begin(1, &expert_pairs(&twice)), Err(ProtoError::DuplicateExpert { token: 0, expert: 2 })));
    // One eval in flight at a time; the input area is not writable meanwhile.
    let ok: [&[u32]; 1] = [&[2]];
    let id = conn.eval_begin(1, &expert_pairs(&ok)).expect("eval_begin");
    assert!(matches!(conn.eval_begin(1, &expert_pairs(&ok)), Err(ProtoError::State { .. })));
    assert!(matches!(conn.write_inputs(&[0.0; N_EMBD as usize]), Err(ProtoError::State { .. })));
    assert!(matches!(conn.read_outputs(&mut [0.0; N_EMBD as usize]), Err(ProtoError::State { .. })));
    assert!(matches!(conn.ping(soon()), Err(ProtoError::State { .. })));
    conn.eval_end(id, soon()).expect("eval_end");
    assert!(!conn.is_closed());
    conn.shutdown(soon()).expect("shutdown");
    worker.join().expect("worker thread").expect("worker");
}

#[test]
fn worker_error_reply_reaches_the_daemon() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let worker = std::thread::spawn(move || {
        let mut server = WorkerServer::handshake(b, &identity(), even_experts(), &opts())?;
        match server.next_request()? {
            Request::Eval(req) => server.reply_error(req.id, ErrorCode::INTERNAL, "out of memory in expert 4"),
            other => panic!("expected an eval, got {other:?}"),
        }
    });
    let mut conn = WorkerConnection::handshake(a, limits(), &identity(), &opts()).expect("handshake");
    let id = conn.eval_begin(0, &expert_pairs(&[&[4]])).expect("eval_begin");
    match conn.eval_end(id, soon()) {
        Err(ProtoError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::INTERNAL);
            assert_eq!(message, "out of memory in expert 4");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert!(conn.is_closed());
    assert!(matches!(conn.ping(soon()), Err(ProtoError::Closed)));
    worker.join().expect("worker thread").expect("worker");
}

#[test]
fn eof_when_the_worker_dies_mid_eval() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let worker = std::thread::spawn(move || {
        let mut server = WorkerServer::handshake(b, &identity(), even_experts(), &opts()).expect("handshake");
        let req = server.next_request().expect("request");
        assert!(matches!(req, Request::Eval(_)));
        drop(server); // crash: no reply
    });
    let mut conn = WorkerConnection::handshake(a, limits(), &identity(), &opts()).expect("handshake");
    let id = conn.eval_begin(0, &expert_pairs(&[&[4]])).expect("eval_begin");
    let t0 = Instant::now();
    let e = conn.eval_end(id, Instant::now() + Duration::from_secs(10)).expect_err("peer died");
    assert!(matches!(e, ProtoError::PeerClosed { .. }), "{e}");
    assert!(e.is_peer_lost());
    assert!(t0.elapsed() < Duration::from_secs(5), "EOF is seen at once, not at the deadline");
    worker.join().expect("worker thread");
}

#[test]
fn timeout_when_the_worker_hangs() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        let mut server = WorkerServer::handshake(b, &identity(), even_experts(), &opts()).expect("handshake");
        let _req = server.next_request().expect("request");
        let _ = rx.recv(); // hang until the test is done
    });
    let mut conn = WorkerConnection::handshake(a, limits(), &identity(), &opts()).expect("handshake");
    conn.set_spin(Duration::from_micros(50));
    let id = conn.eval_begin(0, &expert_pairs(&[&[4]])).expect("eval_begin");
    let t0 = Instant::now();
    let e = conn.eval_end(id, Instant::now() + Duration::from_millis(100)).expect_err("hung");
    let waited = t0.elapsed();
    assert!(matches!(e, ProtoError::Timeout { .. }), "{e}");
    assert!(e.is_peer_lost());
    assert!(waited >= Duration::from_millis(100) && waited < Duration::from_secs(2), "{waited:?}");
    tx.send(()).expect("release worker");
    worker.join().expect("worker thread");
}

#[test]
fn killed_child_process_is_detected_during_the_handshake() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    // The child holds the worker's end as its stdin and never speaks.
    let mut child = Command::new("sleep").arg("30").stdin(Stdio::from(OwnedFd::from(b))).spawn().expect("spawn sleep");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        child.kill().expect("kill");
        child.wait().expect("wait")
    });
    let t0 = Instant::now();
    let opts = ipc_proto::ConnectOptions { handshake_timeout: Duration::from_secs(20), ..opts() };
    let e = WorkerConnection::handshake(a, limits(), &identity(), &opts).err().expect("child killed");
    assert!(matches!(e, ProtoError::PeerClosed { .. }), "{e}");
    assert!(e.is_peer_lost());
    assert!(t0.elapsed() < Duration::from_secs(10));
    let status = killer.join().expect("killer");
    assert!(!status.success());
}

#[test]
fn stats_default_and_counters_match() {
    let (mut conn, worker) = pair();
    assert_eq!(conn.stats(soon()).expect("stats"), WorkerStats::default());
    conn.shutdown(soon()).expect("shutdown");
    worker.join().expect("worker thread").expect("worker");
}
