"""Split-phase calls from a storage server to its successor in a chain.

[Note: split phase] A hop must store the pending version and forward the same bytes. A plain
``RpcClient.call`` sends and then waits, so overlapping the local write with the successor's
work would need a helper thread (two thread switches per hop, which cost more than the write on
a busy machine). :func:`call_overlapped` uses ``RpcPool.begin`` on the server's one pool per
peer: it sends the request, runs the local write in the calling thread while the successor works
on it, then waits for the reply. The successor is an ordinary ``RpcServer``.

[Note: hop budgets] A write attempt has a time budget (the client's write timeout). Each hop
waits for its successor at most its own budget and hands the successor ``HOP_SHARE`` of it, so
along the chain every inner wait ends before the outer one: when a node freezes, the hop just
before it gives up first and its ``ForwardFailed`` travels back to the client before any outer
hop (or the client) times out, and the client retries on a fresh routing table. Without a
budget a hop waits for the 60 s I/O timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from network import NoSuchMethod, RemoteError, RpcPool

__all__ = ["HOP_SHARE", "call_overlapped"]

#: the part of a hop's time budget that it hands its successor
HOP_SHARE = 0.8


def call_overlapped(pool: RpcPool, method: str, args: dict, payload: list,
                    during: Callable[[], Any], timeout: float | None = None) -> tuple[Any, Any]:
    """Send the request on ``pool``, run ``during()``, receive the reply: ``(result, during's value)``.

    ``during`` runs whether or not the send worked (the local write of a hop happens either way);
    its exception, if any, is raised after the reply was consumed (and before the successor's own
    error). ``timeout`` bounds the call (default: the pool's). Transport failures raise
    ``network.TransportError`` (no free connection in time: ``network.RpcError``), a handler's
    error ``network.RemoteError``.
    """
    pending = send_error = None
    try:
        pending = pool.begin(method, args, payload, timeout=timeout)
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
