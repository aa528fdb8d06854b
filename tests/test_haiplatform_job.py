"""haiplatform.job, the job-side client, without a cluster: control files, simulated suspends,
the checkpointer, `hai local` re-runs, and a control directory the job's account filled with traps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from haiplatform import job
from haiplatform.errors import Forbidden
from haiplatform.states import AUTO, PRIORITIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Exited(Exception):
    """go_suspend's os._exit, caught (the test process goes on)."""


@pytest.fixture
def ctl(tmp_path, monkeypatch):
    """A fresh control directory as $HAI_CONTROL, and the module's per-process memory reset."""
    d = tmp_path / "control"
    d.mkdir()
    monkeypatch.setenv("HAI_CONTROL", str(d))
    monkeypatch.delenv("HAI_SIMULATE_SUSPEND", raising=False)
    monkeypatch.delenv("HAI_LOCAL", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("HAI_WHOLE_LIFE_STATE", "0")  # set_whole_life_state changes it: restored after
    monkeypatch.setattr(job, "_acked", False)
    monkeypatch.setattr(job, "_first_call", None)

    def exit_(code):
        raise Exited(code)
    monkeypatch.setattr(job.os, "_exit", exit_)
    return d


def test_suspend_ack_done_and_the_files_the_agent_reads(ctl):
    assert job.receive_suspend_command() is False and not (ctl / "suspend_ack").exists()
    (ctl / "suspend").write_text(json.dumps({"t": time.time(), "ack_by": time.time() + 5, "grace": 5}))
    assert job.receive_suspend_command() is True
    first = (ctl / "suspend_ack").read_text()
    assert float(first.split()[0]) <= time.time()
    assert job.receive_suspend_command() is True and (ctl / "suspend_ack").read_text() == first  # acked once
    ts = job.report_checkpoint(1234.5)
    assert ts == 1234.5 and float((ctl / "checkpoint").read_text()) == 1234.5
    assert abs(float(job.report_checkpoint() and (ctl / "checkpoint").read_text()) - time.time()) < 5
    job.go_suspend(exit=False)
    assert (ctl / "suspend_done").is_file()
    with pytest.raises(Exited) as e:
        job.go_suspend()
    assert e.value.args == (0,)
    assert not [p for p in ctl.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_another_rank_acked_first(ctl, monkeypatch):
    (ctl / "suspend").write_text("{}")
    (ctl / "suspend_ack").write_text("1.0 1\n")  # rank 1 of this node was first
    assert job.receive_suspend_command() is True
    assert (ctl / "suspend_ack").read_text() == "1.0 1\n"


def test_whole_life_state(ctl, monkeypatch):
    monkeypatch.setenv("HAI_WHOLE_LIFE_STATE", "7")
    assert job.get_whole_life_state() == 7  # what the previous attempt left
    job.set_whole_life_state(-3)
    assert (ctl / "whole_life_state").read_text() == "-3" and job.get_whole_life_state() == -3
    assert os.environ["HAI_WHOLE_LIFE_STATE"] == "-3"
    for bad in (2**31, -(2**31) - 1, 1.5, True, "4"):
        with pytest.raises(ValueError):
            job.set_whole_life_state(bad)
    monkeypatch.delenv("HAI_CONTROL")
    monkeypatch.setenv("HAI_WHOLE_LIFE_STATE", "")
    assert job.get_whole_life_state() == 0


def test_simulated_suspend_turns_true_after_the_delay(ctl, monkeypatch):
    monkeypatch.setenv("HAI_SIMULATE_SUSPEND", "0.3")
    t0 = time.monotonic()
    assert job.receive_suspend_command() is False
    while not job.receive_suspend_command():
        assert time.monotonic() - t0 < 5
        time.sleep(0.02)
    assert time.monotonic() - t0 >= 0.3 and (ctl / "suspend_ack").is_file()
    monkeypatch.setenv("HAI_SIMULATE_SUSPEND", "soon")
    with pytest.raises(ValueError, match="HAI_SIMULATE_SUSPEND"):
        job.receive_suspend_command()


def test_a_hostile_control_directory_redirects_nothing(ctl, tmp_path):
    """The job's account owns the directory, and another process of it (or a bug) may plant links:
    a link named `suspend` is no suspend, and writes never go through a link."""
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    (ctl / "suspend").symlink_to(target)
    assert job.receive_suspend_command() is False  # a link is not the agent's file
    (ctl / "suspend").unlink()
    (ctl / "suspend").write_text("{}")
    (ctl / "suspend_ack").symlink_to(target)
    assert job.receive_suspend_command() is True  # the ack exists (as a link): no write through it
    assert target.read_text() == "precious"
    for name in ("checkpoint", "whole_life_state", "suspend_done"):
        (ctl / name).symlink_to(target)
    job.report_checkpoint(5.0)
    job.set_whole_life_state(9)
    job.go_suspend(exit=False)
    assert target.read_text() == "precious"  # the links were replaced, not followed
    assert not (ctl / "checkpoint").is_symlink() and (ctl / "checkpoint").read_text() == "5.0"
    (ctl / "whole_life_state").unlink()
    (ctl / "whole_life_state").symlink_to(target)
    assert job.get_whole_life_state() == 9  # not read through a link: the environment's value


def test_agent_reads_job_files_as_hostile(tmp_path):
    """The agent's side of the same files: no link followed, bounded, finite, never in the future."""
    from haiplatform.agent import _plain_file_mtime, _read_ts

    now = time.time()
    (tmp_path / "checkpoint").write_text("1e300")
    assert _read_ts(tmp_path / "checkpoint", now) == now  # clamped to now
    for bad in ("nan", "inf", "-1", "x"):
        (tmp_path / "checkpoint").write_text(bad)
        assert _read_ts(tmp_path / "checkpoint", now) is None, bad
    (tmp_path / "checkpoint").write_text("9" * 100)   # only 32 bytes are read: a finite time, clamped
    assert _read_ts(tmp_path / "checkpoint", now) == now
    (tmp_path / "checkpoint").write_text("12.5")
    assert _read_ts(tmp_path / "checkpoint", now) == 12.5
    (tmp_path / "real").write_text("99.0")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert _read_ts(tmp_path / "link", now) is None and _plain_file_mtime(tmp_path / "link") is None
    os.mkfifo(tmp_path / "fifo")
    assert _read_ts(tmp_path / "fifo", now) is None and _plain_file_mtime(tmp_path / "fifo") is None
    assert _plain_file_mtime(tmp_path / "real") == os.stat(tmp_path / "real").st_mtime


def test_checkpointer_local_dir_every_n_steps_and_on_suspend(ctl, tmp_path):
    ck = job.Checkpointer(tmp_path / "ck", every_steps=3, exit=False)
    assert ck.resume() is None
    saved = [s for s in range(1, 8) if ck.maybe_save(s, lambda s=s: {"step": s, "w": [s] * 3})]
    assert saved == [3, 6]
    assert ck.resume() == {"step": 6, "w": [6, 6, 6]}
    assert float((ctl / "checkpoint").read_text()) <= time.time()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["checkpoint"]  # renamed into place
    (ctl / "suspend").write_text("{}")
    assert ck.maybe_save(7, lambda: {"step": 7}) is True  # suspend pending: saved off-schedule
    assert ck.resume() == {"step": 7} and ck.suspended and (ctl / "suspend_ack").is_file()
    assert not (ctl / "suspend_done").exists()  # exit=False: the caller says done after its cleanup
    ck.exit = True
    with pytest.raises(Exited):
        ck.maybe_save(8, lambda: {"step": 8})
    assert (ctl / "suspend_done").is_file() and ck.resume() == {"step": 8}


def test_checkpointer_agrees_across_ranks(ctl, tmp_path, monkeypatch):
    """A rank that has not seen the suspend yet saves and stops with the rank that has (MAX)."""
    monkeypatch.setenv("RANK", "1")
    calls = []

    def agree(x: int) -> int:  # the other rank saw the suspend
        calls.append(x)
        return max(x, 2)
    ck = job.Checkpointer(tmp_path / "ck", every_seconds=3600, agree=agree, exit=False)
    state_fn_called = []
    assert ck.maybe_save(1, lambda: state_fn_called.append(1)) is True
    assert calls == [0, 0] and state_fn_called == []  # rank 1 does not save; one more agree = the barrier
    assert ck.suspended and (ctl / "suspend_ack").exists() is False  # this rank never saw the file
    assert job.suspend_agreed(lambda x: 1) is True and job.suspend_agreed(lambda x: x) is False  # none here


def test_checkpointer_every_seconds(ctl, tmp_path):
    ck = job.Checkpointer(tmp_path / "ck", every_seconds=0.2, exit=False)
    assert ck.maybe_save(1, lambda: {"s": 1}) is False
    ck.last_save -= 1.0
    assert ck.maybe_save(2, lambda: {"s": 2}) is True and ck.resume() == {"s": 2}


class _Api(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Api.seen.append((self.path, self.headers["Authorization"], body))
        code, out = (200, {"id": 5, "priority": body["priority"]}) if body["priority"] != 50 else \
            (403, {"detail": "a job may not raise itself to extreme_high"})
        data = json.dumps(out).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_set_priority_posts_with_the_job_token(ctl, monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        monkeypatch.setenv("HAI_URL", f"http://127.0.0.1:{srv.server_address[1]}")
        monkeypatch.setenv("HAI_JOB_TOKEN", "job.5.mac")
        monkeypatch.setenv("HAI_JOB_ID", "5")
        assert job.set_priority("high") == {"id": 5, "priority": PRIORITIES["high"]}
        assert job.set_priority("auto")["priority"] == AUTO
        assert _Api.seen[0] == ("/v1/jobs/5/priority", "Bearer job.5.mac", {"priority": 30})
        with pytest.raises(Forbidden, match="extreme_high"):
            job.set_priority(50)
        with pytest.raises(ValueError, match="priority 'urgent'"):
            job.set_priority("urgent")
        monkeypatch.setenv("HAI_LOCAL", "1")
        assert job.set_priority(10)["local"] is True and len(_Api.seen) == 3
        monkeypatch.delenv("HAI_LOCAL")
        monkeypatch.delenv("HAI_URL")
        with pytest.raises(RuntimeError, match="not running on the platform"):
            job.set_priority(10)
    finally:
        srv.shutdown()
        srv.server_close()


LOCAL_JOB = """
import os, sys, time
from haiplatform import job
print("attempt", os.environ["HAI_RESTART_COUNT"], "state", job.get_whole_life_state(),
      "world", os.environ["WORLD_SIZE"], os.environ["RANK"], flush=True)
n = job.get_whole_life_state()
for step in range(n, 1000):
    if job.receive_suspend_command():
        job.set_whole_life_state(step)
        job.go_suspend()
    if step >= 12:
        print("finished at", step, flush=True)
        sys.exit(3)
    time.sleep(0.02)
"""


def test_local_main_reruns_after_simulated_suspends_with_state_carried(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(LOCAL_JOB)
    env = {**os.environ, "PYTHONPATH": ROOT}
    for k in ("HAI_CONTROL", "HAI_WHOLE_LIFE_STATE", "HAI_SIMULATE_SUSPEND"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", "import sys; from haiplatform.job import local_main; "
                        "sys.exit(local_main(sys.argv[1:]))", "--suspend-after", "0.05", "--max-restarts", "20",
                        "--", sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert r.returncode == 3, r.stderr  # the last run's own exit code
    assert lines[0] == "attempt 0 state 0 world 1 0" and lines[-1] == "finished at 12"
    attempts = [line for line in lines if line.startswith("attempt")]
    assert len(attempts) >= 2 and [int(a.split()[1]) for a in attempts] == list(range(len(attempts)))
    states = [int(a.split()[3]) for a in attempts]
    assert states == sorted(states) and states[-1] > 0  # each run resumed where the last one stopped
    assert "running attempt 1" in r.stderr
    # without a simulated suspend: one run; and with --max-restarts 0 the only run is not suspended
    r = subprocess.run([sys.executable, "-m", "haiplatform.job", "--max-restarts", "0", "--suspend-after", "0",
                        "--", sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stdout.count("attempt") == 1
    r = subprocess.run([sys.executable, "-m", "haiplatform.job", "--", "no-such-program-xyz"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 127 and "cannot run 'no-such-program-xyz'" in r.stderr


def test_imports_without_torch_fs3_or_the_api():
    code = ("import sys, haiplatform.job; bad = [m for m in ('torch', 'fs3', 'fastapi', 'sqlalchemy') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ROOT}).stdout
    assert out.strip() == "[]"
