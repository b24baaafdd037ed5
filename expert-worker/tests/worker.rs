//! The worker's expert compute against an independent reference (plain Rust loops over the
//! raw F32 expert weights read from the GGUF), in process and through a real socket.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use expert_worker::experts::parse_spec;
use expert_worker::{model_identity, serve, ExpertWorker, WorkerError};
use experts::{ExpertPairs, ExpertSet};
use ipc_proto::{ConnectOptions, Limits, ProtoError, WorkerConnection, WorkerServer};
use loader::ModelFile;
use rand::{Rng as _, SeedableRng as _};
// SplitMix64: a small deterministic generator for test data.
use rand_xoshiro::SplitMix64 as Rng;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

const A: &str = "ds4-tiny-a.f32.gguf";
const B: &str = "ds4-tiny-b.f32.gguf";

/// The raw F32 values of expert `e` of an expert tensor {in, out, n_expert}, read from the
/// file at the table's offset: `out` rows of `in` values.
fn raw_expert(mf: &ModelFile, name: &str, e: u32) -> (Vec<f32>, usize, usize) {
    let t = mf.tensors.get(name).unwrap();
    assert_eq!(t.ty, ggml::TensorType::F32, "{name}");
    let (nin, nout) = (t.ne[0] as usize, t.ne[1] as usize);
    let mut bytes = vec![0u8; nin * nout * 4];
    let f = File::open(&mf.path).unwrap();
    f.read_exact_at(&mut bytes, t.offset + e as u64 * (nin * nout * 4) as u64).unwrap();
    (bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(), nin, nout)
}

fn matvec(w: &[f32], nin: usize, nout: usize, x: &[f32]) -> Vec<f32> {
    (0..nout).map(|j| (0..nin).map(|i| f64::from(w[j * nin + i]) * f64::from(x[i])).sum::<f64>() as f32).collect()
}

/// down(silu(min(gate x, c)) · clamp(up x, −c, c)) of expert `e`, in f64 where it matters.
fn reference(mf: &ModelFile, layer: u32, x: &[f32], e: u32) -> Vec<f32> {
    let c = mf.config.swiglu_clamp_exp[layer as usize];
    let (g, nin, ff) = raw_expert(mf, &format!("blk.{layer}.ffn_gate_exps.weight"), e);
    let (u, _, _) = raw_expert(mf, &format!("blk.{layer}.ffn_up_exps.weight"), e);
    let (d, dff, nout) = raw_expert(mf, &format!("blk.{layer}.ffn_down_exps.weight"), e);
    assert_eq!((dff, nout), (ff, nin));
    let (g, u) = (matvec(&g, nin, ff, x), matvec(&u, nin, ff, x));
    let h: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| {
            let (g, u) = if c > 0.0 { (g.min(c), u.clamp(-c, c)) } else { (g, u) };
            let g = f64::from(g);
            (g / (1.0 + (-g).exp()) * f64::from(u)) as f32
        })
        .collect();
    matvec(&d, ff, nout, &h)
}

/// max |a − b| / max |b| over one token's row.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// A random owned subset per layer (at least 2 experts each).
fn random_map(rng: &mut Rng, n_layer: u32, n_expert: u32) -> ExpertSet {
    let layers = (0..n_layer)
        .map(|_| {
            let mut ids: Vec<u32> = (0..n_expert).filter(|_| rng.random_range(0..2) == 0).collect();
            for e in [rng.random_range(0..n_expert as u64) as u32, rng.random_range(0..n_expert as u64) as u32] {
                if !ids.contains(&e) {
                    ids.push(e);
                }
            }
            ids
        })
        .collect();
    ExpertSet::from_layers(n_expert, layers).unwrap()
}

struct Batch {
    x: Vec<f32>,
    ids: Vec<Vec<u32>>,
}

