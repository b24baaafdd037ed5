//! The typed DeepSeek V4 configuration, read once from `deepseek4.*` metadata and validated,
//! so nothing downstream re-checks the model's shape.
use crate::metadata::Metadata;
use crate::tensors::TensorInfos;
use crate::LoadError;

pub const ARCH: &str = "deepseek4";

/// `expert_gating_func` values (llama.cpp's `llama_expert_gating_func_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatingFunc {
    /// sqrt(softplus(x)), value 4 — the only one DeepSeek V4 uses.
    SqrtSoftplus,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeYarn {
    pub factor: f32,
    pub original_context: u64,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ds4Config {
    /// Transformer blocks of the main model (block_count minus next-token-prediction layers
    /// that the file really carries).
    pub n_layer: usize,
    /// `block_count`, next-token-prediction layers included.
    pub n_layer_all: usize,
    pub n_nextn: usize,
    pub n_embd: usize,
    /// Rows of token_embd / output.
    pub n_vocab: usize,
    /// Tokens the tokenizer defines (≤ n_vocab; rows past it are padding).
    pub n_tokens: usize,
    pub n_ctx_train: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub q_lora_rank: usize,
    pub o_lora_rank: usize,
    pub o_groups: usize,
    pub window: usize,
    pub indexer_heads: usize,
    pub indexer_dim: usize,
    pub indexer_top_k: usize,
    /// Per layer (n_layer_all entries): 0 = no compression.
    pub compress_ratios: Vec<usize>,
    pub rope_base: f32,
    pub compress_rope_base: f32,
    pub yarn: Option<RopeYarn>,
    pub rms_eps: f32,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_expert_shared: usize,
    /// Per layer expert FFN width.
    pub n_ff_exp: Vec<usize>,
    pub expert_weights_scale: f32,
    pub expert_weights_norm: bool,
    pub gating: GatingFunc,
    pub n_hash_layers: usize,
    pub hc_count: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub swiglu_clamp_exp: Vec<f32>,
    pub swiglu_clamp_shexp: Vec<f32>,
}

fn key(k: &str) -> String {
    format!("{ARCH}.{k}")
}

fn value_err(key: &str, expected: impl Into<String>, found: impl ToString) -> LoadError {
    LoadError::KeyValue { key: key.to_string(), expected: expected.into(), found: found.to_string() }
}

/// Largest count accepted for any dimension: keeps every product below 2^62.
const MAX_DIM: i128 = 1 << 24;

impl Ds4Config {
    pub fn from_metadata(md: &Metadata, tensors: &TensorInfos) -> Result<Ds4Config, LoadError> {
        let arch = md.str("general.architecture")?;
        if arch != ARCH {
            return Err(LoadError::WrongArchitecture { found: arch.to_string() });
        }
        let dim = |k: &str| -> Result<usize, LoadError> { Ok(md.int_in(&key(k), 1, MAX_DIM)? as usize) };
        let count = |k: &str| -> Result<usize, LoadError> { Ok(md.int_in(&key(k), 0, MAX_DIM)? as usize) };
        let pos_float = |k: &str| -> Result<f32, LoadError> {
            let kk = key(k);
            let v = md.float(&kk)?;
            if v <= 0.0 {
                return Err(value_err(&kk, "a positive number", v));
            }
            Ok(v as f32)
        };

        let n_layer_all = dim("block_count")?;
        let n_embd = dim("embedding_length")?;
        let n_ctx_train = dim("context_length")?;
        let n_head = dim("attention.head_count")?;
        let n_head_kv = dim("attention.head_count_kv")?;
        let head_dim = dim("attention.key_length")?;
        let value_length = dim("attention.value_length")?;
        let n_rot = count("rope.dimension_count")?;
        let q_lora_rank = dim("attention.q_lora_rank")?;
        let o_lora_rank = dim("attention.output_lora_rank")?;
        let o_groups = dim("attention.output_group_count")?;
        let window = dim("attention.sliding_window")?;
        let n_expert = dim("expert_count")?;
        let n_expert_used = dim("expert_used_count")?;
        let n_expert_shared = count("expert_shared_count")?;
        let n_hash_layers = count("hash_layer_count")?;
        let hc_count = dim("hyper_connection.count")?;
        let hc_sinkhorn_iters = dim("hyper_connection.sinkhorn_iterations")?;
        let hc_eps = pos_float("hyper_connection.epsilon")?;
        let rms_eps = pos_float("attention.layer_norm_rms_epsilon")?;
        let rope_base = pos_float("rope.freq_base")?;
        let compress_rope_base = pos_float("attention.compress_rope_freq_base")?;
        let expert_weights_scale = pos_float("expert_weights_scale")?;
        let expert_weights_norm = md.bool(&key("expert_weights_norm"))?;
        let n_nextn_declared = match md.opt_int_in(&key("nextn_predict_layers"), 0, MAX_DIM)? {
            Some(n) => n as usize,
            None => 0,
        };

        let gating_key = key("expert_gating_func");
        let gating = match md.int_in(&gating_key, 0, i64::MAX as i128)? {
            4 => GatingFunc::SqrtSoftplus,
            other => return Err(value_err(&gating_key, "4 (sqrt-softplus)", other)),
        };

        // Next-token-prediction layers count only when the file carries them (as llama.cpp).
        if n_nextn_declared >= n_layer_all {
            return Err(value_err(&key("nextn_predict_layers"), format!("fewer than block_count ({n_layer_all})"), n_nextn_declared));
        }
        let probe = format!("blk.{}.nextn.eh_proj.weight", n_layer_all - n_nextn_declared);
        let n_nextn = if n_nextn_declared > 0 && tensors.get(&probe).is_some() { n_nextn_declared } else { 0 };
        let n_layer = n_layer_all - n_nextn;

        let ratios_key = key("attention.compress_ratios");
        let ratios = md.int_array_in(&ratios_key, 0, MAX_DIM)?;
        if ratios.len() < n_layer_all {
            return Err(value_err(&ratios_key, format!("at least block_count = {n_layer_all} entries"), format!("{} entries", ratios.len())));
        }
        let compress_ratios: Vec<usize> = ratios[..n_layer_all].iter().map(|&r| r as usize).collect();
        if let Some((i, r)) = compress_ratios.iter().enumerate().find(|(_, &r)| r == 1) {
            return Err(value_err(&format!("{ratios_key}[{i}]"), "0 (no compression) or a ratio ≥ 2", r));
        }
        let has_csa = compress_ratios[..n_layer].contains(&4);
        let (indexer_heads, indexer_dim, indexer_top_k) = if has_csa {
            (dim("attention.indexer.head_count")?, dim("attention.indexer.key_length")?, dim("attention.indexer.top_k")?)
        } else {
            (
                md.opt_int_in(&key("attention.indexer.head_count"), 0, MAX_DIM)?.unwrap_or(0) as usize,
                md.opt_int_in(&key("attention.indexer.key_length"), 0, MAX_DIM)?.unwrap_or(0) as usize,
                md.opt_int_in(&key("attention.indexer.top_k"), 0, MAX_DIM)?.unwrap_or(0) as usize,
            )
        };

        let ff_key = key("expert_feed_forward_length");
        let n_ff_exp: Vec<usize> = md.int_or_array_in(&ff_key, n_layer_all, 1, MAX_DIM)?.into_iter().map(|v| v as usize).collect();
        let clamp_exp = md.float_or_array(&key("swiglu_clamp_exp"), n_layer_all)?;
        let clamp_shexp = match md.get(&key("swiglu_clamp_shexp")) {
            Some(_) => md.float_or_array(&key("swiglu_clamp_shexp"), n_layer_all)?,
            None => clamp_exp.clone(),
        };
        for (k, v) in [("swiglu_clamp_exp", &clamp_exp), ("swiglu_clamp_shexp", &clamp_shexp)] {
            if let Some(bad) = v.iter().find(|x| **x < 0.0) {
                return Err(value_err(&key(k), "non-negative clamps (0 = none)", bad));
            }
        }

        let yarn = match md.opt_str(&key("rope.scaling.type"))? {
            Some("yarn") => Some(RopeYarn {
                factor: pos_float("rope.scaling.factor")?,
                original_context: md.int_in(&key("rope.scaling.original_context_length"), 1, i64::MAX as i128)? as u64,
                beta_fast: md.float(&key("rope.scaling.yarn_beta_fast"))? as f32,
                beta_slow: md.float(&key("rope.scaling.yarn_beta_slow"))? as f32,
            }),
            Some("none") | None => None,
            Some(other) => return Err(value_err(&key("rope.scaling.type"), "yarn or none", other)),
        };

        // Vocabulary: the tokenizer's token list; the rows of token_embd may add padding.
        let n_tokens = md.str_array("tokenizer.ggml.tokens")?.len();
        let n_vocab = match tensors.get("token_embd.weight") {
            Some(t) => t.ne[1] as usize,
            None => return Err(LoadError::MissingTensor { name: "token_embd.weight".into() }),
        };
        if n_tokens > n_vocab {
            return Err(LoadError::TensorShape {
                name: format!("token_embd.weight (the tokenizer has {n_tokens} tokens but the embedding has {n_vocab} rows)"),
                expected: vec![n_embd as u64, n_tokens as u64],
                found: tensors.get("token_embd.weight").map(|t| t.shape()).unwrap_or_default(),
            });
        }

        // Relations between values: only those the forward pass needs (a tensor shape or a
        // view would be wrong, or an index out of range). What transformers' DeepseekV4 and
        // llama.cpp accept beyond that is accepted here too: `indexer.key_length` may exceed
        // `key_length`, `hash_layer_count` may exceed the layer count (every layer hashes),
        // and `head_count` need not be a multiple of `output_group_count`. Keys the model
        // does not use (`vocab_size`, `embedding_length_out`, both derived by llama.cpp) are
        // not read.
        // The graph has one K=V head: `attn_kv` is [n_embd, key_length], shared by every
        // query head.
        if n_head_kv != 1 {
            return Err(value_err(&key("attention.head_count_kv"), "1 (one shared key/value head)", n_head_kv));
        }
        // Keys and values are one tensor, so they have one width.
        if value_length != head_dim {
            return Err(value_err(&key("attention.value_length"), format!("key_length ({head_dim}): keys and values are one tensor"), value_length));
        }
        // RoPE rotates pairs of the trailing `n_rot` dims of each head (offset key_length − n_rot).
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(value_err(&key("rope.dimension_count"), format!("an even number ≤ key_length ({head_dim})"), n_rot));
        }
        // The grouped output projection splits the n_head · key_length attention output into
        // `output_group_count` equal slices (transformers: `reshape(..., o_groups, -1)`).
        if (n_head * head_dim) % o_groups != 0 {
            return Err(value_err(
                &key("attention.output_group_count"),
                format!("a divisor of head_count × key_length ({})", n_head * head_dim),
                o_groups,
            ));
        }
        // Top-k over the experts: k of n.
        if n_expert_used > n_expert {
            return Err(value_err(&key("expert_used_count"), format!("≤ expert_count ({n_expert})"), n_expert_used));
        }
        // The indexer's queries and keys carry RoPE on their trailing `n_rot` dims too
        // (offset indexer.key_length − n_rot).
        if has_csa && n_rot > indexer_dim {
            return Err(value_err(&key("attention.indexer.key_length"), format!("≥ rope.dimension_count ({n_rot})"), indexer_dim));
        }

        Ok(Ds4Config {
            n_layer,
            n_layer_all,
            n_nextn,
            n_embd,
            n_vocab,
            n_tokens,
            n_ctx_train,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            q_lora_rank,
            o_lora_rank,
            o_groups,
            window,
            indexer_heads,
            indexer_dim,
            indexer_top_k,
            compress_ratios,
            rope_base,
            compress_rope_base,
            yarn,
            rms_eps,
            n_expert,
            n_expert_used,
            n_expert_shared,
            n_ff_exp,
            expert_weights_scale,
            expert_weights_norm,
            gating,
            n_hash_layers,
            hc_count,
            hc_sinkhorn_iters,
            hc_eps,
            swiglu_clamp_exp: clamp_exp.into_iter().map(|v| v as f32).collect(),
            swiglu_clamp_shexp: clamp_shexp.into_iter().map(|v| v as f32).collect(),
        })
    }

    /// Width of the hyper-connection mixing vector per block: (2 + hc) · hc.
    pub fn hc_mix_dim(&self) -> usize {
        (2 + self.hc_count) * self.hc_count
    }

    pub fn is_hash_layer(&self, layer: usize) -> bool {
        layer < self.n_hash_layers
    }
}
