"""Reliable update and forwarding: the CRAQ write path of a storage server (single writes,
batches, removals), idempotent retries, and the count of writes in progress that a resync
waits for.

[Note: the write path] The head takes the per-chunk lock, assigns version u = max(committed,
pending) + 1, builds the new content (read-modify-write for a partial write), forwards the whole
chunk to its successor with u and stores it as *pending* while the successor works. Every hop checks the chain
version, locks, stores pending and forwards; the tail stores u directly as *committed* and
acknowledges with its CRC32C; each predecessor compares the CRC with its own, commits (a
rename) and acknowledges in turn. The client's ack therefore means every replica of the
chain version committed u. A failed forward leaves the pending version in place and fails the
request with a retryable error; the client refreshes its routing and retries with the same
(client, channel, seq), which the replicas that already committed answer from their cache.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager

from network import RemoteError, TransportError

from ..chunkstore import ChunkMeta, crc32c
from ..errors import (
    ChunkVersionConflict,
    ForwardFailed,
    InvalidRequest,
    NotServing,
    StaleRequest,
    StaleRouting,
    StorageError,
    from_remote,
)
from ..forward import HOP_SHARE, call_overlapped
from ..routing import SERVING, SYNCING, Routing
from .request import item_error, malformed

__all__ = ["ReliableUpdate"]

_DEDUP_MAX = 65536  # remembered (client, channel) pairs per server: retries come within seconds


class ReliableUpdate:
    """The write path (a part of :class:`StorageServer`, over its state)."""

    def h_write(self, args: dict, payload: memoryview, ctx) -> dict:
        with malformed("storage.write"):
            chain, cver, chunk = int(args["chain"]), int(args["cver"]), int(args["chunk"])
            off = int(args.get("off", 0))
            for name in ("channel", "seq", "ver"):  # read where they are used
                int(args.get(name, 0))
        fwd = bool(args.get("fwd"))
        op = args.get("op", "write")
        if op not in ("write", "remove"):
            raise InvalidRequest(f"storage.write: unknown op {op!r} (write, remove)")
        if off < 0 or off + len(payload) > self.cfg.chunk_size:
            raise InvalidRequest(f"storage.write: bytes [{off}, {off + len(payload)}) do not fit a chunk of "
                                 f"{self.cfg.chunk_size} bytes")
        self._authorize(ctx, args, (chunk,), True, "storage.write")
        with self._admit(chain, cver):
            return self._write_one(args, payload, chain, cver, chunk, fwd, op, off)

    def _write_one(self, args, payload, chain, cver, chunk, fwd, op, off) -> dict:
        r, tid, state = self._check_chain(chain, cver, (SERVING, SYNCING))
        ws, pos = self._position(r, chain, cver, tid, fwd)
        store = self._store(tid)
        key = (tid, str(args.get("client", "")), int(args.get("channel", 0)))
        seq = int(args.get("seq", 0))
        with self.locks.hold((tid, chain, chunk), min(self.lock_timeout, self._budget(args))):
            cached = self._cached(key, seq, fwd and op == "write", int(args.get("ver", -1)))
            if cached is not None:
                return cached
            self._still_current(chain, cver)
            self._count("writes")
            if op == "remove":
                result = self._remove_chain(r, ws, pos, args, chain, chunk, store)
            else:
                result = self._write_chain(r, ws, pos, args, chain, cver, chunk, off, payload, store, state)
            self._io(tid, op, len(payload) if op == "write" else 0)  # done: a failed write raised, uncounted
            if key[1]:
                self._remember(key, seq, result)
            return result

    def _still_current(self, chain: int, cver: int) -> None:
        """Refuse a write whose chain moved on while it waited for its chunk lock.

        [Note: re-check after the lock] A write checks its chain version on arrival, then may wait
        for the chunk lock behind an earlier attempt (one stuck on a frozen successor). If mgmtd
        changed the chain meanwhile, going on would forward along the old chain, to the node that
        was just moved out, and hold the lock for another timeout: the write is refused instead
        (``StaleRouting``) and its client retries on the new chain. The chunk lock bounds its wait
        by the request's budget for the same reason (``ChunkBusy``, retried).
        """
        c = self.routing.chains.get(chain)
        if c is not None and c["version"] != cver:
            raise StaleRouting(f"{self.node}: chain {chain} moved to version {c['version']} while a write at "
                               f"version {cver} waited for its chunk", current=c["version"])

    @contextmanager
    def _admit(self, chain: int, cver: int):
        """Count a write in progress at its chain version (before its version check: see the resync)."""
        key = (chain, cver)
        with self._admit_lock:
            self._admitted[key] = self._admitted.get(key, 0) + 1
        try:
            yield
        finally:
            with self._admit_lock:
                n = self._admitted.pop(key) - 1
                if n:
                    self._admitted[key] = n

    def _drain_writes(self, chain: int, cver: int) -> None:
        """Wait until no write admitted at a chain version older than ``cver`` is in progress here.

        [Note: resync after the last old write] A write that passed its chain-version check just
        before this server adopted the version with a syncing successor may still create a chunk
        here after the resync listed the chunks, and the successor would never get it. Such a
        write counts itself before its check (``_admit``), so once the new version is installed a
        count of zero means none is left, and every later write is refused (stale version) or goes
        through the successor too.
        """
        deadline = time.monotonic() + self.lock_timeout + self.io_timeout
        while True:
            with self._admit_lock:
                busy = [v for c, v in self._admitted if c == chain and v < cver]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise StorageError(f"{self.node}: writes at chain {chain} v{min(busy)} still in progress after "
                                   f"{self.lock_timeout + self.io_timeout:.0f} s; resync postponed")
            time.sleep(0.005)

    def _position(self, r: Routing, chain: int, cver: int, tid: int, fwd: bool) -> tuple[list, int]:
        """The chain's write set and this target's place in it, for a write entering here."""
        ws = r.write_set(chain)
        if not ws:
            raise NotServing(f"{self.node}: chain {chain} v{cver} has no serving target; it takes no writes",
                             current=cver)
        pos = [t for t, _ in ws].index(tid)
        if pos == 0 and fwd:
            raise NotServing(f"{self.node}: forwarded write reached the head of chain {chain} v{cver}")
        if pos > 0 and not fwd:
            raise NotServing(f"{self.node}: target {tid} is not the head of chain {chain} v{cver}; "
                             f"send writes to {ws[0][0]}", current=cver)
        return ws, pos

    def _cached(self, key: tuple, seq: int, fwd_write: bool, ver: int) -> dict | None:
        """The remembered answer when this update is a repeat of the last one on its channel."""
        if not key[1]:
            return None
        with self._dedup_lock:
            cached = self._dedup.get(key)
        if cached is None:
            return None
        # a forwarded retry may carry a new version (the head re-numbered it after a lost ack):
        # the cached answer is for the old one, so apply it instead (the version checks of the
        # write path recognise a true repeat)
        repeat = not fwd_write or cached[1].get("version") == ver
        if cached[0] == seq and repeat:
            return cached[1]
        if seq < cached[0]:
            raise StaleRequest(f"{self.node}: request {seq} on channel {key[2]} of client {key[1]} is "
                               f"older than {cached[0]}")
        return None

    def h_write_batch(self, args: dict, payload: memoryview, ctx) -> dict:
        """Whole-chunk writes of several chunks of one chain in one request (a batch).

        [Note: batched writes] Each item is the single-chunk write path (its own chunk lock,
        version, dedup key, pending version and commit), but a hop forwards all of its items to
        its successor in one request and they come back in one acknowledgement: the per-request
        costs of every hop (RPC, wake-ups, small packets) are paid once per batch. The chunk
        locks are taken in chunk order (no deadlock with another batch). Each item answers on
        its own: ``{version, crc}`` or ``{err, msg, data}``; a whole failed forward fails every
        item still open with ForwardFailed, and the client retries what failed with the same keys.
        """
        fwd = bool(args.get("fwd"))
        client = str(args.get("client", ""))
        items = args.get("items") or []  # [chunk, channel, seq, nbytes(, version, crc when forwarded)]
        with malformed("storage.write_batch"):
            chain, cver = int(args["chain"]), int(args["cver"])
            for it in items:
                if len(it) < (6 if fwd else 4):
                    raise InvalidRequest(f"storage.write_batch: item {it!r} has {len(it)} fields, expected "
                                         f"{'6 (forwarded)' if fwd else 4}")
                for x in it[:5 if fwd else 4]:
                    int(x)
        cs = self.cfg.chunk_size
        if any(not 0 <= int(it[3]) <= cs for it in items) or sum(int(it[3]) for it in items) != len(payload):
            raise InvalidRequest(f"storage.write_batch: item sizes {[it[3] for it in items]} do not match the "
                                 f"{len(payload)}-byte payload or exceed the chunk size {cs}")
        if len({int(it[0]) for it in items}) != len(items):
            raise InvalidRequest("storage.write_batch: a chunk appears twice in one batch")
        self._authorize(ctx, args, [it[0] for it in items], True, "storage.write_batch")
        with self._admit(chain, cver):
            return self._write_batch(client, items, payload, chain, cver, fwd, self._budget(args))

    def _budget(self, args: dict) -> float:
        """How long this hop may wait for its successor: the budget the request carries (``tmo``,
        fs3.forward's note on hop budgets), else ``write_timeout``; never above the I/O timeout."""
        try:
            tmo = float(args.get("tmo") or self.write_timeout)
        except (TypeError, ValueError):
            raise InvalidRequest(f"storage.write: tmo must be a number of seconds, got {args.get('tmo')!r}") from None
        if not 0 < tmo < float("inf"):
            raise InvalidRequest(f"storage.write: tmo must be a positive number of seconds, got {args.get('tmo')!r}")
        return min(max(tmo, 0.05), self.io_timeout)

    def _write_batch(self, client, items, payload, chain, cver, fwd, budget: float) -> dict:
        r, tid, state = self._check_chain(chain, cver, (SERVING, SYNCING))
        ws, pos = self._position(r, chain, cver, tid, fwd)
        store = self._store(tid)
        views, at = [], 0
        for it in items:
            views.append(payload[at:at + int(it[3])])
            at += int(it[3])
        results: list = [None] * len(items)
        with ExitStack() as held:
            for chunk in sorted(int(it[0]) for it in items):
                held.enter_context(self.locks.hold((tid, chain, chunk), min(self.lock_timeout, budget)))
            self._still_current(chain, cver)
            todo = []  # (index, chunk, version, data, dedup key, seq)
            tried: list[int] = []  # items this request writes (not answered from the dedup cache)
            for i, it in enumerate(items):
                chunk, seq = int(it[0]), int(it[2])
                key = (tid, client, int(it[1]))
                try:
                    cached = self._cached(key, seq, fwd, int(it[4]) if fwd else -1)
                    if cached is not None:
                        results[i] = cached
                        continue
                    self._count("writes")
                    tried.append(i)
                    fver, fcrc = (int(it[4]), it[5]) if pos else (0, None)  # forwarded items carry them
                    ver, done = self._hop_version(store.get(chain, chunk), pos, state, chain, chunk, fver, fcrc)
                    if done is not None:
                        results[i] = done
                        self._remember(key, seq, done)
                        continue
                except StorageError as exc:
                    results[i] = item_error(exc)
                    continue
                todo.append((i, chunk, ver, views[i], key, seq))
            if pos == len(ws) - 1:
                for i, chunk, ver, data, key, seq in todo:
                    crc = store.put(chain, chunk, ver, cver, data, pending=False)
                    results[i] = {"version": ver, "crc": crc}
                    self._remember(key, seq, results[i])
            elif todo:
                self._forward_batch(r, ws, pos, client, chain, cver, store, state, todo, results, budget)
        for i in tried:  # counted once written (or found already there), not when they failed
            if results[i] is not None and "err" not in results[i]:
                self._io(tid, "write", len(views[i]))
        return {"items": results}

    def _forward_batch(self, r, ws, pos, client, chain, cver, store, state, todo, results, budget) -> None:
        """Store the batch's items as pending while the successor stores them too, then commit
        what it acknowledged (the batch form of the write path's overlap)."""
        crcs = [crc32c(data) for _i, _c, _v, data, _k, _s in todo]
        succ = ws[pos + 1][0]
        fargs = {"chain": chain, "cver": cver, "client": client, "fwd": True, "tmo": budget * HOP_SHARE,
                 "items": [[chunk, key[2], seq, len(data), ver, crc]
                           for (_i, chunk, ver, data, key, seq), crc in zip(todo, crcs, strict=True)]}

        def stage() -> None:
            for (_i, chunk, ver, data, _k, _s), crc in zip(todo, crcs, strict=True):
                store.put(chain, chunk, ver, cver, data, pending=True, crc=crc)

        try:
            rep, _ = call_overlapped(self._pool(r.node_of(succ), r), "storage.write_batch", fargs,
                                     [t[3] for t in todo], during=stage, timeout=budget)
        except RemoteError as exc:
            err = from_remote(exc)
            if isinstance(err, StorageError):
                raise ForwardFailed(f"{self.node}: successor {succ} refused a batch of chain {chain}: {err}",
                                    current=cver) from None
            raise
        except TransportError as exc:
            raise ForwardFailed(f"{self.node}: successor target {succ} ({r.node_of(succ)}) did not acknowledge "
                                f"a batch of chain {chain}: {exc}", current=cver) from None
        for (i, chunk, ver, data, key, seq), crc, res in zip(todo, crcs, rep["items"], strict=True):
            if "err" not in res and res.get("crc") == crc and res.get("version") == ver:
                store.commit(chain, chunk, ver)
                results[i] = {"version": ver, "crc": crc}
                self._remember(key, seq, results[i])
            elif pos == 0 and res.get("err") == "ChunkVersionConflict":
                # the successor holds a newer version: the single-chunk path renumbers and
                # retries this item (its lock is still held)
                args = {"client": client, "channel": key[2], "seq": seq, "full": True, "tmo": budget}
                try:
                    results[i] = self._write_chain(r, ws, pos, args, chain, cver, chunk, 0, data, store, state)
                except StorageError as exc:
                    results[i] = item_error(exc)
                    continue
                self._remember(key, seq, results[i])
            elif "err" in res:
                results[i] = item_error(ForwardFailed(
                    f"{self.node}: successor {succ} refused chunk {chain}/{chunk:016x}: {res['err']}: "
                    f"{res.get('msg')}", current=cver))
            else:
                results[i] = item_error(ForwardFailed(
                    f"{self.node}: successor {succ} stored chunk {chain}/{chunk:016x} as v{res.get('version')} "
                    f"CRC {res.get('crc')}, expected v{ver} CRC {crc}", current=cver))

    def _remember(self, key: tuple, seq: int, result: dict) -> None:
        if not key[1]:
            return  # no client id: nothing to deduplicate
        with self._dedup_lock:
            self._dedup[key] = (seq, result)
            self._dedup.move_to_end(key)
            while len(self._dedup) > _DEDUP_MAX:
                self._dedup.popitem(last=False)

    def _hop_version(self, m: ChunkMeta | None, pos: int, state, chain: int, chunk: int, ver: int,
                     crc) -> tuple[int, dict | None]:
        """The version this hop stores an update as, and the answer when it is already applied.

        The head numbers it (one past anything it has); a later hop takes the forwarded ``ver``,
        answers a retried forward it already committed, and refuses one older than its copy. A
        syncing target takes whatever its predecessor sends (it is being overwritten anyway).
        """
        if pos == 0:
            return (max(m.committed, m.pending) + 1 if m else 1), None
        if m and m.committed >= ver and state != SYNCING:
            if m.committed == ver and m.crc == crc:
                return ver, {"version": ver, "crc": m.crc}  # already applied (a retried forward)
            raise ChunkVersionConflict(f"{self.node}: chunk {chain}/{chunk:016x} is committed at "
                                       f"v{m.committed} >= update v{ver}", committed=m.committed)
        return ver, None

    def _write_chain(self, r, ws, pos, args, chain, cver, chunk, off, payload, store, state) -> dict:
        m = store.get(chain, chunk)
        ver, done = self._hop_version(m, pos, state, chain, chunk, int(args.get("ver", 0)), args.get("crc"))
        if done is not None:
            return done
        if pos == 0:
            if args.get("full", True) or not (m and m.committed):
                if off:
                    content = bytearray(off + len(payload))
                    content[off:] = payload
                else:
                    content = payload
            else:
                # the head's own copy: a damaged one is reported and repaired
                old, _ = self._read_or_report(store.target, store, chain, chunk)
                content = bytearray(max(len(old), off + len(payload)))
                content[:len(old)] = old
                content[off:off + len(payload)] = payload
        else:
            content = payload
        tail = pos == len(ws) - 1
        budget = self._budget(args)
        for attempt in range(3):
            if tail:
                crc = store.put(chain, chunk, ver, cver, content, pending=False)
                return {"version": ver, "crc": crc}
            # [Note: overlap] The request goes to the successor first; the pending version is
            # stored while the successor works on it (fs3.forward's note), so a hop costs
            # max(local write, rest of the chain), not the sum. The commit below follows both.
            crc = crc32c(content)
            succ = ws[pos + 1][0]
            fargs = {"chain": chain, "cver": cver, "chunk": chunk, "off": 0, "full": True, "op": "write",
                     "client": args.get("client", ""), "channel": args.get("channel", 0),
                     "seq": args.get("seq", 0), "ver": ver, "crc": crc, "fwd": True, "tmo": budget * HOP_SHARE}
            try:
                rep, _ = call_overlapped(
                    self._pool(r.node_of(succ), r), "storage.write", fargs, [content],
                    during=lambda v=ver, c=crc: store.put(chain, chunk, v, cver, content, pending=True, crc=c),
                    timeout=budget)
            except RemoteError as exc:
                err = from_remote(exc)
                if isinstance(err, ChunkVersionConflict) and pos == 0 and attempt < 2:
                    ver = int(err.rpc_data.get("committed", ver)) + 1
                    continue
                if isinstance(err, StorageError):
                    raise ForwardFailed(f"{self.node}: successor {succ} refused chunk {chain}/{chunk:016x}: "
                                        f"{err}", current=cver) from None
                raise
            except TransportError as exc:
                raise ForwardFailed(f"{self.node}: successor target {succ} ({r.node_of(succ)}) did not "
                                    f"acknowledge chunk {chain}/{chunk:016x}: {exc}", current=cver) from None
            if rep.get("crc") != crc or rep.get("version") != ver:
                raise ForwardFailed(f"{self.node}: successor {succ} stored chunk {chain}/{chunk:016x} as "
                                    f"v{rep.get('version')} CRC {rep.get('crc')}, expected v{ver} CRC {crc}",
                                    current=cver)
            store.commit(chain, chunk, ver)
            return {"version": ver, "crc": crc}
        raise ChunkVersionConflict(f"{self.node}: chunk {chain}/{chunk:016x}: version conflict persisted")

    def _remove_chain(self, r, ws, pos, args, chain, chunk, store) -> dict:
        if pos < len(ws) - 1:
            succ = ws[pos + 1][0]
            budget = self._budget(args)
            fargs = dict(args, fwd=True, tmo=budget * HOP_SHARE)
            try:
                self._pool(r.node_of(succ), r).call("storage.write", fargs, timeout=budget)
            except RemoteError as exc:
                raise ForwardFailed(f"{self.node}: successor {succ} refused removal: {from_remote(exc)}") from None
            except TransportError as exc:
                raise ForwardFailed(f"{self.node}: successor {succ} did not acknowledge removal: {exc}") from None
        existed = store.remove(chain, chunk)
        return {"removed": existed}
