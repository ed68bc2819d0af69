#!/usr/bin/env bash
# bench/run.sh: regroup's throughput and latency against baselines measured in the same run.
#
# Usage (from the repository root or anywhere in a clone):
#   bench/run.sh                  # measure everything, print a markdown report
#   bench/run.sh --write          # ... and put it in BENCHMARKS.md between the bench markers
#   bench/run.sh --only reads     # one workload (about a minute): reads, updates, mixed,
#                                 # catchup or failover
#   bench/run.sh --rounds 3 --duration 3 --keep
#
# Options:
#   --write         replace the section between `<!-- bench:begin -->` and
#                   `<!-- bench:end -->` in BENCHMARKS.md with the report (full runs only)
#   --only LIST     comma-separated workloads or targets: `reads`, `updates`, `mixed`,
#                   `catchup` (with `update-direct`, its baseline), `failover`, or target
#                   names as listed below (e.g. `--only health-regroup,health-nginx`)
#   --rounds N      interleaved rounds (default 5; env BENCH_ROUNDS)
#   --duration S    seconds per wrk run (default 5; env BENCH_DURATION)
#   --catchup-records N  records a replica is behind in the catch-up workload (default
#                   10000; env BENCH_CATCHUP_RECORDS)
#   --kills N       SIGKILLs of the primary in the failover workload, spread over the
#                   rounds (default 3; env BENCH_KILLS)
#   --keep          keep the temporary directory (configs, logs, raw wrk output)
#   --no-build      measure the binaries already in target/release (no cargo build)
#   --set LINE      a top-level line for both regroup configs, e.g. `--set 'client_threads = 0'`
#   --group-set LINE  a line for the group of both regroup configs, e.g.
#                   `--group-set 'pipeline_window = 1'`
#                   (repeatable; shown in the report)
#   REGROUP_BIN     a regroup binary to measure instead of the one built (e.g. a copy of an
#                   earlier build, for a before/after comparison)
#   REGROUP_BANK    an example bank binary instead of target/release/examples/bank
#   REGROUP_LOG     the proxies' RUST_LOG (default info), e.g.
#                   info,regroup_proxy::update=debug for per-update timings
#   --journal-sync M  the proxies' `journal_sync`: `full` (default) or `append`; with
#                   --write, `append` goes between `<!-- bench-append:begin -->` and
#                   `<!-- bench-append:end -->`
#
# What it does:
#   1. `cargo build --release --bin regroup --example bank` (target/release/regroup and
#      target/release/examples/bank).
#   2. Installs nginx (nginx-light) and wrk from Debian's packages when missing (needs root
#      and apt-get), plus python3 for the report when missing.
#   3. In a `mktemp -d` directory: starts bank partitions a, b, c and "one" (the example
#      `bank`, SQLite files); regroup "three" (`regroup serve`, SQLite journal with its
#      default durable settings) in front of a, b, c; regroup "one" (its own journal) in
#      front of the one partition "one"; nginx (2 workers, keep-alive upstreams) on two
#      ports, one in front of a (the primary of three) and one in front of "one"; and a
#      standalone bank "solo" on its own SQLite file that is part of no group. Every port is
#      127.0.0.1:0 or a free port picked by the kernel.
#   4. Seeds accounts 1 and 2 (balance 1_000_000_000) through both regroups (so every
#      partition has them) and directly on solo.
#   5. Runs, in interleaved rounds (each round runs every selected target once, in an order
#      rotated by one each round), wrk for --duration seconds against:
#        reads:
#        read-regroup      GET /accounts/1 through regroup three      wrk -t1 -c16
#        read-nginx        GET /accounts/1 through nginx -> a         wrk -t1 -c16
#        read-direct       GET /accounts/1 on a                       wrk -t1 -c16
#        health-regroup    GET /health through regroup one            wrk -t2 -c32
#        health-nginx      GET /health through nginx -> one           wrk -t2 -c32
#        health-direct     GET /health on one                         wrk -t2 -c32
#        updates:
#        update-regroup    POST /transfers through regroup three      wrk -t1 -c1
#        update-regroup1   POST /transfers through regroup one        wrk -t1 -c1
#        update-direct     POST /transfers on solo                    wrk -t1 -c1
#        update16-regroup  POST /transfers through regroup three      wrk -t2 -c16
#        update16-regroup1 POST /transfers through regroup one        wrk -t2 -c16
#        update16-direct   POST /transfers on solo                    wrk -t2 -c16
#        mixed:
#        mixed-regroup     through regroup three, at once: POST /transfers wrk -t1 -c8
#                          and GET /accounts/1 wrk -t1 -c32
#        mixed-direct      the same two loads on solo
#        catchup:
#        catchup           SIGKILLs a replica of regroup three (b or c, never the primary;
#                          the other one each round), pushes --catchup-records transfers
#                          through regroup three (bench/catchup.py push: one at a time on a
#                          keep-alive connection, bounded by records/20 + 30 s), starts
#                          the replica again on its port and database, and times it from
#                          there until admin /status shows it applied the head (polled
#                          every 50 ms, at most 600 s; bench/catchup.py): records/s, and
#                          the ratio to update-direct of the same run (issue 11's floor:
#                          >= 1.5x)
#        failover:
#        failover          SIGKILLs the primary's bank of regroup three (heartbeats at
#                          their defaults) and sends one transfer at a time through regroup
#                          three until one answers 201 (bench/failover.py trial, as
#                          bench/failover.sh does); the bank is started again on its port
#                          and database. --kills such trials, spread over the rounds
#                          (round r takes kills r, r + rounds, ...); median, max and min
#      Around every run it reads the proxy's CPU time (utime + stime of regroup's process,
#      or of nginx's master and workers, from /proc/PID/stat) and afterwards its resident
#      set (VmRSS); CPU per request is that CPU time over the requests wrk counted. After
#      every run it waits until both groups have replayed everything (admin /status), so
#      replays of one run do not eat into the next.
#   6. Prints a markdown report: machine, date, medians over the rounds of req/s, p50, p99,
#      proxy CPU per request and RSS, the ratios, and whether each floor of BENCHMARKS.md
#      is met; the catch-up trials (per round and median) and the failover trials.
# A trap kills every process the script started and removes the temporary directory.
set -euo pipefail

