"""Run a function on every rank of a local multi-process group: for tests, examples and benches.

``run_group(fn, nodes=2, per_node=2)`` starts ``nodes x per_node`` processes on this machine
(forked from a forkserver that has numpy and hfreduce imported, so a start costs milliseconds),
each one emulating a node by name (``n0``, ``n1``...). With ``cluster`` (default: the repository's
``deploy/clusters/local.toml`` when it has enough nodes) every emulated node's leader talks from
its own loopback address (127.0.0.x), so the inter-node tree is real TCP between real processes.
Each process runs ``hfreduce.init(...)``, then ``fn(pg, *args)``, then ``hfreduce.destroy()``,
and sends back what ``fn`` returned, or the exception it raised.

``fn`` must be importable (a module-level function) since it crosses a process boundary.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["run_group", "RankResult", "GroupRun", "free_port", "LOCAL_CLUSTER"]

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"
_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(["numpy", "hfreduce", "network"])
    return _ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error: BaseException | None = None
    error_type: str | None = None
    traceback: str = ""
    exitcode: int | None = None
    pid: int | None = None


@dataclass
class GroupRun:
    results: list[RankResult]
    pids: list[int] = field(default_factory=list)
    elapsed: float = 0.0

    def values(self) -> list[Any]:
        """Every rank's return value; raises the first rank's failure if any rank failed."""
        for r in self.results:
            if r.error is not None or r.exitcode not in (0, None):
                raise RuntimeError(f"rank {r.rank} failed (exit code {r.exitcode}):\n{r.traceback}")
        return [r.value for r in self.results]


def _worker(fn, args, kwargs, init_kw, env, conn) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    import hfreduce

    if env.get("HFREDUCE_KERNEL"):  # the forkserver imported the kernels already
        hfreduce.kernels.select(env["HFREDUCE_KERNEL"])

    out: tuple
    try:
        pg = hfreduce.init(**init_kw)
        try:
            value = fn(pg, *args, **kwargs)
        finally:
            hfreduce.destroy()
        out = ("ok", value)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        try:
            out = ("err", exc, tb)
            conn.send(out)
            conn.close()
            return
        except Exception:  # noqa: BLE001 - unpicklable exception
            out = ("err", RuntimeError(f"{type(exc).__name__}: {exc}"), tb)
    conn.send(out)
    conn.close()


def run_group(fn, *args, nodes: int = 1, per_node: int | list[int] = 1, timeout: float = 30.0,
              group_timeout: float = 20.0, cluster: str | os.PathLike | None | bool = True,
              env: dict[str, str | None] | None = None, rank_env: dict[int, dict] | None = None,
              abandon: set[int] | frozenset = frozenset(), **kwargs) -> GroupRun:
    """Run ``fn(pg, *args, **kwargs)`` on every rank of a fresh local group; wait up to ``timeout``.

    ``per_node`` may differ per node (a list). ``group_timeout`` is the group's own timeout (how
    fast a dead peer becomes an error). ``cluster=True`` uses deploy/clusters/local.toml when it
    has at least ``nodes`` nodes (node names n0..), ``False``/``None`` none. Ranks in ``abandon``
    (a test stops or hangs them on purpose) are not waited for: they are killed once every
    other rank has finished.
    """
    ctx = _context()
    counts = per_node if isinstance(per_node, list) else [per_node] * nodes
    world = sum(counts)
    port = free_port()
    if cluster is True:
        cluster = LOCAL_CLUSTER if nodes <= 4 and LOCAL_CLUSTER.exists() else None
    elif cluster is False:
        cluster = None
    procs, pipes = [], []
    rank = 0
    t0 = time.monotonic()
    for n, count in enumerate(counts):
        for lr in range(count):
            init_kw = {"rank": rank, "world_size": world, "local_rank": lr, "local_world_size": count,
                       "master_addr": "127.0.0.1", "master_port": port, "node": f"n{n}",
                       "cluster": str(cluster) if cluster else None, "timeout": group_timeout}
            e = dict(env or {})
            e.update((rank_env or {}).get(rank, {}))
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(fn, args, kwargs, init_kw, e, child), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
            rank += 1
    results = [RankResult(r, pid=p.pid) for r, p in enumerate(procs)]
    deadline = t0 + timeout
    pending = set(range(world))
    while pending - set(abandon) and time.monotonic() < deadline:
        for r in list(pending):
            pipe = pipes[r]
            if pipe.poll(0.01):
                try:
                    msg = pipe.recv()
                except (EOFError, OSError):
                    msg = ("err", RuntimeError("the process died without a result"), "")
                if msg[0] == "ok":
                    results[r].value = msg[1]
                else:
                    results[r].error, results[r].traceback = msg[1], msg[2]
                    results[r].error_type = type(msg[1]).__name__
                pending.discard(r)
            elif not procs[r].is_alive():
                if pipe.poll(0):
                    continue
                results[r].error = RuntimeError(f"rank {r} exited with code {procs[r].exitcode} without a result")
                results[r].error_type = "Died"
                pending.discard(r)
    for r in pending:
        if r in abandon:
            procs[r].kill()
            continue
        results[r].error = TimeoutError(f"rank {r} did not finish within {timeout} s")
        results[r].error_type = "Hang"
    for p in procs:
        p.join(max(0.1, deadline + 5 - time.monotonic()) if not pending - set(abandon) else 0.1)
        if p.is_alive():
            p.kill()
            p.join(5)
    for r, p in enumerate(procs):
        results[r].exitcode = p.exitcode
    for pipe in pipes:
        pipe.close()
    return GroupRun(results, [p.pid for p in procs], time.monotonic() - t0)
