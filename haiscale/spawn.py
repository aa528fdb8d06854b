"""haiscale.spawn: start ``nprocs`` training processes on this node with the job environment set.

Each child gets torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT), so ``hfreduce.init()`` with no arguments joins the group.

* Alone on a machine: one node, ranks 0..nprocs-1, a free port on 127.0.0.1.
* Under the platform or a launcher that starts one process per node (NNODES and NODE_RANK set,
  LOCAL_RANK not set): global rank = NODE_RANK * nprocs + local rank, WORLD_SIZE = NNODES * nprocs.
* Emulating ``nnodes`` nodes on one machine (``spawn(..., nnodes=2)``): ``nnodes * nprocs``
  processes, NODE_RANK = global rank // nprocs; with ``cluster`` (a cluster description file) each
  process also gets HAI_CLUSTER_FILE and HAI_NODE_NAME (the file's nodes in order), so hfreduce's
  node leaders talk over their own loopback addresses (real TCP between emulated nodes).
* Inside a rank that the platform (``hai python``) or torchrun already started (WORLD_SIZE, RANK and
  LOCAL_RANK set, and not by spawn): the processes exist already, so spawn runs
  ``fn(LOCAL_RANK, *args)`` here, in this process, as that rank, and ``nprocs`` gives way to the
  launcher's count (a note says so when they differ). One script runs alone and under the platform.

Failure handling: the parent watches every child; when one raises or exits non-zero, the others
are terminated (SIGTERM, then SIGKILL after ``grace`` seconds) and :class:`ProcessFailed` carries the
child's rank, exit code and traceback. Children die with the parent (PR_SET_PDEATHSIG), so no
orphan survives a killed launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait as mp_wait
from typing import Any

from .errors import ProcessFailed, SpawnError, UsageError

__all__ = ["spawn", "job_env", "emulated_env", "launched_rank"]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def job_env(nprocs: int, environ: dict[str, str] | None = None, master_addr: str | None = None,
            master_port: int | None = None) -> list[dict[str, str]]:
    """The environment of each of ``nprocs`` local processes, given the launcher's environment."""
    env = dict(os.environ if environ is None else environ)
    if nprocs < 1:
        raise UsageError(f"nprocs must be >= 1, got {nprocs}")
    if "LOCAL_RANK" in env and "HAISCALE_SPAWNED" not in env:
        raise UsageError(
            "haiscale.spawn was called in a process that torchrun (or the platform) already started "
            "(LOCAL_RANK is set): call the training function directly instead"
        )
    nnodes = int(env.get("NNODES", env.get("GROUP_WORLD_SIZE", "1")))
    node_rank = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    if not 0 <= node_rank < nnodes:
        raise UsageError(f"NODE_RANK={node_rank} is outside 0..NNODES-1 (NNODES={nnodes})")
    if nnodes > 1:
        addr = master_addr or env.get("MASTER_ADDR")
        port = master_port or env.get("MASTER_PORT")
        if not addr or not port:
            raise UsageError("a multi-node job needs MASTER_ADDR and MASTER_PORT in the environment")
    else:
        addr = master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
        port = master_port or env.get("MASTER_PORT") or _free_port(addr)
    out = []
    for local in range(nprocs):
        e = {
            "WORLD_SIZE": str(nnodes * nprocs),
            "RANK": str(node_rank * nprocs + local),
            "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(nprocs),
            "NNODES": str(nnodes),
            "NODE_RANK": str(node_rank),
            "GROUP_RANK": str(node_rank),
            "MASTER_ADDR": str(addr),
            "MASTER_PORT": str(port),
            "HAISCALE_SPAWNED": "1",
        }
        out.append(e)
    return out


def emulated_env(nprocs: int, nnodes: int, cluster: str | os.PathLike | None = None,
                 master_addr: str | None = None, master_port: int | None = None) -> list[dict[str, str]]:
    """The environment of every process of ``nnodes`` emulated nodes x ``nprocs`` on this machine."""
    if nnodes < 1:
        raise UsageError(f"nnodes must be >= 1, got {nnodes}")
    names: list[str] = []
    if cluster is not None:
        from network.topology import load_cluster

        names = list(load_cluster(cluster).nodes)
        if len(names) < nnodes:
            raise UsageError(f"cluster description {cluster} has {len(names)} nodes, {nnodes} are emulated")
    addr = master_addr or "127.0.0.1"
    port = str(master_port or _free_port(addr))
    out = []
    for node in range(nnodes):
        for e in job_env(nprocs, environ={"NNODES": str(nnodes), "NODE_RANK": str(node),
                                          "MASTER_ADDR": addr, "MASTER_PORT": port}):
            if names:
                e["HAI_CLUSTER_FILE"] = str(cluster)
                e["HAI_NODE_NAME"] = names[node]
            out.append(e)
    return out


