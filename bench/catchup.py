#!/usr/bin/env python3
"""The catch-up helper of bench/run.sh: pushes the records, times a replica that comes back
behind (and sends the fixed counts of requests of bench/instructions.sh).

    catchup.py seed URL N [--balance CENTS]
        Opens accounts 1..N (`POST URL/accounts`, "bench-1" ... "bench-N", --balance each,
        default 1_000_000_000) one at a time; exit 1 unless they got ids 1..N in order.
    catchup.py push URL N [--max-time S] [--accounts K --seed S]
        Sends `POST URL/transfers {"from":1,"to":2,"amount":1}` one at a time on one
        keep-alive connection (a new one after an error) until N answered 2xx, for at most
        --max-time seconds (600); prints one JSON line: pushed (2xx answers), push_failed
        (other answers and errors), push_s, push_rps, and accounts when given. (wrk stops a
        thread after N answers, but its main thread still sleeps out the whole -d and
        reports over it.) With --accounts K, each transfer goes between two distinct
        accounts drawn at random from 1..K (random.Random(--seed), default 0), so that most
        pairs of transfers share no account: independent under the conflict keys
        `body:/from`, `body:/to`.
    catchup.py reads URL N [--path PATH]
        Sends `GET URL` + --path (default /health) N times on one keep-alive connection;
        exit 1 at the first answer that is not 2xx (bench/instructions.sh).
    catchup.py watch ADMIN PARTITION --since-file FILE [--ready-file FILE] [--from SEQ]
                     [--round N] [--push PUSH.json] [--poll S] [--timeout S]
        PARTITION of the group behind ADMIN (group 0 of `GET /status`) was away while
        updates went on, and is about to come back: started before it does, this polls
        `/status` every --poll seconds (0.05) from the start, so that neither its own
        start-up nor a slow first answer hides when the replay begins. The caller writes
        the wall clock of the partition's return (seconds, as bash's $EPOCHREALTIME) to
        FILE; the target is the journal's head as the first poll saw it (nothing else is
        sent to the group meanwhile); it polls until the partition has applied it, at most
        --timeout seconds (600) after FILE appeared. With --ready-file, it writes that file
        once its first poll answered (the caller waits for it before the return). Prints one JSON line: round,
        partition, head, behind (head minus --from, where the partition stood when it went
        away; default: what it had applied at the first poll), first_s (its return -> the first poll that saw it apply a record; includes
        the heartbeat that sees it answering and the replayer's retry backoff), done_s (its
        return -> the poll that saw it at the head), rate (behind / done_s: the catch-up
        rate), replay_rate (the records after the first poll that saw progress over the
        time from that poll to the head: the replay alone), and from --push (the output of
        `push` that made the records): pushed, push_failed, push_s, push_rps.
        Exit 1 (with done_s null) when the head was not reached within --timeout.
"""

import argparse
import http.client
import json
import os
import random
import socket
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from failover import group_state  # noqa: E402


BODY = b'{"from":1,"to":2,"amount":1}'


