"""Link probe: a bandwidth and latency matrix between the nodes of a cluster (like iperf / ib_write_bw).

Each node runs a responder (``python -m network.probe serve --cluster F --node N``, started by
the launcher as the ``network.probe`` service). The coordinator (``python -m network.probe
--cluster F``) asks, for every ordered pair (a, b), the responder on a to measure its link to
b: ``reps`` transfers of ``size`` bytes into a preallocated buffer on b (bandwidth, best and
median), and ``pings`` small round trips (latency, median). Pairs run one at a time so they do
not share the links they measure.

When no responder answers and the cluster's nodes live on this machine, the coordinator starts
temporary responders itself (``--spawn auto``), so the probe works on a bare local cluster too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

from .auth import Authenticator, Credential, load_cluster_key, server_settings
from .errors import AuthError, NetworkError, TransportError
from .rpc import RpcClient, RpcServer
from .service import parse_service_args, service_parser, wait_for_shutdown
from .topology import Cluster, load_cluster
from .transport import TrafficClass

MODULE = "network.probe"
DEFAULT_PORT = 17100
_MAX_SINK = 256 << 20


@dataclass
class LinkResult:
    src: str
    dst: str
    hops: int
    size: int
    gbps_best: float
    gbps_median: float
    latency_us: float
    error: str | None = None


class ProbeResponder:
    """The per-node responder: a sink for bandwidth tests and the driver of tests from this node."""

    def __init__(self, cluster: Cluster, node: str, port: int, *,
                 auth: Authenticator | Credential | None = None) -> None:
        self.cluster = cluster
        self.node = cluster.node(node)
        security = server_settings(cluster) if auth is None else {"auth": auth}
        self.server = RpcServer(self.node.address, port, name=f"probe@{node}", traffic_class=TrafficClass.OTHER,
                                **security)
        self.credential = self.server.auth.key  # to measure from this node to another responder
        self._sink = threading.local()
        # both service-only (an admin's tool, run with the cluster key); a sink takes up to
        # _MAX_SINK bytes, refused above that before anything is allocated
        self.server.register("probe.sink", self._sink_handler, payload_into=self._sink_buffer,
                             max_payload=_MAX_SINK)
        self.server.register("probe.measure", self._measure)

    def _sink_buffer(self, args: dict, nbytes: int):
        if nbytes > _MAX_SINK:
            return None  # falls back to a fresh buffer
        buf = getattr(self._sink, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._sink.buf = bytearray(nbytes)
        return memoryview(buf)[:nbytes]

    def _sink_handler(self, args: dict, payload: memoryview, ctx) -> dict:
        return {"bytes": payload.nbytes}

    def _measure(self, args: dict, payload: memoryview, ctx) -> dict:
        dst = self.cluster.node(args["dst"])
        port = int(args["port"])
        return asdict(measure_link(self.node.address, dst.address, port, int(args["size"]), int(args["reps"]),
                                   int(args["pings"]), self.node.name, dst.name,
                                   self.cluster.distance(self.node.name, dst.name), credential=self.credential))

    def start(self) -> ProbeResponder:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


def measure_link(src_addr: str, dst_addr: str, port: int, size: int, reps: int, pings: int,
                 src: str = "", dst: str = "", hops: int = 0, *, credential: Credential | None = None) -> LinkResult:
    """Measure from ``src_addr`` (bound locally) to the responder at ``dst_addr:port``."""
    if not 0 < size <= _MAX_SINK:
        raise ValueError(f"probe size must be between 1 byte and {_MAX_SINK >> 20} MiB, got {size}")
    payload = bytearray(size)
    payload[: min(size, 1 << 20)] = os.urandom(min(size, 1 << 20))
    with RpcClient(dst_addr, port, source=src_addr, timeout=60.0, credential=credential) as c:
        lat = []
        c.call("rpc.ping")  # connect + warm
        for _ in range(max(1, pings)):
            t0 = time.perf_counter()
            c.call("rpc.ping")
            lat.append(time.perf_counter() - t0)
        c.call("probe.sink", payload=payload)  # warm-up: the responder allocates its buffer
        times = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            r = c.call("probe.sink", payload=payload)
            times.append(time.perf_counter() - t0)
            if r.result["bytes"] != size:
                raise TransportError(f"probe to {dst_addr}:{port}: sent {size} bytes, sink saw {r.result['bytes']}")
    return LinkResult(src, dst, hops, size, size / min(times) / 1e9, size / statistics.median(times) / 1e9,
                      statistics.median(lat) * 1e6)


def _local_addresses() -> set[str]:
    return {"127.0.0.1", "localhost", socket.gethostname()}


def _is_local(addr: str) -> bool:
    return addr.startswith("127.") or addr in _local_addresses()


def _responder_up(addr: str, port: int, credential: Credential) -> bool:
    try:
        with RpcClient(addr, port, timeout=2.0, connect_timeout=0.5, credential=credential) as c:
            return "probe.sink" in c.call("rpc.methods").result
    except NetworkError:
        return False


def probe_matrix(cluster: Cluster, nodes: list[str] | None = None, size: int = 16 << 20, reps: int = 3,
                 pings: int = 20, port: int | None = None, spawn: str = "auto",
                 progress=None) -> list[LinkResult]:
    """Measure every ordered pair of ``nodes`` (default: all, in topology order)."""
    names = cluster.ordered(nodes)
    svc = cluster.service(MODULE)
    port = port or (svc.port if svc and svc.port else DEFAULT_PORT)
    cred = load_cluster_key(cluster)  # an admin's tool: the responders serve the cluster key only
    missing = [n for n in names if not _responder_up(cluster.node(n).address, port, cred)]
    spawned: list[subprocess.Popen] = []
    try:
        if missing:
            if spawn == "never" or (spawn == "auto" and not all(_is_local(cluster.node(n).address) for n in missing)):
                raise NetworkError(f"no probe responder on {', '.join(missing)} (port {port}); start them with "
                                   f"'python -m network.probe serve --cluster {cluster.source} --node NAME' or the "
                                   "launcher, or pass --spawn always on a local cluster")
            for n in missing:
                spawned.append(subprocess.Popen(
                    [sys.executable, "-m", MODULE, "serve", "--cluster", str(cluster.path or cluster.source),
                     "--node", n, "--port", str(port), "--log-level", "WARNING"],
                    stdin=subprocess.DEVNULL))
            deadline = time.monotonic() + 20
            for n in missing:
                while not _responder_up(cluster.node(n).address, port, cred):
                    if time.monotonic() > deadline:
                        raise NetworkError(f"temporary probe responder on {n} did not start")
                    time.sleep(0.05)
        results = []
        for a in names:
            for b in names:
                if a == b:
                    continue
                na = cluster.node(a)
                try:
                    with RpcClient(na.address, port, timeout=120.0, credential=cred) as c:
                        r = c.call("probe.measure", {"dst": b, "port": port, "size": size, "reps": reps,
                                                     "pings": pings})
                    res = LinkResult(**r.result)
                except NetworkError as exc:
                    res = LinkResult(a, b, cluster.distance(a, b), size, 0.0, 0.0, 0.0, error=str(exc))
                results.append(res)
                if progress:
                    progress(res)
        return results
    finally:
        for p in spawned:
            p.terminate()
        for p in spawned:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def render(results: list[LinkResult], names: list[str], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    by = {(r.src, r.dst): r for r in results}
    size = results[0].size if results else 0
    for title, fmt in ((f"bandwidth GB/s (best of reps, {size >> 20} MiB messages), row = from, column = to",
                        lambda r: f"{r.gbps_best:.2f}"),
                       ("latency µs (median round trip of a small RPC)", lambda r: f"{r.latency_us:.0f}"),
                       ("hops (links on the path)", lambda r: str(r.hops))):
        t = Table(title=title, title_justify="left")
        t.add_column("from \\ to")
        for n in names:
            t.add_column(n, justify="right")
        for a in names:
            row = []
            for b in names:
                r = by.get((a, b))
                row.append("-" if r is None else ("[red]ERR[/]" if r.error else fmt(r)))
            t.add_row(a, *row)
        con.print(t)
    for r in results:
        if r.error:
            con.print(f"[red]{r.src} -> {r.dst}: {r.error}[/]")


def _size(text: str) -> int:
    t = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def serve_main(argv: list[str]) -> int:
    ap = service_parser(f"{MODULE} serve", "link-probe responder for one node")
    ap.add_argument("--port", type=int, default=None, help="port (default: the cluster's network.probe port)")
    args, cluster, node = parse_service_args(ap, argv)
    svc = cluster.service(MODULE)
    port = args.port or (svc.port if svc and svc.port else DEFAULT_PORT)
    try:
        r = ProbeResponder(cluster, node.name, port).start()
    except AuthError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    wait_for_shutdown()
    r.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve_main(argv[1:])
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                 epilog="Subcommand: 'serve --cluster F --node N' runs one node's responder.")
    ap.add_argument("--cluster", required=True, help="cluster description (TOML)")
    ap.add_argument("--nodes", default=None, help="comma-separated node names (default: all)")
    ap.add_argument("--size", default="16MiB", help="message size for bandwidth (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="timed transfers per pair (default: %(default)s)")
    ap.add_argument("--pings", type=int, default=20, help="round trips per pair for latency (default: %(default)s)")
    ap.add_argument("--port", type=int, default=None, help="responder port (default: from the cluster file)")
    ap.add_argument("--spawn", choices=("auto", "always", "never"), default="auto",
                    help="start temporary responders where none answers (auto: only for local nodes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)
    try:
        cluster = load_cluster(args.cluster)
        nodes = args.nodes.split(",") if args.nodes else None
        names = cluster.ordered(nodes)
        if len(names) < 2:
            ap.error("need at least two nodes to probe")
        size = _size(args.size)
        if size <= 0 or size > _MAX_SINK:
            ap.error(f"--size must be between 1 byte and {_MAX_SINK >> 20} MiB")
        results = probe_matrix(cluster, names, size, args.reps, args.pings, args.port, args.spawn)
    except (NetworkError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"cluster": cluster.name, "links": [asdict(r) for r in results]}))
    else:
        render(results, names)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
