# Sourced by decode-ab.sh and prefill-ab.sh (AB_NAME: the caller's name, its default output
# folder under /tmp): the staged binaries unpacked, the old one's path (OLD, default
# .device/bin/dflash-old.xz), llama.cpp's build and the 4-layer file made sure of, and what
# the runs share: $out, $bin, $old, $f (the file), $lb (llama-bench), $reps, $t (threads),
# $exec_flags (the cold placements' executor flags).
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
