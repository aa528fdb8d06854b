"""Time-sharing at the API and the scheduler's writes (issue 16), in-process over a real database:
submissions that can never fit, the priority route and who may call it, the agents' activity
reports, queue positions, the restart history, and each new decision's conditional write."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from test_haiplatform_api import JOB, LOCAL_CLUSTER, add_user, as_, register_nodes

from haiplatform.api import bootstrap, create_app
from haiplatform.cli import parse_time
from haiplatform.config import load_config
from haiplatform.db import Job, NodeRow
from haiplatform.jobtoken import job_token
from haiplatform.policy import DrainNode, FinishJob, SetPriority, StartJob, StopJob
from haiplatform.scheduler import apply_decisions, take_snapshot
from haiplatform.states import AUTO, Desired, JobStatus, StopCode
from network import load_cluster

SECRET = as_(None, "cluster-secret")


@pytest.fixture
def api(db, tmp_path, monkeypatch):
    """The API in-process with the local cluster's own [haiplatform] settings (min_run_time 2 s...)."""
    monkeypatch.setenv("FIREFLYER_RUN_DIR_CLUSTER", str(tmp_path))
    cluster = load_cluster(LOCAL_CLUSTER)
    cfg = load_config(cluster)
    cfg.admin_token, cfg.cluster_secret = "admin-tok", "cluster-secret"
    bootstrap(cfg, db)
    with TestClient(create_app(cluster, cfg, db)) as c:
        c.headers["Authorization"] = "Bearer admin-tok"
        yield c


def submit(api, token=None, **kw):
    r = api.post("/v1/jobs", json={**JOB, "nodes": 1, **kw}, headers=as_(api, token) if token else None)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def cycle(api, db):
    from haiplatform.policy import plan

    return plan(take_snapshot(db), api.app.state.api.cfg.policy_config(), api.app.state.api.profile)[0]


def run(api, db):
    ds = cycle(api, db)
    apply_decisions(db, ds)
    return ds


def report(api, node, job_id, status, **kw):
    r = api.post("/v1/agent/report", json={"node": node, "epoch": "e1", "ranks": [
        {"job_id": job_id, "rank": 0, "status": status, **kw}]}, headers=SECRET)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("30:15", 1815), ("1:00:00", 3600), ("2-3", 183600),
                                          ("2-3:30", 185400), ("2-03:30:10", 185410)])
def test_time_parses_slurms_formats(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["x", "1:2:3:4", "-5", "", "1-", "0", "1.5"])
def test_time_refuses_other_text_naming_the_formats(text):
    with pytest.raises(ValueError, match="MM, MM:SS, H:MM:SS, D-H, D-H:MM or D-H:MM:SS"):
        parse_time(text)


def test_a_job_that_can_never_fit_is_refused_naming_the_numbers(api):
    tok = add_user(api, "alice", group="vision")
    r = api.post("/v1/jobs", json={**JOB, "nodes": 5}, headers=as_(api, tok))
    assert r.status_code == 422 and "asks 5 nodes, the cluster has 4" in r.json()["message"]
    api.put("/v1/quotas", json={"subject": "group:vision", "max_nodes": 2})
    api.put("/v1/quotas", json={"subject": "user:alice", "max_nodes": 3, "priority": 30})
    r = api.post("/v1/jobs", json={**JOB, "nodes": 3}, headers=as_(api, tok))
    assert r.status_code == 422 and "quota group:vision is 2" in r.json()["message"]
    assert api.post("/v1/jobs", json={**JOB, "nodes": 2}, headers=as_(api, tok)).status_code == 201
    # auto: refused only when no level it may run at has room for it
    api.put("/v1/quotas", json={"subject": "group:vision", "max_nodes": 4})
    api.put("/v1/quotas", json={"subject": "user:alice", "max_nodes": 1, "priority": 10})
    r = api.post("/v1/jobs", json={**JOB, "nodes": 4, "priority": "auto"}, headers=as_(api, tok))
    assert r.status_code == 422 and "quota user:alice at priority 30 is 3" in r.json()["message"]
    assert api.post("/v1/jobs", json={**JOB, "nodes": 3, "priority": "auto"}, headers=as_(api, tok)).status_code == 201


def test_grace_above_the_clusters_maximum_is_refused(api):
    r = api.post("/v1/jobs", json={**JOB, "grace": 301})
    assert r.status_code == 422 and "maximum of 300 s" in r.json()["message"]
    jid = submit(api, time_limit=3600, grace=30, watchdog=60, priority="auto")
    j = api.get(f"/v1/jobs/{jid}").json()
    assert (j["time_limit"], j["grace"], j["watchdog"], j["submitted_priority"], j["priority"]) == (
        3600, 30, 60, AUTO, 10)


