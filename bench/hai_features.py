"""The researcher's day (#19): a job array against separate submissions, and the history's speed.

(a) On the 4-node local cluster (API + scheduler + 4 agents, SQLite), N one-second tasks (100; 20
    with --quick) as ONE job array (``--array 0-99``) against N jobs submitted one by one, each
    ``sleep 1`` on one node; the time from the first submission until every job has ended, both in
    the same run. Target: the array finishes no later than the separate jobs (ratio <= 1.0; a 5 %
    allowance for the noise of a shared machine is NOT taken).
(b) 10,000 ended chains (2,000 with --quick) inserted straight into the cluster's database, then
    ``GET /v1/history?limit=10000`` (the API call) and ``hai history --limit 10000 --json`` (the
    CLI end to end: a new process, connection, request, output) timed; medians of 5. Target: the
    CLI <= 0.5 s.

Usage: python bench/hai_features.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _platform import platform_cluster  # noqa: E402


def _wait_empty(c, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while c.queue():
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs still unfinished after {timeout:g} s")
        time.sleep(0.05)


def _ended_chains(n: int, now: float) -> list[dict]:
    rows = []
    for i in range(n):
        t0 = now - 86400 + i
        rows.append({"chain_id": 0, "first_id": 0, "restart_count": i % 3, "name": f"hist{i % 50}",
                     "user": "admin", "group": None, "shared_in_group": False, "command": ["true"], "env": {},
                     "workdir": "", "nodes": 1 + i % 4, "procs_per_node": 1, "priority": 10,
                     "status": ("succeeded", "failed", "stopped", "canceled")[i % 4], "reason": "",
                     "stop_code": 0, "stop_requested": 0, "assigned_nodes": ["n0"], "master_port": 0,
                     "whole_life_state": 0, "exit_code": i % 2, "created_at": t0, "scheduled_at": t0 + 1,
                     "started_at": t0 + 1, "finished_at": t0 + 30, "submitted_priority": 10, "submitted_at": t0,
                     "time_limit": 0.0, "grace": 0.0, "watchdog": 0.0, "chain_run_s": 20.0, "last_output": 0.0,
                     "last_checkpoint": 0.0, "array_throttle": 0, "after": [], "after_ok": [], "held": False})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 tasks and 2,000 history rows (within 60 s)")
    args = ap.parse_args()
    n_tasks = 20 if args.quick else 100
    n_hist = 2000 if args.quick else 10000

    from sqlalchemy import insert, update

    from haiplatform.client import HaiClient
    from haiplatform.db import Database, Job

    with tempfile.TemporaryDirectory(prefix="hai-features-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # jobs run as the user's account: they must reach the run dir
        with platform_cluster(work) as (lc, url, tok):
            with HaiClient(url, tok, timeout=30) as c:
                spec = {"name": "task", "command": ["sleep", "1"], "nodes": 1, "procs_per_node": 1}
                for i in range(4):  # warm-up: steady state, not cold start
                    c.wait(c.submit({**spec, "name": f"warm{i}"})["id"], timeout=60)
                # (a) the array, then the same tasks one by one
                t0 = time.perf_counter()
                arr = c.submit({**spec, "name": "arr", "array": f"0-{n_tasks - 1}"})
                _wait_empty(c)
                t_array = time.perf_counter() - t0
                t0 = time.perf_counter()
                for i in range(n_tasks):
                    c.submit({**spec, "name": f"sep{i}"})
                _wait_empty(c)
                t_sep = time.perf_counter() - t0
                failed = [j for j in c.history(name="arr", limit=n_tasks)["jobs"] if j["status"] != "succeeded"]
                if failed or len(arr["array_tasks"]) != n_tasks:
                    raise RuntimeError(f"array tasks did not all succeed: {failed[:3]}")
                # (b) the history of n_hist ended chains
                db = Database(f"sqlite:///{lc.run_dir / 'hai' / 'hai.db'}")
                try:
                    with db.engine.begin() as s:
                        s.execute(insert(Job), _ended_chains(n_hist, time.time()))
                        s.execute(update(Job).where(Job.chain_id == 0).values(chain_id=Job.id, first_id=Job.id))
                finally:
                    db.dispose()
                api_t, cli_t = [], []
                for _ in range(5):
                    t0 = time.perf_counter()
                    rows = c.history(limit=10000)["jobs"]
                    api_t.append(time.perf_counter() - t0)
                assert len(rows) == min(10000, n_hist + 2 * n_tasks + 4), len(rows)
                env = {**os.environ, "HAI_URL": url, "HAI_TOKEN": tok}
                env.pop("HAI_CLUSTER", None)
                for _ in range(5):
                    t0 = time.perf_counter()
                    out = subprocess.run([sys.executable, "-m", "haiplatform.cli", "history", "--limit", "10000",
                                          "--json"], env=env, capture_output=True, timeout=60)
                    cli_t.append(time.perf_counter() - t0)
                    if out.returncode != 0:
                        raise RuntimeError(f"hai history failed: {out.stderr.decode()[-500:]}")

    ratio = t_array / t_sep
    api_s, cli_s = statistics.median(api_t), statistics.median(cli_t)
    print(f"{'what':<44} {'value':>10}")
    print(f"{f'array of {n_tasks} one-second tasks (s)':<44} {t_array:>10.2f}")
    print(f"{f'{n_tasks} separate one-second jobs (s)':<44} {t_sep:>10.2f}")
    print(f"{'array / separate':<44} {ratio:>10.2f}")
    print(f"{f'GET /v1/history, {min(10000, n_hist)}+ rows (median s)':<44} {api_s:>10.3f}")
    print(f"{'hai history --limit 10000 --json (median s)':<44} {cli_s:>10.3f}")
    targets = {"array_over_separate": 1.0, "history_cli_s": 0.5}
    ok = ratio <= 1.0 and cli_s <= 0.5
    print(json.dumps({"bench": "hai_features", "figures": {"array_s": round(t_array, 3), "separate_s": round(t_sep, 3),
                                                           "history_api_s": round(api_s, 4),
                                                           "history_cli_s": round(cli_s, 4),
                                                           "tasks": n_tasks, "history_rows": n_hist},
                      "ratios": {"array_over_separate": round(ratio, 3)}, "targets": targets, "ok": ok}))
    return 0  # a missed target is a figure ("ok": false), as in the other benches: `make bench` goes on


if __name__ == "__main__":
    sys.exit(main())
