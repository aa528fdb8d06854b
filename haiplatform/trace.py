"""Job traces for the scheduler simulator: the CSV format, its reader and writer, and a synthetic generator.

Format (a header line is required; columns in any order; ``#`` lines are comments)::

    submit_time,user,nodes,duration,priority,checkpoint_interval,time_limit
    0,alice,1,3600,normal,600,7200
    30,bob,,5400,high,,           <- empty optional fields take their defaults

==========================  ===========================================================================
column                      meaning
==========================  ===========================================================================
``submit_time``             seconds from the trace's start (>= 0)
``user``                    who submits it (quotas and the same-user preemption rule use it)
``nodes`` or ``gpus``       whole nodes; or GPUs, rounded up to whole nodes (ceil(gpus / GPUs per node))
``duration``                seconds of work the job needs (> 0): its run time on an idle cluster
``priority``                optional: a level name (``normal``, ``high``, ...), a number, or ``auto``
``checkpoint_interval``     optional: seconds of work between checkpoints; empty = never checkpoints
                            (a preempted job then loses all its progress)
``time_limit``              optional: the user's estimate of the run time (s; Slurm's ``--time``), used
                            by backfill; empty = none
==========================  ===========================================================================

The generator (``python -m haiplatform.trace generate --cluster FILE --hours 24 --load 1.2 --seed N
-o trace.csv``) draws a mix shaped after published GPU-cluster traces; docs/scheduling.md gives
the sources and which of its numbers are assumptions.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from .states import AUTO, PRIORITIES

__all__ = ["TraceJob", "TraceError", "read_trace", "parse_trace", "write_trace", "generate", "main", "COLUMNS"]

#: the columns a trace may have, in the order the writer puts them
COLUMNS = ("submit_time", "user", "nodes", "gpus", "duration", "priority", "checkpoint_interval", "time_limit")
_REQUIRED = ("submit_time", "user", "duration")


class TraceError(ValueError):
    """A trace that cannot be read: the message names the file, the line and the column."""


@dataclass(frozen=True)
class TraceJob:
    submit_time: float
    user: str
    nodes: int
    duration: float
    priority: int = PRIORITIES["normal"]   # AUTO (-1) for "auto"
    checkpoint_interval: float = 0.0       # 0: never checkpoints
    time_limit: float = 0.0                # 0: no estimate


def _priority(text: str) -> int:
    t = text.strip().lower()
    if t == "auto":
        return AUTO
    if t in PRIORITIES:
        return PRIORITIES[t]
    try:
        v = int(t)
    except ValueError:
        raise ValueError(f"unknown priority {text!r} (a level name: {', '.join(PRIORITIES)}; a number; "
                         f"or auto)") from None
    if v < 0:
        raise ValueError(f"priority {v} is negative (use auto for automatic)")
    return v


def _number(text: str, *, positive: bool = False) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{text!r} must be a finite number {'> 0' if positive else '>= 0'}")
    return v


def parse_trace(text: str, gpus_per_node: int = 8, source: str = "<trace>") -> list[TraceJob]:
    """The jobs of a trace's CSV text, sorted by submit time (stable: equal times keep file order).

    Raises :class:`TraceError` naming ``source``, the line and the column of the first problem."""
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise TraceError(f"{source}: empty trace (a header line is required: {','.join(_REQUIRED)},nodes|gpus,...)")
    header_no, header_line = lines[0]
    header = [h.strip() for h in next(csv.reader([header_line]))]
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise TraceError(f"{source}: line {header_no}: unknown column {unknown[0]!r} (known: {', '.join(COLUMNS)})")
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise TraceError(f"{source}: line {header_no}: column {dup!r} appears twice")
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise TraceError(f"{source}: line {header_no}: the header lacks column {missing[0]!r} "
                         f"(is the first line a header?)")
    if "nodes" not in header and "gpus" not in header:
        raise TraceError(f"{source}: line {header_no}: the header needs a 'nodes' or a 'gpus' column")
    jobs: list[TraceJob] = []
    for (no, _), row in zip(lines[1:], csv.reader(ln for _, ln in lines[1:]), strict=True):
        if len(row) != len(header):
            raise TraceError(f"{source}: line {no}: {len(row)} fields, the header has {len(header)}")
        rec = {h: v.strip() for h, v in zip(header, row, strict=True)}
        col = ""
        try:
            col = "submit_time"
            submit = _number(rec[col])
            col = "user"
            if not rec[col]:
                raise ValueError("empty")
            user = rec[col]
            col = "nodes"
            if rec.get("nodes"):
                nodes = int(_number(rec["nodes"], positive=True))
                if nodes != float(rec["nodes"]):
                    raise ValueError(f"{rec['nodes']!r} is not a whole number")
            else:
                col = "gpus"
                if not rec.get("gpus"):
                    raise ValueError("empty (give nodes or gpus)")
                gpus = _number(rec["gpus"], positive=True)
                nodes = math.ceil(gpus / max(1, gpus_per_node))
            col = "duration"
            duration = _number(rec[col], positive=True)
            col = "priority"
            prio = _priority(rec[col]) if rec.get(col) else PRIORITIES["normal"]
            col = "checkpoint_interval"
            ckpt = _number(rec[col]) if rec.get(col) else 0.0
            col = "time_limit"
            limit = _number(rec[col]) if rec.get(col) else 0.0
        except ValueError as exc:
            raise TraceError(f"{source}: line {no}, column {col!r}: {exc}") from None
        jobs.append(TraceJob(submit, user, nodes, duration, prio, ckpt, limit))
    jobs.sort(key=lambda j: j.submit_time)
    return jobs


def read_trace(path: str | Path, gpus_per_node: int = 8) -> list[TraceJob]:
    """:func:`parse_trace` of a file (TraceError when it is missing or not UTF-8 text)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"{path}: trace file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    return parse_trace(text, gpus_per_node, str(path))