def test_priority_route_owner_admin_and_the_jobs_own_token_only(api, db):
    a, b = add_user(api, "alice"), add_user(api, "bob")
    mine, other = submit(api, a), submit(api, b)
    r = api.post(f"/v1/jobs/{mine}/priority", json={"priority": "high"}, headers=as_(api, a))
    assert r.status_code == 200 and (r.json()["priority"], r.json()["submitted_priority"]) == (30, 30)
    r = api.post(f"/v1/jobs/{other}/priority", json={"priority": "high"}, headers=as_(api, a))
    assert r.status_code == 403 and "belongs to bob" in r.json()["message"]
    own, foreign = as_(api, job_token("cluster-secret", mine)), as_(api, job_token("cluster-secret", other))
    r = api.post(f"/v1/jobs/{mine}/priority", json={"priority": "auto"}, headers=own)
    assert r.status_code == 200 and (r.json()["priority"], r.json()["submitted_priority"]) == (30, AUTO)
    assert api.post(f"/v1/jobs/{other}/priority", json={"priority": 50}, headers=own).status_code == 403
    assert api.post(f"/v1/jobs/{mine}/stop", headers=own).status_code == 403  # still read-only otherwise
    assert api.post(f"/v1/jobs/{other}/priority", json={"priority": 50}).json()["priority"] == 50  # admin
    # a level whose quota can never hold the job is refused to its user, not to an admin
    api.put("/v1/quotas", json={"subject": "user:bob", "max_nodes": 0, "priority": 40})
    r = api.post(f"/v1/jobs/{other}/priority", json={"priority": 40}, headers=as_(api, b))
    assert r.status_code == 422 and "quota user:bob at priority 40 is 0" in r.json()["message"]
    assert api.post(f"/v1/jobs/{other}/priority", json={"priority": "x"}, headers=as_(api, b)).status_code == 422
    api.post(f"/v1/jobs/{other}/stop")
    run(api, db)  # cancels it
    r = api.post(f"/v1/jobs/{other}/priority", json={"priority": 5}, headers=as_(api, b))
    assert r.status_code == 409, r.text  # ended: a conflict (and its job token is worthless now:)
    assert api.post(f"/v1/jobs/{other}/priority", json={"priority": 5}, headers=foreign).status_code == 401


def test_sync_carries_grace_and_ack_timeout_and_reports_keep_the_newest_activity(api, db):
    register_nodes(api, 1)
    jid = submit(api, grace=20, watchdog=90)
    run(api, db)
    (w,) = api.get("/v1/agent/sync", params={"node": "n0", "epoch": "e1", "timeout": 0}, headers=SECRET).json()["ranks"]
    assert (w["grace"], w["ack_timeout"]) == (20, 5) and "watchdog" not in w  # the scheduler enforces it
    for act in ({"last_output": 100.0, "last_checkpoint": 50.0}, {"last_output": 90.0, "suspend_acked_at": 70.0},
                {"last_checkpoint": 60.0}):
        r = api.post("/v1/agent/report", json={"node": "n0", "epoch": "e1", "activity": {str(jid): act}},
                     headers=SECRET)
        assert r.status_code == 200, r.text
    j = api.get(f"/v1/jobs/{jid}").json()
    assert (j["last_output"], j["last_checkpoint"], j["suspend_acked_at"]) == (100, 60, 70)
    bad = api.post("/v1/agent/report", json={"node": "n0", "epoch": "e1", "activity": {str(jid): {
        "last_output": "nan"}}}, headers=SECRET)
    assert bad.status_code == 422


def test_list_shows_queued_positions_and_why(api, db):
    register_nodes(api, 2)
    ids = [submit(api, nodes=2), submit(api, nodes=2), submit(api, nodes=1, priority="high")]
    run(api, db)
    by = {j["id"]: j for j in api.get("/v1/jobs").json()}
    assert by[ids[2]]["status"] == "scheduled" and by[ids[2]]["position"] is None  # high first
    assert [by[i]["position"] for i in ids[:2]] == [1, 2]
    assert by[ids[0]]["reason"] and by[ids[0]]["reason"] != by[ids[2]]["reason"]
    assert api.get(f"/v1/jobs/{ids[1]}").json()["position"] == 2


def test_status_shows_the_restart_history(api, db):
    register_nodes(api, 1)
    jid = submit(api, time_limit=600)
    run(api, db)
    report(api, "n0", jid, "running", pid=1)
    run(api, db)
    assert api.post(f"/v1/jobs/{jid}/suspend").status_code == 202
    run(api, db)
    report(api, "n0", jid, "killed", exit_code=-15)
    run(api, db)
    j = api.get(f"/v1/jobs/{jid}").json()
    first, second = j["attempts"]
    assert (first["id"], first["status"], first["stop"], first["nodes"]) == (jid, "suspended", "interrupt", ["n0"])
    assert first["reason"] == "suspend requested; the chain continues in a new attempt"
    assert first["started_at"] and first["finished_at"] and first["run_s"] >= 0
    assert first["started_at"] <= first["suspend_sent_at"] <= first["finished_at"]   # when it was told
    assert second["suspend_sent_at"] is None
    assert (second["restart_count"], second["status"]) == (1, j["status"])
    assert j["time_limit"] == 600 and j["chain_run_s"] >= first["run_s"]


