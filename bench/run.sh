#!/usr/bin/env bash
# bench/run.sh: regroup's throughput and latency against baselines measured in the same run.
#
# Usage (from the repository root or anywhere in a clone):
#   bench/run.sh                  # measure, print a markdown report
#   bench/run.sh --write          # ... and put it in BENCHMARKS.md between the bench markers
#   bench/run.sh --rounds 3 --duration 3 --keep
#
# Options:
#   --write         replace the section between `<!-- bench:begin -->` and
#                   `<!-- bench:end -->` in BENCHMARKS.md with the report
#   --rounds N      interleaved rounds (default 5; env BENCH_ROUNDS)
#   --duration S    seconds per wrk run (default 5; env BENCH_DURATION)
#   --keep          keep the temporary directory (configs, logs, raw wrk output)
#   REGROUP_LOG     the proxy's RUST_LOG (default info), e.g.
#                   info,regroup_proxy::update=debug for per-update timings
#   --journal-sync M  the proxy's `journal_sync`: `full` (default) or `append`; with
#                   --write, `append` goes between `<!-- bench-append:begin -->` and
#                   `<!-- bench-append:end -->`
#
# What it does:
#   1. `cargo build --release --bin regroup --example bank` (target/release/regroup and
#      target/release/examples/bank).
#   2. Installs nginx (nginx-light) and wrk from Debian's packages when missing (needs root
#      and apt-get), plus python3 for the report when missing.
#   3. In a `mktemp -d` directory: starts three bank partitions a, b, c (the example `bank`, SQLite
#      files), the regroup proxy in front of them (`regroup serve`, SQLite journal with its
#      default durable settings), nginx (2 workers, keep-alive upstream) in front of
#      partition a (the primary), and a standalone bank "solo" on its own SQLite file that is
#      not part of the group. Every port is 127.0.0.1:0 or a free port picked by the kernel.
#   4. Seeds accounts 1 and 2 (balance 1_000_000_000) through regroup (so every partition has
#      them) and directly on solo.
#   5. Runs, in interleaved rounds (each round runs every target once, in an order rotated
#      by one each round), wrk for --duration seconds against:
#        read-regroup   GET /accounts/1 through regroup          wrk -t1 -c16
#        read-nginx     GET /accounts/1 through nginx -> a       wrk -t1 -c16
#        read-direct    GET /accounts/1 on a                     wrk -t1 -c16
#        update-regroup POST /transfers through regroup          wrk -t1 -c1
#        update-direct  POST /transfers on solo                  wrk -t1 -c1
#      After every run it waits until the group has replayed everything (admin /status), so
#      replays of one run do not eat into the next.
#   6. Prints a markdown report: machine, date, medians over the rounds of req/s, p50, p99,
#      the ratios and whether each floor of BENCHMARKS.md is met.
# A trap kills every process the script started and removes the temporary directory.
set -euo pipefail

ROUNDS="${BENCH_ROUNDS:-5}"
DURATION="${BENCH_DURATION:-5}"
WRITE=0
KEEP=0
SYNC=full
while [[ $# -gt 0 ]]; do
    case "$1" in
        --write) WRITE=1 ;;
        --journal-sync) SYNC="$2"; shift ;;
        --keep) KEEP=1 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --duration) DURATION="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "bench: $*" >&2; }
SCRIPT="bench/run.sh"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# --- 1. build ------------------------------------------------------------------------------
log "cargo build --release --bin regroup --example bank"
cargo build --release --bin regroup --example bank >&2
BIN="$ROOT/target/release/regroup"
BANK="$ROOT/target/release/examples/bank"

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
TMP="$(mktemp -d "${TMPDIR:-/tmp}/regroup-bench.XXXXXX")"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP -eq 1 ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# Starts a bank named $1 on $TMP/bank-$1.db; sets BANK_URL.
start_bank() {
    local name="$1"
    RUST_LOG=warn "$BANK" --listen 127.0.0.1:0 --db "sqlite://$TMP/bank-$name.db" \
        >"$TMP/bank-$name.out" 2>"$TMP/bank-$name.out.err" </dev/null &
    local pid="$!" line
    PIDS+=("$pid")
    line="$(wait_line "$TMP/bank-$name.out" '^bank listening on ' "$pid")"
    BANK_URL="${line#bank listening on }"
    log "bank $name at $BANK_URL"
}

declare -A BANK
for name in a b c solo; do
    start_bank "$name"
    BANK[$name]="$BANK_URL"
done

cat >"$TMP/regroup.toml" <<EOF
# Generated by bench/run.sh.
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
journal = "sqlite://$TMP/regroup-journal.db"
journal_sync = "$SYNC"

[[groups]]
name = "bank"
health_path = "/health"

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
RUST_LOG="${REGROUP_LOG:-info}" "$BIN" serve --config "$TMP/regroup.toml" \
    >"$TMP/regroup.out" 2>"$TMP/regroup.out.err" </dev/null &
REGROUP_PID="$!"
PIDS+=("$REGROUP_PID")
line="$(wait_line "$TMP/regroup.out" '^regroup listening on ' "$REGROUP_PID")"
REGROUP="$(sed -E 's/^regroup listening on ([^ ]+) .*/\1/' <<<"$line")"
ADMIN="$(sed -E 's/.*\(admin ([^)]+)\).*/\1/' <<<"$line")"
log "regroup at $REGROUP (admin $ADMIN)"

