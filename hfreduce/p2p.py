"""Point-to-point messages and all_to_all: a lazily connected mesh between the ranks.

Every rank listens on its node's address (traffic class HFREDUCE) from start-up; the endpoints
travel with the tree and lane endpoints in the rendezvous. A rank opens a connection to a peer the first time it has
something to say to it (a message, an acknowledgement, an abort), and says who it is with the
group's session, as the tree and lane connections do; each direction of a pair has its own
connection, so there is no race over who connects. One reader thread per incoming connection
matches frames against the receives posted for ``(source, channel, tag)``; one sender thread per
outgoing connection sends the queued messages in order. Messages between a pair with the same
tag therefore arrive in order, and a message that arrives before its receive is posted waits in
an "unexpected" queue (FIFO per key), so a receive posted for another tag is never blocked.

[Note: one copy per byte on a node]
Between two ranks of one node that can read each other's memory (the single-copy probe of the
start-up, ``pg.cma``), a message carries no payload: the frame names the sender's buffer (pid,
address, size) and the receiver copies it straight into its receive buffer with
``process_vm_readv`` (the kernel copies once), then acknowledges; the sender's work completes on
the acknowledgement, as only then is its buffer free again. A registered buffer
(``hfreduce.empty``) is read the same way. When the receive is not posted yet, the descriptor
waits in the unexpected queue and the receiver copies it when the receive is posted: still one
copy. Between nodes the payload follows the frame on the connection and is received straight
into a posted receive buffer (or into a fresh one when the receive comes later).

[Note: failures]
The same rules as the collectives: a wait never blocks longer than the group's timeout without
progress; a peer whose connection closes, a local peer whose process is gone, or the node's abort
word (a failure recorded by any local rank or relayed by the leaders) turns every pending and
later operation into that error. A rank that gives up on a peer (a timeout, a size mismatch)
records the failure on its node and sends an ABORT frame naming the culprit to the peers of the
operation, so every rank involved raises, never hangs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np

from network.errors import NetworkError
from network.transport import Connection, TrafficClass, connect

from . import kernels as K
from .buffers import Buf, as_buf
from .engine import Work
from .errors import (
    HFReduceError,
    HFReduceTimeout,
    InvalidArgument,
    MismatchError,
    PeerFailed,
    error_from_wire,
    error_to_wire,
)
from .shm import process_start_time
from .sync import POLL

__all__ = ["Mesh", "P2PWork"]

log = logging.getLogger(__name__)

USER, A2A = 0, 1  # channels: user messages (send/recv) and all_to_all's own
PROBE = 1.0  # seconds between liveness probes of the remote peers a wait waits for


# -- cross-memory attach -----------------------------------------------------------------------------
class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_readv = getattr(_libc, "process_vm_readv", None)
if _readv is not None:
    _readv.restype = ctypes.c_ssize_t
    _readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.POINTER(_IoVec),
                       ctypes.c_ulong, ctypes.c_ulong]


def cma_read(pid: int, remote: int, local: int, nbytes: int) -> None:
    """Copy ``nbytes`` from ``remote`` in process ``pid`` to ``local`` here (ctypes drops the GIL)."""
    done = 0
    while done < nbytes:
        n = min(nbytes - done, 1 << 30)
        li, ri = _IoVec(local + done, n), _IoVec(remote + done, n)
        got = _readv(pid, ctypes.byref(li), 1, ctypes.byref(ri), 1, 0)
        if got <= 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err) if err else "short read")
        done += got


# -- work ------------------------------------------------------------------------------------------
class P2PWork(Work):
    """A send, a receive, or an all_to_all (a set of them): ``wait(timeout)``, ``is_completed()``.

    ``wait()`` without a timeout is bounded by the group's: no progress from the peer within it
    is an :class:`HFReduceTimeout` naming the peer, raised here and, through an ABORT frame, on
    the peer.
    """

    def __init__(self, mesh: Mesh, name: str, nbytes: int, peers: list[int], keep: Any = None,
                 parts: list[P2PWork] | None = None) -> None:
        super().__init__(SimpleNamespace(name=name, nbytes=nbytes, keep=keep))
        self.mesh = mesh
        self.peers = peers
        self.parts = parts or []
        self._lock = threading.RLock()
        self._parent: P2PWork | None = None
        self._left = len(self.parts)
        for p in self.parts:  # a part may have finished already (posted before this work existed)
            with p._lock:
                p._parent = self
                done, err = p._event.is_set(), p._error
            if done:
                self._part_done(err)
        if parts is not None and not parts:
            self._finish()

    def _finish(self, error: HFReduceError | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            super()._finish(error)
            parent = self._parent
        if parent is not None:
            parent._part_done(error)

    def _part_done(self, error: HFReduceError | None) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if error is not None:
            self._finish(error)
        elif last:
            self._finish()

    def pending_peers(self) -> list[int]:
        if self.parts:
            return [q for p in self.parts if not p.is_completed() for q in p.peers]
        return self.peers

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done; raise its error. With ``timeout``, an :class:`HFReduceTimeout` after
        that long (the operation keeps running: wait again), unless the group's own timeout
        passed first without progress, which fails the group as above. Both watch the peers."""
        self.mesh.wait(self, timeout)
        return super().wait(0)


