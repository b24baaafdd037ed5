//! Hot/cold expert placement in the graph: the cold experts go through the `ColdExperts`
//! seam (two custom ops around the hot compute). Here the cold executor is an independent
//! plain-Rust evaluation of the experts from the GGUF's F32 bytes, so every placement must
//! give the all-hot logits (max |Δ| ≤ 1e-5 · max |logit|), in prefill and decode.
use std::path::PathBuf;

use experts::{ExpertPairs, ExpertSet};
use graph::{ColdError, ColdExperts, ColdSplit, GraphError, Logits, Model, ModelOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// Experts evaluated in f64 from the file: gate/up [n_embd, ff, n_expert], down [ff, n_embd,
/// n_expert] (ggml order), SwiGLU with the layer's clamp.
struct RustExperts {
    n_embd: usize,
    ff: Vec<usize>,
    clamp: Vec<f32>,
    gate: Vec<Vec<f32>>,
    up: Vec<Vec<f32>>,
    down: Vec<Vec<f32>>,
    /// Layer, activations and per-token cold pairs of the request in flight.
    pending: Option<(usize, Vec<f32>, ExpertPairs)>,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RustExperts {
    fn load(path: &PathBuf, calls: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> RustExperts {
        let file = loader::ModelFile::open(path).expect("fixture");
        let bytes = std::fs::read(path).expect("read");
        let c = &file.config;
        let read = |name: String| -> Vec<f32> {
            let t = file.tensors.get(&name).expect("expert tensor");
            assert_eq!(t.ty.name(), "f32", "{name}");
            bytes[t.offset as usize..(t.offset + t.nbytes) as usize].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        };
        let layers = 0..c.n_layer;
        RustExperts {
            n_embd: c.n_embd,
            ff: c.n_ff_exp.clone(),
            clamp: c.swiglu_clamp_exp.clone(),
            gate: layers.clone().map(|l| read(format!("blk.{l}.ffn_gate_exps.weight"))).collect(),
            up: layers.clone().map(|l| read(format!("blk.{l}.ffn_up_exps.weight"))).collect(),
            down: layers.map(|l| read(format!("blk.{l}.ffn_down_exps.weight"))).collect(),
            pending: None,
            calls,
        }
    }
}

impl ColdExperts for RustExperts {
    fn begin(&mut self, layer: usize, n_embd: usize, x: &[f32], pairs: &ExpertPairs) -> Result<(), ColdError> {
        if n_embd != self.n_embd || self.pending.is_some() {
            return Err(ColdError::Compute { source: "unexpected begin".into() });
        }
        self.pending = Some((layer, x.to_vec(), pairs.clone()));
        Ok(())
    }

    fn end(&mut self, layer: usize, out: &mut [f32]) -> Result<(), ColdError> {
        let (l, x, pairs) = self.pending.take().ok_or(ColdError::OutOfOrder { layer, begun: None })?;
        if l != layer {
            return Err(ColdError::OutOfOrder { layer, begun: Some(l) });
        }
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (e, ff, c) = (self.n_embd, self.ff[l], self.clamp[l] as f64);
        let mut rows = out.chunks_exact_mut(e);
        for (t, ids) in pairs.tokens().enumerate() {
            let xt = &x[t * e..(t + 1) * e];
            for &ex in ids {
                let row = rows.next().ok_or(ColdError::Compute { source: "fewer output rows than pairs".into() })?;
                let base = ex as usize * ff * e;
                let mut h = vec![0f64; ff];
                for (f, hf) in h.iter_mut().enumerate() {
                    let row = base + f * e;
                    let g: f64 = (0..e).map(|i| self.gate[l][row + i] as f64 * xt[i] as f64).sum();
                    let u: f64 = (0..e).map(|i| self.up[l][row + i] as f64 * xt[i] as f64).sum();
                    let g = g.min(c);
                    *hf = g / (1.0 + (-g).exp()) * u.clamp(-c, c);
                }
                let dbase = ex as usize * e * ff;
                for (i, o) in row.iter_mut().enumerate() {
                    let drow = dbase + i * ff;
                    *o = (0..ff).map(|f| self.down[l][drow + f] as f64 * h[f]).sum::<f64>() as f32;
                }
            }
        }
        Ok(())
    }
}

fn logits(gguf: &str, hot: Option<ExpertSet>, tokens: &[u32], prefill: usize) -> (Vec<f32>, usize) {
    let path = fixture(gguf);
    let mut opts = ModelOptions { ubatch: 48, hot, ..ModelOptions::default() };
    opts.read.progress = false;
    let mut m = Model::load(&path, opts).expect("load");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if m.has_cold_experts() {
        m.set_cold_experts(Box::new(RustExperts::load(&path, calls.clone()))).expect("cold executor");
    }
    let mut seq = m.new_sequence(tokens.len()).expect("sequence");
    let mut out = m.forward(&mut seq, &tokens[..prefill], Logits::All).expect("prefill");
    for &t in &tokens[prefill..] {
        out.extend(m.forward(&mut seq, &[t], Logits::All).expect("decode"));
    }
    (out, calls.load(std::sync::atomic::Ordering::Relaxed))
}

#[path = "common/batching.rs"]
mod batching;

/// Sequences stepping together (`forward_batch`) with cold experts: the hand-over sees the
/// whole step's tokens, and each sequence's logits are still the bits it gets alone.
#[test]
fn batched_equals_alone_with_cold_experts() {
    let gguf = "ds4-tiny-b.f32.gguf";
    let path = fixture(gguf);
    let file = loader::ModelFile::open(&path).expect("fixture");
    let mut npz = npyz::npz::NpzArchive::open(fixture("ds4-tiny-b.ref.npz")).expect("reference");
    let stream: Vec<u32> = npz.by_name("tokens").expect("npz").expect("tokens").into_vec::<i32>().expect("i32").into_iter().map(|t| t as u32).collect();
    for (what, hot) in placements(file.config.n_layer, file.config.n_expert).into_iter().skip(1) {
        let mut opts = ModelOptions { hot: Some(hot), ..ModelOptions::default() };
        opts.read.progress = false;
        let mut m = Model::load(&path, opts).expect("load");
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        m.set_cold_experts(Box::new(RustExperts::load(&path, calls.clone()))).expect("cold executor");
        batching::check_batched_equals_alone(&mut m, &stream, &batching::schedule(), Logits::All, &format!("{gguf} {what}"));
        assert!(calls.load(std::sync::atomic::Ordering::Relaxed) > 0, "{what}: the cold executor was never called");
    }
}

fn placements(n_layer: usize, n_expert: usize) -> Vec<(&'static str, ExpertSet)> {
    let n = n_expert as u32;
    let pick = |f: &dyn Fn(usize, u32) -> bool| ExpertSet::from_fn(n_layer as u32, n, |l, e| f(l as usize, e));
    vec![
        ("all cold", pick(&|_, _| false)),
        ("uniform 50%", pick(&|_, e| e < n / 2)),
        // A profile-like placement: a different, uneven subset per layer, one layer all hot.
        ("profile", pick(&|l, e| l == 1 || (e * 7 + l as u32 * 3) % 5 < 2)),
    ]
}

fn check(name: &str, gguf: &str) {
    let file = loader::ModelFile::open(fixture(gguf)).expect("fixture");
    let c = file.config.clone();
    let mut npz = npyz::npz::NpzArchive::open(fixture(&format!("{name}.ref.npz"))).expect("reference");
    let tokens: Vec<u32> = npz.by_name("tokens").expect("npz").expect("tokens").into_vec::<i32>().expect("i32").into_iter().map(|t| t as u32).collect();
    let tokens = &tokens[..140];
    let (base, calls) = logits(gguf, None, tokens, 120);
    assert_eq!(calls, 0);
    let v = c.n_vocab;
    for (what, hot) in placements(c.n_layer, c.n_expert) {
        let (got, calls) = logits(gguf, Some(hot), tokens, 120);
        assert!(calls > 0, "{what}: the cold executor was never called");
        assert_rows_close(&got, &base, v, &format!("{gguf} {what}"));
        eprintln!("{gguf} {what}: equal to all-hot within 1e-5 over {} positions ({calls} cold evals)", tokens.len());
    }
}

#[test]
fn placements_equal_all_hot_fixture_a() {
    check("ds4-tiny-a", "ds4-tiny-a.f32.gguf");
}

#[test]
fn placements_equal_all_hot_fixture_b() {
    check("ds4-tiny-b", "ds4-tiny-b.f32.gguf");
}

#[test]
fn cold_experts_without_an_executor_is_an_error() {
    let mut opts = ModelOptions::default();
    opts.read.progress = false;
    let file = loader::ModelFile::open(fixture("ds4-tiny-b.f32.gguf")).expect("fixture");
    let k = file.config.n_expert_used as u32;
    let (n_layer, n_expert) = (file.config.n_layer as u32, file.config.n_expert as u32);
    opts.hot = Some(ExpertSet::from_fn(n_layer, n_expert, |_, e| e < k));
    let mut m = Model::load(fixture("ds4-tiny-b.f32.gguf"), opts).expect("load");
    let mut seq = m.new_sequence(8).expect("sequence");
    let err = m.forward(&mut seq, &[0, 1], Logits::Last).expect_err("no executor");
    assert!(err.to_string().contains("cold"), "{err}");
    let mut bad = ModelOptions::default();
    bad.read.progress = false;
    bad.hot = Some(ExpertSet::full(n_layer, n_expert + 1));
    let err = Model::load(fixture("ds4-tiny-b.f32.gguf"), bad).err().expect("a set for another expert count refused");
    assert!(err.to_string().contains(&format!("for {} experts per layer, the model has {n_expert}", n_expert + 1)), "{err}");
    let mut bad = ModelOptions::default();
    bad.read.progress = false;
    bad.hot = Some(ExpertSet::full(n_layer + 1, n_expert));
    let err = Model::load(fixture("ds4-tiny-b.f32.gguf"), bad).err().expect("a set for another layer count refused");
    assert!(err.to_string().contains(&format!("has {} layers, the model {n_layer}", n_layer + 1)), "{err}");
    let mut few = ModelOptions::default();
    few.read.progress = false;
    few.hot = Some(ExpertSet::from_fn(n_layer, n_expert, |_, e| e < k - 1));
    let err = Model::load(fixture("ds4-tiny-b.f32.gguf"), few).err().expect("fewer held experts than k refused");
    assert!(err.to_string().contains(&format!("holds {} experts", k - 1)), "{err}");
}

/// An executor whose workers fail: `begin` accepts, `end` reports a remote error.
struct FailingExperts;

impl ColdExperts for FailingExperts {
    fn begin(&mut self, _layer: usize, _n_embd: usize, _x: &[f32], _pairs: &ExpertPairs) -> Result<(), ColdError> {
        Ok(())
    }

    fn end(&mut self, _layer: usize, _out: &mut [f32]) -> Result<(), ColdError> {
        Err(ColdError::Remote { worker: 3, source: "expert 7 of layer 2 is not owned by this worker".into() })
    }
}

#[test]
fn executor_errors_cross_the_seam_typed() {
    let file = loader::ModelFile::open(fixture("ds4-tiny-b.f32.gguf")).expect("fixture");
    let (n_layer, n_expert) = (file.config.n_layer as u32, file.config.n_expert as u32);
    let mut opts = ModelOptions::default();
    opts.read.progress = false;
    // Layer 0 all hot, the others all cold: the first cold layer is 1.
    opts.hot = Some(ExpertSet::from_fn(n_layer, n_expert, |l, _| l == 0));
    let mut m = Model::load(fixture("ds4-tiny-b.f32.gguf"), opts).expect("load");
    m.set_cold_experts(Box::new(FailingExperts)).expect("cold executor");
    let mut seq = m.new_sequence(8).expect("sequence");
    let err = m.forward(&mut seq, &[0, 1], Logits::Last).expect_err("the executor fails");
    assert_eq!(
        err.to_string(),
        "cold experts of layer 1: expert worker 3 reported an error: expert 7 of layer 2 is not owned by this worker; the sequence must be reset"
    );
    assert!(matches!(err, GraphError::Cold { layer: 1, source: ColdError::Remote { worker: 3, .. } }), "{err:?}");
}

/// An executor that splits its layers over the graph's threads, whose part 1 fails (part 0
/// puts zero rows for the pairs it owns: the even ones).
struct FailingSplit(Option<FailingJob>);

struct FailingJob {
    n_pairs: usize,
    n_embd: usize,
}

impl ColdSplit for FailingJob {
    fn run(&self, part: usize, _parts: usize, put: &mut dyn FnMut(usize, &[f32])) -> Result<(), ColdError> {
        if part == 1 {
            return Err(ColdError::Compute { source: "part 1 of the layer could not be computed".into() });
        }
        let zeros = vec![0.0; self.n_embd];
        for p in (0..self.n_pairs).step_by(2) {
            put(p, &zeros);
        }
        Ok(())
    }
}

impl ColdExperts for FailingSplit {
    fn begin(&mut self, _layer: usize, n_embd: usize, _x: &[f32], pairs: &ExpertPairs) -> Result<(), ColdError> {
        self.0 = Some(FailingJob { n_pairs: pairs.n_pairs(), n_embd });
        Ok(())
    }

    fn end(&mut self, _layer: usize, _out: &mut [f32]) -> Result<(), ColdError> {
        Err(ColdError::Compute { source: "end is not called when the layer was split".into() })
    }

    fn split(&mut self) -> Option<std::sync::Arc<dyn ColdSplit>> {
        self.0.take().map(|j| std::sync::Arc::new(j) as std::sync::Arc<dyn ColdSplit>)
    }
}

/// With the model on the CPU the graph's threads share a split layer (`cold_end` runs on
/// each); a part that fails on any of them ends the step with its typed error.
#[test]
fn a_failing_part_of_a_split_layer_crosses_the_seam_typed() {
    let file = loader::ModelFile::open(fixture("ds4-tiny-b.f32.gguf")).expect("fixture");
    let (n_layer, n_expert) = (file.config.n_layer as u32, file.config.n_expert as u32);
    let mut opts = ModelOptions { threads: 2, ..ModelOptions::default() };
    opts.read.progress = false;
    opts.hot = Some(ExpertSet::from_fn(n_layer, n_expert, |l, _| l == 0));
    let mut m = Model::load(fixture("ds4-tiny-b.f32.gguf"), opts).expect("load");
    m.set_cold_experts(Box::new(FailingSplit(None))).expect("cold executor");
    let mut seq = m.new_sequence(8).expect("sequence");
    let err = m.forward(&mut seq, &[0, 1, 2, 3], Logits::Last).expect_err("part 1 fails");
    assert!(matches!(err, GraphError::Cold { layer: 1, source: ColdError::Compute { .. } }), "{err:?}");
    assert!(err.to_string().contains("part 1 of the layer could not be computed"), "{err}");
}

/// A model of fixture a holding `hot`, with the Rust cold executor (every expert) and,
/// when given, an adaptive swap policy.
fn model_a(hot: ExpertSet, adaptive: Option<graph::SwapPolicy>) -> Model {
    let path = fixture("ds4-tiny-a.f32.gguf");
    let mut opts = ModelOptions { ubatch: 48, hot: Some(hot), adaptive, ..ModelOptions::default() };
    opts.read.progress = false;
    let mut m = Model::load(&path, opts).expect("load");
    m.set_cold_experts(Box::new(RustExperts::load(&path, Default::default()))).expect("cold executor");
    m
}

/// Every row of `n_vocab` logits of `got` within 1e-5 · max |logit| of the same row of `want`
/// (the placements change only the order of sums), and as many rows.
fn assert_rows_close(got: &[f32], want: &[f32], n_vocab: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: logit count");
    for (t, (a, b)) in got.chunks_exact(n_vocab).zip(want.chunks_exact(n_vocab)).enumerate() {
        let max = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-5 * max, "{what}: row {t}: max |Δ| {d:.3e} > 1e-5 · {max:.3}");
    }
}

fn fixture_a_tokens(n: usize) -> Vec<u32> {
    let mut npz = npyz::npz::NpzArchive::open(fixture("ds4-tiny-a.ref.npz")).expect("reference");
    let tokens: Vec<i32> = npz.by_name("tokens").expect("npz").expect("tokens").into_vec().expect("i32");
    tokens[..n].iter().map(|&t| t as u32).collect()
}

/// Prefill `prefill` tokens, then decode the rest one by one, calling `between(model, i)`
/// before decode step i; every position's logits.
fn run_seq(m: &mut Model, tokens: &[u32], prefill: usize, mut between: impl FnMut(&mut Model, usize)) -> Vec<f32> {
    let mut seq = m.new_sequence(tokens.len()).expect("sequence");
    let mut out = m.forward(&mut seq, &tokens[..prefill], Logits::All).expect("prefill");
    for (i, &t) in tokens[prefill..].iter().enumerate() {
        between(m, i);
        out.extend(m.forward(&mut seq, &[t], Logits::All).expect("decode"));
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Per layer, the swaps (held expert out, cold expert in) from `uniform 8` used below.
const SWAPS: [(u32, u32); 3] = [(1, 9), (3, 12), (6, 15)];

#[test]
fn a_re_placement_gives_the_logits_of_the_new_placement_bitwise() {
    let file = loader::ModelFile::open(fixture("ds4-tiny-a.f32.gguf")).expect("fixture");
    let (n_layer, n_expert) = (file.config.n_layer as u32, file.config.n_expert as u32);
    let p0 = ExpertSet::from_fn(n_layer, n_expert, |_, e| e < 8);
    let p1 = ExpertSet::from_fn(n_layer, n_expert, |_, e| (e < 8 && ![1, 3, 6].contains(&e)) || [9, 12, 15].contains(&e));
    let tokens = fixture_a_tokens(40);
    let swap_all = |m: &mut Model, pairs: &[(u32, u32)]| {
        for l in 0..n_layer as usize {
            for &(out, incoming) in pairs {
                let bytes = m.swap_expert(l, out, incoming).expect("swap");
                assert!(bytes > 0);
            }
        }
    };

    // A model loaded with p1 against one loaded with p0 that swapped into p1 after a step
    // (its experts now in other slots than the sorted order a load gives them).
    let direct = run_seq(&mut model_a(p1.clone(), None), &tokens, 30, |_, _| {});
    let mut m = model_a(p0.clone(), None);
    let warm = run_seq(&mut m, &tokens[..4], 2, |_, _| {});
    assert!(!warm.is_empty());
    swap_all(&mut m, &SWAPS);
    assert_eq!(m.hot_experts(), &p1);
    assert_eq!(m.swap_totals().swaps, 3 * u64::from(n_layer));
    let swapped = run_seq(&mut m, &tokens, 30, |_, _| {});
    assert!(bits(&swapped) == bits(&direct), "after the swap the logits differ from a model loaded with the new placement");

    // Mid-sequence: p0 → p1 (a step of another sequence runs on it) → p0 again with the
    // experts in permuted slots; the sequence continues bitwise as without any swap.
    let plain = run_seq(&mut model_a(p0.clone(), None), &tokens, 30, |_, _| {});
    let back: Vec<(u32, u32)> = vec![(9, 3), (12, 6), (15, 1)];
    let moved = run_seq(&mut model_a(p0.clone(), None), &tokens, 30, |m, i| {
        if i == 4 {
            swap_all(m, &SWAPS);
            run_seq(m, &tokens[..3], 3, |_, _| {});
            swap_all(m, &back);
        }
    });
    assert!(bits(&moved) == bits(&plain), "a re-placement mid-sequence changed the logits");

    // A real change of the hot set mid-sequence: equal to all-hot within the placement bound.
    let v = file.config.n_vocab;
    let base = run_seq(&mut Model::load(fixture("ds4-tiny-a.f32.gguf"), ModelOptions { ubatch: 48, ..ModelOptions::default() }).expect("load"), &tokens, 30, |_, _| {});
    let changed = run_seq(&mut model_a(p0, None), &tokens, 30, |m, i| {
        if i == 4 {
            swap_all(m, &SWAPS);
        }
    });
    assert_rows_close(&changed, &base, v, "across the swap");

    // Bad swaps are refused by name and change nothing.
    let mut m = model_a(p1.clone(), None);
    for (out, incoming, want) in [(0, 2, "the first must be held and the second cold"), (1, 0, "the first must be held"), (0, 99, "outside the model")] {
        let e = m.swap_expert(3, out, incoming).expect_err("bad swap").to_string();
        assert!(e.contains(want), "{e}");
    }
    assert_eq!(m.hot_experts(), &p1);
}

#[test]
fn skewed_routing_drives_the_hot_set_to_the_routed_experts() {
    let file = loader::ModelFile::open(fixture("ds4-tiny-a.f32.gguf")).expect("fixture");
    let (n_layer, n_expert, k) = (file.config.n_layer as u32, file.config.n_expert as u32, file.config.n_expert_used);
    let p0 = ExpertSet::from_fn(n_layer, n_expert, |_, e| e < 8);
    // Skewed traffic: one token again and again routes to (nearly) the same experts.
    let mut tokens = fixture_a_tokens(8);
    tokens.extend(std::iter::repeat_n(tokens[7], 40));
    let policy = graph::SwapPolicy { decay: 0.9, margin: 0.25, min_gap: 2.0 };

    let mut fixed = model_a(p0.clone(), Some(policy));
    run_seq(&mut fixed, &tokens, 8, |m, i| {
        if i == 30 {
            m.take_expert_stats();
        }
    });
    let fixed_hit: Vec<f64> = fixed.take_expert_stats().expect("stats").iter().map(|s| s.hit_rate()).collect();

    let mut m = model_a(p0, Some(policy));
    let one = m.expert_bytes(0).expect("expert bytes");
    assert!((0..n_layer as usize).all(|l| m.expert_bytes(l).ok() == Some(one)));
    let mut per_call = Vec::new();
    run_seq(&mut m, &tokens, 8, |m, i| {
        // Two experts' bytes per step at most.
        let r = m.replace_experts(2 * one).expect("replace");
        assert!(r.swaps <= 2 && r.bytes <= 2 * one, "{r:?}");
        per_call.push(r.swaps);
        if i == 30 {
            m.take_expert_stats();
        }
    });
    let hit: Vec<f64> = m.take_expert_stats().expect("stats").iter().map(|s| s.hit_rate()).collect();
    assert!(m.swap_totals().swaps > 0, "no expert was swapped");
    assert_eq!(m.swap_totals().swaps, per_call.iter().sum::<u64>());
    // The last steps route (nearly) only to held experts, in every layer at least as often as
    // the fixed placement, which sends some of them cold.
    let mean = |h: &[f64]| h.iter().sum::<f64>() / h.len() as f64;
    eprintln!("hit rate per layer after warm-up: adaptive {hit:?}, fixed {fixed_hit:?}");
    assert!(hit.iter().zip(&fixed_hit).all(|(a, f)| *a >= 0.95 && a >= f), "adaptive {hit:?}, fixed {fixed_hit:?}");
    assert!(mean(&fixed_hit) < 0.9 && mean(&hit) > 0.99, "adaptive {hit:?}, fixed {fixed_hit:?}");
    // Converged: the last steps swapped nothing, and each layer holds its most routed ones.
    assert!(per_call[per_call.len() - 5..].iter().all(|&s| s == 0), "{per_call:?}");
    let counts = m.route_counts().expect("counts");
    for l in 0..n_layer {
        let mut ids: Vec<u32> = (0..n_expert).collect();
        ids.sort_by(|&a, &b| counts[l as usize][b as usize].cmp(&counts[l as usize][a as usize]).then(a.cmp(&b)));
        for &e in &ids[..k] {
            assert!(m.hot_experts().contains(l, e), "layer {l}: expert {e} ({} routed) is not held", counts[l as usize][e as usize]);
        }
    }
}

/// A layer with cold experts hands them to the executor, then the device computes the shared
/// expert (and the held experts) while the executor computes the cold ones: in the step
/// graph the shared expert runs between the hand-over and the wait.
#[test]
fn the_shared_expert_runs_while_the_cold_experts_do() {
    let file = loader::ModelFile::open(fixture("ds4-tiny-a.f32.gguf")).expect("fixture");
    let (n_layer, n_expert) = (file.config.n_layer as u32, file.config.n_expert as u32);
    let mut m = model_a(ExpertSet::from_fn(n_layer, n_expert, |_, e| e < 8), None);
    run_seq(&mut m, &fixture_a_tokens(6), 5, |_, _| {});
    let nodes = m.last_step_nodes();
    let at = |name: &str| nodes.iter().position(|n| n == name).unwrap_or_else(|| panic!("no node {name} in {nodes:?}"));
    for il in 0..n_layer {
        let (begin, shared, end) = (at(&format!("cold_begin-{il}")), at(&format!("shared_out-{il}")), at(&format!("cold_end-{il}")));
        assert!(begin < shared && shared < end, "layer {il}: hand-over {begin}, shared expert {shared}, wait {end}");
    }
}

/// The options of the PCIe split's tests: placement `hot`, the host copy on the CPU (all-cold
/// layers in the graph; partly held ones too from `cold_offload_min` tokens, 0: never), `slots`
/// router slots staged in steps of at most 4 tokens, micro-batches of 48.
fn split_options(hot: Option<ExpertSet>, cold_offload_min: usize, slots: usize) -> ModelOptions {
    ModelOptions {
        ubatch: 48,
        hot,
        cold_layers_in_graph: true,
        cold_offload_min,
        cold_host_on_cpu: true,
        cold_pcie_slots: slots,
        cold_pcie_max_tokens: 4,
        ..ModelOptions::default()
    }
}

/// Fixture `path` with `opts` (and, where partly held layers ask for one, an executor that
/// fails whenever called): sequence A prefills 40 of `tokens` and decodes 20 one by one,
/// B prefills 3, then one step decodes a token of each. Every logits row of A (and B's last),
/// the experts staged over PCIe, and the partly held layers' cold slots computed on the CPU.
fn split_run(path: &PathBuf, mut opts: ModelOptions, tokens: &[u32]) -> (Vec<f32>, Option<u64>, Option<u64>) {
    opts.read.progress = false;
    let mut m = Model::load(path, opts).expect("load");
    if m.needs_cold_executor() {
        m.set_cold_experts(Box::new(FailingExperts)).expect("cold executor");
    }
    let (mut a, mut b) = (m.new_sequence(tokens.len()).expect("sequence"), m.new_sequence(tokens.len()).expect("sequence"));
    let mut out = m.forward(&mut a, &tokens[..40], Logits::All).expect("prefill");
    assert_eq!(m.timings().split.layers, 0, "a prefill of more tokens than the split's is not split");
    for i in 40..60 {
        out.extend(m.forward(&mut a, &tokens[i..i + 1], Logits::All).expect("decode"));
        // `--timings`' cut of the step at the split's stops: every all-cold layer split, the
        // parts within the step's compute
        let t = m.timings();
        if m.experts_staged().is_some() {
            assert_eq!((t.split.steps, t.split.layers), (1, m.config.n_layer), "decode step {i}: steps and split layers");
            let parts = [t.split.to_router_s, t.split.plan_s, t.split.cpu_s, t.split.after_s];
            assert!(parts.iter().all(|&p| p >= 0.0) && parts.iter().sum::<f64>() <= t.compute_s, "decode step {i}: parts {parts:?} within {} s", t.compute_s);
        } else {
            assert_eq!(t.split.layers, 0, "no split set up, none timed");
        }
    }
    m.forward(&mut b, &tokens[..3], Logits::All).expect("second sequence");
    out.extend(m.forward_batch(&mut [(&mut a, &tokens[60..61]), (&mut b, &tokens[3..4])], Logits::All).expect("two sequences").concat());
    (out, m.experts_staged(), m.partial_slots_on_cpu())
}

/// Decode's router slots of all-cold layers split between the CPU and staged copies of their
/// experts (`pcie.rs`), run on a CPU (the copies go to a staging area in CPU memory; the
/// evaluation callback plans and queues them as on a GPU): for every K of the router's k the
/// logits are those of the same layers computed whole on the CPU (`K = 0`) and all-hot,
/// within 1e-5 · max |logit| (only the order of the sum changes), on the F32 and MXFP4
/// fixtures, through prefill (not split: more tokens than `cold_pcie_max_tokens`), decode and
/// a step of two sequences (experts of two tokens staged).
#[test]
fn decode_slots_split_between_the_cpu_and_staged_copies_keep_the_logits() {
    let tokens = fixture_a_tokens(64);
    for gguf in ["ds4-tiny-a.f32.gguf", "ds4-tiny-a.mxfp4.gguf"] {
        let path = fixture(gguf);
        let c = loader::ModelFile::open(&path).expect("fixture").config;
        let run = |hot: Option<ExpertSet>, slots: usize| split_run(&path, split_options(hot, 0, slots), &tokens);
        let none = ExpertSet::from_fn(c.n_layer as u32, c.n_expert as u32, |_, _| false);
        let (hot, staged, _) = run(None, 0);
        assert_eq!(staged, None);
        let (cpu, staged, _) = run(Some(none.clone()), 0);
        assert_eq!(staged, None);
        let close = |a: &[f32], b: &[f32], what: &str| assert_rows_close(a, b, c.n_vocab, &format!("{gguf} {what}"));
        close(&cpu, &hot, "all cold in the graph against all hot");
        for slots in 1..=c.n_expert_used {
            let (split, staged, _) = run(Some(none.clone()), slots);
            let staged = staged.expect("the split is set up");
            // every decode step of every layer stages at least one expert
            assert!(staged >= (21 * c.n_layer) as u64, "{gguf} K = {slots}: {staged} experts staged");
            close(&split, &cpu, &format!("K = {slots} against the CPU's"));
            // the CPU slots' MXFP4 products through dflash's kernel (the default) give ggml's bits
            let mut opts = split_options(Some(none.clone()), 0, slots);
            opts.cold_cpu_ggml_kernel = true;
            let (ggml_kernel, _, _) = split_run(&path, opts, &tokens);
            assert!(split.iter().zip(&ggml_kernel).all(|(a, b)| a.to_bits() == b.to_bits()), "{gguf} K = {slots}: the CPU slots' kernel changed the bits");
            eprintln!("{gguf}: K = {slots} of {}: {staged} experts staged, the CPU path's logits within 1e-5", c.n_expert_used);
        }
    }
}

/// The cold experts' host copy computed in the step graph (`offload.rs`: layers whose experts
/// are all cold by the router's ids, partly held layers by their held and cold local ids and
/// masked weights), run on a CPU (`cold_host_on_cpu`), at every micro-batch size
/// (`cold_offload_min` 1): every placement gives the all-hot logits within 1e-5 · max |logit|
/// through prefill and decode; layers with fewer cold experts than k keep the executor.
#[test]
fn cold_experts_computed_in_the_graph_from_their_host_copy_give_the_all_hot_logits() {
    let tokens = fixture_a_tokens(60);
    let path = fixture("ds4-tiny-a.f32.gguf");
    let c = loader::ModelFile::open(&path).expect("fixture").config;
    let run = |hot: Option<ExpertSet>, in_graph: bool| -> Vec<f32> {
        let mut opts = ModelOptions { ubatch: 48, hot, ..ModelOptions::default() };
        if in_graph {
            (opts.cold_layers_in_graph, opts.cold_offload_min, opts.cold_host_on_cpu) = (true, 1, true);
        }
        opts.read.progress = false;
        let mut m = Model::load(&path, opts).expect("load");
        if m.needs_cold_executor() {
            m.set_cold_experts(Box::new(RustExperts::load(&path, Default::default()))).expect("cold executor");
        }
        run_seq(&mut m, &tokens, 40, |_, _| {})
    };
    let hot = run(None, false);
    for (what, set) in placements(c.n_layer, c.n_expert) {
        let got = run(Some(set), true);
        assert_rows_close(&got, &hot, c.n_vocab, what);
    }
}

/// Decode of partly held layers with their cold slots staged (`pcie.rs`: every cold slot's
/// expert copied into the staging area, the held ones computed over their local ids), run on
/// a CPU: with K = k (every cold slot staged) the logits of the same layers computed in the
/// graph from the host copy (`cold_offload_min` 1, the same products over the same bytes),
/// bit for bit, on the F32 and MXFP4 fixtures, with experts staged at every decode step.
/// So does K < k without `cold_pcie_partial_cpu`. With it, on the MXFP4 fixture the CPU
/// computes the last cold slots of each token from the host copy (dflash's kernel, whose
/// empty slots pad the CPU's ids): the same logits within 1e-5 · max |logit| (the CPU's share
/// is summed apart), and the CPU's share taken. The F32 fixture, which dflash's kernel does
/// not compute, keeps staging every cold slot.
#[test]
fn partly_held_layers_with_staged_cold_slots_give_the_in_graph_bits() {
    let tokens = fixture_a_tokens(64);
    for gguf in ["ds4-tiny-a.f32.gguf", "ds4-tiny-a.mxfp4.gguf"] {
        let path = fixture(gguf);
        let c = loader::ModelFile::open(&path).expect("fixture").config;
        let half = ExpertSet::from_fn(c.n_layer as u32, c.n_expert as u32, |_, e| e < c.n_expert as u32 / 2);
        let run = |slots: usize, partial_cpu: bool| split_run(&path, ModelOptions { cold_pcie_partial_cpu: partial_cpu, ..split_options(Some(half.clone()), 1, slots) }, &tokens);
        let (in_graph, _, _) = run(0, false);
        let (staged, n, on_cpu) = run(c.n_expert_used, true);
        let n = n.expect("the split is set up");
        assert_eq!(on_cpu, Some(0), "{gguf}: K = k stages every cold slot");
        assert!(n >= (21 * c.n_layer) as u64, "{gguf}: {n} experts staged");
        assert_eq!(in_graph.len(), staged.len());
        let differ = in_graph.iter().zip(&staged).position(|(x, y)| x.to_bits() != y.to_bits());
        assert_eq!(differ, None, "{gguf}: staged cold slots give other logits (first difference at element {differ:?})");
        eprintln!("{gguf}: K = k: {n} experts staged, the in-graph bits");
        // without the CPU's share (the default) every cold slot is staged whatever K is
        let (all, _, on_cpu) = run(c.n_expert_used / 2, false);
        assert_eq!(on_cpu, Some(0), "{gguf}: no CPU share unless asked");
        assert!(all.iter().zip(&in_graph).all(|(x, y)| x.to_bits() == y.to_bits()), "{gguf}: K = k / 2 staging every cold slot keeps the bits");
        let (shared, n, on_cpu) = run(c.n_expert_used / 2, true);
        let on_cpu = on_cpu.expect("the split is set up");
        if gguf.contains("mxfp4") {
            assert!(on_cpu >= c.n_layer as u64, "{gguf}: K = k / 2: {on_cpu} cold slots on the CPU");
            assert_rows_close(&shared, &in_graph, c.n_vocab, &format!("{gguf}: K = k / 2 against the in-graph path"));
        } else {
            assert_eq!(on_cpu, 0, "{gguf}: dflash's kernel computes MXFP4 experts only");
            assert!(shared.iter().zip(&in_graph).all(|(x, y)| x.to_bits() == y.to_bits()), "{gguf}: K = k / 2 without a CPU share keeps the bits");
        }
        eprintln!("{gguf}: K = k / 2: {n:?} experts staged, {on_cpu} cold slots on the CPU, the in-graph logits within 1e-5");
    }
}

/// More router slots over PCIe than a token's k, or none of its micro-batches allowed to
/// split, are refused when the model loads, by name.
#[test]
fn pcie_slots_beyond_k_or_no_split_size_are_refused() {
    let path = fixture("ds4-tiny-a.f32.gguf");
    let k = loader::ModelFile::open(&path).expect("fixture").config.n_expert_used;
    for (slots, max, want) in [(k + 1, 8, format!("{} router slots over PCIe is more than the {k} experts", k + 1)), (2, 0, "cold_pcie_max_tokens 0".to_string())] {
        let mut opts = ModelOptions { cold_pcie_slots: slots, cold_pcie_max_tokens: max, ..ModelOptions::default() };
        opts.read.progress = false;
        let err = Model::load(&path, opts).err().expect("refused");
        assert!(err.to_string().contains(&want), "{err}");
    }
}