def _fmt(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))


def write_trace(jobs: list[TraceJob], out) -> None:
    """Write ``jobs`` as trace CSV (``nodes`` column; empty optional fields where they are off)."""
    names = {v: k for k, v in PRIORITIES.items()}
    w = csv.writer(out, lineterminator="\n")
    w.writerow(("submit_time", "user", "nodes", "duration", "priority", "checkpoint_interval", "time_limit"))
    for j in jobs:
        prio = "auto" if j.priority == AUTO else names.get(j.priority, str(j.priority))
        w.writerow((_fmt(j.submit_time), j.user, j.nodes, _fmt(j.duration), prio,
                    _fmt(j.checkpoint_interval) if j.checkpoint_interval else "",
                    _fmt(j.time_limit) if j.time_limit else ""))


# -- the synthetic generator ----------------------------------------------------------------------
# [Note: the mix] docs/scheduling.md, "The synthetic trace", says which published findings each
# table follows and which numbers are ours. Jobs are whole nodes (the platform allocates nodes).

#: (share of jobs, (smallest, largest) node count, duration median s, log-normal sigma)
SIZE_CLASSES = (
    (0.65, (1, 1), 10 * 60, 1.6),        # single GPU / single node: most jobs, short (debug, sweeps)
    (0.19, (2, 4), 30 * 60, 1.4),
    (0.11, (8, 16), 1.5 * 3600, 1.2),      # up to one leaf
    (0.04, (32, 64), 2 * 3600, 1.0),
    (0.01, (128, 256), 4 * 3600, 0.7),   # the tail that takes much of the GPU time
)
#: (priority, share of jobs)
PRIORITY_MIX = ((PRIORITIES["normal"], 0.70), (PRIORITIES["high"], 0.10), (PRIORITIES["above_normal"], 0.05),
                (PRIORITIES["low"], 0.15))
MIN_DURATION = 60.0
MAX_DURATION = 2 * 86400.0


def _pick(rng: random.Random, weighted):
    x = rng.random() * sum(w for _, w in weighted)
    for item, w in weighted:
        x -= w
        if x < 0:
            return item
    return weighted[-1][0]


