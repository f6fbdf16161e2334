#!/usr/bin/env bash
# bench/multicast.sh: multicast vs TCP fan-out (issue 10's bar), with the engine and the
# receivers in two network namespaces this script makes for itself, joined by a veth pair, and
# on different CPUs, so that the engine's CPU time is the engine's and not the receivers'.
#
#   namespace A (engine)                       namespace B (lanpush-bench: publisher, receivers)
#   lanpush serve, taskset CPU 0               lanpush-bench, taskset CPU 1
#   veth-e 10.77.0.1/24  <---- veth pair ---->  veth-r 10.77.0.2/24
#   route 224.0.0.0/4 dev veth-e                route 224.0.0.0/4 dev veth-r
#   RPS: veth-e's receive work on CPU 0         RPS: veth-r's receive work on CPU 1
#
# Why: on one loopback the kernel clones each multicast datagram into every joined socket in the
# sender's softirq, charged to the engine. Across the veth pair, with RPS on the receiving end
# (rps_cpus of veth-r = CPU 1), the engine's CPU only hands each datagram (and each TCP segment)
# to CPU 1's backlog; the clone per socket, the UDP and TCP receive work happen there, as they
# would on the receivers' own hosts. The publisher's segments and the receivers' ACKs, NAKs and
# PINGs arriving at the engine are processed on CPU 0 (rps_cpus of veth-e), as on its own host.
# The TCP rows run in the same topology, with an engine config without multicast.
#
# Per run it records, over lanpush-bench's measured window: delivered msg/s, p50/p99, the
# engine's CPU time (utime + stime of /proc/PID/stat, --engine-pid), every syscall of the
# engine's threads (`perf stat -e raw_syscalls:sys_enter -p PID`, --engine-syscalls) and the
# engine's own counters (vectored writes, multicast send calls: --engine-stats). Also each run's
# softirq ticks on CPU 0 and 1 (/proc/stat, the whole run with connection set-up), to show where
# the receive work went.
#
# Usage (root; nothing touches the host's interfaces; every run bounded by `timeout`):
#   bench/multicast.sh                                # the bar's six rows
#   ROWS="mcast:100:10000" DURATION=3 bench/multicast.sh
#   MODE=send bench/multicast.sh                      # also: cargo bench --bench mcast_send
#
# Environment (defaults in brackets):
#   ROWS      "path:receivers:rate ..." [tcp:100:10000 mcast:100:10000 tcp:1000:10000
#             mcast:1000:10000 tcp:8000:10 mcast:8000:10]; path tcp, mcast, or mcast@US: the
#             channel with linger_us = US (bench/multicast.toml has none); floor or floor@K:
#             no engine, lanpush-bench mcast-floor (plain sockets; K messages per datagram)
#   DURATION [5] measured seconds   WARMUP [2]   SIZE [64] payload bytes
#   MCAST_EXTRA  TOML lines appended to the channel of every mcast row, e.g. "loopback = false"
#   ENGINE_CPU [0]  RECV_CPU [1]   the CPUs the engine and lanpush-bench are pinned to
#   BIN       directory of lanpush and lanpush-bench [$CARGO_TARGET_DIR/release or target/release]
#   RUN_TIMEOUT [DURATION + WARMUP + 120] seconds per run   MAX_TOTAL [1800] for the whole script
#   OUT       the markdown file [bench/results/multicast-<date>.md]; raw files in OUT's folder
#   MODE=send  after the rows, run `cargo bench --bench mcast_send` (send vs sendmmsg) too
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
log() { echo "multicast.sh: $*" >&2; }

ROWS=${ROWS:-"tcp:100:10000 mcast:100:10000 tcp:1000:10000 mcast:1000:10000 tcp:8000:10 mcast:8000:10"}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-2}
SIZE=${SIZE:-64}
ENGINE_CPU=${ENGINE_CPU:-0}
RECV_CPU=${RECV_CPU:-1}
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
RUN_TIMEOUT=${RUN_TIMEOUT:-$((${DURATION%.*} + ${WARMUP%.*} + 120))}
MAX_TOTAL=${MAX_TOTAL:-1800}
STAMP=${STAMP:-$(date -u +%Y-%m-%d-%H%M)}
OUT=${OUT:-$ROOT/bench/results/multicast-$STAMP.md}
RAW=${OUT%.md}
export MCAST_EXTRA="${MCAST_EXTRA:-}" ROWS DURATION WARMUP SIZE ENGINE_CPU RECV_CPU BIN RUN_TIMEOUT MAX_TOTAL OUT RAW ROOT

