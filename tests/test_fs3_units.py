"""fs3 pieces without processes: chain state machine, chain tables, config, chunk store."""

from __future__ import annotations

import itertools
import os
import threading
import time
from itertools import combinations

import pytest
from _waits import wait_until

from fs3.chaintable import generate_chain_table
from fs3.chunkstore import HEADER_SIZE, ChunkStore
from fs3.config import Fs3Config
from fs3.errors import ChainTableError, ChunkCorrupt, ChunkNotFound, Fs3ConfigError
from fs3.routing import LASTSRV, OFFLINE, SERVING, SYNCING, WAITING, SingleFlight, TargetInput, next_chain

UP, DOWN = TargetInput(True), TargetInput(False)


def chain(*states):
    return [(i + 1, s) for i, s in enumerate(states)]


# -- the chain state machine ------------------------------------------------------------------

def test_serving_target_fails_goes_offline_to_the_end():
    new = next_chain(chain(SERVING, SERVING, SERVING), {1: UP, 2: DOWN, 3: UP})
    assert new == [(1, SERVING), (3, SERVING), (2, OFFLINE)]


def test_last_serving_target_fails_becomes_lastsrv_and_returns_as_serving():
    s = next_chain(chain(SERVING, SERVING, SERVING), {1: DOWN, 2: DOWN, 3: DOWN})
    assert s == [(1, LASTSRV), (2, OFFLINE), (3, OFFLINE)]
    # the others come back first: they wait (nobody to sync from)
    s = next_chain(s, {1: DOWN, 2: UP, 3: UP})
    assert s == [(1, LASTSRV), (2, WAITING), (3, WAITING)]
    # the last serving one returns: it serves, and exactly one waiting target starts syncing
    s = next_chain(s, {1: UP, 2: UP, 3: UP})
    assert s == [(1, SERVING), (2, SYNCING), (3, WAITING)]


def test_returning_target_waits_then_syncs_one_at_a_time():
    s = chain(SERVING, OFFLINE, OFFLINE)
    s = next_chain(s, {1: UP, 2: UP, 3: UP})
    assert s == [(1, SERVING), (2, SYNCING), (3, WAITING)]
    assert sum(st == SYNCING for _t, st in s) == 1
    # syncing needs a completed resync report to serve
    assert next_chain(s, {1: UP, 2: UP, 3: UP}) == s
    s = next_chain(s, {1: UP, 2: TargetInput(True, synced=True), 3: UP})
    assert s == [(1, SERVING), (2, SERVING), (3, SYNCING)]


def test_syncing_target_dies_goes_offline_and_next_waiting_syncs():
    s = next_chain(chain(SERVING, SYNCING, WAITING), {1: UP, 2: DOWN, 3: UP})
    assert s == [(1, SERVING), (3, SYNCING), (2, OFFLINE)]


def test_restarted_serving_target_is_resynced_not_trusted():
    s = next_chain(chain(SERVING, SERVING, SERVING), {1: UP, 2: TargetInput(True, restarted=True), 3: UP})
    assert s == [(1, SERVING), (3, SERVING), (2, SYNCING)]


def test_restart_of_the_only_serving_target_keeps_it_serving():
    s = next_chain(chain(SERVING, OFFLINE), {1: TargetInput(True, restarted=True), 2: DOWN})
    assert s == [(1, SERVING), (2, OFFLINE)]


def test_stable_chain_is_unchanged():
    s = chain(SERVING, SERVING, SERVING)
    assert next_chain(s, {1: UP, 2: UP, 3: UP}) == s


# -- chain tables ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,t,r", [(3, 3, 3), (4, 3, 3), (5, 6, 3), (7, 3, 3), (9, 4, 3), (8, 4, 2), (20, 6, 3)])
def test_chain_table_never_puts_two_replicas_on_one_node(n, t, r):
    nodes = [f"s{i}" for i in range(n)]
    ct = generate_chain_table(nodes, t, r)
    assert len(ct.chains) == n * t // r
    used = [x for c in ct.chains for x in c]
    assert sorted(used) == sorted(ct.target_node), "every target in exactly one chain"
    for c in ct.chains:
        assert len({ct.target_node[x] for x in c}) == r
    assert 1.0 <= ct.balance() <= 2.0  # a failed node's load: no survivor takes more than 2x the mean


