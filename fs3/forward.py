"""Split-phase calls from a storage server to its successor in a chain.

[Note: why not RpcClient here] A hop must store the pending version and forward the same bytes.
``RpcClient.call`` sends and then waits, so overlapping the local write with the successor's
work needed a helper thread (two thread switches per hop, which cost more than the write on a
busy machine). :class:`Forwarder` sends the request, runs the local write in the calling thread
while the successor works on it, then waits for the reply. It speaks ``network.rpc``'s wire
format (msgpack ``{"m", "i", "a"}`` request, ``{"i", "r"}`` / ``{"i", "e"}`` reply) over
``network.transport`` connections, so the successor is an ordinary ``RpcServer``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from network import Connection, RemoteError, TrafficClass, connect
from network.errors import NoSuchMethod, ProtocolError, TransportTimeout

__all__ = ["Forwarder"]


class Forwarder:
    """Up to ``size`` connections to one successor; thread-safe."""

    def __init__(self, host: str, port: int, *, source: str | None = None, timeout: float = 60.0,
                 connect_timeout: float = 3.0, size: int = 16) -> None:
        self.host, self.port = host, port
        self.source = source
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._free: list[Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._ids = itertools.count(1)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def call(self, method: str, args: dict, payload: list, during: Callable[[], Any]) -> tuple[Any, Any]:
        """Send the request, run ``during()``, receive the reply: ``(result, during's value)``.

        ``during`` runs whether or not the send worked (the local write of a hop happens either
        way); its exception, if any, is raised after the reply was consumed. Transport failures
        raise ``network.TransportError``, a handler's error ``network.RemoteError``.
        """
        if not self._slots.acquire(timeout=self.timeout):
            raise TransportTimeout(f"forward to {self.address}: no free connection within {self.timeout} s",
                                   self.address)
        try:
            with self._lock:
                conn = self._free.pop() if self._free else None
            if conn is None or conn.closed:
                conn = connect(self.host, self.port, timeout=self.connect_timeout, source=self.source,
                               traffic_class=TrafficClass.STORAGE, io_timeout=self.timeout)
            call_id = next(self._ids)
            send_error: BaseException | None = None
            try:
                conn.send(msgpack.packb({"m": method, "i": call_id, "a": args}, use_bin_type=True), *payload)
            except BaseException as exc:  # noqa: BLE001 - raised after the local work
                send_error = exc
                conn.close()
            local_error: BaseException | None = None
            value = None
            try:
                value = during()
            except BaseException as exc:  # noqa: BLE001 - raised after the reply
                local_error = exc
            if send_error is not None:
                raise send_error
            try:
                header, plen = conn.recv_header()
                if plen:
                    conn.skip_payload(plen)
                resp = msgpack.unpackb(header, raw=False, strict_map_key=False)
                if resp.get("i") != call_id:
                    raise ProtocolError(f"{self.address}: reply to call {resp.get('i')} while waiting for {call_id}",
                                        self.address)
            except BaseException:
                conn.close()
                raise
            with self._lock:
                self._free.append(conn)
            if local_error is not None:
                raise local_error
            err = resp.get("e")
            if err is not None:
                if err.get("kind") == "NoSuchMethod":
                    raise NoSuchMethod(err.get("msg", method), self.address)
                raise RemoteError(f"{self.address} {method}: {err.get('kind')}: {err.get('msg')}", self.address,
                                  kind=err.get("kind", "Exception"), data=err.get("data"))
            return resp.get("r"), value
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            for c in self._free:
                c.close()
            self._free.clear()
