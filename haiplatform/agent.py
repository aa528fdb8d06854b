"""The node agent (``python -m haiplatform.agent``): runs the ranks the scheduler placed on its node.

The agent registers with its facts (psutil; NVML GPUs through ``pynvml`` when importable, else the
cluster description's count), then long-polls ``/v1/agent/sync``; each answer doubles as a
heartbeat and lists the ranks of this node that are not finished, with what the scheduler wants
of them (``run``, ``stop`` or ``suspend``). The agent reconciles:

- a rank to run that it has not started: start it as its user's Unix account (``accounts``), in
  its own session and process group; stdout and stderr to ``STATE_DIR/logs/NODE/job-ID/rank-R.log``;
  the job environment below);
- a rank to stop: SIGTERM to its process group, SIGKILL after ``stop_grace``;
- a rank to suspend: the suspend protocol below;
- a process the server no longer lists (its node was declared lost): killed.

[Note: the suspend protocol] A suspend sends no signal at first: a SIGTERM would kill a job that
does not handle it before it could save. At t0 (the agent sees ``desired = suspend``) it writes
``$HAI_CONTROL/suspend``, JSON ``{"t": t0, "ack_by": t0 + ack_timeout, "grace": grace}``; the job
(:mod:`haiplatform.job`) notices it, writes ``suspend_ack``, saves, writes ``suspend_done`` and
exits. The agent's watch thread (every 0.1 s) then sends SIGTERM to the job's process groups
on this node at the first of: no ``suspend_ack`` by ``ack_by``; ``suspend_ack`` time + grace;
``suspend_done`` seen; and SIGKILL one second after the SIGTERM. So from the decision to every
rank stopped takes at most ack_timeout + grace + ~1 s (plus a sync's latency). ``grace`` and
``ack_timeout`` come with each rank in the sync answer (the job's own grace, capped by the
cluster); when the API sends none, the cluster's defaults stand.

[Note: activity] The watch thread also reports, per job running here, when its ranks last wrote
output (the newest mtime of their log files: the agent's own files), the time of the job's last
``checkpoint`` (the file :func:`haiplatform.job.report_checkpoint` writes) and when it
acknowledged a suspend: the scheduler's watchdog and its choice of preemption victims (least work
lost) read them. They are sent when they change, at most every ``ACTIVITY_EVERY`` seconds, in the
same request as rank reports. What the job writes is read as hostile: never through a link, a
few bytes at most, finite and no later than now.

Exits are reported at once by a reporter thread. Each process leader gets ``PR_SET_PDEATHSIG``
(SIGKILL), and the agent records every process group in ``STATE_DIR/agent-NODE.json`` so that a
restarted agent kills what its predecessor left (the API marks those ranks lost).

Job environment (docs/haiplatform.md): WORLD_SIZE, RANK, LOCAL_WORLD_SIZE,
LOCAL_RANK, NNODES, NODE_RANK, GROUP_RANK, MASTER_ADDR, MASTER_PORT, HAI_JOB_ID (the chain),
HAI_CHAIN_ID (its alias), HAI_ATTEMPT_ID, HAI_RESTART_COUNT, HAI_ARRAY_ID and HAI_ARRAY_TASK_ID (a job
array's task, also as SLURM_ARRAY_JOB_ID / SLURM_ARRAY_TASK_ID), HAI_NODE_NAME, HAI_CLUSTER_FILE, HAI_WHOLE_LIFE_STATE, HAI_CONTROL; and
nothing of the agent's own environment but the variables in :data:`PASS_ENV` (see
:func:`base_env`): no service variable, no secret. The job's credentials: $HAI_JOB_TOKEN (its own
API token, :mod:`haiplatform.jobtoken`) and $FIREFLYER_CREDENTIAL (its fs3 credential
``job:<chain id>``, a file in its control directory).

[Note: jobs as their users] The agent runs as root and each rank as its user's account
(``setpriv --reuid --regid --init-groups``): a job cannot read the platform's secrets (STATE_DIR
and the cluster key are 0700 directories of the services' account) nor another user's job.
Everything the agent does in a job's control directory, which that job's account owns, is
written so that a link planted there cannot redirect it (:func:`_write_file`, :func:`_read_small`).
An agent that is not root cannot switch accounts: it runs jobs as its own account and says so
loudly, in its log and in every rank's log.

[Note: master port] MASTER_PORT must be free on the first node of the job. Only that node's
agent can know, so it picks one (bind to port 0 on its address) and reports it; agents of the
other nodes get their ranks from the API only once the port is recorded.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from network.topology import Cluster, Node

from .accounts import Account, resolve_account
from .client import HaiClient
from .config import HaiConfig, private_dir, shared_dir
from .errors import AccountError, ApiError, Conflict, NotFound
from .jobtoken import job_token
from .states import Desired, RankStatus
from .validate import NodeValidation

__all__ = ["Agent", "node_facts", "job_env", "base_env", "PASS_ENV", "main"]

log = logging.getLogger(__name__)


def node_facts(node: Node) -> dict:
    """CPUs, memory and GPUs of this machine (GPUs from NVML when present, else the description)."""
    import psutil

    facts = {"cpus_online": psutil.cpu_count() or 0, "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 2),
             "load": list(os.getloadavg()), "gpu_source": "cluster description", "gpus": node.gpus}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            n = pynvml.nvmlDeviceGetCount()
            facts["gpus"] = n
            facts["gpu_names"] = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(n)]
            facts["gpu_source"] = "nvml"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no module, no driver, no GPU: the description's count stands
        pass
    return facts


def job_env(w: dict, node: str, cluster_file: str, control: str) -> dict[str, str]:
    """The environment of one rank, from the API's description of it."""
    nodes = w["nodes"]
    ppn = int(w["ppn"]) or 1
    node_rank = nodes.index(node)
    env = {
        "WORLD_SIZE": str(ppn * len(nodes)), "RANK": str(w["rank"]),
        "LOCAL_WORLD_SIZE": str(ppn), "LOCAL_RANK": str(w["local_rank"]),
        "NNODES": str(len(nodes)), "NODE_RANK": str(node_rank), "GROUP_RANK": str(node_rank),
        "MASTER_ADDR": w["master_addr"], "MASTER_PORT": str(w["master_port"]),
        # [Note: the job id is the chain's] what users see and type; the attempt has its own variable
        "HAI_JOB_ID": str(w["chain_id"]), "HAI_CHAIN_ID": str(w["chain_id"]), "HAI_ATTEMPT_ID": str(w["job_id"]),
        "HAI_RESTART_COUNT": str(w["restart_count"]), "HAI_NODE_NAME": node,
        "HAI_CLUSTER_FILE": cluster_file, "HAI_WHOLE_LIFE_STATE": str(w["whole_life_state"]),
        "HAI_CONTROL": control, "HAI_JOB_NAME": w["name"], "HAI_USER": w["user"],
    }
    if w.get("array_id") is not None:  # a task of a job array (Slurm's names too, for Slurm scripts)
        env.update(HAI_ARRAY_ID=str(w["array_id"]), HAI_ARRAY_TASK_ID=str(w["array_index"]),
                   SLURM_ARRAY_JOB_ID=str(w["array_id"]), SLURM_ARRAY_TASK_ID=str(w["array_index"]))
    return env


