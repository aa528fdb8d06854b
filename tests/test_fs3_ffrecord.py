"""fs3.formats: FFRecord files (the hfai layout), the reader over files and directories, damage
detection, and the torch Dataset through a DataLoader with workers. Local files, plus the fs3 seam
through a stand-in FileSystem (the fs3-backed variant runs against a cluster in
test_fs3_formats_cluster once the file client exists)."""

from __future__ import annotations

import os
import pickle
import stat as stat_mod
import struct
import zlib
from types import SimpleNamespace

import pytest

from fs3.errors import Fs3Error
from fs3.formats import ChecksumError, FileReader, FileWriter, write_samples


def samples(n: int, seed: int = 0) -> list[bytes]:
    import random

    rng = random.Random(seed)
    return [bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 100, 3000]))) + f"#{i}".encode()
            for i in range(n)]


def reference_file(items: list[bytes], checksum_meta: bool = True) -> bytes:
    """The hfai layout written out by hand, field by field (what ffrecord's writer.cpp produces on x86)."""
    n = len(items)
    crcs = [zlib.crc32(s) for s in items]
    offsets, pos = [], 4 + 8 + (4 + 8) * n
    for s in items:
        offsets.append(pos)
        pos += len(s)
    body = struct.pack("<q", n)
    body += b"".join(struct.pack("<I", c) for c in crcs)
    body += b"".join(struct.pack("<q", o) for o in offsets)
    meta = 0
    if checksum_meta:  # the writer: crc32(crc32(crc32(0, &n, 8), checksums, 4n), offsets, 8n)
        meta = zlib.crc32(struct.pack("<q", n))
        meta = zlib.crc32(b"".join(struct.pack("<I", c) for c in crcs), meta)
        meta = zlib.crc32(b"".join(struct.pack("<q", o) for o in offsets), meta)
    return struct.pack("<I", meta) + body + b"".join(items)


def test_round_trip_and_the_bytes_are_the_hfai_layout(tmp_path):
    items = samples(50)
    p = tmp_path / "a.ffr"
    with FileWriter(p, len(items)) as w:
        for s in items:
            w.write_one(s)
    assert p.read_bytes() == reference_file(items)
    with FileReader(p) as r:
        assert len(r) == 50
        assert r.read([3, 0, 49, 3, -1]) == [items[3], items[0], items[49], items[3], items[49]]
        assert r.read_one(7) == items[7]
        assert r.read([]) == []
        r.validate()
        assert r.get_offsets()[0][-1] == p.stat().st_size
        assert list(r.get_checksums()[0]) == [zlib.crc32(s) for s in items]
        with pytest.raises(IndexError):
            r.read([50])


def test_files_from_the_reference_layout_read_back(tmp_path):
    items = samples(20, seed=1)
    (tmp_path / "ref.ffr").write_bytes(reference_file(items))
    (tmp_path / "old.ffr").write_bytes(reference_file(items, checksum_meta=False))  # old writer: meta = 0
    for name in ("ref.ffr", "old.ffr"):
        r = FileReader(tmp_path / name)
        assert r.read(range(20)) == items
        r.close()
    empty = tmp_path / "empty.ffr"
    write_samples(empty, [])
    assert empty.read_bytes() == reference_file([])
    assert len(FileReader(empty)) == 0


def test_writer_refuses_a_wrong_count(tmp_path):
    with pytest.raises(ValueError, match="1 samples written but 2 announced"):
        with FileWriter(tmp_path / "x.ffr", 2) as w:
            w.write_one(b"a")
    w = FileWriter(tmp_path / "y.ffr", 1)
    w.write_one(b"a")
    with pytest.raises(ValueError, match="more samples than the 1 announced"):
        w.write_one(b"b")
    w.close()


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_a_flipped_byte_is_detected_and_named(tmp_path):
    items = [b"x" * 100 for _ in range(10)]
    p = tmp_path / "d.ffr"
    write_samples(p, items)
    flip(p, 12 + 12 * 10 + 5 * 100 + 42)  # inside sample 5
    r = FileReader(p)
    assert r.read([4, 6]) == [items[4], items[6]]
    with pytest.raises(ChecksumError, match=r"d\.ffr: sample 5 \(index 5\) checksum mismatch") as ei:
        r.read([4, 5])
    assert isinstance(ei.value, Fs3Error)
    with pytest.raises(ChecksumError):
        r.validate()
    assert FileReader(p, check_data=False).read_one(5) != items[5]

    for where in (0, 2, 4, 12 + 3, 12 + 40 + 9):  # checksum_meta, meta again, N, a crc, an offset
        q = tmp_path / f"h{where}.ffr"
        write_samples(q, items)
        flip(q, where)
        with pytest.raises(ChecksumError, match=rf"h{where}\.ffr.*header"):
            FileReader(q)


