//! The tensor table: every tensor of the file with its type, shape and absolute byte range,
//! checked against what the config says a deepseek4 model must hold.
use std::collections::HashMap;

use ggml::{sys, TensorType};

use crate::{Ds4Config, ExpertPart, Gguf, LoadError};

#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: TensorType,
    /// ggml order: ne[0] is the input (row) dimension.
    pub ne: [u64; 4],
    /// Absolute offset of the first byte in the file.
    pub offset: u64,
    pub nbytes: u64,
}

impl TensorInfo {
    /// The shape with trailing unit dimensions dropped (at least one dimension).
    pub fn shape(&self) -> Vec<u64> {
        trim(&self.ne)
    }

    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// Bytes of one slice along the last used dimension (for an expert tensor
    /// {in, out, n_expert}: the bytes of one expert).
    pub fn slice_bytes(&self, dim: usize) -> u64 {
        let n: u64 = self.ne[dim..].iter().product();
        self.nbytes.checked_div(n).unwrap_or(0)
    }
}

fn trim(ne: &[u64]) -> Vec<u64> {
    let mut v = ne.to_vec();
    while v.len() > 1 && *v.last().unwrap() == 1 {
        v.pop();
    }
    v
}

/// All tensors of a file, in file order, with lookup by name.
#[derive(Clone, Debug, Default)]
pub struct TensorInfos {
    pub list: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl TensorInfos {
    pub fn from_list(list: Vec<TensorInfo>) -> TensorInfos {
        let index = list.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        TensorInfos { list, index }
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.list[i])
    }
}

/// Read the tensor descriptions of a parsed GGUF and check each byte range against the file.
pub fn read_infos(gguf: &Gguf, file_len: u64) -> Result<TensorInfos, LoadError> {
    let ctx = gguf.as_ptr();
    let data_offset = gguf.data_offset();
    let mut list = Vec::new();
    // SAFETY: ids are in [0, n_tensors); ggml validated type, shape and size at parse time.
    unsafe {
        for id in 0..sys::gguf_get_n_tensors(ctx) {
            let name = Gguf::str_at(sys::gguf_get_tensor_name(ctx, id));
            let raw_ty = sys::gguf_get_tensor_type(ctx, id);
            let ty = TensorType::from_raw(raw_ty).ok_or_else(|| LoadError::TensorType {
                name: name.clone(),
                expected: "a ggml tensor type".into(),
                found: format!("type number {raw_ty}"),
            })?;
            let ne_ptr = sys::gguf_get_tensor_ne(ctx, id);
            let mut ne = [1u64; 4];
            for (d, n) in ne.iter_mut().enumerate() {
                let v = *ne_ptr.add(d);
                *n = u64::try_from(v).map_err(|_| LoadError::TensorShape { name: name.clone(), expected: vec![], found: vec![] })?;
            }
            let rel = sys::gguf_get_tensor_offset(ctx, id) as u64;
            let nbytes = sys::gguf_get_tensor_size(ctx, id) as u64;
            let overflow = |what: &str| LoadError::Overflow { name: name.clone(), what: what.to_string() };
            // Independent size check: rows × row bytes must equal what ggml reports.
            let row = ty.row_bytes(ne[0]).ok_or_else(|| overflow("row size"))?;
            let expect = ne[1..].iter().try_fold(row, |acc, &n| acc.checked_mul(n)).ok_or_else(|| overflow("tensor size"))?;
            if expect != nbytes {
                return Err(LoadError::TensorData { name, reason: format!("size {nbytes} bytes, expected {expect} for type {ty} and shape {ne:?}") });
            }
            let start = data_offset.checked_add(rel).ok_or_else(|| overflow("data offset + tensor offset"))?;
            let end = start.checked_add(nbytes).ok_or_else(|| overflow("offset + size"))?;
            if end > file_len {
                return Err(LoadError::TensorOutOfFile { name, start, end, file_len });
            }
            list.push(TensorInfo { name, ty, ne, offset: start, nbytes });
        }
    }
    Ok(TensorInfos::from_list(list))
}

/// What kind of data a tensor must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// A weight matrix: any float or quantized type ggml can multiply.
    Matrix,
    /// Norm weights, hyper-connection parameters, sinks, biases, position biases: F32.
    F32,
    /// An integer table (hash routing): I32.
    I32,
}

