"""Job commands: submit (python, exec, bash, run), follow (status, list, logs), control (stop, suspend,
priority), and the local tools (sim, local)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.core import TyperCommand

from ..states import JobStatus
from .app import JsonOpt, _ago, _call, _clock, _fail, _hms, _out, _prio, _status_color, app


def _jobs_table(jobs: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("id", "name", "user", "nodes", "prio", "status", "pos", "where / why", "submitted")
    for j in jobs:
        where = ",".join(j["assigned_nodes"]) if j["assigned_nodes"] else j["reason"]
        st = j["status"] + (f" ({j['exit_code']})" if j["exit_code"] not in (None, 0) else "")
        t.add_row(str(j["chain_id"]) + (f".{j['restart_count']}" if j["restart_count"] else ""), j["name"], j["user"],
                  str(j["nodes"]), _prio(j), f"[{_status_color(j['status'])}]{st}[/]",
                  "" if j.get("position") is None else str(j["position"]), where or "",
                  _ago(j.get("submitted_at") or j["created_at"]))
    Console().print(t)



def _history(con, attempts: list[dict]) -> None:
    """The chain's restart history: one row per attempt."""
    from rich.table import Table

    t = Table("attempt", "id", "status", "why it ended", "nodes", "started", "ended", "ran")
    for a in attempts:
        why = a["reason"] if a["status"] in JobStatus.DONE else ""
        t.add_row(str(a["restart_count"]), str(a["id"]), f"[{_status_color(a['status'])}]{a['status']}[/]",
                  (f"{a['stop']}: " if a["stop"] != "-" else "") + why if why else "",
                  ",".join(a["nodes"] or ()), _clock(a["started_at"] or a["scheduled_at"]), _clock(a["finished_at"]),
                  _hms(a["run_s"]))
    con.print(t)


def _job_detail(j: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"job [bold]{j['chain_id']}[/] {j['name']} (attempt {j['id']}, restart {j['restart_count']}) "
              f"user {j['user']}: [{_status_color(j['status'])}]{j['status']}[/]"
              + (f", exit code {j['exit_code']}" if j["exit_code"] is not None else "")
              + (f" - {j['reason']}" if j["reason"] else ""))
    con.print(f"  command: {' '.join(j['command'])}")
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


# -- jobs -------------------------------------------------------------------------------------------

