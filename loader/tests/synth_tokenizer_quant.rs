//! Synthetic models with a real tokenizer (copied from the tiny DeepSeek V4 model) and with
//! quantized weights: the copied keys are exactly those gguf-py lists for that file, the
//! vocabulary follows the tokenizer, and Q8_0 weights dequantize (by ggml) to the values the
//! same seed writes as F32.
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ggml::TensorType;
use loader::synth::{tokenizer_keys, SynthModel, SynthSpec};
use loader::{LoadError, ModelFile, Value};

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn tiny_ds4() -> PathBuf {
    let p = repo("models/tiny-ds4.gguf");
    assert!(p.exists(), "{} missing: run ./scripts/setup.sh", p.display());
    p
}

/// `key -> (type, item count)` of every tokenizer.* key in gguf-py's listing of the fixture
/// (tests/fixtures/ds4-tiny-a.f32.gguf.txt; models/tiny-ds4.gguf is a byte copy of it).
fn gguf_py_tokenizer_keys() -> Vec<(String, String, Option<usize>)> {
    let txt = std::fs::read_to_string(repo("tests/fixtures/ds4-tiny-a.f32.gguf.txt")).unwrap();
    txt.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("tokenizer."))
        .map(|l| {
            let (key, rest) = l.split_once(' ').unwrap();
            let ty = rest.trim_start_matches('(').split(')').next().unwrap().to_string();
            let count = rest.split_once("= [").and_then(|(_, r)| r.split(" items").next()).and_then(|n| n.parse().ok());
            (key.to_string(), ty, count)
        })
        .collect()
}

#[test]
fn tokenizer_keys_match_gguf_py_listing() {
    let keys = tokenizer_keys(&tiny_ds4()).unwrap();
    let expected = gguf_py_tokenizer_keys();
    assert!(expected.len() >= 8, "listing parsed badly: {expected:?}");
    let mut ours: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    let mut theirs: Vec<&str> = expected.iter().map(|(k, _, _)| k.as_str()).collect();
    ours.sort_unstable();
    theirs.sort_unstable();
    assert_eq!(ours, theirs);
    for (key, ty, count) in &expected {
        let v = &keys.iter().find(|(k, _)| k == key).unwrap().1;
        let n = match v {
            Value::StrArray(a) => Some(a.len()),
            Value::IntArray { v, .. } => Some(v.len()),
            _ => None,
        };
        assert_eq!(n, *count, "{key}: item count");
        let kind = match v {
            Value::StrArray(_) => "ARRAY[STRING]",
            Value::IntArray { ty: "i32", .. } => "ARRAY[INT32]",
            Value::Str(_) => "STRING",
            Value::Int { ty: "u32", .. } => "UINT32",
            Value::Bool(_) => "BOOL",
            _ => "other",
        };
        assert_eq!(kind, ty, "{key}: type");
    }
}

#[test]
fn with_tokenizer_sizes_the_vocabulary_and_keeps_the_keys() {
    let keys = tokenizer_keys(&tiny_ds4()).unwrap();
    let n_tokens = match &keys.iter().find(|(k, _)| k == "tokenizer.ggml.tokens").unwrap().1 {
        Value::StrArray(t) => t.len(),
        other => panic!("tokens: {other:?}"),
    };
    let spec = SynthSpec { matrix_type: TensorType::Q8_0, ..SynthSpec::tiny() };
    let model = SynthModel::with_tokenizer(&spec, &keys).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tok.gguf");
    model.write(&path, false).unwrap();
    let m = ModelFile::open(&path).unwrap();
    assert_eq!(m.config.n_vocab, n_tokens);
    assert_eq!(m.tensors.get("token_embd.weight").unwrap().ne[1], n_tokens as u64);
    assert_eq!(m.tensors.get("output.weight").unwrap().ne[1], n_tokens as u64);
    assert_eq!(m.tensors.get("blk.0.ffn_gate_tid2eid.weight").unwrap().ne[1], n_tokens as u64);
    for (k, v) in &keys {
        assert_eq!(m.metadata.get(k), Some(v), "{k}");
    }
    // No synthetic tokenizer key survives next to the real ones.
    let n_tok_keys = m.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).count();
    assert_eq!(n_tok_keys, keys.len());

    // A tensor-less GGUF of just those keys (what write_synth --extract-tokenizer writes)
    // gives back the same keys.
    let only = dir.path().join("only.gguf");
    SynthModel { metadata: keys.clone(), tensors: Vec::new(), seed: 0, router_skew: None }.write(&only, false).unwrap();
    assert_eq!(tokenizer_keys(&only).unwrap(), keys);
}

