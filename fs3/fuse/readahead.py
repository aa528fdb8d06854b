"""Read-ahead for one inode of the mount: whole chunks prefetched ahead of a sequential reader,
kept in a small per-inode cache and handed to the kernel as memoryview slices (no per-request
copy, no per-4K work in Python).

A read at the offset where the previous one ended (or at 0) is sequential: the chunks it needs
are fetched (one batched read for the run of missing ones) and, when fewer than half of the
``window`` chunks ahead are cached or on their way, the next ones too, in the background. Other
reads fetch exactly their range (no amplification for random readers). Chunks behind the reader
are dropped. :meth:`invalidate` forgets everything (our own writes, a file that changed); a fetch
in flight at that moment is discarded when it lands (generation check).

Fetches are at most ``window / 2`` chunks and land in buffers of that size that are used again
once none of their chunks is cached any more (two spare ones at most): a fresh buffer per fetch
costs a memset or page faults on every byte read, which shows at a GiB per second.

Everything here runs in the trio thread of the mount; ``fetch`` is the coroutine doing the I/O in
a worker thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["ReadAhead"]

#: fetch(offset, length, size, into) -> a buffer of min(length, size - offset) bytes (a view of
#: ``into`` when given, else a new one)
Fetch = Callable[[int, int, int, bytearray | None], Awaitable[bytearray | memoryview]]
#: spawn(async_fn, *args): start a background task in the mount's nursery
Spawn = Callable[..., None]


class _InFlight:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class _Buf:
    __slots__ = ("data", "refs")

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.refs = 0  # cached chunks in it


class ReadAhead:
    def __init__(self, chunk_size: int, window: int, fetch: Fetch, spawn: Spawn) -> None:
        self.cs = chunk_size
        self.window = window
        self.batch = max(1, (window + 1) // 2)  # chunks per fetch at most
        self.fetch = fetch
        self.spawn = spawn
        self.chunks: dict[int, tuple[memoryview, _Buf]] = {}
        self.pending: dict[int, _InFlight] = {}
        self._free: list[_Buf] = []
        self.next_off = 0
        self.gen = 0

    def invalidate(self) -> None:
        for i in list(self.chunks):
            self._drop(i)
        self.pending.clear()
        self.gen += 1

    def _drop(self, i: int) -> None:
        _mv, b = self.chunks.pop(i)
        b.refs -= 1
        if not b.refs:
            self._release(b)

    def _release(self, b: _Buf) -> None:
        if len(self._free) < 2 and len(b.data) == self.batch * self.cs:
            self._free.append(b)

    def _take(self) -> _Buf:
        return self._free.pop() if self._free else _Buf(bytearray(self.batch * self.cs))

    async def read(self, off: int, n: int, size: int) -> memoryview | bytes:
        """Bytes ``[off, off + n)`` clipped at ``size``."""
        end = min(off + n, size)
        if off >= end:
            return b""
        sequential = off == self.next_off or off // self.cs in self.chunks or off // self.cs in self.pending
        self.next_off = end
        if not sequential or not self.window:
            buf = await self.fetch(off, end - off, size, None)
            return memoryview(buf)
        cs = self.cs
        i0, i1 = off // cs, (end - 1) // cs
        for k in [k for k in self.chunks if k < i0 - 1]:  # behind the reader
            self._drop(k)
        self._ensure(i0, i1, size, need_end=end)
        last = (size - 1) // cs
        ahead_to = min(last, i1 + self.window)
        j = i1 + 1
        while j <= ahead_to and (j in self.chunks or j in self.pending):
            j += 1
        if j <= ahead_to and j - i1 - 1 <= self.window // 2:
            self._ensure(j, ahead_to, size)
        for _ in range(3):
            for i in range(i0, i1 + 1):
                await self._get(i, size, end)
            # [Note: no view across an await] A chunk is handed out only when every chunk of the
            # request is cached at once, with no await until the reply: while this task waited,
            # another reader may have dropped a chunk and its buffer may be filling with others.
            parts = []
            for i in range(i0, i1 + 1):
                hit = self.chunks.get(i)
                if hit is None or not self._covers(i, hit[0], end):
                    break
                parts.append(hit[0][max(off, i * cs) - i * cs:min(end, (i + 1) * cs) - i * cs])
            else:
                return parts[0] if len(parts) == 1 else b"".join(parts)
        # chunks dropped again and again under us: read the range itself
        return memoryview(await self.fetch(off, end - off, size, None))

    def _covers(self, i: int, mv: memoryview, end: int) -> bool:
        """The cached chunk ``i`` holds the bytes up to ``end`` (it was read when the file was
        shorter otherwise)."""
        return mv.nbytes >= self.cs or i * self.cs + mv.nbytes >= end

    def _ensure(self, first: int, last: int, size: int, need_end: int = 0) -> None:
        """Start fetches for the chunks of [first, last] neither cached nor in flight (one fetch
        per run of missing ones)."""
        run: list[int] = []
        for i in range(first, last + 1):
            hit = self.chunks.get(i)
            if hit is not None and not self._covers(i, hit[0], min(need_end or size, size)):
                self._drop(i)
                hit = None
            if hit is None and i not in self.pending:
                run.append(i)
                if len(run) < self.batch:
                    continue
            if run:
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
        b = self._take()
        try:
            mv = memoryview(await self.fetch(first * cs, count * cs, size, b.data))
        except BaseException as exc:  # noqa: BLE001 - handed to the readers waiting for it
            f.error = exc
            mv = None
        try:
            if gen != self.gen or mv is None:
                self._release(b)
                if gen == self.gen:
                    for i in range(first, first + count):
                        if self.pending.get(i) is f:
                            del self.pending[i]
                return
            for i in range(first, first + count):
                if self.pending.get(i) is f:
                    del self.pending[i]
            for k, i in enumerate(range(first, first + count)):
                piece = mv[k * cs:(k + 1) * cs]
                if piece.nbytes:
                    if i in self.chunks:
                        self._drop(i)
                    self.chunks[i] = (piece, b)
                    b.refs += 1
            if not b.refs:
                self._release(b)
        finally:
            f.done.set()
            if isinstance(f.error, trio.Cancelled):
                raise f.error

    async def _get(self, i: int, size: int, end: int) -> None:
        """Wait until chunk ``i`` is cached (or its fetch failed: raised); it may be dropped again
        by the time the caller runs (see the note in :meth:`read`)."""
        hit = self.chunks.get(i)
        if hit is not None and self._covers(i, hit[0], end):
            return
        f = self.pending.get(i)
        if f is None:
            self._ensure(i, i, size, need_end=end)
            f = self.pending[i]
        await f.done.wait()
        if f.error is not None:
            raise f.error
