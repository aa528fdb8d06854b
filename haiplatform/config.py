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
    max_body_bytes = 1048576    # API: a larger request body is refused (413)
    rate_limit = 100.0          # API: requests/s per user (token bucket; agents and the scheduler exempt)
    rate_burst = 1000           # API: ... and the bucket's size (429 when empty)
    max_user_requests = 24      # API: users' requests in progress at once (of 40 threads); the rest wait
    max_streams_per_user = 8    # API: open log streams (hai logs -f) per user (429 beyond)
    max_streams = 512           # API: open log streams in all (503 beyond)
    stream_max_seconds = 86400.0  # API: a log stream ends after this long (follow again to go on)
    job_account = "hai-{user}"  # the Unix account a user's ranks run as ({user}: the platform user)
    accounts = {}               # explicit user -> account entries, e.g. {alice = "alice"}; win over job_account
    create_accounts = false     # an agent running as root creates a missing account (useradd --system)
    control_dir = ""            # "" -> STATE_DIR + "-control": the jobs' HAI_CONTROL directories
    job_credential_ttl = 604800.0  # lifetime of a job's fs3 credential (s)
    policy = "fireflyer"        # the scheduling policy: "fireflyer", "reference-fifo" or "fifo" (policy.PROFILES)
    min_run_time = 300.0        # a running job is not preempted before it has run this long (0: any time)
    suspend_ack_timeout = 5.0   # a suspended job has this long to acknowledge before it is stopped
    suspend_grace = 5.0         # ... and this long after its acknowledgement to save (a job's default grace)
    max_suspend_grace = 300.0   # the largest grace a job may ask for (JobSpec.grace)
    demote_after = 1800.0       # an above_normal chain runs at normal after this much run time
    max_node_requeues = 10      # a chain re-queued after this many lost nodes fails instead
    default_time_limit = 604800.0  # backfill's run-time estimate for a job without --time (0: none)
    validate_interval = 604800.0  # the agents run the node validator this often (s; 0: only at start and on request)
    validate_at_start = true    # ... and at start: a node takes no job before it passes (docs/validator.md)
    validate_sizes = {}         # the validator's sizes and thresholds, e.g. {gemm_n = 384, fraction = 0.5}
    queue_visibility = "all"    # hai queue: "all" or "hide-others" (others' jobs without user and name)
    max_array_size = 10000      # the most tasks of one job array (--array)
    web_secure_cookies = "auto" # dashboard cookies Secure: "auto" (when the request is https), "always" (behind
                                # a TLS proxy), or "proxy" (when a trusted proxy's X-Forwarded-Proto says https)

STATE_DIR is ``$FIREFLYER_RUN_DIR_CLUSTER/hai`` when the local launcher runs the service,
else ``state_dir`` from the section, else ``~/.local/state/fireflyer/hai/<cluster name>``.
It holds the database, the tokens and the job logs (STATE_DIR/logs/<node>/ on each node) and is
mode 0700: readable by the services' account only. The control directories live beside it (a
0711 tree: a job reaches its own directory by name, owned by its account, mode 0700).

[Note: no secrets in the cluster description] Every job reads the cluster description
(HAI_CLUSTER_FILE), so ``admin_token`` and ``cluster_secret`` are refused in a description that
other accounts can read: leave them empty (generated into STATE_DIR) or keep the file 0600.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path

from network.topology import Cluster

from .errors import ConfigError

