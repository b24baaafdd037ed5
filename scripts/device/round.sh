#!/usr/bin/env bash
# GPU machine: one device call's worth of the full-width and serving measurements, in the
# order of their value, so that a call cut short still returns whole results. Each part writes
# its log under $OUT/<part>/ (at most two folders down, as the device tool returns them).
# Here first: scripts/device/prepare.sh (or the same staging by hand: .device/bin/dflash.xz,
# the tokenizer, libggml*.so, write_synth, llama-src); there, carrying .device (with a pack of
# the llama.cpp build in .device/, carry .device/bin, .device/fixtures, .device/commit and the
# pack's parts instead: llama-src is then not needed, and both would pass the 64 MiB a call
# carries):
#   bash scripts/device/round.sh [PART...]
# Parts (default: all, in this order):
#   pairs4   build llama.cpp + its CUDA module (both engines load it) while the 4-layer file
#            is written (or unpack .device/llama-pack-fa0.tar.xz.part*), then
#            fullwidth-vs-llama.sh pairs on 4 layers ($PAIRS4); with no pack in .device, the build
#            is also packed into $OUT/pairs4/ (copy those parts into .device/ for the next call)
#   exact    fixture A on CUDA0 with cold experts through the executor, offloaded and in the
#            graph, against all hot and the transformers reference (fullwidth-vs-llama.sh exact;
#            needs .device/fixtures)
#   bbound   batched-vs-alone logits on CUDA0 (batch-bound.sh; needs .device/fixtures)
#   ab       the medium model, OLD (default .device/bin/dflash-93b7d08.xz, when staged)
#            against this dflash, interleaved (gpu-experts.sh ab)
#   np8      4 layers, 8 sequences decoding together: half cold, its cold experts streamed, all
#            hot; and the adaptive placement's decode
#   ub       (only when named) pp2048 at micro-batches of 512 and 2048 tokens, both engines, on
#            4 layers all on the GPU and every expert cold (how much a bigger micro-batch buys
#            when the cold experts stream over PCIe)
#   prof     (only when named) where the time of a 4-layer pp512 / tg16 goes, all on the GPU and
#            every expert cold: dflash --op-profile, and, where nsys is installed, the GPU
#            kernel and copy sums of llama-bench and dflash bench side by side
#   scale16  (only when named) real scale: the 16-layer file (58 GB) written to /dev/shm (the
#            disk is too small beside the other files), half of every layer's experts cold in 2
#            worker processes (no pinned copy: the file itself takes 54 GiB of the host's memory);
#            load time and GB/s, peak RSS of every process, peak GPU memory
#            against `dflash inspect`'s projection, tg16
#   cpunp8   (only when named) the medium model on the host's CPU: one sequence, then 8 decoding
#            together (the CPU target of continuous batching), and both op-profiled
#   diag     (only when named) where single-sequence decode spends its time, beside
#            llama.cpp (decode-diag.sh: threads, CUDA graphs, OpenMP wait policy, a token's
#            cold experts over PCIe, --timings, op profile)
#   matrix8  (only when named) every test of the full-width issue on the 8-layer file
#            (fullwidth-vs-llama.sh matrix: pp512, pp2048, tg64, tg64 at depth, peak GPU
#            memory; MATRIX8 placements, default "hot half cold profile"), the 4-layer file
#            removed first: with the fifth run's 4-layer matrix, the per-layer slopes
#   bw       (only when named) the bandwidths the roofline fractions divide by (bandwidth.sh:
#            the host's memory read with every core, pinned host to device, device to device)
#   np8gap   (only when named) 4 layers, 8 sequences, half cold, no PCIe split: `bench decode`
#            against `bench tests` (the fourth run's 414.5 t/s came from the latter, the sixth
#            run's 250.1 from the former), the cold layers in the graph against the executor,
#            and `--timings` of each: where the gap between those two runs lies
#   splitt   (only when named) 4 layers, decode with --timings at K = 0, 2, 3, 4 of the cold slots
#            over PCIe (every expert cold), half cold at K = 3, one and 8 sequences, and all on
#            the GPU: where a split layer's time goes (to the router, plan, CPU slots)
#   cpuk     (only when named) 4 layers, tg64: the CPU's kernel for cold experts. llama.cpp
#            every expert cold with its experts in pinned host memory (its default beside a
#            GPU), in ggml's repacked CPU layout (--no-host 1: interleaved rows, its AVX2 GEMV)
#            and plain (--no-host 1 --repack 0); llama.cpp -ncmoe 0/2 and dflash all hot, half
#            and every expert cold (K = 0 and 3) in the same call
#   kern     (only when named) 4 layers, every expert cold and half cold: llama.cpp's tg64 at
#            -ncmoe 4 and 2, then the split's CPU slots through dflash's MXFP4 product (the
#            default) at K = 3 and 2 against ggml's (--cold-cpu-ggml-kernel) at K = 3,
#            alternated, with --timings; half of every layer's experts held (uniform:128), all
#            cold slots staged against the CPU's share (--cold-pcie-partial-cpu); 8 sequences half cold
#            through each kernel; 16 sequences every expert cold (in the graph, past
#            the split's 8 tokens) through each kernel; `dflash bench experts` (the CPU's product alone, at
#            1 to 32 tokens an expert, dflash's and ggml's); KERN_ROUNDS rounds (default 1);
#            with KERN_BW=1 then bandwidth.sh (with tools/bandwidth/mxfp4_dot.c, both kernels;
#            carry .device/ggml-src/include)
#   kmin     (only when named) kern's shortest form: `dflash bench experts` (1, 4, 16 tokens),
#            then on 4 layers llama.cpp -ncmoe 4 and every expert cold at K = 3 through each
#            kernel and K = 2, and uniform:128 with and without --cold-pcie-partial-cpu
#   pairs8   (only when named) the 8-layer file, written after the 4-layer one is removed (the
#            two, 42 GB, nearly fill the host's 64 GB disk), then fullwidth-vs-llama.sh pairs on
#            it ($PAIRS8), for the per-layer slopes
# Any part run without pairs4 before it first copies the CUDA module beside dflash (from the
# warm machine's /tmp/llama-build or the unpacked pack) and, where it needs it, writes the
# 4-layer file.
# Environment: FA (default 0), REPS (default 2), PAIRS4 (default "cold hot half profile
# cold-exec"), PAIRS8 (default "hot cold").
set -uo pipefail
out=${OUT:-/tmp/round}
mkdir -p "$out"
(cd .device/bin && for f in *.xz; do [ -f "${f%.xz}" ] || xz -d -k "$f"; done)
chmod +x .device/bin/dflash .device/bin/write_synth
export FA=${FA:-0} REPS=${REPS:-2}
parts=${*:-pairs4 exact bbound ab np8}
on() { [[ " $parts " == *" $1 "* ]]; }
quiet() { grep -v "^  *[0-9]*%\|it/s"; }
fw() { bash scripts/device/fullwidth-vs-llama.sh "$@" 2>&1 | quiet; }
t0=$(date +%s)
stamp() { echo "## $(( $(date +%s) - t0 )) s: $*"; }
# The CUDA module beside dflash (a call's carried .device/bin replaces the last call's copy;
# the llama.cpp build itself stays in /tmp on a warm machine, or is unpacked) and the 4-layer
# file (which scale16 and pairs8 remove), for parts that run without pairs4 before them.
ready4() {
  [ -f .device/bin/libggml-cuda.so ] && [ -f bench-data/v4f-4l.gguf ] && return
  OUT=$out LAYERS=4 fw build files | tail -3
}
cuda() { [ -f .device/bin/libggml-cuda.so ] || OUT=$out fw build | tail -3; }
# LABEL FLAGS...: one `dflash bench decode` on the 4-layer file (-t: $T, default every core),
# its rate and any --timings lines on one line
decode_line() {
  local label=$1; shift
  echo "$label: $(.device/bin/dflash bench decode -m bench-data/v4f-4l.gguf --device CUDA0 -t "${T:-$(nproc)}" -r "$REPS" "$@" 2>&1 \
    | grep -E 't/s|graph build|PCIe split' | sed 's/.*| tg/tg/' | tr '\n' ' ')"
}

