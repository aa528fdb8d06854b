"""Mount options of the fs3 FUSE mount: parsed and checked once, turned into the FUSE mount options
and the kernel tuning both the mount and the benchmark's in-memory reference use (so the two are
compared under the same kernel settings).

    fsname = "fs3"               the source column of /proc/mounts
    allow_other = true           other accounts may use the mount (jobs run as their users)
    default_permissions = true   the kernel checks modes against our attributes too
    attr_timeout = 1.0           s the kernel trusts attributes (longer: fewer getattr calls)
    entry_timeout = 1.0          s the kernel trusts names (and negative lookups)
    read_ahead_kb = 1024         the kernel's readahead window for the mount (its bdi)
    readahead = 8                chunks the mount prefetches ahead of a sequential reader
    write_buffer = 0             bytes buffered per inode before a flush; 0: a chunk stripe, >= 8 chunks
    threads = 32                 worker threads for meta and data calls (trio CapacityLimiter)
    inflight = 16                chunk requests in flight to storage at once (ChunkClient max_inflight)
    max_tasks = 64               concurrent FUSE requests (pyfuse3 worker tasks)
    debug = false                log every request (DEBUG)
    log = ""                     the daemon's log file ("" : <run dir>/fs3-mount.log or /dev/null)
    node = ""                    the cluster node whose address the clients speak from

Values come as a dict (``fs3 mount -o key=value``): strings are converted to the types above,
unknown keys and bad values raise :class:`fs3.errors.Fs3ConfigError` naming the key.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import Fs3ConfigError

__all__ = ["MountOptions", "fuse_options", "parse_option_args", "tune_kernel"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountOptions:
    fsname: str = "fs3"
    allow_other: bool = True
    default_permissions: bool = True
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    read_ahead_kb: int = 1024
    readahead: int = 8
    write_buffer: int = 0
    threads: int = 32
    inflight: int = 16
    max_tasks: int = 64
    debug: bool = False
    log: str = ""
    node: str = ""

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> MountOptions:
        kw: dict[str, Any] = {}
        known = {f.name: f for f in fields(cls)}
        for key, value in (options or {}).items():
            name = key.replace("-", "_")
            f = known.get(name)
            if f is None:
                raise Fs3ConfigError(f"mount option {key!r} is unknown (known: {', '.join(sorted(known))})")
            typ = {"bool": bool, "int": int, "float": float, "str": str}[f.type if isinstance(f.type, str)
                                                                          else f.type.__name__]
            kw[name] = _convert(key, value, typ)
        opts = cls(**kw)
        for name, lo in (("attr_timeout", 0.0), ("entry_timeout", 0.0), ("read_ahead_kb", 0),
                         ("readahead", 0), ("write_buffer", 0), ("threads", 1), ("inflight", 1), ("max_tasks", 1)):
            if getattr(opts, name) < lo:
                raise Fs3ConfigError(f"mount option {name} = {getattr(opts, name)} must be >= {lo}")
        if not opts.fsname or any(c in opts.fsname for c in ", \t\n"):
            raise Fs3ConfigError(f"mount option fsname {opts.fsname!r} must be one word without commas")
        return opts


def parse_option_args(args: list[str] | None) -> dict[str, Any]:
    """The ``-o`` arguments of ``fs3 mount`` and ``python -m fs3.fuse`` (each ``key=value`` or a bare
    ``key``, comma-separated lists too) as a dict: a bare key is True; MountOptions.from_dict
    converts the values."""
    options: dict[str, Any] = {}
    for o in args or []:
        for item in o.split(","):
            if item:
                k, eq, v = item.partition("=")
                options[k.strip()] = v.strip() if eq else True
    return options


def _convert(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on", ""):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise Fs3ConfigError(f"mount option {key} = {value!r} is not a boolean (true/false)")
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise Fs3ConfigError(f"mount option {key} = {value!r} is not a {typ.__name__}") from None


def fuse_options(opts: MountOptions) -> set[str]:
    """The options handed to ``pyfuse3.init`` (libfuse's mount and session options)."""
    # No "max_read=": libfuse refuses it unless the init callback sets conn->max_read as well,
    # which pyfuse3 does not; without it reads are bounded by max_pages (libfuse asks for 1 MiB
    # requests, the most the kernel allows by default), and so are writes (max_write).
    out = {f"fsname={opts.fsname}", "subtype=fs3", "noatime"}
    if opts.default_permissions:
        out.add("default_permissions")
    if opts.allow_other:
        out.add("allow_other")
    if opts.debug:
        out.add("debug")
    return out


def _mount_dev(mountpoint: Path) -> str | None:
    """The "major:minor" of the file system mounted at ``mountpoint`` (from /proc/self/mountinfo,
    which, unlike stat, never waits for the FUSE daemon)."""
    want = os.path.abspath(mountpoint)
    found = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and _unescape(parts[4]) == want:
                found = parts[2]  # the last one mounted there wins
    return found


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def is_mounted(mountpoint: Path) -> bool:
    return _mount_dev(mountpoint) is not None


async def tune_kernel(mountpoint: Path, opts: MountOptions, inited) -> None:
    """Raise the kernel's readahead window for the mount (its backing device info), so that
    sequential readers send large FUSE reads. Needs root; logged and skipped otherwise.

    The kernel sets the window from the answer to FUSE_INIT (never above its 128 KiB default), so
    this waits for ``inited`` (a trio.Event the Operations' ``init`` sets) and for the answer to
    be taken in, and checks that the value stuck."""
    import trio

    dev = _mount_dev(mountpoint)
    if dev is None or not opts.read_ahead_kb:
        return
    path = Path("/sys/class/bdi") / dev / "read_ahead_kb"
    with trio.move_on_after(10):
        await inited.wait()
    for _ in range(20):
        await trio.sleep(0.05)
        try:
            path.write_text(str(opts.read_ahead_kb))
            if int(path.read_text()) == opts.read_ahead_kb:
                return
        except (OSError, ValueError) as exc:
            log.info("cannot set %s to %d (%s); the kernel's default readahead stays", path,
                     opts.read_ahead_kb, exc)
            return
