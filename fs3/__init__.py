"""fs3: 3FS-style storage: the cluster manager (``fs3.mgmtd``), CRAQ chain-replicated storage
servers (``fs3.storage``), the chunk client (``fs3.client.chunks``) and the metadata service
(``fs3.meta``: the namespace, its Python stub ``fs3.meta.MetaClient``). See docs/fs3.md.
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
    CrossDevice,
    Exists,
    ForwardFailed,
    Fs3ConfigError,
    Fs3Error,
    InvalidArgument,
    InvalidRequest,
    IsADirectory,
    MetaError,
    MetaUnavailable,
    MgmtdError,
    NameTooLong,
    NoServingReplica,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotServing,
    PermissionDenied,
    RetryableError,
    StaleHandle,
    StaleRequest,
    StaleRouting,
    StorageError,
    TooManyLinks,
)
from .routing import Routing

__all__ = [
    "ChainTable", "ChainTableError", "ChunkBusy", "ChunkCorrupt", "ChunkNotCommitted", "ChunkNotFound",
    "ChunkVersionConflict", "ClientError", "ForwardFailed", "Fs3Config", "Fs3ConfigError", "Fs3Error",
    "InvalidRequest", "MgmtdError", "NoServingReplica", "NotServing", "RetryableError", "Routing", "StaleRequest",
    "StaleRouting", "StorageError", "generate_chain_table",
    # the metadata service's errors (fs3.meta)
    "CrossDevice", "Exists", "InvalidArgument", "IsADirectory", "MetaError", "MetaUnavailable", "NameTooLong",
    "NoSpace", "NotADirectory", "NotEmpty", "NotFound", "NotPermitted", "PermissionDenied", "StaleHandle",
    "TooManyLinks",
]

# the file client (fs3.client.files): fs3.open("/path", "rb") and friends over a default FileSystem
# (the running local cluster, or $HAI_CLUSTER_FILE / $FIREFLYER_CLUSTER). Imported on first use:
# the services (``python -m fs3.storage`` ...) and ``from fs3.errors import ...`` do not pay for
# the client, its metadata stub and their imports.
_FILE_API = (
    "FileSystem", "chmod", "exists", "link", "listdir", "lstat", "makedirs", "mkdir", "open", "read_batch",
    "read_file", "readlink", "remove", "rename", "replace", "rmdir", "rmtree", "scandir", "stat", "statfs",
    "symlink", "truncate", "unlink", "utime", "walk", "write_file",
)
__all__ += list(_FILE_API)


def __getattr__(name: str):
    if name in _FILE_API:
        from .client import files

        value = getattr(files, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fs3' has no attribute {name!r}")

