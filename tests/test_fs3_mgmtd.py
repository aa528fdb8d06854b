"""fs3.mgmtd in process: state persisted through SQLAlchemy on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest

from fs3.config import Fs3Config
from fs3.errors import Fs3ConfigError, MgmtdError, StaleRouting
from fs3.mgmtd import Mgmtd

NODES = ["n1", "n2", "n3"]
# The failure timeout is far above the loop's heartbeat period, so a busy machine that stalls this
# process for a second does not make the live nodes look dead.
CFG = Fs3Config(replication=3, chunk_size=1 << 20, targets_per_node=3, heartbeat_interval=0.05,
                failure_timeout=2.0)


def _hb(m: Mgmtd, node: str, inc: str = "a") -> dict:
    return m.heartbeat({"node": node, "address": "127.0.0.9", "port": 1000 + int(node[1]), "incarnation": inc,
                        "targets": {}}, None, None)


def _states(m: Mgmtd) -> dict:
    return {c: [s for _t, s in d["members"]] for c, d in m.chains.items()}


def _persistence_roundtrip(url: str) -> None:
    m = Mgmtd(CFG, NODES, url)
    try:
        for n in NODES:
            _hb(m, n)
        assert all(s == ["serving"] * 3 for s in _states(m).values())
        # n2 stops heartbeating: after the failure timeout its targets go offline
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _hb(m, "n1")
            _hb(m, "n3")
            m.evaluate()
            if all(s[-1] == "offline" for s in _states(m).values()):
                break
            time.sleep(0.05)
        assert all(s == ["serving", "serving", "offline"] for s in _states(m).values())
        saved = (m.version, {c: (d["version"], list(d["members"])) for c, d in m.chains.items()})
        faults_before = m.store.faults()
        m.report_fault({"node": "n1", "target": 101, "chain": 1, "chunk": "00", "kind": "ChunkCorrupt",
                        "detail": "test"}, None, None)
    finally:
        m.stop()
    # a new manager on the same database serves the same table
    m2 = Mgmtd(CFG, NODES, url)
    try:
        assert (m2.version, {c: (d["version"], list(d["members"])) for c, d in m2.chains.items()}) == saved
        assert len(m2.store.faults()) == len(faults_before) + 1
        # n2 was down when mgmtd stopped: it stays down until it heartbeats again
        m2.evaluate()
        assert all(s[-1] == "offline" for s in _states(m2).values())
        _hb(m2, "n2", inc="b")  # back, as a new process: it waits and one target per chain syncs
        assert all(s == ["serving", "serving", "syncing"] for s in _states(m2).values())
        c1 = m2.chains[1]
        syncing = c1["members"][-1][0]
        with pytest.raises(StaleRouting):
            m2.sync_done({"chain": 1, "target": syncing, "chain_version": c1["version"] - 1}, None, None)
        m2.sync_done({"chain": 1, "target": syncing, "chain_version": c1["version"]}, None, None)
        assert _states(m2)[1] == ["serving"] * 3
    finally:
        m2.stop()
    # a database made for another replication factor is refused, naming both
    with pytest.raises(Fs3ConfigError, match="replication=3"):
        Mgmtd(Fs3Config(replication=2, targets_per_node=2, heartbeat_interval=0.05, failure_timeout=0.3),
              NODES, url)


def test_mgmtd_state_survives_restart_sqlite(tmp_path):
    _persistence_roundtrip(f"sqlite:///{tmp_path / 'mgmtd.db'}")


@pytest.mark.postgres
def test_mgmtd_state_survives_restart_postgres(pg_url):
    _persistence_roundtrip(pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
                           if pg_url.startswith("postgresql://") else pg_url)


def test_mgmtd_rejects_unknown_nodes(tmp_path):
    m = Mgmtd(CFG, NODES, f"sqlite:///{tmp_path / 'm.db'}")
    try:
        with pytest.raises(MgmtdError, match="not a storage node"):
            _hb(m, "n9")
        r = m.routing({"have": m.version}, None, None)
        assert r == {"version": m.version, "unchanged": True}
        full = m.routing({}, None, None)
        assert len(full["chains"]) == 3 and full["balance"] == pytest.approx(1.0)
    finally:
        m.stop()
