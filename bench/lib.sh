# bench/lib.sh: helpers shared by bench/compare.sh, bench/stalled.sh and bench/ab.sh. Sourced,
# not run.
# shellcheck shell=bash

# PID: TERM, up to 5 s, then KILL. Only ever called with PIDs the calling script started.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# BASE LIMIT CMD...: runs CMD under `timeout LIMIT` (seconds), its output to BASE.log and its exit
# status to BASE.rc and RUN_RC. While it runs, RUN_PID is the `timeout` process, for the caller's
# trap to stop (timeout passes the signal on to CMD).
bounded_run() {
    local base=$1 limit=$2
    shift 2
    RUN_RC=0
    timeout --kill-after=10 "$limit" "$@" >"$base.log" 2>&1 &
    RUN_PID=$!
    wait "$RUN_PID" || RUN_RC=$?
    RUN_PID=""
    echo "$RUN_RC" >"$base.rc"
}

# A whole number with thousands separators: 1234567.8 -> 1,234,568.
fmt_count() { awk -v x="$1" 'BEGIN {
    s = sprintf("%.0f", x); out = ""
    while (length(s) > 3) { out = "," substr(s, length(s) - 2) out; s = substr(s, 1, length(s) - 3) }
    print s out }'; }

# The trap of a script that runs one bounded run at a time (RUN_PID, set by bounded_run) and
# writes OUT through OUT.tmp: on exit, stop the run in flight, drop OUT.tmp, keep the status.
# The caller defines `log` (its prefixed stderr line).
stop_run_on_exit() {
    RUN_PID=""
    trap _stop_run_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

_stop_run_cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n ${RUN_PID:-} ]]; then
        log "stopping the current run (pid $RUN_PID)"
        stop_pid "$RUN_PID"
    fi
    rm -f "${OUT:?}.tmp"
    exit "$status"
}
