"""`make demo`: the stack's showcase on one machine.

Brings up the local cluster (deploy/clusters/local.toml: 4 emulated nodes on 127.0.0.x, 2 zones),
then runs the end-to-end path that exists so far, step by step, and stops everything:

1. the cluster comes up: every service of the description, each node on its own address;
2. the link probe measures the bandwidth and latency matrix between the nodes;
3. everything stops, and nothing is left behind.

    python -m deploy.demo [--cluster FILE] [--keep-run-dir]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from deploy.local import LocalCluster, render_status
from network.probe import probe_matrix, render

ROOT = Path(__file__).resolve().parent.parent
con = Console()


def step(title: str) -> None:
    con.rule(f"[bold cyan]{title}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default=str(ROOT / "deploy" / "clusters" / "local.toml"))
    ap.add_argument("--keep-run-dir", action="store_true", help="keep logs and state after the demo")
    args = ap.parse_args(argv)

    run_dir = Path(tempfile.mkdtemp(prefix="fireflyer-demo-"))
    t_start = time.monotonic()
    lc = LocalCluster(args.cluster, run_dir, ports="auto")
    ok = False
    try:
        step("1. bring up the local cluster")
        lc.up()
        st = {"cluster": lc.cluster.name, "state": "up", "run_dir": str(run_dir),
              "services": [vars(i) for i in lc.status()]}
        render_status(st)

        step("2. link probe: bandwidth and latency between the nodes")
        names = lc.cluster.ordered()
        res = probe_matrix(lc.cluster, names, size=16 << 20, reps=3, pings=20, spawn="never")
        render(res, names, con)
        if any(r.error for r in res):
            raise RuntimeError("some links failed")
        ok = True
    except Exception as exc:  # noqa: BLE001 - the demo reports and exits non-zero
        con.print(f"[red]demo failed: {exc}[/]")
        con.print(f"logs: {run_dir / 'logs'}")
    finally:
        step("3. stop everything")
        lc.down()
        left = [i.key for i in lc.info.values() if i.state != "stopped"]
        con.print("all services stopped" if not left else f"[red]still running: {left}[/]")
        ok = ok and not left
        if args.keep_run_dir or not ok:
            con.print(f"run dir kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    con.print(f"[bold {'green' if ok else 'red'}]demo {'passed' if ok else 'FAILED'}[/] "
              f"in {time.monotonic() - t_start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
