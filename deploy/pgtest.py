"""A throwaway PostgreSQL server for tests and CI: initdb + pg_ctl on a temporary directory.

    python -m deploy.pgtest start --dir /tmp/pg      # prints the SQLAlchemy URL, returns
    python -m deploy.pgtest stop --dir /tmp/pg       # stops it and removes the directory

As a library: ``with ThrowawayPostgres() as pg: pg.url``. ``initdb`` refuses to run as root, so
when run as root the server runs as the ``postgres`` user. The server listens on 127.0.0.1 and a
free port, with fsync off (tests only), and takes about a second to start.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["ThrowawayPostgres", "PostgresUnavailable", "find_bindir"]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (or no way to run them)."""


def find_bindir() -> Path:
    """The directory holding initdb and pg_ctl (newest installed major version)."""
    env = os.environ.get("PG_BINDIR")
    cands = [env] if env else []
    cands += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    which = shutil.which("initdb")
    if which:
        cands.append(str(Path(which).parent))
    for c in cands:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found; install them with "
                              "'apt-get install postgresql' or set PG_BINDIR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    def __init__(self, directory: str | os.PathLike | None = None, port: int | None = None) -> None:
        self.bindir = find_bindir()
        self._own_dir = directory is None
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="fireflyer-pg-"))
        self.port = port or _free_port()
        self.data = self.dir / "data"
        self.sock = self.dir / "sock"
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server as") \
                    from None
            self.user = "postgres"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        full = (["runuser", "-u", self.user, "--"] if self.user else []) + list(cmd)
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout)

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self.user:
            os.chmod(self.dir, 0o755)
            # every parent must be traversable for the postgres user
            p = self.dir.resolve()
            while p != p.parent:
                with contextlib.suppress(OSError):
                    st = p.stat()
                    if not st.st_mode & 0o001:
                        os.chmod(p, st.st_mode | 0o001)
                p = p.parent
            shutil.chown(self.dir, self.user, self.user)
            shutil.chown(self.sock, self.user, self.user)
        r = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8")
        if r.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}")
        opts = (f"-k {self.sock} -h 127.0.0.1 -p {self.port} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200")
        r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                      "-t", "30", "-o", opts, "start")
        if r.returncode != 0:
            log = (self.dir / "server.log").read_text(errors="replace") if (self.dir / "server.log").exists() else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {r.stderr.strip()}\n{log[-2000:]}")
        (self.dir / "url").write_text(self.url + "\n")
        (self.dir / "port").write_text(str(self.port))
        return self.url

    def stop(self, remove: bool = True) -> None:
        if self.data.exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.pgtest", description="throwaway PostgreSQL for tests")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="initdb + start; prints the SQLAlchemy URL")
    s.add_argument("--dir", required=True)
    s.add_argument("--port", type=int, default=None)
    t = sub.add_parser("stop", help="stop and remove the directory")
    t.add_argument("--dir", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            print(ThrowawayPostgres(args.dir, args.port).start())
        else:
            d = Path(args.dir)
            port = int((d / "port").read_text()) if (d / "port").exists() else None
            pg = ThrowawayPostgres(d, port)
            pg.stop()
        return 0
    except (PostgresUnavailable, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
