"""haiscale.pipeline: each schedule gives the unsplit model's loss and gradients (all stages in one
process, and on real ranks over hfreduce point-to-point with data parallelism), 1F1B holds fewer
activations than GPipe, the one-NIC placement is a valid staggered layout, and a failing stage
ends every rank with an error."""

from __future__ import annotations

import os
import time
import traceback

import pytest

torch = pytest.importorskip("torch")
from _haiscale_checks import ATOL, RTOL  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402
from haiscale.errors import UsageError  # noqa: E402
from haiscale.pipeline import (  # noqa: E402
    ActivationMeter,
    max_in_flight,
    node_placement,
    one_f_one_b,
    rank_layout,
    run_local,
    simulate,
    split,
)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU(),
                         nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def data(step: int = 0, n: int = 10):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def mse(out, y):
    return ((out - y) ** 2).mean()


def unsplit_grads(x, y):
    m = make_model()
    loss = mse(m(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in m.parameters()]


# -- schedules as data ----------------------------------------------------------------------------------
def test_1f1b_order_and_in_flight():
    assert one_f_one_b(0, 2, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    assert one_f_one_b(1, 2, 4) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]
    for p in (1, 2, 3, 4):
        for m in (1, 2, 3, 8):
            for s in range(p):
                assert max_in_flight(one_f_one_b(s, p, m)) == min(p - s, m)
            for sched in ("gpipe", "1f1b"):
                order = simulate(sched, p, m)  # raises on a deadlock
                assert len(order) == 2 * p * m
    with pytest.raises(UsageError, match="unknown pipeline schedule"):
        simulate("zigzag", 2, 2)


def test_split_balances_and_refuses():
    stages = split(make_model(), 3)
    assert sum(len(s) for s in stages) == 8 and all(len(s) >= 1 for s in stages)
    counts = [sum(p.numel() for p in s.parameters()) for s in stages]
    assert max(counts) < sum(counts) * 0.6  # by parameters, not by layer count
    assert [len(s) for s in split(make_model(), 2, balance=[5, 3])] == [5, 3]
    with pytest.raises(UsageError, match="balance"):
        split(make_model(), 2, balance=[4, 3])
    with pytest.raises(UsageError, match="cannot split"):
        split(make_model(), 9)


# -- all stages in one process ----------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("nstages", [2, 3])
def test_local_schedule_matches_unsplit(schedule, nstages):
    x, y = data()  # 10 rows in 4 micro-batches: uneven on purpose
    want_loss, want = unsplit_grads(x, y)
    stages = split(make_model(), nstages)
    loss, order = run_local(stages, schedule, 4, x, mse, labels=(y,))
    torch.testing.assert_close(loss, want_loss, atol=ATOL, rtol=RTOL)
    got = [p.grad for s in stages for p in s.parameters()]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)
    assert order == simulate(schedule, nstages, 4)  # the driver ran the schedule as specified


def test_1f1b_holds_fewer_activations_than_gpipe():
    x, y = data(n=32)
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        stages = split(make_model(), 2)
        meters = [ActivationMeter(list(s.parameters())) for s in stages]
        run_local(stages, schedule, 8, x, mse, labels=(y,), meters=meters)
        assert all(m.live == 0 for m in meters)  # every saved tensor was released by its backward
        peaks[schedule] = max(m.peak for m in meters)
    assert peaks["1f1b"] <= 0.3 * peaks["gpipe"]  # stage 0 holds 2 of 8 micro-batches instead of 8


# -- placement -------------------------------------------------------------------------------------
def test_rank_layouts():
    for world, pp in ((16, 4), (16, 2), (8, 8), (6, 3)):
        for one_nic in (False, True):
            lay = rank_layout(world, pp, one_nic=one_nic)
            assert sorted(r for row in lay.grid for r in row) == list(range(world))
            for r in range(world):
                assert r in lay.pipeline_of(r) and r in lay.dp_groups()[lay.where[r][1]]
    plain = node_placement(rank_layout(32, 4), 8)
    assert all(len({s for _, s in node}) == 1 for node in plain)  # a node = one stage of 8 replicas
    staggered = node_placement(rank_layout(32, 4, one_nic=True), 8)
    for node in staggered:  # 8 different replicas, every stage twice (4 stages over 8 GPUs)
        assert len({d for d, _ in node}) == 8
        assert sorted(s for _, s in node) == [0, 0, 1, 1, 2, 2, 3, 3]
    for node in node_placement(rank_layout(64, 8, one_nic=True), 8):
        assert len({d for d, _ in node}) == 8 and len({s for _, s in node}) == 8
    with pytest.raises(UsageError, match="multiple"):
        rank_layout(10, 4)


