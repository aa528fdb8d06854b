"""haiscale FSDP (ZeRO-3) on 2 real processes: it must train exactly like DDP and like one process
on the concatenated batch (also with the optimizer stepped during backward), hold 1/N of the
parameters per rank, and save -> load -> continue like an uninterrupted run."""

from __future__ import annotations

import functools
import os
import traceback

import pytest

torch = pytest.importorskip("torch")
from _haiscale_checks import assert_close_dicts  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402
from haiscale.ddp import DistributedDataParallel  # noqa: E402
from haiscale.fsdp import (  # noqa: E402
    BackwardPrefetch,
    FullyShardedDataParallel,
    ModuleWrapPolicy,
    size_based_auto_wrap_policy,
)

WORLD = 2
STEPS = 3


class Net(nn.Module):
    def __init__(self, vocab: int = 40, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=24, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.tok(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h))


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def batch(step: int, n: int = 8):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randint(0, 40, (n, 5), generator=g), torch.randint(0, 40, (n, 5), generator=g)


def loss_fn(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def half(t, rank, world: int = WORLD):
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def sgd(params):
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def reference(steps: int = STEPS) -> dict:
    m = make_net()
    opt = sgd(m.parameters())
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(m(x), y).backward()
        opt.step()
    return {k: v.clone() for k, v in m.state_dict().items()}


POLICY = ModuleWrapPolicy([nn.TransformerEncoderLayer])


def run(model, opt, rank: int, start: int, stop: int, world: int = WORLD) -> None:
    for step in range(start, stop):
        x, y = batch(step)
        if opt is not None:
            opt.zero_grad()
        loss_fn(model(half(x, rank, world)), half(y, rank, world)).backward()
        if opt is not None:
            opt.step()


def fsdp_worker(local_rank: int, out_dir: str) -> None:
    import hfreduce

    torch.set_num_threads(1)
    hfreduce.init(timeout=60)
    rank = hfreduce.get_rank()
    res: dict = {}
    try:
        # DDP on the same data, as the yardstick
        ddp = DistributedDataParallel(make_net())
        run(ddp, sgd(ddp.parameters()), rank, 0, STEPS)
        res["ddp"] = ddp.state_dict()
        ddp.reducer.stop()

        for name, kw in {
            "fsdp": dict(auto_wrap_policy=POLICY),
            "fsdp_post_prefetch": dict(auto_wrap_policy=POLICY, backward_prefetch=BackwardPrefetch.BACKWARD_POST,
                                       forward_prefetch=False),
            "fsdp_one_unit": dict(),
            "fsdp_size_policy": dict(auto_wrap_policy=functools.partial(size_based_auto_wrap_policy, min_num_params=500)),
        }.items():
            m = make_net()
            if rank == 1:
                with torch.no_grad():
                    for p in m.parameters():
                        p.mul_(3.0)  # rank 0's parameters must win
            f = FullyShardedDataParallel(m, **kw)
            run(f, sgd(f.parameters()), rank, 0, STEPS)
            res[name] = f.full_state_dict()
            res[f"{name}_units"] = len(f.optimizers) or sum(isinstance(x, FullyShardedDataParallel) for x in f.modules())
            res[f"{name}_shard_numel"] = sum(p.numel() for p in f.parameters())
            res[f"{name}_total_numel"] = sum(v.numel() for v in make_net().parameters())

        # the optimizer step of each unit runs during backward
        f = FullyShardedDataParallel(make_net(), auto_wrap_policy=POLICY,
                                     optimizer_in_backward=(torch.optim.SGD, {"lr": 0.2, "momentum": 0.9}))
        run(f, None, rank, 0, STEPS)
        res["fsdp_oib"] = f.full_state_dict()
        res["fsdp_oib_optimizers"] = len(f.optimizers)

        # summon_full_params: full values on every rank; writeback changes this rank's shard
        f = FullyShardedDataParallel(make_net(), auto_wrap_policy=POLICY)
        with f.summon_full_params():
            res["summoned_head"] = f.module.head.weight.clone()
            res["summoned_block0"] = f.module.blocks[0].module.linear1.weight.clone()
            with torch.no_grad():
                f.module.head.weight.fill_(0.25)
        res["after_writeback"] = f.full_state_dict(rank0_only=False)["head.weight"]
        with torch.no_grad():  # forward without autograd (evaluation) works and frees everything
            res["eval_out"] = f(torch.zeros(2, 5, dtype=torch.long))

        # save -> load -> continue, sharded checkpoint (one file per rank, optimizer state included)
        f = FullyShardedDataParallel(make_net(), auto_wrap_policy=POLICY)
        opt = sgd(f.parameters())
        run(f, opt, rank, 0, 2)
        path = os.path.join(out_dir, f"sharded{rank}.pt")
        torch.save({"model": f.sharded_state_dict(), "opt": opt.state_dict()}, path)
        full = f.full_state_dict()
        if rank == 0:
            torch.save(full, os.path.join(out_dir, "full.pt"))
        hfreduce.barrier(timeout=60)
        del f, opt
        ck = torch.load(path)
        f = FullyShardedDataParallel(make_net(), auto_wrap_policy=POLICY)
        f.load_sharded_state_dict(ck["model"])
        opt = sgd(f.parameters())
        opt.load_state_dict(ck["opt"])
        run(f, opt, rank, 2, STEPS + 1)
        res["resumed_sharded"] = f.full_state_dict()

        # full state dict (gathered on rank 0): loads into the plain module and into a new FSDP
        f = FullyShardedDataParallel(make_net(), auto_wrap_policy=POLICY)
        f.load_full_state_dict(torch.load(os.path.join(out_dir, "full.pt")))
        opt = sgd(f.parameters())
        # the shard layout is the same for the same world size; reload the file, because the first
        # resume stepped the momentum buffers that load_state_dict shared with `ck`
        opt.load_state_dict(torch.load(path)["opt"])
        run(f, opt, rank, 2, STEPS + 1)
        res["resumed_full"] = f.full_state_dict()
        # mismatched models across ranks, and tied parameters split across units: clear errors
        try:
            FullyShardedDataParallel(Net(layers=2 if rank == 0 else 1))
            res["mismatch_error"] = None
        except Exception as exc:  # noqa: BLE001
            res["mismatch_error"] = (type(exc).__name__, str(exc))
        tied = make_net()
        tied.head.weight = tied.tok.weight
        try:
            FullyShardedDataParallel(tied, auto_wrap_policy=ModuleWrapPolicy([nn.Linear]))
            res["tied_error"] = None
        except Exception as exc:  # noqa: BLE001
            res["tied_error"] = (type(exc).__name__, str(exc))
        # two forwards, one backward: a clear error (not a silently dropped gradient), then recovery
        x, y = batch(0)
        try:
            (loss_fn(f(half(x, rank)), half(y, rank)) + loss_fn(f(half(x, rank)), half(y, rank))).backward()
            res["two_forwards_error"] = None
        except Exception as exc:  # noqa: BLE001
            res["two_forwards_error"] = (type(exc).__name__, str(exc))
        opt.zero_grad()
        loss_fn(f(half(x, rank)), half(y, rank)).backward()
        res["recovered_grads"] = [p.grad.clone() for p in f.parameters()]
        opt.zero_grad()
        loss_fn(f(half(x, rank)), half(y, rank)).backward()
        res["clean_grads"] = [p.grad.clone() for p in f.parameters()]
        try:
            f.load_full_state_dict({"nope": torch.zeros(1)})
            res["bad_sd_error"] = None
        except Exception as exc:  # noqa: BLE001
            res["bad_sd_error"] = (type(exc).__name__, str(exc))
    except Exception:
        res["worker_error"] = traceback.format_exc()
        raise
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        hfreduce.destroy()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    haiscale.spawn(fsdp_worker, args=(str(out),), nprocs=WORLD, timeout=180)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out



def test_ddp_yardstick_matches_one_process(fsdp_run):
    assert_close_dicts(fsdp_run[0][0]["ddp"], reference())


@pytest.mark.parametrize("variant", ["fsdp", "fsdp_post_prefetch", "fsdp_one_unit", "fsdp_size_policy", "fsdp_oib"])
def test_fsdp_matches_ddp(fsdp_run, variant):
    res, _ = fsdp_run
    assert_close_dicts(res[0][variant], res[0]["ddp"])
    assert res[1][variant] == {}  # the full state dict is gathered on rank 0 only


def test_fsdp_units_follow_the_policy(fsdp_run):
    res, _ = fsdp_run
    assert res[0]["fsdp_units"] == 3  # root + one unit per transformer layer
    assert res[0]["fsdp_one_unit_units"] == 1
    assert res[0]["fsdp_size_policy_units"] >= 3
    assert res[0]["fsdp_oib_optimizers"] == 3


def test_fsdp_holds_one_shard_per_rank(fsdp_run):
    res, _ = fsdp_run
    total = res[0]["fsdp_total_numel"]
    for r in range(WORLD):
        shard = res[r]["fsdp_shard_numel"]
        assert total / WORLD <= shard <= total / WORLD + 3 * WORLD  # 1/N plus padding of 3 units


def test_summon_full_params_and_writeback(fsdp_run):
    res, _ = fsdp_run
    m = make_net()
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["summoned_head"], m.head.weight)
        torch.testing.assert_close(res[r]["summoned_block0"], m.blocks[0].linear1.weight)
        assert torch.equal(res[r]["after_writeback"], torch.full_like(m.head.weight, 0.25))
        assert res[r]["eval_out"].shape == (2, 5, 40)


