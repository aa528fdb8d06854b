"""The scheduler loop (``python -m haiplatform.scheduler``): snapshot -> pure policy -> one transaction.

Each cycle reads one consistent snapshot of the database (live attempts with their ranks, nodes,
quotas), asks :func:`haiplatform.policy.decide` for decisions, and writes them in a single
transaction. Then it tells the API, which wakes the agents.

A cycle runs when the API reports an event (a submission, a rank's end, a node change, a stop
request: ``/v1/internal/wait`` returns at once) and at least every ``tick`` seconds (heartbeat
deadlines need the clock). When the API is unreachable the loop keeps ticking on the database
alone.

[Note: crash safety] The scheduler keeps no state of its own: a restarted scheduler reads the
same snapshot and continues. Every write is conditional on the state the decision was made
from (``UPDATE jobs SET status='scheduled' ... WHERE id=? AND status='queued'``), and decisions
are committed together, so a crash between deciding and committing loses the whole cycle (it is
decided again) and a crash after committing starts nothing twice: agents only start ranks that
exist in the database, and they report what they started.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import insert, select, update

from .config import HaiConfig
from .db import Database, Job, NodeRow, Quota, Rank, User, event_row
from .errors import ApiError
from .policy import (
    PROFILES,
    CancelJob,
    Decision,
    DrainNode,
    FinishJob,
    JobView,
    MarkNode,
    MarkRanksLost,
    MarkRunning,
    NodeView,
    PolicyConfig,
    QuotaView,
    RankView,
    SetPriority,
    SetReason,
    Snapshot,
    StartJob,
    StopJob,
    plan,
)
from .states import AUTO, PRIORITIES, Desired, JobStatus, RankStatus, StopCode

__all__ = ["Scheduler", "SchedulerMetrics", "take_snapshot", "apply_decisions", "main"]

log = logging.getLogger(__name__)

#: decisions an agent must hear about at once
_AGENT_VISIBLE = (StartJob, StopJob, MarkRanksLost)

_NORMAL = PRIORITIES["normal"]


_LIVE_JOBS = select(Job.id, Job.user, Job.group, Job.nodes, Job.priority, Job.status, Job.first_id, Job.procs_per_node,
                   Job.stop_requested, Job.stop_code, Job.assigned_nodes, Job.reason, Job.submitted_priority,
                   Job.created_at, Job.submitted_at, Job.scheduled_at, Job.chain_run_s, Job.time_limit, Job.watchdog,
                   Job.last_output, Job.last_checkpoint, Job.restart_count, Job.held, Job.after, Job.after_ok,
                   Job.array_id, Job.array_throttle).where(Job.status.in_(JobStatus.LIVE))
_NODES = select(NodeRow.name, NodeRow.zone, NodeRow.leaf, NodeRow.gpus, NodeRow.state, NodeRow.drained,
                NodeRow.last_seen).order_by(NodeRow.name)
_QUOTAS = select(Quota.subject, Quota.max_nodes, Quota.priority)


def _job_view(j, ranks: tuple[RankView, ...]) -> JobView:
    """A JobView from a row. [Note: views without __init__] A frozen dataclass's ``__init__`` sets each
    of JobView's 23 fields through ``object.__setattr__``: 30 us a view, most of a cycle's snapshot
    with a few hundred queued jobs (the bench's submission bursts). The view is filled in one
    ``__dict__.update`` instead; every field is given, so none is left to a default."""
    v = object.__new__(JobView)
    v.__dict__.update(
        id=j.id, user=j.user, nodes=j.nodes, priority=j.priority, status=j.status, first_id=j.first_id,
        group=j.group, procs_per_node=j.procs_per_node, stop_requested=j.stop_requested, stop_code=j.stop_code,
        assigned_nodes=tuple(j.assigned_nodes or ()), ranks=ranks, reason=j.reason,
        submitted_priority=j.submitted_priority, created_at=j.created_at,
        submitted_at=j.submitted_at or j.created_at, started_at=j.scheduled_at, chain_run_s=j.chain_run_s,
        time_limit=j.time_limit, watchdog=j.watchdog, last_output=j.last_output,
        last_checkpoint=j.last_checkpoint, restart_count=j.restart_count, held=bool(j.held),
        after=tuple(j.after or ()), after_ok=tuple(j.after_ok or ()), array_id=j.array_id,
        array_throttle=j.array_throttle or 0)
    return v


def take_snapshot(db: Database, now: float | None = None) -> Snapshot:
    """One consistent read of everything the policy looks at (Core rows: no ORM objects are needed)."""
    with db.ro_engine.begin() as s:
        jobs = s.execute(_LIVE_JOBS).all()
        active = [j.id for j in jobs if j.status in JobStatus.ACTIVE]
        ranks: dict[int, list[RankView]] = defaultdict(list)
        if active:
            for r in s.execute(select(Rank.job_id, Rank.rank, Rank.node, Rank.status, Rank.desired, Rank.exit_code)
                               .where(Rank.job_id.in_(active))):
                ranks[r.job_id].append(RankView(r.rank, r.node, r.status, r.desired, r.exit_code))
        nodes = tuple(NodeView(*n) for n in s.execute(_NODES))
        quotas = tuple(QuotaView(*q) for q in s.execute(_QUOTAS))
        # the chains queued attempts depend on: each one's latest attempt's status
        refs = sorted({c for j in jobs if j.status == JobStatus.QUEUED for c in (*(j.after or ()), *(j.after_ok or ()))})
        chains: dict[int, str] = {}
        for i in range(0, len(refs), 500):  # SQLite bounds a statement's parameters
            latest: dict[int, int] = {}
            for c, jid, st in s.execute(select(Job.chain_id, Job.id, Job.status).where(Job.chain_id.in_(refs[i:i + 500]))):
                if jid > latest.get(c, 0):
                    latest[c], chains[c] = jid, st
        # a dependency on a job array's id is on every task of it (policy.gate)
        arrays: dict[int, dict[int, str]] = {}
        for i in range(0, len(refs), 500):
            latest = {}
            for a, c, jid, st in s.execute(select(Job.array_id, Job.chain_id, Job.id, Job.status)
                                           .where(Job.array_id.in_(refs[i:i + 500]))):
                if jid > latest.get(c, 0):
                    latest[c] = jid
                    arrays.setdefault(a, {})[c] = st
        disabled = frozenset(s.scalars(select(User.name).where(User.disabled.is_(True))))
    none: tuple[RankView, ...] = ()
    views = tuple(_job_view(j, tuple(sorted(ranks[j.id], key=lambda r: r.rank)) if j.id in ranks else none)
                  for j in jobs)
    return Snapshot(now=time.time() if now is None else now, jobs=views, nodes=nodes, quotas=quotas,
                    chains=chains, disabled=disabled, arrays=arrays)


def apply_decisions(db: Database, decisions: list[Decision]) -> int:
    """Write ``decisions`` in one transaction; returns how many took effect (their preconditions held)."""
    if not decisions:
        return 0
    now = time.time()
    applied = 0
    reasons: dict[str, list[int]] = defaultdict(list)
    # [Note: Core writes] a Connection, not a Session: ORM-enabled UPDATEs cost twice as much
    # (session synchronisation), and nothing here needs objects.
    with db.engine.begin() as s:
        for d in decisions:
            if isinstance(d, MarkNode):
                n = s.execute(update(NodeRow).where(NodeRow.name == d.node, NodeRow.state != d.state)
                              .values(state=d.state)).rowcount
                if n:
                    event_row(s, f"node_{d.state}", d.reason, node=d.node)
            elif isinstance(d, MarkRanksLost):
                n = s.execute(update(Rank).where(Rank.job_id == d.job_id, Rank.node == d.node, Rank.status.in_(
                    (RankStatus.CREATED, RankStatus.RUNNING))).values(
                    status=RankStatus.LOST, finished_at=now, desired=Desired.STOP,
                    message=f"node {d.node} was lost")).rowcount
            elif isinstance(d, MarkRunning):
                n = s.execute(update(Job).where(Job.id == d.job_id, Job.status == JobStatus.SCHEDULED)
                              .values(status=JobStatus.RUNNING, started_at=now)).rowcount
            elif isinstance(d, StartJob):
                ppn = len(d.ranks) // len(d.nodes)
                vals = {} if d.priority is None else {"priority": d.priority}
                # a hold or a user's disable that landed after the snapshot wins (the API writes them
                # without the scheduler's lock): the start is dropped, the next cycle sees them
                n = s.execute(update(Job).where(Job.id == d.job_id, Job.status == JobStatus.QUEUED,
                                                Job.stop_requested == 0, Job.held.isnot(True),
                                                ~select(User.name).where(User.name == Job.user,
                                                                         User.disabled.is_(True)).exists())
                              .values(status=JobStatus.SCHEDULED, assigned_nodes=list(d.nodes), scheduled_at=now,
                                      reason="", procs_per_node=ppn, master_port=0, **vals)).rowcount
                if n:
                    s.execute(insert(Rank), [{"job_id": d.job_id, "rank": rk, "node": nd, "local_rank": lr,
                                              "status": RankStatus.CREATED, "desired": Desired.RUN, "message": ""}
                                             for rk, nd, lr in d.ranks])
                    event_row(s, "scheduled", "on " + ",".join(d.nodes), job_id=d.job_id)
            elif isinstance(d, StopJob):
                # a suspend's start is kept: the agents' ack timeout and grace run from it
                vals = {"suspend_sent_at": now} if d.desired == Desired.SUSPEND else {}
                n = s.execute(update(Job).where(Job.id == d.job_id, Job.status.in_(
                    (JobStatus.SCHEDULED, JobStatus.RUNNING))).values(
                    status=JobStatus.STOPPING, stop_code=Job.stop_code.op("|")(d.code), reason=d.reason,
                    **vals)).rowcount
                if n:
                    s.execute(update(Rank).where(Rank.job_id == d.job_id, Rank.status.in_(
                        (RankStatus.CREATED, RankStatus.RUNNING))).values(desired=d.desired))
                    event_row(s, "stopping", d.reason, job_id=d.job_id)
            elif isinstance(d, CancelJob):
                n = s.execute(update(Job).where(Job.id == d.job_id, Job.status == JobStatus.QUEUED).values(
                    status=JobStatus.CANCELED, finished_at=now, reason=d.reason,
                    stop_code=StopCode.MANUAL_STOP)).rowcount
                if n:
                    event_row(s, "canceled", d.reason, job_id=d.job_id)
            elif isinstance(d, FinishJob):
                n = s.execute(update(Job).where(Job.id == d.job_id, Job.status.in_(JobStatus.ACTIVE)).values(
                    status=d.status, stop_code=d.stop_code, exit_code=d.exit_code, finished_at=now,
                    reason=d.reason)).rowcount
                if n:
                    event_row(s, d.status, d.reason, job_id=d.job_id)
                    if d.requeue:
                        _requeue(s, d.job_id, now)
            elif isinstance(d, SetPriority):
                n = s.execute(update(Job).where(Job.id == d.job_id, Job.status.in_(JobStatus.LIVE),
                                                Job.priority != d.priority).values(priority=d.priority)).rowcount
                if n:
                    event_row(s, "priority", f"priority {d.priority}: {d.reason}", job_id=d.job_id)
            elif isinstance(d, DrainNode):
                n = s.execute(update(NodeRow).where(NodeRow.name == d.node, NodeRow.drained.is_(False))
                              .values(drained=True, drain_reason=d.reason[:200], drained_by="scheduler")).rowcount
                if n:
                    event_row(s, "node_drained", d.reason, node=d.node)
            elif isinstance(d, SetReason):
                reasons[d.reason[:200]].append(d.job_id)
                continue
            else:  # pragma: no cover - a new decision type without an applier is a bug
                raise TypeError(f"no applier for {d!r}")
            applied += bool(n)
        # [Note: reasons in bulk] Waiting reasons name counts ("needs 3, 1 free"), so a burst of
        # submissions or a node freeing changes many at once: one UPDATE per distinct reason.
        # (in chunks: SQLite bounds a statement's parameters)
        for reason, ids in reasons.items():
            for i in range(0, len(ids), 500):
                applied += s.execute(update(Job).where(Job.id.in_(ids[i:i + 500]), Job.status == JobStatus.QUEUED)
                                     .values(reason=reason)).rowcount
    return applied


def _requeue(s, job_id: int, now: float) -> None:
    """Insert the chain's next attempt: same chain and first id (so it keeps its queue place), the same
    processes per node, limits and submission as the attempt it replaces, and the chain's run time so
    far. Its priority starts again from the submitted one (AUTO: NORMAL until the policy resolves it);
    the policy demotes it again when its chain has run long enough."""
    old = s.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one()
    began = old["started_at"] or old["scheduled_at"]
    ran = max(0.0, (old["finished_at"] or now) - began) if began else 0.0
    submitted = old["submitted_priority"]
    lost = bool(old["stop_code"] & StopCode.NODE_LOST)
    new_id = s.execute(insert(Job).values(
        chain_id=old["chain_id"], first_id=old["first_id"], restart_count=old["restart_count"] + 1,
        name=old["name"], user=old["user"], group=old["group"], shared_in_group=old["shared_in_group"],
        command=old["command"], env=old["env"], workdir=old["workdir"], nodes=old["nodes"],
        procs_per_node=old["procs_per_node"], priority=_NORMAL if submitted == AUTO else submitted,
        submitted_priority=submitted, submitted_at=old["submitted_at"] or old["created_at"],
        time_limit=old["time_limit"], grace=old["grace"], watchdog=old["watchdog"],
        chain_run_s=old["chain_run_s"] + ran, last_output=0.0, last_checkpoint=old["last_checkpoint"],
        status=JobStatus.QUEUED, whole_life_state=old["whole_life_state"], created_at=now, assigned_nodes=[],
        reason="re-queued after a lost node" if lost else "resumed after suspend", stop_code=0, stop_requested=0,
        master_port=0, array_id=old["array_id"], array_index=old["array_index"],
        array_throttle=old["array_throttle"], after=old["after"], after_ok=old["after_ok"], held=False,
        output=old["output"]).returning(Job.id)).scalar_one()
    event_row(s, "requeued", f"attempt {new_id} continues chain {old['chain_id']}", job_id=new_id)


_LEVEL_NAMES = {v: k for k, v in PRIORITIES.items()} | {AUTO: "auto"}
_CYCLE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 3 * 3600, 12 * 3600, 86400, 3 * 86400)


def _level(p: int) -> str:
    """A priority's label: its name (``normal``), a bounded set (an unnamed level is ``other``)."""
    return _LEVEL_NAMES.get(p, "other")


class SchedulerMetrics:
    """The scheduler's Prometheus series (docs/metrics.md), in ``registry`` (its RPC server's).

    Gauges of the queue, the jobs and the nodes are set from each cycle's snapshot (the state the
    cycle decided on); counters move with the decisions it applied. Labels are priority levels,
    statuses and node states: bounded sets, never a job or a user.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = self.registry = registry if registry is not None else CollectorRegistry()
        self.cycle = Histogram("fireflyer_hai_cycle_seconds", "Scheduling cycle time (snapshot, policy, write)",
                               registry=reg, buckets=_CYCLE_BUCKETS)
        self.queued = Gauge("fireflyer_hai_queue_jobs", "Jobs waiting in the queue, by priority level",
                            ["priority"], registry=reg)
        self.oldest = Gauge("fireflyer_hai_queue_oldest_wait_seconds", "How long the oldest queued job of each "
                            "priority level has waited since its submission", ["priority"], registry=reg)
        self.wait = Histogram("fireflyer_hai_queue_wait_seconds", "Time from submission to start of the "
                              "attempts started, by priority level", ["priority"], registry=reg,
                              buckets=_WAIT_BUCKETS)
        self.jobs = Gauge("fireflyer_hai_jobs", "Live jobs by status", ["status"], registry=reg)
        self.nodes = Gauge("fireflyer_hai_nodes", "Nodes by state (ready, lost...) and whether drained",
                           ["state", "drained"], registry=reg)
        self.starts = Counter("fireflyer_hai_job_starts", "Attempts started (nodes assigned), by priority level",
                              ["priority"], registry=reg)
        self.ends = Counter("fireflyer_hai_job_ends", "Attempts ended, by final status", ["status"], registry=reg)
        self.preemptions = Counter("fireflyer_hai_preemptions", "Running jobs suspended by the policy to make "
                                   "room for others", registry=reg)
        self.decisions = Counter("fireflyer_hai_decisions", "Decisions written, by kind", ["kind"], registry=reg)
        self._node_keys: set[tuple[str, str]] = set()
        self._levels: set[str] = {_level(p) for p in PRIORITIES.values()}  # every level a gauge was set for
        for st in JobStatus.LIVE:
            self.jobs.labels(st.value)
        for st in JobStatus.DONE:
            self.ends.labels(st.value)

    def observe(self, snap: Snapshot, decisions: list[Decision], seconds: float) -> None:
        """Account one cycle: ``snap`` it decided on, the ``decisions`` it wrote, its time."""
        self.cycle.observe(seconds)
        started = {d.job_id for d in decisions if isinstance(d, StartJob)}
        by_id = {j.id: j for j in snap.jobs}
        queued: dict[str, int] = dict.fromkeys(self._levels, 0)  # a level with no job left reads 0, not its last
        oldest: dict[str, float] = {}
        status: dict[str, int] = {st.value: 0 for st in JobStatus.LIVE}
        for j in snap.jobs:
            status[j.status] = status.get(j.status, 0) + 1
            if j.status == JobStatus.QUEUED and j.id not in started:
                lv = _level(j.priority)
                queued[lv] = queued.get(lv, 0) + 1
                oldest[lv] = max(oldest.get(lv, 0.0), snap.now - j.submitted_at)
        self._levels |= queued.keys()
        for lv, n in queued.items():
            self.queued.labels(lv).set(n)
            self.oldest.labels(lv).set(oldest.get(lv, 0.0))
        for st, n in status.items():
            self.jobs.labels(st).set(n)
        nodes: dict[tuple[str, str], int] = {}
        for n in snap.nodes:
            k = (str(n.state), "true" if n.drained else "false")
            nodes[k] = nodes.get(k, 0) + 1
        for k in self._node_keys - nodes.keys():  # a state no node is in any more reads 0, not its last count
            self.nodes.labels(*k).set(0)
        self._node_keys |= nodes.keys()
        for k, n in nodes.items():
            self.nodes.labels(*k).set(n)
        for d in decisions:
            if isinstance(d, SetReason):
                continue
            self.decisions.labels(type(d).__name__).inc()
            if isinstance(d, StartJob):
                j = by_id.get(d.job_id)
                lv = _level(d.priority if d.priority is not None else (j.priority if j else -2))
                self.starts.labels(lv).inc()
                if j is not None:
                    self.wait.labels(lv).observe(max(0.0, snap.now - j.submitted_at))
            elif isinstance(d, FinishJob):
                self.ends.labels(str(d.status)).inc()
            elif isinstance(d, CancelJob):
                self.ends.labels(JobStatus.CANCELED.value).inc()
            elif (isinstance(d, StopJob) and d.code == StopCode.INTERRUPT and d.desired == Desired.SUSPEND
                  and d.reason != "suspend requested"):
                self.preemptions.inc()


class Scheduler:
    """The live loop around the pure policy."""

    def __init__(self, db: Database, cfg: HaiConfig, api=None, registry: CollectorRegistry | None = None) -> None:
        self.db = db
        self.cfg = cfg
        self.api = api  # a HaiClient with the cluster secret, or None (tick only)
        self.policy_cfg: PolicyConfig = cfg.policy_config()
        self.profile = PROFILES[cfg.policy]
        self.cycles = 0
        self.decisions = 0
        self.last_cycle_s = 0.0
        self.free_nodes = 1
        self.floor = -1  # the lowest effective priority holding nodes after the last cycle (see run's note)
        self.skipped = 0
        self.last_cycle_end = 0.0
        self.woken = set()
        self.metrics = SchedulerMetrics(registry)

    def cycle(self) -> list[Decision]:
        t0 = time.perf_counter()
        snap = take_snapshot(self.db)
        decisions, self.free_nodes = plan(snap, self.policy_cfg, self.profile)
        held = {j.id: j.assigned_nodes for j in snap.jobs}
        self.floor = _floor(snap, decisions)
        self.woken: set[str] = set()
        for d in decisions:
            if isinstance(d, StartJob):
                self.woken.update(d.nodes)
            elif isinstance(d, StopJob | MarkRanksLost):
                self.woken.update(held.get(d.job_id, ()))
        apply_decisions(self.db, decisions)
        self.cycles += 1
        self.decisions += sum(not isinstance(d, SetReason) for d in decisions)
        self.last_cycle_s = time.perf_counter() - t0
        self.metrics.observe(snap, decisions, self.last_cycle_s)
        for d in decisions:
            if not isinstance(d, SetReason):
                log.info("%s", d)
        return decisions

    def run(self, stop: threading.Event) -> None:
        seq, cap, seen_cap, last_full = -1, -1, -2, 0.0
        levels: dict[str, int] = {}
        seen_levels: dict[str, int] = {}
        again = False
        poll = min(self.cfg.tick, 2.0)  # bounded waits: a shutdown is seen within 2 s whatever the tick
        while not stop.is_set():
            event = True
            if again:  # the last cycle queued a new attempt: decide on it now, not at the tick
                again = False
                seen_cap = -2
            elif self.api is not None:
                try:
                    r = self.api.request("GET", "/v1/internal/wait", params={"seq": seq, "timeout": poll},
                                         timeout=poll + 10)
                    event = r["seq"] != seq
                    seq, cap, levels = r["seq"], r.get("cap", -1), r.get("levels", {})
                except ApiError as exc:
                    log.warning("API unavailable (%s); ticking on the database alone", exc)
                    seq, cap, levels = -1, -1, {}
                    stop.wait(poll)
            else:
                stop.wait(poll)
                event = False
            if stop.is_set():
                break
            now = time.monotonic()
            if not event and now - last_full < self.cfg.tick:
                continue  # a long-poll ran out before the tick did
            # [Note: submissions into a full cluster] A submission can start a job only on a free
            # ready node, or by preempting a running job of a strictly lower priority. When the last
            # cycle left no node free and nothing but submissions at levels no higher than the lowest
            # running one (``floor``) happened since, a cycle would decide nothing (bar waiting
            # reasons), so it waits for the tick or an event that may free capacity. During a burst
            # of thousands of submissions this keeps the scheduler from re-reading the growing queue
            # each time. AUTO (-1) may resolve to any level: it always counts as above the floor.
            if (cap == seen_cap and cap != -1 and self.free_nodes == 0 and now - last_full < self.cfg.tick
                    and not _above(levels, seen_levels, self.floor)):
                self.skipped += 1
                continue
            seen_cap, seen_levels, last_full = cap, levels, now
            # [Note: batching] Events closer together than min_cycle are decided together: a burst
            # of job ends or submissions costs one cycle per min_cycle, not one per event.
            rest = self.cfg.min_cycle - (now - self.last_cycle_end)
            if rest > 0:
                stop.wait(rest)
            try:
                decisions = self.cycle()
            except Exception:
                log.exception("scheduling cycle failed; retrying next tick")
                stop.wait(poll)
                continue
            self.last_cycle_end = time.monotonic()
            # a cancel may fail the dependency of another queued job: decide on it now too
            again = any(isinstance(d, FinishJob) and d.requeue or isinstance(d, CancelJob) for d in decisions)
            if self.api is not None and any(isinstance(d, _AGENT_VISIBLE) for d in decisions):
                try:
                    self.api.request("POST", "/v1/internal/notify", json={"nodes": sorted(self.woken)}, timeout=10)
                except ApiError as exc:
                    log.warning("could not notify the agents (%s); they will see it on their next poll", exc)


def _floor(snap: Snapshot, decisions: list[Decision]) -> int:
    """The lowest effective priority of the attempts holding nodes after ``decisions`` (a submission
    above it may preempt); 99 when none holds a node (nothing to preempt)."""
    ended = {d.job_id for d in decisions if isinstance(d, FinishJob | StopJob)}
    prios = [j.priority for j in snap.jobs if j.status in JobStatus.ACTIVE and j.id not in ended]
    level = {j.id: j.priority for j in snap.jobs}
    prios += [level.get(d.job_id, 0) if d.priority is None else d.priority
              for d in decisions if isinstance(d, StartJob)]
    return min(prios, default=99)


def _above(levels: dict[str, int], seen: dict[str, int], floor: int) -> bool:
    """Whether a submission (or priority change) since ``seen`` came at a level above ``floor`` (or AUTO)."""
    return any(n != seen.get(k) and (int(k) == AUTO or int(k) > floor) for k, n in levels.items())


def main(argv: list[str] | None = None) -> None:
    from network import AuthError, server_settings
    from network.rpc import RpcServer
    from network.service import parse_service_args, service_parser, shutdown_event

    from .client import HaiClient
    from .config import load_config
    from .errors import DatabaseError, HaiError

    ap = service_parser("haiplatform.scheduler", "the HAI-Platform scheduler loop")
    args, cluster, node = parse_service_args(ap, argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = load_config(cluster)
        db = Database(cfg.resolved_db_url())
        deadline = time.monotonic() + 60
        while True:  # the API migrates the database; wait (bounded) for it
            try:
                db.check_head()
                break
            except DatabaseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        addr, port = cluster.endpoint("haiplatform.api")
        api = HaiClient(f"http://{addr}:{port}", cfg.secret(), timeout=30)
    except (HaiError, KeyError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    svc = cluster.service("haiplatform.scheduler")
    try:
        security = server_settings(cluster)
    except AuthError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    rpc = RpcServer(node.address, svc.port if svc else 0, name="haiplatform.scheduler", **security)
    sched = Scheduler(db, cfg, api, registry=rpc.metrics)
    rpc.register("scheduler.stats", lambda a, p, c: {"cycles": sched.cycles, "decisions": sched.decisions,
                                                     "last_cycle_s": sched.last_cycle_s,
                                                     "skipped": sched.skipped})
    rpc.start()
    log.info("scheduler on %s:%s (db %s, tick %s s)", node.address, rpc.port, db.safe_url, cfg.tick)
    try:
        sched.run(shutdown_event)
    finally:
        rpc.stop()
        api.close()
        db.dispose()


if __name__ == "__main__":
    main()
