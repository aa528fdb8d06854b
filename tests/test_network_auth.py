"""network.auth and the RPC server's limits: who may connect, who may call what, and what a
stranger can make a server hold (issue #14, findings 1 and 5)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest
from _waits import wait_until

from network import (
    Authenticator,
    AuthError,
    ClusterFileError,
    Credential,
    FileRegion,
    RemoteError,
    Reply,
    RpcClient,
    RpcServer,
    TransportError,
    client_credential,
    connect,
    derive,
    listen,
    load_cluster,
    new_cluster_key,
    ping,
)
from network.auth import ANY, client_handshake
from network.transport import _PREFIX, MAGIC

ROOT = Path(__file__).resolve().parent.parent
KEY = new_cluster_key()
MiB = 1 << 20


@pytest.fixture
def server():
    calls: list[str] = []
    srv = RpcServer("127.0.0.3", 0, auth=KEY, name="auth-test")
    srv.register("svc", lambda a, p, c: calls.append("svc") or "done")
    srv.register("who", lambda a, p, c: {"key_id": c.principal.key_id, "roles": sorted(c.roles)}, roles=ANY)
    srv.register("write", lambda a, p, c: calls.append(f"write fwd={bool(a.get('fwd'))}") or p.nbytes,
                 roles=ANY, service_if=("fwd",), max_payload=4 * MiB)
    srv.calls = calls
    srv.start()
    yield srv
    srv.stop()


def _closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer closes ``sock`` within ``timeout`` (it may send a refusal first)."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- credentials ---------------------------------------------------------------------------------

def test_credentials_roles_files_and_errors(tmp_path, monkeypatch):
    job = derive(KEY, "job:42", time.time() + 60)
    assert KEY.roles == {"service", "client"} and job.roles == {"client"}
    assert derive(KEY, "job:42", job.expires) == job  # verifiable without a lookup
    with pytest.raises(AuthError, match="reserved"):
        derive(KEY, "cluster", None)
    with pytest.raises(AuthError, match="must be the cluster key"):
        derive(job, "job:43", None)
    path = job.save(tmp_path / "creds" / "job.cred")
    assert path.stat().st_mode & 0o777 == 0o600
    assert Credential.load(path) == job
    with pytest.raises(AuthError, match=f"{tmp_path / 'nope'} does not exist"):
        Credential.load(tmp_path / "nope")
    (tmp_path / "junk").write_text("{")
    with pytest.raises(AuthError, match=f"{tmp_path / 'junk'} is not a fireflyer credential"):
        Credential.load(tmp_path / "junk")
    # client_credential: $FIREFLYER_CREDENTIAL first, else the cluster key, else an error naming both
    KEY.save(tmp_path / "cluster.key")
    cluster_file = tmp_path / "c.toml"
    cluster_file.write_text((ROOT / "deploy/clusters/local.toml").read_text()
                            + '\n[security]\nkey_file = "cluster.key"\n')
    c = load_cluster(cluster_file)
    monkeypatch.setenv("FIREFLYER_CREDENTIAL", str(path))
    assert client_credential(c) == job
    monkeypatch.delenv("FIREFLYER_CREDENTIAL")
    assert client_credential(c) == KEY
    (tmp_path / "cluster.key").unlink()
    with pytest.raises(AuthError, match="FIREFLYER_CREDENTIAL is not set, and the cluster key"):
        client_credential(c)


def test_security_section_is_validated(tmp_path):
    base = (ROOT / "deploy/clusters/local.toml").read_text()
    for extra, want in (('keyfile = "x"', "security.keyfile: unknown key"),
                        ("encrypt = 1", "security.encrypt: expected a boolean"),
                        ("max_connections = 0", "security.max_connections: expected an integer > 0")):
        f = tmp_path / "c.toml"
        f.write_text(base + f"\n[security]\n{extra}\n")
        with pytest.raises(ClusterFileError, match=want):
            load_cluster(f)


def test_new_key_command_and_rotation(tmp_path):
    path = tmp_path / "k"
    run = [sys.executable, "-m", "network.auth"]
    r = subprocess.run([*run, "new-key", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    old = Credential.load(path)
    r = subprocess.run([*run, "new-key", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "exists" in r.stderr
    # rotation: add (old still used, both accepted), promote (new used, old accepted), drop the old
    srv = RpcServer("127.0.0.3", 0, auth=old).start()
    try:
        assert subprocess.run([*run, "add-key", str(path)], timeout=60, cwd=ROOT).returncode == 0
        added = Credential.load(path)
        assert added.secret == old.secret and len(added.accepted) == 1
        new_only = Credential("cluster", added.accepted[0])
        srv2 = RpcServer("127.0.0.3", 0, auth=added).start()  # a server that has the new file
        assert subprocess.run([*run, "promote", str(path)], timeout=60, cwd=ROOT).returncode == 0
        promoted = Credential.load(path)
        assert promoted.secret == new_only.secret and promoted.accepted == (old.secret,)
        # a client that still has the old file and one that has the promoted file both reach srv2
        assert ping(*srv2.address, credential=old)["name"] == "rpc"
        assert ping(*srv2.address, credential=promoted)["name"] == "rpc"
        # ... and srv (old key only) is reached by the old file only, until it gets the new one
        with pytest.raises(AuthError, match="not issued by this cluster's key"):
            ping(*srv.address, credential=new_only)
        assert subprocess.run([*run, "drop-old", str(path)], timeout=60, cwd=ROOT).returncode == 0
        assert Credential.load(path) == new_only
        srv2.stop()
    finally:
        srv.stop()


# -- the handshake -------------------------------------------------------------------------------

def test_server_without_a_key_refuses_to_start():
    with pytest.raises(AuthError, match="no cluster key configured"):
        RpcServer("127.0.0.3", 0)
    with pytest.raises(AuthError, match="needs the cluster key"):
        RpcServer("127.0.0.3", 0, auth=derive(KEY, "job:1", None))


def test_service_without_key_file_exits_with_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fs3.mgmtd", "--cluster", str(ROOT / "deploy/clusters/local.toml"),
                        "--node", "n0", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "FIREFLYER_RUN_DIR": str(tmp_path)})  # no local cluster's key either
    assert r.returncode == 2 and "no [security] key_file" in r.stderr, r.stderr


def test_cluster_and_job_credentials_reach_their_methods(server):
    job = derive(KEY, "job:7", time.time() + 60)
    with RpcClient(*server.address, credential=KEY) as c:
        assert c.call("who").result == {"key_id": "cluster", "roles": ["client", "service"]}
        assert c.call("svc").result == "done"
        assert c.call("write", {"fwd": True}, b"x" * 10).result == 10
    with RpcClient(*server.address, credential=job) as c:
        assert c.call("who").result == {"key_id": "job:7", "roles": ["client"]}
        assert c.call("rpc.ping").result["name"] == "auth-test"
        assert c.call("write", {}, b"x" * 10).result == 10
        with pytest.raises(RemoteError, match="'job:7' .* may not call svc") as ei:
            c.call("svc")
        assert ei.value.kind == "PermissionDenied"
        # a client may write, but not forward: the same method with fwd is service-only
        with pytest.raises(RemoteError, match="may not call write with fwd") as ei:
            c.call("write", {"fwd": True}, b"y" * 1000)
        assert ei.value.kind == "PermissionDenied"
        assert c.call("who").result["key_id"] == "job:7"  # the connection stays usable
    assert server.calls == ["svc", "write fwd=True", "write fwd=False"]


@pytest.mark.parametrize("bad", ["other cluster", "other master", "widened expiry", "renamed"])
def test_wrong_keys_are_refused(server, bad):
    job = derive(KEY, "job:7", time.time() + 60)
    cred = {"other cluster": new_cluster_key(),
            "other master": derive(new_cluster_key(), "job:7", job.expires),
            "widened expiry": Credential("job:7", job.secret, job.expires + 3600),
            "renamed": Credential("job:8", job.secret, job.expires)}[bad]
    with pytest.raises(AuthError, match="not issued by this cluster's key"):
        with RpcClient(*server.address, credential=cred) as c:
            c.call("who")
    wait_until(lambda: server.refused["handshakes"] >= 1, 5, "the refusal counted")


def test_expired_credential_is_refused_by_the_server(server, monkeypatch):
    job = derive(KEY, "job:9", time.time() - 1)
    with pytest.raises(AuthError, match="expired"):  # the client knows it first
        with RpcClient(*server.address, credential=job) as c:
            c.call("who")
    # a client that does not check (or lies about its clock) is refused by the server
    with monkeypatch.context() as m:
        m.setattr(Credential, "expired", lambda self, now=None: False)
        with pytest.raises(AuthError, match="refused credential 'job:9': credential 'job:9' expired"):
            with RpcClient(*server.address, credential=job) as c:
                c.call("who")
    # a connection does not outlive its credential
    short = derive(KEY, "job:10", time.time() + 1.0)
    with RpcClient(*server.address, credential=short) as c:
        assert c.call("who").result["key_id"] == "job:10"
        time.sleep(max(0.0, short.expires - time.time()) + 0.05)
        with pytest.raises(RemoteError, match="credential 'job:10' expired") as ei:
            c.call("who")
        assert ei.value.kind == "AuthError"
        with pytest.raises(AuthError, match="expired"):
            c.call("who")


def test_fake_server_is_refused_before_the_client_proves_anything():
    lst = listen("127.0.0.3", 0, timeout=10)
    seen: dict = {}

    def fake():
        conn = lst.accept()
        hello = msgpack.unpackb(conn.recv().header)
        seen["hello"] = hello
        conn.send(msgpack.packb({"ns": os.urandom(32), "enc": False, "proof": os.urandom(32)}))
        try:
            seen["next"] = conn.recv(timeout=5)
        except TransportError as exc:
            seen["next"] = exc
        conn.close()

    t = threading.Thread(target=fake)
    t.start()
    try:
        with pytest.raises(AuthError, match="failed to prove it holds the cluster key"):
            with RpcClient("127.0.0.3", lst.port, credential=KEY) as c:
                c.call("rpc.ping")
    finally:
        t.join(10)
        lst.close()
    assert seen["hello"]["kid"] == "cluster" and "secret" not in str(seen["hello"])
    assert isinstance(seen["next"], TransportError)  # the client closed without sending its proof


def test_unauthenticated_peer_can_call_nothing(server):
    conn = connect(*server.address, timeout=5)
    conn.send(msgpack.packb({"m": "svc", "i": 1, "a": {}}))
    with pytest.raises(TransportError):
        while True:  # a refusal naming the problem, then the close; never a reply to the call
            msg = msgpack.unpackb(conn.recv(timeout=5).header)
            assert "r" not in msg and "e" in msg, msg
    conn.close()
    assert server.calls == []


def test_encrypted_connections_carry_the_same_calls(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * MiB))
    srv = RpcServer("127.0.0.3", 0, auth=Authenticator(KEY, encrypt=True))

    def read(a, p, ctx):
        fd = os.open(path, os.O_RDONLY)
        return Reply({"n": a["n"]}, [b"<", FileRegion(fd, a["off"], a["n"]), b">"], done=lambda: os.close(fd))

    srv.register("echo", lambda a, p, c: Reply({"n": p.nbytes}, [bytes(p)]), roles=ANY, max_payload=8 * MiB)
    srv.register("read", read, roles=ANY)
    srv.start()
    try:
        job = derive(KEY, "job:1", time.time() + 60)
        with RpcClient(*srv.address, credential=job) as c:  # the server asks for it; the client follows
            data = os.urandom(2 * MiB + 5)
            assert bytes(c.call("echo", {}, data).payload) == data
            bufs = [bytearray(7), bytearray(2 * MiB)]
            r = c.call("echo", {}, data, into=bufs)
            assert b"".join(bytes(v) for v in r.payload) == data
            r = c.call("read", {"off": 1000, "n": MiB})
            assert bytes(r.payload) == b"<" + path.read_bytes()[1000:1000 + MiB] + b">"
            assert type(c._conn).__name__ == "SealedConnection"
    finally:
        srv.stop()


def test_tampered_sealed_frame_is_refused():
    srv = RpcServer("127.0.0.3", 0, auth=KEY)
    srv.register("echo", lambda a, p, c: Reply({"n": p.nbytes}, [bytes(p)]), roles=ANY)
    srv.start()
    try:
        conn = client_handshake(connect(*srv.address, timeout=5), KEY, encrypt=True)
        conn.send(msgpack.packb({"m": "echo", "i": 1, "a": {}}), b"abc")
        assert conn.recv_header(timeout=5)[1] == 3
        conn.recv_payload_into(bytearray(3), 3)
        # flip one byte of the next sealed header on the wire
        raw = bytearray(conn._tx.encrypt(conn._next(True), msgpack.packb({"m": "echo", "i": 2, "a": {}}), None))
        raw[3] ^= 1
        conn.socket.sendall(_PREFIX.pack(MAGIC, len(raw), 0) + raw)
        s = conn.socket
        assert _closed_by_peer(s)
        conn.close()
    finally:
        srv.stop()


# -- limits: check before allocating, bounded connections, idle ones closed ---------------------

def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_oversized_payload_claim_is_refused_without_allocating(server):
    """Finding 5: a header claiming 256 MiB made the server allocate 256 MiB before reading a
    byte. Now the method's bound is checked first: a clear error, the connection closed."""
    before = _rss()
    conn = client_handshake(connect(*server.address, timeout=5), KEY)
    conn.socket.sendall(_PREFIX.pack(MAGIC, len(h := msgpack.packb({"m": "write", "i": 1, "a": {}})), 256 * MiB) + h)
    msg = msgpack.unpackb(conn.recv_header(timeout=10)[0])
    assert msg["e"]["kind"] == "PayloadTooLarge" and "268435456 bytes exceeds" in msg["e"]["msg"]
    assert _closed_by_peer(conn.socket)
    assert _rss() - before < 64 * MiB
    conn.close()
    # a control method's bound is small by default: a 1 MiB payload to it is refused the same way
    with RpcClient(*server.address, credential=KEY) as c:
        with pytest.raises(TransportError):
            c.call("who", {}, bytes(MiB))
        assert c.call("who").result["key_id"] == "cluster"  # a new connection works
    assert server.refused["oversized"] == 2


