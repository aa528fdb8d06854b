"""The ``fs3`` command (admin and user tools for the fs3 storage cluster).

Cluster administration (``--cluster`` required):

    fs3 status   --cluster FILE         nodes, heartbeat ages, chain states, balance figure
    fs3 chains   --cluster FILE         every chain: version and members head first
    fs3 routing  --cluster FILE --json  the routing table as clients see it
    fs3 faults   --cluster FILE         faults reported by storage servers (corrupt chunks)
    fs3 stats    --cluster FILE         per storage server: targets, chunks, bytes, repairs, resyncs, scrubs
    fs3 chaintable --nodes 5 --targets 6 --replication 3   preview a chain table and its balance
    fs3 put / fs3 get                   write a local file into a chunk, read one back

Files (``-c/--cluster`` optional: the running local cluster, $HAI_CLUSTER_FILE or
$FIREFLYER_CLUSTER, see ``network.find_cluster``). Paths are fs3 paths (``/a/b`` or ``fs3:/a/b``),
except for ``cp``, where paths starting with ``fs3:`` are fs3 paths and the others local ones:

    fs3 ls [-l] [-a] [-R] [--json] [PATH...]    list directories
    fs3 cat PATH...                             file contents to stdout
    fs3 cp [-r] [--quiet] SRC... DST            copy local <-> fs3 (or fs3 -> fs3), with a progress bar
    fs3 rm [-r] [-f] PATH...                    remove files (and trees with -r)
    fs3 mkdir [-p] [-m MODE] PATH...            make directories
    fs3 mv SRC DST                              rename (into DST when it is a directory)
    fs3 stat [--json] PATH...                   attributes
    fs3 df [-h] [--json]                        space and files of the cluster
    fs3 du [-s] [-h] [--json] [PATH...]         bytes used under each path
    fs3 ln [-s] TARGET LINK                     hard or symbolic link
    fs3 chmod MODE PATH...                      mode bits (octal)
    fs3 mount MOUNTPOINT / fs3 umount MOUNTPOINT   the FUSE mount (fs3.fuse)

A user mistake (a missing file, a directory where a file is needed, permission denied, an
unwritable destination) is one line ``fs3 CMD: PATH: REASON`` on stderr and exit status 1.
"""

from __future__ import annotations

import json
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

from .meta import field

app = typer.Typer(help="fs3: the fireflyer storage cluster (3FS-style).", no_args_is_help=True,
                  add_completion=False)

ClusterOpt = typer.Option(..., "--cluster", "-c", help="cluster description (TOML)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


@app.callback()
def _root() -> None:
    """fs3: the fireflyer storage cluster."""


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


def _mgmtd_call(cluster: Path, method: str, args: dict | None = None):
    from network import NetworkError, RpcClient, TrafficClass, client_credential, load_cluster

    try:
        c = load_cluster(cluster)
        addr, port = c.endpoint("fs3.mgmtd")
        with RpcClient(addr, port, timeout=10, connect_timeout=3, traffic_class=TrafficClass.STORAGE,
                       credential=client_credential(c)) as rc:
            return rc.call(method, args or {}).result
    except KeyError as exc:
        _fail(str(exc).strip("'\""))
    except NetworkError as exc:
        _fail(f"cannot reach fs3.mgmtd: {exc}")


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, sort_keys=True))


@app.command()
def version() -> None:
    """Print the fs3 version."""
    from importlib.metadata import version as v

    typer.echo(f"fs3 (fireflyer {v('fireflyer')})")


@app.command()
def routing(cluster: Path = ClusterOpt, as_json: bool = JsonOpt) -> None:
    """The routing table (nodes, targets, chains) as mgmtd publishes it."""
    r = _mgmtd_call(cluster, "mgmtd.routing")
    if as_json:
        _print_json(r)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"routing version [bold]{r['version']}[/], chunk size {r['chunk_size']}, "
              f"replication {r['replication']}, balance {r['balance']:.3f}")
    t = Table("node", "address", "alive")
    for n, d in sorted(r["nodes"].items()):
        t.add_row(n, f"{d['address']}:{d['port']}", "[green]yes[/]" if d["alive"] else "[red]no[/]")
    con.print(t)
    _chain_table(con, r)


