"""hfreduce's CUDA backend: device buffers (torch CUDA tensors, cupy arrays) staged through the arena.

UNTESTED ON GPU HARDWARE: written against cupy's documented runtime API and exercised on the CPU
only through the same engine code with the stand-in backend (:mod:`hfreduce.device.standin`).
``bench/allreduce_cuda.py`` is the check to run on a GPU machine.

How a collective on a CUDA tensor runs (the engine's pipeline is the host path's, unchanged):

* **Pinned staging.** The node's arena (the staging slots of every local rank) is registered with
  ``cudaHostRegister`` once per group and device, so copies to and from it are DMA on the copy
  engines, asynchronous to the host.
* **Ordering after the caller.** At submission an event is recorded on the caller's current
  stream (torch's for torch tensors, cupy's for cupy arrays); when the engine starts the
  operation, both copy streams wait for it, so the copies see what the caller's kernels wrote.
* **D2H.** ``copy_chunk_out``: ``cudaMemcpyAsync`` of the chunk into this rank's slot on this
  device's D2H stream, then an event. A waiter thread per direction synchronizes on the events
  in order (GIL released) and wakes the node's futex as each completes, so a sleeping engine
  reacts at once. (Not ``cudaLaunchHostFunc``: a Python host function holds the stream until it
  gets the GIL, which the CPU reduce may hold.)
* **Chunk ready?** ``cudaEventQuery`` of that event. Once every local rank's chunk is posted, the
  CPU reduces it (SIMD kernels), the tree runs between nodes.
* **H2D.** ``copy_chunk_in``: the final chunk (each slice from its owner's slot) goes back on the
  H2D stream, with an event; CONSUMED (slot reuse) waits for it. ``Work.wait()`` returns when the
  last H2D is done, so later work on any stream sees the result.
* **No GPU kernel** on the default path: the GPU's SMs stay with the model. The optional NVLink
  pair variant (:func:`allreduce_nvlink_pair`) runs one small cupy kernel (the pair add).

Without cupy or without a device the module still imports: :func:`available` is False and
:func:`unavailable_reason` says why; using a CUDA buffer then raises :class:`DeviceError`.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import Any

import numpy as np

from .buffers import np_dtype_code
from .device import DeviceBackend, DeviceBuf
from .errors import DeviceError, InvalidArgument
from .kernels import DT_BF16, DT_F16, DT_F32, DT_F64, DT_I32, DT_I64

__all__ = ["available", "unavailable_reason", "require", "info", "device_buf", "CudaDevice", "CudaBackend",
           "allreduce_nvlink_pair", "pair_empty"]

log = logging.getLogger(__name__)

_state: dict[str, Any] = {}
CLOSE_TIMEOUT = 30.0  # seconds destroy waits for copies in flight before giving up on them
_lock = threading.Lock()


def _probe() -> tuple[Any, str | None, int]:
    """(cupy module or None, reason it cannot run or None, device count)."""
    with _lock:
        if "probe" in _state:
            return _state["probe"]
        try:
            import cupy
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
            res = (None, f"cupy is not importable ({type(exc).__name__}: {exc}); install cupy-cuda13x "
                         "(or the cupy wheel matching the machine's CUDA)", 0)
        else:
            try:
                n = cupy.cuda.runtime.getDeviceCount()
            except Exception as exc:  # noqa: BLE001 - no driver, no device, driver too old
                res = (cupy, f"no usable CUDA device: the CUDA runtime says {type(exc).__name__}: {exc}", 0)
            else:
                res = (cupy, None if n > 0 else "no CUDA device: the CUDA runtime reports 0 devices", n)
        _state["probe"] = res
        return res


def available() -> bool:
    """True when cupy imports and at least one CUDA device is visible."""
    return _probe()[1] is None


def unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here (None when it can)."""
    return _probe()[1]


def require() -> Any:
    """The cupy module, or :class:`DeviceError` saying why the CUDA backend is unavailable."""
    cp, why, _ = _probe()
    if why is not None:
        raise DeviceError(f"hfreduce's CUDA backend is unavailable: {why}")
    return cp


def info() -> dict:
    cp, why, n = _probe()
    out: dict[str, Any] = {"available": why is None, "reason": why, "devices": n}
    if cp is not None:
        out["cupy"] = getattr(cp, "__version__", "?")
    return out


