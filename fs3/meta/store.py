"""MetaStore: the namespace in a database, every operation one serializable transaction.

Pure database logic: no RPC, no storage. Each public method takes the asking :class:`User`
first and raises the :class:`fs3.errors.MetaError` subclasses POSIX would name. Operations that
need storage work afterwards (a truncate cuts chunks, a close needs the exact length) get it
from the service (``fs3.meta.service``), which calls storage outside the transaction.

[Note: transactions] SQLite: one connection per thread (a pool), WAL, ``synchronous=NORMAL``;
a write transaction starts with ``BEGIN IMMEDIATE`` (it takes the write lock at once, so two
writers never deadlock upgrading a read lock), a read with a plain ``BEGIN`` (a WAL snapshot).
PostgreSQL: every transaction is SERIALIZABLE; several meta servers share one database and a
conflict (serialization failure, deadlock, a unique violation from a racing insert) aborts one
of them, which is retried from the start, at most ``RETRIES`` times with a jittered backoff. The
retried function re-reads everything, so it sees the winner's result (an ``Exists``, say).

[Note: the fast path] Statements are SQLAlchemy Core, built once at import and compiled once
per dialect (``_Q``); a transaction runs them on a raw driver connection from a small pool of
this store's own (each thread takes one for the length of a transaction), skipping the
per-execution machinery of ``Connection.execute`` that costs more than SQLite's own work on a
namespace operation (a stat was ~5x slower through it). Rows come back as named tuples.

[Note: inode ids] Ids come from the ``ino`` counter in blocks of ``ID_BLOCK`` (as 3FS does):
one short transaction per 4096 creates; a server that stops loses the rest of its block (ids are
never reused, 2**40 of them last). Nothing else is cached: another meta server may change any
row, except a file's layout, which never changes (parsed layouts are kept by their text).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import stat
import threading
import time
from collections import deque, namedtuple
from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam, create_engine, delete, exists, func, insert, select, update
from sqlalchemy.pool import NullPool

from ..chunkid import INDEX_BITS
from ..errors import (
    Exists,
    InvalidArgument,
    IsADirectory,
    MetaError,
    MetaUnavailable,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    StaleHandle,
    TooManyLinks,
)
from . import perm
from .perm import R, User, W, X
from .schema import MAX_INO, ROOT, Base, counters, dirents, gc, inodes, sessions

__all__ = ["MetaStore", "User", "ROOT", "ID_BLOCK", "MAX_SYMLINKS", "attrs_of"]

log = logging.getLogger(__name__)

ID_BLOCK = 4096
MAX_SYMLINKS = 40
MAX_NAME = 255
MAX_TARGET = 4095
MAX_READDIR = 10000
RETRIES = 30
_RELATIME_NS = 86400 * 10**9

_I = inodes.c
_D = dirents.c
_S = sessions.c



class _Q:
    """A Core statement compiled once per dialect into the driver's SQL and parameter order
    ([Note: the fast path])."""

    __slots__ = ("stmt", "_by_dialect")

    def __init__(self, stmt) -> None:
        self.stmt = stmt
        self._by_dialect: dict[str, tuple] = {}

    def compiled(self, dialect) -> tuple:
        c = self._by_dialect.get(dialect.name)
        if c is None:
            c = self._by_dialect[dialect.name] = _compile(self.stmt, dialect)
        return c


def _compile(stmt, dialect) -> tuple:
    """``(sql, positional names or None, default params, row type or None)``; positional: the
    defaults that are not None (a parameter not given is None); named: every parameter."""
    comp = stmt.compile(dialect=dialect)
    pos = tuple(comp.positiontup) if comp.positional else None
    defaults = dict(comp.params) if pos is None else {k: v for k, v in comp.params.items() if v is not None}
    rowtype = None
    if getattr(stmt, "is_select", False):
        rowtype = namedtuple("Row", [c.key for c in stmt.selected_columns], rename=True)
    return str(comp), pos, defaults, rowtype


class _Res:
    __slots__ = ("cur", "rowtype")

    def __init__(self, cur, rowtype) -> None:
        self.cur, self.rowtype = cur, rowtype

    def first(self):
        r = self.cur.fetchone()
        return None if r is None else self.rowtype._make(r)

    def all(self) -> list:
        make = self.rowtype._make
        return [make(r) for r in self.cur.fetchall()]

    def scalar_one(self):
        return self.cur.fetchone()[0]

    @property
    def rowcount(self) -> int:
        return self.cur.rowcount


class _Conn:
    """One transaction's view of a raw driver connection: ``execute(statement, params)``."""

    __slots__ = ("cur", "dialect")

    def __init__(self, cur, dialect) -> None:
        self.cur, self.dialect = cur, dialect

    def execute(self, q, params: dict | None = None) -> _Res:
        sql, pos, defaults, rowtype = q.compiled(self.dialect) if isinstance(q, _Q) else _compile(q, self.dialect)
        if defaults:
            params = {**defaults, **(params or {})}
        elif params is None:
            params = {}
        cur = self.cur
        if pos is not None:
            cur.execute(sql, tuple(map(params.get, pos)))
        else:
            cur.execute(sql, params)
        return _Res(cur, rowtype)


# statements built once, compiled once per dialect
_SEL_INODE = _Q(select(inodes).where(_I.ino == bindparam("ino")))
_SEL_CHILD = _Q(select(_D.ino, _D.type).where(_D.parent == bindparam("p"), _D.name == bindparam("n")))
_SEL_CHILD_INODE = _Q(select(inodes).join(dirents, _D.ino == _I.ino).where(_D.parent == bindparam("p"),
                                                                         _D.name == bindparam("n")))
_HAS_CHILD = _Q(select(_D.name).where(_D.parent == bindparam("p")).limit(1))
_INS_INODE = _Q(insert(inodes))
_INS_DIRENT = _Q(insert(dirents))
_DEL_DIRENT = _Q(delete(dirents).where(_D.parent == bindparam("p"), _D.name == bindparam("n")))
_DEL_INODE = _Q(delete(inodes).where(_I.ino == bindparam("ino")))
_TOUCH_DIR = _Q(update(inodes).where(_I.ino == bindparam("k")).values(
    mtime=bindparam("now"), ctime=bindparam("now"), nlink=_I.nlink + bindparam("d")))
_NLINK = _Q(update(inodes).where(_I.ino == bindparam("k")).values(
    nlink=_I.nlink + bindparam("d"), ctime=bindparam("now")))
_SET_PARENT = _Q(update(inodes).where(_I.ino == bindparam("k")).values(parent=bindparam("p"),
                                                                       ctime=bindparam("now")))
