"""fs3.meta's store, no processes: POSIX semantics, permissions, sessions, GC bookkeeping, paging and
concurrency, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest

from fs3.errors import (
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    PermissionDenied,
    StaleHandle,
    TooManyLinks,
)
from fs3.meta import ROOT, MetaStore
from fs3.meta.perm import ROOT_USER, User
from fs3.meta.service import user_of_key_id

ALICE = User(1000, (1000,))
BOB = User(1001, (1001, 50))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def meta_url(request, tmp_path):
    """A fresh metadata database: SQLite (WAL) in tmp, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meta.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(meta_url):
    s = MetaStore(meta_url, session_ttl=60.0)
    yield s
    s.dispose()


def _file(s: MetaStore, path: str, user: User = ROOT_USER, mode: int = 0o644, length: int = 0) -> dict:
    r = s.create(user, path=path, mode=mode, client="t")
    return s.close(user, ino=r["attrs"]["ino"], session=r["session"], wrote=bool(length), length=length)


def test_create_stat_lookup_and_directory_bookkeeping(store):
    s = store
    root0 = s.stat(ROOT_USER, ino=ROOT)
    d = s.mkdir(ROOT_USER, path="/d", mode=0o755)
    assert d["type"] == "dir" and d["nlink"] == 2 and d["parent"] == ROOT
    root1 = s.stat(ROOT_USER, ino=ROOT)
    assert root1["nlink"] == root0["nlink"] + 1 and root1["mtime"] >= root0["mtime"]
    time.sleep(0.002)
    f = _file(s, "/d/f", length=10)
    assert f["size"] == 10 and f["nlink"] == 1 and f["layout"]["chains"]
    d1 = s.stat(ROOT_USER, path="/d")
    assert d1["mtime"] > d["mtime"] and d1["ctime"] > d["ctime"] and d1["nlink"] == 2
    assert s.lookup(ROOT_USER, parent=d["ino"], name="f")["ino"] == f["ino"]
    with pytest.raises(NotFound):
        s.lookup(ROOT_USER, parent=d["ino"], name="nope")
    with pytest.raises(NotADirectory):
        s.stat(ROOT_USER, path="/d/f/x")
    with pytest.raises(StaleHandle):
        s.stat(ROOT_USER, ino=999_999)
    s.mkdir(ROOT_USER, path="/d/sub")
    assert s.stat(ROOT_USER, path="/d")["nlink"] == 3
    # mkdir -p: intermediate directories, no error for an existing one
    a = s.mkdir(ROOT_USER, path="/p/q/r", parents=True)
    assert s.mkdir(ROOT_USER, path="/p/q/r", parents=True)["ino"] == a["ino"]
    with pytest.raises(Exists):
        s.mkdir(ROOT_USER, path="/p/q/r")
    with pytest.raises(NotADirectory):
        s.mkdir(ROOT_USER, path="/d/f/x", parents=True)
    # names
    with pytest.raises(NameTooLong):
        s.create(ROOT_USER, path="/" + "x" * 256)
    assert s.create(ROOT_USER, path="/" + "é" * 127, write=False)["created"]  # 254 bytes
    for bad in ("a/b", "", ".", ".."):
        with pytest.raises(InvalidArgument):
            s.create(ROOT_USER, parent=ROOT, name=bad)
    # exclusive create, create of a directory name
    with pytest.raises(Exists):
        s.create(ROOT_USER, path="/d/f", excl=True)
    with pytest.raises(IsADirectory):
        s.create(ROOT_USER, path="/d")
    r = s.create(ROOT_USER, path="/d/f", trunc=True)
    assert not r["created"] and r["attrs"]["size"] == 0 and r["trim"][0] == 10
    st = s.statfs(ROOT_USER)
    assert st["files"] >= 8


