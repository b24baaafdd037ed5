#!/usr/bin/env bash
# GPU machine: prefill of two dflash binaries side by side on the 4-layer full-width file, with
# llama.cpp beside at the same micro-batch (each placement's runs back to back, so the host's
# drift hits all alike); then, where the machine allows, where the time goes.
# Here first: the staging of round.sh, plus the old binary as .device/bin/dflash-old.xz.
#   OLD=.device/bin/dflash-old.xz bash scripts/device/prefill-ab.sh
# Environment: OLD, REPS (default 3), AB (default 1; 0: only the profile), PLACES (default "hot half cold"), UB (default "2048":
# each N runs ppN at micro-batch N on both engines), PROF (default 1: dflash's op profile of the
# all-GPU pp2048, and, where Nsight Compute runs, the GPU kernel sums of both engines' pp2048).
set -uo pipefail
AB_NAME=prefill-ab
# shellcheck source=scripts/device/ab-setup.sh
source scripts/device/ab-setup.sh
[ "${AB:-1}" = 1 ] && for ub in ${UB:-2048}; do
  for place in ${PLACES:-hot half cold}; do
    [ "$place" = profile ] && [ -z "${mib:-}" ] && profile_ready
    placement "$place"
    echo "== $place pp$ub: llama.cpp -ncmoe $n -ub $ub"
    "$lb" -m $f -lm none -ngl 99 -fa 0 -ncmoe $n -t "$t" -r "$reps" -p "$ub" -n 0 -b "$ub" -ub "$ub" -o md 2>&1 | grep "pp$ub"
    # old, new, and new with the whole micro-batch as one attention block (as before blocks)
    for run in old new new-block0; do
      extra=
      case $run in
        old) b=$old ;;
        new) b=$bin/dflash ;;
        new-block0) b=$bin/dflash extra="--attention-block 0" ;;
      esac
      [ -x "$b" ] || continue
      # shellcheck disable=SC2086
      echo "$run: $($b bench prefill -m $f --device CUDA0 -t "$t" -r "$reps" -n "$ub" -u "$ub" $flags $extra --timings 2>&1 | grep -A1 't/s' | sed 's/.*| pp/pp/' | tr '\n' ' ')"
    done
  done
done | tee "$out/prefill.txt"
if [ "${PROF:-1}" = 1 ]; then
  $bin/dflash bench prefill -m $f --device CUDA0 -t "$t" -r 1 -n 2048 -u 2048 --experts-hot all --op-profile 30 2>&1 \
    | grep -v "^ggml_cuda_init\|^  Device 0\|^load_backend" > "$out/ops-hot-pp2048.txt"
  head -40 "$out/ops-hot-pp2048.txt"
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  echo "ncu: ${ncu:-none}"
  if [ -n "$ncu" ]; then
    # GPU time per kernel name over one warm-up and one timed pp2048 (each engine), summed
    ksum() { # NAME CMD...
      local name=$1; shift
      timeout 240 "$ncu" --metrics gpu__time_duration.sum --csv --print-units base --clock-control none --cache-control none "$@" \
        >"$out/ncu-$name.csv" 2>"$out/ncu-$name.err"
      echo "ncu $name: rc $? $(wc -l <"$out/ncu-$name.csv") lines"
      python3 - "$out/ncu-$name.csv" <<'PY' | tee "$out/ncu-$name.sum.txt"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    sys.exit()
head = rows[0]
ki, vi = head.index("Kernel Name"), head.index("Metric Value")
tot, cnt = collections.Counter(), collections.Counter()
for r in rows[1:]:
    try:
        v = float(r[vi])
    except ValueError:
        continue
    k = r[ki].split("(")[0][:90]
    tot[k] += v; cnt[k] += 1
all_ns = sum(tot.values())
print(f"total {all_ns / 1e6:.1f} ms in {sum(cnt.values())} kernels")
for k, v in tot.most_common(25):
    print(f"{v / 1e6:9.2f} ms {100 * v / all_ns:5.1f}% {cnt[k]:6d}  {k}")
PY
    }
    ksum llama "$lb" -m $f -lm none -ngl 99 -fa 0 -t "$t" -r 1 -p 2048 -n 0 -b 2048 -ub 2048
    ksum dflash $bin/dflash bench prefill -m $f --device CUDA0 -t "$t" -r 1 -n 2048 -u 2048 --experts-hot all
  fi
fi
