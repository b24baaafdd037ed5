//! The DS4 forward pass against the transformers float32 references of the tiny fixtures
//! (tests/fixtures, made by tools/make_fixtures.py): full prefill, decode after a prefill,
//! uneven chunked prefill, and greedy continuation. Tolerance with every weight in F32:
//! max |Δlogit| ≤ 1e-3 · max |logit| at every position.
use std::path::PathBuf;

use graph::{Logits, Model, ModelOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

struct Reference {
    tokens: Vec<u32>,
    cols: Vec<usize>,
    /// [T, cols]
    sub: Vec<f32>,
    max_abs: Vec<f32>,
    argmax: Vec<usize>,
    logsumexp: Vec<f32>,
    greedy: Vec<u32>,
}

fn npz_array<T: npyz::Deserialize>(npz: &mut npyz::npz::NpzArchive<std::io::BufReader<std::fs::File>>, key: &str) -> Vec<T> {
    let arr = npz.by_name(key).expect("readable npz").unwrap_or_else(|| panic!("reference has no {key}"));
    arr.into_vec().expect("array of the expected dtype")
}

fn reference(name: &str) -> Reference {
    let mut npz = npyz::npz::NpzArchive::open(fixture(&format!("{name}.ref.npz"))).expect("reference npz (run ./scripts/setup.sh)");
    let ints = |npz: &mut _, k: &str| -> Vec<i32> { npz_array::<i32>(npz, k) };
    Reference {
        tokens: ints(&mut npz, "tokens").into_iter().map(|t| t as u32).collect(),
        cols: ints(&mut npz, "logits_cols").into_iter().map(|t| t as usize).collect(),
        sub: npz_array(&mut npz, "logits_sub"),
        max_abs: npz_array(&mut npz, "logits_max_abs"),
        argmax: ints(&mut npz, "logits_argmax").into_iter().map(|t| t as usize).collect(),
        logsumexp: npz_array(&mut npz, "logits_logsumexp"),
        greedy: ints(&mut npz, "greedy_tokens").into_iter().map(|t| t as u32).collect(),
    }
}

fn load(gguf: &str, ubatch: usize) -> Model {
    let mut opts = ModelOptions { ubatch, ..ModelOptions::default() };
    opts.read.progress = false;
    Model::load(fixture(gguf), opts).expect("fixture model loads")
}

fn logsumexp(row: &[f32]) -> f32 {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|&v| ((v - m) as f64).exp()).sum::<f64>().ln() as f32
}

/// Compare rows of logits (one per position, starting at `first`) with the reference.
fn check(r: &Reference, logits: &[f32], n_vocab: usize, first: usize, what: &str) {
    assert_eq!(logits.len() % n_vocab, 0);
    let mut worst = (0f32, 0usize);
    for (i, row) in logits.chunks_exact(n_vocab).enumerate() {
        let t = first + i;
        let tol = 1e-3 * r.max_abs[t];
        let k = r.cols.len();
        let sub = &r.sub[t * k..(t + 1) * k];
        let mut max_d = 0f32;
        for (j, &col) in r.cols.iter().enumerate() {
            let d = (row[col] - sub[j]).abs();
            assert!(d.is_finite(), "{what}: non-finite logit at position {t}, token {col}");
            max_d = max_d.max(d);
        }
        let max_abs = row.iter().map(|v| v.abs()).fold(0f32, f32::max);
        max_d = max_d.max((max_abs - r.max_abs[t]).abs());
        max_d = max_d.max((logsumexp(row) - r.logsumexp[t]).abs());
        let top = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        max_d = max_d.max(top - row[r.argmax[t]]);
        assert!(max_d <= tol, "{what}: position {t}: max |Δlogit| {max_d:.3e} > {tol:.3e} (1e-3 · max |logit|)");
        if max_d / r.max_abs[t] > worst.0 {
            worst = (max_d / r.max_abs[t], t);
        }
    }
    eprintln!("{what}: positions {first}..{}: worst relative |Δlogit| {:.2e} at {}", first + logits.len() / n_vocab, worst.0, worst.1);
}

