//! Synthetic deepseek4 GGUFs of any size, written with ggml's own GGUF writer: for tests
//! (bad-input cases edit the key and tensor lists before writing), the load benchmark and
//! the CPU speed benchmarks. Weights are seeded random values, quantized by ggml when the
//! type is quantized; they are not a trained model.
use std::ffi::CString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use ggml::{sys, Context, TensorType};

use crate::{Gguf, LoadError, Metadata, Value};

/// The shape of a synthetic model.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub q_lora_rank: usize,
    pub o_lora_rank: usize,
    pub o_groups: usize,
    pub window: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_ff_exp: usize,
    pub n_expert_shared: usize,
    pub n_hash_layers: usize,
    pub n_vocab: usize,
    pub compress_ratios: Vec<usize>,
    pub indexer_heads: usize,
    pub indexer_dim: usize,
    pub indexer_top_k: usize,
    pub hc_count: usize,
    pub n_ctx: usize,
    /// Type of the dense weight matrices (attention, shared expert, embeddings, head).
    pub matrix_type: TensorType,
    /// Type of the routed expert tensors.
    pub expert_type: TensorType,
    /// Uneven routing (the benchmark models): `None` routes uniformly at random.
    pub router_skew: Option<RouterSkew>,
}

/// Routing skew of a synthetic model, like the real one's (a few experts per layer take most
/// routed slots). Per layer a seeded random `hot_fraction` of the experts is hot. Score-routed
/// layers get `exp_probs_b.bias` = +δ on the hot experts, δ found by bisection so that on
/// isotropic inputs (entries uniform with RMS 1, like `ffn_norm`'s output) the hot experts
/// take `hot_share` of the top-k slots, for that layer's own `ffn_gate_inp`; hash-routed
/// layers draw each token's experts from the hot set with probability `hot_share`. What real
/// activations give is measured, not assumed: `dflash ... --route-stats-out` counts it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterSkew {
    pub hot_fraction: f64,
    pub hot_share: f64,
}

impl RouterSkew {
    /// DeepSeek V4 Flash's measured skew: 12.5% of the experts cover ~59% of routed slots
    /// (DS4-ARCHITECTURE.md, "Where the real model's speed goes").
    pub const V4_FLASH: RouterSkew = RouterSkew { hot_fraction: 0.125, hot_share: 0.6 };
}

impl SynthSpec {
    /// A very small model (fast to write and load; every layer kind present).
    pub fn tiny() -> SynthSpec {
        SynthSpec {
            n_embd: 64,
            n_layer: 4,
            n_head: 4,
            head_dim: 64,
            n_rot: 16,
            q_lora_rank: 32,
            o_lora_rank: 32,
            o_groups: 2,
            window: 8,
            n_expert: 8,
            n_expert_used: 2,
            n_ff_exp: 32,
            n_expert_shared: 1,
            n_hash_layers: 1,
            n_vocab: 512,
            compress_ratios: vec![0, 0, 4, 128],
            indexer_heads: 4,
            indexer_dim: 64,
            indexer_top_k: 4,
            hc_count: 4,
            n_ctx: 4096,
            matrix_type: TensorType::F32,
            expert_type: TensorType::F32,
            router_skew: None,
        }
    }

    /// The medium CPU benchmark model: hidden 1024, 8 layers, 64 experts top-6, Q8_0. Its
    /// shapes are ones llama.cpp's `deepseek4` loader accepts (compression ratios 0/4/128,
    /// 4 hyper-connections, one shared expert, indexer keys of 128 with a 64-dim rope part as
    /// in DeepSeek V4). The head size must differ from the indexer key length: the pinned
    /// llama.cpp divides by zero (SIGFPE) creating its KV caches when they are equal. For
    /// llama.cpp, write it with a real tokenizer ([`SynthModel::with_tokenizer`]), which sets
    /// the vocabulary size.
    pub fn medium() -> SynthSpec {
        SynthSpec {
            n_embd: 1024,
            n_layer: 8,
            n_head: 16,
            head_dim: 256,
            n_rot: 64,
            q_lora_rank: 256,
            o_lora_rank: 256,
            o_groups: 4,
            window: 128,
            n_expert: 64,
            n_expert_used: 6,
            n_ff_exp: 512,
            n_expert_shared: 1,
            n_hash_layers: 2,
            n_vocab: 32000,
            compress_ratios: vec![0, 0, 4, 128, 4, 128, 4, 128],
            indexer_heads: 16,
            indexer_dim: 128,
            indexer_top_k: 64,
            hc_count: 4,
            n_ctx: 8192,
            matrix_type: TensorType::Q8_0,
            expert_type: TensorType::Q8_0,
            router_skew: None,
        }
    }

    /// The same model with `n_layer` layers: the compression ratios and hash layers follow
    /// the spec's pattern (the first layers keep theirs; further layers repeat its last two).
    pub fn with_layers(self, n_layer: usize) -> Result<SynthSpec, String> {
        if n_layer == 0 {
            return Err("a model needs at least one layer".into());
        }
        let r = &self.compress_ratios;
        let compress_ratios = (0..n_layer)
            .map(|l| match r.get(l) {
                Some(&x) => x,
                None if r.len() >= 2 => r[r.len() - 2 + (l - r.len()) % 2],
                None => r.last().copied().unwrap_or(0),
            })
            .collect();
        Ok(SynthSpec { n_layer, compress_ratios, n_hash_layers: self.n_hash_layers.min(n_layer), ..self })
    }

