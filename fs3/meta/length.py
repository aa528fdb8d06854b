"""File lengths from storage: the exact end of a file's data, and cutting chunks on truncate.

[Note: exact lengths] A writer reports the end of its highest write, but a writer that crashed
reports nothing, and a client's report may be older than its last write. Storage knows: for
each chain of the file's layout, ``storage.last_chunk`` names the highest chunk of the inode on
that chain and its committed length, so the file ends at ``max(index * chunk_size + length)``.
Meta asks when a session that wrote closes (or is pruned), outside any database transaction.
A file extended by truncate-up may end past its data: the caller keeps the larger of the two.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from network import RemoteError, RpcPool, TrafficClass, TransportError

from ..chunkid import INDEX_BITS, file_chunk_id
from ..client.chunks import ChunkClient
from ..client.filedata import as_layout
from ..errors import ChunkNotFound, MetaUnavailable, RetryableError, from_remote

__all__ = ["LengthProbe"]

log = logging.getLogger(__name__)


class LengthProbe:
    """Asks storage for a file's data end and cuts chunks past a new end (holds a ChunkClient
    with the cluster key: ``storage.last_chunk`` is a service method)."""

    def __init__(self, chunks: ChunkClient, *, timeout: float = 30.0) -> None:
        self.chunks = chunks
        self.timeout = timeout
        self._pools: dict[tuple[str, int], RpcPool] = {}
        self._pools_lock = threading.Lock()
        self._workers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fs3-meta-storage")

    def close(self) -> None:
        self._workers.shutdown(wait=True)
        for p in list(self._pools.values()):
            p.close()

    def _pool(self, addr: tuple[str, int]) -> RpcPool:
        p = self._pools.get(addr)
        if p is None:
            with self._pools_lock:  # one pool per server: a racing second one would never be closed
                p = self._pools.get(addr)
                if p is None:
                    p = self._pools[addr] = RpcPool(*addr, size=4, timeout=10.0, connect_timeout=3.0,
                                                    credential=self.chunks.credential,
                                                    traffic_class=TrafficClass.STORAGE)
        return p

    def disks(self) -> tuple[int, int] | None:
        """``(total, free)`` bytes of file data the storage servers can hold: the sum of their data
        directories' disks (``storage.disk``) over the replication factor; None when none answers.
        (Servers that share a disk, as the local cluster's do, count it once each: the replication
        factor then cancels it out.)"""
        r = self.chunks.routing
        ends = {r.endpoint(t) for c in r.chains.values() for t, _s in c["members"]}
        total = free = 0
        seen = 0
        for end in ends:
            try:
                d = self._pool(end).call("storage.disk", {}, timeout=3.0).result["disk"]
            except (TransportError, RemoteError) as exc:
                log.debug("storage.disk of %s:%d: %s", *end, exc)
                continue
            if d:
                total, free, seen = total + int(d["total"]), free + int(d["free"]), seen + 1
        if not seen:
            return None
        rep = max(1, r.replication)
        return total // rep, free // rep

    def last_chunk(self, chain: int, lo: int, hi: int) -> tuple[int | None, int]:
        """``(highest chunk id in [lo, hi) on the chain, its committed length)``, retried over
        routing changes until the timeout."""
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        last: Exception | None = None
        while True:
            r = self.chunks.routing
            c = r.chains.get(chain)
            serving = r.serving(chain) if c is not None else []
            for t in serving:
                try:
                    res = self._pool(r.endpoint(t)).call("storage.last_chunk", {"chain": chain, "cver": c["version"],
                                                                             "lo": lo, "hi": hi}).result
                    return res.get("chunk"), int(res.get("length") or 0)
                except RemoteError as exc:
                    err = from_remote(exc)
                    if not isinstance(err, RetryableError):
                        raise err from None
                    last = err
                except TransportError as exc:
                    last = exc
            if not serving:
                last = last or RetryableError(f"chain {chain} has no serving target")
            if time.monotonic() + delay > deadline:
                raise MetaUnavailable(f"storage.last_chunk on chain {chain} gave up after {self.timeout} s: {last}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            self.chunks.refresh_routing()

    def exact_length(self, ino: int, layout: dict | None) -> int:
        """The end of the data of file ``ino`` (0 when it has no chunk)."""
        if not layout or not layout.get("chains"):
            return 0
        cs = int(layout["chunk_size"])
        lo, hi = file_chunk_id(ino, 0), (ino + 1) << INDEX_BITS
        chains = list(dict.fromkeys(layout["chains"]))
        if len(chains) == 1:
            found = [self.last_chunk(chains[0], lo, hi)]
        else:  # one question per chain, asked at once
            found = list(self._workers.map(lambda ch: self.last_chunk(ch, lo, hi), chains))
        end = 0
        for chunk, length in found:
            if chunk is not None:
                end = max(end, (chunk - lo) * cs + length)
        return end

    def trim(self, ino: int, layout: dict | None, new_size: int, old_end: int) -> int:
        """Remove the chunks of ``ino`` wholly past ``new_size`` (up to ``old_end``) and cut the
        boundary chunk to ``new_size``, synchronously; the number of chunks touched."""
        if not layout or not layout.get("chains"):
            return 0
        cs = int(layout["chunk_size"])
        first = -(-new_size // cs)
        last = -(-old_end // cs)  # exclusive
        lay = as_layout(layout)
        ids = [lay.place(ino, i) for i in range(first, last)]
        n = 0
        if ids:
            for _ in self._workers.map(lambda cc: self.chunks.remove(*cc), ids):
                n += 1
        keep = new_size % cs
        if keep and new_size < old_end:
            b = new_size // cs
            chain, chunk = lay.place(ino, b)
            try:
                data = bytes(self.chunks.read(chain, chunk))
            except ChunkNotFound:
                data = b""
            if len(data) > keep:
                self.chunks.write(chain, chunk, data[:keep], 0, full=True)
                n += 1
        return n

    def remove_all(self, ino: int, layout: dict | None) -> int:
        """Remove every chunk of ``ino`` (GC); the number of chunk ids asked to go."""
        if not layout or not layout.get("chains"):
            return 0
        return self.trim(ino, layout, 0, self.exact_length(ino, layout))