# ---------------------------------------------------------------------------------------------
# Inside namespace A (made by the outer run below, with its own mount namespace).
holder="" sys_a="" sys_b="" epid="" run_pid=""
inside() {
    cleanup() {
        local status=$?
        trap - EXIT INT TERM
        [[ -n $run_pid ]] && stop_pid "$run_pid"
        [[ -n $epid ]] && stop_pid "$epid"
        [[ -n $holder ]] && stop_pid "$holder"
        [[ -n $sys_a ]] && umount "$sys_a" 2>/dev/null; [[ -n $sys_a ]] && rmdir "$sys_a"
        [[ -n $sys_b ]] && rmdir "$sys_b" 2>/dev/null
        true
        exit "$status"
    }
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    ip link set lo up
    # Namespace B: a process that only holds it (net and mount), stopped on exit.
    unshare --net --mount -- sleep "$MAX_TOTAL" &
    holder=$!
    local i
    for ((i = 0; i < 50; i++)); do
        [[ $(readlink "/proc/$holder/ns/net") != $(readlink /proc/self/ns/net) ]] && break
        sleep 0.1
    done
    inb() { nsenter --target "$holder" --net --mount -- "$@"; }
    ip link add veth-e type veth peer name veth-r netns "$holder"
    ip addr add 10.77.0.1/24 dev veth-e
    ip link set veth-e multicast on up
    ip route add 224.0.0.0/4 dev veth-e
    inb ip link set lo up
    inb ip addr add 10.77.0.2/24 dev veth-r
    inb ip link set veth-r multicast on up
    inb ip route add 224.0.0.0/4 dev veth-r
    # sysfs shows the devices of the namespace that mounts it: one private mount in each.
    sys_a=$(mktemp -d /tmp/lanpush-sys-a.XXXXXX)
    sys_b=$(mktemp -d /tmp/lanpush-sys-b.XXXXXX)
    mount -t sysfs sysfs "$sys_a"
    inb mount -t sysfs sysfs "$sys_b"
    printf '%x' $((1 << ENGINE_CPU)) >"$sys_a/class/net/veth-e/queues/rx-0/rps_cpus"
    inb sh -c "printf '%x' $((1 << RECV_CPU)) > $sys_b/class/net/veth-r/queues/rx-0/rps_cpus"
    log "veth-e rps_cpus=$(cat "$sys_a/class/net/veth-e/queues/rx-0/rps_cpus")," \
        "veth-r rps_cpus=$(inb cat "$sys_b/class/net/veth-r/queues/rx-0/rps_cpus")"

    local row path subs rate name base config addr
    for row in $ROWS; do
        IFS=: read -r path subs rate <<<"$row"
        name="$path-$subs-$rate"
        base="$RAW/$name"
        config=()
        case $path in
        mcast | mcast@*)
            # The channel's linger_us and MCAST_EXTRA, appended to its table.
            { cat "$ROOT/bench/multicast.toml"
              [[ $path == mcast@* ]] && echo "linger_us = ${path#mcast@}"
              [[ -n ${MCAST_EXTRA:-} ]] && echo "$MCAST_EXTRA"
              true; } >"$base.toml"
            config=(--config "$base.toml") ;;
        esac
        if [[ $path == floor* ]]; then
            floor_row "$name" "$base" "$subs" "$rate" "${path#floor}"
            continue
        fi
        log "$name: engine on CPU $ENGINE_CPU, receivers on CPU $RECV_CPU"
        taskset -c "$ENGINE_CPU" "$BIN/lanpush" serve --listen 10.77.0.1:0 --threads 1 \
            "${config[@]}" >"$base.engine.out" 2>"$base.engine.err" &
        epid=$!
        addr=""
        for ((i = 0; i < 150; i++)); do
            addr=$(sed -n 's/^listening on \([0-9.:]*\).*/\1/p' "$base.engine.out" | head -1)
            [[ -n $addr ]] && break
            sleep 0.1
        done
        if [[ -z $addr ]]; then
            log "$name: the engine printed no address"; stop_pid "$epid"; epid=""; continue
        fi
        local flags=()
        [[ $path == mcast* ]] && flags=(--multicast)
        grep '^cpu[0-9]' /proc/stat >"$base.stat-before"
        cat /proc/loadavg >"$base.load-before"
        timeout --kill-after=10 "$RUN_TIMEOUT" nsenter --target "$holder" --net --mount -- \
            taskset -c "$RECV_CPU" "$BIN/lanpush-bench" fanout --server "$addr" \
            --engine-pid "$epid" --engine-stats --engine-syscalls --engine-cpu "$ENGINE_CPU" \
            --subscribers "$subs" --rate "$rate" --duration "$DURATION" --warmup "$WARMUP" \
            --size "$SIZE" --label "$name" --quiet --json "$base.json" "${flags[@]}" \
            >"$base.txt" 2>"$base.err" &
        run_pid=$!
        local rc=0
        wait "$run_pid" || rc=$?
        run_pid=""
        grep '^cpu[0-9]' /proc/stat >"$base.stat-after"
        echo "$rc" >"$base.rc"
        stop_pid "$epid"
        epid=""
        log "$name: exit $rc; $(grep -E '^(expected|intended|engine)' "$base.txt" | tr '\n' ' ')"
    done
}

