# shellcheck shell=bash disable=SC2034 # (sourced: the callers use what it sets)
# Sourced by decode-ab.sh and prefill-ab.sh (AB_NAME: the caller's name, its default output
# folder under /tmp): the staged binaries unpacked, the old one's path (OLD, default
# .device/bin/dflash-old.xz), llama.cpp's build and the 4-layer file made sure of, and what
# the runs share: $out, $bin, $old, $f (the file), $lb (llama-bench), $reps, $t (threads),
# $exec_flags (the cold placements' executor flags); `profile_ready` and `placement`.
export FA=${FA:-0} # the llama.cpp pack without flash-attention kernels (round.sh's)
out=${OUT:-/tmp/$AB_NAME}
mkdir -p "$out"
bin=.device/bin
(cd $bin && for f in *.xz; do [ -f "${f%.xz}" ] || xz -d -k "$f"; done; chmod +x dflash* write_synth)
old=${OLD:-$bin/dflash-old.xz}
old=${old%.xz}
OUT=$out LAYERS=4 bash scripts/device/fullwidth-vs-llama.sh build files 2>&1 | tail -2
f=bench-data/v4f-4l.gguf
lb=$(find /tmp/llama-build -name llama-bench -type f -perm -u+x | head -1)
reps=${REPS:-3}
t=$(nproc)
exec_flags="--expert-workers 0 --worker-threads $t"

# The 4-layer file's routing counts (/tmp/route-4.json, for `profile:`) and $mib, the expert
# memory of llama.cpp's -ncmoe 2 (two layers' experts).
profile_ready() {
  $bin/dflash bench prefill -m $f --device CUDA0 -n 2048 -u 2048 -r 1 --route-stats-out /tmp/route-4.json >/dev/null 2>&1
  mib=$($bin/dflash inspect $f | python3 -c '
import re, sys
t = sys.stdin.read()
print(int(int(re.search(r"bytes per expert per layer: (\d+)", t).group(1)) * int(re.search(r"moe\s+(\d+) experts", t).group(1)) * 2 / 2**20))')
}

# A placement's dflash $flags and llama.cpp's -ncmoe $n (profile: dflash's, at -ncmoe 2's
# memory; needs profile_ready).
placement() {
  case $1 in
    hot) flags="--experts-hot all"; n=0 ;;
    cold) flags="--cpu-moe $exec_flags"; n=4 ;;
    half) flags="--n-cpu-moe 2 $exec_flags"; n=2 ;;
    profile) flags="--experts-hot profile:/tmp/route-4.json --expert-budget-mb $mib $exec_flags"; n=2 ;;
    *) echo "unknown placement $1"; exit 2 ;;
  esac
}
