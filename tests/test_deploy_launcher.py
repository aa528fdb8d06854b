"""deploy.local: start, health, stop, failures, and no process left behind in any case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _waits import procs_mentioning

from deploy.local import LocalCluster, ServiceFailed
from deploy.local import pid_alive as _alive
from network import TransportError, ping
from network.topology import dump_cluster

ROOT = Path(__file__).resolve().parent.parent


def _probe_only(tmp_path: Path, extra: list[dict] | None = None, name: str = "probe4.toml") -> Path:
    """The local cluster with only its link-probe responders (4 light services, one per node):
    these tests are about the launcher, not about what the other packages run."""
    import tomllib

    raw = tomllib.loads((ROOT / "deploy" / "clusters" / "local.toml").read_text())
    raw["service"] = [s for s in raw["service"] if s["module"] == "network.probe"] + list(extra or [])
    for sec in ("fs3", "haiplatform", "hfreduce", "haiscale"):
        raw.pop(sec, None)
    f = tmp_path / name
    f.write_text(dump_cluster(raw))
    return f


@pytest.fixture
def LOCAL(tmp_path) -> Path:  # noqa: N802 - reads like the constant it replaces
    return _probe_only(tmp_path)


def test_up_healthy_down_leaves_nothing(tmp_path, LOCAL):
    run = tmp_path / "run"
    lc = LocalCluster(LOCAL, run, ports="auto")
    with lc:
        infos = lc.status()
        assert len(infos) == 4 and all(i.state == "healthy" for i in infos)
        for i in infos:
            assert ping(i.address, i.port, credential=lc.credential)["name"] == f"probe@{i.node}"
            assert i.address == lc.cluster.node(i.node).address  # each node on its own address
        assert (run / "cluster.toml").exists() and (run / "logs" / "network.probe@n0.log").exists()
        assert json.loads((run / "state.json").read_text())["state"] == "up"
        pids = [i.pid for i in infos]
        assert len(procs_mentioning(str(run))) == 4
    assert not any(_alive(p) for p in pids)
    assert procs_mentioning(str(run)) == []
    assert json.loads((run / "state.json").read_text())["state"] == "down"


def test_ports_auto_lets_two_clusters_coexist(tmp_path, LOCAL):
    with LocalCluster(LOCAL, tmp_path / "a", ports="auto") as a, LocalCluster(LOCAL, tmp_path / "b", ports="auto") as b:
        pa = {i.port for i in a.status()}
        pb = {i.port for i in b.status()}
        assert pa.isdisjoint(pb)
        assert all(i.state == "healthy" for i in a.status() + b.status())


def test_failing_service_reports_log_and_cleans_up(tmp_path):
    f = _probe_only(tmp_path, [{"module": "deploy.no_such_module", "nodes": ["n1"], "port": 0}], "c.toml")
    lc = LocalCluster(f, tmp_path / "run", ports="auto")
    with pytest.raises(ServiceFailed, match=r"(?s)deploy.no_such_module@n1 exited with code 1 .*No module named"):
        lc.up()
    assert procs_mentioning(str(tmp_path / "run")) == []


def test_unhealthy_service_times_out(tmp_path):
    # a service that runs but never answers its health check
    mod = tmp_path / "sleepy.py"
    mod.write_text("import time\ntime.sleep(120)\n")
    f = _probe_only(tmp_path, [{"module": "sleepy", "nodes": ["n2"], "port": 0}], "c.toml")
    lc = LocalCluster(f, tmp_path / "run", ports="auto", health_timeout=1.5, env={"PYTHONPATH": str(tmp_path)})
    with pytest.raises(ServiceFailed, match=r"sleepy@n2 did not pass its health check"):
        lc.up()
    assert procs_mentioning(str(tmp_path / "run")) == []


def test_kill_and_restart_one_service(launch_cluster):
    lc = launch_cluster(services=["network.probe"])
    old = lc.info["network.probe@n1"].pid
    lc.kill("network.probe", "n1")
    assert not _alive(old)
    assert lc.info["network.probe@n1"].state == "exited(-9)"
    info = lc.start("network.probe", "n1")
    assert info.pid != old and info.state == "healthy"


def _thread_states(pid: int) -> set[str]:
    return {(t / "stat").read_text().rsplit(") ", 1)[1][0] for t in Path(f"/proc/{pid}/task").iterdir()}


def test_sigstop_returns_once_the_service_is_stopped(launch_cluster):
    """kill(SIGSTOP) returns only once every thread of the service is stopped (the kernel stops a
    process's threads after kill() returned: a request sent at once could still be answered), so
    a request sent after it stays unanswered until SIGCONT."""
    lc = launch_cluster(services=["network.probe"])
    info = lc.info["network.probe@n1"]
    try:
        for _ in range(20):
            lc.kill("network.probe", "n1", sig=signal.SIGSTOP)
            assert _thread_states(info.pid) == {"T"}
            lc.kill("network.probe", "n1", sig=signal.SIGCONT)
        lc.kill("network.probe", "n1", sig=signal.SIGSTOP)
        with pytest.raises(TransportError):
            ping(info.address, info.port, timeout=0.5, credential=lc.credential)
    finally:
        lc.kill("network.probe", "n1", sig=signal.SIGCONT)
    assert ping(info.address, info.port, timeout=5, credential=lc.credential)["name"] == "probe@n1"


_LAUNCHER = textwrap.dedent("""
    import sys, time
    from deploy.local import LocalCluster
    lc = LocalCluster(sys.argv[1], sys.argv[2], ports="auto").up()
    print(" ".join(str(i.pid) for i in lc.status()), flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_launcher_death_takes_services_with_it(tmp_path, sig, LOCAL):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(LOCAL), str(run)], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 4 and all(_alive(x) for x in pids)
        os.kill(p.pid, sig)
        p.wait(30)
        deadline = time.monotonic() + 15
        while any(_alive(x) for x in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(x) for x in pids), "orphaned services after the launcher died"
    finally:
        p.kill()
        p.wait()
        for pid in procs_mentioning(str(run)):
            os.kill(pid, signal.SIGKILL)


def test_cli_up_status_down(tmp_path, LOCAL):
    run = tmp_path / "run"
    f = tmp_path / "c.toml"
    f.write_text(LOCAL.read_text())
    hai = [sys.executable, "-m", "haiplatform.cli"]
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run(hai + ["cluster", "up", "--cluster", str(f), "--run-dir", str(run), "--ports", "auto",
                              "--json"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    try:
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["state"] == "up" and [s["state"] for s in st["services"]] == ["healthy"] * 4
        # a second `up` is refused with a clear message
        r2 = subprocess.run(hai + ["cluster", "up", "--cluster", str(f), "--run-dir", str(run)],
                            capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert r2.returncode == 1 and "already up" in r2.stderr
        r3 = subprocess.run(hai + ["cluster", "status", "--cluster", str(f), "--run-dir", str(run)],
                            capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert r3.returncode == 0 and r3.stdout.count("healthy") == 4
    finally:
        r4 = subprocess.run(hai + ["cluster", "down", "--cluster", str(f), "--run-dir", str(run)],
                            capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert r4.returncode == 0 and "stopped" in r4.stdout
    pids = [s["pid"] for s in st["services"]]
    assert not any(_alive(x) for x in pids)
    assert procs_mentioning(str(run)) == []
    r5 = subprocess.run(hai + ["cluster", "status", "--cluster", str(f), "--run-dir", str(run), "--json"],
                        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert json.loads(r5.stdout)["state"] == "down"


def test_cli_bad_cluster_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(dump_cluster({"cluster": {"name": "x"}, "zone": [{"name": "z"}], "leaf": [{"name": "l", "zone": "q"}],
                               "node": []}))
    r = subprocess.run([sys.executable, "-m", "haiplatform.cli", "cluster", "up", "--cluster", str(f)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1
    assert f"{f}: leaf[0] (l).zone: unknown zone 'q'" in r.stderr


def test_health_override_from_the_service_entry(tmp_path):
    # the same never-answering service passes when its [[service]] entry says health = "none"
    (tmp_path / "sleepy.py").write_text("import time\ntime.sleep(120)\n")
    f = _probe_only(tmp_path, [{"module": "sleepy", "nodes": ["n2"], "port": 0, "health": "none"}], "c.toml")
    with LocalCluster(f, tmp_path / "run", ports="auto", health_timeout=5,
                      env={"PYTHONPATH": str(tmp_path)}) as lc:
        assert lc.info["sleepy@n2"].state == "healthy"
        assert {i.key: i.state for i in lc.status()}["sleepy@n2"] == "healthy"
    assert procs_mentioning(str(tmp_path / "run")) == []


def _state(d: Path, **st) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text(json.dumps({"services": [], **st}))


def test_down_signals_only_a_live_supervisor_of_this_run_dir(tmp_path, LOCAL):
    from deploy.local import cluster_down

    run = tmp_path / "run"
    # stale state files whose pids now belong to another process (this test): never signalled
    _state(run, state="up", supervisor_pid=os.getpid())
    _state(run / "nodes" / "n1", state="down", supervisor_pid=os.getpid(), node="n1")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "deploy.local", "supervise",
                                "--run-dir", str(tmp_path / "other")])
    try:
        _state(run / "nodes" / "n2", state="up", supervisor_pid=sleeper.pid, node="n2")  # another run dir's
        assert cluster_down(str(LOCAL), run, timeout=5) is False
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_racing_supervisor_leaves_the_winners_state_alone(tmp_path, LOCAL):
    run = tmp_path / "run"
    winner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "deploy.local", "supervise",
                               "--run-dir", str(run)])
    try:
        _state(run / "nodes" / "n1", state="starting", supervisor_pid=winner.pid, node="n1")
        before = (run / "nodes" / "n1" / "state.json").read_text()
        r = subprocess.run([sys.executable, "-m", "deploy.local", "supervise", "--cluster", str(LOCAL), "--run-dir",
                            str(run), "--node", "n1"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 1 and "node n1 of cluster local is already up" in r.stderr
        assert (run / "nodes" / "n1" / "state.json").read_text() == before
        # the whole cluster does not start over a live node tree either
        r = subprocess.run([sys.executable, "-m", "deploy.local", "supervise", "--cluster", str(LOCAL), "--run-dir",
                            str(run)], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 1 and "runs node by node" in r.stderr and not (run / "state.json").exists()
    finally:
        winner.kill()
        winner.wait()
    assert procs_mentioning(str(run)) == []


def test_node_trees_keep_one_resolution_and_status_names_missing_nodes(tmp_path, LOCAL):
    from deploy.local import LauncherError, cluster_status

    run = tmp_path / "run"
    lc = LocalCluster(LOCAL, run, ports="auto", node="n0")
    lc._resolve()
    first = (run / "cluster.toml").read_text()
    _state(run / "nodes" / "n0", state="up", supervisor_pid=os.getpid(), node="n0",
           cluster_file=str(run / "cluster.toml"))  # n0 runs on it
    other = tmp_path / "other.toml"
    other.write_text(LOCAL.read_text())
    with pytest.raises(LauncherError, match="must use the same description"):
        LocalCluster(other, run, node="n1")._resolve()
    key = tmp_path / "k"
    key.write_text("x")
    with pytest.raises(LauncherError, match="--key-file .* run with the key"):
        LocalCluster(LOCAL, run, node="n1", key_file=key)._resolve()
    LocalCluster(LOCAL, run, node="n1")._resolve()  # the same description: reused as it is
    assert (run / "cluster.toml").read_text() == first
    st = cluster_status(str(LOCAL), run)
    assert st["state"] == "degraded" and st["nodes"] == ["n0", "n1"] and st["missing"] == ["n2", "n3"]


def test_a_bad_or_failing_namespace_record_is_a_clear_error_and_kept(tmp_path, LOCAL):
    from deploy.local import NETNS_STATE, LauncherError, _netns_record, clean_stale_netns, cluster_link
    from deploy.netns import NetnsError

    run = tmp_path / "run"
    run.mkdir()
    rec = run / NETNS_STATE
    for bad, msg in (([], "not a namespace cluster's record"),
                     ({"owner_pid": 2 ** 22 + 1, "netns": {"version": 7}}, "does not describe a namespace cluster"),
                     ({"owner_pid": 2 ** 22 + 1}, "does not describe a namespace cluster")):
        rec.write_text(json.dumps(bad))
        with pytest.raises(LauncherError, match=msg):
            clean_stale_netns(run)
    r = subprocess.run([sys.executable, "-m", "haiplatform.cli", "cluster", "down", "--cluster", str(LOCAL),
                        "--run-dir", str(run)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "does not describe a namespace cluster" in r.stderr and "Traceback" not in r.stderr

    class Failing:  # a namespace cluster whose removal fails (ip netns del refused)
        prefix, tag = "ffdead-", "dead"

        def to_state(self):
            return {"version": 1}

        def down(self):
            raise NetnsError("ip netns del ffdead-n0 failed: Device or resource busy")

    rec.write_text(json.dumps(_netns_record(os.getpid(), Failing())))
    with pytest.raises(LauncherError, match="does not describe"):  # a live owner, a bad record
        cluster_link(str(LOCAL), "n0", "n1", False, run)
    lc = LocalCluster(LOCAL, run)
    lc.nc = Failing()
    with pytest.raises(LauncherError, match=r"could not remove .* ip netns del ffdead-n0 failed.*ip netns list"):
        lc._netns_down()
    assert rec.exists()  # the only record of what is left
