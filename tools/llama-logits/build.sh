#!/usr/bin/env bash
# Build llama_logits against a llama.cpp CPU build tree (static libs), e.g. the one
# scripts/bench/cpu-vs-llama.sh makes: tools/llama-logits/build.sh bench-data/llama-src bench-data/llama.cpp-build
set -euo pipefail
src=$(realpath "$1"); build=$(realpath "$2"); here=$(dirname "$0")
c++ -O2 -std=c++17 -fopenmp "$here/llama_logits.cpp" -I"$src/include" -I"$src/ggml/include" \
  "$build/src/libllama.a" "$build/ggml/src/libggml.a" "$build/ggml/src/libggml-cpu.a" "$build/ggml/src/libggml-base.a" \
  -lpthread -ldl -o "$here/llama_logits"
echo "built $here/llama_logits"
