#!/usr/bin/env bash
# GPU machine: dflash against llama.cpp at DeepSeek V4 Flash's full width, both loading ONE
# libggml-cuda.so, in one call (hosts differ by ~15%, so only ratios of the same call count).
#
# Here (the machine with cargo), first: scripts/device/prepare.sh (portable dflash,
# write_synth, the DS4 tokenizer keys, the pinned ggml source and the llama.cpp tree with
# llama-bench, under .device/). Then on the GPU machine, carrying .device:
#   bash scripts/device/fullwidth-vs-llama.sh [STEP...]
# Steps (default: build exact files llama dflash; `pack` when asked):
#   build    (runs beside `files` when both are asked for) llama.cpp (pinned source + llama-bench) with GGML_BACKEND_DL, GGML_NATIVE=OFF and
#            CUDA; its libggml-cuda.so is copied beside dflash, so both engines load the same module
#   exact    fixture A (MXFP4 experts) on CUDA0: cold experts through the executor, offloaded
#            to the GPU (every layer cold; half of each layer cold), and computed in the graph
#            on the CPU backend, each against the all-hot run and the transformers reference
#   files    write_synth --spec v4-flash --layers L for each L in $LAYERS (default "4 8")
#   llama    llama-bench per file: all on the GPU, every routed expert on the CPU (-ncmoe L),
#            the first half of the layers' experts on the CPU (-ncmoe L/2)
#   dflash   dflash bench per file: the same three placements, and dflash's `profile:`
#            placement at the expert memory of -ncmoe L/2 (route statistics from a pp2048 run)
#   Tests of both: pp512; pp2048 at ubatch 2048; tg64; tg64 at depth 4096 (DEPTH=0 skips it).
#   matrix   per file and placement, both engines at every test above, two runs each
#   pairs    the short form, for a tight device budget: per file and per placement in the order
#            of $PLACEMENTS (default "cold hot hot-fa half profile cold-exec"), llama-bench then `dflash bench
#            tests` (one load) with pp512 and tg64, so a cut-short run still holds whole pairs.
#            cold = every routed expert on the CPU, hot = all on the GPU, half = -ncmoe L/2,
#            profile = dflash's `profile:` placement at the expert memory of half,
#            cold-graph / half-graph = cold / half with --cold-layers-in-graph (dflash only),
#            hot-fa = hot with ggml's flash-attention kernels on the GPU too (dflash only),
#            cold-exec = cold with the CPU executor at every batch size (dflash pp512 only),
#            cold-executor = cold with decode through the executor (dflash's layers in the graph
#            off; on by default since the fourth commit after 3f87b74),
#            half-np8 / hot-np8 = half / hot with 8 sequences decoding together (dflash tg32 x8),
#            half-np8-stream = half-np8 with the cold experts of 8-token steps in the step graph over
#            the pinned copy (ggml moves such products to the GPU only from 32 tokens, so below
#            that the graph's CPU team computes them; this run sets GGML_OP_OFFLOAD_MIN_BATCH=8, so
#            they stream),
#            adaptive = half of each layer's experts held, the hot set following the live routing
#            (from 0..K, up to 256 MiB swapped per step; decode only, to compare with profile)
# Each command's peak GPU memory (nvidia-smi, sampled every 100 ms) is printed after it.
# Environment: FA (default 1; 0 builds llama.cpp without its flash-attention kernels, about half
# the CUDA build, and runs llama-bench with -fa 0, the matmul attention dflash uses on a GPU by
# default), LAYERS, REPS (default 2), DEPTH (default 4096), THREADS (default: all cores),
# DFLASH_EXEC (dflash's cold-expert executor flags, default "--expert-workers 0 --worker-threads
# THREADS"), DFLASH_COLD (flags of the cold placements, default DFLASH_EXEC: prefill streams cold
# experts to the GPU at dflash's automatic --cold-offload-min).
set -euo pipefail
bin=.device/bin
src=.device/llama-src
out=${OUT:-/tmp}
exec > >(tee "$out/fullwidth.log") 2>&1
LAYERS=${LAYERS:-"4 8"}
REPS=${REPS:-2}
DEPTH=${DEPTH:-4096}
THREADS=${THREADS:-$(nproc)}
FA=${FA:-1}
cuda_fa=$([ "$FA" = 1 ] && echo ON || echo OFF)
DFLASH_EXEC=${DFLASH_EXEC:-"--expert-workers 0 --worker-threads $THREADS"}
DFLASH_COLD=${DFLASH_COLD:-"$DFLASH_EXEC"}
steps=${*:-build exact files llama dflash}
on() { [[ " $steps " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)"
free -g | head -2
echo "commit $(cat .device/commit 2>/dev/null || echo unknown); layers $LAYERS; reps $REPS; depth $DEPTH; threads $THREADS; llama.cpp flash attention $FA"

# The largest memory.used (MiB) while "$@" runs.
peak() {
  local f
  f=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$f" &
  local smi=$! rc=0
  "$@" || rc=$?
  kill $smi 2>/dev/null || true; wait $smi 2>/dev/null || true
  echo "  peak GPU memory $(sort -n "$f" | tail -1) MiB (rc $rc)"
  rm -f "$f"
  return 0
}

# A packed build from an earlier call (the `pack` step's files, copied into .device/): the
# same binaries without the 3-4 minutes of building.
pack=.device/llama-pack-fa$FA.tar.xz
build() {
  t0=$(date +%s)
  if [ ! -d /tmp/llama-build/bin ] && compgen -G "$pack.part*" >/dev/null; then
    mkdir -p /tmp/llama-build && cat "$pack".part* | tar -xJ -C /tmp/llama-build && echo "llama.cpp build unpacked from $pack.part*"
  fi
  # a build left by an earlier call on this (still warm) machine: no second build
  if [ -n "$(find /tmp/llama-build -name libggml-cuda.so -type f 2>/dev/null | head -1)" ] \
    && [ -n "$(find /tmp/llama-build -name llama-bench -type f 2>/dev/null | head -1)" ]; then
    cp "$(find /tmp/llama-build -name libggml-cuda.so -type f | head -1)" $bin/libggml-cuda.so
    echo "llama.cpp build found (no rebuild); dflash loads the same file: $(sha256sum $bin/libggml-cuda.so | cut -c1-16)"
    return 0
  fi
  cmake -S "$src" -B /tmp/llama-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF \
    -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_CUDA=ON -DGGML_CUDA_GRAPHS=ON -DGGML_CUDA_FA=$cuda_fa -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >/dev/null
  cmake --build /tmp/llama-build --target llama-bench ggml-cuda ggml-cpu -j "$(nproc)" >/tmp/llama-build.log 2>&1 \
    || { tail -40 /tmp/llama-build.log; exit 1; }
  cuda=$(find /tmp/llama-build -name libggml-cuda.so -type f | head -1)
  cp "$cuda" $bin/libggml-cuda.so
  echo "built llama.cpp + its CUDA module in $(( $(date +%s) - t0 )) s; dflash loads the same file: $(sha256sum $bin/libggml-cuda.so | cut -c1-16)"
}

write_files() {
  mkdir -p bench-data
  for L in $LAYERS; do
    f=bench-data/v4f-${L}l.gguf
    t0=$(date +%s)
    [ -f $f ] || $bin/write_synth --spec v4-flash --layers "$L" --tokenizer-from $bin/ds4-tokenizer.gguf $f >/tmp/write-$L.log
    echo "wrote $f in $(( $(date +%s) - t0 )) s"
  done
  df -h bench-data | tail -1
}

# the two at once when both are asked for: the build is CPU-bound, the writer disk-bound
if on build && on files; then
  write_files &
  writer=$!
  build
  wait $writer
elif on build; then
  build
elif on files; then
  write_files
fi
LB=$(find /tmp/llama-build -name llama-bench -type f -perm -u+x | head -1)

# pack: the build's bin/ (llama-bench, its libraries, the CUDA module), stripped and xz'd in
# parts of at most 15 MiB under $OUT, for a later call to carry in .device/ (see `pack` above)
if on pack; then
  rm -rf /tmp/pack && mkdir -p /tmp/pack && cp -a /tmp/llama-build/bin /tmp/pack/
  find /tmp/pack/bin -type f \( -name "*.so*" -o -name llama-bench \) -exec strip --strip-unneeded {} \;
  tar -C /tmp/pack -cf - bin | xz -T0 -9 | split -b 15m -d - "$out/$(basename "$pack").part"
  echo "packed the llama.cpp build: $(du -ch "$out/$(basename "$pack")".part* | tail -1 | cut -f1) in $(ls "$out/$(basename "$pack")".part* | wc -l) parts"
fi

if on exact; then
  echo "== cold experts on CUDA0: executor vs offloaded vs in the graph (fixture A, MXFP4 experts)"
  m=tests/fixtures/ds4-tiny-a.mxfp4.gguf
  [ -f $m ] || xz -d -c .device/fixtures/ds4-tiny-a.mxfp4.gguf.xz > $m
  python3 -c 'import numpy as np; d=np.load("tests/fixtures/ds4-tiny-a.ref.npz"); open("/tmp/a.tokens","w").write("\n".join(map(str, d["tokens"])))'
  # a run that fails is reported and left out; the benchmarks below still run
  ran=()
  X() { local o=$1; shift; if $bin/dflash logits -m $m --device "${DEV:-CUDA0}" --tokens /tmp/a.tokens -u "${U:-512}" "$@" --out /tmp/x-$o.npy; then ran+=("$o=/tmp/x-$o.npy"); else echo "FAILED: $o ($*)"; fi; }
  DEV=CPU X cpu
  X hot
  X exec --experts-hot none --expert-workers 0 --cold-offload-min 0 --cold-layers-in-graph false
  X offload --experts-hot none --expert-workers 0 --cold-offload-min 1
  X offload-half --experts-hot uniform:8 --expert-workers 0 --cold-offload-min 1
  X offload-half-w2 --experts-hot uniform:8 --expert-workers 2 --cold-offload-min 16
  X ingraph --experts-hot none --expert-workers 0 --cold-offload-min 0 --cold-layers-in-graph --cold-stream-min 0
  # all-cold layers streamed whole into the two GPU slots (one 330-token micro-batch; and
  # five micro-batches of 66 (the 330 tokens), the slots alternating across steps, beside the same split all hot)
  X stream --experts-hot none --expert-workers 0 --cold-stream-min 1
  X stream-ncmoe2 --n-cpu-moe 2 --expert-workers 0 --cold-stream-min 1
  U=66 X hot-u66
  U=66 X stream-u66 --experts-hot none --expert-workers 0 --cold-stream-min 32
  # partly held layers (8 experts held of each): their cold part streamed, against the same
  # cold part offloaded by the scheduler (one micro-batch; five of 66, the slots alternating)
  X stream-partial --experts-hot uniform:8 --expert-workers 0 --cold-offload-min 1 --cold-stream-min 1
  U=66 X offload-partial-u66 --experts-hot uniform:8 --expert-workers 0 --cold-offload-min 1 --cold-stream-min 0
  U=66 X stream-partial-u66 --experts-hot uniform:8 --expert-workers 0 --cold-offload-min 1 --cold-stream-min 32
  # decode (the last 30 tokens one at a time) of every layer cold: the CPU computing every
  # slot (--cold-pcie-slots 0: the default on a GPU splits), and 2 of a token's 4 slots over PCIe (not the same bits: the staged slots take the
  # GPU's kernels, and the two parts' sums are added)
  X dec-cpu --experts-hot none --expert-workers 0 --decode-from 300 --cold-pcie-slots 0
  X dec-pcie --experts-hot none --expert-workers 0 --decode-from 300 --cold-pcie-slots 2
  # partly held layers (8 of 16 held): their cold slots in the graph (on the CPU at one token)
  # and staged over PCIe: every cold slot (the in-graph bits), and with
  # --cold-pcie-partial-cpu half of a token's cold slots, the CPU computing the others (their
  # sum added apart)
  X dec-partial-graph --experts-hot uniform:8 --expert-workers 0 --cold-offload-min 1 --decode-from 300 --cold-pcie-slots 0
  X dec-partial-pcie --experts-hot uniform:8 --expert-workers 0 --cold-offload-min 1 --decode-from 300 --cold-pcie-slots 2
  X dec-partial-pcie-cpu --experts-hot uniform:8 --expert-workers 0 --cold-offload-min 1 --decode-from 300 --cold-pcie-slots 2 --cold-pcie-partial-cpu
  python3 tools/compare_logits.py tests/fixtures/ds4-tiny-a.ref.npz "${ran[@]}" || echo "FAILED: compare_logits"
  python3 - <<'PY' || echo "FAILED: the PCIe splits against the CPU paths"
import numpy as np
for a, b in [("dec-pcie", "dec-cpu"), ("dec-partial-pcie", "dec-partial-graph"), ("dec-partial-pcie-cpu", "dec-partial-graph")]:
    x, y = np.load(f"/tmp/x-{a}.npy"), np.load(f"/tmp/x-{b}.npy")
    print("%s vs %s: max|Δ| %.3e, max|logit| %.3e, top-1 agree %.1f%%" % (a, b, np.abs(x - y).max(), np.abs(y).max(), 100 * (x.argmax(-1) == y.argmax(-1)).mean()))
PY
  # the streamed products read the all-hot placement's bytes with its kernels (a partly held
  # layer's cold part: the offloaded one's): the same bits
  python3 - <<'PY' || echo "FAILED: streamed logits differ from all hot (or, partly held, from offloaded)"
import numpy as np
bad = []
for a, b in [("stream", "hot"), ("stream-ncmoe2", "hot"), ("stream-u66", "hot-u66"),
             ("stream-partial", "offload-half"), ("stream-partial-u66", "offload-partial-u66")]:
    x, y = np.load(f"/tmp/x-{a}.npy"), np.load(f"/tmp/x-{b}.npy")
    same = np.array_equal(x, y)
    bad += [] if same else [f"{a} vs {b}"]
    print(f"{a} vs {b}: {'EXACT' if same else 'DIFFER, max|Δ| %.3e' % np.abs(x - y).max()}")
assert not bad, bad
PY
fi

# Routed-expert MiB of one layer: dflash inspect's bytes per expert × experts.
expert_mib_per_layer() {
  $bin/dflash inspect "$1" | python3 -c '
import re, sys
t = sys.stdin.read()
per = int(re.search(r"bytes per expert per layer: (\d+)", t).group(1))
n = int(re.search(r"moe\s+(\d+) experts", t).group(1))
print(per * n / 2**20)'
}

if on llama; then
  for L in $LAYERS; do
    f=bench-data/v4f-${L}l.gguf
    echo "== llama.cpp $L layers, -ncmoe 0 (all on the GPU), $((L / 2)), $L (every routed expert on the CPU)"
    peak "$LB" -m $f -lm none -ngl 99 -fa "$FA" -ncmoe "0,$((L / 2)),$L" -t "$THREADS" -r "$REPS" -p 512,2048 -ub 512,2048 -n 64 -o md
    [ "$DEPTH" = 0 ] || peak "$LB" -m $f -lm none -ngl 99 -fa "$FA" -ncmoe "0,$((L / 2)),$L" -t "$THREADS" -r "$REPS" -p 0 -n 64 -d "$DEPTH" -o md
  done
fi

if on dflash; then
  for L in $LAYERS; do
    f=bench-data/v4f-${L}l.gguf
    D() { "$bin/dflash" bench "$@" -m $f --device CUDA0 -t "$THREADS" -r "$REPS" --timings; }
    # TESTS: which of pp512 pp2048 tg64 tg64d to run for a placement.
    run_placement() {
      local tests=$1; shift
      echo "== dflash $L layers: $*"
      [[ " $tests " != *" pp512 "* ]] || peak D prefill -n 512 "$@"
      [[ " $tests " != *" pp2048 "* ]] || peak D prefill -n 2048 -u 2048 "$@"
      [[ " $tests " != *" tg64 "* ]] || peak D decode -n 64 "$@"
      [[ " $tests " != *" tg64d "* || "$DEPTH" = 0 ]] || peak D decode -n 64 -d "$DEPTH" "$@"
    }
    # FULL=1: every test for every placement; by default the tests that tell the placements
    # apart (each dflash run loads the model again: 10-30 s at 8 layers).
    all="pp512 pp2048 tg64 tg64d"
    few=${FULL:+$all}
    run_placement "${few:-pp512 pp2048 tg64}" --experts-hot all
    # shellcheck disable=SC2086
    run_placement "${few:-pp512 pp2048 tg64}" --cpu-moe $DFLASH_COLD
    # shellcheck disable=SC2086
    run_placement "tg64" --cpu-moe $DFLASH_COLD --cold-layers-in-graph
    # shellcheck disable=SC2086
    run_placement "pp512" --cpu-moe $DFLASH_EXEC
    # shellcheck disable=SC2086
    run_placement "${few:-pp512 tg64}" --n-cpu-moe $((L / 2)) $DFLASH_COLD
    # shellcheck disable=SC2086
    run_placement "tg64" --n-cpu-moe $((L / 2)) $DFLASH_COLD --cold-layers-in-graph
    # The skew-aware placement at the same expert memory as -ncmoe L/2: route statistics from
    # one pp2048 (all hot), then `profile:` with the bytes of (L - L/2) layers' experts.
    "$bin/dflash" bench prefill -m $f --device CUDA0 -n 2048 -u 2048 -r 1 --route-stats-out /tmp/route-$L.json >/dev/null
    python3 - "$L" <<'PY'
import json, sys
d = json.load(open(f"/tmp/route-{sys.argv[1]}.json"))
for layer, counts in d.items():
    c = sorted(counts, reverse=True)
    k = len(c) // 8
    print(f"  layer {layer}: the top 12.5% of experts took {sum(c[:k]) / max(1, sum(c)):.1%} of routed slots")
PY
    mib=$(expert_mib_per_layer $f)
    budget=$(python3 -c "print(int(float('${mib:-0}') * ($L - $L // 2)))")
    echo "  expert memory of -ncmoe $((L / 2)): $budget MiB ($mib MiB per layer)"
    # shellcheck disable=SC2086
    run_placement "${few:-pp512 tg64}" --experts-hot profile:/tmp/route-$L.json --expert-budget-mb "$budget" $DFLASH_COLD
  done
fi

# matrix: per file and placement ($MATRIX, default "hot cold half profile"), both engines at the
# tests of the full-width issue, each side at one micro-batch of 2048 (pp512 is one micro-batch
# either way): pp512, pp2048, tg64 (one run), then tg64 at depth $DEPTH (a second); dflash's
# `profile:` at the expert memory of -ncmoe L/2 (dflash only). Peak GPU memory after each run.
if on matrix; then
  for L in $LAYERS; do
    f=bench-data/v4f-${L}l.gguf
    half=$((L / 2))
    for P in ${MATRIX:-hot cold half profile}; do
      case $P in
        hot) n=0 flags="--experts-hot all" ;;
        cold) n=$L flags="--cpu-moe $DFLASH_COLD" ;;
        half) n=$half flags="--n-cpu-moe $half $DFLASH_COLD" ;;
        profile)
          n=
          "$bin/dflash" bench prefill -m $f --device CUDA0 -n 2048 -u 2048 -r 1 --route-stats-out /tmp/route-$L.json >/dev/null
          budget=$(python3 -c "print(int(float('$(expert_mib_per_layer $f)') * ($L - $half)))")
          flags="--experts-hot profile:/tmp/route-$L.json --expert-budget-mb $budget $DFLASH_COLD" ;;
        *) echo "unknown placement $P"; exit 2 ;;
      esac
      echo "-- $(date +%T) $L layers, $P"
      if [ -n "$n" ]; then
        peak "$LB" -m $f -lm none -ngl 99 -fa "$FA" -ncmoe "$n" -t "$THREADS" -r "$REPS" -p 512,2048 -n 64 -b 2048 -ub 2048 -o md
        [ "$DEPTH" = 0 ] || peak "$LB" -m $f -lm none -ngl 99 -fa "$FA" -ncmoe "$n" -t "$THREADS" -r "$REPS" -p 0 -n 64 -d "$DEPTH" -b 2048 -ub 2048 -o md
      fi
      # shellcheck disable=SC2086
      peak "$bin/dflash" bench tests -m $f --device CUDA0 -t "$THREADS" -r "$REPS" -u 2048 -p 512,2048 --decode 64 $flags
      # shellcheck disable=SC2086
      [ "$DEPTH" = 0 ] || peak "$bin/dflash" bench decode -m $f --device CUDA0 -t "$THREADS" -r "$REPS" -u 2048 -n 64 -d "$DEPTH" $flags
    done
  done
