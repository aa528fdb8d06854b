"""The web dashboard the API serves under ``/ui/`` (:func:`install`; docs/web.md).

Server-rendered pages over the API's own route functions and permission checks: jobs (queue,
running, history), one job (attempts, ranks, logs per rank with follow, stop and suspend), nodes
(drain reasons, validator results), users and quotas (admins), fs3 health. Log in with an API
token; a session cookie (HttpOnly, SameSite=Strict) holds a random id only.

=============  ==================================================================================
``views``      the router: login and logout, the pages, the actions, the static files
``session``    the server-side sessions (id -> token, CSRF token, expiry)
``fs3health``  mgmtd's status for the fs3 page
=============  ==================================================================================
"""

from __future__ import annotations

from .views import CSP, install, router

__all__ = ["install", "router", "CSP"]
