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
#
# What it does:
#   1. `cargo build --release --bin regroup --example bank` (target/release/regroup and
#      target/release/examples/bank); needs python3 and curl
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
ARGS=("$@")
while [[ $# -gt 0 ]]; do
    case "$1" in
        --write) WRITE=1 ;;
        --keep) KEEP=1 ;;
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
log "cargo build --release --bin regroup --example bank"
cargo build --release --bin regroup --example bank >&2
BIN="$ROOT/target/release/regroup"
BANK="$ROOT/target/release/examples/bank"

command -v python3 >/dev/null || apt_install python3
command -v curl >/dev/null || apt_install curl

# --- 2. processes --------------------------------------------------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/regroup-failover.XXXXXX")"
declare -A PID    # partition name -> pid of its current process
REGROUP_PID=""
cleanup() {
    local pid alive
    for pid in "${PID[@]}" $REGROUP_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # The banks are disowned (see start_bank): poll instead of `wait`, at most 10 s.
    for _ in $(seq 100); do
        alive=0
        for pid in "${PID[@]}" $REGROUP_PID; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for pid in "${PID[@]}" $REGROUP_PID; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ $KEEP -eq 1 ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# Starts bank $1 on $TMP/bank-$1.db, listening on $2 (127.0.0.1:0 the first time, its old
# address on a restart); sets BANK_URL and PID[$1]. Its stderr is appended to, so the log
# of every incarnation is kept. Disowned, so that bash does not print "Killed" for it.
start_bank() {
    local name="$1" listen="$2" out="$TMP/bank-$1.out" line pid
    : >"$out"
    RUST_LOG=warn "$BANK" --listen "$listen" --db "sqlite://$TMP/bank-$name.db" \
        >"$out" 2>>"$out.err" </dev/null &
    pid="$!"
    disown "$pid"
    PID[$name]="$pid"
    line="$(wait_line "$out" '^bank listening on ' "$pid")"
    BANK_URL="${line#bank listening on }"
}

declare -A BANK
for name in a b c; do
    start_bank "$name" 127.0.0.1:0
    BANK[$name]="$BANK_URL"
    log "bank $name at $BANK_URL"
done

cat >"$TMP/regroup.toml" <<EOF
# Generated by bench/failover.sh.
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
journal = "sqlite://$TMP/regroup-journal.db"

[[groups]]
name = "bank"
health_path = "/health"
heartbeat_interval_ms = $INTERVAL_MS
heartbeat_timeout_ms = $TIMEOUT_MS
heartbeat_retries = $RETRIES

[[groups.partitions]]
name = "a"
url = "${BANK[a]}"

[[groups.partitions]]
name = "b"
url = "${BANK[b]}"

[[groups.partitions]]
name = "c"
url = "${BANK[c]}"
EOF
RUST_LOG=info "$BIN" serve --config "$TMP/regroup.toml" \
    >"$TMP/regroup.out" 2>"$TMP/regroup.out.err" </dev/null &
REGROUP_PID="$!"
line="$(wait_line "$TMP/regroup.out" '^regroup listening on ' "$REGROUP_PID")"
REGROUP="$(sed -E 's/^regroup listening on ([^ ]+) .*/\1/' <<<"$line")"
ADMIN="$(sed -E 's/.*\(admin ([^)]+)\).*/\1/' <<<"$line")"
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
    state="$(python3 "$HELPER" settle "$ADMIN" --timeout 60)"
    victim="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["primary"])' "$state")"
    pid="${PID[$victim]}"
    url="${BANK[$victim]}"
    if ! python3 "$HELPER" trial --pid "$pid" --victim "$victim" --proxy "$REGROUP" \
        --max-time 6 --give-up 30 >"$TMP/trial-$n.json"; then
        cat "$TMP/trial-$n.json" >>"$RESULTS"
        echo "bench/failover.sh: trial $n: no successful update after killing $victim" >&2
        exit 1
    fi
    cat "$TMP/trial-$n.json" >>"$RESULTS"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.01; done
    log "trial $n/$TRIALS: killed $victim, first 201 after $(python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); print("%.0f ms, %d request(s)" % (t["total_ms"], len(t["attempts"])))' "$TMP/trial-$n.json")"
    # Same port and database: the proxy's config names this URL.
    start_bank "$victim" "${url#http://}"
    [[ "$BANK_URL" == "$url" ]] || { echo "bench/failover.sh: $victim came back on $BANK_URL, not $url" >&2; exit 1; }
done
python3 "$HELPER" settle "$ADMIN" --timeout 60 >/dev/null

# --- 5. report -----------------------------------------------------------------------------
COMMAND="bench/failover.sh"
[[ ${#ARGS[@]} -gt 0 ]] && COMMAND+=" ${ARGS[*]}"
REPORT="$TMP/report.md"
python3 "$HELPER" report "$RESULTS" "$TMP/regroup.out.err" \
    --interval "$INTERVAL_MS" --timeout "$TIMEOUT_MS" --retries "$RETRIES" \
    --command "$COMMAND" --loadavg "$LOADAVG" \
    --commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty)')" \
    >"$REPORT"
cat "$REPORT"
if [[ $WRITE -eq 1 ]]; then
    python3 "$HELPER" splice "$ROOT/BENCHMARKS.md" "$REPORT"
    log "wrote the report into BENCHMARKS.md"
fi
