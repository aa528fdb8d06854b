"""Progress counters, waiting, and failure records in the node's control block.

Every local rank owns a few monotonic counters (chunks posted, reduced, consumed; the operation
it has entered) and writes nothing else in the control block but its own error record. A rank
that waits for its peers reads their counters and sleeps on the node's epoch futex; every
publish bumps the epoch and wakes the sleepers.

[Note: no silent hang]
A wait never sleeps longer than ``POLL`` at a time. Between sleeps it checks, in order: the
node's abort word (some rank, or the node leader on behalf of a remote node, recorded a
failure: raise that failure, naming the peer at fault), the liveness of the local peers
(pidfds: a peer that died, or left the group, while others wait for it is a failure), and the
deadline (no progress within the group's timeout: the laggard is blamed by name). Recording a
failure sets the abort word and wakes every sleeper, so all local ranks raise within one poll.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

from . import kernels as K
from .errors import KIND_CODES, KINDS, HFReduceError, HFReduceTimeout, PeerFailed, kind_of
from .shm import Layout, NodeArena

__all__ = ["NodeSync", "POLL"]

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between checks of abort, liveness and deadline while waiting
ABORT = 4  # node word: set once some rank recorded a failure
_KIND_NAMES = {v: k for k, v in KIND_CODES.items()}


class NodeSync:
    """This rank's view of its node's control block."""

    def __init__(self, arena: NodeArena, me: int, local_ranks: Sequence[int], pids: Sequence[int],
                 node_names: Sequence[str], node_index: int, rank: int, timeout: float) -> None:
        self.arena = arena
        self.lay: Layout = arena.layout
        self.buf = arena.ctrl
        self.me = me
        self.L = len(local_ranks)
        self.local_ranks = list(local_ranks)
        self.pids = list(pids)
        self.node_names = list(node_names)
        self.node_index = node_index
        self.node = node_names[node_index]
        self.rank = rank
        self.timeout = timeout
        self.stride = self.lay.stride
        self.epoch_off = Layout.EPOCH_OFF
        self.waiters = Layout.WAITERS
        self._pidfds: dict[int, int] = {}
        self._poll = select.poll() if hasattr(select, "poll") else None
        # a poll object refuses concurrent poll() calls ("concurrent poll() invocation"), and
        # dead_peers() runs from the caller's thread and the engine's threads alike
        self._poll_lock = threading.Lock()
        for r, pid in enumerate(self.pids):
            if r == me:
                continue
            try:
                fd = os.pidfd_open(pid)
            except (OSError, AttributeError):
                continue  # os.kill(pid, 0) fallback in dead_peers()
            self._pidfds[fd] = r
            if self._poll is not None:
                self._poll.register(fd, select.POLLIN)
        self._dead: set[int] = set()

    # -- counters ----------------------------------------------------------------------------
    def w(self, r: int, field: int) -> int:
        return self.lay.word(r, field)

    def get(self, r: int, field: int) -> int:
        return K.load(self.buf, self.lay.word(r, field))

    def set(self, field: int, value: int, r: int | None = None) -> None:
        K.store(self.buf, self.lay.word(self.me if r is None else r, field), value)

    def publish(self, field: int, value: int) -> None:
        """Store one of my counters and wake every waiter of the node."""
        K.publish(self.buf, self.lay.word(self.me, field), value, self.epoch_off, self.waiters)

    def publish_node(self, word: int, value: int) -> None:
        K.publish(self.buf, word, value, self.epoch_off, self.waiters)

    def wake(self) -> None:
        K.publish(self.buf, self.waiters, 0, self.epoch_off, self.waiters)

    def min(self, field: int) -> int:
        return K.min_of(self.buf, self.lay.word(0, field), self.stride, self.L)

    def node_word(self, word: int) -> int:
        return K.load(self.buf, word)

    def argmin(self, field: int) -> int:
        vals = [self.get(r, field) for r in range(self.L)]
        return vals.index(min(vals))

    # -- failures ----------------------------------------------------------------------------
    def aborted(self) -> bool:
        return K.load(self.buf, ABORT) != 0

    def record(self, err: HFReduceError) -> HFReduceError:
        """Write ``err`` as this rank's failure record (first one wins) and abort the node."""
        lay = self.lay
        if self.get(self.me, lay.ERR_FLAG) == 0:
            kind = kind_of(err)
            node = self.node_names.index(err.node) if err.node in self.node_names else -1
            msg = str(err).encode("utf-8", "replace")[: Layout.MSG_BYTES]
            view = self.arena.msg_view(self.me)
            view[: len(msg)] = memoryview(msg)
            for field, val in ((lay.ERR_TIME, time.monotonic_ns()),
                               (lay.ERR_RANK, -1 if err.rank is None else err.rank),
                               (lay.ERR_KIND, KIND_CODES[kind]), (lay.ERR_NODE, node),
                               (lay.ERR_BY, self.rank if err.detected_by is None else err.detected_by),
                               (lay.ERR_LEN, len(msg))):
                self.set(field, val)
            self.set(lay.ERR_FLAG, 1)
        K.publish(self.buf, ABORT, 1, self.epoch_off, self.waiters)
        return self.first_error() or err

    def first_error(self) -> HFReduceError | None:
        """The earliest failure any local rank recorded (None when there is none)."""
        lay = self.lay
        best = None
        for r in range(self.L):
            if self.get(r, lay.ERR_FLAG):
                t = self.get(r, lay.ERR_TIME)
                if best is None or t < best[0]:
                    best = (t, r)
        if best is None:
            return None
        r = best[1]
        n = self.get(r, lay.ERR_LEN)
        msg = bytes(self.arena.msg_view(r)[:n]).decode("utf-8", "replace")
        cls = KINDS.get(_KIND_NAMES.get(self.get(r, lay.ERR_KIND), "error"), HFReduceError)
        culprit = self.get(r, lay.ERR_RANK)
        node = self.get(r, lay.ERR_NODE)
        return cls(msg, rank=None if culprit < 0 else culprit,
                   node=self.node_names[node] if 0 <= node < len(self.node_names) else None,
                   detected_by=self.get(r, lay.ERR_BY))

    def await_error(self, seconds: float, stop=lambda: False) -> HFReduceError | None:
        """Wait up to ``seconds`` (or until ``stop()``) for a failure to be recorded on this node;
        the first one, or None. A data connection that breaks is blamed on its peer only after
        this, so a precise diagnosis travelling another way (out of band, an ABORT frame, a local
        peer's record) wins."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.aborted() and not stop():
            time.sleep(0.01)
        if self.aborted():
            return self.first_error() or HFReduceError("aborted")
        return None

    def check(self) -> None:
        """Raise the node's recorded failure, if any."""
        if self.aborted():
            err = self.first_error()
            raise err if err is not None else HFReduceError("the group was aborted")

    def dead_peers(self) -> list[int]:
        """Local ranks whose process has exited (found by pidfd, else by kill -0)."""
        if self._poll is not None and self._pidfds:
            with self._poll_lock:
                ready = self._poll.poll(0)
            for fd, _ev in ready:
                r = self._pidfds.get(fd)
                if r is not None:
                    self._dead.add(r)
        for r, pid in enumerate(self.pids):
            if r == self.me or r in self._dead or r in self._pidfds.values():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self._dead.add(r)
            except PermissionError:
                pass
        return sorted(self._dead)

    def pidfds(self) -> list[tuple[int, int]]:
        """(pidfd, local rank) of every local peer watched by pidfd (for loops that poll them in C)."""
        return sorted(self._pidfds.items())

    def departed(self, r: int) -> bool:
        return self.get(r, self.lay.DEPARTED) != 0

    def peer_failure(self, r: int) -> HFReduceError:
        g = self.local_ranks[r]
        if self.departed(r):
            return PeerFailed(f"rank {g} (node {self.node}) left the group (destroy) while rank {self.rank} "
                              "still needed it in a collective", rank=g, node=self.node, detected_by=self.rank)
        return PeerFailed(f"rank {g} (node {self.node}, pid {self.pids[r]}) died", rank=g, node=self.node,
                          detected_by=self.rank)

    def check_peers(self, include_departed: bool = True) -> None:
        """Record and raise a failure when a local peer died (or left, with ``include_departed``)."""
        for r in self.dead_peers():
            if include_departed or not self.departed(r):
                raise self.record(self.peer_failure(r))
        if include_departed:
            for r in range(self.L):
                if r != self.me and self.departed(r):
                    raise self.record(self.peer_failure(r))

    # -- waiting -----------------------------------------------------------------------------
    def wait(self, ready: Callable[[], bool], what: Callable[[], tuple[int | None, str]],
             timeout: float | None = None) -> None:
        """Sleep until ``ready()``; on abort, a dead peer or no progress within the timeout, raise.

        ``what()`` names the laggard on timeout: (local rank or None, description).
        """
        if ready():
            return
        timeout = self.timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = start + timeout
        next_check = start + POLL
        buf, eoff, wt = self.buf, self.epoch_off, self.waiters
        while True:
            e = K.load32(buf, eoff)
            if ready():
                return
            if K.load(buf, ABORT):
                self.check()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + POLL
                self.check_peers()
                if now >= deadline:
                    r, desc = what()
                    g = None if r is None else self.local_ranks[r]
                    who = f"rank {g} (node {self.node})" if g is not None else "a peer"
                    raise self.record(HFReduceTimeout(
                        f"{who} made no progress for {timeout:.1f} s: {desc} (rank {self.rank} waited; "
                        "a stuck, stopped or much slower peer, or mismatched calls)", rank=g,
                        node=self.node if g is not None else None, detected_by=self.rank))
            K.epoch_wait(buf, eoff, wt, e, min(POLL, max(deadline - now, 0.001)))

    def close(self) -> None:
        for fd in self._pidfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._pidfds.clear()
