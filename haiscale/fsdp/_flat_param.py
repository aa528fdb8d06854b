"""One FSDP unit's parameters as a single flat, padded, sharded buffer.

Layout: the unit's parameters (registration order, tied parameters once) are concatenated into a
flat vector of ``padded`` elements, ``padded = ceil(total / N) * N``; rank r owns elements
``[r * shard, (r + 1) * shard)`` as ``flat_shard`` (an ``nn.Parameter``, what the optimizer sees).

States (``UnitState``)::

    SHARDED --unshard() (allgather into `full`)--> UNSHARDED --reshard() (free `full`'s storage)--> SHARDED
        \\--unshard(async_op=True)--> GATHERING --wait_unshard()--> UNSHARDED

[Note: freeing the full buffer by resizing its storage]
Autograd saves views of the full parameters for backward (a Linear saves its weight). Resizing the
storage of ``full`` to 0 frees the memory without dropping those views; before the unit's backward
the storage is resized back and refilled by a second allgather, so the saved views see the same
values again. PyTorch FSDP uses the same trick.
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
    UNSHARDED = "unshardeded"


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
        self.full = torch.empty(self.padded, dtype=self.dtype)
        self._nbytes = self.full.untyped_storage().nbytes()
        self._bind(self.full)  # attributes exist (no data) while sharded, so repr() and hasattr() work
        self.full.untyped_storage().resize_(0)
        self.state = UnitState.SHARDED
        self.work: Any = None
        self.full_param: torch.Tensor | None = None

    # -- gather / free ---------------------------------------------------------------------------
    def unshard(self, async_op: bool = False) -> None:
        if self.state is not UnitState.SHARDED:
            if not async_op:
                self.wait_unshard()
            return
        self.full.untyped_storage().resize_(self._nbytes)
        self.work = self.comm.allgather(self.full, self.flat_shard.detach(), async_op=True)
        self.state = UnitState.GATHERING
        if not async_op:
            self.wait_unshard()

    def wait_unshard(self) -> None:
        if self.state is UnitState.GATHERING:
            work, self.work = self.work, None
            self.comm.wait(work, "allgather of an FSDP unit")
            self.state = UnitState.UNSHARDED

    def reshard(self) -> None:
        self.wait_unshard()
        if self.state is UnitState.UNSHARDED:
            self.full.untyped_storage().resize_(0)
            self.state = UnitState.SHARDED
        self.full_param = None

    # -- exposing the parameters to the module ----------------------------------------------------
    def use_full(self, autograd: bool) -> torch.Tensor | None:
        """Point each owner attribute at its slice of the gathered buffer.

        With ``autograd``, the slices come from one leaf tensor ``full_param`` (returned), whose
        gradient (the unit's whole padded gradient) autograd assembles in one op."""
        self.wait_unshard()
        # [Note: a fresh tensor over the same storage] The re-gather before backward writes into
        # `full` in place; `base` has its own version counter, so autograd's saved views of it do
        # not see that write as an in-place modification (the data is identical by construction).
        base = torch.empty(0, dtype=self.dtype).set_(self.full.untyped_storage(), 0, (self.padded,))
        if autograd and self.requires_grad:
            base = base.requires_grad_(True)
            self.full_param = base
        else:
            self.full_param = None
        self._bind(base)
        return self.full_param

    def _bind(self, base: torch.Tensor) -> None:
        uniq = [i for i in self.infos if i.alias_of is None]
        sizes = [i.numel for i in uniq]
        pad = self.padded - self.total
        pieces = torch.split(base, sizes + ([pad] if pad else []))
        views = [pieces[k].view(i.shape) for k, i in enumerate(uniq)]
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

    def shard_slice(self, full: torch.Tensor) -> torch.Tensor:
        r = self.comm.rank
        return full[r * self.shard_numel : (r + 1) * self.shard_numel]
