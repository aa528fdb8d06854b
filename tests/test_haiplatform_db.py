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
