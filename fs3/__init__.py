"""fs3: 3FS-style storage: the cluster manager (``fs3.mgmtd``), CRAQ chain-replicated storage
servers (``fs3.storage``) and the chunk client (``fs3.client.chunks``). See docs/fs3.md.

The metadata service and the FUSE mount come with a later issue.
"""

from .chaintable import ChainTable, generate_chain_table
from .config import Fs3Config
from .errors import (
    ChainTableError,
    ChunkBusy,
    ChunkCorrupt,
    ChunkNotCommitted,
    ChunkNotFound,
    ChunkVersionConflict,
    ClientError,
    ForwardFailed,
    Fs3ConfigError,
    Fs3Error,
    InvalidRequest,
    MgmtdError,
    NoServingReplica,
    NotServing,
    RetryableError,
    StaleRequest,
    StaleRouting,
    StorageError,
)
from .routing import Routing

__all__ = [
    "ChainTable", "ChainTableError", "ChunkBusy", "ChunkCorrupt", "ChunkNotCommitted", "ChunkNotFound",
    "ChunkVersionConflict", "ClientError", "ForwardFailed", "Fs3Config", "Fs3ConfigError", "Fs3Error",
    "InvalidRequest", "MgmtdError", "NoServingReplica", "NotServing", "RetryableError", "Routing", "StaleRequest",
    "StaleRouting", "StorageError", "generate_chain_table",
]
