"""The launcher on a namespace cluster (`hai cluster up --netns`): every node's services in its own
network namespace, a 2-node job submitted with hai succeeds across the shaped fabric, a cut link
is a real partition, and a launcher killed with SIGKILL leaves namespaces that the next `down`
removes. Skipped with the reason where namespaces cannot be made (not root, no iproute2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from _hai import cluster_file_factory
from _waits import procs_mentioning, wait_until

from deploy.local import NETNS_STATE, LauncherError, LocalCluster, pid_alive
from deploy.netns import unavailable
from network import TransportError, ping
from network.topology import dump_cluster

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no network namespaces: {unavailable()}")


@pytest.fixture
def tmp_path(job_tmp_path):
    return job_tmp_path


def _namespaces(tag: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(f"ff{tag}-")]


def _links(tag: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
    return [ln.split(":")[1].strip() for ln in out.splitlines() if f" ff{tag}-" in ln]


def _netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _hai(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haiplatform.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_two_node_job_succeeds_on_the_namespace_cluster(tmp_path):
    f = cluster_file_factory(tmp_path)()
    run = tmp_path / "run"
    lc = LocalCluster(f, run, ports="auto", netns=True)
    tag = None
    try:
        lc.up()
        tag = lc.nc.tag
        assert len(_namespaces(tag)) == 4 and (run / NETNS_STATE).exists()
        mine = _netns_of(os.getpid())
        for i in lc.status():  # each service in its node's namespace, on the namespace's address
            assert i.state == "healthy" and _netns_of(i.pid) != mine
            assert i.address == lc.nc.addresses[i.node] == lc.cluster.node(i.node).address
        assert len({_netns_of(i.pid) for i in lc.info.values()}) == 4
        out = tmp_path / "out"
        out.mkdir()
        out.chmod(0o777)
        env = {"HAI_CLUSTER": str(f), "HAI_RUN_DIR": str(run)}
        r = _hai("python", "--nodes", "2", "--procs-per-node", "1", "--follow", str(ROOT / "examples" / "train_ddp.py"),
                 "--no-spawn", "--steps", "20", "--out", str(out), env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "held-out accuracy" in r.stdout and "succeeded" in r.stderr
        (job,) = json.loads(_hai("list", "--json", env=env).stdout)
        assert job["status"] == "succeeded" and len(job["assigned_nodes"]) == 2
    finally:
        lc.down()
    assert tag and _namespaces(tag) == [] and _links(tag) == [] and not (run / NETNS_STATE).exists()
    assert procs_mentioning(str(run)) == []


def _probe_only(tmp_path: Path) -> Path:
    raw = tomllib.loads((ROOT / "deploy" / "clusters" / "local.toml").read_text())
    raw["service"] = [s for s in raw["service"] if s["module"] == "network.probe"]
    for sec in ("fs3", "haiplatform", "hfreduce", "haiscale"):
        raw.pop(sec, None)
    f = tmp_path / "probe.toml"
    f.write_text(dump_cluster(raw))
    return f


def test_cli_link_down_partitions_and_a_killed_launcher_leaves_nothing_after_down(tmp_path):
    f = _probe_only(tmp_path)
    run = tmp_path / "run"
    base = ["--cluster", str(f), "--run-dir", str(run)]
    r = _hai("cluster", "link", "down", "n0", "a-leaf0", *base)
    assert r.returncode == 1 and "does not run on network namespaces" in r.stderr
    r = _hai("cluster", "up", *base, "--ports", "auto", "--netns", "--json")
    try:
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["netns"] is True and [s["state"] for s in st["services"]] == ["healthy"] * 4
        tag = json.loads((run / NETNS_STATE).read_text())["netns"]["tag"]
        n1 = next(s for s in st["services"] if s["node"] == "n1")
        from network import client_credential, load_cluster

        cred = client_credential(load_cluster(run / "cluster.toml"))
        assert ping(n1["address"], n1["port"], timeout=5, credential=cred)["name"] == "probe@n1"
        r = _hai("cluster", "link", "down", "n1", "a-leaf0", *base)
        assert r.returncode == 0 and "link n1 - a-leaf0: down" in r.stdout
        with pytest.raises(TransportError):  # a real partition: nothing answers
            ping(n1["address"], n1["port"], timeout=1, credential=cred)
        r = _hai("cluster", "status", *base, "--json")
        assert r.returncode == 4  # degraded: n1's probe does not answer its health check
        r = _hai("cluster", "link", "up", "n1", "a-leaf0", *base)
        assert r.returncode == 0
        wait_until(lambda: _try_ping(n1, cred), 15, "n1 reachable again after link up")
        r = _hai("cluster", "link", "down", "n1", "zz", *base)
        assert r.returncode == 1 and "no link between 'n1' and 'zz'" in r.stderr
        # the launcher dies without cleaning up: its services go with it, its namespaces stay...
        os.kill(st["supervisor_pid"], signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(s["pid"]) for s in st["services"]), 15, "services gone")
        assert len(_namespaces(tag)) == 4
        from deploy.local import _proc_start, clean_stale_netns

        rec = json.loads((run / NETNS_STATE).read_text())
        with pytest.raises(LauncherError, match="belongs to a running launcher"):
            (run / "netns.json").write_text(json.dumps({**rec, "owner_pid": os.getppid(),
                                                        "owner_start": _proc_start(os.getppid())}))
            clean_stale_netns(run)  # never someone else's live cluster
        # the dead launcher's pid now names another live process (reused): its start time tells them apart
        (run / NETNS_STATE).write_text(json.dumps({**rec, "owner_pid": os.getppid()}))
    finally:
        r = _hai("cluster", "down", *base)  # ...until the next down (or up) removes them
    assert r.returncode == 0
    assert f"removed the namespace cluster ff{tag}-*" in r.stdout
    assert _namespaces(tag) == [] and _links(tag) == [] and not (run / NETNS_STATE).exists()
    assert procs_mentioning(str(run)) == []


def _try_ping(svc: dict, cred) -> bool:
    try:
        return ping(svc["address"], svc["port"], timeout=1, credential=cred)["name"] == f"probe@{svc['node']}"
    except TransportError:
        return False