# -- device buffers ---------------------------------------------------------------------------------
class CudaDevice:
    """One CUDA device of this process: the factory of its backend for a group."""

    _devices: dict[int, CudaDevice] = {}

    def __init__(self, index: int) -> None:
        self.index = index
        self.key = ("cuda", index)

    @classmethod
    def get(cls, index: int) -> CudaDevice:
        d = cls._devices.get(index)
        if d is None:
            d = cls._devices[index] = CudaDevice(index)
        return d

    def make_backend(self, arena: Any, chunk: int, wake: Any) -> CudaBackend:
        return CudaBackend(self.index, arena, chunk, wake)


def _torch_code(t: Any) -> int | None:
    torch = sys.modules["torch"]
    return {torch.float32: DT_F32, torch.float64: DT_F64, torch.float16: DT_F16, torch.bfloat16: DT_BF16,
            torch.int32: DT_I32, torch.int64: DT_I64}.get(t.dtype)


def device_buf(obj: Any, what: str = "buf") -> DeviceBuf:
    """A torch CUDA tensor or a cupy array as a :class:`DeviceBuf` (raises if CUDA is unavailable)."""
    require()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        if not obj.is_contiguous():
            raise InvalidArgument(f"{what}: the CUDA tensor is not contiguous; call .contiguous() first")
        code = _torch_code(obj)
        if code is None:
            raise InvalidArgument(f"{what}: dtype {obj.dtype} is not supported on the CUDA backend")
        nbytes = obj.numel() * obj.element_size()
        return DeviceBuf(nbytes, code, CudaDevice.get(obj.device.index or 0), int(obj.data_ptr()), obj)
    cp = sys.modules["cupy"]
    if not isinstance(obj, cp.ndarray):
        raise InvalidArgument(f"{what}: expected a torch CUDA tensor or a cupy array, got {type(obj).__name__}")
    if not obj.flags.c_contiguous:
        raise InvalidArgument(f"{what}: the cupy array is not contiguous; pass a contiguous array")
    code = np_dtype_code(np.dtype(obj.dtype))
    if code is None:
        raise InvalidArgument(f"{what}: dtype {obj.dtype} is not supported on the CUDA backend")
    return DeviceBuf(int(obj.nbytes), code, CudaDevice.get(obj.device.id), int(obj.data.ptr), obj)


class _Copy:
    """The copies of one chunk: a CUDA event (``query`` is cudaEventQuery)."""

    __slots__ = ("g", "event", "error")

    def __init__(self, g: int, event: Any) -> None:
        self.g = g
        self.event = event
        self.error = None

    def query(self) -> bool:
        return bool(self.event.done)


class _Waiter(threading.Thread):
    """Waits for one direction's chunk events in order and wakes the node's futex on each."""

    def __init__(self, backend: CudaBackend, what: str) -> None:
        super().__init__(name=f"hfreduce-cuda{backend.index}-{what}", daemon=True)
        self.backend = backend
        self.q: queue.Queue = queue.Queue()

    def run(self) -> None:
        cp = self.backend.cp
        with cp.cuda.Device(self.backend.index):
            while True:
                ev = self.q.get()
                if ev is None:
                    return
                try:
                    ev.synchronize()  # cudaEventSynchronize, without the GIL
                except Exception:  # noqa: BLE001 - the engine's event query reports it
                    pass
                self.backend.wake()


