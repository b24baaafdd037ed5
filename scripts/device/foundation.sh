#!/usr/bin/env bash
# GPU step of the foundation: build the CUDA module, list devices, and check a 4096×4096
# F16 matmul on CUDA0 against the CPU backend. Usage (GPU machine, repo root, after
# scripts/device/prepare.sh here and carrying .device): bash scripts/device/foundation.sh
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bash scripts/device/build-cuda.sh
./.device/bin/dflash devices
./.device/bin/dflash devices --check-matmul 4096 -t "$(nproc)"
# Bring the module back (xz, in parts under the 16 MiB file limit) to reuse it later.
if [ -n "${OUT:-}" ]; then xz -T0 -c .device/bin/libggml-cuda.so | split -b 15M - "$OUT/libggml-cuda.so.xz.part-" || true; fi
