"""``hai nodes``: the cluster's nodes."""

from __future__ import annotations

from ..states import NodeState
from .app import JsonOpt, _ago, _call, _out, app


def _validation(v: dict | None) -> str:
    """The last validator run in a cell: ok, or the failed checks; with its age."""
    if not v:
        return "-"
    what = "[green]ok[/]" if v["ok"] else f"[red]failed: {', '.join(v['failed'])}[/]"
    return f"{what} ({_ago(v['at'])})"


def _drain(n: dict) -> str:
    if not n["drained"]:
        return ""
    by = n.get("drained_by") or "scheduler"
    return f"yes ({by}): {n['drain_reason']}"


@app.command("nodes")
def nodes_cmd(as_json: bool = JsonOpt) -> None:
    """The cluster's nodes: health, drain state (who drained them, why), the last validation and the job on each."""
    from rich.console import Console
    from rich.table import Table

    def render(ns):
        t = Table("node", "address", "zone", "leaf", "gpus", "state", "validated", "drained", "job", "heartbeat")
        for n in ns:
            color = "green" if n["state"] == NodeState.UP else "red"
            t.add_row(n["name"], n["address"], n["zone"], n["leaf"], str(n["gpus"]), f"[{color}]{n['state']}[/]",
                      _validation(n.get("validation")), _drain(n), str(n["job"] or ""),
                      f"{n['heartbeat_age']:.1f}s ago")
        Console().print(t)
    _out(_call(lambda c: c.nodes()), as_json, render)
