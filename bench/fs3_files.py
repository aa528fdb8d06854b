"""fs3 as a file system: large files, metadata and checkpoints through the Python client and the
FUSE mount, each against a reference measured in the same run.

- read: a 1 GiB file read sequentially through ``fs3.open`` (client on n0, 3-replica chains on
  n1..n3) against a bare TCP stream of the same bytes (bench/_refs.py): target >= 0.7;
- mount read: the same file read with plain ``read`` calls through the fs3 mount, against a minimal
  pyfuse3 file system serving the same bytes from memory with the same mount options
  (bench/_fuse_memfs.py), the kernel's page cache dropped for the file before each read: >= 0.6;
- write: a 1 GiB single-file write through ``fs3.open(..., "wb")`` against the ideal chain (three
  bare relays, bench/_refs.py, each overwriting 64 cached files): >= 0.65. Shown beside it, not a
  target: the same relays writing every piece into a new file. On a machine whose memory was
  never touched (a fresh VM: each new page of the page cache costs a fault in the host), storing
  new bytes costs ~3 CPU s/GiB per replica in the kernel that overwriting cached files does not;
  fs3 stores a new file's chunks in new files, so this is the like-for-like reference;
- metadata: several client processes at once, each creating and closing files in its own
  directory, then stat-ing them (SQLite metadata store): create+close >= 3,000/s, stat >=
  10,000/s; create+close through the mount (several processes) >= 1,500/s;
- checkpoint: a 1 GiB state dict (fs3.checkpoint): the time the training loop is blocked by an
  asynchronous save <= 0.1 of a synchronous save; load >= 0.5 of the bare stream.

Each figure is the median of ``--trials`` trials; each throughput is paired with its reference run
right before it (the machine is shared: same-moment ratios hold, absolute figures drift).

    python bench/fs3_files.py [--quick] [--mib N] [--trials N] [--no-mount] [--only data|meta]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _refs import MiB, References  # noqa: E402

from deploy.local import LocalCluster, derived_cluster, wait_until  # noqa: E402
from fs3.fuse import MountError, run_mount, unmount  # noqa: E402
from fs3.fuse import unavailable as fuse_unavailable  # noqa: E402

FS3 = ["fs3.mgmtd", "fs3.storage", "fs3.meta"]
PIECE = 16 * MiB  # bytes per write/read call of the large-file phases


def _cluster_file(tmp: Path) -> Path:
    return derived_cluster(tmp / "bench.toml", FS3, fs3={"chunk_size": MiB, "gc_delay": 0.0})


# -- metadata workers (processes: the client is what is measured, with its own GIL) --------------

def _meta_worker(cf: str, wid: int, n: int, procs: int, barrier, out) -> None:
    """mdtest's file phases: create+close n files in its own directory, then stat n files another
    worker made (mdtest -N 1: nothing this client touched, each file once)."""
    import fs3

    fs = fs3.FileSystem(cf)
    try:
        d = f"/bench-meta/w{wid}"
        fs.makedirs(d, exist_ok=True)
        barrier.wait(60)
        t0 = time.perf_counter()
        for i in range(n):
            with fs.open(f"{d}/f{i}", "wb"):
                pass
        t1 = time.perf_counter()
        barrier.wait(60)
        other = f"/bench-meta/w{(wid + 1) % procs}"
        t2 = time.perf_counter()
        for i in range(n):
            fs.stat(f"{other}/f{i}")
        t3 = time.perf_counter()
        out.put((wid, t0, t1, t2, t3))
    finally:
        fs.close()


def _mount_create_worker(mnt: str, wid: int, n: int, barrier, out) -> None:
    d = Path(mnt) / "bench-mount" / f"w{wid}"
    d.mkdir(parents=True, exist_ok=True)
    barrier.wait(60)
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(d / f"f{i}", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.close(fd)
    out.put((wid, t0, time.perf_counter()))


def _spread(ctx, target, args_of, procs: int) -> list[tuple]:
    """Run ``procs`` workers started together; their result tuples."""
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    ps = [ctx.Process(target=target, args=(*args_of(w), barrier, out), daemon=True) for w in range(procs)]
    for p in ps:
        p.start()
    res = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join(30)
    return res


def meta_rates(ctx, cf: Path, procs: int, n: int) -> tuple[float, float]:
    res = _spread(ctx, _meta_worker, lambda w: (str(cf), w, n, procs), procs)
    create = procs * n / (max(r[2] for r in res) - min(r[1] for r in res))
    stat = procs * n / (max(r[4] for r in res) - min(r[3] for r in res))
    return create, stat


def mount_create_rate(ctx, mnt: Path, procs: int, n: int) -> float:
    res = _spread(ctx, _mount_create_worker, lambda w: (str(mnt), w, n), procs)
    return procs * n / (max(r[2] for r in res) - min(r[1] for r in res))


# -- large files ----------------------------------------------------------------------------------

def client_write(fs, path: str, data: memoryview) -> float:
    t0 = time.perf_counter()
    with fs.open(path, "wb") as f:
        for off in range(0, len(data), PIECE):
            f.write(data[off:off + PIECE])
    return len(data) / (time.perf_counter() - t0)


def client_read(fs, path: str, size: int, buf: bytearray) -> float:
    view = memoryview(buf)
    got = 0
    t0 = time.perf_counter()
    with fs.open(path, "rb") as f:
        while True:
            k = f.readinto(view)
            if not k:
                break
            got += k
    dt = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"read {got} bytes of {size}")
    return size / dt


def posix_read(path: Path, buf: bytearray) -> float:
    """Sequential 1 MiB reads with the file's pages dropped from the page cache first."""
    view = memoryview(buf)[:MiB]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        got = 0
        t0 = time.perf_counter()
        while True:
            k = os.readv(fd, [view])
            if not k:
                break
            got += k
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return got / dt


