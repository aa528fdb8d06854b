"""The scheduling policy at Fire-Flyer 2's scale, and ours against the reference's FIFO in the simulator.

Three measurements, each against its target, in one run:

(a) one policy pass (``policy.plan``, the "fireflyer" profile) over the 1,250 nodes of
    deploy/clusters/fireflyer2.toml with 10,000 queued attempts and about 1,000 running ones:
    the median of 9 passes (7 with --quick). Target <= 100 ms.
(b) a synthetic trace (``haiplatform.trace.generate``: 24 h at load 1.2, seed 1; --quick: 8 h)
    run by "fireflyer" and by "reference-fifo" in the simulator: node utilisation over the
    submission window >= the reference's + 10 points, median queueing delay <= 0.33x, mean job
    completion time <= 0.7x, and no cross-leaf placement of a job that fits in one leaf.
(c) the wall time of fireflyer's simulated day of the full cluster: <= 60 s (with --quick, the
    target is scaled to the hours simulated).

Usage: python bench/schedsim.py [--quick] [--hours H] [--load L] [--seed N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haiplatform import policy  # noqa: E402
from haiplatform.policy import JobView, PolicyConfig, Snapshot  # noqa: E402
from haiplatform.sim import cluster_nodes, compare, format_report, simulate  # noqa: E402
from haiplatform.states import PRIORITIES, JobStatus  # noqa: E402
from haiplatform.trace import generate  # noqa: E402
from network.topology import load_cluster  # noqa: E402

CLUSTER = ROOT / "deploy" / "clusters" / "fireflyer2.toml"
NOW = 100_000.0


def big_snapshot(nodes, queued: int = 10_000, running: int = 1_000, seed: int = 0) -> Snapshot:
    """``running`` attempts holding most nodes (leaf by leaf, as the policy packs them) and ``queued``
    waiting ones of the generator's mix of sizes, users and priorities."""
    rng = random.Random(seed)
    levels = [PRIORITIES[k] for k in ("low", "normal", "normal", "normal", "above_normal", "high")]
    jobs: list[JobView] = []
    free = [n.name for n in nodes]
    jid = 1
    # ~1,000 running: mostly one node, some 4 and 16 (about 1,200 of the 1,250 nodes held)
    sizes = [16] * 15 + [4] * 85 + [1] * (running - 100)
    for size in sizes:
        held, free = tuple(free[:size]), free[size:]
        started = NOW - rng.uniform(60, 20_000)
        jobs.append(JobView(jid, f"u{rng.randrange(40):02d}", size, priority=rng.choice(levels),
                            status=JobStatus.RUNNING, assigned_nodes=held, created_at=started - 100,
                            submitted_at=started - 100, started_at=started, time_limit=rng.choice((0, 36_000)),
                            last_checkpoint=started + 600 if rng.random() < 0.7 else 0.0))
        jid += 1
    load, trace = 8.0 * queued / 10_000, []
    while len(trace) < queued:
        trace = generate(len(nodes), hours=24, load=load, seed=seed)
        load *= 1.5
    trace = trace[:queued]
    for tj in trace:
        jobs.append(JobView(jid, tj.user, tj.nodes, priority=tj.priority, submitted_priority=tj.priority,
                            created_at=tj.submit_time, submitted_at=tj.submit_time, time_limit=tj.time_limit))
        jid += 1
    return Snapshot(NOW, tuple(jobs), tuple(nodes), ())


