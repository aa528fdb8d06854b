"""The seam between haiscale and hfreduce: group resolution, buffers, coalesced collectives.

Everything haiscale sends goes through here, so the CUDA backend of hfreduce (issue 7) plugs in at
one place: ``backend_for(device)`` picks the host engine for CPU tensors and ``hfreduce.cuda`` for
CUDA tensors when that module exists.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from typing import Any

import numpy as np
import torch

from .errors import CommunicationError, DeviceError, ModelMismatchError, NotInitializedError

log = logging.getLogger(__name__)

# torch dtype -> numpy dtype used for the arena allocation (bfloat16 has no numpy dtype: its buffer
# is allocated as uint16 and viewed as bfloat16 on the torch side).
_NP_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: np.uint16,
    torch.int32: np.int32,
    torch.int64: np.int64,
}

#: ``timeout=DEFAULT_TIMEOUT`` (None): wait as long as the hfreduce group's own timeout
#: (``hfreduce.init(timeout=...)`` / $HFREDUCE_TIMEOUT, 30 minutes by default)
DEFAULT_TIMEOUT = None


def _hfreduce():
    import hfreduce

    return hfreduce


class Comm:
    """The collectives haiscale issues, on one hfreduce process group (None: the default group)."""

    def __init__(self, process_group: Any = None, timeout: float | datetime.timedelta | None = DEFAULT_TIMEOUT) -> None:
        hf = _hfreduce()
        if process_group is None and not hf.is_initialized():
            raise NotInitializedError(
                "haiscale needs an hfreduce process group: call hfreduce.init() in every process "
                "(it reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as torchrun and haiscale.spawn set them) "
                "or pass process_group=..."
            )
        self.hf = hf
        self.group = process_group
        # [Note: one timeout] haiscale's waits use the group's timeout unless given their own, so
        # one setting (hfreduce.init's, as torch's init_process_group's) governs the whole job
        if timeout is None:
            timeout = (process_group if process_group is not None else hf.get_default()).timeout
        elif isinstance(timeout, datetime.timedelta):
            timeout = timeout.total_seconds()
        self.timeout = float(timeout)
        if process_group is not None:
            self.rank = int(process_group.rank)
            self.world_size = int(process_group.world_size)
        else:
            self.rank = int(hf.get_rank())
            self.world_size = int(hf.get_world_size())

    # -- buffers -------------------------------------------------------------------------------
    def bucket_empty(self, numel: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, Any]:
        """A gradient bucket for tensors on ``device``: in the arena for CPU; on the device itself
        for CUDA, which hfreduce's CUDA backend stages through the arena chunk by chunk."""
        if device.type == "cuda":
            t = torch.empty(numel, dtype=dtype, device=device)
            return t, t
        return self.arena_empty(numel, dtype)

    def arena_empty(self, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """A 1-D tensor of ``numel`` elements in the node's shared-memory arena (zero-copy allreduce).

        Returns (tensor, handle): pass ``handle`` to the collectives (the numpy array hfreduce gave,
        or the tensor itself for bfloat16). Falls back to private memory if the arena refuses (the
        allreduce then copies in and out, still on hfreduce)."""
        npdt = _NP_DTYPES.get(dtype)
        if npdt is None:
            raise DeviceError(f"haiscale cannot reduce gradients of dtype {dtype}; supported: {list(_NP_DTYPES)}")
        try:
            arr = self.hf.empty((max(numel, 1),), npdt)
        except Exception as exc:  # arena full or unavailable: private memory, hfreduce still reduces
            log.warning("hfreduce arena refused %d x %s (%s); using private memory", numel, dtype, exc)
            t = torch.empty(max(numel, 1), dtype=dtype)
            return t[:numel], t[:numel]
        t = torch.from_numpy(arr)
        if dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
            return t[:numel], t[:numel]
        return t[:numel], arr[:numel]

    # -- collectives ---------------------------------------------------------------------------
    def _call(self, name: str, *args: Any, async_op: bool = False, **kw: Any) -> Any:
        """Submit an hfreduce collective; a synchronous one is waited for within ``self.timeout``."""
        fn = getattr(self.hf, name)
        if self.group is not None:
            kw["group"] = self.group
        try:
            work = fn(*args, async_op=True, **kw)
        except self.hf.HFReduceError as exc:
            raise CommunicationError(f"hfreduce {name} failed on rank {self.rank}: {exc}") from exc
        if not async_op:
            self.wait(work, name)
        return work

    def wait(self, work: Any, what: str = "collective") -> None:
        if work is None:
            return
        try:
            work.wait(timeout=self.timeout)
        except self.hf.HFReduceError as exc:
            raise CommunicationError(f"hfreduce {what} failed on rank {self.rank}: {exc}") from exc

    def allreduce_avg(self, buf: Any, async_op: bool = True) -> Any:
        return self._call("allreduce", buf, op=self.hf.ReduceOp.AVG, async_op=async_op)

    def allreduce(self, buf: Any, op: Any, async_op: bool = False) -> Any:
        return self._call("allreduce", buf, op=op, async_op=async_op)

    def broadcast(self, buf: Any, src: int = 0, async_op: bool = False) -> Any:
        return self._call("broadcast", buf, src=src, async_op=async_op)

    def allgather(self, out: Any, inp: Any, async_op: bool = False) -> Any:
        return self._call("allgather", out, inp, async_op=async_op)

    def all_to_all(self, out: Any, inp: Any, out_splits: list[int] | None = None,
                   in_splits: list[int] | None = None, async_op: bool = False) -> Any:
        """``inp`` chunk j goes to rank j, ``out`` chunk i comes from rank i (as torch's
        ``all_to_all_single``): splits count rows along the first dimension, ``None`` = equal.

        Expert parallelism (haiscale.moe) sends each token to the rank of its expert with uneven
        splits; both split lists are the caller's (it exchanged the counts before)."""
        return self._call("all_to_all", out, inp, out_splits=out_splits, in_splits=in_splits, async_op=async_op)

    def reduce_scatter_avg(self, out: Any, inp: Any, async_op: bool = True) -> Any:
        return self._call("reduce_scatter", out, inp, op=self.hf.ReduceOp.AVG, async_op=async_op)

    # point-to-point (haiscale.pipeline): messages between a pair with the same tag arrive in order.
    # [Note: a blocking recv is irecv + wait] so it keeps haiscale's timeout and error wrapping, and
    # only hfreduce's isend/irecv (which always return a Work) are needed.
    def _p2p(self, name: str, t: Any, peer: int, tag: int) -> Any:
        kw = {"group": self.group} if self.group is not None else {}
        try:
            return getattr(self.hf, name)(t, peer, tag=tag, **kw)
        except self.hf.HFReduceError as exc:
            raise CommunicationError(f"hfreduce {name} with rank {peer} failed on rank {self.rank}: {exc}") from exc

    def isend(self, t: Any, dst: int, tag: int = 0) -> Any:
        return self._p2p("isend", t, dst, tag)

    def irecv(self, t: Any, src: int, tag: int = 0) -> Any:
        return self._p2p("irecv", t, src, tag)

    def recv(self, t: Any, src: int, tag: int = 0) -> None:
        self.wait(self.irecv(t, src, tag), f"recv from rank {src}")

    def barrier(self) -> None:
        kw = {"group": self.group} if self.group is not None else {}
        try:
            self.hf.barrier(timeout=self.timeout, **kw)
        except self.hf.HFReduceError as exc:
            raise CommunicationError(f"hfreduce barrier failed on rank {self.rank}: {exc}") from exc

    # -- helpers built on them -----------------------------------------------------------------
    def broadcast_tensors(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Broadcast ``tensors`` from ``src`` in place, one coalesced buffer per dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype in sorted(by_dtype, key=str):
            group = by_dtype[dtype]
            if dtype == torch.bool:
                for t in group:
                    tmp = t.to(torch.int32)
                    self.broadcast(tmp, src=src)
                    t.copy_(tmp.bool())
                continue
            flat = torch.cat([t.detach().reshape(-1) for t in group]) if group else torch.empty(0)
            if flat.dtype not in _NP_DTYPES:
                flat = flat.to(torch.float64)
            self.broadcast(flat, src=src)
            off = 0
            with torch.no_grad():
                for t in group:
                    n = t.numel()
                    t.copy_(flat[off : off + n].view_as(t).to(t.dtype))
                    off += n

    def check_same_model(self, named: list[tuple[str, torch.Tensor]], what: str = "module") -> None:
        """Raise ModelMismatchError on every rank unless all ranks wrapped the same parameter list.

        Each rank allgathers (count, total numel, digest of names/shapes/dtypes); on a difference all
        ranks see the same table, so all raise the same error (no rank is left waiting)."""
        desc = [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in named]
        digest = int.from_bytes(hashlib.sha256("\n".join(desc).encode()).digest()[:7], "little")
        mine = np.array([len(named), sum(t.numel() for _, t in named), digest], dtype=np.int64)
        table = np.zeros(3 * self.world_size, dtype=np.int64)
        self.allgather(table, mine)
        table = table.reshape(self.world_size, 3)
        ref = table[0]
        for r in range(self.world_size):
            if not np.array_equal(table[r], ref):
                raise ModelMismatchError(
                    f"the ranks wrapped different {what}s: rank 0 has {ref[0]} parameters "
                    f"({ref[1]} elements), rank {r} has {table[r][0]} parameters ({table[r][1]} elements)"
                    + (" with the same count but different names, shapes or dtypes" if ref[0] == table[r][0] else "")
                    + f"; this rank ({self.rank}) has: {', '.join(desc[:8])}{' ...' if len(desc) > 8 else ''}. "
                    "Build the same model on every rank before wrapping it."
                )


def check_devices(module: torch.nn.Module, device_ids: list[Any] | None, what: str) -> torch.device:
    """The single device of ``module``'s parameters and buffers, or a DeviceError saying what is wrong."""
    devices = {t.device for t in list(module.parameters()) + list(module.buffers())}
    if not devices:
        devices = {torch.device("cpu")}
    if len(devices) > 1:
        raise DeviceError(
            f"{what} needs all parameters and buffers on one device, found {sorted(str(d) for d in devices)}; "
            "move the module with .to(device) before wrapping it"
        )
    device = devices.pop()
    if device.type == "meta":
        raise DeviceError(
            f"{what}: the module's parameters are on the meta device (no data to train or broadcast); "
            "materialise them with module.to_empty(device='cpu') and initialise them before wrapping"
        )
    if device.type == "cpu":
        if device_ids:
            raise DeviceError(
                f"{what}: device_ids={device_ids} was given but the module is on the CPU; "
                "pass device_ids=None for a CPU module or move the module to that device first"
            )
    elif device.type == "cuda":
        backend_for(device, what)
        if device_ids and torch.device("cuda", int(str(device_ids[0]).split(":")[-1])) != device:
            raise DeviceError(f"{what}: device_ids={device_ids} but the module is on {device}")
    else:
        raise DeviceError(f"{what}: parameters on device {device} are not supported (CPU, or CUDA with hfreduce.cuda)")
    return device


def backend_for(device: torch.device, what: str = "haiscale") -> str:
    """Which hfreduce engine reduces tensors on ``device``: 'host' for CPU, 'cuda' for CUDA tensors.

    [Note: device backend seam] CUDA tensors go to ``hfreduce.cuda`` (issue 7), which copies
    chunks D2H into the arena while the CPU reduces; where it cannot run (no cupy, no device) a
    CUDA module is refused here with its reason instead of silently staging through another library."""
    if device.type == "cpu":
        return "host"
    if device.type == "cuda":
        try:
            import hfreduce.cuda as hcuda
        except Exception as exc:
            raise DeviceError(
                f"{what}: the module is on {device} but hfreduce's CUDA backend is unavailable ({exc}); "
                "train on the CPU or install the hfreduce CUDA backend"
            ) from exc
        if not hcuda.available():  # the module imports without a GPU / cupy and says why
            raise DeviceError(
                f"{what}: the module is on {device} but hfreduce's CUDA backend is unavailable "
                f"({hcuda.unavailable_reason()}); train on the CPU or install cupy for this CUDA"
            )
        return "cuda"
    raise DeviceError(f"{what}: no hfreduce backend for device {device}")
