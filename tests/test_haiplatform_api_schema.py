"""A bounded schemathesis run against the API's own OpenAPI schema (issue 14, finding 6): whatever the
schema lets through, and whatever breaks it, the answer is never a 5xx and never a hang.

Every operation gets valid cases (positive: what the schema allows, to its bounds) and invalid
ones (negative: a value out of range, a wrong type, a missing field), which must be 4xx. Users'
routes are called as a user and as an admin, agents' and the scheduler's with the cluster
secret. The run is deterministic (``derandomize``) and bounded (``EXAMPLES`` per operation and
mode): about 40 s per database on the 2-core development machine, on SQLite and on PostgreSQL
(whose INTEGER holds 32 bits and whose VARCHAR(n) refuses longer strings).
"""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from haiplatform.api import bootstrap, create_app  # noqa: E402
from haiplatform.config import HaiConfig  # noqa: E402
from haiplatform.db import Database  # noqa: E402
from haiplatform.policy import decide  # noqa: E402
from haiplatform.scheduler import apply_decisions, take_snapshot  # noqa: E402
from network import load_cluster  # noqa: E402

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"
ADMIN, SERVICE = "admin-tok", "cluster-secret"
EXAMPLES = 60
COVERAGE_CASES = 300


@pytest.fixture
def app(db_url, tmp_path):
    """The API over a fresh database (SQLite, PostgreSQL) with something to find: a user, jobs of
    theirs (one canceled, one queued), two registered nodes."""
    from fastapi.testclient import TestClient

    db = Database(db_url)
    # a follower of the queued job's log ends after stream_max_seconds (the in-process client
    # returns once the answer is complete)
    cfg = HaiConfig(state_dir=tmp_path / "state", admin_token=ADMIN, cluster_secret=SERVICE, stream_max_seconds=0.5)
    cfg.state_dir.mkdir()
    bootstrap(cfg, db)
    app = create_app(load_cluster(LOCAL_CLUSTER), cfg, db)
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        app.state.test_user_token = c.post("/v1/users", json={"name": "alice", "group": "vision"}).json()["token"]
        for i in range(2):
            r = c.post("/v1/agent/register", json={"node": f"n{i}", "epoch": "e1"},
                       headers={"Authorization": f"Bearer {SERVICE}"})
            assert r.status_code == 200, r.text
        user = {"Authorization": f"Bearer {app.state.test_user_token}"}
        for _ in range(2):
            r = c.post("/v1/jobs", json={"name": "j", "command": ["true"], "nodes": 4}, headers=user)
            assert r.status_code == 201, r.text
        c.post("/v1/jobs/1/stop", headers=user)
        apply_decisions(db, decide(take_snapshot(db)))
    yield app
    db.dispose()


@pytest.mark.timeout(900)
def test_no_server_errors(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    CALLS.update(n=0, status={})
    user = app.state.test_user_token
    failures: list[str] = []
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 15, [f"{o.method} {o.path}" for o in ops]
    for op in ops:
        internal = op.path.startswith(("/v1/agent/", "/v1/internal/"))
        tokens = [SERVICE] if internal else [user, ADMIN]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _coverage(schema, op, mode, tokens, internal)
                _fuzz(op, mode, tokens, internal)
            except Unsatisfiable:
                pass  # no invalid case exists for an operation without parameters or body
            except Exception as exc:  # noqa: BLE001 - every operation's failure goes into the report
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    # the run reached the routes' logic, not only the validation in front of it
    assert CALLS["n"] > 2000 and {200, 201, 404, 422} <= set(CALLS["status"]), CALLS


CALLS = {"n": 0, "status": {}}


def _call(case, tokens: list[str], internal: bool) -> None:
    if internal and isinstance(case.query, dict) and "timeout" in case.query:
        case.query["timeout"] = 0  # a long-poll waits up to its timeout by design; no need here
    for tok in tokens:
        r = case.call(headers={"Authorization": f"Bearer {tok}"})
        CALLS["n"] += 1
        CALLS["status"][r.status_code] = CALLS["status"].get(r.status_code, 0) + 1
        case.validate_response(r, checks=[not_a_server_error])


def _coverage(schema, op, mode, tokens: list[str], internal: bool) -> None:
    """Schemathesis' coverage phase: the schema's boundary values (min, max, just past them) and
    the usual suspects for each type, deterministic."""
    cases = schema.iter_coverage_cases(op, generation_modes=[mode],
                                       generation_config=schema.config.generation_for(operation=op))
    for n, case in enumerate(cases):
        if n >= COVERAGE_CASES:
            break
        _call(case, tokens, internal)


def _fuzz(op, mode, tokens: list[str], internal: bool) -> None:
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        _call(case, tokens, internal)

    run()
