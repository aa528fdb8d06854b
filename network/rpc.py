"""Request / response over :mod:`network.transport`: msgpack headers, raw payloads.

A request is one frame whose header is ``msgpack({"m": method, "i": id, "a": args})`` and
whose payload is raw bytes (file chunks, tensors); the response is one frame with
``{"i": id, "r": result}`` or ``{"i": id, "e": {"kind", "msg", "data"}}`` and its own payload.

Server side, a handler is ``fn(args: dict, payload: memoryview, ctx: CallContext)`` and returns
a result (anything msgpack can encode) or ``Reply(result, payload_parts, done)``: the parts are
buffers or ``transport.FileRegion`` byte ranges of open files (sent with ``sendfile``), and
``done`` runs once the reply was sent or failed (it closes those files). A handler may
register a ``payload_into(args, nbytes)`` hook that returns the buffer the request payload should
land in (a storage server receives a chunk straight into its write buffer).

Client side, :class:`RpcClient` keeps one connection and serialises calls on it; use several
clients (or :class:`RpcPool`) for concurrency. A call that fails in transport closes the
connection; the next call reconnects. Whether to retry is the caller's decision (only the
caller knows whether the request was idempotent).

Every server answers ``rpc.ping`` (name, pid, uptime) and ``rpc.methods``, so a launcher can
check health without knowing the service, and ``rpc.metrics`` (services only): its registry
``server.metrics`` in the Prometheus text format (:mod:`network.metrics`; calls and latency by
method are counted here, the service adds its own series).

Every connection is authenticated at connect (:mod:`network.auth`: a mutual HMAC handshake with
the cluster key or a credential derived from it); a server refuses to start without a key. Each
method names the roles that may call it (``register(..., roles=...)``, service-only by default)
and the largest request payload it takes (``max_payload``, 64 KiB by default), both checked
before a byte of the payload is read. Connections are bounded (in all and per peer host) and
closed when idle; the defaults are in :class:`RpcServer` and docs/security.md.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from prometheus_client import CollectorRegistry

from .auth import (
    ANY,
    HANDSHAKE_TIMEOUT,
    NO_AUTH,
    SERVICE,
    SERVICE_PRINCIPAL,
    Authenticator,
    Credential,
    Principal,
    client_handshake,
    server_handshake,
)
from .errors import AuthError, NoSuchMethod, PeerClosed, ProtocolError, RemoteError, RpcError, TransportError
from .metrics import CONTENT_TYPE, RpcMetrics, render
from .transport import Connection, Listener, TrafficClass, TransportTimeout, as_bytes, connect

__all__ = ["RpcServer", "RpcClient", "RpcPool", "PendingCall", "Reply", "CallContext", "ping",
           "DEFAULT_MAX_PAYLOAD", "DEFAULT_MAX_HEADER", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_CONNECTIONS",
           "DEFAULT_MAX_CONNECTIONS_PER_HOST"]

# Server limits (docs/security.md): a request header and a control method's payload are small;
# bulk methods raise their own payload bound at registration.
DEFAULT_MAX_HEADER = 256 << 10
DEFAULT_MAX_PAYLOAD = 64 << 10
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_CONNECTIONS_PER_HOST = 256
# A client's connection unused this long is checked (one poll) before reuse: the server may
# have closed it as idle meanwhile.
_STALE_CHECK_AFTER = 1.0

log = logging.getLogger(__name__)

Handler = Callable[[dict, memoryview, "CallContext"], Any]


@dataclass
class Reply:
    """A handler's answer with a payload (or a client's received answer).

    Sent by a handler: ``payload`` is a buffer or a list of buffers and ``FileRegion`` parts, and
    ``done`` (if any) runs after the reply was sent or failed. Received by a client: ``payload``
    is one memoryview, or a list of them when the call received into a list of buffers.
    """

    result: Any = None
    payload: list | memoryview = field(default_factory=list)
    done: Callable[[], None] | None = None


@dataclass
class CallContext:
    """What a handler knows of its caller."""

    peer: str
    method: str
    server: RpcServer
    principal: Principal | None = None

    @property
    def roles(self) -> frozenset[str]:
        return self.principal.roles if self.principal is not None else frozenset()


@dataclass
class _Method:
    fn: Handler
    payload_into: Callable[[dict, int], Any] | None
    roles: frozenset[str]
    max_payload: int
    service_if: tuple[str, ...]
    ok: Any = None  # the method's metric children (network.metrics.RpcMetrics.for_method)
    failed: Any = None
    denied: Any = None
    seconds: Any = None


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class RpcServer:
    """A threaded RPC server: one thread accepts, one thread serves each connection.

    [Note: thread per connection] Our services have few long-lived clients (storage servers,
    agents, a handful of client processes), the handlers block on disk and on other servers
    (a chain forward), and msgpack + the GIL dominate small calls anyway. A thread per
    connection keeps handlers plain blocking code; concurrency across clients comes for free.
    """

    def __init__(self, host: str, port: int = 0, *, auth: Authenticator | Credential | None = None,
                 name: str = "rpc", traffic_class: TrafficClass = TrafficClass.OTHER,
                 io_timeout: float | None = 300.0, idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_connections_per_host: int = DEFAULT_MAX_CONNECTIONS_PER_HOST,
                 max_header: int = DEFAULT_MAX_HEADER) -> None:
        # no key, no server: checked before the port is taken
        self.auth = Authenticator.of(auth)
        self.name = name
        self._listener = Listener(host, port, traffic_class=traffic_class, timeout=0.2)
        self.host, self.port = self._listener.address
        self.io_timeout = io_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_connections_per_host = max_connections_per_host
        self.max_header = max_header
        self._methods: dict[str, _Method] = {}
        self._stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._conns: set[Connection] = set()
        self._per_host: dict[str, int] = {}
        self.refused = {"connections": 0, "handshakes": 0, "calls": 0, "oversized": 0}
        self._warned: dict[str, float] = {}
        self._lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None
        self.started_at = time.time()
        #: this server's Prometheus registry: the RPC layer's series, and the service's own
        self.metrics = CollectorRegistry(auto_describe=True)
        self._rpc_metrics = RpcMetrics(self)
        self.register("rpc.ping", self._ping, roles=ANY)
        self.register("rpc.methods", lambda a, p, c: sorted(self._methods), roles=ANY)
        # services only: the exporter holds the cluster key (metrics name nodes, jobs and traffic)
        self.register("rpc.metrics", lambda a, p, c: Reply({"content_type": CONTENT_TYPE}, render(self.metrics)))

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _ping(self, args: dict, payload: memoryview, ctx: CallContext) -> dict:
        return {"name": self.name, "pid": os.getpid(), "uptime": time.time() - self.started_at}

    def register(self, method: str, fn: Handler, *, payload_into: Callable[[dict, int], Any] | None = None,
                 roles: tuple[str, ...] | frozenset[str] = (SERVICE,), max_payload: int = DEFAULT_MAX_PAYLOAD,
                 service_if: tuple[str, ...] = ()) -> None:
        """Register ``fn`` for ``method`` (replacing any earlier one).

        ``roles``: who may call it (default: services only; ``network.auth.ANY`` for every
        authenticated peer). ``service_if``: argument names that, when true in a call, make
        that call service-only (a client may write to a chain's head, only a service forwards).
        ``max_payload``: the largest request payload accepted; a larger one is refused before
        anything is allocated and the connection closed.
        """
        self._methods[method] = _Method(fn, payload_into, frozenset(roles), int(max_payload), tuple(service_if))

    def method(self, name: str, *, payload_into: Callable[[dict, int], Any] | None = None, **kw):
        """Decorator form of :meth:`register`."""

        def deco(fn: Handler) -> Handler:
            self.register(name, fn, payload_into=payload_into, **kw)
            return fn

        return deco

    @property
    def connections(self) -> int:
        """Connections open now (authenticated or still in the handshake)."""
        with self._lock:
            return len(self._conns)

    def start(self) -> RpcServer:
        """Start accepting in a background thread; returns self."""
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection and wait (bounded) for the serving threads."""
        self._stopping.set()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            c.close()
        deadline = time.monotonic() + timeout
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> RpcServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn = self._listener.accept()
            except TransportTimeout:
                continue
            except TransportError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            host = conn.peer.rsplit(":", 1)[0]
            with self._lock:
                full = (len(self._conns) >= self.max_connections
                        or self._per_host.get(host, 0) >= self.max_connections_per_host)
                if not full:
                    t = threading.Thread(target=self._serve, args=(conn, host), name=f"{self.name}-{conn.peer}",
                                         daemon=True)
                    self._conns.add(conn)
                    self._threads.add(t)
                    self._per_host[host] = self._per_host.get(host, 0) + 1
            if full:
                # [Note: refuse at once] no thread, no buffer, no handshake: the excess connection
                # is closed as soon as it is accepted (the peer sees the close on its first call).
                self.refused["connections"] += 1
                self._warn("connections", "%s: refused connections over the limits (%d in all, %d per host); "
                           "last from %s", self.name, self.max_connections, self.max_connections_per_host,
                           conn.peer)
                conn.close()
                continue
            t.start()

    def _serve(self, conn: Connection, host: str) -> None:
        first = conn
        try:
            try:
                if self.auth is NO_AUTH:  # benchmarks only (network.auth)
                    principal = SERVICE_PRINCIPAL
                else:
                    conn, principal = server_handshake(conn, self.auth)
            except (AuthError, TransportError) as exc:
                self.refused["handshakes"] += 1
                self._warn("handshakes", "%s: %s failed to authenticate: %s", self.name, conn.peer, exc)
                return
            conn.timeout = self.io_timeout
            while not self._stopping.is_set():
                try:
                    header, plen = conn.recv_header(timeout=self.idle_timeout, max_header=self.max_header)
                except (PeerClosed, TransportTimeout):
                    return  # gone, or idle for idle_timeout: closed
                self._handle(conn, header, plen, principal)
        except TransportError as exc:
            if not self._stopping.is_set():
                log.debug("%s: connection %s ended: %s", self.name, conn.peer, exc)
        except Exception:  # pragma: no cover - a bug in the server loop itself
            log.exception("%s: connection %s failed", self.name, conn.peer)
        finally:
            conn.close()
            first.close()
            with self._lock:
                self._conns.discard(first)
                self._threads.discard(threading.current_thread())
                left = self._per_host.get(host, 1) - 1
                if left > 0:
                    self._per_host[host] = left
                else:
                    self._per_host.pop(host, None)

    def _warn(self, what: str, msg: str, *args) -> None:
        """Log a refusal at most once per 10 s per kind (a flood of them must not flood the log)."""
        now = time.monotonic()
        if now - self._warned.get(what, -1e9) >= 10.0:
            self._warned[what] = now
            log.warning(msg + " (%d refused so far; logged at most every 10 s)", *args, self.refused[what])

    def _handle(self, conn: Connection, header: bytes, plen: int, principal: Principal) -> None:
        try:
            req = _unpack(header)
            method, call_id, args = req["m"], req["i"], req.get("a") or {}
            if not isinstance(args, dict):
                raise ValueError(f"arguments must be a map, got {type(args).__name__}")
        except Exception as exc:
            raise ProtocolError(f"{self.name}: malformed request header from {conn.peer}: {exc}") from exc
        if principal.expires is not None and time.time() >= principal.expires:
            # a connection outlives nothing: its credential expired since the handshake
            self._send_error(conn, call_id, "AuthError", f"{self.name}: credential {principal.key_id!r} expired "
                             f"at {time.ctime(principal.expires)}; closing the connection")
            raise ProtocolError(f"{self.name}: {conn.peer}'s credential expired", conn.peer)
        entry = self._methods.get(method)
        payload: Any = memoryview(b"")
        limit = entry.max_payload if entry is not None else DEFAULT_MAX_PAYLOAD
        if plen > limit:
            # checked before anything is allocated; the rest of the frame is not read, so the
            # connection cannot be kept: answer, then close
            self.refused["oversized"] += 1
            self._send_error(conn, call_id, "PayloadTooLarge",
                             f"{self.name} {method}: request payload of {plen} bytes exceeds the method's "
                             f"{limit}-byte limit; closing the connection")
            raise ProtocolError(f"{self.name}: {conn.peer} sent a {plen}-byte payload to {method} "
                                f"(limit {limit})", conn.peer)
        if entry is None:
            conn.skip_payload(plen)
            self._send_error(conn, call_id, "NoSuchMethod", f"{self.name} has no method {method!r}")
            return
        if entry.seconds is None:  # its series appear at its first call (a method never called costs no lines)
            entry.ok, entry.failed, entry.denied, entry.seconds = self._rpc_metrics.for_method(method)
        need = entry.roles
        if entry.service_if and any(args.get(a) for a in entry.service_if):
            need = need & {SERVICE}
        if not (need & principal.roles):
            conn.skip_payload(plen)
            self.refused["calls"] += 1
            entry.denied.inc()
            what = f"{method} with {'/'.join(a for a in entry.service_if if args.get(a))}" \
                if need != entry.roles else method
            self._send_error(conn, call_id, "PermissionDenied",
                             f"{self.name}: {principal.key_id!r} (roles {', '.join(sorted(principal.roles))}) "
                             f"may not call {what} (allowed: {', '.join(sorted(need)) or 'nobody'})")
            return
        if plen:
            buf = entry.payload_into(args, plen) if entry.payload_into else None
            if buf is None:
                buf = bytearray(plen)
            conn.recv_payload_into(buf, plen)
            payload = memoryview(buf).cast("B")[:plen] if not isinstance(buf, memoryview) else buf[:plen]
        ctx = CallContext(conn.peer, method, self, principal)
        t0 = time.perf_counter()
        try:
            out = entry.fn(args, payload, ctx)
        except Exception as exc:
            entry.seconds.observe(time.perf_counter() - t0)
            entry.failed.inc()
            if not isinstance(exc, RpcError | KeyError | ValueError | FileNotFoundError | PermissionError):
                log.exception("%s: %s failed", self.name, method)
            data = getattr(exc, "rpc_data", None)
            self._send_error(conn, call_id, type(exc).__name__, str(exc) or type(exc).__name__, data)
            return
        entry.seconds.observe(time.perf_counter() - t0)
        entry.ok.inc()
        if isinstance(out, Reply):
            result, bufs = out.result, out.payload
            if isinstance(bufs, memoryview | bytes | bytearray):
                bufs = [bufs]
            try:
                conn.send(_pack({"i": call_id, "r": result}), *bufs)
            finally:
                if out.done is not None:
                    out.done()
        else:
            conn.send(_pack({"i": call_id, "r": out}))

    def _send_error(self, conn: Connection, call_id: int, kind: str, msg: str, data: dict | None = None) -> None:
        conn.send(_pack({"i": call_id, "e": {"kind": kind, "msg": msg, "data": data or {}}}))


class PendingCall:
    """A request that was sent and whose reply has not been read yet (see :meth:`RpcClient.begin`)."""

    def __init__(self, client: RpcClient, conn: Connection, call_id: int, method: str, timeout: float) -> None:
        self._client, self._conn, self._id, self._method, self._timeout = client, conn, call_id, method, timeout
        self._done = False
        self.on_done: Callable[[], None] | None = None  # run once the reply is read (pools reuse the client)

    def fileno(self) -> int:
        """The connection's socket: readable once the reply starts to arrive (an event loop waits
        on it, then calls :meth:`wait`, which no longer blocks for long)."""
        return self._conn.fileno()

    def abandon(self) -> None:
        """Give up on the reply (a cancelled waiter): the connection is closed, the client freed."""
        self._conn.close()
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the closed connection's error, expected
            pass

    def wait(self, into=None) -> Reply:
        """Read the reply (into ``into`` when given); raises as :meth:`RpcClient.call` does. Once only."""
        if self._done:
            raise RpcError(f"{self._client.address} {self._method}: reply already read")
        self._done = True
        try:
            return self._client._finish(self._conn, self._id, self._method, self._timeout, into)
        finally:
            if self.on_done is not None:
                self.on_done()


class RpcClient:
    """A client for one server. Thread-safe: calls on one client are serialised."""

    def __init__(self, host: str, port: int, *, credential: Credential | None = None, timeout: float = 30.0,
                 connect_timeout: float = 10.0, traffic_class: TrafficClass = TrafficClass.OTHER,
                 source: str | None = None, encrypt: bool = False) -> None:
        self.host, self.port = host, port
        self.credential = credential
        self.encrypt = encrypt
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.traffic_class = traffic_class
        self.source = source
        self._conn: Connection | None = None
        self._used = 0.0
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def fresh(self, now: float | None = None) -> bool:
        """Whether the connection is open and was used within ``_STALE_CHECK_AFTER`` s: usable
        without the stale check (a server that closes idle connections has not closed it yet)."""
        return self._conn is not None and not self._conn.closed and \
            (time.monotonic() if now is None else now) - self._used <= _STALE_CHECK_AFTER

    def _connection(self, timeout: float | None = None) -> Connection:
        """The open connection, or a new one, authenticated within ``timeout`` (the call's) at most."""
        now = time.monotonic()
        if self._conn is not None and not self._conn.closed and not self.fresh(now) and _stale(self._conn):
            self._conn.close()  # the server closed it (idle) meanwhile: reconnect instead of failing
        if self._conn is None or self._conn.closed:
            if self.credential is None:
                raise AuthError(f"RpcClient to {self.address}: no credential; pass credential= "
                                "(network.auth.client_credential(cluster), or the cluster key for a service)",
                                self.address)
            conn = connect(self.host, self.port, timeout=self.connect_timeout,
                           traffic_class=self.traffic_class, source=self.source, io_timeout=self.timeout)
            if self.credential is not NO_AUTH:
                conn = client_handshake(conn, self.credential, encrypt=self.encrypt,
                                        timeout=_handshake_budget(self.connect_timeout, timeout))
            self._conn = conn
        self._used = now
        return self._conn

    def call(self, method: str, args: dict | None = None, payload=(), *, timeout: float | None = None,
             into=None) -> Reply:
        """Call ``method`` and wait for its reply.

        ``payload`` is a buffer or a list of buffers sent after the header. ``into``, when given,
        is where the reply payload is received (no allocation, no copy): a writable buffer, a
        list of writable buffers filled in order (a scatter receive; the reply's payload is then
        the list of filled views), or a function ``into(result, nbytes)`` that returns either
        (or None for fresh memory) once the reply's result is known: a batch reply whose result
        gives each item's length lands every item in its own buffer. Without ``into`` the reply
        payload is a fresh memoryview. Raises :class:`RemoteError` when the handler raised,
        :class:`NoSuchMethod`, or a :class:`TransportError` when the call could not complete.
        """
        return self.begin(method, args, payload, timeout=timeout).wait(into)

    def begin(self, method: str, args: dict | None = None, payload=(), *,
              timeout: float | None = None) -> PendingCall:
        """Send a request and return at once; :meth:`PendingCall.wait` reads the reply.

        A split-phase call lets the caller work while the server does (a storage server writes
        its own copy while its successor in the chain stores the same bytes). The client is
        busy until ``wait()``: other calls on it block until then.
        """
        if isinstance(payload, bytes | bytearray | memoryview) or hasattr(payload, "__array_interface__"):
            payload = [payload]
        t = self.timeout if timeout is None else timeout
        self._lock.acquire()
        conn = None
        try:
            conn = self._connection(t)
            call_id = next(self._ids)
            conn.send(_pack({"m": method, "i": call_id, "a": args or {}}), *payload, timeout=t)
        except BaseException:
            if conn is not None:
                conn.close()
            self._lock.release()
            raise
        return PendingCall(self, conn, call_id, method, t)

    def _finish(self, conn: Connection, call_id: int, method: str, t: float, into) -> Reply:
        try:
            header, plen = conn.recv_header(timeout=t)
            resp = _unpack(header)
            if resp.get("i") != call_id:
                raise ProtocolError(f"{self.address}: reply to call {resp.get('i')} while waiting for {call_id}")
            if callable(into) and plen and "e" not in resp:
                into = into(resp.get("r"), plen)
            if into is not None and not callable(into) and plen:
                conn.recv_payload_into(into, plen, timeout=t)  # one buffer, or a list filled in order
                body = _filled(into, plen) if isinstance(into, list | tuple) else as_bytes(into)[:plen]
            elif plen:
                buf = bytearray(plen)
                conn.recv_payload_into(buf, plen, timeout=t)
                body = memoryview(buf)
            else:
                body = memoryview(b"")
        except BaseException:
            conn.close()
            raise
        finally:
            self._lock.release()
        err = resp.get("e")
        if err is not None:
            if err.get("kind") in ("PayloadTooLarge", "AuthError"):
                conn.close()  # the server closes it too (it did not read the payload, or the credential expired)
            if err.get("kind") == "NoSuchMethod":
                raise NoSuchMethod(err.get("msg", method), self.address)
            raise RemoteError(f"{self.address} {method}: {err.get('kind')}: {err.get('msg')}", self.address,
                              kind=err.get("kind", "Exception"), data=err.get("data"),
                              remote_message=str(err.get("msg")))
        return Reply(resp.get("r"), body)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RpcPool:
    """Up to ``size`` connections to one server, for concurrent calls from several threads."""

    def __init__(self, host: str, port: int, size: int = 4, **kwargs) -> None:
        if size < 1:
            raise ValueError("RpcPool size must be >= 1")
        self.host, self.port = host, port
        self._kwargs = kwargs
        self._free: list[RpcClient] = []
        self._sem = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._all: list[RpcClient] = []

    def call(self, method: str, args: dict | None = None, payload=(), *, timeout: float | None = None,
             into=None) -> Reply:
        """:meth:`RpcClient.call` on a free connection of the pool."""
        return self.begin(method, args, payload, timeout=timeout).wait(into)

    def begin(self, method: str, args: dict | None = None, payload=(), *,
              timeout: float | None = None, nowait: bool = False) -> PendingCall | None:
        """:meth:`RpcClient.begin` on a free connection; it returns to the pool at ``wait()``.

        ``nowait``: only if that cannot block (an event loop's thread calls): a free connection,
        open and in use within the last second (no reconnect, no stale check); else None."""
        t = timeout or self._kwargs.get("timeout", 30.0)
        if nowait:
            if not self._sem.acquire(blocking=False):
                return None
        elif not self._sem.acquire(timeout=t):
            raise RpcError(f"{self.host}:{self.port}: no free connection within {t} s")
        with self._lock:
            client = self._free.pop() if self._free else None
            if nowait and (client is None or not client.fresh()):
                if client is not None:
                    self._free.append(client)
                self._sem.release()
                return None
            if client is None:
                client = RpcClient(self.host, self.port, **self._kwargs)
                self._all.append(client)

        def give_back() -> None:
            with self._lock:
                self._free.append(client)
            self._sem.release()

        try:
            pending = client.begin(method, args, payload, timeout=timeout)
        except BaseException:
            give_back()
            raise
        pending.on_done = give_back
        return pending

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()
            self._free.clear()


def _stale(conn: Connection) -> bool:
    """True when an idle client connection is readable: the server closed it (or broke protocol)."""
    try:
        p = select.poll()
        p.register(conn.fileno(), select.POLLIN)
        return bool(p.poll(0)) or conn.buffered > 0
    except (OSError, ValueError):
        return True


def _handshake_budget(connect_timeout: float, call_timeout: float | None) -> float:
    """How long a new connection's handshake may take: the usual budget, but never longer than the
    call that needs the connection (a read that gives a silent replica 1.7 s must not wait 5 s
    for a frozen server's handshake before it can move to another one)."""
    budget = max(HANDSHAKE_TIMEOUT, connect_timeout)
    return budget if call_timeout is None else max(0.001, min(budget, call_timeout))


def _filled(bufs, nbytes: int) -> list[memoryview]:
    """The views of ``bufs`` that a scatter receive of ``nbytes`` filled, in order."""
    out = []
    for b in bufs:
        v = as_bytes(b)[:nbytes]
        out.append(v)
        nbytes -= v.nbytes
    return out


def ping(host: str, port: int, timeout: float = 2.0, *, credential: Credential | None = None) -> dict:
    """Call ``rpc.ping`` once on a fresh connection (a health check; authenticated like any call)."""
    with RpcClient(host, port, credential=credential, timeout=timeout, connect_timeout=timeout) as c:
        return c.call("rpc.ping").result