if on bw; then
  mkdir -p "$out/bw"
  stamp "bandwidths"
  bash scripts/device/bandwidth.sh 2>&1 | tee "$out/bw/bandwidth.txt"
fi
if on pairs4; then
  mkdir -p "$out/pairs4"
  stamp "build + files"
  OUT=$out/pairs4 LAYERS=4 fw build files
  compgen -G ".device/llama-pack-fa$FA.tar.xz.part*" >/dev/null || OUT=$out/pairs4 fw pack
  stamp "pairs 4 layers"
  OUT=$out/pairs4 LAYERS=4 PLACEMENTS="${PAIRS4:-cold hot half profile cold-exec}" fw pairs
fi
if on exact; then
  mkdir -p "$out/exact"
  cuda
  stamp "exact"
  OUT=$out/exact fw exact
fi
if on bbound; then
  mkdir -p "$out/bbound"
  cuda
  stamp "batch bound"
  OUT=$out/bbound bash scripts/device/batch-bound.sh 2>&1 | quiet
fi
if on ab; then
  old=${OLD:-.device/bin/dflash-93b7d08.xz}
  if [ -f "$old" ]; then
    mkdir -p "$out/ab"
    stamp "ab: $old against $(cat .device/commit)"
    OUT=$out/ab OLD=$old bash scripts/device/gpu-experts.sh ab 2>&1 | quiet | grep -v "^\s*$"
  fi
