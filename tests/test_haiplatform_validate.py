"""The node validator (haiplatform.validate): its checks and baselines here, and on a local cluster the
drain loop: a node whose check fails (the test hook) is drained with the reason and returns after
passing, a node an admin drained stays drained, the runs are kept (across an API restart) and listed."""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import pytest
from _hai import cluster_file_factory
from _waits import wait_until
from typer.testing import CliRunner

from haiplatform.cli import app
from haiplatform.validate import (
    KEEP,
    CheckResult,
    Context,
    NodeValidation,
    Sizes,
    baseline_of,
    check_disk,
    clock_result,
    injected,
    judge,
    last_run_at,
    run_checks,
    summarize,
    update_history,
)

# -- pure parts ---------------------------------------------------------------------------------------


def test_baseline_is_the_median_of_passing_values_and_a_value_below_the_fraction_fails():
    assert baseline_of([]) is None
    first = judge(CheckResult("cpu_gemm", True, 80.0, "GFLOP/s"), [], 0.5)
    assert first.ok and first.baseline is None and "sets the baseline" in first.message
    hist = update_history({}, [first])
    assert hist == {"cpu_gemm": [80.0]}
    hist = {"cpu_gemm": [70.0, 80.0, 90.0]}
    assert judge(CheckResult("cpu_gemm", True, 41.0, "GFLOP/s"), hist["cpu_gemm"], 0.5).ok
    bad = judge(CheckResult("cpu_gemm", True, 12.0, "GFLOP/s"), hist["cpu_gemm"], 0.5)
    assert not bad.ok and bad.baseline == 80.0
    assert summarize([bad]) == "validator: cpu_gemm 12 GFLOP/s < 50% of baseline 80"
    # a failing value never enters the baseline; only the last KEEP passing values count
    assert update_history(hist, [bad]) == hist
    many = update_history({}, [CheckResult("mem_bw", True, float(i), "GB/s") for i in range(1, KEEP + 6)])
    assert many["mem_bw"] == [float(i) for i in range(6, KEEP + 6)]
    # checks without a baseline (clock, allreduce) and skipped ones are not kept
    assert update_history({}, [CheckResult("clock", True, 0.01, "s"), CheckResult("gpu_gemm", True, skipped=True)]) == {}


def test_summary_of_a_passing_run_and_the_clock_bound():
    ok = [CheckResult("cpu_gemm", True, 1.0), CheckResult("gpu_gemm", True, skipped=True, message="skipped: no GPU")]
    assert summarize(ok) == "ok: 1 passed, 1 skipped"
    assert clock_result(0.2, 0.01, 1.0).ok
    far = clock_result(-2.5, 0.01, 1.0)
    assert not far.ok and far.message.startswith("clock -2.500 s from the API server's > 1 s")
    assert clock_result(1.05, 0.1, 1.0).ok  # within the bound given the round trip's uncertainty


def test_sizes_and_the_config_key_name_a_bad_value(tmp_path):
    from haiplatform.config import load_config
    from haiplatform.errors import ConfigError
    from network.topology import load_cluster

    assert Sizes.from_dict({"gemm_n": 64, "fraction": 0.25}) == Sizes(gemm_n=64, fraction=0.25)
    with pytest.raises(ValueError, match="validate_sizes.gem_n: unknown key"):
        Sizes.from_dict({"gem_n": 64})
    with pytest.raises(ValueError, match="fraction: expected a positive number up to 1"):
        Sizes.from_dict({"fraction": 2})
    with pytest.raises(ValueError, match="gemm_n: expected int"):
        Sizes.from_dict({"gemm_n": 1.5})
    bad = cluster_file_factory(tmp_path)(validate_sizes={"gem_n": 64})
    with pytest.raises(ConfigError, match="haiplatform.validate_sizes.gem_n: unknown key"):
        load_config(load_cluster(bad))


def test_the_test_hook_env_and_a_file_only_its_owner_may_write(tmp_path):
    assert injected(tmp_path, "n1", {"HAI_VALIDATE_FAIL": "cpu_gemm, disk_read"}) == {"cpu_gemm", "disk_read"}
    f = tmp_path / "validate-fail-n1"
    f.write_text("mem_bw\nclock\n")
    f.chmod(0o600)
    assert injected(tmp_path, "n1", {}) == {"mem_bw", "clock"}
    assert injected(tmp_path, "n2", {}) == set()
    f.chmod(0o666)  # anyone could have written it: ignored
    assert injected(tmp_path, "n1", {}) == set()


