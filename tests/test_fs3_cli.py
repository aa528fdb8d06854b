"""The fs3 command's file commands (ls, cat, cp, rm, mkdir, mv, stat, df, du, ln, chmod) against one
launched cluster, their one-line errors, and network.find_cluster (which finds that cluster)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from _fs3 import fs3_serving
from _waits import wait_until
from typer.testing import CliRunner

from fs3.cli import app
from network import ClusterFileError, find_cluster

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ["fs3.mgmtd", "fs3.storage", "fs3.meta"]
CS = 64 << 10


# -- network.find_cluster (no cluster needed) ------------------------------------------------------

def _fake_run_dir(base: Path, name: str, pid: int, state: str = "up") -> Path:
    d = base / name
    d.mkdir(parents=True)
    (d / "cluster.toml").write_text((ROOT / "deploy" / "clusters" / "local.toml").read_text())
    (d / "state.json").write_text(json.dumps({"state": state, "supervisor_pid": pid}))
    return d


def test_find_cluster(tmp_path, monkeypatch):
    for env in ("HAI_CLUSTER_FILE", "FIREFLYER_CLUSTER"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("FIREFLYER_RUN_DIR", str(tmp_path / "runs"))
    src = ROOT / "deploy" / "clusters" / "local.toml"
    with pytest.raises(ClusterFileError, match="no cluster is running"):
        find_cluster(None)
    assert find_cluster(src) == src  # not up: the file itself
    run = _fake_run_dir(tmp_path / "runs", "local", os.getpid())
    assert find_cluster(src) == run / "cluster.toml"  # up: its resolved copy
    assert find_cluster(None) == run / "cluster.toml"  # the single one up
    assert find_cluster(run) == run / "cluster.toml"
    assert find_cluster(run / "cluster.toml") == run / "cluster.toml"
    _fake_run_dir(tmp_path / "runs", "other", os.getpid())
    with pytest.raises(ClusterFileError, match="2 clusters are running"):
        find_cluster(None)
    _fake_run_dir(tmp_path / "runs", "dead", 2**22 + 12345)  # its supervisor is gone: not up
    monkeypatch.setenv("FIREFLYER_CLUSTER", str(src))
    assert find_cluster(None) == run / "cluster.toml"
    monkeypatch.setenv("HAI_CLUSTER_FILE", str(tmp_path / "job.toml"))
    with pytest.raises(ClusterFileError, match="no such cluster description"):
        find_cluster(None)


# -- the commands -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from deploy.local import LocalCluster, derived_cluster

    tmp = tmp_path_factory.mktemp("cli")
    path = derived_cluster(tmp / "fs3-cli.toml", SERVICES, fs3={"heartbeat_interval": 0.25, "failure_timeout": 3.0,
                                                                 "chunk_size": CS, "gc_delay": 0.0})
    lc = LocalCluster(path, tmp / "run", ports="auto", services=SERVICES).up()
    try:
        wait_until(lambda: fs3_serving(lc), 30, "every storage server registered and serving")
        yield lc
    finally:
        lc.down()


@pytest.fixture
def fs3cli(cluster):
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        res = runner.invoke(app, [*args, "-c", str(cluster.cluster_file)])
        if ok:
            assert res.exit_code == 0, (args, res.output, res.stderr, res.exception)
        return res
    return run


def test_mkdir_ls_stat_mv_rm(fs3cli):
    fs3cli("mkdir", "-p", "/cli/a/b")
    fs3cli("mkdir", "-p", "/cli/a/b")  # -p: no error when it exists
    fs3cli("mkdir", "fs3:/cli/c")
    assert fs3cli("ls", "/cli").stdout.split() == ["a", "c"]
    long = fs3cli("ls", "-l", "/cli").stdout.splitlines()
    assert long[0].startswith("drwxr-xr-x") and long[0].endswith(" a")
    listing = json.loads(fs3cli("ls", "--json", "-R", "/cli").stdout)
    assert set(listing) == {"/cli", "/cli/a", "/cli/a/b", "/cli/c"}
    st = json.loads(fs3cli("stat", "--json", "/cli/a").stdout)["/cli/a"]
    assert st["type"] == "dir"
    assert "Inode:" in fs3cli("stat", "/cli/a").stdout
    fs3cli("mv", "/cli/c", "/cli/a")  # into a directory
    assert fs3cli("ls", "/cli/a").stdout.split() == ["b", "c"]
    fs3cli("chmod", "700", "/cli/a/c")
    assert fs3cli("ls", "-l", "/cli/a").stdout.splitlines()[1].startswith("drwx------")
    fs3cli("rm", "-r", "/cli/a")
    assert fs3cli("ls", "/cli").stdout.split() == []
    fs3cli("rm", "-f", "/cli/never-was")


def test_cp_both_ways_cat_du_df_ln(fs3cli, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    blobs = {"one.bin": random.Random(1).randbytes(5 * CS + 3), "sub/two.txt": b"two\n", "empty": b""}
    for name, b in blobs.items():
        (src / name).write_bytes(b)
    fs3cli("mkdir", "/data")
    fs3cli("cp", "--quiet", str(src / "one.bin"), "fs3:/data/")
    assert fs3cli("cat", "/data/one.bin").stdout_bytes == blobs["one.bin"]
    fs3cli("cp", "-r", "-q", str(src), "fs3:/data/tree")
    assert sorted(fs3cli("ls", "-R", "/data/tree").stdout.split()) == sorted(
        ["/data/tree:", "empty", "one.bin", "sub", "/data/tree/sub:", "two.txt"])
    out = tmp_path / "back"
    res = fs3cli("cp", "-r", "fs3:/data/tree", str(out))
    assert "copied 3 file(s)" in res.stderr
    for name, b in blobs.items():
        assert (out / name).read_bytes() == b
    fs3cli("cp", "-q", "fs3:/data/one.bin", "fs3:/data/copy.bin")  # within fs3
    assert fs3cli("cat", "/data/copy.bin").stdout_bytes == blobs["one.bin"]
    du = json.loads(fs3cli("du", "-s", "--json", "/data").stdout)
    assert du == {"/data": 3 * len(blobs["one.bin"]) + 4}  # one.bin, tree/one.bin, copy.bin
    assert "/data/tree/sub" in fs3cli("du", "-h", "/data").stdout
    df = json.loads(fs3cli("df", "--json").stdout)
    assert df["bytes_total"] > 0
    assert "avail" in fs3cli("df", "-h").stdout
    fs3cli("ln", "/data/one.bin", "/data/hard")
    fs3cli("ln", "-s", "/data/one.bin", "/data/soft")
    assert fs3cli("cat", "/data/soft").stdout_bytes == blobs["one.bin"]
    assert "-> /data/one.bin" in fs3cli("ls", "-l", "/data/soft").stdout


@pytest.mark.parametrize("args, line", [
    (["cat", "/missing"], "fs3 cat: /missing: No such file or directory"),
    (["cat", "/errs"], "fs3 cat: /errs: Is a directory"),
    (["ls", "/missing"], "fs3 ls: /missing: No such file or directory"),
    (["rm", "/errs"], "fs3 rm: /errs: is a directory (use -r)"),
    (["mkdir", "/errs"], "fs3 mkdir: /errs: File exists"),
    (["mkdir", "/nope/deeper"], "fs3 mkdir: /nope/deeper: No such file or directory"),
    (["cp", "/local/missing", "fs3:/errs/"], "fs3 cp: /local/missing: No such file or directory"),
    (["cp", "fs3:/errs", "{tmp}/x"], "fs3 cp: fs3:/errs: is a directory (use -r)"),
    (["cp", "fs3:/errs/f", "/proc/nope/x"], "fs3 cp: /proc/nope/x: No such file or directory"),
    (["cp", "fs3:/errs/f", "{tmp}"], None),  # into a local directory: fine
    (["cp", "a", "b"], "fs3 cp: no fs3 path (they start with 'fs3:'); use cp for local copies"),
    (["chmod", "9z", "/errs"], "fs3 chmod: 9z: not an octal mode (like 755)"),
    (["mv", "/missing", "/errs2"], "fs3 mv: /missing -> /errs2: No such file or directory"),
    (["mount", "{tmp}/no-such-mountpoint"], "fs3 mount: {tmp}/no-such-mountpoint: not a directory (make it first)"),
    (["umount", "{tmp}"], "fs3 umount: {tmp}: not mounted"),
])
def test_one_line_errors(fs3cli, tmp_path, args, line):
    fs3cli("mkdir", "-p", "/errs")
    fs3cli("rm", "-f", "/errs/f")
    res0 = fs3cli("cp", "-q", __file__, "fs3:/errs/f")
    assert res0.exit_code == 0
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = fs3cli(*args, ok=line is None)
    if line is None:
        assert (tmp_path / "f").read_bytes() == Path(__file__).read_bytes()
        return
    assert res.exit_code == 1, res.output
    assert res.stderr.strip() == line.replace("{tmp}", str(tmp_path))
    assert "Traceback" not in res.output


def test_permission_denied_is_one_line(cluster, fs3cli, monkeypatch, tmp_path):
    import time

    from network.auth import derive, load_cluster_key

    fs3cli("mkdir", "-p", "/locked")
    fs3cli("chmod", "700", "/locked")
    cred = derive(load_cluster_key(cluster.cluster), "job:9/uid=4321/gid=4321", time.time() + 600)
    monkeypatch.setenv("FIREFLYER_CREDENTIAL", str(cred.save(tmp_path / "job.cred")))  # as a job has it
    res = fs3cli("ls", "/locked", ok=False)
    assert res.exit_code == 1 and res.stderr.strip() == "fs3 ls: /locked: Permission denied"
    res = fs3cli("mkdir", "/locked/x", ok=False)
    assert res.exit_code == 1 and res.stderr.strip() == "fs3 mkdir: /locked/x: Permission denied"
