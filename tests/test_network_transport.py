"""network.transport: integrity, zero-copy receive, timeouts, dead and stuck peers, traffic classes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import numpy as np
import pytest

from network import (
    ConnectError,
    FileRegion,
    PeerClosed,
    ProtocolError,
    TrafficClass,
    TransportTimeout,
    connect,
    listen,
)


@pytest.fixture
def pair():
    """A connected (client, server) pair over 127.0.0.2 -> 127.0.0.3."""
    lst = listen("127.0.0.3", 0)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("srv", lst.accept(timeout=10)))
    t.start()
    cli = connect("127.0.0.3", lst.port, source="127.0.0.2", timeout=10)
    t.join(10)
    srv = out["srv"]
    yield cli, srv
    cli.close()
    srv.close()
    lst.close()


def _payload(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


@pytest.mark.parametrize("size", [0, 1, 4095, (1 << 20) + 7, 48 << 20])
def test_integrity_both_directions(pair, size):
    cli, srv = pair
    a, b = _payload(size, 1), _payload(size, 2)
    got = {}

    def server():
        buf = np.empty(size, np.uint8)
        hdr, n = srv.recv_into(buf)
        got["srv"] = (hdr, n, zlib.crc32(buf))
        srv.send(b"reply", b[: size // 3], b[size // 3:])  # scatter send of two pieces

    t = threading.Thread(target=server)
    t.start()
    cli.send(b"hello", a)
    msg = cli.recv()
    t.join(30)
    assert got["srv"] == (b"hello", size, zlib.crc32(a))
    assert msg.header == b"reply" and msg.payload.nbytes == size
    assert zlib.crc32(msg.payload) == zlib.crc32(b)


def test_many_small_frames_in_order(pair):
    cli, srv = pair
    n = 2000

    def sender():
        for i in range(n):
            cli.send(i.to_bytes(4, "little"), bytes([i % 256]) * (i % 17))

    t = threading.Thread(target=sender)
    t.start()
    for i in range(n):
        m = srv.recv()
        assert int.from_bytes(m.header, "little") == i
        assert bytes(m.payload) == bytes([i % 256]) * (i % 17)
    t.join(10)


def test_recv_into_memoryview_slice_and_numpy_dtypes(pair):
    cli, srv = pair
    x = np.arange(1000, dtype=np.float32)
    cli.send(b"", x)
    out = np.zeros(2000, np.float32)
    hdr, n = srv.recv_into(memoryview(out)[500:1500])
    assert n == 4000
    np.testing.assert_array_equal(out[500:1500], x)
    assert not out[:500].any() and not out[1500:].any()


def test_payload_too_large_for_buffer_keeps_stream_in_sync(pair):
    cli, srv = pair
    cli.send(b"big", b"x" * 100)
    cli.send(b"next", b"y" * 3)
    with pytest.raises(ProtocolError, match="does not fit a 10-byte buffer"):
        srv.recv_into(bytearray(10))
    m = srv.recv()
    assert m.header == b"next" and bytes(m.payload) == b"yyy"


@pytest.mark.parametrize("sizes", [[5, 0, 7], [1 << 20, 3, (2 << 20) + 1], [1, 100_000]])
def test_scatter_receive_into_a_list_of_buffers(pair, sizes):
    cli, srv = pair
    data = _payload(sum(sizes), 3).tobytes()
    bufs = [bytearray(n) for n in sizes] + [bytearray(4)]  # room to spare at the end stays untouched
    cli.send(b"small first", b"abc")  # the read-ahead of the first frame may hold part of the next
    cli.send(b"scatter", data)
    cli.send(b"after", b"z")
    assert bytes(srv.recv().payload) == b"abc"
    hdr, n = srv.recv_header()
    srv.recv_payload_into(bufs, n)
    assert hdr == b"scatter" and b"".join(bufs[:-1]) == data and bufs[-1] == bytearray(4)
    m = srv.recv()
    assert m.header == b"after" and bytes(m.payload) == b"z"
    # a list too small for the payload: refused, the stream stays in sync
    cli.send(b"big", b"x" * 10)
    cli.send(b"next", b"y")
    hdr, n = srv.recv_header()
    with pytest.raises(ProtocolError, match="does not fit a 9-byte buffer"):
        srv.recv_payload_into([bytearray(4), bytearray(5)], n)
    assert bytes(srv.recv().payload) == b"y"


def test_file_region_sent_with_sendfile(pair, tmp_path):
    cli, srv = pair
    data = _payload((3 << 20) + 11, 4).tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = srv.send(b"hdr", b"head", FileRegion(fd, 100, 2 << 20), b"mid", FileRegion(fd, 7, 5), b"tail")
    finally:
        os.close(fd)
    want = b"head" + data[100:100 + (2 << 20)] + b"mid" + data[7:12] + b"tail"
    m = cli.recv()
    assert n == len(want) and m.header == b"hdr" and bytes(m.payload) == want


def test_file_region_past_the_end_of_the_file_breaks_the_connection(pair, tmp_path):
    cli, srv = pair
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ProtocolError, match="file ended 5 bytes short"):
            srv.send(b"hdr", FileRegion(fd, 5, 10))
    finally:
        os.close(fd)
    assert srv.closed  # the peer was promised bytes that never come: no frame may follow
    with pytest.raises(PeerClosed):
        cli.recv(timeout=5)


def test_non_contiguous_buffer_refused(pair):
    cli, _ = pair
    with pytest.raises(ValueError, match="not C-contiguous"):
        cli.send(b"", np.arange(10, dtype=np.int64)[::2])


def test_garbage_is_a_protocol_error():
    lst = listen("127.0.0.3", 0)
    raw = __import__("socket").create_connection(("127.0.0.3", lst.port))
    srv = lst.accept(timeout=5)
    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ProtocolError, match="bad frame magic"):
        srv.recv(timeout=5)
    raw.close()
    srv.close()
    lst.close()


def test_stuck_peer_times_out(pair):
    cli, srv = pair
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout, match="timed out"):
        srv.recv(timeout=0.3)
    assert time.monotonic() - t0 < 5


def test_stuck_peer_mid_message_times_out(pair):
    cli, srv = pair
    # a frame announcing 1 MiB of payload, of which only 10 bytes ever arrive
    from network.transport import _PREFIX, MAGIC

    cli.socket.sendall(_PREFIX.pack(MAGIC, 0, 1 << 20) + b"0123456789")
    with pytest.raises(TransportTimeout):
        srv.recv(timeout=0.5)


def test_send_to_stuck_receiver_times_out(pair):
    cli, srv = pair
    big = np.zeros(64 << 20, np.uint8)  # far more than the socket buffers hold
    with pytest.raises(TransportTimeout):
        cli.send(b"", big, timeout=0.5)


_PEER = textwrap.dedent("""
    import sys, time
    from network import connect
    from network.transport import _PREFIX, MAGIC
    port = int(sys.argv[1])
    c = connect("127.0.0.3", port, source="127.0.0.2", timeout=10)
    # announce 256 MiB, send 8 MiB of it, then wait to be killed
    c.socket.sendall(_PREFIX.pack(MAGIC, 3, 256 << 20) + b"hdr" + b"z" * (8 << 20))
    print("sent", flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_peer_killed_mid_transfer(sig):
    lst = listen("127.0.0.3", 0)
    proc = subprocess.Popen([sys.executable, "-c", _PEER, str(lst.port)], stdout=subprocess.PIPE, text=True)
    try:
        srv = lst.accept(timeout=20)
        buf = np.empty(256 << 20, np.uint8)
        errors = []

        def receiver():
            try:
                srv.recv_into(buf, timeout=30)
            except Exception as exc:  # noqa: BLE001
                errors.append((exc, time.monotonic()))

        t = threading.Thread(target=receiver)
        t.start()
        assert proc.stdout.readline().strip() == "sent"
        time.sleep(0.2)
        killed_at = time.monotonic()
        os.kill(proc.pid, sig)
        t.join(30)
        assert not t.is_alive(), "receiver hung after the peer died"
        exc, when = errors[0]
        assert isinstance(exc, PeerClosed), exc
        assert "in the middle of a payload" in str(exc)
        assert when - killed_at < 5  # noticed at once, far within the 30 s timeout
        srv.close()
    finally:
        proc.kill()
        proc.wait()
        lst.close()


def test_connect_refused_and_timeout():
    lst = listen("127.0.0.3", 0)
    port = lst.port
    lst.close()
    t0 = time.monotonic()
    with pytest.raises(ConnectError, match=f"cannot connect to 127.0.0.3:{port}"):
        connect("127.0.0.3", port, timeout=0.5)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConnectError, match="refused"):
        connect("127.0.0.3", port, timeout=5, retry=False)


