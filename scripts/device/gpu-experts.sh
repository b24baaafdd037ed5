#!/usr/bin/env bash
# GPU-machine step of the hot/cold issue: the model on CUDA0 with cold experts on the CPU
# (in process and in moe-expert workers), checked against the transformers references and the
# all-hot runs, then decode speed on the medium model. Also: how much of CUDA's distance from
# the CPU on the F32 fixtures is cuBLAS's TF32 (NVIDIA_TF32_OVERRIDE=0 turns it off).
# Usage (GPU machine, repo root, after scripts/device/prepare.sh here), carrying
# .device/bin, .device/fixtures and .device/ggml-src (the CUDA module is built there: with the
# tree, a built module does not fit the 64 MiB a run can carry):
#   bash scripts/device/gpu-experts.sh [exact] [cold] [speed] [ab] [serve]
#                                   (default: exact cold speed)
# ab: the medium model with OLD=<an older dflash binary> (xz allowed) against this one, runs
#     interleaved in the same minutes: CUDA0 and CPU decode and prefill, CUDA0 prefill with TF32.
# quick: medium-model decode on CUDA0 all hot and half cold, and on the CPU.
# graphs: decode with CUDA graphs replayed vs GGML_CUDA_DISABLE_GRAPHS=1, same minutes.
# serve: `dflash serve` on CUDA0 with cold experts in workers, one streamed and one plain
#     completion through the HTTP API.
# The runs of layers whose experts are all cold pass --cold-layers-in-graph false: they measure
# the executor (in process or workers), which such layers otherwise skip.
set -euo pipefail
bin=.device/bin
log=${OUT:-/tmp}/gpu-experts.log
exec > >(tee "$log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
# a module already beside dflash (built by fullwidth-vs-llama.sh build in the same call) is used
[ -f $bin/libggml-cuda.so ] || bash scripts/device/build-cuda.sh
for f in ds4-tiny-a.f32 ds4-tiny-b.f32; do
  [ -f .device/fixtures/$f.gguf.xz ] || continue
  [ -f tests/fixtures/$f.gguf ] || xz -d -c .device/fixtures/$f.gguf.xz > tests/fixtures/$f.gguf
done
python3 - <<'PY'
import numpy as np
for n in ["a", "b"]:
    d = np.load(f"tests/fixtures/ds4-tiny-{n}.ref.npz")
    open(f"/tmp/{n}.tokens", "w").write("\n".join(map(str, d["tokens"])))
PY
steps=${*:-exact cold speed}
on() { [[ " $steps " == *" $1 "* ]]; }
L() { $bin/dflash logits --tokens /tmp/$1.tokens -u 512 --timings "${@:3}" --out /tmp/$2.npy; }

if on exact; then
echo "== 1. F32 fixtures: CPU, CUDA0, CUDA0 without TF32"
for n in a b; do
  m=tests/fixtures/ds4-tiny-$n.f32.gguf
  L $n cpu-$n -m $m --device CPU
  L $n cuda-$n -m $m --device CUDA0
  NVIDIA_TF32_OVERRIDE=0 L $n cuda-notf32-$n -m $m --device CUDA0
  L $n cuda-fa-$n -m $m --device CUDA0 --flash-attn on
  python3 tools/compare_logits.py tests/fixtures/ds4-tiny-$n.ref.npz cpu=/tmp/cpu-$n.npy cuda=/tmp/cuda-$n.npy cuda-notf32=/tmp/cuda-notf32-$n.npy cuda-fa=/tmp/cuda-fa-$n.npy
done
fi

if on cold; then
echo "== 2. Fixture A on CUDA0 with cold experts (no TF32), vs all-hot CUDA0 and the reference"
export NVIDIA_TF32_OVERRIDE=0
m=tests/fixtures/ds4-tiny-a.f32.gguf
L a cpu-a -m $m --device CPU
L a cuda-notf32-a -m $m --device CUDA0
L a cold-none-w0 -m $m --device CUDA0 --experts-hot none --expert-workers 0 --cold-layers-in-graph false
L a cold-none-w1-dec -m $m --device CUDA0 --experts-hot none --expert-workers 1 --decode-from 100 --cold-layers-in-graph false
L a cold-u8-w2 -m $m --device CUDA0 --experts-hot uniform:8 --expert-workers 2
L a cold-ncpu3-w4 -m $m --device CUDA0 --n-cpu-moe 3 --expert-workers 4 --route-stats-out /tmp/route.json --cold-layers-in-graph false
L a cold-profile-w2 -m $m --device CUDA0 --experts-hot profile:/tmp/route.json --expert-budget-mb 1 --expert-workers 2
python3 tools/compare_logits.py tests/fixtures/ds4-tiny-a.ref.npz cpu=/tmp/cpu-a.npy hot=/tmp/cuda-notf32-a.npy \
  none-w0=/tmp/cold-none-w0.npy none-w1-dec=/tmp/cold-none-w1-dec.npy u8-w2=/tmp/cold-u8-w2.npy \
  ncpu3-w4=/tmp/cold-ncpu3-w4.npy profile-w2=/tmp/cold-profile-w2.npy
unset NVIDIA_TF32_OVERRIDE
fi

medium() {
  MODEL=bench-data/medium-q8_0.gguf
  mkdir -p bench-data
  [ -f $MODEL ] || $bin/write_synth --spec medium --type q8_0 --tokenizer-from $bin/ds4-tokenizer.gguf $MODEL >/dev/null
}

if on speed; then
echo "== 3. Medium model decode: CUDA0 all hot, half and all cold (in process, workers), CPU only"
medium
B() { $bin/dflash bench decode -m $MODEL -n 64 -r 3 --timings "$@"; }
B --device CUDA0
B --device CUDA0 --experts-hot uniform:32 --expert-workers 0 --worker-threads 8 -t 8
B --device CUDA0 --experts-hot uniform:32 --expert-workers 2 --worker-threads 4 -t 4
B --device CUDA0 --cpu-moe --expert-workers 0 --worker-threads 8 -t 8 --cold-layers-in-graph false
B --device CUDA0 --cpu-moe --expert-workers 2 --worker-threads 4 -t 4 --cold-layers-in-graph false
B --device CUDA0 --cpu-moe --expert-workers 2 --worker-threads 4 -t 4 --worker-spin-us 50 --cold-layers-in-graph false
B --device CUDA0 --experts-hot uniform:32 --expert-workers 2 --worker-threads 4 -t 4 --worker-spin-us 50
B --device CUDA0 --cpu-moe --expert-workers 2 --worker-threads 4 -t 4 --worker-spin-us 50 --worker-cpus 8-11/12-15 --cold-layers-in-graph false
B --device CUDA0 --cpu-moe --expert-workers 4 --worker-threads 3 -t 2 --cold-layers-in-graph false
B --device CPU -t 16
$bin/dflash bench prefill -m $MODEL -n 512 -u 512 --device CUDA0 --cpu-moe --expert-workers 2 --worker-threads 6 --cold-layers-in-graph false
fi

if on ab; then
echo "== 4. Medium model, OLD=${OLD:?} vs this build, interleaved"
medium
old=$bin/dflash-old
case $OLD in *.xz) xz -d -c "$OLD" > $old ;; *) cp "$OLD" $old ;; esac
chmod +x $old
for rep in ${AB_ROUNDS:-1}; do
  for b in $old $bin/dflash; do
    echo "-- $b (round $rep)"
    $b bench decode -m $MODEL -n 64 -r 3 --device CUDA0
    $b bench prefill -m $MODEL -n 512 -u 512 -r 3 --device CUDA0
    $b bench decode -m $MODEL -n 64 -r 3 --device CPU -t 16
    $b bench prefill -m $MODEL -n 512 -r 3 --device CPU -t 16
  done
