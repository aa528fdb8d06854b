"""Who is calling: authentication, the principal and the dependencies the routers share.

Users send ``Authorization: Bearer TOKEN``; agents and the scheduler send the cluster secret (the
``service`` role). A job authenticates with its own token ($HAI_JOB_TOKEN,
:mod:`haiplatform.jobtoken`): it may call the routes in :data:`JOB_ROUTES` only, for its own job
only, and only until that job has finished.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated

from fastapi import Depends, Request
from pydantic import BaseModel
from sqlalchemy import select

from ..db import Job, User, hash_token
from ..errors import ApiError, AuthError, Forbidden
from ..jobtoken import PREFIX as JOB_TOKEN_PREFIX
from ..jobtoken import chain_of
from ..states import JobStatus
from .state import ApiState, api_state

__all__ = ["Principal", "JOB_ROUTES", "authenticate", "principal", "admin", "service", "limit_key", "who",
           "User_", "Admin_", "Service_", "State_"]


class Principal(BaseModel):
    name: str
    role: str           # admin | user | service | job
    group: str | None = None
    chain: int | None = None  # a job's token: the chain it belongs to (``name`` is the job's user)

    @property
    def admin(self) -> bool:
        return self.role in ("admin", "service")


#: what a job's own token may call (method, route): its job's status and logs, its own chain's
#: priority (hfai's ``set_priority``), and who it is. A route not listed here (every other,
#: including routes added later) answers a job token with 403.
JOB_ROUTES = frozenset({("GET", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/logs"), ("GET", "/v1/whoami"),
                        ("POST", "/v1/jobs/{job_id}/priority")})


def authenticate(st: ApiState, request: Request) -> Principal:
    """The request's principal (:class:`AuthError` without a valid token)."""
    h = request.headers.get("authorization", "")
    if not h.lower().startswith("bearer ") or not h[7:].strip():
        raise AuthError("missing token: send 'Authorization: Bearer TOKEN' (hai reads $HAI_TOKEN)")
    tok = h[7:].strip()
    if secrets.compare_digest(tok, st.secret):
        return Principal(name="cluster", role="service")
    now = time.monotonic()
    hit = st.token_cache.get(tok)
    if hit is None or now - hit[0] > 2.0:  # [Note: a revoked token works for at most 2 s more]
        if tok.startswith(JOB_TOKEN_PREFIX):
            hit = (now, _job_principal(st, tok))
        else:
            with st.db.read() as s:
                u = s.scalars(select(User).where(User.token_hash == hash_token(tok),
                                                 User.active.is_(True))).first()
                p = Principal(name=u.name, role=u.role, group=u.group) if u else None
                if u is not None and u.disabled:
                    p = f"user {u.name} is disabled; ask an admin to enable it"  # refused, with the reason
            hit = (now, p)
        if len(st.token_cache) > 10000:  # bounded: random tokens must not grow it forever
            st.token_cache.clear()
        st.token_cache[tok] = hit
    if isinstance(hit[1], str):
        raise AuthError(hit[1])
    if hit[1] is None:
        if tok.startswith(JOB_TOKEN_PREFIX):
            raise AuthError("invalid job token: not made by this cluster, or its job has finished")
        raise AuthError("invalid token: no active user has it")
    return hit[1]


def _job_principal(st: ApiState, tok: str) -> Principal | None:
    """A job token's principal while its chain has not finished (None: not a valid job token)."""
    chain = chain_of(st.secret, tok)
    if chain is None:
        return None
    with st.db.read() as s:
        j = s.scalars(select(Job).where(Job.chain_id == chain).order_by(Job.id.desc()).limit(1)).first()
        if j is None or j.status in JobStatus.ENDED:
            return None  # a finished job's token is worth nothing
        return Principal(name=j.user, role="job", chain=chain)


def limit_key(p: Principal) -> str:
    """Whose bucket and streams a request counts against: a user, or one job's token."""
    return f"job:{p.chain}" if p.role == "job" else p.name


def who(request: Request) -> tuple[str, bool]:
    """The limits middleware's key for a request, and whether it is a service's (:mod:`haiplatform.limits`)."""
    try:
        p = authenticate(request.app.state.api, request)
    except ApiError:  # the route answers 401; its rate is its address's
        return f"addr:{request.client.host if request.client else '?'}", False
    request.state.principal = p  # the route's ``principal`` takes it from here: one authentication a request
    return limit_key(p), p.role == "service"


async def principal(request: Request) -> Principal:
    """Who sent the request (401 without a valid token). [Note: async dependencies] A sync dependency
    costs a thread-pool hop per request; this one touches the database only on a token-cache miss.
    The limits middleware has usually authenticated the request already (:func:`who`)."""
    p = getattr(request.state, "principal", None) or authenticate(request.app.state.api, request)
    if p.role == "job":
        route = request.scope.get("route")
        if (request.method, getattr(route, "path", None)) not in JOB_ROUTES:
            raise Forbidden(f"a job's token (job {p.chain}) may only read its own job's status and logs and set "
                            "its priority; "
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
State_ = Annotated[ApiState, Depends(api_state)]
