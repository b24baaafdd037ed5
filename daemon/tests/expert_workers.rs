//! Hot/cold placement end to end through `dflash logits`: cold experts computed by spawned
//! `moe-expert` worker processes (0 = in process, 1, 2, 4 workers) under several placements
//! give the all-hot logits (max |Δ| ≤ 1e-5 · max |logit|), through prefill and decode; a
//! worker killed with SIGKILL, or stopped with SIGSTOP (hung), mid-run is killed, respawned
//! and the run completes with the same logits; a slow load that keeps progressing is waited
//! for, one that stops is killed with a clear error.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// `name` in a directory of its own per test (tests run in parallel and clean up).
fn tmp(name: &str) -> PathBuf {
    let test = std::thread::current().name().unwrap_or("main").replace("::", "-");
    let dir = std::env::temp_dir().join(format!("dflash-expert-workers-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

fn read_npy(path: &Path) -> Vec<f32> {
    npyz::NpyFile::new(&std::fs::read(path).expect("output")[..]).expect("npy").into_vec().expect("f32")
}

fn tokens(n: usize) -> PathBuf {
    let mut npz = npyz::npz::NpzArchive::open(fixture("ds4-tiny-b.ref.npz")).expect("reference");
    let t: Vec<i32> = npz.by_name("tokens").expect("npz").expect("tokens").into_vec().expect("i32");
    let path = tmp(&format!("tokens-{n}.txt"));
    std::fs::write(&path, t[..n].iter().map(|t| format!("{t}\n")).collect::<String>()).expect("write");
    path
}

/// `dflash logits` on fixture B, writing `out`.
fn run_logits(toks: &Path, decode_from: usize, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dflash"))
        .args(["logits", "-m"])
        .arg(fixture("ds4-tiny-b.f32.gguf"))
        .arg("--tokens")
        .arg(toks)
        .arg("--out")
        .arg(out)
        .args(["--decode-from", &decode_from.to_string(), "-t", "2", "-u", "32"])
        .args(extra)
        .output()
        .expect("run dflash")
}

fn logits(toks: &Path, decode_from: usize, out: &str, extra: &[&str]) -> Vec<f32> {
    let out = tmp(out);
    let o = run_logits(toks, decode_from, &out, extra);
    assert!(o.status.success(), "dflash logits {extra:?}: {}", String::from_utf8_lossy(&o.stderr));
    read_npy(&out)
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let max = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d <= 1e-5 * max, "{what}: max |Δ| {d:.3e} > 1e-5 · {max}");
}

#[test]
fn placements_and_worker_counts_equal_all_hot() {
    let toks = tokens(72);
    let base = logits(&toks, 64, "hot.npy", &[]);
    // Route stats for a profile placement: a skewed made-up count per (layer, expert).
    let stats = tmp("stats.json");
    let body: Vec<String> = (0..5).map(|l| format!("\"{l}\": [{}]", (0..32).map(|e| ((e * 7 + l * 5) % 32).to_string()).collect::<Vec<_>>().join(","))).collect();
    std::fs::write(&stats, format!("{{{}}}", body.join(","))).expect("stats");
    let profile = format!("profile:{}", stats.display());
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("all cold, in process", vec!["--experts-hot", "none", "--expert-workers", "0"]),
        ("all cold, 1 worker", vec!["--experts-hot", "none", "--expert-workers", "1"]),
        ("all cold, 2 workers", vec!["--experts-hot", "none", "--expert-workers", "2"]),
        ("all cold, 2 spinning workers", vec!["--experts-hot", "none", "--expert-workers", "2", "--worker-spin-us", "50"]),
        ("all cold, 2 workers pinned to CPUs 0 and 1", vec!["--experts-hot", "none", "--expert-workers", "2", "--worker-cpus", "0/1"]),
        ("all cold, 4 workers", vec!["--experts-hot", "none", "--expert-workers", "4"]),
        ("uniform 50%, 2 workers", vec!["--experts-hot", "uniform:16", "--expert-workers", "2"]),
        ("profile, 2 workers", vec!["--experts-hot", &profile, "--expert-budget-mb", "1", "--expert-workers", "2"]),
        ("first 2 layers cold, 1 worker", vec!["--n-cpu-moe", "2"]),
    ];
    for (i, (what, args)) in cases.iter().enumerate() {
        let got = logits(&toks, 64, &format!("case-{i}.npy"), args);
        assert_close(&got, &base, what);
    }
    std::fs::remove_dir_all(tmp("x").parent().expect("dir")).ok();
}

/// The children of `pid` (from /proc).
fn children(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        if rest.split_whitespace().nth(1).and_then(|v| v.parse::<u32>().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// A running `dflash` whose stderr is read as it comes (so it never blocks on a full pipe).
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: String,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd.stderr(Stdio::piped()).spawn().expect("run dflash");
        let pipe = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines, stderr: String::new() }
    }

    /// Waits until a line of stderr contains `text`.
    fn wait_for(&mut self, text: &str) {
        let t0 = Instant::now();
        while !self.stderr.contains(text) {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    self.stderr.push_str(&line);
                    self.stderr.push('\n');
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("dflash exited before {text:?}: {}", self.stderr),
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "no {text:?} within 120 s: {}", self.stderr);
        }
    }

    /// Waits for the exit at most `limit` (a daemon still running then is wedged: killed, and
    /// the test fails); returns the status and all of stderr.
    fn finish(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if t0.elapsed() > limit {
                self.child.kill().ok();
                self.child.wait().ok();
                panic!("dflash did not finish within {limit:?}: {}", self.stderr);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipe closes once the daemon and its workers are gone.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        (status, self.stderr)
    }
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal the worker");
}

