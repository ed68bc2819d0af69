# shellcheck shell=bash
# bench/lib.sh: shell helpers shared by bench/run.sh, bench/failover.sh and bench/proxies.sh
# (sourced, not run): the build, tools, the temporary directory and its clean-up, starting
# banks and proxies, restarting a killed bank.
# The sourcing script sets ROOT and SCRIPT (its name, for messages) and defines log().
# Every process is started in the background and disowned (bash prints no "Killed" when a
# trial SIGKILLs one) and its pid goes into PIDS, which the clean-up stops.

# shellcheck disable=SC2034  # BIN, BANK_URL, RG_URL, NGINX, ... are set here for the sourcing script
PIDS=()
# The banks of a script that kills and restarts them (kill_primary_trial): name -> URL, and
# name -> pid of its current process; BANK_DBS: name -> database URL of a bank that is not
# on its SQLite file $TMP/bank-NAME.db (e.g. postgres://...), set before start_bank.
declare -A BANK_URLS=() BANK_PIDS=() BANK_DBS=()
APT_UPDATED=0
# Installs Debian packages $@ (as root, or with sudo), updating the package lists once.
apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "$SCRIPT: $* missing and no apt-get to install it" >&2
        exit 1
    fi
    local sudo=""
    [[ $EUID -ne 0 ]] && sudo="sudo"
    if [[ $APT_UPDATED -eq 0 ]]; then
        $sudo apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}

