//! Worker compute time per layer for a batch of tokens (each with `n_expert_used` random
//! owned experts), in process and through ipc-proto (worker in a thread, socket pair, shared
//! memory): the IPC overhead is the round trip minus the worker-reported compute.
//!
//! cargo run --release -p expert-worker --example bench_worker -- MODEL [--experts SPEC]
//!     [--threads T] [--tokens N] [--iters I]

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use expert_worker::{model_identity, serve, ExpertWorker};
use experts::ExpertPairs;
use ipc_proto::{ConnectOptions, Limits, WorkerConnection, WorkerServer};
use loader::ModelFile;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn median_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[((v.len() as f64 - 1.0) * 0.99).round() as usize])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().ok_or("usage: bench_worker MODEL [--experts SPEC] [--threads T] [--tokens N] [--iters I]")?.clone();
    let spec = arg(&args, "--experts").unwrap_or_else(|| "all".into());
    let threads: usize = arg(&args, "--threads").map(|s| s.parse()).transpose()?.unwrap_or(2);
    let n_tokens: usize = arg(&args, "--tokens").map(|s| s.parse()).transpose()?.unwrap_or(1);
    let iters: usize = arg(&args, "--iters").map(|s| s.parse()).transpose()?.unwrap_or(300);

    let mf = ModelFile::open(&model)?;
    let c = &mf.config;
    let (n_layer, n_expert, k, e) = (c.n_layer as u32, c.n_expert as u32, c.n_expert_used, c.n_embd);
    let map = expert_worker::experts::parse_spec(&spec, n_layer, n_expert)?;
    let mut worker = ExpertWorker::load(&mf, &map, threads)?;
    println!(
        "model {model}: n_embd {e}, n_ff {}, {n_expert} experts top-{k}, expert type {}; worker holds {} experts ({:.1} MiB), {threads} threads, {n_tokens} token(s) x {k} experts",
        c.n_ff_exp[0],
        mf.tensors.get("blk.0.ffn_down_exps.weight").map(|t| t.ty.to_string()).unwrap_or_default(),
        map.len(),
        worker.weight_bytes() as f64 / (1 << 20) as f64
    );
    // Deterministic pseudo-random choice of k owned experts per token per iteration.
    let mut seed = 0x1234_5678_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let x: Vec<f32> = (0..n_tokens * e).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let mut pick = |layer: u32| -> ExpertPairs {
        let owned = map.layer(layer);
        let mut ids = Vec::new();
        for _ in 0..n_tokens {
            let mut pool = owned.to_vec();
            let mut t = Vec::new();
            for _ in 0..k.min(pool.len()) {
                t.push(pool.swap_remove((next() % pool.len() as u64) as usize));
            }
            ids.push(t);
        }
        ExpertPairs::from_tokens(&ids.iter().map(Vec::as_slice).collect::<Vec<_>>())
    };
    let layers: Vec<u32> = (0..n_layer).filter(|&l| !map.layer(l).is_empty()).collect();
    let mut out = Vec::new();
    // Warm-up: build every graph.
    for &l in &layers {
        let pairs = pick(l);
        out.resize(pairs.n_pairs() * e, 0.0);
        worker.eval(l, &x, &pairs, &mut out)?;
    }
    let mut times = Vec::new();
    for it in 0..iters {
        let l = layers[it % layers.len()];
        let pairs = pick(l);
        out.resize(pairs.n_pairs() * e, 0.0);
        let t0 = Instant::now();
        worker.eval(l, &x, &pairs, &mut out)?;
        times.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let (m, p) = median_p99(times);
    println!("in process: per layer eval median {m:.1} us, p99 {p:.1} us");

    // Through ipc-proto: the same worker in a thread behind a socket pair.
    let identity = model_identity(&mf)?;
    let (dsock, wsock) = UnixStream::pair()?;
    let set = map.clone();
    let server = std::thread::spawn(move || -> Result<(), expert_worker::WorkerError> {
        let mut s = WorkerServer::handshake(wsock, &identity, set, &ConnectOptions::default())?;
        serve(&mut s, &mut worker)
    });
    let limits = Limits { max_tokens: n_tokens as u32, n_embd: e as u32, max_experts_per_token: k as u32 };
    let mut conn = WorkerConnection::handshake(dsock, limits, &identity, &ConnectOptions::default())?;
    for (spin_us, label) in [(0u64, "blocking wait"), (50, "spin 50 us then block")] {
        conn.set_spin(Duration::from_micros(spin_us));
        let (mut rt, mut overhead) = (Vec::new(), Vec::new());
        for it in 0..iters + layers.len() {
            let l = layers[it % layers.len()];
            let pairs = pick(l);
            out.resize(pairs.n_pairs() * e, 0.0);
            let t0 = Instant::now();
            conn.write_inputs(&x)?;
            let rid = conn.eval_begin(l, &pairs)?;
            let r = conn.eval_end(rid, Instant::now() + Duration::from_secs(30))?;
            conn.read_outputs(&mut out)?;
            let us = t0.elapsed().as_secs_f64() * 1e6;
            if it >= layers.len() {
                rt.push(us);
                overhead.push(us - r.compute_us as f64);
            }
        }
        let (m, p) = median_p99(rt);
        let (om, op) = median_p99(overhead);
        println!("over ipc ({label}): round trip median {m:.1} us, p99 {p:.1} us; overhead (round trip - worker compute) median {om:.1} us, p99 {op:.1} us");
    }
    conn.shutdown(Instant::now() + Duration::from_secs(5))?;
    server.join().map_err(|_| "worker thread panicked")??;
    Ok(())
}
