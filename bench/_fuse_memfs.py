"""The reference for the FUSE mount benchmark: a minimal pyfuse3 file system serving one file of
``--size`` bytes from memory, mounted with the fs3 mount's own options and kernel tuning
(fs3.fuse.options), so "through the mount" is compared with what pyfuse3 and the kernel give at
best on this machine.

    python bench/_fuse_memfs.py MOUNTPOINT --size BYTES [--name data] [-o key=value ...]

It runs in the foreground, serves MOUNTPOINT/<name> (read only, mode 0444), prints "ready" once
mounted, and unmounts and exits on SIGTERM or SIGINT (or when unmounted). The file's bytes are one
random MiB repeated; reads answer with memoryview slices (no copy in Python).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fs3.fuse.options import MountOptions, fuse_options, tune_kernel  # noqa: E402

FILE_INO = 2


class MemFS(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, name: bytes, data: bytes, timeout: float) -> None:
        super().__init__()
        self.name = name
        self.data = memoryview(data)
        self.timeout = timeout
        self.now = time.time_ns()
        self.inited = trio.Event()

    def init(self) -> None:
        self.inited.set()

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFDIR | 0o755, 2, 0
        elif ino == FILE_INO:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o444, 1, len(self.data)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.st_uid, e.st_gid = os.getuid(), os.getgid()
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.now
        e.st_blksize = 1 << 20
        e.st_blocks = (e.st_size + 511) // 512
        e.attr_timeout = e.entry_timeout = self.timeout
        return e

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == self.name:
            return self._attrs(FILE_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def forget(self, inode_list):
        return None

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attrs(FILE_INO), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        return pyfuse3.FileInfo(fh=FILE_INO, keep_cache=True)

    async def read(self, fh, off, size):
        return self.data[off:off + size]

    async def release(self, fh):
        return None


def _make_data(size: int) -> bytes:
    block = os.urandom(min(size, 1 << 20)) or b""
    reps, rest = divmod(size, len(block)) if block else (0, 0)
    return block * reps + block[:rest]


async def _serve(ops: MemFS, mountpoint: Path, opts: MountOptions) -> None:
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signals)
        nursery.start_soon(tune_kernel, mountpoint, opts, ops.inited)
        await pyfuse3.main(max_tasks=64)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--size", type=int, required=True, help="bytes of the file")
    p.add_argument("--name", default="data", help="the file's name (default: data)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="fs3 mount options (fs3.fuse.options), the same as given to the mount")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    opts = MountOptions.from_dict(dict(o.partition("=")[::2] for o in a.options))
    ops = MemFS(a.name.encode(), _make_data(a.size), opts.attr_timeout)
    pyfuse3.init(ops, str(a.mountpoint), fuse_options(opts) - {"subtype=fs3"} | {"subtype=memfs"})
    try:
        print("ready", flush=True)
        trio.run(_serve, ops, a.mountpoint, opts)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
