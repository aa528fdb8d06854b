"""Rendezvous at rank 0, and the plan it sends everyone.

Rank 0 listens at MASTER_ADDR:MASTER_PORT (plain TCP through ``network.transport``); every rank
says who it is (node, host, pid); rank 0 groups ranks into nodes (ordered by the cluster
description when there is one), picks the leaders, builds the double tree and sends everyone
the plan (:func:`plan`). The same connections then carry the rest of the start-up's exchanges
(endpoints, ready / go) and a failure's reason to every rank.
"""

from __future__ import annotations

import datetime
import os
import secrets
import select
import socket
import time

import msgpack

from network.errors import NetworkError, TransportError
from network.transport import Connection, connect, listen

from .env import Config
from .errors import InitError
from .tree import build_trees

__all__ = ["Rendezvous", "Publisher", "StorePublisher", "MpiPublisher", "GroupPublisher", "publisher", "plan",
           "ranges"]


def _in_use(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("", port))
        return False
    except OSError:
        return True
    finally:
        s.close()


def _route_address(host: str, port: int) -> str:
    """This host's address on the route to ``host`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port or 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class Publisher:
    """How rank 0's rendezvous address reaches the others when it is not MASTER_ADDR:MASTER_PORT.

    [Note: no guessed port] Rank 0 used to listen on MASTER_PORT+1 under torchrun (whose agent
    holds MASTER_PORT for its own store): a port nobody reserved, which another job or service
    may hold. Now rank 0 binds an ephemeral port (the kernel picks a free one) and publishes it
    where every rank can read it: the launcher's own key-value store (torchrun's agent store at
    MASTER_ADDR:MASTER_PORT, or the store of a torch.distributed group this process already
    joined, which holds MASTER_PORT on rank 0), or MPI's broadcast under mpirun. Elsewhere (hai,
    haiscale.spawn, a hand-made environment) the launcher reserves MASTER_PORT for the job and
    rank 0 binds it itself.
    """

    def my_address(self) -> str:
        """The address rank 0 listens on (reachable from the other ranks)."""
        raise NotImplementedError

    def put(self, addr: str, port: int, timeout: float) -> None:
        raise NotImplementedError

    def get(self, timeout: float) -> tuple[str, int]:
        raise NotImplementedError


class StorePublisher(Publisher):
    """Through a torch.distributed store (``set`` by rank 0, ``wait`` + ``get`` by the others)."""

    def __init__(self, store, key: str, route_to: tuple[str, int]) -> None:
        self.store, self.key, self.route_to = store, key, route_to

    @classmethod
    def torchrun(cls, host: str, port: int, key: str, timeout: float) -> StorePublisher:
        """A client of torchrun's agent store at ``host:port`` (MASTER_ADDR:MASTER_PORT)."""
        try:
            from torch.distributed import TCPStore
        except ImportError:
            raise InitError("under torchrun hfreduce publishes its rendezvous through torchrun's store, which needs "
                            "torch; or set HFREDUCE_MASTER_PORT to a free port kept for hfreduce") from None
        try:
            store = TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, DistNetworkError...
            raise InitError(f"cannot reach torchrun's store at {host}:{port} within {timeout:.0f} s: {exc}") from exc
        return cls(store, key, (host, port))

    def my_address(self) -> str:
        return _route_address(*self.route_to)

    def put(self, addr: str, port: int, timeout: float) -> None:
        try:
            self.store.set(self.key, f"{addr} {port}")
        except Exception as exc:  # noqa: BLE001
            raise InitError(f"rank 0 cannot publish its rendezvous address in the launcher's store: {exc}") from exc

    def get(self, timeout: float) -> tuple[str, int]:
        try:
            self.store.wait([self.key], datetime.timedelta(seconds=timeout))
            addr, port = self.store.get(self.key).decode().split()
        except Exception as exc:  # noqa: BLE001 - a timeout is a RuntimeError / DistStoreError
            raise InitError(f"rank 0 did not publish its rendezvous address ({self.key}) in the launcher's store "
                            f"within the timeout: {exc}") from exc
        return addr, int(port)


