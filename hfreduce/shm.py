"""The node's shared-memory arena: control words, the staging ring, and each rank's heap.

One group on one node shares:

* the **arena** segment, created by the node leader: the control block (the node's words, then
  one 512-byte block of counters and an operation descriptor per local rank, then one error
  record per local rank) followed by the staging **ring**: ``slots`` chunk slots per local rank,
  where a rank copies its chunks of a caller buffer that does not live in shared memory;
* one **heap** segment per local rank, from which :func:`hfreduce.empty` allocates the rank's
  registered buffers; every local rank maps every heap, so a rank reduces straight from where
  its peers' data lies.

[Note: no leftovers in /dev/shm]
Segments are created under /dev/shm with the creator's pid and process start time in the name,
every local rank maps them, and as soon as all have mapped them (a barrier on the control
words) every creator unlinks its own. From then on the memory lives only as long as some
process maps it: a crash of any or all ranks leaves nothing behind. The window between creation
and unlink (group start-up) is covered by :func:`sweep_stale`, which unlinks every ``hfr.``
segment whose creator is no longer alive; every :func:`hfreduce.init` runs it, and so does a
failed start-up.

[Note: sparse heaps]
A heap is a sparse tmpfs file of ``HFREDUCE_HEAP_BYTES`` (default: the size of /dev/shm, at most
64 GiB): it costs address space, not memory. An allocation reserves its pages with
``posix_fallocate`` (so a full /dev/shm is a clean error, not a SIGBUS on first touch) and a
freed block gives them back with ``MADV_REMOVE``.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import threading
import time
import weakref

import numpy as np

from .errors import InitError, InvalidArgument

__all__ = ["SHM_DIR", "PREFIX", "Layout", "Segment", "Heap", "NodeArena", "sweep_stale", "process_start_time",
           "segment_name"]

SHM_DIR = os.environ.get("HFREDUCE_SHM_DIR", "/dev/shm")
PREFIX = "hfr."
PAGE = mmap.PAGESIZE
ALIGN = 4096


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None when there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    try:
        return int(stat.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def segment_name(pid: int, start: int, session: str, tag: str) -> str:
    return f"{PREFIX}{pid}.{start}.{session}.{tag}"


def sweep_stale() -> list[str]:
    """Unlink every hfreduce segment whose creating process is gone; returns the names removed."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        parts = name.split(".")
        try:
            pid, start = int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            continue
        if process_start_time(pid) == start:
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


