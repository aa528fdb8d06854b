"""fs3 files through the Python client (fs3.client.files): one launched cluster for the module
(mgmtd, three storage servers, meta), 64 KiB chunks so that small files span many chunks and chains."""

from __future__ import annotations

import errno
import io
import random
import threading
import time
from pathlib import Path

import pytest
from _fs3 import fs3_serving
from _waits import wait_until

import fs3
from fs3.client.files import FileSystem, set_default_fs

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ["fs3.mgmtd", "fs3.storage", "fs3.meta"]
CS = 64 << 10


def _cluster_file(tmp: Path) -> Path:
    from deploy.local import derived_cluster

    return derived_cluster(tmp / "fs3-files.toml", SERVICES, fs3={
        "heartbeat_interval": 0.25, "failure_timeout": 3.0, "chunk_size": CS, "max_batch_bytes": 4 * CS,
        "gc_delay": 0.0, "targets_per_node": 2})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from deploy.local import LocalCluster

    tmp = tmp_path_factory.mktemp("files")
    lc = LocalCluster(_cluster_file(tmp), tmp / "run", ports="auto", services=SERVICES).up()
    try:
        wait_until(lambda: fs3_serving(lc), 30,
                   "every storage server registered and serving")
        yield lc
    finally:
        lc.down()


@pytest.fixture(scope="module")
def fs(cluster):
    f = FileSystem(cluster.cluster_file)
    yield f
    f.close()


@pytest.fixture
def d(fs, request):
    """A fresh directory per test."""
    path = f"/t-{request.node.name.replace('[', '-').replace(']', '')}"
    fs.makedirs(path, exist_ok=True)
    return path


def _blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def test_create_write_read_back(fs, d):
    data = _blob(5 * CS + 123, 1)
    with fs.open(f"{d}/a", "wb") as f:
        assert f.write(data) == len(data)
        assert f.tell() == len(data)
    assert fs.stat(f"{d}/a").size == len(data)
    assert fs.read_file(f"{d}/a") == data
    with fs.open(f"{d}/a", "rb") as f:  # small sequential reads (read-ahead) and a seek
        got = b"".join(iter(lambda: f.read(1000), b""))
        assert got == data
        f.seek(CS - 5)
        assert f.read(10) == data[CS - 5:CS + 5]
        buf = bytearray(3 * CS)
        f.seek(7)
        assert f.readinto(buf) == len(buf) and buf == data[7:7 + 3 * CS]
    assert fs.listdir(d) == ["a"]
    # an empty file: nothing on storage, size 0
    with fs.open(f"{d}/empty", "wb"):
        pass
    assert fs.stat(f"{d}/empty").size == 0 and fs.read_file(f"{d}/empty") == b""


def test_append_overwrite_and_modes(fs, d):
    p = f"{d}/f"
    fs.write_file(p, b"hello ")
    with fs.open(p, "ab") as f:
        f.write(b"world")
        f.seek(0)  # appends go to the end whatever the position
        f.write(b"!")
    assert fs.read_file(p) == b"hello world!"
    with fs.open(p, "r+b") as f:  # overwrite in place, read it back through the same handle
        f.seek(6)
        f.write(b"WORLD")
        f.seek(0)
        assert f.read() == b"hello WORLD!"
    assert fs.read_file(p) == b"hello WORLD!"
    with fs.open(p, "wb") as f:  # truncates
        f.write(b"x")
    assert fs.read_file(p) == b"x"
    with pytest.raises(FileExistsError) as ei:
        fs.open(p, "xb")
    assert isinstance(ei.value, fs3.Exists) and ei.value.errno == errno.EEXIST and ei.value.filename == p
    with fs.open(f"{d}/new", "xb") as f:
        f.write(b"new")
    with fs.open(f"{d}/t", "w") as f:  # text modes
        f.write("línea 1\nline 2\n")
    with fs.open(f"{d}/t", "r") as f:
        assert f.readlines() == ["línea 1\n", "line 2\n"]
    with fs.open(f"{d}/wp", "w+b") as f:
        f.write(b"abc")
        f.seek(1)
        assert f.read() == b"bc"
    with pytest.raises(ValueError):
        fs.open(p, "rw")