def test_connect_retries_until_listener_appears():
    lst = listen("127.0.0.3", 0)
    port = lst.port
    lst.close()
    holder = {}

    def late():
        time.sleep(0.3)
        holder["l"] = listen("127.0.0.3", port)
        holder["c"] = holder["l"].accept(timeout=10)

    t = threading.Thread(target=late)
    t.start()
    c = connect("127.0.0.3", port, timeout=10)
    t.join(10)
    c.close()
    holder["c"].close()
    holder["l"].close()


def test_peer_closed_between_frames(pair):
    cli, srv = pair
    cli.close()
    with pytest.raises(PeerClosed, match="peer closed the connection"):
        srv.recv(timeout=5)


@pytest.mark.parametrize("tc", list(TrafficClass))
def test_traffic_class_set_on_socket(tc):
    lst = listen("127.0.0.3", 0, traffic_class=tc)
    holder = {}
    t = threading.Thread(target=lambda: holder.setdefault("s", lst.accept(timeout=10)))
    t.start()
    c = connect("127.0.0.3", lst.port, traffic_class=tc)
    t.join(10)
    for conn in (c, holder["s"]):
        assert conn.socket_priority() == tc.priority
        assert conn.socket_tos() == tc.tos
    c.set_traffic_class(TrafficClass.OTHER)
    assert c.socket_priority() == 0 and c.socket_tos() == 0
    c.close()
    holder["s"].close()
    lst.close()


def test_traffic_classes_are_distinct():
    assert len({tc.priority for tc in TrafficClass}) == 4
    assert len({tc.dscp for tc in TrafficClass}) == 4
    assert TrafficClass.OTHER.priority == 0


def test_accept_on_a_closed_listener_is_a_transport_error():
    """A server's accept loop stops cleanly when another thread closed the listener."""
    from network.errors import TransportError
    from network.transport import listen

    lst = listen("127.0.0.1", 0)
    lst.close()
    with pytest.raises(TransportError):
        lst.accept(timeout=0.1)
