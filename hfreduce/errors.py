"""The exceptions of hfreduce, grouped by theme.

    HFReduceError               base: a collective or the group failed; names the failed peer
    ├── InitError               the group could not be formed (environment, rendezvous, shm)
    ├── PeerFailed              a peer process died, left the group or closed its connection
    ├── HFReduceTimeout         a peer made no progress within the group's timeout (stuck or slow)
    ├── MismatchError           ranks called different collectives, sizes, dtypes, ops or roots
    ├── InvalidArgument         a buffer, dtype or argument this rank passed cannot be used
    └── DeviceError             a device copy (D2H / H2D) failed, or the device backend is unavailable

Every error raised by a collective after a failure names the rank and the node of the peer at
fault (``rank`` and ``node``; None when no single peer is to blame) and the rank that noticed.
Once a group has failed, every later call on it raises the same error: destroy it and form a new
one (``hfreduce.destroy(); hfreduce.init()``), usually by restarting the job.
"""

from __future__ import annotations

__all__ = ["HFReduceError", "InitError", "PeerFailed", "HFReduceTimeout", "MismatchError", "InvalidArgument",
           "DeviceError"]


class HFReduceError(RuntimeError):
    """A collective or the process group failed. ``rank`` / ``node``: the failed peer, if known."""

    def __init__(self, message: str, *, rank: int | None = None, node: str | None = None,
                 detected_by: int | None = None) -> None:
        self.rank = rank
        self.node = node
        self.detected_by = detected_by
        super().__init__(message)


class InitError(HFReduceError):
    """The group could not be formed: bad environment, unreachable master, shared memory refused."""


class PeerFailed(HFReduceError):
    """A peer process died, left the group (destroy) or closed its connection mid-collective."""


class HFReduceTimeout(HFReduceError, TimeoutError):
    """A peer made no progress within the timeout (stuck, stopped, or far behind the others)."""


class MismatchError(HFReduceError):
    """Ranks called different collectives, or with different sizes, dtypes, ops or roots."""


class InvalidArgument(HFReduceError, ValueError):
    """This rank passed a buffer, dtype or argument that cannot be used (nothing was sent)."""


class DeviceError(HFReduceError):
    """A device copy (D2H or H2D) failed, or the device backend cannot run here (says why)."""


#: Error kinds as they travel between processes (shared memory, abort frames).
KINDS: dict[str, type[HFReduceError]] = {
    "error": HFReduceError,
    "dead": PeerFailed,
    "timeout": HFReduceTimeout,
    "mismatch": MismatchError,
    "init": InitError,
    "device": DeviceError,
}
KIND_CODES = {name: i for i, name in enumerate(KINDS)}


def kind_of(err: HFReduceError) -> str:
    """``err``'s kind as it travels (a key of KINDS; "error" for any other class)."""
    return next((name for name, cls in KINDS.items() if type(err) is cls), "error")


def error_to_wire(err: HFReduceError) -> dict:
    """``err`` as a message for another process (an ABORT between leaders or down a lane)."""
    return {"kind": kind_of(err), "msg": str(err), "rank": err.rank, "node": err.node, "by": err.detected_by}


def error_from_wire(m: dict) -> HFReduceError:
    """The error :func:`error_to_wire` described, with its class, culprit and detector."""
    return KINDS.get(m.get("kind"), HFReduceError)(m.get("msg", "aborted"), rank=m.get("rank"), node=m.get("node"),
                                                   detected_by=m.get("by"))
