"""Admins' user management (#19): remove, disable, enable, token reset, groups, quotas for unknown
subjects, event filters; and migration 0004 upgrading a 0003 database keeping its jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
from _hai import api_client

from haiplatform.db import HEAD_REVISION, Database, migrate
from haiplatform.policy import decide
from haiplatform.scheduler import apply_decisions, take_snapshot

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"
JOB = {"name": "train", "command": ["true"], "nodes": 1}


@pytest.fixture
def api(db, tmp_path):
    with api_client(db, tmp_path) as c:
        yield c


def as_(token):
    return {"Authorization": f"Bearer {token}"}


def user(api, name, group=None):
    r = api.post("/v1/users", json={"name": name, "group": group})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def test_disable_enable_and_token_reset(api, db):
    for i in range(2):
        api.post("/v1/agent/register", json={"node": f"n{i}", "epoch": "e"}, headers=as_("cluster-secret"))
    tok = user(api, "alice")
    jid = api.post("/v1/jobs", json=JOB, headers=as_(tok)).json()["id"]
    r = api.post("/v1/users/alice/disable")
    assert r.status_code == 200 and r.json()["disabled"] is True and r.json()["created_at"] > 0
    r = api.get("/v1/whoami", headers=as_(tok))
    assert r.status_code == 401 and r.json()["message"].startswith("user alice is disabled")
    apply_decisions(db, decide(take_snapshot(db)))   # queued, but it does not start
    j = api.get(f"/v1/jobs/{jid}").json()
    assert (j["status"], j["reason"]) == ("queued", "user alice is disabled")
    assert [u["disabled"] for u in api.get("/v1/users").json() if u["name"] == "alice"] == [True]
    api.post("/v1/users/alice/enable")
    assert api.get("/v1/whoami", headers=as_(tok)).json()["name"] == "alice"
    apply_decisions(db, decide(take_snapshot(db)))
    assert api.get(f"/v1/jobs/{jid}").json()["status"] == "scheduled"
    new = api.post("/v1/users/alice/token").json()["token"]
    assert api.get("/v1/whoami", headers=as_(tok)).status_code == 401
    assert api.get("/v1/whoami", headers=as_(new)).json()["name"] == "alice"
    assert api.post("/v1/users/nobody/disable").status_code == 404
    assert api.post("/v1/users/alice/disable", headers=as_(new)).status_code == 403  # admins only


def test_remove_user_refused_while_live_unless_forced(api, db):
    tok = user(api, "bob")
    api.put("/v1/quotas", json={"subject": "user:bob", "max_nodes": 2})
    jid = api.post("/v1/jobs", json=JOB, headers=as_(tok)).json()["id"]
    r = api.delete("/v1/users/bob")
    assert r.status_code == 409 and f"1 live jobs ({jid})" in r.json()["message"]
    r = api.delete("/v1/users/bob", params={"force": "true"})
    assert r.status_code == 200 and r.json()["stopped"] == [jid]
    assert api.get("/v1/whoami", headers=as_(tok)).status_code == 401
    assert "bob" not in [u["name"] for u in api.get("/v1/users").json()]
    assert [q for q in api.get("/v1/quotas").json() if q["subject"] == "user:bob"] == []
    apply_decisions(db, decide(take_snapshot(db)))
    assert api.get(f"/v1/jobs/{jid}").json()["status"] == "canceled"   # its history stays
    assert api.delete("/v1/users/bob").status_code == 404
    assert api.delete("/v1/users/admin").status_code == 409   # not yourself


def test_groups_and_quotas_for_unknown_subjects(api):
    user(api, "carol", group="vision")
    user(api, "dan")
    assert api.put("/v1/users/dan/group", json={"group": "vision"}).json()["group"] == "vision"
    assert {"name": "vision", "members": ["carol", "dan"]} in api.get("/v1/groups").json()
    r = api.delete("/v1/groups/vision")
    assert r.status_code == 409 and "carol, dan" in r.json()["message"]
    api.put("/v1/users/carol/group", json={"group": None})
    api.put("/v1/users/dan/group", json={"group": "nlp"})   # a new group is made
    assert api.delete("/v1/groups/vision").status_code == 200
    assert "vision" not in [g["name"] for g in api.get("/v1/groups").json()]
    assert api.delete("/v1/groups/vision").status_code == 404
    r = api.put("/v1/quotas", json={"subject": "user:ghost", "max_nodes": 1})
    assert r.status_code == 404 and "no user ghost" in r.json()["message"]
    r = api.put("/v1/quotas", json={"subject": "group:ghosts", "max_nodes": 1})
    assert r.status_code == 404 and "no group ghosts" in r.json()["message"]
    assert api.put("/v1/quotas", json={"subject": "group:nlp", "max_nodes": 1}).status_code == 200


def test_event_filters(api):
    tok = user(api, "erin")
    a = api.post("/v1/jobs", json=JOB, headers=as_(tok)).json()["id"]
    api.post("/v1/jobs", json=JOB)
    api.post(f"/v1/jobs/{a}/hold", headers=as_(tok))
    ev = api.get("/v1/events", params={"user": "erin"}).json()
    assert [e["kind"] for e in ev] == ["held", "submitted"] and {e["job_id"] for e in ev} == {a}
    assert [e["kind"] for e in api.get("/v1/events", params={"job": a, "kind": "held"}).json()] == ["held"]
    assert api.get("/v1/events", params={"since": 4e9}).json() == []
    assert api.get("/v1/events", headers=as_(tok)).status_code == 403


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request, tmp_path):
    return f"sqlite:///{tmp_path / 'old.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_0004_upgrades_a_0003_database_keeping_its_jobs(empty_url):
    from sqlalchemy import text

    migrate(empty_url, "0003")
    d = Database(empty_url)
    try:
        with d.engine.begin() as c:
            c.execute(text("INSERT INTO users (name, token_hash, role, active, created_at) "
                           "VALUES ('alice', 'h', 'user', true, 1.0)"))
            c.execute(text("INSERT INTO jobs (id, chain_id, first_id, restart_count, name, \"user\", shared_in_group, "
                           "command, env, workdir, nodes, procs_per_node, priority, status, reason, stop_code, "
                           "stop_requested, assigned_nodes, master_port, whole_life_state, created_at) VALUES "
                           "(1, 1, 1, 0, 'j', 'alice', false, '[\"true\"]', '{}', '', 1, 0, 10, 'succeeded', '', 0, 0, "
                           "'[]', 0, 0, 5.0)"))
        migrate(empty_url)
        assert d.revision() == HEAD_REVISION
        with d.read() as s:
            row = s.execute(text("SELECT id, name, array_id, array_index, array_throttle, held, output FROM jobs")).one()
            assert (row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6]) == (1, "j", None, None, 0, False, None)
            assert not s.execute(text("SELECT disabled FROM users WHERE name = 'alice'")).scalar()
        with d.read() as s:
            from haiplatform.db import Job
            assert s.get(Job, 1).after == [] and s.get(Job, 1).after_ok == []
    finally:
        d.dispose()
