# Sourced by the GPU-machine bound scripts (placement-bound.sh, batch-bound.sh): the machine
# and commit in the log, the CUDA module beside dflash (llama.cpp's from fullwidth-vs-llama.sh
# build when there, else built from .device/ggml-src), fixture A's MXFP4 and Q8_0 files
# unpacked from .device/fixtures, and its 330 reference tokens in /tmp/a.tokens.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
cat .device/commit
[ -f .device/bin/libggml-cuda.so ] || bash scripts/device/build-cuda.sh
for f in ds4-tiny-a.mxfp4 ds4-tiny-a.q8_0; do
  [ -f tests/fixtures/$f.gguf ] || xz -d -c .device/fixtures/$f.gguf.xz > tests/fixtures/$f.gguf
done
python3 -c '
import numpy as np
d = np.load("tests/fixtures/ds4-tiny-a.ref.npz")
open("/tmp/a.tokens", "w").write("\n".join(map(str, d["tokens"])))'