ROUNDS="${BENCH_ROUNDS:-5}"
DURATION="${BENCH_DURATION:-5}"
WRITE=0
KEEP=0
SYNC=full
ONLY=""
SETS=()
GROUP_SETS=()
BUILD=1
CATCHUP_RECORDS="${BENCH_CATCHUP_RECORDS:-10000}"
KILLS="${BENCH_KILLS:-3}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --write) WRITE=1 ;;
        --journal-sync) SYNC="$2"; shift ;;
        --keep) KEEP=1 ;;
        --only) ONLY="$2"; shift ;;
        --set) SETS+=("$2"); shift ;;
        --group-set) GROUP_SETS+=("$2"); shift ;;
        --no-build) BUILD=0 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --duration) DURATION="$2"; shift ;;
        --catchup-records) CATCHUP_RECORDS="$2"; shift ;;
        --kills) KILLS="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for v in "$ROUNDS" "$DURATION" "$CATCHUP_RECORDS" "$KILLS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "bench/run.sh: $v is not a positive integer" >&2; exit 2; }
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "bench: $*" >&2; }
SCRIPT="bench/run.sh"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# --- 1. build ------------------------------------------------------------------------------
build_release "$BUILD"

# --- 2. tools ------------------------------------------------------------------------------
NGINX="$(command -v nginx || true)"
[[ -z "$NGINX" && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
if [[ -z "$NGINX" ]]; then
    apt_install nginx-light || apt_install nginx
    NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
fi
command -v wrk >/dev/null || apt_install wrk
command -v python3 >/dev/null || apt_install python3
command -v curl >/dev/null || apt_install curl

# --- 3. processes --------------------------------------------------------------------------
bench_tmp bench
for name in a b c one solo; do
    start_bank "$name"
    BANK_URLS[$name]="$BANK_URL"
    BANK_PIDS[$name]="$BANK_PID"
    log "bank $name at $BANK_URL"
done

# Writes regroup config $1 (journal $2) for a group over partitions $3...
regroup_config() {
    local file="$1" journal="$2" name parts=()
    shift 2
    for name in "$@"; do parts+=("$name=${BANK_URLS[$name]}"); done
    write_config "$file" "journal = \"sqlite://$journal\"
journal_sync = \"$SYNC\"
$(printf '%s\n' "${SETS[@]}")" "$(printf '%s\n' "${GROUP_SETS[@]}")" "${parts[@]}"
}

regroup_config "$TMP/regroup-three.toml" "$TMP/journal-three.db" a b c
start_regroup three "$TMP/regroup-three.toml"
log "regroup three at $RG_URL (admin $RG_ADMIN)"
REGROUP="$RG_URL" ADMIN="$RG_ADMIN" REGROUP_PID="$RG_PID"
regroup_config "$TMP/regroup-one.toml" "$TMP/journal-one.db" one
start_regroup one "$TMP/regroup-one.toml"
log "regroup one at $RG_URL (admin $RG_ADMIN)"
REGROUP1="$RG_URL" ADMIN1="$RG_ADMIN" REGROUP1_PID="$RG_PID"

read -r NGINX_PORT NGINX1_PORT <<<"$(free_ports 2)"
mkdir -p "$TMP/nginx"
NGINX_USER=""
[[ $EUID -eq 0 ]] && NGINX_USER="user root;"
cat >"$TMP/nginx/nginx.conf" <<CONF
# Generated by bench/run.sh: a plain keep-alive reverse proxy in front of bank a, and one
# in front of bank one.
$NGINX_USER
daemon off;
worker_processes 2;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    upstream bank {
        server ${BANK_URLS[a]#http://};
        keepalive 64;
    }
    upstream one {
        server ${BANK_URLS[one]#http://};
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://bank;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {
        listen 127.0.0.1:$NGINX1_PORT;
        location / {
            proxy_pass http://one;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
"$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" \
    >"$TMP/nginx/out" 2>&1 </dev/null &
NGINX_PID="$!"
disown "$NGINX_PID"
PIDS+=("$NGINX_PID")
NGINX_URL="http://127.0.0.1:$NGINX_PORT"
NGINX1_URL="http://127.0.0.1:$NGINX1_PORT"
for _ in $(seq 100); do
    curl -fs -o /dev/null "$NGINX_URL/health" && curl -fs -o /dev/null "$NGINX1_URL/health" && break
    sleep 0.1
done
if ! curl -fs -o /dev/null "$NGINX_URL/health" || ! curl -fs -o /dev/null "$NGINX1_URL/health"; then
    echo "bench/run.sh: nginx did not come up:" >&2
    cat "$TMP/nginx/out" "$TMP/nginx/error.log" >&2 || true
    exit 1
fi
log "nginx at $NGINX_URL -> a and $NGINX1_URL -> one"

# --- 4. seed -------------------------------------------------------------------------------
post() { # url path json -> prints body; fails on a non-2xx answer
    curl -fsS -X POST "$1$2" -H 'content-type: application/json' -d "$3"
}
for i in 1 2; do
    for base in "$REGROUP" "$REGROUP1" "${BANK_URLS[solo]}"; do
        id="$(post "$base" /accounts "{\"name\":\"bench-$i\",\"balance\":1000000000}" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
        [[ "$id" == "$i" ]] || { echo "bench/run.sh: account bench-$i got id $id on $base" >&2; exit 1; }
    done
done

# Waits until every partition of the group behind admin $1 has applied the journal's head
# and is available; prints the state.
settle_one() {
    local state=""
    for _ in $(seq 600); do
        state="$(curl -fsS "$1/status" | python3 -c '
import json, sys
g = json.load(sys.stdin)["groups"][0]
ok = not g["in_doubt"] and all(p["applied"] == g["head"] and p["status"] == "available" for p in g["partitions"])
print("ok" if ok else "wait", g["primary"], g["head"], " ".join("%s=%s/%s" % (p["name"], p["applied"], p["status"]) for p in g["partitions"]))
')"
        [[ "$state" == ok* ]] && { echo "$state"; return 0; }
        sleep 0.1
    done
    echo "bench/run.sh: the group behind $1 did not settle within 60 s: $state" >&2
    return 1
}
settle() {
    settle_one "$ADMIN1" >/dev/null
    settle_one "$ADMIN"
}
state="$(settle)"
[[ "$(cut -d' ' -f2 <<<"$state")" == a ]] || { echo "bench/run.sh: primary is not a: $state" >&2; exit 1; }
for name in a b c one; do
    curl -fs -o /dev/null "${BANK_URLS[$name]}/accounts/2" || { echo "bench/run.sh: partition $name lacks account 2" >&2; exit 1; }
done
log "seeded accounts 1 and 2 on a, b, c (through regroup three), one (through regroup one) and solo"

cat >"$TMP/transfer.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"from":1,"to":2,"amount":1}'
wrk.headers["Content-Type"] = "application/json"
LUA

# --- 5. measure ----------------------------------------------------------------------------
READS=(read-regroup read-nginx read-direct health-regroup health-nginx health-direct)
UPDATES=(update-regroup update-regroup1 update-direct update16-regroup update16-regroup1 update16-direct)
MIXED=(mixed-regroup mixed-direct)
CATCHUP=(update-direct catchup)   # update-direct: the rate the catch-up rate is held against
FAILOVER=(failover)
picked=()
if [[ -z "$ONLY" ]]; then
    picked=("${READS[@]}" "${UPDATES[@]}" "${MIXED[@]}" "${CATCHUP[@]}" "${FAILOVER[@]}")
else
    IFS=, read -ra picks <<<"$ONLY"
    for pick in "${picks[@]}"; do
        case "$pick" in
            reads) picked+=("${READS[@]}") ;;
            updates) picked+=("${UPDATES[@]}") ;;
            mixed) picked+=("${MIXED[@]}") ;;
            catchup) picked+=("${CATCHUP[@]}") ;;
            failover) picked+=("${FAILOVER[@]}") ;;
            *)
                [[ " ${READS[*]} ${UPDATES[*]} ${MIXED[*]} catchup " == *" $pick "* ]] ||
                    { echo "bench/run.sh: unknown workload or target $pick (see --help)" >&2; exit 2; }
                picked+=("$pick")
                ;;
        esac
    done
fi
TARGETS=()   # picked, each once
for t in "${picked[@]}"; do
    [[ " ${TARGETS[*]} " == *" $t "* ]] || TARGETS+=("$t")
done
if [[ $WRITE -eq 1 && -n "$ONLY" ]]; then
    echo "bench/run.sh: --write takes a full run (no --only)" >&2
    exit 2
fi

# The processes whose CPU time counts as target $1's proxy (none for a direct target).
proxy_pids() {
    case "$1" in
        read-regroup | update-regroup | update16-regroup | mixed-regroup) echo "$REGROUP_PID" ;;
        health-regroup | update-regroup1 | update16-regroup1) echo "$REGROUP1_PID" ;;
        *-nginx) echo "$NGINX_PID" "$(pgrep -P "$NGINX_PID" | tr '\n' ' ' || true)" ;;
        *) ;;
    esac
}
# utime + stime in clock ticks, summed over the processes $@ (fields 14 and 15 of
# /proc/PID/stat, counted after the command name in parentheses).
cpu_ticks() {
    local pid total=0 stat rest
    for pid in "$@"; do
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
        rest="${stat##*) }"
        read -ra f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
# VmRSS in kB, summed over the processes $@.
rss_kb() {
    local pid total=0 kb
    for pid in "$@"; do
        kb="$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

run_target() { # target seconds output-file; prints "cpu_ticks rss_kb" of the target's proxy
    local t="$1" secs="$2" out="$3" pids before after w
    read -ra pids <<<"$(proxy_pids "$t")"
    before="$(cpu_ticks "${pids[@]}")"
    w=(wrk -d"${secs}s" --latency)
    case "$t" in
        read-regroup) "${w[@]}" -t1 -c16 "$REGROUP/accounts/1" >"$out" ;;
        read-nginx) "${w[@]}" -t1 -c16 "$NGINX_URL/accounts/1" >"$out" ;;
        read-direct) "${w[@]}" -t1 -c16 "${BANK_URLS[a]}/accounts/1" >"$out" ;;
        health-regroup) "${w[@]}" -t2 -c32 "$REGROUP1/health" >"$out" ;;
        health-nginx) "${w[@]}" -t2 -c32 "$NGINX1_URL/health" >"$out" ;;
        health-direct) "${w[@]}" -t2 -c32 "${BANK_URLS[one]}/health" >"$out" ;;
        update-regroup) "${w[@]}" -t1 -c1 -s "$TMP/transfer.lua" "$REGROUP/transfers" >"$out" ;;
        update-regroup1) "${w[@]}" -t1 -c1 -s "$TMP/transfer.lua" "$REGROUP1/transfers" >"$out" ;;
        update-direct) "${w[@]}" -t1 -c1 -s "$TMP/transfer.lua" "${BANK_URLS[solo]}/transfers" >"$out" ;;
        update16-regroup) "${w[@]}" -t2 -c16 -s "$TMP/transfer.lua" "$REGROUP/transfers" >"$out" ;;
        update16-regroup1) "${w[@]}" -t2 -c16 -s "$TMP/transfer.lua" "$REGROUP1/transfers" >"$out" ;;
        update16-direct) "${w[@]}" -t2 -c16 -s "$TMP/transfer.lua" "${BANK_URLS[solo]}/transfers" >"$out" ;;
        mixed-regroup | mixed-direct)
            local base="$REGROUP"
            [[ "$t" == mixed-direct ]] && base="${BANK_URLS[solo]}"
            "${w[@]}" -t1 -c32 "$base/accounts/1" >"$out.reads" &
            local reads=$!
            "${w[@]}" -t1 -c8 -s "$TMP/transfer.lua" "$base/transfers" >"$out"
            wait "$reads"
            ;;
    esac
    after="$(cpu_ticks "${pids[@]}")"
    echo "$((after - before)) $(rss_kb "${pids[@]}")"
    settle >/dev/null
}

