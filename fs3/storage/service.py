"""The storage server: its state, the RPC wiring, the targets' chunk stores, the admin handlers
and ``main``. The parts of its work live beside it (see the package's docstring).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from network import (
    Authenticator,
    Credential,
    RemoteError,
    RpcPool,
    RpcServer,
    TrafficClass,
    TransportError,
)
from network.auth import ANY, SERVICE
from network.metrics import add_collector
from network.service import service_parser, wait_for_shutdown

from ..caps import CapChecker
from ..chunkstore import DISK_ERRNOS, ChunkStore
from ..config import Fs3Config, node_data_dir, service_start
from ..errors import StorageError, TargetFailed
from ..routing import Routing, SingleFlight
from .lease import Lease
from .locks import ChunkLocks
from .read import Reads
from .request import malformed
from .resync import ResyncWorker
from .scrub import CheckWorker
from .update import ReliableUpdate

__all__ = ["StorageServer", "main"]

log = logging.getLogger(__name__)
_tls = threading.local()


class _QuietFs3Errors(logging.Filter):
    """network.rpc logs a traceback for handler exceptions it does not know; ours are expected
    answers (stale routing, not committed...) that travel to the client, not server bugs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StorageError)


logging.getLogger("network.rpc").addFilter(_QuietFs3Errors())


