"""``hai validate``: run the node validator on a node (through its agent) or here, and its history."""

from __future__ import annotations

import json
import time

import typer

from .app import JsonOpt, _call, _clock, _fail, _out, app


@app.command("validate")
def validate_cmd(
        node: list[str] = typer.Option(None, "--node", "-n", help="the node (repeatable; default: every node that is up)"),
        wait: float = typer.Option(120.0, "--wait", help="seconds to wait for the results (0: ask and return)"),
        history: bool = typer.Option(False, "--history", help="list the runs kept per node instead"),
        limit: int = typer.Option(20, "--limit", help="--history: runs to show"),
        local: bool = typer.Option(False, "--local", help="run the checks on this machine (no cluster needed)"),
        only: str = typer.Option("", "--only", help="--local: comma-separated checks"),
        as_json: bool = JsonOpt) -> None:
    """Validate nodes (admin): each node's agent runs the checks once no job runs there, and the API drains
    a node that fails (docs/validator.md). --history lists the runs; --local runs the checks here."""
    if local:
        return _local(only, as_json)
    if history:
        runs = _call(lambda c: [r for n in (node or [None]) for r in c.validations(n, limit=limit)])
        return _out(runs, as_json, _render_history)
    if wait < 0:
        _fail(ValueError("--wait must be 0 or more seconds"))
    runs = _call(lambda c: _request_and_wait(c, node, wait))
    _out(runs, as_json, _render_runs)
    if any(r is None or not r["ok"] for r in runs.values()) and wait > 0:
        raise typer.Exit(1)


def _request_and_wait(c, nodes: list[str] | None, wait: float, poll: float = 1.0) -> dict[str, dict | None]:
    """Ask each node's agent, then poll for the run that answers (None: none within ``wait``).

    A run answers a request when it knew of it (its ``request`` is the request's time or later): a run
    that began before the admin asked, or answered an earlier request, does not. One listing per pass
    covers every node still pending (not one per node: a whole cluster asks with one call a second)."""
    from ..errors import ApiError

    names = nodes or [n["name"] for n in c.nodes() if n["state"] == "up"]
    if not names:
        raise ApiError("no node is up to validate")
    asked = {n: c.validate(n) for n in names}
    out: dict[str, dict | None] = {n: None for n in names}
    if wait <= 0:
        return {n: {"node": n, "requested": a["requested"], "pending": True} for n, a in asked.items()}
    deadline = time.monotonic() + wait
    after = min(a["last_id"] for a in asked.values())
    while True:
        runs = _runs_after(c, after, names[0] if len(names) == 1 else None)
        for r in sorted(runs, key=lambda r: r["id"]):  # the oldest answering run per node
            a = asked.get(r["node"])
            if a is not None and out[r["node"]] is None and r["id"] > a["last_id"] \
                    and r.get("request", 0.0) >= a["requested"]:
                out[r["node"]] = r
        after = max([after, *(r["id"] for r in runs)])
        if all(v is not None for v in out.values()) or time.monotonic() >= deadline:
            return out
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def _runs_after(c, after: int, node: str | None, page: int = 1000) -> list[dict]:
    """Every run with an id above ``after`` (pages of ``page``, newest first)."""
    runs: list[dict] = []
    before = None
    while True:
        got = c.validations(node, after=after, limit=page, before=before)
        runs += got
        if len(got) < page:
            return runs
        before = got[-1]["id"]


def _render_runs(runs: dict) -> None:
    from rich.console import Console

    from ..validate import render

    con = Console()
    for n, r in runs.items():
        if r is None:
            con.print(f"[red]{n}: no result in time[/] (a running job delays it: the validator runs on an idle "
                      "node; see 'hai validate --history')")
        elif r.get("pending"):
            con.print(f"{n}: asked at {_clock(r['requested'])}; 'hai validate --history --node {n}' shows the run")
        else:
            con.print(f"[bold]{n}[/] ({_clock(r['at'])}, {r['duration']:.1f} s):")
            render(r, con)



def _render_history(runs: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("id", "node", "at", "trigger", "result", "took", "summary")
    for r in runs:
        t.add_row(str(r["id"]), r["node"], _clock(r["at"]), r["trigger"], "[green]ok[/]" if r["ok"] else "[red]FAILED[/]",
                  f"{r['duration']:.1f}s", r["summary"])
    Console().print(t)


def _local(only: str, as_json: bool) -> None:
    from ..validate import local_context, render, run_checks

    try:
        report = run_checks(local_context(only=[x for x in only.split(",") if x.strip()] or None))
    except (ValueError, OSError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        render(report)
    if not report["ok"]:
        raise typer.Exit(1)
