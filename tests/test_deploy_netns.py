"""deploy.netns: a cluster of network namespaces with shaped links (real namespaces, bridges, tc).

One namespace cluster of deploy/clusters/local.toml (2 zones x 2 nodes; 2 Gbit/s in a zone, 0.5
across) serves the module; each test leaves it as it found it. Skipped with the reason where the
machine does not allow namespaces (not root, no iproute2, no tbf).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _waits import wait_until

from deploy.netns import NetnsCluster, NetnsError, path_gbit, probe_description, subnet_of, unavailable
from network.topology import load_cluster

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "deploy" / "clusters" / "local.toml"

needs_netns = pytest.mark.skipif(unavailable() is not None, reason=f"namespaces: {unavailable()}")


def _raw(**cluster) -> dict:
    import tomllib

    raw = tomllib.loads(LOCAL.read_text())
    raw["cluster"] = {"name": "x", **cluster}
    return raw


def test_link_rates_parse_default_and_validate():
    from network.errors import ClusterFileError
    from network.topology import Cluster

    raw = _raw(nic_gbps=2, uplink_gbps=4.0, interzone_gbps=0.5)
    raw["node"][3]["nic_gbps"] = 1.0
    raw["leaf"][1]["uplink_gbps"] = 3.0
    c = Cluster(raw)
    assert c.node("n0").nic_gbps == 2.0 and c.node("n3").nic_gbps == 1.0
    assert c.leaves["a-leaf0"].uplink_gbps == 4.0 and c.leaves["b-leaf0"].uplink_gbps == 3.0
    assert c.interzone_gbps == 0.5
    assert path_gbit(c, "n0", "n1") == 2.0 and path_gbit(c, "n2", "n3") == 1.0 and path_gbit(c, "n0", "n2") == 0.5
    plain = Cluster(_raw())  # absent: unshaped
    assert plain.node("n0").nic_gbps is None and plain.interzone_gbps is None
    assert path_gbit(plain, "n0", "n2") is None
    for bad in ({"nic_gbps": 0}, {"interzone_gbps": "fast"}, {"uplink_gbps": -1}):
        with pytest.raises(ClusterFileError, match=f"cluster.{next(iter(bad))}: expected a link rate"):
            Cluster(_raw(**bad))


def test_plan_names_fit_and_three_zones_meet_at_a_core():
    raw = _raw(interzone_gbps=1.0)
    raw["zone"].append({"name": "zone-c", "spines": ["c-spine"]})
    raw["leaf"].append({"name": "c-leaf0", "zone": "zone-c"})
    raw["node"].append({"name": "n4", "address": "127.0.0.6", "leaf": "c-leaf0"})
    from network.topology import Cluster

    nc = NetnsCluster(Cluster(raw), "abcdef")
    devs = [d for x in nc.links_ for ns, d in x.devs if not ns] + nc.bridges  # root namespace: unique
    assert all(len(d) <= 15 for d in devs) and len(set(devs)) == len(devs)
    core = [x for x in nc.links_ if x.b == "core"]
    assert [x.a for x in core] == ["zone-a-spine0", "zone-b-spine0", "c-spine"]
    assert nc.wrap("n4", ["true"]) == ["ip", "netns", "exec", "ffabcdef-n4", "true"]
    assert subnet_of("abcdef") == nc.subnet and subnet_of("abcdef") != subnet_of("abcdeg")


def _leftovers(tag: str) -> list[str]:
    """Namespaces and interfaces (bridges, veths) of this tag that exist now."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in ns.splitlines() if line.strip()]
    names += [line.split(":", 2)[1].strip().split("@")[0] for line in links.splitlines()]
    return [n for n in names if n.startswith(f"ff{tag}-")]


@pytest.fixture(scope="module")
def nc():
    c = NetnsCluster(load_cluster(LOCAL), f"t{os.getpid() % 100000}")
    c.up()
    yield c
    c.down()
    assert not _leftovers(c.tag)


@needs_netns
def test_up_down_leaves_nothing_and_names_carry_the_tag():
    tag = f"u{os.getpid() % 100000}"
    c = NetnsCluster(load_cluster(LOCAL), tag)
    addrs = c.up()
    try:
        assert set(addrs) == {"n0", "n1", "n2", "n3"}
        assert all(a.startswith(str(subnet_of(tag).network_address)[:-1]) for a in addrs.values())
        made = set(_leftovers(tag))
        assert {f"ff{tag}-n{i}" for i in range(4)} | {f"ff{tag}-e{i}" for i in range(4)} <= made  # namespaces, cables
        assert {f"ff{tag}-L0", f"ff{tag}-L1", f"ff{tag}-S0", f"ff{tag}-S1", f"ff{tag}-x0"} <= made
        ifaces = made - set(c.namespaces.values())
        assert ifaces and all(len(i) <= 15 for i in ifaces)
        with pytest.raises(NetnsError, match="already exists"):
            NetnsCluster(load_cluster(LOCAL), tag).up()
        # the state round-trips; the copy removes everything, and again without complaint
        copy = NetnsCluster.from_state(c.to_state())
        assert copy.addresses == addrs and copy.host_address == c.host_address
    finally:
        copy.down()
        copy.down()
    assert _leftovers(tag) == []


