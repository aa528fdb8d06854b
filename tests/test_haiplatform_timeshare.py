"""Time-sharing end to end on the local cluster (API, scheduler, 4 agents; min_run_time 2 s):
preemption of a real training job that resumes bit-identical, forced stops after the suspend's
deadlines, a lost node's job resuming elsewhere, and the wall-clock limit and the watchdog."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest
from _hai import cluster_file_factory
from _waits import wait_until
from test_haiplatform_e2e import db_rows, hai_client

from haiplatform.client import HaiClient

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "examples" / "timeshare_train.py")


@pytest.fixture
def tmp_path(job_tmp_path):
    """Jobs run as their users' Unix accounts: their files live where those accounts reach."""
    return job_tmp_path


@pytest.fixture
def cluster_file(tmp_path):
    """Factory: local.toml with [haiplatform] keys overridden, the platform's services only."""
    return cluster_file_factory(tmp_path)


def user_client(admin: HaiClient, name: str) -> HaiClient:
    return HaiClient(admin.url, admin.add_user(name)["token"], timeout=30)


def shared_dir(path: Path) -> str:
    """A directory every job account may write (the jobs of several users run as several accounts)."""
    path.mkdir(mode=0o777)
    path.chmod(0o777)
    return str(path)


def exit_codes(lc, attempt_id: int) -> list[int | None]:
    return [r["exit_code"] for r in db_rows(lc, "SELECT exit_code FROM ranks WHERE job_id = ? ORDER BY rank",
                                            attempt_id)]


def why_stopped(admin: HaiClient, attempt_id: int) -> str:
    """The scheduler's reason for stopping an attempt (its ``stopping`` event)."""
    evs = admin.request("GET", "/v1/events", params={"job_id": attempt_id})
    return " | ".join(e["message"] for e in evs if e["kind"] == "stopping")


def logs_of(c: HaiClient, attempt_id: int, ranks: int = 1) -> str:
    return "".join(c.logs(attempt_id, rank=r, attempt=attempt_id) for r in range(ranks))


def test_preempted_training_job_checkpoints_resumes_and_ends_bit_identical(launch_cluster, cluster_file, tmp_path):
    """alice's 2-rank DDP job is preempted by carol's higher-priority job that needs its node: it
    saves at the step its ranks agree on, leaves by itself (exit code 0, no signal), is re-queued on
    its chain and resumes; its final parameters equal those of bob's identical job, never preempted
    (bob's is above carol's priority: it may not be chosen)."""
    lc = launch_cluster(cluster_file())
    admin = hai_client(lc)
    alice, bob, carol = (user_client(admin, u) for u in ("alice", "bob", "carol"))
    train = ["--steps", "80", "--every", "10", "--step-sleep", "0.05"]
    spec = {"command": [sys.executable, TRAIN, *train], "nodes": 1, "procs_per_node": 2}
    ref = bob.submit({**spec, "name": "reference", "priority": "high",
                      "command": [*spec["command"], "--ckpt", shared_dir(tmp_path / "ref")]})
    vic = alice.submit({**spec, "name": "victim", "priority": "normal",
                        "command": [*spec["command"], "--ckpt", shared_dir(tmp_path / "vic")]})
    wait_until(lambda: "starting at step 0" in alice.logs(vic["id"]), timeout=60, what="the victim to train")
    big = carol.submit({"name": "big", "command": ["sleep", "1"], "nodes": 3, "priority": "above_normal"})
    done = alice.wait(vic["id"], timeout=90)
    assert done["status"] == "succeeded" and done["restart_count"] >= 1, done
    first = done["attempts"][0]
    assert first["status"] == "suspended" and "interrupt" in first["stop"]
    assert f"preempted by job {big['id']}" in why_stopped(admin, first["id"])
    # it left by itself: exit code 0, or the SIGTERM its own suspend_done asks for (to the node's
    # other rank, still shutting down); never the SIGKILL of a missed deadline
    assert set(exit_codes(lc, first["id"])) <= {0, -signal.SIGTERM}
    first_log = logs_of(alice, first["id"])
    m = re.search(r"step (\d+): suspend requested, checkpointed, exiting", first_log)
    assert m, first_log
    final_log = alice.logs(vic["id"])
    assert f"resumed from the checkpoint at step {m.group(1)}" in final_log
    assert carol.wait(big["id"], timeout=30)["status"] == "succeeded"
    r = bob.wait(ref["id"], timeout=60)
    assert r["status"] == "succeeded" and r["restart_count"] == 0  # never preempted
    digest = re.compile(r"params sha256 ([0-9a-f]{16})")
    assert digest.search(final_log).group(1) == digest.search(bob.logs(ref["id"])).group(1)
    assert done["last_checkpoint"] > 0 and first["run_s"] > 2.0  # reported; ran its minimum first
    for c in (alice, bob, carol):
        c.close()


