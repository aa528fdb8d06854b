"""fs3 end to end: mgmtd and three storage servers as real processes on 127.0.0.x (local launcher)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest
from _fs3 import fs3_serving
from _waits import wait_until
from typer.testing import CliRunner

from fs3.cli import app
from fs3.client import ChunkClient, ReadIO, WriteIO
from network import RpcClient, TrafficClass
from network.topology import dump_cluster

ROOT = Path(__file__).resolve().parent.parent
FS3 = ["fs3.mgmtd", "fs3.storage"]


def _cluster_file(tmp_path: Path, **fs3) -> Path:
    """local.toml with only the fs3 services and short heartbeat / failure timeouts."""
    from deploy.local import derived_cluster

    # short, but well above a heartbeat period even when the machine is busy
    return derived_cluster(tmp_path / "fs3-test.toml", FS3, fs3={"heartbeat_interval": 0.25, "failure_timeout": 3.0,
                                                                 **fs3})


@pytest.fixture
def fs3(launch_cluster, tmp_path, request):
    overrides = getattr(request, "param", {})  # [fs3] keys, by indirect parametrization
    lc = launch_cluster(_cluster_file(tmp_path, **overrides), services=FS3)
    wait_until(lambda: _settled(lc), 20, "every storage server registered and on the current routing table")
    client = ChunkClient.from_cluster(lc.cluster_file, node="n0", timeout=40.0, max_inflight=6)
    yield lc, client
    client.close()


def _mgmtd_status(lc) -> dict:
    addr, port = lc.cluster.endpoint("fs3.mgmtd")
    with RpcClient(addr, port, credential=lc.credential, timeout=5, traffic_class=TrafficClass.STORAGE) as c:
        return c.call("mgmtd.status").result


def _faults(lc, kind: str) -> list[dict]:
    """The faults of one ``kind`` that mgmtd holds (newest first)."""
    with RpcClient(*lc.cluster.endpoint("fs3.mgmtd"), credential=lc.credential, timeout=5) as c:
        return [f for f in c.call("mgmtd.faults", {"limit": 1000}).result if f["kind"] == kind]


def _settled(lc) -> bool:
    st = _mgmtd_status(lc)
    if not all(n["port"] and n["alive"] for n in st["nodes"].values()):
        return False
    for node in ("n1", "n2", "n3"):
        with RpcClient(*lc.cluster.endpoint("fs3.storage", node), credential=lc.credential, timeout=5) as c:
            if c.call("storage.stats").result["routing_version"] != st["version"]:
                return False
    return True


def _targets_of(lc, node: str) -> list[int]:
    st = _mgmtd_status(lc)
    return [int(t) for t, n in st["targets"].items() if n == node]


def _replica_read(lc, node: str, chain: int, chunk: int):
    """Read one chunk straight from one storage node (no client failover)."""
    st = _mgmtd_status(lc)
    cver = st["chains"][str(chain)]["version"]
    addr, port = lc.cluster.endpoint("fs3.storage", node)
    with RpcClient(addr, port, credential=lc.credential, timeout=10, traffic_class=TrafficClass.STORAGE) as c:
        rep = c.call("storage.read", {"items": [[chain, cver, chunk, 0, -1]]})
    item = rep.result["items"][0]
    return item if "err" in item else bytes(rep.payload)


def _chunk_files(lc, node: str, chain: int, chunk: int) -> list[Path]:
    return list((lc.run_dir / "data" / node / "targets").glob(f"*/chunks/{chain}/{chunk:016x}.*.c"))


def test_write_and_read_back_many_chunks(fs3):
    lc, client = fs3
    chains = client.chains()
    assert len(chains) == 3 and client.routing.replication == 3
    rng = random.Random(1)
    cs = client.chunk_size
    data = {}
    ios = []
    for i in range(48):
        chain = chains[i % len(chains)]
        n = rng.choice([1, 4096, 100_000, cs])
        b = rng.randbytes(n)
        data[(chain, i)] = b
        ios.append(WriteIO(chain, i, b))
    res = client.batch_write(ios)
    assert all(r.version == 1 for r in res)  # a settled cluster: each chunk written once
    got = client.batch_read([ReadIO(c, k) for c, k in data])
    for (key, want), view in zip(data.items(), got, strict=True):
        assert bytes(view) == want, key
    # ranged reads and reads into caller buffers
    buf = bytearray(cs)
    (c0, k0), b0 = next((k, v) for k, v in data.items() if len(v) == cs)
    assert bytes(client.read(c0, k0, offset=1000, length=5000)) == b0[1000:6000]
    view = client.read(c0, k0, into=buf)
    assert view.obj is buf  # received straight into the caller's buffer, no copy
    assert bytes(buf) == b0
    # overwrite, partial write, versions grow
    r2 = client.write(c0, k0, b"x" * 10)
    assert r2.version == res[list(data).index((c0, k0))].version + 1 and bytes(client.read(c0, k0)) == b"x" * 10
    r3 = client.write(c0, k0, b"yy", offset=4)
    assert r3.version == r2.version + 1 and bytes(client.read(c0, k0)) == b"xxxxyyxxxx"
    # every replica holds the same committed bytes
    for node in ("n1", "n2", "n3"):
        assert _replica_read(lc, node, c0, k0) == b"xxxxyyxxxx"
    # removal reaches every replica
    assert client.remove(c0, k0) is True
    for node in ("n1", "n2", "n3"):
        item = _replica_read(lc, node, c0, k0)
        assert isinstance(item, dict) and item["err"] == "ChunkNotFound"
    from fs3.errors import ChunkNotFound
    with pytest.raises(ChunkNotFound):
        client.read(c0, k0)
    with pytest.raises(ValueError, match="do not fit"):
        client.write(c0, 1, b"z" * 10, offset=cs - 5)
    # a caller buffer too small for the chunk: a clear error at once, not retries
    (c1, k1), b1 = next((k, v) for k, v in data.items() if len(v) == 100_000)
    from fs3.errors import ClientError
    with pytest.raises(ClientError, match="does not fit"):
        client.read(c1, k1, into=bytearray(1000))
    assert bytes(client.read(c1, k1, into=bytearray(100_000))) == b1


def test_kill9_storage_during_writes_then_resync(fs3):
    lc, client = fs3
    chains = client.chains()
    acked: dict[tuple[int, int], bytes] = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def writer(wid: int) -> None:
        rng = random.Random(wid)
        i = 0
        while not stop.is_set():
            # new chunks, and every third write overwrites an earlier one
            k = wid * 1_000_000 + (rng.randrange(max(i, 1)) if i and i % 3 == 0 else i)
            chain = chains[k % len(chains)]
            b = rng.randbytes(rng.choice([512, 20_000, 200_000]))
            try:
                client.write(chain, k, b)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                return
            with lock:
                acked[(chain, k)] = b
            i += 1

    def batch_writer(wid: int) -> None:
        # whole-chunk batches (one request per chain per batch), overwriting earlier ones too
        rng = random.Random(wid)
        i = 0
        while not stop.is_set():
            ks = [wid * 1_000_000 + (rng.randrange(i) if i and j % 2 else i + j) for j in range(5)]
            ks = list(dict.fromkeys(ks))
            ios = [WriteIO(chains[k % len(chains)], k, rng.randbytes(rng.choice([512, 200_000]))) for k in ks]
            try:
                client.batch_write(ios)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                return
            with lock:
                acked.update({(io.chain, io.chunk): bytes(io.data) for io in ios})
            i += 5

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    threads.append(threading.Thread(target=batch_writer, args=(3,)))
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acked) >= 20, 30, "the first writes")
        doomed = [(chains[k % len(chains)], 9_000_000 + k) for k in range(6)]
        for c, k in doomed:
            client.write(c, k, b"to be removed")
        assert all(_replica_read(lc, "n2", c, k) == b"to be removed" for c, k in doomed)
        v_before = {c: d["version"] for c, d in _mgmtd_status(lc)["chains"].items()}
        lc.kill("fs3.storage", "n2")  # SIGKILL in the middle of the stream
        n2_targets = set(_targets_of(lc, "n2"))
        wait_until(lambda: n2_targets <= set(_mgmtd_status(lc)["offline_targets"]), 20, "n2's targets offline")
        st = _mgmtd_status(lc)
        for c, d in st["chains"].items():
            assert d["version"] > v_before[c], "every chain had a replica on n2 and was reconfigured"
            assert [s for _t, s in d["members"]].count("serving") == 2
            assert d["members"][-1][1] == "offline"  # the failed target moves to the end
        n_at_kill = len(acked)
        wait_until(lambda: len(acked) >= n_at_kill + 15, 30, "writes on the 2-replica chains")
        # chunks n2 holds, removed while it is away (no writer touches ids 9_000_000+)
        for c, k in doomed:
            assert client.remove(c, k)
        lc.start("fs3.storage", "n2")
        wait_until(lambda: fs3_serving(lc), 60, "n2 resynced and serving again")
        n_at_back = len(acked)
        wait_until(lambda: len(acked) >= n_at_back + 10, 30, "writes after the resync")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, f"a write failed: {errors[0]!r}"
    with lock:
        snapshot = dict(acked)
    got = client.batch_read([ReadIO(c, k) for c, k in snapshot])
    bad = [key for (key, want), view in zip(snapshot.items(), got, strict=True) if bytes(view) != want]
    assert not bad, f"{len(bad)} acknowledged writes read back wrong, e.g. {bad[:3]}"
    # the restarted server holds every acknowledged write itself (resync copied what it missed)
    for (c, k), want in list(snapshot.items())[::3]:
        assert _replica_read(lc, "n2", c, k) == want, (c, k)
    # ... and the resync removed what was removed while it was away
    for c, k in doomed:
        item = _replica_read(lc, "n2", c, k)
        assert isinstance(item, dict) and item["err"] == "ChunkNotFound", (c, k)
    addr, port = lc.cluster.endpoint("fs3.storage", "n1")
    stats = [RpcClient(*lc.cluster.endpoint("fs3.storage", n), credential=lc.credential, timeout=5).call("storage.stats").result
             for n in ("n1", "n3")]
    assert sum(s["resyncs"] for s in stats) >= 1


def _flip(files: list[Path], offset: int, mask: int) -> None:
    """Damage the one chunk file in ``files``: XOR the data byte at ``offset`` with ``mask``."""
    (f,) = files
    with open(f, "r+b") as fh:
        fh.seek(64 + offset)
        byte = fh.read(1)
        fh.seek(64 + offset)
        fh.write(bytes([byte[0] ^ mask]))


def _write_random(client, *, seed: int, size: int, first: int = 0, n: int = 6) -> dict:
    """Write ``n`` chunks of random bytes (chunk ids from ``first``, spread over the chains);
    returns {(chain, chunk): bytes}."""
    chains = client.chains()
    rng = random.Random(seed)
    data = {}
    for k in range(first, first + n):
        data[(chains[k % 3], k)] = b = rng.randbytes(size)
        client.write(chains[k % 3], k, b)
    return data


def test_corrupt_chunk_is_never_returned_and_is_reported(fs3):
    lc, client = fs3
    data = _write_random(client, seed=7, size=300_000)
    # flip bytes in the chunk files of two of the three replicas of every chunk
    for (c, k) in data:
        for node in ("n1", "n2"):
            _flip(_chunk_files(lc, node, c, k), 1000, 0xFF)
    # a direct read of a damaged replica refuses to answer with the bytes
    (c0, k0) = next(iter(data))
    item = _replica_read(lc, "n1", c0, k0)
    assert isinstance(item, dict) and item["err"] == "ChunkCorrupt"
    # the client always gets the good copy, moving away from the damaged ones
    for rep in range(4):
        # reads into caller buffers (even rounds: the pipelined path, which meets the damaged copies
        # first) and into fresh views (odd rounds: batched requests)
        bufs = {key: bytearray(400_000) for key in data} if rep % 2 == 0 else {}
        got = client.batch_read([ReadIO(c, k, into=bufs.get((c, k))) for c, k in data])
        for (key, want), view in zip(data.items(), got, strict=True):
            assert bytes(view) == want, key
            if bufs:
                assert bytes(bufs[key][:len(want)]) == want
    assert client.stats["replica_failovers"] >= 1
    # the replicas reported the faults to mgmtd
    fl = wait_until(lambda: _faults(lc, "ChunkCorrupt"), 10, "fault reports")
    assert {f["node"] for f in fl} <= {"n1", "n2"}  # only the damaged replicas complain
    assert {f["chunk"] for f in fl} <= {f"{k:016x}" for _c, k in data}
    assert f"{k0:016x}" in {f["chunk"] for f in fl}
    # the damaged copies are repaired from a healthy replica (the first direct read above
    # found n1's copy of (c0, k0) damaged)
    wait_until(lambda: _replica_read(lc, "n1", c0, k0) == data[(c0, k0)], 20, "n1's copy repaired")
    wait_until(lambda: any(f["node"] == "n1" for f in _faults(lc, "ChunkRepaired")), 10,
          "the repair reported")
    # the admin CLI shows the same
    runner = CliRunner()
    res = runner.invoke(app, ["faults", "--cluster", str(lc.cluster_file), "--json"])
    assert res.exit_code == 0, res.output
    assert any(f["kind"] == "ChunkCorrupt" for f in json.loads(res.output))
    res = runner.invoke(app, ["stats", "--cluster", str(lc.cluster_file), "--json"])
    assert res.exit_code == 0 and sum(s["corrupt"] for s in json.loads(res.output).values()) >= 1
    res = runner.invoke(app, ["chains", "--cluster", str(lc.cluster_file)])
    assert res.exit_code == 0 and "serving" in res.output
    res = runner.invoke(app, ["status", "--cluster", str(lc.cluster_file)])
    assert res.exit_code == 0 and "n3" in res.output
    res = runner.invoke(app, ["routing", "--cluster", str(lc.cluster_file), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["replication"] == 3


def test_damage_found_by_the_client_end_to_end_is_reported_and_repaired(fs3):
    """Whole-chunk reads are sent unverified (sendfile) and checked by the client: a damaged copy
    still never reaches the caller, and the client's report makes its server verify, report and
    repair it (no direct read here: only the client's reads find the damage)."""
    lc, client = fs3
    data = _write_random(client, seed=11, size=200_000, first=100)
    keys = list(data)
    for i, (c, k) in enumerate(keys):
        for node in ("n1", "n2"):
            (f,) = _chunk_files(lc, node, c, k)
            if node == "n2" and i == 0:
                os.truncate(f, 64 + 100)  # a short file: found before sending, reported as well
                continue
            _flip([f], 5000, 0x01)
    bufs = {key: bytearray(300_000) for key in keys}
    got = client.batch_read([ReadIO(c, k, into=bufs[(c, k)]) for c, k in keys])
    for key, view in zip(keys, got, strict=True):
        assert view.obj is bufs[key] and bytes(view) == data[key], key
    assert client.stats["replica_failovers"] >= 1

    def corrupt_reports():
        return {(f["node"], f["chunk"]) for f in _faults(lc, "ChunkCorrupt")}

    # each node's share of the first reads met a damaged copy there (the client spreads a batch
    # over the nodes): both damaged nodes reported, the healthy one never did
    reported = wait_until(lambda: (r := corrupt_reports()) and len({k for _n, k in r}) > 1
                     and {n for n, _k in r} == {"n1", "n2"} and r, 10, "n1 and n2 reporting their damaged copies")
    assert {k for _n, k in reported} <= {f"{k:016x}" for _c, k in keys}
    # flipped bytes (unlike the short file of the first chunk) are found by the client alone
    assert {k for _n, k in reported} - {f"{keys[0][1]:016x}"}
    # every reported copy is repaired from the healthy replica
    for node, chunk in reported:
        c, k = next(key for key in keys if f"{key[1]:016x}" == chunk)
        wait_until(lambda node=node, c=c, k=k: _replica_read(lc, node, c, k) == data[(c, k)], 20,
              f"{node}'s copy of {c}/{chunk} repaired")
    # later reads still return the right bytes (repaired or not)
    for key, view in zip(keys, client.batch_read([ReadIO(c, k) for c, k in keys]), strict=True):
        assert bytes(view) == data[key], key


@pytest.mark.parametrize("fs3", [{"scrub_interval": 0.5, "scrub_rate_mb": 500.0}], indirect=True)
def test_scrubbing_finds_repairs_and_reports_damage_no_read_met(fs3):
    """A damaged copy of a chunk nobody reads is found by the server's scrub pass, reported to
    mgmtd and repaired from a healthy replica; intact copies are never reported."""
    lc, client = fs3
    data = _write_random(client, seed=23, size=150_000, first=200)
    (c0, k0), (c1, k1) = list(data)[:2]
    for node, c, k in (("n2", c0, k0), ("n3", c1, k1)):
        _flip(_chunk_files(lc, node, c, k), 777, 0x10)
    want = {("n2", f"{k0:016x}"), ("n3", f"{k1:016x}")}
    wait_until(lambda: want <= {(f["node"], f["chunk"]) for f in _faults(lc, "ChunkCorrupt")}, 30,
          "the scrubbers reporting both damaged copies")
    wait_until(lambda: _replica_read(lc, "n2", c0, k0) == data[(c0, k0)]
          and _replica_read(lc, "n3", c1, k1) == data[(c1, k1)], 30, "both damaged copies repaired")
    corrupt = _faults(lc, "ChunkCorrupt")
    assert {(f["node"], f["chunk"]) for f in corrupt} == want  # no intact copy was reported
    assert all(f["detail"].startswith("scrub: ") for f in corrupt)
    assert client.stats["replica_failovers"] == 0  # no read met the damage: the scrubbers found it
    for node in ("n1", "n2", "n3"):  # every server keeps scrubbing all of its copies
        wait_until(lambda node=node: _direct(lc, node, "storage.stats", {}).result["scrubbed_chunks"] >= 2 * len(data),
              30, f"{node} scrubbing its copies")
    for key, view in zip(data, client.batch_read([ReadIO(c, k) for c, k in data]), strict=True):
        assert bytes(view) == data[key], key


class _Link:
    """The network path from one node to a service, as a TCP relay the test can cut: ``cut()``
    drops every connection and refuses new ones, ``mend()`` lets them through again."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                a, _ = self.listener.accept()
            except TimeoutError:
                continue
            a.settimeout(None)
            if not self.up:
                a.close()
                continue
            try:
                b = socket.create_connection(self.target, timeout=5)
            except OSError:
                a.close()
                continue
            b.settimeout(None)
            with self.lock:
                self.socks += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(65536):
                y.sendall(data)
        except OSError:
            pass
        finally:
            for z in (x, y):
                try:
                    z.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            socks, self.socks = self.socks, []
        for z in socks:
            try:
                z.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            z.close()

    def mend(self) -> None:
        self.up = True

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.cut()
        self.listener.close()


def test_server_cut_off_from_mgmtd_stops_serving_before_its_chains_move_on(fs3, tmp_path):
    """n3 loses mgmtd but not its clients: mgmtd moves n3's targets out of their chains and the
    chunk is rewritten without n3; a reader holding the old routing table must not get the old
    bytes from n3 (its lease expired at failure_timeout / 2, before the chains moved)."""
    lc, client = fs3
    mg = lc.cluster.endpoint("fs3.mgmtd")
    link = _Link(mg[0], mg)
    try:
        raw = tomllib.loads(lc.cluster_file.read_text())
        for sv in raw["service"]:
            if sv["module"] == "fs3.mgmtd":
                sv["port"] = link.port
        via_link = tmp_path / "n3-via-link.toml"
        via_link.write_text(dump_cluster(raw))
        lc.kill("fs3.storage", "n3")
        lc.start("fs3.storage", "n3", cluster_file=via_link)
        wait_until(lambda: fs3_serving(lc) and _settled(lc), 60, "n3 (through the link) back in service")
        chain = client.chains()[0]
        client.write(chain, 7, b"old bytes")
        st = _mgmtd_status(lc)
        old_cver = st["chains"][str(chain)]["version"]
        assert _replica_read(lc, "n3", chain, 7) == b"old bytes"

        link.cut()
        wait_until(lambda: _mgmtd_status(lc)["chains"][str(chain)]["version"] > old_cver, 30,
              "mgmtd taking n3's target out of the chain")
        client.write(chain, 7, b"new bytes")  # the chain without n3
        # a reader with the old table asks n3, which cannot know: it refuses instead of
        # serving the old bytes
        addr, port = lc.cluster.endpoint("fs3.storage", "n3")
        with RpcClient(addr, port, credential=lc.credential, timeout=10, traffic_class=TrafficClass.STORAGE) as c:
            rep = c.call("storage.read", {"items": [[chain, old_cver, 7, 0, -1]]})
            item = rep.result["items"][0]
            assert item.get("err") == "NotServing" and "out of contact with mgmtd" in item["msg"], item
            assert c.call("storage.stats").result["lease_expired"] == 1

        link.mend()  # back in contact: resynced, then serving the new bytes
        wait_until(lambda: fs3_serving(lc), 60, "n3 resynced and serving again")
        wait_until(lambda: _replica_read(lc, "n3", chain, 7) == b"new bytes", 30, "n3 serving the new bytes")
    finally:
        link.close()


def test_a_full_disk_takes_its_target_out_and_writes_go_on(launch_cluster, tmp_path):
    """Target 301 (on n3) lives on a 2 MiB disk (a tmpfs): the second 1 MiB chunk fills it. n3
    takes that target out of service and reports it offline; mgmtd moves it out of its chain and
    every write is still acknowledged and reads back, while n3's other targets keep serving."""
    disk = tmp_path / "run0" / "data" / "n3" / "targets" / "301"  # launch_cluster's first run dir
    disk.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "fs3-test-disk", str(disk)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"needs permission to mount a tmpfs (root): {mounted.stderr.strip()}")
    try:
        lc = launch_cluster(_cluster_file(tmp_path), services=FS3)
        wait_until(lambda: _settled(lc), 20, "every storage server registered and on the current routing table")
        assert 301 in _targets_of(lc, "n3")
        st = _mgmtd_status(lc)
        chain = next(int(c) for c, d in st["chains"].items() if 301 in [t for t, _s in d["members"]])
        data = {k: os.urandom(1 << 20) for k in range(4)}  # 4 MiB for a 2 MiB disk
        with ChunkClient.from_cluster(lc.cluster_file, node="n0", timeout=40.0) as client:
            for k, b in data.items():
                client.write(chain, k, b)  # acknowledged, through the chain without 301 once it failed
            wait_until(lambda: 301 in _mgmtd_status(lc)["offline_targets"], 20, "target 301 offline")
            failed = _direct(lc, "n3", "storage.stats", {}).result["failed"]
            assert list(failed) == ["301"] and "ENOSPC" in failed["301"], failed
            assert [(f["node"], f["target"]) for f in _faults(lc, "TargetFailed")] == [("n3", 301)]
            others = {t: s for d in _mgmtd_status(lc)["chains"].values() for t, s in d["members"]
                      if t in _targets_of(lc, "n3") and t != 301}
            assert others and set(others.values()) == {"serving"}, others  # only the failed disk is out
            res = CliRunner().invoke(app, ["stats", "--cluster", str(lc.cluster_file)])  # the table
            assert res.exit_code == 0, res.output
            assert "n3: target 301 FAILED, out of service: No space left on device (ENOSPC)" in res.output, res.output
            for k, b in data.items():
                assert bytes(client.read(chain, k)) == b
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def test_stale_routing_client_recovers(fs3):
    lc, client = fs3
    chains = client.chains()
    client.write(chains[0], 1, b"before")
    stale = ChunkClient.from_cluster(lc.cluster_file, node="n0", timeout=40.0)
    try:
        stale.read(chains[0], 1)
        v_stale = stale.routing.version
        cv_stale = stale.routing.chains[chains[0]]["version"]
        # a storage server restarts (new incarnation): every chain is reconfigured
        lc.kill("fs3.storage", "n3")
        lc.start("fs3.storage", "n3")
        wait_until(lambda: fs3_serving(lc) and _mgmtd_status(lc)["chains"][str(chains[0])]["version"] > cv_stale,
              60, "n3 back in service")
        assert stale.routing.version == v_stale  # still the old table
        refreshes = stale.stats["routing_refreshes"]
        stale.write(chains[0], 2, b"after")          # rejected as stale, refreshed, retried
        assert bytes(stale.read(chains[0], 1)) == b"before"
        assert bytes(stale.read(chains[0], 2)) == b"after"
        assert stale.routing.version > v_stale and stale.stats["routing_refreshes"] > refreshes
        assert bytes(client.read(chains[0], 2)) == b"after"
    finally:
        stale.close()


