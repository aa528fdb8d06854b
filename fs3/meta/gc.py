"""The metadata service's background worker: prune expired sessions, remove unlinked files' chunks.

Every ``interval`` seconds (or at once when woken: an unlink, a close of an unlinked file):

1. sessions not renewed within ``session_ttl`` are closed as a close with ``wrote=True`` would
   (a write session's file gets its exact length from storage), so a crashed client's files end
   where their data ends and their unlinked files become collectable;
2. inodes whose link count reached 0, unlinked at least ``gc_delay`` seconds ago (at once when
   less than 5% of the storage is free, as 3FS does) and with no session left, lose their chunks
   (``fs3.meta.length``) and then their rows.

Several meta servers on one database may run it at once: both steps are idempotent (a chunk
removed twice is gone; the rows go in one transaction that re-checks for sessions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import Fs3Error
from .length import LengthProbe
from .perm import ROOT_USER
from .store import MetaStore

__all__ = ["GcWorker"]

log = logging.getLogger(__name__)


class GcWorker:
    def __init__(self, store: MetaStore, probe: LengthProbe | None, *, gc_delay: float, interval: float = 1.0,
                 space_short: Callable[[], bool] | None = None) -> None:
        self.store = store
        self.probe = probe
        self.gc_delay = gc_delay
        self.space_short = space_short  # true: storage is nearly full, collect without the delay
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"pruned_sessions": 0, "collected": 0, "errors": 0}

    def start(self) -> GcWorker:
        self._thread = threading.Thread(target=self._loop, name="fs3-meta-gc", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.run_once()
            except Exception as exc:  # a storage or database hiccup: try again next round
                self.stats["errors"] += 1
                log.warning("meta gc: a pass failed (retrying in %.1f s): %s", self.interval, exc)

    def run_once(self) -> tuple[int, int]:
        """One pass: ``(sessions pruned, inodes collected)``."""
        pruned = 0
        for s in self.store.expired_sessions():
            length = None
            if s["write"] and self.probe is not None:
                try:
                    length = self.probe.exact_length(s["ino"], self.store.layout_of(s["ino"]))
                except Fs3Error as exc:
                    log.warning("meta gc: session %s of inode %d expired, but its length is unknown (%s); "
                                "retrying later", s["id"], s["ino"], exc)
                    continue
            try:
                self.store.close(ROOT_USER, ino=s["ino"], session=s["id"], wrote=bool(s["write"]),
                                 storage_length=length)
            except Fs3Error as exc:  # the inode is gone: the session goes with it
                log.info("meta gc: expired session %s of inode %d: %s", s["id"], s["ino"], exc)
                self.store.drop_session(s["id"])
            pruned += 1
            log.info("meta gc: pruned expired session %s of inode %d (client %s)", s["id"], s["ino"], s["client"])
        collected = 0
        waiting = self.store.gc_waiting()
        due = time.time() - self.gc_delay
        if any(since > due for _i, _l, since in waiting) and self.space_short is not None and self.space_short():
            due = float("inf")  # nearly full: no delay (asked only when something waits for it)
        for ino, layout, since in waiting:
            if since > due:
                continue
            if self.probe is not None and layout:
                self.probe.remove_all(ino, layout)
            if self.store.gc_done(ino):
                collected += 1
        self.stats["pruned_sessions"] += pruned
        self.stats["collected"] += collected
        return pruned, collected
