"""fireflyer.network: the cluster description, framed TCP transport with traffic classes, RPC, link probe.

Imports nothing else of fireflyer; every other package moves bytes and reads the cluster through it.
"""

from .errors import (
    ClusterFileError,
    ConnectError,
    NetworkError,
    NoSuchMethod,
    PeerClosed,
    ProtocolError,
    RemoteError,
    RpcError,
    TransportError,
    TransportTimeout,
)
from .rpc import CallContext, Reply, RpcClient, RpcPool, RpcServer, ping
from .topology import Cluster, Node, Service, dump_cluster, load_cluster
from .transport import Connection, FileRegion, Listener, TrafficClass, connect, listen

__all__ = [
    "CallContext", "Cluster", "ClusterFileError", "ConnectError", "Connection", "FileRegion", "Listener",
    "NetworkError", "Node", "NoSuchMethod", "PeerClosed", "ProtocolError", "RemoteError", "Reply", "RpcClient",
    "RpcError", "RpcPool", "RpcServer", "Service", "TrafficClass", "TransportError", "TransportTimeout",
    "connect", "dump_cluster", "listen", "load_cluster", "ping",
]
