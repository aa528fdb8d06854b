"""The HAI-Platform API server: a FastAPI app over the scheduler database (``python -m haiplatform.api``).

Users (token auth, ``Authorization: Bearer TOKEN``):

======  =============================  ==========================================================
POST    /v1/jobs                       submit a job (201)
GET     /v1/jobs                       list jobs (own and group-shared; ``?all=true`` for admins)
GET     /v1/jobs/{id}                  one job: the latest attempt of the chain ``id`` belongs to
POST    /v1/jobs/{id}/stop             stop (or cancel while queued)
POST    /v1/jobs/{id}/suspend          suspend: the ranks are signalled and stopped, and the chain
                                       continues in a new queued attempt that keeps its place
GET     /v1/jobs/{id}/logs             a rank's output (``rank``, ``offset``, ``follow=true``)
GET     /v1/nodes, /v1/whoami          the cluster's nodes; who the token belongs to
======  =============================  ==========================================================

Admins: ``POST /v1/nodes/{n}/drain|undrain``, ``GET|POST /v1/users``, ``GET|PUT|DELETE /v1/quotas``.
Agents and the scheduler authenticate with the cluster secret: ``/v1/agent/*``, ``/v1/internal/*``.
A job authenticates with its own token ($HAI_JOB_TOKEN, :mod:`haiplatform.jobtoken`): it may call
the routes in ``JOB_ROUTES`` only, for its own job only, and only until that job has finished.

Errors are ``{"error": KIND, "message": TEXT}`` with 401, 403, 404, 409 or 422.

[Note: events, not polling] Two notification channels live in this process. ``sched`` is bumped
after every commit the scheduler must react to (a submission, a rank's end, a node change, a
stop request); the scheduler long-polls ``/v1/internal/wait`` on it. Its second counter, ``cap``,
counts the bumps that may free capacity (all but submissions): see the scheduler's note. ``agents`` is bumped when
the scheduler reports new decisions (``/v1/internal/notify``) or a master port is known; agents
long-poll ``/v1/agent/sync`` on it. A bump always follows the commit, and a waiter passes the
last sequence number it saw, so no wake-up is lost; the tick (and the long-poll timeout) only
bound the damage of a lost connection.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from network.topology import Cluster

from .config import HaiConfig
from .db import (
    PRIORITIES,
    Database,
    Event,
    Group,
    Job,
    JobStatus,
    NodeRow,
    Quota,
    Rank,
    RankStatus,
    StopCode,
    User,
    event_row,
    hash_token,
    migrate,
)
from .errors import ApiError, AuthError, Conflict, Forbidden, NotFound
from .jobtoken import PREFIX as JOB_TOKEN_PREFIX
from .jobtoken import chain_of
from .limits import Guard, GuardedStream, Limits
from .policy import WAITING

__all__ = ["create_app", "JobSpec", "Notifier", "main"]

log = logging.getLogger(__name__)

JOB_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"
USER_NAME = r"^[a-z_][a-z0-9_.-]{0,63}$"

# [Note: every integer is bounded] The database's INTEGER columns hold 32 bits on PostgreSQL and
# 64 on SQLite; a larger value used to reach the driver and come back as a 500. Every integer a
# request carries (path, query and body) is bounded here, in the schema, so it is a 422 naming the
# field; strings that land in a VARCHAR column are bounded to its length.
INT32 = 2**31 - 1
OFFSET_MAX = 2**53          # a log offset (bytes): well past any log, exact in every JSON parser
SEQ_MAX = 2**62             # the notification channels' sequence numbers
NO_NUL = r"^[^\x00]*$"      # PostgreSQL's text cannot hold NUL, nor can an argv, an env or a path


def Text(max_length: int, **kw: Any) -> Any:  # noqa: N802 - reads as a type in the models
    """A string of at most ``max_length`` characters, without NUL."""
    return Annotated[str, Field(max_length=max_length, pattern=NO_NUL, **kw)]


NODE_NAME = Text(64, min_length=1)
JobId = Annotated[int, PathParam(ge=1, le=INT32, description="a job id (any attempt of the chain)")]


# -- notification channels ------------------------------------------------------------------------

class Notifier:
    """A sequence number that async waiters can block on; bumped from any thread."""

    def __init__(self) -> None:
        self.seq = 0
        self.cap = 0  # bumps that may free capacity (everything but a submission)
        self._lock = threading.Lock()
        self._waiters: set[asyncio.Future] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def bump(self, capacity: bool = True) -> int:
        with self._lock:
            self.seq += 1
            self.cap += capacity
            waiters, self._waiters = self._waiters, set()
            seq = self.seq
        for fut in waiters:
            loop = fut.get_loop()
            loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))
        return seq

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


# -- prepared statements of the submission path (built once: statement construction and cache-key
# generation cost more than SQLite's own work per submission) ---------------------------------------
_JOBS = Job.__table__
_COUNT_LIVE = select(func.count()).select_from(_JOBS).where(
    _JOBS.c.user == bindparam("user"), _JOBS.c.status.in_(JobStatus.LIVE))
_INSERT_JOB = _JOBS.insert().returning(_JOBS.c.id)
_SET_CHAIN = _JOBS.update().where(_JOBS.c.id == bindparam("b_id")).values(
    chain_id=bindparam("b_id"), first_id=bindparam("b_id"))
_INSERT_EVENT = Event.__table__.insert()
_WORK = select(Rank.rank, Rank.local_rank, Rank.status, Rank.desired, Job.id.label("job_id"), Job.command, Job.env,
               Job.workdir, Job.name, Job.user, Job.chain_id, Job.restart_count, Job.whole_life_state,
               Job.assigned_nodes, Job.master_port, Job.procs_per_node).join(Job, Job.id == Rank.job_id).where(
    Rank.node == bindparam("node"), Rank.status.in_((RankStatus.CREATED, RankStatus.RUNNING)))


# -- request bodies -------------------------------------------------------------------------------

class JobSpec(BaseModel):
    """What a user submits (``hai python ...`` and ``hai run job.yaml`` build one)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=JOB_NAME, description="a name for the job (letters, digits, _.@-)")
    command: list[Text(65536)] = Field(
        min_length=1, max_length=4096, description="argv of each rank's process")
    nodes: int = Field(1, ge=1, le=10000, description="whole nodes")
    procs_per_node: int = Field(0, ge=0, le=256, description="processes per node; 0: the node's GPUs (or 1)")
    priority: Annotated[int, Field(ge=0, le=50)] | Text(32) = Field(
        "normal", validate_default=True, description="a level name or its number (0..50)")
    env: dict[Text(1024), Text(65536)] = Field(
        default_factory=dict, max_length=4096)
    workdir: Text(1000) = ""
    shared_in_group: bool = False

    @field_validator("command")
    @classmethod
    def _cmd(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("command[0] must name a program")
        return v

    @field_validator("priority", mode="before")
    @classmethod
    def _prio(cls, v: Any) -> Any:
        """A level's name or a number (also as a string) -> the number, with one clear message when it
        is neither (before the union's own checks, which would list one complaint per branch)."""
        if isinstance(v, str):
            if v.lower() in PRIORITIES:
                return PRIORITIES[v.lower()]
            if not (v.isascii() and v.lstrip("-").isdigit() and len(v) <= 8):
                raise ValueError(f"unknown priority {v[:40]!r}; use one of {', '.join(PRIORITIES)} or 0..50")
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= 50:
            raise ValueError(f"priority {v} is out of range 0..50")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not k or "=" in k or not (k[0].isalpha() or k[0] == "_"):
                raise ValueError(f"bad environment variable name {k!r}")
        return v


class UserSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=USER_NAME)
    role: str = Field("user", pattern="^(user|admin)$")
    group: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class QuotaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(pattern=r"^(user|group):[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$",
                         description="user:NAME or group:NAME")
    max_nodes: int = Field(ge=0, le=INT32)
    priority: int | None = Field(None, ge=0, le=50)


