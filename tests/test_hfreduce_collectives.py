"""hfreduce collectives on local multi-process groups: 1-4 emulated nodes x 1-4 ranks per node.

Emulated nodes are process sets with distinct node names; with deploy/clusters/local.toml their
leaders talk from their own loopback addresses (127.0.0.2..5), over two zones, so the
inter-node tree is real TCP. Every rank builds its input from (rank, size, dtype) and checks the
result against a reference it computes itself: exact for integers and for float sums of small
halves (exactly representable even in fp16 and bf16), a tolerance for AVG of floats.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import hfreduce
from hfreduce import ReduceOp
from hfreduce.shm import PREFIX, SHM_DIR
from hfreduce.testing import run_group

CHUNK = 64 << 10  # small chunks: multi-chunk pipelines at small sizes
ENV = {"HFREDUCE_CHUNK_BYTES": str(CHUNK)}
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64]
OPS = [ReduceOp.SUM, ReduceOp.AVG, ReduceOp.MAX, ReduceOp.MIN]


def sizes_for(dtype) -> list[int]:
    esz = np.dtype(dtype).itemsize
    return [0, 1, 1001, 3 * CHUNK // esz + 5]  # empty, one, odd, not a multiple of the chunk


def make_input(rank: int, n: int, dtype) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    v = (i * 7 + rank * 13) % 17 - 8
    if np.dtype(dtype).kind == "f":
        return (v * 0.5).astype(dtype)
    return (v * 1000 + rank).astype(dtype)


def expected(world: int, n: int, dtype, op) -> np.ndarray:
    xs = np.stack([make_input(r, n, dtype).astype(np.float64 if np.dtype(dtype).kind == "f" else np.int64)
                   for r in range(world)]) if n else np.zeros((world, 0))
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        out = xs.sum(0)
        if op == ReduceOp.AVG:
            out = out // world if np.dtype(dtype).kind == "i" else out / world
    elif op == ReduceOp.MAX:
        out = xs.max(0)
    else:
        out = xs.min(0)
    return out


def check(got: np.ndarray, want: np.ndarray, dtype, op) -> str | None:
    if np.dtype(dtype).kind == "f" and op == ReduceOp.AVG:
        tol = 2e-3 if dtype == np.float16 else 1e-5
        ok = np.allclose(got.astype(np.float64), want, rtol=tol, atol=tol)
    else:
        ok = np.array_equal(got, want.astype(dtype))
    if ok:
        return None
    bad = np.flatnonzero(got.astype(np.float64) != want)[:5]
    return f"{np.dtype(dtype).name} {op.name} n={got.size}: at {bad.tolist()} got {got[bad]} want {want[bad]}"


def shm_leftovers(pids) -> list[str]:
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    marks = {f"{PREFIX}{p}." for p in pids}
    return [n for n in names if any(n.startswith(m) for m in marks)]


def run(fn, *args, nodes=1, per_node=1, timeout=120.0, group_timeout=20.0, env=ENV, **kw):
    res = run_group(fn, *args, nodes=nodes, per_node=per_node, timeout=timeout, group_timeout=group_timeout,
                    env=env, **kw)
    assert shm_leftovers(res.pids) == [], "shared memory left behind"
    return res


# -- workers (module level: they run in the group's processes) ---------------------------------
def w_allreduce_matrix(pg):
    errors = []
    reg = pg.local_rank % 2 == 1  # odd local ranks use registered (arena) buffers
    for dtype in DTYPES:
        for op in OPS:
            for n in sizes_for(dtype):
                if reg and n:
                    buf = pg.empty(n, dtype)
                    buf[...] = make_input(pg.rank, n, dtype)
                else:
                    buf = make_input(pg.rank, n, dtype)
                pg.allreduce(buf, op)
                err = check(buf, expected(pg.world_size, n, dtype, op), dtype, op)
                if err:
                    errors.append(err)
    return errors


@pytest.mark.parametrize("per_node", [1, 2, 3, 4])
@pytest.mark.parametrize("nodes", [1, 2, 3, 4])
def test_allreduce_every_dtype_op_and_size(nodes, per_node):
    res = run(w_allreduce_matrix, nodes=nodes, per_node=per_node)
    assert res.values() == [[]] * (nodes * per_node)


@pytest.mark.parametrize("nodes,per_node", [(1, 3), (2, 2)])
def test_python_pipeline_loop_with_c_kernels(nodes, per_node):
    """The reference loop (device backends and the fallback run it) stays correct on its own."""
    env = {**ENV, "HFREDUCE_PIPELINE": "python"}
    res = run(w_allreduce_matrix, nodes=nodes, per_node=per_node, env=env)
    assert res.values() == [[]] * (nodes * per_node)
    assert set(run(w_pipeline, nodes=nodes, per_node=per_node, env=env).values()) == {"python"}


def w_pipeline(pg):
    return pg.info()["pipeline"]


def w_own_buffers_matrix(pg):
    """Every rank's own (private) buffers: on one node, the single-copy path when it is on."""
    errors = []
    for dtype in DTYPES:
        for op in OPS:
            for n in sizes_for(dtype):
                buf = make_input(pg.rank, n, dtype)
                pg.allreduce(buf, op)
                err = check(buf, expected(pg.world_size, n, dtype, op), dtype, op)
                if err:
                    errors.append(err)
    # several in flight, each buffer read by the peers while the next is being reduced
    bufs = [make_input(pg.rank + k, 3 * CHUNK // 4 + 7, np.float32) for k in range(4)]
    works = [pg.allreduce(b, async_op=True) for b in bufs]
    for k, (w, b) in enumerate(zip(works, bufs, strict=True)):
        w.wait(30)
        want = sum(make_input(r + k, b.size, np.float32).astype(np.float64) for r in range(pg.world_size))
        if not np.array_equal(b, want.astype(np.float32)):
            errors.append(f"async #{k} wrong")
    info = pg.info()
    # how many of the allreduces above (every one on own buffers) took the single-copy path
    return (info["single_copy"], info["single_copy_ops"] / info["completed"]), errors


@pytest.mark.parametrize("cma", ["1", "0"])
@pytest.mark.parametrize("per_node", [2, 3, 4])
def test_own_buffers_on_one_node_single_copy_and_staged(per_node, cma):
    """Own buffers on one node take the single-copy path (process_vm_readv from the peers) unless
    HFREDUCE_CMA=0 asks for staging through shared memory; both give exact results."""
    res = run(w_own_buffers_matrix, nodes=1, per_node=per_node, env={**ENV, "HFREDUCE_CMA": cma})
    for (enabled, ops), errors in res.values():
        assert errors == []
        assert enabled is (cma == "1")
        assert ops == (1.0 if cma == "1" else 0.0)  # every allreduce took the path, or none did


def w_registered_matrix(pg):
    """Every rank's buffer registered (hfreduce.empty): on one node the slice owners push results."""
    errors = []
    for dtype in DTYPES:
        for op in OPS:
            for n in sizes_for(dtype):
                buf = pg.empty(max(n, 1), dtype)[:n]
                buf[...] = make_input(pg.rank, n, dtype)
                pg.allreduce(buf, op)
                err = check(buf, expected(pg.world_size, n, dtype, op), dtype, op)
                if err:
                    errors.append(err)
    return errors


@pytest.mark.parametrize("nodes,per_node", [(1, 2), (1, 3), (1, 4), (2, 2)])
def test_registered_buffers_every_dtype_op_and_size(nodes, per_node):
    res = run(w_registered_matrix, nodes=nodes, per_node=per_node)
    assert res.values() == [[]] * (nodes * per_node)


def w_lanes_matrix(pg):
    _, errors = w_own_buffers_matrix(pg)
    reg = [pg.empty(1000, np.float32), pg.empty(3 * CHUNK // 4 + 7, np.int64)]  # registered buffers too
    for buf in reg:
        buf[...] = make_input(pg.rank, buf.size, buf.dtype)
        pg.allreduce(buf)
        err = check(buf, expected(pg.world_size, buf.size, buf.dtype, ReduceOp.SUM), buf.dtype, ReduceOp.SUM)
        if err:
            errors.append(f"registered: {err}")
    info = pg.info()
    return info["lanes"], info["lane_ops"] / info["completed"], errors


@pytest.mark.parametrize("lanes", ["1", "0"])
@pytest.mark.parametrize("nodes,per_node", [(2, 1), (2, 2), (2, 3), (3, 2), (4, 1)])
def test_allreduce_across_nodes_in_lanes_and_through_the_leaders(nodes, per_node, lanes):
    """Across nodes, allreduce of host buffers (own and registered) runs in lanes, one tree per
    slice owner (hfreduce.lanes), unless HFREDUCE_LANES=0 sends it through the leaders' tree;
    both give exact results."""
    res = run(w_lanes_matrix, nodes=nodes, per_node=per_node, env={**ENV, "HFREDUCE_LANES": lanes})
    for enabled, frac, errors in res.values():
        assert errors == []
        assert enabled is (lanes == "1")
        assert frac == (1.0 if lanes == "1" else 0.0)  # every allreduce ran in lanes, or none did


def w_allreduce_256mib(pg):
    n = (256 << 20) // 4
    buf = (np.arange(n) % 1024 + pg.rank).astype(np.float32)  # exact sums
    pg.allreduce(buf)
    w = pg.world_size
    want_head = np.arange(1 << 16, dtype=np.float32) % 1024 * w + w * (w - 1) / 2
    idx = np.arange(n - (1 << 16), n)
    want_tail = (idx % 1024).astype(np.float32) * w + w * (w - 1) / 2
    return bool(np.array_equal(buf[: 1 << 16], want_head) and np.array_equal(buf[-(1 << 16):], want_tail)
                and np.array_equal(buf[::4099], (np.arange(0, n, 4099) % 1024).astype(np.float32) * w + w * (w - 1) / 2))


def test_allreduce_256mib_two_nodes_two_ranks():
    res = run(w_allreduce_256mib, nodes=2, per_node=2, env={}, timeout=180)
    assert res.values() == [True] * 4


def w_other_collectives(pg):
    errors = []
    w, r = pg.world_size, pg.rank
    for dtype in [np.float32, np.int64, np.float16]:
        for n in [0, 1, 1001, 3 * CHUNK // np.dtype(dtype).itemsize + 5]:
            # reduce: only dst's buffer changes
            for dst in {0, w - 1}:
                buf = make_input(r, n, dtype)
                pg.reduce(buf, dst=dst, op=ReduceOp.SUM)
                want = expected(w, n, dtype, ReduceOp.SUM) if r == dst else make_input(r, n, dtype)
                if (e := check(buf, want.astype(np.float64), dtype, ReduceOp.SUM)):
                    errors.append("reduce " + e)
            # broadcast
            for src in {0, w - 1}:
                buf = make_input(r, n, dtype) if r == src else np.full(n, 99, dtype)
                pg.broadcast(buf, src=src)
                if (e := check(buf, make_input(src, n, dtype).astype(np.float64), dtype, ReduceOp.SUM)):
                    errors.append("broadcast " + e)
            # allgather
            inp = make_input(r, n, dtype)
            out = np.full(n * w, 77, dtype)
            pg.allgather(out, inp)
            want = np.concatenate([make_input(q, n, dtype) for q in range(w)]) if n else np.zeros(0, dtype)
            if not np.array_equal(out, want) or not np.array_equal(inp, make_input(r, n, dtype)):
                errors.append(f"allgather {np.dtype(dtype).name} n={n}")
            # reduce_scatter
            for op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.AVG):
                big = make_input(r, n * w, dtype)
                out = np.zeros(n, dtype)
                pg.reduce_scatter(out, big, op=op)
                want = expected(w, n * w, dtype, op)[r * n:(r + 1) * n]
                if (e := check(out, want, dtype, op)):
                    errors.append("reduce_scatter " + e)
                if not np.array_equal(big, make_input(r, n * w, dtype)):
                    errors.append("reduce_scatter modified its input")
    pg.barrier()
    hfreduce.barrier(group=pg)
    return errors


@pytest.mark.parametrize("nodes,per_node", [(1, 1), (1, 3), (2, 2), (3, [1, 2, 3])])
def test_reduce_broadcast_allgather_reduce_scatter_barrier(nodes, per_node):
    res = run(w_other_collectives, nodes=nodes, per_node=per_node)
    assert all(v == [] for v in res.values()), res.values()


def w_async_in_flight(pg):
    bufs = [make_input(pg.rank, n, np.float32) for n in (5000, 1, 70000, 0, 123457, 64, 300000, 9)]
    reg = pg.empty(100003, np.float32)
    reg[...] = make_input(pg.rank, 100003, np.float32)
    works = [pg.allreduce(b, ReduceOp.SUM, async_op=True) for b in bufs[:4]]
    works.append(pg.allreduce(reg, ReduceOp.MAX, async_op=True))
    works += [pg.allreduce(b, ReduceOp.SUM, async_op=True) for b in bufs[4:]]
    for wk in reversed(works):
        wk.wait(timeout=60)
    ok = all(wk.is_completed() for wk in works)
    finished = [wk.finished for wk in works]
    errors = [check(b, expected(pg.world_size, b.size, np.float32, ReduceOp.SUM), np.float32, ReduceOp.SUM)
              for b in bufs]
    errors.append(check(reg, expected(pg.world_size, reg.size, np.float32, ReduceOp.MAX), np.float32, ReduceOp.MAX))
    return ok, finished == sorted(finished), [e for e in errors if e]


@pytest.mark.parametrize("nodes,per_node", [(1, 2), (2, 2)])
def test_async_operations_overlap_and_complete_in_order(nodes, per_node):
    for ok, in_order, errors in run(w_async_in_flight, nodes=nodes, per_node=per_node).values():
        assert ok and in_order and errors == []


def w_torch(pg):
    import torch

    out = []
    w = pg.world_size
    base = (torch.arange(3001) % 9 - 4).to(torch.float64)
    scaled = torch.stack([base * (r + 1) for r in range(w)])
    refs = {ReduceOp.SUM: scaled.sum(0), ReduceOp.MAX: scaled.max(0).values, ReduceOp.MIN: scaled.min(0).values,
            ReduceOp.AVG: scaled.sum(0) / w}
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        for op, want in refs.items():
            t = (base * (pg.rank + 1)).to(dt)
            pg.allreduce(t, op)
            if dt == torch.int64 and op == ReduceOp.AVG:
                want = torch.floor(scaled.sum(0) / w)
            if op == ReduceOp.AVG and dt in (torch.bfloat16, torch.float16):
                out.append(bool(torch.allclose(t.to(torch.float64), want, rtol=1e-2, atol=1e-2)))
            else:
                out.append(bool(torch.equal(t.to(torch.float64), want)))
    # a registered buffer seen as a bf16 tensor
    arr = pg.empty(4096, "bfloat16")
    t = torch.from_numpy(arr).view(torch.bfloat16)
    t.fill_(0.5)
    pg.allreduce(t, ReduceOp.AVG)
    out.append(bool((t == 0.5).all()))
    t2 = torch.ones(10, requires_grad=True)
    pg.allreduce(t2.detach())
    out.append(float(t2.detach()[0]) == pg.world_size)
    return out


def test_torch_cpu_tensors_including_bfloat16():
    pytest.importorskip("torch")
    res = run(w_torch, nodes=2, per_node=1, timeout=180)
    for v in res.values():
        assert all(v), v


def w_info(pg):
    i = hfreduce.info()
    return i["kernel"], i["nodes"], i["leader"], i["world_size"], hfreduce.get_rank(), hfreduce.get_world_size()


def test_numpy_fallback_is_chosen_and_correct():
    res = run(w_allreduce_matrix, nodes=2, per_node=2, env={**ENV, "HFREDUCE_KERNEL": "numpy"})
    assert res.values() == [[]] * 4
    kinds = run(w_info, nodes=2, per_node=1, env={"HFREDUCE_KERNEL": "numpy"}).values()
    assert {k[0] for k in kinds} == {"numpy"}


def test_kernel_choice_is_read_from_the_environment():
    # a fresh process, so hfreduce reads HFREDUCE_KERNEL itself (the test harness selects it too)
    import subprocess
    import sys

    code = "import hfreduce; print(hfreduce.info()['kernel'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HFREDUCE_KERNEL": "numpy"},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "numpy", out.stderr
    default = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in os.environ.items()
                                                                if k != "HFREDUCE_KERNEL"},
                             capture_output=True, text=True, timeout=60)
    assert default.stdout.strip() == hfreduce.kernels.KERNEL


def test_info_describes_the_group():
    vals = run(w_info, nodes=2, per_node=2).values()
    assert [v[0] for v in vals] == [hfreduce.kernels.KERNEL] * 4
    assert vals[0][1] == ["n0", "n1"] and [v[2] for v in vals] == [True, False, True, False]
    assert [v[4] for v in vals] == [0, 1, 2, 3] and {v[5] for v in vals} == {4}


# -- mismatches, failures --------------------------------------------------------------------
def w_mismatch(pg, how):
    n = 1000
    if how == "size":
        buf = np.ones(n + (pg.rank == pg.world_size - 1), np.float32)
    elif how == "dtype":
        buf = np.ones(n, np.float64 if pg.rank == pg.world_size - 1 else np.float32)
    else:  # "kind": the last rank broadcasts while the others allreduce
        buf = np.ones(n, np.float32)
        if pg.rank == pg.world_size - 1:
            try:
                pg.broadcast(buf, src=0)
            except hfreduce.HFReduceError as exc:
                return type(exc).__name__
            return "no error"
    try:
        pg.allreduce(buf)
    except hfreduce.HFReduceError as exc:
        return type(exc).__name__
    return "no error"


@pytest.mark.parametrize("how", ["size", "dtype", "kind"])
@pytest.mark.parametrize("nodes,per_node", [(1, 3), (2, 1), (2, 2)])
def test_mismatched_calls_are_reported_not_silently_wrong(how, nodes, per_node):
    vals = run(w_mismatch, how, nodes=nodes, per_node=per_node, group_timeout=10).values()
    assert set(vals) == {"MismatchError"}, vals


def w_victim(pg, victim, how):
    import signal

    a = np.ones(1 << 16, np.float32)
    pg.allreduce(a)
    if pg.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        time.sleep(60)
    t0 = time.monotonic()
    try:
        for _ in range(100000):
            pg.allreduce(a)
    except hfreduce.HFReduceError as exc:
        again = None
        try:
            pg.allreduce(a)
        except hfreduce.HFReduceError as exc2:
            again = type(exc2).__name__
        return type(exc).__name__, exc.rank, exc.node, time.monotonic() - t0, again, str(exc)
    return "no error", None, None, time.monotonic() - t0, None, ""


@pytest.mark.parametrize("nodes,per_node,victim", [(1, 3, 1), (1, 2, 0), (2, 2, 3), (2, 2, 2), (3, 1, 1)])
def test_killed_rank_raises_on_every_survivor(nodes, per_node, victim):
    gt = 4.0
    res = run(w_victim, victim, "kill", nodes=nodes, per_node=per_node, group_timeout=gt, timeout=60)
    vnode = f"n{[n for n in range(nodes) for _ in range(per_node)][victim]}"
    for r in res.results:
        if r.rank == victim:
            assert r.exitcode == -9
            continue
        assert r.error is None, r.traceback
        kind, rank, node, elapsed, again, msg = r.value
        assert kind == "PeerFailed", msg
        assert (rank, node) == (victim, vnode), msg  # names the rank that died, not a neighbour
        assert elapsed < 3 * gt + 5, f"the error came after {elapsed:.1f} s"
        assert again is not None  # the group stays failed


@pytest.mark.parametrize("nodes,per_node,victim", [(1, 3, 2), (2, 2, 3), (2, 2, 2)])
def test_stuck_rank_times_out_on_every_survivor(nodes, per_node, victim):
    gt = 3.0
    res = run(w_victim, victim, "stop", nodes=nodes, per_node=per_node, group_timeout=gt, timeout=60,
              abandon={victim})
    vnode = f"n{victim // per_node}"
    for r in res.results:
        if r.rank == victim:
            continue  # stopped, then killed by the harness
        assert r.error is None, r.traceback
        kind, rank, node, elapsed, again, msg = r.value
        assert kind == "HFReduceTimeout", msg
        assert node == vnode and rank in (victim, (victim // per_node) * per_node), msg
        assert elapsed < 4 * gt + 5, f"the error came after {elapsed:.1f} s"


def w_bad_args(pg):
    out = []
    for call in (lambda: pg.allreduce(np.ones((4, 4), np.float32)[:, 1]),
                 lambda: pg.allreduce(np.ones(4, np.uint8)),
                 lambda: pg.allreduce(np.ones(4, np.float32)[::-1]),
                 lambda: pg.allgather(np.ones(3, np.float32), np.ones(2, np.float32)),
                 lambda: pg.reduce_scatter(np.ones(2, np.float32), np.ones(3, np.float32)),
                 lambda: pg.broadcast(np.ones(2, np.float32), src=pg.world_size),
                 lambda: pg.allreduce([1.0, 2.0])):
        try:
            call()
            out.append("no error")
        except hfreduce.InvalidArgument as exc:
            out.append(isinstance(exc, ValueError))
    a = np.ones(10, np.float32)
    pg.allreduce(a)  # the group is still fine
    return out, float(a[0])


def test_invalid_arguments_raise_locally_and_leave_the_group_usable():
    for out, v in run(w_bad_args, nodes=1, per_node=2).values():
        assert out == [True] * 7 and v == 2.0


def test_shared_memory_too_small_is_a_clear_error_on_every_rank():
    res = run_group(w_info, nodes=2, per_node=2, timeout=60, group_timeout=10,
                    env={"HFREDUCE_CHUNK_BYTES": "1024G"})  # a ring far larger than /dev/shm
    for r in res.results:
        assert r.error_type == "InitError" and "cannot reserve" in str(r.error), (r.rank, r.error)
    assert shm_leftovers(res.pids) == []


def test_sweep_removes_segments_of_dead_processes(tmp_path):
    import subprocess

    from hfreduce.shm import process_start_time, segment_name, sweep_stale

    p = subprocess.Popen(["sleep", "0"])
    p.wait()
    dead = segment_name(p.pid, 12345, "deadbeef", "arena")
    mine = segment_name(os.getpid(), process_start_time(os.getpid()), "cafe", "h0")
    for name in (dead, mine):
        with open(os.path.join(SHM_DIR, name), "wb") as f:
            f.write(b"x")
    try:
        removed = sweep_stale()
        assert dead in removed and mine not in removed
        assert not os.path.exists(os.path.join(SHM_DIR, dead))
    finally:
        for name in (dead, mine):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass


def w_crash_all(pg):
    a = pg.empty(1 << 20, np.float32)
    a[...] = 1
    pg.allreduce(a)
    if pg.rank == 0:
        return sorted(shm_leftovers([os.getpid()]))
    os._exit(3)  # crash without destroy


def test_no_shm_leftovers_after_crashes():
    res = run_group(w_crash_all, nodes=2, per_node=2, timeout=60, env=ENV)
    assert res.results[0].value == []  # unlinked right after start-up
    assert shm_leftovers(res.pids) == []
