"""haiscale.fsdp: ZeRO-3 fully sharded data parallelism on hfreduce (see fully_sharded.py)."""

from .fully_sharded import BackwardPrefetch, FullyShardedDataParallel
from .wrap import ModuleWrapPolicy, size_based_auto_wrap_policy, transformer_auto_wrap_policy

__all__ = [
    "BackwardPrefetch",
    "FullyShardedDataParallel",
    "ModuleWrapPolicy",
    "size_based_auto_wrap_policy",
    "transformer_auto_wrap_policy",
]
