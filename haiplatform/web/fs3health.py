"""fs3's health as the dashboard shows it: mgmtd's status, or plainly why it could not be read."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from network.topology import Cluster

__all__ = ["Fs3Health", "fs3_health"]


@dataclass
class Fs3Health:
    """``present``: the cluster description has fs3; ``error``: why mgmtd's status is missing."""

    present: bool
    where: str = ""
    error: str | None = None
    nodes: list[dict] = field(default_factory=list)        # name, address, alive, heartbeat age (s)
    targets_by_state: dict[str, int] = field(default_factory=dict)
    chains: list[dict] = field(default_factory=list)       # id, version, members [(target, state)]
    version: int | None = None
    balance: float | None = None


#: how long one answer of mgmtd serves every viewer's page (s); the lock keeps it to one RPC at a time
CACHE_SECONDS = 3.0
_cache: dict[tuple[str, int], tuple[float, Fs3Health]] = {}
_lock = threading.Lock()


def fs3_health(cluster: Cluster, timeout: float = 3.0, max_age: float = CACHE_SECONDS) -> Fs3Health:
    """Ask ``fs3.mgmtd`` for its status with the cluster key (the API is a service and holds it).

    [Note: why the API asks mgmtd] Only mgmtd knows which storage nodes are alive and which chain
    members serve; the API reads the same ``mgmtd.status`` the ``fs3 status`` command reads, with a
    short timeout, so a dead mgmtd makes the page say so instead of hanging it. An answer is kept
    ``max_age`` seconds: each logged-in user's reload is not one more RPC with the cluster key."""
    if cluster.service("fs3.mgmtd") is None:
        return Fs3Health(present=False)
    addr, port = cluster.endpoint("fs3.mgmtd")
    with _lock:
        hit = _cache.get((addr, port))
        if hit is not None and time.monotonic() - hit[0] < max_age:
            return hit[1]
        h = _ask(cluster, addr, port, timeout)
        _cache[(addr, port)] = (time.monotonic(), h)
        return h


def _ask(cluster: Cluster, addr: str, port: int, timeout: float) -> Fs3Health:
    from network import NetworkError, RpcClient, TrafficClass
    from network.auth import load_cluster_key

    h = Fs3Health(present=True, where=f"{addr}:{port}")
    try:
        with RpcClient(addr, port, timeout=timeout, connect_timeout=timeout, traffic_class=TrafficClass.STORAGE,
                       credential=load_cluster_key(cluster)) as rc:
            st = rc.call("mgmtd.status", {}).result
    except (NetworkError, OSError) as exc:
        h.error = f"cannot reach fs3.mgmtd at {addr}:{port}: {exc}"
        return h
    try:
        _fill(h, st)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # another version's or a broken answer
        return Fs3Health(present=True, where=h.where,
                         error=f"fs3.mgmtd at {addr}:{port} answered a status this page cannot read "
                               f"({type(exc).__name__}: {exc})")
    return h


def _fill(h: Fs3Health, st: dict) -> None:
    """Fill ``h`` from mgmtd.status's answer (KeyError/TypeError/ValueError when it is malformed)."""
    ages = st.get("heartbeat_age", {})
    h.nodes = [{"name": n, "address": f"{d['address']}:{d['port']}", "alive": bool(d["alive"]), "age": ages.get(n)}
               for n, d in sorted(st["nodes"].items())]
    for cid, c in sorted(st["chains"].items(), key=lambda kv: int(kv[0])):
        h.chains.append({"id": int(cid), "version": c["version"], "members": [(t, s) for t, s in c["members"]]})
        for _t, s in c["members"]:
            h.targets_by_state[s] = h.targets_by_state.get(s, 0) + 1
    h.version, h.balance = st.get("version"), st.get("balance")