def test_disk_check_names_a_directory_it_cannot_write(tmp_path):
    w, r = check_disk(tmp_path / "missing", 1)
    assert not w.ok and not r.ok and "missing" in w.message and w.message.startswith("disk_write:")
    w, r = check_disk(tmp_path, 2)
    assert w.ok and r.ok and w.value > 0 and r.value > 0 and w.unit == "MB/s"
    assert list(tmp_path.iterdir()) == []  # its file is gone


def test_a_run_here_measures_keeps_baselines_skips_what_it_cannot_and_injects(tmp_path):
    ctx = Context(node="n0", state_dir=tmp_path, sizes=Sizes(gemm_n=64, mem_mib=4, disk_mib=1, allreduce_kib=64))
    first = run_checks(ctx, inject=set())
    by = {c["name"]: c for c in first["checks"]}
    assert list(by) == ["cpu_gemm", "mem_bw", "disk_write", "disk_read", "clock", "links", "allreduce",
                        "gpu_health", "gpu_gemm"]
    for name in ("cpu_gemm", "mem_bw", "disk_write", "disk_read"):
        assert by[name]["ok"] and by[name]["value"] > 0 and by[name]["baseline"] is None, by[name]
    assert by["allreduce"]["ok"] and "right result" in by["allreduce"]["message"]
    for name in ("clock", "links"):  # no API server, no cluster: skipped with the reason, never made up
        assert by[name]["skipped"] and by[name]["value"] is None and by[name]["message"].startswith("skipped: ")
    if not os.path.exists("/dev/nvidiactl"):
        assert by["gpu_gemm"]["skipped"] and by["gpu_health"]["skipped"]
    assert first["ok"], first["summary"]
    kept = json.loads((tmp_path / "validate-n0.json").read_text())
    assert kept["history"]["cpu_gemm"] == [by["cpu_gemm"]["value"]] and kept["last_at"] == first["at"]
    ctx.only = frozenset({"cpu_gemm", "clock"})
    second = run_checks(ctx, inject={"cpu_gemm"})
    (gemm, clock) = second["checks"]
    assert gemm["baseline"] == by["cpu_gemm"]["value"] and not gemm["ok"] and clock["skipped"]
    assert "injected failure (test hook)" in gemm["message"] and second["failed"] == ["cpu_gemm"]
    assert second["summary"].startswith("validator: cpu_gemm ") and not second["ok"]
    with pytest.raises(ValueError, match="unknown check"):
        run_checks(Context(only=frozenset({"nope"})))


def test_the_agent_side_runs_when_asked_or_due_and_only_then(tmp_path):
    cfg = SimpleNamespace(validate_interval=3600.0, validate_sizes={}, state_dir=tmp_path)
    agent = SimpleNamespace(cfg=cfg, node=SimpleNamespace(name="n0"), cluster=None)
    v = NodeValidation(agent)
    assert v._due() == "schedule"  # never ran
    (tmp_path / "validate-n0.json").write_text(json.dumps({"history": {}, "last_at": time.time()}))
    assert v._due() is None
    v.requested(time.time())
    assert v._due() == "request"
    v._answered = v._requested
    assert v._due() is None
    (tmp_path / "validate-n0.json").write_text(json.dumps({"history": {}, "last_at": time.time() - 3601}))
    assert v._due() == "schedule"
    v.interval = 0.0  # 0: no schedule
    assert v._due() is None


# -- on a local cluster -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vcluster():
    """The platform on 4 nodes, validating at start (small sizes; a tiny fraction: only the test hook fails -
    four agents measuring at once on a loaded 2-core machine have measured a GEMM 1000x below its baseline).
    Its run dir lies where the jobs' accounts can reach it (as conftest's job_tmp_path)."""
    import shutil
    import tempfile
    from pathlib import Path

    from deploy.local import LocalCluster, pass_for_jobs
    from haiplatform.client import HaiClient

    pass_for_jobs(sys.executable, Path(__file__).resolve().parent.parent / "pyproject.toml")
    d = Path(tempfile.mkdtemp(prefix="fireflyer-validate-"))
    d.chmod(0o711)
    f = cluster_file_factory(d)(validate_sizes={"gemm_n": 128, "mem_mib": 8, "disk_mib": 2, "allreduce_kib": 64,
                                                "fraction": 1e-5})
    lc = LocalCluster(f, d / "run", ports="auto").up()
    try:
        addr, port = lc.cluster.endpoint("haiplatform.api")
        c = HaiClient(f"http://{addr}:{port}", (lc.run_dir / "hai" / "admin.token").read_text().strip(), timeout=30)
        yield lc, c
        c.close()
    finally:
        lc.down()
        shutil.rmtree(d, ignore_errors=True)


