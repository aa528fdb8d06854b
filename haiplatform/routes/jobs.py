"""Users' jobs: submit, list, show, stop, suspend and read or follow a rank's log (``/v1/jobs``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import aliased

from ..db import Event, Job, Quota, Rank, User, event_row
from ..errors import ApiError, Conflict, Forbidden, NotFound
from ..limits import GuardedStream
from ..policy import NORMAL, WAITING, QuotaView, held_reason, never_fits, reason_kind
from ..states import AUTO, JobStatus, RankStatus, StopCode
from .deps import Principal, State_, User_, limit_key
from .models import INT32, NO_NUL, OFFSET_MAX, TS_MAX, CancelSpec, JobId, JobSpec, PrioritySpec, parse_array
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
_SET_REASON = _JOBS.update().where(_JOBS.c.id == bindparam("b_id")).values(reason=bindparam("b_reason"))


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
           "position": position, "array_id": j.array_id, "array_index": j.array_index,
           "array_throttle": j.array_throttle or 0, "after": list(j.after or ()), "after_ok": list(j.after_ok or ()),
           "held": bool(j.held), "output": j.output}
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
    indices, throttle = [None], 0
    if spec.array is not None:
        try:
            indices, throttle = parse_array(spec.array, cfg.max_array_size)
        except ValueError as exc:
            raise ApiError(str(exc), 422) from exc
    after, after_ok = sorted(set(spec.after)), sorted(set(spec.after_ok))

    def write() -> tuple[int, list[int]]:
        with st.db.engine.begin() as s:  # a Core connection: no ORM session to set up
            _check_fits(st, s, p.name, p.group, spec.nodes, spec.priority)
            if after or after_ok:
                _check_dependencies(s, p, after + after_ok)
            live = s.scalar(_COUNT_LIVE, {"user": p.name})
            if live + len(indices) > cfg.max_unfinished_per_user:
                raise Conflict(f"user {p.name} already has {live} unfinished jobs "
                               f"(limit {cfg.max_unfinished_per_user})"
                               + (f"; this array adds {len(indices)}" if spec.array is not None else ""))
            row = {
                "name": spec.name, "user": p.name, "group": p.group, "shared_in_group": spec.shared_in_group,
                "command": list(spec.command), "env": dict(spec.env), "workdir": spec.workdir, "nodes": spec.nodes,
                "procs_per_node": spec.procs_per_node, "status": JobStatus.QUEUED,
                "priority": effective,
                "submitted_priority": spec.priority, "submitted_at": now, "time_limit": spec.time_limit,
                "grace": spec.grace, "watchdog": spec.watchdog, "chain_run_s": 0.0, "last_output": 0.0,
                "last_checkpoint": 0.0, "created_at": now, "assigned_nodes": [], "chain_id": 0, "first_id": 0, "restart_count": 0,
                "reason": held_reason(0) if spec.hold else WAITING, "stop_code": 0, "stop_requested": 0,
                "master_port": 0, "whole_life_state": 0,
                "array_id": None, "array_index": indices[0], "array_throttle": throttle, "after": after,
                "after_ok": after_ok, "held": spec.hold, "output": spec.output,
            }
            jid = s.execute(_INSERT_JOB, row).scalar_one()
            tasks = [jid]
            if spec.array is None:
                s.execute(_SET_CHAIN, {"b_id": jid})
            else:
                # [Note: an array is one insert] the first task's id names the array; the others go in one
                # executemany and take their own ids as chain ids in one UPDATE
                s.execute(_JOBS.update().where(_JOBS.c.id == jid).values(array_id=jid))
                if len(indices) > 1:
                    s.execute(_JOBS.insert(), [{**row, "array_id": jid, "array_index": i} for i in indices[1:]])
                s.execute(_JOBS.update().where(_JOBS.c.array_id == jid).values(chain_id=_JOBS.c.id, first_id=_JOBS.c.id))
                tasks = list(s.scalars(select(_JOBS.c.id).where(_JOBS.c.array_id == jid).order_by(_JOBS.c.id)))
            if spec.hold:  # the reason names each chain's own id
                s.execute(_SET_REASON, [{"b_id": t, "b_reason": held_reason(t)} for t in tasks])
            what = f"{spec.name} ({spec.nodes} nodes" + (f", array {spec.array}: {len(tasks)} tasks)" if spec.array
                                                         else ")")
            s.execute(_INSERT_EVENT, {"ts": now, "kind": "submitted", "job_id": jid, "node": None,
                                      "message": f"{p.name} submitted {what}"})
        return jid, tasks

    # [Note: an array off the loop] a 10,000-task array is an executemany of 10,000 rows and two
    # statements over them: tens of ms to seconds that would stall every request on the event loop
    jid, tasks = await run_in_threadpool(write) if spec.array is not None else write()

    st.sched_events.bump(capacity=False, priority=spec.priority)
    out = {"id": jid, "chain_id": jid, "first_id": jid, "restart_count": 0, "name": spec.name,
           "user": p.name, "group": p.group, "nodes": spec.nodes, "priority": effective,
           "submitted_priority": spec.priority, "time_limit": spec.time_limit, "grace": spec.grace,
           "watchdog": spec.watchdog, "status": JobStatus.QUEUED, "chain_status": "waiting_init",
           "reason": held_reason(jid) if spec.hold else WAITING, "created_at": now,
           "array_id": jid if spec.array is not None else None, "array_index": indices[0],
           "array_throttle": throttle, "after": after, "after_ok": after_ok, "held": spec.hold,
           "output": spec.output}
    if spec.array is not None:
        out["array_tasks"] = tasks
    return JSONResponse(out, status_code=201)


def _check_dependencies(s, p: Principal, ids: list[int]) -> None:
    """422 naming the dependencies that are no job this user may see (a chain id: its first attempt)."""
    found = {r.id: r for r in s.execute(select(_JOBS.c.id, _JOBS.c.chain_id, _JOBS.c.user, _JOBS.c.group,
                                               _JOBS.c.shared_in_group).where(_JOBS.c.id.in_(ids)))}
    bad = [i for i in ids if i not in found or found[i].chain_id != i or not _may_see(p, found[i])]
    if bad:
        raise ApiError(f"unknown dependencies: no job {', '.join(map(str, bad))} that you may see", 422)


def _visible_to(p: Principal):
    """What a non-admin may list: their own jobs and those shared in their group."""
    cond = Job.user == p.name
    if p.group:
        cond = cond | ((Job.group == p.group) & Job.shared_in_group.is_(True))
    return cond


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
            q = q.where(_visible_to(p))
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

#: one RPC to an agent reads at most this much of a log (the agent's own cap is 1 MiB)
LOG_RPC_BYTES = 1 << 20
#: a plain (not followed) log read answers at most this many bytes unless ``limit`` says otherwise
LOG_LIMIT_DEFAULT = 8 << 20
LOG_LIMIT_MAX = 64 << 20


def _read_chunk(st: ApiState, node: str, job_id: int, rank: int, offset: int,
                size: int = 256 * 1024) -> tuple[bytes, bool]:
    data, eof, _ = _read_sized(st, node, job_id, rank, offset, size)
    return data, eof


def _read_sized(st: ApiState, node: str, job_id: int, rank: int, offset: int,
                size: int) -> tuple[bytes, bool, int]:
    """(data, eof, the file's size now) of one read of a rank's log on its node's agent."""
    from network.errors import NetworkError

    try:
        rep = st.agent_client(node).call("logs.read", {"job_id": job_id, "rank": rank,
                                                       "offset": offset, "max": min(size, LOG_RPC_BYTES)})
    except NetworkError as exc:
        raise ApiError(f"cannot read the log of job {job_id} rank {rank} from the agent on {node}: {exc}",
                       502) from exc
    return bytes(rep.payload), bool(rep.result.get("eof")), int(rep.result.get("size", 0))


def _tail_start(st: ApiState, node: str, jid: int, rank: int, lines: int, size: int, limit: int) -> int:
    """The offset where the last ``lines`` lines of a log of ``size`` bytes start (reading backwards in
    RPC-sized blocks, at most ``limit`` bytes back: a longer tail is cut to its last ``limit`` bytes).

    A final line without its newline counts as a line; the newline that ends the file does not start one."""
    if lines == 0:
        return size
    pos, want = size, lines
    first = True
    while pos > 0 and size - pos < limit:
        start = max(0, pos - LOG_RPC_BYTES, size - limit)
        data, _, _ = _read_sized(st, node, jid, rank, start, pos - start)
        data = data[:pos - start]
        if first and data.endswith(b"\n"):
            data, pos = data[:-1], pos - 1   # the file's last newline ends the last line
        first = False
        for i in range(len(data) - 1, -1, -1):
            if data[i] == 0x0A:
                want -= 1
                if want == 0:
                    return start + i + 1
        pos = start
    return max(0, size - limit) if pos > 0 else 0


def _read_range(st: ApiState, node: str, jid: int, rank: int, offset: int, limit: int,
                tail: int | None) -> tuple[bytes, int, int]:
    """(data, the file's size, the offset after data) of a plain log read: ``limit`` bytes from
    ``offset``, or from where the last ``tail`` lines start."""
    size = 0
    if tail is not None:  # the size only matters to find the tail; each read below reports it too
        _, _, size = _read_sized(st, node, jid, rank, 0, 0)
        offset = _tail_start(st, node, jid, rank, tail, size, limit)
    parts: list[bytes] = []
    pos, left = offset, limit
    while left > 0:
        data, _, size = _read_sized(st, node, jid, rank, pos, left)
        if not data:
            break
        parts.append(data)
        pos += len(data)
        left -= len(data)
    return b"".join(parts), max(size, pos), pos


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
                   attempt: Annotated[int | None, Query(ge=1, le=INT32)] = None,
                   tail: Annotated[int | None, Query(ge=0, le=10_000_000, description="only the last N lines")] = None,
                   limit: Annotated[int, Query(ge=1, le=LOG_LIMIT_MAX)] = LOG_LIMIT_DEFAULT):
    """A rank's log: ``limit`` bytes from ``offset`` (or its last ``tail`` lines), with the headers
    ``X-Log-Size`` (the file's bytes now) and ``X-Log-Offset-Next`` (where the next read starts); or,
    with ``follow``, a stream until the rank has ended.

    [Note: never a silently cut log] A plain read used to answer one 256 KiB RPC and nothing said
    the rest existed. It now pages up to ``limit`` bytes and says how much there is, so a client
    (``HaiClient.logs``) can read the whole log however long it is."""
    limits = st.limits
    target = await run_in_threadpool(_log_target, st, job_id, p, rank, attempt, follow)
    if target is None:
        return Response(b"", media_type="text/plain; charset=utf-8",
                        headers={"X-Log-Size": "0", "X-Log-Offset-Next": str(offset)})
    node, jid = target
    if not follow:
        data, size, nxt = await run_in_threadpool(_read_range, st, node, jid, rank, offset, limit, tail)
        return Response(data, media_type="text/plain; charset=utf-8",
                        headers={"X-Log-Size": str(size), "X-Log-Offset-Next": str(nxt)})
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


