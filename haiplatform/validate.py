"""The node validator: checks that a node is fit for jobs (``python -m haiplatform.validate``).

Fire-Flyer validates every node weekly and takes the failing ones out of the scheduler. Each check
here is a function that measures one thing and returns a :class:`CheckResult` (name, ok, value,
unit, baseline, message):

============  =====================================================================================
cpu_gemm      numpy float32 matmul, GFLOP/s, against the node's own baseline
mem_bw        a large ``np.copyto``, GB/s (bytes read + written), against the baseline
disk_write    an fsync'd file in the node's state directory, MB/s, against the baseline
disk_read     the same file read back (after dropping it from the page cache), MB/s, baseline; the
              bytes must match
clock         offset from the API server's clock, within ``clock_max`` seconds
links         ``network.probe`` to the peers in the node's leaf: bandwidth (the slowest, baseline)
              and latency
allreduce     an hfreduce allreduce of 2 processes on this node: the result must be right
gpu_health    NVML (pynvml): Xid events, uncorrected ECC errors, retired pages pending, hardware
              slowdown, NVLink links down; skipped without pynvml or GPUs
gpu_gemm      torch.cuda bf16 matmul, TFLOP/s, against the baseline; skipped without a GPU
============  =====================================================================================

A check that cannot run here is *skipped* with the reason (``ok`` stays true): never a made-up
result. [Note: the node's own baseline] Machines differ, so a measured check is compared with
what this node measured before: the median of its last :data:`KEEP` passing values, kept in
``STATE_DIR/validate-NODE.json``. The first run sets it (and passes); a value below ``fraction``
(default 0.5) of the baseline fails, and failing values never enter the baseline.

The agent (:class:`NodeValidation`) runs the validator at start (the node is drained by the
validator until it passes, so it takes no job before), on a schedule and when an admin asks
(``hai validate``), only while no job runs on the node, and reports each run to the API, which
keeps it and drains or returns the node (docs/validator.md).

[Note: the test hook] Checks named in ``$HAI_VALIDATE_FAIL`` (the agent service's environment) or
in the file ``STATE_DIR/validate-fail-NODE`` (comma or line separated; honoured only when this
account or root owns it and no one else may write it) fail after measuring, with "injected
failure" in their message. Only the node's admin can set either: it exists to test the drain loop.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import stat
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["CheckResult", "Sizes", "Context", "CHECKS", "BASELINED", "KEEP", "START_SKIP", "baseline_of", "judge",
           "update_history", "summarize", "injected", "run_checks", "record_run", "NodeValidation", "main"]

log = logging.getLogger(__name__)

#: every check, in the order they run
CHECKS = ("cpu_gemm", "mem_bw", "disk_write", "disk_read", "clock", "links", "allreduce", "gpu_health", "gpu_gemm")
#: the checks compared with the node's own baseline
BASELINED = frozenset({"cpu_gemm", "mem_bw", "disk_write", "disk_read", "links", "gpu_gemm"})
#: passing values kept per check for the baseline
KEEP = 20
#: the test hook's variable
FAIL_ENV = "HAI_VALIDATE_FAIL"
#: [Note: a cheaper start-up run] Checks the agent's start-up run skips, with why. The allreduce
#: check starts 2 Python processes that import hfreduce and numpy: about 2 s of the start-up run
#: on a loaded 2-core machine (4 agents at once), more than every other check together, and every
#: node waits for it before taking a job. It tests software the node shares with every other
#: node, not the node's hardware, so the start-up run skips it (said, never made up); the
#: scheduled and requested runs check it. The measured checks keep their sizes at start, so their
#: values stay comparable with the node's baseline.
START_SKIP = {"allreduce": "at agent start (2 processes: the scheduled and requested runs check it)"}


@dataclass
class CheckResult:
    """One check's outcome. ``value`` is in ``unit``; ``baseline`` is what it was compared with."""

    name: str
    ok: bool
    value: float | None = None
    unit: str = ""
    baseline: float | None = None
    message: str = ""
    skipped: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _skip(name: str, why: str) -> CheckResult:
    return CheckResult(name, True, message=f"skipped: {why}", skipped=True)


