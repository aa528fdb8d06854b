"""One FSDP unit's parameters as a single flat, padded, sharded buffer.

Layout: the unit's parameters (registration order, tied parameters once) are concatenated into a
flat vector of ``padded`` elements, ``padded = ceil(total / N) * N``; rank r owns elements
``[r * shard, (r + 1) * shard)`` as ``flat_shard`` (an ``nn.Parameter``, what the optimizer sees).

States (``UnitState``)::

    SHARDED --unshard() (new `full`, allgather into it)--> UNSHARDED --reshard() (drop `full`)--> SHARDED
        \\--unshard(async_op=True)--> GATHERING --wait_unshard()--> UNSHARDED

[Note: how the full buffer is freed between forward and backward]
Autograd saves views of the full parameters for backward (a Linear saves its weight), which would
keep the whole gathered buffer alive until backward. While a unit runs forward, a
``saved_tensors_hooks`` pack hook recognises tensors that live in a unit's gathered buffer and
saves (unit, offset, shape, strides) instead; the unpack hook rebuilds the view from the buffer
gathered again before backward (same values, by construction). The autograd leaf ``full_param``
(whose gradient is the whole padded unit gradient) gets its ``.data`` swapped to an empty tensor
after forward and back to the new buffer before backward, as PyTorch FSDP does with its flat
parameter. Storages are never resized, so hfreduce may export the buffers to numpy freely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._comm import Comm
from ..errors import UsageError


class UnitState(enum.Enum):
    SHARDED = "sharded"
    GATHERING = "gathering"
    UNSHARDED = "unsharded"


@dataclass
class ParamInfo:
    fqn: str  # name in the original (unwrapped) module
    module: nn.Module  # owner submodule
    attr: str  # attribute name on the owner
    shape: torch.Size
    numel: int
    offset: int
    alias_of: int | None = None  # index of the first occurrence for a tied parameter


class FlatParamUnit:
    def __init__(self, entries: list[tuple[str, nn.Module, str, nn.Parameter]], comm: Comm,
                 sync_module_states: bool) -> None:
        self.comm = comm
        n = comm.world_size
        self.infos: list[ParamInfo] = []
        first: dict[int, int] = {}
        offset = 0
        dtypes = {p.dtype for *_, p in entries}
        if len(dtypes) > 1:
            raise UsageError(
                f"an FSDP unit needs one parameter dtype, got {sorted(map(str, dtypes))} in "
                f"{[e[0] for e in entries][:6]}; use an auto_wrap_policy that separates them"
            )
        grads = {p.requires_grad for *_, p in entries}
        if len(grads) > 1:
            raise UsageError("an FSDP unit cannot mix frozen (requires_grad=False) and trainable parameters; "
                             "wrap the frozen part as its own unit")
        self.dtype = dtypes.pop() if dtypes else torch.float32
        self.requires_grad = grads.pop() if grads else False
        sources: list[torch.Tensor] = []
        for fqn, mod, attr, p in entries:
            if id(p) in first:
                j = first[id(p)]
                self.infos.append(ParamInfo(fqn, mod, attr, p.shape, p.numel(), self.infos[j].offset, alias_of=j))
                continue
            first[id(p)] = len(self.infos)
            self.infos.append(ParamInfo(fqn, mod, attr, p.shape, p.numel(), offset))
            sources.append(p.detach().reshape(-1))
            offset += p.numel()
        self.total = offset
        self.padded = -(-max(offset, 1) // n) * n
        self.shard_numel = self.padded // n
        full = torch.zeros(self.padded, dtype=self.dtype)
        if sources:
            torch.cat(sources, out=full[: self.total])
        if sync_module_states:
            comm.broadcast(full, src=0)
        r = comm.rank
        self.flat_shard = nn.Parameter(full[r * self.shard_numel : (r + 1) * self.shard_numel].clone(),
                                       requires_grad=self.requires_grad)
        del full, sources
        for info in self.infos:  # the unit owns them now
            if info.attr in info.module._parameters:
                del info.module._parameters[info.attr]
        self.full: torch.Tensor | None = None
        self.state = UnitState.SHARDED
        self.work: Any = None
        self.full_param: torch.Tensor | None = None  # autograd leaf of the current step
        self._bind_placeholders()

    # -- gather / free ---------------------------------------------------------------------------
    def unshard(self, async_op: bool = False) -> None:
        if self.state is not UnitState.SHARDED:
            if not async_op:
                self.wait_unshard()
            return
        self.full = torch.empty(self.padded, dtype=self.dtype)
        self.work = self.comm.allgather(self.full, self.flat_shard.detach(), async_op=True)
        self.state = UnitState.GATHERING
        if not async_op:
            self.wait_unshard()

    def wait_unshard(self) -> None:
        if self.state is UnitState.GATHERING:
            work, self.work = self.work, None
            self.comm.wait(work, "allgather of an FSDP unit")
            self.state = UnitState.UNSHARDED
            if self.full_param is not None:  # backward: the leaf points at the new buffer again
                self.full_param.data = self.full

    def reshard(self) -> None:
        self.wait_unshard()
        if self.state is UnitState.UNSHARDED:
            self.full = None
            self.state = UnitState.SHARDED
            if self.full_param is not None:
                self.full_param.data = torch.empty(0, dtype=self.dtype)
            self._bind_placeholders()

    def forget_step(self) -> None:
        """Drop the autograd leaf of the finished step."""
        self.full_param = None

    # -- exposing the parameters to the module ----------------------------------------------------
    def use_full(self, autograd: bool) -> torch.Tensor | None:
        """Point each owner attribute at its slice of the gathered buffer.

        With ``autograd``, the slices come from one leaf tensor ``full_param`` (returned), whose
        gradient (the unit's whole padded gradient) autograd assembles in one op."""
        self.wait_unshard()
        assert self.full is not None
        if autograd and self.requires_grad:
            base = self.full.detach().requires_grad_(True)
            self.full_param = base
        else:
            base = self.full
            self.full_param = None
        uniq = [i for i in self.infos if i.alias_of is None]
        sizes = [i.numel for i in uniq]
        pad = self.padded - self.total
        pieces = torch.split(base, sizes + ([pad] if pad else []))
        self._bind([pieces[k].view(i.shape) for k, i in enumerate(uniq)])
        return self.full_param

    def _bind(self, views: list[torch.Tensor]) -> None:
        k = 0
        resolved: list[torch.Tensor] = []
        for info in self.infos:
            if info.alias_of is None:
                t = views[k]
                k += 1
            else:
                t = resolved[info.alias_of]
            resolved.append(t)
            setattr(info.module, info.attr, t)

    def _bind_placeholders(self) -> None:
        """While sharded, attributes are meta tensors of the right shape (repr works, compute fails)."""
        self._bind([torch.empty(i.shape, dtype=self.dtype, device="meta") for i in self.infos if i.alias_of is None])

    def shard_slice(self, full: torch.Tensor) -> torch.Tensor:
        r = self.comm.rank
        return full[r * self.shard_numel : (r + 1) * self.shard_numel]

    # -- saved tensors ------------------------------------------------------------------------------
    def owns(self, t: torch.Tensor) -> bool:
        full = self.full
        return (full is not None and t.device.type == "cpu" and t.dtype == self.dtype
                and t.untyped_storage().data_ptr() == full.untyped_storage().data_ptr())

    def rebuild(self, offset: int, size: torch.Size, stride: tuple[int, ...]) -> torch.Tensor:
        if self.state is not UnitState.UNSHARDED:
            self.unshard()  # its pre-backward hook did not run (e.g. outputs not requiring grad)
        assert self.full is not None
        return self.full.as_strided(size, stride, offset)


class SavedTensorRouter:
    """The pack/unpack hooks: tensors living in a gathered unit buffer are saved by reference."""

    def __init__(self, units: list[Any]) -> None:
        self.units = units  # FullyShardedDataParallel instances (their .unit)

    def pack(self, t: torch.Tensor) -> Any:
        if t.device.type == "cpu" and t.layout == torch.strided:
            for u in self.units:
                unit = u.unit
                if unit.owns(t):
                    return (unit, t.storage_offset(), t.size(), t.stride(), t.requires_grad)
        return t

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):
            unit, offset, size, stride, _rg = packed
            return unit.rebuild(offset, size, stride)
        return packed

    def context(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
