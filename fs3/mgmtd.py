"""fs3.mgmtd: the cluster manager. ``python -m fs3.mgmtd --cluster FILE --node NAME [--db URL]``.

It owns the routing table: storage nodes (address, port, liveness), targets, chains (ordered
members with their public states and a version) and the chain table. Storage servers
heartbeat every ``heartbeat_interval`` seconds; a node silent for ``failure_timeout`` seconds is
declared offline, and a node that comes back with a new *incarnation* (a restarted process) has
its targets taken out of service until they are resynced. Every change bumps the chain's
version and the routing version, and is committed to the database before it is published.

RPC methods (all over :mod:`network.rpc`, traffic class STORAGE):

- ``mgmtd.heartbeat {node, address, port, incarnation, targets: {id: "online"|"offline"}}``
  -> ``{routing_version}`` (plus the routing table when ``with_routing`` is set);
- ``mgmtd.routing {have}`` -> the routing table, or ``{"version": have, "unchanged": true}``;
- ``mgmtd.sync_done {chain, target, chain_version}``: the predecessor finished a resync;
- ``mgmtd.report_fault {node, target, chain, chunk, kind, detail}``; ``mgmtd.faults {limit}``;
- ``mgmtd.status``: nodes with their heartbeat age, chains, balance figure.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from network import RpcServer, TrafficClass
from network.auth import ANY
from network.metrics import add_collector
from network.service import service_parser, wait_for_shutdown

from .chaintable import generate_chain_table
from .config import Fs3Config, node_data_dir, service_start
from .errors import Fs3ConfigError, MgmtdError, StaleRouting
from .mgmtd_store import MgmtdStore
from .routing import LASTSRV, OFFLINE, SERVING, SYNCING, WAITING, TargetInput, next_chain

__all__ = ["Mgmtd", "main", "default_db_url"]

log = logging.getLogger(__name__)


_STATES = (SERVING, SYNCING, WAITING, LASTSRV, OFFLINE)


def default_db_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'mgmtd.db'}"


class Mgmtd:
    """The manager's state and its RPC handlers (one lock; every change is persisted first)."""

    def __init__(self, cfg: Fs3Config, storage_nodes: list[str], db_url: str, *,
                 check_interval: float | None = None) -> None:
        self.cfg = cfg
        self.store = MgmtdStore(db_url)
        self._lock = threading.RLock()
        self.check_interval = check_interval or min(cfg.heartbeat_interval / 2, 0.5)
        self._seen: dict[str, float] = {}        # node -> monotonic time of last heartbeat
        self._local: dict[int, str] = {}         # target -> "online"/"offline" (last report)
        self._restarted: set[str] = set()        # nodes that came back with a new incarnation
        self._synced: set[tuple[int, int, int]] = set()  # (chain, target, chain version)
        state = self.store.load()
        now = time.monotonic()
        if state is None:
            table = generate_chain_table(storage_nodes, cfg.targets_per_node, cfg.replication)
            self.version = 1
            self.meta = {"routing_version": 1, "replication": cfg.replication, "chunk_size": cfg.chunk_size,
                         "targets_per_node": cfg.targets_per_node, "storage_nodes": list(storage_nodes),
                         "targets": {str(k): v for k, v in table.target_node.items()},
                         "balance": table.balance()}
            self.nodes = {n: {"address": "", "port": 0, "incarnation": None, "last_seen": 0.0}
                          for n in storage_nodes}
            self.chains = {i + 1: {"version": 1, "members": [(t, SERVING) for t in c]}
                           for i, c in enumerate(table.chains)}
            self._persist()
            log.info("new chain table: %d chains over %d nodes, balance %.3f", len(self.chains),
                     len(storage_nodes), self.meta["balance"])
        else:
            self.meta = state["meta"]
            if (self.meta["replication"], self.meta["chunk_size"]) != (cfg.replication, cfg.chunk_size):
                raise Fs3ConfigError(
                    f"the database {db_url} holds a chain table for replication={self.meta['replication']}, "
                    f"chunk_size={self.meta['chunk_size']} but [fs3] says replication={cfg.replication}, "
                    f"chunk_size={cfg.chunk_size}; use the old values or a fresh database")
            self.version = self.meta["routing_version"]
            self.nodes = state["nodes"]
            self.chains = state["chains"]
            log.info("loaded state: routing version %d, %d chains", self.version, len(self.chains))
        self.targets = {int(k): v for k, v in self.meta["targets"].items()}
        # [Note: grace after start] Heartbeat ages are not persisted (monotonic clocks do not
        # survive a restart): every node that was alive when mgmtd stopped gets a full
        # failure_timeout from mgmtd's start; a node that was already down stays down until it
        # heartbeats again.
        was_alive = self.meta.get("alive") or {}
        for n in self.nodes:
            if was_alive.get(n, True):
                self._seen[n] = now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- persistence ------------------------------------------------------------------------
    def _persist(self) -> None:
        self.meta["routing_version"] = self.version
        self.store.save(self.meta, self.nodes, self.chains)

    def routing_dict(self) -> dict:
        now = time.monotonic()
        return {"version": self.version, "chunk_size": self.meta["chunk_size"],
                "replication": self.meta["replication"],
                "nodes": {n: {"address": d["address"], "port": d["port"],
                              "alive": now - self._seen.get(n, 0) <= self.cfg.failure_timeout}
                          for n, d in self.nodes.items()},
                "targets": {str(t): n for t, n in self.targets.items()},
                "chains": {str(c): {"version": d["version"], "members": [list(m) for m in d["members"]]}
                           for c, d in self.chains.items()},
                "balance": self.meta.get("balance", 1.0)}

    # -- the state machine ----------------------------------------------------------------------
    def evaluate(self) -> bool:
        """Re-evaluate every chain; persist and bump the routing version on change."""
        with self._lock:
            now = time.monotonic()
            inputs = {}
            for t, n in self.targets.items():
                alive = (now - self._seen.get(n, 0) <= self.cfg.failure_timeout
                         and self._local.get(t, "online") == "online")
                inputs[t] = TargetInput(alive=alive, restarted=n in self._restarted)
            changed = False
            for cid, c in self.chains.items():
                per = {t: TargetInput(i.alive, i.restarted, (cid, t, c["version"]) in self._synced)
                       for t, i in inputs.items()}
                new = next_chain(c["members"], per)
                if new != list(c["members"]):
                    log.info("chain %d v%d -> v%d: %s", cid, c["version"], c["version"] + 1,
                             " ".join(f"{t}:{s}" for t, s in new))
                    c["members"] = new
                    c["version"] += 1
                    changed = True
            self._restarted.clear()
            self._synced.clear()
            alive_now = {n: now - self._seen.get(n, 0) <= self.cfg.failure_timeout for n in self.nodes}
            if alive_now != self.meta.get("alive"):
                self.meta["alive"] = alive_now
                changed = True
            if changed:
                self.version += 1
                self._persist()
            return changed

    def _check_loop(self) -> None:
        while not self._stop.wait(self.check_interval):
            try:
                self.evaluate()
            except Exception:  # pragma: no cover - keep detecting failures whatever happens
                log.exception("chain evaluation failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._check_loop, name="mgmtd-check", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.store.close()

    # -- RPC handlers --------------------------------------------------------------------------
    def heartbeat(self, args: dict, payload, ctx) -> dict:
        node = args.get("node")
        if node not in self.nodes:
            raise MgmtdError(f"mgmtd: {node!r} is not a storage node of this cluster "
                             f"(known: {', '.join(sorted(self.nodes))})")
        inc = str(args.get("incarnation") or "")
        with self._lock:
            d = self.nodes[node]
            reevaluate = False
            if d["incarnation"] != inc:
                if d["incarnation"] is not None:
                    log.info("node %s restarted (incarnation %s -> %s)", node, d["incarnation"], inc)
                    self._restarted.add(node)
                d["incarnation"] = inc
                reevaluate = True
            addr = (str(args.get("address", "")), int(args.get("port", 0)))
            if (d["address"], d["port"]) != addr:
                d["address"], d["port"] = addr
                reevaluate = True
            was_alive = time.monotonic() - self._seen.get(node, 0) <= self.cfg.failure_timeout
            self._seen[node] = time.monotonic()
            d["last_seen"] = time.time()
            for t, s in (args.get("targets") or {}).items():
                t = int(t)
                if self.targets.get(t) == node and self._local.get(t) != s:
                    self._local[t] = s
                    reevaluate = True
            if reevaluate or not was_alive:
                if not self.evaluate():
                    self.version += 1  # address / incarnation / local state changed: publish it
                    self._persist()
            out = {"routing_version": self.version}
            if args.get("with_routing"):
                out["routing"] = self.routing_dict()
            return out

    def routing(self, args: dict, payload, ctx) -> dict:
        with self._lock:
            if args.get("have") == self.version:
                return {"version": self.version, "unchanged": True}
            return self.routing_dict()

    def sync_done(self, args: dict, payload, ctx) -> dict:
        cid, t, ver = int(args["chain"]), int(args["target"]), int(args["chain_version"])
        with self._lock:
            c = self.chains.get(cid)
            if c is None:
                raise MgmtdError(f"mgmtd: no chain {cid}")
            if c["version"] != ver or dict(c["members"]).get(t) != "syncing":
                raise StaleRouting(f"mgmtd: chain {cid} is at version {c['version']} "
                                   f"({dict(c['members']).get(t)} for target {t}), resync reported at {ver}")
            self._synced.add((cid, t, ver))
            self.evaluate()
            return {"routing_version": self.version}

    def report_fault(self, args: dict, payload, ctx) -> dict:
        log.warning("fault reported by %s: target %s chain %s chunk %s: %s %s", args.get("node"),
                    args.get("target"), args.get("chain"), args.get("chunk"), args.get("kind"),
                    args.get("detail"))
        self.store.add_fault(str(args.get("node")), int(args.get("target", 0)), int(args.get("chain", 0)),
                             str(args.get("chunk")), str(args.get("kind")), str(args.get("detail", "")))
        return {}

    def faults(self, args: dict, payload, ctx) -> list:
        return self.store.faults(int(args.get("limit", 100)))

    def status(self, args: dict, payload, ctx) -> dict:
        with self._lock:
            now = time.monotonic()
            out = self.routing_dict()
            out["heartbeat_age"] = {n: round(now - self._seen.get(n, 0), 3) for n in self.nodes}
            out["failure_timeout"] = self.cfg.failure_timeout
            out["offline_targets"] = sorted(t for c in self.chains.values() for t, s in c["members"]
                                            if s == OFFLINE)
            return out

    def register_on(self, server: RpcServer) -> None:
        # heartbeats, resync completion and fault reports come from storage servers only (a forged
        # heartbeat re-routes a node, a forged sync_done serves a stale target); anyone
        # authenticated may read the routing table, the status and the fault log
        server.register("mgmtd.heartbeat", self.heartbeat)
        server.register("mgmtd.routing", self.routing, roles=ANY)
        server.register("mgmtd.sync_done", self.sync_done)
        server.register("mgmtd.report_fault", self.report_fault)
        server.register("mgmtd.faults", self.faults, roles=ANY)
        server.register("mgmtd.status", self.status, roles=ANY)
        add_collector(server.metrics, self.collect_metrics)

    def collect_metrics(self):
        """Prometheus, at scrape time: storage nodes, chains and their targets by state (docs/metrics.md)."""
        with self._lock:
            now = time.monotonic()
            alive = sum(now - self._seen.get(n, 0) <= self.cfg.failure_timeout for n in self.nodes)
            dead = len(self.nodes) - alive
            members = [list(c["members"]) for c in self.chains.values()]
            version = self.version
        nodes = GaugeMetricFamily("fireflyer_fs3_nodes", "Storage nodes by state (up: heartbeating within "
                                  "failure_timeout)", labels=["state"])
        nodes.add_metric(["up"], alive)
        nodes.add_metric(["down"], dead)
        targets = GaugeMetricFamily("fireflyer_fs3_chain_targets", "Chain members by state (serving, syncing, "
                                    "waiting, lastsrv, offline)", labels=["state"])
        by_state = {s: 0 for s in _STATES}
        chains = {"healthy": 0, "degraded": 0, "unavailable": 0}
        for m in members:
            for _t, st in m:
                by_state[st] = by_state.get(st, 0) + 1
            serving = sum(st == SERVING for _t, st in m)
            chains["healthy" if serving == self.cfg.replication else "degraded" if serving else "unavailable"] += 1
        for st, n in by_state.items():
            targets.add_metric([st], n)
        ch = GaugeMetricFamily("fireflyer_fs3_chains", "Chains by health (healthy: every replica serving; "
                               "degraded: some; unavailable: none)", labels=["health"])
        for h, n in chains.items():
            ch.add_metric([h], n)
        ver = GaugeMetricFamily("fireflyer_fs3_routing_version", "The routing table's version (moves on every "
                                "chain change)")
        ver.add_metric([], version)
        return [nodes, targets, ch, ver]


def main(argv: list[str] | None = None) -> None:
    ap = service_parser("fs3.mgmtd", "the fs3 cluster manager (routing table, chain states)")
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: [fs3].mgmtd_db, else a SQLite file "
                    "in the node's data directory)")
    ap.add_argument("--data-dir", default=None, help="base data directory (see docs/fs3.md)")
    st = service_start(ap, argv, "fs3.mgmtd", mgmtd=False)
    args, cluster, node, cfg = st.args, st.cluster, st.node, st.cfg
    svc = cluster.service("fs3.storage")
    if svc is None or not svc.nodes:
        ap.exit(2, f"{ap.prog}: error: {cluster.source}: no [[service]] with module = \"fs3.storage\"\n")
    url = args.db or cfg.mgmtd_db or default_db_url(node_data_dir(cfg, node.name, args.data_dir))
    try:
        mg = Mgmtd(cfg, cluster.ordered(svc.nodes), url)
    except Exception as exc:  # bad DB URL, mismatched table: one clear line
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    server = RpcServer(node.address, st.port, name="fs3.mgmtd", traffic_class=TrafficClass.STORAGE, **st.security)
    mg.register_on(server)
    mg.start()
    server.start()
    log.info("fs3.mgmtd on %s:%d, db %s", node.address, server.port, url)
    wait_for_shutdown()
    server.stop()
    mg.stop()


if __name__ == "__main__":
    main()
