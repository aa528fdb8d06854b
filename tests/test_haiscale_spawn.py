"""haiscale.spawn: the job environment, clean errors when a child fails, no orphans."""

from __future__ import annotations

import json
import os
import time

import psutil
import pytest

import haiscale
from haiscale import ProcessFailed, SpawnError, UsageError, job_env


def write_env(local_rank: int, out_dir: str) -> None:
    keys = ["WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"]
    with open(os.path.join(out_dir, f"{local_rank}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in keys}, f)


def fail_on_one(local_rank: int, out_dir: str) -> None:
    with open(os.path.join(out_dir, f"pid{local_rank}"), "w") as f:
        f.write(str(os.getpid()))
    if local_rank == 1:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(out_dir, "pid0")) and time.monotonic() < deadline:
            time.sleep(0.05)  # let rank 0 start, so the test sees it being stopped
        raise ValueError("bad batch shape in rank one")
    time.sleep(120)  # must be stopped by the parent, not waited for


def exit_hard(local_rank: int) -> None:
    if local_rank == 0:
        os._exit(7)
    time.sleep(120)


def sleep_long(local_rank: int) -> None:
    time.sleep(120)


def fail_loudly(local_rank: int) -> None:
    raise RuntimeError("x" * 300_000 + " END OF A HUGE MESSAGE")  # far more than a pipe buffer holds


def quick(local_rank: int) -> None:
    pass


def _no_children_left() -> bool:
    """No training process left (multiprocessing's own resource tracker and forkserver, which an
    earlier hfreduce test in this process may have started, may live on)."""
    left = []
    for c in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(c.cmdline())
            helper = "resource_tracker" in cmd or "multiprocessing.forkserver" in cmd
            if not helper and c.status() != psutil.STATUS_ZOMBIE:
                left.append(c)
        except psutil.NoSuchProcess:
            pass
    return not left


def test_spawn_sets_the_job_environment(tmp_path):
    haiscale.spawn(write_env, args=(str(tmp_path),), nprocs=3, timeout=60)
    envs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(3)]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"3"}
    assert {e["NNODES"] for e in envs} == {"1"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and int(envs[0]["MASTER_PORT"]) > 0


def test_spawn_reports_the_failing_rank_and_stops_the_others(tmp_path):
    with pytest.raises(ProcessFailed) as ei:
        haiscale.spawn(fail_on_one, args=(str(tmp_path),), nprocs=2, timeout=60, grace=2)
    assert ei.value.rank == 1
    assert "ValueError: bad batch shape in rank one" in str(ei.value)
    pid0 = int((tmp_path / "pid0").read_text())
    assert not psutil.pid_exists(pid0) or psutil.Process(pid0).status() == psutil.STATUS_ZOMBIE
    assert _no_children_left()


def test_spawn_reports_a_hard_exit():
    with pytest.raises(ProcessFailed) as ei:
        haiscale.spawn(exit_hard, nprocs=2, timeout=60, grace=2)
    assert ei.value.rank == 0 and ei.value.exitcode == 7
    assert _no_children_left()


def test_spawn_reports_a_huge_traceback_instead_of_hanging():
    # the child's report used to block on a full pipe the parent reads only after the exit
    with pytest.raises(ProcessFailed) as ei:
        haiscale.spawn(fail_loudly, nprocs=1, timeout=60, grace=2)
    assert "END OF A HUGE MESSAGE" in str(ei.value) and "(cut)" in str(ei.value)
    assert _no_children_left()


def test_spawn_without_join_children_exit_cleanly():
    procs = haiscale.spawn(quick, nprocs=2, join=False)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]


def test_spawn_timeout_stops_everything():
    with pytest.raises(SpawnError, match="still running"):
        haiscale.spawn(sleep_long, nprocs=2, timeout=3, grace=1)
    assert _no_children_left()


def test_job_env_multi_node_platform_layout():
    envs = job_env(2, environ={"NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2222"})
    assert [e["RANK"] for e in envs] == ["4", "5"]
    assert {e["WORLD_SIZE"] for e in envs} == {"6"}
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.1"}


def test_job_env_errors():
    with pytest.raises(UsageError, match="torchrun"):
        job_env(2, environ={"LOCAL_RANK": "0"})
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        job_env(2, environ={"NNODES": "2", "NODE_RANK": "0"})
    with pytest.raises(UsageError, match="NODE_RANK"):
        job_env(2, environ={"NNODES": "2", "NODE_RANK": "5", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(UsageError, match="nprocs"):
        job_env(0, environ={})


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,extra", [("train_ddp.py", []), ("train_fsdp.py", ["--optimizer-in-backward"])])
def test_examples_train_and_checkpoint(tmp_path, script, extra):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--steps", "25",
                           "--out", str(tmp_path), *extra], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) >= 2 and losses[-1] < losses[0]  # it learns
    assert list(tmp_path.glob("*.pt"))


def test_torchrun_launch_trains_with_haiscale_ddp(tmp_path):
    """Processes started by torchrun (its RANK / MASTER_* variables) join hfreduce and train."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed")
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "examples", "train_ddp.py"),
                           "--no-spawn", "--steps", "25", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TMPDIR": str(tmp_path)})  # torchrun's log dir: not left in /tmp
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert (tmp_path / "mlp_ddp.pt").exists()


def _late_broadcast(pg):
    import numpy as np

    from haiscale._comm import Comm, CommunicationError

    comm = Comm(process_group=pg, timeout=0.5)
    buf = np.zeros(4, np.float32)
    if pg.rank == 1:
        time.sleep(3.0)  # late, but well within the group's own timeout
        comm.broadcast(buf, src=0)
        return "joined", float(buf[0])
    buf[:] = 7
    t0 = time.monotonic()
    try:
        comm.broadcast(buf, src=0)
    except CommunicationError as exc:
        return "CommunicationError", time.monotonic() - t0, "within 0.5 s" in str(exc)
    return "no error", time.monotonic() - t0, False


def test_comm_timeout_bounds_synchronous_collectives():
    """haiscale's Comm(timeout=) applies to its synchronous calls too, not only to bucket waits:
    a peer that is late gives CommunicationError after that timeout (the group's own timeout is 20 s)."""
    from hfreduce.testing import run_group

    res = run_group(_late_broadcast, nodes=1, per_node=2, group_timeout=20.0, timeout=60).values()
    kind, elapsed, names_timeout = res[0]
    assert kind == "CommunicationError" and names_timeout, res[0]
    assert elapsed < 2.0, f"the error came after {elapsed:.1f} s"
    assert res[1] == ("joined", 7.0)  # the late rank still completes the broadcast
