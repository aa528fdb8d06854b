"""The exceptions of the fs3 package, grouped by theme.

    Fs3Error
    ├── Fs3ConfigError          the [fs3] section or a command-line option is invalid
    ├── ChainTableError         a chain table cannot be built (too few nodes, uneven targets)
    ├── MgmtdError              the cluster manager refused a request or cannot be reached
    ├── StorageError            a storage server refused or failed a chunk operation
    │   ├── RetryableError      the request may succeed later against a newer routing table
    │   │   ├── StaleRouting        the request's chain version differs from the server's
    │   │   ├── NotServing          the target is not in a state that accepts this request
    │   │   ├── ChunkNotCommitted   the chunk has a pending version (a write is in flight)
    │   │   ├── ChunkCorrupt        the replica's copy is damaged, misplaced, stale or missing
    │   │   ├── ChunkBusy           the per-chunk lock was not obtained within the timeout
    │   │   └── ForwardFailed       the successor in the chain did not acknowledge
    │   ├── InvalidRequest      a request that cannot be valid (bad op, sizes, timeout); never retried
    │   ├── ChunkNotFound       no such chunk on the chain
    │   ├── CapabilityDenied    a job touched chunks of a file it did not open (fs3.caps)
    │   ├── StaleRequest        a retry older than the last request seen on its channel
    │   └── ChunkVersionConflict a successor holds a newer committed version than the update
    ├── ClientError             the chunk client gave up (deadline passed, bad arguments)
    │   └── NoServingReplica    no replica of a chain can serve the request now
    └── MetaError               the metadata service refused a namespace operation (``errno``)
        ├── NotFound            ENOENT        no such file or directory
        ├── Exists              EEXIST        the entry exists (create excl, mkdir, rename noreplace)
        ├── NotADirectory       ENOTDIR       a path component or a rename target is not a directory
        ├── IsADirectory        EISDIR        a directory where a file is needed
        ├── NotEmpty            ENOTEMPTY     rmdir / rename over a directory with entries
        ├── PermissionDenied    EACCES        a missing read, write or search bit
        ├── NotPermitted        EPERM         chown/chmod by a non-owner, sticky dirs, hard link to a dir
        ├── InvalidArgument     EINVAL        a bad name or argument, a directory moved into itself
        ├── NameTooLong         ENAMETOOLONG  a name over 255 bytes
        ├── TooManyLinks        ELOOP         more than 40 symlinks on a path
        ├── CrossDevice         EXDEV         (reserved)
        ├── NoSpace             ENOSPC        no inode ids or space left
        ├── StaleHandle         ESTALE        the inode no longer exists
        └── MetaUnavailable     EIO           no meta server answered within the deadline (retryable)

Errors raised in a storage server travel to the client as ``network.RemoteError`` whose
``kind`` is the class name; :func:`from_remote` turns them back into these classes, except
``InvalidRequest``: the chunk client validates its own requests, so only a hand-made request meets
it, and it stays a ``RemoteError`` (kind ``InvalidRequest``) as the ``ValueError`` that storage
handlers raised before it did (a successor's refusal of a forward keeps failing the write at once
instead of becoming a retried ``ForwardFailed``).
"""

from __future__ import annotations

import errno as _errno


class Fs3Error(Exception):
    """Base class of every error raised by the fs3 package."""

    #: extra fields sent to the remote caller (``network.rpc`` reads ``rpc_data``)
    rpc_data: dict | None = None


class Fs3ConfigError(Fs3Error, ValueError):
    """The [fs3] section of the cluster description or an option is invalid (the message names it)."""


class ChainTableError(Fs3Error, ValueError):
    """A chain table cannot be generated from the given nodes, targets and replication factor."""


class MgmtdError(Fs3Error):
    """The cluster manager refused a request or could not be reached."""


class StorageError(Fs3Error):
    """A storage server refused or failed a chunk operation."""

    def __init__(self, message: str, **data) -> None:
        super().__init__(message)
        self.rpc_data = data or None


class RetryableError(StorageError):
    """The request may succeed if retried (after refreshing the routing table)."""


class StaleRouting(RetryableError):
    """The request's chain version is not the server's; refresh the routing table and retry."""


class NotServing(RetryableError):
    """The target is not serving (or not in the chain); pick another replica or refresh routing."""


class TargetFailed(NotServing):
    """The target's disk failed (I/O error, full, read-only): the server took the target out of
    service and reports it offline to mgmtd; another replica serves."""


class ChunkNotCommitted(RetryableError):
    """The chunk has a pending (uncommitted) version; retry, or ask for a relaxed read."""


class ChunkCorrupt(RetryableError):
    """The replica's copy of the chunk is damaged (``damage``: ``crc``, ``header``, ``short``, a
    ``misplaced`` file of another chunk, a ``stale`` older version, a ``missing`` file); it was not
    returned and was reported."""

    @property
    def damage(self) -> str:
        return (self.rpc_data or {}).get("damage", "crc")


