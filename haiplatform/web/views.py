"""The dashboard's pages and actions (``/ui/...``): server-rendered HTML over the API's own route functions.

[Note: one set of rules] Every page calls the route function of the matching API route
(``list_jobs``, ``get_job``, ``stop_job``, ``job_logs``, ``nodes``, ``users`` ...) with the
principal its session's token authenticates to, so the dashboard can show or do exactly what
the API would let that token see or do, and a rule changed there changes here. Where the API
checks a role in a dependency (``Admin_``), the page awaits that same dependency first
(:func:`haiplatform.routes.deps.admin`). Errors the routes raise (403, 404, 409) become an error
page with the API's message and status.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from types import SimpleNamespace
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..errors import ApiError, AuthError, Forbidden
from ..routes import admin as admin_routes
from ..routes import jobs as job_routes
from ..routes import nodes as node_routes
from ..routes.deps import Principal, admin, authenticate
from ..routes.models import INT32, NO_NUL, OFFSET_MAX, JobId
from ..routes.state import ApiState
from ..states import JobStatus
from .fs3health import fs3_health
from .session import COOKIE, LOGIN_COOKIE, Session, Sessions

__all__ = ["router", "install", "CSP"]

router = APIRouter(prefix="/ui", include_in_schema=False)

#: no inline script or style, nothing from another origin, no framing, forms post only here
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store", "X-Frame-Options": "DENY"}

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("haiplatform.web", "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                lstrip_blocks=True)
_STATIC = {name: (resources.files("haiplatform.web").joinpath("static", name).read_bytes(), media)
           for name, media in (("style.css", "text/css; charset=utf-8"),
                               ("follow.js", "text/javascript; charset=utf-8"))}

#: actions a job page offers: form name -> (the name of its route function in routes/jobs.py, when the job's page shows the button, only
#: to its owner and admins); the route decides whether the viewer may
ACTIONS: dict[str, tuple[str, Callable[[dict], bool], bool]] = {
    "stop": ("stop_job", lambda j: j["status"] in JobStatus.LIVE, False),
    "suspend": ("suspend_job", lambda j: j["status"] == JobStatus.RUNNING, False),
    "hold": ("hold_job", lambda j: j["status"] == JobStatus.QUEUED and not j.get("held"), True),
    "release": ("release_job", lambda j: j["status"] == JobStatus.QUEUED and bool(j.get("held")), True),
    "resubmit": ("resubmit_job", lambda j: j["status"] in JobStatus.ENDED, True),
}
#: what the page says after an action (fixed texts: nothing from the URL is shown as a message)
_DONE = {"stop": "Stop requested.", "suspend": "Suspend requested.", "hold": "Job held.",
         "release": "Job released.", "resubmit": "Resubmitted as a new job.", "logout": "Logged out."}
Rank_ = Annotated[int, Path(ge=0, le=INT32)]
#: a filter goes to the database: a NUL (PostgreSQL's text cannot hold one) is a 422 here, as in the API
#: (the page calls the route functions directly, so the routes' own Query checks never run)
Filter_ = Annotated[str, Query(max_length=64, pattern=NO_NUL)]
Attempt_ = Annotated[int | None, Query(ge=1, le=INT32)]
#: a log read for the page and for each follow poll
LOG_PAGE_LINES = 2000
LOG_POLL_BYTES = 256 * 1024


class LoginRequired(Exception):
    """No live session: the page answers with a redirect to the login form."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


@dataclass(frozen=True)
class Viewer:
    """Who looks at a page: the API principal of the session's token, and the session."""

    p: Principal
    session: Session


# -- the app's side ---------------------------------------------------------------------------------

def install(app: FastAPI, ttl: float = 8 * 3600) -> None:
    """Serve the dashboard from ``app`` under ``/ui/`` (sessions of ``ttl`` seconds)."""
    app.state.web = Sessions(ttl=ttl)
    app.add_exception_handler(LoginRequired, _to_login)
    app.include_router(router)


async def _to_login(request: Request, exc: LoginRequired) -> Response:
    return _redirect(f"/ui/login?next={quote(exc.next_url, safe='/')}")


def _sessions(request: Request) -> Sessions:
    return request.app.state.web


def _st(request: Request) -> ApiState:
    return request.app.state.api


def _secure(resp: Response) -> Response:
    resp.headers.update(_HEADERS)
    return resp


