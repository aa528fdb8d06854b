"""MetaServer: the ``meta.*`` RPC methods over a :class:`MetaStore`, the GC worker and ``main``.

Identity ([Note: who asks]): every method is open to every authenticated peer (roles ANY); the
*user* the checks run as comes from the principal. A service principal (the cluster key: the
FUSE daemon, the admin CLI) is trusted to assert any user in ``args["user"]`` (``{"uid", "gids"}``;
absent: root). A client principal (a job's derived credential) is the user named in its key id,
``job:<id>/uid=<uid>/gid=<gid>`` (the key id is HMAC-bound to the credential, so it cannot be
forged); without those fields it is nobody (65534). What a client asserts in ``user`` is ignored.

Storage work (the exact length at close, cutting chunks at truncate, GC) happens here, outside
the store's transactions, through a ChunkClient holding the cluster key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prometheus_client.core import CounterMetricFamily

from network import Authenticator, Credential, RpcServer, TrafficClass
from network.auth import ANY, SERVICE, Principal
from network.metrics import add_collector
from network.service import service_parser, wait_for_shutdown

from ..caps import CapMinter
from ..client.chunks import ChunkClient
from ..config import Fs3Config, node_data_dir, service_start
from ..errors import (
    ClientError,
    Fs3Error,
    InvalidArgument,
    MetaError,
    MetaUnavailable,
    NoSpace,
    NotFound,
)
from .gc import GcWorker
from .layout import choose_layout
from .length import LengthProbe
from .perm import NOBODY_ID, User
from .store import MetaStore

__all__ = ["MetaServer", "main", "user_of_key_id", "default_db_url"]

log = logging.getLogger(__name__)
SPACE_SHORT = 0.05  # free share of the storage under which GC removes unlinked files at once


class _QuietMetaErrors(logging.Filter):
    """network.rpc logs a traceback for handler exceptions it does not know; ENOENT and friends
    are answers, not server bugs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, MetaError)


logging.getLogger("network.rpc").addFilter(_QuietMetaErrors())


def default_db_url(data_dir) -> str:
    return f"sqlite:///{data_dir / 'meta.db'}"


def user_of_key_id(key_id: str) -> User:
    """The user a client credential stands for: ``job:42/uid=994/gid=994`` -> uid 994, gid 994.
    The key id splits on "/"; fields ``uid=N`` and ``gid=N`` (``gid`` may repeat: more groups);
    a missing uid or gid is 65534 (nobody)."""
    uid: int | None = None
    gids: list[int] = []
    for field in key_id.split("/")[1:]:
        k, _, v = field.partition("=")
        try:
            n = int(v)
        except ValueError:
            continue
        if not 0 <= n < 1 << 32:
            continue
        if k == "uid" and uid is None:
            uid = n
        elif k == "gid":
            gids.append(n)
    return User(NOBODY_ID if uid is None else uid, tuple(gids) or (NOBODY_ID,))


