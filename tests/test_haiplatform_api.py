"""The API in-process (FastAPI TestClient) over a real database, SQLite and PostgreSQL: good and bad
requests, auth, roles, other users' jobs, and the scheduler's transactional writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from _hai import api_client

from haiplatform.db import Job, JobStatus, NodeRow, Rank, RankStatus
from haiplatform.policy import decide
from haiplatform.scheduler import apply_decisions, take_snapshot

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"


@pytest.fixture
def api(db, tmp_path):
    with api_client(db, tmp_path) as c:
        yield c


def as_(client, token):
    return {"Authorization": f"Bearer {token}"}


def add_user(api, name, group=None, role="user"):
    r = api.post("/v1/users", json={"name": name, "group": group, "role": role})
    assert r.status_code == 201, r.text
    return r.json()["token"]


JOB = {"name": "train", "command": ["python", "-c", "print(1)"], "nodes": 2}


def test_openapi_schema_lists_the_endpoints(api):
    paths = api.get("/openapi.json").json()["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/stop", "/v1/jobs/{job_id}/suspend",
              "/v1/jobs/{job_id}/logs", "/v1/nodes", "/v1/users", "/v1/quotas", "/v1/whoami"):
        assert p in paths


def test_auth_failures_are_401_with_a_message(api):
    r = api.get("/v1/jobs", headers={"Authorization": ""})
    assert r.status_code == 401 and "missing token" in r.json()["message"]
    r = api.get("/v1/jobs", headers=as_(api, "nope"))
    assert r.status_code == 401 and r.json() == {"error": "AuthError", "message": "invalid token: no active user has it"}


def test_a_request_is_authenticated_once(api, monkeypatch):
    """The limits middleware authenticates the request; the route's principal is the one it found."""
    from haiplatform.routes import deps

    calls = []
    real = deps.authenticate
    monkeypatch.setattr(deps, "authenticate", lambda st, request: calls.append(request.url.path) or real(st, request))
    tok = add_user(api, "alice")
    calls.clear()
    assert api.get("/v1/whoami", headers=as_(api, tok)).json()["name"] == "alice"
    assert calls == ["/v1/whoami"]
    r = api.get("/v1/whoami", headers=as_(api, "nope"))  # no principal to hand on: the route answers 401
    assert r.status_code == 401 and calls[1:] == ["/v1/whoami", "/v1/whoami"]


def test_submit_get_list(api):
    tok = add_user(api, "alice")
    r = api.post("/v1/jobs", json={**JOB, "priority": "high", "env": {"A": "1"}}, headers=as_(api, tok))
    assert r.status_code == 201, r.text
    j = r.json()
    assert (j["status"], j["user"], j["priority"], j["chain_id"], j["first_id"]) == ("queued", "alice", 30, j["id"],
                                                                                    j["id"])
    got = api.get(f"/v1/jobs/{j['id']}", headers=as_(api, tok)).json()
    assert got["command"] == JOB["command"] and got["ranks"] == [] and got["chain_status"] == "waiting_init"
    assert [x["id"] for x in api.get("/v1/jobs", headers=as_(api, tok)).json()] == [j["id"]]
    assert api.get("/v1/whoami", headers=as_(api, tok)).json() == {"name": "alice", "role": "user", "group": None}


@pytest.mark.parametrize("spec,field", [
    ({**JOB, "nodes": 0}, "nodes"),
    ({k: v for k, v in JOB.items() if k != "command"}, "command"),
    ({**JOB, "command": []}, "command"),
    ({**JOB, "priority": "urgent"}, "priority"),
    ({**JOB, "priority": 99}, "priority"),
    ({**JOB, "name": "bad name!"}, "name"),
    ({**JOB, "gpus": 8}, "gpus"),
    ({**JOB, "env": {"1X": "y"}}, "env"),
])
def test_bad_job_specs_are_422_naming_the_field(api, spec, field):
    r = api.post("/v1/jobs", json=spec)
    assert r.status_code == 422
    assert r.json()["error"] == "InvalidRequest" and field in r.json()["message"]


def test_someone_elses_job_is_403_unless_shared_with_the_group(api):
    a = add_user(api, "alice", group="vision")
    b = add_user(api, "bob", group="vision")
    c = add_user(api, "carol", group="nlp")
    private = api.post("/v1/jobs", json=JOB, headers=as_(api, a)).json()["id"]
    shared = api.post("/v1/jobs", json={**JOB, "shared_in_group": True}, headers=as_(api, a)).json()["id"]
    r = api.get(f"/v1/jobs/{private}", headers=as_(api, b))
    assert r.status_code == 403 and "belongs to alice" in r.json()["message"]
    assert api.post(f"/v1/jobs/{private}/stop", headers=as_(api, b)).status_code == 403
    assert api.get(f"/v1/jobs/{shared}", headers=as_(api, b)).status_code == 200
    assert [j["id"] for j in api.get("/v1/jobs", headers=as_(api, b)).json()] == [shared]
    assert api.get(f"/v1/jobs/{shared}", headers=as_(api, c)).status_code == 403
    assert api.post(f"/v1/jobs/{shared}/stop", headers=as_(api, b)).status_code == 202  # group may control it
    assert api.get(f"/v1/jobs/{private}").status_code == 200  # admins see everything


