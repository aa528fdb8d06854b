"""The scheduler database: SQLAlchemy 2 models, engines, sessions and Alembic migrations.

Tables (one concept each, see docs/haiplatform.md):

- ``users``, ``groups``: who may submit, their role (``admin`` | ``user``) and group; a user's
  token is stored as its SHA-256 only.
- ``quotas``: at most ``max_nodes`` nodes running for a subject (``user:NAME`` or ``group:NAME``)
  at one priority (or at any priority when ``priority`` is NULL).
- ``nodes``: what each agent registered (facts), its health and whether an admin drained it.
- ``jobs``: one row per *attempt*. A resumed job is a new row with the same ``chain_id`` and
  ``first_id`` (the id of the chain's first attempt) and ``restart_count + 1``; the queue orders
  by ``first_id``, so a resumed job keeps its place. The time-sharing columns (``submitted_priority``,
  ``time_limit``, ``grace``, ``watchdog``, ``chain_run_s``, ``submitted_at``) are copied to each
  new attempt; ``priority`` is the effective level the policy sets (AUTO resolved, demotion).
- ``ranks``: one row per process of an attempt (rank, node, status, exit code).
- ``events``: an append-only log of what happened (submitted, started, node lost...).
- ``validations``: one row per node validator run (migration 0003): its checks as JSON, whether it
  passed and its one-line summary (docs/validator.md).

SQLite (WAL) is the default; PostgreSQL by URL. [Note: SQLite writers] SQLite upgrades a
read transaction to a write lazily, and a stale reader that tries to write gets SQLITE_BUSY at
once, whatever the busy timeout. Every session that may write therefore starts with
``BEGIN IMMEDIATE`` (it takes the write lock up front and waits its turn); read-only sessions
use a second engine with a plain ``BEGIN``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import DatabaseError
from .states import PRIORITIES, Desired, JobStatus, NodeState, RankStatus, StopCode

__all__ = ["Base", "User", "Group", "Quota", "NodeRow", "Validation", "Job", "Rank", "Event", "Database", "hash_token",
           "migrate", "HEAD_REVISION", "JobStatus", "RankStatus", "NodeState", "Desired", "StopCode",
           "PRIORITIES"]

HEAD_REVISION = "0004"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Group(Base):
    __tablename__ = "groups"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="user")  # admin | user
    group: Mapped[str | None] = mapped_column(ForeignKey("groups.name"), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)  # token refused, queued jobs do not start


class Quota(Base):
    __tablename__ = "quotas"
    __table_args__ = (UniqueConstraint("subject", "priority", name="uq_quota_subject_priority"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(80))            # user:NAME | group:NAME
    priority: Mapped[int | None] = mapped_column(Integer, nullable=True)  # NULL: any priority
    max_nodes: Mapped[int] = mapped_column(Integer)


class NodeRow(Base):
    __tablename__ = "nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(64))
    zone: Mapped[str] = mapped_column(String(64), default="")
    leaf: Mapped[str] = mapped_column(String(64), default="")
    gpus: Mapped[int] = mapped_column(Integer, default=0)
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_gib: Mapped[float] = mapped_column(Float, default=0.0)
    state: Mapped[str] = mapped_column(String(16), default=NodeState.UP.value)  # NodeState
    drained: Mapped[bool] = mapped_column(Boolean, default=False)
    drain_reason: Mapped[str] = mapped_column(String(200), default="")
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)
    agent_epoch: Mapped[str] = mapped_column(String(40), default="")  # changes when the agent restarts
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    registered_at: Mapped[float] = mapped_column(Float, default=time.time)
    # the node validator (migration 0003): who drained the node ("admin", "validator", "scheduler"
    # after losing it) and when an admin last asked its agent to validate (0: never)
    drained_by: Mapped[str] = mapped_column(String(16), default="")
    validate_requested: Mapped[float] = mapped_column(Float, default=0.0)


class Validation(Base):
    """One run of the node validator on one node (haiplatform.validate), as its agent reported it."""

    __tablename__ = "validations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[float] = mapped_column(Float)                    # when the run began (the node's clock)
    received_at: Mapped[float] = mapped_column(Float, default=time.time)
    ok: Mapped[bool] = mapped_column(Boolean)
    trigger: Mapped[str] = mapped_column(String(16), default="")  # start | schedule | request
    request: Mapped[float] = mapped_column(Float, default=0.0)    # the newest admin request the run knew of (0: none)
    duration: Mapped[float] = mapped_column(Float, default=0.0)
    failed: Mapped[list[Any]] = mapped_column(JSON, default=list)  # names of the failed checks
    summary: Mapped[str] = mapped_column(String(500), default="")
    checks: Mapped[list[Any]] = mapped_column(JSON, default=list)  # CheckResult dicts


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    chain_id: Mapped[int] = mapped_column(Integer, default=0, index=True)
    first_id: Mapped[int] = mapped_column(Integer, default=0)
    restart_count: Mapped[int] = mapped_column(Integer, default=0)
    name: Mapped[str] = mapped_column(String(128))
    user: Mapped[str] = mapped_column(String(64), index=True)
    group: Mapped[str | None] = mapped_column(String(64), nullable=True)
    shared_in_group: Mapped[bool] = mapped_column(Boolean, default=False)
    command: Mapped[list[Any]] = mapped_column(JSON)
    env: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    workdir: Mapped[str] = mapped_column(String(1000), default="")
    nodes: Mapped[int] = mapped_column(Integer)
    procs_per_node: Mapped[int] = mapped_column(Integer, default=0)  # 0: the node's GPUs (or 1)
    priority: Mapped[int] = mapped_column(Integer, default=10)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value, index=True)
    reason: Mapped[str] = mapped_column(String(200), default="")   # why it waits / why it ended
    stop_code: Mapped[int] = mapped_column(Integer, default=0)
    stop_requested: Mapped[int] = mapped_column(Integer, default=0)  # StopCode bits asked for
    assigned_nodes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    master_port: Mapped[int] = mapped_column(Integer, default=0)
    whole_life_state: Mapped[int] = mapped_column(Integer, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    scheduled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)  # history (0004)
    # time-sharing (migration 0002): what the user asked (AUTO: -1; ``priority`` is the effective
    # level the policy sets), the chain's limits, and what the agents report of its activity
    submitted_priority: Mapped[int] = mapped_column(Integer, default=10)
    submitted_at: Mapped[float] = mapped_column(Float, default=0.0)     # the chain's first submission
    time_limit: Mapped[float] = mapped_column(Float, default=0.0)       # each attempt's run time limit (--time); 0: none
    grace: Mapped[float] = mapped_column(Float, default=0.0)            # finish time after a suspend; 0: default
    watchdog: Mapped[float] = mapped_column(Float, default=0.0)         # no output this long -> hung; 0: off
    chain_run_s: Mapped[float] = mapped_column(Float, default=0.0)      # run time of the earlier attempts
    last_output: Mapped[float] = mapped_column(Float, default=0.0)      # newest output of any rank (ts)
    last_checkpoint: Mapped[float] = mapped_column(Float, default=0.0)  # newest reported checkpoint (ts)
    suspend_sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    suspend_acked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the researcher's day (migration 0004): job arrays (``array_id``: the chain id of the array's first
    # task), dependencies on other chains, holds and an output path; copied to each new attempt
    array_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    array_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    array_throttle: Mapped[int] = mapped_column(Integer, default=0)   # 0: no limit on running tasks
    after: Mapped[list[Any]] = mapped_column(JSON, default=list)       # chain ids: start once each ended
    after_ok: Mapped[list[Any]] = mapped_column(JSON, default=list)    # ... once each succeeded
    held: Mapped[bool] = mapped_column(Boolean, default=False)
    output: Mapped[str | None] = mapped_column(String(1000), nullable=True)


class Rank(Base):
    __tablename__ = "ranks"
    __table_args__ = (UniqueConstraint("job_id", "rank", name="uq_rank_job_rank"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    node: Mapped[str] = mapped_column(String(64), index=True)
    local_rank: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=RankStatus.CREATED.value)
    desired: Mapped[str] = mapped_column(String(16), default=Desired.RUN.value)  # Desired
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(String(500), default="")
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, default=time.time)
    kind: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    node: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str] = mapped_column(String(1000), default="")


# -- engines and sessions -------------------------------------------------------------------------

def _sqlite_engine(url: str, immediate: bool) -> Engine:
    eng = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(eng, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see the module note)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        # writers wait in _begin_immediate (see the note there); readers never wait for writers in WAL
        cur.execute(f"PRAGMA busy_timeout={0 if immediate else 30000}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(eng, "begin")
    def _on_begin(conn):  # noqa: ANN001
        if immediate:
            _begin_immediate(conn)
        else:
            conn.exec_driver_sql("BEGIN")

    return eng


#: how long a writer waits for SQLite's write lock before giving up
WRITE_LOCK_TIMEOUT = 30.0


def _begin_immediate(conn) -> None:  # noqa: ANN001
    """``BEGIN IMMEDIATE``, waiting for the write lock with short sleeps.

    [Note: waiting for the write lock] SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25...
    ms between tries, so a writer that collides with another (the scheduler's cycle, an agent's
    report) loses several milliseconds for a lock that is held for a fraction of one. The write
    engine therefore runs with ``busy_timeout=0`` and retries here: 0.1 ms doubling up to 2 ms,
    for at most WRITE_LOCK_TIMEOUT seconds.
    """
    import sqlite3

    delay, deadline = 0.0001, time.monotonic() + WRITE_LOCK_TIMEOUT
    while True:
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            return
        except OperationalError as exc:
            busy = isinstance(exc.orig, sqlite3.OperationalError) and "locked" in str(exc.orig)
            if not busy or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


class Database:
    """Engines and session factories for one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(url, immediate=True)
            self.ro_engine = _sqlite_engine(url, immediate=False)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
            self.ro_engine = self.engine
        self._rw = sessionmaker(self.engine, expire_on_commit=False)
        self._ro = sessionmaker(self.ro_engine, expire_on_commit=False)

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session in one write transaction: committed on success, rolled back on error."""
        with self._rw() as s, s.begin():
            yield s

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session in one read transaction (a consistent snapshot)."""
        with self._ro() as s, s.begin():
            yield s

    def revision(self) -> str | None:
        """The schema's Alembic revision, or None when the database is empty."""
        try:
            with self.ro_engine.connect() as c:
                if not inspect(c).has_table("alembic_version"):
                    return None
                return c.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except OperationalError as exc:
            raise DatabaseError(f"cannot open the database {self.safe_url}: {exc.orig}") from exc

    def check_head(self) -> None:
        rev = self.revision()
        if rev != HEAD_REVISION:
            raise DatabaseError(f"database {self.safe_url} is at revision {rev!r}, expected {HEAD_REVISION!r}; "
                                "start the API server (it migrates) or run 'hai admin db upgrade'")

    @property
    def safe_url(self) -> str:
        """The URL without its password."""
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()
        if self.ro_engine is not self.engine:
            self.ro_engine.dispose()


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` with the migrations shipped in the package."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    try:
        command.upgrade(cfg, revision)
    except OperationalError as exc:
        raise DatabaseError(f"cannot migrate the database: {exc.orig}") from exc


def sqlite_url(path: str | os.PathLike) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def event_row(s, kind: str, message: str = "", job_id: int | None = None, node: str | None = None) -> None:
    """Append an event (``s``: a Session or a Core Connection, inside its transaction)."""
    s.execute(insert(Event).values(kind=kind, message=message[:1000], job_id=job_id, node=node, ts=time.time()))


def get_user_by_token(s: Session, token: str) -> User | None:
    return s.scalars(select(User).where(User.token_hash == hash_token(token), User.active.is_(True))).first()
