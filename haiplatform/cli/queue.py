"""Slurm's everyday verbs on hai: the queue (squeue), history (sacct), cancel (scancel), hold, release and
resubmit (scontrol hold|release|requeue), and the event log."""

from __future__ import annotations

import re
import sys
import time

import typer

from .app import EXIT_USAGE, JsonOpt, _call, _clock, _fail, _hms, _out, _status_color, app
from .jobs import _ref, _span

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """A date for --since/--until -> unix seconds: YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS] (local time), or
    relative to now: 30m, 2h, 3d, 1w (ago). ValueError naming the forms otherwise."""
    t = text.strip()
    m = re.fullmatch(r"(\d{1,6})([smhdw])", t)
    if m:
        return (time.time() if now is None else now) - int(m[1]) * _UNITS[m[2]]
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            return time.mktime(time.strptime(t, fmt))
        except ValueError:
            continue
    raise ValueError(f"date {text!r}: expected YYYY-MM-DD, YYYY-MM-DDTHH:MM, or an age like 30m, 2h, 3d, 1w")


def _when(text: str | None, opt: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_when(text)
    except ValueError as exc:
        _fail(ValueError(f"{opt}: {exc}"), EXIT_USAGE)
        raise


def _table(*cols: str):
    from rich.table import Table

    return Table(*cols, box=None, pad_edge=False, header_style="bold")


def _print(t) -> None:
    """To a terminal at its width; to a pipe or file wide (like sacct's), so no column is cut."""
    import sys

    from rich.console import Console

    (Console() if sys.stdout.isatty() else Console(width=220)).print(t)


# -- the queue --------------------------------------------------------------------------------------

@app.command("queue")
def queue_cmd(user: str = typer.Option(None, "--user", "-u", help="only this user's jobs"),
              as_json: bool = JsonOpt) -> None:
    """Everyone's queued and running jobs (Slurm's squeue): position, owner, and why each waits.

    POS 1 is the next job to start. Owners may be hidden ("-") where the admin set
    queue_visibility = "hide-others"."""
    def render(rows):
        t = _table("id", "name", "user", "nodes", "prio", "status", "pos", "where / why", "submitted", "ran")
        for r in rows:
            where = ",".join(r.get("assigned_nodes") or ()) or r.get("reason") or ""
            ran = time.time() - r["started_at"] if r.get("started_at") and r["status"] == "running" else None
            t.add_row(str(r["chain_id"]), r["name"], r["user"], str(r["nodes"]), str(r["priority"]),
                      f"[{_status_color(r['status'])}]{r['status']}[/]",
                      "" if r.get("position") is None else str(r["position"]), where, _clock(r.get("submitted_at")),
                      _hms(ran) if ran is not None else "")
        _print(t)
    rows = _call(lambda c: c.queue())
    if user:
        rows = [r for r in rows if r["user"] == user]
    _out(rows, as_json, render)


@app.command("history")
def history_cmd(user: str = typer.Option(None, "--user", "-u", help="this user's jobs (admins: anyone's)"),
                state: str = typer.Option(None, "--state", "-s", help="only jobs that ended so: succeeded, failed, "
                                          "stopped, canceled (or 'any': running ones too)"),
                since: str = typer.Option(None, "--since", "-S", help="submitted at or after: YYYY-MM-DD, "
                                          "YYYY-MM-DDTHH:MM, or an age: 30m, 2h, 3d"),
                until: str = typer.Option(None, "--until", "-E", help="submitted before (same forms)"),
                name: str = typer.Option(None, "--name", help="only jobs of this name"),
                limit: int = typer.Option(100, "--limit", help="at most this many rows, newest first"),
                as_json: bool = JsonOpt) -> None:
    """Ended jobs, one row each (Slurm's sacct): nodes, submit, start, end, elapsed, state, exit, restarts."""
    if limit < 1:
        _fail(ValueError(f"--limit {limit}: 1 or more"), EXIT_USAGE)
    filters = {"user": user, "status": state, "since": _when(since, "--since"), "until": _when(until, "--until"),
               "name": name, "limit": limit}

    def render(res):
        t = _table("id", "name", "user", "nodes", "submitted", "start", "end", "elapsed", "state", "exit",
                   "restarts")
        for r in res["jobs"]:
            jid = str(r["chain_id"]) + (f" [{r['array_id']}_{r['array_index']}]" if r.get("array_id") else "")
            t.add_row(jid, r["name"], r["user"], str(r["nodes"]), _clock(r.get("submitted_at")),
                      _clock(r.get("started_at")), _clock(r.get("finished_at")), _hms(r.get("elapsed_s")),
                      f"[{_status_color(r['status'])}]{r['status']}[/]",
                      "" if r.get("exit_code") is None else str(r["exit_code"]), str(r.get("restarts", 0)))
        _print(t)
        if res.get("total", 0) > len(res["jobs"]):
            typer.echo(f"({len(res['jobs'])} of {res['total']}; --limit N for more)", err=True)
    given = {k: v for k, v in filters.items() if v is not None}
    if as_json:  # the API's JSON as it came (one line): no decode and re-encode of up to 100,000 rows
        sys.stdout.buffer.write(_call(lambda c: c.history_json(**given)) + b"\n")
        sys.stdout.flush()
        return
    _out(_call(lambda c: c.history(**given)), as_json, render)


# -- control ----------------------------------------------------------------------------------------

@app.command("cancel")
def cancel_cmd(ids: list[str] = typer.Argument(None, help="job ids (CHAIN), any number"),
               name: str = typer.Option(None, "--name", help="jobs of this name"),
               user: str = typer.Option(None, "--user", "-u", help="jobs of this user (yours; admins: anyone's)"),
               array: str = typer.Option(None, "--array", help="every task of this job array"),
               state: list[str] = typer.Option(None, "--state", "-s", help="only jobs in this state (repeatable): "
                                               "queued, running, ..."),
               as_json: bool = JsonOpt) -> None:
    """Stop or cancel jobs by id, name, user, array or state (Slurm's scancel); at least one filter."""
    chains = [_ref(i)[0] for i in ids or ()]
    arr = None
    if array is not None:
        arr = _ref(array)[0]
    if not (chains or name or user or arr or state):
        _fail(ValueError("hai cancel: name the jobs: IDS, --name, --user, --array or --state"), EXIT_USAGE)
    res = _call(lambda c: c.cancel(ids=chains or None, name=name, user=user, array_id=arr, status=state or None))
    if isinstance(res, list):  # HaiClient.cancel returns the chain ids
        res = {"canceled": res}
    _out(res, as_json, lambda r: typer.echo(f"canceled {len(r['canceled'])} job(s)"
                                            + (f": {_span(sorted(r['canceled']))}" if r["canceled"] else "")))


def _one(verb: str, method: str, doc: str) -> None:
    def cmd(job: str = typer.Argument(..., help="CHAIN"), as_json: bool = JsonOpt) -> None:
        chain, _ = _ref(job)
        j = _call(lambda c: getattr(c, method)(chain))
        _out(j, as_json, lambda j: typer.echo(f"{verb} job {chain}" + (f": new job {j['chain_id']}"
                                                                        if method == "resubmit" else "")))
    cmd.__doc__ = doc
    cmd.__name__ = f"{method}_cmd"
    app.command(method)(cmd)


_one("held", "hold", "Hold a queued job: it keeps its place but does not start until 'hai release' (scontrol hold).")
_one("released", "release", "Release a held job: it may start again (scontrol release).")
_one("resubmitted", "resubmit", "Submit an ended job again, the same spec as a new job (scontrol requeue).")


@app.command("events")
def events_cmd(job: str = typer.Option(None, "--job", "-j", help="only this job's events"),
               user: str = typer.Option(None, "--user", "-u", help="only this user's"),
               kind: str = typer.Option(None, "--kind", "-k", help="only this kind of event"),
               since: str = typer.Option(None, "--since", "-S", help="YYYY-MM-DD, YYYY-MM-DDTHH:MM or 30m, 2h, 3d"),
               limit: int = typer.Option(100, "--limit", help="the newest this many (printed oldest first)"),
               as_json: bool = JsonOpt) -> None:
    """The scheduler's event log (admins only): submissions, starts, ends, suspends, drains.

    Printed as a log reads, oldest first and the newest last; --json gives the API's order, newest first."""
    filters = {"job": _ref(job)[0] if job else None, "user": user, "kind": kind, "since": _when(since, "--since"),
               "limit": limit}

    def render(evs):
        for e in reversed(evs):  # the API answers newest first
            typer.echo(f"{_clock(e.get('ts'))}  {e.get('kind', ''):14} "
                       f"{'job ' + str(e['job_id']) if e.get('job_id') else '':10} {e.get('node') or '':6} "
                       f"{e.get('message', '')}".rstrip())
    _out(_call(lambda c: c.events(**{k: v for k, v in filters.items() if v is not None})), as_json, render)
