"""Train a small transformer language model split into pipeline stages (haiscale.pipeline).

    python examples/pipeline_transformer.py                      # 2 stages on 2 processes (haiscale.spawn)
    python examples/pipeline_transformer.py --nprocs 4 --pp 2    # 2 replicas x 2 stages, one-NIC layout
    hai python examples/pipeline_transformer.py -- --no-spawn    # the platform started the ranks
    python examples/pipeline_transformer.py --local              # every stage in this process (no send/recv)

The model is an nn.Sequential (embedding, blocks, head) cut into stages by parameter count; each
step runs 1F1B (or --schedule gpipe) over --chunks micro-batches, and each stage's gradients are
averaged over its data-parallel group.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402

VOCAB, SEQ, D = 64, 16, 32


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(SEQ, D) * 0.02)

    def forward(self, x):
        return self.tok(x) + self.pos[: x.shape[1]]


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, h):
        return self.out(self.ln(h))


def build(blocks: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True) for _ in range(blocks)]
    return nn.Sequential(Embed(), *layers, Head())


def data(step: int, n: int):
    """Copy-shifted sequences: the next token is the previous one + 1 (learnable in a few steps)."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    seq = (start + torch.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def criterion(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def train(local_rank: int, args: argparse.Namespace) -> None:
    import hfreduce
    from haiscale.pipeline import GPipe, PipeDream, make_subgroups, partition, rank_layout

    torch.set_num_threads(1)
    hfreduce.init()
    dp_group, pp_group = make_subgroups(args.pp, one_nic=True)
    # the replica this rank serves (a dp group numbers its ranks in sorted order, not by replica)
    world = hfreduce.get_default()
    stage, replica = pp_group.rank(), rank_layout(world.world_size, args.pp, one_nic=True).where[world.rank][0]
    ndp = 1 if dp_group is None else dp_group.world_size
    module = partition(build(), stage, args.pp)
    cls = GPipe if args.schedule == "gpipe" else PipeDream
    model = cls(module, chunks=args.chunks, process_group=pp_group, dp_group=dp_group)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    for step in range(args.steps):
        x, y = data(step, args.batch * ndp)
        x, y = x.chunk(ndp)[replica], y.chunk(ndp)[replica]
        opt.zero_grad()
        loss, _ = model.forward_backward(x if stage == 0 else None, criterion=criterion, labels=(y,))
        opt.step()
        if loss is not None and replica == 0 and step % 10 == 0:
            print(f"step {step:3d} loss {loss.item():.4f} (stage {stage}, replica {replica})", flush=True)
    hfreduce.destroy()


def train_local(args: argparse.Namespace) -> None:
    from haiscale.pipeline import run_local, split

    stages = split(build(), args.pp)
    opt = torch.optim.Adam([p for s in stages for p in s.parameters()], lr=3e-3)
    for step in range(args.steps):
        x, y = data(step, args.batch)
        opt.zero_grad()
        loss, _ = run_local(stages, args.schedule, args.chunks, x, criterion, labels=(y,))
        opt.step()
        if step % 10 == 0:
            print(f"step {step:3d} loss {loss.item():.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2, help="pipeline stages (nprocs must be a multiple)")
    ap.add_argument("--chunks", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b")
    ap.add_argument("--batch", type=int, default=16, help="sequences per replica per step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no-spawn", action="store_true", help="the launcher already started the processes")
    ap.add_argument("--local", action="store_true", help="every stage in this process")
    args = ap.parse_args()
    if args.local:
        train_local(args)
    elif args.no_spawn:
        train(0, args)
    else:
        haiscale.spawn(train, args=(args,), nprocs=args.nprocs, timeout=600)


if __name__ == "__main__":
    main()
