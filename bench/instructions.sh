#!/usr/bin/env bash
# bench/instructions.sh: the proxy's own instructions per update and per read, counted by
# valgrind's callgrind: the same figure on every run of the same binary, whatever else the
# machine is doing, so a change to the update or read path shows even where the throughput
# and CPU time of bench/run.sh drift more than the change moves them.
#
# Usage (from the repository root or anywhere in a clone):
#   bench/instructions.sh                        # build, measure, print a markdown table
#   bench/instructions.sh --no-build --updates 500 --reads 2000
#   REGROUP_BIN=/tmp/old/regroup bench/instructions.sh --no-build   # another binary
#
# Options:
#   --updates N   serialized `POST /transfers` per run (default 500)
#   --reads N     `GET /health` per run, one keep-alive connection (default 2000)
#   --no-build    use the binaries already in target/release (or REGROUP_BIN and
#                 REGROUP_BANK)
#   --keep        keep the temporary directory (configs, logs, callgrind outputs)
#
# What it does:
#   1. `cargo build --release --bin regroup --example bank` (not with --no-build); installs
#      valgrind and nginx-light from Debian's packages when missing.
#   2. Four runs, each of a fresh example bank on its own SQLite file (accounts 1 and 2
#      opened on it directly) and a fresh `regroup serve` in front of it under `valgrind
#      --tool=callgrind` (its own SQLite journal, `journal_sync = "full"`; heartbeat
#      time-out 5 s, as the proxy runs ~50x slower under valgrind): no requests, N updates,
#      no requests again, N reads. Each run ends with SIGTERM, when callgrind writes the
#      proxy's total instructions.
#   3. The same for nginx in front of a bank (the keep-alive upstream of bench/run.sh, one
#      process: `master_process off`, one worker), idle and with N reads.
#   4. Per update = (run with N updates - the idle run before it) / N; per read likewise,
#      for regroup and for nginx. The idle run holds everything but the requests: start,
#      seeding, heartbeats, shutdown.
#
# Counts the user-space instructions of the proxy's process (regroup's, nginx's) only, not
# the kernel's work for it (socket and disk syscalls, fsync), which bench/run.sh's "proxy
# CPU / req" includes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="bench/instructions.sh"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
log() { echo "[instructions] $*" >&2; }

UPDATES=500
READS=2000
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --updates) UPDATES="$2"; shift ;;
        --reads) READS="$2"; shift ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "$SCRIPT: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for n in "$UPDATES" "$READS"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "$SCRIPT: --updates and --reads take a positive count, not $n" >&2; exit 2; }
done

command -v valgrind >/dev/null || apt_install valgrind
find_nginx
command -v python3 >/dev/null || apt_install python3
command -v curl >/dev/null || apt_install curl
build_release "$BUILD"
bench_tmp instructions

# One run of the proxy under callgrind in front of a bank of its own (accounts 1 and 2
# opened on the bank directly): $1 names it, $2 is the load (none, updates, reads); prints
# the proxy's total instructions.
run() {
    local name="$1" load="$2" config url pid
    start_bank "$name"
    python3 "$ROOT/bench/catchup.py" seed "$BANK_URL" 2 >&2
    config="$TMP/regroup-$name.toml"
    write_config "$config" "journal = \"sqlite://$TMP/journal-$name.db\"
journal_sync = \"full\"" "heartbeat_timeout_ms = 5000" "$name=$BANK_URL"
    RG_WRAP=(valgrind --tool=callgrind --callgrind-out-file="$TMP/callgrind-$name.out")
    REGROUP_LOG=warn start_regroup "$name" "$config"
    pid="$RG_PID"
    url="$RG_URL"
    # The first update waits until heartbeats found the partition up.
    for _ in $(seq 300); do
        curl -fs -o /dev/null --max-time 10 "$url/health" && break
        sleep 0.1
    done
    case "$load" in
        updates) python3 "$ROOT/bench/catchup.py" push "$url" "$UPDATES" >&2 ;;
        reads) python3 "$ROOT/bench/catchup.py" reads "$url" "$READS" >&2 ;;
    esac
    stop_counted TERM "$pid" "$name"
}

