"""Framed messages over TCP, with timeouts, zero-copy sends and receives into caller buffers.

A frame is a 16-byte prefix, a header and a payload::

    +--------+-------------+--------------+----------------+------------------+
    | magic  | header_len  | payload_len  | header bytes   | payload bytes    |
    | u32    | u32         | u64          | (small, opaque)| (bulk, raw)      |
    +--------+-------------+--------------+----------------+------------------+

The header is small (a msgpack map for :mod:`network.rpc`, a struct for hfreduce); the payload is
bulk data. Sending gathers the prefix, header and every payload buffer into one ``sendmsg`` call
(no concatenation, no copy in Python); a payload part may also be a :class:`FileRegion`, a byte
range of an open file that the kernel sends with ``sendfile`` (no copy through user space).
Receiving reads small frames with one ``recv`` into an internal buffer and receives a large
payload straight into the caller's buffer with ``recv_into`` on a memoryview, or into a list of
caller buffers in order with ``recvmsg_into`` (a scatter receive).

Every blocking call takes a timeout that bounds the whole operation (not each syscall): a peer
that dies mid-message raises :class:`PeerClosed` at once, a peer that stops sending raises
:class:`TransportTimeout` when the time is up. Nothing here blocks forever unless the caller
passes ``timeout=None`` explicitly.

Each socket carries one of the paper's four traffic classes, set as ``SO_PRIORITY`` (Linux
queueing discipline band) and ``IP_TOS`` (DSCP, for switches), so tc or the fabric can isolate
allreduce, NCCL, storage and everything else from one another.
"""

from __future__ import annotations

import enum
import errno
import math
import os
import socket
import struct
import time
from dataclasses import dataclass

from .errors import ConnectError, PeerClosed, ProtocolError, TransportError, TransportTimeout

__all__ = [
    "DEFAULT_TIMEOUT",
    "TrafficClass",
    "Connection",
    "FileRegion",
    "Listener",
    "Message",
    "connect",
    "listen",
    "as_bytes",
]

MAGIC = 0x46465431  # "FFT1"
_PREFIX = struct.Struct("!IIQ")
PREFIX_SIZE = _PREFIX.size
MAX_HEADER = 16 << 20
DEFAULT_TIMEOUT = 60.0
# Read-ahead for headers: one recv usually brings a small frame whole; for a large frame, what
# it brought of the payload is copied once into the caller's buffer, so keep it small (16 KiB is
# 1.6% of a 1 MiB storage chunk; 256 KiB was a quarter of it).
_RBUF_SIZE = 16 << 10
# Socket buffers: 0 leaves them to the kernel's autotuning (tcp_rmem / tcp_wmem), which grows
# them far beyond a fixed SO_RCVBUF on fast links; setting SO_RCVBUF would turn autotuning off.
# (Measured here: a fixed 4 MiB was 5-8% slower at 64-256 MiB than autotuning.)
_SOCK_BUF = 0
_TIMEVAL = struct.Struct("@ll")
_TIMEVAL_ZERO = _TIMEVAL.pack(0, 0)


class TrafficClass(enum.Enum):
    """The four traffic classes of Fire-Flyer's network (paper §VI-A), one per connection.

    ``priority`` is the Linux ``SO_PRIORITY`` (0..6 need no privilege) and ``dscp`` the DiffServ
    code point written into ``IP_TOS`` (``tos = dscp << 2``).
    """

    HFREDUCE = (4, 34)  # AF41: gradient allreduce, latency- and bandwidth-critical
    NCCL = (3, 26)  # AF31: GPU collectives (pipeline and expert parallel)
    STORAGE = (2, 18)  # AF21: fs3 chunk traffic
    OTHER = (0, 0)  # control, RPC, everything else

    @property
    def priority(self) -> int:
        return self.value[0]

    @property
    def dscp(self) -> int:
        return self.value[1]

    @property
    def tos(self) -> int:
        return self.value[1] << 2


