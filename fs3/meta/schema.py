"""The metadata service's tables (SQLAlchemy 2 typed models; the store queries them with Core).

- ``fs3_inodes``: one row per inode (files, directories, symlinks), attributes in integer
  nanoseconds; ``layout`` (files) as JSON text, ``tver`` counts truncations (a session that
  opened before the last truncate does not push the length back out);
- ``fs3_dirents``: ``(parent, name) -> ino, type``; the primary key orders a directory's entries
  by name, bytewise (``COLLATE "C"`` on PostgreSQL), so readdir pages by key;
- ``fs3_sessions``: open files (``id`` (a random 63-bit integer) ``-> ino, client, write, expires, tver``);
- ``fs3_gc``: inodes whose link count reached 0 (removed with their chunks once closed, after
  ``gc_delay``);
- ``fs3_counters``: named counters (``ino``: the next unallocated inode id, taken in blocks).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..chunkid import MAX_INODE

__all__ = ["Base", "Inode", "Dirent", "Session", "GcEntry", "Counter", "inodes", "dirents", "sessions", "gc",
           "counters", "ROOT", "MAX_INO"]

ROOT = 1
MAX_INO = MAX_INODE

# names sort bytewise on both backends: SQLite compares TEXT with memcmp, PostgreSQL needs "C"
_Name = String(1024).with_variant(String(1024, collation="C"), "postgresql")
# a 64-bit key that is SQLite's rowid ("INTEGER PRIMARY KEY"; "BIGINT PRIMARY KEY" would add an index)
_Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Inode(Base):
    __tablename__ = "fs3_inodes"
    ino: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(8))
    mode: Mapped[int] = mapped_column(Integer)
    uid: Mapped[int] = mapped_column(BigInteger)
    gid: Mapped[int] = mapped_column(BigInteger)
    nlink: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    atime: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[int] = mapped_column(BigInteger)
    ctime: Mapped[int] = mapped_column(BigInteger)
    target: Mapped[str | None] = mapped_column(Text, nullable=True)
    parent: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    layout: Mapped[str | None] = mapped_column(Text, nullable=True)
    tver: Mapped[int] = mapped_column(Integer, default=0)


class Dirent(Base):
    __tablename__ = "fs3_dirents"
    parent: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(_Name, primary_key=True)
    ino: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(8))

    # clustered by (parent, name) on SQLite too: a directory's entries are one range of one b-tree
    __table_args__ = (Index("fs3_dirents_ino", "ino"), {"sqlite_with_rowid": False})


class Session(Base):
    __tablename__ = "fs3_sessions"
    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=False)  # random 63-bit
    ino: Mapped[int] = mapped_column(BigInteger, index=True)
    client: Mapped[str] = mapped_column(String(200), index=True)
    write: Mapped[bool] = mapped_column(Boolean)
    expires: Mapped[float] = mapped_column(Float)  # pruning scans: few sessions, once a second
    tver: Mapped[int] = mapped_column(Integer, default=0)


class GcEntry(Base):
    __tablename__ = "fs3_gc"
    ino: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=False)
    since: Mapped[float] = mapped_column(Float)


class Counter(Base):
    __tablename__ = "fs3_counters"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


inodes = Inode.__table__
dirents = Dirent.__table__
sessions = Session.__table__
gc = GcEntry.__table__
counters = Counter.__table__
