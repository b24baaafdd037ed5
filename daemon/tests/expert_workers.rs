//! Hot/cold placement end to end through `dflash logits`: cold experts computed in process
//! or by spawned `moe-expert` worker processes (0 = in process, 1, 2, 4 workers), under every
//! placement policy (all, none, uniform:K, --n-cpu-moe, --cpu-moe, profile:FILE), with 1 or
//! 2 threads in the model and in the workers, give the all-hot logits bit for bit, through
//! chunked prefill and decode, on F32, MXFP4 and Q8_0 experts (DS4.md, "Hot and cold
//! experts"); a worker killed with SIGKILL, or stopped with SIGSTOP (hung), mid-run is
//! killed, respawned and the run completes with the same logits; a slow load that keeps
//! progressing is waited for, one that stops is killed with a clear error.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

thread_local! {
    /// This test's directory: libtest runs each test on a thread of its own, and the
    /// thread's end drops it, so it is removed whether the test passed or failed.
    static TEST_DIR: tempfile::TempDir = tempfile::Builder::new()
        .prefix(&format!("dflash-expert-workers-{}-", std::thread::current().name().unwrap_or("main").replace("::", "-")))
        .tempdir()
        .expect("tmp dir");
}

/// `name` in a directory of its own per test (tests run in parallel).
fn tmp(name: &str) -> PathBuf {
    TEST_DIR.with(|d| d.path().join(name))
}

fn read_npy(path: &Path) -> Vec<f32> {
    npyz::NpyFile::new(&std::fs::read(path).expect("output")[..]).expect("npy").into_vec().expect("f32")
}

/// The first `n` tokens of a fixture's reference (`ds4-tiny-a` or `ds4-tiny-b`), as a file.
fn fixture_tokens(name: &str, n: usize) -> PathBuf {
    let mut npz = npyz::npz::NpzArchive::open(fixture(&format!("{name}.ref.npz"))).expect("reference");
    let t: Vec<i32> = npz.by_name("tokens").expect("npz").expect("tokens").into_vec().expect("i32");
    let path = tmp(&format!("tokens-{name}-{n}.txt"));
    std::fs::write(&path, t[..n].iter().map(|t| format!("{t}\n")).collect::<String>()).expect("write");
    path
}

fn tokens(n: usize) -> PathBuf {
    fixture_tokens("ds4-tiny-b", n)
}

/// `dflash logits` on fixture B with 2 threads and micro-batches of 32, writing `out`.
fn run_logits(toks: &Path, decode_from: usize, out: &Path, extra: &[&str]) -> std::process::Output {
    run_logits_of(&fixture("ds4-tiny-b.f32.gguf"), toks, decode_from, out, &[&["-t", "2", "-u", "32"][..], extra].concat())
}

/// `dflash logits` on the model file `gguf`, writing `out`.
fn run_logits_of(gguf: &Path, toks: &Path, decode_from: usize, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dflash"))
        .args(["logits", "-m"])
        .arg(gguf)
        .arg("--tokens")
        .arg(toks)
        .arg("--out")
        .arg(out)
        .args(["--decode-from", &decode_from.to_string()])
        .args(extra)
        .output()
        .expect("run dflash")
}

/// The logits of [`run_logits`].
fn logits(toks: &Path, decode_from: usize, out: &str, extra: &[&str]) -> Vec<f32> {
    logits_of(&fixture("ds4-tiny-b.f32.gguf"), toks, decode_from, out, &[&["-t", "2", "-u", "32"][..], extra].concat())
}

/// The logits of [`run_logits_of`], written to `out` in this test's directory.
fn logits_of(gguf: &Path, toks: &Path, decode_from: usize, out: &str, extra: &[&str]) -> Vec<f32> {
    let out = tmp(out);
    let o = run_logits_of(gguf, toks, decode_from, &out, extra);
    assert!(o.status.success(), "dflash logits {} {extra:?}: {}", gguf.display(), String::from_utf8_lossy(&o.stderr));
    read_npy(&out)
}

/// `a` and `b` hold the same bits; otherwise the first position that differs and the largest
/// difference relative to the largest logit.
fn assert_same_bits(a: &[f32], b: &[f32], n_vocab: usize, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: logits of another shape");
    let Some(i) = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) else { return };
    let max = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    panic!("{what}: first different logit at position {} (column {}): {} vs {}; max |Δ| {d:.3e} = {:.3e} · max |logit|", i / n_vocab, i % n_vocab, a[i], b[i], d / max);
}

