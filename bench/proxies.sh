#!/usr/bin/env bash
# bench/proxies.sh: updates through the proxy with the journal on SQLite, on one NATS server
# and on a 3-node NATS cluster, and the leader failover time of two proxies on each.
#
# Usage (from the repository root or anywhere in a clone):
#   bench/proxies.sh                  # measure, print a markdown report
#   bench/proxies.sh --write          # ... and put it in BENCHMARKS.md between the proxies
#                                     #     markers
#   bench/proxies.sh --rounds 2 --duration 3 --trials 3 --keep
#
# Options:
#   --write         replace the section between `<!-- proxies:begin -->` and
#                   `<!-- proxies:end -->` in BENCHMARKS.md with the report
#   --rounds N      interleaved rounds (default 3; env PROXIES_ROUNDS)
#   --duration S    seconds per wrk run (default 5; env PROXIES_DURATION)
#   --trials N      leader kills per journal (default 5; env PROXIES_TRIALS)
#   --lease-ms MS   the proxies' `journal_lease_ms` (default 1000)
#   --keep          keep the temporary directory (configs, logs, raw wrk output)
#   --no-build      use the binaries already in target/release (or REGROUP_BIN and
#                   REGROUP_BANK: a regroup binary and an example bank binary)
#
# What it does:
#   1. `cargo build --release --bin regroup --example bank` (not with --no-build); installs wrk, python3, curl and
#      nats-server from Debian's packages when missing.
#   2. In a `mktemp -d` directory: starts a 3-node NATS JetStream cluster on free loopback
#      ports with its own store directories, and three setups, one per journal:
#        sqlite    `sqlite://` file in the directory (default durable settings)
#        nats-1    the NATS server on 127.0.0.1:4222, a fresh stream prefix (deleted after)
#        nats-3    the 3-node cluster (streams at 3 replicas), a fresh stream prefix
#      each with three bank partitions a, b, c of its own (the example `bank`, SQLite) and
#      two `regroup serve` with the same config (`proxies = "several"`, the lease above,
#      heartbeats 100 ms / 100 ms / 3); seeds accounts 1 and 2 through the leader.
#   3. Updates: in interleaved rounds (each round runs every journal once, in an order
#      rotated by one each round), `POST /transfers {"from":1,"to":2,"amount":1}` through
#      the leading proxy with wrk for --duration seconds, serialized (`wrk -t1 -c1`) and
#      16 clients (`wrk -t2 -c16`); after every run it waits until the group has replayed
#      everything, so replays of one run do not eat into the next.
#   4. Failover: per journal, --trials times: SIGKILLs the leading proxy and sends one
#      transfer at a time through the other (bench/failover.py trial: client time-out 6 s)
#      until one answers 201; failover time = that answer's time minus the kill's. The
#      killed proxy is restarted (it follows) and the group settles before the next trial.
#   5. Prints a markdown report (bench/proxies.py): medians over the rounds, ratios of each
#      NATS journal to SQLite, failover median / max / min per journal.
# A trap kills every process the script started, deletes the NATS prefixes on the local
# server and removes the temporary directory.
set -euo pipefail

ROUNDS="${PROXIES_ROUNDS:-3}"
DURATION="${PROXIES_DURATION:-5}"
TRIALS="${PROXIES_TRIALS:-5}"
LEASE_MS=1000
WRITE=0
KEEP=0
BUILD=1
ARGS=("$@")
while [[ $# -gt 0 ]]; do
    case "$1" in
        --write) WRITE=1 ;;
        --keep) KEEP=1 ;;
        --no-build) BUILD=0 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --duration) DURATION="$2"; shift ;;
        --trials) TRIALS="$2"; shift ;;
        --lease-ms) LEASE_MS="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/proxies.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for v in "$ROUNDS" "$DURATION" "$TRIALS" "$LEASE_MS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "bench/proxies.sh: $v is not a positive integer" >&2; exit 2; }
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "proxies: $*" >&2; }
SCRIPT="bench/proxies.sh"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
HELPER="$ROOT/bench/proxies.py"
FAILOVER="$ROOT/bench/failover.py"

# --- 1. build and tools --------------------------------------------------------------------
build_release "$BUILD"
command -v wrk >/dev/null || apt_install wrk
command -v python3 >/dev/null || apt_install python3
command -v curl >/dev/null || apt_install curl
NATS_SERVER="$(command -v nats-server || true)"
[[ -z "$NATS_SERVER" && -x /usr/sbin/nats-server ]] && NATS_SERVER=/usr/sbin/nats-server
if [[ -z "$NATS_SERVER" ]]; then
    apt_install nats-server
    NATS_SERVER=/usr/sbin/nats-server