class MetaServer:
    """An fs3 metadata server: ``start``, serve, ``stop``. Stateless beyond the database (several
    may serve one PostgreSQL database)."""

    def __init__(self, cfg: Fs3Config, db_url: str, address: str, port: int = 0, *,
                 mgmtd: tuple[str, int] | None = None, auth: Authenticator | Credential | None = None,
                 limits: dict | None = None, name: str = "fs3.meta", chunks: ChunkClient | None = None,
                 gc_interval: float | None = None) -> None:
        auth = Authenticator.of(auth)
        self._key = auth.key  # the cluster key: storage calls, and the capabilities jobs get
        self._minter = CapMinter(self._key) if isinstance(self._key, Credential) else None
        self.cfg = cfg
        self.chunks = chunks
        if self.chunks is None and mgmtd is not None:
            self.chunks = ChunkClient(mgmtd, credential=self._key, timeout=30.0, max_inflight=8,
                                      max_batch_bytes=cfg.max_batch_bytes, read_timeout=cfg.read_attempt_timeout,
                                      write_timeout=cfg.write_attempt_timeout)
        self.probe = LengthProbe(self.chunks, timeout=15.0) if self.chunks is not None else None
        self.store = MetaStore(db_url, layout_fn=self._layout if self.chunks is not None else None,
                               session_ttl=cfg.session_ttl)
        self._disk_cache: tuple[float, tuple[int, int] | None] = (-1e9, None)
        self._disk_lock = threading.Lock()
        self.gc = GcWorker(self.store, self.probe, gc_delay=cfg.gc_delay, space_short=self._space_short,
                           interval=gc_interval if gc_interval is not None else min(1.0, max(0.2, cfg.session_ttl / 10)))
        self._users: dict[str, User] = {}
        self._layouts: OrderedDict[int, dict | None] = OrderedDict()
        self._layouts_lock = threading.Lock()
        self.server = RpcServer(address, port, auth=auth, name=name, traffic_class=TrafficClass.OTHER,
                                **(limits or {}))
        for op, fn in self._handlers().items():
            self.server.register(f"meta.{op}", self._wrap(op, fn), roles=ANY)
        self.server.register("meta.stats", lambda a, p, c: {**self.store.stats, **self.gc.stats}, roles=ANY)
        # Prometheus: operations are the RPC layer's fireflyer_rpc_requests_total{method="meta.*"};
        # the store's and the collector's counters are read at scrape time (docs/metrics.md)
        add_collector(self.server.metrics, self._collect)

    def _collect(self):
        for name, doc, value in (
                ("fireflyer_fs3_meta_txn_retries", "Metadata transactions retried (conflicts)",
                 self.store.stats.get("retries", 0)),
                ("fireflyer_fs3_meta_gc_collected", "Unlinked files whose chunks the collector removed",
                 self.gc.stats.get("collected", 0)),
                ("fireflyer_fs3_meta_gc_pruned_sessions", "Expired file sessions pruned",
                 self.gc.stats.get("pruned_sessions", 0)),
                ("fireflyer_fs3_meta_gc_errors", "Collector passes that failed", self.gc.stats.get("errors", 0))):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> MetaServer:
        self.server.start()
        self.gc.start()
        return self

    def stop(self) -> None:
        """Stop serving, then the GC (a removal in progress is abandoned: it is retried by the next
        start) and the clients, within a few seconds (the launcher's stop timeout is longer)."""
        self.gc.stop(timeout=2.0)
        self.server.stop(timeout=3.0)
        if self.probe is not None:
            self.probe.close()
        if self.chunks is not None:
            self.chunks.close()
        self.store.dispose()

    # -- capacity ---------------------------------------------------------------------------------------
    def disk(self) -> tuple[int, int] | None:
        """``(total, free)`` bytes for files (fs3.meta.length.LengthProbe.disks), asked of the
        storage servers at most every 5 s; None when unknown."""
        with self._disk_lock:
            when, value = self._disk_cache
            if time.monotonic() - when < 5.0 or self.probe is None:
                return value
            self._disk_cache = (time.monotonic(), value)  # one asker at a time; others take the old value
        value = self.probe.disks()
        with self._disk_lock:
            self._disk_cache = (time.monotonic(), value)
        return value

    def _space_short(self) -> bool:
        """Less than SPACE_SHORT of the storage's space is free: GC drops its delay (3FS's rule)."""
        d = self.disk()
        return d is not None and d[0] > 0 and d[1] / d[0] < SPACE_SHORT

    # -- helpers --------------------------------------------------------------------------------------
    def _layout(self, ino: int) -> dict:
        try:
            lay = choose_layout(ino, self.chunks.routing, self.cfg.stripe)  # type: ignore[union-attr]
        except ClientError as exc:
            raise MetaUnavailable(f"fs3.meta: no routing table to place a new file: {exc}") from None
        if not lay["chains"]:
            raise NoSpace("fs3.meta: the routing table has no chains to place a new file on (are the storage "
                          "servers registered with mgmtd?)")
        return lay

    def _layout_of(self, ino: int) -> dict | None:
        """A file's layout (immutable, so kept; the store is asked once per inode)."""
        with self._layouts_lock:
            if ino in self._layouts:
                return self._layouts[ino]
        lay = self.store.layout_of(ino)
        with self._layouts_lock:
            self._layouts[ino] = lay
            if len(self._layouts) > 100_000:
                self._layouts.popitem(last=False)
        return lay

    def user(self, args: dict, principal: Principal | None) -> User:
        """The user a request runs as (see the module docstring)."""
        if principal is None or SERVICE in principal.roles:
            try:
                return User.of(args.get("user"))
            except (KeyError, TypeError, ValueError):
                raise InvalidArgument(f"user must be {{'uid': int, 'gids': [int, ...]}}, got "
                                      f"{args.get('user')!r:.100}") from None
        u = self._users.get(principal.key_id)
        if u is None:
            u = self._users[principal.key_id] = user_of_key_id(principal.key_id)
            if len(self._users) > 10_000:
                self._users.clear()
        return u

    def _cap(self, ctx, ino: int, write: bool) -> dict | None:
        """A data-path capability for a client principal (fs3.caps); None for services."""
        p = ctx.principal if ctx is not None else None
        if p is None or SERVICE in p.roles or self._minter is None:
            return None
        return self._minter.mint(ino, write, p.key_id, p.expires)

    def _wrap(self, op: str, fn: Callable) -> Callable:
        def handler(args: dict, payload, ctx) -> Any:
            user = self.user(args, ctx.principal if ctx is not None else None)
            try:
                closes = args.get("closes")
                if closes and op != "create":  # a create ends them in its own transaction
                    if self.store.drop_sessions(closes)["unlinked"]:
                        self.gc.wake()
                return fn(user, args, ctx)
            except Fs3Error:
                raise
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidArgument(f"meta.{op}: malformed request: {type(exc).__name__}: {exc}") from None

        return handler

    def _cut(self, ino: int, attrs: dict, trim: tuple | None) -> None:
        """After a truncate to ``attrs["size"]``: cut the chunks past it (synchronously)."""
        if trim is None or self.probe is None:
            return
        old_size, layout = trim
        new = attrs["size"]
        end = max(int(old_size), self.probe.exact_length(ino, layout))
        if new < end:
            self.probe.trim(ino, layout, new, end)

    def _storage_length(self, ino: int) -> int | None:
        if self.probe is None:
            return None
        try:
            return self.probe.exact_length(ino, self._layout_of(ino))
        except Fs3Error as exc:
            log.warning("fs3.meta: exact length of inode %d unknown (%s); using the reported length", ino, exc)
            return None

    # -- handlers -------------------------------------------------------------------------------------
    def _handlers(self) -> dict[str, Callable]:
        s = self.store

        def entry(a: dict) -> dict:
            return {"path": a.get("path"), "parent": a.get("parent"), "name": a.get("name")}

        def target(a: dict) -> dict:
            return {"ino": a.get("ino"), "path": a.get("path")}

        def create(u, a, ctx):
            r = s.create(u, **entry(a), mode=int(a.get("mode", 0o644)), excl=bool(a.get("excl")),
                         trunc=bool(a.get("trunc")), write=bool(a.get("write", True)),
                         session=a.get("session"), client=str(a.get("client") or ""), closes=a.get("closes"))
            if r.pop("unlinked", False):
                self.gc.wake()
            self._cut(r["attrs"]["ino"], r["attrs"], r.pop("trim"))
            cap = self._cap(ctx, r["attrs"]["ino"], bool(a.get("write", True)))
            if cap is not None:
                r["cap"] = cap
            return r

        def open_(u, a, ctx):
            r = s.open(u, **target(a), write=bool(a.get("write")), trunc=bool(a.get("trunc")),
                       session=bool(a.get("session")), client=str(a.get("client") or ""), read=a.get("read"))
            self._cut(r["attrs"]["ino"], r["attrs"], r.pop("trim"))
            if r["attrs"]["type"] == "file":
                cap = self._cap(ctx, r["attrs"]["ino"], bool(a.get("write")))
                if cap is not None:
                    r["cap"] = cap
            return r

        def close(u, a, ctx, keep=False):
            ino = int(a["ino"])
            wrote = bool(a.get("wrote"))
            sl = self._storage_length(ino) if wrote else None
            out = s.close(u, ino=ino, session=a.get("session"), wrote=wrote, length=a.get("length"),
                          mtime=a.get("mtime"), storage_length=sl, keep=keep)
            if out["nlink"] == 0 and not keep:
                self.gc.wake()
            return out

        def unlink(u, a, ctx):
            r = s.unlink(u, **entry(a))
            if r["nlink"] == 0:
                self.gc.wake()
            return {}

        def truncate(u, a, ctx):
            r = s.truncate(u, **target(a), size=a["size"], session=a.get("session"))
            self._cut(r["attrs"]["ino"], r["attrs"], r["trim"])
            return r["attrs"]

        def setattr_(u, a, ctx):
            r = s.setattr(u, **target(a), mode=a.get("mode"), uid=a.get("uid"), gid=a.get("gid"),
                          atime=a.get("atime"), mtime=a.get("mtime"), size=a.get("size"),
                          follow=bool(a.get("follow", True)))
            self._cut(r["attrs"]["ino"], r["attrs"], r["trim"])
            return r["attrs"]

        def rename(u, a, ctx):
            r = s.rename(u, src_parent=a.get("src_parent"), src_name=a.get("src_name"),
                         dst_parent=a.get("dst_parent"), dst_name=a.get("dst_name"), src=a.get("src"),
                         dst=a.get("dst"), noreplace=bool(a.get("noreplace")))
            if r.get("unlinked"):  # a replaced file lost its last name
                self.gc.wake()
            return {}

        def lookup(u, a, ctx):
            try:
                return s.lookup(u, parent=a["parent"], name=a["name"])
            except NotFound as exc:
                if a.get("absent_ok"):  # an answer, not an error: cheaper on both sides (the mount's
                    return {"absent": str(exc)}  # lookup before each create)
                raise

        statfs_cache: list = [0.0, None]  # [when, counts]: a count over every inode is a table scan

        def statfs(u, a, ctx):
            now = time.monotonic()
            r = statfs_cache[1]
            if r is None or now - statfs_cache[0] > 5.0:  # df and statfs(2) callers poll; 5 s old is fine
                r = s.statfs(u)
                statfs_cache[:] = [now, r]
            disk = self.disk()
            total, free = disk if disk is not None else (0, 0)  # 0: unknown (no storage server answered)
            return {"bytes_total": total, "bytes_free": free, "bytes_used": r["bytes_used"],
                    "files": r["files"], "chunk_size": self.cfg.chunk_size}

        return {
            "stat": lambda u, a, c: s.stat(u, **target(a), follow=bool(a.get("follow", True))),
            "batch_stat": lambda u, a, c: {"items": s.batch_stat(u, inos=a.get("inos"), paths=a.get("paths"))},
            "lookup": lookup,
            "create": create,
            "open": open_,
            "close": close,
            "sync": lambda u, a, c: close(u, a, c, keep=True),
            "closes": lambda u, a, c: {},  # deferred closes only (args["closes"], ended by the wrapper)
            "renew": lambda u, a, c: {"renewed": s.renew(str(a["client"]))},
            "mkdir": lambda u, a, c: s.mkdir(u, **entry(a), mode=int(a.get("mode", 0o755)),
                                             parents=bool(a.get("parents"))),
            "readdir": lambda u, a, c: s.readdir(u, **target(a), after=a.get("after") or "",
                                                 limit=a.get("limit", 1000), plus=bool(a.get("plus"))),
            "rename": rename,
            "unlink": unlink,
            "rmdir": lambda u, a, c: (s.rmdir(u, **entry(a)), {})[1],
            "remove": lambda u, a, c: {"removed": s.remove(u, **entry(a), recursive=bool(a.get("recursive")))},
            "symlink": lambda u, a, c: s.symlink(u, **entry(a), target=a["target"]),
            "readlink": lambda u, a, c: {"target": s.readlink(u, **target(a))},
            "link": lambda u, a, c: s.link(u, **target(a), new_parent=a.get("new_parent"),
                                           new_name=a.get("new_name"), new_path=a.get("new_path")),
            "truncate": truncate,
            "setattr": setattr_,
            "statfs": statfs,
            "realpath": lambda u, a, c: {"path": s.realpath(u, path=a["path"])},
        }


def main(argv: list[str] | None = None) -> None:
    ap = service_parser("fs3.meta", "the fs3 metadata service (namespace, sessions, lengths, GC)")
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: [fs3].meta_db, else a SQLite file in the "
                    "node's data directory)")
    ap.add_argument("--data-dir", default=None, help="base data directory (see docs/fs3.md)")
    st = service_start(ap, argv, "fs3.meta")
    node, mg, limits = st.node, st.mgmtd, st.security
    url = st.args.db or st.cfg.meta_db or default_db_url(node_data_dir(st.cfg, node.name, st.args.data_dir))
    try:
        srv = MetaServer(st.cfg, url, node.address, st.port, mgmtd=mg, auth=limits.pop("auth"), limits=limits,
                         name=f"fs3.meta@{node.name}")
    except Exception as exc:  # a bad DB URL, an unreachable database: one clear line
        ap.exit(2, f"{ap.prog}: error: cannot open the metadata database {url}: {exc}\n")
    srv.start()
    log.info("fs3.meta on %s:%d, db %s, mgmtd %s:%d", node.address, srv.port, url, *mg)
    wait_for_shutdown()
    srv.stop()
