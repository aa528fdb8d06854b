"""Helpers the tests share: bounded polling and finding processes by their command line."""

from __future__ import annotations

import os
import time
from pathlib import Path


def wait_until(pred, timeout: float = 30.0, what: str = "condition", poll: float = 0.05):
    """Call ``pred`` until it returns something true (returned) or ``timeout`` seconds passed
    (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


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
