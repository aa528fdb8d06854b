"""The researcher's day (#19): job arrays with throttles, dependencies, holds, history, the queue,
cancel filters, resubmission and command limits. Policy rules as pure functions over snapshots; the
routes in-process (FastAPI TestClient) over a real database, the scheduler's writes included."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from _hai import api_client

from haiplatform.config import HaiConfig
from haiplatform.db import Job, Rank
from haiplatform.policy import (
    ArrayThrottle,
    CancelJob,
    JobView,
    NodeView,
    SetReason,
    Snapshot,
    StartJob,
    array_status,
    decide,
    dependency,
    gate,
    queue_position,
    reason_kind,
)
from haiplatform.routes.models import check_command_size, check_output_pattern, parse_array
from haiplatform.scheduler import apply_decisions, take_snapshot
from haiplatform.states import JobStatus, RankStatus
from network import load_cluster

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"
NODES = tuple(NodeView(f"n{i}", zone="z0", leaf="l0", last_seen=100.0) for i in range(4))


# -- pure rules -------------------------------------------------------------------------------------

def test_parse_array_takes_slurms_syntax_and_names_bad_input():
    assert parse_array("0-3", 100) == ([0, 1, 2, 3], 0)
    assert parse_array("0-99%8", 100) == (list(range(100)), 8)
    assert parse_array("1,3,5-7", 100) == ([1, 3, 5, 6, 7], 0)
    assert parse_array("0-15:4", 100) == ([0, 4, 8, 12], 0)
    assert parse_array("2,2,1", 100) == ([1, 2], 0)
    for bad, msg in (("", "no index"), ("3-1", "end is below"), ("a-b", "bad part"), ("0-9%0", "throttle"),
                     ("0-9:0", "step 0"), ("-1", "bad part"), ("0-100", "more than 100 tasks")):
        with pytest.raises(ValueError, match=msg):
            parse_array(bad, 100)


def test_command_limits_name_the_sizes():
    check_command_size(["x"] * 4096)
    with pytest.raises(ValueError, match="10000 arguments; at most 4096"):
        check_command_size(["x"] * 10000)
    with pytest.raises(ValueError, match="70000 bytes long; at most 65536"):
        check_command_size(["a" * 35000, "b" * 35000])


def test_output_placeholders():
    check_output_pattern("out/%x-%j.%a.%r@%n-100%%.log")
    with pytest.raises(ValueError, match="unknown placeholder '%q'"):
        check_output_pattern("out-%q.log")
    with pytest.raises(ValueError, match="unknown placeholder '%'"):
        check_output_pattern("out-%")


def test_dependency_rules():
    j = JobView(id=9, user="u", nodes=1, after=(1,), after_ok=(2,))
    assert dependency(j, {1: JobStatus.RUNNING, 2: JobStatus.SUCCEEDED}) == (False, "dependency: waits for job 1")
    assert dependency(j, {1: JobStatus.FAILED, 2: JobStatus.QUEUED}) == (False, "dependency: waits for job 2")
    assert dependency(j, {1: JobStatus.FAILED, 2: JobStatus.SUCCEEDED}) == (False, None)  # afterany: any end
    assert dependency(j, {1: JobStatus.RUNNING, 2: JobStatus.FAILED}) == (True, "dependency failed: job 2 ended FAILED")
    assert dependency(j, {1: JobStatus.CANCELED}) == (True, "dependency failed: job 2 does not exist")
    # a suspended chain has not ended: it continues in a new attempt
    assert dependency(j, {1: JobStatus.SUSPENDED, 2: JobStatus.SUCCEEDED}) == (False, "dependency: waits for job 1")


def test_gate_holds_disabled_users_and_dependencies_wait_outside_the_queue():
    jobs = (JobView(id=1, user="a", nodes=1, held=True), JobView(id=2, user="b", nodes=1),
            JobView(id=3, user="a", nodes=1, after_ok=(7,)), JobView(id=4, user="a", nodes=1, after=(8,)),
            JobView(id=5, user="a", nodes=1))
    snap = Snapshot(now=100.0, jobs=jobs, nodes=NODES, chains={7: JobStatus.STOPPED, 8: JobStatus.RUNNING},
                    disabled=frozenset({"b"}))
    waits, cancels = gate(snap)
    assert waits == {1: "held (hai release 1)", 2: "user b is disabled", 4: "dependency: waits for job 8"}
    assert cancels == [CancelJob(3, "dependency failed: job 7 ended STOPPED")]
    ds = decide(snap)
    assert [d.job_id for d in ds if isinstance(d, StartJob)] == [5]
    assert CancelJob(3, "dependency failed: job 7 ended STOPPED") in ds
    assert SetReason(1, "held (hai release 1)") in ds and SetReason(4, "dependency: waits for job 8") in ds
    assert queue_position(snap) == {5: 1}  # gated jobs take no place


def test_array_throttle_never_runs_more_than_n_tasks():
    # array 10: one task runs, throttle 2, five queued -> exactly one more starts, the rest wait saying why
    running = JobView(id=10, user="a", nodes=1, status=JobStatus.RUNNING, assigned_nodes=("n0",), started_at=90.0,
                      array_id=10, array_throttle=2,
                      ranks=(__import__("haiplatform.policy", fromlist=["RankView"]).RankView(0, "n0", RankStatus.RUNNING),))
    queued = tuple(JobView(id=11 + i, user="a", nodes=1, array_id=10, array_throttle=2) for i in range(5))
    other = JobView(id=20, user="b", nodes=1)
    ds = decide(Snapshot(now=100.0, jobs=(running, *queued, other), nodes=NODES))
    assert sorted(d.job_id for d in ds if isinstance(d, StartJob)) == [11, 20]
    why = {d.job_id: d.reason for d in ds if isinstance(d, SetReason)}
    assert why[12] == "array throttle: 2 of array 10 running (at most 2)"
    assert ArrayThrottle().name == "array_throttle"


# -- the API over a real database --------------------------------------------------------------------

@pytest.fixture
def api(db, tmp_path):
    with api_client(db, tmp_path, max_array_size=200) as c:
        yield c


def as_(token):
    return {"Authorization": f"Bearer {token}"}


SVC = as_("cluster-secret")
JOB = {"name": "train", "command": ["python", "-c", "print(1)"], "nodes": 1}


def register(api, n=4):
    for i in range(n):
        assert api.post("/v1/agent/register", json={"node": f"n{i}", "epoch": "e1"}, headers=SVC).status_code == 200


def cycle(db):
    apply_decisions(db, decide(take_snapshot(db)))


def finish(api, db, jid, exit_code=0):
    """Report every rank of ``jid`` ended with ``exit_code``, then run a cycle."""
    with db.read() as s:
        ranks = [(r.node, r.rank) for r in s.query(Rank).filter(Rank.job_id == jid)]
    for node, rank in ranks:
        st = "succeeded" if exit_code == 0 else "failed"
        r = api.post("/v1/agent/report", json={"node": node, "epoch": "e1", "ranks": [
            {"job_id": jid, "rank": rank, "status": st, "exit_code": exit_code}]}, headers=SVC)
        assert r.status_code == 200, r.text
    cycle(db)


def status(api, jid):
    return api.get(f"/v1/jobs/{jid}").json()


def user(api, name, group=None):
    r = api.post("/v1/users", json={"name": name, "group": group})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def test_bad_submissions_are_422_naming_the_problem(api):
    r = api.post("/v1/jobs", json={**JOB, "command": ["x"] * 10000})
    assert r.status_code == 422 and "10000 arguments; at most 4096" in r.text
    r = api.post("/v1/jobs", json={**JOB, "command": ["a" * 40000, "b" * 40000]})
    assert r.status_code == 422 and "80000 bytes long" in r.text
    r = api.post("/v1/jobs", json={**JOB, "name": ""})
    assert r.status_code == 422
    r = api.post("/v1/jobs", json={**JOB, "array": "0-300"})
    assert r.status_code == 422 and "more than 200 tasks" in r.text
    r = api.post("/v1/jobs", json={**JOB, "after": [4242]})
    assert r.status_code == 422 and "no job 4242" in r.text
    r = api.post("/v1/jobs", json={**JOB, "output": "x-%q"})
    assert r.status_code == 422 and "%q" in r.text


def test_an_array_runs_its_throttle_at_most_and_sets_its_env(api, db):
    register(api)
    r = api.post("/v1/jobs", json={**JOB, "array": "0-5%2"})
    assert r.status_code == 201, r.text
    a = r.json()
    tasks = a["array_tasks"]
    assert len(tasks) == 6 and tasks[0] == a["id"] == a["array_id"] and a["array_throttle"] == 2
    js = [status(api, t) for t in tasks]
    assert [j["array_index"] for j in js] == list(range(6)) and {j["array_id"] for j in js} == {a["id"]}
    assert all(j["chain_id"] == t for j, t in zip(js, tasks, strict=True))
    seen_max, done = 0, set()
    for _ in range(10):
        cycle(db)
        running = [t for t in tasks if status(api, t)["status"] in ("scheduled", "running")]
        seen_max = max(seen_max, len(running))
        assert len(running) <= 2
        if not running:
            break
        waiting = [status(api, t) for t in tasks if status(api, t)["status"] == "queued"]
        assert all(w["reason"].startswith("array throttle: 2 of array") for w in waiting)
        # the agent's work item carries the array's index for the job's environment
        with db.read() as s:
            node = s.get(Job, running[0]).assigned_nodes[0]
        w = [x for x in api.get("/v1/agent/sync", params={"node": node, "epoch": "e1", "timeout": 0},
                                headers=SVC).json()["ranks"] if x["job_id"] == running[0]][0]
        assert (w["array_id"], w["array_index"]) == (a["id"], tasks.index(running[0]))
        for t in running:
            finish(api, db, t)
            done.add(t)
    assert seen_max == 2 and done == set(tasks)
    # cancel the rest of an array by its id
    b = api.post("/v1/jobs", json={**JOB, "array": "0-2", "hold": True}).json()
    assert api.post("/v1/jobs/cancel", json={"array_id": b["id"]}).json()["canceled"] == b["array_tasks"]


def test_agent_job_env_has_the_chain_as_job_id_and_the_array():
    from haiplatform.agent import job_env

    w = {"nodes": ["n0"], "ppn": 1, "rank": 0, "local_rank": 0, "master_addr": "a", "master_port": 1, "job_id": 12,
         "chain_id": 3, "restart_count": 1, "whole_life_state": 0, "name": "x", "user": "u", "array_id": 3,
         "array_index": 7}
    env = job_env(w, "n0", "/c.toml", "/ctl")
    assert (env["HAI_JOB_ID"], env["HAI_ATTEMPT_ID"], env["HAI_ARRAY_ID"], env["HAI_ARRAY_TASK_ID"],
            env["SLURM_ARRAY_TASK_ID"], env["SLURM_ARRAY_JOB_ID"]) == ("3", "12", "3", "7", "7", "3")
    w.pop("array_id")
    assert "HAI_ARRAY_ID" not in job_env(w, "n0", "/c.toml", "/ctl")


def test_dependencies_after_and_after_ok(api, db):
    register(api, 1)
    first = api.post("/v1/jobs", json=JOB).json()["id"]
    ok = api.post("/v1/jobs", json={**JOB, "name": "ok", "after_ok": [first]}).json()["id"]
    anyway = api.post("/v1/jobs", json={**JOB, "name": "any", "after": [first]}).json()["id"]
    cycle(db)
    assert status(api, first)["status"] == "scheduled"
    assert status(api, ok)["reason"] == f"dependency: waits for job {first}"
    assert status(api, ok)["after_ok"] == [first] and status(api, anyway)["after"] == [first]
    finish(api, db, first, exit_code=3)            # fails: after_ok is canceled with why, after starts
    j = status(api, ok)
    assert j["status"] == "canceled" and j["reason"] == f"dependency failed: job {first} ended FAILED"
    cycle(db)
    assert status(api, anyway)["status"] == "scheduled"
    # another user's job is not visible: 422 naming it
    tok = user(api, "carol")
    r = api.post("/v1/jobs", json={**JOB, "after": [first]}, headers=as_(tok))
    assert r.status_code == 422 and f"no job {first}" in r.json()["message"]


def test_after_ok_on_an_array_waits_for_every_task(api, db):
    """A dependency on an array's id is on every task (Slurm's): its first task's end is not enough,
    and any task that fails cancels an after_ok dependent."""
    register(api, 2)
    arr = api.post("/v1/jobs", json={**JOB, "array": "0-2"}).json()
    a, t1, t2 = arr["array_tasks"]
    ok = api.post("/v1/jobs", json={**JOB, "name": "ok", "after_ok": [a]}).json()["id"]
    cycle(db)
    finish(api, db, a)
    assert status(api, ok)["status"] == "queued"
    finish(api, db, t1)
    assert status(api, ok)["status"] == "queued"   # t2 has not run yet
    cycle(db)
    assert status(api, ok)["reason"] == f"dependency: waits for array {a} (1 of 3 tasks not ended)"
    finish(api, db, t2, exit_code=1)
    j = status(api, ok)
    assert j["status"] == "canceled" and j["reason"] == f"dependency failed: array {a}: task {t2} ended FAILED"
    assert array_status(["succeeded", "running", "failed"]) == "running"
    assert array_status(["succeeded", "succeeded"]) == "succeeded"


def test_hold_release_resubmit_and_cancel_filters(api, db):
    register(api, 1)
    tok = user(api, "dave")
    h = api.post("/v1/jobs", json={**JOB, "hold": True}, headers=as_(tok)).json()
    assert h["held"] and h["reason"] == f"held (hai release {h['id']})"
    cycle(db)
    assert status(api, h["id"])["status"] == "queued"
    assert api.post(f"/v1/jobs/{h['id']}/hold", headers=as_(tok)).status_code == 409
    assert api.post(f"/v1/jobs/{h['id']}/release", headers=as_(tok)).json()["held"] is False
    assert api.post(f"/v1/jobs/{h['id']}/release", headers=as_(tok)).status_code == 409
    cycle(db)
    assert status(api, h["id"])["status"] == "scheduled"
    assert api.post(f"/v1/jobs/{h['id']}/hold", headers=as_(tok)).status_code == 409  # not queued
    assert api.post(f"/v1/jobs/{h['id']}/resubmit", headers=as_(tok)).status_code == 409  # not ended
    finish(api, db, h["id"])
    r = api.post(f"/v1/jobs/{h['id']}/resubmit", headers=as_(tok))
    assert r.status_code == 201 and r.json()["id"] != h["id"] and r.json()["user"] == "dave"
    new = r.json()["id"]
    assert status(api, new)["command"] == JOB["command"]
    # cancel by name: only the caller's; another user's filter is 403; no filter is 422
    other = api.post("/v1/jobs", json={**JOB, "name": "sweep"}).json()["id"]  # the admin's
    mine = [api.post("/v1/jobs", json={**JOB, "name": "sweep"}, headers=as_(tok)).json()["id"] for _ in range(2)]
    assert api.post("/v1/jobs/cancel", json={"name": "sweep"}, headers=as_(tok)).json()["canceled"] == mine
    assert api.post("/v1/jobs/cancel", json={"user": "admin"}, headers=as_(tok)).status_code == 403
    assert api.post("/v1/jobs/cancel", json={}, headers=as_(tok)).status_code == 422
    cycle(db)
    assert [status(api, m)["status"] for m in mine] == ["canceled", "canceled"]
    assert status(api, other)["status"] == "queued"


def test_history_rows_per_chain_and_filters(api, db):
    register(api, 1)
    tok = user(api, "erin")
    a = api.post("/v1/jobs", json={**JOB, "name": "a"}, headers=as_(tok)).json()["id"]
    cycle(db)
    finish(api, db, a, exit_code=2)
    b = api.post("/v1/jobs", json={**JOB, "name": "b"}, headers=as_(tok)).json()["id"]
    cycle(db)
    finish(api, db, b)
    api.post("/v1/jobs", json={**JOB, "name": "c"}, headers=as_(tok))   # still queued
    h = api.get("/v1/history", headers=as_(tok)).json()
    assert h["total"] == 2 and [r["chain_id"] for r in h["jobs"]] == [b, a]
    row = h["jobs"][1]
    assert (row["status"], row["exit_code"], row["restarts"], row["user"], row["nodes"]) == ("failed", 2, 0, "erin", 1)
    assert row["started_at"] and row["finished_at"] >= row["started_at"] and row["elapsed_s"] >= 0
    assert api.get("/v1/history", params={"status": "failed"}, headers=as_(tok)).json()["total"] == 1
    assert api.get("/v1/history", params={"status": "any"}, headers=as_(tok)).json()["total"] == 3
    assert api.get("/v1/history", params={"name": "b"}, headers=as_(tok)).json()["jobs"][0]["chain_id"] == b
    assert api.get("/v1/history", params={"since": time.time() + 60}, headers=as_(tok)).json()["total"] == 0
    assert api.get("/v1/history", params={"limit": 1, "offset": 1}, headers=as_(tok)).json()["jobs"][0]["chain_id"] == a
    assert api.get("/v1/history", params={"user": "admin"}, headers=as_(tok)).status_code == 403
    assert api.get("/v1/history", params={"user": "erin"}).json()["total"] == 2   # an admin reads anyone's
    assert api.get("/v1/history", params={"status": "bogus"}).status_code == 422


def test_a_hold_or_disable_after_the_snapshot_wins_over_the_start(api, db):
    """The scheduler decides on a snapshot; a hold (or the user's disable) written before its
    StartJob lands keeps the job queued."""
    register(api, 2)
    tok = user(api, "gil")
    a = api.post("/v1/jobs", json=JOB).json()["id"]
    b = api.post("/v1/jobs", json=JOB, headers=as_(tok)).json()["id"]
    decisions = decide(take_snapshot(db))
    assert {d.job_id for d in decisions if isinstance(d, StartJob)} == {a, b}
    assert api.post(f"/v1/jobs/{a}/hold").status_code == 200
    assert api.post("/v1/users/gil/disable").status_code == 200
    apply_decisions(db, decisions)
    assert (status(api, a)["status"], status(api, a)["held"]) == ("queued", True)
    assert status(api, b)["status"] == "queued"


def test_history_filters_as_it_shows_and_resubmit_of_an_oversized_legacy_job(api, db):
    """since/until filter on the submission time the rows show (pre-0004 rows: created_at); a group
    member reads a mate's shared chains by user=; NUL is refused; a job whose command is over
    today's limit cannot be resubmitted: 422 naming why, not a 500."""
    register(api, 1)
    hal, ida = user(api, "hal", "g"), user(api, "ida", "g")
    jid = api.post("/v1/jobs", json={**JOB, "shared_in_group": True}, headers=as_(hal)).json()["id"]
    cycle(db)
    finish(api, db, jid)
    t0 = time.time() - 1
    with db.write() as s:
        j = s.get(Job, jid)
        j.submitted_at, j.command = 0.0, ["python", "x" * 70000]
    h = api.get("/v1/history", params={"since": t0}, headers=as_(hal)).json()
    assert [r["chain_id"] for r in h["jobs"]] == [jid] and h["jobs"][0]["submitted_at"] >= t0
    assert api.get("/v1/history", params={"until": t0}, headers=as_(hal)).json()["total"] == 0
    assert api.get("/v1/history", params={"user": "hal"}, headers=as_(ida)).json()["total"] == 1
    assert api.get("/v1/history", params={"user": "admin"}, headers=as_(ida)).json()["total"] == 0
    for bad in ({"user": "a\x00b"}, {"name": "\x00"}, {"status": "failed\x00"}):
        assert api.get("/v1/history", params=bad).status_code == 422
    r = api.post(f"/v1/jobs/{jid}/resubmit", headers=as_(hal))
    assert r.status_code == 422 and "cannot be resubmitted as it was" in r.text and "65536" in r.text


def test_queue_shows_everyone_with_reasons_and_hides_others_when_told(api, db):
    register(api, 1)
    tok = user(api, "fay")
    run = api.post("/v1/jobs", json={**JOB, "name": "admins"}).json()["id"]
    cycle(db)
    mine = api.post("/v1/jobs", json={**JOB, "name": "mine"}, headers=as_(tok)).json()["id"]
    held = api.post("/v1/jobs", json={**JOB, "name": "later", "hold": True}).json()["id"]
    cycle(db)
    q = api.get("/v1/queue", headers=as_(tok)).json()
    assert [r["chain_id"] for r in q] == [run, mine, held]
    assert (q[0]["status"], q[0]["user"], q[1]["position"], q[2]["reason"]) == (
        "scheduled", "admin", 1, f"held (hai release {held})")
    assert q[1]["reason"] == f"reserved: starts when job {run} ends"
    api.app.state.api.cfg.queue_visibility = "hide-others"
    q = api.get("/v1/queue", headers=as_(tok)).json()
    assert [(r["user"], r["name"]) for r in q] == [("-", "-"), ("fay", "mine"), ("-", "-")]
    assert api.get("/v1/queue").json()[0]["user"] == "admin"   # admins see all


def test_hidden_queue_rows_give_only_the_reasons_kind(api, db):
    """Under hide-others another user's reason says what it waits for, never whose quota or who."""
    register(api, 2)
    alice, fay = user(api, "alice"), user(api, "fay")
    assert api.put("/v1/quotas", json={"subject": "user:alice", "max_nodes": 1}).status_code == 200
    api.post("/v1/jobs", json=JOB, headers=as_(alice))
    late = api.post("/v1/jobs", json=JOB, headers=as_(alice)).json()["id"]
    cycle(db)
    assert status(api, late)["reason"].startswith("out_of_quota: user:alice")
    api.app.state.api.cfg.queue_visibility = "hide-others"
    q = api.get("/v1/queue", headers=as_(fay))
    assert "alice" not in q.text
    assert {r["chain_id"]: r["reason"] for r in q.json()}[late] == "waiting: quota"
    mine = api.get("/v1/queue", headers=as_(alice)).json()   # the owner sees the whole reason
    assert {r["chain_id"]: r["reason"] for r in mine}[late].startswith("out_of_quota: user:alice")
    assert reason_kind("preempted by job 3 (user bob, priority 2)") == "preempted"
    assert reason_kind("user bob is disabled") == "waiting: user disabled"
    assert reason_kind("something new naming bob") == "waiting"


def test_logs_answer_sizes_and_tail_and_the_client_pages_the_whole_log(api, db, monkeypatch):
    """The agent's RPC (one chunk per call) stood in by a function over a real file: the route pages,
    tails and reports the size; HaiClient.logs reads a log larger than one answer whole."""
    register(api, 1)
    jid = api.post("/v1/jobs", json=JOB).json()["id"]
    cycle(db)
    lines = [f"line {i:06d} " + "x" * 90 for i in range(30000)]   # ~3 MiB
    blob = ("\n".join(lines) + "\nTraceback: the error at the end\n").encode()

    class Rep:
        def __init__(self, result, payload):
            self.result, self.payload = result, payload

    class Agent:
        def call(self, method, a):
            data = blob[a["offset"]:a["offset"] + a["max"]]
            return Rep({"eof": False, "n": len(data), "size": len(blob)}, data)

    monkeypatch.setattr(type(api.app.state.api), "agent_client", lambda self, node: Agent())
    r = api.get(f"/v1/jobs/{jid}/logs", params={"tail": 2})
    assert r.text == lines[-1] + "\nTraceback: the error at the end\n"
    assert int(r.headers["x-log-size"]) == len(blob) == int(r.headers["x-log-offset-next"])
    r = api.get(f"/v1/jobs/{jid}/logs", params={"limit": 1000})
    assert len(r.content) == 1000 and r.headers["x-log-offset-next"] == "1000"
    assert api.get(f"/v1/jobs/{jid}/logs", params={"tail": 0}).content == b""

    from haiplatform.client import HaiClient

    c = HaiClient("http://testserver", "admin-tok")
    c._http = api   # the TestClient speaks the same httpx interface
    monkeypatch.setattr("haiplatform.routes.jobs.LOG_LIMIT_DEFAULT", 1 << 20)  # several pages
    assert c.logs(jid).encode() == blob
    assert c.logs(jid, tail=1) == "Traceback: the error at the end\n"
    assert c.log_size(jid) == len(blob)


def test_output_path_placeholders():
    from haiplatform.agent import output_path

    w = {"chain_id": 12, "array_index": 3, "rank": 1, "name": "sweep"}
    assert output_path("out/%x-%j.%a.%r@%n-100%%.log", w, "n2", "/work") == "/work/out/sweep-12.3.1@n2-100%.log"
    assert output_path("/abs/%j.log", {**w, "array_index": None}, "n2", "/work") == "/abs/12.log"


def test_output_copier_writes_log_and_file_and_refuses_links(tmp_path):
    """The copier (run by the agent as the job's account) appends to the rank's log and the output
    file; a link planted at the output path is not followed (the log says so)."""
    import subprocess
    import sys

    from haiplatform.agent import _COPIER

    def run(target):
        log = tmp_path / f"log-{target.name}"
        with open(log, "wb") as out:
            subprocess.run([sys.executable, "-I", "-S", "-c", _COPIER, str(target)], input=b"hello\nworld\n",
                           stdout=out, stderr=out, timeout=30, check=True)
        return log.read_bytes()

    target = tmp_path / "out.txt"
    assert run(target) == b"hello\nworld\n" and target.read_bytes() == b"hello\nworld\n"
    secret = tmp_path / "secret"
    secret.write_bytes(b"keep")
    link = tmp_path / "link.txt"
    link.symlink_to(secret)
    log = run(link)
    assert log.startswith(b"[hai agent] cannot write the output file") and log.endswith(b"hello\nworld\n")
    assert secret.read_bytes() == b"keep"


def _agent(tmp_path):
    """A real Agent object (no threads started) that runs ranks as this account."""
    from types import SimpleNamespace

    from haiplatform.agent import Agent

    cluster = load_cluster(LOCAL_CLUSTER)
    cfg = HaiConfig(state_dir=tmp_path / "state", cluster_secret="cluster-secret")
    cfg.state_dir.mkdir()
    a = Agent(cluster, next(iter(cluster.nodes.values())), cfg, SimpleNamespace(url="http://127.0.0.1:1"), str(LOCAL_CLUSTER))
    a.switch_user = False
    a.control_dir.mkdir(parents=True)
    return a


def _work(tmp_path, a, output, script):
    return {"job_id": 41, "chain_id": 40, "rank": 0, "local_rank": 0, "user": "u", "name": "out", "env": {},
            "command": [sys.executable, "-c", script], "workdir": str(tmp_path), "output": output,
            "nodes": [a.node.name], "ppn": 1, "master_addr": "127.0.0.1", "master_port": 1, "restart_count": 0,
            "whole_life_state": 0, "array_id": None, "array_index": None}


def _ended(a):
    while True:
        rep = a.reports.get(timeout=30)
        if rep["status"] != RankStatus.RUNNING:
            return rep


def test_agent_reports_a_rank_ended_only_once_its_output_is_complete(tmp_path, monkeypatch):
    """The copier drains the pipe before the agent reports the end: the last lines (a traceback after
    a large burst) are in the log and in the --output file (%j: the chain, relative to the workdir)
    by then. A copier that cannot start leaves the rank running with its log only, saying why."""
    a = _agent(tmp_path)
    (tmp_path / "out").mkdir()
    script = "import sys; sys.stdout.write('x' * 60000 + '\\n'); sys.stdout.flush(); raise SystemExit('the end')"
    a.start(_work(tmp_path, a, "out/%j-%r.log", script))
    assert _ended(a)["exit_code"] == 1
    p = a.procs[(41, 0)]
    assert p.copier is not None and p.copier.returncode is not None   # waited for: no zombie
    want = b"x" * 60000 + b"\nthe end\n"
    assert p.log.read_bytes().endswith(want) and (tmp_path / "out" / "40-0.log").read_bytes() == want

    w = {**_work(tmp_path, a, "out/%j-b.log", "print('still runs')"), "job_id": 42}
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    a.start(w)
    assert _ended(a)["exit_code"] == 0
    log = a.procs[(42, 0)].log.read_text()
    assert f"the output file {tmp_path}/out/40-b.log is unavailable" in log and log.endswith("still runs\n")


def test_kill_leftovers_finds_ranks_of_the_previous_agent_version(tmp_path):
    """A rank started by an agent before HAI_ATTEMPT_ID carries the attempt in HAI_JOB_ID only."""
    import json
    import subprocess

    a = _agent(tmp_path)
    old = subprocess.Popen(["sleep", "60"], env={"HAI_JOB_ID": "77"}, start_new_session=True)
    try:
        a.state_file.write_text(json.dumps({"pgids": {"77:0": old.pid}}))
        assert a.kill_leftovers() == 1
        assert old.wait(timeout=10) == -9
    finally:
        old.kill()
        old.wait()


def test_client_logs_stops_at_the_size_of_its_first_page():
    """A log that grows by a page per read: HaiClient.logs returns what there was, not forever."""
    from haiplatform.client import HaiClient

    log = bytearray(b"a" * 100)

    def page(job_id, params):
        off = params.get("offset") or 0
        data = bytes(log[off:off + 40])
        log.extend(b"b" * 40)   # a fast writer
        return data, len(log) - 40, off + len(data)

    c = HaiClient("http://127.0.0.1:1", "tok")
    c._log_page = page
    assert c.logs(1) == "a" * 100
