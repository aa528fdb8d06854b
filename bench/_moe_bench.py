"""bench/moe.py parts (b) and (c): the haiscale.moe layer with expert parallelism on hfreduce vs the
same layer on torch.distributed gloo, and Loss-Free Balancing vs the auxiliary loss.

(b) One ``DeepSeekMoE`` layer, 2 ranks, forward + backward per step. The layer is the same code in
    both runs; only its ``comm`` differs: haiscale's ``Comm`` (hfreduce all_to_all / allgather) or
    ``GlooComm`` below (``all_to_all_single`` / ``all_gather_into_tensor`` on gloo). The shape is
    communication-heavy, as expert parallelism is at scale (wide d_model, small fine-grained
    experts, top-8 routing): each step moves every routed copy of a token out and back, forward
    and backward (4 all_to_alls of ~half the routed rows).
(c) A small MoE language model (2 MoE blocks) trained twice on the same synthetic corpus, same
    seed, same steps: ``balance="lfb"`` (u = 1e-2: the paper's 1e-3 suits runs of thousands of
    steps; in a 200-400-step run the bias would spend the run catching up) against ``balance="aux"`` (alpha = 1e-3, the
    coefficient of the LFB paper's auxiliary-loss baseline). MaxVio over the run is the mean of the
    per-batch MaxVio over training steps and layers (the paper's MaxVio_batch); MaxVio_global over
    the validation set and the validation loss are reported too; "no worse" allows 2 standard errors
    of the paired per-token difference. One process: balancing does not
    depend on expert parallelism (the loads are global either way).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import haiscale  # noqa: E402
from haiscale.moe import DeepSeekMoE, aux_losses, moe_layers, update_balance  # noqa: E402

WORLD = 2


class GlooComm:
    """The calls DeepSeekMoE makes, on torch.distributed (gloo): the peer of haiscale's Comm."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_to_all(self, out, inp, out_splits=None, in_splits=None, async_op=False):  # noqa: ANN001
        self.dist.all_to_all_single(out, inp, out_splits, in_splits)

    def allgather(self, out, inp, async_op=False):  # noqa: ANN001
        self.dist.all_gather_into_tensor(torch.from_numpy(out), torch.from_numpy(inp))


