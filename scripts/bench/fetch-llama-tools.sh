#!/usr/bin/env bash
# Fetches the full llama.cpp tree of PyPI's llama-cpp-python==0.3.36 sdist (the tools' sources,
# llama-bench among them, which the pinned crate's llama.cpp lacks) into bench-data/, once.
# The sdist file itself, checked against its published sha256: `pip download --no-binary`
# would build its build tools from source first.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=llama_cpp_python-0.3.36
[ -f bench-data/$name/vendor/llama.cpp/tools/llama-bench/llama-bench.cpp ] && exit 0
mkdir -p bench-data
url=$(curl -fsS https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*$name\.tar\.gz" | head -1)
[ -n "$url" ] || { echo "no $name.tar.gz in PyPI's index" >&2; exit 1; }
curl -fsSL -o bench-data/$name.tar.gz "$url"
echo "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e  bench-data/$name.tar.gz" | sha256sum -c --quiet -
tar xzf bench-data/$name.tar.gz -C bench-data
