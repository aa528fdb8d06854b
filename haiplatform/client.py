"""A typed HTTP client of the HAI-Platform API (the CLI, the agents, the scheduler and the bench use it).

Every call has a timeout; an error answer becomes the matching :mod:`haiplatform.errors` class
with the server's message.
"""

from __future__ import annotations

import http.client
import json as _json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from .errors import ApiError, ConfigError, Unavailable, error_for_status

__all__ = ["HaiClient"]


class HaiClient:
    """A client of the API at ``url``, authenticated with ``token``; safe to share between threads.

    [Note: two transports] Plain JSON calls go over one keep-alive ``http.client`` connection per
    thread: on the 2-core development machine it answers 20-30 % more submissions per second than
    httpx, whose per-request overhead is larger than our API's own. Streams (``follow_logs``) use
    httpx. A keep-alive connection the server closed while idle fails before any answer
    (``RemoteDisconnected``): the request was not processed and is sent once more on a new one.
    """

    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        u = urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"bad API URL {url!r}: expected http://HOST:PORT")
        self._scheme, self._host = u.scheme, u.hostname
        self._port = u.port or (443 if u.scheme == "https" else 80)
        self._base = u.path.rstrip("/")
        self.timeout = timeout
        self.token = token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._httpx: Any = None   # made on first use (see _http): importing httpx alone costs ~0.1 s

    @property
    def _http(self) -> Any:
        """The httpx client of the log calls, made on first use: a CLI command that never reads a log
        does not import httpx (hai history's start-up)."""
        if self._httpx is None:
            import httpx

            with self._lock:
                if self._httpx is None:
                    self._httpx = httpx.Client(base_url=self.url, headers=self._headers, timeout=self.timeout)
        return self._httpx

    @_http.setter
    def _http(self, client: Any) -> None:
        self._httpx = client

    def close(self) -> None:
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self._local = threading.local()
        if self._httpx is not None:
            self._httpx.close()

    def __enter__(self) -> HaiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            c = cls(self._host, self._port, timeout=timeout)
            self._local.conn = c
            with self._lock:
                self._conns.append(c)
        c.timeout = timeout
        if c.sock is not None:
            c.sock.settimeout(timeout)
        return c

    def _drop(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            with self._lock:
                if c in self._conns:
                    self._conns.remove(c)
        self._local.conn = None

    def request(self, method: str, path: str, *, timeout: float | None = None, params: dict | None = None,
                json: Any = None, raw: bool = False) -> Any:
        """The decoded answer (JSON, else text); ``raw``: its bytes as they came (errors raise alike)."""
        t = self.timeout if timeout is None else timeout
        target = self._base + path + (("?" + urlencode({k: v for k, v in params.items() if v is not None}))
                                      if params else "")
        headers = dict(self._headers)
        body = None
        if json is not None:
            body = _json.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            conn = self._conn(t)
            reused = conn.sock is not None
            try:
                conn.request(method, target, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop()
                if attempt == 0 and reused and isinstance(exc, http.client.RemoteDisconnected | BrokenPipeError):
                    continue  # the server closed the idle connection before reading our request
                raise Unavailable(f"{method} {self.url}{path}: connection lost ({exc})") from exc
            except TimeoutError as exc:
                self._drop()
                raise Unavailable(f"{method} {self.url}{path}: no answer within {t} s") from exc
            except OSError as exc:
                self._drop()
                raise Unavailable(f"{method} {self.url}{path}: cannot reach the API ({exc}); is the cluster up?") \
                    from exc
            except http.client.HTTPException as exc:
                self._drop()
                raise Unavailable(f"{method} {self.url}{path}: bad HTTP answer ({exc})") from exc
        if r.getheader("connection", "").lower() == "close":
            self._drop()
        ctype = r.getheader("content-type", "")
        if r.status >= 400:
            try:
                msg = _json.loads(data).get("message") or data.decode(errors="replace")[:500]
            except (ValueError, AttributeError):
                msg = data.decode(errors="replace")[:500]
            raise error_for_status(r.status, f"{msg} ({method} {path}: {r.status})")
        if raw:
            return data
        if ctype.startswith("application/json"):
            return _json.loads(data)
        return data.decode(errors="replace")

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

    def set_priority(self, job_id: int, priority: int | str) -> dict:
        """Change a live chain's priority (a level name, a number, or "auto")."""
        return self.request("POST", f"/v1/jobs/{job_id}/priority", json={"priority": priority})

    def suspend(self, job_id: int) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/suspend")

    def _log_page(self, job_id: int, params: dict) -> tuple[bytes, int, int]:
        """One plain read of a log: (bytes, X-Log-Size, X-Log-Offset-Next)."""
        import httpx

        try:
            r = self._http.get(f"/v1/jobs/{job_id}/logs", params={k: v for k, v in params.items() if v is not None})
        except httpx.TransportError as exc:
            raise Unavailable(f"reading the log of job {job_id}: {exc}") from exc
        if r.status_code >= 400:
            try:
                msg = r.json().get("message")
            except ValueError:
                msg = r.text[:500]
            raise error_for_status(r.status_code, f"{msg} (GET logs: {r.status_code})")
        size = int(r.headers.get("x-log-size", len(r.content)))
        return r.content, size, int(r.headers.get("x-log-offset-next", len(r.content)))

    def logs(self, job_id: int, rank: int = 0, attempt: int | None = None, tail: int | None = None, *,
             offset: int = 0) -> str:
        """The rank's WHOLE log from ``offset`` (or its last ``tail`` lines) as it was at the first
        page, paging as long as the API says there is more: never a silently cut one. It stops at
        the size the first page reported (a fast writer would otherwise keep it paging forever)."""
        data, size, nxt = self._log_page(job_id, {"rank": rank, "offset": offset, "attempt": attempt,
                                                  "tail": tail})
        end = size
        parts = [data]
        while data and nxt < end:
            data, _, after = self._log_page(job_id, {"rank": rank, "offset": nxt, "attempt": attempt})
            parts.append(data[:end - nxt])
            nxt = after
        return b"".join(parts).decode(errors="replace")

    def log_size(self, job_id: int, rank: int = 0, attempt: int | None = None) -> int:
        """The rank's log size in bytes now."""
        return self._log_page(job_id, {"rank": rank, "attempt": attempt, "tail": 0})[1]

    def follow_logs(self, job_id: int, rank: int = 0, *, timeout: float = 3600.0, attempt: int | None = None,
                    offset: int = 0) -> Iterator[str]:
        """Yield the rank's output as it is written, until the rank has ended and all is read (of the
        latest attempt, or of ``attempt``'s row id; from byte ``offset``)."""
        import codecs

        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for data in self.follow_log_bytes(job_id, rank, timeout=timeout, attempt=attempt, offset=offset):
            if text := dec.decode(data):
                yield text
        if text := dec.decode(b"", final=True):
            yield text

    def follow_log_bytes(self, job_id: int, rank: int = 0, *, timeout: float = 3600.0, attempt: int | None = None,
                         offset: int = 0) -> Iterator[bytes]:
        """:meth:`follow_logs` as bytes: a follower that counts them can follow again from where it was."""
        import httpx

        params = {"rank": rank, "follow": "true", "offset": offset}
        if attempt is not None:
            params["attempt"] = attempt
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/logs", params=params,
                                   timeout=httpx.Timeout(30.0, read=timeout)) as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        msg = r.json().get("message")
                    except ValueError:
                        msg = r.text[:500]
                    raise error_for_status(r.status_code, f"{msg} (GET logs: {r.status_code})")
                yield from r.iter_bytes()
        except httpx.TransportError as exc:
            raise Unavailable(f"following logs of job {job_id}: {exc}") from exc

    def hold(self, job_id: int) -> dict:
        """Keep a queued job from starting until :meth:`release`."""
        return self.request("POST", f"/v1/jobs/{job_id}/hold")

    def release(self, job_id: int) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/release")

    def resubmit(self, job_id: int) -> dict:
        """A new job (chain) with an ended job's spec."""
        return self.request("POST", f"/v1/jobs/{job_id}/resubmit")

    def cancel(self, ids: list[int] | None = None, name: str | None = None, user: str | None = None,
               array_id: int | None = None, status: list[str] | None = None) -> list[int]:
        """Stop every live job matching all the filters given; returns the chain ids."""
        body = {k: v for k, v in {"ids": ids, "name": name, "user": user, "array_id": array_id,
                                  "status": status}.items() if v is not None}
        return self.request("POST", "/v1/jobs/cancel", json=body)["canceled"]

    def history(self, **filters: Any) -> dict:
        """``{"jobs": [...], "total": N}``: ended chains (filters: user, status, since, until, name, limit,
        offset)."""
        return self.request("GET", "/v1/history", params=filters)

    def history_json(self, **filters: Any) -> bytes:
        """:meth:`history`'s answer as the API's JSON bytes (``hai history --json`` prints them as they
        came: decoding and re-encoding 10,000 rows took most of the command's time)."""
        return self.request("GET", "/v1/history", params=filters, raw=True)

    def queue(self) -> list[dict]:
        """Every queued and running job of every user, with positions and waiting reasons."""
        return self.request("GET", "/v1/queue")

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

    def validate(self, node: str) -> dict:
        """Ask ``node``'s agent to run the node validator (it runs once no job runs there)."""
        return self.request("POST", f"/v1/nodes/{node}/validate")

    def validations(self, node: str | None = None, after: int = 0, limit: int = 50,
                    before: int | None = None) -> list[dict]:
        """Validator runs, newest first (of ``node``; with an id above ``after`` and below ``before``)."""
        return self.request("GET", "/v1/validations", params={"node": node, "after": after or None, "limit": limit,
                                                              "before": before})

    def add_user(self, name: str, role: str = "user", group: str | None = None) -> dict:
        return self.request("POST", "/v1/users", json={"name": name, "role": role, "group": group})

    def users(self) -> list[dict]:
        return self.request("GET", "/v1/users")

    def set_quota(self, subject: str, max_nodes: int, priority: int | None = None) -> dict:
        return self.request("PUT", "/v1/quotas", json={"subject": subject, "max_nodes": max_nodes,
                                                       "priority": priority})

    def quotas(self) -> list[dict]:
        return self.request("GET", "/v1/quotas")

    def delete_quota(self, subject: str, priority: int | None = None) -> dict:
        return self.request("DELETE", "/v1/quotas", params={"subject": subject, "priority": priority})

    def remove_user(self, name: str, force: bool = False) -> dict:
        """Remove a user (409 while they have live jobs, unless ``force``, which stops them)."""
        return self.request("DELETE", f"/v1/users/{name}", params={"force": "true"} if force else None)

    def disable_user(self, name: str) -> dict:
        return self.request("POST", f"/v1/users/{name}/disable")

    def enable_user(self, name: str) -> dict:
        return self.request("POST", f"/v1/users/{name}/enable")

    def reset_token(self, name: str) -> str:
        """A new token for ``name`` (the old one stops working)."""
        return self.request("POST", f"/v1/users/{name}/token")["token"]

    def set_group(self, name: str, group: str | None) -> dict:
        return self.request("PUT", f"/v1/users/{name}/group", json={"group": group})

    def groups(self) -> list[dict]:
        return self.request("GET", "/v1/groups")

    def delete_group(self, name: str) -> dict:
        return self.request("DELETE", f"/v1/groups/{name}")

    def events(self, **filters: Any) -> list[dict]:
        """The event log, newest first (filters: job_id, job, user, kind, node, since, limit)."""
        return self.request("GET", "/v1/events", params=filters)
