"""The demo's training job: haiscale DDP on hfreduce, data and checkpoints on fs3, suspend and resume.

Submitted by ``make demo`` through the platform (``hai python examples/demo_train.py -- --nodes 2``);
every rank gets the job environment from its node's agent. The job:

- reads its training data (a regression problem: y = tanh(X @ w) + noise) from an FFRecord dataset
  on fs3 (``/demo/train/part-*.ffr``, one sample = the 32 float32 features and the float32 target),
  each step reading its ranks' samples with one batched read (``fs3.formats.torch.FFRecordDataset``);
- trains a small MLP with haiscale DDP (gradients averaged by hfreduce across all ranks and nodes);
- checkpoints model + optimizer + step through ``fs3.checkpoint`` every ``--ckpt-every`` steps
  (rank 0 saves; ``save`` copies the tensors and returns, the write goes on in the background,
  atomically renamed into place; any rank of any later attempt loads it: shared storage);
- is time-shared through :mod:`haiplatform.job`: when the scheduler preempts it (or its user
  types ``hai suspend``), ``receive_suspend_command()`` turns True on the ranks (the agent writes
  ``suspend`` into ``$HAI_CONTROL``; no signal) and acknowledges it; all ranks agree on the step
  to stop at (an allreduce of the flag), rank 0 checkpoints and waits for the write, every rank
  waits for it (a second allreduce), and each calls ``go_suspend()``; the platform re-queues the
  job, and the next attempt resumes from the checkpoint. Every checkpoint is reported
  (``report_checkpoint()``): the scheduler prefers to preempt the job that loses least work;
- ends by printing a digest of its final parameters (``params sha256 ...``), so that a run that was
  suspended and resumed can be compared bit for bit with one that was not.

Files are reached through the fs3 Python client (``fs3.FileSystem`` on ``$HAI_CLUSTER_FILE``), or
through a FUSE mount of fs3 when ``--mount DIR`` (or ``$FS3_MOUNT``) names one. ``prepare_fs3``
(called by the demo before it submits the job) writes the dataset and makes the checkpoint
directory, world-writable and sticky like /tmp: the job runs as the researcher's account.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from haiplatform import job  # noqa: E402

DATA_PATH = "/demo/train"
CKPT_DIR = "/demo/ckpt"
FEATURES = 32


def make_dataset(n: int = 4096, d: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, 1)).astype(np.float32)
    y = np.tanh(x @ w) + 0.05 * rng.standard_normal((n, 1)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y.astype(np.float32))
    return buf.getvalue()


def prepare_fs3(fs, root: str = "/demo", files: int = 2) -> dict:
    """Write the training set as FFRecord files under ``root/train`` and make ``root/ckpt`` (mode
    1777). ``fs``: an ``fs3.FileSystem``, or None for a local path (an fs3 mount). Returns a summary."""
    from fs3.formats import write_samples

    data = np.load(io.BytesIO(make_dataset()))
    rows = np.concatenate([data["x"], data["y"]], axis=1).astype(np.float32)
    train, ckpt = f"{root}/train", f"{root}/ckpt"
    for d, mode in ((train, 0o755), (ckpt, 0o1777)):
        if fs is None:
            os.makedirs(d, exist_ok=True)
            os.chmod(d, mode)
        else:
            fs.makedirs(d, exist_ok=True)
            fs.chmod(d, mode)
    parts = np.array_split(np.arange(len(rows)), files)
    for k, idx in enumerate(parts):
        write_samples(f"{train}/part-{k:02d}.ffr", [rows[i].tobytes() for i in idx], fs=fs)
    return {"dataset": train, "samples": len(rows), "files": files, "bytes": rows.nbytes, "ckpt_dir": ckpt}


def decode(sample: bytes) -> np.ndarray:
    """One FFRecord sample -> float32[FEATURES + 1] (features, then the target)."""
    return np.frombuffer(sample, np.float32)


class JobData:
    """Where the job's data and checkpoints live: the FFRecord dataset and ``fs3.checkpoint``."""

    def __init__(self, args: argparse.Namespace) -> None:
        from fs3.formats.torch import FFRecordDataset

        self.mount = args.mount
        self.fs = None
        if self.mount:
            self.data, self.ckpt = self.mount.rstrip("/") + args.data, self.mount.rstrip("/") + args.ckpt
        else:
            from fs3.client.files import FileSystem

            self.fs = FileSystem(os.environ["HAI_CLUSTER_FILE"])
            self.data, self.ckpt = args.data, args.ckpt
        self.pending = None  # the checkpoint save in flight
        self.ds = FFRecordDataset(self.data, fs=self.fs, transform=decode)
        self.where = f"the FFRecord dataset {self.data} on fs3 ({len(self.ds.reader.paths)} files)"

    def __len__(self) -> int:
        return len(self.ds)

    def batch(self, indices: list[int]) -> np.ndarray:
        """Rows (features + target) of ``indices``: one batched read from fs3."""
        return np.stack(self.ds[indices]) if indices else np.empty((0, FEATURES + 1), np.float32)

    def load(self) -> dict | None:
        """The last checkpoint, or None when there is none yet."""
        from fs3 import checkpoint

        try:
            return checkpoint.load(self.ckpt, fs=self.fs)
        except FileNotFoundError:
            return None

    def save(self, state: dict, wait: bool) -> None:
        """Start a checkpoint (the loop goes on while it is written); ``wait``: until it is on fs3."""
        from fs3 import checkpoint

        self.poll(wait=True)
        self.pending = (state["step"], checkpoint.save(state, self.ckpt, fs=self.fs))
        self.poll(wait=wait)

    def poll(self, wait: bool = False) -> None:
        """Report the save in flight once it is done (raising its error)."""
        if self.pending is None or not (wait or self.pending[1].done()):
            return
        step, h = self.pending
        self.pending = None
        manifest = h.wait(300)
        job.report_checkpoint()
        print(f"step {step}: checkpoint saved to fs3 ({manifest['bytes']} bytes of tensors, {self.ckpt}; "
              f"the loop was held {h.blocked_s * 1000:.1f} ms, the write took {h.write_s * 1000:.0f} ms)", flush=True)

    def close(self) -> None:
        self.poll(wait=True)
        if self.fs is not None:
            self.fs.close()


