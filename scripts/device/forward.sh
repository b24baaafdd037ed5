#!/usr/bin/env bash
# GPU-machine steps of the forward-pass issue. Usage (repo root, after
# scripts/device/prepare.sh here, carrying .device):
#   bash scripts/device/forward.sh cpu    # CPU: dflash vs llama-bench on the medium model, same run
#   bash scripts/device/forward.sh gpu    # build the CUDA module; fixture logits on CUDA0 vs the
#                                         # transformers references; medium model speed on CUDA0
set -euo pipefail
mode=${1:-cpu}
bin=.device/bin
unzst() {  # decompress a committed fixture: zstd CLI, else python zstandard, else an xz copy
  local f=$1           # staged by prepare.sh under .device/fixtures (the GPU host has xz only)
  [ -f "$f" ] && return 0
  if command -v zstd >/dev/null; then zstd -q -d "$f.zst" -o "$f"
  elif python3 -c "import zstandard" 2>/dev/null; then
    python3 -c "import sys,zstandard; zstandard.ZstdDecompressor().copy_stream(open(sys.argv[1],'rb'), open(sys.argv[2],'wb'))" "$f.zst" "$f"
  else xz -d -c ".device/fixtures/$(basename "$f").xz" > "$f"; fi
}
medium() {
  MODEL=bench-data/medium-q8_0.gguf
  mkdir -p bench-data
  [ -f $MODEL ] || $bin/write_synth --spec medium --type q8_0 --tokenizer-from $bin/ds4-tokenizer.gguf $MODEL >/dev/null
}
case $mode in
cpu)
  lscpu | grep -E "Model name|^CPU\(s\)"
  medium
  MODEL=bench-data/medium-q8_0.gguf GGML_NATIVE=0 REPS=3 ROUNDS=${ROUNDS:-3} bash scripts/bench/cpu-vs-llama.sh $bin .device/llama-src "$(nproc)"
  t=$(nproc)
  # Where the time goes on all cores (one extra repetition, nodes timed one by one), and the
  # micro-batch of 128.
  $bin/dflash bench decode -m bench-data/medium-q8_0.gguf -t $t -n 128 -r 1 --timings --op-profile 40
  $bin/dflash bench prefill -m bench-data/medium-q8_0.gguf -t $t -n 512 -r 1 --timings --op-profile 40
  $bin/dflash bench prefill -m bench-data/medium-q8_0.gguf -t $t -n 512 -u 128 --timings
  ;;
gpu)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  bash scripts/device/build-cuda.sh
  for f in ds4-tiny-a.f32 ds4-tiny-a.mxfp4 ds4-tiny-b.f32; do unzst tests/fixtures/$f.gguf; done
  python3 - <<'PY'
import numpy as np
for n in ["a", "b"]:
    d = np.load(f"tests/fixtures/ds4-tiny-{n}.ref.npz")
    open(f"/tmp/{n}.tokens", "w").write("\n".join(map(str, d["tokens"])))
PY
  for f in a.f32 a.mxfp4 b.f32; do
    n=${f%%.*}
    $bin/dflash logits -m tests/fixtures/ds4-tiny-$f.gguf --device CUDA0 --tokens /tmp/$n.tokens --out /tmp/cuda-$f.npy -u 512 --timings
    $bin/dflash logits -m tests/fixtures/ds4-tiny-$f.gguf --device CUDA0 --tokens /tmp/$n.tokens --out /tmp/cuda-dec-$f.npy --decode-from 100 --timings
    $bin/dflash logits -m tests/fixtures/ds4-tiny-$f.gguf --device CPU --tokens /tmp/$n.tokens --out /tmp/cpu-$f.npy -u 512 --timings
    echo "== fixture $f"
    python3 tools/compare_logits.py tests/fixtures/ds4-tiny-$n.ref.npz cpu=/tmp/cpu-$f.npy cuda=/tmp/cuda-$f.npy cuda-decode=/tmp/cuda-dec-$f.npy
  done
  medium
  $bin/dflash bench decode -m bench-data/medium-q8_0.gguf --device CUDA0 -n 128 --timings
  $bin/dflash bench prefill -m bench-data/medium-q8_0.gguf --device CUDA0 -n 512 -u 512 --timings
  ;;
esac
