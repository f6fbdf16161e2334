#!/usr/bin/env bash
# bench/compare.sh: lanpush side by side with mosquitto, nats-server and redis-server.
#
# Installs the peers from Debian's packages when they are missing, starts each on 127.0.0.1 on a
# fixed port, runs the same lanpush-bench scenarios against each peer and against lanpush (the
# tool starts its own engine), stops the peers by the PIDs it started, and writes a markdown
# table to bench/results/compare-<date>.md and stdout. Raw results (one --json file per run,
# peer logs) stay in bench/results/compare-<date>/ for `lanpush-bench --plot`.
#
# Usage:
#   bench/compare.sh                                   # every scenario, every target
#   DURATION=3 SCENARIOS=fanout100 bench/compare.sh    # a quick look
#   TARGETS="lanpush nats" SCENARIOS="lat10k-10 fanin100" bench/compare.sh
#
# Scenarios (the rows of issue 4's bar):
#   fanout1 fanout10 fanout100 fanout1000   fan-out 1 -> S, unpaced: delivered msg/s
#   lat10k-10 lat10k-100 lat100k-10 lat100k-100
#                                           fan-out at R msg/s to S subscribers: p50/p99/p99.9
#   fanin100                                fan-in 100 publishers -> 1 wildcard subscriber
#   open1 open10                            fan-out 1 -> S open loop (--window 0): issue 9's bar
#   stalled10                               10,000 msg/s -> 10 healthy + 1 stalled subscriber
#   plant                                   bench/scenarios/plant.toml: 8 gateways x 500 tags
#                                           every 100 ms -> 40 HMIs: p50/p99/p99.9
#
# Targets: lanpush (native protocol), lanpush-mqtt (the same engine through its MQTT listener,
# driven by the same MQTT client as the mosquitto column: issue 12's comparison), mqtt
# (mosquitto), nats (nats-server), redis (redis-server). For MQTT against MQTT only:
#   TARGETS="lanpush-mqtt mqtt" SCENARIOS="fanout100 plant" bench/compare.sh
#
# Environment (defaults in brackets):
#   SCENARIOS [all above]   TARGETS ["lanpush mqtt nats redis"]
#   DURATION [10] measured seconds per run   WARMUP [2]   SIZE [64] payload bytes
#   MQTT_PORT [18830]  NATS_PORT [14222]  REDIS_PORT [16379]
#   BENCH     lanpush-bench binary, with the lanpush binary next to it
#             [both built with cargo into $CARGO_TARGET_DIR or target/]
#   BENCH_ARGS  extra arguments for every run [none]
#   RUN_TIMEOUT  seconds before one run is killed [DURATION + WARMUP + 60]
#   MAX_TOTAL    seconds after which remaining runs are skipped [3600]
#   NO_INSTALL=1  never call apt-get          OUT  the markdown file [bench/results/compare-<date>.md]
#
# Safety: peers bind 127.0.0.1 only; every run is bounded by RUN_TIMEOUT and the whole script by
# MAX_TOTAL; an EXIT/INT/TERM trap stops the current run and every peer this script started, by
# PID (nothing else is ever signalled).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
ALL_SCENARIOS="fanout1 fanout10 fanout100 fanout1000 lat10k-10 lat10k-100 lat100k-10 lat100k-100 fanin100 open1 open10 stalled10 plant"
SCENARIOS=${SCENARIOS:-$ALL_SCENARIOS}
TARGETS=${TARGETS:-lanpush mqtt nats redis}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
SIZE=${SIZE:-64}
MQTT_PORT=${MQTT_PORT:-18830}
NATS_PORT=${NATS_PORT:-14222}
REDIS_PORT=${REDIS_PORT:-16379}
BENCH_ARGS=${BENCH_ARGS:-}
RUN_TIMEOUT=${RUN_TIMEOUT:-$(awk -v d="$DURATION" -v w="$WARMUP" 'BEGIN { printf "%d", d + w + 60 }')}
MAX_TOTAL=${MAX_TOTAL:-3600}
NO_INSTALL=${NO_INSTALL:-0}
STAMP=$(date +%Y-%m-%d)
OUT=$(realpath -m "${OUT:-$ROOT/bench/results/compare-$STAMP.md}") # absolute: lanpush-bench puts relative paths under --out
RAW=${OUT%.md}
# Where the tool's --json puts each number; the second path of each pair is the tool's earlier
# draft and only a fallback.
JQ_ROW='[
  (.deliver.msg_per_s // .delivered_msgs_per_sec // 0),
  (.deliver.lost // 0),
  (.deliver.expected // 0),
  (.latency_us.p50 // 0),
  (.latency_us.p99 // 0),
  (.latency_us.p99_9 // .latency_us.p999 // 0),
  ((.errors // []) | length)
] | @tsv'

log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes this script started, and the trap that stops them ---------------------------
declare -A PEER_PID=()
RUN_PID=""

cleanup() {
    local status=$? name
    trap - EXIT INT TERM
    if [[ -n $RUN_PID ]]; then stop_pid "$RUN_PID"; fi
    for name in "${!PEER_PID[@]}"; do
        log "stopping $name (pid ${PEER_PID[$name]})"
        stop_pid "${PEER_PID[$name]}"
    done
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- peers ----------------------------------------------------------------------------------
declare -A PEER_PKG=([mqtt]=mosquitto [nats]=nats-server [redis]=redis-server)
declare -A PEER_PORT=([mqtt]=$MQTT_PORT [nats]=$NATS_PORT [redis]=$REDIS_PORT)
declare -A PEER_STATE=() # target -> "ok" or why it is missing from the table
declare -A PEER_VERSION=()

find_bin() { # NAME: path of a daemon, also in sbin dirs that a non-root PATH lacks
    local d
    command -v "$1" 2>/dev/null && return 0
    for d in /usr/sbin /usr/local/sbin /sbin; do
        [[ -x $d/$1 ]] && { echo "$d/$1"; return 0; }
    done
    return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

# The columns lanpush-bench serves with an engine it starts itself.
is_lanpush() { [[ $1 == lanpush || $1 == lanpush-mqtt ]]; }

install_missing() {
    local wanted=() missing=() pkg t
    for t in $TARGETS; do
        is_lanpush "$t" && continue
        [[ -n ${PEER_PKG[$t]:-} ]] || die "unknown target $t (lanpush, lanpush-mqtt, mqtt, nats, redis)"
        find_bin "${PEER_PKG[$t]}" >/dev/null || wanted+=("${PEER_PKG[$t]}")
    done
    command -v jq >/dev/null || wanted+=(jq)
    ((${#wanted[@]})) || return 0
    if [[ $NO_INSTALL == 1 ]]; then
        log "not installed, and NO_INSTALL=1: ${wanted[*]}"
        return 0
    fi
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    log "installing from Debian's packages: ${wanted[*]}"
    "${sudo[@]}" apt-get update -qq || log "apt-get update failed; trying with the cached lists"
    local policy
    for pkg in "${wanted[@]}"; do
        # A package this Debian release does not have (nats-server is in bookworm, not in
        # bullseye) leaves its column out of the table instead of failing the whole run. Read
        # whole before matching: `apt-cache ... | grep -q` under pipefail fails when grep's
        # early exit cuts apt-cache off (SIGPIPE), which skipped packages that were there.
        policy=$(apt-cache policy "$pkg" 2>/dev/null || true)
        if [[ $policy == *"Candidate: "* && $policy != *"Candidate: (none)"* ]]; then
            missing+=("$pkg")
        else
            log "$pkg is not packaged in this Debian release; its column is skipped"
        fi
    done
    ((${#missing[@]})) || return 0
    # Debian starts mosquitto and redis-server as services on their default ports (1883, 6379);
    # this script leaves those alone and runs its own instances on other ports.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >&2 ||
        log "apt-get install failed for: ${missing[*]}"
}

start_peer() { # TARGET: starts it on 127.0.0.1:port, records its PID, waits until it listens
    local t=$1 port=${PEER_PORT[$1]} bin pid i
    if ! bin=$(find_bin "${PEER_PKG[$t]}"); then
        PEER_STATE[$t]="${PEER_PKG[$t]} not installed"
        return 0
    fi
    if port_open "$port"; then
        PEER_STATE[$t]="port $port already in use (set ${t^^}_PORT)"
        return 0
    fi
    case $t in
    mqtt)
        PEER_VERSION[$t]=$("$bin" -h 2>/dev/null | awk 'NR == 1 { print $3 }' || true)
        sed "s/^listener 18830 127\.0\.0\.1$/listener $port 127.0.0.1/" \
            "$ROOT/bench/peers/mosquitto.conf" >"$RAW/mosquitto.conf"
        grep -q "^listener $port 127.0.0.1$" "$RAW/mosquitto.conf" ||
            die "bench/peers/mosquitto.conf lost its 'listener 18830 127.0.0.1' line"
        "$bin" -c "$RAW/mosquitto.conf" >"$RAW/mosquitto.log" 2>&1 &
        ;;
    nats)
        PEER_VERSION[$t]=$("$bin" --version 2>/dev/null | awk 'NR == 1 { print $2 }' || true)
        "$bin" -a 127.0.0.1 -p "$port" >"$RAW/nats-server.log" 2>&1 &
        ;;
    redis)
        PEER_VERSION[$t]=$("$bin" --version 2>/dev/null | sed -n 's/.* v=\([^ ]*\).*/\1/p' || true)
        # No persistence (no RDB snapshots, no AOF): a pure pub/sub broker like the others.
        # Pub/sub output buffers unlimited: the default (32 MB hard, 8 MB for 60 s) disconnects
        # a subscriber that falls behind; memory bounds it instead, over a run of seconds.
        "$bin" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
            --client-output-buffer-limit 'pubsub 0 0 0' --protected-mode yes \
            --daemonize no --dir "$RAW" --logfile '' >"$RAW/redis-server.log" 2>&1 &
        ;;
    esac
    pid=$!
    PEER_PID[$t]=$pid
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            unset "PEER_PID[$t]"
            PEER_STATE[$t]="${PEER_PKG[$t]} exited at start (see $RAW/${PEER_PKG[$t]}.log)"
            return 0
        fi
        if port_open "$port"; then
            PEER_STATE[$t]=ok
            log "${PEER_PKG[$t]} ${PEER_VERSION[$t]:-} on 127.0.0.1:$port (pid $pid)"
            return 0
        fi
        sleep 0.1
    done
    stop_pid "$pid"
    unset "PEER_PID[$t]"
    PEER_STATE[$t]="${PEER_PKG[$t]} did not listen on port $port within 10 s"
}

target_url() {
    case $1 in
    mqtt) echo "mqtt://127.0.0.1:$MQTT_PORT" ;;
    nats) echo "nats://127.0.0.1:$NATS_PORT" ;;
    redis) echo "redis://127.0.0.1:$REDIS_PORT" ;;
    esac
}

# --- scenarios ------------------------------------------------------------------------------
# scenario -> "kind|label|lanpush-bench arguments"; kind "thr" reports delivered msg/s, "lat"
# reports p50 / p99 / p99.9.
declare -A SCENARIO=(
    [fanout1]="thr|fan-out 1 → 1|fanout --publishers 1 --subscribers 1 --rate 0"
    [fanout10]="thr|fan-out 1 → 10|fanout --publishers 1 --subscribers 10 --rate 0"
    [fanout100]="thr|fan-out 1 → 100|fanout --publishers 1 --subscribers 100 --rate 0"
    [fanout1000]="thr|fan-out 1 → 1000|fanout --publishers 1 --subscribers 1000 --rate 0"
    [lat10k-10]="lat|10,000 msg/s → 10 subscribers|fanout --publishers 1 --subscribers 10 --rate 10000"
    [lat10k-100]="lat|10,000 msg/s → 100 subscribers|fanout --publishers 1 --subscribers 100 --rate 10000"
    [lat100k-10]="lat|100,000 msg/s → 10 subscribers|fanout --publishers 1 --subscribers 10 --rate 100000"
    [lat100k-100]="lat|100,000 msg/s → 100 subscribers|fanout --publishers 1 --subscribers 100 --rate 100000"
    [fanin100]="thr|fan-in 100 → 1|fanin --publishers 100 --subscribers 1 --rate 0"
    [open1]="thr|fan-out 1 → 1, open loop|fanout --publishers 1 --subscribers 1 --rate 0 --window 0"
    [open10]="thr|fan-out 1 → 10, open loop|fanout --publishers 1 --subscribers 10 --rate 0 --window 0"
    [stalled10]="lat|10,000 msg/s → 10 + 1 stalled|fanout --publishers 1 --subscribers 10 --stalled 1 --rate 10000"
    [plant]="lat|plant: 8 × 500 tags / 100 ms → 40 HMIs|run $ROOT/bench/scenarios/plant.toml"
)

run_one() { # SCENARIO TARGET: one bounded run; leaves RAW/<s>.<t>.json, .log, .rc
    local s=$1 t=$2 args base rc=0
    IFS='|' read -r _ _ args <<<"${SCENARIO[$s]}"
    base="$RAW/$s.$t"
    rm -f "$base.json"
    # shellcheck disable=SC2206 # $args is a word list by design
    local cmd=("$BENCH" $args --duration "$DURATION" --warmup "$WARMUP" --size "$SIZE"
        --label "$t" --json "$base.json" --quiet)
    case $t in
    lanpush) ;;
    lanpush-mqtt) cmd+=(--mqtt) ;;
    *) cmd+=(--target "$(target_url "$t")") ;;
    esac
    # shellcheck disable=SC2206 # word splitting of BENCH_ARGS is intended
    cmd+=($BENCH_ARGS)
    log "$s on $t: ${cmd[*]}"
    bounded_run "$base" "$RUN_TIMEOUT" "${cmd[@]}"
    rc=$RUN_RC
    if ((rc == 124)); then log "$s on $t: killed after $RUN_TIMEOUT s"; fi
    if ((rc != 0)); then log "$s on $t: exit status $rc (log: $base.log)"; fi
}

# --- the table ------------------------------------------------------------------------------
fmt_us() { awk -v x="$1" 'BEGIN { if (x < 10) printf "%.1f", x; else if (x < 1000) printf "%.0f", x;
    else if (x < 1000000) printf "%.1f ms", x / 1000; else printf "%.2f s", x / 1000000 }'; }

# Sets VALUES[t] ("delivered lost expected p50 p99 p999 errors") and CELL[t] for one scenario.
declare -A VALUES=() CELL=()
read_cells() {
    local s=$1 kind=$2 t base row delivered lost expected p50 p99 p999 errors note
    VALUES=() CELL=()
    for t in $TARGETS; do
        base="$RAW/$s.$t"
        if ! is_lanpush "$t" && [[ ${PEER_STATE[$t]:-} != ok ]]; then
            CELL[$t]="—"
            continue
        fi
        if [[ ! -s $base.json ]]; then
            CELL[$t]="failed (exit $(cat "$base.rc" 2>/dev/null || echo '?'))"
            continue
        fi
        row=$(jq -r "$JQ_ROW" "$base.json" 2>/dev/null) || { CELL[$t]="unreadable result"; continue; }
        read -r delivered lost expected p50 p99 p999 errors <<<"$row"
        VALUES[$t]="$delivered $lost $expected $p50 $p99 $p999 $errors"
        if [[ $kind == thr ]]; then
            CELL[$t]=$(fmt_count "$delivered")
        elif awk -v e="$expected" -v l="$lost" 'BEGIN { exit !(e <= 0 || l >= e) }'; then
            CELL[$t]="no measured deliveries"
        else
            CELL[$t]="$(fmt_us "$p50") / $(fmt_us "$p99") / $(fmt_us "$p999")"
        fi
        note=""
        if awk -v l="$lost" 'BEGIN { exit !(l > 0) }'; then
            note=$(awk -v l="$lost" -v e="$expected" 'BEGIN {
                pct = (e > 0 ? 100 * l / e : 100); printf (pct >= 1 ? "lost %.1f%%" : "lost %.2g%%"), pct }')
        fi
        if ((errors > 0)); then note="${note:+$note, }$errors errors"; fi
        if [[ -n $note ]]; then CELL[$t]+=" ($note)"; fi
    done
}

# "yes", or which peers beat lanpush on this row. lanpush's figure is the native column's, or
# the MQTT column's when the native one is not in the table. On throughput rows "yes" carries
# the factor over the best peer.
verdict() {
    local kind=$1 t me behind=() mine theirs best=0
    me=lanpush
    [[ -n ${VALUES[lanpush]:-} ]] || me=lanpush-mqtt
    [[ -n ${VALUES[$me]:-} ]] || { echo "n/a"; return; }
    read -ra mine <<<"${VALUES[$me]}"
    if [[ $kind == thr ]] && awk -v a="${mine[0]}" 'BEGIN { exit !(a <= 0) }'; then
        echo "**no**: lanpush delivered nothing in the window"
        return
    fi
    if [[ $kind == lat ]] && awk -v e="${mine[2]}" -v l="${mine[1]}" 'BEGIN { exit !(e <= 0 || l >= e) }'; then
        echo "**no**: lanpush delivered no measured message"
        return
    fi
    for t in $TARGETS; do
        if is_lanpush "$t" || [[ -z ${VALUES[$t]:-} ]]; then continue; fi
        read -ra theirs <<<"${VALUES[$t]}"
        best=$(awk -v a="$best" -v b="${theirs[0]}" 'BEGIN { print (b > a ? b : a) }')
        # A peer with no measured deliveries has no percentiles to compare (they read as 0).
        if [[ $kind == lat ]] && awk -v e="${theirs[2]}" -v l="${theirs[1]}" 'BEGIN { exit !(e <= 0 || l >= e) }'; then
            continue
        fi
        if [[ $kind == thr ]]; then
            if awk -v a="${mine[0]}" -v b="${theirs[0]}" 'BEGIN { exit !(b > a) }'; then
                behind+=("${PEER_PKG[$t]}")
            fi
        else
            # Lower is better; a peer that beats lanpush at any of the three percentiles counts.
            if awk -v a50="${mine[3]}" -v a99="${mine[4]}" -v a999="${mine[5]}" \
                -v b50="${theirs[3]}" -v b99="${theirs[4]}" -v b999="${theirs[5]}" \
                'BEGIN { exit !(b50 < a50 || b99 < a99 || b999 < a999) }'; then
                behind+=("${PEER_PKG[$t]}")
            fi
        fi
    done
    if ((${#behind[@]} > 0)); then
        echo "**no**: behind ${behind[*]}"
    elif [[ $kind == thr ]] && awk -v b="$best" 'BEGIN { exit !(b > 0) }'; then
        awk -v a="${mine[0]}" -v b="$best" 'BEGIN { printf "yes (%.1f×)\n", a / b }'
    else
        echo "yes"
    fi
}

write_table() {
    local s kind label t header sep row cpu
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
    {
        echo "# lanpush vs. peers, $(date '+%Y-%m-%d %H:%M %Z')"
        echo
        echo "Machine: $(nproc) cores${cpu:+, $cpu}, Linux $(uname -r); lanpush $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')."
        echo "Each run: ${DURATION} s measured after ${WARMUP} s warm-up, ${SIZE}-byte payloads; all targets on 127.0.0.1, one after another for each row."
        echo "Throughput rows: messages delivered per second, all subscribers together. Latency rows: p50 / p99 / p99.9 in µs from the intended send time (coordinated omission corrected)."
        echo
        header="| scenario |"
        sep="| --- |"
        for t in $TARGETS; do
            case $t in
            lanpush) header+=" lanpush |" ;;
            lanpush-mqtt) header+=" lanpush (MQTT) |" ;;
            *) header+=" ${PEER_PKG[$t]} ${PEER_VERSION[$t]:-} |" ;;
            esac
            sep+=" ---: |"
        done
        echo "$header lanpush ahead? |"
        echo "$sep --- |"
        for s in $SCENARIOS; do
            IFS='|' read -r kind label _ <<<"${SCENARIO[$s]}"
            read_cells "$s" "$kind"
            row="| $label |"
            for t in $TARGETS; do row+=" ${CELL[$t]} |"; done
            echo "$row $(verdict "$kind") |"
        done
        echo
        echo "Notes"
        for t in $TARGETS; do
            if is_lanpush "$t"; then continue; fi
            if [[ ${PEER_STATE[$t]:-} != ok ]]; then
                echo "- ${PEER_PKG[$t]}: not measured (${PEER_STATE[$t]:-not started})."
            fi
        done
        has_target lanpush-mqtt && echo "- lanpush (MQTT): the engine lanpush-bench starts, with \`--mqtt-listen 127.0.0.1:0\`, driven by the same MQTT 3.1.1 QoS 0 client as the mosquitto column (\`lanpush-bench --mqtt\`)."
        has_target mqtt && echo "- mosquitto: bench/peers/mosquitto.conf (QoS 0; max_queued_messages 65536, lanpush's default queue bound, instead of 1000; TCP_NODELAY on; no persistence)."
        has_target nats && echo "- nats-server: \`-a 127.0.0.1 -p $NATS_PORT\`, defaults otherwise (64 MB pending per client before a slow consumer is cut)."
        has_target redis && echo "- redis-server: \`--save '' --appendonly no --client-output-buffer-limit 'pubsub 0 0 0'\` (no persistence, subscribers never cut for lagging); publishers use CLIENT REPLY OFF."
        echo "- Client drivers: tools/lanpush-bench/peers/ (topic translation and its limits are in each module's docs). \"lost\" = deliveries the run expected and did not see; \"—\" = target not available."
        echo "- Raw results (--json per run, logs): $(realpath --relative-to="$ROOT" "$RAW" 2>/dev/null || echo "$RAW")/"
    } >"$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
}

# --- main -----------------------------------------------------------------------------------
for s in $SCENARIOS; do [[ -n ${SCENARIO[$s]:-} ]] || die "unknown scenario $s (known: $ALL_SCENARIOS)"; done
for t in $TARGETS; do is_lanpush "$t" || [[ -n ${PEER_PKG[$t]:-} ]] || die "unknown target $t"; done
mkdir -p "$RAW"
install_missing
command -v jq >/dev/null || die "jq is needed to read the results (apt-get install jq)"

if [[ -z ${BENCH:-} ]]; then
    # The tool starts the engine binary next to itself for the lanpush column.
    log "building lanpush and lanpush-bench (release)"
    (cd "$ROOT" && cargo build --release --bin lanpush --bin lanpush-bench) >&2
    BENCH="${CARGO_TARGET_DIR:-$ROOT/target}/release/lanpush-bench"
fi
[[ -x $BENCH ]] || die "no lanpush-bench binary at $BENCH"

# 1,000 subscribers need 1,000 sockets in the tool and as many in the broker.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

for t in $TARGETS; do is_lanpush "$t" || start_peer "$t"; done

deadline=$((SECONDS + MAX_TOTAL))
for s in $SCENARIOS; do
    for t in $TARGETS; do
        if ! is_lanpush "$t" && [[ ${PEER_STATE[$t]:-} != ok ]]; then continue; fi
        if ((SECONDS >= deadline)); then
            log "MAX_TOTAL=$MAX_TOTAL s reached: skipping $s on $t"
            echo 125 >"$RAW/$s.$t.rc"
            continue
        fi
        run_one "$s" "$t"
    done
done

write_table
cat "$OUT"
log "table: $OUT"
