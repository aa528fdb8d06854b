"""Device buffers: backends that stage them through the node's arena, chunk by chunk.

The engine's pipeline (:mod:`hfreduce.engine`) is the same for host and device buffers. A device
backend supplies only the device seam, per chunk ``g`` of a collective:

========================  ====================================================================
``copy_chunk_out``        D2H: start copying chunk ``g`` of the caller's device input into this
                          rank's staging slot in the arena (asynchronous, on a copy engine)
``chunk_ready``           has that D2H finished? (an event query; raises :class:`DeviceError`
                          when the copy failed). The engine publishes POSTED only then, and the
                          CPU reduce of chunk ``g`` starts once every local rank posted it
``copy_chunk_in``         H2D: start copying the final chunk ``g`` (each slice from the arena
                          location of its owner) into the caller's device output
``chunk_in_done``         has that H2D finished? The engine publishes CONSUMED only then (the
                          arena slots it reads may be reused by the next chunks)
========================  ====================================================================

Backends here: :class:`hfreduce.device.standin.StandInDevice` (host arrays behind a copy-engine
thread with a configurable latency: it stands in for a GPU so the pipeline, its ordering and its
error paths are tested on every machine) and :mod:`hfreduce.cuda` (cupy: torch CUDA tensors and
cupy arrays, pinned arena, one copy stream per direction, CUDA events per chunk).

A buffer is a device buffer when :func:`as_device_buf` recognises it: an object with an
``__hfreduce_device_buf__(what)`` method (the stand-in's arrays), a torch tensor on a CUDA
device, or a cupy array. Everything else is a host buffer (:mod:`hfreduce.buffers`).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DeviceError, HFReduceError

__all__ = ["DeviceBuf", "DeviceBackend", "ChunkCopy", "as_device_buf", "DeviceError"]


@dataclass
class DeviceBuf:
    """A device buffer as the engine sees it: ``nbytes``, kernel ``dtype`` code, and where it is.

    ``device`` is the object that makes this process's backend for it (``key`` and
    ``make_backend(arena, chunk, wake)``); ``handle`` is what that backend copies from and to.
    """

    nbytes: int
    dtype: int
    device: Any
    handle: Any
    owner: Any

    @property
    def data(self) -> DeviceBuf:  # the engine's spec.inp / spec.out: the backend reads them
        return self

    @property
    def key(self) -> Any:
        return self.device.key

    @property
    def dtype_name(self) -> str:
        from ..kernels import DTYPE_NAMES

        return DTYPE_NAMES[self.dtype]


def as_device_buf(obj: Any, what: str = "buf") -> DeviceBuf | None:
    """``obj`` as a :class:`DeviceBuf`, or None when it is a host buffer."""
    hook = getattr(type(obj), "__hfreduce_device_buf__", None)
    if hook is not None:
        return hook(obj, what)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.device.type != "cuda":
            return None
        from .. import cuda

        return cuda.device_buf(obj, what)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(obj, cupy.ndarray):
        from .. import cuda

        return cuda.device_buf(obj, what)
    return None


class ChunkCopy:
    """One chunk's copies in one direction: done / failed, as an event query answers."""

    __slots__ = ("g", "error", "_done")

    def __init__(self, g: int) -> None:
        self.g = g
        self.error: BaseException | None = None
        self._done = False

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done = True

    def query(self) -> bool:
        return self._done