done
echo "-- $bin/dflash --cuda-tf32"
$bin/dflash --cuda-tf32 bench prefill -m $MODEL -n 512 -u 512 -r 3 --device CUDA0
fi

if on quick; then
echo "== 7. Medium model decode, all hot and half cold in 2 spinning workers"
medium
$bin/dflash bench decode -m $MODEL -n 64 -r 3 --device CUDA0
$bin/dflash bench decode -m $MODEL -n 64 -r 3 --device CUDA0 --experts-hot uniform:32 --expert-workers 2 --worker-threads 4 -t 4 --worker-spin-us 50
$bin/dflash bench decode -m $MODEL -n 64 -r 3 --device CPU -t 16
fi

if on graphs; then
echo "== 6. CUDA graphs on vs off (GGML_CUDA_DISABLE_GRAPHS=1), medium model, interleaved"
medium
for rep in 1 2; do
  for off in "" 1; do
    echo "-- GGML_CUDA_DISABLE_GRAPHS=${off:-unset} (round $rep)"
    G() { if [ -n "$off" ]; then GGML_CUDA_DISABLE_GRAPHS=1 "$@"; else "$@"; fi; }
    G $bin/dflash bench decode -m $MODEL -n 64 -r 3 --device CUDA0
    G $bin/dflash bench decode -m $MODEL -n 64 -r 3 --device CUDA0 --experts-hot uniform:32 --expert-workers 2 --worker-threads 4 -t 4 --worker-spin-us 50
    G $bin/dflash bench decode -m $MODEL -n 64 -r 3 --device CUDA0 --cpu-moe --expert-workers 0 --worker-threads 8 -t 8 --cold-layers-in-graph false
  done
done
$bin/dflash bench prefill -m $MODEL -n 512 -u 512 -r 3 --device CUDA0
fi

if on serve; then
echo "== 5. dflash serve on CUDA0, experts of the first 4 layers cold in 2 workers"
medium
$bin/dflash serve -m $MODEL --device CUDA0 --n-cpu-moe 4 --expert-workers 2 --worker-threads 4 --port 8091 --cold-layers-in-graph false &
srv=$!
for i in $(seq 60); do curl -sf localhost:8091/health >/dev/null && break; sleep 1; done
curl -sf localhost:8091/v1/completions -H 'content-type: application/json' \
  -d '{"prompt":"The capital of France is","max_tokens":16,"temperature":0}' | python3 -m json.tool
curl -sfN localhost:8091/v1/chat/completions -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":8,"stream":true}' > /tmp/stream.txt
grep -c '^data: {' /tmp/stream.txt; tail -c 300 /tmp/stream.txt
echo
curl -sf localhost:8091/metrics > /tmp/metrics.txt; grep -v '^#' /tmp/metrics.txt | head -20
kill -TERM $srv; wait $srv || true
$bin/dflash run -m $MODEL --device CUDA0 -p "The capital of France is" -n 16
$bin/dflash run -m $MODEL --device CUDA0 --n-cpu-moe 4 --expert-workers 2 -p "The capital of France is" -n 16 --cold-layers-in-graph false
fi
