"""Run a whole cluster on this machine: every service of a cluster description as a child process.

Each emulated node has its own loopback address (127.0.0.x; Linux routes all of 127/8 to ``lo``),
so the services of a "multi-node" cluster talk real TCP to one another. The launcher:

1. resolves the description into ``RUN_DIR/cluster.toml`` (with ``ports="auto"``, every service
   gets a free port, so several clusters can run side by side, e.g. parallel test runs);
2. starts the services in registry order (:mod:`deploy.services`), each as
   ``python -m MODULE --cluster RUN_DIR/cluster.toml --node NODE`` with its output in
   ``RUN_DIR/logs/MODULE@NODE.log``, and waits for each to pass its health check;
3. stops everything on :meth:`LocalCluster.down`, on exit, on Ctrl-C and on SIGTERM: SIGTERM to
   each service's process group, SIGKILL after a grace period.

[Note: no orphans] Three layers make sure nothing outlives the launcher: ``down()`` (normal
path, also run by the context manager, ``atexit`` and the signal handlers of the CLI), each child
in its own process group so its descendants are killed with it, and ``PR_SET_PDEATHSIG`` so a
child gets SIGTERM even when the launcher itself is killed with SIGKILL. The death signal fires
when the *thread* that started the child exits, so start clusters from a long-lived thread (the
main thread, as pytest fixtures and the CLI do).

Command line (also ``hai cluster up|down|status``)::

    python -m deploy.local up --cluster deploy/clusters/local.toml      # starts, returns
    python -m deploy.local status --cluster deploy/clusters/local.toml
    python -m deploy.local down --cluster deploy/clusters/local.toml
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from network import load_cluster
from network.rpc import ping
from network.topology import Cluster, dump_cluster

from .services import kind_of

__all__ = ["LocalCluster", "LauncherError", "ServiceFailed", "ProcInfo", "check_health", "default_run_dir", "health_of",
           "pid_alive"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class LauncherError(Exception):
    """The local launcher could not do what was asked."""


class ServiceFailed(LauncherError):
    """A service exited or did not become healthy in time; the message holds its log's tail."""


@dataclass
class ProcInfo:
    module: str
    node: str
    address: str
    port: int
    pid: int | None
    log: str
    state: str = "starting"  # starting | healthy | unhealthy | exited(rc) | stopped
    returncode: int | None = None

    @property
    def key(self) -> str:
        return f"{self.module}@{self.node}"


