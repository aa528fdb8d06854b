"""The fs3 FUSE mount end to end: mgmtd, three storage servers and a meta server as real processes
(local launcher), one mount (a daemon process) per module, plain ``open``/``os`` calls through it.

Skipped, with the reason, without /dev/fuse, pyfuse3 or the right to mount (root here). The unit
tests of the write buffer and the read-ahead at the end need neither.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from _waits import wait_until

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ["fs3.mgmtd", "fs3.storage", "fs3.meta"]
CHUNK = 64 * 1024  # small chunks: a file of a few hundred KiB spans many chunks and every chain


def _why_not() -> str | None:
    from fs3.fuse import unavailable

    why = unavailable()
    if why is None and os.geteuid() != 0:
        return "the permission tests run commands as other uids: root only"
    return why


_needs_mount = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def _cluster_file(tmp: Path) -> Path:
    from deploy.local import derived_cluster

    return derived_cluster(tmp / "fs3-fuse.toml", SERVICES, fs3={
        "heartbeat_interval": 0.25, "failure_timeout": 3.0, "chunk_size": CHUNK, "max_batch_bytes": 1 << 20,
        "gc_delay": 0.0, "session_ttl": 30.0})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from deploy.local import LocalCluster

    tmp = tmp_path_factory.mktemp("fuse")
    lc = LocalCluster(_cluster_file(tmp), tmp / "run", ports="auto", services=SERVICES)
    lc.up()
    try:
        yield lc
    finally:
        lc.down()


@pytest.fixture(scope="module")
def mnt(cluster):
    """The mount (a daemon started by run_mount) of the module's cluster, in a directory other
    accounts can reach (0755 under the system's temporary directory: pytest's own is 0700);
    unmounted at the end, with its daemon gone."""
    from deploy.local import pid_alive
    from fs3.fuse import pid_file, run_mount, unmount
    from fs3.fuse.options import is_mounted

    base = Path(tempfile.mkdtemp(prefix="fs3-fuse-test-"))
    base.chmod(0o755)
    mp = base / "mnt"
    mp.mkdir()
    log = base / "mount.log"
    assert run_mount(cluster.cluster_file, mp, foreground=False, options={"log": str(log)}) == 0
    assert is_mounted(mp)
    pid = int(pid_file(mp).read_text())
    try:
        yield mp
    finally:
        if is_mounted(mp):
            unmount(mp, timeout=20)
        wait_until(lambda: not pid_alive(pid), 20, f"the mount daemon (pid {pid}) exits; log {log}")
        shutil.rmtree(base, ignore_errors=True)


def _meta(cluster):
    from fs3.meta import MetaClient
    from network.auth import load_cluster_key

    return MetaClient(cluster.cluster_file, credential=load_cluster_key(cluster.cluster))


def _storage_reads(cluster) -> int:
    """The chunk reads the storage servers (n1..n3) have served, all together (``storage.stats``)."""
    from network import RpcClient

    total = 0
    for node in ("n1", "n2", "n3"):
        with RpcClient(*cluster.cluster.endpoint("fs3.storage", node), credential=cluster.credential,
                       timeout=5) as c:
            total += c.call("storage.stats").result["reads"]
    return total


def _as_user(uid: int, script: str) -> subprocess.CompletedProcess:
    """Run a shell snippet as ``uid`` (gid ``uid``, no supplementary groups)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sh", "-c", script],
                          capture_output=True, text=True, timeout=30)


