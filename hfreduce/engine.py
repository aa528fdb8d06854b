"""The per-rank pipeline: copy chunks in, reduce a slice of each chunk in place, copy results out.

A collective is cut into chunks of ``chunk`` bytes (a global chunk counter ``g`` runs across
operations). For chunk ``g``, every local rank ``r`` has an input location: its buffer itself
when the buffer is registered (lives in its heap) and the collective is an allreduce, else its
staging slot ``g % slots`` in the ring, into which it copies the chunk. Each chunk is split into
one slice per local rank; rank ``s`` reduces slice ``s`` of every rank's location into its own
location, in place, in one pass. On one node the chunk is then final; across nodes the leader's
tree threads (:mod:`hfreduce.internode`) reduce it between nodes and write the final values back
into the same locations. Every rank finally copies the whole final chunk (each slice from its
owner) into its output.

Per chunk, each rank publishes three counters: POSTED (my input is in place), REDUCED (my slice
is reduced), CONSUMED (I copied the result out, so my slot may be reused and my registered
buffer may be overwritten). A rank's loop does whatever is ready, most urgent first: reduce
(peers wait for it), copy in (within ``slots`` chunks of the oldest unconsumed one), copy out,
and sleeps on the node's epoch futex when nothing is.

[Note: why the ring stays in cache]
Staging slots are reused every ``slots`` chunks, so the ring (local ranks x slots x chunk) stays
in the CPU caches: the only DRAM traffic of a private buffer is reading it once and writing the
result once; the copy-in, the reduce and the copy-out meet in cache.

[Note: the device seam]
What touches the caller's buffer goes through a backend (:class:`HostBackend` here): "copy chunk
out" stages a chunk of the caller's input into a slot, "chunk ready?" says when that copy is
done, "copy chunk in" writes a final chunk into the caller's output. A device backend (CUDA)
makes the first and third asynchronous copies and the second an event query; the pipeline and
its counters stay the same. An asynchronous copy-in still reads the arena after it returns, so
CONSUMED is published only when ``chunk_in_done`` (the copy-in's event query) says so; a device
backend wakes the node's futex when a copy completes, so a waiting rank does not spin on events.
Device buffers bring their own backend (``OpSpec.backend``, see :mod:`hfreduce.device`).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import counters
from . import kernels as K
from .errors import HFReduceError, HFReduceTimeout, MismatchError
from .shm import Layout
from .sync import NodeSync

__all__ = ["OpSpec", "Work", "Engine", "HostBackend", "KIND_NAMES", "ALLREDUCE", "REDUCE", "BROADCAST",
           "ALLGATHER", "REDUCE_SCATTER", "BARRIER", "slices"]

log = logging.getLogger(__name__)

ALLREDUCE, REDUCE, BROADCAST, ALLGATHER, REDUCE_SCATTER, BARRIER = range(1, 7)
KIND_NAMES = {ALLREDUCE: "allreduce", REDUCE: "reduce", BROADCAST: "broadcast", ALLGATHER: "allgather",
              REDUCE_SCATTER: "reduce_scatter", BARRIER: "barrier"}
UNIT = 64  # slice boundaries fall on cache lines


def slices(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``n`` bytes into ``parts`` ranges on 64-byte boundaries (the last takes the tail)."""
    units = n // UNIT
    out = []
    for s in range(parts):
        a = s * units // parts * UNIT
        b = (s + 1) * units // parts * UNIT if s < parts - 1 else n
        out.append((a, b))
    return out


