#!/usr/bin/env bash
# bench/run.sh: regroup's throughput and latency against baselines measured in the same run.
#
# Usage (from the repository root or anywhere in a clone):
#   bench/run.sh                  # measure everything, print a markdown report
#   bench/run.sh --write          # ... and put it in BENCHMARKS.md between the bench markers
#   bench/run.sh --only reads     # one workload (about a minute): reads, updates, mixed,
#                                 # catchup, catchup-pg or failover
#   bench/run.sh --rounds 3 --duration 3 --keep
#
# Options:
#   --write         replace the section between `<!-- bench:begin -->` and
#                   `<!-- bench:end -->` in BENCHMARKS.md with the report (full runs only)
#   --only LIST     comma-separated workloads or targets: `reads`, `updates`, `mixed`,
#                   `catchup` (with `update-direct`, its baseline), `catchup-pg` (with
#                   `update-pg-direct`, its baseline; needs PostgreSQL, see below),
#                   `failover`, or target names as listed below (e.g.
#                   `--only health-regroup,health-nginx`)
#   --rounds N      interleaved rounds (default 5; env BENCH_ROUNDS)
#   --duration S    seconds per wrk run (default 5; env BENCH_DURATION)
#   --catchup-records N  records a replica is behind in the catch-up workloads (default
#                   10000; env BENCH_CATCHUP_RECORDS)
#   --pg-accounts N accounts the catchup-pg transfers are spread over (default 64; env
#                   BENCH_PG_ACCOUNTS)
#   --kills N       SIGKILLs of the primary in the failover workload, spread over the
#                   rounds (default 3; env BENCH_KILLS)
#   --keep          keep the temporary directory (configs, logs, raw wrk output) and the
#                   PostgreSQL databases of catchup-pg (their names are logged)
#   --no-build      measure the binaries already in target/release (no cargo build)
#   --set LINE      a top-level line for every regroup config, e.g. `--set 'client_threads = 0'`
#   --group-set LINE  a line for the group of every regroup config (three, one, and pg
#                   when catchup-pg runs), e.g. `--group-set 'pipeline_window = 1'` or
#                   `--group-set 'replay_window = 32'` (repeatable; shown in the report)
#   --pg-group-set LINE  a line for group pg only (catchup-pg), after the --group-set
#                   lines, e.g. `--pg-group-set 'replay_window = 1'` (repeatable; shown)
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
#      With catchup-pg (in a full run only when `pg_isready` answers on 127.0.0.1:5432):
#      four databases on the PostgreSQL server at 127.0.0.1:5432 (user postgres, trust
#      auth), `regroup_bench_<pid>_{a,b,c,solo}`, made with `createdb` and dropped with
#      `dropdb --force` on exit (no other database is touched); banks pg-a, pg-b, pg-c on
#      the first three behind regroup "pg" (its own SQLite journal, the conflict keys
#      above), and pg-solo, part of no group, on the fourth.
#   4. Seeds accounts 1 and 2 (balance 1_000_000_000) through both regroups (so every
#      partition has them) and directly on solo; with catchup-pg, accounts 1..--pg-accounts
#      (the same balance) through regroup pg and directly on pg-solo.
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
#        catchup-pg:
#        update-pg-direct  POST /transfers on pg-solo (PostgreSQL)     wrk -t1 -c1
#        catchup-pg        the catchup trial on regroup pg: three banks on PostgreSQL
#                          behind a group with the conflict keys `body:/from`,
#                          `body:/to` on POST /transfers, so a returning replica replays
#                          transfers that share no account in parallel (up to the group's
#                          `replay_window` records at once); the push sends each transfer
#                          between two distinct accounts drawn at random from 1..--pg-accounts
#                          (bench/catchup.py push --accounts); records/s against
#                          update-pg-direct of the same run (issue 11's floor: >= 1.5x).
#                          After each trial the three copies' `account` and `transfer` rows
#                          are compared (a difference stops the run, keeping everything)
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
# A trap kills every process the script started, removes the temporary directory and drops
# the PostgreSQL databases it made (both kept with --keep, or after a failed catch-up).
set -euo pipefail