# -- files ------------------------------------------------------------------------------------------------
@pytest.mark.fuse
@_needs_mount
def test_create_write_read_append_overwrite(mnt):
    p = mnt / "a.txt"
    with open(p, "wb") as f:
        f.write(b"hello ")
    assert p.read_bytes() == b"hello "
    with open(p, "ab") as f:
        f.write(b"world")
    assert p.read_bytes() == b"hello world"
    assert os.stat(p).st_size == 11
    with open(p, "r+b") as f:
        f.seek(6)
        f.write(b"WORLD")
        f.seek(0)
        assert f.read() == b"hello WORLD"  # read-your-writes through one handle
    assert p.read_bytes() == b"hello WORLD"
    with open(p, "wb") as f:  # O_TRUNC
        f.write(b"x")
    assert p.read_bytes() == b"x"
    with pytest.raises(FileExistsError):
        open(p, "xb")
    with pytest.raises(FileNotFoundError):
        open(mnt / "nope", "rb")
    with pytest.raises(IsADirectoryError):
        open(mnt, "wb")
    # O_APPEND from two handles: every write lands at the end
    with open(p, "ab") as f1, open(p, "ab") as f2:
        f1.write(b"1")
        f1.flush()
        f2.write(b"2")
    assert p.read_bytes() == b"x12"


@pytest.mark.fuse
@_needs_mount
def test_truncate_up_and_down(mnt):
    p = mnt / "t.bin"
    data = random.Random(1).randbytes(5 * CHUNK + 123)
    p.write_bytes(data)
    os.truncate(p, 2 * CHUNK + 7)
    assert os.stat(p).st_size == 2 * CHUNK + 7
    assert p.read_bytes() == data[:2 * CHUNK + 7]
    os.truncate(p, 4 * CHUNK)  # up: the cut part reads as zeros
    assert p.read_bytes() == data[:2 * CHUNK + 7] + bytes(4 * CHUNK - (2 * CHUNK + 7))
    with open(p, "r+b") as f:
        f.truncate(10)
        assert os.fstat(f.fileno()).st_size == 10
    assert p.read_bytes() == data[:10]
    os.truncate(p, 0)
    assert p.read_bytes() == b""


@pytest.mark.fuse
@_needs_mount
def test_rename_over_an_existing_file(mnt):
    (mnt / "r1").write_bytes(b"one")
    (mnt / "r2").write_bytes(b"two")
    os.rename(mnt / "r1", mnt / "r2")
    assert not (mnt / "r1").exists() and (mnt / "r2").read_bytes() == b"one"
    os.mkdir(mnt / "rd")
    os.rename(mnt / "r2", mnt / "rd" / "r3")
    assert (mnt / "rd" / "r3").read_bytes() == b"one"
    os.mkdir(mnt / "rd2")
    (mnt / "rd2" / "x").write_bytes(b"")
    with pytest.raises(OSError) as e:
        os.rename(mnt / "rd", mnt / "rd2")  # over a non-empty directory
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.rename(mnt / "rd", mnt / "rd" / "sub")  # into itself
    assert e.value.errno == errno.EINVAL


@pytest.mark.fuse
@_needs_mount
def test_unlink_while_open_keeps_the_data_until_close(mnt, cluster):
    from fs3.client import ChunkClient
    from fs3.client.chunks import file_chunk_id
    from fs3.errors import ChunkNotFound

    p = mnt / "u.bin"
    data = random.Random(2).randbytes(3 * CHUNK)
    p.write_bytes(data)
    st = os.stat(p)
    meta = _meta(cluster)
    lay = meta.stat(ino=st.st_ino).layout
    chain0 = lay["chains"][0] if isinstance(lay, dict) else lay.chains[0]
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)  # O_DIRECT: the reads reach the mount, not the page cache
    try:
        os.unlink(p)
        assert not p.exists()
        assert os.pread(fd, len(data), 0) == data  # reads go on
        assert os.pread(fd, 100, CHUNK - 50) == data[CHUNK - 50:CHUNK + 50]
    finally:
        os.close(fd)
    with ChunkClient.from_cluster(cluster.cluster, timeout=20) as cc:
        def gone() -> bool:
            try:
                cc.read(chain0, file_chunk_id(st.st_ino, 0))
            except ChunkNotFound:
                return True
            return False
        wait_until(gone, 20, "the unlinked file's chunks are removed once it is closed (gc_delay 0)")