# A `floor` row: no engine. lanpush-bench mcast-floor's receivers (plain group sockets, one
# minimal loop) in namespace B on RECV_CPU, its sender in namespace A on ENGINE_CPU writing
# straight to the group: the least any multicast fan-out can cost on this topology.
# `floor@K` puts K messages in each datagram (a broker's batch at high rates).
floor_row() {
    local name=$1 base=$2 subs=$3 rate=$4 per=${5#@}
    local group=239.192.0.9:7429 i
    log "$name: floor sender on CPU $ENGINE_CPU, $subs plain receivers on CPU $RECV_CPU"
    grep '^cpu[0-9]' /proc/stat >"$base.stat-before"
    timeout --kill-after=10 "$RUN_TIMEOUT" nsenter --target "$holder" --net --mount -- \
        taskset -c "$RECV_CPU" "$BIN/lanpush-bench" mcast-floor recv --group "$group" \
        --interface 10.77.0.2 --receivers "$subs" --size "$SIZE" --json "$base.json" \
        --max-seconds "$((RUN_TIMEOUT - 15))" >"$base.txt" 2>"$base.err" &
    run_pid=$!
    for ((i = 0; i < 600; i++)); do
        grep -q '^ready' "$base.txt" 2>/dev/null && break
        kill -0 "$run_pid" 2>/dev/null || break
        sleep 0.1
    done
    timeout --kill-after=10 "$RUN_TIMEOUT" taskset -c "$ENGINE_CPU" "$BIN/lanpush-bench" \
        mcast-floor send --group "$group" --interface 10.77.0.1 --rate "$rate" \
        --per-datagram "${per:-1}" --size "$SIZE" --warmup "$WARMUP" --duration "$DURATION" \
        2>>"$base.err" || log "$name: the floor sender failed (see $base.err)"
    local rc=0
    wait "$run_pid" || rc=$?
    run_pid=""
    grep '^cpu[0-9]' /proc/stat >"$base.stat-after"
    echo "$rc" >"$base.rc"
    log "$name: exit $rc; $(grep '^mcast-floor' "$base.txt")"
}

if [[ ${1:-} == --inside ]]; then
    inside
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Outside: checks, the namespace, then the table.
[[ $(id -u) == 0 ]] || { log "needs root (network namespaces)"; exit 2; }
for tool in unshare nsenter ip taskset perf python3; do
    command -v "$tool" >/dev/null || { log "needs $tool"; exit 2; }
done
[[ -x $BIN/lanpush && -x $BIN/lanpush-bench ]] ||
    { log "no $BIN/lanpush or lanpush-bench: cargo build --release"; exit 2; }
(( $(nproc) > ENGINE_CPU && $(nproc) > RECV_CPU )) || { log "needs CPUs $ENGINE_CPU and $RECV_CPU"; exit 2; }
mkdir -p "$RAW"
{
    echo "host $(hostname), $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), kernel $(uname -r)"
    echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), started $(date -u +%FT%TZ), load $(cat /proc/loadavg)"
} >"$RAW/machine.txt"
log "raw results in $RAW"
timeout --kill-after=10 "$MAX_TOTAL" unshare --net --mount -- bash "$0" --inside ||
    log "the namespace run ended with status $?"

