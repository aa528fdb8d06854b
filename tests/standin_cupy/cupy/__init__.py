"""A stand-in for cupy on a machine without a GPU (tests only): it STANDS IN FOR A GPU.

Just enough of cupy's API for ``hfreduce.cuda`` to run its real code (CudaBackend: host
registration of the arena, memcpyAsync on a D2H and an H2D stream, events, waiter threads) on
the CPU: "device memory" is a private numpy array, a stream is a thread that runs its queued
operations in order (each copy after ``STANDIN_CUPY_LATENCY`` seconds), an event is a flag set
when the stream reaches it. ``STANDIN_CUPY_DEVICES`` sets the device count (0: "no device").
Every runtime call is logged in ``runtime.calls``. It checks hfreduce's plumbing, not cupy.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
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


cuda = types.SimpleNamespace(runtime=runtime, Stream=Stream, ExternalStream=ExternalStream, Event=Event,
                             Device=Device, get_current_stream=get_current_stream, CUDARuntimeError=CUDARuntimeError)


# -- arrays ---------------------------------------------------------------------------------------
class ndarray:
    """Device memory: a private host array the engine may only reach by memcpyAsync."""

    def __init__(self, host: np.ndarray) -> None:
        self._a = np.array(host, copy=True, order="C")
        self.dtype = self._a.dtype
        self.nbytes = self._a.nbytes
        self.size = self._a.size
        self.ndim = self._a.ndim
        self.shape = self._a.shape
        self.flags = types.SimpleNamespace(c_contiguous=True)
        self.data = types.SimpleNamespace(ptr=self._a.ctypes.data)
        self.device = Device(0)


def asarray(a) -> ndarray:
    return ndarray(np.asarray(a))


def asnumpy(a: ndarray) -> np.ndarray:
    return a._a.copy()
