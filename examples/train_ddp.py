"""Train a small MLP classifier with haiscale DDP on hfreduce.

    python examples/train_ddp.py                # 2 processes on this machine (haiscale.spawn)
    hai python --nodes 2 examples/train_ddp.py  # on the platform: one rank per process it starts
    torchrun --nproc-per-node 2 examples/train_ddp.py   # or any launcher that sets RANK, LOCAL_RANK...

haiscale.spawn sees when the launcher already started this process as a rank and runs train() here.

Each rank sees its own slice of every batch; gradients are averaged by hfreduce during backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402


def data(step: int, n: int = 64):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()  # 3 classes
    return x, y


def train(local_rank: int, steps: int, out: str) -> None:
    import hfreduce
    from haiscale.ddp import DistributedDataParallel

    torch.set_num_threads(1)
    hfreduce.init()
    rank, world = hfreduce.get_rank(), hfreduce.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for step in range(steps):
        x, y = data(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # returns when every gradient bucket is averaged across ranks
        opt.step()
        if rank == 0 and step % 20 == 0:
            print(f"step {step:3d} loss {loss.item():.4f}")
    x, y = data(10_000, 512)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    if rank == 0:
        print(f"held-out accuracy {acc:.3f}")
        torch.save(model.state_dict(), f"{out}/mlp_ddp.pt")  # loads into the bare module
    model.reducer.stop()
    hfreduce.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--no-spawn", action="store_true", help="run train() here without spawn (spawn already does "
                    "when a launcher started this process)")
    args = ap.parse_args()
    if args.no_spawn:
        train(0, args.steps, args.out)
    else:
        haiscale.spawn(train, args=(args.steps, args.out), nprocs=args.nprocs, timeout=600)


if __name__ == "__main__":
    main()
