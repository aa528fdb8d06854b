"""mgmtd's persistent state through SQLAlchemy 2 (SQLite by default, PostgreSQL by URL).

Tables: ``fs3_meta`` (routing version, chain-table parameters), ``fs3_nodes`` (address, port,
incarnation), ``fs3_chains`` (version and ordered members with their states) and ``fs3_faults``
(corruption and other faults reported by storage servers). Every change the manager publishes
is committed here first, so a restarted mgmtd serves the same routing table.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

__all__ = ["MgmtdStore"]


class _Base(DeclarativeBase):
    pass


class MetaRow(_Base):
    __tablename__ = "fs3_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


class NodeRow(_Base):
    __tablename__ = "fs3_nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(128), default="")
    port: Mapped[int] = mapped_column(Integer, default=0)
    incarnation: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)


class ChainRow(_Base):
    __tablename__ = "fs3_chains"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    members: Mapped[Any] = mapped_column(JSON)  # [[target, state], ...] head first


class FaultRow(_Base):
    __tablename__ = "fs3_faults"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    node: Mapped[str] = mapped_column(String(64))
    target: Mapped[int] = mapped_column(Integer)
    chain: Mapped[int] = mapped_column(Integer)
    chunk: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(1024), default="")


class MgmtdStore:
    """Load and save mgmtd's state; one short transaction per change."""

    def __init__(self, url: str) -> None:
        self.url = url
        kw: dict = {}
        if url.startswith("sqlite"):
            kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kw)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _rec):  # WAL: readers never block the writer
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        _Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def load(self) -> dict | None:
        """The saved state, or None for a fresh database."""
        with Session(self.engine) as s:
            meta = {r.key: r.value for r in s.scalars(select(MetaRow))}
            if "routing_version" not in meta:
                return None
            nodes = {r.name: {"address": r.address, "port": r.port, "incarnation": r.incarnation,
                              "last_seen": r.last_seen} for r in s.scalars(select(NodeRow))}
            chains = {r.id: {"version": r.version, "members": [tuple(m) for m in r.members]}
                      for r in s.scalars(select(ChainRow))}
        return {"meta": meta, "nodes": nodes, "chains": chains}

    def save(self, meta: dict, nodes: dict, chains: dict) -> None:
        """Write the whole (small) state in one transaction: meta keys, nodes and chains."""
        with Session(self.engine) as s, s.begin():
            for k, v in meta.items():
                s.merge(MetaRow(key=k, value=v))
            for name, n in nodes.items():
                s.merge(NodeRow(name=name, address=n["address"], port=n["port"], incarnation=n["incarnation"],
                                last_seen=n.get("last_seen", 0.0)))
            for cid, c in chains.items():
                s.merge(ChainRow(id=cid, version=c["version"], members=[list(m) for m in c["members"]]))

    def add_fault(self, node: str, target: int, chain: int, chunk: str, kind: str, detail: str) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(FaultRow(at=time.time(), node=node, target=target, chain=chain, chunk=chunk, kind=kind,
                           detail=detail[:1000]))

    def faults(self, limit: int = 100) -> list[dict]:
        with Session(self.engine) as s:
            rows = s.scalars(select(FaultRow).order_by(FaultRow.id.desc()).limit(limit))
            return [{"at": r.at, "node": r.node, "target": r.target, "chain": r.chain, "chunk": r.chunk,
                     "kind": r.kind, "detail": r.detail} for r in rows]
