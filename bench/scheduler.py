"""Scheduler throughput: HAI-Platform (ours) against Slurm on the same cluster shape.

4 nodes, every job asks for one whole node and runs ``true``. Both systems get the same N jobs
(200; 40 with --quick), submitted one after another by one client, after both ran 4 warm-up jobs:

- ours: the local cluster (API + scheduler on n0, an agent on each of n0..n3, SQLite), jobs
  submitted through the API (``POST /v1/jobs``, one keep-alive HTTP connection);
- Slurm (slurm-wlm from Debian): slurmctld + 4 slurmd as fake nodes on this machine, munge,
  ``SchedulerParameters=batch_sched_delay=0,sched_min_interval=0``; jobs submitted with
  ``sbatch -N1 --exclusive --wrap true``.

Figures: submissions per second, and the time from the first submission until every job has
finished. Targets: our submissions/s >= 3x Slurm's, our time to finish <= 0.5x Slurm's.

Usage: python bench/scheduler.py [--quick] [--jobs N] [--skip-slurm]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _platform import platform_cluster  # noqa: E402

from deploy.local import pid_alive  # noqa: E402

WARMUP = 4  # jobs run (and finished) on each system before the timed ones


def run_ours(n_jobs: int, work: Path) -> dict:
    from haiplatform.client import HaiClient

    with platform_cluster(work) as (_, url, tok):
        with HaiClient(url, tok, timeout=30) as c:
            for i in range(WARMUP):  # both systems run a few jobs first: steady state, not cold start
                c.wait(c.submit({"name": f"warm{i}", "command": ["true"], "nodes": 1})["id"], timeout=60)
            t0 = time.perf_counter()
            ids = [c.submit({"name": f"b{i}", "command": ["true"], "nodes": 1})["id"] for i in range(n_jobs)]
            t_sub = time.perf_counter() - t0
            deadline = time.monotonic() + 600
            while True:
                # only emptiness matters: one row per status keeps the probe light on the API measured
                live = sum(len(c.jobs(status=s, limit=1)) for s in ("queued", "scheduled", "running", "stopping"))
                if live == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{live} jobs still unfinished after 600 s")
                time.sleep(0.05)
            t_all = time.perf_counter() - t0
            jobs = [j for j in c.jobs(limit=10000) if j["id"] in set(ids)]
            ok = sum(j["status"] == "succeeded" for j in jobs)
            for j in jobs:
                if j["status"] != "succeeded":
                    print(f"job {j['id']} {j['status']}: {j['reason']} {c.job(j['id'])['ranks']}", file=sys.stderr)
            nodes_used = {n for j in jobs for n in j["assigned_nodes"]}
    return {"submit_s": t_sub, "submit_rate": n_jobs / t_sub, "finish_s": t_all, "succeeded": ok,
            "jobs": len(ids), "nodes_used": len(nodes_used)}


# -- Slurm ------------------------------------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


SLURM_CONF = """ClusterName=hbench
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_sock}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
MaxJobCount=100000
MinJobAge=10
NodeName=n[1-4] NodeHostname={host} Port=[{p0}-{p3}] CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN
PartitionName=bench Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """slurmctld + 4 slurmd + a private munged, all stopped by :meth:`stop` (pass or fail)."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
        self.pids: list[int] = []

    def _sh(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    def start(self) -> None:
        for tool in ("slurmctld", "slurmd", "sbatch", "squeue", "munged"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                raise RuntimeError(f"{tool} not found: apt-get install -y slurm-wlm (make bench does)")
        d = self.d
        for sub in ("state", "spool", "log", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for p in (d.parent, d):  # munged runs as the munge user: it must reach its directory
            os.chmod(p, 0o755)
        shutil.chown(d / "munge", "munge", "munge")
        os.chmod(d / "munge", 0o755)
        sock = d / "munge" / "munge.sock"
        self._sh("runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={sock}",
                 f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'munge' / 'munged.log'}",
                 f"--seed-file={d / 'munge' / 'seed'}")
        self.munge_pidfile = d / "munge" / "munged.pid"
        ports = _free_ports(5)
        host = socket.gethostname()
        # slurmd ports must be consecutive: find a free run of 4
        base = _consecutive_free(4)
        (d / "slurm.conf").write_text(SLURM_CONF.format(host=host, ctld_port=ports[0], munge_sock=sock, d=d,
                                                        p0=base, p3=base + 3))
        self._sh("/usr/sbin/slurmctld", "-f", str(d / "slurm.conf"))
        for i in range(1, 5):
            self._sh("/usr/sbin/slurmd", "-f", str(d / "slurm.conf"), "-N", f"n{i}")
        deadline = time.monotonic() + 30
        while True:
            r = self._sh("sinfo", "-h", "-o", "%T %D", check=False)
            idle = sum(int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("idle"))
            if idle == 4:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurm nodes not idle after 30 s: {r.stdout} {r.stderr}")
            time.sleep(0.1)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._sh("scontrol", "shutdown", timeout=15, check=False)
        pidfiles = [self.d / "slurmctld.pid", *(self.d / f"slurmd-n{i}.pid" for i in range(1, 5))]
        deadline = time.monotonic() + 10
        for pf in pidfiles:
            pid = _read_pid(pf)
            while pid and pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        pid = _read_pid(self.d / "munge" / "munged.pid")
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not pid_alive(pid):
                    break
                time.sleep(0.1)


def _consecutive_free(n: int) -> int:
    import random

    for _ in range(200):
        base = random.randrange(20000, 32000 - n)
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no 4 consecutive free ports")


def _read_pid(p: Path) -> int | None:
    try:
        return int(p.read_text().strip())
    except (OSError, ValueError):
        return None


def _wait_slurm_empty(sl: Slurm, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = sl._sh("squeue", "-h", "-o", "%i", check=False)
        if r.returncode == 0 and not r.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"slurm jobs unfinished after {timeout} s")
        time.sleep(0.05)


def run_slurm(n_jobs: int, work: Path) -> dict:
    sl = Slurm(work)
    try:
        sl.start()
        for _ in range(WARMUP):
            sl._sh("sbatch", "--parsable", "-o", "/dev/null", "-N1", "--exclusive", "--wrap", "true")
        _wait_slurm_empty(sl, 120)
        t0 = time.perf_counter()
        for _ in range(n_jobs):
            sl._sh("sbatch", "--parsable", "-o", "/dev/null", "-N1", "--exclusive", "--wrap", "true")
        t_sub = time.perf_counter() - t0
        _wait_slurm_empty(sl, 600)
        t_all = time.perf_counter() - t0
    finally:
        sl.stop()
    return {"submit_s": t_sub, "submit_rate": n_jobs / t_sub, "finish_s": t_all, "jobs": n_jobs}


def _become_subreaper() -> None:
    """Daemons (slurmctld, slurmd, munged) detach; as their subreaper we can reap them (no zombies)."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> int:
    _become_subreaper()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 jobs instead of 200 (within 60 s)")
    ap.add_argument("--jobs", type=int, default=None, help="jobs per system (default 200, --quick 40)")
    ap.add_argument("--skip-slurm", action="store_true", help="measure ours only")
    args = ap.parse_args()
    n = args.jobs or (40 if args.quick else 200)
    work = Path(tempfile.mkdtemp(prefix="hai-bench-"))
    work.chmod(0o711)  # jobs run as their users' accounts: they must pass through to the run dir
    from deploy.local import pass_for_jobs

    pass_for_jobs(sys.executable)
    try:
        ours = run_ours(n, work / "ours")
        slurm, slurm_err = None, None
        if not args.skip_slurm:
            try:
                slurm = run_slurm(n, work / "slurm")
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                slurm_err = str(exc)
    finally:
        _reap()
        shutil.rmtree(work, ignore_errors=True)
    print(f"scheduler bench: {n} one-node jobs on 4 nodes ('true'), submitted one by one")
    print(f"{'system':10} {'submit s':>9} {'submits/s':>10} {'all done s':>11}")
    print(f"{'ours':10} {ours['submit_s']:9.2f} {ours['submit_rate']:10.1f} {ours['finish_s']:11.2f}"
          f"   ({ours['succeeded']}/{n} succeeded on {ours['nodes_used']} nodes)")
    figures = {"jobs": n, "ours_submit_rate": round(ours["submit_rate"], 1), "ours_finish_s": round(ours["finish_s"], 2),
               "ours_succeeded": ours["succeeded"]}
    ratios, ok = {}, False
    targets = {"submit_rate_vs_slurm": ">= 3", "finish_time_vs_slurm": "<= 0.5"}
    if slurm:
        print(f"{'slurm':10} {slurm['submit_s']:9.2f} {slurm['submit_rate']:10.1f} {slurm['finish_s']:11.2f}")
        figures.update(slurm_submit_rate=round(slurm["submit_rate"], 1), slurm_finish_s=round(slurm["finish_s"], 2))
        ratios = {"submit_rate_vs_slurm": round(ours["submit_rate"] / slurm["submit_rate"], 2),
                  "finish_time_vs_slurm": round(ours["finish_s"] / slurm["finish_s"], 3)}
        ok = (ratios["submit_rate_vs_slurm"] >= 3 and ratios["finish_time_vs_slurm"] <= 0.5
              and ours["succeeded"] == n)
        print(f"ratios: submissions/s {ratios['submit_rate_vs_slurm']}x Slurm's (target >= 3), "
              f"time to finish {ratios['finish_time_vs_slurm']}x Slurm's (target <= 0.5)")
    else:
        print(f"slurm: not measured ({slurm_err or 'skipped'})")
        figures["slurm_error"] = slurm_err or "skipped"
    print(json.dumps({"bench": "scheduler", "figures": figures, "ratios": ratios, "targets": targets, "ok": ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
