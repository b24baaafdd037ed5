//! `dflash --backend-ipc-mode=moe-expert` as a real process: evals over its socket equal the
//! in-process worker bit for bit (itself checked against a plain-Rust reference in
//! expert-worker's tests), a worker of another model is refused at the handshake, a SIGKILLed worker is seen
//! as lost, a bad spec fails with a message naming it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use expert_worker::{model_identity, ExpertWorker};
use experts::ExpertPairs;
use ipc_proto::{Limits, ModelIdentity, ProtoError, SocketDir, WorkerConnection};
use loader::ModelFile;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

const A: &str = "ds4-tiny-a.f32.gguf";
const B: &str = "ds4-tiny-b.f32.gguf";

fn spawn(model: &Path, socket: &Path, experts: &str) -> Child {
    spawn_with_env(model, socket, experts, &[])
}

fn spawn_with_env(model: &Path, socket: &Path, experts: &str, env: &[(&str, &Path)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dflash"))
        .arg("--backend-ipc-mode=moe-expert")
        .arg("--model")
        .arg(model)
        .arg("--socket")
        .arg(socket)
        .args(["--experts", experts, "--threads", "1"])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Connects once the worker listens (it binds before loading), within 60 s.
fn connect(child: &mut Child, socket: &Path, limits: Limits, id: &ModelIdentity) -> Result<WorkerConnection, ProtoError> {
    let t0 = Instant::now();
    loop {
        match WorkerConnection::connect(socket, limits, id) {
            Err(ProtoError::Connect { .. }) if t0.elapsed() < Duration::from_secs(60) => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("worker exited before listening: {status}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn stderr_of(child: Child) -> (std::process::ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn limits() -> Limits {
    Limits { max_tokens: 4, n_embd: 64, max_experts_per_token: 4 }
}

fn inputs(n: usize) -> Vec<f32> {
    (0..n * 64).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * if i < 64 { 100.0 } else { 1.0 }).collect()
}

#[test]
fn worker_process_matches_in_process_compute() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = SocketDir::create_private(&dir.path().join("s")).unwrap();
    let socket = sockets.socket_path("w0");
    let spec = "0-2:1,3,5,7;3-5:0-15";
    let mut child = spawn(&fixture(A), &socket, spec);
    let mf = ModelFile::open(fixture(A)).unwrap();
    let id = model_identity(&mf).unwrap();
    let mut conn = connect(&mut child, &socket, limits(), &id).unwrap();
    let map = expert_worker::experts::parse_spec(spec, 6, 16).unwrap();
    assert_eq!(conn.experts(), &map);
    let local = ExpertWorker::load(&mf, &map, 1).unwrap();

    let pairs = ExpertPairs::from_tokens(&[&[1, 7], &[], &[3, 5, 1, 7], &[5]]);
    let x = inputs(4);
    for layer in [0u32, 2, 4] {
        conn.write_inputs(&x).unwrap();
        let rid = conn.eval_begin(layer, &pairs).unwrap();
        let reply = conn.eval_end(rid, Instant::now() + Duration::from_secs(30)).unwrap();
        assert_eq!(reply.n_pairs, 7);
        let mut want = vec![0.0; 7 * 64];
        local.eval(layer, &x, &pairs, &mut want).unwrap();
        let mut got = vec![f32::NAN; 7 * 64];
        conn.read_outputs(&mut got).unwrap();
        assert!(want.iter().any(|&v| v != 0.0));
        assert_eq!(got, want, "layer {layer}");
    }
    // An expert the worker does not own is refused on the daemon side before sending.
    let e = conn.eval_begin(0, &ExpertPairs::from_tokens(&[&[2]])).unwrap_err();
    assert!(matches!(e, ProtoError::ExpertNotOwned { layer: 0, expert: 2 }), "{e}");
    let stats = conn.stats(Instant::now() + Duration::from_secs(5)).unwrap();
    assert_eq!((stats.evals, stats.tokens, stats.pairs), (3, 12, 21));
    conn.shutdown(Instant::now() + Duration::from_secs(10)).unwrap();
    let (status, err) = stderr_of(child);
    assert!(status.success(), "worker exit {status}: {err}");
}

/// A worker process reports its load: a first report of nothing loaded, then one per layer
/// at least (here slowed down to 300 ms a layer by the test fault `load-delay-ms`: 1.8 s for
/// the fixture's 6 layers, past the 1 s stall window, which each report restarts), the last
/// one with every byte of its experts' slices in the GGUF.
#[test]
fn worker_process_reports_its_load_progress() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults");
    std::fs::create_dir(&faults).unwrap();
    std::fs::write(faults.join(expert_worker::faults::LOAD_DELAY_FILE), "300").unwrap();
    let sockets = SocketDir::create_private(&dir.path().join("s")).unwrap();
    let socket = sockets.socket_path("w0");
    let spec = "0-2:1,3,5,7;3-5:0-15";
    let mut child = spawn_with_env(&fixture(A), &socket, spec, &[(expert_worker::faults::TEST_FAULTS_ENV, &faults)]);
    let mf = ModelFile::open(fixture(A)).unwrap();
    let id = model_identity(&mf).unwrap();
    while !socket.exists() {
        assert!(child.try_wait().unwrap().is_none(), "worker exited before listening");
        std::thread::sleep(Duration::from_millis(10));
    }
    let opts = ipc_proto::ConnectOptions { load_stall: Duration::from_secs(1), ..ipc_proto::ConnectOptions::default() };
    let conn = WorkerConnection::connect_with(&socket, limits(), &id, &opts).unwrap();
    let r = conn.load_report();
    let map = expert_worker::experts::parse_spec(spec, 6, 16).unwrap();
    let mut bytes = 0;
    for l in 0..6u32 {
        for part in ["gate", "up", "down"] {
            bytes += mf.tensors.get(&format!("blk.{l}.ffn_{part}_exps.weight")).unwrap().slice_bytes(2) * map.layer(l).len() as u64;
        }
    }
    assert_eq!((r.last.loaded, r.last.total), (bytes, bytes));
    assert!(r.reports >= 7, "{r:?}");
    assert!(r.elapsed >= Duration::from_millis(1800), "{r:?}");
    conn.shutdown(Instant::now() + Duration::from_secs(10)).unwrap();
    let (status, err) = stderr_of(child);
    assert!(status.success(), "worker exit {status}: {err}");
}

#[test]
fn worker_of_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = SocketDir::create_private(&dir.path().join("s")).unwrap();
    let socket = sockets.socket_path("w0");
    let mut child = spawn(&fixture(B), &socket, "all");
    let expected = model_identity(&ModelFile::open(fixture(A)).unwrap()).unwrap();
    let e = connect(&mut child, &socket, limits(), &expected).err().unwrap();
    match &e {
        ProtoError::IdentityMismatch { expected: want, found } => {
            assert_eq!(**want, expected);
            assert_eq!((found.n_layer, found.n_expert, found.n_embd), (5, 32, 32));
        }
        other => panic!("expected an identity mismatch, found {other}"),
    }
    let (status, err) = stderr_of(child);
    assert!(!status.success());
    assert!(err.contains("model identity mismatch"), "worker stderr: {err}");
}

#[test]
fn sigkill_of_the_worker_is_seen_as_peer_lost() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = SocketDir::create_private(&dir.path().join("s")).unwrap();
    let socket = sockets.socket_path("w0");
    let mut child = spawn(&fixture(A), &socket, "0-15");
    let id = model_identity(&ModelFile::open(fixture(A)).unwrap()).unwrap();
    let mut conn = connect(&mut child, &socket, limits(), &id).unwrap();
    let one = ExpertPairs::from_tokens(&[&[3]]);
    conn.write_inputs(&inputs(1)).unwrap();
    let rid = conn.eval_begin(1, &one).unwrap();
    conn.eval_end(rid, Instant::now() + Duration::from_secs(30)).unwrap();

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    let t0 = Instant::now();
    let e = conn
        .eval_begin(1, &one)
        .and_then(|rid| conn.eval_end(rid, Instant::now() + Duration::from_secs(30)))
        .unwrap_err();
    assert!(e.is_peer_lost(), "expected EOF/reset, found {e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "detected by EOF, not by the deadline");
}

#[test]
fn bad_expert_spec_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("w.sock");
    let child = spawn(&fixture(A), &socket, "0-16");
    let (status, err) = stderr_of(child);
    assert!(!status.success());
    assert!(err.contains("expert spec \"0-16\"") && err.contains("expert 16 out of range"), "stderr: {err}");
    assert!(!socket.exists());
}