def time_passes(snap: Snapshot, profile: str, passes: int) -> tuple[float, int]:
    cfg = PolicyConfig(heartbeat_timeout=float("inf"))
    times, n = [], 0
    for _ in range(passes):
        t0 = time.perf_counter()
        decisions, _ = policy.plan(snap, cfg, policy.PROFILES[profile])
        times.append(time.perf_counter() - t0)
        n = len(decisions)
    return statistics.median(times), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="an 8 h trace and 7 passes (about a minute)")
    ap.add_argument("--hours", type=float, default=None, help="trace hours (default 24, --quick 8)")
    ap.add_argument("--load", type=float, default=1.2, help="offered load of the trace (default 1.2)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the JSON result to this file")
    args = ap.parse_args()
    hours = args.hours or (8.0 if args.quick else 24.0)
    passes = 7 if args.quick else 9
    cluster = load_cluster(CLUSTER)
    nodes = cluster_nodes(cluster)

    # (a) one pass at full scale
    snap = big_snapshot(nodes)
    n_run = sum(j.status == JobStatus.RUNNING for j in snap.jobs)
    n_q = len(snap.jobs) - n_run
    pass_ms, n_dec = time_passes(snap, "fireflyer", passes)
    ref_ms, _ = time_passes(snap, "reference-fifo", passes)
    print(f"(a) one policy pass: {len(nodes)} nodes, {n_q} queued, {n_run} running: fireflyer median "
          f"{1000 * pass_ms:.1f} ms over {passes} passes ({n_dec} decisions); reference-fifo {1000 * ref_ms:.1f} ms")

    # (b) + (c) the synthetic trace, both policies
    jobs = generate(len(nodes), hours=hours, load=args.load, seed=args.seed)
    print(f"(b) trace: {len(jobs)} jobs over {hours:g} h at load {args.load:g} (seed {args.seed}) "
          f"on {len(nodes)} nodes")
    ours = simulate(cluster, jobs, "fireflyer", args.seed)
    ref = simulate(cluster, jobs, "reference-fifo", args.seed)
    print(format_report(ours))
    print(format_report(ref))
    c = compare(ours, ref)

    def steady(r) -> float:
        # [Note: steady state] the mean over the last three quarters of the submission window: the
        # first hours fill an empty cluster at the arrival rate, whatever the policy
        pts = [u for t, u in zip(r.series["t_h"], r.series["utilisation"], strict=True)
               if hours / 4 <= t < r.window / 3600]
        return sum(pts) / len(pts) if pts else 0.0

    print(f"    utilisation in the steady state ({hours / 4:g} h to the last submission): fireflyer "
          f"{100 * steady(ours):.1f}%, reference-fifo {100 * steady(ref):.1f}%")
    # [Note: a plain FIFO for context] reference-fifo suspends running jobs outside the queue's
    # fitting prefix, which keeps its nodes held; a FIFO without preemption or backfill (the usual
    # baseline of the scheduling literature) idles nodes while a big job waits at the head. Not a
    # target: it shows where utilisation is gained and where it is not.
    fifo = simulate(cluster, jobs, "fifo", args.seed)
    cf = compare(ours, fifo)
    print(format_report(fifo))
    print(f"    for context, fireflyer against a plain fifo: utilisation {cf['utilisation_points']:+.1f} points "
          f"(steady state {100 * steady(ours):.1f}% vs {100 * steady(fifo):.1f}%), median queueing delay "
          f"{cf['queue_delay_p50_ratio']:.3f}x, mean completion time {cf['jct_mean_ratio']:.3f}x")
    wall_target = 60.0 * hours / 24.0
    checks = [
        ("(a) policy pass, ms", 1000 * pass_ms, "<=", 100.0),
        ("(b) utilisation vs reference, points", c["utilisation_points"], ">=", 10.0),
        ("(b) median queueing delay vs reference", c["queue_delay_p50_ratio"], "<=", 0.33),
        ("(b) mean completion time vs reference", c["jct_mean_ratio"], "<=", 0.7),
        ("(b) cross-leaf placements of jobs that fit a leaf", ours.cross_leaf_fits, "<=", 0),
        (f"(c) wall time of {hours:g} simulated hours, s", ours.wall_s, "<=", wall_target),
    ]
    print(f"\n{'target':52} {'figure':>9}  {'goal':>9}  result")
    ok = True
    results = []
    for name, fig, op, goal in checks:
        met = fig <= goal if op == "<=" else fig >= goal
        ok &= met
        results.append({"target": name, "figure": round(fig, 4), "goal": f"{op} {goal:g}", "met": met})
        print(f"{name:52} {fig:9.3f}  {op} {goal:<6g}  {'met' if met else 'MISSED'}")
    out = {"bench": "schedsim", "hours": hours, "load": args.load, "seed": args.seed, "jobs": len(jobs),
           "pass_ms": round(1000 * pass_ms, 2), "pass_ms_reference": round(1000 * ref_ms, 2),
           "steady_utilisation": {"fireflyer": steady(ours), "reference-fifo": steady(ref), "fifo": steady(fifo)},
           "fireflyer": ours.to_dict(), "reference_fifo": ref.to_dict(), "fifo": fifo.to_dict(), "compare": c,
           "compare_fifo": cf, "targets": results, "ok": ok}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("bench", "hours", "jobs", "pass_ms", "compare", "compare_fifo", "targets",
                                          "ok")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