def _chain_table(con, r: dict) -> None:
    from rich.table import Table

    colors = {"serving": "green", "syncing": "cyan", "waiting": "yellow", "lastsrv": "magenta", "offline": "red"}
    t = Table("chain", "version", "members (head first)")
    for cid, c in sorted(r["chains"].items(), key=lambda kv: int(kv[0])):
        members = "  ".join(f"{tid}@{r['targets'][str(tid)]}:[{colors.get(s, 'white')}]{s}[/]"
                            for tid, s in c["members"])
        t.add_row(str(cid), str(c["version"]), members)
    con.print(t)


@app.command()
def chains(cluster: Path = ClusterOpt, as_json: bool = JsonOpt) -> None:
    """Every chain with its version and members (head first) and their states."""
    r = _mgmtd_call(cluster, "mgmtd.routing")
    if as_json:
        _print_json(r["chains"])
        return
    from rich.console import Console

    _chain_table(Console(), r)


@app.command()
def status(cluster: Path = ClusterOpt, as_json: bool = JsonOpt) -> None:
    """Nodes with their heartbeat age, offline targets and the chain table's balance figure."""
    st = _mgmtd_call(cluster, "mgmtd.status")
    if as_json:
        _print_json(st)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table("node", "address", "alive", "last heartbeat")
    for n, d in sorted(st["nodes"].items()):
        t.add_row(n, f"{d['address']}:{d['port']}", "[green]yes[/]" if d["alive"] else "[red]no[/]",
                  f"{st['heartbeat_age'][n]:.1f} s ago")
    con.print(t)
    states: dict[str, int] = {}
    for c in st["chains"].values():
        for _t, s in c["members"]:
            states[s] = states.get(s, 0) + 1
    con.print(f"routing v{st['version']}: {len(st['chains'])} chains, targets "
              + ", ".join(f"{k}={v}" for k, v in sorted(states.items()))
              + f"; failure timeout {st['failure_timeout']} s; balance {st['balance']:.3f}")


@app.command()
def faults(cluster: Path = ClusterOpt, limit: int = typer.Option(50, help="newest N"),
           as_json: bool = JsonOpt) -> None:
    """Faults reported by storage servers (corrupt chunk copies), newest first."""
    fl = _mgmtd_call(cluster, "mgmtd.faults", {"limit": limit})
    if as_json:
        _print_json(fl)
        return
    import time

    from rich.console import Console
    from rich.table import Table

    t = Table("time", "node", "target", "chain", "chunk", "kind", "detail")
    for f in fl:
        t.add_row(time.strftime("%H:%M:%S", time.localtime(f["at"])), f["node"], str(f["target"]),
                  str(f["chain"]), f["chunk"], f["kind"], f["detail"][:80])
    Console().print(t)


