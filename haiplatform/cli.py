"""The ``hai`` command: researchers submit and follow jobs; admins run the cluster."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="hai: submit and follow training jobs on a fireflyer cluster.", no_args_is_help=True,
                  add_completion=False)
cluster_app = typer.Typer(help="Run a cluster description's services on this machine (admin).",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")

ClusterOpt = typer.Option(..., "--cluster", "-c", help="cluster description (TOML)", exists=True, dir_okay=False)
RunDirOpt = typer.Option(None, "--run-dir", help="logs and state (default: ~/.local/state/fireflyer/clusters/NAME)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(1)


@cluster_app.command("up")
def cluster_up(cluster: Path = ClusterOpt, run_dir: Path = RunDirOpt,
               ports: str = typer.Option("file", help="'file': the file's ports; 'auto': pick free ones"),
               service: list[str] = typer.Option(None, "--service", help="start only this service (repeatable)"),
               as_json: bool = JsonOpt) -> None:
    """Start every service of CLUSTER in the background and wait until each is healthy."""
    from deploy import local
    from network.errors import NetworkError

    try:
        local.cluster_up(str(cluster), run_dir, ports, service or None)
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
    """Show each service of CLUSTER with a live health check."""
    from deploy import local
    from network.errors import NetworkError

    try:
        st = local.cluster_status(str(cluster), run_dir)
    except (local.LauncherError, NetworkError, OSError) as exc:
        _fail(exc)
    typer.echo(json.dumps(st, indent=1)) if as_json else local.render_status(st)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