def test_chain_table_balance_is_perfect_where_a_design_exists():
    # 3 nodes: every chain spans all; 7 nodes x 3 targets, R=3: the Fano plane (each pair once)
    for n, t in ((3, 3), (7, 3), (5, 6)):
        ct = generate_chain_table([f"s{i}" for i in range(n)], t, 3)
        pairs = {}
        for c in ct.chains:
            for a, b in combinations(sorted(ct.target_node[x] for x in c), 2):
                pairs[(a, b)] = pairs.get((a, b), 0) + 1
        assert len(set(pairs.values())) == 1 and len(pairs) == n * (n - 1) // 2
        assert ct.balance() == pytest.approx(1.0)


def test_chain_table_bad_inputs_name_the_problem():
    with pytest.raises(ChainTableError, match="at least 3 nodes"):
        generate_chain_table(["a", "b"], 3, 3)
    with pytest.raises(ChainTableError, match="not a multiple"):
        generate_chain_table(["a", "b", "c", "d"], 2, 3)


# -- config -----------------------------------------------------------------------------------------

def test_config_validation_names_the_key():
    assert Fs3Config.from_section({}).replication == 3
    with pytest.raises(Fs3ConfigError, match="chunk_size"):
        Fs3Config.from_section({"chunk_size": 1000})
    with pytest.raises(Fs3ConfigError, match="failure_timeout"):
        Fs3Config.from_section({"heartbeat_interval": 2.0, "failure_timeout": 1.0})
    with pytest.raises(Fs3ConfigError, match="unknown key"):
        Fs3Config.from_section({"replicas": 3})
    with pytest.raises(Fs3ConfigError, match="replication: expected int"):
        Fs3Config.from_section({"replication": "3"})
    with pytest.raises(Fs3ConfigError, match="scrub_interval: expected >= 0"):
        Fs3Config.from_section({"scrub_interval": -1})
    with pytest.raises(Fs3ConfigError, match="scrub_rate_mb: expected > 0"):
        Fs3Config.from_section({"scrub_rate_mb": 0})
    assert Fs3Config.from_section({"scrub_interval": 0}).scrub_interval == 0.0  # off


# -- chunk store ------------------------------------------------------------------------------------

def test_chunk_store_pending_commit_and_reopen(tmp_path):
    st = ChunkStore(tmp_path, 101, 1 << 16)
    st.put(1, 5, 1, 1, b"a" * 100, pending=False)
    st.put(1, 5, 2, 1, b"b" * 50, pending=True)
    m = st.get(1, 5)
    assert (m.committed, m.pending, m.length) == (1, 2, 100)
    assert bytes(st.read(1, 5)[0]) == b"a" * 100
    assert bytes(st.read(1, 5, pending=True)[0]) == b"b" * 50
    # a crash here (reopen): both versions are found again from the headers
    st2 = ChunkStore(tmp_path, 101, 1 << 16)
    m2 = st2.get(1, 5)
    assert (m2.committed, m2.pending, m2.length, m2.pending_length) == (1, 2, 100, 50)
    st2.commit(1, 5, 2)
    data, ver = st2.read(1, 5)
    assert ver == 2 and bytes(data) == b"b" * 50
    assert st2.get(1, 5).pending == 0
    st2.commit(1, 5, 2)  # committing again is a no-op
    assert st2.remove(1, 5) and st2.get(1, 5) is None
    with pytest.raises(ChunkNotFound):
        st2.read(1, 5)