fn full_prefill(name: &str, gguf: &str) {
    let r = reference(name);
    let mut m = load(gguf, 512);
    let mut seq = m.new_sequence(1024).expect("sequence");
    let logits = m.forward(&mut seq, &r.tokens, Logits::All).expect("forward");
    check(&r, &logits, m.n_vocab(), 0, &format!("{gguf} full prefill"));
}

/// A prefill of `p` tokens, then the rest one token at a time (the decode graph).
fn decode_after_prefill(name: &str, gguf: &str, p: usize) {
    let r = reference(name);
    let mut m = load(gguf, 64);
    let mut seq = m.new_sequence(r.tokens.len()).expect("sequence");
    let logits = m.forward(&mut seq, &r.tokens[..p], Logits::Last).expect("prefill");
    check(&r, &logits, m.n_vocab(), p - 1, &format!("{gguf} prefill {p}"));
    let mut all = Vec::new();
    let mut reused = 0;
    for &t in &r.tokens[p..] {
        all.extend(m.forward(&mut seq, &[t], Logits::Last).expect("decode step"));
        reused += m.timings().graphs_reused;
    }
    check(&r, &all, m.n_vocab(), p, &format!("{gguf} decode after {p}"));
    // The decode graph is rebuilt only when the compressed views grow.
    assert!(reused * 10 >= (r.tokens.len() - p) * 9, "decode graphs reused only {reused} times");
}

/// Uneven chunks, each its own forward call (state carried across calls).
fn chunked_prefill(name: &str, gguf: &str, chunks: &[usize]) {
    let r = reference(name);
    let mut m = load(gguf, 512);
    let mut seq = m.new_sequence(r.tokens.len()).expect("sequence");
    let mut p = 0;
    for &n in chunks.iter().cycle() {
        let n = n.min(r.tokens.len() - p);
        if n == 0 {
            break;
        }
        let logits = m.forward(&mut seq, &r.tokens[p..p + n], Logits::All).expect("chunk");
        check(&r, &logits, m.n_vocab(), p, &format!("{gguf} chunk {p}+{n}"));
        p += n;
    }
}

/// Greedy continuation of the whole reference sequence: the same 64 tokens.
fn greedy(name: &str, gguf: &str) {
    let r = reference(name);
    let mut m = load(gguf, 128);
    let mut seq = m.new_sequence(r.tokens.len() + r.greedy.len()).expect("sequence");
    let mut logits = m.forward(&mut seq, &r.tokens, Logits::Last).expect("prefill");
    let mut got = Vec::new();
    for _ in 0..r.greedy.len() {
        let next = logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
        got.push(next);
        logits = m.forward(&mut seq, &[next], Logits::Last).expect("decode");
    }
    assert_eq!(got, r.greedy, "{gguf}: greedy continuation differs from the reference");
}

#[test]
fn a_f32_decode_after_prefill() {
    decode_after_prefill("ds4-tiny-a", "ds4-tiny-a.f32.gguf", 150);
}

#[test]
fn b_f32_decode_after_prefill() {
    decode_after_prefill("ds4-tiny-b", "ds4-tiny-b.f32.gguf", 97);
}

#[test]
fn a_f32_chunked_prefill() {
    chunked_prefill("ds4-tiny-a", "ds4-tiny-a.f32.gguf", &[37, 50, 1, 128, 3, 1, 1, 60]);
}

#[test]
fn b_f32_chunked_prefill() {
    chunked_prefill("ds4-tiny-b", "ds4-tiny-b.f32.gguf", &[5, 1, 1, 17, 64, 2, 33]);
}

#[test]
fn a_f32_greedy_64() {
    greedy("ds4-tiny-a", "ds4-tiny-a.f32.gguf");
}

#[test]
fn b_f32_greedy_64() {
    greedy("ds4-tiny-b", "ds4-tiny-b.f32.gguf");
}

#[test]
fn a_f32_full_prefill() {
    full_prefill("ds4-tiny-a", "ds4-tiny-a.f32.gguf");
}

#[test]
fn b_f32_full_prefill() {
    full_prefill("ds4-tiny-b", "ds4-tiny-b.f32.gguf");
}
