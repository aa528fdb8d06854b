"""Who am I; admins' users (add, remove, disable, token reset, group), groups, quotas and the event log
(``/v1/whoami``, ``/v1/users``, ``/v1/groups``, ``/v1/quotas``, ``/v1/events``)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from ..db import Event, Group, Job, Quota, User, event_row, hash_token
from ..errors import Conflict, NotFound
from ..states import JobStatus, StopCode
from .deps import Admin_, State_, User_
from .models import INT32, NO_NUL, USER_NAME, GroupSpec, QuotaSpec, UserSpec

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/whoami")
def whoami(p: User_) -> dict:
    return {"name": p.name, "role": p.role, "group": p.group, **({"job": p.chain} if p.role == "job" else {})}


@router.get("/v1/users")
def users(p: Admin_, st: State_) -> list[dict]:
    with st.db.read() as s:
        return [_user_json(u) for u in s.scalars(select(User).order_by(User.name))]


def _user_json(u: User) -> dict:
    return {"name": u.name, "role": u.role, "group": u.group, "active": u.active, "disabled": bool(u.disabled),
            "created_at": u.created_at}


UserName = Annotated[str, PathParam(pattern=USER_NAME, description="a user's name")]
GroupName = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="a group's name")]


def _user(s, name: str) -> User:
    u = s.scalars(select(User).where(User.name == name)).first()
    if u is None:
        raise NotFound(f"no user {name}")
    return u


def _forget_tokens(st) -> None:
    """Drop the token cache: a removed, disabled or re-keyed user's token stops working at once."""
    st.token_cache.clear()


@router.delete("/v1/users/{name}")
def remove_user(name: UserName, p: Admin_, st: State_, force: bool = False) -> dict:
    """Remove a user: their token stops working and their quotas go; their ended jobs stay in the
    history. Refused (409) while they have live jobs, unless ``force`` (which stops them)."""
    if name == p.name:
        raise Conflict("you cannot remove yourself")
    with st.db.write() as s:
        u = _user(s, name)
        live = list(s.scalars(select(Job).where(Job.user == name, Job.status.in_(JobStatus.LIVE))))
        if live and not force:
            raise Conflict(f"user {name} has {len(live)} live jobs ({', '.join(str(j.chain_id) for j in live[:10])}"
                           f"{'...' if len(live) > 10 else ''}); stop them first or remove with force=true")
        for j in live:
            if not j.stop_requested:
                j.stop_requested = StopCode.MANUAL_STOP
                event_row(s, "stop_requested", f"{p.name} removed user {name}", job_id=j.id)
        s.execute(delete(Quota).where(Quota.subject == f"user:{name}"))
        s.delete(u)
        event_row(s, "user_removed", f"{p.name} removed {name}" + (f" and stopped {len(live)} jobs" if live else ""))
    _forget_tokens(st)
    st.sched_events.bump()
    return {"removed": name, "stopped": [j.chain_id for j in live]}


def _set_disabled(st, p, name: str, disabled: bool) -> dict:
    with st.db.write() as s:
        u = _user(s, name)
        if disabled and name == p.name:
            raise Conflict("you cannot disable yourself")
        u.disabled = disabled
        event_row(s, "user_disabled" if disabled else "user_enabled", f"{p.name} {'dis' if disabled else 'en'}abled {name}")
        out = _user_json(u)
    _forget_tokens(st)
    st.sched_events.bump()
    return out


@router.post("/v1/users/{name}/disable")
def disable_user(name: UserName, p: Admin_, st: State_) -> dict:
    """A disabled user's token is refused; their queued jobs stay queued but do not start."""
    return _set_disabled(st, p, name, True)


@router.post("/v1/users/{name}/enable")
def enable_user(name: UserName, p: Admin_, st: State_) -> dict:
    return _set_disabled(st, p, name, False)


@router.post("/v1/users/{name}/token")
def reset_token(name: UserName, p: Admin_, st: State_) -> dict:
    """A new token for the user; the old one stops working."""
    tok = secrets.token_urlsafe(24)
    with st.db.write() as s:
        u = _user(s, name)
        u.token_hash = hash_token(tok)
        event_row(s, "token_reset", f"{p.name} reset the token of {name}")
    _forget_tokens(st)
    return {"name": name, "token": tok}


@router.put("/v1/users/{name}/group")
def set_group(name: UserName, body: GroupSpec, p: Admin_, st: State_) -> dict:
    """Move a user to a group (made when new), or out of any (``null``). Their later jobs carry it."""
    with st.db.write() as s:
        u = _user(s, name)
        if body.group and s.get(Group, body.group) is None:
            s.add(Group(name=body.group))
            s.flush()
        u.group = body.group
        event_row(s, "user_group", f"{p.name} set the group of {name} to {body.group}")
        out = _user_json(u)
    _forget_tokens(st)
    return out


@router.get("/v1/groups")
def groups(p: Admin_, st: State_) -> list[dict]:
    with st.db.read() as s:
        members: dict[str, list[str]] = {g: [] for g in s.scalars(select(Group.name).order_by(Group.name))}
        for u in s.scalars(select(User).where(User.group.is_not(None)).order_by(User.name)):
            members.setdefault(u.group, []).append(u.name)
    return [{"name": g, "members": m} for g, m in members.items()]


