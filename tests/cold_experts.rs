//! Hot/cold expert placement in the graph: the cold experts go through the `ColdExperts`
//! seam (two custom ops around the hot compute). Here the cold executor is an independent
//! plain-Rust evaluation of the experts from the GGUF's F32 bytes, so every placement must
//! give the all-hot logits (max |Δ| ≤ 1e-5 · max |logit|), in prefill and decode.
use std::path::PathBuf;

use experts::{ExpertPairs, ExpertSet};
use graph::{ColdError, ColdExperts, GraphError, Logits, Model, ModelOptions};

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
        for (t, (a, b)) in got.chunks_exact(v).zip(base.chunks_exact(v)).enumerate() {
            let max = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-5 * max, "{gguf} {what}: position {t}: max |Δ| {d:.3e} > 1e-5 · {max:.3}");
        }
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
