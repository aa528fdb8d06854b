"""Who this rank is: rank, world size, node and rendezvous address, from arguments or environment.

Explicit arguments win; then the platform's / torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT, HAI_NODE_NAME,
HAI_CLUSTER_FILE); then MPI through mpi4py when the process was started by mpirun; else a
group of one. Also the engine settings (:class:`Config`, HFREDUCE_CHUNK_BYTES, HFREDUCE_SLOTS,
HFREDUCE_HEAP_BYTES) and this host's identity for the rendezvous.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

from network.errors import NetworkError

from .errors import InitError

__all__ = ["Config", "DEFAULT_TIMEOUT", "group_timeout", "resolve", "host_id"]

#: seconds: the group's timeout when neither ``timeout=`` nor $HFREDUCE_TIMEOUT sets one
#: (torch.distributed's default for gloo, 30 minutes)
DEFAULT_TIMEOUT = 1800.0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise InitError(f"environment variable {name}={v!r} is not an integer") from None


def _env_bytes(name: str, default: int) -> int:
    v = os.environ.get(name)
    if not v:
        return default
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    try:
        if v[-1].lower() in mult:
            return int(float(v[:-1]) * mult[v[-1].lower()])
        return int(v)
    except ValueError:
        raise InitError(f"environment variable {name}={v!r} is not a size (e.g. 4194304, 4M, 1G)") from None


class Config:
    """Engine settings (rank 0's values are used by the whole group)."""

    def __init__(self) -> None:
        self.chunk = _env_bytes("HFREDUCE_CHUNK_BYTES", 1 << 20)
        self.chunk = max(4096, self.chunk // 4096 * 4096)
        self.slots = max(2, _env_int("HFREDUCE_SLOTS") or 4)
        try:
            shm_size = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
        except OSError:
            shm_size = 1 << 30
        self.heap = _env_bytes("HFREDUCE_HEAP_BYTES", min(64 << 30, shm_size))
        self.heap = self.heap // 4096 * 4096

    def to_dict(self) -> dict:
        return {"chunk": self.chunk, "slots": self.slots, "heap": self.heap}



def _from_mpi() -> dict | None:
    """Rank, size, local rank and a rendezvous address from MPI, when started by mpirun."""
    if not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise InitError("started by mpirun but mpi4py is not installed: pip install 'fireflyer[mpi]' "
                        "(or set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    out = {"rank": comm.Get_rank(), "world_size": comm.Get_size(), "local_rank": local.Get_rank(),
           "local_world_size": local.Get_size()}
    # rank 0 binds an ephemeral port at the rendezvous and broadcasts it (rendezvous.MpiPublisher)
    out["master_addr"], out["master_port"], out["publish"], out["mpi_comm"] = None, 0, "mpi", comm
    local.Free()
    return out


def _store_owner() -> str | None:
    """Who holds MASTER_PORT with a key-value store hfreduce can publish its address in.

    "torchrun": torchrun's agent (TORCHELASTIC_RUN_ID is set); "torch": this process joined a
    torch.distributed group (rank 0 hosts its TCPStore there); None: nobody, the launcher kept
    the port for the job (hai, haiscale.spawn) and rank 0 binds it. See rendezvous.Publisher.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return "torch"
    except Exception:  # noqa: BLE001 - a torch without the distributed package
        pass
    return None


def resolve(rank, world_size, local_rank, local_world_size, master_addr, master_port, node, cluster,
            timeout) -> dict:
    """This rank's settings: arguments first, then the environment (see the module docstring)."""
    env = {"rank": _env_int("RANK"), "world_size": _env_int("WORLD_SIZE"), "local_rank": _env_int("LOCAL_RANK"),
           "local_world_size": _env_int("LOCAL_WORLD_SIZE"), "master_addr": os.environ.get("MASTER_ADDR"),
           "master_port": _env_int("HFREDUCE_MASTER_PORT")}
    env["publish"] = None
    if env["master_port"] is None and _env_int("MASTER_PORT") is not None:
        env["master_port"] = _env_int("MASTER_PORT")
        if master_port is None:
            env["publish"] = _store_owner()
    if rank is None and world_size is None and env["rank"] is None and env["world_size"] is None:
        mpi = _from_mpi()
        if mpi:
            env.update({k: v for k, v in mpi.items() if v is not None})
    args = {"rank": rank, "world_size": world_size, "local_rank": local_rank, "local_world_size": local_world_size,
            "master_addr": master_addr, "master_port": master_port}
    r = {k: (args[k] if args[k] is not None else env[k]) for k in args}
    r["publish"] = env["publish"] if master_port is None else None
    r["mpi_comm"] = env.get("mpi_comm")
    if r["world_size"] is None:
        r["world_size"] = 1
    if r["rank"] is None:
        if r["world_size"] != 1:
            raise InitError("no rank: pass rank= or set RANK (WORLD_SIZE is set)")
        r["rank"] = 0
    if not 0 <= r["rank"] < r["world_size"]:
        raise InitError(f"rank {r['rank']} is outside 0..{r['world_size'] - 1} (world size {r['world_size']})")
    if r["master_addr"] is None:
        r["master_addr"] = "127.0.0.1"
    if r["master_port"] is None:
        if r["world_size"] > 1:
            raise InitError("no rendezvous port: pass master_port= or set MASTER_PORT (or HFREDUCE_MASTER_PORT)")
        r["master_port"] = 0
    if node is None:
        node = os.environ.get("HAI_NODE_NAME")
    if node is None:
        nr = _env_int("NODE_RANK") if _env_int("NODE_RANK") is not None else _env_int("GROUP_RANK")
        node = f"node{nr}" if nr is not None else socket.gethostname()
    r["node"] = str(node)
    if cluster is None:
        cluster = os.environ.get("HAI_CLUSTER_FILE") or None
    if cluster is not None and not hasattr(cluster, "nodes"):
        from network.topology import load_cluster

        try:
            cluster = load_cluster(cluster)
        except NetworkError as exc:
            raise InitError(f"cannot read the cluster description: {exc}") from exc
    r["cluster"] = cluster
    r["timeout"] = group_timeout(timeout)
    return r


def group_timeout(timeout: float | datetime.timedelta | None) -> float:
    """The group's timeout in seconds: ``timeout`` (seconds or a timedelta, as torch's
    ``init_process_group``), else $HFREDUCE_TIMEOUT (seconds), else 30 minutes.

    [Note: one timeout, torch's default] It bounds start-up and every wait for a peer, on every
    rank, and haiscale's waits use it unless given their own. It used to be 60 s, which turned a
    rank paused for a checkpoint or a slow data loader into a failed job; torch's default (30 min
    for gloo) lets such a pause pass, and a dead peer is still found at once (a closed
    connection, a vanished pid), not when the timeout expires: the timeout is for stuck peers.
    """
    if timeout is None:
        t = os.environ.get("HFREDUCE_TIMEOUT", "").strip()
        try:
            timeout = float(t) if t else DEFAULT_TIMEOUT
        except ValueError:
            raise InitError(f"environment variable HFREDUCE_TIMEOUT={t!r} is not a number of seconds") from None
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise InitError(f"timeout must be seconds or a datetime.timedelta (got {timeout!r})") from None
    if not timeout > 0:
        raise InitError(f"timeout must be > 0 (got {timeout})")
    return timeout


def host_id() -> str:
    """This host (name and boot id): ranks claiming one node must run on one host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"

