"""The mount's life: start (in the foreground, or as a daemon process), serve, stop, unmount.

``run_mount(cluster_file, mountpoint, foreground=True)`` mounts in this process and serves until
SIGTERM, SIGINT or an unmount; then it sends what is buffered, closes the sessions still open,
unmounts (libfuse's lazy unmount) and returns 0. With ``foreground=False`` it starts
``python -m fs3.fuse MOUNTPOINT --cluster FILE`` as a daemon (its own session, stdio to the log
file), waits until that process says the mount is up (or reports its error with the last lines of
its log) and returns 0; the daemon's pid is in ``<state dir>/<mountpoint key>.pid``.

``unmount(mountpoint)`` runs ``fusermount3 -u`` (``umount -l`` when that fails: a busy mount,
or a daemon that died) and waits, up to ``timeout``, until the mount is gone and the daemon that
served it (found by its pid file) has exited.

The mount holds the cluster key (the daemon runs as root or as the services' account): its
service principal may assert the users of the requests to meta.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from network.rundir import pid_alive

from ..errors import Fs3Error
from .options import MountOptions, fuse_options, is_mounted, tune_kernel

__all__ = ["MountError", "pid_file", "run_mount", "unavailable", "unmount"]

log = logging.getLogger(__name__)

READY = "fs3-mount-ready"
START_TIMEOUT = 60.0


class MountError(Fs3Error):
    """The mount could not be set up or taken down (the message says where and what to do)."""


def unavailable(allow_other: bool = True) -> str | None:
    """None when an fs3 mount can be made here, else why not (what is missing, what to do)."""
    import shutil

    if not os.path.exists("/dev/fuse"):
        return ("no /dev/fuse: load the fuse module (modprobe fuse), or in a container pass the device "
                "(--device /dev/fuse --cap-add SYS_ADMIN)")
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not installed ({exc}): install the fuse extra (make EXTRAS=dev,fuse, or pip install pyfuse3)"
    if os.geteuid() == 0:
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            return "/dev/fuse is not readable and writable, even for root (a container without the device?)"
        return None
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3): a non-root mount needs it"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable for this user"
    if allow_other:
        try:
            conf = Path("/etc/fuse.conf").read_text()
        except OSError:
            conf = ""
        if not any(line.strip() == "user_allow_other" for line in conf.splitlines()):
            return ("a mount with allow_other (other accounts: jobs) by a non-root user needs user_allow_other "
                    "in /etc/fuse.conf; or run the mount as root, or mount with -o allow_other=false")
    return None


def _state_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 else None)
    d = Path(base) / "fs3-mounts" if base else Path.home() / ".local" / "state" / "fireflyer" / "fs3-mounts"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def pid_file(mountpoint: Path) -> Path:
    """Where the daemon serving ``mountpoint`` writes its pid."""
    mp = os.path.abspath(mountpoint)
    return _state_dir() / f"{hashlib.sha1(mp.encode()).hexdigest()[:16]}.pid"


def _check_mountpoint(mountpoint: Path) -> Path:
    mp = Path(os.path.abspath(mountpoint))
    if is_mounted(mp):
        raise MountError(f"{mp}: something is mounted there already (fs3 umount {mp}, or umount it)")
    if not mp.is_dir():
        raise MountError(f"{mp}: not a directory (make it first)")
    why = unavailable(allow_other=False)  # allow_other: libfuse names it when it is refused
    if why:
        raise MountError(why)
    return mp


def run_mount(cluster_file: Path, mountpoint: Path, *, foreground: bool = True, options: dict | None = None) -> int:
    """Mount fs3 at ``mountpoint``; see the module's docstring. Raises MountError (and
    Fs3ConfigError for a bad option) with the reason."""
    opts = MountOptions.from_dict(options)
    mp = _check_mountpoint(mountpoint)
    cluster_file = Path(cluster_file)
    if not foreground:
        return _start_daemon(cluster_file, mp, options or {}, opts)
    return _serve_here(cluster_file, mp, opts)


def _start_daemon(cluster_file: Path, mp: Path, options: dict, opts: MountOptions) -> int:
    logfile = Path(opts.log) if opts.log else _state_dir() / f"{pid_file(mp).stem}.log"
    cmd = [sys.executable, "-m", "fs3.fuse", str(mp), "--cluster", str(cluster_file), "--ready-fd", "1"]
    for k, v in options.items():
        if k != "log":
            cmd += ["-o", f"{k}={v}"]
    cmd += ["-o", f"log={logfile}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd="/")
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    line = b""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while READY.encode() not in line:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                proc.kill()
                raise MountError(f"the mount daemon for {mp} did not come up within {START_TIMEOUT:.0f} s; "
                                 f"see {logfile}:\n{_tail(logfile)}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                rc = proc.wait(5)
                raise MountError(f"the mount daemon for {mp} exited with code {rc}; see {logfile}:\n{_tail(logfile)}")
            line += chunk
    proc.stdout.close()
    return 0


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _make_clients(cluster_file: Path, opts: MountOptions):
    from network import find_cluster, load_cluster
    from network.auth import load_cluster_key

    from ..client.chunks import ChunkClient
    from ..client.filedata import FileData
    from ..meta import MetaClient

    cluster = load_cluster(find_cluster(cluster_file))
    key = load_cluster_key(cluster)
    meta = MetaClient(cluster, credential=key)
    chunks = ChunkClient.from_cluster(cluster, node=opts.node or None, credential=key, max_inflight=opts.inflight, per_server=8,
                                      timeout=60.0)
    return meta, chunks, FileData(chunks)


def _serve_here(cluster_file: Path, mp: Path, opts: MountOptions, ready_fd: int | None = None) -> int:
    import pyfuse3
    import trio

    from .ops import Fs3Operations

    meta, chunks, data = _make_clients(cluster_file, opts)
    ops = Fs3Operations(meta, data, opts)
    pf = pid_file(mp)
    try:
        try:
            pyfuse3.init(ops, str(mp), fuse_options(opts))
        except RuntimeError as exc:
            raise MountError(f"{mp}: mounting failed ({exc}); is the user allowed to mount (root, or "
                             f"user_allow_other in /etc/fuse.conf for allow_other)? See the log for libfuse's "
                             f"reason") from None
        pf.write_text(f"{os.getpid()}\n")
        log.info("fs3 mounted at %s (pid %d, options %s)", mp, os.getpid(), sorted(fuse_options(opts)))
        if ready_fd is not None:
            os.write(ready_fd, f"{READY}\n".encode())
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, ready_fd)
            os.close(devnull)
        unmounted = False
        try:
            trio.run(_main, ops, mp, opts)
        finally:
            unmounted = not is_mounted(mp)
            pyfuse3.close(unmount=not unmounted)
        log.info("fs3 at %s unmounted", mp)
        return 0
    finally:
        with contextlib.suppress(OSError):
            if pf.read_text().strip() == str(os.getpid()):
                pf.unlink()
        data.close()
        chunks.close()
        meta.shutdown()


async def _main(ops, mp: Path, opts: MountOptions) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        ops.nursery = nursery

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for sig in sigs:
                    log.info("%s: unmounting %s", signal.Signals(sig).name, mp)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        nursery.start_soon(tune_kernel, mp, opts, ops.inited)
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=opts.max_tasks)
        finally:
            with trio.move_on_after(30) as scope:
                scope.shield = True
                await ops.shutdown()
            nursery.cancel_scope.cancel()


def _pid_of(mp: Path) -> int | None:
    """The pid in the pid file of ``mp`` (the caller checks it with pid_alive), None without one."""
    try:
        return int(pid_file(mp).read_text().strip())
    except (OSError, ValueError):
        return None


def unmount(mountpoint: Path, timeout: float = 10.0) -> None:
    """Unmount an fs3 mount (``fusermount3 -u``, else ``umount -l``) and wait, up to ``timeout``,
    for the mount to go and its daemon to exit. MountError when it is not mounted or stays."""
    mp = Path(os.path.abspath(mountpoint))
    if not is_mounted(mp):
        raise MountError(f"{mp}: not mounted")
    pid = _pid_of(mp)
    errors = []
    for cmd in (["fusermount3", "-u", str(mp)], ["umount", "-l", str(mp)]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout / 2))
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{cmd[0]}: {exc}")
            continue
        if r.returncode == 0:
            break
        errors.append(f"{' '.join(cmd)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    deadline = time.monotonic() + timeout
    while is_mounted(mp):
        if time.monotonic() > deadline:
            raise MountError(f"{mp}: still mounted after {timeout} s ({'; '.join(errors) or 'no error'}); "
                             f"`umount -l {mp}` as root detaches it")
        time.sleep(0.05)
    while pid is not None and pid_alive(pid):
        if time.monotonic() > deadline:
            log.warning("%s: unmounted, but its daemon (pid %d) has not exited after %s s", mp, pid, timeout)
            return
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        pid_file(mp).unlink()  # a daemon that died (kill -9) left it