def _https(request: Request) -> bool:
    """Whether the dashboard's cookies carry Secure (``[haiplatform] web_secure_cookies``).

    [Note: behind a TLS proxy] The API serves plain HTTP; a proxy in front of it may end TLS, and then
    every request here looks like http. "always" marks the cookies Secure whatever the request says;
    "proxy" believes the proxy's X-Forwarded-Proto (only safe when nothing but the proxy reaches the
    API: anyone else could send the header); "auto" (the default) goes by the request's own scheme."""
    mode = getattr(_st(request).cfg, "web_secure_cookies", "auto")
    if mode == "always" or request.url.scheme == "https":
        return True
    if mode == "proxy":
        return request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower() == "https"
    return False


def _redirect(url: str) -> Response:
    return _secure(RedirectResponse(url, status_code=303))


def _render(request: Request, name: str, viewer: Viewer | None, status: int = 200, **ctx: Any) -> Response:
    done = request.query_params.get("done")
    html = _TEMPLATES.get_template(name).render(
        viewer=viewer, me=viewer.p if viewer else None, csrf=viewer.session.csrf if viewer else "",
        notice=_DONE.get(done or ""), path=request.url.path, when=_when, ago=_ago, ran=_ran, **ctx)
    return _secure(HTMLResponse(html, status_code=status))


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _ran(j: dict) -> float:
    """A chain's run time: its earlier attempts' and this attempt's (job JSON counts this attempt's
    own time only while it runs)."""
    this = 0.0
    if j["status"] not in JobStatus.ACTIVE and j.get("started_at") and j.get("finished_at"):
        this = max(0.0, j["finished_at"] - j["started_at"])
    return j["chain_run_s"] + this


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# -- who is looking ---------------------------------------------------------------------------------

def _principal_of(st: ApiState, token: str) -> Principal:
    """The API's own authentication of ``token`` (401 as the API would say it)."""
    return authenticate(st, SimpleNamespace(headers={"authorization": f"Bearer {token}"}))  # type: ignore[arg-type]


def _viewer(request: Request) -> Viewer:
    """The session's viewer, authenticated again on every request ([Note: what the cookie holds])."""
    sid = request.cookies.get(COOKIE)
    sess = _sessions(request).get(sid)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if sess is None:
        raise LoginRequired(here)
    try:
        p = _principal_of(_st(request), sess.token)
    except AuthError:  # the token was reset or its user disabled or removed since the login
        _sessions(request).drop(sid)
        raise LoginRequired(here) from None
    return Viewer(p, sess)


