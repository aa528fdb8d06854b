"""The resync worker of a storage server: a serving predecessor copies to its returning (syncing)
successor what differs, and the successor's side of that protocol.
"""

from __future__ import annotations

import logging
import threading
import time

from network import RemoteError, TransportError

from ..errors import StorageError
from ..routing import SERVING, SYNCING, Routing
from .request import malformed

__all__ = ["ResyncWorker"]

log = logging.getLogger(__name__)


class ResyncWorker:
    """Resync, both sides (a part of :class:`StorageServer`, over its state)."""

    def _maybe_resync(self) -> None:
        r = self.routing
        for cid, c in r.chains.items():
            members = c["members"]
            for i, (t, s) in enumerate(members):
                if s != SYNCING or i == 0:
                    continue
                pred, ps = members[i - 1]
                if ps == SERVING and r.targets.get(pred) == self.node:
                    job = (cid, t, c["version"])
                    with self._resync_lock:  # heartbeat and routing refreshes both get here
                        if job in self._resyncing:
                            continue
                        self._resyncing.add(job)
                    threading.Thread(target=self._resync, args=(r, cid, pred, t, c["version"]),
                                     name=f"resync-{cid}-{t}", daemon=True).start()

    def _resync(self, r: Routing, chain: int, mine: int, succ: int, cver: int) -> None:
        """Copy to the syncing successor what differs, remove what it has and we do not, report done."""
        job = (chain, succ, cver)
        try:
            self._drain_writes(chain, cver)
            pool = self._pool(r.node_of(succ), r)
            remote = pool.call("storage.sync_meta", {"chain": chain, "cver": cver, "target": succ}).result
            rmap = {int(x[0]): x for x in remote}
            store = self._store(mine)
            copied = removed = 0
            for _c, chunk, m in store.list(chain):
                rm = rmap.pop(chunk, None)
                if not m.committed:
                    continue
                if rm is not None and rm[1] == m.committed and rm[3] == m.crc and not rm[2]:
                    continue
                with self.locks.hold((mine, chain, chunk), self.lock_timeout):
                    if store.get(chain, chunk) is None:
                        continue
                    data, ver = self._read_or_report(mine, store, chain, chunk)
                    pool.call("storage.sync_write", {"chain": chain, "cver": cver, "chunk": chunk, "ver": ver,
                                                     "target": succ}, [data])
                    copied += 1
            gone = []
            for chunk in rmap:
                with self.locks.hold((mine, chain, chunk), self.lock_timeout):
                    if store.get(chain, chunk) is None:
                        gone.append(chunk)
            if gone:
                pool.call("storage.sync_remove", {"chain": chain, "cver": cver, "chunks": gone})
                removed = len(gone)
            self.mgmtd.call("mgmtd.sync_done", {"chain": chain, "target": succ, "chain_version": cver})
            self._count("resyncs")
            self._count("resynced_chunks", copied)
            log.info("resync of target %s (chain %d v%d) done: %d copied, %d removed", succ, chain, cver,
                     copied, removed)
            self.refresh_routing(force=True)
        except (TransportError, RemoteError, StorageError) as exc:
            log.warning("resync of target %s (chain %d v%d) failed, will retry: %s", succ, chain, cver, exc)
            time.sleep(min(1.0, self.cfg.heartbeat_interval))
        finally:
            with self._resync_lock:
                self._resyncing.discard(job)

    def h_sync_meta(self, args: dict, payload, ctx) -> list:
        with malformed("storage.sync_meta"):
            chain, cver = int(args["chain"]), int(args["cver"])
        _r, tid, _s = self._check_chain(chain, cver, (SYNCING,))
        return [m.as_list(k) for _c, k, m in self._store(tid).list(chain)]

    def h_sync_write(self, args: dict, payload: memoryview, ctx) -> dict:
        with malformed("storage.sync_write"):
            chain, cver, chunk, ver = int(args["chain"]), int(args["cver"]), int(args["chunk"]), int(args["ver"])
        _r, tid, _s = self._check_chain(chain, cver, (SYNCING,))
        store = self._store(tid)
        with self.locks.hold((tid, chain, chunk), self.lock_timeout):
            crc = store.put(chain, chunk, ver, cver, payload, pending=False)
        return {"crc": crc}

    def h_sync_remove(self, args: dict, payload, ctx) -> dict:
        with malformed("storage.sync_remove"):
            chain, cver = int(args["chain"]), int(args["cver"])
            chunks = [int(c) for c in args.get("chunks") or []]
        _r, tid, _s = self._check_chain(chain, cver, (SYNCING,))
        store = self._store(tid)
        n = 0
        for chunk in chunks:
            with self.locks.hold((tid, chain, chunk), self.lock_timeout):
                n += store.remove(chain, chunk)
        return {"removed": n}
