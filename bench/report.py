#!/usr/bin/env python3
"""The report of bench/run.sh: parses wrk outputs, takes medians, prints markdown.

    report.py RESULTS.tsv --rounds N --duration S [--nginx-version V] [--wrk-version V]
              [--commit C] [--loadavg L] [--command C] [--clk-tck HZ]
              [--catchup CATCHUP.jsonl] [--failover FAILOVER.tsv --failover-log LOG]
              [--catchup-pg CATCHUP-PG.jsonl --catchup-pg-window W --catchup-pg-accounts N]
              [--catchup-pg-left-out REASON]
    report.py --splice BENCHMARKS.md REPORT.md [SYNC]

RESULTS.tsv has one line per wrk run: target, round, path of wrk's output (with --latency;
a second wrk's output beside it as PATH.reads for the mixed load), the proxy's CPU time over
the run in clock ticks, and its resident set in kB after the run.
CATCHUP.jsonl has one line per catch-up trial (bench/catchup.py watch); its rate is held
against update-direct's (the application's own serialized update rate) of the same run.
CATCHUP-PG.jsonl is the same on PostgreSQL with conflict keys (group pg, `replay_window` W,
transfers over N accounts), held against update-pg-direct (the PostgreSQL bank's own
serialized update rate); its lines also carry `parallel` and `recorded` (bench/run.sh).
FAILOVER.tsv has one line per failover trial: round, the JSON line of bench/failover.py
trial; LOG is regroup three's log, for when the primary was marked unavailable and the
hand-over's took_ms.
--splice replaces what lies between `<!-- bench:begin -->` and `<!-- bench:end -->` in the
first file with the second file (appending the markers and the report when absent).
"""

import argparse
import datetime
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, splice as splice_between  # noqa: E402
from failover import parse_log, summary, trial_rows  # noqa: E402

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"