# Sets NGINX to the nginx binary, installing nginx-light (or nginx) from Debian's packages
# when there is none.
find_nginx() {
    NGINX="$(command -v nginx || true)"
    [[ -z "$NGINX" && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
    if [[ -z "$NGINX" ]]; then
        apt_install nginx-light || apt_install nginx
        NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
    fi
}

# Builds the release binaries unless $1 is 0 (--no-build); sets BIN (regroup, or
# REGROUP_BIN) and BANK_BIN (the example bank, or REGROUP_BANK).
build_release() {
    if [[ "${1:-1}" -ne 0 ]]; then
        log "cargo build --release --bin regroup --example bank"
        cargo build --release --bin regroup --example bank >&2
    fi
    BIN="${REGROUP_BIN:-$ROOT/target/release/regroup}"
    BANK_BIN="${REGROUP_BANK:-$ROOT/target/release/examples/bank}"
    local b
    for b in "$BIN" "$BANK_BIN"; do
        [[ -x "$b" ]] || { echo "$SCRIPT: no binary $b (build first, or drop --no-build)" >&2; exit 1; }
    done
}

# Makes the temporary directory TMP (`mktemp -d`, named after $1) and installs the clean-up:
# on exit every process in PIDS gets SIGTERM, then SIGKILL after 10 s; `cleanup_extra` runs
# when the script defines it; TMP is removed unless KEEP is 1.
bench_tmp() {
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/regroup-$1.XXXXXX")"
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

# Stops every process in PIDS: SIGTERM, at most 10 s to exit, then SIGKILL.
stop_all() {
    local pid alive
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 100); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

bench_cleanup() {
    stop_all
    if declare -F cleanup_extra >/dev/null; then cleanup_extra || true; fi
    if [[ "${KEEP:-0}" -eq 1 ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}

# Waits (up to 30 s) for a line matching $2 in file $1 and prints it; fails if process $3 died.
wait_line() {
    local file="$1" pattern="$2" pid="$3" line
    for _ in $(seq 600); do
        line="$(grep -m1 -E "$pattern" "$file" 2>/dev/null || true)"
        if [[ -n "$line" ]]; then
            echo "$line"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$SCRIPT: process $pid exited; its output:" >&2
            cat "$file" "$file.err" 2>/dev/null >&2 || true
            return 1
        fi
        sleep 0.05
    done
    echo "$SCRIPT: no line /$pattern/ in $file within 30 s" >&2
    return 1
}

# Starts the example bank $1 on $TMP/bank-$1.db (or on ${BANK_DBS[$1]} when set), listening
# on $2 (default 127.0.0.1:0; its old address on a restart); sets BANK_URL and BANK_PID. Its
# stdout ($TMP/bank-$1.out) is started afresh, its stderr appended to, so the log of every
# incarnation is kept.
start_bank() {
    local name="$1" listen="${2:-127.0.0.1:0}" out="$TMP/bank-$1.out" line
    : >"$out"
    RUST_LOG=warn "$BANK_BIN" --listen "$listen" --db "${BANK_DBS[$name]:-sqlite://$TMP/bank-$name.db}" \
        >"$out" 2>>"$out.err" </dev/null &
    BANK_PID="$!"
    disown "$BANK_PID"
    PIDS+=("$BANK_PID")
    line="$(wait_line "$out" '^bank listening on ' "$BANK_PID")"
    BANK_URL="${line#bank listening on }"
}

# Waits (at most 1 s) until process $1, just SIGKILLed or done, is gone, and drops it from
# PIDS (so the clean-up never signals a pid the system may have handed out again).
forget_pid() {
    local pid="$1" kept=() p
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.01; done
    for p in "${PIDS[@]}"; do [[ "$p" == "$pid" ]] || kept+=("$p"); done
    PIDS=("${kept[@]}")
}

# Starts bank $1 again after process $2 of it was SIGKILLed, on the same database and on
# URL $3 (the proxy's config names that URL); sets BANK_URL and BANK_PID.
restart_bank() {
    local name="$1" old_pid="$2" url="$3"
    forget_pid "$old_pid"
    start_bank "$name" "${url#http://}"
    [[ "$BANK_URL" == "$url" ]] || { echo "$SCRIPT: $name came back on $BANK_URL, not $url" >&2; exit 1; }
}

# Writes a regroup config to file $1: listen and admin on 127.0.0.1:0, the top-level lines
# $2 (journal and the rest, newline-separated), one group "bank" (health path /health) with
# the lines $3, and its partitions $4... given as NAME=URL.
write_config() {
    local file="$1" top="$2" group="$3" p
    shift 3
    {
        echo "# Generated by $SCRIPT."
        echo 'listen = "127.0.0.1:0"'
        echo 'admin_listen = "127.0.0.1:0"'
        if [[ -n "$top" ]]; then echo "$top"; fi
        printf '\n[[groups]]\nname = "bank"\nhealth_path = "/health"\n'
        if [[ -n "$group" ]]; then echo "$group"; fi
        for p in "$@"; do
            printf '\n[[groups.partitions]]\nname = "%s"\nurl = "%s"\n' "${p%%=*}" "${p#*=}"
        done
    } >"$file"
}

# A command that `start_regroup` runs the proxy under (e.g. valgrind and its options);
# empty: the proxy itself.
RG_WRAP=()

# Starts `regroup serve --config $2` (under RG_WRAP) with its output in $TMP/regroup-$1.out
# (stderr, the log, appended to $TMP/regroup-$1.out.err; RUST_LOG from REGROUP_LOG, default
# info); sets RG_PID, RG_URL and RG_ADMIN. Returns 1 when it exits before saying where it
# listens.
start_regroup() {
    local name="$1" config="$2" out="$TMP/regroup-$1.out" line
    : >"$out"
    RUST_LOG="${REGROUP_LOG:-info}" "${RG_WRAP[@]}" "$BIN" serve --config "$config" \
        >"$out" 2>>"$out.err" </dev/null &
    RG_PID="$!"
    disown "$RG_PID"
    PIDS+=("$RG_PID")
    line="$(wait_line "$out" '^regroup listening on ' "$RG_PID")" || return 1
    RG_URL="$(sed -E 's/^regroup listening on ([^ ]+) .*/\1/' <<<"$line")"
    RG_ADMIN="$(sed -E 's/.*\(admin ([^)]+)\).*/\1/' <<<"$line")"
}

# Prints an nginx config for directory $1 (pid, logs and temporary files there): the
# top-level lines $2 (the process model), then for each $3... given as PORT=HOST:PORT a
# plain keep-alive reverse proxy on 127.0.0.1:PORT to HOST:PORT (HTTP/1.1, `keepalive 64`,
# access log off).
nginx_config() {
    local dir="$1" top="$2" i=0 p
    shift 2
    [[ $EUID -eq 0 ]] && echo "user root;"
    echo "$top"
    cat <<CONF
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
CONF
    for p in "$@"; do
        i=$((i + 1))
        cat <<CONF
    upstream up$i {
        server ${p#*=};
        keepalive 64;
    }
    server {
        listen 127.0.0.1:${p%%=*};
        location / {
            proxy_pass http://up$i;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
CONF
    done
    echo "}"
}

# Prints $1 distinct free loopback ports (bound together, then released: picked one at a
# time, the kernel may hand the same port out twice).
free_ports() {
    python3 -c '
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))' "$1"
}

# The commit measured, with " (dirty)" when the worktree has changes.
commit_id() {
    echo "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
}

# One failover trial on the group behind admin $1 and proxy $2, whose banks are in BANK_URLS
# and BANK_PIDS (by partition name): waits (60 s) until the group has settled, then
# bench/failover.py trial SIGKILLs the primary's bank and sends one transfer at a time
# through the proxy until one answers 201; its JSON line goes to file $3. The killed bank is
# then started again on the same port and database. Sets VICTIM. Returns 1 when no update
# succeeded within 30 s of the kill.
kill_primary_trial() {
    local admin="$1" proxy="$2" out="$3" state pid url
    state="$(python3 "$ROOT/bench/failover.py" settle "$admin" --timeout 60)"
    VICTIM="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["primary"])' "$state")"
    pid="${BANK_PIDS[$VICTIM]}"
    url="${BANK_URLS[$VICTIM]}"
    if ! python3 "$ROOT/bench/failover.py" trial --pid "$pid" --victim "$VICTIM" \
        --proxy "$proxy" --max-time 6 --give-up 30 >"$out"; then
        echo "$SCRIPT: no successful update within 30 s of killing $VICTIM" >&2
        return 1
    fi
    restart_bank "$VICTIM" "$pid" "$url"
    BANK_PIDS[$VICTIM]="$BANK_PID"
}