fn gone(pid: i32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `dflash logits` over 64 tokens, decoding from 8, every expert cold in 2 workers; once
/// both run and decoding is under way, `hurt` is done to one worker. Returns that worker's
/// pid, the exit status, stderr and the logits file.
fn hurt_a_worker_mid_run(name: &str, extra: &[&str], hurt: nix::sys::signal::Signal) -> (i32, std::process::ExitStatus, String, PathBuf) {
    let out = tmp(&format!("{name}.npy"));
    let mut run = Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_dflash"))
            .args(["logits", "-m"])
            .arg(fixture("ds4-tiny-b.f32.gguf"))
            .arg("--tokens")
            .arg(tokens(64))
            .arg("--out")
            .arg(&out)
            .args(["--decode-from", "8", "-t", "2", "-u", "32", "--experts-hot", "none", "--expert-workers", "2"])
            .args(extra)
            .env("DFLASH_LOG", "info"),
    );
    run.wait_for("expert workers started");
    std::thread::sleep(Duration::from_millis(300));
    let kids = children(run.child.id());
    assert_eq!(kids.len(), 2, "{kids:?}");
    signal(kids[1], hurt);
    let (status, err) = run.finish(Duration::from_secs(300));
    (kids[1], status, err, out)
}

#[test]
fn a_killed_worker_is_respawned_and_the_run_completes_identically() {
    let base = logits(&tokens(64), 8, "kill-base.npy", &[]);
    let (victim, status, err, out) = hurt_a_worker_mid_run("kill", &[], nix::sys::signal::Signal::SIGKILL);
    assert!(status.success(), "{err}");
    assert!(err.contains("respawning"), "the loss was not noticed: {err}");
    assert!(gone(victim));
    assert_close(&read_npy(&out), &base, "after a SIGKILL");
    std::fs::remove_dir_all(out.parent().expect("dir")).ok();
}

