"""One storage target's chunk store: a file per chunk version, installed by write-then-rename.

On disk, under the target's directory::

    chunks/<chain>/<chunk id: 16 hex>.<version>.c   the committed version
    chunks/<chain>/<chunk id: 16 hex>.<version>.p   a pending version (a write in flight)
    chunks/.tmp-*                                   a file being written (removed at start)
    chunks/.spare-*                                 a replaced version's file, kept for reuse

Each file is a 64-byte header then the chunk's bytes. The header holds a magic, the chain,
the chunk id, the version, the chain version of the write, the length, the CRC32C of the data
and a CRC32C of the header itself. Every read checks the header against the in-memory index
(chain, chunk, version, length, CRC: see the note on the identity check in ``_verified``), so a
file of another chunk or an older version of this one is found like corrupt bytes, and a file
that vanished behind the store's back is reported as ``missing`` (``_open``). The format is
unchanged from the first version (format 1): the identity was always in the header, only the
check is new, so existing targets need no migration.

[Note: why write-then-rename] A new version is written to a temporary file and renamed to its
name; ``rename`` is atomic, so after a kill -9 at any instant a chunk has its old committed file,
maybe a complete pending file, maybe already its new committed file next to the old one (not yet
moved away): never a torn chunk. At start the newest valid committed version wins and older
files are dropped; a pending version not newer than it is dropped too. Committing a pending
version is one more rename (``.p`` -> ``.c``). A process kill cannot lose what the kernel already
has; with ``fsync = true`` every file (and its directory) is also flushed before the rename,
which extends the guarantee to power loss at the cost of write throughput. The metadata index
lives in memory and is rebuilt from the headers at start.

[Note: versioned names, recycled files] Two filesystem costs dominated writes on the
development machine (ext4): allocating fresh blocks for each new file (about 0.3 GB/s for 1 MiB
files) and renaming *over* an existing file, which makes ext4 start writing the new file back at
once (its ``auto_da_alloc`` heuristic; about 1 GB/s). So every version gets its own name (the
rename never replaces anything) and a replaced version's file is renamed to ``.spare-*`` rather
than deleted; the next write overwrites a spare in place (about 5-8 GB/s into cached pages) and
renames it to its new name. A file may be longer than header + length (a recycled bigger file):
the header's length counts. A reader that raced with the recycling of the file it opened sees a
vanished name or a CRC mismatch; the store retries with fresh metadata and the storage server
re-reads under the chunk lock before it calls a mismatch corruption.
"""

from __future__ import annotations

import errno
import functools
import itertools
import mmap
import os
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import crc32c as _crc

from .chunkid import inode_of
from .errors import ChunkCorrupt, ChunkNotFound, TargetFailed

__all__ = ["ChunkStore", "ChunkMeta", "HEADER_SIZE", "crc32c"]

crc32c = _crc.crc32c
_HDR = struct.Struct("!4sHHIQQQII")  # magic fmt flags chain chunk version chain_ver length crc
HEADER_SIZE = 64
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
MAGIC = b"FS3C"
_tls = threading.local()


@dataclass
class ChunkMeta:
    committed: int = 0          # committed version (0: none)
    length: int = 0
    crc: int = 0
    chain_ver: int = 0
    pending: int = 0            # pending version (0: none)
    pending_length: int = 0
    pending_crc: int = 0
    corrupt: bool = False       # a header failed its check at start (data unknown)

    def as_list(self, chunk: int) -> list:
        return [chunk, self.committed, self.pending, self.crc, self.length, self.chain_ver]


def _header(chain: int, chunk: int, version: int, chain_ver: int, length: int, crc: int) -> bytes:
    body = _HDR.pack(MAGIC, 1, 0, chain, chunk, version, chain_ver, length, crc)
    h = body + struct.pack("!I", crc32c(body))
    return h + b"\0" * (HEADER_SIZE - len(h))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _parse(buf) -> tuple[int, int, int, int, int, int]:
    body = bytes(buf[:_HDR.size])
    (hcrc,) = struct.unpack_from("!I", buf, _HDR.size)
    magic, fmt, _flags, chain, chunk, version, chain_ver, length, crc = _HDR.unpack(body)
    if magic != MAGIC or fmt != 1 or crc32c(body) != hcrc:
        raise ValueError("bad chunk header")
    return chain, chunk, version, chain_ver, length, crc


#: errors that mean the target's disk, not one request, is at fault
DISK_ERRNOS = frozenset({errno.EIO, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENODEV, errno.ENXIO,
                         errno.EUCLEAN})