@router.delete("/v1/groups/{name}")
def delete_group(name: GroupName, p: Admin_, st: State_) -> dict:
    """Delete an empty group (409 while it has members) and its quotas."""
    with st.db.write() as s:
        g = s.get(Group, name)
        if g is None:
            raise NotFound(f"no group {name}")
        members = list(s.scalars(select(User.name).where(User.group == name)))
        if members:
            raise Conflict(f"group {name} has members ({', '.join(members)}); move them first")
        s.execute(delete(Quota).where(Quota.subject == f"group:{name}"))
        s.delete(g)
        event_row(s, "group_removed", f"{p.name} removed group {name}")
    st.sched_events.bump()
    return {"removed": name}


@router.post("/v1/users", status_code=201)
def add_user(spec: UserSpec, p: Admin_, st: State_) -> dict:
    tok = secrets.token_urlsafe(24)
    try:
        with st.db.write() as s:
            if s.scalars(select(User).where(User.name == spec.name)).first():
                raise Conflict(f"user {spec.name!r} already exists")
            if spec.group and s.get(Group, spec.group) is None:
                s.add(Group(name=spec.group))
            s.add(User(name=spec.name, role=spec.role, group=spec.group, token_hash=hash_token(tok)))
            event_row(s, "user_added", f"{p.name} added {spec.name} ({spec.role})")
    except IntegrityError as exc:
        raise Conflict(f"user {spec.name!r} already exists") from exc
    return {"name": spec.name, "role": spec.role, "group": spec.group, "token": tok}


@router.get("/v1/quotas")
def quotas(p: User_, st: State_) -> list[dict]:
    with st.db.read() as s:
        return [{"subject": q.subject, "priority": q.priority, "max_nodes": q.max_nodes}
                for q in s.scalars(select(Quota).order_by(Quota.subject, Quota.priority))]


@router.put("/v1/quotas")
def set_quota(spec: QuotaSpec, p: Admin_, st: State_) -> dict:
    with st.db.write() as s:
        kind, _, who = spec.subject.partition(":")
        exists = (s.scalars(select(User.id).where(User.name == who)).first() if kind == "user"
                  else s.get(Group, who))
        if exists is None:
            raise NotFound(f"no {kind} {who}: add it first (a quota for {spec.subject} would apply to nobody)")
        q = s.scalars(select(Quota).where(Quota.subject == spec.subject, (
            Quota.priority.is_(None) if spec.priority is None else Quota.priority == spec.priority))).first()
        if q is None:
            s.add(Quota(subject=spec.subject, priority=spec.priority, max_nodes=spec.max_nodes))
        else:
            q.max_nodes = spec.max_nodes
        event_row(s, "quota_set", f"{p.name}: {spec.subject} priority {spec.priority} -> {spec.max_nodes}")
    st.sched_events.bump()
    return spec.model_dump()


@router.delete("/v1/quotas")
def delete_quota(p: Admin_, st: State_, subject: Annotated[str, Query(max_length=80, pattern=NO_NUL)],
                 priority: Annotated[int | None, Query(ge=0, le=50)] = None) -> dict:
    with st.db.write() as s:
        q = s.scalars(select(Quota).where(Quota.subject == subject, (
            Quota.priority.is_(None) if priority is None else Quota.priority == priority))).first()
        if q is None:
            raise NotFound(f"no quota for {subject} at priority {priority}")
        s.delete(q)
    st.sched_events.bump()
    return {"deleted": subject, "priority": priority}


@router.get("/v1/events")
def events(p: Admin_, st: State_, job_id: Annotated[int | None, Query(ge=1, le=INT32)] = None,
           job: Annotated[int | None, Query(ge=1, le=INT32, description="a chain: every attempt's events")] = None,
           user: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
           kind: Annotated[str | None, Query(max_length=32, pattern=NO_NUL)] = None,
           node: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
           since: Annotated[float | None, Query(ge=0, le=1e11)] = None,
           limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> list[dict]:
    """The event log, newest first: by attempt (``job_id``), chain (``job``), the jobs of ``user``,
    ``kind``, ``node`` and time (``since``, unix seconds)."""
    with st.db.read() as s:
        q = select(Event).order_by(Event.id.desc()).limit(limit)
        if job_id is not None:
            q = q.where(Event.job_id == job_id)
        if job is not None:
            q = q.where(Event.job_id.in_(select(Job.id).where(Job.chain_id == job)))
        if user is not None:
            q = q.where(Event.job_id.in_(select(Job.id).where(Job.user == user)))
        if kind is not None:
            q = q.where(Event.kind == kind)
        if node is not None:
            q = q.where(Event.node == node)
        if since is not None:
            q = q.where(Event.ts >= since)
        return [{"ts": e.ts, "kind": e.kind, "job_id": e.job_id, "node": e.node, "message": e.message}
                for e in s.scalars(q)]
