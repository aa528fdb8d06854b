"""The write buffer of one inode in the mount: the bytes written through the kernel and not yet sent
to storage, as a few extents (offset, bytearray).

Sequential writes (the common case: the kernel hands a writer's stream over in requests of up to
1 MiB) grow one extent; a write inside or at the end of the last extent is merged into it; a write
that overlaps any other buffered extent is not merged: the caller flushes first (so extents never
overlap and their order does not matter). :meth:`take_whole` hands out the chunk-aligned head of a
long extent (whole chunks go to storage without merging) and keeps the tail.
"""

from __future__ import annotations

__all__ = ["WriteBuffer"]

MAX_EXTENTS = 64


class WriteBuffer:
    __slots__ = ("extents", "nbytes")

    def __init__(self) -> None:
        self.extents: list[list] = []  # [offset, bytearray]
        self.nbytes = 0

    def __bool__(self) -> bool:
        return self.nbytes > 0

    @property
    def end(self) -> int:
        """The end of the highest buffered byte (0 when empty)."""
        return max((o + len(b) for o, b in self.extents), default=0)

    def add(self, offset: int, data) -> bool:
        """Buffer ``data`` at ``offset``; False (nothing buffered) when it overlaps an extent it
        cannot be merged into or the buffer holds too many extents: flush, then add again."""
        n = len(data)
        if not n:
            return True
        if self.extents:
            last = self.extents[-1]
            lo, buf = last
            hi = lo + len(buf)
            if lo <= offset <= hi and not self._overlaps(offset, offset + n, skip=len(self.extents) - 1):
                a = offset - lo
                grow = max(0, a + n - len(buf))
                buf[a:a + n] = data  # bytearray slice assignment: overwrites and extends
                self.nbytes += grow
                return True
            if self._overlaps(offset, offset + n) or len(self.extents) >= MAX_EXTENTS:
                return False
        self.extents.append([offset, bytearray(data)])
        self.nbytes += n
        return True

    def _overlaps(self, lo: int, hi: int, skip: int = -1) -> bool:
        return any(i != skip and o < hi and lo < o + len(b) for i, (o, b) in enumerate(self.extents))

    def take(self) -> list[tuple[int, bytearray]]:
        """Everything buffered (the buffer is empty afterwards)."""
        out = [(o, b) for o, b in self.extents]
        self.extents = []
        self.nbytes = 0
        return out

    def take_whole(self, chunk_size: int) -> list[tuple[int, bytearray | memoryview]]:
        """The whole chunks at the start of the last extent (with any bytes before the first chunk
        boundary); the part of the last chunk that is not whole stays buffered. The other extents
        go too."""
        if not self.extents:
            return []
        lo, buf = self.extents[-1]
        cut = (lo + len(buf)) // chunk_size * chunk_size - lo  # bytes up to the last chunk boundary
        out = [(o, b) for o, b in self.extents[:-1]]
        if cut <= 0:
            self.extents = [self.extents[-1]]
        elif cut >= len(buf):
            out.append((lo, buf))
            self.extents = []
        else:
            mv = memoryview(buf)  # the head goes out as a view (the old buffer is no longer ours)
            out.append((lo, mv[:cut]))
            self.extents = [[lo + cut, bytearray(mv[cut:])]]
        self.nbytes = sum(len(b) for _o, b in self.extents)
        return out

    def truncate(self, size: int) -> None:
        """Drop the buffered bytes at or past ``size`` (a truncate happened)."""
        keep = []
        for o, b in self.extents:
            if o >= size:
                continue
            if o + len(b) > size:
                del b[size - o:]
            keep.append([o, b])
        self.extents = keep
        self.nbytes = sum(len(b) for _o, b in keep)
