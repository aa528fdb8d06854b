"""Job commands: submit (python, exec, bash, run), follow (status, list, logs), control (stop, suspend,
priority), and the local tools (sim, local)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import typer
from typer.core import TyperCommand

from ..states import JobStatus
from .app import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    JsonOpt,
    _ago,
    _call,
    _clock,
    _fail,
    _hms,
    _out,
    _prio,
    _set_json,
    _status_color,
    app,
)


def _jobs_table(jobs: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("id", "name", "user", "nodes", "prio", "status", "pos", "where / why", "submitted")
    for j in jobs:
        where = ",".join(j["assigned_nodes"]) if j["assigned_nodes"] else j["reason"]
        st = j["status"] + (f" ({j['exit_code']})" if j["exit_code"] not in (None, 0) else "")
        t.add_row(_job_label(j), j["name"], j["user"],
                  str(j["nodes"]), _prio(j), f"[{_status_color(j['status'])}]{st}[/]",
                  "" if j.get("position") is None else str(j["position"]), where or "",
                  _ago(j.get("submitted_at") or j["created_at"]))
    Console().print(t)



def _history(con, attempts: list[dict]) -> None:
    """The chain's restart history: one row per attempt."""
    from rich.table import Table

    t = Table("attempt", "status", "why it ended", "nodes", "started", "ended", "ran")
    for a in attempts:
        why = a["reason"] if a["status"] in JobStatus.DONE else ""
        t.add_row(f"{a.get('chain_id', '')}.{a['restart_count']}".lstrip("."), f"[{_status_color(a['status'])}]{a['status']}[/]",
                  (f"{a['stop']}: " if a["stop"] != "-" else "") + why if why else "",
                  ",".join(a["nodes"] or ()), _clock(a["started_at"] or a["scheduled_at"]), _clock(a["finished_at"]),
                  _hms(a["run_s"]))
    con.print(t)


def _short_command(cmd: list[str], limit: int = 300) -> str:
    """The command as one line, cut to ``limit`` characters with its whole size said (a command of
    10,000 arguments is not a status); ``--json`` has it whole."""
    text = " ".join(cmd)
    if len(text) <= limit:
        return text
    return (f"{text[:limit]}... ({len(cmd)} arguments, {sum(len(a) for a in cmd)} characters; "
            "--json shows it whole)")


def _attempt_detail(j: dict, a: dict) -> None:
    """An earlier attempt of chain j: what the chain's history keeps of it."""
    from rich.console import Console

    con = Console()
    why = a["reason"] if a["status"] in JobStatus.DONE else ""
    con.print(f"job [bold]{j['chain_id']}.{a['restart_count']}[/] {j['name']} user {j['user']}: "
              f"[{_status_color(a['status'])}]{a['status']}[/]"
              + (f", exit code {a['exit_code']}" if a.get("exit_code") is not None else "")
              + (f" - {(a['stop'] + ': ') if a['stop'] != '-' else ''}{why}" if why else ""))
    con.print(f"  nodes: {','.join(a['nodes'] or ()) or '-'}  started {_clock(a['started_at'])}  "
              f"ended {_clock(a['finished_at'])}  ran {_hms(a['run_s'])}")
    con.print(f"  the job's latest attempt: hai status {_job_label(j)}")
    _history(con, j["attempts"])


