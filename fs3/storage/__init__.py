"""fs3.storage: a storage server. ``python -m fs3.storage --cluster FILE --node NAME``.

It serves the targets that the routing table places on its node, each a :class:`ChunkStore`
in ``<data dir>/<node>/targets/<target id>``. It heartbeats mgmtd, keeps the routing table
fresh, runs the CRAQ write path and the resync of a returning successor.

RPC methods (traffic class STORAGE):

- ``storage.write {chain, cver, chunk, off, full, op, client, channel, seq[, ver, fwd]}`` + payload:
  a write (or ``op="remove"``) entering at the head or forwarded by a predecessor;
- ``storage.write_batch {chain, cver, client, items: [[chunk, channel, seq, nbytes(, ver, crc)], ...][, fwd]}``
  + the items' bytes back to back: whole-chunk writes of several chunks of one chain, each item
  the write path of ``storage.write`` and answered on its own (``{items: [...]}``);
- ``storage.read {items: [[chain, cver, chunk, off, len], ...], relaxed[, e2e]}`` -> per-item results
  (``n`` bytes, version ``v``, CRC32C ``c``) and the bytes of every item back to back; with ``e2e``
  the caller checks each whole-chunk item against ``c`` itself (``u`` marks such unverified items,
  sent from the file with ``sendfile``) and reports a mismatch with ``storage.check``;
- ``storage.check {chain, chunk}`` -> ``{corrupt}``: verify this server's copy (a reader saw a CRC
  mismatch); a damaged copy is reported to mgmtd and repaired;
- ``storage.sync_meta``, ``storage.sync_write``, ``storage.sync_remove``: the resync protocol;
- ``storage.list {chain}``, ``storage.stats``: admin.

The package splits the server the way 3FS splits ``src/storage/``, one concept per module:

| module | what |
|---|---|
| ``service`` | :class:`StorageServer`: its state, RPC wiring, chunk stores per target, admin handlers, ``main`` |
| ``lease`` | routing table, heartbeat to mgmtd, the lease, the chain-version check, peer pools |
| ``update`` | reliable update and forwarding: the CRAQ write path, batches, removals, idempotent retries |
| ``read`` | the read path |
| ``scrub`` | the check worker: verify a doubted copy, report and repair damage, the periodic scrub |
| ``resync`` | the resync worker (predecessor side) and the syncing successor's handlers |
| ``locks`` | the per-chunk locks |
| ``request`` | reading a request's arguments: a malformed one is ``InvalidRequest`` |

The chunk store (``fs3.chunkstore``) and the split-phase forward (``fs3.forward``) stay modules of
their own: neither depends on the server.

[Note: one server, several parts] Each part is a class that :class:`StorageServer` inherits:
the parts share one state (the routing table, the stores, the chunk locks, the counters), and
their work meets under the same chunk lock (a scrub read never races a write, a resync copy
never races a commit), so a part is a set of methods over that state rather than an object of
its own. ``service`` creates the state, with one lock per shared structure (see its ``__init__``);
a part touches a structure only under its lock.
"""

from .service import StorageServer, main

__all__ = ["StorageServer", "main"]
