"""Who am I, saving a token (init), and the admin commands: nodes, quotas, users, the database."""

from __future__ import annotations

import json

import typer

from .app import EXIT_USAGE, JsonOpt, _call, _config_path, _fail, _out, app


@app.command("whoami")
def whoami_cmd(as_json: bool = JsonOpt) -> None:
    """Who your token belongs to."""
    _out(_call(lambda c: c.whoami()), as_json,
         lambda u: typer.echo(f"{u['name']} ({u['role']}" + (f", group {u['group']})" if u["group"] else ")")))


@app.command("init")
def init_cmd(token: str = typer.Argument(None, help="the token; --token-file is safer (a command line is "
                                                    "readable by every local user in /proc)"),
             url: str = typer.Option(..., "--url", help="the API URL"),
             token_file: str = typer.Option(None, "--token-file", metavar="FILE",
                                            help="read the token from FILE ('-': standard input)"),
             check: bool = typer.Option(True, "--check/--no-check", help="ask the API who the token is first"),
             as_json: bool = JsonOpt) -> None:
    """Check the token against the API (whoami), then save it and the URL to ~/.config/hai/config.json
    (mode 0600). A wrong URL or token is said and nothing is saved (--no-check saves without asking).
    Give the token with --token-file FILE or --token-file - (standard input) rather than on the command
    line: hai init --url URL --token-file ~/admin.token."""
    import os

    from ..client import HaiClient
    from ..errors import AuthError, HaiError

    token = _token_of(token, token_file)
    who = None
    if check:
        try:
            with HaiClient(url, token, timeout=10) as c:
                who = c.whoami()
        except AuthError as exc:
            _fail(AuthError(f"the API at {url} refused the token ({exc}); nothing saved", exc.status))
        except HaiError as exc:
            _fail(type(exc)(f"cannot check the token at {url}: {exc}; nothing saved (--no-check saves anyway)"))
    p = _config_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token}, f)
    if as_json:
        typer.echo(json.dumps({"saved": str(p), "user": who}))
    else:
        typer.echo(f"saved to {p}" + (f" ({who['name']}, {who['role']})" if who else " (not checked)"))


def _token_of(token: str | None, token_file: str | None) -> str:
    """The token from the argument or from --token-file (a file, or '-' for standard input): exactly one."""
    import sys
    from pathlib import Path

    if (token is None) == (token_file is None):
        _fail(ValueError("give the token either as TOKEN or with --token-file FILE ('-': standard input), "
                         "not both or neither"), EXIT_USAGE)
    if token_file is None:
        return token.strip()
    try:
        text = sys.stdin.read() if token_file == "-" else Path(token_file).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(ValueError(f"--token-file {token_file}: cannot read it: {exc}"), EXIT_USAGE)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        _fail(ValueError(f"--token-file {token_file}: expected one line holding the token, found {len(lines)}"),
              EXIT_USAGE)
    return lines[0]


# -- admin ------------------------------------------------------------------------------------------

