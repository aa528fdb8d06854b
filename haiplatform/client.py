"""A typed HTTP client of the HAI-Platform API (the CLI, the agents, the scheduler and the bench use it).

Every call has a timeout; an error answer becomes the matching :mod:`haiplatform.errors` class
with the server's message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from .errors import ApiError, Unavailable, error_for_status

__all__ = ["HaiClient"]


class HaiClient:
    """One keep-alive connection pool to the API at ``url``, authenticated with ``token``."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  limits=httpx.Limits(max_keepalive_connections=8))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HaiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, *, timeout: float | None = None, **kw) -> Any:
        try:
            r = self._http.request(method, path, timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                                   **kw)
        except httpx.TimeoutException as exc:
            raise Unavailable(f"{method} {self.url}{path}: no answer within the timeout ({exc})") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"{method} {self.url}{path}: cannot reach the API ({exc}); is the cluster up?") from exc
        if r.status_code >= 400:
            try:
                body = r.json()
                msg = body.get("message") or str(body)
            except ValueError:
                msg = r.text[:500]
            raise error_for_status(r.status_code, f"{msg} ({method} {path}: {r.status_code})")
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.text

    # -- users' calls -------------------------------------------------------------------------------
    def submit(self, spec: dict) -> dict:
        return self.request("POST", "/v1/jobs", json=spec)

    def jobs(self, *, all_users: bool = False, status: str | None = None, limit: int = 100) -> list[dict]:
        params: dict[str, Any] = {"limit": limit}
        if all_users:
            params["all"] = "true"
        if status:
            params["status"] = status
        return self.request("GET", "/v1/jobs", params=params)

    def job(self, job_id: int) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def stop(self, job_id: int) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/stop")

    def suspend(self, job_id: int) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/suspend")

    def logs(self, job_id: int, rank: int = 0, offset: int = 0) -> str:
        return self.request("GET", f"/v1/jobs/{job_id}/logs", params={"rank": rank, "offset": offset})

    def follow_logs(self, job_id: int, rank: int = 0, *, timeout: float = 3600.0) -> Iterator[str]:
        """Yield the rank's output as it is written, until the rank has ended and all is read."""
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"rank": rank, "follow": "true"},
                                   timeout=httpx.Timeout(30.0, read=timeout)) as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        msg = r.json().get("message")
                    except ValueError:
                        msg = r.text[:500]
                    raise error_for_status(r.status_code, f"{msg} (GET logs: {r.status_code})")
                yield from r.iter_text()
        except httpx.TransportError as exc:
            raise Unavailable(f"following logs of job {job_id}: {exc}") from exc

    def wait(self, job_id: int, timeout: float = 600.0, poll: float = 0.1) -> dict:
        """Poll until the job's chain has finished (bounded by ``timeout``)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if j["chain_status"] == "finished":
                return j
            if time.monotonic() > deadline:
                raise ApiError(f"job {job_id} did not finish within {timeout} s (status {j['status']})")
            time.sleep(poll)

    def whoami(self) -> dict:
        return self.request("GET", "/v1/whoami")

    def nodes(self) -> list[dict]:
        return self.request("GET", "/v1/nodes")

    # -- admins' calls ------------------------------------------------------------------------------
    def drain(self, node: str, reason: str = "") -> dict:
        return self.request("POST", f"/v1/nodes/{node}/drain", json={"reason": reason})

    def undrain(self, node: str) -> dict:
        return self.request("POST", f"/v1/nodes/{node}/undrain")

    def add_user(self, name: str, role: str = "user", group: str | None = None) -> dict:
        return self.request("POST", "/v1/users", json={"name": name, "role": role, "group": group})

    def users(self) -> list[dict]:
        return self.request("GET", "/v1/users")

    def set_quota(self, subject: str, max_nodes: int, priority: int | None = None) -> dict:
        return self.request("PUT", "/v1/quotas", json={"subject": subject, "max_nodes": max_nodes,
                                                       "priority": priority})

    def quotas(self) -> list[dict]:
        return self.request("GET", "/v1/quotas")