def _job_detail(j: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"job [bold]{_job_label(j)}[/] {j['name']} user {j['user']}: "
              f"[{_status_color(j['status'])}]{j['status']}[/]"
              + (f", exit code {j['exit_code']}" if j["exit_code"] is not None else "")
              + (f" - {j['reason']}" if j["reason"] else ""))
    con.print(f"  command: {_short_command(j['command'])}", markup=False, highlight=False)
    if j.get("array_id") is not None:
        con.print(f"  array {j['array_id']} task {j['array_index']}"
                  + (f" (at most {j['array_throttle']} at once)" if j.get("array_throttle") else ""))
    deps = [f"after {','.join(map(str, j['after']))}" if j.get("after") else "",
            f"after-ok {','.join(map(str, j['after_ok']))}" if j.get("after_ok") else "",
            "held (hai release ID)" if j.get("held") else "", f"output {j['output']}" if j.get("output") else ""]
    if any(deps):
        con.print("  " + "  ".join(x for x in deps if x), markup=False)
    con.print(f"  nodes: {j['nodes']} {j['assigned_nodes'] or ''}  priority {_prio(j)}  "
              f"stop: {j['stop']}  chain: {j['chain_status']}"
              + (f"  queue position {j['position']}" if j.get("position") else ""))
    # the time limit is per attempt: this attempt's run time counts against it, not the chain's
    used = (j.get("attempts") or [{}])[-1].get("run_s")
    limits = [f"time limit {_hms(j['time_limit'])} per attempt (this one ran {_hms(used)})"
              if j.get("time_limit") else "",
              f"grace {j['grace']:g} s" if j.get("grace") else "",
              f"watchdog {j['watchdog']:g} s" if j.get("watchdog") else "",
              f"last checkpoint {_ago(j['last_checkpoint'])}" if j.get("last_checkpoint") else ""]
    if any(limits):
        con.print("  " + "  ".join(x for x in limits if x))
    if j.get("ranks"):
        t = Table("rank", "node", "local", "status", "exit", "pid", "message")
        for r in j["ranks"]:
            t.add_row(str(r["rank"]), r["node"], str(r["local_rank"]), f"[{_status_color(r['status'])}]{r['status']}[/]",
                      "" if r["exit_code"] is None else str(r["exit_code"]), str(r["pid"] or ""), r["message"])
        con.print(t)
    if len(j.get("attempts", [])) > 1:
        con.print("  restart history:")
        _history(con, j["attempts"])


# -- ids ----------------------------------------------------------------------------------------------

def parse_job_ref(text: str) -> tuple[int, int | None]:
    """``CHAIN`` or ``CHAIN.RESTART`` (what ``hai list`` shows) -> (chain id, restart count or None for
    the latest attempt); ValueError naming the forms otherwise."""
    chain, dot, restart = text.strip().partition(".")
    if not chain.isdigit() or (dot and not restart.isdigit()) or len(text) > 24 or int(chain) < 1:
        raise ValueError(f"job id {text!r}: expected CHAIN or CHAIN.RESTART (as 'hai list' shows: 12, 12.1)")
    return int(chain), (int(restart) if dot else None)


def _ref(text: str) -> tuple[int, int | None]:
    try:
        return parse_job_ref(text)
    except ValueError as exc:
        _fail(exc, EXIT_USAGE)
        raise  # unreachable: _fail exits


def _job_label(j: dict) -> str:
    """The id a user types: CHAIN, or CHAIN.RESTART after a restart."""
    return str(j["chain_id"]) + (f".{j['restart_count']}" if j.get("restart_count") else "")


def _attempt(j: dict, restart: int | None) -> dict | None:
    """The attempt row of chain ``j`` with this restart count (None: the latest); None when it has none."""
    if restart is None or restart == j["restart_count"]:
        return None
    for a in j.get("attempts") or ():
        if a["restart_count"] == restart:
            return a
    _fail(ValueError(f"job {j['chain_id']} has no attempt {j['chain_id']}.{restart} (attempts: "
                     + ", ".join(f"{j['chain_id']}.{a['restart_count']}" for a in j.get("attempts") or [j]) + ")"))
    return None