@pytest.mark.fuse
@_needs_mount
def test_hard_links_and_symlinks(mnt):
    (mnt / "h1").write_bytes(b"linked")
    os.link(mnt / "h1", mnt / "h2")
    assert os.stat(mnt / "h1").st_nlink == 2 and os.stat(mnt / "h1").st_ino == os.stat(mnt / "h2").st_ino
    os.unlink(mnt / "h1")
    assert (mnt / "h2").read_bytes() == b"linked" and os.stat(mnt / "h2").st_nlink == 1
    os.symlink("h2", mnt / "s1")
    assert os.readlink(mnt / "s1") == "h2"
    assert (mnt / "s1").read_bytes() == b"linked"
    assert stat.S_ISLNK(os.lstat(mnt / "s1").st_mode)
    os.symlink("/nowhere/at/all", mnt / "dangling")
    assert os.readlink(mnt / "dangling") == "/nowhere/at/all"
    with pytest.raises(FileNotFoundError):
        (mnt / "dangling").read_bytes()
    os.mkdir(mnt / "ldir")
    with pytest.raises(PermissionError):  # EPERM: no hard links to directories
        os.link(mnt / "ldir", mnt / "ldir2")


@pytest.mark.fuse
@_needs_mount
def test_files_spanning_many_chunks_and_chains(mnt, cluster):
    rng = random.Random(3)
    big = rng.randbytes(40 * CHUNK + 1000)  # 41 chunks over every chain of the stripe
    p = mnt / "big.bin"
    with open(p, "wb") as f:
        for i in range(0, len(big), 100_000):  # writes that do not fall on chunk boundaries
            f.write(big[i:i + 100_000])
    assert os.stat(p).st_size == len(big)
    assert p.read_bytes() == big
    lay = _meta(cluster).stat(ino=os.stat(p).st_ino).layout
    chains = lay["chains"] if isinstance(lay, dict) else lay.chains
    assert len(chains) == 3
    with open(p, "rb") as f:  # random reads across chunk boundaries
        for _ in range(20):
            off = rng.randrange(len(big))
            f.seek(off)
            assert f.read(3 * CHUNK) == big[off:off + 3 * CHUNK]
    with open(p, "r+b") as f:  # a write in the middle, across two chunks
        f.seek(5 * CHUNK - 10)
        f.write(b"Z" * 20)
    want = big[:5 * CHUNK - 10] + b"Z" * 20 + big[5 * CHUNK + 10:]
    assert p.read_bytes() == want
    # sparse: a write far past the end leaves a hole of zeros
    with open(mnt / "sparse", "wb") as f:
        f.seek(10 * CHUNK + 5)
        f.write(b"end")
    got = (mnt / "sparse").read_bytes()
    assert len(got) == 10 * CHUNK + 8 and got[-3:] == b"end" and not any(got[:-3])


@pytest.mark.fuse
@_needs_mount
def test_concurrent_writers_to_different_files(mnt):
    os.mkdir(mnt / "conc")
    errors: list[BaseException] = []
    datas = {i: random.Random(100 + i).randbytes(3 * CHUNK + i * 777) for i in range(6)}

    def writer(i: int) -> None:
        try:
            with open(mnt / "conc" / f"f{i}", "wb") as f:
                for j in range(0, len(datas[i]), 10_000):
                    f.write(datas[i][j:j + 10_000])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i, d in datas.items():
        assert (mnt / "conc" / f"f{i}").read_bytes() == d