if [[ ${MODE:-} == send ]]; then
    log "send vs sendmmsg: cargo bench --bench mcast_send"
    (cd "$ROOT" && timeout 600 nice -n 19 cargo bench --bench mcast_send -- --quick) \
        >"$RAW/mcast_send.txt" 2>&1 || log "mcast_send bench failed (see $RAW/mcast_send.txt)"
fi

python3 - "$RAW" "$ROWS" >"$OUT" <<'EOF'
import json, os, sys
raw, rows = sys.argv[1], sys.argv[2].split()
print(f"# Multicast vs TCP fan-out ({os.path.basename(raw)})\n")
print(open(os.path.join(raw, "machine.txt")).read())
print("| receivers × rate | path | delivered msg/s | lost | p50 | p99 | engine CPU % | engine CPU per delivered msg | engine's CPU busy (softirq) per delivered msg | syscalls per published msg (perf) | engine writes + mcast sends per published msg | datagrams (send calls) | softirq ticks CPU0 / CPU1 (whole run) |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
def us(x): return f"{x/1000:.2f} ms" if x >= 1000 else f"{x:.0f} µs"
def softirq(base):
    try:
        b = {l.split()[0]: list(map(int, l.split()[1:])) for l in open(base + ".stat-before")}
        a = {l.split()[0]: list(map(int, l.split()[1:])) for l in open(base + ".stat-after")}
        return " / ".join(str(a[c][6] - b[c][6]) for c in ("cpu0", "cpu1"))
    except Exception:
        return "?"
for row in rows:
    path, subs, rate = row.split(":")
    base = os.path.join(raw, f"{path}-{subs}-{rate}")
    try:
        r = json.load(open(base + ".json"))
    except Exception:
        print(f"| {subs} × {rate} | {path} | run failed (see {base}.err) | | | | | | | | | | |")
        continue
    if path.startswith("floor"):
        lost = f'{r["lost"]:,} ({r["receivers_without_end"]} without the end)' if r["lost"] else "0"
        print(f'| {int(subs):,} × {int(rate):,} | {path} (no broker) | {r["msg_per_s"]:,.0f} | {lost} | '
              f'{us(r["latency_us"]["p50"])} | {us(r["latency_us"]["p99"])} | – | – | – | – | – | – | {softirq(base)} |')
        continue
    d, p, e = r["deliver"], r["publish"], r.get("engine") or {}
    st = e.get("stats") or {}
    pub = max(p["messages"], 1)
    lost = f'{d["lost"]:,} ({d["incomplete_subscribers"]} incomplete)' if d["lost"] else "0"
    cpu = e.get("cpu_ns")
    b, sq = e.get("cpu_busy_ns"), e.get("cpu_softirq_ns")
    busy = (f'{b / max(d["received"], 1):.0f} ns ({sq / max(d["received"], 1):.0f} ns)'
            if b is not None and sq is not None else "?")
    own = (st.get("writes", 0) + st.get("mcast_send_syscalls", 0)) / pub if st else None
    print(f'| {int(subs):,} × {int(rate):,} | {path} | {d["msg_per_s"]:,.0f} | {lost} | '
          f'{us(r["latency_us"]["p50"])} | {us(r["latency_us"]["p99"])} | '
          f'{r["cpu"]["engine_pct"] or 0:.0f} % | '
          f'{(cpu / max(d["received"], 1)) if cpu is not None else float("nan"):.0f} ns | '
          f'{busy} | '
          f'{(e["syscalls"] / pub) if e.get("syscalls") is not None else float("nan"):.2f} | '
          f'{own if own is not None else float("nan"):.2f} | '
          f'{st.get("mcast_datagrams", 0):,} ({st.get("mcast_send_syscalls", 0):,}) | {softirq(base)} |')
EOF
cat "$OUT"
log "wrote $OUT"