/// A worker stopped with SIGSTOP (alive and silent, as a hung process) misses its layer's
/// eval deadline (floor 1 s here): it is killed, a new one started and the layer replayed,
/// and the run completes with the same logits.
#[test]
fn a_stopped_worker_is_killed_respawned_and_the_run_completes_identically() {
    let base = logits(&tokens(64), 8, "stop-base.npy", &[]);
    let (victim, status, err, out) = hurt_a_worker_mid_run("stop", &["--worker-eval-timeout-ms", "1000"], nix::sys::signal::Signal::SIGSTOP);
    assert!(status.success(), "{err}");
    assert!(err.contains("respawning") && err.contains("no answer from the peer"), "the hang was not noticed: {err}");
    assert!(gone(victim), "the stopped worker was not killed and reaped");
    assert_close(&read_npy(&out), &base, "after a SIGSTOP");
    std::fs::remove_dir_all(out.parent().expect("dir")).ok();
}

/// `dflash logits` over 16 tokens with every expert cold in one worker whose load is slowed
/// down (the test fault `DIR/load-delay-ms`: a sleep after each of the fixture's 5 layers).
fn slow_load(delay_ms: u64, stall_ms: u64, name: &str) -> (Running, PathBuf) {
    let faults = tmp(&format!("{name}-faults"));
    std::fs::create_dir_all(&faults).expect("dir");
    std::fs::write(faults.join(expert_worker::faults::LOAD_DELAY_FILE), delay_ms.to_string()).expect("delay");
    let out = tmp(&format!("{name}.npy"));
    let run = Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_dflash"))
            .args(["logits", "-m"])
            .arg(fixture("ds4-tiny-b.f32.gguf"))
            .arg("--tokens")
            .arg(tokens(16))
            .arg("--out")
            .arg(&out)
            .args(["-t", "2", "-u", "32", "--experts-hot", "none", "--expert-workers", "1"])
            .args(["--worker-load-stall-ms", &stall_ms.to_string()])
            .env(expert_worker::faults::TEST_FAULTS_ENV, &faults)
            .env("DFLASH_LOG", "info"),
    );
    (run, out)
}

/// The worker loads its 5 layers 500 ms apart: 2.5 s in all, well past the 1.5 s stall
/// window. As its progress reports keep coming it is waited for, and the run gives the
/// all-hot logits.
#[test]
fn a_slow_load_that_progresses_is_waited_for_past_the_stall_window() {
    let base = logits(&tokens(16), 16, "slow-base.npy", &[]);
    let (mut run, out) = slow_load(500, 1500, "slow");
    run.wait_for("worker listening");
    let t0 = Instant::now();
    run.wait_for("expert worker ready");
    let load = t0.elapsed();
    let (status, err) = run.finish(Duration::from_secs(300));
    assert!(status.success(), "{err}");
    assert!(load >= Duration::from_millis(2500), "the load was not slowed down: {load:?}");
    assert_close(&read_npy(&out), &base, "after a slow load");
    std::fs::remove_dir_all(out.parent().expect("dir")).ok();
}

/// The worker is stopped (SIGSTOP) in the middle of its slowed-down load: its reports stop,
/// and after the 1.5 s stall window it is killed and the start fails naming how far it got.
#[test]
fn a_load_that_stops_progressing_is_killed_with_a_clear_error() {
    let (mut run, out) = slow_load(500, 1500, "stall");
    // The socket opens before the load; the first layer then takes 500 ms.
    run.wait_for("worker listening");
    std::thread::sleep(Duration::from_millis(200));
    let kids = children(run.child.id());
    assert_eq!(kids.len(), 1, "{kids:?}");
    signal(kids[0], nix::sys::signal::Signal::SIGSTOP);
    let (status, err) = run.finish(Duration::from_secs(300));
    assert!(!status.success(), "{err}");
    assert!(err.contains("expert worker 0") && err.contains("made no load progress for") && err.contains(" bytes)"), "{err}");
    assert!(gone(kids[0]), "the stalled worker was not killed and reaped");
    assert!(!out.exists());
    std::fs::remove_dir_all(out.parent().expect("dir")).ok();
}

