#!/usr/bin/env bash
# Run on the GPU machine (nvcc + cmake, no cargo): build ggml's CUDA backend as a module
# loadable at run time (GGML_BACKEND_DL) from the pinned ggml source staged by prepare.sh,
# for sm_90 only (through our CMake wrapper in vendor/ggml, as ggml-sys builds it), and put libggml-cuda.so next to the dflash binary, which loads it at start.
# CUDA graphs on (ggml's own default is off; llama.cpp turns them on): a decode step replays
# one captured graph per backend run instead of launching every kernel (GGML_CUDA_DISABLE_GRAPHS=1
# turns them off at run time).
set -euo pipefail
src=${1:-.device/ggml-src}
dest=${2:-.device/bin}
build=${BUILD_DIR:-/tmp/ggml-cuda-build}
arch=${CUDA_ARCH:-90}
t0=$(date +%s)
cmake -S vendor/ggml -B "$build" -G Ninja -DGGML_SRC_DIR="$(realpath "$src")" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON \
  -DGGML_CPU=OFF -DGGML_CUDA=ON -DGGML_NATIVE=OFF -DGGML_CUDA_GRAPHS=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
  -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >/dev/null
cmake --build "$build" --target ggml-cuda -j "$(nproc)"
cp "$(find "$build" -name libggml-cuda.so -type f | head -1)" "$dest"/
echo "built $dest/libggml-cuda.so ($(du -h "$dest"/libggml-cuda.so | cut -f1)) in $(( $(date +%s) - t0 )) s"
