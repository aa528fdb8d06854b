"""haiscale.moe: a DeepSeekMoE layer with expert parallelism over hfreduce and Loss-Free Balancing.

    layer = DeepSeekMoE(d_model=256, d_ff=1024, n_experts=8, top_k=2, granularity=2, n_shared=1)
    y = layer(x)                       # x: [..., d_model]; tokens go to the ranks holding their experts
    loss.backward(); sync_grads(model) # average the replicated parameters' gradients (see below)
    opt.step(); update_balance(model)  # Loss-Free Balancing: move each expert's routing bias

* **Fine-grained experts** (DeepSeekMoE): ``n_experts`` experts of hidden size ``d_ff`` are each
  split ``granularity`` (m) ways: ``m * n_experts`` routed experts of hidden ``d_ff // m``, and each
  token picks ``m * top_k`` of them, so the compute per token stays that of ``top_k`` full experts.
  ``n_shared`` (K_s) shared experts of the same fine size see every token; they are held as one
  SwiGLU of hidden ``n_shared * d_ff // m`` (the same function as a sum of K_s experts).
* **Gating**: ``score_func="sigmoid"`` (DeepSeek-V3: per-expert sigmoid affinities, the chosen ones
  normalised to sum to 1) or ``"softmax"`` (DeepSeekMoE: softmax over experts, the chosen
  probabilities used as they are unless ``norm_topk=True``).
* **Expert parallelism**: with W ranks, rank r holds routed experts ``[r*E/W, (r+1)*E/W)``; the
  gate and the shared experts are replicated. Each forward exchanges per-expert counts (one
  allgather of int64s, which also gives every rank the global load), sends each routed copy of a
  token to the rank of its expert (``Comm.all_to_all`` with uneven splits), runs the local experts
  on what arrived, and sends the results back the same way; the backward pass runs the two
  exchanges in reverse. No token is dropped unless ``capacity_factor`` is given.
* **Loss-Free Balancing** (``balance="lfb"``, the default): a per-expert bias is added to the
  scores for the top-k *choice only*; gate weights use the unbiased scores, so no gradient flows
  from balancing. ``update_bias()`` (or ``update_balance(model)`` for all layers) moves it by
  ``u * sign(mean load - load)`` with the load summed over every rank and every forward since the
  last update; every rank computes the same bias without communicating. The bias is a buffer, so it
  is in ``state_dict()``. ``balance="aux"`` instead sets ``layer.aux_loss`` to the usual expert-level
  balance loss ``alpha * sum_i f_i * P_i`` (add ``aux_losses(model)`` to the loss).
* **Load statistics**: ``layer.stats`` holds the MaxVio (max load / mean load - 1) of the last
  batch, the mean of the per-batch MaxVio since ``reset_stats()`` and the MaxVio of the loads
  summed since then (the paper's MaxVio_global over an epoch).

[Note: replicated vs expert gradients] A data-parallel wrapper must not average the expert
weights across ranks: each rank holds different experts. ``sync_grads(model)`` averages the
gradients of every parameter that is not an expert weight over the ranks (one coalesced hfreduce
allreduce per dtype) and divides the expert weights' gradients by W, so the step is the step of the
mean of the ranks' losses, as DDP's. Parameters that are expert weights carry ``p.expert_parallel =
True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._comm import DEFAULT_TIMEOUT, Comm
from .errors import UsageError

__all__ = ["DeepSeekMoE", "MoEStats", "maxvio", "update_balance", "aux_losses", "sync_grads", "moe_layers"]


def maxvio(load: Any) -> float:
    """MaxVio = max load / mean load - 1 (0 = perfectly balanced); 0 for an empty load."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean() if load.size else 0.0
    return float(load.max() / mean - 1.0) if mean > 0 else 0.0


