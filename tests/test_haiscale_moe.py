"""haiscale.moe: the DeepSeekMoE layer computes what a per-token loop computes; expert parallelism
on 2 and 4 real processes over hfreduce's all_to_all gives the outputs and gradients of the same
layer on one process; Loss-Free Balancing's bias moves by u * sign(mean load - load) with loads
summed over ranks and never touches the gate weights; the bias survives a state_dict round trip;
no routed copy is dropped unless a capacity factor asks for it.

Tolerances: the expert-parallel run multiplies the same rows by the same weights, but in batches
of a different size and order (the rows of all ranks meet at the expert's rank), so float32
matmuls round differently (blocking) and weight gradients sum their rows in another order: the
results agree to float32 rounding of a sum of a few dozen terms (atol 1e-5 on values of order 1),
not bit for bit. Routing itself is identical: it is computed per token from the same scores.
"""

from __future__ import annotations

import os
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import haiscale  # noqa: E402
from haiscale.errors import UsageError  # noqa: E402
from haiscale.moe import DeepSeekMoE, _swiglu, maxvio, sync_grads, update_balance  # noqa: E402

D, FF = 16, 64
CFG = dict(d_model=D, d_ff=FF, n_experts=4, top_k=1, granularity=2, n_shared=1)  # 8 routed, top-2
TOKENS = 24  # per rank: divisible by 1, 2 and 4 ranks' splits of the 4-rank batch
ATOL, RTOL = 1e-5, 1e-4


def make_layer(**kw) -> DeepSeekMoE:
    torch.manual_seed(0)
    return DeepSeekMoE(**{**CFG, **kw})


def data(world: int, step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world * TOKENS, D, generator=g)
    return x, torch.randn(world * TOKENS, D, generator=g)