class DeviceBackend:
    """The device seam over a backend's asynchronous copies (subclasses: stand-in, CUDA).

    A subclass implements ``_d2h(g, pieces)`` and ``_h2d(g, pieces)``: enqueue the copies of one
    chunk (``pieces``: (device handle, byte offset, host array)) and return a handle with
    ``query()`` (True once done; raise or set ``error`` when the copy failed). The base class
    does the chunk arithmetic, zero-fills what no input covers (on the host, at once) and
    turns failed copies into :class:`DeviceError`.
    """

    name = "device"
    direct = False  # the CPU kernels never touch device memory: everything is staged
    trace = False

    def __init__(self, arena: Any, chunk: int, wake: Any) -> None:
        self.arena = arena
        self.chunk = chunk
        self.wake = wake  # bumps the node's futex: a sleeping engine re-checks its events
        self._out: dict[int, Any] = {}
        self._in: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._begun = None  # the spec whose copies are being issued
        self.closed = False

    # -- subclass interface ------------------------------------------------------------------------
    def _d2h(self, g: int, pieces: list[tuple[Any, int, np.ndarray]]) -> Any:
        raise NotImplementedError

    def _h2d(self, g: int, pieces: list[tuple[Any, int, np.ndarray]]) -> Any:
        raise NotImplementedError

    def prepare(self, spec: Any) -> None:
        """Called on the caller's thread at submission (CUDA: record an event on the caller's stream)."""

    def _begin(self, spec: Any) -> None:
        """Called on the engine's thread before the first copy of ``spec`` is issued (CUDA: the copy
        streams wait for the event ``prepare`` recorded; done here, not at submission, so copies of
        operations submitted earlier do not wait for the caller's later work)."""

    def close(self) -> None:
        self.closed = True

    def describe(self) -> dict:
        return {"backend": self.name}

    # -- the seam ------------------------------------------------------------------------------------
    def _g(self, spec: Any, c0: int) -> int:
        return spec.g0 + c0 // self.chunk

    def _once(self, spec: Any) -> None:
        if self._begun is not spec:
            self._begun = spec
            self._begin(spec)

    def copy_chunk_out(self, spec: Any, c0: int, c1: int, slot: np.ndarray) -> None:
        self._once(spec)
        n = c1 - c0
        g = self._g(spec, c0)
        inp = spec.inp
        if inp is None:
            slot[:n] = 0
            return
        i0, i1 = spec.in_off, spec.in_off + inp.nbytes
        a, b = max(c0, i0), min(c1, i1)
        if a >= b:
            slot[:n] = 0
            return
        if a > c0:
            slot[: a - c0] = 0
        if b < c1:
            slot[b - c0: n] = 0
        self._check_open()
        self._out[g] = self._d2h(g, [(inp.handle, a - i0, slot[a - c0: b - c0])])

    def chunk_ready(self, spec: Any, g: int) -> bool:
        return self._query(self._out, g, "D2H (device to host)", spec)

    def copy_chunk_in(self, spec: Any, c0: int, parts: list[tuple[int, np.ndarray]]) -> None:
        if not parts:
            return
        self._once(spec)
        self._check_open()
        g = self._g(spec, c0)
        out, o0 = spec.out, spec.out_off
        self._in[g] = self._h2d(g, [(out.handle, v - o0, src) for v, src in parts])

    def chunk_in_done(self, spec: Any, g: int) -> bool:
        return self._query(self._in, g, "H2D (host to device)", spec)

    def _query(self, table: dict, g: int, what: str, spec: Any) -> bool:
        h = table.get(g)
        if h is None:
            return True
        try:
            done = h.query()
        except HFReduceError:
            table.pop(g, None)
            raise
        except Exception as exc:  # noqa: BLE001 - a driver error becomes the group's failure
            table.pop(g, None)
            raise DeviceError(f"{self.name}: the {what} copy of chunk {g - spec.g0 + 1} of {spec.name} "
                              f"#{spec.seq} failed: {exc}") from exc
        err = getattr(h, "error", None)
        if err is not None:
            table.pop(g, None)
            raise DeviceError(f"{self.name}: the {what} copy of chunk {g - spec.g0 + 1} of {spec.name} "
                              f"#{spec.seq} failed: {err}") from err
        if done:
            table.pop(g, None)
        return done

    def _check_open(self) -> None:
        if self.closed:
            raise DeviceError(f"{self.name}: the device backend was closed (the group is being destroyed)")