def test_mgmtd_restart_keeps_state(fs3):
    _mgmtd_restart_keeps_state(*fs3)


@pytest.mark.postgres
def test_mgmtd_restart_keeps_state_postgres(launch_cluster, tmp_path, pg_url):
    url = pg_url if "+" in pg_url.split("://", 1)[0] else pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
    lc = launch_cluster(_cluster_file(tmp_path, mgmtd_db=url), services=FS3)
    wait_until(lambda: _settled(lc), 20, "every storage server registered and on the current routing table")
    client = ChunkClient.from_cluster(lc.cluster_file, node="n0", timeout=40.0)
    try:
        _mgmtd_restart_keeps_state(lc, client)
        assert not (lc.run_dir / "data" / "n0" / "mgmtd.db").exists()  # the state went to PostgreSQL
    finally:
        client.close()


def _mgmtd_restart_keeps_state(lc, client):
    chains = client.chains()
    payload = os.urandom(50_000)
    client.write(chains[1], 42, payload)
    lc.kill("fs3.storage", "n1")
    n1 = set(_targets_of(lc, "n1"))
    wait_until(lambda: n1 <= set(_mgmtd_status(lc)["offline_targets"]), 20, "n1 offline")
    def others_current():
        version = _mgmtd_status(lc)["version"]
        for node in ("n2", "n3"):
            with RpcClient(*lc.cluster.endpoint("fs3.storage", node), credential=lc.credential, timeout=5) as c:
                if c.call("storage.stats").result["routing_version"] != version:
                    return False
        return True

    # everybody has learnt the reconfigured chains (mgmtd is what would tell them otherwise)
    wait_until(others_current, 20, "n2 and n3 on the current routing table")
    before = _mgmtd_status(lc)
    client.refresh_routing()
    assert client.routing.version == before["version"]
    lc.kill("fs3.mgmtd", "n0")  # SIGKILL: no chance to flush anything on the way out
    # without mgmtd the data path goes on with the routing tables everybody holds
    assert bytes(client.read(chains[1], 42)) == payload
    client.write(chains[2], 43, b"written while mgmtd was down")
    lc.start("fs3.mgmtd", "n0")
    after = _mgmtd_status(lc)
    assert after["chains"] == before["chains"]
    assert after["version"] >= before["version"]
    assert after["targets"] == before["targets"]
    # the cluster still works on the persisted table, and n1 rejoins through a resync
    assert bytes(client.read(chains[1], 42)) == payload
    lc.start("fs3.storage", "n1")
    wait_until(lambda: fs3_serving(lc), 60, "n1 back in service")
    assert _replica_read(lc, "n1", chains[1], 42) == payload
    assert _replica_read(lc, "n1", chains[2], 43) == b"written while mgmtd was down"