fi
if on np8; then
  mkdir -p "$out/np8"
  ready4
  stamp "np8"
  OUT=$out/np8 LAYERS=4 PLACEMENTS="half-np8 half-np8-stream hot-np8 adaptive" fw pairs
fi
if on ub; then
  mkdir -p "$out/ub"
  ready4
  stamp "ub"
  f=bench-data/v4f-4l.gguf
  lb=$(find /tmp/llama-build -name llama-bench -type f -perm -u+x | head -1)
  for n in 0 2 4; do
    "$lb" -m $f -lm none -ngl 99 -fa "$FA" -ncmoe $n -t "$(nproc)" -r "$REPS" -p 2048 -n 0 -b 2048 -ub 512,2048 -o md 2>&1 | grep "pp2048"
  done | tee "$out/ub/llama.txt"
  for u in 512 2048; do
    for place in "--experts-hot all" "--cpu-moe --expert-workers 0" "--cpu-moe --expert-workers 0 --cold-stream-min 0" "--n-cpu-moe 2 --expert-workers 0" "--n-cpu-moe 2 --expert-workers 0 --cold-stream-min 0"; do
      # shellcheck disable=SC2086
      .device/bin/dflash bench prefill -m $f --device CUDA0 -t "$(nproc)" -r "$REPS" -n 2048 -u $u $place 2>&1 | grep "t/s" | sed "s|\$| [$place]|"
    done
  done | tee "$out/ub/dflash.txt"
fi
if on prof; then
  mkdir -p "$out/prof"
  ready4
  stamp "prof"
  f=bench-data/v4f-4l.gguf
  lb=$(find /tmp/llama-build -name llama-bench -type f -perm -u+x | head -1)
  .device/bin/dflash bench tests -m $f --device CUDA0 -t "$(nproc)" -r 1 -p 512 --decode 16 --experts-hot all --op-profile 40 \
    >"$out/prof/dflash-hot-ops.txt" 2>&1
  nsys=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
  echo "nsys: ${nsys:-none}"
  if [ -n "$nsys" ]; then
    # one pp512 (after one warm-up) per engine and placement; the kernel and copy sums side by side
    prof_one() { # NAME CMD...
      local name=$1; shift
      timeout 120 "$nsys" profile --trace=cuda -o "/tmp/nsys-$name" --force-overwrite true "$@" >"$out/prof/$name.run.txt" 2>&1
      for r in cuda_gpu_kern_sum cuda_gpu_mem_time_sum cuda_api_sum; do
        timeout 60 "$nsys" stats -q --report $r --format csv "/tmp/nsys-$name.nsys-rep" 2>/dev/null | head -45 >"$out/prof/$name.$r.csv"
      done
    }
    prof_one llama-hot "$lb" -m $f -lm none -ngl 99 -fa "$FA" -t "$(nproc)" -r 1 -p 512 -n 0
    prof_one dflash-hot .device/bin/dflash bench prefill -m $f --device CUDA0 -t "$(nproc)" -r 1 -n 512 --experts-hot all
    prof_one llama-cold "$lb" -m $f -lm none -ngl 99 -fa "$FA" -ncmoe 4 -t "$(nproc)" -r 1 -p 512 -n 0
    prof_one dflash-cold .device/bin/dflash bench prefill -m $f --device CUDA0 -t "$(nproc)" -r 1 -n 512 --cpu-moe --expert-workers 0
  fi
