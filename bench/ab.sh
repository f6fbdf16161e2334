#!/usr/bin/env bash
# bench/ab.sh: two builds of lanpush, before and after a change, in alternating runs.
#
# BEFORE and AFTER are directories that each hold a `lanpush` and a `lanpush-bench` binary (the
# tool starts the engine next to itself). For ROUNDS rounds, every scenario of bench/compare.sh
# runs once on BEFORE and then once on AFTER, so the two sides of each pair are measured seconds
# apart under the same machine conditions. Each run is one call of bench/compare.sh with
# TARGETS=lanpush (one scenario per call; the tool starts its own engine on 127.0.0.1). Writes a
# markdown report (per scenario and figure: median and min–max of each side, the after/before
# ratio of the medians, whether it is within the run-to-run noise; then every run's figure) to
# bench/results/ab-<date>.md and stdout. Raw results stay in bench/results/ab-<date>/round<i>/:
# <side>-<scenario>.md, .log, .rc (compare.sh's table, output and exit status) and
# <side>-<scenario>/ (compare.sh's raw directory: the --json file, the tool's log and exit status).
#
# Usage:
#   BEFORE=/work/bin-before AFTER=/work/bin-after bench/ab.sh        # 3 rounds, every scenario
#   BEFORE=a AFTER=b ROUNDS=1 DURATION=2 SCENARIOS="fanout10 lat10k-10" bench/ab.sh   # a look
#   BEFORE=a AFTER=a ROUNDS=5 bench/ab.sh              # an A/A run: the noise alone
#
# Environment (defaults in brackets):
#   BEFORE, AFTER  directories holding lanpush and lanpush-bench [required]
#   BEFORE_LABEL [before]  AFTER_LABEL [after]  names in the report (say, commit ids)
#   ROUNDS [3] before/after pairs per scenario   SCENARIOS [every scenario of compare.sh]
#   DURATION [10] measured seconds per run   WARMUP [2]   SIZE [64] payload bytes
#   BENCH_ARGS  extra arguments for every run [none]
#   RUN_TIMEOUT  seconds before one run is killed [DURATION + WARMUP + 60]
#   MAX_TOTAL    seconds after which remaining runs are skipped [7200]
#   OUT  the markdown file [bench/results/ab-<date>.md]
#
# Noise rule: each side's runs span [min, max] around their median; as ratios to that median,
# the two spans' union is the band [lo, hi] that run-to-run noise alone can produce. The
# after/before ratio of the medians is *within the noise* when lo <= ratio <= hi; outside it, the
# row is better or worse by the figure's direction (msg/s: higher is better; latency: lower).
# Each side needs at least 2 good runs for a verdict. A run is good when it exited 0 and measured
# at least one delivery; losses and errors are listed under the table.
#
# Exit status: 0 when every scenario has at least one good run on each side (whatever the
# verdicts), 1 otherwise.
#
# Safety: engines bind 127.0.0.1 only; every run is bounded by RUN_TIMEOUT inside compare.sh and
# each compare.sh call by RUN_TIMEOUT + 30 here, the whole series by MAX_TOTAL; an EXIT/INT/TERM
# trap stops the current call (the `timeout` process this script started, which passes the signal
# on to compare.sh, whose own trap stops its run), by PID (nothing else is ever signalled). Git
# is not touched; nothing is built.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
COMPARE="$ROOT/bench/compare.sh"
ROUNDS=${ROUNDS:-3}
BEFORE=${BEFORE:-}
AFTER=${AFTER:-}
BEFORE_LABEL=${BEFORE_LABEL:-before}
AFTER_LABEL=${AFTER_LABEL:-after}
SCENARIOS=${SCENARIOS:-}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
SIZE=${SIZE:-64}
BENCH_ARGS=${BENCH_ARGS:-}
RUN_TIMEOUT=${RUN_TIMEOUT:-$(awk -v d="$DURATION" -v w="$WARMUP" 'BEGIN { printf "%d", d + w + 60 }')}
MAX_TOTAL=${MAX_TOTAL:-7200}
STAMP=$(date +%Y-%m-%d)
OUT=$(realpath -m "${OUT:-$ROOT/bench/results/ab-$STAMP.md}") # absolute: lanpush-bench puts relative paths under --out
RAW=${OUT%.md}
SIDES="before after"
# One run's numbers: the fields compare.sh reads, plus what was received.
JQ_ROW='[
  (.deliver.msg_per_s // 0),
  (.latency_us.p50 // 0),
  (.latency_us.p99 // 0),
  (.latency_us.p99_9 // 0),
  (.deliver.received // 0),
  (.deliver.expected // 0),
  (.deliver.lost // 0),
  ((.errors // []) | length)
] | @tsv'

log() { printf '[ab] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- the process this script started, and the trap that stops it ----------------------------
stop_run_on_exit

# --- what compare.sh defines ----------------------------------------------------------------
# Its scenario list and, per scenario, "kind|label" (kind thr: delivered msg/s; lat: p50 / p99 /
# p99.9), read from its source so that the two scripts cannot disagree.
compare_scenarios() { sed -n 's/^ALL_SCENARIOS="\([^"]*\)"$/\1/p' "$COMPARE"; }
compare_kind_label() { # S
    sed -n "s/^ *\[$1\]=\"\(thr\|lat\)|\([^|]*\)|.*/\1|\2/p" "$COMPARE" | head -1
}

# --- arithmetic (awk) -------------------------------------------------------------------------
median() { sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) exit
    if (NR % 2) printf "%.6f\n", v[(NR + 1) / 2]; else printf "%.6f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
minimum() { sort -g | awk 'NR == 1 { printf "%.6f\n", $1 }'; }
maximum() { sort -g | awk '{ x = $1 } END { if (NR) printf "%.6f\n", x }'; }

# Microseconds: one decimal below 100, whole numbers with thousands separators above.
fmt_us() {
    if awk -v x="$1" 'BEGIN { exit !(x < 100) }'; then
        awk -v x="$1" 'BEGIN { printf "%.1f", x }'
    else
        fmt_count "$1"
    fi
}
fmt_value() { # COLUMN VALUE: msg/s as a whole number, latencies as fmt_us
    if (($1 == 1)); then fmt_count "$2"; else fmt_us "$2"; fi
}
plural() { if (($1 == 1)); then echo "1 $2"; else echo "$1 $2s"; fi; }

# --- runs -----------------------------------------------------------------------------------
side_dir() { if [[ $1 == before ]]; then echo "$BEFORE"; else echo "$AFTER"; fi; }
side_label() { if [[ $1 == before ]]; then echo "$BEFORE_LABEL"; else echo "$AFTER_LABEL"; fi; }

run_one() { # I SIDE S: one compare.sh call; leaves RAW/round<i>/<side>-<s>{.md,.log,.rc,/}
    local i=$1 side=$2 s=$3 base t0
    base="$RAW/round$i/$side-$s"
    mkdir -p "$RAW/round$i"
    rm -rf "$base" "$base.md" "$base.log" "$base.rc"
    log "round $i, $s on $side (load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?'))"
    t0=$SECONDS
    bounded_run "$base" "$CALL_TIMEOUT" env BENCH="$(side_dir "$side")/lanpush-bench" \
        TARGETS=lanpush NO_INSTALL=1 SCENARIOS="$s" OUT="$base.md" DURATION="$DURATION" \
        WARMUP="$WARMUP" SIZE="$SIZE" BENCH_ARGS="$BENCH_ARGS" RUN_TIMEOUT="$RUN_TIMEOUT" \
        MAX_TOTAL="$((deadline - SECONDS > 1 ? deadline - SECONDS : 1))" "$COMPARE"
    if ((RUN_RC == 124 || RUN_RC == 137)); then
        log "round $i, $s on $side: compare.sh killed after $CALL_TIMEOUT s"
    elif ((RUN_RC != 0)); then
        log "round $i, $s on $side: compare.sh exit status $RUN_RC (log: $base.log)"
    fi
    log "round $i, $s on $side: $((SECONDS - t0)) s"
}

# Reads one run's result. Sets ROW (the JQ_ROW fields, tab-separated) and returns 0 for a good
# run; otherwise sets WHY and returns 1.
ROW="" WHY=""
read_run() { # I SIDE S
    local base="$RAW/round$1/$2-$3" rc run_rc received
    ROW="" WHY=""
    rc=$(cat "$base.rc" 2>/dev/null || echo '?')
    case $rc in
    0) ;;
    125) WHY="skipped (MAX_TOTAL reached)"; return 1 ;;
    124 | 137) WHY="compare.sh timed out after $CALL_TIMEOUT s"; return 1 ;;
    *) WHY="compare.sh exit status $rc"; return 1 ;;
    esac
    run_rc=$(cat "$base/$3.lanpush.rc" 2>/dev/null || echo '?')
    case $run_rc in
    0) ;;
    125) WHY="skipped (MAX_TOTAL reached)"; return 1 ;;
    124 | 137) WHY="timed out after $RUN_TIMEOUT s"; return 1 ;;
    *) WHY="exit status $run_rc"; return 1 ;;
    esac
    if [[ ! -s $base/$3.lanpush.json ]]; then WHY="no result file"; return 1; fi
    ROW=$(jq -r "$JQ_ROW" "$base/$3.lanpush.json" 2>/dev/null) || { WHY="unreadable result"; return 1; }
    received=$(cut -f5 <<<"$ROW")
    if awk -v r="$received" 'BEGIN { exit !(r <= 0) }'; then
        WHY="no measured deliveries"
        return 1
    fi
}

# Column N (1-based, of JQ_ROW) over the good runs of SIDE in scenario S, one number a line.
values() { # SIDE S N
    local i
    for ((i = 1; i <= ROUNDS; i++)); do
        if read_run "$i" "$1" "$2"; then cut -f"$3" <<<"$ROW"; fi
    done
}

# --- the report -----------------------------------------------------------------------------
summary_cell() { # VALUES N: "median (min–max)"
    if [[ -z $1 ]]; then echo "—"; return; fi
    echo "$(fmt_value "$2" "$(median <<<"$1")") ($(fmt_value "$2" "$(minimum <<<"$1")")–$(fmt_value "$2" "$(maximum <<<"$1")"))"
}

# One row of the summary: scenario S, column N, figure name, whether higher is better. Counts
# the verdicts in N_WORSE and N_UNDECIDED.
N_WORSE=0 N_UNDECIDED=0
summary_row() { # S LABEL N NAME HIGHER_IS_BETTER
    local s=$1 label=$2 n=$3 name=$4 higher=$5 vb va nb na mb ma ratio band lo hi verdict
    vb=$(values before "$s" "$n")
    va=$(values after "$s" "$n")
    nb=$(grep -c . <<<"$vb" || true)
    na=$(grep -c . <<<"$va" || true)
    ratio="—" verdict=""
    if [[ -n $vb && -n $va ]]; then
        mb=$(median <<<"$vb")
        ma=$(median <<<"$va")
        if awk -v b="$mb" 'BEGIN { exit !(b > 0) }'; then
            ratio=$(awk -v a="$ma" -v b="$mb" 'BEGIN { printf "%.3f", a / b }')
        fi
    fi
    if [[ $ratio == "—" ]]; then
        verdict="not determined: no good run on a side"
    elif ((nb < 2 || na < 2)); then
        verdict="not determined: fewer than 2 good runs on a side"
    else
        band=$(awk -v mb="$mb" -v ma="$ma" \
            -v b0="$(minimum <<<"$vb")" -v b1="$(maximum <<<"$vb")" \
            -v a0="$(minimum <<<"$va")" -v a1="$(maximum <<<"$va")" 'BEGIN {
            lo = b0 / mb; hi = b1 / mb
            if (ma > 0 && a0 / ma < lo) lo = a0 / ma
            if (ma > 0 && a1 / ma > hi) hi = a1 / ma
            printf "%.6f %.6f\n", lo, hi }')
        read -r lo hi <<<"$band"
        if awk -v a="$ma" -v b="$mb" -v lo="$lo" -v hi="$hi" 'BEGIN { r = a / b; exit !(r >= lo && r <= hi) }'; then
            verdict="yes"
        elif awk -v a="$ma" -v b="$mb" -v hi="$hi" -v up="$higher" 'BEGIN { exit !((a / b > hi) == up) }'; then
            verdict="no, better"
        else
            verdict="**no, worse**"
        fi
        verdict+=" ($(awk -v lo="$lo" -v hi="$hi" 'BEGIN { printf "band %.3f–%.3f", lo, hi }'))"
    fi
    case $verdict in
    "**no, worse**"*) N_WORSE=$((N_WORSE + 1)) ;;
    "not determined"*) N_UNDECIDED=$((N_UNDECIDED + 1)) ;;
    esac
    echo "| $label | $name | $(summary_cell "$vb" "$n") | $(summary_cell "$va" "$n") | $ratio | $verdict |"
}