def _apply_traffic_class(sock: socket.socket, tc: TrafficClass) -> None:
    # IP_TOS first: on Linux, setting IP_TOS also rewrites the socket priority from the TOS bits,
    # so SO_PRIORITY must come after it to stick.
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tc.tos)
    elif sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tc.tos)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, tc.priority)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # A dead host (not just a dead process) is noticed by keepalive within ~20 s even when no
    # operation is pending; pending operations have their own timeouts.
    for opt, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 2)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    if _SOCK_BUF:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)
            except OSError:  # pragma: no cover - capped by the kernel, never fatal
                pass


def as_bytes(buf) -> memoryview:
    """A flat, writable-if-possible byte view of ``buf`` (bytes, bytearray, memoryview, numpy array).

    Raises ``TypeError`` for objects without the buffer protocol and ``ValueError`` for
    non-contiguous buffers (copying silently would hide a performance bug).
    """
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.format == "B" and mv.ndim == 1:
        return mv
    if not mv.c_contiguous:
        raise ValueError("buffer is not C-contiguous; pass a contiguous array")
    return mv.cast("B")


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of the list of views (in place): what a partial ``sendmsg`` sent
    or a partial ``recvmsg_into`` filled."""
    while n:
        first = views[0].nbytes
        if n >= first:
            n -= first
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0


@dataclass(frozen=True, slots=True)
class FileRegion:
    """``length`` bytes of the open file ``fd`` from ``offset``, as a payload part of :meth:`Connection.send`.

    The kernel moves them from the page cache to the socket (``os.sendfile``). The caller keeps
    ``fd`` open until the send returned. A file that turns out shorter than the region breaks the
    frame: the send raises :class:`ProtocolError` and closes the connection.
    """

    fd: int
    offset: int
    length: int

    @property
    def nbytes(self) -> int:
        return self.length


@dataclass
class Message:
    """A received frame: its header bytes and its payload (a memoryview of a fresh bytearray)."""

    header: bytes
    payload: memoryview


class _Deadline:
    __slots__ = ("end",)

    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self.end is None:
            return None
        return self.end - time.monotonic()


class Connection:
    """One framed TCP connection. Not thread-safe for concurrent sends (or concurrent receives);
    one sender thread and one receiver thread may use it at the same time."""

    def __init__(self, sock: socket.socket, peer: str, *, timeout: float | None = DEFAULT_TIMEOUT,
                 traffic_class: TrafficClass = TrafficClass.OTHER) -> None:
        self._sock = sock
        self.peer = peer
        self.timeout = timeout
        self.traffic_class = traffic_class
        self._rbuf = bytearray(_RBUF_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0
        self._rend = 0
        self._closed = False
        self._armed: dict[int, float] = {}  # option -> seconds armed (0.0: none)
        sock.setblocking(True)
        _tune(sock)
        _apply_traffic_class(sock, traffic_class)

    # -- plumbing ---------------------------------------------------------------------------
    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def socket(self) -> socket.socket:
        return self._sock

    @property
    def local_address(self) -> tuple[str, int]:
        return self._sock.getsockname()[:2]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        """Bytes already received from the socket but not yet taken (0 before another reader,
        such as a C loop on :meth:`fileno`, may take over the stream)."""
        return self._rend - self._rstart

    def set_traffic_class(self, tc: TrafficClass) -> None:
        _apply_traffic_class(self._sock, tc)
        self.traffic_class = tc

    def socket_priority(self) -> int:
        """The SO_PRIORITY the kernel holds for this socket (read back, for checks)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY)

    def socket_tos(self) -> int:
        """The IP_TOS byte the kernel holds for this socket (read back, for checks)."""
        return self._sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Connection {self.peer} {self.traffic_class.name} {state}>"

    def _arm(self, dl: _Deadline, what: str, opt: int) -> None:
        """Set the kernel's per-call timeout (SO_RCVTIMEO / SO_SNDTIMEO) to what is left of ``dl``.

        [Note: blocking sockets with kernel timeouts] Python's own socket timeouts make every
        call a poll() plus a non-blocking recv, so a large payload costs many syscalls. With a
        blocking socket and SO_RCVTIMEO, ``recv_into(..., MSG_WAITALL)`` lands a whole payload
        in one syscall and still returns (EAGAIN, or a short count) when the time is up.

        [Note: arming rarely] The time left changes on every call, so arming it exactly costs a
        setsockopt per send and receive. A timeout already armed is kept when it ends no earlier
        than this call's deadline and at most one step later (50 ms, or 2 ms under a second):
        never an early timeout, a late one by at most that step. A new one is rounded up to a
        step, so the next call with the same timeout (a fresh deadline of, say, 10 s) keeps it.
        """
        rem = dl.remaining()
        armed = self._armed.get(opt)
        if rem is None:
            if armed != 0.0:
                self._sock.setsockopt(socket.SOL_SOCKET, opt, _TIMEVAL_ZERO)
                self._armed[opt] = 0.0
            return
        if rem <= 0:
            raise TransportTimeout(f"{what} {self.peer}: timed out", self.peer)
        step = 0.05 if rem >= 1.0 else 0.002
        if armed and rem <= armed <= rem + step:
            return
        t = math.ceil(rem / step) * step
        sec = int(t)
        self._sock.setsockopt(socket.SOL_SOCKET, opt, _TIMEVAL.pack(sec, max(1, int(round((t - sec) * 1e6)))))
        self._armed[opt] = t

    def _wrap(self, exc: BaseException, what: str, dl: _Deadline | None = None) -> TransportError:
        if isinstance(exc, TransportError):
            return exc
        if isinstance(exc, TimeoutError | socket.timeout | BlockingIOError):
            return TransportTimeout(f"{what} {self.peer}: timed out (peer stuck or link down)", self.peer)
        if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN,
                                                      errno.ESHUTDOWN, errno.EBADF):
            return PeerClosed(f"{what} {self.peer}: connection lost ({exc.strerror})", self.peer)
        return TransportError(f"{what} {self.peer}: {exc}", self.peer)

    # -- sending ----------------------------------------------------------------------------
    def send(self, header: bytes = b"", *payload, timeout: float | None | type(...) = ...) -> int:
        """Send one frame: ``header`` and the concatenation of the ``payload`` parts.

        A part is a buffer, handed to ``sendmsg`` as it is (scatter/gather, no copy), or a
        :class:`FileRegion`, sent with ``sendfile``. Returns the number of payload bytes sent.
        """
        if self._closed:
            raise PeerClosed(f"send to {self.peer}: connection is closed", self.peer)
        if len(header) > MAX_HEADER:
            raise ProtocolError(f"send to {self.peer}: header of {len(header)} bytes exceeds {MAX_HEADER}")
        views = [p if isinstance(p, FileRegion) else as_bytes(p) for p in payload]
        nbytes = sum(v.nbytes for v in views)
        parts = [_PREFIX.pack(MAGIC, len(header), nbytes)]
        if header:
            parts.append(header)
        parts.extend(v for v in views if v.nbytes)
        dl = _Deadline(self.timeout if timeout is ... else timeout)
        if not any(isinstance(p, FileRegion) for p in parts):
            self._sendmsg_all(parts, dl)
            return nbytes
        # runs of buffers go out with sendmsg (MSG_MORE: the kernel may join them with the file
        # bytes that follow), each file region with sendfile
        run: list = []
        for p in parts:
            if isinstance(p, FileRegion):
                if run:
                    self._sendmsg_all(run, dl, socket.MSG_MORE)
                    run = []
                self._sendfile_all(p, dl)
            else:
                run.append(p)
        if run:
            self._sendmsg_all(run, dl)
        return nbytes

    def _sendfile_all(self, region: FileRegion, dl: _Deadline) -> None:
        sock, fd = self._sock.fileno(), region.fd
        off, left = region.offset, region.length
        try:
            while left:
                self._arm(dl, "send to", socket.SO_SNDTIMEO)
                n = os.sendfile(sock, fd, off, left)
                if n == 0:
                    self.close()  # the peer was promised bytes that do not exist: the frame is broken
                    raise ProtocolError(f"send to {self.peer}: file ended {left} bytes short of a "
                                        f"{region.length}-byte region at offset {region.offset}", self.peer)
                off += n
                left -= n
        except BaseException as exc:  # noqa: BLE001 - rewrapped
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise self._wrap(exc, "send to") from exc

    def _sendmsg_all(self, parts: list, dl: _Deadline, flags: int = 0) -> None:
        sock = self._sock
        try:
            # Fast path: one syscall moves everything when the socket buffer has room.
            self._arm(dl, "send to", socket.SO_SNDTIMEO)
            n = sock.sendmsg(parts, (), flags)
            total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
            if n == total:
                return
            views = [memoryview(p) if isinstance(p, bytes) else p for p in parts]
            while True:
                _consume(views, n)
                if not views:
                    return
                self._arm(dl, "send to", socket.SO_SNDTIMEO)
                n = sock.sendmsg(views[:512], (), flags)
        except BaseException as exc:  # noqa: BLE001 - rewrapped
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise self._wrap(exc, "send to") from exc

    # -- receiving --------------------------------------------------------------------------
    def _fill(self, need: int, dl: _Deadline, what: str) -> None:
        """Make at least ``need`` bytes available in the internal buffer."""
        if self._rend - self._rstart >= need:
            return
        if self._rstart and (self._rstart + need > len(self._rbuf)):
            # compact
            n = self._rend - self._rstart
            self._rbuf[:n] = self._rbuf[self._rstart:self._rend]
            self._rstart, self._rend = 0, n
        if need > len(self._rbuf):
            grow = bytearray(need)
            grow[: self._rend - self._rstart] = self._rbuf[self._rstart:self._rend]
            self._rend -= self._rstart
            self._rstart = 0
            self._rbuf = grow
            self._rview = memoryview(self._rbuf)
        while self._rend - self._rstart < need:
            self._arm(dl, what, socket.SO_RCVTIMEO)
            got = self._sock.recv_into(self._rview[self._rend:])
            if got == 0:
                partial = self._rend - self._rstart
                raise PeerClosed(
                    f"{what} {self.peer}: peer closed the connection"
                    + (f" in the middle of a frame ({partial} bytes of it received)" if partial else ""),
                    self.peer,
                )
            self._rend += got

    def _take(self, n: int) -> bytes:
        out = bytes(self._rview[self._rstart:self._rstart + n])
        self._rstart += n
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
        return out

    def recv_header(self, timeout: float | None | type(...) = ..., max_header: int = MAX_HEADER
                    ) -> tuple[bytes, int]:
        """Receive the next frame's header; returns ``(header, payload_len)``.

        A header longer than ``max_header`` is refused (:class:`ProtocolError`) from the frame's
        prefix, before any of it is buffered. The payload must then be consumed with
        :meth:`recv_payload_into` (or :meth:`skip_payload`).
        """
        dl = _Deadline(self.timeout if timeout is ... else timeout)
        try:
            self._fill(PREFIX_SIZE, dl, "receive from")
            magic, hlen, plen = _PREFIX.unpack_from(self._rbuf, self._rstart)
            if magic != MAGIC:
                raise ProtocolError(f"receive from {self.peer}: bad frame magic {magic:#x} "
                                    "(not a fireflyer transport peer?)", self.peer)
            if hlen > min(max_header, MAX_HEADER):
                raise ProtocolError(f"receive from {self.peer}: header length {hlen} exceeds the "
                                    f"{min(max_header, MAX_HEADER)}-byte limit", self.peer)
            self._fill(PREFIX_SIZE + hlen, dl, "receive from")
            self._rstart += PREFIX_SIZE
            header = self._take(hlen)
            if len(self._rbuf) > _RBUF_SIZE and self._rstart == self._rend:
                # [Note: the read-ahead buffer shrinks back] a large header grew it; a connection
                # must not keep that memory for the rest of its life.
                self._rbuf = bytearray(_RBUF_SIZE)
                self._rview = memoryview(self._rbuf)
            return header, plen
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise self._wrap(exc, "receive from") from exc

    def recv_payload_into(self, buf, nbytes: int, timeout: float | None | type(...) = ...) -> None:
        """Receive ``nbytes`` of payload straight into ``buf``: a writable buffer of at least that
        size, or a list of writable buffers filled in order (a scatter receive; together at least
        ``nbytes``)."""
        dl = _Deadline(self.timeout if timeout is ... else timeout)
        if isinstance(buf, list | tuple):
            views = [as_bytes(b) for b in buf]
            readonly, room = any(v.readonly for v in views), sum(v.nbytes for v in views)
        else:
            views = [as_bytes(buf)]
            readonly, room = views[0].readonly, views[0].nbytes
        if readonly:
            raise TypeError("recv_payload_into needs a writable buffer")
        if room < nbytes:
            self.skip_payload(nbytes, timeout)
            raise ProtocolError(f"receive from {self.peer}: payload of {nbytes} bytes does not fit a "
                                f"{room}-byte buffer (mismatched sizes between peers?)", self.peer)
        try:
            if len(views) == 1:
                self._recv_one(views[0], nbytes, dl)
            else:
                self._recv_scatter(views, nbytes, dl)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise self._wrap(exc, "receive from") from exc

    def _take_buffered(self, view: memoryview, n: int) -> int:
        """Copy up to ``n`` already-buffered bytes into ``view``; returns how many."""
        have = min(self._rend - self._rstart, n)
        if have:
            view[:have] = self._rview[self._rstart:self._rstart + have]
            self._rstart += have
            if self._rstart == self._rend:
                self._rstart = self._rend = 0
        return have

    def _recv_one(self, view: memoryview, nbytes: int, dl: _Deadline) -> None:
        pos = self._take_buffered(view, nbytes)
        sock = self._sock
        while pos < nbytes:
            self._arm(dl, "receive from", socket.SO_RCVTIMEO)
            got = sock.recv_into(view[pos:nbytes], nbytes - pos, socket.MSG_WAITALL)
            if got == 0:
                raise PeerClosed(f"receive from {self.peer}: peer closed the connection in the middle "
                                 f"of a payload ({pos} of {nbytes} bytes received)", self.peer)
            pos += got

    def _recv_scatter(self, views: list[memoryview], nbytes: int, dl: _Deadline) -> None:
        # what is left to fill, trimmed to nbytes, after the bytes already buffered
        todo: list[memoryview] = []
        left = nbytes
        for v in views:
            if not left:
                break
            v = v[:left]
            left -= v.nbytes
            k = self._take_buffered(v, v.nbytes)
            if k < v.nbytes:
                todo.append(v[k:])
        pos, sock = nbytes - sum(v.nbytes for v in todo), self._sock
        while todo:
            self._arm(dl, "receive from", socket.SO_RCVTIMEO)
            got = sock.recvmsg_into(todo[:512], 0, socket.MSG_WAITALL)[0]
            if got == 0:
                raise PeerClosed(f"receive from {self.peer}: peer closed the connection in the middle "
                                 f"of a payload ({pos} of {nbytes} bytes received)", self.peer)
            pos += got
            _consume(todo, got)

    def skip_payload(self, nbytes: int, timeout: float | None | type(...) = ...) -> None:
        """Read and discard ``nbytes`` of payload (keeps the stream in sync after a refused frame)."""
        scratch = bytearray(min(nbytes, 1 << 20) or 1)
        left = nbytes
        while left:
            n = min(left, len(scratch))
            self.recv_payload_into(scratch, n, timeout)
            left -= n

    def recv_into(self, buf, timeout: float | None | type(...) = ...) -> tuple[bytes, int]:
        """Receive one frame, its payload straight into ``buf``; returns ``(header, payload_len)``."""
        dl = _Deadline(self.timeout if timeout is ... else timeout)
        header, plen = self.recv_header(dl.remaining() if dl.end is not None else None)
        self.recv_payload_into(buf, plen, dl.remaining() if dl.end is not None else None)
        return header, plen

    def recv(self, timeout: float | None | type(...) = ..., max_payload: int = 1 << 34) -> Message:
        """Receive one frame into fresh memory."""
        dl = _Deadline(self.timeout if timeout is ... else timeout)
        header, plen = self.recv_header(dl.remaining() if dl.end is not None else None)
        if plen > max_payload:
            raise ProtocolError(f"receive from {self.peer}: payload of {plen} bytes exceeds the "
                                f"{max_payload}-byte limit", self.peer)
        payload = bytearray(plen)
        if plen:
            self.recv_payload_into(payload, plen, dl.remaining() if dl.end is not None else None)
        return Message(header, memoryview(payload))