fi
if on scale16; then
  mkdir -p "$out/scale16"
  cuda
  stamp "scale16"
  rm -f bench-data/v4f-4l.gguf bench-data/v4f-8l.gguf
  # the 58 GB file where 60 GB are free: /dev/shm (in memory), else the disk
  avail() { df -B1G --output=avail "$1" 2>/dev/null | tail -1 | tr -d ' '; }
  df -h /dev/shm bench-data | tail -2
  if [ "$(avail /dev/shm)" -ge 60 ]; then f=/dev/shm/v4f-16l.gguf; elif [ "$(avail bench-data)" -ge 60 ]; then f=bench-data/v4f-16l.gguf; else f=; fi
  if [ -z "$f" ]; then echo "scale16: no 60 GB free for the 16-layer file"; else
  t=$(date +%s%N)
  .device/bin/write_synth --spec v4-flash --layers 16 --tokenizer-from .device/bin/ds4-tokenizer.gguf $f \
    >"$out/scale16/write.txt" 2>&1
  echo "write: $(( ($(date +%s%N) - t) / 1000000 )) ms; $(ls -l $f | awk '{print $5}') bytes"
  .device/bin/dflash inspect $f --gpu-gib 80,141 | tail -25 >"$out/scale16/inspect.txt" 2>&1
  # every 0.5 s: the resident set of every dflash process (the daemon and its workers)
  ( while sleep 0.5; do ps -C dflash -o pid=,rss=,args= ; done ) >/tmp/rss.txt 2>/dev/null &
  rss=$!
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >/tmp/gpu.txt &
  smi=$!
  t=$(date +%s%N)
  RUST_LOG=info .device/bin/dflash bench tests -m $f --device CUDA0 \
    --experts-hot uniform:128 --expert-workers 2 --worker-threads 8 --cold-offload-min 0 -t 16 -r 1 -p 0 --decode 16 --timings \
    >"$out/scale16/bench.txt" 2>&1
  rc=$?
  echo "bench (load, then tg16): $(( ($(date +%s%N) - t) / 1000000 )) ms, rc $rc"
  kill $rss $smi; wait $rss $smi 2>/dev/null
  grep -v "^\s*$" "$out/scale16/bench.txt" | grep -iv "progress" | tail -40
  echo "peak GPU memory $(sort -n /tmp/gpu.txt | tail -1) MiB"
  python3 - /tmp/rss.txt <<'PY'
import sys, collections
peak = collections.defaultdict(int); what = {}
for line in open(sys.argv[1]):
    p = line.split(None, 2)
    if len(p) >= 2 and p[1].isdigit():
        peak[p[0]] = max(peak[p[0]], int(p[1])); what[p[0]] = (p[2] if len(p) > 2 else "")[:90]
for pid, kib in sorted(peak.items(), key=lambda x: -x[1]):
    print(f"peak RSS pid {pid}: {kib / 2**20:.2f} GiB  {what[pid]}")
PY
  rm -f $f
  fi
fi
if on cpunp8; then
  mkdir -p "$out/cpunp8"
  stamp "cpunp8"
  m=bench-data/medium-q8_0.gguf
  [ -f $m ] || .device/bin/write_synth --spec medium --type q8_0 --tokenizer-from .device/bin/ds4-tokenizer.gguf $m >/dev/null
  for np in 1 8 1 8; do
    .device/bin/dflash bench decode -m $m --device CPU -t "$(nproc)" -n 32 -r 2 --np $np 2>&1 | grep "t/s"
  done | tee "$out/cpunp8/decode.txt"
  for np in 1 8; do
    .device/bin/dflash bench decode -m $m --device CPU -t "$(nproc)" -n 16 -r 1 --np $np --op-profile 25 >"$out/cpunp8/ops-np$np.txt" 2>&1
  done
fi
if on diag; then
  mkdir -p "$out/diag"
  ready4
  stamp "diag"
  OUT=$out/diag bash scripts/device/decode-diag.sh 2>&1 | quiet
fi
if on matrix8; then
  mkdir -p "$out/matrix8"
  cuda
  stamp "matrix 8 layers"
  rm -f bench-data/v4f-4l.gguf
  OUT=$out/matrix8 LAYERS=8 DEPTH=${DEPTH:-4096} MATRIX="${MATRIX8:-hot half cold profile}" fw files matrix | tee "$out/matrix8/matrix.txt"