class _Recv:
    __slots__ = ("buf", "work", "key")

    def __init__(self, buf: np.ndarray, work: P2PWork, key: tuple) -> None:
        self.buf, self.work, self.key = buf, work, key


class _Msg:
    """A message that arrived before its receive: its bytes (``data``) or where they lie in the
    sender's memory (``remote`` = (pid, address, message id))."""

    __slots__ = ("n", "data", "remote", "ready", "error")

    def __init__(self, n: int) -> None:
        self.n = n
        self.data: np.ndarray | None = None
        self.remote: tuple[int, int, int] | None = None
        self.ready = threading.Event()
        self.error: HFReduceError | None = None


# -- the mesh ----------------------------------------------------------------------------------------
class Mesh:
    """This rank's end of the point-to-point mesh (see the module docstring)."""

    def __init__(self, pg: Any, listener: Any, endpoints: list) -> None:
        """``listener``: this rank's (made before the rendezvous's endpoint exchange; None in a
        group of one); ``endpoints``: every rank's [address, port] from that exchange."""
        self.pg = pg
        self.rank, self.world = pg.rank, pg.world_size
        self.timeout = pg.timeout
        self.session = pg.session
        self.sync = pg._sync
        self.node_of = pg.node_of
        self.node_names = pg.node_names
        self.pids, self.starts = pg._pids, pg._starts
        self.cma = bool(pg.cma) and _readv is not None  # pg.cma: the probe passed and HFREDUCE_CMA is on
        endpoints = [e for e in endpoints if e] if listener is not None else []  # a group of one: none
        self.addr = endpoints[self.rank][0] if endpoints else "127.0.0.1"
        self._lock = threading.Lock()
        self._posted: dict[tuple, deque[_Recv]] = {}
        self._unexpected: dict[tuple, deque[_Msg]] = {}
        self._acks: dict[int, tuple[P2PWork, int]] = {}
        self._next_id = 0
        self._dead: dict[int, HFReduceError] = {}
        self.error: HFReduceError | None = None
        self._out: dict[int, Connection] = {}
        self._out_locks = [threading.Lock() for _ in range(self.world)]
        self._queues: dict[int, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self._in: list[Connection] = []
        self._closed = False
        self.a2a_seq = 0
        self.single_copy_msgs = 0  # messages copied straight from a local peer's memory
        self.endpoints: list[tuple[str, int]] = [(str(h), int(p)) for h, p in endpoints]
        self.listener = listener
        if listener is not None:
            self._spawn(self._accept_loop, "hfreduce-p2p-accept")

    # -- helpers ------------------------------------------------------------------------------------
    def _spawn(self, fn, name: str, *args) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def who(self, r: int) -> str:
        return f"rank {r} (node {self.node_names[self.node_of[r]]})"

    def local(self, r: int) -> bool:
        return self.node_of[r] == self.node_of[self.rank]

    def _check_peer(self, r: int, what: str) -> None:
        if not isinstance(r, int | np.integer) or isinstance(r, bool) or not 0 <= r < self.world:
            raise InvalidArgument(f"{what}={r!r} is not a rank of this group (0..{self.world - 1})")
        if r == self.rank:
            raise InvalidArgument(f"{what}={r} is this rank itself (a rank cannot send to or receive from itself)")

    def check(self) -> None:
        """Raise the group's failure, if any (this mesh's, or one recorded on the node)."""
        if self._closed:
            raise HFReduceError("the process group was destroyed; call hfreduce.init() again")
        if self.error is not None:
            raise self.error
        if self.sync is not None and self.sync.aborted():
            self.sync.check()

    def fail(self, err: HFReduceError, notify: list[int] = ()) -> HFReduceError:
        """The group failed with ``err``: remember it, record it on the node, fail everything
        pending, and tell ``notify`` (best effort) so they raise too."""
        with self._lock:
            first = self.error is None
            if first:
                self.error = err
            err = self.error
            posted = [r for q in self._posted.values() for r in q]
            self._posted.clear()
            acks = [w for w, _ in self._acks.values()]
            self._acks.clear()
            waiting = [m for q in self._unexpected.values() for m in q if not m.ready.is_set()]
        if first and self.sync is not None:
            try:
                self.sync.record(err)
            except (ValueError, TypeError):  # the arena is gone (destroyed)
                pass
        for r in posted:
            r.work._finish(err)
        for w in acks:
            w._finish(err)
        for m in waiting:
            m.error = err
            m.ready.set()
        if first:
            body = msgpack.packb({"k": "x", "e": error_to_wire(err)})
            for p in notify:
                if p != self.rank and p not in self._dead:
                    self._send_abort(p, body)
        return err

    def _send_abort(self, p: int, body: bytes) -> None:
        """Best effort, without cutting into a frame another thread is sending: when the
        connection stays busy for a second, close it instead (the peer then sees it closed)."""
        quick = min(1.0, self.timeout)
        try:
            c = self._conn(p, timeout=quick)
        except (NetworkError, HFReduceError, OSError):
            return
        lock = self._out_locks[p]
        if not lock.acquire(timeout=quick):
            c.close()
            return
        try:
            c.send(body, timeout=quick)
        except (NetworkError, OSError):
            c.close()
        finally:
            lock.release()

    # -- connections --------------------------------------------------------------------------------
    def _conn(self, dst: int, timeout: float | None = None) -> Connection:
        c = self._out.get(dst)
        if c is not None:
            return c
        with self._out_locks[dst]:
            c = self._out.get(dst)
            if c is None:
                c = self._connect(dst, timeout)
                self._out[dst] = c
        return c

    def _connect(self, dst: int, timeout: float | None) -> Connection:
        """Connect to ``dst``'s listener. [Note: a refused connection is a gone peer] The
        listener was up before the endpoints were exchanged and lives as long as the group, so a
        refusal means the peer died or left: three quick tries, not the group's timeout (which
        may be 30 minutes), and never longer than 10 s for an unanswered handshake."""
        host, port = self.endpoints[dst]
        limit = min(timeout or self.timeout, 10.0)
        last: Exception | None = None
        for attempt in range(3):
            if attempt:
                time.sleep(0.05 * attempt)
            try:
                c = connect(host, port, timeout=limit, traffic_class=TrafficClass.HFREDUCE, retry=False,
                            source=self.addr if self.addr not in ("0.0.0.0", "") else None,
                            io_timeout=self.timeout)
                c.send(msgpack.packb({"s": self.session, "from": self.rank}))
                return c
            except NetworkError as exc:
                last = exc
        raise PeerFailed(f"{self.who(dst)} cannot be reached: it died or left the group ({last})", rank=dst,
                         node=self.node_names[self.node_of[dst]], detected_by=self.rank)

    def _probe(self, r: int) -> HFReduceError | None:
        """Is remote peer ``r`` still there? [Note: probing a remote peer] A local peer is
        watched by pid; a remote one that this rank waits for may never have connected, so
        this rank connects to it (refused: gone) and peeks at its own connection, on which the
        peer never sends: readable end-of-file means the peer's process closed it (died or left)."""
        try:
            c = self._conn(r)
        except PeerFailed as exc:
            return exc
        try:
            data = c.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            data, why = b"", exc.strerror
        else:
            why = "connection closed"
        if data:
            return None
        return PeerFailed(f"{self.who(r)} died or left the group ({why})", rank=r,
                          node=self.node_names[self.node_of[r]], detected_by=self.rank)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                c = self.listener.accept(timeout=0.5)
            except (NetworkError, OSError, AttributeError):
                if self._closed:
                    return
                continue
            try:
                h = msgpack.unpackb(c.recv(timeout=self.timeout).header)
                src = h.get("from")
                if h.get("s") != self.session or not isinstance(src, int) or not 0 <= src < self.world:
                    c.close()
                    log.warning("hfreduce p2p: a connection from another group was refused")
                    continue
            except (NetworkError, ValueError, OSError):
                c.close()
                continue
            self._in.append(c)
            self._spawn(self._read_loop, f"hfreduce-p2p-from-{src}", c, src)

    # -- receiving ----------------------------------------------------------------------------------
    def _read_loop(self, c: Connection, src: int) -> None:
        while True:
            try:
                header, plen = c.recv_header(timeout=None)
                h = msgpack.unpackb(header)
            except (NetworkError, ValueError, OSError) as exc:
                if not self._closed:
                    self._peer_gone(src, exc)
                return
            try:
                kind = h["k"]
                if kind == "d":
                    self._on_data(c, src, h, plen)
                elif kind == "a":
                    self._on_ack(h)
                elif kind == "x":
                    self.fail(error_from_wire(h["e"]))
            except (NetworkError, OSError) as exc:
                if not self._closed:
                    self._peer_gone(src, exc)
                return

    def _peer_gone(self, src: int, exc: BaseException) -> None:
        """``src``'s connection closed: wait briefly for a precise diagnosis (an ABORT frame, the
        node's record), else fail what waits for ``src``."""
        if self.error is not None:
            return
        if self.sync is not None:
            try:
                diag = self.sync.await_error(min(1.0, self.timeout),
                                             stop=lambda: self._closed or self.error is not None)
            except (ValueError, TypeError):  # the group is being destroyed: its arena is gone
                return
            if diag is not None and self.error is None:
                self.fail(diag)
                return
        if self.error is not None or self._closed:
            return
        err = PeerFailed(f"{self.who(src)} died, left the group or lost its connection ({exc})", rank=src,
                         node=self.node_names[self.node_of[src]], detected_by=self.rank)
        with self._lock:
            self._dead[src] = err
            pending = any(k[0] == src for k, q in self._posted.items() if q) or \
                any(w.peers == [src] for w, _ in self._acks.values())
        if pending:
            self.fail(err)

    def _on_data(self, c: Connection, src: int, h: dict, plen: int) -> None:
        key, n = (src, h["c"], h["t"]), h["n"]
        remote = (h["p"], h["a"], h["i"]) if "a" in h else None
        with self._lock:
            q = self._posted.get(key)
            r = q.popleft() if q else None
            if r is None:
                m = _Msg(n)
                self._unexpected.setdefault(key, deque()).append(m)
        if r is not None:
            if n != r.buf.nbytes:
                if plen:
                    c.skip_payload(plen, timeout=self.timeout)
                self._mismatch(src, key, n, r.buf.nbytes, r.work, remote)
                return
            if remote is not None:
                self._copy_remote(src, remote, r.buf, r.work)
            else:
                if plen:
                    c.recv_payload_into(r.buf, plen, timeout=self.timeout)
                r.work._finish()
            return
        if remote is not None:
            m.remote = remote
        else:
            m.data = np.empty(n, np.uint8)
            if plen:
                c.recv_payload_into(m.data, plen, timeout=self.timeout)
        m.ready.set()

    def _copy_remote(self, src: int, remote: tuple[int, int, int], buf: np.ndarray, work: P2PWork) -> None:
        pid, addr, mid = remote
        err = None
        try:
            if buf.nbytes:
                cma_read(pid, addr, buf.__array_interface__["data"][0], buf.nbytes)
            self.single_copy_msgs += 1
        except OSError as exc:
            err = PeerFailed(f"reading the message of {self.who(src)} from its memory failed: {exc.strerror} "
                             "(set HFREDUCE_CMA=0 to send through the connection instead)", rank=src,
                             node=self.node_names[self.node_of[src]], detected_by=self.rank)
        self._ack(src, mid, err)
        work._finish(self.fail(err) if err else None)

    def _ack(self, dst: int, mid: int, err: HFReduceError | None = None) -> None:
        body = {"k": "a", "i": mid}
        if err is not None:
            body["e"] = error_to_wire(err)
        try:
            c = self._conn(dst)
            with self._out_locks[dst]:
                c.send(msgpack.packb(body))
        except (NetworkError, HFReduceError, OSError):
            pass  # the sender's own wait names the failure

    def _on_ack(self, h: dict) -> None:
        with self._lock:
            w, _ = self._acks.pop(h["i"], (None, None))
        if w is not None:
            w._finish(self.fail(error_from_wire(h["e"])) if "e" in h else None)

    def _mismatch(self, src: int, key: tuple, n: int, want: int, work: P2PWork, remote) -> None:
        what = f"all_to_all #{key[2]}" if key[1] == A2A else f"tag {key[2]}"
        err = MismatchError(f"{self.who(src)} sent {n} bytes ({what}) to rank {self.rank}, which expected {want} "
                            "bytes (mismatched sizes or splits)", rank=src, node=self.node_names[self.node_of[src]],
                            detected_by=self.rank)
        if remote is not None:
            self._ack(src, remote[2], err)
        work._finish(self.fail(err, notify=[src]))

    def post_recv(self, buf: np.ndarray, src: int, chan: int, tag: int, work: P2PWork) -> None:
        key = (src, chan, tag)
        with self._lock:
            q = self._unexpected.get(key)
            m = q.popleft() if q else None
            if m is None:
                dead = self._dead.get(src)
                if dead is None:
                    self._posted.setdefault(key, deque()).append(_Recv(buf, work, key))
                    return
        if m is None:
            work._finish(self.fail(dead))
            return
        if not m.ready.wait(self.timeout * 1.25 + 0.5):
            work._finish(self.fail(self._timeout(src, "its message did not arrive"), notify=[src]))
            return
        if m.error is not None:
            work._finish(m.error)
            return
        if m.n != buf.nbytes:
            self._mismatch(src, key, m.n, buf.nbytes, work, m.remote)
            return
        if m.remote is not None:
            self._copy_remote(src, m.remote, buf, work)
        else:
            if m.n:
                K.copy(buf, m.data)
            work._finish()

    # -- sending ------------------------------------------------------------------------------------
    def post_send(self, buf: np.ndarray, dst: int, chan: int, tag: int, work: P2PWork) -> None:
        if self.cma and self.local(dst):
            # [Note: descriptors go out inline] a single-copy message is a small frame: sending it
            # from the caller's thread saves a hand-off to the sender thread (under the GIL, up
            # to a switch interval when the caller runs Python meanwhile); every message to a
            # local peer goes this way, so the order per pair holds.
            self._send_one(dst, buf, chan, tag, work)
            return
        q = self._queues.get(dst)
        if q is None:
            with self._lock:
                q = self._queues.get(dst)
                if q is None:
                    q = self._queues[dst] = queue.SimpleQueue()
                    self._spawn(self._send_loop, f"hfreduce-p2p-to-{dst}", dst, q)
        q.put((buf, chan, tag, work))

    def _send_loop(self, dst: int, q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            buf, chan, tag, work = item
            self._send_one(dst, buf, chan, tag, work)

    def _send_one(self, dst: int, buf: np.ndarray, chan: int, tag: int, work: P2PWork) -> None:
        if self.error is not None:
            work._finish(self.error)
            return
        h: dict[str, Any] = {"k": "d", "c": chan, "t": tag, "n": int(buf.nbytes)}
        try:
            c = self._conn(dst)
            if self.cma and self.local(dst):
                with self._lock:
                    mid = self._next_id
                    self._next_id += 1
                    self._acks[mid] = (work, dst)
                h.update(i=mid, p=os.getpid(), a=buf.__array_interface__["data"][0])
                with self._out_locks[dst]:
                    c.send(msgpack.packb(h))
            else:
                with self._out_locks[dst]:
                    c.send(msgpack.packb(h), buf)
                work._finish()
        except HFReduceError as exc:
            work._finish(self.fail(exc))
        except (NetworkError, OSError) as exc:
            if self._closed:
                work._finish(HFReduceError("the process group was destroyed"))
                return
            diag = self.sync.await_error(min(1.0, self.timeout)) if self.sync is not None else None
            work._finish(self.fail(diag or PeerFailed(
                f"{self.who(dst)} died or lost its connection while rank {self.rank} sent to it ({exc})",
                rank=dst, node=self.node_names[self.node_of[dst]], detected_by=self.rank)))

    # -- waiting ------------------------------------------------------------------------------------
    def _timeout(self, r: int, what: str) -> HFReduceTimeout:
        return HFReduceTimeout(f"{self.who(r)} made no progress for {self.timeout:.1f} s: {what} (rank {self.rank} "
                               "waited; a stuck, stopped or much slower peer, or mismatched calls)", rank=r,
                               node=self.node_names[self.node_of[r]], detected_by=self.rank)

    def wait(self, work: P2PWork, timeout: float | None = None) -> None:
        """Wait for ``work``, watching the failure state, local peers' liveness and the group's
        deadline; a caller's ``timeout`` ends the wait only (HFReduceTimeout, work still running)."""
        now = time.monotonic()
        deadline = now + self.timeout
        until = None if timeout is None else now + timeout
        next_probe = now + PROBE
        while not work._event.wait(POLL if until is None else max(0.0, min(POLL, until - time.monotonic()))):
            if self.error is not None:
                work._finish(self.error)
                break
            if self.sync is not None and self.sync.aborted():
                err = self.sync.first_error() or HFReduceError("the group was aborted")
                work._finish(self.fail(err, notify=work.peers))
                break
            pending = work.pending_peers()
            for r in pending:
                if self.local(r) and process_start_time(self.pids[r]) != self.starts[r]:
                    err = PeerFailed(f"{self.who(r)} (pid {self.pids[r]}) died", rank=r,
                                     node=self.node_names[self.node_of[r]], detected_by=self.rank)
                    work._finish(self.fail(err, notify=work.peers))
                    break
            if work.is_completed():
                break
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE
                for r in pending:
                    err = None if self.local(r) else self._probe(r)
                    if err is not None:
                        work._finish(self.fail(err, notify=work.peers))
                        break
                if work.is_completed():
                    break
            if time.monotonic() >= deadline and pending:
                err = self._timeout(pending[0], f"{work.spec.name} waited for it")
                work._finish(self.fail(err, notify=work.peers))
                break
            if until is not None and time.monotonic() >= until:
                raise HFReduceTimeout(f"{work.spec.name} did not complete within {timeout} s (still running)")

    # -- the operations -----------------------------------------------------------------------------
    def isend(self, b: Buf, dst: int, tag: int) -> P2PWork:
        self._check_peer(dst, "dst")
        self.check()
        w = P2PWork(self, f"send to rank {dst} (tag {tag})", b.nbytes, [dst], keep=b.owner)
        self.post_send(b.data, dst, USER, int(tag), w)
        return w

    def irecv(self, b: Buf, src: int, tag: int) -> P2PWork:
        self._check_peer(src, "src")
        self.check()
        w = P2PWork(self, f"recv from rank {src} (tag {tag})", b.nbytes, [src], keep=b.owner)
        self.post_recv(b.data, src, USER, int(tag), w)
        return w

    def all_to_all(self, out: Buf, inp: Buf, out_rows: int, in_rows: int, out_splits, in_splits) -> P2PWork:
        """Chunk j of ``inp`` to rank j, chunk i of ``out`` from rank i (splits in rows)."""
        world = self.world
        if out.dtype != inp.dtype:
            raise InvalidArgument(f"all_to_all: out_buf is {out.dtype_name}, in_buf {inp.dtype_name}")
        o_split = _splits(out_splits, out_rows, world, "out")
        i_split = _splits(in_splits, in_rows, world, "in")
        o_row = out.nbytes // out_rows if out_rows else 0
        i_row = inp.nbytes // in_rows if in_rows else 0
        if o_row and i_row and o_row != i_row:
            raise InvalidArgument(f"all_to_all: a row of out_buf has {o_row} bytes, of in_buf {i_row} "
                                  "(the dimensions after the first must agree)")
        row = o_row or i_row
        o_off = np.concatenate([[0], np.cumsum(o_split)]) * row
        i_off = np.concatenate([[0], np.cumsum(i_split)]) * row
        me = self.rank
        if o_split[me] != i_split[me]:
            raise InvalidArgument(f"all_to_all: rank {me} sends itself {i_split[me]} rows but expects {o_split[me]}")
        self.check()
        seq = self.a2a_seq
        self.a2a_seq += 1
        parts = []
        for k in range(1, world):  # receives first, then sends, each ring-ordered from me
            src = (me - k) % world
            w = P2PWork(self, f"all_to_all #{seq} from rank {src}", int(o_off[src + 1] - o_off[src]), [src])
            parts.append(w)
            self.post_recv(out.data[o_off[src]:o_off[src + 1]], src, A2A, seq, w)
        for k in range(1, world):
            dst = (me + k) % world
            w = P2PWork(self, f"all_to_all #{seq} to rank {dst}", int(i_off[dst + 1] - i_off[dst]), [dst])
            parts.append(w)
            self.post_send(inp.data[i_off[dst]:i_off[dst + 1]], dst, A2A, seq, w)
        n = int(i_off[me + 1] - i_off[me])
        if n:
            K.copy(out.data[o_off[me]:o_off[me] + n], inp.data[i_off[me]:i_off[me] + n])
        total = int(out.nbytes)
        return P2PWork(self, f"all_to_all #{seq}", total, [r for r in range(world) if r != me],
                       keep=(out.owner, inp.owner), parts=parts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for q in self._queues.values():
            q.put(None)
        if self.listener is not None:
            self.listener.close()
        for c in [*self._out.values(), *self._in]:
            c.close()
        # the readers wake at once (their connections are shut down), the senders at the None
        # above; the acceptor polls every half second and is not waited for (a daemon thread)
        for t in self._threads:
            if t is not threading.current_thread() and not t.name.endswith("accept"):
                t.join(timeout=1.0)
        err = HFReduceError("the process group was destroyed")
        with self._lock:
            posted = [r for q in self._posted.values() for r in q]
            acks = [w for w, _ in self._acks.values()]
            self._posted.clear()
            self._acks.clear()
        for r in posted:
            r.work._finish(err)
        for w in acks:
            w._finish(err)


def _splits(splits, rows: int, world: int, which: str) -> list[int]:
    """Rows per rank: ``splits`` (a list, numpy array or torch tensor) or an equal split."""
    if splits is None:
        if rows % world:
            raise InvalidArgument(f"all_to_all: {which}_buf has {rows} rows, not divisible by the world size "
                                  f"{world} (give {which}_splits)")
        return [rows // world] * world
    if hasattr(splits, "tolist"):
        splits = splits.tolist()
    out = [int(s) for s in splits]
    if len(out) != world:
        raise InvalidArgument(f"all_to_all: {which}_splits has {len(out)} entries, the group {world} ranks")
    if any(s < 0 for s in out):
        raise InvalidArgument(f"all_to_all: {which}_splits has a negative entry: {out}")
    if sum(out) != rows:
        raise InvalidArgument(f"all_to_all: {which}_splits sum to {sum(out)} rows, {which}_buf has {rows}")
    return out


def rows_of(buf: Any) -> int:
    """The first dimension of a numpy array or torch tensor (1 for a scalar)."""
    shape = tuple(buf.shape)
    return int(shape[0]) if shape else 1


# -- the process group's operations (ProcessGroup methods and the module functions call these) ------
def mesh_of(pg: Any) -> Mesh:
    pg._check_alive()
    mesh = getattr(pg, "_mesh", None)
    if mesh is None:
        raise HFReduceError("this process group has no point-to-point mesh")
    return mesh


def all_to_all(pg: Any, out_buf: Any, in_buf: Any, out_splits=None, in_splits=None, async_op: bool = False) -> Work:
    """Like ``torch.distributed.all_to_all_single``: chunk j of ``in_buf`` goes to rank j, chunk i
    of ``out_buf`` comes from rank i; splits count rows of the first dimension (None: equal)."""
    mesh = mesh_of(pg)
    o, i = as_buf(out_buf, "out_buf"), as_buf(in_buf, "in_buf", writable=False)
    w = mesh.all_to_all(o, i, rows_of(out_buf), rows_of(in_buf), out_splits, in_splits)
    if not async_op:
        w.wait()
    return w


def isend(pg: Any, buf: Any, dst: int, tag: int = 0) -> Work:
    """Send ``buf`` to rank ``dst``; the work completes when ``buf`` may be reused."""
    return mesh_of(pg).isend(as_buf(buf, "buf", writable=False), dst, tag)


def irecv(pg: Any, buf: Any, src: int, tag: int = 0) -> Work:
    """Receive rank ``src``'s next message with ``tag`` into ``buf`` (exactly its size)."""
    return mesh_of(pg).irecv(as_buf(buf, "buf"), src, tag)


def send(pg: Any, buf: Any, dst: int, tag: int = 0) -> None:
    isend(pg, buf, dst, tag).wait()


def recv(pg: Any, buf: Any, src: int, tag: int = 0) -> None:
    irecv(pg, buf, src, tag).wait()
