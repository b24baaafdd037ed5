#!/usr/bin/env bash
# The prompt cache measured: the agent conversation of scripts/bench_server.py --agent (a
# ~20k-token first turn, then 5 turns adding ~300 tokens each) against `dflash serve` without the
# cache (--cache-ram-mb 0), with it (--cache-dir), and then, the directory kept, the first turn
# again on a freshly started server. Prints the per-turn tables, the two ratios the cache is
# for (mean TTFT of turns 2-6 without / with the cache, and the first turn's TTFT without the
# cache / after the restart), and whether the greedy replies are the same with and without it.
#
#   scripts/bench/prompt-cache.sh DFLASH MODEL [THREADS] [OUT_DIR]
#
# e.g. scripts/bench/prompt-cache.sh target/release/dflash bench-data/medium-q8_0.gguf 2
# Environment: CTX (context, default 24576), FIRST / ADD / TURNS (the conversation's shape),
# MAX_TOKENS (per reply, default 16), EXTRA (more serve flags), RUNS (which of "off on restart",
# default all; the summary reads the others' results from OUT_DIR).
set -euo pipefail
DFLASH=$1
MODEL=$2
THREADS=${3:-2}
OUT=${4:-bench-data/prompt-cache}
CTX=${CTX:-24576}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
CACHE_DIR=$OUT/cache-dir

# shellcheck source=scripts/bench/serve-lib.sh
. "$(dirname "$0")/serve-lib.sh"
bench() {
    local name=$1
    shift
    echo "== $name" >&2
    python3 "$HERE/bench_server.py" --url "$URL" --agent --thinking off --max-tokens "${MAX_TOKENS:-16}" \
        --agent-first "${FIRST:-20000}" --agent-add "${ADD:-300}" --agent-turns "${TURNS:-5}" --json "$OUT/$name.json" "$@"
}

runs=" ${RUNS:-off on restart} "
if [[ $runs == *" off "* ]]; then
    serve off --cache-ram-mb 0
    bench off
    stop
fi
if [[ $runs == *" on "* ]]; then
    rm -rf "$CACHE_DIR"
    serve on --cache-dir "$CACHE_DIR"
    bench on
    stop
fi
if [[ $runs == *" restart "* ]]; then
    serve restart --cache-dir "$CACHE_DIR"
    bench restart --agent-turns 0
    stop
fi

python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
run = {n: json.load(open(f"{out}/{n}.json"))["turns"] for n in ("off", "on", "restart")}
later = lambda n: statistics.fmean(t["ttft_s"] for t in run[n][1:])
print(f"turns 2-{len(run['on'])}: mean TTFT without the cache {later('off'):.3f} s, with it {later('on'):.3f} s: "
      f"{later('off') / later('on'):.1f}x lower")
first_off, first_restart = run["off"][0]["ttft_s"], run["restart"][0]["ttft_s"]
print(f"first turn: TTFT without the cache {first_off:.3f} s, after a restart with --cache-dir {first_restart:.3f} s "
      f"({run['restart'][0]['cached_tokens']} of {run['restart'][0]['prompt_tokens']} tokens restored): "
      f"{first_off / first_restart:.1f}x lower")
if all("reply" in t for t in run["off"] + run["on"] + run["restart"]):
    same = sum(a["reply"] == b["reply"] for a, b in zip(run["off"], run["on"]))
    print(f"replies (greedy) with the cache equal those without it in {same} of {len(run['on'])} turns; "
          f"after the restart: {'equal' if run['restart'][0]['reply'] == run['off'][0]['reply'] else 'different'}")
PY
