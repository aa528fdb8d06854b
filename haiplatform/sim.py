"""The scheduler simulator (``hai sim``, ``python -m haiplatform.sim``): the live policy on a simulated clock.

::

    hai sim --cluster deploy/clusters/fireflyer2.toml --trace trace.csv --policy fireflyer \\
            [--policy reference-fifo | --compare] [--seed N] [--out DIR] [--tick S] [--json]

It runs the same code the scheduler runs, :func:`haiplatform.policy.plan` with
``policy.PROFILES[name]``, against a simulated cluster (the nodes, leaves and zones of the cluster
description) and a trace of jobs (:mod:`haiplatform.trace`). An event loop moves the clock from
event to event (a submission, a job's end, a suspended job's exit, a time-limit expiry) and runs
one scheduling cycle per ``tick`` in which something happened (events within one tick are decided
together, as the live loop batches them), plus one at least every ``resync`` seconds while jobs
wait (the rules that depend on the clock alone: minimum run time, demotion, time limits).

Decisions are applied as the scheduler and the agents would apply them:

- ``StartJob``: the attempt holds its nodes from now; its work begins ``start_latency`` later and
  ends when the chain's remaining work is done.
- ``StopJob`` with ``desired=suspend`` (a preemption): the job acknowledges (``suspend_ack``) and
  exits within its grace (``suspend_grace``); the nodes stay held until then. Its lost work is
  the time since its last checkpoint (every ``checkpoint_interval`` s of work; a job without one
  loses everything it did). The chain is then re-queued as a new attempt with the same first id,
  its run time added to ``chain_run_s``.
- ``StopJob`` with ``desired=stop`` (time limit, watchdog): the attempt fails ``kill_delay`` later.
- ``SetPriority`` / ``SetReason``: the attempt's view changes; ``FinishJob(requeue=True)`` re-queues.

[Note: what the simulator decides itself] A job's natural end is the simulator's (a job whose
ranks all exit 0 is finished by the policy's reconcile phase in the live system; here the job
simply leaves the snapshot at its end time), and the snapshot carries no ranks (the policy reads
a running attempt's ranks only for failures and lost nodes, which a trace does not have).
Nodes never miss heartbeats (``heartbeat_timeout`` is infinite).

[Note: speed] The snapshot is rebuilt each cycle from a dict of frozen views (one tuple of
references); a view is replaced only when it changes (a start, a suspend, a new checkpoint,
a reason). The node views are built once. A simulated day of the 1,250-node cluster runs in
tens of seconds, most of it inside the policy.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from . import policy
from .policy import (
    FinishJob,
    JobView,
    NodeView,
    PolicyConfig,
    SetPriority,
    SetReason,
    Snapshot,
    StartJob,
    StopJob,
)
from .states import AUTO, PRIORITIES, Desired, JobStatus, StopCode
from .trace import TraceError, TraceJob, read_trace

__all__ = ["SimParams", "Simulator", "Report", "simulate", "write_plot", "main"]

_ARRIVE, _END, _STOPPED, _WAKE = 0, 1, 2, 3


@dataclass(frozen=True)
class SimParams:
    """The simulated cluster's timings (seconds)."""

    tick: float = 10.0          # events within one tick are decided in one cycle
    resync: float = 60.0        # a cycle at least this often while jobs wait
    start_latency: float = 2.0  # StartJob -> the job's work begins
    suspend_ack: float = 1.0    # a suspended job acknowledges ...
    suspend_grace: float = 5.0  # ... then exits within its grace
    kill_delay: float = 1.0     # a plain stop: SIGTERM -> gone
    sample: float = 300.0       # the report's time series step


@dataclass
class _Chain:
    """One trace job: the chain of attempts that runs it."""

    idx: int
    tj: TraceJob
    first_id: int = 0
    done: float = 0.0           # work saved by checkpoints (s)
    chain_run_s: float = 0.0
    restarts: int = 0
    first_start: float | None = None
    finished_at: float | None = None
    outcome: str = ""           # succeeded | failed | refused
    attempt: int = 0            # the live attempt's id
    run_start: float = 0.0      # the live attempt's work began (started_at + start_latency)
    end_at: float = math.inf
    token: int = 0              # bumps to cancel a pending end event
    stop_at: float | None = None


