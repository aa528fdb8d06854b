"""hfreduce on GPUs: the CUDA backend (D2H / CPU reduce / H2D overlapped) vs the same without
overlap, vs gloo on CUDA tensors, and vs NCCL with two or more GPUs.

    python bench/allreduce_cuda.py [--quick] [--ranks 4] [--sizes 64,256] [--no-build]

Meant for a GPU machine with CUDA, PyTorch and cupy (cupy-cuda13x) installed and no network: once
it has found a usable device it builds the package's C extension in place from this working tree
(``setup.py build_ext --inplace``, when the built one is missing or older than its source; the
numpy kernels are used if that fails), then, in one run:

* **correctness** with ``--ranks`` processes sharing the GPU(s) (rank r on GPU r % count):
  allreduce of torch CUDA tensors, float32 and bfloat16, SUM and AVG, sizes 1 .. 4 Mi elements,
  against a reference computed on the host (exact for SUM: the inputs are small halves), plus a
  cupy array and several async operations in flight;
* **speed** at 64 and 256 MiB (float32; ``--quick``: 64 MiB only), the same ranks:
  ``hfreduce.cuda`` (chunked D2H, CPU reduce and H2D overlapped), **no overlap** (copy the whole
  tensor to pinned host memory, hfreduce's CPU allreduce on it, copy it back), and **gloo** on
  the CUDA tensors; with two or more GPUs, one rank per GPU, hfreduce.cuda vs **NCCL** (NCCL
  refuses several ranks on one GPU).

Ratios: ``speedup_vs_no_overlap`` = no-overlap time / hfreduce.cuda time (target >= 1.5) and
``hidden_copy_fraction`` = (no-overlap time - hfreduce.cuda time) / (D2H + H2D time of the
no-overlap run), the share of the copy time hidden behind the CPU reduce (target >= 0.8).

Without a usable CUDA device (no cupy, no driver, no GPU) it prints ``skipped: no CUDA device
(reason)`` and a JSON line with ``"ok": null`` and ``"skipped"``, and exits 0.

``--standin GBPS`` (no GPU needed) runs the overlapped and no-overlap rows on the stand-in device
(``hfreduce.device.standin``: copy engines are threads taking nbytes / GBPS per copy): it measures
how much simulated copy time the engine's pipeline hides on this machine, not anything about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH = "allreduce_cuda"
TARGETS = {"hidden_copy_fraction": 0.8, "speedup_vs_no_overlap": 1.5}
CHUNK = 4 << 20  # the group's chunk: 4 MiB (the device path runs the Python loop: fewer, larger chunks)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- set-up ---------------------------------------------------------------------------------------
def build() -> str:
    """Build hfreduce's C extension in place from this tree (no network: no build isolation)."""
    src = ROOT / "hfreduce" / "_kernels.c"
    built = sorted((ROOT / "hfreduce").glob("_C*.so"))
    if built and all(p.stat().st_mtime >= src.stat().st_mtime for p in built):
        return "C extension up to date"
    try:
        r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, capture_output=True,
                           text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"build failed ({exc!r}): numpy kernels"
    if r.returncode != 0:
        return f"build failed (exit {r.returncode}: {r.stderr.strip()[-300:]}): numpy kernels"
    return "C extension built in place"


def skip(reason: str) -> int:
    log(f"skipped: no CUDA device ({reason})")
    print(json.dumps({"bench": BENCH, "figures": {}, "ratios": {}, "targets": TARGETS, "ok": None,
                      "skipped": f"no CUDA device: {reason}"}))
    return 0


