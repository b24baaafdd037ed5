#!/usr/bin/env bash
# Installs what building and testing dflash needs on a fresh Debian machine (cmake and
# libclang for ggml-sys, zstd for the shipped models), then unpacks the shipped models.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v zstd >/dev/null || need+=(zstd)
command -v c++ >/dev/null || need+=(g++)
command -v pkg-config >/dev/null || need+=(pkg-config)
# The openai-client test makes a venv (Debian ships venv/ensurepip separately).
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
# bindgen needs libclang.so itself (libclang-cpp.so, which other packages bring, is not it).
ls /usr/lib/llvm-*/lib/libclang.so /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Shipped models and fixtures are committed zstd-compressed.
for z in models/*.gguf.zst tests/fixtures/*.gguf.zst; do
  [ -e "$z" ] || continue
  out=${z%.zst}
  [ -e "$out" ] && [ "$out" -nt "$z" ] || zstd -q -d -f "$z" -o "$out"
done
