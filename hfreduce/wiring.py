"""Tree and lane wiring: the connections between nodes, made once at start-up.

Each leader listens on its node's address; children connect to parents, one connection per
tree edge plus one out-of-band connection per neighbour (:func:`connect_tree`). With lanes
possible (every node has the same number of ranks), every rank also connects its lane: one
connection per tree edge to the rank with its local rank on the neighbour node
(:func:`connect_lanes`, see :mod:`hfreduce.lanes`). The functions read the group's plan (its
rank, node, trees, session, timeout and chunk size) and return what they built; the group
keeps it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import msgpack

from network.errors import NetworkError, TransportError
from network.transport import Connection, TrafficClass, connect, listen

from . import kernels as K
from .engine import c_loops_enabled
from .errors import InitError
from .internode import Geometry, InterNode
from .lanes import Lanes

if TYPE_CHECKING:
    from .group import ProcessGroup
    from .rendezvous import Rendezvous

__all__ = ["listen_here", "lanes_usable", "connect_tree", "connect_lanes"]


def node_address(pg: ProcessGroup, rdv: Rendezvous) -> str:
    """The address this node's ranks listen on: the cluster description's, else the one that
    reaches rank 0."""
    if pg.cluster is not None and pg.node in pg.cluster.nodes:
        return pg.cluster.node(pg.node).address
    return rdv.local_addr if pg.world_size > 1 else "127.0.0.1"


def listen_here(pg: ProcessGroup, rdv: Rendezvous):
    """A listener on this node's address (any free port) and its endpoint for the others."""
    addr = node_address(pg, rdv)
    try:
        lst = listen(addr, 0, traffic_class=TrafficClass.HFREDUCE, timeout=pg.timeout)
    except NetworkError:
        lst = listen("0.0.0.0", 0, traffic_class=TrafficClass.HFREDUCE, timeout=pg.timeout)
        addr = rdv.local_addr
    return lst, [addr, lst.port]


def lanes_usable(cma: bool, local_world_size: int) -> bool:
    """Can this rank run allreduce in lanes: the C loop is built and enabled, single-copy reads
    work on this node (or it has one rank), and HFREDUCE_LANES does not turn lanes off."""
    off = os.environ.get("HFREDUCE_LANES", "1").strip().lower() in ("0", "no", "off", "false")
    return (not off and c_loops_enabled() and hasattr(K._C, "pipeline_lanes")
            and (cma or local_world_size == 1))


def connect_tree(pg: ProcessGroup, listener, eps: dict, deadline: float) -> InterNode:
    """A leader's tree connections (data per tree edge, out-of-band per neighbour) and the
    threads that run them."""
    me = pg.node_index
    up: dict[int, Connection] = {}
    down: dict[tuple[int, int], Connection] = {}
    oob: dict[int, Connection] = {}
    neighbours = set()
    for tree in pg.trees:
        if tree.parent[me] >= 0:
            neighbours.add(tree.parent[me])
        neighbours.update(tree.children[me])
    expected = sum(len(t.children[me]) for t in pg.trees) + sum(1 for n in neighbours if n > me)
    tc = TrafficClass.HFREDUCE
    left = lambda: max(0.01, deadline - time.monotonic())  # noqa: E731
    src = eps[pg.node][0]
    try:
        for t, tree in enumerate(pg.trees):
            p = tree.parent[me]
            if p >= 0:
                host, port = eps[pg.node_names[p]]
                c = connect(host, port, timeout=left(), traffic_class=tc, source=src, io_timeout=pg.timeout)
                c.send(msgpack.packb({"s": pg.session, "t": t, "from": me}))
                up[t] = c
        for n in sorted(neighbours):
            if n < me:
                host, port = eps[pg.node_names[n]]
                c = connect(host, port, timeout=left(), traffic_class=tc, source=src, io_timeout=pg.timeout)
                c.send(msgpack.packb({"s": pg.session, "t": "oob", "from": me}))
                oob[n] = c
        for _ in range(expected):
            c = listener.accept(timeout=left())
            h = msgpack.unpackb(c.recv(timeout=left()).header)
            if h.get("s") != pg.session:
                c.close()
                raise InitError(f"node {pg.node}: a connection from another group arrived at the leader")
            if h["t"] == "oob":
                oob[h["from"]] = c
            else:
                down[(h["t"], h["from"])] = c
    except BaseException as exc:
        for c in [*up.values(), *down.values(), *oob.values()]:
            c.close()
        if isinstance(exc, TransportError):
            raise InitError(f"node {pg.node}: cannot connect the inter-node tree: {exc}") from exc
        raise
    geo = Geometry(rank=pg.rank, node=me, node_names=pg.node_names, leader_ranks=pg.leaders, trees=pg.trees,
                   local=pg.local_world_size, chunk=pg.chunk, slots=pg.slots)
    return InterNode(geo, pg._sync, pg._arena, up, down, oob, pg.timeout)


def connect_lanes(pg: ProcessGroup, listener, lane_eps: list, deadline: float) -> Lanes:
    """Connect this rank's lane: one connection per tree edge to the rank with my local rank on
    the neighbour node (see hfreduce.lanes)."""
    me, s = pg.node_index, pg.local_rank
    links: list[tuple[Connection, int, int]] = []
    tc = TrafficClass.HFREDUCE
    left = lambda: max(0.01, deadline - time.monotonic())  # noqa: E731
    expected = sum(len(t.children[me]) for t in pg.trees)
    try:
        for t, tree in enumerate(pg.trees):
            p = tree.parent[me]
            if p >= 0:
                host, port = lane_eps[pg.local_groups[p][s]]
                c = connect(host, port, timeout=left(), traffic_class=tc, source=lane_eps[pg.rank][0],
                            io_timeout=pg.timeout)
                c.send(msgpack.packb({"s": pg.session, "t": t, "from": me, "lane": s}))
                links.append((c, t, p))
        for _ in range(expected):
            c = listener.accept(timeout=left())
            h = msgpack.unpackb(c.recv(timeout=left()).header)
            if h.get("s") != pg.session or h.get("lane") != s:
                c.close()
                raise InitError(f"rank {pg.rank} (node {pg.node}): a lane connection from another group "
                                "or lane arrived")
            links.append((c, h["t"], h["from"]))
    except BaseException as exc:
        for c, _, _ in links:
            c.close()
        if isinstance(exc, TransportError):
            raise InitError(f"rank {pg.rank} (node {pg.node}): cannot connect its lane: {exc}") from exc
        raise
    cl = getattr(pg, "cluster", None)
    zones = len({cl.zone_of(n) for n in pg.node_names}) if cl is not None and all(
        n in cl.nodes for n in pg.node_names) else 1
    return Lanes(pg._sync, pg.trees, me, pg.node_names, pg.local_groups, links, pg.timeout, pg.chunk, zones)