@dataclass
class OpSpec:
    """One collective as this rank runs it, over a virtual buffer of ``nbytes`` bytes.

    The rank's input lands at virtual offset ``in_off`` (the rest of the virtual buffer is zero
    for it); its output is the virtual range ``[out_off, out_off + out.nbytes)``. ``heap`` is
    (local rank, offset) when the input is a registered buffer reduced in place (allreduce).
    """

    kind: int
    nbytes: int
    dtype: int  # the caller's dtype (checked across ranks)
    op: int  # the caller's op (checked across ranks)
    kdtype: int  # what the kernels run: the dtype, or DT_U8 for bitwise-or collectives
    kop: int  # kernel op: SUM / MAX / MIN / BOR
    avg: int  # divide by this at the end (AVG), 0 for none
    root: int = -1
    inp: np.ndarray | None = None
    in_off: int = 0
    out: np.ndarray | None = None
    out_off: int = 0
    heap: tuple[int, int] | None = None
    keep: Any = None  # the caller's objects, alive until the work completes
    backend: Any = None  # a device backend (hfreduce.device) for device buffers; None: the engine's own
    seq: int = 0
    g0: int = 0
    nchunks: int = 1

    @property
    def name(self) -> str:
        return KIND_NAMES.get(self.kind, f"op{self.kind}")


