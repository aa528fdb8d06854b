"""Mixture-of-experts communication and balancing, same-run ratios against the peers (issue 17):

  (a) hfreduce all_to_all vs torch.distributed all_to_all_single on gloo, 2 ranks, 16-64 MiB
      (target >= 2x);
  (b) a haiscale.moe DeepSeekMoE layer, forward + backward with expert parallelism on 2 ranks,
      hfreduce vs the same layer on gloo (target >= 1.5x);
  (c) Loss-Free Balancing vs the auxiliary loss, same small MoE language model, data and steps
      (MaxVio over the run <= 0.5x, validation loss no worse).

    python bench/moe.py [--quick] [--only a,b,c]

Parts (b) and (c) are in bench/_moe_bench.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _moe_bench as mb  # noqa: E402

# -- (a) all_to_all vs gloo -------------------------------------------------------------------------
A_SIZES, A_QUICK_SIZES = [16, 64], [16]  # MiB of each rank's in_buf (float32, equal splits)
A_REPS, A_WARMUP, A_ROUNDS = 8, 3, 3


def _a_fill(a, rank: int) -> None:
    import numpy as np

    a[...] = (np.arange(a.size) % 251 + 1000 * rank).astype(a.dtype)


def _a_check(out, world: int, rank: int) -> bool:
    """Chunk s of out is chunk ``rank`` of rank s's input."""
    import numpy as np

    k = out.size // world
    idx = np.arange(rank * k, (rank + 1) * k)
    return all(bool((out[s * k:(s + 1) * k] == ((idx % 251) + 1000 * s).astype(out.dtype)).all())
               for s in range(world))


def _a_hf_worker(pg, sizes, reps):
    import time

    import numpy as np

    import hfreduce

    a2a = hfreduce.all_to_all
    out = {}
    for mib in sizes:
        inp = np.empty(mib * (1 << 20) // 4, np.float32)
        res = np.empty_like(inp)
        _a_fill(inp, pg.rank)
        times = []
        for _ in range(reps + A_WARMUP):
            pg.barrier()
            t = time.perf_counter()
            a2a(res, inp)
            times.append(time.perf_counter() - t)
        out[mib] = (times[A_WARMUP:], _a_check(res, pg.world_size, pg.rank))
    return out


def _a_gloo_worker(rank, world, port, sizes, reps, q):
    import os
    import time

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    for mib in sizes:
        inp = np.empty(mib * (1 << 20) // 4, np.float32)
        res = np.empty_like(inp)
        _a_fill(inp, rank)
        ti, to = torch.from_numpy(inp), torch.from_numpy(res)
        times = []
        for _ in range(reps + A_WARMUP):
            dist.barrier()
            t = time.perf_counter()
            dist.all_to_all_single(to, ti)
            times.append(time.perf_counter() - t)
        out[mib] = (times[A_WARMUP:], _a_check(res, world, rank))
    dist.destroy_process_group()
    q.put((rank, out))


def _a_run_gloo(sizes, reps):
    import multiprocessing as mp

    from hfreduce.testing import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_a_gloo_worker, args=(r, 2, port, sizes, reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(q.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return got


def section_a(args) -> dict:  # noqa: ANN001
    """(a) 2 ranks on one node, equal splits, float32: hfreduce all_to_all against gloo's
    all_to_all_single, rounds alternating, the median of every timed call of each side."""
    import statistics

    from hfreduce.testing import run_group

    try:
        import torch  # noqa: F401
    except ImportError:
        print("(a) all_to_all vs gloo: skipped (torch is not installed)")
        return {"figures": {}, "ratios": {}, "targets": {}, "ok": False}
    sizes = A_QUICK_SIZES if args.quick else A_SIZES
    rounds, reps = (1, 4) if args.quick else (A_ROUNDS, A_REPS)
    samples: dict[tuple[str, int], list[float]] = {}
    correct = True
    for _ in range(rounds):
        hf = run_group(_a_hf_worker, sizes, reps, nodes=1, per_node=2, timeout=600, group_timeout=60).values()
        gl = _a_run_gloo(sizes, reps)
        for side, per_rank in (("hfreduce", hf), ("gloo", [gl[0], gl[1]])):
            for mib in sizes:
                for r in per_rank:  # a call takes as long as its slower rank: every rank's times count
                    times, ok = r[mib]
                    samples.setdefault((side, mib), []).extend(times)
                    correct = correct and ok
    figures, ratios, targets, ok = {}, {}, {}, correct
    for mib in sizes:
        med = {side: statistics.median(samples[(side, mib)]) for side in ("hfreduce", "gloo")}
        ratio = med["gloo"] / med["hfreduce"]
        figures[f"a_all_to_all_{mib}MiB"] = {side: {"median_ms": round(m * 1e3, 3),
                                                    "algbw_GBps": round((mib << 20) / m / 1e9, 3)}
                                             for side, m in med.items()}
        ratios[f"a_speedup_over_gloo@{mib}MiB"] = round(ratio, 3)
        met = ratio >= 2.0
        targets[f"a_speedup_over_gloo@{mib}MiB"] = {"target": 2.0, "met": met}
        ok = ok and met
        print(f"(a) all_to_all 2 ranks {mib:>3} MiB: hfreduce {med['hfreduce'] * 1e3:8.2f} ms, gloo "
              f"{med['gloo'] * 1e3:8.2f} ms: {ratio:.2f}x (target >= 2x: {'met' if met else 'MISSED'})"
              + ("" if correct else "  WRONG RESULT"))
    return {"figures": figures, "ratios": ratios, "targets": targets, "ok": ok}


SECTIONS = {"a": section_a, "b": mb.section_b, "c": mb.section_c}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one round (about a minute)")
    ap.add_argument("--only", default="a,b,c", help="comma-separated sections to run")
    args = ap.parse_args()
    out = {"bench": "moe", "figures": {}, "ratios": {}, "targets": {}, "ok": True}
    for name in args.only.split(","):
        res = SECTIONS[name.strip()](args)
        for key in ("figures", "ratios", "targets"):
            out[key].update(res[key])
        out["ok"] = out["ok"] and res["ok"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