@dataclass
class MoEStats:
    """Routing statistics of one layer since the last ``reset_stats()`` (loads summed over ranks)."""

    n_experts: int
    batches: int = 0
    maxvio_batch: float = 0.0  # the last batch's
    maxvio_batch_sum: float = 0.0
    dropped: int = 0  # routed copies dropped by the capacity factor
    epoch_load: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.epoch_load is None:
            self.epoch_load = np.zeros(self.n_experts, dtype=np.int64)

    def add(self, load: np.ndarray, dropped: int) -> None:
        self.batches += 1
        self.maxvio_batch = maxvio(load)
        self.maxvio_batch_sum += self.maxvio_batch
        self.epoch_load += load
        self.dropped += int(dropped)

    @property
    def mean_maxvio_batch(self) -> float:
        return self.maxvio_batch_sum / self.batches if self.batches else 0.0

    @property
    def maxvio_epoch(self) -> float:
        return maxvio(self.epoch_load)


class _AllToAll(torch.autograd.Function):
    """Rows ``in_splits[j]`` go to rank j, ``out_splits[i]`` come from rank i; backward reverses.

    [Note: every rank runs every backward exchange] ``anchor`` (the gate weight) makes the output
    require grad on every rank whenever training, even where this rank's chunk is empty or its
    input needs no gradient: autograd would otherwise leave the node out of this rank's graph, and
    the peers' backward all_to_all would wait for a rank that never calls it."""

    @staticmethod
    def forward(ctx, x, anchor, comm, out_splits, in_splits):  # noqa: ANN001
        ctx.comm, ctx.out_splits, ctx.in_splits = comm, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        comm.all_to_all(out, x.contiguous(), out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        gi = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        ctx.comm.all_to_all(gi, g.contiguous(), ctx.in_splits, ctx.out_splits)
        return gi, None, None, None, None


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


class DeepSeekMoE(nn.Module):
    """A DeepSeekMoE feed-forward layer; see the module docstring.

    ``comm``: an object with ``rank``, ``world_size``, ``all_to_all(out, inp, out_splits,
    in_splits)`` and ``allgather(out, inp)`` (haiscale's ``Comm`` on hfreduce by default when
    hfreduce is initialised; without it, or with ``expert_parallel=False``, the layer holds every
    expert and communicates nothing). Weights are drawn from torch's global generator for all
    experts in the same order whatever the world size, then each rank keeps its slice: the same
    seed gives the same layer on 1, 2 or 4 ranks.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, n_shared: int = 1,
                 granularity: int = 1, score_func: str = "sigmoid", norm_topk: bool | None = None,
                 balance: str | None = "lfb", bias_update_speed: float = 1e-3, aux_loss_coef: float = 1e-2,
                 capacity_factor: float | None = None, expert_parallel: bool = True, comm: Any = None,
                 process_group: Any = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__()
        if score_func not in ("sigmoid", "softmax"):
            raise UsageError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
        if balance not in ("lfb", "aux", None):
            raise UsageError(f"balance must be 'lfb', 'aux' or None, got {balance!r}")
        if d_ff % granularity:
            raise UsageError(f"d_ff={d_ff} is not divisible by granularity={granularity}")
        self.d_model, self.n_experts = d_model, n_experts * granularity
        self.hidden, self.top_k = d_ff // granularity, top_k * granularity
        if not 0 < self.top_k <= self.n_experts:
            raise UsageError(f"top_k*granularity={self.top_k} must be in 1..{self.n_experts} routed experts")
        self.score_func, self.balance = score_func, balance
        self.norm_topk = (score_func == "sigmoid") if norm_topk is None else norm_topk
        self.bias_update_speed, self.aux_loss_coef = bias_update_speed, aux_loss_coef
        self.capacity_factor = capacity_factor
        if comm is None and expert_parallel:
            import hfreduce

            if process_group is not None or hfreduce.is_initialized():
                comm = Comm(process_group, timeout=timeout)
        self.comm = comm
        self.world = comm.world_size if comm is not None else 1
        self.rank = comm.rank if comm is not None else 0
        if self.n_experts % self.world:
            raise UsageError(f"{self.n_experts} routed experts cannot be split evenly over {self.world} ranks")
        self.n_local = self.n_experts // self.world
        lo, hi = self.rank * self.n_local, (self.rank + 1) * self.n_local
        E, h, d = self.n_experts, self.hidden, d_model
        self.gate = nn.Parameter(torch.randn(E, d) / math.sqrt(d))
        self.w1 = nn.Parameter((torch.randn(E, h, d) / math.sqrt(d))[lo:hi].clone())
        self.w3 = nn.Parameter((torch.randn(E, h, d) / math.sqrt(d))[lo:hi].clone())
        self.w2 = nn.Parameter((torch.randn(E, d, h) / math.sqrt(h))[lo:hi].clone())
        for p in (self.w1, self.w3, self.w2):
            p.expert_parallel = True  # type: ignore[attr-defined]
        hs = n_shared * h
        if n_shared:
            self.shared_w1 = nn.Parameter(torch.randn(hs, d) / math.sqrt(d))
            self.shared_w3 = nn.Parameter(torch.randn(hs, d) / math.sqrt(d))
            self.shared_w2 = nn.Parameter(torch.randn(d, hs) / math.sqrt(hs))
        self.n_shared = n_shared
        self.register_buffer("expert_bias", torch.zeros(E))
        self._pending_load = np.zeros(E, dtype=np.int64)
        self.stats = MoEStats(E)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_load = np.zeros(E, dtype=np.int64)

    # -- balancing -------------------------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-Free Balancing step: bias += u * sign(mean load - load), load summed over every rank
        and every forward since the previous update (identical on every rank: no communication)."""
        load = self._pending_load.astype(np.float64)
        self._pending_load[:] = 0
        if self.balance != "lfb" or load.sum() == 0:
            return
        delta = torch.from_numpy(np.sign(load.mean() - load)).to(self.expert_bias.dtype)
        self.expert_bias.add_(self.bias_update_speed * delta)

    def reset_stats(self) -> None:
        self.stats = MoEStats(self.n_experts)

    # -- forward ---------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores [T, E] float32, chosen experts [T, k], gate weights [T, k])."""
        logits = F.linear(x.float(), self.gate.float())
        scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
        with torch.no_grad():
            choice = scores + self.expert_bias if self.balance == "lfb" else scores
            idx = torch.topk(choice, self.top_k, dim=-1, sorted=True).indices
        w = scores.gather(1, idx)
        if self.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        return scores, idx, w

    def _exchange_counts(self, counts: np.ndarray, sent: np.ndarray) -> np.ndarray:
        """[W, 2E] table: every rank's routed counts and sent (kept) counts per expert."""
        mine = np.concatenate([counts, sent]).astype(np.int64)
        if self.world == 1 or self.comm is None:
            return mine[None]
        table = np.zeros(self.world * mine.size, dtype=np.int64)
        self.comm.allgather(table, mine)
        return table.reshape(self.world, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        T, E, k, W = x.shape[0], self.n_experts, self.top_k, self.world
        scores, idx, w = self.route(x)
        flat_e = idx.reshape(-1)
        order = torch.argsort(flat_e, stable=True)  # routed copies grouped by expert, token order within
        counts = torch.bincount(flat_e, minlength=E)
        if self.capacity_factor is not None:
            cap = max(1, math.ceil(self.capacity_factor * T * k / E))
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(order.numel()) - starts[flat_e[order]]
            order = order[pos < cap]
            sent = counts.clamp(max=cap)
        else:
            sent = counts
        counts_np, sent_np = counts.numpy(), sent.numpy()
        table = self._exchange_counts(counts_np, sent_np)
        load = table[:, :E].sum(0)
        dropped = int(load.sum() - table[:, E:].sum())
        if self.training:
            self._pending_load += load
        self.last_load = load
        self.stats.add(load, dropped)

        token = order // k
        xs = x[token]
        sent_tab = table[:, E:].reshape(W, W, self.n_local)  # [src, dst rank, local expert]
        if W > 1:
            in_splits = sent_tab[self.rank].sum(1).tolist()
            from_src = sent_tab[:, self.rank, :]  # [src, local expert]
            out_splits = from_src.sum(1).tolist()
            rows = _AllToAll.apply(xs, self.gate, self.comm, out_splits, in_splits)
            sizes = [int(n) for n in from_src.reshape(-1)]  # (source, expert) segments, source-major
        else:
            rows, sizes = xs, [int(n) for n in sent_np]
        # [Note: segments in arrival order] Each chunk that arrives is ordered by expert, so the
        # received rows are W x E_local segments; every segment is multiplied by its expert where it
        # lies, and the results, concatenated in the same order, are already in the order of the
        # return trip: no regrouping copy either way (W x E_local matmuls instead of E_local,
        # which costs nothing measurable at these sizes). One split of the rows and one unbind of
        # each stacked weight: their backwards concatenate/stack once, where slicing per segment
        # would make each backward fill and add a zero tensor the size of all rows / all experts.
        parts = torch.split(rows, sizes)
        w1s, w3s, w2s = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        outs = [_swiglu(parts[j], w1s[j % self.n_local], w3s[j % self.n_local], w2s[j % self.n_local])
                for j in range(len(sizes)) if sizes[j]]
        y = torch.cat(outs) if outs else rows[:0]  # (0 rows, still in the graph: see _AllToAll)
        if W > 1:
            y = _AllToAll.apply(y, self.gate, self.comm, in_splits, out_splits)
        gw = w.reshape(-1)[order].to(y.dtype).unsqueeze(1)
        out = torch.zeros_like(x).index_add(0, token, (y * gw).to(x.dtype))
        if self.n_shared:
            out = out + _swiglu(x, self.shared_w1, self.shared_w3, self.shared_w2)
        if self.balance == "aux" and self.training:
            # expert-level balance loss: f_i from the global counts, P_i over this rank's tokens
            # (scores renormalised over experts for sigmoid), so averaging the ranks' gradients
            # gives the gradient of the loss over the global batch
            p = scores if self.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
            t_all = float(load.sum()) / k
            f = torch.from_numpy(load.astype(np.float32)) * (E / (k * max(t_all, 1.0)))
            self.aux_loss = self.aux_loss_coef * (f * p.mean(0)).sum()
        else:
            self.aux_loss = torch.zeros((), dtype=scores.dtype)
        return out.reshape(shape)


def moe_layers(model: nn.Module) -> list[DeepSeekMoE]:
    return [m for m in model.modules() if isinstance(m, DeepSeekMoE)]


def update_balance(model: nn.Module) -> None:
    """Call after each optimizer step: Loss-Free Balancing's bias update on every MoE layer."""
    for m in moe_layers(model):
        m.update_bias()


def aux_losses(model: nn.Module) -> torch.Tensor:
    """The sum of the layers' auxiliary balance losses of the last forward (0 without ``balance='aux'``)."""
    layers = moe_layers(model)
    return sum((m.aux_loss for m in layers), torch.zeros(()))


def sync_grads(model: nn.Module, comm: Any = None) -> None:
    """Average replicated parameters' gradients over the ranks; scale expert gradients by 1/W.

    See [Note: replicated vs expert gradients]. ``comm`` defaults to the first MoE layer's."""
    layers = moe_layers(model)
    comm = comm or next((m.comm for m in layers if m.comm is not None), None)
    if comm is None or comm.world_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "expert_parallel", False):
            p.grad.div_(comm.world_size)
        else:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for dtype in sorted(by_dtype, key=str):
        grads = by_dtype[dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        comm.wait(comm.allreduce_avg(flat), "gradient average")
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
