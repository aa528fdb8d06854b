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