    /// DeepSeek V4 Flash at full width with `n_layer` layers (the real model has 43): hidden
    /// 4096, 64 heads × 512 (rope on 64), q rank 1024, 8 output groups × 1024, window 128, 256
    /// experts top-6 + 1 shared, expert FFN 2048, indexer 64 × 128 top-512, 3 hash layers,
    /// compression ratios 0, 0, then 4 (even layers) / 128 (odd), MXFP4 experts and Q8_0
    /// elsewhere, and the real model's routing skew ([`RouterSkew::V4_FLASH`]). With the real
    /// tokenizer ([`SynthModel::with_tokenizer`]) the vocabulary is 129280 as in the release.
    pub fn v4_flash(n_layer: usize) -> SynthSpec {
        SynthSpec {
            n_embd: 4096,
            n_layer,
            n_head: 64,
            head_dim: 512,
            n_rot: 64,
            q_lora_rank: 1024,
            o_lora_rank: 1024,
            o_groups: 8,
            window: 128,
            n_expert: 256,
            n_expert_used: 6,
            n_ff_exp: 2048,
            n_expert_shared: 1,
            n_hash_layers: 3.min(n_layer),
            n_vocab: 129280,
            compress_ratios: (0..n_layer).map(|l| if l < 2 { 0 } else if l % 2 == 0 { 4 } else { 128 }).collect(),
            indexer_heads: 64,
            indexer_dim: 128,
            indexer_top_k: 512,
            hc_count: 4,
            n_ctx: 65536,
            matrix_type: TensorType::Q8_0,
            expert_type: TensorType::MXFP4,
            router_skew: Some(RouterSkew::V4_FLASH),
        }
    }
}

/// One tensor to write.
#[derive(Clone, Debug)]
pub struct SynthTensor {
    pub name: String,
    pub ty: TensorType,
    pub shape: Vec<u64>,
}

/// Metadata and tensors of a synthetic file, editable before writing.
#[derive(Clone, Debug)]
pub struct SynthModel {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<SynthTensor>,
    pub seed: u64,
    pub router_skew: Option<RouterSkew>,
}

fn int(v: i128, ty: &'static str) -> Value {
    Value::Int { v, ty }
}

fn u32v(v: usize) -> Value {
    int(v as i128, "u32")
}

fn f32v(v: f64) -> Value {
    Value::Float { v, ty: "f32" }
}

