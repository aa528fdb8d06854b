"""The ``fs3`` command (admin and user tools for the fs3 storage cluster)."""

from __future__ import annotations

import typer

app = typer.Typer(help="fs3: the fireflyer storage cluster (3FS-style). Commands arrive with the fs3 issues.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """fs3: the fireflyer storage cluster."""


@app.command()
def version() -> None:
    """Print the fs3 version."""
    from importlib.metadata import version as v

    typer.echo(f"fs3 (fireflyer {v('fireflyer')})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