# -- holds, resubmission, cancel by filter ---------------------------------------------------------

def _owner_or_admin(p: Principal, j: Job, job_id: int, verb: str) -> None:
    if p.role != "service" and not p.admin and j.user != p.name:
        raise Forbidden(f"job {job_id} belongs to {j.user}; only its owner or an admin may {verb} it")


@router.post("/v1/jobs/{job_id}/hold")
def hold_job(job_id: JobId, p: User_, st: State_) -> dict:
    """Keep a queued chain from starting until it is released (409 unless queued and not held)."""
    with st.db.write() as s:
        j = _chain_latest(s, job_id, p)
        _owner_or_admin(p, j, job_id, "hold")
        if j.status != JobStatus.QUEUED:
            raise Conflict(f"job {job_id} is {j.status}; only a queued job can be held")
        if j.held:
            raise Conflict(f"job {job_id} is already held (hai release {j.chain_id})")
        j.held, j.reason = True, held_reason(j.chain_id)
        event_row(s, "held", f"{p.name} held it", job_id=j.id)
        out = job_json(j)
    st.sched_events.bump()
    return out


@router.post("/v1/jobs/{job_id}/release")
def release_job(job_id: JobId, p: User_, st: State_) -> dict:
    """Let a held chain be scheduled again (409 unless it is held)."""
    with st.db.write() as s:
        j = _chain_latest(s, job_id, p)
        _owner_or_admin(p, j, job_id, "release")
        if not j.held or j.status != JobStatus.QUEUED:
            raise Conflict(f"job {job_id} is not held")
        j.held, j.reason = False, WAITING
        event_row(s, "released", f"{p.name} released it", job_id=j.id)
        out = job_json(j)
    st.sched_events.bump(priority=out["priority"])
    return out


