"""The data path of fs3 files: byte ranges of an inode over its chunks, for the file client
(:mod:`fs3.client.files`) and the FUSE mount.

A file's layout (``{"chunk_size": int, "chains": [chain ids]}``, chosen by meta at create) places
chunk ``i`` of inode ``n`` as chunk id ``file_chunk_id(n, i)`` on chain ``chains[i % len(chains)]``;
placement is computed here, so meta is never on the data path.

- **Reads**: a range over many chunks is one :meth:`ChunkClient.batch_read` whose items land in the
  caller's buffer (no copy). A chunk that does not exist is a hole and reads as zeros; so do the
  bytes past the end of a short chunk, up to the file size the caller gives. Reads never go past
  that size.
- **Writes**: whole chunks go through :meth:`ChunkClient.batch_write` (one request per batch of a
  chain, every chain in parallel); a partial chunk (the head or the tail of the range) is written
  at its offset and merges with the chunk's committed bytes on the chain's head (``full=False``),
  at the same time as the whole chunks.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from network.transport import as_bytes

from .chunks import ChunkClient, ReadIO, WriteIO, file_chunk_id

__all__ = ["FileData", "Layout", "as_layout"]


class Layout:
    """A file's chunk size and stripe (the chains its chunks go to, in order)."""

    __slots__ = ("chains", "chunk_size")

    def __init__(self, chunk_size: int, chains: list[int] | tuple[int, ...]) -> None:
        if chunk_size <= 0 or not chains:
            raise ValueError(f"a file layout needs a chunk size > 0 and chains, got {chunk_size}, {chains!r}")
        self.chunk_size = int(chunk_size)
        self.chains = tuple(int(c) for c in chains)

    def place(self, ino: int, index: int) -> tuple[int, int]:
        """(chain, chunk id) of chunk ``index`` of inode ``ino``."""
        return self.chains[index % len(self.chains)], file_chunk_id(ino, index)

    def __repr__(self) -> str:
        return f"Layout(chunk_size={self.chunk_size}, chains={list(self.chains)})"


def as_layout(layout: Layout | Mapping[str, Any] | Any) -> Layout:
    """A :class:`Layout` from a layout dict (the wire form), an object with ``chunk_size`` and
    ``chains`` attributes, or a Layout."""
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, Mapping):
        return Layout(layout["chunk_size"], layout["chains"])
    return Layout(layout.chunk_size, layout.chains)


_MAP_MIN = 1 << 20  # smaller buffers are bytearrays
_POPULATE_STEP = 8 << 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise  # ctypes lets the GIL go during the call
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _madvise = None


def fresh_buffer(n: int, *, populate: bool = True) -> memoryview:
    """A writable view of ``n`` bytes of new memory, to receive into.

    [Note: fresh memory for reads] Memory the kernel has not mapped yet costs a page fault per
    4 KiB, and a fault taken inside a socket receive's copy costs several times one taken
    elsewhere (measured here: ~1.5-2 s of kernel time per GiB received into a fresh bytearray,
    ~0.35 s to populate it beforehand). A large buffer is therefore an anonymous mapping
    (unmapped when its last view goes), populated whole when it is made (``MAP_POPULATE``) or,
    with ``populate=False``, left for :func:`_populate` to fill ahead of the receives; a small
    one is a bytearray. (Transparent huge pages, ``MADV_HUGEPAGE``, were tried: 0.6 s per GiB
    loaded once, 3.5-4.2 s twice in three, the kernel compacting memory to find them.)"""
    if n >= _MAP_MIN:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        try:
            return memoryview(mmap.mmap(-1, n, flags=flags))
        except (OSError, ValueError):  # no memory to populate now, or no mmap here: let bytearray say
            pass
    return memoryview(bytearray(n))


def _populate(views: list[memoryview], stop: threading.Event) -> None:
    """Map the pages of fresh mappings (``fresh_buffer(populate=False)``) in order, a few MiB at a
    time (``MADV_POPULATE_WRITE``, without the GIL), while the receives into them run: the page
    faults are taken here, on the other core, and ahead of the receives (a receive that overtakes
    takes its own faults; an old kernel refusing the advice leaves them all to the receives)."""
    for mv in views:
        if _madvise is None or not isinstance(mv.obj, mmap.mmap):
            continue
        c = ctypes.c_char.from_buffer(mv.obj)
        addr = ctypes.addressof(c)
        del c
        for off in range(0, mv.nbytes, _POPULATE_STEP):
            if stop.is_set() or _madvise(addr + off, min(_POPULATE_STEP, mv.nbytes - off), _MADV_POPULATE_WRITE):
                return


def _zero(mv: memoryview, a: int, b: int) -> None:
    if b > a:
        mv[a:b] = bytes(b - a)


