"""The fs3 file client: files and directories of the fs3 namespace from Python.

    import fs3
    with fs3.open("/data/shard-0001.bin", "wb") as f:   # the running local cluster, or
        f.write(payload)                                  # $HAI_CLUSTER_FILE / $FIREFLYER_CLUSTER
    fs3.read_batch([("/data/a", 0, 4096), ("/data/b", 8192, 4096)])

    fs = fs3.FileSystem("deploy/clusters/local.toml")    # an explicit cluster (and credential)
    fs.makedirs("/ckpt/step-100", exist_ok=True)

Names, sessions and lengths live in the meta service (:class:`fs3.meta.MetaClient`); bytes go
straight to the storage chains (:class:`fs3.client.filedata.FileData`): meta is never on the data
path. A :class:`File` is an ``io.RawIOBase`` binary file that buffers on its own:

- **writes** collect in a buffer of whole chunks (``buffer_chunks``, default 4) that is sent, once
  full, as parallel chunk batches over the file's chains while the caller goes on filling the next
  one (at most ``max_pending`` buffers in flight); a large aligned write goes out from the caller's
  memory without a copy. ``flush`` sends what is buffered, ``fsync`` also reports the end of the
  highest write to meta (``meta.sync``), as ``close`` does (``meta.close``). Writing nothing costs
  nothing on storage: a create + close is two meta calls.
- **reads** of a sequential reader fetch ``readahead_chunks`` at once (one batched chunk read);
  ``readinto`` a large buffer lands the chunks in it directly. A reader sees the size the file
  had when it was opened (close-to-open consistency) plus its own writes.

Errors are the ``fs3.errors`` MetaError classes, raised as instances that are also the matching
builtin ``OSError`` subclass (``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``,
...) with ``errno`` and ``filename`` set: see :func:`to_oserror`.
"""

from __future__ import annotations

import errno as _errno
import io
import os
import posixpath
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from network.transport import as_bytes

from ..errors import IsADirectory, MetaError
from ..meta import field
from .filedata import FileData, Layout, as_layout

__all__ = ["DirEntry", "File", "FileSystem", "chmod", "chown", "default_fs", "exists", "link", "listdir", "lstat",
           "makedirs", "mkdir", "open", "read_batch", "read_file", "readlink", "remove", "rename", "replace",
           "rmdir", "rmtree", "scandir", "set_default_fs", "stat", "statfs", "symlink", "to_oserror", "truncate",
           "unlink", "utime", "walk", "write_file"]

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755


# -- errors ------------------------------------------------------------------------------------------

_OSCLASSES: dict[type, type] = {}
_OSCLASSES_LOCK = threading.Lock()


def to_oserror(err: BaseException, path: str | None = None, path2: str | None = None) -> BaseException:
    """``err`` (an fs3 MetaError) as an instance of a class that is both its own class and the
    builtin ``OSError`` subclass of its errno (``NotFound`` -> also ``FileNotFoundError``), with
    ``errno``, ``strerror`` and ``filename`` (and ``filename2``) set; ``err`` itself when it has no
    errno or already is an OSError. ``except fs3.NotFound`` and ``except FileNotFoundError`` both
    catch it."""
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) or not isinstance(code, int):
        return err
    cls = type(err)
    with _OSCLASSES_LOCK:
        both = _OSCLASSES.get(cls)
        if both is None:
            builtin = type(OSError(code, ""))  # OSError picks the subclass of an errno
            try:
                both = type(cls.__name__, (cls, builtin), {"__module__": cls.__module__,
                                                           "__qualname__": cls.__qualname__})
            except TypeError:  # a layout conflict: fall back to the builtin class alone
                both = builtin
            _OSCLASSES[cls] = both
    msg = str(err) or os.strerror(code)
    args = (code, msg, path) if path2 is None else (code, msg, path, None, path2)
    out = both.__new__(both, *args)
    OSError.__init__(out, *args)
    for k, v in getattr(err, "__dict__", {}).items():
        if k not in ("errno", "strerror", "filename", "filename2"):
            try:
                setattr(out, k, v)
            except AttributeError:
                pass
    out.__cause__ = err
    out.__suppress_context__ = True
    return out