def test_list_filters_by_status_and_refuses_unknown_ones(api):
    jid = api.post("/v1/jobs", json=JOB).json()["id"]
    assert [j["id"] for j in api.get("/v1/jobs?status=queued").json()] == [jid]
    assert api.get("/v1/jobs?status=running").json() == []
    r = api.get("/v1/jobs?status=bogus")
    assert r.status_code == 422 and "unknown status 'bogus'" in r.json()["message"]


def test_missing_things_are_404(api):
    assert api.get("/v1/jobs/12345").status_code == 404
    assert api.post("/v1/jobs/12345/stop").status_code == 404
    r = api.post("/v1/nodes/n9/drain", json={"reason": "x"})
    assert r.status_code == 404 and "n9" in r.json()["message"]


def test_admin_endpoints_need_admin(api):
    tok = add_user(api, "alice")
    for method, path, body in [("post", "/v1/users", {"name": "x"}), ("get", "/v1/users", None),
                               ("put", "/v1/quotas", {"subject": "user:x", "max_nodes": 1}),
                               ("post", "/v1/nodes/n0/drain", {}), ("get", "/v1/jobs?all=true", None)]:
        kw = {"json": body} if body is not None else {}
        r = getattr(api, method)(path, headers=as_(api, tok), **kw)
        assert r.status_code == 403, (path, r.text)
    # agents' and the scheduler's endpoints need the cluster secret, not an admin token
    assert api.get("/v1/internal/wait?timeout=0").status_code == 403
    assert api.get("/v1/internal/wait?timeout=0", headers=as_(api, "cluster-secret")).status_code == 200


def test_users_and_quotas(api):
    add_user(api, "alice", group="vision")
    r = api.post("/v1/users", json={"name": "alice"})
    assert r.status_code == 409 and "already exists" in r.json()["message"]
    assert api.post("/v1/users", json={"name": "Bad Name"}).status_code == 422
    assert api.put("/v1/quotas", json={"subject": "group:vision", "max_nodes": 2}).status_code == 200
    assert api.put("/v1/quotas", json={"subject": "group:vision", "max_nodes": 3}).status_code == 200
    assert api.put("/v1/quotas", json={"subject": "user:alice", "max_nodes": 1, "priority": 30}).status_code == 200
    assert api.put("/v1/quotas", json={"subject": "team:x", "max_nodes": 1}).status_code == 422
    assert sorted((q["subject"], q["max_nodes"]) for q in api.get("/v1/quotas").json()) == [
        ("group:vision", 3), ("user:alice", 1)]


def test_stop_and_suspend_conflicts(api):
    jid = api.post("/v1/jobs", json=JOB).json()["id"]
    r = api.post(f"/v1/jobs/{jid}/suspend")
    assert r.status_code == 409 and "only a running job" in r.json()["message"]
    assert api.post(f"/v1/jobs/{jid}/stop").status_code == 202
    r = api.post(f"/v1/jobs/{jid}/stop")
    assert r.status_code == 409 and "already being stopped" in r.json()["message"]


def register_nodes(api, n=4):
    for i in range(n):
        r = api.post("/v1/agent/register", json={"node": f"n{i}", "epoch": "e1", "cpus": 2, "memory_gib": 4.0},
                     headers=as_(api, "cluster-secret"))
        assert r.status_code == 200, r.text


def test_agent_register_sync_and_report(api, db):
    register_nodes(api)
    r = api.post("/v1/agent/register", json={"node": "zz", "epoch": "e"}, headers=as_(api, "cluster-secret"))
    assert r.status_code == 404 and "not in the cluster description" in r.json()["message"]
    jid = api.post("/v1/jobs", json={**JOB, "nodes": 1}).json()["id"]
    apply_decisions(db, decide(take_snapshot(db)))
    with db.read() as s:
        node = s.get(Job, jid).assigned_nodes[0]
    sync = api.get("/v1/agent/sync", params={"node": node, "epoch": "e1", "timeout": 0},
                   headers=as_(api, "cluster-secret")).json()
    (w,) = sync["ranks"]
    assert (w["job_id"], w["rank"], w["desired"], w["ppn"]) == (jid, 0, "run", 1)
    h = as_(api, "cluster-secret")
    api.post("/v1/agent/report", json={"node": node, "epoch": "e1", "master_ports": {str(jid): 23456},
                                       "ranks": [{"job_id": jid, "rank": 0, "status": "running", "pid": 42}]}, headers=h)
    api.post("/v1/agent/report", json={"node": node, "epoch": "e1", "ranks": [
        {"job_id": jid, "rank": 0, "status": "failed", "exit_code": 7, "message": "exit code 7"}]}, headers=h)
    # a late, stale report cannot move a finished rank backwards
    api.post("/v1/agent/report", json={"node": node, "epoch": "e1", "ranks": [
        {"job_id": jid, "rank": 0, "status": "running", "pid": 42}]}, headers=h)
    apply_decisions(db, decide(take_snapshot(db)))
    j = api.get(f"/v1/jobs/{jid}").json()
    assert (j["status"], j["exit_code"], j["master_port"]) == ("failed", 7, 23456)
    assert j["ranks"][0]["status"] == "failed"