@needs_netns
def test_bad_tag_and_unknown_link_are_named(nc):
    with pytest.raises(NetnsError, match="tag"):
        NetnsCluster(load_cluster(LOCAL), "Bad-Tag!")
    with pytest.raises(NetnsError, match="no link between 'n0' and 'n3'"):
        nc.link("n0", "n3", False)
    with pytest.raises(NetnsError, match="no node 'n9'"):
        nc.wrap("n9", ["true"])
    links = {(x["a"], x["b"]): x for x in nc.links()}
    assert links[("n0", "a-leaf0")] == {"a": "n0", "b": "a-leaf0", "rate_gbit": 2.0, "up": True}
    assert links[("zone-a-spine0", "zone-b-spine0")]["rate_gbit"] == 0.5


@needs_netns
def test_probe_sees_the_shaped_rates(nc, tmp_path):
    from network.auth import load_cluster_key
    from network.probe import probe_matrix
    from network.rpc import RpcClient

    path = probe_description(nc, tmp_path)
    cluster = load_cluster(path)
    key = load_cluster_key(cluster)
    procs = [subprocess.Popen(nc.wrap(n, [sys.executable, "-m", "network.probe", "serve", "--cluster", str(path),
                                          "--node", n, "--log-level", "WARNING"]), cwd=ROOT)
             for n in ("n0", "n1", "n2")]

    def up(n: str) -> bool:
        try:
            with RpcClient(cluster.node(n).address, 17100, timeout=2, connect_timeout=0.5, credential=key) as c:
                return bool(c.call("rpc.ping"))
        except Exception:  # noqa: BLE001 - not up yet
            return False

    try:
        for n in ("n0", "n1", "n2"):
            wait_until(lambda n=n: up(n), 20, f"probe responder in {n}'s namespace")
        # in a zone: the NICs (2 Gbit/s); across zones: the inter-zone link (0.5 Gbit/s)
        for pair, gbit in ((["n0", "n1"], 2.0), (["n0", "n2"], 0.5)):
            res = probe_matrix(cluster, pair, size=8 << 20, reps=3, pings=2, spawn="never")
            for r in res:
                assert r.error is None
                seen = r.gbps_median * 8
                assert abs(seen / gbit - 1) <= 0.15, (r.src, r.dst, seen, gbit)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


RANK = textwrap.dedent("""
    import sys, numpy as np, hfreduce
    pg = hfreduce.init(timeout=3)
    x = np.ones(1 << 20, np.float32)
    i = 0
    try:
        while True:
            hfreduce.allreduce(x)
            i += 1
            if i == 2:
                print("running", flush=True)
    except hfreduce.HFReduceError as exc:
        print(f"ERROR {type(exc).__name__} rank={exc.rank} node={exc.node}: {exc}", flush=True)
        sys.exit(3)
""")


@needs_netns
def test_a_cut_link_fails_a_running_allreduce_naming_the_peer(nc):
    ranks = {0: "n0", 1: "n2"}  # across the zones
    procs = {}
    for r, n in ranks.items():
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR=nc.addresses["n0"], MASTER_PORT="29555", HAI_NODE_NAME=n)
        env.pop("HAI_CLUSTER_FILE", None)
        procs[r] = subprocess.Popen(nc.wrap(n, [sys.executable, "-c", RANK]), env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for p in procs.values():
            line = p.stdout.readline().strip()
            assert line == "running", line + p.stdout.read()
        nc.link("n2", "b-leaf0", False)  # n2's cable: a real partition
        t0 = time.monotonic()
        outs = {r: p.communicate(timeout=20)[0] for r, p in procs.items()}
        elapsed = time.monotonic() - t0
    finally:
        nc.link("n2", "b-leaf0", True)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 3 for p in procs.values()), outs
    # each survivor names its peer: rank, node and (lanes) its address on the fabric
    assert "rank=1 node=n2" in outs[0] and "rank 1 (node n2" in outs[0], outs[0]
    assert "rank=0 node=n0" in outs[1] and "rank 0 (node n0" in outs[1], outs[1]
    assert nc.addresses["n2"] in outs[0] or "leader rank 1" in outs[0], outs[0]
    assert elapsed < 3 + 10, elapsed  # the group's timeout (3 s) plus a margin for a loaded machine