@router.post("/v1/jobs/{job_id}/resubmit", status_code=201)
async def resubmit_job(job_id: JobId, p: User_, st: State_) -> JSONResponse:
    """A new chain with the ended chain's spec (as its owner: it counts against the caller's limits and
    quotas as a new submission would). Array tasks come back as plain jobs; dependencies are dropped
    (they were met or failed)."""
    with st.db.read() as s:
        j = _chain_latest(s, job_id, p)
        if j.status not in JobStatus.ENDED:
            raise Conflict(f"job {job_id} is {j.status}; only an ended job can be resubmitted")
        if p.role == "service" or (j.user != p.name and not p.admin):
            raise Forbidden(f"job {job_id} belongs to {j.user}; only its owner may resubmit it")
        try:  # a job older than today's limits (a 64 KiB command) cannot come back as it was
            spec = JobSpec(name=j.name, command=j.command, nodes=j.nodes, procs_per_node=j.procs_per_node,
                           priority=j.submitted_priority if j.submitted_priority != AUTO else "auto",
                           time_limit=j.time_limit, grace=j.grace, watchdog=j.watchdog, env=j.env,
                           workdir=j.workdir, shared_in_group=j.shared_in_group, output=j.output)
        except ValidationError as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
            raise ApiError(f"job {job_id} cannot be resubmitted as it was: {why}", 422) from exc
    if j.user != p.name:  # an admin resubmits as the owner
        with st.db.read() as s:
            u = s.scalars(select(User).where(User.name == j.user)).first()
        if u is None:
            raise Conflict(f"job {job_id}'s user {j.user} no longer exists")
        p = Principal(name=u.name, role=u.role, group=u.group)
    return await submit(spec, p, st)


