"""The scheduler simulator and its traces: small clusters and hand-computed figures (a few seconds in all)."""

from __future__ import annotations

import io

import pytest

from haiplatform import policy
from haiplatform.policy import NodeView, PolicyConfig
from haiplatform.sim import SimParams, Simulator, main
from haiplatform.states import AUTO, PRIORITIES
from haiplatform.trace import TraceError, TraceJob, generate, parse_trace, write_trace

CLUSTER = """
[cluster]
name = "simtest"

[[zone]]
name = "za"
spines = 1

[[zone]]
name = "zb"
spines = 1

[[leaf]]
name = "a0"
zone = "za"

[[leaf]]
name = "a1"
zone = "za"

[[leaf]]
name = "b0"
zone = "zb"
"""


def cluster_file(tmp_path, per_leaf=2):
    text = CLUSTER
    for li, leaf in enumerate(("a0", "a1", "b0")):
        for i in range(per_leaf):
            text += (f'\n[[node]]\nname = "{leaf}n{i}"\naddress = "10.0.{li}.{i + 1}"\nleaf = "{leaf}"\n'
                     f"gpus = 8\ncpus = 8\nmemory_gib = 16\n")
    p = tmp_path / "cluster.toml"
    p.write_text(text)
    return p


def leaf_nodes(n, leaf="l0", zone="z0"):
    return [NodeView(f"{leaf}n{i}", zone, leaf, 8) for i in range(n)]


def run(nodes, jobs, name="fireflyer", cfg=None, **params):
    return Simulator(nodes, jobs, policy.PROFILES[name], cfg or PolicyConfig(), SimParams(**params)).run()


# -- traces ---------------------------------------------------------------------------------------

def test_trace_columns_gpus_to_nodes_and_defaults():
    text = ("# a comment\nsubmit_time,user,gpus,duration,priority,checkpoint_interval,time_limit\n"
            "5,bob,9,100,high,,\n0,alice,8,60,auto,30,120\n1,carol,1,10,7,,\n")
    jobs = parse_trace(text, gpus_per_node=8)
    assert [(j.user, j.nodes) for j in jobs] == [("alice", 1), ("carol", 1), ("bob", 2)]   # sorted by submit time
    alice, carol, bob = jobs
    assert alice.priority == AUTO and alice.checkpoint_interval == 30 and alice.time_limit == 120
    assert carol.priority == 7 and bob.priority == PRIORITIES["high"]
    assert bob.checkpoint_interval == 0 and bob.time_limit == 0
    # the writer's output reads back the same
    buf = io.StringIO()
    write_trace(jobs, buf)
    assert parse_trace(buf.getvalue()) == jobs


@pytest.mark.parametrize("text,message", [
    ("", "empty trace"),
    ("user,nodes,duration\n", "lacks column 'submit_time'"),
    ("submit_time,user,duration\n", "needs a 'nodes' or a 'gpus' column"),
    ("submit_time,user,nodes,duration,colour\n", "line 1: unknown column 'colour'"),
    ("submit_time,user,nodes,duration\n0,a,1,10\n5,b,x,10\n", "line 3, column 'nodes': 'x' is not a number"),
    ("submit_time,user,nodes,duration\n0,a,1.5,10\n", "line 2, column 'nodes': '1.5' is not a whole number"),
    ("submit_time,user,nodes,duration\n-1,a,1,10\n", "line 2, column 'submit_time'"),
    ("submit_time,user,nodes,duration\n0,a,1,0\n", "line 2, column 'duration': '0' must be a finite number > 0"),
    ("submit_time,user,nodes,duration\n0,,1,10\n", "line 2, column 'user': empty"),
    ("submit_time,user,nodes,duration,priority\n0,a,1,10,urgent\n", "line 2, column 'priority': unknown priority"),
    ("submit_time,user,nodes,duration\n0,a,1\n", "line 2: 3 fields, the header has 4"),
    ("submit_time,user,nodes,gpus,duration\n0,a,,,10\n", "line 2, column 'gpus': empty"),
])
def test_trace_errors_name_line_and_column(text, message):
    with pytest.raises(TraceError) as exc:
        parse_trace(text, source="t.csv")
    assert str(exc.value).startswith("t.csv: ") and message in str(exc.value)