def _direct(lc, node: str, method: str, args: dict, payload=()):
    with RpcClient(*lc.cluster.endpoint("fs3.storage", node), credential=lc.credential, timeout=10,
                   traffic_class=TrafficClass.STORAGE) as c:
        return c.call(method, args, payload)


def test_retried_write_is_applied_once(fs3):
    lc, client = fs3
    chain = client.chains()[0]
    r = client.routing
    head = r.node_of(r.write_set(chain)[0][0])
    args = {"chain": chain, "cver": r.chains[chain]["version"], "chunk": 77, "off": 0, "full": True,
            "client": "retry-test", "channel": 1, "seq": 5}
    first = _direct(lc, head, "storage.write", args, [b"once"]).result
    again = _direct(lc, head, "storage.write", args, [b"once"]).result  # the ack was "lost": same key
    assert again == first
    assert bytes(client.read(chain, 77)) == b"once"
    listed = [x for x in _direct(lc, head, "storage.list", {"chain": chain}).result if x["chunk"] == 77]
    assert listed[0]["committed"] == first["version"]  # not applied a second time
    from network import RemoteError
    with pytest.raises(RemoteError, match="StaleRequest"):
        _direct(lc, head, "storage.write", dict(args, seq=4), [b"older"])
    nxt = _direct(lc, head, "storage.write", dict(args, seq=6), [b"twice"]).result
    assert nxt["version"] == first["version"] + 1


