"""haiscale.fsdp.FullyShardedDataParallel: ZeRO-3 on hfreduce.

One step, seen from unit k (``FlatParamUnit``; the root unit holds what no nested unit took)::

    forward:   wait own allgather (or issue it) -> issue the NEXT unit's allgather (forward prefetch)
               -> run the module on views of the full buffer -> free the full buffer
    backward:  hook on k's outputs fires (pre-backward): allgather k again, issue the allgather of
               the unit that runs next in backward (backward prefetch)
               -> autograd runs k's backward -> hook on k's full parameter (post-backward):
               async reduce-scatter (AVG) of its gradient into k's shard, free the full buffer
               -> wait the reduce-scatter issued before this one, set that unit's shard .grad
               [optimizer_in_backward: and step that unit's optimizer]
    end of backward (autograd final callback): the same for the last reduce-scatter.

[Note: what holds memory between forward and backward]
Nothing of a unit's gathered parameters: a saved-tensors hook (``SavedTensorRouter``, pushed by the
root around the whole forward) saves views of gathered buffers as references, rebuilt from the
buffer gathered again before backward. See _flat_param.py.

[Note: why prefetch is safe with matched collectives]
hfreduce matches collectives by submission order. Forward order is recorded on every rank in the
first step and is the same on all ranks for the same model and control flow; backward order is
its reverse, and the autograd engine on the CPU runs one deterministic order. So every rank
issues allgathers and reduce-scatters in the same sequence, even with prefetching.

[Note: optimizer step during backward]
With ``optimizer_in_backward=(cls, kwargs)`` each unit owns an optimizer over its shard. When unit
k's gradient reduce-scatter is issued, the reduce-scatters issued before it are waited and their
units stepped, so optimizer work of unit k+1 overlaps the reduce-scatter of unit k and the compute
of the rest of backward. A stepped shard is never read again in the same backward (each unit is
gathered once per backward, before its own step), so updating it early does not change results.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .._comm import DEFAULT_TIMEOUT, Comm, check_devices
from ..errors import StateDictError, UsageError
from ._flat_param import FlatParamUnit, SavedTensorRouter

__all__ = ["FullyShardedDataParallel", "BackwardPrefetch"]


class BackwardPrefetch(enum.Enum):
    BACKWARD_PRE = "backward_pre"  # issue the next unit's allgather when the current one's backward starts
    BACKWARD_POST = "backward_post"  # ... when the current one's backward ends


class _Shared:
    """State common to the root and its nested units."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.units: list[FullyShardedDataParallel] = []  # construction order
        self.forward_order: list[FullyShardedDataParallel] = []
        self.recording = True
        self.callback_queued = False
        self.pending: list[tuple[FullyShardedDataParallel, Any, torch.Tensor, torch.Tensor]] = []
        self.in_backward = False
        self.router = SavedTensorRouter(self.units)
        self.owned: dict[int, str] = {}  # id(parameter) -> name, for parameters a unit has taken


