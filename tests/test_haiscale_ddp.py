"""haiscale DDP: 2 real processes on hfreduce must end where one process training on the
concatenated batch ends (MLP, a small transformer, a model with unused parameters), no_sync must
accumulate like one big batch, and wrong usage must fail with a clear error."""

from __future__ import annotations

import os
import traceback

import pytest

torch = pytest.importorskip("torch")
from _haiscale_checks import ATOL, RTOL, assert_close_dicts  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402
from haiscale.ddp import DistributedDataParallel, assign_buckets  # noqa: E402
from haiscale.errors import DeviceError, NotInitializedError, UsageError  # noqa: E402

WORLD = 2
STEPS = 3


# -- models and data, shared by the workers and the single-process reference ----------------------
def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, seq: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.block = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.tok(x) + self.pos[: x.shape[1]]
        return self.head(self.ln(self.block(h)))


def make_transformer() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer()


class WithUnused(nn.Module):
    """``spare`` is never used; ``sometimes`` only when the batch's first value is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.spare = nn.Linear(8, 8)
        self.sometimes = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x[0, 0] > 0:
            h = h + self.sometimes(h)
        return self.b(h)


class MixedDtypes(nn.Module):
    """A float64 branch and a bfloat16 branch: two bucket dtypes, one of them without numpy twin."""

    def __init__(self) -> None:
        super().__init__()
        self.f64 = nn.Linear(12, 3).double()
        self.bf16 = nn.Linear(12, 3).to(torch.bfloat16)

    def forward(self, x):  # separate outputs: float64 gradients stay free of bfloat16 rounding
        return self.f64(x.double()), self.bf16(x.to(torch.bfloat16)).float()


def make_mixed() -> nn.Module:
    torch.manual_seed(0)
    return MixedDtypes()


def make_unused() -> nn.Module:
    torch.manual_seed(0)
    return WithUnused()


def batch(kind: str, step: int, n: int = 8):
    g = torch.Generator().manual_seed(1000 * step + 7)
    if kind in ("mlp", "mixed"):
        return torch.randn(n, 12, generator=g), torch.randn(n, 3, generator=g)
    if kind == "transformer":
        x = torch.randint(0, 50, (n, 6), generator=g)
        return x, torch.randint(0, 50, (n, 6), generator=g)
    x = torch.randn(n, 6, generator=g)
    x[0, 0] = 1.0 if step % 2 == 0 else -1.0  # rank 0's half decides whether `sometimes` is used
    x[n // 2, 0] = -1.0  # rank 1 never uses it
    return x, torch.randn(n, 2, generator=g)


def loss_fn(kind: str, out, y):
    if kind == "mixed":
        return ((out[0] - y.double()) ** 2).mean() + ((out[1] - y) ** 2).mean()
    if kind == "transformer":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return ((out - y) ** 2).mean()


def split(t, rank: int, world: int = WORLD):
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def optimizer_for(kind: str, params):
    # SGD, not Adam: Adam turns rounding noise on gradients that are zero in exact arithmetic (the
    # attention key bias) into full-size steps, so no tolerance could compare the runs
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


MAKERS = {"mlp": make_mlp, "transformer": make_transformer, "unused": make_unused, "mixed": make_mixed}


def reference(kind: str, steps: int = STEPS) -> dict:
    """One process, the whole (concatenated) batch."""
    m = MAKERS[kind]()
    opt = optimizer_for(kind, m.parameters())
    for step in range(steps):
        x, y = batch(kind, step)
        opt.zero_grad()
        if kind == "unused":
            loss = sum(loss_fn(kind, m(split(x, r)), split(y, r)) for r in range(WORLD)) / WORLD
        else:  # (the unused model branches per half, so its batch loss is the mean of the halves')
            loss = loss_fn(kind, m(x), y)
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in m.state_dict().items()}


# -- the 2-rank run (one spawn, every scenario) -----------------------------------------------------
def train_ddp(kind: str, rank: int, steps: int = STEPS, start: int = 0, state: dict | None = None, **kw):
    m = MAKERS[kind]()
    if state is not None:
        m.load_state_dict(state["model"])
    elif rank == 1:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5)  # rank 0's initial parameters must win (broadcast at wrap time)
    ddp = DistributedDataParallel(m, bucket_cap_mb=0.004, first_bucket_cap_mb=0.001, **kw)
    opt = optimizer_for(kind, ddp.parameters())
    if state is not None:
        opt.load_state_dict(state["opt"])
    ddp.last_optimizer = opt
    for step in range(start, steps):
        x, y = batch(kind, step)
        opt.zero_grad()
        loss_fn(kind, ddp(split(x, rank)), split(y, rank)).backward()
        opt.step()
    return ddp


def ddp_worker(local_rank: int, out_dir: str) -> None:
    import hfreduce

    torch.set_num_threads(1)
    hfreduce.init(timeout=60)
    rank = hfreduce.get_rank()
    res: dict = {}
    try:
        for kind in ("mlp", "transformer"):
            ddp = train_ddp(kind, rank)
            res[kind] = ddp.state_dict()
            res[f"{kind}_buckets"] = len(ddp.reducer.buckets)
            ddp.reducer.stop()
        ddp = train_ddp("mixed", rank)
        res["mixed"] = ddp.state_dict()
        res["mixed_bucket_dtypes"] = sorted(str(b.dtype) for b in ddp.reducer.buckets)
        ddp.reducer.stop()
        ddp = train_ddp("unused", rank, find_unused_parameters=True)
        res["unused"] = ddp.state_dict()
        res["unused_spare_grad"] = ddp.module.spare.weight.grad
        ddp.reducer.stop()

        # unused parameters without find_unused_parameters: a clear error naming them
        ddp = DistributedDataParallel(make_unused())
        x, y = batch("unused", 1)
        try:
            loss_fn("unused", ddp(split(x, rank)), split(y, rank)).backward()
            res["unused_error"] = None
        except Exception as exc:  # noqa: BLE001
            res["unused_error"] = (type(exc).__name__, str(exc))
        ddp.reducer.stop()

        # no_sync: micro-batch 1 accumulates locally, micro-batch 2 syncs
        ddp = DistributedDataParallel(make_mlp())
        x1, y1 = batch("mlp", 0)
        x2, y2 = batch("mlp", 1)
        with ddp.no_sync():
            (loss_fn("mlp", ddp(split(x1, rank)), split(y1, rank)) / 2).backward()
        res["no_sync_local"] = [p.grad.clone() for p in ddp.parameters()]
        (loss_fn("mlp", ddp(split(x2, rank)), split(y2, rank)) / 2).backward()
        res["no_sync_grads"] = [p.grad.clone() for p in ddp.parameters()]
        res["grad_in_bucket"] = all(
            p.grad.data_ptr() == v.data_ptr() for p, v in zip(ddp.reducer.params, ddp.reducer.views, strict=True)
        )
        ddp.reducer.stop()

        # save -> load -> continue == uninterrupted
        ddp = train_ddp("mlp", rank, steps=2)
        ck_path = os.path.join(out_dir, f"ck{rank}.pt")
        torch.save({"model": ddp.state_dict(), "opt": ddp.last_optimizer.state_dict()}, ck_path)
        ddp.reducer.stop()
        del ddp
        ddp = train_ddp("mlp", rank, steps=STEPS + 1, start=2, state=torch.load(ck_path))
        res["resumed"] = ddp.state_dict()
        ddp.reducer.stop()

        # mismatched models across ranks: every rank gets ModelMismatchError
        other = make_mlp() if rank == 0 else nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
        try:
            DistributedDataParallel(other)
            res["mismatch_error"] = None
        except Exception as exc:  # noqa: BLE001
            res["mismatch_error"] = (type(exc).__name__, str(exc))
    except Exception:
        res["worker_error"] = traceback.format_exc()
        raise
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        hfreduce.destroy()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    haiscale.spawn(ddp_worker, args=(str(out),), nprocs=WORLD, timeout=180)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]



@pytest.mark.parametrize("kind", ["mlp", "transformer", "unused"])
def test_ddp_two_ranks_equal_one_process_on_concatenated_batch(ddp_run, kind):
    want = reference(kind)
    for r in range(WORLD):
        assert_close_dicts(ddp_run[r][kind], want)


def test_ddp_float64_and_bfloat16_buckets(ddp_run):
    want = reference("mixed")
    assert ddp_run[0]["mixed_bucket_dtypes"] == ["torch.bfloat16", "torch.float64"]
    for r in range(WORLD):
        got = ddp_run[r]["mixed"]
        for k in want:
            tol = dict(atol=1e-10, rtol=1e-10) if want[k].dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
            assert got[k].dtype == want[k].dtype
            torch.testing.assert_close(got[k], want[k], **tol)


def test_ddp_uses_several_buckets(ddp_run):
    # the tiny bucket cap forces several buckets, so ordering and per-bucket launch are exercised
    assert ddp_run[0]["mlp_buckets"] >= 3
    assert ddp_run[0]["transformer_buckets"] >= 3


def test_ddp_globally_unused_parameter_keeps_grad_none(ddp_run):
    for r in range(WORLD):
        assert ddp_run[r]["unused_spare_grad"] is None


def test_ddp_unused_parameters_error_names_them(ddp_run):
    for r in range(WORLD):
        name, msg = ddp_run[r]["unused_error"]
        assert name == "UnusedParametersError"
        assert "spare.weight" in msg and "spare.bias" in msg and "find_unused_parameters=True" in msg


def test_ddp_no_sync_accumulation_matches_big_batch(ddp_run):
    m = make_mlp()
    x1, y1 = batch("mlp", 0)
    x2, y2 = batch("mlp", 1)
    (loss_fn("mlp", m(x1), y1) / 2 + loss_fn("mlp", m(x2), y2) / 2).backward()
    want = [p.grad for p in m.parameters()]
    for r in range(WORLD):
        for g, w in zip(ddp_run[r]["no_sync_grads"], want, strict=True):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)
        assert ddp_run[r]["grad_in_bucket"]
    # inside no_sync nothing was reduced: the ranks' local gradients differ
    assert not torch.allclose(ddp_run[0]["no_sync_local"][0], ddp_run[1]["no_sync_local"][0])


def test_ddp_save_load_continue_equals_uninterrupted(ddp_run):
    want = reference("mlp", steps=STEPS + 1)
    for r in range(WORLD):
        assert_close_dicts(ddp_run[r]["resumed"], want)


def test_ddp_mismatched_models_raise_on_every_rank(ddp_run):
    for r in range(WORLD):
        name, msg = ddp_run[r]["mismatch_error"]
        assert name == "ModelMismatchError"
        assert "rank 1" in msg


def ddp_nodes_worker(local_rank: int, out_dir: str) -> None:
    import hfreduce

    torch.set_num_threads(1)
    hfreduce.init(timeout=60)
    rank = hfreduce.get_rank()
    res = {"info": {k: hfreduce.info()[k] for k in ("nodes", "node", "local_world_size")}}
    try:
        for kind in ("mlp", "transformer"):
            ddp = train_ddp(kind, rank)
            res[kind] = ddp.state_dict()
            ddp.reducer.stop()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        hfreduce.destroy()


def test_ddp_two_emulated_nodes_one_rank_each(tmp_path):
    from hfreduce.testing import LOCAL_CLUSTER

    haiscale.spawn(ddp_nodes_worker, args=(str(tmp_path),), nprocs=1, nnodes=2, cluster=LOCAL_CLUSTER, timeout=180)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(res[0]["info"]["nodes"]) == 2 and res[0]["info"]["local_world_size"] == 1
    assert res[0]["info"]["node"] != res[1]["info"]["node"]
    for kind in ("mlp", "transformer"):
        want = reference(kind)
        for r in range(2):
            assert_close_dicts(res[r][kind], want)


def dead_peer_worker(local_rank: int, out_dir: str) -> None:
    import hfreduce

    torch.set_num_threads(1)
    hfreduce.init(timeout=5)
    rank = hfreduce.get_rank()
    ddp = DistributedDataParallel(make_mlp(), timeout=30)
    x, y = batch("mlp", 0)
    loss_fn("mlp", ddp(split(x, rank)), split(y, rank)).backward()
    if rank == 1:
        os._exit(0)  # dies without a word (exit code 0, so spawn lets rank 0 run on)
    res = {}
    try:
        for step in range(1, 4):
            x, y = batch("mlp", step)
            loss_fn("mlp", ddp(split(x, rank)), split(y, rank)).backward()
        res["error"] = None
    except Exception as exc:  # noqa: BLE001
        res["error"] = (type(exc).__name__, str(exc))
    torch.save(res, os.path.join(out_dir, "survivor.pt"))
    os._exit(0)  # the group is broken: skip the orderly teardown


def test_ddp_dead_peer_becomes_an_error_not_a_hang(tmp_path):
    haiscale.spawn(dead_peer_worker, args=(str(tmp_path),), nprocs=2, timeout=120)
    name, msg = torch.load(tmp_path / "survivor.pt")["error"]
    assert name == "CommunicationError", msg
    assert "rank 0" in msg and "allreduce" in msg


# -- in-process checks (no hfreduce group needed) ---------------------------------------------------
def test_buckets_follow_reverse_registration_order_and_cap():
    ps = [nn.Parameter(torch.zeros(n)) for n in (10, 20, 30, 40)]
    b = assign_buckets(ps, cap_bytes=4 * 50, first_cap_bytes=4 * 40)
    assert b == [[3], [2, 1], [0]]
    assert sorted(i for bb in b for i in bb) == [0, 1, 2, 3]


def test_ddp_rejects_meta_device_module():
    m = nn.Linear(3, 3, device="meta")
    with pytest.raises(DeviceError, match="meta device"):
        DistributedDataParallel(m)


def test_ddp_rejects_device_ids_for_cpu_module():
    with pytest.raises(DeviceError, match="device_ids"):
        DistributedDataParallel(nn.Linear(3, 3), device_ids=[0])


def test_ddp_without_process_group_says_how_to_init():
    import hfreduce

    if hfreduce.is_initialized():
        pytest.skip("an hfreduce group exists in this process")
    with pytest.raises(NotInitializedError, match="hfreduce.init"):
        DistributedDataParallel(nn.Linear(3, 3))


def test_ddp_rejects_non_module():
    with pytest.raises(UsageError, match="nn.Module"):
        DistributedDataParallel(lambda x: x)  # type: ignore[arg-type]


def test_no_sync_gradient_survives_a_step_where_the_parameter_is_unused():
    """A parameter used only in the no_sync micro-batch keeps its accumulated gradient (torch DDP's
    behaviour) when the synced micro-batch leaves it unused under find_unused_parameters."""
    import hfreduce

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x, use_b):
            return self.a(x) + (self.b(x) if use_b else 0)

    hfreduce.init(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=0)
    try:
        torch.manual_seed(0)
        m, ref = M(), M()
        ref.load_state_dict(m.state_dict())
        d = DistributedDataParallel(m, find_unused_parameters=True)
        x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
        with d.no_sync():
            d(x1, True).sum().backward()
        d(x2, False).sum().backward()
        ref(x1, True).sum().backward()
        ref(x2, False).sum().backward()
        assert m.b.weight.grad.abs().sum() > 0
        assert_close_dicts({n: p.grad for n, p in m.named_parameters()},
                           {n: p.grad for n, p in ref.named_parameters()})
        d.reducer.stop()
    finally:
        hfreduce.destroy()