runs_row() { # S LABEL N NAME: every run's figure, in round order
    local s=$1 label=$2 n=$3 name=$4 side i cells row
    row="| $label | $name |"
    for side in $SIDES; do
        cells=()
        for ((i = 1; i <= ROUNDS; i++)); do
            if read_run "$i" "$side" "$s"; then
                cells+=("$(fmt_value "$n" "$(cut -f"$n" <<<"$ROW")")")
            else
                cells+=("—")
            fi
        done
        row+=" $(IFS=';'; printf '%s' "${cells[*]}") |"
        row=${row//;/, }
    done
    echo "$row"
}

# Lines for the notes: failed runs, losses and errors in good runs.
run_notes() {
    local s i side base received expected lost errors
    for s in $SCENARIOS; do
        for ((i = 1; i <= ROUNDS; i++)); do
            for side in $SIDES; do
                base="round$i/$side-$s"
                if read_run "$i" "$side" "$s"; then
                    IFS=$'\t' read -r _ _ _ _ received expected lost errors <<<"$ROW"
                    if awk -v l="$lost" 'BEGIN { exit !(l > 0) }'; then
                        echo "- $s, round $i, $side: lost $(fmt_count "$lost") of $(fmt_count "$expected") ($(awk -v l="$lost" -v e="$expected" 'BEGIN { printf "%.2g%%", (e > 0 ? 100 * l / e : 100) }'))."
                    fi
                    if ((errors > 0)); then echo "- $s, round $i, $side: $errors errors (see $base/$s.lanpush.json)."; fi
                elif [[ -e $RAW/$base/$s.lanpush.log ]]; then
                    echo "- $s, round $i, $side: $WHY (log: $base/$s.lanpush.log)."
                elif [[ -e $RAW/$base.log ]]; then
                    echo "- $s, round $i, $side: $WHY (log: $base.log)."
                else
                    echo "- $s, round $i, $side: $WHY."
                fi
            done
        done
    done
}

binary_id() { # DIR: short sha256 and mtime of both binaries
    local b out=""
    for b in lanpush lanpush-bench; do
        out+="\`$b\` $(sha256sum "$1/$b" | cut -c1-12) ($(date -u -r "$1/$b" '+%Y-%m-%d %H:%M UTC')), "
    done
    echo "${out%, }"
}

write_report() {
    local cpu s kind label load_end same=""
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
    load_end=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
    if cmp -s "$BEFORE/lanpush" "$AFTER/lanpush" && cmp -s "$BEFORE/lanpush-bench" "$AFTER/lanpush-bench"; then
        same=1
    fi
    N_WORSE=0 N_UNDECIDED=0
    {
        echo "# A/B: $BEFORE_LABEL vs. $AFTER_LABEL, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "**Machine:** $(nproc) cores${cpu:+, $cpu}, Linux $(uname -r); load average $LOAD_START before the series, $load_end after (1 / 5 / 15 min); 1-min load at the start of each round: ${ROUND_LOADS% }."
        echo
        echo "**Date:** $START_UTC – $(date -u '+%H:%M:%S') UTC ($((SECONDS - START_SECONDS)) s)."
        echo
        echo "**Before** ($BEFORE_LABEL): \`${BEFORE/#"$ROOT/"/}\`: $(binary_id "$BEFORE")."
        echo
        echo "**After** ($AFTER_LABEL): \`${AFTER/#"$ROOT/"/}\`: $(binary_id "$AFTER")."
        if [[ -n $same ]]; then
            echo
            echo "Both sides are the same binaries: an A/A run, which measures the noise alone."
        fi
        echo
        echo "**Runs:** $(plural "$ROUNDS" round); in each, every scenario runs on before, then on after: \`bench/compare.sh\` with \`TARGETS=lanpush SCENARIOS=<one> DURATION=$DURATION WARMUP=$WARMUP SIZE=$SIZE${BENCH_ARGS:+ BENCH_ARGS=\"$BENCH_ARGS\"}\` and \`BENCH\` = the side's lanpush-bench, which starts its own engine on 127.0.0.1. Throughput rows: delivered msg/s, all subscribers together (higher is better). Latency rows: µs from the intended send time (lower is better)."
        echo
        echo "**Rule:** within the noise when the after/before ratio of the medians lies in the band [lo, hi], the union of the two sides' [min/median, max/median]; outside it, better or worse by the figure's direction. A verdict needs 2 good runs per side."
        echo
        echo "| scenario | figure | $BEFORE_LABEL: median (min–max) | $AFTER_LABEL: median (min–max) | after / before | within noise? |"
        echo "| --- | --- | ---: | ---: | ---: | --- |"
        for s in $SCENARIOS; do
            IFS='|' read -r kind label <<<"$(compare_kind_label "$s")"
            if [[ $kind == thr ]]; then
                summary_row "$s" "$label" 1 "msg/s" 1
            else
                summary_row "$s" "$label" 2 "p50 µs" 0
                summary_row "$s" "$label" 3 "p99 µs" 0
                summary_row "$s" "$label" 4 "p99.9 µs" 0
            fi
        done
        echo
        if ((N_WORSE > 0)); then
            echo "**Every row within the noise or better: no** ($(plural "$N_WORSE" row) worse)."
        elif ((N_UNDECIDED > 0)); then
            echo "**Every row within the noise or better: not determined** ($(plural "$N_UNDECIDED" row) without a verdict)."
        else
            echo "**Every row within the noise or better: yes.**"
        fi
        echo
        echo "## Every run"
        echo
        echo "Good runs only (— = failed or skipped, see the notes), in round order."
        echo
        echo "| scenario | figure | $BEFORE_LABEL | $AFTER_LABEL |"
        echo "| --- | --- | ---: | ---: |"
        for s in $SCENARIOS; do
            IFS='|' read -r kind label <<<"$(compare_kind_label "$s")"
            if [[ $kind == thr ]]; then
                runs_row "$s" "$label" 1 "msg/s"
            else
                runs_row "$s" "$label" 2 "p50 µs"
                runs_row "$s" "$label" 3 "p99 µs"
                runs_row "$s" "$label" 4 "p99.9 µs"
            fi
        done
        echo
        echo "Notes"
        run_notes
        echo "- Raw results (compare.sh's table, output and --json per run): ${RAW/#"$ROOT/"/}/"
    } >"$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
}

# --- main -----------------------------------------------------------------------------------
case ${1:-} in
-h | --help) sed -n '2,/^$/ { /^#/ s/^# \{0,1\}//p }' "$0"; exit 0 ;;
"") ;;
*) die "no arguments; settings come from the environment (see bench/ab.sh --help)" ;;
esac
[[ -x $COMPARE ]] || die "no executable $COMPARE"
for v in ROUNDS SIZE RUN_TIMEOUT MAX_TOTAL; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
done
for v in DURATION WARMUP; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number of seconds, not '${!v}'"
done
((ROUNDS >= 1)) || die "ROUNDS must be at least 1"
for v in BEFORE AFTER; do
    [[ -n ${!v} ]] || die "$v must name a directory holding lanpush and lanpush-bench"
    [[ -x ${!v}/lanpush && -x ${!v}/lanpush-bench ]] || die "$v=${!v} lacks lanpush or lanpush-bench"
    printf -v "$v" '%s' "$(realpath "${!v}")"