@app.command()
def stats(cluster: Path = ClusterOpt, as_json: bool = JsonOpt) -> None:
    """Per storage server: routing version, reads, writes, corrupt copies found and repaired, resyncs,
    chunks scrubbed (passes), chunks per target."""
    from network import AuthError, NetworkError, RpcClient, TrafficClass, client_credential, load_cluster

    c = load_cluster(cluster)
    svc = c.service("fs3.storage")
    if svc is None:
        _fail(f"{cluster}: no [[service]] with module = \"fs3.storage\"")
    try:
        cred = client_credential(c)
    except AuthError as exc:
        _fail(str(exc))
    out = {}
    for n in svc.nodes:
        try:
            with RpcClient(*c.endpoint("fs3.storage", n), timeout=5, connect_timeout=2, credential=cred,
                           traffic_class=TrafficClass.STORAGE) as rc:
                out[n] = rc.call("storage.stats").result
        except NetworkError as exc:
            out[n] = {"error": str(exc)}
    if as_json:
        _print_json(out)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("node", "routing", "reads", "writes", "corrupt", "repaired", "resyncs", "scrubbed",
              "targets (chunks / MiB)")
    failed, damage = [], []
    for n, s in out.items():
        if "error" in s:
            t.add_row(n, f"[red]{s['error']}[/]", "", "", "", "", "", "", "")
            continue
        tg = "  ".join(f"{tid}: {d['chunks']} / {d['bytes'] / 2**20:.1f}" for tid, d in sorted(s["targets"].items()))
        failed += [f"{n}: target {tid} FAILED, out of service: {why}" for tid, why in sorted(s["failed"].items())]
        if s.get("damage"):  # the damaged copies by kind (corrupt bytes, misplaced, stale, missing...)
            damage.append(f"{n}: damaged copies found: "
                          + ", ".join(f"{k} {v}" for k, v in sorted(s["damage"].items())))
        t.add_row(n, str(s["routing_version"]), str(s["reads"]), str(s["writes"]), str(s["corrupt"]),
                  str(s["repaired"]), str(s["resyncs"]), f"{s['scrubbed_chunks']} ({s['scrub_passes']} passes)", tg)
    con = Console()
    con.print(t)
    for line in damage:
        con.print(line, style="yellow", soft_wrap=True, markup=False, highlight=False)
    for line in failed:
        con.print(line, style="red", soft_wrap=True, markup=False, highlight=False)


@app.command()
def chaintable(nodes: int = typer.Option(..., help="storage nodes"),
               targets: int = typer.Option(..., help="targets per node"),
               replication: int = typer.Option(3, help="replicas per chain"),
               as_json: bool = JsonOpt) -> None:
    """Preview the chain table mgmtd would generate, with its failure-balance figure."""
    from .chaintable import generate_chain_table
    from .errors import ChainTableError

    try:
        ct = generate_chain_table([f"n{i}" for i in range(nodes)], targets, replication)
    except ChainTableError as exc:
        _fail(str(exc))
    if as_json:
        _print_json({"chains": [list(c) for c in ct.chains], "balance": ct.balance()})
        return
    for i, c in enumerate(ct.chains):
        typer.echo(f"chain {i + 1:>4}: " + " -> ".join(f"{t}@{ct.target_node[t]}" for t in c))
    typer.echo(f"balance (max / mean extra read load on survivors of a node failure): {ct.balance():.3f}")


@app.command()
def put(path: Path = typer.Argument(..., help="local file (at most one chunk)"),
        chain: int = typer.Option(..., help="chain id"), chunk: int = typer.Option(..., help="chunk id"),
        cluster: Path = ClusterOpt) -> None:
    """Write a local file as one chunk."""
    from network import AuthError

    from .client import ChunkClient
    from .errors import Fs3Error

    data = path.read_bytes()
    try:
        with ChunkClient.from_cluster(cluster) as c:
            r = c.write(chain, chunk, data)
    except (Fs3Error, ValueError, AuthError) as exc:
        _fail(str(exc))
    typer.echo(f"chunk {chain}/{chunk:016x}: {len(data)} bytes, version {r.version}, crc32c {r.crc:#010x}")


@app.command()
def get(chain: int = typer.Option(..., help="chain id"), chunk: int = typer.Option(..., help="chunk id"),
        cluster: Path = ClusterOpt,
        out: Path = typer.Option(None, "--out", "-o", help="file to write (default: stdout)")) -> None:
    """Read one chunk (to a file or stdout)."""
    from network import AuthError

    from .client import ChunkClient
    from .errors import Fs3Error

    try:
        with ChunkClient.from_cluster(cluster) as c:
            data = bytes(c.read(chain, chunk))
    except (Fs3Error, AuthError) as exc:
        _fail(str(exc))
    if out:
        out.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)


