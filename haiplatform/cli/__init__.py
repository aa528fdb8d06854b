"""The ``hai`` command: researchers submit and follow jobs; admins run the cluster.

One module per group of commands, all on one typer app (:mod:`.app`, which also holds the connection
options and output helpers): :mod:`.cluster` (``hai cluster``), :mod:`.jobs` (submitting and following
jobs), :mod:`.nodes` (``hai nodes``), :mod:`.validate` (``hai validate``), :mod:`.admin` (``hai whoami``, ``hai init``, ``hai admin``)."""

from __future__ import annotations

# isort: off
from . import jobs, queue, nodes, validate, admin, cluster  # noqa: F401 - each registers its commands on app, in this order
# isort: on
from .app import EXIT_INTERRUPTED, app
from .jobs import parse_job_ref, parse_time
from .queue import parse_when

__all__ = ["app", "main", "parse_time", "parse_job_ref", "parse_when", "PANELS"]

#: ``hai --help`` groups the commands in these panels, in this order (set here, where every module's
#: commands are known, so a module need not know the others' panels)
PANELS = {"Jobs": ("python", "exec", "bash", "run", "status", "list", "logs", "stop", "suspend", "priority",
                   "hold", "release", "resubmit", "cancel"),
          "Queue & history": ("queue", "history", "events"),
          "Nodes": ("nodes",),
          "Admin": ("whoami", "init", "admin"),
          "Cluster": ("cluster",),
          "Tools": ("sim", "local")}


def _set_panels() -> None:
    panel_of = {c: p for p, cmds in PANELS.items() for c in cmds}
    for info in app.registered_commands:
        info.rich_help_panel = panel_of.get(info.name or "", info.rich_help_panel)
    for info in app.registered_groups:
        info.rich_help_panel = panel_of.get(info.name or "", info.rich_help_panel)
    order = list(PANELS)
    app.registered_commands.sort(key=lambda i: order.index(i.rich_help_panel) if i.rich_help_panel in order else 99)


_set_panels()


def main(argv: list[str] | None = None) -> None:
    """The ``hai`` command. Under --json, the usage errors click finds itself (an unknown option, a
    missing argument) are a JSON object on stdout too, as every other error is (exit code 2).

    [Note: --json before click has parsed it] An unknown option stops the parse before --json's own
    callback runs, so --json is looked for in the arguments (before a '--': what follows is a job's)."""
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    if "--json" not in (args[:args.index("--")] if "--" in args else args):
        app(args=args, prog_name="hai")
        return
    import json

    import typer

    try:
        code = app(args=args, prog_name="hai", standalone_mode=False)
    except typer.TyperException as exc:  # typer's own click: UsageError, BadParameter, NoSuchOption ...
        msg = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            msg += f" (see '{ctx.command_path} --help')"
        print(json.dumps({"error": msg, "status": 0}), flush=True)
        sys.exit(getattr(exc, "exit_code", 1))
    except typer.Abort:
        print(json.dumps({"error": "interrupted", "status": 0}), flush=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
