#!/usr/bin/env bash
# bench/failover.sh: failover time, from the primary's SIGKILL to the first successful
# update through the proxy.
#
# Usage (from the repository root or anywhere in a clone):
#   bench/failover.sh                 # measure, print a markdown report
#   bench/failover.sh --write         # ... and put it in BENCHMARKS.md between the failover
#                                     #     markers
#   bench/failover.sh --trials 20 --keep
#
# Options:
#   --write         replace the section between `<!-- failover:begin -->` and
#                   `<!-- failover:end -->` in BENCHMARKS.md with the report
#   --trials N      kills of the primary (default 12; env FAILOVER_TRIALS)
#   --keep          keep the temporary directory (config, logs, per-trial JSON)
#   --no-build      use the binaries already in target/release (or REGROUP_BIN and
#                   REGROUP_BANK: a regroup binary and an example bank binary)
#
# What it does:
#   1. `cargo build --release --bin regroup --example bank` (target/release/regroup and
#      target/release/examples/bank; not with --no-build); needs python3 and curl
#      (installed from Debian's packages when missing, like bench/run.sh).
#   2. In a `mktemp -d` directory: starts three bank partitions a, b, c (the example `bank`,
#      SQLite files, ports picked by the kernel) and the regroup proxy in front of them
#      (`regroup serve`, SQLite journal, `heartbeat_interval_ms = 100`,
#      `heartbeat_timeout_ms = 100`, `heartbeat_retries = 3`, the rest at defaults).
#   3. Seeds accounts 1 and 2 (balance 1_000_000_000) through regroup.
#   4. For each trial: waits (at most 60 s) until every partition is `available` and has
#      applied the journal's head (admin `GET /status`) and reads the primary from it;
#      then bench/failover.py SIGKILLs the primary's process, takes the time, and sends
#      `POST /transfers {"from":1,"to":2,"amount":1}` through the proxy, one at a time
#      (client time-out 6 s), until one answers 201. Failover time = the time of that 201
#      answer minus the kill time. Any other answer is recorded as a failed update (an
#      update should wait for the failover, never fail). The killed partition is then
#      restarted on the same port and database, and the next trial waits for it to be
#      `available` and caught up again.
#   5. Prints a markdown report (bench/failover.py report): every trial, median, max, min,
#      and from the proxy's log (RUST_LOG=info) its `failover: primary role moved ...
#      took_ms=N` lines, the time from the kill to the primary being marked `unavailable`,
#      and a count of every WARN/ERROR message.
# A trap kills every process the script started and removes the temporary directory.
set -euo pipefail

TRIALS="${FAILOVER_TRIALS:-12}"
WRITE=0
KEEP=0
BUILD=1
ARGS=("$@")
while [[ $# -gt 0 ]]; do
    case "$1" in
        --write) WRITE=1 ;;
        --keep) KEEP=1 ;;
        --no-build) BUILD=0 ;;
        --trials) TRIALS="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/failover.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$TRIALS" =~ ^[1-9][0-9]*$ ]] || { echo "bench/failover.sh: --trials needs a positive integer" >&2; exit 2; }

INTERVAL_MS=100
TIMEOUT_MS=100
RETRIES=3

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "failover: $*" >&2; }
SCRIPT="bench/failover.sh"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
HELPER="$ROOT/bench/failover.py"

# --- 1. build and tools --------------------------------------------------------------------
build_release "$BUILD"
command -v python3 >/dev/null || apt_install python3
command -v curl >/dev/null || apt_install curl

# --- 2. processes --------------------------------------------------------------------------
bench_tmp failover
for name in a b c; do
    start_bank "$name"
    BANK_URLS[$name]="$BANK_URL"
    BANK_PIDS[$name]="$BANK_PID"
    log "bank $name at $BANK_URL"
done

write_config "$TMP/regroup.toml" "journal = \"sqlite://$TMP/regroup-journal.db\"" \
    "heartbeat_interval_ms = $INTERVAL_MS
heartbeat_timeout_ms = $TIMEOUT_MS
heartbeat_retries = $RETRIES" a="${BANK_URLS[a]}" b="${BANK_URLS[b]}" c="${BANK_URLS[c]}"
REGROUP_LOG=info start_regroup three "$TMP/regroup.toml"
REGROUP="$RG_URL" ADMIN="$RG_ADMIN"
log "regroup at $REGROUP (admin $ADMIN)"

# --- 3. seed -------------------------------------------------------------------------------
python3 "$HELPER" settle "$ADMIN" >/dev/null
for i in 1 2; do
    id="$(curl -fsS --max-time 10 -X POST "$REGROUP/accounts" -H 'content-type: application/json' \
        -d "{\"name\":\"failover-$i\",\"balance\":1000000000}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
    [[ "$id" == "$i" ]] || { echo "bench/failover.sh: account failover-$i got id $id" >&2; exit 1; }
done
# One transfer before the first kill, so the first trial does not pay for a cold path.
curl -fsS --max-time 10 -o /dev/null -X POST "$REGROUP/transfers" -H 'content-type: application/json' \
    -d '{"from":1,"to":2,"amount":1}'
log "seeded accounts 1 and 2 through regroup"

# --- 4. trials -----------------------------------------------------------------------------
LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
log "$TRIALS trials (load average before: $LOADAVG)"
RESULTS="$TMP/trials.jsonl"
: >"$RESULTS"
for ((n = 1; n <= TRIALS; n++)); do
    if ! kill_primary_trial "$ADMIN" "$REGROUP" "$TMP/trial-$n.json"; then
        cat "$TMP/trial-$n.json" >>"$RESULTS"
        echo "bench/failover.sh: trial $n failed" >&2
        exit 1
    fi
    cat "$TMP/trial-$n.json" >>"$RESULTS"
    log "trial $n/$TRIALS: killed $VICTIM, first 201 after $(python3 "$HELPER" brief "$TMP/trial-$n.json")"
done
python3 "$HELPER" settle "$ADMIN" --timeout 60 >/dev/null

# --- 5. report -----------------------------------------------------------------------------
COMMAND="bench/failover.sh"
[[ ${#ARGS[@]} -gt 0 ]] && COMMAND+=" ${ARGS[*]}"
REPORT="$TMP/report.md"
python3 "$HELPER" report "$RESULTS" "$TMP/regroup-three.out.err" \
    --interval "$INTERVAL_MS" --timeout "$TIMEOUT_MS" --retries "$RETRIES" \
    --command "$COMMAND" --loadavg "$LOADAVG" --commit "$(commit_id)" >"$REPORT"
cat "$REPORT"
if [[ $WRITE -eq 1 ]]; then
    python3 "$HELPER" splice "$ROOT/BENCHMARKS.md" "$REPORT"
    log "wrote the report into BENCHMARKS.md"
fi
