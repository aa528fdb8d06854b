"""End to end on the local cluster (real processes, real TCP between 127.0.0.x nodes): the API, the
scheduler and 4 agents started by the launcher; jobs submitted through the `hai` CLI."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil
import pytest
from _hai import cluster_file_factory
from _waits import wait_until
from typer.testing import CliRunner

from haiplatform.cli import app


@pytest.fixture
def tmp_path(job_tmp_path):
    """Jobs run as their user's Unix account (hai-admin here, when the tests run as root): the run
    dirs and the scripts they read live where that account can reach them."""
    return job_tmp_path


@pytest.fixture
def cluster_file(tmp_path):
    """Factory: local.toml with [haiplatform] keys overridden, the platform's services only."""
    return cluster_file_factory(tmp_path)


def hai_client(lc, wait_nodes: int = 4):
    """An admin client of a launched cluster, once ``wait_nodes`` agents have registered."""
    from haiplatform.client import HaiClient

    addr, port = lc.cluster.endpoint("haiplatform.api")
    tok = (lc.run_dir / "hai" / "admin.token").read_text().strip()
    c = HaiClient(f"http://{addr}:{port}", tok, timeout=30)
    deadline = time.monotonic() + 30
    while len([n for n in c.nodes() if n["state"] == "up"]) < wait_nodes:
        assert time.monotonic() < deadline, f"agents did not register: {c.nodes()}"
        time.sleep(0.05)
    return c