_INS_SESSION = _Q(insert(sessions))
_SEL_SESSION = _Q(select(sessions).where(_S.id == bindparam("id")))
_DEL_SESSION = _Q(delete(sessions).where(_S.id == bindparam("id")))
_DEL_SESSION_OF = _Q(delete(sessions).where(_S.id == bindparam("id"), _S.ino == bindparam("k")))
_IN_GC = _Q(select(gc.c.ino).where(gc.c.ino == bindparam("k")))
_RENEW_SESSION = _Q(update(sessions).where(_S.id == bindparam("k")).values(expires=bindparam("exp")))
_RENEW_CLIENT = _Q(update(sessions).where(_S.client == bindparam("k")).values(expires=bindparam("exp")))
_INS_GC = _Q(insert(gc))
_SEL_COUNTER = _Q(select(counters.c.value).where(counters.c.name == bindparam("name")))
_READDIR = _Q(select(_D.name, _D.ino, _D.type).where(_D.parent == bindparam("p"), _D.name > bindparam("after"))
            .order_by(_D.name).limit(bindparam("lim")))
_READDIR_PLUS = _Q(select(_D.name, inodes).join(inodes, _I.ino == _D.ino)
                 .where(_D.parent == bindparam("p"), _D.name > bindparam("after"))
                 .order_by(_D.name).limit(bindparam("lim")))

_SET_TRUNC = _Q(update(inodes).where(_I.ino == bindparam("k")).values(
    size=bindparam("size"), tver=bindparam("tv"), mtime=bindparam("now"), ctime=bindparam("now")))
_SET_SIZE = _Q(update(inodes).where(_I.ino == bindparam("k")).values(
    size=bindparam("size"), mtime=bindparam("mt"), ctime=bindparam("now")))
_SET_ATIME = _Q(update(inodes).where(_I.ino == bindparam("k")).values(atime=bindparam("now")))
_INO_OF_DIR = _Q(select(_D.name, _D.parent).where(_D.ino == bindparam("k")).limit(1))
_SESSION_OF = _Q(select(_S.id).where(_S.ino == bindparam("k")).limit(1))
_GC_WAITING = _Q(select(gc.c.ino, _I.layout, gc.c.since).join(inodes, _I.ino == gc.c.ino, isouter=True)
                 .where(~exists().where(_S.ino == gc.c.ino)).order_by(gc.c.since).limit(bindparam("n")))
_DEL_GC = _Q(delete(gc).where(gc.c.ino == bindparam("k")))
_LAYOUT = _Q(select(_I.layout).where(_I.ino == bindparam("k")))
_TAKE_IDS = _Q(update(counters).where(counters.c.name == bindparam("n")).values(value=bindparam("v")))

_SETATTR: dict[tuple, _Q] = {}


def _set_attrs(cols: tuple[str, ...]) -> _Q:
    """``UPDATE inodes SET <cols> WHERE ino = :k`` (values ``v_<col>``), one per set of columns."""
    q = _SETATTR.get(cols)
    if q is None:
        q = _SETATTR[cols] = _Q(update(inodes).where(_I.ino == bindparam("k")).values(
            **{col: bindparam(f"v_{col}") for col in cols}))
    return q


_layouts: dict[str, dict] = {}  # layout text -> parsed (layouts never change)


def _layout(text: str | None) -> dict | None:
    if text is None:
        return None
    d = _layouts.get(text)
    if d is None:
        d = json.loads(text)
        if len(_layouts) > 100_000:
            _layouts.clear()
        _layouts[text] = d
    return d


def attrs_of(r) -> dict:
    """The wire form of an inode row (``layout`` for files, ``target`` for symlinks, ``parent`` for dirs)."""
    d = {"ino": r.ino, "type": r.type, "mode": r.mode, "uid": r.uid, "gid": r.gid, "nlink": r.nlink,
         "size": r.size, "atime": r.atime, "mtime": r.mtime, "ctime": r.ctime}
    if r.type == "file":
        d["layout"] = _layout(r.layout)
    elif r.type == "symlink":
        d["target"] = r.target
    else:
        d["parent"] = r.parent
    return d