done
ALL_SCENARIOS=$(compare_scenarios)
[[ -n $ALL_SCENARIOS ]] || die "could not read ALL_SCENARIOS from $COMPARE"
SCENARIOS=${SCENARIOS:-$ALL_SCENARIOS}
for s in $SCENARIOS; do
    [[ " $ALL_SCENARIOS " == *" $s "* ]] || die "unknown scenario $s (known: $ALL_SCENARIOS)"
    [[ -n $(compare_kind_label "$s") ]] || die "could not read scenario $s from $COMPARE"
done
command -v jq >/dev/null || die "jq is needed to read the results (apt-get install jq)"
command -v timeout >/dev/null || die "timeout (coreutils) is needed to bound the runs"
# compare.sh bounds the run by RUN_TIMEOUT and then needs up to 15 s to stop it (TERM, 5 s,
# KILL, --kill-after 10 s); the rest is its start-up and table.
CALL_TIMEOUT=$((RUN_TIMEOUT + 30))
mkdir -p "$RAW"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
START_UTC=$(date -u '+%Y-%m-%d %H:%M:%S')
START_SECONDS=$SECONDS
ROUND_LOADS=""
deadline=$((SECONDS + MAX_TOTAL))
for ((i = 1; i <= ROUNDS; i++)); do
    ROUND_LOADS+="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo '?') "
    for s in $SCENARIOS; do
        for side in $SIDES; do
            if ((SECONDS >= deadline)); then
                log "MAX_TOTAL=$MAX_TOTAL s reached: skipping round $i, $s on $side"
                mkdir -p "$RAW/round$i"
                echo 125 >"$RAW/round$i/$side-$s.rc"
                continue
            fi
            run_one "$i" "$side" "$s"
        done
    done
done

write_report
cat "$OUT"
log "report: $OUT"
incomplete=0
for s in $SCENARIOS; do
    for side in $SIDES; do
        if [[ -z $(values "$side" "$s" 1) ]]; then
            log "no good run of $s on $side ($(side_label "$side"))"
            incomplete=1
        fi
    done
done
if ((incomplete)); then exit 1; fi