class StorageServer(ReliableUpdate, Reads, CheckWorker, ResyncWorker, Lease):
    """An fs3 storage server (see the package docstring): ``start``, serve, ``stop``."""

    def __init__(self, cfg: Fs3Config, node: str, address: str, port: int, mgmtd: tuple[str, int],
                 data_dir, *, lock_timeout: float = 30.0, io_timeout: float = 60.0,
                 auth: Authenticator | Credential | None = None, limits: dict | None = None) -> None:
        auth = Authenticator.of(auth)  # the cluster key: serves, and calls mgmtd and chain successors
        self._cred = auth.key
        # jobs (client principals) need a capability from the metadata service per file (fs3.caps)
        self._caps = CapChecker(self._cred) if isinstance(self._cred, Credential) else None
        self.cfg = cfg
        self.node = node
        self.address = address
        self.data_dir = data_dir
        self.mgmtd_addr = mgmtd
        self.lock_timeout = lock_timeout
        self.io_timeout = io_timeout
        # one attempt's bounds (fs3.config's note on attempt timeouts): a write without a budget
        # from its client gets write_timeout; a repair's read of a peer waits read_timeout
        self.write_timeout = min(cfg.write_attempt_timeout, io_timeout)
        self.read_timeout = min(cfg.read_attempt_timeout, io_timeout)
        self.incarnation = uuid.uuid4().hex
        # [Note: one lock per structure] Handler, heartbeat, scrub, repair and resync threads all
        # share the structures below; each has its own lock, held only to read or change it (never
        # across a call to a peer; _stores_lock also while a target's store opens, once), so no
        # part waits on another's unrelated work: routing (_rlock), failed and _fenced
        # (_failed_lock), stores (_stores_lock), _dedup, stats, _repairing, _resyncing, _admitted
        # and _pools (each _<name>_lock). Readers iterate a copy taken under the lock.
        # The per-chunk locks (self.locks) order the work on one chunk.
        self.routing = Routing(chunk_size=cfg.chunk_size, replication=cfg.replication)
        self._rlock = threading.Lock()
        self._last_refresh = 0.0
        self._lease_until = 0.0  # monotonic time until which this server may serve (see _check_lease)
        self._fenced = False
        self.failed: dict[int, str] = {}  # targets whose disk failed -> why (reported offline)
        self._failed_lock = threading.Lock()  # guards failed and _fenced
        self._beat = threading.Event()  # set: heartbeat now (a target failed)
        self._fetch = SingleFlight(self._fetch_routing, timeout=io_timeout)
        self.stores: dict[int, ChunkStore] = {}
        self._stores_lock = threading.Lock()
        self.locks = ChunkLocks()
        # (target, client, channel) -> (seq, result) of the last update, least recently used first;
        # bounded: every client process brings new channels
        self._dedup: OrderedDict[tuple, tuple[int, dict]] = OrderedDict()
        self._dedup_lock = threading.Lock()
        self._pools: dict[tuple[str, int], RpcPool] = {}
        self._pools_lock = threading.Lock()
        self.mgmtd = RpcPool(*mgmtd, size=2, timeout=10.0, connect_timeout=5.0, credential=self._cred,
                             traffic_class=TrafficClass.STORAGE, source=address)
        self.stats = {"reads": 0, "writes": 0, "corrupt": 0, "repaired": 0, "resyncs": 0, "resynced_chunks": 0,
                      "routing_refreshes": 0, "scrub_passes": 0, "scrubbed_chunks": 0, "lease_expired": 0,
                      "failed_targets": 0,
                      "damage": {}}  # damaged copies found, by kind (ChunkCorrupt.damage)
        self._stats_lock = threading.Lock()
        self._repairing: set[tuple[int, int, int]] = set()  # (target, chain, chunk) being repaired
        self._repair_lock = threading.Lock()
        self._resyncing: set[tuple[int, int, int]] = set()  # (chain, successor, chain version) in progress
        self._resync_lock = threading.Lock()
        self._admitted: dict[tuple[int, int], int] = {}  # (chain, chain version) -> writes in progress
        self._admit_lock = threading.Lock()
        self._stop = threading.Event()
        self._bulk = bulk = max(cfg.chunk_size, cfg.max_batch_bytes)  # the largest payload a write carries
        # headers up to a batch's size too: a resync's sync_remove lists every chunk to drop
        self.server = RpcServer(address, port, auth=auth, name=f"fs3.storage@{node}",
                                traffic_class=TrafficClass.STORAGE, max_header=bulk, **(limits or {}))
        s = self.server
        # [Note: who may call what] clients (jobs, the fs3 library, the CLI as a user) read, write to
        # a chain's head and check copies; forwarding down a chain (fwd), resync and the chunk list
        # are the services' own (a forged forward would make one replica differ from the others).
        s.register("storage.write", self.h_write, payload_into=self._payload_buffer, roles=ANY,
                   service_if=("fwd",), max_payload=bulk)
        s.register("storage.write_batch", self.h_write_batch, payload_into=self._payload_buffer, roles=ANY,
                   service_if=("fwd",), max_payload=bulk)
        s.register("storage.read", self.h_read, roles=ANY)
        s.register("storage.check", self.h_check, roles=ANY)
        s.register("storage.sync_meta", self.h_sync_meta)
        s.register("storage.sync_write", self.h_sync_write, payload_into=self._payload_buffer, max_payload=bulk)
        s.register("storage.sync_remove", self.h_sync_remove)
        s.register("storage.list", self.h_list)
        s.register("storage.last_chunk", self.h_last_chunk)  # fs3.meta: a file's exact length
        s.register("storage.stats", self.h_stats, roles=ANY)
        s.register("storage.disk", self.h_disk)
        # Prometheus (docs/metrics.md): bytes and operations per target, counted where they happen;
        # the rest is read from ``stats`` at scrape time
        self._ops = Counter("fireflyer_fs3_storage_ops", "Chunk reads and writes (remove: a chunk removed) served "
                            "by each target", ["target", "op"], registry=s.metrics)
        self._bytes = Counter("fireflyer_fs3_storage_bytes", "Bytes read from and written to each target",
                              ["target", "op"], registry=s.metrics)
        add_collector(s.metrics, self._collect)
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, register_timeout: float = 30.0) -> None:
        """Register with mgmtd (first heartbeat, with the routing table), then serve.

        Registering first means a server that answers its health check is already known to
        mgmtd (and, after a restart, already taken out of service until it is resynced).
        """
        self.port = self.server.port
        deadline = time.monotonic() + register_timeout
        while True:
            try:
                self._heartbeat_once()
                break
            except (TransportError, RemoteError) as exc:
                if time.monotonic() > deadline:
                    raise StorageError(f"{self.node}: cannot register with mgmtd at "
                                       f"{self.mgmtd_addr[0]}:{self.mgmtd_addr[1]}: {exc}") from exc
                time.sleep(0.2)
        self.server.start()
        loops = [(self._heartbeat_loop, "heartbeat")]
        if self.cfg.scrub_interval > 0:
            loops.append((self._scrub_loop, "scrub"))
        for fn, name in loops:
            t = threading.Thread(target=fn, name=f"storage-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._beat.set()
        self.server.stop()
        for t in self._threads:
            t.join(5)
        with self._pools_lock:
            pools = list(self._pools.values())
        for p in pools:
            p.close()
        self.mgmtd.close()

    def _payload_buffer(self, args: dict, nbytes: int):
        # [Note: receive into a reused buffer] The payload lands in a per-thread buffer: the
        # handler runs in this same thread and finishes with it (stored, forwarded) before the
        # next request on the connection arrives, so reuse is safe and saves an allocation
        # (and its page faults) per chunk.
        size = self._bulk  # a chunk or a batch of them
        if nbytes > size:
            return None  # let rpc allocate; the handler rejects it with a clear error
        buf = getattr(_tls, "wbuf", None)
        if buf is None or len(buf) < nbytes:
            buf = _tls.wbuf = bytearray(size)
        return memoryview(buf)[:nbytes]

    # -- routing --------------------------------------------------------------------------------
    def _store(self, tid: int) -> ChunkStore:
        st = self.stores.get(tid)
        if st is None:
            with self._stores_lock:
                st = self.stores.get(tid)
                if st is None:
                    try:
                        st = ChunkStore(self.data_dir / "targets" / str(tid), tid, self.cfg.chunk_size,
                                        fsync=self.cfg.fsync, on_disk_error=self._fail_target)
                    except OSError as exc:
                        if exc.errno not in DISK_ERRNOS:
                            raise
                        self._fail_target(tid, exc)
                        raise TargetFailed(f"{self.node}: target {tid}: {exc}", target=tid) from exc
                    self.stores[tid] = st
        return st

    def _authorize(self, ctx, args: dict, chunks, write: bool, where: str) -> None:
        """A client principal (a job) must hold a capability for every chunk's file (fs3.caps);
        services pass. Raises CapabilityDenied."""
        if self._caps is None or ctx is None or SERVICE in ctx.roles:
            return
        holder = ctx.principal.key_id if ctx.principal is not None else ""
        self._caps.check(args.get("caps"), holder, chunks, write, f"{self.node} {where}")

    def _count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` of :meth:`h_stats` (handler threads count concurrently)."""
        with self._stats_lock:
            self.stats[name] += n

    def _io(self, tid: int, op: str, nbytes: int) -> None:
        """Count one chunk operation of ``nbytes`` on target ``tid`` (Prometheus)."""
        t = str(tid)
        self._ops.labels(t, op).inc()
        if nbytes:
            self._bytes.labels(t, op).inc(nbytes)

    _COUNTERS = (("repaired", "fireflyer_fs3_repairs", "Damaged chunk copies repaired from a peer"),
                 ("corrupt", "fireflyer_fs3_corrupt_chunks", "Damaged chunk copies found (reads, checks, scrub)"),
                 ("resyncs", "fireflyer_fs3_resyncs", "Chain resyncs this server completed as predecessor"),
                 ("resynced_chunks", "fireflyer_fs3_resynced_chunks", "Chunks copied by resyncs"),
                 ("scrubbed_chunks", "fireflyer_fs3_scrubbed_chunks", "Chunks the scrub verified"),
                 ("lease_expired", "fireflyer_fs3_lease_expired", "Times this server stopped serving: no "
                  "routing from mgmtd within its lease"))

    def _collect(self):
        """Scrape-time series from ``stats``, the failed targets and the data disk."""
        with self._stats_lock:
            stats = dict(self.stats)
        for key, name, doc in self._COUNTERS:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], stats.get(key, 0))
            yield c
        with self._failed_lock:
            failed = len(self.failed)
        g = GaugeMetricFamily("fireflyer_fs3_failed_targets", "Targets of this server taken out of service "
                              "(disk errors)")
        g.add_metric([], failed)
        yield g
        disk = self.h_disk({}, None, None)["disk"]
        if disk is not None:
            d = GaugeMetricFamily("fireflyer_fs3_disk_bytes", "The data directory's disk", labels=["kind"])
            d.add_metric(["total"], disk["total"])
            d.add_metric(["free"], disk["free"])
            yield d

    def _stores_snapshot(self) -> list[tuple[int, ChunkStore]]:
        """This server's stores by target id, taken under their lock (a routing change may add one)."""
        with self._stores_lock:
            return sorted(self.stores.items())

    def _fail_target(self, tid: int, exc: OSError) -> None:
        """Take a target whose disk failed out of service: it answers ``TargetFailed`` from now on,
        and the heartbeat (sent at once) reports it offline, so mgmtd moves it out of its chains
        and the other replicas carry on. A restart of the server, with the disk repaired, brings
        it back through a resync."""
        reason = f"{exc.strerror} ({errno.errorcode.get(exc.errno or 0, exc.errno)}) at {exc.filename}"
        with self._failed_lock:
            if tid in self.failed:
                return
            self.failed[tid] = reason
        self._count("failed_targets")
        log.error("%s: target %d failed, taken out of service: %s", self.node, tid, reason)
        self._report(tid, 0, 0, "TargetFailed", reason)
        self._beat.set()

    # -- admin ------------------------------------------------------------------------------------------
    def h_list(self, args: dict, payload, ctx) -> list:
        with malformed("storage.list"):
            chain = None if args.get("chain") is None else int(args["chain"])
        out = []
        for tid, st in self._stores_snapshot():
            for c, k, m in st.list(chain):
                out.append({"target": tid, "chain": c, "chunk": k, "committed": m.committed, "pending": m.pending,
                            "length": m.length, "crc": m.crc})
        return out

    def h_disk(self, args: dict, payload, ctx) -> dict:
        """``storage.disk``: the data directory's disk, ``{"disk": {"total", "free"} or None}`` (the
        metadata service's statfs and GC ask it often: no walk over the chunks, unlike stats)."""
        try:
            vfs = os.statvfs(self.data_dir)
        except OSError:
            return {"disk": None}
        return {"disk": {"total": vfs.f_blocks * vfs.f_frsize, "free": vfs.f_bavail * vfs.f_frsize}}

    def h_stats(self, args: dict, payload, ctx) -> dict:
        with self._stats_lock:
            stats = {**self.stats, "damage": dict(self.stats["damage"])}
        with self._failed_lock:
            failed = {str(t): why for t, why in self.failed.items()}
        return {"node": self.node, "incarnation": self.incarnation, "routing_version": self.routing.version,
                **stats, "failed": failed, "disk": self.h_disk(args, payload, ctx)["disk"],
                "targets": {str(t): {"chunks": len(metas), "bytes": sum(m.length for m in metas)}
                            for t, metas in ((t, [m for _c, _k, m in s.list()]) for t, s in self._stores_snapshot())}}


def main(argv: list[str] | None = None) -> None:
    ap = service_parser("fs3.storage", "an fs3 storage server (CRAQ chain replication)")
    ap.add_argument("--data-dir", default=None, help="base data directory (see docs/fs3.md)")
    st = service_start(ap, argv, "fs3.storage")
    node, mg, limits = st.node, st.mgmtd, st.security
    data = node_data_dir(st.cfg, node.name, st.args.data_dir)
    srv = StorageServer(st.cfg, node.name, node.address, st.port, mg, data, auth=limits.pop("auth"), limits=limits)
    try:
        srv.start()
    except StorageError as exc:
        ap.exit(1, f"{ap.prog}: error: {exc}\n")
    log.info("fs3.storage on %s:%d, data %s, mgmtd %s:%d", node.address, srv.port, data, *mg)
    wait_for_shutdown()
    srv.stop()
