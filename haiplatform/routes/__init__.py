"""The API's routers, over one state object (:class:`~haiplatform.routes.state.ApiState` on
``app.state.api``); :func:`haiplatform.api.create_app` assembles them.

=============  ==================================================================================
``jobs``       ``/v1/jobs``: submit, list, show, stop, suspend, logs
``nodes``      ``/v1/nodes``: list; drain and undrain (admins)
``admin``      ``/v1/whoami``; ``/v1/users``, ``/v1/quotas``, ``/v1/events`` (admins)
``agent``      ``/v1/agent/*``: the agents' register, sync (long poll) and report
``internal``   ``/v1/internal/*``: the scheduler's wait and notify; ``/healthz``
``deps``       authentication and the shared dependencies (principal, admin, service, job tokens)
``state``      the state object and the notification channels
``models``     request bodies and the bounds of every value a request carries
=============  ==================================================================================
"""

from __future__ import annotations

from . import admin, agent, internal, jobs, nodes

#: in the order their routes appear in the OpenAPI schema
ROUTERS = (jobs.router, nodes.router, admin.router, agent.router, internal.router)

__all__ = ["ROUTERS"]
