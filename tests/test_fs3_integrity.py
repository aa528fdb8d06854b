"""fs3 on-disk identity and slow peers (issue 14, findings 4 and 7).

A chunk file replaced by another chunk's valid file, by the chunk's own previous version, a
deleted file and corrupt bytes: every read (ranged ones too) and the scrub find each kind, the
client gets the right bytes, and the copy is reported and repaired from a good replica. A frozen
(SIGSTOP) storage node: reads move to another replica within the read timeout and writes finish
within about the failure detection time, far under the I/O timeout, with no write lost and no
stale read.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from _fs3 import fs3_serving
from _waits import wait_until
from test_fs3_cluster import (  # the fs3 fixture and the helpers of the cluster tests
    _chunk_files,
    _direct,
    _faults,
    _flip,
    _mgmtd_status,
    _replica_read,
    fs3,  # noqa: F401 - a fixture
)
from typer.testing import CliRunner

from fs3.chunkstore import ChunkStore
from fs3.cli import app
from fs3.client import ChunkClient, ReadIO, WriteIO
from fs3.config import Fs3Config
from fs3.errors import ChunkCorrupt, Fs3ConfigError
from network import TransportTimeout

# -- the chunk store alone ---------------------------------------------------------------------------


def _store_with_two_chunks(tmp_path: Path) -> tuple[ChunkStore, bytes, bytes]:
    st = ChunkStore(tmp_path, 101, 1 << 16)
    a, b = os.urandom(9000), os.urandom(7000)
    st.put(1, 1, 1, 1, a, pending=False)
    st.put(1, 2, 1, 1, b, pending=False)
    return st, a, b


def _every_read_refuses(st: ChunkStore, chain: int, chunk: int, damage: str, match: str) -> None:
    with pytest.raises(ChunkCorrupt, match=match) as e1:
        st.read(chain, chunk)
    with pytest.raises(ChunkCorrupt, match=match) as e2:
        st.read_mapped(chain, chunk)  # the server's ranged reads
    assert e1.value.damage == e2.value.damage == damage


def test_chunk_store_refuses_another_chunks_file(tmp_path):
    st, _a, b = _store_with_two_chunks(tmp_path)
    st.path(1, 1, 1).write_bytes(st.path(1, 2, 1).read_bytes())  # a valid file, of chunk 2
    _every_read_refuses(st, 1, 1, "misplaced", "misplaced")
    assert bytes(st.read(1, 2)[0]) == b  # chunk 2 itself is fine
    st2 = ChunkStore(tmp_path, 101, 1 << 16)  # at start, the header must name the chunk its name says
    assert st2.get(1, 1).corrupt
    with pytest.raises(ChunkCorrupt):
        st2.read(1, 1)


def test_chunk_store_refuses_a_stale_version(tmp_path):
    st, _a, _b = _store_with_two_chunks(tmp_path)
    old = st.path(1, 1, 1).read_bytes()
    new = os.urandom(9000)
    st.put(1, 1, 2, 1, new, pending=False)
    st.path(1, 1, 2).write_bytes(old)  # the chunk's own previous version, valid in itself
    _every_read_refuses(st, 1, 1, "stale", "stale file")
    st2 = ChunkStore(tmp_path, 101, 1 << 16)
    assert st2.get(1, 1).corrupt


def test_chunk_store_reports_a_missing_file_as_damage(tmp_path):
    st, _a, _b = _store_with_two_chunks(tmp_path)
    st.path(1, 1, 1).unlink()
    _every_read_refuses(st, 1, 1, "missing", "missing")
    with pytest.raises(ChunkCorrupt, match="missing"):
        st.open_data(1, 1)  # the unverified (sendfile) path too
    st.put(1, 1, 1, 1, b"repaired", pending=False)  # a repair puts the same version back
    assert bytes(st.read(1, 1)[0]) == b"repaired"


def test_chunk_store_header_must_match_the_index(tmp_path):
    st, a, _b = _store_with_two_chunks(tmp_path)
    st.meta[(1, 1)].crc ^= 1  # the index disagrees with the file (what another same-version file shows)
    _every_read_refuses(st, 1, 1, "header", "index")
    st.meta[(1, 1)].crc ^= 1
    assert bytes(st.read(1, 1)[0]) == a


def test_attempt_timeouts_derive_from_the_failure_timeout_and_are_validated():
    cfg = Fs3Config.from_section({"failure_timeout": 6.0})
    assert (cfg.read_attempt_timeout, cfg.write_attempt_timeout) == (2.0, 3.0)
    cfg = Fs3Config.from_section({"failure_timeout": 6.0, "read_timeout": 0.25, "write_timeout": 9})
    assert (cfg.read_attempt_timeout, cfg.write_attempt_timeout) == (0.25, 9.0)
    with pytest.raises(Fs3ConfigError, match=r"\[fs3\].read_timeout: expected seconds"):
        Fs3Config.from_section({"read_timeout": -1.0})
    with pytest.raises(Fs3ConfigError, match=r"\[fs3\].write_timeout: expected float"):
        Fs3Config.from_section({"write_timeout": "5"})


# -- a cluster --------------------------------------------------------------------------------------


def _replica_range(lc, node: str, chain: int, chunk: int, off: int, n: int):
    """A ranged read straight from one storage node: its bytes, or the item's error."""
    cver = _mgmtd_status(lc)["chains"][str(chain)]["version"]
    rep = _direct(lc, node, "storage.read", {"items": [[chain, cver, chunk, off, n]]})
    item = rep.result["items"][0]
    return item if "err" in item else bytes(rep.payload)


