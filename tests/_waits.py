"""Helpers the tests share: bounded polling and finding processes by their command line."""

from __future__ import annotations

import os
from pathlib import Path

from deploy.local import wait_until as _wait_until


def wait_until(pred, timeout: float = 30.0, what: str = "condition", poll: float = 0.05):
    """Call ``pred`` until it returns something true (returned) or ``timeout`` seconds passed
    (AssertionError naming ``what``): :func:`deploy.local.wait_until`, failing as a test does."""
    return _wait_until(pred, timeout, what, poll, error=AssertionError)


def procs_mentioning(text: str) -> list[int]:
    """Pids of live (not zombie) processes, other than this one, whose command line contains ``text``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if text in cmd and state != "Z" and int(d.name) != os.getpid():
            out.append(int(d.name))
    return out