def test_unlink_rmdir_link_and_gc_queue(store):
    s = store
    s.mkdir(ROOT_USER, path="/d")
    f = _file(s, "/d/f", length=3)
    with pytest.raises(IsADirectory):
        s.unlink(ROOT_USER, path="/d")
    with pytest.raises(NotEmpty):
        s.rmdir(ROOT_USER, path="/d")
    with pytest.raises(NotADirectory):
        s.rmdir(ROOT_USER, path="/d/f")
    with pytest.raises(NotPermitted):
        s.link(ROOT_USER, path="/d", new_path="/d2")
    assert s.link(ROOT_USER, path="/d/f", new_path="/g")["nlink"] == 2
    s.unlink(ROOT_USER, path="/d/f")
    assert s.stat(ROOT_USER, path="/g")["nlink"] == 1
    assert s.gc_candidates(0) == []
    # open while unlinked: kept until the session closes
    o = s.open(ROOT_USER, path="/g", session=True, client="c")
    s.unlink(ROOT_USER, path="/g")
    assert s.stat(ROOT_USER, ino=f["ino"])["nlink"] == 0
    assert s.gc_candidates(0) == []
    s.close(ROOT_USER, ino=f["ino"], session=o["session"])
    cands = s.gc_candidates(0)
    assert [c[0] for c in cands] == [f["ino"]] and cands[0][1]["chains"]
    assert s.gc_candidates(3600) == []  # not before gc_delay
    from fs3.meta.gc import GcWorker

    # the delay holds while storage has room, and is dropped when it is nearly full (3FS's rule)
    assert GcWorker(s, None, gc_delay=3600, space_short=lambda: False).run_once() == (0, 0)
    assert s.stat(ROOT_USER, ino=f["ino"])["nlink"] == 0
    assert GcWorker(s, None, gc_delay=3600, space_short=lambda: True).run_once() == (0, 1)
    with pytest.raises(StaleHandle):
        s.stat(ROOT_USER, ino=f["ino"])
    s.rmdir(ROOT_USER, path="/d")
    assert s.stat(ROOT_USER, ino=ROOT)["nlink"] == 2
    # recursive remove
    s.mkdir(ROOT_USER, path="/t/a/b", parents=True)
    _file(s, "/t/a/b/x")
    _file(s, "/t/y")
    assert s.remove(ROOT_USER, path="/t", recursive=True) == 5
    with pytest.raises(NotFound):
        s.stat(ROOT_USER, path="/t")


def test_rename_rules(store):
    s = store
    for p in ("/a", "/a/b", "/a/b/c", "/e", "/full"):
        s.mkdir(ROOT_USER, path=p)
    _file(s, "/full/x")
    f = _file(s, "/f", length=5)
    g = _file(s, "/g", length=7)
    # a directory into its own subtree
    for dst in ("/a/b/c/a", "/a/a"):
        with pytest.raises(InvalidArgument):
            s.rename(ROOT_USER, src="/a", dst=dst)
    with pytest.raises(NotEmpty):
        s.rename(ROOT_USER, src="/a", dst="/full")
    with pytest.raises(NotADirectory):
        s.rename(ROOT_USER, src="/a", dst="/f")
    with pytest.raises(IsADirectory):
        s.rename(ROOT_USER, src="/f", dst="/e")
    with pytest.raises(Exists):
        s.rename(ROOT_USER, src="/f", dst="/g", noreplace=True)
    with pytest.raises(NotFound):
        s.rename(ROOT_USER, src="/nope", dst="/x")
    # a file replaces a file: the old inode loses its link and goes to GC
    assert s.rename(ROOT_USER, src="/f", dst="/g") == {"unlinked": g["ino"]}  # the service wakes GC then
    assert s.stat(ROOT_USER, path="/g")["ino"] == f["ino"]
    assert s.stat(ROOT_USER, ino=g["ino"])["nlink"] == 0
    assert [c[0] for c in s.gc_candidates(0)] == [g["ino"]]
    with pytest.raises(NotFound):
        s.stat(ROOT_USER, path="/f")
    # a directory moves under another: link counts and its parent follow
    root = s.stat(ROOT_USER, ino=ROOT)["nlink"]
    assert s.rename(ROOT_USER, src="/a/b", dst="/e/b") == {}  # nothing for GC
    assert s.stat(ROOT_USER, path="/a")["nlink"] == 2
    assert s.stat(ROOT_USER, path="/e")["nlink"] == 3
    assert s.stat(ROOT_USER, path="/e/b")["parent"] == s.stat(ROOT_USER, path="/e")["ino"]
    assert s.realpath(ROOT_USER, path="/e/b/c/..") == "/e/b"
    # a directory replaces an empty one
    s.rename(ROOT_USER, src="/e/b", dst="/a")
    assert s.stat(ROOT_USER, ino=ROOT)["nlink"] == root  # one subdirectory replaced by another
    assert s.stat(ROOT_USER, path="/e")["nlink"] == 2
    assert s.stat(ROOT_USER, path="/a/c")["type"] == "dir"
    # rename onto itself (or a hard link of itself) changes nothing
    s.link(ROOT_USER, path="/g", new_path="/g2")
    s.rename(ROOT_USER, src="/g", dst="/g2")
    assert s.stat(ROOT_USER, path="/g")["nlink"] == 2
    # by parent + name
    s.rename(ROOT_USER, src_parent=ROOT, src_name="g2", dst_parent=s.stat(ROOT_USER, path="/e")["ino"], dst_name="h")
    assert s.stat(ROOT_USER, path="/e/h")["ino"] == f["ino"]


