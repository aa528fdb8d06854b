"""The storage seam under fs3.formats and fs3.checkpoint: the same code reads and writes local files
(``LocalBackend``: ``os.pread``/``os.preadv`` in a small thread pool) or fs3 files
(``Fs3Backend``: an ``fs3.FileSystem``, batched reads through ``FileSystem.read_batch``).

``backend_for(fs)`` picks one: ``None`` -> local files; an object with ``read_batch`` (an
``fs3.FileSystem``) -> fs3; a zero-argument callable -> a factory called in every process that
uses it (a DataLoader worker calls it again after the fork, so no connection crosses a fork);
an existing ``Backend`` -> itself.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

#: (path, offset, length)
Range = tuple[str, int, int]

_POOL_THREADS = 8


class Backend:
    """What the formats need from a file system. Paths are strings in the backend's namespace."""

    name = "abstract"

    def size(self, path: str) -> int:
        raise NotImplementedError

    def isdir(self, path: str) -> bool:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def listdir(self, path: str) -> list[str]:
        raise NotImplementedError

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes | memoryview]:
        """One batched read of every (path, offset, length); a range past the end comes back short."""
        raise NotImplementedError

    def readinto_ranges(self, ranges: Sequence[tuple[str, int, memoryview]]) -> list[int]:
        """Fill each writable byte buffer from (path, offset); returns the bytes read into each."""
        got = self.read_ranges([(p, off, len(buf)) for p, off, buf in ranges])
        out = []
        for (_, _, buf), data in zip(ranges, got, strict=True):
            n = len(data)
            buf[:n] = data
            out.append(n)
        return out

    def open_write(self, path: str) -> BinaryIO:
        """A new (truncated) binary file for writing; ``sync(f)`` makes it durable."""
        raise NotImplementedError

    def sync(self, f: BinaryIO) -> None:
        raise NotImplementedError

    def replace(self, src: str, dst: str) -> None:
        """Rename ``src`` over ``dst`` atomically."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        """Remove a file; a missing one is not an error."""
        raise NotImplementedError

    def makedirs(self, path: str) -> None:
        raise NotImplementedError

    def join(self, *parts: str) -> str:
        raise NotImplementedError

    def split(self, path: str) -> tuple[str, str]:
        raise NotImplementedError

    def for_this_process(self) -> Backend:
        """A backend usable in the current process (after a fork: fresh files and connections)."""
        return self

    def close(self) -> None:
        """Release files and connections this backend opened itself."""


class LocalBackend(Backend):
    """Local files: descriptors cached per path and per process, reads in a thread pool
    (``os.pread`` releases the GIL, so a batch reads in parallel like ffrecord's libaio batch)."""

    name = "local"

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # inherited across a fork: the parent's pool and fds are not ours
            self._pid = os.getpid()
            self._fds = {}
            self._pool = None
            self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        self._check_pid()
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self._fds[path] = fd
            return fd

    def _executor(self) -> ThreadPoolExecutor:
        self._check_pid()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="fs3-formats-io")
            return self._pool

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def _pread(self, path: str, offset: int, length: int) -> bytes:
        fd = self._fd(path)
        parts = []
        while length > 0:
            b = os.pread(fd, min(length, 1 << 30), offset)
            if not b:
                break
            parts.append(b)
            offset += len(b)
            length -= len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _preadinto(self, path: str, offset: int, buf: memoryview) -> int:
        fd = self._fd(path)
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done: done + (1 << 30)]], offset + done)
            if n <= 0:
                break
            done += n
        return done

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes | memoryview]:
        if len(ranges) <= 2:
            return [self._pread(p, off, n) for p, off, n in ranges]
        return list(self._executor().map(lambda r: self._pread(*r), ranges))

    def readinto_ranges(self, ranges: Sequence[tuple[str, int, memoryview]]) -> list[int]:
        if len(ranges) <= 1:
            return [self._preadinto(p, off, buf) for p, off, buf in ranges]
        return list(self._executor().map(lambda r: self._preadinto(*r), ranges))

    def open_write(self, path: str) -> BinaryIO:
        return open(path, "wb")  # noqa: SIM115 (the caller closes it)

    def sync(self, f: BinaryIO) -> None:
        f.flush()
        os.fsync(f.fileno())

    def pwrite_pieces(self, path: str, f: BinaryIO, pieces: Sequence[tuple[int, memoryview]]) -> None:
        """Write (offset, bytes) pieces of ``f`` in parallel (local files only)."""
        fd = f.fileno()

        def put(piece: tuple[int, memoryview]) -> None:
            off, data = piece
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], off + done)

        for _ in self._executor().map(put, pieces):
            pass

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)
        try:  # make the rename durable
            dfd = os.open(os.path.dirname(os.path.abspath(dst)) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:  # some file systems refuse fsync on a directory
            log.debug("fsync of the directory of %s: %s", dst, exc)

    def remove(self, path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def makedirs(self, path: str) -> None:
        if path:
            os.makedirs(path, exist_ok=True)

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def split(self, path: str) -> tuple[str, str]:
        return os.path.split(path)

    def for_this_process(self) -> Backend:
        self._check_pid()
        return self

    def close(self) -> None:
        if self._pid != os.getpid():
            self._fds, self._pool = {}, None
            return
        with self._lock:
            fds, self._fds = self._fds, {}
            pool, self._pool = self._pool, None
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        if pool is not None:
            pool.shutdown(wait=False)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class Fs3Backend(Backend):
    """fs3 files through an ``fs3.FileSystem`` (or anything with its API: ``read_batch``,
    ``stat``, ``listdir``, ``open``, ``rename``/``replace``, ``remove``, ``makedirs``).

    ``factory`` (optional) makes a fresh FileSystem; it is called again in a forked child so that
    no RPC connection is shared across a fork. Without one, a child re-creates the FileSystem as
    ``type(fs)(fs.cluster)`` when the object has a ``cluster`` attribute, else reuses it."""

    name = "fs3"

    def __init__(self, fs: Any = None, factory: Callable[[], Any] | None = None) -> None:
        if fs is None and factory is None:
            raise ValueError("Fs3Backend needs an fs3.FileSystem or a factory that makes one")
        self._factory = factory
        self._fs = fs if fs is not None else factory()  # type: ignore[misc]
        #: this backend made ``_fs`` (a factory, a rebuild after a fork, unpickling): close() closes it
        self._owned = fs is None
        self._pid = os.getpid()

    @property
    def fs(self) -> Any:
        if self._pid != os.getpid():
            old = self._fs
            self._fs = self._remake()
            self._owned = self._fs is not old
            self._pid = os.getpid()
        return self._fs

    def _remake(self) -> Any:
        if self._factory is not None:
            return self._factory()
        cluster = getattr(self._fs, "cluster", None)
        if cluster is not None:
            try:
                return type(self._fs)(cluster)
            except TypeError:
                pass
        return self._fs

    def close(self) -> None:
        """Close the FileSystem this backend made itself (never one the caller passed in, nor the
        parent's after a fork)."""
        if self._owned and self._pid == os.getpid():
            self._owned = False
            self._fs.close()

    def size(self, path: str) -> int:
        return int(self.fs.stat(path).size)

    def isdir(self, path: str) -> bool:
        return bool(self.fs.isdir(path))

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def listdir(self, path: str) -> list[str]:
        return list(self.fs.listdir(path))

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes | memoryview]:
        if not ranges:
            return []
        return list(self.fs.read_batch([(p, int(off), int(n)) for p, off, n in ranges]))

    def open_write(self, path: str) -> BinaryIO:
        return self.fs.open(path, "wb")

    def sync(self, f: BinaryIO) -> None:
        f.flush()
        fsync = getattr(f, "fsync", None)
        if fsync is not None:
            fsync()

    def replace(self, src: str, dst: str) -> None:
        self.fs.replace(src, dst)

    def remove(self, path: str) -> None:
        try:
            self.fs.remove(path)
        except FileNotFoundError:  # fs3's NotFound is one too
            pass

    def makedirs(self, path: str) -> None:
        if path and path != "/":
            self.fs.makedirs(path, exist_ok=True)

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def split(self, path: str) -> tuple[str, str]:
        return posixpath.split(path)

    def for_this_process(self) -> Backend:
        _ = self.fs
        return self

    def __getstate__(self) -> dict:
        # a FileSystem holds connections: it does not travel; the receiving process makes its own
        return {"factory": self._factory, "cluster": getattr(self._fs, "cluster", None),
                "fs_type": type(self._fs) if self._factory is None else None}

    def __setstate__(self, state: dict) -> None:
        self._factory = state["factory"]
        self._pid = os.getpid()
        self._owned = True
        if self._factory is not None:
            self._fs = self._factory()
        elif state.get("fs_type") is not None:
            self._fs = state["fs_type"](state["cluster"])
        else:
            raise ValueError("an Fs3Backend without a factory or a cluster cannot be sent to another process")


def backend_for(fs: Any = None) -> Backend:
    """The backend for ``fs``: None -> local files; a Backend -> itself; an fs3.FileSystem (has
    ``read_batch``) -> fs3; a zero-argument callable -> fs3 with that factory."""
    if fs is None:
        return LocalBackend()
    if isinstance(fs, Backend):
        return fs
    if hasattr(fs, "read_batch"):
        return Fs3Backend(fs)
    if callable(fs):
        return Fs3Backend(factory=fs)
    raise TypeError(f"fs must be None (local files), an fs3.FileSystem or a factory of one, not {type(fs).__name__}")
