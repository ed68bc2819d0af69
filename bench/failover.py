#!/usr/bin/env python3
"""The helper of bench/failover.sh: group state, one timed trial, the report.

    failover.py settle ADMIN [--timeout S]
        Waits until every partition of group 0 is `available`, has applied the journal's
        head and nothing is in doubt; prints one JSON line (primary, epoch, head, partitions
        name -> url). Exit 1 with the last state on stderr after --timeout seconds (60).
    failover.py trial --pid PID --victim NAME --proxy URL [--max-time S] [--give-up S]
        SIGKILLs PID, takes the kill time (monotonic clock, and the wall clock for the log),
        then sends `POST /transfers {"from":1,"to":2,"amount":1}` through the proxy, one at
        a time, each with a client time-out of --max-time seconds (6), until one answers
        201; prints one JSON line: total_ms (kill -> the 201 answer), every attempt (status,
        start and end in ms after the kill, body of a non-201 answer). Exit 1 when no 201
        came within --give-up seconds (30).
    failover.py report TRIALS.jsonl PROXY.log --interval MS --timeout MS --retries N
                       [--command C] [--commit C] [--loadavg L]
        Prints the markdown report: per-trial figures, median, max, min, the proxy's own
        `failover: primary role moved ... took_ms=N` lines and the time from the kill to
        the proxy marking the primary `unavailable` (from its log), and every non-201 answer
        and every WARN/ERROR message of the proxy's log, counted.
    failover.py brief TRIAL.json
        One line on one trial: its failover time and how many requests it took.
    failover.py splice BENCHMARKS.md REPORT.md
        Replaces what lies between `<!-- failover:begin -->` and `<!-- failover:end -->`
        (appends a `## Failover time` section with the markers when they are absent).
"""

import argparse
import datetime
import http.client
import json
import os
import re
import signal
import statistics
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, splice  # noqa: E402

BEGIN = "<!-- failover:begin -->"
END = "<!-- failover:end -->"
BODY = b'{"from":1,"to":2,"amount":1}'


# --- settle ---------------------------------------------------------------------------------
def group_state(admin):
    with urllib.request.urlopen(admin.rstrip("/") + "/status", timeout=2) as r:
        return json.load(r)["groups"][0]