class CudaBackend(DeviceBackend):
    """The device seam on one CUDA device: pinned arena, a D2H and an H2D stream, events per chunk."""

    name = "cuda"

    def __init__(self, index: int, arena: Any, chunk: int, wake: Any) -> None:
        super().__init__(arena, chunk, wake)
        cp = require()
        self.cp = cp
        self.index = index
        rt = cp.cuda.runtime
        self._rt = rt
        self._reg: list[int] = []
        with cp.cuda.Device(index):
            self.d2h_stream = cp.cuda.Stream(non_blocking=True)
            self.h2d_stream = cp.cuda.Stream(non_blocking=True)
            # [Note: pinned arena] the arena is MAP_SHARED memory of /dev/shm; registering it makes
            # every copy to or from a slot a DMA on the copy engines (unregistered memory would be
            # staged by the driver through its own pinned bounce buffer, synchronously)
            seg = arena.arena
            base = np.frombuffer(seg.map, np.uint8)
            ptr = int(base.ctypes.data)
            del base
            try:
                rt.hostRegister(ptr, seg.size, 1)  # cudaHostRegisterPortable
                self._reg.append(ptr)
            except Exception as exc:  # noqa: BLE001
                raise DeviceError(f"cuda:{index}: cudaHostRegister of the arena ({seg.size} bytes) failed: {exc}; "
                                  "check the memlock limit (ulimit -l)") from exc
        self._waiters = [_Waiter(self, "d2h"), _Waiter(self, "h2d")]
        for w in self._waiters:
            w.start()

    def prepare(self, spec: Any) -> None:
        cp = self.cp
        torch = sys.modules.get("torch")
        owner = (spec.inp if spec.inp is not None else spec.out).owner
        with cp.cuda.Device(self.index):
            if torch is not None and isinstance(owner, torch.Tensor):
                caller = cp.cuda.ExternalStream(torch.cuda.current_stream(self.index).cuda_stream)
            else:
                caller = cp.cuda.get_current_stream()
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(caller)
        spec.device_event = ev

    def _begin(self, spec: Any) -> None:
        ev = getattr(spec, "device_event", None)
        if ev is None:
            return
        with self.cp.cuda.Device(self.index):
            self.d2h_stream.wait_event(ev)  # the copies see what the caller's kernels wrote
            self.h2d_stream.wait_event(ev)  # and results land after the caller's last use

    def _enqueue(self, g: int, pieces, kind: int, stream: Any, waiter: _Waiter) -> _Copy:
        cp, rt = self.cp, self._rt
        with cp.cuda.Device(self.index):
            for ptr, off, host in pieces:
                h = int(host.ctypes.data)
                if kind == rt.memcpyDeviceToHost:
                    rt.memcpyAsync(h, ptr + off, host.nbytes, kind, stream.ptr)
                else:
                    rt.memcpyAsync(ptr + off, h, host.nbytes, kind, stream.ptr)
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(stream)
        waiter.q.put(ev)
        return _Copy(g, ev)

    def _d2h(self, g, pieces):
        return self._enqueue(g, pieces, self._rt.memcpyDeviceToHost, self.d2h_stream, self._waiters[0])

    def _h2d(self, g, pieces):
        return self._enqueue(g, pieces, self._rt.memcpyHostToDevice, self.h2d_stream, self._waiters[1])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        cp = self.cp
        with cp.cuda.Device(self.index):
            # bounded drain: a stuck copy must not hang destroy (cudaStreamSynchronize would)
            deadline = time.monotonic() + CLOSE_TIMEOUT
            try:
                evs = []
                for s in (self.d2h_stream, self.h2d_stream):
                    ev = cp.cuda.Event(block=False, disable_timing=True)
                    ev.record(s)
                    evs.append(ev)
                while not all(ev.done for ev in evs):
                    if time.monotonic() > deadline:
                        log.error("cuda:%d: copies still in flight %.0f s after close; the arena stays pinned "
                                  "(a stuck device?)", self.index, CLOSE_TIMEOUT)
                        return
                    time.sleep(0.001)
            except Exception:  # noqa: BLE001 - a failed device; unregister anyway
                log.exception("cuda:%d: draining the copy streams failed at close", self.index)
            finally:
                for w in self._waiters:
                    w.q.put(None)
                for w in self._waiters:
                    w.join(5.0)
            for ptr in self._reg:
                try:
                    self._rt.hostUnregister(ptr)
                except Exception:  # noqa: BLE001
                    log.exception("cuda:%d: cudaHostUnregister failed", self.index)
        self._reg = []

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.index}


# -- the NVLink pair variant ------------------------------------------------------------------------
_PAIR_ADD = None
_PAIR_ALLOCS: dict[int, int] = {}  # base pointer -> size of each pair_empty allocation (live)


def _pair_add_kernel(cp):
    global _PAIR_ADD
    if _PAIR_ADD is None:
        _PAIR_ADD = cp.ElementwiseKernel("T peer", "T mine", "mine = mine + peer", "hfreduce_pair_add")
    return _PAIR_ADD


class _PairAlloc:
    """A dedicated cudaMalloc (not from cupy's pool), so its IPC handle maps exactly this buffer."""

    def __init__(self, cp, nbytes: int) -> None:
        self.rt = cp.cuda.runtime
        self.ptr = self.rt.malloc(max(nbytes, 1))
        self.size = max(nbytes, 1)
        _PAIR_ALLOCS[self.ptr] = self.size

    def __del__(self) -> None:
        _PAIR_ALLOCS.pop(self.ptr, None)
        try:
            self.rt.free(self.ptr)
        except Exception:  # noqa: BLE001 - at exit the context may be gone
            pass


def pair_empty(n: int, dtype: Any = np.float32) -> Any:
    """A 1-D cupy array for :func:`allreduce_nvlink_pair` (its own allocation: shareable by IPC)."""
    cp = require()
    dt = np.dtype(dtype)
    alloc = _PairAlloc(cp, n * dt.itemsize)
    mem = cp.cuda.UnownedMemory(alloc.ptr, alloc.size, alloc)
    return cp.ndarray((n,), dt, cp.cuda.MemoryPointer(mem, 0))


