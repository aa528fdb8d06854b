"""Between nodes: the leader's reduce and broadcast threads (one of each per tree) and watcher.

Each chunk is split in two halves, one per tree. For every chunk, in order, and for each tree
on its own threads:

* the **reduce thread** waits until the local ranks have reduced the chunk (every slice in its
  owner's location), receives each child's partial half straight into a receive buffer, adds the
  children into the node's partial in place (one pass, the SIMD kernel; the root also applies
  AVG's division), and sends the result to its parent from where it lies (a gathering
  ``sendmsg`` over the slices: no copy). At the root the result is final: the reduce thread
  itself sends it to the children (no hand-off to another thread);
* the **broadcast thread** (not at the root) receives the final half from the parent straight
  into the slices' locations and forwards it to its children.

When both trees hold the final chunk, the node's FINAL counter moves, which releases the local
ranks' copy-out. So chunk i travels the network while chunk i+1 is being added: the local ranks
and the four threads each work on a different chunk, up to ``slots`` chunks apart, and with two
nodes tree 0 goes up one direction of the link while tree 1 goes up the other. Every
(tree, edge) has its own TCP connection (traffic class HFREDUCE): on each, one thread sends and
one receives.

[Note: failures between nodes]
Each leader also keeps one out-of-band connection per tree neighbour and a **watcher** thread
that reads them and watches the local ranks' pidfds. A failure anywhere is recorded in the
node's control block (the local ranks raise it) and sent as an ABORT message, naming the peer at
fault, to every neighbour, which records and forwards it: the whole job learns who failed. Only
then are the data connections closed, which unblocks threads stuck in send or receive. A
neighbour that vanishes without an ABORT (its process died) is blamed by name by the data thread
that next needs bytes from it (not by the watcher at once: a collective whose bytes from that
node all arrived still completes); one that stops
sending is blamed when the data connection's timeout (a little longer than the local timeout, so
a precise local diagnosis arrives first) expires. ``destroy`` says BYE first, so a clean exit is
not a failure unless a collective still needed that node.
"""

from __future__ import annotations

import logging
import select
import struct
import threading
from dataclasses import dataclass

import msgpack
import numpy as np

from network.errors import TransportError, TransportTimeout
from network.transport import Connection

from . import kernels as K
from .errors import HFReduceError, HFReduceTimeout, PeerFailed, error_from_wire, error_to_wire
from .shm import Layout, NodeArena
from .sync import POLL, NodeSync
from .tree import Tree
from .wire import DATA_HEADER, T_DATA, mismatch_error