class FullyShardedDataParallel(nn.Module):
    """ZeRO-3 data parallelism: parameters, gradients and optimizer state split 1/N per rank.

    Args:
        module: the model (CPU), identical on every rank.
        process_group: an hfreduce ProcessGroup; None uses hfreduce's default group.
        auto_wrap_policy: which submodules become their own unit (see haiscale.fsdp.wrap); None: one
            unit for the whole model (gathered whole for forward and backward).
        backward_prefetch: when to issue the next unit's allgather in backward (None: no prefetch).
        forward_prefetch: issue the next unit's allgather before running the current one.
        sync_module_states: broadcast rank 0's parameters and buffers at wrap time.
        optimizer_in_backward: ``(optimizer_class, kwargs)``: each unit steps its own shard during
            backward; then do not call an optimizer yourself (``.optimizers`` lists them).
        timeout: seconds (or a timedelta) any wait on hfreduce may take before CommunicationError;
            None: the hfreduce group's timeout (``hfreduce.init(timeout=...)``, 30 min by default).
    """

    def __init__(
        self,
        module: nn.Module,
        process_group: Any = None,
        auto_wrap_policy: Callable[..., bool] | None = None,
        backward_prefetch: BackwardPrefetch | None = BackwardPrefetch.BACKWARD_PRE,
        forward_prefetch: bool = True,
        sync_module_states: bool = True,
        optimizer_in_backward: tuple[type, dict[str, Any]] | None = None,
        device_id: Any = None,
        timeout: float | datetime.timedelta | None = DEFAULT_TIMEOUT,
        _shared: _Shared | None = None,
        _fqns: dict[tuple[int, str], str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(module, FullyShardedDataParallel):
            raise UsageError("the module is already wrapped in haiscale FullyShardedDataParallel")
        self.is_root = _shared is None
        if self.is_root:
            ids = [device_id] if device_id is not None and torch.device(device_id).type != "cpu" else None
            check_devices(module, ids, "FullyShardedDataParallel")
            comm = Comm(process_group, timeout=timeout)
            comm.check_same_model(list(module.named_parameters()) + list(module.named_buffers()), "module")
            _shared = _Shared(comm)
            # (id(owner module), attribute) -> name in the unwrapped module; tied parameters keep each name
            _fqns = {(id(m), a): f"{mn}.{a}".lstrip(".") for mn, m in module.named_modules(remove_duplicate=False)
                     for a in m._parameters}
            self._buffer_names = [(n, *_owner(module, n)) for n, _ in module.named_buffers()]
            with torch.no_grad():
                if sync_module_states:
                    comm.broadcast_tensors(list(module.buffers()), src=0)
        self._shared = _shared
        self.comm = _shared.comm
        self.module = module
        self.backward_prefetch = backward_prefetch
        self.forward_prefetch = forward_prefetch
        if auto_wrap_policy is not None:
            kw = dict(process_group=process_group, backward_prefetch=backward_prefetch,
                      forward_prefetch=forward_prefetch, sync_module_states=sync_module_states,
                      optimizer_in_backward=optimizer_in_backward, timeout=timeout)
            _auto_wrap(module, auto_wrap_policy, _shared, _fqns, kw)
        entries = []
        for mod_name, mod in _modules_outside_units(module):
            for attr, p in list(mod._parameters.items()):
                if p is None:
                    continue
                fqn = _fqns.get((id(mod), attr), f"{mod_name}.{attr}".lstrip("."))
                if id(p) in _shared.owned:
                    raise UsageError(
                        f"parameter {fqn!r} is shared with another FSDP unit ({_shared.owned[id(p)]!r}); "
                        "choose an auto_wrap_policy that keeps tied parameters in one unit"
                    )
                entries.append((fqn, mod, attr, p))
        self.unit = FlatParamUnit(entries, self.comm, sync_module_states)
        for fqn, _m, _a, p in entries:
            _shared.owned.setdefault(id(p), fqn)
        # registered here so that model.parameters() yields the shards (what the optimizer updates)
        self.flat_param = self.unit.flat_shard
        _shared.units.append(self)
        self.optimizer: torch.optim.Optimizer | None = None
        if optimizer_in_backward is not None and self.unit.requires_grad and self.unit.total:
            cls, okw = optimizer_in_backward
            self.optimizer = cls([self.flat_param], **okw)
        self._pre_backward_done = False
        self._post_backward_done = False
        self._live_full_param: torch.Tensor | None = None

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sh = self._shared
        grad = torch.is_grad_enabled()
        if self.is_root:
            self._root_pre_forward()
        if sh.recording:
            sh.forward_order.append(self)
        self.unit.unshard()
        if self.forward_prefetch and not sh.recording:
            nxt = self._neighbour(+1)
            if nxt is not None:
                nxt.unit.unshard(async_op=True)
        full_param = self.unit.use_full(autograd=grad)
        try:
            if grad and self.is_root:
                with sh.router.context():
                    out = self.module(*args, **kwargs)
            else:
                out = self.module(*args, **kwargs)
        finally:
            if not self.is_root:
                self.unit.reshard()
        if self.is_root:
            self.unit.reshard()
            sh.recording = False
        if grad:
            self._pre_backward_done = False
            self._post_backward_done = False
            self._live_full_param = full_param
            if full_param is not None:
                full_param.register_post_accumulate_grad_hook(self._post_backward)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._pre_backward)
        return out

    def _root_pre_forward(self) -> None:
        sh = self._shared
        if sh.in_backward or sh.pending:  # the last backward raised before its final callback
            self._abort_backward()
        for u in sh.units:
            u.unit.reshard()
            u.unit.forget_step()
        if sh.recording:
            sh.forward_order = []

    def _neighbour(self, step: int) -> FullyShardedDataParallel | None:
        order = self._shared.forward_order
        try:
            i = order.index(self)
        except ValueError:
            return None
        j = i + step
        return order[j] if 0 <= j < len(order) else None

    # -- backward --------------------------------------------------------------------------------
    def _pre_backward(self, grad: torch.Tensor) -> torch.Tensor:
        sh = self._shared
        if not sh.callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._root()._finish_backward)
            sh.callback_queued = True
            sh.in_backward = True
        if self._pre_backward_done:
            return grad
        self._pre_backward_done = True
        self.unit.unshard()
        if self.backward_prefetch is BackwardPrefetch.BACKWARD_PRE:
            prev = self._neighbour(-1)
            if prev is not None and not prev._post_backward_done:
                prev.unit.unshard(async_op=True)
        return grad

    def _post_backward(self, full_param: torch.Tensor) -> None:
        sh = self._shared
        if full_param is not self._live_full_param:
            self._abort_backward()
            raise UsageError(
                "FullyShardedDataParallel: backward reached the parameters of an earlier forward pass; "
                "each forward with gradients must be followed by its backward before the next one "
                "(sum the losses of several micro-batches only after separate backward calls, or run "
                "evaluation forwards under torch.no_grad())"
            )
        if self._post_backward_done:
            return
        self._post_backward_done = True
        self._live_full_param = None
        g = full_param.grad
        full_param.grad = None
        self.unit.reshard()
        if g is None:
            return
        out = torch.empty(self.unit.shard_numel, dtype=g.dtype)
        work = self.comm.reduce_scatter_avg(out, g, async_op=True)
        # apply the reduce-scatters issued before this one (they ran during this unit's backward):
        # at most two full gradients are alive at a time, and in-backward optimizers step here
        self._step_pending()
        sh.pending.append((self, work, out, g))
        if self.backward_prefetch is BackwardPrefetch.BACKWARD_POST:
            prev = self._neighbour(-1)
            if prev is not None and not prev._post_backward_done:
                prev.unit.unshard(async_op=True)

    def _step_pending(self) -> None:
        """Wait the reduce-scatters issued so far and apply them (stepping in-backward optimizers)."""
        sh = self._shared
        pending, sh.pending = sh.pending, []
        for unit, work, out, _g in pending:
            self.comm.wait(work, "reduce-scatter of FSDP gradients")
            p = unit.flat_param
            if p.grad is None:
                p.grad = out
            else:
                p.grad.add_(out)
            if unit.optimizer is not None:
                unit.optimizer.step()
                unit.optimizer.zero_grad(set_to_none=True)

    def _finish_backward(self) -> None:
        try:
            self._step_pending()
        finally:
            self._end_backward()

    def _abort_backward(self) -> None:
        """Wait for the collectives of a backward that raised (every rank issued the same ones)
        and drop their partial gradients, so the next step starts clean."""
        sh = self._shared
        pending, sh.pending = sh.pending, []
        try:
            for _unit, work, _out, _g in pending:
                self.comm.wait(work, "reduce-scatter of FSDP gradients")
        finally:
            self._end_backward()

    def _end_backward(self) -> None:
        """Leave the backward state: every unit resharded and its per-step bookkeeping dropped."""
        sh = self._shared
        sh.callback_queued = False
        sh.in_backward = False
        for u in sh.units:
            u.unit.reshard()
            u.unit.forget_step()

    def _root(self) -> FullyShardedDataParallel:
        return next(u for u in self._shared.units if u.is_root)

    # -- full parameters, state dicts -------------------------------------------------------------
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The per-unit optimizers of ``optimizer_in_backward`` (empty otherwise)."""
        return [u.optimizer for u in self._shared.units if u.optimizer is not None]

    @contextlib.contextmanager
    def summon_full_params(self, writeback: bool = True) -> Iterator[None]:
        """Gather every unit's full parameters onto the module (collective: call on all ranks).

        Inside, the module's parameter attributes are full tensors; with ``writeback`` changes to
        them are copied back into this rank's shard on exit."""
        if self._shared.in_backward:
            raise UsageError("summon_full_params() cannot be used during backward")
        units = [u.unit for u in self._shared.units]
        for u in units:
            u.unshard()
            u.use_full(autograd=False)
        try:
            yield
        finally:
            with torch.no_grad():
                for u in units:
                    if writeback:
                        u.flat_shard.copy_(u.shard_slice(u.full))
                    u.reshard()

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The unwrapped module's state dict, gathered; empty on ranks != 0 when ``rank0_only``.

        A collective: every rank must call it."""
        self._require_root("full_state_dict")
        keep = not rank0_only or self.comm.rank == 0
        out: dict[str, torch.Tensor] = {}
        for u in self._shared.units:
            unit = u.unit
            unit.unshard()
            if keep:
                for info in unit.infos:
                    out[info.fqn] = unit.full[info.offset : info.offset + info.numel].view(info.shape).clone()
            unit.reshard()
        if keep:
            for name, mod, attr in self._buffer_names:
                b = getattr(mod, attr)
                if b is not None and attr not in getattr(mod, "_non_persistent_buffers_set", set()):
                    out[name] = b.detach().clone()
        return dict(sorted(out.items()))

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load an unwrapped module's state dict (as full_state_dict returns); every rank passes it."""
        self._require_root("load_full_state_dict")
        sd = dict(state_dict)
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module.") :]: v for k, v in sd.items()}
        expected = {i.fqn for u in self._shared.units for i in u.unit.infos}
        expected |= {n for n, mod, attr in self._buffer_names
                     if attr not in getattr(mod, "_non_persistent_buffers_set", set())}
        missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
        if strict and (missing or unexpected):
            raise StateDictError(f"state dict does not match the wrapped module: missing {missing[:8]}, "
                                 f"unexpected {unexpected[:8]}")
        with torch.no_grad():
            for u in self._shared.units:
                unit = u.unit
                full = torch.zeros(unit.padded, dtype=unit.dtype)
                for info in unit.infos:
                    if info.fqn not in sd:
                        continue
                    v = sd[info.fqn]
                    if tuple(v.shape) != tuple(info.shape):
                        raise StateDictError(f"state dict entry {info.fqn!r} has shape {tuple(v.shape)}, "
                                             f"the module expects {tuple(info.shape)}")
                    full[info.offset : info.offset + info.numel].copy_(v.reshape(-1))
                if any(i.fqn not in sd for i in unit.infos):  # keep current values of missing entries
                    unit.unshard()
                    cur = unit.full.clone()
                    unit.reshard()
                    # a tied alias shares its first name's storage: keep only slots no name loaded
                    loaded = {i.offset for i in unit.infos if i.fqn in sd}
                    for info in unit.infos:
                        if info.fqn not in sd and info.offset not in loaded:
                            full[info.offset : info.offset + info.numel].copy_(cur[info.offset : info.offset + info.numel])
                unit.flat_shard.copy_(unit.shard_slice(full))
            for name, mod, attr in self._buffer_names:
                if name in sd and getattr(mod, attr) is not None:
                    getattr(mod, attr).copy_(sd[name])

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's shards (no communication); save one file per rank, load with the same world size."""
        self._require_root("sharded_state_dict")
        units = []
        for u in self._shared.units:
            units.append({"fqns": [i.fqn for i in u.unit.infos], "total": u.unit.total,
                          "shard": u.unit.flat_shard.detach().clone()})
        buffers = {n: getattr(m, a).detach().clone() for n, m, a in self._buffer_names if getattr(m, a) is not None}
        return {"world_size": self.comm.world_size, "rank": self.comm.rank, "units": units, "buffers": buffers}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Load what sharded_state_dict returned on this rank (same model, world size and rank)."""
        self._require_root("load_sharded_state_dict")
        if state.get("world_size") != self.comm.world_size or state.get("rank") != self.comm.rank:
            raise StateDictError(f"sharded state dict was saved by rank {state.get('rank')} of "
                                 f"{state.get('world_size')}; this is rank {self.comm.rank} of {self.comm.world_size}: "
                                 "load a full state dict to change the world size")
        units = state.get("units", [])
        if len(units) != len(self._shared.units):
            raise StateDictError(f"sharded state dict has {len(units)} units, the wrapped module {len(self._shared.units)}")
        with torch.no_grad():
            for u, s in zip(self._shared.units, units, strict=True):
                names = [i.fqn for i in u.unit.infos]
                if s["fqns"] != names or s["shard"].shape != u.flat_param.shape:
                    raise StateDictError(f"sharded state dict unit {names[:3]}... does not match the wrapped module "
                                         f"(saved {s['fqns'][:3]}..., {tuple(s['shard'].shape)})")
                u.flat_param.copy_(s["shard"])
            for n, m, a in self._buffer_names:
                if n in state.get("buffers", {}) and getattr(m, a) is not None:
                    getattr(m, a).copy_(state["buffers"][n])

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """Full state dict gathered on rank 0 (empty elsewhere); a collective, call on all ranks."""
        if not self.is_root:
            return super().state_dict(*args, **kwargs)
        return self.full_state_dict(rank0_only=True)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        if not self.is_root:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.load_full_state_dict(state_dict, strict=strict)
        return None

    def _require_root(self, what: str) -> None:
        if not self.is_root:
            raise UsageError(f"{what}() is available on the root FullyShardedDataParallel only")


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    mod = module
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


def _modules_outside_units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``module`` and its submodules, not descending into nested FSDP units."""
    yield prefix, module
    for name, child in module.named_children():
        if isinstance(child, FullyShardedDataParallel):
            continue
        yield from _modules_outside_units(child, f"{prefix}.{name}" if prefix else name)


def _auto_wrap(module: nn.Module, policy: Callable[..., bool], shared: _Shared, fqns: dict[tuple[int, str], str],
               kw: dict[str, Any]) -> int:
    """Wrap children of ``module`` bottom-up per ``policy``; return the numel left unwrapped in it."""
    left = sum(p.numel() for p in module._parameters.values() if p is not None)
    for name, child in list(module.named_children()):
        if isinstance(child, FullyShardedDataParallel):
            continue
        child_left = sum(p.numel() for p in child.parameters())
        if policy(module=child, recurse=True, nonwrapped_numel=child_left):
            child_left = _auto_wrap(child, policy, shared, fqns, kw)
        if child_left and policy(module=child, recurse=False, nonwrapped_numel=child_left):
            setattr(module, name, FullyShardedDataParallel(child, _shared=shared, _fqns=fqns, **kw))
        else:
            left += child_left
    return left