def test_retried_batch_is_applied_once_per_item(fs3):
    lc, client = fs3
    chain = client.chains()[1]
    r = client.routing
    head = r.node_of(r.write_set(chain)[0][0])
    args = {"chain": chain, "cver": r.chains[chain]["version"], "client": "batch-test",
            "items": [[200, 1, 1, 3], [201, 2, 1, 0], [202, 3, 1, 5]]}
    first = _direct(lc, head, "storage.write_batch", args, [b"aaa", b"ccccc"]).result["items"]
    assert [x["version"] for x in first] == [1, 1, 1]
    again = _direct(lc, head, "storage.write_batch", args, [b"aaa", b"ccccc"]).result["items"]
    assert again == first  # the ack was "lost": every item answers from the dedup cache
    assert [bytes(v) for v in client.batch_read([ReadIO(chain, k) for k in (200, 201, 202)])] == \
        [b"aaa", b"", b"ccccc"]
    for node in ("n1", "n2", "n3"):
        assert _replica_read(lc, node, chain, 202) == b"ccccc"
    # items answer on their own: an old sequence number fails that item only
    args2 = dict(args, items=[[200, 1, 2, 1], [203, 4, 1, 1], [202, 3, 0, 1]])
    res = _direct(lc, head, "storage.write_batch", args2, [b"x", b"y", b"z"]).result["items"]
    assert res[0]["version"] == 2 and res[1]["version"] == 1 and res[2]["err"] == "StaleRequest"
    assert bytes(client.read(chain, 200)) == b"x" and bytes(client.read(chain, 202)) == b"ccccc"
    from network import RemoteError
    with pytest.raises(RemoteError, match="appears twice"):
        _direct(lc, head, "storage.write_batch", dict(args, items=[[5, 9, 1, 1], [5, 10, 1, 1]]), [b"pq"])
    with pytest.raises(RemoteError, match="do not match"):
        _direct(lc, head, "storage.write_batch", dict(args, items=[[6, 9, 1, 3]]), [b"pq"])
    # the client batches whole-chunk writes per chain and writes partial ones alone
    ios = [WriteIO(chain, 300 + k, bytes([k]) * 1000) for k in range(9)] + [WriteIO(chain, 300, b"zz", offset=10)]
    res = client.batch_write(ios[:9])
    assert all(x.version == 1 for x in res)
    assert client.batch_write(ios[9:])[0].version == 2
    assert bytes(client.read(chain, 300)) == bytes(10) + b"zz" + bytes(988)


