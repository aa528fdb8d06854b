"""Run a whole cluster on this machine: every service of a cluster description as a child process.

Each emulated node has its own loopback address (127.0.0.x; Linux routes all of 127/8 to ``lo``),
so the services of a "multi-node" cluster talk real TCP to one another. The launcher:

1. resolves the description into ``RUN_DIR/cluster.toml`` (with ``ports="auto"``, every service
   gets a free port, so several clusters can run side by side, e.g. parallel test runs);
2. starts the services in registry order (:mod:`deploy.services`), each as
   ``python -m MODULE --cluster RUN_DIR/cluster.toml --node NODE`` with its output in
   ``RUN_DIR/logs/MODULE@NODE.log``, and waits for each to pass its health check;
3. supervises them: a service that crashes (nonzero exit, killed by a signal) is started again
   after a back-off, and left "failed" after too many crashes (:mod:`deploy.restart`, as systemd's
   ``Restart=on-failure``); a service stopped on purpose (:meth:`LocalCluster.kill`, ``stop``,
   ``down``) is not. A monitor thread does it for a cluster run from Python; the detached
   supervisor of ``hai cluster up`` does it in its main loop and also serves
   ``hai cluster restart`` requests (:func:`cluster_restart`);
4. stops everything on :meth:`LocalCluster.down`, on exit, on Ctrl-C and on SIGTERM: SIGTERM to
   each service's process group, SIGKILL after a grace period.

[Note: no orphans] Three layers make sure nothing outlives the launcher: ``down()`` (normal
path, also run by the context manager, ``atexit`` and the signal handlers of the CLI), each child
in its own process group so its descendants are killed with it, and ``PR_SET_PDEATHSIG`` so a
child gets SIGTERM even when the launcher itself is killed with SIGKILL. The death signal fires
when the *thread* that started the child exits, so start clusters from a long-lived thread (the
main thread, as pytest fixtures and the CLI do). A service the monitor thread restarted is tied to
that thread, which lives until ``down()``.

Command line (also ``hai cluster up|down|status``)::

    python -m deploy.local up --cluster deploy/clusters/local.toml      # starts, returns
    python -m deploy.local status --cluster deploy/clusters/local.toml    # exit 0 up, 4 degraded, 3 down
    python -m deploy.local restart fs3.storage --node n2 --cluster deploy/clusters/local.toml
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
import stat
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from network import AuthError, Credential, client_credential, load_cluster, load_cluster_key, new_cluster_key
from network.auth import INSECURE_ENV, NO_AUTH, cluster_key_path
from network.rpc import ping
from network.rundir import default_run_dir, pid_alive  # noqa: F401 - pid_alive: deploy.local's public name too
from network.topology import Cluster, dump_cluster

from .restart import History, RestartPolicy, decide, policy_from_options
from .services import kind_of

__all__ = ["LocalCluster", "LauncherError", "ServiceFailed", "ProcInfo", "RestartPolicy", "check_health",
           "cluster_restart", "default_run_dir", "health_of", "pid_alive", "status_exit_code",
           "wait_until"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_TICK = 0.2  # seconds between two supervision steps
# Signals after which kill() leaves the service running (so it stays supervised).
_NOT_FATAL = (signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP)
# `hai cluster status` exit codes besides 0 (up) and 1 (error); 3 is LSB's "not running".
EXIT_DOWN = 3
EXIT_DEGRADED = 4


class LauncherError(Exception):
    """The local launcher could not do what was asked."""


class AlreadyRunning(LauncherError):
    """Another supervisor runs this cluster (or this node) in the run dir: nothing was started."""


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
    # starting | healthy | unhealthy | restarting (crashed, back-off) | failed (start limit) | exited(rc) | stopped
    state: str = "starting"
    returncode: int | None = None
    restarts: int = 0  # automatic restarts after crashes (systemd's NRestarts)
    last_exit: int | None = None  # status of the last exit nobody asked for (negative: killed by that signal)
    last_exit_at: float | None = None  # its time (epoch seconds)
    next_start_at: float | None = None  # restarting: when the back-off ends (epoch seconds)
    reason: str = ""  # failed: why

    @property
    def key(self) -> str:
        return f"{self.module}@{self.node}"


LOCAL_CLUSTER = Path(__file__).resolve().parent / "clusters" / "local.toml"
_OPTIONAL_SECTIONS = {"haiplatform": "haiplatform.", "hfreduce": None, "haiscale": None}


def derived_cluster(dest: str | os.PathLike, modules: Iterable[str], *, fs3: dict | None = None,
                    nodes: dict[str, list[str]] | None = None, base: str | os.PathLike = LOCAL_CLUSTER) -> Path:
    """Write a copy of the cluster description ``base`` (default: the local cluster) to ``dest``
    with only the services in ``modules`` (``nodes`` moves some of them: module -> node names),
    without the sections of the packages whose services are left out (haiplatform, hfreduce,
    haiscale), and with ``fs3`` applied over its ``[fs3]`` section. For tests and benchmarks that
    run a part of the stack."""
    import tomllib

    modules = set(modules)
    raw = tomllib.loads(Path(base).read_text())
    raw["service"] = [dict(sv, nodes=(nodes or {}).get(sv["module"], sv["nodes"])) for sv in raw.get("service", [])
                      if sv["module"] in modules]
    for section, prefix in _OPTIONAL_SECTIONS.items():
        if prefix is None or not any(m.startswith(prefix) for m in modules):
            raw.pop(section, None)
    if fs3:
        raw.setdefault("fs3", {}).update(fs3)
    dest = Path(dest)
    dest.write_text(dump_cluster(raw))
    return dest


NETNS_STATE = "netns.json"  # RUN_DIR/netns.json: the namespace cluster and the launcher that owns it
NETNS_ENV = "FIREFLYER_NETNS"  # "1": LocalCluster(netns=None) runs on namespaces
_netns_default = False


def use_netns_by_default(on: bool = True) -> None:
    """Make ``LocalCluster(netns=None)`` in this process run on namespaces (pytest's ``--netns``:
    every cluster fixture then does; launchers in child processes keep their own choice)."""
    global _netns_default
    _netns_default = on


def netns_by_default() -> bool:
    """Whether ``LocalCluster(netns=None)`` runs on namespaces in this process (:func:`use_netns_by_default`)."""
    return _netns_default


def netns_requested() -> bool:
    """Whether this process runs clusters on namespaces unless told otherwise: :func:`use_netns_by_default`
    or ``$FIREFLYER_NETNS=1``."""
    return _netns_default or os.environ.get(NETNS_ENV) == "1"


def node_state_dir(run_dir: str | os.PathLike, node: str | None) -> Path:
    """Where the supervisor of one node's services keeps its state: ``RUN_DIR/nodes/NODE`` (its
    state.json, supervisor.log and control/), or RUN_DIR itself for the whole cluster.

    [Note: node trees share the run dir] On one machine, ``hai cluster up --node`` for each node
    gives each its own supervisor (its own process tree) over one run dir: one resolved
    description, one cluster key, the services' data and logs side by side (their names carry the
    node), and a state directory per node. On real hosts each host has its own run dir."""
    return Path(run_dir) / "nodes" / node if node else Path(run_dir)


def _resolved_header(source: str) -> str:
    return f"# resolved by deploy.local from {source}"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # held by a resolution: milliseconds
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _live_node_states(run_dir: Path) -> list[dict]:
    """The state files of the node trees of ``run_dir`` whose supervisor lives (any state)."""
    out = []
    for d in sorted((Path(run_dir) / "nodes").glob("*")):
        st = _read_state(d)
        if st and st.get("state") in ("starting", "up") and pid_alive(st.get("supervisor_pid", -1)):
            out.append(st)
    return out


def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot, /proc/PID/stat field 22), or None
    when it is gone (or there is no /proc): with the pid it names one process, never a later one
    that was given the same pid."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, ValueError, IndexError, TypeError):
        return None


def _owner_alive(rec: dict) -> bool:
    """Whether the launcher recorded in a netns.json still runs: its pid lives and, when its start
    time was recorded, is the same process."""
    owner = rec.get("owner_pid", -1)
    if not isinstance(owner, int) or owner <= 0 or not pid_alive(owner):
        return False
    started = rec.get("owner_start")
    return started is None or _proc_start(owner) in (None, started)


def _netns_record(owner_pid: int, nc) -> dict:
    return {"owner_pid": owner_pid, "owner_start": _proc_start(owner_pid), "netns": nc.to_state()}


def _netns_of(rec: dict, path: Path):
    """The NetnsCluster a netns.json names; LauncherError naming the file when it is not one."""
    from .netns import NetnsCluster, NetnsError

    try:
        return NetnsCluster.from_state(rec["netns"])
    except (NetnsError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LauncherError(f"{path} does not describe a namespace cluster ({type(exc).__name__}: {exc}); remove "
                            "the namespaces it named by hand (see 'ip netns list', 'ip link') and the file") from None


def clean_stale_netns(run_dir: str | os.PathLike) -> bool:
    """Remove the namespace cluster recorded in RUN_DIR/netns.json when the launcher that made it is
    gone (killed with SIGKILL: its services died with it, its namespaces did not). True when one
    was removed; LauncherError when its launcher still runs, or when the file or the removal fails
    (the file is then kept: it is the only record of what is left)."""
    path = Path(run_dir) / NETNS_STATE
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise LauncherError(f"{path} is unreadable ({exc}); remove the namespaces it named by hand "
                            "(ip netns list) and the file") from None
    if not isinstance(rec, dict):
        raise LauncherError(f"{path} is not a namespace cluster's record (a JSON object); remove the namespaces "
                            "it named by hand (ip netns list) and the file")
    owner = rec.get("owner_pid", -1)
    if owner != os.getpid() and _owner_alive(rec):
        raise LauncherError(f"the namespace cluster of {run_dir} belongs to a running launcher (pid {owner}); "
                            "stop it first (hai cluster down)")
    nc = _netns_of(rec, path)
    log.warning("removing the namespaces left by launcher pid %s (%s)", owner, path)
    _netns_remove(nc, path)
    path.unlink()
    return True


def _netns_remove(nc, path: Path) -> None:
    from .netns import NetnsError

    try:
        nc.down()
    except (NetnsError, OSError) as exc:
        raise LauncherError(f"could not remove the namespace cluster {nc.tag} recorded in {path}: {exc}; it is "
                            f"kept in that file. See 'ip netns list' (its namespaces start with {nc.prefix}), remove "
                            "what is left by hand, then the file") from None


def keygen(out: str | os.PathLike) -> dict[str, Path]:
    """Provision the secrets of a cluster into ``out``, laid out as a run dir (``hai cluster keygen``):
    ``secrets/cluster.key`` (the services' cluster key) and ``hai/cluster.secret`` (the token of
    the platform's agents and scheduler), mode 0600 in 0700 directories. Copy the tree into each
    host's run dir (or state directory) so every node holds the same ones; an existing file is
    never overwritten (rotating a key is described in docs/admin.md).

    ``out`` must be new, or an empty private directory of this account (not a link, writable by
    no one else: :func:`deploy.units.open_private_dir`); everything is created through its
    descriptor with O_EXCL|O_NOFOLLOW, so no other account can read or replace the key before it
    is copied."""
    import secrets as _secrets

    from .units import open_private_dir, write_new

    out = Path(out)
    key, secret = out / "secrets" / "cluster.key", out / "hai" / "cluster.secret"
    fd = open_private_dir(out, LauncherError)
    try:
        there = [str(p) for p in (key, secret) if _lexists_in(fd, p.relative_to(out))]
        if there:
            raise LauncherError(f"{', '.join(there)} already exist(s): not overwritten (to rotate the cluster key, "
                                "add a new one to the key file first: docs/admin.md, 'Rotating the keys')")
        if os.listdir(fd):
            raise LauncherError(f"{out} is not empty: keygen writes into a new or empty directory")
        for p, text in ((key, new_cluster_key().to_json()), (secret, _secrets.token_urlsafe(24) + "\n")):
            os.mkdir(p.parent.name, 0o700, dir_fd=fd)
            sub = os.open(p.parent.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                os.fchmod(sub, 0o700)
                write_new(sub, p.name, text, 0o600)
            finally:
                os.close(sub)
    finally:
        os.close(fd)
    return {"cluster_key": key, "hai_secret": secret}


def _lexists_in(dir_fd: int, rel: Path) -> bool:
    try:
        os.stat(str(rel), dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return True


def admin_token_hint(st: dict, cluster_file: str | os.PathLike, run_dir: Path | None) -> str | None:
    """Where the API node's admin token is and how to use it, for ``hai cluster up`` to print; None
    when this launcher does not run the API."""
    api = [s for s in st.get("services", []) if s.get("module") == "haiplatform.api"]
    if not api:
        return None
    rd = Path(st.get("run_dir") or run_dir or "")
    tok = rd / "hai" / "admin.token"
    url = f"http://{api[0]['address']}:{api[0]['port']}"
    env = f"export HAI_CLUSTER={Path(cluster_file).resolve()}"
    if run_dir is not None:
        env += f" HAI_RUN_DIR={Path(run_dir).resolve()}"
    return (f"admin token: {tok} (readable by this account only)\n"
            f"use it:  {env}\n"
            f"    or:  hai init --token-file {tok} --url {url}")


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


def _dirs_above(path: str | os.PathLike) -> list[Path]:
    """The directories above ``path``, from the root down, both as written and with links resolved
    (a venv's ``bin/python`` is a link: a job must pass the venv's directories and the real Python's)."""
    out: list[Path] = []
    for p in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        out.extend(d for d in reversed(p.parents) if d not in out)
    return out


def blocked_for_others(path: str | os.PathLike) -> Path | None:
    """The first directory above ``path`` that other accounts cannot pass (no o+x), or None."""
    for parent in _dirs_above(path):
        with contextlib.suppress(OSError):
            if not os.stat(parent).st_mode & 0o001:
                return parent
    return None


def pass_for_jobs(*paths: str | os.PathLike) -> list[Path]:
    """Let other accounts pass (o+x: enter, never list or read) every directory above each of
    ``paths`` that this account owns; returns the directories changed. Tests and the demo use it so
    that jobs, which run as their users' accounts, can run this Python (on the development machines
    it lies under /root; a fresh clone may lie in a 0700 temporary directory) and reach the
    repository's code and the files of a test."""
    changed: list[Path] = []
    if os.geteuid() != 0:  # jobs then run as this account (the launcher says so): nothing to open
        return changed
    for path in paths:
        for parent in _dirs_above(path):
            with contextlib.suppress(OSError):
                st = os.stat(parent)
                if not st.st_mode & 0o001 and st.st_uid == os.geteuid():
                    os.chmod(parent, stat.S_IMODE(st.st_mode) | 0o001)
                    changed.append(parent)
    return changed


def _job_reachable(run_dir: Path, jobs: bool = True) -> None:
    """Make the run directory passable (0711) for jobs, which run as other accounts when the launcher
    is root and must reach RUN_DIR/cluster.toml and their control directories; warn when a parent
    directory (a 0700 temporary directory, /root) stops them, or this Python's."""
    if os.stat(run_dir).st_uid == os.geteuid():
        os.chmod(run_dir, 0o711)
    if os.geteuid() != 0 and jobs:
        log.warning("the launcher does not run as root: the agents will run jobs as this account (uid %d), not "
                    "as their users' accounts, and jobs can read the platform's secrets; run it as root to "
                    "keep them apart (docs/haiplatform.md, 'Jobs run as their users')", os.geteuid())
    if os.geteuid() != 0 or not jobs:
        return
    for what, path in (("the run dir", run_dir), ("this Python", sys.executable)):
        blocked = blocked_for_others(path)
        if blocked is not None:
            log.warning("jobs run as their users' accounts cannot reach %s (%s): %s is mode %o; they need o+x "
                        "on every directory above it (chmod o+x %s, or use a run dir / a Python elsewhere)",
                        what, path, blocked, os.stat(blocked).st_mode & 0o7777, blocked)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def check_health(how: str, addr: str, port: int, credential: Credential | None = None) -> bool:
    """One health check of a service endpoint (see deploy.services for the kinds).

    ``rpc`` pings with ``credential`` (an authenticated call); without one (a user who cannot
    read the cluster key asks for the status) it checks that the port accepts connections."""
    try:
        if how == "rpc" and credential is None:
            socket.create_connection((addr, port), timeout=1.0).close()
        elif how == "rpc":
            ping(addr, port, timeout=1.0, credential=credential)
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
                 health_timeout: float = 30.0, stop_timeout: float = 10.0,
                 restart: bool | RestartPolicy = True, monitor: bool = True, node: str | None = None,
                 netns: bool | None = None, key_file: str | os.PathLike | None = None) -> None:
        """``restart``: the policy for crashed services (True: the default :class:`RestartPolicy`,
        False: never restart), which a ``[[service]]`` entry may override (:mod:`deploy.restart`);
        ``monitor``: run a thread that carries it out (``supervise()`` runs :meth:`tick` itself);
        ``node``: run only that node's services (one host of a multi-host cluster, see
        :func:`node_state_dir`); ``netns``: every node in its own network namespace
        (:mod:`deploy.netns`; None: ``$FIREFLYER_NETNS`` = 1, the tests' ``--netns``);
        ``key_file``: the cluster key to use (an admin's provisioned key) instead of the run dir's."""
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
        if node is not None and node not in self.source.ordered():
            raise LauncherError(f"{cluster_file}: no node {node!r}; its nodes: {', '.join(self.source.ordered())}")
        self.node = node
        self.state_dir = node_state_dir(self.run_dir, node)
        self.netns = netns_requested() if netns is None else netns
        if self.netns and node is not None:
            raise LauncherError("--netns and --node do not combine: --netns runs every node of the description "
                                "on this machine, each in its own namespace; leave out --node (or --netns)")
        self.key_file = Path(key_file).resolve() if key_file else None
        self.nc = None  # the NetnsCluster while the namespaces exist
        self.env = dict(env or {})
        self.health_timeout = health_timeout
        self.stop_timeout = stop_timeout
        self.cluster: Cluster | None = None
        self.cluster_file: Path | None = None
        self.credential: Credential | None = None  # the cluster key (made by _resolve)
        self.procs: dict[str, subprocess.Popen] = {}
        self.info: dict[str, ProcInfo] = {}
        self._atexit = False
        if isinstance(restart, bool):
            restart = RestartPolicy() if restart else RestartPolicy(restart="no")
        self.restart_policy = restart
        self.policies: dict[str, RestartPolicy] = {}
        for s in self.source.services:
            try:
                self.policies[s.module] = policy_from_options(s.options, restart, f"{cluster_file}: service {s.module}")
            except ValueError as exc:
                raise LauncherError(str(exc)) from None
        self.monitor = monitor
        self.exclusive = False  # supervise(): claim the state dir in up() (_claim)
        # Supervision state, guarded by _lock (the monitor thread and the caller's thread share it).
        self._lock = threading.RLock()
        self._held: set[str] = set()  # stopped on purpose (kill, stop, down): not restarted until start()
        self._busy: set[str] = set()  # a caller's start() waits for this one's health: it reports the exit
        self._reaped: set[str] = set()  # whose current process's exit has been dealt with
        self._history: dict[str, History] = {}
        self._started_at: dict[str, float] = {}  # monotonic
        self._files: dict[str, str | os.PathLike | None] = {}  # the cluster_file each was started with
        self._due: dict[str, float] = {}  # restarting: start again at this monotonic time
        self._starting: dict[str, float] = {}  # restarted: healthy by this monotonic time, else killed
        self._stopping = False
        self._monitor_stop = threading.Event()
        self._monitor_thread: threading.Thread | None = None

    # -- resolution ------------------------------------------------------------------------------
    def _resolve(self) -> Cluster:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "cluster.toml"
        # [Note: one resolution per run dir] The node trees of one run dir (``up --node`` on one
        # machine) must agree on every port and on the key: the first resolves the whole
        # description, the others reuse it while one of them lives (a lock orders racing starts).
        with _locked(self.run_dir / "resolve.lock"):
            if self.node is not None and self._shared_resolution(path):
                log.info("%s: reusing %s, resolved by a running node of this run dir", self.node, path)
            else:
                self._resolve_fresh(path)
            self.cluster_file = path
            if self.node is not None:
                self._write_state("starting")  # from now on the other nodes reuse this resolution
        self.cluster_file = path
        cluster = load_cluster(path)
        try:
            self.credential = load_cluster_key(cluster)
        except AuthError as exc:
            raise LauncherError(str(exc)) from None
        if self.env.get(INSECURE_ENV) == "1":  # a benchmark's cluster without authentication
            self.credential = NO_AUTH
        return cluster

    def _claim(self) -> None:
        """Under the run dir's lock: AlreadyRunning when another supervisor runs this state dir (or
        the whole cluster over node trees, or the other way round); else write ``starting``.

        [Note: the check is the supervisor's] ``cluster_up`` checks before it spawns, but two
        racing ``up`` both pass that check; the supervisors then decide here, one at a time, and
        the loser exits without touching the state file (the winner's)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.run_dir / "resolve.lock"):
            def rival(st: dict | None) -> int | None:
                pid = (st or {}).get("supervisor_pid")
                if (st or {}).get("state") in ("starting", "up") and isinstance(pid, int) and pid != os.getpid() \
                        and pid_alive(pid) and _is_supervisor_of(pid, self.run_dir):
                    return pid
                return None

            what = f"node {self.node} of cluster {self.source.name}" if self.node else f"cluster {self.source.name}"
            pid = rival(_read_state(self.state_dir))
            if pid:
                raise AlreadyRunning(f"{what} is already up (supervisor pid {pid}, run dir {self.run_dir})")
            if self.node is not None and (pid := rival(_read_state(self.run_dir))):
                raise AlreadyRunning(f"cluster {self.source.name} runs whole in {self.run_dir} (supervisor pid {pid})")
            if self.node is None:
                trees = [t for t in _live_node_states(self.run_dir) if rival(t)]
                if trees:
                    raise AlreadyRunning(f"cluster {self.source.name} runs node by node in {self.run_dir} (nodes "
                                         f"{', '.join(str(t.get('node')) for t in trees)})")
            self._write_state("starting")

    def _shared_resolution(self, path: Path) -> bool:
        """Whether ``path`` was resolved from this description by a node tree of this run dir that
        still runs (its ports and key are then this node's too)."""
        try:
            head = path.read_text().split("\n", 1)[0]
        except OSError:
            return False
        live = [st for st in _live_node_states(self.run_dir)
                if st.get("node") != self.node and st.get("cluster_file") == str(path)]
        if not live:
            return False
        nodes = ", ".join(str(st.get("node")) for st in live)
        if head != _resolved_header(self.source.source):
            # [Note: never re-resolve under running nodes] a new resolution would give them new
            # ports (and perhaps another key) in the file they and their jobs read
            raise LauncherError(f"{path} was {head.removeprefix('# ')[:200]}, and nodes {nodes} of this run dir "
                                f"run on it; node {self.node} must use the same description "
                                f"({self.source.source} differs), or another --run-dir")
        resolved = load_cluster(path)
        have = resolved.raw.get("security", {}).get("key_file")
        if self.key_file is not None and have and Path(have).resolve() != self.key_file:
            raise LauncherError(f"--key-file {self.key_file}: nodes {nodes} of this run dir run with the key {have} "
                                f"({path}); give that one, or none")
        if self.ports == "file":
            differ = [s.module for s in self.source.services if s.port and resolved.service(s.module)
                      and resolved.service(s.module).port != s.port]
            if differ:
                log.warning("%s: ports of the description ignored for %s: nodes %s of this run dir resolved "
                            "them (--ports auto) in %s", self.node, ", ".join(differ), nodes, path)
        return True

    def _resolve_fresh(self, path: Path) -> None:
        raw = json.loads(json.dumps(self.source.raw))  # deep copy of plain TOML data
        if self.nc is not None:  # each node's address inside its namespace
            for nd in raw.get("node", []):
                nd["address"] = self._netns_addrs[nd["name"]]
        rng = random.Random(os.getpid() ^ time.monotonic_ns())
        taken: set[int] = set()
        for sv in raw.get("service", []):
            if self.ports == "auto" or sv.get("port", 0) == 0:
                svc = self.source.service(sv["module"])
                # fresh namespaces have every port free (and their addresses are not bindable here)
                addrs = [] if self.nc is not None else sorted({self.source.node(n).address for n in svc.nodes})
                sv["port"] = _pick_port(addrs, taken, rng)
                taken.add(sv["port"])
        _job_reachable(self.run_dir, jobs=self.source.service("haiplatform.agent") is not None)
        for private in ("logs", "data"):  # the services' logs and fs3's data: theirs only
            (self.run_dir / private).mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.run_dir / private, 0o700)
        sec = raw.setdefault("security", {})
        if self.key_file is not None:  # the admin's provisioned key (hai cluster keygen)
            sec["key_file"] = str(self.key_file)
        elif sec.get("key_file"):  # the source names its key: keep it, as an absolute path
            sec["key_file"] = str(cluster_key_path(self.source))
        else:
            # [Note: a key per run directory] made once, kept across restarts of the cluster (a
            # client that holds it keeps working); mode 0600 in a 0700 directory
            secrets_dir = self.run_dir / "secrets"
            secrets_dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(secrets_dir, 0o700)
            if not (secrets_dir / "cluster.key").exists():
                new_cluster_key().save(secrets_dir / "cluster.key")
                if self.node is not None:  # fine on one machine; on N hosts each would make its own
                    log.warning("%s: made a new cluster key in %s; every host of the cluster must hold the same "
                                "one (hai cluster keygen, then copy it into each run dir, or --key-file)",
                                self.node, secrets_dir / "cluster.key")
            # absolute: a test or tool that copies the resolved description elsewhere still finds it
            sec["key_file"] = str((secrets_dir / "cluster.key").resolve())
        tmp = path.with_name("cluster.toml.tmp")
        tmp.write_text(_resolved_header(self.source.source) + "\n" + dump_cluster(raw))
        os.chmod(tmp, 0o644)  # every job reads it (HAI_CLUSTER_FILE); it holds no secret
        os.replace(tmp, path)

    def instances(self) -> list[tuple[str, str]]:
        """(module, node) pairs to run, in start order."""
        c = self.cluster or self.source
        out = []
        for pos, s in enumerate(c.services):
            if self.only is not None and s.module not in self.only:
                continue
            for n in c.ordered(s.nodes):
                if self.node is None or n == self.node:
                    out.append((kind_of(s.module).order, pos, s.module, n))
        out.sort(key=lambda t: (t[0], t[1]))
        return [(m, n) for _, _, m, n in out]

    # -- lifecycle -------------------------------------------------------------------------------
    def up(self) -> LocalCluster:
        """Start every service and wait until each is healthy (ServiceFailed otherwise; all stopped)."""
        if self.procs:
            raise LauncherError("cluster is already up")
        if self.exclusive:
            self._claim()
        if self.netns:
            self._netns_up()
        try:
            self.cluster = self._resolve()
        except BaseException:
            self._netns_down()
            raise
        with self._lock:
            self._stopping = False
            for d in (self.info, self._held, self._busy, self._reaped, self._history, self._due, self._starting):
                d.clear()
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
        if self.monitor:
            self._monitor_stop.clear()
            self._monitor_thread = threading.Thread(target=self._monitor_loop, daemon=True,
                                                    name=f"deploy.local monitor {self.source.name}")
            self._monitor_thread.start()
        return self

    def start(self, module: str, node: str, wait: bool = True, *, cluster_file: str | os.PathLike | None = None
              ) -> ProcInfo:
        """Start (or restart) one service instance; ``cluster_file`` gives it another description
        than the cluster's (the same nodes and services: say, one that reaches a peer through a
        relay a test can cut). The instance is supervised again (a :meth:`kill` hold ends); one that
        fails to start raises ServiceFailed and is left alone (the caller has the error)."""
        key = f"{module}@{node}"
        with self._lock:
            info = self._spawn(module, node, cluster_file)
            if wait:
                self._busy.add(key)
        if not wait:
            return info
        try:
            self.wait_healthy(key)
        except BaseException:
            with self._lock:
                self._held.add(key)
            raise
        finally:
            with self._lock:
                self._busy.discard(key)
        return info

    def _spawn(self, module: str, node: str, cluster_file: str | os.PathLike | None = None) -> ProcInfo:
        """Start the process of one instance (the caller holds ``_lock``); its counters carry over."""
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
        if self.nc is not None:
            cmd = self.nc.wrap(node, cmd)  # runs it inside the node's namespace (exec: the same pid)
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
        prev = self.info.get(key)
        if prev is not None:
            info.restarts, info.last_exit, info.last_exit_at = prev.restarts, prev.last_exit, prev.last_exit_at
        self.info[key] = info
        self._held.discard(key)
        self._reaped.discard(key)
        self._due.pop(key, None)
        self._starting.pop(key, None)
        self._started_at[key] = time.monotonic()
        self._files[key] = cluster_file  # a restart after a crash runs it the same way
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
            if check_health(how, info.address, info.port, self.credential):
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

        [Note: a deliberate crash is not restarted] Tests crash a service to test failover; the
        supervisor must not bring it back behind their back. Any signal but SIGSTOP, SIGCONT and
        SIGTSTP holds the instance: it is not restarted until :meth:`start`. To test the
        supervisor itself, kill the process directly (``os.killpg(info.pid, SIGKILL)``).
        """
        key = f"{module}@{node}"
        if sig not in _NOT_FATAL:
            self._hold([key])
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

    def _hold(self, keys: list[str]) -> None:
        """Stopped on purpose: not restarted (no pending back-off, no health follow-up) until start()."""
        with self._lock:
            for k in keys:
                self._held.add(k)
                self._due.pop(k, None)
                self._starting.pop(k, None)

    def _stop_many(self, keys: list[str]) -> None:
        self._hold(keys)
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
        with self._lock:
            self._stopping = True
        self._monitor_stop.set()
        t = self._monitor_thread
        if t is not None and t is not threading.current_thread():
            t.join(self.health_timeout + 5)  # a step's waits are bounded (health checks: 1 s each)
            if t.is_alive():
                log.warning("the monitor thread of %s did not stop within %s s", self.source.name,
                            self.health_timeout + 5)
        self._monitor_thread = None
        if self.procs:
            keys = list(self.procs)
            self._stop_many(list(reversed(keys)))
            self.procs.clear()
            if self.run_dir.exists():
                self._write_state("down")
        self._netns_down()

    # -- network namespaces ----------------------------------------------------------------------
    def _netns_up(self) -> None:
        """Create the namespace cluster (deploy.netns) and record it in RUN_DIR/netns.json before
        anything runs in it, so a launcher that dies leaves something the next up/down removes."""
        from . import netns as _netns

        why = _netns.unavailable()
        if why:
            raise LauncherError(f"network namespaces are not available here: {why}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_netns(self.run_dir)
        nc = _netns.NetnsCluster(self.source, uuid.uuid4().hex[:6])
        _write_json(self.run_dir / NETNS_STATE, _netns_record(os.getpid(), nc))
        self.nc = nc
        try:
            self._netns_addrs = nc.up()
        except BaseException as exc:
            self._netns_down()
            if isinstance(exc, _netns.NetnsError):
                raise LauncherError(f"could not create the namespace cluster: {exc}") from None
            raise
        log.info("namespace cluster up: %s (this host at %s)", self._netns_addrs, nc.host_address)

    def _netns_down(self) -> None:
        nc, self.nc = self.nc, None
        if nc is None:
            return
        # the record goes only once the namespaces are gone: it is what a later up/down cleans from
        _netns_remove(nc, self.run_dir / NETNS_STATE)
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / NETNS_STATE).unlink()

    def status(self) -> list[ProcInfo]:
        """Each instance with a fresh health check of the running ones; an exit is folded in first
        (restarting, failed or exited, as the restart policy says)."""
        changed = self._reap(time.monotonic())
        out = []
        for key, info in list(self.info.items()):
            proc = self.procs.get(key)
            # None: stopped by down(); exited: _reap() set the state (or a start() in progress will)
            if proc is not None and proc.poll() is None and info.state != "stopped":
                how = health_of(self.cluster or self.source, info.module)
                ok = check_health(how, info.address, info.port, self.credential)
                with self._lock:
                    if self.procs.get(key) is proc and proc.poll() is None:
                        info.state = "healthy" if ok else "starting" if key in self._starting else "unhealthy"
            out.append(info)
        # [Note: a zombie is not yet waitable] /proc shows a killed multi-threaded process as a zombie
        # before waitpid() can collect it (the kernel waits for its other threads to exit), so an
        # exit first seen by a poll() above is folded in here, not at the next step.
        if (self._reap(time.monotonic()) or changed) and self.procs:
            self._write_state("up")
        return out

    def degraded(self) -> list[ProcInfo]:
        """The instances that are not healthy (after a fresh :meth:`status`)."""
        return [i for i in self.status() if i.state != "healthy"]

    # -- supervision -----------------------------------------------------------------------------
    # [Note: supervision is a step function] tick() does one step without blocking for long: fold
    # exits into states (_reap, bookkeeping only), start the instances whose back-off is over,
    # check the restarted ones' health. A monitor thread runs it for a LocalCluster in a Python
    # process; the detached supervisor runs it in its main loop between control requests, so the
    # processes it starts die with it (PDEATHSIG follows the thread that started a child).

    def _monitor_loop(self) -> None:
        while not self._monitor_stop.wait(_TICK):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the monitor must outlive a bad step (its children die with it)
                log.exception("supervision step of %s failed; continuing", self.source.name)

    def _reap(self, now: float) -> bool:
        """Fold the exits of instances into their states; starts nothing. True when a state changed."""
        changed = False
        with self._lock:
            for key, proc in list(self.procs.items()):
                if key in self._reaped or key in self._busy:
                    continue
                rc = proc.poll()
                if rc is None:
                    continue
                self._reaped.add(key)
                self._starting.pop(key, None)
                info = self.info[key]
                info.returncode = rc
                changed = True
                if self._stopping or key in self._held:
                    if info.state != "stopped":
                        info.state = f"exited({rc})"
                    continue
                info.last_exit, info.last_exit_at = rc, time.time()
                policy = self.policies.get(info.module, self.restart_policy)
                dec, self._history[key] = decide(policy, rc, now - self._started_at.get(key, now),
                                                 self._history.get(key, History()), now)
                if dec.action == "restart":
                    info.state, info.reason = "restarting", ""
                    self._due[key] = now + dec.delay
                    info.next_start_at = time.time() + dec.delay
                    log.warning("%s %s", key, dec.reason)
                elif dec.action == "fail":
                    info.state, info.reason = "failed", dec.reason
                    log.error("%s failed: %s; not restarted ('hai cluster restart' starts it again)", key, dec.reason)
                else:
                    info.state = f"exited({rc})"
                    log.info("%s %s", key, dec.reason)
        return changed

    def tick(self) -> None:
        """One supervision step: fold exits in, start again the instances whose back-off is over,
        follow the restarted ones to health (killed, and so crashed, after ``health_timeout``)."""
        now = time.monotonic()
        changed = self._reap(now)
        with self._lock:
            due = [k for k, t in self._due.items() if t <= now]
        for key in due:
            with self._lock:
                if self._stopping or key in self._held or self._due.get(key, now + 1) > now:
                    continue
                old = self.info[key]
                try:
                    info = self._spawn(old.module, old.node, self._files.get(key))
                except (LauncherError, OSError) as exc:
                    self._due.pop(key, None)
                    old.state, old.reason = "failed", f"could not start it again: {exc}"
                    log.error("%s: %s", key, old.reason)
                    changed = True
                    continue
                info.restarts += 1
                self._starting[key] = now + self.health_timeout
                changed = True
            log.warning("%s started again (pid %s, restart %d)", key, info.pid, info.restarts)
        with self._lock:
            starting = [(k, self.procs[k], t) for k, t in self._starting.items()]
        for key, proc, deadline in starting:
            if proc.poll() is not None:
                continue  # the next _reap counts it
            info = self.info[key]
            ok = check_health(health_of(self.cluster or self.source, info.module), info.address, info.port,
                              self.credential)
            with self._lock:
                if self._starting.get(key) != deadline or self.procs.get(key) is not proc:
                    continue  # stopped or started by someone else meanwhile
                if ok:
                    del self._starting[key]
                    info.state = "healthy"
                    changed = True
                elif time.monotonic() > deadline:
                    del self._starting[key]
                    log.error("%s did not pass its health check within %s s of its restart; killing it",
                              key, self.health_timeout)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        if changed and not self._stopping:
            self._write_state("up")

    def _instance_keys(self, module: str, node: str | None) -> list[str]:
        """The instances of ``module`` this launcher runs (on ``node``), in start order; a clear
        LauncherError for an unknown service or node."""
        c = self.cluster or self.source
        svc = c.service(module)
        if svc is None:
            raise LauncherError(f"no service {module!r} in cluster {c.name}; its services: "
                                f"{', '.join(s.module for s in c.services)}")
        keys = [f"{m}@{n}" for m, n in self.instances() if m == module and f"{m}@{n}" in self.info]
        if not keys:
            raise LauncherError(f"service {module} is not running in cluster {c.name} (not started: "
                                f"the cluster was brought up with other --service options)")
        if node is None:
            return keys
        if node not in c.ordered():
            raise LauncherError(f"no node {node!r} in cluster {c.name}; its nodes: {', '.join(c.ordered())}")
        if f"{module}@{node}" not in keys:
            raise LauncherError(f"service {module} does not run on node {node}; it runs on "
                                f"{', '.join(k.split('@', 1)[1] for k in keys)}")
        return [f"{module}@{node}"]

    def restart(self, module: str, node: str | None = None) -> list[ProcInfo]:
        """An admin's restart (``hai cluster restart``): stop ``module`` on ``node``, or on each of
        its nodes one at a time, and start it again, waiting for health before the next one. A
        failed instance starts afresh (its start limit too). ServiceFailed stops the round."""
        out = []
        for key in self._instance_keys(module, node):
            m, n = key.split("@", 1)
            self.stop(m, n)
            with self._lock:
                self._history.pop(key, None)
                self.info[key].reason = ""
            out.append(self.start(m, n))
        return out

    def _write_state(self, state: str) -> None:
        with self._lock:
            data = {"state": state, "cluster": self.source.name, "source": self.source.source,
                    "cluster_file": str(self.cluster_file), "supervisor_pid": os.getpid(), "node": self.node,
                    "netns": self.nc is not None, "services": [asdict(i) for i in self.info.values()]}
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.state_dir / "state.json", data)

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


def wait_until(pred, timeout: float = 30.0, what: str = "condition", poll: float = 0.05,
               error: type[Exception] = TimeoutError):
    """Call ``pred`` until it returns something true (returned) or ``timeout`` seconds passed
    (``error`` naming ``what``): the one bounded wait of the demo and the tests."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def _control_dir(run_dir: Path) -> Path:
    return run_dir / "control"


def _serve_control(lc: LocalCluster, control: Path) -> None:
    """Answer the requests waiting in ``control`` (``ID.req`` -> ``ID.reply``), one at a time.

    [Note: the control channel] ``hai cluster restart`` writes a request file (atomically: write
    ``ID.req.tmp``, rename) into ``RUN_DIR/control`` and waits for ``ID.reply``; the supervisor
    looks there every step and answers with the same atomic rename. Files need no socket server
    in the supervisor, survive a client that gives up (its request is withdrawn or answered into
    a file nobody reads, removed at the next start), and are guarded by the run dir's permissions,
    as the state file is. Whoever may write there may also stop the cluster.
    """
    for req in sorted(control.glob("*.req")):
        try:
            r = json.loads(req.read_text())
        except (OSError, ValueError) as exc:
            answer = {"ok": False, "error": f"unreadable request {req.name}: {exc}"}
        else:
            answer = _answer(lc, r)
        with contextlib.suppress(FileNotFoundError):
            req.unlink()
        tmp = control / f"{req.stem}.reply.tmp"
        tmp.write_text(json.dumps(answer, indent=1))
        os.replace(tmp, control / f"{req.stem}.reply")


def _answer(lc: LocalCluster, r: dict) -> dict:
    if not isinstance(r, dict) or r.get("op") != "restart" or not isinstance(r.get("service"), str) \
            or not isinstance(r.get("node"), str | None):
        return {"ok": False, "error": f"bad request {r!r}: expected op 'restart', a service and an optional node"}
    done: list[dict] = []
    try:
        keys = lc._instance_keys(r["service"], r.get("node"))
        for key in keys:
            old = lc.info[key].pid
            log.info("restarting %s (asked by hai cluster restart)", key)
            info = lc.restart(*key.split("@", 1))[0]
            done.append({**asdict(info), "old_pid": old})
            lc._write_state("up")
        return {"ok": True, "restarted": done}
    except LauncherError as exc:
        lc._write_state("up")
        return {"ok": False, "error": str(exc), "restarted": done}


def supervise(cluster_file: str, run_dir: Path, ports: str, services: list[str] | None,
              restart: str = "on-failure", node: str | None = None, netns: bool = False,
              key_file: str | None = None) -> int:
    """Run the cluster (or ``node``'s part of it) in the foreground until SIGTERM / SIGINT (the
    detached supervisor's body): restart crashed services (:meth:`LocalCluster.tick`) and answer
    ``hai cluster restart``."""
    lc = LocalCluster(cluster_file, run_dir, ports=ports, services=services, monitor=False,
                      restart=RestartPolicy(restart=restart), node=node, netns=netns, key_file=key_file)
    lc.exclusive = True
    control = _control_dir(lc.state_dir)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        control.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in control.iterdir():  # requests and replies of an earlier supervisor
            with contextlib.suppress(OSError):
                stale.unlink()
        lc.up()
        what = f"node {node} of cluster {lc.source.name}" if node else f"cluster {lc.source.name}"
        print(f"{what} is up; run dir {run_dir}", flush=True)
        while True:
            time.sleep(_TICK)
            lc.tick()
            _serve_control(lc, control)
    except KeyboardInterrupt:
        print("stopping...", flush=True)
        return 0
    except AlreadyRunning as exc:  # lost a race to another supervisor: its state file is left alone
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except (ServiceFailed, LauncherError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        data = {"state": "failed", "error": str(exc), "supervisor_pid": os.getpid(), "node": node}
        lc.state_dir.mkdir(parents=True, exist_ok=True)
        _write_json(lc.state_dir / "state.json", data)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        lc.down()


def _run_dir_of(cluster_file: str | os.PathLike, run_dir: Path | None) -> tuple[Cluster, Path]:
    c = load_cluster(cluster_file)
    return c, Path(run_dir) if run_dir else default_run_dir(c.name)


def _supervisor_alive(st: dict | None) -> bool:
    return bool(st) and pid_alive(st.get("supervisor_pid", -1))


def cluster_up(cluster_file: str, run_dir: Path | None = None, ports: str = "file",
               services: list[str] | None = None, timeout: float = 120.0, restart: str = "on-failure", *,
               node: str | None = None, netns: bool = False, key_file: str | os.PathLike | None = None) -> dict:
    """Start a detached supervisor for the cluster (or for ``node``'s services only) and wait until
    it is up (or failed). ``cluster_file`` may be relative: the supervisor gets it absolute."""
    if restart not in ("on-failure", "no"):
        raise LauncherError(f"restart must be 'on-failure' or 'no', not {restart!r}")
    if key_file is not None and not Path(key_file).is_file():
        raise LauncherError(f"--key-file {key_file}: no such file (make one with 'hai cluster keygen --out DIR')")
    cluster_file = str(Path(cluster_file).resolve())
    lc = LocalCluster(cluster_file, run_dir, ports=ports, services=services, node=node, netns=netns,
                      key_file=key_file)  # a bad service entry or node: an error here
    c, run_dir = lc.source, lc.run_dir
    state_dir = lc.state_dir
    st = _read_state(state_dir)
    if st and st.get("state") in ("starting", "up") and _supervisor_alive(st):
        what = f"node {node} of cluster {c.name}" if node else f"cluster {c.name}"
        raise LauncherError(f"{what} is already up (supervisor pid {st['supervisor_pid']}, run dir {run_dir}); run "
                            f"'hai cluster down --cluster {cluster_file}{f' --node {node}' if node else ''}' first")
    whole = _read_state(run_dir)
    if node is not None and whole and whole.get("state") == "up" and _supervisor_alive(whole):
        raise LauncherError(f"cluster {c.name} runs whole in {run_dir} (supervisor pid {whole['supervisor_pid']}): "
                            f"stop it before starting it node by node, or use another --run-dir")
    trees = _live_node_states(run_dir)
    if node is None and trees:
        raise LauncherError(f"cluster {c.name} runs node by node in {run_dir} (nodes "
                            f"{', '.join(str(t.get('node')) for t in trees)}): 'hai cluster down' stops them")
    if netns:
        clean_stale_netns(run_dir)
    if node is not None and ports == "auto" and not trees:
        log.warning("--ports auto with --node: node %s picks free ports on this machine; the other nodes reuse "
                    "them only from this run dir. On several hosts each would pick its own: give the services "
                    "fixed ports in the description", node)
    if node is not None:
        _warn_missing_secret(lc.source, run_dir, node)
    state_dir.mkdir(parents=True, exist_ok=True)
    # the state file is not removed here: a racing up's supervisor may have just written it (the
    # wait below reads only this supervisor's own state)
    cmd = [sys.executable, "-m", "deploy.local", "supervise", "--cluster", cluster_file,
           "--run-dir", str(run_dir), "--ports", ports, "--restart", restart]
    for s in services or []:
        cmd += ["--service", s]
    if node is not None:
        cmd += ["--node", node]
    if netns:
        cmd += ["--netns"]
    if key_file is not None:
        cmd += ["--key-file", str(Path(key_file).resolve())]
    with open(state_dir / "supervisor.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=os.getcwd())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _read_state(state_dir)
        if st and st.get("supervisor_pid") == proc.pid and st.get("state") in ("up", "failed"):
            if st["state"] == "failed":
                proc.wait(30)
                raise ServiceFailed(st.get("error", "cluster failed to start"))
            return st
        if proc.poll() is not None:
            raise LauncherError(f"supervisor exited with code {proc.returncode}; see {state_dir / 'supervisor.log'}:\n"
                                f"{_tail(state_dir / 'supervisor.log')}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    raise LauncherError(f"cluster did not come up within {timeout} s; see {state_dir}")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (OSError, ValueError, TypeError):
        return []


def _is_supervisor_of(pid: int, run_dir: Path) -> bool:
    """Whether process ``pid`` is ``python -m deploy.local supervise ... --run-dir RUN_DIR`` (a state
    file's pid may by now be a process that has nothing to do with this cluster)."""
    argv = _cmdline(pid)
    if "deploy.local" not in argv or "supervise" not in argv or "--run-dir" not in argv:
        return False
    i = argv.index("--run-dir")
    if i + 1 >= len(argv):
        return False
    try:  # a relative --run-dir is relative to the supervisor's working directory
        given = Path(os.readlink(f"/proc/{pid}/cwd")) / argv[i + 1]
        return os.path.realpath(given) == os.path.realpath(run_dir)
    except OSError:
        return False


def _warn_missing_secret(c: Cluster, run_dir: Path, node: str) -> None:
    """On real hosts an agent's or the scheduler's host needs the platform's secret of the API's host
    (RUN_DIR/hai/cluster.secret, from ``hai cluster keygen``): one that lacks it makes its own, and
    the API refuses that host with a plain authentication error. Say so before it happens."""
    mods = {s.module for s in c.services if s.runs_on(node)}
    if not mods & {"haiplatform.agent", "haiplatform.scheduler"} or "haiplatform.api" in mods:
        return
    if c.section("haiplatform").get("cluster_secret") or (run_dir / "hai" / "cluster.secret").exists():
        return
    log.warning("node %s: %s does not exist; its agent/scheduler will make a new platform secret, which the API "
                "refuses unless it runs from this same run dir: copy hai/cluster.secret of 'hai cluster keygen' "
                "(or of the API's host) there first", node, run_dir / "hai" / "cluster.secret")


def _stop_tree(st: dict | None, timeout: float, run_dir: Path) -> bool:
    """Stop one supervisor (SIGTERM, SIGKILL after ``timeout``) and make sure its services are gone.

    [Note: only a live tree of this run dir] A state file outlives its supervisor (a crash, a
    reboot) and the pids it names may since have been given to other processes; ``down`` runs as
    root. So only a tree that says starting or up is stopped, and only when its pid is still
    ``deploy.local supervise --run-dir RUN_DIR`` (and a service's pid still runs its module)."""
    st = st or {}
    pid = st.get("supervisor_pid")
    if st.get("state") not in ("starting", "up") or not pid or not pid_alive(pid):
        return False
    if not _is_supervisor_of(pid, run_dir):
        log.warning("pid %s of %s is not the supervisor of %s (any more): not signalled", pid,
                    st.get("node") or "the cluster", run_dir)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    # services die with their supervisor (PDEATHSIG); make sure of it
    for svc in st.get("services", []):
        spid = svc.get("pid")
        if spid and pid_alive(spid) and svc.get("module") in _cmdline(spid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(spid, signal.SIGKILL)
    return True


def cluster_down(cluster_file: str, run_dir: Path | None = None, timeout: float = 60.0, *,
                 node: str | None = None) -> bool:
    """Stop the detached supervisor (and so every service): ``node``'s tree, or the whole cluster
    and every node tree of the run dir. Returns False when nothing was running. Namespaces left by a
    launcher that died are removed either way (:func:`cluster_down_report` says so)."""
    return cluster_down_report(cluster_file, run_dir, timeout, node=node)["stopped"]


def cluster_down_report(cluster_file: str, run_dir: Path | None = None, timeout: float = 60.0, *,
                        node: str | None = None) -> dict:
    """:func:`cluster_down`, saying what it did: ``stopped`` (a supervisor was stopped) and
    ``netns_removed`` (the tag of a dead launcher's namespace cluster it removed, or None)."""
    c, run_dir = _run_dir_of(cluster_file, run_dir)
    if node is not None:
        if node not in c.ordered():
            raise LauncherError(f"{cluster_file}: no node {node!r}; its nodes: {', '.join(c.ordered())}")
        return {"stopped": _stop_tree(_read_state(node_state_dir(run_dir, node)), timeout, run_dir),
                "netns_removed": None}
    stopped = _stop_tree(_read_state(run_dir), timeout, run_dir)
    for d in sorted((run_dir / "nodes").glob("*")):
        stopped = _stop_tree(_read_state(d), timeout, run_dir) or stopped
    removed = None
    path = run_dir / NETNS_STATE
    if path.exists():
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, KeyError):
            removed = json.loads(path.read_text())["netns"]["tag"]
        if not clean_stale_netns(run_dir):
            removed = None
    return {"stopped": stopped, "netns_removed": removed}


def down_message(rep: dict) -> str:
    """What ``hai cluster down`` prints for :func:`cluster_down_report`'s answer."""
    msg = "stopped" if rep["stopped"] else "cluster was not running"
    if rep.get("netns_removed"):
        msg += f"; removed the namespace cluster ff{rep['netns_removed']}-* left by a launcher that died"
    return msg


def _live_health(st: dict, c: Cluster) -> dict:
    resolved = Path(st.get("cluster_file") or "")
    live = load_cluster(resolved) if resolved.is_file() else c
    try:
        cred = client_credential(live)
    except AuthError:
        cred = None  # this user cannot read the key: the health check is a TCP connect
    for svc in st.get("services", []):
        known = svc.get("state", "")
        if known in ("restarting", "failed", "stopped") or known.startswith("exited"):
            svc["state"] = "exited" if known.startswith("exited") else known  # the supervisor's word
            continue
        if svc.get("pid") and not pid_alive(svc["pid"]):
            svc["state"] = "exited"  # the supervisor notices within a step
            continue
        how = health_of(live, svc["module"])
        ok = check_health(how, svc["address"], svc["port"], cred)
        svc["state"] = "healthy" if ok else "starting" if known == "starting" else "unhealthy"
    if st.get("state") == "up" and any(s["state"] != "healthy" for s in st.get("services", [])):
        st["state"] = "degraded"
    return st


def cluster_status(cluster_file: str, run_dir: Path | None = None, *, node: str | None = None) -> dict:
    """The state file plus a live health check of each running service, and the cluster's state:
    ``up`` (every service healthy), ``degraded`` (the supervisor runs, some service does not:
    restarting, failed, exited, starting or unhealthy) or ``down`` (no supervisor). With ``node``:
    that node's tree; without, a cluster run node by node is shown as one (``nodes``: those up;
    ``missing``: the description's nodes without a live tree, which make it degraded)."""
    c, run_dir = _run_dir_of(cluster_file, run_dir)
    down = {"state": "down", "cluster": c.name, "run_dir": str(run_dir), "services": []}
    if node is not None:
        st = _read_state(node_state_dir(run_dir, node))
        if not _supervisor_alive(st) or st.get("state") not in ("starting", "up"):
            return {**down, "node": node}
        st = _live_health(st, c)
    else:
        st = _read_state(run_dir)
        if not _supervisor_alive(st):
            trees = [_live_health(t, c) for t in _live_node_states(run_dir)]
            if not trees:
                return down
            running = {t.get("node") for t in trees}
            # every node of the description that runs a service and has no live tree
            missing = [n for n in c.ordered() if n not in running and any(sv.runs_on(n) for sv in c.services)]
            st = {**trees[0], "node": None, "nodes": [t.get("node") for t in trees], "missing": missing,
                  "supervisor_pid": [t["supervisor_pid"] for t in trees],
                  "services": [s for t in trees for s in t.get("services", [])],
                  "state": "up" if all(t["state"] == "up" for t in trees) and not missing else "degraded"}
        else:
            st = _live_health(st, c)
    st["run_dir"] = str(run_dir)
    return st


def cluster_link(cluster_file: str, a: str, b: str, up: bool, run_dir: Path | None = None) -> list[dict]:
    """Cut (``up=False``) or restore the link between ``a`` and ``b`` (nodes, leaves, spines) of the
    namespace cluster running in the run dir (``hai cluster link``); returns every link's state."""
    c, run_dir = _run_dir_of(cluster_file, run_dir)
    path = run_dir / NETNS_STATE
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        raise LauncherError(f"cluster {c.name} does not run on network namespaces (no {path}); start it with "
                            f"'hai cluster up --netns --cluster {cluster_file}'") from None
    except (OSError, ValueError) as exc:
        raise LauncherError(f"{path}: unreadable ({exc})") from None
    if not isinstance(rec, dict):
        raise LauncherError(f"{path} is not a namespace cluster's record (a JSON object); remove the namespaces "
                            "it named by hand (ip netns list) and the file")
    if not _owner_alive(rec):
        raise LauncherError(f"the launcher of the namespace cluster in {run_dir} is gone (pid {rec.get('owner_pid')});"
                            f" 'hai cluster down --cluster {cluster_file}' removes what it left")
    from .netns import NetnsError

    nc = _netns_of(rec, path)
    try:
        nc.link(a, b, up)
        return nc.links()
    except (NetnsError, ValueError, KeyError) as exc:
        raise LauncherError(f"link {a} - {b}: {exc}") from None


def status_exit_code(st: dict) -> int:
    """The exit code of ``hai cluster status``: 0 up, 4 degraded, 3 down (or failed to start)."""
    return {"up": 0, "degraded": EXIT_DEGRADED}.get(st.get("state"), EXIT_DOWN)


def cluster_restart(cluster_file: str, service: str, node: str | None = None, run_dir: Path | None = None,
                    timeout: float | None = None) -> dict:
    """Ask the running supervisor to restart ``service`` on ``node``, or on each of its nodes one at
    a time (each healthy before the next goes down), and wait for its answer (at most ``timeout``
    seconds; default: 40 s per instance, the supervisor's stop and health timeouts, plus 15).
    A cluster run node by node: the supervisor of each node in turn.
    Returns ``{"restarted": [{..., "pid", "old_pid"}]}``; LauncherError names what went wrong."""
    c, run_dir = _run_dir_of(cluster_file, run_dir)
    st = _read_state(run_dir)
    if not (st and st.get("state") == "up" and _supervisor_alive(st)):
        trees = [t for t in _live_node_states(run_dir) if node in (None, t.get("node"))
                 and any(s.get("module") == service for s in t.get("services", []))]
        if trees:  # node by node: each node's supervisor restarts its own instance
            done: list[dict] = []
            for t in trees:
                try:
                    ans = _ask_restart(node_state_dir(run_dir, t["node"]), t, c, cluster_file, service,
                                       t["node"], timeout)
                except LauncherError as exc:
                    if not done:
                        raise
                    names = ", ".join(f"{s['module']}@{s['node']}" for s in done)
                    raise LauncherError(f"restarted {names}; then: {exc}") from None
                done += ans["restarted"]
            return {"ok": True, "restarted": done}
    return _ask_restart(run_dir, st, c, cluster_file, service, node, timeout)


def _ask_restart(state_dir: Path, st: dict | None, c: Cluster, cluster_file: str, service: str, node: str | None,
                 timeout: float | None) -> dict:
    pid = (st or {}).get("supervisor_pid")
    if not st or st.get("state") != "up" or not pid or not pid_alive(pid):
        raise LauncherError(f"cluster {c.name} is not up (state dir {state_dir}); start it with "
                            f"'hai cluster up --cluster {cluster_file}'")
    if timeout is None:  # the supervisor checks the service and the node (LocalCluster._instance_keys)
        timeout = 15.0 + 40.0 * max(1, sum(s.get("module") == service and node in (None, s.get("node"))
                                           for s in st.get("services", [])))
    control = _control_dir(state_dir)
    if not control.is_dir():
        raise LauncherError(f"{control} does not exist: the supervisor (pid {pid}) takes no requests; "
                            f"restart the cluster (hai cluster down, then up)")
    rid = uuid.uuid4().hex
    req, reply = control / f"{rid}.req", control / f"{rid}.reply"
    tmp = control / f"{rid}.req.tmp"
    tmp.write_text(json.dumps({"op": "restart", "service": service, "node": node, "asked_at": time.time()}))
    os.replace(tmp, req)
    deadline = time.monotonic() + timeout
    while not reply.exists():
        if not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                req.unlink()
            raise LauncherError(f"the supervisor (pid {pid}) exited before answering; see {state_dir / 'supervisor.log'}")
        if time.monotonic() > deadline:
            try:
                req.unlink()
                what = "did not take the request"
            except FileNotFoundError:
                what = f"took the request but did not finish restarting {service}"
            raise LauncherError(f"the supervisor (pid {pid}) {what} within {timeout:g} s; see "
                                f"{state_dir / 'supervisor.log'} and the services' logs")
        time.sleep(0.05)
    answer = json.loads(reply.read_text())
    with contextlib.suppress(FileNotFoundError):
        reply.unlink()
    if not answer.get("ok"):
        done = ", ".join(f"{s['module']}@{s['node']}" for s in answer.get("restarted", []))
        raise LauncherError((f"restarted {done}; then: " if done else "") + answer.get("error", "restart failed"))
    return answer


def _fmt_exit(rc: int | None, at: float | None) -> str:
    if rc is None:
        return "-"
    if rc < 0:
        try:
            what = signal.Signals(-rc).name
        except ValueError:
            what = f"signal {-rc}"
    else:
        what = f"status {rc}"
    return what + (time.strftime(" %H:%M:%S", time.localtime(at)) if at else "")


def render_status(st: dict) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    con = Console()
    state = st.get("state")
    scolor = {"up": "green", "degraded": "yellow"}.get(state, "red")
    where = f" node [bold]{st['node']}[/]" if st.get("node") else \
        f" (nodes {', '.join(st['nodes'])}, one supervisor each)" if st.get("nodes") else ""
    con.print(f"cluster [bold]{st.get('cluster')}[/]{where}: [{scolor}]{state}[/]  (run dir {st.get('run_dir')})")
    if st.get("missing"):
        con.print(f"[yellow]not running: node(s) {', '.join(st['missing'])}[/] ('hai cluster up --node NAME' "
                  "starts one)", soft_wrap=True)
    if not st.get("services"):
        return
    t = Table(*(Column(h, no_wrap=True) for h in ("service", "node", "address", "pid", "state", "restarts",
                                                    "last exit")), box=None, padding=(0, 1, 0, 0))
    for s in st["services"]:
        color = {"healthy": "green", "unhealthy": "yellow", "starting": "yellow",
                 "restarting": "yellow"}.get(s["state"], "red")
        t.add_row(s["module"], s["node"], f"{s['address']}:{s['port']}", str(s.get("pid")),
                  f"[{color}]{s['state']}[/]", str(s.get("restarts", 0)), _fmt_exit(s.get("last_exit"), None))
    con.print(t)
    con.print(f"logs: {Path(st['services'][0]['log']).parent}/SERVICE@NODE.log", soft_wrap=True)
    for s in st["services"]:
        key, last = f"{s['module']}@{s['node']}", _fmt_exit(s.get("last_exit"), s.get("last_exit_at"))
        if s["state"] == "restarting":
            due = max(0.0, (s.get("next_start_at") or 0.0) - time.time())
            con.print(f"[yellow]{key} restarting in {due:.1f} s[/] (last exit {last})", soft_wrap=True)
        elif s["state"] in ("failed", "exited"):
            why = f"failed: {s.get('reason') or 'see its log'}" if s["state"] == "failed" else "exited"
            con.print(f"[red]{key} {why}[/] (last exit {last}); "
                      f"'hai cluster restart {s['module']} --node {s['node']}' starts it again", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.local", description="Run a cluster description's "
                                 "services on this machine, one loopback address per node.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, hlp in (("up", "start the cluster in the background and wait until it is healthy"),
                      ("down", "stop the cluster"),
                      ("status", "show each service and its health (exit 0 up, 4 degraded, 3 down)"),
                      ("restart", "restart one service (on one node, or on each in turn) of a running cluster"),
                      ("supervise", "run the cluster in the foreground until Ctrl-C")):
        p = sub.add_parser(name, help=hlp)
        if name == "restart":
            p.add_argument("service", help="the service's module, e.g. fs3.storage")
            p.add_argument("--node", default=None, help="only on this node (default: every node, one at a time)")
            p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the supervisor")
        else:
            p.add_argument("--node", default=None, help="only this node's services (its own supervisor)")
        p.add_argument("--cluster", required=True, help="cluster description (TOML)")
        p.add_argument("--run-dir", type=Path, default=None, help="logs and state (default: %(default)s -> "
                       "$FIREFLYER_RUN_DIR/<name> or ~/.local/state/fireflyer/clusters/<name>)")
        if name in ("up", "supervise"):
            p.add_argument("--ports", choices=("file", "auto"), default="file",
                           help="use the ports in the file, or pick free ones")
            p.add_argument("--service", action="append", default=None, help="start only this service (repeat)")
            p.add_argument("--restart", choices=("on-failure", "no"), default="on-failure",
                           help="restart crashed services (default) or leave them down")
            p.add_argument("--netns", action="store_true", help="every node in its own network namespace")
            p.add_argument("--key-file", default=None, help="the cluster key to use (hai cluster keygen)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.cmd == "supervise":
            c = load_cluster(args.cluster)
            return supervise(args.cluster, args.run_dir or default_run_dir(c.name), args.ports, args.service,
                             args.restart, args.node, args.netns, args.key_file)
        if args.cmd == "up":
            cluster_up(args.cluster, args.run_dir, args.ports, args.service, restart=args.restart, node=args.node,
                       netns=args.netns, key_file=args.key_file)
            st = cluster_status(args.cluster, args.run_dir, node=args.node)
        elif args.cmd == "restart":
            st = cluster_restart(args.cluster, args.service, args.node, args.run_dir, args.timeout)
            if not args.json:
                for s in st["restarted"]:
                    print(f"{s['module']}@{s['node']}: pid {s['old_pid']} -> {s['pid']}, {s['state']}")
                return 0
        elif args.cmd == "down":
            rep = cluster_down_report(args.cluster, args.run_dir, node=args.node)
            st = {"state": "down", "was_running": rep["stopped"], "netns_removed": rep["netns_removed"]}
            if not args.json:
                print(down_message(rep))
                return 0
        else:
            st = cluster_status(args.cluster, args.run_dir, node=args.node)
        if args.json:
            print(json.dumps(st, indent=1))
        else:
            render_status(st)
        return status_exit_code(st) if args.cmd == "status" else 0
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
