"""The job side of HAI-Platform: what a training script calls to be time-shared (hfai's names).

A job running on the platform is told to suspend through its control directory
(``$HAI_CONTROL``, see :mod:`haiplatform.agent`): the scheduler decides, the node's agent writes
``suspend`` there and sends no signal yet. The job then saves and leaves::

    from haiplatform import job

    ckpt = job.Checkpointer("fs3:/ckpt/run1", every_steps=100)    # or a local directory
    state = ckpt.resume()                                          # None on the first attempt
    for step in range(start, steps):
        train_step()
        ckpt.maybe_save(step + 1, lambda: {"model": ..., "step": step + 1})  # saves, and on a
                                                                   # suspend also reports and exits

or by hand: ``if receive_suspend_command(): save(); report_checkpoint(); go_suspend()``.

- :func:`receive_suspend_command` is True once a suspend was asked (its first True writes
  ``suspend_ack``: the agent then gives the job its ``grace`` to finish, instead of stopping it
  ``ack_timeout`` seconds after the request);
- :func:`go_suspend` writes ``suspend_done`` (the agent stops the job's ranks on this node at once)
  and ends the process with code 0; the platform queues the next attempt of the chain, which
  starts with ``HAI_RESTART_COUNT`` one higher;
- :func:`get_whole_life_state` / :func:`set_whole_life_state`: an integer the chain keeps from one
  attempt to the next (``$HAI_WHOLE_LIFE_STATE``);
- :func:`report_checkpoint`: when the job last saved (the scheduler prefers to preempt the job
  that loses least work, and shows it);
- :func:`set_priority`: change the chain's priority (the API, with the job's own token);
- :class:`Checkpointer`: save every N steps or seconds and when a suspend is pending, resume.

[Note: agreeing on a suspend] Ranks see the suspend file at slightly different steps (each node
has its own agent and directory). A multi-rank job must stop every rank at the same step, or a
collective hangs: reduce the flag with MAX across ranks first (``Checkpointer(agree=...)`` or
:func:`suspend_agreed`), as the demo does with ``hfreduce.allreduce(flag, op=MAX)``.

Local runs: ``HAI_SIMULATE_SUSPEND=SECONDS`` makes :func:`receive_suspend_command` turn True that
long after its first call; ``hai local [--suspend-after N] -- CMD`` (:func:`local_main`) runs CMD
with a job environment and runs it again after each (simulated) suspend, as the platform would.

This module imports neither torch, nor fs3, nor the API client: the checkpoint code loads fs3 and
:func:`set_priority` loads httpx only when called.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["receive_suspend_command", "go_suspend", "get_whole_life_state", "set_whole_life_state",
           "set_priority", "report_checkpoint", "suspend_agreed", "Checkpointer", "local_main"]

#: the largest whole-life state (the platform keeps a signed 32-bit integer)
STATE_MAX = 2**31 - 1

_first_call: float | None = None  # HAI_SIMULATE_SUSPEND: when receive_suspend_command was first called
_acked = False
_lock = threading.Lock()


def _control() -> Path | None:
    c = os.environ.get("HAI_CONTROL")
    return Path(c) if c else None


def _is_file(path: Path) -> bool:
    """A regular file (a link planted there does not count)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _write_new(path: Path, text: str) -> None:
    """Write ``path`` atomically (a temporary file renamed over it): readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _simulated() -> bool:
    global _first_call
    val = os.environ.get("HAI_SIMULATE_SUSPEND")
    if not val:
        return False
    try:
        after = float(val)
    except ValueError:
        raise ValueError(f"HAI_SIMULATE_SUSPEND={val!r}: expected seconds") from None
    now = time.monotonic()
    with _lock:
        if _first_call is None:
            _first_call = now
    return now - _first_call >= after


def receive_suspend_command() -> bool:
    """Whether the platform asked this job to suspend (or a simulated suspend is due).

    Cheap (one ``lstat``): call it every step. Any rank may call it; its first True on a node
    writes ``suspend_ack`` into the control directory, which tells the agent the job is saving.
    """
    global _acked
    ctl = _control()
    asked = (ctl is not None and _is_file(ctl / "suspend")) or _simulated()
    if asked and not _acked and ctl is not None:
        with _lock:
            if not _acked:
                with contextlib.suppress(FileExistsError):  # another rank of this node acked first
                    fd = os.open(ctl / "suspend_ack", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    try:
                        os.write(fd, f"{time.time()!r} {os.environ.get('RANK', '0')}\n".encode())
                    finally:
                        os.close(fd)
                _acked = True
    return asked


def go_suspend(exit: bool = True) -> None:
    """Tell the platform the job has saved and may be stopped (``suspend_done``), then exit with code 0.

    Call it on every rank once every rank's saving is done (the agent stops all of the job's ranks
    on a node when one of them writes ``suspend_done``). ``exit=False``: return instead (the
    caller exits soon; the agent sends SIGTERM at once anyway).

    [Note: the exit is immediate] The process ends with ``os._exit(0)`` after flushing stdout and
    stderr: ``finally`` blocks and ``atexit`` handlers do not run, so finish everything (the
    checkpoint's write, communication threads) first. An interpreter's ordinary shutdown (torch's
    takes a few hundred ms) would only be cut short by the SIGTERM that ``suspend_done`` asks the
    agent for, and the rank would end "killed by signal 15" instead of with code 0.
    """
    ctl = _control()
    if ctl is not None:
        receive_suspend_command()  # acknowledged first, if it was not yet (a suspend without asking)
        _write_new(ctl / "suspend_done", f"{time.time()!r} {os.environ.get('RANK', '0')}\n")
    if not exit:
        return
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(0)


def get_whole_life_state() -> int:
    """The chain's whole-life state: what this attempt set, else what the previous attempts left."""
    ctl = _control()
    if ctl is not None and _is_file(ctl / "whole_life_state"):
        with contextlib.suppress(OSError, ValueError):
            return int((ctl / "whole_life_state").read_text().strip())
    return int(os.environ.get("HAI_WHOLE_LIFE_STATE") or 0)


def set_whole_life_state(value: int) -> None:
    """Set the chain's whole-life state (an integer, -2**31 .. 2**31-1); the next attempt gets it in
    ``$HAI_WHOLE_LIFE_STATE``. The agent reads it when the rank ends."""
    if isinstance(value, bool) or not isinstance(value, int) or not -STATE_MAX - 1 <= value <= STATE_MAX:
        raise ValueError(f"whole-life state {value!r}: expected an int in [{-STATE_MAX - 1}, {STATE_MAX}]")
    ctl = _control()
    if ctl is not None:
        _write_new(ctl / "whole_life_state", str(value))
    os.environ["HAI_WHOLE_LIFE_STATE"] = str(value)


def report_checkpoint(ts: float | None = None) -> float:
    """Tell the platform the job saved a checkpoint at ``ts`` (default now); returns it. The
    scheduler prefers preempting the job that loses least work (the time since this)."""
    ts = time.time() if ts is None else float(ts)
    ctl = _control()
    if ctl is not None:
        _write_new(ctl / "checkpoint", repr(ts))
    return ts


def set_priority(level: int | str, timeout: float = 10.0) -> dict:
    """Change this job's chain priority (a level number or name: ``"high"``, ``"auto"``, ...).

    Goes to the API (``$HAI_URL``) with the job's own token (``$HAI_JOB_TOKEN``); the API's answer
    is returned, its refusal raised (:class:`haiplatform.errors.ApiError`). Outside the platform
    (``hai local``) it only prints what it would do.
    """
    from .states import AUTO, PRIORITIES

    if isinstance(level, str):
        name = level.strip().lower()
        if name not in PRIORITIES and name != "auto":
            raise ValueError(f"priority {level!r}: expected a number or one of {', '.join(PRIORITIES)}, auto")
        level = AUTO if name == "auto" else PRIORITIES[name]
    if os.environ.get("HAI_LOCAL"):
        print(f"[hai local] set_priority({level}) (not on the platform: nothing to change)", file=sys.stderr)
        return {"priority": level, "local": True}
    url, token, jid = os.environ.get("HAI_URL"), os.environ.get("HAI_JOB_TOKEN"), os.environ.get("HAI_JOB_ID")
    if not (url and token and jid):
        raise RuntimeError("set_priority: not running on the platform (HAI_URL, HAI_JOB_TOKEN, HAI_JOB_ID unset)")
    import httpx

    from .errors import Unavailable, error_for_status

    try:
        r = httpx.post(f"{url.rstrip('/')}/v1/jobs/{int(jid)}/priority", json={"priority": level},
                       headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise Unavailable(f"cannot reach the API at {url}: {exc}") from exc
    if r.status_code >= 400:
        try:
            msg = r.json().get("detail") or r.text
        except ValueError:
            msg = r.text
        raise error_for_status(r.status_code, str(msg))
    return r.json()


def suspend_agreed(agree: Callable[[int], int] | None = None) -> bool:
    """:func:`receive_suspend_command` agreed across ranks: ``agree`` reduces an int with MAX over
    every rank (e.g. :func:`torch_agree`); every rank must call it at the same step."""
    flag = int(receive_suspend_command())
    return bool(agree(flag) if agree is not None else flag)


def torch_agree(group: Any = None) -> Callable[[int], int]:
    """An ``agree`` for :class:`Checkpointer` over ``torch.distributed`` (MAX all-reduce of one int);
    a no-op when torch.distributed is not initialised (one rank)."""
    import torch
    import torch.distributed as dist

    def agree(x: int) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return x
        t = torch.tensor([x], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())
    return agree


class Checkpointer:
    """Checkpoints of a training loop: every ``every_steps`` steps or ``every_seconds`` seconds, and
    when a suspend is pending (then it reports the checkpoint and calls :func:`go_suspend`).

    ``path``: ``fs3:/dir`` (the file ``/dir/checkpoint`` on fs3, through :mod:`fs3.checkpoint` and
    the job's cluster file) or a local directory (``DIR/checkpoint``, written to a temporary file
    and renamed into place: a crash mid-save keeps the previous one). Rank 0 (``$RANK``) saves
    (``rank0_only``: data-parallel ranks hold the same state); every rank may resume.
    ``agree``: for multi-rank jobs, a MAX all-reduce of an int over every rank (see the module's
    note): it is called once per :meth:`maybe_save` on every rank, so every rank must call
    :meth:`maybe_save` at every step. ``exit=False``: on a suspend :meth:`maybe_save` only saves,
    reports, sets :attr:`suspended` and returns True; the caller cleans up (stops its communication
    threads) and then calls :func:`go_suspend` itself.
    """

    NAME = "checkpoint"

    def __init__(self, path: str | os.PathLike, every_steps: int = 0, every_seconds: float = 0.0,
                 agree: Callable[[int], int] | None = None, rank0_only: bool = True, exit: bool = True) -> None:
        path = os.fspath(path)
        self.fs3 = path.startswith("fs3:")
        self.dir = path[4:] if self.fs3 else path
        self.file = self.dir.rstrip("/") + "/" + self.NAME
        self.every_steps, self.every_seconds = int(every_steps), float(every_seconds)
        self.agree, self.rank0_only, self.exit = agree, rank0_only, exit
        self.rank = int(os.environ.get("RANK", "0"))
        self.last_save = time.monotonic()
        self.last_step: int | None = None
        self.suspended = False
        self._fs = None

    def _filesystem(self):
        if not self.fs3:
            return None
        if self._fs is None:
            from fs3.client.files import FileSystem

            cf = os.environ.get("HAI_CLUSTER_FILE")
            self._fs = FileSystem(cf) if cf else FileSystem()
        return self._fs

    def resume(self) -> Any:
        """The last saved state, or None when nothing was saved yet."""
        from fs3 import checkpoint

        try:
            return checkpoint.load(self.file, fs=self._filesystem())
        except FileNotFoundError:
            return None

    def save(self, step: int, state: Any) -> None:
        """Save ``state`` now and wait until it is in place (then report it)."""
        from fs3 import checkpoint

        fs = self._filesystem()
        if not self.fs3:
            os.makedirs(self.dir, exist_ok=True)
        elif not fs.exists(self.dir):
            fs.makedirs(self.dir, exist_ok=True)
        checkpoint.save_sync(state, self.file, fs=fs)
        self.last_save, self.last_step = time.monotonic(), step
        report_checkpoint()

    def maybe_save(self, step: int, state_fn: Callable[[], Any]) -> bool:
        """Save ``state_fn()`` when due (every N steps / seconds) or when a suspend is pending;
        on a suspend also exit through :func:`go_suspend` (or return True when ``exit=False``).
        Returns whether it saved."""
        due = (self.every_steps > 0 and step % self.every_steps == 0 and step != self.last_step) or \
              (self.every_seconds > 0 and time.monotonic() - self.last_save >= self.every_seconds)
        code = (2 if receive_suspend_command() else 0) | int(due)
        if self.agree is not None:
            code = int(self.agree(code))
        if not code:
            return False
        if self.rank == 0 or not self.rank0_only:
            self.save(step, state_fn())
        else:
            self.last_save, self.last_step = time.monotonic(), step
        if code & 2:
            if self.agree is not None:
                self.agree(0)  # a barrier: rank 0's save is complete before any rank says done
            if self.rank != 0 and self.rank0_only:
                report_checkpoint()  # a rank that did not save reports it for its node (save() did here)
            self.suspended = True
            if self.exit:
                go_suspend()
        return True

    def close(self) -> None:
        if self._fs is not None:
            self._fs.close()
            self._fs = None


# -- hai local ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(control: str, restart: int, state: int, suspend_after: float | None) -> dict[str, str]:
    """A one-rank job environment for a local run (the variables :mod:`haiplatform.agent` sets)."""
    env = {k: v for k, v in os.environ.items() if k != "HAI_SIMULATE_SUSPEND"}
    env.update({
        "WORLD_SIZE": "1", "RANK": "0", "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0", "NNODES": "1", "NODE_RANK": "0",
        "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "HAI_JOB_ID": "0",
        "HAI_CHAIN_ID": "0", "HAI_ATTEMPT_ID": "0", "HAI_RESTART_COUNT": str(restart), "HAI_NODE_NAME": socket.gethostname(),
        "HAI_WHOLE_LIFE_STATE": str(state), "HAI_CONTROL": control, "HAI_JOB_NAME": "local", "HAI_LOCAL": "1"})
    if suspend_after is not None:
        env["HAI_SIMULATE_SUSPEND"] = repr(suspend_after)
    return env


def local_main(argv: list[str] | None = None) -> int:
    """``hai local [--suspend-after N] [--max-restarts K] -- CMD ...``: run CMD as a one-rank job here.

    With ``--suspend-after N`` the job gets ``HAI_SIMULATE_SUSPEND=N``; a run that acknowledged the
    suspend is run again (``HAI_RESTART_COUNT`` + 1, the whole-life state it set carried), as the
    platform would after a preemption, at most K times; the last allowed run gets no simulated
    suspend, so it can finish. Returns the exit code of the last run.
    """
    ap = argparse.ArgumentParser(prog="hai local", description="Run CMD here as a one-rank job (the job "
                                 "environment of the platform), again after each (simulated) suspend.")
    ap.add_argument("--suspend-after", type=float, default=None, metavar="SECONDS",
                    help="simulate a suspend this long after the job first asks (HAI_SIMULATE_SUSPEND)")
    ap.add_argument("--max-restarts", type=int, default=10, metavar="K",
                    help="at most this many re-runs after a suspend (default 10)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the job's command (after --)")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command: hai local [--suspend-after N] -- CMD ...")
    if args.max_restarts < 0:
        ap.error("--max-restarts must be >= 0")
    state = int(os.environ.get("HAI_WHOLE_LIFE_STATE") or 0)
    restart = 0
    while True:
        control = tempfile.mkdtemp(prefix="hai-local-control-")
        try:
            sim = args.suspend_after if restart < args.max_restarts else None
            try:
                rc = subprocess.call(cmd, env=local_env(control, restart, state, sim))
            except OSError as exc:
                print(f"hai local: cannot run {cmd[0]!r}: {exc}", file=sys.stderr)
                return 127
            ctl = Path(control)
            if _is_file(ctl / "whole_life_state"):
                with contextlib.suppress(OSError, ValueError):
                    state = int((ctl / "whole_life_state").read_text().strip())
            suspended = _is_file(ctl / "suspend_ack") or _is_file(ctl / "suspend_done")
        finally:
            shutil.rmtree(control, ignore_errors=True)
        if not suspended or sim is None:
            return rc
        restart += 1
        print(f"[hai local] the job suspended (exit code {rc}); running attempt {restart} "
              f"(whole-life state {state})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(local_main())