@dataclass
class Sizes:
    """How much each check does (``[haiplatform] validate_sizes``), and the thresholds."""

    gemm_n: int = 384            # cpu_gemm: n x n float32
    mem_mib: int = 64            # mem_bw: bytes copied
    disk_mib: int = 16           # disk_*: file size
    probe_mib: int = 4           # links: message size
    allreduce_kib: int = 1024    # allreduce: buffer size
    gpu_gemm_n: int = 4096       # gpu_gemm: n x n bf16
    reps: int = 3                # timed repetitions (the best counts), at least
    min_time: float = 0.15       # ... and at least this many seconds of them
    fraction: float = 0.5        # a measured check fails below this fraction of its baseline
    clock_max: float = 1.0       # clock: largest offset from the API server (s)
    timeout: float = 60.0        # allreduce and link probes give up after this (s)

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "validate_sizes") -> Sizes:
        """Defaults overridden by ``d``; ValueError names an unknown key or a bad value."""
        known = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in (d or {}).items():
            if k not in known:
                raise ValueError(f"{where}.{k}: unknown key (known: {', '.join(known)})")
            want = float if known[k].type == "float" else int
            if isinstance(v, bool) or not isinstance(v, int | float) or (want is int and not isinstance(v, int)):
                raise ValueError(f"{where}.{k}: expected {want.__name__}, got {v!r}")
            if not v > 0 or (k == "fraction" and v > 1):
                raise ValueError(f"{where}.{k}: expected a positive number" + (" up to 1" if k == "fraction" else "")
                                 + f", got {v!r}")
            kw[k] = want(v)
        return cls(**kw)


# -- the baseline (pure) ----------------------------------------------------------------------------

def baseline_of(history: list[float]) -> float | None:
    """The baseline of a check: the median of its last KEEP passing values (None: none yet)."""
    vals = [v for v in history[-KEEP:] if v is not None and v > 0]
    return statistics.median(vals) if vals else None


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def judge(r: CheckResult, history: list[float], fraction: float) -> CheckResult:
    """Compare a measured result with its baseline: below ``fraction`` of it fails (the first run passes)."""
    if r.skipped or not r.ok or r.value is None:
        return r
    base = baseline_of(history)
    r.baseline = base
    if base is not None and r.value < fraction * base:
        r.ok = False
        r.message = (f"{r.name} {_num(r.value)} {r.unit} < {fraction:.0%} of baseline {_num(base)}"
                     + (f" ({r.message})" if r.message else ""))
    elif base is None:
        r.message = r.message or "first run: sets the baseline"
    return r


def update_history(hist: dict[str, list[float]], results: list[CheckResult]) -> dict[str, list[float]]:
    """The histories with this run's passing measured values added (the last KEEP of each)."""
    out = {k: list(v) for k, v in hist.items()}
    for r in results:
        if r.name in BASELINED and r.ok and not r.skipped and r.value is not None and r.value > 0:
            out[r.name] = (out.get(r.name, []) + [r.value])[-KEEP:]
    return out


def summarize(results: list[CheckResult]) -> str:
    """One line: the failed checks with their numbers ("validator: ..."), else what passed."""
    failed = [r for r in results if not r.ok]
    if failed:
        return "validator: " + "; ".join(r.message if r.message.startswith(r.name) else
                                        f"{r.name} {r.message}" for r in failed)
    skipped = sum(r.skipped for r in results)
    return f"ok: {len(results) - skipped} passed" + (f", {skipped} skipped" if skipped else "")


def injected(state_dir: Path | None, node: str | None, env: dict | None = None) -> set[str]:
    """The checks the test hook makes fail (see the note at the top); an unsafe file is ignored."""
    env = os.environ if env is None else env
    names = set(_split(env.get(FAIL_ENV, "")))
    if state_dir is not None and node:
        path = Path(state_dir) / f"validate-fail-{node}"
        try:
            st = os.lstat(path)
        except OSError:
            return names
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            log.warning("ignoring %s: not a plain file owned by this account or root, writable by it only", path)
            return names
        names |= set(_split(path.read_text()[:4096]))
    return names


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.replace("\n", ",").split(",") if x.strip()]


# -- the checks ---------------------------------------------------------------------------------------

