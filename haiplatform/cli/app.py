"""The ``hai`` command's common parts: the app, the connection options, output helpers."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..states import AUTO, JobStatus

app = typer.Typer(help="hai: submit and follow training jobs on a fireflyer cluster.\n\n"
                  "Exit codes: 0 done; 1 the request failed or the followed job did not succeed; 2 bad usage; "
                  "130 interrupted (a followed job goes on).", no_args_is_help=True,
                  add_completion=False)

#: per invocation: whether --json was given (reset by the app's callback; set by --json's own callback,
#: which runs while the arguments are parsed, before the command's body can fail)
_state = {"json": False}


def _set_json(value: bool) -> bool:
    if value:
        _state["json"] = True
    return value


JsonOpt = typer.Option(False, "--json", callback=_set_json,
                       help="machine-readable output (errors too: {\"error\", \"status\"})")

#: hai's exit codes (docs/cli.md): a script tells a refused request from a job that failed only by the
#: message, but a usage mistake (2) and an interrupted follow (130) apart from both.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _json_mode() -> bool:
    """Whether the running command was given --json (before the program, or after '--')."""
    return _state["json"]


def _fail(exc: Exception, code: int = EXIT_ERROR) -> None:
    """One red line on stderr (or, under --json, ``{"error": ..., "status": ...}`` on stdout) and exit
    ``code``. ``status`` is the API's HTTP status, 0 when the error is ours (no answer, bad input)."""
    if _json_mode():
        typer.echo(json.dumps({"error": str(exc), "status": getattr(exc, "status", 0) or 0}))
    else:
        typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(code)


# -- connection -------------------------------------------------------------------------------------

_conn: dict = {}


@app.callback()
def _global(url: str = typer.Option(None, "--url", envvar="HAI_URL", help="API URL (http://HOST:PORT)"),
            token: str = typer.Option(None, "--token", envvar="HAI_TOKEN", help="your token"),
            cluster: Path = typer.Option(None, "--cluster", "-c", envvar="HAI_CLUSTER",
                                         help="a local cluster's description: API address and admin token"),
            run_dir: Path = typer.Option(None, "--run-dir", envvar="HAI_RUN_DIR",
                                         help="that cluster's run dir (default: the launcher's)")) -> None:
    """Connection: --url/--token, $HAI_URL/$HAI_TOKEN, ~/.config/hai/config.json (hai init), or --cluster."""
    _conn.update(url=url, token=token, cluster=cluster, run_dir=run_dir)
    _state["json"] = False


def _config_path() -> Path:
    import os

    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "hai" / "config.json"


def _client():
    from ..client import HaiClient
    from ..errors import ConfigError

    url, token = _conn.get("url"), _conn.get("token")
    if _conn.get("cluster") and (not url or not token):
        from network import load_cluster

        cf = Path(_conn["cluster"])
        if not cf.is_file():
            import os

            where = f" (relative to {os.getcwd()})" if not cf.is_absolute() else ""
            raise ConfigError(f"--cluster / $HAI_CLUSTER: no cluster file {str(cf)!r}{where}; "
                              "export an absolute path (export HAI_CLUSTER=$PWD/deploy/clusters/local.toml)")

        run_dir = _conn.get("run_dir")
        if run_dir is None:
            from network import default_run_dir  # the local launcher's convention

            run_dir = default_run_dir(load_cluster(_conn["cluster"]).name)
        resolved = Path(run_dir) / "cluster.toml"
        c = load_cluster(resolved if resolved.exists() else _conn["cluster"])
        if not url:
            addr, port = c.endpoint("haiplatform.api")
            url = f"http://{addr}:{port}"
        if not token:
            tok = Path(run_dir) / "hai" / "admin.token"
            if not tok.exists():
                raise ConfigError(f"no {tok}: is the cluster up? (hai cluster up --cluster {_conn['cluster']})")
            token = tok.read_text().strip()
    if not url or not token:
        try:
            saved = json.loads(_config_path().read_text())
        except (OSError, ValueError):
            saved = {}
        url, token = url or saved.get("url"), token or saved.get("token")
    if not url:
        raise ConfigError("no API URL: pass --url, set $HAI_URL, run 'hai init TOKEN --url URL' or pass --cluster")
    if not token:
        raise ConfigError("no token: pass --token, set $HAI_TOKEN or run 'hai init TOKEN --url URL'")
    return HaiClient(url, token)


def _call(fn):
    """Run fn(client) and turn our errors (and a bad cluster file) into one line and exit code 1."""
    from network.errors import NetworkError

    from ..errors import HaiError

    try:
        with _client() as c:
            return fn(c)
    except (HaiError, NetworkError) as exc:
        _fail(exc)


def _out(data, as_json: bool, render) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=1))
    else:
        render(data)


def _ago(ts) -> str:
    import time

    if not ts:
        return "-"
    d = time.time() - ts
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.1f}h ago"


def _status_color(st: str) -> str:
    return {JobStatus.SUCCEEDED: "green", JobStatus.RUNNING: "cyan", JobStatus.SCHEDULED: "cyan",
            JobStatus.QUEUED: "yellow", JobStatus.STOPPING: "yellow", JobStatus.FAILED: "red",
            JobStatus.STOPPED: "magenta", JobStatus.CANCELED: "magenta",
            JobStatus.SUSPENDED: "blue"}.get(st, "white")



def _prio(j: dict) -> str:
    """The effective level, with what was asked when it differs (auto, a demotion)."""
    asked = j.get("submitted_priority", j["priority"])
    if asked == AUTO:
        return f"{j['priority']} (auto)"
    return str(j["priority"]) if asked == j["priority"] else f"{j['priority']} (asked {asked})"


def _hms(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 86400}-{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 86400 \
        else f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _clock(ts: float | None) -> str:
    import time

    return time.strftime("%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"
