"""The reduce kernels and the shared-memory sync primitives: the C extension, or numpy.

``hfreduce._C`` (built by ``pip install -e .`` from ``_kernels.c``) adds N buffers into a
destination in one pass with SIMD, for every dtype (fp16 and bf16 through fp32), and gives the
engine atomics and futex waits on shared memory. When it is missing (no compiler at install
time) or ``HFREDUCE_KERNEL=numpy`` is set, the numpy versions below take over; ``KERNEL`` says
which one runs and :func:`hfreduce.info` reports it.

Everything here works on flat byte buffers (numpy uint8 arrays, memoryviews, mmap slices); the
dtype travels as a small integer code.
"""

from __future__ import annotations

import os
import time

import numpy as np

__all__ = [
    "KERNEL", "SIMD", "DT_F32", "DT_F64", "DT_F16", "DT_BF16", "DT_I32", "DT_I64", "DT_U8",
    "OP_SUM", "OP_AVG", "OP_MAX", "OP_MIN", "OP_BOR", "DTYPE_NAMES", "select",
    "reduce", "copy", "zero", "load", "store", "min_of", "publish", "epoch_wait", "load32",
]

DT_F32, DT_F64, DT_F16, DT_BF16, DT_I32, DT_I64, DT_U8 = range(7)
DTYPE_NAMES = {DT_F32: "float32", DT_F64: "float64", DT_F16: "float16", DT_BF16: "bfloat16",
               DT_I32: "int32", DT_I64: "int64", DT_U8: "bytes"}
OP_SUM, OP_AVG, OP_MAX, OP_MIN, OP_BOR = 0, 1, 2, 3, 4

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError:  # not built: the numpy fallback
    _C = None

_WANT_NUMPY = os.environ.get("HFREDUCE_KERNEL", "").lower() in ("numpy", "python", "fallback")
KERNEL = "c-simd" if _C is not None and not _WANT_NUMPY else "numpy"
SIMD = "numpy"

_NP = {DT_F32: np.float32, DT_F64: np.float64, DT_F16: np.float16, DT_BF16: np.uint16,
       DT_I32: np.int32, DT_I64: np.int64, DT_U8: np.uint8}


# -- numpy fallback kernels ------------------------------------------------------------------
def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(f: np.ndarray) -> np.ndarray:
    u = f.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def _view(buf, dtype: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=_NP[dtype]) if not isinstance(buf, np.ndarray) else buf.view(_NP[dtype])


def _np_reduce(dst, srcs, dtype: int, op: int, avg: int = 0, first=None, dst2=None) -> None:
    d = _view(dst, dtype)
    ss = [_view(s, dtype) for s in srcs]
    f = _view(first, dtype) if first is not None else None
    for s in [*ss, *([f] if f is not None else []), *([_view(dst2, dtype)] if dst2 is not None else [])]:
        if s.nbytes != d.nbytes:
            raise ValueError(f"buffer has {s.nbytes} bytes, destination {d.nbytes}")
    if dtype in (DT_F16, DT_BF16):
        tof = _bf16_to_f32 if dtype == DT_BF16 else (lambda a: a.astype(np.float32))
        acc = tof(d if f is None else f)
        for s in ss:
            _combine(acc, tof(s), op)
        if avg > 0:
            acc /= np.float32(avg)
        d[...] = _f32_to_bf16(acc) if dtype == DT_BF16 else acc.astype(np.float16)
    else:
        if f is not None:
            d[...] = f
        for s in ss:
            _combine(d, s, op)
        if avg > 0:
            if dtype in (DT_I32, DT_I64):
                np.floor_divide(d, avg, out=d)
            else:
                np.divide(d, avg, out=d)
    if dst2 is not None:
        _view(dst2, dtype)[...] = d


def _combine(acc: np.ndarray, x: np.ndarray, op: int) -> None:
    if op == OP_SUM:
        np.add(acc, x, out=acc)
    elif op == OP_MAX:
        np.maximum(acc, x, out=acc)
    elif op == OP_MIN:
        np.minimum(acc, x, out=acc)
    elif op == OP_BOR:
        np.bitwise_or(acc, x, out=acc)
    else:
        raise ValueError(f"bad op code {op}")


def _np_copy(dst, src) -> None:
    d = np.frombuffer(dst, np.uint8) if not isinstance(dst, np.ndarray) else dst.view(np.uint8)
    s = np.frombuffer(src, np.uint8) if not isinstance(src, np.ndarray) else src.view(np.uint8)
    if d.nbytes != s.nbytes:
        raise ValueError(f"copy: {s.nbytes} bytes into {d.nbytes}")
    d[...] = s


def _np_zero(dst) -> None:
    d = np.frombuffer(dst, np.uint8) if not isinstance(dst, np.ndarray) else dst.view(np.uint8)
    d[...] = 0


# [Note: the fallback's memory ordering]
# Without the extension, counters are plain int64 loads and stores through numpy. Each counter has
# one writer, and x86-64 keeps stores in order and loads in order (TSO), so a reader that sees a
# counter move also sees the data written before it. Waiting is polling with a growing sleep
# (no futex without the extension).
def _words(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.int64)


def _np_load(buf, i: int) -> int:
    return int(_words(buf)[i])


def _np_store(buf, i: int, v: int) -> None:
    _words(buf)[i] = v


def _np_min_of(buf, start: int, stride: int, count: int) -> int:
    return int(_words(buf)[start:start + (count - 1) * stride + 1:stride].min())


def _np_publish(buf, i: int, v: int, epoch_off: int, waiters: int) -> None:
    w = _words(buf)
    if i != waiters:
        w[i] = v
    e = np.frombuffer(buf, dtype=np.int32, count=1, offset=epoch_off)
    e[0] = (int(e[0]) + 1) & 0x7FFFFFFF


def _np_load32(buf, off: int) -> int:
    return int(np.frombuffer(buf, dtype=np.int32, count=1, offset=off)[0])


def _np_epoch_wait(buf, epoch_off: int, waiters: int, expected: int, timeout: float, spin: int = 100) -> bool:
    e = np.frombuffer(buf, dtype=np.int32, count=1, offset=epoch_off)
    end = time.monotonic() + timeout
    delay = 2e-5
    while int(e[0]) == expected:
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 5e-4)
    return True


_NUMPY_IMPL = {
    "reduce": _np_reduce, "copy": _np_copy, "zero": _np_zero, "load": _np_load, "store": _np_store,
    "min_of": _np_min_of, "publish": _np_publish, "epoch_wait": _np_epoch_wait, "load32": _np_load32,
}


reduce, copy, zero, load, store = _np_reduce, _np_copy, _np_zero, _np_load, _np_store
min_of, publish, epoch_wait, load32 = _np_min_of, _np_publish, _np_epoch_wait, _np_load32


def select(name: str) -> str:
    """Switch every kernel to ``"c-simd"`` or ``"numpy"`` (callers look them up at call time).

    Only for a process that has no group yet (tests of the fallback use it). Returns the kernel
    now in use: asking for "c-simd" without the extension built gives "numpy".
    """
    global KERNEL, SIMD
    use_c = name in ("c", "c-simd") and _C is not None
    g = globals()
    for fn, impl in _NUMPY_IMPL.items():
        g[fn] = getattr(_C, fn) if use_c else impl
    KERNEL = "c-simd" if use_c else "numpy"
    SIMD = _C.simd() if use_c else "numpy"
    return KERNEL


select(KERNEL)

# The numpy versions stay importable for tests that compare the two.
numpy_reduce = _np_reduce