class TimedComm:
    """Wraps a comm: seconds spent in the layer's exchanges (all_to_all and the count allgather)."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.rank, self.world_size, self.seconds = inner, inner.rank, inner.world_size, 0.0

    def all_to_all(self, *a, **kw):  # noqa: ANN002, ANN003
        t0 = time.perf_counter()
        self.inner.all_to_all(*a, **kw)
        self.seconds += time.perf_counter() - t0

    def allgather(self, *a, **kw):  # noqa: ANN002, ANN003
        t0 = time.perf_counter()
        self.inner.allgather(*a, **kw)
        self.seconds += time.perf_counter() - t0


# -- (b) --------------------------------------------------------------------------------------
def layer_cfg(quick: bool) -> dict:
    """[Note: a communication-bound shape] On a GPU an expert's matmuls take about as long as the
    all_to_alls that feed it; a CPU core multiplies thousands of times slower while its memory
    exchange is only 10-20x slower than NVLink/InfiniBand, so experts of realistic width would make
    this a matmul benchmark in which any all_to_all looks alike. Tiny experts (hidden
    16) on wide tokens (d_model 2048) restore the GPU-like balance where the exchange matters."""
    # 32 routed experts of hidden 16 (8 experts of 64 split 4 ways), top-8, d_model 2048: see
    # [Note: a communication-bound shape]
    cfg = {"d_model": 2048, "d_ff": 64, "n_experts": 8, "top_k": 2, "granularity": 4, "n_shared": 0}
    return {"layer": cfg, "tokens": 1024 if quick else 2048, "warmup": 1, "steps": 4 if quick else 9}


def layer_worker(local_rank: int, cfg: dict, gloo_port: int, out_dir: str) -> None:
    """Both peers in the same processes: two identical layers, one on hfreduce and one on gloo,
    stepped alternately (h, g, h, g, ...), so machine load drifts hit both alike."""
    import datetime
    import warnings

    import torch.distributed as dist

    import hfreduce
    from haiscale._comm import Comm

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    rank = int(os.environ["RANK"])
    hfreduce.init(timeout=300)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    layers = {}
    for kind, comm in (("hfreduce", Comm()), ("gloo", GlooComm())):
        torch.manual_seed(0)
        layers[kind] = DeepSeekMoE(**cfg["layer"], comm=TimedComm(comm))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(cfg["tokens"], cfg["layer"]["d_model"], generator=g)
    res: dict[str, dict[str, list[float]]] = {k: {"step_s": [], "comm_s": []} for k in layers}
    for i in range(cfg["warmup"] + cfg["steps"]):
        for kind, layer in layers.items():
            comm = layer.comm
            t0, comm.seconds = time.perf_counter(), 0.0
            layer.zero_grad(set_to_none=False)
            layer(x).square().mean().backward()
            if i >= cfg["warmup"]:
                res[kind]["step_s"].append(time.perf_counter() - t0)
                res[kind]["comm_s"].append(comm.seconds)
    Path(out_dir, f"layer.{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()
    hfreduce.destroy()


def section_b(args) -> dict:  # noqa: ANN001
    import tempfile

    from haiscale.spawn import _free_port

    cfg = layer_cfg(args.quick)
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as out:
        haiscale.spawn(layer_worker, args=(cfg, _free_port("127.0.0.1"), out), nprocs=WORLD, timeout=900)
        ranks = [json.loads(Path(out, f"layer.{r}.json").read_text()) for r in range(WORLD)]
    # per step, the slowest rank; the ratio of each adjacent (hfreduce, gloo) pair; medians
    per = {k: {m: [max(vals) for vals in zip(*(r[k][m] for r in ranks), strict=True)] for m in ("step_s", "comm_s")}
           for k in ("hfreduce", "gloo")}
    pairs = [g / h for h, g in zip(per["hfreduce"]["step_s"], per["gloo"]["step_s"], strict=True)]
    hf, gl = statistics.median(per["hfreduce"]["step_s"]), statistics.median(per["gloo"]["step_s"])
    chf, cgl = statistics.median(per["hfreduce"]["comm_s"]), statistics.median(per["gloo"]["comm_s"])
    speedup = statistics.median(pairs)
    lc = cfg["layer"]
    rows = cfg["tokens"] * lc["top_k"] * lc["granularity"]
    print(f"(b) MoE layer fwd+bwd, 2 ranks, d_model {lc['d_model']}, {lc['n_experts'] * lc['granularity']} experts "
          f"top-{lc['top_k'] * lc['granularity']}, {cfg['tokens']} tokens/rank ({rows * lc['d_model'] * 4 / 2**20:.0f} MiB "
          f"of routed rows per rank per all_to_all), {cfg['steps']} alternating step pairs in one run")
    print("    pair ratios gloo/hfreduce: " + " ".join(f"{r:.2f}" for r in pairs))
    print(f"    hfreduce {hf * 1e3:.1f} ms  gloo {gl * 1e3:.1f} ms  speedup (median pair) {speedup:.2f}x (target >= 1.5x): "
          f"{'met' if speedup >= 1.5 else 'missed'}")
    print(f"    of which exchanges (all_to_all + counts): hfreduce {chf * 1e3:.1f} ms  gloo {cgl * 1e3:.1f} ms "
          f"({cgl / chf:.2f}x)")
    return {"figures": {"b_pair_ratios": [round(r, 3) for r in pairs], "b_hfreduce_step_ms": round(hf * 1e3, 2), "b_gloo_step_ms": round(gl * 1e3, 2),
                        "b_hfreduce_comm_ms": round(chf * 1e3, 2), "b_gloo_comm_ms": round(cgl * 1e3, 2)},
            "ratios": {"b_moe_layer_speedup_over_gloo": round(speedup, 3),
                       "b_exchange_speedup_over_gloo": round(cgl / chf, 3)},
            "targets": {"b_moe_layer_speedup_over_gloo": ">= 1.5"}, "ok": speedup >= 1.5}


# -- (c) --------------------------------------------------------------------------------------
class MoELM(nn.Module):
    """Embedding, 2 residual blocks (causal depthwise token mixing + MoE FFN), head."""

    def __init__(self, vocab: int, d: int, ctx: int, balance: str, **moe: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.ModuleList([nn.Linear(2 * d, d) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(4)])
        self.moe = nn.ModuleList([DeepSeekMoE(d, 4 * d, balance=balance, expert_parallel=False, **moe)
                                  for _ in range(2)])
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.emb(x)
        for i in range(2):
            a = self.norms[2 * i](h)
            prev = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], 1)  # the previous token
            h = h + self.mix[i](torch.cat([a, prev], -1))
            h = h + self.moe[i](self.norms[2 * i + 1](h))
        return self.head(h)


def corpus(vocab: int, n: int, seed: int, sample_seed: int) -> torch.Tensor:
    """A second-order Markov chain over a Zipf-skewed vocabulary: learnable, and skewed enough that
    unbalanced routing is what training drifts to without balancing."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    trans = rng.dirichlet(np.full(vocab, 0.05), size=(vocab,)) * 0.7 + 0.3 * zipf / zipf.sum()
    cum = np.cumsum(trans, 1)
    gen = np.random.default_rng(sample_seed)  # same chain, another sample for validation
    out = np.empty(n, np.int64)
    out[0] = 0
    u = gen.random(n)
    for i in range(1, n):
        out[i] = min(int(np.searchsorted(cum[out[i - 1]], u[i] * cum[out[i - 1], -1])), vocab - 1)
    return torch.from_numpy(out)