def test_a_directory_is_one_index_space(tmp_path):
    parts = [samples(7, seed=s) for s in range(3)]
    for k, part in enumerate(parts):
        write_samples(tmp_path / f"part-{k:02d}.ffr", part)
    (tmp_path / "README.txt").write_text("not a sample file")
    flat = [s for part in parts for s in part]
    r = FileReader(tmp_path)
    assert len(r) == 21
    assert r.read(range(21)) == flat
    assert r.read([20, 0, 7, 13]) == [flat[20], flat[0], flat[7], flat[13]]
    r2 = FileReader([tmp_path / "part-02.ffr", tmp_path / "part-00.ffr"])
    assert r2.read([0, 7]) == [parts[2][0], parts[0][0]]
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="no .ffr files"):
        FileReader(tmp_path / "sub")
    # a reader travels to another process with its headers (spawned DataLoader workers)
    r3 = pickle.loads(pickle.dumps(r))
    assert r3.read([5, 20]) == [flat[5], flat[20]]


class StandInFs:
    """fs3.FileSystem's API over a local directory (the part the formats use), with a counter
    of read_batch calls: the fs3 code path of the seam without a cluster."""

    def __init__(self, root):
        self.root = str(root)
        self.cluster = self.root
        self.batches = 0

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def stat(self, path):
        st = os.stat(self._p(path))
        return SimpleNamespace(size=st.st_size, type="dir" if stat_mod.S_ISDIR(st.st_mode) else "file")

    def isdir(self, path):
        return os.path.isdir(self._p(path))

    def exists(self, path):
        return os.path.exists(self._p(path))

    def replace(self, a, b):
        os.replace(self._p(a), self._p(b))

    def listdir(self, path):
        return os.listdir(self._p(path))

    def open(self, path, mode):
        return open(self._p(path), mode)

    def read_batch(self, ranges):
        self.batches += 1
        out = []
        for path, off, n in ranges:
            with open(self._p(path), "rb") as f:
                f.seek(off)
                out.append(memoryview(bytearray(f.read(n))))
        return out

    def rename(self, a, b):
        os.replace(self._p(a), self._p(b))

    def remove(self, path):
        os.remove(self._p(path))

    def makedirs(self, path, exist_ok=False):
        os.makedirs(self._p(path), exist_ok=exist_ok)

    def close(self):
        self.closed = True


def test_through_the_fs3_seam(tmp_path):
    fs = StandInFs(tmp_path)
    fs.makedirs("/ds", exist_ok=True)
    parts = [samples(5, seed=s) for s in range(2)]
    for k, part in enumerate(parts):
        write_samples(f"/ds/{k}.ffr", part, fs=fs)
    assert (tmp_path / "ds" / "0.ffr").read_bytes() == reference_file(parts[0])
    r = FileReader("/ds", fs=fs)
    before = fs.batches
    assert r.read([9, 0, 4, 5]) == [parts[1][4], parts[0][0], parts[0][4], parts[1][0]]
    assert fs.batches == before + 1  # one batched read for the whole list


def test_an_fs3_backend_closes_only_the_filesystem_it_made(tmp_path):
    from fs3.formats import Fs3Backend

    (tmp_path / "ds").mkdir()
    write_samples(str(tmp_path / "ds" / "0.ffr"), samples(3))
    made = []

    def factory():
        made.append(StandInFs(tmp_path))
        return made[-1]

    r = FileReader("/ds", fs=factory)
    assert r.read([1]) == [samples(3)[1]]
    r.close()
    assert getattr(made[0], "closed", False)  # the reader's backend made it: closed with the reader
    mine = StandInFs(tmp_path)
    with FileReader("/ds", fs=mine) as r:
        r.read([0])
    assert not hasattr(mine, "closed")  # the caller's: left open
    b = Fs3Backend(mine)
    assert not b.exists("/nope") and b.isdir("/ds") and b.size("/ds/0.ffr") > 0


def _decode(b: bytes) -> int:
    return int(b.split(b"#")[-1])


def test_dataset_with_index_lists_through_a_dataloader_with_workers(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from fs3.formats.torch import FFRecordDataset

    for k in range(2):
        write_samples(tmp_path / f"p{k}.ffr", [f"s#{k * 40 + i}".encode() for i in range(40)])
    ds = FFRecordDataset(tmp_path, transform=_decode)
    assert len(ds) == 80 and ds[41] == 41 and ds[[79, 3]] == [79, 3]
    ds.reader.read([0])  # the parent has open descriptors before the fork: workers must not share them
    dl = DataLoader(ds, sampler=BatchSampler(SequentialSampler(ds), 16, False), batch_size=None, num_workers=2)
    got = [x for batch in dl for x in batch]
    assert got == list(range(80))
    # torch's batched hook: a plain batch_size DataLoader calls __getitems__
    dl2 = DataLoader(ds, batch_size=10, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    got2 = sorted(int(x) for batch in dl2 for x in batch)
    assert got2 == list(range(80))