def _disk(fn):
    """Raise a disk error (:data:`DISK_ERRNOS`) met by a store operation as :class:`TargetFailed`."""
    @functools.wraps(fn)
    def wrap(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise
            if exc.filename is None:  # an error on an open descriptor: name the target's directory
                exc.filename = str(self.root)
            if self.on_disk_error is not None:
                self.on_disk_error(self.target, exc)
            raise TargetFailed(f"target {self.target}: {exc.strerror} ({errno.errorcode[exc.errno]}) at "
                               f"{exc.filename}", target=self.target) from exc
    return wrap


class ChunkStore:
    """The chunks of one target; thread-safe for different chunks (callers lock per chunk). An
    operation that meets a disk error raises :class:`TargetFailed`."""

    def __init__(self, root: str | os.PathLike, target: int, chunk_size: int, *, fsync: bool = False,
                 max_spares: int = 32, on_disk_error=None) -> None:
        self.root = Path(root)
        self.target = target
        self.on_disk_error = on_disk_error  # called with (target, OSError) before TargetFailed is raised
        self.chunk_size = chunk_size
        self.fsync = fsync
        self.meta: dict[tuple[int, int], ChunkMeta] = {}
        # (chain, inode_of(chunk id)) -> that file's chunk ids here (fs3.chunkid):
        # the last chunk of a file (storage.last_chunk) without a scan of every chunk
        self._files: dict[tuple[int, int], set[int]] = {}
        self._mlock = threading.RLock()
        self._spares: list[str] = []
        self.max_spares = max_spares
        (self.root / "chunks").mkdir(parents=True, exist_ok=True)
        # hot paths build names as strings: pathlib costs more than the syscalls it wraps
        self._cdir = str(self.root / "chunks")
        self._names = itertools.count()
        self._name_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._scan()

    # -- paths --------------------------------------------------------------------------------
    def _dir(self, chain: int) -> str:
        return f"{self._cdir}/{chain}"

    def _p(self, chain: int, chunk: int, version: int, pending: bool = False) -> str:
        return f"{self._cdir}/{chain}/{chunk:016x}.{version}.{'p' if pending else 'c'}"

    def path(self, chain: int, chunk: int, version: int, pending: bool = False) -> Path:
        """The file of one version of a chunk."""
        return Path(self._p(chain, chunk, version, pending))

    def _scan(self) -> None:
        hdr = bytearray(HEADER_SIZE)
        found: dict[tuple[int, int], dict[str, list[tuple[int, Path]]]] = {}
        for cdir in (self.root / "chunks").iterdir():
            if cdir.name.startswith((".spare-", ".tmp-")):
                cdir.unlink(missing_ok=True)  # interrupted writes (never acknowledged) and spares
                continue
            if not cdir.is_dir() or not cdir.name.isdigit():
                continue
            chain = int(cdir.name)
            for f in cdir.iterdir():
                if f.name.startswith(".tmp-"):
                    f.unlink(missing_ok=True)
                    continue
                parts = f.name.split(".")
                if len(parts) != 3 or parts[2] not in ("c", "p") or not parts[1].isdigit():
                    continue
                try:
                    chunk = int(parts[0], 16)
                except ValueError:
                    continue
                found.setdefault((chain, chunk), {"c": [], "p": []})[parts[2]].append((int(parts[1]), f))

        def valid(path: Path, version: int) -> tuple | None:
            try:
                with open(path, "rb", buffering=0) as fh:
                    if fh.readinto(hdr) != HEADER_SIZE:
                        return None
                h = _parse(hdr)
            except (ValueError, OSError):
                return None
            # [Note: identity at start] a file counts only when its header names the chunk and
            # version its name says: another chunk's file copied here, or the chunk's own older
            # file renamed to the newer name, is damage (the chunk is marked corrupt, never served)
            return h if (h[0], h[1], h[2]) == (chain, chunk, version) else None

        for (chain, chunk), kinds in found.items():
            m = ChunkMeta()
            keep: set[Path] = set()
            for version, path in sorted(kinds["c"], reverse=True):
                h = valid(path, version)
                if h is not None:
                    m.committed, m.chain_ver, m.length, m.crc = version, h[3], h[4], h[5]
                    keep.add(path)
                    break
            else:
                if kinds["c"]:
                    m.corrupt = True  # no readable committed file: never served, resync replaces it
                    keep.update(p for _v, p in kinds["c"])
            for version, path in sorted(kinds["p"], reverse=True):
                if version <= m.committed:
                    break
                h = valid(path, version)
                if h is not None:
                    m.pending, m.pending_length, m.pending_crc = version, h[4], h[5]
                    keep.add(path)
                    break
            for _v, path in kinds["c"] + kinds["p"]:
                if path not in keep:
                    path.unlink(missing_ok=True)  # superseded versions left by a crash
            self.meta[(chain, chunk)] = m
            self._files.setdefault((chain, inode_of(chunk)), set()).add(chunk)

    # -- reading --------------------------------------------------------------------------------
    def get(self, chain: int, chunk: int) -> ChunkMeta | None:
        return self.meta.get((chain, chunk))

    def file_chunks(self, chain: int, inode: int) -> list[tuple[int, ChunkMeta]]:
        """The chunks of file ``inode`` (fs3.chunkid.inode_of) on ``chain`` here, with their metadata."""
        with self._mlock:
            return [(k, self.meta[(chain, k)]) for k in self._files.get((chain, inode), ())]

    def list(self, chain: int | None = None) -> list[tuple[int, int, ChunkMeta]]:
        with self._mlock:
            return [(c, k, m) for (c, k), m in self.meta.items() if chain is None or c == chain]

    def _buffer(self) -> bytearray:
        buf = getattr(_tls, "buf", None)
        if buf is None or len(buf) < HEADER_SIZE + self.chunk_size:
            buf = _tls.buf = bytearray(HEADER_SIZE + self.chunk_size)
        return buf

    def _locate(self, chain: int, chunk: int, pending: bool) -> tuple[str, int, int, int]:
        """The file of the chunk's committed (or pending) version and what the index says it holds:
        ``(path, version, length, crc)``; the caller holds ``_mlock``."""
        m = self.meta.get((chain, chunk))
        if m is None or (not pending and not m.committed) or (pending and not m.pending):
            if m is not None and m.corrupt:
                raise ChunkCorrupt(f"target {self.target}: chunk {chain}/{chunk:016x} has a damaged header",
                                   target=self.target, damage="header")
            raise ChunkNotFound(f"target {self.target}: no chunk {chain}/{chunk:016x}")
        if pending:
            return self._p(chain, chunk, m.pending, True), m.pending, m.pending_length, m.pending_crc
        return self._p(chain, chunk, m.committed), m.committed, m.length, m.crc

    def _open(self, chain: int, chunk: int, pending: bool) -> tuple[int, str, int, int, int]:
        """Open the current file of the chunk: ``(fd, path, version, length, crc)``, the last three
        from the index (what the file must hold).

        [Note: a missing file] Every change of the index and of the chunk's files happens under
        ``_mlock`` in an order that keeps the index's file in place (a new version's file is
        renamed into place before the index names it; an old one is moved away only together with
        the index change). So a name that vanished between an unlocked lookup and the open was
        moved by a write: it is looked up again under the lock, and a file still missing then was
        removed behind the store's back: damage (:class:`ChunkCorrupt`, ``damage="missing"``),
        repaired from a replica like a corrupt copy, never "no such chunk".
        """
        with self._mlock:
            path, version, length, crc = self._locate(chain, chunk, pending)
        try:
            return os.open(path, os.O_RDONLY), path, version, length, crc
        except FileNotFoundError:
            pass
        with self._mlock:
            path, version, length, crc = self._locate(chain, chunk, pending)
            try:
                return os.open(path, os.O_RDONLY), path, version, length, crc
            except FileNotFoundError:
                raise ChunkCorrupt(f"target {self.target}: chunk {chain}/{chunk:016x} v{version}: file {path} is "
                                   f"missing (removed behind the store's back)", target=self.target,
                                   damage="missing") from None

    @_disk
    def read(self, chain: int, chunk: int, *, pending: bool = False, buf: bytearray | None = None
             ) -> tuple[memoryview, int]:
        """The chunk's bytes (a view into ``buf`` or a per-thread buffer) and their version.

        The CRC32C is verified: a mismatch raises :class:`ChunkCorrupt` and the bytes are never
        returned. ``pending`` reads the pending version instead of the committed one.
        """
        buf = buf if buf is not None else self._buffer()
        fd, path, version, length, crc = self._open(chain, chunk, pending)
        try:
            n = os.readv(fd, [buf])
        finally:
            os.close(fd)
        data, version, _crc = self._verified(memoryview(buf), n, chain, chunk, path, version, length, crc)
        return data, version

    @_disk
    def open_data(self, chain: int, chunk: int) -> tuple[int, int, int, int]:
        """An open descriptor of the committed version's file (its data starts at ``HEADER_SIZE``),
        the data's length, the version and the CRC32C recorded when it was stored; the caller
        closes the descriptor.

        [Note: unverified reads, checked end to end] Nothing is read here: a storage server
        sends the file's bytes to the socket with ``sendfile`` and the chunk client checks them
        against the recorded CRC, so the bytes are checked once, at the end that uses them, and
        never cross user space on the server. A mismatch found there is reported back (the
        server then verifies its copy itself and reports and repairs it). A file shorter than the
        recorded length is damage found here: :class:`ChunkCorrupt`.
        """
        fd, path, version, length, crc = self._open(chain, chunk, False)
        if os.fstat(fd).st_size < HEADER_SIZE + length:
            os.close(fd)
            raise ChunkCorrupt(f"target {self.target}: chunk {chain}/{chunk:016x} v{version}: short file "
                               f"{path}", target=self.target, damage="short")
        return fd, length, version, crc

    @_disk
    def read_mapped(self, chain: int, chunk: int, *, pending: bool = False) -> tuple[memoryview, int, int]:
        """Like :meth:`read` but without copying: a view of the chunk file mapped into memory,
        its version and its CRC32C (verified here).

        [Note: mapped reads] The server sends the mapped pages straight to the socket, which
        saves one copy of every byte read. The mapping shares pages with the file, so a write
        that recycles this file (see the note on spares) after the check could change bytes
        before they are sent: the reply therefore carries the CRC and the client checks it,
        which also covers the bytes in flight (end-to-end integrity).
        """
        fd, path, version, length, crc = self._open(chain, chunk, pending)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ChunkCorrupt(f"target {self.target}: chunk {chain}/{chunk:016x}: short file {path}",
                                   target=self.target, damage="short")
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return self._verified(memoryview(mm), size, chain, chunk, path, version, length, crc)

    def _verified(self, view: memoryview, n: int, chain: int, chunk: int, path: str, version: int, length: int,
                  crc: int) -> tuple[memoryview, int, int]:
        """The data of a chunk file's ``n`` bytes in ``view``, its version and CRC, after checking the
        header against the index (``version``, ``length``, ``crc``: what the file must hold) and the
        data against the CRC32C (ChunkCorrupt otherwise: damaged bytes are never returned).

        [Note: the identity check] A file's header names its chain, chunk and version, and its own
        CRC covers its own data: a valid file of another chunk, or the chunk's own previous
        version put back in place, passes any check of the file against itself. So the expected
        identity comes from the index, never from the file: the header must name this chain and
        chunk, the version the index says is committed (or pending), and the index's length and
        CRC32C, and the data must match the index's CRC. The comparison costs a few integer
        compares of the 64-byte header the read brings in anyway; a misplaced or stale file then
        fails like a corrupt one (reported, repaired, the read goes to another replica), on
        ranged reads too.
        """
        where = f"target {self.target}: chunk {chain}/{chunk:016x} v{version}"
        try:
            hchain, hchunk, hver, _cv, hlen, hcrc = _parse(view[:HEADER_SIZE])
        except ValueError:
            raise ChunkCorrupt(f"{where}: damaged header in {path}", target=self.target, damage="header") from None
        if (hchain, hchunk) != (chain, chunk):
            raise ChunkCorrupt(f"{where}: {path} holds chunk {hchain}/{hchunk:016x} v{hver} (a misplaced file)",
                               target=self.target, damage="misplaced")
        if hver != version:
            raise ChunkCorrupt(f"{where}: {path} holds v{hver} of the chunk, the index says v{version} "
                               f"({'a stale file' if hver < version else 'an unexpected version'})",
                               target=self.target, damage="stale")
        if (hlen, hcrc) != (length, crc):
            raise ChunkCorrupt(f"{where}: the header of {path} records {hlen} bytes with CRC32C {hcrc}, the index "
                               f"{length} bytes with CRC32C {crc}", target=self.target, damage="header")
        data = view[HEADER_SIZE:HEADER_SIZE + length]
        if n < HEADER_SIZE + length or crc32c(data) != crc:
            raise ChunkCorrupt(f"{where}: CRC32C mismatch in {path} (data damaged on disk)", target=self.target,
                               damage="crc")
        return data, version, crc

    # -- writing --------------------------------------------------------------------------------
    def _spare_name(self) -> str:
        return f"{self._cdir}/.spare-{self._name_prefix}-{next(self._names)}"

    def _write_file(self, final: str, header: bytes, data) -> None:
        """Write header + data into a spare (or a new file) and rename it to ``final``."""
        d = os.path.dirname(final)
        with self._mlock:
            tmp = self._spares.pop() if self._spares else None
        if tmp is not None:
            fd = os.open(tmp, os.O_WRONLY)
        else:
            tmp = f"{self._cdir}/.tmp-{self._name_prefix}-{next(self._names)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            want = len(header) + len(data)
            n = os.pwritev(fd, [header, data], 0)
            if n != want:  # short write: finish it
                rest = memoryview(header + bytes(data))[n:]
                while rest:
                    k = os.pwrite(fd, rest, want - len(rest))
                    rest = rest[k:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:  # first chunk of this chain on this target
            os.makedirs(d, exist_ok=True)
            os.rename(tmp, final)
        if self.fsync:
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    @_disk
    def put(self, chain: int, chunk: int, version: int, chain_ver: int, data, *, pending: bool,
            crc: int | None = None) -> int:
        """Store ``data`` as the pending (or directly committed) version; returns its CRC32C
        (``crc``: the caller already computed it)."""
        if len(data) > self.chunk_size:
            raise ValueError(f"chunk {chain}/{chunk:016x}: {len(data)} bytes exceed the chunk size "
                             f"{self.chunk_size}")
        if crc is None:
            crc = crc32c(data)
        self._write_file(self._p(chain, chunk, version, pending),
                         _header(chain, chunk, version, chain_ver, len(data), crc), data)
        with self._mlock:
            m = self.meta.get((chain, chunk))
            if m is None:
                m = self.meta[(chain, chunk)] = ChunkMeta()
                self._files.setdefault((chain, inode_of(chunk)), set()).add(chunk)
            if pending:
                if m.pending and m.pending != version:
                    self._discard(self._p(chain, chunk, m.pending, True))
                m.pending, m.pending_length, m.pending_crc = version, len(data), crc
            else:
                if m.committed and m.committed != version:
                    self._discard(self._p(chain, chunk, m.committed))
                m.committed, m.length, m.crc, m.chain_ver = version, len(data), crc, chain_ver
                m.corrupt = False
                if m.pending and m.pending <= version:
                    if m.pending != version:
                        self._discard(self._p(chain, chunk, m.pending, True))
                    else:
                        _unlink(self._p(chain, chunk, version, True))
                    m.pending = m.pending_length = m.pending_crc = 0
        return crc

    @_disk
    def commit(self, chain: int, chunk: int, version: int) -> None:
        """Make pending ``version`` the committed one (a rename). A no-op when already committed."""
        with self._mlock:
            m = self.meta.get((chain, chunk))
            if m is None:
                raise ChunkNotFound(f"target {self.target}: commit of unknown chunk {chain}/{chunk:016x}")
            if m.committed >= version and m.pending != version:
                return
            if m.pending != version:
                raise ChunkNotFound(f"target {self.target}: chunk {chain}/{chunk:016x} has no pending "
                                    f"version {version} (pending {m.pending}, committed {m.committed})")
            os.rename(self._p(chain, chunk, version, True), self._p(chain, chunk, version))
            if m.committed and m.committed != version:
                self._discard(self._p(chain, chunk, m.committed))
            m.committed, m.length, m.crc = m.pending, m.pending_length, m.pending_crc
            m.pending = m.pending_length = m.pending_crc = 0
            m.corrupt = False

    @_disk
    def remove(self, chain: int, chunk: int) -> bool:
        """Delete every version of the chunk; False when it did not exist."""
        with self._mlock:
            m = self.meta.pop((chain, chunk), None)
            if m is not None:
                f = self._files.get((chain, inode_of(chunk)))
                if f is not None:
                    f.discard(chunk)
                    if not f:
                        del self._files[(chain, inode_of(chunk))]
        d = self._dir(chain)
        prefix = f"{chunk:016x}."
        try:
            names = [n for n in os.listdir(d) if n.startswith(prefix)]
        except FileNotFoundError:
            names = []
        for n in names:
            self._discard(f"{d}/{n}")
        return m is not None

    def _discard(self, path: str) -> None:
        """Drop a chunk file: it becomes a spare (renamed, so the chunk name is gone at once)."""
        if len(self._spares) < self.max_spares:
            spare = self._spare_name()
            try:
                os.rename(path, spare)
            except FileNotFoundError:
                return
            with self._mlock:
                self._spares.append(spare)
        else:
            _unlink(path)