def test_errors_are_oserrors(fs, d):
    with pytest.raises(FileNotFoundError) as ei:
        fs.open(f"{d}/missing", "rb")
    assert isinstance(ei.value, fs3.NotFound) and ei.value.filename == f"{d}/missing"
    with pytest.raises(IsADirectoryError):
        fs.open(d, "rb")
    with pytest.raises(FileNotFoundError):
        fs.stat(f"{d}/nope/deeper")
    fs.write_file(f"{d}/file", b"1")
    with pytest.raises(NotADirectoryError):
        fs.open(f"{d}/file/x", "wb")
    with pytest.raises(OSError) as ei:
        fs.rmdir(d)
    assert ei.value.errno == errno.ENOTEMPTY
    assert not fs.exists(f"{d}/missing") and fs.exists(f"{d}/file")


def test_truncate_up_and_down(fs, d):
    p = f"{d}/tr"
    data = _blob(3 * CS + 100, 2)
    fs.write_file(p, data)
    fs.truncate(p, CS + 10)  # down, inside chunk 1
    assert fs.stat(p).size == CS + 10
    fs.truncate(p, 4 * CS)  # up again: the cut-off bytes read as zeros
    got = fs.read_file(p)
    assert got[:CS + 10] == data[:CS + 10] and got[CS + 10:] == bytes(4 * CS - CS - 10)
    with fs.open(p, "r+b") as f:
        f.truncate(5)
        f.seek(0, io.SEEK_END)
        assert f.tell() == 5
        f.write(b"++")
    assert fs.read_file(p) == data[:5] + b"++"


def test_rename_over_existing_and_unlink_while_open(fs, d):
    fs.write_file(f"{d}/old", b"old contents")
    fs.write_file(f"{d}/new", b"replacement")
    fs.rename(f"{d}/new", f"{d}/old")
    assert fs.read_file(f"{d}/old") == b"replacement" and fs.listdir(d) == ["old"]
    fs.write_file(f"{d}/x", b"")
    with pytest.raises(FileExistsError):
        fs.rename(f"{d}/x", f"{d}/old", noreplace=True)
    fs.remove(f"{d}/x")
    # unlink while open: the open reader and writer keep their data until they close
    data = _blob(3 * CS, 3)
    fs.write_file(f"{d}/gone", data)
    r = fs.open(f"{d}/gone", "rb")
    w = fs.open(f"{d}/gone", "r+b")
    fs.remove(f"{d}/gone")
    assert not fs.exists(f"{d}/gone")
    time.sleep(0.5)  # gc_delay is 0: GC would have removed the chunks by now
    w.seek(CS)
    w.write(b"still here")
    w.flush()
    assert r.read() == data[:CS] + b"still here" + data[CS + 10:]  # one file: the reader sees the write
    w.seek(CS)
    assert w.read(10) == b"still here"
    w.close()
    r.close()


def test_links(fs, d):
    fs.write_file(f"{d}/target", b"linked")
    fs.link(f"{d}/target", f"{d}/hard")
    assert fs.stat(f"{d}/hard").nlink == 2 and fs.stat(f"{d}/hard").ino == fs.stat(f"{d}/target").ino
    fs.remove(f"{d}/target")
    assert fs.read_file(f"{d}/hard") == b"linked"
    fs.symlink(f"{d}/hard", f"{d}/sym")
    fs.symlink("hard", f"{d}/rel")
    assert fs.readlink(f"{d}/sym") == f"{d}/hard"
    assert fs.lstat(f"{d}/sym").type == "symlink"
    assert fs.read_file(f"{d}/sym") == b"linked"
    entries = {e.name: e for e in fs.scandir(d)}
    assert entries["sym"].is_symlink() and entries["hard"].is_file()
    with pytest.raises(OSError):
        fs.link(d, f"{d}/dirlink")  # no hard links to directories


