#!/usr/bin/env bash
# CPU prefill/decode speed of dflash vs llama.cpp's llama-bench, on the same synthetic
# deepseek4 model (hidden 1024, 8 layers, 64 experts top-6, Q8_0, real DeepSeek V4 vocabulary)
# in the same run on the same machine.
#
# Usage: scripts/bench/cpu-vs-llama.sh [DFLASH_DIR [LLAMA_SRC [THREADS]]]
#   DFLASH_DIR  directory with the dflash binary (and write_synth, if cargo is absent);
#               default target/release
#   LLAMA_SRC   llama.cpp source: a full llama.cpp tree, a tree staged by
#               scripts/bench/stage-llama-src.sh (.device/llama-src on the GPU host), or the
#               pinned llama-cpp-sys-2 crate's llama.cpp (which lacks the tools' sources: they
#               are taken from LLAMA_TOOLS_SRC, see below); default: the pinned crate's tree
#   THREADS     CPU threads for both programs; default: all cores (nproc)
# Environment:
#   MODEL            model file (default bench-data/medium-q8_0.gguf; written if missing)
#   TOKENIZER        GGUF whose tokenizer.* keys the model gets (default: models/tiny-ds4.gguf,
#                    else DFLASH_DIR/ds4-tokenizer.gguf)
#   LLAMA_BUILD      llama.cpp build dir (default bench-data/llama.cpp-build); llama-bench is
#                    built there if missing (cmake, Release, CPU only, -j nproc)
#   LLAMA_TOOLS_SRC  full llama.cpp tree for tools/llama-bench when LLAMA_SRC lacks it
#                    (default: vendor/llama.cpp of PyPI llama-cpp-python==0.3.36, fetched
#                    by scripts/bench/fetch-llama-tools.sh into bench-data/ if missing)
#   GGML_NATIVE      1 (default): llama.cpp's ggml built for this CPU, like a default dflash
#                    build; 0: portable AVX2/FMA/F16C, like DFLASH_GGML_NATIVE=0 (the binaries
#                    prepare.sh stages): use 0 with .device/bin so both sides run the same
#                    kernels. A build dir keeps its first setting: use one LLAMA_BUILD per value.
#   PROMPT, GEN      prefill and decode lengths (default 512 and 128)
#   REPS             llama-bench repetitions (default 5)
#   ROUNDS           rounds of both benchmarks, interleaved (default 1); prints each round's
#                    dflash / llama.cpp ratios and their medians
#   LLAMA_BENCH_ARGS extra llama-bench arguments; default: "--repack 0" for a native build on
#                    a CPU with AMX (llama.cpp aborts otherwise, see BENCHMARKS.md), else none
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
dflash_dir=$(realpath "${1:-target/release}")
pinned=/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/llama-cpp-sys-2-0.1.161/llama.cpp
llama_src=${2:-$pinned}
threads=${3:-$(nproc)}
model=${MODEL:-bench-data/medium-q8_0.gguf}
build=${LLAMA_BUILD:-bench-data/llama.cpp-build}
native=${GGML_NATIVE:-1}
prompt=${PROMPT:-512}
gen=${GEN:-128}
reps=${REPS:-5}
jobs=$(nproc)
die() { echo "cpu-vs-llama: $*" >&2; exit 1; }
mkdir -p bench-data

