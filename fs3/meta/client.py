"""MetaClient: the Python stub of the metadata service (one method per ``meta.*`` op).

It holds an RpcPool to every meta server of the cluster and fails over between them: a call
that cannot reach a server (refused, reset, timed out) goes to the next one, round after round
with a short backoff, until its deadline; then :class:`MetaUnavailable`. A meta restart is thus
invisible to a caller, apart from the wait.

[Note: retried calls] A call whose reply was lost may have been applied. Reads and most changes
are naturally idempotent when retried (``renew``, ``close``, ``setattr``, ``truncate``); an
exclusive create or a ``mkdir`` that meets its own earlier success answers ``Exists``, an
``unlink`` ``NotFound``: the client reports those as they come (a caller that cares, like the
FUSE daemon, sees the same as after a crash of a local file system between the call and its
return).

Every session the client opens (create, open with a session) is renewed by a background thread
every ``session_ttl / 3`` (one ``meta.renew`` for all of them); ``close()`` stops it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat as stat_mod
import threading
import time
import uuid
from dataclasses import dataclass
from dataclasses import field as _dc_field
from typing import Any

from network import (
    Credential,
    RemoteError,
    RpcError,
    RpcPool,
    TrafficClass,
    TransportError,
    client_credential,
    load_cluster,
)
from network.errors import AuthError, NoSuchMethod

from ..config import Fs3Config
from ..errors import MetaError, MetaUnavailable, NotFound, from_remote
from .schema import ROOT

__all__ = ["MetaClient", "Attrs", "ROOT", "field"]

log = logging.getLogger(__name__)

CLOSE_DELAY = 0.05  # s a deferred close waits for another call to carry it
_IFMT = {"file": stat_mod.S_IFREG, "dir": stat_mod.S_IFDIR, "symlink": stat_mod.S_IFLNK}


@dataclass(frozen=True)
class Attrs:
    """An inode's attributes (times in integer nanoseconds since the epoch)."""

    ino: int
    type: str
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime: int
    mtime: int
    ctime: int
    target: str | None = None
    parent: int | None = None
    layout: dict | None = _dc_field(default=None, compare=False)

    @classmethod
    def from_dict(cls, d: dict) -> Attrs:
        return cls(d["ino"], d["type"], d["mode"], d["uid"], d["gid"], d["nlink"], d["size"], d["atime"], d["mtime"],
                   d["ctime"], d.get("target"), d.get("parent"), d.get("layout"))

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    @property
    def is_symlink(self) -> bool:
        return self.type == "symlink"

    @property
    def st_mode(self) -> int:
        """The mode with its file-type bits (``stat.S_IFREG | 0o644``)."""
        return _IFMT.get(self.type, 0) | self.mode

    @property
    def blocks(self) -> int:
        """512-byte blocks (the size rounded up; fs3 does not track holes)."""
        return (self.size + 511) // 512

    def to_stat_result(self, dev: int = 0) -> os.stat_result:
        """An ``os.stat_result`` (what ``os.stat`` returns) for these attributes."""
        ns = 10**9
        return os.stat_result((self.st_mode, self.ino, dev, self.nlink, self.uid, self.gid, self.size,
                               self.atime // ns, self.mtime // ns, self.ctime // ns,
                               self.atime / ns, self.mtime / ns, self.ctime / ns,
                               self.atime, self.mtime, self.ctime))



def field(obj: Any, key: str, default: Any = None) -> Any:
    """A field of a reply that may be a dict or an object (:class:`Attrs`): ``obj[key]`` or ``obj.key``."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _attrs(d: dict) -> Attrs:
    return Attrs.from_dict(d)


def _looked_up(d: dict) -> Attrs:
    """A lookup's answer: the attributes, or NotFound (answered as ``{"absent": message}``)."""
    if "absent" in d:
        raise NotFound(d["absent"])
    return Attrs.from_dict(d)