def _best(fn: Callable[[], None], reps: int, least: float = 0.15, most: int = 50) -> float:
    """The best time of ``fn``: at least ``reps`` timed calls and at least ``least`` seconds of them (at
    most ``most`` calls). [Note: best of many] On a shared machine a short kernel is often descheduled;
    its best time over a few hundred milliseconds is what the hardware can do."""
    fn()  # warm: caches, page faults, lazy initialisation
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(1, reps) or (time.perf_counter() - start < least and len(times) < most):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def check_cpu_gemm(n: int = 384, reps: int = 3, min_time: float = 0.15) -> CheckResult:
    """numpy float32 matmul of n x n matrices: GFLOP/s (2 n^3 flops each)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    t = _best(lambda: np.matmul(a, b, out=out), reps, min_time)
    if not np.isfinite(out).all():
        return CheckResult("cpu_gemm", False, message="cpu_gemm: the product holds NaN or infinity")
    return CheckResult("cpu_gemm", True, round(2 * n**3 / t / 1e9, 2), "GFLOP/s")


def check_mem_bw(mib: int = 64, reps: int = 3, min_time: float = 0.15) -> CheckResult:
    """A copy of ``mib`` MiB between two arrays: GB/s of bytes read plus written."""
    import numpy as np

    src = np.ones(mib << 18, dtype=np.float32)
    dst = np.empty_like(src)
    t = _best(lambda: np.copyto(dst, src), reps, min_time)
    if dst[-1] != 1.0 or dst[0] != 1.0:
        return CheckResult("mem_bw", False, message="mem_bw: the copy differs from its source")
    return CheckResult("mem_bw", True, round(2 * src.nbytes / t / 1e9, 2), "GB/s")


def check_disk(directory: Path, mib: int = 16) -> list[CheckResult]:
    """Write ``mib`` MiB to a file in ``directory`` and fsync it, drop it from the page cache, read it
    back: MB/s each way; the bytes read must be those written. The file is removed."""
    directory = Path(directory)
    path = directory / f".validate-disk-{os.getpid()}-{threading.get_ident()}"
    block = os.urandom(1 << 20)
    try:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(mib):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        tw = time.perf_counter() - t0
        fd = os.open(path, os.O_RDONLY)
        try:
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read the disk, not the page cache
            t0 = time.perf_counter()
            good = True
            for _ in range(mib):
                good &= os.read(fd, 1 << 20) == block
            tr = time.perf_counter() - t0
        finally:
            os.close(fd)
    except OSError as exc:
        msg = f"cannot write and read {path}: {exc}"
        return [CheckResult("disk_write", False, message=f"disk_write: {msg}"),
                CheckResult("disk_read", False, message=f"disk_read: {msg}")]
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    size = mib * (1 << 20) / 1e6
    read = CheckResult("disk_read", True, round(size / tr, 1), "MB/s") if good else \
        CheckResult("disk_read", False, message=f"disk_read: the bytes read back from {directory} differ")
    return [CheckResult("disk_write", True, round(size / tw, 1), "MB/s"), read]


def clock_result(offset: float, uncertainty: float, bound: float) -> CheckResult:
    """The clock check from a measured offset (s, server minus local) and its uncertainty (half the round trip)."""
    ok = abs(offset) - uncertainty <= bound
    msg = f"offset {offset * 1e3:+.1f} ms (+/- {uncertainty * 1e3:.1f} ms)"
    if not ok:
        msg = f"clock {offset:+.3f} s from the API server's > {bound:g} s ({msg})"
    return CheckResult("clock", ok, round(offset, 6), "s", message=msg)


def check_clock(server_now: Callable[[], float] | None, bound: float = 1.0) -> CheckResult:
    """This clock against the API server's: the best of 3 round trips."""
    if server_now is None:
        return _skip("clock", "no API server to compare with")
    best = None
    for _ in range(3):
        t0 = time.time()
        try:
            now = float(server_now())
        except Exception as exc:  # noqa: BLE001 - any failure to ask is the check's failure
            return CheckResult("clock", False, message=f"clock: cannot read the API server's time: {exc}")
        t1 = time.time()
        cand = (now - (t0 + t1) / 2, (t1 - t0) / 2)
        if best is None or cand[1] < best[1]:
            best = cand
    return clock_result(*best, bound)


