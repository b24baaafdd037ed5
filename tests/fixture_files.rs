//! The fixture GGUFs written by llama.cpp's own converter (tools/make_fixtures.py) open in
//! dflash, their config equals the transformers config they were made from, and whole and
//! expert-subset loads agree byte for byte.
use std::path::PathBuf;

use loader::{ModelFile, ReadOptions, TensorRequest};

fn fixture(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    assert!(p.exists(), "{} is missing: run ./scripts/setup.sh (it unpacks the .zst files)", p.display());
    p
}

fn hf_config(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["config"].clone()
}

fn check_config(gguf: &str, json: &str) -> ModelFile {
    let m = ModelFile::open(fixture(gguf)).unwrap_or_else(|e| panic!("{gguf}: {e}"));
    let hf = hf_config(json);
    let c = &m.config;
    let u = |k: &str| hf[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
    assert_eq!(c.n_embd, u("hidden_size"));
    assert_eq!(c.n_layer, u("num_hidden_layers"));
    assert_eq!(c.n_head, u("num_attention_heads"));
    assert_eq!(c.head_dim, u("head_dim"));
    assert_eq!(c.n_rot, u("qk_rope_head_dim"));
    assert_eq!(c.q_lora_rank, u("q_lora_rank"));
    assert_eq!(c.o_groups, u("o_groups"));
    assert_eq!(c.o_lora_rank, u("o_lora_rank"));
    assert_eq!(c.n_expert, u("n_routed_experts"));
    assert_eq!(c.n_expert_used, u("num_experts_per_tok"));
    assert_eq!(c.n_expert_shared, u("n_shared_experts"));
    assert_eq!(c.n_ff_exp[0], u("moe_intermediate_size"));
    assert_eq!(c.n_hash_layers, u("num_hash_layers"));
    assert_eq!(c.window, u("sliding_window"));
    assert_eq!(c.indexer_heads, u("index_n_heads"));
    assert_eq!(c.indexer_dim, u("index_head_dim"));
    assert_eq!(c.indexer_top_k, u("index_topk"));
    assert_eq!(c.hc_count, u("hc_mult"));
    assert_eq!(c.hc_sinkhorn_iters, u("hc_sinkhorn_iters"));
    assert_eq!(c.n_vocab, u("vocab_size"));
    assert_eq!(c.n_tokens, u("vocab_size"));
    let ratios: Vec<usize> = hf["compress_ratios"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    assert_eq!(c.compress_ratios, ratios);
    assert_eq!(c.expert_weights_scale as f64, hf["routed_scaling_factor"].as_f64().unwrap());
    assert_eq!(c.swiglu_clamp_exp[0] as f64, hf["swiglu_limit"].as_f64().unwrap());
    assert_eq!(c.rope_base as f64, hf["rope_theta"].as_f64().unwrap());
    assert_eq!(c.compress_rope_base as f64, hf["compress_rope_theta"].as_f64().unwrap());
    let y = c.yarn.expect("yarn scaling");
    assert_eq!(y.factor as f64, hf["rope_scaling"]["factor"].as_f64().unwrap());
    assert_eq!(y.original_context, hf["rope_scaling"]["original_max_position_embeddings"].as_u64().unwrap());
    assert!(m.tensors.unused.is_empty(), "unused tensors: {:?}", m.tensors.unused);
    m
}

#[test]
fn converter_files_open_with_the_transformers_config() {
    check_config("ds4-tiny-a.f32.gguf", "ds4-tiny-a.json");
    let mx = check_config("ds4-tiny-a.mxfp4.gguf", "ds4-tiny-a.json");
    assert_eq!(mx.tensors.get("blk.3.ffn_up_exps.weight").unwrap().ty, ggml::TensorType::MXFP4);
    check_config("ds4-tiny-b.f32.gguf", "ds4-tiny-b.json");
    // indexer keys longer than the attention head, as transformers and llama.cpp allow
    let c = check_config("ds4-tiny-c.f32.gguf", "ds4-tiny-c.json");
    assert_eq!((c.config.head_dim, c.config.indexer_dim), (32, 64));
}

#[test]
fn expert_subset_load_equals_the_slices_of_a_whole_load() {
    let m = ModelFile::open(fixture("ds4-tiny-a.mxfp4.gguf")).unwrap();
    let cpu = ggml::Device::cpu().unwrap();
    let name = "blk.4.ffn_down_exps.weight";
    let opts = ReadOptions { chunk_bytes: 1 << 16, ..ReadOptions::default() };
    let whole = loader::load_tensors(&m, &[TensorRequest::whole(name)], cpu.buffer_type(), &opts).unwrap();
    let picks = vec![11u32, 2, 7];
    let subset = loader::load_tensors(&m, &[TensorRequest::experts(name, picks.clone())], cpu.buffer_type(), &opts).unwrap();
    let info = m.tensors.get(name).unwrap();
    let slice = info.slice_bytes(2) as usize;
    let read = |t: *mut ggml::sys::ggml_tensor, n: usize| {
        let mut v = vec![0u8; n];
        // SAFETY: the tensor is live and holds at least n bytes.
        unsafe { ggml::backend::tensor_get(t, &mut v, 0) };
        v
    };
    let all = read(whole.get(name).unwrap(), info.nbytes as usize);
    let sub = read(subset.get(name).unwrap(), slice * picks.len());
    // And both equal the file's own bytes.
    let file = std::fs::read(fixture("ds4-tiny-a.mxfp4.gguf")).unwrap();
    assert_eq!(&all[..], &file[info.offset as usize..(info.offset + info.nbytes) as usize]);
    for (i, &e) in picks.iter().enumerate() {
        assert_eq!(&sub[i * slice..(i + 1) * slice], &all[e as usize * slice..(e as usize + 1) * slice], "expert {e}");
    }
    // Out-of-range and repeated experts are refused.
    for bad in [vec![16u32], vec![3, 3]] {
        let err = loader::load_tensors(&m, &[TensorRequest::experts(name, bad)], cpu.buffer_type(), &opts).err().expect("refused");
        assert!(err.to_string().contains(name), "{err}");
    }
}
