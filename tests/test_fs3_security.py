"""fs3 under forged calls (issue #14, findings 1 and 5): mgmtd and three storage servers as real
processes; a stranger without a credential and a job with its own (client-role) credential try
what the services alone may do, and a header claims 256 MiB."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import psutil
import pytest
from _waits import wait_until
from crc32c import crc32c

from fs3.client import ChunkClient, WriteIO
from network import (
    AuthError,
    RemoteError,
    RpcClient,
    TrafficClass,
    TransportError,
    connect,
    derive,
    new_cluster_key,
)
from network.auth import client_handshake
from network.transport import _PREFIX, MAGIC

ROOT = Path(__file__).resolve().parent.parent
FS3 = ["fs3.mgmtd", "fs3.storage"]
MiB = 1 << 20


def _cluster_file(tmp_path: Path) -> Path:
    from deploy.local import derived_cluster

    return derived_cluster(tmp_path / "fs3-security.toml", FS3, fs3={"heartbeat_interval": 0.25,
                                                                     "failure_timeout": 3.0})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from deploy.local import LocalCluster

    tmp = tmp_path_factory.mktemp("fs3sec")
    lc = LocalCluster(_cluster_file(tmp), tmp / "run", ports="auto", services=FS3)
    lc.up()
    try:
        wait_until(lambda: all(n["port"] and n["alive"] for n in _status(lc)["nodes"].values()), 20, "storage registered")
        client = ChunkClient.from_cluster(lc.cluster_file, node="n0", timeout=40.0)
        yield lc, client
        client.close()
    finally:
        lc.down()


def _status(lc) -> dict:
    with RpcClient(*lc.cluster.endpoint("fs3.mgmtd"), credential=lc.credential, timeout=5) as c:
        return c.call("mgmtd.status").result


def _replicas(lc, chain: int, chunk: int) -> list:
    """Each replica's bytes of one chunk, read straight from its storage node."""
    st = _status(lc)
    out = []
    for t, _state in st["chains"][str(chain)]["members"]:
        node = st["targets"][str(t)]
        with RpcClient(*lc.cluster.endpoint("fs3.storage", node), credential=lc.credential, timeout=10,
                       traffic_class=TrafficClass.STORAGE) as c:
            rep = c.call("storage.read", {"items": [[chain, st["chains"][str(chain)]["version"], chunk, 0, -1]]})
        item = rep.result["items"][0]
        out.append(item.get("err") if "err" in item else bytes(rep.payload))
    return out


def _tail(lc, chain: int) -> tuple[str, int]:
    st = _status(lc)
    members = st["chains"][str(chain)]["members"]
    return st["targets"][str(members[-1][0])], st["chains"][str(chain)]["version"]


def _raw_call(addr: tuple[str, int], method: str, args: dict, payload: bytes = b"") -> list:
    """A call from a stranger: no handshake, just the frame. Returns every answer until the close."""
    conn = connect(*addr, timeout=5)
    answers = []
    try:
        conn.send(msgpack.packb({"m": method, "i": 1, "a": args}, use_bin_type=True), payload)
        while True:
            answers.append(msgpack.unpackb(conn.recv(timeout=5).header, raw=False))
    except TransportError:
        pass
    finally:
        conn.close()
    return answers


def _forged_forward(chain: int, cver: int, chunk: int, data: bytes) -> dict:
    # what a storage server sends its successor (fs3.storage, the write path), with a version
    # above the current one so a server that accepted it would store the bytes
    return {"chain": chain, "cver": cver, "chunk": chunk, "off": 0, "full": True, "op": "write", "client": "forger",
            "channel": 1, "seq": 1, "ver": 1000, "crc": crc32c(data), "fwd": True, "tmo": 5.0}


def test_forged_forward_to_a_tail_is_refused_and_changes_nothing(cluster):
    lc, client = cluster
    chain = client.chains()[0]
    good = b"the acknowledged bytes" * 100
    client.write(chain, 11, good)
    tail, cver = _tail(lc, chain)
    evil = b"forged" * 100
    addr = lc.cluster.endpoint("fs3.storage", tail)
    # a stranger: refused at the handshake, the call never runs
    answers = _raw_call(addr, "storage.write", _forged_forward(chain, cver, 11, evil), evil)
    assert all("r" not in a for a in answers), answers
    # a job with its own credential: may write to a head, not forward
    job = derive(lc.credential, "job:1", time.time() + 600)
    with RpcClient(*addr, credential=job, timeout=10, traffic_class=TrafficClass.STORAGE) as c:
        with pytest.raises(RemoteError, match="may not call storage.write with fwd") as ei:
            c.call("storage.write", _forged_forward(chain, cver, 11, evil), evil)
        assert ei.value.kind == "PermissionDenied"
    # another cluster's key
    with pytest.raises(AuthError, match="not issued by this cluster's key"):
        with RpcClient(*addr, credential=new_cluster_key(), timeout=10) as c:
            c.call("storage.write", _forged_forward(chain, cver, 11, evil), evil)
    assert _replicas(lc, chain, 11) == [good] * 3
    assert bytes(client.read(chain, 11)) == good


