"""The API's one state object (``app.state.api``) and its notification channels.

[Note: events, not polling] Two notification channels live in the API process. ``sched`` is
bumped after every commit the scheduler must react to (a submission, a rank's end, a node change,
a stop request); the scheduler long-polls ``/v1/internal/wait`` on it. Its second counter, ``cap``,
counts the bumps that may free capacity (all but submissions), and ``levels`` counts submissions and
priority changes per priority level (a submission may preempt a lower level): see the scheduler's
note.
``agents`` is bumped when the scheduler reports new decisions (``/v1/internal/notify``) or a
master port is known; agents long-poll ``/v1/agent/sync`` on it. A bump always follows the
commit, and a waiter passes the last sequence number it saw, so no wake-up is lost; the tick (and
the long-poll timeout) only bound the damage of a lost connection.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from network.topology import Cluster

from ..config import HaiConfig
from ..db import Database
from ..limits import Limits

__all__ = ["Notifier", "ApiState", "api_state"]


class Notifier:
    """A sequence number that async waiters can block on; bumped from any thread."""

    def __init__(self) -> None:
        self.seq = 0
        self.cap = 0  # bumps that may free capacity (everything but a submission)
        self.levels: dict[int, int] = {}  # priority level -> bumps at it (submissions, priority changes)
        self._lock = threading.Lock()
        self._waiters: set[asyncio.Future] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def bump(self, capacity: bool = True, priority: int | None = None) -> int:
        with self._lock:
            self.seq += 1
            self.cap += capacity
            if priority is not None:
                self.levels[priority] = self.levels.get(priority, 0) + 1
            waiters, self._waiters = self._waiters, set()
            seq = self.seq
        for fut in waiters:
            loop = fut.get_loop()
            loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))
        return seq

    def counts(self) -> dict:
        """The counters at one instant: ``seq``, ``cap`` and ``levels`` (a copy)."""
        with self._lock:
            return {"seq": self.seq, "cap": self.cap, "levels": {str(k): v for k, v in self.levels.items()}}

    async def wait(self, seen: int, timeout: float) -> int:
        """Return the sequence number as soon as it differs from ``seen`` (or after ``timeout``)."""
        with self._lock:
            if self.seq != seen:
                return self.seq
            fut = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(fut)
        return self.seq


@dataclass(eq=False)
class ApiState:
    """Everything the routes share: one per app, on ``app.state.api`` (built by ``create_app``)."""

    cluster: Cluster
    cfg: HaiConfig
    db: Database
    secret: str
    limits: Limits
    sched_events: Notifier = field(default_factory=Notifier)
    agent_events: dict[str, Notifier] = field(default_factory=dict)  # one per node of the cluster
    token_cache: dict[str, tuple[float, Any]] = field(default_factory=dict)  # token -> (when, Principal | None | why refused)
    epochs: dict[str, str] = field(default_factory=dict)       # node -> the epoch of its live agent
    last_beat: dict[str, float] = field(default_factory=dict)  # node -> when its last_seen was written
    agent_rpc: dict[str, Any] = field(default_factory=dict)    # node -> RpcPool to its agent (logs)
    rpc_lock: threading.Lock = field(default_factory=threading.Lock)
    positions: tuple[int, float, dict] = (-1, 0.0, {})  # (sched_events.seq, when, job -> place): routes/jobs

    @property
    def profile(self):
        """The scheduling policy's profile (``haiplatform.policy``), for queue positions."""
        from ..policy import PROFILES

        return PROFILES[self.cfg.policy]

    @classmethod
    def build(cls, cluster: Cluster, cfg: HaiConfig, db: Database) -> ApiState:
        return cls(cluster=cluster, cfg=cfg, db=db, secret=cfg.secret(), limits=Limits.from_config(cfg),
                   agent_events={name: Notifier() for name in cluster.nodes})

    def agent_client(self, node: str):
        """The RPC pool to ``node``'s agent (made on first use)."""
        from network.auth import load_cluster_key
        from network.rpc import RpcPool

        with self.rpc_lock:
            c = self.agent_rpc.get(node)
            if c is None:
                addr, port = self.cluster.endpoint("haiplatform.agent", node)
                c = self.agent_rpc[node] = RpcPool(addr, port, size=4, timeout=10.0, connect_timeout=3.0,
                                                   credential=load_cluster_key(self.cluster))
            return c


async def api_state(request: Request) -> ApiState:
    """The app's state object (a dependency: ``State_`` in :mod:`haiplatform.routes.deps`; async, so it
    costs no thread-pool hop)."""
    return request.app.state.api