def _damage_four_ways(lc, client, node: str, first: int) -> dict:
    """Write chunks on one chain and damage ``node``'s copy of four of them, one way each: another
    chunk's file, the chunk's previous version, a deleted file, flipped bytes. Returns
    {kind: (chain, chunk, right bytes)} plus "spare": the chunk whose file was copied."""
    r = client.routing
    chain = next(c for c in r.chain_ids() if node in {r.node_of(t) for t in r.serving(c)})
    rng = random.Random(first)
    size = 150_000
    ids = {"misplaced": first, "stale": first + 1, "missing": first + 2, "crc": first + 3, "spare": first + 4}
    data = {}
    for kind, k in ids.items():
        data[kind] = rng.randbytes(size)
        client.write(chain, k, data[kind])
    # the stale one: keep its first version's file, write a second version, put the first back
    (f,) = _chunk_files(lc, node, chain, ids["stale"])
    old = f.read_bytes()
    data["stale"] = rng.randbytes(size)
    client.write(chain, ids["stale"], data["stale"])
    (f,) = _chunk_files(lc, node, chain, ids["stale"])
    f.write_bytes(old)
    (f,) = _chunk_files(lc, node, chain, ids["misplaced"])
    (g,) = _chunk_files(lc, node, chain, ids["spare"])
    f.write_bytes(g.read_bytes())
    (f,) = _chunk_files(lc, node, chain, ids["missing"])
    f.unlink()
    _flip(_chunk_files(lc, node, chain, ids["crc"]), 4321, 0x40)
    return {kind: (chain, ids[kind], data[kind]) for kind in ids}


_WHAT = {"misplaced": "misplaced", "stale": "stale file", "missing": "missing", "crc": "CRC32C mismatch"}