impl SynthModel {
    pub fn new(s: &SynthSpec) -> SynthModel {
        let k = |n: &str| format!("deepseek4.{n}");
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::Str("deepseek4".into())),
            ("general.name".into(), Value::Str("synthetic deepseek4".into())),
            (k("block_count"), u32v(s.n_layer)),
            (k("context_length"), u32v(s.n_ctx)),
            (k("embedding_length"), u32v(s.n_embd)),
            (k("embedding_length_out"), u32v(s.n_embd * s.hc_count)),
            (k("attention.head_count"), u32v(s.n_head)),
            (k("attention.head_count_kv"), u32v(1)),
            (k("attention.key_length"), u32v(s.head_dim)),
            (k("attention.value_length"), u32v(s.head_dim)),
            (k("rope.dimension_count"), u32v(s.n_rot)),
            (k("attention.q_lora_rank"), u32v(s.q_lora_rank)),
            (k("attention.output_lora_rank"), u32v(s.o_lora_rank)),
            (k("attention.output_group_count"), u32v(s.o_groups)),
            (k("attention.sliding_window"), u32v(s.window)),
            (k("attention.indexer.head_count"), u32v(s.indexer_heads)),
            (k("attention.indexer.key_length"), u32v(s.indexer_dim)),
            (k("attention.indexer.top_k"), u32v(s.indexer_top_k)),
            (k("attention.compress_ratios"), Value::IntArray { v: s.compress_ratios.iter().map(|&r| r as i128).collect(), ty: "i32" }),
            (k("attention.compress_rope_freq_base"), f32v(160000.0)),
            (k("attention.layer_norm_rms_epsilon"), f32v(1e-6)),
            (k("expert_count"), u32v(s.n_expert)),
            (k("expert_used_count"), u32v(s.n_expert_used)),
            (k("expert_feed_forward_length"), u32v(s.n_ff_exp)),
            (k("expert_shared_count"), u32v(s.n_expert_shared)),
            (k("expert_weights_scale"), f32v(1.5)),
            (k("expert_weights_norm"), Value::Bool(true)),
            (k("expert_gating_func"), u32v(4)),
            (k("hash_layer_count"), u32v(s.n_hash_layers)),
            (k("hyper_connection.count"), u32v(s.hc_count)),
            (k("hyper_connection.sinkhorn_iterations"), u32v(20)),
            (k("hyper_connection.epsilon"), f32v(1e-6)),
            (k("swiglu_clamp_exp"), Value::FloatArray { v: vec![10.0; s.n_layer], ty: "f32" }),
            (k("swiglu_clamp_shexp"), Value::FloatArray { v: vec![10.0; s.n_layer], ty: "f32" }),
            (k("rope.freq_base"), f32v(10000.0)),
            (k("rope.scaling.type"), Value::Str("yarn".into())),
            (k("rope.scaling.factor"), f32v(16.0)),
            (k("rope.scaling.original_context_length"), u32v(65536)),
            (k("rope.scaling.yarn_beta_fast"), f32v(32.0)),
            (k("rope.scaling.yarn_beta_slow"), f32v(1.0)),
            (k("nextn_predict_layers"), u32v(0)),
            ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Value::StrArray((0..s.n_vocab).map(|i| format!("<t{i}>")).collect())),
            ("tokenizer.ggml.bos_token_id".into(), u32v(0)),
            ("tokenizer.ggml.eos_token_id".into(), u32v(1)),
        ];
        // llama.cpp's file type (llama_ftype) for the uniform cases, shown by its tools.
        let ftype = [(TensorType::F32, 0), (TensorType::F16, 1), (TensorType::Q8_0, 7), (TensorType::BF16, 32)]
            .iter()
            .find(|(t, _)| *t == s.matrix_type && *t == s.expert_type)
            .map(|&(_, f)| f);
        if let Some(f) = ftype {
            md.push(("general.file_type".into(), u32v(f)));
        }
        md.shrink_to_fit();

        let (e, v, hd) = (s.n_embd as u64, s.n_vocab as u64, s.head_dim as u64);
        let hc_dim = (s.hc_count * s.n_embd) as u64;
        let mix = ((2 + s.hc_count) * s.hc_count) as u64;
        let (mt, et, f32t) = (s.matrix_type, s.expert_type, TensorType::F32);
        let mut t = Vec::new();
        let mut add = |name: String, ty: TensorType, shape: &[u64]| t.push(SynthTensor { name, ty, shape: shape.to_vec() });
        add("token_embd.weight".into(), mt, &[e, v]);
        for l in 0..s.n_layer {
            let b = |n: &str| format!("blk.{l}.{n}");
            let (nh, ql, ol, og) = (s.n_head as u64, s.q_lora_rank as u64, s.o_lora_rank as u64, s.o_groups as u64);
            add(b("attn_norm.weight"), f32t, &[e]);
            add(b("attn_sinks.weight"), f32t, &[nh]);
            add(b("attn_q_a.weight"), mt, &[e, ql]);
            add(b("attn_q_a_norm.weight"), f32t, &[ql]);
            add(b("attn_q_b.weight"), mt, &[ql, nh * hd]);
            add(b("attn_kv.weight"), mt, &[e, hd]);
            add(b("attn_kv_a_norm.weight"), f32t, &[hd]);
            add(b("attn_output_a.weight"), mt, &[nh * hd / og, ol * og]);
            add(b("attn_output_b.weight"), mt, &[og * ol, e]);
            for part in ["attn", "ffn"] {
                add(b(&format!("hc_{part}_fn.weight")), f32t, &[hc_dim, mix]);
                add(b(&format!("hc_{part}_base.weight")), f32t, &[mix]);
                add(b(&format!("hc_{part}_scale.weight")), f32t, &[3]);
            }
            let ratio = s.compress_ratios[l] as u64;
            if ratio != 0 {
                let coff = if ratio == 4 { 2 } else { 1 };
                add(b("attn_compressor_kv.weight"), mt, &[e, coff * hd]);
                add(b("attn_compressor_gate.weight"), mt, &[e, coff * hd]);
                add(b("attn_compressor_ape.weight"), f32t, &[coff * hd, ratio]);
                add(b("attn_compressor_norm.weight"), f32t, &[hd]);
                if ratio == 4 {
                    let (ih, id) = (s.indexer_heads as u64, s.indexer_dim as u64);
                    add(b("indexer.attn_q_b.weight"), mt, &[ql, ih * id]);
                    add(b("indexer.proj.weight"), mt, &[e, ih]);
                    add(b("indexer_compressor_kv.weight"), mt, &[e, 2 * id]);
                    add(b("indexer_compressor_gate.weight"), mt, &[e, 2 * id]);
                    add(b("indexer_compressor_ape.weight"), f32t, &[2 * id, ratio]);
                    add(b("indexer_compressor_norm.weight"), f32t, &[id]);
                }
            }
            let (ne, ff, nu) = (s.n_expert as u64, s.n_ff_exp as u64, s.n_expert_used as u64);
            add(b("ffn_gate_inp.weight"), f32t, &[e, ne]);
            if l < s.n_hash_layers {
                add(b("ffn_gate_tid2eid.weight"), TensorType::I32, &[nu, v]);
            } else {
                add(b("exp_probs_b.bias"), f32t, &[ne]);
            }
            add(b("ffn_norm.weight"), f32t, &[e]);
            add(b("ffn_gate_exps.weight"), et, &[e, ff, ne]);
            add(b("ffn_up_exps.weight"), et, &[e, ff, ne]);
            add(b("ffn_down_exps.weight"), et, &[ff, e, ne]);
            if s.n_expert_shared > 0 {
                let sh = ff * s.n_expert_shared as u64;
                add(b("ffn_gate_shexp.weight"), mt, &[e, sh]);
                add(b("ffn_up_shexp.weight"), mt, &[e, sh]);
                add(b("ffn_down_shexp.weight"), mt, &[sh, e]);
            }
        }
        add("output_hc_fn.weight".into(), f32t, &[hc_dim, s.hc_count as u64]);
        add("output_hc_base.weight".into(), f32t, &[s.hc_count as u64]);
        add("output_hc_scale.weight".into(), f32t, &[1]);
        add("output_norm.weight".into(), f32t, &[e]);
        add("output.weight".into(), mt, &[e, v]);
        SynthModel { metadata: md, tensors: t, seed: 0x5eed, router_skew: s.router_skew }
    }

    /// [`SynthModel::new`] with the `tokenizer.*` keys replaced by `tokenizer` (see
    /// [`tokenizer_keys`]); the vocabulary size (embedding, output and hash-routing rows)
    /// becomes the number of tokens it defines.
    pub fn with_tokenizer(spec: &SynthSpec, tokenizer: &[(String, Value)]) -> Result<SynthModel, LoadError> {
        let key = "tokenizer.ggml.tokens";
        let n_vocab = match tokenizer.iter().find(|(k, _)| k == key) {
            Some((_, Value::StrArray(tokens))) if !tokens.is_empty() => tokens.len(),
            Some((_, Value::StrArray(_))) => {
                return Err(LoadError::KeyValue { key: key.into(), expected: "at least one token".into(), found: "0 tokens".into() })
            }
            Some((_, v)) => return Err(LoadError::KeyType { key: key.into(), expected: "array of string", found: v.type_name() }),
            None => return Err(LoadError::MissingKey { key: key.into() }),
        };
        let mut model = SynthModel::new(&SynthSpec { n_vocab, ..spec.clone() });
        model.metadata.retain(|(k, _)| !k.starts_with("tokenizer."));
        model.metadata.extend(tokenizer.iter().filter(|(k, _)| k.starts_with("tokenizer.")).cloned());
        Ok(model)
    }

    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut SynthTensor> {
        self.tensors.iter_mut().find(|t| t.name == name)
    }

    pub fn remove_tensor(&mut self, name: &str) {
        self.tensors.retain(|t| t.name != name);
    }

    /// Write the file. `random` fills weights with seeded random values (quantized as
    /// needed); otherwise with a cheap byte pattern (for load benchmarks).
    pub fn write(&self, path: &Path, random: bool) -> std::io::Result<()> {
        let err = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let ctx = Context::new_no_alloc(self.tensors.len().max(1), 0).map_err(|e| err(e.to_string()))?;
        // SAFETY: all ggml/gguf calls below get valid pointers; names and strings are kept
        // alive (CString) for the duration of each call; setters copy their arguments.
        unsafe {
            let g = sys::gguf_init_empty();
            for (key, value) in &self.metadata {
                let k = CString::new(key.as_str()).map_err(|e| err(e.to_string()))?;
                set_value(g, &k, value).map_err(|m| err(format!("{key}: {m}")))?;
            }
            let mut raw = Vec::with_capacity(self.tensors.len());
            for t in &self.tensors {
                let ne: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                let tensor = sys::ggml_new_tensor(ctx.as_ptr(), t.ty.raw(), ne.len() as i32, ne.as_ptr());
                let name = CString::new(t.name.as_str()).map_err(|e| err(e.to_string()))?;
                sys::ggml_set_name(tensor, name.as_ptr());
                sys::gguf_add_tensor(g, tensor);
                raw.push(tensor);
            }
            let meta_size = sys::gguf_get_meta_size(g);
            let mut meta = vec![0u8; meta_size];
            sys::gguf_get_meta_data(g, meta.as_mut_ptr().cast());
            let alignment = sys::gguf_get_alignment(g) as u64;
            sys::gguf_free(g);

            let mut out = BufWriter::with_capacity(8 << 20, File::create(path)?);
            out.write_all(&meta)?;
            let mut rng = Rng(self.seed | 1);
            let mut router = Vec::new();
            for (t, &tensor) in self.tensors.iter().zip(&raw) {
                let nbytes = sys::ggml_nbytes(tensor) as u64;
                let n_expert = self.n_expert_hint();
                match (self.router_skew, random) {
                    (Some(skew), true) if t.name.ends_with(".exp_probs_b.bias") => {
                        let bias = skewed_bias(skew, &router, t.shape[0] as usize, self.hot_set(skew, &t.name, n_expert));
                        out.write_all(&bias.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
                    }
                    (Some(skew), true) if t.name.ends_with(".ffn_gate_tid2eid.weight") => {
                        let hot = self.hot_set(skew, &t.name, n_expert);
                        write_skewed_table(&mut out, t, skew, &hot, n_expert, &mut rng)?;
                    }
                    _ => {
                        let keep = t.name.ends_with(".ffn_gate_inp.weight") && t.ty == TensorType::F32;
                        let kept = write_data(&mut out, t, nbytes, random, &mut rng, n_expert, keep)?;
                        if keep {
                            router = kept;
                        }
                    }
                }
                let pad = (alignment - nbytes % alignment) % alignment;
                out.write_all(&vec![0u8; pad as usize])?;
            }
            out.flush()?;
        }
        Ok(())
    }

    /// The hot experts of the layer `name` belongs to (seeded by the model's seed and the layer).
    fn hot_set(&self, skew: RouterSkew, name: &str, n_expert: usize) -> Vec<bool> {
        let layer: u64 = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok()).unwrap_or(0);
        let mut rng = Rng((self.seed ^ (layer + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
        let n_hot = ((n_expert as f64 * skew.hot_fraction).round() as usize).clamp(1, n_expert);
        let mut hot = vec![false; n_expert];
        let mut chosen = 0;
        while chosen < n_hot {
            let e = (rng.next() % n_expert as u64) as usize;
            if !hot[e] {
                hot[e] = true;
                chosen += 1;
            }
        }
        hot
    }

    fn n_expert_hint(&self) -> usize {
        match self.metadata.iter().find(|(k, _)| k == "deepseek4.expert_count") {
            Some((_, Value::Int { v, .. })) => (*v).max(1) as usize,
            _ => 1,
        }
    }
}

/// Rewrites the GGUF `src` as `dst` with its routed-expert tensors (F32 in `src`)
/// quantized to `ty` by ggml (`ggml_quantize_chunk`, the reference quantizer), every other
/// tensor's bytes and every key copied as they are, except `general.file_type`
/// (`file_type`, llama.cpp's `llama_ftype` number) and `general.name` (`name`). Deterministic:
/// the same `src` gives the same bytes. Makes fixture variants with quantized experts
/// (`write_synth --requantize-experts`).
pub fn requantize_experts(src: &Path, dst: &Path, ty: TensorType, file_type: u32, name: &str) -> Result<(), LoadError> {
    let model = crate::ModelFile::open(src)?;
    fn io(path: &Path) -> impl Fn(std::io::Error) -> LoadError + '_ {
        move |source| LoadError::Io { path: path.display().to_string(), source }
    }
    let bad = |reason: String| LoadError::Gguf { path: src.display().to_string(), reason };
    let gguf = Gguf::open(src)?;
    let mut tensors: Vec<&crate::TensorInfo> = model.tensors.iter().collect();
    tensors.sort_by_key(|t| t.offset);
    let ctx = Context::new_no_alloc(tensors.len().max(1), 0).map_err(|e| bad(e.to_string()))?;
    let file = File::open(src).map_err(io(src))?;
    let name_c = CString::new(name).map_err(|e| bad(e.to_string()))?;
    // SAFETY: all ggml/gguf calls get valid pointers (`gguf` outlives `g`; names are kept
    // alive for each call; setters copy their arguments).
    unsafe {
        let g = sys::gguf_init_empty();
        sys::gguf_set_kv(g, gguf.as_ptr());
        sys::gguf_set_val_u32(g, c"general.file_type".as_ptr(), file_type);
        sys::gguf_set_val_str(g, c"general.name".as_ptr(), name_c.as_ptr());
        let mut raw = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let quantize = crate::ExpertPart::parse(&t.name).is_some();
            if quantize && t.ty != TensorType::F32 {
                sys::gguf_free(g);
                return Err(bad(format!("{}: expected F32 experts, found {}", t.name, t.ty)));
            }
            let ne: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
            let tensor = sys::ggml_new_tensor(ctx.as_ptr(), if quantize { ty } else { t.ty }.raw(), ne.len() as i32, ne.as_ptr());
            let tname = CString::new(t.name.as_str()).map_err(|e| bad(e.to_string()))?;
            sys::ggml_set_name(tensor, tname.as_ptr());
            sys::gguf_add_tensor(g, tensor);
            raw.push((tensor, quantize));
        }
        let mut meta = vec![0u8; sys::gguf_get_meta_size(g)];
        sys::gguf_get_meta_data(g, meta.as_mut_ptr().cast());
        let alignment = sys::gguf_get_alignment(g) as u64;
        sys::gguf_free(g);

        let mut out = BufWriter::new(File::create(dst).map_err(io(dst))?);
        out.write_all(&meta).map_err(io(dst))?;
        for (t, &(tensor, quantize)) in tensors.iter().zip(&raw) {
            let mut bytes = vec![0u8; t.nbytes as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, t.offset).map_err(io(src))?;
            if quantize {
                let vals: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                let (row, rows) = (t.ne[0] as i64, (vals.len() as u64 / t.ne[0]) as i64);
                bytes = vec![0u8; sys::ggml_nbytes(tensor)];
                // SAFETY: `vals` holds `rows` rows of `row` floats, `bytes` the quantized rows.
                sys::ggml_quantize_chunk(ty.raw(), vals.as_ptr(), bytes.as_mut_ptr().cast(), 0, rows, row, std::ptr::null());
            }
            out.write_all(&bytes).map_err(io(dst))?;
            let pad = (alignment - bytes.len() as u64 % alignment) % alignment;
            out.write_all(&vec![0u8; pad as usize]).map_err(io(dst))?;
        }
        out.flush().map_err(io(dst))?;
    }
    Ok(())
}

