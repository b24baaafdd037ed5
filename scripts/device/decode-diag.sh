#!/usr/bin/env bash
# GPU machine: where single-sequence decode spends its time on the 4-layer full-width file,
# dflash beside llama.cpp in one call, per placement (PLACES, default "hot cold half profile"):
#   - llama.cpp's tg64 at every thread count of THREADS_SWEEP (default: all cores and half);
#   - dflash's tg64 at the same thread counts, with --timings (host build vs compute, the
#     graph's backend runs);
#   - both with CUDA graphs off (GGML_CUDA_DISABLE_GRAPHS=1): whether each uses them;
#   - both with OpenMP's threads spinning between regions (OMP_WAIT_POLICY=active);
#   - dflash with a decoded token's cold experts copied to the GPU over PCIe instead of
#     computed on the CPU (--cold-offload-min 1 with GGML_OP_OFFLOAD_MIN_BATCH=1: the
#     scheduler copies only the experts the token routes to), for the placements with cold
#     experts: whether PCIe beats the host's memory for one token;
#   - dflash with each token's first K router slots of all-cold layers over PCIe while the
#     CPU computes the rest, and every cold slot of partly held layers (profile:) over PCIe
#     (--cold-pcie-slots K, K in PCIE_SLOTS, default "0 2": the runs above take dflash's
#     default, 3 of 6 on a GPU);
#   - eight sequences decoding together with half the layers cold, with and without PCIe;
#   - dflash's op profile of 16 decoded tokens (nodes timed one by one: CPU vs GPU ops).
# Here first: the staging of round.sh (.device/bin, the llama.cpp pack).
#   OUT=/tmp/decode-diag REPS=2 bash scripts/device/decode-diag.sh
set -uo pipefail
AB_NAME=decode-diag
# shellcheck source=scripts/device/ab-setup.sh
source scripts/device/ab-setup.sh
lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|NUMA node|L3 cache"
profile_ready
sweep=${THREADS_SWEEP:-"$t $((t / 2))"}
for place in ${PLACES:-hot cold half profile}; do
  placement "$place"
  echo "== $place (llama.cpp -ncmoe $n)"
  for th in $sweep; do
    echo "llama.cpp -t $th: $("$lb" -m $f -lm none -ngl 99 -fa 0 -ncmoe $n -t "$th" -r "$reps" -p 0 -n 64 -o md 2>&1 | grep tg64 | awk -F'|' '{print $(NF-1)}')"
    # shellcheck disable=SC2086
    echo "dflash    -t $th: $($bin/dflash bench decode -m $f --device CUDA0 -t "$th" -r "$reps" -n 64 $flags --timings 2>&1 | grep -E 't/s|graph build' | sed 's/.*| tg64/tg64/' | tr '\n' ' ')"
  done
  if [ "$place" != hot ]; then
    for k in ${PCIE_SLOTS:-0 2}; do
      # shellcheck disable=SC2086
      echo "dflash    $k slots over PCIe: $($bin/dflash bench decode -m $f --device CUDA0 -t "$t" -r "$reps" -n 64 $flags --cold-pcie-slots $k --timings 2>&1 | grep -E 't/s|graph build' | sed 's/.*| tg64/tg64/' | tr '\n' ' ')"
    done
  fi
  if [ "$place" != hot ]; then
    # shellcheck disable=SC2086
    echo "dflash    cold experts over PCIe: $(GGML_OP_OFFLOAD_MIN_BATCH=1 $bin/dflash bench decode -m $f --device CUDA0 -t "$t" -r "$reps" -n 64 $flags --cold-offload-min 1 --timings 2>&1 | grep -E 't/s|graph build' | sed 's/.*| tg64/tg64/' | tr '\n' ' ')"
  fi
  for env in GGML_CUDA_DISABLE_GRAPHS=1 OMP_WAIT_POLICY=active; do
    echo "llama.cpp $env: $(env $env "$lb" -m $f -lm none -ngl 99 -fa 0 -ncmoe $n -t "$t" -r "$reps" -p 0 -n 64 -o md 2>&1 | grep tg64 | awk -F'|' '{print $(NF-1)}')"
    # shellcheck disable=SC2086
    echo "dflash    $env: $(env $env $bin/dflash bench decode -m $f --device CUDA0 -t "$t" -r "$reps" -n 64 $flags 2>&1 | grep 't/s' | sed 's/.*| tg64/tg64/')"
  done
done 2>&1 | tee "$out/decode-diag.txt"
# eight sequences decoding together with half the layers cold (the continuous-batching
# issue's GPU target: ≥ 3× one sequence's rate, the tg64 above), the CPU computing the cold
# experts, then K of each token's slots over PCIe
placement half
for k in 0 2 3; do
  # shellcheck disable=SC2086
  echo "dflash np8 half, --cold-pcie-slots $k: $($bin/dflash bench decode -m $f --device CUDA0 -t "$t" -r "$reps" -n 32 --np 8 $flags --cold-pcie-slots $k 2>&1 | grep 't/s' | sed 's/.*| tg32/tg32/')"
done 2>&1 | tee "$out/decode-np8.txt"
# the op profile: nodes timed one by one (a sync after each), so absolute times run long
for place in ${PROF_PLACES:-hot cold}; do
  placement "$place"
  echo "== op profile, $place, 16 decoded tokens"
  # shellcheck disable=SC2086
  $bin/dflash bench decode -m $f --device CUDA0 -t "$t" -r 1 -n 16 $flags --op-profile 30 2>&1 | grep -v "^ggml_cuda_init\|^  Device 0\|^load_backend"
done 2>&1 | tee "$out/decode-prof.txt"