impl Batch {
    fn pairs(&self) -> ExpertPairs {
        ExpertPairs::from_tokens(&self.ids.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }
}

/// `n` tokens; token 1 has no pairs, the others 1..=k distinct owned experts. Token 0's
/// inputs are large enough (±300) for the SwiGLU clamp to act.
fn random_batch(rng: &mut Rng, owned: &[u32], n: usize, k: usize, n_embd: usize) -> Batch {
    let x = (0..n * n_embd).map(|i| if i < n_embd { 300.0 } else { 2.0 } * rng.random_range(-1.0f32..1.0)).collect();
    let mut ids = Vec::new();
    for t in 0..n {
        let want = if t == 1 { 0 } else { 1 + rng.random_range(0..k.min(owned.len()) as u64) as usize };
        let mut pool = owned.to_vec();
        let mut ti = Vec::new();
        for _ in 0..want {
            ti.push(pool.swap_remove(rng.random_range(0..pool.len() as u64) as usize));
        }
        ids.push(ti);
    }
    Batch { x, ids }
}

/// Row `p` of `got` is pair `p`'s expert on its token's input.
fn check_batch(mf: &ModelFile, layer: u32, b: &Batch, got: &[f32]) {
    let e = mf.config.n_embd;
    assert_eq!(got.len(), b.pairs().n_pairs() * e);
    let mut rows = got.chunks_exact(e);
    for (t, ids) in b.ids.iter().enumerate() {
        for (&ex, row) in ids.iter().zip(rows.by_ref()) {
            let want = reference(mf, layer, &b.x[t * e..(t + 1) * e], ex);
            let d = rel_diff(row, &want);
            assert!(d <= 1e-5, "layer {layer} token {t} expert {ex}: max relative difference {d}");
            assert!(want.iter().any(|&v| v != 0.0));
        }
    }
}

#[test]
fn eval_matches_reference_on_both_fixtures() {
    for (name, seed) in [(A, 1u64), (B, 2)] {
        let mf = ModelFile::open(fixture(name)).unwrap();
        let c = &mf.config;
        let mut rng = Rng::seed_from_u64(seed);
        let map = random_map(&mut rng, c.n_layer as u32, c.n_expert as u32);
        let w = ExpertWorker::load(&mf, &map, 2).unwrap();
        let mut per_expert = 0;
        for l in 0..c.n_layer as u32 {
            let t = mf.tensors.get(&format!("blk.{l}.ffn_down_exps.weight")).unwrap();
            per_expert += map.layer(l).len() as u64 * 3 * t.slice_bytes(2);
        }
        assert_eq!(w.weight_bytes(), per_expert, "{name}: only the owned slices are loaded");
        for l in 0..c.n_layer as u32 {
            for (n, k) in [(1usize, 1usize), (5, c.n_expert_used), (3, 6)] {
                let b = random_batch(&mut rng, map.layer(l), n, k, c.n_embd);
                let mut out = vec![f32::NAN; b.pairs().n_pairs() * c.n_embd];
                w.eval(l, &b.x, &b.pairs(), &mut out).unwrap();
                check_batch(&mf, l, &b, &out);
            }
        }
        // The same shapes again reuse the cached graphs.
        let built = w.cached_graphs();
        let b = random_batch(&mut rng, map.layer(0), 1, 1, c.n_embd);
        let mut out = vec![0.0; c.n_embd];
        w.eval(0, &b.x, &b.pairs(), &mut out).unwrap();
        check_batch(&mf, 0, &b, &out);
        assert_eq!(w.cached_graphs(), built);
    }
}

/// `eval_part` from several threads at once (as the graph's team calls it) puts every pair's
/// row exactly once, with the bits of one `eval` of all the pairs, for any number of parts.
#[test]
fn parts_on_several_threads_give_the_bits_of_one_eval() {
    let mf = ModelFile::open(fixture(B)).unwrap();
    let c = &mf.config;
    let mut rng = Rng::seed_from_u64(7);
    let map = ExpertSet::full(c.n_layer as u32, c.n_expert as u32);
    let w = ExpertWorker::load(&mf, &map, 1).unwrap();
    for l in [0, c.n_layer as u32 - 1] {
        for (n, k) in [(1usize, c.n_expert_used), (9, c.n_expert_used), (4, 2)] {
            let b = random_batch(&mut rng, map.layer(l), n, k, c.n_embd);
            let pairs = b.pairs();
            let mut whole = vec![f32::NAN; pairs.n_pairs() * c.n_embd];
            w.eval(l, &b.x, &pairs, &mut whole).unwrap();
            for parts in [1, 2, 3, 7] {
                let rows: Vec<std::sync::Mutex<Vec<Vec<f32>>>> = (0..pairs.n_pairs()).map(|_| Default::default()).collect();
                let split = expert_worker::compute::PairSplit::new(pairs.ids(), parts);
                std::thread::scope(|s| {
                    for part in 0..parts {
                        let (w, b, pairs, rows, split) = (&w, &b, &pairs, &rows, &split);
                        s.spawn(move || w.eval_part(l, &b.x, pairs, split, part, &mut |p, row| rows[p].lock().unwrap().push(row.to_vec())).unwrap());
                    }
                });
                for (p, got) in rows.iter().enumerate() {
                    let got = got.lock().unwrap();
                    assert_eq!(got.len(), 1, "layer {l}, {n} tokens, {parts} parts: pair {p} put {} times", got.len());
                    let want = &whole[p * c.n_embd..(p + 1) * c.n_embd];
                    assert!(
                        got[0].iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "layer {l}, {n} tokens, {parts} parts: pair {p} differs from eval"
                    );
                }
            }
        }
    }
}

#[test]
fn split_pairs_gives_each_expert_one_part_and_balances_them() {
    use expert_worker::compute::split_pairs;
    // decode: 6 distinct experts over 4 parts -> 2, 2, 1, 1
    let owner = split_pairs(&[9, 3, 200, 17, 5, 64], 4);
    let mut per_part = [0; 4];
    owner.iter().for_each(|&p| per_part[p] += 1);
    assert_eq!(per_part, [2, 2, 1, 1], "{owner:?}");
    // a batch: every pair of one expert in the same part; the heavy expert alone
    let ids = [1, 2, 1, 3, 1, 1, 2, 4, 1, 1, 1, 1];
    let owner = split_pairs(&ids, 2);
    for (i, &e) in ids.iter().enumerate() {
        let first = ids.iter().position(|&x| x == e).unwrap();
        assert_eq!(owner[i], owner[first], "expert {e} split over parts: {owner:?}");
    }
    assert!(ids.iter().zip(&owner).all(|(&e, &p)| (e == 1) == (p == owner[0])), "expert 1 (8 rows) alone in its part: {owner:?}");
    // a split made for other pairs is refused by eval_part, not indexed out of range
    let mf = ModelFile::open(fixture(B)).unwrap();
    let c = &mf.config;
    let w = ExpertWorker::load(&mf, &ExpertSet::full(c.n_layer as u32, c.n_expert as u32), 1).unwrap();
    let pairs = ExpertPairs::from_tokens(&[&[1, 2]]);
    let other = expert_worker::compute::PairSplit::new(&[1, 2, 3], 2);
    let e = w.eval_part(0, &vec![0.5; c.n_embd], &pairs, &other, 0, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, WorkerError::Mismatch { expected: 2, found: 3, .. }), "{e}");
    // deterministic, and parts ≤ 1 means one part
    assert_eq!(split_pairs(&ids, 2), owner);
    assert!(split_pairs(&ids, 0).iter().all(|&p| p == 0));
    assert!(split_pairs(&[], 3).is_empty());
}

