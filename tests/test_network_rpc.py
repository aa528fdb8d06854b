"""network.rpc: calls with payloads, remote errors, concurrency, dead servers, reconnects."""

from __future__ import annotations

import os
import threading
import time
import zlib

import numpy as np
import pytest
from _waits import wait_until

from network import (
    FileRegion,
    NoSuchMethod,
    RemoteError,
    Reply,
    RpcClient,
    RpcError,
    RpcPool,
    RpcServer,
    TransportError,
    new_cluster_key,
    ping,
)

# every server needs the cluster key and every client a credential (network.auth); the tests of
# authentication itself are in test_network_auth.py
KEY = new_cluster_key()
BIG = 64 << 20  # the payload bound of the test methods that carry bulk data


@pytest.fixture
def server():
    srv = RpcServer("127.0.0.3", 0, auth=KEY, name="test")
    store: dict[str, bytes] = {}

    @srv.method("echo", max_payload=BIG)
    def echo(args, payload, ctx):
        return Reply({"args": args, "n": payload.nbytes, "peer": ctx.peer}, [payload])

    @srv.method("put", max_payload=BIG)
    def put(args, payload, ctx):
        store[args["key"]] = bytes(payload)
        return {"crc": zlib.crc32(payload)}

    @srv.method("get")
    def get(args, payload, ctx):
        if args["key"] not in store:
            raise KeyError(f"no key {args['key']!r}")
        return Reply({"n": len(store[args["key"]])}, store[args["key"]])

    @srv.method("slow")
    def slow(args, payload, ctx):
        time.sleep(args["s"])
        return "done"

    srv.start()
    yield srv
    srv.stop()


def test_call_with_payload_roundtrip(server):
    with RpcClient(*server.address, credential=KEY, source="127.0.0.2") as c:
        data = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8)
        r = c.call("echo", {"x": [1, 2, {"y": "z"}]}, data)
        assert r.result["args"] == {"x": [1, 2, {"y": "z"}]}
        assert r.result["n"] == data.nbytes
        assert r.result["peer"].startswith("127.0.0.2:")
        assert zlib.crc32(r.payload) == zlib.crc32(data)
        # receive the reply payload into a caller buffer
        out = np.empty(data.nbytes, np.uint8)
        r = c.call("echo", {}, data, into=out)
        np.testing.assert_array_equal(out, data)


def test_remote_error_and_no_such_method(server):
    with RpcClient(*server.address, credential=KEY) as c:
        with pytest.raises(RemoteError, match="KeyError") as ei:
            c.call("get", {"key": "missing"})
        assert ei.value.kind == "KeyError"
        with pytest.raises(NoSuchMethod, match="no method 'nope'"):
            c.call("nope", {}, b"payload is skipped")
        # the connection is still usable after both
        assert c.call("put", {"key": "k"}, b"abc").result == {"crc": zlib.crc32(b"abc")}
        assert bytes(c.call("get", {"key": "k"}).payload) == b"abc"


def test_builtin_ping_and_methods(server):
    info = ping(*server.address, credential=KEY)
    assert info["name"] == "test" and info["pid"] > 0
    with RpcClient(*server.address, credential=KEY) as c:
        assert {"echo", "put", "get", "rpc.ping"} <= set(c.call("rpc.methods").result)


def test_concurrent_clients(server):
    errors = []

    def worker(i):
        try:
            with RpcClient(*server.address, credential=KEY) as c:
                for j in range(50):
                    payload = bytes([i]) * (j * 100)
                    r = c.call("echo", {"i": i, "j": j}, payload)
                    assert bytes(r.payload) == payload and r.result["args"] == {"i": i, "j": j}
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_pool_bounds_concurrency(server):
    pool = RpcPool(*server.address, credential=KEY, size=2, timeout=10)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pool.call("slow", {"s": 0.1}).result)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["done"] * 6
    assert len(pool._all) <= 2
    pool.close()


def test_call_timeout_then_reconnect(server):
    with RpcClient(*server.address, credential=KEY, timeout=0.3) as c:
        with pytest.raises(TransportError, match="timed out"):
            c.call("slow", {"s": 1.0})
        # the broken connection was dropped; a new call reconnects
        assert c.call("slow", {"s": 0.0}, timeout=5).result == "done"


def test_server_gone_gives_error_not_hang():
    srv = RpcServer("127.0.0.3", 0, auth=KEY).start()
    c = RpcClient(*srv.address, credential=KEY, timeout=5, connect_timeout=0.5)
    assert c.call("rpc.ping").result["name"] == "rpc"
    srv.stop()
    t0 = time.monotonic()
    with pytest.raises(TransportError):
        c.call("rpc.ping")
    assert time.monotonic() - t0 < 5
    c.close()