# -- files ------------------------------------------------------------------------------------------

FsClusterOpt = typer.Option(None, "--cluster", "-c",
                            help="cluster description (default: the running local cluster, $FIREFLYER_CLUSTER)")
_CP_BLOCK = 4 << 20  # bytes per read while copying


class _UserError(Exception):
    """One line for the user: ``fs3 CMD: PATH: REASON``."""

    def __init__(self, path: str | None, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _shown(path: str | None, prefix: bool) -> str | None:
    if path is None or not prefix or str(path).startswith("fs3:"):
        return path
    return f"fs3:{path}"


@contextmanager
def _errors(cmd: str, fs3_prefix: bool = False):
    """Turn what a user can get wrong (and an unreachable cluster) into one line and exit 1.
    ``fs3_prefix``: name fs3 paths ``fs3:/...`` (cp, whose other paths are local)."""
    import errno as _errno
    import os

    from network import NetworkError

    from .errors import Fs3Error

    def fail(path, reason: str):
        where = f"{path}: " if path else ""
        typer.echo(f"fs3 {cmd}: {where}{reason}", err=True)
        raise typer.Exit(1)

    try:
        yield
    except _UserError as exc:
        fail(exc.path, exc.reason)
    except OSError as exc:
        code = exc.errno if isinstance(exc.errno, int) else _errno.EIO
        reason = os.strerror(code) if exc.filename is not None else (exc.strerror or str(exc))
        prefix = fs3_prefix and isinstance(exc, Fs3Error)  # an fs3 path, not a local one
        path = _shown(exc.filename, prefix)
        if exc.filename2 is not None:
            path = f"{path} -> {_shown(exc.filename2, prefix)}"
        fail(path, reason)
    except (Fs3Error, NetworkError) as exc:
        fail(None, str(exc))


@contextmanager
def _session(cmd: str, cluster: Path | None, fs3_prefix: bool = False):
    """The command's FileSystem of ``--cluster`` (found by network.find_cluster), inside its error
    context."""
    from network import find_cluster

    from .client.files import FileSystem

    with _errors(cmd, fs3_prefix), FileSystem(find_cluster(cluster)) as fs:
        yield fs


def _fs3_path(p: str) -> str:
    return p[4:] if p.startswith("fs3:") else p


def _attrs_dict(a) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(a):
        d = dataclasses.asdict(a)
    elif isinstance(a, dict):
        d = dict(a)
    else:
        d = dict(vars(a))
    return {k: v for k, v in d.items() if not k.startswith("_") and v is not None}


def _human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T", "P"):
        if abs(n) < 1024 or unit == "P":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 10 else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _when(ns: int | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime((ns or 0) / 1e9))


@app.command("ls")
def ls_cmd(paths: list[str] = typer.Argument(None, help="fs3 paths (default /)"),
           long: bool = typer.Option(False, "-l", help="long listing: mode, links, owner, size, mtime"),
           all_: bool = typer.Option(False, "-a", help="include names starting with '.'"),
           recursive: bool = typer.Option(False, "-R", help="list subdirectories recursively"),
           human: bool = typer.Option(False, "-h", help="sizes in K, M, G"),
           cluster: Path = FsClusterOpt, as_json: bool = JsonOpt) -> None:
    """List directories (or name files)."""
    import posixpath

    out: dict[str, list] = {}
    with _session("ls", cluster) as fs:
        for p in [_fs3_path(p) for p in (paths or ["/"])]:
            a = fs.lstat(p)
            if field(a, "type") != "dir":
                out[p] = [(posixpath.basename(p) or p, a)]
                continue
            todo = [p]
            while todo:
                d = todo.pop(0)
                ents = [e for e in fs.scandir(d) if all_ or not e.name.startswith(".")]
                out[d] = [(e.name, e.stat()) for e in ents]
                if recursive:
                    todo[:0] = [posixpath.join(d, e.name) for e in ents if e.is_dir()]
        if as_json:
            _print_json({d: [dict(_attrs_dict(a), name=n) for n, a in ents] for d, ents in out.items()})
            return
        many = len(out) > 1
        for i, (d, ents) in enumerate(out.items()):
            if many:
                typer.echo(("\n" if i else "") + f"{d}:")
            for name, a in ents:
                if not long:
                    typer.echo(name)
                    continue
                size = field(a, "size", 0)
                target = f" -> {field(a, 'target')}" if field(a, "type") == "symlink" else ""
                typer.echo(f"{stat.filemode(a.st_mode)} {field(a, 'nlink', 1):>3} {_owner(field(a, 'uid', 0)):>8} "
                           f"{_group(field(a, 'gid', 0)):>8} "
                           f"{_human(size) if human else size:>10} {_when(field(a, 'mtime'))} {name}{target}")


def _owner(uid: int) -> str:
    """A uid as ls shows it: this machine's account name, else the number."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def _group(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return str(gid)


@app.command("cat")
def cat_cmd(paths: list[str] = typer.Argument(..., help="fs3 files"), cluster: Path = FsClusterOpt) -> None:
    """Write files' contents to stdout."""
    out = sys.stdout.buffer
    with _session("cat", cluster) as fs:
        for p in paths:
            with fs.open(_fs3_path(p), "rb") as f:
                while True:
                    b = f.read(_CP_BLOCK)
                    if not b:
                        break
                    out.write(b)
        out.flush()


@app.command("stat")
def stat_cmd(paths: list[str] = typer.Argument(..., help="fs3 paths"),
             follow: bool = typer.Option(False, "-L", help="follow symlinks"),
             cluster: Path = FsClusterOpt, as_json: bool = JsonOpt) -> None:
    """Attributes of files and directories."""
    with _session("stat", cluster) as fs:
        res = {p: fs.stat(_fs3_path(p), follow_symlinks=follow) for p in paths}
    if as_json:
        _print_json({p: _attrs_dict(a) for p, a in res.items()})
        return
    for p, a in res.items():
        typer.echo(f"  File: {p}" + (f" -> {field(a, 'target')}" if field(a, "type") == "symlink" else ""))
        typer.echo(f"  Size: {field(a, 'size', 0):<12} Type: {field(a, 'type'):<8} Inode: {field(a, 'ino')}  "
                   f"Links: {field(a, 'nlink', 1)}")
        typer.echo(f"Access: ({field(a, 'mode', 0) & 0o7777:04o}/{stat.filemode(a.st_mode)})  Uid: ({field(a, 'uid')}/"
                   f"{_owner(field(a, 'uid', 0))})  Gid: ({field(a, 'gid')}/{_group(field(a, 'gid', 0))})")
        lay = field(a, "layout")
        if lay:
            typer.echo(f"Layout: chunk size {field(lay, 'chunk_size')}, chains {list(field(lay, 'chains', []))}")
        for k in ("atime", "mtime", "ctime"):
            ns = field(a, k) or 0
            typer.echo(f"{k.capitalize()[0]}{k[1:]:>5}: {_when(ns)}:{ns / 1e9 % 60:06.3f}")


@app.command("mkdir")
def mkdir_cmd(paths: list[str] = typer.Argument(..., help="fs3 directories"),
              parents: bool = typer.Option(False, "-p", help="make parents as needed; no error if it exists"),
              mode: str = typer.Option("755", "-m", help="mode bits (octal)"),
              cluster: Path = FsClusterOpt) -> None:
    """Make directories."""
    with _session("mkdir", cluster) as fs:
        bits = _octal(mode)
        for p in paths:
            fs.mkdir(_fs3_path(p), bits, parents=parents, exist_ok=parents)


def _octal(mode: str) -> int:
    try:
        bits = int(mode, 8)
    except ValueError:
        raise _UserError(mode, "not an octal mode (like 755)") from None
    if not 0 <= bits <= 0o7777:
        raise _UserError(mode, "mode bits must be within 0..7777")
    return bits


@app.command("rm")
def rm_cmd(paths: list[str] = typer.Argument(..., help="fs3 paths"),
           recursive: bool = typer.Option(False, "-r", "-R", help="remove directories and their contents"),
           force: bool = typer.Option(False, "-f", help="ignore paths that do not exist"),
           cluster: Path = FsClusterOpt) -> None:
    """Remove files (and directory trees with -r)."""
    with _session("rm", cluster) as fs:
        for p in map(_fs3_path, paths):
            try:
                a = fs.lstat(p)
                if field(a, "type") == "dir":
                    if not recursive:
                        raise _UserError(p, "is a directory (use -r)")
                    fs.rmtree(p)
                else:
                    fs.remove(p)
            except FileNotFoundError:
                if not force:
                    raise


@app.command("mv")
def mv_cmd(src: str = typer.Argument(..., help="fs3 path"), dst: str = typer.Argument(..., help="fs3 path"),
           no_clobber: bool = typer.Option(False, "-n", help="do not replace an existing destination"),
           cluster: Path = FsClusterOpt) -> None:
    """Rename (atomically); into DST when it is a directory."""
    import posixpath

    with _session("mv", cluster) as fs:
        s, d = _fs3_path(src), _fs3_path(dst)
        if fs.isdir(d):
            d = posixpath.join(d, posixpath.basename(s.rstrip("/")))
        fs.rename(s, d, noreplace=no_clobber)


@app.command("ln")
def ln_cmd(target: str = typer.Argument(..., help="the existing file (or, with -s, the link's target)"),
           link: str = typer.Argument(..., help="the new name"),
           symbolic: bool = typer.Option(False, "-s", help="a symbolic link"),
           cluster: Path = FsClusterOpt) -> None:
    """Make a hard link (or a symbolic one with -s)."""
    with _session("ln", cluster) as fs:
        if symbolic:
            fs.symlink(target if not target.startswith("fs3:") else target[4:], _fs3_path(link))
        else:
            fs.link(_fs3_path(target), _fs3_path(link))


@app.command("chmod")
def chmod_cmd(mode: str = typer.Argument(..., help="octal mode bits, like 644"),
              paths: list[str] = typer.Argument(..., help="fs3 paths"), cluster: Path = FsClusterOpt) -> None:
    """Change mode bits."""
    with _session("chmod", cluster) as fs:
        bits = _octal(mode)
        for p in paths:
            fs.chmod(_fs3_path(p), bits)


@app.command("df")
def df_cmd(human: bool = typer.Option(False, "-h", help="sizes in K, M, G"), cluster: Path = FsClusterOpt,
           as_json: bool = JsonOpt) -> None:
    """Space and files of the cluster."""
    with _session("df", cluster) as fs:
        st = fs.statfs()
    if as_json:
        _print_json(st)
        return
    total, used, free = st.get("bytes_total", 0), st.get("bytes_used", 0), st.get("bytes_free", 0)
    fmt = _human if human else str
    pct = f"{100 * used / total:.0f}%" if total else "-"
    typer.echo(f"{'size':>12} {'used':>12} {'avail':>12} {'use%':>5} {'files':>10}")
    typer.echo(f"{fmt(total):>12} {fmt(used):>12} {fmt(free):>12} {pct:>5} {st.get('files', 0):>10}")


@app.command("du")
def du_cmd(paths: list[str] = typer.Argument(None, help="fs3 paths (default /)"),
           summarize: bool = typer.Option(False, "-s", help="only a total per path"),
           human: bool = typer.Option(False, "-h", help="sizes in K, M, G"),
           cluster: Path = FsClusterOpt, as_json: bool = JsonOpt) -> None:
    """Bytes used under each path (file sizes; every directory with -s off)."""
    import posixpath

    rows: list[tuple[str, int]] = []
    with _session("du", cluster) as fs:
        for p in [_fs3_path(p) for p in (paths or ["/"])]:
            a = fs.lstat(p)
            if field(a, "type") != "dir":
                rows.append((p, field(a, "size", 0) if field(a, "type") == "file" else 0))
                continue

            def total(d: str) -> int:  # post-order: a directory's row after its subdirectories'
                try:
                    entries = list(fs.scandir(d))
                except OSError:  # as fs.walk did: an unreadable directory counts 0, without a row
                    return 0
                n = 0
                for e in entries:
                    if e.is_dir():
                        n += total(posixpath.join(d, e.name))
                    elif e.is_file():
                        n += field(e.stat(), "size", 0)
                if not summarize:
                    rows.append((d, n))
                return n

            n = total(posixpath.normpath("/" + p.lstrip("/")))
            if summarize:
                rows.append((p, n))
    if as_json:
        _print_json({p: n for p, n in rows})
        return
    for p, n in rows:
        typer.echo(f"{_human(n) if human else n}\t{p}")


def _local_kind(p: Path) -> str | None:
    """'dir', 'file' (anything else that can be read), or None when it does not exist."""
    if p.is_dir():
        return "dir"
    return "file" if p.exists() else None


class _Copier:
    """Copies between local paths (``str``, no prefix) and fs3 paths (``fs3:/...``)."""

    def __init__(self, fs, recursive: bool, progress) -> None:
        self.fs = fs
        self.recursive = recursive
        self.progress = progress
        self.task = None
        self.files = 0
        self.bytes = 0

    def kind(self, p: str) -> str | None:
        if p.startswith("fs3:"):
            try:
                t = field(self.fs.stat(_fs3_path(p)), "type")
            except FileNotFoundError:
                return None
            return "dir" if t == "dir" else "file"
        return _local_kind(Path(p))

    def join(self, base: str, name: str) -> str:
        if base.startswith("fs3:"):
            import posixpath

            return "fs3:" + posixpath.join(_fs3_path(base), name)
        return str(Path(base) / name)

    def size(self, p: str) -> int:
        if p.startswith("fs3:"):
            return int(field(self.fs.stat(_fs3_path(p)), "size", 0))
        return Path(p).stat().st_size

    def listing(self, p: str) -> list[tuple[str, bool]]:
        if p.startswith("fs3:"):
            return [(e.name, e.is_dir()) for e in self.fs.scandir(_fs3_path(p))]
        return [(e.name, e.is_dir()) for e in sorted(Path(p).iterdir())]

    def total(self, src: str) -> int:
        if self.kind(src) != "dir":
            return self.size(src)
        return sum(self.total(self.join(src, n)) for n, _d in self.listing(src))

    def copy(self, src: str, dst: str) -> None:
        k = self.kind(src)
        if k is None:
            raise FileNotFoundError(2, "No such file or directory", src)
        if k == "dir":
            if not self.recursive:
                raise _UserError(src, "is a directory (use -r)")
            self.mkdir(dst)
            for name, _is_dir in self.listing(src):
                self.copy(self.join(src, name), self.join(dst, name))
            return
        self.copy_file(src, dst)

    def mkdir(self, p: str) -> None:
        if p.startswith("fs3:"):
            self.fs.mkdir(_fs3_path(p), exist_ok=True)
        else:
            Path(p).mkdir(exist_ok=True)

    def open(self, p: str, mode: str):
        if p.startswith("fs3:"):
            return self.fs.open(_fs3_path(p), mode)
        if "w" in mode and Path(p).is_dir():
            raise IsADirectoryError(21, "Is a directory", p)
        return open(p, mode)  # noqa: SIM115 - closed by the caller's with

    def copy_file(self, src: str, dst: str) -> None:
        buf = bytearray(_CP_BLOCK)
        mv = memoryview(buf)
        with self.open(src, "rb") as fi, self.open(dst, "wb") as fo:
            while True:
                n = fi.readinto(buf)
                if not n:
                    break
                fo.write(mv[:n])
                self.bytes += n
                if self.progress is not None:
                    self.progress.update(self.task, advance=n)
        self.files += 1


@app.command("cp")
def cp_cmd(paths: list[str] = typer.Argument(..., help="SRC... DST: fs3 paths start with 'fs3:', others are local"),
           recursive: bool = typer.Option(False, "-r", "-R", help="copy directories recursively"),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
           cluster: Path = FsClusterOpt) -> None:
    """Copy files between the local file system and fs3 (or within fs3): fs3 paths start with
    ``fs3:`` (``fs3 cp data.bin fs3:/datasets/``, ``fs3 cp -r fs3:/ckpt ./ckpt``)."""
    if len(paths) < 2:
        typer.echo("fs3 cp: give SRC... DST (fs3 paths start with 'fs3:')", err=True)
        raise typer.Exit(1)
    *srcs, dst = paths
    if not any(p.startswith("fs3:") for p in paths):
        typer.echo("fs3 cp: no fs3 path (they start with 'fs3:'); use cp for local copies", err=True)
        raise typer.Exit(1)
    with _session("cp", cluster, fs3_prefix=True) as fs:
        show = not quiet and sys.stderr.isatty()
        progress = None
        if show:
            import rich.progress as rp
            from rich.console import Console

            progress = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
                                   rp.TransferSpeedColumn(), rp.TimeRemainingColumn(), console=Console(stderr=True),
                                   transient=True)
        cp = _Copier(fs, recursive, progress)
        dkind = cp.kind(dst)
        if len(srcs) > 1 and dkind != "dir":
            raise _UserError(dst, "not a directory (copying several sources needs one)")
        plan = []
        for s in srcs:
            name = Path(_fs3_path(s).rstrip("/")).name
            plan.append((s, cp.join(dst, name) if dkind == "dir" and name else dst))
        if progress is not None:
            with progress:
                cp.task = progress.add_task("copying", total=sum(cp.total(s) for s, _d in plan))
                for s, d in plan:
                    cp.copy(s, d)
        else:
            for s, d in plan:
                cp.copy(s, d)
    if not quiet:
        typer.echo(f"copied {cp.files} file(s), {cp.bytes} bytes", err=True)


