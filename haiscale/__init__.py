"""haiscale: DDP and FSDP for PyTorch on hfreduce, with the interface of High-Flyer's haiscale.

    from haiscale.ddp import DistributedDataParallel
    from haiscale.fsdp import FullyShardedDataParallel
    haiscale.spawn(train, args=(...), nprocs=2)

See docs/haiscale.md.
"""

from .errors import (
    CommunicationError,
    DeviceError,
    HaiScaleError,
    ModelMismatchError,
    NotInitializedError,
    ProcessFailed,
    SpawnError,
    StateDictError,
    UnusedParametersError,
    UsageError,
)
from .spawn import job_env, spawn


def __getattr__(name: str):
    """``haiscale.ddp`` / ``fsdp`` / ``moe`` / ``pipeline`` on first use (they import torch)."""
    if name in ("ddp", "fsdp", "moe", "pipeline"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'haiscale' has no attribute {name!r}")


__all__ = [
    "CommunicationError",
    "DeviceError",
    "HaiScaleError",
    "ModelMismatchError",
    "NotInitializedError",
    "ProcessFailed",
    "SpawnError",
    "StateDictError",
    "UnusedParametersError",
    "UsageError",
    "job_env",
    "spawn",
]