impl TensorRole {
    fn allows(self, ty: TensorType) -> bool {
        match self {
            TensorRole::Matrix => ty == TensorType::F32 || ty == TensorType::F16 || ty == TensorType::BF16 || ty.is_quantized(),
            TensorRole::F32 => ty == TensorType::F32,
            TensorRole::I32 => ty == TensorType::I32,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            TensorRole::Matrix => "F32, F16, BF16 or a quantized type",
            TensorRole::F32 => "F32",
            TensorRole::I32 => "I32",
        }
    }
}

struct Spec {
    name: String,
    shapes: Vec<Vec<u64>>,
    role: TensorRole,
}

fn spec(name: impl Into<String>, shape: &[usize], role: TensorRole) -> Spec {
    Spec { name: name.into(), shapes: vec![trim(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>())], role }
}

/// The expected tensors of the main model (next-token-prediction layers are not used).
fn expected(c: &Ds4Config) -> Vec<Spec> {
    use TensorRole::*;
    let (e, v, hd) = (c.n_embd, c.n_vocab, c.head_dim);
    let hc_dim = c.hc_count * e;
    let mix = c.hc_mix_dim();
    let mut s = vec![
        spec("token_embd.weight", &[e, v], Matrix),
        spec("output_norm.weight", &[e], F32),
        spec("output.weight", &[e, v], Matrix),
        spec("output_hc_fn.weight", &[hc_dim, c.hc_count], F32),
        spec("output_hc_base.weight", &[c.hc_count], F32),
        spec("output_hc_scale.weight", &[1], F32),
    ];
    for l in 0..c.n_layer {
        let b = |n: &str| format!("blk.{l}.{n}");
        let ff = c.n_ff_exp[l];
        s.extend([
            spec(b("attn_norm.weight"), &[e], F32),
            spec(b("attn_sinks.weight"), &[c.n_head], F32),
            spec(b("attn_q_a.weight"), &[e, c.q_lora_rank], Matrix),
            spec(b("attn_q_a_norm.weight"), &[c.q_lora_rank], F32),
            spec(b("attn_q_b.weight"), &[c.q_lora_rank, c.n_head * hd], Matrix),
            spec(b("attn_kv.weight"), &[e, hd], Matrix),
            spec(b("attn_kv_a_norm.weight"), &[hd], F32),
            spec(b("attn_output_b.weight"), &[c.o_groups * c.o_lora_rank, e], Matrix),
        ]);
        let oa_in = c.n_head * hd / c.o_groups;
        s.push(Spec {
            name: b("attn_output_a.weight"),
            shapes: vec![
                vec![oa_in as u64, (c.o_lora_rank * c.o_groups) as u64],
                vec![oa_in as u64, c.o_lora_rank as u64, c.o_groups as u64],
            ],
            role: Matrix,
        });
        for part in ["attn", "ffn"] {
            s.extend([
                spec(b(&format!("hc_{part}_fn.weight")), &[hc_dim, mix], F32),
                spec(b(&format!("hc_{part}_base.weight")), &[mix], F32),
                spec(b(&format!("hc_{part}_scale.weight")), &[3], F32),
            ]);
        }
        let ratio = c.compress_ratios[l];
        if ratio != 0 {
            let coff = if ratio == 4 { 2 } else { 1 };
            s.extend([
                spec(b("attn_compressor_kv.weight"), &[e, coff * hd], Matrix),
                spec(b("attn_compressor_gate.weight"), &[e, coff * hd], Matrix),
                spec(b("attn_compressor_ape.weight"), &[coff * hd, ratio], F32),
                spec(b("attn_compressor_norm.weight"), &[hd], F32),
            ]);
            if ratio == 4 {
                let id = c.indexer_dim;
                s.extend([
                    spec(b("indexer.proj.weight"), &[e, c.indexer_heads], Matrix),
                    spec(b("indexer.attn_q_b.weight"), &[c.q_lora_rank, c.indexer_heads * id], Matrix),
                    spec(b("indexer_compressor_kv.weight"), &[e, 2 * id], Matrix),
                    spec(b("indexer_compressor_gate.weight"), &[e, 2 * id], Matrix),
                    spec(b("indexer_compressor_ape.weight"), &[2 * id, ratio], F32),
                    spec(b("indexer_compressor_norm.weight"), &[id], F32),
                ]);
            }
        }
        s.push(spec(b("ffn_gate_inp.weight"), &[e, c.n_expert], Matrix));
        if c.is_hash_layer(l) {
            s.push(spec(b("ffn_gate_tid2eid.weight"), &[c.n_expert_used, v], I32));
        } else {
            s.push(spec(b("exp_probs_b.bias"), &[c.n_expert], F32));
        }
        s.push(spec(b("ffn_norm.weight"), &[e], F32));
        s.push(spec(ExpertPart::Down.name(l), &[ff, e, c.n_expert], Matrix));
        if c.n_expert_shared > 0 {
            let sh = ff * c.n_expert_shared;
            s.extend([
                spec(b("ffn_gate_shexp.weight"), &[e, sh], Matrix),
                spec(b("ffn_up_shexp.weight"), &[e, sh], Matrix),
                spec(b("ffn_down_shexp.weight"), &[sh, e], Matrix),
            ]);
        }
    }
    s
}