@pytest.mark.fuse
@_needs_mount
def test_directory_listing(mnt, cluster):
    """10,000 entries (readdir pages of 1,000): 200 made through the mount, the rest through the
    Python client (faster), all listed through the mount."""
    from concurrent.futures import ThreadPoolExecutor

    from fs3 import FileSystem

    d = mnt / "many"
    os.mkdir(d)
    names = {f"n{i:05d}" for i in range(10_000)}
    mine = sorted(names)[:200]
    for n in mine:
        os.close(os.open(d / n, os.O_CREAT | os.O_WRONLY, 0o644))
    rest = sorted(names)[200:]
    with FileSystem(cluster.cluster_file) as fs, ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda part: [fs.open(f"/many/{n}", "wb").close() for n in part], [rest[k::4] for k in range(4)]))
    os.mkdir(d / "sub")
    assert set(os.listdir(d)) == names | {"sub"}
    kinds = {e.name: e.is_dir() for e in os.scandir(d)}
    assert kinds["sub"] and not kinds["n00001"] and len(kinds) == 10_001
    with pytest.raises(OSError) as e:
        os.rmdir(d)
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(NotADirectoryError):
        os.listdir(d / "n00001")
    v = os.statvfs(mnt)
    assert v.f_namemax == 255 and v.f_bsize > 0


@pytest.mark.fuse
@_needs_mount
def test_permissions_refused(mnt):
    d = mnt / "private"
    os.mkdir(d, 0o700)
    (d / "secret").write_bytes(b"s")
    (mnt / "ro.txt").write_bytes(b"read only")
    os.chmod(mnt / "ro.txt", 0o644)
    os.mkdir(mnt / "shared")
    os.chmod(mnt / "shared", 0o777)  # (mkdir applies the umask)
    r = _as_user(1234, f"cat {d}/secret")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _as_user(1234, f"ls {d}")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _as_user(1234, f"echo x >> {mnt}/ro.txt")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _as_user(1234, f"cat {mnt}/ro.txt")
    assert r.returncode == 0 and r.stdout == "read only"
    r = _as_user(1234, f"chmod 777 {mnt}/ro.txt")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    r = _as_user(1234, f"touch {mnt}/nope")  # no write permission on the root (0755, root's)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # in a world-writable directory the new file belongs to the user
    r = _as_user(1234, f"echo mine > {mnt}/shared/f && chmod 600 {mnt}/shared/f")
    assert r.returncode == 0, r.stderr
    st = os.stat(mnt / "shared" / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 1234, 0o600)
    r = _as_user(4321, f"cat {mnt}/shared/f")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _as_user(4321, f"chown 4321 {mnt}/shared/f")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr


@pytest.mark.fuse
@_needs_mount
def test_timestamps(mnt):
    p = mnt / "times"
    p.write_bytes(b"1")
    os.utime(p, ns=(1_000_000_000_123, 2_000_000_000_456))
    st = os.stat(p)
    assert st.st_atime_ns == 1_000_000_000_123 and st.st_mtime_ns == 2_000_000_000_456
    before = time.time_ns()
    with open(p, "ab") as f:
        f.write(b"2")
    st = os.stat(p)
    assert st.st_mtime_ns >= before - 10**9 and st.st_size == 2
    os.chmod(p, 0o600)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


@pytest.mark.fuse
@_needs_mount
def test_page_cache_kept_while_unchanged_dropped_when_changed_elsewhere(mnt, cluster):
    from fs3.client.chunks import ChunkClient
    from fs3.client.filedata import FileData
    from network.auth import load_cluster_key

    p = mnt / "cached.bin"
    p.write_bytes(b"A" * 5000)  # one chunk: the mount's read-ahead stops at the file's end
    assert p.read_bytes() == b"A" * 5000  # read once in full: now cached
    reads = _storage_reads(cluster)
    assert p.read_bytes() == b"A" * 5000  # kept: nothing changed, so no storage server is asked
    assert _storage_reads(cluster) == reads
    # another client rewrites and extends the file behind the mount's back
    meta = _meta(cluster)
    r = meta.open(path="/cached.bin", write=True, session=True)
    a = r["attrs"]
    with ChunkClient.from_cluster(cluster.cluster, credential=load_cluster_key(cluster.cluster), timeout=20) as cc:
        fd = FileData(cc)
        try:
            fd.write(a.ino, a.layout, 0, b"B" * 7000)
        finally:
            fd.close()
    meta.close(a.ino, r["session"], wrote=True, length=7000, mtime=time.time_ns())
    meta.shutdown()
    reads = _storage_reads(cluster)  # after the other client's write (which may read to merge)
    assert p.read_bytes() == b"B" * 7000  # the next open sees the new bytes and size
    assert _storage_reads(cluster) > reads  # ... read from the storage servers, not the dropped cache