def params_digest(module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, bytes), in state_dict order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{name} {a.dtype} {a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256, help="global batch (split over the ranks)")
    ap.add_argument("--ckpt-every", type=int, default=10)
    ap.add_argument("--step-sleep", type=float, default=0.1, help="pace the demo so a suspend lands mid-run")
    ap.add_argument("--data", default=DATA_PATH, help="the FFRecord dataset (a directory of .ffr files) on fs3")
    ap.add_argument("--ckpt", default=None, help=f"the checkpoint file on fs3 (default {CKPT_DIR}/chain-$HAI_CHAIN_ID)")
    ap.add_argument("--mount", default=os.environ.get("FS3_MOUNT"),
                    help="where fs3 is mounted (FUSE); without it the job uses the fs3 Python client")
    args = ap.parse_args()
    if args.ckpt is None:
        args.ckpt = f"{CKPT_DIR}/chain-{os.environ.get('HAI_CHAIN_ID') or os.environ.get('HAI_JOB_ID') or 'local'}"

    import torch
    from torch import nn

    import hfreduce
    from haiscale.ddp import DistributedDataParallel

    torch.set_num_threads(1)

    pg = hfreduce.init()
    rank, world = pg.rank, pg.world_size
    attempt = int(os.environ.get("HAI_RESTART_COUNT", "0"))
    data = JobData(args)
    n = len(data)

    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(FEATURES, 64), nn.Tanh(), nn.Linear(64, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    start = 0
    state = data.load()
    if state is not None:
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        if rank == 0:
            print(f"attempt {attempt}: resumed from the fs3 checkpoint at step {start}", flush=True)
    elif rank == 0:
        print(f"attempt {attempt}: no checkpoint on fs3, starting at step 0", flush=True)
    if rank == 0:
        nodes = pg.info().get("nodes", [])
        import pwd

        print(f"{world} ranks on {len(nodes)} nodes ({', '.join(nodes)}); hfreduce kernel "
              f"{hfreduce.info().get('kernel')}; running as {pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()}); "
              f"data: {n} samples from {data.where}", flush=True)

    def save(step: int, wait: bool = False) -> None:
        if rank == 0:
            data.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step}, wait=wait)

    def tensors(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(np.ascontiguousarray(rows))
        return t[:, :FEATURES], t[:, FEATURES:]

    flag = np.zeros(1, np.int32)
    loss_v = float("nan")
    for step in range(start, args.steps):
        # all ranks agree on stopping at the same step (each node's agent tells its own ranks)
        flag[0] = int(job.receive_suspend_command())
        hfreduce.allreduce(flag, op=hfreduce.ReduceOp.MAX)
        if flag[0]:
            save(step, wait=True)
            hfreduce.allreduce(flag, op=hfreduce.ReduceOp.MAX)  # every rank waits for rank 0's save
            if rank == 0:
                print(f"step {step}: suspend requested, checkpointed, exiting", flush=True)
            model.reducer.stop()
            data.close()
            hfreduce.destroy()
            job.go_suspend()
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, n, (args.batch,), generator=g)
        xb, yb = tensors(data.batch(idx.chunk(world)[rank].tolist()))  # this rank's share, one batched read
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        if rank == 0:
            data.poll()
            if step % 5 == 0:
                print(f"step {step:3d} loss {loss_v:.4f}", flush=True)
        if (step + 1) % args.ckpt_every == 0:
            save(step + 1)
        time.sleep(args.step_sleep)
    if rank == 0:
        data.poll(wait=True)
    x_all, y_all = tensors(data.batch(list(range(n))))
    with torch.no_grad():
        full = nn.functional.mse_loss(model(x_all), y_all).item()
    if rank == 0:
        print(f"done: {args.steps} steps, last batch loss {loss_v:.4f}, full-data loss {full:.4f}", flush=True)
        print(f"params sha256 {params_digest(model.module)}", flush=True)
    model.reducer.stop()
    data.close()
    hfreduce.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