def _parse_submit_opts(opts: list[str]) -> dict:
    import argparse

    ap = argparse.ArgumentParser(prog="hai python SCRIPT [ARGS] --", add_help=False, exit_on_error=False)
    ap.add_argument("-n", "--nodes", type=int, default=1)
    ap.add_argument("-p", "--priority", default="normal")
    ap.add_argument("-t", "--time", default=None)
    ap.add_argument("--grace", type=float, default=0.0)
    ap.add_argument("--watchdog", type=float, default=0.0)
    ap.add_argument("--name", default=None)
    ap.add_argument("--procs-per-node", type=int, default=0)
    ap.add_argument("-e", "--env", action="append", default=[])
    ap.add_argument("--shared", action="store_true")
    ap.add_argument("-f", "--follow", action="store_true")
    ap.add_argument("--json", action="store_true")
    try:
        ns, extra = ap.parse_known_args(opts)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise typer.BadParameter(f"after '--': {exc}") from None
    if extra:
        raise typer.BadParameter(f"after '--': unknown option(s) {' '.join(extra)} (known: --nodes N, --priority P, "
                                 "--time T, --grace S, --watchdog S, --name X, --procs-per-node K, --env K=V, "
                                 "--shared, --follow, --json)")
    try:
        time_limit = parse_time(ns.time) if ns.time else 0.0
    except ValueError as exc:
        raise typer.BadParameter(f"after '--': {exc}") from None
    env = {}
    for kv in ns.env:
        if "=" not in kv:
            raise typer.BadParameter(f"--env {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        env[k] = v
    return {"nodes": ns.nodes, "priority": ns.priority, "name": ns.name, "procs_per_node": ns.procs_per_node,
            "env": env, "shared_in_group": ns.shared, "time_limit": time_limit, "grace": ns.grace,
            "watchdog": ns.watchdog, "_follow": ns.follow, "_json": ns.json}


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


def _limits(o: dict) -> dict:
    return {k: o[k] for k in ("time_limit", "grace", "watchdog")}


def _submit_and_show(spec: dict, follow: bool, as_json: bool) -> None:
    def go(c):
        j = c.submit(spec)
        if as_json and not follow:
            typer.echo(json.dumps(j, indent=1))
            return
        typer.echo(f"submitted job {j['id']} ({j['name']}, {j['nodes']} node(s))", err=follow)
        if follow:
            for chunk in c.follow_logs(j["id"], 0):
                typer.echo(chunk, nl=False)
            final = c.wait(j["id"], timeout=60)
            typer.echo(f"job {final['chain_id']} {final['status']} (exit code {final['exit_code']})", err=True)
            if final["status"] != JobStatus.SUCCEEDED:
                raise typer.Exit(1)
    _call(go)


class _RawArgs(TyperCommand):
    """Keeps the raw arguments: click drops the '--' that separates the program's args from ours."""

    def parse_args(self, ctx, args):
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


def _split_raw(ctx: typer.Context) -> tuple[list[str], list[str]]:
    raw = ctx.meta.get("raw_args", [])[1:]  # [0] is the script / program
    if "--" in raw:
        i = raw.index("--")
        return raw[:i], raw[i + 1:]
    return raw, []


_RAW = {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False}


def _submit_cmd(ctx: typer.Context, name: str, command: list[str], script: str | None = None) -> None:
    """The submit commands' common part: parse the options after '--', build the job, submit it."""
    import os

    args, ours = _split_raw(ctx)
    o = _parse_submit_opts(ours)
    if script is not None and not Path(script).exists():
        _fail(FileNotFoundError(f"no such script {script!r} (relative to {os.getcwd()})"))
    spec = {"name": o["name"] or name, "command": [*command, *args], "nodes": o["nodes"], "priority": o["priority"],
            "procs_per_node": o["procs_per_node"], "env": o["env"], "workdir": os.getcwd(),
            "shared_in_group": o["shared_in_group"], **_limits(o)}
    _submit_and_show(spec, o["_follow"], o["_json"])


@app.command("python", cls=_RawArgs, context_settings=_RAW)
def python_cmd(ctx: typer.Context, script: str = typer.Argument(..., help="the training script")) -> None:
    """Submit `python SCRIPT ARGS` as a job: hai python train.py --lr 1 -- --nodes 2 --name x [--follow].

    Options after '--': --nodes N, --priority P (a level name, 0..50 or auto), --time T (each attempt's run
    time limit, Slurm formats: MM, MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS), --grace S (seconds to save after
    acknowledging a suspend), --watchdog S (stop as hung after S seconds without output), --name X,
    --procs-per-node K, --env K=V, --shared, --follow, --json."""
    import sys

    _submit_cmd(ctx, Path(script).stem, [sys.executable, "-u", script], script)


@app.command("exec", cls=_RawArgs, context_settings=_RAW)
def exec_cmd(ctx: typer.Context, program: str = typer.Argument(..., help="a program on the nodes' PATH")) -> None:
    """Submit any program as a job: hai exec true -- --nodes 1 --time 30:00 -p auto (options: see 'hai python')."""
    _submit_cmd(ctx, Path(program).name, [program])


@app.command("bash", cls=_RawArgs, context_settings=_RAW)
def bash_cmd(ctx: typer.Context, script: str = typer.Argument(..., help="a shell script")) -> None:
    """Submit `bash SCRIPT ARGS` as a job: hai bash run.sh -- --nodes 2 --time 1:00:00 (options: see 'hai python')."""
    _submit_cmd(ctx, Path(script).stem, ["bash", script], script)


@app.command("run")
def run_cmd(job_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="job.yaml"),
            follow: bool = typer.Option(False, "--follow", "-f", help="follow rank 0's log until the end"),
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
def status_cmd(job_id: int, as_json: bool = JsonOpt) -> None:
    """One job: its latest attempt, its ranks and where they run, and the chain's restart history
    (each attempt: status, why it ended, nodes, start, end, run time)."""
    _out(_call(lambda c: c.job(job_id)), as_json, _job_detail)


@app.command("list")
def list_cmd(all_users: bool = typer.Option(False, "--all", help="every user's jobs (admins)"),
             status: str = typer.Option(None, help="only this status"),
             limit: int = typer.Option(50, help="at most this many, newest first"), as_json: bool = JsonOpt) -> None:
    """Your jobs (and those shared with your group), newest first.

    For a queued job, POS is its place in the queue (1: the next to start) and WHERE / WHY says why it
    waits (see docs/haiplatform.md, "Why a job waits")."""
    _out(_call(lambda c: c.jobs(all_users=all_users, status=status, limit=limit)), as_json, _jobs_table)


@app.command("logs")
def logs_cmd(job_id: int, follow: bool = typer.Option(False, "--follow", "-f", help="keep streaming until it ends"),
             rank: int = typer.Option(0, "--rank", "-r", help="which rank"),
             attempt: int = typer.Option(None, "--attempt", help="an earlier attempt's id (default: the latest)")
             ) -> None:
    """A rank's output (stdout and stderr) of the job's latest attempt."""
    def go(c):
        if follow:
            for chunk in c.follow_logs(job_id, rank):
                typer.echo(chunk, nl=False)
        else:
            typer.echo(c.logs(job_id, rank, attempt=attempt), nl=False)
    _call(go)


@app.command("stop")
def stop_cmd(job_id: int, as_json: bool = JsonOpt) -> None:
    """Stop a job (cancel it if it is still queued)."""
    _out(_call(lambda c: c.stop(job_id)), as_json, lambda j: typer.echo(f"stopping job {job_id}"))


@app.command("suspend")
def suspend_cmd(job_id: int, as_json: bool = JsonOpt) -> None:
    """Suspend a running job: it is stopped and re-queued, keeping its place."""
    _out(_call(lambda c: c.suspend(job_id)), as_json, lambda j: typer.echo(f"suspending job {job_id}"))


@app.command("priority")
def priority_cmd(job_id: int, level: str = typer.Argument(..., help="a level name, 0..50, or auto"),
                 as_json: bool = JsonOpt) -> None:
    """Change a live job's priority (yours; admins: any). Its later attempts start from it too."""
    _out(_call(lambda c: c.set_priority(job_id, level)), as_json,
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
