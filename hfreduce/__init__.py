"""hfreduce: CPU-side allreduce (shared-memory reduce in the node, double binary tree between nodes).

Usage::

    import hfreduce
    pg = hfreduce.init()                         # from the environment (torchrun / platform / mpirun)
    hfreduce.allreduce(grads)                    # numpy array, torch CPU or CUDA tensor, cupy array
    w = hfreduce.allreduce(grads, op=hfreduce.ReduceOp.AVG, async_op=True); ...; w.wait()
    bucket = hfreduce.empty(n, "float32")        # lives in the node's shared memory: no copy-in

Design and limits: docs/hfreduce.md.
"""

from __future__ import annotations

from typing import Any

from . import counters as _counters
from . import kernels as _kernels
from .engine import Work
from .errors import (
    DeviceError,
    HFReduceError,
    HFReduceTimeout,
    InitError,
    InvalidArgument,
    MismatchError,
    PeerFailed,
)
from .group import ProcessGroup, destroy, get_default, init, is_initialized, new_group
from .ops import ReduceOp

__all__ = [
    "init", "new_group", "destroy", "is_initialized", "get_rank", "get_world_size", "get_default", "ProcessGroup", "Work",
    "ReduceOp", "allreduce", "reduce", "broadcast", "allgather", "reduce_scatter", "barrier", "empty", "info",
    "HFReduceError", "HFReduceTimeout", "InitError", "InvalidArgument", "MismatchError", "PeerFailed",
    "DeviceError",
    "all_to_all", "send", "recv", "isend", "irecv", "metrics", "MetricsCollector",
]

MetricsCollector = _counters.Collector


def metrics() -> dict[str, dict[str, float]]:
    """This process's collective counters by kind: count, bytes, seconds, errors (docs/metrics.md)."""
    return _counters.metrics()


def _pg(group: ProcessGroup | None) -> ProcessGroup:
    return group if group is not None else get_default()


def get_rank(group: ProcessGroup | None = None) -> int:
    return _pg(group).rank


def get_world_size(group: ProcessGroup | None = None) -> int:
    return _pg(group).world_size


def allreduce(buf: Any, op: ReduceOp = ReduceOp.SUM, async_op: bool = False,
              group: ProcessGroup | None = None) -> Work:
    """Reduce ``buf`` across all ranks in place; with ``async_op`` returns at once (``Work.wait()``)."""
    return _pg(group).allreduce(buf, op, async_op)


def reduce(buf: Any, dst: int = 0, op: ReduceOp = ReduceOp.SUM, async_op: bool = False,
           group: ProcessGroup | None = None) -> Work:
    """Reduce ``buf`` across all ranks into rank ``dst``'s ``buf``."""
    return _pg(group).reduce(buf, dst, op, async_op)


def broadcast(buf: Any, src: int = 0, async_op: bool = False, group: ProcessGroup | None = None) -> Work:
    """Copy rank ``src``'s ``buf`` into every rank's ``buf``."""
    return _pg(group).broadcast(buf, src, async_op)


def allgather(out_buf: Any, in_buf: Any, async_op: bool = False, group: ProcessGroup | None = None) -> Work:
    """``out_buf`` = concatenation of ``in_buf`` of ranks 0..N-1."""
    return _pg(group).allgather(out_buf, in_buf, async_op)


def reduce_scatter(out_buf: Any, in_buf: Any, op: ReduceOp = ReduceOp.SUM, async_op: bool = False,
                   group: ProcessGroup | None = None) -> Work:
    """Reduce ``in_buf`` (N x len(out_buf)) across ranks; rank r gets part r in ``out_buf``."""
    return _pg(group).reduce_scatter(out_buf, in_buf, op, async_op)


def barrier(timeout: float | None = None, group: ProcessGroup | None = None) -> None:
    """Block until every rank of the group has called barrier."""
    _pg(group).barrier(timeout)


def empty(shape: Any, dtype: Any = "float32", group: ProcessGroup | None = None):
    """A numpy array in this node's shared-memory arena: a registered buffer (allreduce skips the
    copy-in and reduces it in place). ``dtype="bfloat16"`` gives uint16 bits to view as bf16."""
    return _pg(group).empty(shape, dtype)


def info(group: ProcessGroup | None = None) -> dict:
    """The kernel in use, and the group's layout when one is initialized."""
    pg = group if group is not None else (get_default() if is_initialized() else None)
    if pg is None:
        return {"kernel": _kernels.KERNEL, "simd": _kernels.SIMD, "initialized": False}
    return {**pg.info(), "initialized": True}


def all_to_all(out_buf: Any, in_buf: Any, out_splits: Any = None, in_splits: Any = None, async_op: bool = False,
               group: ProcessGroup | None = None) -> Work:
    """Chunk j of ``in_buf`` to rank j, chunk i of ``out_buf`` from rank i; splits in rows (None: equal)."""
    return _pg(group).all_to_all(out_buf, in_buf, out_splits, in_splits, async_op)


def send(buf: Any, dst: int, tag: int = 0, group: ProcessGroup | None = None) -> None:
    _pg(group).send(buf, dst, tag)


def recv(buf: Any, src: int, tag: int = 0, group: ProcessGroup | None = None) -> None:
    _pg(group).recv(buf, src, tag)


def isend(buf: Any, dst: int, tag: int = 0, group: ProcessGroup | None = None) -> Work:
    return _pg(group).isend(buf, dst, tag)


def irecv(buf: Any, src: int, tag: int = 0, group: ProcessGroup | None = None) -> Work:
    return _pg(group).irecv(buf, src, tag)