/// Made-up routed-token counts for a profile placement: a skewed count per (layer, expert).
fn route_stats(name: &str, n_layer: usize, n_expert: usize) -> PathBuf {
    let stats = tmp(name);
    let body: Vec<String> = (0..n_layer)
        .map(|l| format!("\"{l}\": [{}]", (0..n_expert).map(|e| ((e * 7 + l * 5) % n_expert).to_string()).collect::<Vec<_>>().join(",")))
        .collect();
    std::fs::write(&stats, format!("{{{}}}", body.join(","))).expect("stats");
    stats
}

#[test]
fn placements_and_worker_counts_equal_all_hot() {
    let toks = tokens(72);
    let base = logits(&toks, 64, "hot.npy", &[]);
    let profile = format!("profile:{}", route_stats("stats.json", 5, 32).display());
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
        assert_same_bits(&got, &base, base.len() / 72, what);
    }
}

/// A model for the bit-for-bit placement test: its file, its tokens (`n`), its shape, an
/// expert budget (MiB) that holds part of its experts, and whether to run every case or the
/// few that change the kernel's inputs (hot vs cold, in process vs workers, threads).
struct Subject {
    gguf: PathBuf,
    toks: PathBuf,
    n: usize,
    n_layer: usize,
    n_expert: usize,
    k: usize,
    budget_mb: &'static str,
    every_case: bool,
}

/// Fixture A with quantized experts: MXFP4 as llama.cpp's converter writes it, or Q8_0 made
/// from the F32 file by `write_synth --requantize-experts`.
fn fixture_a(gguf: &str) -> Subject {
    let n = 24;
    Subject { gguf: fixture(gguf), toks: fixture_tokens("ds4-tiny-a", n), n, n_layer: 6, n_expert: 16, k: 4, budget_mb: "0.2", every_case: true }
}

/// A synthetic model whose experts are wide enough (hidden 256 = 8 blocks of 32, FFN 128)
/// for a different dot-product kernel or weight layout to change the float sums: the
/// fixtures' 1–2 blocks per row hide that (ggml's repacked and plain MXFP4 kernels agree on
/// them).
fn wide_experts(ty: ggml::TensorType) -> Subject {
    let spec = loader::synth::SynthSpec { n_embd: 256, n_ff_exp: 128, expert_type: ty, ..loader::synth::SynthSpec::tiny() };
    let gguf = tmp(&format!("wide-{}.gguf", ty.name()));
    loader::synth::SynthModel::new(&spec).write(&gguf, true).expect("write the synthetic model");
    let n = 24;
    let toks = tmp(&format!("wide-{}-tokens.txt", ty.name()));
    std::fs::write(&toks, (0..n).map(|i| format!("{}\n", (i * 37 + 11) % spec.n_vocab)).collect::<String>()).expect("write");
    Subject { gguf, toks, n, n_layer: spec.n_layer, n_expert: spec.n_expert, k: spec.n_expert_used, budget_mb: "0.5", every_case: false }
}

/// With quantized experts the experts' activations are rounded to Q8_0 blocks and the
/// products are integer dot products scaled per block, so a different kernel, weight layout
/// or summation order between placements shows in the logits. Every placement policy,
/// executor and thread count must give the all-hot logits (1 thread) bit for bit, over a
/// chunked prefill (micro-batches of 8) and decode steps.
fn placements_give_the_same_bits(m: Subject) {
    let name = m.gguf.file_name().and_then(|f| f.to_str()).unwrap_or("model").to_string();
    let decode_from = m.n - 8;
    // Micro-batches of 8; 1 thread unless a case says otherwise (a run's threads spin at
    // every node's barrier, which costs seconds when the cores are busy with other work).
    let run = |out: &str, args: &[&str]| {
        let threads: &[&str] = if args.contains(&"-t") { &[] } else { &["-t", "1"] };
        logits_of(&m.gguf, &m.toks, decode_from, out, &[&["-u", "8"][..], threads, args].concat())
    };
    let base = run(&format!("{name}-hot.npy"), &[]);
    let profile = format!("profile:{}", route_stats(&format!("{name}-stats.json"), m.n_layer, m.n_expert).display());
    let (half, k, cold_layers) = (format!("uniform:{}", m.n_expert / 2), format!("uniform:{}", m.k), (m.n_layer / 2).to_string());
    // (what, args, whether the wide models run it too)
    let cases: Vec<(String, Vec<&str>, bool)> = vec![
        ("all hot, 2 threads".into(), vec!["-t", "2"], false),
        (
            "all cold, in process with 2 threads, --cold-layers-in-graph".into(),
            vec!["--experts-hot", "none", "--expert-workers", "0", "--worker-threads", "2", "--cold-layers-in-graph"],
            true,
        ),
        ("all cold (--cpu-moe), 2 workers of 2 threads".into(), vec!["--cpu-moe", "--expert-workers", "2", "--worker-threads", "2"], true),
        ("all cold, 4 workers".into(), vec!["--experts-hot", "none", "--expert-workers", "4"], false),
        (format!("{half}, 1 worker"), vec!["--experts-hot", &half, "--expert-workers", "1"], false),
        (format!("{k} (k held), in process"), vec!["--experts-hot", &k, "--expert-workers", "0"], true),
        // the in-process executor's pairs shared by the graph's 2 threads (whole experts each)
        ("all cold, in process, split over 2 threads".into(), vec!["--experts-hot", "none", "--expert-workers", "0", "-t", "2"], true),
        (format!("{half}, in process, split over 2 threads"), vec!["--experts-hot", &half, "--expert-workers", "0", "-t", "2"], false),
        (format!("--n-cpu-moe {cold_layers}, 2 workers"), vec!["--n-cpu-moe", &cold_layers, "--expert-workers", "2"], false),
        (format!("profile within {} MiB, 2 workers", m.budget_mb), vec!["--experts-hot", &profile, "--expert-budget-mb", m.budget_mb, "--expert-workers", "2"], false),
    ];
    for (i, (what, args, _)) in cases.iter().enumerate().filter(|(_, c)| m.every_case || c.2) {
        let got = run(&format!("{name}-case-{i}.npy"), args);
        assert_same_bits(&got, &base, base.len() / m.n, &format!("{name}: {what}"));
    }
}