def check_links(cluster: Any, node: str | None, mib: int = 4, reps: int = 2) -> CheckResult:
    """Bandwidth and latency to each peer in the node's leaf through the peers' probe responders.

    The value is the slowest link (GB/s). An unreachable peer is named; the check fails when a leaf
    of two or more peers cannot be reached at all (with one peer, who is at fault is unknown)."""
    if cluster is None or node is None:
        return _skip("links", "no cluster description")
    from network.auth import load_cluster_key
    from network.errors import NetworkError
    from network.probe import DEFAULT_PORT, MODULE, measure_link

    me = cluster.node(node)
    peers = [n for name, n in cluster.nodes.items() if n.leaf == me.leaf and name != node]
    if not peers:
        return _skip("links", f"no other node in leaf {me.leaf}")
    svc = cluster.service(MODULE)
    if svc is None:
        return _skip("links", f"no {MODULE} service in the cluster description")
    port = svc.port or DEFAULT_PORT
    try:
        cred = load_cluster_key(cluster)
    except Exception as exc:  # noqa: BLE001
        return _skip("links", f"no cluster key: {exc}")
    speeds, lats, down = [], [], []
    for p in peers:
        try:
            r = measure_link(me.address, p.address, port, mib << 20, reps, 5, node, p.name, credential=cred)
        except (NetworkError, OSError) as exc:
            down.append(f"{p.name} ({exc})"[:120])
            continue
        speeds.append((r.gbps_best, p.name))
        lats.append(r.latency_us)
    if not speeds:
        msg = f"no peer of leaf {me.leaf} answers: {'; '.join(down)}"
        if len(peers) >= 2:
            return CheckResult("links", False, message=f"links: {msg}")
        return _skip("links", msg)
    slow, who = min(speeds)
    msg = f"slowest {who}, latency {statistics.median(lats):.0f} us" + (f"; unreachable: {'; '.join(down)}"
                                                                       if down else "")
    return CheckResult("links", True, round(slow, 3), "GB/s", message=msg)


def _allreduce_rank(pg, n: int) -> bool:
    """One rank of the allreduce check: rank r contributes r + 1 everywhere; the sum is known."""
    import numpy as np

    buf = np.full(n, pg.rank + 1, dtype=np.float32)
    pg.allreduce(buf)
    want = pg.world_size * (pg.world_size + 1) / 2
    return bool((buf == want).all())


def check_allreduce(kib: int = 1024, timeout: float = 60.0) -> CheckResult:
    """An hfreduce allreduce between 2 processes on this node (their shared-memory path): right result."""
    try:
        from hfreduce.testing import run_group
    except ImportError as exc:
        return _skip("allreduce", f"hfreduce cannot load: {exc}")
    n = max(1, (kib << 10) // 4)
    t0 = time.perf_counter()
    run = run_group(_allreduce_rank, n, nodes=1, per_node=2, cluster=False, timeout=timeout,
                    group_timeout=min(timeout, 30.0))
    dt = time.perf_counter() - t0
    bad = [r for r in run.results if r.error is not None or r.value is not True]
    if bad:
        r = bad[0]
        why = f"{r.error_type}: {r.error}" if r.error is not None else "wrong result"
        return CheckResult("allreduce", False, message=f"allreduce: rank {r.rank}: {why}"[:300])
    return CheckResult("allreduce", True, round(dt, 3), "s", message=f"{kib} KiB on 2 processes, right result")


def check_gpu_health() -> CheckResult:
    """Every GPU through NVML: Xid events (watched for a moment), uncorrected ECC errors, retired
    pages pending, hardware slowdown, and NVLink links down where others are up."""
    try:
        import pynvml
    except ImportError:
        return _skip("gpu_health", "no pynvml module (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver
        return _skip("gpu_health", f"NVML does not start: {exc}")
    try:
        n = pynvml.nvmlDeviceGetCount()
        if n == 0:
            return _skip("gpu_health", "no GPU")
        problems, notes = [], []
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        problems += _xids(pynvml, handles)
        links = []
        for i, h in enumerate(handles):
            problems += [f"GPU {i}: {p}" for p in _gpu_problems(pynvml, h)]
            links.append(_nvlinks_up(pynvml, h))
        known = [x for x in links if x is not None]
        if known and max(known) > 0 and min(known) < max(known):
            problems.append("NVLink links up per GPU differ: " + ", ".join(f"GPU {i}: {x}" for i, x in
                                                                        enumerate(links)))
        if known:
            notes.append(f"NVLink up {known}")
        if problems:
            return CheckResult("gpu_health", False, float(len(problems)), "problems",
                               message="gpu_health: " + "; ".join(problems)[:400])
        return CheckResult("gpu_health", True, float(n), "GPUs", message=f"{n} GPUs healthy" +
                           (f", {'; '.join(notes)}" if notes else ""))
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _xids(pynvml, handles: list, wait_ms: int = 200) -> list[str]:
    """Xid events raised while we watch (NVML reports events after registration only)."""
    try:
        es = pynvml.nvmlEventSetCreate()
    except Exception:  # noqa: BLE001
        return []
    out = []
    try:
        for h in handles:
            with contextlib.suppress(Exception):
                pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, es)
        deadline = time.monotonic() + wait_ms / 1000
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = pynvml.nvmlEventSetWait(es, max(1, int(left * 1000)))
            except Exception:  # noqa: BLE001 - a timeout raises
                break
            out.append(f"Xid {ev.eventData}")
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlEventSetFree(es)
    return out


def _gpu_problems(pynvml, h) -> list[str]:
    out = []
    with contextlib.suppress(Exception):  # not every GPU has ECC
        ecc = pynvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        if ecc:
            out.append(f"{ecc} uncorrected ECC errors")
    with contextlib.suppress(Exception):
        if pynvml.nvmlDeviceGetRetiredPagesPendingStatus(h):
            out.append("retired pages pending (reset the GPU)")
    with contextlib.suppress(Exception):
        reasons = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)
        if reasons & pynvml.nvmlClocksThrottleReasonHwSlowdown:
            out.append("hardware slowdown (clocks throttled)")
    return out