# -- failures ---------------------------------------------------------------------------------------------
@pytest.mark.fuse
@_needs_mount
def test_meta_restart_during_reads_and_writes(mnt, cluster):
    data = random.Random(5).randbytes(2 * CHUNK + 5)
    (mnt / "mr").mkdir()
    errors: list[BaseException] = []
    stop = threading.Event()
    done = [0]

    def loop() -> None:
        i = 0
        while not stop.is_set():
            p = mnt / "mr" / f"f{i % 5}"
            try:
                p.write_bytes(data)
                assert p.read_bytes() == data
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            done[0] += 1
            i += 1

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


@pytest.mark.fuse
@_needs_mount
def test_storage_kill9_during_reads_and_writes(mnt, cluster):
    """SIGKILL of a storage server while one thread reads a file and another writes and fsyncs
    files through the mount: the reads go on without an error, and every file whose fsync
    returned reads back as written."""
    data = random.Random(6).randbytes(24 * CHUNK)
    p = mnt / "sk.bin"
    p.write_bytes(data)
    errors: list[BaseException] = []
    stop = threading.Event()
    done = [0]
    piece = random.Random(7).randbytes(3 * CHUNK + 11)
    synced: list[Path] = []
    (mnt / "skw").mkdir()

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 200:
            w = mnt / "skw" / f"w{i}"
            try:
                fd = os.open(w, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, piece)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            synced.append(w)
            i += 1

    def reader() -> None:
        while not stop.is_set():
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
                try:
                    got = b"".join(os.pread(fd, 4 * CHUNK, off) for off in range(0, len(data), 4 * CHUNK))
                finally:
                    os.close(fd)
                assert got == data
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            done[0] += 1

    ts = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in ts:
        t.start()
    try:
        wait_until(lambda: (done[0] >= 2 and len(synced) >= 2) or errors, 30, "the first reads and writes")
        cluster.kill("fs3.storage", "n2")
        n, m = done[0], len(synced)
        wait_until(lambda: (done[0] >= n + 3 and len(synced) >= m + 3) or errors, 60,
                   "reads and writes after storage n2 was killed")
    finally:
        stop.set()
        for t in ts:
            t.join(60)
        cluster.start("fs3.storage", "n2")
    assert not errors, errors
    for w in synced:
        fd = os.open(w, os.O_RDONLY | os.O_DIRECT)  # from storage, not the page cache
        try:
            assert os.pread(fd, len(piece) + 4096, 0) == piece, w
        finally:
            os.close(fd)