def test_many_chunks_and_chains(fs, d):
    p = f"{d}/big"
    data = _blob(40 * CS + 777, 4)
    rng = random.Random(5)
    with fs.open(p, "wb") as f:  # writes of uneven sizes, some larger than the buffer
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 1000, CS - 1, CS, 3 * CS + 5, 9 * CS])
            f.write(data[pos:pos + n])
            pos += n
    a = fs.stat(p)
    assert a.size == len(data)
    chains = a.layout["chains"] if isinstance(a.layout, dict) else a.layout.chains
    assert len(chains) > 1
    assert fs.read_file(p) == data
    # a large aligned write straight from the caller's buffer, then random reads
    with fs.open(f"{d}/aligned", "wb") as f:
        f.write(memoryview(data)[:32 * CS])
    with fs.open(f"{d}/aligned", "rb") as f:
        for _ in range(20):
            off = rng.randrange(32 * CS)
            f.seek(off)
            assert f.read(5000) == data[off:min(off + 5000, 32 * CS)]


def test_read_ahead_sees_own_writes(fs, d):
    p = f"{d}/ra"
    data = bytearray(_blob(12 * CS, 6))
    fs.write_file(p, data)
    with fs.open(p, "r+b") as f:
        got = bytearray()
        for _ in range(40):  # sequential small reads: read-ahead and a prefetched window
            got += f.read(1000)
        pos = f.tell()
        f.seek(pos + 5000)  # a write just ahead of the reader, inside what was read ahead
        f.write(b"W" * 100)
        data[pos + 5000:pos + 5100] = b"W" * 100
        f.seek(pos)
        while len(got) < len(data):
            b = f.read(7000)
            assert b
            got += b
        assert got == data
        f.seek(3 * CS)
        f.truncate()
        assert f.read(10) == b""
    assert fs.read_file(p) == data[:3 * CS]


def test_concurrent_writers(fs, d):
    errors: list[BaseException] = []
    blobs = {i: _blob(rng_n, i) for i, rng_n in enumerate([3 * CS + 1, 5 * CS, 7, CS, 2 * CS + 9, 11 * CS])}

    def writer(i: int) -> None:
        try:
            with fs.open(f"{d}/w{i}", "wb") as f:
                b = blobs[i]
                for k in range(0, len(b), 10_000):
                    f.write(b[k:k + 10_000])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=writer, args=(i,)) for i in blobs]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    for i, b in blobs.items():
        assert fs.read_file(f"{d}/w{i}") == b


