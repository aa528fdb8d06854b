"""The node agents' side: register, long-poll for work (with heartbeats) and report ranks
(``/v1/agent/*``, the cluster secret only)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import bindparam, case, select, update

from ..db import Job, NodeRow, Rank, event_row
from ..errors import ApiError, Conflict, NotFound
from ..states import NodeState, RankStatus
from .deps import Service_, State_
from .models import NO_NUL, SEQ_MAX, RegisterSpec, ReportSpec
from .nodes import mark_validating
from .state import ApiState

__all__ = ["router"]

router = APIRouter()

# an agent's work items: its node's live ranks with their jobs (built once: the agents' hot path)
_WORK = select(Rank.rank, Rank.local_rank, Rank.status, Rank.desired, Job.id.label("job_id"), Job.command, Job.env,
               Job.workdir, Job.name, Job.user, Job.chain_id, Job.restart_count, Job.whole_life_state,
               Job.assigned_nodes, Job.master_port, Job.procs_per_node, Job.grace, Job.array_id, Job.array_index,
               Job.output).join(Job, Job.id == Rank.job_id).where(
    Rank.node == bindparam("node"), Rank.status.in_(RankStatus.LIVE))


@router.post("/v1/agent/register")
def register(spec: RegisterSpec, p: Service_, st: State_) -> dict:
    cluster = st.cluster
    try:
        cn = cluster.node(spec.node)
    except KeyError as exc:
        raise NotFound(f"node {spec.node!r} is not in the cluster description {cluster.source}") from exc
    now = time.time()
    with st.db.write() as s:
        n = s.get(NodeRow, spec.node)
        if n is None:
            n = NodeRow(name=spec.node, registered_at=now)
            s.add(n)
        restarted = bool(n.agent_epoch) and n.agent_epoch != spec.epoch
        n.address, n.zone, n.leaf = cn.address, cn.zone, cn.leaf
        n.gpus, n.cpus, n.memory_gib = spec.gpus, spec.cpus, spec.memory_gib
        n.facts, n.agent_epoch, n.last_seen = spec.facts, spec.epoch, now
        was = n.state
        n.state = NodeState.UP
        if spec.validating:  # the node validator runs first: no job before it passes
            mark_validating(s, n)
        if restarted:  # its old processes are gone: whatever ran there is lost
            s.execute(update(Rank).where(Rank.node == spec.node, Rank.status.in_(RankStatus.LIVE)).values(
                status=RankStatus.LOST, finished_at=now, message="the node's agent restarted"))
        event_row(s, "node_registered", f"agent epoch {spec.epoch}" + (" (restarted)" if restarted else "")
                  + ("" if was == NodeState.UP else f", was {was}"), node=spec.node)
    st.epochs[spec.node] = spec.epoch
    st.last_beat[spec.node] = time.monotonic()
    st.sched_events.bump()
    return {"ok": True, "seq": st.agent_events[spec.node].seq}


def _beat_due(st: ApiState, node: str, epoch: str) -> bool:
    """Whether this sync must write a heartbeat (at most one per heartbeat_interval / 2)."""
    if st.epochs.get(node) not in (None, epoch):
        raise Conflict(f"agent epoch {epoch} of {node} is stale; register again")
    return time.monotonic() - st.last_beat.get(node, 0.0) >= st.cfg.heartbeat_interval / 2


def _beat(st: ApiState, node: str, epoch: str) -> None:
    if not _beat_due(st, node, epoch):
        return
    st.last_beat[node] = time.monotonic()
    with st.db.write() as s:
        n = s.get(NodeRow, node)
        if n is None:
            raise NotFound(f"node {node} has not registered")
        n.last_seen = time.time()
        back = n.state != NodeState.UP
        if back:
            n.state = NodeState.UP
            event_row(s, "node_back", "heartbeats resumed", node=node)
    if back:
        st.sched_events.bump()


def _work(st: ApiState, node: str, epoch: str) -> list[dict]:
    _beat(st, node, epoch)
    with st.db.ro_engine.begin() as s:  # Core rows: the agents' hot path
        rows = s.execute(_WORK, {"node": node}).all()
        cfg = st.cfg
        out = []
        for r in rows:  # one row: a rank with its job's columns
            if len(r.assigned_nodes) > 1 and not r.master_port and r.assigned_nodes[0] != node:
                continue  # wait for the master node's agent to pick the port
            out.append({"job_id": r.job_id, "rank": r.rank, "local_rank": r.local_rank, "status": r.status,
                        "desired": r.desired, "command": r.command, "env": r.env, "workdir": r.workdir,
                        "name": r.name, "user": r.user, "chain_id": r.chain_id,
                        "restart_count": r.restart_count, "whole_life_state": r.whole_life_state,
                        "nodes": r.assigned_nodes, "master_addr": st.cluster.node(r.assigned_nodes[0]).address,
                        "master_port": r.master_port, "ppn": r.procs_per_node,
                        "grace": cfg.job_grace(r.grace), "ack_timeout": cfg.suspend_ack_timeout,
                        "array_id": r.array_id, "array_index": r.array_index, "output": r.output})
        return out


@router.get("/v1/agent/sync")
async def sync(p: Service_, st: State_, node: Annotated[str, Query(max_length=64)],
               epoch: Annotated[str, Query(max_length=40, pattern=NO_NUL)],
               seq: Annotated[int, Query(ge=-1, le=SEQ_MAX)] = -1,
               timeout: Annotated[float, Query(ge=0, le=60)] = 2.0) -> dict:
    if node not in st.agent_events:
        raise NotFound(f"node {node!r} is not in the cluster description {st.cluster.source}")
    if _beat_due(st, node, epoch):  # a thread hop only when a heartbeat must be written
        await run_in_threadpool(_beat, st, node, epoch)
    cur = await st.agent_events[node].wait(seq, timeout)
    work, validate = await run_in_threadpool(_work_and_requests, st, node, epoch)
    return {"seq": cur, "ranks": work, "validate": validate}


def _work_and_requests(st: ApiState, node: str, epoch: str) -> tuple[list[dict], float]:
    """The node's work items, and an admin's pending request to validate it (a timestamp; 0: none)."""
    work = _work(st, node, epoch)
    with st.db.ro_engine.begin() as s:
        req = s.execute(select(NodeRow.validate_requested).where(NodeRow.name == node)).scalar()
    return work, req or 0.0


def _activity(s, job_id: int, act) -> None:
    """Keep the newest of what the agents saw of a job: each column only moves forward (several nodes
    report on one job, and a report may arrive late)."""
    vals = {}
    for col in ("last_output", "last_checkpoint", "suspend_acked_at"):
        v = getattr(act, col)
        if v is not None:
            c = getattr(Job, col)
            vals[col] = case((c.is_(None), v), (c < v, v), else_=c)
    if vals:
        s.execute(update(Job).where(Job.id == job_id).values(**vals))


@router.post("/v1/agent/report")
def report(spec: ReportSpec, p: Service_, st: State_) -> dict:
    now = time.time()
    ended = False
    with st.db.engine.begin() as s:  # Core: conditional UPDATEs, ranks only move forward
        for jid, port in spec.master_ports.items():
            s.execute(update(Job).where(Job.id == jid, Job.master_port == 0).values(master_port=port))
        for rr in spec.ranks:
            mine = (Rank.job_id == rr.job_id, Rank.rank == rr.rank, Rank.node == spec.node)
            if rr.status == RankStatus.RUNNING:
                s.execute(update(Rank).where(*mine, Rank.status == RankStatus.CREATED).values(
                    status=RankStatus.RUNNING, pid=rr.pid, started_at=now))
            elif rr.status in RankStatus.DONE:
                vals = {"status": rr.status, "exit_code": rr.exit_code, "finished_at": now,
                        "message": rr.message[:500]}
                if rr.pid:
                    vals["pid"] = rr.pid
                ended |= bool(s.execute(update(Rank).where(*mine, Rank.status.in_(RankStatus.LIVE)).values(
                    **vals)).rowcount)
            else:
                raise ApiError(f"rank status {rr.status!r} cannot be reported (running, "
                               f"{', '.join(RankStatus.DONE)})", 422)
            if rr.whole_life_state is not None:
                s.execute(update(Job).where(Job.id == rr.job_id).values(whole_life_state=rr.whole_life_state))
        for jid, act in spec.activity.items():
            _activity(s, jid, act)
    if spec.master_ports:
        with st.db.read() as s:
            for jid in spec.master_ports:
                j = s.get(Job, jid)
                for n in (j.assigned_nodes if j else ()):
                    if n in st.agent_events:
                        st.agent_events[n].bump()
    if spec.ranks:
        st.sched_events.bump()
    return {"ok": True, "ended": ended}