def hai(c, *args):
    return CliRunner().invoke(app, ["--url", c.url, "--token", c.token, *args], env={"COLUMNS": "300"})


def by_name(c) -> dict:
    return {n["name"]: n for n in c.nodes()}


def test_drain_loop_a_failing_check_drains_passing_returns_admin_drain_stays(vcluster):
    lc, c = vcluster
    # at start every node validates before it takes jobs, and passes
    ns = wait_until(lambda: (x := by_name(c)) and len(x) == 4 and all(n["validation"] and not n["drained"]
                                                                       for n in x.values()) and x,
                    timeout=60, what="every node validated at start")
    assert all(n["validation"]["ok"] and n["validation"]["trigger"] == "start" for n in ns.values())
    # the test hook: a root-owned file in the agents' state dir makes cpu_gemm fail on n1
    hook = lc.run_dir / "hai" / "validate-fail-n1"
    hook.write_text("cpu_gemm\n")
    hook.chmod(0o600)
    r = hai(c, "validate", "--node", "n1", "--wait", "60")
    assert r.exit_code == 1 and "FAIL" in r.output and "injected failure" in r.output, r.output
    n1 = by_name(c)["n1"]
    assert n1["drained"] and n1["drained_by"] == "validator"
    assert n1["drain_reason"].startswith("validator: cpu_gemm ") and "GFLOP/s" in n1["drain_reason"]
    assert n1["validation"]["failed"] == ["cpu_gemm"] and not n1["validation"]["ok"]
    out = hai(c, "nodes").output
    assert "failed: cpu_gemm" in out and "validator" in out
    # no job lands on the drained node
    j = c.submit({"name": "three", "command": ["true"], "nodes": 3})
    done = c.wait(j["id"], timeout=60)
    assert done["status"] == "succeeded" and "n1" not in done["assigned_nodes"]
    # an admin's drain is the admin's: a passing run does not return the node
    assert hai(c, "admin", "node", "drain", "n2", "--reason", "cable check").exit_code == 0
    r = hai(c, "validate", "--node", "n2", "--wait", "60")
    assert r.exit_code == 0, r.output
    n2 = by_name(c)["n2"]
    assert n2["drained"] and n2["drained_by"] == "admin" and n2["drain_reason"] == "cable check"
    # the hook gone, n1 passes again and returns
    hook.unlink()
    r = hai(c, "validate", "--node", "n1", "--wait", "60", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n1"]["ok"]
    n1 = by_name(c)["n1"]
    assert not n1["drained"] and n1["drain_reason"] == "" and n1["validation"]["ok"]
    assert hai(c, "admin", "node", "undrain", "n2").exit_code == 0


def test_history_is_kept_across_an_api_restart(vcluster):
    lc, c = vcluster
    wait_until(lambda: all(n["validation"] for n in c.nodes()), timeout=60, what="start validations")
    before = json.loads(hai(c, "validate", "--history", "--node", "n1", "--json").output)
    assert before and all(r["node"] == "n1" for r in before)
    assert before[-1]["trigger"] == "start" and [r["id"] for r in before] == sorted((r["id"] for r in before),
                                                                                      reverse=True)
    assert {c_["name"] for c_ in before[0]["checks"]} >= {"cpu_gemm", "mem_bw", "disk_write", "clock", "allreduce"}
    lc.kill("haiplatform.api", "n0")
    lc.start("haiplatform.api", "n0")
    after = wait_until(lambda: json.loads(hai(c, "validate", "--history", "--node", "n1", "--json").output or "[]"),
                       timeout=30, what="the API back")
    assert [r["id"] for r in after[: len(before)]] == [r["id"] for r in before]
    assert by_name(c)["n1"]["validation"]["id"] == before[0]["id"]
    out = hai(c, "validate", "--history").output
    assert "n0" in out and "n3" in out and "start" in out
    # not an admin: neither the history nor a request
    from haiplatform.client import HaiClient
    from haiplatform.errors import Forbidden

    tok = c.add_user("val-user")["token"]
    with HaiClient(c.url, tok) as u:
        with pytest.raises(Forbidden):
            u.validate("n1")
        with pytest.raises(Forbidden):
            u.validations("n1")
        assert u.nodes()[0]["validation"]["ok"] in (True, False)  # the summary is for everyone


# -- the agent's side with a stand-in API: the node is out of the pool while it is measured -------------------

class _Api:
    """Answers the agent's validator calls; the report fails ``fail_reports`` times first (API down)."""

    def __init__(self, v_ref: list, fail_reports: int = 0, refuse: int = 0) -> None:
        self.calls: list[tuple[str, bool, float]] = []
        self.v_ref, self.fail_reports, self.refuse = v_ref, fail_reports, refuse

    def request(self, method, path, json=None, timeout=None, params=None):
        from haiplatform.errors import ApiError, Unavailable

        v = self.v_ref[0]
        self.calls.append((path, v.may_start(), last_run_at(v.ctx)))
        if path == "/v1/agent/validation":
            if self.refuse:
                raise ApiError("stale epoch", status=409)
            if self.fail_reports:
                self.fail_reports -= 1
                raise Unavailable("the API is down")
        return {"ok": True}


def _validation(tmp_path, **api_kw):
    import threading

    ref: list = []
    api = _Api(ref, **api_kw)
    cfg = SimpleNamespace(validate_interval=3600.0, validate_sizes={"gemm_n": 32, "reps": 1, "min_time": 0.001},
                          state_dir=tmp_path)
    agent = SimpleNamespace(cfg=cfg, node=SimpleNamespace(name="n0"), cluster=None, api=api, epoch="e1",
                            lock=threading.Lock(), procs={})
    v = NodeValidation(agent)
    v.ctx.only = frozenset({"cpu_gemm"})
    ref.append(v)
    return v, agent, api


def test_a_run_claims_the_idle_node_drains_it_first_and_holds_ranks_until_a_failing_report_arrived(tmp_path):
    import threading

    hook = tmp_path / "validate-fail-n0"
    hook.write_text("cpu_gemm")
    hook.chmod(0o600)
    v, agent, api = _validation(tmp_path, fail_reports=2)
    # a rank being started (no process yet) keeps the node busy: no run
    agent.procs[(1, 0)] = SimpleNamespace(done=False, popen=None)
    assert not v._claim() and not v.busy
    agent.procs[(1, 0)].done = True
    assert v._claim() and v.busy and not v.may_start()  # claimed under the agent's lock: no rank starts now
    v.requested(time.time())
    listed_before = time.monotonic()  # a sync asked for before the failing report arrived
    assert v._begin("request")
    report = v.run_once("request", threading.Event())
    assert not report["ok"] and report["request"] == v._requested and report["epoch"] == "e1"
    paths = [c[0] for c in api.calls]
    assert paths == ["/v1/agent/validating"] + ["/v1/agent/validation"] * 3  # kept and retried until taken
    # no rank may start while measuring or while the failing report is undelivered, and the schedule's
    # clock moves only once the API has the report (a lost report leaves the run due)
    assert all(not ok and last == 0.0 for _, ok, last in api.calls)
    assert last_run_at(v.ctx) == report["at"] and v._due() is None
    assert not v.busy and not v.may_start(listed_before) and v.may_start(time.monotonic())


def test_a_passing_run_frees_the_node_at_once_and_a_refused_report_is_not_retried(tmp_path):
    import threading

    v, agent, api = _validation(tmp_path, refuse=1)
    assert v._claim()
    report = v.run_once("schedule", threading.Event())
    assert report["ok"] and [c[0] for c in api.calls] == ["/v1/agent/validation"]
    assert api.calls[0][1]  # passed: ranks may start while it is reported
    assert v._due() == "schedule"  # never taken: still due


# -- the API: only the node's agent drains it; a failing run re-queues what was placed there ---------------

@pytest.fixture
def api(db, tmp_path):
    from fastapi.testclient import TestClient

    from haiplatform.api import bootstrap, create_app
    from haiplatform.config import HaiConfig
    from network import load_cluster

    cfg = HaiConfig(state_dir=tmp_path / "state", admin_token="admin-tok", cluster_secret="cluster-secret")
    cfg.state_dir.mkdir()
    bootstrap(cfg, db)
    local = os.path.join(os.path.dirname(__file__), "..", "deploy", "clusters", "local.toml")
    with TestClient(create_app(load_cluster(local), cfg, db)) as c:
        c.headers["Authorization"] = "Bearer admin-tok"
        yield c


SVC = {"Authorization": "Bearer cluster-secret"}


def _report(node, ok, epoch="e1", request=0.0):
    return {"node": node, "epoch": epoch, "at": time.time(), "ok": ok, "trigger": "request", "request": request,
            "failed": [] if ok else ["cpu_gemm"], "summary": "ok: 1 passed" if ok else "validator: cpu_gemm bad"}


def test_api_failing_run_requeues_work_placed_on_the_node_and_only_its_agent_may_report(api, db):
    from haiplatform.policy import DrainNode, decide
    from haiplatform.scheduler import apply_decisions, take_snapshot

    for i in range(4):
        assert api.post("/v1/agent/register", json={"node": f"n{i}", "epoch": "e1"}, headers=SVC).status_code == 200
    jid = api.post("/v1/jobs", json={"name": "j", "command": ["true"], "nodes": 1}).json()["id"]
    apply_decisions(db, decide(take_snapshot(db)))
    node = api.get(f"/v1/jobs/{jid}").json()["assigned_nodes"][0]
    # a stale agent (or any other service) cannot drain or return the node
    r = api.post("/v1/agent/validating", json={"node": node, "epoch": "old"}, headers=SVC)
    assert r.status_code == 409 and "not the registered agent" in r.json()["message"]
    assert api.post("/v1/agent/validation", json=_report(node, False, "old"), headers=SVC).status_code == 409
    # the run drains the node before measuring; it fails: the unstarted rank is lost, the job re-queued
    r = api.post("/v1/agent/validating", json={"node": node, "epoch": "e1"}, headers=SVC)
    assert r.status_code == 200 and r.json()["drained_by"] == "validator"
    req = api.post(f"/v1/nodes/{node}/validate").json()["requested"]
    assert api.post("/v1/agent/validation", json=_report(node, False, request=req), headers=SVC).status_code == 200
    for _ in range(4):
        apply_decisions(db, decide(take_snapshot(db)))
    j = api.get(f"/v1/jobs/{jid}").json()
    assert [a["status"] for a in j["attempts"]][0] == "suspended" and j["id"] != jid
    assert node not in j["assigned_nodes"]  # the next attempt runs elsewhere
    (run,) = api.get("/v1/validations", params={"node": node}).json()
    assert run["request"] == req and not run["ok"]
    assert api.get("/v1/validations", params={"before": run["id"]}).json() == []
    # a passing run returns it
    assert api.post("/v1/agent/validation", json=_report(node, True), headers=SVC).status_code == 200
    assert not {n["name"]: n for n in api.get("/v1/nodes").json()}[node]["drained"]
    # the scheduler's drain of a lost node says so
    apply_decisions(db, [DrainNode("n3", "node n3 lost under job 9")])
    assert {n["name"]: n for n in api.get("/v1/nodes").json()}["n3"]["drained_by"] == "scheduler"


def test_cli_waits_for_the_run_that_knew_of_the_request_with_one_listing_per_pass():
    from haiplatform.cli.validate import _request_and_wait

    class C:
        listings = 0

        def validate(self, n):
            return {"node": n, "requested": 100.0, "last_id": 5 if n == "a" else 7}

        def validations(self, node=None, after=0, limit=50, before=None):
            self.listings += 1
            runs = [{"id": 6, "node": "a", "request": 50.0}, {"id": 8, "node": "b", "request": 100.0}]
            if self.listings > 1:
                runs.append({"id": 9, "node": "a", "request": 100.0})
            return [r for r in sorted(runs, key=lambda r: -r["id"]) if r["id"] > after][:limit]

    c = C()
    out = _request_and_wait(c, ["a", "b"], 10.0, poll=0.01)
    assert out["a"]["id"] == 9 and out["b"]["id"] == 8  # run 6 answered an earlier request
    assert c.listings == 2


def test_the_start_up_run_skips_the_allreduce_with_the_reason(tmp_path):
    import threading

    v, agent, api = _validation(tmp_path)
    v.ctx.only = frozenset({"allreduce"})
    (check,) = v.run_once("start", threading.Event())["checks"]
    assert check["skipped"] and check["ok"] and "at agent start" in check["message"]
    assert v.ctx.skip == {}  # the agent's own context is left as it was: later runs check it
