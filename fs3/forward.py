"""Split-phase calls from a storage server to its successor in a chain.

[Note: split phase] A hop must store the pending version and forward the same bytes. A plain
``RpcClient.call`` sends and then waits, so overlapping the local write with the successor's
work would need a helper thread (two thread switches per hop, which cost more than the write on
a busy machine). :class:`Forwarder` uses ``RpcClient.begin``: it sends the request, runs the local
write in the calling thread while the successor works on it, then waits for the reply. The
successor is an ordinary ``RpcServer``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from network import NoSuchMethod, RemoteError, RpcClient, TrafficClass
from network.errors import TransportTimeout

__all__ = ["Forwarder"]


class Forwarder:
    """Up to ``size`` connections to one successor; thread-safe."""

    def __init__(self, host: str, port: int, *, source: str | None = None, timeout: float = 60.0,
                 connect_timeout: float = 3.0, size: int = 16) -> None:
        self.host, self.port = host, port
        self.source = source
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._free: list[RpcClient] = []
        self._all: list[RpcClient] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def call(self, method: str, args: dict, payload: list, during: Callable[[], Any]) -> tuple[Any, Any]:
        """Send the request, run ``during()``, receive the reply: ``(result, during's value)``.

        ``during`` runs whether or not the send worked (the local write of a hop happens either
        way); its exception, if any, is raised after the reply was consumed (and before the
        successor's own error). Transport failures raise ``network.TransportError``, a handler's
        error ``network.RemoteError``.
        """
        if not self._slots.acquire(timeout=self.timeout):
            raise TransportTimeout(f"forward to {self.address}: no free connection within {self.timeout} s",
                                   self.address)
        try:
            with self._lock:
                client = self._free.pop() if self._free else None
                if client is None:
                    client = RpcClient(self.host, self.port, timeout=self.timeout,
                                       connect_timeout=self.connect_timeout, traffic_class=TrafficClass.STORAGE,
                                       source=self.source)
                    self._all.append(client)
            try:
                pending = send_error = None
                try:
                    pending = client.begin(method, args, payload)
                except BaseException as exc:  # noqa: BLE001 - raised after the local work
                    send_error = exc
                local_error: BaseException | None = None
                value = None
                try:
                    value = during()
                except BaseException as exc:  # noqa: BLE001 - raised after the reply
                    local_error = exc
                if send_error is not None:
                    raise send_error
                try:
                    reply = pending.wait()
                except (RemoteError, NoSuchMethod):
                    if local_error is not None:
                        raise local_error from None
                    raise
                if local_error is not None:
                    raise local_error
                return reply.result, value
            finally:
                with self._lock:
                    self._free.append(client)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()
            self._free.clear()