/// Every `tokenizer.*` key of the GGUF at `path` (only its header is read), to give a
/// synthetic model a real vocabulary: llama.cpp's BPE vocabulary needs merges, token types
/// and a pre-tokenizer name, which the synthetic `<tN>` token list does not have.
pub fn tokenizer_keys(path: &Path) -> Result<Vec<(String, Value)>, LoadError> {
    let md = Metadata::read(&Gguf::open(path)?)?;
    md.str_array("tokenizer.ggml.tokens")?;
    Ok(md.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect())
}

unsafe fn set_value(g: *mut sys::gguf_context, k: &CString, value: &Value) -> Result<(), String> {
    use sys::gguf_type as gt;
    let k = k.as_ptr();
    unsafe {
        match value {
            Value::Int { v, ty } => match *ty {
                "u8" => sys::gguf_set_val_u8(g, k, *v as u8),
                "i8" => sys::gguf_set_val_i8(g, k, *v as i8),
                "u16" => sys::gguf_set_val_u16(g, k, *v as u16),
                "i16" => sys::gguf_set_val_i16(g, k, *v as i16),
                "u32" => sys::gguf_set_val_u32(g, k, *v as u32),
                "i32" => sys::gguf_set_val_i32(g, k, *v as i32),
                "u64" => sys::gguf_set_val_u64(g, k, *v as u64),
                "i64" => sys::gguf_set_val_i64(g, k, *v as i64),
                other => return Err(format!("unknown integer type {other}")),
            },
            Value::Float { v, ty } => match *ty {
                "f64" => sys::gguf_set_val_f64(g, k, *v),
                _ => sys::gguf_set_val_f32(g, k, *v as f32),
            },
            Value::Bool(b) => sys::gguf_set_val_bool(g, k, *b),
            Value::Str(s) => {
                let c = CString::new(s.as_str()).map_err(|e| e.to_string())?;
                sys::gguf_set_val_str(g, k, c.as_ptr());
            }
            Value::IntArray { v, ty } => {
                let (t, bytes): (gt::Type, Vec<u8>) = match *ty {
                    "u32" => (gt::GGUF_TYPE_UINT32, v.iter().flat_map(|&x| (x as u32).to_le_bytes()).collect()),
                    "i32" => (gt::GGUF_TYPE_INT32, v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect()),
                    "u64" => (gt::GGUF_TYPE_UINT64, v.iter().flat_map(|&x| (x as u64).to_le_bytes()).collect()),
                    "i64" => (gt::GGUF_TYPE_INT64, v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect()),
                    "u8" => (gt::GGUF_TYPE_UINT8, v.iter().map(|&x| x as u8).collect()),
                    other => return Err(format!("unsupported integer array type {other}")),
                };
                sys::gguf_set_arr_data(g, k, t, bytes.as_ptr().cast(), v.len());
            }
            Value::FloatArray { v, .. } => {
                let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                sys::gguf_set_arr_data(g, k, gt::GGUF_TYPE_FLOAT32, f.as_ptr().cast(), f.len());
            }
            Value::BoolArray(v) => {
                let b: Vec<u8> = v.iter().map(|&x| x as u8).collect();
                sys::gguf_set_arr_data(g, k, gt::GGUF_TYPE_BOOL, b.as_ptr().cast(), b.len());
            }
            Value::StrArray(v) => {
                let cs: Vec<CString> = v.iter().map(|s| CString::new(s.as_str())).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
                let ptrs: Vec<*const std::ffi::c_char> = cs.iter().map(|c| c.as_ptr()).collect();
                sys::gguf_set_arr_str(g, k, ptrs.as_ptr() as *mut _, ptrs.len());
            }
        }
    }
    Ok(())
}