def settle(args):
    deadline = time.monotonic() + args.timeout
    last = None
    while True:
        try:
            g = group_state(args.admin)
            last = g
            ok = (not g["in_doubt"]
                  and all(p["status"] == "available" and p["applied"] == g["head"]
                          for p in g["partitions"]))
            if ok:
                print(json.dumps({
                    "primary": g["primary"], "epoch": g["epoch"], "head": g["head"],
                    "urls": {p["name"]: p["url"] for p in g["partitions"]},
                }))
                return 0
        except (OSError, ValueError, KeyError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            if isinstance(last, dict):
                last = "primary %s, head %s, in doubt %s; %s" % (
                    last["primary"], last["head"], last["in_doubt"],
                    ", ".join("%s %s applied %s (%s)" % (p["name"], p["status"], p["applied"],
                                                         p.get("reason", ""))
                              for p in last["partitions"]))
            print(f"failover.py: the group did not settle within {args.timeout} s: {last}",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)


# --- trial ----------------------------------------------------------------------------------
def trial(args):
    url = urllib.parse.urlsplit(args.proxy)
    # A fresh connection per attempt (~0.1 ms on loopback): nothing of the client's
    # connection state carries over from before the kill.
    os.kill(args.pid, signal.SIGKILL)
    t0 = time.monotonic()
    wall0 = time.time()
    attempts = []
    while True:
        start = time.monotonic()
        status, body = None, ""
        try:
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=args.max_time)
            conn.request("POST", "/transfers", body=BODY,
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            status = resp.status
            data = resp.read()
            conn.close()
            if status != 201:
                body = data.decode("utf-8", "replace")[:300]
        except OSError as e:  # time-out, refused, reset
            body = f"{type(e).__name__}: {e}"
        end = time.monotonic()
        attempts.append({
            "status": status,
            "start_ms": round((start - t0) * 1000, 3),
            "end_ms": round((end - t0) * 1000, 3),
            **({"body": body} if status != 201 else {}),
        })
        if status == 201:
            print(json.dumps({"victim": args.victim, "total_ms": round((end - t0) * 1000, 3),
                              "kill_wall": wall0, "attempts": attempts}))
            return 0
        if end - t0 > args.give_up:
            print(json.dumps({"victim": args.victim, "total_ms": None, "kill_wall": wall0,
                              "attempts": attempts}))
            print(f"failover.py: no 201 within {args.give_up} s of the kill", file=sys.stderr)
            return 1
        time.sleep(0.01)


# --- report ---------------------------------------------------------------------------------
LOG_LINE = re.compile(r"^(\S+Z)\s+(TRACE|DEBUG|INFO|WARN|ERROR)\s+(\S+?):\s+(.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_log(path):
    """(wall time, level, target, message, fields) of every event line of the proxy's log."""
    events = []
    for raw in open(path, errors="replace"):
        line = ANSI.sub("", raw.rstrip("\n"))
        m = LOG_LINE.match(line)
        if not m:
            continue
        ts, level, target, rest = m.groups()
        try:
            when = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        # `message key=value key=value ...`; a value runs to the next ` key=` (values such
        # as `reason=` hold spaces and are not quoted).
        parts = re.split(r"\s(?=[A-Za-z_]+=)", rest)
        msg = parts[0].strip()
        fields = {}
        for part in parts[1:]:
            k, _, v = part.partition("=")
            fields[k] = v.strip().strip('"')
        events.append((when, level, target, msg, fields))
    return events


def fmt(v):
    return "-" if v is None else f"{v:.0f}"


def trial_rows(trials, events, tail_s=None):
    """One row per trial (the JSON lines of `trial`), with what the proxy's log `events`
    (from parse_log) said between its kill and the next one: when the role moved, to whom,
    its `took_ms`, when the victim was marked `unavailable`, and notes on updates. With
    `tail_s`, a trial's window ends `tail_s` seconds after its first 201 at the latest (when
    other work runs between the trials, as in bench/run.sh)."""
    moved = [e for e in events if e[3] == "failover: primary role moved"]
    down = [e for e in events if e[3] == "partition status changed"
            and e[4].get("to") == "unavailable"]

    rows = []
    for i, t in enumerate(trials):
        kill = t["kill_wall"]
        nxt = trials[i + 1]["kill_wall"] if i + 1 < len(trials) else float("inf")
        if tail_s is not None and t["total_ms"] is not None:
            nxt = min(nxt, kill + t["total_ms"] / 1000 + tail_s)
        # The proxy's own lines between this kill and the next one.
        mv = next((e for e in moved if kill <= e[0] < nxt), None)
        dn = next((e for e in down if kill <= e[0] < nxt and e[4].get("partition") == t["victim"]),
                  None)
        bad = [a for a in t["attempts"] if a["status"] != 201]
        # What the proxy said about updates in this trial (beyond the role move itself).
        notes = []
        for e in events:
            if not kill <= e[0] < nxt:
                continue
            if e[3] == "primary unreachable; waiting for the role to move":
                notes.append("primary refused the connection; update waited")
            elif e[3].startswith("update in doubt"):
                notes.append("update **in doubt** (%s)" % e[4].get("reason", "?"))
            elif e[3].startswith("in-doubt update settled"):
                notes.append("in doubt settled on %s, status %s"
                             % (e[4].get("partition", "?"), e[4].get("status", "?")))
            elif e[1] in ("WARN", "ERROR") and e[3] != "failover: primary role moved":
                notes.append(f"{e[1]} {e[3]}")
        rows.append({
            "n": i + 1,
            "victim": t["victim"],
            "to": mv[4].get("to") if mv else "?",
            "total": t["total_ms"],
            "detect": (dn[0] - kill) * 1000 if dn else None,
            "took": float(mv[4]["took_ms"]) if mv and "took_ms" in mv[4] else None,
            "moved_at": (mv[0] - kill) * 1000 if mv else None,
            "attempts": len(t["attempts"]),
            "bad": bad,
            "notes": notes,
        })
    return rows


def summary(rows):
    """Medians, maxima and minima of the rows' failover time (`total`), kill ->
    `unavailable` (`detect`) and hand-over `took_ms` (`took`): {key: (median, max, min)},
    a key absent when no row has it."""
    out = {}
    for key in ("total", "detect", "took"):
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            out[key] = (statistics.median(vals), max(vals), min(vals))
    return out


def report(args):
    trials = [json.loads(line) for line in open(args.trials) if line.strip()]
    events = parse_log(args.log)
    rows = trial_rows(trials, events)
    totals = [r["total"] for r in rows if r["total"] is not None]
    stats = summary(rows)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    med = statistics.median(totals) if totals else None
    out = [f"### Results of {now}", ""]
    out.append(f"- command: `{args.command}`")
    out.append(f"- machine: `nproc` {len(os.sched_getaffinity(0))}, {cpu_model()}; "
               f"load average before the trials {args.loadavg}")
    out.append(f"- commit {args.commit}; `heartbeat_interval_ms = {args.interval}`, "
               f"`heartbeat_timeout_ms = {args.timeout}`, `heartbeat_retries = {args.retries}`, "
               "other keys at their defaults")
    out.append(f"- {len(trials)} trials; failover time = from the primary's SIGKILL to the "
               "201 answer of the first `POST /transfers` through the proxy after it")
    out.append("")
    out.append("| | failover time | kill -> primary `unavailable` (proxy log) "
               "| hand-over `took_ms` (proxy log) |")
    out.append("| --- | ---: | ---: | ---: |")
    for i, label in enumerate(("median", "max", "min")):
        cells = [fmt(stats[k][i]) if k in stats else "-" for k in ("total", "detect", "took")]
        out.append(f"| {label} | {cells[0]} ms | {cells[1]} ms | {cells[2]} ms |")
    goal = med is not None and med <= 1000 and len(totals) == len(trials)
    out.append("")
    out.append(f"Goal median <= 1000 ms: **{'met' if goal else 'NOT met'}** "
               f"(median {fmt(med)} ms over {len(totals)} of {len(trials)} trials).")
    out.append("")
    out.append("| trial | killed | new primary | failover time | kill -> `unavailable` "
               "| role moved (after kill) | `took_ms` | requests | non-201 answers | proxy log |")
    out.append("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        bad = "; ".join(f"{a['status'] or 'no answer'} at {a['end_ms']:.0f} ms"
                        for a in r["bad"]) or "none"
        out.append(f"| {r['n']} | {r['victim']} | {r['to']} | {fmt(r['total'])} ms "
                   f"| {fmt(r['detect'])} ms | {fmt(r['moved_at'])} ms | {fmt(r['took'])} ms "
                   f"| {r['attempts']} | {bad} | {'; '.join(r['notes']).replace('|', '/') or '-'} |")

    bad_all = [(r["n"], a) for r in rows for a in r["bad"]]
    out.append("")
    if bad_all:
        out.append(f"**Updates that failed instead of waiting: {len(bad_all)}**")
        out.append("")
        for n, a in bad_all:
            out.append(f"- trial {n}: {a['status'] or 'no answer'} after "
                       f"{a['end_ms'] - a['start_ms']:.0f} ms: `{a.get('body', '')[:200]}`")
    else:
        out.append("Every first update after a kill waited for the failover and got 201; "
                   "no update failed.")
    doubt = [r["n"] for r in rows if any("in doubt**" in n for n in r["notes"])]
    if doubt:
        out.append("")
        out.append(f"The first update after the kill went **in doubt** in {len(doubt)} of "
                   f"{len(rows)} trials (trial {', '.join(map(str, doubt))}): the proxy had "
                   "sent it to the dead primary (see the proxy log column).")
    out.append("")

    counts = {}
    for when, level, _target, msg, _fields in events:
        if level in ("WARN", "ERROR"):
            counts[(level, msg)] = counts.get((level, msg), 0) + 1
    if counts:
        out.append("WARN and ERROR events in the proxy's log over the whole run:")
        out.append("")
        out.append("| level | message | count |")
        out.append("| --- | --- | ---: |")
        for (level, msg), n in sorted(counts.items(), key=lambda kv: (kv[0][0] != "ERROR", -kv[1])):
            out.append(f"| {level} | {msg.replace('|', '/')} | {n} |")
    print("\n".join(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("settle")
    s.add_argument("admin")
    s.add_argument("--timeout", type=float, default=60)
    t = sub.add_parser("trial")
    t.add_argument("--pid", type=int, required=True)
    t.add_argument("--victim", required=True, help="the killed partition's name")
    t.add_argument("--proxy", required=True)
    t.add_argument("--max-time", type=float, default=6)
    t.add_argument("--give-up", type=float, default=30)
    r = sub.add_parser("report")
    r.add_argument("trials")
    r.add_argument("log")
    r.add_argument("--interval", required=True)
    r.add_argument("--timeout", required=True)
    r.add_argument("--retries", required=True)
    r.add_argument("--command", default="bench/failover.sh")
    r.add_argument("--commit", default="unknown")
    r.add_argument("--loadavg", default="unknown")
    b = sub.add_parser("brief")
    b.add_argument("trial")
    sp = sub.add_parser("splice")
    sp.add_argument("doc")
    sp.add_argument("report")
    args = p.parse_args()
    if args.cmd == "settle":
        return settle(args)
    if args.cmd == "trial":
        return trial(args)
    if args.cmd == "brief":
        t = json.load(open(args.trial))
        print("%.0f ms, %d request(s)" % (t["total_ms"], len(t["attempts"])))
        return 0
    if args.cmd == "report":
        report(args)
        return 0
    splice(args.doc, args.report, BEGIN, END, "Failover time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