def test_apply_decisions_for_the_new_decisions_is_conditional(api, db):
    register_nodes(api, 2)
    jid = submit(api, priority="auto", time_limit=100, grace=7, watchdog=9)
    assert apply_decisions(db, [StartJob(jid, ("n0",), ((0, "n0", 0),), priority=20)]) == 1
    assert apply_decisions(db, [StartJob(jid, ("n1",), ((0, "n1", 0),), priority=30)]) == 0
    assert apply_decisions(db, [SetPriority(jid, 10, "demoted")]) == 1
    assert apply_decisions(db, [SetPriority(jid, 10, "demoted")]) == 0  # unchanged: no write, no event
    assert apply_decisions(db, [DrainNode("n1", "node n1 lost under job 1")]) == 1
    assert apply_decisions(db, [DrainNode("n1", "again")]) == 0
    with db.read() as s:
        j, n1 = s.get(Job, jid), s.get(NodeRow, "n1")
        assert (j.status, j.priority, j.assigned_nodes) == (JobStatus.SCHEDULED, 10, ["n0"])
        assert (n1.drained, n1.drain_reason) == (True, "node n1 lost under job 1")
    report(api, "n0", jid, "running", pid=1)
    apply_decisions(db, cycle(api, db))
    stop = StopJob(jid, StopCode.INTERRUPT, Desired.SUSPEND, "preempted by job 9 (user bob, priority 30)")
    assert apply_decisions(db, [stop]) == 1
    assert apply_decisions(db, [stop]) == 0
    with db.read() as s:
        j = s.get(Job, jid)
        assert j.suspend_sent_at and j.reason.startswith("preempted by job 9")
        ran_from = j.started_at
    report(api, "n0", jid, "lost")
    done = FinishJob(jid, JobStatus.SUSPENDED, StopCode.NODE_LOST | StopCode.INTERRUPT, None,
                     "node n0 lost; re-queued", requeue=True)
    assert apply_decisions(db, [done]) == 1
    assert apply_decisions(db, [done]) == 0  # no second attempt
    with db.read() as s:
        old = s.get(Job, jid)
        (new,) = s.query(Job).filter(Job.chain_id == jid, Job.id != jid).all()
        assert (new.status, new.restart_count, new.first_id, new.submitted_priority, new.priority) == (
            JobStatus.QUEUED, 1, jid, AUTO, 10)
        assert (new.time_limit, new.grace, new.watchdog, new.submitted_at) == (100, 7, 9, old.submitted_at)
        assert new.chain_run_s == pytest.approx(old.finished_at - ran_from)
        assert new.reason == "re-queued after a lost node"


def test_a_full_cluster_cycle_is_skipped_only_for_submissions_that_cannot_preempt(api, db):
    """The scheduler's floor is the lowest effective priority holding nodes; a submission above it (or
    auto) since the last cycle must run a cycle, one at or below it may wait for the tick."""
    from haiplatform.scheduler import _above, _floor

    register_nodes(api, 1)
    submit(api, priority="normal")
    api.post("/v1/jobs", json={**JOB, "nodes": 1, "priority": "high"})
    ds = run(api, db)
    assert _floor(take_snapshot(db), []) == 30 and _floor(take_snapshot(db), ds) == 30
    seen = api.get("/v1/internal/wait", params={"timeout": 0}, headers=SECRET).json()["levels"]
    assert seen == {"10": 1, "30": 1}
    assert not _above({**seen, "10": 2}, seen, 30) and not _above({**seen, "30": 2}, seen, 30)
    assert _above({**seen, "40": 1}, seen, 30) and _above({**seen, str(AUTO): 1}, seen, 30)
    assert _floor(take_snapshot(db).__class__(now=0), []) == 99  # nothing holds nodes: nothing to preempt


def test_the_snapshot_fills_every_jobview_field(api, db):
    """take_snapshot builds views without JobView.__init__: every field must be set from the row."""
    from dataclasses import fields

    from haiplatform.policy import JobView

    jid = submit(api, priority="auto", time_limit=60, watchdog=5)
    (v,) = take_snapshot(db).jobs
    assert set(v.__dict__) == {f.name for f in fields(JobView)}
    assert v == JobView(**v.__dict__) and (v.id, v.submitted_priority, v.time_limit, v.watchdog) == (jid, AUTO, 60, 5)
