"""Shared harness of bench/ddp.py and bench/fsdp.py: one training run of the same model on the same
data, 2 ranks, under one wrapper; reports per-step times and the peak RSS of each rank.

Memory, per rank: ``base`` is the RSS after importing torch and joining the group, before the model
exists (the interpreter and libraries: the same for every wrapper); after the warm-up steps each
rank resets its high-water mark (``echo 5 > /proc/self/clear_refs``) and reads ``VmHWM`` after the
last step, so ``peak`` is the peak of the training steps themselves (for FSDP, without the one-off
full model it shards at wrap time). ``train = peak - base`` is the memory the training holds
(parameters, gradients, optimizer state, buffers, activations). Shared-memory pages a rank touches
(hfreduce's arena) count in its RSS. The FSDP bench sets ``MALLOC_MMAP_THRESHOLD_`` for every
wrapper so that freed large tensors go back to the OS (otherwise glibc keeps them in its heap and
RSS shows the largest transient ever, not what is live).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402

WORLD = 2


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def make_model(d: int, h: int, blocks: int) -> nn.Module:
    """A wide residual MLP: few FLOPs per parameter, so gradient traffic dominates the step."""
    torch.manual_seed(0)
    return nn.Sequential(*[Block(d, h) for _ in range(blocks)], nn.LayerNorm(d), nn.Linear(d, 16))


OPTIMIZERS = {"adam": (torch.optim.Adam, {"lr": 1e-4}), "sgd": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9})}


def make_optimizer(cfg: dict, params):
    cls, kw = OPTIMIZERS[cfg["optim"]]
    return cls(params, **kw)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(local_rank: int, kind: str, cfg: dict, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    rank = int(os.environ["RANK"])
    if kind.startswith("haiscale"):
        import hfreduce

        hfreduce.init(timeout=300)
    else:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    # the first optimizer pulls in torch's compiler modules (~70 MB): load them before the baseline
    torch.optim.Adam([torch.zeros(1, requires_grad=True)]).step()
    base_rss = _status_kb("VmRSS")
    model = make_model(cfg["d"], cfg["h"], cfg["blocks"])
    wrap_cls = (nn.Linear,)  # FSDP units: one per Linear (6.3M parameters each in the full run)
    if kind == "haiscale_ddp":
        from haiscale.ddp import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif kind == "torch_ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif kind == "haiscale_fsdp":
        from haiscale.fsdp import FullyShardedDataParallel, ModuleWrapPolicy

        model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy(wrap_cls),
                                         optimizer_in_backward=OPTIMIZERS[cfg["optim"]])
    elif kind == "torch_fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as TorchFSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy as TorchPolicy

        model = TorchFSDP(model, auto_wrap_policy=TorchPolicy(wrap_cls), device_id=torch.device("cpu"))
    else:
        raise ValueError(kind)
    in_backward = kind == "haiscale_fsdp"
    opt = None if in_backward else make_optimizer(cfg, model.parameters())
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(cfg["batch"], cfg["d"], generator=g)
    y = torch.randn(cfg["batch"], 16, generator=g)
    times = []
    setup_rss = _status_kb("VmRSS")
    peak_reset = False
    for step in range(cfg["warmup"] + cfg["steps"]):
        if step == cfg["warmup"]:
            peak_reset = _reset_peak()
        t0 = time.perf_counter()
        if opt is not None:
            opt.zero_grad(set_to_none=False)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if opt is not None:
            opt.step()
        times.append(time.perf_counter() - t0)
    peak = _status_kb("VmHWM")
    if kind == "haiscale_ddp":
        model.reducer.stop()
    res = {"kind": kind, "rank": rank, "step_s": statistics.median(times[cfg["warmup"]:]),
           "peak_rss_mb": peak / 1024, "setup_rss_mb": setup_rss / 1024, "base_rss_mb": base_rss / 1024,
           "train_mb": (peak - base_rss) / 1024, "peak_reset": peak_reset}
    with open(os.path.join(out_dir, f"{kind}.{rank}.json"), "w") as f:
        json.dump(res, f)
    if kind.startswith("haiscale"):
        import hfreduce

        hfreduce.destroy()
    else:
        import torch.distributed as dist

        dist.destroy_process_group()


def run(kind: str, cfg: dict, out_dir: str) -> dict:
    """Run ``kind`` on 2 ranks; returns the rank-0 step time and the largest per-rank peak RSS."""
    haiscale.spawn(worker, args=(kind, cfg, out_dir), nprocs=WORLD, timeout=cfg.get("timeout", 600))
    ranks = [json.loads(Path(out_dir, f"{kind}.{r}.json").read_text()) for r in range(WORLD)]
    return {k: max(r[k] for r in ranks) for k in ("step_s", "peak_rss_mb", "base_rss_mb", "train_mb")}


def run_rounds(kinds: list[str], cfg: dict, out_dir: str) -> dict[str, dict]:
    """``cfg['rounds']`` rounds, the kinds alternating inside each (A B C A B C ...), so that load
    from other work on the machine hits every kind alike; each figure is the median over rounds."""
    seen: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(cfg["rounds"]):
        for kind in kinds:
            seen[kind].append(run(kind, cfg, out_dir))
    return {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in seen.items()}


def config(quick: bool, optim: str, rounds: int = 3) -> dict:
    if quick:  # about 12.6M parameters
        return {"d": 1024, "h": 3072, "blocks": 2, "batch": 8, "warmup": 1, "steps": 3, "rounds": 1, "optim": optim}
    # about 50.4M parameters
    return {"d": 2048, "h": 3072, "blocks": 4, "batch": 8, "warmup": 2, "steps": 6, "rounds": rounds, "optim": optim}


def numel(cfg: dict) -> int:
    return sum(p.numel() for p in make_model(cfg["d"], cfg["h"], cfg["blocks"]).parameters())
