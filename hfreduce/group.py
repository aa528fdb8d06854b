"""The process group: start-up in order, then the collectives API.

Start-up, for every rank (``init``), one module per step:

1. **Environment** (:mod:`hfreduce.env`): rank, world size, node and the rendezvous address
   from the arguments, else the launcher's variables, else MPI, else a group of one.
2. **Rendezvous** (:mod:`hfreduce.rendezvous`) at rank 0: every rank says who it is; rank 0
   groups ranks into nodes, picks the leaders, builds the double tree and sends everyone the
   plan.
3. **Node memory** (:mod:`hfreduce.bootstrap`): the leader creates the arena, every rank its
   heap; all map all, then every creator unlinks its segments (see :mod:`hfreduce.shm`).
4. **Wiring** (:mod:`hfreduce.wiring`): the leaders' tree links and the ranks' lanes.
5. Everyone reports ready to rank 0 and waits for the go: ``init`` returns on all ranks only
   when the whole group is up, and raises :class:`InitError` on all of them otherwise.

The frames between nodes are defined once in :mod:`hfreduce.wire`.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import threading
import time
from typing import Any

import numpy as np

from network.errors import NetworkError

from . import counters, p2p
from . import kernels as K
from .bootstrap import NodeMemory
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
from .env import Config, host_id, resolve
from .errors import HFReduceError, InitError, InvalidArgument
from .internode import InterNode
from .lanes import Lanes
from .ops import ReduceOp
from .rendezvous import GroupPublisher, Rendezvous, plan, publisher
from .shm import NodeArena, process_start_time, sweep_stale
from .sync import NodeSync
from .tree import Tree
from .wiring import connect_lanes, connect_tree, lanes_usable, listen_here

__all__ = ["ProcessGroup", "init", "new_group", "destroy", "get_default", "is_initialized", "Config"]

log = logging.getLogger(__name__)

_default: ProcessGroup | None = None
_groups: list[ProcessGroup] = []
_lock = threading.Lock()

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
        self.cma = False  # single-copy reads between this node's ranks (see hfreduce.bootstrap)
        self._mem: NodeMemory | None = None  # the node's shared memory (hfreduce.bootstrap)
        self._devices: dict[Any, Any] = {}  # device key -> this group's backend for it (hfreduce.device)
        self._mesh: p2p.Mesh | None = None  # all_to_all and send/recv (hfreduce.p2p)
        deadline = time.monotonic() + self.timeout
        sweep_stale()
        pub = publisher(res, max(0.01, deadline - time.monotonic()))
        rdv = Rendezvous(self.rank, self.world_size, res["master_addr"], res["master_port"], deadline, pub)
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

    # -- start-up ------------------------------------------------------------------------------
    def _start(self, res: dict, rdv: Rendezvous, deadline: float) -> None:
        me = os.getpid()
        hello = {"rank": self.rank, "world_size": self.world_size, "node": res["node"], "host": host_id(),
                 "local_rank": res["local_rank"], "local_world_size": res["local_world_size"], "pid": me,
                 "start": process_start_time(me) or 0}
        cfg = Config()
        if self.rank == 0:
            hellos = {0: hello, **rdv.accept_all()}
            the_plan = plan(hellos, self.cluster, cfg)
            rdv.reply({r: the_plan for r in rdv.conns})
        else:
            the_plan = rdv.exchange(hello)
        self._adopt(the_plan, res)

        # leaders listen for their tree neighbours; with lanes possible, every rank for its lane's
        # (and every rank for its point-to-point peers: hfreduce.p2p)
        listener = lane_listener = p2p_listener = None
        lanes_possible = self.nnodes > 1 and len({len(g) for g in self.local_groups}) == 1
        endpoint = lane_endpoint = p2p_endpoint = None
        try:
            if self.is_leader and self.nnodes > 1:
                listener, endpoint = listen_here(self, rdv)
            if lanes_possible:
                lane_listener, lane_endpoint = listen_here(self, rdv)
            if self.world_size > 1:
                p2p_listener, p2p_endpoint = listen_here(self, rdv)
            if self.rank == 0:
                msgs = {0: {"ep": endpoint, "lane": lane_endpoint, "p2p": p2p_endpoint}, **rdv.gather()}
                eps = {self.node_names[self.node_of[r]]: msgs[r]["ep"] for r in msgs if msgs[r]["ep"]}
                lane_eps = [msgs[r].get("lane") for r in range(self.world_size)]
                p2p_eps = [msgs[r].get("p2p") for r in range(self.world_size)]
                rdv.reply({r: {"eps": eps, "lanes": lane_eps, "p2p": p2p_eps} for r in rdv.conns})
            elif self.world_size > 1:
                ans = rdv.exchange({"ep": endpoint, "lane": lane_endpoint, "p2p": p2p_endpoint})
                eps, lane_eps, p2p_eps = ans["eps"], ans["lanes"], ans["p2p"]
            else:
                eps, lane_eps, p2p_eps = {}, [], []

            self._setup_node(rdv, deadline)
            if self.is_leader and self.nnodes > 1:
                self._internode = connect_tree(self, listener, eps, deadline)
            if lanes_possible:
                self._lanes = connect_lanes(self, lane_listener, lane_eps, deadline)
            self._mesh = p2p.Mesh(self, p2p_listener, p2p_eps)  # its peers connect lazily
            p2p_listener = None  # the mesh's now
        finally:
            if p2p_listener is not None:
                p2p_listener.close()
            for lst in (listener, lane_listener):
                if lst is not None:
                    lst.close()

        # everyone up: report (with whether lanes can run here), wait for the go
        lanes_here = self._lanes is not None and lanes_usable(self.cma, self.local_world_size)
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

    def _setup_node(self, rdv: Rendezvous, deadline: float) -> None:
        """Map the node's shared memory (see :class:`hfreduce.bootstrap.NodeMemory`)."""
        self._mem = mem = NodeMemory(
            rank=self.rank, local_ranks=self.local_ranks, pids=self._pids, starts=self._starts, session=self.session,
            node_names=self.node_names, node_index=self.node_index, slots=self.slots, chunk=self.chunk,
            heap_bytes=self.heap_bytes, timeout=self.timeout, deadline=deadline, check_relayed=rdv.check_relayed)
        self._layout, self._arena, self._sync, self.cma = mem.layout, mem.arena, mem.sync, mem.cma

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
        not cut short here. This loop is the backstop: every two seconds (not every group
        timeout: that is 30 minutes by default) it checks that the engine thread is still there
        to finish the work; if it is gone (destroyed group, crashed engine), the caller gets an
        error instead of a long wait.
        """
        if timeout is not None:
            work.wait(timeout)
            return
        while not work._event.wait(min(self.timeout, 2.0)):
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

    # -- all_to_all and point-to-point (hfreduce.p2p) ------------------------------------------
    def all_to_all(self, out_buf, in_buf, out_splits=None, in_splits=None, async_op: bool = False) -> Work:
        """Chunk j of ``in_buf`` goes to rank j, chunk i of ``out_buf`` comes from rank i (as
        torch's all_to_all_single); splits count rows of the first dimension (None: equal)."""
        return p2p.all_to_all(self, out_buf, in_buf, out_splits, in_splits, async_op)

    def isend(self, buf, dst: int, tag: int = 0) -> Work:
        """Send ``buf`` to rank ``dst``; the work completes when ``buf`` may be reused."""
        return p2p.isend(self, buf, dst, tag)

    def irecv(self, buf, src: int, tag: int = 0) -> Work:
        """Receive rank ``src``'s next message with ``tag`` into ``buf`` (exactly its size)."""
        return p2p.irecv(self, buf, src, tag)

    def send(self, buf, dst: int, tag: int = 0) -> None:
        p2p.send(self, buf, dst, tag)

    def recv(self, buf, src: int, tag: int = 0) -> None:
        p2p.recv(self, buf, src, tag)

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
        counters.publish()  # the last counts, for the agent (no-op outside the platform)
        if self._sync is not None:
            try:
                self._sync.set(self._layout.DEPARTED, 1)
                self._sync.wake()
            except (ValueError, TypeError):
                pass
        self._teardown()

    def _teardown(self) -> None:
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None
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
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        self._arena = None

    def __repr__(self) -> str:
        return (f"<ProcessGroup rank {self.rank}/{self.world_size} node {getattr(self, 'node', '?')} "
                f"local {getattr(self, 'local_rank', '?')}/{getattr(self, 'local_world_size', '?')}>")


# -- module-level state ---------------------------------------------------------------------------
def init(rank: int | None = None, world_size: int | None = None, local_rank: int | None = None,
         local_world_size: int | None = None, master_addr: str | None = None, master_port: int | None = None,
         node: str | None = None, cluster: Any = None,
         timeout: float | datetime.timedelta | None = None) -> ProcessGroup:
    """Form a process group with every other rank and make it the default group.

    Explicit arguments override the environment (see the module docstring). ``timeout``
    (seconds or a ``datetime.timedelta``, as torch's; default $HFREDUCE_TIMEOUT, else 30
    minutes as torch's gloo) bounds the start-up and every wait for a stuck peer: it becomes
    an :class:`HFReduceError` on every rank within about that time (a dead peer at once).
    haiscale's DDP, FSDP and Comm wait on this group with the same timeout unless given theirs.
    """
    global _default
    res = resolve(rank, world_size, local_rank, local_world_size, master_addr, master_port, node, cluster, timeout)
    pg = ProcessGroup(res)
    with _lock:
        _groups.append(pg)
        _default = pg
    return pg


def new_group(ranks, timeout: float | datetime.timedelta | None = None,
              group: ProcessGroup | None = None) -> ProcessGroup | None:
    """A process group of ``ranks`` (ranks of ``group``, default the default group), as
    ``torch.distributed.new_group``: every rank of ``group`` calls it, in the same order of calls
    and with the same ranks; a member gets its group (numbered in the order of ``ranks``, sorted),
    the others None. It does not become the default group.

    [Note: a sub-group's start-up] Members keep their node and the cluster description of the
    parent, their local ranks are renumbered among the members on each node, and the sub-group's
    rank 0 binds an ephemeral port on its node's address and publishes it through an allgather on
    the parent (rendezvous.GroupPublisher): no port is guessed, and no launcher variable is read.
    """
    parent = group if group is not None else get_default()
    members = sorted({int(r) for r in ranks})
    if not members or members[0] < 0 or members[-1] >= parent.world_size:
        raise InvalidArgument(f"new_group: ranks {members} are not ranks of a group of {parent.world_size}")
    root = members[0]
    # this node's address, as the parent found it reachable at its start-up (its mesh listens there)
    addr = parent._mesh.addr if parent._mesh is not None else "127.0.0.1"
    pub = GroupPublisher(parent, root, addr)
    if parent.rank not in members:
        pub.exchange()   # the parent's allgather, which every rank of it joins
        return None
    same_node = [r for r in members if parent.node_of[r] == parent.node_of[parent.rank]]
    res = resolve(members.index(parent.rank), len(members), same_node.index(parent.rank), len(same_node),
                       addr, 0, parent.node, parent.cluster, timeout if timeout is not None else parent.timeout)
    res["publish"] = pub if len(members) > 1 else None
    pg = ProcessGroup(res)
    with _lock:
        _groups.append(pg)
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