fi
if on np8gap; then
  mkdir -p "$out/np8gap"
  ready4
  stamp "np8gap"
  f=bench-data/v4f-4l.gguf
  half="--n-cpu-moe 2 --expert-workers 0 --worker-threads $(nproc) --cold-pcie-slots 0"
  for v in "" "--cold-layers-in-graph false"; do
    # shellcheck disable=SC2086
    echo "bench decode np8 [$v]: $(.device/bin/dflash bench decode -m $f --device CUDA0 -t "$(nproc)" -r "$REPS" -n 32 --np 8 $half $v --timings 2>&1 | grep -E 't/s|graph build' | tr '\n' ' ')"
    # shellcheck disable=SC2086
    echo "bench tests np8 [$v]: $(.device/bin/dflash bench tests -m $f --device CUDA0 -t "$(nproc)" -r "$REPS" -p 0 --decode 32 --np 8 $half $v --timings 2>&1 | grep -E 't/s|graph build' | tr '\n' ' ')"
    # shellcheck disable=SC2086
    echo "bench decode np1 [$v]: $(.device/bin/dflash bench decode -m $f --device CUDA0 -t "$(nproc)" -r "$REPS" -n 64 $half $v 2>&1 | grep 't/s')"
  done | tee "$out/np8gap/np8gap.txt"
fi
if on splitt; then
  mkdir -p "$out/splitt"
  ready4
  stamp "split timings"
  ex="--expert-workers 0 --worker-threads $(nproc)"
  dec() { decode_line "$@" --timings; }
  {
    dec "hot tg64" -n 64 --experts-hot all
    for k in 0 2 3 4; do dec "cold K=$k tg64" -n 64 --cpu-moe $ex --cold-pcie-slots $k; done
    dec "half K=3 tg64" -n 64 --n-cpu-moe 2 $ex --cold-pcie-slots 3
    dec "half K=3 np8 tg32" -n 32 --np 8 --n-cpu-moe 2 $ex --cold-pcie-slots 3
    dec "cold K=3 np8 tg32" -n 32 --np 8 --cpu-moe $ex --cold-pcie-slots 3
  } | tee "$out/splitt/splitt.txt"
fi
if on cpuk; then
  mkdir -p "$out/cpuk"
  ready4
  stamp "cpuk"
  f=bench-data/v4f-4l.gguf
  lb=$(find /tmp/llama-build -name llama-bench -type f -perm -u+x | head -1)
  ex="--expert-workers 0 --worker-threads $(nproc)"
  lbt() { # LABEL ARGS...: llama-bench tg64
    local label=$1; shift
    echo "llama.cpp $label: $("$lb" -m $f -lm none -ngl 99 -fa "$FA" -t "$(nproc)" -r "$REPS" -p 0 -n 64 -o md "$@" 2>&1 | grep "tg64" | tr -s ' ')"
  }
  dft() { local label=$1; shift; decode_line "dflash $label" -n 64 "$@"; }
  {
    lbt "cold, pinned host (default)" -ncmoe 4
    lbt "cold, repacked (--no-host 1)" -ncmoe 4 --no-host 1
    lbt "cold, plain CPU buffer (--no-host 1 --repack 0)" -ncmoe 4 --no-host 1 --repack 0
    lbt "half" -ncmoe 2
    lbt "hot" -ncmoe 0
    dft "cold K=0" --cpu-moe $ex --cold-pcie-slots 0
    dft "cold K=3" --cpu-moe $ex --cold-pcie-slots 3
    dft "half K=3" --n-cpu-moe 2 $ex --cold-pcie-slots 3
    dft "hot" --experts-hot all
    # the split's fixed CPU cost per layer: the CPU team's threads kept spinning, and 8 threads
    dft "cold K=3 --timings" --cpu-moe $ex --cold-pcie-slots 3 --timings
    OMP_WAIT_POLICY=active dft "cold K=3 OMP_WAIT_POLICY=active" --cpu-moe $ex --cold-pcie-slots 3 --timings
    T=8 dft "cold K=3 -t 8" --cpu-moe $ex --cold-pcie-slots 3 --timings
  } | tee "$out/cpuk/cpuk.txt"