class ChunkBusy(RetryableError):
    """The per-chunk lock could not be taken within the timeout."""


class ForwardFailed(RetryableError):
    """The successor in the chain did not acknowledge the update (it died or the chain changed)."""


class InvalidRequest(StorageError, ValueError):
    """A request that cannot be valid (an unknown op, sizes that do not add up, a bad timeout);
    the message names the field. Retrying it cannot help."""


class ChunkNotFound(StorageError, KeyError):
    """The chunk does not exist on that chain."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return Exception.__str__(self)


class CapabilityDenied(StorageError, PermissionError):
    """A job's request touched chunks of a file it holds no capability for (fs3.caps): it did not
    open that file through the metadata service, or not for writing."""


class StaleRequest(StorageError):
    """A request whose sequence number is older than the last one seen on its (client, channel)."""


class ChunkVersionConflict(StorageError):
    """A successor holds a committed version newer than the update's (``data['committed']``)."""


class ClientError(Fs3Error):
    """The chunk client gave up on a request."""


class NoServingReplica(ClientError):
    """No replica of the chain can serve the request (the chain is offline or all copies failed)."""


class MetaError(Fs3Error):
    """The metadata service refused a namespace operation; ``errno`` says why, as POSIX would."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.rpc_data = {"errno": self.errno}


class NotFound(MetaError):
    """No such file or directory (ENOENT)."""

    errno = _errno.ENOENT


class Exists(MetaError):
    """The entry already exists (EEXIST)."""

    errno = _errno.EEXIST


class NotADirectory(MetaError):
    """A directory was needed (ENOTDIR)."""

    errno = _errno.ENOTDIR


class IsADirectory(MetaError):
    """A file was needed, the entry is a directory (EISDIR)."""

    errno = _errno.EISDIR


class NotEmpty(MetaError):
    """The directory has entries (ENOTEMPTY)."""

    errno = _errno.ENOTEMPTY


class PermissionDenied(MetaError):
    """A read, write or search permission bit is missing (EACCES)."""

    errno = _errno.EACCES


class NotPermitted(MetaError):
    """The operation is reserved to the owner or root (EPERM)."""

    errno = _errno.EPERM


class InvalidArgument(MetaError):
    """A bad name or argument (EINVAL)."""

    errno = _errno.EINVAL


class NameTooLong(MetaError):
    """A name over 255 bytes (ENAMETOOLONG)."""

    errno = _errno.ENAMETOOLONG


class TooManyLinks(MetaError):
    """Too many symbolic links on a path: a loop (ELOOP)."""

    errno = _errno.ELOOP


class CrossDevice(MetaError):
    """Across file systems (EXDEV); reserved."""

    errno = _errno.EXDEV


class NoSpace(MetaError):
    """No space or inode ids left (ENOSPC)."""

    errno = _errno.ENOSPC


class StaleHandle(MetaError):
    """The inode no longer exists (ESTALE)."""

    errno = _errno.ESTALE


class MetaUnavailable(MetaError):
    """No meta server answered within the deadline (EIO); retrying later may succeed."""

    errno = _errno.EIO


META_ERRORS: tuple[type[MetaError], ...] = (
    MetaError, NotFound, Exists, NotADirectory, IsADirectory, NotEmpty, PermissionDenied, NotPermitted,
    InvalidArgument, NameTooLong, TooManyLinks, CrossDevice, NoSpace, StaleHandle, MetaUnavailable)
_META = {c.__name__: c for c in META_ERRORS}


_REMOTE = {c.__name__: c for c in (StaleRouting, NotServing, TargetFailed, ChunkNotCommitted, ChunkCorrupt, ChunkBusy,
                                   ForwardFailed, ChunkNotFound, StaleRequest, CapabilityDenied, ChunkVersionConflict,
                                   StorageError, MgmtdError, Fs3ConfigError)}


def from_remote(exc: Exception) -> Exception:
    """Map a ``network.RemoteError`` raised by an fs3 server back to the fs3 class it names."""
    kind = getattr(exc, "kind", None)
    data = getattr(exc, "data", None) or {}
    meta = _META.get(kind or "")
    if meta is not None and "errno" in data:
        # a namespace error reaches users (an OSError's strerror): the server's own words, without
        # where and which call
        out: Exception = meta(getattr(exc, "remote_message", str(exc)))
        out.__cause__ = exc
        return out
    cls = _REMOTE.get(kind or "")
    if cls is None:
        return exc
    msg = str(exc)
    if issubclass(cls, StorageError):
        out = cls(msg, **data)
    else:
        out = cls(msg)
    out.__cause__ = exc
    return out