class Listener:
    """A listening TCP socket; :meth:`accept` returns framed :class:`Connection` objects."""

    def __init__(self, host: str, port: int = 0, *, traffic_class: TrafficClass = TrafficClass.OTHER,
                 backlog: int = 512, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            if _SOCK_BUF:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._sock = sock
        self.traffic_class = traffic_class
        self.timeout = timeout
        self.host, self.port = sock.getsockname()[:2]

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None | type(...) = ...) -> Connection:
        t = self.timeout if timeout is ... else timeout
        try:
            self._sock.settimeout(t)  # raises EBADF once close() ran in another thread
            sock, addr = self._sock.accept()
        except TimeoutError as exc:
            raise TransportTimeout(f"accept on {self.host}:{self.port}: no connection within {t} s") from exc
        except OSError as exc:
            raise ConnectError(f"accept on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        sock.setblocking(True)
        return Connection(sock, f"{addr[0]}:{addr[1]}", timeout=self.timeout, traffic_class=self.traffic_class)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def listen(host: str, port: int = 0, *, traffic_class: TrafficClass = TrafficClass.OTHER,
           backlog: int = 512, timeout: float | None = DEFAULT_TIMEOUT) -> Listener:
    """Listen on ``host:port`` (port 0 picks a free one; see ``Listener.port``)."""
    return Listener(host, port, traffic_class=traffic_class, backlog=backlog, timeout=timeout)


_RETRYABLE = (errno.ECONNREFUSED, errno.ECONNRESET, errno.EAGAIN, errno.ENETUNREACH, errno.EHOSTUNREACH)


def connect(host: str, port: int, *, timeout: float = 10.0, traffic_class: TrafficClass = TrafficClass.OTHER,
            source: str | None = None, retry: bool = True,
            io_timeout: float | None = DEFAULT_TIMEOUT) -> Connection:
    """Connect to ``host:port`` within ``timeout`` seconds.

    ``source`` binds the local address first (each emulated node speaks from its own loopback
    address). With ``retry`` a refused connection is retried until the timeout, which covers a
    peer that is still starting. ``io_timeout`` becomes the connection's default per-operation
    timeout.
    """
    dl = _Deadline(timeout)
    delay = 0.005
    last: OSError | None = None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        rem = dl.remaining()
        if rem is not None and rem <= 0:
            why = f"{last.strerror or last}" if last else "timed out"
            raise ConnectError(f"cannot connect to {host}:{port} within {timeout} s: {why}", f"{host}:{port}")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if source:
                sock.bind((source, 0))
            sock.settimeout(rem)
            sock.connect((host, port))
            sock.setblocking(True)
            return Connection(sock, f"{host}:{port}", timeout=io_timeout, traffic_class=traffic_class)
        except TimeoutError as exc:
            sock.close()
            last = exc
        except OSError as exc:
            sock.close()
            last = exc
            if not retry or exc.errno not in _RETRYABLE:
                raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}",
                                   f"{host}:{port}") from exc
            rem = dl.remaining()
            time.sleep(min(delay, max(rem or 0, 0)))
            delay = min(delay * 2, 0.2)