__all__ = ["InterNode", "Geometry"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """Where a node leader sits and how a collective is cut: what the tree threads need to know.

    [Note: no back-reference to the engine] The tree threads used to ask the engine for chunk
    ranges and chunk locations; they get the numbers (and the arena, where chunks lie) here
    instead, so the inter-node half is built before the engine and depends on nothing of it.
    """

    rank: int  #: this leader's rank
    node: int  #: this node's index in ``node_names``
    node_names: list[str]
    leader_ranks: list[int]  #: each node's leader's rank
    trees: tuple[Tree, Tree]
    local: int  #: ranks on this node: a chunk is cut into this many slices
    chunk: int  #: bytes per chunk
    slots: int  #: chunks in flight (staging slots per rank)

    def chunk_range(self, spec, g: int) -> tuple[int, int]:
        """Bytes [c0, c1) of the collective that chunk ``g`` covers."""
        c0 = (g - spec.g0) * self.chunk
        return c0, min(spec.nbytes, c0 + self.chunk)

    def location(self, arena: NodeArena, spec, locs, r: int, g: int, a: int, b: int) -> np.ndarray:
        """Local rank ``r``'s input location of chunk ``g``, chunk bytes [a, b) (as the engine's)."""
        loc = locs[r]
        if loc is None:
            return arena.slots[r][g % self.slots][a:b]
        base = loc[1] + (g - spec.g0) * self.chunk
        return arena.heap_views[loc[0]][base + a: base + b]


class InterNode:
    """The inter-node half of a node leader."""

    def __init__(self, geo: Geometry, sync: NodeSync, arena: NodeArena, up: dict[int, Connection],
                 down: dict[tuple[int, int], Connection], oob: dict[int, Connection], timeout: float) -> None:
        self.geo = geo
        self.sync = sync
        self.arena = arena
        self.trees = trees = geo.trees
        self.node = node = geo.node
        self.node_names = geo.node_names
        self.leader_ranks = geo.leader_ranks
        chunk = geo.chunk
        self.up = up  # tree -> connection to the parent
        self.down = down  # (tree, child node) -> connection
        self.oob = oob  # neighbour node -> out-of-band connection
        self.timeout = timeout
        self.net_timeout = timeout * 1.25 + 0.5
        for c in [*up.values(), *down.values()]:
            c.timeout = self.net_timeout
        self._plans: dict[str, list] = {f"{p}{t}": [] for p in "rb" for t in (0, 1)}
        self._cv = threading.Condition()
        self._bcast_done = [0, 0]
        self._stop = False
        self._aborted = False
        self._departed: set[int] = set()
        self._oob_locks = {n: threading.Lock() for n in oob}
        self._rbuf = {(t, c): np.empty(chunk, np.uint8) for t in (0, 1) for c in trees[t].children[node]}
        # one reduce and one broadcast thread per tree: the trees' transfers run at the same time
        # (with two nodes, tree 0 goes up one direction of the link while tree 1 goes up the other)
        self._threads = [threading.Thread(target=self._loop, args=(self._plans[f"{p}{t}"], run, t), daemon=True,
                                          name=f"hfreduce-{name}{t}-{node}")
                         for t in (0, 1) for p, run, name in (("r", self._reduce_op, "reduce"),
                                                              ("b", self._bcast_op, "bcast"))]
        self._threads.append(threading.Thread(target=self._watch, daemon=True, name=f"hfreduce-watch-{node}"))
        for th in self._threads:
            th.start()

    def describe(self) -> dict:
        return {f"tree{t}": {"parent": self.trees[t].parent[self.node], "children": list(self.trees[t].children[self.node])}
                for t in (0, 1)}

    # -- plans -------------------------------------------------------------------------------
    def submit(self, spec, locs) -> None:
        with self._cv:
            for plans in self._plans.values():
                plans.append((spec, locs))
            self._cv.notify_all()

    def _loop(self, plans: list, run, tree: int) -> None:
        while True:
            with self._cv:
                while not plans and not self._stop:
                    self._cv.wait()
                if self._stop and not plans:
                    return
                spec, locs = plans.pop(0)
            if self._aborted:
                continue
            try:
                run(spec, locs, tree)
            except HFReduceError as exc:
                self.abort(exc)
            except Exception as exc:  # noqa: BLE001 - never leave the local ranks hanging
                log.exception("hfreduce inter-node thread failed")
                self.abort(HFReduceError(f"internal error in the inter-node tree of node "
                                         f"{self.node_names[self.node]}: {exc!r}", detected_by=self.sync.rank))

    # -- frames ------------------------------------------------------------------------------
    def _header(self, spec, t: int, g: int, n: int) -> bytes:
        return DATA_HEADER.pack(T_DATA, t, spec.kind, spec.dtype, spec.op, spec.root, spec.seq, g, spec.nbytes, n)

    def _recv_header(self, conn: Connection, peer: int, spec, t: int, g: int, n: int) -> None:
        try:
            header, plen = conn.recv_header()
        except TransportError as exc:
            raise self._net_failure(peer, exc) from None
        try:
            fields = DATA_HEADER.unpack(header)
        except struct.error:
            raise HFReduceError(f"bad frame from node {self.node_names[peer]}", detected_by=self.sync.rank) from None
        want = (T_DATA, t, spec.kind, spec.dtype, spec.op, spec.root, spec.seq, g, spec.nbytes, n)
        if fields != want or plen != n:
            raise mismatch_error(fields, spec, g, self.node_names[peer], self.leader_ranks[peer],
                                 self.node_names[self.node], self.sync.rank, "leader rank")

    def _recv_into(self, conn: Connection, peer: int, views) -> None:
        try:
            for v in views:
                if v.nbytes:
                    conn.recv_payload_into(v, v.nbytes)
        except TransportError as exc:
            raise self._net_failure(peer, exc) from None

    def _send(self, conn: Connection, peer: int, header: bytes, views) -> None:
        try:
            conn.send(header, *views)
        except TransportError as exc:
            raise self._net_failure(peer, exc) from None

    def _net_failure(self, peer: int, exc: TransportError) -> HFReduceError:
        """A data connection to ``peer`` failed: prefer a precise diagnosis arriving out of band."""
        diagnosis = self.sync.await_error(min(1.0, self.timeout), stop=lambda: self._aborted)
        if diagnosis is not None:
            return diagnosis
        name, rank = self.node_names[peer], self.leader_ranks[peer]
        if peer in self._departed:
            return PeerFailed(f"node {name} (leader rank {rank}) left the group (destroy) during a collective",
                              rank=rank, node=name, detected_by=self.sync.rank)
        if isinstance(exc, TransportTimeout):
            return HFReduceTimeout(f"node {name} (leader rank {rank}) sent nothing for {self.net_timeout:.1f} s "
                                   "(stuck, stopped, far behind, or the network to it is cut)", rank=rank, node=name, detected_by=self.sync.rank)
        return PeerFailed(f"node {name} (leader rank {rank}) died or lost its connection ({exc})", rank=rank,
                          node=name, detected_by=self.sync.rank)

    # -- the two passes ----------------------------------------------------------------------
    def _segments(self, spec, locs, g: int, a: int, b: int) -> list[tuple[int, np.ndarray]]:
        """Chunk bytes [a, b) as (offset from a, view) pieces, one per slice owner's location."""
        from .engine import slices

        geo = self.geo
        c0, c1 = geo.chunk_range(spec, g)
        out = []
        for s, (x, y) in enumerate(slices(c1 - c0, geo.local)):
            x, y = max(x, a), min(y, b)
            if x < y:
                out.append((x - a, geo.location(self.arena, spec, locs, s, g, x, y)))
        return out

    def _reduce_op(self, spec, locs, t: int) -> None:
        from .engine import slices

        sync, lay = self.sync, self.sync.lay
        tree = self.trees[t]
        for g in range(spec.g0, spec.g0 + spec.nchunks):
            sync.wait(lambda g=g: sync.min(lay.REDUCED) > g, lambda g=g: self._local_laggard(spec, g))
            c0, c1 = self.geo.chunk_range(spec, g)
            a, b = slices(c1 - c0, 2)[t]
            n = b - a
            kids = tree.children[self.node]
            segs = self._segments(spec, locs, g, a, b)
            for k in kids:
                conn = self.down[(t, k)]
                self._recv_header(conn, k, spec, t, g, n)
                self._recv_into(conn, k, [self._rbuf[(t, k)][:n]])
            parent = tree.parent[self.node]
            if kids:
                avg = spec.avg if parent < 0 else 0
                for off, view in segs:
                    K.reduce(view, [self._rbuf[(t, k)][off: off + view.nbytes] for k in kids], spec.kdtype,
                             spec.kop, avg)
            if parent >= 0:
                self._send(self.up[t], parent, self._header(spec, t, g, n), [v for _, v in segs])
            else:
                # the root's result is final: broadcast it from here (no hand-off to another thread)
                header = self._header(spec, t, g, n)
                for k in kids:
                    self._send(self.down[(t, k)], k, header, [v for _, v in segs])
                self._delivered(t, g)

    def _bcast_op(self, spec, locs, t: int) -> None:
        from .engine import slices

        tree = self.trees[t]
        parent = tree.parent[self.node]
        if parent < 0:
            return  # the root's reduce thread broadcasts
        conn = self.up[t]
        for g in range(spec.g0, spec.g0 + spec.nchunks):
            c0, c1 = self.geo.chunk_range(spec, g)
            a, b = slices(c1 - c0, 2)[t]
            n = b - a
            segs = [v for _, v in self._segments(spec, locs, g, a, b)]
            self._recv_header(conn, parent, spec, t, g, n)
            self._recv_into(conn, parent, segs)
            header = self._header(spec, t, g, n)
            for k in tree.children[self.node]:
                self._send(self.down[(t, k)], k, header, segs)
            self._delivered(t, g)

    def _delivered(self, t: int, g: int) -> None:
        """Tree t holds the final half of chunk g here; FINAL moves once both trees do."""
        with self._cv:
            self._bcast_done[t] = g + 1
            final = min(self._bcast_done)
            if final > self.sync.node_word(Layout.FINAL):
                self.sync.publish_node(Layout.FINAL, final)

    def _local_laggard(self, spec, g: int) -> tuple[int | None, str]:
        sync, lay = self.sync, self.sync.lay
        what = f"{spec.name} #{spec.seq}, chunk {g - spec.g0 + 1} of {spec.nchunks}"
        if sync.min(lay.OP_SEQ) < spec.seq:
            return sync.argmin(lay.OP_SEQ), f"it did not enter {spec.name} #{spec.seq}"
        if sync.min(lay.POSTED) <= g:
            return sync.argmin(lay.POSTED), f"its input of {what} never arrived"
        return sync.argmin(lay.REDUCED), f"it did not reduce its slice of {what}"

    # -- failures ----------------------------------------------------------------------------
    def abort(self, err: HFReduceError, source: int | None = None) -> None:
        """Record ``err`` locally, tell every neighbour (but ``source``), close the data links."""
        with self._cv:
            if self._aborted:
                return
            self._aborted = True
            self._cv.notify_all()
        err = self.sync.record(err)
        msg = msgpack.packb({"t": "abort", **error_to_wire(err)})
        for peer, conn in self.oob.items():
            if peer != source:
                self._oob_send(peer, conn, msg)
        for conn in [*self.up.values(), *self.down.values()]:
            conn.close()

    def _oob_send(self, peer: int, conn: Connection, msg: bytes) -> None:
        try:
            with self._oob_locks[peer]:
                conn.send(msg, timeout=min(5.0, self.timeout))
        except TransportError:
            pass

    def _watch(self) -> None:
        by_fd = {c.fileno(): n for n, c in self.oob.items()}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        sync = self.sync
        while not self._stop:
            try:
                events = poller.poll(POLL * 1000)
            except InterruptedError:
                continue
            for fd, _ev in events:
                peer = by_fd.get(fd)
                if peer is None:
                    continue
                conn = self.oob[peer]
                try:
                    m = msgpack.unpackb(conn.recv(timeout=self.timeout).header)
                except TransportError:
                    # The neighbour's process ended (or its link broke). That fails a collective only
                    # if it still needs the neighbour, and every collective receives from each tree
                    # neighbour: the data threads see the closed connection when they get there and
                    # blame it by name (_net_failure). Aborting here instead would fail a collective
                    # whose last bytes from that node already arrived (a peer that finished its part
                    # and exited at once).
                    poller.unregister(fd)
                    del by_fd[fd]
                    continue
                t = m.get("t")
                if t == "abort":
                    self.abort(error_from_wire(m), source=peer)
                elif t == "bye":
                    self._departed.add(peer)
            if self._stop:
                break
            if not self._aborted:
                try:
                    sync.check_peers(include_departed=False)
                except HFReduceError as exc:
                    self.abort(exc)
                    continue
                if sync.aborted():
                    self.abort(sync.first_error() or HFReduceError("aborted"))

    def close(self) -> None:
        """Say BYE to the neighbours, stop the threads, close every connection."""
        bye = msgpack.packb({"t": "bye"})
        for peer, conn in self.oob.items():
            self._oob_send(peer, conn, bye)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for th in self._threads:
            if th is not threading.current_thread():
                th.join(2 * POLL + 1.0)
        for conn in [*self.up.values(), *self.down.values(), *self.oob.values()]:
            conn.close()