class MpiPublisher(Publisher):
    """Through MPI's broadcast from rank 0 (mpirun; every rank calls it at the same point)."""

    def __init__(self, comm) -> None:
        self.comm = comm

    def my_address(self) -> str:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"

    def put(self, addr: str, port: int, timeout: float) -> None:
        self.comm.bcast((addr, port), root=0)

    def get(self, timeout: float) -> tuple[str, int]:
        return tuple(self.comm.bcast(None, root=0))


class GroupPublisher(Publisher):
    """Through an allgather on a parent hfreduce group (``hfreduce.new_group``): every rank of the
    parent takes part once, the sub-group's rank 0 with its address, the others with zeros."""

    def __init__(self, parent, root: int, address: str) -> None:
        self.parent, self.root, self.address = parent, root, address

    def my_address(self) -> str:
        return self.address

    def exchange(self, addr: str | None = None, port: int = 0) -> tuple[str, int]:
        import numpy as np

        mine = np.zeros(2, np.int64)
        if addr is not None:
            mine[:] = (int.from_bytes(socket.inet_aton(socket.gethostbyname(addr)), "big"), port)
        every = np.zeros(2 * self.parent.world_size, np.int64)
        self.parent.allgather(every, mine)
        ip, port = (int(x) for x in every[2 * self.root:2 * self.root + 2])
        return socket.inet_ntoa(ip.to_bytes(4, "big")), port

    def put(self, addr: str, port: int, timeout: float) -> None:
        self.exchange(addr, port)

    def get(self, timeout: float) -> tuple[str, int]:
        return self.exchange()


_generation = 0  # groups this process started: a fresh store key for each (ranks init in step)


def publisher(res: dict, timeout: float) -> Publisher | None:
    """The publisher for this start-up (None: rank 0 binds MASTER_ADDR:MASTER_PORT)."""
    global _generation
    _generation += 1
    how = res.get("publish")
    if isinstance(how, Publisher):
        return how
    if res["world_size"] == 1 or how is None:
        return None
    if how == "mpi":
        return MpiPublisher(res["mpi_comm"])
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"hfreduce/rendezvous/{run}/{restart}/{_generation}"
    if how == "torchrun":
        return StorePublisher.torchrun(res["master_addr"], res["master_port"], key, timeout)
    if how == "torch":
        import torch.distributed as dist

        return StorePublisher(dist.distributed_c10d._get_default_store(), key,
                              (res["master_addr"], res["master_port"]))
    raise InitError(f"unknown rendezvous publisher {how!r}")


class Rendezvous:
    """Rank 0 gathers every rank's message and answers each; other ranks send and wait.

    ``publish`` (a :class:`Publisher`, or None) says how the others learn rank 0's address:
    None, rank 0 listens on ``addr:port`` (MASTER_ADDR:MASTER_PORT) and everyone connects
    there; else rank 0 listens on an ephemeral port and publishes it (see the module's note).
    """

    def __init__(self, rank: int, world: int, addr: str, port: int, deadline: float,
                 publish: Publisher | None = None) -> None:
        self.rank, self.world, self.deadline = rank, world, deadline
        self.conns: dict[int, Connection] = {}
        self.master: Connection | None = None
        self.listener = None
        self.local_addr = "127.0.0.1"
        if world == 1:
            return
        if rank == 0:
            if publish is not None:
                addr, port = publish.my_address(), 0
            try:
                self.listener = listen(addr, port, timeout=self._left())
            except NetworkError:
                try:
                    self.listener = listen("0.0.0.0", port, timeout=self._left())
                except NetworkError as exc:
                    taken = ("; another process holds it: run under torchrun, or set HFREDUCE_MASTER_PORT to a "
                             "port kept for hfreduce" if port and _in_use(port) else "")
                    raise InitError(f"rank 0 cannot listen on {addr}:{port} for the rendezvous: {exc}{taken}") from exc
            if publish is not None:
                publish.put(addr, self.listener.port, self._left())
            if self.listener.host not in ("0.0.0.0", "::"):
                # the address the others reach rank 0 at is its node's (not loopback, across hosts)
                self.local_addr = self.listener.host
        else:
            if publish is not None:
                addr, port = publish.get(self._left())
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
