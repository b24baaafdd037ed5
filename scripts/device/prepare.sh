#!/usr/bin/env bash
# Run here (the machine with cargo) before a GPU run: builds portable release binaries
# (x86-64 AVX2 CPU backend, so they run on the GPU machine's CPU) and stages, under the
# ignored folder .device/, what the GPU machine needs:
#   .device/bin/       dflash + libggml*.so
#   .device/ggml-src/  the pinned ggml source (from the llama-cpp-sys-2 crate), CUDA and CPU
#                      backends only, for scripts/device/build-cuda.sh
#   .device/bin/write_synth, .device/bin/ds4-tokenizer.gguf
#                      the synthetic-model writer and the DeepSeek V4 tokenizer keys it copies
#   .device/llama-src/ the pinned llama.cpp subset that builds llama-bench (CPU, or CUDA too as
#                      a GGML_BACKEND_DL module), for scripts/bench/cpu-vs-llama.sh and
#                      scripts/device/fullwidth-vs-llama.sh
#   .device/commit     the commit the binaries were built from
# Then run a scripts/device/*.sh step there with carry [".device"].
set -euo pipefail
cd "$(dirname "$0")/../.."
DFLASH_GGML_NATIVE=0 cargo build --release -p daemon --target-dir target/portable
DFLASH_GGML_NATIVE=0 cargo build --release -p loader --example write_synth --target-dir target/portable
rm -rf .device/bin && mkdir -p .device/bin
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ":!.device" || echo -dirty)" > .device/commit
cp target/portable/release/dflash .device/bin/
cp -P target/portable/release/libggml*.so* .device/bin/
cp target/portable/release/examples/write_synth .device/bin/
strip --strip-debug .device/bin/dflash .device/bin/write_synth .device/bin/libggml*.so.0.* || true
[ -f models/tiny-ds4.gguf ] || ./scripts/setup.sh
.device/bin/write_synth --extract-tokenizer models/tiny-ds4.gguf .device/bin/ds4-tokenizer.gguf
src=$(cargo metadata --format-version 1 --manifest-path ggml-sys/Cargo.toml \
  | python3 -c 'import json,sys; m=json.load(sys.stdin); print([p["manifest_path"] for p in m["packages"] if p["name"]=="llama-cpp-sys-2"][0])')
src=$(dirname "$src")/llama.cpp/ggml
rm -rf .device/ggml-src && mkdir -p .device/ggml-src/src
find "$src" -maxdepth 1 -type f -exec cp {} .device/ggml-src/ \;
cp -r "$src"/cmake "$src"/include .device/ggml-src/
find "$src"/src -maxdepth 1 -type f -exec cp {} .device/ggml-src/src/ \;
cp -r "$src"/src/ggml-cuda "$src"/src/ggml-cpu .device/ggml-src/src/
# ggml's CMakeLists adds every backend directory it is asked for; the others stay off.
# llama-bench: the crate's llama.cpp lacks the tools' sources; they come from the full tree in
# PyPI's llama-cpp-python==0.3.36 sdist (same public llama.h API), fetched once.
tools=${LLAMA_TOOLS_SRC:-bench-data/llama_cpp_python-0.3.36/vendor/llama.cpp}
[ -n "${LLAMA_TOOLS_SRC:-}" ] || bash scripts/bench/fetch-llama-tools.sh
bash scripts/bench/stage-llama-src.sh "$(dirname "$src")" "$tools" .device/llama-src
# The GPU host has no zstd: xz copies of the fixtures for scripts/device/forward.sh gpu.
mkdir -p .device/fixtures
for f in ds4-tiny-a.f32 ds4-tiny-a.mxfp4 ds4-tiny-b.f32; do
  [ -f tests/fixtures/$f.gguf ] || ./scripts/setup.sh
  xz -T0 -6 -c tests/fixtures/$f.gguf > .device/fixtures/$f.gguf.xz
done
du -sh .device/fixtures .device/bin .device/ggml-src .device/llama-src .device
