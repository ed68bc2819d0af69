# bench/lib.sh: shell helpers shared by bench/run.sh and bench/failover.sh (sourced, not run).
# The sourcing script sets SCRIPT (its name, for messages) and defines log().

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
