"""Caller buffers as flat byte views: numpy arrays and torch CPU tensors, zero-copy.

A buffer becomes a :class:`Buf`: a writable uint8 view of its memory, the dtype code the
kernels use, and its address (to tell whether it lies in the node's shared-memory arena). torch
is never imported here: a torch tensor is recognised by its type, and ``torch`` is then already
in ``sys.modules``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidArgument
from .kernels import DT_BF16, DT_F16, DT_F32, DT_F64, DT_I32, DT_I64, DTYPE_NAMES

__all__ = ["Buf", "as_buf", "np_dtype_code"]

_NP_CODES = {
    np.dtype(np.float32): DT_F32, np.dtype(np.float64): DT_F64, np.dtype(np.float16): DT_F16,
    np.dtype(np.int32): DT_I32, np.dtype(np.int64): DT_I64,
}
SUPPORTED = "float32, float64, float16, bfloat16, int32, int64"


@dataclass
class Buf:
    """A caller buffer as bytes: ``data`` (uint8 view), ``dtype`` (kernel code), ``addr``."""

    data: np.ndarray
    dtype: int
    addr: int
    owner: Any  # keeps the caller's object alive while an async operation runs

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def np_dtype_code(dt: np.dtype) -> int | None:
    code = _NP_CODES.get(dt)
    if code is None and dt.name == "bfloat16":  # ml_dtypes.bfloat16
        return DT_BF16
    return code


def as_buf(buf: Any, what: str = "buf", writable: bool = True) -> Buf:
    """Describe ``buf`` (numpy array or torch CPU tensor, contiguous) without copying it."""
    if _is_torch_tensor(buf):
        arr, code = _torch_view(buf, what)
    else:
        if isinstance(buf, np.ndarray):
            arr = buf
        else:
            try:
                arr = np.asarray(memoryview(buf))
            except TypeError:
                raise InvalidArgument(f"{what}: expected a numpy array or a torch CPU tensor, got "
                                      f"{type(buf).__name__}") from None
        code = np_dtype_code(arr.dtype)
        if code is None:
            raise InvalidArgument(f"{what}: dtype {arr.dtype} is not supported (supported: {SUPPORTED}; "
                                  "for bfloat16 pass a torch tensor or an ml_dtypes.bfloat16 array)")
    if not arr.flags.c_contiguous:
        raise InvalidArgument(f"{what}: the buffer is not contiguous; pass a contiguous array "
                              "(copying it silently would hide a performance bug)")
    if writable and not arr.flags.writeable:
        raise InvalidArgument(f"{what}: the buffer is read-only and this collective writes into it")
    data = arr.reshape(-1).view(np.uint8) if arr.size else np.empty(0, np.uint8)
    addr = arr.__array_interface__["data"][0]
    return Buf(data, code, addr, buf)


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _torch_view(t: Any, what: str) -> tuple[np.ndarray, int]:
    torch = sys.modules["torch"]
    if t.device.type != "cpu":
        raise InvalidArgument(f"{what}: a {t.device.type} tensor; the host engine takes CPU tensors "
                              "(device buffers need the CUDA backend)")
    if not t.is_contiguous():
        raise InvalidArgument(f"{what}: the tensor is not contiguous; call .contiguous() first")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), DT_BF16
    codes = {torch.float32: DT_F32, torch.float64: DT_F64, torch.float16: DT_F16, torch.int32: DT_I32,
             torch.int64: DT_I64}
    code = codes.get(t.dtype)
    if code is None:
        raise InvalidArgument(f"{what}: dtype {t.dtype} is not supported (supported: {SUPPORTED})")
    return t.numpy(), code
