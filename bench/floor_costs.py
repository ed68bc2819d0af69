#!/usr/bin/env python3
"""What one step of the update path costs on this machine, without regroup: the numbers
the section "Thread hand-offs on the update path" in BENCHMARKS.md compares the journal's
writes with.

    floor_costs.py [--dir DIR] [--n N]

Prints, per step, the wall time and the CPU time of this process per operation, N times
each (default 2000), in a temporary directory under DIR (default: the system's temporary
directory; give a directory on the disk the journal uses):

- one SQLite commit of a small row in WAL mode (the shape of a journal record:
  `(group, seq, body, state)`), under `synchronous = FULL` and under `NORMAL`;
- one append of 450 bytes to a plain file followed by `fdatasync`.

A round trip between two threads is measured in Rust, where the two threads run at once
(Python's lock keeps its threads on one core): `cargo test -p regroup-replay --release --lib
-- --ignored thread_round_trip_cost --nocapture`.
"""

import argparse
import os
import resource
import sqlite3
import tempfile
import time


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(label: str, n: int, step) -> None:
    wall, used = time.perf_counter(), cpu()
    for i in range(n):
        step(i)
    wall, used = time.perf_counter() - wall, cpu() - used
    print(f"{label}: {wall / n * 1e6:.0f} us wall, {used / n * 1e6:.0f} us CPU per operation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    n = args.n
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        db = sqlite3.connect(os.path.join(d, "commits.db"), isolation_level=None)
        db.execute("pragma journal_mode = wal")
        db.execute(
            "create table r (g text, seq integer, body blob, state text, primary key (g, seq))"
        )
        body = b"x" * 400
        for sync, base in (("full", 0), ("normal", n)):
            db.execute(f"pragma synchronous = {sync}")
            timed(
                f"SQLite commit, WAL, synchronous = {sync.upper()}",
                n,
                lambda i, base=base: db.execute(
                    "insert into r values (?, ?, ?, 'pending')", ("g", base + i, body)
                ),
            )
        db.close()
        with open(os.path.join(d, "log.bin"), "ab") as f:

            def append(_: int) -> None:
                f.write(b"x" * 450)
                f.flush()
                os.fdatasync(f.fileno())

            timed("file append + fdatasync", n, append)


if __name__ == "__main__":
    main()
