"""Lanes: an allreduce across nodes as one double binary tree per slice owner.

Local rank ``s`` of every node owns slice ``s`` of each chunk on its node; the ranks with the
same local rank form a lane, and each lane runs the double binary tree (:mod:`hfreduce.tree`)
for its slice on its own connections. The whole per-chunk loop (reduce my slice over the node
with single-copy reads, up both trees, down both trees, write the final slice into the local
peers' buffers) is one C call without the GIL: ``hfreduce._C.pipeline_lanes``, whose note gives
the order and why it cannot deadlock. Nothing is staged in the arena and no thread hand-off
happens per chunk; the node leader's tree threads (:mod:`hfreduce.internode`) carry the other
collectives.

Up and down run on two threads of the rank where the group spans zones (or
``HFREDUCE_LANE_OVERLAP=1``), so a link carries one chunk's partial one way while the previous
chunk's final comes back the other; elsewhere one chunk after the other on one thread.

Used for allreduce of host buffers when every node has the same number of ranks, single-copy
reads work on every node (or there is one rank per node), the C loops are built, and
``HFREDUCE_LANES`` is not ``0``; all ranks agree at start-up (``info()["lanes"]``).

[Note: failures in a lane]
The C loop watches the node's abort word, the local peers' pidfds and its own deadlines, and
returns with what went wrong. A rank whose collective fails sends an ABORT frame naming the
culprit down each of its lane connections (closing instead a connection it left in the middle
of a frame), so its lane peers on other nodes raise the same error even when that node's leader
is the one that died. A connection that closes or stays silent is blamed on the lane peer only
after a short wait for such a precise diagnosis (through an ABORT frame or the node's abort
word, which the leaders' out-of-band links also set), as the leader's tree does.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import msgpack
import numpy as np

from network.errors import TransportError
from network.transport import MAGIC, PREFIX_SIZE, Connection

from . import kernels as K
from .engine import aligned_empty
from .errors import HFReduceError, HFReduceTimeout, MismatchError, PeerFailed, error_from_wire, error_to_wire
from .sync import POLL, NodeSync
from .tree import Tree
from .wire import DATA_HEADER, T_DATA, mismatch_error

__all__ = ["Lanes", "T_ABORT"]

T_ABORT = 2
_PREFIX = struct.Struct("!IIQ")

#: With up and down on two threads, how many chunks the up pass may run ahead of the down one.
OVERLAP_WINDOW = 2


def overlap_enabled(zones: int) -> bool:
    """Whether a lane runs up and down on two threads (the C code's note "up and down overlap"):
    ``HFREDUCE_LANE_OVERLAP`` = 1 / 0 forces it; by default on where the group spans more than one
    zone of the cluster description (a slow inter-zone link carries every byte both ways)."""
    v = os.environ.get("HFREDUCE_LANE_OVERLAP", "auto").strip().lower()
    if v in ("1", "on", "yes", "true"):
        return True
    if v in ("0", "off", "no", "false"):
        return False
    if v not in ("", "auto"):
        raise HFReduceError(f"environment variable HFREDUCE_LANE_OVERLAP={v!r}: expected 1, 0 or auto")
    return zones > 1


class Lanes:
    """This rank's lane: its connections to the lane peers of its tree neighbours."""

    def __init__(self, sync: NodeSync, trees: tuple[Tree, Tree], node: int, node_names: list[str],
                 local_groups: list[list[int]], links: list[tuple[Connection, int, int]], timeout: float,
                 chunk: int, zones: int = 1) -> None:
        self.sync = sync
        self.overlap = overlap_enabled(zones)
        self.node_names = node_names
        self.local_groups = local_groups
        self.lane = sync.me
        self.links = links  # (connection, tree, peer node)
        self.timeout = timeout
        self.net_timeout = timeout * 1.25 + 0.5  # a local diagnosis, when there is one, arrives first
        for conn, _, _ in links:
            if conn.buffered:
                raise HFReduceError("hfreduce lanes: a lane connection has unread bytes before its first collective")
        self.fds = [c.fileno() for c, _, _ in links]
        spec = []
        for t, tree in enumerate(trees):
            parent = tree.parent[node]
            up = next((i for i, (_, lt, n) in enumerate(links) if lt == t and n == parent), -1) if parent >= 0 else -1
            kids = tuple(next(i for i, (_, lt, n) in enumerate(links) if lt == t and n == k) for k in tree.children[node])
            spec.append((up, kids))
        self.trees = tuple(spec)
        maxk = max(len(k) for _, k in self.trees)
        self.rbuf = aligned_empty(max(1, maxk) * (chunk // 2 + 128))
        self._dead_links: set[int] = set()

    def peer(self, i: int) -> tuple[int, str]:
        """(global rank, node name) of the lane peer on link ``i``."""
        n = self.links[i][2]
        return self.local_groups[n][self.lane], self.node_names[n]

    def describe(self) -> dict:
        return {f"tree{t}": {"parent": self.links[up][2] if up >= 0 else -1, "children": [self.links[k][2] for k in kids]}
                for t, (up, kids) in enumerate(self.trees)}

    # -- one collective ------------------------------------------------------------------------
    def run(self, spec, geo: tuple, chunk: int, pids: list[int], addrs: tuple[list[int], list[int]], tmp: np.ndarray,
            spin: int) -> None:
        """Run ``spec`` in this lane; ``addrs`` = (each local rank's buffer address in its own
        process, or 0; its address in this process where it is mapped here, else 0)."""
        sync = self.sync
        pidfds = sync.pidfds()
        status, done, err, where, got, partial = K._C.pipeline_lanes(
            sync.buf, geo, (sync.L, sync.me), (spec.g0, spec.nchunks, spec.nbytes, chunk), pids, addrs,
            (spec.kdtype, spec.kop, spec.avg), tmp, self.rbuf, self.fds, self.trees,
            (spec.kind, spec.dtype, spec.op, spec.root, spec.seq, spec.nbytes),
            ([fd for fd, _ in pidfds], [r for _, r in pidfds]), (self.timeout, self.net_timeout, POLL), spin,
            OVERLAP_WINDOW if self.overlap else -1)
        if status == 0:
            return
        self._dead_links.update(i for i in range(len(self.links)) if partial >> i & 1)
        raise self._failure(spec, status, done, err, where, got)

    def _failure(self, spec, status: int, done: int, err: int, where: int, got: bytes) -> HFReduceError:
        sync = self.sync
        what = f"{spec.name} #{spec.seq}, chunk {min(done, spec.nchunks - 1) + 1} of {spec.nchunks}"
        if status in (2, 7):
            sync.check_peers()  # a dead local peer is named
            sync.check()
            if status == 7:
                return sync.record(sync.peer_failure(where))
            return HFReduceError("the group was aborted")
        if status == 3:
            sync.check_peers()
            sync.check()
            return HFReduceError(f"{what} on rank {sync.rank}: reading or writing a local peer's buffer failed: "
                                 f"{os.strerror(err)} (set HFREDUCE_CMA=0 to stage through shared memory instead)",
                                 detected_by=sync.rank)
        if status == 6 and where < 0:
            r = -1 - where
            try:
                sync.wait(lambda: False, lambda: (r, f"its input of {what} never arrived"), timeout=0)
            except HFReduceError as exc:
                return exc
        rank, node = self.peer(where)
        at = _peer_at(self.links[where][0]) if 0 <= where < len(self.links) else ""
        if status == 5:
            return self._unexpected(spec, done, where, got, rank, node)
        # a closed or silent connection: prefer a precise diagnosis arriving meanwhile
        diagnosis = sync.await_error(min(1.0, self.timeout))
        if diagnosis is not None:
            return diagnosis
        if status == 6:
            exc: HFReduceError = HFReduceTimeout(
                f"rank {rank} (node {node}{at}) sent nothing for {self.net_timeout:.1f} s in {what} (stuck, stopped, "
                "far behind, or the network to it is cut)", rank=rank, node=node, detected_by=sync.rank)
        else:
            why = os.strerror(err) if err else "connection closed"
            exc = PeerFailed(f"rank {rank} (node {node}{at}) died or lost its connection in {what} ({why})", rank=rank,
                             node=node, detected_by=sync.rank)
        return sync.record(exc)

    def _unexpected(self, spec, done: int, i: int, got: bytes, rank: int, node: str) -> HFReduceError:
        """A frame that is not the expected one: an ABORT from the lane peer, or a mismatched call."""
        sync = self.sync
        magic, hlen, plen = _PREFIX.unpack_from(got)
        try:
            if magic != MAGIC or hlen != DATA_HEADER.size:
                raise struct.error
            fields = DATA_HEADER.unpack_from(got, PREFIX_SIZE)
        except struct.error:
            return sync.record(HFReduceError(f"bad frame from rank {rank} (node {node})", detected_by=sync.rank))
        if fields[0] == T_ABORT:
            conn = self.links[i][0]
            try:
                body = bytearray(plen)
                conn.recv_payload_into(body, plen, timeout=min(5.0, self.timeout))
                m = msgpack.unpackb(bytes(body))
            except (TransportError, ValueError):
                return sync.record(PeerFailed(f"rank {rank} (node {node}) failed (its report was cut off)",
                                              rank=rank, node=node, detected_by=sync.rank))
            return sync.record(error_from_wire(m))
        if fields[0] != T_DATA:
            return sync.record(HFReduceError(f"bad frame type {fields[0]} from rank {rank} (node {node})",
                                             detected_by=sync.rank))
        exc: MismatchError = mismatch_error(fields, spec, spec.g0 + done, node, rank, sync.node, sync.rank)
        return sync.record(exc)

    def announce(self, spec) -> None:
        """A collective that does not run in lanes, while lanes are on: exchange its header with
        every lane peer, so a node that runs something else (an allreduce in lanes, say) is named
        in a MismatchError instead of both sides waiting for frames that never come."""
        sync = self.sync
        for i, (conn, t, _) in enumerate(self.links):
            try:
                conn.send(self._announcement(spec, t), timeout=self.net_timeout)
            except TransportError as exc:
                self._dead_links.add(i)
                rank, node = self.peer(i)
                raise sync.record(PeerFailed(f"rank {rank} (node {node}) died or lost its connection before "
                                             f"{spec.name} #{spec.seq} ({exc})", rank=rank, node=node,
                                             detected_by=sync.rank)) from None
        for i, (_, t, _) in enumerate(self.links):
            got = self._recv_exact(i, spec, PREFIX_SIZE + DATA_HEADER.size)
            want = _PREFIX.pack(MAGIC, DATA_HEADER.size, 0) + self._announcement(spec, t)
            if got != want:
                raise self._unexpected(spec, 0, i, got, *self.peer(i))

    @staticmethod
    def _announcement(spec, t: int) -> bytes:
        return DATA_HEADER.pack(T_DATA, t, spec.kind, spec.dtype, spec.op, spec.root, spec.seq, spec.g0, spec.nbytes, 0)

    def _recv_exact(self, i: int, spec, n: int) -> bytes:
        """Exactly ``n`` bytes from link ``i`` (no read-ahead: the C loop owns what follows),
        watching the node's abort word and the connection's deadline."""
        sync = self.sync
        sock = self.links[i][0].socket
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        last = time.monotonic()
        while got < n:
            if sync.aborted():
                sync.check()
            if time.monotonic() - last > self.net_timeout:
                raise self._failure(spec, 6, 0, 0, i, b"")
            if not poller.poll(POLL * 1000):
                continue
            try:
                k = sock.recv_into(view[got:], n - got, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise self._failure(spec, 4, 0, exc.errno or 0, i, b"") from None
            if k == 0:
                raise self._failure(spec, 4, 0, 0, i, b"")
            got += k
            last = time.monotonic()
        return bytes(buf)

    # -- failures --------------------------------------------------------------------------------
    def abort(self, err: HFReduceError) -> None:
        """Tell every lane peer why this rank's collective failed (best effort)."""
        body = msgpack.packb(error_to_wire(err))
        header = DATA_HEADER.pack(T_ABORT, 0, 0, 0, 0, 0, 0, 0, 0, len(body))
        for i, (conn, _, _) in enumerate(self.links):
            if i in self._dead_links:
                conn.close()  # left in the middle of a frame: a clean close is all it can say
                continue
            self._dead_links.add(i)
            try:
                conn.send(header, body, timeout=min(1.0, self.timeout))
            except TransportError:
                conn.close()

    def close(self) -> None:
        for conn, _, _ in self.links:
            conn.close()


def _peer_at(conn: Connection) -> str:
    """", ADDRESS" of the peer of ``conn`` for an error message ("" once the socket cannot tell)."""
    try:
        return f", {conn.socket.getpeername()[0]}"
    except OSError:
        return ""
