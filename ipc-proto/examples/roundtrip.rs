//! IPC round trip of one token's activations (n_embd 4096 f32 = 16 KiB in):
//! (a) socket only — the activations travel inside the frames (a Ping carrying them, echoed in
//! the Pong; 16 KiB out); (b) shared memory — an Eval frame carries only the token's 6 expert
//! ids, the worker reads the input row from the shared region and writes one output row per
//! expert there (6 × 16 KiB out).
//! The worker runs in another thread and in another process (this binary, spawned with
//! `--worker`, the socket as its stdin); with blocking waits and with spin-then-block.
//!
//! cargo run --release -p ipc-proto --example roundtrip -- [--iters N] [--spin-us S]

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use experts::{ExpertPairs, ExpertSet};
use ipc_proto::{
    ConnectOptions, Limits, ModelIdentity, Request, WorkerConnection, WorkerServer,
};

const N_EMBD: u32 = 4096;
const IDS: [u32; 6] = [3, 17, 42, 99, 180, 255];

fn identity() -> ModelIdentity {
    ModelIdentity { file_size: 1 << 40, header_hash: [0x5a; 32], n_layer: 43, n_expert: 256, n_embd: N_EMBD }
}

fn limits() -> Limits {
    Limits { max_tokens: 1, n_embd: N_EMBD, max_experts_per_token: 8 }
}

fn opts(spin: Duration) -> ConnectOptions {
    ConnectOptions { spin, ..ConnectOptions::default() }
}

/// The worker: expert `e` maps the input to `(e + 1) * input` (one output row per pair) for
/// evals, echo for pings.
fn serve(sock: UnixStream, spin: Duration) -> anyhow::Result<()> {
    let experts = ExpertSet::full(43, 256);
    let mut server = WorkerServer::handshake(sock, &identity(), experts, &opts(spin))?;
    let (mut input, mut rows) = (Vec::new(), Vec::new());
    loop {
        match server.next_request()? {
            Request::Eval(req) => {
                let n = N_EMBD as usize;
                input.resize(req.n_tokens() * n, 0.0);
                server.read_inputs(&mut input)?;
                rows.resize(req.pairs.n_pairs() * n, 0.0);
                for (&e, row) in req.pairs.ids().iter().zip(rows.chunks_exact_mut(n)) {
                    for (o, i) in row.iter_mut().zip(&input) {
                        *o = i * (e + 1) as f32;
                    }
                }
                server.write_outputs(&rows)?;
                server.reply_eval(req.id, 0)?;
            }
            Request::Ping { id, payload } => server.reply_pong(id, &payload)?,
            Request::Stats { id } => {
                let c = server.counters();
                server.reply_stats(id, &c)?
            }
            Request::Shutdown { .. } => return Ok(()),
        }
    }
}

struct Summary {
    median: f64,
    p99: f64,
    mean: f64,
}

fn summarize(mut us: Vec<f64>) -> Summary {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() as f64 - 1.0) * q).round() as usize];
    Summary { median: at(0.5), p99: at(0.99), mean: us.iter().sum::<f64>() / us.len() as f64 }
}

fn bench_socket(conn: &mut WorkerConnection, iters: usize) -> anyhow::Result<Summary> {
    let n = N_EMBD as usize;
    let mut bytes = vec![0u8; n * 4];
    let mut times = Vec::with_capacity(iters);
    for it in 0..iters + 1000 {
        let t0 = Instant::now();
        for (j, c) in bytes.chunks_exact_mut(4).enumerate() {
            c.copy_from_slice(&((it + j) as f32).to_le_bytes());
        }
        conn.ping_with(&bytes, Instant::now() + Duration::from_secs(5))?;
        if it >= 1000 {
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(summarize(times))
}

fn bench_shm(conn: &mut WorkerConnection, iters: usize) -> anyhow::Result<Summary> {
    let pairs = ExpertPairs::from_tokens(&[&IDS]);
    let n = N_EMBD as usize;
    let mut times = Vec::with_capacity(iters);
    let (mut x, mut out) = (vec![0f32; n], vec![0f32; IDS.len() * n]);
    for it in 0..iters + 1000 {
        let t0 = Instant::now();
        for (j, v) in x.iter_mut().enumerate() {
            *v = (it + j) as f32;
        }
        conn.write_inputs(&x)?;
        let id = conn.eval_begin(7, &pairs)?;
        conn.eval_end(id, Instant::now() + Duration::from_secs(5))?;
        conn.read_outputs(&mut out)?;
        for (p, &e) in IDS.iter().enumerate() {
            let want = it as f32 * (e + 1) as f32;
            anyhow::ensure!(out[p * n] == want, "output row {p}: {} expected {want}", out[p * n]);
        }
        if it >= 1000 {
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(summarize(times))
}

fn run(peer: &str, spin: Duration, iters: usize) -> anyhow::Result<()> {
    let (a, b) = UnixStream::pair()?;
    let mut child = None;
    let mut thread = None;
    if peer == "process" {
        let exe = std::env::current_exe()?;
        child = Some(
            Command::new(exe)
                .args(["--worker", &spin.as_micros().to_string()])
                .stdin(Stdio::from(OwnedFd::from(b)))
                .spawn()?,
        );
    } else {
        thread = Some(std::thread::spawn(move || serve(b, spin)));
    }
    let mut conn = WorkerConnection::handshake(a, limits(), &identity(), &opts(spin))?;
    let sock = bench_socket(&mut conn, iters)?;
    let shm = bench_shm(&mut conn, iters)?;
    conn.shutdown(Instant::now() + Duration::from_secs(5))?;
    if let Some(mut c) = child {
        c.wait()?;
    }
    if let Some(t) = thread {
        t.join().map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
    }
    let spin_s = if spin.is_zero() { "block".to_string() } else { format!("spin {}us", spin.as_micros()) };
    for (path, s) in [("socket-only", sock), ("shm", shm)] {
        println!(
            "{peer:<8} {spin_s:<11} {path:<12} median {:>7.1} us  p99 {:>7.1} us  mean {:>7.1} us",
            s.median, s.p99, s.mean
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        let spin_us: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(0);
        let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
        return serve(UnixStream::from(fd), Duration::from_micros(spin_us));
    }
    let mut iters = 100_000usize;
    let mut spins = vec![0u64, 10];
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--iters" => iters = args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--iters N"))?.parse()?,
            "--spin-us" => spins = vec![args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--spin-us S"))?.parse()?],
            other => anyhow::bail!("unknown argument {other}"),
        }
        i += 2;
    }
    println!("{iters} iterations, n_embd {N_EMBD} (16 KiB in, 16 KiB out), 1 token, {} pairs", IDS.len());
    for peer in ["thread", "process"] {
        for &s in &spins {
            run(peer, Duration::from_micros(s), iters)?;
        }
    }
    Ok(())
}
