"""What keeps a few clients from taking the API down: the request guard and its limits.

One object, :class:`Limits`, holds the API's load state (``app.state.limits``):

- a body size limit: 413 before the body is read whole (``Content-Length`` and chunked bodies);
- a token bucket per principal (per client address for requests without a valid token): 429 with
  ``Retry-After`` when it is empty;
- at most ``max_user_requests`` users' requests in progress at once (the others wait their turn,
  then 503): agents' and the scheduler's requests never wait behind them;
- at most ``max_streams_per_user`` open log streams per principal (429) and ``max_streams`` in all
  (503); each stream's blocking reads run in a small pool of their own.

Agents and the scheduler (the ``service`` role) are exempt from every user limit but the body size.

[Note: why the thread pool is partitioned] FastAPI runs a sync route in anyio's default thread
pool (40 threads). A user's request that blocks (a log read from an agent that does not answer,
a database lock) holds one; 40 of them used to hold all, and the agents' heartbeats, which need
one too, timed out until the scheduler marked every node lost. Users' requests now take one of
``max_user_requests`` slots (24 by default) from the moment they are admitted until their answer
starts, and the pool is made at least SERVICE_THREADS (16) larger than that, so those threads are
always left to the services. A log stream holds a slot only until its headers are sent; its reads
go through a limiter of their own.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import StreamingResponse

from .errors import ApiError, TooManyRequests

__all__ = ["Limits", "Guard", "GuardedStream", "TokenBucket"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

#: Paths that take no user slot and no rate-limit token (no thread, nothing to abuse).
FREE_PATHS = ("/healthz",)
#: Threads of the pool always left to agents and the scheduler, whatever max_user_requests says.
SERVICE_THREADS = 16


class TokenBucket:
    """``rate`` tokens a second, up to ``burst``; a request takes one."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, float(burst), now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Slots:
    """A counting semaphore for the event loop's thread that hands a freed slot to the oldest waiter.
    (An asyncio.Semaphore binds itself to the first loop it waits on; in-process test clients run
    one loop per client.)"""

    def __init__(self, n: int) -> None:
        self.n = n
        self.used = 0
        self._waiters: deque[asyncio.Future] = deque()

    async def acquire(self, timeout: float) -> bool:
        if self.used < self.n and not self._waiters:
            self.used += 1
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except BaseException as exc:
            if fut.done() and not fut.cancelled():  # handed over just as we gave up: pass it on
                self.release()
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                return False
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():  # (release runs on the loop's thread, as acquire does)
                fut.set_result(None)
                return  # the slot passes to it: ``used`` stays
        self.used -= 1


@dataclass
class Limits:
    """The API's limits (from the ``[haiplatform]`` section, whose defaults are HaiConfig's) and the
    state that enforces them."""

    max_body_bytes: int
    rate_limit: float
    rate_burst: int
    max_user_requests: int
    max_streams_per_user: int
    max_streams: int
    stream_max_seconds: float
    user_queue_timeout: float = 30.0
    stream_threads: int = 8
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    _slots: Slots | None = None
    _limiter: anyio.CapacityLimiter | None = None
    _limiter_loop: Any = None
    _pool_loop: Any = None

    @classmethod
    def from_config(cls, cfg: Any) -> Limits:
        names = ("max_body_bytes", "rate_limit", "rate_burst", "max_user_requests", "max_streams_per_user",
                 "max_streams", "stream_max_seconds")
        return cls(**{n: getattr(cfg, n) for n in names})

    # -- rate ---------------------------------------------------------------------------------------
    def take(self, key: str) -> float:
        now = time.monotonic()
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= 10000:  # random tokens from many addresses: forget the full ones
                self.buckets = {k: v for k, v in self.buckets.items()
                                if v.tokens + (now - v.last) * v.rate < v.burst}
            b = self.buckets[key] = TokenBucket(self.rate_limit, self.rate_burst, now)
        return b.take(now)

    # -- users' request slots ------------------------------------------------------------------------
    def size_pool(self) -> None:
        """Make the event loop's default thread pool (anyio's, 40 threads) hold the users' slots plus
        SERVICE_THREADS (once per loop)."""
        loop = asyncio.get_running_loop()
        if self._pool_loop is not loop:
            self._pool_loop = loop
            pool = anyio.to_thread.current_default_thread_limiter()
            pool.total_tokens = max(pool.total_tokens, self.max_user_requests + SERVICE_THREADS)

    @property
    def slots(self) -> Slots:
        if self._slots is None:
            self._slots = Slots(self.max_user_requests)
        return self._slots

    # -- streams ------------------------------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        return sum(self.streams.values())

    def open_stream(self, who: str) -> Callable[[], None]:
        """Count a new stream of ``who`` (429 / 503 over the limits); returns its (idempotent) close."""
        mine = self.streams.get(who, 0)
        if mine >= self.max_streams_per_user:
            self._count("streams_per_user")
            raise TooManyRequests(f"{who} already follows {mine} log streams (limit {self.max_streams_per_user} "
                                  "per user, haiplatform.max_streams_per_user); close one first")
        if self.open_streams >= self.max_streams:
            self._count("streams")
            raise ApiError(f"the API already serves {self.max_streams} log streams (haiplatform.max_streams); "
                           "try again later", 503)
        self.streams[who] = mine + 1
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                left = self.streams.get(who, 1) - 1
                if left > 0:
                    self.streams[who] = left
                else:
                    self.streams.pop(who, None)

        return close

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a stream's blocking step (a log read, a database check) in the streams' own threads."""
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter_loop is not loop:
            self._limiter, self._limiter_loop = anyio.CapacityLimiter(self.stream_threads), loop
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _count(self, what: str) -> None:
        self.rejected[what] = self.rejected.get(what, 0) + 1

    def snapshot(self) -> dict:
        """What /healthz shows: open streams, users' requests in progress, rejections by kind."""
        return {"streams": self.open_streams, "user_requests": self._slots.used if self._slots else 0,
                "rejected": dict(self.rejected)}


