"""A storage server's membership: the routing table it serves by, its heartbeat to mgmtd, the
lease that stops it serving when mgmtd stops answering, the chain-version check every request
passes, and its connection pools to chain peers.
"""

from __future__ import annotations

import logging
import time

from network import RemoteError, RpcPool, TrafficClass, TransportError

from ..errors import NotServing, StaleRouting, TargetFailed
from ..routing import Routing

__all__ = ["Lease"]

log = logging.getLogger(__name__)


class Lease:
    """Routing, heartbeat and lease (a part of :class:`StorageServer`, over its state)."""

    def _set_routing(self, d: dict) -> None:
        r = Routing.from_dict(d)
        with self._rlock:
            if r.version < self.routing.version:
                return
            self.routing = r
        for t, n in r.targets.items():
            if n == self.node and t not in self.failed:
                try:
                    self._store(t)
                except TargetFailed:
                    pass  # reported offline from now on
        self._maybe_resync()

    def refresh_routing(self, force: bool = False) -> Routing:
        """Fetch the routing table from mgmtd (concurrent callers share one fetch: fs3.routing's
        SingleFlight); without ``force``, not more than once per 20 ms."""
        if not force and time.monotonic() - self._last_refresh < 0.02:
            return self.routing
        try:
            return self._fetch()
        except TimeoutError as exc:
            log.warning("routing refresh: %s", exc)
            return self.routing

    def _fetch_routing(self) -> Routing:
        try:
            d = self.mgmtd.call("mgmtd.routing", {"have": self.routing.version}).result
        except (TransportError, RemoteError) as exc:
            log.warning("routing refresh failed: %s", exc)
            return self.routing
        self._last_refresh = time.monotonic()
        self._count("routing_refreshes")
        if not d.get("unchanged"):
            self._set_routing(d)
        return self.routing

    def _heartbeat_once(self) -> None:
        with self._stores_lock:
            tids = set(self.stores)
        with self._failed_lock:
            failed = set(self.failed)
        targets = {str(t): "offline" if t in failed else "online" for t in tids | failed}
        sent = time.monotonic()
        out = self.mgmtd.call("mgmtd.heartbeat", {
            "node": self.node, "address": self.address, "port": self.port, "incarnation": self.incarnation,
            "targets": targets, "with_routing": self.routing.version == 0}).result
        self._lease_until = sent + self.cfg.failure_timeout / 2
        with self._failed_lock:
            fenced, self._fenced = self._fenced, False
        if fenced:
            log.warning("%s: in contact with mgmtd again: serving what the routing table gives it", self.node)
        if "routing" in out:
            self._set_routing(out["routing"])
        elif out["routing_version"] != self.routing.version:
            self.refresh_routing(force=True)
        else:
            self._maybe_resync()

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._heartbeat_once()
            except (TransportError, RemoteError) as exc:
                log.warning("heartbeat to mgmtd %s:%d failed: %s", *self.mgmtd_addr, exc)
            except Exception:  # pragma: no cover
                log.exception("heartbeat failed")
            self._beat.wait(self.cfg.heartbeat_interval)
            self._beat.clear()

    def _check_lease(self) -> None:
        """Refuse to serve when mgmtd has not answered a heartbeat for ``failure_timeout / 2``.

        [Note: the lease] mgmtd reconfigures a chain only after a node was silent for
        ``failure_timeout``. A server cut off from mgmtd (but not from clients) cannot learn of that:
        its routing table stays the old one, so a client still holding the old table too would be
        served the old bytes of a chunk the new chain has since rewritten. So a server serves only
        while its last answered heartbeat was *sent* less than ``failure_timeout / 2`` ago (3FS
        stops such a service too): it has stopped before mgmtd can have moved its targets out of
        their chains, with half the timeout to spare for clocks and requests in flight. It answers
        ``NotServing`` meanwhile (clients move to another replica or refresh their routing) and
        serves again on the first answered heartbeat, which also brings the current routing table.
        The cost: with mgmtd itself down for longer than half the timeout, no server serves.
        """
        over = time.monotonic() - self._lease_until
        if over <= 0:
            return
        with self._failed_lock:
            newly, self._fenced = not self._fenced, True
        if newly:
            self._count("lease_expired")
            log.error("%s: no heartbeat answered by mgmtd for %.1f s (failure_timeout / 2): not serving until "
                      "mgmtd answers", self.node, self.cfg.failure_timeout / 2 + over)
        raise NotServing(f"{self.node}: out of contact with mgmtd for {self.cfg.failure_timeout / 2 + over:.1f} s "
                         f"(the lease is failure_timeout / 2 = {self.cfg.failure_timeout / 2:g} s): not serving",
                         current=0)

    def _check_chain(self, chain: int, cver: int, want: tuple[str, ...]) -> tuple[Routing, int, str]:
        """Validate the request's chain version against ours; returns (routing, my target, my state).
        Refuses everything while the mgmtd lease has expired (:meth:`_check_lease`)."""
        self._check_lease()
        r = self.routing
        c = r.chains.get(chain)
        if c is None or cver > c["version"]:
            r = self.refresh_routing(force=True)
            c = r.chains.get(chain)
        if c is None:
            raise NotServing(f"{self.node}: no chain {chain} in routing v{r.version}", current=0)
        if cver != c["version"]:
            raise StaleRouting(f"{self.node}: chain {chain} is at version {c['version']}, request has {cver}",
                               current=c["version"])
        tid = r.target_on(chain, self.node)
        why = self.failed.get(tid)  # one read: the dict only grows, under _failed_lock
        if why is not None:
            raise TargetFailed(f"{self.node}: target {tid} failed ({why}) and is out of service",
                               current=c["version"])
        state = r.state_of(chain, tid) if tid is not None else None
        if tid is None or state not in want:
            raise NotServing(f"{self.node}: target {tid} of chain {chain} is {state}, not {'/'.join(want)}",
                             current=c["version"])
        return r, tid, state

    def _pool(self, node: str, r: Routing) -> RpcPool:
        n = r.nodes[node]
        key = (n["address"], n["port"])
        p = self._pools.get(key)
        if p is None:
            with self._pools_lock:
                p = self._pools.get(key)
                if p is None:
                    p = self._pools[key] = RpcPool(*key, size=16, timeout=self.io_timeout, connect_timeout=3.0,
                                                   traffic_class=TrafficClass.STORAGE, source=self.address,
                                                   credential=self._cred)
        return p
