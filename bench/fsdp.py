"""haiscale FSDP (hfreduce, ZeRO-3, optimizer step in backward) vs torch FSDP (gloo), and haiscale
DDP for the memory yardstick: same model (a ~50M-parameter wide residual MLP, one unit per block),
same data, 2 ranks, Adam; step time (median, slowest rank) and peak RSS per rank.
Targets: haiscale FSDP peak RSS per rank <= 0.6x haiscale DDP's; step time <= torch FSDP's.

    python bench/fsdp.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _haiscale_bench as hb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 12M-parameter model and 3 steps (< 60 s)")
    args = ap.parse_args()
    cfg = hb.config(args.quick, "adam")
    n = hb.numel(cfg)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # see _haiscale_bench: same for all
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as out:
        rows = hb.run_rounds(list(("haiscale_fsdp", "torch_fsdp", "haiscale_ddp")), cfg, out)
    print(f"model: {n / 1e6:.1f}M parameters, 2 ranks, batch {cfg['batch']} per rank, {cfg['optim']}, "
          f"{cfg['steps']} timed steps, median of {cfg['rounds']} alternating rounds")
    print(f"{'wrapper':<16}{'step s':>10}{'peak RSS MB':>14}{'base RSS MB':>14}{'train MB':>10}")
    for kind, r in rows.items():
        print(f"{kind:<16}{r['step_s']:>10.3f}{r['peak_rss_mb']:>14.0f}{r['base_rss_mb']:>14.0f}{r['train_mb']:>10.0f}")
    mem = rows["haiscale_fsdp"]["train_mb"] / rows["haiscale_ddp"]["train_mb"]
    raw = rows["haiscale_fsdp"]["peak_rss_mb"] / rows["haiscale_ddp"]["peak_rss_mb"]
    speed = rows["haiscale_fsdp"]["step_s"] / rows["torch_fsdp"]["step_s"]
    print(f"haiscale FSDP / haiscale DDP training memory (peak RSS - base RSS): {mem:.2f}x (target <= 0.6x)")
    print(f"haiscale FSDP / haiscale DDP whole-process peak RSS: {raw:.2f}x (includes the same ~{rows['haiscale_ddp']['base_rss_mb']:.0f} MB of interpreter and libraries in both)")
    print(f"haiscale FSDP / torch FSDP step time: {speed:.2f}x (target <= 1.0x)")
    figures = {f"{k}_{m}": round(v, 4) for k, r in rows.items() for m, v in r.items()}
    figures["params_m"] = round(n / 1e6, 2)
    out = {"bench": "fsdp", "figures": figures,
           "ratios": {"train_mem_fsdp_over_ddp": round(mem, 3), "peak_rss_fsdp_over_ddp": round(raw, 3), "step_time_haiscale_over_torch_fsdp": round(speed, 3)},
           "targets": {"train_mem_fsdp_over_ddp": "<= 0.6", "step_time_haiscale_over_torch_fsdp": "<= 1.0"},
           "ok": mem <= 0.6 and speed <= 1.0}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
