#!/usr/bin/env bash
# bench/overload.sh: issue 9's recovery bar, latency on a fresh engine vs the same engine after
# an overload episode.
#
# Starts ONE engine (`lanpush serve --threads THREADS` on 127.0.0.1:0) and, against it:
#   1. ROUNDS runs of the light load (RATE msg/s -> SUBSCRIBERS subscribers): "fresh";
#   2. OVERLOADS open-loop runs (one publisher as fast as it can, --window 0): the overload;
#   3. ROUNDS runs of the light load again: "after overload".
# Writes a markdown report (per-run p50/p99/p99.9, the median and range of each variant, whether
# the p99 medians differ by more than the larger range, the engine's resident memory at each
# step, and what each overload delivered and lost) to bench/results/overload-<date>.md and stdout.
# Raw results stay in bench/results/overload-<date>/.
#
# Usage:
#   bench/overload.sh                         # 3 + 3 overloads + 3 runs of 5 s
#   ROUNDS=5 DURATION=10 bench/overload.sh
#
# Environment (defaults in brackets):
#   ROUNDS [3]  OVERLOADS [3]  DURATION [5] measured seconds  WARMUP [1]  RATE [10000]
#   SUBSCRIBERS [10]  OVERLOAD_SUBSCRIBERS [10]  THREADS [2]  SIZE [64]
#   BENCH  lanpush-bench binary with lanpush next to it [built into $CARGO_TARGET_DIR or target/]
#   OUT    the markdown file [bench/results/overload-<date>.md]
#
# Safety: the engine binds 127.0.0.1 only and is stopped by the PID this script started; every
# run is bounded by `timeout`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
ROUNDS=${ROUNDS:-3}
OVERLOADS=${OVERLOADS:-3}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
RATE=${RATE:-10000}
SUBSCRIBERS=${SUBSCRIBERS:-10}
OVERLOAD_SUBSCRIBERS=${OVERLOAD_SUBSCRIBERS:-10}
THREADS=${THREADS:-2}
SIZE=${SIZE:-64}
STAMP=$(date -u +%Y-%m-%d-%H%M)
OUT=$(realpath -m "${OUT:-$ROOT/bench/results/overload-$STAMP.md}") # absolute: lanpush-bench puts relative paths under --out
RAW=${OUT%.md}
RUN_TIMEOUT=$((DURATION + WARMUP + 60))

log() { echo "[overload] $*" >&2; }

if [[ -z ${BENCH:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet)
    BENCH="${CARGO_TARGET_DIR:-$ROOT/target}/release/lanpush-bench"
fi
ENGINE="$(dirname "$BENCH")/lanpush"
mkdir -p "$RAW"

ENGINE_PID=""
RUN_PID=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n ${RUN_PID:-} ]]; then stop_pid "$RUN_PID"; fi
    if [[ -n $ENGINE_PID ]]; then stop_pid "$ENGINE_PID"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$ENGINE" serve --listen 127.0.0.1:0 --threads "$THREADS" >"$RAW/engine.out" 2>"$RAW/engine.err" &
ENGINE_PID=$!
for _ in $(seq 100); do
    grep -q '^listening on ' "$RAW/engine.out" 2>/dev/null && break
    sleep 0.1
done
ADDR=$(sed -n 's/^listening on //p' "$RAW/engine.out" | head -1)
[[ -n $ADDR ]] || { log "the engine did not start: $(cat "$RAW/engine.err")"; exit 1; }
log "engine pid $ENGINE_PID on $ADDR"

rss_mib() { awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$ENGINE_PID/status"; }

# NAME ARGS...: one bounded run against the engine; leaves RAW/NAME.json.
run() {
    local name=$1
    shift
    bounded_run "$RAW/$name" "$RUN_TIMEOUT" "$BENCH" fanout --server "$ADDR" --size "$SIZE" \
        --duration "$DURATION" --warmup "$WARMUP" --json "$RAW/$name.json" --quiet "$@"
    if ((RUN_RC != 0)); then log "$name: exit status $RUN_RC (log: $RAW/$name.log)"; fi
}

latency_row() { jq -r '[.latency_us.p50, .latency_us.p99, (.latency_us.p99_9 // .latency_us.p999)] | @tsv' "$1"; }

declare -a FRESH=() AFTER=()
ROWS=""
RSS_FRESH=$(rss_mib)
for ((i = 1; i <= ROUNDS; i++)); do
    run "fresh$i" --subscribers "$SUBSCRIBERS" --rate "$RATE"
    read -r p50 p99 p999 <<<"$(latency_row "$RAW/fresh$i.json")"
    FRESH+=("$p99")
    ROWS+="| fresh $i | $p50 | $p99 | $p999 |"$'\n'
done
RSS_BEFORE=$(rss_mib)
OVER=""
for ((i = 1; i <= OVERLOADS; i++)); do
    run "overload$i" --subscribers "$OVERLOAD_SUBSCRIBERS" --rate 0 --window 0
    OVER+="| overload $i | $(jq -r '[.deliver.msg_per_s, .deliver.expected, .deliver.lost] | @tsv' "$RAW/overload$i.json" | awk -F'\t' '{ printf "%.0f msg/s delivered, %d of %d lost", $1, $3, $2 }') |"$'\n'
done
RSS_OVER=$(rss_mib)
for ((i = 1; i <= ROUNDS; i++)); do
    run "after$i" --subscribers "$SUBSCRIBERS" --rate "$RATE"
    read -r p50 p99 p999 <<<"$(latency_row "$RAW/after$i.json")"
    AFTER+=("$p99")
    ROWS+="| after overload $i | $p50 | $p99 | $p999 |"$'\n'
done
RSS_AFTER=$(rss_mib)

stats() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { printf "%s %s %s", v[int((NR + 1) / 2)], v[1], v[NR] }'; }
read -r FM FLO FHI <<<"$(stats "${FRESH[@]}")"
read -r AM ALO AHI <<<"$(stats "${AFTER[@]}")"
VERDICT=$(awk -v fm="$FM" -v am="$AM" -v fr="$((${FHI%.*} - ${FLO%.*}))" -v ar="$((${AHI%.*} - ${ALO%.*}))" 'BEGIN {
    d = am - fm; if (d < 0) d = -d; n = (fr > ar) ? fr : ar
    if (d <= n) printf "within the noise (|%.0f| µs <= range %.0f µs)", am - fm, n
    else printf "outside the noise (|%.0f| µs > range %.0f µs)", am - fm, n }')

{
    echo "# Fresh vs after overload, $STAMP"
    echo
    echo "One engine (\`lanpush serve --threads $THREADS\`, commit $(git -C "$ROOT" rev-parse --short HEAD)), host $(hostname), $(nproc) CPUs."
    echo "Light load: $RATE msg/s of $SIZE B to $SUBSCRIBERS subscribers, $DURATION s measured. Overload: open loop (\`--rate 0 --window 0\`) to $OVERLOAD_SUBSCRIBERS subscribers."
    echo
    echo "| run | p50 µs | p99 µs | p99.9 µs |"
    echo "| --- | ---: | ---: | ---: |"
    printf '%s' "$ROWS"
    echo
    echo "| overload | result |"
    echo "| --- | --- |"
    printf '%s' "$OVER"
    echo
    echo "p99 median: fresh $FM µs (range $FLO–$FHI), after overload $AM µs (range $ALO–$AHI): $VERDICT."
    echo "Engine resident memory: $RSS_FRESH MiB at start, $RSS_BEFORE MiB after the fresh runs, $RSS_OVER MiB after the overloads, $RSS_AFTER MiB at the end."
} | tee "$OUT"
