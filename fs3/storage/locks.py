"""Per-chunk locks of a storage server: every update, repair, scrub read and resync copy of a
chunk holds its lock.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from ..errors import ChunkBusy

__all__ = ["ChunkLocks"]


class ChunkLocks:
    """One lock per (target, chain, chunk), created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple, list] = {}  # key -> [lock, users]

    @contextmanager
    def hold(self, key: tuple, timeout: float):
        with self._guard:
            ent = self._locks.get(key)
            if ent is None:
                ent = self._locks[key] = [threading.Lock(), 0]
            ent[1] += 1
        try:
            if not ent[0].acquire(timeout=timeout):
                raise ChunkBusy(f"chunk {key[1]}/{key[2]:016x} on target {key[0]} stayed locked for {timeout} s")
            try:
                yield
            finally:
                ent[0].release()
        finally:
            with self._guard:
                ent[1] -= 1
                if ent[1] == 0:
                    self._locks.pop(key, None)