IGNORES = """
import json, os, pathlib, signal, sys, time
if os.environ["HAI_RESTART_COUNT"] != "0":
    sys.exit(0)
ctl = pathlib.Path(os.environ["HAI_CONTROL"])
def on_term(*_):  # never acknowledges; ignores SIGTERM too: only the SIGKILL ends it
    t = json.loads((ctl / "suspend").read_text())["t"]
    print(f"SIGTERM {time.time() - t:.3f} s after the suspend", flush=True)
signal.signal(signal.SIGTERM, on_term)
print("started", flush=True)
while True:
    time.sleep(0.05)
"""

NEVER_DONE = """
import os, signal, sys, time
from haiplatform import job
if os.environ["HAI_RESTART_COUNT"] != "0":
    sys.exit(0)
signal.signal(signal.SIGTERM, lambda *_: print(f"SIGTERM {time.time() - acked:.3f} s after the ack", flush=True))
print("started", flush=True)
while not job.receive_suspend_command():
    time.sleep(0.02)
acked = time.time()
print("acked", flush=True)
while True:  # acknowledged, never finishes
    time.sleep(0.05)
"""


def test_a_suspend_ignored_or_never_finished_is_forced_after_its_deadlines(launch_cluster, cluster_file, tmp_path):
    """No signal at the suspend: a job that never acknowledges gets SIGTERM at ack_timeout and SIGKILL
    1 s later; one that acknowledges but never finishes gets them at ack + grace (+1 s)."""
    ack_timeout, grace = 1.0, 1.5
    lc = launch_cluster(cluster_file(suspend_ack_timeout=ack_timeout))
    admin = hai_client(lc)
    alice, bob = user_client(admin, "alice"), user_client(admin, "bob")
    (tmp_path / "ignores.py").write_text(IGNORES)
    (tmp_path / "never_done.py").write_text(NEVER_DONE)
    ign = alice.submit({"name": "ignores", "command": [sys.executable, str(tmp_path / "ignores.py")], "nodes": 2})
    slow = alice.submit({"name": "never-done", "command": [sys.executable, str(tmp_path / "never_done.py")],
                         "nodes": 2, "grace": grace})
    for j in (ign, slow):
        wait_until(lambda j=j: "started" in alice.logs(j["id"]), timeout=30, what=f"job {j['id']} to start")
    big = bob.submit({"name": "big", "command": ["true"], "nodes": 4, "priority": "high"})
    assert bob.wait(big["id"], timeout=60)["status"] == "succeeded"
    for j, bound, what in ((ign, ack_timeout, "suspend"), (slow, grace, "ack")):
        done = alice.wait(j["id"], timeout=30)
        (first,) = db_rows(lc, "SELECT * FROM jobs WHERE id = ?", done["attempts"][0]["id"])
        assert first["status"] == "suspended" and f"preempted by job {big['id']}" in why_stopped(admin, first["id"])
        assert exit_codes(lc, first["id"]) == [-signal.SIGKILL] * 2  # SIGTERM ignored: killed
        taken = first["finished_at"] - first["suspend_sent_at"]
        assert bound <= taken <= bound + 1.0 + 2.0, (j["name"], taken)  # + the SIGKILL's 1 s, + reporting
        delays = [float(x) for x in re.findall(rf"SIGTERM (\S+) s after the {what}", logs_of(alice, first["id"], 2))]
        assert len(delays) == 2 and all(bound - 0.15 <= d <= bound + 0.6 for d in delays), (j["name"], delays)
    assert "acked" in logs_of(alice, alice.job(slow["id"])["attempts"][0]["id"])
    alice.close()
    bob.close()