def test_fsdp_save_load_continue_equals_uninterrupted(fsdp_run):
    res, out = fsdp_run
    want = reference(STEPS + 1)
    assert_close_dicts(res[0]["resumed_sharded"], want)
    assert_close_dicts(res[0]["resumed_full"], want)
    # the full state dict loads into the unwrapped module
    m = make_net()
    m.load_state_dict(torch.load(out / "full.pt"))
    assert_close_dicts(m.state_dict(), reference(2))


def test_fsdp_bad_state_dict_is_named(fsdp_run):
    res, _ = fsdp_run
    for r in range(WORLD):
        name, msg = res[r]["bad_sd_error"]
        assert name == "StateDictError"
        assert "missing" in msg and "nope" in msg


def fsdp_nodes_worker(local_rank: int, out_dir: str) -> None:
    import hfreduce

    torch.set_num_threads(1)
    hfreduce.init(timeout=60)
    rank, world = hfreduce.get_rank(), hfreduce.get_world_size()
    res = {"info": {k: hfreduce.info()[k] for k in ("nodes", "local_world_size")}}
    try:
        f = FullyShardedDataParallel(make_net(), auto_wrap_policy=POLICY)
        run(f, sgd(f.parameters()), rank, 0, STEPS, world)
        res["fsdp"] = f.full_state_dict()
        res["shard_numel"] = sum(p.numel() for p in f.parameters())
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        hfreduce.destroy()