def parse_time(text: str) -> float:
    """Slurm's ``--time`` formats -> seconds: MM, MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS (ValueError
    naming them otherwise). As in Slurm, a lone number is minutes."""
    formats = "MM, MM:SS, H:MM:SS, D-H, D-H:MM or D-H:MM:SS"
    t = text.strip()
    days, rest = (t.split("-", 1) if "-" in t else ("0", t))
    parts = rest.split(":")
    if not (days.isdigit() and all(p.isdigit() for p in parts) and len(parts) <= 3 and len(days) <= 5
            and all(len(p) <= 6 for p in parts)):
        raise ValueError(f"--time {text!r}: expected {formats}")
    n = [int(p) for p in parts]
    if "-" in t:  # D-H, D-H:MM, D-H:MM:SS
        h, m, sec = (n + [0, 0])[:3]
    elif len(n) == 3:
        h, m, sec = n
    else:  # MM, MM:SS
        h, m, sec = 0, n[0], (n[1] if len(n) == 2 else 0)
    total = ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if total <= 0:
        raise ValueError(f"--time {text!r}: the limit must be above 0 ({formats})")
    return float(total)


# -- submitting -------------------------------------------------------------------------------------

_JOB_PANEL = "Job options (before the program, as with srun/sbatch; or after '--')"

#: our job options: (name, flags, type, default, metavar, help); one table for typer's --help, the
#: parser of the options after '--' and the warning about an option found after the program.
_JOB_OPTS: list[tuple[str, tuple[str, ...], type, object, str, str]] = [
    ("nodes", ("--nodes", "-n"), int, 1, "N", "whole nodes (at least 1)"),
    ("procs_per_node", ("--procs-per-node",), int, None, "K", "processes per node (default: one per GPU, or 1)"),
    ("priority", ("--priority", "-p"), str, "normal", "P", "a level name, 0..50, or auto"),
    ("time", ("--time", "-t"), str, None, "T", "each attempt's run time limit (Slurm: MM, MM:SS, H:MM:SS, D-H, "
                                               "D-H:MM, D-H:MM:SS)"),
    ("grace", ("--grace",), float, 0.0, "S", "seconds to save after acknowledging a suspend"),
    ("watchdog", ("--watchdog",), float, 0.0, "S", "stop as hung after S seconds without output"),
    ("name", ("--name", "-J"), str, None, "X", "the job's name (default: the program's)"),
    ("env", ("--env", "-e"), list[str], None, "K=V", "an environment variable (repeatable)"),
    ("shared", ("--shared",), bool, False, "", "visible to your group"),
    ("array", ("--array", "-a"), str, None, "SPEC", "a job array: 0-99, 0-99%8 (8 at once), 1,3,5-7, 0-15:4"),
    ("after", ("--after",), str, None, "IDS", "start once these jobs ended, any way (Slurm's afterany)"),
    ("after_ok", ("--after-ok",), str, None, "IDS", "start once these jobs succeeded (Slurm's afterok)"),
    ("hold", ("--hold",), bool, False, "", "queue it held: it starts after 'hai release ID'"),
    ("output", ("--output", "-o"), str, None, "PATH", "also write each rank's output there (%j job, %a array "
                                                      "index, %r rank, %n node, %x name, %% percent)"),
    ("follow", ("--follow", "-f"), bool, False, "", "follow the job until it ends: rank 0's log (each restart's too), then a summary; not with --array"),
    ("as_json", ("--json",), bool, False, "", "machine-readable output"),
]
_FLAGS = {f: name for name, flags, *_ in _JOB_OPTS for f in flags}


def _typer_params() -> list[inspect.Parameter]:
    out = []
    for name, flags, typ, default, metavar, help_ in _JOB_OPTS:
        opt = typer.Option(default, *flags, help=help_, metavar=metavar or None, rich_help_panel=_JOB_PANEL,
                           show_default=default not in (None, False, 0.0),
                           callback=_set_json if name == "as_json" else None)
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                     annotation=typ if default is not None or typ is bool else typ | None))
    return out


def _parse_after_dashes(opts: list[str]) -> dict:
    """The job options given after '--' (the older form, still accepted)."""
    import argparse

    ap = argparse.ArgumentParser(prog="hai python SCRIPT [ARGS] --", add_help=False, exit_on_error=False)
    for name, flags, typ, _default, _, _ in _JOB_OPTS:
        if typ is bool:
            ap.add_argument(*flags, dest=name, action="store_true", default=None)
        elif name == "env":
            ap.add_argument(*flags, dest=name, action="append", default=None)
        else:
            ap.add_argument(*flags, dest=name, type=typ, default=None)
    try:
        ns, extra = ap.parse_known_args(opts)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise typer.BadParameter(f"after '--': {exc}") from None
    if extra:
        raise typer.BadParameter(f"after '--': unknown option(s) {' '.join(extra)} (known: "
                                 + ", ".join(f[0] for _, f, *_ in _JOB_OPTS) + ")")
    return {k: v for k, v in vars(ns).items() if v is not None}


