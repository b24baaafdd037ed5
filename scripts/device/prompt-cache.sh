#!/usr/bin/env bash
# GPU-machine step of the prompt-cache issue: scripts/bench/prompt-cache.sh (the agent
# conversation without the cache, with it, and after a restart) on the medium synthetic model
# with the model on CUDA0, then on the host's CPU. Usage (GPU machine, repo root, after
# scripts/device/prepare.sh here), carrying .device/bin and .device/ggml-src:
#   bash scripts/device/prompt-cache.sh
# Writes the per-run JSON and the log to $OUT (or /tmp).
set -euo pipefail
bin=.device/bin
out=${OUT:-/tmp}
exec > >(tee "$out/prompt-cache.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
bash scripts/device/build-cuda.sh
$bin/write_synth --spec medium --type q8_0 --tokenizer-from $bin/ds4-tokenizer.gguf /tmp/medium-q8_0.gguf
for run in ${RUNS:-cuda cpu}; do
  echo "== $run"
  case $run in
    cuda) EXTRA="--device CUDA0" bash scripts/bench/prompt-cache.sh $bin/dflash /tmp/medium-q8_0.gguf "$(nproc)" /tmp/pc-$run ;;
    cpu) bash scripts/bench/prompt-cache.sh $bin/dflash /tmp/medium-q8_0.gguf "$(nproc)" /tmp/pc-$run ;;
  esac
  for f in off on restart; do cp /tmp/pc-$run/$f.json "$out/$run-$f.json"; done
done