class Segment:
    """One shared-memory file under SHM_DIR, mapped read-write."""

    def __init__(self, name: str, fd: int, size: int, created: bool) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.created = created
        self.linked = created
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if size else None

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, name: str, size: int, reserve: bool = False) -> Segment:
        """Create and size the segment under a temporary name, then rename it into place, so a
        peer that opens ``name`` never sees it before it has its full size. ``reserve`` allocates
        its pages now: a /dev/shm too small is then an error here, not a SIGBUS at first touch."""
        path = os.path.join(SHM_DIR, name)
        tmp = path + ".new"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            raise InitError(f"cannot create shared memory {tmp}: {exc.strerror} (is {SHM_DIR} mounted "
                            "and writable?)") from exc
        try:
            os.ftruncate(fd, size)
            if reserve and size:
                free, why = _free_bytes(), None
                if size > free:  # refuse before fallocate fills the filesystem and gives it back
                    why = "not enough room"
                else:
                    try:
                        os.posix_fallocate(fd, 0, size)
                    except OSError as exc:
                        why = exc.strerror
                if why:
                    raise InitError(f"cannot reserve {size} bytes of shared memory in {SHM_DIR} ({why}; "
                                    f"{free} bytes free): give {SHM_DIR} more room (docker run --shm-size) or "
                                    "lower HFREDUCE_CHUNK_BYTES / HFREDUCE_SLOTS")
            os.rename(tmp, path)
            return cls(name, fd, size, True)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def open(cls, name: str, deadline: float, alive=None) -> Segment:
        """Open a peer's segment, waiting for it to appear until ``deadline`` (monotonic)."""
        path = os.path.join(SHM_DIR, name)
        delay = 0.001
        while True:
            try:
                fd = os.open(path, os.O_RDWR)
                break
            except FileNotFoundError:
                if alive is not None:
                    alive()
                if time.monotonic() > deadline:
                    raise InitError(f"shared memory {path} did not appear in time (its creator did not "
                                    "start, or crashed)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            except OSError as exc:
                raise InitError(f"cannot open shared memory {path}: {exc.strerror}") from exc
        size = os.fstat(fd).st_size
        return cls(name, fd, size, False)

    def unlink(self) -> None:
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink() if self.created else None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # arrays from hfreduce.empty() still alive: freed with them
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Layout:
    """Where everything lies in the arena (all offsets in bytes; counters are int64 words)."""

    # node words (word index)
    MAGIC, LOCAL, FINAL, WAITERS = 0, 1, 2, 3
    EPOCH_OFF = 64  # int32 futex word on its own cache line
    NODE_BYTES = 128
    # per-rank block (word index inside the block)
    RANK_BYTES = 512
    POSTED, REDUCED, CONSUMED, ATTACHED, DEPARTED, PID, OP_SEQ, FIRST_G = range(8)
    KIND, NBYTES, DTYPE, OP, ROOT, LOC_KIND, LOC_HEAP, LOC_OFF = range(8, 16)
    ERR_FLAG, ERR_TIME, ERR_RANK, ERR_KIND, ERR_NODE, ERR_BY, ERR_LEN = range(16, 23)
    CMA_ADDR, CMA_OK = 23, 24  # single-copy reads between the node's ranks: probe address, verdict
    MSG_BYTES = 1024
    MAGIC_VALUE = 0x48465231  # "HFR1"

    def __init__(self, local: int, slots: int, chunk: int) -> None:
        self.local = local
        self.slots = slots
        self.chunk = chunk
        self.rank_base = self.NODE_BYTES
        self.msg_base = self.rank_base + local * self.RANK_BYTES
        ctrl = self.msg_base + local * self.MSG_BYTES
        self.ring_base = (ctrl + ALIGN - 1) // ALIGN * ALIGN
        self.total = self.ring_base + local * slots * chunk

    def word(self, rank: int, field: int) -> int:
        """Word index of ``field`` of local rank ``rank``'s block."""
        return (self.rank_base + rank * self.RANK_BYTES) // 8 + field

    @property
    def stride(self) -> int:
        """Words between the same field of consecutive ranks."""
        return self.RANK_BYTES // 8

    def slot_offset(self, rank: int, k: int) -> int:
        return self.ring_base + (rank * self.slots + k) * self.chunk


class Heap:
    """A rank's registered-buffer heap: first-fit allocator with coalescing over a sparse segment."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self.size = seg.size
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.size)] if self.size else []  # sorted (off, size)
        self._used: dict[int, int] = {}
        self.closed = False
        probe = np.frombuffer(seg.map, np.uint8, count=1) if self.size else None
        self.base = probe.__array_interface__["data"][0] if probe is not None else 0
        del probe

    def contains(self, addr: int, nbytes: int) -> int | None:
        """Offset of [addr, addr+nbytes) in this heap, or None when it lies elsewhere."""
        off = addr - self.base
        if self.size and 0 <= off and off + nbytes <= self.size:
            return off
        return None

    def alloc(self, nbytes: int) -> int:
        size = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        with self._lock:
            if self.closed:
                raise InvalidArgument("the group this heap belonged to was destroyed")
            i = next((j for j, (_, free) in enumerate(self._free) if free >= size), -1)
            if i < 0:
                raise InvalidArgument(f"the shared-memory heap is full: {nbytes} bytes asked, "
                                      f"{self.size} reserved in all (raise HFREDUCE_HEAP_BYTES)")
            off, free = self._free[i]
            if free == size:
                self._free.pop(i)
            else:
                self._free[i] = (off + size, free - size)
            self._used[off] = size
        try:
            os.posix_fallocate(self.seg.fd, off, size)
        except OSError as exc:
            self.free(off)
            raise InvalidArgument(f"cannot reserve {size} bytes of shared memory in {SHM_DIR}: "
                                  f"{exc.strerror} (free memory in {SHM_DIR} or use smaller buffers)") from exc
        return off

    def free(self, off: int) -> None:
        with self._lock:
            size = self._used.pop(off, None)
            if size is None or self.closed:
                return
            try:
                self.seg.map.madvise(mmap.MADV_REMOVE, off, size)
            except (OSError, ValueError):
                pass
            i = bisect.bisect(self._free, (off, 0))
            self._free.insert(i, (off, size))
            # coalesce with the neighbours
            if i + 1 < len(self._free) and off + size == self._free[i + 1][0]:
                self._free[i] = (off, size + self._free[i + 1][1])
                self._free.pop(i + 1)
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
                self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
                self._free.pop(i)

    def array(self, off: int, shape, dtype) -> np.ndarray:
        """A numpy array over [off, off+nbytes) that frees the block when its last view dies."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape != () else 1
        nbytes = count * dt.itemsize
        raw = (ctypes.c_char * max(nbytes, 1)).from_buffer(self.seg.map, off)
        weakref.finalize(raw, self.free, off)
        return np.frombuffer(raw, dtype=dt, count=count).reshape(shape)

    def close(self) -> None:
        with self._lock:
            self.closed = True


class NodeArena:
    """The arena and every local rank's heap, mapped in this process."""

    def __init__(self, layout: Layout, arena: Segment, heaps: list[Segment], me: int) -> None:
        self.layout = layout
        self.arena = arena
        self.me = me
        self.heap_segs = heaps
        self.heap = Heap(heaps[me])
        self.ctrl = memoryview(arena.map)[: layout.ring_base]  # the words the sync primitives take
        self.words = np.frombuffer(arena.map, np.int64, count=layout.ring_base // 8)
        ring = np.frombuffer(arena.map, np.uint8)
        self.slots = [[ring[layout.slot_offset(r, k): layout.slot_offset(r, k) + layout.chunk]
                       for k in range(layout.slots)] for r in range(layout.local)]
        self.heap_views = [np.frombuffer(h.map, np.uint8) if h.size else np.empty(0, np.uint8) for h in heaps]

    def heap_slice(self, rank: int, off: int, nbytes: int) -> np.ndarray:
        return self.heap_views[rank][off: off + nbytes]

    def msg_view(self, rank: int) -> np.ndarray:
        base = self.layout.msg_base + rank * Layout.MSG_BYTES
        return np.frombuffer(self.arena.map, np.uint8, count=Layout.MSG_BYTES, offset=base)

    def close(self) -> None:
        self.heap.close()
        self.slots = []
        self.heap_views = []
        self.words = None
        self.ctrl.release()
        for s in [self.arena, *self.heap_segs]:
            s.close()
