"""The cluster description: loading, validation errors (each message checked), queries."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from network import ClusterFileError, load_cluster
from network.topology import Cluster, dump_cluster

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "deploy" / "clusters"


def small() -> dict:
    return {
        "cluster": {"name": "t"},
        "zone": [{"name": "za", "spines": 2}, {"name": "zb"}],
        "leaf": [{"name": "la0", "zone": "za"}, {"name": "la1", "zone": "za"}, {"name": "lb0", "zone": "zb"}],
        "node": [
            {"name": "a", "address": "127.0.0.2", "leaf": "la0", "gpus": 8, "cpus": 4, "memory_gib": 16},
            {"name": "b", "address": "127.0.0.3", "leaf": "lb0"},
            {"name": "c", "address": "127.0.0.4", "leaf": "la1"},
            {"name": "d", "address": "127.0.0.5", "leaf": "la0"},
        ],
        "service": [{"module": "network.probe", "nodes": "*", "port": 17100},
                    {"module": "fs3.mgmtd", "nodes": ["a"], "port": 17200, "health": "rpc"}],
        "fs3": {"replication": 3},
    }


def test_local_cluster_file():
    c = load_cluster(CLUSTERS / "local.toml")
    assert c.name == "local"
    assert len(c.zones) == 2 and len(c.leaves) == 2 and len(c.nodes) == 4
    assert all(n.address.startswith("127.0.0.") for n in c.nodes.values())
    assert {c.zone_of(n) for n in c.nodes} == set(c.zones)


def test_fireflyer2_file_matches_generator():
    from deploy.gen_fireflyer2 import generate

    text = (CLUSTERS / "fireflyer2.toml").read_text()
    assert text == generate(), "fireflyer2.toml is stale: run python -m deploy.gen_fireflyer2"
    c = load_cluster(CLUSTERS / "fireflyer2.toml")
    assert len(c.nodes) == 1250
    assert sum(n.gpus for n in c.nodes.values()) == 10000
    assert len(c.zones) == 2 and all(len(z.spines) == 20 for z in c.zones.values())
    per_zone = {z: [lf for lf in c.leaves.values() if lf.zone == z] for z in c.zones}
    assert all(len(v) == 40 for v in per_zone.values())
    sizes = [len(c.nodes_under_leaf(lf)) for lf in c.leaves]
    assert min(sizes) >= 15 and max(sizes) <= 16  # 20 down-ports per leaf, spread evenly


def test_queries():
    c = Cluster(small())
    assert c.zone_of("a") == "za" and c.leaf_of("a") == "la0"
    assert c.distance("a", "a") == 0
    assert c.distance("a", "d") == 2  # same leaf
    assert c.distance("a", "c") == 4  # same zone, other leaf
    assert c.distance("a", "b") == 6  # other zone
    assert [n.name for n in c.nodes_under_leaf("la0")] == ["a", "d"]
    # topology order keeps leaves together, zones in file order
    assert c.ordered() == ["a", "d", "c", "b"]
    assert c.ordered(["b", "c", "a"]) == ["a", "c", "b"]
    assert c.endpoint("fs3.mgmtd") == ("127.0.0.2", 17200)
    assert c.endpoint("network.probe", "c") == ("127.0.0.4", 17100)
    assert c.service("fs3.mgmtd").options == {"health": "rpc"}
    assert c.section("fs3") == {"replication": 3} and c.section("hfreduce") == {}
    assert c.zones["za"].spines == ("za-spine0", "za-spine1")
    a = c.node("a")
    assert (a.gpus, a.cpus, a.memory_gib) == (8, 4, 16.0)
    with pytest.raises(KeyError, match="no node 'zz'"):
        c.node("zz")
    with pytest.raises(KeyError, match="does not run on node"):
        c.endpoint("fs3.mgmtd", "b")


def test_dump_roundtrip(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(dump_cluster(small()))
    c = load_cluster(p)
    assert c.ordered() == Cluster(small()).ordered()


def _mut(fn):
    d = copy.deepcopy(small())
    fn(d)
    return d


BAD = [
    ("no cluster table", lambda d: d.pop("cluster"), "cluster: missing table [cluster]"),
    ("cluster name type", lambda d: d["cluster"].update(name=3), "cluster.name: expected a name"),
    ("unknown top-level", lambda d: d.update(nodes=[]), "nodes: unknown top-level key"),
    ("no zones", lambda d: d.update(zone=[]), "zone: at least one [[zone]] is required"),
    ("zone not array", lambda d: d.update(zone={"name": "x"}), "zone: expected an array of tables"),
    ("dup zone", lambda d: d["zone"].append({"name": "za"}), "zone[2].name: duplicate zone name 'za'"),
    ("bad spines", lambda d: d["zone"][0].update(spines="many"), "zone[0].spines: expected a count or a list"),
    ("leaf unknown zone", lambda d: d["leaf"][1].update(zone="zc"),
     "leaf[1] (la1).zone: unknown zone 'zc' (expected one of: za, zb)"),
    ("leaf missing zone", lambda d: d["leaf"][0].pop("zone"), "leaf[0] (la0).zone: missing required key"),
    ("node unknown leaf", lambda d: d["node"][2].update(leaf="nope"), "node[2] (c).leaf: unknown leaf 'nope'"),
    ("node dup name", lambda d: d["node"][3].update(name="a"), "node[3].name: duplicate node name 'a'"),
    ("node dup address", lambda d: d["node"][3].update(address="127.0.0.2"),
     "node[3] (d).address: address 127.0.0.2 is already used by node 'a'"),
    ("node bad address", lambda d: d["node"][0].update(address="not an address!"),
     "node[0] (a).address: expected an IPv4/IPv6 address or a host name"),
    ("node gpus type", lambda d: d["node"][0].update(gpus="8"), "node[0] (a).gpus: expected an integer >= 0, got a string '8'"),
    ("node gpus bool", lambda d: d["node"][0].update(gpus=True), "node[0] (a).gpus: expected an integer >= 0, got a boolean True"),
    ("node cpus zero", lambda d: d["node"][1].update(cpus=0), "node[1] (b).cpus: expected an integer >= 1, got 0"),
    ("node memory", lambda d: d["node"][1].update(memory_gib=-1), "node[1] (b).memory_gib: expected a number > 0"),
    ("node typo key", lambda d: d["node"][1].update(gpu=8), "node[1] (b).gpu: unknown key (allowed:"),
    ("node bad name", lambda d: d["node"][1].update(name="has space"), "node[1].name: expected a name"),
    ("service unknown node", lambda d: d["service"][1].update(nodes=["q"]),
     "service[1] (fs3.mgmtd).nodes: unknown node 'q'"),
    ("service bad port", lambda d: d["service"][0].update(port=70000), "service[0] (network.probe).port: expected a TCP port"),
    ("service port clash", lambda d: d["service"][1].update(port=17100),
     "service[1] (fs3.mgmtd).port: port 17100 on node 'a' is already used by 'network.probe'"),
    ("service twice", lambda d: d["service"].append({"module": "fs3.mgmtd", "nodes": ["b"], "port": 1}),
     "service[2] (fs3.mgmtd).module: service 'fs3.mgmtd' is declared twice"),
    ("service module", lambda d: d["service"][0].update(module="not a module"),
     "service[0].module: expected a dotted module name"),
    ("service nodes type", lambda d: d["service"][0].update(nodes=3), "service[0] (network.probe).nodes: expected \"*\" or a list"),
]


@pytest.mark.parametrize("mutate,expect", [(m, e) for _, m, e in BAD], ids=[n for n, _, _ in BAD])
def test_bad_descriptions(tmp_path, mutate, expect):
    p = tmp_path / "bad.toml"
    p.write_text(dump_cluster(_mut(mutate)))
    with pytest.raises(ClusterFileError) as ei:
        load_cluster(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: "), msg  # names the file
    assert expect in msg, msg  # names the key and what was expected


def test_missing_file(tmp_path):
    with pytest.raises(ClusterFileError, match="nope.toml: file not found"):
        load_cluster(tmp_path / "nope.toml")


def test_invalid_toml(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[cluster\nname = 1\n")
    with pytest.raises(ClusterFileError, match=r"x.toml: invalid TOML: .*line 1"):
        load_cluster(p)


def test_key_after_table_is_caught(tmp_path):
    # the classic TOML mistake: a top-level key written after a [[table]] lands inside that table
    p = tmp_path / "x.toml"
    text = ('[cluster]\nname = "t"\n[[zone]]\nname = "za"\n[[leaf]]\nname = "lx"\nzone = "za"\n'
            'node = [{ name = "a", address = "127.0.0.2", leaf = "lx" }]\n')
    p.write_text(text)
    with pytest.raises(ClusterFileError, match=r"leaf\[0\] \(lx\)\.node: unknown key"):
        load_cluster(p)
