"""Shared fixtures: the local launcher, a throwaway PostgreSQL, leak checks."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CLUSTER = ROOT / "deploy" / "clusters" / "local.toml"


def pytest_addoption(parser):
    parser.addoption("--netns", action="store_true", default=False,
                     help="run the tests' local clusters on network namespaces (every node its own network "
                          "stack, shaped links: deploy.netns; needs root and iproute2)")


def pytest_configure(config):
    # --netns: every LocalCluster this process starts (the fixtures' multi-node clusters) runs on
    # namespaces; a machine that cannot is a usage error naming why, not a silent loopback run
    if config.getoption("--netns", default=False):
        from deploy.local import use_netns_by_default
        from deploy.netns import unavailable

        why = unavailable()
        if why:
            raise pytest.UsageError(f"--netns: network namespaces are not available here: {why}")
        use_netns_by_default(True)


@pytest.fixture
def launch_cluster(tmp_path):
    """Factory: ``launch_cluster(services=[...], cluster_file=...)`` starts a local cluster on free
    ports in a temporary run dir; every cluster it started is stopped at teardown, pass or fail."""
    from deploy.local import LocalCluster

    started: list[LocalCluster] = []

    def launch(cluster_file: str | os.PathLike = LOCAL_CLUSTER, services=None, **kw) -> LocalCluster:
        run_dir = tmp_path / f"run{len(started)}"
        lc = LocalCluster(cluster_file, run_dir, ports="auto", services=services, **kw)
        started.append(lc)
        return lc.up()

    yield launch
    for lc in reversed(started):
        lc.down()


@pytest.fixture
def job_tmp_path():
    """A temporary directory that jobs, which run as other Unix accounts when the tests run as root,
    can reach: mode 0711 under the system's temporary directory (pytest's own base is 0700, and
    pytest makes it 0700 again at every session start). Removed afterwards. A module that
    launches clusters whose jobs read the test's files overrides ``tmp_path`` with it. The
    directories above this Python get o+x too (pass, not list), so jobs can run it."""
    from deploy.local import pass_for_jobs

    pass_for_jobs(sys.executable, ROOT / "pyproject.toml")  # this Python, the venv and the code
    d = Path(tempfile.mkdtemp(prefix="fireflyer-test-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server_url():
    """URL of a PostgreSQL server: $FIREFLYER_PG_URL (CI starts one), else a throwaway one started
    here, else the test is skipped with the reason."""
    url = os.environ.get("FIREFLYER_PG_URL")
    if url:
        yield url
        return
    from deploy.pgtest import PostgresUnavailable, ThrowawayPostgres

    try:
        pg = ThrowawayPostgres()
        pg.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    try:
        yield pg.url
    finally:
        pg.stop()


@pytest.fixture
def pg_url(pg_server_url):
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    sa = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base = pg_server_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# HAI-Platform's scheduler database, on both backends (the API and DB tests run on each)
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
