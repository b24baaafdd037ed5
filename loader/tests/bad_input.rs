//! Every kind of malformed model file is refused with an error that names the problem
//! (key or tensor, expected vs found); none panics or aborts inside ggml.
use std::path::PathBuf;

use loader::synth::{SynthModel, SynthSpec};
use loader::{LoadError, ModelFile, Value};

struct Case {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write(model: &SynthModel) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    model.write(&path, false).unwrap();
    Case { _dir: dir, path }
}

fn tiny() -> SynthModel {
    SynthModel::new(&SynthSpec::tiny())
}

fn open_err(case: &Case) -> (LoadError, String) {
    match ModelFile::open(&case.path) {
        Ok(_) => panic!("the malformed file was accepted"),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

fn bytes(case: &Case) -> Vec<u8> {
    std::fs::read(&case.path).unwrap()
}

fn put(case: &Case, b: &[u8]) {
    std::fs::write(&case.path, b).unwrap();
}

/// Byte offset of a tensor-info record's name (after its u64 length).
fn find_tensor_info(b: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    b.windows(needle.len()).position(|w| w == needle.as_slice()).expect("tensor info present") + 8
}

#[test]
fn valid_file_opens() {
    let case = write(&tiny());
    ModelFile::open(&case.path).unwrap();
}

#[test]
fn truncated_header() {
    let case = write(&tiny());
    let b = bytes(&case);
    put(&case, &b[..200]);
    let (e, msg) = open_err(&case);
    assert!(matches!(e, LoadError::Gguf { .. }), "{msg}");
    assert!(msg.contains("failed to read"), "{msg}");
}

#[test]
fn empty_file() {
    let case = write(&tiny());
    put(&case, &[]);
    let (e, msg) = open_err(&case);
    assert!(matches!(e, LoadError::Gguf { .. }), "{msg}");
}

#[test]
fn wrong_magic() {
    let case = write(&tiny());
    let mut b = bytes(&case);
    b[..4].copy_from_slice(b"GGML");
    put(&case, &b);
    let (_, msg) = open_err(&case);
    assert!(msg.contains("magic") && msg.contains("GGML") && msg.contains("GGUF"), "{msg}");
}

#[test]
fn unsupported_version() {
    for version in [1u32, 4, 0] {
        let case = write(&tiny());
        let mut b = bytes(&case);
        b[4..8].copy_from_slice(&version.to_le_bytes());
        put(&case, &b);
        let (_, msg) = open_err(&case);
        assert!(msg.to_lowercase().contains("version"), "version {version}: {msg}");
    }
}

#[test]
fn tensor_data_past_eof() {
    let case = write(&tiny());
    let b = bytes(&case);
    put(&case, &b[..b.len() - 1000]);
    let (e, msg) = open_err(&case);
    match e {
        LoadError::TensorOutOfFile { name, end, file_len, .. } => {
            assert_eq!(name, "output.weight");
            assert!(end > file_len);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(msg.contains("output.weight") && msg.contains("outside the file"), "{msg}");
}

#[test]
fn offset_plus_size_overflow() {
    let case = write(&tiny());
    let mut b = bytes(&case);
    // output.weight: name, n_dims (u32) = 2, ne (2 × i64), type (u32), offset (u64).
    let name = "output.weight";
    let at = find_tensor_info(&b, name) + name.len() + 4 + 2 * 8 + 4;
    b[at..at + 8].copy_from_slice(&(u64::MAX - 64).to_le_bytes());
    put(&case, &b);
    let (_, msg) = open_err(&case);
    assert!(msg.contains(name) && msg.contains("offset"), "{msg}");
}

#[test]
fn duplicate_tensor_name() {
    let case = write(&tiny());
    let mut b = bytes(&case);
    // Rename blk.1.attn_norm.weight to blk.0.attn_norm.weight.
    let at = find_tensor_info(&b, "blk.1.attn_norm.weight");
    b[at + 4] = b'0';
    put(&case, &b);
    let (_, msg) = open_err(&case);
    assert!(msg.contains("duplicate tensor name") && msg.contains("blk.0.attn_norm.weight"), "{msg}");
}

#[test]
fn wrong_architecture() {
    let mut m = tiny();
    m.set("general.architecture", Value::Str("llama".into()));
    let (e, msg) = open_err(&write(&m));
    assert!(matches!(e, LoadError::WrongArchitecture { ref found } if found == "llama"), "{msg}");
    assert!(msg.contains("deepseek4"), "{msg}");
}

#[test]
fn missing_required_key() {
    let mut m = tiny();
    m.remove("deepseek4.attention.q_lora_rank");
    let (e, msg) = open_err(&write(&m));
    assert!(matches!(e, LoadError::MissingKey { ref key } if key == "deepseek4.attention.q_lora_rank"), "{msg}");
}

#[test]
fn key_with_wrong_type() {
    let mut m = tiny();
    m.set("deepseek4.expert_count", Value::Str("eight".into()));
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("deepseek4.expert_count") && msg.contains("string") && msg.contains("integer"), "{msg}");

    let mut m = tiny();
    m.set("deepseek4.rope.freq_base", Value::Int { v: 10000, ty: "u32" });
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("deepseek4.rope.freq_base") && msg.contains("u32") && msg.contains("float"), "{msg}");
}

#[test]
fn vocab_size_disagrees_with_token_count() {
    let mut m = tiny();
    m.set("deepseek4.vocab_size", Value::Int { v: 513, ty: "u32" });
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("deepseek4.vocab_size") && msg.contains("512") && msg.contains("513"), "{msg}");
    // Present and equal: accepted.
    let mut m = tiny();
    m.set("deepseek4.vocab_size", Value::Int { v: 512, ty: "u64" });
    ModelFile::open(&write(&m).path).unwrap();
}

#[test]
fn more_tokens_than_embedding_rows() {
    let mut m = tiny();
    m.set("tokenizer.ggml.tokens", Value::StrArray((0..600).map(|i| format!("<t{i}>")).collect()));
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("600") && msg.contains("512") && msg.contains("token_embd.weight"), "{msg}");
}