def _ids(text: str | None, opt: str) -> list[int]:
    if not text:
        return []
    try:
        return [parse_job_ref(x)[0] for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"{opt} {text!r}: {exc}") from None


def _check_opts(o: dict, explicit_ppn: bool) -> None:
    """Refuse what cannot be meant, naming the reason (the API would refuse some, later and less clearly)."""
    if o["nodes"] is not None and o["nodes"] < 1:
        raise typer.BadParameter(f"--nodes {o['nodes']}: a job needs at least 1 node")
    if o["name"] is not None and not o["name"].strip():
        raise typer.BadParameter("--name '': give the job a name, or leave --name out to use the program's")
    if explicit_ppn and o["procs_per_node"] is not None and o["procs_per_node"] < 1:
        raise typer.BadParameter(f"--procs-per-node {o['procs_per_node']}: give at least 1, or leave it out "
                                 "for one process per GPU")
    for k in ("grace", "watchdog"):
        if o[k] is not None and o[k] < 0:
            raise typer.BadParameter(f"--{k} {o[k]}: seconds, 0 or more")


def _spec(o: dict, name: str, command: list[str]) -> dict:
    import os

    try:
        time_limit = parse_time(o["time"]) if o["time"] else 0.0
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    env = {}
    for kv in o["env"] or ():
        if "=" not in kv:
            raise typer.BadParameter(f"--env {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        env[k] = v
    spec = {"name": o["name"] or name, "command": command, "nodes": o["nodes"], "priority": o["priority"],
            "procs_per_node": o["procs_per_node"] or 0, "env": env, "workdir": os.getcwd(),
            "shared_in_group": bool(o["shared"]), "time_limit": time_limit, "grace": o["grace"] or 0.0,
            "watchdog": o["watchdog"] or 0.0}
    # the features of Slurm's sbatch: sent only when asked, so a server without them still takes the rest
    extra = {"array": o["array"], "after": _ids(o["after"], "--after"), "after_ok": _ids(o["after_ok"], "--after-ok"),
             "hold": bool(o["hold"]), "output": o["output"]}
    spec.update({k: v for k, v in extra.items() if v})
    return spec


def _warn_misplaced(args: list[str]) -> None:
    """An option of ours after the program goes to the program (as with srun); say so, once."""
    mine = [a for a in args if a.split("=", 1)[0] in _FLAGS]
    if mine:
        typer.secho(f"warning: {' '.join(mine)} after the program goes to the program, not to hai; put job options "
                    "before it (hai python --nodes 2 train.py ...) or after '--'", fg="yellow", err=True)


def _submit_cmd(ctx: typer.Context, name: str, command: list[str], o: dict, script: str | None = None) -> None:
    """The submit commands' common part: options before the program (o) and after '--', the job, submit."""
    import os

    args = list(ctx.args)
    explicit = {k for k in o if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}
    try:
        if "--" in args:
            i = args.index("--")
            args, late = args[:i], _parse_after_dashes(args[i + 1:])
            _set_json(bool(late.get("as_json")))
            o = {**o, **late}
            explicit |= set(late)
        else:
            _warn_misplaced(args)
        _check_opts(o, "procs_per_node" in explicit)
        if script is not None and not Path(script).exists():
            raise typer.BadParameter(f"no such script {script!r} (relative to {os.getcwd()})")
        spec = _spec(o, name, [*command, *args])
    except typer.BadParameter as exc:
        _fail(ValueError(exc.message), EXIT_USAGE)
    _submit_and_show(spec, bool(o["follow"]), bool(o["as_json"]))


def _submit_command(cmd_name: str, first: str, first_help: str, doc: str, build):
    """Register a submit command: ``hai CMD [JOB OPTIONS] FIRST [ARGS] [-- JOB OPTIONS]``; ``build(first)``
    gives (job name, command, script to check or None)."""
    def cmd(ctx: typer.Context, **kw) -> None:
        name, command, script = build(kw.pop(first))
        _submit_cmd(ctx, name, command, kw, script)

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              inspect.Parameter(first, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                                default=typer.Argument(..., help=first_help, metavar=first.upper())),
              *_typer_params()]
    cmd.__signature__ = inspect.Signature(params)
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    cmd.__doc__ = doc
    cmd.__name__ = f"{cmd_name}_cmd"
    app.command(cmd_name, context_settings=_SUBMIT, rich_help_panel="Jobs")(cmd)
    return cmd


