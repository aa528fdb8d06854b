"""haiscale.ddp.DistributedDataParallel: data parallelism on hfreduce with backward overlap.

Life of one training step (state machine of the :class:`Reducer`)::

    IDLE --forward (grad on, sync on)--> ARMED --first grad hook--> REDUCING --end of backward--> IDLE
                                           |                          | each bucket full (in bucket
                                           |                          | order): async allreduce AVG
                                           +-- no_sync / no grad: hooks do nothing, grads accumulate

[Note: buckets live in the hfreduce arena]
Gradient buckets are allocated with ``hfreduce.empty`` (the node's shared-memory arena), and each
``param.grad`` is a view into its bucket (like torch DDP's ``gradient_as_bucket_view``): autograd
accumulates straight into the bucket and hfreduce reduces it where it lies, with no copy in or
out. If ``optimizer.zero_grad()`` set a grad to None, autograd hands a fresh tensor and the hook
copies it into the bucket once (a memcpy, as torch DDP does).

[Note: why buckets are launched in bucket order]
Collectives are matched by submission order across ranks. A bucket is launched only when it and
every bucket before it are full, so all ranks submit the same sequence even if hooks fire in a
slightly different order; the buckets follow reverse registration order, which is close to the
order in which backward produces the gradients, so the first buckets leave early.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ._comm import DEFAULT_TIMEOUT, Comm, check_devices
from .errors import CommunicationError, UnusedParametersError, UsageError

log = logging.getLogger(__name__)

__all__ = ["DistributedDataParallel", "Reducer"]


class _Bucket:
    __slots__ = ("index", "dtype", "params", "offsets", "numel", "buffer", "handle", "pending", "work", "launched")

    def __init__(self, index: int, dtype: torch.dtype) -> None:
        self.index = index
        self.dtype = dtype
        self.params: list[int] = []  # indexes into Reducer.params
        self.offsets: list[int] = []
        self.numel = 0
        self.buffer: torch.Tensor | None = None
        self.handle: Any = None
        self.pending = 0
        self.work: Any = None
        self.launched = False


def assign_buckets(params: list[nn.Parameter], cap_bytes: int, first_cap_bytes: int) -> list[list[int]]:
    """Group parameter indexes into buckets: reverse registration order, one dtype per bucket, each
    at most ``cap_bytes`` (the first at most ``first_cap_bytes``) unless a single parameter is larger."""
    done: list[list[int]] = []
    open_: dict[torch.dtype, tuple[list[int], int]] = {}
    for i in reversed(range(len(params))):
        p = params[i]
        idxs, size = open_.get(p.dtype, ([], 0))
        cap = first_cap_bytes if not done else cap_bytes
        nbytes = p.numel() * p.element_size()
        if idxs and size + nbytes > cap:
            done.append(idxs)
            idxs, size = [], 0
        idxs.append(i)
        open_[p.dtype] = (idxs, size + nbytes)
    done.extend(idxs for idxs, _ in open_.values() if idxs)
    done.sort(key=lambda b: -b[0])  # the bucket holding the last-registered parameter first
    return done


class Reducer:
    """Owns the gradient buckets and hooks of one DistributedDataParallel; ``stop()`` before exit."""

    def __init__(
        self,
        params: list[nn.Parameter],
        names: list[str],
        comm: Comm,
        bucket_cap_mb: float,
        first_bucket_cap_mb: float,
        find_unused_parameters: bool,
        device: torch.device | None = None,
    ) -> None:
        self.params = params
        self.names = names
        self.comm = comm
        self.find_unused = find_unused_parameters
        cap = int(bucket_cap_mb * 1024 * 1024)
        self.buckets: list[_Bucket] = []
        self.loc: list[tuple[int, int]] = [(0, 0)] * len(params)  # param -> (bucket, slot)
        self.views: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
        for bi, idxs in enumerate(assign_buckets(params, cap, int(min(first_bucket_cap_mb, bucket_cap_mb) * 1024 * 1024))):
            b = _Bucket(bi, params[idxs[0]].dtype)
            for slot, i in enumerate(idxs):
                b.params.append(i)
                b.offsets.append(b.numel)
                b.numel += params[i].numel()
                self.loc[i] = (bi, slot)
            b.buffer, b.handle = comm.bucket_empty(b.numel, b.dtype, device or torch.device("cpu"))
            b.buffer.zero_()
            for slot, i in enumerate(idxs):
                off = b.offsets[slot]
                self.views[i] = b.buffer[off : off + params[i].numel()].view(params[i].shape)
            self.buckets.append(b)
        self.ready = [False] * len(params)
        self.local_used = [False] * len(params)
        self.grad_was_none = [False] * len(params)
        self.next_bucket = 0
        self.armed = False
        self.callback_queued = False
        self.stopped = False
        self.iteration = 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(params)]

    # -- per iteration ---------------------------------------------------------------------------
    def prepare_for_backward(self, outputs: Any) -> None:
        """Arm the hooks for the next backward (called by forward when grads will be synced)."""
        if self.stopped:
            raise UsageError("the DDP reducer was stopped (model.reducer.stop()); wrap the module again to train")
        if any(b.launched and b.work is not None for b in self.buckets):
            self._drain()
        self.ready = [False] * len(self.params)
        self.local_used = [False] * len(self.params)
        self.grad_was_none = [False] * len(self.params)
        self.next_bucket = 0
        for b in self.buckets:
            b.pending = len(b.params)
            b.launched = False
            b.work = None
        self.callback_queued = False
        self.armed = True
        if self.find_unused:
            used = _params_reached(outputs)
            for i, p in enumerate(self.params):
                if p not in used:
                    self._mark_unused(i)

    def _make_hook(self, i: int):
        def hook(param: torch.Tensor) -> None:
            if not self.armed or self.ready[i]:
                return
            if not self.callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
                self.callback_queued = True
            view = self.views[i]
            g = param.grad
            if g is None:
                return
            if g.data_ptr() != view.data_ptr() or g.shape != view.shape:
                with torch.no_grad():
                    view.copy_(g)
                param.grad = view
            self.local_used[i] = True
            self._mark_ready(i)

        return hook

    def _mark_unused(self, i: int) -> None:
        p = self.params[i]
        view = self.views[i]
        self.grad_was_none[i] = p.grad is None
        with torch.no_grad():
            if p.grad is None:
                view.zero_()  # contributes nothing locally
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)  # gradient accumulated apart (no_sync): keep it, as torch DDP does
        self._mark_ready(i)

    def _mark_ready(self, i: int) -> None:
        self.ready[i] = True
        b = self.buckets[self.loc[i][0]]
        b.pending -= 1
        if b.pending == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_bucket < len(self.buckets) and self.buckets[self.next_bucket].pending == 0:
            b = self.buckets[self.next_bucket]
            b.work = self.comm.allreduce_avg(b.handle, async_op=True)
            b.launched = True
            self.next_bucket += 1

    def _drain(self) -> None:
        """Wait for every launched allreduce (errors are re-raised after all have been waited)."""
        first: Exception | None = None
        for b in self.buckets:
            if b.launched and b.work is not None:
                try:
                    self.comm.wait(b.work, f"allreduce of gradient bucket {b.index}")
                except CommunicationError as exc:
                    first = first or exc
                b.work = None
        if first is not None:
            raise first

    def _finalize(self) -> None:
        """End of backward (autograd final callback): reduce what is left, wait for every bucket."""
        self.armed = False
        missing = [i for i, r in enumerate(self.ready) if not r]
        if missing and not self.find_unused:
            self._drain()
            raise UnusedParametersError([self.names[i] for i in missing])
        for i in missing:
            self._mark_unused(i)
        self._drain()
        used = None
        if self.find_unused and self.params:
            # [Note: globally unused parameters] a parameter no rank used keeps grad None (as in
            # torch DDP), so optimizers with weight decay or momentum leave it alone.
            used = torch.tensor(self.local_used, dtype=torch.int32)
            self.comm.allreduce(used, op=self.comm.hf.ReduceOp.MAX)
        for i, p in enumerate(self.params):
            if used is not None and not used[i] and self.grad_was_none[i]:
                p.grad = None
            elif p.grad is None or p.grad.data_ptr() != self.views[i].data_ptr():
                p.grad = self.views[i]
        self.iteration += 1

    def stop(self) -> None:
        """Wait for in-flight allreduces, remove the hooks, and move every grad out of the arena.

        Call it before ``hfreduce.destroy()`` / process exit (the grads stay valid afterwards)."""
        if self.stopped:
            return
        self.stopped = True
        self.armed = False
        try:
            self._drain()
        finally:
            for h in self.hooks:
                h.remove()
            for p in self.params:
                if p.grad is not None:
                    p.grad = p.grad.detach().clone()
            for b in self.buckets:
                b.buffer = None
                b.handle = None
            self.views = []


def _params_reached(outputs: Any) -> set[nn.Parameter]:
    """The leaf tensors (parameters) reachable from ``outputs`` through the autograd graph."""
    found: set = set()
    seen: set = set()
    stack = [t.grad_fn for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(var)
        for nxt, _ in fn.next_functions:
            if nxt is not None and nxt not in seen:
                stack.append(nxt)
    return found


class DistributedDataParallel(nn.Module):
    """Drop-in for ``torch.nn.parallel.DistributedDataParallel`` that reduces with hfreduce.

    Args:
        module: the model (CPU; CUDA once hfreduce's CUDA backend exists), identical on every rank.
        device_ids: accepted for torch compatibility; must agree with the module's device.
        process_group: an hfreduce ProcessGroup; None uses hfreduce's default group.
        bucket_cap_mb: size of a gradient bucket; each full bucket is allreduced asynchronously.
        find_unused_parameters: allow parameters that get no gradient in some steps (they
            contribute zeros; found by walking the autograd graph after forward).
        broadcast_buffers: broadcast rank 0's buffers (e.g. BatchNorm statistics) at each forward.
        first_bucket_cap_mb: a smaller first bucket, so communication starts early in backward.
        timeout: seconds (or a timedelta) any wait on hfreduce may take before CommunicationError;
            None: the hfreduce group's timeout (``hfreduce.init(timeout=...)``, 30 min by default).
    """

    def __init__(
        self,
        module: nn.Module,
        device_ids: list[Any] | None = None,
        output_device: Any = None,
        process_group: Any = None,
        bucket_cap_mb: float = 25,
        find_unused_parameters: bool = False,
        broadcast_buffers: bool = True,
        first_bucket_cap_mb: float = 1,
        timeout: float | datetime.timedelta | None = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise UsageError(f"DistributedDataParallel wraps an nn.Module, got {type(module).__name__}")
        if isinstance(module, DistributedDataParallel):
            raise UsageError("the module is already wrapped in haiscale DistributedDataParallel")
        if bucket_cap_mb <= 0:
            raise UsageError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.module = module
        self.device = check_devices(module, device_ids, "DistributedDataParallel")
        self.comm = Comm(process_group, timeout=timeout)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.comm.check_same_model(list(module.named_parameters()) + list(module.named_buffers()), "module")
        with torch.no_grad():
            self.comm.broadcast_tensors([p.data for p in module.parameters()] + list(module.buffers()), src=0)
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        self.require_backward_grad_sync = True
        self.reducer = Reducer(
            [p for _, p in named],
            [n for n, _ in named],
            self.comm,
            bucket_cap_mb,
            first_bucket_cap_mb,
            find_unused_parameters,
            self.device,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.reducer.stopped:
            raise UsageError("the DDP reducer was stopped (model.reducer.stop()); wrap the module again to train")
        if self.broadcast_buffers and self.module.training and torch.is_grad_enabled():
            bufs = list(self.module.buffers())
            if bufs:
                with torch.no_grad():
                    self.comm.broadcast_tensors(bufs, src=0)
        out = self.module(*args, **kwargs)
        if torch.is_grad_enabled() and self.require_backward_grad_sync:
            self.reducer.prepare_for_backward(out)
        else:
            self.reducer.armed = False
        return out

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes of forwards run in this context only accumulate local gradients."""
        old = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        try:
            yield
        finally:
            self.require_backward_grad_sync = old

    # -- state dicts load into the unwrapped module ---------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped module's state dict, without a ``module.`` prefix (loads into the bare module)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Load a bare module's state dict (a torch-DDP style ``module.`` prefix is stripped)."""
        if state_dict and all(k.startswith("module.") for k in state_dict):
            state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)