def test_misplaced_stale_missing_and_corrupt_copies_are_never_served_and_are_repaired(fs3):  # noqa: F811
    lc, client = fs3
    damaged = _damage_four_ways(lc, client, "n2", first=500)
    kinds = [k for k in damaged if k != "spare"]
    # straight from the damaged replica: a ranged read refuses (it used to return the other
    # chunk's or the old version's bytes, or "no such chunk" for the deleted file)
    for kind in kinds:
        chain, chunk, _want = damaged[kind]
        item = _replica_range(lc, "n2", chain, chunk, 1000, 5000)
        assert isinstance(item, dict) and item["err"] == "ChunkCorrupt", (kind, item)
        assert item["data"]["damage"] == kind and _WHAT[kind] in item["msg"], (kind, item)
    # through the client: ranged and whole reads give the right bytes, whichever replica they meet
    for rnd in range(3):
        ios = [ReadIO(c, k, 1000 + rnd, 5000) for c, k, _d in damaged.values()]
        ios += [ReadIO(c, k) for c, k, _d in damaged.values()]
        got = client.batch_read(ios)
        for io, view in zip(ios, got, strict=True):
            want = next(d for c, k, d in damaged.values() if (c, k) == (io.chain, io.chunk))
            want = want if io.length < 0 else want[io.offset:io.offset + io.length]
            assert bytes(view) == want, (io, rnd)
    # each damaged copy was reported (kind named in the detail) and repaired from a good replica
    want_chunks = {f"{damaged[k][1]:016x}": k for k in kinds}

    def reported():
        return {f["chunk"] for f in _faults(lc, "ChunkCorrupt") if f["node"] == "n2"} >= set(want_chunks)

    wait_until(reported, 20, "n2 reporting its four damaged copies")
    for f in _faults(lc, "ChunkCorrupt"):
        assert f["node"] == "n2" and f["chunk"] in want_chunks, f  # intact copies are never reported
        assert _WHAT[want_chunks[f["chunk"]]] in f["detail"], f
    for kind in kinds:
        chain, chunk, want = damaged[kind]
        wait_until(lambda c=chain, k=chunk, w=want: _replica_read(lc, "n2", c, k) == w, 20, f"n2's {kind} copy repaired")
        assert _replica_range(lc, "n2", chain, chunk, 1000, 5000) == want[1000:6000]
    wait_until(lambda: {f["chunk"] for f in _faults(lc, "ChunkRepaired") if f["node"] == "n2"} >= set(want_chunks), 20,
          "the repairs reported")
    # the admin CLI shows them, by kind
    res = CliRunner().invoke(app, ["stats", "--cluster", str(lc.cluster_file), "--json"])
    assert res.exit_code == 0, res.output
    dmg = json.loads(res.output)["n2"]["damage"]
    assert all(dmg.get(k, 0) >= 1 for k in kinds), dmg
    res = CliRunner().invoke(app, ["stats", "--cluster", str(lc.cluster_file)])
    assert res.exit_code == 0, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("n2: damaged copies found")]
    assert all(k in line for k in kinds), line


@pytest.mark.parametrize("fs3", [{"scrub_interval": 0.5, "scrub_rate_mb": 500.0}], indirect=True)
def test_scrub_finds_all_four_kinds_of_damage(fs3):  # noqa: F811
    lc, client = fs3
    damaged = _damage_four_ways(lc, client, "n3", first=600)
    kinds = [k for k in damaged if k != "spare"]
    want_chunks = {f"{damaged[k][1]:016x}": k for k in kinds}

    def found():
        return {f["chunk"] for f in _faults(lc, "ChunkCorrupt") if f["node"] == "n3"} >= set(want_chunks)

    wait_until(found, 30, "n3's scrubber reporting its four damaged copies")
    for f in _faults(lc, "ChunkCorrupt"):
        assert f["node"] == "n3" and f["chunk"] in want_chunks, f
        assert f["detail"].startswith("scrub: ") and _WHAT[want_chunks[f["chunk"]]] in f["detail"], f
    assert client.stats["replica_failovers"] == 0  # no read met the damage
    for kind in kinds:
        chain, chunk, want = damaged[kind]
        wait_until(lambda c=chain, k=chunk, w=want: _replica_read(lc, "n3", c, k) == w, 30, f"n3's {kind} copy repaired")
    res = CliRunner().invoke(app, ["faults", "--cluster", str(lc.cluster_file), "--json"])
    assert res.exit_code == 0, res.output
    assert {f["chunk"] for f in json.loads(res.output) if f["kind"] == "ChunkRepaired"} >= set(want_chunks)


