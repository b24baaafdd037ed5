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

fn open_spec(spec: &SynthSpec) -> ModelFile {
    let case = write(&SynthModel::new(spec));
    ModelFile::open(&case.path).unwrap_or_else(|e| panic!("{spec:?}: {e}"))
}

fn spec_err(spec: &SynthSpec) -> String {
    open_err(&write(&SynthModel::new(spec))).1
}

/// Relations transformers and llama.cpp accept (and the graph computes correctly) are not
/// refused: an indexer key longer than the attention head (64 / 32 and 128 / 64, as the
/// transformers fixture ds4-tiny-c), more hash layers than layers, a head count that is not
/// a multiple of the output groups (only head_count × key_length must split evenly).
#[test]
fn valid_relations_are_accepted() {
    let mut s = SynthSpec::tiny();
    s.head_dim = 32;
    s.n_rot = 8;
    s.indexer_dim = 64;
    let c = open_spec(&s).config;
    assert_eq!((c.head_dim, c.indexer_dim), (32, 64));
    s.head_dim = 64;
    s.indexer_dim = 128;
    let c = open_spec(&s).config;
    assert_eq!((c.head_dim, c.indexer_dim), (64, 128));

    let mut s = SynthSpec::tiny();
    s.n_hash_layers = s.n_layer + 2;
    let c = open_spec(&s).config;
    assert!((0..c.n_layer).all(|l| c.is_hash_layer(l)));

    // 6 heads of 64 in 4 groups of 96 (1.5 heads each).
    let mut s = SynthSpec::tiny();
    s.n_head = 6;
    s.o_groups = 4;
    let c = open_spec(&s).config;
    assert_eq!((c.n_head, c.o_groups), (6, 4));
}

/// Keys the model does not use are not cross-checked: `vocab_size` (llama.cpp reads it only
/// for files without a tokenizer; the embedding's rows are the vocabulary) and
/// `embedding_length_out` (llama.cpp derives it as embedding_length × hc).
#[test]
fn unused_keys_are_not_cross_checked() {
    for (k, v) in [("deepseek4.vocab_size", 513), ("deepseek4.vocab_size", 512), ("deepseek4.embedding_length_out", 7)] {
        let mut m = tiny();
        m.set(k, Value::Int { v, ty: "u32" });
        let f = ModelFile::open(&write(&m).path).unwrap_or_else(|e| panic!("{k} = {v}: {e}"));
        assert_eq!((f.config.n_vocab, f.config.n_tokens), (512, 512));
    }
}

/// The relations the math needs are refused with the key, the bound and the value.
#[test]
fn relations_the_graph_needs_are_refused() {
    // The indexer's RoPE covers its trailing n_rot dims.
    let mut s = SynthSpec::tiny();
    s.indexer_dim = 8;
    let msg = spec_err(&s);
    assert!(msg.contains("deepseek4.attention.indexer.key_length") && msg.contains("≥ rope.dimension_count (16)") && msg.contains('8'), "{msg}");
    // RoPE rotates pairs of the head's trailing dims.
    for n_rot in [15, 66] {
        let mut m = tiny();
        m.set("deepseek4.rope.dimension_count", Value::Int { v: n_rot, ty: "u32" });
        let (_, msg) = open_err(&write(&m));
        assert!(msg.contains("deepseek4.rope.dimension_count") && msg.contains("even number ≤ key_length (64)") && msg.contains(&n_rot.to_string()), "{msg}");
    }
    // The output groups split head_count × key_length = 256 evenly.
    let mut m = tiny();
    m.set("deepseek4.attention.output_group_count", Value::Int { v: 3, ty: "u32" });
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("deepseek4.attention.output_group_count") && msg.contains("256") && msg.contains('3'), "{msg}");
    // k of n experts.
    let mut m = tiny();
    m.set("deepseek4.expert_used_count", Value::Int { v: 9, ty: "u32" });
    let (_, msg) = open_err(&write(&m));
    assert!(msg.contains("deepseek4.expert_used_count") && msg.contains("≤ expert_count (8)") && msg.contains('9'), "{msg}");
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