PUSH_SECS=$((CATCHUP_RECORDS / 20 + 30))
CATCHUP_OUT="$TMP/catchup.jsonl"
FAILOVER_OUT="$TMP/failover.tsv"
: >"$CATCHUP_OUT"
: >"$FAILOVER_OUT"

# The catch-up trial of round $1: SIGKILLs a replica of regroup three (never the primary;
# the replicas by turn), pushes CATCHUP_RECORDS transfers through regroup three, starts the
# replica again on its port and database and times its catch-up from there
# (bench/catchup.py watch); appends the JSON line to CATCHUP_OUT.
catchup_trial() {
    local r="$1" state head victim pid url watcher replicas=()
    state="$(python3 "$ROOT/bench/failover.py" settle "$ADMIN" --timeout 60)"
    head="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["head"])' "$state")"
    read -ra replicas <<<"$(python3 -c '
import json, sys
s = json.loads(sys.argv[1])
print(" ".join(sorted(n for n in s["urls"] if n != s["primary"])))' "$state")"
    victim="${replicas[r % ${#replicas[@]}]}"
    pid="${BANK_PIDS[$victim]}"
    url="${BANK_URLS[$victim]}"
    kill -KILL "$pid"
    forget_pid "$pid"
    # Bounded in count and time; fewer records than asked for is reported, not fatal.
    python3 "$ROOT/bench/catchup.py" push "$REGROUP" "$CATCHUP_RECORDS" --max-time "$PUSH_SECS" \
        >"$TMP/round$r-catchup-push.json" || log "catch-up: the push fell short: $(cat "$TMP/round$r-catchup-push.json")"
    # The watcher polls from before the return (see bench/catchup.py).
    local since="$TMP/round$r-catchup-since" ready="$TMP/round$r-catchup-ready"
    : >"$since"
    python3 "$ROOT/bench/catchup.py" watch "$ADMIN" "$victim" --since-file "$since" \
        --ready-file "$ready" --from "$head" --round "$r" \
        --push "$TMP/round$r-catchup-push.json" --timeout 600 >"$TMP/round$r-catchup.json" &
    watcher=$!
    PIDS+=("$watcher")
    for _ in $(seq 300); do [[ -e "$ready" ]] && break; kill -0 "$watcher" 2>/dev/null || break; sleep 0.05; done
    [[ -e "$ready" ]] || { echo "$SCRIPT: the catch-up watcher did not start" >&2; exit 1; }
    restart_bank "$victim" "$pid" "$url"
    echo "$EPOCHREALTIME" >"$since"
    BANK_PIDS[$victim]="$BANK_PID"
    if ! wait "$watcher"; then
        cat "$TMP/round$r-catchup.json" >&2
        exit 1
    fi
    forget_pid "$watcher"
    cat "$TMP/round$r-catchup.json" >>"$CATCHUP_OUT"
    log "catch-up: $victim $(python3 -c '
import json, sys
t = json.load(open(sys.argv[1]))
print("%d behind, head after %.1f s: %.0f records/s (push %.0f/s)" % (t["behind"], t["done_s"], t["rate"], t["push_rps"]))' "$TMP/round$r-catchup.json")"
    settle >/dev/null
}

