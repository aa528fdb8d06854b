"""Fixtures of the haiplatform tests: a migrated database on SQLite and on PostgreSQL, a cluster
description with a [haiplatform] section of our choosing, and an API client for a launched cluster."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

LOCAL_CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "clusters" / "local.toml"

HAI_SERVICES = ["haiplatform.api", "haiplatform.scheduler", "haiplatform.agent"]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A migrated, empty scheduler database: SQLite (WAL) in tmp, or a fresh PostgreSQL database."""
    from haiplatform.db import migrate

    url = f"sqlite:///{tmp_path / 'hai.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    migrate(url)
    return url


@pytest.fixture
def db(db_url):
    from haiplatform.db import Database

    d = Database(db_url)
    yield d
    d.dispose()


@pytest.fixture
def cluster_file(tmp_path):
    """Factory: local.toml with [haiplatform] keys overridden (e.g. a short heartbeat timeout, a db_url)."""
    def make(**hai) -> Path:
        raw = tomllib.loads(LOCAL_CLUSTER.read_text())
        raw["haiplatform"] = {**raw.get("haiplatform", {}), **hai}
        raw["service"] = [s for s in raw["service"] if s["module"].startswith("haiplatform.")]
        p = tmp_path / f"cluster-{len(list(tmp_path.glob('cluster-*.toml')))}.toml"
        p.write_text(tomli_w.dumps(raw))
        return p
    return make


def hai_client(lc, wait_nodes: int = 4):
    """An admin client of a launched cluster, once ``wait_nodes`` agents have registered."""
    from haiplatform.client import HaiClient

    addr, port = lc.cluster.endpoint("haiplatform.api")
    tok = (lc.run_dir / "hai" / "admin.token").read_text().strip()
    c = HaiClient(f"http://{addr}:{port}", tok, timeout=30)
    deadline = time.monotonic() + 30
    while len([n for n in c.nodes() if n["state"] == "up"]) < wait_nodes:
        assert time.monotonic() < deadline, f"agents did not register: {c.nodes()}"
        time.sleep(0.05)
    return c


def wait_for(pred, timeout=30.0, what="condition", poll=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