__all__ = ["HaiConfig", "load_config", "state_dir_for", "read_or_create_secret", "private_dir", "shared_dir"]


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
    max_body_bytes: int = 1 << 20
    rate_limit: float = 100.0
    rate_burst: int = 1000
    max_user_requests: int = 24
    max_streams_per_user: int = 8
    max_streams: int = 512
    stream_max_seconds: float = 86400.0
    longpoll: float = 2.0
    job_account: str = "hai-{user}"
    accounts: dict = field(default_factory=dict)
    create_accounts: bool = False
    control_dir: str = ""
    job_credential_ttl: float = 7 * 24 * 3600.0
    policy: str = "fireflyer"
    min_run_time: float = 300.0
    suspend_ack_timeout: float = 5.0
    suspend_grace: float = 5.0
    max_suspend_grace: float = 300.0
    demote_after: float = 1800.0
    max_node_requeues: int = 10
    default_time_limit: float = 7 * 24 * 3600.0
    validate_interval: float = 7 * 24 * 3600.0
    validate_at_start: bool = True
    validate_sizes: dict = field(default_factory=dict)
    queue_visibility: str = "all"   # GET /v1/queue: "all", or "hide-others" (others' user and name shown as "-")
    max_array_size: int = 10000     # the most tasks one job array may have
    web_secure_cookies: str = "auto"  # the dashboard's cookies: "auto", "always" or "proxy" (docs/web.md)

    def policy_config(self):
        """The policy's :class:`~haiplatform.policy.PolicyConfig` from this section."""
        from .policy import PolicyConfig

        return PolicyConfig(heartbeat_timeout=self.heartbeat_timeout, min_run_time=self.min_run_time,
                            demote_after=self.demote_after, max_node_requeues=self.max_node_requeues,
                            default_time_limit=self.default_time_limit)

    def job_grace(self, asked: float) -> float:
        """A job's finish grace after a suspend: what it asked (0: suspend_grace), at most max_suspend_grace."""
        return min(asked or self.suspend_grace, self.max_suspend_grace)

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

    def control_root(self) -> Path:
        """Where the agents make the jobs' HAI_CONTROL directories (``control_dir``, else beside STATE_DIR)."""
        if self.control_dir:
            return Path(os.path.expanduser(self.control_dir))
        return self.state_dir.with_name(self.state_dir.name + "-control")


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
        want = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,), "dict": (dict,)}[typ]
        if (isinstance(val, bool) and typ != "bool") or not isinstance(val, want):
            raise ConfigError(f"{cluster.source}: haiplatform.{key}: expected {typ}, got {val!r}")
        if typ in ("float", "int") and (val < 0 if key in _MAY_BE_ZERO else val <= 0):
            raise ConfigError(f"{cluster.source}: haiplatform.{key}: expected a positive number, got {val!r}")
        kw[key] = float(val) if typ == "float" else val
    _check_policy(cluster, kw)
    if kw.get("queue_visibility", "all") not in ("all", "hide-others"):
        raise ConfigError(f"{cluster.source}: haiplatform.queue_visibility: expected \"all\" or \"hide-others\", "
                          f"got {kw['queue_visibility']!r}")
    if kw.get("web_secure_cookies", "auto") not in ("auto", "always", "proxy"):
        raise ConfigError(f"{cluster.source}: haiplatform.web_secure_cookies: expected \"auto\", \"always\" or "
                          f"\"proxy\", got {kw['web_secure_cookies']!r}")
    _check_accounts(cluster, kw)
    _check_no_secrets(cluster, kw)
    _check_validate_sizes(cluster, kw)
    cfg = HaiConfig(state_dir=state_dir_for(cluster, sec), **kw)
    private_dir(cfg.state_dir)
    return cfg


#: keys for which 0 is a meaningful setting (no minimum run time, no requeue after a lost node, no
#: run-time estimate for jobs without a limit)
_MAY_BE_ZERO = frozenset({"min_run_time", "max_node_requeues", "default_time_limit", "validate_interval"})


def _check_policy(cluster: Cluster, kw: dict) -> None:
    from .policy import PROFILES

    if kw.get("policy", "fireflyer") not in PROFILES:
        raise ConfigError(f"{cluster.source}: haiplatform.policy: unknown policy {kw['policy']!r} "
                          f"(one of {', '.join(PROFILES)})")
    grace, most = kw.get("suspend_grace", 5.0), kw.get("max_suspend_grace", 300.0)
    if grace > most:
        raise ConfigError(f"{cluster.source}: haiplatform.suspend_grace: {grace:g} s is above "
                          f"max_suspend_grace ({most:g} s)")


def _check_validate_sizes(cluster: Cluster, kw: dict) -> None:
    from .validate import Sizes

    try:
        Sizes.from_dict(kw.get("validate_sizes"), "haiplatform.validate_sizes")
    except ValueError as exc:
        raise ConfigError(f"{cluster.source}: {exc}") from None


def _check_accounts(cluster: Cluster, kw: dict) -> None:
    pattern = kw.get("job_account", "hai-{user}")
    try:
        ok = "{user}" in pattern and bool(pattern.format(user="x"))
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{cluster.source}: haiplatform.job_account: expected a pattern with {{user}} "
                          f"(e.g. \"hai-{{user}}\" or \"{{user}}\"), got {pattern!r}")
    for user, acct in kw.get("accounts", {}).items():
        if not isinstance(acct, str) or not acct:
            raise ConfigError(f"{cluster.source}: haiplatform.accounts.{user}: expected an account name, got {acct!r}")


def _check_no_secrets(cluster: Cluster, kw: dict) -> None:
    """Refuse inline secrets in a description other accounts can read (see the note at the top)."""
    inline = [k for k in ("admin_token", "cluster_secret") if kw.get(k)]
    if not inline or cluster.path is None:
        return
    try:
        mode = os.stat(cluster.path).st_mode
    except OSError:
        return
    if mode & 0o077:
        raise ConfigError(f"{cluster.source}: haiplatform.{inline[0]}: a secret in the cluster description, which "
                          f"every job reads (mode {stat.filemode(mode)}); remove it to have one generated into "
                          f"the state directory (readable by the services only), or make the file mode 0600")


def dir_with_mode(path: Path, mode: int) -> Path:
    """Create ``path`` (and parents) and give it ``mode`` when this account owns it."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    st = path.stat()
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
        path.chmod(mode)
    return path


def private_dir(path: Path) -> Path:
    """A directory for the services' state only (0700)."""
    return dir_with_mode(path, 0o700)


def shared_dir(path: Path) -> Path:
    """A directory other accounts may pass through but not list (0711): the jobs' control tree."""
    return dir_with_mode(path, 0o711)


def read_or_create_secret(path: Path) -> str:
    """The token in ``path``; created (random, mode 0600, in a 0700 directory) by the first caller when missing."""
    private_dir(path.parent)
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