class NotifySpec(BaseModel):
    nodes: list[NODE_NAME] | None = Field(None, max_length=100000)  # None: every node


class DrainSpec(BaseModel):
    reason: Text(200) = ""


class RegisterSpec(BaseModel):
    node: NODE_NAME
    epoch: Text(40)
    address: Text(64) = ""
    cpus: int = Field(0, ge=0, le=INT32)
    memory_gib: float = Field(0.0, ge=0, le=1e12, allow_inf_nan=False)
    gpus: int = Field(0, ge=0, le=INT32)
    facts: dict[str, Any] = Field(default_factory=dict)


class RankReport(BaseModel):
    job_id: int = Field(ge=1, le=INT32)
    rank: int = Field(ge=0, le=INT32)
    status: Text(16)
    exit_code: int | None = Field(None, ge=-INT32 - 1, le=INT32)
    pid: int | None = Field(None, ge=0, le=INT32)
    message: Text(65536) = ""
    whole_life_state: int | None = Field(None, ge=-INT32 - 1, le=INT32)


class ReportSpec(BaseModel):
    node: NODE_NAME
    epoch: Text(40)
    ranks: list[RankReport] = Field(default_factory=list, max_length=100000)
    master_ports: dict[Annotated[int, Field(ge=1, le=INT32)], Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=dict, max_length=100000)


# -- principals -----------------------------------------------------------------------------------

