"""hfreduce all_to_all and point-to-point send/recv on local multi-process groups.

Emulated nodes (1-4) x ranks per node (1-3): within a node the messages are copied straight from
the sender's memory (single copy), between nodes they travel over the mesh's TCP connections.
Every rank builds its chunks from (source, destination) and checks what it received exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import hfreduce
from hfreduce.testing import run_group


def chunk(src: int, dst: int, rows: int, dtype, width: int = 3) -> np.ndarray:
    v = (np.arange(rows * width, dtype=np.int64).reshape(rows, width) * 7 + src * 31 + dst * 5) % 101
    return v.astype(dtype)


def w_all_to_all(pg, dtypes):
    W, r = pg.world_size, pg.rank
    for seq, dtype in enumerate(dtypes):
        # uneven splits with zero-size chunks: rank s sends (s + d + seq) % 3 rows to rank d
        n = lambda s, d, seq=seq: (s + d + seq) % 3  # noqa: E731
        in_splits, out_splits = [n(r, d) for d in range(W)], [n(s, r) for s in range(W)]
        inp = np.concatenate([chunk(r, d, n(r, d), dtype) for d in range(W)])
        out = np.full((sum(out_splits), 3), -1, dtype)
        pg.all_to_all(out, inp, out_splits, in_splits)
        want = np.concatenate([chunk(s, r, n(s, r), dtype) for s in range(W)])
        assert out.tobytes() == want.tobytes(), (dtype, r)
    # equal splits, 1-D, several MiB (several frames in flight), async
    k = (1 << 20) + 3
    inp = np.concatenate([np.arange(k, dtype=np.int64) * W + d + 1000 * r for d in range(W)])
    out = np.empty_like(inp)
    work = pg.all_to_all(out, inp, async_op=True)
    work.wait()
    for s in range(W):
        assert (out[s * k:(s + 1) * k] == np.arange(k, dtype=np.int64) * W + r + 1000 * s).all()
    # registered buffers (hfreduce.empty, in the node's heaps) take the same paths
    reg_in, reg_out = pg.empty((W, 5), np.int32), pg.empty((W, 5), np.int32)
    reg_in[...] = np.arange(W)[:, None] + 10 * r
    pg.all_to_all(reg_out, reg_in)
    assert (reg_out == r + 10 * np.arange(W)[:, None]).all()
    return pg.cma, pg._mesh.single_copy_msgs


@pytest.mark.parametrize("nodes,per_node", [(1, 1), (1, 3), (2, 1), (2, 2), (4, 1), (3, 3)])
def test_all_to_all_uneven_splits_every_dtype(nodes, per_node):
    dtypes = [np.float32, np.float64, np.float16, np.int32, np.int64]
    for cma, single_copy_msgs in run_group(w_all_to_all, dtypes, nodes=nodes, per_node=per_node,
                                           timeout=90).values():
        # local peers' chunks were copied straight from their memory whenever the node allows it
        assert (single_copy_msgs > 0) == (cma and per_node > 1)


def w_torch(pg):
    import torch

    W, r = pg.world_size, pg.rank
    inp = torch.arange(W * 4, dtype=torch.float32).reshape(W * 2, 2).to(torch.bfloat16) + r
    out = torch.empty_like(inp)
    hfreduce.all_to_all(out, inp)  # the module function, on the default group
    ref = [torch.arange(W * 4, dtype=torch.float32).reshape(W * 2, 2).to(torch.bfloat16) + s for s in range(W)]
    assert torch.equal(out, torch.cat([ref[s][r * 2:(r + 1) * 2] for s in range(W)]))
    splits = torch.tensor([1] * W)
    o1, i1 = torch.zeros(W, dtype=torch.int64), torch.full((W,), r, dtype=torch.int64)
    hfreduce.all_to_all(o1, i1, splits, splits)
    assert o1.tolist() == list(range(W))


def test_all_to_all_torch_bfloat16():
    pytest.importorskip("torch")
    run_group(w_torch, nodes=2, per_node=2, timeout=60).values()


def w_send_recv(pg):
    W, r = pg.world_size, pg.rank
    if r == 0:
        # out of order: tag 2's receive is posted first; tag 1's messages arrive in order
        b2, b1a, b1b = np.zeros(5, np.int32), np.zeros(3, np.float64), np.zeros(3, np.float64)
        w2 = pg.irecv(b2, 1, tag=2)
        pg.recv(b1a, 1, tag=1)
        pg.recv(b1b, 1, tag=1)
        w2.wait()
        assert b2.tolist() == [7] * 5 and b1a.tolist() == [1.0] * 3 and b1b.tolist() == [2.0] * 3
        # async overlap: every peer sends 4 MiB while this rank posts all receives first
        bufs = {s: np.zeros(1 << 19, np.float64) for s in range(1, W)}
        works = [pg.irecv(bufs[s], s, tag=9) for s in range(1, W)]
        for wk in works:
            wk.wait()
        assert all((bufs[s] == s).all() for s in range(1, W))
    elif r == 1:
        pg.send(np.full(3, 1.0), 0, tag=1)
        pg.send(np.full(3, 2.0), 0, tag=1)
        pg.send(np.full(5, 7, np.int32), 0, tag=2)
    if r:
        pg.isend(np.full(1 << 19, float(r)), 0, tag=9).wait()
    # a caller's timeout ends the wait only: the receive stays posted and completes later
    if r == 0:
        late = np.zeros(2, np.int64)
        w = pg.irecv(late, 1, tag=11)
        with pytest.raises(hfreduce.HFReduceTimeout, match="still running"):
            w.wait(timeout=0.1)
        pg.send(np.zeros(1), 1, tag=12)  # now send it
        w.wait(timeout=30)
        assert late.tolist() == [4, 4]
    elif r == 1:
        pg.recv(np.zeros(1), 0, tag=12)
        pg.send(np.full(2, 4, np.int64), 0, tag=11)
    with pytest.raises(hfreduce.InvalidArgument, match="not a rank"):
        pg.send(np.zeros(1), W)
    with pytest.raises(hfreduce.InvalidArgument, match="itself"):
        pg.recv(np.zeros(1), r)
    return pg.cma, pg._mesh.single_copy_msgs


@pytest.mark.parametrize("nodes,per_node,cma", [(1, 3, "1"), (1, 3, "0"), (2, 2, "1")])
def test_send_recv_tags_order_and_overlap(nodes, per_node, cma):
    """Single copy on a node, and with HFREDUCE_CMA=0 the connections instead."""
    got = run_group(w_send_recv, nodes=nodes, per_node=per_node, timeout=60, env={"HFREDUCE_CMA": cma}).values()
    probe_ok, copied = got[0]   # rank 0 received from its node's peer(s)
    assert (copied > 0) == (cma == "1" and probe_ok), got[0]
    if cma == "0":
        assert not probe_ok


def w_mismatch(pg):
    if pg.rank == 0:
        # on one node the send itself fails (the receiver's acknowledgement says why); between
        # nodes the send is done when the bytes are out, and the receiver's abort fails the next call
        with pytest.raises(hfreduce.MismatchError, match="16 bytes.*expected 32 bytes"):
            pg.send(np.zeros(4, np.float32), 1)
            hfreduce.barrier(group=pg)
    else:
        with pytest.raises(hfreduce.MismatchError, match="rank 0 .*sent 16 bytes.*expected 32 bytes"):
            pg.recv(np.zeros(8, np.float32), 0)


@pytest.mark.parametrize("nodes,per_node", [(1, 2), (2, 1)])
def test_size_mismatch_names_both_sizes(nodes, per_node):
    run_group(w_mismatch, nodes=nodes, per_node=per_node, timeout=60).values()


def w_killed_peer(pg, victim, mode):
    import os
    import time

    x = np.zeros(pg.world_size * 1000, np.float32)
    if pg.rank == victim:
        os._exit(3)
    t0 = time.monotonic()
    try:  # haiscale waits with a timeout of its own: the peers are watched all the same
        if mode == "recv":  # a receive from a remote peer that never connected to this rank
            pg.irecv(x, victim).wait(timeout=60)
        else:
            pg.all_to_all(np.empty_like(x), x, async_op=True).wait(timeout=60)
    except hfreduce.HFReduceError as exc:
        return type(exc).__name__, exc.rank, time.monotonic() - t0
    return None


@pytest.mark.parametrize("nodes,per_node,victim,mode", [(1, 3, 1, "all_to_all"), (2, 2, 3, "all_to_all"),
                                                        (2, 2, 3, "recv")])
def test_killed_peer_fails_every_rank(nodes, per_node, victim, mode):
    """A dead peer fails every rank at once (its pid, a refused or closed connection), not after
    the group's timeout (60 s here)."""
    res = run_group(w_killed_peer, victim, mode, nodes=nodes, per_node=per_node, group_timeout=60.0, timeout=60,
                    abandon={victim})
    for r in res.results:
        if r.rank != victim:
            assert r.error is None, r.traceback
            name, culprit, took = r.value
            assert name == "PeerFailed" and culprit == victim, (r.rank, r.value)
            assert took < 10.0


