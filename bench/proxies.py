#!/usr/bin/env python3
"""The helper of bench/proxies.sh: which proxy leads, the report, NATS clean-up.

    proxies.py leader ADMIN [ADMIN...] [--timeout S]
        Waits until one of the proxies (their admin base URLs) says in `/status` that it
        leads; prints its index (0-based). Exit 1 after --timeout seconds (30).
    proxies.py report RESULTS.tsv TRIALS.tsv --rounds N --duration S --lease-ms MS
                      [--command C] [--commit C] [--loadavg L] [--nats-version V]
                      [--wrk-version V]
        Prints the markdown report. RESULTS.tsv: journal, mode (serial or c16), round, path
        of wrk's output (with --latency). TRIALS.tsv: journal, the JSON line of
        bench/failover.py trial.
    proxies.py splice BENCHMARKS.md REPORT.md
        Replaces what lies between `<!-- proxies:begin -->` and `<!-- proxies:end -->`
        (appends a `## Several proxies` section with the markers when they are absent).
    proxies.py delete-prefix HOST:PORT PREFIX
        Deletes the journal streams and buckets of PREFIX on the NATS server (raw NATS
        protocol: no client library needed).
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, splice  # noqa: E402
from report import parse_wrk  # noqa: E402

BEGIN = "<!-- proxies:begin -->"
END = "<!-- proxies:end -->"
JOURNALS = [
    ("sqlite", "SQLite file (`journal_sync = \"full\"`)"),
    ("nats-1", "NATS, one server (127.0.0.1:4222)"),
    ("nats-3", "NATS, 3-node cluster on loopback (3 replicas)"),
]
MODES = [
    ("serial", "POST /transfers, wrk -t1 -c1"),
    ("c16", "POST /transfers, wrk -t2 -c16"),
]


def fmt_ms(v):
    return f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


# --- leader ---------------------------------------------------------------------------------
def leader(args):
    deadline = time.monotonic() + args.timeout
    last = {}
    while True:
        for i, admin in enumerate(args.admins):
            try:
                with urllib.request.urlopen(admin.rstrip("/") + "/status", timeout=2) as r:
                    proxy = json.load(r).get("proxy") or {}
                last[admin] = proxy.get("role")
                if proxy.get("role") == "leader":
                    print(i)
                    return 0
            except (OSError, ValueError) as e:
                last[admin] = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            print(f"proxies.py: no proxy leads after {args.timeout} s: {last}", file=sys.stderr)
            return 1
        time.sleep(0.05)


# --- report ---------------------------------------------------------------------------------
def report(args):
    runs = {}
    for line in open(args.results):
        journal, mode, _round, path = line.rstrip("\n").split("\t")
        runs.setdefault((journal, mode), []).append(parse_wrk(path))
    med = {
        k: {m: statistics.median(r[m] for r in rs) for m in ("rps", "p50", "p99")}
        for k, rs in runs.items()
    }
    trials = {}
    for line in open(args.trials):
        journal, doc = line.rstrip("\n").split("\t", 1)
        trials.setdefault(journal, []).append(json.loads(doc))

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"### Results of {now}", ""]
    out.append(f"- machine: `nproc` {len(os.sched_getaffinity(0))}, {cpu_model()}; "
               f"load average before the runs {args.loadavg}")
    out.append(f"- commit {args.commit}; {args.nats_version}; wrk {args.wrk_version}; "
               f"`{args.command}`")
    out.append("- two `regroup serve` per journal (`proxies = \"several\"`, "
               f"`journal_lease_ms = {args.lease_ms}`), load sent to the leader, the follower "
               "up; three bank partitions per journal")
    out.append(f"- {args.rounds} interleaved rounds x {args.duration} s per journal and "
               "generator; figures are medians over the rounds")
    out.append("")
    out.append("| journal | generator | req/s | p50 | p99 | req/s per round | vs SQLite |")
    out.append("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for mode, gen in MODES:
        for journal, label in JOURNALS:
            k = (journal, mode)
            if k not in med:
                continue
            m = med[k]
            per_round = " ".join(f"{r['rps']:.0f}" for r in runs[k])
            base = med.get(("sqlite", mode))
            ratio = f"{m['rps'] / base['rps']:.2f}x" if base and base["rps"] else ""
            out.append(f"| {label} | {gen} | {m['rps']:.0f} | {fmt_ms(m['p50'])} | "
                       f"{fmt_ms(m['p99'])} | {per_round} | {ratio} |")
    # Paired per-round ratios: the same round runs every journal under the same conditions.
    paired = []
    for mode, _gen in MODES:
        base = runs.get(("sqlite", mode), [])
        for journal, _label in JOURNALS[1:]:
            rs = [x["rps"] / y["rps"] for x, y in zip(runs.get((journal, mode), []), base)
                  if y["rps"]]
            if rs:
                paired.append(f"{journal}/sqlite {mode}: " + " ".join(f"{r:.2f}" for r in rs))
    if paired:
        out.append("")
        out.append("Per-round ratios of throughput: " + "; ".join(paired) + ".")
    failed = {f"{j} {m}": sum(r["failed"] for r in rs) for (j, m), rs in runs.items()}
    bad = {k: n for k, n in failed.items() if n}
    if bad:
        out.append("")
        out.append("**Failed requests** (non-2xx answers or socket errors, all rounds): "
                   + ", ".join(f"{k} {n}" for k, n in sorted(bad.items())))

    out.append("")
    out.append("Leader failover: SIGKILL of the leading proxy to the first 201 through the "
               "other one (one transfer at a time, a fresh connection each).")
    out.append("")
    out.append("| journal | trials | median | max | min | every trial (ms) | non-201 answers |")
    out.append("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for journal, label in JOURNALS:
        ts = trials.get(journal, [])
        if not ts:
            continue
        ms = [t["total_ms"] for t in ts]
        non201 = sum(1 for t in ts for a in t["attempts"] if a["status"] not in (201, None))
        out.append(f"| {label} | {len(ms)} | {statistics.median(ms):.0f} ms | {max(ms):.0f} ms"
                   f" | {min(ms):.0f} ms | {' '.join(f'{v:.0f}' for v in ms)} | {non201} |")
    print("\n".join(out))


# --- delete-prefix --------------------------------------------------------------------------
def js_request(sock, buf, subject, inbox, sid):
    """One JetStream API request on a raw NATS connection; the reply's JSON."""
    sock.sendall(f"PUB {subject} {inbox} 0\r\n\r\n".encode())
    while True:
        while b"\r\n" not in buf:
            buf += sock.recv(65536)
        line, rest = buf.split(b"\r\n", 1)
        buf = rest
        if line.startswith(b"PING"):
            sock.sendall(b"PONG\r\n")
        elif line.startswith(b"MSG "):
            size = int(line.split()[-1])
            while len(buf) < size + 2:
                buf += sock.recv(65536)
            payload, buf = buf[:size], buf[size + 2:]
            return json.loads(payload or b"{}"), buf
        elif line.startswith(b"-ERR"):
            raise OSError(line.decode())


