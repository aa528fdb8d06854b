"""Prometheus metrics (docs/metrics.md): the token, the exporter's merge, rpc.metrics, hfreduce's published
counters; and on one local cluster (every service, an exporter per node): every /metrics parses, refuses a
request without the token, and moves when a job runs an allreduce and a file is written to fs3; the
Grafana dashboard queries only metrics the services export."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _fs3 import fs3_serving
from _waits import wait_until
from prometheus_client.parser import text_string_to_metric_families

from network import RemoteError, RpcClient, RpcServer, derive, new_cluster_key
from network.auth import Credential
from network.metrics import check_bearer, metrics_token, relabel, render

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "fireflyer.json"


# -- pure parts ------------------------------------------------------------------------------------

def test_token_is_checked_against_every_secret_of_the_key():
    key = new_cluster_key()
    tok = metrics_token(key)
    assert tok == metrics_token(key) and len(tok) == 64
    assert check_bearer(f"Bearer {tok}", key) is None
    assert check_bearer(f"bearer  {tok} ", key) is None
    assert "no Authorization" in check_bearer(None, key)
    assert "Bearer" in check_bearer(f"Basic {tok}", key)
    assert "wrong metrics token" in check_bearer("Bearer " + "0" * 64, key)
    # the token is not the cluster key nor a derived RPC credential's secret
    assert tok != key.secret.hex() and tok != derive(key, "metrics", None).secret.hex()
    # key rotation: a file with the new key first and the old one second accepts both tokens
    new = new_cluster_key()
    rotated = Credential(key.key_id, new.secret, None, (key.secret,))
    assert check_bearer(f"Bearer {tok}", rotated) is None
    assert check_bearer(f"Bearer {metrics_token(new)}", rotated) is None
    assert check_bearer(f"Bearer {metrics_token(new)}", key) is not None


def test_relabel_merges_one_family_from_several_services():
    a = ('# HELP x_total calls\n# TYPE x_total counter\nx_total{method="m"} 2.0\n'
         '# HELP g a gauge\n# TYPE g gauge\ng 1.0\n')
    b = '# HELP x_total calls\n# TYPE x_total counter\nx_total{method="m"} 5.0\n# TYPE g counter\ng_total 1.0\n'
    fams = relabel([({"service": "s1", "node": "n0"}, a), ({"service": "s2", "node": "n0"}, b)])
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()

    class C:
        def collect(self):
            return fams

    reg.register(C())
    text = render(reg).decode()
    assert text.count("# TYPE x_total counter") == 1  # one family, both services' samples
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert {(s.labels["service"], s.value) for s in parsed["x"].samples} == {("s1", 2.0), ("s2", 5.0)}
    assert [s.labels["service"] for s in parsed["g"].samples] == ["s1"]  # s2's g had another type: dropped


def test_rpc_metrics_count_calls_and_are_for_services_only():
    key = new_cluster_key()
    srv = RpcServer("127.0.0.1", 0, auth=key, name="t").start()
    srv.register("t.echo", lambda a, p, c: a)
    srv.register("t.boom", lambda a, p, c: 1 / 0)
    try:
        with RpcClient(*srv.address, credential=key, timeout=5) as c:
            for _ in range(3):
                c.call("t.echo", {"x": 1})
            with pytest.raises(RemoteError):
                c.call("t.boom")
            fams = {f.name: f for f in text_string_to_metric_families(bytes(c.call("rpc.metrics").payload).decode())}
        calls = {(s.labels["method"], s.labels["outcome"]): s.value for s in fams["fireflyer_rpc_requests"].samples}
        assert calls[("t.echo", "ok")] == 3 and calls[("t.boom", "error")] == 1
        count = {s.labels["method"]: s.value for s in fams["fireflyer_rpc_request_seconds"].samples
                 if s.name.endswith("_count")}
        assert count["t.echo"] == 3
        user = derive(key, "user:alice", None)  # a client, not a service: may not read the metrics
        with RpcClient(*srv.address, credential=user, timeout=5) as c, pytest.raises(RemoteError) as exc:
            c.call("rpc.metrics")
        assert exc.value.kind == "PermissionDenied"
    finally:
        srv.stop()


def test_hfreduce_published_counters_are_read_as_hostile(tmp_path, monkeypatch):
    from hfreduce import counters

    monkeypatch.setattr(counters, "_stats", {})
    counters.record("allreduce", 4096, 0.5, True)
    counters.record("allreduce", 4096, 0.25, False)
    assert counters.metrics() == {"allreduce": {"count": 2, "bytes": 8192, "seconds": 0.75, "errors": 1}}
    p = counters.publish(tmp_path / "hfreduce-rank0.json")
    assert counters.load(p) == {"allreduce": {"count": 2.0, "bytes": 8192.0, "seconds": 0.75, "errors": 1.0}}
    link = tmp_path / "hfreduce-rank1.json"
    link.symlink_to(p)
    assert counters.load(link) is None  # never through a link
    for bad in ('{"ops": {"allreduce": {"count": -1, "bytes": 0, "seconds": 0, "errors": 0}}}',
                '{"ops": {"allreduce": {"count": NaN, "bytes": 0, "seconds": 0, "errors": 0}}}',
                '{"ops": []}', "x" * (counters.MAX_FILE_BYTES + 1)):
        (tmp_path / "bad.json").write_text(bad)
        assert counters.load(tmp_path / "bad.json") is None, bad
    (tmp_path / "odd.json").write_text('{"ops": {"rm -rf": {"count": 1, "bytes": 0, "seconds": 0, "errors": 0}}}')
    assert counters.load(tmp_path / "odd.json") == {}  # unknown kinds are not labels


# -- one local cluster ---------------------------------------------------------------------------------

JOB = """
import os, sys, time
import numpy as np
import hfreduce
from hfreduce import counters
hfreduce.init()
a = np.ones(1 << 16, np.float32)
for _ in range(3):
    hfreduce.allreduce(a)
