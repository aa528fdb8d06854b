"""Prometheus metrics: a registry per RPC server, the metrics token, and the per-node exporter.

Every :class:`network.rpc.RpcServer` owns a ``prometheus_client.CollectorRegistry``
(``server.metrics``, never the process-global default: two servers in one process, as in the
tests, keep their series apart) holding the RPC layer's own series (:class:`RpcMetrics`) and
whatever the service adds. It answers ``rpc.metrics`` (services only: the caller holds the
cluster key) with that registry in the Prometheus text format.

The exporter (``python -m network.metrics --cluster FILE --node NAME``, one per node) scrapes
the node's RPC services over ``rpc.metrics`` at each request, adds ``service`` and ``node``
labels, and serves the lot on one HTTP ``GET /metrics``. HTTP services (the HAI-Platform API)
serve their own ``/metrics`` and are named in the exporter's ``skip`` option.

[Note: the metrics token] Every port is reachable by a stranger, and metrics tell one a lot
(node names, queue depth, file traffic), so ``/metrics`` wants ``Authorization: Bearer TOKEN``.
The token is ``HMAC(cluster key, "fireflyer-metrics-token")``: every service holding the
cluster key verifies it without a file or a lookup, a key rotation rotates it (every secret
of the key file is accepted, as for RPC), and it is not an RPC credential (a derived one would
be: ``network.auth.derive`` makes credentials, this label makes none), so a leaked token reads
metrics and nothing else. The exporter writes it next to the cluster key as ``metrics.token``
(mode 0600) for Prometheus's ``authorization: credentials_file``; ``python -m network.metrics
token --cluster FILE`` prints it.

    python -m network.metrics --cluster FILE --node NAME      # the exporter
    python -m network.metrics token --cluster FILE [--out P]  # the token
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .auth import Credential, cluster_key_path, insecure, load_cluster_key
from .errors import AuthError, RpcError, TransportError
from .rundir import write_private

if TYPE_CHECKING:  # pragma: no cover
    from .rpc import RpcServer
    from .topology import Cluster, Node

__all__ = ["RpcMetrics", "AsgiMetrics", "Exporter", "metrics_token", "check_bearer", "metrics_token_path", "write_token",
           "add_collector", "render", "parse", "relabel", "CONTENT_TYPE", "LATENCY_BUCKETS", "main"]

log = logging.getLogger(__name__)

# [Note: no _created series] prometheus_client adds a ``<name>_created`` gauge per counter and
# histogram child (the time it was made): it doubles the output and no dashboard reads it.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
#: seconds; RPC calls run from ~50 us (a ping) to seconds (a chain write that waits for a peer)
LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_TOKEN_LABEL = b"fireflyer-metrics-token\0"


# -- the token ---------------------------------------------------------------------------------

def metrics_token(key: Credential, secret: bytes | None = None) -> str:
    """The bearer token of ``/metrics`` (see the note above), from the key's current secret."""
    return hmac.new(secret if secret is not None else key.secret, _TOKEN_LABEL, hashlib.sha256).hexdigest()


def check_bearer(header: str | None, key: Credential | None) -> str | None:
    """None when ``header`` (an ``Authorization`` value) carries a valid metrics token, else why not.

    Every secret of the key file is accepted (key rotation). ``key`` None: no key to check with
    (``$FIREFLYER_INSECURE_NO_AUTH``, benchmarks only): every request passes."""
    if key is None:
        return None
    if not header:
        return "no Authorization header: send 'Authorization: Bearer <metrics token>'"
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "the Authorization header must be 'Bearer <metrics token>'"
    given = token.strip().encode()
    ok = False
    for s in key.secrets:  # no early exit: the time taken says nothing of which secret matched
        ok |= hmac.compare_digest(given, metrics_token(key, s).encode())
    return None if ok else "wrong metrics token (python -m network.metrics token --cluster FILE prints it)"


def metrics_token_path(cluster: Cluster) -> Path:
    """Where the exporter writes the token: ``metrics.token`` beside the cluster key."""
    return cluster_key_path(cluster).with_name("metrics.token")


def write_token(key: Credential, path: str | os.PathLike) -> Path:
    """Write the token to ``path`` atomically, mode 0600 (for Prometheus's credentials_file)."""
    return write_private(path, metrics_token(key) + "\n")


# -- registries and collectors -------------------------------------------------------------------