ROUNDS="${BENCH_ROUNDS:-5}"
DURATION="${BENCH_DURATION:-5}"
WRITE=0
KEEP=0
SYNC=full
ONLY=""
SETS=()
GROUP_SETS=()
PG_GROUP_SETS=()
BUILD=1
CATCHUP_RECORDS="${BENCH_CATCHUP_RECORDS:-10000}"
PG_ACCOUNTS="${BENCH_PG_ACCOUNTS:-64}"
KILLS="${BENCH_KILLS:-3}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --write) WRITE=1 ;;
        --journal-sync) SYNC="$2"; shift ;;
        --keep) KEEP=1 ;;
        --only) ONLY="$2"; shift ;;
        --set) SETS+=("$2"); shift ;;
        --group-set) GROUP_SETS+=("$2"); shift ;;
        --pg-group-set) PG_GROUP_SETS+=("$2"); shift ;;
        --no-build) BUILD=0 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --duration) DURATION="$2"; shift ;;
        --catchup-records) CATCHUP_RECORDS="$2"; shift ;;
        --pg-accounts) PG_ACCOUNTS="$2"; shift ;;
        --kills) KILLS="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for v in "$ROUNDS" "$DURATION" "$CATCHUP_RECORDS" "$KILLS" "$PG_ACCOUNTS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "bench/run.sh: $v is not a positive integer" >&2; exit 2; }
done
[[ $PG_ACCOUNTS -ge 2 ]] || { echo "bench/run.sh: --pg-accounts needs at least 2" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "bench: $*" >&2; }
SCRIPT="bench/run.sh"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# --- what to measure -----------------------------------------------------------------------
READS=(read-regroup read-nginx read-direct health-regroup health-nginx health-direct)
UPDATES=(update-regroup update-regroup1 update-direct update16-regroup update16-regroup1 update16-direct)
MIXED=(mixed-regroup mixed-direct)
CATCHUP=(update-direct catchup)   # update-direct: the rate the catch-up rate is held against
CATCHUP_PG=(update-pg-direct catchup-pg)   # the same on PostgreSQL, with conflict keys
FAILOVER=(failover)
picked=()
if [[ -z "$ONLY" ]]; then
    picked=("${READS[@]}" "${UPDATES[@]}" "${MIXED[@]}" "${CATCHUP[@]}" "${CATCHUP_PG[@]}" "${FAILOVER[@]}")
else
    IFS=, read -ra picks <<<"$ONLY"
    for pick in "${picks[@]}"; do
        case "$pick" in
            reads) picked+=("${READS[@]}") ;;
            updates) picked+=("${UPDATES[@]}") ;;
            mixed) picked+=("${MIXED[@]}") ;;
            catchup) picked+=("${CATCHUP[@]}") ;;
            catchup-pg) picked+=("${CATCHUP_PG[@]}") ;;
            failover) picked+=("${FAILOVER[@]}") ;;
            *)
                [[ " ${READS[*]} ${UPDATES[*]} ${MIXED[*]} catchup update-pg-direct " == *" $pick "* ]] ||
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
# Whether target $1 was picked.
selected() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

# --- 1. build ------------------------------------------------------------------------------
build_release "$BUILD"

# --- 2. tools ------------------------------------------------------------------------------
find_nginx
command -v wrk >/dev/null || apt_install wrk
command -v python3 >/dev/null || apt_install python3
command -v curl >/dev/null || apt_install curl
# PostgreSQL for catchup-pg: the server at PG_HOST:PG_PORT, trust auth for PG_USER.
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
PG=0
if selected catchup-pg || selected update-pg-direct; then
    command -v createdb >/dev/null && command -v pg_isready >/dev/null || apt_install postgresql-client
    if pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 5; then
        PG=1
    elif [[ -z "$ONLY" ]]; then
        log "no PostgreSQL at $PG_HOST:$PG_PORT (pg_isready): catchup-pg left out of this run"
        kept=()
        for t in "${TARGETS[@]}"; do
            [[ " ${CATCHUP_PG[*]} " == *" $t "* ]] || kept+=("$t")
        done
        TARGETS=("${kept[@]}")
    else
        echo "bench/run.sh: catchup-pg needs the PostgreSQL server at $PG_HOST:$PG_PORT (pg_isready: not ready)" >&2
        exit 1
    fi