def test_symlinks(store):
    s = store
    s.mkdir(ROOT_USER, path="/real/sub", parents=True)
    _file(s, "/real/sub/f", length=4)
    s.symlink(ROOT_USER, path="/abs", target="/real")
    s.symlink(ROOT_USER, path="/real/rel", target="sub")
    assert s.stat(ROOT_USER, path="/abs/sub/f")["size"] == 4
    assert s.stat(ROOT_USER, path="/real/rel/f")["size"] == 4
    assert s.stat(ROOT_USER, path="/abs", follow=False)["type"] == "symlink"
    assert s.readlink(ROOT_USER, path="/real/rel") == "sub"
    assert s.realpath(ROOT_USER, path="/abs/rel/../rel/f") == "/real/sub/f"
    with pytest.raises(InvalidArgument):
        s.readlink(ROOT_USER, path="/real")
    s.symlink(ROOT_USER, path="/loop1", target="/loop2")
    s.symlink(ROOT_USER, path="/loop2", target="/loop1")
    with pytest.raises(TooManyLinks):
        s.stat(ROOT_USER, path="/loop1")
    # O_CREAT through a symlink opens its target
    assert s.create(ROOT_USER, path="/abs/sub/f", write=False)["attrs"]["size"] == 4
    s.unlink(ROOT_USER, path="/abs")
    assert s.stat(ROOT_USER, path="/real/sub/f")["size"] == 4


def test_readdir_pages_by_name_and_is_stable_under_inserts(store):
    s = store
    d = s.mkdir(ROOT_USER, path="/big")
    names = [f"e{i:05d}" for i in range(10_000)]
    _bulk_files(s, d["ino"], names)
    seen: list[str] = []
    after = ""
    pages = 0
    while True:
        r = s.readdir(ROOT_USER, ino=d["ino"], after=after, limit=1000)
        seen += [e["name"] for e in r["entries"]]
        pages += 1
        if not r["more"]:
            break
        after = r["entries"][-1]["name"]
    assert seen == names and pages == 10
    plus = s.readdir(ROOT_USER, path="/big", limit=3, plus=True)
    assert [e["attrs"]["ino"] for e in plus["entries"]] == [e["ino"] for e in plus["entries"]]
    with pytest.raises(InvalidArgument):
        s.readdir(ROOT_USER, path="/big", limit=10_001)
    # concurrent inserts between pages: no entry is listed twice, none that stayed is missed
    small = s.mkdir(ROOT_USER, path="/small")
    for i in range(0, 100, 2):
        _file(s, f"/small/n{i:03d}")
    out: list[str] = []
    after = ""
    k = 1
    while True:
        r = s.readdir(ROOT_USER, ino=small["ino"], after=after, limit=7)
        out += [e["name"] for e in r["entries"]]
        if not r["more"]:
            break
        after = r["entries"][-1]["name"]
        if k < 100:
            _file(s, f"/small/n{k:03d}")  # odd names land before and after the cursor
            k += 2
    assert len(out) == len(set(out)) and out == sorted(out)
    assert {f"n{i:03d}" for i in range(0, 100, 2)} <= set(out)


def _bulk_files(s: MetaStore, parent: int, names: list[str]) -> None:
    """Many files at once (test set-up: straight into the tables, one transaction)."""
    from fs3.meta.schema import dirents, inodes

    now = time.time_ns()
    base = s._alloc_ino()
    ids = [base] + [s._alloc_ino() for _ in names[1:]]
    with s.engine.begin() as c:
        c.execute(inodes.insert(), [{"ino": i, "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "nlink": 1, "size": 0,
                                     "atime": now, "mtime": now, "ctime": now, "target": None, "parent": None,
                                     "layout": '{"chunk_size":1048576,"chains":[1]}', "tver": 0} for i in ids])
        c.execute(dirents.insert(), [{"parent": parent, "name": n, "ino": i, "type": "file"}
                                     for n, i in zip(names, ids, strict=True)])