def test_fsdp_two_emulated_nodes_two_ranks_each(tmp_path):
    from hfreduce.testing import LOCAL_CLUSTER

    haiscale.spawn(fsdp_nodes_worker, args=(str(tmp_path),), nprocs=2, nnodes=2, cluster=LOCAL_CLUSTER, timeout=180)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    assert len(res[0]["info"]["nodes"]) == 2 and res[0]["info"]["local_world_size"] == 2
    assert_close_dicts(res[0]["fsdp"], reference())
    total = sum(v.numel() for v in make_net().parameters())
    assert all(total / 4 <= r["shard_numel"] <= total / 4 + 12 for r in res)


def test_fsdp_wrong_usage_errors(fsdp_run):
    res, _ = fsdp_run
    for r in range(WORLD):
        name, msg = res[r]["mismatch_error"]
        assert name == "ModelMismatchError" and "rank 1" in msg
        name, msg = res[r]["tied_error"]
        assert name == "UsageError" and "tok.weight" in msg and "shared" in msg


def test_fsdp_two_forwards_before_backward_is_refused(fsdp_run):
    res, _ = fsdp_run
    for r in range(WORLD):
        name, msg = res[r]["two_forwards_error"]
        assert name == "UsageError" and "earlier forward" in msg
        for got, want in zip(res[r]["recovered_grads"], res[r]["clean_grads"], strict=True):
            torch.testing.assert_close(got, want)  # nothing of the aborted backward leaked in


