#!/usr/bin/env bash
# GPU machine: single-sequence decode of two dflash binaries side by side on the 4-layer
# full-width file (interleaved per placement, so the host's drift hits both alike), with
# llama.cpp's tg64 beside, to tell a regression from the machine. Also runs the new binary
# in the variants DIAGS names: `nostream` (--cold-stream-min 0), `u512` (-u 512), or an
# environment setting (NAME=VALUE) the binary reads.
# Here first: the staging of round.sh, plus the old binary as .device/bin/dflash-old.xz.
#   OLD=.device/bin/dflash-old.xz bash scripts/device/decode-ab.sh
# Environment: OLD, REPS (default 3), DIAGS (default none), PLACES (default "hot cold half
# profile").
set -uo pipefail
AB_NAME=decode-ab
# shellcheck source=scripts/device/ab-setup.sh
source scripts/device/ab-setup.sh
profile_ready
for place in ${PLACES:-hot cold half profile}; do
  placement "$place"
  echo "== $place: llama.cpp -ncmoe $n"
  "$lb" -m $f -lm none -ngl 99 -fa 0 -ncmoe $n -t "$t" -r "$reps" -p 0 -n 64 -o md 2>&1 | grep tg64
  for run in old new ${DIAGS:-}; do
    extra=
    case $run in
      old) b=$old env='' ;;
      new) b=$bin/dflash env='' ;;
      nostream) b=$bin/dflash env='' extra="--cold-stream-min 0" ;;
      u512) b=$bin/dflash env='' extra="-u 512" ;;
      *) b=$bin/dflash env=$run ;;
    esac
    [ -x "$b" ] || continue
    # variants that change nothing for a placement are skipped
    case "$run/$place" in
      nostream/hot | nostream/profile) continue ;;
    esac
    # shellcheck disable=SC2086
    echo "$run: $(env $env $b bench decode -m $f --device CUDA0 -t "$t" -r "$reps" -n 64 $flags $extra 2>&1 | grep 't/s' | sed 's/.*| tg64/tg64/')"
  done
done | tee "$out/decode.txt"
# PROF=1: where an all-GPU pp2048 at -u 2048 spends its time (nodes timed one by one)
if [ "${PROF:-0}" = 1 ]; then
  $bin/dflash bench prefill -m $f --device CUDA0 -t "$t" -r 1 -n 2048 -u 2048 --experts-hot all --op-profile 30 2>&1 \
    | grep -v "^ggml_cuda_init\|^  Device 0\|^load_backend" | tee "$out/prof-hot-pp2048.txt"
fi
