"""``hai cluster``: run a cluster description's services (admin)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .app import JsonOpt, _fail, app

cluster_app = typer.Typer(help="Run a cluster description's services on this machine (admin).",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")

ClusterOpt = typer.Option(..., "--cluster", "-c", help="cluster description (TOML)", exists=True, dir_okay=False)
RunDirOpt = typer.Option(None, "--run-dir", help="logs and state (default: ~/.local/state/fireflyer/clusters/NAME)")


@cluster_app.command("up")
def cluster_up(cluster: Path = ClusterOpt, run_dir: Path = RunDirOpt,
               ports: str = typer.Option("file", help="'file': the file's ports; 'auto': pick free ones"),
               service: list[str] = typer.Option(None, "--service", help="start only this service (repeatable)"),
               restart: str = typer.Option("on-failure", help="'on-failure': start a crashed service again "
                                           "(with back-off, up to a start limit); 'no': leave it down"),
               as_json: bool = JsonOpt) -> None:
    """Start every service of CLUSTER in the background and wait until each is healthy.

    A detached supervisor owns the services: it restarts one that crashes (see 'hai cluster status')."""
    from deploy import local
    from network.errors import NetworkError

    try:
        local.cluster_up(str(cluster), run_dir, ports, service or None, restart=restart)
        st = local.cluster_status(str(cluster), run_dir)
    except (local.LauncherError, NetworkError, OSError) as exc:
        _fail(exc)
    typer.echo(json.dumps(st, indent=1)) if as_json else local.render_status(st)


@cluster_app.command("down")
def cluster_down(cluster: Path = ClusterOpt, run_dir: Path = RunDirOpt) -> None:
    """Stop every service of CLUSTER."""
    from deploy import local
    from network.errors import NetworkError

    try:
        stopped = local.cluster_down(str(cluster), run_dir)
    except (local.LauncherError, NetworkError, OSError) as exc:
        _fail(exc)
    typer.echo("stopped" if stopped else "cluster was not running")


@cluster_app.command("status")
def cluster_status(cluster: Path = ClusterOpt, run_dir: Path = RunDirOpt, as_json: bool = JsonOpt) -> None:
    """Show each service of CLUSTER with a live health check, its restarts and last exit.

    The cluster is 'up' (every service healthy), 'degraded' (a service is restarting, failed, exited, starting or unhealthy) or 'down'.

    Exit status: 0 up, 4 degraded, 3 down, 1 error."""
    from deploy import local
    from network.errors import NetworkError

    try:
        st = local.cluster_status(str(cluster), run_dir)
    except (local.LauncherError, NetworkError, OSError) as exc:
        _fail(exc)
    typer.echo(json.dumps(st, indent=1)) if as_json else local.render_status(st)
    raise typer.Exit(local.status_exit_code(st))


@cluster_app.command("restart")
def cluster_restart(service: str = typer.Argument(..., help="the service's module, e.g. fs3.storage"),
                    cluster: Path = ClusterOpt, run_dir: Path = RunDirOpt,
                    node: str = typer.Option(None, "--node", "-n", help="only on this node (default: every node "
                                             "of the service, one at a time)"),
                    timeout: float = typer.Option(None, help="seconds to wait for the supervisor (default: 40 "
                                                  "per instance + 15)"),
                    as_json: bool = JsonOpt) -> None:
    """Restart SERVICE of the running CLUSTER: stop it, start it, wait until it is healthy.

    Without --node: each instance in turn, the next once the previous one is healthy.

    A service left 'failed' after too many crashes starts afresh.

    Example: hai cluster restart fs3.storage --node n2 --cluster deploy/clusters/local.toml"""
    from deploy import local
    from network.errors import NetworkError

    try:
        res = local.cluster_restart(str(cluster), service, node, run_dir, timeout)
    except (local.LauncherError, NetworkError, OSError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(res, indent=1))
        return
    for s in res["restarted"]:
        typer.echo(f"{s['module']}@{s['node']}: pid {s['old_pid']} -> {s['pid']}, {s['state']}")