def _page(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """A page or action: the viewer is found first; an API error becomes an error page."""
    @functools.wraps(fn)
    async def run(request: Request, **kw: Any) -> Response:
        viewer = _viewer(request)
        try:
            return await fn(request, viewer, **kw)
        except ApiError as exc:
            return _render(request, "error.html", viewer, status=exc.status or 400, error=str(exc),
                           kind=type(exc).__name__)
    # FastAPI reads the parameters: the request and the path/query ones, not the viewer
    import inspect

    sig = inspect.signature(fn)
    params = [v for k, v in sig.parameters.items() if k != "viewer"]
    run.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return run


async def _form(request: Request, max_bytes: int = 64 * 1024) -> dict[str, str]:
    """An urlencoded form's fields (the first value of each); 413 above ``max_bytes``."""
    body = await request.body()
    if len(body) > max_bytes:
        raise ApiError(f"form of {len(body)} bytes is over {max_bytes}", 413)
    try:
        fields = parse_qs(body.decode("ascii"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(f"malformed form: {exc}", 400) from exc
    return {k: v[0] for k, v in fields.items()}


def _same_origin(request: Request) -> None:
    """A POST whose Origin header (browsers send one) names another site is refused."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise Forbidden(f"cross-site request from {origin} refused")


async def _checked_form(request: Request, viewer: Viewer) -> dict[str, str]:
    """A POST action's form, after the same-origin and CSRF checks (403 without the session's token)."""
    _same_origin(request)
    form = await _form(request)
    if not same_secret(form.get("csrf", ""), viewer.session.csrf):
        raise Forbidden("the form's CSRF token is missing or stale; reload the page and try again")
    return form


def same_secret(given: str, expected: str) -> bool:
    """A constant-time comparison of a form's secret with the expected one.

    [Note: bytes, not str] ``secrets.compare_digest`` raises TypeError on a str that is not ASCII,
    and parse_qs turns ``%C3%A9`` into one: a crafted form was a 500 before any login. Bytes compare
    whatever they hold."""
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def safe_next(url: str | None) -> str:
    """Where to go after logging in: a path of the dashboard, never another site."""
    if not url or not url.startswith("/ui/") or "//" in url or "\\" in url or any(ord(c) < 33 for c in url):
        return "/ui/"
    return url


# -- login and logout -------------------------------------------------------------------------------

@router.get("/login")
async def login_form(request: Request, next: str = "/ui/") -> Response:
    return _login_page(request, safe_next(next))


def _login_page(request: Request, next_url: str, error: str | None = None, status: int = 200) -> Response:
    nonce = secrets.token_urlsafe(24)  # [Note: login CSRF] the form's field must match this cookie
    resp = _render(request, "login.html", None, status=status, next_url=next_url, nonce=nonce, error=error)
    resp.set_cookie(LOGIN_COOKIE, nonce, max_age=600, path="/ui/login", httponly=True, samesite="strict",
                    secure=_https(request))
    return resp


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the token as the API would; a user's or an admin's token opens a session."""
    try:
        _same_origin(request)
        form = await _form(request)
    except ApiError as exc:
        return _login_page(request, "/ui/", str(exc), exc.status or 400)
    next_url = safe_next(form.get("next"))
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not same_secret(form.get("nonce", ""), nonce):
        return _login_page(request, next_url, "the login form expired; please try again", 403)
    token = form.get("token", "").strip()
    try:
        p = _principal_of(_st(request), token)
    except AuthError as exc:
        return _login_page(request, next_url, str(exc), 401)
    if p.role not in ("user", "admin"):
        return _login_page(request, next_url, "a job's token or the cluster secret cannot log in here; "
                           "use a user's token (hai whoami shows whose yours is)", 403)
    sid, _ = _sessions(request).create(token, p.name)
    resp = _redirect(next_url)
    resp.set_cookie(COOKIE, sid, path="/ui", httponly=True, samesite="strict",
                    secure=_https(request))
    resp.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    return resp


@router.post("/logout")
@_page
async def logout(request: Request, viewer: Viewer) -> Response:
    await _checked_form(request, viewer)
    _sessions(request).drop(request.cookies.get(COOKIE))
    resp = _redirect("/ui/login?done=logout")
    resp.delete_cookie(COOKIE, path="/ui")
    return resp


# -- jobs -------------------------------------------------------------------------------------------

@router.get("/")
@_page
async def jobs_page(request: Request, viewer: Viewer, status: Filter_ = "", name: Filter_ = "", user: Filter_ = "",
                    since: Filter_ = "", until: Filter_ = "",
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Response:
    """The queue (with positions and why each waits), what runs, and the history with filters: the
    API's ``/v1/queue`` and ``/v1/history``."""
    st, p = _st(request), viewer.p
    rows = await run_in_threadpool(job_routes.queue, p, st)
    queued = [r for r in rows if r["status"] == JobStatus.QUEUED]
    running = [r for r in rows if r["status"] != JobStatus.QUEUED]
    hist = await run_in_threadpool(job_routes.history, p, st, user=user or None, status=status or None,
                                   since=_day(since, "since"), until=_day(until, "until", end=True),
                                   name=name or None, limit=limit, offset=0)
    found = json.loads(hist.body)
    return _render(request, "jobs.html", viewer, queued=queued, running=running, history=found["jobs"],
                   total=found["total"], statuses=JobStatus.ENDED,
                   filters={"status": status, "name": name, "user": user, "since": since, "until": until,
                            "limit": limit})


def _day(text: str, what: str, end: bool = False) -> float | None:
    """A YYYY-MM-DD date of the history's filter as unix seconds (UTC; ``end``: the day's end)."""
    if not text:
        return None
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise ApiError(f"{what} {text!r} is not a date (YYYY-MM-DD)", 422) from None
    return day.timestamp() + (86400 if end else 0)


def _actions(job: dict, p: Principal) -> list[str]:
    """The buttons a job's page shows the viewer (the route still decides whether they may)."""
    mine = p.admin or job["user"] == p.name
    return [a for a, (_, shown, owners) in ACTIONS.items() if shown(job) and (mine or not owners)]


@router.get("/jobs/{job_id}")
@_page
async def job_page(request: Request, viewer: Viewer, job_id: JobId) -> Response:
    job = await run_in_threadpool(job_routes.get_job, job_id, viewer.p, _st(request))
    return _render(request, "job.html", viewer, job=job, actions=_actions(job, viewer.p),
                   ended=job["status"] in JobStatus.ENDED)


@router.post("/jobs/{job_id}/{action}")
@_page
async def job_action(request: Request, viewer: Viewer, job_id: JobId, action: str) -> Response:
    await _checked_form(request, viewer)
    if action not in ACTIONS:
        raise ApiError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}", 404)
    fn = getattr(job_routes, ACTIONS[action][0])  # the route's function (by name: routes/jobs.py)
    if action == "resubmit":  # async (it submits); answers the new chain
        new = json.loads((await fn(job_id, viewer.p, _st(request))).body)["chain_id"]
        return _redirect(f"/ui/jobs/{new}?done=resubmit")
    await run_in_threadpool(fn, job_id, viewer.p, _st(request))
    return _redirect(f"/ui/jobs/{job_id}?done={action}")


async def _read_log(request: Request, viewer: Viewer, job_id: JobId, rank: int, offset: int | None,
                    attempt: int | None, limit: int, tail: int | None) -> tuple[bytes, int, int]:
    """(bytes, the log's size, the offset after them) through the API's own log route."""
    resp = await job_routes.job_logs(request, job_id, viewer.p, _st(request), rank=rank, offset=offset or 0,
                                     follow=False, attempt=attempt, tail=tail, limit=limit)
    body = bytes(resp.body)
    nxt = int(resp.headers.get("x-log-offset-next", (offset or 0) + len(body)))
    return body, int(resp.headers.get("x-log-size", nxt)), nxt


@router.get("/jobs/{job_id}/logs/{rank}")
@_page
async def log_page(request: Request, viewer: Viewer, job_id: JobId, rank: Rank_, attempt: Attempt_ = None,
                   offset: Annotated[int | None, Query(ge=0, le=OFFSET_MAX)] = None) -> Response:
    """A rank's log: its last lines (or from ``offset``), with a follow script for a live job."""
    job = await run_in_threadpool(job_routes.get_job, job_id, viewer.p, _st(request))
    data, size, nxt = await _read_log(request, viewer, job_id, rank, offset, attempt, 8 * 1024 * 1024,
                                      None if offset is not None else LOG_PAGE_LINES)
    start = nxt - len(data)
    return _render(request, "log.html", viewer, job=job, rank=rank, attempt=attempt, text=data.decode(errors="replace"),
                   start=start, next_offset=nxt, size=size, live=job["status"] not in JobStatus.ENDED)


@router.get("/jobs/{job_id}/logs/{rank}/more")
@_page
async def log_more(request: Request, viewer: Viewer, job_id: JobId, rank: Rank_,
                   offset: Annotated[int, Query(ge=0, le=OFFSET_MAX)] = 0, attempt: Attempt_ = None) -> Response:
    """What the follow script polls: the log's bytes after ``offset`` (plain text), the next offset
    in ``X-Log-Offset-Next`` and the job's status in ``X-Job-Status``."""
    data, size, nxt = await _read_log(request, viewer, job_id, rank, offset, attempt, LOG_POLL_BYTES, None)
    job = await run_in_threadpool(job_routes.get_job, job_id, viewer.p, _st(request))
    resp = Response(data, media_type="text/plain; charset=utf-8",
                    headers={"X-Log-Offset-Next": str(nxt), "X-Log-Size": str(size), "X-Job-Status": job["status"]})
    return _secure(resp)


# -- nodes, users and quotas, fs3 ---------------------------------------------------------------------

@router.get("/nodes")
@_page
async def nodes_page(request: Request, viewer: Viewer) -> Response:
    nodes = await run_in_threadpool(node_routes.nodes, viewer.p, _st(request))
    return _render(request, "nodes.html", viewer, nodes=nodes, now=time.time())


@router.get("/admin")
@_page
async def admin_page(request: Request, viewer: Viewer) -> Response:
    p = await admin(viewer.p)  # the API's own check of the Admin_ routes
    st = _st(request)
    users = await run_in_threadpool(admin_routes.users, p, st)
    quotas = await run_in_threadpool(admin_routes.quotas, p, st)
    groups = await run_in_threadpool(admin_routes.groups, p, st)
    return _render(request, "admin.html", viewer, users=users, quotas=quotas, groups=groups)


@router.get("/fs3")
@_page
async def fs3_page(request: Request, viewer: Viewer) -> Response:
    health = await run_in_threadpool(fs3_health, _st(request).cluster)
    return _render(request, "fs3.html", viewer, health=health)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in _STATIC:
        return _secure(Response(b"not found", status_code=404, media_type="text/plain"))
    body, media = _STATIC[name]
    resp = _secure(Response(body, media_type=media))
    resp.headers["Cache-Control"] = "max-age=300"
    return resp
