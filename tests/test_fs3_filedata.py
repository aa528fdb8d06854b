"""fs3.client.filedata: byte ranges of files over chunks, against one small-chunk fs3 cluster
(mgmtd and three storage servers, no meta: layouts are made up here)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from _fs3 import fs3_serving
from _waits import wait_until

from fs3.client import ChunkClient
from fs3.client.filedata import FileData, Layout

ROOT = Path(__file__).resolve().parent.parent
FS3 = ["fs3.mgmtd", "fs3.storage"]
CS = 64 << 10


@pytest.fixture(scope="module")
def fd(tmp_path_factory):
    from deploy.local import LocalCluster, derived_cluster

    tmp = tmp_path_factory.mktemp("filedata")
    path = derived_cluster(tmp / "fs3-filedata.toml", FS3, fs3={"heartbeat_interval": 0.25, "failure_timeout": 3.0,
                                                                "chunk_size": CS, "max_batch_bytes": 4 * CS})
    lc = LocalCluster(path, tmp / "run", ports="auto", services=FS3).up()
    try:
        wait_until(lambda: fs3_serving(lc), 20, "every storage server registered and serving")
        client = ChunkClient.from_cluster(lc.cluster_file, timeout=30.0)
        wait_until(lambda: client.refresh_routing().chains and client.chunk_size == CS, 10, "routing")
        data = FileData(client)
        yield data
        data.close()
        client.close()
    finally:
        lc.down()


def _layout(fd: FileData, stripe: int = 3) -> Layout:
    return Layout(CS, fd.chunks.chains()[:stripe])


def test_many_chunks_round_trip(fd):
    lay = _layout(fd)
    blob = random.Random(1).randbytes(20 * CS + 1234)
    assert fd.write(101, lay, 0, blob) == len(blob)
    assert fd.read(101, lay, 0, len(blob) + 100, len(blob)) == blob
    # an unaligned range over several chunks, into a caller's buffer
    buf = bytearray(3 * CS)
    assert fd.readinto(101, lay, CS // 2, buf, len(blob)) == len(buf)
    assert buf == blob[CS // 2:CS // 2 + 3 * CS]
    # clipped at the size
    assert fd.read(101, lay, len(blob) - 10, 100, len(blob)) == blob[-10:]
    assert fd.read(101, lay, len(blob), 100, len(blob)) == b""


def test_partial_writes_merge(fd):
    lay = _layout(fd)
    base = bytearray(random.Random(2).randbytes(3 * CS))
    fd.write(102, lay, 0, base)
    # a partial write at offset 0 of a chunk keeps the rest of the chunk
    fd.write(102, lay, 0, b"A" * 100)
    base[0:100] = b"A" * 100
    # a write over a chunk boundary: the tail of chunk 0, the head of chunk 1
    fd.write(102, lay, CS - 10, b"B" * 30)
    base[CS - 10:CS + 20] = b"B" * 30
    # inside chunk 2, and a whole chunk with partial ends on both sides
    fd.write(102, lay, 2 * CS + 5, b"C" * 7)
    base[2 * CS + 5:2 * CS + 12] = b"C" * 7
    assert fd.read(102, lay, 0, len(base), len(base)) == bytes(base)
    mixed = random.Random(3).randbytes(2 * CS + 200)
    fd.write(102, lay, CS // 2, mixed)
    base[CS // 2:CS // 2 + len(mixed)] = mixed
    assert fd.read(102, lay, 0, len(base), len(base)) == bytes(base)


def test_holes_and_short_chunks_read_zeros(fd):
    lay = _layout(fd)
    fd.write(103, lay, 5 * CS + 10, b"xyz")  # chunks 0..4 missing; chunk 5 short (13 bytes)
    size = 7 * CS  # a truncate-up past the data
    got = fd.read(103, lay, 0, size, size)
    assert len(got) == size
    assert got[5 * CS + 10:5 * CS + 13] == b"xyz"
    assert got.count(0) == size - 3
    blob = random.Random(13).randbytes(2 * CS + 1234)  # a file of this test's own, beside the holes
    fd.write(113, lay, 0, memoryview(blob))
    views = fd.readv([(103, lay, 5 * CS, 16, size), (113, lay, 0, 4, len(blob)), (999, lay, 0, 10, 10),
                      (103, lay, size, 10, size)])
    assert bytes(views[0]) == bytes(10) + b"xyz" + bytes(3)
    assert bytes(views[1]) == blob[:4]
    assert bytes(views[2]) == bytes(10)
    assert bytes(views[3]) == b""


def test_one_chain_stripe(fd):
    lay = _layout(fd, stripe=1)
    blob = random.Random(4).randbytes(9 * CS)
    fd.write(104, lay, 0, memoryview(blob))
    assert fd.read(104, lay, 0, len(blob), len(blob)) == blob
