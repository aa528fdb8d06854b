"""hfreduce's device path on a stand-in device backend that STANDS IN FOR A GPU (no GPU here).

The stand-in (hfreduce.device.standin) keeps "device memory" in private host arrays and moves it
with copy-engine threads (one per direction, like a GPU's D2H and H2D copy engines), so the
engine runs its device path: asynchronous D2H into the arena, event queries before a chunk is
posted, CPU reduce, asynchronous H2D, CONSUMED only after the H2D finished. Real processes and
real shared memory; only the GPU is stood in for. Also: the CUDA module imports without a GPU
and says why it is unavailable.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import hfreduce
from hfreduce import ReduceOp
from hfreduce.device.standin import StandInDevice
from hfreduce.shm import PREFIX, SHM_DIR
from hfreduce.testing import run_group

CHUNK = 64 << 10
ENV = {"HFREDUCE_CHUNK_BYTES": str(CHUNK)}


def make_input(rank: int, n: int, dtype) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    v = (i * 7 + rank * 13) % 17 - 8
    if np.dtype(dtype).kind == "f":
        return (v * 0.5).astype(dtype)
    return (v * 1000 + rank).astype(dtype)


def reference(world: int, n: int, dtype, op=ReduceOp.SUM) -> np.ndarray:
    xs = np.stack([make_input(r, n, dtype).astype(np.float64) for r in range(world)]) if n else np.zeros((world, 0))
    if op == ReduceOp.MAX:
        return xs.max(0)
    if op == ReduceOp.AVG:
        return xs.sum(0) / world
    return xs.sum(0)


def _allreduce_standin(pg, sizes, dtypes, ops, latency):
    dev = StandInDevice(latency=latency)
    bad = []
    for dtype in dtypes:
        for n in sizes:
            for op in ops:
                x = dev.array(make_input(pg.rank, n, dtype))
                hfreduce.allreduce(x, op=op)
                got = x.numpy().astype(np.float64)
                want = reference(pg.world_size, n, dtype, op)
                if not np.allclose(got, want, rtol=1e-6, atol=1e-6):
                    bad.append((np.dtype(dtype).name, n, op.name))
    backends = pg.info()["device_backends"]
    return bad, backends, len(dev.events("d2h")), len(dev.events("h2d"))


@pytest.mark.parametrize("nodes,per_node", [(1, 1), (1, 3), (2, 2)])
def test_standin_stands_in_for_a_gpu_allreduce_results_correct(nodes, per_node):
    sizes = [0, 1, 1001, 3 * CHUNK // 4 + 5]
    run = run_group(_allreduce_standin, sizes, [np.float32, np.int64, np.float64], [ReduceOp.SUM, ReduceOp.MAX],
                    0.0, nodes=nodes, per_node=per_node, env=ENV, timeout=60)
    for bad, backends, nd2h, nh2d in run.values():
        assert bad == []
        assert [b["backend"] for b in backends] == ["standin"]
        assert nd2h > 0 and nh2d > 0  # the data really went through the stand-in's copy engines


def _collectives_standin(pg):
    dev = StandInDevice(latency=0.001)
    W, r = pg.world_size, pg.rank
    n = 3 * CHUNK // 4 + 3
    out = {}
    # broadcast from rank 1
    x = dev.array(make_input(r, n, np.float32))
    hfreduce.broadcast(x, src=1)
    out["broadcast"] = bool(np.array_equal(x.numpy(), make_input(1, n, np.float32)))
    # allgather
    inp = dev.array(make_input(r, n, np.int32))
    res = dev.array(np.zeros(n * W, np.int32))
    hfreduce.allgather(res, inp)
    out["allgather"] = bool(np.array_equal(res.numpy(), np.concatenate([make_input(k, n, np.int32) for k in range(W)])))
    # reduce_scatter
    big = dev.array(make_input(r, n * W, np.float64))
    part = dev.array(np.zeros(n, np.float64))
    hfreduce.reduce_scatter(part, big)
    out["reduce_scatter"] = bool(np.allclose(part.numpy(), reference(W, n * W, np.float64)[r * n:(r + 1) * n]))
    # AVG, async, several in flight, in order
    xs = [dev.array(make_input(r + k, 5000 + k, np.float32)) for k in range(3)]
    works = [hfreduce.allreduce(x, op=ReduceOp.AVG, async_op=True) for x in xs]
    for w in works:
        w.wait(30)
    out["async_avg"] = all(
        np.allclose(x.numpy(), np.mean([make_input(q + k, 5000 + k, np.float32) for q in range(W)], 0), atol=1e-6)
        for k, x in enumerate(xs))
    # mixing a host and a device buffer is refused with a clear error
    try:
        hfreduce.allgather(np.zeros(n * W, np.int32), inp)
        out["mixed"] = "accepted"
    except hfreduce.InvalidArgument as exc:
        out["mixed"] = str(exc)
    return out


def test_standin_stands_in_for_a_gpu_other_collectives_async_and_mixed_buffers():
    for res in run_group(_collectives_standin, nodes=2, per_node=2, env=ENV, timeout=60).values():
        assert res["broadcast"] and res["allgather"] and res["reduce_scatter"] and res["async_avg"]
        assert "must all be host buffers or all on one device" in res["mixed"]


def _overlap(pg, nchunks):
    dev = StandInDevice(latency=0.002, hold=True, hold_timeout=10.0)
    n = nchunks * CHUNK // 4
    x = dev.array(make_input(pg.rank, n, np.float32))
    hfreduce.allreduce(x)
    ok = bool(np.array_equal(x.numpy().astype(np.float64), reference(pg.world_size, n, np.float32)))
    return ok, dev.hold_timeouts, dev.events("d2h"), dev.events("reduce"), dev.events("h2d")


def test_standin_stands_in_for_a_gpu_copy_of_next_chunk_in_flight_while_chunk_is_reduced():
    """The D2H of chunk i+1 was issued before the reduce of chunk i started and ended after that
    reduce ended (the stand-in's hold makes this hold for any pipelined engine, whatever the
    durations; a copy-then-reduce engine would have hit hold timeouts instead)."""
    nchunks = 8
    run = run_group(_overlap, nchunks, nodes=1, per_node=2, env={**ENV, "HFREDUCE_SLOTS": "4"}, timeout=90)
    for ok, hold_timeouts, d2h, red, h2d in run.values():
        assert ok
        assert hold_timeouts == 0
        gs = sorted(d2h)
        assert len(gs) == nchunks and sorted(red) == gs and sorted(h2d) == gs
        for g in gs[:-1]:
            issued_next, _, ended_next = d2h[g + 1]
            red_start, _, red_end = red[g]
            assert issued_next < red_start, f"D2H of chunk {g + 1} was not yet issued when chunk {g} was reduced"
            assert ended_next > red_end, f"D2H of chunk {g + 1} was not in flight during the reduce of chunk {g}"
        for g in gs:
            # a chunk is reduced only after its own D2H ended, and copied back only after its reduce
            assert d2h[g][2] <= red[g][0] <= red[g][2] <= h2d[g][0]


def _fail(pg, fail_rank, where):
    dev = StandInDevice(latency=0.001, fail=where if pg.rank == fail_rank else None)
    x = dev.array(make_input(pg.rank, 4 * CHUNK // 4, np.float32))
    try:
        hfreduce.allreduce(x).wait(20)
    except hfreduce.HFReduceError as exc:
        return type(exc).__name__, str(exc), exc.rank
    return "no error", "", None


@pytest.mark.parametrize("where,nodes,per_node", [(("d2h", 2), 1, 3), (("h2d", 1), 1, 3), (("d2h", 1), 2, 2)])
def test_standin_stands_in_for_a_gpu_copy_error_propagates_as_hfreduce_error(where, nodes, per_node):
    run = run_group(_fail, 1, where, nodes=nodes, per_node=per_node, env=ENV, timeout=60)
    vals = run.values()
    for rank, (kind, msg, _) in enumerate(vals):
        assert kind == "DeviceError", (rank, kind, msg)
        assert where[0].upper() in msg and "fault injected" in msg
    assert _leftovers(run.pids) == []  # no shared memory left behind


def _leftovers(pids) -> list[str]:
    """This group's segments still in /dev/shm (others' concurrent groups do not count)."""
    marks = tuple(f"{PREFIX}{p}." for p in pids)
    return [f for f in os.listdir(SHM_DIR) if f.startswith(marks)]


def test_cuda_module_imports_without_gpu_and_says_why():
    code = ("import hfreduce.cuda as c, json; "
            "print(json.dumps({'ok': c.available(), 'why': c.unavailable_reason(), 'info': c.info()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    try:
        import cupy  # noqa: F401
        has_cupy = True
    except Exception:  # noqa: BLE001
        has_cupy = False
    if res["ok"]:
        pytest.skip("a CUDA device is present: this test is for machines without one")
    assert res["why"]
    if not has_cupy:
        assert "cupy" in res["why"]
    else:
        assert "device" in res["why"] or "CUDA" in res["why"]
    assert res["info"]["available"] is False and res["info"]["reason"] == res["why"]


def test_cuda_backend_unavailable_raises_device_error_naming_the_reason():
    import hfreduce.cuda as c

    if c.available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(hfreduce.DeviceError, match="unavailable"):
        c.require()


def test_haiscale_picks_the_cuda_backend_or_says_why_not():
    torch = pytest.importorskip("torch")
    import hfreduce.cuda as c
    from haiscale._comm import backend_for
    from haiscale.errors import DeviceError as HaiscaleDeviceError

    assert backend_for(torch.device("cpu")) == "host"
    if c.available():
        assert backend_for(torch.device("cuda", 0)) == "cuda"
    else:
        with pytest.raises(HaiscaleDeviceError, match="CUDA backend is unavailable") as ei:
            backend_for(torch.device("cuda", 0), "DistributedDataParallel")
        assert c.unavailable_reason() in str(ei.value)


# -- hfreduce.cuda's own code on a cupy stand-in (tests/standin_cupy: it stands in for a GPU) ------
STANDIN_CUPY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin_cupy")


def _cuda_backend_on_standin_cupy(pg):
    sys.path.insert(0, STANDIN_CUPY)
    import cupy

    import hfreduce.cuda as hc

    assert cupy.__version__.endswith("standin") and hc.available(), hc.unavailable_reason()
    bad = []
    for dtype in (np.float32, np.int64):
        for n in (1, 1001, 3 * CHUNK // np.dtype(dtype).itemsize + 7):
            for op in (ReduceOp.SUM, ReduceOp.MAX):
                x = cupy.asarray(make_input(pg.rank, n, dtype))
                hfreduce.allreduce(x, op=op)
                if not np.array_equal(cupy.asnumpy(x).astype(np.float64), reference(pg.world_size, n, dtype, op)):
                    bad.append((np.dtype(dtype).name, n, op.name))
    xs = [cupy.asarray(make_input(pg.rank + k, 40_000, np.float32)) for k in range(3)]
    works = [hfreduce.allreduce(x, async_op=True) for x in xs]
    for k, (x, w) in enumerate(zip(xs, works, strict=True)):
        w.wait(30)
        want = sum(make_input(q + k, 40_000, np.float32).astype(np.float64) for q in range(pg.world_size))
        if not np.array_equal(cupy.asnumpy(x).astype(np.float64), want):
            bad.append(("async", k))
    rt = cupy.cuda.runtime
    arena_bytes = pg._arena.arena.size
    backends = pg.info()["device_backends"]
    hfreduce.destroy()
    regs = [c for c in rt.calls if c[0] == "hostRegister"]
    copies = {k: sum(1 for c in rt.calls if c[0] == "memcpyAsync" and c[1] == k) for k in (1, 2)}
    return bad, backends, [r[2] for r in regs], arena_bytes, dict(rt.registered), copies


def test_cuda_backend_code_runs_on_a_cupy_standin_that_stands_in_for_a_gpu():
    run = run_group(_cuda_backend_on_standin_cupy, nodes=2, per_node=2, env={**ENV, "STANDIN_CUPY_LATENCY": "0.0005"},
                    timeout=90)
    for bad, backends, reg_sizes, arena_bytes, still_registered, copies in run.values():
        assert bad == []
        assert backends == [{"backend": "cuda", "device": 0}]
        assert reg_sizes == [arena_bytes]  # the arena was pinned once per group and device ...
        assert still_registered == {}  # ... and unpinned when the group was destroyed
        assert copies[1] > 0 and copies[2] > 0  # H2D and D2H went through memcpyAsync


@pytest.mark.parametrize("devices,why", [("0", "reports 0 devices"), ("-1", "no usable CUDA device")])
def test_cuda_unavailable_reason_with_a_cupy_standin_without_device(devices, why):
    code = "import hfreduce.cuda as c; print(c.available()); print(c.unavailable_reason())"
    env = {**os.environ, "PYTHONPATH": STANDIN_CUPY + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "STANDIN_CUPY_DEVICES": devices}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    avail, reason = out.stdout.strip().splitlines()[-2:]
    assert avail == "False" and why in reason


def _nvlink_pair_on_standin_cupy(pg, sizes):
    sys.path.insert(0, STANDIN_CUPY)
    import cupy

    import hfreduce.cuda as hc

    bad = []
    for n in sizes:
        for op in (ReduceOp.SUM, ReduceOp.AVG):
            buf = hc.pair_empty(n, np.float32)
            buf[:] = cupy.asarray(make_input(pg.rank, n, np.float32))
            hc.allreduce_nvlink_pair(buf, op=op, timeout=30)
            got = cupy.asnumpy(buf).astype(np.float64)
            if not np.allclose(got, reference(pg.world_size, n, np.float32, op), rtol=1e-6, atol=1e-6):
                bad.append((n, op.name))
    refused = []
    for call in (lambda: hc.allreduce_nvlink_pair(cupy.asarray(np.zeros(8, np.float32))),
                 lambda: hc.allreduce_nvlink_pair(hc.pair_empty(8), op=ReduceOp.MAX)):
        try:
            call()
            refused.append("accepted")
        except hfreduce.InvalidArgument as exc:
            refused.append(str(exc))
    rt = cupy.cuda.runtime
    opened = sum(1 for c in rt.calls if c[0] == "ipcOpenMemHandle")
    closed = sum(1 for c in rt.calls if c[0] == "ipcCloseMemHandle")
    d2h_bytes = sum(c[2] for c in rt.calls if c[0] == "memcpyAsync" and c[1] == 2)
    return bad, refused, opened, closed, d2h_bytes


def test_nvlink_pair_variant_on_a_cupy_standin_that_stands_in_for_gpus_joined_by_nvlink():
    """Pairs (local ranks 0+1, 2+3) reduce over "NVLink" (memory shared between the two processes,
    as CUDA IPC maps it), the CPU allreduces the halves, the pair allgathers: correct results on
    2 nodes x 4 ranks, each rank copying only its half to the host."""
    sizes = [1, 2, 1001, 3 * CHUNK // 4 + 5]
    run = run_group(_nvlink_pair_on_standin_cupy, sizes, nodes=2, per_node=4, env=ENV, timeout=120)
    for bad, refused, opened, closed, d2h_bytes in run.values():
        assert bad == []
        assert "pair_empty" in refused[0] and "only SUM and AVG" in refused[1]
        assert opened == closed == 2 * len(sizes)
        # each rank moved about half of each buffer to the host (its half, once per op)
        full = sum(n * 4 for n in sizes) * 2
        assert d2h_bytes <= full // 2 + 2 * len(sizes) * 4


def _stuck(pg, stuck_rank):
    dev = StandInDevice(latency=3600.0 if pg.rank == stuck_rank else 0.0)
    x = dev.array(make_input(pg.rank, 2 * CHUNK // 4, np.float32))
    try:
        hfreduce.allreduce(x)
    except hfreduce.HFReduceError as exc:
        return type(exc).__name__, str(exc), exc.rank
    return "no error", "", None


def test_standin_stands_in_for_a_gpu_stuck_copy_times_out_on_every_rank_and_destroy_does_not_hang():
    """A D2H that never completes (a stuck device) becomes HFReduceTimeout on every rank within the
    group's timeout, naming the stuck rank; destroy cancels the stand-in's copies (no hang, no
    write into the unmapped arena), so every process exits (run_group would fail otherwise)."""
    run = run_group(_stuck, 2, nodes=1, per_node=3, env=ENV, group_timeout=5.0, timeout=90)
    for kind, msg, culprit in run.values():
        assert kind == "HFReduceTimeout", msg
        assert culprit == 2 and "never arrived" in msg
    assert _leftovers(run.pids) == []


# -- on a real GPU (skipped here: no GPU on the development machines) ------------------------------
def _real_gpu(pg):
    import cupy

    cupy.cuda.Device(0).use()
    bad = []
    for n in (1, 1001, 3 * CHUNK // 4 + 5):
        x = cupy.asarray(make_input(pg.rank, n, np.float32))
        hfreduce.allreduce(x)
        if not np.array_equal(cupy.asnumpy(x).astype(np.float64), reference(pg.world_size, n, np.float32)):
            bad.append(n)
    return bad, pg.info()["device_backends"]


@pytest.mark.gpu
def test_cuda_allreduce_on_a_real_gpu_two_ranks_sharing_it():
    import hfreduce.cuda as c

    if not c.available():
        pytest.skip(f"no CUDA device: {c.unavailable_reason()}")
    for bad, backends in run_group(_real_gpu, nodes=1, per_node=2, env=ENV, timeout=120).values():
        assert bad == []
        assert backends == [{"backend": "cuda", "device": 0}]
