"""Fixtures of the haiplatform tests: a migrated database on SQLite and on PostgreSQL, a cluster
description with a [haiplatform] section of our choosing, and an API client for a launched cluster."""

from __future__ import annotations

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