/// `--cpus` pins the worker process (its threads inherit it) before it loads; a bad list is
/// refused with a message naming it.
#[test]
fn a_worker_is_pinned_to_its_cpus() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = SocketDir::create_private(&dir.path().join("s")).unwrap();
    let socket = sockets.socket_path("pinned");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dflash"))
        .arg("--backend-ipc-mode=moe-expert")
        .arg("--model")
        .arg(fixture(A))
        .arg("--socket")
        .arg(&socket)
        .args(["--experts", "all", "--threads", "2", "--cpus", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = model_identity(&ModelFile::open(fixture(A)).unwrap()).unwrap();
    // After one eval its compute threads exist too: every thread of the process is on CPU 0.
    let mut conn = connect(&mut child, &socket, limits(), &id).unwrap();
    conn.write_inputs(&inputs(1)).unwrap();
    let rid = conn.eval_begin(0, &ExpertPairs::from_tokens(&[&[1, 2]])).unwrap();
    conn.eval_end(rid, Instant::now() + Duration::from_secs(30)).unwrap();
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    let mut n = 0;
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(str::trim).unwrap_or("");
        assert_eq!(allowed, "0", "thread {:?}", t.file_name());
        n += 1;
    }
    assert!(n >= 1, "no threads listed");
    drop(conn);
    child.kill().ok();
    child.wait().ok();

    let child = Command::new(env!("CARGO_BIN_EXE_dflash"))
        .arg("--backend-ipc-mode=moe-expert")
        .arg("--model")
        .arg(fixture(A))
        .arg("--socket")
        .arg(dir.path().join("bad.sock"))
        .args(["--experts", "all", "--cpus", "3-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, err) = stderr_of(child);
    assert!(!status.success());
    assert!(err.contains("CPU pinning \"3-1\"") && err.contains("backwards"), "stderr: {err}");
}