def test_oversized_header_claim_is_refused_before_buffering(server):
    big = 15 * MiB  # under the transport's absolute bound: only the server's limit stops it
    # before authentication: the hello is bounded to a few hundred bytes
    s = socket.create_connection(server.address, timeout=5)
    s.sendall(_PREFIX.pack(MAGIC, big, 0) + b"x" * 1000)
    assert _closed_by_peer(s)
    s.close()
    # after it: the server's header limit (256 KiB by default)
    conn = client_handshake(connect(*server.address, timeout=5), KEY)
    conn.socket.sendall(_PREFIX.pack(MAGIC, big, 0) + b"x" * 1000)
    wait_until(lambda: all(len(c._rbuf) <= 64 << 10 for c in list(server._conns)), 5, "no grown read buffers")
    assert _closed_by_peer(conn.socket)
    conn.close()


def test_read_buffer_shrinks_after_a_large_header():
    lst = listen("127.0.0.3", 0, timeout=10)
    try:
        a = connect("127.0.0.3", lst.port, timeout=5)
        b = lst.accept()
        a.send(b"h" * (2 * MiB))
        assert b.recv_header(timeout=5) == (b"h" * (2 * MiB), 0)
        assert len(b._rbuf) <= 64 << 10
        a.close()
        b.close()
    finally:
        lst.close()