#[test]
fn eval_refuses_bad_requests() {
    let mf = ModelFile::open(fixture(A)).unwrap();
    let map = parse_spec("0:1,2;5:3", 6, 16).unwrap();
    let w = ExpertWorker::load(&mf, &map, 1).unwrap();
    let x = vec![0.5; 64];
    let mut out = vec![0.0; 64];
    let one = |ids: &'static [u32]| ExpertPairs::from_tokens(&[ids]);
    let e = w.eval(0, &x, &one(&[3]), &mut out).unwrap_err();
    assert!(matches!(e, WorkerError::NotOwned { layer: 0, expert: 3 }), "{e}");
    let e = w.eval(1, &x, &one(&[1]), &mut out).unwrap_err();
    assert!(matches!(e, WorkerError::NotOwned { layer: 1, expert: 1 }), "{e}");
    let e = w.eval(6, &x, &one(&[1]), &mut out).unwrap_err();
    assert!(matches!(e, WorkerError::LayerOutOfRange { layer: 6, n_layer: 6 }), "{e}");
    let e = w.eval(0, &x, &one(&[16]), &mut out).unwrap_err();
    assert!(matches!(e, WorkerError::ExpertOutOfRange { expert: 16, .. }), "{e}");
    let e = w.eval(0, &x[..63], &one(&[1]), &mut out).unwrap_err();
    assert!(matches!(e, WorkerError::BufferLength { what: "input rows", expected: 64, found: 63 }), "{e}");
    // One output row per pair: two pairs need 128 values.
    let e = w.eval(0, &x, &one(&[1, 2]), &mut out).unwrap_err();
    assert!(matches!(e, WorkerError::BufferLength { what: "output rows", expected: 128, found: 64 }), "{e}");
    w.eval(5, &x, &one(&[3]), &mut out).unwrap();
    assert!(out.iter().any(|&v| v != 0.0));
}

