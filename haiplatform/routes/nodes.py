"""The cluster's nodes: list them; admins drain and undrain them and have them validated (``/v1/nodes``,
``/v1/validations``); the agents report their validator runs (``/v1/agent/validation``, ``/v1/agent/time``).

[Note: the drain loop] A validator run that fails drains its node with the summary as the reason
("validator: cpu_gemm 12 GFLOP/s < 50% of baseline 80"), ``drained_by = "validator"``; a run that
passes returns a node the validator drained, and only such a node: a node an admin drained (or the
scheduler, after losing it) stays drained until an admin undrains it. An agent that validates at
start registers with ``validating``: the validator drains its node until the first run passes, so
the node takes no job before (docs/validator.md). A scheduled or requested run first drains the node
the same way (``/v1/agent/validating``); a failing run re-queues the work placed on the node that has
not started (its ranks are lost, as on a lost node), so it never runs on a node found bad.

Only the node's current agent (the epoch it registered with) may drain it or return it: a stale agent
or another service is answered 409.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from sqlalchemy import func, select, update

from ..db import Job, NodeRow, Rank, Validation, event_row
from ..errors import Conflict, NotFound
from ..states import Desired, JobStatus, RankStatus
from .deps import Admin_, Principal, Service_, State_, User_
from .models import NO_NUL, NODE_NAME, DrainSpec, Text, ValidationSpec
from .state import ApiState

__all__ = ["router", "VALIDATOR", "mark_validating"]

router = APIRouter()

#: ``nodes.drained_by`` of a node the validator drained
VALIDATOR = "validator"
NodeName = Annotated[str, PathParam(max_length=64, pattern=NO_NUL)]


def _validation_json(v: Validation | None) -> dict | None:
    if v is None:
        return None
    return {"id": v.id, "at": v.at, "ok": v.ok, "failed": v.failed, "summary": v.summary, "trigger": v.trigger,
            "request": v.request}


def _node_json(n: NodeRow, held: dict[str, int], now: float, last: Validation | None = None) -> dict:
    return {"name": n.name, "address": n.address, "zone": n.zone, "leaf": n.leaf, "gpus": n.gpus,
            "cpus": n.cpus, "memory_gib": n.memory_gib, "state": n.state, "drained": n.drained,
            "drain_reason": n.drain_reason, "drained_by": n.drained_by if n.drained else "",
            "job": held.get(n.name), "heartbeat_age": round(now - n.last_seen, 2), "facts": n.facts,
            "validation": _validation_json(last), "validate_requested": n.validate_requested or None}


def _held(s) -> dict[str, int]:
    held = {}
    for j in s.scalars(select(Job).where(Job.status.in_(JobStatus.ACTIVE))):
        for n in j.assigned_nodes:
            held[n] = j.id
    return held


def _last_validations(s, node: str | None = None) -> dict[str, Validation]:
    """Each node's newest validator run."""
    newest = select(func.max(Validation.id)).group_by(Validation.node)
    if node is not None:
        newest = newest.where(Validation.node == node)
    return {v.node: v for v in s.scalars(select(Validation).where(Validation.id.in_(newest)))}


@router.get("/v1/nodes")
def nodes(p: User_, st: State_) -> list[dict]:
    with st.db.read() as s:
        held = _held(s)
        last = _last_validations(s)
        now = time.time()
        return [_node_json(n, held, now, last.get(n.name)) for n in s.scalars(select(NodeRow).order_by(NodeRow.name))]


def _get_node(s, name: str) -> NodeRow:
    n = s.get(NodeRow, name)
    if n is None:
        raise NotFound(f"no node {name!r} has registered (known: "
                       f"{', '.join(s.scalars(select(NodeRow.name))) or 'none'})")
    return n


def _drain(st: ApiState, name: str, drained: bool, reason: str, p: Principal) -> dict:
    with st.db.write() as s:
        n = _get_node(s, name)
        n.drained, n.drain_reason = drained, reason if drained else ""
        n.drained_by = "admin" if drained else ""
        event_row(s, "drained" if drained else "undrained", f"by {p.name}: {reason}", node=name)
        out = _node_json(n, _held(s), time.time(), _last_validations(s, name).get(name))
    st.sched_events.bump()
    return out


@router.post("/v1/nodes/{name}/drain")
def drain(name: NodeName, p: Admin_, st: State_, body: DrainSpec | None = None) -> dict:
    return _drain(st, name, True, body.reason if body else "", p)


@router.post("/v1/nodes/{name}/undrain")
def undrain(name: NodeName, p: Admin_, st: State_) -> dict:
    return _drain(st, name, False, "", p)


# -- the node validator ---------------------------------------------------------------------------------

@router.post("/v1/nodes/{name}/validate")
def validate(name: NodeName, p: Admin_, st: State_) -> dict:
    """Ask the node's agent to run the validator (it sees the request in its next sync and runs once
    no job runs on the node); the run's report answers the request."""
    now = time.time()
    with st.db.write() as s:
        n = _get_node(s, name)
        n.validate_requested = now
        last = _last_validations(s, name).get(name)
        event_row(s, "validate_requested", f"by {p.name}", node=name)
    if name in st.agent_events:
        st.agent_events[name].bump()
    return {"node": name, "requested": now, "last_id": last.id if last else 0}


