"""bench/pipeline.py: 1F1B against GPipe, 2 stages, 8 micro-batches: peak held activations and step time.

Activations held: each stage counts the bytes of the tensors autograd saved for backward and has
not yet freed (``haiscale.pipeline.ActivationMeter``, on ``torch.autograd.graph.saved_tensors_hooks``;
parameters excluded), and reports the peak over the step; the figure is the larger of the two
stages' peaks. GPipe holds all 8 micro-batches' saved tensors before the first backward; 1F1B
holds at most 2 on stage 0 and 1 on stage 1. Step time: the same model, data and schedule work,
rounds alternating GPipe and 1F1B, median per schedule. With hfreduce point-to-point available the
two stages run on 2 ranks (``haiscale.spawn``); otherwise both stages run in one process, which
interleaves them as the ranks would (``run_local``) and the step time then compares compute only.
Targets (issue 17): activations 1F1B/GPipe <= 0.6, step time 1F1B/GPipe <= 1.05 (no worse, within
noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402
from haiscale.pipeline import ActivationMeter, GPipe, PipeDream, make_subgroups, partition, run_local, split  # noqa: E402

CHUNKS = 8


def make_model(d: int, blocks: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.LayerNorm(d)]
    return nn.Sequential(*layers, nn.Linear(d, 16))


def batch(cfg: dict):
    g = torch.Generator().manual_seed(1)
    return torch.randn(cfg["batch"], cfg["d"], generator=g), torch.randn(cfg["batch"], 16, generator=g)


def mse(out, y):
    return ((out - y) ** 2).mean()


def local_rounds(cfg: dict) -> dict:
    x, y = batch(cfg)
    res: dict = {"gpipe": {"t": [], "peak": 0}, "1f1b": {"t": [], "peak": 0}}
    stages = split(make_model(cfg["d"], cfg["blocks"]), 2)
    for _ in range(cfg["rounds"]):
        for sched in ("gpipe", "1f1b"):
            for s in stages:
                s.zero_grad(set_to_none=True)
            meters = [ActivationMeter(list(s.parameters())) for s in stages]
            t0 = time.perf_counter()
            run_local(stages, sched, CHUNKS, x, mse, labels=(y,), meters=meters)
            res[sched]["t"].append(time.perf_counter() - t0)
            res[sched]["peak"] = max(res[sched]["peak"], *(m.peak for m in meters))
    return res


def rank_worker(local_rank: int, cfg: dict, out_dir: str) -> None:
    import hfreduce

    torch.set_num_threads(1)
    hfreduce.init(timeout=60)
    _, pp = make_subgroups(2)
    stage = pp.rank()
    module = partition(make_model(cfg["d"], cfg["blocks"]), stage, 2)
    x, y = batch(cfg)
    models = {"gpipe": GPipe(module, CHUNKS, pp, measure_activations=True),
              "1f1b": PipeDream(module, CHUNKS, pp, measure_activations=True)}
    res: dict = {k: {"t": [], "peak": 0} for k in models}
    for _ in range(cfg["rounds"]):
        for sched, model in models.items():
            module.zero_grad(set_to_none=True)
            hfreduce.barrier()
            t0 = time.perf_counter()
            model.forward_backward(x if stage == 0 else None, criterion=mse, labels=(y,))
            hfreduce.barrier()
            res[sched]["t"].append(time.perf_counter() - t0)
            res[sched]["peak"] = max(res[sched]["peak"], model.meter.peak)
    torch.save(res, os.path.join(out_dir, f"rank{stage}.pt"))
    hfreduce.destroy()


def rank_rounds(cfg: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as out:
        haiscale.spawn(rank_worker, args=(cfg, out), nprocs=2, timeout=600)
        per = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    return {k: {"t": [max(a, b) for a, b in zip(per[0][k]["t"], per[1][k]["t"], strict=True)],
                "peak": max(p[k]["peak"] for p in per)} for k in ("gpipe", "1f1b")}


def has_p2p() -> bool:
    import hfreduce

    return hasattr(hfreduce.ProcessGroup, "send")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer rounds (< 60 s)")
    ap.add_argument("--local", action="store_true", help="both stages in one process even if hfreduce has send/recv")
    args = ap.parse_args()
    cfg = {"d": 256, "blocks": 4, "batch": 256, "rounds": 7} if args.quick else \
          {"d": 512, "blocks": 6, "batch": 512, "rounds": 9}
    mode = "2 ranks" if has_p2p() and not args.local else "one process"
    res = rank_rounds(cfg) if mode == "2 ranks" else local_rounds(cfg)
    med = {k: statistics.median(v["t"][1:] or v["t"]) for k, v in res.items()}  # the first round warms up
    act = res["1f1b"]["peak"] / res["gpipe"]["peak"]
    step = med["1f1b"] / med["gpipe"]
    print(f"2 stages, {CHUNKS} micro-batches, batch {cfg['batch']}, width {cfg['d']}, {cfg['blocks']} blocks; "
          f"{mode}; median of {cfg['rounds'] - 1} rounds after one warm-up, schedules alternating")
    print(f"{'schedule':<10}{'step s':>10}{'peak held activations MB':>28}")
    for k in ("gpipe", "1f1b"):
        print(f"{k:<10}{med[k]:>10.4f}{res[k]['peak'] / 2**20:>28.2f}")
    ok_act, ok_step = act <= 0.6, step <= 1.05
    print(f"activations 1F1B/GPipe: {act:.3f} (target <= 0.6: {'met' if ok_act else 'missed'})")
    print(f"step time 1F1B/GPipe:   {step:.3f} (target <= 1.05, no worse: {'met' if ok_step else 'missed'})")
    out = {"bench": "pipeline",
           "figures": {"mode": mode, "gpipe_step_s": round(med["gpipe"], 5), "1f1b_step_s": round(med["1f1b"], 5),
                       "gpipe_peak_act_mb": round(res["gpipe"]["peak"] / 2**20, 3),
                       "1f1b_peak_act_mb": round(res["1f1b"]["peak"] / 2**20, 3)},
           "ratios": {"act_1f1b_over_gpipe": round(act, 3), "step_1f1b_over_gpipe": round(step, 3)},
           "targets": {"act_1f1b_over_gpipe": "<= 0.6", "step_1f1b_over_gpipe": "<= 1.05"},
           "ok": ok_act and ok_step}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