#[test]
fn identity_tells_the_fixtures_apart() {
    let a = ModelFile::open(fixture(A)).unwrap();
    let b = ModelFile::open(fixture(B)).unwrap();
    let (ia, ib) = (model_identity(&a).unwrap(), model_identity(&b).unwrap());
    assert_eq!(ia, model_identity(&a).unwrap());
    assert_ne!(ia.header_hash, ib.header_hash);
    assert_eq!(ia.file_size, std::fs::metadata(fixture(A)).unwrap().len());
    assert_eq!((ia.n_layer, ia.n_expert, ia.n_embd), (6, 16, 64));
}

fn limits(mf: &ModelFile) -> Limits {
    Limits { max_tokens: 8, n_embd: mf.config.n_embd as u32, max_experts_per_token: mf.config.n_expert_used as u32 }
}

#[test]
fn serves_evals_over_a_socket_pair() {
    let mf = ModelFile::open(fixture(A)).unwrap();
    let identity = model_identity(&mf).unwrap();
    let map = parse_spec("0-7", 6, 16).unwrap();
    let (daemon_sock, worker_sock) = UnixStream::pair().unwrap();
    let worker_map = map.clone();
    let worker = std::thread::spawn(move || -> Result<(), WorkerError> {
        let mf = ModelFile::open(fixture(A)).unwrap();
        let mut w = ExpertWorker::load(&mf, &worker_map, 1)?;
        let mut server = WorkerServer::handshake(worker_sock, &identity, worker_map.clone(), &ConnectOptions::default())?;
        serve(&mut server, &mut w)
    });
    let mut conn = WorkerConnection::handshake(daemon_sock, limits(&mf), &identity, &ConnectOptions::default()).unwrap();
    assert_eq!(conn.experts().layer(3), (0..8).collect::<Vec<_>>());
    let mut rng = Rng::seed_from_u64(7);
    for (l, n) in [(0u32, 1usize), (3, 4), (5, 8)] {
        let b = random_batch(&mut rng, map.layer(l), n, 4, 64);
        conn.write_inputs(&b.x).unwrap();
        let id = conn.eval_begin(l, &b.pairs()).unwrap();
        let r = conn.eval_end(id, Instant::now() + Duration::from_secs(10)).unwrap();
        assert_eq!(r.n_pairs as usize, b.pairs().n_pairs());
        let mut out = vec![f32::NAN; r.n_pairs as usize * 64];
        conn.read_outputs(&mut out).unwrap();
        check_batch(&mf, l, &b, &out);
    }
    let stats = conn.stats(Instant::now() + Duration::from_secs(5)).unwrap();
    assert_eq!(stats.evals, 3);
    assert_eq!(stats.tokens, 13);
    conn.shutdown(Instant::now() + Duration::from_secs(5)).unwrap();
    worker.join().unwrap().unwrap();
}

