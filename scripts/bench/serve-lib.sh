# Sourced by the serving benchmarks (prompt-cache.sh, parallel.sh): start and stop one
# `dflash serve` on a free port. Needs DFLASH, MODEL, THREADS, CTX and OUT set; EXTRA adds
# serve flags.
#   serve NAME [FLAGS...]   starts it with FLAGS, its stderr in $OUT/serve-NAME.log; sets URL, PID
#   stop                    SIGTERM, and waits for it
PID=
URL=
serve() {
    local log=$OUT/serve-$1.log
    shift
    : >"$log"
    # shellcheck disable=SC2086
    "$DFLASH" serve -m "$MODEL" -t "$THREADS" --ctx-size "$CTX" --port 0 ${EXTRA:-} "$@" 2>"$log" &
    PID=$!
    for _ in $(seq 600); do
        URL=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$log" | head -1)
        [ -n "$URL" ] && return 0
        kill -0 "$PID" 2>/dev/null || { cat "$log"; exit 1; }
        sleep 1
    done
    echo "the server did not start" >&2
    exit 1
}
stop() {
    kill -TERM "$PID"
    wait "$PID" || true
    PID=
}
trap '[ -z "$PID" ] || kill "$PID" 2>/dev/null || true' EXIT