fi

# --- 3. processes --------------------------------------------------------------------------
bench_tmp bench
for name in a b c one solo; do
    start_bank "$name"
    BANK_URLS[$name]="$BANK_URL"
    BANK_PIDS[$name]="$BANK_PID"
    log "bank $name at $BANK_URL"
done

# Writes regroup config $1 (journal $2) for a group over the partitions named in $3
# (space-separated); the group's lines are the --group-set lines, then $4...
regroup_config() {
    local file="$1" journal="$2" names name parts=()
    read -ra names <<<"$3"
    shift 3
    for name in "${names[@]}"; do parts+=("$name=${BANK_URLS[$name]}"); done
    write_config "$file" "journal = \"sqlite://$journal\"
journal_sync = \"$SYNC\"
$(printf '%s\n' "${SETS[@]}")" "$(printf '%s\n' "${GROUP_SETS[@]}" "$@")" "${parts[@]}"
}

regroup_config "$TMP/regroup-three.toml" "$TMP/journal-three.db" "a b c"
start_regroup three "$TMP/regroup-three.toml"
log "regroup three at $RG_URL (admin $RG_ADMIN)"
REGROUP="$RG_URL" ADMIN="$RG_ADMIN" REGROUP_PID="$RG_PID"
regroup_config "$TMP/regroup-one.toml" "$TMP/journal-one.db" one
start_regroup one "$TMP/regroup-one.toml"
log "regroup one at $RG_URL (admin $RG_ADMIN)"
REGROUP1="$RG_URL" ADMIN1="$RG_ADMIN" REGROUP1_PID="$RG_PID"

