"""The ``[fs3]`` section of the cluster description, validated, and where each node keeps its data.

    [fs3]
    replication = 3              # replicas per chain (targets on distinct nodes)
    chunk_size = 1048576         # bytes, a power of two
    targets_per_node = 3         # storage targets per storage node
    heartbeat_interval = 1.0     # seconds between storage heartbeats (and routing polls)
    failure_timeout = 10.0       # a node silent this long is declared offline
    mgmtd_db = ""                # SQLAlchemy URL; "" = sqlite file in mgmtd's data dir
    data_dir = ""                # base data directory (default: $FIREFLYER_RUN_DIR_CLUSTER/data)
    fsync = false                # fsync chunk files before rename (power-loss durability)
    max_batch_bytes = 4194304    # bytes per read or write batch request
    scrub_interval = 86400.0     # seconds from one scrub pass of a server's chunks to the next; 0: off
    scrub_rate_mb = 64.0         # MB/s a scrub pass reads at most
    read_timeout = 0.0           # s one read attempt waits for a replica before trying another;
                                 #   0: failure_timeout / 3 (at least 0.5 s)
    write_timeout = 0.0          # s one write attempt waits for the chain before refreshing routing
                                 #   and retrying; 0: failure_timeout / 2 (at least 1 s)
    meta_db = ""                 # the metadata service's SQLAlchemy URL; "" = sqlite file in the meta
                                 #   node's data dir (several meta servers share one PostgreSQL URL)
    stripe = 16                  # chains a new file stripes over (at most the number of chains)
    gc_delay = 300.0             # s an unlinked, closed file's chunks are kept before GC removes them
    session_ttl = 60.0           # s a file session lives without a renewal (clients renew every ttl/3)

[Note: attempt timeouts] A frozen (SIGSTOP) or wedged peer keeps its connections open and
answers nothing: only a timeout ends the wait. The 60 s I/O timeout is for a transfer that makes
progress; a read or write *attempt* gets a much shorter one, tied to the failure detection. A
read that times out moves to another replica at once (the slow server is avoided for a while);
the data is the same everywhere (CRAQ), so retrying elsewhere never serves a stale copy. A write
attempt times out in about failure_timeout / 2, and every hop of the chain gives its successor a
shorter share of the attempt's budget (see fs3.forward), so the hop next to the frozen one
answers ForwardFailed first and the head does not wait for it; the client refreshes its routing
and retries the same idempotency key until mgmtd has moved the frozen node out (after
``failure_timeout``): a write stalls for about the failure detection time, not the I/O timeout.

Data directories: ``<base>/<node>/`` where base is ``$FIREFLYER_RUN_DIR_CLUSTER/data`` when the
local launcher started the service, else ``--data-dir``, else ``data_dir`` above, else
``~/.local/state/fireflyer/fs3``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Fs3ConfigError

__all__ = ["Fs3Config", "ServiceStart", "node_data_dir", "service_start"]

_KEYS = {"replication", "chunk_size", "targets_per_node", "heartbeat_interval", "failure_timeout",
         "mgmtd_db", "data_dir", "fsync", "max_batch_bytes", "scrub_interval", "scrub_rate_mb", "read_timeout",
         "write_timeout", "meta_db", "stripe", "gc_delay", "session_ttl"}


@dataclass(frozen=True)
class Fs3Config:
    replication: int = 3
    chunk_size: int = 1 << 20
    targets_per_node: int = 3
    heartbeat_interval: float = 1.0
    failure_timeout: float = 10.0
    mgmtd_db: str = ""
    data_dir: str = ""
    fsync: bool = False
    max_batch_bytes: int = 4 << 20
    scrub_interval: float = 86400.0
    scrub_rate_mb: float = 64.0
    read_timeout: float = 0.0
    write_timeout: float = 0.0
    meta_db: str = ""
    stripe: int = 16
    gc_delay: float = 300.0
    session_ttl: float = 60.0

    @classmethod
    def from_section(cls, sec: dict, source: str = "[fs3]") -> Fs3Config:
        unknown = set(sec) - _KEYS
        if unknown:
            raise Fs3ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} "
                                 f"(known: {', '.join(sorted(_KEYS))})")
        kw = {}
        for name, typ in (("replication", int), ("chunk_size", int), ("targets_per_node", int),
                          ("heartbeat_interval", float), ("failure_timeout", float), ("mgmtd_db", str),
                          ("data_dir", str), ("fsync", bool), ("max_batch_bytes", int),
                          ("scrub_interval", float), ("scrub_rate_mb", float), ("read_timeout", float),
                          ("write_timeout", float), ("meta_db", str), ("stripe", int), ("gc_delay", float),
                          ("session_ttl", float)):
            if name not in sec:
                continue
            v = sec[name]
            if typ is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise Fs3ConfigError(f"{source}.{name}: expected {typ.__name__}, got {type(v).__name__} {v!r}")
            kw[name] = v
        cfg = cls(**kw)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "[fs3]") -> None:
        if self.replication < 1:
            raise Fs3ConfigError(f"{source}.replication: expected >= 1, got {self.replication}")
        cs = self.chunk_size
        if cs < 4096 or cs & (cs - 1):
            raise Fs3ConfigError(f"{source}.chunk_size: expected a power of two >= 4096, got {cs}")
        if self.targets_per_node < 1:
            raise Fs3ConfigError(f"{source}.targets_per_node: expected >= 1, got {self.targets_per_node}")
        if self.heartbeat_interval <= 0:
            raise Fs3ConfigError(f"{source}.heartbeat_interval: expected > 0, got {self.heartbeat_interval}")
        if self.failure_timeout <= self.heartbeat_interval:
            raise Fs3ConfigError(f"{source}.failure_timeout: expected more than heartbeat_interval "
                                 f"({self.heartbeat_interval}), got {self.failure_timeout}")
        if self.max_batch_bytes < self.chunk_size:
            raise Fs3ConfigError(f"{source}.max_batch_bytes: expected >= chunk_size ({self.chunk_size})")
        if self.scrub_interval < 0:
            raise Fs3ConfigError(f"{source}.scrub_interval: expected >= 0 seconds (0 turns scrubbing off), "
                                 f"got {self.scrub_interval}")
        if self.scrub_rate_mb <= 0:
            raise Fs3ConfigError(f"{source}.scrub_rate_mb: expected > 0 MB/s, got {self.scrub_rate_mb}")
        for name in ("read_timeout", "write_timeout"):
            v = getattr(self, name)
            if not 0 <= v <= 3600:
                raise Fs3ConfigError(f"{source}.{name}: expected seconds in [0, 3600] (0: derived from "
                                     f"failure_timeout), got {v}")
        if self.stripe < 1:
            raise Fs3ConfigError(f"{source}.stripe: expected >= 1 chains per file, got {self.stripe}")
        if self.gc_delay < 0:
            raise Fs3ConfigError(f"{source}.gc_delay: expected >= 0 seconds, got {self.gc_delay}")
        if self.session_ttl <= 0:
            raise Fs3ConfigError(f"{source}.session_ttl: expected > 0 seconds, got {self.session_ttl}")

    @property
    def read_attempt_timeout(self) -> float:
        """Seconds one read attempt waits for a replica (``read_timeout``, or derived)."""
        return self.read_timeout or max(0.5, self.failure_timeout / 3)

    @property
    def write_attempt_timeout(self) -> float:
        """Seconds one write attempt waits for the chain (``write_timeout``, or derived)."""
        return self.write_timeout or max(1.0, self.failure_timeout / 2)

    @classmethod
    def from_cluster(cls, cluster) -> Fs3Config:
        return cls.from_section(cluster.section("fs3"), f"{cluster.source}: [fs3]")


def node_data_dir(cfg: Fs3Config, node: str, override: str | None = None) -> Path:
    """This node's data directory (created): see the module docstring for the precedence."""
    run = os.environ.get("FIREFLYER_RUN_DIR_CLUSTER")
    if run:
        base = Path(run) / "data"
    elif override:
        base = Path(override)
    elif cfg.data_dir:
        base = Path(cfg.data_dir)
    else:
        base = Path(os.path.expanduser("~/.local/state/fireflyer/fs3"))
    d = base / node
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class ServiceStart:
    """What every fs3 service's ``main`` reads first (:func:`service_start`)."""

    args: argparse.Namespace
    cluster: Any      # network.Cluster
    node: Any         # network.topology.Node: this service's node
    cfg: Fs3Config
    port: int         # the [[service]] port of ``module`` (0: any)
    mgmtd: tuple[str, int] | None
    security: dict    # network.server_settings: auth and limits for the RpcServer


def service_start(ap: argparse.ArgumentParser, argv: list[str] | None, module: str, *,
                  mgmtd: bool = True) -> ServiceStart:
    """Parse a service's command line and read what it needs from the cluster description: the
    ``[fs3]`` section, its port, mgmtd's endpoint (``mgmtd``), the server's security settings.
    A mistake exits with one line (status 2), as ``network.service.parse_service_args`` does."""
    from network import AuthError, server_settings
    from network.service import parse_service_args

    args, cluster, node = parse_service_args(ap, argv)
    try:
        cfg = Fs3Config.from_cluster(cluster)
        mg = cluster.endpoint("fs3.mgmtd") if mgmtd else None
        security = server_settings(cluster)
    except (Fs3ConfigError, KeyError, AuthError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    svc = cluster.service(module)
    return ServiceStart(args, cluster, node, cfg, svc.port if svc else 0, mg, security)