def seed(args):
    url = urllib.parse.urlsplit(args.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    for i in range(1, args.n + 1):
        body = json.dumps({"name": f"bench-{i}", "balance": args.balance}).encode()
        conn.request("POST", url.path.rstrip("/") + "/accounts", body=body,
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        text = resp.read()
        if not 200 <= resp.status < 300:
            print(f"catchup.py seed: account bench-{i} on {args.url}: {resp.status} {text!r}",
                  file=sys.stderr)
            return 1
        got = json.loads(text).get("id")
        if got != i:
            print(f"catchup.py seed: account bench-{i} got id {got} on {args.url}",
                  file=sys.stderr)
            return 1
    conn.close()
    return 0


def bodies(args):
    """The transfers' bodies: 1 -> 2 each time, or between random distinct accounts."""
    if not args.accounts:
        while True:
            yield BODY
    rng = random.Random(args.seed)
    while True:
        a, b = rng.sample(range(1, args.accounts + 1), 2)
        yield json.dumps({"from": a, "to": b, "amount": 1}).encode()


def push(args):
    url = urllib.parse.urlsplit(args.url)
    pushed = failed = 0
    body = None
    gen = bodies(args)
    conn = None
    start = time.monotonic()
    deadline = start + args.max_time
    while pushed < args.n and time.monotonic() < deadline:
        try:
            if conn is None:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if body is None:
                body = next(gen)
            conn.request("POST", url.path.rstrip("/") + "/transfers", body=body,
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if 200 <= resp.status < 300:
                pushed += 1
                body = None
            else:
                failed += 1
        except (OSError, http.client.HTTPException) as e:
            failed += 1
            print(f"catchup.py push: {type(e).__name__}: {e}", file=sys.stderr)
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.01)
    secs = time.monotonic() - start
    result = {"pushed": pushed, "push_failed": failed, "push_s": round(secs, 3),
              "push_rps": round(pushed / secs, 1) if secs else None}
    if args.accounts:
        result["accounts"] = args.accounts
    print(json.dumps(result))
    return 0 if pushed >= args.n else 1


def reads(args):
    """GETs `--path` N times on one keep-alive connection; fails on any other answer than
    2xx."""
    url = urllib.parse.urlsplit(args.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.monotonic()
    for i in range(args.n):
        conn.request("GET", url.path.rstrip("/") + args.path)
        resp = conn.getresponse()
        resp.read()
        if not 200 <= resp.status < 300:
            print(f"catchup.py reads: GET {args.path} #{i + 1}: {resp.status}", file=sys.stderr)
            return 1
    conn.close()
    secs = time.monotonic() - start
    print(json.dumps({"read": args.n, "read_s": round(secs, 3)}))
    return 0


def partition_of(group, name):
    for p in group["partitions"]:
        if p["name"] == name:
            return p
    raise SystemExit(f"catchup.py: no partition {name!r} in the group's status")


def watch(args):
    start = time.monotonic()
    g = group_state(args.admin)
    head = g["head"]
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write("ready\n")
    applied0 = partition_of(g, args.partition)["applied"]
    if args.since_seq is not None:
        applied0 = args.since_seq
    result = {"round": args.round, "partition": args.partition, "head": head,
              "behind": head - applied0, "first_s": None, "done_s": None, "rate": None,
              "replay_rate": None}
    if args.push:
        result.update(json.load(open(args.push)))
    first = None  # (seconds, applied) at the first poll that saw progress
    since = None  # the partition's return, on the monotonic clock
    deadline = None
    applied = applied0
    while True:
        try:
            g = group_state(args.admin)
            applied = partition_of(g, args.partition)["applied"]
        except (OSError, ValueError, KeyError) as e:
            print(f"catchup.py: /status: {type(e).__name__}: {e}", file=sys.stderr)
        polled = time.monotonic()
        if since is None:
            try:
                text = open(args.since_file).read().strip()
            except OSError:
                text = ""
            if not text:
                if polled - start > args.timeout:
                    print("catchup.py: the partition did not come back", file=sys.stderr)
                    return 1
                time.sleep(args.poll)
                continue
            # The wall clock of the return, on the monotonic clock.
            since = polled - (time.time() - float(text))
            deadline = polled + args.timeout
        t = polled - since
        if first is None and applied > applied0:
            first = (t, applied)
            result["first_s"] = round(t, 3)
        if applied >= head:
            result["done_s"] = round(t, 3)
            if t > 0:
                result["rate"] = round((head - applied0) / t, 1)
            if first is not None and t > first[0]:
                result["replay_rate"] = round((head - first[1]) / (t - first[0]), 1)
            print(json.dumps(result))
            return 0
        if polled > deadline:
            result["applied_at_timeout"] = applied
            print(json.dumps(result))
            print(f"catchup.py: {args.partition} applied {applied} of {head} after "
                  f"{args.timeout} s", file=sys.stderr)
            return 1
        time.sleep(args.poll)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    se = sub.add_parser("seed")
    se.add_argument("url")
    se.add_argument("n", type=int)
    se.add_argument("--balance", type=int, default=1_000_000_000)
    pu = sub.add_parser("push")
    pu.add_argument("url")
    pu.add_argument("n", type=int)
    pu.add_argument("--max-time", type=float, default=600)
    pu.add_argument("--accounts", type=int, default=0)
    pu.add_argument("--seed", type=int, default=0)
    rd = sub.add_parser("reads")
    rd.add_argument("url")
    rd.add_argument("n", type=int)
    rd.add_argument("--path", default="/health")
    w = sub.add_parser("watch")
    w.add_argument("admin")
    w.add_argument("partition")
    w.add_argument("--since-file", required=True)
    w.add_argument("--ready-file")
    w.add_argument("--from", dest="since_seq", type=int)
    w.add_argument("--round", type=int, default=0)
    w.add_argument("--push")
    w.add_argument("--poll", type=float, default=0.05)
    w.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    if args.cmd == "push" and args.accounts == 1:
        p.error("--accounts needs at least 2 accounts")
    return {"seed": seed, "push": push, "reads": reads, "watch": watch}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