# -- real ranks --------------------------------------------------------------------------------------
def _has_p2p() -> bool:
    import hfreduce

    return hasattr(hfreduce.ProcessGroup, "send") and hasattr(hfreduce.ProcessGroup, "recv")


p2p = pytest.mark.skipif(not _has_p2p(), reason="hfreduce has no point-to-point send/recv yet")


def pipe_worker(local_rank: int, out_dir: str, pp: int, one_nic: bool, fail_stage: int | None) -> None:
    import hfreduce
    from haiscale.pipeline import GPipe, PipeDream, make_subgroups, partition, rank_layout

    torch.set_num_threads(1)
    hfreduce.init(timeout=20)
    rank = hfreduce.get_rank()
    res: dict = {}
    try:
        dp_group, pp_group = make_subgroups(pp, one_nic=one_nic)
        stage = pp_group.rank()
        # the replica this rank serves (a dp group's ranks are numbered in sorted order, as torch's
        # new_group, not by replica)
        replica = rank_layout(hfreduce.get_world_size(), pp, one_nic=one_nic).where[rank][0]
        ndp = 1 if dp_group is None else dp_group.world_size
        res.update(stage=stage, replica=replica)
        x, y = data(n=12 * ndp)
        x, y = x[replica * 12 : (replica + 1) * 12], y[replica * 12 : (replica + 1) * 12]
        for name, cls in (("gpipe", GPipe), ("1f1b", PipeDream)):
            module = partition(make_model(), stage, pp)
            if fail_stage == stage:
                module.append(_Boom())
            model = cls(module, chunks=4, process_group=pp_group, dp_group=dp_group, timeout=20)
            loss, out = model.forward_backward(x if stage == 0 else None, criterion=mse, labels=(y,))
            res[name] = {"grads": [p.grad.clone() for p in module.parameters()],
                         "loss": None if loss is None else loss.clone()}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        res["error"] = (type(exc).__name__, str(exc), traceback.format_exc())
    res["t"] = time.monotonic()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    hfreduce.destroy()


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("stage exploded on purpose")


def _results(tmp_path, world, pp, one_nic=False, fail_stage=None):
    try:
        haiscale.spawn(pipe_worker, args=(str(tmp_path), pp, one_nic, fail_stage), nprocs=world, timeout=90)
    except haiscale.ProcessFailed as exc:  # workers report errors in their files; exiting non-zero is a bug
        pytest.fail(f"a pipeline worker died: {exc}")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@p2p
def test_ranks_pp2_and_dp2_pp2_match_unsplit(tmp_path):
    """4 ranks, 2 replicas of a 2-stage pipeline on the one-NIC layout: each stage's averaged
    gradients equal the unsplit model's on the replicas' whole batch, for GPipe and 1F1B."""
    res = _results(tmp_path, 4, 2, one_nic=True)
    assert not [r["error"] for r in res if "error" in r]
    x, y = data(n=24)
    want_loss, want = unsplit_grads(x, y)
    ref = split(make_model(), 2)
    sizes = [len(list(s.parameters())) for s in ref]
    for r in res:
        lo = sum(sizes[: r["stage"]])
        for name in ("gpipe", "1f1b"):
            for g, w in zip(r[name]["grads"], want[lo : lo + sizes[r["stage"]]], strict=True):
                torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)
    assert sorted((r["replica"], r["stage"]) for r in res) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    last = [r for r in res if r["stage"] == 1]
    torch.testing.assert_close(sum(r["1f1b"]["loss"] for r in last) / 2, want_loss, atol=ATOL, rtol=RTOL)


@p2p
def test_ranks_pp3_matches_unsplit(tmp_path):
    res = _results(tmp_path, 3, 3)
    assert not [r["error"] for r in res if "error" in r]
    x, y = data(n=12)
    want_loss, want = unsplit_grads(x, y)
    sizes = [len(list(s.parameters())) for s in split(make_model(), 3)]
    got = [g for r in sorted(res, key=lambda r: r["stage"]) for g in r["1f1b"]["grads"]]
    assert len(got) == sum(sizes)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(res[2]["gpipe"]["loss"], want_loss, atol=ATOL, rtol=RTOL)


@p2p
def test_failing_stage_ends_every_rank_with_an_error(tmp_path):
    t0 = time.monotonic()
    res = _results(tmp_path, 3, 3, fail_stage=1)
    assert all("error" in r for r in res), [r.get("error") for r in res]
    assert "stage exploded on purpose" in res[1]["error"][1]
    assert time.monotonic() - t0 < 80  # bounded by the 20 s timeout, never a hang
