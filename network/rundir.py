"""Where a locally launched cluster lives, and finding the cluster description a client should use.

The local launcher (``deploy.local``) resolves a cluster description into ``RUN_DIR/cluster.toml``
(ports picked, the key file named) and records the cluster's state in ``RUN_DIR/state.json``.
Clients (``fs3``, ``hai``, jobs) find that running copy here without importing ``deploy``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import ClusterFileError

__all__ = ["default_run_dir", "find_cluster", "pid_alive", "run_dir_base", "running_clusters"]


def run_dir_base() -> Path:
    """The directory holding one run dir per cluster name: ``$FIREFLYER_RUN_DIR``, else
    ``$XDG_STATE_HOME/fireflyer/clusters`` (``~/.local/state/fireflyer/clusters``)."""
    base = os.environ.get("FIREFLYER_RUN_DIR")
    if base:
        return Path(base)
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "fireflyer" / "clusters"


def default_run_dir(cluster_name: str) -> Path:
    """``$FIREFLYER_RUN_DIR/<name>``, else ``$XDG_STATE_HOME/fireflyer/clusters/<name>``."""
    return run_dir_base() / cluster_name


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited child not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _is_up(run_dir: Path) -> bool:
    """The run dir holds a resolved description of a cluster whose supervisor says it is up and lives."""
    try:
        state = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return False
    pid = state.get("supervisor_pid")
    return (state.get("state") == "up" and isinstance(pid, int) and pid_alive(pid)
            and (run_dir / "cluster.toml").is_file())


def running_clusters(base: Path | None = None) -> list[Path]:
    """The resolved descriptions (``RUN_DIR/cluster.toml``) of the clusters up under ``base``."""
    base = base or run_dir_base()
    try:
        dirs = sorted(d for d in base.iterdir() if d.is_dir())
    except OSError:
        return []
    return [d / "cluster.toml" for d in dirs if _is_up(d)]


def find_cluster(arg: str | os.PathLike | None = None) -> Path:
    """The cluster description a client should use.

    - a file: its running copy ``RUN_DIR/cluster.toml`` (ports resolved by the launcher) when
      that cluster is up, else the file itself (a file that already is a run dir's copy, or one
      in a directory of a cluster that is up, is returned as it is); a run dir: its cluster.toml;
    - None: ``$HAI_CLUSTER_FILE`` (a job's), ``$FIREFLYER_CLUSTER``, else the single cluster up
      under the launcher's run-dir base (:func:`run_dir_base`).

    Raises ``ClusterFileError`` saying what to do when there is nothing to use (or several).
    """
    if arg is None or str(arg) == "":
        for env in ("HAI_CLUSTER_FILE", "FIREFLYER_CLUSTER"):
            v = os.environ.get(env)
            if v:
                return find_cluster(v)
        base = run_dir_base()
        up = running_clusters(base)
        if len(up) == 1:
            return up[0]
        if not up:
            raise ClusterFileError(str(base), None, "no cluster is running under this run-dir base and none was "
                                   "named: pass --cluster FILE, set $FIREFLYER_CLUSTER, or start one "
                                   "(hai cluster up --cluster deploy/clusters/local.toml)")
        raise ClusterFileError(str(base), None, f"{len(up)} clusters are running here "
                               f"({', '.join(p.parent.name for p in up)}): pick one with --cluster FILE "
                               f"or $FIREFLYER_CLUSTER")
    p = Path(arg)
    if p.is_dir():
        if (p / "cluster.toml").is_file():
            return p / "cluster.toml"
        raise ClusterFileError(str(p), None, "a directory without a cluster.toml: name a cluster description")
    if not p.is_file():
        raise ClusterFileError(str(p), None, "no such cluster description")
    if (p.parent / "state.json").exists():
        return p  # already a run dir's resolved copy
    from .topology import load_cluster

    run_dir = default_run_dir(load_cluster(p).name)
    if _is_up(run_dir):
        return run_dir / "cluster.toml"
    return p


def write_private(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, mode 0600: a temporary file in the same directory, synced,
    then renamed over it (a reader sees the old file or the whole new one, never a part)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p