#[test]
fn compress_ratios_shorter_than_block_count() {
    let mut m = tiny();
    m.set("deepseek4.attention.compress_ratios", Value::IntArray { v: vec![0, 0, 4], ty: "u32" });
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("compress_ratios") && msg.contains("4 entries") && msg.contains("3 entries"), "{msg}");
}

#[test]
fn tensor_with_wrong_shape() {
    let mut m = tiny();
    m.tensor_mut("blk.1.attn_q_b.weight").unwrap().shape = vec![32, 255];
    let (e, _) = open_err(&write(&m));
    match e {
        LoadError::TensorShape { name, expected, found } => {
            assert_eq!(name, "blk.1.attn_q_b.weight");
            assert_eq!(expected, vec![32, 256]);
            assert_eq!(found, vec![32, 255]);
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn tensor_with_wrong_type() {
    let mut m = tiny();
    m.tensor_mut("blk.2.attn_sinks.weight").unwrap().ty = ggml::TensorType::F16;
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("blk.2.attn_sinks.weight") && msg.contains("f16") && msg.contains("F32"), "{msg}");
    let mut m = tiny();
    m.tensor_mut("blk.0.ffn_gate_tid2eid.weight").unwrap().ty = ggml::TensorType::F32;
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("blk.0.ffn_gate_tid2eid.weight") && msg.contains("I32"), "{msg}");
}

#[test]
fn missing_tensor() {
    let mut m = tiny();
    m.remove_tensor("blk.2.indexer.proj.weight");
    let (e, _) = open_err(&write(&m));
    assert!(matches!(e, LoadError::MissingTensor { ref name } if name == "blk.2.indexer.proj.weight"));
}

#[test]
fn every_integer_width_is_accepted() {
    let mut m = tiny();
    m.set("deepseek4.block_count", Value::Int { v: 4, ty: "u64" });
    m.set("deepseek4.expert_count", Value::Int { v: 8, ty: "i32" });
    m.set("deepseek4.attention.sliding_window", Value::Int { v: 8, ty: "u16" });
    m.set("deepseek4.rope.scaling.original_context_length", Value::Int { v: 65536, ty: "u64" });
    m.set("deepseek4.attention.compress_ratios", Value::IntArray { v: vec![0, 0, 4, 128], ty: "u32" });
    let file = ModelFile::open(&write(&m).path).unwrap();
    assert_eq!(file.config.n_expert, 8);
    assert_eq!(file.config.yarn.unwrap().original_context, 65536);
    // A negative count is a value error, not a wrap-around.
    let mut m = tiny();
    m.set("deepseek4.expert_count", Value::Int { v: -8, ty: "i32" });
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("deepseek4.expert_count") && msg.contains("-8"), "{msg}");
}

#[test]
fn unsupported_gating_function() {
    let mut m = tiny();
    m.set("deepseek4.expert_gating_func", Value::Int { v: 2, ty: "u32" });
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("expert_gating_func") && msg.contains("sqrt-softplus") && msg.contains('2'), "{msg}");
}

#[test]
fn parse_bytes_rejects_garbage_without_panicking() {
    let case = write(&tiny());
    let b = bytes(&case);
    // Every prefix length of the header region and a few corrupted bytes.
    for cut in (0..b.len().min(4096)).step_by(97) {
        let _ = loader::parse_bytes(&b[..cut]);
    }
    let mut c = b.clone();
    for i in (8..c.len().min(8192)).step_by(131) {
        c[i] ^= 0xa5;
        let _ = loader::parse_bytes(&c);
    }
}
