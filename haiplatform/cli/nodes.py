"""``hai nodes``: the cluster's nodes."""

from __future__ import annotations

from ..states import NodeState
from .app import JsonOpt, _call, _out, app


@app.command("nodes")
def nodes_cmd(as_json: bool = JsonOpt) -> None:
    """The cluster's nodes: health, drain state and the job on each."""
    from rich.console import Console
    from rich.table import Table

    def render(ns):
        t = Table("node", "address", "zone", "leaf", "gpus", "state", "drained", "job", "heartbeat")
        for n in ns:
            color = "green" if n["state"] == NodeState.UP else "red"
            t.add_row(n["name"], n["address"], n["zone"], n["leaf"], str(n["gpus"]), f"[{color}]{n['state']}[/]",
                      ("yes: " + n["drain_reason"]) if n["drained"] else "", str(n["job"] or ""),
                      f"{n['heartbeat_age']:.1f}s ago")
        Console().print(t)
    _out(_call(lambda c: c.nodes()), as_json, render)