counters.publish()
deadline = time.time() + 60
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.05)
hfreduce.destroy()
"""


@pytest.fixture(scope="module")
def jobdir():
    from deploy.local import pass_for_jobs

    pass_for_jobs(sys.executable, ROOT / "pyproject.toml")
    d = Path(tempfile.mkdtemp(prefix="fireflyer-metrics-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def lc(jobdir):
    from deploy.local import LocalCluster

    lc = LocalCluster(ROOT / "deploy" / "clusters" / "local.toml", jobdir / "run", ports="auto").up()
    try:
        wait_until(lambda: fs3_serving(lc), 30, "every storage server registered and serving")
        yield lc
    finally:
        lc.down()


def _get(url: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _token(lc) -> str:
    return (lc.run_dir / "secrets" / "metrics.token").read_text().strip()


def _urls(lc) -> dict[str, str]:
    def url(module: str, node: str | None = None) -> str:
        addr, port = lc.cluster.endpoint(module, node)
        return f"http://{addr}:{port}/metrics"

    out = {n: url("network.metrics", n) for n in lc.cluster.service("network.metrics").nodes}
    out["api"] = url("haiplatform.api")
    return out


def scrape(lc) -> dict[str, list]:
    """Every sample of every /metrics of the cluster, by sample name (each with its labels)."""
    out: dict[str, list] = {}
    for where, url in _urls(lc).items():
        code, text = _get(url, _token(lc))
        assert code == 200, (where, code, text)
        for fam in text_string_to_metric_families(text):  # raises on text Prometheus could not read
            for s in fam.samples:
                out.setdefault(s.name, []).append(s)
    return out


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, ()) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def work(lc, jobdir):
    """Scrapes before, during and after: a 2-node job running three allreduces, a file written to and
    read back from fs3."""
    from fs3 import FileSystem
    from haiplatform.client import HaiClient

    before = scrape(lc)
    addr, port = lc.cluster.endpoint("haiplatform.api")
    c = HaiClient(f"http://{addr}:{port}", (lc.run_dir / "hai" / "admin.token").read_text().strip(), timeout=30)
    try:
        wait_until(lambda: len([n for n in c.nodes() if n["state"] == "up"]) == 4, 30, "4 agents registered")
        script, go = jobdir / "job.py", jobdir / "go"
        script.write_text(JOB)
        j = c.submit({"name": "metrics", "command": [sys.executable, str(script), str(go)], "nodes": 2,
                      "procs_per_node": 1})
        during = wait_until(lambda: (s := scrape(lc)) and total(s, "fireflyer_hfreduce_ops_total", op="allreduce")
                            >= 6 and s, 60, "both ranks' allreduce counters on their agents")
        go.write_text("")
        assert c.wait(j["id"], timeout=60)["status"] == "succeeded"
    finally:
        c.close()
    data = os.urandom(3 << 20)
    with FileSystem(lc.cluster_file) as fs:
        fs.write_file("/metrics-test", data)
        assert fs.read_file("/metrics-test") == data
    after = wait_until(lambda: (s := scrape(lc)) and total(s, "fireflyer_hai_job_ends_total", status="succeeded")
                       > total(before, "fireflyer_hai_job_ends_total", status="succeeded") and s, 30,
                       "the job's end counted")
    return {"before": before, "during": during, "after": after, "size": len(data)}


def test_every_service_is_scraped_and_every_metrics_parses(lc):
    s = scrape(lc)
    up = {(x.labels["node"], x.labels["service"]): x.value for x in s["fireflyer_scrape_up"]}
    expect = {(n, svc.module) for svc in lc.cluster.services for n in svc.nodes
              if svc.module not in ("network.metrics", "haiplatform.api")}
    assert set(up) == expect and all(v == 1.0 for v in up.values()), up
    assert total(s, "fireflyer_fs3_chains", health="healthy") > 0
    wait_until(lambda: total(scrape(lc), "fireflyer_hai_nodes", state="up", drained="false") == 4, 30,
               "the scheduler's gauge of the 4 nodes up")
    assert total(s, "fireflyer_api_requests_total", route="/v1/agent/sync") > 0


def test_metrics_need_the_token(lc):
    for where, url in _urls(lc).items():
        assert _get(url, None)[0] == 401, where
        assert _get(url, "0" * 64)[0] == 401, where
    code, body = _get(_urls(lc)["n1"].replace("/metrics", "/healthz"), None)
    assert (code, body) == (200, "ok\n")  # says nothing else
    user = derive(lc.credential, "user:alice", None)
    with RpcClient(*lc.cluster.endpoint("fs3.storage", "n1"), credential=user, timeout=5) as c, \
            pytest.raises(RemoteError, match="PermissionDenied"):
        c.call("rpc.metrics")


def test_a_job_moves_the_scheduler_agent_and_hfreduce_counters(work):
    b, d, a = work["before"], work["during"], work["after"]
    assert total(a, "fireflyer_hai_job_starts_total") >= total(b, "fireflyer_hai_job_starts_total") + 1
    assert total(a, "fireflyer_agent_ranks_started_total") == total(b, "fireflyer_agent_ranks_started_total") + 2
    assert total(a, "fireflyer_agent_ranks_ended_total", status="succeeded") == \
        total(b, "fireflyer_agent_ranks_ended_total", status="succeeded") + 2
    assert total(a, "fireflyer_hai_cycle_seconds_count") > total(b, "fireflyer_hai_cycle_seconds_count")
    ranks = {(x.labels["rank"], x.labels["service"]) for x in d["fireflyer_hfreduce_ops_total"]
             if x.labels["op"] == "allreduce" and x.value == 3}
    assert ranks == {("0", "haiplatform.agent"), ("1", "haiplatform.agent")}
    assert total(d, "fireflyer_hfreduce_bytes_total", op="allreduce") == 2 * 3 * (1 << 18)
    assert total(d, "fireflyer_agent_ranks_running") == 2


def test_an_fs3_write_moves_bytes_per_target(work):
    b, a, size = work["before"], work["after"], work["size"]
    written = total(a, "fireflyer_fs3_storage_bytes_total", op="write") - \
        total(b, "fireflyer_fs3_storage_bytes_total", op="write")
    assert written >= 3 * size  # every replica of a 3-replica chain counts its bytes
    assert total(a, "fireflyer_fs3_storage_bytes_total", op="read") - \
        total(b, "fireflyer_fs3_storage_bytes_total", op="read") >= size
    targets = {x.labels["target"] for x in a["fireflyer_fs3_storage_ops_total"] if x.labels["op"] == "write"}
    assert len(targets) >= 3
    assert total(a, "fireflyer_rpc_requests_total", service="fs3.meta", outcome="ok") > \
        total(b, "fireflyer_rpc_requests_total", service="fs3.meta", outcome="ok")


def test_the_dashboard_queries_only_exported_metrics(work):
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 10
    names = {n for e in exprs for n in re.findall(r"\bfireflyer_[a-z0-9_]+", e)}
    exported = set(work["during"]) | set(work["after"])
    assert names <= exported, sorted(names - exported)
    for want in ("fireflyer_hai_queue_jobs", "fireflyer_hai_cycle_seconds_bucket", "fireflyer_hai_preemptions_total",
                 "fireflyer_fs3_storage_bytes_total", "fireflyer_fs3_chains", "fireflyer_hfreduce_bytes_total"):
        assert want in names, want


def test_agent_labels_hfreduce_counters_with_the_chain_id_newest_attempt_only(tmp_path, monkeypatch):
    """hai_job is the id users type (the chain, $HAI_JOB_ID), and two attempts of one chain give one series."""
    import threading
    from types import SimpleNamespace

    from haiplatform.agent import Agent, Proc
    from hfreduce import counters

    procs = {}
    for attempt, n in ((7, 1), (9, 2)):  # chain 7: attempt 7 ended, attempt 9 (its resumption) runs
        d = tmp_path / f"job-{attempt}"
        d.mkdir()
        monkeypatch.setattr(counters, "_stats", {})
        for _ in range(n):
            counters.record("allreduce", 16, 0.1, True)
        counters.publish(d / "hfreduce-rank0.json")
        procs[(attempt, 0)] = Proc(attempt, 0, None, d / "log", d, chain_id=7, done=attempt == 7)
    fams = Agent.collect_metrics(SimpleNamespace(lock=threading.Lock(), procs=procs, counts={}))
    (ops,) = [f for f in fams if f.name == "fireflyer_hfreduce_ops"]
    assert [(s.labels["hai_job"], s.labels["rank"], s.value) for s in ops.samples] == [("7", "0", 2.0)]


def test_scheduler_queue_gauges_of_a_level_go_back_to_0_when_its_jobs_leave():
    from haiplatform.policy import JobView, Snapshot
    from haiplatform.scheduler import SchedulerMetrics
    from haiplatform.states import AUTO

    m = SchedulerMetrics()
    m.observe(Snapshot(100.0, (JobView(1, "a", 1, priority=AUTO, submitted_at=40.0),
                               JobView(2, "a", 1, priority=7, submitted_at=90.0))), [], 0.01)
    got = lambda name, lv: m.registry.get_sample_value(name, {"priority": lv})  # noqa: E731
    assert (got("fireflyer_hai_queue_jobs", "auto"), got("fireflyer_hai_queue_jobs", "other")) == (1.0, 1.0)
    assert got("fireflyer_hai_queue_oldest_wait_seconds", "auto") == 60.0
    m.observe(Snapshot(101.0), [], 0.01)  # both started or left: every level seen reads 0, not its last value
    for lv in ("auto", "other", "normal"):
        assert got("fireflyer_hai_queue_jobs", lv) == 0.0 and got("fireflyer_hai_queue_oldest_wait_seconds", lv) == 0.0


def test_api_metrics_retry_a_key_that_did_not_load():
    """A key missing at the first scrape is 503, not forever: it is asked for again and then used."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from network.errors import AuthError
    from network.metrics import AsgiMetrics

    key = new_cluster_key()
    calls = []

    def key_fn():
        calls.append(1)
        if len(calls) == 1:
            raise AuthError("no cluster key file yet")
        return key

    m = AsgiMetrics(None, CollectorRegistry(), key_fn)
    m.KEY_RETRY = 0.0

    def scrape(token):
        sent = []

        async def send(msg):
            sent.append(msg)
        scope = {"type": "http", "path": "/metrics", "method": "GET",
                 "headers": [(b"authorization", f"Bearer {token}".encode())]}
        asyncio.run(m._serve(scope, send))
        return sent[0]["status"]

    assert scrape(metrics_token(key)) == 503
    assert scrape(metrics_token(key)) == 200 and scrape("0" * 64) == 401 and len(calls) == 2  # kept once loaded


def test_exporter_bounds_open_connections_before_any_read():
    """Idle connections of a stranger hold at most max_connections threads; one more is closed at once."""
    import socket
    import threading

    from prometheus_client import CollectorRegistry

    from network.metrics import MetricsHTTPServer

    srv = MetricsHTTPServer(("127.0.0.1", 0), CollectorRegistry(), new_cluster_key(), max_connections=2)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    addr = srv.server_address
    try:
        idle = [socket.create_connection(addr, timeout=5) for _ in range(2)]
        wait_until(lambda: srv.connections._value == 0, 5, "both idle connections held")
        extra = socket.create_connection(addr, timeout=5)
        assert extra.recv(100) == b""  # closed without a thread or an answer
        extra.close()
        idle[0].close()  # a slot comes back when its connection ends
        wait_until(lambda: srv.connections._value == 1, 5, "the slot given back")
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
        idle[1].close()
    finally:
        srv.shutdown()
        srv.server_close()