class Work:
    """Handle of a submitted collective: ``wait(timeout)``, ``is_completed()``."""

    def __init__(self, spec: OpSpec) -> None:
        self.spec = spec
        self._event = threading.Event()
        self._error: HFReduceError | None = None
        self.started = 0.0
        self.finished = 0.0

    def _finish(self, error: HFReduceError | None = None) -> None:
        self._error = error
        self.finished = time.monotonic()
        self.spec.keep = None
        self._event.set()

    def is_completed(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the collective completed; raise :class:`HFReduceError` if it failed.

        With ``timeout`` (seconds), raise :class:`HFReduceTimeout` when it has not completed by
        then (the collective keeps running; call ``wait`` again). Returns True.
        """
        if not self._event.wait(timeout):
            raise HFReduceTimeout(f"{self.spec.name} did not complete within {timeout} s (still running)")
        if self._error is not None:
            raise self._error
        return True

    def exception(self) -> HFReduceError | None:
        return self._error

    def __repr__(self) -> str:
        state = "failed" if self._error else ("done" if self.is_completed() else "pending")
        return f"<Work {self.spec.name} {self.spec.nbytes} bytes {state}>"


class HostBackend:
    """Caller buffers in host memory: the three device-seam operations are plain memcpy.

    ``direct`` says the kernels may read and write the caller's buffer themselves: then a rank
    reduces its own slice straight from its buffer (no staging copy of that slice) and, on one
    node, stores the result straight into its output too (no copy-out of that slice). A device
    backend sets it False and stages everything.
    """

    name = "host"
    direct = True
    trace = False  # a device backend that records timings gets on_reduced(spec, g, t0, t1) calls

    def copy_chunk_out(self, spec: OpSpec, c0: int, c1: int, slot: np.ndarray) -> None:
        """Stage virtual bytes [c0, c1) of the caller's input into ``slot`` (zeros where none)."""
        n = c1 - c0
        inp = spec.inp
        if inp is None:
            K.zero(slot[:n])
            return
        i0, i1 = spec.in_off, spec.in_off + inp.nbytes
        a, b = max(c0, i0), min(c1, i1)
        if a >= b:
            K.zero(slot[:n])
            return
        if a > c0:
            K.zero(slot[: a - c0])
        if b < c1:
            K.zero(slot[b - c0: n])
        K.copy(slot[a - c0: b - c0], inp[a - i0: b - i0])

    def chunk_ready(self, spec: OpSpec, g: int) -> bool:
        return True

    def chunk_in_done(self, spec: OpSpec, g: int) -> bool:
        """Has the copy-in of chunk ``g`` finished (its sources in the arena may be reused)?"""
        return True

    def copy_chunk_in(self, spec: OpSpec, c0: int, parts: list[tuple[int, np.ndarray]]) -> None:
        """Write final chunk pieces ``(virtual offset, bytes)`` into the caller's output."""
        out, o0 = spec.out, spec.out_off
        for v, src in parts:
            K.copy(out[v - o0: v - o0 + src.nbytes], src)


class _Cma:
    """A rank's own buffer, read and written by its peers with process_vm_readv/writev (``_pipeline_cma``)."""

    __slots__ = ("pid", "addr")

    def __init__(self, pid: int, addr: int) -> None:
        self.pid, self.addr = pid, addr


def c_loops_enabled() -> bool:
    """Whether collectives run the pipeline loops in C: the C kernels are built, and
    ``HFREDUCE_PIPELINE=python`` does not ask for the Python loop (tests, debugging)."""
    return K.KERNEL == "c-simd" and os.environ.get("HFREDUCE_PIPELINE", "").lower() != "python"


class Engine:
    """Runs this rank's collectives in submission order on one thread."""

    #: single-copy reads between the node's ranks work (the group's start-up probe said so)
    cma = False

    def __init__(self, sync: NodeSync, arena, layout: Layout, nnodes: int, internode=None,
                 backend: HostBackend | None = None) -> None:
        self.sync = sync
        self.arena = arena
        self.lay = layout
        self.L = layout.local
        self.me = sync.me
        self.K = layout.slots
        self.CB = layout.chunk
        self.nnodes = nnodes
        self.internode = internode
        self.backend = backend or HostBackend()
        self.c_loops = c_loops_enabled()
        self._queue: collections.deque[Work] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._error: HFReduceError | None = None
        self.seq = 0
        self.next_g = 0
        self.completed = 0
        self.single_copy_ops = 0  # collectives that took the single-copy path (one node or lanes)
        self.lanes = None  # hfreduce.lanes.Lanes when allreduce across nodes runs in lanes
        self.lane_ops = 0
        self._thread = threading.Thread(target=self._run, name=f"hfreduce-engine-{sync.rank}", daemon=True)
        self._thread.start()

    # -- queue -------------------------------------------------------------------------------
    def submit(self, spec: OpSpec) -> Work:
        work = Work(spec)
        with self._cv:
            if self._error is not None:
                work._finish(self._error)
                return work
            if self._stop:
                work._finish(HFReduceError("the process group was destroyed"))
                return work
            self._queue.append(work)
            self._cv.notify()
        return work

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                work = self._queue[0]
            work.started = time.monotonic()
            err = self._error
            if err is None:
                try:
                    self._execute(work.spec)
                except HFReduceError as exc:
                    err = self._fail(exc)
                except Exception as exc:  # noqa: BLE001 - a bug must not hang the others
                    log.exception("hfreduce engine failed")
                    err = self._fail(HFReduceError(f"internal error in {work.spec.name} on rank "
                                                   f"{self.sync.rank}: {exc!r}", detected_by=self.sync.rank))
            with self._cv:
                self._queue.popleft()
            if err is None:
                self.completed += 1
            work._finish(err)
            counters.record(work.spec.name, work.spec.nbytes, work.finished - work.started, err is None)

    def _fail(self, exc: HFReduceError) -> HFReduceError:
        err = self.sync.record(exc) if not self.sync.aborted() else (self.sync.first_error() or exc)
        with self._cv:
            self._error = err
        if self.lanes is not None:
            self.lanes.abort(err)
        if self.internode is not None:
            self.internode.abort(err)
        return err

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def error(self) -> HFReduceError | None:
        return self._error

    # -- one collective ------------------------------------------------------------------------
    def _execute(self, spec: OpSpec) -> None:
        sync, lay = self.sync, self.lay
        sync.check()
        spec.seq = self.seq + 1
        spec.nchunks = max(1, -(-spec.nbytes // self.CB))
        spec.g0 = self.next_g
        # descriptor first, then the sequence number that makes it valid
        hr, ho = spec.heap if spec.heap is not None else (-1, 0)
        loc_kind = 0 if spec.heap is None else 1
        if self._cma_eligible(spec):
            loc_kind, hr, ho = 2, os.getpid(), _addr(spec.inp)
        for f, v in ((lay.KIND, spec.kind), (lay.NBYTES, spec.nbytes), (lay.DTYPE, spec.dtype),
                     (lay.OP, spec.op), (lay.ROOT, spec.root), (lay.FIRST_G, spec.g0),
                     (lay.LOC_KIND, loc_kind), (lay.LOC_HEAP, hr), (lay.LOC_OFF, ho)):
            sync.set(f, v)
        sync.publish(lay.OP_SEQ, spec.seq)
        self.seq = spec.seq
        self.next_g = spec.g0 + spec.nchunks
        sync.wait(lambda: sync.min(lay.OP_SEQ) >= spec.seq,
                  lambda: (sync.argmin(lay.OP_SEQ), f"it did not enter {spec.name} #{spec.seq}"))
        locs = self._check_descriptors(spec)
        if self._lane_eligible(spec):
            if any(loc is None for loc in locs):
                raise MismatchError(f"{spec.name} #{spec.seq} across nodes: the ranks of node {sync.node} must all "
                                    "pass host buffers, or all device buffers", node=sync.node, detected_by=sync.rank)
            self.single_copy_ops += 1
            self.lane_ops += 1
            self._pipeline_lanes(spec, locs)
            return
        if all(isinstance(loc, _Cma) for loc in locs):
            self.single_copy_ops += 1
            self._pipeline_cma(spec, locs)
            return
        # some rank cannot take the single-copy path for this one: everyone stages
        locs = [None if isinstance(loc, _Cma) else loc for loc in locs]
        if self.lanes is not None:
            self.lanes.announce(spec)
        if self.internode is not None:
            self.internode.submit(spec, locs)
        self._pipeline(spec, locs)

    def _cma_eligible(self, spec: OpSpec) -> bool:
        """May this rank's part of ``spec`` take the single-copy path (all ranks must agree)?"""
        # (an allreduce's input is its output, the whole buffer; the start-up probe needs the C kernels)
        if self._lane_eligible(spec):
            return spec.heap is None  # a registered buffer is reached where the peers map its heap
        return self.cma and self.nnodes == 1 and spec.kind == ALLREDUCE and spec.heap is None and self._c_loop(spec)

    def _lane_eligible(self, spec: OpSpec) -> bool:
        """Does ``spec`` run in lanes (:mod:`hfreduce.lanes`): an allreduce of host buffers (own or
        registered: peers reach both by address) across nodes, when the whole group enabled lanes."""
        return self.lanes is not None and spec.kind == ALLREDUCE and self._c_loop(spec)

    def _c_loop(self, spec: OpSpec) -> bool:
        """Does ``spec`` run in the C loops (host buffers, C kernels, not HFREDUCE_PIPELINE=python)?"""
        return self.c_loops and spec.backend is None and type(self.backend) is HostBackend

    def _check_descriptors(self, spec: OpSpec) -> list[tuple[int, int] | None]:
        sync, lay = self.sync, self.lay
        mine = [spec.kind, spec.nbytes, spec.dtype, spec.op, spec.root, spec.g0]
        fields = (lay.KIND, lay.NBYTES, lay.DTYPE, lay.OP, lay.ROOT, lay.FIRST_G)
        locs: list[tuple[int, int] | None] = []
        for r in range(self.L):
            theirs = [sync.get(r, f) for f in fields]
            if theirs != mine:
                g = sync.local_ranks[r]
                raise MismatchError(
                    f"rank {g} (node {sync.node}) called {_describe(theirs)} while rank {sync.rank} called "
                    f"{_describe(mine)}", rank=g, node=sync.node, detected_by=sync.rank)
            kind = sync.get(r, lay.LOC_KIND)
            if kind == 1:
                locs.append((sync.get(r, lay.LOC_HEAP), sync.get(r, lay.LOC_OFF)))
            elif kind == 2:
                locs.append(_Cma(sync.get(r, lay.LOC_HEAP), sync.get(r, lay.LOC_OFF)))
            else:
                locs.append(None)
        return locs

    def location(self, spec: OpSpec, locs, r: int, g: int, a: int, b: int) -> np.ndarray:
        """Rank ``r``'s input location of chunk ``g``, chunk bytes [a, b)."""
        loc = locs[r]
        if loc is None:
            return self.arena.slots[r][g % self.K][a:b]
        base = loc[1] + (g - spec.g0) * self.CB
        return self.arena.heap_views[loc[0]][base + a: base + b]

    def chunk_range(self, spec: OpSpec, g: int) -> tuple[int, int]:
        c0 = (g - spec.g0) * self.CB
        return c0, min(spec.nbytes, c0 + self.CB)

    def _pipeline(self, spec: OpSpec, locs) -> None:
        if self._c_loop(spec):
            self._pipeline_c(spec, locs)
        else:
            self._pipeline_py(spec, locs)
        self._wait_consumed(spec)

    def _wait_consumed(self, spec: OpSpec) -> None:
        """My buffer and my slots are read (and, single-copy, written) by peers until every rank
        consumed the collective: wait for that before the caller gets its buffer back."""
        sync, lay = self.sync, self.lay
        gend = spec.g0 + spec.nchunks
        sync.wait(lambda: sync.min(lay.CONSUMED) >= gend,
                  lambda: (sync.argmin(lay.CONSUMED), f"it did not finish {spec.name} #{spec.seq}"))

    def _wait_timeout(self) -> float:
        t = self.sync.timeout
        return t * 1.5 + 1.0 if self.nnodes > 1 else t

    def _pipeline_c(self, spec: OpSpec, locs) -> None:
        """The loop below, in C without the GIL (``hfreduce._C.pipeline``); Python only checks
        liveness and the deadline each time the loop has been idle for POLL seconds."""
        from .sync import POLL

        sync, lay, L, me = self.sync, self.lay, self.L, self.me
        gend = spec.g0 + spec.nchunks
        addrs, kinds = [], []
        for r in range(L):
            if locs[r] is None:
                addrs.append(_addr(self.arena.slots[r][0]))
                kinds.append(0)
            else:
                addrs.append(_addr(self.arena.heap_views[locs[r][0]][locs[r][1]:]))
                kinds.append(1)
        state = (spec.g0, spec.g0, spec.g0, spec.g0)
        if kinds[me]:
            state = (gend, gend, spec.g0, spec.g0)
            sync.publish(lay.POSTED, gend)
        inp, out = spec.inp, spec.out
        geo = self._geometry()
        io_in = (_addr(inp) if inp is not None and inp.nbytes else 0, spec.in_off, inp.nbytes if inp is not None else 0)
        io_out = (_addr(out) if out is not None and out.nbytes else 0, spec.out_off,
                  out.nbytes if out is not None else 0)
        multi = self.nnodes > 1
        kern = (spec.kdtype, spec.kop, spec.avg, int(multi), int(self.backend.direct))
        self._drive_c(lambda st: K._C.pipeline(sync.buf, geo, (L, me, self.K),
                                              (spec.g0, spec.nchunks, spec.nbytes, self.CB), addrs, kinds, io_in,
                                              io_out, kern, st, POLL, _SPIN) + (0,),
                      state, lambda s: self._laggard(spec, s[0], s[2], s[3]), spec)

    def _geometry(self) -> tuple:
        """Where the C loops find the node's words: (epoch, waiters, abort, final, rank block 0,
        stride, and the POSTED / REDUCED / CONSUMED fields)."""
        from .sync import ABORT

        lay = self.lay
        return (Layout.EPOCH_OFF, Layout.WAITERS, ABORT, Layout.FINAL, lay.word(0, 0), lay.stride, lay.POSTED,
                lay.REDUCED, lay.CONSUMED)

    def _drive_c(self, step, state: tuple, laggard, spec: OpSpec) -> None:
        """Call a C loop (``step(state) -> (status, state, errno)``) until it is done. The loop
        returns after POLL idle seconds (status 1), on the node's abort word (2) or when reading
        or writing a peer's memory failed (3); in between, Python checks liveness and the
        deadline, which moves whenever the state does."""
        sync = self.sync
        timeout = self._wait_timeout()
        deadline = time.monotonic() + timeout
        last = state
        while True:
            status, state, err = step(state)
            if status == 0:
                return
            if status in (2, 3):
                sync.check_peers()  # a dead peer is named
                sync.check()
            if status == 3:
                raise HFReduceError(f"{spec.name} #{spec.seq} on rank {sync.rank}: reading or writing a peer's "
                                    f"buffer failed: {os.strerror(err)} (set HFREDUCE_CMA=0 to stage through "
                                    "shared memory instead)", detected_by=sync.rank)
            now = time.monotonic()
            if state != last:
                last, deadline = state, now + timeout
            sync.check_peers()
            if now >= deadline:
                sync.wait(lambda: False, lambda s=state: laggard(s), timeout=0)

    def _pipeline_cma(self, spec: OpSpec, locs: list[_Cma]) -> None:
        """One node, every rank's own buffer: each rank reduces its slice of every chunk by reading
        the peers' inputs straight from their memory and writes each finished block straight back
        into theirs (``hfreduce._C.pipeline_cma``: no staging in the arena, no copy-out pass).
        See the C code's note."""
        from .sync import POLL

        sync, lay, L = self.sync, self.lay, self.L
        gend = spec.g0 + spec.nchunks
        sync.publish(lay.POSTED, gend)  # my input is in place: peers may read it
        geo = self._geometry()
        pids, addrs = [loc.pid for loc in locs], [loc.addr for loc in locs]
        kern = (spec.kdtype, spec.kop, spec.avg)
        tmp = self._cma_tmp()
        self._drive_c(lambda st: K._C.pipeline_cma(sync.buf, geo, (L, self.me),
                                                   (spec.g0, spec.nchunks, spec.nbytes, self.CB), pids, addrs,
                                                   kern, tmp, st, POLL, _SPIN),
                      (spec.g0, spec.g0), lambda s: self._laggard(spec, gend, s[0], s[1]), spec)
        self._wait_consumed(spec)

    def _pipeline_lanes(self, spec: OpSpec, locs: list) -> None:
        """Across nodes, own or registered host buffers: this rank's lane runs the whole collective
        for its slice (:mod:`hfreduce.lanes`, ``hfreduce._C.pipeline_lanes``). Own buffers are
        reached with process_vm_readv/writev (pid, address in their process); registered ones
        where their heap is mapped here."""
        sync, lay = self.sync, self.lay
        sync.publish(lay.POSTED, spec.g0 + spec.nchunks)  # my input is in place: peers may read it
        pids, addrs, direct = [], [], []
        for r, loc in enumerate(locs):
            if isinstance(loc, _Cma):
                pids.append(loc.pid)
                addrs.append(loc.addr)
                direct.append(0)
            else:
                here = _addr(self.arena.heap_views[loc[0]][loc[1]:])
                pids.append(sync.get(r, lay.PID))
                addrs.append(here if r == self.me else 0)
                direct.append(here)
        tmp = self._cma_tmp() if self.L > 1 else self.lanes.rbuf[:64]
        self.lanes.run(spec, self._geometry(), self.CB, pids, (addrs, direct), tmp, _SPIN)
        self._wait_consumed(spec)

    def _cma_tmp(self) -> np.ndarray:
        """The blocks the peers' bytes land in before they are added (L2-sized, 64-byte aligned)."""
        tmp = getattr(self, "_tmp", None)
        if tmp is None:
            size = max(16 << 10, min(256 << 10, (1 << 20) // (self.L - 1))) * (self.L - 1)  # L > 1 here
            tmp = self._tmp = aligned_empty(size)
        return tmp

    def _pipeline_py(self, spec: OpSpec, locs) -> None:
        sync, lay, L, me, Kslots = self.sync, self.lay, self.L, self.me, self.K
        backend = spec.backend or self.backend
        g0 = spec.g0
        gend = g0 + spec.nchunks
        multi = self.nnodes > 1
        avg_here = spec.avg if not multi else 0
        w_posted, w_reduced, w_consumed = lay.word(0, lay.POSTED), lay.word(0, lay.REDUCED), lay.word(0, lay.CONSUMED)
        stride, buf = lay.stride, sync.buf
        final_word = Layout.FINAL
        registered = locs[me] is not None
        nxt_in = nxt_ready = nxt_red = nxt_out = nxt_cons = g0
        if registered:
            nxt_in = nxt_ready = gend
            sync.publish(lay.POSTED, gend)

        def min_of(word: int) -> int:
            return K.min_of(buf, word, stride, L)

        def final(g: int) -> bool:
            if multi:
                return K.load(buf, final_word) > g
            return min_of(w_reduced) > g

        direct = backend.direct and not registered

        def fused(g: int) -> tuple[int, int, np.ndarray | None, np.ndarray | None]:
            """My slice of chunk g, and the caller's input / output over it when the kernel may
            read it straight from there (no staging) / store the final result straight there."""
            c0, c1 = self.chunk_range(spec, g)
            a, b = slices(c1 - c0, L)[me]
            first = dst2 = None
            if direct and b > a:
                if spec.inp is not None and spec.in_off <= c0 + a and c0 + b <= spec.in_off + spec.inp.nbytes:
                    first = spec.inp[c0 + a - spec.in_off: c0 + b - spec.in_off]
                if not multi and spec.out is not None and spec.out_off <= c0 + a and \
                        c0 + b <= spec.out_off + spec.out.nbytes:
                    dst2 = spec.out[c0 + a - spec.out_off: c0 + b - spec.out_off]
            return a, b, first, dst2

        while nxt_cons < gend:
            # 1. reduce my slice of the oldest chunk whose inputs are all in place
            if nxt_red < nxt_ready and min_of(w_posted) > nxt_red:
                g = nxt_red
                a, b, first, dst2 = fused(g)
                if backend.trace:
                    t_red = time.monotonic()
                if b > a:
                    dst = self.location(spec, locs, me, g, a, b)
                    srcs = [self.location(spec, locs, r, g, a, b) for r in range(L) if r != me]
                    if first is None and dst2 is None:
                        K.reduce(dst, srcs, spec.kdtype, spec.kop, avg_here)
                    else:
                        K.reduce(dst, srcs, spec.kdtype, spec.kop, avg_here, first=first, dst2=dst2)
                if backend.trace:
                    backend.on_reduced(spec, g, t_red, time.monotonic())
                nxt_red += 1
                sync.publish(lay.REDUCED, nxt_red)
                continue
            # 2. the device seam: a staged chunk becomes visible to the peers once it is ready
            if nxt_ready < nxt_in and backend.chunk_ready(spec, nxt_ready):
                nxt_ready += 1
                sync.publish(lay.POSTED, nxt_ready)
                continue
            # 3. stage the next chunk when its slot is free (everyone consumed chunk g - slots);
            #    my own slice is not staged when the kernel reads it from my buffer
            if nxt_in < gend and nxt_in - nxt_out < Kslots and min_of(w_consumed) > nxt_in - Kslots:
                g = nxt_in
                c0, c1 = self.chunk_range(spec, g)
                slot = self.arena.slots[me][g % Kslots]
                a, b, first, _ = fused(g)
                if first is None:
                    backend.copy_chunk_out(spec, c0, c1, slot)
                else:
                    backend.copy_chunk_out(spec, c0, c0 + a, slot[:a])
                    backend.copy_chunk_out(spec, c0 + b, c1, slot[b: c1 - c0])
                nxt_in += 1
                continue
            # 4. copy out the oldest final chunk (but my slice, when the kernel stored it already)
            if nxt_out < nxt_red and final(nxt_out):
                g = nxt_out
                if spec.out is not None:
                    self._copy_out(spec, locs, g, skip_mine=fused(g)[3] is not None)
                nxt_out += 1
                if nxt_cons == g and backend.chunk_in_done(spec, g):  # host: done at once
                    nxt_cons = nxt_out
                    sync.publish(lay.CONSUMED, nxt_out)
                continue
            # 5. the device seam: an asynchronous copy-in finished, its arena sources may be reused
            if nxt_cons < nxt_out and backend.chunk_in_done(spec, nxt_cons):
                nxt_cons += 1
                sync.publish(lay.CONSUMED, nxt_cons)
                continue
            # nothing ready: sleep until a peer publishes (a device backend wakes us on copy completion)
            state = (nxt_in, nxt_ready, nxt_red, nxt_out)
            sync.wait(lambda s=state, c=nxt_cons: self._any_ready(spec, *s, gend, c, backend),
                      lambda s=state: self._laggard(spec, s[0], s[2], s[3]),
                      timeout=sync.timeout * (1.5 if multi else 1.0) + (1.0 if multi else 0.0))
        # my registered buffer and my slots are read by peers until every rank consumed the op
        sync.wait(lambda: min_of(w_consumed) >= gend,
                  lambda: (sync.argmin(lay.CONSUMED), f"it did not finish {spec.name} #{spec.seq}"))

    def _any_ready(self, spec, nxt_in, nxt_ready, nxt_red, nxt_out, gend, nxt_cons=None, backend=None) -> bool:
        sync, lay = self.sync, self.lay
        backend = backend or self.backend
        if nxt_red < nxt_ready and sync.min(lay.POSTED) > nxt_red:
            return True
        if nxt_ready < nxt_in and backend.chunk_ready(spec, nxt_ready):
            return True
        if nxt_cons is not None and nxt_cons < nxt_out and backend.chunk_in_done(spec, nxt_cons):
            return True
        if nxt_in < gend and nxt_in - nxt_out < self.K and sync.min(lay.CONSUMED) > nxt_in - self.K:
            return True
        if nxt_out < nxt_red:
            if self.nnodes > 1:
                return sync.node_word(Layout.FINAL) > nxt_out
            return sync.min(lay.REDUCED) > nxt_out
        return False

    def _laggard(self, spec, nxt_in, nxt_red, nxt_out) -> tuple[int | None, str]:
        sync, lay = self.sync, self.lay
        what = f"{spec.name} #{spec.seq}, chunk {nxt_out - spec.g0 + 1} of {spec.nchunks}"
        if sync.min(lay.POSTED) <= nxt_red:
            return sync.argmin(lay.POSTED), f"its input of {what} never arrived"
        if self.nnodes > 1:
            return None, f"the inter-node tree did not deliver {what}"
        if sync.min(lay.REDUCED) <= nxt_out:
            return sync.argmin(lay.REDUCED), f"it did not reduce its slice of {what}"
        return sync.argmin(lay.CONSUMED), f"it did not copy out {what}"

    def _copy_out(self, spec: OpSpec, locs, g: int, skip_mine: bool = False) -> None:
        c0, c1 = self.chunk_range(spec, g)
        o0, o1 = spec.out_off, spec.out_off + spec.out.nbytes
        lo, hi = max(c0, o0) - c0, min(c1, o1) - c0
        if lo >= hi:
            return
        parts = []
        for s, (a, b) in enumerate(slices(c1 - c0, self.L)):
            a, b = max(a, lo), min(b, hi)
            if a >= b or (s == self.me and (skip_mine or (locs[s] is not None and spec.kind == ALLREDUCE))):
                continue  # my output already holds my slice's result
            parts.append((c0 + a, self.location(spec, locs, s, g, a, b)))
        (spec.backend or self.backend).copy_chunk_in(spec, c0, parts)




#: Busy-wait iterations before sleeping on the futex (short: these machines are often oversubscribed).
_SPIN = 100


def aligned_empty(n: int) -> np.ndarray:
    """``n`` bytes of private memory starting on a cache line."""
    raw = np.empty(n + 64, np.uint8)
    off = (-_addr(raw)) % 64
    return raw[off: off + n]


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _describe(d: list[int]) -> str:
    from .kernels import DTYPE_NAMES

    kind, nbytes, dtype, op, root, g0 = d
    ops = {0: "SUM", 1: "AVG", 2: "MAX", 3: "MIN", 4: "-"}
    s = f"{KIND_NAMES.get(kind, kind)}({nbytes} bytes, {DTYPE_NAMES.get(dtype, dtype)}"
    if kind in (ALLREDUCE, REDUCE, REDUCE_SCATTER):
        s += f", {ops.get(op, op)}"
    if root >= 0:
        s += f", root {root}"
    return s + f", chunk #{g0})"