@dataclass
class Report:
    """What one policy run over one trace measured (``to_dict`` for JSON)."""

    policy: str
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    refused: int = 0
    unfinished: int = 0
    utilisation: float = 0.0          # mean share of nodes held, over the submission window
    utilisation_makespan: float = 0.0  # ... over the whole run
    goodput: float = 0.0              # completed jobs' work (node-s) / node-s of the makespan
    queue_delay: dict = field(default_factory=dict)   # first start - submission: mean, p50, p90, p99
    jct: dict = field(default_factory=dict)           # finish - submission of completed jobs: mean, p50, p99
    preemptions: int = 0
    lost_node_hours: float = 0.0
    placements: int = 0
    cross_leaf: int = 0
    cross_zone: int = 0
    cross_leaf_fits: int = 0          # cross-leaf placements of jobs that fit in one leaf
    makespan: float = 0.0
    window: float = 0.0               # the submission window: last submission time
    cycles: int = 0
    series: dict = field(default_factory=dict)        # t (h), utilisation, queued; every `sample` s
    wall_s: float = 0.0               # not part of the result proper (varies run to run)

    def to_dict(self, series: bool = False) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if not series:
            d.pop("series")
        return d


def _pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (0 when empty)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, math.ceil(p / 100.0 * len(values)) - 1))]


