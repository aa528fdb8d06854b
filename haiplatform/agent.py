"""The node agent (``python -m haiplatform.agent``): runs the ranks the scheduler placed on its node.

The agent registers with its facts (psutil; NVML GPUs through ``pynvml`` when importable, else the
cluster description's count), then long-polls ``/v1/agent/sync``; each answer doubles as a
heartbeat and lists the ranks of this node that are not finished, with what the scheduler wants
of them (``run``, ``stop`` or ``suspend``). The agent reconciles:

- a rank to run that it has not started: start it (its own session and process group; stdout and
  stderr to ``STATE_DIR/logs/NODE/job-ID/rank-R.log``; the job environment below);
- a rank to stop: SIGTERM to its process group, SIGKILL after ``stop_grace``; for a suspend the
  agent first writes ``suspend`` into the job's ``HAI_CONTROL`` directory;
- a process the server no longer lists (its node was declared lost): killed.

Exits are reported at once by a reporter thread. Each process leader gets ``PR_SET_PDEATHSIG``
(SIGKILL), and the agent records every process group in ``STATE_DIR/agent-NODE.json`` so that a
restarted agent kills what its predecessor left (the API marks those ranks lost).

Job environment (DESIGN.md, "The job environment"): WORLD_SIZE, RANK, LOCAL_WORLD_SIZE,
LOCAL_RANK, NNODES, NODE_RANK, GROUP_RANK, MASTER_ADDR, MASTER_PORT, HAI_JOB_ID, HAI_CHAIN_ID,
HAI_RESTART_COUNT, HAI_NODE_NAME, HAI_CLUSTER_FILE, HAI_WHOLE_LIFE_STATE, HAI_CONTROL.

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
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from network.topology import Cluster, Node

from .client import HaiClient
from .config import HaiConfig
from .errors import ApiError, Conflict, NotFound

__all__ = ["Agent", "node_facts", "job_env", "main"]

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
        "HAI_JOB_ID": str(w["job_id"]), "HAI_CHAIN_ID": str(w["chain_id"]),
        "HAI_RESTART_COUNT": str(w["restart_count"]), "HAI_NODE_NAME": node,
        "HAI_CLUSTER_FILE": cluster_file, "HAI_WHOLE_LIFE_STATE": str(w["whole_life_state"]),
        "HAI_CONTROL": control, "HAI_JOB_NAME": w["name"], "HAI_USER": w["user"],
    }
    return env


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


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    job_id: int
    rank: int
    popen: subprocess.Popen | None
    log: Path
    control: Path
    stop_sent: float = 0.0
    desired: str = "run"
    done: bool = False
    extra: dict = field(default_factory=dict)


class Agent:
    def __init__(self, cluster: Cluster, node: Node, cfg: HaiConfig, api: HaiClient, cluster_file: str) -> None:
        self.cluster = cluster
        self.node = node
        self.cfg = cfg
        self.api = api
        self.cluster_file = cluster_file
        self.epoch = uuid.uuid4().hex[:16]
        self.log_dir = cfg.log_dir(node.name)
        self.control_dir = cfg.state_dir / "control" / node.name
        self.state_file = cfg.state_dir / f"agent-{node.name}.json"
        self.procs: dict[tuple[int, int], Proc] = {}
        self.finished: set[tuple[int, int]] = set()
        self.reports: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.stopping = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="reporter", daemon=True)

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
            if f"HAI_JOB_ID={key.split(':')[0]}".encode() in env.split(b"\0"):
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
                    "facts": facts}, timeout=10)
                log.info("registered %s (epoch %s, %s GPUs from %s)", self.node.name, self.epoch, facts["gpus"],
                         facts["gpu_source"])
                return
            except ApiError as exc:
                log.warning("registration failed (%s); retrying", exc)
                stop.wait(delay)
                delay = min(delay * 2, 2.0)

    def run(self, stop: threading.Event) -> None:
        self.kill_leftovers()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._save_state()
        self._reporter.start()
        self.register(stop)
        seq = -1
        # each sync is a heartbeat: poll often enough that a live node is never taken for lost
        longpoll = min(self.cfg.longpoll, self.cfg.heartbeat_timeout / 4)
        while not stop.is_set():
            try:
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
            try:
                self.reconcile(resp["ranks"])
                self._check_stops()
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
            if w["desired"] == "run":
                if p is None and key not in self.finished and w["status"] == "created":
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
                    self.stop(p, w["desired"])
                elif p is None and key not in self.finished:  # decided, stopped before it started
                    self.finished.add(key)
                    self.reports.put({"job_id": key[0], "rank": key[1], "status": "killed", "exit_code": None,
                                      "message": "stopped before it started"})
        with self.lock:
            orphans = [p for k, p in self.procs.items() if k not in listed and not p.done]
            # forget ranks the server no longer lists once they have ended (bounded memory)
            for k in [k for k, p in self.procs.items() if k not in listed and p.done]:
                del self.procs[k]
            self.finished.intersection_update(listed)
        for p in orphans:  # the server no longer wants it (its node was declared lost)
            self.stop(p, "stop", grace=0.0)

    def start(self, w: dict) -> None:
        key = (w["job_id"], w["rank"])
        jobdir = self.log_dir / f"job-{w['job_id']}"
        jobdir.mkdir(parents=True, exist_ok=True)
        logpath = jobdir / f"rank-{w['rank']}.log"
        control = self.control_dir / f"job-{w['job_id']}"
        control.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **{k: str(v) for k, v in w["env"].items()},
               **job_env(w, self.node.name, self.cluster_file, str(control))}
        for k in ("FIREFLYER_RUN_DIR_CLUSTER",):
            env.pop(k, None)
        proc = Proc(w["job_id"], w["rank"], None, logpath, control)
        with self.lock:
            self.procs[key] = proc
        try:
            prog = w["command"][0]
            if "/" not in prog and shutil.which(prog, path=env.get("PATH")) is None:
                raise FileNotFoundError(f"no program {prog!r} on PATH")
            if "/" in prog and not os.access(os.path.join(w["workdir"] or "", prog), os.X_OK):
                raise FileNotFoundError(f"{prog!r} is not an executable file")
            with open(logpath, "ab") as out:
                if _SETPRIV:  # vfork + exec: see the note at _SETPRIV
                    popen = subprocess.Popen([_SETPRIV, "--pdeathsig", "KILL", "--", *w["command"]],
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             cwd=w["workdir"] or None, start_new_session=True)
                else:
                    popen = subprocess.Popen(w["command"], stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, env=env, cwd=w["workdir"] or None,
                                             start_new_session=True, preexec_fn=_pdeathsig_kill)
        except (OSError, ValueError) as exc:
            msg = f"cannot start {w['command'][0]!r} on {self.node.name}: {exc}"
            with open(logpath, "ab") as out:
                out.write(f"[hai agent] {msg}\n".encode())
            proc.done = True
            self.finished.add(key)
            self.reports.put({"job_id": key[0], "rank": key[1], "status": "failed", "exit_code": 127,
                              "message": msg})
            return
        proc.popen = popen
        self._save_state()
        report = {"job_id": key[0], "rank": key[1], "status": "running", "pid": popen.pid}
        self.reports.put(report)
        threading.Thread(target=self._wait, args=(key, proc), name=f"wait-{key[0]}.{key[1]}", daemon=True).start()

    def _signal(self, p: Proc, sig: int) -> None:
        if p.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, sig)

    def stop(self, p: Proc, desired: str, grace: float | None = None) -> None:
        if p.stop_sent:
            return
        p.desired = desired
        if desired == "suspend":
            with contextlib.suppress(OSError):
                (p.control / "suspend").write_text(str(time.time()))
        p.stop_sent = time.monotonic()
        p.extra["grace"] = self.cfg.stop_grace if grace is None else grace
        self._signal(p, signal.SIGTERM)
        if p.extra["grace"] == 0.0:
            self._signal(p, signal.SIGKILL)

    def _check_stops(self) -> None:
        now = time.monotonic()
        with self.lock:
            late = [p for p in self.procs.values() if p.stop_sent and not p.done
                    and now - p.stop_sent > p.extra.get("grace", self.cfg.stop_grace)]
        for p in late:
            self._signal(p, signal.SIGKILL)

    def _wait(self, key: tuple[int, int], p: Proc) -> None:
        rc = p.popen.wait()
        self._signal(p, signal.SIGKILL)  # whatever the rank left in its group (the whole tree goes)
        state = None
        with contextlib.suppress(OSError, ValueError):
            state = int((p.control / "whole_life_state").read_text().strip())
        if p.stop_sent:
            status, msg = "killed", f"stopped ({p.desired}), exit code {rc}"
        elif rc == 0:
            status, msg = "succeeded", ""
        else:
            status, msg = "failed", (f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}")
        with self.lock:
            p.done = True
            self.finished.add(key)
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
            if not pending:
                if self.stopping.is_set():
                    return
                continue
            merged: dict[tuple[int, int], dict] = {}
            for rep in pending:
                key = (rep["job_id"], rep["rank"])
                prev = merged.get(key)
                merged[key] = {**rep, "pid": rep.get("pid") or (prev or {}).get("pid")} if prev else rep
            pending = list(merged.values())
            try:
                self.api.request("POST", "/v1/agent/report", json={"node": self.node.name, "epoch": self.epoch,
                                                                   "ranks": pending}, timeout=10)
                pending = []
            except ApiError as exc:
                log.warning("report failed (%s); retrying", exc)
                if self.stopping.is_set():
                    return
                time.sleep(0.3)

    # -- logs -----------------------------------------------------------------------------------
    def read_log(self, job_id: int, rank: int, offset: int, size: int) -> tuple[bytes, bool]:
        path = self.log_dir / f"job-{job_id}" / f"rank-{rank}.log"
        key = (job_id, rank)
        with self.lock:
            p = self.procs.get(key)
        ended = key in self.finished or (p is not None and p.done) or (p is None and path.exists())
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
                at_end = f.tell() >= os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return b"", False
        return data, ended and at_end and not data


def main(argv: list[str] | None = None) -> None:
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
    rpc = RpcServer(node.address, svc.port if svc else 0, name=f"haiplatform.agent@{node.name}")

    def logs_read(a: dict, payload, ctx) -> Reply:
        if a.get("secret") != secret:
            raise PermissionError("logs.read needs the cluster secret")
        data, eof = agent.read_log(int(a["job_id"]), int(a["rank"]), int(a.get("offset", 0)),
                                   min(int(a.get("max", 65536)), 1 << 20))
        return Reply({"eof": eof, "n": len(data)}, [data] if data else [])

    rpc.register("logs.read", logs_read)
    rpc.start()
    log.info("agent of %s on %s:%s, API %s:%s", node.name, node.address, rpc.port, addr, port)
    try:
        agent.run(shutdown_event)
    finally:
        rpc.stop()
        api.close()


if __name__ == "__main__":
    main()