def delete_prefix(args):
    host, port = args.server.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        buf = b""
        while b"\r\n" not in buf:
            buf += sock.recv(65536)
        buf = buf.split(b"\r\n", 1)[1]  # the server's INFO
        inbox = f"_INBOX.bench{os.getpid()}"
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"bench"}\r\n')
        sock.sendall(f"SUB {inbox} 1\r\n".encode())
        names, buf = js_request(sock, buf, "$JS.API.STREAM.NAMES", inbox, 1)
        doomed = [n for n in names.get("streams") or []
                  if n.startswith(f"{args.prefix}_G_")
                  or n in (f"KV_{args.prefix}_LEASE", f"KV_{args.prefix}_CHECKPOINTS")]
        for name in doomed:
            answer, buf = js_request(sock, buf, f"$JS.API.STREAM.DELETE.{name}", inbox, 1)
            if not answer.get("success"):
                print(f"proxies.py: deleting stream {name}: {answer}", file=sys.stderr)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("leader")
    lp.add_argument("admins", nargs="+")
    lp.add_argument("--timeout", type=float, default=30)
    rp = sub.add_parser("report")
    rp.add_argument("results")
    rp.add_argument("trials")
    rp.add_argument("--rounds", required=True)
    rp.add_argument("--duration", required=True)
    rp.add_argument("--lease-ms", required=True)
    rp.add_argument("--command", default="bench/proxies.sh")
    rp.add_argument("--commit", default="unknown")
    rp.add_argument("--loadavg", default="unknown")
    rp.add_argument("--nats-version", default="nats-server unknown")
    rp.add_argument("--wrk-version", default="unknown")
    sp = sub.add_parser("splice")
    sp.add_argument("doc")
    sp.add_argument("report")
    dp = sub.add_parser("delete-prefix")
    dp.add_argument("server")
    dp.add_argument("prefix")
    args = p.parse_args()
    if args.cmd == "splice":
        splice(args.doc, args.report, BEGIN, END, "Several proxies")
        return 0
    return {"leader": leader, "report": report, "delete-prefix": delete_prefix}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