# -- unmount ----------------------------------------------------------------------------------------------
def _foreground_mount(cluster, mp: Path, log: Path) -> subprocess.Popen:
    from fs3.fuse.options import is_mounted

    proc = subprocess.Popen([sys.executable, "-m", "fs3.fuse", str(mp), "--cluster", str(cluster.cluster_file),
                             "-o", f"log={log}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: is_mounted(mp) or proc.poll() is not None, 30, f"the mount at {mp}; log {log}")
    assert proc.poll() is None, log.read_text()
    return proc


@pytest.mark.fuse
@_needs_mount
def test_unmount_on_sigterm_and_with_fs3_umount(cluster, tmp_path):
    from fs3.fuse.options import is_mounted

    mp = tmp_path / "m2"
    mp.mkdir()
    proc = _foreground_mount(cluster, mp, tmp_path / "m2.log")
    fd = os.open(mp / "pending", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"buffered")  # still in the mount's write buffer: sent before it unmounts
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    with contextlib.suppress(OSError):
        os.close(fd)  # the mount is gone (detached)
    assert not is_mounted(mp)
    proc = _foreground_mount(cluster, mp, tmp_path / "m3.log")
    assert (mp / "pending").read_bytes() == b"buffered"
    from typer.testing import CliRunner

    from fs3.cli import app

    r = CliRunner().invoke(app, ["umount", str(mp)])
    assert r.exit_code == 0, r.output
    assert proc.wait(30) == 0
    assert not is_mounted(mp)


@pytest.mark.fuse
@_needs_mount
def test_memfs_reference_serves_its_file_and_unmounts_on_sigterm(tmp_path):
    """bench/_fuse_memfs.py, the benchmark's in-memory reference, with the mount's options."""
    from fs3.fuse.options import is_mounted

    mp = tmp_path / "memfs"
    mp.mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_fuse_memfs.py"), str(mp), "--size", "3000000",
                             "-o", "attr_timeout=2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        wait_until(lambda: is_mounted(mp), 20, "the memfs mount")
        data = (mp / "data").read_bytes()
        assert len(data) == 3_000_000 and data[:1 << 20] == data[1 << 20:2 << 20]
        assert os.listdir(mp) == ["data"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not is_mounted(mp)


# -- units: the write buffer and the read-ahead (no mount) ---------------------------------------------------
def test_write_buffer_merges_refuses_overlaps_and_hands_out_whole_chunks():
    from fs3.fuse.wbuf import WriteBuffer

    def got(parts):
        return [(o, bytes(b)) for o, b in parts]

    wb = WriteBuffer()
    assert wb.add(0, b"a" * 10) and wb.add(10, b"b" * 10) and wb.add(5, b"c" * 3)  # append, overwrite inside
    assert wb.nbytes == 20 and wb.end == 20
    assert wb.add(100, b"x" * 5) and wb.end == 105
    assert not wb.add(98, b"y" * 4)  # overlaps the extent at 100, which is not the last one merged into
    assert wb.add(105, b"z")  # the end of the last extent
    assert not wb.add(2, b"q")  # inside the first extent: flush first
    assert got(wb.take()) == [(0, b"aaaaacccaabbbbbbbbbb"), (100, b"xxxxxz")] and not wb
    wb.add(3, b"01234")
    wb.add(8, b"56789")
    assert got(wb.take_whole(4)) == [(3, b"012345678")]  # up to the last chunk boundary (12)
    assert wb.nbytes == 1 and wb.end == 13
    wb.add(13, b"abc")
    wb.truncate(14)
    assert got(wb.take()) == [(12, b"9a")]


def test_read_ahead_serves_concurrent_readers_the_right_bytes():
    import trio

    from fs3.fuse.readahead import ReadAhead

    cs = 1000
    data = random.Random(7).randbytes(50 * cs + 123)
    fetches = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def fetch(off, length, size, into):
                n = max(0, min(length, size - off))
                fetches.append((off, n))
                await trio.sleep(random.random() / 500)
                buf = memoryview(into)[:n] if into is not None else memoryview(bytearray(n))
                buf[:] = data[off:off + n]
                return buf

            ra = ReadAhead(cs, 6, fetch, nursery.start_soon)

            async def reader(seed: int, sequential: bool) -> None:
                rng = random.Random(seed)
                off = 0
                for _ in range(60):
                    n = rng.choice([1, 100, cs, 2 * cs + 7, 4096])
                    if not sequential:
                        off = rng.randrange(len(data))
                    got = bytes(await ra.read(off, n, len(data)))
                    assert got == data[off:off + n], (seed, off, n)
                    off = (off + n) % len(data)
                    if rng.random() < 0.05:
                        ra.invalidate()

            async with trio.open_nursery() as readers:
                for seed in range(8):
                    readers.start_soon(reader, seed, seed % 2 == 0)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert any(n > cs for _o, n in fetches)  # whole runs of chunks fetched at once