def test_permissions(store):
    s = store
    s.mkdir(ROOT_USER, path="/home", mode=0o755)
    s.mkdir(ROOT_USER, path="/home/alice", mode=0o700)
    s.setattr(ROOT_USER, path="/home/alice", uid=ALICE.uid, gid=ALICE.gid)
    _file(s, "/home/alice/f", ALICE, 0o644)
    # search permission on every directory of the path
    with pytest.raises(PermissionDenied):
        s.stat(BOB, path="/home/alice/f")
    assert s.stat(ALICE, path="/home/alice/f")["uid"] == ALICE.uid
    s.setattr(ALICE, path="/home/alice", mode=0o711)
    assert s.stat(BOB, path="/home/alice/f")["uid"] == ALICE.uid
    with pytest.raises(PermissionDenied):  # no read bit on the directory
        s.readdir(BOB, path="/home/alice")
    with pytest.raises(PermissionDenied):  # no write bit
        s.create(BOB, path="/home/alice/g")
    with pytest.raises(PermissionDenied):
        s.open(BOB, path="/home/alice/f", write=True)
    assert s.open(BOB, path="/home/alice/f")["session"] is None
    # group bits
    s.setattr(ALICE, path="/home/alice/f", gid=ALICE.gid, mode=0o460)
    s.setattr(ROOT_USER, path="/home/alice/f", gid=50)
    s.open(BOB, path="/home/alice/f", write=True)
    with pytest.raises(PermissionDenied):
        s.open(ALICE, path="/home/alice/f", write=True)  # the owner's bits decide for the owner
    # chmod / chown
    with pytest.raises(NotPermitted):
        s.setattr(BOB, path="/home/alice/f", mode=0o777)
    with pytest.raises(NotPermitted):
        s.setattr(ALICE, path="/home/alice/f", uid=BOB.uid)
    with pytest.raises(NotPermitted):
        s.setattr(ALICE, path="/home/alice/f", gid=51)  # alice is not in group 51
    assert s.setattr(ALICE, path="/home/alice/f", gid=1000)["attrs"]["gid"] == 1000
    # times: explicit ones are the owner's; "now" needs write
    s.setattr(ALICE, path="/home/alice/f", mode=0o666)
    with pytest.raises(NotPermitted):
        s.setattr(BOB, path="/home/alice/f", mtime=1)
    assert s.setattr(BOB, path="/home/alice/f", mtime="now")["attrs"]["mtime"] > 1
    s.setattr(ALICE, path="/home/alice/f", mode=0o644)
    with pytest.raises(PermissionDenied):
        s.setattr(BOB, path="/home/alice/f", atime="now")
    assert s.setattr(ALICE, path="/home/alice/f", atime=5, mtime=6)["attrs"]["atime"] == 5
    # sticky directory: only the entry's owner, the directory's owner or root removes
    s.mkdir(ROOT_USER, path="/tmp", mode=0o1777)
    _file(s, "/tmp/a", ALICE)
    with pytest.raises(NotPermitted):
        s.unlink(BOB, path="/tmp/a")
    with pytest.raises(NotPermitted):
        s.rename(BOB, src="/tmp/a", dst="/tmp/b")
    s.unlink(ALICE, path="/tmp/a")
    # root passes, except exec on a file without any x bit
    from fs3.meta.perm import X, allowed

    assert allowed(ROOT_USER, "dir", 0o000, 5, 5, X)
    assert not allowed(ROOT_USER, "file", 0o644, 5, 5, X) and allowed(ROOT_USER, "file", 0o744, 5, 5, X)
    # setgid directories pass their group on
    s.mkdir(ROOT_USER, path="/proj", mode=0o2777)
    s.setattr(ROOT_USER, path="/proj", gid=77)
    assert s.create(ALICE, path="/proj/x", write=False)["attrs"]["gid"] == 77
    sub = s.mkdir(ALICE, path="/proj/sub")
    assert sub["gid"] == 77 and sub["mode"] & 0o2000