# Floors from BENCHMARKS.md: (label, numerator, denominator, metric, comparison, bound).
FLOORS = [
    ("reads: regroup / nginx throughput", "read-regroup", "read-nginx", "rps", ">=", 0.95),
    ("reads: regroup p99 / nginx p99", "read-regroup", "read-nginx", "p99", "<=", 1.2),
    ("reads: regroup / nginx CPU per request", "read-regroup", "read-nginx", "cpu_us", "<=", 1.0),
    ("health: regroup / nginx throughput", "health-regroup", "health-nginx", "rps", ">=", 0.95),
    ("health: regroup p99 / nginx p99", "health-regroup", "health-nginx", "p99", "<=", 1.2),
    ("health: regroup / nginx CPU per request", "health-regroup", "health-nginx", "cpu_us", "<=", 1.0),
    ("updates, one partition: regroup / direct throughput", "update-regroup1", "update-direct",
     "rps", ">=", 0.5),
    ("16 clients, one partition: regroup / direct throughput", "update16-regroup1",
     "update16-direct", "rps", ">=", 0.7),
    ("16 clients, three partitions: regroup / direct throughput", "update16-regroup",
     "update16-direct", "rps", ">=", 0.4),
    ("mixed, three partitions: regroup / direct updates/s", "mixed-regroup", "mixed-direct",
     "rps", ">=", 0.5),
]
# Issue 11's floor for the catch-up rate (records/s a returning replica replays) against the
# application's own serialized update rate (update-direct, or update-pg-direct for the
# catch-up on PostgreSQL with conflict keys, which is what the floor is for).
CATCHUP_FLOOR = 1.5
# The failover goal of BENCHMARKS.md ("Failover time"): median at most this many ms.
FAILOVER_GOAL_MS = 1000
# Further ratios, informative only.
RATIOS = [
    ("reads: nginx / direct throughput", "read-nginx", "read-direct", "rps"),
    ("reads: regroup / direct throughput", "read-regroup", "read-direct", "rps"),
    ("reads: regroup p99 / direct p99", "read-regroup", "read-direct", "p99"),
    ("health: nginx / direct throughput", "health-nginx", "health-direct", "rps"),
    ("health: regroup / direct throughput", "health-regroup", "health-direct", "rps"),
    ("health: regroup p99 / direct p99", "health-regroup", "health-direct", "p99"),
    ("updates, three partitions: regroup / direct throughput", "update-regroup", "update-direct",
     "rps"),
    ("updates: regroup p50 / direct p50", "update-regroup", "update-direct", "p50"),
    ("updates: regroup p99 / direct p99", "update-regroup", "update-direct", "p99"),
    ("mixed: regroup / direct reads/s", "mixed-regroup", "mixed-direct", "reads_rps"),
]
TARGETS = [
    ("read-regroup", "reads", "regroup (balanced over a, b, c)", "GET /accounts/1, wrk -t1 -c16"),
    ("read-nginx", "reads", "nginx -> a", "GET /accounts/1, wrk -t1 -c16"),
    ("read-direct", "reads", "a, direct", "GET /accounts/1, wrk -t1 -c16"),
    ("health-regroup", "reads, one partition", "regroup (one partition)", "GET /health, wrk -t2 -c32"),
    ("health-nginx", "reads, one partition", "nginx -> one", "GET /health, wrk -t2 -c32"),
    ("health-direct", "reads, one partition", "one, direct", "GET /health, wrk -t2 -c32"),
    ("update-regroup", "serialized updates", "regroup (journal + primary, 3 partitions)", "POST /transfers, wrk -t1 -c1"),
    ("update-regroup1", "serialized updates", "regroup (journal + one partition)", "POST /transfers, wrk -t1 -c1"),
    ("update-direct", "serialized updates", "solo bank, direct", "POST /transfers, wrk -t1 -c1"),
    ("update-pg-direct", "serialized updates", "pg-solo bank on PostgreSQL, direct", "POST /transfers, wrk -t1 -c1"),
    ("update16-regroup", "16-client updates", "regroup (3 partitions)", "POST /transfers, wrk -t2 -c16"),
    ("update16-regroup1", "16-client updates", "regroup (one partition)", "POST /transfers, wrk -t2 -c16"),
    ("update16-direct", "16-client updates", "solo bank, direct", "POST /transfers, wrk -t2 -c16"),
    ("mixed-regroup", "mixed", "regroup (3 partitions)", "POST /transfers wrk -t1 -c8 + GET /accounts/1 wrk -t1 -c32"),
    ("mixed-direct", "mixed", "solo bank, direct", "POST /transfers wrk -t1 -c8 + GET /accounts/1 wrk -t1 -c32"),
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
    m4 = re.search(r"^\s*(\d+) requests in ", text, re.M)
    requests = int(m4.group(1)) if m4 else 0
    return {"rps": float(m.group(1)), "p50": latency(50), "p99": latency(99), "failed": failed,
            "requests": requests}


def fmt_ms(v):
    return f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


def fmt_us(v):
    return "" if v is None else f"{v:.1f} us"


def fmt_mb(v):
    return "" if v is None else f"{v / 1024:.1f} MB"


def median_of(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def report(args):
    tick_us = 1e6 / float(args.clk_tck)
    runs = {}
    for line in open(args.results):
        target, rnd, path, ticks, rss = line.rstrip("\n").split("\t")
        r = parse_wrk(path)
        r["round"] = int(rnd)
        requests = r["requests"]
        r["reads_rps"] = None
        if os.path.exists(path + ".reads"):
            reads = parse_wrk(path + ".reads")
            r["reads_rps"] = reads["rps"]
            r["reads_p99"] = reads["p99"]
            r["failed"] += reads["failed"]
            requests += reads["requests"]
        has_proxy = not target.endswith("-direct")
        r["cpu_us"] = int(ticks) * tick_us / requests if has_proxy and requests else None
        r["rss_kb"] = int(rss) if has_proxy else None
        runs.setdefault(target, []).append(r)
    med = {
        t: {k: median_of(rs, k) for k in ("rps", "p50", "p99", "cpu_us", "rss_kb", "reads_rps",
                                           "reads_p99")}
        for t, rs in runs.items()
    }
    failed = {t: sum(r["failed"] for r in rs) for t, rs in runs.items()}

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = []
    out.append(f"### Results of {now}")
    out.append("")
    out.append(f"- command: `{args.command}`")
    out.append(f"- machine: `nproc` {len(os.sched_getaffinity(0))}, {cpu_model()}; "
               f"load average before the runs {args.loadavg}"
               + (f", after them {args.loadavg_after}" if args.loadavg_after else ""))
    out.append(f"- commit {args.commit}; nginx {args.nginx_version}; wrk {args.wrk_version}; "
               f"regroup `journal_sync = \"{args.journal_sync}\"`")
    out.append(f"- {args.rounds} interleaved rounds x {args.duration} s per target; "
               "figures are medians over the rounds; proxy CPU = utime + stime of the proxy's "
               "processes (regroup's, or nginx's master and workers) over the run / requests "
               "answered, RSS after the run")
    catchup = [json.loads(line) for line in open(args.catchup)] if args.catchup else []
    catchup_pg = [json.loads(line) for line in open(args.catchup_pg)] if args.catchup_pg else []
    failover = []
    if args.failover:
        for line in open(args.failover):
            rnd, doc = line.rstrip("\n").split("\t", 1)
            failover.append((int(rnd), json.loads(doc)))
    if catchup_pg:
        out.append(f"- catch-up on PostgreSQL (`catchup-pg`): group pg with conflict keys "
                   f"`body:/from`, `body:/to` on POST /transfers, `replay_window` "
                   f"{args.catchup_pg_window}; transfers between random distinct accounts of "
                   f"1..{args.catchup_pg_accounts}")
    if args.catchup_pg_left_out:
        out.append(f"- `catchup-pg` left out: {args.catchup_pg_left_out}")
    if failover:
        out.append(f"- failover: {len(failover)} SIGKILLs of regroup three's primary, spread "
                   "over the rounds; group three's heartbeat settings at their defaults")
    if runs:
        out.append("")
        out.append("| workload | target | generator | req/s | p50 | p99 | proxy CPU / req "
                   "| proxy RSS | req/s per round |")
        out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for t, kind, label, load in TARGETS:
        if t not in med:
            continue
        m = med[t]
        per_round = " ".join(f"{r['rps']:.0f}" for r in runs[t])
        rps = f"{m['rps']:.0f}"
        p99 = fmt_ms(m["p99"])
        if m["reads_rps"] is not None:
            rps = f"{m['rps']:.0f} updates + {m['reads_rps']:.0f} reads"
            p99 = f"{fmt_ms(m['p99'])} (reads {fmt_ms(m['reads_p99'])})"
            per_round = " ".join(f"{r['rps']:.0f}+{r['reads_rps']:.0f}" for r in runs[t])
        out.append(f"| {kind} | {label} | {load} | {rps} | {fmt_ms(m['p50'])} | {p99} | "
                   f"{fmt_us(m['cpu_us'])} | {fmt_mb(m['rss_kb'])} | {per_round} |")
    ratio_rows = []

    def ratio(a, b, metric):
        if a not in med or b not in med or med[a][metric] is None or not med[b][metric]:
            return None
        return med[a][metric] / med[b][metric]

    for label, a, b, metric, cmp, bound in FLOORS:
        v = ratio(a, b, metric)
        if v is None:
            continue
        ratio_rows.append(floor_row(label, v, ">=" if cmp == ">=" else "<=", bound))
    # The catch-up rate against the application's own serialized update rate.
    direct = med.get("update-direct", {}).get("rps")
    rates = [c["rate"] for c in catchup if c.get("rate") is not None]
    if rates and direct:
        ratio_rows.append(floor_row("catch-up: replica's catch-up rate / direct serialized "
                                    "update rate", statistics.median(rates) / direct, ">=",
                                    CATCHUP_FLOOR))
    direct_pg = med.get("update-pg-direct", {}).get("rps")
    rates_pg = [c["rate"] for c in catchup_pg if c.get("rate") is not None]
    if rates_pg and direct_pg:
        ratio_rows.append(floor_row("catch-up on PostgreSQL with conflict keys: replica's rate "
                                    "/ PG bank's direct serialized rate",
                                    statistics.median(rates_pg) / direct_pg, ">=",
                                    CATCHUP_FLOOR))
    for label, a, b, metric in RATIOS:
        v = ratio(a, b, metric)
        if v is not None:
            ratio_rows.append(f"| {label} | {v:.2f}x | | |")
    replay = [c["replay_rate"] for c in catchup if c.get("replay_rate") is not None]
    if replay and direct:
        ratio_rows.append("| catch-up: replay alone (first record -> head) / direct serialized "
                          f"update rate | {statistics.median(replay) / direct:.2f}x | | |")
    replay_pg = [c["replay_rate"] for c in catchup_pg if c.get("replay_rate") is not None]
    if replay_pg and direct_pg:
        ratio_rows.append("| catch-up on PostgreSQL with conflict keys: replay alone / PG bank's "
                          f"direct serialized rate | {statistics.median(replay_pg) / direct_pg:.2f}x "
                          "| | |")
    if direct_pg and direct:
        ratio_rows.append(f"| serialized updates: PG bank / SQLite bank, direct | "
                          f"{direct_pg / direct:.2f}x | | |")
    if ratio_rows:
        out.append("")
        out.append("| ratio | value | floor | met |")
        out.append("| --- | ---: | ---: | --- |")
        out.extend(ratio_rows)
    # Rounds are interleaved, so each round compares targets under the same conditions: the
    # per-round ratios show how much of a verdict is noise.
    paired = []
    for label, a, b, metric, _cmp, _bound in FLOORS:
        if metric not in ("rps", "cpu_us") or a not in runs or b not in runs:
            continue
        rs = [x[metric] / y[metric] for x, y in zip(runs[a], runs[b])
              if x[metric] is not None and y[metric]]
        if rs:
            paired.append(f"{label}: " + " ".join(f"{r:.2f}" for r in rs)
                          + f" (median {statistics.median(rs):.2f}x)")
    by_round = {r["round"]: r["rps"] for r in runs.get("update-direct", [])}
    by_round_pg = {r["round"]: r["rps"] for r in runs.get("update-pg-direct", [])}
    for label, trials, direct_by in (
            ("catch-up rate / direct serialized update rate", catchup, by_round),
            ("catch-up on PostgreSQL with conflict keys / PG bank's direct serialized rate",
             catchup_pg, by_round_pg)):
        per_round = [(c["round"], c["rate"] / direct_by[c["round"]]) for c in trials
                     if c.get("rate") is not None and direct_by.get(c["round"])]
        if per_round:
            paired.append(f"{label}: "
                          + " ".join(f"{v:.2f}" for _r, v in per_round)
                          + f" (median {statistics.median(v for _r, v in per_round):.2f}x)")
    if paired:
        out.append("")
        out.append("Per-round ratios (same round, same conditions): " + "; ".join(paired) + ".")
    bad = {t: n for t, n in failed.items() if n}
    if bad:
        out.append("")
        out.append("**Failed requests** (non-2xx answers or socket errors, all rounds): "
                   + ", ".join(f"{t} {n}" for t, n in sorted(bad.items())))
    if catchup:
        out.extend(catchup_section(catchup, by_round, direct, CATCHUP_INTRO))
    if catchup_pg:
        out.extend(catchup_section(catchup_pg, by_round_pg, direct_pg, CATCHUP_PG_INTRO.format(
            window=args.catchup_pg_window, accounts=args.catchup_pg_accounts), parallel=True))
    if failover:
        out.extend(failover_section(failover, parse_log(args.failover_log)
                                    if args.failover_log else []))
    print("\n".join(out))


def floor_row(label, v, cmp, bound):
    ok = v >= bound if cmp == ">=" else v <= bound
    shown = f"{v:.2f}" if f"{v:.2f}" != f"{bound:.2f}" else f"{v:.3f}"
    return f"| {label} | {shown}x | {cmp} {bound}x | {'yes' if ok else '**NO**'} |"


def fmt_rate(v):
    return "-" if v is None else f"{v:.0f}/s"


def fmt_s(v):
    return "-" if v is None else f"{v:.2f} s"


CATCHUP_INTRO = (
    "Catch-up (`catchup`): a replica of regroup three SIGKILLed, transfers pushed "
    "through regroup three meanwhile (bench/catchup.py push: one at a time, keep-alive), "
    "the replica started again on its "
    "port and database; timed from its return until admin `/status` shows it applied "
    "the head (polled every 50 ms). Catch-up rate = records behind / (return -> head); "
    "replay alone = from the first poll that saw it apply a record to the head. "
    "\"direct\" is update-direct (solo bank, wrk -t1 -c1) of the same round.")
CATCHUP_PG_INTRO = (
    "Catch-up on PostgreSQL with conflict keys (`catchup-pg`): the same trial on regroup pg "
    "(banks pg-a, pg-b, pg-c, each on its own PostgreSQL database; conflict keys `body:/from`, "
    "`body:/to` on POST /transfers; `replay_window` {window}), the transfers between two "
    "distinct accounts drawn at random from 1..{accounts}, so that most are independent and "
    "the returning replica replays them in parallel. \"direct\" is update-pg-direct (the "
    "pg-solo bank on its own PostgreSQL database, wrk -t1 -c1) of the same round. \"in "
    "parallel\" counts the trial's records the replica took while records before them were "
    "still on their way (`regroup_applied.floor` below the seq right before them), of those "
    "it recorded. After each trial the three copies' `account` and `transfer` rows were "
    "compared and found identical.")


def catchup_section(catchup, direct_by_round, direct, intro, parallel=False):
    """The catch-up trials: one row per round, then the medians."""
    extra = " in parallel |" if parallel else ""
    out = ["", intro, "",
           "| round | replica | records behind | push through regroup | return -> first "
           "record | return -> head | catch-up rate | replay alone | direct serialized "
           "updates (same round) | catch-up / direct |" + extra,
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
           + (" ---: |" if parallel else "")]
    for c in catchup:
        d = direct_by_round.get(c["round"])
        ratio = f"{c['rate'] / d:.2f}x" if c.get("rate") and d else "-"
        push = (f"{c['pushed']} in {c['push_s']:.0f} s ({c['push_rps']:.0f}/s)"
                if c.get("pushed") is not None else "-")
        if c.get("push_failed"):
            push += f", **{c['push_failed']} failed**"
        cells = ""
        if parallel:
            cells = (f" {c['parallel']} of {c['recorded']} |" if c.get("recorded") is not None
                     else " - |")
        out.append(f"| {c['round'] + 1} | {c['partition']} | {c['behind']} | {push} "
                   f"| {fmt_s(c['first_s'])} | {fmt_s(c['done_s'])} | {fmt_rate(c['rate'])} "
                   f"| {fmt_rate(c['replay_rate'])} | {fmt_rate(d)} | {ratio} |" + cells)

    def med(key):
        vals = [c[key] for c in catchup if c.get(key) is not None]
        return statistics.median(vals) if vals else None

    rate = med("rate")
    ratio = f"{rate / direct:.2f}x" if rate and direct else "-"
    out.append(f"| median | | {med('behind'):.0f} | | {fmt_s(med('first_s'))} "
               f"| {fmt_s(med('done_s'))} | {fmt_rate(rate)} | {fmt_rate(med('replay_rate'))} "
               f"| {fmt_rate(direct)} | {ratio} |" + (" |" if parallel else ""))
    missed = [c for c in catchup if c.get("done_s") is None]
    if missed:
        out.append("")
        out.append(f"**{len(missed)} replica(s) did not reach the head in time**: "
                   + ", ".join(f"round {c['round'] + 1} {c['partition']} at "
                               f"{c.get('applied_at_timeout')} of {c['head']}" for c in missed))
    return out


def failover_section(failover, events):
    """The failover trials: median, max, min, and every trial."""
    trials = [t for _r, t in failover]
    rows = trial_rows(trials, events, tail_s=1.0)
    stats = summary(rows)
    out = ["", "Failover (`failover`): SIGKILL of regroup three's primary bank, then one "
           "`POST /transfers` at a time through regroup three (a fresh connection each, "
           "time-out 6 s; bench/failover.py trial) until one answers 201; failover time = "
           "kill -> that 201. The killed bank is started again on its port and database "
           "and catches up before the next target.", "",
           "| | failover time | kill -> primary `unavailable` (proxy log) "
           "| hand-over `took_ms` (proxy log) |",
           "| --- | ---: | ---: | ---: |"]
    for i, label in enumerate(("median", "max", "min")):
        cells = [f"{stats[k][i]:.0f} ms" if k in stats else "-"
                 for k in ("total", "detect", "took")]
        out.append(f"| {label} | {' | '.join(cells)} |")
    totals = [r["total"] for r in rows if r["total"] is not None]
    med = statistics.median(totals) if totals else None
    goal = med is not None and med <= FAILOVER_GOAL_MS and len(totals) == len(rows)
    every = ", ".join(f"{r['victim']} -> {r['to']} {r['total']:.0f} ms (round {rnd + 1})"
                      for (rnd, _t), r in zip(failover, rows) if r["total"] is not None)
    non201 = [(r["n"], a) for r in rows for a in r["bad"]]
    out.append("")
    out.append(f"Goal median <= {FAILOVER_GOAL_MS} ms: **{'met' if goal else 'NOT met'}** "
               f"({len(totals)} of {len(rows)} trials answered). Every trial: {every}.")
    out.append("")
    if non201:
        out.append(f"**Updates that failed instead of waiting: {len(non201)}** ("
                   + "; ".join(f"trial {n}: {a['status'] or 'no answer'} after "
                               f"{a['end_ms'] - a['start_ms']:.0f} ms" for n, a in non201)
                   + ").")
    else:
        out.append("Every first update after a kill waited for the failover and got 201.")
    doubt = [r["n"] for r in rows if any("in doubt**" in n for n in r["notes"])]
    if doubt:
        out.append(f"The first update went in doubt in trial(s) {', '.join(map(str, doubt))}.")
    return out


def splice(doc_path, report_path, sync="full"):
    begin, end = (BEGIN, END) if sync == "full" else (
        f"<!-- bench-{sync}:begin -->", f"<!-- bench-{sync}:end -->")
    splice_between(doc_path, report_path, begin, end)


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
    p.add_argument("--loadavg-after")
    p.add_argument("--journal-sync", default="full")
    p.add_argument("--command", default="bench/run.sh")
    p.add_argument("--clk-tck", default="100")
    p.add_argument("--catchup", help="catch-up trials, one JSON line each")
    p.add_argument("--failover", help="failover trials: round, tab, JSON line")
    p.add_argument("--failover-log", help="regroup three's log")
    p.add_argument("--catchup-pg", help="catch-up trials on PostgreSQL, one JSON line each")
    p.add_argument("--catchup-pg-window", default="8 (the default)",
                   help="group pg's replay_window")
    p.add_argument("--catchup-pg-accounts", default="64",
                   help="accounts the catchup-pg transfers are spread over")
    p.add_argument("--catchup-pg-left-out", help="why catchup-pg was left out of a full run")
    report(p.parse_args())


if __name__ == "__main__":
    main()