_SUBMIT = {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False}


def _py(script: str):
    import sys

    return Path(script).stem, [sys.executable, "-u", script], script


python_cmd = _submit_command(
    "python", "script", "the training script",
    """Submit `python SCRIPT ARGS` as a job: hai python --nodes 2 train.py --lr 1 [--follow].

    Job options go before SCRIPT, as with srun and sbatch (or after '--' at the end: hai python train.py
    --lr 1 -- --nodes 2); everything after SCRIPT is the script's. With --array each task is a job of its
    own and sees $HAI_ARRAY_TASK_ID (and $SLURM_ARRAY_TASK_ID).""", _py)
exec_cmd = _submit_command(
    "exec", "program", "a program on the nodes' PATH",
    """Submit any program as a job: hai exec --nodes 1 --time 30:00 -p auto true (job options: as 'hai python').""",
    lambda prog: (Path(prog).name, [prog], None))
bash_cmd = _submit_command(
    "bash", "script", "a shell script",
    """Submit `bash SCRIPT ARGS` as a job: hai bash --nodes 2 --time 1:00:00 run.sh (job options: as 'hai python').""",
    lambda script: (Path(script).stem, ["bash", script], script))


# -- following --------------------------------------------------------------------------------------

def _log_tail(c, job_id: int, rank: int, n: int, attempt: int | None = None) -> str:
    """The last ``n`` lines of a rank's log."""
    try:
        text = c.logs(job_id, rank, attempt=attempt, tail=n)
    except TypeError:  # a client without tail: the whole log, cut here
        text = c.logs(job_id, rank, attempt=attempt)
    return "".join(text.splitlines(keepends=True)[-n:])


def _failure_summary(c, j: dict, lines: int = 20) -> str:
    """Which ranks failed (exit codes) and the last lines of the first one's log."""
    ranks = j.get("ranks") or []
    failed = [r for r in ranks if r["status"] == "failed"] or \
        [r for r in ranks if r["exit_code"] not in (None, 0) and r["status"] != "killed"]
    if not failed:
        return ""
    out = "failed rank(s): " + ", ".join(f"{r['rank']} on {r['node']} (exit code {r['exit_code']})"
                                         for r in failed) + "\n"
    first = min(failed, key=lambda r: r["rank"])
    try:
        tail = _log_tail(c, j["chain_id"], first["rank"], lines, attempt=j["id"])
    except Exception as exc:  # noqa: BLE001 - the summary must not hide the job's own failure
        tail = f"(its log: {exc})\n"
    if tail:
        out += f"--- last lines of rank {first['rank']} ---\n{tail}" + ("" if tail.endswith("\n") else "\n")
    return out


#: what the API writes into a stream it ends after stream_max_seconds (not a byte of the log)
_STREAM_END = b"\n[hai: the stream ends after "


def _gone_on(jid: int) -> str:
    return f"\ninterrupted: job {jid} goes on (hai logs -f {jid} follows it again, hai stop {jid} stops it)"