class FileData:
    """Reads and writes byte ranges of fs3 files through a :class:`ChunkClient`; thread-safe."""

    def __init__(self, chunks: ChunkClient, *, partial_workers: int = 4) -> None:
        self.chunks = chunks
        self._pool = ThreadPoolExecutor(max_workers=partial_workers, thread_name_prefix="fs3-filedata")
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop the helper threads (the chunk client is the caller's to close)."""
        self._closed.set()
        self._pool.shutdown(wait=True)

    # -- reads ---------------------------------------------------------------------------------------
    def read(self, ino: int, layout, offset: int, length: int, size: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of the file, clipped at ``size`` (holes read as zeros)."""
        n = max(0, min(length, size - offset))
        if n == 0:
            return b""
        buf = bytearray(n)
        got = self.readinto(ino, layout, offset, buf, size)
        return bytes(buf) if got == n else bytes(memoryview(buf)[:got])

    def readinto(self, ino: int, layout, offset: int, buf, size: int) -> int:
        """Read into ``buf`` from ``offset`` up to ``len(buf)`` bytes or ``size``; the bytes read."""
        if offset < 0:
            raise ValueError(f"read of inode {ino}: negative offset {offset}")
        mv = as_bytes(buf)
        n = max(0, min(mv.nbytes, size - offset))
        if n == 0:
            return 0
        lay = as_layout(layout)
        ios, spans = self._read_ios(ino, lay, offset, n, mv)
        res = self.chunks.batch_read(ios, missing_ok=True)
        for (a, b), view in zip(spans, res, strict=True):
            got = 0 if view is None else view.nbytes
            _zero(mv, a + got, b)  # a hole, or past the end of a short chunk: zeros up to the size
        return n

    def readv(self, requests: list[tuple[int, Any, int, int, int]]) -> list[memoryview]:
        """Many ranges of many files in one batched chunk read: ``(ino, layout, offset, length,
        size)`` each; returns a view of a fresh buffer per request, clipped at its size."""
        bufs: list[memoryview] = []
        ios: list[ReadIO] = []
        spans: list[tuple[memoryview, int, int]] = []
        for ino, layout, offset, length, size in requests:
            if offset < 0 or length < 0:
                raise ValueError(f"read of inode {ino}: negative offset {offset} or length {length}")
            n = max(0, min(length, size - offset))
            mv = fresh_buffer(n, populate=False)
            bufs.append(mv)
            if n:
                more, sp = self._read_ios(ino, as_layout(layout), offset, n, mv)
                ios += more
                spans += [(mv, a, b) for a, b in sp]
        if ios:
            big = [mv for mv in bufs if isinstance(mv.obj, mmap.mmap)]
            stop = threading.Event()
            pop = self._pool.submit(_populate, big, stop) if big else None
            try:
                res = self.chunks.batch_read(ios, missing_ok=True)
            finally:
                if pop is not None:  # done before a buffer can go (no advice on a stale address)
                    stop.set()
                    pop.result()
            for (mv, a, b), view in zip(spans, res, strict=True):
                _zero(mv, a + (0 if view is None else view.nbytes), b)
        return bufs

    @staticmethod
    def _read_ios(ino: int, lay: Layout, offset: int, n: int, mv: memoryview) -> tuple[list[ReadIO], list]:
        cs = lay.chunk_size
        ios, spans = [], []
        pos, end = offset, offset + n
        while pos < end:
            idx, off = divmod(pos, cs)
            piece = min(cs - off, end - pos)
            chain, chunk = lay.place(ino, idx)
            a = pos - offset
            ios.append(ReadIO(chain, chunk, off, piece, mv[a:a + piece]))
            spans.append((a, a + piece))
            pos += piece
        return ios, spans

    # -- writes --------------------------------------------------------------------------------------
    def write(self, ino: int, layout, offset: int, data) -> int:
        """Write ``data`` at ``offset``; returns the end of the write (``offset + len(data)``).

        Whole chunks go in parallel batches over the chains; a partial chunk merges with the
        chunk's existing bytes."""
        if offset < 0:
            raise ValueError(f"write of inode {ino}: negative offset {offset}")
        mv = as_bytes(data)
        n = mv.nbytes
        if n == 0:
            return offset
        lay = as_layout(layout)
        cs = lay.chunk_size
        whole: list[WriteIO] = []
        partial: list[tuple[int, int, memoryview, int]] = []
        pos, end = offset, offset + n
        while pos < end:
            idx, off = divmod(pos, cs)
            piece = min(cs - off, end - pos)
            chain, chunk = lay.place(ino, idx)
            view = mv[pos - offset:pos - offset + piece]
            if piece == cs:
                whole.append(WriteIO(chain, chunk, view))
            else:
                partial.append((chain, chunk, view, off))
            pos += piece
        # the whole chunks (or the first partial one) here, the partial ones meanwhile in helpers
        inline = None if whole else partial.pop(0)
        futs: list[Future] = [self._pool.submit(self._write_partial, *p) for p in partial]
        first: BaseException | None = None
        try:
            if whole:
                self.chunks.batch_write(whole)
            else:
                self._write_partial(*inline)
        except BaseException as exc:  # noqa: BLE001 - raised below, after the others finished
            first = exc
        for f in futs:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001
                first = first or exc
        if first is not None:
            raise first
        return end

    def _write_partial(self, chain: int, chunk: int, view: memoryview, off: int) -> None:
        self.chunks.write(chain, chunk, view, off, full=False)
