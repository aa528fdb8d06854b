"""How the launcher runs and checks each kind of service.

A service in a cluster description is a module; the launcher runs
``python -m MODULE [ARGV...] --cluster FILE --node NODE`` on each of its nodes and waits for the
health check to pass. Each package's issue registers its services here (one line each), in the
order they must start: a storage server needs its cluster manager, an agent its API.

Health checks:
- ``rpc``: the service answers ``rpc.ping`` on its port (every :class:`network.RpcServer` does);
- ``http:/PATH``: ``GET http://ADDRESS:PORT/PATH`` returns 2xx;
- ``tcp``: the port accepts a connection;
- ``none``: the process is alive.
A ``[[service]]`` entry may override it with ``health = "..."``, and the launcher's restart
policy for a crashed service with ``restart``, ``restart_sec``, ... (see :mod:`deploy.restart`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServiceKind:
    module: str
    health: str = "rpc"
    argv: tuple[str, ...] = ()
    order: int = 50  # lower starts first, stops last
    env: dict = field(default_factory=dict)


REGISTRY: dict[str, ServiceKind] = {}


def register(kind: ServiceKind) -> ServiceKind:
    REGISTRY[kind.module] = kind
    return kind


def kind_of(module: str) -> ServiceKind:
    """The registered kind, or a default (rpc health, started in file order) for unknown modules."""
    return REGISTRY.get(module) or ServiceKind(module)


register(ServiceKind("network.probe", health="rpc", argv=("serve",), order=10))
# fs3: the cluster manager before the storage servers that heartbeat it.
register(ServiceKind("fs3.mgmtd", health="rpc", order=20))
register(ServiceKind("fs3.storage", health="rpc", order=30))
# the metadata service reads mgmtd's routing table to place files and asks storage for lengths
register(ServiceKind("fs3.meta", health="rpc", order=35))
# haiplatform: the API (and its database) first, then the scheduler, then one agent per node.
register(ServiceKind("haiplatform.api", health="http:/healthz", order=40))
register(ServiceKind("haiplatform.scheduler", health="rpc", order=41))
register(ServiceKind("haiplatform.agent", health="rpc", order=42))
# the metrics exporter scrapes the node's other services: it starts after them and stops first
register(ServiceKind("network.metrics", health="http:/healthz", order=60))
