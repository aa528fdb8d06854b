"""Rendezvous at rank 0, and the plan it sends everyone.

Rank 0 listens at MASTER_ADDR:MASTER_PORT (plain TCP through ``network.transport``); every rank
says who it is (node, host, pid); rank 0 groups ranks into nodes (ordered by the cluster
description when there is one), picks the leaders, builds the double tree and sends everyone
the plan (:func:`plan`). The same connections then carry the rest of the start-up's exchanges
(endpoints, ready / go) and a failure's reason to every rank.
"""

from __future__ import annotations

import secrets
import select
import time

import msgpack

from network.errors import NetworkError, TransportError
from network.transport import Connection, connect, listen

from .env import Config
from .errors import InitError
from .tree import build_trees

__all__ = ["Rendezvous", "plan", "ranges"]


class Rendezvous:
    """Rank 0 gathers every rank's message and answers each; other ranks send and wait."""

    def __init__(self, rank: int, world: int, addr: str, port: int, deadline: float) -> None:
        self.rank, self.world, self.deadline = rank, world, deadline
        self.conns: dict[int, Connection] = {}
        self.master: Connection | None = None
        self.listener = None
        self.local_addr = "127.0.0.1"
        if world == 1:
            return
        if rank == 0:
            try:
                self.listener = listen(addr, port, timeout=self._left())
            except NetworkError:
                try:
                    self.listener = listen("0.0.0.0", port, timeout=self._left())
                except NetworkError as exc:
                    raise InitError(f"rank 0 cannot listen on {addr}:{port} for the rendezvous: {exc}") from exc
        else:
            try:
                self.master = connect(addr, port, timeout=self._left(), io_timeout=self._left())
            except NetworkError as exc:
                raise InitError(f"rank {rank} cannot reach rank 0 at {addr}:{port} within the timeout: {exc}") from exc
            self.local_addr = self.master.local_address[0]

    def _left(self) -> float:
        return max(0.01, self.deadline - time.monotonic())

    def accept_all(self) -> dict[int, dict]:
        """Rank 0: accept every other rank; returns their hello messages."""
        hellos: dict[int, dict] = {}
        while len(self.conns) < self.world - 1:
            try:
                conn = self.listener.accept(timeout=self._left())
                conn.timeout = self._left()
                m = msgpack.unpackb(conn.recv(timeout=self._left()).header)
            except TransportError as exc:
                missing = sorted(set(range(1, self.world)) - set(self.conns))
                raise InitError(f"rendezvous: ranks {ranges(missing)} did not join within the timeout ({exc})") from exc
            r = m.get("rank")
            if not isinstance(r, int) or not 0 < r < self.world or r in self.conns:
                conn.send(msgpack.packb({"error": f"rank {r} is invalid or already taken"}))
                conn.close()
                raise InitError(f"rendezvous: two processes claim rank {r} (or it is outside 1..{self.world - 1})")
            if m.get("world_size") != self.world:
                conn.send(msgpack.packb({"error": f"world size {m.get('world_size')} != {self.world}"}))
                raise InitError(f"rendezvous: rank {r} says world size {m.get('world_size')}, rank 0 says {self.world}")
            self.conns[r] = conn
            hellos[r] = m
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        return hellos

    def exchange(self, msg: dict) -> dict:
        """Non-zero rank: send ``msg`` to rank 0 and wait for its answer."""
        try:
            self.master.send(msgpack.packb(msg), timeout=self._left())
            ans = msgpack.unpackb(self.master.recv(timeout=self._left()).header)
        except TransportError as exc:
            raise InitError(f"rendezvous with rank 0 failed: {exc}") from exc
        if "error" in ans:
            raise InitError(f"rendezvous: {ans['error']}")
        return ans

    def gather(self) -> dict[int, dict]:
        """Rank 0: one message from every other rank."""
        out = {}
        for r, conn in self.conns.items():
            try:
                out[r] = msgpack.unpackb(conn.recv(timeout=self._left()).header)
            except TransportError as exc:
                raise InitError(f"rendezvous: rank {r} failed during start-up ({exc})") from exc
            if "error" in out[r]:
                raise InitError(out[r]["error"])
        return out

    def report(self, why: str) -> None:
        """Non-zero rank: tell rank 0 why start-up failed here (it tells everyone)."""
        if self.master is not None:
            try:
                self.master.send(msgpack.packb({"error": why}), timeout=1.0)
            except TransportError:
                pass

    def check_relayed(self) -> None:
        """Non-zero rank: raise the start-up failure rank 0 relayed, if one arrived."""
        if self.master is None or not select.select([self.master.socket], [], [], 0)[0]:
            return
        try:
            msg = msgpack.unpackb(self.master.recv(timeout=1.0).header)
        except TransportError as exc:
            raise InitError(f"rank 0 left the rendezvous during start-up ({exc})") from exc
        raise InitError(msg.get("error", "start-up failed on another rank"))

    def reply(self, answers: dict[int, dict]) -> None:
        for r, conn in self.conns.items():
            try:
                conn.send(msgpack.packb(answers[r]), timeout=self._left())
            except TransportError:
                pass

    def fail_all(self, why: str) -> None:
        for conn in self.conns.values():
            try:
                conn.send(msgpack.packb({"error": why}), timeout=1.0)
            except TransportError:
                pass

    def close(self) -> None:
        for c in self.conns.values():
            c.close()
        if self.master is not None:
            self.master.close()
        if self.listener is not None:
            self.listener.close()


def ranges(xs: list[int]) -> str:
    return ", ".join(map(str, xs[:16])) + (" ..." if len(xs) > 16 else "")


def plan(hellos: dict[int, dict], cluster, cfg: Config) -> dict:
    """Rank 0: nodes, local ranks, leaders, trees, session."""
    world = len(hellos)
    by_node: dict[str, list[int]] = {}
    for r in range(world):
        by_node.setdefault(hellos[r]["node"], []).append(r)
    names = list(by_node)
    zone_of = None
    if cluster is not None and all(n in cluster.nodes for n in names):
        names = cluster.ordered(names)
        zone_of = {n: cluster.zone_of(n) for n in names}
    else:
        names.sort(key=lambda n: min(by_node[n]))
    local: list[list[int]] = []
    for n in names:
        ranks = by_node[n]
        hosts = {hellos[r]["host"] for r in ranks}
        if len(hosts) > 1:
            raise InitError(f"ranks {ranks} all claim node {n!r} but run on different hosts ({sorted(hosts)}): "
                            "set a distinct HAI_NODE_NAME (or NODE_RANK) per host")
        lr = [hellos[r].get("local_rank") for r in ranks]
        if all(x is not None for x in lr):
            if sorted(lr) != list(range(len(ranks))):
                raise InitError(f"node {n!r}: local ranks {sorted(lr)} of ranks {ranks} are not 0..{len(ranks) - 1}")
            ranks = [r for _, r in sorted(zip(lr, ranks, strict=True))]
        for r in ranks:
            lws = hellos[r].get("local_world_size")
            if lws is not None and lws != len(ranks):
                raise InitError(f"rank {r} says LOCAL_WORLD_SIZE={lws} but {len(ranks)} ranks joined node {n!r}")
        local.append(ranks)
    t0, t1 = build_trees(names, zone_of)
    return {"session": secrets.token_hex(4), "nodes": names, "local": local, "cfg": cfg.to_dict(),
            "pids": [hellos[r]["pid"] for r in range(world)], "starts": [hellos[r]["start"] for r in range(world)],
            "trees": [list(t0.parent), list(t1.parent)]}