RESUMABLE = """
import os, sys, time
from haiplatform import job
ck = job.Checkpointer(sys.argv[1], every_steps=5)
state = ck.resume() or {"step": 0}
rank = int(os.environ["RANK"])
print(f"attempt {os.environ['HAI_RESTART_COUNT']} on {os.environ['HAI_NODE_NAME']} from step {state['step']}",
      flush=True)
for step in range(state["step"], 150):
    if ck.maybe_save(step, lambda: {"step": step}) and rank == 0:
        print(f"saved step {step}", flush=True)
    time.sleep(0.02)
print("done", flush=True)
"""


def test_a_lost_nodes_job_resumes_elsewhere_from_its_checkpoint_and_the_node_is_drained(
        launch_cluster, cluster_file, tmp_path):
    lc = launch_cluster(cluster_file(heartbeat_timeout=2.0))
    admin = hai_client(lc)
    (tmp_path / "resumable.py").write_text(RESUMABLE)
    j = admin.submit({"name": "resumable", "nodes": 2,
                      "command": [sys.executable, str(tmp_path / "resumable.py"), shared_dir(tmp_path / "ck")]})
    wait_until(lambda: "saved step 10" in admin.logs(j["id"]), timeout=60, what="two checkpoints")
    lost = admin.job(j["id"])["assigned_nodes"][1]
    lc.kill("haiplatform.agent", lost, signal.SIGKILL)
    done = admin.wait(j["id"], timeout=60)
    assert done["status"] == "succeeded" and done["restart_count"] == 1, done
    first = done["attempts"][0]
    assert first["status"] == "suspended" and "node_lost" in first["stop"] and "interrupt" in first["stop"]
    assert lost in first["reason"] and lost not in done["assigned_nodes"]
    m = re.search(r"attempt 1 on \S+ from step (\d+)", admin.logs(done["id"]))
    assert m and int(m.group(1)) >= 10, admin.logs(done["id"])
    node = {n["name"]: n for n in admin.nodes()}[lost]
    assert node["state"] == "lost" and node["drained"] and node["drain_reason"]


HUNG = """
import time
print("one line, then silence", flush=True)
time.sleep(300)
"""


def test_time_limit_and_watchdog_stop_jobs(launch_cluster, cluster_file, tmp_path):
    lc = launch_cluster(cluster_file())
    admin = hai_client(lc)
    (tmp_path / "hung.py").write_text(HUNG)
    t = admin.submit({"name": "limited", "command": ["sleep", "300"], "nodes": 1, "time_limit": 2})
    w = admin.submit({"name": "hung", "command": [sys.executable, str(tmp_path / "hung.py")], "nodes": 1,
                      "watchdog": 4})
    chatty = admin.submit({"name": "chatty", "nodes": 1, "watchdog": 4,
                           "command": ["sh", "-c", "for i in $(seq 30); do echo $i; sleep 0.25; done"]})
    done = admin.wait(t["id"], timeout=30)
    assert done["status"] == "failed" and done["stop"] == "timeout" and "time limit 0:00:02" in done["reason"]
    assert 2.0 <= done["finished_at"] - done["started_at"] <= 2.0 + 5.0 + 2.0  # + stop_grace (sleep obeys TERM)
    done = admin.wait(w["id"], timeout=30)
    assert done["status"] == "failed" and done["stop"] == "hung" and "no output for 4 s" in done["reason"]
    assert done["last_output"] > 0
    assert admin.wait(chatty["id"], timeout=30)["status"] == "succeeded"  # output keeps the watchdog away
    assert json.dumps(done)  # the job's JSON is plain
