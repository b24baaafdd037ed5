#!/usr/bin/env bash
# GPU-machine step of the serving-concurrency measurement: scripts/bench/parallel.sh (the
# concurrency sweep and the long prompt arriving mid-stream, against `dflash serve --parallel
# 16` and `--parallel 1`) on the medium synthetic model with the model on CUDA0, then on the
# host's CPU. Usage (GPU machine, repo root, after scripts/device/prepare.sh here), carrying
# .device/bin and .device/ggml-src (.device/bin alone for RUNS=cpu):
#   bash scripts/device/parallel.sh
# Environment: RUNS (default "cuda cpu"), and parallel.sh's (PARALLEL defaults to "16 1" here).
# Writes the per-run JSON and the log to $OUT (or /tmp).
set -euo pipefail
bin=.device/bin
out=${OUT:-/tmp}
exec > >(tee "$out/parallel.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
lscpu | grep -E "Model name|^CPU\(s\)"
export PARALLEL=${PARALLEL:-16 1}
runs=${RUNS:-cuda cpu}
[[ " $runs " != *" cuda "* ]] || [ -f $bin/libggml-cuda.so ] || bash scripts/device/build-cuda.sh
$bin/write_synth --spec medium --type q8_0 --tokenizer-from $bin/ds4-tokenizer.gguf /tmp/medium-q8_0.gguf
for run in $runs; do
  echo "== $run"
  case $run in
    cuda) EXTRA="--device CUDA0 ${EXTRA:-}" bash scripts/bench/parallel.sh $bin/dflash /tmp/medium-q8_0.gguf "$(nproc)" "/tmp/par-$run" ;;
    cpu) bash scripts/bench/parallel.sh $bin/dflash /tmp/medium-q8_0.gguf "$(nproc)" "/tmp/par-$run" ;;
    *) echo "unknown run $run (expected cuda or cpu)" >&2; exit 1 ;;
  esac
  for f in "/tmp/par-$run"/*.json "/tmp/par-$run"/serve-*.log; do cp "$f" "$out/$run-$(basename "$f")"; done
done