def _nvlinks_up(pynvml, h) -> int | None:
    """NVLink links up on one GPU (None: no NVLink)."""
    up, seen = 0, False
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            up += pynvml.nvmlDeviceGetNvLinkState(h, link) == pynvml.NVML_FEATURE_ENABLED
            seen = True
        except Exception:  # noqa: BLE001 - not supported / no such link
            continue
    return up if seen else None


def check_gpu_gemm(n: int = 4096, reps: int = 3, timeout: float = 60.0) -> CheckResult:
    """A bf16 matmul on each GPU through torch.cuda: the slowest GPU's TFLOP/s.

    [Note: a child process] It runs in a child: CUDA would otherwise keep a context (hundreds of MiB
    of every GPU's memory) and torch in the agent for its whole life."""
    if not Path("/dev/nvidiactl").exists():
        return _skip("gpu_gemm", "no CUDA GPU (no /dev/nvidiactl)")
    import subprocess

    code = ("import json, sys; from haiplatform.validate import gpu_gemm_here as f; "
            "print(json.dumps(f(int(sys.argv[1]), int(sys.argv[2])).to_dict()))")
    try:
        p = subprocess.run([sys.executable, "-c", code, str(n), str(reps)], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return CheckResult("gpu_gemm", False, message=f"gpu_gemm: no result within {timeout:g} s")
    try:
        return CheckResult(**json.loads(p.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError):
        return CheckResult("gpu_gemm", False, message=f"gpu_gemm: the check failed (exit code {p.returncode}): "
                                                     f"{p.stderr.strip()[-300:]}")


def gpu_gemm_here(n: int, reps: int) -> CheckResult:
    """The GPU GEMM in this process (see :func:`check_gpu_gemm`)."""
    try:
        import torch
    except ImportError:
        return _skip("gpu_gemm", "no torch")
    if not torch.cuda.is_available():
        return _skip("gpu_gemm", "no CUDA GPU (torch.cuda)")
    speeds = []
    for i in range(torch.cuda.device_count()):
        dev = torch.device("cuda", i)
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)

        def mm(a=a, b=b, dev=dev):
            a @ b
            torch.cuda.synchronize(dev)
        t = _best(mm, reps)
        c = a[:64].float() @ b[:, :64].float()
        if not torch.isfinite(c).all():
            return CheckResult("gpu_gemm", False, message=f"gpu_gemm: GPU {i}: the product holds NaN or infinity")
        speeds.append((2 * n**3 / t / 1e12, i))
        del a, b
    slow, i = min(speeds)
    return CheckResult("gpu_gemm", True, round(slow, 2), "TFLOP/s", message=f"{len(speeds)} GPUs, slowest GPU {i}")


# -- a run ----------------------------------------------------------------------------------------------

@dataclass
class Context:
    """What one run needs: where it runs and what it compares with."""

    node: str | None = None
    cluster: Any = None                              # network.topology.Cluster (links)
    state_dir: Path | None = None                    # disk check, baseline file, test hook file
    server_now: Callable[[], float] | None = None    # the API server's clock (clock check)
    sizes: Sizes = field(default_factory=Sizes)
    only: frozenset[str] | None = None               # run only these checks (None: all)
    skip: dict[str, str] = field(default_factory=dict)  # checks skipped this run -> why

    @property
    def baseline_file(self) -> Path | None:
        if self.state_dir is None:
            return None
        return Path(self.state_dir) / f"validate-{self.node or 'local'}.json"


def _load_state(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_state(path: Path | None, data: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not keep the validator's baselines in %s: %s", path, exc)


def _measure(ctx: Context) -> list[CheckResult]:
    s = ctx.sizes

    def want(name: str) -> bool:
        return ctx.only is None or name in ctx.only
    out: list[CheckResult] = []
    steps: list[tuple[tuple[str, ...], Callable[[], list[CheckResult] | CheckResult]]] = [
        (("cpu_gemm",), lambda: check_cpu_gemm(s.gemm_n, s.reps, s.min_time)),
        (("mem_bw",), lambda: check_mem_bw(s.mem_mib, s.reps, s.min_time)),
        (("disk_write", "disk_read"), lambda: check_disk(ctx.state_dir or Path.cwd(), s.disk_mib)),
        (("clock",), lambda: check_clock(ctx.server_now, s.clock_max)),
        (("links",), lambda: check_links(ctx.cluster, ctx.node, s.probe_mib)),
        (("allreduce",), lambda: check_allreduce(s.allreduce_kib, s.timeout)),
        (("gpu_health",), check_gpu_health),
        (("gpu_gemm",), lambda: check_gpu_gemm(s.gpu_gemm_n, s.reps, s.timeout)),
    ]
    for names, fn in steps:
        if not any(want(n) for n in names):
            continue
        if all(n in ctx.skip for n in names):
            out += [_skip(n, ctx.skip[n]) for n in names if want(n)]
            continue
        try:
            got = fn()
        except Exception as exc:  # noqa: BLE001 - a check that crashes fails, with why
            log.exception("check %s crashed", names[0])
            got = [CheckResult(n, False, message=f"{n}: the check crashed: {type(exc).__name__}: {exc}"[:300])
                   for n in names]
        out += [r for r in (got if isinstance(got, list) else [got]) if want(r.name)]
    return out


def run_checks(ctx: Context, inject: set[str] | None = None, *, keep_last: bool = True) -> dict:
    """Run the checks, judge them against the node's baselines, keep the new baselines; the run as a
    dict: ``at``, ``ok``, ``duration``, ``failed``, ``summary``, ``checks`` (each a CheckResult dict).
    ``keep_last=False`` leaves the time of the last run as it was (the agent records it with
    :func:`record_run` once the API has the report: a lost report leaves the run due)."""
    if ctx.only is not None and (unknown := set(ctx.only) - set(CHECKS)):
        raise ValueError(f"unknown check(s) {', '.join(sorted(unknown))} (known: {', '.join(CHECKS)})")
    inject = injected(ctx.state_dir, ctx.node) if inject is None else inject
    at, t0 = time.time(), time.monotonic()
    results = _measure(ctx)
    state = _load_state(ctx.baseline_file)
    hist = state.get("history", {}) if isinstance(state.get("history"), dict) else {}
    for r in results:
        if r.name in BASELINED:
            judge(r, hist.get(r.name, []), ctx.sizes.fraction)
        if r.name in inject:
            shown = f" {_num(r.value)} {r.unit}" if r.value is not None else ""
            r.ok, r.message = False, f"{r.name}{shown}: injected failure (test hook)"
    last = at if keep_last else state.get("last_at", 0.0)
    _save_state(ctx.baseline_file, {"history": update_history(hist, results), "last_at": last})
    failed = [r.name for r in results if not r.ok]
    return {"at": at, "ok": not failed, "duration": round(time.monotonic() - t0, 3), "failed": failed,
            "summary": summarize(results)[:500], "checks": [r.to_dict() for r in results]}


def last_run_at(ctx: Context) -> float:
    """When this node last ran the validator (0: never), from its baseline file."""
    v = _load_state(ctx.baseline_file).get("last_at", 0.0)
    return float(v) if isinstance(v, int | float) else 0.0


def record_run(ctx: Context, at: float) -> None:
    """Keep ``at`` as the time of this node's last run (the schedule counts from it)."""
    if ctx.baseline_file is not None:
        _save_state(ctx.baseline_file, {**_load_state(ctx.baseline_file), "last_at": at})


# -- the agent's side ---------------------------------------------------------------------------------

class NodeValidation:
    """The agent's validator: a thread that runs the checks at start, every ``validate_interval``
    seconds and when an admin asks (the API's sync carries the request), each time once no job
    runs on the node, and reports each run to the API (``POST /v1/agent/validation``).

    [Note: no rank on a node under test] A run takes the node out of the pool first: at start the
    agent registers ``validating``; a scheduled or requested run asks the API to drain the node
    (``POST /v1/agent/validating``, drained_by validator) before it measures, and a passing report
    returns it. ``busy`` is set in the same ``agent.lock`` section that finds the node idle, and the
    agent adds a rank under that lock only while ``busy`` is false, so no rank starts between the
    idle check and the measurement. Work the scheduler placed before the drain waits (the agent
    starts nothing while busy); a failing report makes the API re-queue it elsewhere, and the agent
    starts nothing listed by a sync asked for before that report arrived (:meth:`may_start`), so a
    stale list cannot start it either.

    [Note: the report is kept until delivered] The API may be down when a run ends. The report is
    retried (backing off to 5 s) until the API takes it or the agent stops; the schedule's clock
    (``last_at``) moves only then, so a run whose report never arrived is due again."""

    #: the longest pause between two tries to deliver a report or to begin a run
    RETRY_MAX = 5.0

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        cfg = agent.cfg
        self.interval = cfg.validate_interval
        self.ctx = Context(node=agent.node.name, cluster=agent.cluster, state_dir=cfg.state_dir,
                           server_now=self._server_now, sizes=Sizes.from_dict(cfg.validate_sizes))
        self.busy = False
        self._held_until = 0.0  # monotonic: after a failing run, only syncs asked for later may start ranks
        self._requested = 0.0   # the newest request the API listed (a timestamp)
        self._answered = 0.0    # the newest request a reported run answered
        self._retry_at = 0.0    # monotonic: a run that could not begin (API down) waits until then
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def _server_now(self) -> float:
        return float(self.agent.api.request("GET", "/v1/agent/time", timeout=5)["now"])

    def start(self, stop: threading.Event, at_start: bool) -> None:
        if at_start:
            self.busy = True  # before the agent's first sync: the start-up run comes first
        self._thread = threading.Thread(target=self._loop, args=(stop, at_start), name="validator", daemon=True)
        self._thread.start()

    def requested(self, ts: float | None) -> None:
        """The API's pending request (from a sync): run when the node is idle."""
        if ts and ts > self._requested:
            self._requested = ts
            self._wake.set()

    def may_start(self, sync_began: float | None = None) -> bool:
        """Whether the agent may start a rank listed by a sync asked for at ``sync_began`` (monotonic):
        not while a run measures or a failing report is undelivered, nor from a list older than it."""
        return not self.busy and (sync_began is None or sync_began > self._held_until)

    def _due(self) -> str | None:
        if self._requested > self._answered:
            return "request"
        if self.interval > 0 and time.time() - last_run_at(self.ctx) >= self.interval:
            return "schedule"
        return None

    def _claim(self) -> bool:
        """Set ``busy`` if no rank runs or is starting here (under the agent's lock: see the note)."""
        with self.agent.lock:
            if any(not p.done for p in self.agent.procs.values()):
                return False
            self.busy = True
            return True

    def _begin(self, trigger: str) -> bool:
        """Ask the API to drain the node for the run (False: it could not be asked)."""
        try:
            self.agent.api.request("POST", "/v1/agent/validating", json={
                "node": self.agent.node.name, "epoch": self.agent.epoch, "trigger": trigger}, timeout=10)
            return True
        except Exception as exc:  # noqa: BLE001 - ApiError and friends: the run waits
            log.warning("could not drain the node for a validator run (%s); trying again later", exc)
            return False

    def _loop(self, stop: threading.Event, at_start: bool) -> None:
        if at_start:
            self.run_once("start", stop)
        while not stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            trigger = self._due()
            if trigger is None or stop.is_set() or time.monotonic() < self._retry_at:
                continue
            if not self._claim():  # a run waits for a node without jobs
                continue
            if not self._begin(trigger):
                self.busy = False
                self._retry_at = time.monotonic() + self.RETRY_MAX
                continue
            self.run_once(trigger, stop)

    def run_once(self, trigger: str, stop: threading.Event) -> dict | None:
        """One run (``busy`` set by the caller, or here): measure, report, release the node."""
        request = self._requested
        self.busy = True
        try:
            try:
                ctx = self.ctx
                if trigger == "start":  # see START_SKIP
                    ctx = dataclasses.replace(ctx, skip={**ctx.skip, **START_SKIP})
                report = run_checks(ctx, keep_last=False)
            except Exception as exc:  # noqa: BLE001 - a broken validator must not take the agent down
                log.exception("the validator failed")
                report = {"at": time.time(), "ok": False, "duration": 0.0, "failed": ["validator"],
                          "summary": f"validator: crashed: {exc}"[:500], "checks": []}
            report.update(node=self.agent.node.name, epoch=self.agent.epoch, trigger=trigger, request=request)
            log.info("validation (%s): %s", trigger, report["summary"])
            if report["ok"]:
                self.busy = False  # the node passed: work placed on it may start now
            if self._deliver(report, stop):
                self._answered = max(self._answered, request)
                record_run(self.ctx, report["at"])
                if not report["ok"]:
                    self._held_until = time.monotonic()
            return report
        finally:
            self.busy = False

    def _deliver(self, report: dict, stop: threading.Event) -> bool:
        """POST the report until the API takes it (False: the agent stops, or the API refuses it)."""
        delay = 0.2
        while True:
            try:
                self.agent.api.request("POST", "/v1/agent/validation", json=report, timeout=10)
                return True
            except Exception as exc:  # noqa: BLE001 - ApiError and friends
                status = getattr(exc, "status", 0)
                if 400 <= status < 500 and status not in (404, 429):  # refused (stale epoch...): never taken
                    log.error("the API refused the validation report: %s", exc)
                    return False
                log.warning("could not report the validation (%s); retrying", exc)
            if stop.wait(delay):
                return False
            delay = min(delay * 2, self.RETRY_MAX)


# -- by hand ----------------------------------------------------------------------------------------------

def render(report: dict, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("check", "result", "value", "baseline", "message", title=report.get("summary", ""),
              title_justify="left")
    for c in report["checks"]:
        res = "[yellow]skip[/]" if c["skipped"] else "[green]ok[/]" if c["ok"] else "[red]FAIL[/]"
        val = f"{_num(c['value'])} {c['unit']}" if c["value"] is not None else ""
        base = _num(c["baseline"]) if c["baseline"] is not None else ""
        t.add_row(c["name"], res, val, base, c["message"])
    (console or Console()).print(t)


def local_context(cluster_file: str | None = None, node: str | None = None, only: list[str] | None = None,
                  sizes: dict | None = None, state_dir: str | None = None) -> Context:
    """A context for a run by hand on this machine: with a cluster description and node, its state
    directory and sizes (and the link check); without, ``~/.local/state/fireflyer/validate``."""
    cluster, sdir, base_sizes = None, None, {}
    if cluster_file:
        from network.topology import load_cluster

        from .config import load_config

        cluster = load_cluster(cluster_file)
        if node is not None:
            cluster.node(node)  # KeyError names it
        cfg = load_config(cluster)
        sdir, base_sizes = cfg.state_dir, dict(cfg.validate_sizes)
    if state_dir:
        sdir = Path(state_dir)
    if sdir is None:
        base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        sdir = Path(base) / "fireflyer" / "validate"
    sdir.mkdir(parents=True, exist_ok=True)
    return Context(node=node, cluster=cluster if node else None, state_dir=sdir,
                   sizes=Sizes.from_dict({**base_sizes, **(sizes or {})}),
                   only=frozenset(only) if only else None)


def parse_sizes(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs (numbers) -> a dict for :meth:`Sizes.from_dict`."""
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise ValueError(f"--size {it!r}: expected KEY=VALUE (keys: {', '.join(f.name for f in fields(Sizes))})")
        try:
            out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
        except ValueError:
            raise ValueError(f"--size {it!r}: {v!r} is not a number") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m haiplatform.validate",
                                 description="Run the node validator's checks on this machine.")
    ap.add_argument("--cluster", help="cluster description: its state directory, sizes and (with --node) links")
    ap.add_argument("--node", help="this machine's node in the description")
    ap.add_argument("--only", default="", help=f"comma-separated checks (default: all of {', '.join(CHECKS)})")
    ap.add_argument("--size", action="append", default=[], metavar="KEY=VALUE", help="override a size (repeatable)")
    ap.add_argument("--state-dir", help="where the baselines and the disk check's file live")
    ap.add_argument("--json", action="store_true", help="print the run as one JSON object")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        ctx = local_context(args.cluster, args.node, _split(args.only) or None, parse_sizes(args.size), args.state_dir)
        report = run_checks(ctx)
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bad cluster file (ConfigError, TopologyError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        render(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