def _run_json(v: Validation) -> dict:
    return {**_validation_json(v), "node": v.node, "duration": v.duration, "received_at": v.received_at,
            "checks": v.checks}


@router.get("/v1/validations")
def validations(p: Admin_, st: State_, node: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
                after: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
                before: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[dict]:
    """Validator runs, newest first (of ``node``; with an id above ``after`` and below ``before``)."""
    q = select(Validation).where(Validation.id > after).order_by(Validation.id.desc()).limit(limit)
    if before is not None:
        q = q.where(Validation.id < before)
    if node is not None:
        q = q.where(Validation.node == node)
    with st.db.read() as s:
        if node is not None:
            _get_node(s, node)
        return [_run_json(v) for v in s.scalars(q)]


@router.get("/v1/agent/time")
async def server_time(p: Service_) -> dict:
    """The API server's clock (the validator's clock check)."""
    return {"now": time.time()}


def mark_validating(s, n: NodeRow, trigger: str = "start") -> None:
    """At an agent's registration with ``validating`` (or before a scheduled or requested run): the
    validator drains the node until a run passes (a node drained by anyone else stays as it is)."""
    if not n.drained:
        why = "agent start" if trigger == "start" else trigger
        n.drained, n.drained_by, n.drain_reason = True, VALIDATOR, f"validator: validating ({why})"
        event_row(s, "node_drained", n.drain_reason, node=n.name)


def _current_agent(s, node: str, epoch: str) -> NodeRow:
    """The node's row, if ``epoch`` is its registered agent's (Conflict: a stale agent or another caller)."""
    n = _get_node(s, node)
    if epoch != n.agent_epoch:
        raise Conflict(f"agent epoch {epoch!r} is not the registered agent of {node}: only that agent may "
                       "report its validation (register again)")
    return n


class ValidatingSpec(BaseModel):
    """``POST /v1/agent/validating``: the agent's validator is about to measure its node."""

    node: NODE_NAME
    epoch: Text(40)
    trigger: str = Field("request", pattern="^(start|schedule|request)$")


@router.post("/v1/agent/validating")
def begin_validation(spec: ValidatingSpec, p: Service_, st: State_) -> dict:
    """Drain the node for a validator run (drained_by validator, unless it is drained already)."""
    with st.db.write() as s:
        n = _current_agent(s, spec.node, spec.epoch)
        was = n.drained
        mark_validating(s, n, spec.trigger)
        out = {"ok": True, "drained_by": n.drained_by}
    if not was:
        st.sched_events.bump()
    return out


def _requeue_unstarted(s, node: str, now: float) -> int:
    """Ranks placed on ``node`` that have not started are lost (the policy re-queues their jobs)."""
    active = select(Job.id).where(Job.status.in_(JobStatus.ACTIVE))
    return s.execute(update(Rank).where(Rank.node == node, Rank.status == RankStatus.CREATED,
                                        Rank.job_id.in_(active)).values(
        status=RankStatus.LOST, finished_at=now, desired=Desired.STOP,
        message=f"node {node} failed the validator before the rank started")).rowcount


@router.post("/v1/agent/validation")
def report_validation(spec: ValidationSpec, p: Service_, st: State_) -> dict:
    """Keep a run; drain the node when it failed (re-queueing the work placed on it that has not
    started), return it when it passed and the validator drained it."""
    now = time.time()
    with st.db.write() as s:
        n = _current_agent(s, spec.node, spec.epoch)
        v = Validation(node=spec.node, at=spec.at, received_at=now, ok=spec.ok, trigger=spec.trigger,
                       request=spec.request, duration=spec.duration, failed=list(spec.failed),
                       summary=spec.summary, checks=[c.model_dump() for c in spec.checks])
        s.add(v)
        if spec.request and n.validate_requested and spec.request >= n.validate_requested:
            n.validate_requested = 0.0  # answered
        changed = False
        if not spec.ok:
            reason = spec.summary[:200] if spec.summary.startswith("validator:") else f"validator: {spec.summary}"[:200]
            if not n.drained:
                n.drained, n.drained_by, n.drain_reason = True, VALIDATOR, reason
                event_row(s, "node_drained", reason, node=n.name)
                changed = True
            elif n.drained_by == VALIDATOR:
                n.drain_reason = reason
            if (lost := _requeue_unstarted(s, n.name, now)):
                event_row(s, "node_requeued", f"{lost} rank(s) placed on the node before the failing run "
                          "are re-queued", node=n.name)
                changed = True
        elif n.drained and n.drained_by == VALIDATOR:
            n.drained, n.drained_by, n.drain_reason = False, "", ""
            event_row(s, "node_returned", f"validator: passed ({spec.summary})"[:1000], node=n.name)
            changed = True
        event_row(s, "validated", f"{spec.trigger}: {spec.summary}", node=n.name)
        s.flush()
        out = {"ok": True, "id": v.id, "drained": n.drained, "drained_by": n.drained_by if n.drained else ""}
    if changed:
        st.sched_events.bump()
    return out
