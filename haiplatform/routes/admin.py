"""Who am I; admins' users, quotas and the event log (``/v1/whoami``, ``/v1/users``, ``/v1/quotas``,
``/v1/events``)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..db import Event, Group, Quota, User, event_row, hash_token
from ..errors import Conflict, NotFound
from .deps import Admin_, State_, User_
from .models import INT32, NO_NUL, QuotaSpec, UserSpec

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/whoami")
def whoami(p: User_) -> dict:
    return {"name": p.name, "role": p.role, "group": p.group, **({"job": p.chain} if p.role == "job" else {})}


@router.get("/v1/users")
def users(p: Admin_, st: State_) -> list[dict]:
    with st.db.read() as s:
        return [{"name": u.name, "role": u.role, "group": u.group, "active": u.active}
                for u in s.scalars(select(User).order_by(User.name))]


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
           limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> list[dict]:
    with st.db.read() as s:
        q = select(Event).order_by(Event.id.desc()).limit(limit)
        if job_id is not None:
            q = q.where(Event.job_id == job_id)
        return [{"ts": e.ts, "kind": e.kind, "job_id": e.job_id, "node": e.node, "message": e.message}
                for e in s.scalars(q)]
