"""Read-ahead for one inode of the mount: whole chunks prefetched ahead of a sequential reader,
kept in a small per-inode cache and handed to the kernel as memoryview slices (no per-request
copy, no per-4K work in Python).

A read at the offset where the previous one ended (or at 0) is sequential: the chunks it needs
are fetched (one batched read for the run of missing ones) and, when fewer than half of the
``window`` chunks ahead are cached or on their way, the next ones too, in the background. Other
reads fetch exactly their range (no amplification for random readers). Chunks behind the reader
are dropped. :meth:`invalidate` forgets everything (our own writes, a file that changed); a fetch
in flight at that moment is discarded when it lands (generation check).

Everything here runs in the trio thread of the mount; ``fetch`` is the coroutine doing the I/O in
a worker thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["ReadAhead"]

#: fetch(offset, length, size) -> a buffer of min(length, size - offset) bytes
Fetch = Callable[[int, int, int], Awaitable[bytearray | bytes]]
#: spawn(async_fn, *args): start a background task in the mount's nursery
Spawn = Callable[..., None]


class _InFlight:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class ReadAhead:
    def __init__(self, chunk_size: int, window: int, fetch: Fetch, spawn: Spawn) -> None:
        self.cs = chunk_size
        self.window = window
        self.fetch = fetch
        self.spawn = spawn
        self.chunks: dict[int, memoryview] = {}
        self.pending: dict[int, _InFlight] = {}
        self.next_off = 0
        self.gen = 0
        self.stats = {"hits": 0, "misses": 0, "prefetched": 0, "direct": 0}

    def invalidate(self) -> None:
        self.chunks.clear()
        self.pending.clear()
        self.gen += 1

    def cached_bytes(self) -> int:
        return sum(v.nbytes for v in self.chunks.values())

    async def read(self, off: int, n: int, size: int) -> memoryview | bytes:
        """Bytes ``[off, off + n)`` clipped at ``size``."""
        end = min(off + n, size)
        if off >= end:
            return b""
        sequential = off == self.next_off or off // self.cs in self.chunks or off // self.cs in self.pending
        self.next_off = end
        if not sequential or not self.window:
            self.stats["direct"] += 1
            buf = await self.fetch(off, end - off, size)
            return memoryview(buf)
        cs = self.cs
        i0, i1 = off // cs, (end - 1) // cs
        for k in [k for k in self.chunks if k < i0 - 1]:  # behind the reader
            del self.chunks[k]
        self._ensure(i0, i1, size, need_end=end)
        last = (size - 1) // cs
        ahead_to = min(last, i1 + self.window)
        j = i1 + 1
        while j <= ahead_to and (j in self.chunks or j in self.pending):
            j += 1
        if j <= ahead_to and j - i1 - 1 <= self.window // 2:
            self._ensure(j, ahead_to, size)
        parts = []
        for i in range(i0, i1 + 1):
            mv = await self._get(i, size, end)
            a = max(off, i * cs) - i * cs
            b = min(end, (i + 1) * cs) - i * cs
            parts.append(mv[a:b])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _covers(self, i: int, mv: memoryview, end: int) -> bool:
        """The cached chunk ``i`` holds the bytes up to ``end`` (it was read when the file was
        shorter otherwise)."""
        return mv.nbytes >= self.cs or i * self.cs + mv.nbytes >= end

    def _ensure(self, first: int, last: int, size: int, need_end: int = 0) -> None:
        """Start fetches for the chunks of [first, last] neither cached nor in flight (one fetch
        per run of missing ones)."""
        run: list[int] = []
        for i in range(first, last + 1):
            mv = self.chunks.get(i)
            if mv is not None and not self._covers(i, mv, min(need_end or size, size)):
                del self.chunks[i]
                mv = None
            if mv is None and i not in self.pending:
                run.append(i)
            elif run:
                self._start(run[0], len(run), size)
                run = []
        if run:
            self._start(run[0], len(run), size)

    def _start(self, first: int, count: int, size: int) -> None:
        f = _InFlight()
        for i in range(first, first + count):
            self.pending[i] = f
        self.spawn(self._fetch, first, count, size, f, self.gen)

    async def _fetch(self, first: int, count: int, size: int, f: _InFlight, gen: int) -> None:
        cs = self.cs
        try:
            buf = await self.fetch(first * cs, count * cs, size)
        except BaseException as exc:  # noqa: BLE001 - handed to the readers waiting for it
            f.error = exc
            buf = None
        try:
            if gen != self.gen:
                return
            for i in range(first, first + count):
                if self.pending.get(i) is f:
                    del self.pending[i]
            if buf is not None:
                mv = memoryview(buf)
                for k, i in enumerate(range(first, first + count)):
                    piece = mv[k * cs:(k + 1) * cs]
                    if piece.nbytes:
                        self.chunks[i] = piece
                self.stats["prefetched"] += count
        finally:
            f.done.set()
            if isinstance(f.error, trio.Cancelled):
                raise f.error

    async def _get(self, i: int, size: int, end: int) -> memoryview:
        for _ in range(3):
            mv = self.chunks.get(i)
            if mv is not None and self._covers(i, mv, end):
                self.stats["hits"] += 1
                return mv
            f = self.pending.get(i)
            if f is None:
                self.stats["misses"] += 1
                self._ensure(i, i, size, need_end=end)
                f = self.pending[i]
            await f.done.wait()
            if f.error is not None:
                raise f.error
        # invalidated again and again while waiting (writes racing the read): read it directly
        buf = await self.fetch(i * self.cs, self.cs, size)
        return memoryview(buf)