class _Callback:
    """A collector whose families a function computes at scrape time (state read, not counted)."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._fn())
        except Exception:  # noqa: BLE001 - a broken collector must not fail the whole scrape
            log.exception("metrics collector %r failed", getattr(self._fn, "__qualname__", self._fn))
            return []

    def describe(self) -> list:
        return []  # computed at scrape time: nothing to check at registration


def add_collector(registry: CollectorRegistry, fn: Callable[[], Iterable[Metric]]) -> None:
    """Register ``fn`` (returning metric families: ``GaugeMetricFamily``...) to run at every scrape."""
    registry.register(_Callback(fn))


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (0.0.4)."""
    return generate_latest(registry)


def parse(text: str) -> dict[str, Metric]:
    """Families of a text exposition by name (``prometheus_client.parser``; raises on bad text)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


class RpcMetrics:
    """The RPC layer's series of one server: calls and their latency by method, connections, refusals.

    The children of a method are made at its first call (:meth:`for_method`) and kept with it, so
    a call costs one counter increment and one histogram observation, no label lookup; methods
    are a fixed set, so the labels are bounded (an unknown method is not counted here).
    """

    def __init__(self, server: RpcServer) -> None:
        reg = server.metrics
        self.calls = Counter("fireflyer_rpc_requests", "RPC requests served, by method and outcome "
                             "(ok, error: the handler raised, denied: the caller's roles may not call it)",
                             ["method", "outcome"], registry=reg)
        self.seconds = Histogram("fireflyer_rpc_request_seconds", "Time a handler took, by method",
                                 ["method"], registry=reg, buckets=LATENCY_BUCKETS)
        Gauge("fireflyer_rpc_connections", "Connections open now", registry=reg).set_function(
            lambda: server.connections)
        started = server.started_at
        Gauge("fireflyer_process_start_time_seconds", "When this server started (epoch seconds)",
              registry=reg).set_function(lambda: started)

        def refused() -> Iterable[Metric]:
            c = CounterMetricFamily("fireflyer_rpc_refused", "Connections, handshakes, calls and oversized "
                                    "requests refused", labels=["kind"])
            for kind, n in dict(server.refused).items():
                c.add_metric([kind], n)
            yield c

        add_collector(reg, refused)

    def for_method(self, method: str) -> tuple[Any, Any, Any, Any]:
        """(ok counter, error counter, denied counter, latency histogram) of ``method``."""
        return (self.calls.labels(method, "ok"), self.calls.labels(method, "error"),
                self.calls.labels(method, "denied"), self.seconds.labels(method))


# -- an ASGI app's metrics (the HAI-Platform API) ------------------------------------------------------

_HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"})


class AsgiMetrics:
    """ASGI middleware: serves ``GET /metrics`` (bearer token) and counts every other request.

    Requests and latency are labelled by route template (``scope["route"].path``, as FastAPI and
    Starlette set it: ``/v1/jobs/{id}``, a bounded set; ``other`` when no route matched or an inner
    middleware answered first), method and status class. ``key`` is called at the first scrape
    (the cluster key; None: no check, benchmarks only) and kept once it loaded; a key that could
    not be loaded (503) is asked for again at the next scrape, at most every
    :attr:`KEY_RETRY` s, so a key file put in place later is picked up without a restart.
    """

    KEY_RETRY = 5.0


    def __init__(self, app: Any, registry: CollectorRegistry, key: Callable[[], Credential | None],
                 prefix: str = "fireflyer_api") -> None:
        self.app, self.registry, self._key_fn = app, registry, key
        self._key: list = []        # [the loaded key] once it loaded
        self._key_error: tuple[float, Exception] | None = None  # (monotonic time, why) of the last failure
        self.requests = Counter(f"{prefix}_requests", "Requests by route template, method and status class (2xx, "
                                "4xx...)", ["route", "method", "code"], registry=registry)
        self.seconds = Histogram(f"{prefix}_request_seconds", "Request latency by route template (a long poll "
                                 "counts its wait)", ["route"], registry=registry, buckets=LATENCY_BUCKETS)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics":
            await self._serve(scope, send)
            return
        t0, code = time.perf_counter(), [500]

        async def send_(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                code[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            method = scope["method"] if scope["method"] in _HTTP_METHODS else "other"
            self.requests.labels(route, method, f"{code[0] // 100}xx").inc()
            self.seconds.labels(route).observe(time.perf_counter() - t0)

    def _load_key(self) -> Credential | None | Exception:
        if self._key:
            return self._key[0]
        now = time.monotonic()
        if self._key_error is not None and now - self._key_error[0] < self.KEY_RETRY:
            return self._key_error[1]
        try:
            self._key.append(self._key_fn())
        except AuthError as exc:
            self._key_error = (now, exc)
            return exc
        return self._key[0]

    async def _serve(self, scope: dict, send: Any) -> None:
        headers: dict = {}
        if scope["method"] not in ("GET", "HEAD"):
            code, body, ctype, headers = 405, b"only GET\n", "text/plain; charset=utf-8", {b"allow": b"GET, HEAD"}
        else:
            key = self._load_key()
            auth = next((v.decode("latin-1") for k, v in scope.get("headers") or () if k == b"authorization"), None)
            why = f"no cluster key to check the metrics token with: {key}" if isinstance(key, Exception) \
                else check_bearer(auth, key)
            if why is None:
                code, body, ctype = 200, render(self.registry), CONTENT_TYPE
            else:
                code, body, ctype = 503 if isinstance(key, Exception) else 401, (why + "\n").encode(), \
                    "text/plain; charset=utf-8"
                if code == 401:
                    headers = {b"www-authenticate": b'Bearer realm="metrics"'}
        await send({"type": "http.response.start", "status": code, "headers": [
            (b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()), *headers.items()]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


# -- relabelling (the exporter) --------------------------------------------------------------------

def relabel(sources: Iterable[tuple[dict[str, str], str]]) -> list[Metric]:
    """Merge text expositions into one set of families, each sample with its source's extra labels.

    [Note: one family per name] Every service exposes ``fireflyer_rpc_requests_total``; the text
    format wants each family once, so samples of the same family from several services are merged
    under one HELP/TYPE (with ``service`` telling them apart). A family whose type differs from
    the first one seen under its name is dropped (and logged) rather than corrupting the output.
    """
    fams: dict[str, Metric] = {}
    for extra, text in sources:
        for fam in text_string_to_metric_families(text):
            m = fams.get(fam.name)
            if m is None:
                m = fams[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            elif m.type != fam.type:
                log.warning("metric %s is a %s in one service and a %s in another (%s); dropped there",
                            fam.name, m.type, fam.type, extra)
                continue
            for s in fam.samples:
                m.samples.append(Sample(s.name, {**s.labels, **extra}, s.value, s.timestamp, s.exemplar))
    return list(fams.values())


class Exporter:
    """Scrapes a node's RPC services at every collect (bounded by ``timeout`` each, in parallel).

    Its own series: ``fireflyer_scrape_up{service}`` (1: the service answered) and
    ``fireflyer_scrape_seconds{service}``, with the ``node`` label like the rest.
    """

    def __init__(self, cluster: Cluster, node: Node, key: Any, *, timeout: float = 5.0,
                 skip: Iterable[str] = ("haiplatform.api",), self_module: str = "network.metrics") -> None:
        from .rpc import RpcClient

        self.node = node
        self.timeout = timeout
        skip = set(skip) | {self_module}
        self.targets = [(s.module, s.port) for s in cluster.services if s.runs_on(node.name) and s.module not in skip]
        self._clients = {m: RpcClient(node.address, port, credential=key, timeout=timeout, connect_timeout=timeout)
                         for m, port in self.targets}
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.targets)), thread_name_prefix="metrics-scrape")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def _scrape(self, module: str) -> tuple[str, str | None, float]:
        t0 = time.monotonic()
        try:
            reply = self._clients[module].call("rpc.metrics", timeout=self.timeout)
            return module, bytes(reply.payload).decode(), time.monotonic() - t0
        except (RpcError, TransportError, AuthError, OSError) as exc:
            log.debug("%s@%s: rpc.metrics failed: %s", module, self.node.name, exc)
            return module, None, time.monotonic() - t0

    def collect(self) -> Iterable[Metric]:
        results = list(self._pool.map(self._scrape, [m for m, _ in self.targets]))
        node = self.node.name
        up = GaugeMetricFamily("fireflyer_scrape_up", "1 when the service answered rpc.metrics at this scrape",
                               labels=["service", "node"])
        took = GaugeMetricFamily("fireflyer_scrape_seconds", "Time the service took to answer rpc.metrics",
                                 labels=["service", "node"])
        sources = []
        for module, text, secs in results:
            up.add_metric([module, node], 0.0 if text is None else 1.0)
            took.add_metric([module, node], secs)
            if text is not None:
                sources.append(({"service": module, "node": node}, text))
        try:
            merged = relabel(sources)
        except ValueError as exc:  # a service sent text the parser refuses: a bug there, not a stranger
            log.error("unparsable metrics from a service on %s: %s", node, exc)
            merged = []
        return [up, took, *merged]

    def describe(self) -> list:
        return []

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self._clients.values():
            c.close()


# -- HTTP ----------------------------------------------------------------------------------------------

class MetricsHTTPServer(ThreadingHTTPServer):
    """``GET /metrics`` (bearer token) and ``GET /healthz`` (no token, says only "ok").

    Bounded: at most ``max_connections`` connections open at once (each has a thread; one more is
    closed at once, before a thread or a read, so strangers holding idle connections cannot pile up
    threads), at most ``max_inflight`` authenticated scrapes at once (more get 429), a connection's
    reads time out after ``io_timeout`` s, and the handler reads nothing of a request but its headers.
    """

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, key: Credential | None, *,
                 max_inflight: int = 8, io_timeout: float = 10.0, max_connections: int = 32) -> None:
        self.registry = registry
        self.key = key
        self.io_timeout = io_timeout
        self.slots = threading.BoundedSemaphore(max_inflight)
        self.connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.acquire(blocking=False):  # full: close it now, no thread
            log.debug("refused a connection from %s: every connection slot is taken", client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "fireflyer-metrics"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.io_timeout
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8", extra: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            return self._send(200, b"ok\n")
        if path != "/metrics":
            return self._send(404, b"not found: GET /metrics (bearer token) or /healthz\n")
        why = check_bearer(self.headers.get("Authorization"), self.server.key)
        if why is not None:
            return self._send(401, (why + "\n").encode(), extra={"WWW-Authenticate": 'Bearer realm="metrics"'})
        if not self.server.slots.acquire(blocking=False):
            return self._send(429, b"too many scrapes at once; retry\n", extra={"Retry-After": "1"})
        try:
            body = render(self.server.registry)
        finally:
            self.server.slots.release()
        self._send(200, body, CONTENT_TYPE)

    do_HEAD = do_GET

    def _not_allowed(self) -> None:
        self._send(405, b"only GET\n", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


# -- main ------------------------------------------------------------------------------------------------

def _key_or_none(cluster: Cluster) -> Credential | None:
    if insecure():
        log.warning("$FIREFLYER_INSECURE_NO_AUTH=1: /metrics is served without a token (benchmarks only)")
        return None
    return load_cluster_key(cluster)


def _token_main(argv: list[str]) -> int:
    from .topology import load_cluster

    ap = argparse.ArgumentParser(prog="python -m network.metrics token",
                                 description="print (or write) the bearer token of every /metrics")
    ap.add_argument("--cluster", required=True, help="cluster description (TOML)")
    ap.add_argument("--out", default=None, help="write it to this file (mode 0600) instead of printing it")
    args = ap.parse_args(argv)
    try:
        key = load_cluster_key(load_cluster(args.cluster))
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        print(write_token(key, args.out))
    else:
        print(metrics_token(key))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["token"]:
        return _token_main(argv[1:])
    from .service import parse_service_args, service_parser, wait_for_shutdown

    ap = service_parser("network.metrics", "the node's metrics exporter (Prometheus text on GET /metrics)")
    args, cluster, node = parse_service_args(ap, argv)
    svc = cluster.service("network.metrics")
    port = svc.port if svc else 0
    opts = svc.options if svc else {}
    try:
        key = _key_or_none(cluster)
    except AuthError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    timeout = float(opts.get("scrape_timeout", 5.0))
    if not (0 < timeout < math.inf):
        ap.exit(2, f"{ap.prog}: error: {cluster.source}: network.metrics scrape_timeout must be a positive number "
                f"of seconds, got {opts.get('scrape_timeout')!r}\n")
    skip = opts.get("skip", ["haiplatform.api"])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        ap.exit(2, f"{ap.prog}: error: {cluster.source}: network.metrics skip must be a list of module names\n")
    if key is not None:
        try:
            path = write_token(key, metrics_token_path(cluster))
            log.info("metrics token in %s", path)
        except OSError as exc:  # a read-only key directory: the admin writes it with `token --out`
            log.info("could not write the metrics token beside the cluster key (%s)", exc)
    exporter = Exporter(cluster, node, key if key is not None else _no_auth(), timeout=timeout, skip=skip)
    http = MetricsHTTPServer((node.address, port), exporter.registry, key)
    t = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http", daemon=True)
    t.start()
    log.info("metrics of %s on http://%s:%d/metrics (%s)", node.name, node.address, http.server_address[1],
             ", ".join(m for m, _ in exporter.targets) or "no RPC services on this node")
    wait_for_shutdown()
    http.shutdown()
    http.server_close()
    exporter.close()
    return 0


def _no_auth():
    from .auth import NO_AUTH

    return NO_AUTH


if __name__ == "__main__":
    sys.exit(main())