def _wait_mounted(mnt: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the mount process for {mnt} exited with {proc.returncode}")
        return os.path.ismount(mnt)

    wait_until(up, timeout, f"{mnt} to be mounted", poll=0.1, error=RuntimeError)


def _stop_memfs(mnt: Path, proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


# -- checkpoint -----------------------------------------------------------------------------------

def checkpoint_phase(fs, nbytes: int, trials: int, refs: References, ref_chunks: list[bytes]) -> dict:
    import torch

    from fs3 import checkpoint

    n = 16
    per = nbytes // n // 4
    state = {"model": {f"layer{i}.weight": torch.randn(per) for i in range(n)}, "step": 7}
    ck = checkpoint.Checkpointer()
    out: dict[str, list[float]] = {"ckpt_sync_s": [], "ckpt_blocked_s": [], "ckpt_load": [], "bare_load_ref": []}
    fs.makedirs("/bench-ckpt", exist_ok=True)
    for _t in range(trials):
        t0 = time.perf_counter()
        ck.save_sync(state, "/bench-ckpt/sync", fs=fs)
        out["ckpt_sync_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        h = ck.save(state, "/bench-ckpt/async", fs=fs)
        out["ckpt_blocked_s"].append(time.perf_counter() - t0)
        h.wait(600)
        out["bare_load_ref"].append(refs.bare_stream(ref_chunks, repeat=1))
        t0 = time.perf_counter()
        back = ck.load("/bench-ckpt/async", fs=fs)
        out["ckpt_load"].append(n * per * 4 / (time.perf_counter() - t0))
        if not torch.equal(back["model"]["layer3.weight"], state["model"]["layer3.weight"]):
            raise RuntimeError("the checkpoint loaded back different tensors")
        del back
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 60 s)")
    ap.add_argument("--mib", type=int, default=None, help="large-file size in MiB (default 1024, quick 128)")
    ap.add_argument("--trials", type=int, default=None, help="trials per figure (default 3, quick 1)")
    ap.add_argument("--procs", type=int, default=4, help="concurrent metadata clients")
    ap.add_argument("--files", type=int, default=None, help="files per metadata client (default 1000, quick 200)")
    ap.add_argument("--no-mount", action="store_true", help="skip the FUSE phases")
    ap.add_argument("--only", choices=("data", "meta"), default=None,
                    help="data: the read, write, checkpoint and mount-read phases; meta: the metadata phases")
    args = ap.parse_args()
    nmib = args.mib or (128 if args.quick else 1024)
    trials = args.trials or (1 if args.quick else 3)
    nfiles = args.files or (200 if args.quick else 1000)
    total = nmib * MiB
    rng = random.Random(0)
    uniq = [rng.randbytes(MiB) for _ in range(32)]
    ref_chunks = [uniq[i % 32] for i in range(nmib)]
    data = memoryview(b"".join(ref_chunks))
    buf = bytearray(PIECE)

    tmp = Path(tempfile.mkdtemp(prefix="fs3files-"))
    cf = _cluster_file(tmp)
    ctx = mp.get_context("spawn")
    why_no_mount = "--no-mount" if args.no_mount else fuse_unavailable()
    fig: dict[str, list[float]] = {}
    pair: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        fig.setdefault(k, []).append(v)

    refs = References()
    lc = LocalCluster(cf, tmp / "run", ports="auto", services=FS3)
    mnt, mem_mnt = tmp / "mnt", tmp / "memfs"
    mounted = False
    mem_p = None
    try:
        lc.up()
        import fs3

        fs = fs3.FileSystem(lc.cluster_file)
        fs.makedirs("/bench", exist_ok=True)
        client_write(fs, "/bench/warm", data[:8 * MiB])  # every server reached once
        for t in range(trials if args.only != "meta" else 0):
            ideal = refs.ideal_chain(ref_chunks)
            add("ideal_chain", ideal)
            # the same relays writing every piece into a new file, as a store must for new data:
            # shown for the explanation (fs3 writes new files; the target is against the above)
            fresh = refs.ideal_chain(ref_chunks, fresh=True)
            add("ideal_chain_new_files", fresh)
            w = client_write(fs, f"/bench/big{t}", data)
            add("client_write", w)
            pair.setdefault("client_write_vs_ideal_chain", []).append(w / ideal)
            pair.setdefault("client_write_vs_ideal_chain_new_files", []).append(w / fresh)
            bare = refs.bare_stream(ref_chunks, repeat=1)
            add("bare_tcp", bare)
            r = client_read(fs, f"/bench/big{t}", total, buf)
            add("client_read", r)
            pair.setdefault("client_read_vs_bare", []).append(r / bare)
            if t:
                fs.remove(f"/bench/big{t - 1}")
        for _t in range(trials if args.only != "data" else 0):
            fs.rmtree("/bench-meta") if fs.exists("/bench-meta") else None
            c, s = meta_rates(ctx, lc.cluster_file, args.procs, nfiles)
            add("meta_create_close_per_s", c)
            add("meta_stat_per_s", s)
        if args.only != "meta":
            for k, v in checkpoint_phase(fs, total, trials, refs, ref_chunks).items():
                fig[k] = v
            pair["ckpt_blocked_vs_sync"] = [b / s for b, s in zip(fig["ckpt_blocked_s"], fig["ckpt_sync_s"],
                                                                  strict=True)]
            pair["ckpt_load_vs_bare"] = [a / b for a, b in zip(fig["ckpt_load"], fig["bare_load_ref"], strict=True)]

        if why_no_mount is None:
            mnt.mkdir()
            mem_mnt.mkdir()
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            run_mount(lc.cluster_file, mnt, foreground=False, options={})
            mounted = True
            mem_p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_fuse_memfs.py"), str(mem_mnt),
                                      "--size", str(total)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(tmp / "memfs.log", "wb"))
            _wait_mounted(mem_mnt, mem_p)
            last = f"big{trials - 1}"
            for _t in range(trials):
                if args.only != "meta":
                    m = posix_read(mem_mnt / "data", buf)
                    add("memfs_read", m)
                    r = posix_read(mnt / "bench" / last, buf)
                    add("mount_read", r)
                    pair.setdefault("mount_read_vs_memfs", []).append(r / m)
                if args.only != "data":
                    add("mount_create_close_per_s", mount_create_rate(ctx, mnt, args.procs, nfiles))
        fs.close()
    finally:
        if mounted:
            try:
                unmount(mnt, timeout=30.0)
            except MountError as exc:  # a mount that died already: the phases' error is the one to see
                print(f"unmounting {mnt}: {exc}", file=sys.stderr)
        _stop_memfs(mem_mnt, mem_p)
        lc.down()
        refs.close()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in fig.items()}
    ratios = {k: statistics.median(v) for k, v in pair.items()}
    for k in ("meta_create_close_per_s", "meta_stat_per_s", "mount_create_close_per_s"):
        if k in med:
            ratios[k] = med[k]
    targets = {"client_read_vs_bare": 0.7, "client_write_vs_ideal_chain": 0.65, "meta_create_close_per_s": 3000,
               "meta_stat_per_s": 10000, "ckpt_load_vs_bare": 0.5}
    if why_no_mount is None:
        targets.update(mount_read_vs_memfs=0.6, mount_create_close_per_s=1500)
    targets = {k: v for k, v in targets.items() if k in ratios}  # the phases run (--only)
    # the blocked share is an upper bound: lower is better
    ok = all(ratios[k] >= v for k, v in targets.items()) and ratios.get("ckpt_blocked_vs_sync", 0) <= 0.1
    print(f"fs3 files: {nmib} MiB file, {trials} trial(s) (median), {args.procs} metadata clients x {nfiles} files, "
          f"1 MiB chunks on 3-replica chains")
    for k in ("bare_tcp", "client_read", "memfs_read", "mount_read", "ideal_chain", "ideal_chain_new_files",
              "client_write", "ckpt_load"):
        if k in med:
            print(f"{k:<28}{med[k] / 1e9:>8.3f} GB/s")
    for k in ("meta_create_close_per_s", "meta_stat_per_s", "mount_create_close_per_s"):
        if k in med:
            print(f"{k:<28}{med[k]:>10.0f}")
    if "ckpt_sync_s" in med:
        print(f"{'ckpt_sync_s':<28}{med['ckpt_sync_s']:>10.3f}\n{'ckpt_blocked_s':<28}{med['ckpt_blocked_s']:>10.3f}")
    for k, v in targets.items():
        print(f"target {k:<30} >= {v:g}: {ratios[k]:.3g} {'ok' if ratios[k] >= v else 'MISSED'}")
    if "ckpt_blocked_vs_sync" in ratios:
        b = ratios["ckpt_blocked_vs_sync"]
        print(f"target {'ckpt_blocked_vs_sync':<30} <= 0.1: {b:.3g} {'ok' if b <= 0.1 else 'MISSED'}")
    if "client_write_vs_ideal_chain_new_files" in ratios:
        print(f"write against the ideal chain writing new files (as fs3 must): "
              f"{ratios['client_write_vs_ideal_chain_new_files']:.3g} (not a target; see the docstring)")
    if why_no_mount:
        print(f"mount phases skipped: {why_no_mount}")
    if "ckpt_blocked_vs_sync" in ratios:
        targets["ckpt_blocked_vs_sync"] = 0.1
    print(json.dumps({"bench": "fs3_files", "figures": {k: round(v, 4) for k, v in med.items()},
                      "ratios": {k: round(v, 4) for k, v in ratios.items()}, "targets": targets, "ok": ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
