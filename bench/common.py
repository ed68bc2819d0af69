"""What the bench's reports share: the machine's CPU model, and splicing a report into
BENCHMARKS.md between two markers. Imported by report.py, failover.py and proxies.py."""

import os


def cpu_model():
    """The first `model name` of /proc/cpuinfo, or "unknown"."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def splice(doc_path, report_path, begin, end, heading=None):
    """Replaces what lies between the markers `begin` and `end` in the file `doc_path` with
    the file `report_path`; appends the markers and the report (under `## heading`, when
    given) when they are absent."""
    body = open(report_path).read().rstrip("\n")
    doc = open(doc_path).read() if os.path.exists(doc_path) else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc = head + block + tail
    else:
        title = f"## {heading}\n\n" if heading else ""
        doc = doc.rstrip("\n") + ("\n\n" if doc else "") + title + block + "\n"
    with open(doc_path, "w") as f:
        f.write(doc)
