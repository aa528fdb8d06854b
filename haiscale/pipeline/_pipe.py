"""The pipeline wrappers a training loop uses: GPipe, PipeDream (1F1B), and their process groups.

    dp_group, pp_group = make_subgroups(pp_size=2)          # after hfreduce.init()
    stage = partition(build_model(), pp_group.rank(), pp_group.size())
    model = PipeDream(stage, chunks=8, process_group=pp_group, dp_group=dp_group)
    loss, out = model.forward_backward(x, criterion=crit, labels=(y,))   # loss/out on the last stage
    opt.step()

[Note: data parallelism per stage] gradients are averaged over the stage's data-parallel group
once, after the schedule, with one coalesced hfreduce allreduce per dtype. DDP's backward hooks
would not fit: 1F1B interleaves backwards of several micro-batches with forwards, and DDP arms
its hooks at each forward. The data-parallel group is a real hfreduce group of the ranks that hold
this stage (made by :func:`make_subgroups`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._comm import DEFAULT_TIMEOUT, Comm
from ..errors import UsageError
from ._layout import RankLayout, rank_layout
from ._runtime import ActivationMeter, CommTransport, StageRun, micro_batches
from ._schedule import actions


class PipelineGroup:
    """The ranks of one pipeline, stage 0 first, inside an hfreduce group (None: the default)."""

    def __init__(self, ranks: tuple[int, ...], my_rank: int, process_group: Any = None) -> None:
        if my_rank not in ranks:
            raise UsageError(f"rank {my_rank} is not in the pipeline {ranks}")
        self.ranks, self.process_group = tuple(ranks), process_group
        self._stage = self.ranks.index(my_rank)

    def rank(self) -> int:
        """This process's stage."""
        return self._stage

    def size(self) -> int:
        return len(self.ranks)


def make_subgroups(pp_size: int, one_nic: bool = False, timeout: float | None = None) -> tuple[Any, PipelineGroup]:
    """(dp_group, pp_group) for this rank of the default hfreduce group (call after hfreduce.init()).

    ``dp_group`` is a new hfreduce ProcessGroup of the ranks holding this rank's stage (None when
    there is one replica); ``pp_group`` names the ranks of this rank's pipeline. ``one_nic`` picks
    the staggered placement of ``_layout`` (fireflyer paper §V-B2)."""
    import hfreduce

    world = hfreduce.get_default()
    layout = rank_layout(world.world_size, pp_size, one_nic=one_nic)
    pp = PipelineGroup(layout.pipeline_of(world.rank), world.rank)
    # every rank takes part in creating every data-parallel group (as torch.distributed.new_group)
    dp = None
    for stage_ranks in layout.dp_groups():
        g = hfreduce.new_group(stage_ranks, timeout=timeout, group=world) if len(stage_ranks) > 1 else None
        if g is not None:
            dp = g
    return dp, pp


class Pipeline(nn.Module):
    """One stage of a pipeline run by ``schedule`` over ``chunks`` micro-batches per step."""

    schedule = "1f1b"

    def __init__(self, module: nn.Module, chunks: int, process_group: PipelineGroup | None = None,
                 dp_group: Any = None, timeout: float = DEFAULT_TIMEOUT, measure_activations: bool = False) -> None:
        super().__init__()
        if chunks < 1:
            raise UsageError(f"chunks must be >= 1, got {chunks}")
        self.module, self.chunks = module, chunks
        if process_group is None:
            import hfreduce

            ws = hfreduce.get_world_size()
            process_group = PipelineGroup(tuple(range(ws)), hfreduce.get_rank())
        self.pp = process_group
        self.stage, self.nstages = process_group.rank(), process_group.size()
        self.comm = Comm(process_group.process_group, timeout=timeout) if self.nstages > 1 else None
        self.dp = Comm(dp_group, timeout=timeout) if dp_group is not None else None
        if self.dp is not None:
            self.dp.check_same_model(list(module.named_parameters()), f"pipeline stage {self.stage}")
            with torch.no_grad():
                self.dp.broadcast_tensors([p.data for p in module.parameters()], src=0)
        self.meter = ActivationMeter(list(module.parameters())) if measure_activations else None

    def forward_backward(self, x: Any = None, criterion: Callable | None = None, labels: tuple = ()) -> tuple[Any, Any]:
        """One step: forwards and backwards of every micro-batch, gradients accumulated in the
        stage's parameters (averaged over the data-parallel group). Stage 0 needs ``x``; the last
        stage needs ``criterion`` and ``labels`` (and returns (loss, output); the others (None, None))."""
        first, last = self.stage == 0, self.stage == self.nstages - 1
        if first and x is None:
            raise UsageError("the first pipeline stage needs the input batch x")
        if last and criterion is None:
            raise UsageError("the last pipeline stage needs a criterion")
        n = self._batch_size(x, labels)
        xs = micro_batches(x, self.chunks) if first else None
        ls = micro_batches(labels, self.chunks) if last and labels else [()] * self.chunks
        weights = self._weights(n)
        end = CommTransport(self.comm, self.pp.ranks, self.stage) if self.comm is not None else _NoPeers()
        run = StageRun(self.module, self.stage, self.nstages, end, self.meter, xs, ls, criterion, weights)
        try:
            for act in actions(self.schedule, self.stage, self.nstages, self.chunks):
                run.run(act)
        finally:
            end.flush()
        if self.dp is not None:
            self._average_grads()
        if not last:
            return None, None
        loss = sum(run.losses[m].detach() for m in range(self.chunks))
        return loss, torch.cat([run.outs[m] for m in range(self.chunks)])

    def _batch_size(self, x: Any, labels: tuple) -> int | None:
        src = x if x is not None else (labels[0] if labels else None)
        while isinstance(src, (tuple, list)):
            src = src[0]
        return None if src is None else int(src.shape[0])

    def _weights(self, n: int | None) -> list[float]:
        if n is None:  # a middle stage: weights are only used by the last stage's losses
            return [1.0 / self.chunks] * self.chunks
        sizes = [len(t) for t in torch.tensor_split(torch.arange(n), self.chunks)]
        return [s / n for s in sizes]

    def _average_grads(self) -> None:
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.module.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                by_dtype.setdefault(p.dtype, []).append(p)
        for dtype in sorted(by_dtype, key=str):
            ps = by_dtype[dtype]
            flat, handle = self.dp.arena_empty(sum(p.numel() for p in ps), dtype)
            off = 0
            for p in ps:
                flat[off : off + p.numel()].copy_(p.grad.reshape(-1))
                off += p.numel()
            self.dp.allreduce_avg(handle, async_op=False)
            off = 0
            for p in ps:
                p.grad.copy_(flat[off : off + p.numel()].view_as(p.grad))
                off += p.numel()

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # evaluation only: a plain pass of this stage
        return self.module(*args, **kwargs)


class GPipe(Pipeline):
    """GPipe: every forward, then every backward (holds all micro-batches' activations)."""

    schedule = "gpipe"


class PipeDream(Pipeline):
    """PipeDream-flush (1F1B): the same gradients as GPipe, at most P - s micro-batches held."""

    schedule = "1f1b"


class _NoPeers:
    def flush(self) -> None:
        pass


__all__ = ["GPipe", "PipeDream", "Pipeline", "PipelineGroup", "RankLayout", "make_subgroups"]
