#!/usr/bin/env bash
# bench/stalled.sh: issue 3's bar, p99 of the fast subscribers with and without stalled ones.
#
# Runs `lanpush-bench fanout` (1 publisher -> SUBSCRIBERS subscribers, SIZE-byte payloads, RATE
# msg/s) RUNS times with `--stalled 0` and RUNS times with `--stalled STALLED`, alternating
# 0, S, 0, S, ... so that both variants see the same machine conditions; each run starts its own
# engine. Writes a markdown report (per-run table, median and range per variant, the run-to-run
# noise, the difference of the p99 medians and whether it is within that noise) to
# bench/results/stalled-<date>.md and stdout. Raw results (one --json file per run, the tool's
# output, exit status) stay in bench/results/stalled-<date>/run<i>-stalled<S>.{json,log,rc}.
#
# Usage:
#   bench/stalled.sh                                     # 5 pairs of 10 s runs, 100 subscribers
#   RUNS=3 DURATION=5 bench/stalled.sh                   # a quicker look
#   ENGINE_CONFIG=configs/x.toml bench/stalled.sh        # the engine with a config file
#
# Environment (defaults in brackets):
#   RUNS [5] pairs of runs   SUBSCRIBERS [100] fast subscribers   STALLED [1] stalled subscribers
#   SIZE [64] payload bytes   RATE [10000] msg/s   DURATION [10] measured seconds per run
#   WARMUP [2] seconds of load before measuring
#   BENCH     lanpush-bench binary, with the lanpush binary next to it
#             [both built with cargo into $CARGO_TARGET_DIR or target/ when missing]
#   ENGINE_CONFIG  config file for every engine (--engine-config FILE) [none: the defaults]
#   BENCH_ARGS  extra arguments for every run [none]
#   RUN_TIMEOUT  seconds before one run is killed [DURATION + WARMUP + 60]
#   MAX_TOTAL    seconds after which remaining runs are skipped [3600]
#   OUT  the markdown file [bench/results/stalled-<date>.md]
#
# A run that fails, times out, is skipped or measures no delivery is marked failed in the per-run
# table and left out of the summaries. Exit status: 0 when each variant has at least one good
# run (whatever the verdict), 1 otherwise.
#
# Safety: the tool's engine binds 127.0.0.1 only; every run is bounded by RUN_TIMEOUT and the
# whole series by MAX_TOTAL; an EXIT/INT/TERM trap stops the current run (the `timeout` process
# this script started, which passes the signal on to the tool and its engine), by PID (nothing
# else is ever signalled). Git is only read (rev-parse, status without taking the index lock).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
RUNS=${RUNS:-5}
SUBSCRIBERS=${SUBSCRIBERS:-100}
STALLED=${STALLED:-1}
SIZE=${SIZE:-64}
RATE=${RATE:-10000}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ENGINE_CONFIG=${ENGINE_CONFIG:-}
BENCH_ARGS=${BENCH_ARGS:-}
RUN_TIMEOUT=${RUN_TIMEOUT:-$(awk -v d="$DURATION" -v w="$WARMUP" 'BEGIN { printf "%d", d + w + 60 }')}
MAX_TOTAL=${MAX_TOTAL:-3600}
STAMP=$(date +%Y-%m-%d)
OUT=$(realpath -m "${OUT:-$ROOT/bench/results/stalled-$STAMP.md}") # absolute: lanpush-bench puts relative paths under --out
RAW=${OUT%.md}
# One run's numbers, in the order of the per-run table.
JQ_ROW='[
  (.latency_us.p50 // 0),
  (.latency_us.p99 // 0),
  (.latency_us.p99_9 // 0),
  (.latency_us.max // 0),
  (.deliver.received // 0),
  (.deliver.expected // 0),
  (.deliver.lost // 0),
  (.cpu.engine_pct // -1),
  (.cpu.tool_pct // -1),
  ((.errors // []) | length)
] | @tsv'

log() { printf '[stalled] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- the process this script started, and the trap that stops it ----------------------------
stop_run_on_exit

# --- arithmetic (awk) -------------------------------------------------------------------------
# Median of the numbers on stdin: sorted numerically, the middle one, or the mean of the two
# middle ones for an even count. Empty input prints nothing.
median() { sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) exit
    if (NR % 2) printf "%.6f\n", v[(NR + 1) / 2]; else printf "%.6f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
minimum() { sort -g | awk 'NR == 1 { printf "%.6f\n", $1 }'; }
maximum() { sort -g | awk '{ x = $1 } END { if (NR) printf "%.6f\n", x }'; }
# (max - min) / median in %, of the numbers on stdin.
spread_pct() {
    local vals med lo hi
    vals=$(cat)
    med=$(median <<<"$vals")
    lo=$(minimum <<<"$vals")
    hi=$(maximum <<<"$vals")
    awk -v m="$med" -v a="$lo" -v b="$hi" 'BEGIN { printf "%.6f\n", (m > 0 ? 100 * (b - a) / m : 0) }'
}

# Microseconds: one decimal below 100, whole numbers with thousands separators above.
fmt_us() {
    if awk -v x="$1" 'BEGIN { exit !(x < 100) }'; then
        awk -v x="$1" 'BEGIN { printf "%.1f", x }'
    else
        fmt_count "$1"
    fi
}
plural() { if (($1 == 1)); then echo "1 $2"; else echo "$1 $2s"; fi; }
fmt_pct() { awk -v x="$1" 'BEGIN { printf "%.1f%%", x }'; }
fmt_signed_pct() { awk -v x="$1" 'BEGIN { printf "%+.1f%%", x }'; }

# --- runs -----------------------------------------------------------------------------------
bench_cmd() { # S FILE: sets CMD to one run's command line
    local s=$1 file=$2
    CMD=("$BENCH" fanout --subscribers "$SUBSCRIBERS" --size "$SIZE" --rate "$RATE"
        --duration "$DURATION" --warmup "$WARMUP" --stalled "$s" -q --json "$file")
    if [[ -n $ENGINE_CONFIG ]]; then CMD+=(--engine-config "$ENGINE_CONFIG"); fi
    # shellcheck disable=SC2206 # word splitting of BENCH_ARGS is intended
    CMD+=($BENCH_ARGS)
}

run_one() { # I S: one bounded run; leaves RAW/run<i>-stalled<s>.json, .log, .rc
    local i=$1 s=$2 base rc=0
    base="$RAW/run$i-stalled$s"
    rm -f "$base.json" "$base.log" "$base.rc"
    bench_cmd "$s" "$base.json"
    log "run $i, --stalled $s (load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')): ${CMD[*]}"
    bounded_run "$base" "$RUN_TIMEOUT" "${CMD[@]}"
    rc=$RUN_RC
    if ((rc == 124 || rc == 137)); then log "run $i, --stalled $s: killed after $RUN_TIMEOUT s"; fi
    if ((rc != 0)); then log "run $i, --stalled $s: exit status $rc (log: $base.log)"; fi
}

# Reads one run's result. Sets ROW (the JQ_ROW fields, tab-separated) and returns 0 for a good
# run; otherwise sets WHY and returns 1.
ROW="" WHY=""
read_run() { # I S
    local base="$RAW/run$1-stalled$2" rc received
    ROW="" WHY=""
    rc=$(cat "$base.rc" 2>/dev/null || echo '?')
    case $rc in
    0) ;;
    125) WHY="skipped (MAX_TOTAL reached)"; return 1 ;;
    124 | 137) WHY="failed: timed out after $RUN_TIMEOUT s"; return 1 ;;
    *) WHY="failed: exit status $rc"; return 1 ;;
    esac
    if [[ ! -s $base.json ]]; then WHY="failed: no result file"; return 1; fi
    ROW=$(jq -r "$JQ_ROW" "$base.json" 2>/dev/null) || { WHY="failed: unreadable result"; return 1; }
    received=$(cut -f5 <<<"$ROW")
    if awk -v r="$received" 'BEGIN { exit !(r <= 0) }'; then
        WHY="failed: no measured deliveries"
        return 1
    fi
}

# --- the report -----------------------------------------------------------------------------
# Column N (1-based, of JQ_ROW) over the good runs of variant S, one number a line.
values() { # S N
    local i
    for ((i = 1; i <= RUNS; i++)); do
        if read_run "$i" "$1"; then cut -f"$2" <<<"$ROW"; fi
    done
}

good_runs() { # S: how many runs of the variant are good
    local i n=0
    for ((i = 1; i <= RUNS; i++)); do
        if read_run "$i" "$1"; then n=$((n + 1)); fi
    done
    echo "$n"
}

summary_cell() { # S N: "median (min–max)"
    local vals
    vals=$(values "$1" "$2")
    if [[ -z $vals ]]; then echo "—"; return; fi
    echo "$(fmt_us "$(median <<<"$vals")") ($(fmt_us "$(minimum <<<"$vals")")–$(fmt_us "$(maximum <<<"$vals")"))"
}

# The noise paragraph for one percentile: column N, its name, and whether it decides the bar.
noise_section() { # N NAME ROLE
    local n=$1 name=$2 role=$3 v0 v1 m0 m1 sp0 sp1 diff noise verdict n0 n1
    v0=$(values 0 "$n")
    v1=$(values "$STALLED" "$n")
    n0=$(good_runs 0)
    n1=$(good_runs "$STALLED")
    echo "**$name** ($role):"
    echo
    if [[ -z $v0 || -z $v1 ]]; then
        echo "- not computed: a variant has no good run."
        echo
        return
    fi
    m0=$(median <<<"$v0")
    m1=$(median <<<"$v1")
    sp0=$(spread_pct <<<"$v0")
    sp1=$(spread_pct <<<"$v1")
    diff=$(awk -v a="$m0" -v b="$m1" 'BEGIN { printf "%.6f\n", (a > 0 ? 100 * (b - a) / a : 0) }')
    noise=$(awk -v a="$sp0" -v b="$sp1" 'BEGIN { printf "%.6f\n", (a > b ? a : b) }')
    echo "- run-to-run spread, (max − min) / median: \`--stalled 0\` $(fmt_pct "$sp0") over $(plural "$n0" run), \`--stalled $STALLED\` $(fmt_pct "$sp1") over $(plural "$n1" run)"
    echo "- difference of the medians, (stalled − unstalled) / unstalled: $(fmt_us "$m1") vs $(fmt_us "$m0") µs = $(fmt_signed_pct "$diff")"
    if ((n0 < 2 || n1 < 2)); then
        verdict="not determined: a variant has fewer than 2 good runs, so its noise is unknown"
    elif awk -v d="$diff" -v z="$noise" 'BEGIN { if (d < 0) d = -d; exit !(d <= z) }'; then
        verdict="within the noise (|$(fmt_signed_pct "$diff")| ≤ $(fmt_pct "$noise"))"
    else
        verdict="outside the noise (|$(fmt_signed_pct "$diff")| > $(fmt_pct "$noise"))"
    fi
    if [[ $role == "the bar" ]]; then
        echo "- **verdict: $verdict**"
    else
        echo "- verdict: $verdict"
    fi
    echo
}

quote_cmd() { # the words of CMD, shell-quoted, with the repository root shortened to "."
    local w out=""
    for w in "${CMD[@]}"; do
        w=${w/#"$ROOT/"/./}
        out+="$(printf '%q' "$w") "
    done
    echo "${out% }"
}

write_report() {
    local cpu commit dirty i s base cells received expected lost p50 p99 p999 max eng tool errors
    local note rc load_end
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
    commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
    dirty=$(git --no-optional-locks -C "$ROOT" status --porcelain 2>/dev/null | head -1 || true)
    load_end=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
    {
        echo "# Stalled subscriber (issue 3), $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "**Bar (issue 3):** p99 latency of the fast subscribers with and without $(plural "$STALLED" "stalled subscriber"), in the same run series; the difference is within the run-to-run noise."
        echo
        echo "**Machine:** $(nproc) cores${cpu:+, $cpu}, Linux $(uname -r); load average $LOAD_START before the series, $load_end after (1 / 5 / 15 min)."
        echo
        echo "**Date:** $START_UTC – $(date -u '+%H:%M:%S') UTC. **Code:** commit \`$commit\`${dirty:+ + local changes}, release build."
        echo
        echo "**Load:** 1 publisher → $(fmt_count "$SUBSCRIBERS") subscribers of one topic, ${SIZE}-byte payloads, $(fmt_count "$RATE") msg/s; ${DURATION} s measured after ${WARMUP} s warm-up. \`--stalled $STALLED\` adds $(plural "$STALLED" "subscriber connection") to the same topic whose socket is never read; stalled connections are counted in no figure. $(plural "$RUNS" pair) of runs, alternating \`--stalled 0\` and \`--stalled $STALLED\`; each run starts its own engine${ENGINE_CONFIG:+ with \`--engine-config $ENGINE_CONFIG\`} on 127.0.0.1."
        echo
        echo "**Command** (run 1, \`--stalled 0\`; the others differ in \`--stalled\` and \`--json\` only):"
        echo
        echo '```sh'
        bench_cmd 0 "$RAW/run1-stalled0.json"
        quote_cmd
        echo '```'
        echo
        if [[ -n $ENGINE_CONFIG && -r $ENGINE_CONFIG ]]; then
            echo "**Engine config** (\`$ENGINE_CONFIG\`; keys it leaves out keep the defaults of configs/default.toml):"
            echo
            echo '```toml'
            cat "$ENGINE_CONFIG"
            echo '```'
            echo
        fi
        echo "## Runs"
        echo
        echo "Fast subscribers only, latency in µs from the intended send time; engine CPU in % of one core over the measured window."
        echo
        echo "| run | \`--stalled\` | p50 | p99 | p99.9 | max | received / expected | lost | engine CPU | notes |"
        echo "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"
        for ((i = 1; i <= RUNS; i++)); do
            for s in 0 "$STALLED"; do
                base="$RAW/run$i-stalled$s"
                if read_run "$i" "$s"; then
                    IFS=$'\t' read -r p50 p99 p999 max received expected lost eng tool errors <<<"$ROW"
                    note=""
                    if ((errors > 0)); then note="$errors errors (see $(basename "$base").json)"; fi
                    if awk -v t="$tool" 'BEGIN { exit !(t >= 0) }'; then
                        note="${note:+$note; }tool CPU $(awk -v x="$tool" 'BEGIN { printf "%.0f%%", x }')"
                    fi
                    cells="$(fmt_us "$p50") | $(fmt_us "$p99") | $(fmt_us "$p999") | $(fmt_us "$max")"
                    cells+=" | $(fmt_count "$received") / $(fmt_count "$expected") | $(fmt_count "$lost")"
                    if awk -v e="$eng" 'BEGIN { exit !(e >= 0) }'; then
                        cells+=" | $(awk -v x="$eng" 'BEGIN { printf "%.0f%%", x }')"
                    else
                        cells+=" | —"
                    fi
                    echo "| $i | $s | $cells | $note |"
                else
                    rc=$(cat "$base.rc" 2>/dev/null || echo '?')
                    note="$WHY"
                    if [[ $rc != 125 && -e $base.log ]]; then note+=" (log: $(basename "$base").log)"; fi
                    echo "| $i | $s | — | — | — | — | — | — | — | $note |"
                fi
            done
        done
        echo
        echo "## Summary"
        echo
        echo "Median (min–max) over the good runs of each variant, µs."
        echo
        echo "| | good runs | p50 | p99 | p99.9 |"
        echo "| --- | ---: | --- | --- | --- |"
        for s in 0 "$STALLED"; do
            echo "| \`--stalled $s\` | $(good_runs "$s") / $RUNS | $(summary_cell "$s" 1) | **$(summary_cell "$s" 2)** | $(summary_cell "$s" 3) |"
        done
        echo
        echo "## Noise and difference"
        echo
        echo "Rule: the difference is *within the noise* when |difference of the medians| ≤ the larger of the two variants' run-to-run spreads, spread = (max − min) / median of that percentile over the variant's good runs; otherwise *outside the noise*. A variant needs at least 2 good runs for its spread to mean anything."
        echo
        noise_section 2 p99 "the bar"
        noise_section 3 p99.9 "informational"
        echo "Raw results (--json, tool output and exit status per run): ${RAW/#"$ROOT/"/}/"
    } >"$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
}

# --- main -----------------------------------------------------------------------------------
case ${1:-} in
-h | --help) sed -n '2,/^$/ { /^#/ s/^# \{0,1\}//p }' "$0"; exit 0 ;;
"") ;;
*) die "no arguments; settings come from the environment (see bench/stalled.sh --help)" ;;
esac
for v in RUNS SUBSCRIBERS STALLED SIZE RATE RUN_TIMEOUT MAX_TOTAL; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
done
for v in DURATION WARMUP; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number of seconds, not '${!v}'"
done
((RUNS >= 1)) || die "RUNS must be at least 1"
((STALLED >= 1)) || die "STALLED must be at least 1 (the other variant is always --stalled 0)"
((SUBSCRIBERS >= 1)) || die "SUBSCRIBERS must be at least 1"
if [[ -n $ENGINE_CONFIG ]]; then
    [[ -f $ENGINE_CONFIG ]] || die "ENGINE_CONFIG: no file $ENGINE_CONFIG"
    ENGINE_CONFIG=$(realpath "$ENGINE_CONFIG")
fi
command -v jq >/dev/null || die "jq is needed to read the results (apt-get install jq)"
command -v timeout >/dev/null || die "timeout (coreutils) is needed to bound the runs"
mkdir -p "$RAW"

if [[ -z ${BENCH:-} ]]; then
    BENCH="${CARGO_TARGET_DIR:-$ROOT/target}/release/lanpush-bench"
    if [[ ! -x $BENCH || ! -x $(dirname "$BENCH")/lanpush ]]; then
        # The tool starts the engine binary next to itself.
        log "building lanpush and lanpush-bench (release)"
        (cd "$ROOT" && cargo build --release --bins) >&2
    fi
fi
[[ -x $BENCH ]] || die "no lanpush-bench binary at $BENCH"

# SUBSCRIBERS + STALLED sockets in the tool and as many in the engine.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
START_UTC=$(date -u '+%Y-%m-%d %H:%M:%S')
deadline=$((SECONDS + MAX_TOTAL))
for ((i = 1; i <= RUNS; i++)); do
    for s in 0 "$STALLED"; do
        if ((SECONDS >= deadline)); then
            log "MAX_TOTAL=$MAX_TOTAL s reached: skipping run $i, --stalled $s"
            echo 125 >"$RAW/run$i-stalled$s.rc"
            continue
        fi
        run_one "$i" "$s"
    done
done

write_report
cat "$OUT"
log "report: $OUT"
for s in 0 "$STALLED"; do
    if [[ $(good_runs "$s") == 0 ]]; then
        log "no good run with --stalled $s"
        exit 1
    fi
done
