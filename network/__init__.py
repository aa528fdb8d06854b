"""fireflyer.network: the cluster description, framed TCP transport with traffic classes, RPC, link probe.

Imports nothing else of fireflyer; every other package moves bytes and reads the cluster through it.
"""

from .auth import (
    Authenticator,
    Credential,
    Principal,
    client_credential,
    cluster_key_path,
    derive,
    load_cluster_key,
    new_cluster_key,
    server_settings,
)
from .errors import (
    AuthError,
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
from .rundir import default_run_dir, find_cluster
from .topology import Cluster, Node, Service, dump_cluster, load_cluster
from .transport import Connection, FileRegion, Listener, TrafficClass, connect, listen

__all__ = [
    "AuthError", "Authenticator", "Credential", "Principal", "client_credential", "cluster_key_path", "derive",
    "load_cluster_key", "new_cluster_key", "server_settings",
    "CallContext", "Cluster", "ClusterFileError", "ConnectError", "Connection", "FileRegion", "Listener",
    "NetworkError", "Node", "NoSuchMethod", "PeerClosed", "ProtocolError", "RemoteError", "Reply", "RpcClient",
    "RpcError", "RpcPool", "RpcServer", "Service", "TrafficClass", "TransportError", "TransportTimeout",
    "connect", "default_run_dir", "dump_cluster", "find_cluster", "listen", "load_cluster", "ping",
]
