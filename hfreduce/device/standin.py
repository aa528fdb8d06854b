"""A stand-in for a GPU: host arrays behind copy-engine threads with a configurable latency.

It exists so the device path of the engine (the same pipeline code as the host path, with
asynchronous D2H / H2D copies and event queries) runs, and is tested, on machines without a GPU.
It is not a GPU and measures nothing about one.

    dev = StandInDevice(latency=0.005)          # one per process: "this rank's GPU"
    x = dev.array(np.ones(1 << 20, np.float32))  # "device memory" (a private host array)
    hfreduce.allreduce(x)                        # staged through the arena chunk by chunk
    x.numpy()                                    # the result ("copy back to the host")
    dev.trace                                    # [(what, g, t_issue, t_start, t_end), ...]

Like a GPU, it has one copy engine (a thread) per direction: D2H copies run in order on one,
H2D copies on the other, each taking ``latency`` seconds (plus ``nbytes / bandwidth``) before
the bytes move. Every copy and every CPU reduce of this rank is recorded in ``trace`` with
``time.monotonic()`` stamps: ``("d2h", g, issued, started, ended)``, ``("h2d", ...)`` and
``("reduce", g, started, started, ended)``.

Test knobs: ``fail=("d2h" | "h2d", k)`` makes the k-th copy in that direction (0-based,
counted over this device's life) fail like a device fault. ``hold=True`` makes the copy engine
finish the D2H of chunk g only once (a) the D2H of chunk g + 1 has been issued (unless g is the
collective's last chunk) and (b) this rank has finished reducing chunk g - 1 (unless g is its
first), or ``hold_timeout`` passed (counted in ``hold_timeouts``). A pipelined engine meets both
without waiting, so it completes with ``hold_timeouts == 0``, and the recorded stamps then show,
without relying on any duration, that the D2H of chunk g + 1 was in flight during the whole
reduce of chunk g: issued before D2H g ended (so before reduce g started), ended after reduce g
ended. An engine that copied a chunk, waited for it and reduced it before issuing the next copy
would stall on every hold.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Any

import numpy as np

from ..buffers import np_dtype_code
from ..errors import DeviceError, InvalidArgument
from ..kernels import DT_BF16
from . import ChunkCopy, DeviceBackend, DeviceBuf

__all__ = ["StandInDevice", "StandInArray", "StandInBackend"]

_ids = itertools.count()


class StandInDevice:
    """This process's stand-in GPU: its copy latency, its trace and its fault injection."""

    def __init__(self, latency: float = 0.0, bandwidth: float | None = None, fail: tuple[str, int] | None = None,
                 hold: bool = False, hold_timeout: float = 5.0) -> None:
        if latency < 0:
            raise InvalidArgument(f"StandInDevice: latency must be >= 0 seconds (got {latency})")
        if bandwidth is not None and bandwidth <= 0:
            raise InvalidArgument(f"StandInDevice: bandwidth must be > 0 bytes/s (got {bandwidth})")
        if fail is not None and (fail[0] not in ("d2h", "h2d") or int(fail[1]) < 0):
            raise InvalidArgument(f"StandInDevice: fail must be ('d2h' | 'h2d', index >= 0), got {fail!r}")
        self.latency = latency
        self.bandwidth = bandwidth
        self.fail = fail
        self.hold = hold
        self.hold_timeout = hold_timeout
        self.key = ("standin", next(_ids))
        self.trace: list[tuple[str, int, float, float, float]] = []
        self.hold_timeouts = 0
        self.copies = {"d2h": 0, "h2d": 0}

    def array(self, host: np.ndarray, bfloat16: bool = False) -> StandInArray:
        """Put ``host`` on the stand-in device (a private copy, as cudaMemcpy would make)."""
        return StandInArray(self, np.array(host, copy=True, order="C"), bfloat16)

    def make_backend(self, arena: Any, chunk: int, wake: Any) -> StandInBackend:
        return StandInBackend(self, arena, chunk, wake)

    def duration(self, nbytes: int) -> float:
        """How long a copy of ``nbytes`` takes on this device's copy engine."""
        return self.latency + (nbytes / self.bandwidth if self.bandwidth else 0.0)

    def _sync_copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        end = time.monotonic() + self.duration(src.nbytes)
        dst[:] = src  # the bytes move during the copy's duration, as a DMA engine moves them
        left = end - time.monotonic()
        if left > 0:
            time.sleep(left)

    def events(self, what: str) -> dict[int, tuple[float, float, float]]:
        """The recorded (issued, started, ended) of each chunk ``g`` for ``what`` (d2h/h2d/reduce)."""
        return {g: (a, b, c) for w, g, a, b, c in self.trace if w == what}