def generate(cluster_nodes: int, hours: float, load: float, seed: int = 0, users: int = 40,
             max_nodes: int | None = None) -> list[TraceJob]:
    """A synthetic trace of ``hours`` whose offered node-hours are ``load`` x the cluster's node-hours.

    A job's
    size class, node count (a power of two in the class's range, capped at ``max_nodes``), duration
    (log-normal, clipped to 1 min .. 2 days), priority, user (a Zipf-like few heavy users),
    checkpoint interval and time limit are drawn from ``seed`` alone."""
    if cluster_nodes <= 0 or hours <= 0 or load <= 0:
        raise ValueError("cluster_nodes, hours and load must be > 0")
    rng = random.Random(seed)
    cap = max(1, min(max_nodes or cluster_nodes, cluster_nodes))
    horizon = hours * 3600.0

    def draw(t: float) -> TraceJob:
        share_cls = _pick(rng, [(c, c[0]) for c in SIZE_CLASSES])
        _, (lo, hi), median, sigma = share_cls
        sizes = [n for n in (1 << k for k in range(12)) if lo <= n <= hi] or [lo]
        nodes = min(cap, rng.choice(sizes))
        duration = min(MAX_DURATION, max(MIN_DURATION, rng.lognormvariate(math.log(median), sigma)))
        prio = _pick(rng, PRIORITY_MIX)
        user = f"u{min(users - 1, int(rng.paretovariate(1.2)) - 1):02d}"
        # most multi-node jobs checkpoint (every 10-60 min); a third of the small ones never do
        ckpt = 0.0 if (nodes == 1 and rng.random() < 0.35) else float(rng.choice((600, 1200, 1800, 3600)))
        # users over-estimate: limit = duration x U(1.2, 3), rounded up to 5 minutes; 10% give none
        limit = 0.0 if rng.random() < 0.10 else math.ceil(duration * rng.uniform(1.2, 3.0) / 300.0) * 300.0
        return TraceJob(round(t, 3), user, nodes, round(duration, 1), prio, ckpt, limit)

    # [Note: exact load] Jobs are drawn until their node-seconds reach load x capacity, then get
    # submit times as sorted uniform draws over the window (a Poisson process given its count): a
    # few tail jobs carry much of the work, so drawing arrivals at a mean rate would miss the
    # asked load by tens of percent from one seed to the next.
    target = load * cluster_nodes * horizon
    drawn: list[TraceJob] = []
    work = 0.0
    while work < target:
        j = draw(0.0)
        drawn.append(j)
        work += j.nodes * j.duration
    times = sorted(round(rng.uniform(0.0, horizon), 3) for _ in drawn)
    return [TraceJob(t, j.user, j.nodes, j.duration, j.priority, j.checkpoint_interval, j.time_limit)
            for t, j in zip(times, drawn, strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m haiplatform.trace", description="scheduler simulator traces")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a synthetic trace shaped after published GPU-cluster traces")
    g.add_argument("--cluster", required=True, help="cluster description (its node count and GPUs per node)")
    g.add_argument("--hours", type=float, default=24.0, help="submission window (default 24)")
    g.add_argument("--load", type=float, default=1.2, help="offered node-hours / cluster node-hours (default 1.2)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--users", type=int, default=40)
    g.add_argument("-o", "--out", default="-", help="output CSV (default stdout)")
    args = ap.parse_args(argv)
    from network.errors import ClusterFileError
    from network.topology import load_cluster
    try:
        cluster = load_cluster(args.cluster)
    except ClusterFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.hours <= 0 or args.load <= 0 or args.users <= 0:
        print("error: --hours, --load and --users must be > 0", file=sys.stderr)
        return 2
    jobs = generate(len(cluster.nodes), args.hours, args.load, args.seed, args.users)
    buf = io.StringIO()
    write_trace(jobs, buf)
    if args.out == "-":
        sys.stdout.write(buf.getvalue())
    else:
        Path(args.out).write_text(buf.getvalue(), encoding="utf-8")
        print(f"{len(jobs)} jobs, {sum(j.nodes * j.duration for j in jobs) / 3600:.0f} node-hours "
              f"over {args.hours:g} h -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