#[test]
fn placements_give_the_same_bits_with_mxfp4_experts() {
    placements_give_the_same_bits(fixture_a("ds4-tiny-a.mxfp4.gguf"));
    placements_give_the_same_bits(wide_experts(ggml::TensorType::MXFP4));
}

#[test]
fn placements_give_the_same_bits_with_q8_0_experts() {
    placements_give_the_same_bits(fixture_a("ds4-tiny-a.q8_0.gguf"));
    placements_give_the_same_bits(wide_experts(ggml::TensorType::Q8_0));
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
    /// `cmd` in a process group of its own, which stays a group with a parent outside it
    /// (the test): a group that the kernel counts as orphaned (the test run's own shell
    /// gone) gets SIGHUP at the next exit of any of its members while one is stopped, and
    /// these tests stop workers on purpose.
    fn spawn(cmd: &mut Command) -> Running {
        use std::os::unix::process::CommandExt;
        let mut child = cmd.process_group(0).stderr(Stdio::piped()).spawn().expect("run dflash");
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
/// both run and decoding is under way, `hurt` is done to one worker. Each eval waits 10 ms
/// (the workers' `eval-delay-ms` test fault: the run lasts seconds, not the ~0.3 s it takes
/// on an idle machine), so the 300 ms wait lands mid-run. Returns that worker's pid, the
/// exit status, stderr and the logits file.
fn hurt_a_worker_mid_run(name: &str, extra: &[&str], hurt: nix::sys::signal::Signal) -> (i32, std::process::ExitStatus, String, PathBuf) {
    let out = tmp(&format!("{name}.npy"));
    let faults = tmp(&format!("{name}-faults"));
    std::fs::create_dir_all(&faults).expect("dir");
    std::fs::write(faults.join(expert_worker::faults::EVAL_DELAY_FILE), "10").expect("delay");
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
            .env(expert_worker::faults::TEST_FAULTS_ENV, &faults)
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
    assert_same_bits(&read_npy(&out), &base, base.len() / 64, "after a SIGKILL");
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
    assert_same_bits(&read_npy(&out), &base, base.len() / 64, "after a SIGSTOP");
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
    assert_same_bits(&read_npy(&out), &base, base.len() / 16, "after a slow load");
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
    assert_same_bits(&got, &base, base.len() / n, "profile from route stats");
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
/// copy of `--cold-offload-min` / `--cold-layers-in-graph` / `--cold-stream-min` cannot
/// follow: refused by name before loading; `--adaptive-from` without an adaptive placement
/// too.
#[test]
fn adaptive_refuses_a_fixed_cold_copy_and_adaptive_from_needs_adaptive() {
    let toks = tokens(8);
    for extra in [["--cold-offload-min", "4"], ["--cold-layers-in-graph", "--expert-workers=0"], ["--cold-stream-min", "64"]] {
        let mut args = vec!["--experts-hot", "adaptive:0.5"];
        args.extend(extra);
        let o = run_logits(&toks, 8, &tmp("never-adaptive.npy"), &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--experts-hot adaptive") && err.contains(extra[0]), "{err}");
    }
    let o = run_logits(&toks, 8, &tmp("never-adaptive.npy"), &["--experts-hot", "budget", "--expert-budget-mb", "1", "--adaptive-from", "x.json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--adaptive-from needs --experts-hot adaptive"), "{err}");
    assert!(!tmp("never-adaptive.npy").exists());
}