def test_decisions_apply_once_even_when_replayed(api, db):
    """A crash after committing and a replay of the same decisions starts nothing twice."""
    register_nodes(api)
    ids = [api.post("/v1/jobs", json={**JOB, "nodes": 2}).json()["id"] for _ in range(3)]
    ds = decide(take_snapshot(db))
    assert apply_decisions(db, ds) >= 2
    assert apply_decisions(db, [d for d in ds if type(d).__name__ == "StartJob"]) == 0
    with db.read() as s:
        st = {j.id: j.status for j in s.query(Job)}
        assert [st[i] for i in ids] == [JobStatus.SCHEDULED, JobStatus.SCHEDULED, JobStatus.QUEUED]
        assert s.query(Rank).count() == 4 and all(r.status == RankStatus.CREATED for r in s.query(Rank))
        assert s.get(NodeRow, "n0").state == "up"


def test_suspend_running_job_requeues_the_chain_keeping_its_place(api, db):
    register_nodes(api, 1)
    h = as_(api, "cluster-secret")
    first = api.post("/v1/jobs", json={**JOB, "nodes": 1}).json()["id"]
    apply_decisions(db, decide(take_snapshot(db)))
    later = api.post("/v1/jobs", json={**JOB, "nodes": 1, "name": "later"}).json()["id"]
    api.post("/v1/agent/report", json={"node": "n0", "epoch": "e1", "ranks": [
        {"job_id": first, "rank": 0, "status": "running", "pid": 1}]}, headers=h)
    apply_decisions(db, decide(take_snapshot(db)))
    assert api.post(f"/v1/jobs/{first}/suspend").status_code == 202
    apply_decisions(db, decide(take_snapshot(db)))
    sync = api.get("/v1/agent/sync", params={"node": "n0", "epoch": "e1", "timeout": 0}, headers=h).json()
    assert sync["ranks"][0]["desired"] == "suspend"
    api.post("/v1/agent/report", json={"node": "n0", "epoch": "e1", "ranks": [
        {"job_id": first, "rank": 0, "status": "killed", "exit_code": -15, "whole_life_state": 5}]}, headers=h)
    apply_decisions(db, decide(take_snapshot(db)))   # finishes the attempt, queues the next one
    apply_decisions(db, decide(take_snapshot(db)))   # starts the resumed attempt before `later`
    j = api.get(f"/v1/jobs/{first}").json()
    assert j["chain_id"] == first and j["id"] != first and j["restart_count"] == 1
    assert j["status"] == "scheduled" and j["whole_life_state"] == 5
    assert [a["status"] for a in j["attempts"]] == ["suspended", "scheduled"]
    assert api.get(f"/v1/jobs/{later}").json()["status"] == "queued"


def test_agent_job_env_covers_the_contract():
    from haiplatform import JOB_ENV
    from haiplatform.agent import job_env

    w = {"nodes": ["n2", "n3"], "ppn": 2, "rank": 3, "local_rank": 1, "master_addr": "127.0.0.4",
         "master_port": 29500, "job_id": 7, "chain_id": 5, "restart_count": 2, "whole_life_state": 9,
         "name": "x", "user": "u"}
    env = job_env(w, "n3", "/c.toml", "/ctl")
    assert set(JOB_ENV) <= set(env)
    assert (env["WORLD_SIZE"], env["RANK"], env["LOCAL_WORLD_SIZE"], env["LOCAL_RANK"], env["NNODES"],
            env["NODE_RANK"], env["GROUP_RANK"]) == ("4", "3", "2", "1", "2", "1", "1")
    # the job id users see is the chain's; the attempt has its own variable
    assert (env["HAI_JOB_ID"], env["HAI_CHAIN_ID"], env["HAI_ATTEMPT_ID"], env["HAI_RESTART_COUNT"],
            env["HAI_WHOLE_LIFE_STATE"]) == ("5", "5", "7", "2", "9")
