"""Users' jobs: submit, list, show, stop, suspend and read or follow a rank's log (``/v1/jobs``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import bindparam, func, select

from ..db import Event, Job, Quota, Rank, event_row
from ..errors import ApiError, Conflict, Forbidden, NotFound
from ..limits import GuardedStream
from ..policy import NORMAL, WAITING, QuotaView, never_fits
from ..states import AUTO, JobStatus, RankStatus, StopCode
from .deps import Principal, State_, User_, limit_key
from .models import INT32, OFFSET_MAX, JobId, JobSpec, PrioritySpec
from .state import ApiState

__all__ = ["router", "job_json"]

router = APIRouter()

# -- prepared statements of the submission path (built once: statement construction and cache-key
# generation cost more than SQLite's own work per submission) ---------------------------------------
_JOBS = Job.__table__
_COUNT_LIVE = select(func.count()).select_from(_JOBS).where(
    _JOBS.c.user == bindparam("user"), _JOBS.c.status.in_(JobStatus.LIVE))
_INSERT_JOB = _JOBS.insert().returning(_JOBS.c.id)
_SET_CHAIN = _JOBS.update().where(_JOBS.c.id == bindparam("b_id")).values(
    chain_id=bindparam("b_id"), first_id=bindparam("b_id"))
_INSERT_EVENT = Event.__table__.insert()


def _run_s(a: Job) -> float:
    """How long an attempt ran (until now while it runs)."""
    if a.started_at is None:
        return 0.0
    return max(0.0, (a.finished_at or time.time()) - a.started_at)


def job_json(j: Job, ranks: list[Rank] | None = None, attempts: list[Job] | None = None,
             position: int | None = None) -> dict:
    chain = ("finished" if j.status in JobStatus.ENDED else "running" if j.status in JobStatus.ACTIVE
             else "waiting_init" if j.restart_count == 0 else "suspended")
    out = {"id": j.id, "chain_id": j.chain_id, "first_id": j.first_id, "restart_count": j.restart_count,
           "name": j.name, "user": j.user, "group": j.group, "shared_in_group": j.shared_in_group,
           "command": j.command, "env": j.env, "workdir": j.workdir, "nodes": j.nodes,
           "procs_per_node": j.procs_per_node, "priority": j.priority, "status": j.status,
           "chain_status": chain, "reason": j.reason, "stop_code": j.stop_code,
           "stop": StopCode.describe(j.stop_code), "assigned_nodes": j.assigned_nodes,
           "master_port": j.master_port, "exit_code": j.exit_code, "whole_life_state": j.whole_life_state,
           "created_at": j.created_at, "scheduled_at": j.scheduled_at, "started_at": j.started_at,
           "finished_at": j.finished_at, "submitted_priority": j.submitted_priority,
           "auto_priority": j.submitted_priority == AUTO, "submitted_at": j.submitted_at,
           "time_limit": j.time_limit, "grace": j.grace, "watchdog": j.watchdog,
           "chain_run_s": j.chain_run_s + (_run_s(j) if j.status in JobStatus.ACTIVE else 0.0),
           "last_output": j.last_output, "last_checkpoint": j.last_checkpoint,
           "suspend_sent_at": j.suspend_sent_at, "suspend_acked_at": j.suspend_acked_at,
           "position": position}
    if ranks is not None:
        out["ranks"] = [{"rank": r.rank, "node": r.node, "local_rank": r.local_rank, "status": r.status,
                         "exit_code": r.exit_code, "pid": r.pid, "message": r.message} for r in ranks]
    if attempts is not None:
        out["attempts"] = [{"id": a.id, "restart_count": a.restart_count, "status": a.status,
                            "stop": StopCode.describe(a.stop_code), "stop_code": a.stop_code, "reason": a.reason,
                            "exit_code": a.exit_code, "nodes": a.assigned_nodes, "priority": a.priority,
                            "created_at": a.created_at, "scheduled_at": a.scheduled_at,
                            "started_at": a.started_at, "finished_at": a.finished_at, "run_s": _run_s(a),
                            "suspend_sent_at": a.suspend_sent_at, "suspend_acked_at": a.suspend_acked_at}
                           for a in attempts]
    return out


#: a queue position may be this stale (s) when no submission or job end happened since
POSITIONS_TTL = 1.0


def _positions(st: ApiState, jobs: list[Job]) -> dict[int, int]:
    """Queued attempts' places in the queue as the policy serves it (1 = next); {} when none is queued.

    [Note: a snapshot for positions] A place depends on every queued attempt (priorities, first
    submissions, the policy's order), so it takes the scheduler's own snapshot; only a listing that
    shows a queued attempt pays for it, and at most once a second while no event came: a client
    waiting on a queued job (``HaiClient.wait`` polls ten times a second) must not cost ten
    snapshots of the whole queue a second."""
    if not any(j.status == JobStatus.QUEUED for j in jobs):
        return {}
    from ..policy import queue_position
    from ..scheduler import take_snapshot

    seq, when, places = st.positions
    now = time.monotonic()
    if seq != st.sched_events.seq or now - when > POSITIONS_TTL:
        seq = st.sched_events.seq
        places = queue_position(take_snapshot(st.db), st.cfg.policy_config(), st.profile)
        st.positions = (seq, now, places)
    return places


def _may_see(p: Principal, j: Job) -> bool:
    if p.role == "job":
        return j.chain_id == p.chain
    return p.admin or j.user == p.name or (j.shared_in_group and j.group is not None and j.group == p.group)


def _chain_latest(s, job_id: int, p: Principal) -> Job:
    j = s.get(Job, job_id)
    if j is None:
        raise NotFound(f"no job {job_id}")
    if not _may_see(p, j):
        raise Forbidden(f"job {job_id} belongs to {j.user} and is not shared with you")
    latest = s.scalars(select(Job).where(Job.chain_id == j.chain_id).order_by(Job.id.desc()).limit(1)).first()
    return latest or j


_QUOTAS = select(Quota.subject, Quota.max_nodes, Quota.priority).where(Quota.subject.in_(bindparam("subjects")))


def _check_fits(st: ApiState, s, user: str, group: str | None, nodes: int, priority: int) -> None:
    """422 when a job of ``nodes`` nodes can never start: more than the cluster has, or more than every
    quota that applies to it at ``priority`` (AUTO: at every level) allows.

    [Note: the cluster's size] Agents can only register nodes of the cluster description, so the
    description's node count bounds the registered ones; a drained or lost node still counts (it
    may come back). Quotas are read in the submission's own transaction (``s``: a Connection or a
    Session): one query on a small table."""
    subjects = [f"user:{user}"] + ([f"group:{group}"] if group else [])
    quotas = tuple(QuotaView(q.subject, q.max_nodes, q.priority) for q in s.execute(_QUOTAS, {"subjects": subjects}))
    why = never_fits(nodes, user, group, priority, st.cluster.nodes, quotas)
    if why:
        raise ApiError(f"this job can never start: {why}", 422)


@router.post("/v1/jobs", status_code=201)
async def submit(spec: JobSpec, p: User_, st: State_) -> JSONResponse:
    # [Note: submissions on the event loop] A submission is two short statements in one SQLite
    # (or local PostgreSQL) transaction, well under a millisecond; run inline, it saves two
    # thread switches, which on a busy machine cost more than the work itself. The writers it
    # can wait for (the scheduler, agents' reports) hold the lock for milliseconds at most.
    if p.role == "service":
        raise Forbidden("the cluster secret cannot submit jobs; use a user's token")
    now = time.time()
    cfg = st.cfg
    if spec.grace > cfg.max_suspend_grace:
        raise ApiError(f"grace {spec.grace:g} s is above this cluster's maximum of {cfg.max_suspend_grace:g} s "
                       "(haiplatform.max_suspend_grace)", 422)
    # [Note: a lean submission] Core statements and a small answer: submissions come in bursts
    # (the bench submits 200 back to back) and the ORM's unit of work costs twice as much here.
    # AUTO starts at NORMAL until the policy resolves it (it does before the job can start)
    effective = NORMAL if spec.priority == AUTO else spec.priority
    with st.db.engine.begin() as s:  # a Core connection: no ORM session to set up
        _check_fits(st, s, p.name, p.group, spec.nodes, spec.priority)
        live = s.scalar(_COUNT_LIVE, {"user": p.name})
        if live >= cfg.max_unfinished_per_user:
            raise Conflict(f"user {p.name} already has {live} unfinished jobs "
                           f"(limit {cfg.max_unfinished_per_user})")
        jid = s.execute(_INSERT_JOB, {
            "name": spec.name, "user": p.name, "group": p.group, "shared_in_group": spec.shared_in_group,
            "command": list(spec.command), "env": dict(spec.env), "workdir": spec.workdir, "nodes": spec.nodes,
            "procs_per_node": spec.procs_per_node, "status": JobStatus.QUEUED,
            "priority": effective,
            "submitted_priority": spec.priority, "submitted_at": now, "time_limit": spec.time_limit,
            "grace": spec.grace, "watchdog": spec.watchdog, "chain_run_s": 0.0, "last_output": 0.0,
            "last_checkpoint": 0.0, "created_at": now, "assigned_nodes": [], "chain_id": 0, "first_id": 0, "restart_count": 0,
            "reason": WAITING, "stop_code": 0, "stop_requested": 0, "master_port": 0, "whole_life_state": 0,
        }).scalar_one()
        s.execute(_SET_CHAIN, {"b_id": jid})
        s.execute(_INSERT_EVENT, {"ts": now, "kind": "submitted", "job_id": jid, "node": None,
                                  "message": f"{p.name} submitted {spec.name} ({spec.nodes} nodes)"})
    st.sched_events.bump(capacity=False, priority=spec.priority)
    return JSONResponse({"id": jid, "chain_id": jid, "first_id": jid, "restart_count": 0, "name": spec.name,
                         "user": p.name, "group": p.group, "nodes": spec.nodes,
                         "priority": effective,
                         "submitted_priority": spec.priority,
                         "time_limit": spec.time_limit, "grace": spec.grace, "watchdog": spec.watchdog,
                         "status": JobStatus.QUEUED, "chain_status": "waiting_init", "reason": WAITING,
                         "created_at": now}, status_code=201)


@router.get("/v1/jobs")
def list_jobs(p: User_, st: State_, all: bool = False, status: Annotated[str | None, Query(max_length=16)] = None,
              limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> list[dict]:
    if all and not p.admin:
        raise Forbidden("only admins may list every user's jobs (?all=true)")
    if status is not None and status not in (*JobStatus.LIVE, *JobStatus.DONE):
        raise ApiError(f"unknown status {status!r}; one of {', '.join((*JobStatus.LIVE, *JobStatus.DONE))}", 422)
    with st.db.read() as s:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if not all:
            cond = Job.user == p.name
            if p.group:
                cond = cond | ((Job.group == p.group) & Job.shared_in_group.is_(True))
            q = q.where(cond)
        if status:
            q = q.where(Job.status == status)
        jobs = list(s.scalars(q))
    pos = _positions(st, jobs)
    return [job_json(j, position=pos.get(j.id)) for j in jobs]


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: JobId, p: User_, st: State_) -> dict:
    with st.db.read() as s:
        j = _chain_latest(s, job_id, p)
        ranks = list(s.scalars(select(Rank).where(Rank.job_id == j.id).order_by(Rank.rank)))
        attempts = list(s.scalars(select(Job).where(Job.chain_id == j.chain_id).order_by(Job.id)))
    return job_json(j, ranks, attempts, _positions(st, [j]).get(j.id))


def _request_stop(st: ApiState, job_id: int, p: Principal, code: int, verb: str) -> dict:
    with st.db.write() as s:
        j = _chain_latest(s, job_id, p)
        if j.status in JobStatus.DONE:
            raise Conflict(f"job {job_id} has already ended ({j.status}); nothing to {verb}")
        if code & StopCode.INTERRUPT and j.status != JobStatus.RUNNING:
            raise Conflict(f"job {job_id} is {j.status}; only a running job can be suspended")
        if j.stop_requested:
            raise Conflict(f"job {job_id} is already being stopped")
        j.stop_requested = code
        event_row(s, f"{verb}_requested", f"{p.name} asked to {verb} it", job_id=j.id)
        out = job_json(j)
    st.sched_events.bump()
    return out


@router.post("/v1/jobs/{job_id}/stop", status_code=202)
def stop_job(job_id: JobId, p: User_, st: State_) -> dict:
    return _request_stop(st, job_id, p, StopCode.MANUAL_STOP, "stop")


@router.post("/v1/jobs/{job_id}/suspend", status_code=202)
def suspend_job(job_id: JobId, p: User_, st: State_) -> dict:
    return _request_stop(st, job_id, p, StopCode.INTERRUPT, "suspend")


@router.post("/v1/jobs/{job_id}/priority")
def set_priority(job_id: JobId, body: PrioritySpec, p: User_, st: State_) -> dict:
    """Change a live chain's priority (its owner, an admin, or the job's own token).

    [Note: who may set which level] A user may set any level the job could have been submitted at:
    a level whose quotas can never hold the job is refused, as at submission (admins are not held
    back). The level becomes the chain's submitted priority (its later attempts start from it) and,
    unless it is AUTO, the attempt's effective one at once; the next cycle decides with it (it may
    preempt for it, or demote it again)."""
    level = body.priority
    with st.db.write() as s:
        j = _chain_latest(s, job_id, p)
        if p.role == "user" and j.user != p.name:
            raise Forbidden(f"job {job_id} belongs to {j.user}; only its owner or an admin may change its priority")
        if j.status in JobStatus.DONE:
            raise Conflict(f"job {job_id} has already ended ({j.status}); its priority cannot change")
        if not p.admin:
            _check_fits(st, s, j.user, j.group, j.nodes, level)
        j.submitted_priority = level
        if level != AUTO:
            j.priority = level
        who = f"job {p.chain}" if p.role == "job" else p.name
        event_row(s, "priority", f"{who} set priority {'auto' if level == AUTO else level}", job_id=j.id)
        out = job_json(j)
    st.sched_events.bump(priority=level)
    return out


# -- logs -----------------------------------------------------------------------------------------

def _read_chunk(st: ApiState, node: str, job_id: int, rank: int, offset: int) -> tuple[bytes, bool]:
    from network.errors import NetworkError

    try:
        rep = st.agent_client(node).call("logs.read", {"job_id": job_id, "rank": rank,
                                                       "offset": offset, "max": 256 * 1024})
    except NetworkError as exc:
        raise ApiError(f"cannot read the log of job {job_id} rank {rank} from the agent on {node}: {exc}",
                       502) from exc
    return bytes(rep.payload), bool(rep.result.get("eof"))


def _log_target(st: ApiState, job_id: int, p: Principal, rank: int, attempt: int | None,
                follow: bool) -> tuple[str | None, int] | None:
    """(node, attempt id) of the rank's log; node None: queued (the rank does not exist yet);
    None: a queued job's log without ``follow`` (empty)."""
    with st.db.read() as s:
        j = _chain_latest(s, job_id, p)
        if attempt is not None:  # an earlier attempt of the same chain
            a = s.get(Job, attempt)
            if a is None or a.chain_id != j.chain_id:
                raise NotFound(f"job {job_id} has no attempt {attempt}")
            j = a
        r = s.scalars(select(Rank).where(Rank.job_id == j.id, Rank.rank == rank)).first()
        if r is None:
            if j.status == JobStatus.QUEUED and not follow:
                return None
            if j.status != JobStatus.QUEUED:
                raise NotFound(f"job {job_id} has no rank {rank} (it has "
                               f"{s.scalar(select(func.count()).select_from(Rank).where(Rank.job_id == j.id))})")
        return (r.node if r else None), j.id