def check_name(name: Any, where: str) -> str:
    """A valid entry name: 1..255 bytes of UTF-8, no "/" or NUL, not "." or ".."."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{where}: an entry name must be a non-empty string, got {name!r:.80}")
    if "/" in name or "\0" in name:
        raise InvalidArgument(f"{where}: name {name!r:.80} contains '/' or NUL")
    if name in (".", ".."):
        raise InvalidArgument(f"{where}: {name!r} cannot name an entry here")
    if len(name) > MAX_NAME // 4 and len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise NameTooLong(f"{where}: name {name[:40]!r}... is {len(name.encode('utf-8', 'surrogatepass'))} "
                          f"bytes (at most {MAX_NAME})")
    return name


def _split(path: Any, where: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidArgument(f"{where}: path must be absolute (start with '/'), got {path!r:.200}")
    if "\0" in path:
        raise InvalidArgument(f"{where}: path contains NUL")
    return path.split("/")


def default_layout(ino: int) -> dict:
    """The layout of a store without storage behind it (tests): one chain, 1 MiB chunks."""
    return {"chunk_size": 1 << 20, "chains": [1]}


class MetaStore:
    """The namespace over SQLAlchemy (SQLite file or PostgreSQL URL); thread-safe."""

    def __init__(self, url: str, *, layout_fn: Callable[[int], dict] | None = None, session_ttl: float = 60.0,
                 max_idle: int = 64) -> None:
        self.url = url
        self.sqlite = url.startswith("sqlite")
        self.layout_fn = layout_fn or default_layout
        self.session_ttl = session_ttl
        # the engine creates the schema and knows the dialect and the driver's connect arguments;
        # transactions run on raw driver connections (the fast path)
        self.engine = create_engine(url, poolclass=NullPool)
        self.dialect = self.engine.dialect
        self._cargs, self._cparams = self.dialect.create_connect_args(self.engine.url)
        if self.sqlite:
            import sqlite3

            self._cparams.update(check_same_thread=False, timeout=30.0, isolation_level=None)
            self._retry_exc: tuple = (sqlite3.OperationalError,)
        else:
            import psycopg

            self._retry_exc = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
                               psycopg.errors.UniqueViolation)
            self._conn_exc: tuple = (psycopg.OperationalError, psycopg.InterfaceError)
        self._free: list = []
        self._free_lock = threading.Lock()
        # SQLite: one writer at a time in this process, handed over by a lock (SQLite's own busy
        # handler polls with sleeps of 1 ms and more: a queue of writers would mostly sleep)
        self._write_lock = threading.Lock() if self.sqlite else None
        self._max_idle = max_idle
        self._ids_lock = threading.Lock()
        self._next_id = 0
        self._end_id = 0
        self.stats = {"retries": 0}
        self._create_schema()

    def dispose(self) -> None:
        """Close the database connections."""
        with self._free_lock:
            conns, self._free = self._free, []
        for c in conns:
            try:
                c.close()
            except Exception:  # closing a broken connection
                pass
        self.engine.dispose()

    # -- plumbing ---------------------------------------------------------------------------------
    def _connect(self):
        conn = self.dialect.dbapi.connect(*self._cargs, **self._cparams)
        if self.sqlite:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
        else:
            import psycopg

            conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        return conn

    def _create_schema(self) -> None:
        # several meta servers may start on one fresh database at once: a loser of the race to
        # create a table retries and finds it made
        for attempt in range(5):
            try:
                Base.metadata.create_all(self.engine)
                break
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

        def init(c) -> None:
            if c.execute(_SEL_INODE, {"ino": ROOT}).first() is None:
                now = time.time_ns()
                c.execute(_INS_INODE, {"ino": ROOT, "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "nlink": 2,
                                       "size": 0, "atime": now, "mtime": now, "ctime": now, "target": None,
                                       "parent": ROOT, "layout": None, "tver": 0})
            if c.execute(_SEL_COUNTER, {"name": "ino"}).first() is None:
                c.execute(insert(counters), {"name": "ino", "value": ROOT + 1})

        self._tx(init, write=True, what="creating the root")

    def _tx(self, fn: Callable, *, write: bool, what: str) -> Any:
        """Run ``fn(conn)`` in one transaction on a pooled driver connection, retried on conflict
        (see the note on transactions)."""
        for attempt in range(RETRIES):
            with self._free_lock:
                conn = self._free.pop() if self._free else None
            if conn is None:
                try:
                    conn = self._connect()
                except Exception as exc:
                    if attempt == RETRIES - 1:
                        raise MetaUnavailable(f"meta store {what}: cannot connect to the database: {exc}") from exc
                    time.sleep(min(1.0, 0.05 * (attempt + 1)))
                    continue
            keep = True
            try:
                if self.sqlite:
                    wl = self._write_lock if write else None
                    if wl is not None and not wl.acquire(timeout=30.0):
                        raise MetaUnavailable(f"meta store {what}: no turn to write within 30 s (a stuck "
                                              f"transaction?)")
                    try:
                        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                        try:
                            out = fn(_Conn(conn.cursor(), self.dialect))
                            conn.execute("COMMIT")
                        except BaseException:
                            conn.execute("ROLLBACK")
                            raise
                    finally:
                        if wl is not None:
                            wl.release()
                else:
                    try:
                        out = fn(_Conn(conn.cursor(), self.dialect))
                        conn.commit()
                    except BaseException:
                        conn.rollback()
                        raise
                return out
            except MetaError:
                raise
            except self._retry_exc as exc:
                if self.sqlite and not any(w in str(exc).lower() for w in ("locked", "busy")):
                    raise
                if attempt == RETRIES - 1:
                    raise MetaUnavailable(f"meta store {what}: gave up after {attempt + 1} conflicting tries: "
                                          f"{exc!r:.300}") from exc
                self.stats["retries"] += 1
                time.sleep(random.uniform(0, min(0.05, 0.001 * (2 ** min(attempt, 6)))))
            except Exception as exc:
                if self.sqlite or not isinstance(exc, self._conn_exc):
                    raise
                keep = False  # the connection broke (a database restart): a new one, and again
                if attempt == RETRIES - 1:
                    raise MetaUnavailable(f"meta store {what}: the database connection failed: {exc}") from exc
                time.sleep(min(1.0, 0.05 * (attempt + 1)))
            finally:
                if keep and conn is not None:
                    with self._free_lock:
                        if len(self._free) < self._max_idle:
                            self._free.append(conn)
                            conn = None
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # a broken connection
                        pass
        raise AssertionError("unreachable")  # pragma: no cover

    def _alloc_ino(self) -> int:
        with self._ids_lock:
            if self._next_id >= self._end_id:
                def take(c) -> int:
                    v = c.execute(_SEL_COUNTER, {"name": "ino"}).scalar_one()
                    c.execute(_TAKE_IDS, {"n": "ino", "v": v + ID_BLOCK})
                    return v

                start = self._tx(take, write=True, what="allocating inode ids")
                if start + ID_BLOCK > MAX_INO:
                    raise NoSpace(f"meta store: inode ids exhausted (next {start}, limit {MAX_INO})")
                self._next_id, self._end_id = start, start + ID_BLOCK
            ino = self._next_id
            self._next_id += 1
            return ino

    # -- lookups inside a transaction ----------------------------------------------------------------
    @staticmethod
    def _row(c, ino: int):
        return c.execute(_SEL_INODE, {"ino": ino}).first()

    def _inode(self, c, ino: Any, where: str):
        try:
            ino = int(ino)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{where}: inode must be an integer, got {ino!r:.80}") from None
        r = c.execute(_SEL_INODE, {"ino": ino}).first()
        if r is None:
            raise StaleHandle(f"{where}: inode {ino} does not exist (removed?)")
        return r

    def _walk(self, c, user: User, path: str, follow: bool, where: str) -> tuple[Any, list[tuple[str, int]]]:
        """Resolve an absolute path: ``(inode row, [(name, ino), ...] from the root)``; every
        directory passed needs search permission, symlinks of intermediate components (and of
        the last with ``follow``) are followed, at most MAX_SYMLINKS."""
        parts = deque(_split(path, where))
        cur = self._inode(c, ROOT, where)
        stack: list[tuple[str, int]] = []
        hops = 0
        while parts:
            name = parts.popleft()
            if name in ("", "."):
                continue
            if cur.type != "dir":
                raise NotADirectory(f"{where}: {'/' + '/'.join(n for n, _ in stack)!r} in {path!r} is not a "
                                    f"directory")
            if not perm.allowed(user, cur.type, cur.mode, cur.uid, cur.gid, X):  # the message only when refused
                perm.check(user, cur, X, f"{where}: {path!r}")
            if name == "..":
                if stack:
                    stack.pop()
                cur = self._inode(c, stack[-1][1] if stack else ROOT, where)
                continue
            if len(name) > MAX_NAME // 4 and len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
                raise NameTooLong(f"{where}: component {name[:40]!r}... of {path[:200]!r} is over {MAX_NAME} bytes")
            r = c.execute(_SEL_CHILD_INODE, {"p": cur.ino, "n": name}).first()
            if r is None:
                raise NotFound(f"{where}: {path!r}: no entry {name!r} in "
                               f"{'/' + '/'.join(n for n, _ in stack)!r}")
            if r.type == "symlink" and (follow or any(p not in ("", ".") for p in parts)):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise TooManyLinks(f"{where}: {path!r}: more than {MAX_SYMLINKS} symbolic links (a loop?)")
                t = r.target or ""
                if t.startswith("/"):
                    cur, stack = self._inode(c, ROOT, where), []
                parts.extendleft(reversed(t.split("/")))
                continue
            stack.append((name, r.ino))
            cur = r
        return cur, stack

    def _target(self, c, user: User, where: str, ino: Any = None, path: str | None = None, follow: bool = True):
        """The inode named by ``ino`` or ``path``."""
        if ino is not None:
            return self._inode(c, ino, where)
        if path is None:
            raise InvalidArgument(f"{where}: name the inode with ino or path")
        return self._walk(c, user, path, follow, where)[0]

    def _dir(self, c, ino: Any, where: str):
        r = self._inode(c, ino, where)
        if r.type != "dir":
            raise NotADirectory(f"{where}: inode {r.ino} is a {r.type}, not a directory")
        return r

    def _entry(self, c, user: User, where: str, parent: Any = None, name: Any = None,
               path: str | None = None) -> tuple[Any, str]:
        """The parent directory row and the entry name of ``parent``+``name`` or ``path``."""
        if path is not None:
            parts = [p for p in _split(path, where) if p not in ("", ".")]
            if not parts:
                raise InvalidArgument(f"{where}: {path!r} names the root, not an entry")
            name = parts[-1]
            check_name(name, f"{where}: {path!r}")
            prow = self._walk(c, user, "/" + "/".join(parts[:-1]), True, where)[0]
            if prow.type != "dir":
                raise NotADirectory(f"{where}: the parent of {path!r} is not a directory")
            return prow, name
        if parent is None or name is None:
            raise InvalidArgument(f"{where}: name the entry with path, or parent and name")
        check_name(name, where)
        prow = self._dir(c, parent, where)
        return prow, name

    @staticmethod
    def _child(c, parent: int, name: str):
        return c.execute(_SEL_CHILD_INODE, {"p": parent, "n": name}).first()

    def _new_inode(self, c, ino: int, ftype: str, mode: int, user: User, prow, now: int, *, target=None,
                   layout=None, size: int = 0) -> dict:
        gid = user.gid
        mode &= 0o7777
        if prow.mode & stat.S_ISGID:
            gid = prow.gid  # a setgid directory passes its group on (and its setgid bit to subdirectories)
            if ftype == "dir":
                mode |= stat.S_ISGID
        if ftype == "file" and mode & stat.S_ISGID and user.uid != 0 and gid not in user.gids:
            mode &= ~stat.S_ISGID
        row = {"ino": ino, "type": ftype, "mode": mode, "uid": user.uid, "gid": gid,
               "nlink": 2 if ftype == "dir" else 1, "size": size, "atime": now, "mtime": now, "ctime": now,
               "target": target, "parent": prow.ino if ftype == "dir" else None,
               "layout": json.dumps(layout, separators=(",", ":")) if layout is not None else None, "tver": 0}
        c.execute(_INS_INODE, row)
        return row

    def _add_session(self, c, ino: int, client: str, write: bool, tver: int) -> int:
        sid = secrets.randbits(63) or 1
        c.execute(_INS_SESSION, {"id": sid, "ino": ino, "client": str(client or "")[:200], "write": bool(write),
                                 "expires": time.time() + self.session_ttl, "tver": tver})
        return sid

    def _drop_link(self, c, r, now: int) -> None:
        """One name of a file or symlink is gone: its link count drops; at 0 it goes to GC."""
        c.execute(_NLINK, {"k": r.ino, "d": -1, "now": now})
        if r.nlink <= 1:
            c.execute(_INS_GC, {"ino": r.ino, "since": time.time()})

    # -- reads ---------------------------------------------------------------------------------------
    def stat(self, user: User, *, ino: Any = None, path: str | None = None, follow: bool = True) -> dict:
        return self._tx(lambda c: attrs_of(self._target(c, user, "meta.stat", ino, path, follow)),
                        write=False, what="stat")

    def batch_stat(self, user: User, *, inos: list | None = None, paths: list | None = None) -> list[dict]:
        def run(c) -> list[dict]:
            out = []
            for item in (inos if inos is not None else paths or []):
                try:
                    r = self._target(c, user, "meta.batch_stat", *((item, None) if inos is not None else (None, item)))
                    out.append(attrs_of(r))
                except MetaError as exc:
                    out.append({"error": type(exc).__name__, "errno": exc.errno, "message": str(exc)})
            return out

        return self._tx(run, write=False, what="batch_stat")

    def lookup(self, user: User, *, parent: Any, name: str) -> dict:
        def run(c) -> dict:
            prow = self._dir(c, parent, "meta.lookup")
            check_name(name, "meta.lookup")
            perm.check(user, prow, X, f"meta.lookup in inode {prow.ino}")
            r = self._child(c, prow.ino, name)
            if r is None:
                raise NotFound(f"meta.lookup: no entry {name!r} in directory inode {prow.ino}")
            return attrs_of(r)

        return self._tx(run, write=False, what="lookup")

    def readlink(self, user: User, *, ino: Any = None, path: str | None = None) -> str:
        def run(c) -> str:
            r = self._target(c, user, "meta.readlink", ino, path, follow=False)
            if r.type != "symlink":
                raise InvalidArgument(f"meta.readlink: inode {r.ino} is a {r.type}, not a symbolic link")
            return r.target

        return self._tx(run, write=False, what="readlink")

    def realpath(self, user: User, *, path: str) -> str:
        def run(c) -> str:
            _r, stack = self._walk(c, user, path, True, "meta.realpath")
            return "/" + "/".join(n for n, _ in stack)

        return self._tx(run, write=False, what="realpath")

    def readdir(self, user: User, *, ino: Any = None, path: str | None = None, after: str = "",
                limit: int = 1000, plus: bool = False) -> dict:
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise InvalidArgument(f"meta.readdir: limit must be an integer, got {limit!r:.40}") from None
        if not 1 <= limit <= MAX_READDIR:
            raise InvalidArgument(f"meta.readdir: limit must be in [1, {MAX_READDIR}], got {limit}")
        if not isinstance(after, str):
            raise InvalidArgument(f"meta.readdir: after must be a name (str), got {after!r:.80}")

        def run(c) -> dict:
            d = self._target(c, user, "meta.readdir", ino, path)
            if d.type != "dir":
                raise NotADirectory(f"meta.readdir: inode {d.ino} is a {d.type}, not a directory")
            perm.check(user, d, R | X if plus else R, f"meta.readdir of inode {d.ino}")
            args = {"p": d.ino, "after": after, "lim": limit + 1}
            if plus:
                rows = c.execute(_READDIR_PLUS, args).all()
                entries = [{"name": r.name, "ino": r.ino, "type": r.type, "attrs": attrs_of(r)} for r in rows]
            else:
                rows = c.execute(_READDIR, args).all()
                entries = [{"name": r.name, "ino": r.ino, "type": r.type} for r in rows]
            more = len(entries) > limit
            return {"entries": entries[:limit], "more": more}

        return self._tx(run, write=False, what="readdir")

    def statfs(self, user: User) -> dict:
        def run(c) -> dict:
            files = c.execute(select(func.count()).select_from(inodes)).scalar_one()
            used = c.execute(select(func.coalesce(func.sum(_I.size), 0)).where(_I.type == "file")).scalar_one()
            return {"files": int(files), "bytes_used": int(used)}

        return self._tx(run, write=False, what="statfs")

    # -- files ---------------------------------------------------------------------------------------
    def create(self, user: User, *, path: str | None = None, parent: Any = None, name: str | None = None,
               mode: int = 0o644, excl: bool = False, trunc: bool = False, write: bool = True,
               session: bool | None = None, client: str = "", closes: list | None = None) -> dict:
        """Create (or open an existing) file: ``{"attrs", "session", "created", "trim"}``; ``trim`` is
        ``(old size, layout)`` when an existing file was truncated (the service cuts its chunks).
        ``closes``: sessions that wrote nothing to end first, in the same transaction (see
        :meth:`drop_sessions`); ``"unlinked"`` in the answer says whether one was of an unlinked
        inode. They end even when the create fails."""
        ino = self._alloc_ino()
        want_session = write if session is None else (session or write)

        def run(c) -> dict:
            now = time.time_ns()
            prow, nm = self._entry(c, user, "meta.create", parent, name, path)
            r = self._child(c, prow.ino, nm)
            trim = None
            if r is None:
                perm.check(user, prow, W | X, f"meta.create {nm!r} in inode {prow.ino}")
                row = self._new_inode(c, ino, "file", int(mode), user, prow, now, layout=self.layout_fn(ino))
                c.execute(_INS_DIRENT, {"parent": prow.ino, "name": nm, "ino": ino, "type": "file"})
                c.execute(_TOUCH_DIR, {"k": prow.ino, "now": now, "d": 0})
                sid = self._add_session(c, ino, client, write, 0) if want_session else None
                return {"attrs": _attrs_dict(row), "session": sid, "created": True, "trim": None}
            if excl:
                raise Exists(f"meta.create: {nm!r} exists in directory inode {prow.ino} (exclusive create)")
            if r.type == "symlink":
                r = self._walk(c, user, _symlink_path(c, self, prow.ino, nm, r.target), True, "meta.create")[0]
            if r.type == "dir":
                raise IsADirectory(f"meta.create: {nm!r} in inode {prow.ino} is a directory")
            perm.check(user, r, (W if write or trunc else 0) | (0 if write else R), f"meta.create: open {nm!r}")
            tver = r.tver
            if trunc:
                trim = (r.size, _layout(r.layout))
                tver += 1
                c.execute(_SET_TRUNC, {"k": r.ino, "size": 0, "tv": tver, "now": now})
                r = self._row(c, r.ino)
            sid = self._add_session(c, r.ino, client, write, tver) if want_session else None
            return {"attrs": attrs_of(r), "session": sid, "created": False, "trim": trim}

        if closes:
            try:
                out = self._tx(lambda c: self._drop_sessions(c, closes) | run(c), write=True, what="create")
            except MetaError:
                self.drop_sessions(closes)
                raise
            return out
        return self._tx(run, write=True, what="create")

    def open(self, user: User, *, ino: Any = None, path: str | None = None, write: bool = False,
             trunc: bool = False, session: bool = False, client: str = "", read: bool | None = None) -> dict:
        """Open an inode: ``{"attrs", "session", "trim"}`` (``read``: also check read permission on
        a write open, as O_RDWR does; default: only for a read open)."""
        def run(c) -> dict:
            now = time.time_ns()
            r = self._target(c, user, "meta.open", ino, path)
            if r.type == "symlink":
                raise TooManyLinks(f"meta.open: inode {r.ino} is a symbolic link (open its target)")
            if r.type == "dir" and (write or trunc):
                raise IsADirectory(f"meta.open: inode {r.ino} is a directory (opened for writing)")
            want = (W if write or trunc else 0) | (R if (not write if read is None else read) else 0)
            perm.check(user, r, want, f"meta.open of inode {r.ino}")
            trim = None
            tver = r.tver
            if trunc and r.type == "file":
                trim = (r.size, _layout(r.layout))
                tver += 1
                c.execute(_SET_TRUNC, {"k": r.ino, "size": 0, "tv": tver, "now": now})
                r = self._row(c, r.ino)
            elif not write and (r.atime <= r.mtime or now - r.atime > _RELATIME_NS):
                if not writing:
                    return {"attrs": attrs_of(r), "session": None, "trim": None, "atime": r.ino}
                c.execute(_SET_ATIME, {"k": r.ino, "now": now})  # relatime
                r = self._row(c, r.ino)
            sid = self._add_session(c, r.ino, client, write, tver) if (write or session) and r.type == "file" \
                else None
            return {"attrs": attrs_of(r), "session": sid, "trim": trim}

        # a plain read open only reads (relatime: its atime update, when due, follows on its own)
        writing = bool(write or trunc or session)
        out = self._tx(run, write=writing, what="open")
        k = out.pop("atime", None)
        if k is not None:
            now = time.time_ns()
            self._tx(lambda c: c.execute(_SET_ATIME, {"k": k, "now": now}), write=True, what="open (atime)")
            out["attrs"]["atime"] = now
        return out

    def close(self, user: User, *, ino: Any, session: Any, wrote: bool = False, length: int | None = None,
              mtime: int | None = None, storage_length: int | None = None, keep: bool = False) -> dict:
        """End a session (``keep``: a sync, the session stays and is renewed); a session that wrote
        sets the length: the larger of the file's size, the exact length from storage and, unless
        the file was truncated since the session opened, the reported end of its highest write."""
        what = "sync" if keep else "close"

        def run(c) -> dict:
            r = self._inode(c, ino, f"meta.{what}")
            s = c.execute(_SEL_SESSION, {"id": _sid(session, f"meta.{what}")}).first() if session else None
            if s is not None and s.ino != r.ino:
                raise InvalidArgument(f"meta.{what}: session {session} belongs to inode {s.ino}, not {r.ino}")
            if s is not None:
                if keep:
                    c.execute(_RENEW_SESSION, {"k": s.id, "exp": time.time() + self.session_ttl})
                else:
                    c.execute(_DEL_SESSION, {"id": s.id})
            if not wrote or r.type != "file":
                return attrs_of(r)
            if s is None or not s.write:  # no write session of its own (pruned, or none): a writer's rights
                perm.check(user, r, W, f"meta.{what} of inode {r.ino} without a write session")
            size = r.size
            if storage_length is not None:
                size = max(size, int(storage_length))
            if length is not None and (s is None or s.tver == r.tver):
                size = max(size, int(length))
            now = time.time_ns()
            mt = int(mtime) if mtime is not None else now
            c.execute(_SET_SIZE, {"k": r.ino, "size": size, "mt": mt, "now": now})
            return attrs_of(self._row(c, r.ino))

        return self._tx(run, write=True, what=what)

    def sync(self, user: User, *, ino: Any, session: Any, wrote: bool = False, length: int | None = None,
             mtime: int | None = None, storage_length: int | None = None) -> dict:
        return self.close(user, ino=ino, session=session, wrote=wrote, length=length, mtime=mtime,
                          storage_length=storage_length, keep=True)

    def renew(self, client: str) -> int:
        """Extend every session of ``client`` by session_ttl; the number renewed."""
        return self._tx(lambda c: c.execute(_RENEW_CLIENT, {"k": client,
                                                            "exp": time.time() + self.session_ttl}).rowcount,
                        write=True, what="renew")

    def drop_sessions(self, closes: list) -> dict:
        """End sessions that wrote nothing, ``[[ino, session], ...]`` (a client's deferred closes);
        one not found (ended already, or pruned) is skipped. ``{"unlinked": bool}``: whether one
        was of an unlinked inode (GC may now remove it)."""
        return self._tx(lambda c: self._drop_sessions(c, closes), write=True, what="close")

    def _drop_sessions(self, c, closes: list) -> dict:
        unlinked = False
        for item in closes:
            try:
                ino, sid = int(item[0]), int(item[1])
            except (TypeError, ValueError, IndexError):
                raise InvalidArgument(f"meta.close: a deferred close must be [ino, session], got {item!r:.80}") from None
            if c.execute(_DEL_SESSION_OF, {"id": sid, "k": ino}).rowcount and not unlinked:
                unlinked = c.execute(_IN_GC, {"k": ino}).first() is not None
        return {"unlinked": unlinked}

    def drop_session(self, sid: int) -> None:
        self._tx(lambda c: c.execute(_DEL_SESSION, {"id": sid}), write=True, what="drop session")

    def session(self, sid: int) -> dict | None:
        r = self._tx(lambda c: c.execute(_SEL_SESSION, {"id": _sid(sid, 'meta.session')}).first(), write=False, what="session")
        return None if r is None else r._asdict()

    def truncate(self, user: User, *, ino: Any = None, path: str | None = None, size: int,
                 session: Any = None) -> dict:
        """Set a file's size: ``{"attrs", "trim": (old size, layout)}``; a truncate through a
        write session needs no permission check (it was checked at open, like ftruncate)."""
        size = _size(size, "meta.truncate")

        def run(c) -> dict:
            r = self._target(c, user, "meta.truncate", ino, path)
            if r.type == "dir":
                raise IsADirectory(f"meta.truncate: inode {r.ino} is a directory")
            if r.type != "file":
                raise InvalidArgument(f"meta.truncate: inode {r.ino} is a {r.type}")
            s = c.execute(_SEL_SESSION, {"id": _sid(session, "meta.truncate")}).first() if session else None
            if s is None or not s.write or s.ino != r.ino:
                perm.check(user, r, W, f"meta.truncate of inode {r.ino}")
            _check_size_fits(size, r)
            now = time.time_ns()
            c.execute(_SET_TRUNC, {"k": r.ino, "size": size, "tv": r.tver + 1, "now": now})
            return {"attrs": attrs_of(self._row(c, r.ino)), "trim": (r.size, _layout(r.layout))}

        return self._tx(run, write=True, what="truncate")

    def setattr(self, user: User, *, ino: Any = None, path: str | None = None, mode: int | None = None,
                uid: int | None = None, gid: int | None = None, atime: Any = None, mtime: Any = None,
                size: int | None = None, follow: bool = True) -> dict:
        """chmod / chown / utimens / truncate in one: ``{"attrs", "trim"}``. Times are ns since the
        epoch, or ``"now"``."""
        if size is not None:
            size = _size(size, "meta.setattr")

        def run(c) -> dict:
            r = self._target(c, user, "meta.setattr", ino, path, follow)
            where = f"meta.setattr of inode {r.ino}"
            now = time.time_ns()
            vals: dict = {}
            new_mode = r.mode
            if uid is not None or gid is not None:
                nu, ng, new_mode = perm.check_chown(user, r, uid, gid, where)
                vals.update(uid=nu, gid=ng, mode=new_mode)
            if mode is not None:
                vals["mode"] = perm.check_chmod(user, r, int(mode), where)
            for key, v in (("atime", atime), ("mtime", mtime)):
                if v is None:
                    continue
                explicit = v != "now"
                perm.check_times(user, r, explicit, where)
                vals[key] = int(v) if explicit else now
            trim = None
            if size is not None:
                if r.type == "dir":
                    raise IsADirectory(f"{where}: a directory has no size to set")
                if r.type != "file":
                    raise InvalidArgument(f"{where}: a {r.type} has no size to set")
                perm.check(user, r, W, where)
                _check_size_fits(size, r)
                vals.update(size=size, tver=r.tver + 1)
                vals.setdefault("mtime", now)
                trim = (r.size, _layout(r.layout))
            if vals:
                vals["ctime"] = now
                c.execute(_set_attrs(tuple(sorted(vals))), {"k": r.ino, **{f"v_{k}": v for k, v in vals.items()}})
                r = self._row(c, r.ino)
            return {"attrs": attrs_of(r), "trim": trim}

        return self._tx(run, write=True, what="setattr")

    # -- namespace -----------------------------------------------------------------------------------
    def mkdir(self, user: User, *, path: str | None = None, parent: Any = None, name: str | None = None,
              mode: int = 0o755, parents: bool = False) -> dict:
        if parents and path is not None:
            return self._mkdirs(user, path, mode)
        ino = self._alloc_ino()

        def run(c) -> dict:
            now = time.time_ns()
            prow, nm = self._entry(c, user, "meta.mkdir", parent, name, path)
            r = self._child(c, prow.ino, nm)
            if r is not None:
                if parents and r.type == "dir":
                    return attrs_of(r)
                raise Exists(f"meta.mkdir: {nm!r} exists in directory inode {prow.ino} (a {r.type})")
            perm.check(user, prow, W | X, f"meta.mkdir {nm!r} in inode {prow.ino}")
            return self._mkdir_in(c, ino, user, prow, nm, int(mode), now)

        return self._tx(run, write=True, what="mkdir")

    def _mkdir_in(self, c, ino: int, user: User, prow, nm: str, mode: int, now: int) -> dict:
        row = self._new_inode(c, ino, "dir", mode, user, prow, now)
        c.execute(_INS_DIRENT, {"parent": prow.ino, "name": nm, "ino": ino, "type": "dir"})
        c.execute(_TOUCH_DIR, {"k": prow.ino, "now": now, "d": 1})
        return _attrs_dict(row)

    def _mkdirs(self, user: User, path: str, mode: int) -> dict:
        parts = [p for p in _split(path, "meta.mkdir") if p not in ("", ".")]
        if not parts:
            return self.stat(user, ino=ROOT)
        ids = [self._alloc_ino() for _ in parts]

        def run(c) -> dict:
            now = time.time_ns()
            cur = self._inode(c, ROOT, "meta.mkdir")
            out: dict = attrs_of(cur)
            done: list[str] = []
            for i, nm in enumerate(parts):
                where = f"meta.mkdir {'/' + '/'.join(done + [nm])!r}"
                if nm == "..":
                    raise InvalidArgument(f"{where}: '..' in a path to create")
                check_name(nm, where)
                perm.check(user, cur, X, where)
                r = self._child(c, cur.ino, nm)
                if r is not None and r.type == "symlink":
                    r = self._walk(c, user, "/" + "/".join(done + [nm]), True, where)[0]
                if r is None:
                    perm.check(user, cur, W | X, where)
                    out = self._mkdir_in(c, ids[i], user, cur, nm, mode, now)
                    r = self._row(c, ids[i])
                elif r.type != "dir":
                    raise NotADirectory(f"{where}: exists and is a {r.type}")
                else:
                    out = attrs_of(r)
                cur = r
                done.append(nm)
            return out

        return self._tx(run, write=True, what="mkdir")

    def symlink(self, user: User, *, target: str, path: str | None = None, parent: Any = None,
                name: str | None = None) -> dict:
        if not isinstance(target, str) or not target or "\0" in target:
            raise InvalidArgument(f"meta.symlink: target must be a non-empty string without NUL, got {target!r:.80}")
        tb = len(target.encode("utf-8", "surrogatepass"))
        if tb > MAX_TARGET:
            raise NameTooLong(f"meta.symlink: target is {tb} bytes (at most {MAX_TARGET})")
        ino = self._alloc_ino()

        def run(c) -> dict:
            now = time.time_ns()
            prow, nm = self._entry(c, user, "meta.symlink", parent, name, path)
            if self._child(c, prow.ino, nm) is not None:
                raise Exists(f"meta.symlink: {nm!r} exists in directory inode {prow.ino}")
            perm.check(user, prow, W | X, f"meta.symlink {nm!r} in inode {prow.ino}")
            row = self._new_inode(c, ino, "symlink", 0o777, user, prow, now, target=target, size=tb)
            c.execute(_INS_DIRENT, {"parent": prow.ino, "name": nm, "ino": ino, "type": "symlink"})
            c.execute(_TOUCH_DIR, {"k": prow.ino, "now": now, "d": 0})
            return _attrs_dict(row)

        return self._tx(run, write=True, what="symlink")

    def link(self, user: User, *, ino: Any = None, path: str | None = None, new_parent: Any = None,
             new_name: str | None = None, new_path: str | None = None) -> dict:
        def run(c) -> dict:
            now = time.time_ns()
            r = self._target(c, user, "meta.link", ino, path, follow=False)
            if r.type == "dir":
                raise NotPermitted(f"meta.link: inode {r.ino} is a directory (no hard links to directories)")
            if r.nlink < 1:
                raise NotFound(f"meta.link: inode {r.ino} was unlinked")
            prow, nm = self._entry(c, user, "meta.link", new_parent, new_name, new_path)
            if self._child(c, prow.ino, nm) is not None:
                raise Exists(f"meta.link: {nm!r} exists in directory inode {prow.ino}")
            perm.check(user, prow, W | X, f"meta.link {nm!r} in inode {prow.ino}")
            c.execute(_INS_DIRENT, {"parent": prow.ino, "name": nm, "ino": r.ino, "type": r.type})
            c.execute(_NLINK, {"k": r.ino, "d": 1, "now": now})
            c.execute(_TOUCH_DIR, {"k": prow.ino, "now": now, "d": 0})
            return attrs_of(self._row(c, r.ino))

        return self._tx(run, write=True, what="link")

    def unlink(self, user: User, *, path: str | None = None, parent: Any = None, name: str | None = None) -> dict:
        def run(c) -> dict:
            now = time.time_ns()
            prow, nm = self._entry(c, user, "meta.unlink", parent, name, path)
            perm.check(user, prow, W | X, f"meta.unlink {nm!r} in inode {prow.ino}")
            r = self._child(c, prow.ino, nm)
            if r is None:
                raise NotFound(f"meta.unlink: no entry {nm!r} in directory inode {prow.ino}")
            if r.type == "dir":
                raise IsADirectory(f"meta.unlink: {nm!r} in inode {prow.ino} is a directory (use rmdir)")
            perm.check_sticky(user, prow, r.uid, f"meta.unlink {nm!r}")
            c.execute(_DEL_DIRENT, {"p": prow.ino, "n": nm})
            self._drop_link(c, r, now)
            c.execute(_TOUCH_DIR, {"k": prow.ino, "now": now, "d": 0})
            return {"ino": r.ino, "nlink": r.nlink - 1}

        return self._tx(run, write=True, what="unlink")

    def rmdir(self, user: User, *, path: str | None = None, parent: Any = None, name: str | None = None) -> dict:
        def run(c) -> dict:
            now = time.time_ns()
            prow, nm = self._entry(c, user, "meta.rmdir", parent, name, path)
            perm.check(user, prow, W | X, f"meta.rmdir {nm!r} in inode {prow.ino}")
            r = self._child(c, prow.ino, nm)
            if r is None:
                raise NotFound(f"meta.rmdir: no entry {nm!r} in directory inode {prow.ino}")
            if r.type != "dir":
                raise NotADirectory(f"meta.rmdir: {nm!r} in inode {prow.ino} is a {r.type}")
            perm.check_sticky(user, prow, r.uid, f"meta.rmdir {nm!r}")
            if c.execute(_HAS_CHILD, {"p": r.ino}).first() is not None:
                raise NotEmpty(f"meta.rmdir: directory {nm!r} (inode {r.ino}) is not empty")
            c.execute(_DEL_DIRENT, {"p": prow.ino, "n": nm})
            c.execute(_DEL_INODE, {"ino": r.ino})
            c.execute(_TOUCH_DIR, {"k": prow.ino, "now": now, "d": -1})
            return {"ino": r.ino}

        return self._tx(run, write=True, what="rmdir")

    def remove(self, user: User, *, path: str | None = None, parent: Any = None, name: str | None = None,
               recursive: bool = False) -> int:
        """Remove an entry (a directory's whole tree with ``recursive``); the number of entries removed.
        Each removal is its own transaction (a large tree never holds the database for long)."""
        def find(c):
            prow, nm = self._entry(c, user, "meta.remove", parent, name, path)
            r = self._child(c, prow.ino, nm)
            if r is None:
                raise NotFound(f"meta.remove: no entry {nm!r} in directory inode {prow.ino}")
            return prow.ino, nm, r.ino, r.type

        p, nm, ino, ftype = self._tx(find, write=False, what="remove")
        if ftype != "dir":
            self.unlink(user, parent=p, name=nm)
            return 1
        n = 0
        if recursive:
            n = self._remove_tree(user, ino)
        self.rmdir(user, parent=p, name=nm)
        return n + 1

    def _remove_tree(self, user: User, ino: int) -> int:
        n = 0
        while True:
            page = self.readdir(user, ino=ino, limit=MAX_READDIR)
            for e in page["entries"]:
                if e["type"] == "dir":
                    n += self._remove_tree(user, e["ino"])
                    self.rmdir(user, parent=ino, name=e["name"])
                else:
                    self.unlink(user, parent=ino, name=e["name"])
                n += 1
            if not page["entries"]:
                return n

    def rename(self, user: User, *, src_parent: Any = None, src_name: str | None = None, dst_parent: Any = None,
               dst_name: str | None = None, src: str | None = None, dst: str | None = None,
               noreplace: bool = False) -> dict:
        """Move an entry atomically, replacing a file or an empty directory at the destination;
        ``{"unlinked": ino}`` when the replaced file lost its last link (GC has work), else ``{}``."""
        def run(c) -> dict:
            out: dict = {}
            now = time.time_ns()
            sp, sn = self._entry(c, user, "meta.rename (source)", src_parent, src_name, src)
            dp, dn = self._entry(c, user, "meta.rename (destination)", dst_parent, dst_name, dst)
            perm.check(user, sp, W | X, f"meta.rename from inode {sp.ino}")
            if dp.ino != sp.ino:
                perm.check(user, dp, W | X, f"meta.rename into inode {dp.ino}")
            s = self._child(c, sp.ino, sn)
            if s is None:
                raise NotFound(f"meta.rename: no entry {sn!r} in directory inode {sp.ino}")
            perm.check_sticky(user, sp, s.uid, f"meta.rename {sn!r}")
            moving_dir = s.type == "dir"
            if moving_dir and dp.ino != sp.ino:
                perm.check(user, s, W, f"meta.rename of directory {sn!r} (its '..' changes)")
                a = dp.ino
                for _ in range(100_000):
                    if a == s.ino:
                        raise InvalidArgument(f"meta.rename: cannot move directory {sn!r} (inode {s.ino}) into "
                                              f"its own subtree (inode {dp.ino})")
                    if a == ROOT:
                        break
                    pr = self._row(c, a)
                    if pr is None:
                        break
                    a = pr.parent
            d = self._child(c, dp.ino, dn)
            if d is not None:
                if d.ino == s.ino:
                    return {}  # the same file under both names: nothing to do (POSIX)
                if noreplace:
                    raise Exists(f"meta.rename: {dn!r} exists in directory inode {dp.ino} (noreplace)")
                perm.check_sticky(user, dp, d.uid, f"meta.rename over {dn!r}")
                if moving_dir and d.type != "dir":
                    raise NotADirectory(f"meta.rename: {dn!r} is a {d.type}, cannot replace it with a directory")
                if not moving_dir and d.type == "dir":
                    raise IsADirectory(f"meta.rename: {dn!r} is a directory, cannot replace it with a {s.type}")
                c.execute(_DEL_DIRENT, {"p": dp.ino, "n": dn})
                if d.type == "dir":
                    if c.execute(_HAS_CHILD, {"p": d.ino}).first() is not None:
                        raise NotEmpty(f"meta.rename: directory {dn!r} (inode {d.ino}) is not empty")
                    c.execute(_DEL_INODE, {"ino": d.ino})
                    c.execute(_TOUCH_DIR, {"k": dp.ino, "now": now, "d": -1})
                else:
                    self._drop_link(c, d, now)
                    if d.nlink <= 1:
                        out["unlinked"] = d.ino
            c.execute(_DEL_DIRENT, {"p": sp.ino, "n": sn})
            c.execute(_INS_DIRENT, {"parent": dp.ino, "name": dn, "ino": s.ino, "type": s.type})
            if moving_dir and dp.ino != sp.ino:
                c.execute(_SET_PARENT, {"k": s.ino, "p": dp.ino, "now": now})
                c.execute(_TOUCH_DIR, {"k": sp.ino, "now": now, "d": -1})
                c.execute(_TOUCH_DIR, {"k": dp.ino, "now": now, "d": 1})
            else:
                c.execute(_NLINK, {"k": s.ino, "d": 0, "now": now})
                c.execute(_TOUCH_DIR, {"k": sp.ino, "now": now, "d": 0})
                if dp.ino != sp.ino:
                    c.execute(_TOUCH_DIR, {"k": dp.ino, "now": now, "d": 0})
            return out

        return self._tx(run, write=True, what="rename")

    # -- sessions and GC (the service's workers) -------------------------------------------------------
    def expired_sessions(self, now: float | None = None, limit: int = 1000) -> list[dict]:
        t = time.time() if now is None else now
        rows = self._tx(lambda c: c.execute(select(sessions).where(_S.expires < t).limit(limit)).all(),
                        write=False, what="expired sessions")
        return [r._asdict() for r in rows]

    def layout_of(self, ino: int) -> dict | None:
        r = self._tx(lambda c: c.execute(_LAYOUT, {"k": ino}).first(), write=False,
                     what="layout")
        return None if r is None else _layout(r.layout)

    def gc_waiting(self, limit: int = 100) -> list[tuple[int, dict | None, float]]:
        """Unlinked inodes with no session, oldest first: ``[(ino, layout, unlinked at), ...]``."""
        rows = self._tx(lambda c: c.execute(_GC_WAITING, {"n": limit}).all(), write=False, what="gc candidates")
        return [(r.ino, _layout(r.layout), r.since) for r in rows]

    def gc_candidates(self, delay: float, limit: int = 100) -> list[tuple[int, dict | None]]:
        """Unlinked inodes past ``delay`` seconds with no session: ``[(ino, layout), ...]``."""
        t = time.time() - delay
        return [(ino, lay) for ino, lay, since in self.gc_waiting(limit) if since <= t]

    def gc_pending(self) -> int:
        return self._tx(lambda c: c.execute(select(func.count()).select_from(gc)).scalar_one(), write=False,
                        what="gc pending")

    def gc_done(self, ino: int) -> bool:
        """Forget an unlinked inode whose chunks are gone (False: a session opened meanwhile, keep it)."""
        def run(c) -> bool:
            if c.execute(_SESSION_OF, {"k": ino}).first() is not None:
                return False
            r = self._row(c, ino)
            if r is not None and r.nlink > 0:
                c.execute(_DEL_GC, {"k": ino})  # linked again meanwhile? (never: no link at 0)
                return False
            c.execute(_DEL_INODE, {"ino": ino})
            c.execute(_DEL_GC, {"k": ino})
            return True

        return self._tx(run, write=True, what="gc")


def _attrs_dict(row: dict) -> dict:
    d = {k: row[k] for k in ("ino", "type", "mode", "uid", "gid", "nlink", "size", "atime", "mtime", "ctime")}
    if row["type"] == "file":
        d["layout"] = _layout(row["layout"])
    elif row["type"] == "symlink":
        d["target"] = row["target"]
    else:
        d["parent"] = row["parent"]
    return d


def _symlink_path(c, store: MetaStore, parent: int, name: str, target: str) -> str:
    """The absolute path a symlink named ``name`` in ``parent`` points to (for O_CREAT on a symlink)."""
    if target.startswith("/"):
        return target
    names: list[str] = []
    p = parent
    while p != ROOT:
        r = c.execute(_INO_OF_DIR, {"k": p}).first()
        if r is None:
            break
        names.append(r.name)
        p = r.parent
    return "/" + "/".join([*reversed(names), target])


def _sid(session: Any, where: str) -> int:
    try:
        return int(session)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{where}: session must be the integer id meta gave, got {session!r:.40}") from None


def _size(size: Any, where: str) -> int:
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{where}: size must be an integer, got {size!r:.40}") from None
    if size < 0:
        raise InvalidArgument(f"{where}: size must be >= 0, got {size}")
    return size


def _check_size_fits(size: int, r) -> None:
    lay = _layout(r.layout) or {}
    cs = int(lay.get("chunk_size", 1 << 20))
    if size > cs << INDEX_BITS:
        raise InvalidArgument(f"size {size} exceeds the largest file of {cs << INDEX_BITS} bytes ({1 << INDEX_BITS} chunks of "
                              f"{cs})")

