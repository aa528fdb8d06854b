"""systemd units for one node of a cluster description: ``hai cluster units --node NAME --out DIR``.

On real hosts systemd supervises the services, not the local launcher; these units say to
systemd what the launcher does (:mod:`deploy.local`, :mod:`deploy.restart`):

- one unit per service instance on the node, ``fireflyer-MODULE.service`` (dots become dashes),
  running ``PREFIX/bin/python -m MODULE [ARGV] --cluster /etc/fireflyer/cluster.toml --node NAME``
  (every service starts the same way everywhere);
- ``Restart=on-failure`` with the launcher's back-off (``RestartSec``, ``RestartSteps`` and
  ``RestartMaxDelaySec`` up to its cap; the last two need systemd 254, older ones ignore them
  and restart after a constant ``RestartSec``) and start limit (``StartLimitBurst``,
  ``StartLimitIntervalSec``), the ``[[service]]`` entry's overrides included;
- ``After=`` the services of the node that start before it (the registry's order: a storage
  server after its cluster manager, an agent after the API), ``PartOf=fireflyer.target``;
- ``fireflyer.target``, which wants them all (``systemctl start fireflyer.target``);
- ``fireflyer.env``, the environment file every unit reads (``EnvironmentFile=``): the state
  directory (the run dir's role: data, databases, tokens, logs of jobs).

[Note: the agent runs as root, unhardened] The agent starts jobs as their users' Unix accounts
(setuid), creates missing accounts, and its jobs live in its cgroup: it runs as root, without
``NoNewPrivileges`` (a job may run a setuid program), ``ProtectSystem``, ``PrivateTmp`` (a job's
/tmp is the node's), ``PrivateDevices`` (GPUs) or ``MemoryMax``/``TasksMax`` (they would cap the
jobs). Its stop is ``KillMode=mixed``: SIGTERM to the agent, which stops its jobs within their
grace, then SIGKILL to whatever is left. Every other service runs as the service account with
that hardening on.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from network.topology import Cluster

from .restart import RestartPolicy, policy_from_options
from .services import kind_of

__all__ = ["UnitOptions", "UnitsError", "unit_name", "units_for", "write_units", "TARGET", "ENV_FILE_NAME",
           "open_private_dir", "write_new"]

TARGET = "fireflyer.target"
ENV_FILE_NAME = "fireflyer.env"
ROOT_SERVICES = frozenset({"haiplatform.agent"})  # run as root (see the note above)
# MemoryMax of the light services; fs3.storage (page cache of its chunks) and the agent get none
_MEMORY_MAX = {"network.probe": "1G", "fs3.mgmtd": "2G", "fs3.meta": "4G", "haiplatform.api": "4G",
               "haiplatform.scheduler": "2G"}
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class UnitsError(ValueError):
    """The units cannot be written as asked (an unknown node, a bad user or path)."""


@dataclass(frozen=True)
class UnitOptions:
    """Where things live on the hosts (the defaults are those of docs/admin.md)."""

    user: str = "fireflyer"  # the service account (every service but the agent)
    group: str | None = None  # default: the user's name
    prefix: str = "/opt/fireflyer/.venv"  # the venv: PREFIX/bin/python
    cluster_file: str = "/etc/fireflyer/cluster.toml"
    env_file: str = "/etc/fireflyer/" + ENV_FILE_NAME
    state_dir: str = "/var/lib/fireflyer"  # FIREFLYER_RUN_DIR_CLUSTER: data, databases, tokens
    python: str | None = None  # default: PREFIX/bin/python

    def check(self) -> None:
        if not _USER.match(self.user):
            raise UnitsError(f"user {self.user!r} is not a valid account name (lower case, digits, _ and -)")
        if self.group is not None and not _USER.match(self.group):
            raise UnitsError(f"group {self.group!r} is not a valid group name")
        for what in ("prefix", "cluster_file", "env_file", "state_dir"):
            v = getattr(self, what)
            if not os.path.isabs(v) or any(c in v for c in "\n\"'\\ %$"):
                raise UnitsError(f"{what} {v!r} must be an absolute path without spaces, quotes, % or $")
        if self.python is not None and not os.path.isabs(self.python):
            raise UnitsError(f"python {self.python!r} must be an absolute path")

    @property
    def interpreter(self) -> str:
        return self.python or f"{self.prefix.rstrip('/')}/bin/python"


def unit_name(module: str) -> str:
    """``fs3.storage`` -> ``fireflyer-fs3-storage.service``."""
    return f"fireflyer-{module.replace('.', '-').replace('_', '-')}.service"


def _secs(v: float) -> str:
    return f"{v:g}s"


def _steps(p: RestartPolicy) -> int:
    """RestartSteps that reach backoff_max from backoff as the launcher does (doubling)."""
    n, d = 0, p.backoff
    while d < p.backoff_max and n < 3600:
        d, n = d * 2, n + 1
    return max(n, 1)


def _restart_lines(p: RestartPolicy) -> list[str]:
    if p.restart == "no":
        return ["Restart=no"]
    return [f"Restart={p.restart}", f"RestartSec={_secs(p.backoff)}",
            "# systemd >= 254: the launcher's doubling back-off; older ones ignore the next two lines",
            f"RestartSteps={_steps(p)}", f"RestartMaxDelaySec={_secs(p.backoff_max)}"]


def _service_unit(cluster: Cluster, node: str, module: str, before: list[str], opts: UnitOptions) -> str:
    svc = cluster.service(module)
    assert svc is not None
    kind = kind_of(module)
    policy = policy_from_options(svc.options, RestartPolicy(), f"service {module}")
    root = module in ROOT_SERVICES
    argv = [opts.interpreter, "-m", module, *kind.argv, "--cluster", opts.cluster_file, "--node", node]
    unit = [
        "[Unit]",
        f"Description=fireflyer {module} on node {node} (cluster {cluster.name})",
        "Wants=network-online.target",
        "After=" + " ".join(["network-online.target", *(unit_name(m) for m in before)]),
        f"PartOf={TARGET}",
        f"StartLimitIntervalSec={_secs(policy.interval)}",
        f"StartLimitBurst={policy.burst}",
        "",
        "[Service]",
        "Type=simple",
        f"EnvironmentFile={opts.env_file}",
        *(f"Environment={k}={v}" for k, v in sorted(kind.env.items())),
        "ExecStart=" + shlex.join(argv),
        *_restart_lines(policy),
        "TimeoutStopSec=30s" if root else "TimeoutStopSec=15s",
        "LimitNOFILE=1048576" if root else "LimitNOFILE=65536",
    ]
    if root:
        unit += ["User=root", "Group=root", "KillMode=mixed", "TasksMax=infinity", "Delegate=yes"]
    else:
        unit += [f"User={opts.user}", f"Group={opts.group or opts.user}", "TasksMax=4096"]
        if module in _MEMORY_MAX:
            unit.append(f"MemoryMax={_MEMORY_MAX[module]}")
        unit += ["NoNewPrivileges=yes", "ProtectSystem=strict", f"ReadWritePaths={opts.state_dir}",
                 "ProtectHome=read-only", "PrivateTmp=yes", "PrivateDevices=yes", "ProtectKernelTunables=yes",
                 "ProtectKernelModules=yes", "ProtectControlGroups=yes", "RestrictSUIDSGID=yes",
                 "LockPersonality=yes", "RestrictRealtime=yes", "UMask=0077"]
    unit += ["", "[Install]", f"WantedBy={TARGET}", ""]
    return "\n".join(unit)


def units_for(cluster: Cluster, node: str, opts: UnitOptions | None = None) -> dict[str, str]:
    """{file name: text} of the units of ``node``, its target and the env file."""
    opts = opts or UnitOptions()
    opts.check()
    if node not in cluster.ordered():
        raise UnitsError(f"{cluster.source}: no node {node!r}; its nodes: {', '.join(cluster.ordered())}")
    mods = [s.module for s in cluster.services if s.runs_on(node)]
    if not mods:
        raise UnitsError(f"{cluster.source}: no service runs on node {node}")
    pos = {m: i for i, m in enumerate(mods)}
    mods.sort(key=lambda m: (kind_of(m).order, pos[m]))  # the launcher's start order
    out: dict[str, str] = {}
    for i, m in enumerate(mods):
        try:
            out[unit_name(m)] = _service_unit(cluster, node, m, mods[:i], opts)
        except ValueError as exc:  # a bad restart override in the [[service]] entry
            raise UnitsError(f"{cluster.source}: {exc}") from None
    out[TARGET] = "\n".join([
        "[Unit]",
        f"Description=fireflyer services of node {node} (cluster {cluster.name})",
        "Wants=" + " ".join(unit_name(m) for m in mods),
        "After=" + " ".join(unit_name(m) for m in mods),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])
    out[ENV_FILE_NAME] = "\n".join([
        f"# fireflyer: the environment of every service of node {node} (EnvironmentFile= of its units)",
        f"FIREFLYER_RUN_DIR_CLUSTER={opts.state_dir}",
        "PYTHONUNBUFFERED=1",
        "",
    ])
    return out


def open_private_dir(path: str | os.PathLike, error: type[Exception] = UnitsError) -> int:
    """Open ``path`` as a directory only this account can write, and return its descriptor
    (O_DIRECTORY|O_NOFOLLOW): created mode 0700 when absent (its parents as needed); an existing one
    must be a real directory (not a symbolic link), owned by this account and writable by no one else.

    [Note: write through a private directory] ``hai cluster units`` and ``keygen`` run as root and
    their output directory is often under /tmp: another account could create it first and plant
    links in it (root would then write, or chmod, whatever they point at) or swap the files
    before they are installed (the agent's unit runs as root). Files are then made through the
    descriptor with :func:`write_new` (O_EXCL|O_NOFOLLOW), so renaming the path afterwards
    redirects nothing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    made = False
    try:
        os.mkdir(p, 0o700)
        made = True
    except FileExistsError:
        pass
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:  # ELOOP: a symbolic link; ENOTDIR: a file
        raise error(f"{p} is not a directory of its own ({exc.strerror}): give a new path, or a private "
                    f"directory of this account") from None
    st = os.fstat(fd)
    why = None
    if st.st_uid != os.geteuid():
        why = f"owned by uid {st.st_uid}, not by this account (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        why = f"writable by other accounts (mode {stat.S_IMODE(st.st_mode):o})"
    if why:
        os.close(fd)
        raise error(f"{p} is {why}: another account could plant links or swap files there; give a new "
                    f"path (it is created mode 0700), or a private directory of this account")
    if made:
        os.fchmod(fd, 0o700)
    return fd


def write_new(dir_fd: int, name: str, text: str, mode: int, *, replace: bool = False) -> None:
    """Create ``name`` in the directory ``dir_fd`` (O_CREAT|O_EXCL|O_NOFOLLOW: never through a link,
    never into an existing file) with ``mode``; ``replace`` removes an existing entry of that name
    first (the directory is private: :func:`open_private_dir`)."""
    if replace:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), mode)
        f.write(text)


def write_units(cluster: Cluster, node: str, out: str | os.PathLike, opts: UnitOptions | None = None) -> list[Path]:
    """Write :func:`units_for` into ``out``, a private directory (:func:`open_private_dir`: created
    0700, or an existing one of this account that no one else can write); returns the files written.
    Files of an earlier run there are replaced."""
    files = units_for(cluster, node, opts)
    d = Path(out)
    fd = open_private_dir(d)
    try:
        written = []
        for name, text in files.items():
            write_new(fd, name, text, 0o644, replace=True)
            written.append(d / name)
    finally:
        os.close(fd)
    return written
