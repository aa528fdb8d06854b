"""Train a small transformer language model with haiscale FSDP (ZeRO-3) on hfreduce.

    python examples/train_fsdp.py [--optimizer-in-backward]

One FSDP unit per transformer layer: each rank holds 1/N of every parameter, gradient and Adam
state; a layer's full parameters exist only while it runs (allgathered, the next one prefetched).
At the end a full checkpoint is gathered on rank 0 and a sharded one is written by every rank.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402

VOCAB, SEQ = 32, 12


class LM(nn.Module):
    def __init__(self, d: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.tok(x) + self.pos[: x.shape[1]]
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.ln(h))


def batch(step: int, n: int = 32):
    """Sequences counting up modulo VOCAB from a random start: easy to learn, easy to check."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    seq = (start + torch.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def train(local_rank: int, steps: int, in_backward: bool, out: str) -> None:
    import hfreduce
    from haiscale.fsdp import FullyShardedDataParallel, ModuleWrapPolicy

    torch.set_num_threads(1)
    hfreduce.init()
    rank, world = hfreduce.get_rank(), hfreduce.get_world_size()
    torch.manual_seed(0)
    adam = (torch.optim.Adam, {"lr": 3e-3})
    model = FullyShardedDataParallel(LM(), auto_wrap_policy=ModuleWrapPolicy([nn.TransformerEncoderLayer]),
                                     optimizer_in_backward=adam if in_backward else None)
    opt = None if in_backward else adam[0](model.parameters(), **adam[1])
    for step in range(steps):
        x, y = batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        if opt:
            opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()  # with --optimizer-in-backward, each layer was already updated here
        if opt:
            opt.step()
        if rank == 0 and step % 20 == 0:
            print(f"step {step:3d} loss {loss.item():.4f}")
    full = model.full_state_dict()  # collective: every rank calls it, rank 0 gets the tensors
    if rank == 0:
        torch.save(full, f"{out}/lm_full.pt")
        print(f"full checkpoint: {len(full)} tensors -> {out}/lm_full.pt")
    torch.save(model.sharded_state_dict(), f"{out}/lm_shard{rank}.pt")
    with model.summon_full_params(writeback=False):
        if rank == 0:
            print("head weight norm", model.module.head.weight.norm().item())
    hfreduce.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--optimizer-in-backward", action="store_true")
    ap.add_argument("--out", default="/tmp")
    args = ap.parse_args()
    haiscale.spawn(train, args=(args.steps, args.optimizer_in_backward, args.out), nprocs=args.nprocs, timeout=900)


if __name__ == "__main__":
    main()
