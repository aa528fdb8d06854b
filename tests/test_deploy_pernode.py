"""A cluster brought up node by node (`hai cluster up --node`): each node its own supervisor and
process tree over one run dir, as the same description runs on N hosts; the demo job (a 2-node
haiscale DDP training on hfreduce, submitted with hai) succeeds on it; every tree stops alone and
nothing is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from _hai import cluster_file_factory
from _waits import procs_mentioning, wait_until

from deploy.local import LauncherError, admin_token_hint, cluster_up, keygen, pid_alive
from network import load_cluster

ROOT = Path(__file__).resolve().parent.parent
NODES = ["n0", "n1", "n2", "n3"]


@pytest.fixture
def tmp_path(job_tmp_path):
    """Jobs run as their user's account: the run dir and the job's output must be reachable."""
    return job_tmp_path


def _hai(*args: str, cwd: Path = ROOT, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haiplatform.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "COLUMNS": "200", **(env or {})})


def _tree_of(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def test_node_by_node_cluster_runs_the_demo_job(tmp_path):
    f = cluster_file_factory(tmp_path)()
    run = tmp_path / "run"
    # the description is named relative to another working directory: it must keep working
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base = ["--cluster", os.path.relpath(f, elsewhere), "--run-dir", str(run)]
    sup: dict[str, int] = {}
    try:
        for n in NODES:
            r = _hai("cluster", "up", *base, "--ports", "auto", "--node", n, cwd=elsewhere)
            assert r.returncode == 0, r.stderr
            st = json.loads((run / "nodes" / n / "state.json").read_text())
            assert st["state"] == "up" and st["node"] == n
            assert {s["node"] for s in st["services"]} == {n}
            sup[n] = st["supervisor_pid"]
            if n == "n0":
                resolution = (run / "cluster.toml").read_text()
            if n == "n0":  # the API's node says where the admin token is and how to use it
                assert f"admin token: {run / 'hai' / 'admin.token'}" in r.stdout
                assert f"export HAI_CLUSTER={f}" in r.stdout
                assert f"hai init --token-file {run / 'hai' / 'admin.token'} --url http://" in r.stdout
            else:
                assert "admin token" not in r.stdout
        assert len(set(sup.values())) == 4  # four supervisors...
        for n, pid in sup.items():  # ...each the parent of its own node's services only
            st = json.loads((run / "nodes" / n / "state.json").read_text())
            assert {s["pid"] for s in st["services"]} <= _tree_of(pid)
        # one resolution: the first node's, never rewritten; every tree runs on its ports
        assert (run / "cluster.toml").read_text() == resolution
        resolved = load_cluster(run / "cluster.toml")
        for n in NODES:
            for s in json.loads((run / "nodes" / n / "state.json").read_text())["services"]:
                assert s["port"] == resolved.service(s["module"]).port, (n, s["module"])
        # a second up of a node is refused; the whole cluster cannot start over its nodes
        r = _hai("cluster", "up", *base, "--node", "n1", cwd=elsewhere)
        assert r.returncode == 1 and "node n1 of cluster local is already up" in r.stderr
        r = _hai("cluster", "up", *base, cwd=elsewhere)
        assert r.returncode == 1 and "runs node by node" in r.stderr
        r = _hai("cluster", "status", *base, "--json", cwd=elsewhere)
        st = json.loads(r.stdout)
        assert r.returncode == 0 and st["state"] == "up" and st["nodes"] == NODES
        assert sorted({s["node"] for s in st["services"]}) == NODES
        r = _hai("cluster", "status", *base, "--node", "n2", "--json", cwd=elsewhere)
        assert r.returncode == 0 and {s["node"] for s in json.loads(r.stdout)["services"]} == {"n2"}

        # the demo job: a 2-node DDP training on hfreduce, submitted with hai as the admin
        out = tmp_path / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)  # the job runs as the admin's Unix account
        env = {"HAI_CLUSTER": str(f), "HAI_RUN_DIR": str(run)}
        r = _hai("python", "--nodes", "2", "--procs-per-node", "1", "--name", "pernode", "--follow",
                 str(ROOT / "examples" / "train_ddp.py"), "--no-spawn", "--steps", "20", "--out", str(out),
                 env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "held-out accuracy" in r.stdout and "job 1 succeeded" in r.stderr
        (job,) = json.loads(_hai("list", "--json", env=env).stdout)
        assert job["status"] == "succeeded" and len(job["assigned_nodes"]) == 2
        assert (out / "mlp_ddp.pt").exists()

        # one node's tree stops alone
        n3 = json.loads((run / "nodes" / "n3" / "state.json").read_text())
        r = _hai("cluster", "down", *base, "--node", "n3", cwd=elsewhere)
        assert r.returncode == 0 and "stopped" in r.stdout
        assert not pid_alive(sup["n3"]) and not any(pid_alive(s["pid"]) for s in n3["services"])
        assert all(pid_alive(sup[n]) for n in ("n0", "n1", "n2"))
        r = _hai("cluster", "status", *base, "--node", "n3", "--json", cwd=elsewhere)
        assert r.returncode == 3 and json.loads(r.stdout)["state"] == "down"
    finally:
        r = _hai("cluster", "down", *base, cwd=elsewhere)
    assert r.returncode == 0
    wait_until(lambda: not any(pid_alive(p) for p in sup.values()), 30, "every supervisor gone")
    assert procs_mentioning(str(run)) == []


def test_node_must_exist_and_keygen_provisions_a_run_dir(tmp_path):
    f = cluster_file_factory(tmp_path)()
    with pytest.raises(LauncherError, match=r"no node 'n9'; its nodes: n0, n1, n2, n3"):
        cluster_up(str(f), tmp_path / "run", node="n9")
    made = keygen(tmp_path / "prov")
    assert made["cluster_key"] == tmp_path / "prov" / "secrets" / "cluster.key"
    for p in made.values():
        assert p.stat().st_mode & 0o777 == 0o600 and p.parent.stat().st_mode & 0o777 == 0o700
    with pytest.raises(LauncherError, match="already exist"):
        keygen(tmp_path / "prov")
    r = _hai("cluster", "up", "--cluster", str(f), "--key-file", str(tmp_path / "nope"))
    assert r.returncode != 0 and "nope" in r.stderr


def test_keygen_writes_only_into_a_new_private_directory(tmp_path):
    shared = tmp_path / "shared"  # as an attacker's /tmp/fireflyer-secrets: others may write there
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(LauncherError, match="writable by other accounts"):
        keygen(shared)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(LauncherError, match="not a directory of its own"):
        keygen(tmp_path / "link")
    (tmp_path / "elsewhere" / "secrets").symlink_to(shared)  # a planted link in a private directory
    with pytest.raises(LauncherError, match="not empty"):
        keygen(tmp_path / "elsewhere")
    assert list(shared.iterdir()) == [] and list((tmp_path / "elsewhere").iterdir()) == [tmp_path / "elsewhere" / "secrets"]
    made = keygen(tmp_path / "new" / "prov")
    assert (tmp_path / "new" / "prov").stat().st_mode & 0o777 == 0o700
    assert made["cluster_key"].read_text().startswith('{"key_id"')


def test_admin_token_hint_never_puts_the_token_on_a_command_line(tmp_path):
    st = {"services": [{"module": "haiplatform.api", "address": "127.0.0.1", "port": 17400}],
          "run_dir": str(tmp_path)}
    hint = admin_token_hint(st, tmp_path / "c.toml", tmp_path)
    assert f"hai init --token-file {tmp_path / 'hai' / 'admin.token'} --url http://127.0.0.1:17400" in hint
    assert "$(cat" not in hint
    assert admin_token_hint({"services": []}, tmp_path / "c.toml", None) is None
