"""One rank of bench/topology.py, run inside a node's namespace: time allreduce of SIZE MiB float32.

    python bench/_topology_rank.py hfreduce|gloo MIB REPS WARMUP

Reads torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Every timed call
follows a barrier; rank 0 prints one JSON line: the times (s), a check of the result, and for
hfreduce the trees the group built (parents over node indices) and its node order.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def main() -> None:
    lib, mib, reps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    n = (mib << 20) // 4
    x = np.full(n, rank + 1, np.float32)
    out: dict = {}
    if lib == "hfreduce":
        import hfreduce

        hfreduce.init(timeout=120)
        reduce, barrier = (lambda: hfreduce.allreduce(x)), hfreduce.barrier
        info = hfreduce.info()
        out = {"trees": info.get("trees"), "nodes": info.get("node_names") or info.get("nodes")}
    else:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                                rank=rank, world_size=world)
        t = torch.from_numpy(x)
        reduce, barrier = (lambda: dist.all_reduce(t)), dist.barrier
    times = []
    for i in range(warmup + reps):
        x[:] = rank + 1
        barrier()
        t0 = time.perf_counter()
        reduce()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ok = bool(np.all(x == world * (world + 1) / 2))
    barrier()
    if rank == 0:
        print(json.dumps({"times": times, "correct": ok, **out}), flush=True)
    if lib == "hfreduce":
        hfreduce.destroy()
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
