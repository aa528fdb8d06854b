"""fs3.meta: the metadata service (the namespace of fs3 files) and its Python stub.

``python -m fs3.meta --cluster FILE --node NAME [--db URL]`` runs a meta server on the port of the
cluster's ``[[service]] module = "fs3.meta"``. State lives in SQLAlchemy (a SQLite file in the
node's data dir by default, PostgreSQL by ``[fs3] meta_db``); several servers on one PostgreSQL
database serve one namespace. See docs/fs3.md ("Metadata service") and the shared spec.

| module | what |
|---|---|
| ``schema`` | the tables: inodes, dirents, sessions, the GC queue, counters |
| ``store`` | :class:`MetaStore`: every operation as one serializable transaction (pure DB logic) |
| ``perm`` | POSIX permission checks, :class:`User` |
| ``service`` | :class:`MetaServer`: the ``meta.*`` RPC methods, identity, storage work, ``main`` |
| ``client`` | :class:`MetaClient` (failover, session renewal) and :class:`Attrs` |
| ``gc`` | the worker that prunes expired sessions and removes unlinked files' chunks |
| ``layout`` | which chains a new file stripes over |
| ``length`` | exact lengths from ``storage.last_chunk``; cutting chunks at truncate |
"""

from .client import Attrs, MetaClient, field
from .perm import User
from .schema import ROOT
from .service import MetaServer
from .store import MetaStore

__all__ = ["Attrs", "MetaClient", "MetaServer", "MetaStore", "ROOT", "User", "field"]