#: the agent's own variables a rank inherits (besides LC_*); everything else of the agent's
#: environment (FIREFLYER_*, HAI_TOKEN, PG*, ...) stays out of jobs
PASS_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM")


def base_env(account: str, home: str, agent_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a rank starts from, before its job's own ``env`` and the platform's variables."""
    src = os.environ if agent_env is None else agent_env
    env = {k: v for k, v in src.items() if k in PASS_ENV or k.startswith("LC_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(HOME=home, USER=account, LOGNAME=account)
    return env


# [Note: entering the working directory] subprocess changes directory before it switches to the
# job's account, i.e. as root: a rank could then start inside a directory its account may not
# reach (and read what lies below it). The rank's first program is this shell line, run as the
# account: it enters the directory or fails with a message in the rank's log, then execs the job.
_ENTER = ('cd -- "$1" 2>/dev/null || { echo "[hai agent] the Unix account $2 cannot enter the working directory '
          '$1" >&2; exit 126; }; shift 2; exec "$@"')


def output_path(pattern: str, w: dict, node: str, base: str) -> str:
    """A job's ``output`` pattern for one rank: %j chain id, %a array index (0 outside an array),
    %r rank, %n node, %x job name, %% percent; a relative path is relative to ``base`` (the workdir)."""
    keys = {"j": str(w["chain_id"]), "a": str(w.get("array_index") or 0), "r": str(w["rank"]), "n": node,
            "x": w["name"], "%": "%"}
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "%" and i + 1 < len(pattern) and pattern[i + 1] in keys:
            out.append(keys[pattern[i + 1]])
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return os.path.join(base, "".join(out))


# [Note: --output as the job's account] A rank's output goes to its log (the agent's file, read by
# the API) and, with ``output``, also to a path of the user's choosing. That path is written by a
# small copier process that runs as the job's account (never as root: the account's permissions
# decide where it may write) and opens the file with O_NOFOLLOW (a link planted there is refused,
# not followed). The rank writes into a pipe; the copier appends what it reads to the log and the
# file, and exits at end of file, when every process of the rank has closed the pipe. It says it
# is ready on a second pipe (argv[2]) before the rank starts: a copier that never came up would
# leave the rank writing into a pipe nobody reads (SIGPIPE, no reason given). The agent reports a
# rank ended only once its copier has exited, so the log and the file are complete by then.
_COPIER = r"""
import os, sys
path = sys.argv[1]
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    os.set_blocking(fd, True)
except OSError as exc:
    fd = None
    os.write(1, f"[hai agent] cannot write the output file {path}: {exc.strerror}\n".encode())
if len(sys.argv) > 2:
    os.write(int(sys.argv[2]), b"1")
    os.close(int(sys.argv[2]))
def put(f, b):
    while b:
        b = b[os.write(f, b):]
while True:
    b = os.read(0, 1 << 16)
    if not b:
        break
    put(1, b)
    if fd is not None:
        try:
            put(fd, b)
        except OSError as exc:
            os.write(1, f"[hai agent] output file {path}: {exc.strerror}; writing the log only\n".encode())
            fd = None
"""


def _write_file(path: Path, text: str, owner: Account | None) -> None:
    """Write a small file into a job's control directory without following a link the job put there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(f"{path} is not a plain file (type {stat.filemode(st.st_mode)}, {st.st_nlink} links)")
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
    finally:
        os.close(fd)


def _read_small(path: Path, limit: int = 64) -> str:
    """Read a short file from a job's control directory (not through a link, not a FIFO)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a plain file")
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


_PR_SET_PDEATHSIG = 1


def _pdeathsig_kill() -> None:  # in the child, between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# [Note: spawning ranks] A ``preexec_fn`` makes subprocess fork() the whole agent, page tables and
# all (50 ms for a 200 MB process here); without one CPython uses vfork(), 5x cheaper. The parent
# death signal is then set by util-linux ``setpriv --pdeathsig KILL`` (it survives the exec into
# the rank's program; same pid). Without setpriv we fall back to the preexec_fn.
_SETPRIV = shutil.which("setpriv")
if _SETPRIV and "--pdeathsig" not in subprocess.run([_SETPRIV, "--help"], capture_output=True, text=True).stdout:
    _SETPRIV = None


def _whoami() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


#: seconds between two activity reports of the agent (when something changed)
ACTIVITY_EVERY = 2.0
#: the watch thread's period: suspend files and stop deadlines are checked this often
WATCH_EVERY = 0.1
#: SIGTERM -> SIGKILL at the end of a suspend
SUSPEND_KILL_AFTER = 1.0
#: how long an --output copier may take to come up, and to drain the pipe after its rank exited
COPIER_START_S = 10.0
COPIER_END_S = 10.0


@dataclass
class Proc:
    job_id: int
    rank: int
    popen: subprocess.Popen | None
    log: Path
    control: Path
    account: Account | None = None
    stop_sent: float = 0.0     # monotonic time a stop or suspend was decided (0: none)
    desired: str = Desired.RUN
    done: bool = False
    term_at: float = 0.0       # monotonic time SIGTERM was sent (0: not yet)
    kill_at: float = 0.0       # monotonic deadline for SIGKILL after the SIGTERM (0: none)
    copier: subprocess.Popen | None = None  # the --output copier (see _COPIER), waited for with the rank
    chain_id: int = 0          # the job id users see (HAI_JOB_ID); job_id is this attempt's


@dataclass
class Suspend:
    """A suspend in progress for one job on this node (its control directory is shared by its ranks here)."""

    control: Path
    t0: float                  # wall clock, written into the suspend file
    ack_by: float              # monotonic: no suspend_ack by then -> SIGTERM
    grace: float               # seconds after the ack
    acked_at: float | None = None  # wall clock of the job's suspend_ack (clamped to [t0, now])
    term_by: float | None = None   # monotonic: SIGTERM then (ack + grace, or now on suspend_done)
    why: str = ""


def _plain_file_mtime(path: Path) -> float | None:
    """The mtime of a regular file (not a link, not a FIFO) or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_mtime if stat.S_ISREG(st.st_mode) else None


def _read_ts(path: Path, now: float) -> float | None:
    """A timestamp a job wrote (text, a float): None when absent or not a finite time; never later than now."""
    try:
        v = float(_read_small(path, 32).strip())
    except (OSError, ValueError):
        return None
    if not (v == v and 0.0 < v < float("inf")):
        return None
    return min(v, now)


class Agent:
    def __init__(self, cluster: Cluster, node: Node, cfg: HaiConfig, api: HaiClient, cluster_file: str) -> None:
        self.cluster = cluster
        self.node = node
        self.cfg = cfg
        self.api = api
        self.cluster_file = cluster_file
        self.epoch = uuid.uuid4().hex[:16]
        self.log_dir = cfg.log_dir(node.name)
        self.control_dir = cfg.control_root() / node.name
        self.switch_user = os.geteuid() == 0
        self._secret = cfg.secret()
        self._prepared: set[int] = set()  # jobs whose control directory this agent made
        self._fs3_key = None
        self._fs3_key_error: str | None = None
        self.state_file = cfg.state_dir / f"agent-{node.name}.json"
        self.procs: dict[tuple[int, int], Proc] = {}
        self.counts: dict[str, int] = {}  # ranks started, and ended by status (Prometheus: collect_metrics)
        self.finished: set[tuple[int, int]] = set()
        self.reports: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.stopping = threading.Event()
        self.suspends: dict[int, Suspend] = {}  # job id -> its suspend in progress here
        self._activity: dict[int, dict] = {}    # job id -> fields not yet sent
        self._activity_sent: dict[int, dict] = {}
        self._activity_at = 0.0
        self._reporter = threading.Thread(target=self._report_loop, name="reporter", daemon=True)
        self._watcher = threading.Thread(target=self._watch_loop, name="watcher", daemon=True)
        self.validation = NodeValidation(self)  # the node validator (haiplatform.validate)
        self._validating_at_start = cfg.validate_at_start  # said at the first registration only
        self._sync_began = 0.0  # monotonic: when the sync being reconciled was asked for (NodeValidation.may_start)

    # -- lifecycle ------------------------------------------------------------------------------
    def kill_leftovers(self) -> int:
        """Kill process groups a previous agent of this node left behind (recorded in the state file)."""
        try:
            old = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return 0
        n = 0
        for key, pgid in old.get("pgids", {}).items():
            try:
                env = Path(f"/proc/{pgid}/environ").read_bytes()
            except OSError:
                continue
            # the attempt's variable; an agent before HAI_ATTEMPT_ID put the attempt in HAI_JOB_ID
            # (a rolling upgrade finds its ranks still running)
            attempt = key.split(":")[0]
            if {f"HAI_ATTEMPT_ID={attempt}".encode(), f"HAI_JOB_ID={attempt}".encode()} & set(env.split(b"\0")):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                    n += 1
        if n:
            log.warning("killed %d process group(s) left by the previous agent", n)
        return n

    def _save_state(self) -> None:
        """Record the live process groups (the main loop and the exit waiters both call this)."""
        with self._state_lock:  # one writer at a time: they share the temporary file
            with self.lock:
                pgids = {f"{k[0]}:{k[1]}": p.popen.pid for k, p in self.procs.items() if p.popen and not p.done}
            tmp = self.state_file.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps({"epoch": self.epoch, "pid": os.getpid(), "pgids": pgids}))
                os.replace(tmp, self.state_file)
            except OSError as exc:
                log.warning("could not record the process groups in %s: %s", self.state_file, exc)

    def register(self, stop: threading.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            try:
                facts = node_facts(self.node)
                self.api.request("POST", "/v1/agent/register", json={
                    "node": self.node.name, "epoch": self.epoch, "address": self.node.address,
                    "cpus": facts["cpus_online"] if self.node.cpus == 0 else self.node.cpus,
                    "memory_gib": self.node.memory_gib or facts["memory_total_gib"], "gpus": facts["gpus"],
                    "facts": facts, "validating": self._validating_at_start}, timeout=10)
                self._validating_at_start = False
                log.info("registered %s (epoch %s, %s GPUs from %s)", self.node.name, self.epoch, facts["gpus"],
                         facts["gpu_source"])
                return
            except ApiError as exc:
                log.warning("registration failed (%s); retrying", exc)
                stop.wait(delay)
                delay = min(delay * 2, 2.0)

    def run(self, stop: threading.Event) -> None:
        self.kill_leftovers()
        private_dir(self.log_dir)
        shared_dir(self.cfg.control_root())
        shared_dir(self.control_dir)
        if not self.switch_user:
            log.warning("the agent of %s does not run as root: jobs run as its own account (%s), not as their "
                        "users' accounts, and can read the platform's secrets; run the cluster as root",
                        self.node.name, _whoami())
        self._save_state()
        self._reporter.start()
        self._watcher.start()
        self.register(stop)
        self.validation.start(stop, self.cfg.validate_at_start)
        seq = -1
        # each sync is a heartbeat: poll often enough that a live node is never taken for lost
        longpoll = min(self.cfg.longpoll, self.cfg.heartbeat_timeout / 4)
        while not stop.is_set():
            try:
                self._sync_began = time.monotonic()
                resp = self.api.request("GET", "/v1/agent/sync", params={
                    "node": self.node.name, "epoch": self.epoch, "seq": seq, "timeout": longpoll},
                    timeout=longpoll + 10)
            except (Conflict, NotFound) as exc:  # the API forgot us (restarted, or another agent): register
                log.warning("%s; registering again", exc)
                self.register(stop)
                continue
            except ApiError as exc:
                log.warning("sync failed (%s); ranks keep running, retrying", exc)
                stop.wait(0.5)
                continue
            seq = resp["seq"]
            self.validation.requested(resp.get("validate"))
            try:
                self.reconcile(resp["ranks"])
            except Exception:  # a bug here must not take the node down: log it, keep syncing
                log.exception("reconciling failed; retrying on the next sync")
                seq = -1
                stop.wait(0.2)
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every rank (SIGTERM, then SIGKILL) and flush the reports."""
        with self.lock:
            live = [p for p in self.procs.values() if p.popen and not p.done]
        for p in live:
            self._signal(p, signal.SIGTERM)
        deadline = time.monotonic() + min(self.cfg.stop_grace, 5.0)
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(0.0, deadline - time.monotonic()))
            self._signal(p, signal.SIGKILL)
        self.stopping.set()
        self._reporter.join(timeout=5)

    # -- reconciling ----------------------------------------------------------------------------
    def reconcile(self, ranks: list[dict]) -> None:
        listed = set()
        port_reports: dict[int, int] = {}
        for w in ranks:
            key = (w["job_id"], w["rank"])
            listed.add(key)
            p = self.procs.get(key)
            if w["desired"] == Desired.RUN:
                if not self.validation.may_start(self._sync_began):  # the validator first: see its note
                    continue
                if p is None and key not in self.finished and w["status"] == RankStatus.CREATED:
                    if not w["master_port"] and w["job_id"] in port_reports:  # another local rank's pick
                        w["master_port"] = port_reports[w["job_id"]]
                    elif not w["master_port"] and w["nodes"][0] == self.node.name:
                        w["master_port"] = port_reports[w["job_id"]] = _free_port(self.node.address)
                        if len(w["nodes"]) > 1:  # the other nodes wait for it: tell the API first (once)
                            try:
                                self.api.request("POST", "/v1/agent/report", json={
                                    "node": self.node.name, "epoch": self.epoch,
                                    "master_ports": {str(w["job_id"]): w["master_port"]}}, timeout=10)
                            except ApiError as exc:
                                log.warning("could not report the master port of job %s (%s)", w["job_id"], exc)
                                continue
                    self.start(w)
            else:
                if p is not None and not p.done:
                    self.stop(p, w["desired"], work=w)
                elif p is None and key not in self.finished:  # decided, stopped before it started
                    self.finished.add(key)
                    self.reports.put({"job_id": key[0], "rank": key[1], "status": RankStatus.KILLED, "exit_code": None,
                                      "message": "stopped before it started"})
        with self.lock:
            orphans = [p for k, p in self.procs.items() if k not in listed and not p.done]
            # forget ranks the server no longer lists once they have ended (bounded memory)
            for k in [k for k, p in self.procs.items() if k not in listed and p.done]:
                del self.procs[k]
            self.finished.intersection_update(listed)
        for p in orphans:  # the server no longer wants it (its node was declared lost)
            self.stop(p, Desired.STOP, grace=0.0)

    def start(self, w: dict) -> None:
        key = (w["job_id"], w["rank"])
        jobdir = self.log_dir / f"job-{w['job_id']}"
        jobdir.mkdir(parents=True, exist_ok=True)
        logpath = jobdir / f"rank-{w['rank']}.log"
        control = self.control_dir / f"job-{w['job_id']}"
        proc = Proc(w["job_id"], w["rank"], None, logpath, control, chain_id=w["chain_id"])
        with self.lock:
            if self.validation.busy:  # a validator run claimed the idle node meanwhile: the next sync starts it
                return
            self.procs[key] = proc
        try:
            acct = resolve_account(self.cfg, w["user"], self.node.name) if self.switch_user else None
            proc.account = acct
            name = acct.name if acct else _whoami()
            self._prepare_control(w, control, acct)
            home = acct.home if acct and os.path.isdir(acct.home) else str(control) if acct else \
                os.path.expanduser("~")
            env = {**base_env(name, home), **{k: str(v) for k, v in w["env"].items()},
                   **job_env(w, self.node.name, self.cluster_file, str(control)),
                   "HAI_JOB_TOKEN": job_token(self._secret, w["chain_id"]), "HAI_URL": self.api.url}
            env.setdefault("HAI_TOKEN", env["HAI_JOB_TOKEN"])  # the hai CLI in the job: as the job, unless told
            if (control / "credential").exists():
                env["FIREFLYER_CREDENTIAL"] = str(control / "credential")
            prog = w["command"][0]
            if "/" not in prog and shutil.which(prog, path=env.get("PATH")) is None:
                raise FileNotFoundError(f"no program {prog!r} on PATH")
            if "/" in prog and not os.access(os.path.join(w["workdir"] or "", prog), os.X_OK):
                raise FileNotFoundError(f"{prog!r} is not an executable file")
            with open(logpath, "ab") as out:
                if acct is None:
                    out.write(f"[hai agent] warning: the agent does not run as root, so this job runs as {name}, "
                              "the services' account, and can read the platform's secrets\n".encode())
                    out.flush()
                    argv, cwd = list(w["command"]), w["workdir"] or None
                else:
                    workdir = w["workdir"] or home
                    argv, cwd = ["/bin/sh", "-c", _ENTER, "hai-rank", workdir, acct.name, *w["command"]], "/"
                if w.get("output"):
                    target = output_path(w["output"], w, self.node.name,
                                         (w["workdir"] or home) if acct else (w["workdir"] or os.getcwd()))
                    popen, proc.copier = self._spawn_with_output(argv, acct, env, cwd, out, target)
                else:
                    popen = self._spawn(argv, acct, env, cwd, out)
        except (OSError, ValueError, AccountError) as exc:
            msg = f"cannot start {w['command'][0]!r} on {self.node.name}: {exc}"
            with open(logpath, "ab") as out:
                out.write(f"[hai agent] {msg}\n".encode())
            proc.done = True
            self.finished.add(key)
            self.reports.put({"job_id": key[0], "rank": key[1], "status": RankStatus.FAILED, "exit_code": 127,
                              "message": msg})
            return
        proc.popen = popen
        self._save_state()
        report = {"job_id": key[0], "rank": key[1], "status": RankStatus.RUNNING, "pid": popen.pid}
        self.reports.put(report)
        self._tally("started")
        threading.Thread(target=self._wait, args=(key, proc), name=f"wait-{key[0]}.{key[1]}", daemon=True).start()

    def _spawn(self, argv: list[str], acct: Account | None, env: dict, cwd: str | None, out) -> subprocess.Popen:
        """Start a rank leader: new session, parent-death signal, and (``acct``) as that account."""
        kw = dict(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                  start_new_session=True)
        if _SETPRIV:  # vfork + exec: see the note at _SETPRIV
            ids = [f"--reuid={acct.uid}", f"--regid={acct.gid}", "--init-groups"] if acct else []
            return subprocess.Popen([_SETPRIV, *ids, "--pdeathsig", "KILL", "--", *argv], **kw)
        if acct:  # subprocess switches ids before the preexec_fn: the death signal survives
            kw.update(user=acct.uid, group=acct.gid, extra_groups=os.getgrouplist(acct.name, acct.gid))
        return subprocess.Popen(argv, preexec_fn=_pdeathsig_kill, **kw)

    def _spawn_with_output(self, argv: list[str], acct: Account | None, env: dict, cwd: str | None, out,
                           target: str) -> tuple[subprocess.Popen, subprocess.Popen | None]:
        """(rank, copier): a rank whose output also goes to ``target``, through a copier run as
        ``acct`` (see the note at _COPIER); a copier that does not come up within
        ``COPIER_START_S`` leaves the rank writing to its log only, and the log says why."""
        import select
        import sys

        r, wr = os.pipe()
        ready_r, ready_w = os.pipe()
        copier = None
        try:
            ids = [f"--reuid={acct.uid}", f"--regid={acct.gid}", "--init-groups"] if acct else []
            cmd = [sys.executable, "-I", "-S", "-c", _COPIER, target, str(ready_w)]
            kw = dict(stdin=r, stdout=out, stderr=out, env={"PATH": env.get("PATH", "/usr/bin:/bin")}, cwd="/",
                      start_new_session=True, pass_fds=(ready_w,))
            why = ""
            try:
                if _SETPRIV:
                    copier = subprocess.Popen([_SETPRIV, *ids, "--", *cmd], **kw)
                else:
                    if acct:
                        kw.update(user=acct.uid, group=acct.gid, extra_groups=os.getgrouplist(acct.name, acct.gid))
                    copier = subprocess.Popen(cmd, **kw)
            except OSError as exc:
                why = f"the copier could not start: {exc}"
            os.close(ready_w)
            ready_w = -1
            if copier is not None:
                ok = select.select([ready_r], [], [], COPIER_START_S)[0] and os.read(ready_r, 1) == b"1"
                if not ok:
                    rc = copier.poll()
                    if rc is None:
                        copier.kill()
                        copier.wait()
                    why = (f"the copier was not ready within {COPIER_START_S:g} s" if rc is None
                           else f"the copier exited with code {rc} before it was ready")
                    copier = None
            if copier is None:
                out.write(f"[hai agent] the output file {target} is unavailable ({why}); this rank's output "
                          "goes to its log only\n".encode())
                out.flush()
                return self._spawn(argv, acct, env, cwd, out), None
            os.close(r)
            r = -1
            with os.fdopen(wr, "wb", closefd=True) as pipe:
                wr = -1
                return self._spawn(argv, acct, env, cwd, pipe), copier
        except BaseException:
            if copier is not None:
                copier.kill()
                copier.wait()
            raise
        finally:
            for fd in (r, wr, ready_r, ready_w):
                if fd >= 0:
                    os.close(fd)

    def _prepare_control(self, w: dict, control: Path, acct: Account | None) -> None:
        """The job's control directory on this node, made once per attempt: fresh, mode 0700, owned by
        the job's account, holding its fs3 credential (``job:<chain id>/uid=../gid=..``, mode 0600)."""
        jid = w["job_id"]
        if jid in self._prepared and control.is_dir():
            return
        if control.is_symlink() or control.is_file():
            control.unlink()
        elif control.exists():  # an earlier agent's: start afresh
            shutil.rmtree(control)
        control.mkdir(mode=0o700)
        cred = self._fs3_credential(w, acct)
        if cred is not None:
            cred.save(control / "credential")
            if acct is not None:
                os.chown(control / "credential", acct.uid, acct.gid, follow_symlinks=False)
        if acct is not None:
            os.chown(control, acct.uid, acct.gid)
        self._prepared.add(jid)

    def _fs3_credential(self, w: dict, acct: Account | None):
        """A credential ``job:<chain id>/uid=<uid>/gid=<gid>`` derived from the cluster key, valid
        ``job_credential_ttl``: the ids are those the ranks run as (the job's account, else this
        agent's), and fs3's metadata service checks file permissions as that user (the key id is
        bound into the secret, so the job cannot change it)."""
        from network.auth import AuthError, derive, load_cluster_key

        if self._fs3_key is None and self._fs3_key_error is None:
            try:
                self._fs3_key = load_cluster_key(self.cluster)
            except AuthError as exc:
                self._fs3_key_error = str(exc)
                log.warning("jobs get no fs3 credential: %s", exc)
        if self._fs3_key is None:
            return None
        uid, gid = (acct.uid, acct.gid) if acct is not None else (os.geteuid(), os.getegid())
        return derive(self._fs3_key, f"job:{w['chain_id']}/uid={uid}/gid={gid}",
                      time.time() + self.cfg.job_credential_ttl)

    def _signal(self, p: Proc, sig: int) -> None:
        if p.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, sig)

    def stop(self, p: Proc, desired: str, grace: float | None = None, work: dict | None = None) -> None:
        """Carry out a stop (SIGTERM now, SIGKILL after ``grace``, default ``stop_grace``) or a
        suspend (see the note on the suspend protocol: the suspend file, no signal yet)."""
        if p.stop_sent:
            if not (p.desired == Desired.SUSPEND and desired == Desired.STOP and not p.term_at):
                return
            # a stop decided while a suspend is pending: it does not wait for the job any more
        p.desired = desired
        p.stop_sent = p.stop_sent or time.monotonic()
        if desired == Desired.SUSPEND:
            self._begin_suspend(p, work or {})
            return
        self._terminate(p, self.cfg.stop_grace if grace is None else grace)

    def _terminate(self, p: Proc, grace: float) -> None:
        """SIGTERM to the rank's process group now, SIGKILL after ``grace`` (at once when 0)."""
        now = time.monotonic()
        p.term_at = now
        p.kill_at = now + grace
        self._signal(p, signal.SIGTERM)
        if grace <= 0.0:
            self._signal(p, signal.SIGKILL)

    def _begin_suspend(self, p: Proc, w: dict) -> None:
        with self.lock:
            if p.job_id in self.suspends:  # another rank of the job here: the file is written
                return
            ack_timeout = float(w.get("ack_timeout") or self.cfg.suspend_ack_timeout)
            grace = self.cfg.job_grace(float(w.get("grace") or 0.0))
            t0, mono = time.time(), time.monotonic()
            sp = Suspend(p.control, t0, mono + ack_timeout, grace)
            self.suspends[p.job_id] = sp
        try:
            _write_file(p.control / "suspend", json.dumps({"t": t0, "ack_by": t0 + ack_timeout, "grace": grace}),
                        p.account)
        except OSError as exc:  # the job's directory is its own: a link or a FIFO there is its loss
            log.warning("job %s: could not write its suspend file (%s); it is stopped at once", p.job_id, exc)
            sp.term_by, sp.why = mono, "no suspend file"

    def _live_by_job(self) -> dict[int, list[Proc]]:
        """Job id -> its ranks running here (call with ``self.lock`` held)."""
        live: dict[int, list[Proc]] = {}
        for p in self.procs.values():
            if not p.done and p.popen is not None:
                live.setdefault(p.job_id, []).append(p)
        return live

    def _check_suspends(self, now: float, wall: float) -> list[Proc]:
        """Advance each suspend in progress; the ranks to SIGTERM now."""
        due: list[Proc] = []
        with self.lock:
            live = self._live_by_job()
            for jid in [j for j in self.suspends if j not in live]:
                del self.suspends[jid]  # every rank of it here has ended
            items = list(self.suspends.items())
        for jid, sp in items:
            if sp.acked_at is None:
                m = _plain_file_mtime(sp.control / "suspend_ack")
                if m is not None:
                    sp.acked_at = min(max(m, sp.t0), wall)
                    self._note_activity(jid, suspend_acked_at=sp.acked_at)
                    sp.term_by = min(sp.term_by or float("inf"), now + max(0.0, sp.acked_at + sp.grace - wall))
                    sp.why = sp.why or f"grace of {sp.grace:g} s after its acknowledgement over"
            if sp.term_by is None or sp.term_by > now:
                if _plain_file_mtime(sp.control / "suspend_done") is not None:
                    sp.term_by, sp.why = now, "it is done (suspend_done)"
                elif sp.acked_at is None and now >= sp.ack_by:
                    sp.term_by, sp.why = now, "no acknowledgement of the suspend in time"
            if sp.term_by is not None and now >= sp.term_by:
                todo = [p for p in live[jid] if not p.term_at]
                if todo:
                    log.info("job %s: suspend: SIGTERM to %d rank(s) here (%s)", jid, len(todo), sp.why)
                due += todo
        return due

    def _watch_loop(self) -> None:
        """Suspends and stop deadlines every WATCH_EVERY seconds; activity every ACTIVITY_EVERY."""
        while not self.stopping.wait(WATCH_EVERY):
            try:
                self.watch_once()
            except Exception:  # a bug here must not stop the watching: log it, go on
                log.exception("watching the ranks failed")

    def watch_once(self) -> None:
        now, wall = time.monotonic(), time.time()
        for p in self._check_suspends(now, wall):
            self._terminate(p, SUSPEND_KILL_AFTER)
        with self.lock:
            late = [p for p in self.procs.values() if p.kill_at and not p.done and now >= p.kill_at]
        for p in late:
            self._signal(p, signal.SIGKILL)
            p.kill_at = 0.0
        if now - self._activity_at >= ACTIVITY_EVERY:
            self._activity_at = now
            self._scan_activity(wall)

    def _scan_activity(self, wall: float) -> None:
        """Each running job's newest rank output and last reported checkpoint, sent when changed."""
        with self.lock:
            jobs = self._live_by_job()
            for jid in [j for j in self._activity_sent if j not in jobs]:
                del self._activity_sent[jid]
        changed = False
        for jid, ps in jobs.items():
            out = max((m for m in (_plain_file_mtime(p.log) for p in ps) if m is not None), default=None)
            ckpt = _read_ts(ps[0].control / "checkpoint", wall)
            fields = {k: v for k, v in (("last_output", out), ("last_checkpoint", ckpt)) if v is not None}
            changed |= self._note_activity(jid, wake=False, **fields)
        if changed:
            self.reports.put(None)  # wake the reporter: the activity travels with the next request

    def _note_activity(self, job_id: int, wake: bool = True, **fields: float) -> bool:
        """Queue the fields of ``job_id`` that changed since they were last sent."""
        with self.lock:
            sent = self._activity_sent.setdefault(job_id, {})
            new = {k: v for k, v in fields.items() if sent.get(k) != v}
            if not new:
                return False
            sent.update(new)
            self._activity.setdefault(job_id, {}).update(new)
        if wake:
            self.reports.put(None)
        return True

    def _take_activity(self) -> dict[str, dict]:
        with self.lock:
            act, self._activity = self._activity, {}
        return {str(k): v for k, v in act.items()}

    def _give_back_activity(self, act: dict[str, dict]) -> None:
        """A failed report's activity goes back (newer values noted since win)."""
        with self.lock:
            for k, v in act.items():
                self._activity[int(k)] = {**v, **self._activity.get(int(k), {})}

    def _wait(self, key: tuple[int, int], p: Proc) -> None:
        rc = p.popen.wait()
        self._signal(p, signal.SIGKILL)  # whatever the rank left in its group (the whole tree goes)
        if p.copier is not None:  # the rank's last output is still in the pipe until the copier is done
            try:
                p.copier.wait(timeout=COPIER_END_S)
            except subprocess.TimeoutExpired:  # a process outside the group keeps the pipe open
                p.copier.kill()
                p.copier.wait()
        state = None
        with contextlib.suppress(OSError, ValueError):
            state = int(_read_small(p.control / "whole_life_state").strip())
        if p.stop_sent:
            status, msg = RankStatus.KILLED, f"stopped ({p.desired}), exit code {rc}"
        elif rc == 0:
            status, msg = RankStatus.SUCCEEDED, ""
        else:
            status, msg = RankStatus.FAILED, (f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}")
        self._tally(str(status))
        with self.lock:
            p.done = True
            self.finished.add(key)
            last = not any(k[0] == key[0] and not q.done for k, q in self.procs.items())
        if last:  # the job's last rank here: its credential goes (the directory stays, for inspection)
            self._prepared.discard(key[0])
            with contextlib.suppress(OSError):
                (p.control / "credential").unlink()
        self.reports.put({"job_id": key[0], "rank": key[1], "status": status, "exit_code": rc, "pid": p.popen.pid,
                          "message": msg, "whole_life_state": state})
        self._save_state()

    def _report_loop(self) -> None:
        """Send reports in batches, in order; retried until the API takes them (bounded by shutdown)."""
        pending: list[dict] = []
        while True:
            try:
                item = self.reports.get(timeout=0.5)
                pending.append(item)
                # [Note: report batching] Wait a few ms for more: a short rank's "running" and its
                # exit then travel in one request and one transaction (the exit wins, the pid stays).
                time.sleep(0.005)
                while True:
                    pending.append(self.reports.get_nowait())
            except queue.Empty:
                pass
            pending = [r for r in pending if r is not None]  # None: a wake-up for the activity
            activity = self._take_activity()
            if not pending and not activity:
                if self.stopping.is_set():
                    return
                continue
            merged: dict[tuple[int, int], dict] = {}
            for rep in pending:
                key = (rep["job_id"], rep["rank"])
                prev = merged.get(key)
                merged[key] = {**rep, "pid": rep.get("pid") or (prev or {}).get("pid")} if prev else rep
            pending = list(merged.values())
            body = {"node": self.node.name, "epoch": self.epoch, "ranks": pending}
            if activity:
                body["activity"] = activity
            try:
                self.api.request("POST", "/v1/agent/report", json=body, timeout=10)
                pending = []
            except ApiError as exc:
                log.warning("report failed (%s); retrying", exc)
                self._give_back_activity(activity)
                if self.stopping.is_set():
                    return
                time.sleep(0.3)

    def _tally(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def collect_metrics(self) -> list:
        """Prometheus, at scrape time (docs/metrics.md): ranks running here, ranks started and ended,
        and the hfreduce counters the ranks publish in their control directories (read as hostile:
        ``hfreduce.counters.load``) labelled with their job (``hai_job``, the chain id users see as
        HAI_JOB_ID: Prometheus keeps ``job`` for its own) and rank; of two attempts of one chain still
        listed here, the newer one's (one series per label set)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from hfreduce import counters as hfc

        with self.lock:
            procs = list(self.procs.values())  # the ranks the API still lists here: bounded
            counts = dict(self.counts)
        live = [p for p in procs if not p.done and p.popen is not None]
        running = GaugeMetricFamily("fireflyer_agent_ranks_running", "Ranks running on this node")
        running.add_metric([], len(live))
        jobs = GaugeMetricFamily("fireflyer_agent_jobs_running", "Jobs with a rank running on this node")
        jobs.add_metric([], len({p.job_id for p in live}))
        started = CounterMetricFamily("fireflyer_agent_ranks_started", "Ranks this agent started")
        started.add_metric([], counts.get("started", 0))
        ended = CounterMetricFamily("fireflyer_agent_ranks_ended", "Ranks that ended here, by status",
                                    labels=["status"])
        for st in (RankStatus.SUCCEEDED, RankStatus.FAILED, RankStatus.KILLED):
            ended.add_metric([str(st)], counts.get(str(st), 0))
        by_rank = {}
        for p in sorted(procs, key=lambda p: (p.job_id, p.rank)):  # a later attempt replaces an earlier one
            c = hfc.load(p.control / f"hfreduce-rank{p.rank}.json")
            if c:
                by_rank[(p.chain_id or p.job_id, p.rank)] = c
        rows = [({"hai_job": str(chain), "rank": str(rank)}, c) for (chain, rank), c in sorted(by_rank.items())]
        return [running, jobs, started, ended, *(hfc.families(rows) if rows else [])]

    # -- logs -----------------------------------------------------------------------------------
    def read_log(self, job_id: int, rank: int, offset: int, size: int) -> tuple[bytes, bool, int]:
        """``size`` bytes of the rank's log from ``offset``, whether the log is complete and read to its
        end, and the file's size now (the API pages and tails with it)."""
        path = self.log_dir / f"job-{job_id}" / f"rank-{rank}.log"
        key = (job_id, rank)
        with self.lock:
            p = self.procs.get(key)
        ended = key in self.finished or (p is not None and p.done) or (p is None and path.exists())
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
                total = os.fstat(f.fileno()).st_size
                at_end = f.tell() >= total
        except FileNotFoundError:
            return b"", False, 0
        return data, ended and at_end and not data, total


def main(argv: list[str] | None = None) -> None:
    from network import AuthError, server_settings
    from network.metrics import add_collector
    from network.rpc import Reply, RpcServer
    from network.service import parse_service_args, service_parser, shutdown_event

    from .config import load_config
    from .errors import HaiError

    ap = service_parser("haiplatform.agent", "the HAI-Platform node agent")
    args, cluster, node = parse_service_args(ap, argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = load_config(cluster)
        addr, port = cluster.endpoint("haiplatform.api")
        secret = cfg.secret()
    except (HaiError, KeyError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    api = HaiClient(f"http://{addr}:{port}", secret, timeout=30)
    agent = Agent(cluster, node, cfg, api, str(Path(args.cluster).resolve()))
    svc = cluster.service("haiplatform.agent")
    try:
        security = server_settings(cluster)
    except AuthError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    rpc = RpcServer(node.address, svc.port if svc else 0, name=f"haiplatform.agent@{node.name}", **security)

    def logs_read(a: dict, payload, ctx) -> Reply:
        # service-only (the API reads logs for users after its own permission check): the
        # connection's cluster key is the check, no secret travels in the arguments
        data, eof, size = agent.read_log(int(a["job_id"]), int(a["rank"]), int(a.get("offset", 0)),
                                         min(int(a.get("max", 65536)), 1 << 20))
        return Reply({"eof": eof, "n": len(data), "size": size}, [data] if data else [])

    rpc.register("logs.read", logs_read)
    add_collector(rpc.metrics, agent.collect_metrics)
    rpc.start()
    log.info("agent of %s on %s:%s, API %s:%s", node.name, node.address, rpc.port, addr, port)
    try:
        agent.run(shutdown_event)
    finally:
        rpc.stop()
        api.close()


if __name__ == "__main__":
    main()