def test_payload_into_hook():
    srv = RpcServer("127.0.0.3", 0, auth=KEY)
    target = bytearray(1 << 20)
    srv.register("write", lambda a, p, c: {"same": p.obj is target, "n": p.nbytes},
                 payload_into=lambda args, n: memoryview(target)[:n], max_payload=BIG)
    srv.start()
    try:
        with RpcClient(*srv.address, credential=KEY) as c:
            r = c.call("write", {}, b"q" * 1000)
        assert r.result == {"same": True, "n": 1000}
        assert target[:1000] == b"q" * 1000
    finally:
        srv.stop()


def test_reply_into_a_list_or_chosen_by_the_result(server):
    parts = [b"a" * 10, b"b" * (1 << 20), b"c" * 3]
    with RpcClient(*server.address, credential=KEY) as c:
        # a list of buffers filled in order (a scatter receive); the payload is the filled views
        bufs = [bytearray(10), bytearray(1 << 20), bytearray(8)]
        r = c.call("echo", {}, parts, into=bufs)
        assert [bytes(v) for v in r.payload] == parts and r.payload[1].obj is bufs[1]
        assert bytes(bufs[2]) == b"ccc" + bytes(5)
        # a function of the result picks the buffers once the reply's header is known
        seen = []

        def land(result, nbytes):
            seen.append((result["n"], nbytes))
            return [bytearray(10), bytearray(nbytes - 10)]

        r = c.call("echo", {}, parts, into=land)
        assert seen == [(len(b"".join(parts)),) * 2]
        assert b"".join(bytes(v) for v in r.payload) == b"".join(parts)
        # returning None: fresh memory, as without into
        r = c.call("echo", {}, b"xyz", into=lambda result, n: None)
        assert bytes(r.payload) == b"xyz"
        # an error reply never calls it
        with pytest.raises(RemoteError, match="KeyError"):
            c.call("get", {"key": "absent"}, into=lambda result, n: pytest.fail("called on an error"))


def test_reply_with_file_regions_runs_done_after_sending(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 8192)
    closed = []

    def read(args, payload, ctx):
        fd = os.open(path, os.O_RDONLY)
        return Reply({"n": args["n"]}, [b"<", FileRegion(fd, args["off"], args["n"]), b">"],
                     done=lambda: closed.append(os.close(fd)))

    srv = RpcServer("127.0.0.3", 0, auth=KEY)
    srv.register("read", read)
    srv.start()
    try:
        with RpcClient(*srv.address, credential=KEY) as c:
            r = c.call("read", {"off": 1000, "n": 1 << 20})
            assert bytes(r.payload) == b"<" + path.read_bytes()[1000:1000 + (1 << 20)] + b">"
            # done runs once the reply is sent, which the client can see before the server's
            # thread gets there: wait for it (bounded)
            wait_until(lambda: closed, 5, "done (closing the file) after the first reply", poll=0.01)
            assert len(closed) == 1
            # a region past the end of the file: the call fails, the file is still closed, the
            # client reconnects for the next call
            with pytest.raises(TransportError):
                c.call("read", {"off": 1 << 21, "n": 10}, timeout=5)
            # the server closes the connection, then runs done
            wait_until(lambda: len(closed) >= 2, 5, "done (closing the file) after the failed reply", poll=0.01)
            assert len(closed) == 2
            assert bytes(c.call("read", {"off": 0, "n": 3}).payload) == b"<\x00\x01\x02>"
    finally:
        srv.stop()


def test_split_phase_call_overlaps_caller_work(server):
    with RpcClient(*server.address, credential=KEY) as c:
        pending = c.begin("slow", {"s": 0.3})
        t0 = time.monotonic()
        local = sum(range(1000))  # the caller works while the server does
        assert time.monotonic() - t0 < 0.3
        assert pending.wait().result == "done" and local == 499500
        with pytest.raises(RpcError, match="reply already read"):
            pending.wait()
        # remote errors surface at wait(), and the client stays usable
        p2 = c.begin("get", {"key": "absent"})
        with pytest.raises(RemoteError, match="KeyError"):
            p2.wait()
        assert c.call("echo", {}, b"x").result["n"] == 1


def test_pool_split_phase_returns_connection_at_wait(server):
    pool = RpcPool(*server.address, credential=KEY, size=1, timeout=2)
    p = pool.begin("slow", {"s": 0.05})
    # the only connection is busy until wait(): another begin times out with a clear error
    with pytest.raises(RpcError, match="no free connection"):
        pool.begin("slow", {"s": 0.0}, timeout=0.2)
    assert p.wait().result == "done"
    assert pool.call("slow", {"s": 0.0}).result == "done"
    pool.close()