def test_read_batch(fs, d):
    files = {f"{d}/r{i}": _blob(i * CS // 2 + 17, 10 + i) for i in range(6)}
    for p, b in files.items():
        fs.write_file(p, b)
    reqs = [(p, off, 1000) for p, b in files.items() for off in (0, len(b) // 2, len(b) - 10)]
    got = fs.read_batch(reqs)
    for (p, off, n), view in zip(reqs, got, strict=True):
        assert bytes(view) == files[p][off:off + n]
    with pytest.raises(FileNotFoundError):
        fs.read_batch([(f"{d}/r0", 0, 1), (f"{d}/none", 0, 1)])
    with pytest.raises(IsADirectoryError):
        fs.read_batch([(d, 0, 1)])


def test_walk_mkdir_rmtree_statfs(cluster, fs, d):
    fs.makedirs(f"{d}/a/b/c")
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{d}/a/b/c")
    fs.mkdir(f"{d}/a/b/c", exist_ok=True)
    fs.write_file(f"{d}/a/f1", b"1")
    fs.write_file(f"{d}/a/b/f2", b"22")
    walked = list(fs.walk(f"{d}/a"))
    assert walked[0] == (f"{d}/a", ["b"], ["f1"])
    assert (f"{d}/a/b", ["c"], ["f2"]) in walked
    assert fs.rmtree(f"{d}/a") == 5  # a, b, c, f1, f2: every entry of the tree, its top included
    assert not fs.exists(f"{d}/a")
    st = fs.statfs()
    assert st["files"] >= 1
    # the storage servers' disks over the replication factor: the three local "nodes" share this
    # machine's disk, so the capacity is that disk's
    import os

    vfs = os.statvfs(cluster.run_dir)
    disk = vfs.f_blocks * vfs.f_frsize
    assert 0.9 * disk <= st["bytes_total"] <= 1.1 * disk and 0 < st["bytes_free"] <= st["bytes_total"]
    fs.chmod(d, 0o700)
    assert fs.stat(d).mode & 0o7777 == 0o700
    fs.utime(d, ns=(1_000_000_000, 2_000_000_000))
    assert fs.stat(d).mtime == 2_000_000_000


def test_create_close_touches_no_storage(cluster, d):
    with FileSystem(cluster.cluster_file) as fresh:
        for i in range(20):
            with fresh.open(f"{d}/e{i}", "wb"):
                pass
        assert fresh.chunks._pools == {}  # no connection to any storage server was needed
        assert len(fresh.listdir(d)) == 20


def test_module_level_api(cluster, d, monkeypatch):
    monkeypatch.setenv("FIREFLYER_CLUSTER", str(cluster.cluster_file))
    monkeypatch.delenv("HAI_CLUSTER_FILE", raising=False)
    old = set_default_fs(None)
    try:
        with fs3.open(f"{d}/m", "wb") as f:
            f.write(b"module level")
        assert fs3.stat(f"{d}/m").size == 12
        assert fs3.listdir(d) == ["m"]
        assert [bytes(v) for v in fs3.read_batch([(f"{d}/m", 7, 5)])] == [b"level"]
        fs3.rename(f"{d}/m", f"{d}/n")
        fs3.mkdir(f"{d}/sub")
        assert sorted(fs3.listdir(d)) == ["n", "sub"]
        assert [w[0] for w in fs3.walk(d)] == [d, f"{d}/sub"]
        fs3.remove(f"{d}/n")
        with pytest.raises(FileNotFoundError):
            fs3.open(f"{d}/n")
    finally:
        made = set_default_fs(old)
        if made is not None:
            made.close()


def test_permissions_with_a_job_credential(cluster, fs, d):
    from network.auth import derive, load_cluster_key

    fs.write_file(f"{d}/private", b"secret")
    fs.chmod(f"{d}/private", 0o600)
    fs.write_file(f"{d}/public", b"for all")
    fs.chmod(f"{d}/public", 0o644)
    fs.chmod(d, 0o755)
    key = load_cluster_key(cluster.cluster)
    cred = derive(key, "job:7/uid=1234/gid=1234", time.time() + 600)
    with FileSystem(cluster.cluster_file, credential=cred) as job:
        with pytest.raises(PermissionError) as ei:
            job.open(f"{d}/private", "rb")
        assert isinstance(ei.value, fs3.PermissionDenied) and ei.value.errno == errno.EACCES
        with pytest.raises(PermissionError):
            job.open(f"{d}/new", "wb")  # no write permission on the directory
        with pytest.raises(PermissionError):
            job.open(f"{d}/public", "r+b")
        assert job.read_file(f"{d}/public") == b"for all"
        with FileSystem(cluster.cluster_file, credential=cred) as job2:  # no open before: read_batch alone
            assert [bytes(v) for v in job2.read_batch([(f"{d}/public", 4, 3)])] == [b"all"]
            with pytest.raises(PermissionError):
                job2.read_batch([(f"{d}/private", 0, 1)])
        fs.mkdir(f"{d}/shared", 0o777)
        job.write_file(f"{d}/shared/mine", b"job data")
        assert job.stat(f"{d}/shared/mine").uid == 1234
        assert fs.read_file(f"{d}/shared/mine") == b"job data"


def test_storage_kill_during_reads_and_writes(cluster, fs, d):
    """SIGKILL of a storage server while a writer fsyncs and a reader reads: everything that was
    acknowledged (written and fsynced) reads back afterwards."""
    base = _blob(16 * CS, 20)
    fs.write_file(f"{d}/r", base)
    acked: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    chunk = _blob(CS + 1000, 21)

    def writer() -> None:
        try:
            with fs.open(f"{d}/w", "wb") as f:
                while not stop.is_set() and len(acked) < 200:
                    f.write(chunk)
                    f.fsync()
                    acked.append(f.tell())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                assert fs.read_file(f"{d}/r") == base
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in ts:
        t.start()
    try:
        wait_until(lambda: len(acked) >= 5 or errors, 30, "the writer's first acknowledged writes")
        cluster.kill("fs3.storage", "n3")
        n_at_kill = len(acked)
        wait_until(lambda: len(acked) >= n_at_kill + 5 or errors, 60, "writes after the kill")
    finally:
        stop.set()
        for t in ts:
            t.join(60)
        cluster.start("fs3.storage", "n3")
    assert not errors, errors
    end = acked[-1]
    got = fs.read_file(f"{d}/w")
    assert len(got) >= end
    per = len(chunk)
    assert all(got[k:k + per] == chunk for k in range(0, end, per))
    wait_until(lambda: fs3_serving(cluster), 60, "n3 back and serving")


def test_timestamps(fs, d):
    p = f"{d}/times"
    fs.write_file(p, b"1")
    created = fs.stat(p)
    time.sleep(0.01)  # a later change gets a later ns timestamp
    assert created.mtime == created.ctime and created.mtime > time.time_ns() - 60 * 10**9
    fs.utime(p, ns=(1_000_000_000_123, 2_000_000_000_456))
    st = fs.stat(p)
    assert (st.atime, st.mtime) == (1_000_000_000_123, 2_000_000_000_456)
    assert st.ctime > created.ctime  # a change of attributes is a change
    before = time.time_ns()
    with fs.open(p, "ab") as f:
        f.write(b"2")
    st = fs.stat(p)
    assert st.size == 2 and st.mtime >= before - 10**9 and st.ctime >= st.mtime - 10**9
    fs.utime(d, ns=(10**9, 10**9))  # the directory's times set far back first
    assert fs.stat(d).mtime == 10**9
    fs.write_file(f"{d}/another", b"")
    assert fs.stat(d).mtime > 10**9  # a new entry changes its directory


def test_a_directory_of_10000_entries_is_listed_in_pages(fs, d):
    """10,000 names come back complete and in order, page by page (the client asks for pages of
    at most 1,000), through listdir, scandir and the meta service's own paging."""
    from concurrent.futures import ThreadPoolExecutor

    big = f"{d}/big"
    fs.mkdir(big)
    names = [f"e{i:05d}" for i in range(10_000)]

    def make(part: list[str]) -> None:
        for n in part:
            fs.open(f"{big}/{n}", "wb").close()

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(make, [names[k::4] for k in range(4)]))
    assert fs.listdir(big) == names
    assert sum(1 for e in fs.scandir(big) if e.is_file()) == 10_000
    pages, after = [], ""
    while True:
        page = fs.meta.readdir(path=big, after=after, limit=1000)
        pages.append([e["name"] for e in page["entries"]])
        if not page["more"]:
            break
        after = pages[-1][-1]
    assert len(pages) == 10 and all(len(p) == 1000 for p in pages) and sum(pages, []) == names
    assert fs.stat(big).nlink == 2
    assert fs.rmtree(big) == 10_001 and not fs.exists(big)  # the 10,000 files and the directory


def test_meta_restart_during_reads_and_writes(cluster, fs, d):
    """SIGKILL of the meta server while a client writes, fsyncs, closes and reads files: the client
    retries until the restarted server answers, and every file reads back as written."""
    data = _blob(2 * CS + 5, 30)
    errors: list[BaseException] = []
    stop = threading.Event()
    done = [0]

    def loop() -> None:
        i = 0
        try:
            while not stop.is_set():
                p = f"{d}/f{i % 5}"
                with fs.open(p, "wb") as f:
                    f.write(data)
                    f.fsync()
                assert fs.read_file(p) == data and fs.stat(p).size == len(data)
                done[0] += 1
                i += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=loop)
    t.start()
    try:
        wait_until(lambda: done[0] >= 3 or errors, 30, "the first rounds")
        cluster.kill("fs3.meta", "n0")
        time.sleep(0.5)
        cluster.start("fs3.meta", "n0")
        n = done[0]
        wait_until(lambda: done[0] >= n + 3 or errors, 60, "rounds after the meta restart")
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
