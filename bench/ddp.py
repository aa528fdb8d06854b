"""haiscale DDP (hfreduce) vs torch DDP (gloo): same model (a ~50M-parameter wide residual MLP),
same data, 2 ranks on this machine, SGD with momentum (as the paper's VGG16 / ResNet runs: the step
is gradient communication plus little compute, which is what DDP changes); step time (median over steps, slowest rank) and peak RSS
per rank. Target: haiscale DDP step time <= 0.7x torch DDP's.

    python bench/ddp.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _haiscale_bench as hb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 12M-parameter model and 3 steps (< 60 s)")
    args = ap.parse_args()
    cfg = hb.config(args.quick, "sgd", rounds=5)  # a short step: more rounds against machine noise
    n = hb.numel(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as out:
        rows = hb.run_rounds(list(("haiscale_ddp", "torch_ddp")), cfg, out)
    print(f"model: {n / 1e6:.1f}M parameters, 2 ranks, batch {cfg['batch']} per rank, {cfg['optim']}, "
          f"{cfg['steps']} timed steps, median of {cfg['rounds']} alternating rounds")
    print(f"{'wrapper':<16}{'step s':>10}{'peak RSS MB':>14}{'base RSS MB':>14}{'train MB':>10}")
    for kind, r in rows.items():
        print(f"{kind:<16}{r['step_s']:>10.3f}{r['peak_rss_mb']:>14.0f}{r['base_rss_mb']:>14.0f}{r['train_mb']:>10.0f}")
    ratio = rows["haiscale_ddp"]["step_s"] / rows["torch_ddp"]["step_s"]
    print(f"haiscale DDP / torch DDP step time: {ratio:.2f}x (target <= 0.7x)")
    figures = {f"{k}_{m}": round(v, 4) for k, r in rows.items() for m, v in r.items()}
    figures["params_m"] = round(n / 1e6, 2)
    out = {"bench": "ddp", "figures": figures, "ratios": {"step_time_haiscale_over_torch": round(ratio, 3)},
           "targets": {"step_time_haiscale_over_torch": "<= 0.7"}, "ok": ratio <= 0.7}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
