"""fs3.storage: a storage server. ``python -m fs3.storage --cluster FILE --node NAME``.

It serves the targets that the routing table places on its node, each a :class:`ChunkStore`
in ``<data dir>/<node>/targets/<target id>``. It heartbeats mgmtd, keeps the routing table
fresh, runs the CRAQ write path and the resync of a returning successor.

RPC methods (traffic class STORAGE):

- ``storage.write {chain, cver, chunk, off, full, op, client, channel, seq[, ver, fwd]}`` + payload:
  a write (or ``op="remove"``) entering at the head or forwarded by a predecessor;
- ``storage.write_batch {chain, cver, client, items: [[chunk, channel, seq, nbytes(, ver, crc)], ...][, fwd]}``
  + the items' bytes back to back: whole-chunk writes of several chunks of one chain, each item
  the write path of ``storage.write`` and answered on its own (``{items: [...]}``);
- ``storage.read {items: [[chain, cver, chunk, off, len], ...], relaxed[, e2e]}`` -> per-item results
  (``n`` bytes, version ``v``, CRC32C ``c``) and the bytes of every item back to back; with ``e2e``
  the caller checks each whole-chunk item against ``c`` itself (``u`` marks such unverified items,
  sent from the file with ``sendfile``) and reports a mismatch with ``storage.check``;
- ``storage.check {chain, chunk}`` -> ``{corrupt}``: verify this server's copy (a reader saw a CRC
  mismatch); a damaged copy is reported to mgmtd and repaired;
- ``storage.sync_meta``, ``storage.sync_write``, ``storage.sync_remove``: the resync protocol;
- ``storage.list {chain}``, ``storage.stats``: admin.

[Note: the write path] The head takes the per-chunk lock, assigns version u = max(committed,
pending) + 1, builds the new content (read-modify-write for a partial write), forwards the whole
chunk to its successor with u and stores it as *pending* while the successor works. Every hop checks the chain
version, locks, stores pending and forwards; the tail stores u directly as *committed* and
acknowledges with its CRC32C; each predecessor compares the CRC with its own, commits (a
rename) and acknowledges in turn. The client's ack therefore means every replica of the
chain version committed u. A failed forward leaves the pending version in place and fails the
request with a retryable error; the client refreshes its routing and retries with the same
(client, channel, seq), which the replicas that already committed answer from their cache.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import ExitStack, contextmanager

from network import (
    Authenticator,
    AuthError,
    Credential,
    FileRegion,
    RemoteError,
    Reply,
    RpcPool,
    RpcServer,
    TrafficClass,
    TransportError,
    server_settings,
)
from network.auth import ANY
from network.service import parse_service_args, service_parser, wait_for_shutdown

from .chunkstore import DISK_ERRNOS, HEADER_SIZE, ChunkMeta, ChunkStore, crc32c
from .config import Fs3Config, node_data_dir
from .errors import (
    ChunkBusy,
    ChunkCorrupt,
    ChunkNotCommitted,
    ChunkNotFound,
    ChunkVersionConflict,
    ForwardFailed,
    Fs3ConfigError,
    NotServing,
    StaleRequest,
    StaleRouting,
    StorageError,
    TargetFailed,
    from_remote,
)
from .forward import HOP_SHARE, call_overlapped
from .routing import SERVING, SYNCING, Routing, SingleFlight

__all__ = ["StorageServer", "main"]

log = logging.getLogger(__name__)
_tls = threading.local()
_DEDUP_MAX = 65536  # remembered (client, channel) pairs per server: retries come within seconds


class _QuietFs3Errors(logging.Filter):
    """network.rpc logs a traceback for handler exceptions it does not know; ours are expected
    answers (stale routing, not committed...) that travel to the client, not server bugs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StorageError)


logging.getLogger("network.rpc").addFilter(_QuietFs3Errors())


