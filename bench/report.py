#!/usr/bin/env python3
"""The report of bench/run.sh: parses wrk outputs, takes medians, prints markdown.

    report.py RESULTS.tsv --rounds N --duration S [--nginx-version V] [--wrk-version V]
              [--commit C] [--loadavg L]
    report.py --splice BENCHMARKS.md REPORT.md

RESULTS.tsv has one line per wrk run: target, round, path of wrk's output (with --latency).
--splice replaces what lies between `<!-- bench:begin -->` and `<!-- bench:end -->` in the
first file with the second file (appending the markers and the report when absent).
"""

import argparse
import datetime
import os
import re
import statistics
import sys

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"

# Floors from BENCHMARKS.md: (label, numerator, denominator, metric, comparison, bound).
FLOORS = [
    ("reads: regroup / nginx throughput", "read-regroup", "read-nginx", "rps", ">=", 0.8),
    ("reads: regroup p99 / nginx p99", "read-regroup", "read-nginx", "p99", "<=", 2.0),
    ("updates: regroup / direct throughput", "update-regroup", "update-direct", "rps", ">=", 0.5),
]
# Further ratios, informative only.
RATIOS = [
    ("reads: nginx / direct throughput", "read-nginx", "read-direct", "rps"),
    ("reads: regroup / direct throughput", "read-regroup", "read-direct", "rps"),
    ("reads: nginx p99 / direct p99", "read-nginx", "read-direct", "p99"),
    ("reads: regroup p99 / direct p99", "read-regroup", "read-direct", "p99"),
    ("updates: regroup p50 / direct p50", "update-regroup", "update-direct", "p50"),
    ("updates: regroup p99 / direct p99", "update-regroup", "update-direct", "p99"),
]
TARGETS = [
    ("read-regroup", "reads", "regroup (balanced over a, b, c)", "GET /accounts/1, wrk -t1 -c16"),
    ("read-nginx", "reads", "nginx -> a", "GET /accounts/1, wrk -t1 -c16"),
    ("read-direct", "reads", "a, direct", "GET /accounts/1, wrk -t1 -c16"),
    ("update-regroup", "updates", "regroup (journal + primary a)", "POST /transfers, wrk -t1 -c1"),
    ("update-direct", "updates", "solo bank, direct", "POST /transfers, wrk -t1 -c1"),
]
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(path):
    """Requests/s, p50 and p99 in ms, and the count of failed answers of one wrk run."""
    text = open(path).read()

    def latency(pct):
        m = re.search(r"^\s*%s%%\s+([\d.]+)(us|ms|s|m)\s*$" % pct, text, re.M)
        if not m:
            raise SystemExit(f"{path}: no {pct}% latency in wrk's output:\n{text}")
        return float(m.group(1)) * UNIT_MS[m.group(2)]

    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not m:
        raise SystemExit(f"{path}: no Requests/sec in wrk's output:\n{text}")
    failed = 0
    m2 = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m2:
        failed += int(m2.group(1))
    m3 = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m3:
        failed += sum(int(g) for g in m3.groups())
    return {"rps": float(m.group(1)), "p50": latency(50), "p99": latency(99), "failed": failed}


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def fmt_ms(v):
    return f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


def report(args):
    runs = {}
    for line in open(args.results):
        target, _round, path = line.rstrip("\n").split("\t")
        runs.setdefault(target, []).append(parse_wrk(path))
    med = {
        t: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
        for t, rs in runs.items()
    }
    failed = {t: sum(r["failed"] for r in rs) for t, rs in runs.items()}

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = []
    out.append(f"### Results of {now}")
    out.append("")
    out.append(f"- machine: `nproc` {len(os.sched_getaffinity(0))}, {cpu_model()}; "
               f"load average before the runs {args.loadavg}")
    out.append(f"- commit {args.commit}; nginx {args.nginx_version}; wrk {args.wrk_version}; "
               f"regroup `journal_sync = \"{args.journal_sync}\"`")
    out.append(f"- {args.rounds} interleaved rounds x {args.duration} s per target; "
               "figures are medians over the rounds")
    out.append("")
    out.append("| workload | target | generator | req/s | p50 | p99 | req/s per round |")
    out.append("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for t, kind, label, load in TARGETS:
        if t not in med:
            continue
        m = med[t]
        per_round = " ".join(f"{r['rps']:.0f}" for r in runs[t])
        out.append(f"| {kind} | {label} | {load} | {m['rps']:.0f} | {fmt_ms(m['p50'])} | "
                   f"{fmt_ms(m['p99'])} | {per_round} |")
    out.append("")
    out.append("| ratio | value | floor | met |")
    out.append("| --- | ---: | ---: | --- |")
    for label, a, b, metric, cmp, bound in FLOORS:
        v = med[a][metric] / med[b][metric]
        ok = v >= bound if cmp == ">=" else v <= bound
        shown = f"{v:.2f}" if f"{v:.2f}" != f"{bound:.2f}" else f"{v:.3f}"
        out.append(f"| {label} | {shown}x | {cmp} {bound}x | {'yes' if ok else '**NO**'} |")
    for label, a, b, metric in RATIOS:
        v = med[a][metric] / med[b][metric]
        out.append(f"| {label} | {v:.2f}x | | |")
    # Rounds are interleaved, so each round compares targets under the same conditions: the
    # per-round ratios show how much of a verdict is noise.
    paired = []
    for label, a, b, metric, _cmp, _bound in FLOORS:
        if metric != "rps" or a not in runs or b not in runs:
            continue
        rs = [x[metric] / y[metric] for x, y in zip(runs[a], runs[b]) if y[metric]]
        if rs:
            paired.append(f"{label}: " + " ".join(f"{r:.2f}" for r in rs)
                          + f" (median {statistics.median(rs):.2f}x)")
    if paired:
        out.append("")
        out.append("Per-round ratios (same round, same conditions): " + "; ".join(paired) + ".")
    bad = {t: n for t, n in failed.items() if n}
    if bad:
        out.append("")
        out.append("**Failed requests** (non-2xx answers or socket errors, all rounds): "
                   + ", ".join(f"{t} {n}" for t, n in sorted(bad.items())))
    print("\n".join(out))


def splice(doc_path, report_path, sync="full"):
    begin, end = (BEGIN, END) if sync == "full" else (
        f"<!-- bench-{sync}:begin -->", f"<!-- bench-{sync}:end -->")
    body = open(report_path).read().rstrip("\n")
    doc = open(doc_path).read() if os.path.exists(doc_path) else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc = head + block + tail
    else:
        doc = doc.rstrip("\n") + ("\n\n" if doc else "") + block + "\n"
    with open(doc_path, "w") as f:
        f.write(doc)


def main():
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--splice":
        splice(*sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--rounds", required=True)
    p.add_argument("--duration", required=True)
    p.add_argument("--nginx-version", default="unknown")
    p.add_argument("--wrk-version", default="unknown")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--loadavg", default="unknown")
    p.add_argument("--journal-sync", default="full")
    report(p.parse_args())


if __name__ == "__main__":
    main()
