"""Preemption latency on the local cluster: the scheduler's decision to the victim stopped, and the
freed nodes to the next job running.

Each round: alice's job (2 nodes of one zone, one rank each, written with :mod:`haiplatform.job`: it polls
``receive_suspend_command()`` every 20 ms, "saves" for ``SAVE_S`` seconds, then ``go_suspend()``)
runs past the cluster's ``min_run_time`` (2 s on the local cluster); then bob submits a
higher-priority job for all 4 nodes, which can only start by preempting it. From the scheduler's database:

- stop: from the decision (the victim's ``suspend_sent_at``, written in the scheduler's
  transaction that sets the ranks' desired state) to every rank of the victim reported stopped
  (the latest ``ranks.finished_at``, when the API received the agent's report). Target: <= the
  victim's grace (the time the platform grants after the acknowledgement; 5 s by default);
- start: from the nodes freeing (that same last rank stopped) to every rank of bob's job running
  (the latest ``ranks.started_at``). Target: <= 2 s;
- ack: from the decision to the job's acknowledgement (``suspend_acked_at``), for information.

Medians of ``--rounds`` rounds (5; 3 with --quick). Usage: python bench/preempt.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAVE_S = 0.3  # the victim's pretend checkpoint
VICTIM = f"""
import os, sys, time
from haiplatform import job
if os.environ["HAI_RESTART_COUNT"] != "0":
    sys.exit(0)  # the resumed attempt: nothing left to do
print("running", flush=True)
while not job.receive_suspend_command():
    time.sleep(0.02)
time.sleep({SAVE_S})
job.report_checkpoint()
job.go_suspend()
"""


def _rows(db: Path, sql: str, *args) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        con.row_factory = sqlite3.Row
        return list(con.execute(sql, args))
    finally:
        con.close()


def _wait(pred, timeout: float, what: str):
    from deploy.local import wait_until

    return wait_until(pred, timeout, what, 0.02)


def run(rounds: int, work: Path) -> dict:
    from deploy.local import LocalCluster, derived_cluster
    from haiplatform.client import HaiClient

    cfile = derived_cluster(work / "cluster.toml", ["haiplatform.api", "haiplatform.scheduler", "haiplatform.agent"])
    script = work / "victim.py"
    script.write_text(VICTIM)
    script.chmod(0o644)
    lc = LocalCluster(cfile, work / "run", ports="auto")
    lc.up()
    db = lc.run_dir / "hai" / "hai.db"
    out: dict[str, list[float]] = {"stop_s": [], "start_s": [], "ack_s": [], "grace_s": []}
    try:
        addr, port = lc.cluster.endpoint("haiplatform.api")
        admin = HaiClient(f"http://{addr}:{port}", (lc.run_dir / "hai" / "admin.token").read_text().strip())
        _wait(lambda: len([n for n in admin.nodes() if n["state"] == "up"]) == 4, 60, "4 agents")
        alice = HaiClient(admin.url, admin.add_user("alice")["token"])
        bob = HaiClient(admin.url, admin.add_user("bob")["token"])
        min_run = float(lc.cluster.section("haiplatform").get("min_run_time", 300.0))
        for _ in range(rounds):
            v = alice.submit({"name": "victim", "command": [sys.executable, str(script)], "nodes": 2})
            started = _wait(lambda v=v: (j := alice.job(v["id"]))["status"] == "running" and j["started_at"], 60,
                            "the victim to run")
            time.sleep(max(0.0, started + min_run + 0.2 - time.time()))  # preemptible from now on
            p = bob.submit({"name": "urgent", "command": ["sleep", "0.5"], "nodes": 4, "priority": "high"})
            done = bob.wait(p["id"], timeout=60)
            assert done["status"] == "succeeded", done
            alice.wait(v["id"], timeout=60)
            (att,) = _rows(db, "SELECT * FROM jobs WHERE id = ?", v["id"])
            assert att["status"] == "suspended", dict(att)
            stopped = max(r["finished_at"] for r in _rows(db, "SELECT finished_at FROM ranks WHERE job_id = ?", v["id"]))
            running = max(r["started_at"] for r in _rows(db, "SELECT started_at FROM ranks WHERE job_id = ?", p["id"]))
            out["stop_s"].append(stopped - att["suspend_sent_at"])
            out["start_s"].append(running - stopped)
            out["ack_s"].append((att["suspend_acked_at"] or float("nan")) - att["suspend_sent_at"])
            grace = att["grace"] or float(lc.cluster.section("haiplatform").get("suspend_grace", 5.0))
            out["grace_s"].append(grace)
        for c in (alice, bob, admin):
            c.close()
    finally:
        lc.down()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 5")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    work = Path(tempfile.mkdtemp(prefix="hai-bench-preempt-"))
    work.chmod(0o711)  # jobs run as their users' accounts: they pass through to the script
    from deploy.local import pass_for_jobs

    pass_for_jobs(sys.executable, ROOT / "pyproject.toml")
    try:
        res = run(rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: round(statistics.median(v), 3) for k, v in res.items()}
    grace = med["grace_s"]
    targets = {"stop_s": f"<= grace ({grace:g} s)", "start_s": "<= 2"}
    met = {"stop_s": med["stop_s"] <= grace, "start_s": med["start_s"] <= 2.0}
    print(f"preemption bench: {rounds} rounds, a 2-node job preempted by a higher-priority 4-node job "
          f"(the victim saves for {SAVE_S} s)")
    print(f"decision -> every victim rank stopped: median {med['stop_s']:.3f} s "
          f"(all: {', '.join(f'{x:.2f}' for x in res['stop_s'])}); target <= its grace {grace:g} s: "
          f"{'met' if met['stop_s'] else 'MISSED'}")
    print(f"nodes free -> next job's ranks running: median {med['start_s']:.3f} s "
          f"(all: {', '.join(f'{x:.2f}' for x in res['start_s'])}); target <= 2 s: "
          f"{'met' if met['start_s'] else 'MISSED'}")
    print(f"decision -> the job's acknowledgement: median {med['ack_s']:.3f} s")
    figures = {"rounds": rounds, "save_s": SAVE_S, **{f"median_{k}": v for k, v in med.items()},
               **{f"all_{k}": [round(x, 3) for x in v] for k, v in res.items() if k != "grace_s"}}
    print(json.dumps({"bench": "preempt", "figures": figures, "targets": targets, "met": met,
                      "ok": all(met.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