# The failover trials of round $1: kills r, r + ROUNDS, ... of KILLS; each appends
# "round<TAB>trial JSON" to FAILOVER_OUT.
failover_trials() {
    local r="$1" k
    for ((k = r; k < KILLS; k += ROUNDS)); do
        kill_primary_trial "$ADMIN" "$REGROUP" "$TMP/round$r-failover-$k.json"
        printf '%s\t%s\n' "$r" "$(cat "$TMP/round$r-failover-$k.json")" >>"$FAILOVER_OUT"
        log "failover $((k + 1))/$KILLS: killed $VICTIM, first 201 after $(python3 "$ROOT/bench/failover.py" brief "$TMP/round$r-failover-$k.json")"
    done
    settle >/dev/null
}

LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
log "warm-up: 1 s per wrk target (load average before: $LOADAVG)"
for t in "${TARGETS[@]}"; do
    case "$t" in
        catchup | failover) ;;
        *) run_target "$t" 1 "$TMP/warmup-$t.txt" >/dev/null ;;
    esac
done

RESULTS="$TMP/results.tsv"
: >"$RESULTS"
n=${#TARGETS[@]}
for ((r = 0; r < ROUNDS; r++)); do
    order=()
    for ((k = 0; k < n; k++)); do order+=("${TARGETS[$(((r + k) % n))]}"); done
    log "round $((r + 1))/$ROUNDS: ${order[*]}"
    for t in "${order[@]}"; do
        case "$t" in
            catchup) catchup_trial "$r" ;;
            failover) failover_trials "$r" ;;
            *)
                out="$TMP/round$r-$t.txt"
                read -r ticks rss <<<"$(run_target "$t" "$DURATION" "$out")"
                printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$out" "$ticks" "$rss" >>"$RESULTS"
                ;;
        esac
    done
