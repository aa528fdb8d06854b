"""The chunk client: batch reads and writes of chunks by (chain, chunk id).

A file layer sits on top: a file is a sequence of chunks striped over chains, chunk ``i`` of
inode ``n`` being ``file_chunk_id(n, i)`` on chain ``chains[i % stripe]`` of the file's layout,
so the client computes chunk -> chain -> target locally from the routing table (no metadata
service on the data path, as in 3FS).

- **Writes** go to the head of the chain (the first serving target) with the chain version the
  client holds and an idempotency key (client id, channel, sequence number). A retryable error
  (stale routing, a dead successor, a target that is not the head any more) or no answer within
  ``write_timeout`` (a frozen head; a frozen successor makes the head answer ``ForwardFailed``
  first, fs3.forward's hop budgets) makes the client refresh its routing table and retry *the
  same* key until its deadline, so a write is applied once even when an acknowledgement was lost. ``batch_write`` sends whole-chunk writes of one
  chain in batches (``storage.write_batch``: one request through the chain, one key per item).
- **Reads** go to one serving replica, chosen per batch on the node with the fewest reads
  already assigned (3FS's default), and land in the callers' buffers (a scatter receive). Whole
  chunks come unverified from the file (``sendfile``) and are checked here against the CRC32C
  recorded at write time; a mismatch is reported to that server (``storage.check``), which
  verifies, reports and repairs its copy. An error from a replica (dead, corrupt copy, not
  serving) or no answer within ``read_timeout`` (a frozen node) moves the read to another replica; a pending chunk ("not committed") is retried
  after a short wait unless ``relaxed`` reads are allowed.
- **Flow control**: at most ``max_inflight`` requests are in flight at once, at most
  ``per_server`` of them to one storage server (3FS's request-to-send bound: 32 in flight, 8 per
  server), and a read or write batch to one server carries at most ``max_batch_bytes``.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from crc32c import crc32c

from network import (
    Credential,
    RemoteError,
    RpcPool,
    TrafficClass,
    TransportError,
    TransportTimeout,
    client_credential,
    load_cluster,
)
from network.transport import as_bytes

from ..chunkid import file_chunk_id, inode_of
from ..errors import (
    CapabilityDenied,
    ChunkCorrupt,
    ChunkNotCommitted,
    ChunkNotFound,
    ClientError,
    NoServingReplica,
    NotServing,
    RetryableError,
    from_remote,
)
from ..forward import HOP_SHARE
from ..routing import Routing, SingleFlight

__all__ = ["ChunkClient", "ReadIO", "WriteIO", "WriteResult", "file_chunk_id"]

#: capabilities a ChunkClient holds before it drops expired ones (then the oldest grants)
MAX_CAPS = 4096

log = logging.getLogger(__name__)


@dataclass
class WriteIO:
    chain: int
    chunk: int
    data: bytes | bytearray | memoryview
    offset: int = 0


@dataclass
class ReadIO:
    chain: int
    chunk: int
    offset: int = 0
    length: int = -1          # -1: to the end of the chunk
    into: bytearray | memoryview | None = None


@dataclass
class WriteResult:
    version: int
    crc: int


@dataclass
class _Pending:
    io: ReadIO
    index: int
    excluded: set = field(default_factory=set)
    corrupt: set = field(default_factory=set)  # targets whose copy failed its checksum


class ChunkClient:
    """Reads and writes chunks; thread-safe."""

    def __init__(self, mgmtd: tuple[str, int], *, max_inflight: int = 8, per_server: int | None = None,
                 max_batch_bytes: int = 4 << 20, timeout: float = 30.0, source: str | None = None,
                 client_id: str | None = None, io_timeout: float = 30.0, read_timeout: float | None = None,
                 write_timeout: float | None = None,
                 credential: Credential | None = None) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if per_server is not None and per_server < 1:
            raise ValueError("per_server must be >= 1")
        self.per_server = per_server or max_inflight
        self.max_batch_bytes = max_batch_bytes
        self._server_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
        self.mgmtd_addr = mgmtd
        self.max_inflight = max_inflight
        self.timeout = timeout
        self.io_timeout = io_timeout
        # one attempt's bounds (fs3.config's note on attempt timeouts); from_cluster derives them
        # from the cluster's failure_timeout, a bare client waits io_timeout
        self.read_timeout = min(read_timeout or io_timeout, io_timeout)
        self.write_timeout = min(write_timeout or io_timeout, io_timeout)
        self._avoid: dict[tuple[str, int], float] = {}  # endpoint -> until when reads avoid it
        self.source = source
        self.client_id = client_id or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.credential = credential
        self._mgmtd = RpcPool(*mgmtd, size=2, timeout=10.0, connect_timeout=5.0, credential=credential,
                              traffic_class=TrafficClass.STORAGE, source=source)
        self._routing = Routing(version=0)
        self._fetch = SingleFlight(self._fetch_routing, timeout=timeout)
        self._pools: dict[tuple[str, int], RpcPool] = {}
        self._plock = threading.Lock()
        self._channels: queue.SimpleQueue = queue.SimpleQueue()
        self._nchan = itertools.count(1)
        self._seqs: dict[int, int] = {}
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="fs3-chunks")
        # data-path capabilities by inode (fs3.caps): a job's client sends the ones its request needs
        self._caps: dict[int, dict] = {}
        self._caps_lock = threading.Lock()
        self.stats = {"retries": 0, "routing_refreshes": 0, "replica_failovers": 0, "read_timeouts": 0,
                      "write_timeouts": 0}

    @classmethod
    def from_cluster(cls, cluster, node: str | None = None, **kw) -> ChunkClient:
        """A client for the cluster description (a path or a loaded ``Cluster``); with ``node``, it
        speaks from that node's address."""
        from ..config import Fs3Config

        c = load_cluster(cluster) if isinstance(cluster, str | os.PathLike) else cluster
        try:
            mg = c.endpoint("fs3.mgmtd")
        except KeyError as exc:
            raise ClientError(str(exc)) from None
        cfg = Fs3Config.from_cluster(c)
        kw.setdefault("max_batch_bytes", cfg.max_batch_bytes)
        kw.setdefault("read_timeout", cfg.read_attempt_timeout)
        kw.setdefault("write_timeout", cfg.write_attempt_timeout)
        if kw.get("credential") is None:
            kw["credential"] = client_credential(c)  # $FIREFLYER_CREDENTIAL (a job's), else the cluster key
        return cls(mg, source=c.node(node).address if node else None, **kw)

    def close(self) -> None:
        """Close the connections; requests not started yet are cancelled, those in flight end
        within their attempt timeouts (their connections close under them)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in list(self._pools.values()):
            p.close()
        self._mgmtd.close()

    def __enter__(self) -> ChunkClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- capabilities -----------------------------------------------------------------------------
    def grant(self, cap: dict | None) -> None:
        """Hold a data-path capability (from the metadata service's open/create, fs3.caps): requests
        for that file's chunks carry it. A write capability replaces a read one, never the reverse."""
        if not cap:
            return
        ino = int(cap["i"])
        now = time.time()
        with self._caps_lock:
            old = self._caps.get(ino)
            if old is None or cap["w"] >= old["w"] or old["e"] < now:
                self._caps.pop(ino, None)  # re-inserted last: the dict's order is oldest grant first
                self._caps[ino] = cap
                if len(self._caps) > MAX_CAPS:
                    self._prune_caps(now)

    def _prune_caps(self, now: float) -> None:
        """Drop expired capabilities; still over MAX_CAPS: the oldest grants (caller holds the lock)."""
        for ino in [i for i, c in self._caps.items() if c["e"] < now]:
            del self._caps[ino]
        extra = len(self._caps) - MAX_CAPS
        if extra > 0:
            for ino in list(itertools.islice(self._caps, extra)):
                del self._caps[ino]

    def _with_caps(self, args: dict, chunks) -> dict:
        """``args`` with the unexpired capabilities of the files ``chunks`` belong to (none held:
        unchanged)."""
        if self._caps:
            now = time.time()
            caps = {inode_of(ch): self._caps.get(inode_of(ch)) for ch in chunks}
            held = [c for c in caps.values() if c is not None and c["e"] >= now]
            if held:
                args["caps"] = held
        return args

    # -- routing ----------------------------------------------------------------------------------
    @property
    def routing(self) -> Routing:
        if self._routing.version == 0:
            self.refresh_routing()
        return self._routing

    def refresh_routing(self) -> Routing:
        """Fetch the routing table from mgmtd when it changed. Threads that ask at the same time
        share one fetch (fs3.routing's SingleFlight): a chain change seen by every request in
        flight costs mgmtd one or two calls, not one per request."""
        try:
            return self._fetch()
        except TimeoutError as exc:
            if self._routing.version == 0:
                raise ClientError(f"no routing table from mgmtd at {self.mgmtd_addr[0]}:{self.mgmtd_addr[1]}: "
                                  f"{exc}") from None
            log.warning("routing refresh (keeping v%d): %s", self._routing.version, exc)
            return self._routing

    def _fetch_routing(self) -> Routing:
        try:
            d = self._mgmtd.call("mgmtd.routing", {"have": self._routing.version}).result
        except (TransportError, RemoteError) as exc:
            if self._routing.version == 0:
                raise ClientError(f"cannot fetch the routing table from mgmtd at "
                                  f"{self.mgmtd_addr[0]}:{self.mgmtd_addr[1]}: {exc}") from exc
            log.warning("routing refresh failed (keeping v%d): %s", self._routing.version, exc)
            return self._routing
        self.stats["routing_refreshes"] += 1
        if not d.get("unchanged"):
            self._routing = Routing.from_dict(d)
        return self._routing

    def chains(self) -> list[int]:
        return self.routing.chain_ids()

    @property
    def chunk_size(self) -> int:
        return self.routing.chunk_size

    def _server(self, r: Routing, target: int) -> RpcPool:
        key = r.endpoint(target)
        p = self._pools.get(key)
        if p is None:
            with self._plock:
                p = self._pools.get(key)
                if p is None:
                    p = self._pools[key] = RpcPool(*key, size=self.max_inflight, timeout=self.io_timeout,
                                                   connect_timeout=3.0, traffic_class=TrafficClass.STORAGE,
                                                   source=self.source, credential=self.credential)
        return p

    def _slot(self, r: Routing, target: int) -> threading.BoundedSemaphore:
        key = r.endpoint(target)
        sem = self._server_slots.get(key)
        if sem is None:
            with self._plock:
                sem = self._server_slots.setdefault(key, threading.BoundedSemaphore(self.per_server))
        return sem

    @contextmanager
    def _acquire(self, *sems: threading.BoundedSemaphore):
        """Take flow-control slots, each within the client's timeout (never wait forever)."""
        taken = []
        try:
            for sem in sems:
                if not sem.acquire(timeout=self.timeout):
                    raise ClientError(f"no free request slot within {self.timeout} s "
                                      f"(max_inflight={self.max_inflight}, per_server={self.per_server})")
                taken.append(sem)
            yield
        finally:
            for sem in reversed(taken):
                sem.release()

    def _chain(self, r: Routing, chain: int) -> dict:
        c = r.chains.get(chain)
        if c is None:
            r = self.refresh_routing()
            c = r.chains.get(chain)
            if c is None:
                raise ClientError(f"no chain {chain} in the routing table (chains: {r.chain_ids()[:8]}...)")
        return c

    # -- writes ------------------------------------------------------------------------------------
    def _take_channel(self) -> int:
        try:
            return self._channels.get_nowait()
        except queue.Empty:
            return next(self._nchan)

    def write(self, chain: int, chunk: int, data, offset: int = 0, *, full: bool | None = None) -> WriteResult:
        """Write ``data`` at ``offset`` of a chunk. ``full``: the chunk becomes exactly ``data`` (at
        ``offset``, zeros before it); otherwise the bytes merge with the chunk's committed content.
        None (the default): full when ``offset`` is 0."""
        self._check_range(chunk, offset, len(data))
        ch = self._take_channel()
        try:
            seq = self._seqs.get(ch, 0) + 1
            self._seqs[ch] = seq
            args = {"chunk": chunk, "off": offset, "full": offset == 0 if full is None else bool(full), "op": "write",
                    "client": self.client_id, "channel": ch, "seq": seq}
            res = self._update(chain, args, [data] if len(data) else [])
            return WriteResult(res["version"], res["crc"])
        finally:
            self._channels.put(ch)

    def remove(self, chain: int, chunk: int) -> bool:
        """Remove a chunk from every replica of its chain; False when it did not exist."""
        ch = self._take_channel()
        try:
            seq = self._seqs.get(ch, 0) + 1
            self._seqs[ch] = seq
            args = {"chunk": chunk, "op": "remove", "client": self.client_id, "channel": ch, "seq": seq}
            return bool(self._update(chain, args, []).get("removed"))
        finally:
            self._channels.put(ch)

    def _check_range(self, chunk: int, offset: int, n: int) -> None:
        if not 0 <= chunk < 1 << 64:
            raise ValueError(f"chunk id {chunk} is not a 64-bit unsigned integer")
        cs = self.chunk_size
        if offset < 0 or offset + n > cs:
            raise ValueError(f"bytes [{offset}, {offset + n}) do not fit in a chunk of {cs} bytes")

    def _at_head(self, chain: int, send, what) -> Any:
        """Run ``send(routing, chain entry, head target)`` at the chain's head until it returns.

        A retryable error (raised by ``send``, or a remote one) or an unreachable head backs off,
        refreshes the routing table and tries again until the client's timeout; ``what()`` names
        the chunk in the error then. Other errors go to the caller as they are.
        """
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        last: Exception | None = None
        with self._acquire(self._slots):
            while True:
                r = self.routing
                c = self._chain(r, chain)
                ws = r.write_set(chain)
                if ws:
                    try:
                        with self._acquire(self._slot(r, ws[0][0])):
                            return send(r, c, ws[0][0])
                    except RetryableError as exc:
                        last = exc
                    except RemoteError as exc:
                        err = from_remote(exc)
                        if not isinstance(err, RetryableError):
                            raise err from None
                        last = err
                    except TransportError as exc:
                        last = exc
                        if isinstance(exc, TransportTimeout):
                            self.stats["write_timeouts"] += 1
                else:
                    last = NoServingReplica(f"chain {chain} v{c['version']} has no serving target")
                if time.monotonic() + delay > deadline:
                    raise ClientError(f"write of chunk {what()} gave up after {self.timeout} s: {last}") from last
                self.stats["retries"] += 1
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
                self.refresh_routing()

    def _head_budget(self) -> float:
        """The head's share of a write attempt: it must answer (ForwardFailed when its successor did
        not) before this client stops waiting (fs3.forward's note on hop budgets)."""
        return self.write_timeout * HOP_SHARE

    def _update(self, chain: int, args: dict, payload: list) -> dict:
        return self._at_head(
            chain,
            lambda r, c, head: self._server(r, head).call(
                "storage.write", self._with_caps(dict(args, chain=chain, cver=c["version"], tmo=self._head_budget()),
                                                 (args["chunk"],)), payload,
                timeout=self.write_timeout).result,
            lambda: f"{chain}/{args['chunk']:016x}")

    def batch_write(self, ios: list[WriteIO]) -> list[WriteResult]:
        """Write many chunks, ``max_inflight`` requests at a time; raises the first error (after all
        finish). Whole-chunk writes (offset 0) go in batches of up to ``max_batch_bytes`` per chain
        (one request per batch through the chain), the others one by one."""
        per = max(1, self._max_batch() // self.chunk_size)
        batches: list[list[int]] = []
        open_batch: dict[int, list[int]] = {}
        singles = []
        for i, io in enumerate(ios):
            self._check_range(io.chunk, io.offset, len(io.data))
            if io.offset:
                singles.append(i)
                continue
            b = open_batch.get(io.chain)
            if b is None or len(b) == per or any(ios[j].chunk == io.chunk for j in b):
                b = open_batch[io.chain] = []
                batches.append(b)
            b.append(i)
        futs = [(b, self._pool.submit(self._write_batch, ios[b[0]].chain, [ios[j] for j in b])) for b in batches]
        futs += [([i], self._pool.submit(lambda io: [self.write(io.chain, io.chunk, io.data, io.offset)], ios[i]))
                 for i in singles]
        out: list = [None] * len(ios)
        first = None
        for idx, f in futs:
            try:
                for i, res in zip(idx, f.result(), strict=True):
                    out[i] = res
            except Exception as exc:  # noqa: BLE001 - re-raised below
                first = first or exc
        if first is not None:
            raise first
        return out

    def _write_batch(self, chain: int, ios: list[WriteIO]) -> list[WriteResult]:
        """Whole-chunk writes to one chain in one ``storage.write_batch`` request; items that fail
        with a retryable error are sent again (same keys) until the deadline, as ``write`` does."""
        chans = [self._take_channel() for _ in ios]
        try:
            seqs = []
            for ch in chans:
                seqs.append(self._seqs.get(ch, 0) + 1)
                self._seqs[ch] = seqs[-1]
            results: list = [None] * len(ios)
            left = list(range(len(ios)))

            def send(r, c, head):
                nonlocal left
                args = {"chain": chain, "cver": c["version"], "client": self.client_id, "tmo": self._head_budget(),
                        "items": [[ios[k].chunk, chans[k], seqs[k], len(ios[k].data)] for k in left]}
                self._with_caps(args, [ios[k].chunk for k in left])
                rep = self._server(r, head).call("storage.write_batch", args, [ios[k].data for k in left],
                                                 timeout=self.write_timeout).result
                retry, last = [], None
                for k, res in zip(left, rep["items"], strict=True):
                    if "err" not in res:
                        results[k] = WriteResult(res["version"], res["crc"])
                        continue
                    err = from_remote(RemoteError(res["msg"], kind=res["err"], data=res.get("data")))
                    if not isinstance(err, RetryableError):
                        raise err
                    last = err
                    retry.append(k)
                left = retry
                if last is not None:
                    raise last  # the others are done; these go again (same keys)
                return results

            return self._at_head(chain, send, lambda: f"{chain}/{ios[left[0]].chunk:016x}")
        finally:
            for ch in chans:
                self._channels.put(ch)

    # -- reads -------------------------------------------------------------------------------------
    def read(self, chain: int, chunk: int, offset: int = 0, length: int = -1, into=None, *,
             relaxed: bool = False) -> memoryview:
        """Read a chunk (or a range of it); returns a view of ``into`` when given."""
        return self.batch_read([ReadIO(chain, chunk, offset, length, into)], relaxed=relaxed)[0]

    def batch_read(self, ios: list[ReadIO], *, relaxed: bool = False, missing_ok: bool = False) -> list:
        """Read many chunks: grouped per replica node into batches, ``max_inflight`` at a time.
        ``missing_ok``: a chunk that does not exist is None in the result (a hole of a file)
        instead of failing the whole batch with ChunkNotFound."""
        results: list = [None] * len(ios)
        deadline = time.monotonic() + self.timeout
        todo = [_Pending(io, i) for i, io in enumerate(ios)]
        delay = 0.02
        attempt_timeout = self.read_timeout
        last: dict[int, Exception] = {}
        while todo:
            r = self.routing
            groups: dict[str, list[tuple[_Pending, int]]] = {}
            load: dict[str, int] = {}
            retry: list[_Pending] = []
            for p in todo:
                self._chain(r, p.io.chain)
                cands = [t for t in r.serving(p.io.chain) if t not in p.excluded]
                if not cands:
                    retry.append(p)
                    last.setdefault(p.index, NoServingReplica(f"chain {p.io.chain}: no serving replica left "
                                                              f"to try"))
                    continue
                if self._avoid:  # a replica that timed out recently goes last
                    now = time.monotonic()
                    t = min(cands, key=lambda t: (self._avoid.get(r.endpoint(t), 0) > now,
                                                  load.get(r.node_of(t), 0), (t + p.io.chunk) % 7))
                else:
                    t = min(cands, key=lambda t: (load.get(r.node_of(t), 0), (t + p.io.chunk) % 7))
                node = r.node_of(t)
                load[node] = load.get(node, 0) + 1
                groups.setdefault(node, []).append((p, t))
            # [Note: batched reads into caller buffers] a batch is one request per replica node of
            # up to max_batch_bytes; its reply header gives each item's length first, so the reply's
            # bytes are received straight into the callers' buffers (a scatter receive: no copy)
            # [Note: even batches] a node's items are split into as few batches as the cap allows,
            # of even sizes (6 chunks with a cap of 4: 3 + 3, not 4 + 2): the batches of a read
            # run side by side, and the read ends with its longest one
            batches = []
            per = max(1, self._max_batch() // r.chunk_size)
            for _node, items in groups.items():
                nb = -(-len(items) // per)
                for k in range(nb):
                    batches.append(items[k * len(items) // nb:(k + 1) * len(items) // nb])
            # the first batch runs in this thread, which would only wait otherwise (one thread
            # handoff less per read: it shows at a GiB per second in 4 MiB reads)
            futs = [self._pool.submit(self._read_batch, r, b, relaxed, attempt_timeout) for b in batches[1:]]
            outs = itertools.chain([self._read_batch(r, batches[0], relaxed, attempt_timeout)] if batches else [],
                                   (f.result() for f in futs))
            for out in outs:
                for p, t, res in out:
                    if isinstance(res, memoryview):
                        results[p.index] = res
                        continue
                    if missing_ok and isinstance(res, ChunkNotFound):
                        continue  # results[p.index] stays None
                    if isinstance(res, ChunkNotFound | ClientError | CapabilityDenied):
                        raise res
                    last[p.index] = res
                    if isinstance(res, ChunkCorrupt):
                        p.corrupt.add(t)
                    if not isinstance(res, ChunkNotCommitted):
                        p.excluded.add(t)
                        self.stats["replica_failovers"] += 1
                    retry.append(p)
            if not retry:
                break
            if time.monotonic() + delay > deadline:
                p = retry[0]
                raise ClientError(f"read of chunk {p.io.chain}/{p.io.chunk:016x} gave up after {self.timeout} s: "
                                  f"{last.get(p.index)}") from last.get(p.index)
            # every replica failed for some item: refresh and start over with all of them
            # (except copies known to be corrupt)
            refresh = False
            for p in retry:
                if not [t for t in r.serving(p.io.chain) if t not in p.excluded]:
                    refresh = True
                    p.excluded = set(p.corrupt)  # copies known to be corrupt stay out; the rest get another try
            if refresh and any(isinstance(last.get(p.index), TransportTimeout) for p in retry):
                # [Note: every replica slow] one frozen replica costs a read one attempt timeout; when
                # every replica let an attempt time out, the cluster is slow rather than one node
                # frozen (an overloaded host), so the next round gives each attempt twice as long
                # (up to the I/O timeout) instead of timing out the same way until the deadline
                attempt_timeout = min(attempt_timeout * 2, self.io_timeout)
            if refresh or any(isinstance(last.get(p.index), ChunkNotCommitted | TransportError) for p in retry):
                self.stats["retries"] += 1
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
                self.refresh_routing()
            todo = retry
        return results

    def _max_batch(self) -> int:
        return self.max_batch_bytes

    def _read_batch(self, r: Routing, batch: list[tuple[_Pending, int]], relaxed: bool, timeout: float) -> list:
        t0 = batch[0][1]
        items = [[p.io.chain, r.chains[p.io.chain]["version"], p.io.chunk, p.io.offset, p.io.length]
                 for p, _t in batch]
        too_small: dict[int, int] = {}

        def land(result: dict, nbytes: int) -> list:
            """Each item's buffer, in order: the caller's, or fresh memory."""
            bufs = []
            for k, ((p, _t), res) in enumerate(zip(batch, result["items"], strict=True)):
                n = res.get("n", 0)
                if not n:
                    continue
                dst = None if p.io.into is None else as_bytes(p.io.into)
                if dst is not None and dst.nbytes < n:
                    too_small[k] = dst.nbytes
                    dst = None
                bufs.append(bytearray(n) if dst is None else dst[:n])
            return bufs

        server = self._server(r, t0)
        try:
            with self._acquire(self._slots, self._slot(r, t0)):
                rep = server.call("storage.read", self._with_caps({"items": items, "relaxed": relaxed, "e2e": True},
                                                                  [it[2] for it in items]), into=land,
                                  timeout=timeout)
        except RemoteError as exc:
            err = from_remote(exc)
            return [(p, t, err) for p, t in batch]
        except TransportError as exc:
            # [Note: slow replicas] a replica that did not answer within the read timeout (frozen,
            # wedged, or dead) is avoided by later reads for a while (until mgmtd has had time to
            # notice, about three read timeouts = failure_timeout), so one frozen server costs one
            # read timeout per batch in flight, not one per batch until it is declared dead
            if isinstance(exc, TransportTimeout):
                self.stats["read_timeouts"] += 1
            with self._plock:
                self._avoid = {k: v for k, v in self._avoid.items() if v > time.monotonic()}
                self._avoid[r.endpoint(t0)] = time.monotonic() + 3 * timeout
            return [(p, t, exc) for p, t in batch]
        out = []
        views = iter(rep.payload if isinstance(rep.payload, list) else [])
        for k, ((p, t), res) in enumerate(zip(batch, rep.result["items"], strict=True)):
            if "err" in res:
                exc = from_remote(RemoteError(res["msg"], kind=res["err"], data=res.get("data")))
                out.append((p, t, exc))
                continue
            n = res["n"]
            view = next(views) if n else memoryview(b"")
            if k in too_small:
                out.append((p, t, ClientError(
                    f"read of chunk {p.io.chain}/{p.io.chunk:016x}: the chunk ({n} bytes) does not fit the "
                    f"{too_small[k]}-byte buffer given")))
                continue
            if "c" in res and crc32c(view) != res["c"]:
                out.append((p, t, self._mismatch(server, p, t, bool(res.get("u")))))
                continue
            if p.io.into is not None and not n:
                view = as_bytes(p.io.into)[:0]
            out.append((p, t, view))
        return out

    def _mismatch(self, server: RpcPool, p: _Pending, t: int, unverified: bool) -> Exception:
        """The error for bytes that failed their CRC32C check here. Unverified bytes (sent from the
        file as they are) are reported to their server, which checks its copy: a damaged copy is
        reported to mgmtd and repaired there, and counts as corrupt here; an intact one means the
        file changed under the read (a write recycled it), and the read is simply retried."""
        where = f"chunk {p.io.chain}/{p.io.chunk:016x} from target {t}"
        if not unverified:
            return ChunkCorrupt(f"{where}: CRC32C mismatch in transit")
        try:
            corrupt = server.call("storage.check", {"chain": p.io.chain, "chunk": p.io.chunk},
                                  timeout=self.read_timeout).result["corrupt"]
        except (TransportError, RemoteError) as exc:
            log.warning("could not report a CRC32C mismatch of %s: %s", where, exc)
            corrupt = True
        if corrupt:
            return ChunkCorrupt(f"{where}: CRC32C mismatch (the replica's copy is damaged; it was reported)")
        return NotServing(f"{where}: the copy changed while it was read")