admin_app = typer.Typer(help="Admin: nodes, quotas, users, groups.", no_args_is_help=True)
node_app = typer.Typer(help="Drain or return nodes.", no_args_is_help=True)
quota_app = typer.Typer(help="Per user / group and priority node quotas.", no_args_is_help=True)
user_app = typer.Typer(help="Users and their tokens.", no_args_is_help=True)
db_app = typer.Typer(help="The scheduler database.", no_args_is_help=True)
group_app = typer.Typer(help="Groups: who shares jobs and group quotas.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
admin_app.add_typer(node_app, name="node")
admin_app.add_typer(quota_app, name="quota")
admin_app.add_typer(user_app, name="user")
admin_app.add_typer(db_app, name="db")
admin_app.add_typer(group_app, name="group")


@node_app.command("drain")
def node_drain(node: str, reason: str = typer.Option("", help="why"), as_json: bool = JsonOpt) -> None:
    """No new job starts on NODE (running ones finish)."""
    _out(_call(lambda c: c.drain(node, reason)), as_json, lambda n: typer.echo(f"{node} drained"))


@node_app.command("undrain")
def node_undrain(node: str, as_json: bool = JsonOpt) -> None:
    """NODE takes jobs again."""
    _out(_call(lambda c: c.undrain(node)), as_json, lambda n: typer.echo(f"{node} undrained"))


@quota_app.command("set")
def quota_set(subject: str = typer.Argument(..., help="user:NAME or group:NAME"),
              max_nodes: int = typer.Argument(..., help="nodes at most"),
              priority: int = typer.Option(None, help="only at this priority (default: any)"),
              as_json: bool = JsonOpt) -> None:
    """Set a quota: SUBJECT may hold at most MAX_NODES nodes (at PRIORITY, or at all)."""
    _out(_call(lambda c: c.set_quota(subject, max_nodes, priority)), as_json,
         lambda q: typer.echo(f"quota {subject} priority {priority if priority is not None else 'any'}: {max_nodes}"))


@quota_app.command("list")
def quota_list(as_json: bool = JsonOpt) -> None:
    """Every quota."""
    def render(qs):
        for q in qs:
            typer.echo(f"{q['subject']:30} priority {q['priority'] if q['priority'] is not None else 'any':>4}  "
                       f"{q['max_nodes']} nodes")
    _out(_call(lambda c: c.quotas()), as_json, render)


@quota_app.command("delete")
def quota_delete(subject: str = typer.Argument(..., help="user:NAME or group:NAME"),
                 priority: int = typer.Option(None, help="only the quota at this priority (default: the any-priority "
                                              "one)"), as_json: bool = JsonOpt) -> None:
    """Remove a quota."""
    _out(_call(lambda c: c.delete_quota(subject, priority)), as_json,
         lambda q: typer.echo(f"quota {subject} priority {priority if priority is not None else 'any'} deleted"))


@user_app.command("add")
def user_add(name: str, role: str = typer.Option("user", help="user or admin"),
             group: str = typer.Option(None, help="the user's group"), as_json: bool = JsonOpt) -> None:
    """Add a user; prints their token (shown once)."""
    _out(_call(lambda c: c.add_user(name, role, group)), as_json,
         lambda u: typer.echo(f"user {u['name']} ({u['role']}) token: {u['token']}"))


@user_app.command("list")
def user_list(as_json: bool = JsonOpt) -> None:
    """Every user."""
    _out(_call(lambda c: c.users()), as_json,
         lambda us: [typer.echo(f"{u['name']:20} {u['role']:6} {u['group'] or '-':12}"
                                + (" disabled" if u.get("disabled") else "")) for u in us])


@user_app.command("remove")
def user_remove(name: str, force: bool = typer.Option(False, "--force", help="stop the user's live jobs first"),
                as_json: bool = JsonOpt) -> None:
    """Remove a user (refused while they have live jobs, unless --force stops them)."""
    _out(_call(lambda c: c.remove_user(name, force=force)), as_json, lambda _: typer.echo(f"user {name} removed"))


@user_app.command("disable")
def user_disable(name: str, as_json: bool = JsonOpt) -> None:
    """Disable a user: their token is refused; their queued jobs stay queued but do not start."""
    _out(_call(lambda c: c.disable_user(name)), as_json, lambda _: typer.echo(f"user {name} disabled"))


@user_app.command("enable")
def user_enable(name: str, as_json: bool = JsonOpt) -> None:
    """Enable a disabled user again."""
    _out(_call(lambda c: c.enable_user(name)), as_json, lambda _: typer.echo(f"user {name} enabled"))


@user_app.command("token")
def user_token(name: str, as_json: bool = JsonOpt) -> None:
    """Give a user a new token (shown once); the old one stops working."""
    _out(_call(lambda c: {"name": name, "token": c.reset_token(name)}), as_json,
         lambda r: typer.echo(f"user {name} new token: {r['token']}"))


@group_app.command("list")
def group_list(as_json: bool = JsonOpt) -> None:
    """Every group and its members."""
    _out(_call(lambda c: c.groups()), as_json,
         lambda gs: [typer.echo(f"{g['name']:20} {' '.join(g['members']) or '-'}") for g in gs])


@group_app.command("set")
def group_set(user: str, group: str = typer.Argument(None, help="the group (leave out: no group)"),
              as_json: bool = JsonOpt) -> None:
    """Put USER in GROUP (or in none)."""
    _out(_call(lambda c: c.set_group(user, group)), as_json,
         lambda _: typer.echo(f"user {user}: group {group or '-'}"))


@group_app.command("delete")
def group_delete(group: str, as_json: bool = JsonOpt) -> None:
    """Delete an empty group (and its quotas)."""
    _out(_call(lambda c: c.delete_group(group)), as_json, lambda _: typer.echo(f"group {group} deleted"))


@db_app.command("upgrade")
def db_upgrade(db_url: str = typer.Option(..., "--db-url", help="sqlite:///PATH or postgresql+psycopg://...")) -> None:
    """Migrate a database to the current schema (the API server also does it at start)."""
    from ..db import Database, migrate
    from ..errors import HaiError

    try:
        migrate(db_url)
        typer.echo(f"at revision {Database(db_url).revision()}")
    except HaiError as exc:
        _fail(exc)
