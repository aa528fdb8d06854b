"""Topology proof: hfreduce vs gloo on a namespace cluster of two zones with a slow link between them.

    python bench/topology.py [--quick] [--json-only]

Brings up deploy/clusters/local.toml as a namespace cluster (deploy.netns: a network namespace
per node, links shaped with tc from the description: 2 Gbit/s in a zone, 0.5 Gbit/s between the
zones), then, all in one run:

* the link-probe matrix (network.probe, responders in the namespaces) against the shaped rate of
  each pair's path;
* allreduce of 64 MiB float32 across the 4 nodes (one rank per node): hfreduce (its double binary
  tree, topology-aware from the cluster file) vs torch.distributed gloo, in turns, ROUNDS rounds,
  each figure the median of all its timed repetitions (a barrier before each);
* the two trees hfreduce built, and how many of their edges cross the zones.

Targets (issue #18): hfreduce >= 2x gloo at 64 MiB; at most one cross-zone edge per tree; the
probe within 15% of the shaped rates. The 2x cannot be met here: every allreduce moves the other
zone's sum across the inter-zone link each way, so SIZE / rate (the floor, printed) bounds it,
and gloo's ring takes 1.5x that; `floor/hfreduce` says how close hfreduce comes. Prints a skip line (and ok: true, skipped) where namespaces
are not available. The last line is one JSON object (bench, figures, ratios, targets, ok).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 64
REPS, QUICK_REPS = 3, 2
ROUNDS, QUICK_ROUNDS = 3, 1
WARMUP = 2
RANK_SCRIPT = ROOT / "bench" / "_topology_rank.py"


def probe(nc, path: Path, quick: bool) -> list[dict]:
    """Every ordered pair's bandwidth, with the shaped rate of its path."""
    from deploy.netns import path_gbit
    from network.auth import load_cluster_key
    from network.probe import probe_matrix
    from network.rpc import RpcClient
    from network.topology import load_cluster

    cluster = load_cluster(path)
    key = load_cluster_key(cluster)
    procs = [subprocess.Popen(nc.wrap(n, [sys.executable, "-m", "network.probe", "serve", "--cluster", str(path),
                                          "--node", n, "--log-level", "WARNING"]), cwd=ROOT)
             for n in cluster.ordered()]
    try:
        deadline = time.monotonic() + 30
        for n in cluster.ordered():
            while True:
                try:
                    with RpcClient(cluster.node(n).address, 17100, timeout=2, connect_timeout=0.5,
                                   credential=key) as c:
                        c.call("rpc.ping")
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"probe responder in {n}'s namespace did not start") from None
                    time.sleep(0.05)
        res = probe_matrix(cluster, size=(4 if quick else 8) << 20, reps=2 if quick else 3, pings=2, spawn="never")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    return [{"src": r.src, "dst": r.dst, "gbit": round(r.gbps_median * 8, 3),
             "shaped_gbit": path_gbit(cluster, r.src, r.dst), "error": r.error} for r in res]