def per_token(m: DeepSeekMoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's function written token by token (one process, all experts)."""
    _, idx, w = m.route(x)
    rows = []
    for t in range(x.shape[0]):
        y = sum(w[t, j] * _swiglu(x[t:t + 1], m.w1[e], m.w3[e], m.w2[e])[0] for j, e in enumerate(idx[t].tolist()))
        rows.append(y)
    return torch.stack(rows) + _swiglu(x, m.shared_w1, m.shared_w3, m.shared_w2)


# -- one process --------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_moe_layer_equals_per_token_loop(score_func):
    m = make_layer(score_func=score_func, expert_parallel=False)
    x, _ = data(1, 0)
    y = m(x)
    torch.testing.assert_close(y, per_token(m, x), atol=ATOL, rtol=RTOL)
    assert m.n_experts == 8 and m.top_k == 2 and m.hidden == FF // 2  # fine-grained: m=2 split, top-mK
    _, idx, w = m.route(x)
    assert idx.shape == (TOKENS, 2)
    if score_func == "sigmoid":  # V3: the chosen affinities normalised
        torch.testing.assert_close(w.sum(-1), torch.ones(TOKENS))
    else:  # DeepSeekMoE: raw softmax probabilities of the chosen experts
        assert (w.sum(-1) < 1).all()


def test_lfb_bias_update_rule_and_gate_weights_unbiased():
    m = make_layer(expert_parallel=False, bias_update_speed=1e-3)
    x, _ = data(1, 0)
    m(x)
    m(x)  # loads of both forwards count for the next update
    load = m.stats.epoch_load.astype(np.float64)
    assert load.sum() == 2 * TOKENS * m.top_k
    before = m.expert_bias.clone()
    update_balance(m)
    want = before + 1e-3 * torch.from_numpy(np.sign(load.mean() - load)).float()
    torch.testing.assert_close(m.expert_bias, want, atol=0, rtol=0)
    assert (m.expert_bias[load > load.mean()] < 0).all() and (m.expert_bias[load < load.mean()] > 0).all()
    update_balance(m)  # no forward since: nothing to move
    torch.testing.assert_close(m.expert_bias, want, atol=0, rtol=0)

    # a large bias changes the choice, never the weights: gate weights are the unbiased scores
    scores, _, _ = m.route(x)
    with torch.no_grad():
        m.expert_bias.zero_()
        m.expert_bias[7] = 10.0
    _, idx, w = m.route(x)
    assert (idx == 7).any(-1).all()  # every token now picks expert 7 ...
    got = w * scores.gather(1, idx).sum(-1, keepdim=True)  # undo the normalisation
    torch.testing.assert_close(got, scores.gather(1, idx))  # ... with its unbiased score


def test_bias_not_updated_without_lfb_and_aux_loss_has_gradient():
    m = make_layer(expert_parallel=False, balance="aux", aux_loss_coef=0.1)
    x, _ = data(1, 0)
    m(x)
    update_balance(m)
    assert (m.expert_bias == 0).all()
    assert m.aux_loss.item() > 0
    m.aux_loss.backward()
    assert m.gate.grad is not None and m.gate.grad.abs().sum() > 0


def test_state_dict_round_trip_keeps_bias():
    m = make_layer(expert_parallel=False)
    for step in range(3):
        m(data(1, step)[0])
        update_balance(m)
    sd = m.state_dict()
    assert "expert_bias" in sd and sd["expert_bias"].abs().sum() > 0
    torch.manual_seed(1)
    other = DeepSeekMoE(**CFG, expert_parallel=False)
    other.load_state_dict(sd)
    x = data(1, 9)[0]
    torch.testing.assert_close(other(x), m(x), atol=0, rtol=0)
    torch.testing.assert_close(other.expert_bias, m.expert_bias, atol=0, rtol=0)


def test_no_token_dropped_by_default_and_capacity_factor_drops_and_counts():
    m = make_layer(expert_parallel=False)
    with torch.no_grad():
        m.expert_bias[0] = m.expert_bias[1] = 10.0  # every token routes to experts 0 and 1
    x = data(1, 0)[0]
    y = m(x)
    assert m.stats.dropped == 0 and m.last_load[0] == TOKENS and m.last_load[1] == TOKENS
    torch.testing.assert_close(y, per_token(m, x), atol=ATOL, rtol=RTOL)
    assert m.stats.maxvio_batch == pytest.approx(8 / 2 - 1)  # 2 of 8 experts take everything

    capped = make_layer(expert_parallel=False, capacity_factor=1.0)
    capped.load_state_dict(m.state_dict())
    capped(x)
    cap = int(np.ceil(TOKENS * 2 / 8))  # 6 copies per expert
    assert capped.stats.dropped == 2 * (TOKENS - cap)


def test_maxvio_and_usage_errors():
    assert maxvio([2, 2, 2, 2]) == 0.0
    assert maxvio([4, 2, 1, 1]) == pytest.approx(1.0)
    with pytest.raises(UsageError, match="granularity"):
        DeepSeekMoE(D, 30, 4, 1, granularity=4, expert_parallel=False)
    with pytest.raises(UsageError, match="score_func"):
        DeepSeekMoE(D, FF, 4, 1, score_func="relu", expert_parallel=False)


# -- expert parallelism on 2 and 4 processes ---------------------------------------------------
STEPS = 2


def run_steps(m: DeepSeekMoE, rank: int, world: int, full_world: int) -> dict:
    """STEPS forward/backward/SGD/LFB steps on rank ``rank``'s slice of a ``full_world`` batch."""
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    res: dict = {"out": [], "grads": []}
    share = TOKENS * full_world // world
    for step in range(STEPS):
        x, t = data(full_world, step)
        x, t = x[rank * share:(rank + 1) * share], t[rank * share:(rank + 1) * share]
        opt.zero_grad()
        y = m(x)
        (y * t).sum().div(TOKENS * full_world).mul(world).backward()  # mean over ranks = global mean
        sync_grads(m)
        res["out"].append(y.detach().clone())
        res["grads"].append({n: p.grad.clone() for n, p in m.named_parameters()})
        opt.step()
        update_balance(m)
    res["bias"] = m.expert_bias.clone()
    res["state"] = {k: v.clone() for k, v in m.state_dict().items()}
    return res


def moe_worker(local_rank: int, out_dir: str) -> None:
    import hfreduce

    torch.set_num_threads(1)
    hfreduce.init(timeout=60)
    rank, world = hfreduce.get_rank(), hfreduce.get_world_size()
    res: dict = {}
    try:
        res["lfb"] = run_steps(make_layer(), rank, world, world)
        # skewed: every token to experts 0 and 1 (rank 0's), so other ranks receive no rows
        m = make_layer(balance=None)
        with torch.no_grad():
            m.expert_bias[0] = m.expert_bias[1] = 10.0
        m.balance = "lfb"  # the bias steers the choice; not updated below (no update_balance)
        x = data(world, 5)[0][rank * TOKENS:(rank + 1) * TOKENS].requires_grad_()
        y = m(x)
        y.sum().backward()
        res["skew"] = {"out": y.detach(), "xgrad": x.grad.clone(), "dropped": m.stats.dropped,
                       "load": torch.from_numpy(m.last_load.copy())}
    except Exception:
        res["worker_error"] = traceback.format_exc()
        raise
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        hfreduce.destroy()


def expert_slice(name: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if name in ("w1", "w3", "w2"):
        n = t.shape[0] // world
        return t[rank * n:(rank + 1) * n]
    return t


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_process(tmp_path, world):
    haiscale.spawn(moe_worker, args=(str(tmp_path),), nprocs=world, timeout=180)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    want = run_steps(make_layer(expert_parallel=False), 0, 1, world)
    for r, res in enumerate(got):
        lfb = res["lfb"]
        for step in range(STEPS):
            torch.testing.assert_close(lfb["out"][step], want["out"][step][r * TOKENS:(r + 1) * TOKENS],
                                       atol=ATOL, rtol=RTOL)
            for n, g in lfb["grads"][step].items():
                torch.testing.assert_close(g, expert_slice(n, want["grads"][step][n], r, world), atol=ATOL, rtol=RTOL,
                                           msg=lambda m, n=n, s=step, r=r: f"rank {r} step {s} grad {n}: {m}")
        # the bias moved on global loads: identical on every rank and equal to one process's
        torch.testing.assert_close(lfb["bias"], want["bias"], atol=0, rtol=0)
        assert lfb["bias"].abs().sum() > 0
        for n, v in lfb["state"].items():
            torch.testing.assert_close(v, expert_slice(n, want["state"][n], r, world), atol=ATOL, rtol=RTOL)

    # skewed routing: no token dropped, ranks without work still take part, same as one process
    ref = make_layer(balance=None, expert_parallel=False)
    with torch.no_grad():
        ref.expert_bias[0] = ref.expert_bias[1] = 10.0
    ref.balance = "lfb"
    x = data(world, 5)[0].requires_grad_()
    y = ref(x)
    y.sum().backward()
    for r, res in enumerate(got):
        s = res["skew"]
        assert s["dropped"] == 0
        assert s["load"][0] == world * TOKENS and s["load"][2:].sum() == 0
        torch.testing.assert_close(s["out"], y.detach()[r * TOKENS:(r + 1) * TOKENS], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(s["xgrad"], x.grad[r * TOKENS:(r + 1) * TOKENS], atol=ATOL, rtol=RTOL)


def test_example_moe_lm_trains_on_two_ranks(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "moe_lm.py"), "--steps", "26",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and losses[1] < losses[0] - 1.0  # it learns the chain
    assert "validation loss" in proc.stdout
    ck = [torch.load(tmp_path / f"moe_lm.rank{r}.pt") for r in range(2)]
    a, b = ck[0]["model"], ck[1]["model"]
    assert a["moe.0.w1"].shape[0] == 8  # 16 routed experts, 8 per rank
    assert not torch.equal(a["moe.0.w1"], b["moe.0.w1"])  # each rank its own experts
    torch.testing.assert_close(a["moe.0.gate"], b["moe.0.gate"], atol=0, rtol=0)  # replicated, in sync
    torch.testing.assert_close(a["moe.1.expert_bias"], b["moe.1.expert_bias"], atol=0, rtol=0)
    assert a["moe.1.expert_bias"].abs().sum() > 0
