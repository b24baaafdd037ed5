#!/usr/bin/env python3
"""Evaluate a fixture GGUF with llama.cpp (PyPI llama-cpp-python==0.3.36, built from
source) and compare its logits / greedy continuation with the transformers reference.

    python tools/compare_llama_cpp.py tests/fixtures/ds4-tiny-a.f32.gguf.zst \
        tests/fixtures/ds4-tiny-a.ref.npz [--kv f16]

Only the llama.cpp-compatible fixtures load (compression ratios 0/4/128).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import zstandard


def decompress(path: str, tmp: str) -> str:
    if not path.endswith(".zst"):
        return path
    out = os.path.join(tmp, os.path.basename(path)[:-4])
    with open(path, "rb") as fi, open(out, "wb") as fo:
        zstandard.ZstdDecompressor().copy_stream(fi, fo)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("ref")
    ap.add_argument("--kv", choices=["f32", "f16"], default="f32",
                    help="KV cache type (f16 rounds K/V and flips indexer/router near-ties)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from llama_cpp import Llama

    ref = np.load(args.ref)
    toks = ref["tokens"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = decompress(args.gguf, tmp)
        kw = dict(n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, n_threads=args.threads, verbose=False)
        if args.kv == "f32":
            kw.update(type_k=0, type_v=0)  # GGML_TYPE_F32
        llm = Llama(model_path=path, **kw)
        llm.eval(toks)
        logits = np.array(llm.scores[: len(toks)], dtype=np.float32)

        sub = logits[:, ref["logits_cols"]]
        diff = np.abs(sub - ref["logits_sub"])
        rel = np.linalg.norm(sub - ref["logits_sub"], axis=1) / np.linalg.norm(ref["logits_sub"], axis=1)
        lse = np.log(np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        print(f"logits_sub: max |diff| {diff.max():.3g}, per-position max |diff| p50 {np.median(diff.max(1)):.3g}")
        print(f"relative L2 per position: median {np.median(rel):.3g}, max {rel.max():.3g}")
        print(f"argmax agreement {np.mean(logits.argmax(1) == ref['logits_argmax']):.4f}, "
              f"logsumexp max |diff| {np.abs(lse - ref['logits_logsumexp']).max():.3g}")

        greedy = []
        for _ in range(len(ref["greedy_tokens"])):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(t)
            llm.eval([t])
        same = np.asarray(greedy) == ref["greedy_tokens"]
        first = "none" if same.all() else int(np.argmin(same))
        print(f"greedy continuation: {same.sum()}/{len(same)} tokens agree, first mismatch at {first}")


if __name__ == "__main__":
    main()