def train_lm(balance: str, cfg: dict, train: torch.Tensor, val: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = MoELM(cfg["vocab"], cfg["d"], cfg["ctx"], balance, n_experts=cfg["experts"], top_k=cfg["top_k"],
                  n_shared=1, aux_loss_coef=cfg["alpha"], bias_update_speed=cfg["u"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    ctx, b = cfg["ctx"], cfg["batch"]
    vios = []
    for _ in range(cfg["steps"]):
        starts = torch.randint(0, train.numel() - ctx - 1, (b,), generator=g)
        xy = torch.stack([train[s:s + ctx + 1] for s in starts.tolist()])
        logits = model(xy[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, cfg["vocab"]), xy[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + aux_losses(model)).backward()
        opt.step()
        update_balance(model)
        vios.append(statistics.mean(m.stats.maxvio_batch for m in moe_layers(model)))
    model.eval()
    for m in moe_layers(model):
        m.reset_stats()
    with torch.no_grad():
        n = (val.numel() - 1) // ctx
        xy = torch.stack([val[i * ctx:i * ctx + ctx + 1] for i in range(n - 1)])
        logits = model(xy[:, :-1])
        per_token = nn.functional.cross_entropy(logits.reshape(-1, cfg["vocab"]), xy[:, 1:].reshape(-1),
                                                reduction="none")
    vloss = per_token.mean().item()
    return {"per_token": per_token, "maxvio_run": statistics.mean(vios), "maxvio_last100": statistics.mean(vios[-100:]),
            "maxvio_global_val": max(m.stats.maxvio_epoch for m in moe_layers(model)), "val_loss": vloss}


def section_c(args) -> dict:  # noqa: ANN001
    torch.set_num_threads(1)  # the machine is shared; one thread measures steadily
    cfg = {"vocab": 256, "d": 64, "ctx": 32, "batch": 16, "experts": 16, "top_k": 2, "alpha": 1e-3, "u": float(os.environ.get("MOE_BENCH_U", "1e-2")),
           "steps": int(os.environ.get("MOE_BENCH_STEPS", 200 if args.quick else 400))}
    train, val = corpus(cfg["vocab"], 200_000, 0, 1), corpus(cfg["vocab"], 20_000, 0, 2)
    t0 = time.perf_counter()
    res = {k: train_lm(k, cfg, train, val) for k in ("lfb", "aux")}
    ratio = res["lfb"]["maxvio_run"] / max(res["aux"]["maxvio_run"], 1e-9)
    dloss = res["lfb"]["val_loss"] - res["aux"]["val_loss"]
    # [Note: "no worse"] both models score the same validation tokens: the paired per-token
    # differences give the standard error of dloss; "no worse" = not worse by more than 2 standard
    # errors (a difference inside that is noise of this sample, not a property of the method)
    diff = res["lfb"].pop("per_token") - res["aux"].pop("per_token")
    se = (diff.std() / math.sqrt(diff.numel())).item()
    ok = ratio <= 0.5 and dloss <= 2 * se
    print(f"(c) MoE LM (2 MoE layers, {cfg['experts']} experts top-{cfg['top_k']}), {cfg['steps']} steps, "
          f"{time.perf_counter() - t0:.0f} s")
    for k, r in res.items():
        print(f"    {k:<4} MaxVio_batch over the run {r['maxvio_run']:.3f}  last 100 steps {r['maxvio_last100']:.3f}  "
              f"MaxVio_global(val) {r['maxvio_global_val']:.3f}  val loss {r['val_loss']:.4f}")
    print(f"    LFB/aux MaxVio {ratio:.2f}x (target <= 0.5x), val loss LFB - aux {dloss:+.4f} (target <= 2 SE = {2 * se:.4f}): "
          f"{'met' if ok else 'missed'}")
    figures = {f"c_{k}_{m}": round(v, 4) for k, r in res.items() for m, v in r.items()}
    return {"figures": figures, "ratios": {"c_maxvio_lfb_over_aux": round(ratio, 3), "c_val_loss_lfb_minus_aux":
                                           round(dloss, 4), "c_val_loss_diff_se": round(se, 4)},
            "targets": {"c_maxvio_lfb_over_aux": "<= 0.5", "c_val_loss_lfb_minus_aux": "<= 2 SE (paired)"}, "ok": ok}
