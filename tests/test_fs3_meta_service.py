"""fs3.meta through its RPC service and MetaClient, against a launched cluster (mgmtd, storage, meta)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from _waits import wait_until

from fs3.client import ChunkClient
from fs3.client.chunks import file_chunk_id
from fs3.errors import ChunkNotFound, Exists, MetaUnavailable, NotFound, NotPermitted, PermissionDenied
from fs3.meta import MetaClient
from network.auth import derive, load_cluster_key

ROOT = Path(__file__).resolve().parent.parent
FS3 = ["fs3.mgmtd", "fs3.storage", "fs3.meta"]


def _cluster_file(tmp_path: Path, meta_nodes=("n0",), **fs3) -> Path:
    from deploy.local import derived_cluster

    return derived_cluster(tmp_path / "fs3-meta-test.toml", FS3, nodes={"fs3.meta": list(meta_nodes)},
                           fs3={"heartbeat_interval": 0.25, "failure_timeout": 3.0, "gc_delay": 0.0,
                                "session_ttl": 3.0, "stripe": 4, **fs3})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from deploy.local import LocalCluster

    tmp = tmp_path_factory.mktemp("meta")
    lc = LocalCluster(_cluster_file(tmp), tmp / "run", ports="auto", services=FS3).up()
    try:
        yield lc
    finally:
        lc.down()


@pytest.fixture
def meta(cluster):
    m = MetaClient(cluster.cluster_file, credential=cluster.credential, timeout=20)
    yield m
    m.shutdown()


def _chunks(lc) -> ChunkClient:
    return ChunkClient.from_cluster(lc.cluster_file, node="n0", timeout=20.0, credential=lc.credential)


def test_namespace_ops_through_the_service(meta):
    d = meta.mkdir("/svc", 0o755)
    assert d.is_dir and d.nlink == 2
    r = meta.create("/svc/f", 0o640)
    assert r["created"] and r["session"] and r["attrs"].is_file
    lay = r["attrs"].layout
    assert 1 <= len(lay["chains"]) <= 4 and lay["chunk_size"] == 1 << 20
    meta.close(r["attrs"].ino, r["session"], wrote=True, length=5)
    assert meta.stat("/svc/f").size == 5
    with pytest.raises(Exists):
        meta.create("/svc/f", excl=True)
    meta.rename("/svc/f", "/svc/g")
    with pytest.raises(NotFound):
        meta.stat("/svc/f")
    names = [e["name"] for e in meta.listdir(path="/svc")]
    assert names == ["g"]
    st = meta.stat("/svc/g").to_stat_result()
    assert st.st_size == 5 and st.st_mode & 0o777 == 0o640
    assert meta.statfs()["files"] >= 3
    assert meta.remove("/svc", recursive=True) == 2


def test_close_takes_the_exact_length_from_storage_and_gc_removes_chunks(cluster, meta):
    r = meta.create("/big", 0o644)
    a = r["attrs"]
    cs = a.layout["chunk_size"]
    chains = a.layout["chains"]
    with _chunks(cluster) as cc:
        # 2.5 chunks written, but the writer reports nothing (a crash): meta asks storage
        for i, n in enumerate((cs, cs, cs // 2)):
            cc.write(chains[i % len(chains)], file_chunk_id(a.ino, i), b"x" * n)
        got = meta.close(a.ino, r["session"], wrote=True, length=None)
        assert got.size == 2 * cs + cs // 2
        # an open session keeps the chunks after the unlink; the last close lets GC remove them
        o = meta.open("/big", write=False, session=True)
        meta.unlink("/big")
        time.sleep(1.0)
        assert bytes(cc.read(chains[0], file_chunk_id(a.ino, 0), 0, 4)) == b"xxxx"
        meta.close(a.ino, o["session"])

        def gone() -> bool:
            try:
                cc.read(chains[0], file_chunk_id(a.ino, 0), 0, 4)
                return False
            except ChunkNotFound:
                return True

        wait_until(gone, 20, "GC removed the chunks of the unlinked file")


def test_truncate_cuts_chunks_so_truncate_up_reads_zeros(cluster, meta):
    r = meta.create("/t", 0o644)
    a = r["attrs"]
    cs = a.layout["chunk_size"]
    chains = a.layout["chains"]
    with _chunks(cluster) as cc:
        cc.write(chains[0], file_chunk_id(a.ino, 0), b"y" * cs)
        cc.write(chains[1 % len(chains)], file_chunk_id(a.ino, 1), b"y" * 100)
        meta.close(a.ino, r["session"], wrote=True, length=cs + 100)
        assert meta.truncate("/t", 10).size == 10
        assert bytes(cc.read(chains[0], file_chunk_id(a.ino, 0))) == b"y" * 10
        with pytest.raises(ChunkNotFound):
            cc.read(chains[1 % len(chains)], file_chunk_id(a.ino, 1))
        assert meta.truncate("/t", cs * 2).size == cs * 2


def test_identity_comes_from_the_credential(cluster, meta):
    meta.mkdir("/home", 0o755)
    meta.mkdir("/home/u1234", 0o755)
    meta.setattr("/home/u1234", uid=1234, gid=1234)
    key = load_cluster_key(cluster.cluster)
    job = derive(key, "job:7/uid=1234/gid=1234", time.time() + 600)
    anon = derive(key, "job:8", time.time() + 600)
    with MetaClient(cluster.cluster_file, credential=job, timeout=10) as mj, \
            MetaClient(cluster.cluster_file, credential=anon, user={"uid": 0, "gids": [0]}, timeout=10) as ma:
        r = mj.create("/home/u1234/f", 0o600, user={"uid": 0, "gids": [0]})  # the asserted root is ignored
        assert (r["attrs"].uid, r["attrs"].gid) == (1234, 1234)
        assert "cap" in r  # a job gets a data-path capability
        mj.close(r["attrs"].ino, r["session"])
        with pytest.raises(PermissionDenied):
            ma.create("/home/u1234/g")  # nobody (65534), whatever it asserts
        with pytest.raises(PermissionDenied):
            ma.open("/home/u1234/f")
        with pytest.raises(NotPermitted):
            mj.setattr("/home/u1234/f", uid=0)
    # the cluster key may assert a user
    with pytest.raises(PermissionDenied):
        meta.open("/home/u1234/f", user={"uid": 999, "gids": [999]})
    assert meta.open("/home/u1234/f", user={"uid": 1234, "gids": [1234]})["attrs"].uid == 1234


def test_sessions_not_renewed_are_pruned_with_exact_lengths(cluster, meta):
    # a client that stops renewing (a crash): its session expires after session_ttl (3 s)
    dead = MetaClient(cluster.cluster_file, credential=cluster.credential, timeout=10)
    r = dead.create("/crashed", 0o644)
    dead._stop.set()  # no more renewals
    a = r["attrs"]
    with _chunks(cluster) as cc:
        cc.write(a.layout["chains"][0], file_chunk_id(a.ino, 0), b"z" * 1234)

    wait_until(lambda: meta.stat("/crashed").size == 1234, 20, "the expired session was pruned, length exact")
    dead.shutdown()
    # a renewed session stays
    r2 = meta.create("/alive", 0o644)
    time.sleep(4.5)
    assert meta.renew() == 1  # still there after more than session_ttl: the thread renewed it
    assert meta.sync(r2["attrs"].ino, r2["session"], wrote=True, length=7).size == 7


def test_unreachable_meta_raises_unavailable_quickly(cluster):
    m = MetaClient([("127.0.0.2", 1)], credential=cluster.credential, timeout=1.0, call_timeout=0.5)
    t = time.monotonic()
    with pytest.raises(MetaUnavailable):
        m.stat("/")
    assert time.monotonic() - t < 5
    m.shutdown()


def test_concurrent_clients_create_in_one_directory(cluster, meta):
    meta.mkdir("/conc", 0o777)
    errs: list[Exception] = []

    def work(k: int) -> None:
        try:
            with MetaClient(cluster.cluster_file, credential=cluster.credential, timeout=20) as m:
                for i in range(40):
                    r = m.create(f"/conc/f{k}-{i}", 0o644)
                    m.close(r["attrs"].ino, r["session"], wrote=True, length=i)
                    if i % 2:
                        m.rename(f"/conc/f{k}-{i}", f"/conc/r{k}-{i}")
        except Exception as exc:  # collected for the assert
            errs.append(exc)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errs, errs
    names = {e["name"] for e in meta.listdir(path="/conc")}
    assert len(names) == 160 and sum(n.startswith("r") for n in names) == 80
    assert meta.stat("/conc").nlink == 2


def test_meta_restart_is_invisible_to_a_calling_client(cluster, meta):
    meta.mkdir("/restart", 0o755)
    done = threading.Event()
    errs: list[Exception] = []
    count = [0]  # creates that answered (progress)
    lost = [0]  # creates applied just before the restart whose answer was lost (Exists on the retry)

    def calls() -> None:
        with MetaClient(cluster.cluster_file, credential=cluster.credential, timeout=30) as m:
            while not done.is_set():
                name = f"/restart/f{count[0] + lost[0]}"
                try:
                    r = m.create(name, 0o644, excl=True)
                    m.close(r["attrs"].ino, r["session"], wrote=True, length=1)
                    assert m.stat(name).size == 1
                    count[0] += 1
                except Exists:  # not progress: counted apart, and at most one such per restart
                    lost[0] += 1
                except Exception as exc:
                    errs.append(exc)
                    return

    t = threading.Thread(target=calls)
    t.start()
    wait_until(lambda: count[0] >= 20, 20, "the client is calling")
    cluster.kill("fs3.meta", "n0")  # SIGKILL in the middle of the calls
    time.sleep(0.5)
    cluster.start("fs3.meta", "n0")
    before = count[0]
    wait_until(lambda: count[0] >= before + 20, 30, "the client carries on after the restart")
    done.set()
    t.join(30)
    assert not t.is_alive()
    assert not errs, errs
    assert lost[0] <= 1, f"{lost[0]} replies lost to one restart"


@pytest.mark.postgres
def test_two_meta_servers_on_postgres_create_and_rename_in_one_directory(launch_cluster, tmp_path, pg_url):
    lc = launch_cluster(_cluster_file(tmp_path, meta_nodes=("n0", "n1"), meta_db=pg_url), services=FS3)
    eps = [lc.cluster.endpoint("fs3.meta", n) for n in ("n0", "n1")]
    with MetaClient([eps[0]], credential=lc.credential, timeout=30) as m0:
        m0.mkdir("/shared", 0o777)
    errs: list[Exception] = []

    def work(k: int) -> None:
        try:
            with MetaClient([eps[k % 2]], credential=lc.credential, timeout=60) as m:
                for i in range(30):
                    r = m.create(f"/shared/f{k}-{i}", 0o644, excl=True)
                    m.close(r["attrs"].ino, r["session"], wrote=True, length=i)
                    m.rename(f"/shared/f{k}-{i}", f"/shared/same{i % 3}")  # contended: replaces
                    m.mkdir(f"/shared/d{k}-{i}")
        except Exception as exc:
            errs.append(exc)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(180)
    assert not errs, errs
    with MetaClient([eps[1]], credential=lc.credential, timeout=30) as m1:
        names = {e["name"] for e in m1.listdir(path="/shared")}
        assert names == {f"same{i}" for i in range(3)} | {f"d{k}-{i}" for k in range(4) for i in range(30)}
        st = m1.stat("/shared")
        assert st.nlink == 2 + 120
        # both servers see one namespace
        with MetaClient([eps[0]], credential=lc.credential, timeout=30) as m0:
            assert m0.stat("/shared/same0").ino == m1.stat("/shared/same0").ino


def test_a_credential_no_server_accepts_fails_at_once(cluster):
    from network import AuthError
    from network.auth import new_cluster_key

    with MetaClient(cluster.cluster_file, credential=new_cluster_key(), timeout=20) as m:
        t = time.monotonic()
        with pytest.raises(AuthError):
            m.stat("/")
        assert time.monotonic() - t < 10