/// A file's tensors, validated against a [`Ds4Config`].
#[derive(Clone, Debug)]
pub struct TensorTable {
    infos: TensorInfos,
    /// Tensors the main model does not use (next-token-prediction layers, extras).
    pub unused: Vec<String>,
}

impl TensorTable {
    pub fn validate(infos: TensorInfos, c: &Ds4Config) -> Result<TensorTable, LoadError> {
        let mut used = std::collections::HashSet::new();
        let check = |name: &str, shapes: &[Vec<u64>], role: TensorRole| -> Result<(), LoadError> {
            let t = infos.get(name).ok_or_else(|| LoadError::MissingTensor { name: name.to_string() })?;
            if !shapes.iter().any(|s| *s == t.shape()) {
                return Err(LoadError::TensorShape { name: name.to_string(), expected: shapes[0].clone(), found: t.shape() });
            }
            if !role.allows(t.ty) {
                return Err(LoadError::TensorType { name: name.to_string(), expected: role.describe().into(), found: t.ty.to_string() });
            }
            Ok(())
        };
        for s in expected(c) {
            check(&s.name, &s.shapes, s.role)?;
            used.insert(s.name);
        }
        // Routed expert gate/up: separate tensors, or one fused tensor.
        for l in 0..c.n_layer {
            let (e, ff, n) = (c.n_embd as u64, c.n_ff_exp[l] as u64, c.n_expert as u64);
            let fused = ExpertPart::GateUp.name(l);
            if infos.get(&fused).is_some() {
                check(&fused, &[vec![e, 2 * ff, n]], TensorRole::Matrix)?;
                used.insert(fused);
            } else {
                for part in [ExpertPart::Gate, ExpertPart::Up] {
                    let name = part.name(l);
                    check(&name, &[vec![e, ff, n]], TensorRole::Matrix)?;
                    used.insert(name);
                }
            }
        }
        let unused: Vec<String> = infos.list.iter().filter(|t| !used.contains(&t.name)).map(|t| t.name.clone()).collect();
        let nextn_prefix = |n: &str| (c.n_layer..c.n_layer_all).any(|l| n.starts_with(&format!("blk.{l}.")));
        for name in unused.iter().filter(|n| !nextn_prefix(n)) {
            tracing::warn!(tensor = %name, "tensor not used by the deepseek4 graph");
        }
        Ok(TensorTable { infos, unused })
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.infos.get(name)
    }

    /// A tensor the validation guaranteed to exist.
    pub fn expect(&self, name: &str) -> Result<&TensorInfo, LoadError> {
        self.get(name).ok_or_else(|| LoadError::MissingTensor { name: name.to_string() })
    }

    pub fn iter(&self) -> impl Iterator<Item = &TensorInfo> {
        self.infos.list.iter()
    }

    pub fn len(&self) -> usize {
        self.infos.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.infos.list.is_empty()
    }

    pub fn total_bytes(&self) -> u64 {
        self.iter().map(|t| t.nbytes).sum()
    }
}
