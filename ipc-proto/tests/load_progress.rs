//! The handshake while a worker loads its experts: the daemon waits as long as `LoadProgress`
//! reports show more bytes loaded, however long the whole load takes; a load that stops
//! progressing fails after `load_stall` with an error naming how far it got; inconsistent
//! reports are refused.

mod common;

use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use ipc_proto::{ConnectOptions, LoadProgress, ProtoError, WorkerConnection, WorkerServer};

fn stall_opts(stall: Duration) -> ConnectOptions {
    ConnectOptions { load_stall: stall, ..opts() }
}

/// A worker that sends `reports` with `gap` between them, then Ready (unless `ready` is
/// false: it then waits for the daemon to hang up), and then serves.
fn loading_worker(reports: Vec<LoadProgress>, gap: Duration, ready: bool) -> (UnixStream, JoinHandle<ipc_proto::Result<()>>) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let worker = std::thread::spawn(move || {
        let mut loading = WorkerServer::start_handshake(b, &identity(), even_experts(), &opts())?;
        for p in reports {
            std::thread::sleep(gap);
            loading.report_load(p)?;
        }
        if !ready {
            // Alive but silent until the daemon gives up.
            std::thread::sleep(Duration::from_secs(3));
            return Ok(());
        }
        serve(loading.ready()?).map(|_| ())
    });
    (a, worker)
}

fn progress(loaded: u64, total: u64) -> LoadProgress {
    LoadProgress { loaded, total }
}

#[test]
fn a_load_that_keeps_progressing_is_waited_for_past_the_stall_window() {
    let total = 1000;
    let reports: Vec<_> = (0..=10).map(|i| progress(i * 100, total)).collect();
    let (a, worker) = loading_worker(reports, Duration::from_millis(60), true);
    let t0 = Instant::now();
    let stall = Duration::from_millis(250);
    let conn = WorkerConnection::handshake(a, limits(), &identity(), &stall_opts(stall)).expect("handshake");
    let took = t0.elapsed();
    // 11 reports 60 ms apart: the whole load takes more than twice the stall window.
    assert!(took >= 2 * stall, "{took:?}");
    let r = conn.load_report();
    assert_eq!(r.last, progress(total, total));
    assert_eq!(r.reports, 11);
    assert!(r.elapsed >= 2 * stall, "{:?}", r.elapsed);
    conn.shutdown(soon()).expect("shutdown");
    worker.join().expect("worker thread").expect("worker");
}

#[test]
fn a_worker_with_nothing_to_load_sends_ready_at_once() {
    let (conn, worker) = pair();
    assert_eq!(conn.load_report().reports, 0);
    conn.shutdown(soon()).expect("shutdown");
    worker.join().expect("worker thread").expect("worker");
}

#[test]
fn a_load_that_stops_progressing_fails_after_the_stall_window() {
    // Reports keep coming, but from the third on without more bytes: not progress.
    let reports = vec![progress(0, 300), progress(120, 300), progress(120, 300), progress(120, 300), progress(120, 300), progress(120, 300)];
    let (a, worker) = loading_worker(reports, Duration::from_millis(50), false);
    let stall = Duration::from_millis(200);
    let t0 = Instant::now();
    let e = WorkerConnection::handshake(a, limits(), &identity(), &stall_opts(stall)).err().expect("stalled");
    let took = t0.elapsed();
    assert!(matches!(e, ProtoError::LoadStalled { loaded: 120, total: 300, waited } if waited >= stall), "{e}");
    assert!(e.is_peer_lost(), "a stalled worker is killed and respawned");
    let msg = e.to_string();
    assert!(msg.contains("no load progress") && msg.contains("loaded 120 of 300 bytes"), "{msg}");
    // Stalled from the report at ~100 ms: given up at ~300 ms, not after the whole load.
    assert!(took >= stall && took < Duration::from_secs(2), "{took:?}");
    // The worker may have sent more reports into the closed connection: its error is moot.
    let _ = worker.join().expect("worker thread");
}

/// The daemon's error for a worker that reports `reports` and then Ready.
fn refused(reports: Vec<LoadProgress>) -> ProtoError {
    let (a, worker) = loading_worker(reports, Duration::ZERO, true);
    let e = WorkerConnection::handshake(a, limits(), &identity(), &stall_opts(Duration::from_secs(5))).err().expect("refused");
    let _ = worker.join().expect("worker thread");
    e
}

#[test]
fn inconsistent_reports_are_refused_naming_the_values() {
    let e = refused(vec![progress(301, 300)]);
    assert!(matches!(e, ProtoError::OutOfRange { max: 300, found: 301, .. }), "{e}");
    let e = refused(vec![progress(10, 300), progress(20, 400)]);
    assert!(matches!(e, ProtoError::Mismatch { expected: 300, found: 400, .. }), "{e}");
    assert!(e.to_string().contains("total bytes to load"), "{e}");
    let e = refused(vec![progress(200, 300), progress(100, 300)]);
    assert!(matches!(e, ProtoError::Mismatch { expected: 200, found: 100, .. }), "{e}");
    let e = refused(vec![progress(200, 300)]);
    assert!(matches!(e, ProtoError::Mismatch { expected: 300, found: 200, .. }), "{e}");
    assert!(e.to_string().contains("bytes loaded at Ready"), "{e}");
    for e in [refused(vec![progress(301, 300)]), refused(vec![progress(200, 300), progress(100, 300)])] {
        assert!(!e.is_peer_lost(), "a protocol violation, not a lost peer: {e}");
    }
}
