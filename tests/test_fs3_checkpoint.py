"""fs3.checkpoint: round trip of a real training state, saving in the background while training
goes on, a crash mid-save, corruption, and the fs3 seam (through a stand-in FileSystem; the
cluster-backed variant runs once the file client exists)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fs3 import checkpoint  # noqa: E402
from fs3.formats import ChecksumError, LocalBackend  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def train(model, opt, steps: int, seed: int = 1) -> float:
    g = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g)
        loss = ((model(x) - x[:, :1]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b or (a != a and b != b), where


def test_round_trip_of_a_model_and_optimizer_then_training_goes_on_identically(tmp_path):
    model, opt = make_model()
    train(model, opt, 3)
    shared = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "model": model.state_dict(), "optim": opt.state_dict(), "step": 3,
        "extra": {
            "bf16": torch.randn(5, 7).to(torch.bfloat16), "fp16": torch.randn(3).half(),
            "noncontig": torch.randn(6, 8).t()[::2], "empty": torch.empty(0, 4), "scalar": torch.tensor(2.5),
            "bool": torch.tensor([True, False]), "int64": torch.arange(5),
            "a": shared, "b": shared, "np": np.arange(10, dtype=np.int16).reshape(2, 5)[:, ::2],
            "npscalar": np.float32(1.5), "tuple": (1, "x", None), "nested": [{"k": 1 << 70}, b"raw", 2.0, True],
            "odict": collections.OrderedDict([("z", 1), ("a", 2)]), "dtype": torch.float16, "c": 1 + 2j,
        },
    }
    p = tmp_path / "ck"
    h = checkpoint.save(state, p)
    manifest = h.wait(60)
    assert h.done() and manifest["tensors"] >= 10
    assert not [x for x in os.listdir(tmp_path) if ".tmp-" in x]
    back = checkpoint.load(p)
    assert_same(back["extra"], {**state["extra"], "noncontig": state["extra"]["noncontig"].contiguous(),
                                "np": np.ascontiguousarray(state["extra"]["np"])})
    assert back["extra"]["a"] is back["extra"]["b"]  # one tensor stored once, loaded once
    assert_same(back["model"], state["model"])
    assert_same(back["optim"], state["optim"])
    assert isinstance(back["model"], collections.OrderedDict)
    info = checkpoint.info(p)
    assert info["manifest"]["format"] == "fs3-checkpoint" and any(t["dtype"] == "bfloat16" for t in info["tensors"])

    model2, opt2 = make_model(seed=5)
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optim"])
    assert train(model, opt, 4, seed=9) == train(model2, opt2, 4, seed=9)


class SlowLocal(LocalBackend):
    """Local files whose background writes crawl (one piece at a time, with a pause)."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    def pwrite_pieces(self, path, f, pieces):
        for piece in pieces:
            time.sleep(self.pause)
            super().pwrite_pieces(path, f, [piece])


def test_training_goes_on_while_the_save_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "PIECE", 256 << 10)
    model, opt = make_model()
    train(model, opt, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = checkpoint.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ck",
                        fs=SlowLocal(0.1))
    assert h.blocked_s < 1.0
    steps = 0
    while not h.done():  # the loop is not blocked: it trains (and changes the parameters) meanwhile
        train(model, opt, 1, seed=steps)
        steps += 1
    h.wait(30)
    assert steps >= 3
    back = checkpoint.load(tmp_path / "ck")
    assert_same(back["model"], collections.OrderedDict(before))  # what was there when save() returned

    # a second save while one is in flight waits for the first
    h1 = checkpoint.save({"w": torch.ones(200_000)}, tmp_path / "one", fs=SlowLocal(0.05))
    h2 = checkpoint.save({"w": torch.zeros(10)}, tmp_path / "two")
    assert h1.done()
    h2.wait(30)
    assert torch.equal(checkpoint.load(tmp_path / "one")["w"], torch.ones(200_000))
    assert torch.equal(checkpoint.load(tmp_path / "two")["w"], torch.zeros(10))


