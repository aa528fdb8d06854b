"""hfreduce as a drop-in for torch.distributed's gloo: its timeout, and start-up under torchrun."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hfreduce
from hfreduce.testing import run_group

ROOT = Path(__file__).resolve().parent.parent


def w_pause_then_allreduce(pg, pause: float):
    """Rank 0 pauses (a checkpoint, a slow data loader) before its allreduce; the others wait."""
    if pg.rank == 0:
        time.sleep(pause)  # the pause is the point of the test: nothing to wait for instead
    a = np.full(1 << 20, pg.rank + 1.0, np.float32)  # 4 MiB: several chunks, through the tree
    t0 = time.monotonic()
    try:
        pg.allreduce(a)
    except hfreduce.HFReduceError as exc:
        return type(exc).__name__, time.monotonic() - t0, str(exc), pg.timeout
    return "ok", time.monotonic() - t0, (float(a.min()), float(a.max())), pg.timeout


def test_a_rank_paused_for_two_minutes_does_not_fail_the_others_under_default_settings():
    """[Note: the only long test] 125 s of pause is over twice the old 60 s timeout (and under
    haiscale's old 300 s): what breaks if the default goes back to anything under ~2 minutes."""
    res = run_group(w_pause_then_allreduce, 125.0, nodes=2, per_node=2, group_timeout=None,
                    env={"HFREDUCE_TIMEOUT": None}, timeout=240)
    total = float(sum(range(1, 5)))
    for r, (status, waited, got, timeout) in enumerate(res.values()):
        assert status == "ok", f"rank {r}: {got}"
        assert got == (total, total) and timeout == 1800.0
        if r != 0:
            assert waited > 100, f"rank {r} waited only {waited:.1f} s for the paused rank 0"


def test_a_short_explicit_timeout_still_raises_on_every_rank():
    gt = datetime.timedelta(seconds=2)  # as torch's init_process_group takes it
    res = run_group(w_pause_then_allreduce, 8.0, nodes=2, per_node=2, group_timeout=gt, timeout=60)
    for r, (status, waited, msg, timeout) in enumerate(res.values()):
        assert timeout == 2.0
        assert status != "ok", f"rank {r} completed an allreduce that rank 0 was too late for"
        if r != 0:
            assert status == "HFReduceTimeout", msg
            assert waited < 4 * 2.0 + 5, f"rank {r}: the timeout came after {waited:.1f} s"


def test_haiscale_waits_with_the_group_timeout_unless_given_its_own(monkeypatch):
    torch = pytest.importorskip("torch")
    from haiscale._comm import Comm
    from haiscale.ddp import DistributedDataParallel

    monkeypatch.delenv("HFREDUCE_TIMEOUT", raising=False)
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    pg = hfreduce.init(timeout=datetime.timedelta(seconds=42))
    try:
        assert pg.timeout == 42.0
        assert Comm().timeout == 42.0
        assert Comm(pg).timeout == 42.0
        assert Comm(timeout=datetime.timedelta(seconds=5)).timeout == 5.0
        assert DistributedDataParallel(torch.nn.Linear(2, 2)).comm.timeout == 42.0
        assert DistributedDataParallel(torch.nn.Linear(2, 2), timeout=7).comm.timeout == 7.0
    finally:
        hfreduce.destroy()


TORCHRUN_WORKER = """
import sys, numpy as np, hfreduce
pg = hfreduce.init()
a = np.full(1000, pg.rank + 1.0, np.float32)
hfreduce.allreduce(a)
sys.stdout.write(f"RESULT {pg.rank} {pg.world_size} {pg.timeout} {float(a[0])}\\n")
sys.stdout.flush()
hfreduce.destroy()
"""


def test_starts_under_torchrun_when_master_port_plus_one_is_taken(tmp_path):
    """Rank 0 publishes an ephemeral port in torchrun's own store: MASTER_PORT+1 (what hfreduce
    used to take) held by another process does not matter."""
    pytest.importorskip("torch")
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1] - 1  # torchrun's store gets MASTER_PORT, the blocker holds +1
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip(f"port {port} is in use here")
        blocker.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HFREDUCE_", "TORCHELASTIC_"))
               and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
        env["PYTHONPATH"] = str(ROOT)
        env["TMPDIR"] = str(tmp_path)  # torchrun's log dir: not left in /tmp
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-addr", "127.0.0.1", "--master-port", str(port), str(script)],
                           env=env, capture_output=True, text=True, timeout=120)
    lines = sorted(line for line in p.stdout.splitlines() if line.startswith("RESULT"))
    assert lines == [f"RESULT {r} 2 1800.0 3.0" for r in range(2)], p.stdout + p.stderr
