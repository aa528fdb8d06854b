"""The ``hai`` command: researchers submit and follow jobs; admins run the cluster.

One module per group of commands, all on one typer app (:mod:`.app`, which also holds the connection
options and output helpers): :mod:`.cluster` (``hai cluster``), :mod:`.jobs` (submitting and following
jobs), :mod:`.nodes` (``hai nodes``), :mod:`.admin` (``hai whoami``, ``hai init``, ``hai admin``)."""

from __future__ import annotations

# isort: off
from . import jobs, nodes, admin, cluster  # noqa: F401 - each registers its commands on app, in this order
# isort: on
from .app import app
from .jobs import parse_time

__all__ = ["app", "main", "parse_time"]


def main() -> None:
    app()
