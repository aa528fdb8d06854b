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
``GET /metrics``: Prometheus text behind the metrics token (docs/metrics.md), not a user's token.

The routes live in :mod:`haiplatform.routes` (one router per area: jobs, nodes, admin, agent,
internal) over one state object, ``app.state.api`` (:class:`~haiplatform.routes.state.ApiState`:
the config, database, cluster, notification channels, limits, agent RPC pools and caches); the
shared dependencies (principal, admin, service, the job-token allow-list) are in
:mod:`haiplatform.routes.deps`. :func:`create_app` assembles them with the error handlers and the
limits middleware. [Note: events, not polling] is in :mod:`haiplatform.routes.state`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from network.auth import insecure, load_cluster_key
from network.metrics import AsgiMetrics
from network.topology import Cluster

from .config import HaiConfig
from .db import Database, User, event_row, hash_token, migrate
from .errors import ApiError
from .limits import Guard
from .routes import ROUTERS
from .routes.deps import JOB_ROUTES, Principal, admin, principal, service, who
from .routes.models import JobSpec
from .routes.state import ApiState, Notifier

__all__ = ["create_app", "bootstrap", "JobSpec", "Notifier", "Principal", "JOB_ROUTES", "principal", "admin",
           "service", "main"]

log = logging.getLogger(__name__)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=exc.status or 400)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    probs = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        probs.append(f"{where or 'body'}: {e.get('msg')}")
    return JSONResponse({"error": "InvalidRequest", "message": "; ".join(probs), "problems": exc.errors()
                         and [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]},
                        status_code=422)


def create_app(cluster: Cluster, cfg: HaiConfig, db: Database) -> FastAPI:
    """The FastAPI app for ``cluster`` (the database must already be migrated)."""
    app = FastAPI(title="HAI-Platform API", version="1", description="Submit, follow and control jobs on a "
                  "fireflyer cluster; admin nodes, users and quotas.")
    st = app.state.api = ApiState.build(cluster, cfg, db)
    app.state.limits = st.limits  # the limits' own name (haiplatform.limits, the tests)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(Guard, limits=st.limits, who=who)
    # GET /metrics (the metrics token, docs/metrics.md) and requests by route; added last: outermost
    app.state.metrics = CollectorRegistry()
    app.add_middleware(AsgiMetrics, registry=app.state.metrics,
                       key=lambda: None if insecure() else load_cluster_key(cluster))
    for router in ROUTERS:
        app.include_router(router)
    from .web import install as install_web  # the dashboard under /ui/ (docs/web.md)

    install_web(app)
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