def test_fsdp_rejects_meta_device_module():
    from haiscale.errors import DeviceError

    with pytest.raises(DeviceError, match="meta device"):
        FullyShardedDataParallel(nn.Linear(3, 3, device="meta"))


def test_fsdp_rejects_double_wrap():
    from haiscale.errors import UsageError

    class Fake(FullyShardedDataParallel):
        def __init__(self):  # no group needed to check the argument
            nn.Module.__init__(self)

    with pytest.raises(UsageError, match="already wrapped"):
        FullyShardedDataParallel(Fake())


def test_non_strict_full_load_keeps_a_loaded_tied_weight():
    """head.weight is tied to tok.weight and missing from the checkpoint (as is common): the loaded
    tok.weight must win, not the old value kept for the missing alias."""
    import hfreduce

    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, i):
            return self.head(self.tok(i))

    hfreduce.init(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=0)
    try:
        f = FullyShardedDataParallel(T())
        f.load_full_state_dict({"tok.weight": torch.ones(5, 3)}, strict=False)
        with f.summon_full_params():
            assert torch.equal(f.module.tok.weight, torch.ones(5, 3))
            assert torch.equal(f.module.head.weight, torch.ones(5, 3))
    finally:
        hfreduce.destroy()


def test_gathered_parameters_are_freed_between_forward_and_backward():
    """ZeRO-3's memory saving: after a unit's forward its gathered buffer is gone (autograd keeps
    only references, re-gathered in backward), and gradients are still right."""
    import copy
    import gc
    import weakref

    import hfreduce

    hfreduce.init(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=0)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        ref = copy.deepcopy(net)
        f = FullyShardedDataParallel(net, auto_wrap_policy=ModuleWrapPolicy([nn.Linear]))
        units = [u.unit for u in f._shared.units if not u.is_root]
        assert len(units) == 3
        gathered: list[weakref.ref] = []
        for unit in units:
            orig = unit.wait_unshard

            def spy(orig=orig, unit=unit):
                orig()
                if unit.full is not None:
                    gathered.append(weakref.ref(unit.full))
            unit.wait_unshard = spy
        router = f._shared.router
        packed: list = []
        real_pack = router.pack
        router.pack = lambda t: (packed.append(r := real_pack(t)), r)[1]
        x = torch.randn(4, 8)
        out = f(x).sum()
        gc.collect()
        # the weights autograd saves (those of the layers after the first: the input needs no
        # gradient) are saved by reference into their unit's (freed) buffer, not as tensors
        assert {p[0] for p in packed if isinstance(p, tuple)} == set(units[1:])
        assert len(gathered) >= 3
        assert all(w() is None for w in gathered), "a gathered unit buffer outlived its forward"
        out.backward()  # re-gathers from the shards: the gradients exist and match a plain model
        ref(x).sum().backward()
        grads = [p.grad for p in f.parameters() if p.grad is not None]  # (the root unit owns no parameter)
        assert len(grads) == 3
        want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
        got = torch.cat([g.reshape(-1) for g in grads])
        assert torch.allclose(torch.sort(got[got != 0]).values, torch.sort(want[want != 0]).values, atol=1e-6)
    finally:
        hfreduce.destroy()