def test_generator_offers_the_load_and_follows_the_mix():
    jobs = generate(200, hours=12, load=1.2, seed=3)
    assert jobs == generate(200, hours=12, load=1.2, seed=3)
    work = sum(j.nodes * j.duration for j in jobs)
    assert 1.2 * 200 * 12 * 3600 <= work <= 1.3 * 200 * 12 * 3600
    assert all(0 <= j.submit_time < 12 * 3600 for j in jobs)
    single = [j for j in jobs if j.nodes == 1]
    big = [j for j in jobs if j.nodes >= 32]
    assert len(single) > len(jobs) / 2                               # most jobs are small ...
    assert sum(j.nodes * j.duration for j in big) > work / 2         # ... a few big ones take most of the time
    assert all(j.time_limit == 0 or j.time_limit >= j.duration for j in jobs)   # estimates are over-estimates
    assert {j.priority for j in jobs} >= {PRIORITIES["normal"], PRIORITIES["high"], PRIORITIES["low"]}


# -- the simulator --------------------------------------------------------------------------------

def test_report_on_a_hand_computed_trace():
    # two nodes in one leaf, tick 10 s, start latency 2 s: X and Y start at 0 and end at 102 and 202;
    # Z (both nodes) arrives at 5, waits, starts at the cycle of 210 and ends at 262
    jobs = [TraceJob(0, "x", 1, 100), TraceJob(0, "y", 1, 200), TraceJob(5, "z", 2, 50)]
    for name in policy.PROFILES:
        r = run(leaf_nodes(2), jobs, name, tick=10, start_latency=2)
        assert (r.completed, r.failed, r.unfinished, r.preemptions) == (3, 0, 0, 0)
        assert r.queue_delay == {"mean": 205 / 3, "p50": 0, "p90": 205, "p99": 205}
        assert r.jct == {"mean": (102 + 202 + 257) / 3, "p50": 202, "p99": 257}
        assert r.makespan == 262 and r.window == 5
        assert r.utilisation == 1.0                              # both nodes held over [0, 5]
        assert r.utilisation_makespan == pytest.approx((2 * 102 + 100 + 2 * 52) / (2 * 262))
        assert (r.placements, r.cross_leaf, r.cross_zone) == (3, 0, 0)


def test_deterministic_for_a_seed():
    # 12 nodes in 3 leaves, 2 zones; an overloaded trace of 4 users, so both policies preempt
    nodes = leaf_nodes(4, "a0", "za") + leaf_nodes(4, "a1", "za") + leaf_nodes(4, "b0", "zb")
    jobs = generate(12, hours=8, load=2.0, seed=1, users=4)
    for name in ("fireflyer", "reference-fifo"):   # the two that preempt ("fifo" never does)
        a = run(nodes, jobs, name, cfg=PolicyConfig(seed=7)).to_dict(series=True)
        b = run(nodes, jobs, name, cfg=PolicyConfig(seed=7)).to_dict(series=True)
        a.pop("wall_s"), b.pop("wall_s")
        assert a == b
        assert a["completed"] == len(jobs) and a["preemptions"] > 0 and a["cross_leaf"] > 0