def launched_rank(environ: dict[str, str] | None = None) -> bool:
    """Whether this process is already one rank of a job a launcher started (the platform's agent,
    torchrun): its torchrun variables are set, and not by haiscale.spawn itself."""
    env = os.environ if environ is None else environ
    return all(k in env for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")) and "HAISCALE_SPAWNED" not in env


def _run_in_place(fn: Callable[..., Any], args: tuple, nprocs: int, nnodes: int) -> None:
    """[Note: spawn inside a rank] A script written for ``python train.py`` calls spawn(nprocs=2);
    under ``hai python`` or torchrun each process is already a rank with its environment, and spawning
    nprocs more per rank would make a world the launcher never planned (and clash on MASTER_PORT).
    So the launcher wins: run the function as this rank, with the launcher's layout."""
    local = int(os.environ["LOCAL_RANK"])
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    if nnodes > 1:
        raise UsageError("haiscale.spawn(nnodes=...) emulates nodes on one machine; inside a launched rank "
                         "the launcher's nodes are used: call it without nnodes")
    if per_node is not None and int(per_node) != nprocs:
        print(f"haiscale.spawn: this process is rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} started "
              f"by the launcher ({per_node} per node); running the function here, nprocs={nprocs} is not used",
              file=sys.stderr, flush=True)
    fn(local, *tuple(args))


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass


_TB_MAX = 16 << 10  # well under the 64 KiB a pipe holds


def _child(fn: Callable[..., Any], local_rank: int, args: tuple, env: dict[str, str], conn: Any) -> None:
    _die_with_parent()
    os.environ.update(env)
    def report(tb: str | None) -> None:
        # the parent reads the pipe only after we exit: keep the message within a pipe buffer so
        # the send never blocks, and a parent that stopped listening (join=False) is no error
        with contextlib.suppress(OSError):
            conn.send(tb if tb is None or len(tb) <= _TB_MAX else "...(cut)...\n" + tb[-_TB_MAX:])

    try:
        fn(local_rank, *args)
    except KeyboardInterrupt:
        report(None)
        sys.exit(130)
    except BaseException:
        try:
            report(traceback.format_exc())
        finally:
            sys.exit(1)
    report(None)


def spawn(fn: Callable[..., Any], args: tuple = (), nprocs: int = 1, join: bool = True,
          timeout: float | None = None, grace: float = 5.0, master_addr: str | None = None,
          master_port: int | None = None, start_method: str = "spawn", nnodes: int = 1,
          cluster: str | os.PathLike | None = None, bind_numa: bool = False) -> list[mp.Process] | None:
    """Run ``fn(local_rank, *args)`` in ``nprocs`` processes with the job environment set.

    ``timeout`` bounds the whole run (None: no bound); on expiry every child is stopped and
    SpawnError raised. With ``join=False`` the started processes are returned (the caller joins).
    ``nnodes > 1`` emulates that many nodes on this machine (``nnodes * nprocs`` processes).
    ``bind_numa`` is accepted for hfai compatibility and ignored (no NUMA binding here).
    Inside a rank a launcher started, ``fn`` runs in this process (see the module's docstring) and
    returns when ``fn`` does: ``join=False`` then gives an empty list (no process to join: the work is
    done), and ``cluster``, ``timeout`` and ``start_method`` do not apply (the launcher's layout wins;
    a ``cluster`` given is warned about)."""
    if launched_rank():
        if cluster is not None:
            print(f"haiscale.spawn: cluster={cluster!s} is not used inside a rank the launcher started "
                  "(the launcher's nodes are used)", file=sys.stderr, flush=True)
        _run_in_place(fn, args, nprocs, nnodes)
        return None if join else []
    if nnodes > 1 or cluster is not None:
        envs = emulated_env(nprocs, nnodes, cluster, master_addr, master_port)
    else:
        envs = job_env(nprocs, master_addr=master_addr, master_port=master_port)
    nprocs = len(envs)
    ctx = mp.get_context(start_method)
    procs: list[mp.Process] = []
    conns = []
    try:
        for local in range(nprocs):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(fn, int(envs[local]["LOCAL_RANK"]), tuple(args), envs[local], w),
                            daemon=False,
                            name=f"haiscale-rank{envs[local]['RANK']}")
            p.start()
            w.close()
            procs.append(p)
            conns.append(r)
    except BaseException:
        _stop_all(procs, grace)
        raise
    if not join:
        return procs
    deadline = None if timeout is None else time.monotonic() + timeout
    tracebacks: dict[int, str | None] = {}
    alive = {p.sentinel: i for i, p in enumerate(procs)}
    try:
        while alive:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                raise SpawnError(f"haiscale.spawn: processes {sorted(alive.values())} still running after {timeout} s; stopped them")
            ready = mp_wait(list(alive), timeout=left if left is not None else 1.0)
            for s in ready:
                i = alive.pop(s)
                procs[i].join(timeout=grace)
                if conns[i].poll():
                    try:
                        tracebacks[i] = conns[i].recv()
                    except (EOFError, OSError):
                        tracebacks[i] = None
                code = procs[i].exitcode
                if code != 0 or tracebacks.get(i):
                    raise ProcessFailed(int(envs[i]["RANK"]), code, tracebacks.get(i))
    finally:
        _stop_all(procs, grace)
        for c in conns:
            c.close()
    return None


def _stop_all(procs: list[mp.Process], grace: float) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=grace)