class StandInArray:
    """Device memory of a :class:`StandInDevice`: the engine may not touch it, only copy it."""

    def __init__(self, device: StandInDevice, data: np.ndarray, bfloat16: bool = False) -> None:
        if bfloat16 and data.dtype != np.uint16:
            raise InvalidArgument("StandInArray: bfloat16 data is given as uint16 bits")
        self.device = device
        self._data = data
        self.bfloat16 = bfloat16

    @property
    def nbytes(self) -> int:
        return self._data.nbytes

    def numpy(self) -> np.ndarray:
        """A host copy of the contents."""
        return self._data.copy()

    def copy_to_host(self, dst: np.ndarray) -> None:
        """A synchronous whole-buffer D2H (cudaMemcpy), taking the device's latency and bandwidth."""
        self.device._sync_copy(dst.reshape(-1).view(np.uint8), self._data.reshape(-1).view(np.uint8))

    def copy_from_host(self, src: np.ndarray) -> None:
        """A synchronous whole-buffer H2D (cudaMemcpy), taking the device's latency and bandwidth."""
        self.device._sync_copy(self._data.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8))

    def __hfreduce_device_buf__(self, what: str) -> DeviceBuf:
        code = DT_BF16 if self.bfloat16 else np_dtype_code(self._data.dtype)
        if code is None:
            raise InvalidArgument(f"{what}: dtype {self._data.dtype} is not supported on the device")
        raw = self._data.reshape(-1).view(np.uint8) if self._data.size else np.empty(0, np.uint8)
        return DeviceBuf(self.nbytes, code, self.device, raw, self)


class _CopyEngine(threading.Thread):
    """One direction's copy engine: runs the queued copies of chunks in order."""

    def __init__(self, backend: StandInBackend, what: str) -> None:
        super().__init__(name=f"standin-{what}", daemon=True)
        self.backend = backend
        self.what = what
        self.q: queue.Queue = queue.Queue()

    def run(self) -> None:
        dev = self.backend.dev
        busy_until = 0.0  # when the copy engine finishes the copy before this one
        while True:
            job = self.q.get()
            if job is None:
                return
            g, (first, last), pieces, handle, issued = job
            try:
                if self.what == "d2h" and dev.hold:
                    self.backend.hold(g, first, last, dev.hold_timeout)
                started = time.monotonic()
                # [Note: copy-engine clock] the engine moves bytes at a fixed rate: a copy queued
                # behind another ends `duration` after that one's end (sleep overshoot does not
                # accumulate), and its bytes move within that time (the memcpy is not added to it)
                busy_until = max(started, busy_until) + dev.duration(sum(p[2].nbytes for p in pieces))
                if self.backend.closed:
                    # the group is going away: never touch the arena once close() returned
                    raise DeviceError(f"stand-in {self.what} copy of chunk {g} cancelled: the backend was closed")
                k = dev.copies[self.what]
                dev.copies[self.what] = k + 1
                if dev.fail is not None and dev.fail == (self.what, k):
                    raise DeviceError(f"stand-in device fault injected in {self.what} copy #{k}")
                for dev_raw, off, host in pieces:
                    if self.what == "d2h":
                        host[:] = dev_raw[off: off + host.nbytes]
                    else:
                        dev_raw[off: off + host.nbytes] = host
                left = busy_until - time.monotonic()
                if left > 0 and self.backend.closing.wait(left):
                    raise DeviceError(f"stand-in {self.what} copy of chunk {g} cancelled: the backend was closed")
                dev.trace.append((self.what, g, issued, started, time.monotonic()))
                handle.finish()
            except BaseException as exc:  # noqa: BLE001 - reported through the event query
                handle.finish(exc)
            self.backend.wake()


class StandInBackend(DeviceBackend):
    """The device seam over a :class:`StandInDevice`: two copy-engine threads, event flags."""

    name = "standin"

    def __init__(self, dev: StandInDevice, arena: Any, chunk: int, wake: Any) -> None:
        super().__init__(arena, chunk, wake)
        self.dev = dev
        self.trace = True
        self._reduced = -1
        self._issued = -1
        self.closing = threading.Event()
        self._cv = threading.Condition()
        self._engines = {w: _CopyEngine(self, w) for w in ("d2h", "h2d")}
        for e in self._engines.values():
            e.start()

    def _submit(self, what: str, g: int, where: tuple[bool, bool], pieces) -> ChunkCopy:
        h = ChunkCopy(g)
        self._engines[what].q.put((g, where, pieces, h, time.monotonic()))
        return h

    def copy_chunk_out(self, spec: Any, c0: int, c1: int, slot: np.ndarray) -> None:
        g = self._g(spec, c0)
        self._where = (g == spec.g0, g == spec.g0 + spec.nchunks - 1)
        super().copy_chunk_out(spec, c0, c1, slot)
        with self._cv:
            self._issued = max(self._issued, g)
            self._cv.notify_all()

    def _d2h(self, g, pieces):
        return self._submit("d2h", g, self._where, pieces)

    def _h2d(self, g, pieces):
        return self._submit("h2d", g, (False, False), pieces)

    def on_reduced(self, spec: Any, g: int, t0: float, t1: float) -> None:
        self.dev.trace.append(("reduce", g, t0, t0, t1))
        with self._cv:
            self._reduced = max(self._reduced, g)
            self._cv.notify_all()

    def hold(self, g: int, first: bool, last: bool, timeout: float) -> None:
        """The ``hold`` test knob: D2H of chunk ``g`` waits for the issue of g + 1 and the end of
        this rank's reduce of g - 1 (see the module docstring)."""
        def ok() -> bool:
            return self.closed or ((last or self._issued >= g + 1) and (first or self._reduced >= g - 1))

        with self._cv:
            if not self._cv.wait_for(ok, timeout):
                self.dev.hold_timeouts += 1

    def close(self) -> None:
        if self.closed:
            return
        with self._cv:
            self.closed = True
            self._cv.notify_all()
        self.closing.set()
        for e in self._engines.values():
            e.q.put(None)
        for e in self._engines.values():
            e.join(10.0)

    def describe(self) -> dict:
        d = self.dev
        return {"backend": self.name, "latency": d.latency, "bandwidth": d.bandwidth, "hold": d.hold}