def test_connections_are_bounded_per_host_and_idle_ones_closed():
    """Finding 5: 400 idle connections were 400 threads. Now the excess is closed at once,
    unauthenticated connections within the handshake timeout, idle ones after idle_timeout."""
    srv = RpcServer("127.0.0.3", 0, auth=Authenticator(KEY, timeout=1.0), max_connections_per_host=8,
                    max_connections=100, idle_timeout=1.0).start()
    socks = []
    try:
        threads0 = threading.active_count()
        for _ in range(40):
            socks.append(socket.create_connection(srv.address, timeout=5))
        wait_until(lambda: srv.refused["connections"] >= 32, 10, "the excess connections refused")
        assert srv.connections <= 8
        assert threading.active_count() - threads0 <= 8
        # the refused ones are closed at once; the others when the handshake time is up
        assert sum(_closed_by_peer(s, 0.5) for s in socks[8:]) == 32
        assert all(_closed_by_peer(s, 5) for s in socks[:8])
        wait_until(lambda: srv.connections == 0, 5, "unauthenticated connections closed")
        # an authenticated, idle connection is closed after idle_timeout; its client reconnects
        with RpcClient(*srv.address, credential=KEY) as c:
            first = c.call("rpc.ping").result
            wait_until(lambda: srv.connections == 0, 5, "the idle connection closed")
            assert c.call("rpc.ping").result["pid"] == first["pid"]
        # another host is counted on its own
        with RpcClient(*srv.address, credential=KEY, source="127.0.0.2") as c:
            assert c.call("rpc.ping").result["name"] == "rpc"
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_benchmark_switch_is_the_environment_only(tmp_path, monkeypatch):
    """FIREFLYER_INSECURE_NO_AUTH=1 (bench/fs3_chunks.py's cluster without authentication) turns
    authentication off; nothing in a cluster file can."""
    from network import server_settings
    from network.auth import INSECURE_ENV, NO_AUTH

    KEY.save(tmp_path / "cluster.key")
    f = tmp_path / "c.toml"
    f.write_text((ROOT / "deploy/clusters/local.toml").read_text() + '\n[security]\nkey_file = "cluster.key"\n')
    assert isinstance(server_settings(load_cluster(f))["auth"], Authenticator)
    monkeypatch.setenv(INSECURE_ENV, "1")
    settings = server_settings(load_cluster(f))
    assert settings["auth"] is NO_AUTH and client_credential(load_cluster(f)) is NO_AUTH
    srv = RpcServer("127.0.0.3", 0, **settings).start()
    try:
        with RpcClient(*srv.address, credential=NO_AUTH) as c:
            assert c.call("rpc.ping").result["name"] == "rpc"
    finally:
        srv.stop()
    f.write_text((ROOT / "deploy/clusters/local.toml").read_text() + "\n[security]\ninsecure = true\n")
    with pytest.raises(ClusterFileError, match="security.insecure: unknown key"):
        load_cluster(f)


def test_a_description_without_key_file_finds_the_local_launchers_key(tmp_path, monkeypatch):
    from deploy.local import default_run_dir
    from network.auth import cluster_key_path

    monkeypatch.setenv("FIREFLYER_RUN_DIR", str(tmp_path))
    c = load_cluster(ROOT / "deploy/clusters/local.toml")
    with pytest.raises(AuthError, match="no .security. key_file"):
        cluster_key_path(c)
    KEY.save(default_run_dir(c.name) / "secrets" / "cluster.key")  # where the launcher keeps it
    assert cluster_key_path(c) == default_run_dir(c.name) / "secrets" / "cluster.key"
    assert client_credential(c) == KEY