def test_sessions_lengths_and_truncate(store):
    s = store
    s.setattr(ROOT_USER, ino=ROOT, mode=0o777)
    r = s.create(ALICE, path="/f", client="c1")
    ino, sid = r["attrs"]["ino"], r["session"]
    assert s.session(sid)["write"]
    # a sync keeps the session; the length only grows with reports
    assert s.sync(ALICE, ino=ino, session=sid, wrote=True, length=100)["size"] == 100
    assert s.sync(ALICE, ino=ino, session=sid, wrote=True, length=50)["size"] == 100
    assert s.session(sid) is not None
    # storage's exact length wins over a short report
    assert s.sync(ALICE, ino=ino, session=sid, wrote=True, length=10, storage_length=300)["size"] == 300
    # a truncate since the session opened wins over the session's stale report
    t = s.truncate(ALICE, ino=ino, size=20)
    assert t["attrs"]["size"] == 20 and t["trim"][0] == 300
    assert s.close(ALICE, ino=ino, session=sid, wrote=True, length=300)["size"] == 20
    assert s.session(sid) is None
    # renew / expiry
    r2 = s.open(ALICE, path="/f", write=True, client="c2")
    s.session_ttl = 0.0
    s.renew("c2")
    assert [x["id"] for x in s.expired_sessions(time.time() + 0.01)] == [r2["session"]]
    s.session_ttl = 60.0
    assert s.renew("c2") == 1 and s.expired_sessions() == []
    # truncate through a write session needs no permission (ftruncate); otherwise write permission
    s.setattr(ALICE, path="/f", mode=0o444)
    assert s.truncate(ALICE, ino=ino, size=5, session=r2["session"])["attrs"]["size"] == 5
    with pytest.raises(PermissionDenied):
        s.truncate(ALICE, ino=ino, size=1)
    with pytest.raises(IsADirectory):
        s.truncate(ROOT_USER, ino=ROOT, size=0)
    with pytest.raises(InvalidArgument):
        s.truncate(ROOT_USER, ino=ino, size=-1)


def test_concurrent_creates_and_renames_in_one_directory(store):
    s = store
    d = s.mkdir(ROOT_USER, path="/c")
    errs: list[Exception] = []

    def work(k: int) -> None:
        try:
            for i in range(25):
                r = s.create(ROOT_USER, parent=d["ino"], name=f"f{k}-{i}", client=f"c{k}")
                s.close(ROOT_USER, ino=r["attrs"]["ino"], session=r["session"], wrote=True, length=i)
                s.rename(ROOT_USER, src_parent=d["ino"], src_name=f"f{k}-{i}", dst_parent=d["ino"],
                         dst_name=f"shared{i % 5}")
        except Exception as exc:
            errs.append(exc)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errs, errs
    names = [e["name"] for e in s.readdir(ROOT_USER, ino=d["ino"])["entries"]]
    assert names == [f"shared{i}" for i in range(5)]
    # every replaced file went to GC: 100 created, 5 still linked
    assert s.gc_pending() == 95


def test_identity_of_key_ids():
    assert user_of_key_id("job:7/uid=1234/gid=1234") == User(1234, (1234,))
    assert user_of_key_id("job:7/uid=5/gid=6/gid=7") == User(5, (6, 7))
    assert user_of_key_id("job:42") == User(65534, (65534,))
    assert user_of_key_id("job:42/uid=x") == User(65534, (65534,))
    assert user_of_key_id("user:alice") == User(65534, (65534,))


def test_atime_is_relatime(store):
    s = store
    f = _file(s, "/f", length=1)
    a1 = s.open(ROOT_USER, path="/f")["attrs"]["atime"]
    assert a1 > f["mtime"] and s.stat(ROOT_USER, path="/f")["atime"] == a1  # first read after a write
    assert s.open(ROOT_USER, path="/f")["attrs"]["atime"] == a1  # then not again (until the next write)
    r = s.open(ROOT_USER, path="/f", write=True, client="w")
    s.close(ROOT_USER, ino=f["ino"], session=r["session"], wrote=True, length=2)
    assert s.open(ROOT_USER, path="/f")["attrs"]["atime"] > a1


def test_a_length_report_needs_a_write_session_or_write_permission(store):
    s = store
    f = _file(s, "/f", mode=0o644, length=1)
    with pytest.raises(PermissionDenied):
        s.close(BOB, ino=f["ino"], session=None, wrote=True, length=1 << 30)
    ro = s.open(BOB, path="/f", session=True, client="b")
    with pytest.raises(PermissionDenied):
        s.close(BOB, ino=f["ino"], session=ro["session"], wrote=True, length=1 << 30)
    assert s.stat(ROOT_USER, path="/f")["size"] == 1
    assert s.close(ROOT_USER, ino=f["ino"], session=None, wrote=True, length=5)["size"] == 5