@app.command("mount")
def mount_cmd(mountpoint: Path = typer.Argument(..., help="an empty local directory"),
              cluster: Path = FsClusterOpt,
              foreground: bool = typer.Option(False, "--foreground", "-f", help="stay in the foreground"),
              options: list[str] = typer.Option(None, "--option", "-o", help="mount option KEY[=VALUE] (repeatable, "
                                                "or comma-separated)")) -> None:
    """Mount the fs3 namespace at MOUNTPOINT (FUSE)."""
    from network import find_cluster

    from .fuse import run_mount
    from .fuse.options import parse_option_args

    opts = parse_option_args(options)
    with _errors("mount"):
        cluster_file = find_cluster(cluster)

        rc = run_mount(cluster_file, mountpoint, foreground=foreground, options=opts)
    raise typer.Exit(int(rc or 0))


@app.command("umount")
def umount_cmd(mountpoint: Path = typer.Argument(..., help="where fs3 is mounted"),
               timeout: float = typer.Option(10.0, help="seconds to wait for the mount to go"),
               cluster: Path = typer.Option(None, "--cluster", "-c", hidden=True)) -> None:
    """Unmount an fs3 mount."""
    with _errors("umount"):
        from .fuse import unmount

        unmount(mountpoint, timeout=timeout)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
