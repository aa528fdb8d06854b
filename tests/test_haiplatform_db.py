"""The scheduler database: migrations shipped in the package, revision checks, SQLite writers."""

from __future__ import annotations

import threading
import time

import pytest

from haiplatform.db import HEAD_REVISION, Database, Event, event_row, migrate
from haiplatform.errors import DatabaseError


def test_migrations_are_idempotent_and_at_head(db_url):
    migrate(db_url)  # the fixture migrated once already
    d = Database(db_url)
    try:
        assert d.revision() == HEAD_REVISION
        d.check_head()
    finally:
        d.dispose()


def test_an_unmigrated_database_is_refused_with_what_to_do(tmp_path):
    d = Database(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(DatabaseError, match="start the API server .* or run 'hai admin db upgrade'"):
            d.check_head()
    finally:
        d.dispose()


def test_sqlite_writer_waits_for_the_write_lock_and_commits(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    migrate(url)
    a, b = Database(url), Database(url)
    holding = threading.Event()

    def hold():
        with a.write() as s:
            event_row(s, "first")
            holding.set()
            time.sleep(0.3)

    t = threading.Thread(target=hold)
    t.start()
    assert holding.wait(10)
    with b.write() as s:  # waits for `a` to commit instead of failing with "database is locked"
        event_row(s, "second")
    t.join()
    with b.read() as s:
        assert [e.kind for e in s.query(Event).order_by(Event.id)] == ["first", "second"]
    a.dispose()
    b.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request, tmp_path):
    """An empty database (not migrated): SQLite in tmp, or a fresh PostgreSQL database."""
    return f"sqlite:///{tmp_path / 'old.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_0002_upgrades_a_0001_database_keeping_its_jobs(empty_url):
    """An existing database (revision 0001) with a resumed chain gains the time-sharing columns: the
    submitted priority is the job's own, the chain's submission time its first attempt's."""
    from sqlalchemy import text

    migrate(empty_url, "0001")
    d = Database(empty_url)
    try:
        assert d.revision() == "0001"
        cols = ("id, chain_id, first_id, restart_count, name, \"user\", shared_in_group, command, env, workdir, "
                "nodes, procs_per_node, priority, status, reason, stop_code, stop_requested, assigned_nodes, "
                "master_port, whole_life_state, created_at")
        with d.engine.begin() as c:
            for jid, rc, status, created in ((1, 0, "suspended", 100.0), (2, 1, "queued", 200.0)):
                c.execute(text(f"INSERT INTO jobs ({cols}) VALUES (:id, 1, 1, :rc, 'j', 'alice', false, '[]', "
                               "'{}', '', 1, 0, 30, :st, '', 0, 0, '[]', 0, 0, :ct)"),
                          {"id": jid, "rc": rc, "st": status, "ct": created})
        migrate(empty_url)
        assert d.revision() == HEAD_REVISION
        with d.read() as s:
            rows = s.execute(text("SELECT id, submitted_priority, submitted_at, time_limit, grace, watchdog, "
                                  "chain_run_s, last_output, last_checkpoint, suspend_sent_at FROM jobs ORDER BY id"
                                  )).all()
        assert [tuple(r) for r in rows] == [(1, 30, 100.0, 0, 0, 0, 0, 0, 0, None),
                                            (2, 30, 100.0, 0, 0, 0, 0, 0, 0, None)]
    finally:
        d.dispose()