@pytest.mark.parametrize("fs3", [{"failure_timeout": 30.0}], indirect=True)
def test_pending_chunk_answers_not_committed(fs3):
    lc, client = fs3
    r = client.routing
    # a chain whose tail is on n3: freeze n3 so a write stops before its commit
    chain = next(c for c in r.chain_ids() if r.node_of(r.write_set(c)[-1][0]) == "n3")
    head = r.node_of(r.write_set(chain)[0][0])
    client.write(chain, 5, b"old")
    lc.kill("fs3.storage", "n3", sig=signal.SIGSTOP)  # returns once every thread of n3 is stopped
    done = threading.Event()
    errors = []

    def write():
        try:
            client.write(chain, 5, b"new")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        done.set()

    t = threading.Thread(target=write)
    t.start()
    try:
        def pending():
            rows = _direct(lc, head, "storage.list", {"chain": chain}).result
            return any(x["chunk"] == 5 and x["pending"] for x in rows)

        wait_until(pending, 20, "the write to be pending at the head")
        cver = client.routing.chains[chain]["version"]
        rep = _direct(lc, head, "storage.read", {"items": [[chain, cver, 5, 0, -1]]})
        item = rep.result["items"][0]
        assert item.get("err") == "ChunkNotCommitted", (item, bytes(rep.payload), done.is_set(), errors)
        rep = _direct(lc, head, "storage.read", {"items": [[chain, cver, 5, 0, -1]], "relaxed": True})
        assert bytes(rep.payload) == b"new"  # a relaxed read sees the pending version
        assert not done.is_set()  # not acknowledged before the tail commits
    finally:
        lc.kill("fs3.storage", "n3", sig=signal.SIGCONT)
    t.join(60)
    assert done.is_set() and not errors
    assert bytes(client.read(chain, 5)) == b"new"
    for node in ("n1", "n2", "n3"):
        assert _replica_read(lc, node, chain, 5) == b"new"


