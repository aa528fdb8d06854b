"""The write buffer of one inode in the mount: the bytes written through the kernel and not yet sent
to storage, as a few extents.

Sequential writes (the common case: the kernel hands a writer's stream over in requests of up to
1 MiB) grow one extent by appending the request's bytes object to its list of pieces (no copy
here; the pieces are joined once, when the extent is sent); a write inside the last extent is
merged into it; a write that overlaps any other buffered extent is not merged: the caller flushes
first (so extents never overlap and their order does not matter). :meth:`take_whole` hands out
the chunk-aligned head of a long extent (whole chunks go to storage without merging) and keeps the
tail.
"""

from __future__ import annotations

__all__ = ["WriteBuffer"]

MAX_EXTENTS = 64


class _Extent:
    __slots__ = ("n", "offset", "pieces")

    def __init__(self, offset: int, data) -> None:
        self.offset = offset
        self.pieces: list = [data]
        self.n = len(data)

    @property
    def end(self) -> int:
        return self.offset + self.n

    def joined(self) -> bytes | bytearray:
        if len(self.pieces) == 1:
            return self.pieces[0]
        out = b"".join(self.pieces)
        self.pieces = [out]
        return out

    def overwrite(self, offset: int, data) -> None:
        """Write ``data`` at ``offset``, which lies in [self.offset, self.end]."""
        if offset == self.end:
            self.pieces.append(data)
            self.n += len(data)
            return
        buf = self.joined()
        if not isinstance(buf, bytearray):
            buf = bytearray(buf)
        a = offset - self.offset
        buf[a:a + len(data)] = data
        self.pieces = [buf]
        self.n = len(buf)


class WriteBuffer:
    __slots__ = ("extents", "nbytes")

    def __init__(self) -> None:
        self.extents: list[_Extent] = []
        self.nbytes = 0

    def __bool__(self) -> bool:
        return self.nbytes > 0

    @property
    def end(self) -> int:
        """The end of the highest buffered byte (0 when empty)."""
        return max((e.end for e in self.extents), default=0)

    def add(self, offset: int, data) -> bool:
        """Buffer ``data`` (bytes: kept as it is, not copied) at ``offset``; False (nothing
        buffered) when it overlaps an extent it cannot be merged into or the buffer holds too many
        extents: flush, then add again."""
        n = len(data)
        if not n:
            return True
        if self.extents:
            last = self.extents[-1]
            if last.offset <= offset <= last.end and not self._overlaps(offset, offset + n, skip=last):
                before = last.n
                last.overwrite(offset, data)
                self.nbytes += last.n - before
                return True
            if self._overlaps(offset, offset + n) or len(self.extents) >= MAX_EXTENTS:
                return False
        self.extents.append(_Extent(offset, data))
        self.nbytes += n
        return True

    def _overlaps(self, lo: int, hi: int, skip: _Extent | None = None) -> bool:
        return any(e is not skip and e.offset < hi and lo < e.end for e in self.extents)

    def take(self) -> list[tuple[int, bytes | bytearray]]:
        """Everything buffered (the buffer is empty afterwards)."""
        out = [(e.offset, e.joined()) for e in self.extents]
        self.extents = []
        self.nbytes = 0
        return out

    def take_whole(self, chunk_size: int) -> list[tuple[int, bytes | bytearray | memoryview]]:
        """The whole chunks at the start of the last extent (with any bytes before the first chunk
        boundary); the part of the last chunk that is not whole stays buffered. The other extents
        go too."""
        if not self.extents:
            return []
        last = self.extents[-1]
        cut = last.end // chunk_size * chunk_size - last.offset  # bytes up to the last chunk boundary
        out = [(e.offset, e.joined()) for e in self.extents[:-1]]
        if cut <= 0:
            self.extents = [last]
        elif cut >= last.n:
            out.append((last.offset, last.joined()))
            self.extents = []
        else:
            mv = memoryview(last.joined())  # the head goes out as a view; the tail is copied
            out.append((last.offset, mv[:cut]))
            self.extents = [_Extent(last.offset + cut, bytes(mv[cut:]))]
        self.nbytes = sum(e.n for e in self.extents)
        return out

    def truncate(self, size: int) -> None:
        """Drop the buffered bytes at or past ``size`` (a truncate happened)."""
        keep = []
        for e in self.extents:
            if e.offset >= size:
                continue
            if e.end > size:
                e.pieces = [e.joined()[:size - e.offset]]
                e.n = size - e.offset
            keep.append(e)
        self.extents = keep
        self.nbytes = sum(e.n for e in keep)