def test_preempted_job_loses_exactly_the_work_since_its_checkpoint():
    # A (low, checkpoints every 600 s of work) holds both nodes; B (high, another user) arrives at 1000:
    # A ran 998 s (its work began at 2), saved 600, loses 398 s on 2 nodes; it stops at 1000 + 1 + 5,
    # B starts at the cycle of 1010 and ends at 1112; A resumes at 1120 with 9,400 s left
    a = TraceJob(0, "alice", 2, 10000, PRIORITIES["low"], checkpoint_interval=600)
    b = TraceJob(1000, "bob", 2, 100, PRIORITIES["high"])
    r = run(leaf_nodes(2), [a, b], cfg=PolicyConfig(min_run_time=300), tick=10, start_latency=2,
            suspend_ack=1, suspend_grace=5)
    assert r.preemptions == 1
    assert r.lost_node_hours == pytest.approx(398 * 2 / 3600)
    assert r.completed == 2 and r.makespan == pytest.approx(1120 + 2 + 9400)
    # without checkpoints every second of it is lost
    r = run(leaf_nodes(2), [TraceJob(0, "alice", 2, 10000, PRIORITIES["low"]), b],
            cfg=PolicyConfig(min_run_time=300), tick=10, start_latency=2, suspend_ack=1, suspend_grace=5)
    assert r.lost_node_hours == pytest.approx(998 * 2 / 3600)
    assert r.makespan == pytest.approx(1120 + 2 + 10000)


def test_backfill_shows_in_the_simulator():
    # 4 nodes: L (2 nodes, limit 1 h) runs; B (4 nodes) is blocked until L ends; S (1 node, 10 min,
    # limit 15 min) arrives after B and fits before L's reserved end: it finishes before B starts
    jobs = [TraceJob(0, "l", 2, 3000, time_limit=3600), TraceJob(10, "b", 4, 600, time_limit=1200),
            TraceJob(20, "s", 1, 600, time_limit=900)]
    sim = Simulator(leaf_nodes(4), jobs, policy.PROFILES["fireflyer"], PolicyConfig(), SimParams())
    sim.run()
    b, s = sim.chains[1], sim.chains[2]
    assert s.finished_at < b.first_start
    # strict order (reference-fifo): S waits behind B
    sim = Simulator(leaf_nodes(4), jobs, policy.PROFILES["reference-fifo"], PolicyConfig(), SimParams())
    sim.run()
    assert sim.chains[2].first_start >= sim.chains[1].first_start


def test_job_larger_than_the_cluster_is_refused():
    r = run(leaf_nodes(2), [TraceJob(0, "a", 3, 10), TraceJob(0, "b", 1, 10)])
    assert (r.refused, r.completed, r.unfinished) == (1, 1, 0)


# -- hai sim --------------------------------------------------------------------------------------

def test_main_compare_writes_report_and_png(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("submit_time,user,gpus,duration\n0,a,16,100\n0,b,8,300\n5,c,48,50\n")
    out = tmp_path / "out"
    assert main(["--cluster", str(cluster_file(tmp_path)), "--trace", str(trace), "--compare", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "policy fireflyer: 3 jobs (3 completed" in text and "policy reference-fifo" in text
    assert "fireflyer against reference-fifo: utilisation" in text
    assert (out / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json
    rep = json.loads((out / "report.json").read_text())
    assert [r["policy"] for r in rep["runs"]] == ["fireflyer", "reference-fifo"]
    assert rep["runs"][0]["placements"] == 3 and len(rep["runs"][0]["series"]["t_h"]) >= 2
    assert main(["--cluster", str(cluster_file(tmp_path)), "--trace", str(trace), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["completed"] == 3


def test_main_errors(tmp_path, capsys):
    cf = str(cluster_file(tmp_path))
    bad = tmp_path / "bad.csv"
    bad.write_text("submit_time,user,nodes,duration\n0,a,one,10\n")
    assert main(["--cluster", cf, "--trace", str(bad)]) == 2
    assert "line 2, column 'nodes'" in capsys.readouterr().err
    assert main(["--cluster", cf, "--trace", str(tmp_path / "none.csv")]) == 2
    assert "trace file not found" in capsys.readouterr().err
    assert main(["--cluster", cf, "--trace", str(bad), "--policy", "sjf"]) == 2
    assert "unknown policy 'sjf' (known: fifo, fireflyer, reference-fifo)" in capsys.readouterr().err
    assert main(["--cluster", str(tmp_path / "nope.toml"), "--trace", str(bad)]) == 2
    assert "file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--trace", str(bad)])
    assert exc.value.code == 2