def _norm(path: str | os.PathLike) -> str:
    """An absolute, normalized fs3 path (``fs3:`` prefixes dropped; relative paths start at /)."""
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = p.decode()
    if p.startswith("fs3:"):
        p = p[4:]
    p = posixpath.normpath("/" + p.lstrip("/")) if p else "/"
    return "/" if p == "//" else p


# -- the file system ---------------------------------------------------------------------------------

class FileSystem:
    """One cluster's fs3 namespace: a meta client, a chunk client and the data path; thread-safe.

    ``cluster``: a cluster description (path), a loaded ``network.Cluster``, or None for the running
    local cluster (``network.find_cluster``). ``credential``: the principal (default: the job's
    ``$FIREFLYER_CREDENTIAL``, else the cluster key); ``user``: ``{"uid", "gids"}`` to act as
    (default: this process's; honoured for service principals only, a job's credential carries its
    own). ``read_sessions``: read opens take a meta session so
    that the file's chunks outlive an unlink until the close (POSIX; one more meta call per open)."""

    def __init__(self, cluster: Any = None, *, credential: Any = None, user: dict | None = None,
                 read_sessions: bool = True, buffer_chunks: int = 4, readahead_chunks: int = 4,
                 max_pending: int = 4, max_inflight: int = 16, meta: Any = None, chunks: Any = None) -> None:
        from network import Cluster, find_cluster, load_cluster

        from .chunks import ChunkClient

        if isinstance(cluster, Cluster):
            self.cluster = cluster
        else:
            self.cluster = load_cluster(find_cluster(cluster))
        if buffer_chunks < 1 or readahead_chunks < 0 or max_pending < 1:
            raise ValueError("buffer_chunks and max_pending must be >= 1, readahead_chunks >= 0")
        self.buffer_chunks = buffer_chunks
        self.readahead_chunks = readahead_chunks
        self.max_pending = max_pending
        self.read_sessions = read_sessions
        self._own: list[Any] = []
        if meta is None:
            from ..meta import MetaClient

            if user is None:  # act as this process's user (a service credential may assert anyone)
                user = {"uid": os.geteuid(), "gids": list(dict.fromkeys([os.getegid(), *os.getgroups()]))}
            meta = MetaClient(self.cluster, credential=credential, user=user)
            self._own.append(meta)
        self.meta = meta
        if chunks is None:
            chunks = ChunkClient.from_cluster(self.cluster, credential=credential, max_inflight=max_inflight,
                                              per_server=max(8, max_inflight // 2))
            self._own.append(chunks)
        self.chunks = chunks
        self.data = FileData(chunks)
        self._flushers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fs3-flush")
        self._lock = threading.Lock()
        self._readable: set[int] = set()  # inodes read_batch has opened for reading
        self._closed = False

    @property
    def client_id(self) -> str:
        return str(getattr(self.meta, "client_id", None) or self.chunks.client_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._flushers.shutdown(wait=True)
        self.data.close()
        for c in reversed(self._own):
            c.close()

    def __enter__(self) -> FileSystem:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- meta calls with errors as OSErrors ----------------------------------------------------------
    def _call(self, op: str, path: str | None, path2: str | None = None, /, **kw) -> Any:
        try:
            return getattr(self.meta, op)(**kw)
        except MetaError as exc:
            raise to_oserror(exc, path, path2) from None

    def _grant(self, reply: Any) -> None:
        """Hand the chunk client the data-path capability meta returned with an open (if any)."""
        cap = field(reply, "cap")
        if cap and hasattr(self.chunks, "grant"):
            self.chunks.grant(cap)

    # -- files ---------------------------------------------------------------------------------------
    def open(self, path: str | os.PathLike, mode: str = "rb", *, perm: int = DEFAULT_FILE_MODE,
             encoding: str | None = None, errors: str | None = None, newline: str | None = None,
             buffer_chunks: int | None = None) -> File | io.TextIOWrapper:
        """Open a file: "rb", "wb", "ab", "xb", "r+b", "w+b", "a+b" (binary :class:`File`), or the
        same without "b" for text (an ``io.TextIOWrapper`` over it). ``perm``: the mode bits of a
        file this creates."""
        text = "b" not in mode
        m = mode.replace("b", "").replace("t", "")
        if len(m) not in (1, 2) or m[0] not in "rwax" or (len(m) == 2 and m[1] != "+") or "b" in mode and "t" in mode:
            raise ValueError(f"fs3.open: invalid mode {mode!r} (r, w, a, x, each optionally with + and b or t)")
        p = _norm(path)
        kind, plus = m[0], m.endswith("+")
        readable, writable = kind == "r" or plus, kind != "r" or plus
        if kind == "r":
            rep = self._call("open", p, path=p, write=writable, trunc=False, session=writable or self.read_sessions)
        else:
            rep = self._call("create", p, path=p, mode=perm, excl=kind == "x", trunc=kind == "w", write=True)
        attrs = field(rep, "attrs")
        if field(attrs, "type") != "file":
            sess = field(rep, "session")
            if sess is not None:  # pragma: no cover - meta refuses to open a directory for writing
                self._call("close", p, ino=field(attrs, "ino"), session=sess, wrote=False, length=None, mtime=None)
            raise to_oserror(_isdir_error(p), p)
        self._grant(rep)
        f = File(self, p, mode if not text else mode.replace("t", "") + "b", attrs, field(rep, "session"),
                 readable=readable, writable=writable, append=kind == "a",
                 buffer_chunks=buffer_chunks or self.buffer_chunks)
        if text:
            return io.TextIOWrapper(f, encoding=encoding or "utf-8", errors=errors, newline=newline,
                                    line_buffering=False)
        return f

    def read_file(self, path: str | os.PathLike) -> bytes:
        with self.open(path, "rb") as f:
            return f.readall()

    def write_file(self, path: str | os.PathLike, data, *, perm: int = DEFAULT_FILE_MODE) -> int:
        with self.open(path, "wb", perm=perm) as f:
            return f.write(data)

    def read_batch(self, requests: list[tuple[str | os.PathLike, int, int]]) -> list[memoryview]:
        """Many ``(path, offset, length)`` ranges (of many files) in one batched stat and one batched
        chunk read; a view per range (of a fresh, writable buffer), clipped at its file's end.

        [Note: read_batch and permissions] The first read of a file by this FileSystem opens it
        for reading (``meta.open`` without a session: the read permission check, and a job's
        data-path capability); later batches only stat it, like reads through an open file
        descriptor, which keeps its access after a chmod."""
        paths = [_norm(r[0]) for r in requests]
        uniq = list(dict.fromkeys(paths))
        if not uniq:
            return []
        rep = self._call("batch_stat", uniq[0], paths=uniq)
        items = field(rep, "items", rep)
        by_path: dict[str, Any] = {}
        for p, it in zip(uniq, items, strict=True):
            if isinstance(it, BaseException):
                raise to_oserror(it, p)
            if field(it, "type") != "file":
                raise to_oserror(_isdir_error(p), p)
            ino = field(it, "ino")
            if ino not in self._readable:
                self._grant(self._call("open", p, ino=ino, write=False, trunc=False, session=False))
                with self._lock:
                    if len(self._readable) >= 1 << 16:
                        self._readable.clear()
                    self._readable.add(ino)
            by_path[p] = it
        reqs = []
        for p, (_, offset, length) in zip(paths, requests, strict=True):
            a = by_path[p]
            reqs.append((field(a, "ino"), field(a, "layout"), int(offset), int(length), field(a, "size")))
        return self.data.readv(reqs)

    # -- names ---------------------------------------------------------------------------------------
    def stat(self, path: str | os.PathLike, *, follow_symlinks: bool = True) -> Any:
        p = _norm(path)
        return self._call("stat", p, path=p, follow=follow_symlinks)

    def lstat(self, path: str | os.PathLike) -> Any:
        return self.stat(path, follow_symlinks=False)

    def exists(self, path: str | os.PathLike) -> bool:
        try:
            self.stat(path)
        except FileNotFoundError:
            return False
        return True

    def isdir(self, path: str | os.PathLike) -> bool:
        try:
            return field(self.stat(path), "type") == "dir"
        except FileNotFoundError:
            return False

    def isfile(self, path: str | os.PathLike) -> bool:
        try:
            return field(self.stat(path), "type") == "file"
        except FileNotFoundError:
            return False

    def _readdir(self, p: str, plus: bool) -> Iterator[dict]:
        after = ""
        while True:
            rep = self._call("readdir", p, path=p, after=after, limit=1000, plus=plus)
            entries = field(rep, "entries", [])
            yield from entries
            if not field(rep, "more") or not entries:
                return
            after = field(entries[-1], "name")

    def listdir(self, path: str | os.PathLike = "/") -> list[str]:
        p = _norm(path)
        return [field(e, "name") for e in self._readdir(p, False)]

    def scandir(self, path: str | os.PathLike = "/") -> Iterator[DirEntry]:
        p = _norm(path)
        for e in self._readdir(p, True):
            yield DirEntry(self, posixpath.join(p, field(e, "name")), e)

    def walk(self, top: str | os.PathLike = "/", topdown: bool = True,
             onerror=None) -> Iterator[tuple[str, list[str], list[str]]]:
        """Like ``os.walk`` (symlinks to directories are not followed)."""
        top = _norm(top)
        try:
            entries = list(self.scandir(top))
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            return
        dirs = [e.name for e in entries if e.is_dir()]
        files = [e.name for e in entries if not e.is_dir()]
        if topdown:
            yield top, dirs, files
            for d in dirs:
                yield from self.walk(posixpath.join(top, d), topdown, onerror)
        else:
            for d in dirs:
                yield from self.walk(posixpath.join(top, d), topdown, onerror)
            yield top, dirs, files

    def mkdir(self, path: str | os.PathLike, mode: int = DEFAULT_DIR_MODE, *, parents: bool = False,
              exist_ok: bool = False) -> Any:
        p = _norm(path)
        if parents and not exist_ok and p != "/":
            parent = posixpath.dirname(p)
            if parent != "/":
                self._call("mkdir", parent, path=parent, mode=mode, parents=True)
            parents = False
        try:
            return self._call("mkdir", p, path=p, mode=mode, parents=parents)
        except FileExistsError:
            if not exist_ok or not self.isdir(p):
                raise
            return self.stat(p)

    def makedirs(self, path: str | os.PathLike, mode: int = DEFAULT_DIR_MODE, exist_ok: bool = False) -> Any:
        return self.mkdir(path, mode, parents=True, exist_ok=exist_ok)

    def remove(self, path: str | os.PathLike) -> None:
        p = _norm(path)
        self._call("unlink", p, path=p)

    unlink = remove

    def rmdir(self, path: str | os.PathLike) -> None:
        p = _norm(path)
        self._call("rmdir", p, path=p)

    def rmtree(self, path: str | os.PathLike) -> int:
        """Remove a directory tree (or a file); the number of entries removed."""
        p = _norm(path)
        rep = self._call("remove", p, path=p, recursive=True)
        return int(rep if isinstance(rep, int) else field(rep, "removed", 0) or 0)

    def rename(self, src: str | os.PathLike, dst: str | os.PathLike, *, noreplace: bool = False) -> None:
        """Rename atomically; an existing destination file (or empty directory) is replaced unless
        ``noreplace``."""
        s, d = _norm(src), _norm(dst)
        self._call("rename", s, d, src=s, dst=d, noreplace=noreplace)

    def replace(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        self.rename(src, dst)

    def symlink(self, target: str, path: str | os.PathLike) -> Any:
        """Make ``path`` a symlink to ``target`` (as ``os.symlink(target, path)``)."""
        p = _norm(path)
        return self._call("symlink", p, path=p, target=os.fspath(target))

    def readlink(self, path: str | os.PathLike) -> str:
        p = _norm(path)
        rep = self._call("readlink", p, path=p)
        return rep if isinstance(rep, str) else field(rep, "target")

    def link(self, src: str | os.PathLike, dst: str | os.PathLike) -> Any:
        """A hard link ``dst`` to the file ``src``."""
        s, d = _norm(src), _norm(dst)
        return self._call("link", s, d, path=s, new_path=d)

    def truncate(self, path: str | os.PathLike, size: int) -> Any:
        p = _norm(path)
        return self._call("truncate", p, path=p, size=int(size))

    def chmod(self, path: str | os.PathLike, mode: int) -> Any:
        p = _norm(path)
        return self._call("setattr", p, path=p, mode=int(mode))

    def chown(self, path: str | os.PathLike, uid: int = -1, gid: int = -1) -> Any:
        p = _norm(path)
        kw = {k: int(v) for k, v in (("uid", uid), ("gid", gid)) if v is not None and v != -1}
        return self._call("setattr", p, path=p, **kw)

    def utime(self, path: str | os.PathLike, times: tuple[float, float] | None = None, *,
              ns: tuple[int, int] | None = None) -> Any:
        """Set atime and mtime (seconds in ``times`` or nanoseconds in ``ns``; neither: now)."""
        p = _norm(path)
        if ns is None and times is not None:
            ns = (int(times[0] * 1e9), int(times[1] * 1e9))
        if ns is None:
            import time

            ns = (time.time_ns(), time.time_ns())
        return self._call("setattr", p, path=p, atime=int(ns[0]), mtime=int(ns[1]))

    def statfs(self) -> dict:
        rep = self._call("statfs", "/")
        return dict(rep) if isinstance(rep, dict) else vars(rep)


def _isdir_error(path: str) -> BaseException:
    return IsADirectory(f"{path}: is a directory, not a file")


class DirEntry:
    """One entry of :meth:`FileSystem.scandir` (like ``os.DirEntry``)."""

    __slots__ = ("_attrs", "_fs", "ino", "name", "path", "type")

    def __init__(self, fs: FileSystem, path: str, entry: dict) -> None:
        self._fs = fs
        self.path = path
        self.name = field(entry, "name")
        self.ino = field(entry, "ino")
        self.type = field(entry, "type")
        self._attrs = field(entry, "attrs")

    def is_dir(self, *, follow_symlinks: bool = False) -> bool:
        if self.type == "symlink" and follow_symlinks:
            return self._fs.isdir(self.path)
        return self.type == "dir"

    def is_file(self, *, follow_symlinks: bool = False) -> bool:
        if self.type == "symlink" and follow_symlinks:
            return self._fs.isfile(self.path)
        return self.type == "file"

    def is_symlink(self) -> bool:
        return self.type == "symlink"

    def stat(self, *, follow_symlinks: bool = False) -> Any:
        if self._attrs is not None and not (follow_symlinks and self.type == "symlink"):
            return self._attrs
        return self._fs.stat(self.path, follow_symlinks=follow_symlinks)

    def __repr__(self) -> str:
        return f"<fs3.DirEntry {self.path!r} {self.type}>"


# -- files -------------------------------------------------------------------------------------------

class File(io.RawIOBase):
    """An open fs3 file (binary; see the module's note on buffering). Thread-safe."""

    def __init__(self, fs: FileSystem, path: str, mode: str, attrs: Any, session: Any, *, readable: bool,
                 writable: bool, append: bool, buffer_chunks: int) -> None:
        super().__init__()
        self.fs = fs
        self.name = path
        self.mode = mode
        self.attrs = attrs
        self.ino: int = field(attrs, "ino")
        self.layout: Layout = as_layout(field(attrs, "layout"))
        self.session = session
        self._readable, self._writable, self._append = readable, writable, append
        self._lock = threading.RLock()
        cs = self.layout.chunk_size
        self._cs = cs
        self._size: int = int(field(attrs, "size") or 0)  # as this handle knows it (its writes included)
        self._pos = self._size if append else 0
        self._end: int | None = None  # end of the highest write (reported to meta)
        self._wrote = False
        self._bufsize = buffer_chunks * cs
        self._wbuf = bytearray()
        self._wstart = 0
        self._pending: list[Future] = []
        self._error: BaseException | None = None
        self._ra = fs.readahead_chunks * cs
        self._cache: memoryview | None = None
        self._cstart = 0
        self._last_read_end = 0
        self._prefetch: tuple[int, int, Future] | None = None  # (start, length, the window's bytes)
        self._spare: list[bytearray] = []  # read-ahead buffers to reuse

    # -- io.RawIOBase --------------------------------------------------------------------------------
    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an fs3 file has no OS file descriptor (use the mount for one)")

    def isatty(self) -> bool:
        return False

    def _check(self, reading: bool | None = None) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed file {self.name}")
        if reading is True and not self._readable:
            raise io.UnsupportedOperation(f"{self.name}: not open for reading (mode {self.mode!r})")
        if reading is False and not self._writable:
            raise io.UnsupportedOperation(f"{self.name}: not open for writing (mode {self.mode!r})")

    def tell(self) -> int:
        self._check()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        with self._lock:
            self._check()
            if whence == io.SEEK_SET:
                pos = offset
            elif whence == io.SEEK_CUR:
                pos = self._pos + offset
            elif whence == io.SEEK_END:
                pos = self._size + offset
            else:
                raise ValueError(f"invalid whence {whence} (0, 1 or 2)")
            if pos < 0:
                raise OSError(_errno.EINVAL, f"negative seek position {pos}", self.name)
            self._pos = pos
            return pos

    @property
    def size(self) -> int:
        """The file's size as this handle knows it (the size at open, its own writes and truncates)."""
        return self._size

    # -- reads ---------------------------------------------------------------------------------------
    def readinto(self, b) -> int:
        with self._lock:
            self._check(True)
            self._drain()
            mv = as_bytes(b)
            pos, size = self._pos, self._size
            n = max(0, min(mv.nbytes, size - pos))
            if n == 0:
                return 0
            sequential = pos == self._last_read_end
            done = 0
            while done < n:
                p = pos + done
                c = self._cache
                if c is not None and self._cstart <= p < self._cstart + c.nbytes:
                    a = p - self._cstart
                    k = min(n - done, c.nbytes - a)
                    mv[done:done + k] = c[a:a + k]
                    done += k
                    continue
                pf = self._prefetch
                if pf is not None and pf[0] <= p < pf[0] + pf[1]:
                    self._prefetch = None
                    window = pf[2].result(timeout=2 * self.fs.chunks.timeout + 10)
                    self._recycle()
                    self._cache, self._cstart = window, pf[0]
                    continue
                rest = n - done
                if rest >= self._ra or self._ra == 0 or not (sequential or p == 0):
                    # large, or random: straight into the caller's buffer
                    self.fs.data.readinto(self.ino, self.layout, p, mv[done:n], size)
                    done = n
                    break
                # sequential and small: read ahead (one batched read of several chunks)
                self._recycle()
                self._cache, self._cstart = self._read_window(p, min(self._ra, size - p)), p
            self._pos = self._last_read_end = pos + n
            if sequential and 0 < n < self._ra:  # a large read brings its own parallelism
                self._start_prefetch(pos + n, n)
            return n

    def _forget_reads(self) -> None:
        """Drop what was read ahead (a write or truncate of this handle changed the file)."""
        self._cache = None
        self._prefetch = None  # a window in flight lands in its own buffer, unused

    def _recycle(self) -> None:
        """Keep the read-ahead buffer being replaced for the next window (memory the kernel has
        already mapped: a fresh buffer per window costs page faults on every byte received)."""
        if self._cache is not None:
            buf = self._cache.obj
            self._cache = None
            if len(self._spare) < 2:
                self._spare.append(buf)

    def _buffer(self, n: int) -> memoryview:
        while self._spare:
            buf = self._spare.pop()
            if len(buf) >= n:
                return memoryview(buf)[:n]
        return memoryview(bytearray(n))

    def _read_window(self, start: int, n: int, buf: memoryview | None = None) -> memoryview:
        buf = self._buffer(n) if buf is None else buf
        self.fs.data.readinto(self.ino, self.layout, start, buf, self._size)
        return buf

    def _start_prefetch(self, at: int, last: int) -> None:
        """[Note: sequential prefetch] A sequential reader of pieces smaller than the read-ahead gets
        the next window (four times its last read, the read-ahead at least, 64 MiB at most)
        fetched in the background while it works on what it has: the chains stay busy between its
        calls (one copy per byte; measured 1.3x on 1 MiB reads). Reads of the read-ahead or more go
        straight into the caller's buffer instead: a prefetch's copy made them slower."""
        c = self._cache
        if c is not None and self._cstart <= at < self._cstart + c.nbytes:
            at = self._cstart + c.nbytes  # what the cache holds needs no fetching
        window = min(max(self._ra, 4 * last), 64 << 20)
        if self._prefetch is not None or at >= self._size or at - self._pos > window:
            return  # one window in flight at a time, started when less than a window is left
        want = min(window, self._size - at)
        self._prefetch = (at, want, self.fs._flushers.submit(self._read_window, at, want, self._buffer(want)))

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        with self._lock:
            self._check(True)
            self._drain()
            n = max(0, min(size, self._size - self._pos))
            if n == 0:
                return b""
            buf = bytearray(n)
            got = self.readinto(buf)
            return bytes(buf) if got == n else bytes(buf[:got])

    def readall(self) -> bytes:
        with self._lock:
            self._check(True)
            self._drain()
            n = max(0, self._size - self._pos)
            if n == 0:
                return b""
            buf = bytearray(n)
            self.fs.data.readinto(self.ino, self.layout, self._pos, buf, self._size)
            self._pos += n
            self._last_read_end = self._pos
            return bytes(buf)

    # -- writes --------------------------------------------------------------------------------------
    def write(self, b) -> int:
        with self._lock:
            self._check(False)
            self._raise_pending()
            mv = as_bytes(b)
            n = mv.nbytes
            if n == 0:
                return 0
            if self._append:
                self._pos = self._size
            pos = self._pos
            self._forget_reads()
            if self._wbuf and pos != self._wstart + len(self._wbuf):
                self._send_buffer(whole_only=False)  # not contiguous with the buffer: send it first
            cs = self._cs
            if not self._wbuf and pos % cs == 0 and n >= self._bufsize:
                # large and aligned: whole chunks from the caller's memory (no copy), the rest buffered
                k = n - n % cs
                self._drain()  # nothing older may land after this
                self.fs.data.write(self.ino, self.layout, pos, mv[:k])
                self._note_write(pos + k)
                if k < n:
                    self._wstart = pos + k
                    self._wbuf += mv[k:]
            else:
                if not self._wbuf:
                    self._wstart = pos
                self._wbuf += mv
                if len(self._wbuf) >= self._bufsize:
                    self._send_buffer(whole_only=True)
            self._pos = pos + n
            self._size = max(self._size, pos + n)
            return n

    def _note_write(self, end: int) -> None:
        self._wrote = True
        self._end = end if self._end is None else max(self._end, end)

    def _send_buffer(self, whole_only: bool) -> None:
        """Send the buffer in the background (up to its last chunk boundary when ``whole_only``)."""
        start, buf = self._wstart, self._wbuf
        end = start + len(buf)
        cut = end - end % self._cs if whole_only else end
        if cut <= start:
            return
        k = cut - start
        if k < len(buf):
            self._wbuf = bytearray(buf[k:])  # the tail stays (it starts on a chunk boundary)
            self._wstart = cut
            payload = memoryview(buf)[:k]
        else:
            self._wbuf = bytearray()
            payload = memoryview(buf)
        while len(self._pending) >= self.fs.max_pending:
            self._wait_one()
        self._note_write(cut)
        self._pending.append(self.fs._flushers.submit(self.fs.data.write, self.ino, self.layout, start, payload))

    def _wait_one(self) -> None:
        f = self._pending.pop(0)
        try:
            f.result()
        except BaseException as exc:  # noqa: BLE001 - raised by _raise_pending
            self._error = self._error or exc

    def _raise_pending(self) -> None:
        self._pending = [f for f in self._pending if not f.done() or self._collect(f)]
        if self._error is not None:
            err, self._error = self._error, None
            raise _io_error(err, self.name)

    def _collect(self, f: Future) -> bool:
        exc = f.exception()
        if exc is not None:
            self._error = self._error or exc
        return False

    def _drain(self) -> None:
        """Send what is buffered and wait until every write of this handle is stored."""
        if self._wbuf:
            self._send_buffer(whole_only=False)
        while self._pending:
            self._wait_one()
        self._raise_pending()

    def flush(self) -> None:
        """Send buffered bytes to storage and wait for them (they are durable on every replica)."""
        with self._lock:
            if self.closed:
                return
            if self._writable:
                self._drain()

    def fsync(self) -> None:
        """Flush, then report the file's length to meta (``meta.sync``): others see the new size."""
        with self._lock:
            self._check()
            self.flush()
            if self.session is not None and self._writable:
                attrs = self.fs._call("sync", self.name, ino=self.ino, session=self.session, wrote=self._wrote,
                                      length=self._end)
                self._size = max(self._size, int(field(attrs, "size", self._size) or 0))

    def truncate(self, size: int | None = None) -> int:
        with self._lock:
            self._check(False)
            size = self._pos if size is None else int(size)
            if size < 0:
                raise OSError(_errno.EINVAL, f"negative size {size}", self.name)
            self._drain()
            kw = {"session": self.session} if self.session is not None else {}
            self.fs._call("truncate", self.name, ino=self.ino, size=size, **kw)
            self._size = size
            self._forget_reads()
            if self._end is not None and self._end > size:
                self._end = size
            return size

    def close(self) -> None:
        if self.closed:
            return
        with self._lock:
            if self.closed:
                return
            err: BaseException | None = None
            try:
                if self._writable:
                    self._drain()
            except BaseException as exc:  # noqa: BLE001 - the session is closed anyway, then raised
                err = exc
            try:
                if self.session is not None:
                    later = getattr(self.fs.meta, "close_later", None)
                    if not self._wrote and err is None and later is not None:
                        later(self.ino, self.session)  # nothing to report: no need to wait
                    else:
                        self.fs._call("close", self.name, ino=self.ino, session=self.session, wrote=self._wrote,
                                      length=self._end, mtime=None)
            finally:
                self._forget_reads()
                super().close()
            if err is not None:
                raise err

    def __repr__(self) -> str:
        return f"<fs3.File {self.name!r} mode={self.mode!r} ino={self.ino}>"


def _io_error(exc: BaseException, path: str) -> BaseException:
    """A failed background write, raised at the next call on the file."""
    if isinstance(exc, OSError):
        return exc
    out = OSError(_errno.EIO, f"write to {path} failed: {exc}", path)
    out.__cause__ = exc
    return out


# -- the module-level API (a default FileSystem, made on first use) -------------------------------

_default: FileSystem | None = None
_default_lock = threading.Lock()


def default_fs() -> FileSystem:
    """The FileSystem of ``fs3.open`` and friends: the running local cluster, or the one named by
    ``$HAI_CLUSTER_FILE`` / ``$FIREFLYER_CLUSTER`` (``network.find_cluster``)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = FileSystem()
        return _default


def set_default_fs(fs: FileSystem | None) -> FileSystem | None:
    """Make ``fs`` the default FileSystem (None: make one on next use); returns the previous one."""
    global _default
    with _default_lock:
        old, _default = _default, fs
        return old


def open(path, mode: str = "rb", **kw):  # noqa: A001 - fs3.open, like io.open
    return default_fs().open(path, mode, **kw)


def stat(path, *, follow_symlinks: bool = True):
    return default_fs().stat(path, follow_symlinks=follow_symlinks)


def lstat(path):
    return default_fs().lstat(path)


def exists(path) -> bool:
    return default_fs().exists(path)


def listdir(path="/") -> list[str]:
    return default_fs().listdir(path)


def scandir(path="/"):
    return default_fs().scandir(path)


def walk(top="/", topdown: bool = True, onerror=None):
    return default_fs().walk(top, topdown, onerror)


def mkdir(path, mode: int = DEFAULT_DIR_MODE, *, parents: bool = False, exist_ok: bool = False):
    return default_fs().mkdir(path, mode, parents=parents, exist_ok=exist_ok)


def makedirs(path, mode: int = DEFAULT_DIR_MODE, exist_ok: bool = False):
    return default_fs().makedirs(path, mode, exist_ok)


def remove(path) -> None:
    default_fs().remove(path)


def unlink(path) -> None:
    default_fs().remove(path)


def rmdir(path) -> None:
    default_fs().rmdir(path)


def rmtree(path) -> int:
    return default_fs().rmtree(path)


def rename(src, dst, *, noreplace: bool = False) -> None:
    default_fs().rename(src, dst, noreplace=noreplace)


def replace(src, dst) -> None:
    default_fs().replace(src, dst)


def symlink(target, path):
    return default_fs().symlink(target, path)


def readlink(path) -> str:
    return default_fs().readlink(path)


def link(src, dst):
    return default_fs().link(src, dst)


def truncate(path, size: int):
    return default_fs().truncate(path, size)


def chmod(path, mode: int):
    return default_fs().chmod(path, mode)


def chown(path, uid: int = -1, gid: int = -1):
    return default_fs().chown(path, uid, gid)


def utime(path, times=None, *, ns=None):
    return default_fs().utime(path, times, ns=ns)


def statfs() -> dict:
    return default_fs().statfs()


def read_batch(requests) -> list[memoryview]:
    return default_fs().read_batch(requests)


def read_file(path) -> bytes:
    return default_fs().read_file(path)


def write_file(path, data, **kw) -> int:
    return default_fs().write_file(path, data, **kw)

