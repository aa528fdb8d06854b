"""hfreduce.init(): arguments, the platform's / torchrun's variables, mpirun; and API misuse."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hfreduce
from hfreduce.env import resolve as _resolve
from hfreduce.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
ENV_KEYS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
            "GROUP_RANK", "HAI_NODE_NAME", "HAI_CLUSTER_FILE", "HFREDUCE_MASTER_PORT", "TORCHELASTIC_RUN_ID",
            "HFREDUCE_TIMEOUT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"]


@pytest.fixture
def clean_env(monkeypatch):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def resolve(**kw):
    args = dict(rank=None, world_size=None, local_rank=None, local_world_size=None, master_addr=None,
                master_port=None, node=None, cluster=None, timeout=None)
    args.update(kw)
    return _resolve(**args)


def test_nothing_set_is_a_group_of_one(clean_env):
    r = resolve()
    assert (r["rank"], r["world_size"], r["timeout"]) == (0, 1, 1800.0)  # torch's default for gloo


def test_timeout_as_torch_takes_it(clean_env):
    assert resolve(timeout=datetime.timedelta(minutes=2))["timeout"] == 120.0
    assert resolve(timeout=3)["timeout"] == 3.0
    clean_env.setenv("HFREDUCE_TIMEOUT", "45")
    assert resolve()["timeout"] == 45.0
    assert resolve(timeout=datetime.timedelta(seconds=7))["timeout"] == 7.0  # the argument wins
    for bad in (0, -1, datetime.timedelta(0), "soon"):
        with pytest.raises(hfreduce.InitError, match="timeout"):
            resolve(timeout=bad)
    clean_env.setenv("HFREDUCE_TIMEOUT", "1h")
    with pytest.raises(hfreduce.InitError, match="HFREDUCE_TIMEOUT"):
        resolve()


def test_platform_variables(clean_env):
    for k, v in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
                 "MASTER_PORT": "29400", "HAI_NODE_NAME": "n1", "HFREDUCE_TIMEOUT": "7.5"}.items():
        clean_env.setenv(k, v)
    r = resolve()
    assert (r["rank"], r["world_size"], r["local_rank"], r["local_world_size"]) == (5, 8, 1, 4)
    assert (r["master_addr"], r["master_port"], r["node"], r["timeout"]) == ("10.0.0.1", 29400, "n1", 7.5)


def test_arguments_override_the_environment(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("MASTER_PORT", "29400")
    r = resolve(rank=2, world_size=3, master_port=1234, node="x", timeout=2.0)
    assert (r["rank"], r["world_size"], r["master_port"], r["node"], r["timeout"]) == (2, 3, 1234, "x", 2.0)


def test_torchrun_keeps_master_port_for_its_own_store(clean_env):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc",
                 "NODE_RANK": "1"}.items():
        clean_env.setenv(k, v)
    r = resolve()
    # rank 0 publishes an ephemeral port in the agent's store at MASTER_PORT (no MASTER_PORT+1)
    assert (r["master_port"], r["publish"], r["node"]) == (29500, "torchrun", "node1")
    clean_env.setenv("HFREDUCE_MASTER_PORT", "30000")
    assert (resolve()["master_port"], resolve()["publish"]) == (30000, None)  # a port kept for hfreduce
    assert resolve(master_port=1234)["publish"] is None  # an explicit port is bound as given


def test_cluster_file_from_the_environment(clean_env):
    clean_env.setenv("HAI_CLUSTER_FILE", str(ROOT / "deploy" / "clusters" / "local.toml"))
    assert set(resolve()["cluster"].nodes) == {"n0", "n1", "n2", "n3"}


@pytest.mark.parametrize("env,msg", [({"WORLD_SIZE": "2"}, "no rank"), ({"RANK": "3", "WORLD_SIZE": "2"}, "outside"),
                                     ({"RANK": "x"}, "not an integer"), ({"RANK": "1", "WORLD_SIZE": "2"}, "port")])
def test_bad_environment_is_explained(clean_env, env, msg):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(hfreduce.InitError, match=msg):
        resolve()


def test_single_process_group_in_this_process(clean_env):
    import numpy as np

    assert hfreduce.info()["initialized"] is False
    pg = hfreduce.init(timeout=5)
    try:
        assert hfreduce.is_initialized() and hfreduce.get_rank() == 0 and hfreduce.get_world_size() == 1
        a = np.arange(10, dtype=np.float32)
        hfreduce.allreduce(a, op=hfreduce.ReduceOp.AVG)
        assert (a == np.arange(10)).all()
        b = hfreduce.empty((3, 4), np.int64)
        b[...] = 7
        hfreduce.allreduce(b)
        assert b.shape == (3, 4) and (b == 7).all()
        out = np.zeros(10, np.float32)
        hfreduce.allgather(out, a)
        assert (out == a).all()
        hfreduce.barrier(timeout=5)
        assert pg.info()["kernel"] in ("c-simd", "numpy")
    finally:
        hfreduce.destroy()
    assert not hfreduce.is_initialized()
    with pytest.raises(hfreduce.HFReduceError, match="not initialized"):
        hfreduce.allreduce(np.ones(2, np.float32))
    with pytest.raises(hfreduce.HFReduceError, match="destroyed"):
        pg.allreduce(np.ones(2, np.float32))


WORKER = """
import os, sys, numpy as np, hfreduce
pg = hfreduce.init(timeout=20)
a = np.full(1000, pg.rank + 1.0, np.float32)
hfreduce.allreduce(a)
# one write per line: under mpirun (unbuffered stdout) print's separate pieces of two ranks interleave
sys.stdout.write(f"RESULT {pg.rank} {pg.local_rank} {pg.node} {len(pg.info()['nodes'])} {float(a[0])}\\n")
sys.stdout.flush()
hfreduce.destroy()
"""


def test_launched_like_torchrun_from_the_environment(clean_env):
    port = free_port()
    procs = []
    for rank in range(4):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(rank % 2),
               "LOCAL_WORLD_SIZE": "2", "NODE_RANK": str(rank // 2), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=60) for p in procs]
    lines = sorted(line for o, _ in outs for line in o.splitlines() if line.startswith("RESULT"))
    assert lines == [f"RESULT {r} {r % 2} node{r // 2} 2 10.0" for r in range(4)], [e for _, e in outs]


@pytest.mark.mpi
def test_launched_by_mpirun():
    if not shutil.which("mpirun"):
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    pytest.importorskip("mpi4py")
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-c", WORKER],
                       env=env, capture_output=True, text=True, timeout=120)
    lines = sorted(line for line in p.stdout.splitlines() if line.startswith("RESULT"))
    assert len(lines) == 2 and all(line.endswith(" 3.0") for line in lines), p.stdout + p.stderr