def default_run_dir(cluster_name: str) -> Path:
    """``$FIREFLYER_RUN_DIR/<name>``, else ``$XDG_STATE_HOME/fireflyer/clusters/<name>``."""
    base = os.environ.get("FIREFLYER_RUN_DIR")
    if base:
        return Path(base) / cluster_name
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "fireflyer" / "clusters" / cluster_name


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def _port_free(addresses: Iterable[str], port: int) -> bool:
    for addr in addresses:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((addr, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def _pick_port(addresses: list[str], taken: set[int], rng: random.Random) -> int:
    # Below the kernel's ephemeral range (32768+), so outgoing connections cannot steal it.
    for _ in range(2000):
        p = rng.randrange(20000, 32000)
        if p not in taken and _port_free(addresses, p):
            return p
    raise LauncherError("no free port found in 20000-32000 on " + ", ".join(addresses))


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def check_health(how: str, addr: str, port: int) -> bool:
    """One health check of a service endpoint (see deploy.services for the kinds)."""
    try:
        if how == "rpc":
            ping(addr, port, timeout=1.0)
        elif how.startswith("http:"):
            with urllib.request.urlopen(f"http://{addr}:{port}{how[5:]}", timeout=1.0) as r:
                return 200 <= r.status < 300
        elif how == "tcp":
            socket.create_connection((addr, port), timeout=1.0).close()
        elif how == "none":
            return True
        else:
            raise LauncherError(f"unknown health check {how!r} (rpc, http:/PATH, tcp, none)")
        return True
    except LauncherError:
        raise
    except Exception:
        return False


def health_of(cluster: Cluster, module: str) -> str:
    """The health check of ``module``: the ``[[service]]`` entry's ``health``, else its kind's."""
    svc = cluster.service(module)
    return (svc.options.get("health") if svc else None) or kind_of(module).health


class LocalCluster:
    """The services of a cluster description, run as child processes of this process."""

    def __init__(self, cluster_file: str | os.PathLike, run_dir: str | os.PathLike | None = None, *,
                 ports: str = "file", services: Iterable[str] | None = None, env: dict | None = None,
                 health_timeout: float = 30.0, stop_timeout: float = 10.0) -> None:
        if ports not in ("file", "auto"):
            raise LauncherError(f"ports must be 'file' or 'auto', not {ports!r}")
        self.source = load_cluster(cluster_file)
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(self.source.name)
        self.ports = ports
        self.only = set(services) if services is not None else None
        if self.only:
            unknown = self.only - {s.module for s in self.source.services}
            if unknown:
                raise LauncherError(f"{cluster_file}: no such service(s): {', '.join(sorted(unknown))}")
        self.env = dict(env or {})
        self.health_timeout = health_timeout
        self.stop_timeout = stop_timeout
        self.cluster: Cluster | None = None
        self.cluster_file: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.info: dict[str, ProcInfo] = {}
        self._atexit = False

    # -- resolution ------------------------------------------------------------------------------
    def _resolve(self) -> Cluster:
        raw = json.loads(json.dumps(self.source.raw))  # deep copy of plain TOML data
        rng = random.Random(os.getpid() ^ time.monotonic_ns())
        taken: set[int] = set()
        for sv in raw.get("service", []):
            if self.ports == "auto" or sv.get("port", 0) == 0:
                svc = self.source.service(sv["module"])
                addrs = sorted({self.source.node(n).address for n in svc.nodes})
                sv["port"] = _pick_port(addrs, taken, rng)
                taken.add(sv["port"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        path = self.run_dir / "cluster.toml"
        path.write_text(f"# resolved by deploy.local from {self.source.source}\n" + dump_cluster(raw))
        self.cluster_file = path
        return load_cluster(path)

    def instances(self) -> list[tuple[str, str]]:
        """(module, node) pairs to run, in start order."""
        c = self.cluster or self.source
        out = []
        for pos, s in enumerate(c.services):
            if self.only is not None and s.module not in self.only:
                continue
            for n in c.ordered(s.nodes):
                out.append((kind_of(s.module).order, pos, s.module, n))
        out.sort(key=lambda t: (t[0], t[1]))
        return [(m, n) for _, _, m, n in out]

    # -- lifecycle -------------------------------------------------------------------------------
    def up(self) -> LocalCluster:
        """Start every service and wait until each is healthy (ServiceFailed otherwise; all stopped)."""
        if self.procs:
            raise LauncherError("cluster is already up")
        self.cluster = self._resolve()
        if not self._atexit:
            atexit.register(self.down)
            self._atexit = True
        try:
            for module, node in self.instances():
                self.start(module, node)
        except BaseException:
            self.down()
            raise
        self._write_state("up")
        return self

    def start(self, module: str, node: str, wait: bool = True, *, cluster_file: str | os.PathLike | None = None
              ) -> ProcInfo:
        """Start (or restart) one service instance; ``cluster_file`` gives it another description
        than the cluster's (the same nodes and services: say, one that reaches a peer through a
        relay a test can cut)."""
        assert self.cluster is not None and self.cluster_file is not None, "call up() first"
        kind = kind_of(module)
        svc = self.cluster.service(module)
        if svc is None or not svc.runs_on(node):
            raise LauncherError(f"service {module} is not declared on node {node}")
        key = f"{module}@{node}"
        old = self.procs.get(key)
        if old is not None and old.poll() is None:
            raise LauncherError(f"{key} is already running (pid {old.pid})")
        logpath = self.run_dir / "logs" / f"{key}.log"
        cmd = [sys.executable, "-m", module, *kind.argv, "--cluster", str(cluster_file or self.cluster_file),
               "--node", node]
        env = {**os.environ, **kind.env, **self.env, "FIREFLYER_RUN_DIR_CLUSTER": str(self.run_dir),
               "PYTHONUNBUFFERED": "1"}
        with open(logpath, "ab") as logf:
            logf.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, preexec_fn=_set_pdeathsig,
                                    cwd=os.getcwd())
        self.procs[key] = proc
        addr = self.cluster.node(node).address
        info = ProcInfo(module, node, addr, svc.port, proc.pid, str(logpath))
        self.info[key] = info
        if wait:
            self.wait_healthy(key)
        return info

    def wait_healthy(self, key: str, how: str | None = None, timeout: float | None = None) -> None:
        info = self.info[key]
        proc = self.procs[key]
        how = how or health_of(self.cluster or self.source, info.module)
        deadline = time.monotonic() + (timeout or self.health_timeout)
        delay = 0.02
        while True:
            rc = proc.poll()
            if rc is not None:
                info.state, info.returncode = f"exited({rc})", rc
                raise ServiceFailed(f"{key} exited with code {rc} while starting; last lines of "
                                    f"{info.log}:\n{_tail(Path(info.log))}")
            if check_health(how, info.address, info.port):
                info.state = "healthy"
                return
            if time.monotonic() > deadline:
                info.state = "unhealthy"
                raise ServiceFailed(f"{key} did not pass its health check ({how} on {info.address}:{info.port}) "
                                    f"within {timeout or self.health_timeout} s; last lines of {info.log}:\n"
                                    f"{_tail(Path(info.log))}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def kill(self, module: str, node: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one service's process group (tests use SIGKILL to crash a server).

        SIGKILL and SIGTERM return once the service exited; SIGSTOP returns once every thread of
        the group is stopped (:func:`_wait_group_stopped`), so whatever the caller sends it
        afterwards stays unanswered until SIGCONT.
        """
        key = f"{module}@{node}"
        proc = self.procs[key]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGSTOP:
            _wait_group_stopped(proc.pid, self.stop_timeout)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(self.stop_timeout)
            self.info[key].state = f"exited({proc.returncode})"
            self.info[key].returncode = proc.returncode

    def stop(self, module: str, node: str) -> None:
        key = f"{module}@{node}"
        self._stop_many([key])

    def _stop_many(self, keys: list[str]) -> None:
        live = [(k, self.procs[k]) for k in keys if k in self.procs]
        for _, p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for k, p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %s s; killing it", k, self.stop_timeout)
            # Kill whatever is left in the group (the service's own children), then reap.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            if k in self.info:
                self.info[k].state = "stopped"
                self.info[k].returncode = p.returncode

    def down(self) -> None:
        """Stop every service (reverse start order) and wait for them. Safe to call twice."""
        if not self.procs:
            return
        keys = list(self.procs)
        self._stop_many(list(reversed(keys)))
        self.procs.clear()
        if self.run_dir.exists():
            self._write_state("down")

    def status(self) -> list[ProcInfo]:
        """Each instance with a fresh health check."""
        out = []
        for key, info in self.info.items():
            proc = self.procs.get(key)
            if proc is not None:  # None: stopped by down()
                if proc.poll() is not None:
                    info.state, info.returncode = f"exited({proc.returncode})", proc.returncode
                else:
                    how = health_of(self.cluster or self.source, info.module)
                    info.state = "healthy" if check_health(how, info.address, info.port) else "unhealthy"
            out.append(info)
        return out

    def _write_state(self, state: str) -> None:
        data = {"state": state, "cluster": self.source.name, "source": self.source.source,
                "cluster_file": str(self.cluster_file), "supervisor_pid": os.getpid(),
                "services": [asdict(i) for i in self.info.values()]}
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.run_dir / "state.json")

    def __enter__(self) -> LocalCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


# -- command line (detached supervisor) -------------------------------------------------------------

def _read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _group_threads_running(pgid: int) -> list[str]:
    """``pid/tid (state)`` of every thread of process group ``pgid`` that is not stopped (Linux /proc);
    stopped (T, t), zombie and dead threads do not count."""
    running = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(") ", 1)[1].split()[2]) != pgid:  # fields after comm: state ppid pgrp
                    continue
            tids = os.listdir(f"/proc/{d}/task")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{d}/task/{tid}/stat") as f:
                    state = f.read().rsplit(") ", 1)[1][0]
            except (OSError, IndexError):
                continue
            if state not in "TtZXx":
                running.append(f"{d}/{tid} ({state})")
    return running


def _wait_group_stopped(pgid: int, timeout: float) -> None:
    """Wait until every thread of process group ``pgid`` is stopped after a SIGSTOP.

    [Note: SIGSTOP is not synchronous] ``kill`` returns once the signal is queued: the kernel
    wakes one thread of the target, and only when that thread runs does it stop the others. On a
    busy machine the target's other threads can meanwhile receive a request and answer it (a
    "frozen" storage server acknowledged a write sent after ``kill`` returned: a flaky fs3
    test). Without /proc (not Linux) this returns at once.
    """
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        running = _group_threads_running(pgid)
        if not running:
            return
        if time.monotonic() > deadline:
            raise LauncherError(f"process group {pgid} not stopped {timeout} s after SIGSTOP: threads "
                                f"{', '.join(running[:8])} still run")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def supervise(cluster_file: str, run_dir: Path, ports: str, services: list[str] | None) -> int:
    """Run the cluster in the foreground until SIGTERM / SIGINT (the detached supervisor's body)."""
    lc = LocalCluster(cluster_file, run_dir, ports=ports, services=services)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        lc.up()
        print(f"cluster {lc.source.name} is up; run dir {run_dir}", flush=True)
        while True:
            time.sleep(1.0)
            for key, proc in list(lc.procs.items()):
                if proc.poll() is not None and lc.info[key].state not in ("stopped",) \
                        and not lc.info[key].state.startswith("exited"):
                    lc.info[key].state = f"exited({proc.returncode})"
                    lc.info[key].returncode = proc.returncode
                    log.error("%s exited with code %s", key, proc.returncode)
                    lc._write_state("up")
    except KeyboardInterrupt:
        print("stopping...", flush=True)
        return 0
    except ServiceFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        data = {"state": "failed", "error": str(exc), "supervisor_pid": os.getpid()}
        (run_dir / "state.json").write_text(json.dumps(data))
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        lc.down()


def cluster_up(cluster_file: str, run_dir: Path | None = None, ports: str = "file",
               services: list[str] | None = None, timeout: float = 120.0) -> dict:
    """Start a detached supervisor for the cluster and wait until it is up (or failed)."""
    c = load_cluster(cluster_file)
    run_dir = Path(run_dir) if run_dir else default_run_dir(c.name)
    st = _read_state(run_dir)
    if st and st.get("state") == "up" and pid_alive(st.get("supervisor_pid", -1)):
        raise LauncherError(f"cluster {c.name} is already up (supervisor pid {st['supervisor_pid']}, run dir "
                            f"{run_dir}); run 'hai cluster down --cluster {cluster_file}' first")
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / "state.json").unlink()
    cmd = [sys.executable, "-m", "deploy.local", "supervise", "--cluster", str(cluster_file),
           "--run-dir", str(run_dir), "--ports", ports]
    for s in services or []:
        cmd += ["--service", s]
    with open(run_dir / "supervisor.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=os.getcwd())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _read_state(run_dir)
        if st and st.get("supervisor_pid") == proc.pid and st.get("state") in ("up", "failed"):
            if st["state"] == "failed":
                proc.wait(30)
                raise ServiceFailed(st.get("error", "cluster failed to start"))
            return st
        if proc.poll() is not None:
            raise LauncherError(f"supervisor exited with code {proc.returncode}; see {run_dir/'supervisor.log'}:\n"
                                f"{_tail(run_dir / 'supervisor.log')}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    raise LauncherError(f"cluster did not come up within {timeout} s; see {run_dir}")


def cluster_down(cluster_file: str, run_dir: Path | None = None, timeout: float = 60.0) -> bool:
    """Stop the detached supervisor (and so every service). Returns False when nothing was running."""
    c = load_cluster(cluster_file)
    run_dir = Path(run_dir) if run_dir else default_run_dir(c.name)
    st = _read_state(run_dir)
    pid = (st or {}).get("supervisor_pid")
    if not pid or not pid_alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    # services die with their supervisor (PDEATHSIG); make sure of it
    for svc in (st or {}).get("services", []):
        spid = svc.get("pid")
        if spid and pid_alive(spid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(spid, signal.SIGKILL)
    return True


def cluster_status(cluster_file: str, run_dir: Path | None = None) -> dict:
    """The state file plus a live health check of each service."""
    c = load_cluster(cluster_file)
    run_dir = Path(run_dir) if run_dir else default_run_dir(c.name)
    st = _read_state(run_dir)
    if not st or not pid_alive(st.get("supervisor_pid", -1)):
        return {"state": "down", "cluster": c.name, "run_dir": str(run_dir), "services": []}
    resolved = Path(st.get("cluster_file") or "")
    live = load_cluster(resolved) if resolved.is_file() else c
    for svc in st.get("services", []):
        if svc.get("pid") and not pid_alive(svc["pid"]):
            svc["state"] = "exited"
            continue
        how = health_of(live, svc["module"])
        svc["state"] = "healthy" if check_health(how, svc["address"], svc["port"]) else "unhealthy"
    st["run_dir"] = str(run_dir)
    return st


def render_status(st: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"cluster [bold]{st.get('cluster')}[/]: {st.get('state')}  (run dir {st.get('run_dir')})")
    if not st.get("services"):
        return
    t = Table("service", "node", "address", "pid", "state", "log")
    for s in st["services"]:
        color = {"healthy": "green", "unhealthy": "yellow"}.get(s["state"], "red")
        t.add_row(s["module"], s["node"], f"{s['address']}:{s['port']}", str(s.get("pid")),
                  f"[{color}]{s['state']}[/]", s["log"])
    con.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.local", description="Run a cluster description's "
                                 "services on this machine, one loopback address per node.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, hlp in (("up", "start the cluster in the background and wait until it is healthy"),
                      ("down", "stop the cluster"), ("status", "show each service and its health"),
                      ("supervise", "run the cluster in the foreground until Ctrl-C")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--cluster", required=True, help="cluster description (TOML)")
        p.add_argument("--run-dir", type=Path, default=None, help="logs and state (default: %(default)s -> "
                       "$FIREFLYER_RUN_DIR/<name> or ~/.local/state/fireflyer/clusters/<name>)")
        if name in ("up", "supervise"):
            p.add_argument("--ports", choices=("file", "auto"), default="file",
                           help="use the ports in the file, or pick free ones")
            p.add_argument("--service", action="append", default=None, help="start only this service (repeat)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.cmd == "supervise":
            c = load_cluster(args.cluster)
            return supervise(args.cluster, args.run_dir or default_run_dir(c.name), args.ports, args.service)
        if args.cmd == "up":
            cluster_up(args.cluster, args.run_dir, args.ports, args.service)
            st = cluster_status(args.cluster, args.run_dir)
        elif args.cmd == "down":
            stopped = cluster_down(args.cluster, args.run_dir)
            st = {"state": "down", "was_running": stopped}
            if not args.json:
                print("stopped" if stopped else "cluster was not running")
                return 0
        else:
            st = cluster_status(args.cluster, args.run_dir)
        if args.json:
            print(json.dumps(st, indent=1))
        else:
            render_status(st)
        return 0
    except (LauncherError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # ClusterFileError and friends: one line, no traceback
        from network.errors import NetworkError

        if isinstance(exc, NetworkError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