#: what ``POST /v1/jobs/cancel`` may select by status: live chains only
_CANCELABLE = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.RUNNING)


@router.post("/v1/jobs/cancel")
def cancel_jobs(body: CancelSpec, p: User_, st: State_) -> dict:
    """Stop every live chain that matches all the filters given (at least one); a non-admin only
    ever its own (``user`` = someone else: 403). Queued chains are canceled by the next cycle,
    running ones stopped."""
    if not (body.ids or body.name or body.user or body.array_id or body.status):
        raise ApiError("cancel needs at least one filter: ids, name, user, array_id or status", 422)
    if p.role == "service":
        raise Forbidden("the cluster secret cannot cancel jobs; use a user's token")
    if body.user is not None and body.user != p.name and not p.admin:
        raise Forbidden(f"only admins may cancel another user's jobs (user {body.user})")
    statuses = tuple(body.status or _CANCELABLE)
    bad = [x for x in statuses if x not in _CANCELABLE]
    if bad:
        raise ApiError(f"cannot cancel by status {', '.join(bad)}; one of {', '.join(_CANCELABLE)}", 422)
    q = select(Job).where(Job.status.in_(statuses), Job.stop_requested == 0)
    if body.ids:
        q = q.where(Job.chain_id.in_(body.ids))
    if body.name:
        q = q.where(Job.name == body.name)
    if body.array_id:
        q = q.where(Job.array_id == body.array_id)
    if body.user or not p.admin:
        q = q.where(Job.user == (body.user or p.name))
    done: list[int] = []
    with st.db.write() as s:
        for j in s.scalars(q.order_by(Job.id)):
            j.stop_requested = StopCode.MANUAL_STOP
            done.append(j.chain_id)
            event_row(s, "stop_requested", f"{p.name} canceled it", job_id=j.id)
    if done:
        st.sched_events.bump()
    return {"canceled": done}


# -- history and the queue -------------------------------------------------------------------------

#: a history row's keys, in the order of the query's columns
_HISTORY_KEYS = ("chain_id", "name", "user", "nodes", "priority", "submitted_at", "started_at", "finished_at",
                 "elapsed_s", "wall_s", "status", "exit_code", "restarts", "array_id", "array_index", "reason")


