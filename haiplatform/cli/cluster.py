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
NodeOpt = typer.Option(None, "--node", "-n", help="only this node's services: one host of the cluster (its own "
                       "supervisor; start each node's the same way)")


@cluster_app.command("up")
def cluster_up(cluster: Path = ClusterOpt, run_dir: Path = RunDirOpt,
               ports: str = typer.Option("file", help="'file': the file's ports; 'auto': pick free ones"),
               service: list[str] = typer.Option(None, "--service", help="start only this service (repeatable)"),
               restart: str = typer.Option("on-failure", help="'on-failure': start a crashed service again "
                                           "(with back-off, up to a start limit); 'no': leave it down"),
               node: str = NodeOpt,
               netns: bool = typer.Option(False, "--netns", help="every node in its own network namespace, joined "
                                          "by bridges for the leaves and spines, links shaped to the description's "
                                          "rates (root, iproute2)"),
               key_file: Path = typer.Option(None, "--key-file", help="the cluster key to use (provisioned with "
                                             "'hai cluster keygen'); default: the description's [security] "
                                             "key_file, else RUN_DIR/secrets/cluster.key (made when missing)",
                                             exists=True, dir_okay=False),
               as_json: bool = JsonOpt) -> None:
    """Start every service of CLUSTER (or of one --node) in the background and wait until each is healthy.

    A detached supervisor owns the services: it restarts one that crashes (see 'hai cluster status').
    With --node, only that node's services: run it on each host (or, on one machine, once per node:
    each node gets its own supervisor over the same run dir, ports and key)."""
    from deploy import local
    from network.errors import NetworkError

    try:
        local.cluster_up(str(cluster), run_dir, ports, service or None, restart=restart, node=node, netns=netns,
                         key_file=key_file)
        st = local.cluster_status(str(cluster), run_dir, node=node)
    except (local.LauncherError, NetworkError, OSError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(st, indent=1))
        return
    local.render_status(st)
    hint = local.admin_token_hint(st, cluster, run_dir)
    if hint:
        typer.echo(hint)


@cluster_app.command("down")
def cluster_down(cluster: Path = ClusterOpt, run_dir: Path = RunDirOpt, node: str = NodeOpt) -> None:
    """Stop every service of CLUSTER (every node's supervisor of the run dir), or of one --node."""
    from deploy import local
    from network.errors import NetworkError

    try:
        rep = local.cluster_down_report(str(cluster), run_dir, node=node)
    except (local.LauncherError, NetworkError, OSError) as exc:
        _fail(exc)
    typer.echo(local.down_message(rep))


@cluster_app.command("status")
def cluster_status(cluster: Path = ClusterOpt, run_dir: Path = RunDirOpt, node: str = NodeOpt,
                   as_json: bool = JsonOpt) -> None:
    """Show each service of CLUSTER with a live health check, its restarts and last exit.

    The cluster is 'up' (every service healthy), 'degraded' (a service is restarting, failed, exited, starting or unhealthy) or 'down'.

    Exit status: 0 up, 4 degraded, 3 down, 1 error."""
    from deploy import local
    from network.errors import NetworkError

    try:
        st = local.cluster_status(str(cluster), run_dir, node=node)
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


@cluster_app.command("keygen")
def cluster_keygen(out: Path = typer.Option(..., "--out", help="a new directory (made 0700), or an empty private one "
                                            "of yours, to write into (laid out as a run dir)"),
                   as_json: bool = JsonOpt) -> None:
    """Make a cluster's secrets for real hosts: OUT/secrets/cluster.key and OUT/hai/cluster.secret (0600).

    Copy OUT's tree into every host's run dir (or name the key with 'hai cluster up --key-file', or
    with [security] key_file in the description). Existing files are never overwritten."""
    from deploy import local

    try:
        made = local.keygen(out)
    except (local.LauncherError, OSError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps({k: str(v) for k, v in made.items()}, indent=1))
        return
    typer.echo(f"cluster key: {made['cluster_key']}\nplatform secret: {made['hai_secret']}\n"
               f"copy {out}/ (both files) to every host's run dir (mode 0700, owned by the services' account), "
               f"then delete it here")


@cluster_app.command("units")
def cluster_units(cluster: Path = ClusterOpt,
                  node: str = typer.Option(..., "--node", "-n", help="the node (host) the units are for"),
                  out: Path = typer.Option(..., "--out", help="directory to write the units into: a new one (made "
                                           "0700) or a private one of yours, not a link"),
                  user: str = typer.Option("fireflyer", help="the services' account (the agent runs as root)"),
                  group: str = typer.Option(None, help="the services' group (default: the user's name)"),
                  prefix: str = typer.Option("/opt/fireflyer/.venv", help="the venv on the host (PREFIX/bin/python)"),
                  cluster_path: str = typer.Option("/etc/fireflyer/cluster.toml", "--cluster-path",
                                                   help="where the description lies on the host"),
                  state_dir: str = typer.Option("/var/lib/fireflyer", "--state-dir",
                                                help="the services' data, databases and tokens on the host"),
                  python: str = typer.Option(None, help="the interpreter (default: PREFIX/bin/python)"),
                  as_json: bool = JsonOpt) -> None:
    """Write systemd units for NODE's services, fireflyer.target and the env file into OUT.

    Install: copy them to /etc/systemd/system (the env file to /etc/fireflyer), then
    'systemctl daemon-reload && systemctl enable --now fireflyer.target' (docs/admin.md)."""
    from deploy.units import UnitOptions, UnitsError, write_units
    from network import load_cluster
    from network.errors import NetworkError

    try:
        opts = UnitOptions(user=user, group=group, prefix=prefix, cluster_file=cluster_path,
                           env_file=f"{Path(cluster_path).parent}/fireflyer.env", state_dir=state_dir, python=python)
        files = write_units(load_cluster(cluster), node, out, opts)
    except (UnitsError, NetworkError, OSError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps([str(f) for f in files], indent=1))
        return
    for f in files:
        typer.echo(str(f))


@cluster_app.command("link")
def cluster_link(state: str = typer.Argument(..., help="'down' cuts the link, 'up' restores it"),
                 a: str = typer.Argument(..., help="one end: a node, leaf or spine of the description"),
                 b: str = typer.Argument(..., help="the other end"),
                 cluster: Path = ClusterOpt, run_dir: Path = RunDirOpt, as_json: bool = JsonOpt) -> None:
    """Cut or restore a link of a cluster running on network namespaces (hai cluster up --netns).

    Example: hai cluster link down n0 a-leaf0 --cluster deploy/clusters/local.toml"""
    from deploy import local
    from network.errors import NetworkError

    if state not in ("up", "down"):
        _fail(ValueError(f"link state must be 'up' or 'down', not {state!r}"))
    try:
        links = local.cluster_link(str(cluster), a, b, state == "up", run_dir)
    except (local.LauncherError, NetworkError, OSError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(links, indent=1))
        return
    typer.echo(f"link {a} - {b}: {state}")