#[test]
fn with_tokenizer_rejects_missing_or_mistyped_tokens() {
    let spec = SynthSpec::tiny();
    let err = SynthModel::with_tokenizer(&spec, &[("tokenizer.ggml.model".into(), Value::Str("gpt2".into()))]).unwrap_err();
    assert!(matches!(err, LoadError::MissingKey { ref key } if key == "tokenizer.ggml.tokens"), "{err}");
    let bad = [("tokenizer.ggml.tokens".to_string(), Value::Str("a".into()))];
    let err = SynthModel::with_tokenizer(&spec, &bad).unwrap_err();
    assert!(matches!(err, LoadError::KeyType { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.ggml.tokens") && err.to_string().contains("string"), "{err}");
    let empty = [("tokenizer.ggml.tokens".to_string(), Value::StrArray(Vec::new()))];
    assert!(SynthModel::with_tokenizer(&spec, &empty).is_err());
}

fn tensor_bytes(path: &Path, offset: u64, n: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = vec![0u8; n as usize];
    f.read_exact(&mut b).unwrap();
    b
}

#[test]
fn q8_0_weights_dequantize_to_the_f32_weights_of_the_same_seed() {
    let dir = tempfile::tempdir().unwrap();
    let write = |ty: TensorType, name: &str| {
        let p = dir.path().join(name);
        let spec = SynthSpec { matrix_type: ty, expert_type: ty, ..SynthSpec::tiny() };
        SynthModel::new(&spec).write(&p, true).unwrap();
        (ModelFile::open(&p).unwrap(), p)
    };
    let (f32m, f32p) = write(TensorType::F32, "f32.gguf");
    let (q8m, q8p) = write(TensorType::Q8_0, "q8.gguf");
    // SAFETY: ggml's static type-traits table; Q8_0 has a to_float function.
    let to_float = unsafe { (*ggml::sys::ggml_get_type_traits(TensorType::Q8_0.raw())).to_float }.unwrap();
    let mut checked = 0;
    for q in q8m.tensors.iter().filter(|t| t.ty == TensorType::Q8_0) {
        let f = f32m.tensors.get(&q.name).unwrap();
        assert_eq!(f.ty, TensorType::F32, "{}", q.name);
        let n = q.n_elements();
        let raw = tensor_bytes(&q8p, q.offset, q.nbytes);
        let mut deq = vec![0f32; n as usize];
        // SAFETY: `raw` holds n/32 Q8_0 blocks, `deq` n floats.
        unsafe { to_float(raw.as_ptr().cast(), deq.as_mut_ptr(), n as i64) };
        let reference: Vec<f32> = tensor_bytes(&f32p, f.offset, f.nbytes).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        // Q8_0: each value within half a step (max |block| / 127 / 2, plus the f16 rounding of the
        // step) of the original.
        let row = q.ne[0] as f32;
        let bound = 1.0 / row.sqrt();
        for (i, (d, r)) in deq.iter().zip(&reference).enumerate() {
            assert!(d.is_finite() && (d - r).abs() <= bound / 127.0 * 0.6 + 1e-6, "{} [{i}]: {d} vs {r}", q.name);
        }
        // Sane magnitudes: uniform in ±1/sqrt(row), so the mean square is 1/(3·row).
        let ms = reference.iter().map(|v| (v * v) as f64).sum::<f64>() / n as f64;
        let expect = 1.0 / (3.0 * row as f64);
        assert!((ms / expect - 1.0).abs() < 0.1, "{}: mean square {ms} vs {expect}", q.name);
        checked += 1;
    }
    assert!(checked > 20, "only {checked} Q8_0 tensors");
}

/// The medium spec keeps to what llama.cpp's deepseek4 code accepts (src/models/deepseek4.cpp,
/// src/llama-kv-cache.cpp of the pinned llama.cpp).
#[test]
fn medium_spec_stays_within_llama_cpp_limits() {
    let s = SynthSpec::medium();
    assert!(s.compress_ratios.iter().all(|r| [0, 4, 128].contains(r)), "{:?}", s.compress_ratios);
    assert_eq!(s.compress_ratios.len(), s.n_layer);
    assert_eq!(s.hc_count, 4);
    assert_eq!(s.n_expert_shared, 1);
    assert_eq!(s.indexer_dim % 64, 0);
    assert!(s.n_rot < s.indexer_dim && s.n_rot < s.head_dim);
    // Equal sizes make llama.cpp's KV-cache Hadamard setup divide by zero.
    assert_ne!(s.head_dim, s.indexer_dim);
    assert_eq!(s.n_head % s.o_groups, 0);
    assert_eq!((s.matrix_type, s.expert_type), (TensorType::Q8_0, TensorType::Q8_0));
    assert_eq!((s.n_embd, s.n_layer, s.n_expert, s.n_expert_used), (1024, 8, 64, 6));
}
