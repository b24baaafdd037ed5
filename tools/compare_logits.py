#!/usr/bin/env python3
"""Compare logits files (.npy float32 [n_tokens, n_vocab], e.g. from `dflash logits` and
tools/llama-logits) with a fixture's transformers reference (.ref.npz) and with each other.

usage: compare_logits.py REF.npz NAME=FILE.npy [NAME=FILE.npy ...]
"""
import sys

import numpy as np


def stats_vs_ref(ref, logits):
    cols = ref["logits_cols"]
    sub = logits[:, cols]
    want = ref["logits_sub"][: len(logits)]
    d = np.abs(sub - want).max(axis=1)
    rel_pos = d / ref["logits_max_abs"][: len(logits)]
    rel_l2 = np.linalg.norm(sub - want, axis=1) / np.linalg.norm(want, axis=1)
    top1 = (logits.argmax(axis=1) == ref["logits_argmax"][: len(logits)]).mean()
    return d.max(), rel_pos.max(), np.median(rel_l2), top1


def main():
    ref = np.load(sys.argv[1])
    files = {}
    for arg in sys.argv[2:]:
        name, path = arg.split("=", 1)
        files[name] = np.load(path)
    print(f"{'':12} {'max|Δ|':>10} {'max|Δ|/max|l|':>15} {'median rel L2':>14} {'top-1':>7}   (vs transformers, {len(ref['logits_cols'])} columns)")
    for name, lg in files.items():
        mx, rel, l2, top1 = stats_vs_ref(ref, lg)
        print(f"{name:12} {mx:10.3e} {rel:15.3e} {l2:14.3e} {100 * top1:6.1f}%")
    names = list(files)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = files[names[i]], files[names[j]]
            d = np.abs(a - b)
            l2 = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
            agree = (a.argmax(axis=1) == b.argmax(axis=1)).mean()
            print(f"{names[i]} vs {names[j]} (all {a.shape[1]} columns): max|Δ| {d.max():.3e}, median rel L2 {np.median(l2):.3e}, top-1 {100 * agree:.1f}%")


if __name__ == "__main__":
    main()