fi

# --- 2. processes --------------------------------------------------------------------------
bench_tmp proxies
PREFIXES=()        # NATS prefixes on the local server, deleted by the clean-up
cleanup_extra() {
    local prefix
    for prefix in "${PREFIXES[@]}"; do
        python3 "$HELPER" delete-prefix 127.0.0.1:4222 "$prefix" || true
    done
}

# The 3-node cluster, on six distinct free ports (bound together, then released).
read -r -a PORTS <<<"$(free_ports 6)"
declare -a CPORT RPORT
for i in 0 1 2; do CPORT[i]="${PORTS[2 * i]}"; RPORT[i]="${PORTS[2 * i + 1]}"; done
ROUTES="nats://127.0.0.1:${RPORT[0]},nats://127.0.0.1:${RPORT[1]},nats://127.0.0.1:${RPORT[2]}"
for i in 0 1 2; do
    mkdir -p "$TMP/nats-$i"
    "$NATS_SERVER" -js -a 127.0.0.1 -p "${CPORT[$i]}" -n "n$i" --cluster_name regroup-bench \
        --cluster "nats://127.0.0.1:${RPORT[$i]}" --routes "$ROUTES" -sd "$TMP/nats-$i" \
        >"$TMP/nats-$i.log" 2>&1 </dev/null &
    PIDS+=("$!")
    disown "$!"
done
CLUSTER="nats://127.0.0.1:${CPORT[0]},127.0.0.1:${CPORT[1]},127.0.0.1:${CPORT[2]}"
for _ in $(seq 600); do
    grep -q "JetStream cluster new metadata leader" "$TMP"/nats-*.log 2>/dev/null && break
    sleep 0.05
done
grep -q "JetStream cluster new metadata leader" "$TMP"/nats-*.log ||
    { echo "$SCRIPT: the NATS cluster elected no leader within 30 s" >&2; cat "$TMP"/nats-*.log >&2; exit 1; }
log "NATS cluster on $CLUSTER"

JOURNALS=(sqlite nats-1 nats-3)
declare -A JOURNAL_URL
JOURNAL_URL[sqlite]="sqlite://$TMP/sqlite-journal.db"
P1="BENCH$(python3 -c 'import secrets; print(secrets.token_hex(6).upper())')"
P3="BENCH$(python3 -c 'import secrets; print(secrets.token_hex(6).upper())')"
PREFIXES+=("$P1")
JOURNAL_URL[nats-1]="nats://127.0.0.1:4222?prefix=$P1"
JOURNAL_URL[nats-3]="$CLUSTER?prefix=$P3"

declare -A PROXY_PID PROXY_URL PROXY_ADMIN   # key: journal/slot (slot 0 or 1)
# Starts proxy slot $2 of journal $1 (again, on new ports, after a kill); retried while the
# journal is not ready yet (a new cluster may still be electing its stream leaders).
start_proxy() {
    local j="$1" slot="$2"
    for _ in $(seq 10); do
        if REGROUP_LOG=info start_regroup "$j-$slot" "$TMP/$j.toml" 2>/dev/null; then
            PROXY_PID[$j/$slot]="$RG_PID"
            PROXY_URL[$j/$slot]="$RG_URL"
            PROXY_ADMIN[$j/$slot]="$RG_ADMIN"
            return 0
        fi
        kill -KILL "$RG_PID" 2>/dev/null || true
        forget_pid "$RG_PID"
        sleep 1
    done
    echo "$SCRIPT: the proxy on journal $j did not start; its log:" >&2
    tail -30 "$TMP/regroup-$j-$slot.out.err" >&2
    exit 1
}

# Sets LEADER and FOLLOWER (slots) of journal $1, waiting (30 s) until one leads.
find_leader() {
    local j="$1"
    LEADER="$(python3 "$HELPER" leader "${PROXY_ADMIN[$j/0]}" "${PROXY_ADMIN[$j/1]}")"
    FOLLOWER=$((1 - LEADER))
}

for j in "${JOURNALS[@]}"; do
    declare -A URLS=()
    for name in a b c; do
        start_bank "$j-$name"
        URLS[$name]="$BANK_URL"
    done
    write_config "$TMP/$j.toml" "journal = \"${JOURNAL_URL[$j]}\"
