"""network.probe: the bandwidth / latency matrix over a running local cluster and on a bare one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from network.probe import probe_matrix

ROOT = Path(__file__).resolve().parent.parent


def test_matrix_over_launched_responders(launch_cluster):
    lc = launch_cluster(services=["network.probe"])
    res = probe_matrix(lc.cluster, size=1 << 20, reps=2, pings=3, spawn="never")
    assert len(res) == 12  # every ordered pair of 4 nodes
    assert {(r.src, r.dst) for r in res} == {(f"n{a}", f"n{b}") for a in range(4) for b in range(4) if a != b}
    for r in res:
        assert r.error is None
        assert r.gbps_best > 0 and r.gbps_median > 0 and r.latency_us > 0
        assert r.hops == lc.cluster.distance(r.src, r.dst)


def test_cli_table_with_spawned_responders(tmp_path):
    import socket

    from network import new_cluster_key

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a bare cluster description with its key (the responders and the coordinator authenticate)
    new_cluster_key().save(tmp_path / "cluster.key")
    cluster = tmp_path / "local.toml"
    cluster.write_text((ROOT / "deploy/clusters/local.toml").read_text() + '\n[security]\nkey_file = "cluster.key"\n')
    r = subprocess.run([sys.executable, "-m", "network.probe", "--cluster", str(cluster),
                        "--size", "1MiB", "--reps", "2", "--pings", "3", "--port", str(port)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env={"COLUMNS": "120", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    assert "bandwidth GB/s" in r.stdout and "latency" in r.stdout
    for n in ("n0", "n1", "n2", "n3"):
        assert n in r.stdout
    out = subprocess.run(["pgrep", "-f", f"network.probe serve.*--port {port}"], capture_output=True, text=True)
    assert out.stdout.strip() == "", "temporary responders were left running"


def test_cli_bad_args():
    r = subprocess.run([sys.executable, "-m", "network.probe", "--cluster", "/nonexistent.toml"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "/nonexistent.toml: file not found" in r.stderr