def _rank_placed(st: ApiState, job_id: int, p: Principal, rank: int) -> tuple[str, int] | bool:
    """Where a queued chain's rank runs once it exists; False: not yet; True: the chain ended without it."""
    with st.db.read() as s:
        j = _chain_latest(s, job_id, p)
        r = s.scalars(select(Rank).where(Rank.job_id == j.id, Rank.rank == rank)).first()
        if r is not None:
            return r.node, j.id
        return j.status in JobStatus.DONE


def _rank_ended(st: ApiState, jid: int, rank: int) -> bool:
    with st.db.read() as s:
        r = s.scalars(select(Rank).where(Rank.job_id == jid, Rank.rank == rank)).first()
        return r is None or r.status in RankStatus.DONE


@router.get("/v1/jobs/{job_id}/logs")
async def job_logs(request: Request, job_id: JobId, p: User_, st: State_,
                   rank: Annotated[int, Query(ge=0, le=INT32)] = 0,
                   offset: Annotated[int, Query(ge=0, le=OFFSET_MAX)] = 0, follow: bool = False,
                   attempt: Annotated[int | None, Query(ge=1, le=INT32)] = None):
    limits = st.limits
    target = await run_in_threadpool(_log_target, st, job_id, p, rank, attempt, follow)
    if target is None:
        return PlainTextResponse("")
    node, jid = target
    if not follow:
        data, _ = await run_in_threadpool(_read_chunk, st, node, jid, rank, offset)
        return PlainTextResponse(data.decode(errors="replace"))
    close = limits.open_stream(limit_key(p))  # 429 over the user's open streams

    # [Note: a stream holds no thread] A follower used to be a sync generator: one thread of the
    # pool for the stream's whole life (41 followers of a queued job held all 40, and the agents'
    # heartbeats with them). It is now a coroutine that sleeps on the event loop between polls;
    # each read (an RPC to the agent, a database check) borrows one of the streams' own threads
    # for its duration. It ends when the client goes away, when the rank's log is complete, or
    # after stream_max_seconds.
    async def stream() -> AsyncIterator[bytes]:
        nonlocal node, jid
        pos = offset
        idle = ended_checks = 0
        deadline = time.monotonic() + limits.stream_max_seconds
        while True:
            if await request.is_disconnected():
                return
            if time.monotonic() >= deadline:
                yield (f"\n[hai: the stream ends after {limits.stream_max_seconds:g} s "
                       "(haiplatform.stream_max_seconds); follow the log again to go on]\n").encode()
                return
            if node is None:  # queued: wait until the rank exists
                await asyncio.sleep(0.5)
                placed = await limits.off_loop(_rank_placed, st, job_id, p, rank)
                if placed is True:
                    return
                if placed is not False:
                    node, jid = placed
                continue
            try:
                data, eof = await limits.off_loop(_read_chunk, st, node, jid, rank, pos)
            except ApiError as exc:
                if await limits.off_loop(_rank_ended, st, jid, rank):
                    yield f"\n[hai: log ends: {exc}]\n".encode()
                    return
                await asyncio.sleep(0.5)
                continue
            if data:
                pos += len(data)
                yield data
                idle = 0
                continue
            if eof:
                return
            idle += 1
            if idle % 10 == 0:  # the agent may never have started it (stopped first, node lost)
                if await limits.off_loop(_rank_ended, st, jid, rank):
                    ended_checks += 1
                if ended_checks >= 2:
                    return
            await asyncio.sleep(0.1 if idle < 50 else 0.5)  # a quiet log is polled less often

    return GuardedStream(stream(), on_close=close, media_type="text/plain; charset=utf-8")
