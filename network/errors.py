"""The exceptions of the network package, grouped by theme.

    NetworkError
    ├── ClusterFileError        a cluster description is missing, malformed or inconsistent
    └── TransportError          moving bytes failed
        ├── ConnectError        could not connect or accept within the timeout
        ├── TransportTimeout    a send or receive did not finish within the timeout
        ├── PeerClosed          the peer closed or died (possibly mid-message)
        ├── ProtocolError       bytes arrived that are not a valid frame
        ├── AuthError           a credential is missing, expired or wrong, or a peer failed to authenticate
        └── RpcError            a request / response call failed
            ├── RemoteError     the server ran the request and raised
            └── NoSuchMethod    the server has no handler for the method
"""

from __future__ import annotations


class NetworkError(Exception):
    """Base class of every error raised by the network package."""


class ClusterFileError(NetworkError):
    """A cluster description is missing, malformed or inconsistent.

    The message names the file, the key (``node[3].leaf``) and what was expected.
    """

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class TransportError(NetworkError):
    """Moving bytes between two hosts failed."""

    def __init__(self, message: str, peer: str | None = None) -> None:
        self.peer = peer
        super().__init__(message)


class ConnectError(TransportError):
    """A connection could not be made (or accepted) within the timeout."""


class TransportTimeout(TransportError, TimeoutError):
    """A send or receive did not complete within its timeout (the peer may be stuck)."""


class PeerClosed(TransportError, ConnectionError):
    """The peer closed the connection or died, possibly in the middle of a message."""


class ProtocolError(TransportError):
    """Bytes arrived that are not a valid frame (wrong magic, oversized header, short buffer)."""


class AuthError(TransportError):
    """A credential is missing, unreadable, expired or wrong, or a peer failed to authenticate.

    Raised by :mod:`network.auth` (loading keys, the handshake); a server refusing a call for its
    role is a :class:`RemoteError` of kind ``PermissionDenied``.
    """


class RpcError(TransportError):
    """A request / response call failed."""


class RemoteError(RpcError):
    """The server ran the request and its handler raised; ``kind`` is the remote exception's name,
    ``remote_message`` its own message (the error's text adds where and which call)."""

    def __init__(self, message: str, peer: str | None = None, kind: str = "Exception",
                 data: dict | None = None, remote_message: str | None = None) -> None:
        self.kind = kind
        self.data = data or {}
        self.remote_message = message if remote_message is None else remote_message
        super().__init__(message, peer)


class NoSuchMethod(RpcError):
    """The server has no handler registered for the requested method."""
