"""The demo's training job: haiscale DDP on hfreduce, data and checkpoints on fs3, suspend and resume.

Submitted by ``make demo`` through the platform (``hai python examples/demo_train.py -- --nodes 2``);
every rank gets the job environment from its node's agent. The job:

- reads its dataset (a regression problem: y = X @ w_true + noise) from fs3 chunks;
- trains a small MLP with haiscale DDP (gradients averaged by hfreduce across all ranks and nodes);
- checkpoints model + optimizer + step to fs3 every ``--ckpt-every`` steps (rank 0 writes; any
  rank of any later attempt reads it back: that is what shared storage is for);
- on a suspend (the agent writes ``suspend`` into ``$HAI_CONTROL`` and sends SIGTERM), all ranks
  agree on the step to stop at (an allreduce of the flag), rank 0 checkpoints, and they exit; the
  platform re-queues the job, and the next attempt resumes from the checkpoint.

Files on fs3 are "blobs" here (the metadata service and FUSE mount arrive with a later issue): blob
``inode`` is chunk 0 = header (magic, length), chunks 1.. = the bytes, chunk i on chain
``chains[(inode + i) % len(chains)]``.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

_HDR = struct.Struct("<8sQ")
_MAGIC = b"FFBLOB01"
DATA_INODE = 1001
CKPT_INODE = 2001


def blob_write(client, inode: int, data: bytes) -> None:
    """Store ``data`` as blob ``inode`` (chunks striped over the chains, header last)."""
    from fs3.client import WriteIO, file_chunk_id

    chains, cs = client.chains(), client.chunk_size
    ios = [WriteIO(chains[(inode + i) % len(chains)], file_chunk_id(inode, i), data[(i - 1) * cs: i * cs])
           for i in range(1, (len(data) + cs - 1) // cs + 1)]
    client.batch_write(ios)
    # the header goes last: a reader never sees a length whose chunks are not all written
    client.write(chains[inode % len(chains)], file_chunk_id(inode, 0), _HDR.pack(_MAGIC, len(data)))


def blob_read(client, inode: int) -> bytes | None:
    """Blob ``inode``'s bytes, or None when it does not exist."""
    from fs3.client import ReadIO, file_chunk_id
    from fs3.errors import ChunkNotFound

    chains, cs = client.chains(), client.chunk_size
    try:
        hdr = bytes(client.read(chains[inode % len(chains)], file_chunk_id(inode, 0)))
    except ChunkNotFound:
        return None
    magic, length = _HDR.unpack(hdr[: _HDR.size])
    if magic != _MAGIC:
        raise ValueError(f"blob {inode}: bad header")
    out = bytearray(length)
    ios = [ReadIO(chains[(inode + i) % len(chains)], file_chunk_id(inode, i),
                  into=memoryview(out)[(i - 1) * cs: min(i * cs, length)])
           for i in range(1, (length + cs - 1) // cs + 1)]
    client.batch_read(ios)
    return bytes(out)


def make_dataset(n: int = 4096, d: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, 1)).astype(np.float32)
    y = np.tanh(x @ w) + 0.05 * rng.standard_normal((n, 1)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y.astype(np.float32))
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256, help="global batch (split over the ranks)")
    ap.add_argument("--ckpt-every", type=int, default=10)
    ap.add_argument("--step-sleep", type=float, default=0.1, help="pace the demo so a suspend lands mid-run")
    args = ap.parse_args()

    import torch
    from torch import nn

    import hfreduce
    from fs3.client import ChunkClient
    from haiscale.ddp import DistributedDataParallel

    torch.set_num_threads(1)
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    control = os.environ.get("HAI_CONTROL")

    pg = hfreduce.init()
    rank, world = pg.rank, pg.world_size
    attempt = int(os.environ.get("HAI_RESTART_COUNT", "0"))
    client = ChunkClient.from_cluster(os.environ["HAI_CLUSTER_FILE"], os.environ.get("HAI_NODE_NAME"))

    data = np.load(io.BytesIO(blob_read(client, DATA_INODE)))
    x_all, y_all = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(x_all.shape[1], 64), nn.Tanh(), nn.Linear(64, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    start = 0
    ckpt = blob_read(client, CKPT_INODE)
    if ckpt is not None:
        state = torch.load(io.BytesIO(ckpt), weights_only=True)
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
              f"{hfreduce.info().get('kernel')}; running as {pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})",
              flush=True)

    def save(step: int) -> None:
        if rank == 0:
            buf = io.BytesIO()
            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step}, buf)
            blob_write(client, CKPT_INODE, buf.getvalue())
            print(f"step {step}: checkpoint saved to fs3 ({buf.tell()} bytes)", flush=True)

    flag = np.zeros(1, np.int32)
    loss_v = float("nan")
    for step in range(start, args.steps):
        # all ranks agree on stopping at the same step (suspend: the agent signals every rank)
        flag[0] = int(stop["flag"] or bool(control and os.path.exists(os.path.join(control, "suspend"))))
        hfreduce.allreduce(flag, op=hfreduce.ReduceOp.MAX)
        if flag[0]:
            save(step)
            if rank == 0:
                print(f"step {step}: suspend requested, checkpointed, exiting", flush=True)
            model.reducer.stop()
            hfreduce.destroy()
            return 0
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, x_all.shape[0], (args.batch,), generator=g)
        xb, yb = x_all[idx].chunk(world)[rank], y_all[idx].chunk(world)[rank]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d} loss {loss_v:.4f}", flush=True)
        if (step + 1) % args.ckpt_every == 0:
            save(step + 1)
        time.sleep(args.step_sleep)
    with torch.no_grad():
        full = nn.functional.mse_loss(model(x_all), y_all).item()
    if rank == 0:
        print(f"done: {args.steps} steps, last batch loss {loss_v:.4f}, full-data loss {full:.4f}", flush=True)
    model.reducer.stop()
    client.close()
    hfreduce.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