def w_stuck_peer(pg):
    import time

    x = np.zeros(pg.world_size * 4, np.int64)
    if pg.rank == 1:  # stuck until the others gave up on it (bounded), then its call fails too
        deadline = time.monotonic() + 20
        while pg._mesh.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        pg.all_to_all(np.empty_like(x), x)
    except hfreduce.HFReduceError as exc:
        return type(exc).__name__, exc.rank
    return None


@pytest.mark.parametrize("nodes,per_node", [(1, 3), (3, 1)])
def test_stuck_peer_times_out_on_every_rank(nodes, per_node):
    res = run_group(w_stuck_peer, nodes=nodes, per_node=per_node, group_timeout=2.0, timeout=60)
    assert res.values() == [("HFReduceTimeout", 1)] * 3


def w_new_group(pg):
    # every rank takes part in making both groups (as torch.distributed.new_group); ranks are
    # numbered in sorted order; each group reduces on its own, without the default group changing
    evens = hfreduce.new_group([2, 0], group=pg)
    odds = hfreduce.new_group([1, 3], group=pg)
    mine = evens if pg.rank % 2 == 0 else odds
    other = odds if pg.rank % 2 == 0 else evens
    assert other is None and hfreduce.get_default() is pg
    x = np.full(1000, pg.rank + 1, np.float32)
    mine.allreduce(x)
    out = np.zeros(2, np.int64)
    mine.all_to_all(out, np.full(2, pg.rank, np.int64))
    res = (mine.rank, mine.world_size, float(x[0]), out.tolist())
    hfreduce.destroy(mine)
    return res


@pytest.mark.parametrize("nodes, per_node", [(1, 4), (2, 2)])
def test_new_group_makes_sub_groups_every_rank_takes_part_in(nodes, per_node):
    got = run_group(w_new_group, nodes=nodes, per_node=per_node, timeout=60).values()
    assert got == [(0, 2, 4.0, [0, 2]), (0, 2, 6.0, [1, 3]), (1, 2, 4.0, [0, 2]), (1, 2, 6.0, [1, 3])]