def test_forged_heartbeat_and_sync_done_are_refused_and_change_nothing(cluster):
    lc, client = cluster
    before = _status(lc)
    chain = client.chains()[1]
    members = before["chains"][str(chain)]["members"]
    mg = lc.cluster.endpoint("fs3.mgmtd")
    heartbeat = {"node": "n3", "address": "127.0.0.99", "port": 1, "incarnation": "forged", "targets": {},
                 "with_routing": True}
    sync_done = {"chain": chain, "target": members[-1][0], "chain_version": before["chains"][str(chain)]["version"]}
    for method, args in (("mgmtd.heartbeat", heartbeat), ("mgmtd.sync_done", sync_done)):
        answers = _raw_call(mg, method, args)
        assert all("r" not in a for a in answers), (method, answers)
        job = derive(lc.credential, "job:2", time.time() + 600)
        with RpcClient(*mg, credential=job, timeout=10) as c:
            with pytest.raises(RemoteError, match=f"may not call {method}") as ei:
                c.call(method, args)
            assert ei.value.kind == "PermissionDenied"
            assert c.call("mgmtd.routing", {"have": 0}).result  # what a client may do, it may
    after = _status(lc)
    assert after["nodes"]["n3"]["address"] == before["nodes"]["n3"]["address"]
    assert after["nodes"]["n3"]["port"] == before["nodes"]["n3"]["port"]
    assert after["chains"] == before["chains"] and after["offline_targets"] == []


def test_a_job_reads_and_writes_only_the_files_it_holds_capabilities_for(cluster, tmp_path, monkeypatch):
    """A job's credential reaches storage only with a capability per file (fs3.caps, minted by the
    metadata service at open): without one, for another file, read-only for a write, minted for
    another job, or expired, the request is refused and nothing changes."""
    from fs3.caps import mint
    from fs3.client import file_chunk_id
    from fs3.errors import CapabilityDenied

    lc, client = cluster
    job = derive(lc.credential, "job:3/uid=1000/gid=1000", time.time() + 600)
    monkeypatch.setenv("FIREFLYER_CREDENTIAL", str(job.save(tmp_path / "job.cred")))
    mine, other = file_chunk_id(77, 0), file_chunk_id(78, 0)
    chain = client.chains()[2]
    client.write(chain, other, b"someone else's bytes")
    with ChunkClient.from_cluster(lc.cluster_file, node="n0", timeout=40.0) as jc:
        assert jc.credential.key_id == job.key_id
        with pytest.raises(CapabilityDenied, match="no valid write capability for inode 77"):
            jc.write(chain, mine, b"no capability yet")
        jc.grant(mint(lc.credential, 77, False, job.key_id, job.expires))
        with pytest.raises(CapabilityDenied, match="write capability"):
            jc.write(chain, mine, b"a read capability does not write")
        jc.grant(mint(lc.credential, 77, True, job.key_id, job.expires))
        jc.write(chain, mine, b"a job's own bytes")
        assert bytes(jc.read(chain, mine)) == b"a job's own bytes"
        for forged in (mint(lc.credential, 78, True, "job:4/uid=1000/gid=1000", job.expires),  # another job's
                       mint(lc.credential, 78, True, job.key_id, time.time() - 1),  # expired
                       mint(new_cluster_key(), 78, True, job.key_id, job.expires)):  # another cluster's key
            jc.grant(forged)
            with pytest.raises(CapabilityDenied, match="inode 78"):
                jc.read(chain, other)
            with pytest.raises(CapabilityDenied, match="inode 78"):
                jc.batch_write([WriteIO(chain, other, b"overwritten")])
    assert bytes(client.read(chain, mine)) == b"a job's own bytes"
    assert bytes(client.read(chain, other)) == b"someone else's bytes"


def test_a_256_mib_claim_allocates_nothing_on_the_server(cluster):
    """Finding 5: the server allocated the claimed payload before reading a byte of it."""
    lc, client = cluster
    node = "n1"
    addr = lc.cluster.endpoint("fs3.storage", node)
    proc = psutil.Process(lc.info[f"fs3.storage@{node}"].pid)
    before = proc.memory_info().rss
    hdr = msgpack.packb({"m": "storage.write", "i": 1, "a": {"chain": 1, "cver": 1, "chunk": 1}}, use_bin_type=True)
    # a stranger: the hello is bounded, the claim never gets near a buffer
    s = connect(*addr, timeout=5)
    s.socket.sendall(_PREFIX.pack(MAGIC, len(hdr), 256 * MiB) + hdr)
    with pytest.raises(TransportError):
        while True:
            s.recv(timeout=5)
    s.close()
    # an authenticated client: the method's bound (a chunk or a batch) is checked first
    conn = client_handshake(connect(*addr, timeout=5), lc.credential)
    conn.socket.sendall(_PREFIX.pack(MAGIC, len(hdr), 256 * MiB) + hdr)
    msg = msgpack.unpackb(conn.recv_header(timeout=10)[0], raw=False)
    assert msg["e"]["kind"] == "PayloadTooLarge", msg
    time.sleep(0.5)  # had it allocated, the memory would be held while it waits for the bytes
    assert proc.memory_info().rss - before < 64 * MiB
    with pytest.raises(TransportError):  # and the connection is closed
        conn.recv_header(timeout=5)
    conn.close()
