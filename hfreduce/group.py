"""The process group: who is who (environment, rendezvous), the node's arena, the collectives.

Start-up, for every rank (``init``):

1. **Environment.** Rank and world size come from the arguments, else the platform's /
   torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK,
   MASTER_ADDR, MASTER_PORT, HAI_NODE_NAME, HAI_CLUSTER_FILE), else MPI through mpi4py when the
   process was started by mpirun, else a group of one.
2. **Rendezvous** at rank 0 (MASTER_ADDR:MASTER_PORT, plain TCP through ``network.transport``):
   every rank says who it is (node, host, pid); rank 0 groups ranks into nodes (ordered by the
   cluster description when there is one), picks the leaders, builds the double tree and sends
   everyone the plan.
3. **Node arena.** The leader creates the arena, every rank its heap; all map all, then every
   creator unlinks its segments (see :mod:`hfreduce.shm`).
4. **Tree links.** Each leader listens on its node's address; children connect to parents, one
   connection per tree edge plus one out-of-band connection per neighbour.
5. Everyone reports ready to rank 0 and waits for the go: ``init`` returns on all ranks only
   when the whole group is up, and raises :class:`InitError` on all of them otherwise.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import secrets
import select
import socket
import threading
import time
from typing import Any

import msgpack
import numpy as np

from network.errors import NetworkError, TransportError
from network.transport import Connection, TrafficClass, connect, listen

from . import kernels as K
from .buffers import Buf, as_buf, np_dtype_code
from .device import DeviceBuf, as_device_buf
from .engine import (
    ALLGATHER,
    ALLREDUCE,
    BARRIER,
    BROADCAST,
    REDUCE,
    REDUCE_SCATTER,
    Engine,
    HostBackend,
    OpSpec,
    Work,
    c_loops_enabled,
)
from .errors import HFReduceError, InitError, InvalidArgument
from .internode import InterNode
from .lanes import Lanes
from .ops import ReduceOp
from .shm import Layout, NodeArena, Segment, process_start_time, segment_name, sweep_stale
from .sync import NodeSync
from .tree import Tree, build_trees

__all__ = ["ProcessGroup", "init", "destroy", "get_default", "is_initialized", "Config"]

log = logging.getLogger(__name__)

_default: ProcessGroup | None = None
_groups: list[ProcessGroup] = []
_lock = threading.Lock()


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise InitError(f"environment variable {name}={v!r} is not an integer") from None


def _env_bytes(name: str, default: int) -> int:
    v = os.environ.get(name)
    if not v:
        return default
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    try:
        if v[-1].lower() in mult:
            return int(float(v[:-1]) * mult[v[-1].lower()])
        return int(v)
    except ValueError:
        raise InitError(f"environment variable {name}={v!r} is not a size (e.g. 4194304, 4M, 1G)") from None


class Config:
    """Engine settings (rank 0's values are used by the whole group)."""

    def __init__(self) -> None:
        self.chunk = _env_bytes("HFREDUCE_CHUNK_BYTES", 1 << 20)
        self.chunk = max(4096, self.chunk // 4096 * 4096)
        self.slots = max(2, _env_int("HFREDUCE_SLOTS") or 4)
        try:
            shm_size = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
        except OSError:
            shm_size = 1 << 30
        self.heap = _env_bytes("HFREDUCE_HEAP_BYTES", min(64 << 30, shm_size))
        self.heap = self.heap // 4096 * 4096

    def to_dict(self) -> dict:
        return {"chunk": self.chunk, "slots": self.slots, "heap": self.heap}


# -- the environment ------------------------------------------------------------------------------
def _from_mpi() -> dict | None:
    """Rank, size, local rank and a rendezvous address from MPI, when started by mpirun."""
    if not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise InitError("started by mpirun but mpi4py is not installed: pip install 'fireflyer[mpi]' "
                        "(or set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    out = {"rank": comm.Get_rank(), "world_size": comm.Get_size(), "local_rank": local.Get_rank(),
           "local_world_size": local.Get_size()}
    if comm.Get_rank() == 0:
        s = socket.socket()
        s.bind(("", 0))
        port = s.getsockname()[1]
        s.close()
        host = socket.gethostname()
        try:
            addr = socket.gethostbyname(host)
        except OSError:
            addr = "127.0.0.1"
        ep = (addr, port)
    else:
        ep = None
    out["master_addr"], out["master_port"] = comm.bcast(ep, root=0)
    local.Free()
    return out


def _resolve(rank, world_size, local_rank, local_world_size, master_addr, master_port, node, cluster,
             timeout) -> dict:
    env = {"rank": _env_int("RANK"), "world_size": _env_int("WORLD_SIZE"), "local_rank": _env_int("LOCAL_RANK"),
           "local_world_size": _env_int("LOCAL_WORLD_SIZE"), "master_addr": os.environ.get("MASTER_ADDR"),
           "master_port": _env_int("HFREDUCE_MASTER_PORT")}
    if env["master_port"] is None and _env_int("MASTER_PORT") is not None:
        # torchrun's agent holds MASTER_PORT for its own store: take the next one under torchrun
        env["master_port"] = _env_int("MASTER_PORT") + (1 if os.environ.get("TORCHELASTIC_RUN_ID") else 0)
    if rank is None and world_size is None and env["rank"] is None and env["world_size"] is None:
        mpi = _from_mpi()
        if mpi:
            env.update({k: v for k, v in mpi.items() if v is not None})
    args = {"rank": rank, "world_size": world_size, "local_rank": local_rank, "local_world_size": local_world_size,
            "master_addr": master_addr, "master_port": master_port}
    r = {k: (args[k] if args[k] is not None else env[k]) for k in args}
    if r["world_size"] is None:
        r["world_size"] = 1
    if r["rank"] is None:
        if r["world_size"] != 1:
            raise InitError("no rank: pass rank= or set RANK (WORLD_SIZE is set)")
        r["rank"] = 0
    if not 0 <= r["rank"] < r["world_size"]:
        raise InitError(f"rank {r['rank']} is outside 0..{r['world_size'] - 1} (world size {r['world_size']})")
    if r["master_addr"] is None:
        r["master_addr"] = "127.0.0.1"
    if r["master_port"] is None:
        if r["world_size"] > 1:
            raise InitError("no rendezvous port: pass master_port= or set MASTER_PORT (or HFREDUCE_MASTER_PORT)")
        r["master_port"] = 0
    if node is None:
        node = os.environ.get("HAI_NODE_NAME")
    if node is None:
        nr = _env_int("NODE_RANK") if _env_int("NODE_RANK") is not None else _env_int("GROUP_RANK")
        node = f"node{nr}" if nr is not None else socket.gethostname()
    r["node"] = str(node)
    if cluster is None:
        cluster = os.environ.get("HAI_CLUSTER_FILE") or None
    if cluster is not None and not hasattr(cluster, "nodes"):
        from network.topology import load_cluster

        try:
            cluster = load_cluster(cluster)
        except NetworkError as exc:
            raise InitError(f"cannot read the cluster description: {exc}") from exc
    r["cluster"] = cluster
    if timeout is None:
        t = os.environ.get("HFREDUCE_TIMEOUT")
        timeout = float(t) if t else 60.0
    if timeout <= 0:
        raise InitError(f"timeout must be > 0 (got {timeout})")
    r["timeout"] = float(timeout)
    return r


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


# -- rendezvous -----------------------------------------------------------------------------------
class _Rendezvous:
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
                raise InitError(f"rendezvous: ranks {_ranges(missing)} did not join within the timeout ({exc})") from exc
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


def _ranges(xs: list[int]) -> str:
    return ", ".join(map(str, xs[:16])) + (" ..." if len(xs) > 16 else "")


def _plan(hellos: dict[int, dict], cluster, cfg: Config) -> dict:
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


# -- the group --------------------------------------------------------------------------------------
class ProcessGroup:
    """A set of processes that run collectives together (see :func:`hfreduce.init`)."""

    def __init__(self, res: dict) -> None:
        self.rank: int = res["rank"]
        self.world_size: int = res["world_size"]
        self.timeout: float = res["timeout"]
        self.cluster = res["cluster"]
        self._destroyed = False
        self._arena: NodeArena | None = None
        self._sync: NodeSync | None = None
        self._internode: InterNode | None = None
        self._lanes: Lanes | None = None
        self.lanes = False  # allreduce across nodes runs in lanes (see hfreduce.lanes)
        self._engine: Engine | None = None
        self.cma = False  # single-copy reads between this node's ranks (see _probe_cma)
        self._created: list[Segment] = []
        self._rdv: _Rendezvous | None = None
        self._devices: dict[Any, Any] = {}  # device key -> this group's backend for it (hfreduce.device)
        deadline = time.monotonic() + self.timeout
        sweep_stale()
        rdv = _Rendezvous(self.rank, self.world_size, res["master_addr"], res["master_port"], deadline)
        try:
            self._start(res, rdv, deadline)
        except BaseException as exc:
            if self.rank == 0:
                rdv.fail_all(str(exc) if isinstance(exc, InitError) else f"rank 0: {exc}")
            elif not isinstance(exc, InitError) or "rank 0" not in str(exc):
                rdv.report(f"rank {self.rank} (node {res['node']}): {exc}")
            self._teardown()
            sweep_stale()
            if isinstance(exc, HFReduceError):
                raise
            if isinstance(exc, (OSError, NetworkError)):
                raise InitError(f"rank {self.rank}: start-up failed: {exc}") from exc
            raise
        finally:
            rdv.close()
            self._rdv = None

    # -- start-up ------------------------------------------------------------------------------
    def _start(self, res: dict, rdv: _Rendezvous, deadline: float) -> None:
        me = os.getpid()
        hello = {"rank": self.rank, "world_size": self.world_size, "node": res["node"], "host": _host_id(),
                 "local_rank": res["local_rank"], "local_world_size": res["local_world_size"], "pid": me,
                 "start": process_start_time(me) or 0}
        cfg = Config()
        if self.rank == 0:
            hellos = {0: hello, **rdv.accept_all()}
            plan = _plan(hellos, self.cluster, cfg)
            rdv.reply({r: plan for r in rdv.conns})
        else:
            plan = rdv.exchange(hello)
        self._adopt(plan, res)

        # leaders listen for their tree neighbours; with lanes possible, every rank for its lane's
        listener = lane_listener = None
        lanes_possible = self.nnodes > 1 and len({len(g) for g in self.local_groups}) == 1
        endpoint = lane_endpoint = None
        try:
            if self.is_leader and self.nnodes > 1:
                listener, endpoint = self._listen(rdv)
            if lanes_possible:
                lane_listener, lane_endpoint = self._listen(rdv)
            if self.rank == 0:
                msgs = {0: {"ep": endpoint, "lane": lane_endpoint}, **rdv.gather()}
                eps = {self.node_names[self.node_of[r]]: msgs[r]["ep"] for r in msgs if msgs[r]["ep"]}
                lane_eps = [msgs[r].get("lane") for r in range(self.world_size)]
                rdv.reply({r: {"eps": eps, "lanes": lane_eps} for r in rdv.conns})
            elif self.world_size > 1:
                ans = rdv.exchange({"ep": endpoint, "lane": lane_endpoint})
                eps, lane_eps = ans["eps"], ans["lanes"]
            else:
                eps, lane_eps = {}, []

            self._rdv = rdv
            self._setup_node(deadline)
            if self.is_leader and self.nnodes > 1:
                self._connect_tree(listener, eps, deadline)
            if lanes_possible:
                self._connect_lanes(lane_listener, lane_eps, deadline)
        finally:
            for lst in (listener, lane_listener):
                if lst is not None:
                    lst.close()

        # everyone up: report (with whether lanes can run here), wait for the go
        lanes_here = self._lanes is not None and self._lanes_usable()
        if self.rank == 0:
            ready = rdv.gather()
            lanes = lanes_here and all(m.get("lanes") for m in ready.values())
            rdv.reply({r: {"go": True, "lanes": lanes} for r in rdv.conns})
        elif self.world_size > 1:
            lanes = bool(rdv.exchange({"ready": True, "lanes": lanes_here}).get("lanes"))
        else:
            lanes = False
        self.lanes = lanes
        if not lanes and self._lanes is not None:
            self._lanes.close()
            self._lanes = None
        self._engine = Engine(self._sync, self._arena, self._layout, self.nnodes, self._internode, HostBackend())
        self._engine.cma = self.cma
        self._engine.lanes = self._lanes
        if self._internode is not None:
            self._internode.engine = self._engine

    def _adopt(self, plan: dict, res: dict) -> None:
        self.session: str = plan["session"]
        self.node_names: list[str] = plan["nodes"]
        self.local_groups: list[list[int]] = plan["local"]
        self.node_of = [0] * self.world_size
        for i, ranks in enumerate(self.local_groups):
            for r in ranks:
                self.node_of[r] = i
        self.node_index = self.node_of[self.rank]
        self.node: str = self.node_names[self.node_index]
        self.nnodes = len(self.node_names)
        self.local_ranks: list[int] = self.local_groups[self.node_index]
        self.local_rank = self.local_ranks.index(self.rank)
        self.local_world_size = len(self.local_ranks)
        self.leaders = [g[0] for g in self.local_groups]
        self.is_leader = self.local_rank == 0
        self._pids, self._starts = plan["pids"], plan["starts"]
        cfg = plan["cfg"]
        self.chunk, self.slots, self.heap_bytes = cfg["chunk"], cfg["slots"], cfg["heap"]
        self.trees = (Tree.from_parents(plan["trees"][0]), Tree.from_parents(plan["trees"][1]))

    def _listen(self, rdv: _Rendezvous):
        """A listener on this node's address (any free port) and its endpoint for the others."""
        addr = self._node_address(rdv)
        try:
            lst = listen(addr, 0, traffic_class=TrafficClass.HFREDUCE, timeout=self.timeout)
        except NetworkError:
            lst = listen("0.0.0.0", 0, traffic_class=TrafficClass.HFREDUCE, timeout=self.timeout)
            addr = rdv.local_addr
        return lst, [addr, lst.port]

    def _lanes_usable(self) -> bool:
        """Can this rank run allreduce in lanes: the C loop is built and enabled, single-copy reads
        work on this node (or it has one rank), and HFREDUCE_LANES does not turn lanes off."""
        off = os.environ.get("HFREDUCE_LANES", "1").strip().lower() in ("0", "no", "off", "false")
        return (not off and c_loops_enabled() and hasattr(K._C, "pipeline_lanes")
                and (self.cma or self.local_world_size == 1))

    def _node_address(self, rdv: _Rendezvous) -> str:
        if self.cluster is not None and self.node in self.cluster.nodes:
            return self.cluster.node(self.node).address
        return rdv.local_addr if self.world_size > 1 else "127.0.0.1"

    def _setup_node(self, deadline: float) -> None:
        lay = Layout(self.local_world_size, self.slots, self.chunk)
        self._layout = lay
        owner = self.local_ranks[0]
        names = [segment_name(self._pids[r], self._starts[r], self.session, f"h{i}")
                 for i, r in enumerate(self.local_ranks)]
        arena_name = segment_name(self._pids[owner], self._starts[owner], self.session, "arena")
        heap = Segment.create(names[self.local_rank], self.heap_bytes)
        self._created.append(heap)
        if self.is_leader:
            arena = Segment.create(arena_name, lay.total, reserve=True)
            self._created.append(arena)
            words = np.frombuffer(arena.map, np.int64, count=2)
            words[Layout.LOCAL] = lay.local
            words[Layout.MAGIC] = Layout.MAGIC_VALUE
            del words
        else:
            arena = Segment.open(arena_name, deadline, alive=lambda: self._alive(owner))
        heaps = [heap if i == self.local_rank else Segment.open(n, deadline, alive=lambda r=r: self._alive(r))
                 for i, (n, r) in enumerate(zip(names, self.local_ranks, strict=True))]
        if arena.size != lay.total:
            raise InitError(f"node {self.node}: the arena has {arena.size} bytes, expected {lay.total} "
                            "(ranks of one node run different hfreduce versions?)")
        self._arena = NodeArena(lay, arena, heaps, self.local_rank)
        self._sync = NodeSync(self._arena, self.local_rank, self.local_ranks,
                              [self._pids[r] for r in self.local_ranks], self.node_names, self.node_index,
                              self.rank, self.timeout)
        sync = self._sync
        sync.set(lay.PID, os.getpid())
        # a word of my private memory that the peers try to read (see _probe_cma)
        self._cma_word = ctypes.c_int64(os.getpid())
        sync.set(lay.CMA_ADDR, ctypes.addressof(self._cma_word))
        sync.publish(lay.ATTACHED, 1)
        sync.wait(lambda: self._rdv.check_relayed() or sync.min(lay.ATTACHED) >= 1,
                  lambda: (sync.argmin(lay.ATTACHED), "it did not map the node's shared memory"),
                  timeout=max(0.1, deadline - time.monotonic()))
        for seg in self._created:  # every local rank maps everything: unlink (see shm's note)
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
        sync, lay = self._sync, self._layout
        ok = self.local_world_size > 1 and K.KERNEL == "c-simd" and hasattr(K._C, "pipeline_cma") and \
            os.environ.get("HFREDUCE_CMA", "1").strip().lower() not in ("0", "no", "off", "false")
        if ok:
            for r in range(self.local_world_size):
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
        sync.wait(lambda: self._rdv.check_relayed() or sync.min(lay.CMA_OK) >= 1,
                  lambda: (sync.argmin(lay.CMA_OK), "it did not finish the shared-memory start-up"),
                  timeout=max(0.1, deadline - time.monotonic()))
        return all(sync.get(r, lay.CMA_OK) == 1 for r in range(self.local_world_size))

    def _alive(self, rank: int) -> None:
        self._rdv.check_relayed()
        if process_start_time(self._pids[rank]) != self._starts[rank]:
            end = time.monotonic() + 2.0  # a failing rank reports its cause through rank 0: wait for it
            while time.monotonic() < end and self.rank != 0:
                self._rdv.check_relayed()
                time.sleep(0.02)
            raise InitError(f"rank {rank} (node {self.node}) died during start-up")

    def _connect_tree(self, listener, eps: dict, deadline: float) -> None:
        me = self.node_index
        up: dict[int, Connection] = {}
        down: dict[tuple[int, int], Connection] = {}
        oob: dict[int, Connection] = {}
        neighbours = set()
        for tree in self.trees:
            if tree.parent[me] >= 0:
                neighbours.add(tree.parent[me])
            neighbours.update(tree.children[me])
        expected = sum(len(t.children[me]) for t in self.trees) + sum(1 for n in neighbours if n > me)
        tc = TrafficClass.HFREDUCE
        left = lambda: max(0.01, deadline - time.monotonic())  # noqa: E731
        src = eps[self.node][0]
        try:
            for t, tree in enumerate(self.trees):
                p = tree.parent[me]
                if p >= 0:
                    host, port = eps[self.node_names[p]]
                    c = connect(host, port, timeout=left(), traffic_class=tc, source=src, io_timeout=self.timeout)
                    c.send(msgpack.packb({"s": self.session, "t": t, "from": me}))
                    up[t] = c
            for n in sorted(neighbours):
                if n < me:
                    host, port = eps[self.node_names[n]]
                    c = connect(host, port, timeout=left(), traffic_class=tc, source=src, io_timeout=self.timeout)
                    c.send(msgpack.packb({"s": self.session, "t": "oob", "from": me}))
                    oob[n] = c
            for _ in range(expected):
                c = listener.accept(timeout=left())
                h = msgpack.unpackb(c.recv(timeout=left()).header)
                if h.get("s") != self.session:
                    c.close()
                    raise InitError(f"node {self.node}: a connection from another group arrived at the leader")
                if h["t"] == "oob":
                    oob[h["from"]] = c
                else:
                    down[(h["t"], h["from"])] = c
        except BaseException as exc:
            for c in [*up.values(), *down.values(), *oob.values()]:
                c.close()
            if isinstance(exc, TransportError):
                raise InitError(f"node {self.node}: cannot connect the inter-node tree: {exc}") from exc
            raise
        self._internode = InterNode(self._sync, self.trees, me, self.node_names, self.leaders, up, down, oob,
                                    self.timeout, self.chunk)

    def _connect_lanes(self, listener, lane_eps: list, deadline: float) -> None:
        """Connect this rank's lane: one connection per tree edge to the rank with my local rank on
        the neighbour node (see hfreduce.lanes)."""
        me, s = self.node_index, self.local_rank
        links: list[tuple[Connection, int, int]] = []
        tc = TrafficClass.HFREDUCE
        left = lambda: max(0.01, deadline - time.monotonic())  # noqa: E731
        expected = sum(len(t.children[me]) for t in self.trees)
        try:
            for t, tree in enumerate(self.trees):
                p = tree.parent[me]
                if p >= 0:
                    host, port = lane_eps[self.local_groups[p][s]]
                    c = connect(host, port, timeout=left(), traffic_class=tc, source=lane_eps[self.rank][0],
                                io_timeout=self.timeout)
                    c.send(msgpack.packb({"s": self.session, "t": t, "from": me, "lane": s}))
                    links.append((c, t, p))
            for _ in range(expected):
                c = listener.accept(timeout=left())
                h = msgpack.unpackb(c.recv(timeout=left()).header)
                if h.get("s") != self.session or h.get("lane") != s:
                    c.close()
                    raise InitError(f"rank {self.rank} (node {self.node}): a lane connection from another group "
                                    "or lane arrived")
                links.append((c, h["t"], h["from"]))
        except BaseException as exc:
            for c, _, _ in links:
                c.close()
            if isinstance(exc, TransportError):
                raise InitError(f"rank {self.rank} (node {self.node}): cannot connect its lane: {exc}") from exc
            raise
        self._lanes = Lanes(self._sync, self.trees, me, self.node_names, self.local_groups, links, self.timeout,
                            self.chunk)

    # -- collectives -------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._destroyed:
            raise HFReduceError("the process group was destroyed; call hfreduce.init() again")

    def _submit(self, spec: OpSpec, async_op: bool) -> Work:
        self._check_alive()
        self._attach_device(spec)
        work = self._engine.submit(spec)
        if not async_op:
            self._wait(work)
        return work

    def _wait(self, work: Work, timeout: float | None = None) -> None:
        """Wait for ``work``; never forever.

        [Note: bounded synchronous waits] Every stage of a collective has its own deadline (the
        group timeout, which turns a dead or stuck peer into an error), so a long operation is
        not cut short here. This loop is the backstop: each group-timeout slice it checks that
        the engine thread is still there to finish the work; if it is gone (destroyed group,
        crashed engine), the caller gets an error instead of a wait without end.
        """
        if timeout is not None:
            work.wait(timeout)
            return
        while not work._event.wait(self.timeout):
            if self._destroyed or not self._engine._thread.is_alive():
                raise HFReduceError(f"{work.spec.name}: the engine stopped before the operation finished")
        work.wait()  # completed: raises its error, if any

    def _spec(self, kind: int, nbytes: int, dtype: int, op: ReduceOp | int = ReduceOp.SUM, root: int = -1,
              bitwise: bool = False, **kw) -> OpSpec:
        op = ReduceOp(op)
        if bitwise:
            kdtype, kop, avg = K.DT_U8, K.OP_BOR, 0
        else:
            kdtype = dtype
            kop = K.OP_SUM if op in (ReduceOp.SUM, ReduceOp.AVG) else int(op)
            avg = self.world_size if op == ReduceOp.AVG else 0
        return OpSpec(kind, nbytes, dtype, int(op) if not bitwise else 4, kdtype, kop, avg, root, **kw)

    def _buf(self, buf, what: str = "buf", writable: bool = True) -> Buf | DeviceBuf:
        """A host buffer (:mod:`hfreduce.buffers`) or a device buffer (:mod:`hfreduce.device`)."""
        d = as_device_buf(buf, what)
        return d if d is not None else as_buf(buf, what, writable)

    def _attach_device(self, spec: OpSpec) -> None:
        """Device buffers: give the spec this group's backend for their device (made on first use)."""
        bufs = [x for x in (spec.inp, spec.out) if x is not None]
        devs = {x.key for x in bufs if isinstance(x, DeviceBuf)}
        if not devs:
            return
        if len(devs) > 1 or any(not isinstance(x, DeviceBuf) for x in bufs):
            raise InvalidArgument(f"{spec.name}: its buffers must all be host buffers or all on one device "
                                  "(copy one of them first)")
        d = next(x for x in bufs if isinstance(x, DeviceBuf))
        backend = self._devices.get(d.key)
        if backend is None:
            backend = d.device.make_backend(self._arena, self.chunk, self._sync.wake)
            self._devices[d.key] = backend
        spec.backend = backend
        backend.prepare(spec)

    def _registered(self, b: Buf | DeviceBuf) -> tuple[int, int] | None:
        self._check_alive()
        if isinstance(b, DeviceBuf):
            return None
        off = self._arena.heap.contains(b.addr, b.nbytes)
        return None if off is None else (self.local_rank, off)

    def _check_root(self, root: int, what: str) -> None:
        if not isinstance(root, int) or not 0 <= root < self.world_size:
            raise InvalidArgument(f"{what}={root!r} is not a rank of this group (0..{self.world_size - 1})")

    def allreduce(self, buf, op: ReduceOp = ReduceOp.SUM, async_op: bool = False) -> Work:
        """Reduce ``buf`` across all ranks, in place (every rank gets the result)."""
        b = self._buf(buf)
        spec = self._spec(ALLREDUCE, b.nbytes, b.dtype, op, inp=b.data, out=b.data, heap=self._registered(b),
                          keep=b.owner)
        return self._submit(spec, async_op)

    def reduce(self, buf, dst: int = 0, op: ReduceOp = ReduceOp.SUM, async_op: bool = False) -> Work:
        """Reduce ``buf`` across all ranks into rank ``dst``'s ``buf`` (the others' are unchanged)."""
        self._check_root(dst, "dst")
        b = self._buf(buf, writable=self.rank == dst)
        spec = self._spec(REDUCE, b.nbytes, b.dtype, op, root=dst, inp=b.data,
                          out=b.data if self.rank == dst else None, keep=b.owner)
        return self._submit(spec, async_op)

    def broadcast(self, buf, src: int = 0, async_op: bool = False) -> Work:
        """Copy rank ``src``'s ``buf`` into every rank's ``buf``."""
        self._check_root(src, "src")
        b = self._buf(buf, writable=self.rank != src)
        mine = self.rank == src
        spec = self._spec(BROADCAST, b.nbytes, b.dtype, root=src, bitwise=True, inp=b.data if mine else None,
                          out=None if mine else b.data, keep=b.owner)
        return self._submit(spec, async_op)

    def allgather(self, out_buf, in_buf, async_op: bool = False) -> Work:
        """``out_buf`` = the concatenation of every rank's ``in_buf``, in rank order."""
        o, i = self._buf(out_buf, "out_buf"), self._buf(in_buf, "in_buf", writable=False)
        if o.dtype != i.dtype:
            raise InvalidArgument(f"allgather: out_buf is {o.dtype_name}, in_buf {i.dtype_name}")
        if o.nbytes != i.nbytes * self.world_size:
            raise InvalidArgument(f"allgather: out_buf needs world_size x len(in_buf) = {self.world_size} x "
                                  f"{i.nbytes} bytes, it has {o.nbytes}")
        spec = self._spec(ALLGATHER, o.nbytes, o.dtype, bitwise=True, inp=i.data, in_off=self.rank * i.nbytes,
                          out=o.data, keep=(o.owner, i.owner))
        return self._submit(spec, async_op)

    def reduce_scatter(self, out_buf, in_buf, op: ReduceOp = ReduceOp.SUM, async_op: bool = False) -> Work:
        """Reduce ``in_buf`` across ranks; rank r gets part r of the result in ``out_buf``."""
        o, i = self._buf(out_buf, "out_buf"), self._buf(in_buf, "in_buf", writable=False)
        if o.dtype != i.dtype:
            raise InvalidArgument(f"reduce_scatter: out_buf is {o.dtype_name}, in_buf {i.dtype_name}")
        if i.nbytes != o.nbytes * self.world_size:
            raise InvalidArgument(f"reduce_scatter: in_buf needs world_size x len(out_buf) = {self.world_size} x "
                                  f"{o.nbytes} bytes, it has {i.nbytes}")
        spec = self._spec(REDUCE_SCATTER, i.nbytes, i.dtype, op, inp=i.data, out=o.data,
                          out_off=self.rank * o.nbytes, keep=(o.owner, i.owner))
        return self._submit(spec, async_op)

    def barrier(self, timeout: float | None = None) -> None:
        """Return when every rank has called barrier (raise HFReduceTimeout after ``timeout`` s)."""
        work = self._submit(self._spec(BARRIER, 0, K.DT_U8, bitwise=True), async_op=True)
        self._wait(work, timeout)

    # -- registered buffers ------------------------------------------------------------------
    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        """A numpy array in this node's shared-memory arena (allreduce on it skips the copy-in)."""
        if self._destroyed:
            raise HFReduceError("the process group was destroyed")
        if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
            dt = np.dtype(np.uint16)  # bf16 bits: view the tensor as torch.bfloat16
        else:
            dt = np.dtype(dtype)
            if np_dtype_code(dt) is None:
                raise InvalidArgument(f"empty: dtype {dt} is not supported by the collectives")
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        heap = self._arena.heap
        off = heap.alloc(nbytes)
        return heap.array(off, shape, dt)

    # -- state ---------------------------------------------------------------------------------
    def info(self) -> dict:
        py_loop = not (self._engine.c_loops if self._engine else c_loops_enabled())
        out = {"kernel": K.KERNEL, "simd": K.SIMD, "pipeline": "python" if py_loop else "c", "backend": "host",
               "device_backends": [b.describe() for b in self._devices.values()], "rank": self.rank,
               "world_size": self.world_size, "local_rank": self.local_rank,
               "local_world_size": self.local_world_size, "node": self.node, "nodes": list(self.node_names),
               "leader": self.is_leader, "leaders": list(self.leaders), "chunk_bytes": self.chunk,
               "slots": self.slots, "heap_bytes": self.heap_bytes, "timeout": self.timeout,
               "single_copy": self.cma and self.nnodes == 1 and not py_loop, "session": self.session, "trees": [list(t.parent) for t in self.trees],
               "completed": self._engine.completed if self._engine else 0,
               "single_copy_ops": self._engine.single_copy_ops if self._engine else 0,
               "lanes": self.lanes, "lane_ops": self._engine.lane_ops if self._engine else 0,
               "failed": repr(self._engine.error) if self._engine and self._engine.error else None}
        if self._internode is not None:
            out["tree"] = self._internode.describe()
        if self._lanes is not None:
            out["lane_tree"] = self._lanes.describe()
        return out

    @property
    def error(self) -> HFReduceError | None:
        return self._engine.error if self._engine is not None else None

    def destroy(self) -> None:
        """Leave the group: finish the running collective, release shared memory and connections."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._engine is not None:
            self._engine.stop(timeout=self.timeout * 2 + 5)
        if self._sync is not None:
            try:
                self._sync.set(self._layout.DEPARTED, 1)
                self._sync.wake()
            except (ValueError, TypeError):
                pass
        self._teardown()

    def _teardown(self) -> None:
        for backend in self._devices.values():  # stop device copies before the arena goes away
            try:
                backend.close()
            except Exception:  # noqa: BLE001 - teardown goes on
                log.exception("closing the %s device backend failed", backend.name)
        self._devices = {}
        if self._internode is not None:
            self._internode.close()
            self._internode = None
        if self._lanes is not None:
            self._lanes.close()
            self._lanes = None
        if self._sync is not None:
            self._sync.close()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
        for seg in self._created:
            seg.close()
        self._created = []

    def __repr__(self) -> str:
        return (f"<ProcessGroup rank {self.rank}/{self.world_size} node {getattr(self, 'node', '?')} "
                f"local {getattr(self, 'local_rank', '?')}/{getattr(self, 'local_world_size', '?')}>")


# -- module-level state ---------------------------------------------------------------------------
def init(rank: int | None = None, world_size: int | None = None, local_rank: int | None = None,
         local_world_size: int | None = None, master_addr: str | None = None, master_port: int | None = None,
         node: str | None = None, cluster: Any = None, timeout: float | None = None) -> ProcessGroup:
    """Form a process group with every other rank and make it the default group.

    Explicit arguments override the environment (see the module docstring). ``timeout``
    (default 60 s, or $HFREDUCE_TIMEOUT) bounds the start-up and every wait for a peer: a dead
    or stuck peer becomes an :class:`HFReduceError` on every rank within about that time.
    """
    global _default
    res = _resolve(rank, world_size, local_rank, local_world_size, master_addr, master_port, node, cluster, timeout)
    pg = ProcessGroup(res)
    with _lock:
        _groups.append(pg)
        _default = pg
    return pg


def get_default() -> ProcessGroup:
    if _default is None:
        raise HFReduceError("hfreduce is not initialized: call hfreduce.init() first")
    return _default


def is_initialized() -> bool:
    return _default is not None


def destroy(group: ProcessGroup | None = None) -> None:
    """Destroy ``group`` (default: the default group; every group when called at exit)."""
    global _default
    with _lock:
        targets = [group] if group is not None else ([_default] if _default is not None else [])
    for pg in targets:
        pg.destroy()
        with _lock:
            if pg in _groups:
                _groups.remove(pg)
            if _default is pg:
                _default = None


@atexit.register
def _destroy_all() -> None:
    global _default
    for pg in list(_groups):
        try:
            pg.destroy()
        except Exception:  # noqa: BLE001 - at exit, best effort
            pass
    _groups.clear()
    _default = None
