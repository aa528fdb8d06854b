"""The check worker of a storage server: verifying a copy a reader doubted, reporting damaged
copies to mgmtd, repairing them from a healthy replica, and the periodic scrub of every chunk.
"""

from __future__ import annotations

import logging
import threading
import time

from network import RemoteError, TransportError

from ..chunkstore import HEADER_SIZE, crc32c
from ..errors import ChunkBusy, ChunkCorrupt, ChunkNotFound, TargetFailed
from ..routing import SERVING
from .request import malformed

__all__ = ["CheckWorker"]

log = logging.getLogger(__name__)


class CheckWorker:
    """Check, repair and scrub (a part of :class:`StorageServer`, over its state)."""

    def h_check(self, args: dict, payload, ctx) -> dict:
        """A reader found this server's copy of a chunk failing its CRC32C (an unverified read):
        verify the copy here, under the chunk lock; a damaged one is reported and repaired."""
        with malformed("storage.check"):
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

    def _read_or_report(self, tid: int, store, chain: int, chunk: int, **kw) -> tuple[memoryview, int]:
        """``store.read`` of a chunk on target ``tid``; a damaged copy is reported (and repaired)
        before its ``ChunkCorrupt`` goes on to the caller."""
        try:
            return store.read(chain, chunk, **kw)
        except ChunkCorrupt as exc:
            self._report_corrupt(tid, chain, chunk, str(exc), exc.damage)
            raise

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
        with self._stats_lock:
            self.stats["corrupt"] += 1
            self.stats["damage"][damage] = self.stats["damage"].get(damage, 0) + 1
        log.error("corrupt chunk: %s", detail)
        self._report(tid, chain, chunk, "ChunkCorrupt", detail)
        key = (tid, chain, chunk)
        with self._repair_lock:
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
                self._count("repaired")
                log.warning("repaired chunk %d/%016x on target %d from target %d", chain, chunk, tid, peer)
                self._report(tid, chain, chunk, "ChunkRepaired", f"copied v{item['v']} from target {peer}")
                return
            log.warning("could not repair chunk %d/%016x on target %d: no healthy serving peer", chain, chunk, tid)
        except Exception:  # pragma: no cover - repair is best effort; the copy stays unreadable
            log.exception("repair of chunk %d/%016x failed", chain, chunk)
        finally:
            with self._repair_lock:
                self._repairing.discard((tid, chain, chunk))

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
        for tid, store in self._stores_snapshot():  # a routing change may add a store meanwhile
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
                self._count("scrubbed_chunks")
                ahead = nbytes / rate - (time.monotonic() - began)
                if ahead > 0 and self._stop.wait(ahead):
                    return
        self._count("scrub_passes")
        log.info("scrub pass: %d chunks (%d bytes) verified, %d damaged, in %.1f s", chunks, nbytes, damaged,
                 time.monotonic() - began)
