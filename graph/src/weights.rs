//! The model's ggml tensors, looked up once by name after loading. The loader validated
//! every name, shape and type, so a missing tensor here is reported, never assumed.
use loader::{Ds4Config, LoadedTensors};

use crate::expert_ffn::ExpertFfn;
use crate::ops::T;
use crate::GraphError;

/// The model's loaded tensors, possibly in several buffers (e.g. the CPU's repacked
/// matrices beside the rest).
pub struct TensorSet(Vec<LoadedTensors>);

impl TensorSet {
    pub fn new(sets: Vec<LoadedTensors>) -> TensorSet {
        TensorSet(sets)
    }

    pub fn get(&self, name: &str) -> Option<T> {
        self.0.iter().find_map(|t| t.get(name)).map(T)
    }

    /// Bytes of the buffers holding the tensors.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|t| t.buffer().size() as u64).sum()
    }
}

pub struct Compressor {
    pub kv: T,
    pub gate: T,
    pub ape: T,
    pub norm: T,
}

pub struct Indexer {
    pub q_b: T,
    pub proj: T,
    pub compressor: Compressor,
}

pub struct HcWeights {
    pub fn_: T,
    pub base: T,
    pub scale: T,
}

pub enum Router {
    /// Learned top-k selection with a selection-only bias.
    TopK { bias: T },
    /// Fixed token → experts table (I32 [n_expert_used, n_vocab]).
    Hash { tid2eid: T },
}

pub struct RoutedWeights {
    /// The held experts (all of the layer's, or the hot subset).
    pub ffn: ExpertFfn,
    /// When only some experts are held: 1/0 per global expert id (held / cold), F32
    /// [n_expert]. (Held experts' local indices come from `cold_begin`.)
    pub held_mask: Option<T>,
}

pub struct LayerWeights {
    pub hc_attn: HcWeights,
    pub hc_ffn: HcWeights,
    pub attn_norm: T,
    pub q_a: T,
    pub q_a_norm: T,
    pub q_b: T,
    pub kv: T,
    pub kv_norm: T,
    pub sinks: T,
    /// [head_dim·n_head/groups, o_lora_rank, groups] (reshaped if the file stores 2-D).
    pub output_a: T,
    pub output_b: T,
    pub compressor: Option<Compressor>,
    pub indexer: Option<Indexer>,
    pub ffn_norm: T,
    pub gate_inp: T,
    pub router: Router,
    /// The routed experts this backend holds (None when every expert of the layer is cold).
    pub experts: Option<RoutedWeights>,
    pub shared: Option<(T, T, T)>,
}

pub struct Weights {
    pub token_embd: T,
    pub output_norm: T,
    pub output: T,
    pub hc_head: HcWeights,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    /// `subsets[l]`: None = every expert of layer l held; Some(None) = none held; Some(Some(
    /// mask)) = some held, with their held mask.
    pub fn lookup(c: &Ds4Config, t: &TensorSet, subsets: &[Option<Option<T>>]) -> Result<Weights, GraphError> {
        let get = |name: &str| -> Result<T, GraphError> {
            t.get(name).ok_or_else(|| GraphError::MissingTensor(name.to_string()))
        };
        let hc = |prefix: &str| -> Result<HcWeights, GraphError> {
            Ok(HcWeights {
                fn_: get(&format!("{prefix}_fn.weight"))?,
                base: get(&format!("{prefix}_base.weight"))?,
                scale: get(&format!("{prefix}_scale.weight"))?,
            })
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let b = |n: &str| get(&format!("blk.{l}.{n}"));
            let ratio = c.compress_ratios[l];
            let compressor = if ratio != 0 {
                Some(Compressor {
                    kv: b("attn_compressor_kv.weight")?,
                    gate: b("attn_compressor_gate.weight")?,
                    ape: b("attn_compressor_ape.weight")?,
                    norm: b("attn_compressor_norm.weight")?,
                })
            } else {
                None
            };
            let indexer = if ratio == 4 {
                Some(Indexer {
                    q_b: b("indexer.attn_q_b.weight")?,
                    proj: b("indexer.proj.weight")?,
                    compressor: Compressor {
                        kv: b("indexer_compressor_kv.weight")?,
                        gate: b("indexer_compressor_gate.weight")?,
                        ape: b("indexer_compressor_ape.weight")?,
                        norm: b("indexer_compressor_norm.weight")?,
                    },
                })
            } else {
                None
            };
            let router = if c.is_hash_layer(l) {
                Router::Hash { tid2eid: b("ffn_gate_tid2eid.weight")? }
            } else {
                Router::TopK { bias: b("exp_probs_b.bias")? }
            };
            let experts = if matches!(subsets.get(l), Some(Some(None))) {
                None
            } else {
                let ffn = ExpertFfn::lookup(l, c.n_ff_exp[l], c.swiglu_clamp_exp[l], |name| t.get(name))
                    .map_err(|m| GraphError::MissingTensor(m.0))?;
                Some(RoutedWeights { ffn, held_mask: subsets.get(l).copied().flatten().flatten() })
            };
            let shared = if c.n_expert_shared > 0 {
                Some((b("ffn_gate_shexp.weight")?, b("ffn_up_shexp.weight")?, b("ffn_down_shexp.weight")?))
            } else {
                None
            };
            layers.push(LayerWeights {
                hc_attn: hc(&format!("blk.{l}.hc_attn"))?,
                hc_ffn: hc(&format!("blk.{l}.hc_ffn"))?,
                attn_norm: b("attn_norm.weight")?,
                q_a: b("attn_q_a.weight")?,
                q_a_norm: b("attn_q_a_norm.weight")?,
                q_b: b("attn_q_b.weight")?,
                kv: b("attn_kv.weight")?,
                kv_norm: b("attn_kv_a_norm.weight")?,
                sinks: b("attn_sinks.weight")?,
                output_a: b("attn_output_a.weight")?,
                output_b: b("attn_output_b.weight")?,
                compressor,
                indexer,
                ffn_norm: b("ffn_norm.weight")?,
                gate_inp: b("ffn_gate_inp.weight")?,
                router,
                experts,
                shared,
            });
        }
        Ok(Weights {
            token_embd: get("token_embd.weight")?,
            output_norm: get("output_norm.weight")?,
            output: get("output.weight")?,
            hc_head: hc("output_hc")?,
            layers,
        })
    }
}

/// Check every `tid2eid` entry of the hash layers lies in [0, n_expert): a bad entry would
/// index past the expert tensors inside ggml.
pub fn validate_tid2eid(c: &Ds4Config, w: &Weights) -> Result<(), GraphError> {
    for (l, layer) in w.layers.iter().enumerate() {
        let Router::Hash { tid2eid } = layer.router else { continue };
        for (i, e) in tid2eid.read_i32().into_iter().enumerate() {
            if e < 0 || e as usize >= c.n_expert {
                let (slot, token) = (i % c.n_expert_used, i / c.n_expert_used);
                return Err(GraphError::BadTid2eid { layer: l, token, slot, value: e, n_expert: c.n_expert });
            }
        }
    }
    Ok(())
}
