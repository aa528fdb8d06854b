"""A stand-in for cupy on a machine without a GPU (tests only): it STANDS IN FOR A GPU.

Just enough of cupy's API for ``hfreduce.cuda`` to run its real code (CudaBackend: host
registration of the arena, memcpyAsync on a D2H and an H2D stream, events, waiter threads) on
the CPU: "device memory" is a private numpy array, a stream is a thread that runs its queued
operations in order (each copy after ``STANDIN_CUPY_LATENCY`` seconds), an event is a flag set
when the stream reaches it. ``STANDIN_CUPY_DEVICES`` sets the device count (0: "no device").
Every runtime call is logged in ``runtime.calls``. It checks hfreduce's plumbing, not cupy.

``runtime.malloc`` memory lives in a memfd, and ``ipcGetMemHandle`` names it as (pid, fd): another
process's ``ipcOpenMemHandle`` maps it through /proc/<pid>/fd/<fd>, as CUDA IPC maps a peer
GPU's allocation (nothing is left behind in /dev/shm). Array views, ``a[k] = b[k]`` (a device to
device copy, "over NVLink") and the one ``ElementwiseKernel`` hfreduce uses (an add) run on numpy.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import queue
import struct
import threading
import time
import types

import numpy as np

__version__ = "0.0-standin"

_LATENCY = float(os.environ.get("STANDIN_CUPY_LATENCY", "0.001"))


class CUDARuntimeError(RuntimeError):
    pass


# -- runtime -------------------------------------------------------------------------------------
runtime = types.SimpleNamespace()
runtime.memcpyHostToDevice = 1
runtime.memcpyDeviceToHost = 2
runtime.calls = []
runtime.registered = {}
_streams: dict[int, Stream] = {}


def _get_device_count() -> int:
    n = int(os.environ.get("STANDIN_CUPY_DEVICES", "1"))
    if n < 0:
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    return n


def _host_register(ptr: int, size: int, flags: int) -> None:
    runtime.calls.append(("hostRegister", ptr, size, flags))
    runtime.registered[ptr] = size


def _host_unregister(ptr: int) -> None:
    runtime.calls.append(("hostUnregister", ptr))
    if runtime.registered.pop(ptr, None) is None:
        raise CUDARuntimeError("cudaErrorHostMemoryNotRegistered")


def _memcpy_async(dst: int, src: int, size: int, kind: int, stream: int) -> None:
    runtime.calls.append(("memcpyAsync", kind, size))
    host = dst if kind == runtime.memcpyDeviceToHost else src
    if not any(p <= host and host + size <= p + n for p, n in runtime.registered.items()):
        raise CUDARuntimeError("stand-in: async copy from/to host memory that is not registered (pinned)")

    def op():
        time.sleep(_LATENCY)
        ctypes.memmove(dst, src, size)

    _streams[stream].q.put(op)


_allocs: dict[int, tuple[mmap.mmap, int]] = {}  # base address -> (mapping, memfd) of malloc'd memory
_opened: dict[int, mmap.mmap] = {}  # base address -> mapping of a peer's memory (IPC)


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _malloc(size: int) -> int:
    fd = os.memfd_create("standin-cupy")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    ptr = _address(m)
    _allocs[ptr] = (m, fd)
    runtime.calls.append(("malloc", size))
    return ptr


def _free(ptr: int) -> None:
    m, fd = _allocs.pop(ptr)
    os.close(fd)  # and the mapping goes with the last reference to it


def _ipc_get_mem_handle(ptr: int) -> bytes:
    if ptr not in _allocs:
        raise CUDARuntimeError("cudaErrorInvalidValue: not the base of a cudaMalloc allocation")
    m, fd = _allocs[ptr]
    return struct.pack("<qqq", os.getpid(), fd, len(m)).ljust(64, b"\0")


def _ipc_open_mem_handle(handle: bytes, flags: int = 1) -> int:
    pid, fd, size = struct.unpack("<qqq", bytes(handle)[:24])
    with open(f"/proc/{pid}/fd/{fd}", "r+b") as f:
        m = mmap.mmap(f.fileno(), size)
    ptr = _address(m)
    _opened[ptr] = m
    runtime.calls.append(("ipcOpenMemHandle", size))
    return ptr


def _ipc_close_mem_handle(ptr: int) -> None:
    if _opened.pop(ptr, None) is None:
        raise CUDARuntimeError("cudaErrorInvalidValue: not an opened IPC mapping")
    runtime.calls.append(("ipcCloseMemHandle",))


runtime.malloc = _malloc
runtime.free = _free
runtime.ipcGetMemHandle = _ipc_get_mem_handle
runtime.ipcOpenMemHandle = _ipc_open_mem_handle
runtime.ipcCloseMemHandle = _ipc_close_mem_handle
runtime.getDeviceCount = _get_device_count
runtime.hostRegister = _host_register
runtime.hostUnregister = _host_unregister
runtime.memcpyAsync = _memcpy_async


# -- streams and events ----------------------------------------------------------------------------
_ids = itertools.count(1)


class Stream:
    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self.ptr = next(_ids)
        self.q: queue.Queue = queue.Queue()
        _streams[self.ptr] = self
        self._t = threading.Thread(target=self._run, daemon=True, name=f"standin-stream-{self.ptr}")
        self._t.start()

    def _run(self) -> None:
        while True:
            op = self.q.get()
            op()

    def wait_event(self, ev: Event) -> None:
        self.q.put(ev.synchronize)

    def synchronize(self) -> None:
        done = threading.Event()
        self.q.put(done.set)
        if not done.wait(60):
            raise CUDARuntimeError("stand-in stream did not drain within 60 s")


class ExternalStream(Stream):
    def __init__(self, ptr: int, device_id: int = -1) -> None:
        super().__init__()


_current = None


def get_current_stream() -> Stream:
    global _current
    if _current is None:
        _current = Stream()
    return _current


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        self._done = threading.Event()
        self._done.set()  # an event never recorded is complete, as in CUDA

    def record(self, stream: Stream | None = None) -> None:
        self._done.clear()
        (stream or get_current_stream()).q.put(self._done.set)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait(60)


class Device:
    def __init__(self, index: int = 0) -> None:
        self.id = index

    def use(self) -> None:
        pass

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        pass


class UnownedMemory:
    def __init__(self, ptr: int, size: int, owner, device_id: int = -1) -> None:
        self.ptr, self.size, self.owner = ptr, size, owner


class MemoryPointer:
    def __init__(self, mem, offset: int) -> None:
        self.mem, self.ptr = mem, mem.ptr + offset


cuda = types.SimpleNamespace(runtime=runtime, Stream=Stream, ExternalStream=ExternalStream, Event=Event,
                             Device=Device, get_current_stream=get_current_stream, CUDARuntimeError=CUDARuntimeError,
                             UnownedMemory=UnownedMemory, MemoryPointer=MemoryPointer)


# -- arrays ---------------------------------------------------------------------------------------
class ndarray:
    """Device memory: the engine may only reach it by memcpyAsync; views and adds run on numpy."""

    def __init__(self, shape, dtype, memptr: MemoryPointer) -> None:
        self.dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(memptr.ptr)
        self._a = np.ctypeslib.as_array(raw)[:nbytes].view(self.dtype).reshape(shape)
        self._set(memptr)

    def _set(self, memptr: MemoryPointer) -> None:
        a = self._a
        self.nbytes, self.size, self.ndim, self.shape, self.itemsize = a.nbytes, a.size, a.ndim, a.shape, a.itemsize
        self.flags = types.SimpleNamespace(c_contiguous=a.flags.c_contiguous)
        self.data = memptr
        self.device = Device(0)

    @classmethod
    def _view(cls, a: np.ndarray, mem) -> ndarray:
        out = cls.__new__(cls)
        out.dtype = a.dtype
        out._a = a
        out._set(MemoryPointer(mem, a.ctypes.data - mem.ptr))
        return out

    def __getitem__(self, key) -> ndarray:
        return ndarray._view(self._a[key], self.data.mem)

    def __setitem__(self, key, value) -> None:
        self._a[key] = value._a if isinstance(value, ndarray) else value


class _Private:
    """cupy's pool memory, stood in for by a private host array."""

    def __init__(self, nbytes: int) -> None:
        self.buf = np.zeros(max(nbytes, 1), np.uint8)
        self.ptr = self.buf.ctypes.data
        self.size = nbytes


def asarray(a) -> ndarray:
    a = np.ascontiguousarray(a)
    mem = _Private(a.nbytes)
    out = ndarray(a.shape, a.dtype, MemoryPointer(mem, 0))
    out._a[...] = a
    return out


def asnumpy(a: ndarray) -> np.ndarray:
    return a._a.copy()


class ElementwiseKernel:
    def __init__(self, in_params: str, out_params: str, operation: str, name: str) -> None:
        if operation.replace(" ", "") != "mine=mine+peer":
            raise NotImplementedError(f"stand-in ElementwiseKernel: only the pair add, not {operation!r}")
        self.name = name

    def __call__(self, peer: ndarray, mine: ndarray) -> None:
        np.add(mine._a, peer._a, out=mine._a)