#[test]
fn worker_of_another_model_is_refused_at_handshake() {
    let a = ModelFile::open(fixture(A)).unwrap();
    let b = ModelFile::open(fixture(B)).unwrap();
    let (ia, ib) = (model_identity(&a).unwrap(), model_identity(&b).unwrap());
    let (daemon_sock, worker_sock) = UnixStream::pair().unwrap();
    let set = ExpertSet::full(b.config.n_layer as u32, b.config.n_expert as u32);
    let worker = std::thread::spawn(move || WorkerServer::handshake(worker_sock, &ib, set, &ConnectOptions::default()).map(|_| ()));
    let e = WorkerConnection::handshake(daemon_sock, limits(&a), &ia, &ConnectOptions::default()).err().unwrap();
    assert!(matches!(e, ProtoError::IdentityMismatch { .. }), "{e}");
    assert!(e.to_string().contains("worker serves another model"), "{e}");
    let we = worker.join().unwrap().unwrap_err();
    assert!(we.to_string().contains("identity mismatch"), "worker side: {we}");
}

#[test]
fn model_shape_and_cold_split_of_a_fixture() {
    let mf = ModelFile::open(fixture(A)).unwrap();
    let shape = placement::ModelShape { n_expert: 16, expert_bytes: expert_worker::expert_bytes_per_layer(&mf).unwrap() };
    // gate + up [64, 32] and down [32, 64] of F32 per expert.
    assert_eq!(shape.expert_bytes, vec![3 * 64 * 32 * 4; 6]);
    let p = placement::ExpertPlacement::uniform(&shape, 8).unwrap();
    let parts = placement::split_cold(&p.cold(), &shape, 2).unwrap();
    assert_eq!(parts[0].layer(0), &[8, 10, 12, 14]);
    assert_eq!(parts[1].layer(5), &[9, 11, 13, 15]);
    // Two workers holding the two halves of the cold experts compute, between them, the rows
    // one worker holding all of them computes, bit for bit.
    let whole = ExpertWorker::load(&mf, &p.cold(), 1).unwrap();
    let w0 = ExpertWorker::load(&mf, &parts[0], 1).unwrap();
    let w1 = ExpertWorker::load(&mf, &parts[1], 1).unwrap();
    let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut o = vec![0.0; 3 * 64];
    whole.eval(3, &x, &ExpertPairs::from_tokens(&[&[8, 9, 14]]), &mut o).unwrap();
    let (mut o0, mut o1) = (vec![0.0; 2 * 64], vec![0.0; 64]);
    w0.eval(3, &x, &ExpertPairs::from_tokens(&[&[8, 14]]), &mut o0).unwrap();
    w1.eval(3, &x, &ExpertPairs::from_tokens(&[&[9]]), &mut o1).unwrap();
    assert_eq!(o[..64], o0[..64], "expert 8");
    assert_eq!(o[64..128], o1[..], "expert 9");
    assert_eq!(o[128..], o0[64..], "expert 14");
}

/// The load reports: a first one of nothing loaded, bytes that only grow, each layer with
/// experts done once in order, and the last report all of the owned slices (the bytes the
/// worker then holds).
#[test]
fn load_reports_progress_layer_by_layer() {
    let mf = ModelFile::open(fixture(A)).unwrap();
    let map = parse_spec("0:1,2;2-3:0-15;5:7", 6, 16).unwrap();
    let mut steps = Vec::new();
    let w = ExpertWorker::load_reporting(&mf, &map, 2, &mut |s| steps.push(s)).unwrap();
    let expert = 3 * 64 * 32 * 4;
    let total = map.len() as u64 * expert;
    assert_eq!(w.weight_bytes(), total);
    assert_eq!(steps.first().map(|s| (s.loaded, s.layer_done)), Some((0, None)), "{steps:?}");
    assert!(steps.iter().all(|s| s.total == total), "{steps:?}");
    assert!(steps.windows(2).all(|p| p[0].loaded <= p[1].loaded), "{steps:?}");
    let done: Vec<(u32, u64)> = steps.iter().filter_map(|s| s.layer_done.map(|l| (l, s.loaded))).collect();
    assert_eq!(done, vec![(0, 2 * expert), (2, 18 * expert), (3, 34 * expert), (5, total)]);
}