class Principal(BaseModel):
    name: str
    role: str           # admin | user | service | job
    group: str | None = None
    chain: int | None = None  # a job's token: the chain it belongs to (``name`` is the job's user)

    @property
    def admin(self) -> bool:
        return self.role in ("admin", "service")


#: what a job's own token may call (method, route): its job's status and logs, and who it is. A
#: route not listed here (every other, including routes added later) answers a job token with 403.
JOB_ROUTES = frozenset({("GET", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/logs"), ("GET", "/v1/whoami")})


async def principal(request: Request) -> Principal:
    """Who sent the request (401 without a valid token). [Note: async dependencies] A sync dependency
    costs a thread-pool hop per request; this one touches the database only on a token-cache miss."""
    p = request.app.state.authenticate(request)
    if p.role == "job":
        route = request.scope.get("route")
        if (request.method, getattr(route, "path", None)) not in JOB_ROUTES:
            raise Forbidden(f"a job's token (job {p.chain}) may only read its own job's status and logs; "
                            f"{request.method} {request.url.path} needs a user's token")
    return p


async def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if not p.admin:
        raise Forbidden(f"user {p.name} is not an admin")
    return p


async def service(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if p.role != "service":
        raise Forbidden("only agents and the scheduler (the cluster secret) may call this")
    return p


User_ = Annotated[Principal, Depends(principal)]
Admin_ = Annotated[Principal, Depends(admin)]
Service_ = Annotated[Principal, Depends(service)]


# -- the app --------------------------------------------------------------------------------------

def _job_json(j: Job, ranks: list[Rank] | None = None, attempts: list[Job] | None = None) -> dict:
    done = j.status in JobStatus.DONE and j.status != JobStatus.SUSPENDED
    chain = ("finished" if done else "running" if j.status in JobStatus.ACTIVE
             else "waiting_init" if j.restart_count == 0 else "suspended")
    out = {"id": j.id, "chain_id": j.chain_id, "first_id": j.first_id, "restart_count": j.restart_count,
           "name": j.name, "user": j.user, "group": j.group, "shared_in_group": j.shared_in_group,
           "command": j.command, "env": j.env, "workdir": j.workdir, "nodes": j.nodes,
           "procs_per_node": j.procs_per_node, "priority": j.priority, "status": j.status,
           "chain_status": chain, "reason": j.reason, "stop_code": j.stop_code,
           "stop": StopCode.describe(j.stop_code), "assigned_nodes": j.assigned_nodes,
           "master_port": j.master_port, "exit_code": j.exit_code, "whole_life_state": j.whole_life_state,
           "created_at": j.created_at, "scheduled_at": j.scheduled_at, "started_at": j.started_at,
           "finished_at": j.finished_at}
    if ranks is not None:
        out["ranks"] = [{"rank": r.rank, "node": r.node, "local_rank": r.local_rank, "status": r.status,
                         "exit_code": r.exit_code, "pid": r.pid, "message": r.message} for r in ranks]
    if attempts is not None:
        out["attempts"] = [{"id": a.id, "status": a.status, "stop": StopCode.describe(a.stop_code),
                            "exit_code": a.exit_code} for a in attempts]
    return out


def _node_json(n: NodeRow, held: dict[str, int], now: float) -> dict:
    return {"name": n.name, "address": n.address, "zone": n.zone, "leaf": n.leaf, "gpus": n.gpus,
            "cpus": n.cpus, "memory_gib": n.memory_gib, "state": n.state, "drained": n.drained,
            "drain_reason": n.drain_reason, "job": held.get(n.name), "heartbeat_age": round(now - n.last_seen, 2),
            "facts": n.facts}


def create_app(cluster: Cluster, cfg: HaiConfig, db: Database) -> FastAPI:
    """The FastAPI app for ``cluster`` (the database must already be migrated)."""
    app = FastAPI(title="HAI-Platform API", version="1", description="Submit, follow and control jobs on a "
                  "fireflyer cluster; admin nodes, users and quotas.")
    sched_events = Notifier()
    agent_events: dict[str, Notifier] = {name: Notifier() for name in cluster.nodes}  # one per node
    app.state.sched_events = sched_events
    app.state.agent_events = agent_events
    secret = cfg.secret()
    token_cache: dict[str, tuple[float, Principal | None]] = {}
    epochs: dict[str, str] = {}       # node -> the epoch of its live agent
    last_beat: dict[str, float] = {}  # node -> when its last_seen was written
    agent_rpc: dict[str, Any] = {}
    rpc_lock = threading.Lock()

    # -- errors ---------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=exc.status or 400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        probs = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            probs.append(f"{where or 'body'}: {e.get('msg')}")
        return JSONResponse({"error": "InvalidRequest", "message": "; ".join(probs), "problems": exc.errors()
                             and [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]},
                            status_code=422)

    # -- auth -----------------------------------------------------------------------------------
    def authenticate(request: Request) -> Principal:
        h = request.headers.get("authorization", "")
        if not h.lower().startswith("bearer ") or not h[7:].strip():
            raise AuthError("missing token: send 'Authorization: Bearer TOKEN' (hai reads $HAI_TOKEN)")
        tok = h[7:].strip()
        if secrets.compare_digest(tok, secret):
            return Principal(name="cluster", role="service")
        now = time.monotonic()
        hit = token_cache.get(tok)
        if hit is None or now - hit[0] > 2.0:  # [Note: a revoked token works for at most 2 s more]
            if tok.startswith(JOB_TOKEN_PREFIX):
                hit = (now, _job_principal(tok))
            else:
                with db.read() as s:
                    u = s.scalars(select(User).where(User.token_hash == hash_token(tok),
                                                     User.active.is_(True))).first()
                    p = Principal(name=u.name, role=u.role, group=u.group) if u else None
                hit = (now, p)
            if len(token_cache) > 10000:  # bounded: random tokens must not grow it forever
                token_cache.clear()
            token_cache[tok] = hit
        if hit[1] is None:
            if tok.startswith(JOB_TOKEN_PREFIX):
                raise AuthError("invalid job token: not made by this cluster, or its job has finished")
            raise AuthError("invalid token: no active user has it")
        return hit[1]

    def _job_principal(tok: str) -> Principal | None:
        """A job token's principal while its chain has not finished (None: not a valid job token)."""
        chain = chain_of(secret, tok)
        if chain is None:
            return None
        with db.read() as s:
            j = s.scalars(select(Job).where(Job.chain_id == chain).order_by(Job.id.desc()).limit(1)).first()
            if j is None or (j.status in JobStatus.DONE and j.status != JobStatus.SUSPENDED):
                return None  # a finished job's token is worth nothing
            return Principal(name=j.user, role="job", chain=chain)

    app.state.authenticate = authenticate

    # -- limits ---------------------------------------------------------------------------------
    limits = app.state.limits = Limits.from_config(cfg)

    def limit_key(p: Principal) -> str:
        """Whose bucket and streams a request counts against: a user, or one job's token."""
        return f"job:{p.chain}" if p.role == "job" else p.name

    def who(request: Request) -> tuple[str, bool]:
        try:
            p = authenticate(request)
        except ApiError:  # the route answers 401; its rate is its address's
            return f"addr:{request.client.host if request.client else '?'}", False
        return limit_key(p), p.role == "service"

    app.add_middleware(Guard, limits=limits, who=who)

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

    # -- health ---------------------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:  # on the event loop: it answers whatever the thread pool does
        return {"ok": True, "cluster": cluster.name, "limits": limits.snapshot()}

    # -- jobs -----------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201)
    async def submit(spec: JobSpec, p: User_) -> JSONResponse:
        # [Note: submissions on the event loop] A submission is two short statements in one SQLite
        # (or local PostgreSQL) transaction, well under a millisecond; run inline, it saves two
        # thread switches, which on a busy machine cost more than the work itself. The writers it
        # can wait for (the scheduler, agents' reports) hold the lock for milliseconds at most.
        if p.role == "service":
            raise Forbidden("the cluster secret cannot submit jobs; use a user's token")
        now = time.time()
        # [Note: a lean submission] Core statements and a small answer: submissions come in bursts
        # (the bench submits 200 back to back) and the ORM's unit of work costs twice as much here.
        with db.engine.begin() as s:  # a Core connection: no ORM session to set up
            live = s.scalar(_COUNT_LIVE, {"user": p.name})
            if live >= cfg.max_unfinished_per_user:
                raise Conflict(f"user {p.name} already has {live} unfinished jobs "
                               f"(limit {cfg.max_unfinished_per_user})")
            jid = s.execute(_INSERT_JOB, {
                "name": spec.name, "user": p.name, "group": p.group, "shared_in_group": spec.shared_in_group,
                "command": list(spec.command), "env": dict(spec.env), "workdir": spec.workdir, "nodes": spec.nodes,
                "procs_per_node": spec.procs_per_node, "priority": spec.priority, "status": JobStatus.QUEUED,
                "created_at": now, "assigned_nodes": [], "chain_id": 0, "first_id": 0, "restart_count": 0,
                "reason": WAITING, "stop_code": 0, "stop_requested": 0, "master_port": 0, "whole_life_state": 0,
            }).scalar_one()
            s.execute(_SET_CHAIN, {"b_id": jid})
            s.execute(_INSERT_EVENT, {"ts": now, "kind": "submitted", "job_id": jid, "node": None,
                                      "message": f"{p.name} submitted {spec.name} ({spec.nodes} nodes)"})
        sched_events.bump(capacity=False)
        return JSONResponse({"id": jid, "chain_id": jid, "first_id": jid, "restart_count": 0, "name": spec.name,
                             "user": p.name, "group": p.group, "nodes": spec.nodes, "priority": spec.priority,
                             "status": JobStatus.QUEUED, "chain_status": "waiting_init", "reason": WAITING,
                             "created_at": now}, status_code=201)

    @app.get("/v1/jobs")
    def list_jobs(p: User_, all: bool = False, status: Annotated[str | None, Query(max_length=16)] = None,
                  limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> list[dict]:
        if all and not p.admin:
            raise Forbidden("only admins may list every user's jobs (?all=true)")
        if status is not None and status not in (*JobStatus.LIVE, *JobStatus.DONE):
            raise ApiError(f"unknown status {status!r}; one of {', '.join((*JobStatus.LIVE, *JobStatus.DONE))}", 422)
        with db.read() as s:
            q = select(Job).order_by(Job.id.desc()).limit(limit)
            if not all:
                cond = Job.user == p.name
                if p.group:
                    cond = cond | ((Job.group == p.group) & Job.shared_in_group.is_(True))
                q = q.where(cond)
            if status:
                q = q.where(Job.status == status)
            return [_job_json(j) for j in s.scalars(q)]

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: JobId, p: User_) -> dict:
        with db.read() as s:
            j = _chain_latest(s, job_id, p)
            ranks = list(s.scalars(select(Rank).where(Rank.job_id == j.id).order_by(Rank.rank)))
            attempts = list(s.scalars(select(Job).where(Job.chain_id == j.chain_id).order_by(Job.id)))
            return _job_json(j, ranks, attempts)

    def _request_stop(job_id: int, p: Principal, code: int, verb: str) -> dict:
        with db.write() as s:
            j = _chain_latest(s, job_id, p)
            if j.status in JobStatus.DONE:
                raise Conflict(f"job {job_id} has already ended ({j.status}); nothing to {verb}")
            if code & StopCode.INTERRUPT and j.status != JobStatus.RUNNING:
                raise Conflict(f"job {job_id} is {j.status}; only a running job can be suspended")
            if j.stop_requested:
                raise Conflict(f"job {job_id} is already being stopped")
            j.stop_requested = code
            event_row(s, f"{verb}_requested", f"{p.name} asked to {verb} it", job_id=j.id)
            out = _job_json(j)
        sched_events.bump()
        return out

    @app.post("/v1/jobs/{job_id}/stop", status_code=202)
    def stop_job(job_id: JobId, p: User_) -> dict:
        return _request_stop(job_id, p, StopCode.MANUAL_STOP, "stop")

    @app.post("/v1/jobs/{job_id}/suspend", status_code=202)
    def suspend_job(job_id: JobId, p: User_) -> dict:
        return _request_stop(job_id, p, StopCode.INTERRUPT, "suspend")

    def _agent_client(node: str):
        from network.auth import load_cluster_key
        from network.rpc import RpcPool

        with rpc_lock:
            c = agent_rpc.get(node)
            if c is None:
                addr, port = cluster.endpoint("haiplatform.agent", node)
                c = agent_rpc[node] = RpcPool(addr, port, size=4, timeout=10.0, connect_timeout=3.0,
                                              credential=load_cluster_key(cluster))
            return c

    def _read_chunk(node: str, job_id: int, rank: int, offset: int) -> tuple[bytes, bool]:
        from network.errors import NetworkError

        try:
            rep = _agent_client(node).call("logs.read", {"job_id": job_id, "rank": rank,
                                                          "offset": offset, "max": 256 * 1024})
        except NetworkError as exc:
            raise ApiError(f"cannot read the log of job {job_id} rank {rank} from the agent on {node}: {exc}",
                           502) from exc
        return bytes(rep.payload), bool(rep.result.get("eof"))

    def _log_target(job_id: int, p: Principal, rank: int, attempt: int | None,
                    follow: bool) -> tuple[str | None, int] | None:
        """(node, attempt id) of the rank's log; node None: queued (the rank does not exist yet);
        None: a queued job's log without ``follow`` (empty)."""
        with db.read() as s:
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
                if j.status not in (JobStatus.QUEUED,):
                    raise NotFound(f"job {job_id} has no rank {rank} (it has "
                                   f"{s.scalar(select(func.count()).select_from(Rank).where(Rank.job_id == j.id))})")
            return (r.node if r else None), j.id

    def _rank_placed(job_id: int, p: Principal, rank: int) -> tuple[str, int] | bool:
        """Where a queued chain's rank runs once it exists; False: not yet; True: the chain ended without it."""
        with db.read() as s:
            j = _chain_latest(s, job_id, p)
            r = s.scalars(select(Rank).where(Rank.job_id == j.id, Rank.rank == rank)).first()
            if r is not None:
                return r.node, j.id
            return j.status in JobStatus.DONE

    def _rank_ended(jid: int, rank: int) -> bool:
        with db.read() as s:
            r = s.scalars(select(Rank).where(Rank.job_id == jid, Rank.rank == rank)).first()
            return r is None or r.status in RankStatus.DONE

    @app.get("/v1/jobs/{job_id}/logs")
    async def job_logs(request: Request, job_id: JobId, p: User_,
                       rank: Annotated[int, Query(ge=0, le=INT32)] = 0,
                       offset: Annotated[int, Query(ge=0, le=OFFSET_MAX)] = 0, follow: bool = False,
                       attempt: Annotated[int | None, Query(ge=1, le=INT32)] = None):
        target = await run_in_threadpool(_log_target, job_id, p, rank, attempt, follow)
        if target is None:
            return PlainTextResponse("")
        node, jid = target
        if not follow:
            data, _ = await run_in_threadpool(_read_chunk, node, jid, rank, offset)
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
                    placed = await limits.off_loop(_rank_placed, job_id, p, rank)
                    if placed is True:
                        return
                    if placed is not False:
                        node, jid = placed
                    continue
                try:
                    data, eof = await limits.off_loop(_read_chunk, node, jid, rank, pos)
                except ApiError as exc:
                    if await limits.off_loop(_rank_ended, jid, rank):
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
                    if await limits.off_loop(_rank_ended, jid, rank):
                        ended_checks += 1
                    if ended_checks >= 2:
                        return
                await asyncio.sleep(0.1 if idle < 50 else 0.5)  # a quiet log is polled less often

        return GuardedStream(stream(), on_close=close, media_type="text/plain; charset=utf-8")

    # -- nodes, users, quotas -------------------------------------------------------------------
    def _held(s) -> dict[str, int]:
        held = {}
        for j in s.scalars(select(Job).where(Job.status.in_(JobStatus.ACTIVE))):
            for n in j.assigned_nodes:
                held[n] = j.id
        return held

    @app.get("/v1/nodes")
    def nodes(p: User_) -> list[dict]:
        with db.read() as s:
            held = _held(s)
            now = time.time()
            return [_node_json(n, held, now) for n in s.scalars(select(NodeRow).order_by(NodeRow.name))]

    def _drain(name: str, drained: bool, reason: str, p: Principal) -> dict:
        with db.write() as s:
            n = s.get(NodeRow, name)
            if n is None:
                raise NotFound(f"no node {name!r} has registered (known: "
                               f"{', '.join(s.scalars(select(NodeRow.name))) or 'none'})")
            n.drained, n.drain_reason = drained, reason if drained else ""
            event_row(s, "drained" if drained else "undrained", f"by {p.name}: {reason}", node=name)
            out = _node_json(n, _held(s), time.time())
        sched_events.bump()
        return out

    @app.post("/v1/nodes/{name}/drain")
    def drain(name: Annotated[str, PathParam(max_length=64)], p: Admin_, body: DrainSpec | None = None) -> dict:
        return _drain(name, True, body.reason if body else "", p)

    @app.post("/v1/nodes/{name}/undrain")
    def undrain(name: Annotated[str, PathParam(max_length=64)], p: Admin_) -> dict:
        return _drain(name, False, "", p)

    @app.get("/v1/whoami")
    def whoami(p: User_) -> dict:
        return {"name": p.name, "role": p.role, "group": p.group, **({"job": p.chain} if p.role == "job" else {})}

    @app.get("/v1/users")
    def users(p: Admin_) -> list[dict]:
        with db.read() as s:
            return [{"name": u.name, "role": u.role, "group": u.group, "active": u.active}
                    for u in s.scalars(select(User).order_by(User.name))]

    @app.post("/v1/users", status_code=201)
    def add_user(spec: UserSpec, p: Admin_) -> dict:
        tok = secrets.token_urlsafe(24)
        try:
            with db.write() as s:
                if s.scalars(select(User).where(User.name == spec.name)).first():
                    raise Conflict(f"user {spec.name!r} already exists")
                if spec.group and s.get(Group, spec.group) is None:
                    s.add(Group(name=spec.group))
                s.add(User(name=spec.name, role=spec.role, group=spec.group, token_hash=hash_token(tok)))
                event_row(s, "user_added", f"{p.name} added {spec.name} ({spec.role})")
        except IntegrityError as exc:
            raise Conflict(f"user {spec.name!r} already exists") from exc
        return {"name": spec.name, "role": spec.role, "group": spec.group, "token": tok}

    @app.get("/v1/quotas")
    def quotas(p: User_) -> list[dict]:
        with db.read() as s:
            return [{"subject": q.subject, "priority": q.priority, "max_nodes": q.max_nodes}
                    for q in s.scalars(select(Quota).order_by(Quota.subject, Quota.priority))]

    @app.put("/v1/quotas")
    def set_quota(spec: QuotaSpec, p: Admin_) -> dict:
        with db.write() as s:
            q = s.scalars(select(Quota).where(Quota.subject == spec.subject, (
                Quota.priority.is_(None) if spec.priority is None else Quota.priority == spec.priority))).first()
            if q is None:
                s.add(Quota(subject=spec.subject, priority=spec.priority, max_nodes=spec.max_nodes))
            else:
                q.max_nodes = spec.max_nodes
            event_row(s, "quota_set", f"{p.name}: {spec.subject} priority {spec.priority} -> {spec.max_nodes}")
        sched_events.bump()
        return spec.model_dump()

    @app.delete("/v1/quotas")
    def delete_quota(p: Admin_, subject: Annotated[str, Query(max_length=80, pattern=NO_NUL)],
                     priority: Annotated[int | None, Query(ge=0, le=50)] = None) -> dict:
        with db.write() as s:
            q = s.scalars(select(Quota).where(Quota.subject == subject, (
                Quota.priority.is_(None) if priority is None else Quota.priority == priority))).first()
            if q is None:
                raise NotFound(f"no quota for {subject} at priority {priority}")
            s.delete(q)
        sched_events.bump()
        return {"deleted": subject, "priority": priority}

    @app.get("/v1/events")
    def events(p: Admin_, job_id: Annotated[int | None, Query(ge=1, le=INT32)] = None, limit: Annotated[int, Query(ge=1, le=10000)] = 100
               ) -> list[dict]:
        with db.read() as s:
            q = select(Event).order_by(Event.id.desc()).limit(limit)
            if job_id is not None:
                q = q.where(Event.job_id == job_id)
            return [{"ts": e.ts, "kind": e.kind, "job_id": e.job_id, "node": e.node, "message": e.message}
                    for e in s.scalars(q)]

    # -- agents ---------------------------------------------------------------------------------
    @app.post("/v1/agent/register")
    def register(spec: RegisterSpec, p: Service_) -> dict:
        try:
            cn = cluster.node(spec.node)
        except KeyError as exc:
            raise NotFound(f"node {spec.node!r} is not in the cluster description {cluster.source}") from exc
        now = time.time()
        with db.write() as s:
            n = s.get(NodeRow, spec.node)
            if n is None:
                n = NodeRow(name=spec.node, registered_at=now)
                s.add(n)
            restarted = bool(n.agent_epoch) and n.agent_epoch != spec.epoch
            n.address, n.zone, n.leaf = cn.address, cn.zone, cn.leaf
            n.gpus, n.cpus, n.memory_gib = spec.gpus, spec.cpus, spec.memory_gib
            n.facts, n.agent_epoch, n.last_seen = spec.facts, spec.epoch, now
            was = n.state
            n.state = "up"
            if restarted:  # its old processes are gone: whatever ran there is lost
                s.execute(update(Rank).where(Rank.node == spec.node, Rank.status.in_(
                    (RankStatus.CREATED, RankStatus.RUNNING))).values(
                    status=RankStatus.LOST, finished_at=now, message="the node's agent restarted"))
            event_row(s, "node_registered", f"agent epoch {spec.epoch}" + (" (restarted)" if restarted else "")
                      + ("" if was == "up" else f", was {was}"), node=spec.node)
        epochs[spec.node] = spec.epoch
        last_beat[spec.node] = time.monotonic()
        sched_events.bump()
        return {"ok": True, "seq": agent_events[spec.node].seq}

    def _beat_due(node: str, epoch: str) -> bool:
        """Whether this sync must write a heartbeat (at most one per heartbeat_interval / 2)."""
        if epochs.get(node) not in (None, epoch):
            raise Conflict(f"agent epoch {epoch} of {node} is stale; register again")
        return time.monotonic() - last_beat.get(node, 0.0) >= cfg.heartbeat_interval / 2

    def _beat(node: str, epoch: str) -> None:
        if not _beat_due(node, epoch):
            return
        last_beat[node] = time.monotonic()
        with db.write() as s:
            n = s.get(NodeRow, node)
            if n is None:
                raise NotFound(f"node {node} has not registered")
            n.last_seen = time.time()
            back = n.state != "up"
            if back:
                n.state = "up"
                event_row(s, "node_back", "heartbeats resumed", node=node)
        if back:
            sched_events.bump()

    def _work(node: str, epoch: str) -> list[dict]:
        _beat(node, epoch)
        with db.ro_engine.begin() as s:  # Core rows: the agents' hot path
            rows = s.execute(_WORK, {"node": node}).all()
            out = []
            for r in rows:
                j = r
                nnodes = len(j.assigned_nodes)
                if nnodes > 1 and not j.master_port and j.assigned_nodes[0] != node:
                    continue  # wait for the master node's agent to pick the port
                out.append({"job_id": j.job_id, "rank": r.rank, "local_rank": r.local_rank, "status": r.status,
                            "desired": r.desired, "command": j.command, "env": j.env, "workdir": j.workdir,
                            "name": j.name, "user": j.user, "chain_id": j.chain_id,
                            "restart_count": j.restart_count, "whole_life_state": j.whole_life_state,
                            "nodes": j.assigned_nodes, "master_addr": cluster.node(j.assigned_nodes[0]).address,
                            "master_port": j.master_port, "ppn": j.procs_per_node})
            return out

    @app.get("/v1/agent/sync")
    async def sync(p: Service_, node: Annotated[str, Query(max_length=64)],
                   epoch: Annotated[str, Query(max_length=40, pattern=NO_NUL)],
                   seq: Annotated[int, Query(ge=-1, le=SEQ_MAX)] = -1,
                   timeout: Annotated[float, Query(ge=0, le=60)] = 2.0) -> dict:
        if node not in agent_events:
            raise NotFound(f"node {node!r} is not in the cluster description {cluster.source}")
        if _beat_due(node, epoch):  # a thread hop only when a heartbeat must be written
            await run_in_threadpool(_beat, node, epoch)
        cur = await agent_events[node].wait(seq, timeout)
        work = await run_in_threadpool(_work, node, epoch)
        return {"seq": cur, "ranks": work}

    @app.post("/v1/agent/report")
    def report(spec: ReportSpec, p: Service_) -> dict:
        now = time.time()
        ended = False
        live = (RankStatus.CREATED, RankStatus.RUNNING)
        with db.engine.begin() as s:  # Core: conditional UPDATEs, ranks only move forward
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
                    ended |= bool(s.execute(update(Rank).where(*mine, Rank.status.in_(live)).values(**vals)).rowcount)
                else:
                    raise ApiError(f"rank status {rr.status!r} cannot be reported (running, "
                                   f"{', '.join(RankStatus.DONE)})", 422)
                if rr.whole_life_state is not None:
                    s.execute(update(Job).where(Job.id == rr.job_id).values(whole_life_state=rr.whole_life_state))
        if spec.master_ports:
            with db.read() as s:
                for jid in spec.master_ports:
                    j = s.get(Job, jid)
                    for n in (j.assigned_nodes if j else ()):
                        if n in agent_events:
                            agent_events[n].bump()
        if spec.ranks:
            sched_events.bump()
        return {"ok": True, "ended": ended}

    # -- the scheduler --------------------------------------------------------------------------
    @app.get("/v1/internal/wait")
    async def internal_wait(p: Service_, seq: Annotated[int, Query(ge=-1, le=SEQ_MAX)] = -1, timeout: Annotated[float, Query(ge=0, le=60)] = 1.0
                            ) -> dict:
        seq = await sched_events.wait(seq, timeout)
        return {"seq": seq, "cap": sched_events.cap}

    @app.post("/v1/internal/notify")
    async def internal_notify(p: Service_, body: NotifySpec | None = None) -> dict:
        nodes = body.nodes if body and body.nodes is not None else list(agent_events)
        for n in nodes:
            if n in agent_events:
                agent_events[n].bump()
        return {"woken": nodes}

    return app


def bootstrap(cfg: HaiConfig, db: Database) -> None:
    """Create the admin user (token from the config or STATE_DIR/admin.token) when it is missing."""
    tok = cfg.admin()
    with db.write() as s:
        u = s.scalars(select(User).where(User.name == cfg.admin_user)).first()
        if u is None:
            s.add(User(name=cfg.admin_user, role="admin", token_hash=hash_token(tok)))
            event_row(s, "user_added", f"bootstrap admin {cfg.admin_user}")
        elif u.token_hash != hash_token(tok):
            u.token_hash = hash_token(tok)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from network.service import parse_service_args, service_parser

    from .config import load_config
    from .errors import HaiError

    ap = service_parser("haiplatform.api", "the HAI-Platform API server")
    args, cluster, node = parse_service_args(ap, argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = load_config(cluster)
        url = cfg.resolved_db_url()
        migrate(url)
        db = Database(url)
        bootstrap(cfg, db)
    except HaiError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    svc = cluster.service("haiplatform.api")
    port = svc.port if svc else 0
    app = create_app(cluster, cfg, db)
    log.info("API on http://%s:%s (db %s, state %s)", node.address, port, db.safe_url, cfg.state_dir)
    # uvicorn handles SIGTERM / SIGINT itself (graceful shutdown)
    uvicorn.run(app, host=node.address, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=3)
    db.dispose()


if __name__ == "__main__":
    main()
