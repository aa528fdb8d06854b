"""The ``fs3`` command (admin and user tools for the fs3 storage cluster).

    fs3 status   --cluster FILE         nodes, heartbeat ages, chain states, balance figure
    fs3 chains   --cluster FILE         every chain: version and members head first
    fs3 routing  --cluster FILE --json  the routing table as clients see it
    fs3 faults   --cluster FILE         faults reported by storage servers (corrupt chunks)
    fs3 stats    --cluster FILE         per storage server: targets, chunks, bytes, repairs, resyncs, scrubs
    fs3 chaintable --nodes 5 --targets 6 --replication 3   preview a chain table and its balance
    fs3 put / fs3 get                   write a local file into a chunk, read one back
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
