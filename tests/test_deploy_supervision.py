"""Supervision by the local launcher: a crashed service is started again (with back-off, up to a
start limit), the status says "degraded" while it is not healthy, and an admin restarts one
service with `hai cluster restart` (issue 14, finding 8)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from _waits import procs_mentioning, wait_until

from deploy import local
from deploy.local import LauncherError, LocalCluster, RestartPolicy
from deploy.local import pid_alive as _alive
from deploy.restart import History, decide
from network.topology import dump_cluster

ROOT = Path(__file__).resolve().parent.parent
HAI = [sys.executable, "-m", "haiplatform.cli"]

# A service that passes its health check ("none": alive) and crashes after a moment.
CRASHER = "import os, sys, time\ntime.sleep(float(os.environ.get('CRASH_AFTER', '0.3')))\n" \
          "sys.exit(int(os.environ.get('CRASH_STATUS', '3')))\n"


# Healthy (listening) the first time, then crashes; started again, it never listens.
FLAKY = """
import os, socket, sys, time
from pathlib import Path
from network import load_cluster
c = load_cluster(sys.argv[sys.argv.index("--cluster") + 1])
marker = Path(os.environ["FLAKY_MARKER"])
if not marker.exists():
    marker.write_text("started once")
    addr, port = c.endpoint("flaky", sys.argv[sys.argv.index("--node") + 1])
    s = socket.create_server((addr, port))
    time.sleep(0.5)
    sys.exit(1)
