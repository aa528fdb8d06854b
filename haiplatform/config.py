"""The ``[haiplatform]`` section of a cluster description, with defaults.

::

    [haiplatform]
    db_url = ""                 # "" -> SQLite file STATE_DIR/hai.db; or postgresql+psycopg://...
    tick = 1.0                  # scheduler tick, seconds (it also wakes on every event)
    min_cycle = 0.05            # events closer together than this are decided in one cycle
    heartbeat_interval = 1.0    # agent -> API
    heartbeat_timeout = 10.0    # a node silent this long is lost
    stop_grace = 5.0            # SIGTERM -> SIGKILL on stop, seconds
    admin_user = "admin"
    admin_token = ""            # "" -> generated into STATE_DIR/admin.token (mode 0600)
    cluster_secret = ""         # agents' and the scheduler's token; "" -> STATE_DIR/cluster.secret
    max_unfinished_per_user = 10000

STATE_DIR is ``$FIREFLYER_RUN_DIR_CLUSTER/hai`` when the local launcher runs the service,
else ``state_dir`` from the section, else ``~/.local/state/fireflyer/hai/<cluster name>``.
Job logs live under STATE_DIR/logs/<node>/ on each node.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, fields
from pathlib import Path

from network.topology import Cluster

from .errors import ConfigError

__all__ = ["HaiConfig", "load_config", "state_dir_for", "read_or_create_secret"]


@dataclass
class HaiConfig:
    state_dir: Path
    db_url: str = ""
    tick: float = 1.0
    min_cycle: float = 0.05
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    stop_grace: float = 5.0
    admin_user: str = "admin"
    admin_token: str = ""
    cluster_secret: str = ""
    max_unfinished_per_user: int = 10000
    longpoll: float = 2.0

    def resolved_db_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.state_dir / 'hai.db').resolve()}"

    def secret(self) -> str:
        return self.cluster_secret or read_or_create_secret(self.state_dir / "cluster.secret")

    def admin(self) -> str:
        return self.admin_token or read_or_create_secret(self.state_dir / "admin.token")

    def log_dir(self, node: str) -> Path:
        return self.state_dir / "logs" / node


def state_dir_for(cluster: Cluster, section: dict | None = None) -> Path:
    run_dir = os.environ.get("FIREFLYER_RUN_DIR_CLUSTER")
    if run_dir:
        return Path(run_dir) / "hai"
    section = section if section is not None else cluster.section("haiplatform")
    if section.get("state_dir"):
        return Path(os.path.expanduser(str(section["state_dir"])))
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "fireflyer" / "hai" / cluster.name


def load_config(cluster: Cluster) -> HaiConfig:
    """The validated ``[haiplatform]`` section; ConfigError names a bad key."""
    sec = dict(cluster.section("haiplatform"))
    sec.pop("state_dir", None)
    known = {f.name: f for f in fields(HaiConfig) if f.name != "state_dir"}
    kw = {}
    for key, val in sec.items():
        if key not in known:
            raise ConfigError(f"{cluster.source}: haiplatform.{key}: unknown key (known: {', '.join(sorted(known))})")
        typ = known[key].type
        want = {"float": (int, float), "int": (int,), "str": (str,)}[typ]
        if isinstance(val, bool) or not isinstance(val, want):
            raise ConfigError(f"{cluster.source}: haiplatform.{key}: expected {typ}, got {val!r}")
        if typ in ("float", "int") and val <= 0:
            raise ConfigError(f"{cluster.source}: haiplatform.{key}: expected a positive number, got {val!r}")
        kw[key] = float(val) if typ == "float" else val
    cfg = HaiConfig(state_dir=state_dir_for(cluster, sec), **kw)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def read_or_create_secret(path: Path) -> str:
    """The token in ``path``; created (random, mode 0600) by the first caller when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            tok = path.read_text().strip()
            if tok:
                return tok
            import time

            time.sleep(0.02)
        raise ConfigError(f"{path} is empty; delete it to have a new token generated") from None
    tok = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w") as f:
        f.write(tok + "\n")
    return tok