fi

if on pairs; then
  PLACEMENTS=${PLACEMENTS:-"cold hot hot-fa half profile cold-exec"}
  for L in $LAYERS; do
    f=bench-data/v4f-${L}l.gguf
    half=$((L / 2))
    for P in $PLACEMENTS; do
      echo "-- $(date +%T) $P"
      tests="-p 512 --decode 64" min_batch=32
      case $P in
        hot) n=0 flags="--experts-hot all" ;;
        hot-fa) n= flags="--experts-hot all --flash-attn on" ;;
        cold-exec) n= flags="--cpu-moe $DFLASH_EXEC --cold-layers-in-graph false --cold-offload-min 0" tests="-p 512 --decode 0" ;;
        cold-executor) n= flags="--cpu-moe $DFLASH_COLD --cold-layers-in-graph false" ;;
        cold) n=$L flags="--cpu-moe $DFLASH_COLD" ;;
        half) n=$half flags="--n-cpu-moe $half $DFLASH_COLD" ;;
        cold-nostream) n= flags="--cpu-moe $DFLASH_COLD --cold-stream-min 0" tests="-p 512 --decode 0" ;;
        half-nostream) n= flags="--n-cpu-moe $half $DFLASH_COLD --cold-stream-min 0" tests="-p 512 --decode 0" ;;
        cold-graph) n= flags="--cpu-moe $DFLASH_COLD --cold-layers-in-graph" ;;
        half-graph) n= flags="--n-cpu-moe $half $DFLASH_COLD --cold-layers-in-graph" ;;
        half-np8) n= flags="--n-cpu-moe $half $DFLASH_COLD --np 8" tests="-p 0 --decode 32" ;;
        half-np8-stream) n= flags="--n-cpu-moe $half $DFLASH_EXEC --cold-offload-min 8 --np 8" tests="-p 0 --decode 32" min_batch=8 ;;
        hot-np8) n= flags="--experts-hot all --np 8" tests="-p 0 --decode 32" ;;
        adaptive) n= flags="--experts-hot adaptive:0.5 --expert-swap-mb 256 $DFLASH_EXEC" tests="-p 0 --decode 64" ;;
        profile)
          n=
          "$bin/dflash" bench prefill -m $f --device CUDA0 -n 2048 -u 2048 -r 1 --route-stats-out /tmp/route-$L.json >/dev/null
          mib=$(expert_mib_per_layer $f)
          budget=$(python3 -c "print(int(float('${mib:-0}') * ($L - $half)))")
          echo "  expert memory of -ncmoe $half: $budget MiB ($mib MiB per layer)"
          flags="--experts-hot profile:/tmp/route-$L.json --expert-budget-mb $budget $DFLASH_COLD" ;;
        *) echo "unknown placement $P"; exit 2 ;;
      esac
      if [ -n "$n" ]; then
        echo "== $L layers, $P: llama.cpp -ncmoe $n"
        peak "$LB" -m $f -lm none -ngl 99 -fa "$FA" -ncmoe "$n" -t "$THREADS" -r "$REPS" -p 512 -n 64 -o md
      fi
      echo "== $L layers, $P: dflash $flags"
      # shellcheck disable=SC2086
      GGML_OP_OFFLOAD_MIN_BATCH=$min_batch peak "$bin/dflash" bench tests -m $f --device CUDA0 -t "$THREADS" -r "$REPS" --timings $tests $flags
    done
  done
fi