def run_allreduce(nc, lib: str, path: Path, reps: int, port: int) -> dict:
    """One allreduce run of ``lib`` with a rank in each node's namespace; rank 0's report."""
    names = nc.cluster.ordered()
    procs = []
    for r, n in enumerate(names):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(len(names)), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR=nc.addresses[names[0]], MASTER_PORT=str(port), HAI_NODE_NAME=n,
                   HAI_CLUSTER_FILE=str(path), GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(nc.wrap(n, [sys.executable, str(RANK_SCRIPT), lib, str(MIB), str(reps),
                                                  str(WARMUP)]),
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{lib} ranks failed: exit codes {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def cross_edges(trees: list[list[int]], nodes: list[str], cluster) -> list[list[tuple[str, str]]]:
    return [[(nodes[p], nodes[i]) for i, p in enumerate(t) if p >= 0 and cluster.zone_of(nodes[p]) !=
             cluster.zone_of(nodes[i])] for t in trees]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round, fewer repetitions (within 60 s)")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()
    from deploy.netns import NetnsCluster, probe_description, unavailable
    from network.topology import load_cluster

    targets = {"hfreduce/gloo@64MiB": 2.0, "cross_zone_edges_per_tree": 1, "probe_within": 0.15}
    why = unavailable()
    if why is not None:
        print(f"topology: skipped: network namespaces are not available here ({why})")
        print(json.dumps({"bench": "topology", "figures": {}, "ratios": {}, "targets": targets, "skipped": why,
                          "ok": True}))
        return 0
    t0 = time.monotonic()
    nc = NetnsCluster(load_cluster(ROOT / "deploy" / "clusters" / "local.toml"), f"b{os.getpid() % 100000}")
    times: dict[str, list[float]] = {"hfreduce": [], "gloo": []}
    correct, trees, nodes = True, None, None
    with tempfile.TemporaryDirectory(prefix="ff-topology-") as d:
        try:
            nc.up()
            path = probe_description(nc, Path(d))
            links = probe(nc, path, args.quick)
            port = 29700
            for _ in range(QUICK_ROUNDS if args.quick else ROUNDS):
                for lib in ("hfreduce", "gloo"):
                    port += 1
                    rep = run_allreduce(nc, lib, path, QUICK_REPS if args.quick else REPS, port)
                    times[lib] += rep["times"]
                    correct = correct and rep["correct"]
                    if lib == "hfreduce":
                        trees, nodes = rep["trees"], rep["nodes"]
        finally:
            nc.down()
    cluster = nc.cluster
    size = MIB << 20
    med = {lib: statistics.median(t) for lib, t in times.items()}
    gbps = {lib: size / m / 1e9 for lib, m in med.items()}
    ratio = round(med["gloo"] / med["hfreduce"], 3)
    floor = size * 8 / (cluster.interzone_gbps * 1e9) if cluster.interzone_gbps else None
    crossing = cross_edges(trees, nodes, cluster)
    worst = max((abs(x["gbit"] / x["shaped_gbit"] - 1) for x in links if x["shaped_gbit"]), default=0.0)
    ok = (ratio >= targets["hfreduce/gloo@64MiB"] and all(len(c) <= 1 for c in crossing)
          and worst <= targets["probe_within"] and correct and not any(x["error"] for x in links))
    if not args.json_only:
        print(f"namespace cluster {nc.tag}: {', '.join(f'{n} {nc.addresses[n]}' for n in cluster.ordered())}; "
              f"in-zone {cluster.node('n0').nic_gbps} Gbit/s, across zones {cluster.interzone_gbps} Gbit/s")
        print("link probe (Gbit/s, median of reps; shaped rate of the path in brackets), row = from:")
        names = cluster.ordered()
        by = {(x["src"], x["dst"]): x for x in links}
        print("from \\ to".ljust(10) + "".join(n.rjust(16) for n in names))
        for a in names:
            print(a.ljust(10) + "".join(("-" if a == b else f"{by[a, b]['gbit']:.2f} [{by[a, b]['shaped_gbit']}]")
                                        .rjust(16) for b in names))
        print(f"  worst deviation from the shaped rate: {worst * 100:.1f}% (target <= 15%)")
        for i, t in enumerate(trees):
            edges = ", ".join(f"{nodes[p]}->{nodes[c]}" for c, p in enumerate(t) if p >= 0)
            print(f"hfreduce tree {i}: root {nodes[t.index(-1)]}; parent->child {edges}; "
                  f"cross-zone edges {crossing[i]}")
        print(f"allreduce {MIB} MiB float32, 4 nodes x 1 rank, median of {len(times['hfreduce'])} calls:")
        for lib in ("hfreduce", "gloo"):
            print(f"  {lib:<9} {med[lib] * 1e3:8.1f} ms  {gbps[lib]:.3f} GB/s algbw")
        print(f"  hfreduce / gloo: {ratio}x (target >= 2x); results correct: {correct}")
        if floor:
            print(f"  floor (the other zone's sum across the inter-zone link): {floor * 1e3:.1f} ms; "
                  f"hfreduce at {floor / med['hfreduce']:.2f} of it, best possible vs gloo {med['gloo'] / floor:.2f}x")
        print(f"elapsed {time.monotonic() - t0:.1f} s")
    figures = {"allreduce_64MiB_ms": {lib: round(m * 1e3, 1) for lib, m in med.items()},
               "floor_ms": round(floor * 1e3, 1) if floor else None,
               "probe_gbit": {f"{x['src']}->{x['dst']}": x["gbit"] for x in links},
               "shaped_gbit": {f"{x['src']}->{x['dst']}": x["shaped_gbit"] for x in links},
               "trees": trees, "tree_nodes": nodes, "cross_zone_edges": [len(c) for c in crossing]}
    print(json.dumps({"bench": "topology", "figures": figures,
                      "ratios": {"hfreduce/gloo@64MiB": ratio, "probe_worst_deviation": round(worst, 3),
                                 "floor/hfreduce": round(floor / med["hfreduce"], 3) if floor else None},
                      "targets": targets, "correct": correct, "ok": ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
