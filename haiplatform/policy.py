"""The scheduling policy: a pure function from one snapshot to a list of decisions.

No I/O, no clock, no randomness: :func:`decide` reads a :class:`Snapshot` (the live jobs with
their ranks, the nodes, the quotas and ``now``) and returns :class:`Decision` objects that the
scheduler loop writes to the database in one transaction. The live loop, the tests and any
simulator run this same code.

One scheduling cycle is a pipeline of named phases, as in the Kubernetes scheduling framework:

==================  =====================================================================
phase               what it does
==================  =====================================================================
``node_health``     nodes whose agent missed heartbeats for ``heartbeat_timeout`` -> lost
``reconcile``       running attempts: mark running, stop on a failed / lost rank or a
                    stop / suspend request, finish when every rank has ended (a suspended
                    attempt is re-queued as the next attempt of its chain)
``queue_sort``      queued attempts by priority (high first), then ``first_id`` (the chain's
                    first submission, so a resumed job keeps its place) (``PrioritySort``)
``node filter``     ready nodes: up, not drained, not held by another attempt
``filters``         per user / group and priority: skip what would exceed its quota
                    (``QuotaFilter``); nothing starts behind a blocked attempt (``StrictOrder``)
``score``           topology: fill one leaf, else one zone, else the fewest zones (``TopologyScore``)
``reserve / bind``  take the nodes, lay out the ranks (``StartJob``)
==================  =====================================================================

The queue's phases are plugins composed in a :class:`Profile` (``DEFAULT_PROFILE``); each filter
and the score answer with a typed :class:`Status` (success, unschedulable, wait) and a reason.

[Note: strict order, no backfill] As in the reference's FIFO, the queue is served in order:
when the head attempt does not fit the free nodes, nothing behind it starts (they would take
nodes the head waits for and could starve it forever). Quota-blocked attempts are skipped, not
blocking: their owner's quota, not the cluster, holds them back.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from .states import AUTO, PRIORITIES, Desired, JobStatus, NodeState, RankStatus, StopCode

__all__ = ["NodeView", "RankView", "JobView", "QuotaView", "Snapshot", "PolicyConfig", "Decision", "MarkNode",
           "MarkRunning", "StartJob", "StopJob", "CancelJob", "FinishJob", "SetReason", "MarkRanksLost",
           "SetPriority", "DrainNode", "PROFILES", "queue_position", "never_fits",
           "decide", "plan", "queue_sort", "quota_filter", "node_filter", "score_nodes", "rank_layout",
           "Code", "Status", "CycleState", "QueueSortPlugin", "FilterPlugin", "ScorePlugin", "Profile",
           "PrioritySort", "QuotaFilter", "StrictOrder", "TopologyScore", "RandomScore", "DEFAULT_PROFILE",
           "REFERENCE_FIFO"]


#: the reason of an attempt waiting for free nodes (also the reason a new submission starts with)
WAITING = "waiting for nodes"


# -- the snapshot ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeView:
    name: str
    zone: str = ""
    leaf: str = ""
    gpus: int = 0
    state: str = NodeState.UP
    drained: bool = False
    last_seen: float = 0.0


@dataclass(frozen=True)
class RankView:
    rank: int
    node: str
    status: str = RankStatus.CREATED
    desired: str = Desired.RUN
    exit_code: int | None = None


@dataclass(frozen=True)
class JobView:
    id: int
    user: str
    nodes: int
    priority: int = 10
    status: str = JobStatus.QUEUED
    first_id: int = 0          # 0: the job is its own chain's first attempt
    group: str | None = None
    procs_per_node: int = 0
    stop_requested: int = 0
    stop_code: int = 0
    assigned_nodes: tuple[str, ...] = ()
    ranks: tuple[RankView, ...] = ()
    reason: str = ""
    submitted_priority: int = 10      # what the user asked; AUTO (-1) for "auto"
    created_at: float = 0.0           # this attempt's creation (its queue entry)
    submitted_at: float = 0.0         # the chain's first submission
    started_at: float | None = None   # this attempt started (scheduled_at); None while queued
    chain_run_s: float = 0.0          # run time of the chain's earlier attempts
    time_limit: float = 0.0           # the chain's total run time limit, 0 = none
    watchdog: float = 0.0             # no output for this long -> hung; 0 = off
    last_output: float = 0.0          # newest output of any rank (ts), 0 = none
    last_checkpoint: float = 0.0      # newest reported checkpoint (ts), 0 = never
    restart_count: int = 0

    @property
    def rank_key(self) -> int:
        return self.first_id or self.id


@dataclass(frozen=True)
class QuotaView:
    subject: str               # user:NAME | group:NAME
    max_nodes: int
    priority: int | None = None  # None: counts every priority


@dataclass(frozen=True)
class Snapshot:
    now: float
    jobs: tuple[JobView, ...] = ()      # live attempts (queued, scheduled, running, stopping)
    nodes: tuple[NodeView, ...] = ()
    quotas: tuple[QuotaView, ...] = ()


@dataclass(frozen=True)
class PolicyConfig:
    heartbeat_timeout: float = 10.0
    min_run_time: float = 300.0       # a running attempt is not preempted before it ran this long
    demote_after: float = 1800.0      # ABOVE_NORMAL -> NORMAL after this much chain run time
    max_node_requeues: int = 10       # a lost node re-queues the attempt while restart_count < this
    reservations: int = 16            # how many blocked attempts get a backfill reservation
    cross_zone_jobs: int = 1          # running attempts that may span zones at a time
    seed: int = 0                     # reference-fifo's random node choice


# -- the decisions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    pass


@dataclass(frozen=True)
class MarkNode(Decision):
    node: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class MarkRanksLost(Decision):
    job_id: int
    node: str


@dataclass(frozen=True)
class MarkRunning(Decision):
    job_id: int


@dataclass(frozen=True)
class StartJob(Decision):
    job_id: int
    nodes: tuple[str, ...]
    ranks: tuple[tuple[int, str, int], ...]   # (rank, node, local_rank)
    priority: int | None = None               # the effective level it starts at (AUTO resolved)


@dataclass(frozen=True)
class StopJob(Decision):
    job_id: int
    code: int
    desired: str = Desired.STOP  # stop | suspend (the agent signals a suspend first)
    reason: str = ""


@dataclass(frozen=True)
class CancelJob(Decision):
    job_id: int
    reason: str = "canceled while queued"


@dataclass(frozen=True)
class FinishJob(Decision):
    job_id: int
    status: str
    stop_code: int
    exit_code: int | None
    reason: str = ""
    requeue: bool = False       # a suspended attempt: insert the chain's next attempt


@dataclass(frozen=True)
class SetReason(Decision):
    job_id: int
    reason: str


@dataclass(frozen=True)
class SetPriority(Decision):
    """The effective level of a queued or running attempt changes (AUTO resolution, demotion)."""

    job_id: int
    priority: int
    reason: str = ""


@dataclass(frozen=True)
class DrainNode(Decision):
    """Drain a node (one lost under a running attempt), so nothing new is placed on it."""

    node: str
    reason: str = ""


# -- phases ---------------------------------------------------------------------------------------

def node_health(snap: Snapshot, cfg: PolicyConfig) -> list[Decision]:
    """Nodes that stopped heartbeating are lost (an agent's registration brings them back)."""
    out: list[Decision] = []
    for n in snap.nodes:
        if n.state == NodeState.UP and snap.now - n.last_seen > cfg.heartbeat_timeout:
            out.append(MarkNode(n.name, NodeState.LOST, f"no heartbeat for {snap.now - n.last_seen:.1f} s "
                                                        f"(timeout {cfg.heartbeat_timeout:g} s)"))
    return out


def _final_status(job: JobView, ranks: Iterable[RankView]) -> tuple[str, int | None]:
    ranks = list(ranks)
    # the job's exit code is the first rank that failed on its own, not a rank the scheduler then
    # killed (SIGTERM: -15) to stop the job
    failed = [r.exit_code for r in ranks if r.status == RankStatus.FAILED and r.exit_code not in (None, 0)]
    codes = failed or [r.exit_code for r in ranks if r.exit_code not in (None, 0)]
    exit_code = codes[0] if codes else (0 if ranks and all(r.exit_code == 0 for r in ranks) else None)
    code = job.stop_code
    if code & StopCode.INTERRUPT:
        return JobStatus.SUSPENDED, exit_code
    if code & (StopCode.NODE_LOST | StopCode.FAILED | StopCode.INIT_FAILED):
        return JobStatus.FAILED, exit_code
    if code & (StopCode.MANUAL_STOP | StopCode.STOP):
        return JobStatus.STOPPED, exit_code
    if any(r.status != RankStatus.SUCCEEDED for r in ranks):
        return JobStatus.FAILED, exit_code
    return JobStatus.SUCCEEDED, exit_code


def reconcile(snap: Snapshot, cfg: PolicyConfig, lost_nodes: set[str]) -> list[Decision]:
    """Move attempts that hold nodes along their lifecycle; cancel stopped queued ones."""
    out: list[Decision] = []
    for job in snap.jobs:
        if job.status == JobStatus.QUEUED:
            if job.stop_requested:
                out.append(CancelJob(job.id))
            continue
        if job.status not in JobStatus.ACTIVE:
            continue
        ranks = {r.rank: r for r in job.ranks}
        stop_code = job.stop_code
        stopping = job.status == JobStatus.STOPPING
        # ranks on a lost node are lost
        for node in sorted({r.node for r in ranks.values() if r.node in lost_nodes
                            and r.status not in RankStatus.DONE}):
            out.append(MarkRanksLost(job.id, node))
            for k, r in ranks.items():
                if r.node == node and r.status not in RankStatus.DONE:
                    ranks[k] = RankView(r.rank, r.node, RankStatus.LOST, r.desired, r.exit_code)
        views = list(ranks.values())
        if not stopping:
            why = None
            if any(r.status == RankStatus.LOST for r in views):
                why = (StopCode.NODE_LOST, Desired.STOP, "a node of the job was lost")
            elif any(r.status == RankStatus.FAILED for r in views):
                failed = next(r for r in views if r.status == RankStatus.FAILED)
                why = (StopCode.FAILED, Desired.STOP, f"rank {failed.rank} failed (exit code {failed.exit_code})")
            elif job.stop_requested:
                desired = Desired.SUSPEND if job.stop_requested & StopCode.INTERRUPT else Desired.STOP
                why = (job.stop_requested, desired, "suspend requested" if desired == Desired.SUSPEND
                       else "stop requested")
            if why is not None and not all(r.status in RankStatus.DONE for r in views):
                out.append(StopJob(job.id, why[0], why[1], why[2]))
                continue
            if why is not None and why[1] == Desired.STOP and why[2] != "stop requested":
                stop_code |= why[0]   # a failure seen only now; a late stop request changes nothing
        if views and all(r.status in RankStatus.DONE for r in views):
            done = JobView(**{**job.__dict__, "stop_code": stop_code})
            status, exit_code = _final_status(done, views)
            reason = {JobStatus.SUCCEEDED: "every rank exited 0",
                      JobStatus.SUSPENDED: "suspended; the chain continues in a new attempt"}.get(
                status, StopCode.describe(stop_code))
            out.append(FinishJob(job.id, status, stop_code, exit_code, reason,
                                 requeue=status == JobStatus.SUSPENDED))
            continue
        if job.status == JobStatus.SCHEDULED and views and all(
                r.status in (RankStatus.RUNNING, *RankStatus.DONE) for r in views):
            out.append(MarkRunning(job.id))
    return out


def queue_sort(jobs: Iterable[JobView]) -> list[JobView]:
    """Queued attempts, highest priority first, then by the chain's first submission."""
    return sorted((j for j in jobs if j.status == JobStatus.QUEUED and not j.stop_requested),
                  key=lambda j: (-j.priority, j.rank_key, j.id))


def _quotas_for(job: JobView, quotas: Iterable[QuotaView]) -> list[QuotaView]:
    subjects = {f"user:{job.user}"} | ({f"group:{job.group}"} if job.group else set())
    return [q for q in quotas if q.subject in subjects and (q.priority is None or q.priority == job.priority)]


def _quota_usage_key(q: QuotaView) -> tuple[str, int | None]:
    return (q.subject, q.priority)


def quota_filter(job: JobView, quotas: Iterable[QuotaView], usage: dict) -> str | None:
    """None when ``job`` fits its quotas, else the reason it waits."""
    for q in _quotas_for(job, quotas):
        if job.nodes > q.max_nodes:
            return (f"quota_exceeded: asks {job.nodes} nodes, quota {q.subject}"
                    f"{'' if q.priority is None else f' at priority {q.priority}'} is {q.max_nodes}")
        used = usage.get(_quota_usage_key(q), 0)
        if used + job.nodes > q.max_nodes:
            return (f"out_of_quota: {q.subject}{'' if q.priority is None else f' at priority {q.priority}'} "
                    f"uses {used} of {q.max_nodes} nodes")
    return None


def _charge(job: JobView, quotas: Iterable[QuotaView], usage: dict) -> None:
    for q in _quotas_for(job, quotas):
        k = _quota_usage_key(q)
        usage[k] = usage.get(k, 0) + job.nodes


def node_filter(nodes: Iterable[NodeView], held: set[str], lost: set[str]) -> list[NodeView]:
    """Nodes a new attempt may take: up, not drained, not held by another attempt."""
    return [n for n in nodes if n.state == NodeState.UP and n.name not in lost and not n.drained and n.name not in held]


def score_nodes(free: list[NodeView], count: int) -> tuple[str, ...] | None:
    """Pick ``count`` nodes, packing by topology: the tightest leaf that fits, else the tightest zone,
    else whole zones largest first. None when fewer than ``count`` nodes are free."""
    if len(free) < count:
        return None
    by_name = sorted(free, key=lambda n: n.name)
    for attr in ("leaf", "zone"):
        groups: dict[str, list[NodeView]] = defaultdict(list)
        for n in by_name:
            groups[getattr(n, attr)].append(n)
        fits = [(len(v), k) for k, v in groups.items() if len(v) >= count]
        if fits:
            _, best = min(fits)
            return tuple(n.name for n in groups[best][:count])
    zones: dict[str, list[NodeView]] = defaultdict(list)
    for n in by_name:
        zones[n.zone].append(n)
    picked: list[str] = []
    for _, z in sorted(((-len(v), k) for k, v in zones.items())):
        for n in zones[z]:
            if len(picked) < count:
                picked.append(n.name)
    return tuple(picked)


def rank_layout(job: JobView, nodes: tuple[str, ...], node_views: dict[str, NodeView]
                ) -> tuple[tuple[int, str, int], ...]:
    """(rank, node, local_rank) for each process: ``procs_per_node`` (default: the first node's GPUs, or 1)
    processes on each node, ranks node by node."""
    ppn = job.procs_per_node or max(1, node_views[nodes[0]].gpus)
    return tuple((i * ppn + lr, node, lr) for i, node in enumerate(nodes) for lr in range(ppn))


# -- plugins --------------------------------------------------------------------------------------
# [Note: plugins] The queue phases are small named plugins over one cycle's state, as in the
# Kubernetes scheduling framework: a queue sort orders the queued attempts; each filter answers
# one attempt with a typed Status (and the reason an attempt waits); a score plugin picks the nodes
# of an attempt the filters let through. A Profile is one composition of them; DEFAULT_PROFILE is
# the policy described at the top of this module.

class Code(StrEnum):
    """A plugin's verdict on one attempt."""

    SUCCESS = "success"
    UNSCHEDULABLE = "unschedulable"  # held back by its own limits (a quota): the queue goes on behind it
    WAIT = "wait"                    # no room for it now: in strict order, nothing behind it starts


@dataclass(frozen=True)
class Status:
    code: Code = Code.SUCCESS
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.code == Code.SUCCESS


SUCCESS = Status()


@dataclass
class CycleState:
    """What the queue's plugins see and update during one cycle."""

    snap: Snapshot
    free: list[NodeView]                 # ready nodes not taken yet
    usage: dict = field(default_factory=dict)  # (quota subject, priority) -> nodes charged
    blocked: bool = False                # an attempt ahead could not get nodes (strict order)
    cfg: PolicyConfig = field(default_factory=PolicyConfig)
    rng: random.Random = field(default_factory=random.Random)  # seeded from cfg.seed by plan()


class QueueSortPlugin(Protocol):
    name: str

    def sort(self, jobs: Iterable[JobView]) -> list[JobView]: ...


class FilterPlugin(Protocol):
    name: str

    def filter(self, job: JobView, cs: CycleState) -> Status: ...


class ScorePlugin(Protocol):
    name: str

    def place(self, job: JobView, cs: CycleState) -> tuple[Status, tuple[str, ...] | None]: ...


@dataclass(frozen=True)
class PrioritySort:
    """:func:`queue_sort`: priority (high first), then the chain's first submission."""

    name: str = "priority_sort"

    def sort(self, jobs: Iterable[JobView]) -> list[JobView]:
        return queue_sort(jobs)


@dataclass(frozen=True)
class QuotaFilter:
    """:func:`quota_filter`: an attempt over its user's or group's quota waits, without blocking others."""

    name: str = "quota"

    def filter(self, job: JobView, cs: CycleState) -> Status:
        why = quota_filter(job, cs.snap.quotas, cs.usage)
        return SUCCESS if why is None else Status(Code.UNSCHEDULABLE, why)


@dataclass(frozen=True)
class StrictOrder:
    """[Note: strict order, no backfill] nothing starts behind an attempt that could not get nodes."""

    name: str = "strict_order"

    def filter(self, job: JobView, cs: CycleState) -> Status:
        return Status(Code.WAIT, WAITING) if cs.blocked else SUCCESS


@dataclass(frozen=True)
class TopologyScore:
    """:func:`score_nodes`: the tightest leaf that fits, else the tightest zone, else whole zones."""

    name: str = "topology"

    def place(self, job: JobView, cs: CycleState) -> tuple[Status, tuple[str, ...] | None]:
        chosen = score_nodes(cs.free, job.nodes)
        return (Status(Code.WAIT, WAITING), None) if chosen is None else (SUCCESS, chosen)


@dataclass(frozen=True)
class Profile:
    """One policy: a queue sort, filters (in order; the first that does not succeed decides) and a score."""

    name: str
    queue_sort: QueueSortPlugin
    filters: tuple[FilterPlugin, ...]
    score: ScorePlugin


@dataclass(frozen=True)
class RandomScore:
    """The reference matcher's placement: random free nodes (seeded by ``PolicyConfig.seed``), no topology."""

    name: str = "random"

    def place(self, job: JobView, cs: CycleState) -> tuple[Status, tuple[str, ...] | None]:
        if len(cs.free) < job.nodes:
            return Status(Code.WAIT, WAITING), None
        return SUCCESS, tuple(sorted(n.name for n in cs.rng.sample(cs.free, job.nodes)))


DEFAULT_PROFILE = Profile("fireflyer", PrioritySort(), (QuotaFilter(), StrictOrder()), TopologyScore())
REFERENCE_FIFO = Profile("reference-fifo", PrioritySort(), (QuotaFilter(), StrictOrder()), RandomScore())
#: the policies by name (``[haiplatform] policy`` in the cluster file, ``hai sim --policy``)
PROFILES: dict[str, Profile] = {p.name: p for p in (DEFAULT_PROFILE, REFERENCE_FIFO)}


def queue_position(snap: Snapshot, cfg: PolicyConfig | None = None, profile: Profile = DEFAULT_PROFILE
                   ) -> dict[int, int]:
    """The 1-based place of each queued attempt in the order ``profile`` serves the queue (``hai list``)."""
    return {j.id: i for i, j in enumerate(profile.queue_sort.sort(snap.jobs), 1)}


def never_fits(nodes: int, user: str, group: str | None, priority: int, node_views: Iterable[NodeView],
               quotas: Iterable[QuotaView]) -> str | None:
    """Why a submission of ``nodes`` nodes can never run (the API refuses it), or None.

    It never runs when it asks more nodes than the cluster has, or more than a quota that applies to
    it at every level it could run at (``priority``; for AUTO: the levels of its per-priority quotas
    and NORMAL)."""
    total = sum(1 for _ in node_views)
    if nodes > total:
        return f"asks {nodes} nodes, the cluster has {total}"
    subjects = {f"user:{user}"} | ({f"group:{group}"} if group else set())
    mine = [q for q in quotas if q.subject in subjects]
    levels = ({q.priority for q in mine if q.priority is not None} | {PRIORITIES["normal"]}) if priority == AUTO \
        else {priority}
    whys = []
    for level in sorted(levels, reverse=True):
        over = [q for q in mine if (q.priority is None or q.priority == level) and nodes > q.max_nodes]
        if not over:
            return None
        q = min(over, key=lambda q: q.max_nodes)
        whys.append(f"quota {q.subject}{'' if q.priority is None else f' at priority {q.priority}'} "
                    f"is {q.max_nodes}")
    return f"asks {nodes} nodes, " + "; ".join(whys)


def decide(snap: Snapshot, cfg: PolicyConfig | None = None) -> list[Decision]:
    """One scheduling cycle: every phase in order, over one snapshot."""
    return plan(snap, cfg)[0]


def plan(snap: Snapshot, cfg: PolicyConfig | None = None, profile: Profile = DEFAULT_PROFILE
         ) -> tuple[list[Decision], int]:
    """:func:`decide`, plus how many ready nodes are left free after its decisions."""
    cfg = cfg or PolicyConfig()
    out: list[Decision] = node_health(snap, cfg)
    lost = {n.name for n in snap.nodes if n.state != NodeState.UP} | {d.node for d in out if isinstance(d, MarkNode)}
    out += reconcile(snap, cfg, lost)
    # A suspended attempt's nodes stay held until the next cycle, when its successor (inserted by this
    # cycle's writes) is in the queue with the chain's first_id and can win them back.
    finished = {d.job_id for d in out if isinstance(d, FinishJob) and not d.requeue}
    # nodes held: by every attempt holding nodes that is not finishing in this cycle
    held: set[str] = set()
    usage: dict = {}
    for j in snap.jobs:
        if j.status in JobStatus.ACTIVE and j.id not in finished:
            held.update(j.assigned_nodes)
            _charge(j, snap.quotas, usage)
    node_views = {n.name: n for n in snap.nodes}
    cs = CycleState(snap, node_filter(snap.nodes, held, lost), usage, cfg=cfg, rng=random.Random(cfg.seed))
    for job in profile.queue_sort.sort(snap.jobs):
        status = next((st for f in profile.filters if not (st := f.filter(job, cs)).ok), SUCCESS)
        if status.ok:
            status, chosen = profile.score.place(job, cs)
            if status.ok and chosen is not None:
                out.append(StartJob(job.id, chosen, rank_layout(job, chosen, node_views), job.priority))
                taken = set(chosen)
                cs.free = [n for n in cs.free if n.name not in taken]
                _charge(job, snap.quotas, cs.usage)
                continue
        if status.code == Code.WAIT:
            cs.blocked = True
        if status.reason != job.reason:
            out.append(SetReason(job.id, status.reason))
    return out, len(cs.free)