time.sleep(120)
"""


def _cluster(tmp_path: Path, extra: list[dict] | None = None, probe: dict | None = None) -> Path:
    """The local cluster with its four link-probe responders only (plus ``extra`` services; ``probe``:
    options of the probe's [[service]] entry)."""
    raw = tomllib.loads((ROOT / "deploy" / "clusters" / "local.toml").read_text())
    raw["service"] = [{**s, **(probe or {})} for s in raw["service"] if s["module"] == "network.probe"]
    raw["service"] += list(extra or [])
    for sec in ("fs3", "haiplatform", "hfreduce", "haiscale"):
        raw.pop(sec, None)
    (tmp_path / "crasher.py").write_text(CRASHER)
    (tmp_path / "flaky.py").write_text(FLAKY)
    f = tmp_path / "c.toml"
    f.write_text(dump_cluster(raw))
    return f


def _state(run: Path) -> dict:
    return {f"{s['module']}@{s['node']}": s for s in json.loads((run / "state.json").read_text())["services"]}


# -- the policy (pure) ------------------------------------------------------------------------------

def test_policy_backoff_doubles_to_a_cap_and_resets_after_a_long_life():
    p = RestartPolicy(backoff=0.5, backoff_max=4.0, reset_after=60.0, burst=100, interval=1000.0)
    h, delays, now = History(), [], 0.0
    for _ in range(6):
        now += 1.0
        d, h = decide(p, -9, 1.0, h, now)
        assert d.action == "restart"
        delays.append(d.delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    d, h = decide(p, 1, 61.0, h, now + 61)  # stayed up past reset_after: back to the first delay
    assert (d.action, d.delay) == ("restart", 0.5)


def test_policy_start_limit_clean_exit_and_restart_off():
    p = RestartPolicy(backoff=0.1, burst=3, interval=10.0)
    d1, h = decide(p, 3, 0.1, History(), 0.0)
    d2, h = decide(p, 3, 0.1, h, 1.0)
    d3, h = decide(p, 3, 0.1, h, 2.0)
    assert [d1.action, d2.action, d3.action] == ["restart", "restart", "fail"]
    assert "3 crashes within 10 s" in d3.reason and "exited with status 3" in d3.reason
    # crashes spread wider than the interval never reach the limit
    h = History()
    for t in range(0, 100, 6):
        d, h = decide(p, -9, 0.1, h, float(t))
        assert d.action == "restart", t
    assert decide(p, 0, 0.1, History(), 0.0)[0].action == "leave"  # a clean exit is left alone
    assert decide(RestartPolicy(restart="no"), -9, 5.0, History(), 0.0)[0].action == "leave"


def test_bad_restart_option_in_the_cluster_file_is_a_clear_error(tmp_path):
    f = _cluster(tmp_path, probe={"restart_sec": -1})
    with pytest.raises(LauncherError, match=r"service network.probe: restart_sec: expected a positive number"):
        LocalCluster(f, tmp_path / "run", ports="auto")
    f = _cluster(tmp_path, probe={"restart": "always"})
    with pytest.raises(LauncherError, match=r"network.probe: restart: expected 'on-failure' or 'no'"):
        LocalCluster(f, tmp_path / "run", ports="auto")


# -- a LocalCluster in this process (monitor thread) ---------------------------------------------

def test_crashed_service_comes_back_healthy_and_is_counted(tmp_path, launch_cluster):
    lc = launch_cluster(_cluster(tmp_path), restart=RestartPolicy(backoff=3.0))
    info = lc.info["network.probe@n1"]
    old = info.pid
    os.killpg(old, signal.SIGKILL)  # a crash: not lc.kill(), which holds the service down on purpose
    # down for the back-off: the cluster is degraded, the status and the state file say why
    wait_until(lambda: {i.key: i.state for i in lc.degraded()} == {"network.probe@n1": "restarting"}, 10,
               "the status shows the crashed service restarting")
    assert not _alive(old)
    st = _state(lc.run_dir)["network.probe@n1"]
    assert (st["state"], st["last_exit"], st["restarts"]) == ("restarting", -9, 0)
    # ... then it is back: a new process, healthy, the restart counted
    new = wait_until(lambda: lc.info["network.probe@n1"].state == "healthy" and lc.info["network.probe@n1"],
                     30, "the service restarted and healthy")
    assert new.pid != old and _alive(new.pid)
    assert (new.restarts, new.last_exit) == (1, -9) and new.last_exit_at
    assert lc.degraded() == []
    wait_until(lambda: _state(lc.run_dir)["network.probe@n1"]["state"] == "healthy", 10, "state file updated")
    st = _state(lc.run_dir)["network.probe@n1"]
    assert (st["pid"], st["restarts"], st["last_exit"]) == (new.pid, 1, -9)
    lc.down()
    assert not _alive(new.pid) and procs_mentioning(str(lc.run_dir)) == []


def test_service_that_keeps_crashing_ends_failed(tmp_path, launch_cluster):
    f = _cluster(tmp_path, [{"module": "crasher", "nodes": ["n3"], "port": 0, "health": "none"}])
    lc = launch_cluster(f, restart=RestartPolicy(backoff=0.05, burst=3, interval=60.0),
                        env={"PYTHONPATH": str(tmp_path)})
    info = wait_until(lambda: lc.info["crasher@n3"].state == "failed" and lc.info["crasher@n3"], 30, "crasher failed")
    assert (info.restarts, info.last_exit) == (2, 3)
    assert "3 crashes within 60 s (start limit 3)" in info.reason
    time.sleep(1.0)  # a failed service is not started again
    assert lc.info["crasher@n3"].restarts == 2 and lc.info["crasher@n3"].pid == info.pid
    assert [i.key for i in lc.degraded()] == ["crasher@n3"]
    assert _state(lc.run_dir)["crasher@n3"]["state"] == "failed"
    # an admin's restart starts it afresh
    again = lc.restart("crasher", "n3")[0]
    assert again.pid != info.pid and again.state == "healthy"
    lc.down()  # the processes the monitor thread started go too
    assert procs_mentioning(str(lc.run_dir)) == []


def test_restarted_service_that_never_gets_healthy_is_killed_and_counted(tmp_path, launch_cluster):
    f = _cluster(tmp_path, [{"module": "flaky", "nodes": ["n1"], "port": 0, "health": "tcp"}])
    lc = launch_cluster(f, restart=RestartPolicy(backoff=0.05, burst=2), health_timeout=2.0,
                        env={"PYTHONPATH": str(tmp_path), "FLAKY_MARKER": str(tmp_path / "marker")})
    info = wait_until(lambda: lc.info["flaky@n1"].state == "failed" and lc.info["flaky@n1"], 30, "flaky failed")
    # crash 1: its own exit (status 1); restarted, no health within 2 s: killed, crash 2: the start limit
    assert (info.restarts, info.last_exit) == (1, -signal.SIGKILL)
    assert not _alive(info.pid)
    lc.down()
    assert procs_mentioning(str(lc.run_dir)) == []


def test_clean_exit_and_deliberate_kill_are_not_restarted(tmp_path, launch_cluster):
    f = _cluster(tmp_path, [{"module": "crasher", "nodes": ["n3"], "port": 0, "health": "none"}])
    lc = launch_cluster(f, restart=RestartPolicy(backoff=0.05), env={"PYTHONPATH": str(tmp_path),
                                                                     "CRASH_STATUS": "0"})
    old = lc.info["network.probe@n2"].pid
    lc.kill("network.probe", "n2")  # what the failover tests do: the service stays down
    wait_until(lambda: lc.info["crasher@n3"].state == "exited(0)", 10, "clean exit")
    time.sleep(1.0)
    states = {i.key: (i.state, i.restarts) for i in lc.status()}
    assert states["crasher@n3"] == ("exited(0)", 0)
    assert states["network.probe@n2"] == ("exited(-9)", 0) and not _alive(old)
    info = lc.start("network.probe", "n2")  # ... until the test starts it again
    assert info.state == "healthy" and info.pid != old


def test_restart_one_service_in_process(tmp_path, launch_cluster):
    lc = launch_cluster(_cluster(tmp_path))
    before = {k: i.pid for k, i in lc.info.items()}
    [info] = lc.restart("network.probe", "n2")
    assert info.pid != before["network.probe@n2"] and info.state == "healthy" and not _alive(before[info.key])
    assert {k: i.pid for k, i in lc.info.items() if k != info.key} == {k: p for k, p in before.items()
                                                                          if k != info.key}
    with pytest.raises(LauncherError, match=r"no service 'fs3.nope' in cluster local; its services: network.probe"):
        lc.restart("fs3.nope")
    with pytest.raises(LauncherError, match=r"no node 'n9' in cluster local; its nodes: n0, n1, n2, n3"):
        lc.restart("network.probe", "n9")


# -- the detached supervisor of `hai cluster up` ---------------------------------------------------

def _hai(*args: str, path: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    if path:  # where the supervisor (and so its services) finds the test's own service modules
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    return subprocess.run(HAI + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_detached_supervisor_restarts_reports_degraded_and_restarts_on_request(tmp_path):
    f = _cluster(tmp_path, [{"module": "crasher", "nodes": ["n3"], "port": 0, "health": "none",
                             "restart_sec": 0.05, "start_limit_burst": 2}], probe={"restart_sec": 2.0})
    run = tmp_path / "run"
    cf = ["--cluster", str(f), "--run-dir", str(run)]
    pids: list[int] = []
    try:
        r = _hai("cluster", "up", *cf, "--ports", "auto", "--json", path=tmp_path)
        assert r.returncode == 0, r.stderr
        # a service that keeps crashing ends "failed"; the cluster is degraded, and the exit code says so
        wait_until(lambda: local.cluster_status(str(f), run)["services"][-1]["state"] == "failed", 30, "crasher failed")
        r = _hai("cluster", "status", *cf)
        assert r.returncode == local.EXIT_DEGRADED, r.stdout + r.stderr
        assert "degraded" in r.stdout and "crasher@n3 failed: exited with status 3; 2 crashes" in r.stdout
        assert "'hai cluster restart crasher --node n3' starts it again" in r.stdout
        r = _hai("cluster", "status", *cf, "--json")
        st = json.loads(r.stdout)
        assert r.returncode == local.EXIT_DEGRADED and st["state"] == "degraded"
        crasher = st["services"][-1]
        assert (crasher["state"], crasher["restarts"], crasher["last_exit"]) == ("failed", 1, 3)

        # SIGKILL a healthy service: degraded while it is down, then back with a new pid, counted
        n1 = next(s for s in st["services"] if s["node"] == "n1")
        os.killpg(n1["pid"], signal.SIGKILL)
        wait_until(lambda: not _alive(n1["pid"]), 10, "probe@n1 died")
        st = local.cluster_status(str(f), run)
        assert st["state"] == "degraded"
        assert next(s for s in st["services"] if s["node"] == "n1")["state"] in ("exited", "restarting")

        def n1_back():
            s = next(s for s in local.cluster_status(str(f), run)["services"] if s["node"] == "n1")
            return s["state"] == "healthy" and s["pid"] != n1["pid"] and s
        back = wait_until(n1_back, 30, "probe@n1 restarted by the supervisor")
        assert (back["restarts"], back["last_exit"]) == (1, -9)

        # hai cluster restart: one instance, then every instance one at a time
        n2 = next(s for s in st["services"] if s["node"] == "n2")
        r = _hai("cluster", "restart", "network.probe", "--node", "n2", *cf)
        assert r.returncode == 0, r.stderr
        line = r.stdout.strip()
        assert line.startswith(f"network.probe@n2: pid {n2['pid']} -> ") and line.endswith(", healthy"), line
        new_pid = int(line.split("-> ")[1].split(",")[0])
        assert new_pid != n2["pid"] and _alive(new_pid) and not _alive(n2["pid"])
        st = local.cluster_status(str(f), run)
        assert {s["node"]: (s["state"], s["pid"]) for s in st["services"]}["n2"] == ("healthy", new_pid)
        r = _hai("cluster", "restart", "network.probe", *cf, "--json")
        assert r.returncode == 0, r.stderr
        done = json.loads(r.stdout)["restarted"]
        assert [s["node"] for s in done] == ["n0", "n1", "n2", "n3"]
        assert all(s["state"] == "healthy" and s["pid"] != s["old_pid"] for s in done)
        # the failed one starts afresh on request
        r = _hai("cluster", "restart", "crasher", *cf)
        assert r.returncode == 0 and r.stdout.startswith("crasher@n3: pid "), r.stderr

        # clear errors
        r = _hai("cluster", "restart", "fs3.nope", *cf)
        assert r.returncode == 1 and "no service 'fs3.nope' in cluster local" in r.stderr
        r = _hai("cluster", "restart", "network.probe", "--node", "n9", *cf)
        assert r.returncode == 1 and "no node 'n9' in cluster local; its nodes: n0, n1, n2, n3" in r.stderr
        r = _hai("cluster", "restart", "crasher", "--node", "n1", *cf)
        assert r.returncode == 1 and "service crasher does not run on node n1; it runs on n3" in r.stderr
        pids = [s["pid"] for s in local.cluster_status(str(f), run)["services"]]
    finally:
        r = _hai("cluster", "down", *cf)
    assert r.returncode == 0 and "stopped" in r.stdout
    assert not any(_alive(p) for p in pids if p)
    assert procs_mentioning(str(run)) == []
    r = _hai("cluster", "restart", "network.probe", *cf)
    assert r.returncode == 1 and "cluster local is not up" in r.stderr
    r = _hai("cluster", "status", *cf)
    assert r.returncode == local.EXIT_DOWN and "down" in r.stdout
    assert list((run / "control").iterdir()) == []  # no request or reply left behind
