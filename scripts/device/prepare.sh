#!/usr/bin/env bash
# Run here (the machine with cargo) before a GPU run: builds portable release binaries
# (x86-64 AVX2 CPU backend, so they run on the GPU machine's CPU) and stages, under the
# ignored folder .device/, what the GPU machine needs:
#   .device/bin/       dflash + libggml*.so
#   .device/ggml-src/  the pinned ggml source (from the llama-cpp-sys-2 crate), CUDA and CPU
#                      backends only, for scripts/device/build-cuda.sh
# Then run a scripts/device/*.sh step there with carry [".device"].
set -euo pipefail
cd "$(dirname "$0")/../.."
DFLASH_GGML_NATIVE=0 cargo build --release -p daemon --target-dir target/portable
rm -rf .device/bin && mkdir -p .device/bin
cp target/portable/release/dflash .device/bin/
cp -P target/portable/release/libggml*.so* .device/bin/
strip --strip-debug .device/bin/dflash .device/bin/libggml*.so.0.* || true
src=$(cargo metadata --format-version 1 --manifest-path ggml-sys/Cargo.toml \
  | python3 -c 'import json,sys; m=json.load(sys.stdin); print([p["manifest_path"] for p in m["packages"] if p["name"]=="llama-cpp-sys-2"][0])')
src=$(dirname "$src")/llama.cpp/ggml
rm -rf .device/ggml-src && mkdir -p .device/ggml-src/src
find "$src" -maxdepth 1 -type f -exec cp {} .device/ggml-src/ \;
cp -r "$src"/cmake "$src"/include .device/ggml-src/
find "$src"/src -maxdepth 1 -type f -exec cp {} .device/ggml-src/src/ \;
cp -r "$src"/src/ggml-cuda "$src"/src/ggml-cpu .device/ggml-src/src/
# ggml's CMakeLists adds every backend directory it is asked for; the others stay off.
du -sh .device/bin .device/ggml-src