@pytest.mark.parametrize("fs3", [{"failure_timeout": 5.0}], indirect=True)
def test_frozen_storage_node_stalls_reads_and_writes_only_briefly(fs3):  # noqa: F811
    """SIGSTOP one storage node: reads finish within the failure timeout (they move to another
    replica after the read timeout) and writes to chains where it is head, middle or tail finish
    within about the failure detection (mgmtd moves it out, the client retries on the new chain),
    far under the 60 s I/O timeout; nothing acknowledged is lost and no stale copy is served."""
    lc, client = fs3
    ft = 5.0
    r = client.routing
    chains = r.chain_ids()
    rng = random.Random(7)
    data = {(c, 700 + i): rng.randbytes(100_000) for i, c in enumerate(chains)}
    client.batch_write([WriteIO(c, k, d) for (c, k), d in data.items()])
    pos = {c: [r.node_of(t) for t, _s in r.write_set(c)].index("n3") for c in chains}
    assert set(pos.values()) == {0, 1, 2}  # n3 is head of some chains, middle and tail of others
    lc.kill("fs3.storage", "n3", sig=signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        got = client.batch_read([ReadIO(c, k) for c, k in data] + [ReadIO(c, k, 5, 999) for c, k in data])
        read_s = time.monotonic() - t0
        for (key, want), view in zip(list(data.items()) * 2, got, strict=True):
            assert bytes(view) in (want, want[5:1004]), key
        assert read_s < ft, f"reads with a frozen replica took {read_s:.1f} s (failure_timeout {ft} s)"
        # writes on every chain at once (n3 at each position), whole and partial
        new = {key: rng.randbytes(100_000) for key in data}
        errors: list = []
        t0 = time.monotonic()

        def partial(c: int, k: int) -> None:
            try:
                client.write(c, k, b"partial", offset=10)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=partial, args=(c, 900 + c)) for c in chains[:3]]
        for t in threads:
            t.start()
        client.batch_write([WriteIO(c, k, d) for (c, k), d in new.items()])
        for t in threads:
            t.join(60)
        write_s = time.monotonic() - t0
        assert not errors, errors
        assert write_s < 3 * ft, f"writes with a frozen chain member took {write_s:.1f} s (failure_timeout {ft} s)"
        for (key, want), view in zip(new.items(), client.batch_read([ReadIO(c, k) for c, k in new]), strict=True):
            assert bytes(view) == want, key
    finally:
        lc.kill("fs3.storage", "n3", sig=signal.SIGCONT)
    # the thawed node serves nothing stale: reads right away still give the acknowledged bytes
    for _ in range(3):
        for (key, want), view in zip(new.items(), client.batch_read([ReadIO(c, k) for c, k in new]), strict=True):
            assert bytes(view) == want, key
    wait_until(lambda: fs3_serving(lc), 60, "n3 resynced and serving again")
    for (c, k), want in new.items():
        assert _replica_read(lc, "n3", c, k) == want, (c, k)
    for c in chains[:3]:
        assert bytes(client.read(c, 900 + c)) == bytes(10) + b"partial"


def test_reads_finish_when_every_replica_is_slower_than_the_attempt_timeout_standin(fs3):  # noqa: F811
    """When every replica lets a read attempt time out, the cluster is slow rather than one node
    frozen (an overloaded host): the next round gives each attempt twice as long, so the read
    finishes instead of timing out the same way until the client's deadline. The slowness is a
    stand-in at the client's batch seam (every replica needs 50 ms; a loaded host cannot be made
    slow on cue); the reads that then go through are real."""
    lc, client = fs3
    chains = client.routing.chain_ids()
    rng = random.Random(11)
    data = {(c, 900 + i): rng.randbytes(100_000) for i, c in enumerate(chains)}
    client.batch_write([WriteIO(c, k, d) for (c, k), d in data.items()])
    slow = ChunkClient.from_cluster(lc.cluster_file, node="n0", timeout=10.0, read_timeout=0.01)
    real, budgets = slow._read_batch, []

    def every_replica_needs_50ms(r, batch, relaxed, timeout):
        budgets.append(timeout)
        if timeout < 0.05:
            time.sleep(timeout)
            return [(p, t, TransportTimeout("stand-in: no answer within the attempt timeout")) for p, t in batch]
        return real(r, batch, relaxed, timeout)

    slow._read_batch = every_replica_needs_50ms
    try:
        got = slow.batch_read([ReadIO(c, k) for c, k in data])
        assert [bytes(v) for v in got] == list(data.values())
        assert budgets[0] == 0.01 and max(budgets) >= 0.05  # the attempts grew until they fit
        assert budgets == sorted(budgets)
    finally:
        slow.close()