NGINX_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$TMP/nginx"
NGINX_USER=""
[[ $EUID -eq 0 ]] && NGINX_USER="user root;"
cat >"$TMP/nginx/nginx.conf" <<EOF
# Generated by bench/run.sh: a plain keep-alive reverse proxy in front of bank a.
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
        server ${BANK[a]#http://};
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
}
EOF
"$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" \
    >"$TMP/nginx/out" 2>&1 </dev/null &
PIDS+=("$!")
NGINX_URL="http://127.0.0.1:$NGINX_PORT"
for _ in $(seq 100); do
    curl -fs -o /dev/null "$NGINX_URL/health" && break
    sleep 0.1
done
curl -fs -o /dev/null "$NGINX_URL/health" || {
    echo "bench/run.sh: nginx did not come up:" >&2
    cat "$TMP/nginx/out" "$TMP/nginx/error.log" >&2 || true
    exit 1
}
log "nginx at $NGINX_URL -> a"

# --- 4. seed -------------------------------------------------------------------------------
post() { # url path json -> prints body; fails on a non-2xx answer
    curl -fsS -X POST "$1$2" -H 'content-type: application/json' -d "$3"
}
for i in 1 2; do
    for base in "$REGROUP" "${BANK[solo]}"; do
        id="$(post "$base" /accounts "{\"name\":\"bench-$i\",\"balance\":1000000000}" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
        [[ "$id" == "$i" ]] || { echo "bench/run.sh: account bench-$i got id $id on $base" >&2; exit 1; }
    done
done

# Waits until every partition has applied the journal's head and is available.
settle() {
    local state=""
    for _ in $(seq 600); do
        state="$(curl -fsS "$ADMIN/status" | python3 -c '
import json, sys
g = json.load(sys.stdin)["groups"][0]
ok = not g["in_doubt"] and all(p["applied"] == g["head"] and p["status"] == "available" for p in g["partitions"])
print("ok" if ok else "wait", g["primary"], g["head"], " ".join("%s=%s/%s" % (p["name"], p["applied"], p["status"]) for p in g["partitions"]))
')"
        [[ "$state" == ok* ]] && { echo "$state"; return 0; }
        sleep 0.1
    done
    echo "bench/run.sh: the group did not settle within 60 s: $state" >&2
    return 1
}
state="$(settle)"
[[ "$(cut -d' ' -f2 <<<"$state")" == a ]] || { echo "bench/run.sh: primary is not a: $state" >&2; exit 1; }
for name in a b c; do
    curl -fs -o /dev/null "${BANK[$name]}/accounts/2" || { echo "bench/run.sh: partition $name lacks account 2" >&2; exit 1; }
done
log "seeded accounts 1 and 2 on a, b, c (through regroup) and on solo"

cat >"$TMP/transfer.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"from":1,"to":2,"amount":1}'
wrk.headers["Content-Type"] = "application/json"
EOF

# --- 5. measure ----------------------------------------------------------------------------
TARGETS=(read-regroup read-nginx read-direct update-regroup update-direct)
run_target() { # target seconds output-file
    local t="$1" secs="$2" out="$3"
    case "$t" in
        read-regroup) wrk -t1 -c16 -d"${secs}s" --latency "$REGROUP/accounts/1" >"$out" ;;
        read-nginx) wrk -t1 -c16 -d"${secs}s" --latency "$NGINX_URL/accounts/1" >"$out" ;;
        read-direct) wrk -t1 -c16 -d"${secs}s" --latency "${BANK[a]}/accounts/1" >"$out" ;;
        update-regroup) wrk -t1 -c1 -d"${secs}s" --latency -s "$TMP/transfer.lua" "$REGROUP/transfers" >"$out" ;;
        update-direct) wrk -t1 -c1 -d"${secs}s" --latency -s "$TMP/transfer.lua" "${BANK[solo]}/transfers" >"$out" ;;
    esac
    settle >/dev/null
}

LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
log "warm-up: 1 s per target (load average before: $LOADAVG)"
for t in "${TARGETS[@]}"; do
    run_target "$t" 1 "$TMP/warmup-$t.txt"
done

RESULTS="$TMP/results.tsv"
: >"$RESULTS"
n=${#TARGETS[@]}
for ((r = 0; r < ROUNDS; r++)); do
    order=()
    for ((k = 0; k < n; k++)); do order+=("${TARGETS[$(((r + k) % n))]}"); done
    log "round $((r + 1))/$ROUNDS: ${order[*]}"
    for t in "${order[@]}"; do
        out="$TMP/round$r-$t.txt"
        run_target "$t" "$DURATION" "$out"
        printf '%s\t%s\t%s\n' "$t" "$r" "$out" >>"$RESULTS"
    done
done

# --- 6. report -----------------------------------------------------------------------------
REPORT="$TMP/report.md"
python3 "$ROOT/bench/report.py" "$RESULTS" \
    --rounds "$ROUNDS" --duration "$DURATION" \
    --nginx-version "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')" \
    --wrk-version "$(wrk -v 2>&1 | head -1 | awk '{print $2}')" \
    --loadavg "$LOADAVG" \
    --journal-sync "$SYNC" \
    --commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty)')" \
    >"$REPORT"
cat "$REPORT"
if [[ $WRITE -eq 1 ]]; then
    python3 "$ROOT/bench/report.py" --splice "$ROOT/BENCHMARKS.md" "$REPORT" "$SYNC"
    log "wrote the report into BENCHMARKS.md"
fi