def _stream(c, jid: int, rank: int, attempt: int, offset: int, err: bool) -> tuple[int, bool]:
    """Echo one stream of attempt ``attempt``'s log from ``offset``: (the offset after it, whether the
    API ended it for its age, stream_max_seconds)."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    last = b""
    for data in c.follow_log_bytes(jid, rank, attempt=attempt, offset=offset):
        offset += len(data)
        last = (last + data)[-512:]
        typer.echo(dec.decode(data), nl=False, err=err)
    typer.echo(dec.decode(b"", final=True), nl=False, err=err)
    i = last.rfind(_STREAM_END)
    if i >= 0 and last.endswith(b"]\n") and b"stream_max_seconds" in last[i:]:
        return offset - (len(last) - i), True
    return offset, False


def follow_chain(c, jid: int, rank: int = 0, *, err: bool = False, attempt: int | None = None,
                 offset: int = 0, pinned: bool = False, poll: float = 0.5) -> dict:
    """Echo a rank's log until the chain has finished (``pinned``: until that attempt's rank ends);
    the job's JSON at the end.

    [Note: following a chain] One stream is not the whole story: it ends when rank 0 ends while other
    ranks run on, when the attempt is suspended or preempted and the chain requeued (a new attempt
    writes a new log), or after the API's stream_max_seconds. So the follower loops: the same
    attempt's log again from the byte it reached (the API's end-of-stream note is not counted), the
    next attempt's from its start, or a quiet poll while only other ranks run. No fixed cap: the
    chain's end (or Ctrl-C) ends it."""
    import time

    j = c.job(jid)
    if attempt is None:
        attempt = j["id"]
    streaming = True
    while True:
        if streaming:
            offset, aged = _stream(c, jid, rank, attempt, offset, err)
            if aged:  # the same attempt's log goes on: follow again from where this stream ended
                continue
        else:
            time.sleep(poll)
        j = c.job(jid)
        finished = j["chain_status"] == "finished"
        if pinned:
            if j["id"] != attempt or finished or _rank_done(j, rank):
                return j
            time.sleep(poll)  # the rank has not started yet: do not spin on empty streams
            continue
        if j["id"] != attempt:  # suspended or preempted and requeued: the next attempt's log
            if not finished:
                typer.echo(f"[hai: job {jid} goes on as attempt {_job_label(j)} ({j['status']}): following it]",
                           err=True)
            attempt, offset, streaming = j["id"], 0, True
            continue
        if finished:
            return j
        # this rank ended while others run (wait for them, or for a requeue), or it has not started yet
        streaming = not _rank_done(j, rank)
        if streaming:
            time.sleep(poll)


def _rank_done(j: dict, rank: int) -> bool:
    from ..states import RankStatus

    r = next((r for r in j.get("ranks") or () if r["rank"] == rank), None)
    return r is not None and r["status"] in RankStatus.DONE


