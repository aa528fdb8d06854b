"""The cluster's nodes: list them; admins drain and undrain them (``/v1/nodes``)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from sqlalchemy import select

from ..db import Job, NodeRow, event_row
from ..errors import NotFound
from ..states import JobStatus
from .deps import Admin_, Principal, State_, User_
from .models import DrainSpec
from .state import ApiState

__all__ = ["router"]

router = APIRouter()


def _node_json(n: NodeRow, held: dict[str, int], now: float) -> dict:
    return {"name": n.name, "address": n.address, "zone": n.zone, "leaf": n.leaf, "gpus": n.gpus,
            "cpus": n.cpus, "memory_gib": n.memory_gib, "state": n.state, "drained": n.drained,
            "drain_reason": n.drain_reason, "job": held.get(n.name), "heartbeat_age": round(now - n.last_seen, 2),
            "facts": n.facts}


def _held(s) -> dict[str, int]:
    held = {}
    for j in s.scalars(select(Job).where(Job.status.in_(JobStatus.ACTIVE))):
        for n in j.assigned_nodes:
            held[n] = j.id
    return held


@router.get("/v1/nodes")
def nodes(p: User_, st: State_) -> list[dict]:
    with st.db.read() as s:
        held = _held(s)
        now = time.time()
        return [_node_json(n, held, now) for n in s.scalars(select(NodeRow).order_by(NodeRow.name))]


def _drain(st: ApiState, name: str, drained: bool, reason: str, p: Principal) -> dict:
    with st.db.write() as s:
        n = s.get(NodeRow, name)
        if n is None:
            raise NotFound(f"no node {name!r} has registered (known: "
                           f"{', '.join(s.scalars(select(NodeRow.name))) or 'none'})")
        n.drained, n.drain_reason = drained, reason if drained else ""
        event_row(s, "drained" if drained else "undrained", f"by {p.name}: {reason}", node=name)
        out = _node_json(n, _held(s), time.time())
    st.sched_events.bump()
    return out


@router.post("/v1/nodes/{name}/drain")
def drain(name: Annotated[str, PathParam(max_length=64)], p: Admin_, st: State_,
          body: DrainSpec | None = None) -> dict:
    return _drain(st, name, True, body.reason if body else "", p)


@router.post("/v1/nodes/{name}/undrain")
def undrain(name: Annotated[str, PathParam(max_length=64)], p: Admin_, st: State_) -> dict:
    return _drain(st, name, False, "", p)
