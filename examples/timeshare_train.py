"""A small data-parallel training job written for time-sharing (haiscale DDP, :mod:`haiplatform.job`).

The smallest complete use of the job-side client: a :class:`haiplatform.job.Checkpointer` saves
every ``--every`` steps into ``--ckpt`` (a local directory, or ``fs3:/dir``) and, when the
scheduler preempts the job, at the step all ranks agree on (a MAX all-reduce of the flag through
hfreduce); the job then stops its gradient threads and calls ``go_suspend()``. The next attempt
resumes from the checkpoint. Everything it computes is a function of the step number (the data
and each step's batch are seeded), so a run that was preempted and resumed ends with exactly the
parameters of one that was not: it prints their digest (``params sha256 ...``).

    hai python examples/timeshare_train.py -- --nodes 2 ... (then: --ckpt DIR --steps 40)
    hai local --suspend-after 2 -- python examples/timeshare_train.py --ckpt /tmp/ck  # no cluster
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from examples.demo_train import params_digest  # noqa: E402
from haiplatform import job  # noqa: E402

FEATURES = 16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (or fs3:/dir)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    ap.add_argument("--step-sleep", type=float, default=0.05, help="pace the run so a preemption lands mid-run")
    args = ap.parse_args(argv)

    import torch
    from torch import nn

    import hfreduce
    from haiscale.ddp import DistributedDataParallel

    torch.set_num_threads(1)
    pg = hfreduce.init()
    rank, world = pg.rank, pg.world_size

    def agree(x: int) -> int:  # MAX over every rank: they stop (and save) at the same step
        a = np.array([x], np.int64)
        hfreduce.allreduce(a, op=hfreduce.ReduceOp.MAX)
        return int(a[0])

    ckpt = job.Checkpointer(args.ckpt, every_steps=args.every, agree=agree, exit=False)
    rng = np.random.default_rng(0)
    x_all = torch.from_numpy(rng.standard_normal((1024, FEATURES)).astype(np.float32))
    y_all = torch.tanh(x_all @ torch.from_numpy(rng.standard_normal((FEATURES, 1)).astype(np.float32)))

    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = 0
    state = ckpt.resume()
    if state is not None:
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = ckpt.last_step = int(state["step"])
    if rank == 0:
        print(f"attempt {os.environ.get('HAI_RESTART_COUNT', '0')}: {world} ranks, "
              + (f"resumed from the checkpoint at step {start}" if state is not None else "starting at step 0"),
              flush=True)
    try:
        for step in range(start, args.steps):
            ckpt.maybe_save(step, lambda step=step: {"model": model.module.state_dict(), "opt": opt.state_dict(),
                                                     "step": step})
            if ckpt.suspended:
                if rank == 0:
                    print(f"step {step}: suspend requested, checkpointed, exiting", flush=True)
                break
            idx = torch.randint(0, len(x_all), (args.batch,), generator=torch.Generator().manual_seed(step))
            mine = idx.chunk(world)[rank]
            opt.zero_grad()
            nn.functional.mse_loss(model(x_all[mine]), y_all[mine]).backward()
            opt.step()
            time.sleep(args.step_sleep)
        else:
            if rank == 0:
                print(f"done: {args.steps} steps; params sha256 {params_digest(model.module)}", flush=True)
    finally:
        model.reducer.stop()
        hfreduce.destroy()
    if ckpt.suspended:
        job.go_suspend()
    return 0


if __name__ == "__main__":
    sys.exit(main())