def _follow(c, j: dict, as_json: bool) -> None:
    """Stream rank 0's log (to stderr under --json) until the chain has finished, across suspends and
    requeues (:func:`follow_chain`); then the summary and the exit code.

    Ctrl-C ends only the following: the job goes on, and we say how to follow or stop it (exit 130)."""
    jid = j["chain_id"]
    try:
        final = follow_chain(c, jid, 0, err=as_json)
    except KeyboardInterrupt:
        typer.echo(_gone_on(jid), err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    ok = final["status"] == JobStatus.SUCCEEDED
    if as_json:
        typer.echo(json.dumps(final, indent=1))
    else:
        typer.echo(f"job {_job_label(final)} {final['status']} (exit code {final['exit_code']})", err=True)
        if not ok:
            typer.echo(_failure_summary(c, final), nl=False, err=True)
    if not ok:
        raise typer.Exit(EXIT_ERROR)


def _submit_and_show(spec: dict, follow: bool, as_json: bool) -> None:
    if follow and spec.get("array"):
        _fail(ValueError("--follow with --array: each task is a job of its own; submit without --follow, then "
                         "'hai list' or 'hai logs -f ID' of one task"), EXIT_USAGE)

    def go(c):
        j = c.submit(spec)
        if as_json and not follow:
            typer.echo(json.dumps(j, indent=1))
            return
        if j.get("array_tasks"):
            t = j["array_tasks"]
            typer.echo(f"submitted job array {j.get('array_id') or t[0]} ({j['name']}, {len(t)} task(s): jobs "
                       f"{_span(t)})", err=follow or as_json)
        else:
            typer.echo(f"submitted job {j['chain_id']} ({j['name']}, {j['nodes']} node(s))"
                       + (", held: hai release " + str(j["chain_id"]) if j.get("held") else ""), err=follow or as_json)
        if follow:
            _follow(c, j, as_json)
    _call(go)


def _span(ids: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5,9'."""
    out, i = [], 0
    while i < len(ids):
        k = i
        while k + 1 < len(ids) and ids[k + 1] == ids[k] + 1:
            k += 1
        out.append(str(ids[i]) if k == i else f"{ids[i]}-{ids[k]}")
        i = k + 1
    return ",".join(out)


class _RawArgs(TyperCommand):
    """Keeps the raw arguments (hai sim / hai local pass them on whole)."""

    def parse_args(self, ctx, args):
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


@app.command("run")
def run_cmd(job_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="job.yaml"),
            follow: bool = typer.Option(False, "--follow", "-f", help="follow rank 0's log until the job ends (each restart's too)"),
            as_json: bool = JsonOpt) -> None:
    """Submit a job described in YAML (keys: name, command, nodes, procs_per_node, priority, env, workdir,
    time_limit (seconds), grace, watchdog)."""
    import os
    import shlex

    import yaml

    try:
        spec = yaml.safe_load(job_file.read_text())
    except yaml.YAMLError as exc:
        _fail(ValueError(f"{job_file}: not valid YAML: {exc}"))
    if not isinstance(spec, dict):
        _fail(ValueError(f"{job_file}: expected a mapping of job fields, got {type(spec).__name__}"))
    if isinstance(spec.get("command"), str):
        spec["command"] = shlex.split(spec["command"])
    spec.setdefault("workdir", os.getcwd())
    _submit_and_show(spec, follow, as_json)


@app.command("status")
def status_cmd(job: str = typer.Argument(..., help="CHAIN or CHAIN.RESTART (as 'hai list' shows)"),
               as_json: bool = JsonOpt) -> None:
    """One job: its latest attempt (or CHAIN.RESTART's), its ranks and where they run, and the chain's
    restart history (each attempt: status, why it ended, nodes, start, end, run time)."""
    chain, restart = _ref(job)
    j = _call(lambda c: c.job(chain))
    for a in j.get("attempts") or ():
        a.setdefault("chain_id", j["chain_id"])
    a = _attempt(j, restart)
    if a is not None:
        _out(a, as_json, lambda a: _attempt_detail(j, a))
    else:
        _out(j, as_json, _job_detail)


@app.command("list")
def list_cmd(all_users: bool = typer.Option(False, "--all", help="every user's jobs (admins)"),
             status: str = typer.Option(None, help="only this status"),
             limit: int = typer.Option(50, help="at most this many, newest first"), as_json: bool = JsonOpt) -> None:
    """Your jobs (and those shared with your group), newest first.

    ID is CHAIN, or CHAIN.RESTART after a restart. For a queued job, POS is its place in the queue (1: the
    next to start) and WHERE / WHY says why it waits (see docs/haiplatform.md, "Why a job waits")."""
    _out(_call(lambda c: c.jobs(all_users=all_users, status=status, limit=limit)), as_json, _jobs_table)


@app.command("logs")
def logs_cmd(job: str = typer.Argument(..., help="CHAIN or CHAIN.RESTART"),
             follow: bool = typer.Option(False, "--follow", "-f", help="keep streaming until the job ends (each restart's log in turn; of CHAIN.RESTART: that attempt only)"),
             rank: int = typer.Option(0, "--rank", "-r", help="which rank"),
             tail: int = typer.Option(None, "--tail", "-n", help="only the last N lines"),
             attempt: int = typer.Option(None, "--attempt", hidden=True,
                                         help="an attempt's row id ($HAI_ATTEMPT_ID); prefer CHAIN.RESTART")
             ) -> None:
    """A rank's whole output (stdout and stderr) of the job's latest attempt, or of CHAIN.RESTART."""
    chain, restart = _ref(job)
    if tail is not None and tail < 1:
        _fail(ValueError(f"--tail {tail}: give 1 or more lines"), EXIT_USAGE)

    def go(c):
        nonlocal attempt
        pinned = attempt is not None or restart is not None  # CHAIN.RESTART, --attempt: that attempt only
        if restart is not None:
            j = c.job(chain)
            a = _attempt(j, restart)
            attempt = a["id"] if a is not None else j["id"] if follow else None
        if follow:
            _follow_logs(c, chain, rank, attempt, tail, pinned)
        elif tail:
            typer.echo(_log_tail(c, chain, rank, tail, attempt=attempt), nl=False)
        else:
            typer.echo(c.logs(chain, rank, attempt=attempt), nl=False)
    _call(go)


def _follow_logs(c, chain: int, rank: int, attempt: int | None, tail: int | None, pinned: bool) -> None:
    """hai logs -f: from the start (or the last ``tail`` lines) of the latest attempt's log, following
    the chain's next attempts; of a given attempt (CHAIN.RESTART, --attempt), that attempt only."""
    try:
        offset = 0
        if tail:  # the tail, then on from where it ends (of the same attempt)
            if attempt is None:
                attempt = c.job(chain)["id"]
            data, _size, offset = c._log_page(chain, {"rank": rank, "attempt": attempt, "tail": tail})
            typer.echo(data.decode(errors="replace"), nl=False)
        follow_chain(c, chain, rank, attempt=attempt, offset=offset, pinned=pinned)
    except KeyboardInterrupt:
        typer.echo(_gone_on(chain), err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command("stop")
def stop_cmd(job: str = typer.Argument(..., help="CHAIN"), as_json: bool = JsonOpt) -> None:
    """Stop a job (cancel it if it is still queued). Many at once: hai cancel."""
    chain, _ = _ref(job)
    _out(_call(lambda c: c.stop(chain)), as_json, lambda j: typer.echo(f"stopping job {chain}"))


@app.command("suspend")
def suspend_cmd(job: str = typer.Argument(..., help="CHAIN"), as_json: bool = JsonOpt) -> None:
    """Suspend a running job: it is stopped and re-queued, keeping its place."""
    chain, _ = _ref(job)
    _out(_call(lambda c: c.suspend(chain)), as_json, lambda j: typer.echo(f"suspending job {chain}"))


@app.command("priority")
def priority_cmd(job: str = typer.Argument(..., help="CHAIN"),
                 level: str = typer.Argument(..., help="a level name, 0..50, or auto"),
                 as_json: bool = JsonOpt) -> None:
    """Change a live job's priority (yours; admins: any). Its later attempts start from it too."""
    chain, _ = _ref(job)
    _out(_call(lambda c: c.set_priority(chain, level)), as_json,
         lambda j: typer.echo(f"job {j['chain_id']}: priority {_prio(j)}"))


_PASS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("sim", cls=_RawArgs, context_settings=_PASS, add_help_option=False)
def sim_cmd(ctx: typer.Context) -> None:
    """Simulate a scheduling policy on a trace: hai sim --cluster FILE --trace FILE.csv --policy NAME
    (hai sim --help: every option; docs/scheduling.md)."""
    from .. import sim

    raise typer.Exit(sim.main(ctx.meta["raw_args"]) or 0)


@app.command("local", cls=_RawArgs, context_settings=_PASS, add_help_option=False)
def local_cmd(ctx: typer.Context) -> None:
    """Run a command here as a job would run (job environment, simulated suspends and resumes):
    hai local [--suspend-after N] -- CMD (hai local --help: every option)."""
    from .. import job

    raise typer.Exit(job.local_main(ctx.meta["raw_args"]) or 0)