def allreduce_nvlink_pair(buf: Any, op: Any = None, group: Any = None, timeout: float | None = None) -> None:
    """Allreduce a cupy array with the NVLink pair variant (paper §IV-C), synchronously.

    ``buf`` comes from :func:`pair_empty`. Local ranks 2k and 2k+1 form a pair (their GPUs joined
    by an NVLink bridge). Each GPU owns one half: (1) it adds its peer's copy of that half into
    its own over NVLink (CUDA IPC, one small cupy kernel); (2) the CPU allreduces the halves
    across the group: each rank copies only its half D2H and back (half the PCIe traffic; the
    engine still reduces the full length, the other half as zeros: see docs/hfreduce.md);
    (3) each GPU copies the other half from its peer over NVLink (pair allgather). SUM and AVG
    only; needs an even number of ranks on every node and peer access between the pair's GPUs.
    UNTESTED ON HARDWARE.
    """
    import hfreduce

    from .engine import ALLREDUCE
    from .ops import ReduceOp

    cp = require()
    op = ReduceOp.SUM if op is None else ReduceOp(op)
    if op not in (ReduceOp.SUM, ReduceOp.AVG):
        raise InvalidArgument("allreduce_nvlink_pair: only SUM and AVG (the pair step adds)")
    pg = group if group is not None else hfreduce.get_default()
    if pg.local_world_size % 2:
        raise InvalidArgument(f"allreduce_nvlink_pair: node {pg.node} has {pg.local_world_size} ranks; pairs need "
                              "an even number")
    if not isinstance(buf, cp.ndarray) or buf.ndim != 1 or not buf.flags.c_contiguous:
        raise InvalidArgument("allreduce_nvlink_pair: buf must be a contiguous 1-D cupy array from pair_empty()")
    ptr = int(buf.data.ptr)
    base = next((b for b, size in _PAIR_ALLOCS.items() if b <= ptr < b + size), None)
    if base is None:
        raise InvalidArgument("allreduce_nvlink_pair: buf was not allocated by hfreduce.cuda.pair_empty()")
    n = buf.size
    half = (n + 1) // 2
    side = pg.local_rank % 2
    lo, hi = (0, half) if side == 0 else (half, n)
    # exchange IPC handles and offsets (a host allgather of 72 bytes per rank)
    mine_h = np.zeros(9, np.int64)  # the collectives take int64, not bytes
    mine_h.view(np.uint8)[:64] = np.frombuffer(bytes(cp.cuda.runtime.ipcGetMemHandle(base)), np.uint8)[:64]
    mine_h[8] = ptr - base
    allh = np.zeros(9 * pg.world_size, np.int64)
    hfreduce.allgather(allh, mine_h, group=pg)
    pr = pg.local_ranks[pg.local_rank ^ 1]
    rec = allh[9 * pr: 9 * (pr + 1)]
    peer_base = cp.cuda.runtime.ipcOpenMemHandle(rec[:8].tobytes())
    try:
        peer_off = int(rec[8])
        mem = cp.cuda.UnownedMemory(peer_base, peer_off + buf.nbytes, None, buf.device.id)
        peer = cp.ndarray(buf.shape, buf.dtype, cp.cuda.MemoryPointer(mem, peer_off))
        cp.cuda.get_current_stream().synchronize()
        hfreduce.barrier(timeout, group=pg)  # both GPUs' buffers hold their inputs
        _pair_add_kernel(cp)(peer[lo:hi], buf[lo:hi])  # (1) pair reduce of my half over NVLink
        cp.cuda.get_current_stream().synchronize()
        hfreduce.barrier(timeout, group=pg)  # the peer is done reading my other half
        # (2) the CPU allreduces the halves: my half at its offset, zeros elsewhere; out = my half
        d = device_buf(buf[lo:hi], "buf")
        esz = buf.itemsize
        spec = pg._spec(ALLREDUCE, n * esz, d.dtype, op, inp=d, in_off=lo * esz, out=d, out_off=lo * esz, keep=buf)
        pg._submit(spec, async_op=True).wait(timeout)
        hfreduce.barrier(timeout, group=pg)  # both halves final on both GPUs
        other = slice(half, n) if side == 0 else slice(0, half)
        buf[other] = peer[other]  # (3) pair allgather over NVLink
        cp.cuda.get_current_stream().synchronize()
        hfreduce.barrier(timeout, group=pg)  # the peer finished reading my half
    finally:
        cp.cuda.runtime.ipcCloseMemHandle(peer_base)
