#!/usr/bin/env bash
# Assemble the smallest llama.cpp source tree that builds llama-bench (CPU backend only):
# library, ggml and common from the pinned source (the llama-cpp-sys-2 crate's llama.cpp,
# the same code our ggml comes from), and the llama-bench driver (plus the llama-simple and
# llama-eval-callback examples, to look at outputs) from a full llama.cpp tree, because the
# crate ships the library without the tools' sources. Generated CMakeLists.txt files for
# tools/, examples/, pocs/ and vendor/ add only those targets and the libraries common needs.
#
# Usage: scripts/bench/stage-llama-src.sh PINNED_LLAMA_SRC TOOLS_LLAMA_SRC DEST
#   PINNED_LLAMA_SRC  .../llama-cpp-sys-2-0.1.161/llama.cpp
#   TOOLS_LLAMA_SRC   a full llama.cpp tree with tools/llama-bench/llama-bench.cpp (e.g. the
#                     vendor/llama.cpp of PyPI's llama-cpp-python==0.3.36 sdist)
#   DEST              created (replaced if it exists); ~12 MB
set -euo pipefail
src=${1:?pinned llama.cpp source dir}
tools=${2:?llama.cpp tree with tools/llama-bench}
dest=${3:?destination dir}
[ -f "$src/src/llama.cpp" ] || { echo "no src/llama.cpp under $src" >&2; exit 1; }
[ -f "$tools/tools/llama-bench/llama-bench.cpp" ] || { echo "no tools/llama-bench/llama-bench.cpp under $tools" >&2; exit 1; }
rm -rf "$dest" && mkdir -p "$dest"
cp "$src"/CMakeLists.txt "$src"/LICENSE "$dest"/
cp -r "$src"/cmake "$src"/include "$src"/src "$src"/common "$dest"/
# ggml: the core, the CPU and the CUDA backends (ggml's CMakeLists only enters enabled backends' dirs).
g=$src/ggml
mkdir -p "$dest"/ggml/src
find "$g" -maxdepth 1 -type f -exec cp {} "$dest"/ggml/ \;
cp -r "$g"/cmake "$g"/include "$dest"/ggml/
find "$g"/src -maxdepth 1 -type f -exec cp {} "$dest"/ggml/src/ \;
cp -r "$g"/src/ggml-cpu "$dest"/ggml/src/
# The CUDA backend too (built only when asked for: scripts/device/fullwidth-vs-llama.sh).
cp -r "$g"/src/ggml-cuda "$dest"/ggml/src/
# vendor: only what common links (nlohmann json, sheredom subprocess, cpp-httplib).
mkdir -p "$dest"/vendor
cp -r "$src"/vendor/nlohmann "$src"/vendor/sheredom "$src"/vendor/cpp-httplib "$dest"/vendor/
printf 'add_subdirectory(nlohmann)\nadd_subdirectory(sheredom)\nadd_subdirectory(cpp-httplib)\n' > "$dest"/vendor/CMakeLists.txt
# tools and examples from the full tree.
mkdir -p "$dest"/tools "$dest"/examples "$dest"/pocs
cp -r "$tools"/tools/llama-bench "$dest"/tools/
echo 'add_subdirectory(llama-bench)' > "$dest"/tools/CMakeLists.txt
: > "$dest"/examples/CMakeLists.txt
for ex in simple eval-callback; do
  if [ -f "$tools/examples/$ex/CMakeLists.txt" ]; then
    cp -r "$tools/examples/$ex" "$dest"/examples/
    echo "add_subdirectory($ex)" >> "$dest"/examples/CMakeLists.txt
  fi
done
: > "$dest"/pocs/CMakeLists.txt
rm -f "$dest"/tools/*/README.md "$dest"/examples/*/README.md
echo "staged llama.cpp source for llama-bench in $dest ($(du -sh "$dest" | cut -f1))"