class _ChunkLocks:
    """One lock per (target, chain, chunk), created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple, list] = {}  # key -> [lock, users]

    @contextmanager
    def hold(self, key: tuple, timeout: float):
        with self._guard:
            ent = self._locks.get(key)
            if ent is None:
                ent = self._locks[key] = [threading.Lock(), 0]
            ent[1] += 1
        try:
            if not ent[0].acquire(timeout=timeout):
                raise ChunkBusy(f"chunk {key[1]}/{key[2]:016x} on target {key[0]} stayed locked for {timeout} s")
            try:
                yield
            finally:
                ent[0].release()
        finally:
            with self._guard:
                ent[1] -= 1
                if ent[1] == 0:
                    self._locks.pop(key, None)


class StorageServer:
    def __init__(self, cfg: Fs3Config, node: str, address: str, port: int, mgmtd: tuple[str, int],
                 data_dir, *, lock_timeout: float = 30.0, io_timeout: float = 60.0,
                 auth: Authenticator | Credential | None = None, limits: dict | None = None) -> None:
        auth = Authenticator.of(auth)  # the cluster key: serves, and calls mgmtd and chain successors
        self._cred = auth.key
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
        self.locks = _ChunkLocks()
        # (target, client, channel) -> (seq, result) of the last update, least recently used first;
        # bounded: every client process brings new channels
        self._dedup: OrderedDict[tuple, tuple[int, dict]] = OrderedDict()
        self._pools: dict[tuple[str, int], RpcPool] = {}
        self._pools_lock = threading.Lock()
        self.mgmtd = RpcPool(*mgmtd, size=2, timeout=10.0, connect_timeout=5.0, credential=self._cred,
                             traffic_class=TrafficClass.STORAGE, source=address)
        self.stats = {"reads": 0, "writes": 0, "corrupt": 0, "repaired": 0, "resyncs": 0, "resynced_chunks": 0,
                      "routing_refreshes": 0, "scrub_passes": 0, "scrubbed_chunks": 0, "lease_expired": 0,
                      "failed_targets": 0,
                      "damage": {}}  # damaged copies found, by kind (ChunkCorrupt.damage)
        self._repairing: set[tuple[int, int, int]] = set()
        self._resyncing: set[tuple[int, int, int]] = set()
        self._admitted: dict[tuple[int, int], int] = {}  # (chain, chain version) -> writes in progress
        self._stop = threading.Event()
        bulk = max(cfg.chunk_size, cfg.max_batch_bytes)  # the largest payload a write carries
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
        s.register("storage.stats", self.h_stats, roles=ANY)
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
        for p in list(self._pools.values()):
            p.close()
        self.mgmtd.close()

    def _payload_buffer(self, args: dict, nbytes: int):
        # [Note: receive into a reused buffer] The payload lands in a per-thread buffer: the
        # handler runs in this same thread and finishes with it (stored, forwarded) before the
        # next request on the connection arrives, so reuse is safe and saves an allocation
        # (and its page faults) per chunk.
        size = max(self.cfg.chunk_size, self.cfg.max_batch_bytes)  # a chunk or a batch of them
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
        self.stats["failed_targets"] += 1
        log.error("%s: target %d failed, taken out of service: %s", self.node, tid, reason)
        self._report(tid, 0, 0, "TargetFailed", reason)
        self._beat.set()

    def _set_routing(self, d: dict) -> None:
        r = Routing.from_dict(d)
        with self._rlock:
            if r.version < self.routing.version:
                return
            self.routing = r
        for t, n in r.targets.items():
            if n == self.node and t not in self.failed:
                try:
                    self._store(t)
                except TargetFailed:
                    pass  # reported offline from now on
        self._maybe_resync()

    def refresh_routing(self, force: bool = False) -> Routing:
        """Fetch the routing table from mgmtd (concurrent callers share one fetch: fs3.routing's
        SingleFlight); without ``force``, not more than once per 20 ms."""
        if not force and time.monotonic() - self._last_refresh < 0.02:
            return self.routing
        try:
            return self._fetch()
        except TimeoutError as exc:
            log.warning("routing refresh: %s", exc)
            return self.routing

    def _fetch_routing(self) -> Routing:
        try:
            d = self.mgmtd.call("mgmtd.routing", {"have": self.routing.version}).result
        except (TransportError, RemoteError) as exc:
            log.warning("routing refresh failed: %s", exc)
            return self.routing
        self._last_refresh = time.monotonic()
        self.stats["routing_refreshes"] += 1
        if not d.get("unchanged"):
            self._set_routing(d)
        return self.routing

    def _heartbeat_once(self) -> None:
        with self._stores_lock:
            tids = {*self.stores, *self.failed}
        targets = {str(t): "offline" if t in self.failed else "online" for t in tids}
        sent = time.monotonic()
        out = self.mgmtd.call("mgmtd.heartbeat", {
            "node": self.node, "address": self.address, "port": self.port, "incarnation": self.incarnation,
            "targets": targets, "with_routing": self.routing.version == 0}).result
        self._lease_until = sent + self.cfg.failure_timeout / 2
        with self._failed_lock:
            fenced, self._fenced = self._fenced, False
        if fenced:
            log.warning("%s: in contact with mgmtd again: serving what the routing table gives it", self.node)
        if "routing" in out:
            self._set_routing(out["routing"])
        elif out["routing_version"] != self.routing.version:
            self.refresh_routing(force=True)
        else:
            self._maybe_resync()

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._heartbeat_once()
            except (TransportError, RemoteError) as exc:
                log.warning("heartbeat to mgmtd %s:%d failed: %s", *self.mgmtd_addr, exc)
            except Exception:  # pragma: no cover
                log.exception("heartbeat failed")
            self._beat.wait(self.cfg.heartbeat_interval)
            self._beat.clear()

    def _check_lease(self) -> None:
        """Refuse to serve when mgmtd has not answered a heartbeat for ``failure_timeout / 2``.

        [Note: the lease] mgmtd reconfigures a chain only after a node was silent for
        ``failure_timeout``. A server cut off from mgmtd (but not from clients) cannot learn of that:
        its routing table stays the old one, so a client still holding the old table too would be
        served the old bytes of a chunk the new chain has since rewritten. So a server serves only
        while its last answered heartbeat was *sent* less than ``failure_timeout / 2`` ago (3FS
        stops such a service too): it has stopped before mgmtd can have moved its targets out of
        their chains, with half the timeout to spare for clocks and requests in flight. It answers
        ``NotServing`` meanwhile (clients move to another replica or refresh their routing) and
        serves again on the first answered heartbeat, which also brings the current routing table.
        The cost: with mgmtd itself down for longer than half the timeout, no server serves.
        """
        over = time.monotonic() - self._lease_until
        if over <= 0:
            return
        with self._failed_lock:
            newly, self._fenced = not self._fenced, True
        if newly:
            self.stats["lease_expired"] += 1
            log.error("%s: no heartbeat answered by mgmtd for %.1f s (failure_timeout / 2): not serving until "
                      "mgmtd answers", self.node, self.cfg.failure_timeout / 2 + over)
        raise NotServing(f"{self.node}: out of contact with mgmtd for {self.cfg.failure_timeout / 2 + over:.1f} s "
                         f"(the lease is failure_timeout / 2 = {self.cfg.failure_timeout / 2:g} s): not serving",
                         current=0)

    def _check_chain(self, chain: int, cver: int, want: tuple[str, ...]) -> tuple[Routing, int, str]:
        """Validate the request's chain version against ours; returns (routing, my target, my state).
        Refuses everything while the mgmtd lease has expired (:meth:`_check_lease`)."""
        self._check_lease()
        r = self.routing
        c = r.chains.get(chain)
        if c is None or cver > c["version"]:
            r = self.refresh_routing(force=True)
            c = r.chains.get(chain)
        if c is None:
            raise NotServing(f"{self.node}: no chain {chain} in routing v{r.version}", current=0)
        if cver != c["version"]:
            raise StaleRouting(f"{self.node}: chain {chain} is at version {c['version']}, request has {cver}",
                               current=c["version"])
        tid = r.target_on(chain, self.node)
        if tid in self.failed:
            raise TargetFailed(f"{self.node}: target {tid} failed ({self.failed[tid]}) and is out of service",
                               current=c["version"])
        state = r.state_of(chain, tid) if tid is not None else None
        if tid is None or state not in want:
            raise NotServing(f"{self.node}: target {tid} of chain {chain} is {state}, not {'/'.join(want)}",
                             current=c["version"])
        return r, tid, state

    def _pool(self, node: str, r: Routing) -> RpcPool:
        n = r.nodes[node]
        key = (n["address"], n["port"])
        p = self._pools.get(key)
        if p is None:
            with self._pools_lock:
                p = self._pools.get(key)
                if p is None:
                    p = self._pools[key] = RpcPool(*key, size=16, timeout=self.io_timeout, connect_timeout=3.0,
                                                   traffic_class=TrafficClass.STORAGE, source=self.address,
                                                   credential=self._cred)
        return p

    # -- the write path ---------------------------------------------------------------------------
    def h_write(self, args: dict, payload: memoryview, ctx) -> dict:
        chain, cver, chunk = int(args["chain"]), int(args["cver"]), int(args["chunk"])
        fwd = bool(args.get("fwd"))
        op = args.get("op", "write")
        if op not in ("write", "remove"):
            raise ValueError(f"storage.write: unknown op {op!r} (write, remove)")
        off = int(args.get("off", 0))
        if off < 0 or off + len(payload) > self.cfg.chunk_size:
            raise ValueError(f"storage.write: bytes [{off}, {off + len(payload)}) do not fit a chunk of "
                             f"{self.cfg.chunk_size} bytes")
        with self._admit(chain, cver):
            return self._write_one(args, payload, chain, cver, chunk, fwd, op, off)

    def _write_one(self, args, payload, chain, cver, chunk, fwd, op, off) -> dict:
        r, tid, state = self._check_chain(chain, cver, (SERVING, SYNCING))
        ws, pos = self._position(r, chain, cver, tid, fwd)
        store = self._store(tid)
        key = (tid, str(args.get("client", "")), int(args.get("channel", 0)))
        seq = int(args.get("seq", 0))
        with self.locks.hold((tid, chain, chunk), min(self.lock_timeout, self._budget(args))):
            cached = self._cached(key, seq, fwd and op == "write", int(args.get("ver", -1)))
            if cached is not None:
                return cached
            self._still_current(chain, cver)
            self.stats["writes"] += 1
            if op == "remove":
                result = self._remove_chain(r, ws, pos, args, chain, chunk, store)
            else:
                result = self._write_chain(r, ws, pos, args, chain, cver, chunk, off, payload, store, state)
            if key[1]:
                self._remember(key, seq, result)
            return result

    def _still_current(self, chain: int, cver: int) -> None:
        """Refuse a write whose chain moved on while it waited for its chunk lock.

        [Note: re-check after the lock] A write checks its chain version on arrival, then may wait
        for the chunk lock behind an earlier attempt (one stuck on a frozen successor). If mgmtd
        changed the chain meanwhile, going on would forward along the old chain, to the node that
        was just moved out, and hold the lock for another timeout: the write is refused instead
        (``StaleRouting``) and its client retries on the new chain. The chunk lock bounds its wait
        by the request's budget for the same reason (``ChunkBusy``, retried).
        """
        c = self.routing.chains.get(chain)
        if c is not None and c["version"] != cver:
            raise StaleRouting(f"{self.node}: chain {chain} moved to version {c['version']} while a write at "
                               f"version {cver} waited for its chunk", current=c["version"])

    @contextmanager
    def _admit(self, chain: int, cver: int):
        """Count a write in progress at its chain version (before its version check: see the resync)."""
        key = (chain, cver)
        with self._stores_lock:
            self._admitted[key] = self._admitted.get(key, 0) + 1
        try:
            yield
        finally:
            with self._stores_lock:
                n = self._admitted.pop(key) - 1
                if n:
                    self._admitted[key] = n

    def _drain_writes(self, chain: int, cver: int) -> None:
        """Wait until no write admitted at a chain version older than ``cver`` is in progress here.

        [Note: resync after the last old write] A write that passed its chain-version check just
        before this server adopted the version with a syncing successor may still create a chunk
        here after the resync listed the chunks, and the successor would never get it. Such a
        write counts itself before its check (``_admit``), so once the new version is installed a
        count of zero means none is left, and every later write is refused (stale version) or goes
        through the successor too.
        """
        deadline = time.monotonic() + self.lock_timeout + self.io_timeout
        while True:
            with self._stores_lock:
                busy = [v for c, v in self._admitted if c == chain and v < cver]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise StorageError(f"{self.node}: writes at chain {chain} v{min(busy)} still in progress after "
                                   f"{self.lock_timeout + self.io_timeout:.0f} s; resync postponed")
            time.sleep(0.005)

    def _position(self, r: Routing, chain: int, cver: int, tid: int, fwd: bool) -> tuple[list, int]:
        """The chain's write set and this target's place in it, for a write entering here."""
        ws = r.write_set(chain)
        if not ws:
            raise NotServing(f"{self.node}: chain {chain} v{cver} has no serving target; it takes no writes",
                             current=cver)
        pos = [t for t, _ in ws].index(tid)
        if pos == 0 and fwd:
            raise NotServing(f"{self.node}: forwarded write reached the head of chain {chain} v{cver}")
        if pos > 0 and not fwd:
            raise NotServing(f"{self.node}: target {tid} is not the head of chain {chain} v{cver}; "
                             f"send writes to {ws[0][0]}", current=cver)
        return ws, pos

    def _cached(self, key: tuple, seq: int, fwd_write: bool, ver: int) -> dict | None:
        """The remembered answer when this update is a repeat of the last one on its channel."""
        cached = self._dedup.get(key) if key[1] else None
        if cached is None:
            return None
        # a forwarded retry may carry a new version (the head re-numbered it after a lost ack):
        # the cached answer is for the old one, so apply it instead (the version checks of the
        # write path recognise a true repeat)
        repeat = not fwd_write or cached[1].get("version") == ver
        if cached[0] == seq and repeat:
            return cached[1]
        if seq < cached[0]:
            raise StaleRequest(f"{self.node}: request {seq} on channel {key[2]} of client {key[1]} is "
                               f"older than {cached[0]}")
        return None

    def h_write_batch(self, args: dict, payload: memoryview, ctx) -> dict:
        """Whole-chunk writes of several chunks of one chain in one request (a batch).

        [Note: batched writes] Each item is the single-chunk write path (its own chunk lock,
        version, dedup key, pending version and commit), but a hop forwards all of its items to
        its successor in one request and they come back in one acknowledgement: the per-request
        costs of every hop (RPC, wake-ups, small packets) are paid once per batch. The chunk
        locks are taken in chunk order (no deadlock with another batch). Each item answers on
        its own: ``{version, crc}`` or ``{err, msg, data}``; a whole failed forward fails every
        item still open with ForwardFailed, and the client retries what failed with the same keys.
        """
        chain, cver = int(args["chain"]), int(args["cver"])
        fwd = bool(args.get("fwd"))
        client = str(args.get("client", ""))
        items = args.get("items") or []  # [chunk, channel, seq, nbytes(, version, crc when forwarded)]
        cs = self.cfg.chunk_size
        if any(not 0 <= int(it[3]) <= cs for it in items) or sum(int(it[3]) for it in items) != len(payload):
            raise ValueError(f"storage.write_batch: item sizes {[it[3] for it in items]} do not match the "
                             f"{len(payload)}-byte payload or exceed the chunk size {cs}")
        if len({int(it[0]) for it in items}) != len(items):
            raise ValueError("storage.write_batch: a chunk appears twice in one batch")
        with self._admit(chain, cver):
            return self._write_batch(client, items, payload, chain, cver, fwd, self._budget(args))

    def _budget(self, args: dict) -> float:
        """How long this hop may wait for its successor: the budget the request carries (``tmo``,
        fs3.forward's note on hop budgets), else ``write_timeout``; never above the I/O timeout."""
        try:
            tmo = float(args.get("tmo") or self.write_timeout)
        except (TypeError, ValueError):
            raise ValueError(f"storage.write: tmo must be a number of seconds, got {args.get('tmo')!r}") from None
        if not 0 < tmo < float("inf"):
            raise ValueError(f"storage.write: tmo must be a positive number of seconds, got {args.get('tmo')!r}")
        return min(max(tmo, 0.05), self.io_timeout)

    def _write_batch(self, client, items, payload, chain, cver, fwd, budget: float) -> dict:
        r, tid, state = self._check_chain(chain, cver, (SERVING, SYNCING))
        ws, pos = self._position(r, chain, cver, tid, fwd)
        store = self._store(tid)
        views, at = [], 0
        for it in items:
            views.append(payload[at:at + int(it[3])])
            at += int(it[3])
        results: list = [None] * len(items)
        with ExitStack() as held:
            for chunk in sorted(int(it[0]) for it in items):
                held.enter_context(self.locks.hold((tid, chain, chunk), min(self.lock_timeout, budget)))
            self._still_current(chain, cver)
            todo = []  # (index, chunk, version, data, dedup key, seq)
            for i, it in enumerate(items):
                chunk, seq = int(it[0]), int(it[2])
                key = (tid, client, int(it[1]))
                try:
                    cached = self._cached(key, seq, fwd, int(it[4]) if fwd else -1)
                    if cached is not None:
                        results[i] = cached
                        continue
                    self.stats["writes"] += 1
                    fver, fcrc = (int(it[4]), it[5]) if pos else (0, None)  # forwarded items carry them
                    ver, done = self._hop_version(store.get(chain, chunk), pos, state, chain, chunk, fver, fcrc)
                    if done is not None:
                        results[i] = done
                        self._remember(key, seq, done)
                        continue
                except StorageError as exc:
                    results[i] = _item_error(exc)
                    continue
                todo.append((i, chunk, ver, views[i], key, seq))
            if pos == len(ws) - 1:
                for i, chunk, ver, data, key, seq in todo:
                    crc = store.put(chain, chunk, ver, cver, data, pending=False)
                    results[i] = {"version": ver, "crc": crc}
                    self._remember(key, seq, results[i])
            elif todo:
                self._forward_batch(r, ws, pos, client, chain, cver, store, state, todo, results, budget)
        return {"items": results}

    def _forward_batch(self, r, ws, pos, client, chain, cver, store, state, todo, results, budget) -> None:
        """Store the batch's items as pending while the successor stores them too, then commit
        what it acknowledged (the batch form of the write path's overlap)."""
        crcs = [crc32c(data) for _i, _c, _v, data, _k, _s in todo]
        succ = ws[pos + 1][0]
        fargs = {"chain": chain, "cver": cver, "client": client, "fwd": True, "tmo": budget * HOP_SHARE,
                 "items": [[chunk, key[2], seq, len(data), ver, crc]
                           for (_i, chunk, ver, data, key, seq), crc in zip(todo, crcs, strict=True)]}

        def stage() -> None:
            for (_i, chunk, ver, data, _k, _s), crc in zip(todo, crcs, strict=True):
                store.put(chain, chunk, ver, cver, data, pending=True, crc=crc)

        try:
            rep, _ = call_overlapped(self._pool(r.node_of(succ), r), "storage.write_batch", fargs,
                                     [t[3] for t in todo], during=stage, timeout=budget)
        except RemoteError as exc:
            err = from_remote(exc)
            if isinstance(err, StorageError):
                raise ForwardFailed(f"{self.node}: successor {succ} refused a batch of chain {chain}: {err}",
                                    current=cver) from None
            raise
        except TransportError as exc:
            raise ForwardFailed(f"{self.node}: successor target {succ} ({r.node_of(succ)}) did not acknowledge "
                                f"a batch of chain {chain}: {exc}", current=cver) from None
        for (i, chunk, ver, data, key, seq), crc, res in zip(todo, crcs, rep["items"], strict=True):
            if "err" not in res and res.get("crc") == crc and res.get("version") == ver:
                store.commit(chain, chunk, ver)
                results[i] = {"version": ver, "crc": crc}
                self._remember(key, seq, results[i])
            elif pos == 0 and res.get("err") == "ChunkVersionConflict":
                # the successor holds a newer version: the single-chunk path renumbers and
                # retries this item (its lock is still held)
                args = {"client": client, "channel": key[2], "seq": seq, "full": True, "tmo": budget}
                try:
                    results[i] = self._write_chain(r, ws, pos, args, chain, cver, chunk, 0, data, store, state)
                except StorageError as exc:
                    results[i] = _item_error(exc)
                    continue
                self._remember(key, seq, results[i])
            elif "err" in res:
                results[i] = _item_error(ForwardFailed(
                    f"{self.node}: successor {succ} refused chunk {chain}/{chunk:016x}: {res['err']}: "
                    f"{res.get('msg')}", current=cver))
            else:
                results[i] = _item_error(ForwardFailed(
                    f"{self.node}: successor {succ} stored chunk {chain}/{chunk:016x} as v{res.get('version')} "
                    f"CRC {res.get('crc')}, expected v{ver} CRC {crc}", current=cver))

    def _remember(self, key: tuple, seq: int, result: dict) -> None:
        if not key[1]:
            return  # no client id: nothing to deduplicate
        with self._stores_lock:
            self._dedup[key] = (seq, result)
            self._dedup.move_to_end(key)
            while len(self._dedup) > _DEDUP_MAX:
                self._dedup.popitem(last=False)

    def _hop_version(self, m: ChunkMeta | None, pos: int, state, chain: int, chunk: int, ver: int,
                     crc) -> tuple[int, dict | None]:
        """The version this hop stores an update as, and the answer when it is already applied.

        The head numbers it (one past anything it has); a later hop takes the forwarded ``ver``,
        answers a retried forward it already committed, and refuses one older than its copy. A
        syncing target takes whatever its predecessor sends (it is being overwritten anyway).
        """
        if pos == 0:
            return (max(m.committed, m.pending) + 1 if m else 1), None
        if m and m.committed >= ver and state != SYNCING:
            if m.committed == ver and m.crc == crc:
                return ver, {"version": ver, "crc": m.crc}  # already applied (a retried forward)
            raise ChunkVersionConflict(f"{self.node}: chunk {chain}/{chunk:016x} is committed at "
                                       f"v{m.committed} >= update v{ver}", committed=m.committed)
        return ver, None

    def _write_chain(self, r, ws, pos, args, chain, cver, chunk, off, payload, store, state) -> dict:
        m = store.get(chain, chunk)
        ver, done = self._hop_version(m, pos, state, chain, chunk, int(args.get("ver", 0)), args.get("crc"))
        if done is not None:
            return done
        if pos == 0:
            if args.get("full", True) or not (m and m.committed):
                if off:
                    content = bytearray(off + len(payload))
                    content[off:] = payload
                else:
                    content = payload
            else:
                try:
                    old, _ = store.read(chain, chunk)
                except ChunkCorrupt as exc:  # the head's own copy: report it and have it repaired
                    self._report_corrupt(store.target, chain, chunk, str(exc), exc.damage)
                    raise
                content = bytearray(max(len(old), off + len(payload)))
                content[:len(old)] = old
                content[off:off + len(payload)] = payload
        else:
            content = payload
        tail = pos == len(ws) - 1
        for attempt in range(3):
            if tail:
                crc = store.put(chain, chunk, ver, cver, content, pending=False)
                return {"version": ver, "crc": crc}
            # [Note: overlap] The request goes to the successor first; the pending version is
            # stored while the successor works on it (fs3.forward's note), so a hop costs
            # max(local write, rest of the chain), not the sum. The commit below follows both.
            crc = crc32c(content)
            succ = ws[pos + 1][0]
            budget = self._budget(args)
            fargs = {"chain": chain, "cver": cver, "chunk": chunk, "off": 0, "full": True, "op": "write",
                     "client": args.get("client", ""), "channel": args.get("channel", 0),
                     "seq": args.get("seq", 0), "ver": ver, "crc": crc, "fwd": True, "tmo": budget * HOP_SHARE}
            try:
                rep, _ = call_overlapped(
                    self._pool(r.node_of(succ), r), "storage.write", fargs, [content],
                    during=lambda v=ver, c=crc: store.put(chain, chunk, v, cver, content, pending=True, crc=c),
                    timeout=budget)
            except RemoteError as exc:
                err = from_remote(exc)
                if isinstance(err, ChunkVersionConflict) and pos == 0 and attempt < 2:
                    ver = int(err.rpc_data.get("committed", ver)) + 1
                    continue
                if isinstance(err, StorageError):
                    raise ForwardFailed(f"{self.node}: successor {succ} refused chunk {chain}/{chunk:016x}: "
                                        f"{err}", current=cver) from None
                raise
            except TransportError as exc:
                raise ForwardFailed(f"{self.node}: successor target {succ} ({r.node_of(succ)}) did not "
                                    f"acknowledge chunk {chain}/{chunk:016x}: {exc}", current=cver) from None
            if rep.get("crc") != crc or rep.get("version") != ver:
                raise ForwardFailed(f"{self.node}: successor {succ} stored chunk {chain}/{chunk:016x} as "
                                    f"v{rep.get('version')} CRC {rep.get('crc')}, expected v{ver} CRC {crc}",
                                    current=cver)
            store.commit(chain, chunk, ver)
            return {"version": ver, "crc": crc}
        raise ChunkVersionConflict(f"{self.node}: chunk {chain}/{chunk:016x}: version conflict persisted")

    def _remove_chain(self, r, ws, pos, args, chain, chunk, store) -> dict:
        if pos < len(ws) - 1:
            succ = ws[pos + 1][0]
            budget = self._budget(args)
            fargs = dict(args, fwd=True, tmo=budget * HOP_SHARE)
            try:
                self._pool(r.node_of(succ), r).call("storage.write", fargs, timeout=budget)
            except RemoteError as exc:
                raise ForwardFailed(f"{self.node}: successor {succ} refused removal: {from_remote(exc)}") from None
            except TransportError as exc:
                raise ForwardFailed(f"{self.node}: successor {succ} did not acknowledge removal: {exc}") from None
        existed = store.remove(chain, chunk)
        return {"removed": existed}

    # -- reads ------------------------------------------------------------------------------------
    def h_read(self, args: dict, payload, ctx) -> Reply:
        items = args.get("items") or []
        relaxed = bool(args.get("relaxed"))
        e2e = bool(args.get("e2e"))  # the caller checks CRCs end to end and reports mismatches
        results, out, fds = [], [], []
        try:
            for it in items:
                chain, cver, chunk, off, length = (int(x) for x in it)
                try:
                    _r, tid, _s = self._check_chain(chain, cver, (SERVING,))
                    store = self._store(tid)
                    m = store.get(chain, chunk)
                    if m is None:
                        raise ChunkNotFound(f"{self.node}: no chunk {chain}/{chunk:016x} on target {tid}")
                    pend = False
                    if m.pending:
                        if not relaxed:
                            raise ChunkNotCommitted(f"{self.node}: chunk {chain}/{chunk:016x} has pending "
                                                    f"v{m.pending} (committed v{m.committed})", target=tid)
                        pend = True
                    if e2e and not pend and off == 0:
                        region = self._open_region(store, chain, chunk, length)
                        if region is not None:
                            fd, n, ver, crc = region
                            fds.append(fd)
                            out.append(FileRegion(fd, HEADER_SIZE, n))
                            results.append({"n": n, "v": ver, "t": tid, "c": crc, "u": 1})
                            self.stats["reads"] += 1
                            continue
                    piece, ver, crc = self._read_verified(tid, store, chain, chunk, pend, relaxed, off, length)
                    self.stats["reads"] += 1
                    out.append(piece)
                    results.append({"n": len(piece), "v": ver, "t": tid, "c": crc})
                except StorageError as exc:
                    results.append({"err": type(exc).__name__, "msg": str(exc), "data": exc.rpc_data or {}})
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Reply({"items": results}, out, done=(lambda: [os.close(fd) for fd in fds]) if fds else None)

    @staticmethod
    def _open_region(store: ChunkStore, chain: int, chunk: int, length: int) -> tuple | None:
        """The committed version's file for an unverified whole-chunk read (``ChunkStore.open_data``),
        or None when the verifying path must serve it (a damaged or short file, which that path
        finds and reports; a range shorter than the chunk, which the CRC does not cover)."""
        try:
            fd, n, ver, crc = store.open_data(chain, chunk)
        except ChunkCorrupt:
            return None
        if 0 <= length < n:
            os.close(fd)
            return None
        return fd, n, ver, crc

    def _read_verified(self, tid: int, store: ChunkStore, chain: int, chunk: int, pend: bool, relaxed: bool,
                       off: int, length: int) -> tuple[memoryview, int, int]:
        """Bytes ``[off, off + length)`` of the chunk (a mapped view), its version and their CRC32C,
        after checking the CRC here (a damaged copy is reported and never returned)."""
        try:
            data, ver, crc = store.read_mapped(chain, chunk, pending=pend)
        except ChunkCorrupt:
            # maybe a race with a write recycling the file we opened: look again under
            # the chunk lock before calling it corruption (chunkstore's note)
            with self.locks.hold((tid, chain, chunk), self.lock_timeout):
                m = store.get(chain, chunk)
                if m is not None and m.pending and not relaxed:
                    raise ChunkNotCommitted(f"{self.node}: chunk {chain}/{chunk:016x} has pending "
                                            f"v{m.pending}", target=tid) from None
                try:
                    data, ver = store.read(chain, chunk, pending=pend and bool(m and m.pending),
                                           buf=bytearray(HEADER_SIZE + self.cfg.chunk_size))
                    crc = crc32c(data)
                except ChunkCorrupt as exc:
                    self._report_corrupt(tid, chain, chunk, str(exc), exc.damage)
                    raise
        end = len(data) if length < 0 else min(len(data), off + length)
        piece = data[min(off, end):end]
        if len(piece) != len(data):
            crc = crc32c(piece)
        return piece, ver, crc

    def h_check(self, args: dict, payload, ctx) -> dict:
        """A reader found this server's copy of a chunk failing its CRC32C (an unverified read):
        verify the copy here, under the chunk lock; a damaged one is reported and repaired."""
        chain, chunk = int(args["chain"]), int(args["chunk"])
        tid = self.routing.target_on(chain, self.node)
        if tid is None:
            return {"corrupt": False}
        store = self._store(tid)
        with self.locks.hold((tid, chain, chunk), self.lock_timeout):
            if store.get(chain, chunk) is None:
                return {"corrupt": False}
            try:
                store.read(chain, chunk, buf=bytearray(HEADER_SIZE + self.cfg.chunk_size))
            except ChunkNotFound:
                return {"corrupt": False}
            except ChunkCorrupt as exc:
                self._report_corrupt(tid, chain, chunk, str(exc), exc.damage)
                return {"corrupt": True}
        return {"corrupt": False}

    def _report(self, tid: int, chain: int, chunk: int, kind: str, detail: str) -> None:
        def send() -> None:
            try:
                self.mgmtd.call("mgmtd.report_fault", {"node": self.node, "target": tid, "chain": chain,
                                                        "chunk": f"{chunk:016x}", "kind": kind, "detail": detail})
            except (TransportError, RemoteError) as exc:
                log.warning("could not report %s to mgmtd: %s", kind, exc)

        threading.Thread(target=send, name="report-fault", daemon=True).start()

    def _report_corrupt(self, tid: int, chain: int, chunk: int, detail: str, damage: str = "crc") -> None:
        """Count and report a damaged copy (``damage``: see ``ChunkCorrupt``: corrupt bytes, another
        chunk's file, a stale version, a missing file...), then repair it from a healthy replica
        (background)."""
        self.stats["corrupt"] += 1
        with self._stores_lock:
            self.stats["damage"][damage] = self.stats["damage"].get(damage, 0) + 1
        log.error("corrupt chunk: %s", detail)
        self._report(tid, chain, chunk, "ChunkCorrupt", detail)
        key = (tid, chain, chunk)
        with self._stores_lock:
            if key in self._repairing:
                return
            self._repairing.add(key)
        threading.Thread(target=self._repair, args=key, name=f"repair-{chain}-{chunk:x}", daemon=True).start()

    def _repair(self, tid: int, chain: int, chunk: int) -> None:
        """Replace a corrupt copy by a serving peer's (CRC-checked), unless a write replaced it first."""
        try:
            r = self.routing
            c = r.chains.get(chain)
            if c is None:
                return
            store = self._store(tid)
            for peer in [t for t in r.serving(chain) if t != tid]:
                try:
                    rep = self._pool(r.node_of(peer), r).call(
                        "storage.read", {"items": [[chain, c["version"], chunk, 0, -1]]}, timeout=self.read_timeout)
                except (TransportError, RemoteError):
                    continue
                item = rep.result["items"][0]
                if "err" in item or crc32c(rep.payload) != item.get("c"):
                    continue
                with self.locks.hold((tid, chain, chunk), self.lock_timeout):
                    m = store.get(chain, chunk)
                    if m is None or m.pending or (m.committed != item["v"] and not m.corrupt):
                        return  # a write or a removal got there first: nothing left to repair
                    store.put(chain, chunk, item["v"], c["version"], rep.payload, pending=False)
                self.stats["repaired"] += 1
                log.warning("repaired chunk %d/%016x on target %d from target %d", chain, chunk, tid, peer)
                self._report(tid, chain, chunk, "ChunkRepaired", f"copied v{item['v']} from target {peer}")
                return
            log.warning("could not repair chunk %d/%016x on target %d: no healthy serving peer", chain, chunk, tid)
        except Exception:  # pragma: no cover - repair is best effort; the copy stays unreadable
            log.exception("repair of chunk %d/%016x failed", chain, chunk)
        finally:
            with self._stores_lock:
                self._repairing.discard((tid, chain, chunk))

    # -- scrubbing ------------------------------------------------------------------------------------
    def _scrub_loop(self) -> None:
        """A pass over every committed chunk of this server's serving targets, then one every
        ``scrub_interval`` seconds (counted from the start of the previous pass).

        [Note: scrubbing] A damaged copy is otherwise found only when a read meets it, and a cold
        chunk may not be read for months, long after its other replicas failed too. A pass reads
        each committed chunk under its chunk lock (a write never races it, so a CRC mismatch is
        damage, never a recycled file) and verifies its CRC32C: a damaged copy is reported to mgmtd
        and repaired from a serving peer, as when a read finds it. Reads are paced to
        ``scrub_rate_mb`` so a pass takes disk and CPU time from the foreground in a bounded way.
        """
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._scrub_pass()
            except Exception:  # pragma: no cover - a pass is best effort; the next one starts over
                log.exception("scrub pass failed")
            self._stop.wait(max(0.0, self.cfg.scrub_interval - (time.monotonic() - began)))

    def _scrub_pass(self) -> None:
        rate = self.cfg.scrub_rate_mb * 1e6
        buf = bytearray(HEADER_SIZE + self.cfg.chunk_size)
        began, nbytes, chunks, damaged = time.monotonic(), 0, 0, 0
        with self._stores_lock:
            stores = sorted(self.stores.items())  # a routing change may add a store meanwhile
        for tid, store in stores:
            for chain, chunk, m in store.list():
                if tid in self.failed:
                    break
                if self._stop.is_set():
                    return
                r = self.routing
                if chain not in r.chains or r.state_of(chain, tid) != SERVING or not (m.committed or m.corrupt):
                    continue  # a syncing or offline copy is being replaced anyway
                try:
                    with self.locks.hold((tid, chain, chunk), self.lock_timeout):
                        try:
                            data, _v = store.read(chain, chunk, buf=buf)
                            nbytes += len(data)
                        except ChunkNotFound:
                            continue  # removed (or not committed yet) since the listing
                        except ChunkCorrupt as exc:
                            damaged += 1
                            self._report_corrupt(tid, chain, chunk, f"scrub: {exc}", exc.damage)
                except ChunkBusy:
                    continue  # a long write holds it: the next pass checks it
                except TargetFailed:
                    break  # out of service (reported by the store)
                chunks += 1
                self.stats["scrubbed_chunks"] += 1
                ahead = nbytes / rate - (time.monotonic() - began)
                if ahead > 0 and self._stop.wait(ahead):
                    return
        self.stats["scrub_passes"] += 1
        log.info("scrub pass: %d chunks (%d bytes) verified, %d damaged, in %.1f s", chunks, nbytes, damaged,
                 time.monotonic() - began)

    # -- resync ---------------------------------------------------------------------------------------
    def _maybe_resync(self) -> None:
        r = self.routing
        for cid, c in r.chains.items():
            members = c["members"]
            for i, (t, s) in enumerate(members):
                if s != SYNCING or i == 0:
                    continue
                pred, ps = members[i - 1]
                if ps == SERVING and r.targets.get(pred) == self.node:
                    job = (cid, t, c["version"])
                    if job not in self._resyncing:
                        self._resyncing.add(job)
                        threading.Thread(target=self._resync, args=(r, cid, pred, t, c["version"]),
                                         name=f"resync-{cid}-{t}", daemon=True).start()

    def _resync(self, r: Routing, chain: int, mine: int, succ: int, cver: int) -> None:
        """Copy to the syncing successor what differs, remove what it has and we do not, report done."""
        job = (chain, succ, cver)
        try:
            self._drain_writes(chain, cver)
            pool = self._pool(r.node_of(succ), r)
            remote = pool.call("storage.sync_meta", {"chain": chain, "cver": cver, "target": succ}).result
            rmap = {int(x[0]): x for x in remote}
            store = self._store(mine)
            copied = removed = 0
            for _c, chunk, m in store.list(chain):
                rm = rmap.pop(chunk, None)
                if not m.committed:
                    continue
                if rm is not None and rm[1] == m.committed and rm[3] == m.crc and not rm[2]:
                    continue
                with self.locks.hold((mine, chain, chunk), self.lock_timeout):
                    if store.get(chain, chunk) is None:
                        continue
                    try:
                        data, ver = store.read(chain, chunk)
                    except ChunkCorrupt as exc:
                        self._report_corrupt(mine, chain, chunk, str(exc), exc.damage)
                        raise
                    pool.call("storage.sync_write", {"chain": chain, "cver": cver, "chunk": chunk, "ver": ver,
                                                     "target": succ}, [data])
                    copied += 1
            gone = []
            for chunk in rmap:
                with self.locks.hold((mine, chain, chunk), self.lock_timeout):
                    if store.get(chain, chunk) is None:
                        gone.append(chunk)
            if gone:
                pool.call("storage.sync_remove", {"chain": chain, "cver": cver, "chunks": gone})
                removed = len(gone)
            self.mgmtd.call("mgmtd.sync_done", {"chain": chain, "target": succ, "chain_version": cver})
            self.stats["resyncs"] += 1
            self.stats["resynced_chunks"] += copied
            log.info("resync of target %s (chain %d v%d) done: %d copied, %d removed", succ, chain, cver,
                     copied, removed)
            self.refresh_routing(force=True)
        except (TransportError, RemoteError, StorageError) as exc:
            log.warning("resync of target %s (chain %d v%d) failed, will retry: %s", succ, chain, cver, exc)
            time.sleep(min(1.0, self.cfg.heartbeat_interval))
        finally:
            self._resyncing.discard(job)

    def h_sync_meta(self, args: dict, payload, ctx) -> list:
        chain, cver = int(args["chain"]), int(args["cver"])
        _r, tid, _s = self._check_chain(chain, cver, (SYNCING,))
        return [m.as_list(k) for _c, k, m in self._store(tid).list(chain)]

    def h_sync_write(self, args: dict, payload: memoryview, ctx) -> dict:
        chain, cver, chunk, ver = int(args["chain"]), int(args["cver"]), int(args["chunk"]), int(args["ver"])
        _r, tid, _s = self._check_chain(chain, cver, (SYNCING,))
        store = self._store(tid)
        with self.locks.hold((tid, chain, chunk), self.lock_timeout):
            crc = store.put(chain, chunk, ver, cver, payload, pending=False)
        return {"crc": crc}

    def h_sync_remove(self, args: dict, payload, ctx) -> dict:
        chain, cver = int(args["chain"]), int(args["cver"])
        _r, tid, _s = self._check_chain(chain, cver, (SYNCING,))
        store = self._store(tid)
        n = 0
        for chunk in args.get("chunks") or []:
            with self.locks.hold((tid, chain, int(chunk)), self.lock_timeout):
                n += store.remove(chain, int(chunk))
        return {"removed": n}

    # -- admin ------------------------------------------------------------------------------------------
    def h_list(self, args: dict, payload, ctx) -> list:
        chain = args.get("chain")
        out = []
        for tid, st in sorted(self.stores.items()):
            for c, k, m in st.list(None if chain is None else int(chain)):
                out.append({"target": tid, "chain": c, "chunk": k, "committed": m.committed, "pending": m.pending,
                            "length": m.length, "crc": m.crc})
        return out

    def h_stats(self, args: dict, payload, ctx) -> dict:
        return {"node": self.node, "incarnation": self.incarnation, "routing_version": self.routing.version,
                **self.stats, "damage": dict(self.stats["damage"]),
                "failed": {str(t): why for t, why in self.failed.items()},
                "targets": {str(t): {"chunks": len(metas), "bytes": sum(m.length for m in metas)}
                            for t, metas in ((t, [m for _c, _k, m in s.list()]) for t, s in self.stores.items())}}


def _item_error(exc: StorageError) -> dict:
    """One item's error in a batch answer (the client turns it back into ``exc``'s class)."""
    return {"err": type(exc).__name__, "msg": str(exc), "data": exc.rpc_data or {}}


def main(argv: list[str] | None = None) -> None:
    ap = service_parser("fs3.storage", "an fs3 storage server (CRAQ chain replication)")
    ap.add_argument("--data-dir", default=None, help="base data directory (see docs/fs3.md)")
    args, cluster, node = parse_service_args(ap, argv)
    try:
        cfg = Fs3Config.from_cluster(cluster)
        mg = cluster.endpoint("fs3.mgmtd")
    except (Fs3ConfigError, KeyError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    svc = cluster.service("fs3.storage")
    port = svc.port if svc else 0
    data = node_data_dir(cfg, node.name, args.data_dir)
    try:
        limits = server_settings(cluster)
    except AuthError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    srv = StorageServer(cfg, node.name, node.address, port, mg, data, auth=limits.pop("auth"), limits=limits)
    try:
        srv.start()
    except StorageError as exc:
        ap.exit(1, f"{ap.prog}: error: {exc}\n")
    log.info("fs3.storage on %s:%d, data %s, mgmtd %s:%d", node.address, srv.port, data, *mg)
    wait_for_shutdown()
    srv.stop()


if __name__ == "__main__":
    main()