done

# --- 6. report -----------------------------------------------------------------------------
REPORT="$TMP/report.md"
COMMAND="bench/run.sh"
[[ -n "$ONLY" ]] && COMMAND+=" --only $ONLY"
COMMAND+=" --rounds $ROUNDS --duration $DURATION"
[[ " ${TARGETS[*]} " == *" catchup "* && $CATCHUP_RECORDS -ne 10000 ]] && COMMAND+=" --catchup-records $CATCHUP_RECORDS"
[[ " ${TARGETS[*]} " == *" failover "* && $KILLS -ne 3 ]] && COMMAND+=" --kills $KILLS"
[[ "$SYNC" != full ]] && COMMAND+=" --journal-sync $SYNC"
for line in "${SETS[@]}"; do COMMAND+=" --set '$line'"; done
for line in "${GROUP_SETS[@]}"; do COMMAND+=" --group-set '$line'"; done
python3 "$ROOT/bench/report.py" "$RESULTS" \
    --rounds "$ROUNDS" --duration "$DURATION" \
    --command "$COMMAND" \
    --clk-tck "$(getconf CLK_TCK)" \
    --nginx-version "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')" \
    --wrk-version "$(wrk -v 2>&1 | head -1 | awk '{print $2}')" \
    --loadavg "$LOADAVG" --loadavg-after "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --journal-sync "$SYNC" \
    --catchup "$CATCHUP_OUT" --failover "$FAILOVER_OUT" \
    --failover-log "$TMP/regroup-three.out.err" \
    --commit "$(commit_id)" \
    >"$REPORT"
cat "$REPORT"
if [[ $WRITE -eq 1 ]]; then
    python3 "$ROOT/bench/report.py" --splice "$ROOT/BENCHMARKS.md" "$REPORT" "$SYNC"
    log "wrote the report into BENCHMARKS.md"
fi
