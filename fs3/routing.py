"""Target states, the chain state machine (pure functions) and the routing table clients read.

Public states of a target in a chain (what mgmtd publishes, 3FS's names):

============  =====================================  =========================
state         meaning                                 reads / writes
============  =====================================  =========================
serving       up to date, in the chain                reads and writes
syncing       receiving a resync from its predecessor writes only (at the tail)
waiting       alive, needs a resync, queued           neither
lastsrv       the last serving replica, now down      neither (its return restores the chain)
offline       down (or restarted, not yet resynced)   neither
============  =====================================  =========================

The transition rules are in :func:`next_chain` and tabulated in ``docs/fs3.md``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["SERVING", "SYNCING", "WAITING", "LASTSRV", "OFFLINE", "STATES", "TargetInput", "next_chain",
           "Routing", "SingleFlight"]

T = TypeVar("T")

SERVING, SYNCING, WAITING, LASTSRV, OFFLINE = "serving", "syncing", "waiting", "lastsrv", "offline"
STATES = (SERVING, LASTSRV, SYNCING, WAITING, OFFLINE)  # also the order inside a chain
_RANK = {s: i for i, s in enumerate(STATES)}


@dataclass(frozen=True)
class TargetInput:
    """What mgmtd knows of a target when it re-evaluates its chain."""

    alive: bool            # its node heartbeats within the failure timeout and reports it online
    restarted: bool = False  # its node came back with a new incarnation (process restarted)
    synced: bool = False   # its predecessor reported a complete resync at the current chain version


def next_chain(members: list[tuple[int, str]], inputs: dict[int, TargetInput]) -> list[tuple[int, str]]:
    """One evaluation of a chain: ``members`` is ``[(target, state), ...]`` head first.

    Returns the new member list (same targets, new states, reordered serving -> lastsrv ->
    syncing -> waiting -> offline, stable inside a state). The caller bumps the chain version
    when the result differs from ``members``.
    """
    st = dict(members)
    order = [t for t, _ in members]

    def up(t: int) -> bool:
        i = inputs.get(t)
        return bool(i and i.alive and not i.restarted)

    # 1. serving targets that died or restarted
    serving_alive = [t for t in order if st[t] == SERVING and up(t)]
    lastsrv_exists = any(s == LASTSRV for s in st.values())
    for t in order:
        if st[t] != SERVING or up(t):
            continue
        inp = inputs.get(t) or TargetInput(False)
        if serving_alive:
            st[t] = OFFLINE  # (restarted: it comes back below through waiting and a resync)
        elif inp.restarted and inp.alive:
            # the only serving replica restarted before anyone noticed: its disk holds every
            # committed write (nothing was acknowledged without it), so it keeps serving
            serving_alive.append(t)
        elif not lastsrv_exists:
            st[t] = LASTSRV  # the last copy of the newest data: wait for it
            lastsrv_exists = True
        else:
            st[t] = OFFLINE
    # 2. the last serving replica returns: it serves again, the others will resync from it
    for t in order:
        if st[t] == LASTSRV and (inputs.get(t) or TargetInput(False)).alive:
            st[t] = SERVING
            serving_alive.append(t)
    # 3. syncing / waiting / offline targets
    for t in order:
        inp = inputs.get(t) or TargetInput(False)
        s = st[t]
        if s == SYNCING:
            if not inp.alive:
                st[t] = OFFLINE
            elif inp.restarted:
                st[t] = WAITING
            elif inp.synced and serving_alive:
                st[t] = SERVING
        elif s == WAITING and not inp.alive:
            st[t] = OFFLINE
        elif s == OFFLINE and inp.alive:
            st[t] = WAITING
    # 4. at most one syncing target per chain, and only when someone serves to sync from
    if any(st[t] == SERVING for t in order) and not any(st[t] == SYNCING for t in order):
        for t in order:
            if st[t] == WAITING:
                st[t] = SYNCING
                break
    new_order = sorted(order, key=lambda t: _RANK[st[t]])
    return [(t, st[t]) for t in new_order]


@dataclass
class Routing:
    """The routing table as clients and storage servers hold it (built from mgmtd's dict)."""

    version: int = 0
    chunk_size: int = 1 << 20
    replication: int = 3
    nodes: dict = field(default_factory=dict)      # name -> {"address", "port", "alive"}
    targets: dict = field(default_factory=dict)    # target id -> node name
    chains: dict = field(default_factory=dict)     # chain id -> {"version", "members": [(t, state)]}
    balance: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> Routing:
        return cls(version=d["version"], chunk_size=d["chunk_size"], replication=d["replication"],
                   nodes=d["nodes"], targets={int(k): v for k, v in d["targets"].items()},
                   chains={int(k): {"version": v["version"], "members": [tuple(m) for m in v["members"]]}
                           for k, v in d["chains"].items()},
                   balance=d.get("balance", 1.0))

    def chain_ids(self) -> list[int]:
        return sorted(self.chains)

    def write_set(self, chain: int) -> list[tuple[int, str]]:
        """Targets that take writes, head first: serving then syncing. Empty when no target
        serves: a syncing target alone must never acknowledge a write (its resync from a
        returning lastsrv target would later overwrite it)."""
        ws = [(t, s) for t, s in self.chains[chain]["members"] if s in (SERVING, SYNCING)]
        return ws if ws and ws[0][1] == SERVING else []

    def serving(self, chain: int) -> list[int]:
        return [t for t, s in self.chains[chain]["members"] if s == SERVING]

    def state_of(self, chain: int, target: int) -> str | None:
        for t, s in self.chains[chain]["members"]:
            if t == target:
                return s
        return None

    def node_of(self, target: int) -> str:
        return self.targets[target]

    def endpoint(self, target: int) -> tuple[str, int]:
        n = self.nodes[self.targets[target]]
        return n["address"], n["port"]

    def target_on(self, chain: int, node: str) -> int | None:
        for t, _ in self.chains[chain]["members"]:
            if self.targets.get(t) == node:
                return t
        return None


class SingleFlight(Generic[T]):
    """Coalesces concurrent calls of ``fn`` (here: fetching the routing table from mgmtd).

    [Note: one refresh for a burst] When a chain changes, every request that meets the new
    version (a client's batch, each write a storage server receives) asks for a fresh routing
    table at about the same moment. Calls run one at a time; a caller that arrives while one
    runs waits for it to end, then takes the result of a call that *started after it arrived*
    (so it is never handed a table older than its own reason to ask) or makes that call itself.
    A burst of N callers therefore costs mgmtd two fetches, not N. A call that raised leaves
    no result: the next waiter tries itself. Waiting is bounded by ``timeout`` (``TimeoutError``).
    """

    def __init__(self, fn: Callable[[], T], timeout: float) -> None:
        self._fn = fn
        self.timeout = timeout
        self._run = threading.Lock()    # held by the caller whose call runs
        self._meta = threading.Lock()
        self._started = 0               # calls started so far
        self._fresh = 0                 # start number of the last call that returned
        self._result: T | None = None
        self.waiting = 0                # callers waiting for a call in progress (for tests and stats)

    @property
    def calls(self) -> int:
        """Calls of ``fn`` made so far."""
        return self._started

    def __call__(self) -> T:
        with self._meta:
            arrived = self._started
            self.waiting += 1
        try:
            got = self._run.acquire(timeout=self.timeout)
        finally:
            with self._meta:
                self.waiting -= 1
        if not got:
            raise TimeoutError(f"a call in progress did not end within {self.timeout} s")
        try:
            if self._fresh > arrived:
                return self._result  # type: ignore[return-value]
            with self._meta:
                self._started += 1
                mine = self._started
            result = self._fn()
            self._fresh, self._result = mine, result
            return result
        finally:
            self._run.release()
