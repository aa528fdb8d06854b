"""fs3.formats and fs3.checkpoint on fs3 files: one launched cluster for the module (mgmtd, three
storage servers, meta; 64 KiB chunks so that small files span many chunks and chains). The same
code paths on local files are in test_fs3_ffrecord.py and test_fs3_checkpoint.py."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import pytest
from _fs3 import fs3_serving
from _waits import wait_until

from fs3.formats import ChecksumError, FileReader, FileWriter, write_samples

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ["fs3.mgmtd", "fs3.storage", "fs3.meta"]
CS = 64 << 10


def _cluster_file(tmp: Path) -> Path:
    from deploy.local import derived_cluster

    return derived_cluster(tmp / "fs3-formats.toml", SERVICES, fs3={
        "heartbeat_interval": 0.25, "failure_timeout": 3.0, "chunk_size": CS, "max_batch_bytes": 16 * CS,
        "gc_delay": 0.0, "targets_per_node": 2})


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    from deploy.local import LocalCluster
    from fs3.client.files import FileSystem

    tmp = tmp_path_factory.mktemp("formats")
    lc = LocalCluster(_cluster_file(tmp), tmp / "run", ports="auto", services=SERVICES).up()
    try:
        wait_until(lambda: fs3_serving(lc), 30, "every storage server registered and serving")
        f = FileSystem(lc.cluster_file)
        f.test_cluster_file = lc.cluster_file  # for the demo job's $HAI_CLUSTER_FILE
        try:
            yield f
        finally:
            f.close()
    finally:
        lc.down()


def _decode(b: bytes) -> int:
    return int(b.split(b"#")[-1])


def test_ffrecord_on_fs3(fs):
    fs.makedirs("/ds", exist_ok=True)
    parts = [[(f"{k}-" * (i * 500 % 7000)).encode() + f"#{k * 30 + i}".encode() for i in range(30)] for k in range(2)]
    for k, part in enumerate(parts):
        write_samples(f"/ds/part-{k}.ffr", part, fs=fs)
    flat = [s for p in parts for s in p]
    r = FileReader("/ds", fs=fs)
    assert len(r) == 60
    assert r.read(range(60)) == flat
    assert r.read([59, 0, 31]) == [flat[59], flat[0], flat[31]]
    raw = fs.read_file("/ds/part-0.ffr")
    assert zlib.crc32(raw[12:12 + 12 * 30], zlib.crc32((30).to_bytes(8, "little"))) == int.from_bytes(raw[:4], "little")

    # a flipped byte in a sample on fs3 is found and named
    bad = "/ds-bad/x.ffr"
    fs.makedirs("/ds-bad", exist_ok=True)
    with FileWriter(bad, 3, fs=fs) as w:
        for s in (b"a" * 100, b"b" * 100, b"c" * 100):
            w.write_one(s)
    with fs.open(bad, "r+b") as f:
        f.seek(12 + 36 + 150)
        f.write(b"X")
    with pytest.raises(ChecksumError, match=r"x\.ffr: sample 1"):
        FileReader(bad, fs=fs).read([1])

    # the Dataset through a DataLoader whose forked workers make their own FileSystem
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from fs3.formats.torch import FFRecordDataset

    ds = FFRecordDataset("/ds", fs=fs, transform=_decode)
    dl = DataLoader(ds, sampler=BatchSampler(SequentialSampler(ds), 8, False), batch_size=None, num_workers=2)
    assert [x for b in dl for x in b] == list(range(60))


def test_checkpoint_on_fs3(fs):
    from fs3 import checkpoint

    fs.makedirs("/ck", exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 1,
             "big": torch.randn(3 * CS // 4 + 17), "bf16": torch.randn(100, 3).to(torch.bfloat16)}
    checkpoint.save_sync(state, "/ck/latest", fs=fs)
    state["step"] = 2
    h = checkpoint.save(state, "/ck/latest", fs=fs)
    h.wait(60)
    assert not [x for x in fs.listdir("/ck") if ".tmp-" in x]
    back = checkpoint.load("/ck/latest", fs=fs)
    assert back["step"] == 2
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert torch.equal(back["big"], state["big"]) and torch.equal(back["bf16"], state["bf16"])
    assert back["optim"]["param_groups"] == state["optim"]["param_groups"]

    # a few figures for the log (the bench measures the real targets)
    big = {f"w{i}": torch.randn(1 << 20) for i in range(16)}  # 64 MiB
    t = time.monotonic()
    checkpoint.save_sync(big, "/ck/big", fs=fs)
    sync_s = time.monotonic() - t
    h = checkpoint.save(big, "/ck/big", fs=fs)
    h.wait(120)
    t = time.monotonic()
    checkpoint.load("/ck/big", fs=fs)
    load_s = time.monotonic() - t
    print(f"64 MiB on fs3: sync save {sync_s:.2f}s, save() blocked {h.blocked_s:.3f}s, load {64 / 1.048576 / load_s:.0f} MB/s")


def test_the_demo_job_reads_ffrecord_and_resumes_from_its_fs3_checkpoint(fs):
    """examples/demo_train.py as one rank (hfreduce from torchrun's variables): the dataset that
    prepare_fs3 writes, a checkpoint through fs3.checkpoint, and a second run resuming from it."""
    import os
    import socket
    import subprocess
    import sys

    from examples.demo_train import prepare_fs3

    summary = prepare_fs3(fs, root="/demo")
    assert summary["samples"] == 4096 and sorted(fs.listdir("/demo/train")) == ["part-00.ffr", "part-01.ffr"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HAI_CHAIN_ID": "77",
           "HAI_CLUSTER_FILE": str(fs.test_cluster_file)}

    def run(steps: int, *more: str) -> str:
        r = subprocess.run([sys.executable, str(ROOT / "examples" / "demo_train.py"), "--steps", str(steps),
                            "--ckpt-every", "5", "--step-sleep", "0", "--batch", "64", *more],
                           env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    out = run(12)
    assert "no checkpoint on fs3, starting at step 0" in out and "from the FFRecord dataset /demo/train" in out
    assert "step 10: checkpoint saved to fs3" in out and "done: 12 steps" in out
    assert fs.exists("/demo/ckpt/chain-77")
    out = run(15)
    assert "resumed from the fs3 checkpoint at step 10" in out and "done: 15 steps" in out
