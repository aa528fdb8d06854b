"""What the mount keeps per inode and per open file or directory.

- :class:`Inode`: one per inode the kernel knows (lookup count > 0) or has open: its layout, the
  size meta last reported, the end of the bytes written here since (``local_end``: the size the
  kernel must see before meta knows it), the write buffer and the ordered chain of flushes, the
  read-ahead cache, the (mtime, size) the kernel's page cache holds (``cached``: open keeps the
  cache when meta still reports that) and the one its attributes hold (``kattr``: open makes it
  ask again when meta reports another).
- :class:`FileHandle`: one per open(2): the meta session, whether it writes, the end of its
  highest write (reported on sync and close), the user who opened it.
- :class:`DirHandle`: the entries of a directory listed so far (readdir offsets index them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from .readahead import ReadAhead
from .wbuf import WriteBuffer

__all__ = ["DirHandle", "FileHandle", "Inode"]


class Inode:
    __slots__ = ("cached", "error", "flushes", "handles", "ino", "kattr", "layout", "local_end", "lookups", "mtime",
                 "ra", "size", "wbuf")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.lookups = 0
        self.handles = 0
        self.layout: Any = None
        self.size = 0
        self.local_end = 0
        self.mtime = 0  # ns of the last write here while open
        self.cached: tuple[int, int] | None = None
        self.kattr: tuple[int, int] | None = None  # the (mtime, size) last handed to the kernel
        self.wbuf = WriteBuffer()
        self.flushes: deque[trio.Event] = deque()  # flushes queued or running, oldest first (set when done)
        self.error: BaseException | None = None  # a background flush's failure, for the next caller
        self.ra: ReadAhead | None = None

    @property
    def known_size(self) -> int:
        return max(self.size, self.local_end, self.wbuf.end)

    @property
    def idle(self) -> bool:
        return not self.lookups and not self.handles and not self.wbuf and not self.flushes


@dataclass
class FileHandle:
    fh: int
    ino: int
    session: Any
    write: bool
    user: dict | None
    append: bool = False
    unsynced: bool = False  # written since the last meta.sync
    end: int = 0  # the end of the highest write through this handle
    mtime: int | None = None  # ns of the last write


@dataclass
class DirHandle:
    fh: int
    ino: int
    user: dict | None
    entries: list = field(default_factory=list)  # (name bytes, attrs)
    more: bool = True
