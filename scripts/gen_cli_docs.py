"""Write docs/cli.md, the reference of every ``hai`` command, from the typer commands themselves.

    .venv/bin/python scripts/gen_cli_docs.py          # rewrite docs/cli.md
    .venv/bin/python scripts/gen_cli_docs.py --check  # exit 1 when docs/cli.md is out of date

tests/test_docs.py runs the check, so a new option cannot be left out of the page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "cli.md"

HEAD = """# `hai` command reference

Generated from the commands by `scripts/gen_cli_docs.py` (do not edit by hand; `hai COMMAND --help` says
the same). How to connect, the job environment and the Slurm names are in [architecture.md](architecture.md)
and [slurm.md](slurm.md).

Job ids: a job is its chain, `CHAIN` (what `hai list` shows); `CHAIN.RESTART` names one attempt of it
(`12.1`: job 12 after one restart). `hai status 12.1` and `hai logs 12.1` take either.

Exit codes: `0` done; `1` the request failed (refused, not found, unreachable) or the followed job did
not succeed; `2` bad usage (an unknown option, a bad value); `130` interrupted (Ctrl-C while following:
the job goes on). With `--json` every error is one JSON object on stdout, `{"error": TEXT, "status":
HTTP status or 0}`, with the same exit code.
"""


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def _param_rows(cmd) -> list[str]:
    rows = []
    for p in cmd.params:
        if getattr(p, "hidden", False) or p.name == "help":
            continue
        if p.param_type_name == "argument":
            name = f"`{(p.metavar or p.name).upper()}`"
        else:
            name = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        default = p.default
        extra = ""
        if p.required:
            extra = " (required)"
        elif default not in (None, False, "", ()) and not callable(default):
            extra = f" (default: {default})"
        envvar = getattr(p, "envvar", None)
        if envvar:
            extra += f" (env: `${envvar}`)"
        rows.append(f"| {name} | {_clean(getattr(p, 'help', '') or '')}{extra} |".replace("|  |", "| |"))
    return rows


def _walk(cmd, path: list[str], out: list[str]) -> None:
    if path:
        out.append(f"\n{'#' * min(len(path) + 2, 5)} `hai {' '.join(path)}`\n")
        doc = (cmd.help or "").strip()
        if doc:
            out.append("\n".join(line.strip() for line in doc.splitlines()).strip() + "\n")
        rows = _param_rows(cmd)
        if rows:
            out.append("| argument / option | meaning |\n|---|---|")
            out.extend(rows)
    if hasattr(cmd, "commands"):  # a group
        for name in cmd.commands:  # registration order
            sub = cmd.commands[name]
            if not getattr(sub, "hidden", False):
                _walk(sub, [*path, name], out)


def render() -> str:
    import typer

    from haiplatform.cli import PANELS, app

    root = typer.main.get_command(app)
    out = [HEAD, "## Connection (every command)\n", "| option | meaning |\n|---|---|", *_param_rows(root)]
    for panel, names in PANELS.items():
        out.append(f"\n## {panel}")
        for name in names:
            if name in root.commands:
                _walk(root.commands[name], [name], out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs from the commands")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run .venv/bin/python scripts/gen_cli_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