class Simulator:
    """One policy over one trace on one cluster (see the module's docstring)."""

    def __init__(self, nodes: list[NodeView], jobs: list[TraceJob], profile: policy.Profile,
                 cfg: PolicyConfig, params: SimParams | None = None) -> None:
        self.profile = profile
        self.cfg = replace(cfg, heartbeat_timeout=math.inf)
        self.p = params or SimParams()
        self.nodes = tuple(nodes)
        self.node_leaf = {n.name: n.leaf for n in nodes}
        self.node_zone = {n.name: n.zone for n in nodes}
        per_leaf: dict[str, int] = {}
        for n in nodes:
            per_leaf[n.leaf] = per_leaf.get(n.leaf, 0) + 1
        self.leaf_size = max(per_leaf.values(), default=1)
        self.trace = jobs
        self.chains = [_Chain(i, tj) for i, tj in enumerate(jobs)]
        self.live: dict[int, JobView] = {}
        self.of_attempt: dict[int, _Chain] = {}
        self.ckpt_running: set[int] = set()
        self.next_id = 1
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.busy = 0
        self.queued = 0
        self.active = 0
        self.busy_t: list[float] = [0.0]
        self.busy_v: list[int] = [0]
        self.queue_t: list[float] = [0.0]
        self.queue_v: list[int] = [0]
        self.report = Report(profile.name, jobs=len(jobs))
        self.wake_at = -math.inf
        self.arrivals_left = 0

    # -- events ------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def _set_busy(self, t: float, delta: int) -> None:
        self.busy += delta
        if self.busy_t[-1] == t:
            self.busy_v[-1] = self.busy
        else:
            self.busy_t.append(t)
            self.busy_v.append(self.busy)

    def _new_attempt(self, ch: _Chain, t: float, priority: int, reason: str = "") -> None:
        jid = self.next_id
        self.next_id += 1
        if not ch.first_id:
            ch.first_id = jid
        tj = ch.tj
        self.live[jid] = JobView(
            id=jid, user=tj.user, nodes=tj.nodes, priority=priority, status=JobStatus.QUEUED,
            first_id=0 if jid == ch.first_id else ch.first_id, reason=reason,
            submitted_priority=tj.priority, created_at=t, submitted_at=tj.submit_time,
            chain_run_s=ch.chain_run_s, time_limit=tj.time_limit, restart_count=ch.restarts)
        self.of_attempt[jid] = ch
        ch.attempt = jid
        self.queued += 1

    def _arrive(self, ch: _Chain, t: float) -> None:
        self.arrivals_left -= 1
        why = policy.never_fits(ch.tj.nodes, ch.tj.user, None, ch.tj.priority, self.nodes, ())
        if why is not None:   # the API refuses it at submission
            ch.outcome = "refused"
            return
        # AUTO starts as NORMAL until the policy resolves it (as the API stores a submission)
        self._new_attempt(ch, t, ch.tj.priority if ch.tj.priority != AUTO else PRIORITIES["normal"])

    def _leave(self, jid: int, t: float) -> JobView:
        v = self.live.pop(jid)
        self.of_attempt.pop(jid, None)
        self.ckpt_running.discard(jid)
        self.active -= 1
        self._set_busy(t, -len(v.assigned_nodes))
        return v

    def _end(self, jid: int, token: int, t: float) -> None:
        ch = self.of_attempt.get(jid)
        if ch is None or ch.token != token or ch.attempt != jid:
            return
        self._leave(jid, t)
        ch.done = ch.tj.duration
        ch.finished_at = t
        ch.outcome = "succeeded"

    def _stopped(self, jid: int, requeue: int, t: float) -> None:
        ch = self.of_attempt.get(jid)
        if ch is None or ch.attempt != jid:
            return   # it ended on its own first
        v = self._leave(jid, t)
        ch.stop_at = None
        ch.chain_run_s += t - (v.started_at or t)
        if requeue:
            ch.restarts += 1
            self._new_attempt(ch, t, v.priority, "resumed after suspend")
        else:
            ch.finished_at = t
            ch.outcome = "failed"

    # -- applying decisions -------------------------------------------------------------------
    def _start(self, d: StartJob, now: float) -> None:
        v = self.live.get(d.job_id)
        if v is None or v.status != JobStatus.QUEUED:
            return
        ch = self.of_attempt[d.job_id]
        prio = v.priority if d.priority is None else d.priority
        self.live[d.job_id] = replace(v, status=JobStatus.RUNNING, assigned_nodes=d.nodes, started_at=now,
                                      reason="", priority=prio)
        self.queued -= 1
        self.active += 1
        self._set_busy(now, len(d.nodes))
        if ch.first_start is None:
            ch.first_start = now
        ch.run_start = now + self.p.start_latency
        ch.end_at = ch.run_start + max(0.0, ch.tj.duration - ch.done)
        ch.token += 1
        self._push(ch.end_at, _END, d.job_id, ch.token)
        if ch.tj.checkpoint_interval:
            self.ckpt_running.add(d.job_id)
        if ch.tj.time_limit:   # the policy stops it at its limit: be there when that comes
            limit_at = now + ch.tj.time_limit   # per attempt
            if limit_at < ch.end_at:
                self._push(max(now, limit_at), _WAKE)
        r = self.report
        r.placements += 1
        leaves = {self.node_leaf[n] for n in d.nodes}
        if len(leaves) > 1:
            r.cross_leaf += 1
            if len(d.nodes) <= self.leaf_size:
                r.cross_leaf_fits += 1
        if len({self.node_zone[n] for n in d.nodes}) > 1:
            r.cross_zone += 1

    def _progress(self, ch: _Chain, now: float) -> tuple[float, float]:
        """(work done by the live attempt, the part of it saved by checkpoints) at ``now``."""
        p = min(max(0.0, now - ch.run_start), max(0.0, ch.tj.duration - ch.done))
        iv = ch.tj.checkpoint_interval
        return p, (math.floor(p / iv) * iv if iv else 0.0)

    def _stop(self, d: StopJob, now: float) -> None:
        v = self.live.get(d.job_id)
        if v is None or v.status not in (JobStatus.SCHEDULED, JobStatus.RUNNING):
            return
        ch = self.of_attempt[d.job_id]
        self.live[d.job_id] = replace(v, status=JobStatus.STOPPING, stop_code=v.stop_code | d.code, reason=d.reason)
        suspend = d.desired == Desired.SUSPEND
        stop_at = now + (self.p.suspend_ack + self.p.suspend_grace if suspend else self.p.kill_delay)
        if ch.end_at <= stop_at:
            return   # its work ends before it would have stopped: the end event finishes it
        ch.token += 1   # cancel the end event
        done, saved = self._progress(ch, now)
        if suspend:
            # the chain keeps what its checkpoints saved; the rest of this attempt's work is lost
            ch.done += saved
            self.report.preemptions += 1
            self.report.lost_node_hours += (done - saved) * ch.tj.nodes / 3600.0
        ch.stop_at = stop_at
        self._push(stop_at, _STOPPED, d.job_id, 1 if suspend and d.code & StopCode.INTERRUPT else 0)

    def _apply(self, decisions, now: float) -> None:
        for d in decisions:
            if isinstance(d, StartJob):
                self._start(d, now)
            elif isinstance(d, StopJob):
                self._stop(d, now)
            elif isinstance(d, SetReason):
                v = self.live.get(d.job_id)
                if v is not None and v.status == JobStatus.QUEUED:
                    self.live[d.job_id] = replace(v, reason=d.reason)
            elif isinstance(d, SetPriority):
                v = self.live.get(d.job_id)
                if v is not None:
                    self.live[d.job_id] = replace(v, priority=d.priority)
            elif isinstance(d, FinishJob):
                ch = self.of_attempt.get(d.job_id)
                if ch is not None and self.live[d.job_id].status in JobStatus.ACTIVE:
                    ch.token += 1
                    self._stopped(d.job_id, int(d.requeue), now)
            # MarkNode, MarkRanksLost, MarkRunning, DrainNode, CancelJob: a trace has no node faults,
            # no ranks and no cancellations, so none of them arises

    # -- the loop -----------------------------------------------------------------------------
    def _snapshot(self, now: float) -> Snapshot:
        for jid in self.ckpt_running:   # a checkpointing job's newest checkpoint moves on
            ch = self.of_attempt[jid]
            _, saved = self._progress(ch, now)
            ts = ch.run_start + saved if saved > 0 else 0.0
            v = self.live[jid]
            if v.last_checkpoint != ts:
                self.live[jid] = replace(v, last_checkpoint=ts)
        return Snapshot(now, tuple(self.live.values()), self.nodes, ())

    def run(self) -> Report:
        t_wall = time.perf_counter()
        for ch in self.chains:
            self._push(ch.tj.submit_time, _ARRIVE, ch.idx)
        self.arrivals_left = len(self.chains)
        tick = self.p.tick
        heap = self.heap
        while heap:
            t0 = heap[0][0]
            now = math.ceil(t0 / tick) * tick if tick > 0 else t0
            while heap and heap[0][0] <= now:
                t, _, kind, a, b = heapq.heappop(heap)
                if kind == _ARRIVE:
                    self._arrive(self.chains[a], t)
                elif kind == _END:
                    self._end(a, b, t)
                elif kind == _STOPPED:
                    self._stopped(a, b, t)
            if not self.live:
                continue
            self.now = now
            decisions = policy.plan(self._snapshot(now), self.cfg, self.profile)[0]
            self.report.cycles += 1
            started = self.active
            self._apply(decisions, now)
            self.queue_t.append(now)
            self.queue_v.append(self.queued)
            if self.queued:
                if self.active == 0 and self.arrivals_left == 0 and started == self.active:
                    break   # nothing runs, nothing comes, nothing starts: the rest can never run
                if self.wake_at <= now:
                    self.wake_at = now + self.p.resync
                    self._push(self.wake_at, _WAKE)
        self._finish(time.perf_counter() - t_wall)
        return self.report

    def _finish(self, wall: float) -> None:
        r = self.report
        done = [c for c in self.chains if c.outcome == "succeeded"]
        r.completed = len(done)
        r.failed = sum(c.outcome == "failed" for c in self.chains)
        r.refused = sum(c.outcome == "refused" for c in self.chains)
        r.unfinished = r.jobs - r.completed - r.failed - r.refused
        total = len(self.nodes) or 1
        r.window = max((c.tj.submit_time for c in self.chains), default=0.0)
        ends = [c.finished_at for c in self.chains if c.finished_at is not None]
        r.makespan = max(ends, default=0.0)

        def area(lo: float, hi: float) -> float:
            s = 0.0
            bt, bv = self.busy_t, self.busy_v
            for i, t in enumerate(bt):
                t_next = bt[i + 1] if i + 1 < len(bt) else hi
                a, b = max(t, lo), min(t_next, hi)
                if b > a:
                    s += bv[i] * (b - a)
            return s

        if r.window > 0:
            r.utilisation = area(0.0, r.window) / (total * r.window)
        if r.makespan > 0:
            r.utilisation_makespan = area(0.0, r.makespan) / (total * r.makespan)
            r.goodput = sum(c.tj.nodes * c.tj.duration for c in done) / (total * r.makespan)
        delays = sorted(c.first_start - c.tj.submit_time for c in self.chains if c.first_start is not None)
        r.queue_delay = {"mean": sum(delays) / len(delays) if delays else 0.0, "p50": _pct(delays, 50),
                         "p90": _pct(delays, 90), "p99": _pct(delays, 99)}
        jcts = sorted(c.finished_at - c.tj.submit_time for c in done)
        r.jct = {"mean": sum(jcts) / len(jcts) if jcts else 0.0, "p50": _pct(jcts, 50), "p99": _pct(jcts, 99)}
        # the time series, one point every `sample` s (the state at that instant)
        step = self.p.sample
        pts = [i * step for i in range(int(max(r.makespan, r.window) // step) + 2)]
        util, queued = [], []
        bi = qi = 0
        for t in pts:
            while bi + 1 < len(self.busy_t) and self.busy_t[bi + 1] <= t:
                bi += 1
            while qi + 1 < len(self.queue_t) and self.queue_t[qi + 1] <= t:
                qi += 1
            util.append(self.busy_v[bi] / total)
            queued.append(self.queue_v[qi])
        r.series = {"t_h": [t / 3600.0 for t in pts], "utilisation": util, "queued": queued}
        r.wall_s = wall


def cluster_nodes(cluster) -> list[NodeView]:
    """The policy's node views of a cluster description (every node up, none drained)."""
    return [NodeView(n.name, n.zone, n.leaf, n.gpus) for n in sorted(cluster.nodes.values(), key=lambda n: n.index)]


def policy_config(cluster, seed: int = 0) -> PolicyConfig:
    """The cluster's ``[haiplatform]`` policy keys (min_run_time, demote_after, ...) and the seed."""
    sec = cluster.section("haiplatform")
    known = {f.name: f.type for f in fields(PolicyConfig)}
    kw = {k: v for k, v in sec.items() if k in known and k not in ("heartbeat_timeout", "seed")}
    return PolicyConfig(**kw, seed=seed)


def simulate(cluster, jobs: list[TraceJob], policy_name: str, seed: int = 0,
             params: SimParams | None = None) -> Report:
    """Run ``policy_name`` (a key of ``policy.PROFILES``) over ``jobs`` on ``cluster``."""
    if policy_name not in policy.PROFILES:
        raise ValueError(f"unknown policy {policy_name!r} (known: {', '.join(sorted(policy.PROFILES))})")
    return Simulator(cluster_nodes(cluster), jobs, policy.PROFILES[policy_name], policy_config(cluster, seed),
                     params).run()


# -- output ---------------------------------------------------------------------------------------

def format_report(r: Report) -> str:
    qd, jc = r.queue_delay, r.jct
    return "\n".join([
        f"policy {r.policy}: {r.jobs} jobs ({r.completed} completed, {r.failed} failed, {r.refused} refused, "
        f"{r.unfinished} unfinished), {r.cycles} cycles in {r.wall_s:.1f} s",
        f"  node utilisation  {100 * r.utilisation:5.1f}% over the submission window ({policy.hms(r.window)}), "
        f"{100 * r.utilisation_makespan:5.1f}% over the makespan ({policy.hms(r.makespan)}), "
        f"of which useful {100 * r.goodput:5.1f}%",
        f"  queueing delay    mean {policy.hms(qd['mean'])}  p50 {policy.hms(qd['p50'])}  p90 {policy.hms(qd['p90'])}  "
        f"p99 {policy.hms(qd['p99'])}",
        f"  completion time   mean {policy.hms(jc['mean'])}  p50 {policy.hms(jc['p50'])}  p99 {policy.hms(jc['p99'])}",
        f"  preemptions       {r.preemptions}, lost work {r.lost_node_hours:.1f} node-hours",
        f"  placements        {r.placements}: {r.cross_leaf} cross-leaf ({r.cross_leaf_fits} of jobs that fit "
        f"in one leaf), {r.cross_zone} cross-zone",
    ])


def compare(a: Report, b: Report) -> dict:
    """``a`` against ``b``: utilisation difference (points), delay and JCT ratios."""
    def ratio(x: float, y: float) -> float:
        return x / y if y else (1.0 if x == y else math.inf)
    return {"policy": a.policy, "against": b.policy,
            "utilisation_points": 100 * (a.utilisation - b.utilisation),
            "queue_delay_p50_ratio": ratio(a.queue_delay["p50"], b.queue_delay["p50"]),
            "queue_delay_mean_ratio": ratio(a.queue_delay["mean"], b.queue_delay["mean"]),
            "jct_mean_ratio": ratio(a.jct["mean"], b.jct["mean"]),
            "jct_p50_ratio": ratio(a.jct["p50"], b.jct["p50"])}


def write_plot(reports: list[Report], path: str | Path) -> Path:
    """A PNG of node utilisation and queue length over time, one line per policy run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for r in reports:
        ax1.plot(r.series["t_h"], [100 * u for u in r.series["utilisation"]], label=r.policy, linewidth=1)
        ax2.plot(r.series["t_h"], r.series["queued"], label=r.policy, linewidth=1)
    ax1.set_ylabel("nodes held (%)")
    ax1.set_ylim(0, 105)
    ax2.set_ylabel("queued jobs")
    ax2.set_xlabel("time (h)")
    ax1.legend(loc="lower right")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``hai sim``: 0 when every run finished its trace, 1 when jobs were left unfinished, 2 on bad input."""
    ap = argparse.ArgumentParser(prog="hai sim", description="run scheduling policies over a job trace")
    ap.add_argument("--cluster", required=True, help="cluster description (TOML)")
    ap.add_argument("--trace", required=True, help="trace CSV (see docs/scheduling.md)")
    ap.add_argument("--policy", action="append", default=[], help=f"policy ({', '.join(sorted(policy.PROFILES))}); "
                    "twice to compare two")
    ap.add_argument("--compare", action="store_true", help="run fireflyer and reference-fifo and compare them")
    ap.add_argument("--seed", type=int, default=0, help="seed of the policies' random choices (reference-fifo)")
    ap.add_argument("--out", help="directory for report.json and sim.png")
    ap.add_argument("--tick", type=float, default=SimParams.tick, help="seconds per scheduling cycle (default 10)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    from network.errors import ClusterFileError
    from network.topology import load_cluster

    names = list(args.policy) or ["fireflyer"]
    if args.compare:
        names += [n for n in ("fireflyer", "reference-fifo") if n not in names]
    bad = [n for n in names if n not in policy.PROFILES]
    if bad:
        print(f"hai sim: error: unknown policy {bad[0]!r} (known: {', '.join(sorted(policy.PROFILES))})",
              file=sys.stderr)
        return 2
    if len(names) > 2:
        print("hai sim: error: at most two policies per run", file=sys.stderr)
        return 2
    if not (args.tick >= 0 and math.isfinite(args.tick)):
        print("hai sim: error: --tick must be a number >= 0", file=sys.stderr)
        return 2
    try:
        cluster = load_cluster(args.cluster)
    except ClusterFileError as exc:
        print(f"hai sim: error: {exc}", file=sys.stderr)
        return 2
    gpn = max((n.gpus for n in cluster.nodes.values()), default=1) or 1
    try:
        jobs = read_trace(args.trace, gpn)
    except TraceError as exc:
        print(f"hai sim: error: {exc}", file=sys.stderr)
        return 2
    params = SimParams(tick=args.tick)
    reports = [simulate(cluster, jobs, n, args.seed, params) for n in names]
    cmp = compare(reports[0], reports[1]) if len(reports) == 2 else None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"runs": [r.to_dict(series=True) for r in reports],
                                                     "compare": cmp}, indent=1))
        write_plot(reports, out / "sim.png")
    if args.json:
        print(json.dumps({"runs": [r.to_dict() for r in reports], "compare": cmp}, indent=1))
    else:
        for r in reports:
            print(format_report(r))
        if cmp:
            print(f"{cmp['policy']} against {cmp['against']}: utilisation {cmp['utilisation_points']:+.1f} points, "
                  f"median queueing delay x{cmp['queue_delay_p50_ratio']:.2f}, "
                  f"mean completion time x{cmp['jct_mean_ratio']:.2f}")
        if args.out:
            print(f"report and plot in {args.out}")
    return 1 if any(r.unfinished for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
