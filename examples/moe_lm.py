"""Train a small DeepSeekMoE language model with expert parallelism (haiscale.moe on hfreduce).

    python examples/moe_lm.py                         # 2 processes on this machine (haiscale.spawn)
    hai python examples/moe_lm.py -- --nodes 1        # on the platform (every rank started for us)
    torchrun --nproc-per-node 2 examples/moe_lm.py    # any launcher that sets RANK, LOCAL_RANK, ...

The model: token embedding, 2 blocks of (previous-token mixing, DeepSeekMoE feed-forward), head.
Each MoE layer has 16 fine-grained routed experts (4 experts split 4 ways, top-8) and 1 shared
expert; the routed experts are split over the ranks (expert parallelism), everything else is
replicated. Every rank trains on its slice of each batch; ``sync_grads`` averages the replicated
gradients, ``update_balance`` moves the Loss-Free Balancing biases after each step. The data is a
synthetic Markov-chain corpus, the same on every rank. With ``--out DIR``, checkpoints are saved
per rank (each holds its own experts): ``DIR/moe_lm.rank{R}.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402

VOCAB, D, CTX = 128, 64, 32


class MoELM(nn.Module):
    def __init__(self, balance: str) -> None:
        from haiscale.moe import DeepSeekMoE

        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.mix = nn.ModuleList([nn.Linear(2 * D, D) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(D) for _ in range(4)])
        # 4 experts of hidden 4*D, each split 4 ways: 16 routed experts of hidden D, top-8
        self.moe = nn.ModuleList([DeepSeekMoE(D, 4 * D, n_experts=4, top_k=2, granularity=4, n_shared=1,
                                              balance=balance) for _ in range(2)])
        self.head = nn.Linear(D, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        for i in range(2):
            a = self.norms[2 * i](h)
            prev = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], 1)
            h = h + self.mix[i](torch.cat([a, prev], -1))
            h = h + self.moe[i](self.norms[2 * i + 1](h))
        return self.head(h)


def corpus(n: int, seed: int) -> torch.Tensor:
    """A first-order Markov chain with sparse, skewed transitions (the same chain for every seed)."""
    trans = np.random.default_rng(0).dirichlet(np.full(VOCAB, 0.05), size=VOCAB)
    cum = np.cumsum(trans, 1)
    u = np.random.default_rng(seed).random(n)
    out = np.zeros(n, np.int64)
    for i in range(1, n):
        out[i] = min(int(np.searchsorted(cum[out[i - 1]], u[i] * cum[out[i - 1], -1])), VOCAB - 1)
    return torch.from_numpy(out)


def batches(data: torch.Tensor, step: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, data.numel() - CTX - 1, (n,), generator=g).tolist()
    return torch.stack([data[s:s + CTX + 1] for s in starts])


def train(local_rank: int, steps: int, batch: int, balance: str, out: str) -> None:
    import hfreduce
    from haiscale.moe import aux_losses, moe_layers, sync_grads, update_balance

    torch.set_num_threads(1)
    hfreduce.init()
    rank, world = hfreduce.get_rank(), hfreduce.get_world_size()
    torch.manual_seed(0)  # the same replicated weights everywhere; each rank keeps its experts
    model = MoELM(balance)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data, val = corpus(50_000, 1), corpus(4_000, 2)
    for step in range(steps):
        xy = batches(data, step, batch).chunk(world)[rank]
        logits = model(xy[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), xy[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + aux_losses(model)).backward()
        sync_grads(model)  # average replicated gradients; expert gradients / world
        opt.step()
        update_balance(model)  # Loss-Free Balancing: bias += u * sign(mean load - load)
        if rank == 0 and step % 25 == 0:
            vio = max(m.stats.maxvio_batch for m in moe_layers(model))
            print(f"step {step:3d} loss {loss.item():.4f} MaxVio(batch) {vio:.3f}", flush=True)
    model.eval()
    for m in moe_layers(model):
        m.reset_stats()
    with torch.no_grad():
        xy = batches(val, 10_000, batch).chunk(world)[rank]
        vloss = nn.functional.cross_entropy(model(xy[:, :-1]).reshape(-1, VOCAB), xy[:, 1:].reshape(-1)).item()
    if rank == 0:
        print(f"validation loss {vloss:.4f} (rank 0's slice); MaxVio over the validation batch "
              f"{max(m.stats.maxvio_epoch for m in moe_layers(model)):.3f}")
    if out:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "world": world},
                   os.path.join(out, f"moe_lm.rank{rank}.pt"))
    hfreduce.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nprocs", type=int, default=2, help="processes to spawn when no launcher started them")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32, help="global batch of sequences (split over the ranks)")
    ap.add_argument("--balance", choices=["lfb", "aux"], default="lfb")
    ap.add_argument("--out", default="", help="a directory for the per-rank checkpoints (default: none saved)")
    args = ap.parse_args()
    a = (args.steps, args.batch, args.balance, args.out)
    if "LOCAL_RANK" in os.environ and "HAISCALE_SPAWNED" not in os.environ:  # hai python / torchrun
        train(int(os.environ["LOCAL_RANK"]), *a)
    else:
        haiscale.spawn(train, args=a, nprocs=args.nprocs, timeout=900)


if __name__ == "__main__":
    main()