@router.get("/v1/history")
def history(p: User_, st: State_, user: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
            status: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
            since: Annotated[float | None, Query(ge=0, le=TS_MAX)] = None,
            until: Annotated[float | None, Query(ge=0, le=TS_MAX)] = None,
            name: Annotated[str | None, Query(max_length=128, pattern=NO_NUL)] = None,
            limit: Annotated[int, Query(ge=1, le=100000)] = 1000,
            offset: Annotated[int, Query(ge=0, le=INT32)] = 0) -> JSONResponse:
    """One row per chain that has ended (``status=any``: every chain), newest first: accounting.

    [Note: one row per chain without grouping] An ended chain's last attempt is the only attempt of
    it with an ENDED status (a suspended one is always followed by another), and it carries the
    chain's earlier run time (``chain_run_s``); the first attempt (its start) is one primary-key join
    away. So the history is one indexed scan, no GROUP BY (10,000 rows in a few tens of ms)."""
    if p.role == "service":
        raise Forbidden("the cluster secret has no history; use a user's token")
    wanted: tuple[str, ...] = JobStatus.ENDED
    if status not in (None, "", "any", "ended"):
        wanted = tuple(x.strip() for x in status.split(","))
        unknown = [x for x in wanted if x not in (*JobStatus.ENDED, *JobStatus.LIVE)]
        if unknown:
            raise ApiError(f"unknown status {', '.join(unknown)}; one of any, "
                           f"{', '.join((*JobStatus.ENDED, *JobStatus.LIVE))}", 422)
    f = aliased(Job, name="first")
    now = time.time()
    began = func.coalesce(f.started_at, f.scheduled_at)
    this = func.coalesce(Job.started_at, Job.scheduled_at)
    # the figures are computed by the database: building 10,000 rows in Python is most of the answer's time
    submitted = func.coalesce(func.nullif(Job.submitted_at, 0.0), Job.created_at)  # rows before 0004: 0
    cols = (Job.chain_id, Job.name, Job.user, Job.nodes, Job.priority, submitted, began, Job.finished_at,
            Job.chain_run_s + func.coalesce(func.coalesce(Job.finished_at, now) - this, 0.0),
            func.coalesce(func.coalesce(Job.finished_at, now) - began, 0.0), Job.status, Job.exit_code,
            Job.restart_count, Job.array_id, Job.array_index, Job.reason)
    q = select(*cols).join(f, f.id == Job.first_id)
    if status == "any":
        # every chain: its latest attempt (the one no later attempt of the chain follows)
        later = aliased(Job, name="later")
        q = q.where(~select(later.id).where(later.chain_id == Job.chain_id, later.id > Job.id).exists())
    else:
        q = q.where(Job.status.in_(wanted))
    if user:
        if user != p.name and not p.admin and not p.group:
            raise Forbidden(f"only admins may read another user's history (user {user})")
        q = q.where(Job.user == user)
    if not p.admin:  # a non-admin's own chains and those shared in their group (user=X: X's of those)
        q = q.where(_visible_to(p))
    if name:
        q = q.where(Job.name == name)
    if since is not None:  # by submission (the time the rows show), as the CLI's --since / --until say
        q = q.where(submitted >= since)
    if until is not None:
        q = q.where(submitted < until)
    with st.db.ro_engine.begin() as c:
        rows = c.execute(q.order_by(Job.finished_at.desc().nullsfirst(), Job.id.desc()).limit(limit).offset(offset)).all()
        total = (offset + len(rows) if len(rows) < limit and (rows or offset == 0)
                 else c.scalar(select(func.count()).select_from(q.subquery())))
    keys = _HISTORY_KEYS
    out = [dict(zip(keys, r, strict=True)) for r in rows]
    return JSONResponse({"jobs": out, "total": total})


@router.get("/v1/queue")
def queue(p: User_, st: State_) -> list[dict]:
    """Every queued and running chain of every user, in the order the queue is served (running first),
    with why each waits: readable by any user. With ``queue_visibility = "hide-others"`` other users'
    jobs show user and name "-" to non-admins, and their reasons only the kind (:func:`reason_kind`:
    a reason may name a user, e.g. whose quota is full or who preempted it)."""
    if p.role == "job":
        raise Forbidden("a job's token cannot read the queue")
    with st.db.read() as s:
        jobs = list(s.scalars(select(Job).where(Job.status.in_(JobStatus.LIVE)).order_by(Job.id)))
    pos = _positions(st, jobs)
    hide = st.cfg.queue_visibility == "hide-others" and not p.admin
    out = []
    for j in jobs:
        mine = j.user == p.name
        out.append({"chain_id": j.chain_id, "name": j.name if mine or not hide else "-",
                    "user": j.user if mine or not hide else "-", "nodes": j.nodes, "priority": j.priority,
                    "status": j.status, "position": pos.get(j.id),
                    "reason": j.reason if mine or not hide else reason_kind(j.reason),
                    "submitted_at": j.submitted_at or j.created_at, "started_at": j.started_at or j.scheduled_at,
                    "assigned_nodes": j.assigned_nodes, "held": bool(j.held), "array_id": j.array_id,
                    "array_index": j.array_index})
    big = 1 << 62
    out.sort(key=lambda r: (r["status"] == JobStatus.QUEUED, r["position"] or big, r["chain_id"]))
    return out