/// xorshift64*: fast, seeded, good enough for weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// `exp_probs_b.bias` of a skewed layer: +δ on the hot experts, 0 elsewhere, δ found by
/// bisection so that the hot experts take `skew.hot_share` of the top-k slots on isotropic
/// inputs (entries uniform in [−√3, √3), RMS 1) for this layer's router `gate_inp`
/// ([n_embd, n_expert], F32). k is 6, the model's experts per token.
fn skewed_bias(skew: RouterSkew, gate_inp: &[f32], n_expert: usize, hot: Vec<bool>) -> Vec<f32> {
    const K: usize = 6;
    const SAMPLES: usize = 256;
    let n_embd = gate_inp.len() / n_expert.max(1);
    if n_embd == 0 || n_expert <= K {
        return vec![0.0; n_expert];
    }
    let mut rng = Rng(0x51ce_ed05 | 1);
    let probs: Vec<Vec<f32>> = (0..SAMPLES)
        .map(|_| {
            let z: Vec<f32> = (0..n_embd).map(|_| rng.unit() * 3f32.sqrt()).collect();
            gate_inp
                .chunks_exact(n_embd)
                .map(|w| {
                    let l: f32 = w.iter().zip(&z).map(|(a, b)| a * b).sum();
                    let softplus = if l > 20.0 { l } else { l.exp().ln_1p() };
                    softplus.sqrt()
                })
                .collect()
        })
        .collect();
    let share = |delta: f32| -> f64 {
        let mut hits = 0usize;
        for p in &probs {
            let mut order: Vec<(f32, bool)> = p.iter().zip(&hot).map(|(&v, &h)| (if h { v + delta } else { v }, h)).collect();
            order.sort_by(|a, b| b.0.total_cmp(&a.0));
            hits += order[..K].iter().filter(|(_, h)| *h).count();
        }
        hits as f64 / (SAMPLES * K) as f64
    };
    let (mut lo, mut hi) = (0.0f32, 8.0f32);
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if share(mid) < skew.hot_share {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let delta = 0.5 * (lo + hi);
    hot.iter().map(|&h| if h { delta } else { 0.0 }).collect()
}

/// A hash layer's token → experts table {n_used, n_vocab} with the skew: each slot is a hot
/// expert with probability `skew.hot_share`; a token's experts are distinct.
fn write_skewed_table(out: &mut impl Write, t: &SynthTensor, skew: RouterSkew, hot: &[bool], n_expert: usize, rng: &mut Rng) -> std::io::Result<()> {
    let (k, rows) = (t.shape[0] as usize, t.shape[1..].iter().product::<u64>());
    let hot_ids: Vec<u32> = (0..n_expert as u32).filter(|&e| hot[e as usize]).collect();
    let cold_ids: Vec<u32> = (0..n_expert as u32).filter(|&e| !hot[e as usize]).collect();
    let mut buf = Vec::with_capacity(rows as usize * k * 4);
    for _ in 0..rows {
        let mut chosen: Vec<u32> = Vec::with_capacity(k);
        while chosen.len() < k.min(n_expert) {
            let from_hot = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 <= skew.hot_share;
            let pool = if (from_hot && !hot_ids.is_empty()) || cold_ids.is_empty() { &hot_ids } else { &cold_ids };
            let e = pool[(rng.next() % pool.len() as u64) as usize];
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for e in chosen {
            buf.extend_from_slice(&(e as i32).to_le_bytes());
        }
    }
    out.write_all(&buf)
}

/// Tensors above this many bytes are written as repeats of one random block of rows of about
/// this size (the full-width benchmark models: 3.4 GB of experts per layer would otherwise
/// take minutes to generate; a product's speed does not depend on the values).
const REPEAT_ABOVE_BYTES: u64 = 64 << 20;

/// Writes one tensor's data; returns its values when `keep` (F32 tensors only).
fn write_data(out: &mut impl Write, t: &SynthTensor, nbytes: u64, random: bool, rng: &mut Rng, n_expert: usize, keep: bool) -> std::io::Result<Vec<f32>> {
    let mut kept = Vec::new();
    if !random {
        // A cheap pattern: the loader benchmark measures bytes, not values.
        let block = vec![0x3cu8; 1 << 20];
        let mut left = nbytes;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            out.write_all(&block[..n])?;
            left -= n as u64;
        }
        return Ok(kept);
    }
    let row = t.shape[0] as usize;
    let rows: u64 = t.shape[1..].iter().product();
    if t.ty == TensorType::I32 {
        // Hash routing table {n_used, n_vocab}: distinct valid experts per token.
        for _ in 0..rows {
            let mut chosen: Vec<i32> = Vec::with_capacity(row);
            while chosen.len() < row {
                let e = (rng.next() % n_expert as u64) as i32;
                if !chosen.contains(&e) || chosen.len() >= n_expert {
                    chosen.push(e);
                }
            }
            for e in chosen {
                out.write_all(&e.to_le_bytes())?;
            }
        }
        return Ok(kept);
    }
    let is_norm = t.shape.len() == 1 && t.name.contains("norm");
    let scale = if is_norm { 0.0 } else { 1.0 / (row as f32).sqrt() };
    let rows_per_chunk = ((1usize << 20) / row).max(1);
    let mut done = 0u64;
    let imatrix = vec![1.0f32; row];
    // Big tensors: one random block of rows (a whole number of chunks, ~16 MiB), repeated.
    let repeat_rows = if nbytes > REPEAT_ABOVE_BYTES {
        let chunk_bytes = nbytes / rows * rows_per_chunk as u64;
        Some(((16u64 << 20) / chunk_bytes.max(1)).max(1) * rows_per_chunk as u64)
    } else {
        None
    };
    let mut block: Vec<u8> = Vec::new();
    while done < rows {
        if let Some(rr) = repeat_rows.filter(|&rr| done >= rr) {
            let n = (rows - done).min(rr);
            let bytes = (nbytes / rows * n) as usize;
            out.write_all(&block[..bytes])?;
            done += n;
            continue;
        }
        let n = rows_per_chunk.min((rows - done) as usize);
        let vals: Vec<f32> = (0..n * row).map(|_| if is_norm { 1.0 + 0.1 * rng.unit() } else { rng.unit() * scale }).collect();
        let bytes: Vec<u8> = if t.ty == TensorType::F32 {
            vals.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else {
            let size = t.ty.row_bytes(row as u64).unwrap_or(0) as usize * n;
            let mut dst = vec![0u8; size];
            // SAFETY: `vals` holds n rows of `row` floats and `dst` the n quantized rows.
            unsafe {
                if t.ty == TensorType::F16 {
                    sys::ggml_fp32_to_fp16_row(vals.as_ptr(), dst.as_mut_ptr().cast(), vals.len() as i64);
                } else if t.ty == TensorType::BF16 {
                    sys::ggml_fp32_to_bf16_row(vals.as_ptr(), dst.as_mut_ptr().cast(), vals.len() as i64);
                } else {
                    let im = if sys::ggml_quantize_requires_imatrix(t.ty.raw()) { imatrix.as_ptr() } else { std::ptr::null() };
                    sys::ggml_quantize_chunk(t.ty.raw(), vals.as_ptr(), dst.as_mut_ptr().cast(), 0, n as i64, row as i64, im);
                }
            }
            dst
        };
        if keep {
            kept.extend_from_slice(&vals);
        }
        out.write_all(&bytes)?;
        if repeat_rows.is_some() {
            block.extend_from_slice(&bytes);
        }
        done += n as u64;
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The share of top-6 slots that `bias` gives the hot experts on fresh isotropic inputs.
    fn hot_share(gate_inp: &[f32], n_expert: usize, bias: &[f32], hot: &[bool], seed: u64) -> f64 {
        let n_embd = gate_inp.len() / n_expert;
        let mut rng = Rng(seed | 1);
        let (mut hits, samples) = (0usize, 400usize);
        for _ in 0..samples {
            let z: Vec<f32> = (0..n_embd).map(|_| rng.unit() * 3f32.sqrt()).collect();
            let mut s: Vec<(f32, bool)> = gate_inp
                .chunks_exact(n_embd)
                .zip(bias)
                .zip(hot)
                .map(|((w, b), &h)| {
                    let l: f32 = w.iter().zip(&z).map(|(a, x)| a * x).sum();
                    (l.exp().ln_1p().sqrt() + b, h)
                })
                .collect();
            s.sort_by(|a, b| b.0.total_cmp(&a.0));
            hits += s[..6].iter().filter(|(_, h)| *h).count();
        }
        hits as f64 / (samples * 6) as f64
    }

    #[test]
    fn skewed_router_bias_gives_the_hot_experts_their_share() {
        let (n_embd, n_expert) = (256, 64);
        let mut rng = Rng(7);
        let gate_inp: Vec<f32> = (0..n_embd * n_expert).map(|_| rng.unit() / (n_embd as f32).sqrt()).collect();
        let model = SynthModel::new(&SynthSpec { n_expert, n_expert_used: 6, ..SynthSpec::tiny() });
        let skew = RouterSkew::V4_FLASH;
        let hot = model.hot_set(skew, "blk.3.exp_probs_b.bias", n_expert);
        assert_eq!(hot.iter().filter(|&&h| h).count(), 8, "12.5% of 64 experts");
        let bias = skewed_bias(skew, &gate_inp, n_expert, hot.clone());
        assert!(bias.iter().zip(&hot).all(|(&b, &h)| if h { b > 0.0 } else { b == 0.0 }), "{bias:?}");
        let share = hot_share(&gate_inp, n_expert, &bias, &hot, 99);
        assert!((share - 0.6).abs() < 0.04, "hot share {share}");
        // Without the bias the hot experts get about their 12.5%.
        let none = hot_share(&gate_inp, n_expert, &vec![0.0; n_expert], &hot, 99);
        assert!(none < 0.25, "unbiased share {none}");
    }

    #[test]
    fn skewed_hash_table_rows_are_distinct_experts_drawn_mostly_from_the_hot_set() {
        let n_expert = 64;
        let t = SynthTensor { name: "blk.0.ffn_gate_tid2eid.weight".into(), ty: TensorType::I32, shape: vec![6, 2000] };
        let model = SynthModel::new(&SynthSpec { n_expert, ..SynthSpec::tiny() });
        let hot = model.hot_set(RouterSkew::V4_FLASH, &t.name, n_expert);
        let mut out = Vec::new();
        write_skewed_table(&mut out, &t, RouterSkew::V4_FLASH, &hot, n_expert, &mut Rng(3)).unwrap();
        let ids: Vec<i32> = out.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(ids.len(), 6 * 2000);
        for row in ids.chunks_exact(6) {
            let mut r = row.to_vec();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), 6, "{row:?}");
            assert!(row.iter().all(|&e| (0..n_expert as i32).contains(&e)));
        }
        let share = ids.iter().filter(|&&e| hot[e as usize]).count() as f64 / ids.len() as f64;
        // 8 hot experts for 6 distinct slots: the draw saturates a little below 0.6.
        assert!((0.5..0.62).contains(&share), "hot share {share}");
    }

    #[test]
    fn with_layers_repeats_the_ratio_pattern() {
        let s = SynthSpec::v4_flash(8).with_layers(11).unwrap();
        assert_eq!(s.compress_ratios, vec![0, 0, 4, 128, 4, 128, 4, 128, 4, 128, 4]);
        assert_eq!(s.n_hash_layers, 3);
        assert_eq!(SynthSpec::v4_flash(2).n_hash_layers, 2);
        assert!(SynthSpec::tiny().with_layers(0).is_err());
    }
}