/// `--route-stats-out` counts every routed (token, expert) slot: on hash layers exactly the
/// tid2eid table's choices for the tokens fed, read here from the GGUF; and the file feeds
/// `--experts-hot profile:FILE`, which gives the all-hot logits.
#[test]
fn route_stats_count_the_routing_and_feed_a_profile() {
    let n = 40;
    let toks = tokens(n);
    let stats = tmp("route-stats.json");
    let base = logits(&toks, 30, "route-base.npy", &["--route-stats-out", stats.to_str().expect("utf-8 path")]);
    let text = std::fs::read_to_string(&stats).expect("stats written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let file = loader::ModelFile::open(fixture("ds4-tiny-b.f32.gguf")).expect("fixture");
    let c = &file.config;
    let bytes = std::fs::read(fixture("ds4-tiny-b.f32.gguf")).expect("read");
    let ids: Vec<i32> = std::fs::read_to_string(&toks).expect("tokens").lines().map(|l| l.parse().expect("id")).collect();
    for l in 0..c.n_layer {
        let counts: Vec<u64> = v[l.to_string()].as_array().expect("layer").iter().map(|x| x.as_u64().expect("count")).collect();
        assert_eq!(counts.len(), c.n_expert);
        assert_eq!(counts.iter().sum::<u64>(), (n * c.n_expert_used) as u64, "layer {l}");
        if c.is_hash_layer(l) {
            let t = file.tensors.get(&format!("blk.{l}.ffn_gate_tid2eid.weight")).expect("tid2eid");
            let mut want = vec![0u64; c.n_expert];
            for &tok in &ids {
                for s in 0..c.n_expert_used {
                    let at = t.offset as usize + (tok as usize * c.n_expert_used + s) * 4;
                    want[i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize] += 1;
                }
            }
            assert_eq!(counts, want, "hash layer {l}");
        }
    }
    let profile = format!("profile:{}", stats.display());
    let got = logits(&toks, 30, "route-profile.npy", &["--experts-hot", &profile, "--expert-budget-mb", "1", "--expert-workers", "1"]);
    assert_close(&got, &base, "profile from route stats");
    std::fs::remove_dir_all(stats.parent().expect("dir")).ok();
}

/// `--worker-cpus` needs one CPU list per worker; a wrong count is refused before any worker
/// starts, naming the flag.
#[test]
fn worker_cpus_need_one_list_per_worker() {
    let toks = tokens(8);
    let o = run_logits(&toks, 8, &tmp("never.npy"), &["--experts-hot", "none", "--expert-workers", "2", "--worker-cpus", "0-1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--worker-cpus") && err.contains("1 CPU lists for 2 workers"), "{err}");
    assert!(!tmp("never.npy").exists());
    let o = run_logits(&toks, 8, &tmp("never.npy"), &["--experts-hot", "none", "--expert-workers", "0", "--worker-cpus", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--expert-workers is 0"), "{err}");
    assert!(!tmp("never.npy").exists());
}

/// `--experts-hot adaptive` moves experts between hot and cold, which the fixed pinned host
/// copy of `--cold-offload-min` / `--cold-layers-in-graph` cannot follow: refused by name
/// before loading; `--adaptive-from` without an adaptive placement too.
#[test]
fn adaptive_refuses_a_fixed_cold_copy_and_adaptive_from_needs_adaptive() {
    let toks = tokens(8);
    for extra in [["--cold-offload-min", "4"], ["--cold-layers-in-graph", "--expert-workers=0"]] {
        let mut args = vec!["--experts-hot", "adaptive:0.5"];
        args.extend(extra);
        let o = run_logits(&toks, 8, &tmp("never-adaptive.npy"), &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--experts-hot adaptive") && err.contains("--cold-offload-min"), "{err}");
    }
    let o = run_logits(&toks, 8, &tmp("never-adaptive.npy"), &["--experts-hot", "budget", "--expert-budget-mb", "1", "--adaptive-from", "x.json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--adaptive-from needs --experts-hot adaptive"), "{err}");
    assert!(!tmp("never-adaptive.npy").exists());
}
