"""The node's shared memory for one rank: arena, heaps, control block, single-copy probe.

The leader creates the arena, every rank its heap; all map all, then every creator unlinks its
segments (see :mod:`hfreduce.shm`). Then every rank probes whether it can read its peers'
private memory (see :meth:`NodeMemory._probe_cma`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from . import kernels as K
from .errors import InitError
from .shm import Layout, NodeArena, Segment, process_start_time, segment_name
from .sync import NodeSync

__all__ = ["NodeMemory"]

log = logging.getLogger(__name__)


class NodeMemory:
    """This rank's view of its node's shared memory (made and mapped by the constructor).

    ``check_relayed`` raises a start-up failure that rank 0 relayed (the rendezvous's), so a
    rank waiting here for a peer learns at once that another node failed.
    """

    def __init__(self, *, rank: int, local_ranks: list[int], pids: list[int], starts: list[int], session: str,
                 node_names: list[str], node_index: int, slots: int, chunk: int, heap_bytes: int, timeout: float,
                 deadline: float, check_relayed: Callable[[], None]) -> None:
        self.rank = rank
        self.local_ranks = local_ranks
        self.local_rank = local_ranks.index(rank)
        self.node = node_names[node_index]
        self._pids, self._starts = pids, starts
        self._check_relayed = check_relayed
        self.layout = Layout(len(local_ranks), slots, chunk)
        self.arena: NodeArena | None = None
        self.sync: NodeSync | None = None
        self.created: list[Segment] = []
        self.cma = False
        try:
            self._map(session, node_names, node_index, heap_bytes, timeout, deadline)
        except BaseException:
            self.close()
            raise

    def _map(self, session: str, node_names: list[str], node_index: int, heap_bytes: int, timeout: float,
             deadline: float) -> None:
        lay, me = self.layout, self.local_rank
        owner = self.local_ranks[0]
        names = [segment_name(self._pids[r], self._starts[r], session, f"h{i}")
                 for i, r in enumerate(self.local_ranks)]
        arena_name = segment_name(self._pids[owner], self._starts[owner], session, "arena")
        heap = Segment.create(names[me], heap_bytes)
        self.created.append(heap)
        if me == 0:
            arena = Segment.create(arena_name, lay.total, reserve=True)
            self.created.append(arena)
            words = np.frombuffer(arena.map, np.int64, count=2)
            words[Layout.LOCAL] = lay.local
            words[Layout.MAGIC] = Layout.MAGIC_VALUE
            del words
        else:
            arena = Segment.open(arena_name, deadline, alive=lambda: self._alive(owner))
        heaps = [heap if i == me else Segment.open(n, deadline, alive=lambda r=r: self._alive(r))
                 for i, (n, r) in enumerate(zip(names, self.local_ranks, strict=True))]
        if arena.size != lay.total:
            raise InitError(f"node {self.node}: the arena has {arena.size} bytes, expected {lay.total} "
                            "(ranks of one node run different hfreduce versions?)")
        self.arena = NodeArena(lay, arena, heaps, me)
        self.sync = NodeSync(self.arena, me, self.local_ranks, [self._pids[r] for r in self.local_ranks],
                             node_names, node_index, self.rank, timeout)
        sync = self.sync
        sync.set(lay.PID, os.getpid())
        # a word of my private memory that the peers try to read (see _probe_cma)
        self._cma_word = ctypes.c_int64(os.getpid())
        sync.set(lay.CMA_ADDR, ctypes.addressof(self._cma_word))
        sync.publish(lay.ATTACHED, 1)
        sync.wait(lambda: self._check_relayed() or sync.min(lay.ATTACHED) >= 1,
                  lambda: (sync.argmin(lay.ATTACHED), "it did not map the node's shared memory"),
                  timeout=max(0.1, deadline - time.monotonic()))
        for seg in self.created:  # every local rank maps everything: unlink (see shm's note)
            seg.unlink()
        self.cma = self._probe_cma(deadline)

    def _probe_cma(self, deadline: float) -> bool:
        """Can every local rank read every other's private memory (process_vm_readv)? All or none.

        [Note: single-copy reads] On one node, an allreduce of the callers' own buffers need not
        stage them through shared memory: a rank reads its peers' bytes straight out of their
        address spaces and writes its results straight into them (cross-memory attach: the kernel
        copies once; see engine._pipeline_cma). That needs ptrace access
        between the ranks (same user, and Yama's ptrace_scope 0, or a container that allows it);
        each rank tries to read a known word of every peer and publishes its verdict, and the
        path is used only when all succeeded and none disabled it with HFREDUCE_CMA=0.
        """
        sync, lay = self.sync, self.layout
        ok = len(self.local_ranks) > 1 and K.KERNEL == "c-simd" and hasattr(K._C, "pipeline_cma") and \
            os.environ.get("HFREDUCE_CMA", "1").strip().lower() not in ("0", "no", "off", "false")
        if ok:
            for r in range(len(self.local_ranks)):
                if r == self.local_rank:
                    continue
                pid = sync.get(r, lay.PID)
                try:
                    got = K._C.cma_probe(pid, sync.get(r, lay.CMA_ADDR), 8)
                except OSError as exc:
                    log.debug("hfreduce: no single-copy reads from local rank %d (pid %d): %s", r, pid, exc)
                    ok = False
                    break
                if int.from_bytes(got, "little", signed=True) != pid:
                    ok = False
                    break
        sync.publish(lay.CMA_OK, 1 if ok else 2)
        sync.wait(lambda: self._check_relayed() or sync.min(lay.CMA_OK) >= 1,
                  lambda: (sync.argmin(lay.CMA_OK), "it did not finish the shared-memory start-up"),
                  timeout=max(0.1, deadline - time.monotonic()))
        return all(sync.get(r, lay.CMA_OK) == 1 for r in range(len(self.local_ranks)))

    def _alive(self, rank: int) -> None:
        self._check_relayed()
        if process_start_time(self._pids[rank]) != self._starts[rank]:
            end = time.monotonic() + 2.0  # a failing rank reports its cause through rank 0: wait for it
            while time.monotonic() < end and self.rank != 0:
                self._check_relayed()
                time.sleep(0.02)
            raise InitError(f"rank {rank} (node {self.node}) died during start-up")

    def close(self) -> None:
        """Unmap everything and close the segments this rank created (the group's teardown)."""
        if self.sync is not None:
            self.sync.close()
            self.sync = None
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        for seg in self.created:
            seg.close()
        self.created = []