class MetaClient:
    """The stub: ``MetaClient(cluster_or_endpoints, credential=None, user=None)``.

    ``cluster_or_endpoints``: a cluster description (path or ``Cluster``: every ``fs3.meta``
    server in it) or a list of ``(host, port)``. ``credential``: default ``$FIREFLYER_CREDENTIAL``,
    else the cluster key. ``user``: ``{"uid", "gids"}`` asserted on every call (honoured only
    for the cluster key; a job's credential carries its own uid); each method also takes
    ``user=`` for that call only (the FUSE daemon passes the kernel's requester).
    """

    def __init__(self, cluster_or_endpoints: Any, credential: Credential | None = None, user: dict | None = None, *,
                 timeout: float = 30.0, call_timeout: float = 10.0, session_ttl: float | None = None,
                 pool_size: int = 8, client_id: str | None = None) -> None:
        ttl = 60.0
        if isinstance(cluster_or_endpoints, list | tuple):
            endpoints = [(str(h), int(p)) for h, p in cluster_or_endpoints]
            if credential is None:
                credential = client_credential(None)
        else:
            c = load_cluster(cluster_or_endpoints) if isinstance(cluster_or_endpoints, str | os.PathLike) \
                else cluster_or_endpoints
            svc = c.service("fs3.meta")
            if svc is None or not svc.nodes:
                raise MetaUnavailable(f"{c.source}: no [[service]] with module = \"fs3.meta\"; add one (see "
                                      f"deploy/clusters/local.toml)")
            endpoints = [c.endpoint("fs3.meta", n) for n in svc.nodes]
            ttl = Fs3Config.from_cluster(c).session_ttl
            if credential is None:
                credential = client_credential(c)
        if not endpoints:
            raise MetaUnavailable("MetaClient: no meta server endpoints")
        self.endpoints = endpoints
        self.credential = credential
        self.user = user
        self.timeout = timeout
        self.call_timeout = call_timeout
        self.session_ttl = session_ttl or ttl
        self.client_id = client_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pools = [RpcPool(h, p, size=pool_size, credential=credential, timeout=call_timeout,
                               connect_timeout=min(3.0, call_timeout), traffic_class=TrafficClass.OTHER)
                       for h, p in endpoints]
        self._preferred = 0
        self._renew_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # [Note: deferred closes] sessions that wrote nothing end with the client's next call
        # (whatever it is: "closes" in its arguments) or, at the latest, CLOSE_DELAY later
        self._closes: list[list[int]] = []
        self._closes_cv = threading.Condition(threading.Lock())
        self._closer: threading.Thread | None = None
        self.stats = {"failovers": 0, "renewals": 0}

    # -- plumbing ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """End the deferred closes, stop renewing sessions and close the connections (also
        ``close()`` without arguments)."""
        self._stop.set()
        with self._closes_cv:
            self._closes_cv.notify_all()
        if self._closer is not None:
            self._closer.join(5)
        self._send_closes(timeout=min(self.timeout, 5.0))
        if self._renew_thread is not None:
            self._renew_thread.join(5)
        for p in self._pools:
            p.close()

    def __enter__(self) -> MetaClient:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def call(self, op: str, args: dict, *, user: dict | None = None, timeout: float | None = None) -> Any:
        """Call ``meta.<op>`` on a meta server, failing over until ``timeout`` (default: the
        client's); raises the :class:`MetaError` the server raised, or :class:`MetaUnavailable`."""
        args, closes = self._with(args, user)
        try:
            return self._call(op, args, timeout)
        except BaseException:
            self._unsent(closes)  # maybe not ended: again with the next call (ending one twice is harmless)
            raise

    def _with(self, args: dict, user: dict | None) -> tuple[dict, list | None]:
        """``args`` with the user to act as and the deferred closes waiting to ride along (taken)."""
        u = user if user is not None else self.user
        if u is not None:
            args = {**args, "user": u}
        closes = None
        if self._closes:
            with self._closes_cv:
                closes, self._closes = self._closes, []
            if closes:
                args = {**args, "closes": closes}
        return args, closes

    def _unsent(self, closes: list | None) -> None:
        """Deferred closes whose call failed go back to the front of the queue."""
        if closes:
            with self._closes_cv:
                self._closes[:0] = closes

    def _call(self, op: str, args: dict, timeout: float | None) -> Any:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        n = len(self._pools)
        start = self._preferred
        delay = 0.05
        last: Exception | None = None
        attempt = refused = refused_rounds = 0
        while True:
            i = (start + attempt) % n
            try:
                res = self._pools[i].call(f"meta.{op}", args, timeout=max(0.1, min(self.call_timeout,
                                                                               deadline - time.monotonic()))).result
                if i != self._preferred:
                    self._preferred = i
                return res
            except RemoteError as exc:
                err = from_remote(exc)
                if not isinstance(err, MetaUnavailable):
                    raise err from None
                last = err
            except NoSuchMethod:
                raise
            except (TransportError, RpcError, OSError) as exc:
                last = exc
                if isinstance(exc, AuthError):
                    refused += 1
            attempt += 1
            self.stats["failovers"] += 1
            if attempt % n == 0:
                # every server refused the credential two rounds in a row: waiting will not help
                # (one round may be a dying server resetting a connection in its handshake)
                refused_rounds = refused_rounds + 1 if refused == n else 0
                if refused_rounds == 2:
                    raise last  # type: ignore[misc]
                refused = 0
            if time.monotonic() >= deadline:
                raise MetaUnavailable(f"meta.{op}: no meta server answered within "
                                      f"{self.timeout if timeout is None else timeout} s "
                                      f"({', '.join(f'{h}:{p}' for h, p in self.endpoints)}); last error: {last}")
            if attempt % n == 0:
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 1.0)

    # -- split-phase calls (an event loop's thread: the FUSE daemon) ------------------------------
    def prepare(self, op: str, **kw) -> tuple[dict, Any] | None:
        """The wire arguments of method ``op`` called with ``kw`` (``user`` apart) and the function
        that turns the reply into that method's result, for the ops a caller may run split-phase
        (:meth:`begin`); None for the others (call the method)."""
        if op == "lookup":
            return {"parent": kw["parent"], "name": kw["name"], "absent_ok": True}, _looked_up
        if op == "stat":
            return {**self._inode(kw.get("ino"), kw.get("path")), "follow": kw.get("follow", True)}, _attrs
        if op == "create":
            args = {**self._named(kw.get("path"), kw.get("parent"), kw.get("name")), "mode": kw.get("mode", 0o644),
                    "excl": kw.get("excl", False), "trunc": kw.get("trunc", False), "write": kw.get("write", True),
                    "client": self.client_id}
            if kw.get("session") is not None:
                args["session"] = kw["session"]
            return args, self._opened
        if op == "open":
            args = {**self._inode(kw.get("ino"), kw.get("path")), "write": kw.get("write", False),
                    "trunc": kw.get("trunc", False), "session": kw.get("session", False), "client": self.client_id}
            if kw.get("read") is not None:
                args["read"] = kw["read"]
            return args, self._opened
        if op in ("close", "sync") and kw.get("ino") is not None:
            return {"ino": kw["ino"], "session": kw.get("session"), "wrote": kw.get("wrote", op == "sync"),
                    "length": kw.get("length"), "mtime": kw.get("mtime")}, _attrs
        return None

    def _opened(self, r: dict) -> dict:
        r["attrs"] = _attrs(r["attrs"])
        self._session_opened(r.get("session"))
        return r

    def begin(self, op: str, args: dict, *, user: dict | None = None) -> Any:
        """Send ``meta.<op>`` to the preferred server if that cannot block (a free connection, open
        and recently used): a pending call whose ``fileno()`` turns readable when the reply comes;
        :meth:`finish` reads it. None when it could block: call :meth:`call` instead (in a thread).
        No failover here: a failed split-phase call is for the caller to retry with :meth:`call`."""
        args, closes = self._with(args, user)
        try:
            pending = self._pools[self._preferred].begin(f"meta.{op}", args, timeout=self.call_timeout, nowait=True)
        except BaseException:
            pending = None
        if pending is None:
            self._unsent(closes)
            return None
        pending.closes = closes
        return pending

    def finish(self, pending: Any) -> Any:
        """The result of a :meth:`begin` call: raises the server's :class:`MetaError`, or the
        transport's error (the call may or may not have been applied; retry with :meth:`call`)."""
        try:
            return pending.wait().result
        except RemoteError as exc:
            raise from_remote(exc) from None
        except BaseException:
            self._unsent(pending.closes)
            raise

    def abandon(self, pending: Any) -> None:
        """Give up on a :meth:`begin` call (its waiter was cancelled): its connection is closed."""
        pending.abandon()
        self._unsent(pending.closes)

    def _session_opened(self, sid: str | None) -> None:
        if sid is None:
            return
        with self._lock:
            if self._renew_thread is None:
                self._renew_thread = threading.Thread(target=self._renew_loop, name="fs3-meta-renew", daemon=True)
                self._renew_thread.start()

    def close_later(self, ino: int, session: int) -> None:
        """End a session that wrote nothing without waiting (see [Note: deferred closes]): with
        this client's next call, or within ``CLOSE_DELAY`` s; :meth:`shutdown` ends the rest.
        Until then the session only keeps an unlinked file's chunks a moment longer."""
        with self._closes_cv:
            self._closes.append([int(ino), int(session)])
            if self._closer is None:
                self._closer = threading.Thread(target=self._close_loop, name="fs3-meta-closes", daemon=True)
                self._closer.start()
            elif len(self._closes) == 1:
                self._closes_cv.notify()

    def _close_loop(self) -> None:
        while not self._stop.is_set():
            with self._closes_cv:
                while not self._closes and not self._stop.is_set():
                    self._closes_cv.wait()
            if self._stop.wait(CLOSE_DELAY):
                return  # shutdown sends what is left
            self._send_closes()

    def _send_closes(self, timeout: float | None = None) -> None:
        if not self._closes:
            return
        try:
            self.call("closes", {}, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - logged  # kept: tried again with the next call
            log.warning("fs3.meta: ending %d sessions of %s failed (retrying): %s", len(self._closes),
                        self.client_id, exc)

    def _renew_loop(self) -> None:
        period = max(0.05, self.session_ttl / 3)
        while not self._stop.wait(period):
            try:
                self.renew()
                self.stats["renewals"] += 1
            except MetaError as exc:
                log.warning("fs3.meta: renewing the sessions of %s failed (retrying in %.1f s): %s", self.client_id,
                            period, exc)

    @staticmethod
    def _named(path: str | None = None, parent: int | None = None, name: str | None = None) -> dict:
        if path is not None:
            return {"path": path}
        return {"parent": parent, "name": name}

    @staticmethod
    def _inode(ino: int | None = None, path: str | None = None) -> dict:
        return {"ino": ino} if ino is not None else {"path": path}

    # -- reads ------------------------------------------------------------------------------------
    def stat(self, path: str | None = None, ino: int | None = None, follow: bool = True, *,
             user: dict | None = None) -> Attrs:
        args, done = self.prepare("stat", ino=ino, path=path, follow=follow)
        return done(self.call("stat", args, user=user))

    def batch_stat(self, inos: list[int] | None = None, paths: list[str] | None = None, *,
                   user: dict | None = None) -> list[Attrs | MetaError]:
        """Attributes of many inodes or paths in one call; a failed item is its MetaError."""
        from ..errors import _META  # the class by name

        args = {"inos": list(inos)} if inos is not None else {"paths": list(paths or [])}
        out: list[Attrs | MetaError] = []
        for it in self.call("batch_stat", args, user=user)["items"]:
            if "error" in it:
                out.append(_META.get(it["error"], MetaError)(it.get("message", it["error"])))
            else:
                out.append(_attrs(it))
        return out

    def lookup(self, parent: int, name: str, *, user: dict | None = None) -> Attrs:
        args, done = self.prepare("lookup", parent=parent, name=name)
        return done(self.call("lookup", args, user=user))

    def readdir(self, ino: int | None = None, path: str | None = None, after: str = "", limit: int = 1000,
                plus: bool = False, *, user: dict | None = None) -> dict:
        """One page: ``{"entries": [{"name", "ino", "type", "attrs"?: Attrs}], "more": bool}``."""
        r = self.call("readdir", {**self._inode(ino, path), "after": after, "limit": limit, "plus": plus}, user=user)
        if plus:
            for e in r["entries"]:
                e["attrs"] = _attrs(e["attrs"])
        return r

    def listdir(self, ino: int | None = None, path: str | None = None, plus: bool = False, *,
                user: dict | None = None, page: int = 1000):
        """Every entry of a directory, page by page (a generator)."""
        after = ""
        while True:
            r = self.readdir(ino, path, after=after, limit=page, plus=plus, user=user)
            yield from r["entries"]
            if not r["more"] or not r["entries"]:
                return
            after = r["entries"][-1]["name"]

    def readlink(self, path: str | None = None, ino: int | None = None, *, user: dict | None = None) -> str:
        return self.call("readlink", self._inode(ino, path), user=user)["target"]

    def realpath(self, path: str, *, user: dict | None = None) -> str:
        return self.call("realpath", {"path": path}, user=user)["path"]

    def statfs(self, *, user: dict | None = None) -> dict:
        return self.call("statfs", {}, user=user)

    # -- files ------------------------------------------------------------------------------------
    def create(self, path: str | None = None, mode: int = 0o644, excl: bool = False, trunc: bool = False,
               write: bool = True, *, parent: int | None = None, name: str | None = None, session: bool | None = None,
               user: dict | None = None) -> dict:
        """``{"attrs": Attrs, "session": id or None, "created": bool, "cap"?: dict}``."""
        args, done = self.prepare("create", path=path, parent=parent, name=name, mode=mode, excl=excl, trunc=trunc,
                                  write=write, session=session)
        return done(self.call("create", args, user=user))

    def open(self, path: str | None = None, ino: int | None = None, write: bool = False, trunc: bool = False,
             session: bool = False, *, read: bool | None = None, user: dict | None = None) -> dict:
        """``{"attrs": Attrs, "session": id or None, "cap"?: dict}``."""
        args, done = self.prepare("open", ino=ino, path=path, write=write, trunc=trunc, session=session, read=read)
        return done(self.call("open", args, user=user))

    def close(self, ino: int | None = None, session: int | None = None, wrote: bool = False,
              length: int | None = None, mtime: int | None = None, *, user: dict | None = None) -> Attrs | None:
        """``meta.close`` of a file's session; without ``ino``, :meth:`shutdown` (closes this client)."""
        if ino is None:
            self.shutdown()
            return None
        return self.close_file(ino, session, wrote, length, mtime, user=user)

    def close_file(self, ino: int, session: int | None, wrote: bool = False, length: int | None = None,
                   mtime: int | None = None, *, user: dict | None = None) -> Attrs:
        """``meta.close``: end a session (``wrote``: make the length exact; ``length``: the end of
        the highest write; ``mtime`` in ns)."""
        return _attrs(self.call("close", {"ino": ino, "session": session, "wrote": wrote, "length": length,
                                          "mtime": mtime}, user=user))

    def sync(self, ino: int, session: int | None, wrote: bool = True, length: int | None = None, *,
             mtime: int | None = None, user: dict | None = None) -> Attrs:
        return _attrs(self.call("sync", {"ino": ino, "session": session, "wrote": wrote, "length": length,
                                         "mtime": mtime}, user=user))

    def renew(self) -> int:
        return self.call("renew", {"client": self.client_id})["renewed"]

    def truncate(self, path: str | None = None, size: int = 0, *, ino: int | None = None, session: int | None = None,
                 user: dict | None = None) -> Attrs:
        return _attrs(self.call("truncate", {**self._inode(ino, path), "size": size, "session": session}, user=user))

    def setattr(self, path: str | None = None, *, ino: int | None = None, mode: int | None = None,
                uid: int | None = None, gid: int | None = None, atime: int | str | None = None,
                mtime: int | str | None = None, size: int | None = None, follow: bool = True,
                user: dict | None = None) -> Attrs:
        """chmod, chown, utimens ("now" or ns), truncate: whichever are given."""
        args: dict = {**self._inode(ino, path), "follow": follow}
        for k, v in (("mode", mode), ("uid", uid), ("gid", gid), ("atime", atime), ("mtime", mtime), ("size", size)):
            if v is not None:
                args[k] = v
        return _attrs(self.call("setattr", args, user=user))

    # -- namespace --------------------------------------------------------------------------------
    def mkdir(self, path: str | None = None, mode: int = 0o755, parents: bool = False, *, parent: int | None = None,
              name: str | None = None, user: dict | None = None) -> Attrs:
        return _attrs(self.call("mkdir", {**self._named(path, parent, name), "mode": mode, "parents": parents},
                                user=user))

    def symlink(self, path: str | None = None, target: str = "", *, parent: int | None = None,
                name: str | None = None, user: dict | None = None) -> Attrs:
        return _attrs(self.call("symlink", {**self._named(path, parent, name), "target": target}, user=user))

    def link(self, path: str | None = None, new_path: str | None = None, *, ino: int | None = None,
             new_parent: int | None = None, new_name: str | None = None, user: dict | None = None) -> Attrs:
        args = {**self._inode(ino, path)}
        if new_path is not None:
            args["new_path"] = new_path
        else:
            args.update(new_parent=new_parent, new_name=new_name)
        return _attrs(self.call("link", args, user=user))

    def unlink(self, path: str | None = None, *, parent: int | None = None, name: str | None = None,
               user: dict | None = None) -> None:
        self.call("unlink", self._named(path, parent, name), user=user)

    def rmdir(self, path: str | None = None, *, parent: int | None = None, name: str | None = None,
              user: dict | None = None) -> None:
        self.call("rmdir", self._named(path, parent, name), user=user)

    def remove(self, path: str | None = None, recursive: bool = False, *, parent: int | None = None,
               name: str | None = None, user: dict | None = None) -> int:
        return self.call("remove", {**self._named(path, parent, name), "recursive": recursive}, user=user)["removed"]

    def rename(self, src: str | None = None, dst: str | None = None, noreplace: bool = False, *,
               src_parent: int | None = None, src_name: str | None = None, dst_parent: int | None = None,
               dst_name: str | None = None, user: dict | None = None) -> None:
        if src is not None:
            args: dict = {"src": src, "dst": dst}
        else:
            args = {"src_parent": src_parent, "src_name": src_name, "dst_parent": dst_parent, "dst_name": dst_name}
        args["noreplace"] = noreplace
        self.call("rename", args, user=user)