ENV_SCRIPT = """
import json, os, sys
keys = ["WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "NNODES", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "HAI_JOB_ID", "HAI_CHAIN_ID", "HAI_RESTART_COUNT", "HAI_NODE_NAME", "HAI_CLUSTER_FILE",
        "HAI_WHOLE_LIFE_STATE", "HAI_CONTROL"]
print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}))
print("to stderr", file=sys.stderr)
sys.exit(int(os.environ.get("EXIT", "0")))
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def db_rows(lc, sql: str, *args) -> list[dict]:
    """Rows of the launched cluster's SQLite database, read-only: what the API shows only for a
    chain's latest attempt (an earlier attempt's ranks, its suspend times)."""
    import sqlite3

    con = sqlite3.connect(f"file:{lc.run_dir / 'hai' / 'hai.db'}?mode=ro", uri=True, timeout=10)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute(sql, args)]
    finally:
        con.close()


def hai(c, *args):
    r = CliRunner().invoke(app, ["--url", c.url, "--token", c.token, *args])
    return r


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cluster(request, launch_cluster, cluster_file):
    if request.param == "postgres":
        f = cluster_file(db_url=request.getfixturevalue("pg_url"))
    else:
        f = cluster_file()
    lc = launch_cluster(f)
    c = hai_client(lc)
    yield lc, c
    c.close()


def test_submit_runs_on_n_agents_logs_exit_code_status(cluster, tmp_path):
    lc, c = cluster
    script = tmp_path / "envdump.py"
    script.write_text(ENV_SCRIPT)
    r = hai(c, "python", str(script), "--", "--nodes", "2", "--procs-per-node", "2", "--name", "envdump", "--follow")
    assert r.exit_code == 0, r.output
    assert "ENV " in r.output and "to stderr" in r.output and "succeeded" in r.output
    jid = c.jobs()[0]["id"]
    st = json.loads(hai(c, "status", str(jid), "--json").output)
    assert st["status"] == "succeeded" and st["exit_code"] == 0 and len(st["assigned_nodes"]) == 2
    assert [(x["rank"], x["status"], x["exit_code"]) for x in st["ranks"]] == [(i, "succeeded", 0) for i in range(4)]
    envs = []
    for rank in range(4):
        out = hai(c, "logs", str(jid), "--rank", str(rank)).output
        envs.append(json.loads(out.split("ENV ", 1)[1].splitlines()[0]))
    first = lc.cluster.node(st["assigned_nodes"][0])
    for rank, e in enumerate(envs):
        assert e["WORLD_SIZE"] == "4" and e["RANK"] == str(rank) and e["LOCAL_WORLD_SIZE"] == "2"
        assert e["LOCAL_RANK"] == str(rank % 2) and e["NNODES"] == "2"
        assert e["NODE_RANK"] == e["GROUP_RANK"] == str(rank // 2)
        assert e["MASTER_ADDR"] == first.address and e["MASTER_PORT"] == envs[0]["MASTER_PORT"] != "0"
        assert e["HAI_JOB_ID"] == e["HAI_CHAIN_ID"] == str(jid) and e["HAI_RESTART_COUNT"] == "0"
        assert e["HAI_NODE_NAME"] == st["assigned_nodes"][rank // 2]
        assert e["HAI_CLUSTER_FILE"] == str(lc.cluster_file) and e["HAI_WHOLE_LIFE_STATE"] == "0"
        assert os.path.isdir(e["HAI_CONTROL"])
    # a failing job: its exit code, status failed, and the CLI says so
    r = hai(c, "python", str(script), "--", "--nodes", "1", "--env", "EXIT=3", "--follow")
    assert r.exit_code == 1 and "failed (exit code 3)" in r.output
    listed = json.loads(hai(c, "list", "--json").output)
    assert [(j["status"], j["exit_code"]) for j in listed] == [("failed", 3), ("succeeded", 0)]
    assert "envdump" in hai(c, "list").output


def test_stop_kills_the_whole_process_tree(launch_cluster, cluster_file, tmp_path):
    lc = launch_cluster(cluster_file(stop_grace=1.0))
    c = hai_client(lc)
    (tmp_path / "out").mkdir(mode=0o777)
    (tmp_path / "out").chmod(0o777)  # the job's account writes its pid file here
    pidfile = tmp_path / "out" / "pids"
    script = tmp_path / "tree.py"
    script.write_text(f"""
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])
open({str(pidfile)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
signal_ignored = __import__("signal").signal(__import__("signal").SIGTERM, __import__("signal").SIG_IGN)
time.sleep(300)
""")
    j = c.submit({"name": "tree", "command": [sys.executable, str(script)], "nodes": 1})
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the job's pid file")
    pids = [int(x) for x in pidfile.read_text().split()]
    assert all(alive(p) for p in pids)
    r = hai(c, "stop", str(j["id"]))
    assert r.exit_code == 0, r.output
    done = c.wait(j["id"], timeout=30)
    assert done["status"] == "stopped" and done["stop"] == "manual_stop"
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10, what="the rank and its child to die")
    r = hai(c, "stop", str(j["id"]))
    assert r.exit_code == 1 and "already ended" in r.output


def test_scheduler_killed_and_restarted_keeps_queue_and_running_jobs(launch_cluster, cluster_file):
    lc = launch_cluster(cluster_file())
    c = hai_client(lc)
    long = c.submit({"name": "long", "command": ["sleep", "2"], "nodes": 4})
    wait_until(lambda: c.job(long["id"])["status"] == "running", what="the 4-node job to run")
    queued = [c.submit({"name": f"q{i}", "command": ["true"], "nodes": 2})["id"] for i in range(2)]
    lc.kill("haiplatform.scheduler", "n0", signal.SIGKILL)
    late = c.submit({"name": "late", "command": ["true"], "nodes": 1})["id"]  # accepted without a scheduler
    before = c.job(long["id"])
    assert before["status"] == "running" and [x["status"] for x in before["ranks"]] == ["running"] * 4
    assert [c.job(i)["status"] for i in [*queued, late]] == ["queued"] * 3
    pids = [x["pid"] for x in before["ranks"]]
    lc.start("haiplatform.scheduler", "n0")
    for jid in (long["id"], *queued, late):
        assert c.wait(jid, timeout=60)["status"] == "succeeded"
    after = c.job(long["id"])
    assert len(after["attempts"]) == 1 and [x["pid"] for x in after["ranks"]] == pids  # started once


def test_agent_killed_node_goes_lost_its_job_is_requeued_and_the_node_drained(launch_cluster, cluster_file):
    lc = launch_cluster(cluster_file(heartbeat_timeout=2.0, stop_grace=1.0))
    c = hai_client(lc)
    j = c.submit({"name": "victim", "command": ["sleep", "300"], "nodes": 4})
    running = wait_until(lambda: (x := c.job(j["id"]))["status"] == "running" and x, what="the job to run")
    pid_on = {r["node"]: r["pid"] for r in running["ranks"]}
    lc.kill("haiplatform.agent", "n1", signal.SIGKILL)
    # the attempt ends suspended (node lost: re-queued on its chain), the next one waits: 3 nodes left
    requeued = wait_until(lambda: (x := c.job(j["id"]))["restart_count"] == 1 and x["status"] == "queued" and x,
                          timeout=30, what="the chain to be re-queued")
    first = requeued["attempts"][0]
    assert first["status"] == "suspended" and "node_lost" in first["stop"] and "interrupt" in first["stop"]
    assert "node n1 lost; re-queued" in first["reason"]
    n1 = {n["name"]: n for n in c.nodes()}["n1"]
    assert n1["state"] == "lost" and n1["drained"] and n1["drain_reason"]
    wait_until(lambda: not any(alive(p) for p in pid_on.values()), timeout=10, what="every rank to die")
    # the agent comes back; the node stays drained (an admin looks first), then takes jobs again
    lc.start("haiplatform.agent", "n1")
    wait_until(lambda: {n["name"]: n["state"] for n in c.nodes()}["n1"] == "up", what="n1 back up")
    time.sleep(0.5)
    assert c.job(j["id"])["status"] == "queued"
    assert hai(c, "stop", str(j["id"])).exit_code == 0
    assert c.wait(j["id"], timeout=30)["status"] == "canceled"
    assert hai(c, "admin", "node", "undrain", "n1").exit_code == 0
    k = c.submit({"name": "after", "command": ["true"], "nodes": 4})
    assert c.wait(k["id"], timeout=30)["status"] == "succeeded"


def test_cli_run_yaml_nodes_whoami_and_admin(launch_cluster, cluster_file, tmp_path):
    lc = launch_cluster(cluster_file())
    c = hai_client(lc)
    job = tmp_path / "job.yaml"
    job.write_text("name: yaml-job\ncommand: sh -c 'echo from yaml $RANK'\nnodes: 2\npriority: high\n")
    r = hai(c, "run", str(job), "--follow")
    assert r.exit_code == 0 and "from yaml 0" in r.output, r.output
    (j,) = json.loads(hai(c, "list", "--json").output)
    assert (j["name"], j["priority"], j["status"]) == ("yaml-job", 30, "succeeded")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes: -1\ncommand: true\n")
    r = hai(c, "run", str(bad))
    assert r.exit_code == 1 and "nodes" in r.output and "422" in r.output
    r = hai(c, "exec", "no-such-program-xyz", "--", "--nodes", "1", "--follow")
    assert r.exit_code == 1 and "no program 'no-such-program-xyz' on PATH" in r.output
    nodes = json.loads(hai(c, "nodes", "--json").output)
    assert [n["name"] for n in nodes] == ["n0", "n1", "n2", "n3"] and {n["state"] for n in nodes} == {"up"}
    facts = nodes[0]["facts"]  # psutil facts; GPUs from NVML when pynvml finds one, else the description
    assert facts["cpus_online"] >= 1 and facts["memory_total_gib"] > 0
    assert facts["gpu_source"] in ("nvml", "cluster description") and nodes[0]["gpus"] == facts["gpus"]
    assert "n3" in hai(c, "nodes").output
    out = json.loads(hai(c, "admin", "user", "add", "alice", "--group", "vision", "--json").output)
    alice = out["token"]
    r = CliRunner().invoke(app, ["--url", c.url, "--token", alice, "whoami"])
    assert r.output.strip() == "alice (user, group vision)"
    r = CliRunner().invoke(app, ["--url", c.url, "--token", alice, "admin", "node", "drain", "n0"])
    assert r.exit_code == 1 and "not an admin" in r.output
    r = CliRunner().invoke(app, ["--url", c.url, "--token", "wrong", "list"])
    assert r.exit_code == 1 and "invalid token" in r.output
    assert hai(c, "admin", "quota", "set", "group:vision", "1").exit_code == 0
    assert "group:vision" in hai(c, "admin", "quota", "list").output
    # drain every node: a job waits; undrain one: it runs there
    for n in ("n0", "n1", "n2", "n3"):
        assert hai(c, "admin", "node", "drain", n, "--reason", "maintenance").exit_code == 0
    k = c.submit({"name": "waits", "command": ["true"], "nodes": 1})
    time.sleep(0.3)
    assert c.job(k["id"])["status"] == "queued"
    assert hai(c, "admin", "node", "undrain", "n2").exit_code == 0
    done = c.wait(k["id"], timeout=30)
    assert done["status"] == "succeeded" and done["assigned_nodes"] == ["n2"]
    r = CliRunner().invoke(app, ["--url", "http://127.0.0.1:1", "--token", "x", "list"])
    assert r.exit_code == 1 and "cannot reach the API" in r.output


SUSPENDABLE = """
import os, sys, time
from haiplatform import job
if os.environ["HAI_RESTART_COUNT"] != "0":
    print("resumed attempt", os.environ["HAI_RESTART_COUNT"], "state", job.get_whole_life_state())
    sys.exit(0)
print("started", flush=True)
while not job.receive_suspend_command():  # the agent sends no signal: the job is told by a file
    time.sleep(0.05)
job.set_whole_life_state(42)
print("suspending", flush=True)
job.go_suspend()
"""


def test_suspend_resumes_in_a_new_attempt_with_whole_life_state(launch_cluster, cluster_file, tmp_path):
    # tick = 60 s: every step below (start, suspend, requeue, restart, finish) is driven by events
    lc = launch_cluster(cluster_file(tick=60.0))
    c = hai_client(lc)
    script = tmp_path / "suspendable.py"
    script.write_text(SUSPENDABLE)
    j = c.submit({"name": "sus", "command": [sys.executable, str(script)], "nodes": 2})
    wait_until(lambda: "started" in c.logs(j["id"]), timeout=30, what="the first attempt to start")
    r = hai(c, "suspend", str(j["id"]))
    assert r.exit_code == 0, r.output
    done = c.wait(j["id"], timeout=40)
    assert done["status"] == "succeeded" and done["restart_count"] == 1 and done["chain_id"] == j["id"]
    assert [a["status"] for a in done["attempts"]] == ["suspended", "succeeded"]
    assert done["whole_life_state"] == 42
    assert "resumed attempt 1 state 42" in c.logs(j["id"])
    first = [a["id"] for a in done["attempts"]][0]
    assert "suspending" in c.logs(j["id"], attempt=first)
    # every rank left by itself (go_suspend: exit code 0), none was signalled
    assert [r["exit_code"] for r in db_rows(lc, "SELECT exit_code FROM ranks WHERE job_id = ? ORDER BY rank",
                                            first)] == [0, 0]
    assert "suspending" in hai(c, "logs", str(j["id"]), "--attempt", str(first)).output
