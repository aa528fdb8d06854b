"""The read path of a storage server: batched reads, verified or sent from the file unverified
for the caller to check end to end.
"""

from __future__ import annotations

import os

from network import FileRegion, Reply

from ..chunkid import inode_of
from ..chunkstore import HEADER_SIZE, ChunkStore, crc32c
from ..errors import ChunkCorrupt, ChunkNotCommitted, ChunkNotFound, StorageError
from ..routing import SERVING
from .request import item_error, malformed

__all__ = ["Reads"]


class Reads:
    """The read path (a part of :class:`StorageServer`, over its state)."""

    def h_read(self, args: dict, payload, ctx) -> Reply:
        items = args.get("items") or []
        relaxed = bool(args.get("relaxed"))
        e2e = bool(args.get("e2e"))  # the caller checks CRCs end to end and reports mismatches
        with malformed("storage.read"):
            self._authorize(ctx, args, [int(it[2]) for it in items], False, "storage.read")
        results, out, fds = [], [], []
        try:
            for it in items:
                with malformed("storage.read"):
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
                            self._count("reads")
                            self._io(tid, "read", n)
                            continue
                    piece, ver, crc = self._read_verified(tid, store, chain, chunk, pend, relaxed, off, length)
                    self._count("reads")
                    self._io(tid, "read", len(piece))
                    out.append(piece)
                    results.append({"n": len(piece), "v": ver, "t": tid, "c": crc})
                except StorageError as exc:
                    results.append(item_error(exc))
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
                data, ver = self._read_or_report(tid, store, chain, chunk, pending=pend and bool(m and m.pending),
                                                 buf=bytearray(HEADER_SIZE + self.cfg.chunk_size))
                crc = crc32c(data)
        end = len(data) if length < 0 else min(len(data), off + length)
        piece = data[min(off, end):end]
        if len(piece) != len(data):
            crc = crc32c(piece)
        return piece, ver, crc

    def h_last_chunk(self, args: dict, payload, ctx) -> dict:
        """``storage.last_chunk {chain, cver, lo, hi}`` (services: the metadata service): the highest
        committed chunk id in ``[lo, hi)`` on this serving copy of the chain and its committed
        length, ``{"chunk": id or None, "length": n}`` (a file's chunks are one such range; see
        fs3.meta.length)."""
        with malformed("storage.last_chunk"):
            chain, cver, lo, hi = int(args["chain"]), int(args["cver"]), int(args["lo"]), int(args["hi"])
        _r, tid, _s = self._check_chain(chain, cver, (SERVING,))
        best, length = None, 0
        store = self._store(tid)
        if hi > lo and inode_of(lo) == inode_of(hi - 1):  # one file's range: its own index
            found = store.file_chunks(chain, inode_of(lo))
        else:
            found = [(k, m) for _c, k, m in store.list(chain)]
        for k, m in found:
            if lo <= k < hi and m.committed and (best is None or k > best):
                best, length = k, m.length
        return {"chunk": best, "length": length}
