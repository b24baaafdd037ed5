#!/usr/bin/env bash
# GPU-machine step of the placement issue: how far the expert placement moves the logits
# when the model runs on CUDA0 (held experts on the GPU, cold ones on the CPU), against the
# CPU, where every placement gives the same bits (checked here too, on this host's CPU).
# Fixture A with MXFP4 and with Q8_0 experts, 330 tokens, prefill in micro-batches of 512
# and, for the all-cold runs, a prefill of 300 then 30 decode steps.
# Usage (GPU machine, repo root, after scripts/device/prepare.sh here), carrying .device
# (bin, ggml-src, fixtures):
#   bash scripts/device/placement-bound.sh
# It fails when a CUDA0 run is further from the CPU than max |Δlogit| ≤ BOUND_REL · max |logit|
# at every position (default 1.6), or agrees on the argmax at fewer than BOUND_TOP1 of the
# positions (default 0.92): the bound DS4.md states, measured on an H100.
set -euo pipefail
bin=.device/bin
log=${OUT:-/tmp}/placement-bound.log
exec > >(tee "$log") 2>&1
source scripts/device/fixture-a-lib.sh
L() { $bin/dflash logits --tokens /tmp/a.tokens -u 512 -m "$m" --out "/tmp/$1.npy" "${@:2}" 2>&1 | tail -1; }
for f in mxfp4 q8_0; do
  m=tests/fixtures/ds4-tiny-a.$f.gguf
  echo "== fixture A, $f experts"
  L cpu-hot-$f --device CPU -t 8
  L cpu-hot-dec-$f --device CPU -t 8 --decode-from 300
  L cpu-none-w2-$f --device CPU -t 8 --experts-hot none --expert-workers 2 --worker-threads 4
  L cpu-u8-w0-$f --device CPU -t 8 --experts-hot uniform:8 --expert-workers 0 --worker-threads 8
  L cuda-hot-$f --device CUDA0
  # every layer all cold: through the executor (the default computes such layers in the graph)
  L cuda-none-w0-$f --device CUDA0 --experts-hot none --expert-workers 0 --worker-threads 8 -t 8 --cold-layers-in-graph false
  L cuda-none-w2-dec-$f --device CUDA0 --experts-hot none --expert-workers 2 --worker-threads 4 -t 4 --decode-from 300 --cold-layers-in-graph false
  L cuda-u8-w2-$f --device CUDA0 --experts-hot uniform:8 --expert-workers 2 --worker-threads 4 -t 4
  L cuda-ncpu3-w1-$f --device CUDA0 --n-cpu-moe 3 --expert-workers 1 --worker-threads 8 -t 8 --cold-layers-in-graph false
  python3 - "$f" <<'PY'
import os, sys
import numpy as np
f = sys.argv[1]
load = lambda n: np.load(f"/tmp/{n}-{f}.npy")
cpu, cpu_dec = load("cpu-hot"), load("cpu-hot-dec")
for n in ["cpu-none-w2", "cpu-u8-w0"]:
    same = np.array_equal(load(n).view(np.uint32), cpu.view(np.uint32))
    print(f"{n:18} vs cpu-hot: {'the same bits' if same else 'DIFFERENT BITS'}")
    assert same, f"{n}: the CPU placements differ"
# DS4.md's stated bound (measured on an H100 at 53a2d34: worst 1.46, lowest top-1 93.3%)
bound, top1_min = os.environ.get("BOUND_REL", "1.6"), os.environ.get("BOUND_TOP1", "0.92")
worst = 0.0
lowest = 1.0
for n in ["cuda-hot", "cuda-none-w0", "cuda-none-w2-dec", "cuda-u8-w2", "cuda-ncpu3-w1"]:
    g = load(n)
    ref = cpu_dec if n.endswith("-dec") else cpu  # the CPU run of the same prefill/decode split
    rel = np.abs(g - ref).max(axis=1) / np.abs(ref).max(axis=1)
    l2 = np.linalg.norm(g - ref, axis=1) / np.linalg.norm(ref, axis=1)
    top1 = (g.argmax(axis=1) == ref.argmax(axis=1)).mean()
    print(f"{n:18} vs the CPU: max|Δ|/max|l| worst {rel.max():.3e}, median {np.median(rel):.3e}; "
          f"positions > 1e-3: {(rel > 1e-3).sum()}/{len(rel)}; median rel L2 {np.median(l2):.3e}; top-1 {100 * top1:.1f}%")
    worst, lowest = max(worst, rel.max()), min(lowest, top1)
hot = load("cuda-hot")
for n in ["cuda-none-w0", "cuda-u8-w2", "cuda-ncpu3-w1"]:
    g = load(n)
    rel = np.abs(g - hot).max(axis=1) / np.abs(hot).max(axis=1)
    print(f"{n:18} vs cuda-hot: max|Δ|/max|l| worst {rel.max():.3e}, median {np.median(rel):.3e}; top-1 {100 * (g.argmax(axis=1) == hot.argmax(axis=1)).mean():.1f}%")
print(f"{f}: over every CUDA0 placement, worst max|Δ|/max|l| {worst:.3e}, lowest top-1 {100 * lowest:.1f}%")
if bound is not None:
    assert worst <= float(bound), f"{f}: {worst:.3e} > BOUND_REL {bound}"
if top1_min is not None:
    assert lowest >= float(top1_min), f"{f}: top-1 {lowest:.3f} < BOUND_TOP1 {top1_min}"
PY
done