# catchup-pg: banks pg-a, pg-b, pg-c on PostgreSQL behind regroup pg, whose group declares
# transfers independent unless they share an account; pg-solo, on PostgreSQL too, in no group.
CONFLICT_KEYS='[[groups.conflict_keys]]
method = "POST"
path = "/transfers"
keys = ["body:/from", "body:/to"]'
PG_DBS=()   # the databases this run made: dropped on exit (kept with --keep)
ADMIN_PG=""
export PGCONNECT_TIMEOUT=10
pg_args=(-w -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")
cleanup_extra() {
    local db
    [[ ${#PG_DBS[@]} -gt 0 ]] || return 0
    if [[ $KEEP -eq 1 ]]; then
        log "kept the PostgreSQL databases ${PG_DBS[*]} (dropdb ${pg_args[*]} --force NAME drops one)"
        return 0
    fi
    for db in "${PG_DBS[@]}"; do
        dropdb "${pg_args[@]}" --if-exists --force "$db" >&2 || log "dropdb $db failed"
    done
}
# Runs one query $2 on bank $1's PostgreSQL database; prints the rows, fields |-separated.
pg_query() {
    psql "${pg_args[@]}" -X -q -At -v ON_ERROR_STOP=1 -d "${BANK_DBS[$1]##*/}" -c "$2"
}
if [[ $PG -eq 1 ]]; then
    for name in pg-a pg-b pg-c pg-solo; do
        db="regroup_bench_$$_${name#pg-}"
        createdb "${pg_args[@]}" "$db"
        PG_DBS+=("$db")
        BANK_DBS[$name]="postgres://$PG_USER@$PG_HOST:$PG_PORT/$db"
        start_bank "$name"
        BANK_URLS[$name]="$BANK_URL"
        BANK_PIDS[$name]="$BANK_PID"
        log "bank $name at $BANK_URL (PostgreSQL database $db)"
    done
    regroup_config "$TMP/regroup-pg.toml" "$TMP/journal-pg.db" "pg-a pg-b pg-c" \
        "${PG_GROUP_SETS[@]}" "$CONFLICT_KEYS"
    start_regroup pg "$TMP/regroup-pg.toml"
    log "regroup pg at $RG_URL (admin $RG_ADMIN)"
    REGROUP_PG="$RG_URL" ADMIN_PG="$RG_ADMIN"
fi

read -r NGINX_PORT NGINX1_PORT <<<"$(free_ports 2)"
mkdir -p "$TMP/nginx"
{
    echo "# Generated by bench/run.sh: a plain keep-alive reverse proxy in front of bank a, and one"
    echo "# in front of bank one."
    nginx_config "$TMP/nginx" "worker_processes 2;" \
        "$NGINX_PORT=${BANK_URLS[a]#http://}" "$NGINX1_PORT=${BANK_URLS[one]#http://}"
} >"$TMP/nginx/nginx.conf"
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
    settle_one "$ADMIN1" >/dev/null || return 1
    [[ -z "$ADMIN_PG" ]] || settle_one "$ADMIN_PG" >/dev/null || return 1
    settle_one "$ADMIN"
}
if [[ $PG -eq 1 ]]; then
    python3 "$ROOT/bench/catchup.py" seed "$REGROUP_PG" "$PG_ACCOUNTS"
    python3 "$ROOT/bench/catchup.py" seed "${BANK_URLS[pg-solo]}" "$PG_ACCOUNTS"
fi
state="$(settle)"
[[ "$(cut -d' ' -f2 <<<"$state")" == a ]] || { echo "bench/run.sh: primary is not a: $state" >&2; exit 1; }
for name in a b c one; do
    curl -fs -o /dev/null "${BANK_URLS[$name]}/accounts/2" || { echo "bench/run.sh: partition $name lacks account 2" >&2; exit 1; }
done
log "seeded accounts 1 and 2 on a, b, c (through regroup three), one (through regroup one) and solo"
if [[ $PG -eq 1 ]]; then
    state="$(settle_one "$ADMIN_PG")"
    [[ "$(cut -d' ' -f2 <<<"$state")" == pg-a ]] || { echo "bench/run.sh: primary of pg is not pg-a: $state" >&2; exit 1; }
    for name in pg-a pg-b pg-c; do
        curl -fs -o /dev/null "${BANK_URLS[$name]}/accounts/$PG_ACCOUNTS" ||
            { echo "bench/run.sh: partition $name lacks account $PG_ACCOUNTS" >&2; exit 1; }
    done
    log "seeded accounts 1..$PG_ACCOUNTS on pg-a, pg-b, pg-c (through regroup pg) and pg-solo"
fi

cat >"$TMP/transfer.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"from":1,"to":2,"amount":1}'
wrk.headers["Content-Type"] = "application/json"
LUA

# --- 5. measure ----------------------------------------------------------------------------

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
        update-pg-direct) "${w[@]}" -t1 -c1 -s "$TMP/transfer.lua" "${BANK_URLS[pg-solo]}/transfers" >"$out" ;;
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
CATCHUP_PG_OUT="$TMP/catchup-pg.jsonl"
FAILOVER_OUT="$TMP/failover.tsv"
: >"$CATCHUP_OUT"
: >"$CATCHUP_PG_OUT"
: >"$FAILOVER_OUT"

# Stops the run after a failed catch-up trial of group $1 (its proxy's log is
# $TMP/regroup-$1.out.err) with replica $2: the tails of both logs on stderr, and everything
# kept (KEEP=1: the temporary directory and the PostgreSQL databases) to look into.
catchup_failed() {
    echo "$SCRIPT: --- the last lines of regroup $1's log:" >&2
    tail -n 40 "$TMP/regroup-$1.out.err" >&2 || true
    echo "$SCRIPT: --- the last lines of bank $2's log:" >&2
    tail -n 20 "$TMP/bank-$2.out.err" >&2 || true
    KEEP=1
    exit 1
}

# The catch-up trial of round $1 on group $2 (three or pg; admin $3, proxy $4): SIGKILLs a
# replica (never the primary; the replicas by turn), pushes CATCHUP_RECORDS transfers
# through the proxy (bench/catchup.py push, with the arguments $6...), starts the replica
# again on its port and database and times its catch-up from there (bench/catchup.py
# watch); appends the JSON line to file $5. Files: $TMP/round<r>-catchup[-pg]*. On a
# PostgreSQL replica it adds `parallel` (records the replica took while records before them
# were still on their way: `regroup_applied.floor` below the seq right before them, as
# tests/parallel_replay.rs counts) and `recorded` (records of the trial in
# `regroup_applied`).
catchup_trial() {
    local r="$1" group="$2" admin="$3" proxy="$4" jsonl="$5" state head victim pid url watcher
    local replicas=() tag=catchup
    shift 5
    [[ "$group" == three ]] || tag="catchup-$group"
    local f="$TMP/round$r-$tag"
    state="$(python3 "$ROOT/bench/failover.py" settle "$admin" --timeout 60)"
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
    python3 "$ROOT/bench/catchup.py" push "$proxy" "$CATCHUP_RECORDS" --max-time "$PUSH_SECS" "$@" \
        >"$f-push.json" || log "$tag: the push fell short: $(cat "$f-push.json")"
    # The watcher polls from before the return (see bench/catchup.py).
    local since="$f-since" ready="$f-ready"
    : >"$since"
    python3 "$ROOT/bench/catchup.py" watch "$admin" "$victim" --since-file "$since" \
        --ready-file "$ready" --from "$head" --round "$r" \
        --push "$f-push.json" --timeout 600 >"$f.json" &
    watcher=$!
    PIDS+=("$watcher")
    for _ in $(seq 300); do [[ -e "$ready" ]] && break; kill -0 "$watcher" 2>/dev/null || break; sleep 0.05; done
    [[ -e "$ready" ]] || { echo "$SCRIPT: the catch-up watcher did not start" >&2; exit 1; }
    restart_bank "$victim" "$pid" "$url"
    echo "$EPOCHREALTIME" >"$since"
    BANK_PIDS[$victim]="$BANK_PID"
    if ! wait "$watcher"; then
        cat "$f.json" >&2
        catchup_failed "$group" "$victim"
    fi
    forget_pid "$watcher"
    if [[ "${BANK_DBS[$victim]:-}" == postgres://* ]]; then
        local counts
        counts="$(pg_query "$victim" "SELECT count(*) FILTER (WHERE floor IS NOT NULL AND floor < seq - 1), count(*)
            FROM regroup_applied WHERE seq > $head AND seq <= $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["head"])' "$f.json")")"
        python3 -c '
import json, sys
t = json.load(open(sys.argv[1]))
t["parallel"], t["recorded"] = (int(x) for x in sys.argv[2].split("|"))
print(json.dumps(t))' "$f.json" "$counts" >"$f.json.new"
        mv "$f.json.new" "$f.json"
    fi
    cat "$f.json" >>"$jsonl"
    log "$tag: $victim $(python3 -c '
import json, sys
t = json.load(open(sys.argv[1]))
print("%d behind, head after %.1f s: %.0f records/s (push %.0f/s)%s" % (t["behind"], t["done_s"], t["rate"], t["push_rps"],
      "; %d of %d taken in parallel" % (t["parallel"], t["recorded"]) if "parallel" in t else ""))' "$f.json")"
    if ! settle >/dev/null; then catchup_failed "$group" "$victim"; fi
    [[ "$group" != pg ]] || same_pg_copies "$group" "$victim"
}

# Fails the run (catchup_failed) unless banks pg-a, pg-b and pg-c hold the same `account`
# and `transfer` rows (after a settle: every copy at the head); the replica that came back
# last is $2.
same_pg_copies() {
    local name digest first="" ok=1
    local q="SELECT (SELECT count(*) || ' ' || md5(coalesce(string_agg(id || ':' || name || ':' || balance, ',' ORDER BY id), '')) FROM account)
        || ' ' || (SELECT count(*) || ' ' || md5(coalesce(string_agg(id || ':' || from_id || ':' || to_id || ':' || amount
        || ':' || created_at || ':' || reference, ',' ORDER BY id), '')) FROM transfer)"
    for name in pg-a pg-b pg-c; do
        digest="$(pg_query "$name" "$q")"
        [[ -z "$first" ]] && first="$digest"
        [[ "$digest" == "$first" ]] || ok=0
        echo "$name $digest" >>"$TMP/pg-digests.txt"
    done
    if [[ $ok -eq 0 ]]; then
        echo "$SCRIPT: the copies on PostgreSQL differ (accounts: count md5, transfers: count md5):" >&2
        tail -n 3 "$TMP/pg-digests.txt" >&2
        catchup_failed "$1" "$2"
    fi
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
        catchup | catchup-pg | failover) ;;
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
            catchup) catchup_trial "$r" three "$ADMIN" "$REGROUP" "$CATCHUP_OUT" ;;
            catchup-pg)
                catchup_trial "$r" pg "$ADMIN_PG" "$REGROUP_PG" "$CATCHUP_PG_OUT" \
                    --accounts "$PG_ACCOUNTS" --seed "$r"
                ;;
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
[[ " ${TARGETS[*]} " =~ " catchup"(-pg)?" " && $CATCHUP_RECORDS -ne 10000 ]] && COMMAND+=" --catchup-records $CATCHUP_RECORDS"
selected catchup-pg && [[ $PG_ACCOUNTS -ne 64 ]] && COMMAND+=" --pg-accounts $PG_ACCOUNTS"
[[ " ${TARGETS[*]} " == *" failover "* && $KILLS -ne 3 ]] && COMMAND+=" --kills $KILLS"
[[ "$SYNC" != full ]] && COMMAND+=" --journal-sync $SYNC"
for line in "${SETS[@]}"; do COMMAND+=" --set '$line'"; done
for line in "${GROUP_SETS[@]}"; do COMMAND+=" --group-set '$line'"; done
for line in "${PG_GROUP_SETS[@]}"; do COMMAND+=" --pg-group-set '$line'"; done
# Group pg's replay_window as its config has it (--group-set or --pg-group-set).
PG_WINDOW=""
if [[ $PG -eq 1 ]]; then
    PG_WINDOW="$(sed -nE 's/^[[:space:]]*replay_window[[:space:]]*=[[:space:]]*([0-9]+).*/\1/p' "$TMP/regroup-pg.toml" | tail -1)"
    PG_WINDOW="${PG_WINDOW:-8 (the default)}"
fi
PG_LEFT_OUT=()
[[ -z "$ONLY" && $PG -eq 0 ]] && PG_LEFT_OUT=(--catchup-pg-left-out "no PostgreSQL answered at $PG_HOST:$PG_PORT")
python3 "$ROOT/bench/report.py" "$RESULTS" \
    --rounds "$ROUNDS" --duration "$DURATION" \
    --command "$COMMAND" \
    --clk-tck "$(getconf CLK_TCK)" \
    --nginx-version "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')" \
    --wrk-version "$(wrk -v 2>&1 | head -1 | awk '{print $2}')" \
    --loadavg "$LOADAVG" --loadavg-after "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --journal-sync "$SYNC" \
    --catchup "$CATCHUP_OUT" --failover "$FAILOVER_OUT" \
    --catchup-pg "$CATCHUP_PG_OUT" --catchup-pg-window "$PG_WINDOW" \
    --catchup-pg-accounts "$PG_ACCOUNTS" "${PG_LEFT_OUT[@]}" \
    --failover-log "$TMP/regroup-three.out.err" \
    --commit "$(commit_id)" \
    >"$REPORT"
cat "$REPORT"
if [[ $WRITE -eq 1 ]]; then
    python3 "$ROOT/bench/report.py" --splice "$ROOT/BENCHMARKS.md" "$REPORT" "$SYNC"
    log "wrote the report into BENCHMARKS.md"
fi