# 1. llama-bench, built from the pinned source if missing.
llama_bench=$build/bin/llama-bench
if [ ! -x "$llama_bench" ]; then
  command -v cmake >/dev/null || die "cmake not found (needed to build llama-bench)"
  [ -f "$llama_src/src/llama.cpp" ] || die "no llama.cpp source at $llama_src"
  src=$llama_src
  if [ ! -f "$llama_src/tools/llama-bench/llama-bench.cpp" ]; then
    tools=${LLAMA_TOOLS_SRC:-bench-data/llama_cpp_python-0.3.36/vendor/llama.cpp}
    if [ ! -f "$tools/tools/llama-bench/llama-bench.cpp" ] && [ -z "${LLAMA_TOOLS_SRC:-}" ]; then
      echo "fetching the llama-bench sources (PyPI llama-cpp-python==0.3.36 sdist)"
      bash scripts/bench/fetch-llama-tools.sh || die "could not fetch llama-cpp-python"
    fi
    bash scripts/bench/stage-llama-src.sh "$llama_src" "$tools" bench-data/llama-src || die "staging failed"
    src=bench-data/llama-src
  fi
  gen_args=()
  command -v ninja >/dev/null && gen_args=(-G Ninja)
  if [ "$native" = 0 ]; then
    isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
  else
    isa=(-DGGML_NATIVE=ON)
  fi
  t0=$(date +%s)
  cmake -S "$src" -B "$build" "${gen_args[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_CUDA=OFF -DGGML_OPENMP=ON "${isa[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    >"$build.configure.log" 2>&1 || { tail -30 "$build.configure.log"; die "cmake configure failed"; }
  cmake --build "$build" --target llama-bench -j "$jobs" >"$build.build.log" 2>&1 \
    || { tail -30 "$build.build.log"; die "building llama-bench failed"; }
  echo "built $llama_bench in $(( $(date +%s) - t0 )) s (GGML_NATIVE=$native)"
fi

# 2. The model, written if missing.
if [ ! -f "$model" ]; then
  tok=${TOKENIZER:-}
  if [ -z "$tok" ]; then
    for c in models/tiny-ds4.gguf "$dflash_dir/ds4-tokenizer.gguf"; do [ -f "$c" ] && { tok=$c; break; }; done
  fi
  [ -n "$tok" ] || die "no tokenizer GGUF (run scripts/setup.sh for models/tiny-ds4.gguf, or set TOKENIZER)"
  args=(--spec medium --type q8_0 --tokenizer-from "$tok" "$model")
  if [ -x "$dflash_dir/write_synth" ]; then
    "$dflash_dir/write_synth" "${args[@]}" || die "write_synth failed"
  elif command -v cargo >/dev/null; then
    cargo run --release -q -p loader --example write_synth -- "${args[@]}" || die "write_synth failed"
  else
    die "no $dflash_dir/write_synth and no cargo to build it"
  fi
fi

# 3. Both benchmarks, one after the other, ROUNDS times (interleaved: the host's speed
#    drifts between minutes, so each round's ratio is the comparison, and their median).
rounds=${ROUNDS:-1}
echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores; threads $threads"
echo "== model: $model ($(du -h "$model" | cut -f1)); dflash $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
status=0
read -r -a extra <<< "${LLAMA_BENCH_ARGS:-}"
# A native build on a CPU with AMX puts some Q8_0 matrices into ggml's AMX buffer, and the
# scheduler then finds no backend for an op that reads them (GGML_ASSERT(*cur_backend_id != -1)
# in ggml-backend.cpp); without the extra buffer types it runs.
if [ -z "${LLAMA_BENCH_ARGS:-}" ] && [ "$native" != 0 ] && grep -qw amx_int8 /proc/cpuinfo; then
  echo "(CPU has AMX and llama.cpp is a native build: passing --repack 0)"
  extra=(--repack 0)
fi
table=$(mktemp)
# llama-bench's markdown table: the t/s mean of the row whose `test` column is $1 (columns
# found by their header, since non-default parameters add columns).
llama_rate() {
  awk -F'|' -v t="$1" '
    /\| *test *\|/ { for (i = 1; i <= NF; i++) { h = $i; gsub(/ /, "", h); if (h == "test") ct = i; if (h == "t/s") cr = i } next }
    ct && cr { x = $ct; gsub(/ /, "", x); if (x == t) { split($cr, a, "±"); gsub(/ /, "", a[1]); print a[1] } }'
}
rate() { sed -n 's/.* | \([0-9.]*\) t\/s .*/\1/p' | tail -1; }
for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds: llama.cpp: llama-bench -m $model -p $prompt -n $gen -t $threads -r $reps ${extra[*]}"
  out=$("$llama_bench" -m "$model" -p "$prompt" -n "$gen" -t "$threads" -r "$reps" "${extra[@]}") || { echo "llama-bench failed ($?)"; status=1; }
  echo "$out"
  l_pp=$(echo "$out" | llama_rate "pp$prompt")
  l_tg=$(echo "$out" | llama_rate "tg$gen")
  echo "== round $r/$rounds: dflash: bench decode -m $model -t $threads -n $gen; bench prefill -n $prompt"
  out=$("$dflash_dir/dflash" bench decode -m "$model" -t "$threads" -n "$gen") || { echo "dflash bench decode failed"; status=1; }
  echo "$out"
  d_tg=$(echo "$out" | rate)
  out=$("$dflash_dir/dflash" bench prefill -m "$model" -t "$threads" -n "$prompt") || { echo "dflash bench prefill failed"; status=1; }
  echo "$out"
  d_pp=$(echo "$out" | rate)
  echo "$r ${l_pp:-0} ${d_pp:-0} ${l_tg:-0} ${d_tg:-0}" >> "$table"
done
python3 - "$table" "$prompt" "$gen" <<'PY'
import statistics, sys
rows = [list(map(float, l.split()[1:])) for l in open(sys.argv[1]) if l.strip()]
p, g = sys.argv[2], sys.argv[3]
print(f"| round | llama.cpp pp{p} | dflash pp{p} | ratio | llama.cpp tg{g} | dflash tg{g} | ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|")
rp, rt = [], []
for i, (lp, dp, lt, dt) in enumerate(rows, 1):
    a, b = (dp / lp if lp else 0), (dt / lt if lt else 0)
    rp.append(a); rt.append(b)
    print(f"| {i} | {lp:.2f} | {dp:.2f} | {a:.3f} | {lt:.2f} | {dt:.2f} | {b:.3f} |")
print(f"| median | | | {statistics.median(rp):.3f} | | | {statistics.median(rt):.3f} |")
PY
rm -f "$table"
exit $status