proxies = \"several\"
journal_lease_ms = $LEASE_MS" "heartbeat_interval_ms = 100
heartbeat_timeout_ms = 100
heartbeat_retries = 3" a="${URLS[a]}" b="${URLS[b]}" c="${URLS[c]}"
    start_proxy "$j" 0
    python3 "$HELPER" leader "${PROXY_ADMIN[$j/0]}" >/dev/null
    start_proxy "$j" 1
    find_leader "$j"
    leader_url="${PROXY_URL[$j/$LEADER]}"
    python3 "$FAILOVER" settle "${PROXY_ADMIN[$j/$LEADER]}" >/dev/null
    for i in 1 2; do
        id="$(curl -fsS --max-time 10 -X POST "$leader_url/accounts" -H 'content-type: application/json' \
            -d "{\"name\":\"bench-$i\",\"balance\":1000000000}" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
        [[ "$id" == "$i" ]] || { echo "$SCRIPT: $j: account bench-$i got id $id" >&2; exit 1; }
    done
    curl -fsS --max-time 10 -o /dev/null -X POST "$leader_url/transfers" \
        -H 'content-type: application/json' -d '{"from":1,"to":2,"amount":1}'
    log "$j: banks ${URLS[a]} ${URLS[b]} ${URLS[c]}, leader $leader_url"
    unset URLS
done

# --- 3. updates ----------------------------------------------------------------------------
cat >"$TMP/transfer.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"from":1,"to":2,"amount":1}'
wrk.headers["Content-Type"] = "application/json"
EOF
LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
log "$ROUNDS rounds x ${DURATION} s x (serialized, 16 clients) x ${#JOURNALS[@]} journals (load average before: $LOADAVG)"
RESULTS="$TMP/results.tsv"
: >"$RESULTS"
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < ${#JOURNALS[@]}; k++)); do
        j="${JOURNALS[$(((k + r) % ${#JOURNALS[@]}))]}"
        find_leader "$j"
        url="${PROXY_URL[$j/$LEADER]}"
        for mode in serial c16; do
            out="$TMP/wrk-$j-$mode-$r.txt"
            case "$mode" in
                serial) wrk -t1 -c1 -d"${DURATION}s" --latency -s "$TMP/transfer.lua" "$url/transfers" >"$out" ;;
                c16) wrk -t2 -c16 -d"${DURATION}s" --latency -s "$TMP/transfer.lua" "$url/transfers" >"$out" ;;
            esac
            printf '%s\t%s\t%s\t%s\n' "$j" "$mode" "$r" "$out" >>"$RESULTS"
            python3 "$FAILOVER" settle "${PROXY_ADMIN[$j/$LEADER]}" --timeout 120 >/dev/null
            log "round $((r + 1))/$ROUNDS $j $mode: $(grep -m1 '^Requests/sec' "$out")"
        done
    done
done

# --- 4. failover ---------------------------------------------------------------------------
TRIALS_OUT="$TMP/trials.tsv"
: >"$TRIALS_OUT"
for j in "${JOURNALS[@]}"; do
    for ((n = 1; n <= TRIALS; n++)); do
        find_leader "$j"
        python3 "$FAILOVER" settle "${PROXY_ADMIN[$j/$LEADER]}" --timeout 60 >/dev/null
        pid="${PROXY_PID[$j/$LEADER]}"
        if ! trial="$(python3 "$FAILOVER" trial --pid "$pid" --victim "proxy-$LEADER" \
            --proxy "${PROXY_URL[$j/$FOLLOWER]}" --max-time 6 --give-up 30)"; then
            echo "$SCRIPT: $j trial $n: no 201 through the other proxy: $trial" >&2
            exit 1
        fi
        printf '%s\t%s\n' "$j" "$trial" >>"$TRIALS_OUT"
        log "$j trial $n/$TRIALS: $(python3 -c 'import json,sys; print("%.0f ms" % json.loads(sys.argv[1])["total_ms"])' "$trial")"
        forget_pid "$pid"
        start_proxy "$j" "$LEADER"
    done
done

# --- 5. report -----------------------------------------------------------------------------
COMMAND="bench/proxies.sh"
[[ ${#ARGS[@]} -gt 0 ]] && COMMAND+=" ${ARGS[*]}"
REPORT="$TMP/report.md"
python3 "$HELPER" report "$RESULTS" "$TRIALS_OUT" \
    --rounds "$ROUNDS" --duration "$DURATION" --lease-ms "$LEASE_MS" \
    --command "$COMMAND" --loadavg "$LOADAVG" \
    --nats-version "$("$NATS_SERVER" --version 2>&1 | head -1)" \
    --wrk-version "$(wrk -v 2>&1 | head -1 | awk '{print $2}')" \
    --commit "$(commit_id)" \
    >"$REPORT"
cat "$REPORT"
if [[ $WRITE -eq 1 ]]; then
    python3 "$HELPER" splice "$ROOT/BENCHMARKS.md" "$REPORT"
    log "wrote the report into BENCHMARKS.md"
fi
