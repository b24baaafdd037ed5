#!/usr/bin/env bash
# Serving several streams at once, measured: `dflash serve --parallel N` with
# scripts/bench_server.py's --concurrency-sweep (the same short/code requests at 1, 4, 8 and 16
# clients: aggregate and per-stream t/s, TTFT) and --interrupt (8 streams generating when a
# ~4000-token prompt arrives: how long their next token waits, and that prompt's TTFT). Prints
# both tables per server, then the sweeps' aggregate t/s side by side.
#
#   scripts/bench/parallel.sh DFLASH MODEL [THREADS] [OUT_DIR]
#
# e.g. PARALLEL="16 1" scripts/bench/parallel.sh target/release/dflash models/tiny-ds4.gguf 2
# Environment: PARALLEL (the servers' --parallel, one run each, default 16; "16 1" adds the
# one-sequence baseline), LEVELS (sweep concurrencies, default 1,4,8,16), MAX_TOKENS (per sweep
# request, default 64), REQUESTS (per sweep level, default 2 x the highest level), STREAMS
# (interrupt streams, default 8, at most --parallel: beyond it they would wait in the queue,
# not run), STREAM_TOKENS (their max_tokens, default 256), LONG (the long prompt's tokens,
# default 4000), CTX (context per sequence, default 8192), CHUNK (passed as --prefill-chunk to
# the server and to the report), EXTRA (more serve flags), BENCH (more bench_server.py flags,
# e.g. --ignore-eos for llama-server), RUNS (which of "sweep interrupt", default both).
# Output: OUT_DIR/{sweep,interrupt}-npN.json, serve-npN.log and requests.log (every request).
set -euo pipefail
DFLASH=$1
MODEL=$2
THREADS=${3:-2}
OUT=${4:-bench-data/parallel}
CTX=${CTX:-8192}
LEVELS=${LEVELS:-1,4,8,16}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"

# shellcheck source=scripts/bench/serve-lib.sh
. "$(dirname "$0")/serve-lib.sh"
: >"$OUT/requests.log"
bench() {
    # every request's line goes to the log; the tables to stdout
    # shellcheck disable=SC2086
    python3 "$HERE/bench_server.py" --url "$URL" ${CHUNK:+--prefill-chunk "$CHUNK"} ${BENCH:-} "$@" \
        2>>"$OUT/requests.log" || { tail -3 "$OUT/requests.log" | cut -c1-2000 >&2; exit 1; }
}

runs=" ${RUNS:-sweep interrupt} "
for np in ${PARALLEL:-16}; do
    serve "np$np" --parallel "$np" ${CHUNK:+--prefill-chunk "$CHUNK"}
    if [[ $runs == *" sweep "* ]]; then
        echo "== --parallel $np: concurrency sweep $LEVELS"
        bench --concurrency-sweep "$LEVELS" --max-tokens "${MAX_TOKENS:-64}" ${REQUESTS:+--sweep-requests "$REQUESTS"} \
            --json "$OUT/sweep-np$np.json"
    fi
    if [[ $runs == *" interrupt "* ]]; then
        streams=${STREAMS:-$((np < 8 ? np : 8))}
        echo "== --parallel $np: $streams streams, a ${LONG:-4000}-token prompt arrives"
        bench --interrupt --interrupt-streams "$streams" --interrupt-max-tokens "${STREAM_TOKENS:-256}" \
            --interrupt-prompt-tokens "${LONG:-4000}" --json "$OUT/interrupt-np$np.json"
    fi
    stop
done

if [[ $runs == *" sweep "* ]]; then
    # shellcheck disable=SC2086
    python3 - "$OUT" ${PARALLEL:-16} <<'PY'
import json, sys
out, nps = sys.argv[1], sys.argv[2:]
runs = {np: {r["concurrency"]: r for r in json.load(open(f"{out}/sweep-np{np}.json"))["levels"]} for np in nps}
levels = sorted({c for r in runs.values() for c in r})
print("aggregate t/s by client concurrency (columns: the server's --parallel)")
print(f"{'clients':>7}" + "".join(f"{'np ' + np:>10}" for np in nps))
for c in levels:
    cell = lambda np: "-" if c not in runs[np] or runs[np][c]["aggregate_tok_s"] is None else f"{runs[np][c]['aggregate_tok_s']:.2f}"
    print(f"{c:>7}" + "".join(f"{cell(np):>10}" for np in nps))
PY
fi