def test_all_replicas_down_lastsrv_restores_the_chain(fs3):
    lc, client = fs3
    chains = client.chains()
    rng = random.Random(3)
    data = {(chains[k % 3], k): rng.randbytes(30_000) for k in range(12)}
    client.batch_write([WriteIO(c, k, b) for (c, k), b in data.items()])
    for node in ("n1", "n2", "n3"):
        lc.kill("fs3.storage", node)

    def states():
        return [s for d in _mgmtd_status(lc)["chains"].values() for _t, s in d["members"]]

    # every chain keeps its last serving replica as lastsrv and serves nothing
    wait_until(lambda: states().count("lastsrv") == 3 and states().count("offline") == 6, 30, "lastsrv everywhere")
    # n1 comes back first: in a chain whose lastsrv replica is n1's it serves again at once; in
    # the others it waits (there is nobody up to date to resync from)
    lc.start("fs3.storage", "n1")
    n1 = set(_targets_of(lc, "n1"))

    def n1_back():
        st = _mgmtd_status(lc)
        return all(s != "offline" for d in st["chains"].values() for t, s in d["members"] if t in n1) and st

    st = wait_until(n1_back, 30, "n1's targets back")
    for d in st["chains"].values():
        mine = next(s for t, s in d["members"] if t in n1)
        others = [s for t, s in d["members"] if t not in n1]
        assert (mine, sorted(others)) in (("serving", ["offline", "offline"]), ("waiting", ["lastsrv", "offline"]))
    lc.start("fs3.storage", "n2")
    lc.start("fs3.storage", "n3")
    wait_until(lambda: fs3_serving(lc), 60, "every chain restored from its lastsrv replica")
    got = client.batch_read([ReadIO(c, k) for c, k in data])
    assert all(bytes(v) == data[key] for key, v in zip(data, got, strict=True))
    for node in ("n1", "n2", "n3"):
        for (c, k), want in list(data.items())[:4]:
            assert _replica_read(lc, node, c, k) == want
