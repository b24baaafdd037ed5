#!/usr/bin/env bash
# GPU machine: the bandwidths the roofline fractions of BENCHMARKS.md divide by: the host's
# memory read with every core (tools/bandwidth/host_read.c: the CPU's pass over cold experts),
# pinned host to device over PCIe, and the device's own memory (tools/bandwidth/h2d.cu); then
# both host readers at once (the CPU's pass and the PCIe copies of decode's split read the
# same memory): what each keeps beside the other. Last, where the staged ggml headers and CPU
# backend are (.device/ggml-src/include, .device/bin: scripts/device/prepare.sh), ggml's MXFP4
# dot product over streamed and over cached rows (tools/bandwidth/mxfp4_dot.c): whether the
# CPU's pass over cold experts is bound by the kernel or by the memory.
# No staging needed: bash scripts/device/bandwidth.sh
set -euo pipefail
d=$(mktemp -d)
cc -O3 -march=native -fopenmp tools/bandwidth/host_read.c -o "$d/host_read"
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
"$nvcc" -O3 tools/bandwidth/h2d.cu -o "$d/h2d"
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)"
OMP_PROC_BIND=spread "$d/host_read" 8
OMP_NUM_THREADS=8 OMP_PROC_BIND=spread "$d/host_read" 8
"$d/h2d"
echo "-- at once: host_read (16 and 8 threads) beside 4 s of back-to-back copies"
"$d/h2d" 4 & h=$!
sleep 0.3
OMP_PROC_BIND=spread "$d/host_read" 2 40
wait $h
"$d/h2d" 4 & h=$!
sleep 0.3
OMP_NUM_THREADS=8 OMP_PROC_BIND=spread "$d/host_read" 2 40
wait $h
if [ -d .device/ggml-src/include ] && [ -f .device/bin/libggml-cpu.so ]; then
  echo "-- ggml's MXFP4 x Q8_0 dot product (the portable CPU backend dflash carries)"
  cc -O2 -fopenmp tools/bandwidth/mxfp4_dot.c -I.device/ggml-src/include -L.device/bin -lggml-cpu -lggml-base -lm -o "$d/mxfp4_dot"
  LD_LIBRARY_PATH=.device/bin OMP_PROC_BIND=spread "$d/mxfp4_dot" 4
fi