# Stops process $2, run under callgrind as run $3, with signal $1, and the bank of the run;
# prints the total instructions callgrind wrote at the exit.
stop_counted() {
    local signal="$1" pid="$2" name="$3" total
    kill -"$signal" "$pid"
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    forget_pid "$pid"
    kill -TERM "$BANK_PID" 2>/dev/null || true
    total="$(sed -n -E 's/^(summary|totals): ([0-9]+).*/\2/p' "$TMP/callgrind-$name.out" | head -1)"
    [[ -n "$total" ]] || { echo "$SCRIPT: callgrind wrote no total for run $name" >&2; exit 1; }
    echo "$total"
}

# nginx as the reference hop, as in bench/run.sh (keep-alive upstream, access log off), in
# one process (`master_process off`, one worker) under callgrind in front of a bank of its
# own: $1 names the run, $2 the number of reads; prints its total instructions.
run_nginx() {
    local name="$1" reads="$2" dir="$TMP/nginx-$1" port pid
    start_bank "$name"
    read -r port <<<"$(free_ports 1)"
    mkdir -p "$dir"
    nginx_config "$dir" "master_process off;
worker_processes 1;" "$port=${BANK_URL#http://}" >"$dir/nginx.conf"
    valgrind --tool=callgrind --callgrind-out-file="$TMP/callgrind-$name.out" \
        "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/out" 2>&1 </dev/null &
    pid="$!"
    disown "$pid"
    PIDS+=("$pid")
    for _ in $(seq 300); do
        curl -fs -o /dev/null --max-time 10 "http://127.0.0.1:$port/health" && break
        kill -0 "$pid" 2>/dev/null || { echo "$SCRIPT: nginx exited: $(cat "$dir/out" "$dir/error.log")" >&2; exit 1; }
        sleep 0.1
    done
    if [[ "$reads" -gt 0 ]]; then
        python3 "$ROOT/bench/catchup.py" reads "http://127.0.0.1:$port" "$reads" >&2
    fi
    # SIGQUIT: nginx's graceful stop.
    stop_counted QUIT "$pid" "$name"
}

idle_u="$(run idle-updates none)"
with_u="$(run updates updates)"
idle_r="$(run idle-reads none)"
with_r="$(run reads reads)"
idle_n="$(run_nginx nginx-idle 0)"
with_n="$(run_nginx nginx-reads "$READS")"

python3 - "$UPDATES" "$idle_u" "$with_u" "$READS" "$idle_r" "$with_r" "$idle_n" "$with_n" \
    "$(commit_id)" "$BIN" "$("$NGINX" -v 2>&1 | sed 's/.*: //')" <<'EOF'
import sys
nu, iu, wu, nr, ir, wr, inn, wn, commit, binary, nginx = sys.argv[1:]
nu, iu, wu, nr, ir, wr, inn, wn = map(int, (nu, iu, wu, nr, ir, wr, inn, wn))
per_read, per_nginx = (wr - ir) / nr, (wn - inn) / nr
print(f"commit {commit}; binary {binary}; {nginx}; `bench/instructions.sh --updates {nu} --reads {nr}`")
print()
print("| request | count | instructions (run) | instructions (idle run) | per request |")
print("| --- | ---: | ---: | ---: | ---: |")
print(f"| POST /transfers, serialized | {nu} | {wu:,} | {iu:,} | {(wu - iu) / nu:,.0f} |")
print(f"| GET /health, one keep-alive connection | {nr} | {wr:,} | {ir:,} | {per_read:,.0f} |")
print(f"| GET /health through nginx (one worker) | {nr} | {wn:,} | {inn:,} | {per_nginx:,.0f} |")
print()
print(f"Reads: regroup / nginx instructions per request {per_read / per_nginx:.2f}x.")
EOF
