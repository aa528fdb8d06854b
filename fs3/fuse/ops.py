"""The fs3 mount's file system operations (a ``pyfuse3.Operations``), over the meta service
(:class:`fs3.meta.MetaClient`) and the data path (:class:`fs3.client.filedata.FileData`).

[Note: the mount's threads] The operations run in trio tasks (pyfuse3 starts one per request in
flight); every MetaClient and FileData call, which blocks, runs in a worker thread
(``trio.to_thread.run_sync``) under one CapacityLimiter (``threads``), and is bounded by the
clients' own timeouts and retries (a meta restart or a storage failover is retried inside them,
so readers see no error), except the hot meta calls, sent split-phase from the trio thread when they
can be (see [Note: split-phase meta calls]). State (inodes, handles, caches) is only touched in the
trio thread.

Identity: each request's uid, gid and the caller's supplementary groups (/proc/<pid>/status,
cached for a second per pid) go to meta as the ``user`` (the mount holds the cluster key, whose
service principal may assert users); meta checks permissions, and with ``default_permissions``
the kernel checks our attributes first.

Errors: a :class:`fs3.errors.MetaError` becomes ``FUSEError(its errno)``; anything else a call
raises (storage, transport, a bug) is logged and becomes EIO.

Data: reads come from the per-inode read-ahead (:mod:`fs3.fuse.readahead`); writes are buffered
per inode (:mod:`fs3.fuse.wbuf`) and flushed, in order, when a chunk stripe is full (in the
background: the writer goes on filling the next one, two at most in flight), and before a read of
the inode, flush (each close(2)), fsync, release and truncate; getattr reports the end of the
buffered bytes without flushing. Sessions: every open gets one (a read open too, so an unlinked file keeps
its chunks while open); release closes it, reporting the end of the highest write; flush (each
close(2)) sends meta.sync when the handle wrote since the last one, so the size is right for
others once close returns.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat as st_
import time
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from ..errors import MetaError, MetaUnavailable
from ..meta import field
from .handles import DirHandle, FileHandle, Inode
from .options import MountOptions
from .readahead import ReadAhead

__all__ = ["Fs3Operations"]

log = logging.getLogger(__name__)

_IFMT = {"file": st_.S_IFREG, "dir": st_.S_IFDIR, "symlink": st_.S_IFLNK}
_READDIR_PAGE = 1000
_GROUPS_TTL = 1.0
_MAX_INFLIGHT_FLUSHES = 2
_NOW_NS = 50_000_000


def _attrs(r: Any) -> Any:
    """The attrs in a reply: the reply itself (an Attrs or an attrs dict) or its "attrs" item."""
    if isinstance(r, dict) and "attrs" in r:
        return r["attrs"]
    return getattr(r, "attrs", r) if not hasattr(r, "ino") else r


def _when(ns: int) -> int | str:
    """A time for meta.setattr: "now" when it is (pyfuse3 turns the kernel's UTIME_NOW into the
    current time; meta lets anyone with write permission set "now", only the owner other times;
    the kernel has checked which it was already, with default_permissions)."""
    return "now" if abs(time.time_ns() - ns) < _NOW_NS else ns


def _name(name: bytes) -> str:
    try:
        return os.fsdecode(name) if isinstance(name, bytes) else str(name)
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EINVAL) from None


class Fs3Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, meta, data, opts: MountOptions) -> None:
        """``meta``: a MetaClient (the mount's service principal, its client id owns the
        sessions); ``data``: a FileData over a ChunkClient."""
        super().__init__()
        self.meta = meta
        self.data = data
        self.opts = opts
        self.limiter = trio.CapacityLimiter(opts.threads)
        self.inodes: dict[int, Inode] = {}
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._fh = itertools.count(1)
        self._groups: dict[tuple[int, int, int], tuple[float, list[int]]] = {}
        self.nursery: trio.Nursery | None = None  # set by the mount's main (background flushes, read-ahead)
        self.inited = trio.Event()
        # [Note: directory attributes] The kernel drops a directory's attributes whenever an entry
        # in it changes and asks again at the next permission check (default_permissions): one
        # getattr per create in a directory. Those of directories are kept here for attr_timeout
        # (what the kernel would have kept otherwise), refreshed by every reply that carries them.
        self._dir_ttl = opts.attr_timeout
        self._dir_attrs: dict[int, tuple[float, Any]] = {}
        self.meta_ops: dict[str, int] = {}
        self.stats = {"meta_calls": 0, "reads": 0, "read_bytes": 0, "writes": 0, "write_bytes": 0, "data_reads": 0,
                      "data_writes": 0, "flushes": 0, "read_wait_s": 0.0}

    def init(self) -> None:
        self.inited.set()

    # -- plumbing ------------------------------------------------------------------------------------
    async def _run(self, what: str, fn: Callable, *args, **kw) -> Any:
        """``fn(*args, **kw)`` in a worker thread; MetaError -> its errno, anything else -> EIO."""
        try:
            return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw), limiter=self.limiter)
        except pyfuse3.FUSEError:
            raise
        except MetaError as exc:
            log.debug("%s: %s", what, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:  # noqa: BLE001 - every other failure is an I/O error for the caller
            log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _meta(self, op: str, user: dict | None, **kw) -> Any:
        self.stats["meta_calls"] += 1
        self.meta_ops[op] = self.meta_ops.get(op, 0) + 1
        split = self.meta.prepare(op, **kw)
        if split is not None:
            args, done = split
            r = await self._meta_split(op, args, user)
            try:
                return done(r)
            except MetaError as exc:  # an answer that is an error (a lookup's absent name)
                raise pyfuse3.FUSEError(exc.errno) from None
        if user is not None:
            kw["user"] = user
        return await self._run(f"meta.{op}", getattr(self.meta, op), **kw)

    async def _meta_split(self, op: str, args: dict, user: dict | None) -> Any:
        """[Note: split-phase meta calls] The hot ops (lookup, stat, create, open, close, sync) are
        sent from the trio thread when a pooled connection is free and open (sending a small
        request does not block), and their reply awaited on the socket: no worker thread, no two
        thread hand-offs per call. Anything else (no free connection, a transport failure, a
        timeout) goes the usual way: ``MetaClient.call`` in a worker thread, with its failover
        and retries (the request may be sent again, as after any failover)."""
        what = f"meta.{op}"
        pending = self.meta.begin(op, args, user=user)
        if pending is not None:
            try:
                with trio.move_on_after(self.meta.call_timeout) as scope:
                    await trio.lowlevel.wait_readable(pending.fileno())
            except BaseException:
                self.meta.abandon(pending)
                raise
            if scope.cancelled_caught:
                self.meta.abandon(pending)
            else:
                try:
                    return self.meta.finish(pending)
                except MetaUnavailable as exc:  # the server cannot answer now: retried in a thread
                    log.debug("%s split-phase: %s; calling again", what, exc)
                except MetaError as exc:
                    log.debug("%s: %s", what, exc)
                    raise pyfuse3.FUSEError(exc.errno) from None
                except Exception as exc:  # noqa: BLE001 - retried in a thread, with failover
                    log.debug("%s split-phase failed (%s: %s); calling again", what, type(exc).__name__, exc)
        return await self._run(what, self.meta.call, op, args, user=user)

    def _user(self, ctx) -> dict:
        """The requester: uid, gid and supplementary groups (cached a second per pid)."""
        key = (ctx.pid, ctx.uid, ctx.gid)
        now = time.monotonic()
        hit = self._groups.get(key)
        if hit is not None and hit[0] > now:
            return {"uid": ctx.uid, "gids": hit[1]}
        gids = [ctx.gid]
        try:
            with open(f"/proc/{ctx.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        gids += [int(g) for g in line.split()[1:] if int(g) != ctx.gid]
                        break
        except (OSError, ValueError):
            pass  # the process is gone: its primary group only
        if len(self._groups) > 4096:
            self._groups = {k: v for k, v in self._groups.items() if v[0] > now}
        self._groups[key] = (now + _GROUPS_TTL, gids)
        return {"uid": ctx.uid, "gids": gids}

    def _spawn(self, fn, *args) -> None:
        assert self.nursery is not None, "the mount's main sets the nursery"
        self.nursery.start_soon(fn, *args)

    def _inode(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is None:
            node = self.inodes[ino] = Inode(ino)
        return node

    def _drop_if_idle(self, node: Inode) -> None:
        if node.idle and self.inodes.get(node.ino) is node:
            del self.inodes[node.ino]

    def _learn(self, a: Any) -> Inode:
        """Remember what meta said about an inode (its layout and size)."""
        ino = field(a, "ino")
        if self._dir_ttl and field(a, "type") == "dir":
            self._dir_attrs[ino] = (time.monotonic() + self._dir_ttl, a)
            if len(self._dir_attrs) > 65536:
                now = time.monotonic()
                self._dir_attrs = {k: v for k, v in self._dir_attrs.items() if v[0] > now}
        node = self._inode(ino)
        lay = field(a, "layout")
        if lay is not None:
            node.layout = lay
        node.size = field(a, "size", 0) or 0
        return node

    def _entry(self, a: Any, node: Inode | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = field(a, "ino")
        e.generation = 0
        e.st_mode = _IFMT.get(field(a, "type"), 0) | (field(a, "mode", 0) & 0o7777)
        e.st_nlink = field(a, "nlink", 1)
        e.st_uid = field(a, "uid", 0)
        e.st_gid = field(a, "gid", 0)
        size = field(a, "size", 0) or 0
        if node is not None:
            size = max(size, node.local_end, node.wbuf.end) if node.handles else size
        if field(a, "type") == "symlink":
            size = len(os.fsencode(field(a, "target", "") or ""))
        e.st_size = size
        e.st_atime_ns = field(a, "atime", 0)
        e.st_mtime_ns = field(a, "mtime", 0)
        if node is not None and node.handles and node.mtime > e.st_mtime_ns:
            e.st_mtime_ns = node.mtime  # written here, not yet closed: meta learns it at close
        if node is not None:
            node.kattr = (e.st_mtime_ns, size)  # what the kernel holds now
        e.st_ctime_ns = field(a, "ctime", 0)
        lay = field(a, "layout")
        e.st_blksize = field(lay, "chunk_size", 0) or 1 << 20
        e.st_blocks = (size + 511) // 512
        e.attr_timeout = self.opts.attr_timeout
        e.entry_timeout = self.opts.entry_timeout
        return e

    def _looked_up(self, a: Any) -> pyfuse3.EntryAttributes:
        """An entry handed to the kernel (its lookup count grows by one)."""
        node = self._learn(a)
        node.lookups += 1
        return self._entry(a, node)

    def _chunk_size(self, node: Inode) -> int:
        lay = node.layout
        return field(lay, "chunk_size") if lay else 1 << 20

    def _stripe_bytes(self, node: Inode) -> int:
        """Buffered bytes that start a flush: the ``write_buffer`` option, else a chunk stripe (a
        chunk on every chain of the layout), at least 8 chunks: the data path does best with
        several chunks per chain in flight."""
        if self.opts.write_buffer:
            return self.opts.write_buffer
        lay = node.layout
        chains = field(lay, "chains") if lay else [0]
        return max(len(chains), 8) * self._chunk_size(node)

    # -- names ---------------------------------------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        a = await self._meta("lookup", self._user(ctx) if ctx else None, parent=parent_inode, name=_name(name))
        return self._looked_up(_attrs(a))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            node = self.inodes.get(ino)
            if node is None:
                continue
            node.lookups = max(0, node.lookups - n)
            if not node.lookups:
                self._dir_attrs.pop(ino, None)
            self._drop_if_idle(node)

    async def getattr(self, inode, ctx=None):
        hit = self._dir_attrs.get(inode)
        if hit is not None and hit[0] > time.monotonic():
            return self._entry(hit[1])
        a = _attrs(await self._meta("stat", self._user(ctx) if ctx else None, ino=inode))
        if field(a, "type") == "dir":
            self._learn(a)
        node = self.inodes.get(inode)
        if node is not None:
            node.size = field(a, "size", 0) or 0
        return self._entry(a, node)

    async def setattr(self, inode, attr, fields, fh, ctx):
        user = self._user(ctx)
        self._dir_attrs.pop(inode, None)
        node = self._inode(inode)
        try:
            a = None
            if fields.update_size:
                await self._flush(node)
                h = self.files.get(fh) if fh is not None else None
                kw = {"session": h.session} if h is not None and h.session else {}
                a = _attrs(await self._meta("truncate", user, ino=inode, size=attr.st_size, **kw))
                self._truncated(node, attr.st_size)
            kw = {}
            if fields.update_mode:
                kw["mode"] = attr.st_mode & 0o7777
            if fields.update_uid:
                kw["uid"] = attr.st_uid
            if fields.update_gid:
                kw["gid"] = attr.st_gid
            if fields.update_atime:
                kw["atime"] = _when(attr.st_atime_ns)
            if fields.update_mtime:
                kw["mtime"] = _when(attr.st_mtime_ns)
                node.mtime = 0  # the time set wins over the writes before it
                for h2 in self.files.values():
                    if h2.ino == inode:
                        h2.mtime = None
            if kw or a is None:
                a = _attrs(await self._meta("setattr", user, ino=inode, **kw))
            node.cached = None  # the kernel's pages of a truncated file are its own business; ours go
            return self._entry(a, node)
        finally:
            self._drop_if_idle(node)

    async def readlink(self, inode, ctx):
        r = await self._meta("readlink", self._user(ctx), ino=inode)
        target = r["target"] if isinstance(r, dict) else r
        return os.fsencode(target)

    async def mkdir(self, parent_inode, name, mode, ctx):
        a = await self._meta("mkdir", self._user(ctx), parent=parent_inode, name=_name(name), mode=mode & 0o7777)
        return self._looked_up(_attrs(a))

    async def symlink(self, parent_inode, name, target, ctx):
        a = await self._meta("symlink", self._user(ctx), parent=parent_inode, name=_name(name),
                             target=os.fsdecode(target))
        return self._looked_up(_attrs(a))

    async def link(self, inode, new_parent_inode, new_name, ctx):
        a = await self._meta("link", self._user(ctx), ino=inode, new_parent=new_parent_inode,
                             new_name=_name(new_name))
        return self._looked_up(_attrs(a))

    async def unlink(self, parent_inode, name, ctx):
        await self._meta("unlink", self._user(ctx), parent=parent_inode, name=_name(name))

    async def rmdir(self, parent_inode, name, ctx):
        await self._meta("rmdir", self._user(ctx), parent=parent_inode, name=_name(name))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self._meta("rename", self._user(ctx), src_parent=parent_inode_old, src_name=_name(name_old),
                         dst_parent=parent_inode_new, dst_name=_name(name_new),
                         noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not st_.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # devices, fifos and sockets: not in fs3
        r = await self._meta("create", self._user(ctx), parent=parent_inode, name=_name(name),
                             mode=mode & 0o7777, excl=True, trunc=False, write=False)
        return self._looked_up(_attrs(r))

    async def statfs(self, ctx):
        r = await self._meta("statfs", self._user(ctx))
        s = pyfuse3.StatvfsData()
        bs = 4096
        s.f_bsize = field(r, "chunk_size", 1 << 20) or 1 << 20
        s.f_frsize = bs
        s.f_blocks = (field(r, "bytes_total", 0) or 0) // bs
        s.f_bfree = (field(r, "bytes_free", 0) or 0) // bs
        s.f_bavail = s.f_bfree
        files = field(r, "files", 0) or 0
        s.f_files = files + (1 << 32)
        s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s

    # -- directories ---------------------------------------------------------------------------------
    async def opendir(self, inode, ctx):
        fh = next(self._fh)
        self.dirs[fh] = DirHandle(fh, inode, self._user(ctx))
        return fh

    async def readdir(self, fh, start_id, token):
        d = self.dirs[fh]
        i = start_id
        while True:
            if i >= len(d.entries):
                if not d.more:
                    return
                after = d.entries[-1][0] if d.entries else ""
                r = await self._meta("readdir", d.user, ino=d.ino, after=after, limit=_READDIR_PAGE, plus=True)
                ents = field(r, "entries", [])
                d.more = bool(field(r, "more", False)) and bool(ents)
                d.entries += [(field(e, "name"), field(e, "attrs")) for e in ents]
                if i >= len(d.entries):
                    return
            name, a = d.entries[i]
            # readdirplus: the kernel counts an entry it takes as a lookup
            node = self._learn(a)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(a, node), i + 1):
                self._drop_if_idle(node)
                return
            node.lookups += 1
            i += 1

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        return None

    # -- files: open and close -----------------------------------------------------------------------
    def _ra(self, node: Inode) -> ReadAhead:
        if node.ra is None:
            ino = node.ino
            node.ra = ReadAhead(self._chunk_size(node), self.opts.readahead,
                                functools.partial(self._fetch, node, ino), self._spawn)
        return node.ra

    async def _fetch(self, node: Inode, ino: int, offset: int, length: int, size: int,
                     into: bytearray | None) -> bytearray | memoryview:
        n = max(0, min(length, size - offset))
        buf = bytearray(n) if into is None else memoryview(into)[:n]
        if n:
            self.stats["data_reads"] += 1
            await self._run(f"read of inode {ino} [{offset}, +{n})", self.data.readinto, ino, node.layout,
                            offset, buf, size)
        return buf

    def _opened(self, a: Any, session: Any, flags: int, user: dict, *, fresh: bool) -> pyfuse3.FileInfo:
        """Book an open (meta said ``a``) and tell the kernel whether its cached pages are good."""
        node = self._learn(a)
        stamp = (field(a, "mtime", 0), field(a, "size", 0))
        keep = not fresh and node.cached == stamp
        if not keep and node.ra is not None:
            node.ra.invalidate()
        if node.kattr is not None and node.kattr != stamp and not fresh:
            # changed elsewhere since the kernel got its attributes: without keep_cache it drops
            # its pages, but it would go on with the size it holds until attr_timeout; make it
            # ask (attributes only: no lock the open holds is needed)
            try:
                pyfuse3.invalidate_inode(node.ino, attr_only=True)
            except OSError as exc:
                log.debug("invalidating the attributes of inode %d: %s", node.ino, exc)
        node.cached = stamp
        node.handles += 1
        acc = flags & os.O_ACCMODE
        fh = next(self._fh)
        self.files[fh] = FileHandle(fh, node.ino, session, acc != os.O_RDONLY, user,
                                    append=bool(flags & os.O_APPEND))
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=bool(flags & os.O_DIRECT))

    async def open(self, inode, flags, ctx):
        user = self._user(ctx)
        write = flags & os.O_ACCMODE != os.O_RDONLY
        trunc = bool(flags & os.O_TRUNC) and write
        node = self._inode(inode)
        if trunc:
            await self._flush(node)
        try:
            r = await self._meta("open", user, ino=inode, write=write, trunc=trunc, session=True)
        finally:
            self._drop_if_idle(node)
        if trunc:
            self._truncated(node, 0)
        return self._opened(_attrs(r), field(r, "session"), flags, user, fresh=trunc)

    async def create(self, parent_inode, name, mode, flags, ctx):
        user = self._user(ctx)
        write = flags & os.O_ACCMODE != os.O_RDONLY
        r = await self._meta("create", user, parent=parent_inode, name=_name(name), mode=mode & 0o7777,
                             excl=bool(flags & os.O_EXCL), trunc=bool(flags & os.O_TRUNC) and write, write=write)
        a = _attrs(r)
        old = self.inodes.get(field(a, "ino"))
        if old is not None and not field(r, "created", True) and flags & os.O_TRUNC and write:
            self._truncated(old, 0)  # an existing file we had open here too
        fi = self._opened(a, field(r, "session"), flags, user, fresh=True)
        node = self.inodes[field(a, "ino")]
        node.lookups += 1
        return fi, self._entry(a, node)

    def _truncated(self, node: Inode, size: int) -> None:
        """meta truncated the file to ``size``: drop what is buffered or cached here past it."""
        node.wbuf.truncate(size)
        node.local_end = min(node.local_end, size)
        for h in self.files.values():
            if h.ino == node.ino:
                h.end = min(h.end, size)
        if node.ra is not None:
            node.ra.invalidate()
        node.size = size

    async def flush(self, fh):
        h = self.files.get(fh)
        if h is None:
            return
        node = self.inodes[h.ino]
        await self._flush(node)
        if h.unsynced and h.session:
            h.unsynced = False
            a = await self._meta("sync", None, ino=h.ino, session=h.session, wrote=True, length=h.end, mtime=h.mtime)
            self._after_meta_write(node, a)

    async def fsync(self, fh, datasync):
        await self.flush(fh)

    async def release(self, fh):
        h = self.files.pop(fh, None)
        if h is None:
            return
        node = self.inodes[h.ino]
        try:
            err: pyfuse3.FUSEError | None = None
            try:
                await self._flush(node)
            except pyfuse3.FUSEError as exc:
                err = exc
            if h.session and not h.unsynced:
                # nothing to report: the session ends with the next meta call (or within
                # fs3.meta.client.CLOSE_DELAY), and the release is answered now
                self.meta.close_later(h.ino, h.session)
            elif h.session:
                # written since the last sync (flush syncs at every close(2)): the length again;
                # else the session just ends (a close that wrote asks storage for the length)
                a = await self._meta("close", None, ino=h.ino, session=h.session, wrote=h.unsynced,
                                     length=h.end if h.unsynced else None, mtime=h.mtime if h.unsynced else None)
                if a is not None:
                    self._after_meta_write(node, a)
            if err is not None:
                raise err
        finally:
            node.handles -= 1
            if not node.handles:
                node.local_end = node.mtime = 0
                node.ra = None
            self._drop_if_idle(node)

    def _after_meta_write(self, node: Inode, a: Any) -> None:
        """meta answered a sync or close with the inode's attrs: our pages are what it now has."""
        attrs = _attrs(a)
        if field(attrs, "ino") is None:
            return
        node.size = field(attrs, "size", node.size) or 0
        node.cached = (field(attrs, "mtime", 0), node.size)

    # -- files: data ---------------------------------------------------------------------------------
    async def read(self, fh, off, size):
        h = self.files[fh]
        node = self.inodes[h.ino]
        if node.wbuf or node.flushes:
            await self._flush(node)  # read what was written here
        if node.layout is None:
            return b""
        t = time.perf_counter()
        out = await self._ra(node).read(off, size, node.known_size)
        self.stats["read_wait_s"] += time.perf_counter() - t
        self.stats["reads"] += 1
        self.stats["read_bytes"] += len(out)
        return out

    async def write(self, fh, off, buf):
        h = self.files[fh]
        if not h.write:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = self.inodes[h.ino]
        if node.error is not None:
            self._raise_flush_error(node)
        n = len(buf)
        self.stats["writes"] += 1
        self.stats["write_bytes"] += n
        if node.ra is not None:
            node.ra.invalidate()
        if not node.wbuf.add(off, buf):
            await self._flush(node)
            node.wbuf.add(off, buf)
        end = off + n
        h.end = max(h.end, end)
        h.unsynced = True
        h.mtime = node.mtime = time.time_ns()
        node.local_end = max(node.local_end, end)
        if node.wbuf.nbytes >= self._stripe_bytes(node):
            while len(node.flushes) >= _MAX_INFLIGHT_FLUSHES:
                await node.flushes[0].wait()  # back-pressure: two stripes in flight at most
            self._queue_flush(node, node.wbuf.take_whole(self._chunk_size(node)))
        return n

    def _queue_flush(self, node: Inode, extents: list) -> trio.Event:
        """Send ``extents`` after every flush queued before (the order is fixed here, at once)."""
        prev, done = (node.flushes[-1] if node.flushes else None), trio.Event()
        node.flushes.append(done)
        self._spawn(self._send, node, extents, prev, done)
        return done

    async def _send(self, node: Inode, extents: list, prev: trio.Event | None, done: trio.Event) -> None:
        try:
            if prev is not None:
                await prev.wait()
            for off, data in extents:
                self.stats["data_writes"] += 1
                await self._run(f"write of inode {node.ino} [{off}, +{len(data)})", self.data.write, node.ino,
                                node.layout, off, data)
        except pyfuse3.FUSEError as exc:
            node.error = node.error or exc
        finally:
            node.flushes.popleft()  # the oldest: flushes end in the order they were queued
            self.stats["flushes"] += 1
            done.set()
            self._drop_if_idle(node)

    async def _flush(self, node: Inode) -> None:
        """Everything buffered for ``node`` is on storage when this returns (or raises its error)."""
        if node.wbuf:
            self._queue_flush(node, node.wbuf.take())
        if node.flushes:
            await node.flushes[-1].wait()
        if node.error is not None:
            self._raise_flush_error(node)

    def _raise_flush_error(self, node: Inode) -> None:
        err, node.error = node.error, None
        raise err

    # -- the end ---------------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Before unmounting: send what is buffered and close the sessions still open (the kernel
        sends no release once the session ends)."""
        log.info("requests: %s", " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in self.stats.items()))
        log.info("meta calls: %s", " ".join(f"{k}={v}" for k, v in sorted(self.meta_ops.items())))
        for node in list(self.inodes.values()):
            try:
                await self._flush(node)
            except pyfuse3.FUSEError as exc:
                log.error("unmount: buffered writes of inode %d lost: %s", node.ino, os.strerror(exc.errno))
        for fh in list(self.files):
            try:
                await self.release(fh)
            except pyfuse3.FUSEError as exc:
                log.warning("unmount: closing handle %d: %s", fh, os.strerror(exc.errno))