fi
if on kern; then
  mkdir -p "$out/kern"
  ready4
  stamp "kern"
  ex="--expert-workers 0 --worker-threads $(nproc)"
  lb=$(find /tmp/llama-build -name llama-bench -type f -perm -u+x | head -1)
  {
    for n in 4 2; do
      echo "llama.cpp -ncmoe $n: $("$lb" -m bench-data/v4f-4l.gguf -lm none -ngl 99 -fa "$FA" -t "$(nproc)" -r "$REPS" -p 0 -n 64 -o md -ncmoe $n 2>&1 | grep "tg64" | tr -s ' ')"
    done
    for round in $(seq "${KERN_ROUNDS:-1}"); do
      for place in "--cpu-moe" "--n-cpu-moe 2"; do
        for kern in "--cold-pcie-slots 3" "--cold-pcie-slots 3 --cold-cpu-ggml-kernel" "--cold-pcie-slots 2"; do
          # shellcheck disable=SC2086
          decode_line "round $round [$place $kern]" -n 64 $place $ex $kern --timings
        done
      done
      # partly held layers (half of each layer's experts held): every cold slot staged over
      # PCIe, against the CPU computing half of each token's cold slots
      for kern in "--cold-pcie-slots 3" "--cold-pcie-slots 3 --cold-pcie-partial-cpu"; do
        # shellcheck disable=SC2086
        decode_line "round $round [uniform:128 $kern]" -n 64 --experts-hot uniform:128 $ex $kern --timings
      done
      # 8 sequences, half of the layers cold (the continuous-batching target), each kernel
      for kern in "" "--cold-cpu-ggml-kernel"; do
        # shellcheck disable=SC2086
        decode_line "round $round [np8 --n-cpu-moe 2 $kern]" -n 32 --np 8 --n-cpu-moe 2 $ex --cold-pcie-slots 3 $kern --timings
      done
      # 16 sequences: more tokens than the split takes (8), so the cold layers' products
      # run in the graph on the CPU, through either kernel
      for kern in "" "--cold-cpu-ggml-kernel"; do
        # shellcheck disable=SC2086
        decode_line "round $round [np16 --cpu-moe $kern]" -n 16 --np 16 --cpu-moe $ex $kern
      done
    done
  } | tee "$out/kern/kern.txt"
  # the product alone, at full width: gate and up fused (4096 -> 4096), then down (2048 -> 4096)
  { .device/bin/dflash bench experts --tokens 1,2,4,8,16,32
    .device/bin/dflash bench experts --n-in 2048 --tokens 1,4,16
    .device/bin/dflash bench experts -t 8 --tokens 1,8; } 2>&1 | tee "$out/kern/experts.txt"
  [ "${KERN_BW:-0}" = 1 ] && bash scripts/device/bandwidth.sh 2>&1 | tee "$out/kern/bandwidth.txt"
fi
if on kmin; then
  # the shortest A/B of dflash's MXFP4 product: alone (no file needed), then in decode
  mkdir -p "$out/kmin"
  stamp "kmin"
  .device/bin/dflash bench experts --tokens 1,4,16 2>&1 | tee "$out/kmin/experts.txt"
  ready4
  ex="--expert-workers 0 --worker-threads $(nproc)"
  lb=$(find /tmp/llama-build -name llama-bench -type f -perm -u+x | head -1)
  {
    echo "llama.cpp -ncmoe 4: $("$lb" -m bench-data/v4f-4l.gguf -lm none -ngl 99 -fa "$FA" -t "$(nproc)" -r "$REPS" -p 0 -n 64 -o md -ncmoe 4 2>&1 | grep "tg64" | tr -s ' ')"
    for kern in "--cold-pcie-slots 3" "--cold-pcie-slots 3 --cold-cpu-ggml-kernel" "--cold-pcie-slots 2"; do
      # shellcheck disable=SC2086
      decode_line "[--cpu-moe $kern]" -n 64 --cpu-moe $ex $kern --timings
    done
    for kern in "--cold-pcie-slots 3" "--cold-pcie-slots 3 --cold-pcie-partial-cpu"; do
      # shellcheck disable=SC2086
      decode_line "[uniform:128 $kern]" -n 64 --experts-hot uniform:128 $ex $kern --timings
    done
  } | tee "$out/kmin/kmin.txt"
fi
if on pairs8; then
  mkdir -p "$out/pairs8"
  stamp "pairs 8 layers"
  rm -f bench-data/v4f-4l.gguf
  OUT=$out/pairs8 LAYERS=8 fw files
  OUT=$out/pairs8 LAYERS=8 PLACEMENTS="${PAIRS8:-hot cold}" fw pairs
fi
stamp done