def make_input(rank: int, n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    return (((i * 7 + rank * 13) % 17 - 8) * 0.5).astype(np.float64)


# -- the ranks --------------------------------------------------------------------------------------
def _setup_device(pg):
    import cupy as cp
    import torch

    ndev = torch.cuda.device_count()
    dev = pg.local_rank % ndev
    torch.cuda.set_device(dev)
    cp.cuda.Device(dev).use()
    return torch, cp, dev, ndev


def correctness_worker(pg):
    import hfreduce
    from hfreduce import ReduceOp

    torch, cp, dev, ndev = _setup_device(pg)
    W, r = pg.world_size, pg.rank
    bad: list[str] = []
    sizes = [1, 1001, 3 * CHUNK // 4 + 5, 4 << 20]
    for dtype in (torch.float32, torch.bfloat16):
        for n in sizes:
            want = sum(make_input(q, n) for q in range(W))
            for op in (ReduceOp.SUM, ReduceOp.AVG):
                x = torch.tensor(make_input(r, n), dtype=dtype, device=f"cuda:{dev}")
                hfreduce.allreduce(x, op=op)
                got = x.double().cpu().numpy()
                ref = want if op == ReduceOp.SUM else want / W
                tol = 0.0 if op == ReduceOp.SUM else (1e-2 if dtype == torch.bfloat16 else 1e-6)
                if not np.allclose(got, ref, rtol=tol, atol=tol):
                    err = float(np.max(np.abs(got - ref)))
                    bad.append(f"{dtype} n={n} {op.name}: max error {err}")
    # a cupy array, and several async operations in flight (complete in order)
    c = cp.asarray(make_input(r, 100_003).astype(np.float32))
    hfreduce.allreduce(c)
    if not np.array_equal(cp.asnumpy(c).astype(np.float64), sum(make_input(q, 100_003) for q in range(W))):
        bad.append("cupy float32 SUM")
    xs = [torch.tensor(make_input(r + k, 300_000 + k), dtype=torch.float32, device=f"cuda:{dev}") for k in range(4)]
    works = [hfreduce.allreduce(x, async_op=True) for x in xs]
    for k, (x, w) in enumerate(zip(xs, works, strict=True)):
        w.wait(120)
        if not np.array_equal(x.double().cpu().numpy(), sum(make_input(q + k, 300_000 + k) for q in range(W))):
            bad.append(f"async op {k}")
    return {"bad": bad, "device": dev, "ndev": ndev, "info": {k: v for k, v in pg.info().items()
                                                              if k in ("kernel", "device_backends")}}


def _timed(fn, reps: int, sync, barrier) -> list[float]:
    out = []
    for i in range(reps + 1):
        sync()
        barrier()
        t = time.perf_counter()
        fn(i)
        sync()
        out.append(time.perf_counter() - t)
    return out[1:]  # the first one warms up


def _speed_one(pg, mib, reps, dist, nccl, torch, cp, dev) -> dict:
    import hfreduce

    W = pg.world_size
    sync = torch.cuda.synchronize
    res: dict = {}
    n = (mib << 20) // 4
    x = torch.empty(n, dtype=torch.float32, device=f"cuda:{dev}")

    def correct() -> bool:
        return bool((x[:: max(1, n // 4096)] == W).all().item())

    # hfreduce.cuda: chunked, overlapped
    t = _timed(lambda i: (x.fill_(1.0), hfreduce.allreduce(x)), reps, sync, pg.barrier)
    res[f"hfreduce_cuda:{mib}"] = {"times": t, "ok": correct()}
    if not nccl:
        # no overlap: whole tensor D2H into pinned host memory, CPU allreduce, H2D. The host
        # buffer is in the arena (hfreduce's fastest host path: no copy in or out), pinned by us;
        # where /dev/shm is too small for it, torch's pinned memory (hfreduce then copies it in)
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 3 * W * x.nbytes:
            host = hfreduce.empty(n, np.float32)
            page = 4096
            reg = host.ctypes.data // page * page
            cp.cuda.runtime.hostRegister(reg, -(-(host.ctypes.data + host.nbytes - reg) // page) * page, 0)
            th = torch.from_numpy(host)
            where = "arena"
        else:
            th = torch.empty(n, dtype=torch.float32, pin_memory=True)
            host, reg, where = th, None, "torch pinned"
        try:
            phases: list[tuple[float, float, float]] = []

            def no_overlap(i):
                x.fill_(1.0)
                sync()
                t0 = time.perf_counter()
                th.copy_(x)
                t1 = time.perf_counter()
                hfreduce.allreduce(host)
                t2 = time.perf_counter()
                x.copy_(th)
                sync()
                phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

            t = _timed(no_overlap, reps, sync, pg.barrier)
            ph = phases[1:]
            res[f"no_overlap:{mib}"] = {"times": t, "ok": correct(), "d2h": [p[0] for p in ph],
                                        "cpu": [p[1] for p in ph], "h2d": [p[2] for p in ph], "host": where}
        finally:
            if reg is not None:
                cp.cuda.runtime.hostUnregister(reg)
            del th, host
    if dist is not None:
        name = "nccl" if nccl else "gloo_cuda"
        try:
            t = _timed(lambda i: (x.fill_(1.0), dist.all_reduce(x)), reps, sync, pg.barrier)
            res[f"{name}:{mib}"] = {"times": t, "ok": correct()}
        except Exception as exc:  # noqa: BLE001 - a row marked failed, the rest still runs
            res[f"{name}:{mib}"] = {"error": repr(exc)}
    return res


def speed_worker(pg, sizes, reps, gloo_port, nccl):
    torch, cp, dev, ndev = _setup_device(pg)
    W = pg.world_size
    res: dict = {}
    dist = None
    if gloo_port or nccl:
        import torch.distributed as dist

        dist.init_process_group("nccl" if nccl else "gloo", init_method=f"tcp://127.0.0.1:{gloo_port}",
                                rank=pg.rank, world_size=W, device_id=torch.device("cuda", dev) if nccl else None)
    for mib in sizes:
        res.update(_speed_one(pg, mib, reps, dist, nccl, torch, cp, dev))
        torch.cuda.empty_cache()
    if dist is not None:
        dist.destroy_process_group()
    return res


# -- the stand-in mode (no GPU): the engine's overlap, with copies simulated --------------------------
def standin_worker(pg, sizes, reps, bw):
    from hfreduce.device.standin import StandInDevice

    dev = StandInDevice(bandwidth=bw)
    res: dict = {}
    for mib in sizes:
        res.update(_standin_one(pg, dev, mib, reps))
    return res


def _standin_one(pg, dev, mib: int, reps: int) -> dict:
    import hfreduce

    W = pg.world_size
    n = (mib << 20) // 4
    want = float(W) ** (reps + 1)  # after reps + 1 allreduces of ones
    x = dev.array(np.ones(n, np.float32))
    t = _timed(lambda i: hfreduce.allreduce(x), reps, lambda: None, pg.barrier)
    res = {f"hfreduce_cuda:{mib}": {"times": t, "ok": bool(np.all(x.numpy()[:: max(1, n // 4096)] == want))}}
    host = hfreduce.empty(n, np.float32)
    y = dev.array(np.ones(n, np.float32))
    phases: list[tuple[float, float, float]] = []

    def no_overlap(i):
        t0 = time.perf_counter()
        y.copy_to_host(host)
        t1 = time.perf_counter()
        hfreduce.allreduce(host)
        t2 = time.perf_counter()
        y.copy_from_host(host)
        phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    t = _timed(no_overlap, reps, lambda: None, pg.barrier)
    ph = phases[1:]
    res[f"no_overlap:{mib}"] = {"times": t, "ok": bool(np.all(y.numpy()[:: max(1, n // 4096)] == want)),
                                "d2h": [p[0] for p in ph], "cpu": [p[1] for p in ph], "h2d": [p[2] for p in ph],
                                "host": "arena"}
    return res


def run_standin(args, sizes, reps) -> int:
    """Same rows and ratios as on a GPU, on the stand-in device: the copy engines are threads that
    take nbytes / bandwidth per copy. It measures the engine's overlap, not any GPU."""
    from hfreduce.testing import run_group

    bw = args.standin * 1e9
    log(f"STAND-IN MODE: no GPU; copies are simulated at {args.standin} GB/s per direction, "
        f"{args.ranks} ranks (this measures the pipeline's overlap, not a GPU)")
    speed = run_group(standin_worker, sizes, reps, bw, nodes=1, per_node=args.ranks,
                      env={"HFREDUCE_CHUNK_BYTES": str(CHUNK)}, timeout=300, group_timeout=120, cluster=False)
    speed = speed.values()[0]
    figures, ratios, ok = _summarize(speed, sizes, args.ranks)
    print(json.dumps({"bench": BENCH, "mode": "standin", "figures": figures, "ratios": ratios, "targets": TARGETS,
                      "ok": bool(ok)}))
    return 0


def _summarize(speed: dict, sizes, world: int) -> tuple[dict, dict, bool]:
    med = statistics.median
    figures: dict = {}
    ratios: dict = {}
    ok = True
    log(f"{'MiB':>5} {'row':<14} {'ms':>9} {'algbw GB/s':>11}  correct")
    for mib in sizes:
        hf, no = speed[f"hfreduce_cuda:{mib}"], speed[f"no_overlap:{mib}"]
        t_hf, t_no = med(hf["times"]), med(no["times"])
        d2h, cpu, h2d = med(no["d2h"]), med(no["cpu"]), med(no["h2d"])
        for name, t, row in (("overlapped", t_hf, hf), ("no overlap", t_no, no)):
            figures[f"{name.replace(' ', '_')}:{mib}"] = {"ms": round(t * 1e3, 2),
                                                          "algbw_GBps": round((mib << 20) / t / 1e9, 3),
                                                          "correct": row["ok"]}
            log(f"{mib:>5} {name:<14} {t * 1e3:>9.2f} {(mib << 20) / t / 1e9:>11.3f}  {row['ok']}")
            ok = ok and row["ok"]
        figures[f"no_overlap:{mib}"].update({"d2h_ms": round(d2h * 1e3, 2), "cpu_ms": round(cpu * 1e3, 2),
                                             "h2d_ms": round(h2d * 1e3, 2)})
        ratios[f"speedup_vs_no_overlap:{mib}"] = round(t_no / t_hf, 3)
        ratios[f"hidden_copy_fraction:{mib}"] = round(max(0.0, min(1.0, (t_no - t_hf) / (d2h + h2d))), 3)
        log(f"      D2H {d2h * 1e3:.1f} + CPU {cpu * 1e3:.1f} + H2D {h2d * 1e3:.1f} ms without overlap; "
            f"speed-up {ratios[f'speedup_vs_no_overlap:{mib}']}, copy time hidden "
            f"{ratios[f'hidden_copy_fraction:{mib}']}")
        ok = ok and ratios[f"speedup_vs_no_overlap:{mib}"] >= TARGETS["speedup_vs_no_overlap"] \
            and ratios[f"hidden_copy_fraction:{mib}"] >= TARGETS["hidden_copy_fraction"]
    return figures, ratios, ok


# -- main -------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", type=int, default=4, help="processes sharing the GPU(s)")
    ap.add_argument("--sizes", default=None, help="MiB, comma-separated (default 64,256; --quick: 64)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--standin", type=float, default=None, metavar="GBPS",
                    help="no GPU: run the same rows on the stand-in device, copies at GBPS per direction")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([64] if args.quick else [64, 256])
    reps = 3 if args.quick else 5
    start = time.monotonic()

    missing = []
    for mod in ("msgpack", "numpy"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        return skip(f"cannot run hfreduce here: {', '.join(missing)} not installed")
    if args.standin:
        return run_standin(args, sizes, reps)
    import hfreduce.cuda as hc

    if not hc.available():
        return skip(hc.unavailable_reason() or "unknown")
    try:
        import torch
    except ImportError:
        return skip("cupy sees a device but PyTorch is not installed (the bench reduces torch CUDA tensors)")
    ndev = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ndev == 0:
        return skip("cupy sees a device but torch.cuda does not (a CPU-only torch build?)")

    if not args.no_build:  # only where it will run: the ranks import the fresh build
        log(f"build: {build()}")
    from hfreduce.testing import free_port, run_group

    env = {"HFREDUCE_CHUNK_BYTES": str(CHUNK)}
    log(f"{ndev} GPU(s), {args.ranks} ranks sharing them; kernel: {hfreduce_kernel()}")
    corr = run_group(correctness_worker, nodes=1, per_node=args.ranks, env=env, timeout=180, group_timeout=60,
                     cluster=False).values()
    bad = [b for c in corr for b in c["bad"]]
    log(f"correctness (float32, bfloat16, SUM, AVG, cupy, async): {'ok' if not bad else bad}")
    log(f"backends: {corr[0]['info']}")

    speed = run_group(speed_worker, sizes, reps, free_port(), False, nodes=1, per_node=args.ranks, env=env,
                      timeout=300, group_timeout=120, cluster=False).values()[0]
    nccl_rows: dict = {}
    if ndev >= 2:
        nccl_rows = run_group(speed_worker, sizes, reps, free_port(), True, nodes=1, per_node=ndev, env=env,
                              timeout=300, group_timeout=120, cluster=False).values()[0]

    figures: dict = {}
    ratios: dict = {}
    ok = not bad
    med = statistics.median

    def fig(name: str, row: dict, world: int, mib: int) -> float | None:
        nonlocal ok
        if "error" in row:
            figures[name] = {"error": row["error"]}
            return None
        t = med(row["times"])
        nbytes = mib << 20
        figures[name] = {"ms": round(t * 1e3, 2), "algbw_GBps": round(nbytes / t / 1e9, 3),
                         "busbw_GBps": round(nbytes / t / 1e9 * 2 * (world - 1) / max(world, 1), 3),
                         "correct": row["ok"]}
        ok = ok and row["ok"]
        return t

    table = []
    for mib in sizes:
        t_hf = fig(f"hfreduce_cuda:{mib}", speed[f"hfreduce_cuda:{mib}"], args.ranks, mib)
        t_no = fig(f"no_overlap:{mib}", speed[f"no_overlap:{mib}"], args.ranks, mib)
        row = speed[f"no_overlap:{mib}"]
        d2h, cpu, h2d = med(row["d2h"]), med(row["cpu"]), med(row["h2d"])
        figures[f"no_overlap:{mib}"].update({"d2h_ms": round(d2h * 1e3, 2), "cpu_ms": round(cpu * 1e3, 2),
                                              "h2d_ms": round(h2d * 1e3, 2), "host_buffer": row["host"]})
        t_gl = fig(f"gloo_cuda:{mib}", speed.get(f"gloo_cuda:{mib}", {"error": "not run"}), args.ranks, mib)
        ratios[f"speedup_vs_no_overlap:{mib}"] = round(t_no / t_hf, 3)
        ratios[f"hidden_copy_fraction:{mib}"] = round(max(0.0, min(1.0, (t_no - t_hf) / (d2h + h2d))), 3)
        if t_gl:
            ratios[f"vs_gloo_cuda:{mib}"] = round(t_gl / t_hf, 3)
        ok = ok and ratios[f"speedup_vs_no_overlap:{mib}"] >= TARGETS["speedup_vs_no_overlap"] \
            and ratios[f"hidden_copy_fraction:{mib}"] >= TARGETS["hidden_copy_fraction"]
        table.append((mib, args.ranks, "hfreduce.cuda", figures[f"hfreduce_cuda:{mib}"]))
        table.append((mib, args.ranks, "no overlap", figures[f"no_overlap:{mib}"]))
        table.append((mib, args.ranks, "gloo (CUDA tensors)", figures[f"gloo_cuda:{mib}"]))
        if nccl_rows:
            t_h1 = fig(f"hfreduce_cuda_1perGPU:{mib}", nccl_rows[f"hfreduce_cuda:{mib}"], ndev, mib)
            t_nc = fig(f"nccl:{mib}", nccl_rows.get(f"nccl:{mib}", {"error": "not run"}), ndev, mib)
            if t_nc:
                ratios[f"vs_nccl:{mib}"] = round(t_nc / t_h1, 3)
            table.append((mib, ndev, "hfreduce.cuda, 1 rank/GPU", figures[f"hfreduce_cuda_1perGPU:{mib}"]))
            table.append((mib, ndev, "NCCL", figures[f"nccl:{mib}"]))
    if ndev < 2:
        figures["nccl"] = {"skipped": f"{ndev} GPU: NCCL refuses several ranks on one GPU"}

    log("")
    log(f"{'MiB':>5} {'ranks':>5}  {'row':<26} {'ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11}  correct")
    for mib, world, name, f in table:
        if "error" in f:
            log(f"{mib:>5} {world:>5}  {name:<26} failed: {f['error'][:60]}")
            continue
        extra = f"  (D2H {f['d2h_ms']} + CPU {f['cpu_ms']} + H2D {f['h2d_ms']} ms)" if "d2h_ms" in f else ""
        log(f"{mib:>5} {world:>5}  {name:<26} {f['ms']:>9} {f['algbw_GBps']:>11} {f['busbw_GBps']:>11}  "
            f"{f['correct']}{extra}")
    for k, v in ratios.items():
        log(f"  {k:<34} {v}")
    log(f"elapsed {time.monotonic() - start:.1f} s")
    print(json.dumps({"bench": BENCH, "figures": figures, "ratios": ratios, "targets": TARGETS, "ok": bool(ok),
                      "correctness_failures": bad}))
    return 0


def hfreduce_kernel() -> str:
    from hfreduce import kernels

    return f"{kernels.KERNEL} ({kernels.SIMD})"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
