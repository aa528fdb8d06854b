"""The exceptions of the haiscale package, grouped by theme.

    HaiScaleError
    ├── UsageError               the wrappers were used in a way they do not support
    │   ├── DeviceError          a module's parameters are on a device haiscale cannot reduce from
    │   ├── NotInitializedError  no hfreduce process group: call hfreduce.init() (or run under spawn)
    │   └── StateDictError       a state dict does not match the wrapped module
    ├── ModelMismatchError       the ranks wrapped different models (names, shapes or dtypes differ)
    ├── UnusedParametersError    parameters got no gradient in a synchronised backward
    ├── CommunicationError       an hfreduce collective failed or timed out under a wrapper
    └── SpawnError               a process started by haiscale.spawn failed
        └── ProcessFailed        one child raised or exited non-zero (rank, exit code, traceback)
"""

from __future__ import annotations


class HaiScaleError(Exception):
    """Base class of every error raised by the haiscale package."""


class UsageError(HaiScaleError, ValueError):
    """A wrapper was called or configured in a way it does not support; the message says how to fix it."""


class DeviceError(UsageError):
    """The module's parameters are on a device haiscale cannot reduce from (meta, mixed, unsupported)."""


class NotInitializedError(UsageError, RuntimeError):
    """No hfreduce process group exists: call ``hfreduce.init()`` first, or pass ``process_group``."""


class StateDictError(UsageError, KeyError):
    """A state dict is missing keys, has unexpected keys, or a shape differs from the wrapped module."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class ModelMismatchError(HaiScaleError):
    """The ranks wrapped different models: the message names the first differing rank and parameter."""


class UnusedParametersError(HaiScaleError, RuntimeError):
    """Parameters received no gradient in a synchronised backward and find_unused_parameters is off."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        shown = ", ".join(self.names[:10]) + (f" (and {len(self.names) - 10} more)" if len(self.names) > 10 else "")
        super().__init__(
            f"{len(self.names)} parameter(s) received no gradient in this backward: {shown}. "
            "Make sure every parameter takes part in the loss, or wrap the module with "
            "DistributedDataParallel(..., find_unused_parameters=True)."
        )


class CommunicationError(HaiScaleError, RuntimeError):
    """An hfreduce collective issued by a wrapper failed or timed out (a peer died or is stuck)."""


class SpawnError(HaiScaleError, RuntimeError):
    """A process group started by haiscale.spawn could not run to completion."""


class ProcessFailed(SpawnError):
    """A child process raised an exception or exited with a non-zero code; the others were stopped."""

    def __init__(self, rank: int, exitcode: int | None, child_traceback: str | None) -> None:
        self.rank = rank
        self.exitcode = exitcode
        self.child_traceback = child_traceback
        if child_traceback:
            msg = f"process of rank {rank} raised:\n{child_traceback}"
        else:
            msg = f"process of rank {rank} exited with code {exitcode} without a Python traceback"
        super().__init__(msg)
