"""hfreduce's counters: collectives by kind, their bytes and their time; and how they reach Prometheus.

Every completed collective of this process adds to a counter per kind (``allreduce``,
``broadcast``...): how many, how many bytes (the buffer's size), seconds from the start of its
turn on the engine to its end, and how many failed. :func:`metrics` returns them; the bandwidth
of a kind is ``bytes / seconds`` over any window (Prometheus: ``rate(bytes) / rate(seconds)``).

How they reach Prometheus:

- On the platform (``$HAI_CONTROL`` set, a job's control directory), the engine writes them at
  most every :data:`PUBLISH_EVERY` seconds, and when the group is destroyed, to
  ``$HAI_CONTROL/hfreduce-rank<RANK>.json``; the node's agent reads those files of its running
  jobs at each scrape and exports them with ``hai_job`` (the job id users see, ``$HAI_JOB_ID``: the
  chain, the same across restarts; Prometheus keeps ``job`` for its own) and ``rank`` labels
  (docs/metrics.md).
- Elsewhere, ``registry.register(hfreduce.MetricsCollector())`` and serve the registry with
  ``prometheus_client.start_http_server`` (or any exposition of it).

[Note: counting off the hot path] The counters are plain integers and floats updated by the
engine thread, one per process, after each collective: no lock, no label lookup, nothing per
chunk. A reader (:func:`metrics`) copies them; a torn read of one kind's counters at worst
shows an operation's count before its bytes, never a wrong total later.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["metrics", "record", "reset", "publish", "maybe_publish", "load", "families", "Collector",
           "PUBLISH_EVERY", "FILE_PATTERN", "MAX_FILE_BYTES"]

#: seconds between two writes of the published file (each collective checks; the write is small)
PUBLISH_EVERY = 5.0
#: the published files' names in a control directory
FILE_PATTERN = re.compile(r"hfreduce-rank(\d{1,7})\.json")
#: the most a published file may hold (the agent reads a job's file as hostile: bounded)
MAX_FILE_BYTES = 16 << 10
_KINDS = ("allreduce", "reduce", "broadcast", "allgather", "reduce_scatter", "barrier", "all_to_all", "send",
          "recv")
_FIELDS = ("count", "bytes", "seconds", "errors")

_stats: dict[str, list] = {}
_last_publish = 0.0


def record(kind: str, nbytes: int, seconds: float, ok: bool) -> None:
    """Count one completed collective (the engine thread calls this)."""
    s = _stats.get(kind)
    if s is None:
        s = _stats[kind] = [0, 0, 0.0, 0]
    s[0] += 1
    s[1] += nbytes
    s[2] += seconds
    if not ok:
        s[3] += 1
    if os.environ.get("HAI_CONTROL"):
        maybe_publish()


def metrics() -> dict[str, dict[str, float]]:
    """This process's counters: ``{kind: {"count", "bytes", "seconds", "errors"}}`` since it started."""
    return {k: dict(zip(_FIELDS, list(v), strict=True)) for k, v in list(_stats.items())}


def reset() -> None:
    """Forget the counters (tests; a counter that goes back is read by Prometheus as a restart)."""
    _stats.clear()


def _target() -> Path | None:
    control, rank = os.environ.get("HAI_CONTROL"), os.environ.get("RANK")
    if not control or rank is None or not rank.isdigit():
        return None
    return Path(control) / f"hfreduce-rank{int(rank)}.json"


def publish(path: str | os.PathLike | None = None) -> Path | None:
    """Write :func:`metrics` to ``path`` (default: ``$HAI_CONTROL/hfreduce-rank$RANK.json``), atomically."""
    global _last_publish
    p = Path(path) if path is not None else _target()
    if p is None:
        return None
    _last_publish = time.monotonic()
    body = json.dumps({"v": 1, "t": time.time(), "ops": metrics()})
    try:
        fd, tmp = tempfile.mkstemp(prefix=".hfreduce-metrics.", dir=p.parent)
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, p)
    except OSError:  # metrics never fail a job: a full or vanished control directory is skipped
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
        return None
    return p


def maybe_publish(now: float | None = None) -> None:
    """:func:`publish` when the last one is :data:`PUBLISH_EVERY` seconds old (cheap otherwise)."""
    if (time.monotonic() if now is None else now) - _last_publish >= PUBLISH_EVERY:
        publish()


def load(path: str | os.PathLike) -> dict[str, dict[str, float]] | None:
    """A published file's counters, or None when it is not a plain file of the expected shape.

    Read as written by an adversary (the job owns its control directory): never through a link,
    at most :data:`MAX_FILE_BYTES`, known kinds only, finite non-negative numbers only.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            return None
        data = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        doc = json.loads(data)
        ops = doc["ops"]
        out: dict[str, dict[str, float]] = {}
        for kind, vals in ops.items():
            if kind not in _KINDS:
                continue
            row = {f: float(vals[f]) for f in _FIELDS}
            if not all(math.isfinite(v) and v >= 0 for v in row.values()):
                return None
            out[kind] = row
        return out
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def families(rows: Iterable[tuple[dict[str, str], dict[str, dict[str, float]]]]) -> list[Any]:
    """Prometheus counter families from counters (:func:`metrics` / :func:`load`), each row with its labels."""
    from prometheus_client.core import CounterMetricFamily

    rows = list(rows)
    names = sorted({k for labels, _ in rows for k in labels})
    fams = {
        "count": CounterMetricFamily("fireflyer_hfreduce_ops", "Collectives completed, by kind",
                                     labels=[*names, "op"]),
        "bytes": CounterMetricFamily("fireflyer_hfreduce_bytes", "Bytes of the collectives' buffers, by kind",
                                     labels=[*names, "op"]),
        "seconds": CounterMetricFamily("fireflyer_hfreduce_seconds", "Time the collectives took (start of "
                                       "their turn on the engine to completion), by kind", labels=[*names, "op"]),
        "errors": CounterMetricFamily("fireflyer_hfreduce_errors", "Collectives that failed, by kind",
                                      labels=[*names, "op"]),
    }
    for labels, ops in rows:
        values = [labels.get(n, "") for n in names]
        for kind, row in sorted(ops.items()):
            for f, fam in fams.items():
                fam.add_metric([*values, kind], row[f])
    return list(fams.values())


class Collector:
    """A ``prometheus_client`` collector of this process's counters (outside the platform)."""

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self.labels = dict(labels or {})

    def collect(self) -> list[Any]:
        return families([(self.labels, metrics())])

    def describe(self) -> list[Any]:
        return []