class GuardedStream(StreamingResponse):
    """A streaming answer over an async generator that runs ``on_close`` (and closes the generator)
    however it ends: finished, the client gone, or the server shutting down."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()


def _answer(status: int, kind: str, message: str, headers: list[tuple[bytes, bytes]] | None = None):
    body = json.dumps({"error": kind, "message": message}).encode()

    async def send_it(send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    return send_it


class Guard:
    """ASGI middleware: body size, rate and users' request slots, before the app sees the request.

    ``who(request)`` names the caller: ``(key, exempt)``, ``key`` the principal's name (or
    ``addr:HOST`` without a valid token), ``exempt`` for the services; it may leave the principal
    in ``request.state.principal`` for the app."""

    def __init__(self, app: Any, limits: Limits, who: Callable[[Request], tuple[str, bool]]) -> None:
        self.app, self.limits, self.who = app, limits, who

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lim = self.limits
        lim.size_pool()
        headers = dict(scope.get("headers") or ())
        # 1. the body's size, declared or streamed
        cl = headers.get(b"content-length")
        if cl is not None:
            if not cl.strip().isdigit():
                await _answer(400, "InvalidRequest", f"bad Content-Length {cl[:40]!r}")(send)
                return
            if int(cl) > lim.max_body_bytes:
                lim._count("body")
                await _answer(413, "PayloadTooLarge", self._too_large(int(cl)))(send)
                return
        if scope["path"] in FREE_PATHS:
            await self.app(scope, receive, send)
            return
        # 2. who, and their rate
        request = Request(scope)
        key, exempt = self.who(request)
        if not exempt:
            wait = lim.take(key)
            if wait > 0:
                lim._count("rate")
                await _answer(429, "TooManyRequests", f"{key}: over the rate limit of {lim.rate_limit:g} requests/s "
                              f"(burst {lim.rate_burst}, haiplatform.rate_limit / rate_burst); retry in {wait:.1f} s",
                              [(b"retry-after", str(math.ceil(wait)).encode())])(send)
                return
        # 3. a chunked body is read here, up to the limit, and replayed to the app
        if cl is None and b"transfer-encoding" in headers:
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # the client went away
                size += len(msg.get("body", b""))
                if size > lim.max_body_bytes:
                    lim._count("body")
                    await _answer(413, "PayloadTooLarge", self._too_large(None))(send)
                    return
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            receive = _replay(b"".join(chunks), receive)
        if exempt:
            await self.app(scope, receive, send)
            return
        # 4. a user's request waits for a slot; it gives it back as soon as its answer starts
        if not await lim.slots.acquire(lim.user_queue_timeout):
            lim._count("busy")
            await _answer(503, "Unavailable", f"the API is busy: {lim.max_user_requests} users' requests in "
                          f"progress for {lim.user_queue_timeout:g} s (haiplatform.max_user_requests); "
                          "try again later", [(b"retry-after", b"5")])(send)
            return
        held = True

        async def send_and_release(msg: dict) -> None:
            nonlocal held
            if held and msg["type"] == "http.response.start":
                held = False
                lim.slots.release()
            await send(msg)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            if held:
                lim.slots.release()

    def _too_large(self, size: int | None) -> str:
        what = f"a body of {size} bytes" if size is not None else "a larger body"
        return (f"{what} is over the API's limit of {self.limits.max_body_bytes} bytes "
                "(haiplatform.max_body_bytes)")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
