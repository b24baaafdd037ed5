#!/usr/bin/env bash
# The official `openai` and `anthropic` Python clients against a real `dflash serve` on the
# shipped tiny model (tests/python/test_openai.py, tests/python/test_anthropic.py), and
# scripts/bench_server.py's sweep and interrupt runs (tests/python/test_bench_server.py). Needs PyPI
# once, for the venv (default /tmp/dflash-openai-venv, override with DFLASH_OPENAI_VENV;
# python3-venv comes from scripts/setup.sh). Without the venv the test fails: a test that cannot
# run is not a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DFLASH_OPENAI_VENV:-/tmp/dflash-openai-venv}"
ANTHROPIC_VERSION=2.17.0
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, anthropic, sys
sys.exit(anthropic.__version__ != '$ANTHROPIC_VERSION')" 2>/dev/null; then
    if ! { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "openai>=1.40" "anthropic==$ANTHROPIC_VERSION"; }; then
        echo "test_openai.sh: FAILED: could not create the venv $VENV with the openai and anthropic packages" \
            "(python3 -m venv, then pip install from PyPI); run ./scripts/setup.sh and check PyPI access" >&2
        exit 1
    fi
fi
[ -f models/tiny-ds4.gguf ] || ./scripts/setup.sh
cargo build -q ${DFLASH_PROFILE:+--profile "$DFLASH_PROFILE"} -p daemon
BIN="target/${DFLASH_PROFILE:-debug}/dflash"
LOG="$(mktemp)"
"$BIN" serve -m models/tiny-ds4.gguf --port 0 --api-key test-key --parallel 4 --ctx-size 512 \
    --max-body-bytes 200000 2>"$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 600); do
    ADDR="$(sed -n 's/.*listening on \(http:\/\/[^ ]*\).*/\1/p' "$LOG")"
    [ -n "$ADDR" ] && break
    kill -0 $PID 2>/dev/null || { cat "$LOG" >&2; exit 1; }
    sleep 0.1
done
[ -n "$ADDR" ] || { echo "server did not start" >&2; cat "$LOG" >&2; exit 1; }
DFLASH_URL="$ADDR" DFLASH_KEY=test-key "$VENV/bin/python" tests/python/test_openai.py -v
DFLASH_URL="$ADDR" DFLASH_KEY=test-key "$VENV/bin/python" tests/python/test_anthropic.py -v
# scripts/bench_server.py's sweep and interrupt runs against the same server.
DFLASH_URL="$ADDR" DFLASH_KEY=test-key "$VENV/bin/python" tests/python/test_bench_server.py -v
kill -TERM $PID
wait $PID