def test_chunk_store_drops_interrupted_writes_at_start(tmp_path):
    st = ChunkStore(tmp_path, 101, 1 << 16)
    st.put(2, 9, 1, 1, b"old", pending=False)
    old_file = st.path(2, 9, 1).read_bytes()
    st.put(2, 9, 2, 1, b"new", pending=False)
    assert not st.path(2, 9, 1).exists()  # the old version was moved away (kept as a spare)
    # what a kill -9 can leave: a half-written temporary file, and the old version's name still
    # there when the crash came between installing version 2 and moving version 1 away
    tmp = tmp_path / "chunks" / ".tmp-deadbeef"
    tmp.write_bytes(b"half a chu")
    st.path(2, 9, 1).write_bytes(old_file)
    st2 = ChunkStore(tmp_path, 101, 1 << 16)
    assert not tmp.exists()
    data, ver = st2.read(2, 9)
    assert ver == 2 and bytes(data) == b"new"
    assert not st2.path(2, 9, 1).exists()  # the superseded version is dropped
    assert not list((tmp_path / "chunks").glob(".spare-*"))  # spares do not survive a restart


def test_chunk_store_detects_flipped_bytes_and_damaged_headers(tmp_path):
    st = ChunkStore(tmp_path, 101, 1 << 16)
    st.put(1, 1, 1, 1, os.urandom(5000), pending=False)
    st.put(1, 2, 1, 1, os.urandom(5000), pending=False)
    p1, p2 = st.path(1, 1, 1), st.path(1, 2, 1)
    with open(p1, "r+b") as f:
        f.seek(HEADER_SIZE + 123)
        b = f.read(1)
        f.seek(HEADER_SIZE + 123)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ChunkCorrupt, match="CRC32C mismatch"):
        st.read(1, 1)
    with open(p2, "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    with pytest.raises(ChunkCorrupt, match="header"):
        st.read(1, 2)
    st2 = ChunkStore(tmp_path, 101, 1 << 16)  # at start, a damaged header marks the chunk corrupt
    assert st2.get(1, 2).corrupt
    with pytest.raises(ChunkCorrupt):
        st2.read(1, 2)


def test_chunk_store_rejects_oversized_chunks(tmp_path):
    st = ChunkStore(tmp_path, 101, 4096)
    with pytest.raises(ValueError, match="exceed the chunk size"):
        st.put(1, 1, 1, 1, b"x" * 4097, pending=False)


def test_write_set_needs_a_serving_target():
    from fs3.routing import Routing

    r = Routing(version=1, chains={1: {"version": 3, "members": [(1, SERVING), (2, SYNCING), (3, OFFLINE)]},
                                   2: {"version": 5, "members": [(4, LASTSRV), (5, SYNCING), (6, WAITING)]}})
    assert r.write_set(1) == [(1, SERVING), (2, SYNCING)]
    assert r.serving(1) == [1]
    assert r.write_set(2) == [] and r.serving(2) == []


# -- storage server internals ---------------------------------------------------------------------

def test_resync_waits_for_writes_admitted_at_an_older_chain_version(tmp_path):
    """A write that passed its chain-version check before the version with a syncing successor
    arrived may still create a chunk: the resync starts only after such writes are done."""
    import threading

    from fs3.storage import StorageServer
    from network import new_cluster_key

    srv = StorageServer(Fs3Config(), "n1", "127.0.0.2", 0, ("127.0.0.1", 9), tmp_path, auth=new_cluster_key())
    try:
        entered, release, drained = threading.Event(), threading.Event(), threading.Event()

        def old_write():
            with srv._admit(7, 4):
                entered.set()
                release.wait(10)

        t = threading.Thread(target=old_write)
        t.start()
        entered.wait(10)
        with srv._admit(7, 5), srv._admit(8, 3):  # same version on this chain, another chain: no wait
            waiter = threading.Thread(target=lambda: (srv._drain_writes(7, 5), drained.set()))
            waiter.start()
            time.sleep(0.2)
            assert not drained.is_set()  # the v4 write is still in progress
            release.set()
            assert drained.wait(10)
        t.join(10)
        waiter.join(10)
        assert srv._admitted == {}
    finally:
        srv.server.stop()
        srv.mgmtd.close()


def test_storage_handlers_refuse_malformed_requests_with_invalid_request(tmp_path):
    """A missing field, a string for a number or a short item is InvalidRequest (an fs3 error that
    is also a ValueError), never a bare KeyError / ValueError / IndexError."""
    from fs3.errors import InvalidRequest, StorageError
    from fs3.storage import StorageServer
    from network import new_cluster_key

    srv = StorageServer(Fs3Config(), "n1", "127.0.0.2", 0, ("127.0.0.1", 9), tmp_path, auth=new_cluster_key())
    empty = memoryview(b"")
    try:
        cases = [
            (srv.h_write, {"cver": 1, "chunk": 1}, "no field 'chain'"),
            (srv.h_write, {"chain": 1, "cver": 1, "chunk": "x"}, "storage.write: malformed"),
            (srv.h_write, {"chain": 1, "cver": 1, "chunk": 1, "op": "truncate"}, "unknown op"),
            (srv.h_write_batch, {"chain": 1, "cver": 1, "items": [[1, 2, 3]]}, "has 3 fields"),
            (srv.h_write_batch, {"chain": 1, "cver": 1, "items": 5}, "storage.write_batch: malformed"),
            (srv.h_read, {"items": [[1, 2]]}, "storage.read: malformed"),
            (srv.h_check, {"chain": 1}, "no field 'chunk'"),
            (srv.h_sync_remove, {"chain": 1, "cver": 1, "chunks": ["z"]}, "storage.sync_remove: malformed"),
            (srv.h_list, {"chain": "abc"}, "storage.list: malformed"),
        ]
        for handler, args, match in cases:
            with pytest.raises(InvalidRequest, match=match) as ei:
                handler(args, empty, None)
            assert isinstance(ei.value, StorageError) and isinstance(ei.value, ValueError)
    finally:
        srv.server.stop()
        srv.mgmtd.close()


# -- coalesced routing refreshes ------------------------------------------------------------------
def _first_call_held(gate: threading.Event, error: Exception | None = None):
    """A fetch returning 1, 2, 3, ...; its first call waits for ``gate`` (then raises ``error``)."""
    count = itertools.count(1)

    def fetch() -> int:
        k = next(count)
        if k == 1:
            assert gate.wait(10)
            if error is not None:
                raise error
        return k

    return fetch


def test_single_flight_serves_a_burst_with_one_fresh_call():
    gate = threading.Event()
    sf = SingleFlight(_first_call_held(gate), timeout=10)
    results: dict[int, int] = {}

    def call(i: int) -> None:
        results[i] = sf()

    first = threading.Thread(target=call, args=(0,))
    first.start()
    wait_until(lambda: sf.calls == 1, 10, "the first call running", poll=0.005)
    burst = [threading.Thread(target=call, args=(i,)) for i in range(1, 16)]
    for t in burst:
        t.start()
    wait_until(lambda: sf.waiting == 15, 10, "all 15 callers waiting", poll=0.005)  # all 15 arrived while call 1 runs
    gate.set()
    for t in [first, *burst]:
        t.join(10)
    # call 1 may predate their reason to ask: they all take call 2, made once for all of them
    assert results == {0: 1, **{i: 2 for i in range(1, 16)}}
    assert sf.calls == 2
    assert sf() == 3  # a caller arriving when nothing runs makes its own call


def test_single_flight_failed_call_and_timeout():
    gate = threading.Event()
    sf = SingleFlight(_first_call_held(gate, OSError("mgmtd unreachable")), timeout=10)
    errors: list[Exception] = []
    got: list[int] = []

    def first() -> None:
        try:
            sf()
        except OSError as exc:
            errors.append(exc)

    t1 = threading.Thread(target=first)
    t1.start()
    wait_until(lambda: sf.calls == 1, 10, "the first (failing) call running", poll=0.005)
    t2 = threading.Thread(target=lambda: got.append(sf()))
    t2.start()
    wait_until(lambda: sf.waiting == 1, 10, "the second caller waiting", poll=0.005)
    gate.set()
    t1.join(10)
    t2.join(10)
    assert [str(e) for e in errors] == ["mgmtd unreachable"]
    assert got == [2]  # the failed call left no result: the waiter made its own

    hold = threading.Event()
    slow = SingleFlight(lambda: hold.wait(10), timeout=0.2)
    t3 = threading.Thread(target=slow)
    t3.start()
    wait_until(lambda: slow.calls == 1, 10, "the slow call running", poll=0.005)
    with pytest.raises(TimeoutError, match="did not end within 0.2 s"):
        slow()
    hold.set()
    t3.join(10)
