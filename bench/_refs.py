"""References the fs3 benchmarks measure against, in the same run: a bare TCP stream (the network
path) and the ideal chain (three bare relays: what a 3-replica chain write costs with no software
overhead at all). Used by bench/fs3_chunks.py and bench/fs3_files.py.

    with References(total_bytes) as refs:
        refs.bare_stream(chunks)      # bytes/s from 127.0.0.2 to a sink on 127.0.0.3
        refs.ideal_chain(chunks)      # bytes/s through relays on 127.0.0.3..5
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

SRC, DST = "127.0.0.2", "127.0.0.3"
MiB = 1 << 20
_FRESH = 1 << 62  # top bit of a run's length: the relays write new files


def _sink(port_q, total: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((DST, 0))
    ls.listen(1)
    port_q.put(ls.getsockname()[1])
    buf = bytearray(MiB)
    view = memoryview(buf)
    while True:
        s, _ = ls.accept()
        hdr = s.recv(8)
        if not hdr or hdr == b"quit....":
            s.close()
            break
        n = int.from_bytes(hdr, "big")
        got = 0
        while got < n:
            k = s.recv_into(view[: min(MiB, n - got)])
            if not k:
                break
            got += k
        s.sendall(b"k")
        s.close()
    ls.close()


def _relay(port_q, hop: int, next_q, data_dir: str) -> None:
    """Hop ``hop`` (0..2) of the ideal chain, on 127.0.0.(3 + hop): per run, an 8-byte length, then
    1 MiB pieces: receive, CRC32C, forward to the next hop, write into one of 64 cached files
    (overwritten in place, as the chunk store overwrites recycled files); the acknowledgement
    goes back once at the end. With the length's top bit set (a *fresh* run) each piece goes to a
    new file instead, as new data does in any store (removed before the next run)."""
    import crc32c

    ls = socket.socket()
    ls.bind((f"127.0.0.{3 + hop}", 0))
    ls.listen(1)
    port_q.put((hop, ls.getsockname()[1]))
    nxt_addr = next_q.get() if next_q is not None else None
    fds = [os.open(f"{data_dir}/hop{hop}-{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(64)]
    for fd in fds:  # allocated and cached before any timed run
        os.pwrite(fd, bytes(MiB), 0)
    view = memoryview(bytearray(MiB))
    made: list[str] = []
    while True:
        s, _ = ls.accept()
        hdr = s.recv(8, socket.MSG_WAITALL)
        if len(hdr) < 8 or hdr == b"quit....":
            s.close()
            break
        n = int.from_bytes(hdr, "big")
        fresh = bool(n & _FRESH)
        n &= _FRESH - 1
        nxt = None
        if nxt_addr is not None:
            nxt = socket.create_connection(nxt_addr)
            nxt.sendall(hdr)
        for i in range(n // MiB):
            if s.recv_into(view, MiB, socket.MSG_WAITALL) != MiB:
                raise RuntimeError(f"ideal chain hop {hop}: short receive")
            crc32c.crc32c(view)
            if nxt is not None:
                nxt.sendall(view)
            if fresh:
                path = f"{data_dir}/hop{hop}-fresh-{i}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(fd, view, 0)
                os.close(fd)
                made.append(path)
            else:
                os.pwrite(fds[i % 64], view, 0)
        if nxt is not None:
            assert nxt.recv(1) == b"k"
            nxt.close()
        s.sendall(b"k")
        s.close()
        for path in made:  # after the acknowledgement: not part of the timed run
            os.unlink(path)
        made.clear()
    if nxt_addr is not None:  # pass the quit on
        with socket.create_connection(nxt_addr) as q:
            q.sendall(b"quit....")
    for fd in fds:
        os.close(fd)
    ls.close()


def ideal_chain(port: int, chunks: list[bytes], fresh: bool = False) -> float:
    """Bytes per second through the three relays (the client computes each chunk's CRC32C too);
    ``fresh``: every hop writes each piece into a new file (see _relay)."""
    import crc32c

    total = sum(len(c) for c in chunks)
    s = socket.create_connection((DST, port), source_address=(SRC, 0))
    t0 = time.perf_counter()
    s.sendall((total | (_FRESH if fresh else 0)).to_bytes(8, "big"))
    for c in chunks:
        crc32c.crc32c(c)
        s.sendall(c)
    assert s.recv(1) == b"k"
    dt = time.perf_counter() - t0
    s.close()
    return total / dt


def _cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) used so far by this process and ``pids``."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def bare_stream(port: int, chunks: list[bytes], repeat: int = 2) -> float:
    # sent twice over: a longer run is less at the mercy of one scheduling hiccup
    chunks = chunks * repeat
    total = sum(len(c) for c in chunks)
    s = socket.socket()
    s.bind((SRC, 0))
    s.connect((DST, port))
    t0 = time.perf_counter()
    s.sendall(total.to_bytes(8, "big"))
    for c in chunks:
        s.sendall(c)
    assert s.recv(1) == b"k"
    dt = time.perf_counter() - t0
    s.close()
    return total / dt


class References:
    """The sink and the three relays as processes (spawned); closed on exit."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="fs3refs-"))
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self.sink = ctx.Process(target=_sink, args=(q, 0), daemon=True)
        self.sink.start()
        self.port = q.get(timeout=30)
        next_qs = [ctx.Queue() for _ in range(3)]
        self.relays = [ctx.Process(target=_relay, args=(q, h, next_qs[h + 1] if h < 2 else None, str(self.tmp)),
                                   daemon=True) for h in range(3)]
        for r in self.relays:
            r.start()
        self.relay_ports = dict(q.get(timeout=30) for _ in self.relays)
        for h in (1, 2):
            next_qs[h].put((f"127.0.0.{3 + h}", self.relay_ports[h]))

    def __enter__(self) -> References:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def sink_pids(self) -> list[int]:
        return [self.sink.pid]

    @property
    def relay_pids(self) -> list[int]:
        return [r.pid for r in self.relays]

    def bare_stream(self, chunks: list[bytes], repeat: int = 2) -> float:
        return bare_stream(self.port, chunks, repeat)

    def ideal_chain(self, chunks: list[bytes], fresh: bool = False) -> float:
        return ideal_chain(self.relay_ports[0], chunks, fresh)

    def close(self) -> None:
        for port in (self.port, self.relay_ports.get(0)):
            try:
                with socket.create_connection((DST, port), timeout=5) as s:
                    s.sendall(b"quit....")
            except OSError:
                pass
        for p in (self.sink, *self.relays):
            p.join(10)
            if p.is_alive():
                p.terminate()
        shutil.rmtree(self.tmp, ignore_errors=True)