CRASHER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from fs3 import checkpoint
    from fs3.formats import LocalBackend

    class Slow(LocalBackend):
        def pwrite_pieces(self, path, f, pieces):
            for piece in pieces:
                time.sleep(0.05)
                super().pwrite_pieces(path, f, [piece])

    checkpoint.PIECE = 64 << 10
    path = {path!r}
    checkpoint.save_sync({{"w": torch.full((500_000,), 1.0), "step": 1}}, path)
    checkpoint.save({{"w": torch.full((500_000,), 2.0), "step": 2}}, path, fs=Slow())
    print("saving", flush=True)
    time.sleep(60)
""")


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ck")
    proc = subprocess.Popen([sys.executable, "-c", CRASHER.format(root=str(ROOT), path=path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        deadline = time.monotonic() + 20
        while not [x for x in os.listdir(tmp_path) if ".tmp-" in x and os.path.getsize(tmp_path / x) > 100_000]:
            assert time.monotonic() < deadline, "the second save never started writing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    tmps = [x for x in os.listdir(tmp_path) if ".tmp-" in x]
    assert tmps, "the killed save left its half-written file"
    back = checkpoint.load(path)
    assert back["step"] == 1 and torch.equal(back["w"], torch.full((500_000,), 1.0))
    checkpoint.save_sync({"step": 3}, path)  # the next save cleans up the leftover
    assert not [x for x in os.listdir(tmp_path) if ".tmp-" in x]
    assert checkpoint.load(path) == {"step": 3}


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_corruption_is_detected(tmp_path):
    state = {"a": torch.arange(1000, dtype=torch.float32), "b": {"c": torch.ones(50, dtype=torch.float64)}}
    good = tmp_path / "good"
    checkpoint.save_sync(state, good)
    entries = {t["name"]: t for t in checkpoint.info(good)["tensors"]}
    size = good.stat().st_size
    cases = {"data": checkpoint.DATA_OFFSET + entries["b.c"]["offset"] + 7, "header": 20, "index": size - 40}
    for what, off in cases.items():
        p = tmp_path / what
        p.write_bytes(good.read_bytes())
        flip(p, off)
        msg = {"data": "tensor b.c checksum mismatch", "header": "header is damaged", "index": "index is damaged"}[what]
        with pytest.raises(ChecksumError, match=msg):
            checkpoint.load(p)
    t = tmp_path / "truncated"
    t.write_bytes(good.read_bytes()[: size - 100])
    with pytest.raises(ChecksumError):
        checkpoint.load(t)
    with pytest.raises(checkpoint.CheckpointError, match="does not store"):
        checkpoint.save({"f": open}, tmp_path / "x")


def test_through_the_fs3_seam(tmp_path):
    from test_fs3_ffrecord import StandInFs

    fs = StandInFs(tmp_path)
    fs.makedirs("/ck", exist_ok=True)
    model, opt = make_model()
    train(model, opt, 2)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 2}
    checkpoint.save(state, "/ck/latest", fs=fs).wait(60)
    n = fs.batches
    back = checkpoint.load("/ck/latest", fs=fs)
    assert fs.batches - n == 3  # the header, the index, then every tensor in one batch
    assert_same(back["model"], state["model"])
    assert_same(back["optim"], state["optim"])
    assert (tmp_path / "ck" / "latest").exists() and not [x for x in os.listdir(tmp_path / "ck") if ".tmp-" in x]


def test_missing_directories_are_made_and_errors_come_back_on_wait(tmp_path):
    checkpoint.save({"x": torch.ones(3)}, tmp_path / "a" / "b" / "ck").wait(30)
    assert torch.equal(checkpoint.load(tmp_path / "a" / "b" / "ck")["x"], torch.ones(3))
    (tmp_path / "file").write_text("not a directory")
    h = checkpoint.save({"x": torch.ones(3)}, tmp_path / "file" / "ck")
    with pytest.raises(checkpoint.CheckpointError, match="file/ck"):
        h.wait(30)
    assert h.done()
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "nothing")
