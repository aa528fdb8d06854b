"""Running a schedule: splitting the model, moving tensors between stages, the per-stage step.

One stage's step (:meth:`Pipeline.forward_backward`) walks its action list from ``_schedule``:

    F m: input = x[m] (stage 0) or recv(prev, ACT); out = stage(input); keep (input, out)
         last stage: loss_m = criterion(out, *labels[m]) * len(m) / len(batch); else send(out, next)
    B m: last stage: loss_m.backward(); else backward(out, recv(next, GRAD))
         not stage 0: send(input.grad, prev); drop (input, out): the saved tensors are freed
    end: wait for every posted send; allreduce the stage's gradients over its data-parallel group

[Note: losses of micro-batches] each micro-batch's loss is scaled by its share of the batch, so
for a criterion that averages over the batch (the usual case) the summed gradients and loss equal
those of the unsplit model on the whole batch, also when the batch does not divide evenly.

[Note: two transports] ``LocalTransport`` keeps every stage in one process (the tests' reference
runs and the schedule order test); ``CommTransport`` sends over hfreduce point-to-point through
``haiscale._comm.Comm.isend/recv``. A message is a fixed 8-int64 header (dtype code, ndim, shape)
and the tensor's bytes, so stages need not know each other's shapes in advance.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ._schedule import actions

log = logging.getLogger(__name__)

ACT, GRAD = 1, 2  # message tags: activations go forward, their gradients backward
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool]
_HEADER = 8


# -- splitting ---------------------------------------------------------------------------------------
def split(module: nn.Module | Sequence[nn.Module], nstages: int, balance: Sequence[int] | None = None) -> list[nn.Sequential]:
    """Cut a sequential model into ``nstages`` consecutive ``nn.Sequential`` stages.

    ``balance`` gives the number of layers of each stage; without it the layers are cut so each
    stage holds about the same number of parameters (a layer without parameters counts as one)."""
    layers = list(module.children()) if isinstance(module, nn.Sequential) else list(module)
    if not all(isinstance(m, nn.Module) for m in layers):
        raise UsageError("split() takes an nn.Sequential or a list of nn.Modules")
    if nstages < 1 or nstages > len(layers):
        raise UsageError(f"cannot split {len(layers)} layers into {nstages} stages")
    if balance is None:
        balance = _balance_by_params(layers, nstages)
    balance = list(balance)
    if len(balance) != nstages or sum(balance) != len(layers) or min(balance) < 1:
        raise UsageError(f"balance {balance} must have {nstages} positive entries summing to {len(layers)} layers")
    out, i = [], 0
    for n in balance:
        out.append(nn.Sequential(*layers[i : i + n]))
        i += n
    return out


def partition(module: nn.Module | Sequence[nn.Module], rank: int, world_size: int,
              balance: Sequence[int] | None = None) -> nn.Sequential:
    """The stage ``rank`` of ``world_size`` (haiscale's ``partition``): ``split(...)[rank]``."""
    if not 0 <= rank < world_size:
        raise UsageError(f"stage {rank} is outside 0..{world_size - 1}")
    return split(module, world_size, balance)[rank]


def _balance_by_params(layers: list[nn.Module], nstages: int) -> list[int]:
    w = [max(1, sum(p.numel() for p in m.parameters())) for m in layers]
    total, out, start = sum(w), [], 0
    for s in range(nstages):
        left_stages = nstages - s - 1
        end, acc = start + 1, w[start]
        target = total * (s + 1) / nstages
        cum = sum(w[:start]) + acc
        while end < len(layers) - left_stages and cum + w[end] / 2 <= target:
            cum += w[end]
            end += 1
        if s == nstages - 1:
            end = len(layers)
        out.append(end - start)
        start = end
    return out


# -- measuring held activations ------------------------------------------------------------------------
class ActivationMeter:
    """Bytes of tensors autograd saved for backward and still holds, and their peak.

    Installed with ``torch.autograd.graph.saved_tensors_hooks`` around each forward: every saved
    tensor that is not a parameter (nor a view of one) adds its bytes while the graph holds it; the
    packed handle's finaliser subtracts them when backward (or dropping the graph) frees it. Views
    of one storage saved twice count twice: an upper bound, the same for every schedule."""

    def __init__(self, params: Sequence[torch.Tensor] = ()) -> None:
        self.live = 0
        self.peak = 0
        self._param_storages = {p.untyped_storage().data_ptr() for p in params}

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if t.untyped_storage().data_ptr() in self._param_storages:
            return t
        return _Held(t, self)

    @staticmethod
    def _unpack(h: Any) -> torch.Tensor:
        return h.t if isinstance(h, _Held) else h


class _Held:
    __slots__ = ("t", "n", "meter")

    def __init__(self, t: torch.Tensor, meter: ActivationMeter) -> None:
        self.t, self.meter = t, meter
        self.n = t.numel() * t.element_size()
        meter.live += self.n
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.n


# -- transports --------------------------------------------------------------------------------------
class LocalTransport:
    """Every stage in this process: a mailbox per (src, dst, tag); ``ready`` lets a driver interleave."""

    def __init__(self) -> None:
        self.box: dict[tuple[int, int, int], collections.deque] = collections.defaultdict(collections.deque)

    def endpoint(self, stage: int) -> _LocalEnd:
        return _LocalEnd(self, stage)


class _LocalEnd:
    def __init__(self, hub: LocalTransport, stage: int) -> None:
        self.hub, self.stage = hub, stage

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self.hub.box[(self.stage, dst, tag)].append(t.detach().clone())  # a copy, as on the wire

    def ready(self, src: int, tag: int) -> bool:
        return bool(self.hub.box[(src, self.stage, tag)])

    def recv(self, src: int, tag: int) -> torch.Tensor:
        q = self.hub.box[(src, self.stage, tag)]
        if not q:
            raise UsageError(f"stage {self.stage}: nothing from stage {src} (tag {tag}) in the local transport")
        return q.popleft()

    def flush(self) -> None:
        pass


class CommTransport:
    """Stages on different ranks: ``peers[stage]`` is the rank of each stage in ``comm``'s group."""

    def __init__(self, comm: Any, peers: Sequence[int], stage: int) -> None:
        self.comm, self.peers, self.stage = comm, list(peers), stage
        self.pending: list[tuple[Any, Any]] = []  # (work, buffer kept alive until the send completes)

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        t = t.detach().contiguous()
        if t.dtype not in _DTYPES or t.dim() > _HEADER - 2:
            raise UsageError(f"pipeline stages exchange tensors of dtypes {_DTYPES} with at most "
                             f"{_HEADER - 2} dimensions; stage {self.stage} produced {t.dtype} {tuple(t.shape)}")
        head = torch.zeros(_HEADER, dtype=torch.int64)
        head[0], head[1] = _DTYPES.index(t.dtype), t.dim()
        head[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        payload = t.view(torch.uint8) if t.dtype == torch.bool else t
        for buf in (head, payload):
            self.pending.append((self.comm.isend(buf, self.peers[dst], tag=tag), buf))

    def recv(self, src: int, tag: int) -> torch.Tensor:
        head = torch.empty(_HEADER, dtype=torch.int64)
        self.comm.recv(head, self.peers[src], tag=tag)
        code, ndim = int(head[0]), int(head[1])
        if not 0 <= code < len(_DTYPES) or not 0 <= ndim <= _HEADER - 2:
            raise UsageError(f"stage {self.stage}: a malformed message header from stage {src}: {head.tolist()}")
        dtype = _DTYPES[code]
        out = torch.empty(tuple(int(x) for x in head[2 : 2 + ndim]), dtype=dtype)
        self.comm.recv(out.view(torch.uint8) if dtype == torch.bool else out, self.peers[src], tag=tag)
        return out

    def flush(self) -> None:
        first = None
        for work, _ in self.pending:
            try:
                self.comm.wait(work, "pipeline send")
            except Exception as exc:  # noqa: BLE001 - wait for all, then raise the first
                first = first or exc
        self.pending.clear()
        if first is not None:
            raise first


# -- one stage's step ------------------------------------------------------------------------------
class StageRun:
    """The state of one stage during one ``forward_backward``: held micro-batches, losses, outputs."""

    def __init__(self, module: nn.Module, stage: int, nstages: int, end: Any, meter: ActivationMeter | None,
                 xs: list | None, labels: list | None, criterion: Callable | None, weights: list[float]) -> None:
        self.module, self.stage, self.nstages, self.end, self.meter = module, stage, nstages, end, meter
        self.xs, self.labels, self.criterion, self.weights = xs, labels, criterion, weights
        self.held: dict[int, tuple[Any, Any]] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.outs: dict[int, torch.Tensor] = {}

    @property
    def last(self) -> bool:
        return self.stage == self.nstages - 1

    def ready(self, act: tuple[str, int]) -> bool:
        kind, _ = act
        if kind == "F":
            return self.stage == 0 or self.end.ready(self.stage - 1, ACT)
        return self.last or self.end.ready(self.stage + 1, GRAD)

    def run(self, act: tuple[str, int]) -> None:
        kind, m = act
        if kind == "F":
            self.forward(m)
        else:
            self.backward(m)

    def forward(self, m: int) -> None:
        if self.stage == 0:
            inp = self.xs[m]
        else:
            inp = self.end.recv(self.stage - 1, ACT)
            if inp.is_floating_point():
                inp.requires_grad_(True)
        if self.meter is not None:
            with self.meter.hooks():
                out = self.module(inp)
        else:
            out = self.module(inp)
        if self.last:
            self.outs[m] = out.detach()
            loss = self.criterion(out, *self.labels[m]) * self.weights[m]
            self.losses[m] = loss
            self.held[m] = (inp, loss)
        else:
            self.end.send(out, self.stage + 1, ACT)
            self.held[m] = (inp, out)

    def backward(self, m: int) -> None:
        inp, out = self.held.pop(m)
        if self.last:
            out.backward()
        else:
            torch.autograd.backward(out, self.end.recv(self.stage + 1, GRAD))
        if self.stage > 0:
            g = inp.grad if isinstance(inp, torch.Tensor) and inp.grad is not None else torch.zeros_like(inp)
            self.end.send(g, self.stage - 1, GRAD)


def micro_batches(batch: Any, chunks: int) -> list:
    """Split a tensor (or a tuple of tensors) along dim 0 into ``chunks`` pieces."""
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] < chunks:
            raise UsageError(f"a batch of {batch.shape[0]} cannot be split into {chunks} micro-batches")
        return list(torch.tensor_split(batch, chunks))
    parts = [micro_batches(b, chunks) for b in batch]
    return [tuple(p[i] for p in parts) for i in range(chunks)]


def run_local(stages: Sequence[nn.Module], schedule: str, chunks: int, x: torch.Tensor, criterion: Callable,
              labels: tuple = (), meters: Sequence[ActivationMeter] | None = None) -> tuple[torch.Tensor, list]:
    """Run one step of ``schedule`` with every stage in this process, interleaving the stages'
    action lists as ranks would (an action runs once its input has arrived).

    Returns (loss, order) where order lists (stage, action) as run. Gradients accumulate in the
    stages' parameters. The reference for the multi-rank runs and the schedule-order test."""
    nst = len(stages)
    xs = micro_batches(x, chunks)
    ls = micro_batches(labels, chunks) if labels else [()] * chunks
    weights = [xs[m].shape[0] / x.shape[0] for m in range(chunks)]
    hub = LocalTransport()
    runs = [StageRun(stages[s], s, nst, hub.endpoint(s), meters[s] if meters else None, xs if s == 0 else None,
                     ls if s == nst - 1 else None, criterion if s == nst - 1 else None, weights) for s in range(nst)]
    lists = [actions(schedule, s, nst, chunks) for s in range(nst)]
    pos = [0] * nst
    order: list = []
    while any(p < len(lst) for p, lst in zip(pos, lists, strict=True)):
        moved = False
        for s in range(nst):
            if pos[s] < len(lists[s]) and runs[s].ready(lists[s][pos[s]]):
                runs[s].run(lists[s][pos[s]])
                order.append((s, lists[s][pos[s]]))
                pos[s] += 1
                moved = True
        if not moved:
            raise UsageError(f"schedule {schedule} deadlocked at positions {pos}")
    loss = sum(runs[-1].losses[m].detach() for m in range(chunks))
    return loss, order
